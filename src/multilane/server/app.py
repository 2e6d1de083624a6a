"""The HTTP app over a Runtime: auth and body-size middleware, health and metrics, and the API routers."""

from __future__ import annotations

import hmac
import os
import re
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, HTTPException, Request, Response
from starlette.datastructures import MutableHeaders
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multilane import __version__
from multilane.runtime import Runtime
from multilane.server import lanes_page, ollama_api, openai_api, pipelines, responses_api, runs
from multilane.server.errors import SHUTTING_DOWN, error_response, install_error_handlers, log_refusal
from multilane.server.metrics import ServerMetrics
from multilane.server.recent_runs import RecentRunBuffer
from multilane.server.shutdown import CUT_SECONDS, RETRY_AFTER, Shutdown
from multilane.server.traces import TraceRequests

log = structlog.get_logger(__name__)

DEFAULT_MAX_BODY = 4 * 1024 * 1024
DEFAULT_MAX_TOKENS = 512
OPEN_PATHS = frozenset({"/healthz", "/"})
"""Routes that need no API key: the health check, and the lanes page, which holds no data of its own."""
RECENT_RUNS = 50  # pipeline runs the lanes page can show


class BearerAuth:
    """Refuse (401) a request that lacks `Authorization: Bearer <key>`, compared in constant time.

    Open: /healthz, and the lanes page with its script and style (its data comes from /v1/lanes, behind the key).
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(lanes_page.STATIC_PATHS):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        message = ("missing API key: send 'Authorization: Bearer <key>'" if not given
                   else "invalid API key")
        log_refusal(scope, 401, message)
        response = error_response(scope["path"], 401, message, type="authentication_error",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimit:
    """Refuse (413) a request body larger than `max_bytes`, by its Content-Length or by the bytes that arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body larger than {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            log_refusal(scope, 413, str(self._too_large().detail))
            response = error_response(scope["path"], 413, str(self._too_large().detail), type="request_too_large",
                                      code="request_too_large")
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # FastAPI passes HTTPExceptions from body reading to the handlers
            return message

        await self.app(scope, limited, send)


class JsonBodies:
    """Read every request body as JSON, whatever its Content-Type says or if it has none, as Ollama does.

    Clients send JSON as forms (`curl -d`), as text/plain, or with no Content-Type at all (LiteLLM's Ollama
    providers); no route takes anything but JSON, so a body that is not JSON gets a 422 saying so.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            given = dict(scope["headers"]).get(b"content-type", b"")
            json_type = given.split(b";")[0].strip().lower()
            if not (json_type == b"application/json" or json_type.endswith(b"+json")):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class RequestIds:
    """Give each request an id: the client's `X-Request-ID` when it is a plain token, else a new one.

    The id is bound to every log line of the request (structlog context variables), kept in
    `request.state.request_id`, and sent back in the response's `X-Request-ID` header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope = {**scope, "state": {**scope.get("state", {}), "request_id": request_id}}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self.app(scope, receive, send_with_id)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class ShutdownGate:
    """Register every call with the server's `Shutdown`; once the shutdown has begun, answer new ones 503 at once.

    A call that the shutdown had to cancel outright (its route did not answer the cut) is answered 503 here, or
    its stream is ended.
    """

    def __init__(self, app: ASGIApp, shutdown: Shutdown) -> None:
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        shutdown = self.shutdown
        if shutdown.draining:
            shutdown.refused += 1
            await _shutting_down(scope, receive, send, "the server is shutting down and starts no new calls; "
                                 "retry on another server")
            return
        call = shutdown.begin()

        async def noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                call.status = int(message["status"])
            await send(message)

        try:
            with call.scope:
                await self.app(scope, receive, noting_status)
            if call.scope.cancelled_caught:
                if call.status is None:
                    await _shutting_down(scope, receive, send, str(shutdown.cut_error()))
                else:  # a stream that had begun: end it, so the client is not left waiting for more
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            shutdown.end(call)


async def _shutting_down(scope: Scope, receive: Receive, send: Send, message: str) -> None:
    log_refusal(scope, 503, message, expected=True)
    response = error_response(scope["path"], 503, message, type="overloaded_error", code=SHUTTING_DOWN,
                              headers={"Retry-After": RETRY_AFTER})
    await response(scope, receive, send)


def create_app(runtime: Runtime, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, manage_runtime: bool = True) -> FastAPI:
    """An app serving `runtime`; its lifespan opens and closes the runtime unless `manage_runtime` is False.

    With `api_key`, every route but /healthz and the lanes page's files needs `Authorization: Bearer <api_key>`.
    Calls that give no max_tokens get `default_max_tokens`.
    """
    metrics = ServerMetrics(runtime)
    rates = lanes_page.TokenRates(runtime.pool.metrics)
    shutdown = Shutdown(runtime.pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.pool.observers.append(metrics.observe)
        try:
            if manage_runtime:
                async with runtime, lanes_page.sampling(rates):
                    yield
            else:
                async with lanes_page.sampling(rates):
                    yield
        finally:
            runtime.pool.observers.remove(metrics.observe)

    app = FastAPI(title="Multilane", version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.default_max_tokens = default_max_tokens
    app.state.token_rates = rates
    app.state.recent_runs = RecentRunBuffer(RECENT_RUNS)
    app.state.shutdown = shutdown  # serve() drains it on SIGTERM
    app.include_router(openai_api.router)
    app.include_router(responses_api.router)
    app.include_router(ollama_api.router)
    app.include_router(pipelines.router)
    app.include_router(runs.router)
    app.include_router(lanes_page.router)
    app.mount("/static", StaticFiles(packages=[("multilane.server", "static")]), name="static")

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        """Liveness: answers once the runtime is open; needs no API key."""
        return {"status": "ok", "loaded": len(runtime.ps())}

    @app.get("/metrics", tags=["health"])
    async def prometheus(request: Request) -> Response:
        """Prometheus text: lane gauges, counters and latency histograms."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    install_error_handlers(app)
    app.add_middleware(JsonBodies)  # no route takes anything but JSON
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(ShutdownGate, shutdown=shutdown)
    # outside auth and limits, so that refused requests show in the caller's trace too
    app.add_middleware(TraceRequests, tracer=lambda: runtime.tracer, routes=app.router.routes)
    app.add_middleware(RequestIds)  # added last: runs first, so that refusals carry an id too
    return app


def serve(path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8700, api_key: str | None = None,
          grace: int = 10, max_body_bytes: int = DEFAULT_MAX_BODY, log_level: str = "warning",
          default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """Serve a pipeline file until SIGTERM or Ctrl-C, then shut down: calls that have not started get a 503 with
    Retry-After at once, running calls get `grace` seconds to finish, those cut then get a 503; then it unloads.

    Raises MultilaneError (SpecError, MemoryBudgetError, ...) when the runtime cannot start.
    """
    import asyncio

    import uvicorn

    runtime = Runtime.from_file(path)
    app = create_app(runtime, api_key=api_key, max_body_bytes=max_body_bytes, manage_runtime=False,
                     default_max_tokens=default_max_tokens)
    shutdown: Shutdown = app.state.shutdown

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Drain while still listening, so that a call arriving meanwhile gets a 503 rather than a refused
            # connection; a second Ctrl-C ends the grace early. Then uvicorn closes the connections, now idle.
            await shutdown.drain(grace, stop=lambda: self.force_exit)
            # Every call has been answered now. uvicorn's force exit would skip the lifespan's shutdown, which then
            # dies cancelled with a traceback; the connections left are idle, so close them and the lifespan in order.
            self.force_exit = False
            await super().shutdown(sockets)

    # uvicorn's own grace only backs ours up: every call has been answered when it starts counting.
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=int(CUT_SECONDS) + 1,
                            log_level=log_level, access_log=log_level in ("debug", "info"), lifespan="on")
    server = Server(config)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving beyond loopback without an API key; set --api-key or MULTILANE_API_KEY", host=host)

    async def main() -> None:
        async with runtime:  # opened here, not in the lifespan, so that a failing start is one clean error
            log.info("serving", file=str(path), url=f"http://{host}:{port}")
            await server.serve()

    def stop(signum: int, frame: Any) -> None:
        server.should_exit = True  # a signal during the start stops the server as soon as it is up

    # uvicorn re-raises the signal that stopped it once it has shut down; this handler makes that a clean exit.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
