"""A last line of defence: an adapter bug on odd input becomes a located rejection, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator

from adapters.base import Outcome, RejectedRecord
from adapters.errors import InternalAdapterError, Location


def guarded(adapter_name: str, outcomes: Iterator[Outcome], where: Location, raw: bytes) -> Iterator[Outcome]:
    """Yield from ``outcomes``; if it raises, yield one :class:`InternalAdapterError` rejection at ``where``.

    Outcomes already yielded stay valid. The conformance kit counts an InternalAdapterError as a crash,
    so this hides nothing: it only keeps one bad input from taking down a whole ingest run.
    """
    try:
        yield from outcomes
    except Exception as exc:
        yield RejectedRecord(
            InternalAdapterError(
                f"internal error: {type(exc).__name__}: {exc}", adapter=adapter_name, location=where
            ),
            raw,
        )
