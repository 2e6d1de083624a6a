"""Settings shared by every test: nothing may reach a model hub."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the unit tests before the integration tests.

    The integration tests share one runtime through a session-scoped async fixture, and anyio's pytest plugin
    keeps that fixture's event loop as the runner of every later async test, whatever backend it asks for:
    a unit test marked `virtual_clock` would then run on asyncio with the real clock, and a sync test that calls
    `anyio.run` would find a loop already running. The unit tests, on function-scoped runners, go first.
    """
    items.sort(key=lambda item: "integration" in item.path.parts)
