"""Opening the ledger: its database connections come from the one database layer (:mod:`bridge.stores.db`).

The ``ledger`` package is a library that imports nothing from fhirbridge; it is given a
:class:`~bridge.stores.db.Connector` with the ledger's SQLite tuning instead of a URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge.errors import ConfigError
from bridge.stores.db import Connector, SqliteTuning
from ledger.errors import LedgerError
from ledger.log import Ledger

LEDGER_TUNING = SqliteTuning(
    # a returned append is durable: it survives a power cut, not only a crash of the process
    synchronous="FULL",
    # 16 KiB pages (new files only): a tile (at most 16,320 bytes) fits in one page, and random index
    # inserts split and log fewer pages; appends measured about 20% faster than with 4 KiB pages
    page_size=16384,
    cache_kib=65536,
    # fewer, larger WAL checkpoints for batched appends (10,000 pages: up to 160 MB of WAL)
    wal_autocheckpoint=10_000,
    busy_timeout_ms=10_000,
    # a missing directory is a wrong path, reported as the storage being unavailable, not created
    create_dirs=False,
)


def ledger_connector(url: str, tuning: SqliteTuning = LEDGER_TUNING) -> Connector:
    """The connector of the ledger at ``url``; :class:`LedgerError` for a URL that names no usable database."""
    try:
        return Connector(url, tuning)
    except ConfigError as exc:
        raise LedgerError(
            "ledger URL must be sqlite:///abs/path.db or postgresql://user@host:port/db"
        ) from exc


def open_ledger(
    url: str,
    *,
    origin: str,
    signer_key: str | None = None,
    checkpoint_every: int = 1000,
    checkpoint_interval_ms: int = 1000,
    witness_keys: Sequence[str] = (),
) -> Ledger:
    """Open (creating it) the ledger at ``url`` (``sqlite:///abs/path.db`` or ``postgresql://...``).

    Raises what :meth:`ledger.log.Ledger.open` raises (:class:`~ledger.errors.LedgerError` and its
    subclasses), a bad URL included.
    """
    return Ledger.open(
        ledger_connector(url),
        origin=origin,
        signer_key=signer_key,
        checkpoint_every=checkpoint_every,
        checkpoint_interval_ms=checkpoint_interval_ms,
        witness_keys=witness_keys,
    )


def open_configured_ledger(settings: Any, *, signer_key: str | None = None) -> Ledger:
    """The ledger of ``settings`` (a reader without ``signer_key``, the consumer with it)."""
    return open_ledger(
        settings.ledger.url,
        origin=settings.ledger.origin,
        signer_key=signer_key,
        checkpoint_every=settings.ledger.checkpoint_every,
        checkpoint_interval_ms=settings.ledger.checkpoint_interval_ms,
        witness_keys=list(settings.ledger.witness_keys),
    )
