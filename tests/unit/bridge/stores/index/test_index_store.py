"""The index store, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.stores.index.store import IncomingBundle, IndexStore


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IndexStore]:
    url = (
        f"sqlite://{tmp_path / 'index.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_dsn")
    )
    s = IndexStore.open(url)
    yield s
    s.close()


def _patient(pid: str, ssn: str, family: str = "DOE") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn}],
        "name": [{"family": family, "given": ["JANE"]}],
        "birthDate": "1980-02-14",
    }


def _bundle(
    sha: str,
    org: str,
    *resources: dict[str, Any],
    ts: str = "2026-01-01T00:00:00.000Z",
    offset: int = 0,
    source_ts: str | None = None,
) -> IncomingBundle:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": r} for r in resources],
    }
    if source_ts:
        bundle["timestamp"] = source_ts
    return IncomingBundle(
        bundle=bundle,
        bundle_sha256=sha,
        source_org=org,
        source_patient=f"{org}|mrn",
        topic="t",
        partition=0,
        offset=offset,
        received_at=ts,
    )


def _enc(eid: str, pid: str, start: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": "IMP"},
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": start},
    }


def test_apply_is_idempotent_and_keeps_provenance(store: IndexStore) -> None:
    b = _bundle("h1", "st-mary", _patient("p1", "111"), _enc("e1", "p1", "2026-01-01"))
    store.apply([b])
    fp = store.fingerprint()
    store.apply([b])
    assert store.fingerprint() == fp
    assert store.counts()["resources"] == 2
    rows = store.resources_for_patients(["p1"])
    assert {r.resource_type for r in rows} == {"Patient", "Encounter"}
    # the rows are used as they come from the driver: the body as bytes, moved as 0/1, on both backends
    assert all(type(r.body) is bytes and orjson.loads(r.body)["id"] == r.id for r in rows)
    assert {r.moved for r in rows} == {0}
    assert store.sources_of([("Encounter", "e1")])[("Encounter", "e1")][0]["source_org"] == "st-mary"


def test_older_record_never_overwrites_newer(store: IndexStore) -> None:
    store.apply([_bundle("h2", "st-mary", _patient("p1", "111", "NEW"), ts="2026-02-01T00:00:00.000Z")])
    store.apply([_bundle("h1", "st-mary", _patient("p1", "111", "OLD"), ts="2026-01-01T00:00:00.000Z")])
    patient = store.get("Patient", "p1")
    assert patient is not None and patient["name"][0]["family"] == "NEW"


def test_late_older_message_does_not_overwrite_newer_by_source_time(store: IndexStore) -> None:
    # the A08 (newer at the source) arrives first; the older A01 is re-sent later
    store.apply(
        [
            _bundle(
                "h2",
                "st-mary",
                _patient("p1", "111", "NEW"),
                ts="2026-01-01T00:00:00.000Z",
                source_ts="2026-01-01T10:00:00-06:00",
            )
        ]
    )
    store.apply(
        [
            _bundle(
                "h1",
                "st-mary",
                _patient("p1", "111", "OLD"),
                ts="2026-02-01T00:00:00.000Z",
                source_ts="2026-01-01T09:00:00-06:00",
            )
        ]
    )
    patient = store.get("Patient", "p1")
    assert patient is not None and patient["name"][0]["family"] == "NEW"


def test_same_content_again_does_not_bump_last_updated(store: IndexStore) -> None:
    store.apply([_bundle("h1", "st-mary", _patient("p1", "111"), ts="2026-01-01T00:00:00.000Z")])
    store.apply([_bundle("h1", "st-mary", _patient("p1", "111"), ts="2026-03-01T00:00:00.000Z", offset=9)])
    patient = store.get("Patient", "p1")
    assert patient is not None and patient["meta"]["lastUpdated"] == "2026-01-01T00:00:00.000Z"


def test_changed_content_updates(store: IndexStore) -> None:
    store.apply([_bundle("h1", "st-mary", _patient("p1", "111", "A"), ts="2026-01-01T00:00:00.000Z")])
    store.apply([_bundle("h2", "st-mary", _patient("p1", "111", "B"), ts="2026-03-01T00:00:00.000Z")])
    patient = store.get("Patient", "p1")
    assert patient is not None and patient["name"][0]["family"] == "B"
    assert patient["meta"]["lastUpdated"] == "2026-03-01T00:00:00.000Z"
    assert len(store.sources_of([("Patient", "p1")])[("Patient", "p1")]) == 2


def test_identifier_linking_is_transitive(store: IndexStore) -> None:
    a = _patient("a", "111")
    b = _patient("b", "111")
    b["identifier"].append({"system": "urn:dl", "value": "D1"})
    c = {**_patient("c", "999"), "identifier": [{"system": "urn:dl", "value": "D1"}]}
    store.apply(
        [
            _bundle("h1", "x", a),
            _bundle("h2", "y", b),
            _bundle("h3", "z", c),
            _bundle("h4", "z", _patient("d", "222")),
        ]
    )
    assert store.identifier_linked("a") == ["a", "b", "c"]
    assert store.patients_by_identifier("http://hl7.org/fhir/sid/us-ssn", "111") == ["a", "b"]


def test_reset_then_rebuild_gives_same_fingerprint(store: IndexStore) -> None:
    bundles = [
        _bundle(f"h{i}", "st-mary", _patient(f"p{i}", str(i)), _enc(f"e{i}", f"p{i}", "2026-01-01"), offset=i)
        for i in range(20)
    ]
    store.apply(bundles)
    fp = store.fingerprint()
    store.reset()
    assert store.counts()["resources"] == 0
    store.apply(bundles[:7])
    store.apply(bundles[7:])
    assert store.fingerprint() == fp


def test_filters(store: IndexStore) -> None:
    store.apply(
        [
            _bundle(
                "h1",
                "st-mary",
                _patient("p1", "1"),
                _enc("e1", "p1", "2026-01-01"),
                ts="2026-01-05T00:00:00.000Z",
            )
        ]
    )
    store.apply([_bundle("h2", "st-mary", _enc("e2", "p1", "2026-02-01"), ts="2026-02-05T00:00:00.000Z")])
    assert [r.id for r in store.resources_for_patients(["p1"], types=["Encounter"])] == ["e1", "e2"]
    assert [r.id for r in store.resources_for_patients(["p1"], since="2026-02-01")] == ["e2"]
    assert [p["id"] for p in store.search_patients(name="doe")[0]] == ["p1"]


def test_sqlite_connection_gets_a_large_page_cache_and_rarer_checkpoints(tmp_path: Path) -> None:
    s = IndexStore.open(f"sqlite://{tmp_path / 'index.db'}")
    try:
        assert s.db.query("PRAGMA cache_size")[0][0] == -65536
        assert s.db.query("PRAGMA wal_autocheckpoint")[0][0] == 10000
        assert s.db.query("PRAGMA journal_mode")[0][0] == "wal"
        assert (
            s.db.query("PRAGMA synchronous")[0][0] == 1
        )  # NORMAL: the index needs no power-cut durability (the topic is the source of truth)
    finally:
        s.close()


def test_keys_written_under_older_rules_are_recomputed_on_open(store: IndexStore) -> None:
    """dedupe_key is stored: an index written by an older release (other rules) has its keys recomputed
    once when a newer release opens it."""
    from bridge.stores.index.rules import DEDUPE_RULES_VERSION, dedupe_key

    obs = {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "effectiveDateTime": "2026-01-01",
        "component": [
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "valueQuantity": {"value": 120},
            }
        ],
    }
    store.apply([_bundle("h1", "st-mary", _patient("p1", "1"), obs)])
    store.db.execute("UPDATE resources SET dedupe_key = 'stale' WHERE id = 'o1'")
    store.db.execute("UPDATE index_meta SET value = 'old' WHERE key = 'dedupe_rules'")
    again = IndexStore(store.db.url)
    try:
        stored = again.db.query("SELECT dedupe_key FROM resources WHERE id = 'o1'")[0][0]
        assert stored == dedupe_key(obs, "2026-01-01") and "components:" in stored
        assert again.db.query("SELECT value FROM index_meta WHERE key = 'dedupe_rules'") == [
            (DEDUPE_RULES_VERSION,)
        ]
    finally:
        again.close()


def _moved(store: IndexStore, rid: str) -> bool:
    return bool(store.db.query("SELECT moved FROM resources WHERE id = ?", [rid])[0][0])


@pytest.mark.parametrize("newest_first", [False, True])
def test_a_resource_delivered_under_another_patient_is_marked_moved(
    store: IndexStore, newest_first: bool
) -> None:
    """Whichever version wins (deliveries in order, or the older one arriving last), a resource whose
    deliveries name different patients is marked, and its page provenance lists every delivery."""
    old = _bundle(
        "h1",
        "st-mary",
        _enc("e1", "pa", "2026-01-01"),
        ts="2026-01-01T00:00:00.000Z",
        source_ts="2026-01-01T00:00:00Z",
    )
    new = _bundle(
        "h2",
        "st-mary",
        _enc("e1", "pb", "2026-01-01"),
        ts="2026-01-02T00:00:00.000Z",
        offset=1,
        source_ts="2026-01-02T00:00:00Z",
    )
    store.apply([_bundle("h0", "st-mary", _enc("e2", "pb", "2026-01-03"), _enc("e3", "pb", "2026-01-04"))])
    store.apply([new, old] if newest_first else [old, new])
    assert _moved(store, "e1") and not _moved(store, "e2") and not _moved(store, "e3")
    assert store.get("Encounter", "e1")["subject"]["reference"] == "Patient/pb"  # the newer version
    page = store.resources_for_patients(["pb"])
    assert {r.id: r.moved for r in page} == {"e1": True, "e2": False, "e3": False}
    expected = store.sources_of([(r.resource_type, r.id) for r in page])
    assert {s["bundle_sha256"] for s in expected[("Encounter", "e1")]} == {"h1", "h2"}
    assert store.sources_for_page(["pb"], page) == expected  # by key (a small page)
    import bridge.stores.index.store as index_store

    try:
        index_store.SOURCES_BY_KEY_MAX, saved = 0, index_store.SOURCES_BY_KEY_MAX
        assert store.sources_for_page(["pb"], page) == expected  # by patient, moved ones by key
    finally:
        index_store.SOURCES_BY_KEY_MAX = saved


def test_same_patient_again_is_not_moved(store: IndexStore) -> None:
    store.apply([_bundle("h1", "st-mary", _enc("e1", "pa", "2026-01-01"))])
    store.apply([_bundle("h2", "riverside", _enc("e1", "pa", "2026-01-02"), ts="2026-01-02T00:00:00.000Z")])
    assert not _moved(store, "e1")


@contextlib.contextmanager
def _reopened(store: IndexStore) -> Iterator[IndexStore]:
    """``store`` closed and opened again (what a newer release does with an index written before)."""
    url = store.db.url
    store.close()
    again = IndexStore.open(url)
    try:
        yield again
    finally:
        again.close()


def test_an_index_without_the_moved_flag_gets_it_from_its_deliveries(store: IndexStore) -> None:
    store.apply([_bundle("h1", "st-mary", _enc("e1", "pa", "2026-01-01"), _enc("e2", "pa", "2026-01-02"))])
    store.apply([_bundle("h2", "st-mary", _enc("e1", "pb", "2026-01-01"), ts="2026-01-02T00:00:00.000Z")])
    # the layout before the flag: the column dropped (on SQLite by rebuilding the table)
    if store.db.kind == "postgres":
        store.db.execute("ALTER TABLE resources DROP COLUMN moved")
    else:
        store.db.script(
            "CREATE TABLE r_old AS SELECT resource_type, id, source_org, patient_id, clinical_date, last_updated, "
            "version_time, dedupe_key, bundle_sha256, content_sha256, body FROM resources; DROP TABLE resources; "
            "ALTER TABLE r_old RENAME TO resources"
        )
    with _reopened(store) as again:
        assert _moved(again, "e1") and not _moved(again, "e2")


def test_the_same_bundle_from_two_organisations_is_two_deliveries(store: IndexStore, tmp_path: Path) -> None:
    """Deliveries were keyed by (type, id, bundle hash), so the second organisation to
    send the same bundle was dropped, and the provenance depended on the order of arrival."""
    a = _bundle("h1", "st-mary", _enc("e1", "pa", "2026-01-01"), ts="2026-01-01T00:00:00.000Z")
    c = _bundle("h1", "riverside", _enc("e1", "pa", "2026-01-01"), ts="2026-01-02T00:00:00.000Z", offset=1)
    store.apply([a])
    store.apply([c])
    store.apply([a])  # again: nothing new
    assert [s["source_org"] for s in store.sources_of([("Encounter", "e1")])[("Encounter", "e1")]] == [
        "st-mary",
        "riverside",
    ]
    first = store.fingerprint()
    store.reset()
    store.apply([c])
    store.apply([a])
    assert store.fingerprint() == first  # the same set of records, in another order


def test_an_index_with_deliveries_keyed_without_the_organisation_is_rekeyed(store: IndexStore) -> None:
    store.apply([_bundle("h1", "st-mary", _enc("e1", "pa", "2026-01-01"))])
    # the layout before: the organisation not in the key (on SQLite by rebuilding the table)
    if store.db.kind == "postgres":
        store.db.execute("ALTER TABLE resource_sources DROP CONSTRAINT resource_sources_pkey")
        store.db.execute("ALTER TABLE resource_sources ADD PRIMARY KEY (resource_type, id, bundle_sha256)")
    else:
        store.db.script(
            "CREATE TABLE s_old (resource_type TEXT NOT NULL, id TEXT NOT NULL, bundle_sha256 TEXT NOT NULL, "
            "source_org TEXT NOT NULL, source_patient TEXT, topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, "
            "kafka_offset BIGINT NOT NULL, received_at TEXT NOT NULL, patient_id TEXT, "
            "PRIMARY KEY (resource_type, id, bundle_sha256)); INSERT INTO s_old SELECT * FROM resource_sources; "
            "DROP TABLE resource_sources; ALTER TABLE s_old RENAME TO resource_sources"
        )
    with _reopened(store) as again:
        again.apply(
            [_bundle("h1", "riverside", _enc("e1", "pa", "2026-01-01"), ts="2026-01-02T00:00:00.000Z")]
        )
        orgs = [s["source_org"] for s in again.sources_of([("Encounter", "e1")])[("Encounter", "e1")]]
        assert orgs == ["st-mary", "riverside"]
        assert (
            again.sources_for_patients(["pa"])[("Encounter", "e1")]
            == again.sources_of([("Encounter", "e1")])[("Encounter", "e1")]
        )
        IndexStore.open(again.db.url).close()  # opening again: nothing left to migrate


def test_name_search_prefilter_never_drops_a_true_match(store: IndexStore) -> None:
    """``lower(body) LIKE %name%`` dropped true matches: a non-ASCII name on PostgreSQL (``lower`` is not
    ``casefold``: ß is not ss, ς is not σ) and a name with ``"``, ``\\`` or a control character on both
    backends (the body is JSON text, where those are escaped). ``match`` alone decides there."""
    names = {
        "p1": "Strauss",
        "p2": "ΟΔΥΣΣΕΥΣ",
        "p3": 'Robert "Bob" Smith',
        "p4": "Back\\slash",
        "p5": "Tab\tName",
    }
    store.apply(
        [
            _bundle(
                "h1",
                "st-mary",
                *(
                    {"resourceType": "Patient", "id": pid, "name": [{"text": text}]}
                    for pid, text in names.items()
                ),
            )
        ]
    )

    def search(needle: str) -> list[str]:
        def match(p: dict[str, Any]) -> bool:
            return any(needle.casefold() in n["text"].casefold() for n in p.get("name", []))

        return [p["id"] for p in store.search_patients(name=needle, match=match)[0]]

    assert search("strauß") == ["p1"]
    assert search("οδυσσευς") == ["p2"]
    assert search('"bob"') == ["p3"]
    assert search("back\\slash") == ["p4"]
    assert search("slash\\") == []  # a trailing backslash was an invalid LIKE pattern on PostgreSQL
    assert search("b\tn") == ["p5"]
    assert search("smith") == ["p3"]  # an ASCII name keeps the pre-filter


def _consent(status: str, *, provision: str = "deny") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": "c-1",
        "status": status,
        "patient": {"reference": "Patient/p1"},
        "provision": {"type": provision},
    }


def test_every_version_of_a_consent_is_kept_newest_first(store: IndexStore) -> None:
    """The index serves the newest Consent (by source time); consent_versions keeps each version, once
    per content, with the bundle that first delivered it, in any delivery order."""
    v1, v2 = _consent("active"), _consent("inactive")
    deliveries = [
        _bundle(
            "b2", "riverside", v2, ts="2026-03-01T00:00:00.000Z", source_ts="2026-02-01T00:00:00Z", offset=2
        ),
        _bundle(
            "b1", "riverside", v1, ts="2026-01-01T00:00:00.000Z", source_ts="2026-01-01T00:00:00Z", offset=1
        ),
        # the first version delivered again, later: it is not newer, and names no new version
        _bundle(
            "b3", "riverside", v1, ts="2026-04-01T00:00:00.000Z", source_ts="2026-01-01T00:00:00Z", offset=3
        ),
    ]
    for b in deliveries:
        store.apply([b])
    current = store.get("Consent", "c-1")
    assert current is not None and current["status"] == "inactive"
    versions = store.consent_versions("c-1")
    assert [(v["resource"]["status"], v["bundle_sha256"]) for v in versions] == [
        ("inactive", "b2"),
        ("active", "b1"),
    ]
    assert all(v["patient_id"] == "p1" and v["source_org"] == "riverside" for v in versions)
    assert store.consent_versions("c-2") == []
    store.reset()
    assert store.consent_versions("c-1") == []
