"""Multilane: a multi-lane asyncio runtime for agent and RAG pipelines on resident local models."""

from multilane.engines.base import Completion, SamplingOptions
from multilane.errors import (
    ContextLengthError,
    EngineError,
    IndexBuildError,
    InputError,
    MultilaneError,
    OutputValidationError,
    QueueFullError,
    SourceError,
    SpecError,
    StageError,
    TemplateError,
    UnknownNameError,
)
from multilane.pipeline.executor import RunResult, StageEvent
from multilane.runtime import Runtime
from multilane.spec import Spec, load_spec, parse_spec

__version__ = "0.1.0"

__all__ = [
    "Completion",
    "ContextLengthError",
    "EngineError",
    "IndexBuildError",
    "InputError",
    "MultilaneError",
    "OutputValidationError",
    "QueueFullError",
    "RunResult",
    "Runtime",
    "SamplingOptions",
    "SourceError",
    "Spec",
    "SpecError",
    "StageError",
    "StageEvent",
    "TemplateError",
    "UnknownNameError",
    "__version__",
    "load_spec",
    "parse_spec",
]
