"""Pipeline routes: list the declared pipelines, and run one (whole result, or its events as server-sent events)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from multilane.errors import MultilaneError
from multilane.pipeline.executor import RunResult
from multilane.server.common import (
    SSE_HEADERS,
    Emit,
    LazyStreamResponse,
    abort_on_disconnect,
    json_response,
    runtime_of,
    sse,
)
from multilane.server.errors import api_error, error_body
from multilane.server.recent_runs import RecentRunBuffer, RunTimeline, summarize

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"])


class RunRequest(BaseModel):
    """The body of POST /v1/pipelines/{name}/runs."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False


@router.get("")
async def list_pipelines(request: Request) -> Response:
    """The declared pipelines: names, descriptions, inputs and stages."""
    rt = runtime_of(request)
    data = [{"name": name, "description": p.description, "stages": list(p.stages),
             "inputs": {key: {"type": spec.type, "required": spec.required, "default": spec.default,
                              "description": spec.description} for key, spec in p.inputs.items()}}
            for name, p in rt.spec.pipelines.items()]
    return json_response({"object": "list", "data": data})


@router.post("/{name}/runs")
async def run_pipeline(name: str, body: RunRequest, request: Request) -> Response:
    """Run a pipeline: its RunResult as JSON, or with `stream: true` its RunEvents as SSE ending `data: [DONE]`."""
    rt = runtime_of(request)
    declared = rt.spec.pipeline(name)  # unknown: 404
    declared.check_inputs(body.inputs, pipeline=name)  # bad inputs: 422 before anything runs
    recent: RecentRunBuffer = request.app.state.recent_runs
    timeline = RunTimeline(name, rt.spec)
    if not body.stream:
        try:
            result: RunResult = await abort_on_disconnect(request, lambda: rt.run(name, body.inputs))
        except MultilaneError as exc:
            recent.record(timeline.failed(str(exc)))
            raise
        recent.record(summarize(result, rt.spec))
        return json_response(result.to_dict())

    async def produce(emit: Emit) -> None:
        async with rt.stream(name, body.inputs) as events:
            async for event in events:
                summary = timeline.observe(event)
                if summary is not None:
                    recent.record(summary)
                await emit(sse(event.to_dict()))
        await emit("data: [DONE]\n\n")

    def on_error(exc: Exception) -> str:
        err = api_error(exc)
        return sse(error_body("/v1", err.message, type=err.type, code=err.code)) + "data: [DONE]\n\n"

    return LazyStreamResponse(produce, media_type="text/event-stream", on_error=on_error, headers=SSE_HEADERS)
