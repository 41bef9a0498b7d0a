"""The ledger sequencer fails over (issue 26): two `ledger run` processes on real PostgreSQL and Kafka,
one appends; the standby takes over when the leader is killed or paused, and a paused leader that
wakes up appends nothing more and exits non-zero."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.stores.ledger import open_ledger
from bridge.stream.broker import BrokerHandle, free_port
from bridge.stream.producer import Publisher
from tests.services.postgres import PostgresServer

from .conftest import settings_env
from .faults import kill9, publish_synthetic, start_consumer, stop
from .pipeline import Stack, make_stack

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]

LEASE_S = 4
N = 3000


@pytest.fixture
def stack(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, pg: PostgresServer, broker: BrokerHandle
) -> Stack:
    if broker.kind not in ("kafka", "external"):
        pytest.skip("the failover drills run on Apache Kafka (the group must evict a dead leader's member)")
    s = replace(
        settings,
        ledger=replace(settings.ledger, url=pg.create_db("ledger"), leader_lease_s=LEASE_S),
        stores=replace(settings.stores, index_url=pg.create_db("idx"), mpi_url=pg.create_db("mpi")),
    )
    return make_stack(s, monkeypatch, ["st-mary"])


def _env(stack: Stack, instance: str) -> dict[str, str]:
    return dict(
        settings_env(stack.settings),
        FHIRBRIDGE_CONSUMER_INSTANCE_ID=instance,
        FHIRBRIDGE_LEDGER_LEADER_LEASE_S=str(LEASE_S),
        FHIRBRIDGE_LOG_LEVEL="info",
    )


def _wait_for(log: Path, event: str, timeout: float, proc=None) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while f'"{event}"' not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() - start > timeout:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:]) if log.exists() else ""
            pytest.fail(f"no {event} in {log.name} within {timeout:.0f}s\n{tail}")
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{log.name}: exited {proc.returncode} before {event}")
        time.sleep(0.1)
    return time.monotonic() - start


def _start_with_health(env: dict[str, str], log: Path, port: int) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "ledger", "run", "--metrics-port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            body = json.loads(resp.read())
            return resp.status, body["state"]
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
        return exc.code, body["state"]


def _check_ledger(stack: Stack) -> None:
    ledger = open_ledger(stack.settings.ledger.url, origin=stack.settings.ledger.origin)
    try:
        deadline = time.monotonic() + 120
        while ledger.size() < N and time.monotonic() < deadline:
            time.sleep(0.25)
        time.sleep(1.5)  # anything still in flight would show up as an extra leaf
        assert ledger.size() == N, "0 lost, 0 duplicate leaves"
        assert len({ledger.entry(i).bundle_sha256 for i in range(N)}) == N
        writer = ledger.writer()
        assert writer is not None and writer[0] == 2 and writer[1].startswith("ledger-b:")
    finally:
        ledger.close()
    assert stack.cli("ledger", "verify", "--key", stack.vkey) == 0


def _ingest_in_background(stack: Stack) -> threading.Thread:
    s = stack.settings
    producer = threading.Thread(
        target=publish_synthetic, args=(Publisher(s, s.kafka.bootstrap_servers or ""), "st-mary", N)
    )
    producer.start()
    return producer


def test_kill_9_of_the_ledger_leader_hands_over_to_the_standby_losing_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    logs = {k: tmp_path / f"ledger-{k}.log" for k in ("a", "b")}
    a = start_consumer("ledger", _env(stack, "ledger-a"), logs["a"])
    b = None
    try:
        _wait_for(logs["a"], "leader.acquired", 60, a)
        port = free_port()
        b = _start_with_health(_env(stack, "ledger-b"), logs["b"], port)
        _wait_for(logs["b"], "leader.standby", 60, b)
        assert _probe(port, "/readyz") == (200, "standby"), "a standby is live and ready"
        producer = _ingest_in_background(stack)
        time.sleep(2)
        kill9(a)
        took = _wait_for(logs["b"], "leader.acquired", 15, b)
        assert took < 15, f"the standby took {took:.1f}s to take over"
        deadline = time.monotonic() + 20
        while _probe(port, "/readyz") != (200, "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _probe(port, "/readyz") == (200, "running")
        assert _probe(port, "/livez")[0] == 200
        producer.join()
        _check_ledger(stack)
        assert stop(b) == 0
    finally:
        kill9(a)
        if b is not None:
            kill9(b)


def test_a_paused_leader_that_wakes_after_the_takeover_appends_nothing_and_exits(
    stack: Stack, tmp_path: Path
) -> None:
    logs = {k: tmp_path / f"ledger-{k}.log" for k in ("a", "b")}
    a = start_consumer("ledger", _env(stack, "ledger-a"), logs["a"])
    b = None
    try:
        _wait_for(logs["a"], "leader.acquired", 60, a)
        b = start_consumer("ledger", _env(stack, "ledger-b"), logs["b"])
        _wait_for(logs["b"], "leader.standby", 60, b)
        producer = _ingest_in_background(stack)
        time.sleep(2)
        os.killpg(a.pid, signal.SIGSTOP)
        took = _wait_for(logs["b"], "leader.acquired", 15, b)
        assert took < 15, f"the standby took {took:.1f}s to take over"
        _wait_for(logs["b"], "ledger.writer", 10, b)
        os.killpg(a.pid, signal.SIGCONT)
        assert a.wait(30) != 0, "a leader that lost its lock exits non-zero"
        said = logs["a"].read_text(errors="replace")
        assert "leader.lost" in said or "another ledger writer took over" in said
        assert "Traceback" not in said
        producer.join()
        _check_ledger(stack)
        assert stop(b) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(a.pid, signal.SIGCONT)
        kill9(a)
        if b is not None:
            kill9(b)
