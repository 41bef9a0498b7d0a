"""Why two records match, field by field (:meth:`PersonIndex.explain`).

The explanation is the matcher's own scoring of the pair, not a re-derivation: the two stored feature
records are compared by :func:`~bridge.stores.mpi.compare.compare_pairs` and weighed by
:func:`~bridge.stores.mpi.matcher.weigh`, with the stored model and the term frequencies of every
record the index holds now, which is what the index does with a new record's candidate pairs. The
weight's terms are returned in the order the matcher adds them, so their running sum, started at the
prior, is exactly the weight.

A pair's stored score was computed when the newer of the two records was last indexed. A later EM
refit or a grown population (term frequencies) can make the explanation's score differ from it; both
are returned, and the pair's stored state (with a manual decision's actor and reason) is the link
state.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bridge.stores.mpi.compare import FIELDS, LEVEL_LABELS, FeatureTable, compare_pairs
from bridge.stores.mpi.config import MpiConfig, MpiInputError, MpiNotFound
from bridge.stores.mpi.features import Features
from bridge.stores.mpi.matcher import TF_KEYS, TermFrequencies, weigh
from bridge.stores.mpi.model import TF_FIELDS, WEIGHT_TERMS, FSModel
from bridge.stores.mpi.state import IndexState, parse_gen

#: the feature compared by each field (the identifier field compares the ``i`` pairs)
FEATURE_OF = {
    "given": "g",
    "family": "f",
    "birth": "b",
    "sex": "s",
    "address": "a",
    "city": "c",
    "postal": "z",
    "phone": "t",
}


@dataclass(frozen=True, slots=True)
class ExplainedRecord:
    """One side of the pair: what a reviewer needs to recognise the record, no identifier values."""

    patient_id: str
    source_org: str
    person_id: str
    #: the strong identifier systems the matcher compared (their values are never shown)
    identifier_systems: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ExplainedField:
    """One compared field: both values as the matcher saw them, the level and its weight."""

    name: str
    #: -1 (missing on either side: no evidence), else 0 (disagree) ... ``levels - 1`` (exact)
    level: int
    levels: int
    value_a: str | None
    value_b: str | None
    #: m and u of this level (None when the field is missing)
    m: float | None
    u: float | None
    #: log2(m/u) (0 when missing)
    bayes_bits: float
    #: the term-frequency adjustment (None for a field without one; 0 unless the field agrees exactly)
    tf_bits: float | None

    @property
    def agreement(self) -> str:
        """``missing``, ``disagree``, ``exact`` or ``approximate`` (any level in between)."""
        if self.level < 0:
            return "missing"
        if self.level == 0:
            return "disagree"
        return "exact" if self.level == self.levels - 1 else "approximate"

    @property
    def label(self) -> str | None:
        """What the level means (None when missing)."""
        return LEVEL_LABELS[self.name][self.level] if self.level >= 0 else None

    @property
    def weight(self) -> float:
        """The field's share of the weight: its Bayes factor plus its term-frequency bits."""
        return self.bayes_bits + (self.tf_bits or 0.0)


@dataclass(frozen=True, slots=True)
class StoredLink:
    """The pair's row in the index: an automatic decision or a manual one."""

    state: str
    origin: str
    score: float | None
    actor: str | None
    reason: str | None
    updated_at: str


@dataclass(frozen=True, slots=True)
class Scoring:
    """The matcher's scoring of one pair of feature records.

    ``terms`` are ``(name, bits)`` in the order the matcher adds them after ``prior``
    (:data:`~bridge.stores.mpi.model.WEIGHT_TERMS`): ``prior`` plus each in turn is exactly ``weight``.
    """

    fields: tuple[ExplainedField, ...]
    prior: float
    terms: tuple[tuple[str, float], ...]
    weight: float
    probability: float
    #: the weight without the prior (a MATCH needs ``config.min_match_evidence_bits``)
    evidence: float
    #: the probability without the identifier field (equal identifiers need ``identifier_corroboration``)
    demographic_probability: float
    decision: str
    config: MpiConfig
    model_source: str
    model_fitted_on_records: int


