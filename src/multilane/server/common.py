"""What the route modules share: the request's runtime, API errors, sampling options and disconnect handling."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

import anyio
import numpy as np
from fastapi import Request, Response
from pydantic import AfterValidator
from starlette.types import Receive, Scope

from multilane.durations import parse_duration
from multilane.engines.base import SamplingOptions
from multilane.json_schemas import schema_problem
from multilane.runtime import Runtime
from multilane.server.shutdown import Shutdown
from multilane.spec import ModelSpec

T = TypeVar("T")

_KIND_HINTS = {"generate": "use /v1/embeddings or /api/embed for it",
               "embedding": "use /v1/chat/completions, /v1/completions, /api/chat or /api/generate for it"}


class ApiError(Exception):
    """An error the server answers with its own status; `type` and `code` go into OpenAI-style bodies."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 headers: Mapping[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = dict(headers or {})
        self.param = param  # the request field at fault, as OpenAI's error bodies name it


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its engine requests were aborted."""


def _check_keep_alive(value: str | float | None) -> str | float | None:
    if value is not None:
        parse_duration(value)  # raises ValueError with a readable message, which pydantic reports with the field
    return value


KeepAlive = Annotated[str | float | None, AfterValidator(_check_keep_alive)]
"""A per-call keep_alive as Ollama takes it: "5m", seconds, 0 (unload when idle) or negative (stay loaded)."""


def runtime_of(request: Request) -> Runtime:
    """The runtime the app serves."""
    runtime: Runtime = request.app.state.runtime
    return runtime


def declared_model(runtime: Runtime, name: str, kind: str) -> ModelSpec:
    """The declared model called `name`, which must be of `kind`; UnknownNameError (404) if it is not declared."""
    model = runtime.spec.model(name)
    if model.kind != kind:
        article = "an" if model.kind == "embedding" else "a"
        raise ApiError(400, f"model '{name}' is {article} {model.kind} model; {_KIND_HINTS[model.kind]}",
                       code="wrong_model_kind")
    return model


PRIORITY_HEADER = "X-Multilane-Priority"


def call_priority(request: Request, given: int | None = None) -> int:
    """A call's priority (lower first): the body's `priority` if given, else the X-Multilane-Priority header, else 0."""
    if given is not None:
        return given
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return 0
    try:
        return int(raw.strip())
    except ValueError:
        raise ApiError(422, f"header {PRIORITY_HEADER}: expected an integer (lower runs first, default 0), got "
                            f"{raw!r}", code="invalid_priority") from None


def sampling(request: Request, *, max_tokens: int | None, temperature: float | None, top_p: float | None,
             stop: str | list[str] | None, seed: int | None,
             json_schema: dict[str, Any] | None = None, ignore_eos: bool = False) -> SamplingOptions:
    """Sampling options from a request's fields; what is not given takes the server's defaults."""
    default_max: int = request.app.state.default_max_tokens
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingOptions(max_tokens=max_tokens or default_max,
                           temperature=0.0 if temperature is None else temperature,
                           top_p=1.0 if top_p is None else top_p, stop=stops, seed=seed, json_schema=json_schema,
                           ignore_eos=ignore_eos)


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def dumps(content: Any) -> str:
    """JSON text of a response body; numpy values become plain numbers."""
    return json.dumps(content, ensure_ascii=False, default=_default)


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response rendered with `dumps`."""
    return Response(dumps(content), status_code=status, headers=dict(headers or {}), media_type="application/json")


def sse(content: Any) -> str:
    """One server-sent event carrying JSON."""
    return f"data: {content if isinstance(content, str) else dumps(content)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def shutdown_of(scope: Scope) -> Shutdown | None:
    """The shutdown of the app serving a request (`create_app` gives every app one)."""
    shutdown = getattr(getattr(scope.get("app"), "state", None), "shutdown", None)
    return shutdown if isinstance(shutdown, Shutdown) else None


async def _until_gone_or_cut(scope: Scope, receive: Receive) -> bool:
    """Wait until the client disconnects (False) or the server's shutdown cuts the calls still running (True)."""
    shutdown = shutdown_of(scope)
    cut = False
    async with anyio.create_task_group() as tg:
        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        async def cut_off(shutdown: Shutdown) -> None:
            nonlocal cut
            await shutdown.cut_event().wait()
            cut = True
            tg.cancel_scope.cancel()

        tg.start_soon(gone)
        if shutdown is not None:
            tg.start_soon(cut_off, shutdown)
    return cut


async def abort_on_disconnect(request: Request, call: Callable[[], Awaitable[T]]) -> T:
    """Await `call()`, cancelling it (which aborts its engine requests) if the client disconnects first.

    A call the server's shutdown cuts fails with RuntimeClosedError (a 503).
    """
    done: list[T] = []
    failed: list[Exception] = []
    cut = False
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            nonlocal cut
            cut = await _until_gone_or_cut(request.scope, request.receive)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            done.append(await call())
        except Exception as exc:  # re-raised below as itself, not inside the task group's ExceptionGroup
            failed.append(exc)
        tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if not done:
        raise _cut_error(request.scope) if cut else ClientGone
    return done[0]


def _cut_error(scope: Scope) -> Exception:
    shutdown = shutdown_of(scope)
    assert shutdown is not None  # only a shutdown cuts calls
    return shutdown.cut_error()


def now() -> int:
    """Seconds since the epoch, as OpenAI's `created` fields have them."""
    return int(time.time())


Emit = Callable[[str], Awaitable[None]]


class LazyStreamResponse(Response):
    """Streams what `produce` emits; headers go out with the first piece, so a failure before it is a plain error.

    A client that disconnects cancels `produce`, which aborts its engine requests. A failure after the first
    piece is written into the stream by `on_error`; so is the server's shutdown cutting the stream.
    """

    def __init__(self, produce: Callable[[Emit], Awaitable[None]], *, media_type: str,
                 on_error: Callable[[Exception], str], headers: Mapping[str, str] | None = None) -> None:
        self.produce = produce
        self.on_error = on_error
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False
        gone = cut = False
        failed: list[Exception] = []

        async def emit(text: str) -> None:
            nonlocal started
            if not started:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                started = True
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                nonlocal gone, cut
                cut = await _until_gone_or_cut(scope, receive)
                gone = not cut
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self.produce(emit)
            except Exception as exc:  # handled below, outside the task group
                failed.append(exc)
            tg.cancel_scope.cancel()
        if gone:
            if not started:
                raise ClientGone
            return  # nothing more can reach the client
        if cut and not failed:
            failed.append(_cut_error(scope))
        if failed:
            if not started:
                raise failed[0]
            await emit(self.on_error(failed[0]))
        if not started:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def gather(calls: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Await calls concurrently; the first failure cancels the others and is raised as itself."""
    results: dict[int, T] = {}
    failed: list[Exception] = []
    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            async def one(i: int = i, call: Callable[[], Awaitable[T]] = call) -> None:
                try:
                    results[i] = await call()
                except Exception as exc:
                    failed.append(exc)
                    tg.cancel_scope.cancel()

            tg.start_soon(one)
    if failed:
        raise failed[0]
    return [results[i] for i in range(len(calls))]


def checked_schema(schema: dict[str, Any], field: str) -> dict[str, Any]:
    """A request's JSON schema as given, or a 422 naming its field and what is wrong, before anything is generated."""
    problem = schema_problem(schema)
    if problem is not None:
        raise ApiError(422, f"{field}: invalid JSON schema at {problem.where}: {problem.message}",
                       code="invalid_schema")
    return schema
