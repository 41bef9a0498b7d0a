"""The audit log's appender fails over like the ledger's sequencer (decision 38): several `audit run`
processes on real PostgreSQL, one appends; a standby takes over when the appender is killed or paused,
and a paused appender that wakes up appends nothing more and exits non-zero. Nothing is lost, nothing
is appended twice, and `audit verify` passes."""

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
from pathlib import Path

import pytest

from bridge.stores.audit import AuditStore, open_audit_log
from bridge.stream.broker import free_port
from tests.services.postgres import PostgresServer
from tests.unit.bridge.service.audit.audit_helpers import events, settings_for, write_key

from .faults import kill9, stop

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]

LEASE_S = 4
ACCESSES = 400


def _wait_for(log: Path, event: str, timeout: float, proc: subprocess.Popen[bytes]) -> float:
    start = time.monotonic()
    while f'"{event}"' not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() - start > timeout:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:]) if log.exists() else ""
            pytest.fail(f"no {event} in {log.name} within {timeout:.0f}s\n{tail}")
        if proc.poll() is not None:
            pytest.fail(f"{log.name}: exited {proc.returncode} before {event}")
        time.sleep(0.1)
    return time.monotonic() - start


def _state(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())["state"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["state"]


def test_the_audit_appender_fails_over_on_kill_9_and_a_paused_one_appends_nothing(
    pg: PostgresServer, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, pg.create_db("audit"), pg.create_db("audit_log"))
    vkey = write_key(settings)
    env = {
        **os.environ,
        "FHIRBRIDGE_DATA_DIR": str(tmp_path),
        "FHIRBRIDGE_AUDIT_URL": settings.audit.url,
        "FHIRBRIDGE_AUDIT_LOG_URL": settings.audit.log_url,
        "FHIRBRIDGE_LEDGER_LEADER_LEASE_S": str(LEASE_S),
        "FHIRBRIDGE_LOG_LEVEL": "info",
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {k: tmp_path / f"audit-{k}.log" for k in "abc"}
    ports = {k: free_port() for k in "abc"}

    def start(name: str) -> subprocess.Popen[bytes]:
        with open(logs[name], "ab") as out:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "bridge.cli", "audit", "run", "--metrics-port", str(ports[name])],
                env={**env, "FHIRBRIDGE_CONSUMER_INSTANCE_ID": f"audit-{name}"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return procs[name]

    done = threading.Event()

    def record() -> None:  # the query service's accesses, arriving throughout the drill
        store = AuditStore.open(settings.audit.url)
        try:
            for i in range(ACCESSES):
                store.record(events(i, patients=(f"pat-{i % 37}",)))
                time.sleep(0.03)
        finally:
            store.close()
            done.set()

    try:
        a = start("a")
        _wait_for(logs["a"], "audit.writer", 60, a)
        b = start("b")
        _wait_for(logs["b"], "leader.standby", 60, b)
        assert _state(ports["b"], "/readyz") == (200, "standby"), "a standby is live and ready"
        assert _state(ports["a"], "/readyz") == (200, "running")
        threading.Thread(target=record, daemon=True).start()
        time.sleep(2)

        kill9(a)  # the appender dies: the standby takes over within the lease and some
        took = _wait_for(logs["b"], "audit.writer", 15, b)
        assert took < 15, f"the standby took {took:.1f}s to take over"
        c = start("c")
        _wait_for(logs["c"], "leader.standby", 60, c)
        time.sleep(1)

        os.killpg(b.pid, signal.SIGSTOP)  # the appender is paused: its session ends after the lease
        took = _wait_for(logs["c"], "audit.writer", 20, c)
        assert took < 20, f"the second standby took {took:.1f}s to take over"
        os.killpg(b.pid, signal.SIGCONT)
        assert b.wait(30) != 0, "an appender that lost its leadership exits non-zero"
        said = logs["b"].read_text(errors="replace")
        assert "leader.lost" in said or "another writer" in said.lower() or "fenced" in said.lower()
        assert "Traceback" not in said

        assert done.wait(120), "the accesses were recorded"
        store = AuditStore.open(settings.audit.url)
        rows = len(store.since(0, 100_000))
        store.close()
        audit_log = open_audit_log(settings)
        try:
            deadline = time.monotonic() + 60
            while audit_log.size() < rows and time.monotonic() < deadline:
                time.sleep(0.25)
            time.sleep(1)  # anything appended twice would show up now
            assert audit_log.size() == rows, "every audit row appended once"
            writer = audit_log.writer()
            assert writer is not None and writer[0] == 3 and writer[1].startswith("audit-c:")
        finally:
            audit_log.close()
        assert stop(c) == 0
        verify = subprocess.run(
            [sys.executable, "-m", "bridge.cli", "audit", "verify", "--key", vkey, "--grace", "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGCONT)
            kill9(p)
