"""The whole path over a real local broker: HL7 v2 from two hospitals in, merged provable history out."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.stores.index.store import IndexStore
from ledger import checkpoint, merkle
from tests.support.auth import bearer

from .pipeline import Stack, count_messages, make_stack, write_feeds

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Stack:
    return make_stack(settings, monkeypatch, ["st-mary", "riverside"])


def _ingest(stack: Stack, files: dict[str, list[Path]]) -> None:
    for org, paths in files.items():
        assert (
            stack.cli("ingest", "--adapter", "hl7v2", "--source", org, "--no-progress", *map(str, paths)) == 0
        )


async def test_two_hospitals_end_to_end(stack: Stack, tmp_path: Path) -> None:
    files = write_feeds(tmp_path, 16)
    n = count_messages(files)
    _ingest(stack, files)

    ledger = stack.open_ledger()
    index = IndexStore.open(stack.settings.stores.index_url)
    stack.drain("ledger", "t-ledger", lambda rt: ledger.size() >= n)
    # ...and its offsets committed (a commit refused during a rebalance is retried when the consumer idles)
    stack.drain("index", "t-index", lambda rt: index.counts()["bundles"] >= n and not rt._uncommitted)
    assert ledger.size() == n
    assert index.counts()["bundles"] == n
    ledger.checkpoint_now()

    # Prometheus metrics of the runs above: consumed and committed per partition, lag from the high watermark
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    topic = stack.settings.kafka.topics.bundles
    consumed = sum(
        REGISTRY.get_sample_value(
            "fhirbridge_consumer_consumed_total", {"group": "t-ledger", "topic": topic, "partition": str(p)}
        )
        or 0
        for p in range(3)
    )
    assert consumed == n
    assert f'fhirbridge_consumer_committed_offset{{group="t-index",partition="0",topic="{topic}"}}' in text
    assert f'fhirbridge_consumer_lag{{group="t-index",partition="0",topic="{topic}"}} 0.0' in text

    # a patient whose SSN is known at both hospitals
    row = index.db.query(
        """SELECT a.patient_id, b.patient_id, a.value FROM patient_identifiers a JOIN patient_identifiers b
           ON a.system = b.system AND a.value = b.value AND a.patient_id < b.patient_id
           WHERE a.system = 'http://hl7.org/fhir/sid/us-ssn' LIMIT 1"""
    )
    assert row, "the generated feeds share patients; the index must link them by SSN"
    pid_a, pid_b, ssn = row[0]

    async with TestClient(TestServer(create_app(stack.settings)), headers=bearer(stack.settings)) as client:
        resp = await client.get(f"/Patient/{pid_a}/$everything", params={"_proof": "true"})
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/fhir+json")
        bundle = await resp.json()
        assert bundle["type"] == "searchset"
        patients = {
            e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
        }
        assert patients == {pid_a, pid_b}
        sources = {
            sub["valueString"]
            for e in bundle["entry"]
            for ext in e.get("extension", [])
            for sub in ext["extension"]
            if sub["url"] == "sourceOrg"
        }
        assert sources == {"st-mary", "riverside"}
        encounters = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter"]
        assert encounters and all(
            e["resource"]["subject"]["reference"] in {f"Patient/{pid_a}", f"Patient/{pid_b}"}
            for e in encounters
        )

        # every entry's proof verifies offline against the signed checkpoint in the bundle
        note = bundle["meta"]["extension"][0]["valueString"]
        cp = checkpoint.open(note, [stack.vkey])
        assert cp.size == n
        for e in bundle["entry"]:
            for ext in e.get("extension", []):
                sub = ext["extension"]
                leaf = base64.b64decode(
                    next(s["valueBase64Binary"] for s in sub if s["url"] == "ledgerEntry")
                )
                idx = next(s["valueInteger"] for s in sub if s["url"] == "ledgerIndex")
                proof = [base64.b64decode(s["valueBase64Binary"]) for s in sub if s["url"] == "proofHash"]
                merkle.verify_inclusion(merkle.leaf_hash(leaf), idx, cp.size, proof, cp.root_hash)

        resp = await client.get("/Patient", params={"identifier": f"http://hl7.org/fhir/sid/us-ssn|{ssn}"})
        found = await resp.json()
        assert {e["resource"]["id"] for e in found["entry"]} == {pid_a, pid_b}

        resp = await client.get("/ledger/checkpoint")
        assert resp.status == 200
        assert checkpoint.open(await resp.text(), [stack.vkey]).size == n

        resp = await client.get("/metadata")
        assert (await resp.json())["fhirVersion"] == "4.0.1"

        resp = await client.get("/Patient/does-not-exist/$everything")
        assert resp.status == 404
        assert (await resp.json())["resourceType"] == "OperationOutcome"

    # re-ingesting the same files changes neither the log nor the index
    root_before, fingerprint_before = ledger.root_hash(), index.fingerprint()
    _ingest(stack, files)
    stack.drain("ledger", "t-ledger", lambda rt: rt.processed >= n)
    stack.drain("index", "t-index", lambda rt: rt.processed >= n)
    assert ledger.size() == n
    assert ledger.root_hash() == root_before
    assert index.fingerprint() == fingerprint_before
    ledger.close()
    index.close()


def test_malformed_hl7_is_located_and_dead_lettered(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kafka import KafkaConsumer

    # read bytes: read_text() would turn the \r segment separators into \n
    good = next(iter(write_feeds(tmp_path, 2).values()))[0].read_bytes().decode().split("\n")[0]
    bad = tmp_path / "bad.hl7"
    # second message: MSH-9 (message type) is empty
    segments = good.split("\r")
    msh = segments[0].split("|")
    msh[8] = ""
    segments[0] = "|".join(msh)
    bad.write_text(good + "\n" + "\r".join(segments) + "\n")
    rc = stack.cli("ingest", "--adapter", "hl7v2", "--source", "st-mary", "--no-progress", str(bad))
    err = capsys.readouterr().err
    assert rc == 1
    assert "bad.hl7" in err and "message 2" in err and "MSH-9" in err
    assert "Traceback" not in err

    consumer = KafkaConsumer(
        stack.settings.kafka.topics.deadletter,
        bootstrap_servers=stack.settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10000,
    )
    records = [next(iter(consumer))]
    consumer.close()
    headers = dict(records[0].headers)
    assert headers["fb-dl-stage"] == b"ingest:hl7v2"
    assert b"MSH-9" in headers["fb-dl-location"]
    assert records[0].value.startswith(b"MSH|")
