"""Memory arithmetic of a lane: weights plus KV cache, from the checkpoint's own config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from multilane.errors import SourceError

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}


@dataclass(frozen=True)
class Footprint:
    """What a generate lane costs: its weights, and its KV cache per token of context."""

    weights_bytes: int
    kv_bytes_per_token: int

    def kv_bytes(self, parallel: int, context: int) -> int:
        """KV cache for `parallel` sequences of `context` tokens each."""
        return parallel * context * self.kv_bytes_per_token

    def total(self, parallel: int, context: int) -> int:
        """Weights plus KV cache."""
        return self.weights_bytes + self.kv_bytes(parallel, context)


def footprint(folder: Path, dtype: str = "auto") -> Footprint:
    """Read layers, KV heads and head size from config.json; weights are the safetensors' sizes."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    config = config.get("text_config", config)
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"{folder / 'config.json'} lacks the attention shape ({exc})") from exc
    dtype_bytes = _DTYPE_BYTES.get(dtype, 2)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) or sum(
        p.stat().st_size for p in folder.glob("*.bin"))
    return Footprint(weights_bytes=weights, kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes)
