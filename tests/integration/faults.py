"""Tools for fault tests: fast synthetic bundles and consumer subprocesses (PostgreSQL: tests/services/postgres.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from adapters.base import ConvertedBundle, SourceInfo
from adapters.bundle import BundleBuilder
from bridge.stream.producer import Publisher


class _Adapter:
    name = "hl7v2"
    version = "test"


def synthetic_bundles(org: str, n: int, start: int = 0) -> Iterator[ConvertedBundle]:
    """Small, distinct, valid-shaped bundles (one Patient, one Encounter) without the cost of conversion."""
    import random

    from tests.support.demodata import _person

    source = SourceInfo(org)
    rng = random.Random(start)
    for i in range(start, start + n):
        p = _person(rng)
        b = BundleBuilder(
            adapter_name="hl7v2",
            adapter_version="test",
            source=source,
            input_sha256=f"{i:064x}",
            record_key=str(i),
            recorded="2026-01-01T00:00:00Z",
        )
        pref = b.add(
            {
                "resourceType": "Patient",
                "identifier": [{"system": source.mrn_system_uri, "value": f"M{i}"}],
                "name": [{"family": p.family, "given": [p.given, p.middle]}],
                "gender": "female" if p.sex == "F" else "male",
                "birthDate": f"{p.dob[:4]}-{p.dob[4:6]}-{p.dob[6:]}",
                "address": [
                    {"line": [p.street], "city": p.city[0], "state": p.city[1], "postalCode": p.city[2]}
                ],
            },
            f"M{i}",
        )
        b.add(
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": pref},
                "period": {"start": "2026-01-01T10:00:00Z"},
            },
            f"V{i}",
        )
        yield b.build(routing_key=f"{source.mrn_system_uri}|M{i}", message_id=f"MSG{i}", validate=False)


def publish_synthetic(publisher: Publisher, org: str, n: int, start: int = 0, chunk: int = 1000) -> None:
    adapter = _Adapter()
    source = SourceInfo(org)
    pending = []
    for cb in synthetic_bundles(org, n, start):
        pending.append(publisher.publish(cb, adapter, source))  # type: ignore[arg-type]
        if len(pending) >= chunk:
            publisher.flush(60)
            for f in pending:
                f.get(60)
            pending.clear()
    publisher.flush(60)
    for f in pending:
        f.get(60)


def start_consumer(kind: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", kind, "run"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    return proc


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(30)
