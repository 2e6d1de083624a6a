"""The pydantic models of a pipeline file, and Spec: a validated file with the line of every key."""

from __future__ import annotations

import graphlib
import heapq
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from multilane.corpora import CORPUS_NAMES
from multilane.durations import parse_duration
from multilane.errors import InputError, SpecError, UnknownNameError
from multilane.pipeline.templates import template_reads
from multilane.spec.sizes import parse_size
from multilane.spec.yaml_lines import KeyPath, describe_value, dotted

if TYPE_CHECKING:
    from multilane.agents import Agent

__all__ = [
    "INPUT_TYPES",
    "SOURCE_HINT",
    "STAGE_CLASSES",
    "STAGE_KINDS",
    "AgentStage",
    "AgentsSpec",
    "BM25Spec",
    "EmbedStage",
    "GenerateStage",
    "HybridWeights",
    "IndexSpec",
    "InputSpec",
    "ModelSpec",
    "PipelineSpec",
    "ReasonStage",
    "RetrieveStage",
    "RuntimeSpec",
    "Spec",
    "SpecFile",
    "Stage",
    "StageBase",
    "ToolCallStage",
    "TracingSpec",
    "stage_order",
]

STAGE_KINDS: tuple[str, ...] = ("embed", "retrieve", "reason", "tool_call", "agent")
SOURCE_HINT = "'package:<module>', a model folder or a .gguf file; only a remote engine may leave it out"
INPUT_TYPES: tuple[str, ...] = ("str", "int", "float", "bool", "list")


# ---------------------------------------------------------------------------------------------
# Value checks shared by the models


