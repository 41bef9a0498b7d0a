"""`fhirbridge ingest` against a real broker: a record that converts to nothing is not reported as
published; it is dead-lettered with its reason and counted as rejected (as the MLLP listener does)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer

from bridge.cli import main
from bridge.config import Settings

from .conftest import settings_env

pytestmark = pytest.mark.integration

GOOD = (
    b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01^ADT_A01|ING-1|P|2.5.1\r"
    b"PID|1||MRN-90^^^^MR||DOE^JANE||19800101|F\r"
)
MFN = (
    b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||MFN^M02^MFN_M02|ING-2|P|2.5.1\r"
    b"MFI|PRA^Practitioner master file^HL70175||UPD|||AL\rMFE|MAD|||DR1^^^^PRN\rSTF|DR1|DR1^^^^PRN|DOE^JOHN\r"
)
ONLY_MSH = b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A08^ADT_A01|ING-3|P|2.5.1\r"


def _read(settings: Settings, topic: str, expect: int, timeout: float = 20) -> list[Any]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
        group_id=None,
    )
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            got.extend(consumer)
            if len(got) >= expect:
                got.extend(consumer)  # and any record beyond the expected ones
                break
    finally:
        consumer.close()
    return got


def test_ingest_dead_letters_a_record_that_converts_to_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An MFN^M02 and an MSH-only ADT were published as bundles holding only their Provenance and
    counted as published, exit 0."""
    env = settings_env(settings)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    assert main(["keys", "create", "--org", "st-mary"]) == 0
    assert main(["topics", "create"]) == 0
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(GOOD + b"\n" + MFN + b"\n" + ONLY_MSH)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge.cli",
            "ingest",
            "--adapter",
            "hl7v2",
            "--source",
            "st-mary",
            "--timezone",
            "America/Chicago",
            "--no-progress",
            str(feed),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = done.stderr
    assert done.returncode == 1, err
    assert "converted 1, published 1, rejected 2" in err
    assert "message 2" in err and "MFN^M02 is not one of the supported message types" in err
    assert "message 3" in err and "ADT^A08 message produced no resources" in err
    assert "DOE" not in err and "Traceback" not in err
    (bundle,) = _read(settings, settings.kafka.topics.bundles, 1)
    assert bundle.key == b"urn:fhirbridge:st-mary:mrn|MRN-90"
    dead = _read(settings, settings.kafka.topics.deadletter, 2)
    headers = sorted((dict(r.headers) for r in dead), key=lambda h: h["fb-dl-location"])
    assert [h["fb-dl-stage"] for h in headers] == [b"ingest:hl7v2"] * 2
    assert [h["fb-dl-file"] for h in headers] == [str(feed).encode()] * 2
    assert b"message 2" in headers[0]["fb-dl-location"] and b"MSH-9" in headers[0]["fb-dl-location"]
    assert b"message 3" in headers[1]["fb-dl-location"]
    assert b"nothing in it was converted to FHIR" in headers[0]["fb-dl-error-message"]

    # the dead letters keep the records themselves and how they were converted, so a replay can redo it
    by_location = sorted(dead, key=lambda r: dict(r.headers)["fb-dl-location"])
    assert [r.value for r in by_location] == [MFN, ONLY_MSH]
    assert all(dict(r.headers)["fb-source-timezone"] == b"America/Chicago" for r in dead)
    replay = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "replay", "--dead-letters"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stderr
    assert "processed 0, dead-lettered 2" in replay.stdout, replay.stdout
    assert (
        len(_read(settings, settings.kafka.topics.bundles, 2, timeout=5)) == 1
    )  # still not published as empty bundles
