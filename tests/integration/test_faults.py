"""Bad days: consumers killed with SIGKILL mid-stream, PostgreSQL restarted under a consumer."""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.stores.index.store import IndexStore
from bridge.stores.ledger import open_ledger
from bridge.stream.producer import Publisher
from tests.services.postgres import PostgresServer

from .conftest import settings_env
from .faults import kill9, publish_synthetic, start_consumer, stop
from .pipeline import Stack, make_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# The 20,000 bundles on noida-db. Crash safety is a property of the consumer, not the broker,
# and Apache Kafka gets its own 20,000-bundle kill -9 drill on three nodes (test_kafka_drills.py), so
# here Kafka (and tansu) run the same test on 5,000 to keep the suite under 15 minutes.
# FHIRBRIDGE_FAULT_BUNDLES overrides both.
def _bundles(broker_kind: str) -> int:
    return int(os.environ.get("FHIRBRIDGE_FAULT_BUNDLES", "20000" if broker_kind == "noida" else "5000"))


@pytest.fixture
def stack(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Stack:
    return make_stack(settings, monkeypatch, ["st-mary"])


def _wait(pred, timeout: float, what: str, state=None, logs: list[Path] = ()) -> None:  # type: ignore[no-untyped-def,assignment]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-8:]) for p in logs
            )
            pytest.fail(f"timed out waiting for {what}; state {state() if state else ''}\n{tails}")
        time.sleep(0.25)


def test_kill_9_consumers_during_ingest_loses_and_duplicates_nothing(
    stack: Stack, tmp_path: Path, broker
) -> None:  # type: ignore[no-untyped-def]
    s = stack.settings
    n = _bundles(broker.kind)
    env = settings_env(s)
    producer = threading.Thread(
        target=publish_synthetic, args=(Publisher(s, s.kafka.bootstrap_servers or ""), "st-mary", n)
    )
    producer.start()
    rng = random.Random(4)
    logs = {k: tmp_path / f"{k}.log" for k in ("ledger", "index")}
    procs = {k: start_consumer(k, env, logs[k]) for k in logs}
    try:
        _kill_and_check(stack, producer, procs, env, logs, rng, n)
    finally:
        for p in procs.values():
            kill9(p)


def _kill_and_check(stack, producer, procs, env, logs, rng, n) -> None:  # type: ignore[no-untyped-def]
    s = stack.settings
    kills = 0
    while producer.is_alive() or kills < 6:
        time.sleep(rng.uniform(0.5, 2.5))
        victim = rng.choice(list(procs))
        kill9(procs[victim])
        kills += 1
        procs[victim] = start_consumer(victim, env, logs[victim])
    producer.join()

    ledger = stack.open_ledger()
    index = IndexStore.open(s.stores.index_url)
    _wait(
        lambda: ledger.size() >= n and index.counts()["bundles"] >= n,
        240,
        "both consumers to catch up",
        lambda: (ledger.size(), index.counts(), {k: p.poll() for k, p in procs.items()}),
        list(logs.values()),
    )
    time.sleep(2)  # anything still in flight would show up as an extra leaf
    for p in procs.values():
        assert stop(p) == 0
    assert ledger.size() == n, "0 lost, 0 duplicate leaves"
    assert len({ledger.entry(i).bundle_sha256 for i in range(0, n)}) == n
    assert index.counts()["bundles"] == n
    assert index.counts()["resources"] == 2 * n + n  # Patient + Encounter + Provenance per bundle
    assert stack.cli("ledger", "verify", "--key", stack.vkey) == 0
    ledger.close()
    index.close()


def test_postgres_restart_pauses_and_resumes_without_loss(
    stack: Stack, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A consumer that is not a single writer pauses through a PostgreSQL restart and resumes; the
    ledger's single writer loses its lock with the database and exits (its supervisor restarts it).
    The index consumer publishes its Patients for a linker (FHIRBRIDGE_MPI_LINKER=topic): inline, it
    would be the MPI's single writer, and go the ledger's way."""
    pg = PostgresServer()
    pg.start()
    try:
        s = replace(
            stack.settings,
            ledger=replace(stack.settings.ledger, url=pg.create_db("ledger")),
            stores=replace(stack.settings.stores, index_url=pg.create_db("idx"), mpi_url=pg.create_db("mpi")),
        )
        env = dict(settings_env(s), FHIRBRIDGE_MPI_LINKER="topic")
        n = 3000
        procs = {k: start_consumer(k, env, tmp_path / f"{k}.log") for k in ("ledger", "index")}
        request.addfinalizer(lambda: [kill9(p) for p in procs.values()])
        publish_synthetic(Publisher(s, s.kafka.bootstrap_servers or ""), "st-mary", n // 2)
        _wait(  # both at work (a busy machine starts them slowly): the outage is to come mid-stream
            lambda: all('"consumer.start"' in (tmp_path / f"{k}.log").read_text() for k in procs),
            60,
            "both consumers to start",
        )
        time.sleep(1.5)
        pg.stop("immediate")  # PostgreSQL goes away mid-stream
        publish_synthetic(Publisher(s, s.kafka.bootstrap_servers or ""), "st-mary", n // 2, start=n // 2)
        time.sleep(4)
        assert procs["index"].poll() is None, "the index consumer pauses, it does not die"
        # the ledger's single writer loses its lock with the database: it stops, commits nothing and
        # exits non-zero (decision 38); its supervisor starts it again, and it waits as a standby
        assert procs["ledger"].wait(30) != 0
        assert "leader.lost" in (tmp_path / "ledger.log").read_text()
        procs["ledger"] = start_consumer("ledger", env, tmp_path / "ledger.log")
        # an index consumer that starts while the database is down (a pod rescheduled in the outage:
        # stopped with SIGTERM, it stops in its back-off) waits for it instead of exiting
        assert stop(procs["index"]) == 0
        procs["index"] = start_consumer("index", env, tmp_path / "index2.log")
        _wait(
            lambda: "consumer.database_unreachable" in (tmp_path / "index2.log").read_text(),
            60,
            "the restarted index consumer to wait for the database",
            logs=[tmp_path / "index2.log"],
        )
        time.sleep(1)
        assert procs["ledger"].poll() is None, "a restarted writer waits for the database"
        assert procs["index"].poll() is None, "a restarted index consumer waits for the database"
        pg.start()
        pg.wait_ready()

        ledger = open_ledger(s.ledger.url, origin=s.ledger.origin)
        index = IndexStore.open(s.stores.index_url)
        _wait(
            lambda: ledger.size() >= n and index.counts()["bundles"] >= n,
            120,
            "consumers to resume after the restart",
            lambda: (ledger.size(), index.counts()),
            [tmp_path / "ledger.log", tmp_path / "index.log", tmp_path / "index2.log"],
        )
        for p in procs.values():
            assert stop(p) == 0
        assert ledger.size() == n and index.counts()["bundles"] == n
        assert "consumer.backoff" in (tmp_path / "index.log").read_text()
        assert "consumer.database_reached" in (tmp_path / "index2.log").read_text()
        ledger.close()
        index.close()
    finally:
        pg.destroy()
