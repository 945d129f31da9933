"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, naming the field.

FastAPI answers invalid bodies with 422 and a list of pydantic errors; the OpenAI API answers 400
with one message. `validation_error_response` turns the first pydantic error into that message,
with the field's dotted path as `param` ("messages.0.role"), so clients see which field is wrong.
"""
from __future__ import annotations

from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

# pydantic's union-member labels in error locations ("str", "list[int]", "constrained-str"):
# they say which union branch failed, not which field, so they are dropped from `param`.
_UNION_TYPES = {"str", "int", "float", "bool", "dict"}
_UNION_PREFIXES = ("list[", "dict[", "constrained-", "function-", "tagged-union", "json-or-python", "nullable[")

# fields of OpenAI's completions / chat API this server does not implement: refused like unknown ones,
# but the message must not tell a user of the real API that their field does not exist
OPENAI_UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "parallel_tool_calls": "tool calling",
    "functions": "function calling", "function_call": "function calling", "tool_calls": "tool calling",
    "tool_call_id": "tool calling", "best_of": "server-side best-of sampling", "suffix": "insertion (suffix)",
    "store": "storing completions", "metadata": "stored-completion metadata", "audio": "audio output",
    "modalities": "output modalities other than text", "prediction": "predicted outputs",
    "reasoning_effort": "reasoning models", "service_tier": "service tiers", "web_search_options": "web search",
    "refusal": "assistant refusals",
}


class APIError(Exception):
    """An error the handlers answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, counted: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.counted = counted  # already in the error metric (raised where a stream may have started)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | int | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _field_path(loc: tuple) -> str | None:
    """("body", "messages", 0, "role") -> "messages.0.role"; union branch labels are skipped."""
    parts = [str(p) for p in loc[1:]
             if not (isinstance(p, str) and (p in _UNION_TYPES or p.startswith(_UNION_PREFIXES) or "[" in p))]
    return ".".join(parts) or None


def _describe(err: dict) -> str:
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    if err.get("type") == "missing":
        return "field required"
    if err.get("type") == "extra_forbidden":
        name = str(err.get("loc", ("",))[-1])
        if name in OPENAI_UNSUPPORTED:
            return f"not supported by this server ({OPENAI_UNSUPPORTED[name]}); leave it out"
        return "unrecognized request argument (not part of the API)"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in err and err.get("type") != "model_attributes_type":
        shown = repr(err["input"])
        msg += f" (got {shown[:80]}{'...' if len(shown) > 80 else ''})"
    return msg


def _relevance(err: dict) -> tuple:
    """Sort key, most telling error first. A union yields one error per branch, and most say only that
    the input is not the branch's type ("Input should be a valid string" for prompt=[]): prefer errors
    about a named field, then a branch whose type the input had (a broken limit: too_short, too_long,
    less_than ...), then the one that got deepest into the input (prompt.0 of [1.5])."""
    path = _field_path(tuple(err.get("loc", ())))
    wrong_type = str(err.get("type", "")).endswith("_type")
    return (path is None, wrong_type, -len(path.split(".")) if path else 0)


def _is_json(content_type: str | None) -> bool:
    """What FastAPI parses as JSON: no Content-Type, application/json or application/*+json."""
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def validation_error_response(exc: RequestValidationError, content_type: str | None = None) -> JSONResponse:
    """`content_type`: the request's header. A body sent as another type is not read as JSON at all
    (`curl -d` sends form data's type), so its error names the header rather than the body."""
    errors = list(exc.errors())
    if not errors:
        return error_response(400, "invalid request")
    err = min(errors, key=_relevance)
    loc = tuple(err.get("loc", ()))
    param = _field_path(loc)
    if err.get("type") == "json_invalid":
        param = None
    elif param is None and loc[:1] == ("body",) and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
        if not _is_json(content_type):
            return error_response(400, f"request body must be JSON sent with Content-Type: application/json, got "
                                       f"Content-Type: {content_type!r}", param=None, code="invalid_content_type")
        return error_response(400, "request body must be a JSON object", param=None, code="invalid_body")
    message = f"{param}: {_describe(err)}" if param else _describe(err)
    return error_response(400, message, param=param, code=err.get("type"))


def install_error_handlers(app: FastAPI, count_error: Callable[[int], None] = lambda status: None) -> None:
    """OpenAI-shaped error bodies for every failure; each error answered is counted once by
    `count_error(status)` (the request_errors metric), unless the raiser counted it already."""
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        response = validation_error_response(exc, request.headers.get("content-type"))
        count_error(response.status_code)
        return response

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        if not exc.counted:
            count_error(exc.status)
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ClientDisconnect):
            # FastAPI turns a body cut short by the client's hang-up into "400 error parsing the body":
            # the client closed its request (499, as lifecycle counts it), it did not send a bad one
            count_error(499)
            return error_response(499, "client disconnected while sending the request body", code="client_closed")
        cause = exc.__cause__  # what FastAPI's "There was an error parsing the body" stands for
        if isinstance(cause, (UnicodeDecodeError, RecursionError)):
            count_error(400)
            why = ("nested too deeply" if isinstance(cause, RecursionError) else
                   f"it is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at position {cause.start})")
            return error_response(400, f"request body is not valid JSON: {why}", code="json_invalid")
        count_error(exc.status_code)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        count_error(500)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
