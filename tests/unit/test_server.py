"""The HTTP server on fake engines: every route, error mapping, auth, body limit, streams, tools and keep_alive."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from typer.testing import CliRunner

from multilane import SamplingOptions
from multilane.cli import app as cli_app
from multilane.testing import FakeEmbeddingEngine, FakeGenerateEngine

pytestmark = pytest.mark.anyio

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"]}}}


def sse_events(text: str) -> list[Any]:
    """The data of each server-sent event; `[DONE]` stays a string."""
    assert text.endswith("\n\n")
    events = []
    for block in text.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def chat(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "assistant", "messages": [{"role": "user", "content": content}], **extra}


async def call_asgi(app: Any, path: str, body: dict[str, Any], *, disconnect: anyio.Event) -> list[dict[str, Any]]:
    """Drive the app as a server would for a client that hangs up when `disconnect` is set."""
    raw = json.dumps(body).encode()
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1234), "server": ("test", 80), "state": {}}
    await app(scope, receive, send)
    return sent


# ---- OpenAI: chat completions


async def test_ignore_eos_reaches_the_engine_as_vllm_s_server_takes_it(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("x")) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(max_tokens=8, ignore_eos=True))
        plain = await s.client.post("/v1/completions", json={"model": "assistant", "prompt": "hi"})
        options = [call.options.ignore_eos for call in s.engines["assistant"].calls]
    assert r.status_code == 200 and plain.status_code == 200
    assert options == [True, False]


async def test_chat_completion_returns_the_reply_usage_and_finish_reason(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("The answer is 42")) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(max_tokens=16, temperature=0.5, top_p=0.9,
                                                                   stop=["END"], seed=7, frequency_penalty=0.1))
        options = s.engines["assistant"].calls[0].options
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "The answer is 42"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4
    assert options == SamplingOptions(max_tokens=16, temperature=0.5, top_p=0.9, stop=("END",), seed=7)


async def test_chat_messages_keep_roles_and_text_parts_are_joined(serve: Any) -> None:
    async with serve() as s:
        messages = [{"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]}]
        r = await s.client.post("/v1/chat/completions", json={"model": "assistant", "messages": messages,
                                                              "max_completion_tokens": 8})
        call = s.engines["assistant"].calls[0]
    assert r.status_code == 200
    assert call.prompt == "<system>Be brief.\n<user>Hi you\n<assistant>"
    assert call.options.max_tokens == 8


async def test_chat_stream_is_sse_chunks_ending_with_usage_and_done(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("one two three")) as s:
        r = await s.client.post("/v1/chat/completions",
                                json=chat(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


async def test_chat_stream_without_include_usage_sends_no_usage_chunk(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.post("/v1/chat/completions", json=chat(stream=True))
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_response_format_json_schema_constrains_the_output(serve: Any) -> None:
    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"]}
    async with serve() as s:
        r = await s.client.post("/v1/chat/completions", json=chat(
            response_format={"type": "json_schema", "json_schema": {"name": "y", "schema": schema}}))
        r2 = await s.client.post("/v1/chat/completions", json=chat(response_format={"type": "json_object"}))
        calls = s.engines["assistant"].calls
    assert r.status_code == 200
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"year": 0}
    assert calls[0].options.json_schema == schema
    assert calls[1].options.json_schema == {"type": "object"}
    assert r2.status_code == 200


BAD_SCHEMAS = {
    "bad-keyword": ({"type": "object", "properties": {"year": {"type": "integr"}}},
                    "properties/year/type: 'integr' is not valid under any of the given schemas"),
    "unresolved-ref": ({"type": "object", "properties": {"year": {"$ref": "#/$defs/Year"}}, "required": ["year"]},
                       "properties/year/$ref: $ref '#/$defs/Year' does not resolve within the schema"),
    "empty-enum": ({"type": "object", "properties": {"unit": {"enum": []}}, "required": ["unit"]},
                   "properties/unit/enum: enum is empty, so no value can match"),
}


@pytest.mark.parametrize("case", list(BAD_SCHEMAS))
async def test_an_unusable_schema_is_a_422_before_anything_is_generated(serve: Any, case: str) -> None:
    schema, reason = BAD_SCHEMAS[case]
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    async with serve() as s:
        fmt = await s.client.post("/v1/chat/completions", json=chat(
            response_format={"type": "json_schema", "json_schema": {"name": "y", "schema": schema}}))
        streamed = await s.client.post("/v1/chat/completions", json=chat(stream=True, tools=[WEATHER, tool]))
        ollama = await s.client.post("/api/chat", json={
            "model": "assistant", "messages": [{"role": "user", "content": "hi"}], "format": schema})
        generated = len(s.engines["assistant"].calls)
    assert (fmt.status_code, streamed.status_code, ollama.status_code) == (422, 422, 422)
    assert fmt.json()["error"]["message"].startswith(
        f"body.response_format.json_schema.schema: invalid JSON schema at {reason}")
    assert streamed.json()["error"]["message"].startswith(
        f"body.tools[1].function.parameters: invalid JSON schema at {reason}")
    assert ollama.json()["error"].startswith(f"body.format: invalid JSON schema at {reason}")
    assert generated == 0


async def test_tool_parameters_with_their_own_definitions_work_inside_the_combined_schema(serve: Any) -> None:
    unit = {"type": "function", "function": {"name": "convert", "parameters": {
        "$defs": {"Unit": {"enum": ["C", "F"]}}, "type": "object",
        "properties": {"to": {"$ref": "#/$defs/Unit"}}, "required": ["to"]}}}
    reply = json.dumps({"convert": {"to": "F"}})
    async with serve(assistant=FakeGenerateEngine(lambda prompt, options: reply)) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(tools=[WEATHER, unit]))
        offered = s.engines["assistant"].calls[0].options.json_schema
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"to": "F"}
    assert offered["anyOf"][1]["properties"]["convert"]["properties"]["to"] == {
        "$ref": "#/anyOf/1/properties/convert/$defs/Unit"}


async def test_tools_auto_returns_a_tool_call_with_json_string_arguments(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.post("/v1/chat/completions", json=chat("Weather in Oslo?", tools=[WEATHER, TIME]))
        call = s.engines["assistant"].calls[0]
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (tool_call,) = message["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["id"].startswith("call_")
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "text"}
    schema = call.options.json_schema
    assert len(schema["anyOf"]) == 3  # two tools, or a plain answer
    assert "get_weather" in call.prompt and '{"answer"' in call.prompt


async def test_a_tool_parameter_called_name_stays_apart_from_the_call_wrapper(serve: Any) -> None:
    # Regression: the wrapper {"name": <function>, "arguments": {...}} let SmolLM2 copy the function's name into
    # the tool's own `name` argument. The function's name is now the wrapper's only key.
    city = {"type": "function", "function": {"name": "final_result", "parameters": {
        "type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
        "required": ["name", "country"], "additionalProperties": False}}}
    async with serve() as s:
        r = await s.client.post("/v1/chat/completions", json=chat(tools=[city], tool_choice="required"))
        ollama = await s.client.post("/api/chat", json={"model": "assistant", "tools": [city], "stream": False,
                                                       "messages": [{"role": "user", "content": "Paris?"}]})
        offered = [call.options.json_schema for call in s.engines["assistant"].calls]
    assert offered[0] == {"type": "object", "properties": {"final_result": city["function"]["parameters"]},
                          "required": ["final_result"], "additionalProperties": False}
    call = offered[1]["anyOf"][0]
    assert call["properties"].keys() == {"final_result"} and call["additionalProperties"] is False
    function = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
    assert function["name"] == "final_result"
    assert json.loads(function["arguments"]) == {"name": "text", "country": "text"}
    assert ollama.json()["message"]["tool_calls"][0]["function"]["arguments"] == {"name": "text", "country": "text"}


async def test_tools_auto_may_answer_in_plain_text(serve: Any) -> None:
    engine = FakeGenerateEngine(lambda prompt, options: json.dumps({"answer": "It is sunny."}))
    async with serve(assistant=engine) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(tools=[WEATHER], tool_choice="auto"))
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"


async def test_tool_choice_required_named_and_none(serve: Any) -> None:
    async with serve() as s:
        required = await s.client.post("/v1/chat/completions",
                                       json=chat(tools=[WEATHER, TIME], tool_choice="required"))
        named = await s.client.post("/v1/chat/completions", json=chat(
            tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}))
        none = await s.client.post("/v1/chat/completions", json=chat(tools=[WEATHER], tool_choice="none"))
        unknown = await s.client.post("/v1/chat/completions", json=chat(
            tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}))
        calls = s.engines["assistant"].calls
    assert len(calls[0].options.json_schema["anyOf"]) == 2  # no plain answer allowed
    assert '{"answer"' not in calls[0].prompt
    assert required.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert named.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    assert calls[1].options.json_schema["required"] == ["get_time"]
    assert none.json()["choices"][0]["message"]["content"] == "fake reply"
    assert calls[2].options.json_schema is None
    assert unknown.status_code == 422 and "nope" in unknown.json()["error"]["message"]


async def test_tool_calls_stream_as_one_delta_then_finish_reason_tool_calls(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.post("/v1/chat/completions", json=chat(tools=[WEATHER], tool_choice="required",
                                                                   stream=True))
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    delta = events[1]["choices"][0]["delta"]
    assert delta["tool_calls"][0]["index"] == 0
    assert delta["tool_calls"][0]["function"]["name"] == "get_weather"
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_earlier_tool_calls_and_results_are_passed_on_as_text(serve: Any) -> None:
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    async with serve() as s:
        r = await s.client.post("/v1/chat/completions", json={"model": "assistant", "messages": messages,
                                                              "tools": [WEATHER]})
        prompt = s.engines["assistant"].calls[0].prompt
    assert r.status_code == 200
    assert '{"get_weather": {"city": "Oslo"}}' in prompt
    assert "Result of the function call get_weather: rain" in prompt


async def test_a_response_format_beside_tools_shapes_the_answer(serve: Any) -> None:
    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"]}
    engine = FakeGenerateEngine(lambda prompt, options: json.dumps({"answer": {"year": 1887}}))
    async with serve(assistant=engine) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(
            tools=[WEATHER], response_format={"type": "json_schema", "json_schema": {"name": "y", "schema": schema}}))
        offered = s.engines["assistant"].calls[0].options.json_schema
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"year": 1887}
    assert offered["anyOf"][1]["properties"]["answer"] == schema


# ---- OpenAI: completions, embeddings, models


async def test_completions_tokenize_the_prompt_raw_without_the_chat_template(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("and so on")) as s:
        r = await s.client.post("/v1/completions", json={"model": "assistant", "prompt": "Once upon a time",
                                                         "max_tokens": 5})
        many = await s.client.post("/v1/completions", json={"model": "assistant", "prompt": ["a b", "c d"],
                                                            "echo": True})
        calls = s.engines["assistant"].calls
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "and so on"
    assert calls[0].prompt == "Once upon a time"
    assert [c["text"] for c in many.json()["choices"]] == ["a band so on", "c dand so on"]
    assert many.json()["usage"]["prompt_tokens"] == 4


async def test_completions_stream(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("x y")) as s:
        r = await s.client.post("/v1/completions", json={"model": "assistant", "prompt": "p", "stream": True,
                                                         "stream_options": {"include_usage": True}})
        two = await s.client.post("/v1/completions", json={"model": "assistant", "prompt": ["a", "b"],
                                                           "stream": True})
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == "x y"
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == 2
    assert two.status_code == 422


async def test_embeddings_as_floats_and_base64(serve: Any) -> None:
    import base64

    import numpy as np

    async with serve() as s:
        r = await s.client.post("/v1/embeddings", json={"model": "embedder", "input": ["sea otters", "lava"]})
        one = await s.client.post("/v1/embeddings", json={"model": "embedder", "input": "sea otters",
                                                          "encoding_format": "base64"})
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert len(data[0]["embedding"]) == 64
    assert abs(sum(x * x for x in data[0]["embedding"]) - 1.0) < 1e-5
    assert r.json()["usage"]["prompt_tokens"] == 3
    decoded = np.frombuffer(base64.b64decode(one.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, data[0]["embedding"])


async def test_embeddings_take_token_ids_decoded_by_the_embedders_tokenizer(serve: Any) -> None:
    async with serve() as s:
        one = await s.client.post("/v1/embeddings", json={"model": "embedder", "input": [5, 6, 7]})
        many = await s.client.post("/v1/embeddings", json={"model": "embedder", "input": [[5, 6], [8]]})
        text = await s.client.post("/v1/embeddings", json={"model": "embedder", "input": "t5 t6 t7"})
        outside = await s.client.post("/v1/embeddings", json={"model": "embedder", "input": [[5], [99999]]})
        embedded = s.engines["embedder"].calls
    assert one.status_code == 200, one.text
    assert embedded[:2] == [["t5 t6 t7"], ["t5 t6", "t8"]]  # the fake's vocabulary: id n is the word "tn"
    assert one.json()["data"][0]["embedding"] == text.json()["data"][0]["embedding"]
    assert one.json()["usage"]["prompt_tokens"] == 3 and many.json()["usage"]["prompt_tokens"] == 3
    assert [d["index"] for d in many.json()["data"]] == [0, 1]
    assert outside.status_code == 422 and "token id 99999 is outside" in outside.json()["error"]["message"]


class BusyTokenizer(FakeEmbeddingEngine):
    """An embedder whose tokenizer waits for a lock that an encode batch holds, as sentence-transformers' does."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = threading.Event()
        self.free = threading.Event()
        self.freed_in_time: list[bool] = []

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        self.counting.set()
        self.freed_in_time.append(self.free.wait(timeout=5))  # only a loop that still runs can free it
        return super().token_spans(text)


