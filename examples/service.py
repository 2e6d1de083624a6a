"""A web service of its own that answers through one Multilane Runtime, held for the app's whole life.

The runtime opens in the app's lifespan (the index and the model load before the first request is taken)
and closes at shutdown, which stops the engines; every request shares its resident models, so concurrent
questions are decoded together. Run it from the project's folder, then ask:

    python examples/service.py --port 8000          # or: uvicorn --app-dir examples service:app
    curl -s localhost:8000/ask -H 'content-type: application/json' -d '{"question": "Who built the lighthouse?"}'
    curl -s localhost:8000/health

Multilane logs nothing unless the application says so: `--verbose` sends its info logs to stderr.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypedDict

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from multilane import InputError, MultilaneError, QueueFullError, Runtime

PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "rag.yaml"


class State(TypedDict):
    runtime: Runtime


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[State]:
    """Open the runtime for the app's lifetime; leaving closes it and stops its engines."""
    async with Runtime.from_file(PIPELINE) as runtime:
        await runtime.index("guide")  # builds or reuses the index, and loads its embedding model
        await runtime.load("assistant")  # load now rather than on the first question
        yield {"runtime": runtime}


app = FastAPI(title="Vellmar Island questions", lifespan=lifespan)


class Question(BaseModel):
    question: str = Field(min_length=1, max_length=500)


class Source(BaseModel):
    source: str
    score: float


class Answer(BaseModel):
    answer: str
    sources: list[Source]
    run_id: str
    seconds: float


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.state.runtime
    return runtime


@app.post("/ask")
async def ask(body: Question, request: Request) -> Answer:
    """Answer a question with the RAG pipeline `ask` of pipelines/rag.yaml."""
    result = await runtime_of(request).run("ask", question=body.question)
    passages = result.stages["passages"]["passages"]
    return Answer(answer=result.stages["answer"]["text"].strip(),
                  sources=[Source(source=p["source"], score=round(p["score"], 3)) for p in passages],
                  run_id=result.run_id, seconds=round(result.seconds, 3))


@app.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """The loaded lanes: which models are resident, their slots and queues."""
    lanes = runtime_of(request).ps()
    return {"status": "ok", "lanes": [{"models": lane["models"], "busy": lane["busy"], "slots": lane["slots"],
                                       "queued": lane["queued"]} for lane in lanes]}


@app.exception_handler(MultilaneError)
async def multilane_error(request: Request, exc: MultilaneError) -> JSONResponse:
    """A full queue asks the client to retry; bad input is the client's; anything else is ours."""
    status = 503 if isinstance(exc, QueueFullError) else 422 if isinstance(exc, InputError) else 500
    return JSONResponse({"error": str(exc)}, status_code=status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--verbose", action="store_true", help="log Multilane's progress to stderr")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("multilane").setLevel(logging.INFO)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":  # vLLM starts its engine core in a child process: keep the guard
    main()
