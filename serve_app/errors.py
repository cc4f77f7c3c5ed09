"""Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

`api_error_for` maps the core library's error types onto statuses; anything not listed there is an
internal error (500) whose message is kept out of the response and in the logs.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from jaxlora.errors import AdapterFormatError, AdapterNotFoundError, InvalidAdapterRef
from jaxlora.sampling import InvalidRequest
from jaxlora.scheduler import EngineDead, Overloaded


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error_for(e: BaseException) -> ApiError | None:
    """The API error a core-library exception stands for, or None for an internal error."""
    if isinstance(e, InvalidRequest):
        return ApiError(400, str(e), param=e.param)
    if isinstance(e, InvalidAdapterRef):
        return ApiError(400, str(e), param="model", code="invalid_model")
    if isinstance(e, AdapterNotFoundError):
        return ApiError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, AdapterFormatError):
        return ApiError(400, str(e), param="model", code="adapter_unusable")
    if isinstance(e, Overloaded):
        return ApiError(503, str(e), type_="overloaded_error", code="overloaded")
    if isinstance(e, EngineDead):
        return ApiError(503, "the model replica is restarting; retry shortly", type_="overloaded_error",
                        code="replica_unavailable")
    return None
