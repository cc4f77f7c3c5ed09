"""Every error type the core library and the trainer raise on purpose, in one place.

Each carries a message meant for the person who can fix the problem. The serving layer maps each
type to an HTTP status in one table (`serve_app.errors.STATUS`) and passes the message through
unchanged; `JaxLoraError` itself is only a base and is never raised bare.
"""


class JaxLoraError(Exception):
    """Base of every error the core library raises on purpose."""


class InvalidRequest(JaxLoraError):
    """A request the engine refuses as given (HTTP 400); the message names the parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Overloaded(JaxLoraError):
    """The waiting queue is full (HTTP 503): try again later."""


class TenantOverLimit(JaxLoraError):
    """One tenant is over its own limit (HTTP 429); other tenants are still served."""


class EngineDead(JaxLoraError):
    """The engine loop has stopped after an internal error; the replica must be replaced."""


class NoFreeSlot(JaxLoraError):
    """Every adapter slot is pinned by running requests; the caller should wait for one to finish."""


class ModelLoadError(JaxLoraError):
    """A model directory cannot be loaded: a missing file, an unsupported architecture, a bad tensor."""


class AdapterFormatError(JaxLoraError):
    """Adapter files that cannot be served: damaged, pickled, unsupported PEFT features, or made for another model."""


class AdapterNotFoundError(JaxLoraError):
    """No such adapter (or version) for this tenant; another tenant's adapter is reported the same way."""


class InvalidAdapterRef(JaxLoraError):
    """An adapter name, version or path that is malformed or would leave the tenant's folder."""


class DataError(JaxLoraError):
    """Training data that cannot be used; the message names the file and line."""


class ResourceNotFound(JaxLoraError):
    """No such file, fine-tuning job or checkpoint for this tenant; another tenant's is reported the same way."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class NotPermitted(JaxLoraError):
    """The tenant may use this resource but not change it (a shared adapter, the base model)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
