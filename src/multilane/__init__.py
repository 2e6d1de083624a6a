"""Multilane: a multi-lane asyncio runtime for agent and RAG pipelines on resident local models."""

import logging as _logging
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
    EvaluationError,
    IndexBuildError,
    InputError,
    ItemError,
    JournalError,
    MemoryBudgetError,
    MultilaneError,
    OutputValidationError,
    QueueFullError,
    ReplayError,
    ResumeError,
    RuntimeClosedError,
    SourceError,
    SpecError,
    StageError,
    TemplateError,
    UnknownNameError,
    UnknownRunError,
)
from multilane.logs import library_defaults as _library_defaults
from multilane.pipeline.executor import RunEvent, RunResult, StageEvent
from multilane.progress import ProgressUpdate
from multilane.project import load_spec, parse_spec
from multilane.runtime import Runtime
from multilane.spec import Spec

# A library prints nothing: the application decides what to do with Multilane's logs (`multilane -v` shows them).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
# The modules above import vLLM, torch and transformers only when a model loads, so this still comes first.
_library_defaults()

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
    "EvaluationError",
    "IndexBuildError",
    "InputError",
    "ItemError",
    "JournalError",
    "MemoryBudgetError",
    "MultilaneError",
    "OutputValidationError",
    "ProgressUpdate",
    "QueueFullError",
    "ReplayError",
    "ResumeError",
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
    "UnknownRunError",
    "__version__",
    "load_spec",
    "parse_spec",
    "tool",
]