def _check_duration(value: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(  # pydantic turns only ValueError into a validation error
            f"expected a duration like '30s', '5m', '1h30m' or a number of seconds, got {describe_value(value)}"
        )
    parse_duration(value)
    return value


def _check_memory_budget(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(  # pydantic turns only ValueError into a validation error
            f"expected 'auto', a number of bytes or a size like '6GiB', got {describe_value(value)}"
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
    raise ValueError(f"expected a glob or a non-empty list of globs, got {describe_value(value)}")


def _check_corpus(value: Any) -> Any:
    if isinstance(value, str) and value not in CORPUS_NAMES:
        raise ValueError(f"unknown corpus '{value}' (corpora: {', '.join(CORPUS_NAMES)})")
    return value


def _check_filter(value: Any) -> Any:
    if not isinstance(value, dict):
        return value  # pydantic says what type it wanted
    if not value:
        raise ValueError("a filter needs a path glob or a front-matter field, like {path: 'history/*', tags: ferry}")
    for key, wanted in value.items():
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values:
            raise ValueError(f"filter '{key}' is an empty list; give at least one value")
        if key == "path":
            if not all(isinstance(v, str) and v.strip() for v in values):
                raise ValueError(f"filter 'path' takes a glob or a list of globs, like 'history/*', "
                                 f"got {describe_value(wanted)}")
        elif not all(isinstance(v, str | int | float) for v in values):  # bool is an int
            raise ValueError(f"filter '{key}' takes a string, number or true/false, or a list of them, "
                             f"got {describe_value(wanted)}")
    return value


Duration = Annotated[str | int | float, BeforeValidator(_check_duration)]
MemoryBudget = Annotated[str | int, BeforeValidator(_check_memory_budget)]


def _check_journal(value: Any) -> Any:
    if value is None or value is False or value == "off":  # YAML reads a bare `off` as false
        return "off" if value is not None else None
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(  # pydantic turns only ValueError into a validation error
        f"expected a file path or 'off', got {describe_value(value)}")


JournalSetting = Annotated[str | None, BeforeValidator(_check_journal)]
Documents = Annotated[str | list[str], BeforeValidator(_check_documents)]
Corpus = Annotated[str, BeforeValidator(_check_corpus)]
FilterValue = str | int | float | bool | list[str | int | float | bool]


# ---------------------------------------------------------------------------------------------
# The models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(_Model):
    """A declared model: its kind, where its weights come from, and how its lane runs."""

    kind: Literal["generate", "embedding"]
    source: str | None = Field(min_length=1)  # None only for a remote model, whose weights live on its server
    context: int | None = Field(default=None, ge=16)
    parallel: int = Field(default=8, ge=1)
    keep_alive: Duration = "5m"
    preload: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    batch_size: int = Field(default=64, ge=1)
    batch_wait: Duration = "2ms"  # embedding micro-batch: how long the first call waits for others
    engine: dict[str, Any] = Field(default_factory=dict)
    cache: bool = False  # reuse the completion of an identical deterministic call (temperature 0 or a seed)
    # Slots on top of `parallel` that only calls of priority <= reserved_priority may take: the engine runs
    # parallel + reserved_slots sequences, so urgent calls start at once and background calls keep every
    # one of their `parallel` slots.
    reserved_slots: int = Field(default=0, ge=0)
    reserved_priority: int = 0

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" not in data and _is_remote(data.get("engine")):
            data = {**data, "source": None}  # only a local model must say where its weights are
        # A generate lane decodes 8 sequences over 2048 tokens; an embedding lane admits 256 calls at once,
        # which its micro-batcher turns into a few encodes of up to batch_size texts.
        if isinstance(data, dict) and data.get("kind") == "generate":
            return {"context": 2048, "parallel": 8, **data}
        if isinstance(data, dict) and data.get("kind") == "embedding":
            return {"parallel": 256, **data}
        return data

    @model_validator(mode="after")
    def _local_source(self) -> ModelSpec:
        if self.source is None and not self.is_remote:
            raise ValueError(f"a local model needs a source ({SOURCE_HINT})")
        return self

    @property
    def is_remote(self) -> bool:
        """Whether the model is served by a remote OpenAI-compatible server (`engine: {kind: remote}`)."""
        return _is_remote(self.engine)

    @property
    def slots(self) -> int:
        """Every slot of the model's lane: `parallel` for calls of any priority, plus the reserved ones."""
        return self.parallel + self.reserved_slots

    @property
    def batch_wait_seconds(self) -> float:
        """How long an embedding micro-batch waits for more calls, in seconds."""
        return parse_duration(self.batch_wait) or 0.0

    @property
    def keep_alive_seconds(self) -> float | None:
        """Seconds to stay loaded after the last call; 0 unloads when idle, None means pinned."""
        return parse_duration(self.keep_alive)


def _is_remote(engine: Any) -> bool:
    return isinstance(engine, dict) and engine.get("kind") == "remote"


class TracingSpec(_Model):
    """Where a runtime's spans go: `otlp` (an OpenTelemetry collector), `console` (stderr) or `off`.

    Written as a word (`tracing: otlp`) or a mapping; what it leaves out comes from the OTEL_* variables.
    """

    export: Literal["off", "otlp", "console"] = "otlp"
    endpoint: str | None = Field(default=None, min_length=1)  # OTLP over HTTP, e.g. http://localhost:4318
    service_name: str | None = Field(default=None, min_length=1)
    content: bool | None = None  # record prompts, outputs, tool arguments and results on the spans

    @model_validator(mode="before")
    @classmethod
    def _word(cls, data: Any) -> Any:
        if data is False or isinstance(data, str):
            data = {"export": data}
        if isinstance(data, dict) and data.get("export") is False:  # YAML reads a bare `off` as false
            data = {**data, "export": "off"}
        return data


class RuntimeSpec(_Model):
    """Runtime-wide limits (lanes loaded, memory budget, queue size), where runs are journaled and traced."""

    max_loaded_models: int = Field(default=3, ge=1)
    memory_budget: MemoryBudget = "auto"
    max_queue: int = Field(default=512, ge=0)
    max_overtakes: int = Field(default=32, ge=0)  # later calls a waiting call lets go first, at most
    journal: JournalSetting = None  # a SQLite file (relative to the pipeline file), "off", or None: the default
    durable: bool = False  # a run fails when its journal cannot be written, instead of going on without it
    tracing: TracingSpec | None = None  # None: the OTEL_* variables decide (or the host's tracer provider)

    @model_validator(mode="after")
    def _durable_needs_a_journal(self) -> RuntimeSpec:
        if self.durable and self.journal == "off":
            raise ValueError("durable: true needs a journal; remove journal: off or set durable: false")
        return self

    @property
    def memory_budget_bytes(self) -> int | None:
        """The budget in bytes, or None when it is worked out from the device ("auto")."""
        if self.memory_budget == "auto":
            return None
        return parse_size(self.memory_budget)


class BM25Spec(_Model):
    """The keyword index's BM25 parameters (the defaults are Anserini's, made for passages such as chunks)."""

    k1: float = Field(default=0.9, ge=0.0, allow_inf_nan=False)  # term-frequency saturation
    b: float = Field(default=0.4, ge=0.0, le=1.0)  # length normalisation: 0 none, 1 full


class IndexSpec(_Model):
    """A document index: the embedding model that builds it and the documents it chunks.

    The documents are files matched by globs (`documents`), or a corpus that ships with Multilane (`corpus`).
    """

    embedder: str
    documents: Documents | None = None
    corpus: Corpus | None = None
    chunk_tokens: int = Field(default=200, ge=16)
    chunk_overlap: int = Field(default=40, ge=0)
    chunk_headings: bool = False
    window_tokens: int | None = Field(default=None, ge=8)  # also embed windows this small, to rank chunks by
    bm25: BM25Spec = Field(default_factory=BM25Spec)

    @model_validator(mode="after")
    def _one_source(self) -> IndexSpec:
        if self.documents is None and self.corpus is None:
            raise ValueError(f"give documents (globs of files to index) or corpus (one of: "
                             f"{', '.join(CORPUS_NAMES)})")
        if self.documents is not None and self.corpus is not None:
            raise ValueError("give documents or corpus, not both")
        if self.window_tokens is not None and self.window_tokens >= self.chunk_tokens:
            raise ValueError(f"window_tokens ({self.window_tokens}) must be below chunk_tokens ({self.chunk_tokens}): "
                             "windows are small parts of chunks")
        return self

    @property
    def document_globs(self) -> tuple[str, ...]:
        """The document globs as a tuple, whether the file wrote one or several (none for a corpus)."""
        if self.documents is None:
            return ()
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


class StageBase(_Model):
    """What every stage kind has: ordering (`after`), a time limit, for_each fan-out and error handling."""

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


class EmbedStage(StageBase):
    """Embed a rendered text with an embedding model."""

    kind: Literal["embed"]
    model: str
    text: str

    def templates(self) -> dict[str, str]:
        """The stage's template fields (YAML key -> source) that are set."""
        return {"text": self.text}


class HybridWeights(_Model):
    """How much each ranking counts in reciprocal rank fusion: dense, keyword, and the windows of an index that
    has them."""

    dense: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    keyword: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    windows: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _not_all_zero(self) -> HybridWeights:
        if self.dense == 0 and self.keyword == 0 and self.windows == 0:
            raise ValueError("at least one weight must be above 0")
        return self


class RetrieveStage(StageBase):
    """Search an index for the passages nearest a rendered query: by embeddings, by keywords, or both fused."""

    kind: Literal["retrieve"]
    index: str
    query: str
    top_k: int = Field(default=4, ge=1)
    mode: Literal["dense", "keyword", "hybrid"] = "dense"
    weights: HybridWeights | None = None
    candidates: int = Field(default=50, ge=1)
    per_source: int | None = Field(default=None, ge=1)
    filter: Annotated[dict[str, FilterValue] | None, BeforeValidator(_check_filter)] = None

    @property
    def fusion_weights(self) -> tuple[float, float, float]:
        """(dense, keyword, windows) weights for fused retrieval."""
        weights = self.weights or HybridWeights()
        return (weights.dense, weights.keyword, weights.windows)

    def templates(self) -> dict[str, str]:
        """The stage's template fields (YAML key -> source) that are set."""
        return {"query": self.query}


class GenerateStage(StageBase):
    """What the generating stage kinds (`reason`, `tool_call`) share: a model, prompts and sampling."""

    model: str
    prompt: str
    system: str | None = None
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    truncate: bool = False
    seed: int | None = None  # fixes the sampling, so a call with temperature > 0 can be cached too
    cache: bool | None = None  # None: the model's `cache` setting decides
    priority: int | None = None  # lower first in the lane's queue; None: the pipeline's priority

    def templates(self) -> dict[str, str]:
        """The stage's template fields (YAML key -> source) that are set."""
        found = {"prompt": self.prompt}
        if self.system is not None:
            found["system"] = self.system
        return found


class ReasonStage(GenerateStage):
    """Generate free text from a rendered prompt."""

    kind: Literal["reason"]


class ToolCallStage(GenerateStage):
    """Generate JSON constrained to a schema from a rendered prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    kind: Literal["tool_call"]
    json_schema: dict[str, Any] = Field(alias="schema")


class AgentStage(StageBase):
    """Run an agent (defined in Python under the project's agents/ folder) on a rendered task."""

    kind: Literal["agent"]
    agent: str
    task: str
    cache: bool | None = None  # cache the agent's model calls; None: each model's `cache` setting decides
    priority: int | None = None  # the priority of the agent's model calls; None: the pipeline's priority

    def templates(self) -> dict[str, str]:
        """The stage's template fields (YAML key -> source) that are set."""
        return {"task": self.task}


Stage = Annotated[
    EmbedStage | RetrieveStage | ReasonStage | ToolCallStage | AgentStage, Field(discriminator="kind")
]
STAGE_CLASSES: dict[str, type[StageBase]] = {
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
    priority: int = 0  # the priority of the pipeline's model calls (lower first); a stage may set its own

    def priority_of(self, stage: str) -> int:
        """The priority of a stage's model calls: its own, else the pipeline's."""
        own: int | None = getattr(self.stages[stage], "priority", None)
        return self.priority if own is None else own

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
        """Return the stages in a dependency order, ties broken by declaration order; raises graphlib.CycleError."""
        return stage_order(self.dependencies())

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
                raise InputError(f"{label} input '{name}' should be {spec.type}, got {describe_value(value)}")
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
    digest: str = ""
    """The SHA-256 of the file's text: a journaled run remembers it, so resuming on a changed file is refused."""

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
        return SpecError(message, file=self.name, line=self.line_of(key), field=dotted(key) or None)

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


# ---------------------------------------------------------------------------------------------
# The stage graph


def stage_order(deps: Mapping[str, Iterable[str]]) -> list[str]:
    """Order stages so each comes after what it depends on, ties broken by declaration order (the mapping's).

    Raises graphlib.CycleError whose args are a message and the cycle as [a, b, ..., a], where each stage
    depends on the next and the first is the cycle's earliest-declared stage. Names that are not stages are
    ignored (the checker reports them).
    """
    rank = {name: i for i, name in enumerate(deps)}
    sorter = graphlib.TopologicalSorter({name: [d for d in needed if d in rank] for name, needed in deps.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        loop = list(reversed(exc.args[1][:-1]))  # graphlib lists a dependency before the stage that needs it
        first = min(range(len(loop)), key=lambda i: rank[loop[i]])
        cycle = [*loop[first:], *loop[:first], loop[first]]
        raise graphlib.CycleError(f"stages form a cycle: {' -> '.join(cycle)}", cycle) from None
    ready: list[tuple[int, str]] = []
    order: list[str] = []
    while sorter.is_active():
        for name in sorter.get_ready():
            heapq.heappush(ready, (rank[name], name))
        _, name = heapq.heappop(ready)
        order.append(name)
        sorter.done(name)
    return order
