"""`multilane` with some of its vLLM calls held where a test says: real calls that stop at a known step.

    python tests/integration/held_cli.py [--after CALLS --marker FILE] [--gates DIR] -- run spec.yaml ...

- `--after CALLS --marker FILE`: the first CALLS calls to a vLLM engine run; the next one touches FILE and waits
  forever, with its lane slot held and the rest of the process (a run's journal writer included) going on. A test
  that kills the process then finds the run stopped at the same step every time.
- `--gates DIR`: a call whose prompt holds `[hold:NAME]` streams its first chunk from vLLM, then waits until the
  file DIR/NAME exists, still holding its slot; the test creates that file to let the call go on to its end. A
  held call ends early as any call does: a hang-up, a cut at the end of a server's grace.

A test that needs a call to be running, or not yet finished, at some point would otherwise size it by the
machine's speed and hope; a call held this way is running until the test lets it go, however fast or loaded the
machine is, or however long the test process itself is kept from running (CI has shown stalls of many seconds).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio

from multilane import cli
from multilane.engines.base import Chunk
from multilane.engines.vllm import VLLMEngine

GATE = re.compile(r"\[hold:([\w-]+)\]")


def hold(*, after: int | None, marker: Path | None, gates: Path | None) -> None:
    """Patch `VLLMEngine.stream` to hold calls as the module docstring says."""
    stream = VLLMEngine.stream
    started = 0

    async def held(self: VLLMEngine, prompt_ids: Sequence[int], *args: Any, **kwargs: Any) -> AsyncIterator[Chunk]:
        nonlocal started
        started += 1
        if after is not None and marker is not None and started > after:
            await anyio.Path(marker).touch()
            await anyio.sleep_forever()
        gate = GATE.search(self._tokenizer.decode(prompt_ids)) if gates is not None else None
        release = anyio.Path(gates / gate.group(1)) if gates is not None and gate is not None else None
        async for chunk in stream(self, prompt_ids, *args, **kwargs):
            yield chunk
            while release is not None and not await release.exists():  # noqa: ASYNC110 - a file the test makes
                await anyio.sleep(0.05)
            release = None  # held after the first chunk only

    VLLMEngine.stream = held  # type: ignore[method-assign]


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
