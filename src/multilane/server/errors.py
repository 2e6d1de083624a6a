"""How failures become HTTP answers: OpenAI-style bodies under /v1, Ollama-style ones elsewhere."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from multilane.errors import (
    ContextLengthError,
    EngineError,
    InputError,
    JournalError,
    MemoryBudgetError,
    MultilaneError,
    OutputValidationError,
    QueueFullError,
    ReplayError,
    ResumeError,
    RuntimeClosedError,
    SpecError,
    TemplateError,
    UnknownNameError,
)
from multilane.server.common import ApiError, ClientGone, json_response
from multilane.server.shutdown import RETRY_AFTER

log = structlog.get_logger(__name__)

SHUTTING_DOWN = "shutting_down"
"""The code of a 503 that the server's shutdown answers: the call did not start, or was cut when the grace ran out."""
_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error"}


def error_body(path: str, message: str, *, type: str, code: str | None,
               param: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` under /v1 (OpenAI), `{"error": message}` elsewhere (Ollama)."""
    if path.startswith("/v1"):
        return {"error": {"message": message, "type": type, "param": param, "code": code}}
    return {"error": message}


def error_response(path: str, status: int, message: str, *, type: str, code: str | None = None,
                   headers: Mapping[str, str] | None = None, param: str | None = None) -> Response:
    """An error answer in the body style of the path's API."""
    return json_response(error_body(path, message, type=type, code=code, param=param), status, headers)


def log_refusal(scope: Mapping[str, Any], status: int, message: str, *, expected: bool = False) -> None:
    """Log why a request was refused or failed, with its method, route (the matched template, else the path),
    request id and status: a warning for a refusal (4xx, 503), an error for a failure, and only an info line
    for an `expected` refusal (the shutdown's, which it sums up in one line of its own)."""
    route = getattr(scope.get("route"), "path", None) or scope.get("path")
    fields = {"method": scope.get("method"), "route": route, "path": scope.get("path"), "status": status,
              "request_id": scope.get("state", {}).get("request_id"), "error": message}
    if expected:
        log.info("request refused", **fields)
    elif status >= 500 and status != 503:
        log.error("request failed", **fields)
    else:
        log.warning("request refused", **fields)


def api_error(exc: BaseException) -> ApiError:
    """The HTTP status, type and code of a failure; a StageError is judged by its cause."""
    if isinstance(exc, ApiError):
        return exc
    message = str(exc)
    cause: BaseException = exc
    while isinstance(getattr(cause, "cause", None), BaseException):  # StageError, ItemError: judge by the cause
        cause = cause.cause  # type: ignore[attr-defined]
    if isinstance(cause, QueueFullError):
        return ApiError(503, message, type="overloaded_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(cause, RuntimeClosedError):  # shutting down: a load balancer retries it on another server
        return ApiError(503, message, type="overloaded_error", code=SHUTTING_DOWN, headers={"Retry-After": RETRY_AFTER})
    if isinstance(cause, MemoryBudgetError):
        return ApiError(503, message, type="overloaded_error", code="memory_budget", headers={"Retry-After": "5"})
    if isinstance(cause, ContextLengthError):
        return ApiError(400, message, code="context_length_exceeded")
    if isinstance(cause, UnknownNameError):
        return ApiError(404, message, type="not_found_error", code="not_found")
    if isinstance(cause, InputError):
        return ApiError(422, message, code="invalid_input")
    if isinstance(cause, TimeoutError):
        return ApiError(504, message, type="timeout_error", code="timeout")
    if isinstance(cause, OutputValidationError):
        return ApiError(500, message, type="server_error", code="invalid_model_output")
    if isinstance(cause, EngineError):
        return ApiError(500, f"engine failure: {message}", type="server_error", code="engine_error")
    if isinstance(cause, ResumeError):
        return ApiError(409, message, type="conflict_error", code="resume_refused")
    if isinstance(cause, ReplayError):
        return ApiError(409, message, type="conflict_error", code="replay_mismatch")
    if isinstance(cause, JournalError):
        return ApiError(503, message, type="server_error", code="journal_unavailable")
    if isinstance(cause, TemplateError | SpecError):
        return ApiError(500, message, type="server_error", code="pipeline_error")
    if isinstance(cause, MultilaneError):
        return ApiError(500, message, type="server_error", code="multilane_error")
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error",
                    code="internal_error")


def validation_message(exc: RequestValidationError) -> str:
    """Validation errors as `body.messages.0.role: field required`, joined with `; `."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or "body"
        text = str(error.get("msg", "invalid"))
        if error.get("type") == "json_invalid":
            text = f"invalid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
        parts.append(f"{where}: {text[:1].lower()}{text[1:]}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to a status and a body without a stack trace."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        err = api_error(exc)
        log_refusal(request.scope, err.status, err.message, expected=err.code == SHUTTING_DOWN)
        return error_response(request.url.path, err.status, err.message, type=err.type, code=err.code,
                              headers=err.headers, param=err.param)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message = validation_message(exc)
        log_refusal(request.scope, 422, message)
        return error_response(request.url.path, 422, message, type="invalid_request_error", code="invalid_body")

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        type_ = _HTTP_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        log_refusal(request.scope, exc.status_code, str(exc.detail))
        return error_response(request.url.path, exc.status_code, str(exc.detail), type=type_,
                              code=type_ if exc.status_code != 404 else "not_found", headers=exc.headers)

    async def on_gone(request: Request, exc: Exception) -> Response:
        log.info("client disconnected; its requests were aborted", path=request.url.path)
        return Response(status_code=499)

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("request crashed", path=request.url.path,
                      request_id=request.scope.get("state", {}).get("request_id"))
        err = api_error(exc)
        return error_response(request.url.path, err.status, err.message, type=err.type, code=err.code)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(MultilaneError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(ClientGone, on_gone)
    app.add_exception_handler(Exception, on_crash)
