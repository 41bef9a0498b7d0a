"""Persons: the connected components of MATCH links, their ids, their rebuilding and their look-ups.

Persons are the connected components of MATCH links (automatic and manual), cut by manual unlinks:
a component is rebuilt by union-find that applies manual links first, then automatic MATCH links by
descending score, skipping any automatic link that would join two records a person has manually
declared different. A person's id is derived from its oldest record (``uuid5`` of that record's id),
so it is stable while records are added; after a merge the older person's id survives (the other id is
kept as an alias), and after a split the part holding the oldest record keeps it.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections import defaultdict
from collections.abc import Iterable

import orjson

from bridge.stores.mpi.config import MatchState, MpiConflict
from bridge.stores.mpi.db import Database
from bridge.stores.mpi.history import HISTORY_INSERT, HISTORY_TYPES
from bridge.stores.mpi.state import IndexState
from bridge.stores.mpi.unionfind import UnionFind

MATCH = MatchState.MATCH.value
POSSIBLE = MatchState.POSSIBLE_MATCH.value
NO_MATCH = MatchState.NO_MATCH.value

_PERSON_NS = uuid.UUID("5b0f6a3e-3c1f-4b55-9d1e-6d70690a0001")
_PERSON_NS_BYTES = _PERSON_NS.bytes


@functools.lru_cache(maxsize=131072)
def person_id_for(patient_id: str) -> str:
    """The person id a record founds (a FHIR-id-safe UUID derived from the record id).

    Equal to ``str(uuid.uuid5(_PERSON_NS, patient_id))``, computed without building UUID objects.
    """
    h = bytearray(hashlib.sha1(_PERSON_NS_BYTES + patient_id.encode(), usedforsecurity=False).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def person_id(db: Database, patient_id: str) -> str | None:
    """The person id of a record, or None if the record is not indexed."""
    row = db.one("SELECT person_id FROM mpi_patient WHERE patient_id = ?", (patient_id,))
    return row[0] if row else None


def resolve_person(db: Database, person_id: str) -> str | None:
    """The live person id for ``person_id`` (following merge aliases), or None if unknown."""
    if db.one("SELECT 1 FROM mpi_patient WHERE person_id = ? LIMIT 1", (person_id,)):
        return person_id
    row = db.one("SELECT person_id FROM mpi_alias WHERE old_id = ?", (person_id,))
    return row[0] if row else None


def linked_patient_ids(db: Database, patient_id: str, include_possible: bool = False) -> list[str]:
    """Record ids of the same person as ``patient_id`` (itself included, first); sorted otherwise.

    With ``include_possible`` the records of persons joined to it by an unresolved POSSIBLE_MATCH
    are added too. An unindexed record yields ``[patient_id]``.
    """
    if not include_possible:  # the hot path of $everything: one statement, no explicit transaction
        rows = db.all(
            "SELECT patient_id FROM mpi_patient WHERE person_id = "
            "(SELECT person_id FROM mpi_patient WHERE patient_id = ?)",
            (patient_id,),
        )
        others = sorted(r[0] for r in rows if r[0] != patient_id)
        return [patient_id, *others]
    with db.read():
        person = person_id(db, patient_id)
        if person is None:
            return [patient_id]
        rows = db.all("SELECT patient_id, seq FROM mpi_patient WHERE person_id = ?", (person,))
        members = {r[0] for r in rows}
        recs = sorted(int(r[1]) for r in rows)
        extra: set[str] = set()
        for side in ("rec_hi", "rec_lo"):
            for a, b in db.all_in(
                f"SELECT patient_a, patient_b FROM mpi_pair WHERE (state || '') = '{POSSIBLE}' "
                f"AND {side} IN ({{in}})",
                recs,
            ):
                extra.update((a, b))
        extra -= members
        if extra:
            persons = {
                r[0]
                for r in db.all_in(
                    "SELECT person_id FROM mpi_patient WHERE patient_id IN ({in})", sorted(extra)
                )
            }
            members |= {
                r[0]
                for r in db.all_in(
                    "SELECT patient_id FROM mpi_patient WHERE person_id IN ({in})", sorted(persons)
                )
            }
        members.discard(patient_id)
        return [patient_id, *sorted(members)]


def component(
    db: Database, seeds: Iterable[str]
) -> tuple[dict[str, tuple[str, int]], list[tuple[str, str, str, float | None, str]]]:
    """The records connected to ``seeds`` through current persons or MATCH pairs, as
    ``{patient: (person id, seq)}``, and every pair among them ``(a, b, state, score, origin)``.

    Three statements per step of the search: the members of the frontier's persons (with what
    reclustering needs of them) and the pairs touching the frontier, of any state (the MATCH ones
    extend the search; the manual ones constrain the persons).
    """
    if db.kind == "postgresql":
        # ARRAY(subquery): without it the planner hash-joins against a scan of every record
        members_sql = (
            "SELECT patient_id, person_id, seq FROM mpi_patient WHERE person_id = "
            "ANY(ARRAY(SELECT person_id FROM mpi_patient WHERE patient_id IN ({in})))"
        )
    else:
        members_sql = (
            "SELECT patient_id, person_id, seq FROM mpi_patient WHERE person_id IN "
            "(SELECT person_id FROM mpi_patient WHERE patient_id IN ({in}))"
        )
    info: dict[str, tuple[str, int]] = {}
    pairs: dict[tuple[str, str], tuple[str, str, str, float | None, str]] = {}
    seen: set[str] = set()
    frontier = set(seeds)
    while frontier:
        seen |= frontier
        f = sorted(frontier)
        found: set[str] = set()
        for pid, person, seq in db.all_in(members_sql, f):
            info[pid] = (person, int(seq))
            found.add(pid)
        recs = sorted(info[p][1] for p in f if p in info)  # an unknown record has no pairs
        touching = db.all_in(
            "SELECT patient_a, patient_b, state, score, origin FROM mpi_pair WHERE rec_hi IN ({in})", recs
        ) + db.all_in(
            "SELECT patient_a, patient_b, state, score, origin FROM mpi_pair WHERE rec_lo IN ({in})", recs
        )
        for a, b, state, score, origin in touching:
            pairs[(a, b)] = (a, b, state, score, origin)
            if state == MATCH:
                found.add(a)
                found.add(b)
        frontier = found - seen
    among = [pairs[k] for k in sorted(pairs) if k[0] in info and k[1] in info]
    return info, among


def recluster(
    state: IndexState,
    seeds: Iterable[str],
    now: str,
    *,
    actor: str = "matcher",
    fresh: frozenset[str] = frozenset(),
    unwritten: bool = False,
    manual_link: tuple[str, str] | None = None,
) -> dict[str, str]:
    """Rebuild the persons of the components around ``seeds``; returns patient -> person id.

    ``fresh``: the person ids this transaction's new records founded. ``unwritten``: those records are
    not in the database yet (the caller writes them with the persons returned), so only the others
    are moved there. ``manual_link``: the pair a manual link just joined; raises :class:`MpiConflict`
    (before anything is moved) if the manual links now put two manually unlinked records into one
    person.
    """
    db = state.db
    graph, cache = state.graph, state.cache
    if graph is not None and cache is not None:
        records = cache.state
        info, pairs = graph.component(seeds, lambda pid: records[pid][2])
    else:
        info, pairs = component(db, seeds)
    if not info:
        return {}
    uf: UnionFind[str] = UnionFind(sorted(info, key=lambda p: info[p][1]))
    members: dict[str, set[str]] = {p: {p} for p in info}
    cannot: dict[str, set[str]] = defaultdict(set)
    for a, b, link, _score, origin in pairs:
        if origin == "manual" and link == NO_MATCH:
            cannot[a].add(b)
            cannot[b].add(a)

    def join(a: str, b: str, *, check: bool) -> bool:
        ra, rb = uf.find(a), uf.find(b)
        if ra == rb:
            return True
        if check:
            small, big = (
                (members[ra], members[rb])
                if len(members[ra]) <= len(members[rb])
                else (members[rb], members[ra])
            )
            if any(cannot[x] & big for x in small):
                return False
        root = uf.union(a, b)
        other = rb if root == ra else ra
        members[root] |= members.pop(other)
        return True

    for a, b, link, _score, origin in pairs:
        if origin == "manual" and link == MATCH:
            join(a, b, check=False)
    if manual_link is not None:
        for a, b, link, _score, origin in pairs:
            if origin == "manual" and link == NO_MATCH and uf.find(a) == uf.find(b):
                raise MpiConflict(
                    f"linking {manual_link[0]!r} and {manual_link[1]!r} would put {a!r} and {b!r}, which "
                    "were manually unlinked, into one person; undo that unlink first"
                )
    autos = sorted(
        (p for p in pairs if p[4] == "auto" and p[2] == MATCH), key=lambda p: (-(p[3] or 0), p[0], p[1])
    )
    for a, b, _state, _score, _origin in autos:
        join(a, b, check=True)
    result: dict[str, str] = {}
    moves: dict[tuple[str, str], list[str]] = defaultdict(list)
    live_ids: set[str] = set()
    for group in uf.groups():
        oldest = min(group, key=lambda p: info[p][1])
        new_id = person_id_for(oldest)
        live_ids.add(new_id)
        for p in group:
            result[p] = new_id
            if info[p][0] != new_id:
                moves[(info[p][0], new_id)].append(p)
    if not moves:
        return result
    updates = [(new, p) for (_old, new), ps in moves.items() for p in ps]
    if graph is not None:
        for new, p in updates:
            graph.move(p, new)
    if unwritten:
        updates = [(new, p) for new, p in updates if info[p][0] not in fresh]
    if db.kind == "postgresql":
        if updates:  # none in the usual batch, where only records still to be written moved
            db.execute(
                "UPDATE mpi_patient AS p SET person_id = u.person FROM unnest(?::text[], ?::text[]) "
                "AS u(person, pid) WHERE p.patient_id = u.pid",
                [[u[0] for u in updates], [u[1] for u in updates]],
            )
    else:  # (an empty list runs nothing)
        db.executemany("UPDATE mpi_patient SET person_id = ? WHERE patient_id = ?", updates)
    # ids founded in this transaction are nobody's any more once their records moved (skipped below)
    old_ids = sorted({old for old, _new in moves} - live_ids - fresh)
    still_used = {
        r[0]
        for r in db.all_in("SELECT DISTINCT person_id FROM mpi_patient WHERE person_id IN ({in})", old_ids)
    }
    retired = [o for o in old_ids if o not in still_used]
    founders = {person_id_for(p): p for p in info}
    aliases = []
    for old in retired:
        if old in fresh:
            continue  # created and merged in this same transaction: nobody has seen it
        founder = founders.get(old)
        target = result[founder] if founder else next(new for (o, new) in moves if o == old)
        aliases.append((old, target))
    db.insert_many(
        "INSERT INTO mpi_alias (old_id, person_id) VALUES (?, ?) ON CONFLICT (old_id) DO UPDATE "
        "SET person_id = excluded.person_id",
        aliases,
        ("text", "text"),
    )
    db.executemany("UPDATE mpi_alias SET person_id = ? WHERE person_id = ?", [(t, o) for o, t in aliases])
    db.exec_in("DELETE FROM mpi_alias WHERE old_id IN ({in})", sorted(live_ids - fresh))  # revived ids
    history = []
    for (old, new), ps in sorted(moves.items()):
        if old in fresh:
            continue
        action = "person-merged" if old in retired else "person-split"
        history.append(
            (
                now,
                action,
                None,
                None,
                new,
                old,
                actor,
                None,
                None,
                orjson.dumps({"patients": sorted(ps)}).decode(),
                None,
                None,
            )
        )
    db.insert_many(HISTORY_INSERT, history, HISTORY_TYPES)
    return result
