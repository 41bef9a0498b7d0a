"""The explanation is the matcher's own scoring: its terms add up to exactly the weight the linker
computes, and its decision is the linker's (property tests against the batch linker and the index)."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mpi_helpers import patient

from bridge.stores.mpi import MpiConfig, MpiInputError, MpiNotFound, PersonIndex
from bridge.stores.mpi.blocking import blocking_keys
from bridge.stores.mpi.compare import FIELDS, FeatureTable
from bridge.stores.mpi.config import DEFAULT_STRONG_SYSTEMS
from bridge.stores.mpi.explain import Scoring, score
from bridge.stores.mpi.features import extract_features
from bridge.stores.mpi.matcher import TermFrequencies, link_records, score_pairs
from bridge.stores.mpi.model import WEIGHT_TERMS, FSModel, probability

# small pools of near values, so that random records meet in blocks and reach every level
_PEOPLE = st.builds(
    lambda given_, family, birth, gender, line, city, postal, phone, ssn: dict(
        given=given_,
        family=family,
        birth=birth,
        gender=gender,
        line=line,
        city=city,
        postal=postal,
        phone=phone,
        ssn=ssn,
    ),
    st.sampled_from(["Alice", "Alicia", "Ailce", "Bruno", "Andersen", None]),
    st.sampled_from(["Andersen", "Anderson", "Andresen", "Alice", "Baptiste", None]),
    st.sampled_from(["1980-04-12", "1980-12-04", "1980-04-13", "1980-04", "1981", None]),
    st.sampled_from(["male", "female", "other", None]),
    st.sampled_from(["12 Elm Street", "12 Elm St", "12 ElmStreet", "400 Harbour View", None]),
    st.sampled_from(["Metro", "Metropolis", "Portside", None]),
    st.sampled_from(["12345", "12354", "99999", None]),
    st.sampled_from(["555 010 2030", "555 010 2031", None]),
    st.sampled_from(["123456789", "123456798", "987654321", None]),
)
POPULATIONS = st.lists(_PEOPLE, min_size=2, max_size=8)


def _patients(people: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        patient(
            f"p{i}",
            p["given"],
            p["family"],
            p["birth"],
            p["gender"],
            line=p["line"],
            city=p["city"],
            postal=p["postal"],
            phone=p["phone"],
            ssn=p["ssn"],
        )
        for i, p in enumerate(people)
    ]


@st.composite
def models(draw: st.DrawFn) -> FSModel:
    """The priors, or m/u/λ drawn at random (every level possible, as after an EM fit)."""
    if draw(st.booleans()):
        return FSModel.prior()
    weights = st.floats(min_value=0.001, max_value=1.0)
    m = [np.array(draw(st.lists(weights, min_size=f.levels, max_size=f.levels))) for f in FIELDS]
    u = [np.array(draw(st.lists(weights, min_size=f.levels, max_size=f.levels))) for f in FIELDS]
    lam = draw(st.floats(min_value=0.001, max_value=0.5))
    return FSModel([x / x.sum() for x in m], [x / x.sum() for x in u], lam, source="em")


def summed(s: Scoring) -> float:
    """The waterfall as a reader adds it up: the prior, then every term in the order given."""
    total = s.prior
    for _name, bits in s.terms:
        total += bits
    return total


@settings(max_examples=100, deadline=None)
@given(POPULATIONS, models(), st.booleans())
def test_terms_sum_to_the_linkers_weight_and_the_decision_is_the_linkers(
    people: list[dict[str, Any]], model: FSModel, tf_on: bool
) -> None:
    config = MpiConfig(term_frequency=tf_on)
    feats = [extract_features(p, DEFAULT_STRONG_SYSTEMS) for p in _patients(people)]
    tf = TermFrequencies.from_records(feats)
    # every pair, scored by the matcher over the whole population's table
    pairs = list(itertools.combinations(range(len(feats)), 2))
    ia = np.array([i for i, _ in pairs], dtype=np.int64)
    ib = np.array([j for _, j in pairs], dtype=np.int64)
    linker = score_pairs(FeatureTable(feats), ia, ib, model, config, tf)
    for k, (i, j) in enumerate(pairs):
        s = score(feats[i], feats[j], model, config, tf)
        assert [name for name, _ in s.terms] == list(WEIGHT_TERMS)
        assert summed(s) == s.weight == linker.weight[k]
        assert s.probability == linker.prob[k] == probability(np.array([summed(s)]))[0]
        assert s.decision == linker.state[k]
        assert s.evidence == s.weight - s.prior
        levels = [f.level for f in s.fields]
        assert levels == linker.gamma[k].tolist()
        for f in s.fields:
            assert (f.level < 0) == (f.agreement == "missing") == (f.m is None)
            if f.tf_bits:  # only an exact agreement is adjusted, and only with the adjustment on
                assert f.agreement == "exact" and tf_on
        # the other way round, only given and family may differ (compared crosswise from the left)
        back = score(feats[j], feats[i], model, config, tf)
        assert [f.level for f in back.fields][2:] == levels[2:]
    # and the batch linker (its own blocking, table and frequencies) agrees on its candidate pairs
    batch = link_records(feats, config, model=model, fit=False)
    for k in range(batch.candidates):
        i, j = int(batch.ia[k]), int(batch.ib[k])
        s = score(feats[i], feats[j], model, config, tf if tf_on else None)
        assert s.probability == batch.prob[k] and s.decision == batch.state[k]


def _index_pairs(mpi: PersonIndex) -> dict[tuple[str, str], tuple[str, float]]:
    return {
        (a, b): (state, score)
        for a, b, state, score in mpi.db.all("SELECT patient_a, patient_b, state, score FROM mpi_pair")
    }


@settings(max_examples=60, deadline=None)
@given(POPULATIONS, st.integers(min_value=1, max_value=3))
def test_the_index_stored_what_the_explanation_says(people: list[dict[str, Any]], batches: int) -> None:
    """Every candidate pair is stored exactly when the explanation decides MATCH or POSSIBLE_MATCH,
    with its probability and state. In several batches the index scored each pair when the later of
    its records arrived, with the value counts of that moment, so the term-frequency adjustment is off
    there; in one batch it is on (the counts then are the counts now)."""
    patients = _patients(people)
    config = MpiConfig(term_frequency=batches == 1)
    with tempfile.TemporaryDirectory() as tmp:
        mpi = PersonIndex.open(f"sqlite://{Path(tmp) / 'mpi.db'}", config)
        try:
            items = [(f"org-{i % 3}", p) for i, p in enumerate(patients)]
            for k in range(batches):
                if part := items[k::batches]:
                    mpi.upsert_patients(part)
            stored = _index_pairs(mpi)
            feats = {p["id"]: extract_features(p, DEFAULT_STRONG_SYSTEMS) for p in patients}
            for a, b in itertools.combinations(sorted(feats), 2):
                e = mpi.explain(a, b)
                s = e.scoring
                assert summed(s) == s.weight
                assert (e.a.patient_id, e.b.patient_id) == (a, b)
                if (a, b) in stored:
                    state, score_ = stored[(a, b)]
                    assert (s.decision, round(s.probability, 6)) == (state, score_)
                    assert e.link is not None and (e.link.state, e.link.score) == (state, score_)
                elif set(blocking_keys(feats[a])) & set(blocking_keys(feats[b])):
                    assert s.decision == "NO_MATCH" and e.link is None
                back = mpi.explain(b, a)
                assert back.scoring.weight == s.weight and back.link == e.link
                assert [(f.value_a, f.value_b) for f in back.scoring.fields] == [
                    (f.value_b, f.value_a) for f in s.fields
                ]
        finally:
            mpi.close()


def test_a_pair_is_explained_the_way_round_the_index_scored_it(tmp_path: Path) -> None:
    """Names swapped between the records are compared crosswise from the left record's side, so the
    two orientations give given and family other levels (and weights): the explanation takes the
    index's, the record indexed last on the left."""
    common = dict(birth="1980-04-12", gender="female", line="12 Elm Street", city="Metro", postal="12345")
    old = patient("p0", "Alice", "Anderson", **common)
    new = patient("p1", "Andersen", "Alice", **common)
    feats = [extract_features(p, DEFAULT_STRONG_SYSTEMS) for p in (old, new)]
    config = MpiConfig(term_frequency=False)
    one_way = score(feats[1], feats[0], FSModel.prior(), config, None)
    other_way = score(feats[0], feats[1], FSModel.prior(), config, None)
    assert one_way.weight != other_way.weight  # what makes the orientation matter
    mpi = PersonIndex.open(f"sqlite://{tmp_path / 'mpi.db'}", config)
    try:
        mpi.upsert_patients([("org-a", old)])
        mpi.upsert_patients([("org-b", new)])
        [(state, stored)] = _index_pairs(mpi).values()
        for a, b in (("p0", "p1"), ("p1", "p0")):
            s = mpi.explain(a, b).scoring
            assert s.weight == one_way.weight
            assert (s.decision, round(s.probability, 6)) == (state, stored)
        given_ = mpi.explain("p0", "p1").scoring.fields[0]
        assert (given_.value_a, given_.value_b) == ("alice", "andersen")
    finally:
        mpi.close()


