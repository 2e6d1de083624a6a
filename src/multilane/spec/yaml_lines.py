"""The YAML of a pipeline file, read with the line of every key so that errors can name file and line."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from multilane.errors import SpecError

__all__ = ["KeyPath", "YamlDocument", "describe_value", "dotted", "read_spec_file", "read_yaml"]

KeyPath = tuple[str | int, ...]
"""Where a value sits in the file: ("pipelines", "ask", "stages", "answer", "stop", 1)."""


def describe_value(value: Any) -> str:
    """Name a YAML value's type for a message: "a list", "the number 3"."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def read_spec_file(path: str | os.PathLike[str]) -> str:
    """Read a pipeline file's text; raises SpecError naming the file when it cannot be read."""
    shown = os.fspath(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("pipeline file not found", file=shown) from None
    except IsADirectoryError:
        raise SpecError("is a folder, not a pipeline file", file=shown) from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=shown) from None
    except OSError as exc:
        raise SpecError(f"cannot read the file: {exc.strerror or exc}", file=shown) from None


@dataclass(frozen=True)
class YamlDocument:
    """A pipeline file's YAML: its data, the line of every key path, and where literal blocks (`|`) start."""

    data: dict[str, Any]
    lines: dict[KeyPath, int]
    literal_starts: dict[KeyPath, int]


def read_yaml(text: str, name: str) -> YamlDocument:
    """Parse YAML (safe tags only, no duplicate keys) recording lines; raises SpecError naming file and line."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                raise SpecError(
                    "the file is empty; a pipeline file declares at least 'models:'", file=name, line=1
                )
            lines: dict[KeyPath, int] = {(): node.start_mark.line + 1}
            literal_starts: dict[KeyPath, int] = {}
            _walk_node(loader, node, (), lines, literal_starts, name, set())
            data = loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "unreadable YAML"
            context = f" ({exc.context})" if exc.context and exc.problem else ""
            raise SpecError(
                f"invalid YAML: {problem}{context}", file=name, line=mark.line + 1 if mark else None
            ) from None
        except yaml.YAMLError as exc:
            raise SpecError(f"invalid YAML: {exc}", file=name) from None
    finally:
        loader.dispose()
    if data is None:
        raise SpecError("the file is empty; a pipeline file declares at least 'models:'", file=name, line=1)
    if not isinstance(data, dict):
        raise SpecError(
            f"expected a mapping at the top (models, runtime, indexes, pipelines), got {describe_value(data)}",
            file=name,
            line=lines[()],
        )
    return YamlDocument(data, lines, literal_starts)


def _walk_node(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: KeyPath,
    lines: dict[KeyPath, int],
    literal_starts: dict[KeyPath, int],
    name: str,
    stack: set[int],
) -> None:
    """Record the line of every key under node, and refuse duplicate keys."""
    if id(node) in stack:
        return
    stack.add(id(node))
    try:
        if isinstance(node, yaml.ScalarNode):
            if node.style == "|":
                literal_starts[path] = node.start_mark.line + 2
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                _walk_node(loader, item, (*path, i), lines, literal_starts, name, stack)
        elif isinstance(node, yaml.MappingNode):
            merged = [v for k, v in node.value if k.tag == "tag:yaml.org,2002:merge"]
            for source in merged:
                for part in source.value if isinstance(source, yaml.SequenceNode) else [source]:
                    if isinstance(part, yaml.MappingNode):
                        _walk_node(loader, part, path, lines, literal_starts, name, stack)
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key: Any = key_node.value
                if isinstance(key_node, yaml.ScalarNode):
                    key = loader.construct_object(key_node)
                try:
                    hash(key)
                except TypeError:
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise SpecError(
                        f"duplicate key '{key}' (first written on line {seen[key]})",
                        file=name,
                        line=line,
                        field=dotted((*path, key)),
                    )
                seen[key] = line
                lines[(*path, key)] = line
                _walk_node(loader, value_node, (*path, key), lines, literal_starts, name, stack)
    finally:
        stack.discard(id(node))


def dotted(path: Iterable[str | int]) -> str:
    """Write a key path the way messages show it: pipelines.ask.stages.answer.stop[1]."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


