"""A generate lane's memory arithmetic, read from its checkpoint's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multilane import SourceError
from multilane.memory import footprint

SMOLLM2_135M = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
}


def test_kv_bytes_per_token_of_smollm2_in_bf16_is_23040(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4096)

    found = footprint(tmp_path, "bfloat16")

    assert found.kv_bytes_per_token == 23040
    assert found.weights_bytes == 4096
    assert found.kv_bytes(parallel=2, context=100) == 2 * 100 * 23040
    assert found.total(parallel=1, context=10) == 4096 + 230400


def test_a_folder_without_config_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"config\.json"):
        footprint(tmp_path)


def test_a_config_without_layer_count_is_a_source_error(tmp_path: Path) -> None:
    config = {k: v for k, v in SMOLLM2_135M.items() if k != "num_hidden_layers"}
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(SourceError, match="num_hidden_layers"):
        footprint(tmp_path)
