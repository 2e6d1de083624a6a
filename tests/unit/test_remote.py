"""Remote engines against a scripted OpenAI-compatible server: streaming, retries, error mapping, settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.lowlevel
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
from multilane.engines.base import collect
from multilane.engines.remote import (
    RemoteEmbeddingEngine,
    RemoteGenerateEngine,
    RemoteSettings,
    retry_after_seconds,
)
from multilane.planning import plan_model

pytestmark = pytest.mark.anyio

SETTINGS = RemoteSettings(url="http://remote.test", served_model="smol", retries=2, backoff=0.5)
EVENT_STREAM = {"content-type": "text/event-stream; charset=utf-8"}


def sse(*events: dict[str, Any], done: bool = True) -> httpx.Response:
    """A 200 answer streaming the events as server-sent events, as vLLM sends them."""
    body = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + (b"data: [DONE]\n\n" if done else b"")
    return httpx.Response(200, content=body, headers=EVENT_STREAM)


class FakeSleep:
    """Records the waits between retries instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await anyio.lowlevel.checkpoint()


def engine(handler: Callable[[httpx.Request], httpx.Response], *, can_tokenize: bool = True,
           context: int = 100, sleep: FakeSleep | None = None,
           settings: RemoteSettings = SETTINGS) -> RemoteGenerateEngine:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url=settings.url)
    return RemoteGenerateEngine(client, settings, identity="remote:test", context=context,
                                can_tokenize=can_tokenize, sleep=sleep or FakeSleep())


async def completion(remote: RemoteGenerateEngine, text: str = "x", max_tokens: int = 5) -> Any:
    prompt = await remote.prepare(text, max_tokens, truncate=False, model="assistant")
    return await collect(remote.stream(prompt, SamplingOptions(max_tokens=max_tokens), "r"))


