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
address     0 similarity <75, 1 >=75, 2 >=90, 3 exact; similarity = max(token-sort ratio, ratio of the
            strings without spaces)
city        0 JW<0.90, 1 JW>=0.90, 2 exact
postal      0 other, 1 one typo or transposition, 2 exact
phone       0 other, 1 one typo or transposition, 2 exact
ident       strong identifiers of a common system: 0 all different, 1 one typo/transposition, 2 equal
==========  =====================================================================================
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rapidfuzz import fuzz, process
from rapidfuzz.distance import OSA, JaroWinkler

from bridge.stores.mpi.arrays import distinct_inverse
from bridge.stores.mpi.features import STRING_KEYS, Features


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
#: what each level of each field means, by level (0 = disagree ... last = exact), as the table above
LEVEL_LABELS: dict[str, tuple[str, ...]] = {
    "given": ("JW<0.80", "JW>=0.80", "same NYSIIS or Metaphone code", "JW>=0.92", "exact"),
    "family": ("JW<0.80", "JW>=0.80", "same NYSIIS or Metaphone code", "JW>=0.92", "exact"),
    "birth": (
        "other",
        "same year and month or day (or equal partial dates)",
        "one typo, adjacent transposition or day/month swap",
        "exact",
    ),
    "sex": ("different", "equal"),
    "address": ("similarity<75", "similarity>=75", "similarity>=90", "exact"),
    "city": ("JW<0.90", "JW>=0.90", "exact"),
    "postal": ("other", "one typo or transposition", "exact"),
    "phone": ("other", "one typo or transposition", "exact"),
    "ident": ("all different", "one typo or transposition", "equal (same system)"),
}
GIVEN, FAMILY, BIRTH, SEX, ADDRESS, CITY, POSTAL, PHONE, IDENT = range(len(FIELDS))


class FeatureTable:
    """Column-oriented view of feature records, addressed by row number."""

    def __init__(self, records: Sequence[Features]) -> None:
        cols = {key: [r.get(key) or "" for r in records] for key in STRING_KEYS}
        self._build(len(records), cols, [r.get("i") or () for r in records])

    #: the vocabulary by code when the string columns are gathered from codes on demand (see
    #: :meth:`from_codes`); None when ``cols`` holds every column
    strings: np.ndarray | None = None

    @classmethod
    def from_codes(
        cls,
        codes: np.ndarray,
        strings: np.ndarray,
        idents: Sequence[Sequence[Sequence[str]]],
        multi_id: np.ndarray,
    ) -> FeatureTable:
        """A table over rows whose :data:`CODE_KEYS` values are integer codes in one vocabulary
        (``codes[i]`` is the column of ``CODE_KEYS[i]``, ``-1`` for ``""``; ``strings[c]`` is the string of
        code ``c``, ``strings[0] == ""``). The index's record cache keeps every record this way, so a
        batch's pairs are compared against the cache itself: no rows are copied, and a string is looked
        up only for the pairs whose values differ. Equal codes mean equal strings, so the comparisons are
        those of ``FeatureTable(records)``.

        ``idents`` and ``multi_id`` (rows with more than one strong identifier) may be longer than the
        code columns' length is meaningful for; only the rows that pairs address are read.
        """
        table = cls.__new__(cls)
        table.n = codes.shape[1]
        table.codes = {k: codes[i] for i, k in enumerate(CODE_KEYS)}
        table.strings = strings
        table.idents = idents
        table.multi_id = multi_id
        table.cols = {}
        return table

    def values(self, key: str, rows: np.ndarray) -> np.ndarray:
        """The strings of column ``key`` at ``rows`` (an object array)."""
        if self.strings is not None:
            return self.strings[np.maximum(self.codes[key][rows], 0)]  # type: ignore[no-any-return]
        return self.cols[key][rows]  # type: ignore[no-any-return]

    def _build(
        self, n: int, columns: Mapping[str, Sequence[str]], idents: Sequence[Sequence[Sequence[str]]]
    ) -> None:
        self.n = n
        self.cols: dict[str, Any] = {}
        for key in STRING_KEYS:
            col = np.empty(n, dtype=object)
            col[:] = columns[key]
            self.cols[key] = col
        self.cols["a_ns"] = np.array([x.replace(" ", "") for x in self.cols["a"]], dtype=object)
        self.cols["a_ts"] = np.array([_token_sorted(x) for x in self.cols["a"]], dtype=object)
        # the birth date's derived values, as encode() derives them
        derived = [_birth_values(x)[1:] for x in self.cols["b"]]
        for j, key in enumerate(("bswap", "by", "bm", "bd")):
            col = np.empty(n, dtype=object)
            col[:] = [d[j] for d in derived]
            self.cols[key] = col
        self.idents = idents
        # fast path for the common case of exactly one strong identifier: its value and its system (a
        # typo test of the value alone: the same answer as of "system|value" when the systems are equal,
        # at a fraction of the length)
        self.cols["idv"] = np.array(
            [i[0][1] if len(i) == 1 else "" for i in idents] if n else [], dtype=object
        )
        self.cols["idsys"] = np.array(
            [i[0][0] if len(i) == 1 else "" for i in idents] if n else [], dtype=object
        )
        self.multi_id = np.array([len(i) > 1 for i in idents], dtype=bool)
        # one shared vocabulary, so that codes of different columns compare (given vs family, ...)
        vocab: dict[str, int] = {"": -1}
        keys = list(self.cols)
        every = np.concatenate([self.cols[k] for k in keys]) if keys else np.zeros(0, dtype=object)
        setdefault = vocab.setdefault
        flat = np.array([setdefault(x, len(vocab)) for x in every.tolist()], dtype=np.int64)
        self.codes: dict[str, np.ndarray] = {
            k: flat[i * self.n : (i + 1) * self.n] for i, k in enumerate(keys)
        }


