"""Multilane: a multi-lane asyncio runtime for agent and RAG pipelines on resident local models."""

import os as _os

# Models come from local sources only; nothing is fetched from a model hub (set HF_HUB_OFFLINE=0 to allow it).
# Set before transformers or huggingface_hub is imported, since they read it once.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

from multilane.agents import Agent, AgentContext, AgentResult, AgentStep, Tool, ToolCall, tool
from multilane.engines.base import Completion, SamplingOptions
from multilane.errors import (
    AgentStepLimitError,
    ContextLengthError,
    EngineDeadError,
    EngineError,
    IndexBuildError,
    InputError,
    ItemError,
    MemoryBudgetError,
    MultilaneError,
    OutputValidationError,
    QueueFullError,
    RuntimeClosedError,
    SourceError,
    SpecError,
    StageError,
    TemplateError,
    UnknownNameError,
)
from multilane.pipeline.executor import RunEvent, RunResult, StageEvent
from multilane.runtime import Runtime
from multilane.spec import Spec, load_spec, parse_spec

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentContext",
    "AgentResult",
    "AgentStep",
    "AgentStepLimitError",
    "Completion",
    "ContextLengthError",
    "EngineDeadError",
    "EngineError",
    "IndexBuildError",
    "InputError",
    "ItemError",
    "MemoryBudgetError",
    "MultilaneError",
    "OutputValidationError",
    "QueueFullError",
    "RunEvent",
    "RunResult",
    "Runtime",
    "RuntimeClosedError",
    "SamplingOptions",
    "SourceError",
    "Spec",
    "SpecError",
    "StageError",
    "StageEvent",
    "TemplateError",
    "Tool",
    "ToolCall",
    "UnknownNameError",
    "__version__",
    "load_spec",
    "parse_spec",
    "tool",
]
