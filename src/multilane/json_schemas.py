"""JSON schemas users give (a `tool_call` stage's schema, a request's response format or tool parameters),
checked before anything is generated: a schema that breaks later would fail only after the model ran."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeGuard

import jsonschema  # type: ignore[import-untyped]
import referencing
import referencing.jsonschema
from referencing.exceptions import Unresolvable

__all__ = ["SchemaPath", "SchemaProblem", "embed_at", "schema_problem"]

SchemaPath = tuple[str | int, ...]

# Keys whose values are data, not schemas: their `$ref` keys or mappings are never references.
_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})
_BOUNDS = (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
           ("minProperties", "maxProperties"), ("minContains", "maxContains"))


@dataclass(frozen=True)
class SchemaProblem:
    """Why a JSON schema cannot be used, and where in the schema (a path of keys and indexes)."""

    message: str
    path: SchemaPath = ()

    @property
    def where(self) -> str:
        """The path as `properties/city/type`, or `(root)`."""
        return "/".join(str(part) for part in self.path) or "(root)"


def schema_problem(schema: Any) -> SchemaProblem | None:
    """The first reason a JSON schema cannot constrain output, or None when it can.

    Checked: the schema against its draft's metaschema (keywords, types, regex syntax), every `$ref`
    resolving within the schema (a remote one is never fetched), and constraints no value can meet
    (`enum: []`, a minimum above its maximum, a required property that may not exist), which structured
    output backends such as vLLM's refuse.
    """
    if not isinstance(schema, dict):
        return SchemaProblem(f"a JSON schema is an object, got {type(schema).__name__}")
    validator = jsonschema.validators.validator_for(schema)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return SchemaProblem(exc.message, tuple(exc.path))
    return _reference_problem(schema) or next(_contradictions(schema, ()), None)


def embed_at(schema: dict[str, Any], pointer: str) -> dict[str, Any]:
    """A schema to be placed at `pointer` (like "/anyOf/1/properties/arguments") inside another one, its local
    `$ref`s ("#/$defs/Unit") rewritten to point where their targets will be; one with its own `$id` is kept."""
    if "$id" in schema:
        return schema

    def rebase(node: Any) -> Any:
        if isinstance(node, list):
            return [rebase(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: value if key in _DATA_KEYS else rebase(value) for key, value in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = "#" + pointer + ref[1:]
        return out

    rebased: dict[str, Any] = rebase(schema)
    return rebased


def _subschemas(node: Any, path: SchemaPath) -> Iterator[tuple[Any, SchemaPath]]:
    """Every mapping under a schema node that may be a schema (data keywords are skipped)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in _DATA_KEYS and isinstance(value, dict | list):
                yield value, (*path, key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, dict | list):
                yield value, (*path, i)


def _reference_problem(schema: dict[str, Any]) -> SchemaProblem | None:
    specification = referencing.jsonschema.specification_with(
        str(schema.get("$schema", "")), default=referencing.jsonschema.DRAFT202012)
    resolver = referencing.Registry().resolver_with_root(specification.create_resource(schema))

    def visit(node: Any, path: SchemaPath, resolver: Any) -> SchemaProblem | None:  # a referencing Resolver
        if isinstance(node, dict):
            if isinstance(node.get("$id"), str) and path:
                resolver = resolver.in_subresource(specification.create_resource(node))
            ref = node.get("$ref")
            if isinstance(ref, str):
                try:
                    resolver.lookup(ref)
                except Unresolvable:
                    remote = not ref.startswith("#")
                    hint = (" (a remote schema is never fetched; copy it under $defs)" if remote
                            else " within the schema (define it under $defs)")
                    return SchemaProblem(f"$ref {ref!r} does not resolve{hint}", (*path, "$ref"))
        for child, child_path in _subschemas(node, path):
            found = visit(child, child_path, resolver)
            if found is not None:
                return found
        return None

    return visit(schema, (), resolver)


def _contradictions(node: Any, path: SchemaPath) -> Iterator[SchemaProblem]:
    if isinstance(node, dict):
        if node.get("enum") == []:
            yield SchemaProblem("enum is empty, so no value can match", (*path, "enum"))
        for low, high in _BOUNDS:
            a, b = node.get(low), node.get(high)
            if _number(a) and _number(b) and a > b:
                yield SchemaProblem(f"{low} ({a}) is greater than {high} ({b}), so no value can match",
                                    (*path, low))
        properties = node.get("properties")
        required = node.get("required")
        if isinstance(properties, dict) and isinstance(required, list):
            closed = node.get("additionalProperties") is False and "patternProperties" not in node
            for name in required:
                if properties.get(name) is False or (closed and name not in properties):
                    yield SchemaProblem(f"property {name!r} is required but may not be present",
                                        (*path, "required"))
    for child, child_path in _subschemas(node, path):
        yield from _contradictions(child, child_path)


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
