"""The in-memory person graph: its bookkeeping, and its component search against a plain fixpoint."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.stores.mpi.graph import PersonGraph

STATES = ["MATCH", "POSSIBLE_MATCH", "NO_MATCH"]
pair = st.tuples(
    st.integers(0, 11), st.integers(0, 11), st.sampled_from(STATES), st.sampled_from(["auto", "manual"])
)


def build(persons: list[int], pairs: list[tuple[int, int, str, str]]) -> PersonGraph:
    g = PersonGraph()
    for i, person in enumerate(persons):
        g.add_record(f"r{i}", f"p{person}")
    for a, b, state, origin in pairs:
        if a != b and a < len(persons) and b < len(persons):
            g.set_pair(f"r{a}", f"r{b}", state, 0.5, origin)
    return g


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=12),
    st.lists(pair, max_size=25),
    st.lists(st.integers(0, 14), min_size=1, max_size=4),
)
def test_component_is_the_fixpoint_of_persons_and_match_pairs(
    persons: list[int], pairs: list[tuple[int, int, str, str]], seeds: list[int]
) -> None:
    g = build(persons, pairs)
    names = [f"r{s}" for s in seeds]  # some unknown (beyond the records): they have no component
    info, among = g.component(names, lambda pid: int(pid[1:]))
    # the fixpoint: add the members of the persons and the MATCH partners of everything reached
    reached = {n for n in names if n in g.person_of}
    while True:
        more = set(reached)
        for r in reached:
            more |= {q for q, p in g.person_of.items() if p == g.person_of[r]}
            more |= {q for q, (state, _s, _o) in g.links.get(r, {}).items() if state == "MATCH"}
        if more == reached:
            break
        reached = more
    assert info == {r: (g.person_of[r], int(r[1:])) for r in reached}
    # the pairs among them that can change a person, each once, (a, b) with a < b, sorted
    want = sorted(
        {(min(a, b), max(a, b), *g.links[a][b]) for a in reached for b in g.links.get(a, {}) if b in reached}
    )
    assert among == want
    assert all(state == "MATCH" or origin == "manual" for *_ab, state, _score, origin in among)


def test_pairs_that_cannot_change_a_person_are_not_kept() -> None:
    g = build([0, 1, 2], [])
    g.set_pair("r0", "r1", "MATCH", 0.9, "auto")
    g.set_pair("r0", "r2", "NO_MATCH", None, "manual")
    assert g.links == {
        "r0": {"r1": ("MATCH", 0.9, "auto"), "r2": ("NO_MATCH", None, "manual")},
        "r1": {"r0": ("MATCH", 0.9, "auto")},
        "r2": {"r0": ("NO_MATCH", None, "manual")},
    }
    g.set_pair("r0", "r1", "POSSIBLE_MATCH", 0.6, "auto")  # re-scored below MATCH: forgotten
    assert g.links == {"r0": {"r2": ("NO_MATCH", None, "manual")}, "r2": {"r0": ("NO_MATCH", None, "manual")}}
    g.set_pair("r1", "r2", "MATCH", 0.95, "auto")
    assert g.drop_auto_pairs("r2") == ["r1"]  # the manual pair stays
    assert g.links == {"r0": {"r2": ("NO_MATCH", None, "manual")}, "r2": {"r0": ("NO_MATCH", None, "manual")}}


def test_moves_keep_members_and_forget_empty_persons() -> None:
    g = build([0, 0, 1], [])
    g.move("r1", "p1")
    assert g.person_of == {"r0": "p0", "r1": "p1", "r2": "p1"}
    assert g.members == {"p0": {"r0"}, "p1": {"r1", "r2"}}
    g.move("r0", "p1")
    assert g.members == {"p1": {"r0", "r1", "r2"}}
