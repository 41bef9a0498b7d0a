"""Ledger on PostgreSQL: lost and refused connections become StorageUnavailable, then recover.

(The shared Ledger suite in ``tests/unit/ledger/test_ledger_log.py`` also runs on PostgreSQL.)
"""

from __future__ import annotations

import hashlib

import pytest

from bridge.stores.ledger import open_ledger
from ledger import merkle, note
from ledger.errors import StorageUnavailable
from ledger.log import LedgerEntry

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORIGIN = "fhirbridge.test/pg"
SKEY, VKEY = note.generate_key(ORIGIN)


def entry(i: int) -> LedgerEntry:
    return LedgerEntry(
        hashlib.sha256(b"%d" % i).hexdigest(),
        "org",
        "fhir",
        "1",
        "fhir.bundles",
        0,
        i,
        "2024-05-01T00:00:00Z",
    )


def _kill_backends(dsn: str) -> int:
    import psycopg

    dbname = dsn.rsplit("/", 1)[1]
    admin_dsn = dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
    return len(rows)


def test_lost_connection_is_storage_unavailable_then_reconnects(pg_dsn: str) -> None:
    led = open_ledger(pg_dsn, origin=ORIGIN, signer_key=SKEY, checkpoint_every=1)
    led.append([entry(i) for i in range(10)])
    assert _kill_backends(pg_dsn) >= 1
    with pytest.raises(StorageUnavailable):
        led.append([entry(10)])
    # The failed batch was not written; the next call reconnects and appends it.
    assert led.append([entry(10), entry(11)]) == [10, 11]
    assert led.root_hash() == merkle.root_hash([merkle.leaf_hash(entry(i).canonical()) for i in range(12)])
    _kill_backends(pg_dsn)
    with pytest.raises(StorageUnavailable):
        led.size()
    assert led.size() == 12
    led.close()


def test_refused_connection_is_storage_unavailable() -> None:
    with pytest.raises(StorageUnavailable):
        open_ledger("postgresql://postgres@127.0.0.1:1/nothing", origin=ORIGIN)


def test_bulk_append_uses_one_transaction_per_call(pg_dsn: str) -> None:
    led = open_ledger(pg_dsn, origin=ORIGIN)
    assert led.append([entry(i) for i in range(2000)]) == list(range(2000))
    assert led.append([entry(i) for i in range(1990, 2010)]) == list(range(1990, 2010))
    assert led.size() == 2010
    led.close()
