"""Logging set-up for the daemons and the CLI: logfmt on stderr.

Only entry points call ``configure``; library modules just take a logger with
``structlog.stdlib.get_logger(__name__)``.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", *, node_id: str | None = None) -> None:
    """Routes structlog and stdlib logging to stderr as logfmt lines."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", key="ts"),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.LogfmtRenderer(
                key_order=["ts", "level", "event"], drop_missing=True
            ),
            foreign_pre_chain=processors,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Third-party chatter at INFO would drown the daemon's own journal lines.
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "aiosqlite", "grpc"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            *processors,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Off, so that a later configure() (the CLI sets a default level, a
        # daemon command its own) reaches loggers that were already used.
        cache_logger_on_first_use=False,
    )
    if node_id:
        structlog.contextvars.bind_contextvars(node_id=node_id)


def library_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger for code that runs inside a user's process (jobs, kernels).

    It goes through stdlib logging whatever structlog's global set-up is, so
    the process that imports gpufleet decides where its lines go; with no
    set-up at all, warnings reach stderr and nothing is printed on stdout.
    Each line reads ``event key=value ...``.
    """
    return structlog.wrap_logger(  # type: ignore[no-any-return]
        logging.getLogger(name),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event"]),
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