@dataclass(frozen=True, slots=True)
class Explanation:
    """Two indexed records, the matcher's scoring of them now, and their stored link."""

    a: ExplainedRecord
    b: ExplainedRecord
    scoring: Scoring
    #: None: the index holds no pair row (never scored MATCH or POSSIBLE_MATCH, no manual decision)
    link: StoredLink | None


def explain_pair(state: IndexState, patient_a: str, patient_b: str) -> Explanation:
    """The matcher's scoring of records ``patient_a`` and ``patient_b``, with their stored link.

    Reads one snapshot. Raises :class:`MpiInputError` when the two ids are the same record and
    :class:`MpiNotFound` for a record the index does not hold.
    """
    if patient_a == patient_b:
        raise MpiInputError("a record cannot be compared with itself", location="b")
    db = state.db
    with db.read():
        rows = {
            r[0]: r
            for r in db.all_in(
                "SELECT patient_id, source_org, person_id, features, seq, updated_at FROM mpi_patient "
                "WHERE patient_id IN ({in})",
                [patient_a, patient_b],
            )
        }
        for pid in (patient_a, patient_b):
            if pid not in rows:
                raise MpiNotFound("Patient", pid)
        ra, rb = rows[patient_a], rows[patient_b]
        hi, lo = sorted((int(ra[4]), int(rb[4])), reverse=True)
        pair = db.one(
            "SELECT state, origin, score, actor, reason, updated_at FROM mpi_pair "
            "WHERE rec_hi = ? AND rec_lo = ?",
            (hi, lo),
        )
        model = state.stored_model()
        tf = term_frequencies(state) if state.config.term_frequency else None
    fa: Features = orjson.loads(ra[3])
    fb: Features = orjson.loads(rb[3])
    # the pair as the index scored it: the record indexed last on the left, the smaller id when both
    # were indexed in one batch (given and family are compared crosswise from the left record's side,
    # so the other way round can give them other levels when the names are swapped)
    a_left = (ra[5], rb[0]) > (rb[5], ra[0])
    scoring = (
        score(fa, fb, model, state.config, tf) if a_left else _flip(score(fb, fa, model, state.config, tf))
    )
    link = None
    if pair is not None:
        link = StoredLink(
            state=pair[0],
            origin=pair[1],
            score=None if pair[2] is None else float(pair[2]),
            actor=pair[3],
            reason=pair[4],
            updated_at=pair[5],
        )
    return Explanation(_record(ra, fa), _record(rb, fb), scoring, link)


def score(
    fa: Features, fb: Features, model: FSModel, config: MpiConfig, tf: TermFrequencies | None
) -> Scoring:
    """The matcher's scoring of feature records ``fa`` (the left one, whose values' frequencies the
    term-frequency adjustment looks up) and ``fb``: :func:`~bridge.stores.mpi.compare.compare_pairs`
    and :func:`~bridge.stores.mpi.matcher.weigh`, as the index and the batch linker call them."""
    table = FeatureTable([fa, fb])
    ia, ib = np.array([0], dtype=np.int64), np.array([1], dtype=np.int64)
    gamma = compare_pairs(table, ia, ib)
    scored = weigh(gamma, ia, table, model, config, tf)
    terms: list[float] = scored.terms[0].tolist()
    fields = []
    for i, f in enumerate(FIELDS):
        level = int(gamma[0, i])
        key = FEATURE_OF.get(f.name)
        fields.append(
            ExplainedField(
                name=f.name,
                level=level,
                levels=f.levels,
                value_a=_shown(f.name, fa.get(key)) if key else None,
                value_b=_shown(f.name, fb.get(key)) if key else None,
                m=float(model.m[i][level]) if level >= 0 else None,
                u=float(model.u[i][level]) if level >= 0 else None,
                bayes_bits=terms[i],
                tf_bits=terms[len(FIELDS) + TF_FIELDS.index(i)] if i in TF_FIELDS else None,
            )
        )
    return Scoring(
        fields=tuple(fields),
        prior=scored.prior,
        terms=tuple(zip(WEIGHT_TERMS, terms, strict=True)),
        weight=float(scored.weight[0]),
        probability=float(scored.prob[0]),
        evidence=float(scored.evidence[0]),
        demographic_probability=float(scored.demographic[0]),
        decision=str(scored.state[0]),
        config=config,
        model_source=model.source,
        model_fitted_on_records=model.fitted_on_records,
    )