def test_term_frequencies_follow_the_index(tmp_path: Path) -> None:
    """A rare shared family name weighs more than a common one, and the counts follow new records."""
    mpi = PersonIndex.open(f"sqlite://{tmp_path / 'mpi.db'}")
    try:
        common = [patient(f"s{i}", f"G{i}x", "Smith", f"19{50 + i}-01-01") for i in range(8)]
        mpi.upsert_patients([("org-a", p) for p in common])
        mpi.upsert_patients(
            [
                ("org-a", patient("z1", "Anna", "Zyszczak", "1970-01-01")),
                ("org-b", patient("z2", "Anna", "Zyszczak", "1970-01-01")),
                ("org-a", patient("m1", "Anna", "Smith", "1970-01-01")),
                ("org-b", patient("m2", "Anna", "Smith", "1970-01-01")),
            ]
        )
        rare = {f.name: f for f in mpi.explain("z1", "z2").scoring.fields}["family"]
        usual = {f.name: f for f in mpi.explain("m1", "m2").scoring.fields}["family"]
        assert rare.bayes_bits == usual.bayes_bits and rare.agreement == usual.agreement == "exact"
        assert rare.tf_bits is not None and usual.tf_bits is not None and rare.tf_bits > 0 > usual.tf_bits
        before = mpi.explain("m1", "m2").scoring.weight
        mpi.upsert_patients([("org-c", patient("s99", "Zed", "Smith", "2001-02-03"))])
        assert mpi.explain("m1", "m2").scoring.weight < before  # Smith is commoner now
    finally:
        mpi.close()


