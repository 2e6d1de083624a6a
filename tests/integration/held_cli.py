"""`multilane` with some of its vLLM calls held where a test says: real calls that stop at a known step.

    python tests/integration/held_cli.py [--after CALLS --marker FILE] [--gates DIR] -- run spec.yaml ...

- `--after CALLS --marker FILE`: the first CALLS calls to a vLLM engine run; the next one touches FILE and waits
  forever, with its lane slot held and the rest of the process (a run's journal writer included) going on. A test
  that kills the process then finds the run stopped at the same step every time.
- `--gates DIR`: a call whose prompt holds `[hold:NAME]` streams its first chunk from its engine (vLLM in this
  process, or a remote one), then waits until the file DIR/NAME exists, still holding its slot; the test creates
  that file to let the call go on to its end. A held call ends early as any call does: a hang-up, a cut at the end
  of a server's grace.

A test that needs a call to be running, or not yet finished, at some point would otherwise size it by the
machine's speed and hope; a call held this way is running until the test lets it go, however fast or loaded the
machine is, or however long the test process itself is kept from running (CI has shown stalls of many seconds).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio

from multilane import cli
from multilane.engines.base import Chunk
from multilane.engines.remote import RemoteGenerateEngine, RemotePrompt
from multilane.engines.vllm import VLLMEngine

GATE = re.compile(r"\[hold:([\w-]+)\]")


async def gated(stream: AsyncIterator[Chunk], prompt: str, gates: Path | None) -> AsyncGenerator[Chunk, None]:
    """`stream`, held after its first chunk until DIR/NAME exists when `prompt` holds `[hold:NAME]`."""
    gate = GATE.search(prompt) if gates is not None else None
    release = anyio.Path(gates / gate.group(1)) if gates is not None and gate is not None else None
    try:
        async for chunk in stream:
            yield chunk
            while release is not None and not await release.exists():  # noqa: ASYNC110 - a file the test makes
                await anyio.sleep(0.05)
            release = None  # held after the first chunk only
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # the engines' streams are async generators: abort it


def hold(*, after: int | None, marker: Path | None, gates: Path | None) -> None:
    """Patch `VLLMEngine.stream` and `RemoteGenerateEngine.stream` to hold calls as the module docstring says."""
    local, remote = VLLMEngine.stream, RemoteGenerateEngine.stream
    started = 0

    async def on_vllm(self: VLLMEngine, prompt_ids: Sequence[int], *args: Any, **kwargs: Any) -> AsyncIterator[Chunk]:
        nonlocal started
        started += 1
        if after is not None and marker is not None and started > after:
            await anyio.Path(marker).touch()
            await anyio.sleep_forever()
        text = self._tokenizer.decode(prompt_ids) if gates is not None else ""
        async with aclosing(gated(local(self, prompt_ids, *args, **kwargs), text, gates)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def on_remote(self: RemoteGenerateEngine, prompt: RemotePrompt, *args: Any,
                        **kwargs: Any) -> AsyncIterator[Chunk]:
        text = prompt.text if prompt.text is not None else "\n".join(m["content"] for m in prompt.messages or [])
        async with aclosing(gated(remote(self, prompt, *args, **kwargs), text, gates)) as chunks:
            async for chunk in chunks:
                yield chunk

    VLLMEngine.stream = on_vllm  # type: ignore[method-assign]
    RemoteGenerateEngine.stream = on_remote  # type: ignore[method-assign]


if __name__ == "__main__":  # vLLM's engine core is a child process, which imports this file again
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=int, help="calls that run before every later one is held")
    parser.add_argument("--marker", type=Path, help="touched when the first call is held (with --after)")
    parser.add_argument("--gates", type=Path, help="folder whose files release the calls marked [hold:NAME]")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the multilane command")
    options = parser.parse_args()
    if (options.after is None) != (options.marker is None):
        parser.error("--after and --marker go together")
    hold(after=options.after, marker=options.marker, gates=options.gates)
    sys.argv = ["multilane", *(options.args[1:] if options.args[:1] == ["--"] else options.args)]
    cli.main()
