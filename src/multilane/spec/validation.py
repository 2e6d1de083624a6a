"""Validating a pipeline file with pydantic, and saying what its errors mean in the file's words and lines."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from multilane.errors import SpecError
from multilane.spec.models import (
    SOURCE_HINT,
    STAGE_CLASSES,
    STAGE_KINDS,
    AgentsSpec,
    BM25Spec,
    HybridWeights,
    IndexSpec,
    InputSpec,
    ModelSpec,
    PipelineSpec,
    RuntimeSpec,
    Spec,
    SpecFile,
)
from multilane.spec.yaml_lines import KeyPath, describe_value, dotted, read_yaml

__all__ = ["Problem", "combine_problems", "read_spec"]


def read_spec(text: str, name: str, base_dir: Path, path: Path | None = None) -> Spec:
    """Parse pipeline YAML and validate its shape with pydantic; cross-references are left to check_spec."""
    document = read_yaml(text, name)
    try:
        spec_file = SpecFile.model_validate(document.data)
    except ValidationError as exc:
        problems = [_from_pydantic(error, document.data, document.lines, name) for error in exc.errors()]
        raise combine_problems(_dedupe(problems)) from None
    return Spec(file=spec_file, base_dir=base_dir, path=path, name=name, lines=document.lines,
                literal_starts=document.literal_starts, digest=hashlib.sha256(text.encode()).hexdigest())


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pipeline file, at a key path and line."""

    message: str
    file: str
    line: int | None
    path: KeyPath

    def error(self) -> SpecError:
        """This problem as a SpecError naming file, line and field."""
        return SpecError(self.message, file=self.file, line=self.line, field=dotted(self.path) or None)


_PYDANTIC_LABEL = re.compile(r"^[a-z_-]+\[.*\]$|^(str|int|float|bool|list|dict|none|tuple)$")


def _clean_loc(loc: tuple[str | int, ...], data: Any) -> KeyPath:
    """Turn a pydantic error location into the YAML key path, dropping union tags and type labels."""
    path: list[str | int] = []
    current = data
    inside = True
    for i, entry in enumerate(loc):
        last = i == len(loc) - 1
        at_stage = len(path) == 4 and path[0] == "pipelines" and path[2] == "stages"
        if at_stage and isinstance(current, dict) and entry == current.get("kind") and entry in STAGE_KINDS:
            continue  # the discriminated union's tag
        if inside and isinstance(current, dict) and entry in current:
            path.append(entry)
            current = current[entry]
            continue
        if inside and isinstance(current, list) and isinstance(entry, int) and 0 <= entry < len(current):
            path.append(entry)
            current = current[entry]
            continue
        if last and isinstance(entry, str) and not _PYDANTIC_LABEL.match(entry) and entry != "[key]":
            path.append(entry)  # a key that is missing from the file
            inside = False
    return tuple(path)


def _allowed_keys(path: KeyPath, data: Any) -> list[str] | None:
    """Name the keys a mapping at path may have, from the model that reads it."""
    model: type[BaseModel] | None = None
    parent = path[:-1]
    if len(parent) == 0:
        model = SpecFile
    elif parent == ("runtime",):
        model = RuntimeSpec
    elif parent == ("agents",):
        model = AgentsSpec
    elif len(parent) == 2 and parent[0] == "models":
        model = ModelSpec
    elif len(parent) == 2 and parent[0] == "indexes":
        model = IndexSpec
    elif len(parent) == 3 and parent[0] == "indexes" and parent[2] == "bm25":
        model = BM25Spec
    elif len(parent) == 2 and parent[0] == "pipelines":
        model = PipelineSpec
    elif len(parent) == 4 and parent[0] == "pipelines" and parent[2] == "inputs":
        model = InputSpec
    elif len(parent) == 5 and parent[0] == "pipelines" and parent[2] == "stages" and parent[4] == "weights":
        model = HybridWeights
    elif len(parent) == 4 and parent[0] == "pipelines" and parent[2] == "stages":
        node = _get(data, parent)
        kind = node.get("kind") if isinstance(node, dict) else None
        model = STAGE_CLASSES.get(kind) if isinstance(kind, str) else None
    if model is None:
        return None
    fields = model.model_fields
    keys = [info.alias or name for name, info in fields.items()]
    if "kind" in keys:
        keys.remove("kind")
        keys.insert(0, "kind")
    return keys


