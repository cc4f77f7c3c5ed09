"""The one table from core error types to HTTP answers (`serve_app.errors.STATUS`)."""

import inspect

import pytest

from jaxlora import errors as core
from serve_app.errors import INTERNAL, STATUS, api_error_for


def _error_types():
    return [c for _, c in inspect.getmembers(core, inspect.isclass)
            if issubclass(c, core.JaxLoraError) and c is not core.JaxLoraError]


def test_every_core_error_type_has_a_row():
    assert set(_error_types()) == set(STATUS)


@pytest.mark.parametrize("cls", _error_types(), ids=lambda c: c.__name__)
def test_client_errors_carry_the_core_message(cls):
    e = cls("what to fix") if cls is not core.InvalidRequest else cls("what to fix", param="top_p")
    api = api_error_for(e)
    assert api.status == STATUS[cls][0]
    body = api.body()["error"]
    if api.status < 500 and STATUS[cls][4] is None:
        assert body["message"] == "what to fix"
    if api.status == 500:  # an operator's problem: the details stay in the logs
        assert "what to fix" not in body["message"]
    if cls is core.InvalidRequest:
        assert body["param"] == "top_p"


def test_anything_else_is_internal():
    assert api_error_for(core.JaxLoraError("secret detail")) is INTERNAL
    assert api_error_for(KeyError("secret")) is INTERNAL