#: the columns whose values are integer-coded (equality tests), in the order of :func:`encode`
CODE_KEYS = (*STRING_KEYS, "a_ns", "a_ts", "bswap", "by", "bm", "bd", "idv", "idsys")


def _ident_map(pairs: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    d: dict[str, list[str]] = {}
    for system, value in pairs:
        d.setdefault(system, []).append(value)
    return d


def _token_sorted(text: str) -> str:
    """The words of ``text`` sorted: ``fuzz.ratio`` of two such strings is their ``token_sort_ratio``
    (for normalised text: ASCII letters, digits and spaces), without splitting and sorting both strings
    again for every pair."""
    return " ".join(sorted(text.split()))


_NAME_PARTS = (
    operator.itemgetter("g", "gn", "gm"),
    operator.itemgetter("f", "fn", "fm"),
)
#: positions in :data:`CODE_KEYS` of the codes a name, a birth date and the other values give
_NAME_COLUMNS = ((0, 2, 3), (1, 4, 5))
_BIRTH_COLUMNS = [6, 14, 15, 16, 17]  # b, bswap, by, bm, bd
_OTHER_COLUMNS = [7, 8, 9, 10, 11, 12, 13, 18, 19]  # s, a, c, z, t, a_ns, a_ts, idv, idsys
_OTHER = operator.itemgetter("s", "a", "c", "z", "t")


def _other_values(f: Features) -> tuple[str, ...]:
    """The values of :data:`_OTHER_COLUMNS` of one feature record."""
    s, a, c, z, t = _OTHER(f)
    idents: Sequence[Sequence[str]] = f.get("i") or ()
    a = a or ""
    ident = (idents[0][1], idents[0][0]) if len(idents) == 1 else ("", "")
    return (s, a, c, z, t, a.replace(" ", ""), _token_sorted(a), *ident)


def _birth_values(b: str) -> tuple[str, ...]:
    """A birth date, its day/month swap (full dates only), its year, month and day."""
    swap = b[:4] + b[6:8] + b[4:6] if len(b) == 8 else ""
    return (b, swap, b[:4], b[4:6], b[6:8])


def _complete(f: Features) -> Features:
    """A feature record with every string key present (``""`` for a missing or null one)."""
    return {**f, **{k: f.get(k) or "" for k in STRING_KEYS}}


class _Memo:
    """Values seen (names or birth dates) -> row of their codes in a growing ``int64`` array."""

    def __init__(self, width: int) -> None:
        self.row: dict[Any, int] = {}
        self.codes = np.full((1024, width), -1, dtype=np.int64)  # row 0 is never used (0 is falsy)
        self.n = 1

    def add(self, codes: tuple[int, ...]) -> int:
        if self.n == len(self.codes):
            grown = np.full((2 * len(self.codes), self.codes.shape[1]), -1, dtype=np.int64)
            grown[: self.n] = self.codes
            self.codes = grown
        self.codes[self.n] = codes
        self.n += 1
        return self.n - 1


class EncodeMemo:
    """What :func:`encode` remembers between calls with the same vocabulary: the codes of every name and
    birth date seen."""

    def __init__(self) -> None:
        self.names = _Memo(3)
        self.births = _Memo(len(_BIRTH_COLUMNS))


def encode(records: Sequence[Features], vocab: dict[str, int], memo: EncodeMemo | None = None) -> np.ndarray:
    """The codes of the records' :data:`CODE_KEYS` values in ``vocab`` (extended as needed; it must map
    ``""`` to ``-1``), as an ``(n, len(CODE_KEYS))`` int64 array. New strings get the next free codes.

    A name gives three codes (itself and its two phonetic codes) and a birth date five; ``memo`` (kept by
    the caller across calls with the same ``vocab``) maps each name and date seen to the row of its codes
    in an array, so a known one is one look-up in a small dictionary instead of several in the
    vocabulary (which holds every address and phone number: most look-ups there miss the CPU caches),
    and the batch's codes are gathered from that array in one step.
    """
    n = len(records)
    out = np.empty((n, len(CODE_KEYS)), dtype=np.int64)
    if n == 0:
        return out
    memo = EncodeMemo() if memo is None else memo
    try:
        births = [f["b"] or "" for f in records]
        names = [list(map(part, records)) for part in _NAME_PARTS]
        other = list(itertools.chain.from_iterable(map(_other_values, records)))
    except KeyError:  # pragma: no cover - extract_features always sets every key
        return encode([_complete(f) for f in records], vocab, memo)

    def code(value: str | None) -> int:
        if not value:
            return -1
        c = vocab.get(value)
        if c is None:
            c = vocab[value] = len(vocab)
        return c

    def codes_of(values: list[Any], table: _Memo, parts: Any) -> np.ndarray:
        rows: list[int | None] = list(map(table.row.get, values))
        for i in itertools.compress(itertools.count(), map(operator.not_, rows)):  # first seen
            v = values[i]
            hit = table.row.get(v)
            if hit is None:
                hit = table.row[v] = table.add(tuple(map(code, parts(v))))
            rows[i] = hit
        return table.codes[np.array(rows, dtype=np.intp)]

    for cols, values in zip(_NAME_COLUMNS, names, strict=True):
        out[:, cols] = codes_of(values, memo.names, lambda v: v)
    out[:, _BIRTH_COLUMNS] = codes_of(births, memo.births, _birth_values)
    codes = list(map(vocab.get, other))
    # positions of new strings (None; 0 is never a code), found at C level: most values are known
    for i in itertools.compress(itertools.count(), map(operator.not_, codes)):
        codes[i] = code(other[i])
    out[:, _OTHER_COLUMNS] = np.array(codes, dtype=np.int64).reshape(n, len(_OTHER_COLUMNS))
    return out


def _sim(a: np.ndarray, b: np.ndarray, scorer: Any, cutoff: float | None = None) -> np.ndarray:
    if len(a) == 0:
        return np.zeros(0, dtype=np.float64)
    # threads only pay off on large inputs (and the incremental index calls this per batch)
    workers = -1 if len(a) >= 50_000 else 1
    return np.asarray(
        process.cpdist(a, b, scorer=scorer, workers=workers, score_cutoff=cutoff), dtype=np.float64
    )


class _Pairs:
    """Row pairs of a table: integer codes for equality tests, strings only where a metric is needed."""

    def __init__(self, t: FeatureTable, ia: np.ndarray, ib: np.ndarray) -> None:
        self.t, self.ia, self.ib, self.n = t, ia, ib, len(ia)
        self._codes: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def codes(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._codes:
            c = self.t.codes[key]
            self._codes[key] = (c[self.ia], c[self.ib])
        return self._codes[key]

    def cross(self, key_a: str, key_b: str) -> tuple[np.ndarray, np.ndarray]:
        return self.codes(key_a)[0], self.codes(key_b)[1]

    def similarity(
        self,
        key_a: str,
        key_b: str,
        scorer: Any,
        *,
        equal: float,
        missing: float,
        rows: np.ndarray | None = None,
        cutoff: float | None = None,
    ) -> np.ndarray:
        """``scorer`` on the pairs whose strings are both present and differ (the only ones whose score
        is unknown); ``equal`` / ``missing`` elsewhere. Restricted to ``rows`` if given. With ``cutoff``,
        scores below it come back as 0 (rapidfuzz then gives up on a pair early): only for callers that
        ask nothing but ">= cutoff" of a score."""
        ca, cb = self.cross(key_a, key_b)
        if rows is not None:
            ca, cb = ca[rows], cb[rows]
        present = (ca >= 0) & (cb >= 0)
        eq = ca == cb
        out = np.where(eq & present, equal, missing).astype(np.float64)
        todo = np.nonzero(present & ~eq)[0]
        if len(todo):
            pa, pb = (self.ia, self.ib) if rows is None else (self.ia[rows], self.ib[rows])
            # each distinct pair of values once: records of one person share values, and a batch's
            # records are compared with the same neighbours, so about half the pairs repeat one
            ka, kb = ca[todo].astype(np.int64), cb[todo].astype(np.int64)  # the cache's codes are int32
            _, first, inverse = distinct_inverse(ka * (int(kb.max()) + 1) + kb)
            ra, rb = pa[todo[first]], pb[todo[first]]
            scores = _sim(self.t.values(key_a, ra), self.t.values(key_b, rb), scorer, cutoff)
            out[todo] = scores[inverse]
        return out


def _name_levels(ca: np.ndarray, cb: np.ndarray, jw: np.ndarray, phon: np.ndarray) -> np.ndarray:
    lv = np.zeros(len(ca), dtype=np.int8)
    lv[jw >= 0.80] = 1
    lv[phon] = 2
    lv[jw >= 0.92] = 3
    lv[ca == cb] = 4
    lv[(ca < 0) | (cb < 0)] = -1
    return lv


def _typo_levels(p: _Pairs, key: str) -> np.ndarray:
    ca, cb = p.codes(key)
    lv = np.zeros(p.n, dtype=np.int8)
    dist = p.similarity(key, key, OSA.distance, equal=0.0, missing=99.0)
    lv[dist <= 1] = 1
    lv[ca == cb] = 2
    lv[(ca < 0) | (cb < 0)] = -1
    return lv


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a == b) & (a >= 0), dtype=bool)


