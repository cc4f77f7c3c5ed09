"""Error types of the core library.

Each carries a message meant for the person who can fix the problem; the serving layer maps the
types to HTTP status codes and passes the message through unchanged.
"""


class JaxLoraError(Exception):
    """Base of every error the core library raises on purpose."""


class ModelLoadError(JaxLoraError):
    """A model directory cannot be loaded: a missing file, an unsupported architecture, a bad tensor."""


class AdapterFormatError(JaxLoraError):
    """Adapter files that cannot be served: damaged, pickled, unsupported PEFT features, or made for another model."""


class AdapterNotFoundError(JaxLoraError):
    """No such adapter (or version) for this tenant; another tenant's adapter is reported the same way."""


class InvalidAdapterRef(JaxLoraError):
    """An adapter name, version or path that is malformed or would leave the tenant's folder."""
