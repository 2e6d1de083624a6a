"""Logging set-up for the CLI and servers: structlog key-value events on stderr, run ids from contextvars."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str = "warning", *, json: bool = False) -> None:
    """Send structlog events at `level` or above to stderr; library code never configures logging itself."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if numeric <= logging.DEBUG else "ERROR")
    if numeric > logging.INFO:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # vLLM's engine core is a child process: only the environment reaches its warning filters.
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
