"""Planning a lane: the dtype by the machine's capability, and a generate lane's cost in vLLM's own blocks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from multilane import parse_spec
from multilane.planning import choose_dtype, computes_natively, cpu_flags, plan_model

pytestmark = pytest.mark.anyio

SMOLLM2_135M: dict[str, Any] = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                "head_dim": 64, "hidden_size": 576, "torch_dtype": "bfloat16"}
GEMMA3_270M: dict[str, Any] = {"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
                               "head_dim": 256, "hidden_size": 640, "sliding_window": 512,
                               "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
                               "torch_dtype": "bfloat16"}

# Abridged /proc/cpuinfo of the two kinds of machine the issue measured on.
CPUINFO_AVX512_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni amx_tile
"""
CPUINFO_AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma f16c
"""
CPUINFO_ARM_BF16 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm
"""


def test_cpu_flags_are_read_from_the_flags_line_or_arms_features_line() -> None:
    assert "avx512_bf16" in cpu_flags(CPUINFO_AVX512_BF16)
    assert "avx2" in cpu_flags(CPUINFO_AVX2_ONLY) and "avx512_bf16" not in cpu_flags(CPUINFO_AVX2_ONLY)
    assert "bf16" in cpu_flags(CPUINFO_ARM_BF16)
    assert cpu_flags("") == frozenset()


def test_auto_on_a_cpu_with_native_bf16_is_bfloat16() -> None:
    choice = choose_dtype("auto", gpu=False, flags=cpu_flags(CPUINFO_AVX512_BF16))
    assert choice.dtype == "bfloat16" and choice.warning is None
    assert choose_dtype("auto", gpu=False, flags=cpu_flags(CPUINFO_ARM_BF16)).dtype == "bfloat16"
    assert choose_dtype("auto", gpu=False, flags={"amx_bf16"}).dtype == "bfloat16"


def test_auto_on_a_cpu_that_only_emulates_bf16_is_float32() -> None:
    choice = choose_dtype("auto", gpu=False, flags=cpu_flags(CPUINFO_AVX2_ONLY))
    assert choice.dtype == "float32"
    assert choice.warning is None  # auto chose well: nothing to warn about
    assert "emulated" in choice.reason


def test_an_explicit_slow_dtype_is_honoured_with_a_warning_that_says_why() -> None:
    choice = choose_dtype("bfloat16", gpu=False, flags=cpu_flags(CPUINFO_AVX2_ONLY))
    assert choice.dtype == "bfloat16"
    assert choice.warning is not None
    assert "no native bfloat16" in choice.warning and "avx512_bf16" in choice.warning
    assert "slower than float32" in choice.warning and "dtype: auto" in choice.warning

    half = choose_dtype("float16", gpu=False, flags=cpu_flags(CPUINFO_AVX512_BF16))
    assert half.dtype == "float16" and half.warning is not None and "avx512_fp16" in half.warning

    fine = choose_dtype("bfloat16", gpu=False, flags=cpu_flags(CPUINFO_AVX512_BF16))
    assert fine.dtype == "bfloat16" and fine.warning is None
    assert choose_dtype("float32", gpu=False, flags=()).warning is None
    assert computes_natively("float32", ())


def test_auto_on_a_gpu_is_what_vllm_picks_for_the_checkpoint() -> None:
    assert choose_dtype("auto", gpu=True, flags=(), config_dtype="bfloat16").dtype == "bfloat16"
    assert choose_dtype("auto", gpu=True, flags=(), config_dtype="float16").dtype == "float16"
    assert choose_dtype("auto", gpu=True, flags=(), config_dtype="float32").dtype == "bfloat16"  # vLLM downcasts
    assert choose_dtype("float32", gpu=True, flags=()).dtype == "float32"


def _spec(tmp_path: Path, config: dict[str, Any], line: str) -> Any:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    return parse_spec(f"models:\n  m: {{kind: generate, source: ./model, {line}}}\n", file="p.yaml",
                      base_dir=tmp_path)


