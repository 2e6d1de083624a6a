"""The vLLM engine's checks that need no model: its KV cache figures against `parallel`, and its load errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from multilane.engines import vllm
from multilane.engines.vllm import KVCapacity, check_capacity, load_error, private_ipc_folder, read_capacity
from multilane.errors import EngineError
from multilane.memory import KVPlan


def llm_with(blocks: int, block_size: int, concurrency: float | None) -> SimpleNamespace:
    cache = SimpleNamespace(num_gpu_blocks=blocks, block_size=block_size, kv_cache_max_concurrency=concurrency)
    return SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache))


def test_vllms_figures_give_the_blocks_of_one_full_context_sequence() -> None:
    # Gemma 3 at context 700 on the CPU reported 254 blocks and a max concurrency of 6.195x: 41 per sequence.
    capacity = read_capacity(llm_with(254, 128, 254 / 41), context=700, planned=None)

    assert capacity == KVCapacity(blocks=254, block_size=128, blocks_per_sequence=41)
    assert capacity.sequences == 6  # one of the 254 blocks is vLLM's own


def test_a_cache_that_holds_parallel_sequences_passes() -> None:
    check_capacity("m", KVCapacity(blocks=19, block_size=128, blocks_per_sequence=6), parallel=3, context=700)


def test_a_cache_short_of_parallel_sequences_fails_with_the_numbers_and_what_to_change() -> None:
    planned = KVPlan.per_token(3, 700, 23040)

    with pytest.raises(EngineError) as caught:
        check_capacity("smol", KVCapacity(blocks=16, block_size=128, blocks_per_sequence=6), parallel=3,
                       context=700, planned=planned)

    message = str(caught.value)
    assert "model 'smol'" in message
    assert "holds 2 sequences of 700 tokens at once (16 blocks of 128 tokens, 1 reserved, 6 per sequence)" in message
    assert "fewer than its parallel: 3" in message and "preempted" in message
    assert "Lower the model's parallel to 2 or its context" in message


def test_a_failed_engine_start_names_the_model_and_numbers_instead_of_the_root_cause_above() -> None:
    exc = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    kv = KVPlan(parallel=1, context=512, block_size=128, bytes_per_block=2_949_120, blocks_per_sequence=4,
                reserved_blocks=1, dtype="bfloat16")

    message = str(load_error("smol", "/models/smol", exc, context=512, parallel=1, dtype="bfloat16", kv=kv))

    assert "root cause" not in message
    assert "vLLM could not load model 'smol'" in message
    assert "context 512, parallel 1, dtype bfloat16" in message
    assert "(1 x 4 + 1 reserved) blocks" in message
    assert "of RAM is available now" in message and "Lower the model's parallel or context" in message


def test_vllms_sockets_go_to_one_private_folder_per_process_unless_the_user_chose_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    monkeypatch.setattr(vllm, "_ipc_folder", None)
    folder = private_ipc_folder()
    assert os.environ["VLLM_RPC_BASE_PATH"] == folder  # what vLLM and its child processes read
    assert Path(folder).is_dir() and Path(folder).parent == Path(tempfile.gettempdir())
    assert Path(folder).name.startswith("multilane-vllm-")
    monkeypatch.delenv("VLLM_RPC_BASE_PATH")
    assert private_ipc_folder() == folder  # every engine of the process shares it

    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    assert private_ipc_folder() == str(tmp_path)


def test_vllms_default_stays_where_a_private_folder_would_make_socket_paths_too_long(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (107 - 36 - len(str(tmp_path)) - 2))  # room for a uuid here, not one folder further
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    monkeypatch.setattr(vllm, "_ipc_folder", None)

    assert private_ipc_folder() == str(deep)
    assert "VLLM_RPC_BASE_PATH" not in os.environ and list(deep.iterdir()) == []


def test_structured_outputs_keep_vllms_defaults_unless_the_engine_options_name_them() -> None:
    # vLLM 0.32 reads disable_any_whitespace from the engine's config only, and refuses it with backend "auto"
    default = vllm.structured_outputs_config(None)
    assert (default.backend, default.disable_any_whitespace) == ("auto", False)
    compact = vllm.structured_outputs_config({"backend": "xgrammar", "disable_any_whitespace": True})  # from YAML
    assert (compact.backend, compact.disable_any_whitespace) == ("xgrammar", True)
    assert vllm.structured_outputs_config(compact) is compact
    with pytest.raises(ValueError, match="disable_any_whitespace"):
        vllm.structured_outputs_config({"disable_any_whitespace": True})  # vLLM's own check, with "auto"