async def test_embedding_usage_is_counted_without_stalling_other_requests(serve: Any) -> None:
    # Before: token_spans ran on the event loop, so every other request waited for the tokenizer's lock.
    engine = BusyTokenizer()
    async with serve(embedder=engine) as s:
        responses: list[httpx.Response] = []

        async def embed() -> None:
            responses.append(await s.client.post("/v1/embeddings", json={"model": "embedder", "input": "sea otters"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(embed)
            assert await anyio.to_thread.run_sync(lambda: engine.counting.wait(timeout=10))
            health = await s.client.get("/healthz")  # answered while the tokenizer still waits
            engine.free.set()

    assert health.status_code == 200
    assert engine.freed_in_time == [True]
    assert responses[0].status_code == 200 and responses[0].json()["usage"]["prompt_tokens"] == 2


async def test_models_lists_declared_models(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.get("/v1/models")
    assert r.status_code == 200
    assert {(m["id"], m["kind"]) for m in r.json()["data"]} == {("assistant", "generate"), ("embedder", "embedding")}
    assert all(m["object"] == "model" for m in r.json()["data"])


async def test_a_remote_model_without_a_source_is_listed_with_a_null_source(serve: Any, server_spec: str) -> None:
    spec = server_spec.replace("runtime:", "  far: {kind: generate, engine: {kind: remote, url: 'http://gpu:8000'}}\nruntime:")
    async with serve(spec) as s:
        openai = await s.client.get("/v1/models")
        ollama = await s.client.get("/api/tags")
    assert {m["id"]: m["source"] for m in openai.json()["data"]}["far"] is None
    assert {m["name"]: m["source"] for m in ollama.json()["models"]} == {
        "assistant": "./assistant", "embedder": "./embedder", "far": None}


async def test_a_model_of_the_wrong_kind_is_a_400(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.post("/v1/chat/completions", json={**chat(), "model": "embedder"})
        e = await s.client.post("/v1/embeddings", json={"model": "assistant", "input": "x"})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    assert e.status_code == 400 and "generate model" in e.json()["error"]["message"]


# ---- Ollama


async def test_ollama_chat_streams_ndjson_by_default(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("hi there")) as s:
        r = await s.client.post("/api/chat", json={"model": "assistant:latest",
                                                   "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == "hi there"
    assert [line["done"] for line in lines] == [False, False, True]
    assert lines[-1]["done_reason"] == "stop"
    assert lines[-1]["eval_count"] == 2 and lines[-1]["prompt_eval_count"] > 0
    assert lines[-1]["total_duration"] > 0


async def test_ollama_chat_without_stream_and_with_options_and_format(serve: Any) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    async with serve() as s:
        r = await s.client.post("/api/chat", json={
            "model": "assistant", "stream": False, "messages": [{"role": "user", "content": "hello"}],
            "format": schema, "options": {"num_predict": 12, "temperature": 0.3, "top_p": 0.5, "stop": ["x"],
                                          "seed": 3, "num_ctx": 99999}})
        j = await s.client.post("/api/generate", json={"model": "assistant", "prompt": "p", "stream": False,
                                                       "format": "json"})
        calls = s.engines["assistant"].calls
    assert r.status_code == 200
    body = r.json()
    assert body["done"] is True and json.loads(body["message"]["content"]) == {"ok": True}
    assert calls[0].options == SamplingOptions(max_tokens=12, temperature=0.3, top_p=0.5, stop=("x",), seed=3,
                                               json_schema=schema)
    assert calls[1].options.json_schema == {"type": "object"}
    assert j.json()["response"] == "{}"


async def test_ollama_generate_uses_the_template_unless_raw(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("ok")) as s:
        r = await s.client.post("/api/generate", json={"model": "assistant", "prompt": "why?", "system": "Be kind.",
                                                       "stream": False})
        raw = await s.client.post("/api/generate", json={"model": "assistant", "prompt": "why?", "raw": True})
        calls = s.engines["assistant"].calls
    assert r.json()["response"] == "ok" and r.json()["done_reason"] == "stop"
    assert calls[0].prompt == "<system>Be kind.\n<user>why?\n<assistant>"
    assert calls[1].prompt == "why?"
    assert json.loads(raw.text.splitlines()[-1])["done"] is True


async def test_ollama_empty_prompt_loads_and_keep_alive_0_unloads(serve: Any) -> None:
    async with serve() as s:
        loaded = await s.client.post("/api/generate", json={"model": "assistant", "keep_alive": "10m"})
        ps = (await s.client.get("/api/ps")).json()
        unloaded = await s.client.post("/api/chat", json={"model": "assistant", "messages": [], "keep_alive": 0})
        after = (await s.client.get("/api/ps")).json()
        closed = s.engines["assistant"].closed
    assert loaded.json()["done_reason"] == "load"
    assert [m["name"] for m in ps["models"]] == ["assistant"]
    assert ps["models"][0]["multilane"]["keep_alive"] == "10m"
    assert unloaded.json()["done_reason"] == "unload" and unloaded.json()["done"] is True
    assert after["models"] == []
    assert closed


async def test_ollama_keep_alive_is_honoured_on_each_call(serve: Any) -> None:
    async with serve() as s:
        await s.client.post("/api/generate", json={"model": "assistant", "prompt": "hi", "keep_alive": -1})
        pinned = (await s.client.get("/api/ps")).json()["models"][0]
        await s.client.post("/api/generate", json={"model": "assistant", "prompt": "hi", "keep_alive": "2m"})
        later = (await s.client.get("/api/ps")).json()["models"][0]
        await s.client.post("/api/generate", json={"model": "assistant", "prompt": "hi", "keep_alive": 0,
                                                   "stream": False})
        await anyio.wait_all_tasks_blocked()  # the reaper, woken when the lane went idle, has done its work
        gone = (await s.client.get("/api/ps")).json()["models"]
        closed = s.engines["assistant"].closed
        bad = await s.client.post("/api/generate", json={"model": "assistant", "prompt": "hi",
                                                         "keep_alive": "soon"})
    assert pinned["multilane"]["keep_alive"] == "forever" and pinned["expires_at"].startswith("2318")
    assert later["multilane"]["keep_alive"] == "2m"
    assert gone == [] and closed
    assert bad.status_code == 422 and "keep_alive" in bad.json()["error"]


async def test_ollama_embed_ps_and_tags(serve: Any) -> None:
    async with serve() as s:
        e = await s.client.post("/api/embed", json={"model": "embedder", "input": ["a", "b"]})
        ps = (await s.client.get("/api/ps")).json()
        tags = (await s.client.get("/api/tags")).json()
    assert e.status_code == 200
    assert len(e.json()["embeddings"]) == 2 and len(e.json()["embeddings"][0]) == 64
    (model,) = ps["models"]
    assert model["name"] == model["model"] == "embedder"
    assert {"size", "size_vram", "expires_at", "details", "digest"} <= model.keys()
    assert model["multilane"]["slots"] == 256
    assert ps["usage"]["loaded"] == 1
    assert {m["name"] for m in tags["models"]} == {"assistant", "embedder"}


async def test_ollama_chat_tools_come_back_in_message_tool_calls(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.post("/api/chat", json={"model": "assistant", "stream": False, "tools": [WEATHER, TIME],
                                                   "messages": [{"role": "user", "content": "Weather in Oslo?"}]})
        streamed = await s.client.post("/api/chat", json={"model": "assistant", "tools": [WEATHER],
                                                          "messages": [{"role": "user", "content": "Oslo?"}]})
        call = s.engines["assistant"].calls[0]
    assert r.status_code == 200, r.text
    message = r.json()["message"]
    assert message["role"] == "assistant" and message["content"] == ""
    (tool_call,) = message["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert tool_call["function"]["arguments"] == {"city": "text"}  # an object, as Ollama sends it
    assert r.json()["done_reason"] == "stop"
    assert len(call.options.json_schema["anyOf"]) == 3 and "get_weather" in call.prompt
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert [line["done"] for line in lines] == [False, True]
    assert lines[0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


async def test_ollama_tool_results_go_back_to_the_model_and_it_may_answer(serve: Any) -> None:
    engine = FakeGenerateEngine(lambda prompt, options: json.dumps({"answer": "It rains in Oslo."}))
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "rain", "tool_name": "get_weather"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c2", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
                {"role": "tool", "content": "noon", "tool_call_id": "c2"}]
    async with serve(assistant=engine) as s:
        r = await s.client.post("/api/chat", json={"model": "assistant", "stream": False, "tools": [WEATHER, TIME],
                                                   "messages": messages})
        prompt = s.engines["assistant"].calls[0].prompt
    assert r.json()["message"] == {"role": "assistant", "content": "It rains in Oslo."}
    assert '<assistant>{"get_weather": {"city": "Oslo"}}' in prompt
    assert "<user>Result of the function call get_weather: rain" in prompt
    assert '<assistant>{"get_time": {"zone": "CET"}}' in prompt
    assert "<user>Result of the function call get_time: noon" in prompt


async def test_ollama_format_beside_tools_shapes_the_answer(serve: Any) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    engine = FakeGenerateEngine(lambda prompt, options: json.dumps({"answer": {"ok": True}}))
    async with serve(assistant=engine) as s:
        r = await s.client.post("/api/chat", json={"model": "assistant", "stream": False, "tools": [WEATHER],
                                                   "format": schema, "messages": [{"role": "user", "content": "?"}]})
    assert json.loads(r.json()["message"]["content"]) == {"ok": True}


async def test_ollama_replies_carry_ollamas_counts_and_durations(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("a b c")) as s:
        chat_reply = (await s.client.post("/api/chat", json={
            "model": "assistant", "stream": False, "messages": [{"role": "user", "content": "hello you"}]})).json()
        generated = [json.loads(line) for line in (await s.client.post("/api/generate", json={
            "model": "assistant", "prompt": "hi"})).text.splitlines()]
        embedded = (await s.client.post("/api/embed", json={"model": "embedder",
                                                            "input": ["sea otters", "lava"]})).json()
        again = (await s.client.post("/api/embed", json={"model": "embedder", "input": "x"})).json()
    fields = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
              "eval_duration")
    for reply in (chat_reply, generated[-1]):
        assert all(isinstance(reply[f], int) for f in fields), reply
        assert reply["eval_count"] == 3 and reply["prompt_eval_count"] > 0
        assert reply["total_duration"] >= reply["load_duration"] + reply["prompt_eval_duration"]
    assert embedded["prompt_eval_count"] == 3  # the fake's tokens are words
    assert embedded["total_duration"] > 0 and embedded["load_duration"] > 0  # this call loaded the embedder
    assert again["load_duration"] == 0


async def test_ollama_show_reads_the_models_files(serve: Any, server_spec: str, tmp_path: Any) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "assistant"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 10, "max_position_embeddings": 8192}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    save_file({"embed": np.zeros((10, 8), dtype=np.float16), "head": np.zeros((8,), dtype=np.float16)},
              str(folder / "model.safetensors"))
    spec = server_spec.replace("parallel: 2}", "parallel: 2, context: 512}")
    async with serve(spec) as s:
        r = await s.client.post("/api/show", json={"model": "assistant:latest"})
        legacy = await s.client.post("/api/show", json={"name": "embedder"})
        unknown = await s.client.post("/api/show", json={"model": "llama3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["capabilities"] == ["completion", "tools"]
    assert body["template"] == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert body["details"]["family"] == "llama" and body["details"]["quantization_level"] == "F16"
    assert body["details"]["parameter_size"] == "0.0M"
    info = body["model_info"]
    assert info["general.architecture"] == "llama" and info["general.parameter_count"] == 88
    assert info["llama.context_length"] == 512  # the lane's context, not the checkpoint's
    assert info["llama.embedding_length"] == 8 and info["llama.attention.head_count_kv"] == 1
    assert "num_ctx 512" in body["parameters"].splitlines()
    assert legacy.status_code == 200 and legacy.json()["capabilities"] == ["embedding"]
    assert legacy.json()["template"] == ""  # ./embedder does not exist: what the pipeline file says is shown
    assert unknown.status_code == 404 and "llama3" in unknown.json()["error"]


async def test_ollama_version_says_which_api_it_follows(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.get("/api/version")
    assert r.status_code == 200
    major, minor, _ = (int(part) for part in r.json()["version"].split("."))
    assert (major, minor) >= (0, 5)  # tools and JSON-schema formats are there since Ollama 0.5
    assert r.json()["multilane"]


async def test_ollama_refuses_images(serve: Any) -> None:
    async with serve() as s:
        img = await s.client.post("/api/chat", json={"model": "assistant", "messages": [
            {"role": "user", "content": "what is this?", "images": ["aGk="]}]})
    assert img.status_code == 422 and "images" in img.json()["error"]


# ---- pipelines


async def test_pipelines_are_listed_with_their_inputs(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.get("/v1/pipelines")
    (pipeline,) = r.json()["data"]
    assert pipeline["name"] == "echo" and pipeline["description"] == "Answers a question."
    assert pipeline["inputs"]["question"]["type"] == "str" and pipeline["inputs"]["question"]["required"]
    assert pipeline["stages"] == ["answer"]


async def test_a_pipeline_run_returns_its_result(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("forty-two")) as s:
        r = await s.client.post("/v1/pipelines/echo/runs", json={"inputs": {"question": "why?"}})
    assert r.status_code == 200
    body = r.json()
    assert body["output"] == "forty-two"
    assert body["stages"]["answer"]["text"] == "forty-two"
    assert body["pipeline"] == "echo" and body["run_id"]
    assert [e["stage"] for e in body["events"]] == ["answer"]


async def test_a_streamed_pipeline_run_sends_events_then_done(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("a b")) as s:
        r = await s.client.post("/v1/pipelines/echo/runs", json={"inputs": {"question": "why?"}, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    types = [e["type"] for e in events[:-1]]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    assert "".join(e["text"] for e in events[:-1] if e["type"] == "token") == "a b"
    assert events[-2]["output"] == "a b"


async def test_a_failing_streamed_run_ends_with_an_error_event(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("x", context=70)) as s:
        r = await s.client.post("/v1/pipelines/echo/runs",
                                json={"inputs": {"question": "long " * 10}, "stream": True})
    assert r.status_code == 200  # run_started went out before the failure
    events = sse_events(r.text)
    assert [e["type"] for e in events[:-2]][-2:] == ["stage_failed", "run_failed"]
    assert events[-2]["error"]["code"] == "context_length_exceeded"
    assert events[-1] == "[DONE]"


# ---- errors


async def test_queue_full_is_a_503_with_retry_after(serve: Any, held: Any) -> None:
    engine = held("w " * 20)
    async with serve(assistant=engine) as s:
        replies = await _concurrently(lambda: s.client.post("/v1/chat/completions", json=chat()), 5, held=engine)
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 200, 503, 503]  # 2 slots + 1 queued
    refused = next(r for r in replies if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert "queue is full" in refused.json()["error"]["message"]


async def test_queue_full_on_ollama_routes_is_a_503_with_an_ollama_body(serve: Any, held: Any) -> None:
    engine = held("w " * 20)
    async with serve(assistant=engine) as s:
        replies = await _concurrently(lambda: s.client.post("/api/generate", json={
            "model": "assistant", "prompt": "hi"}), 4, held=engine)
    refused = [r for r in replies if r.status_code == 503]
    assert len(refused) == 1 and isinstance(refused[0].json()["error"], str)
    assert refused[0].headers["retry-after"] == "1"


async def test_context_too_long_is_a_400_with_the_token_counts(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("x", context=16)) as s:
        r = await s.client.post("/v1/chat/completions", json=chat("word " * 20, max_tokens=4))
        o = await s.client.post("/api/generate", json={"model": "assistant", "prompt": "word " * 20})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "prompt of 21 tokens + max_tokens 4 = 25 tokens" in error["message"]
    assert "context of 16 tokens" in error["message"]
    assert o.status_code == 400 and "tokens" in o.json()["error"]


async def test_unknown_model_pipeline_and_route_are_404s(serve: Any) -> None:
    async with serve() as s:
        model = await s.client.post("/v1/chat/completions", json={**chat(), "model": "gpt-4"})
        ollama = await s.client.post("/api/chat", json={"model": "llama3", "messages": []})
        pipeline = await s.client.post("/v1/pipelines/nope/runs", json={"inputs": {}})
        route = await s.client.get("/v1/nothing")
    assert model.status_code == 404 and "unknown model 'gpt-4'" in model.json()["error"]["message"]
    assert model.json()["error"]["type"] == "not_found_error"
    assert ollama.status_code == 404 and "llama3" in ollama.json()["error"]
    assert pipeline.status_code == 404 and "nope" in pipeline.json()["error"]["message"]
    assert route.status_code == 404


async def test_an_invalid_body_is_a_422_naming_the_field(serve: Any) -> None:
    async with serve() as s:
        role = await s.client.post("/v1/chat/completions", json={"model": "assistant", "messages": [{"content": "x"}]})
        empty = await s.client.post("/v1/chat/completions", json={"model": "assistant", "messages": []})
        temp = await s.client.post("/v1/chat/completions", json=chat(temperature=5))
        junk = await s.client.post("/v1/chat/completions", content=b"{not json",
                                   headers={"content-type": "application/json"})
        ollama = await s.client.post("/api/chat", json={"messages": []})
    assert role.status_code == 422
    assert role.json()["error"]["message"] == "body.messages.0.role: field required"
    assert role.json()["error"]["type"] == "invalid_request_error"
    assert "body.messages" in empty.json()["error"]["message"]
    assert "body.temperature: input should be less than or equal to 2" in temp.json()["error"]["message"]
    assert junk.status_code == 422 and "invalid JSON" in junk.json()["error"]["message"]
    assert ollama.status_code == 422 and ollama.json()["error"] == "body.model: field required"


async def test_bad_pipeline_inputs_are_a_422(serve: Any) -> None:
    async with serve() as s:
        missing = await s.client.post("/v1/pipelines/echo/runs", json={"inputs": {}})
        typed = await s.client.post("/v1/pipelines/echo/runs", json={"inputs": {"question": 3}, "stream": True})
    assert missing.status_code == 422 and "missing input 'question'" in missing.json()["error"]["message"]
    assert missing.json()["error"]["code"] == "invalid_input"
    assert typed.status_code == 422 and "should be str" in typed.json()["error"]["message"]


async def test_a_stage_error_is_mapped_by_its_cause(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("x", context=70)) as s:
        r = await s.client.post("/v1/pipelines/echo/runs", json={"inputs": {"question": "long " * 10}})
    assert r.status_code == 400
    assert "stage 'answer'" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_memory_budget_refusal_is_a_503(serve: Any, server_spec: str, held: Any) -> None:
    spec = server_spec.replace("runtime: {max_queue: 1}", "runtime: {max_queue: 1, max_loaded_models: 1}")
    engine = held("w " * 50)
    async with serve(spec, assistant=engine) as s:
        async with anyio.create_task_group() as tg:
            async def busy() -> None:
                await s.client.post("/v1/chat/completions", json=chat())

            tg.start_soon(busy)
            await engine.holding.wait()  # the only lane allowed is loaded and mid-call: it cannot be evicted
            r = await s.client.post("/v1/embeddings", json={"model": "embedder", "input": "x"})
            engine.release.set()
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "memory_budget"
    assert "max_loaded_models" in r.json()["error"]["message"]


async def test_an_engine_failure_is_a_500_with_a_clear_message_and_no_trace(serve: Any) -> None:
    engine = FakeGenerateEngine()
    engine.kill()
    async with serve(assistant=engine) as s:
        r = await s.client.post("/v1/chat/completions", json=chat())
        o = await s.client.post("/api/generate", json={"model": "assistant", "prompt": "x", "stream": False})
    assert r.status_code == 500
    assert r.json()["error"]["message"].startswith("engine failure: the fake engine is dead")
    assert r.json()["error"]["type"] == "server_error"
    assert "Traceback" not in r.text and "Traceback" not in o.text
    assert o.status_code == 500


async def test_an_unexpected_crash_is_a_500_without_a_trace(serve: Any) -> None:
    def crash(prompt: str, options: SamplingOptions) -> str:
        raise RuntimeError("secret internals")

    async with serve(assistant=FakeGenerateEngine(crash)) as s:
        r = await s.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 500
    assert "secret internals" not in r.text and "Traceback" not in r.text
    assert r.json()["error"]["code"] == "internal_error"


async def test_a_failure_mid_stream_is_sent_as_an_error_event(serve: Any, held: Any) -> None:
    engine = held("a b c d e f", before_hold=2)
    async with serve(assistant=engine) as s:
        async with anyio.create_task_group() as tg:
            async def kill_soon() -> None:
                await engine.holding.wait()  # two tokens are out: the engine dies mid-stream
                engine.kill()
                engine.release.set()

            tg.start_soon(kill_soon)
            r = await s.client.post("/v1/chat/completions", json=chat(stream=True))
    events = sse_events(r.text)
    assert r.status_code == 200
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "a b "
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_error"


# ---- auth, body limit, health, metrics


async def test_a_json_body_sent_as_a_form_is_read_as_json_as_curl_d_sends_it(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.post("/api/generate", content=json.dumps({"model": "assistant", "prompt": "hi",
                                                                     "stream": False}),
                                headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["response"] == "fake reply"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream"])
async def test_a_json_body_is_read_as_json_whatever_its_content_type(serve: Any, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    body = json.dumps({"model": "assistant", "prompt": "hi", "stream": False}).encode()
    async with serve() as s:
        ollama = await s.client.post("/api/generate", content=body, headers=headers)
        openai = await s.client.post("/v1/chat/completions", content=json.dumps(chat()).encode(), headers=headers)
        junk = await s.client.post("/v1/chat/completions", content=b"model=assistant", headers=headers)
    if content_type is None:
        assert "content-type" not in ollama.request.headers
    assert ollama.status_code == 200 and ollama.json()["response"] == "fake reply"
    assert openai.status_code == 200, openai.text
    assert junk.status_code == 422 and "invalid JSON" in junk.json()["error"]["message"]


async def test_every_answer_carries_a_request_id_the_client_may_choose(serve: Any) -> None:
    async with serve(api_key="k") as s:
        mine = await s.client.get("/v1/models", headers={"Authorization": "Bearer k", "X-Request-ID": "abc-123"})
        made = await s.client.get("/v1/models", headers={"Authorization": "Bearer k"})
        other = await s.client.get("/v1/models", headers={"Authorization": "Bearer k"})
        odd = await s.client.get("/v1/models", headers={"Authorization": "Bearer k", "X-Request-ID": "a b\tc"})
        refused = await s.client.get("/v1/models", headers={"X-Request-ID": "refused-1"})
        streamed = await s.client.post("/v1/chat/completions", json=chat(stream=True),
                                       headers={"Authorization": "Bearer k", "X-Request-ID": "stream-1"})
    assert mine.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32 and made.headers["x-request-id"] != other.headers["x-request-id"]
    assert odd.headers["x-request-id"] != "a b\tc"  # not a plain token: a fresh id instead, never logged as sent
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "refused-1"
    assert streamed.headers["x-request-id"] == "stream-1"


async def test_refusals_are_logged_as_warnings_with_route_request_id_and_reason(serve: Any) -> None:
    from structlog.testing import capture_logs

    async with serve(api_key="k") as s:
        auth = {"Authorization": "Bearer k"}
        with capture_logs() as logs:
            await s.client.post("/v1/chat/completions", json={"model": "assistant", "messages": [{"content": "x"}]},
                                headers={**auth, "X-Request-ID": "r-422"})
            await s.client.post("/v1/pipelines/nope/runs", json={}, headers={**auth, "X-Request-ID": "r-404"})
            await s.client.post("/api/chat", json={**chat(), "model": "embedder"},
                                headers={**auth, "X-Request-ID": "r-400"})
            await s.client.get("/v1/models", headers={"X-Request-ID": "r-401"})
    refused = {entry["request_id"]: entry for entry in logs if entry["event"] == "request refused"}
    assert set(refused) == {"r-422", "r-404", "r-400", "r-401"}
    assert all(entry["log_level"] == "warning" for entry in refused.values())
    assert refused["r-422"]["status"] == 422 and refused["r-422"]["route"] == "/v1/chat/completions"
    assert refused["r-422"]["error"] == "body.messages.0.role: field required"
    assert refused["r-404"]["route"] == "/v1/pipelines/{name}/runs"
    assert refused["r-404"]["path"] == "/v1/pipelines/nope/runs"
    assert "unknown pipeline 'nope'" in refused["r-404"]["error"]
    assert refused["r-400"]["status"] == 400 and "embedding model" in refused["r-400"]["error"]
    assert refused["r-401"]["status"] == 401 and refused["r-401"]["error"].startswith("missing API key")


async def test_an_api_key_is_needed_on_every_route_but_healthz(serve: Any) -> None:
    async with serve(api_key="s3cret") as s:
        missing = await s.client.get("/v1/models")
        wrong = await s.client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        ollama = await s.client.get("/api/tags", headers={"Authorization": "s3cret"})
        right = await s.client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        health = await s.client.get("/healthz")
        metrics = await s.client.get("/metrics")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["error"]["message"]
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    assert ollama.status_code == 401 and ollama.json() == {"error": "invalid API key"}
    assert right.status_code == 200
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert metrics.status_code == 401


async def test_a_body_over_the_limit_is_a_413(serve: Any) -> None:
    async with serve(max_body_bytes=1000) as s:
        big = await s.client.post("/v1/chat/completions", json=chat("x" * 2000))

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"model": "assistant", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}]}'

        streamed = await s.client.post("/v1/chat/completions", content=chunks(),
                                       headers={"content-type": "application/json"})
        small = await s.client.post("/v1/chat/completions", json=chat("x" * 100))
    assert big.status_code == 413 and "1000 bytes" in big.json()["error"]["message"]
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413 and "1000 bytes" in streamed.json()["error"]["message"]
    assert small.status_code == 200


async def test_metrics_show_lane_gauges_counters_and_latency_histograms(serve: Any) -> None:
    async with serve() as s:
        await s.client.post("/v1/chat/completions", json=chat())
        await s.client.post("/v1/embeddings", json={"model": "embedder", "input": "x"})
        r = await s.client.get("/metrics")
    text = r.text
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'multilane_requests_total{model="assistant"} 1.0' in text
    assert 'multilane_lane_loaded{model="assistant"} 1.0' in text
    assert 'multilane_lane_slots{model="assistant"} 2.0' in text
    assert 'multilane_lane_queue_depth{model="assistant"} 0.0' in text
    assert 'multilane_lane_busy_slots{model="assistant"} 0.0' in text
    assert 'multilane_completion_tokens_total{model="assistant"} 2.0' in text
    assert 'multilane_loads_total{model="embedder"} 1.0' in text
    assert 'multilane_time_to_first_token_seconds_count{model="assistant"} 1.0' in text
    assert 'multilane_request_seconds_count{model="embedder"} 1.0' in text
    assert "multilane_evictions_total" in text and "multilane_rejected_total" in text


async def test_the_lifespan_opens_and_closes_the_runtime(serve: Any) -> None:
    async with serve() as s:
        await s.client.post("/v1/chat/completions", json=chat())
        engine = s.engines["assistant"]
        assert not engine.closed
    assert engine.closed
    assert s.runtime.pool.observers == []


# ---- disconnects


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/api/chat"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_disconnects_aborts_its_request_and_frees_its_slot(serve: Any, stream: bool, path: str,
                                                                               held: Any) -> None:
    engine = held("word " * 200)  # holds mid-request: only an abort can end it
    body = {"model": "assistant", "input": "Hello", "stream": stream} if path == "/v1/responses" else chat(
        stream=stream)
    async with serve(assistant=engine) as s:
        hang_up = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hang_up_mid_generation, engine, hang_up)
            sent = await call_asgi(s.app, path, body, disconnect=hang_up)
        lane = s.runtime.pool.loaded("assistant")
        assert lane is not None and lane.busy == 0
        (call,) = engine.calls
        assert call.aborted and call.finished is not None
        assert engine.unfinished_requests() == 0
    assert not any(m.get("status") == 200 and not stream for m in sent)


async def test_a_client_that_disconnects_from_a_pipeline_run_cancels_it(serve: Any, held: Any) -> None:
    engine = held("word " * 200)
    async with serve(assistant=engine) as s:
        hang_up = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hang_up_mid_generation, engine, hang_up)
            await call_asgi(s.app, "/v1/pipelines/echo/runs", {"inputs": {"question": "q"}, "stream": True},
                            disconnect=hang_up)
        lane = s.runtime.pool.loaded("assistant")
        assert lane is not None and lane.busy == 0
        assert engine.calls[0].aborted and engine.unfinished_requests() == 0


async def hang_up_mid_generation(engine: Any, hang_up: anyio.Event) -> None:
    """Hang up once the held request is mid-generation, then let the engine go on."""
    await engine.holding.wait()
    hang_up.set()
    await anyio.wait_all_tasks_blocked()  # by now the server has aborted the request, or never will
    engine.release.set()  # a request still running now finishes unaborted, and the test fails (not hangs)


# ---- multilane ps --url


async def test_ps_url_prints_the_servers_lanes(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve() as s:
        await s.client.post("/api/generate", json={"model": "assistant", "prompt": "hi"})
        payload = (await s.client.get("/api/ps")).json()
    seen: dict[str, Any] = {}

    def fake_get(url: str, headers: dict[str, str], timeout: float) -> httpx.Response:
        seen.update(url=url, headers=headers)
        return httpx.Response(200, json=payload)

    monkeypatch.setattr(httpx, "get", fake_get)
    result = CliRunner().invoke(cli_app, ["ps", "--url", "http://127.0.0.1:8700/", "--api-key", "k"])
    assert result.exit_code == 0, result.output
    assert seen == {"url": "http://127.0.0.1:8700/api/ps", "headers": {"Authorization": "Bearer k"}}
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["NAME", "KIND", "DEVICE"]
    assert lines[1].split()[:3] == ["assistant", "generate", "cpu"]
    assert "0/2" in lines[1]
    assert "1 of 3 lanes loaded" in result.output


async def test_ps_shows_the_cache_hit_rate_reserved_slots_and_the_queue_by_priority(
        serve: Any, held: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = PRIORITY_SPEC.replace("parallel: 1}", "parallel: 1, reserved_slots: 1}")
    engine = held("a b c", cache_block_size=1)
    async with serve(spec, assistant=engine) as s:
        async with anyio.create_task_group() as tg:
            for content, priority in [("running", 1), ("waits", 1), ("waits too", 3), ("and this", 3)]:
                tg.start_soon(lambda c=content, p=priority: s.client.post(
                    "/v1/chat/completions", json=chat(c, priority=p)))
                await anyio.wait_all_tasks_blocked()
            payload = (await s.client.get("/api/ps")).json()
            engine.release.set()
        await s.client.post("/v1/chat/completions", json=chat("running"))  # the same prompt: all of it is known
        later = (await s.client.get("/api/ps")).json()
    monkeypatch.setattr(httpx, "get", lambda url, headers, timeout: httpx.Response(200, json=payload))
    busy = CliRunner().invoke(cli_app, ["ps", "--url", "http://127.0.0.1:8700"])
    monkeypatch.setattr(httpx, "get", lambda url, headers, timeout: httpx.Response(200, json=later))
    idle = CliRunner().invoke(cli_app, ["ps", "--url", "http://127.0.0.1:8700"])

    header, row = busy.output.splitlines()[:2]
    assert "QUEUED" in header and "CACHE" in header
    assert "1/2 (1 reserved)" in row  # the background calls leave the reserved slot free
    assert "3 (p1: 1, p3: 2)" in row
    lane = later["models"][0]["multilane"]
    # "<user>waits" began "waits too", and the repeated prompt came back whole but for its last token
    assert (lane["prompt_tokens"], lane["cached_tokens"]) == (12, 2)
    assert " 17% " in idle.output.splitlines()[1]


def test_ps_url_reports_a_refusal_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpx, "get", lambda url, headers, timeout: httpx.Response(
        401, json={"error": "invalid API key"}))
    result = CliRunner().invoke(cli_app, ["ps", "--url", "http://127.0.0.1:8700"])
    assert result.exit_code == 1
    assert "answered 401: invalid API key" in result.output


def test_ps_without_file_or_url_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli_app, ["ps"])
    assert result.exit_code == 2


async def _concurrently(call: Callable[[], Any], n: int, *, held: Any = None) -> list[httpx.Response]:
    """Make n calls at once; a held engine is released once every call is either answered or waiting."""
    replies: list[httpx.Response] = []

    async def one() -> None:
        replies.append(await call())

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
        if held is not None:
            await held.holding.wait()
            await anyio.wait_all_tasks_blocked()
            held.release.set()
    return replies


def test_serve_passes_its_options_and_the_env_api_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import multilane.server

    seen: dict[str, Any] = {}
    monkeypatch.setattr(multilane.server, "serve", lambda path, **kwargs: seen.update(path=path, **kwargs))
    monkeypatch.setenv("MULTILANE_API_KEY", "from-env")
    spec = tmp_path / "p.yaml"
    result = CliRunner().invoke(cli_app, ["serve", str(spec), "--port", "9001", "--grace", "3", "--max-body", "1MiB"])
    assert result.exit_code == 0, result.output
    assert seen["path"] == spec and seen["host"] == "127.0.0.1" and seen["port"] == 9001
    assert seen["api_key"] == "from-env" and seen["grace"] == 3 and seen["max_body_bytes"] == 1024 * 1024


# ---- cached prompt tokens and priority

LONG = " ".join(f"word{i}" for i in range(24))


async def test_cached_prompt_tokens_reach_the_usage_of_every_route_and_the_metrics(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("a b", cache_block_size=4)) as s:
        first = await s.client.post("/v1/chat/completions", json=chat(LONG + " first"))
        second = await s.client.post("/v1/chat/completions", json=chat(LONG + " second"))
        streamed = sse_events((await s.client.post("/v1/chat/completions", json=chat(
            LONG + " third", stream=True, stream_options={"include_usage": True}))).text)
        raw = await s.client.post("/v1/completions", json={"model": "assistant", "prompt": [LONG + " x", LONG + " y"]})
        responded = await s.client.post("/v1/responses", json={"model": "assistant", "input": LONG + " fourth"})
        ollama = await s.client.post("/api/chat", json={"model": "assistant", "stream": False,
                                                        "messages": [{"role": "user", "content": LONG + " fifth"}]})
        metrics = (await s.client.get("/metrics")).text
        cached = [call.cached_tokens for call in s.engines["assistant"].calls]

    assert first.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 24}  # "<user>word0 ... word22"
    assert streamed[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 24}
    assert raw.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 + 24  # raw prompts share no "<user>"
    assert responded.json()["usage"]["input_tokens_details"]["cached_tokens"] == 24
    assert ollama.json()["prompt_cached_count"] == 24
    assert f'multilane_prompt_cached_tokens_total{{model="assistant"}} {float(sum(cached))}' in metrics
    assert sum(cached) == 24 * 5


PRIORITY_SPEC = """
models:
  assistant: {kind: generate, source: ./assistant, parallel: 1}
runtime: {max_queue: 8}
"""


async def test_priority_comes_from_the_body_or_the_header_and_orders_the_queue(serve: Any, held: Any) -> None:
    engine = held("a b c")
    async with serve(PRIORITY_SPEC, assistant=engine) as s:
        replies: list[httpx.Response] = []

        async def post(path: str, body: dict[str, Any], priority: str | None = None) -> None:
            headers = {"X-Multilane-Priority": priority} if priority is not None else {}
            replies.append(await s.client.post(path, json=body, headers=headers))

        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "/v1/chat/completions", chat("running"))
            await engine.holding.wait()
            for path, body, header in [
                    ("/v1/chat/completions", chat("background", priority=5), None),
                    ("/v1/completions", {"model": "assistant", "prompt": "later", "priority": 3}, "-9"),  # body wins
                    ("/api/generate", {"model": "assistant", "prompt": "urgent", "stream": False}, "-2"),
                    ("/v1/responses", {"model": "assistant", "input": "normal"}, None)]:
                tg.start_soon(post, path, body, header)
                await anyio.wait_all_tasks_blocked()
            ps = (await s.client.get("/api/ps")).json()["models"][0]["multilane"]
            metrics = (await s.client.get("/metrics")).text
            engine.release.set()

    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert ps["queued"] == 4 and ps["queued_by_priority"] == {"-2": 1, "0": 1, "3": 1, "5": 1}
    assert 'multilane_lane_queued_by_priority{model="assistant",priority="3"} 1.0' in metrics
    order = [(call.prompt.replace("<user>", "").split("\n")[0], call.priority) for call in engine.calls]
    assert order == [("running", 0), ("urgent", -2), ("normal", 0), ("later", 3), ("background", 5)]


async def test_a_priority_header_that_is_not_a_whole_number_is_a_422_naming_it(serve: Any) -> None:
    async with serve() as s:
        body = {"model": "assistant", "messages": [{"role": "user", "content": "x"}]}
        r = await s.client.post("/api/chat", json=body, headers={"X-Multilane-Priority": "high"})
    assert r.status_code == 422
    assert "X-Multilane-Priority" in r.json()["error"] and "'high'" in r.json()["error"]
