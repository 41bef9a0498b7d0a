from __future__ import annotations

import numpy as np
import pytest

from bridge.stores.mpi.compare import BIRTH, FAMILY, FIELDS, GIVEN, IDENT
from bridge.stores.mpi.config import MpiConfig, MpiError
from bridge.stores.mpi.model import FSModel, decide, em_fit, probability


def simulate(model: FSModel, n: int, seed: int = 0, missing: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    is_match = rng.random(n) < model.lam
    gamma = np.empty((n, len(FIELDS)), dtype=np.int8)
    for i, f in enumerate(FIELDS):
        gm = rng.choice(f.levels, size=n, p=model.m[i])
        gu = rng.choice(f.levels, size=n, p=model.u[i])
        gamma[:, i] = np.where(is_match, gm, gu)
        gamma[rng.random(n) < missing, i] = -1
    return gamma, is_match


def truth_model() -> FSModel:
    m = FSModel.prior()
    # move every distribution away from the prior so that EM has something to find
    rng = np.random.default_rng(42)
    m.m = [x * rng.uniform(0.5, 1.5, size=len(x)) for x in m.m]
    m.m = [x / x.sum() for x in m.m]
    m.u = [x * rng.uniform(0.5, 1.5, size=len(x)) for x in m.u]
    m.u = [x / x.sum() for x in m.u]
    m.lam = 0.2
    return m


def test_em_recovers_generating_parameters() -> None:
    true = truth_model()
    gamma, _ = simulate(true, 40_000)
    fit = em_fit(gamma, max_iterations=200)
    assert fit.source == "em" and fit.fitted_on_pairs == 40_000
    assert abs(fit.lam - true.lam) < 0.01
    for i in range(len(FIELDS)):
        assert np.abs(fit.m[i] - true.m[i]).max() < 0.03, FIELDS[i].name
        assert np.abs(fit.u[i] - true.u[i]).max() < 0.01, FIELDS[i].name


def test_em_classifies_simulated_pairs() -> None:
    true = truth_model()
    gamma, is_match = simulate(true, 20_000, seed=1)
    fit = em_fit(gamma)
    pred = probability(fit.match_weight(gamma)) > 0.5
    assert (pred == is_match).mean() > 0.98


def test_em_needs_pairs_and_model_round_trips() -> None:
    with pytest.raises(MpiError):
        em_fit(np.zeros((0, len(FIELDS)), dtype=np.int8))
    m = truth_model()
    again = FSModel.from_json(m.to_json())
    for a, b in zip(m.m, again.m, strict=True):
        assert np.allclose(a, b, atol=1e-7)
    with pytest.raises(MpiError):
        FSModel.from_json({"m": {}, "u": {}})


def test_term_frequency_rare_name_weighs_more_than_common() -> None:
    m = FSModel.prior()
    gamma = np.full((2, len(FIELDS)), -1, dtype=np.int8)
    gamma[:, FAMILY] = 4
    counts = {"smith": 500, "zyszczak": 1}
    total = 1000
    tf_mean = {"f": (500**2 + 1 + 499) / total**2}

    freq = np.array([counts[v] / total for v in ("smith", "zyszczak")])
    w = m.match_weight(gamma, tf_freq={"f": freq}, tf_mean=tf_mean, tf_cap=4.0)
    base = m.match_weight(gamma)
    assert w[1] > base[1] > w[0]
    assert w[1] - base[1] <= 4.0 + 1e-9 and base[0] - w[0] <= 4.0 + 1e-9


def test_decide_thresholds_evidence_and_identifier_rule() -> None:
    cfg = MpiConfig()
    gamma = np.full((5, len(FIELDS)), -1, dtype=np.int8)
    gamma[3, IDENT] = 2  # identifier equal, demographics corroborate
    gamma[4, IDENT] = 2  # identifier equal, demographics disagree
    gamma[4, [GIVEN, FAMILY, BIRTH]] = 0
    prob = np.array([0.99, 0.99, 0.5, 0.1, 0.9999])
    evidence = np.array([10.0, 2.0, 1.0, 0.0, 20.0])
    demo = np.array([0.9, 0.9, 0.5, 0.5, 0.001])
    assert decide(gamma, prob, demo, evidence, cfg).tolist() == [
        "MATCH",
        "POSSIBLE_MATCH",
        "POSSIBLE_MATCH",
        "MATCH",
        "POSSIBLE_MATCH",
    ]


def test_config_validation() -> None:
    with pytest.raises(MpiError):
        MpiConfig(match_threshold=0.2, possible_threshold=0.5)
    with pytest.raises(MpiError):
        MpiConfig(max_block_size=1)
    for bad in ({"prior_strength": -1.0}, {"em_refit_factor": 1.0}, {"identifier_corroboration": 2.0}):
        with pytest.raises(MpiError):
            MpiConfig(**bad)  # type: ignore[arg-type]


def test_implausible_em_estimate_falls_back_to_priors() -> None:
    from bridge.stores.mpi.matcher import _em_or_fallback

    assert FSModel.prior().implausibility() is None
    swapped = FSModel.prior()
    swapped.m, swapped.u = swapped.u, swapped.m
    assert "given" in (swapped.implausibility() or "")
    # comparison vectors where names never agree exactly but always disagree: no match structure at all
    gamma = np.full((500, len(FIELDS)), -1, dtype=np.int8)
    gamma[:, GIVEN] = 0
    gamma[:, FAMILY] = 0
    gamma[:, BIRTH] = np.arange(500) % 2
    model = _em_or_fallback(gamma, 1000, MpiConfig(prior_strength=0.0), None)
    assert model.source == "prior" and model.fitted_on_records == 1000
    assert model.implausibility() is None


def test_em_on_weighted_patterns_equals_em_on_rows() -> None:
    gamma, _ = simulate(truth_model(), 4000, seed=3)
    rows, counts = np.unique(gamma, axis=0, return_counts=True)
    a = em_fit(gamma)
    b = em_fit(rows, weights=counts)
    assert a.fitted_on_pairs == b.fitted_on_pairs == 4000
    assert abs(a.lam - b.lam) < 1e-9
    for x, y in zip(a.m + a.u, b.m + b.u, strict=True):
        assert np.allclose(x, y, atol=1e-9)