def test_counts_kept_by_a_reader_equal_a_fresh_count(tmp_path: Path) -> None:
    """The service's index (no record cache) keeps its value counts between explanations and counts
    only the records added since; after an update it counts again. Either way it weighs as an index
    opened afresh does."""
    url = f"sqlite://{tmp_path / 'mpi.db'}"
    writer, reader = PersonIndex.open(url), PersonIndex.open(url)

    def fresh(a: str, b: str) -> Scoring:
        with PersonIndex.open(url) as other:
            return other.explain(a, b).scoring

    try:
        writer.upsert_patients(
            [("org-a", patient(f"s{i}", f"G{i}x", "Smith", f"19{50 + i}-01-01")) for i in range(4)]
            + [
                ("org-a", patient("m1", "Anna", "Smith", "1970-01-01")),
                ("org-b", patient("m2", "Anna", "Smith", "1970-01-01")),
            ]
        )
        first = reader.explain("m1", "m2").scoring
        assert first == fresh("m1", "m2")
        writer.upsert_patients([("org-c", patient(f"t{i}", "Zed", "Smith", "2001-02-03")) for i in range(3)])
        added = reader.explain("m1", "m2").scoring
        assert added == fresh("m1", "m2") and added.weight != first.weight  # more records, other counts
        writer.upsert_patients([("org-c", patient("t0", "Zed", "Jones", "2001-02-03"))])  # an update
        updated = reader.explain("m1", "m2").scoring
        assert updated == fresh("m1", "m2") and updated.weight != added.weight
    finally:
        writer.close()
        reader.close()


def test_unknown_and_identical_records_are_refused(tmp_path: Path) -> None:
    mpi = PersonIndex.open(f"sqlite://{tmp_path / 'mpi.db'}")
    try:
        mpi.upsert_patients([("org-a", patient("a1", "Alice", "Andersen", "1980-04-12"))])
        with pytest.raises(MpiNotFound):
            mpi.explain("a1", "zz")
        with pytest.raises(MpiInputError, match="itself"):
            mpi.explain("a1", "a1")
    finally:
        mpi.close()
