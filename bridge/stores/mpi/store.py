"""The incremental master patient index (:class:`PersonIndex`) on SQLite or PostgreSQL.

:class:`PersonIndex` is the public face; the work lives in the modules it calls, each taking the
process's :class:`~bridge.stores.mpi.state.IndexState`:

* :mod:`bridge.stores.mpi.state`: the database, the configuration, the in-memory copies and the generation
  token that says when to trust them;
* :mod:`bridge.stores.mpi.linking`: a batch of Patients, from features to stored pairs;
* :mod:`bridge.stores.mpi.fitting`: EM refits;
* :mod:`bridge.stores.mpi.persons`: person ids, reclustering and the person look-ups;
* :mod:`bridge.stores.mpi.review`: the review queue, a person's link set, the history, manual decisions;
* :mod:`bridge.stores.mpi.explain`: why two records match, field by field;
* :mod:`bridge.stores.mpi.history`: the history's events;
* :mod:`bridge.stores.mpi.db`: the connection and the schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge.stores.mpi import fitting, linking, persons, review
from bridge.stores.mpi.config import MpiConfig
from bridge.stores.mpi.db import TABLES, Database
from bridge.stores.mpi.explain import Explanation, explain_pair
from bridge.stores.mpi.model import FSModel
from bridge.stores.mpi.state import IndexState


class PersonIndex:
    """The master patient index. Open with :meth:`open`; every public method is one transaction.

    Writers (the index consumer, the review API) are serialised across processes; readers see
    committed state. Raises :class:`~bridge.stores.mpi.config.MpiError` subclasses on bad input, unknown ids
    and contradictory manual decisions.
    """

    def __init__(self, db: Database, config: MpiConfig) -> None:
        self._state = IndexState(db, config)

    @classmethod
    def open(cls, url: str, config: MpiConfig | None = None) -> PersonIndex:
        """Open (creating tables if needed) the index at ``sqlite:///path.db`` or ``postgresql://...``."""
        return cls(Database(url), config or MpiConfig())

    @property
    def db(self) -> Database:
        return self._state.db

    @property
    def config(self) -> MpiConfig:
        return self._state.config

    def close(self) -> None:
        self._state.db.close()

    def __enter__(self) -> PersonIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writes

    def claim_writer(self, holder: str, *, lease_s: float | None = None) -> int:
        """Become the MPI's only writer (``fhirbridge mpi run``, after it won the leader lock): a new
        writer epoch, which every later write transaction of this index checks first; once another
        linker claims, they raise :class:`~bridge.stores.mpi.config.MpiWriterFenced` and write nothing.
        ``lease_s``: PostgreSQL ends the session of a writer paused that long inside a transaction."""
        return self._state.db.claim_writer(holder, lease_s=lease_s)

    def hold_writer(self, epoch: int, *, lease_s: float | None = None) -> None:
        """Write under an epoch this process claimed on an earlier connection (after a reconnection)."""
        self._state.db.hold_writer(epoch, lease_s=lease_s)

    def writer(self) -> tuple[int, str, float] | None:
        """The current writer epoch, its holder and when it was claimed (None before any claim)."""
        return self._state.db.writer()

    def upsert_patients(self, patients: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Index a batch of ``(source_org, Patient)`` in one transaction.

        New and changed records are blocked and scored against the index; MATCH pairs are linked
        (persons merge), POSSIBLE_MATCH pairs go to the review queue; pairs with a manual decision are
        left alone. Re-upserting identical demographics is a no-op; a changed record loses its
        automatic pairs and is re-scored. Raises :class:`MpiInputError` (naming the batch position) if
        an item is not a Patient with an id or lacks a source organisation; nothing is written then.
        """
        linking.upsert_patients(self._state, patients)

    def link(self, patient_a: str, patient_b: str, actor: str, reason: str | None = None) -> None:
        """Manually declare two records the same person (their persons merge). The matcher never undoes it.

        Raises :class:`MpiNotFound` for an unknown record, :class:`MpiInputError` without an actor and
        :class:`MpiConflict` if the manual links would then join two records that were manually
        unlinked (undo that unlink first); nothing changes then.
        """
        review.link(self._state, patient_a, patient_b, actor, reason)

    def unlink(self, patient_a: str, patient_b: str, actor: str, reason: str | None = None) -> None:
        """Manually declare two records different people; automatic links joining them are cut.

        Raises :class:`MpiNotFound` for an unknown record and :class:`MpiConflict` if other *manual*
        links still join the two (unlink those first); nothing changes then.
        """
        review.unlink(self._state, patient_a, patient_b, actor, reason)

    def fit(self, *, total: int | None = None) -> FSModel:
        """Re-estimate m/u/lambda by EM on (a sample of) the stored records and persist them.

        Existing decisions are not re-scored; new comparisons use the new parameters.
        """
        return fitting.refit(self._state, total)

    def reset(self) -> None:
        """Delete everything (records, persons, pairs, history, parameters)."""
        state = self._state
        with state.db.write():
            for t in TABLES:
                state.db.execute(f"DELETE FROM {t}")
            state.forget()
            state.new_epoch()
        state.forget_model()

    # ------------------------------------------------------------------ reads

    def model(self) -> FSModel:
        """The current Fellegi–Sunter parameters (EM-fitted once enough records exist, else priors)."""
        return self._state.stored_model()

    def person_id(self, patient_id: str) -> str | None:
        """The person id of a record, or None if the record is not indexed."""
        return persons.person_id(self._state.db, patient_id)

    def resolve_person(self, person_id: str) -> str | None:
        """The live person id for ``person_id`` (following merge aliases), or None if unknown."""
        return persons.resolve_person(self._state.db, person_id)

    def linked_patient_ids(self, patient_id: str, include_possible: bool = False) -> list[str]:
        """Record ids of the same person as ``patient_id`` (itself included, first); sorted otherwise.

        With ``include_possible`` the records of persons joined to it by an unresolved POSSIBLE_MATCH
        are added too. An unindexed record yields ``[patient_id]``.
        """
        return persons.linked_patient_ids(self._state.db, patient_id, include_possible)

    def person(self, person_id: str) -> dict[str, Any]:
        """The link set of a person: records (with source org), pairs among them and open possible matches.

        Follows merge aliases (``id`` is the live id; ``requested_id`` what was asked). Raises
        :class:`MpiNotFound` for an unknown id.
        """
        return review.person(self._state.db, person_id)

    def review_queue(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Open POSSIBLE_MATCH pairs (records still in different persons), best score first.

        Each item has both record ids, source orgs, person ids, the score and the compared demographics.
        Raises :class:`MpiInputError` for a negative limit/offset.
        """
        return review.review_queue(self._state.db, limit, offset)

    def explain(self, patient_a: str, patient_b: str) -> Explanation:
        """Why two records match or not, field by field: the matcher's own comparison levels and
        weights for the pair now (stored model, current term frequencies), whose terms add up to its
        weight, with the pair's stored link state.

        Raises :class:`MpiNotFound` for an unknown record and :class:`MpiInputError` for one record
        compared with itself.
        """
        return explain_pair(self._state, patient_a, patient_b)

    def history(self, person_or_patient_id: str) -> list[dict[str, Any]]:
        """Link changes touching a record, or a person (its current records and its id), oldest first.

        Raises :class:`MpiNotFound` for an id that is neither.
        """
        return review.history_of(self._state.db, person_or_patient_id)

    def stats(self) -> dict[str, Any]:
        """Counts of records, persons, pairs by state, and the model's provenance."""
        db = self._state.db
        n_records = int(db.one("SELECT COUNT(*) FROM mpi_patient")[0])  # type: ignore[index]
        n_persons = int(db.one("SELECT COUNT(DISTINCT person_id) FROM mpi_patient")[0])  # type: ignore[index]
        by_state = {s: int(n) for s, n in db.all("SELECT state, COUNT(*) FROM mpi_pair GROUP BY state")}
        m = self.model()
        return {
            "records": n_records,
            "persons": n_persons,
            "pairs": by_state,
            "model": m.source,
            "model_fitted_on_records": m.fitted_on_records,
        }
