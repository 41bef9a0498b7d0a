"""In-memory copy of what reclustering reads: every record's person and the pairs that join or part them.

Reclustering (:func:`~bridge.stores.mpi.persons.recluster`) rebuilds the persons around a batch's
new MATCH pairs. It needs the *component* of those records: everything connected to them through
current persons or MATCH pairs, with the pairs among them. Read from the database, that is three
statements per step of the search, about 7 ms of a 100 ms batch of 1,000 records on SQLite and more on
PostgreSQL. :class:`PersonGraph` keeps the same facts in memory for the process that ingests:

* each record's person, and each person's records;
* the pairs that can change a person: MATCH pairs of either origin, and manual pairs of any state
  (a manual NO_MATCH keeps two records apart). POSSIBLE_MATCH pairs never join anything and are left out.

It is a write-through copy, valid only while this process is the only writer: the index drops it when
the generation token (``mpi_meta.records_gen``, which every write that changes records, pairs or
persons replaces) shows that another process wrote, and reads the database instead until a batch finds
the token as this process left it; then it loads the graph again (one pass over the records and the
MATCH pairs). Manual link and unlink replace the token too, so the review API's decisions are seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from bridge.stores.mpi.config import MatchState
from bridge.stores.mpi.db import Database

#: ``(state, score, origin)`` of a pair, seen from one of its records
Link = tuple[str, float | None, str]
MATCH = MatchState.MATCH.value


class PersonGraph:
    """Records' persons and the MATCH and manual pairs, for the search of reclustering components."""

    def __init__(self) -> None:
        self.person_of: dict[str, str] = {}
        self.members: dict[str, set[str]] = {}
        #: record -> other record -> (state, score, origin), for the pairs that matter (see module doc)
        self.links: dict[str, dict[str, Link]] = {}

    @classmethod
    def load(cls, db: Database) -> PersonGraph:
        """Read the graph from the database (inside the caller's transaction)."""
        graph = cls()
        for pid, person in db.all("SELECT patient_id, person_id FROM mpi_patient"):
            graph.add_record(pid, person)
        for a, b, state, score, origin in db.all(
            "SELECT patient_a, patient_b, state, score, origin FROM mpi_pair "
            f"WHERE state = '{MATCH}' OR origin = 'manual'"
        ):
            graph.set_pair(a, b, state, score, origin)
        return graph

    def add_record(self, pid: str, person: str) -> None:
        self.person_of[pid] = person
        self.members.setdefault(person, set()).add(pid)

    def move(self, pid: str, person: str) -> None:
        """Record ``pid`` now belongs to ``person``."""
        old = self.person_of.get(pid)
        if old is not None:
            group = self.members[old]
            group.discard(pid)
            if not group:
                del self.members[old]
        self.add_record(pid, person)

    def set_pair(self, a: str, b: str, state: str, score: float | None, origin: str) -> None:
        """The pair's current state (a pair that cannot change a person is forgotten)."""
        if state == MATCH or origin == "manual":
            self.links.setdefault(a, {})[b] = (state, score, origin)
            self.links.setdefault(b, {})[a] = (state, score, origin)
        else:
            self.drop_pair(a, b)

    def is_manual(self, a: str, b: str) -> bool:
        """Whether the pair holds a manual decision (the graph keeps every manual pair)."""
        link = self.links.get(a, {}).get(b)
        return link is not None and link[2] == "manual"

    def drop_pair(self, a: str, b: str) -> None:
        for x, y in ((a, b), (b, a)):
            links = self.links.get(x)
            if links is not None:
                links.pop(y, None)
                if not links:
                    del self.links[x]

    def drop_auto_pairs(self, pid: str) -> list[str]:
        """Forget the automatic pairs of ``pid`` (its demographics changed); returns their other records."""
        links = self.links.get(pid, {})
        others = [other for other, (_s, _score, origin) in links.items() if origin == "auto"]
        for other in others:
            self.drop_pair(pid, other)
        return others

    def component(
        self, seeds: Iterable[str], seq_of: Callable[[str], int]
    ) -> tuple[dict[str, tuple[str, int]], list[tuple[str, str, str, float | None, str]]]:
        """What :func:`~bridge.stores.mpi.persons.component` reads from the database: the records
        connected to ``seeds`` through persons or MATCH pairs as ``{patient: (person id, seq)}``, and the
        pairs among them ``(a, b, state, score, origin)`` with ``a < b``, sorted (only those that can
        change a person: the others are ignored by reclustering anyway)."""
        person_of, members, links = self.person_of, self.members, self.links
        info: dict[str, tuple[str, int]] = {}
        frontier = [p for p in set(seeds) if p in person_of]  # an unknown record has no pairs
        seen = set(frontier)
        while frontier:
            found: list[str] = []
            for p in frontier:
                person = person_of[p]
                info[p] = (person, seq_of(p))
                for q in members[person]:
                    if q not in seen:
                        seen.add(q)
                        found.append(q)
                for q, (state, _score, _origin) in links.get(p, {}).items():
                    if state == MATCH and q not in seen and q in person_of:
                        seen.add(q)
                        found.append(q)
            frontier = found
        among = {
            (p, q) if p < q else (q, p): link
            for p in info
            for q, link in links.get(p, {}).items()
            if q in info
        }
        return info, [(a, b, *link) for (a, b), link in sorted(among.items())]
