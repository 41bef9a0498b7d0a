"""Behaviour every PersonIndex backend must show; subclassed per backend with an ``mpi_url`` fixture."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from mpi_helpers import FAMILY, GIVEN, patient, population

from bridge.stores.mpi import (
    MatchState,
    MpiConfig,
    MpiConflict,
    MpiError,
    MpiInputError,
    MpiNotFound,
    PersonIndex,
    person_id_for,
)
from bridge.stores.mpi.linking import candidates
from bridge.stores.mpi.persons import component

ALICE_A = patient(
    "a1",
    "Alice",
    "Andersen",
    "1980-04-12",
    "female",
    line="12 Elm Street",
    city="Metro",
    postal="12345",
    phone="+1 555 123 4567",
    ssn="123-45-6789",
)
ALICE_B = patient(
    "b1",
    "Alicia",
    "Andersen",
    "1980-12-04",
    "female",
    line="12 Elm St",
    city="Metro",
    postal="12345",
    phone="5551234567",
    ssn="123456789",
)
BOB = patient(
    "c1", "Bob", "Baptiste", "1975-01-30", "male", line="9 Oak Road", city="Northville", postal="54321"
)
# same person as ALICE_A by name and birth date but moved away, no identifiers: a possible match
ALICE_C = patient(
    "c2", "Alice", "Andersen", "1980-04-12", None, line="400 Harbour View", city="Portside", postal="99999"
)


class StoreContract:
    @pytest.fixture
    def mpi(self, mpi_url: str) -> Iterator[PersonIndex]:
        idx = PersonIndex.open(mpi_url)
        yield idx
        idx.close()

    def test_match_links_records_into_one_person(self, mpi: PersonIndex) -> None:
        mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B), ("org-c", BOB)])
        assert mpi.linked_patient_ids("a1") == ["a1", "b1"]
        assert mpi.linked_patient_ids("b1") == ["b1", "a1"]
        assert mpi.linked_patient_ids("c1") == ["c1"]
        pid = mpi.person_id("a1")
        assert pid == mpi.person_id("b1") == person_id_for("a1")
        person = mpi.person(pid)
        assert {p["patient_id"]: p["source_org"] for p in person["patients"]} == {
            "a1": "org-a",
            "b1": "org-b",
        }
        [link] = person["links"]
        assert (link["patient_a"], link["patient_b"], link["state"], link["origin"]) == (
            "a1",
            "b1",
            "MATCH",
            "auto",
        )
        assert link["score"] > 0.95
        assert [h["action"] for h in mpi.history("a1")][:1] == ["auto-match"]

    def test_unknown_ids(self, mpi: PersonIndex) -> None:
        assert mpi.person_id("nope") is None
        assert mpi.linked_patient_ids("nope") == ["nope"]
        with pytest.raises(MpiNotFound):
            mpi.person("no-such-person")
        with pytest.raises(MpiNotFound):
            mpi.link("nope", "nada", actor="dr")
        with pytest.raises(MpiNotFound):
            mpi.history("nope")

    def test_reupsert_is_idempotent(self, mpi: PersonIndex) -> None:
        mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B)])
        before = (mpi.history(mpi.person_id("a1") or ""), mpi.stats())
        mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B)])
        mpi.upsert_patients([("org-b", ALICE_B)])
        assert (mpi.history(mpi.person_id("a1") or ""), mpi.stats()) == before

    def test_updated_patient_is_rescored(self, mpi: PersonIndex) -> None:
        mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B)])
        moved = patient(
            "b1", "Zed", "Zimmer", "2001-07-07", "male", line="1 Far Away", city="Elsewhere", postal="00001"
        )
        mpi.upsert_patients([("org-b", moved)])
        assert mpi.linked_patient_ids("a1") == ["a1"]
        assert mpi.person_id("b1") == person_id_for("b1")
        actions = [h["action"] for h in mpi.history("b1")]
        assert "record-updated" in actions and "person-split" in actions
        mpi.upsert_patients([("org-b", ALICE_B)])
        assert mpi.linked_patient_ids("a1") == ["a1", "b1"]
        assert_graph_is_current(mpi)

    def test_possible_match_goes_to_review_not_to_the_person(self, mpi: PersonIndex) -> None:
        mpi.upsert_patients([("org-a", ALICE_A), ("org-c", ALICE_C)])
        assert mpi.linked_patient_ids("a1") == ["a1"]
        assert mpi.linked_patient_ids("a1", include_possible=True) == ["a1", "c2"]
        [item] = mpi.review_queue()
        assert {item["patient_a"], item["patient_b"]} == {"a1", "c2"}
        assert 0.30 <= item["score"] < 0.95
        assert item["demographics_a"]["family"] == "andersen"
        person = mpi.person(mpi.person_id("a1") or "")
        assert [lk["state"] for lk in person["links"]] == ["POSSIBLE_MATCH"]
        assert mpi.review_queue(offset=1) == []

    def test_manual_link_and_unlink_with_history(self, mpi: PersonIndex) -> None:
        mpi.upsert_patients([("org-a", ALICE_A), ("org-c", ALICE_C)])
        mpi.link("c2", "a1", actor="dr.who", reason="same person, confirmed by phone")
        assert mpi.linked_patient_ids("a1") == ["a1", "c2"]
        assert mpi.review_queue() == []
        # the matcher never overrides: a re-score of c2 keeps the manual link
        mpi.upsert_patients([("org-c", {**ALICE_C, "gender": "female"})])
        assert mpi.linked_patient_ids("c2") == ["c2", "a1"]
        mpi.unlink("a1", "c2", actor="dr.who", reason="twins")
        assert mpi.linked_patient_ids("a1") == ["a1"]
        assert mpi.linked_patient_ids("a1", include_possible=True) == ["a1"]
        assert mpi.person_id("c2") == person_id_for("c2")
        hist = mpi.history("c2")
        manual = [
            (h["action"], h.get("actor"), h.get("reason")) for h in hist if h["action"] in ("link", "unlink")
        ]
        assert manual == [
            ("link", "dr.who", "same person, confirmed by phone"),
            ("unlink", "dr.who", "twins"),
        ]
        assert any(h["action"] == "person-merged" for h in mpi.history(person_id_for("a1")))

    def test_unlink_cuts_automatic_match_and_matcher_respects_it(self, mpi: PersonIndex) -> None:
        mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B)])
        mpi.unlink("a1", "b1", actor="registrar")
        assert mpi.linked_patient_ids("a1") == ["a1"]
        mpi.upsert_patients([("org-b", {**ALICE_B, "gender": "female", "birthDate": "1980-04-12"})])
        assert mpi.linked_patient_ids("a1") == ["a1"]
        # the re-scored pair was left alone: no new event, the manual decision stays in place
        assert [
            h["action"] for h in mpi.history("a1") if {h["patient_a"], h["patient_b"]} == {"a1", "b1"}
        ] == [
            "auto-match",
            "unlink",
        ]
        assert mpi.db.all(
            "SELECT state, origin FROM mpi_pair WHERE patient_a = 'a1' AND patient_b = 'b1'"
        ) == [("NO_MATCH", "manual")]
        # a third record matching both cannot bridge the unlinked pair
        third = {**ALICE_A, "id": "d1"}
        mpi.upsert_patients([("org-d", third)])
        assert mpi.person_id("a1") != mpi.person_id("b1")
        assert "d1" in mpi.linked_patient_ids("a1") or "d1" in mpi.linked_patient_ids("b1")
        assert_graph_is_current(mpi)

    def test_unlink_conflicting_with_manual_links_is_refused(self, mpi: PersonIndex) -> None:
        mpi.upsert_patients([("org-a", ALICE_A), ("org-c", BOB), ("org-c", ALICE_C)])
        mpi.link("a1", "c1", actor="u")
        mpi.link("c1", "c2", actor="u")
        with pytest.raises(MpiConflict):
            mpi.unlink("a1", "c2", actor="u")
        assert sorted(mpi.linked_patient_ids("a1")) == ["a1", "c1", "c2"]
        assert not [h for h in mpi.history("a1") if h["action"] == "unlink"]
        with pytest.raises(MpiInputError):
            mpi.link("a1", "a1", actor="u")
        with pytest.raises(MpiInputError):
            mpi.link("a1", "c1", actor="")

    def test_link_conflicting_with_a_manual_unlink_is_refused(self, mpi: PersonIndex) -> None:
        """The mirror case of the test above (the link was accepted and put two
        manually unlinked records into one person)."""
        mpi.upsert_patients([("org-a", ALICE_A), ("org-c", BOB), ("org-c", ALICE_C)])
        mpi.link("a1", "c1", actor="u")
        mpi.unlink("c1", "c2", actor="u")
        before = (
            mpi.db.all("SELECT * FROM mpi_pair ORDER BY rec_hi, rec_lo"),
            mpi.history("a1"),
            mpi.history("c2"),
        )
        with pytest.raises(MpiConflict, match="'c1' and 'c2'"):
            mpi.link("a1", "c2", actor="u")
        assert sorted(mpi.linked_patient_ids("a1")) == ["a1", "c1"]
        assert mpi.linked_patient_ids("c2") == ["c2"]
        after = (
            mpi.db.all("SELECT * FROM mpi_pair ORDER BY rec_hi, rec_lo"),
            mpi.history("a1"),
            mpi.history("c2"),
        )
        assert after == before  # nothing changed
        # the latest decision on the unlinked pair itself still wins: linking c1 and c2 replaces it
        mpi.link("c1", "c2", actor="u")
        assert sorted(mpi.linked_patient_ids("a1")) == ["a1", "c1", "c2"]
        assert_graph_is_current(mpi)

    def test_person_id_is_stable_and_aliases_follow_merges(self, mpi: PersonIndex) -> None:
        mpi.upsert_patients([("org-a", ALICE_A)])
        first = mpi.person_id("a1")
        mpi.upsert_patients([("org-c", BOB)])
        mpi.upsert_patients([("org-b", ALICE_B)])
        assert mpi.person_id("a1") == mpi.person_id("b1") == first
        bob = mpi.person_id("c1")
        mpi.link("c1", "b1", actor="u")
        assert mpi.person_id("c1") == first
        assert mpi.person(bob or "")["id"] == first  # merged id still resolves
        mpi.unlink("c1", "b1", actor="u")
        assert mpi.person_id("c1") == bob
        assert mpi.person(bob or "")["id"] == bob
        assert_graph_is_current(mpi)

    def test_identifier_typo_does_not_link_different_people(self, mpi: PersonIndex) -> None:
        carl = patient(
            "x1",
            "Carl",
            "Novak",
            "1950-02-02",
            "male",
            line="5 Lake Rd",
            city="Metro",
            postal="11111",
            ssn="111-22-3333",
        )
        dana = patient(
            "x2",
            "Dana",
            "Weber",
            "1999-09-19",
            "female",
            line="77 Hill St",
            city="Uptown",
            postal="22222",
            ssn="111-22-3333",
        )
        mpi.upsert_patients([("org-a", carl), ("org-b", dana)])
        assert mpi.linked_patient_ids("x1") == ["x1"]
        [item] = mpi.review_queue()
        assert {item["patient_a"], item["patient_b"]} == {"x1", "x2"}
        # same identifier and corroborating demographics despite two typos in the name: deterministic MATCH
        carl2 = patient("x3", "Karl", "Nowak", "1950-02-02", None, ssn="111223333")
        mpi.upsert_patients([("org-c", carl2)])
        assert mpi.linked_patient_ids("x1") == ["x1", "x3"]

    def test_bad_input_is_located_and_writes_nothing(self, mpi: PersonIndex) -> None:
        with pytest.raises(MpiInputError, match=r"patients\[1\]"):
            mpi.upsert_patients([("org-a", ALICE_A), ("org-b", {"resourceType": "Observation", "id": "o"})])
        with pytest.raises(MpiInputError, match=r"patients\[0\].*id"):
            mpi.upsert_patients([("org-a", {"resourceType": "Patient"})])
        with pytest.raises(MpiInputError, match="source_org"):
            mpi.upsert_patients([("", ALICE_A)])
        assert mpi.stats()["records"] == 0

    def test_em_runs_once_enough_records_and_is_persisted(self, mpi_url: str) -> None:
        cfg = dataclasses.replace(MpiConfig(), em_min_records=60)
        recs, truth = population(80)
        with PersonIndex.open(mpi_url, cfg) as mpi:
            mpi.upsert_patients(recs[:40])
            assert mpi.model().source == "prior"
            mpi.upsert_patients(recs[40:])
            model = mpi.model()
            assert model.source == "em" and model.fitted_on_records == len(recs)
            found = {
                frozenset((a, b))
                for a, *_ in [(r[1]["id"],) for r in recs]
                for b in mpi.linked_patient_ids(a)[1:]
            }
            assert len(found & truth) >= 0.9 * len(truth)
            assert not (found - truth)
        with PersonIndex.open(mpi_url, cfg) as again:
            assert again.model().to_json() == model.to_json()
            again.reset()
            assert again.stats()["records"] == 0 and again.model().source == "prior"

    def test_second_connection_sees_committed_state(self, mpi: PersonIndex, mpi_url: str) -> None:
        with PersonIndex.open(mpi_url) as reader:
            assert reader.linked_patient_ids("a1") == ["a1"]
            mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B)])
            assert reader.linked_patient_ids("a1") == ["a1", "b1"]
            reader.link("a1", "b1", actor="reviewer")
        assert mpi.person(mpi.person_id("a1") or "")["links"][0]["origin"] == "manual"

    def test_review_queue_paging(self, mpi: PersonIndex) -> None:
        recs = []
        for i in range(5):
            g, f, born = GIVEN[i * 4], FAMILY[i * 4], f"19{50 + i * 7}-0{i + 1}-1{i}"
            recs.append(("org-a", patient(f"p{i}", g, f, born, None, city="A", postal=f"1000{i}")))
            recs.append(
                (
                    "org-b",
                    patient(f"q{i}", g, f, None, None, city="B", postal=f"2000{i}", line=f"{i} Other Rd"),
                )
            )
        mpi.upsert_patients(recs)
        full = mpi.review_queue(limit=100)
        assert len(full) == 5
        assert (
            mpi.review_queue(limit=2) + mpi.review_queue(limit=2, offset=2) + mpi.review_queue(offset=4)
            == full
        )
        assert [q["score"] for q in full] == sorted((q["score"] for q in full), reverse=True)
        with pytest.raises(MpiInputError):
            mpi.review_queue(limit=-1)

    def test_other_writer_invalidates_the_record_cache(self, mpi: PersonIndex, mpi_url: str) -> None:
        mpi.upsert_patients([("org-a", ALICE_A)])
        with PersonIndex.open(mpi_url) as other:
            other.upsert_patients([("org-b", ALICE_B)])  # loads a1 from the database, links b1 to it
            assert other.linked_patient_ids("b1") == ["b1", "a1"]
            # the other writer only added records: this one catches up (reads b1) without a rebuild
            before = mpi._state.cache
            mpi.upsert_patients([("org-d", {**ALICE_B, "id": "d0"})])
            assert mpi._state.cache is before and before is not None and "b1" in before
            assert mpi.linked_patient_ids("d0") == ["d0", "a1", "b1"]
            moved = patient("a1", "Zoe", "Quist", "1931-01-01", "female", city="Elsewhere")
            other.upsert_patients([("org-a", moved)])  # a1 changes: it no longer matches b1
        assert mpi.linked_patient_ids("a1") == ["a1"]
        # this writer's copy of a1 is stale: an ALICE record must not match the old a1 demographics
        mpi.upsert_patients([("org-c", {**ALICE_B, "id": "c1"})])
        assert mpi.linked_patient_ids("c1") == ["c1", "b1", "d0"]
        # re-upserting a1 with what the other writer stored is a no-op, not a change
        n_hist = len(mpi.history("a1"))
        mpi.upsert_patients([("org-a", moved)])
        assert len(mpi.history("a1")) == n_hist
        assert_graph_is_current(mpi)

    def test_person_graph_follows_the_database(self, mpi: PersonIndex, mpi_url: str) -> None:
        """The ingesting process's in-memory persons and links (bridge.stores.mpi.graph) equal what the database
        holds after batches, record updates and manual decisions made by another process, and its
        components are the database's (the pairs that can change a person)."""
        recs, _truth = population(60, seed=11)
        for k in range(0, len(recs), 15):
            mpi.upsert_patients(recs[k : k + 15])
        assert mpi._state.graph is not None  # built once this process was the only writer
        linked = [p["id"] for _, p in recs if len(mpi.linked_patient_ids(p["id"])) > 1]
        with PersonIndex.open(mpi_url) as other:  # the review API, say
            a, b = linked[0], mpi.linked_patient_ids(linked[0])[1]
            other.unlink(a, b, actor="registrar")
            other.link(linked[-1], recs[0][1]["id"], actor="registrar")
        org, first = recs[1]
        mpi.upsert_patients([(org, {**first, "birthDate": "1901-01-01"})])  # an update: pairs re-scored
        # everything again, a third of it changed (re-scored); nothing may join a and b again
        changed = [(o, {**r, "gender": "other"} if i % 3 == 0 else r) for i, (o, r) in enumerate(recs)]
        for k in range(0, len(changed), 20):
            mpi.upsert_patients(changed[k : k + 20])
        mpi.upsert_patients([("org-z", {**recs[2][1], "id": "copy-of-2"})])
        graph = mpi._state.graph
        assert graph is not None
        assert_graph_is_current(mpi)
        assert mpi.person_id(a) != mpi.person_id(b)
        cache = mpi._state.cache
        assert cache is not None
        for seeds in ([a], [b, "copy-of-2"], [p["id"] for _, p in recs[::7]]):
            info, pairs = graph.component(seeds, lambda pid: cache.state[pid][2])
            with mpi.db.read():
                want_info, want_pairs = component(mpi.db, seeds)
            assert info == want_info
            assert pairs == [x for x in want_pairs if x[2] == "MATCH" or x[4] == "manual"]

    def test_a_manual_unlink_elsewhere_reaches_the_ingesting_process(
        self, mpi: PersonIndex, mpi_url: str
    ) -> None:
        mpi.upsert_patients([("org-a", ALICE_A)])
        mpi.upsert_patients([("org-b", ALICE_B)])
        mpi.upsert_patients([("org-c", BOB)])
        assert mpi._state.graph is not None and mpi.linked_patient_ids("a1") == ["a1", "b1"]
        with PersonIndex.open(mpi_url) as other:
            other.unlink("a1", "b1", actor="registrar")
        # a third record matching both cannot bridge them: the ingesting process must know of the unlink
        mpi.upsert_patients([("org-d", {**ALICE_A, "id": "d1"})])
        assert mpi.person_id("a1") != mpi.person_id("b1")
        assert_graph_is_current(mpi)
        mpi.upsert_patients([("org-e", {**BOB, "id": "e1"})])
        assert mpi._state.graph is not None  # rebuilt once this process was again the only writer
        assert_graph_is_current(mpi)

    def test_failed_batch_leaves_no_trace_in_memory(
        self, mpi: PersonIndex, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def boom(*args: object, **kwargs: object) -> dict[str, str]:
            raise RuntimeError("disk full")

        monkeypatch.setattr("bridge.stores.mpi.linking.recluster", boom)
        with pytest.raises(RuntimeError):
            mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B)])
        monkeypatch.undo()
        assert mpi.stats()["records"] == 0
        mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B)])  # not mistaken for a no-op
        assert mpi.linked_patient_ids("a1") == ["a1", "b1"]

    def test_background_insert_joins_the_transaction(self, mpi: PersonIndex) -> None:
        """Rows inserted on the database's worker thread commit or roll back with the transaction, and
        the worker's error reaches the caller."""
        db = mpi.db
        sql = "INSERT INTO mpi_alias (old_id, person_id) VALUES (?, ?)"
        with pytest.raises(MpiError, match="inside a write transaction"):
            db.insert_many_background(sql, [("x", "y")], ("text", "text"))
        with db.write():
            pending = db.insert_many_background(
                sql, [(f"o{i}", f"p{i}") for i in range(50)], ("text", "text")
            )
            pending.wait()
            pending.wait()  # idempotent
        assert db.one("SELECT COUNT(*) FROM mpi_alias") == (50,)
        with pytest.raises(RuntimeError, match="rolled back"), db.write():
            db.insert_many_background(sql, [("o100", "p")], ("text", "text")).wait()
            raise RuntimeError("rolled back")
        assert db.one("SELECT COUNT(*) FROM mpi_alias") == (50,)
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"), db.write():  # at the call or the wait
            db.insert_many_background(sql, [("o1", "again")], ("text", "text")).wait()
        assert db.one("SELECT person_id FROM mpi_alias WHERE old_id = 'o1'") == ("p1",)

    def test_statements_after_a_background_insert_see_it(self, mpi: PersonIndex) -> None:
        """On PostgreSQL a background insert runs on the worker thread; the next statement of the writing
        thread waits for it, so it sees the rows (and an error of it is raised there, in the transaction)."""
        db = mpi.db
        rows = [(f"k{i}", "v") for i in range(5000)]
        with db.write():
            db.insert_many_background(
                "INSERT INTO mpi_meta (key, value) VALUES (?, ?)", rows, ("text", "text")
            )
            assert db.one("SELECT COUNT(*) FROM mpi_meta WHERE key LIKE 'k%'") == (5000,)
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"), db.write():
            db.insert_many_background(
                "INSERT INTO mpi_meta (key, value) VALUES (?, ?)", rows[:1], ("text", "text")
            )
            db.one("SELECT 1")
        assert db.one("SELECT COUNT(*) FROM mpi_meta WHERE key LIKE 'k%'") == (5000,)

    def test_review_queue_reads_the_possible_match_index(self, mpi: PersonIndex) -> None:
        names = {
            r[0]
            for r in (
                mpi.db.all("SELECT name FROM sqlite_master WHERE type = 'index'")
                if mpi.db.kind == "sqlite"
                else mpi.db.all("SELECT indexname FROM pg_indexes WHERE tablename LIKE 'mpi_%'")
            )
        }
        assert "mpi_pair_possible" in names and "mpi_pair_state" not in names
        # pairs and history are found by record numbers, not by the (random) uuid-like record ids
        assert {"mpi_pair_lo", "mpi_history_rec_a", "mpi_history_rec_b"} <= names
        assert not names & {"mpi_pair_b", "mpi_history_a", "mpi_history_b"}

    def test_em_patterns_survive_reopening(self, mpi_url: str) -> None:
        cfg = dataclasses.replace(MpiConfig(), em_min_records=40)
        recs, _ = population(60, seed=5)
        with PersonIndex.open(mpi_url, cfg) as mpi:
            mpi.upsert_patients(recs[:30])
            assert mpi.model().source == "prior"
        with PersonIndex.open(mpi_url, cfg) as mpi:  # a new process: counts come back from the database
            mpi.upsert_patients(recs[30:])
            incremental = mpi.model()
            assert incremental.source == "em" and incremental.fitted_on_records == len(recs)
            # the counted comparison vectors are exactly the candidate pairs a full refit compares
            assert mpi.fit().fitted_on_pairs == incremental.fitted_on_pairs

    def test_a_refit_elsewhere_is_seen_before_the_next_batch(self, mpi_url: str) -> None:
        """A full refit by another process may replace the stored EM counts; the consumer's next batch
        must count on top of those, not write its own older copy over them. Hardest case: an index
        written before counts were kept (the consumer has no copy at all)."""
        from bridge.stores.mpi.cache import load_patterns

        cfg = dataclasses.replace(MpiConfig(), em_min_records=10_000)  # no automatic fit in between
        recs, _ = population(60, seed=7)
        with PersonIndex.open(mpi_url, cfg) as mpi:
            mpi.upsert_patients(recs[:30])
            mpi.db.execute("DELETE FROM mpi_meta WHERE key = 'em_patterns'")
        with PersonIndex.open(mpi_url, cfg) as consumer, PersonIndex.open(mpi_url, cfg) as other:
            consumer.upsert_patients(recs[30:31])  # loads its cache: no counts in the database
            other.fit()  # a full recount, stored
            consumer.upsert_patients(recs[31:])
            stored = consumer.db.one("SELECT value FROM mpi_meta WHERE key = 'em_patterns'")
            assert stored is not None
            other.fit()  # recount everything: what the stored counts must already be
            recount = consumer.db.one("SELECT value FROM mpi_meta WHERE key = 'em_patterns'")
            assert recount is not None and load_patterns(stored[0]) == load_patterns(recount[0])

    def test_counts_are_kept_whichever_process_writes_after_a_batch_without_pairs(self, mpi_url: str) -> None:
        """A first batch with no candidate pairs stores its (empty) EM counts, so another process goes on
        counting instead of taking the index for one written before counts were kept."""
        from bridge.stores.mpi.cache import load_patterns

        recs, _ = population(40, seed=3)
        with PersonIndex.open(mpi_url) as first, PersonIndex.open(mpi_url) as second:
            first.upsert_patients(recs[:1])  # one record: nothing to compare
            second.upsert_patients(recs[1:])
            stored = second.db.one("SELECT value FROM mpi_meta WHERE key = 'em_patterns'")
            assert stored is not None and second._state.cache is not None
            assert second._state.cache.patterns == load_patterns(stored[0])
            assert sum(load_patterns(stored[0]).values()) > 0

    def test_a_batch_weighs_with_the_model_stored_last(self, mpi_url: str) -> None:
        """A writer remembers the stored model between its batches only while no other process writes:
        after a fit elsewhere, its next batch weighs with the new parameters."""
        cfg = dataclasses.replace(MpiConfig(), em_min_records=10_000)  # no automatic fit
        recs, _ = population(60, seed=7)
        with PersonIndex.open(mpi_url, cfg) as consumer, PersonIndex.open(mpi_url, cfg) as other:
            consumer.upsert_patients(recs[:30])
            consumer.upsert_patients(recs[30:40])  # the only writer: the (absent) model is remembered
            assert consumer._state.model_blob_known and consumer._state.model_blob is None
            model = other.fit()
            stored = other.db.one("SELECT value FROM mpi_meta WHERE key = 'model'")
            assert stored is not None and model.fitted_on_records == 40
            consumer.upsert_patients(recs[40:])
            assert consumer._state.model_blob == stored[0]
            assert consumer._state.model_from(consumer._state.model_blob).fitted_on_records == 40

    def test_a_batch_that_changes_nothing_does_not_keep_an_old_model(self, mpi_url: str) -> None:
        """After a fit elsewhere, a batch that changes nothing takes the new generation token without
        needing the model; the batch after it, the only writer's again, must still weigh with the model
        stored last (it weighed with the one remembered from before the fit)."""
        cfg = dataclasses.replace(MpiConfig(), em_min_records=10_000)  # no automatic fit
        recs, _ = population(60, seed=7)
        with PersonIndex.open(mpi_url, cfg) as consumer, PersonIndex.open(mpi_url, cfg) as other:
            consumer.upsert_patients(recs[:30])
            consumer.upsert_patients(recs[30:40])
            other.fit()
            stored = other.db.one("SELECT value FROM mpi_meta WHERE key = 'model'")
            assert stored is not None
            consumer.upsert_patients(recs[:1])  # identical demographics: nothing to do
            consumer.upsert_patients(recs[40:])
            assert consumer._state.model_blob == stored[0]

    def test_a_reset_elsewhere_forgets_the_model(self, mpi_url: str) -> None:
        """A reset by another process deletes the model. A first batch after it that compares nothing
        (one record) must not leave the old model remembered: the index refits once it has enough
        records again, as a fresh process would."""
        cfg = dataclasses.replace(MpiConfig(), em_min_records=40, em_refit_factor=2.0)
        recs, _ = population(60, seed=7)
        with PersonIndex.open(mpi_url, cfg) as consumer, PersonIndex.open(mpi_url, cfg) as other:
            consumer.upsert_patients(recs[:50])
            assert consumer.model().fitted_on_records >= 40
            other.reset()
            consumer.upsert_patients(recs[:1])  # one record: no candidate pairs, no model needed
            consumer.upsert_patients(recs[1:45])
            assert consumer.model().fitted_on_records == 45  # without the fit: the priors, fitted on 0

    def test_a_rolled_back_fit_is_not_weighed_with(
        self, mpi_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A fit whose transaction rolls back never stored its model; no later batch may weigh with it,
        not even after a batch that changes nothing."""
        cfg = dataclasses.replace(MpiConfig(), em_min_records=10_000)  # no automatic fit
        recs, _ = population(60, seed=7)
        with PersonIndex.open(mpi_url, cfg) as mpi:
            mpi.upsert_patients(recs[:40])
            mpi.fit()
            mpi.upsert_patients(recs[40:50])
            stored = mpi.db.one("SELECT value FROM mpi_meta WHERE key = 'model'")

            def fail(*_: object, **__: object) -> None:
                raise OSError("disk I/O error")

            monkeypatch.setattr(mpi._state, "bump_generation", fail)  # the fit's last statement
            with pytest.raises(OSError, match="disk I/O"):
                mpi.fit()
            monkeypatch.undo()
            assert mpi.db.one("SELECT value FROM mpi_meta WHERE key = 'model'") == stored
            mpi.upsert_patients(recs[:1])  # identical demographics: nothing to do
            mpi.upsert_patients(recs[50:])
            assert stored is not None and mpi._state.model_blob == stored[0]
            assert mpi._state.model_from(mpi._state.model_blob).fitted_on_records == 40

    def test_write_settles_background_inserts_before_a_rollback(self, mpi: PersonIndex) -> None:
        """A caller that fails without waiting for its background insert: the insert still belongs to
        the rolled-back transaction (on PostgreSQL it could run after the rollback,
        on the autocommit connection, and commit on its own)."""
        db = mpi.db
        sql = "INSERT INTO mpi_alias (old_id, person_id) VALUES (?, ?)"
        for _ in range(5):
            with pytest.raises(RuntimeError, match="no wait"), db.write():
                db.insert_many_background(sql, [(f"x{i}", "p") for i in range(2000)], ("text", "text"))
                raise RuntimeError("no wait")
        with db.write():
            db.insert_many_background(sql, [("y", "p")], ("text", "text"))  # committed without a wait
        assert db.one("SELECT COUNT(*) FROM mpi_alias") == (1,)

    def test_oversized_blocks_are_skipped(self, mpi: PersonIndex) -> None:
        """A default birth date shared by 500 records (and a common given name) must not make
        every pair a candidate; the other blocking keys still link true duplicates."""
        import random
        import time

        rng = random.Random(4)
        families = sorted(
            {
                "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
                for _ in range(120)
            }
        )[:97]
        recs = [
            (
                "org-a",
                patient(
                    f"ann{i}",
                    "Ann",
                    families[i % 97],
                    "1970-01-01",
                    "female",
                    line=f"{i} Main St",
                    postal=f"{10000 + i}",
                ),
            )
            for i in range(480)
        ]
        # 20 true duplicates: same person at another provider, with a typo in the street
        recs += [
            (
                "org-b",
                patient(
                    f"dup{i}",
                    "Ann",
                    families[i % 97],
                    "1970-01-01",
                    "female",
                    line=f"{i} Main Str",
                    postal=f"{10000 + i}",
                ),
            )
            for i in range(20)
        ]
        started = time.perf_counter()
        mpi.upsert_patients(recs)
        elapsed = time.perf_counter() - started
        assert elapsed < 5.0  # 17.8 s before blocks were capped (generous bound: shared CI machines)
        for i in range(20):
            assert f"dup{i}" in mpi.linked_patient_ids(f"ann{i}")
        cache = mpi._state.cache
        assert cache is not None and len(cache.members("b:19700101f")) == 500
        changed = [p["id"] for _, p in recs]
        ia, ib = candidates(cache, changed, cache.placed(changed), mpi.config.max_block_size)
        # the b:19700101f block alone would make all 124 750 pairs candidates; the other keys give ~13 000
        assert len(ia) < 500 * 499 // 2 // 5
        pairs = {
            frozenset((cache.ids[a], cache.ids[b])) for a, b in zip(ia.tolist(), ib.tolist(), strict=True)
        }
        assert len(pairs) == len(ia)  # each pair once
        assert frozenset(("ann0", "dup0")) in pairs


def assert_graph_is_current(mpi: PersonIndex) -> None:
    """The in-memory person graph, if the index holds one, is what the database says."""
    from bridge.stores.mpi.graph import PersonGraph

    if mpi._state.graph is None:
        return
    with mpi.db.read():
        fresh = PersonGraph.load(mpi.db)
    assert mpi._state.graph.person_of == fresh.person_of
    assert mpi._state.graph.members == fresh.members
    assert mpi._state.graph.links == fresh.links


def test_match_state_is_a_str_enum() -> None:
    assert MatchState("MATCH") is MatchState.MATCH and str(MatchState.POSSIBLE_MATCH) == "POSSIBLE_MATCH"


class ConcurrencyContract:
    def test_concurrent_writers_are_serialised(self, mpi_url: str) -> None:
        import threading

        recs, truth = population(60, seed=9)
        a_side = [r for r in recs if r[0] == "org-a"]
        b_side = [r for r in recs if r[0] == "org-b"]
        errors: list[BaseException] = []

        def load(batch: list) -> None:
            try:
                with PersonIndex.open(mpi_url) as idx:
                    for i in range(0, len(batch), 7):
                        idx.upsert_patients(batch[i : i + 7])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(side,)) for side in (a_side, b_side)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
        with PersonIndex.open(mpi_url) as idx:
            assert idx.stats()["records"] == len(recs)
            found = {frozenset((r[1]["id"], o)) for r in recs for o in idx.linked_patient_ids(r[1]["id"])[1:]}
        assert not (found - truth)
        assert len(found & truth) >= 0.9 * len(truth)


class MigrationContract:
    """An index written before pairs and history were keyed by record numbers opens, and reads and
    links as before (the layout that shipped up to that change, recreated here by hand)."""

    OLD_PAIR = (
        "CREATE TABLE mpi_pair (patient_a TEXT NOT NULL, patient_b TEXT NOT NULL, state TEXT NOT NULL, "
        "score DOUBLE PRECISION, origin TEXT NOT NULL, actor TEXT, reason TEXT, updated_at TEXT NOT NULL, "
        "PRIMARY KEY (patient_a, patient_b))"
    )
    OLD_INDEXES = (
        "CREATE INDEX mpi_pair_b ON mpi_pair (patient_b)",
        "CREATE INDEX mpi_pair_possible ON mpi_pair (score DESC, patient_a, patient_b) "
        "WHERE state = 'POSSIBLE_MATCH'",
        "CREATE INDEX mpi_history_a ON mpi_history (patient_a)",
        "CREATE INDEX mpi_history_b ON mpi_history (patient_b)",
        "CREATE INDEX mpi_history_person ON mpi_history (person_id)",
        "CREATE INDEX mpi_history_other ON mpi_history (other_person_id)",
    )

    def _downgrade(self, mpi: PersonIndex) -> None:
        db = mpi.db
        with db.write():
            pairs = db.all(
                "SELECT patient_a, patient_b, state, score, origin, actor, reason, updated_at FROM mpi_pair"
            )
            history = db.all(
                "SELECT seq, at, action, patient_a, patient_b, person_id, other_person_id, actor, reason, "
                "score, detail FROM mpi_history"
            )
            db.execute("DROP TABLE mpi_pair")
            db.execute("DROP TABLE mpi_history")
            db.execute(self.OLD_PAIR)
            serial = (
                "BIGSERIAL PRIMARY KEY" if db.kind == "postgresql" else "INTEGER PRIMARY KEY AUTOINCREMENT"
            )
            db.execute(
                f"CREATE TABLE mpi_history (seq {serial}, at TEXT NOT NULL, action TEXT NOT NULL, "
                "patient_a TEXT, patient_b TEXT, person_id TEXT, other_person_id TEXT, actor TEXT, "
                "reason TEXT, score DOUBLE PRECISION, detail TEXT)"
            )
            for stmt in self.OLD_INDEXES:
                db.execute(stmt)
            db.executemany("INSERT INTO mpi_pair VALUES (?, ?, ?, ?, ?, ?, ?, ?)", pairs)
            db.executemany("INSERT INTO mpi_history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", history)
            if db.kind == "postgresql":  # rows were inserted with their seq: move the sequence past them
                db.execute("SELECT setval('mpi_history_seq_seq', (SELECT MAX(seq) FROM mpi_history))")

    def test_an_old_layout_is_migrated_on_open(self, mpi_url: str) -> None:
        with PersonIndex.open(mpi_url) as mpi:
            mpi.reset()
            mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B), ("org-c", BOB), ("org-d", ALICE_C)])
            mpi.unlink("a1", "b1", actor="alice")
            mpi.link("a1", "b1", actor="bob", reason="same person after all")
            person = mpi.person_id("a1")
            assert person is not None
            before = (mpi.person(person), mpi.history("a1"), mpi.history(person), mpi.review_queue())
            self._downgrade(mpi)
            assert "rec_hi" not in (mpi.db.columns("mpi_pair") or [])
        with PersonIndex.open(mpi_url) as mpi:
            assert "rec_hi" in (mpi.db.columns("mpi_pair") or [])
            assert (mpi.person(person), mpi.history("a1"), mpi.history(person), mpi.review_queue()) == before
            # and it keeps working: a manual decision on a migrated pair, new records, their history
            mpi.unlink("a1", "b1", actor="carol")
            assert mpi.linked_patient_ids("a1") == ["a1"]
            mpi.upsert_patients(
                [
                    (
                        "org-e",
                        patient(
                            "e1",
                            "Bob",
                            "Baptiste",
                            "1975-01-30",
                            "male",
                            line="9 Oak Road",
                            city="Northville",
                            postal="54321",
                        ),
                    )
                ]
            )
            assert mpi.linked_patient_ids("c1") == ["c1", "e1"]
            assert [h["action"] for h in mpi.history("a1")][-1] == "unlink"
            assert any(h["action"] == "auto-match" for h in mpi.history("e1"))
        with PersonIndex.open(mpi_url) as mpi:  # opening a migrated index again changes nothing
            assert mpi.linked_patient_ids("c1") == ["c1", "e1"]

    def test_a_migration_that_would_lose_pairs_changes_nothing(self, mpi_url: str) -> None:
        with PersonIndex.open(mpi_url) as mpi:
            mpi.reset()
            mpi.upsert_patients([("org-a", ALICE_A), ("org-b", ALICE_B)])
            self._downgrade(mpi)
            with mpi.db.write():  # a pair naming a record the index does not hold
                mpi.db.execute(
                    "INSERT INTO mpi_pair VALUES ('a1', 'zz', 'MATCH', 1.0, 'manual', 'x', NULL, 'now')"
                )
        with pytest.raises(MpiError, match=r"1 of 2 pairs name records that are not indexed"):
            PersonIndex.open(mpi_url)
        # still the old layout, with both pairs (read without opening the index, which would migrate)
        assert _raw_one(mpi_url, "SELECT COUNT(*) FROM mpi_pair WHERE patient_a = 'a1'") == (2,)
        assert _raw_one(mpi_url, "SELECT COUNT(*) FROM mpi_pair_old") is None  # no half-done rename
        with pytest.raises(Exception, match="rec_hi"):
            _raw_one(mpi_url, "SELECT rec_hi FROM mpi_pair")


def _raw_one(url: str, sql: str) -> tuple[object, ...] | None:
    """One row of ``sql`` on a plain connection to the index's database (None if the statement fails
    because a table is missing; other errors propagate)."""
    if url.startswith("postgres"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            try:
                return conn.execute(sql).fetchone()
            except psycopg.errors.UndefinedTable:
                return None
    import sqlite3

    conn = sqlite3.connect(url[len("sqlite://") :])
    try:
        return conn.execute(sql).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    finally:
        conn.close()
