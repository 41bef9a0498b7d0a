from __future__ import annotations

import numpy as np
from mpi_helpers import patient

from bridge.stores.mpi.compare import (
    ADDRESS,
    BIRTH,
    CITY,
    FAMILY,
    GIVEN,
    IDENT,
    PHONE,
    POSTAL,
    SEX,
    FeatureTable,
    compare_pairs,
)
from bridge.stores.mpi.config import DEFAULT_STRONG_SYSTEMS
from bridge.stores.mpi.features import extract_features


def gamma(a: dict, b: dict) -> np.ndarray:
    t = FeatureTable(
        [extract_features(a, DEFAULT_STRONG_SYSTEMS), extract_features(b, DEFAULT_STRONG_SYSTEMS)]
    )
    return compare_pairs(t, np.array([0]), np.array([1]))[0]


def test_exact_agreement_is_top_level_everywhere() -> None:
    p = patient(
        "a",
        "Maria",
        "Schneider",
        "1970-05-06",
        "female",
        line="1 Main St",
        city="Bonn",
        postal="53111",
        phone="0228123456",
        ssn="123456789",
    )
    g = gamma(p, {**p, "id": "b"})
    assert g.tolist() == [4, 4, 3, 1, 3, 2, 2, 2, 2]


def test_missing_fields_are_null() -> None:
    g = gamma(patient("a", "Maria", None), patient("b", "Maria", "Schneider", "1970-05-06", "female"))
    assert g[GIVEN] == 4
    assert all(g[i] == -1 for i in (FAMILY, BIRTH, SEX, ADDRESS, CITY, POSTAL, PHONE, IDENT))


def test_name_levels() -> None:
    assert gamma(patient("a", "Catherine", "X"), patient("b", "Catherine", "X"))[GIVEN] == 4
    assert gamma(patient("a", "Catherine", "X"), patient("b", "Cathreine", "X"))[GIVEN] == 3  # transposition
    assert gamma(patient("a", "Stephen", "X"), patient("b", "Steven", "X"))[GIVEN] >= 2  # phonetic
    assert gamma(patient("a", "Catherine", "X"), patient("b", "Zoe", "X"))[GIVEN] == 0


def test_swapped_names_are_recognised() -> None:
    g = gamma(patient("a", "Anderson", "Paul"), patient("b", "Paul", "Anderson"))
    assert (g[GIVEN], g[FAMILY]) == (4, 4)


def test_birth_date_tolerance() -> None:
    def lv(a: str, b: str) -> int:
        return int(gamma(patient("a", birth=a), patient("b", birth=b))[BIRTH])

    assert lv("1980-04-12", "1980-04-12") == 3
    assert lv("1980-04-12", "1980-12-04") == 2  # day/month swapped
    assert lv("1980-04-12", "1980-04-21") == 2  # adjacent digits transposed
    assert lv("1980-04-12", "1981-04-12") == 2  # one typo
    assert lv("1980-04-12", "1990-04-22") == 0
    assert lv("1980-04-12", "1980-04") == 1  # partial date, consistent
    assert lv("1980-04-12", "1931-06-20") == 0


def test_identifier_levels() -> None:
    def lv(a: str, b: str) -> int:
        return int(gamma(patient("a", ssn=a), patient("b", ssn=b))[IDENT])

    assert lv("123-45-6789", "123456789") == 2
    assert lv("123456789", "123456798") == 1
    assert lv("123456789", "987654321") == 0
    assert gamma(patient("a", ssn="1"), patient("b", mrn="1"))[IDENT] == -1


def test_vectorised_equals_pairwise() -> None:
    recs = [
        patient(f"p{i}", n, f, d, s, postal=z)
        for i, (n, f, d, s, z) in enumerate(
            [
                ("Ann", "Lee", "1990-01-02", "female", "111"),
                ("Anne", "Lee", "1990-02-01", "female", "112"),
                ("Bob", "Ray", "1950-07-07", "male", "999"),
                ("Rob", "Rae", None, "male", "999"),
            ]
        )
    ]
    feats = [extract_features(r, ()) for r in recs]
    t = FeatureTable(feats)
    ia, ib = np.array([0, 0, 1, 2, 0]), np.array([1, 2, 3, 3, 3])
    batch = compare_pairs(t, ia, ib)
    for k in range(len(ia)):
        assert batch[k].tolist() == gamma(recs[ia[k]], recs[ib[k]]).tolist()


