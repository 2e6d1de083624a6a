from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
import pytest

from multilane.errors import TemplateError
from multilane.pipeline.templates import (
    compile_template,
    render,
    template_names,
    template_reads,
)

STAGES: dict[str, Any] = {
    "passages": {
        "passages": [{"text": "alpha", "score": 0.9}, {"text": "beta", "score": 0.5}],
        "text": "alpha\nbeta",
    },
}


@dataclass
class Answer:
    text: str
    tokens: int


def test_render_reads_inputs_and_stage_fields_of_dicts() -> None:
    out = render(
        "Q: {{ inputs.question }}\n{{ stages.passages.text }}",
        inputs={"question": "why?"},
        stages=STAGES,
    )
    assert out == "Q: why?\nalpha\nbeta"


def test_render_reads_fields_of_objects() -> None:
    out = render("{{ stages.answer.text }} ({{ stages.answer.tokens }})", inputs={}, stages={"answer": Answer("hi", 2)})
    assert out == "hi (2)"


def test_render_loops_over_a_stage_list() -> None:
    source = "{% for p in stages.passages.passages %}[{{ loop.index }}] {{ p.text }}\n{% endfor %}"
    assert render(source, inputs={}, stages=STAGES) == "[1] alpha\n[2] beta\n"


def test_render_keeps_trailing_newline_and_does_not_escape_html() -> None:
    assert render("<b>{{ inputs.x }}</b>\n", inputs={"x": "a & b"}, stages={}) == "<b>a & b</b>\n"


def test_mapping_keys_win_over_dict_methods() -> None:
    out = render("{{ stages.s.items }} {{ stages.s.keys }}", inputs={}, stages={"s": {"items": "I", "keys": "K"}})
    assert out == "I K"


def test_missing_stage_field_names_the_stage_and_its_fields() -> None:
    with pytest.raises(TemplateError) as caught:
        render("{{ stages.passages.txt }}", inputs={}, stages=STAGES)
    assert str(caught.value) == "stage 'passages' has no field 'txt' (fields: passages, text)"


def test_missing_field_of_an_object_stage_lists_its_dataclass_fields() -> None:
    with pytest.raises(TemplateError, match=r"stage 'answer' has no field 'txt' \(fields: text, tokens\)"):
        render("{{ stages.answer.txt }}", inputs={}, stages={"answer": Answer("hi", 2)})


def test_unknown_input_lists_the_inputs() -> None:
    with pytest.raises(TemplateError, match=r"^unknown input 'qestion' \(inputs: question\)$"):
        render("{{ inputs.qestion }}", inputs={"question": "q"}, stages={})


def test_unknown_stage_lists_the_stages() -> None:
    with pytest.raises(TemplateError, match=r"^unknown stage 'nope' \(stages: passages\)$"):
        render("{{ stages.nope.text }}", inputs={}, stages=STAGES)


def test_free_name_says_what_templates_can_read() -> None:
    with pytest.raises(TemplateError, match=r"^unknown name 'question' \(templates can read: inputs, stages\)$"):
        render("{{ question }}", inputs={"question": "q"}, stages={})


def test_strict_undefined_fails_instead_of_rendering_empty() -> None:
    with pytest.raises(TemplateError):
        render("{% for p in stages.passages.nothing %}{{ p }}{% endfor %}", inputs={}, stages=STAGES)


def test_sandbox_blocks_python_internals() -> None:
    with pytest.raises(TemplateError, match="template tried to reach an unsafe attribute"):
        render("{{ ''.__class__.__mro__ }}", inputs={}, stages={})


def test_sandbox_blocks_mutating_values() -> None:
    with pytest.raises(TemplateError, match="unsafe"):
        render("{{ inputs.items.append(1) }}", inputs={"items": [1]}, stages={})


def test_runtime_errors_become_template_errors() -> None:
    with pytest.raises(TemplateError, match="division by zero"):
        render("{{ 1 / 0 }}", inputs={}, stages={})


def test_compile_template_is_cached() -> None:
    assert compile_template("{{ inputs.a }}") is compile_template("{{ inputs.a }}")


def test_syntax_error_is_a_template_error_caused_by_jinja_with_its_line() -> None:
    with pytest.raises(TemplateError, match="template line 2") as caught:
        compile_template("ok\n{{ inputs.a }\n")
    assert isinstance(caught.value.__cause__, jinja2.TemplateSyntaxError)
    assert caught.value.__cause__.lineno == 2


def test_template_reads_finds_attribute_and_constant_item_reads() -> None:
    source = "{{ inputs.question }} {{ stages.a.text | upper }} {{ stages['b'].text }}"
    assert template_reads(source) == {("inputs", "question"), ("stages", "a"), ("stages", "b")}


def test_template_reads_sees_through_loops_filters_and_conditions() -> None:
    source = (
        "{% for p in stages.passages.passages | sort(attribute='score') %}{{ p.text | trim }}{% endfor %}"
        "{% if inputs.verbose %}{{ stages.answer.text | default('') }}{% endif %}"
    )
    assert template_reads(source) == {("stages", "passages"), ("inputs", "verbose"), ("stages", "answer")}
    assert template_names(source) == {"inputs", "stages"}


def test_loop_variables_are_not_free_names() -> None:
    assert template_names("{% for p in stages.s.items %}{{ p.text }}{{ loop.index }}{% endfor %}") == {"stages"}


def test_template_names_reports_other_free_names_but_not_jinja_globals() -> None:
    assert template_names("{{ question }} {% for i in range(3) %}{{ i }}{% endfor %}") == {"question"}


def test_template_reads_marks_reads_without_a_fixed_name() -> None:
    assert template_reads("{{ stages }}") == {("stages", "*")}
    assert template_reads("{{ stages[inputs.which] }}") == {("stages", "*"), ("inputs", "which")}


def test_template_reads_ignores_a_locally_set_name() -> None:
    assert template_reads("{% set stages = {'a': 1} %}{{ stages.a }}") == set()