async def test_a_small_smollm2_lane_on_a_cpu_gets_the_blocks_vllm_needs(tmp_path: Path) -> None:
    spec = _spec(tmp_path, SMOLLM2_135M, "context: 512, parallel: 1")

    plan = await plan_model("m", spec, gpu=False, flags=cpu_flags(CPUINFO_AVX512_BF16))

    assert plan.dtype == "bfloat16"
    assert plan.kv is not None and plan.kv.block_size == 128
    assert plan.kv.blocks == 5 and plan.kv_bytes == 5 * 128 * 23040
    assert plan.cost == 1000 + 5 * 128 * 23040
    assert "(1 x 4 + 1 reserved) blocks" in plan.arithmetic() and "bfloat16" in plan.arithmetic()


async def test_float32_on_a_cpu_without_bf16_doubles_the_weights_and_the_cache(tmp_path: Path) -> None:
    spec = _spec(tmp_path, SMOLLM2_135M, "context: 700, parallel: 3")

    native = await plan_model("m", spec, gpu=False, flags=cpu_flags(CPUINFO_AVX512_BF16))
    emulated = await plan_model("m", spec, gpu=False, flags=cpu_flags(CPUINFO_AVX2_ONLY))

    assert native.dtype == "bfloat16" and emulated.dtype == "float32"
    assert emulated.weights_bytes == 2 * native.weights_bytes == 2000  # a bf16 checkpoint loaded in float32
    assert native.kv is not None and emulated.kv is not None
    assert native.kv.blocks == emulated.kv.blocks == 3 * 6 + 1
    assert emulated.kv_bytes == 2 * native.kv_bytes
    assert "float32" in emulated.arithmetic()


async def test_a_gemma3_lane_is_budgeted_by_its_layer_groups(tmp_path: Path) -> None:
    spec = _spec(tmp_path, GEMMA3_270M, "context: 700, parallel: 3")

    plan = await plan_model("m", spec, gpu=False, flags=cpu_flags(CPUINFO_AVX512_BF16))

    assert plan.kv is not None
    assert plan.kv.blocks == 3 * 41 + 1 and plan.kv.bytes_per_block == 3 * 128 * 1024


async def test_engine_options_that_change_the_blocks_are_followed(tmp_path: Path) -> None:
    spec = _spec(tmp_path, SMOLLM2_135M, "context: 512, parallel: 2, engine: {block_size: 32, kv_cache_dtype: float32}")

    plan = await plan_model("m", spec, gpu=False, flags=cpu_flags(CPUINFO_AVX512_BF16))

    assert plan.kv is not None and plan.kv.block_size == 32 and plan.kv.blocks == 2 * 16 + 1
    assert plan.kv.bytes_per_block == 32 * 46080  # a float32 cache beside bfloat16 weights
    assert plan.dtype == "bfloat16"


async def test_reserved_slots_are_extra_sequences_with_their_own_cache(tmp_path: Path) -> None:
    plain = await plan_model("m", _spec(tmp_path, SMOLLM2_135M, "context: 512, parallel: 16"),
                             gpu=False, flags=cpu_flags(CPUINFO_AVX512_BF16))
    reserved = await plan_model("m", _spec(tmp_path, SMOLLM2_135M, "context: 512, parallel: 16, reserved_slots: 2"),
                                gpu=False, flags=cpu_flags(CPUINFO_AVX512_BF16))

    assert (plain.parallel, reserved.parallel, reserved.reserved_slots) == (16, 18, 2)
    assert plain.kv is not None and reserved.kv is not None
    assert reserved.kv.blocks - plain.kv.blocks == 2 * 4  # two more sequences of 512 tokens, budgeted
    assert "(18 x 4 + 1 reserved) blocks" in reserved.arithmetic()


async def test_a_kv_cache_dtype_multilane_cannot_budget_is_a_spec_error(tmp_path: Path) -> None:
    spec = _spec(tmp_path, SMOLLM2_135M, "engine: {kv_cache_dtype: fp8_e5m2}")

    with pytest.raises(Exception, match=r"p\.yaml:2 models\.m\.engine\.kv_cache_dtype"):
        await plan_model("m", spec, gpu=False, flags=())
