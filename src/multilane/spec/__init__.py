"""The pipeline file as data: its pydantic models, read with lines, validated and cross-checked.

The parts: `sizes` (byte sizes), `yaml_lines` (YAML with the line of every key), `models` (the pydantic
models and Spec), `validation` (pydantic errors in the file's words) and `checks` (cross-references).
Agents are not loaded here: `multilane.load_spec` (in `multilane.project`) reads a file with its agents.
"""

from multilane.spec.checks import check_spec
from multilane.spec.models import (
    INPUT_TYPES,
    STAGE_CLASSES,
    STAGE_KINDS,
    AgentsSpec,
    AgentStage,
    BM25Spec,
    EmbedStage,
    GenerateStage,
    HybridWeights,
    IndexSpec,
    InputSpec,
    ModelSpec,
    PipelineSpec,
    ReasonStage,
    RetrieveStage,
    RuntimeSpec,
    Spec,
    SpecFile,
    Stage,
    StageBase,
    ToolCallStage,
    TracingSpec,
    stage_order,
)
from multilane.spec.sizes import parse_size
from multilane.spec.validation import Problem, combine_problems, read_spec
from multilane.spec.yaml_lines import KeyPath, describe_value, read_spec_file

__all__ = [
    "INPUT_TYPES",
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
    "KeyPath",
    "ModelSpec",
    "PipelineSpec",
    "Problem",
    "ReasonStage",
    "RetrieveStage",
    "RuntimeSpec",
    "Spec",
    "SpecFile",
    "Stage",
    "StageBase",
    "ToolCallStage",
    "TracingSpec",
    "check_spec",
    "combine_problems",
    "describe_value",
    "parse_size",
    "read_spec",
    "read_spec_file",
    "stage_order",
]