def chat_stream(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/tokenize":
        return httpx.Response(200, json={"count": 12, "max_model_len": 100, "tokens": []})
    body = json.loads(request.content)
    assert body["model"] == "smol" and body["stream"] is True
    return sse(
        {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "Hello"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": " there"}, "finish_reason": None}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2}})


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
        return sse({"choices": [{"delta": {"content": "{}"}, "finish_reason": "stop"}]})

    remote = engine(handler, can_tokenize=False)
    prompt = await remote.prepare("raw text", 5, truncate=False, model="assistant")
    schema = {"type": "object"}
    [chunk async for chunk in remote.stream(prompt, SamplingOptions(max_tokens=5, json_schema=schema), "r")]

    assert prompt.tokens is None
    assert bodies[0]["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert bodies[0]["prompt"] == "raw text"  # a raw prompt goes to /v1/completions


async def test_busy_answers_are_retried_with_growing_backoff_then_reported_as_queue_full() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, json={"error": {"message": "busy"}})

    sleep = FakeSleep()
    remote = engine(handler, can_tokenize=False, sleep=sleep)
    with pytest.raises(QueueFullError, match=r"busy \(503\) after 3 tries"):
        await completion(remote)
    assert len(calls) == 3  # the first try and two retries
    first, second = sleep.waits  # backoff 0.5, then doubled, each with up to `backoff` of jitter
    assert 0.5 <= first <= 1.0 and 1.0 <= second <= 1.5


async def test_a_busy_remote_that_recovers_within_the_retries_answers() -> None:
    answers = iter([httpx.Response(429, json={"error": "slow down"}),
                    sse({"choices": [{"text": "ok", "finish_reason": "stop"}]})])
    remote = engine(lambda request: next(answers), can_tokenize=False)
    assert (await completion(remote)).text == "ok"


async def test_retry_after_is_honoured_in_seconds_and_as_a_date() -> None:
    later = "Wed, 21 Oct 2015 07:28:03 GMT"
    answers = iter([httpx.Response(503, headers={"Retry-After": "2"}, json={"error": "busy"}),
                    httpx.Response(429, headers={"Retry-After": later}, json={"error": "slow down"}),
                    sse({"choices": [{"text": "ok", "finish_reason": "stop"}]})])
    sleep = FakeSleep()
    remote = engine(lambda request: next(answers), can_tokenize=False, sleep=sleep)

    assert (await completion(remote)).text == "ok"
    assert sleep.waits[0] == 2.0  # what the remote asked, not our backoff of 0.5
    assert retry_after_seconds(later, now=datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)) == 3.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:03 GMT") == 0.0  # a date gone by: retry now
    assert retry_after_seconds("soon") is None and retry_after_seconds("nan") is None


async def test_a_retry_after_longer_than_max_retry_wait_gives_up_at_once() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, headers={"Retry-After": "120"}, json={"error": "maintenance"})

    sleep = FakeSleep()
    remote = engine(handler, can_tokenize=False, sleep=sleep)
    with pytest.raises(QueueFullError, match=r"asks to retry after 120 s, longer than max_retry_wait 30 s"):
        await completion(remote)
    assert calls == [1] and sleep.waits == []


async def test_completion_tokens_are_the_remote_s_usage_not_its_event_count() -> None:
    remote = engine(lambda request: sse(
        {"choices": [{"delta": {"content": "Hello there,"}, "finish_reason": None}]},  # three tokens in one event
        {"choices": [{"delta": {"content": " friend"}, "finish_reason": None}]},
        {"choices": [{"delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}),
        can_tokenize=False)
    prompt = await remote.prepare([{"role": "user", "content": "hi"}], 5, truncate=False, model="assistant")
    chunks = [c async for c in remote.stream(prompt, SamplingOptions(max_tokens=5), "r")]

    assert [c.tokens for c in chunks] == [1, 1, 3]  # counted as they come, corrected by the usage at the end
    assert chunks[-1].finish_reason == "length" and chunks[-1].text == ""
    assert sum(c.tokens for c in chunks) == 5


async def test_without_usage_tokens_are_counted_one_per_event_with_text() -> None:
    remote = engine(lambda request: sse({"choices": [{"text": "Hello there", "finish_reason": None}]},
                                        {"choices": [{"text": "!", "finish_reason": "stop"}]}), can_tokenize=False)
    done = await completion(remote)
    assert (done.text, done.completion_tokens, done.finish_reason) == ("Hello there!", 2, "stop")


async def test_an_event_whose_data_spans_several_lines_is_one_event() -> None:
    body = (b'data: {"choices": [{"delta":\n'
            b'data:   {"content": "Hi"}, "finish_reason": null}]}\n'
            b": a comment line, ignored\n\n"
            b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\r\n\r\n'
            b"data: [DONE]\n\n")
    remote = engine(lambda request: httpx.Response(200, content=body, headers=EVENT_STREAM), can_tokenize=False)
    done = await completion(remote)
    assert (done.text, done.completion_tokens, done.finish_reason) == ("Hi", 1, "stop")


async def test_an_answer_that_is_not_an_event_stream_is_a_clear_error() -> None:
    remote = engine(lambda request: httpx.Response(200, text="<html>proxy login</html>",
                                                   headers={"content-type": "text/html"}), can_tokenize=False)
    with pytest.raises(EngineError, match=r"did not answer with an event stream.*text/html"):
        await completion(remote)
    bad = engine(lambda request: httpx.Response(200, content=b"data: {oops\n\n", headers=EVENT_STREAM),
                 can_tokenize=False)
    with pytest.raises(EngineError, match="sent an event that is not JSON"):
        await completion(bad)


@pytest.mark.parametrize(("url", "prefix"), [
    ("http://remote.test", ""), ("http://remote.test/v1", ""), ("http://remote.test/v1/", ""),
    ("http://gateway.test/llm/v1", "/llm"),
])
async def test_a_url_with_or_without_v1_reaches_the_same_routes(url: str, prefix: str) -> None:
    paths: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        path = request.url.path.removeprefix(prefix)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "smol", "max_model_len": 100}]})
        if path == "/tokenize":
            return httpx.Response(200, json={"count": 3})
        if path == "/v1/chat/completions":
            return sse({"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]})
        return httpx.Response(404, json={"detail": "Not Found"})

    settings = RemoteSettings.from_options({"kind": "remote", "url": url, "served_model": "smol"},
                                           default_model="assistant")
    remote = await RemoteGenerateEngine.load(settings, context=None, transport=httpx.MockTransport(server))
    try:
        prompt = await remote.prepare([{"role": "user", "content": "hi"}], 5, truncate=False, model="assistant")
        done = await collect(remote.stream(prompt, SamplingOptions(max_tokens=5), "r"))
    finally:
        await remote.close()
    assert done.text == "hi" and remote.context == 100
    assert paths == [f"{prefix}{p}" for p in ("/v1/models", "/tokenize", "/tokenize", "/v1/chat/completions")]
    assert remote.device == f"remote:{url.rstrip('/').removesuffix('/v1')}"


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


async def test_a_stream_that_ends_without_done_is_an_engine_death_not_a_short_answer() -> None:
    def handler(request: httpx.Request) -> httpx.Response:  # a closed connection ends a close-delimited body cleanly
        return sse({"choices": [{"delta": {"content": "Once"}, "finish_reason": None}]}, done=False)

    remote = engine(handler, can_tokenize=False)
    prompt = await remote.prepare("x", 5, truncate=False, model="assistant")
    pieces: list[str] = []
    with pytest.raises(EngineDeadError, match=r"lost the remote engine .* ended without \[DONE\]"):
        async for chunk in remote.stream(prompt, SamplingOptions(max_tokens=5), "r"):
            pieces.append(chunk.text)
    assert pieces == ["Once"]  # what came before the loss still reached the caller


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
    with pytest.raises(EngineError, match="must be 0 or more"):
        RemoteSettings.from_options({"kind": "remote", "url": "http://h:1", "retries": -1}, default_model="m")
    settings = RemoteSettings.from_options({"kind": "remote", "url": "http://h:1/"}, default_model="assistant")
    assert settings.url == "http://h:1" and settings.served_model == "assistant"
    assert settings.max_retry_wait == 30.0


async def test_a_bad_remote_engine_setting_is_a_spec_error_with_its_line() -> None:
    spec = parse_spec("models:\n  a:\n    kind: generate\n    source: remote\n    engine: {kind: remote}\n",
                      file="r.yaml")
    with pytest.raises(SpecError, match=r"r\.yaml:5 models\.a\.engine: a remote engine needs `url`"):
        await plan_model("a", spec)


async def test_a_remote_model_without_a_source_plans_and_serves(fake_runtime: Callable[..., Any]) -> None:
    text = ("models:\n  big: {kind: generate, engine: {kind: remote, url: 'http://gpu:8000', served_model: qwen}}\n"
            "  vec: {kind: embedding, engine: {kind: remote, url: 'http://gpu:8001'}}\n")
    spec = parse_spec(text, file="r.yaml")
    planned = await plan_model("big", spec)
    assert (planned.source, planned.weights_bytes) == ("http://gpu:8000#qwen", 0)
    assert (await plan_model("vec", spec)).source == "http://gpu:8001#vec"
    rt, _ = fake_runtime(text)
    async with rt:
        await rt.generate("big", "hi")
        lanes = rt.ps()
    assert [(lane["models"], lane["source"]) for lane in lanes] == [(["big"], "big")]


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