def test_identifier_fast_path_equals_general_path() -> None:
    dl = "urn:oid:2.16.840.1.113883.4.3"

    def rec(pid: str, ids: list[tuple[str, str]]) -> dict:
        return {
            "resourceType": "Patient",
            "id": pid,
            "identifier": [{"system": s, "value": v} for s, v in ids],
        }

    recs = [
        rec("a", [("http://hl7.org/fhir/sid/us-ssn", "123456789")]),
        rec("b", [("http://hl7.org/fhir/sid/us-ssn", "123456798")]),
        rec("c", [("http://hl7.org/fhir/sid/us-ssn", "999999999"), (dl, "D1")]),
        rec("d", [(dl, "D1")]),
        rec("e", [(dl, "D2")]),
        rec("f", []),
    ]
    t = FeatureTable([extract_features(r, DEFAULT_STRONG_SYSTEMS) for r in recs])
    ia, ib = np.triu_indices(len(recs), k=1)
    got = compare_pairs(t, ia, ib)[:, IDENT].tolist()
    want = {(0, 1): 1, (0, 2): 0, (2, 3): 2, (3, 4): 1, (0, 3): -1, (1, 2): 0, (2, 4): 1}
    for k, (i, j) in enumerate(zip(ia.tolist(), ib.tolist(), strict=True)):
        assert got[k] == want.get((i, j), -1), (recs[i]["id"], recs[j]["id"])


