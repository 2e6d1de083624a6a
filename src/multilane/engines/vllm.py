"""Generate engine on vLLM's AsyncLLM: one in-process engine per lane, continuous batching inside."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import inspect
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import psutil
import structlog

from multilane.engines.base import Chunk, Message, SamplingOptions
from multilane.errors import EngineDeadError, EngineError
from multilane.memory import RESERVED_BLOCKS, KVPlan, format_bytes

log = structlog.get_logger(__name__)

# Engine options a pipeline may not set through `engine:`, because Multilane derives them.
_OWNED_OPTIONS = frozenset({"model", "max_model_len", "max_num_seqs", "kv_cache_memory_bytes", "dtype"})


_ipc_folder: str | None = None  # "" once the temp folder proved too deep for one
_SOCKET_PATH_MAX = 107  # bytes in a unix socket's path (sockaddr_un.sun_path, less its NUL)
_SOCKET_NAME = 36  # vLLM names each socket after a uuid4


def private_ipc_folder() -> str:
    """Where vLLM's engines of this process put their ZeroMQ sockets: one folder, removed when the process exits.

    vLLM names each socket after a fresh uuid in VLLM_RPC_BASE_PATH, the system temp folder by default, and leaves
    several behind per engine start (all of them when a core is killed). A user's own VLLM_RPC_BASE_PATH wins, and
    so does vLLM's default where the extra folder would make a socket's path longer than the OS allows.
    """
    global _ipc_folder
    if "VLLM_RPC_BASE_PATH" in os.environ:
        return os.environ["VLLM_RPC_BASE_PATH"]
    if _ipc_folder is None:
        folder = tempfile.mkdtemp(prefix="multilane-vllm-")
        if len(os.fsencode(folder)) + 1 + _SOCKET_NAME > _SOCKET_PATH_MAX:
            os.rmdir(folder)
            _ipc_folder = ""
        else:
            _ipc_folder = folder
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if not _ipc_folder:
        return tempfile.gettempdir()
    os.environ["VLLM_RPC_BASE_PATH"] = _ipc_folder  # the engine core and its workers inherit it
    return _ipc_folder


def _quiet_vllm(options: dict[str, Any]) -> None:
    """Keep vLLM's start-up out of the user's terminal unless asked for (multilane.logs sets the rest)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # "Loading safetensors checkpoint shards" bars: an engine argument, not a variable; on with vLLM's info logs.
    options.setdefault("use_tqdm_on_load", os.environ["VLLM_LOGGING_LEVEL"].upper() in ("DEBUG", "INFO"))


@dataclass
class EngineStats:
    """What vLLM's scheduler reported for one engine, updated at every step it logs."""

    preemptions: int = 0  # sequences evicted from the KV cache mid-run (to be recomputed later)
    running: int = 0  # sequences decoding at the last step
    waiting: int = 0  # sequences waiting inside vLLM at the last step
    max_running: int = 0  # the most sequences decoding at one step
    steps: int = 0


@dataclass(frozen=True)
class KVCapacity:
    """vLLM's own figures for a loaded engine's KV cache."""

    blocks: int  # num_gpu_blocks (on the CPU too), the reserved ones included
    block_size: int  # tokens per block
    blocks_per_sequence: int  # what one sequence of the full context takes, every layer group together
    reserved_blocks: int = RESERVED_BLOCKS

    @property
    def sequences(self) -> int:
        """Full-context sequences the cache holds at once."""
        return max(0, self.blocks - self.reserved_blocks) // max(1, self.blocks_per_sequence)


def check_capacity(model: str, capacity: KVCapacity, *, parallel: int, context: int,
                   planned: KVPlan | None = None) -> None:
    """Refuse a loaded engine whose KV cache cannot hold `parallel` sequences of `context` tokens at once."""
    if capacity.sequences >= parallel:
        return
    plan = (f"; Multilane planned {planned.blocks} blocks ({planned.arithmetic()})" if planned is not None else "")
    fits = capacity.sequences
    raise EngineError(
        f"model '{model}': vLLM's KV cache holds {fits} sequence{'s' if fits != 1 else ''} of {context} tokens at "
        f"once ({capacity.blocks} blocks of {capacity.block_size} tokens, {capacity.reserved_blocks} reserved, "
        f"{capacity.blocks_per_sequence} per sequence), fewer than its parallel: {parallel}, so calls would be "
        f"preempted{plan}. Lower the model's parallel to {max(1, fits)} or its context, or report this: the plan "
        "should have matched vLLM")


