"""Generate engine on vLLM's AsyncLLM: one in-process engine per lane, continuous batching inside."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import structlog

from multilane.engines.base import Chunk, Message, SamplingOptions
from multilane.errors import EngineDeadError, EngineError

log = structlog.get_logger(__name__)

# Engine options a pipeline may not set through `engine:`, because Multilane derives them.
_OWNED_OPTIONS = frozenset({"model", "max_model_len", "max_num_seqs", "kv_cache_memory_bytes", "dtype"})


def _quiet_vllm(options: dict[str, Any]) -> None:
    """Keep vLLM's start-up out of the user's terminal unless asked for (multilane.logs sets the rest)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # "Loading safetensors checkpoint shards" bars: an engine argument, not a variable; on with vLLM's info logs.
    options.setdefault("use_tqdm_on_load", os.environ["VLLM_LOGGING_LEVEL"].upper() in ("DEBUG", "INFO"))


class VLLMEngine:
    """A loaded vLLM model; concurrent `stream` calls are merged by vLLM's continuous batching."""

    def __init__(self, llm: Any, *, identity: str, context: int, device: str) -> None:
        self._llm = llm
        self._tokenizer = llm.get_tokenizer()
        self.identity = identity
        self.context = context
        self.device = device
        self._closed = False

    @classmethod
    async def load(cls, path: str, *, identity: str, context: int, parallel: int, dtype: str = "auto",
                   kv_cache_bytes: int | None = None,
                   options: Mapping[str, Any] | None = None) -> VLLMEngine:
        """Start an engine for a prepared checkpoint folder (the engine core runs in a child process)."""
        options = dict(options or {})
        _quiet_vllm(options)
        owned = sorted(_OWNED_OPTIONS & options.keys())
        if owned:
            raise EngineError(f"engine option(s) {', '.join(owned)} are set by Multilane from the model's "
                              "context, parallel and dtype; remove them from `engine:`")
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        device = str(current_platform.device_type)
        if device == "cpu":
            options.setdefault("enforce_eager", True)  # CUDA graphs and torch.compile only cost time here
        args = AsyncEngineArgs(model=path, max_model_len=context, max_num_seqs=parallel,
                               dtype=dtype,  # type: ignore[arg-type]  # one of the spec's checked literals
                               kv_cache_memory_bytes=kv_cache_bytes,
                               disable_log_stats=True, **options)
        log.info("loading vllm engine", path=path, context=context, parallel=parallel, device=device)
        try:
            # Built in a worker thread so that other lanes keep serving during the load; AsyncLLM starts
            # its output handler lazily on the event loop at the first request.
            # The box keeps the worker thread from holding the engine after we close it.
            box: list[Any] = []
            await anyio.to_thread.run_sync(lambda: box.append(AsyncLLM.from_engine_args(args)))
        except Exception as exc:
            raise EngineError(f"vLLM could not load {path}: {exc}") from exc
        return cls(box.pop(), identity=identity, context=context, device=device)

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

    async def stream(self, prompt_ids: Sequence[int], options: SamplingOptions,
                     request_id: str) -> AsyncIterator[Chunk]:
        """Stream new text as vLLM produces it; leaving early (cancel, close) aborts the request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        params = SamplingParams(
            max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
            stop=list(options.stop) or None, ignore_eos=options.ignore_eos, seed=options.seed,
            output_kind=RequestOutputKind.DELTA,
            # Compact JSON: a small model otherwise spends its tokens on the whitespace the grammar allows.
            structured_outputs=(StructuredOutputsParams(json=options.json_schema, disable_any_whitespace=True)
                                if options.json_schema is not None else None),
        )
        finished = False
        try:
            async for out in self._llm.generate({"prompt_token_ids": list(prompt_ids)}, params, request_id):
                piece = out.outputs[0]
                finished = out.finished
                yield Chunk(piece.text, len(piece.token_ids),
                            finish_reason=piece.finish_reason if finished else None)
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
            await anyio.to_thread.run_sync(lambda: _shutdown(box.pop()))
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
