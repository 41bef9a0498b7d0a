"""Vectorised field comparisons: record pairs -> comparison vectors (gamma).

Every compared field has ordered agreement levels, 0 being "disagree" and the highest being "exact".
``-1`` means the field is missing on either side; it contributes no evidence. Fields and levels:

==========  =====================================================================================
given       0 JW<0.80, 1 JW>=0.80, 2 same NYSIIS or Metaphone code, 3 JW>=0.92, 4 exact
family      same levels as given. Given and family are compared crosswise too: when the names are
            swapped between the records (given~family and family~given), the crossed pair is used.
birth       0 other, 1 same year and month-or-day (or equal partial dates), 2 one typo or adjacent
            transposition (OSA distance 1) or day/month swapped, 3 exact full date
sex         0 different, 1 equal
address     0 token-sort ratio <75, 1 >=75, 2 >=90, 3 exact
city        0 JW<0.90, 1 JW>=0.90, 2 exact
postal      0 other, 1 one typo or transposition, 2 exact
phone       0 other, 1 one typo or transposition, 2 exact
ident       strong identifiers of a common system: 0 all different, 1 one typo/transposition, 2 equal
==========  =====================================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rapidfuzz import fuzz, process
from rapidfuzz.distance import OSA, JaroWinkler

from bridge.mpi.features import Features


@dataclass(frozen=True)
class FieldSpec:
    name: str
    levels: int
    #: feature key whose value frequency adjusts the weight of an exact agreement (None: no adjustment)
    tf_key: str | None = None


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("given", 5, "g"),
    FieldSpec("family", 5, "f"),
    FieldSpec("birth", 4, "b"),
    FieldSpec("sex", 2),
    FieldSpec("address", 4),
    FieldSpec("city", 3, "c"),
    FieldSpec("postal", 3, "z"),
    FieldSpec("phone", 3),
    FieldSpec("ident", 3),
)
FIELD_INDEX = {f.name: i for i, f in enumerate(FIELDS)}
GIVEN, FAMILY, BIRTH, SEX, ADDRESS, CITY, POSTAL, PHONE, IDENT = range(len(FIELDS))


class FeatureTable:
    """Column-oriented view of feature records, addressed by row number."""

    def __init__(self, records: Sequence[Features]) -> None:
        self.n = len(records)
        self.cols: dict[str, np.ndarray] = {}
        for key in ("g", "f", "gn", "gm", "fn", "fm", "b", "s", "a", "c", "z", "t"):
            self.cols[key] = np.array([r.get(key) or "" for r in records], dtype=object)
        b = self.cols["b"]
        self.cols["bswap"] = np.array(
            [x[:4] + x[6:8] + x[4:6] if len(x) == 8 else "" for x in b], dtype=object
        )
        self.cols["by"] = np.array([x[:4] for x in b], dtype=object)
        self.cols["bm"] = np.array([x[4:6] for x in b], dtype=object)
        self.cols["bd"] = np.array([x[6:8] for x in b], dtype=object)
        self.ids: list[dict[str, list[str]]] = []
        for r in records:
            d: dict[str, list[str]] = {}
            for system, value in r.get("i") or ():
                d.setdefault(system, []).append(value)
            self.ids.append(d)


def _present(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a != "") & (b != ""), dtype=bool)


def _sim(a: np.ndarray, b: np.ndarray, scorer: Any) -> np.ndarray:
    if len(a) == 0:
        return np.zeros(0, dtype=np.float64)
    return np.asarray(process.cpdist(list(a), list(b), scorer=scorer, workers=1), dtype=np.float64)


def _name_levels(a: np.ndarray, b: np.ndarray, jw: np.ndarray, phon: np.ndarray) -> np.ndarray:
    lv = np.zeros(len(a), dtype=np.int8)
    lv[jw >= 0.80] = 1
    lv[phon] = 2
    lv[jw >= 0.92] = 3
    lv[a == b] = 4
    lv[~_present(a, b)] = -1
    return lv


def _typo_levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lv = np.zeros(len(a), dtype=np.int8)
    dist = _sim(a, b, OSA.distance)
    lv[dist <= 1] = 1
    lv[a == b] = 2
    lv[~_present(a, b)] = -1
    return lv


def compare_pairs(t: FeatureTable, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Return the (n_pairs, n_fields) int8 comparison matrix of row pairs ``(ia[k], ib[k])`` of ``t``."""
    n = len(ia)
    gamma = np.full((n, len(FIELDS)), -1, dtype=np.int8)
    if n == 0:
        return gamma
    c = t.cols

    def col(key: str) -> tuple[np.ndarray, np.ndarray]:
        return c[key][ia], c[key][ib]

    ga, gb = col("g")
    fa, fb = col("f")
    jw_gg = _sim(ga, gb, JaroWinkler.normalized_similarity)
    jw_ff = _sim(fa, fb, JaroWinkler.normalized_similarity)
    jw_gf = _sim(ga, fb, JaroWinkler.normalized_similarity)
    jw_fg = _sim(fa, gb, JaroWinkler.normalized_similarity)
    gna, gnb = col("gn")
    gma, gmb = col("gm")
    fna, fnb = col("fn")
    fma, fmb = col("fm")
    ph_g = ((gna == gnb) | (gma == gmb)) & (gna != "")
    ph_f = ((fna == fnb) | (fma == fmb)) & (fna != "")
    ph_gf = ((gna == fnb) | (gma == fmb)) & (gna != "")
    ph_fg = ((fna == gnb) | (fma == gmb)) & (fna != "")
    given = _name_levels(ga, gb, jw_gg, ph_g)
    family = _name_levels(fa, fb, jw_ff, ph_f)
    swapped = (jw_gf >= 0.92) & (jw_fg >= 0.92) & (jw_gf + jw_fg > jw_gg + jw_ff + 0.2)
    if swapped.any():
        given = np.where(swapped, _name_levels(ga, fb, jw_gf, ph_gf), given)
        family = np.where(swapped, _name_levels(fa, gb, jw_fg, ph_fg), family)
    gamma[:, GIVEN] = given
    gamma[:, FAMILY] = family

    ba, bb = col("b")
    full = np.array([len(x) == 8 for x in ba], dtype=bool) & np.array([len(x) == 8 for x in bb], dtype=bool)
    bya, byb = col("by")
    bma, bmb = col("bm")
    bda, bdb = col("bd")
    lv = np.zeros(n, dtype=np.int8)
    partial_eq = (bya == byb) & ((bma == bmb) | (bda == bdb))
    lv[partial_eq] = 1
    osa = _sim(ba, bb, OSA.distance)
    bswap_a = c["bswap"][ia]
    lv[full & ((osa <= 1) | (bswap_a == bb))] = 2
    lv[full & (ba == bb)] = 3
    lv[~_present(ba, bb)] = -1
    gamma[:, BIRTH] = lv

    sa, sb = col("s")
    gamma[:, SEX] = np.where(_present(sa, sb), (sa == sb).astype(np.int8), -1)

    aa, ab = col("a")
    ratio = _sim(aa, ab, fuzz.token_sort_ratio)
    lv = np.zeros(n, dtype=np.int8)
    lv[ratio >= 75] = 1
    lv[ratio >= 90] = 2
    lv[aa == ab] = 3
    lv[~_present(aa, ab)] = -1
    gamma[:, ADDRESS] = lv

    ca, cb = col("c")
    jw = _sim(ca, cb, JaroWinkler.normalized_similarity)
    lv = np.zeros(n, dtype=np.int8)
    lv[jw >= 0.90] = 1
    lv[ca == cb] = 2
    lv[~_present(ca, cb)] = -1
    gamma[:, CITY] = lv

    gamma[:, POSTAL] = _typo_levels(*col("z"))
    gamma[:, PHONE] = _typo_levels(*col("t"))

    ids = t.ids
    ident = gamma[:, IDENT]
    for k in range(n):
        da, db = ids[ia[k]], ids[ib[k]]
        if not da or not db:
            continue
        best = -1
        for system, values in da.items():
            other = db.get(system)
            if not other:
                continue
            for v in values:
                for w in other:
                    if v == w:
                        best = 2
                    elif best < 1 and OSA.distance(v, w) <= 1:
                        best = 1
                    elif best < 0:
                        best = 0
        ident[k] = best
    return gamma
