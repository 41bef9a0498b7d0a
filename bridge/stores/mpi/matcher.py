"""The matcher shared by the batch command, the benchmark and the incremental index."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bridge.logging import get_logger
from bridge.stores.mpi.blocking import blocking_keys, candidate_pairs
from bridge.stores.mpi.compare import FIELDS, IDENT, FeatureTable, compare_pairs
from bridge.stores.mpi.config import MatchState, MpiConfig
from bridge.stores.mpi.features import Features
from bridge.stores.mpi.model import FSModel, decide, em_fit, probability, sum_terms
from bridge.stores.mpi.unionfind import UnionFind

log = get_logger(__name__)
TF_KEYS = tuple(f.tf_key for f in FIELDS if f.tf_key)


class TermFrequencies:
    """Value counts of the TF-adjusted features over a population of ``total`` records.

    ``lookup(key, rows, total)``, if given, returns the relative frequencies of the ``key`` values of
    table ``rows`` directly (the index's record cache counts values by code); ``counts`` is not used then.
    """

    def __init__(
        self,
        counts: Mapping[str, Mapping[str, int]],
        total: int,
        sum_sq: Mapping[str, int],
        *,
        lookup: Callable[[str, np.ndarray, int], np.ndarray] | None = None,
    ) -> None:
        self.counts = counts
        self.total = max(total, 1)
        self.sum_sq = sum_sq
        self.lookup = lookup

    @classmethod
    def from_records(cls, records: Iterable[Features]) -> TermFrequencies:
        counts: dict[str, Counter[str]] = {k: Counter() for k in TF_KEYS}
        total = 0
        for r in records:
            total += 1
            for k in TF_KEYS:
                v = r.get(k)
                if v:
                    counts[k][v] += 1
        sum_sq = {k: sum(c * c for c in counts[k].values()) for k in TF_KEYS}
        return cls(counts, total, sum_sq)

    def freq(self, key: str, values: np.ndarray) -> np.ndarray:
        """Relative frequency of each value (0 if unseen)."""
        c = self.counts.get(key, {})
        return np.array([c.get(v, 0) for v in values], dtype=np.float64) / self.total

    def row_frequencies(self, table: FeatureTable) -> dict[str, np.ndarray]:
        """Per TF key, the frequency of each table row's value (computed once per row, not per pair)."""
        return {k: self.freq(k, table.cols[k]) for k in TF_KEYS}

    def pair_frequencies(self, table: FeatureTable, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Per TF key, the frequency of the value of each of ``rows`` (one per pair)."""
        if self.lookup is not None:
            return {k: self.lookup(k, rows, self.total) for k in TF_KEYS}
        row_freq = self.row_frequencies(table)
        return {k: row_freq[k][rows] for k in TF_KEYS}

    def mean(self) -> dict[str, float]:
        """Per key: sum of squared relative frequencies, i.e. P(two random records agree on the field)."""
        return {k: self.sum_sq.get(k, 0) / self.total**2 for k in TF_KEYS}


@dataclass
class Scored:
    """Compared pairs, weighed and decided. Row ``k`` of every array is pair ``k``.

    ``weight`` is ``prior`` plus the columns of ``terms`` (:data:`~bridge.stores.mpi.model.WEIGHT_TERMS`)
    added in order (:func:`~bridge.stores.mpi.model.sum_terms`); ``prob`` is its posterior probability.
    ``evidence`` (the weight without the prior) and ``demographic`` (the probability without the
    identifier field) are what :func:`~bridge.stores.mpi.model.decide` looked at besides ``prob``.
    """

    gamma: np.ndarray
    prob: np.ndarray
    state: np.ndarray
    prior: float
    terms: np.ndarray
    weight: np.ndarray
    evidence: np.ndarray
    demographic: np.ndarray


def weigh(
    gamma: np.ndarray,
    ia: np.ndarray,
    table: FeatureTable,
    model: FSModel,
    config: MpiConfig,
    tf: TermFrequencies | None,
) -> Scored:
    """Weights -> probabilities -> states for already compared pairs (``ia`` gives the TF values' rows).

    The only scoring of the matcher: the index, the batch linker and the explanation
    (:mod:`bridge.stores.mpi.explain`) all take their weights, probabilities and states from here.
    """
    if tf is not None and config.term_frequency:
        tf_freq = tf.pair_frequencies(table, ia)
        terms = model.weight_terms(
            gamma, tf_freq=tf_freq, tf_mean=tf.mean(), tf_cap=config.tf_max_adjustment_bits
        )
    else:
        terms = model.weight_terms(gamma)
    prior = model.prior_weight()
    weight = sum_terms(prior, terms)
    prob = probability(weight)
    demographic = probability(weight - terms[:, IDENT])
    evidence = weight - prior
    state = decide(gamma, prob, demographic, evidence, config)
    return Scored(gamma, prob, state, prior, terms, weight, evidence, demographic)


def score_pairs(
    table: FeatureTable,
    ia: np.ndarray,
    ib: np.ndarray,
    model: FSModel,
    config: MpiConfig,
    tf: TermFrequencies | None,
) -> Scored:
    """Compare, weigh and decide the row pairs ``(ia[k], ib[k])`` of ``table``."""
    return weigh(compare_pairs(table, ia, ib), ia, table, model, config, tf)


@dataclass
class BatchResult:
    """Outcome of :func:`link_records`: every candidate pair with its score and state, and the model used."""

    ia: np.ndarray
    ib: np.ndarray
    prob: np.ndarray
    state: np.ndarray
    model: FSModel
    candidates: int
    skipped_blocks: int

    def linked(self, include_possible: bool = True) -> np.ndarray:
        """Indices (into ia/ib/prob/state) of MATCH pairs, plus POSSIBLE_MATCH ones if asked."""
        keep = self.state == MatchState.MATCH.value
        if include_possible:
            keep |= self.state == MatchState.POSSIBLE_MATCH.value
        return np.nonzero(keep)[0]

    def clusters(self, n: int) -> list[list[int]]:
        """Row groups formed by the MATCH pairs (union-find); singletons included."""
        uf: UnionFind[int] = UnionFind(range(n))
        for k in self.linked(include_possible=False):
            uf.union(int(self.ia[k]), int(self.ib[k]))
        return uf.groups()


def fit_model(
    table: FeatureTable, ia: np.ndarray, ib: np.ndarray, config: MpiConfig, start: FSModel | None = None
) -> FSModel:
    """EM-estimate a model on the candidate pairs of ``table`` (priors when there are no pairs)."""
    if len(ia) == 0:
        return start or FSModel.prior()
    gamma = compare_pairs(table, ia, ib)
    return _em_or_fallback(gamma, table.n, config, start)


def fit_patterns(
    patterns: np.ndarray, counts: np.ndarray, records: int, config: MpiConfig, start: FSModel | None = None
) -> FSModel:
    """EM-estimate a model from distinct comparison vectors and their counts (priors when empty)."""
    if len(patterns) == 0:
        return start or FSModel.prior()
    return _em_or_fallback(patterns, records, config, start, counts)


def _em_or_fallback(
    gamma: np.ndarray,
    records: int,
    config: MpiConfig,
    start: FSModel | None,
    weights: np.ndarray | None = None,
) -> FSModel:
    """EM on ``gamma``; if the estimate is implausible, log it and keep ``start`` (or the priors)."""
    model = em_fit(
        gamma,
        start=start,
        prior_strength=config.prior_strength,
        max_iterations=config.em_max_iterations,
        weights=weights,
    )
    model.fitted_on_records = records
    problem = model.implausibility()
    if problem is not None:
        log.warning("mpi.em_rejected", reason=problem, pairs=len(gamma), records=records)
        fallback = start or FSModel.prior()
        fallback.fitted_on_records = records
        return fallback
    return model


def link_records(
    records: Sequence[Features],
    config: MpiConfig | None = None,
    *,
    model: FSModel | None = None,
    fit: bool = True,
) -> BatchResult:
    """Link a whole population at once: block, (EM-fit), score, decide.

    With ``fit`` (the default) and at least ``config.em_min_records`` records, m/u are estimated by EM
    on this population's candidate pairs; otherwise ``model`` (or the priors) is used.
    """
    config = config or MpiConfig()
    table = FeatureTable(records)
    ia, ib, skipped = candidate_pairs([blocking_keys(r) for r in records], config.max_block_size)
    gamma = compare_pairs(table, ia, ib)
    used = model or FSModel.prior()
    if fit and len(records) >= config.em_min_records and len(gamma):
        used = _em_or_fallback(gamma, len(records), config, model)
    tf = TermFrequencies.from_records(records) if config.term_frequency else None
    scored = weigh(gamma, ia, table, used, config, tf)
    return BatchResult(ia, ib, scored.prob, scored.state, used, len(ia), skipped)
