"""The MPI linker fails over (issue 26): with FHIRBRIDGE_MPI_LINKER=topic an `index run` publishes the
Patient versions it keeps to the MPI topic, and two `mpi run` processes on real PostgreSQL and Kafka
link them, one at a time. The standby takes over when the leader is killed or paused; a paused leader
that wakes up writes nothing more and exits non-zero. After each drill the persons (the MPI's
person -> records grouping) and every record's stored version equal those of a single-process inline
run over the same Patients."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from adapters.base import ConvertedBundle, SourceInfo
from adapters.bundle import BundleBuilder
from bridge.config import Settings
from bridge.stores.mpi import MpiError, PersonIndex
from bridge.stream.broker import BrokerHandle, free_port
from bridge.stream.producer import Publisher
from tests.services.postgres import PostgresServer
from tests.support.demodata import Person, population_noisy, population_person

from .conftest import settings_env
from .faults import kill9, start_consumer, stop
from .pipeline import Stack, make_stack

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]

LEASE_S = 4
PEOPLE = 2000  # st-mary's records; st-luke holds noisy copies of half of them; a tenth move house


class _Adapter:
    name = "hl7v2"
    version = "test"


def _patient_bundle(org: str, i: int, p: Person, version: int = 1) -> ConvertedBundle:
    source = SourceInfo(org)
    b = BundleBuilder(
        adapter_name="hl7v2",
        adapter_version="test",
        source=source,
        input_sha256=hashlib.sha256(f"{org}|{i}|{version}".encode()).hexdigest(),
        record_key=f"{i}.{version}",
        recorded=f"2026-01-0{version}T00:00:00Z",  # the second version is the later event
    )
    b.add(
        {
            "resourceType": "Patient",
            "identifier": [{"system": source.mrn_system_uri, "value": f"M{i}"}],
            "name": [{"family": p.family, "given": [g for g in (p.given, p.middle) if g]}],
            "gender": "female" if p.sex == "F" else "male",
            "birthDate": f"{p.dob[:4]}-{p.dob[4:6]}-{p.dob[6:]}",
            "telecom": [{"system": "phone", "value": p.phone}],
            "address": [{"line": [p.street], "city": p.city[0], "state": p.city[1], "postalCode": p.city[2]}],
        },
        f"M{i}",
    )
    return b.build(
        routing_key=f"{source.mrn_system_uri}|M{i}", message_id=f"MSG{i}.{version}", validate=False
    )


def _population() -> list[tuple[str, ConvertedBundle]]:
    """Two hospitals' feeds with realistic name and place frequencies, duplicates across them (typos,
    nicknames, moves) and second versions of a tenth of the records, in one arrival order."""
    rng = random.Random(26)
    people = [population_person(rng) for _ in range(PEOPLE)]
    feed = [("st-mary", _patient_bundle("st-mary", i, p)) for i, p in enumerate(people)]
    feed += [
        ("st-luke", _patient_bundle("st-luke", i, population_noisy(p, rng)))
        for i, p in enumerate(people[: PEOPLE // 2])
    ]
    rng.shuffle(feed)
    for i in range(0, PEOPLE, 10):
        moved = population_noisy(people[i], rng)
        moved.street = f"{rng.randint(1, 9999)} Moved Road"
        feed.append(("st-mary", _patient_bundle("st-mary", i, moved, 2)))
    return feed


def _inline_reference(
    feed: list[tuple[str, ConvertedBundle]], path: Path
) -> tuple[set[frozenset[str]], dict[str, str]]:
    """Persons and record digests of one process feeding every Patient to the MPI in arrival order."""
    items = [
        (org, e["resource"])
        for org, cb in feed
        for e in cb.bundle["entry"]
        if e["resource"]["resourceType"] == "Patient"
    ]
    with PersonIndex.open(f"sqlite://{path}") as mpi:
        for i in range(0, len(items), 500):
            mpi.upsert_patients(items[i : i + 500])
        return _persons(mpi)


def _persons(mpi: PersonIndex) -> tuple[set[frozenset[str]], dict[str, str]]:
    groups: dict[str, set[str]] = {}
    digests: dict[str, str] = {}
    for pid, person, digest in mpi.db.all("SELECT patient_id, person_id, digest FROM mpi_patient"):
        groups.setdefault(person, set()).add(pid)
        digests[pid] = digest
    return {frozenset(g) for g in groups.values()}, digests


@pytest.fixture
def stack(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, pg: PostgresServer, broker: BrokerHandle
) -> Stack:
    if broker.kind not in ("kafka", "external"):
        pytest.skip("the failover drills run on Apache Kafka (the group must evict a dead leader's member)")
    topics = replace(
        settings.kafka.topics, mpi=f"mpi.patients.{settings.kafka.topics.bundles.rsplit('.', 1)[1]}"
    )
    s = replace(
        settings,
        kafka=replace(settings.kafka, topics=topics),
        ledger=replace(settings.ledger, leader_lease_s=LEASE_S),
        stores=replace(
            settings.stores, index_url=pg.create_db("idx"), mpi_url=pg.create_db("mpi"), mpi_linker="topic"
        ),
    )
    monkeypatch.setenv("FHIRBRIDGE_TOPIC_MPI", topics.mpi)  # `topics create` makes it too
    return make_stack(s, monkeypatch, ["st-mary", "st-luke"])


def _env(stack: Stack, instance: str) -> dict[str, str]:
    return dict(
        settings_env(stack.settings),
        FHIRBRIDGE_CONSUMER_INSTANCE_ID=instance,
        FHIRBRIDGE_LEDGER_LEADER_LEASE_S=str(LEASE_S),
        FHIRBRIDGE_MPI_LINKER="topic",
        FHIRBRIDGE_TOPIC_MPI=stack.settings.kafka.topics.mpi,
        FHIRBRIDGE_LOG_LEVEL="info",
    )


def _wait_for(log: Path, event: str, timeout: float, proc: Any = None) -> float:
    start = time.monotonic()
    while f'"{event}"' not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() - start > timeout:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:]) if log.exists() else ""
            pytest.fail(f"no {event} in {log.name} within {timeout:.0f}s\n{tail}")
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{log.name}: exited {proc.returncode} before {event}")
        time.sleep(0.1)
    return time.monotonic() - start


def _ingest_in_background(stack: Stack, feed: list[tuple[str, ConvertedBundle]]) -> threading.Thread:
    """Publish the feed in chunks over a few seconds, so that the drill strikes mid-ingest."""
    s = stack.settings

    def run() -> None:
        publisher = Publisher(s, s.kafka.bootstrap_servers or "")
        try:
            for start in range(0, len(feed), 400):
                futures = [
                    publisher.publish(cb, _Adapter(), SourceInfo(org))
                    for org, cb in feed[start : start + 400]
                ]  # type: ignore[arg-type]
                publisher.flush(60)
                for f in futures:
                    f.get(60)
                time.sleep(0.4)
        finally:
            publisher.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _check_mpi(stack: Stack, reference: tuple[set[frozenset[str]], dict[str, str]]) -> None:
    persons, digests = reference
    with PersonIndex.open(stack.settings.stores.mpi_url) as mpi:
        deadline = time.monotonic() + 90
        while True:
            got = _persons(mpi)
            if got[1] == digests or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(got[1]) == len(digests), "every record linked, none twice"
        assert got[1] == digests, "every record at the version the index keeps"
        assert got[0] == persons, "the persons of a single-process inline run"
        linked = sum(len(g) > 1 for g in persons)
        assert linked >= PEOPLE // 3  # there was linking to compare
        print(f"{len(digests)} records, {len(persons)} persons, {linked} of more than one record")
        writer = mpi.writer()
        assert writer is not None and writer[0] == 2 and writer[1].startswith("mpi-b:")


def _start(stack: Stack, tmp_path: Path) -> tuple[dict[str, Path], Any, Any, Any]:
    logs = {k: tmp_path / f"{k}.log" for k in ("index", "mpi-a", "mpi-b")}
    index = start_consumer("index", _env(stack, "index-1"), logs["index"])
    a = start_consumer("mpi", _env(stack, "mpi-a"), logs["mpi-a"])
    _wait_for(logs["mpi-a"], "mpi.writer", 60, a)
    port = free_port()
    with open(logs["mpi-b"], "ab") as out:
        b = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "mpi", "run", "--metrics-port", str(port)],
            env=_env(stack, "mpi-b"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_for(logs["mpi-b"], "leader.standby", 60, b)
    for probe in ("livez", "readyz"):  # a standby is live and ready while it waits for the lock
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{probe}", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read())["state"] == "standby"
    _wait_for(logs["mpi-a"], "consumer.start", 30, a)
    return logs, index, a, b


def test_kill_9_of_the_mpi_linker_hands_over_to_the_standby_and_the_persons_are_those_of_one_process(
    stack: Stack, tmp_path: Path
) -> None:
    feed = _population()
    reference = _inline_reference(feed, tmp_path / "inline.db")
    logs, index, a, b = _start(stack, tmp_path)
    try:
        producer = _ingest_in_background(stack, feed)
        _wait_for(logs["mpi-a"], "mpi.cache_loaded", 60, a)  # it has linked a batch
        time.sleep(1)
        kill9(a)
        took = _wait_for(logs["mpi-b"], "leader.acquired", 15, b)
        assert took < 15, f"the standby took {took:.1f}s to take over"
        print(f"kill -9: the standby leads {took:.1f}s later")
        producer.join()
        _check_mpi(stack, reference)
        assert stop(b) == 0
        assert stop(index) == 0
        assert '"mpi.cache_loaded"' not in logs["index"].read_text(
            errors="replace"
        )  # the index consumer never linked
    finally:
        for p in (a, b, index):
            kill9(p)


def test_a_paused_mpi_linker_that_wakes_after_the_takeover_writes_nothing_and_exits(
    stack: Stack, tmp_path: Path
) -> None:
    feed = _population()
    reference = _inline_reference(feed, tmp_path / "inline.db")
    logs, index, a, b = _start(stack, tmp_path)
    try:
        producer = _ingest_in_background(stack, feed)
        _wait_for(logs["mpi-a"], "mpi.cache_loaded", 60, a)
        time.sleep(1)
        os.killpg(a.pid, signal.SIGSTOP)
        took = _wait_for(logs["mpi-b"], "leader.acquired", 15, b)
        assert took < 15, f"the standby took {took:.1f}s to take over"
        print(f"SIGSTOP: the standby leads {took:.1f}s later")
        _wait_for(logs["mpi-b"], "mpi.writer", 3 * LEASE_S + 10, b)  # after a paused transaction ended
        os.killpg(a.pid, signal.SIGCONT)
        assert a.wait(30) != 0, "a linker that lost its lock exits non-zero"
        said = logs["mpi-a"].read_text(errors="replace")
        assert "leader.lost" in said or "another MPI linker took over" in said
        assert "Traceback" not in said
        producer.join()
        _check_mpi(stack, reference)
        assert stop(b) == 0
        assert stop(index) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(a.pid, signal.SIGCONT)
        for p in (a, b, index):
            kill9(p)


def test_a_leader_paused_inside_a_transaction_does_not_hold_up_the_next_claim(pg: PostgresServer) -> None:
    """The writers' lock is held by a transaction: a former leader stopped inside one (SIGSTOP, a stalled
    VM) would block the new leader's claim until it woke. PostgreSQL ends that session after the lease."""
    url = pg.create_db("mpi")
    old, new = PersonIndex.open(url), PersonIndex.open(url)
    old.claim_writer("old:1", lease_s=1)
    inside, release = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    def paused_writer() -> None:
        try:
            with old.db.write():
                inside.set()
                release.wait(30)  # idle inside the transaction, as a stopped process would be
                old.db.execute("SELECT 1")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=paused_writer)
    thread.start()
    try:
        assert inside.wait(10)
        t = time.monotonic()
        assert new.claim_writer("new:2") == 2
        assert time.monotonic() - t < 10, "the claim waited for the paused transaction to end"
    finally:
        release.set()
        thread.join(30)
    assert outcome and outcome[0] is not None, "the paused writer's transaction cannot commit"
    with pytest.raises(MpiError):  # reconnected under its old epoch: fenced
        old.close()
        again = PersonIndex.open(url)
        again.hold_writer(1)
        again.upsert_patients([("org", {"resourceType": "Patient", "id": "p1", "name": [{"family": "X"}]})])
    assert new.stats()["records"] == 0
    new.close()
