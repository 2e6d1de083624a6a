"""POST /v1/responses on fake engines: bodies and events checked against the openai SDK's own Response types."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from multilane import SamplingOptions
from multilane.testing import FakeGenerateEngine, example_for_schema

pytestmark = pytest.mark.anyio

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}


def ask(input: Any = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "assistant", "input": input, **extra}


def events_of(text: str) -> list[dict[str, Any]]:
    """Each server-sent event's data, checked to carry the same type on its `event:` line and to be a valid event."""
    events = []
    for block in text.strip("\n").split("\n\n"):
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[len("data: "):])
        assert event["type"] == kind[len("event: "):]
        EVENTS.validate_python(event)
        events.append(event)
    return events


async def test_a_text_input_gets_a_response_object_the_openai_sdk_accepts(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("The answer is 42")) as s:
        r = await s.client.post("/v1/responses", json=ask(instructions="Be brief.", max_output_tokens=16,
                                                           temperature=0.5, metadata={"k": "v"}))
        call = s.engines["assistant"].calls[0]
    assert r.status_code == 200, r.text
    response = Response.model_validate(r.json())
    assert response.output_text == "The answer is 42"
    assert response.status == "completed" and response.id.startswith("resp_")
    assert response.usage is not None and response.usage.output_tokens == 4
    assert response.usage.total_tokens == response.usage.input_tokens + 4
    assert response.instructions == "Be brief." and response.max_output_tokens == 16
    assert response.store is False and response.metadata == {"k": "v"}
    assert call.prompt == "<system>Be brief.\n<user>Hello there\n<assistant>"
    assert call.options.max_tokens == 16 and call.options.temperature == 0.5


async def test_input_items_become_the_chat_with_calls_and_results_written_out(serve: Any) -> None:
    items = [{"role": "developer", "content": "Answer briefly."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                                              {"type": "input_text", "text": "Oslo?"}]},
             {"type": "reasoning", "id": "rs_1", "summary": []},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "It rains.", "annotations": []}]},
             {"role": "user", "content": "Thanks"}]
    async with serve() as s:
        r = await s.client.post("/v1/responses", json=ask(items, instructions="You are a weather bot."))
        prompt = s.engines["assistant"].calls[0].prompt
    assert r.status_code == 200, r.text
    assert prompt == ("<system>You are a weather bot.\n\nAnswer briefly.\n<user>Weather in Oslo?\n"
                      '<assistant>{"get_weather": {"city": "Oslo"}}\n'
                      "<user>Result of the function call get_weather: rain\n<assistant>It rains.\n<user>Thanks\n"
                      "<assistant>")


