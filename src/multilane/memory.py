"""Memory arithmetic of a lane: weights plus the KV cache vLLM allocates, read from the checkpoint's own config.

vLLM keeps the KV cache in blocks of `block_size` tokens. A sequence takes whole blocks in every group of
layers (full-attention layers hold the whole context, sliding-window layers their window plus one block),
and the block pool keeps one block to itself (its null block). So a lane that must hold `parallel`
full-context sequences needs `parallel x blocks per sequence + 1` blocks, not `parallel x context` tokens.
The grouping below follows vLLM 0.32's `kv_cache_utils` (uniform page size); after a load the engine's own
figures are checked against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from multilane.errors import SourceError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
RESERVED_BLOCKS = 1  # vLLM's BlockPool holds one block back for good (the null block)
DEFAULT_MAX_BATCHED_TOKENS = 2048  # vLLM's max_num_batched_tokens for an engine built from AsyncEngineArgs


def format_bytes(n: float) -> str:
    """Bytes in binary units: 23.0 KiB, 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ModelShape:
    """A checkpoint's attention, from its config.json: KV heads, head size and each layer's window."""

    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]  # one per layer: None for full attention, else its sliding window in tokens
    config_dtype: str | None = None  # the dtype the checkpoint was saved in (torch_dtype)
    max_positions: int | None = None  # max_position_embeddings: the longest context the model knows
    quantized: bool = False  # weights stored quantized: their size does not follow the compute dtype

    @property
    def layers(self) -> int:
        """Attention layers (each holds K and V for every token it keeps)."""
        return len(self.windows)

    def layer_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in every layer: `2 x layers x kv_heads x head_dim x dtype_bytes`."""
        return self.layers * self.layer_bytes_per_token(dtype_bytes)


def read_shape(folder: Path) -> ModelShape:
    """Read layers, KV heads, head size and sliding windows from a checkpoint folder's config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    outer = config
    config = config.get("text_config", config)
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"{folder / 'config.json'} lacks the attention shape ({exc})") from exc
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if window and isinstance(types, list) and len(types) == layers:
        windows = tuple(int(window) if kind == "sliding_attention" else None for kind in types)
    elif window and config.get("use_sliding_window", True) and "layer_types" not in config:
        windows = (int(window),) * layers  # every layer slides (Mistral-style)
    else:
        windows = (None,) * layers
    dtype = config.get("torch_dtype") or config.get("dtype") or outer.get("torch_dtype")
    positions = config.get("max_position_embeddings")
    return ModelShape(kv_heads=kv_heads, head_dim=head_dim, windows=windows,
                      config_dtype=str(dtype) if dtype else None,
                      max_positions=int(positions) if positions else None,
                      quantized=bool(config.get("quantization_config") or outer.get("quantization_config")))


def weights_bytes(folder: Path) -> int:
    """The size of a checkpoint's weights: its safetensors files, else its .bin files."""
    safetensors = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    return safetensors or sum(p.stat().st_size for p in folder.rglob("*.bin"))


@dataclass(frozen=True)
class KVPlan:
    """A lane's KV cache in the engine's blocks: `parallel` sequences of `context` tokens, plus reserved blocks."""

    parallel: int
    context: int
    block_size: int  # tokens per block
    bytes_per_block: int
    blocks_per_sequence: int
    reserved_blocks: int = 0
    dtype: str | None = None

    @classmethod
    def per_token(cls, parallel: int, context: int, bytes_per_token: int) -> KVPlan:
        """A cache counted token by token (blocks of one token, nothing reserved), for engines without blocks."""
        return cls(parallel=parallel, context=context, block_size=1, bytes_per_block=bytes_per_token,
                   blocks_per_sequence=context)

    @property
    def blocks(self) -> int:
        """Every block the engine gets: `parallel x blocks_per_sequence + reserved_blocks`."""
        return self.parallel * self.blocks_per_sequence + self.reserved_blocks

    @property
    def bytes(self) -> int:
        """The KV cache handed to the engine."""
        return self.blocks * self.bytes_per_block

    def arithmetic(self) -> str:
        """The cache spelled out, for ps and error messages."""
        if self.block_size == 1 and not self.reserved_blocks:
            return f"KV {self.parallel} x {self.context} x {self.bytes_per_block} B = {format_bytes(self.bytes)}"
        reserved = f" + {self.reserved_blocks} reserved" if self.reserved_blocks else ""
        dtype = f", {self.dtype}" if self.dtype else ""
        return (f"KV ({self.parallel} x {self.blocks_per_sequence}{reserved}) blocks x "
                f"{format_bytes(self.bytes_per_block)} = {format_bytes(self.bytes)} (a sequence of "
                f"{self.context} tokens takes {self.blocks_per_sequence} blocks of {self.block_size} tokens{dtype})")


def _group_layers(windows: tuple[int | None, ...]) -> list[tuple[int | None, int]]:
    """vLLM's KV cache groups as (window, layers in the group): one group when every layer is alike.

    Otherwise each attention type is split into groups of the smallest type's layer count (or of the
    largest, when the counts are close), as `_get_kv_cache_groups_uniform_page_size` does.
    """
    buckets: dict[int | None, int] = {}
    for window in windows:
        buckets[window] = buckets.get(window, 0) + 1
    if len(buckets) == 1:
        ((window, count),) = buckets.items()
        return [(window, count)]
    smallest, largest = min(buckets.values()), max(buckets.values())
    size = largest if largest < smallest * 1.5 else smallest
    groups: list[tuple[int | None, int]] = []
    for window, count in buckets.items():
        n = _cdiv(count, size)
        groups.extend((window, len(range(i, count, n))) for i in range(n))
    return groups


def vllm_kv_plan(shape: ModelShape, *, parallel: int, context: int, dtype: str, block_size: int,
                 max_batched_tokens: int | None = None, hybrid: bool = True, shards: int = 1) -> KVPlan:
    """The KV cache vLLM needs to hold `parallel` sequences of `context` tokens at once, in its own blocks.

    `max_batched_tokens` is vLLM's max_num_batched_tokens (sliding-window layers keep that many tokens
    in flight beyond their window); `hybrid=False` is vLLM's disable_hybrid_kv_cache_manager, which gives
    every layer the whole context. With tensor or pipeline parallelism each of `shards` GPUs holds its share.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown KV cache dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
    in_flight = max_batched_tokens or min(parallel * context, DEFAULT_MAX_BATCHED_TOKENS)
    windows = shape.windows if hybrid else (None,) * shape.layers
    page = block_size * shape.layer_bytes_per_token(DTYPE_BYTES[dtype])
    groups = _group_layers(windows)
    per_sequence = 0
    for window, _layers in groups:
        if window is None:
            per_sequence += _cdiv(context, block_size)
        else:  # the window, the tokens in flight, and one block for a window that straddles two
            per_sequence += _cdiv(min(window - 1 + in_flight, context), block_size) + 1
    bytes_per_block = max(layers for _window, layers in groups) * page
    return KVPlan(parallel=parallel, context=context, block_size=block_size,
                  bytes_per_block=_cdiv(bytes_per_block, shards), blocks_per_sequence=per_sequence,
                  reserved_blocks=RESERVED_BLOCKS, dtype=dtype)