class ValueCounts:
    """The term-frequency counts of the stored records, as of generation token ``gen`` and insertion
    number ``max_seq``: what the index's record cache counts, kept by a process that has no cache."""

    def __init__(self, gen: str | None) -> None:
        self.gen = gen
        self.max_seq = 0
        self.total = 0
        self.counts: dict[str, Counter[str]] = {k: Counter() for k in TF_KEYS}
        self.sum_sq: dict[str, int] = dict.fromkeys(TF_KEYS, 0)

    def add(self, rows: Iterable[tuple[str, int]]) -> None:
        """Count ``(features JSON, seq)`` rows of records not counted yet."""
        for blob, seq in rows:
            features = orjson.loads(blob)
            self.total += 1
            self.max_seq = max(self.max_seq, int(seq))
            for key, counts in self.counts.items():
                value = features.get(key)
                if value:
                    n = counts[value]
                    self.sum_sq[key] += 2 * n + 1  # (n + 1)² − n²
                    counts[value] = n + 1

    def frequencies(self) -> TermFrequencies:
        return TermFrequencies(self.counts, self.total, self.sum_sq)


def term_frequencies(state: IndexState) -> TermFrequencies:
    """The value counts of every stored record, as the index's record cache keeps them (call inside a
    read transaction). Counting reads every record's features (0.46-0.83 s at 105,068 records), so the
    counts are remembered with the generation token: unchanged, they are used as they are; after
    records were only added (the token's epoch and update count unchanged), the new records are
    counted; after records changed or a reset, everything is counted again."""
    row = state.db.one("SELECT value FROM mpi_meta WHERE key = 'records_gen'")
    gen = row[0] if row else None
    memo: ValueCounts | None = state.tf_memo
    if memo is not None and gen is not None and memo.gen == gen:
        return memo.frequencies()
    mine, theirs = parse_gen(memo.gen if memo else None), parse_gen(gen)
    if memo is not None and mine is not None and theirs is not None and mine[:2] == theirs[:2]:
        memo.add(state.db.all("SELECT features, seq FROM mpi_patient WHERE seq > ?", (memo.max_seq,)))
        memo.gen = gen
    else:
        memo = ValueCounts(gen)
        memo.add(state.db.all("SELECT features, seq FROM mpi_patient"))
    state.tf_memo = memo
    return memo.frequencies()


def _flip(s: Scoring) -> Scoring:
    """``s`` with each field's two values swapped (the scoring itself is the same)."""
    fields = tuple(dataclasses.replace(f, value_a=f.value_b, value_b=f.value_a) for f in s.fields)
    return dataclasses.replace(s, fields=fields)


def _record(row: Any, features: Features) -> ExplainedRecord:
    systems = tuple(sorted({system for system, _value in features.get("i") or ()}))
    return ExplainedRecord(patient_id=row[0], source_org=row[1], person_id=row[2], identifier_systems=systems)


def _shown(field: str, value: Any) -> str | None:
    """A feature value as a reviewer reads it (a birth date as a FHIR date); None when missing."""
    if not isinstance(value, str) or not value:
        return None
    if field == "birth":
        return "-".join(x for x in (value[:4], value[4:6], value[6:8]) if x)
    return value