def read_capacity(llm: Any, *, context: int, planned: KVPlan | None) -> KVCapacity | None:
    """vLLM's figures, synced to the client after the engine core's handshake."""
    cache = llm.vllm_config.cache_config
    blocks = int(getattr(cache, "num_gpu_blocks", 0) or 0)
    block_size = int(getattr(cache, "block_size", 0) or 0)
    if not blocks or not block_size:
        return None
    concurrency = getattr(cache, "kv_cache_max_concurrency", None)
    if concurrency:  # vLLM's max concurrency is blocks / blocks per full-context sequence
        per_sequence = round(blocks / float(concurrency))
    elif planned is not None and planned.block_size == block_size:
        per_sequence = planned.blocks_per_sequence
    else:
        per_sequence = -(-context // block_size)
    return KVCapacity(blocks=blocks, block_size=block_size, blocks_per_sequence=per_sequence)


def _stats_logger(stats: EngineStats) -> Any:
    """A vLLM stat logger factory that keeps an engine's scheduler figures in `stats`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):  # type: ignore[misc]  # vllm is untyped here
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                stats.steps += 1
                stats.running = int(scheduler_stats.num_running_reqs)
                stats.waiting = int(scheduler_stats.num_waiting_reqs)
                stats.max_running = max(stats.max_running, stats.running)
            if iteration_stats is not None:
                stats.preemptions += int(getattr(iteration_stats, "num_preempted_reqs", 0))

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


def load_error(model: str, path: str, exc: Exception, *, context: int, parallel: int, dtype: str,
                  kv: KVPlan | None) -> EngineError:
    """A load error that names the model, its numbers and what to change, whatever vLLM said."""
    cause = str(exc)
    if "Engine core initialization failed" in cause:  # the reason was only logged by the child process
        cause = "its engine process failed while starting (vLLM logged the reason on stderr)"
    cache = f"a KV cache of {kv.arithmetic()}" if kv is not None else "vLLM's default KV cache"
    free = format_bytes(psutil.virtual_memory().available)
    return EngineError(
        f"vLLM could not load model '{model}' ({path}): {cause}. It was asked for context {context}, parallel "
        f"{parallel}, dtype {dtype} and {cache}; {free} of RAM is available now. Lower the model's parallel or "
        "context, free memory or lower runtime.memory_budget, or check the model's engine options")


def _import_vllm() -> tuple[Any, Any, Any]:
    """vLLM's engine classes, imported in a worker thread.

    Importing vLLM takes seconds, and it keeps tracebacks of the optional imports it tried, whose frames
    reach back to the importer's: imported from `load`, they kept the first engine alive after its close,
    until its `__del__` failed at interpreter exit ("'NoneType' object is not callable").
    """
    from vllm import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncEngineArgs, current_platform, AsyncLLM


def structured_outputs_config(given: Any) -> Any:
    """vLLM's structured-output settings from `engine: {structured_outputs_config: {...}}`, or vLLM's defaults.

    vLLM 0.32 reads `disable_any_whitespace` from this engine config only (a request's own flag is ignored) and
    takes it only with a named backend: `{backend: xgrammar, disable_any_whitespace: true}` gives compact JSON.
    It is not the default: a tool call takes a third fewer tokens, but SmolLM2-135M then ran away inside an
    integer in the agent tests (`"day":1000000...` to max_tokens), which it never did with whitespace allowed.
    """
    from vllm.config import StructuredOutputsConfig

    if isinstance(given, StructuredOutputsConfig):
        return given
    return StructuredOutputsConfig(**(given or {}))


class VLLMEngine:
    """A loaded vLLM model; concurrent `stream` calls are merged by vLLM's continuous batching."""

    def __init__(self, llm: Any, *, identity: str, context: int, device: str, dtype: str | None = None,
                 stats: EngineStats | None = None, capacity: KVCapacity | None = None) -> None:
        self._llm = llm
        self._tokenizer = llm.get_tokenizer()
        self.identity = identity
        self.context = context
        self.device = device
        self.dtype = dtype
        self.stats = stats or EngineStats()  # the scheduler's figures: preemptions, sequences running
        self.capacity = capacity  # vLLM's own KV cache figures
        config = getattr(llm, "vllm_config", None)
        # Automatic prefix caching: full KV blocks of earlier prompts are reused by prompts that start the same.
        self.prefix_caching = bool(getattr(getattr(config, "cache_config", None), "enable_prefix_caching", False))
        # Under the priority policy vLLM orders its own waiting requests by each request's priority.
        self.priority_policy = str(getattr(getattr(config, "scheduler_config", None), "policy", "fcfs")) == "priority"
        self._closed = False

    @classmethod
    async def load(cls, path: str, *, identity: str, context: int, parallel: int, dtype: str = "auto",
                   kv: KVPlan | None = None, options: Mapping[str, Any] | None = None,
                   model: str | None = None) -> VLLMEngine:
        """Start an engine for a prepared checkpoint folder (the engine core runs in a child process).

        With a KV plan, vLLM gets exactly that cache; once loaded, its own figures must hold `parallel`
        sequences of `context` tokens, or the engine is closed and the load fails with the numbers.
        """
        name = model or path
        options = dict(options or {})
        _quiet_vllm(options)
        private_ipc_folder()
        owned = sorted(_OWNED_OPTIONS & options.keys())
        if owned:
            raise EngineError(f"model '{name}': engine option(s) {', '.join(owned)} are set by Multilane from the "
                              "model's context, parallel and dtype; remove them from `engine:`")
        AsyncEngineArgs, current_platform, AsyncLLM = await anyio.to_thread.run_sync(_import_vllm)
        device = str(current_platform.device_type)
        if device == "cpu":
            options.setdefault("enforce_eager", True)  # CUDA graphs and torch.compile only cost time here
        # The lane queue orders calls by priority; vLLM's priority policy keeps its own waiting requests in the
        # same order. Prefix caching is vLLM's default (on the CPU too); `engine: {enable_prefix_caching: false}`
        # turns it off.
        options.setdefault("scheduling_policy", "priority")
        stats = EngineStats()
        log.info("loading vllm engine", model=name, path=path, context=context, parallel=parallel, dtype=dtype,
                 kv=kv.arithmetic() if kv is not None else None, device=device)
        # Built in a worker thread so that other lanes keep serving during the load; AsyncLLM starts
        # its output handler lazily on the event loop at the first request.
        # The box keeps the worker thread from holding the engine after we close it.
        box: list[Any] = []

        def build() -> None:
            options["structured_outputs_config"] = structured_outputs_config(options.get("structured_outputs_config"))
            args = AsyncEngineArgs(model=path, max_model_len=context, max_num_seqs=parallel,
                                   dtype=dtype,  # type: ignore[arg-type]  # one of the spec's checked literals
                                   kv_cache_memory_bytes=kv.bytes if kv is not None else None,
                                   disable_log_stats=True, **options)
            box.append(AsyncLLM.from_engine_args(args, stat_loggers=[_stats_logger(stats)]))

        try:
            await anyio.to_thread.run_sync(build)
        except Exception as exc:
            raise load_error(name, path, exc, context=context, parallel=parallel, dtype=dtype, kv=kv) from exc
        # No local of this frame may hold the AsyncLLM: vLLM's lazy imports above keep a traceback that holds
        # this frame, locals and all, until the interpreter exits, and the engine would only be freed then,
        # when its __del__ fails (a traceback in the log at every exit).
        engine = cls._wrap(box.pop(), identity=identity, context=context, device=device, stats=stats, planned=kv)
        try:
            if engine.capacity is not None:
                check_capacity(name, engine.capacity, parallel=parallel, context=context, planned=kv)
            # vLLM asks its engine core for the supported tasks at the first request, and a core that died
            # before then never answers: that first call would wait for ever. Ask now, while it is alive.
            await engine._llm.get_supported_tasks()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await engine.close()
            raise
        return engine

    @classmethod
    def _wrap(cls, llm: Any, *, identity: str, context: int, device: str, stats: EngineStats,
              planned: KVPlan | None) -> VLLMEngine:
        return cls(llm, identity=identity, context=context, device=device,
                   dtype=str(llm.vllm_config.model_config.dtype).removeprefix("torch."), stats=stats,
                   capacity=read_capacity(llm, context=context, planned=planned))

    def render(self, messages: Sequence[Message]) -> str:
        """Apply the model's chat template; a model without one gets plain role-prefixed turns."""
        if getattr(self._tokenizer, "chat_template", None):
            return str(self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                           tokenize=False))
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(turns) + "\n\nAssistant:"

    def encode(self, prompt: str) -> list[int]:
        """Tokenize a rendered prompt; the chat template already holds the special tokens it needs."""
        ids = self._tokenizer.encode(prompt, add_special_tokens=False)
        bos = getattr(self._tokenizer, "bos_token_id", None)
        if bos is not None and (not ids or ids[0] != bos) and not getattr(self._tokenizer, "chat_template", None):
            ids = [bos, *ids]
        return list(ids)

    def unfinished_requests(self) -> int:
        """Requests vLLM holds now."""
        return int(self._llm.get_num_unfinished_requests())

    async def stream(self, prompt_ids: Sequence[int], options: SamplingOptions, request_id: str, *,
                     priority: int = 0) -> AsyncIterator[Chunk]:
        """Stream new text as vLLM produces it; leaving early (cancel, close) aborts the request.

        Each chunk carries how many prompt tokens vLLM took from its prefix cache (known once the prompt is read).
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        params = SamplingParams(
            max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
            stop=list(options.stop) or None, ignore_eos=options.ignore_eos, seed=options.seed,
            output_kind=RequestOutputKind.DELTA,
            # Whitespace in JSON is the engine config's to allow (structured_outputs_config), not the request's.
            structured_outputs=(StructuredOutputsParams(json=options.json_schema)
                                if options.json_schema is not None else None),
        )
        finished = False
        try:
            async for out in self._llm.generate({"prompt_token_ids": list(prompt_ids)}, params, request_id,
                                                priority=priority if self.priority_policy else 0):
                piece = out.outputs[0]
                finished = out.finished
                yield Chunk(piece.text, len(piece.token_ids),
                            finish_reason=piece.finish_reason if finished else None,
                            cached_tokens=int(out.num_cached_tokens or 0))
        except Exception as exc:
            if getattr(self._llm, "errored", False):
                raise _engine_error(_Dead()) from exc
            raise _engine_error(exc) from exc
        finally:
            if not finished and not self._closed and not getattr(self._llm, "errored", True):
                # vLLM aborts on cancel, but not when the consumer merely stops iterating; be sure.
                with anyio.CancelScope(shield=True):
                    await self._llm.abort(request_id)

    async def close(self) -> None:
        """Shut the engine core down and wait for its process to exit."""
        if self._closed:
            return
        self._closed = True
        box = [self._llm]  # the worker thread must not keep the engine alive after shutdown
        self._llm = None
        with anyio.CancelScope(shield=True):
            handler = getattr(box[0], "output_handler", None)
            if handler is not None and not handler.done():
                # Stop reading outputs before the core goes, or the handler logs the core's exit as a death.
                handler.cancel()
                await asyncio.wait([handler])
            processes = _engine_processes(box[0])
            await anyio.to_thread.run_sync(lambda: _shutdown(box.pop()))
            await anyio.to_thread.run_sync(_wait_gone, processes)
        gc.collect()  # run AsyncLLM.__del__ now, not at interpreter exit when its globals are gone


# vLLM gives its engine core 5 s to exit before it kills the process tree, which a busy CPU overruns (the core
# waits for its workers, then tears down); a killed core leaves its shared memory to the resource tracker, which
# warns about "leaked shared_memory objects" when the program exits. A clean exit takes what it takes.
_SHUTDOWN_SECONDS = 60.0


def _shutdown(llm: Any) -> None:
    if "timeout" in inspect.signature(llm.shutdown).parameters:  # older vLLM releases take no timeout
        llm.shutdown(timeout=_SHUTDOWN_SECONDS)
    else:
        llm.shutdown()


def _engine_processes(llm: Any) -> list[psutil.Process]:
    """The engine-core processes of an AsyncLLM and their workers (vLLM's process manager lists the cores)."""
    manager = getattr(getattr(getattr(llm, "engine_core", None), "resources", None), "engine_manager", None)
    found: list[psutil.Process] = []
    for proc in getattr(manager, "processes", None) or []:
        try:
            core = psutil.Process(proc.pid)
            found += [core, *core.children(recursive=True)]
        except (psutil.Error, TypeError, ValueError):
            continue
    return found


def _wait_gone(processes: list[psutil.Process], timeout: float = 10.0) -> None:
    """Wait until processes have exited; kill what is left after `timeout` (vLLM gives its core 5 s, then kills it)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


class _Dead(Exception):
    """Stands for vLLM's EngineDeadError when the engine reports itself errored."""


def _engine_error(exc: Exception) -> Exception:
    """Turn vLLM's exceptions into Multilane errors that say what happened."""
    if type(exc).__name__ in ("EngineDeadError", "_Dead"):
        return EngineDeadError("the vLLM engine died (its process exited); the lane is dropped and reloads "
                               "on the next call")
    if isinstance(exc, ValueError):
        return EngineError(f"vLLM rejected the request: {exc}")
    cause = exc.__cause__ or exc
    return EngineError(f"vLLM failed: {type(cause).__name__}: {cause}")
