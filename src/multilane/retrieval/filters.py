"""Which documents a search may return: a glob on the document's path and values of its front matter."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Scalar = str | int | float | bool

PATH_KEY = "path"


@dataclass(frozen=True)
class DocumentFilter:
    """Documents whose path matches one of `paths` (when given) and whose front matter has every field.

    A field matches when the document's value equals one of the wanted values, or, for a list value (such
    as `tags: [lighthouse, history]`), when the list holds one of them.
    """

    paths: tuple[str, ...] = ()
    fields: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> DocumentFilter:
        """Make a filter from a stage's `filter:` mapping (`path` a glob or list of globs, the rest fields)."""
        paths: tuple[str, ...] = ()
        fields: list[tuple[str, tuple[Scalar, ...]]] = []
        for key, value in spec.items():
            values = tuple(value) if isinstance(value, list | tuple) else (value,)
            if key == PATH_KEY:
                paths = tuple(str(pattern) for pattern in values)
            else:
                fields.append((key, values))
        return cls(paths=paths, fields=tuple(fields))

    def matches(self, path: str, meta: Mapping[str, Any]) -> bool:
        """Whether a document (its path and front matter) passes the filter."""
        if self.paths and not any(path_matches(path, pattern) for pattern in self.paths):
            return False
        return all(_field_matches(meta.get(name, _MISSING), wanted) for name, wanted in self.fields)


_MISSING = object()


def path_matches(path: str, pattern: str) -> bool:
    """Whether a glob matches a document path, or a trailing part of it that starts after a `/`.

    So `history/*` matches `../examples/data/history/puffins.md`; as in fnmatch, `*` also crosses folders.
    """
    wanted = pattern.replace("\\", "/").removeprefix("./")
    found = path.replace("\\", "/")
    parts = found.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[i:]), wanted) for i in range(len(parts)))


def _field_matches(value: Any, wanted: tuple[Scalar, ...]) -> bool:
    if value is _MISSING:
        return False
    if isinstance(value, list | tuple):
        return any(_same(item, choice) for item in value for choice in wanted)
    return any(_same(value, choice) for choice in wanted)


def _same(value: Any, wanted: Scalar) -> bool:
    """Equal values of the same kind: `true` is not 1, while 2 and 2.0 are the same number."""
    if isinstance(value, bool) or isinstance(wanted, bool):
        return isinstance(value, bool) and isinstance(wanted, bool) and value is wanted
    if isinstance(wanted, str) or isinstance(value, str):
        return isinstance(value, str) and isinstance(wanted, str) and value == wanted
    return bool(value == wanted)
