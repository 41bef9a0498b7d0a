"""The ledger and index sinks without a broker: envelope checks, poison order, per-stage CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bridge.consumers.checks import EnvelopeChecker, in_batch_order
from bridge.consumers.index_sink import IndexSink
from bridge.consumers.ledger_sink import LedgerSink
from bridge.consumers.runtime import Record
from bridge.stores.index.store import IndexStore
from bridge.stores.ledger import open_ledger
from bridge.stream.envelope import Envelope, OrgSigner, TrustedKey, TrustRegistry, utc_now


def _bundle(pid: str) -> bytes:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "timestamp": "2026-01-01T00:00:00Z",
        "entry": [{"resource": {"resourceType": "Patient", "id": pid, "name": [{"family": "DOE"}]}}],
    }
    return orjson.dumps(bundle, option=orjson.OPT_SORT_KEYS)


def _record(signer: OrgSigner, offset: int, value: bytes, *, forge: bool = False) -> Record:
    import hashlib

    env = signer.sign(
        Envelope("st-mary", "hl7v2", "1", hashlib.sha256(value).hexdigest(), utc_now(), f"m{offset}")
    )
    headers = env.headers()
    if forge:
        headers = [
            (k, v if k != "fb-signature" else OrgSigner.generate("st-mary").sign(env).headers()[-1][1])
            for k, v in headers
        ]
    return Record("fhir.bundles", 0, offset, 1_767_225_600_000 + offset, b"st-mary|mrn", value, headers)


def _fixture() -> tuple[OrgSigner, EnvelopeChecker]:
    signer = OrgSigner.generate("st-mary")
    trust = TrustRegistry()
    trust.add("st-mary", TrustedKey(signer.key_id, signer.public_bytes, "2020-01-01T00:00:00Z", None))
    return signer, EnvelopeChecker(trust)


def _mixed(signer: OrgSigner) -> list[Record]:
    return [
        _record(signer, 0, _bundle("p0")),
        _record(signer, 1, b"not json"),  # bad bundle: found after the envelope pass
        _record(signer, 2, _bundle("p2"), forge=True),  # forged: found by the envelope pass
        _record(signer, 3, _bundle("p3")),
    ]


def test_ledger_sink_dead_letters_in_batch_order_and_times_its_stages(tmp_path: Path) -> None:
    signer, checker = _fixture()
    sink = LedgerSink(open_ledger(f"sqlite://{tmp_path / 'ledger.db'}", origin="test/ledger"), checker)
    poison = sink.process(_mixed(signer))
    assert [(r.offset, type(e).__name__) for r, e in poison] == [(1, "BadBundle"), (2, "SignatureError")]
    assert sink.ledger.size() == 2
    assert sink.process(_mixed(signer))[0][0].offset == 1 and sink.ledger.size() == 2  # idempotent
    assert {"envelope", "parse", "entry", "append"} <= set(sink.cpu.seconds)
    sink.close()


def test_index_sink_dead_letters_in_batch_order_and_times_its_stages(tmp_path: Path) -> None:
    signer, checker = _fixture()
    fed: list[Any] = []

    class _Mpi:
        def upsert_patients(self, patients: Any) -> None:
            fed.extend(patients)

        def close(self) -> None:
            pass

    sink = IndexSink(IndexStore.open(f"sqlite://{tmp_path / 'index.db'}"), checker, _Mpi())  # type: ignore[arg-type]
    poison = sink.process(_mixed(signer))
    assert [(r.offset, type(e).__name__) for r, e in poison] == [(1, "BadBundle"), (2, "SignatureError")]
    assert sink.store.counts()["bundles"] == 2
    assert [p["id"] for _, p in fed] == ["p0", "p3"]
    assert {"envelope", "parse", "store", "mpi"} <= set(sink.cpu.seconds)
    sink.close()


def test_in_batch_order_sorts_poison_by_position_in_the_batch() -> None:
    recs = [Record("t", 0, i, 0, None, b"") for i in range(4)]
    err = ValueError("x")
    assert [r.offset for r, _ in in_batch_order(recs, [(recs[3], err), (recs[0], err), (recs[2], err)])] == [
        0,
        2,
        3,
    ]
    assert in_batch_order(recs, []) == []


def test_a_record_timestamp_outside_years_1_to_9999_is_poison_not_fatal(tmp_path: Path) -> None:
    """The Kafka timestamp is not signed: a validly signed record replayed with a crafted CreateTime
    must go to the dead letters, not stop the consumer (and stall its partition) on every restart."""
    from dataclasses import replace

    signer, checker = _fixture()
    good = _record(signer, 0, _bundle("p0"))
    far = replace(_record(signer, 1, _bundle("p1")), timestamp=10**15)  # year ~33,658
    ledger_sink = LedgerSink(open_ledger(f"sqlite://{tmp_path / 'ledger.db'}", origin="test/ledger"), checker)
    poison = ledger_sink.process([good, far])
    assert [(r.offset, type(e).__name__) for r, e in poison] == [(1, "BadTimestamp")]
    assert "outside the years 1-9999" in str(poison[0][1]) and ledger_sink.ledger.size() == 1
    ledger_sink.close()
    index_sink = IndexSink(IndexStore.open(f"sqlite://{tmp_path / 'index.db'}"), checker, None)
    poison = index_sink.process([good, far])
    assert [(r.offset, type(e).__name__) for r, e in poison] == [(1, "BadTimestamp")]
    assert index_sink.store.counts()["bundles"] == 1
    index_sink.close()


def _patient_bundle(pid: str, city: str, timestamp: str, family: str = "DOE") -> bytes:
    patient = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": family, "given": ["Jan"]}],
        "gender": "female",
        "birthDate": "1970-02-03",
        "address": [{"city": city, "postalCode": "12345"}],
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "timestamp": timestamp,
        "entry": [{"resource": patient}],
    }
    return orjson.dumps(bundle, option=orjson.OPT_SORT_KEYS)


def _mpi_sink(tmp_path: Path, checker: EnvelopeChecker) -> IndexSink:
    from bridge.stores.mpi import PersonIndex

    return IndexSink(
        IndexStore.open(f"sqlite://{tmp_path / 'index.db'}"),
        checker,
        PersonIndex.open(f"sqlite://{tmp_path / 'mpi.db'}"),
    )


def test_a_resource_id_that_is_not_a_fhir_id_is_poison_and_the_rest_is_indexed(tmp_path: Path) -> None:
    """An empty Patient id passed the bundle check, the MPI refused the whole batch, and
    the consumer stopped on it at every restart."""
    signer, checker = _fixture()
    sink = _mpi_sink(tmp_path, checker)
    records = [
        _record(signer, 0, _bundle("p0")),
        _record(signer, 1, _bundle("")),
        _record(signer, 2, _bundle("a\u0000b")),
        _record(signer, 3, _bundle("p3")),
    ]
    poison = sink.process(records)
    assert [(r.offset, type(e).__name__, getattr(e, "field", None)) for r, e in poison] == [
        (1, "BadBundle", "entry[0].resource.id"),
        (2, "BadBundle", "entry[0].resource.id"),
    ]
    assert "is not a FHIR id" in str(poison[0][1])
    assert sink.mpi is not None and sink.mpi.person_id("p0") and sink.mpi.person_id("p3")
    sink.close()


def test_a_patient_the_mpi_refuses_dead_letters_its_record_only(tmp_path: Path) -> None:
    """Whatever the MPI refuses (here: a failure planted for one Patient), the batch's other Patients are
    indexed, and the refusing record goes to the dead letters with its location and reason."""
    signer, checker = _fixture()
    sink = _mpi_sink(tmp_path, checker)
    assert sink.mpi is not None
    real = sink.mpi.upsert_patients

    def upsert(patients: Any) -> None:
        if any(p["id"] == "bad" for _, p in patients):
            raise ValueError("planted")
        real(patients)

    sink.mpi.upsert_patients = upsert  # type: ignore[method-assign]
    records = [_record(signer, i, _bundle(pid)) for i, pid in enumerate(["p0", "bad", "p2"])]
    poison = sink.process(records)
    assert [(r.offset, type(e).__name__, getattr(e, "field", None)) for r, e in poison] == [
        (1, "MpiRefused", "entry[0]")
    ]
    assert "Patient/bad" in str(poison[0][1]) and "ValueError: planted" in str(poison[0][1])
    assert sink.mpi.person_id("p0") and sink.mpi.person_id("p2") and sink.mpi.person_id("bad") is None
    sink.close()


def test_replays_and_late_versions_leave_the_mpi_as_the_index_keeps_it(tmp_path: Path) -> None:
    """A replay from an earlier offset re-applied every older Patient version to the MPI
    (new history events on each replay), and a version arriving late replaced a newer one in the MPI
    while the index kept the newer."""
    signer, checker = _fixture()
    sink = _mpi_sink(tmp_path, checker)
    mpi = sink.mpi
    assert mpi is not None
    stream = [
        _record(signer, 0, _patient_bundle("p1", "Springfield", "2026-01-01T00:00:00Z")),
        _record(signer, 1, _patient_bundle("p2", "Springfield", "2026-01-01T00:00:00Z")),
        _record(signer, 2, _patient_bundle("p1", "Shelbyville", "2026-01-02T00:00:00Z")),
    ]
    for rec in stream:
        assert sink.process([rec]) == []
    history = mpi.history("p1")
    pairs = mpi.db.all("SELECT * FROM mpi_pair ORDER BY rec_hi, rec_lo")
    for start in (0, 1, 2):  # replays from every offset, one record per batch and all in one
        for rec in stream[start:]:
            sink.process([rec])
        sink.process(stream[start:])
    assert mpi.history("p1") == history
    assert mpi.db.all("SELECT * FROM mpi_pair ORDER BY rec_hi, rec_lo") == pairs
    # a version older than the stored one, arriving now: the index keeps the newer, and so does the MPI
    sink.process([_record(signer, 3, _patient_bundle("p2", "Ogdenville", "2025-12-01T00:00:00Z"))])
    stored = sink.store.get("Patient", "p2")
    assert stored is not None and stored["address"][0]["city"] == "Springfield"
    row = mpi.db.one("SELECT features FROM mpi_patient WHERE patient_id = 'p2'")
    assert row is not None and orjson.loads(row[0])["c"] == "springfield"
    sink.close()


# -- the ledger consumer refuses to run unsigned ---------------------------------------------------
def _ledger_env(monkeypatch: Any, tmp_path: Path, key_text: str | None) -> Path:
    key = tmp_path / "data" / "ledger.key"
    key.parent.mkdir(parents=True)
    if key_text is not None:
        key.write_text(key_text)
    monkeypatch.setenv("FHIRBRIDGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FHIRBRIDGE_LEDGER_ORIGIN", "hie.example/ledger")
    monkeypatch.delenv("FHIRBRIDGE_LEDGER_KEY_FILE", raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # never reached: the key is checked first
    return key


def test_ledger_run_without_a_key_file_refuses_naming_the_path_and_keygen(
    monkeypatch: Any, tmp_path: Path, capsys: Any
) -> None:
    from bridge.cli import main

    key = _ledger_env(monkeypatch, tmp_path, None)
    assert main(["ledger", "run"]) == 1
    err = capsys.readouterr().err
    assert str(key) in err and "fhirbridge ledger keygen" in err and "Traceback" not in err


def test_ledger_run_with_a_garbled_key_refuses(monkeypatch: Any, tmp_path: Path, capsys: Any) -> None:
    from bridge.cli import main

    key = _ledger_env(monkeypatch, tmp_path, "hie.example/ledger+01234567+AAAA")  # the public key, by mistake
    assert main(["ledger", "run"]) == 1
    err = capsys.readouterr().err
    assert f"{key} is not a ledger signing key" in err and "PRIVATE+KEY" not in err.split("(")[0]


def test_ledger_key_named_for_another_origin_is_refused(monkeypatch: Any, tmp_path: Path) -> None:
    import pytest

    from bridge.config import Settings
    from bridge.consumers.ledger_sink import require_ledger_signer_key
    from bridge.errors import ConfigError
    from ledger.note import generate_key

    _ledger_env(monkeypatch, tmp_path, generate_key("other.example/log")[0])
    with pytest.raises(ConfigError, match=r"named 'other\.example/log'"):
        require_ledger_signer_key(Settings.from_env())
    (tmp_path / "data" / "ledger.key").write_text(generate_key("hie.example/ledger")[0] + "\n")
    assert require_ledger_signer_key(Settings.from_env()).startswith("PRIVATE+KEY+hie.example/ledger+")


def test_an_unsigned_ledger_sink_signs_nothing_even_with_a_key_file(monkeypatch: Any, tmp_path: Path) -> None:
    from bridge.config import Settings
    from bridge.consumers.ledger_sink import build_ledger_sink
    from ledger.note import generate_key

    _ledger_env(monkeypatch, tmp_path, generate_key("hie.example/ledger")[0])
    settings = Settings.from_env()
    unsigned = build_ledger_sink(settings, "127.0.0.1:1", receipts=False, unsigned=True)
    signed = build_ledger_sink(settings, "127.0.0.1:1", receipts=False)
    try:
        assert unsigned.ledger._signer is None  # no signer: never a checkpoint
        assert signed.ledger._signer is not None
    finally:
        unsigned.ledger.close()
        signed.ledger.close()
