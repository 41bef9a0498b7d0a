"""structlog configuration: JSON lines when stderr is not a TTY, coloured console otherwise.

Kafka context (topic, partition, offset, message id) is bound with
``structlog.contextvars.bound_contextvars`` around each record a consumer handles, so every log line
of that record carries it.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure_logging(level: str | None = None, *, force: bool = False) -> None:
    global _configured
    if _configured and not force:
        return
    level_name = (level or os.environ.get("FHIRBRIDGE_LOG_LEVEL") or "info").upper()
    numeric = getattr(logging, level_name, logging.INFO)
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s")
    for noisy in ("kafka", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    tty = sys.stderr.isatty() and os.environ.get("FHIRBRIDGE_LOG_FORMAT", "") != "json"
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if tty:
        processors.append(structlog.dev.ConsoleRenderer())
    else:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
