"""One error hierarchy: every failure a user can cause or meet is a `MultilaneError`."""

from __future__ import annotations


class MultilaneError(Exception):
    """Base of every error Multilane raises on purpose."""


class SpecError(MultilaneError):
    """A pipeline file is malformed or inconsistent; the message names file, line and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.reason = message
        where = ""
        if file:
            where = file if line is None else f"{file}:{line}"
        if field:
            where = f"{where} {field}" if where else field
        super().__init__(f"{where}: {message}" if where else message)


class SourceError(MultilaneError):
    """A model source cannot be found, read or prepared."""


class TemplateError(MultilaneError):
    """A template failed to render (an undefined name, a sandbox violation, a bad filter)."""


class InputError(MultilaneError):
    """A run got a missing, unknown or mistyped input."""


class UnknownNameError(MultilaneError, KeyError):
    """A pipeline, model or index name that the spec does not declare."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IndexBuildError(MultilaneError):
    """An index could not be built (no documents matched, unreadable file, embedder failure)."""


class EngineError(MultilaneError):
    """An engine failed to load or to serve a request."""


class EngineDeadError(EngineError):
    """A lane's engine died (its process was killed or crashed); the lane is dropped and reloads on next use."""


class MemoryBudgetError(MultilaneError):
    """A model cannot be loaded within the memory budget or the loaded-models cap; the message shows the numbers."""


class OutputValidationError(MultilaneError):
    """A model's output did not parse or did not match the JSON schema it was constrained to."""


class StageError(MultilaneError):
    """A stage of a run failed; wraps the cause and names the pipeline and stage."""

    def __init__(self, pipeline: str, stage: str, cause: BaseException) -> None:
        self.pipeline = pipeline
        self.stage = stage
        self.cause = cause
        super().__init__(f"pipeline '{pipeline}' stage '{stage}': {cause}")


class QueueFullError(MultilaneError):
    """A lane's bounded queue is full; the call was not admitted."""


class ContextLengthError(MultilaneError):
    """A prompt plus its max_tokens does not fit the lane's context."""


class AgentStepLimitError(MultilaneError):
    """An agent used all its steps without answering; `transcript` holds what it did (an AgentResult)."""

    def __init__(self, message: str, *, agent: str, transcript: object) -> None:
        self.agent = agent
        self.transcript = transcript
        super().__init__(message)


class ItemError(MultilaneError):
    """One item of a for_each stage failed; names the item and wraps the cause."""

    def __init__(self, index: int, count: int, item: object, cause: BaseException) -> None:
        self.index = index
        self.item = item
        self.cause = cause
        shown = repr(item)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        super().__init__(f"for_each item {index + 1} of {count} ({shown}): {cause}")


class CorpusError(MultilaneError):
    """A bundled corpus (such as the Python reference) could not be read or exported."""


class DatasetError(MultilaneError):
    """An evaluation dataset is malformed; the message names the file, line and field."""


class JournalError(MultilaneError):
    """The run journal cannot be opened, written or read (or it is off); the message says where and what to do."""


class UnknownRunError(JournalError, UnknownNameError):
    """The journal has no run with this id."""


class ResumeError(JournalError):
    """A run cannot be resumed: it finished, it is running in another process, or its pipeline file changed."""


class ReplayError(JournalError):
    """A replay needs a model or tool output that its recording does not have (the pipeline changed since)."""


class EvaluationError(MultilaneError):
    """An evaluation cannot run as asked: a stage it names is missing or of the wrong kind, or every question failed."""


class RuntimeClosedError(MultilaneError):
    """The runtime (its pool of lanes) is closed: it loads and runs nothing more."""