async def test_tools_give_a_function_call_item_with_json_string_arguments(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.post("/v1/responses", json=ask("Weather in Oslo?", tools=[WEATHER, TIME]))
        call = s.engines["assistant"].calls[0]
    assert r.status_code == 200, r.text
    response = Response.model_validate(r.json())
    (item,) = response.output
    assert item.type == "function_call" and item.name == "get_weather"
    assert item.call_id.startswith("call_") and item.id is not None and item.id.startswith("fc_")
    assert json.loads(item.arguments) == {"city": "text"}
    assert response.output_text == "" and response.status == "completed"
    assert len(call.options.json_schema["anyOf"]) == 3  # two tools, or an answer
    assert "get_weather" in call.prompt and '{"answer"' in call.prompt


async def test_tool_choice_required_named_and_none(serve: Any) -> None:
    def reply(prompt: str, options: SamplingOptions) -> str:
        schema = options.json_schema
        if schema is None:
            return "plain words"
        may_answer = any("answer" in option["properties"] for option in schema.get("anyOf", []))
        return json.dumps({"answer": "It is sunny."} if may_answer else example_for_schema(schema))

    answer = FakeGenerateEngine(reply)
    async with serve(assistant=answer) as s:
        auto = await s.client.post("/v1/responses", json=ask(tools=[WEATHER]))
        required = await s.client.post("/v1/responses", json=ask(tools=[WEATHER, TIME], tool_choice="required"))
        named = await s.client.post("/v1/responses", json=ask(tools=[WEATHER, TIME],
                                                               tool_choice={"type": "function", "name": "get_time"}))
        none = await s.client.post("/v1/responses", json=ask(tools=[WEATHER], tool_choice="none"))
        unknown = await s.client.post("/v1/responses", json=ask(tools=[WEATHER],
                                                                 tool_choice={"type": "function", "name": "nope"}))
        schemas = [c.options.json_schema for c in s.engines["assistant"].calls]
    assert Response.model_validate(auto.json()).output_text == "It is sunny."
    assert len(schemas[1]["anyOf"]) == 2  # no answer allowed
    assert schemas[2]["required"] == ["get_time"]
    assert Response.model_validate(none.json()).output_text == "plain words" and schemas[3] is None
    assert Response.model_validate(required.json()).output[0].type == "function_call"
    assert Response.model_validate(named.json()).output[0].name == "get_time"  # type: ignore[union-attr]
    assert unknown.status_code == 422 and "nope" in unknown.json()["error"]["message"]


async def test_text_format_json_schema_constrains_the_answer_also_beside_tools(serve: Any) -> None:
    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"]}
    fmt = {"format": {"type": "json_schema", "name": "y", "schema": schema, "strict": True}}
    answers = FakeGenerateEngine(lambda prompt, options: json.dumps(
        {"answer": {"year": 1887}} if "anyOf" in (options.json_schema or {}) else {"year": 1887}))
    async with serve(assistant=answers) as s:
        alone = await s.client.post("/v1/responses", json=ask(text=fmt))
        with_tools = await s.client.post("/v1/responses", json=ask(text=fmt, tools=[WEATHER]))
        schemas = [c.options.json_schema for c in s.engines["assistant"].calls]
    assert json.loads(Response.model_validate(alone.json()).output_text) == {"year": 1887}
    assert alone.json()["text"]["format"]["type"] == "json_schema"
    assert schemas[0] == schema
    assert json.loads(Response.model_validate(with_tools.json()).output_text) == {"year": 1887}
    assert schemas[1]["anyOf"][1]["properties"]["answer"] == schema


async def test_hitting_max_output_tokens_is_an_incomplete_response(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("one two three four five")) as s:
        r = await s.client.post("/v1/responses", json=ask(max_output_tokens=2))
    response = Response.model_validate(r.json())
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "one two "


async def test_previous_response_id_is_refused_with_a_400_naming_what_it_needs(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.post("/v1/responses", json=ask(previous_response_id="resp_123"))
        stored = await s.client.get("/v1/responses/resp_123")
        generated = len(s.engines["assistant"].calls)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "previous_response_id" and error["code"] == "previous_response_unsupported"
    assert "run journal" in error["message"] and "send the whole conversation in `input`" in error["message"]
    assert stored.status_code == 404 and "store: false" in stored.json()["error"]["message"]
    assert generated == 0


async def test_unsupported_inputs_and_tools_are_422s_naming_the_field(serve: Any) -> None:
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]
    async with serve() as s:
        img = await s.client.post("/v1/responses", json=ask(image))
        search = await s.client.post("/v1/responses", json=ask(tools=[{"type": "web_search"}]))
        ref = await s.client.post("/v1/responses", json=ask([{"type": "item_reference", "id": "msg_1"}]))
        bad = await s.client.post("/v1/responses", json=ask(tools=[{**WEATHER, "parameters": {"type": "objekt"}}]))
    assert img.status_code == 422
    assert img.json()["error"]["message"].startswith("body.input[0].content[0]: content of type 'input_image'")
    assert search.status_code == 422 and "body.tools.0" in search.json()["error"]["message"]
    assert ref.status_code == 400 and "stores no responses" in ref.json()["error"]["message"]
    assert bad.status_code == 422 and bad.json()["error"]["message"].startswith(
        "body.tools[0].parameters: invalid JSON schema")


async def test_a_streamed_text_response_sends_the_responses_api_events_in_order(serve: Any) -> None:
    async with serve(assistant=FakeGenerateEngine("one two three")) as s:
        r = await s.client.post("/v1/responses", json=ask(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.text)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "one two three"
    assert events[0]["response"]["status"] == "in_progress"
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "one two three" and final.usage is not None and final.usage.output_tokens == 3
    item_ids = {e["item_id"] for e in events if "item_id" in e}
    assert item_ids == {final.output[0].id}


async def test_a_streamed_function_call_comes_as_its_argument_events(serve: Any) -> None:
    async with serve() as s:
        r = await s.client.post("/v1/responses", json=ask(stream=True, tools=[WEATHER], tool_choice="required"))
    events = events_of(r.text)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert events[2]["item"]["status"] == "in_progress" and events[2]["item"]["arguments"] == ""
    assert json.loads(events[4]["arguments"]) == {"city": "text"} and events[4]["name"] == "get_weather"
    (item,) = Response.model_validate(events[-1]["response"]).output
    assert item.type == "function_call" and item.call_id == events[5]["item"]["call_id"]


async def test_a_streamed_answer_beside_tools_comes_as_text_events(serve: Any) -> None:
    engine = FakeGenerateEngine(lambda prompt, options: json.dumps({"answer": "Sunny."}))
    async with serve(assistant=engine) as s:
        r = await s.client.post("/v1/responses", json=ask(stream=True, tools=[WEATHER]))
    events = events_of(r.text)
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Sunny."]
    assert Response.model_validate(events[-1]["response"]).output_text == "Sunny."


async def test_a_failure_mid_stream_is_an_error_event_then_response_failed(serve: Any, held: Any) -> None:
    engine = held("a b c d e f", before_hold=2)
    async with serve(assistant=engine) as s:
        async with anyio.create_task_group() as tg:
            async def kill_soon() -> None:
                await engine.holding.wait()
                engine.kill()
                engine.release.set()

            tg.start_soon(kill_soon)
            r = await s.client.post("/v1/responses", json=ask(stream=True))
    events = events_of(r.text)
    assert r.status_code == 200
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "a b "
    assert events[-2]["type"] == "error" and events[-2]["code"] == "engine_error"
    assert events[-1]["type"] == "response.failed"
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"


async def test_an_empty_input_and_a_wrong_model_kind_are_refused(serve: Any) -> None:
    async with serve() as s:
        empty = await s.client.post("/v1/responses", json=ask([]))
        embedder = await s.client.post("/v1/responses", json={**ask(), "model": "embedder"})
        unknown = await s.client.post("/v1/responses", json={**ask(), "model": "gpt-5"})
    assert empty.status_code == 422 and "empty" in empty.json()["error"]["message"]
    assert embedder.status_code == 400 and "embedding model" in embedder.json()["error"]["message"]
    assert unknown.status_code == 404