def _get(data: Any, path: KeyPath) -> Any:
    for part in path:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _humanize(error: Mapping[str, Any], path: KeyPath, data: Any) -> tuple[str, KeyPath]:
    """Say what a pydantic error means for the file, possibly moving it to a more precise key."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    key = path[-1] if path else ""
    if kind == "extra_forbidden":
        allowed = _allowed_keys(path, data)
        listed = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key '{key}'{listed}", path
    if kind == "missing" and key == "source" and len(path) == 3 and path[0] == "models":
        return f"missing required key 'source' ({SOURCE_HINT})", path
    if kind == "missing":
        return f"missing required key '{key}'", path
    if kind == "union_tag_invalid":
        return (
            f"unknown stage kind '{ctx.get('tag')}' (kinds: {', '.join(STAGE_KINDS)})",
            (*path, "kind"),
        )
    if kind == "union_tag_not_found":
        return f"missing required key 'kind' (kinds: {', '.join(STAGE_KINDS)})", (*path, "kind")
    if kind == "literal_error":
        expected = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        if key == "kind" and len(path) == 3 and path[0] == "models":
            return f"unknown model kind {value!r} (kinds: {expected})", path
        if key == "type" and len(path) == 5 and path[2] == "inputs":
            return f"unknown input type {value!r} (types: {expected})", path
        return f"unknown {key} {value!r} (allowed: {expected})", path
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, got {describe_value(value)}", path
    if kind == "list_type":
        return f"expected a list, got {describe_value(value)}", path
    if kind == "string_type":
        return f"expected a string, got {describe_value(value)}", path
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected a whole number, got {describe_value(value)}", path
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {describe_value(value)}", path
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {describe_value(value)}", path
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind]} {limit}, got {value!r}", path
    if kind in ("too_short", "string_too_short"):
        if key == "models":
            return "declare at least one model", path
        if key == "stages":
            return "declare at least one stage", path
        return "must not be empty", path
    if kind == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        return message, path
    message = str(error["msg"])
    return message[:1].lower() + message[1:], path


def _from_pydantic(error: Mapping[str, Any], data: Any, lines: Mapping[KeyPath, int], name: str) -> Problem:
    loc = tuple(error["loc"])
    path = _clean_loc(loc, data)
    if loc and loc[-1] == "[key]":
        message = f"name {error.get('input')!r} must be a string"
    else:
        message, path = _humanize(error, path, data)
    return Problem(message, name, _nearest_line(lines, path), path)


def _nearest_line(lines: Mapping[KeyPath, int], path: KeyPath) -> int | None:
    key = path
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return lines.get(())


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[KeyPath] = set()
    kept: list[Problem] = []
    for problem in problems:
        if problem.path not in seen:
            seen.add(problem.path)
            kept.append(problem)
    return kept


def combine_problems(problems: list[Problem]) -> SpecError:
    """One SpecError for the first problem by line, listing the rest below it."""
    ordered = sorted(problems, key=lambda p: p.line if p.line is not None else 0)
    first = ordered[0]
    if len(ordered) == 1:
        return first.error()
    rest = ordered[1:]
    noun = "error" if len(rest) == 1 else "errors"
    listing = "\n".join(f"  {p.error()}" for p in rest)
    return SpecError(
        f"{first.message} (and {len(rest)} more {noun})\n{listing}",
        file=first.file,
        line=first.line,
        field=dotted(first.path) or None,
    )


