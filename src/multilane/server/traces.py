"""A server span for each API request, continuing the caller's trace (W3C `traceparent`), so a run started over
HTTP hangs under the request that started it, in the caller's own trace."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multilane.server.lanes_page import STATIC_PATHS

__all__ = ["UNTRACED_PATHS", "TraceRequests"]

UNTRACED_PATHS = frozenset({"/", "/healthz", "/metrics", "/v1/lanes"})
"""Polled or static: the lanes page and its data, health checks and metrics make no spans (nor its files)."""


class TraceRequests:
    """Open a SERVER span `{method} {route}` around each request, as a child of the caller's `traceparent`.

    `tracer` gives the runtime's tracer, or None while tracing is off (then requests pass straight through).
    A small middleware rather than opentelemetry-instrumentation-asgi: it wraps every send and receive in
    spans of its own, and a run only needs its caller's context and one span for the request.
    """

    def __init__(self, app: ASGIApp, tracer: Callable[[], Tracer | None], routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self._tracer = tracer
        self._routes = routes

    def _route(self, scope: Scope) -> str | None:
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                path = getattr(route, "path", None)
                return path if isinstance(path, str) else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = self._tracer() if scope["type"] == "http" else None
        path = scope.get("path", "")
        if tracer is None or path in UNTRACED_PATHS or path.startswith(STATIC_PATHS):
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        method, route = scope["method"], self._route(scope)
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": path}
        if route is not None:
            attributes["http.route"] = route
        span = tracer.start_span(f"{method} {route or path}", context=propagate.extract(headers),
                                 kind=SpanKind.SERVER, attributes=attributes)

        async def send_noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                    span.set_attribute("error.type", str(status))
            await send(message)

        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                await self.app(scope, receive, send_noting)
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            span.end()
