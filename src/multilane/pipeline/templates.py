"""Sandboxed Jinja templates: what a pipeline file writes in prompts, queries and outputs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from multilane.errors import TemplateError

ROOTS: tuple[str, ...] = ("inputs", "stages")
"""The names a template can read."""

ITEM = "item"
"""The extra name a `for_each` stage's templates can read: the list element the stage runs for."""

ANY = "*"
"""The attribute reported by `template_reads` when a root is read without a fixed name."""

# id(object) -> what the user calls it ("stage 'passages'"), set while a render is in progress.
_LABELS: ContextVar[dict[int, str] | None] = ContextVar("multilane_template_labels", default=None)


def _fields_of(obj: Any) -> list[str] | None:
    """List the names a template could read from obj, or None if there is no sensible list."""
    if isinstance(obj, Mapping):
        return [str(key) for key in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [f.name for f in dataclasses.fields(obj)]
    model_fields = getattr(type(obj), "model_fields", None)
    if isinstance(model_fields, dict):
        return [str(name) for name in model_fields]
    return None


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined with messages that speak in inputs, stages and fields."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:
            return self._undefined_hint
        name = self._undefined_name
        obj = self._undefined_obj
        if obj is jinja2.utils.missing:
            return f"unknown name {name!r} (templates can read: {', '.join(ROOTS)})"
        labels = _LABELS.get() or {}
        label = labels.get(id(obj))
        fields = _fields_of(obj)
        if label == "inputs":
            return f"unknown input {name!r} (inputs: {', '.join(fields or [])})"
        if label == "stages":
            return f"unknown stage {name!r} (stages: {', '.join(fields or [])})"
        if label is None and fields is None:
            return super()._undefined_message
        kind = "field" if isinstance(name, str) else "element"
        what = label if label is not None else f"{type(obj).__name__} value"
        detail = f" (fields: {', '.join(fields)})" if fields is not None else ""
        return f"{what} has no {kind} {name!r}{detail}"


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with mapping keys preferred over methods and values labelled for messages."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and attribute in obj:
            value = obj[attribute]
        else:
            value = super().getattr(obj, attribute)
        _label_child(obj, attribute, value)
        return value

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        _label_child(obj, argument, value)
        return value


def _label_child(parent: Any, name: Any, value: Any) -> None:
    """Remember that value is `stage 'x'` or `input 'y'` when it was read straight from a root."""
    labels = _LABELS.get()
    if labels is None or isinstance(value, jinja2.Undefined):
        return
    root = labels.get(id(parent))
    if root == "stages":
        labels[id(value)] = f"stage {name!r}"
    elif root == "inputs" and not isinstance(value, str | int | float | bool | type(None)):
        labels[id(value)] = f"input {name!r}"


environment = _Environment(
    undefined=_Undefined,
    autoescape=False,
    keep_trailing_newline=True,
)
"""The one sandboxed Jinja environment every pipeline template is compiled in."""


def _syntax_message(exc: jinja2.TemplateSyntaxError) -> str:
    """Say what is wrong with a template's syntax, naming the template line when it has several."""
    return f"template syntax error on template line {exc.lineno}: {exc.message}"


@lru_cache(maxsize=1024)
def parse_template(source: str) -> nodes.Template:
    """Parse a template to its Jinja syntax tree; raises TemplateError (caused by the Jinja error) on bad syntax."""
    try:
        return environment.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(exc)) from exc


@lru_cache(maxsize=1024)
def compile_template(source: str) -> jinja2.Template:
    """Compile a template once and reuse it; raises TemplateError on bad syntax."""
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(exc)) from exc


def _walk(node: nodes.Node, parent: nodes.Node | None) -> Iterator[tuple[nodes.Node, nodes.Node | None]]:
    yield node, parent
    for child in node.iter_child_nodes():
        yield from _walk(child, node)


def template_names(source: str) -> set[str]:
    """Return the free names a template reads, leaving out Jinja's own globals (range, dict, ...)."""
    tree = parse_template(source)
    return {name for name in meta.find_undeclared_variables(tree) if name not in environment.globals}


def template_reads(source: str) -> set[tuple[str, str]]:
    """Return the (root, name) pairs a template reads, like ("stages", "passages"); "*" when the name is not fixed."""
    tree = parse_template(source)
    free = meta.find_undeclared_variables(tree)
    roots = {root for root in ROOTS if root in free}
    reads: set[tuple[str, str]] = set()
    if not roots:
        return reads
    for node, parent in _walk(tree, None):
        if not (isinstance(node, nodes.Name) and node.ctx == "load" and node.name in roots):
            continue
        name = ANY
        if isinstance(parent, nodes.Getattr) and parent.node is node:
            name = parent.attr
        elif (
            isinstance(parent, nodes.Getitem)
            and parent.node is node
            and isinstance(parent.arg, nodes.Const)
            and isinstance(parent.arg.value, str)
        ):
            name = parent.arg.value
        reads.add((node.name, name))
    return reads


NO_ITEM: Any = object()
_EXPRESSION = re.compile(r"\s*\{\{(.*)\}\}\s*", re.DOTALL)


def expression_source(source: str) -> str:
    """The Jinja expression of `{{ expression }}` (or of a bare expression), without the braces."""
    match = _EXPRESSION.fullmatch(source)
    inner = match.group(1) if match else source
    if "{{" in inner or "}}" in inner or "{%" in inner:
        raise TemplateError(f"expected one expression like '{{{{ stages.plan.json.items }}}}', got {source!r}")
    if not inner.strip():
        raise TemplateError("expected an expression like '{{ stages.plan.json.items }}', got nothing")
    return inner.strip()


@lru_cache(maxsize=256)
def compile_expression(source: str) -> Callable[..., Any]:
    """Compile an expression (`{{ ... }}` or bare) in the sandbox; raises TemplateError on bad syntax."""
    inner = expression_source(source)
    try:
        return environment.compile_expression(inner, undefined_to_none=False)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(exc)) from exc


@contextmanager
def _rendering(inputs: Mapping[str, Any], stages: Mapping[str, Any]) -> Iterator[None]:
    """Label the run's values for error messages, and turn whatever a template raises into a TemplateError."""
    token = _LABELS.set({id(inputs): "inputs", id(stages): "stages"})
    try:
        yield
    except SecurityError as exc:
        raise TemplateError(f"template tried to reach an unsafe attribute: {exc}") from exc
    except jinja2.UndefinedError as exc:
        raise TemplateError(str(exc)) from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template failed: {exc}") from exc
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
        raise TemplateError(f"template failed: {type(exc).__name__}: {exc}") from exc
    finally:
        _LABELS.reset(token)


def evaluate(source: str, *, inputs: Mapping[str, Any], stages: Mapping[str, Any]) -> Any:
    """Evaluate an expression to a value (not a string), with the run's inputs and finished stages."""
    expression = compile_expression(source)
    with _rendering(inputs, stages):
        value = expression(inputs=inputs, stages=stages)
        if isinstance(value, jinja2.Undefined):
            value._fail_with_undefined_error()
        return value


def render(source: str, *, inputs: Mapping[str, Any], stages: Mapping[str, Any], item: Any = NO_ITEM) -> str:
    """Render a template with the run's inputs and finished stages (and `item` in a for_each stage)."""
    template = compile_template(source)
    extra = {} if item is NO_ITEM else {ITEM: item}
    with _rendering(inputs, stages):
        return template.render(inputs=inputs, stages=stages, **extra)
