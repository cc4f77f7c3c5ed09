"""Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

`STATUS` is the one table from the core library's error types (`jaxlora.errors`) to what a client
sees. Every type there has a row (a test checks it); anything else that escapes is an internal error
(500) whose message is kept out of the response and in the logs.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from jaxlora import errors as core


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        if headers is None:  # the engine's refusals clear within moments; a rate limit's 429 names its own wait
            headers = {"Retry-After": "1"} if status in (429, 503) else {}
        self.headers = dict(headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def with_headers(self, headers: dict[str, str]) -> "ApiError":
        """A copy that also sends `headers` (a copy: `INTERNAL` is shared)."""
        return ApiError(self.status, self.message, self.type, self.param, self.code, self.headers | headers)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


INTERNAL = ApiError(500, "internal error", type_="internal_error")

# core error type -> (status, OpenAI type, param (None: the error's own), code, message (None: the error's own))
STATUS: dict[type[core.JaxLoraError], tuple[int, str, str | None, str | None, str | None]] = {
    core.InvalidRequest: (400, "invalid_request_error", None, None, None),
    core.DataError: (400, "invalid_request_error", "training_file", "invalid_training_file", None),
    core.InvalidAdapterRef: (400, "invalid_request_error", "model", "invalid_model", None),
    core.AdapterFormatError: (400, "invalid_request_error", "model", "adapter_unusable", None),
    core.AdapterNotFoundError: (404, "invalid_request_error", "model", "model_not_found", None),
    core.ResourceNotFound: (404, "invalid_request_error", None, "not_found", None),
    core.NotPermitted: (403, "permission_error", None, "not_permitted", None),
    core.TenantOverLimit: (429, "requests", None, "rate_limit_exceeded", None),
    core.Overloaded: (503, "overloaded_error", None, "overloaded", None),
    core.NoFreeSlot: (503, "overloaded_error", None, "overloaded", None),
    core.EngineDead: (503, "overloaded_error", None, "replica_unavailable",
                      "the model replica is restarting; retry shortly"),
    # The operator's checkpoint, not the client's request: kept out of the response like any internal error.
    core.ModelLoadError: (500, "internal_error", None, None, "internal error"),
}


def api_error_for(e: BaseException) -> ApiError:
    """The API error a core-library exception stands for; `INTERNAL` for anything not in `STATUS`."""
    for cls in type(e).__mro__:
        if cls in STATUS:
            status, type_, param, code, message = STATUS[cls]
            return ApiError(status, str(e) if message is None else message, type_,
                            getattr(e, "param", None) if param is None else param, code)
    return INTERNAL