def _mixed_features() -> list[dict]:
    from mpi_helpers import population

    recs, _ = population(40, seed=3)
    extra = [
        patient("sw", "Smith", "John", "1970-02-01", None, ssn="123456789", mrn="1"),
        patient("sx", "John", "Smith", "1970-01-02", None, ssn="123456798"),
        patient("ad", "Ann", "Lee", line="12  Elm   Street", city="Metro"),
        patient("ae", "Ann", "Lee", line="Street Elm 12", city="Metro"),
        {
            "resourceType": "Patient",
            "id": "multi",
            "identifier": [
                {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123456789"},
                {"system": "urn:oid:2.16.840.1.113883.4.3", "value": "D1"},
            ],
        },
        {"resourceType": "Patient", "id": "empty"},
    ]
    return [extract_features(p, DEFAULT_STRONG_SYSTEMS) for _, p in recs] + [
        extract_features(p, DEFAULT_STRONG_SYSTEMS) for p in extra
    ]


def test_cached_table_compares_like_the_record_table() -> None:
    """The record cache's table (codes in a shared growing vocabulary, rows in insertion order, strings
    looked up by code) gives the same comparison vectors as a table built from feature records."""
    from bridge.stores.mpi.cache import RecordCache
    from bridge.stores.mpi.matcher import TF_KEYS

    feats = _mixed_features()
    cache = RecordCache(TF_KEYS, None)
    # put in a different order and in several batches, so that rows and codes are not aligned by accident
    order = list(range(len(feats)))[::-1]
    for k in range(0, len(order), 7):
        cache.put_many([(f"r{i}", "org", feats[i], "d", i + 1) for i in order[k : k + 7]])
    rows = np.array([cache.row_of[f"r{i}"] for i in range(len(feats))])
    ia, ib = np.triu_indices(len(feats), k=1)
    want = compare_pairs(FeatureTable(feats), ia, ib)
    assert np.array_equal(want, compare_pairs(cache.table(), rows[ia], rows[ib]))
    for i, f in enumerate(feats):
        assert cache.features(f"r{i}") == {**f, "i": tuple(tuple(x) for x in f["i"])}


def test_address_level_is_token_sort_ratio() -> None:
    """The address comparison uses the ratio of the words sorted once per record, which must equal
    rapidfuzz's token_sort_ratio of the two addresses (normalised text)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from rapidfuzz import fuzz

    from bridge.stores.mpi.compare import _token_sorted
    from bridge.stores.mpi.features import norm_text

    words = st.lists(st.sampled_from(["1", "12", "elm", "st", "street", "oak", "ave", "a", "b2"]), max_size=5)

    @settings(max_examples=300, deadline=None)
    @given(words, words)
    def check(x: list[str], y: list[str]) -> None:
        a, b = norm_text(" ".join(x)), norm_text(" ".join(y))
        assert fuzz.ratio(_token_sorted(a), _token_sorted(b)) == fuzz.token_sort_ratio(a, b)

    check()


def test_cache_strings_follow_the_vocabulary_as_it_grows() -> None:
    from bridge.stores.mpi.cache import RecordCache

    cache = RecordCache(("g",), None)
    for batch in (10, 2000, 1):
        for _ in range(batch):
            cache.vocab[f"v{len(cache.vocab)}"] = len(cache.vocab)
        strings = cache.strings()
        codes = np.array(list(cache.vocab.values())[1:], dtype=np.int64)
        assert strings[np.maximum(codes, 0)].tolist() == list(cache.vocab)[1:]
        assert strings[np.maximum(np.array([-1]), 0)].tolist() == [""]


def test_repeated_value_pairs_score_like_single_pairs() -> None:
    """Each distinct pair of values is scored once per batch (records of one person share values): every
    pair's vector must equal the one of the two records compared on their own."""
    feats = _mixed_features()[:20]
    feats = feats + [dict(f) for f in feats[:8]]  # the same values again, under other rows
    ia, ib = np.triu_indices(len(feats), k=1)
    batch = compare_pairs(FeatureTable(feats), ia, ib)
    for k, (i, j) in enumerate(zip(ia.tolist(), ib.tolist(), strict=True)):
        alone = compare_pairs(FeatureTable([feats[i], feats[j]]), np.array([0]), np.array([1]))[0]
        assert batch[k].tolist() == alone.tolist(), (i, j)


def test_score_cutoffs_keep_every_threshold_answer() -> None:
    """Some similarities are computed with a score cutoff (rapidfuzz returns 0 below it and can stop
    early): every question the levels ask of them (score >= threshold, for each threshold at or above the
    cutoff) must get the answer of the full score, boundaries included (e.g. a ratio of exactly 75)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from rapidfuzz import fuzz
    from rapidfuzz.distance import JaroWinkler

    text = st.text(alphabet="abcde ", max_size=12)
    jw = JaroWinkler.normalized_similarity
    cases = [(jw, 0.92, (0.92,)), (jw, 0.90, (0.90,)), (fuzz.ratio, 75.0, (75.0, 90.0))]

    @settings(max_examples=600, deadline=None)
    @given(text, text)
    def check(a: str, b: str) -> None:
        for scorer, cutoff, thresholds in cases:
            full, cut = scorer(a, b), scorer(a, b, score_cutoff=cutoff)
            for th in thresholds:
                assert (cut >= th) == (full >= th), (scorer, a, b, full, cut)

    check()
    assert fuzz.ratio("abcdefgh", "abcdefxy", score_cutoff=75.0) == 75.0  # exactly at the boundary


def test_encode_memo_gives_the_vocabulary_codes_across_batches_and_growth() -> None:
    """Codes read through the memo (names and birth dates, past its first array size) are those of the
    vocabulary: decoding every column gives back the table's strings."""
    from bridge.stores.mpi.compare import CODE_KEYS, EncodeMemo, encode

    rng = np.random.default_rng(5)
    feats = []
    for i in range(3000):  # ~2,000 distinct given names and ~1,500 birth dates: the memo arrays grow
        f = extract_features(
            patient(
                f"p{i}",
                f"g{rng.integers(2000)}x",
                f"f{rng.integers(40)}",
                f"19{rng.integers(10, 99)}-0{rng.integers(1, 9)}-1{rng.integers(0, 9)}",
                "female" if i % 3 else "male",
                line=f"{i % 50} elm street",
                postal=str(10000 + i % 70),
            ),
            DEFAULT_STRONG_SYSTEMS,
        )
        feats.append(f)
    vocab: dict[str, int] = {"": -1}
    memo = EncodeMemo()
    codes = np.concatenate([encode(feats[k : k + 700], vocab, memo) for k in range(0, len(feats), 700)])
    again = encode(feats, vocab, memo)  # everything known now: the same codes, and no new strings
    assert np.array_equal(codes, again) and len(vocab) == len(set(vocab))
    strings = {c: s for s, c in vocab.items()}
    table = FeatureTable(feats)
    for col, key in enumerate(CODE_KEYS):
        assert [strings[c] for c in codes[:, col].tolist()] == table.cols[key].tolist(), key
