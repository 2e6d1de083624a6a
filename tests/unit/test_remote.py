"""Remote engines against a scripted OpenAI-compatible server: streaming, retries, error mapping, settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from multilane import (
    ContextLengthError,
    EngineDeadError,
    EngineError,
    QueueFullError,
    SamplingOptions,
    SpecError,
    parse_spec,
)
from multilane.engines.remote import RemoteEmbeddingEngine, RemoteGenerateEngine, RemoteSettings
from multilane.planning import plan_model

pytestmark = pytest.mark.anyio

SETTINGS = RemoteSettings(url="http://remote.test", served_model="smol", retries=2, backoff=0.001)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def engine(handler: Callable[[httpx.Request], httpx.Response], *, can_tokenize: bool = True,
           context: int = 100) -> RemoteGenerateEngine:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url=SETTINGS.url)
    return RemoteGenerateEngine(client, SETTINGS, identity="remote:test", context=context, can_tokenize=can_tokenize)


def chat_stream(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/tokenize":
        return httpx.Response(200, json={"count": 12, "max_model_len": 100, "tokens": []})
    body = json.loads(request.content)
    assert body["model"] == "smol" and body["stream"] is True
    return httpx.Response(200, content=sse(
        {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "Hello"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": " there"}, "finish_reason": None}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2}}))


async def test_a_chat_streams_its_pieces_and_the_prompt_is_counted_at_the_remote() -> None:
    remote = engine(chat_stream)
    prompt = await remote.prepare([{"role": "user", "content": "hi"}], 10, truncate=False, model="assistant")
    chunks = [chunk async for chunk in remote.stream(prompt, SamplingOptions(max_tokens=10), "r1")]

    assert prompt.tokens == 12
    assert "".join(c.text for c in chunks) == "Hello there"
    assert chunks[-1].finish_reason == "stop"
    assert remote.unfinished_requests() == 0


async def test_a_prompt_that_cannot_fit_is_refused_before_it_is_sent() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return chat_stream(request)

    remote = engine(handler, context=20)
    with pytest.raises(ContextLengthError, match=r"prompt of 12 tokens \+ max_tokens 10 = 22"):
        await remote.prepare([{"role": "user", "content": "hi"}], 10, truncate=False, model="assistant")
    assert sent == ["/tokenize"]


async def test_the_json_schema_goes_out_as_response_format() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, content=sse({"choices": [{"delta": {"content": "{}"}, "finish_reason": "stop"}]}))

    remote = engine(handler, can_tokenize=False)
    prompt = await remote.prepare("raw text", 5, truncate=False, model="assistant")
    schema = {"type": "object"}
    [chunk async for chunk in remote.stream(prompt, SamplingOptions(max_tokens=5, json_schema=schema), "r")]

    assert prompt.tokens is None
    assert bodies[0]["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert bodies[0]["prompt"] == "raw text"  # a raw prompt goes to /v1/completions


async def test_busy_answers_are_retried_then_reported_as_queue_full() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, json={"error": {"message": "busy"}})

    remote = engine(handler, can_tokenize=False)
    prompt = await remote.prepare("x", 5, truncate=False, model="assistant")
    with pytest.raises(QueueFullError, match="after 3 tries"):
        [c async for c in remote.stream(prompt, SamplingOptions(max_tokens=5), "r")]
    assert len(calls) == 3  # the first try and two retries


async def test_a_busy_remote_that_recovers_within_the_retries_answers() -> None:
    answers = iter([httpx.Response(429, json={"error": "slow down"}),
                    httpx.Response(200, content=sse({"choices": [{"text": "ok", "finish_reason": "stop"}]}))])
    remote = engine(lambda request: next(answers), can_tokenize=False)
    prompt = await remote.prepare("x", 5, truncate=False, model="assistant")
    chunks = [c async for c in remote.stream(prompt, SamplingOptions(max_tokens=5), "r")]
    assert "".join(c.text for c in chunks) == "ok"


@pytest.mark.parametrize(("status", "message", "error"), [
    (400, "This model's maximum context length is 1024 tokens", ContextLengthError),
    (401, "bad key", EngineError),
    (500, "boom", EngineError),
])
async def test_remote_errors_become_multilane_errors(status: int, message: str, error: type[Exception]) -> None:
    remote = engine(lambda request: httpx.Response(status, json={"error": {"message": message}}), can_tokenize=False)
    prompt = await remote.prepare("x", 5, truncate=False, model="assistant")
    with pytest.raises(error, match=str(status) if error is EngineError else "maximum context"):
        [c async for c in remote.stream(prompt, SamplingOptions(max_tokens=5), "r")]


async def test_a_lost_connection_is_an_engine_death() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    remote = engine(handler, can_tokenize=False)
    prompt = await remote.prepare("x", 5, truncate=False, model="assistant")
    with pytest.raises(EngineDeadError, match="lost the remote engine"):
        [c async for c in remote.stream(prompt, SamplingOptions(max_tokens=5), "r")]


async def test_remote_embeddings_come_back_in_order_and_normalised() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"index": 1, "embedding": [0.0, 2.0]},
                                                  {"index": 0, "embedding": [3.0, 4.0]}]})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url=SETTINGS.url)
    remote = RemoteEmbeddingEngine(client, SETTINGS, identity="remote:test", dimension=2, max_tokens=512)
    vectors = await remote.embed(["a", "b"])
    np.testing.assert_allclose(vectors, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)


def test_settings_need_a_url_and_reject_unknown_options() -> None:
    with pytest.raises(EngineError, match="needs `url`"):
        RemoteSettings.from_options({"kind": "remote"}, default_model="m")
    with pytest.raises(EngineError, match=r"unknown remote engine option.*urll"):
        RemoteSettings.from_options({"kind": "remote", "urll": "x"}, default_model="m")
    settings = RemoteSettings.from_options({"kind": "remote", "url": "http://h:1/"}, default_model="assistant")
    assert settings.url == "http://h:1" and settings.served_model == "assistant"


async def test_a_bad_remote_engine_setting_is_a_spec_error_with_its_line() -> None:
    spec = parse_spec("models:\n  a:\n    kind: generate\n    source: remote\n    engine: {kind: remote}\n",
                      file="r.yaml")
    with pytest.raises(SpecError, match=r"r\.yaml:5 models\.a\.engine: a remote engine needs `url`"):
        await plan_model("a", spec)


async def test_tensor_parallel_lanes_are_budgeted_per_gpu(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9,
                                                   "num_key_value_heads": 3, "head_dim": 64}))
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    text = ("models:\n  a: {kind: generate, source: ./model, context: 100, parallel: 2, "
            "engine: {tensor_parallel_size: 2, pipeline_parallel_size: 2}}\n"
            "  b: {kind: generate, source: ./model, context: 100, parallel: 2}\n")
    spec = parse_spec(text, file="tp.yaml", base_dir=tmp_path)

    sharded, whole = [await plan_model(name, spec, gpu=True, flags=()) for name in ("a", "b")]
    assert whole.weights_bytes == 1000 and whole.kv is not None and sharded.kv is not None
    assert whole.kv.bytes_per_block == 16 * 23040  # vLLM's 16-token blocks on a GPU
    assert sharded.weights_bytes == 250 and sharded.kv.bytes_per_block == 16 * 23040 // 4
    assert sharded.key != whole.key  # different engine settings: separate lanes