def compare_pairs(t: FeatureTable, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Return the (n_pairs, n_fields) int8 comparison matrix of row pairs ``(ia[k], ib[k])`` of ``t``."""
    n = len(ia)
    gamma = np.full((n, len(FIELDS)), -1, dtype=np.int8)
    if n == 0:
        return gamma
    p = _Pairs(t, ia, ib)
    jw = JaroWinkler.normalized_similarity

    ga, gb = p.codes("g")
    fa, fb = p.codes("f")
    jw_gg = p.similarity("g", "g", jw, equal=1.0, missing=0.0)
    jw_ff = p.similarity("f", "f", jw, equal=1.0, missing=0.0)
    # a swap needs both crosswise similarities >= 0.92 (below that, their values are never used): the
    # second one only where the first is
    jw_gf = p.similarity("g", "f", jw, equal=1.0, missing=0.0, cutoff=0.92)
    jw_fg = np.zeros(n, dtype=np.float64)
    maybe = np.nonzero(jw_gf >= 0.92)[0]
    if len(maybe):
        jw_fg[maybe] = p.similarity("f", "g", jw, equal=1.0, missing=0.0, rows=maybe, cutoff=0.92)
    gna, gnb = p.codes("gn")
    gma, gmb = p.codes("gm")
    fna, fnb = p.codes("fn")
    fma, fmb = p.codes("fm")
    ph_g = _same(gna, gnb) | _same(gma, gmb)
    ph_f = _same(fna, fnb) | _same(fma, fmb)
    given = _name_levels(ga, gb, jw_gg, ph_g)
    family = _name_levels(fa, fb, jw_ff, ph_f)
    swapped = (jw_gf >= 0.92) & (jw_fg >= 0.92) & (jw_gf + jw_fg > jw_gg + jw_ff + 0.2)
    if swapped.any():
        ph_gf = _same(gna, fnb) | _same(gma, fmb)
        ph_fg = _same(fna, gnb) | _same(fma, gmb)
        given = np.where(swapped, _name_levels(ga, fb, jw_gf, ph_gf), given)
        family = np.where(swapped, _name_levels(fa, gb, jw_fg, ph_fg), family)
    gamma[:, GIVEN] = given
    gamma[:, FAMILY] = family

    ba, bb = p.codes("b")
    bsa, bsb = p.codes("bswap")  # the swapped date exists exactly for full dates
    full = (bsa >= 0) & (bsb >= 0)
    lv = np.zeros(n, dtype=np.int8)
    partial_eq = _same(*p.codes("by")) & (_same(*p.codes("bm")) | _same(*p.codes("bd")))
    lv[partial_eq] = 1
    osa = p.similarity("b", "b", OSA.distance, equal=0.0, missing=99.0)
    lv[full & ((osa <= 1) | _same(*p.cross("bswap", "b")))] = 2
    lv[full & (ba == bb)] = 3
    lv[(ba < 0) | (bb < 0)] = -1
    gamma[:, BIRTH] = lv

    sa, sb = p.codes("s")
    gamma[:, SEX] = np.where((sa >= 0) & (sb >= 0), (sa == sb).astype(np.int8), -1)

    aa, ab = p.codes("a")
    # words reordered: token_sort_ratio, as the ratio of the words sorted once per record
    # (only ">= 75" and ">= 90" are asked of it)
    ratio = p.similarity("a_ts", "a_ts", fuzz.ratio, equal=100.0, missing=0.0, cutoff=75.0)
    # a space typed in the wrong place
    ratio = np.maximum(ratio, p.similarity("a_ns", "a_ns", fuzz.ratio, equal=100.0, missing=0.0, cutoff=75.0))
    lv = np.zeros(n, dtype=np.int8)
    lv[ratio >= 75] = 1
    lv[ratio >= 90] = 2
    lv[aa == ab] = 3
    lv[(aa < 0) | (ab < 0)] = -1
    gamma[:, ADDRESS] = lv

    ca, cb = p.codes("c")
    jw_c = p.similarity("c", "c", jw, equal=1.0, missing=0.0, cutoff=0.90)
    lv = np.zeros(n, dtype=np.int8)
    lv[jw_c >= 0.90] = 1
    lv[ca == cb] = 2
    lv[(ca < 0) | (cb < 0)] = -1
    gamma[:, CITY] = lv

    gamma[:, POSTAL] = _typo_levels(p, "z")
    gamma[:, PHONE] = _typo_levels(p, "t")

    ident = gamma[:, IDENT]
    ida, idb = p.codes("idv")
    sya, syb = p.codes("idsys")
    same = _same(sya, syb)
    lv = np.full(n, -1, dtype=np.int8)
    lv[same] = 0
    near = np.nonzero(same & (ida != idb))[0]
    if len(near):
        dist = p.similarity("idv", "idv", OSA.distance, equal=0.0, missing=99.0, rows=near)
        lv[near[dist <= 1]] = 1
    lv[same & (ida == idb)] = 2
    ident[:] = lv
    idents = t.idents
    for k in np.nonzero(t.multi_id[ia] | t.multi_id[ib])[0]:
        da, db = _ident_map(idents[ia[k]]), _ident_map(idents[ib[k]])
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
