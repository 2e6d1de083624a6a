"""Logging: quiet when Multilane is a library, turned on by the CLI and the server (`-v`).

Library code logs with structlog; its events go through stdlib `logging` under the `multilane` logger, which
has only a NullHandler, so the application that uses Multilane decides what is shown and where.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import MutableMapping
from typing import Any

import structlog

LOGGER = "multilane"

# The start-up noise of the libraries under Multilane (vLLM's notices, torch's C++ warnings such as NUMA
# binding, transformers' "Loading weights" bars), off unless the user sets these variables. They are
# environment variables because vLLM's engine core and workers are child processes: only the environment
# reaches them before they import anything.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # never into a program's stdout, where its answers go
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# What `multilane -vv` sets instead, for the variables the user did not set.
LOUD_ENV = {
    "VLLM_LOGGING_LEVEL": "INFO",
    "TORCH_CPP_LOG_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "info",
    "HF_HUB_DISABLE_PROGRESS_BARS": "0",
}
# Warnings that libraries raise about their own internals (torch deprecations inside vLLM, say).
_NOISY_MODULES = r"(vllm|torch|transformers|sentence_transformers)(\.|$)"

_defaulted: set[str] = set()
_CLI_HANDLER = "multilane-cli"


def library_defaults() -> None:
    """Keep the libraries under Multilane quiet and send its own events to stdlib `logging`; runs on import."""
    for key, value in QUIET_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            _defaulted.add(key)
    if os.environ["VLLM_LOGGING_LEVEL"].upper() in ("ERROR", "CRITICAL"):
        # vLLM installs its handler when an engine starts; warnings from before that ("Triton is installed, but
        # doesn't include CPU backend", in every vLLM process) would reach stderr through logging's last resort.
        # vLLM's engine processes re-import the main module, and with it this package, before they import vLLM.
        vllm = logging.getLogger("vllm")
        if not vllm.handlers:
            vllm.addHandler(logging.NullHandler())
    if not sys.warnoptions:  # -W or PYTHONWARNINGS: the user chose what to see
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=_NOISY_MODULES)
    if not structlog.is_configured():  # an application that configured structlog keeps its own set-up
        route_to_logging()


def route_to_logging() -> None:
    """Send structlog events to stdlib loggers of the same name, as 'event key=value ...' messages."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # first, so that events no handler wants cost nothing
            structlog.contextvars.merge_contextvars,
            _to_record,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


_logfmt = structlog.processors.LogfmtRenderer(sort_keys=True)


def _to_record(logger: Any, method: str, event: MutableMapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of the stdlib logging call: the message, and the exception to show with it."""
    kwargs = {"exc_info": event.pop("exc_info", None), "stack_info": bool(event.pop("stack_info", False))}
    text = str(event.pop("event", ""))
    fields = _logfmt(logger, method, event)
    return (f"{text} {fields}" if fields else text,), kwargs


class _Stderr(logging.Handler):
    """Writes to whatever `sys.stderr` is when a record comes (test runners and tools swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def configure_logging(verbose: int = 0, *, json: bool = False) -> None:
    """Show logs on stderr, for the CLI and the server: 0 = warnings, 1 = progress (info), 2 = debug and more.

    At 2, the libraries underneath speak too (vLLM's engine logs, torch's warnings, progress bars, Python
    warnings); below it only their errors show, unless the user set their variables (see QUIET_ENV).
    """
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            stamp,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = _Stderr()
    handler.set_name(_CLI_HANDLER)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *([structlog.processors.format_exc_info] if json else []), renderer],
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, stamp]))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _CLI_HANDLER]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Other libraries' records: errors only, unless -vv asks for everything from info up.
    root.setLevel(logging.ERROR if verbose <= 1 else logging.INFO)
    logging.getLogger(LOGGER).setLevel(level)
    if verbose >= 2:
        for key in _defaulted & LOUD_ENV.keys():
            os.environ[key] = LOUD_ENV[key]
        for null in [h for h in logging.getLogger("vllm").handlers if isinstance(h, logging.NullHandler)]:
            logging.getLogger("vllm").removeHandler(null)
        warnings.simplefilter("default")
