"""structlog configuration: JSON lines when stderr is not a TTY, coloured console otherwise.

Kafka context (topic, partition, offset, message id) is bound with
``structlog.contextvars.bound_contextvars`` around each record a consumer handles, so every log line
of that record carries it.

Libraries log with ``structlog.get_logger(__name__)``; this module configures the output, once per
process. Every event passes :func:`drop_phi_keys`, which drops keys that hold patient data (a name, a
birth date, an identifier, a resource body) whatever code logged them.

The standard library's records (kafka-python, aiohttp) go through the same renderer, so that the
service log stays one JSON event per line. A malformed HTTP request (a NUL in the request line, an
oversized header or URL), which aiohttp logs with a traceback quoting the request's bytes, becomes
one ``http.bad_request`` warning naming the error class only: the bytes may hold identifiers.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog
from aiohttp.http_exceptions import HttpProcessingError

_configured = False
_HANDLER = "fhirbridge"


def configure_logging(level: str | None = None, *, force: bool = False) -> None:
    global _configured
    if _configured and not force:
        return
    level_name = (level or os.environ.get("FHIRBRIDGE_LOG_LEVEL") or "info").upper()
    numeric = getattr(logging, level_name, logging.INFO)
    tty = sys.stderr.isatty() and os.environ.get("FHIRBRIDGE_LOG_FORMAT", "") != "json"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        drop_phi_keys,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: list[structlog.types.Processor] = (
        [structlog.dev.ConsoleRenderer()]
        if tty
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    processors = shared + renderer
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    handler.addFilter(BadRequestFilter())
    handler.set_name(_HANDLER)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER]:  # configured again: replace ours only
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for noisy in ("kafka", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=True,
    )
    _configured = True


#: keys whose values are patient data, whatever code logs them: dropped from every event
PHI_KEYS = frozenset(
    {
        "name", "names", "given", "family", "patient_name", "birth_date", "birthdate", "birthDate", "dob",
        "ssn", "mrn", "identifier", "identifiers", "address", "line", "city", "postal_code", "postalCode",
        "phone", "telecom", "email", "body", "resource", "bundle", "raw", "record_value", "narrative",
        "demographics",
    }
)  # fmt: skip


def drop_phi_keys(
    logger: object, method_name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """A structlog processor: the values of :data:`PHI_KEYS` never reach a log line. The keys that were
    dropped are listed under ``redacted``, so that the drop itself is visible."""
    dropped = [k for k in event_dict if k in PHI_KEYS]
    if dropped:
        for k in dropped:
            del event_dict[k]
        event_dict["redacted"] = sorted(dropped)
    return event_dict


class _StderrLogger:
    """Writes each event to the ``sys.stderr`` of the moment: loggers are cached on first use, and a
    stream captured then (a test's, closed since) must not be the one written to later."""

    def __init__(self, *args: object) -> None:
        pass

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The standard library's records to the ``sys.stderr`` of the moment, as :class:`_StderrLogger`."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class BadRequestFilter(logging.Filter):
    """A request aiohttp could not parse is the client's fault: one warning, without the request's bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and record.name.startswith("aiohttp") and _is_bad_request(exc):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "http.bad_request", ()
            record.exc_info, record.exc_text = None, None
            record.error = type(exc).__name__
            record.status = getattr(exc, "code", 400)
        return True


def _is_bad_request(exc: BaseException) -> bool:
    return isinstance(exc, HttpProcessingError)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
