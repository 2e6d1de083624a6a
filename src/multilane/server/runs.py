"""Journaled runs over HTTP: list them, show one (stages, tokens, errors, agent transcripts), resume, replay."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict

from multilane.errors import JournalError
from multilane.journal import Journal, describe_run
from multilane.pipeline.executor import RunResult
from multilane.runtime import Runtime
from multilane.server.common import abort_on_disconnect, json_response, runtime_of

router = APIRouter(prefix="/v1/runs", tags=["runs"])


class ResumeRequest(BaseModel):
    """The body of POST /v1/runs/{id}/resume (it may be left out)."""

    model_config = ConfigDict(extra="forbid")

    force: bool = False  # resume even though the pipeline file changed since the run started


def _journal(rt: Runtime) -> Journal:
    if rt.journal is None:
        raise JournalError("this server keeps no journal of runs (runtime.journal is off)")
    return rt.journal


@router.get("")
async def list_runs(request: Request, limit: int = Query(20, ge=1, le=1000), pipeline: str | None = None,
                    status: str | None = None) -> Response:
    """The latest journaled runs, newest first; filter by pipeline or status (`interrupted` included)."""
    runs = await _journal(runtime_of(request)).runs(limit=limit, pipeline=pipeline, status=status)
    return json_response({"object": "list", "data": [run.to_dict() for run in runs]})


@router.get("/{run_id}")
async def show_run(run_id: str, request: Request) -> Response:
    """One run: status, inputs, output or error, stages with timings and tokens, agent transcripts, errors."""
    loaded = await _journal(runtime_of(request)).load(run_id)
    return json_response(describe_run(loaded))


@router.post("/{run_id}/resume")
async def resume_run(run_id: str, request: Request, body: ResumeRequest | None = None) -> Response:
    """Finish an interrupted or failed run, reusing what its journal holds; its RunResult as JSON."""
    rt = runtime_of(request)
    force = body.force if body is not None else False
    result: RunResult = await abort_on_disconnect(request, lambda: rt.resume(run_id, force=force))
    return json_response(result.to_dict())


@router.post("/{run_id}/replay")
async def replay_run(run_id: str, request: Request) -> Response:
    """Run a journaled run again from its recorded model and tool outputs, calling no model; its RunResult."""
    rt = runtime_of(request)
    result: RunResult = await abort_on_disconnect(request, lambda: rt.replay(run_id))
    return json_response(result.to_dict())
