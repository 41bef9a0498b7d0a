"""SMART App Launch 2.2 scopes: the grammar (v2 letters in order, v1 names, queries), the non-resource
scopes, and what a set grants, including the granular category/code narrowing of HTI-1."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.service.auth.scopes import (
    CONTEXTS,
    INTERACTIONS,
    NON_RESOURCE_SCOPES,
    Scope,
    ScopeSet,
    params_match,
    parse_scope,
)

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
LOINC = "http://loinc.org"


def observation(category: str = "laboratory", code: str = "2345-7", system: str | None = None) -> dict:
    cat_system = system or "http://terminology.hl7.org/CodeSystem/observation-category"
    return {
        "resourceType": "Observation",
        "category": [{"coding": [{"system": cat_system, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
    }


# -- the grammar -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "context", "rtype", "letters"),
    [
        ("patient/Observation.rs", "patient", "Observation", "rs"),
        ("user/Patient.cruds", "user", "Patient", "cruds"),
        ("system/*.r", "system", "*", "r"),
        ("patient/Observation.cr", "patient", "Observation", "cr"),
        ("patient/Observation.read", "patient", "Observation", "rs"),
        ("user/Observation.write", "user", "Observation", "cud"),
        ("user/Observation.*", "user", "Observation", "cruds"),
        ("patient/*.*", "patient", "*", "cruds"),
    ],
)
def test_parse_scope_valid(text: str, context: str, rtype: str, letters: str) -> None:
    scope = parse_scope(text)
    assert scope == Scope(context, rtype, frozenset(letters))


@pytest.mark.parametrize(
    "text",
    [
        "patient/Observation.rc",  # r before c: out of order
        "patient/Observation.sr",
        "patient/Observation.rr",  # a letter twice
        "patient/Observation.",  # no letter
        "patient/Observation.x",
        "patient/Observation.READ",
        "Patient/Observation.rs",  # contexts are lower case
        "practitioner/Observation.rs",
        "patient/observation.rs",  # a type starts with a capital
        "patient/Observation",
        "patient/.rs",
        "patient/Obs-ervation.rs",
        "patient/Observation.read?category=x",  # a v1 scope has no query
        "patient/Observation.rs?",  # an empty query
        "patient/Observation.rs?category",  # no value
        "patient/Observation.rs?category=",
        "patient/Observation.rs?=laboratory",
        "patient/Observation.rs?category=a&&code=b",
        'patient/Observation.rs?category="x"',  # '"' is not a scope character (RFC 6749 3.3)
        "patient/Observation.rs\t",
        "launch/other",
    ],
)
def test_parse_scope_invalid(text: str) -> None:
    assert parse_scope(text) is None
    parsed = ScopeSet.parse(text)
    assert parsed.scopes == () and parsed.other == frozenset()
    assert parsed.ignored == (text,)


def test_parse_scope_with_query_keeps_it_as_written() -> None:
    text = f"patient/Observation.rs?category={LAB}&code={LOINC}|2345-7,{LOINC}%7C718-7"
    scope = parse_scope(text)
    assert scope is not None
    assert scope.params == (("category", LAB), ("code", f"{LOINC}|2345-7,{LOINC}%7C718-7"))
    assert str(scope) == text


def test_non_resource_scopes_are_kept_and_grant_nothing() -> None:
    text = "openid fhirUser launch launch/patient offline_access online_access"
    parsed = ScopeSet.parse(text)
    assert parsed.other == frozenset(text.split())
    assert parsed.other <= NON_RESOURCE_SCOPES
    assert parsed.scopes == () and parsed.ignored == ()
    assert not parsed.allows(CONTEXTS, "*", "r")
    assert parsed.contexts() == frozenset()


def test_parse_scope_string_and_scp_list_alike() -> None:
    text = "openid patient/Observation.rs bogus user/*.read"
    from_string = ScopeSet.parse(text)
    from_list = ScopeSet.parse(text.split())
    assert from_string == from_list
    assert [str(s) for s in from_string.scopes] == ["patient/Observation.rs", "user/*.rs"]
    assert from_string.ignored == ("bogus",)


def test_parse_ignores_items_that_are_not_text() -> None:
    parsed = ScopeSet.parse(["patient/Patient.r", 7, None, {"a": 1}])
    assert [str(s) for s in parsed.scopes] == ["patient/Patient.r"]
    assert parsed.ignored == ("<int>", "<NoneType>", "<dict>")
    assert ScopeSet.parse(42).ignored == ("<int>",)
    assert ScopeSet.parse(None) == ScopeSet()


def test_parse_collapses_duplicates_and_extra_spaces() -> None:
    parsed = ScopeSet.parse("  patient/Patient.rs   patient/Patient.read patient/Patient.rs ")
    assert [str(s) for s in parsed.scopes] == ["patient/Patient.rs"]


def test_from_claims_prefers_scope_and_reads_scp() -> None:
    assert (
        str(ScopeSet.from_claims({"scope": "patient/Patient.r", "scp": ["user/*.r"]})) == "patient/Patient.r"
    )
    assert str(ScopeSet.from_claims({"scp": ["user/*.r", "openid"]})) == "user/*.r openid"
    assert str(ScopeSet.from_claims({"scp": "user/*.r"})) == "user/*.r"
    assert ScopeSet.from_claims({}) == ScopeSet()


def test_scope_refuses_invalid_values_when_built_directly() -> None:
    with pytest.raises(ValueError):
        Scope("doctor", "Patient", frozenset("r"))
    with pytest.raises(ValueError):
        Scope("user", "Patient", frozenset())
    with pytest.raises(ValueError):
        Scope("user", "Patient", frozenset("rx"))


# -- what a set grants -------------------------------------------------------------------------------
def test_allows_by_context_type_and_letter() -> None:
    s = ScopeSet.parse("patient/Observation.rs user/Patient.cu")
    assert s.allows({"patient"}, "Observation", "r")
    assert s.allows("patient", "Observation", "s")
    assert s.allows({"patient"}, "Observation", "rs")  # every letter
    assert not s.allows({"patient"}, "Observation", "u")
    assert not s.allows({"patient"}, "Observation", "rsu")
    assert not s.allows({"user", "system"}, "Observation", "r")  # wrong context
    assert not s.allows(CONTEXTS, "Condition", "r")
    assert s.allows(CONTEXTS, "Patient", "c")
    assert not s.allows({"patient"}, "Patient", "c")


def test_allows_some_type_and_the_wildcard_type() -> None:
    s = ScopeSet.parse("patient/Observation.rs")
    assert s.allows({"patient"}, "*", "r")  # some type
    assert not s.allows({"patient"}, "*", "c")
    wildcard = ScopeSet.parse("system/*.rs")
    for rtype in ("Patient", "Observation", "Person", "*"):
        assert wildcard.allows({"system"}, rtype, "r")
    assert not wildcard.allows({"system"}, "Patient", "u")
    assert not wildcard.allows({"patient"}, "Patient", "r")


def test_allows_refuses_an_unknown_interaction() -> None:
    s = ScopeSet.parse("user/*.cruds")
    for bad in ("", "x", "read"):
        with pytest.raises(ValueError):
            s.allows(CONTEXTS, "Patient", bad)
    with pytest.raises(ValueError):
        s.narrowing("Patient", "rs")


def test_contexts() -> None:
    assert ScopeSet.parse("openid patient/Patient.r system/*.rs").contexts() == {"patient", "system"}


def test_narrowing_none_all_or_the_queries() -> None:
    s = ScopeSet.parse(f"patient/Observation.rs?category={LAB} patient/Observation.rs?code={LOINC}|2345-7")
    assert s.narrowing("Observation", "r") == [(("category", LAB),), (("code", f"{LOINC}|2345-7"),)]
    assert s.narrowing("Observation", "c") == []
    assert s.narrowing("Condition", "r") == []
    assert s.narrowing("Observation", "r", context_kinds={"user"}) == []
    widened = ScopeSet.parse(f"patient/Observation.rs?category={LAB} patient/Observation.r")
    assert widened.narrowing("Observation", "r") == [()]  # one scope without a query: every resource
    assert widened.narrowing("Observation", "s") == [(("category", LAB),)]
    assert ScopeSet.parse("patient/*.rs").narrowing("Condition", "s") == [()]


def test_grants_a_resource_through_any_matching_scope() -> None:
    s = ScopeSet.parse(f"patient/Observation.rs?category={LAB} patient/Condition.rs")
    assert s.grants(observation("laboratory"), "r")
    assert not s.grants(observation("vital-signs"), "r")
    assert not s.grants(observation("laboratory"), "u")
    assert s.grants({"resourceType": "Condition"}, "r")
    assert not s.grants({"resourceType": "Patient"}, "r")
    assert not s.grants({"category": []}, "r")  # no resourceType
    assert not s.grants(observation("laboratory"), "r", context_kinds={"user"})
    s2 = ScopeSet.parse(f"patient/Observation.rs?category={LAB} patient/Observation.rs?code={LOINC}|718-7")
    assert s2.grants(observation("vital-signs", code="718-7"), "s")  # the second scope
    assert not s2.grants(observation("vital-signs", code="2345-7"), "s")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (LAB, True),
        ("laboratory", True),  # any system
        ("http://terminology.hl7.org/CodeSystem/observation-category|", True),  # any code of the system
        ("http://other.example/cs|laboratory", False),
        ("|laboratory", False),  # no system: the coding has one
        ("vital-signs", False),
        ("vital-signs,laboratory", True),  # a comma is "or"
        ("http://terminology.hl7.org/CodeSystem/observation-category%7Claboratory", True),  # percent-encoded
        ("|", False),
        ("labor", False),
    ],
)
def test_params_match_category_tokens(value: str, expected: bool) -> None:
    assert params_match(observation("laboratory"), (("category", value),)) is expected


def test_params_match_no_system_coding() -> None:
    obs = {"resourceType": "Observation", "category": [{"coding": [{"code": "laboratory"}]}]}
    assert params_match(obs, (("category", "|laboratory"),))
    assert params_match(obs, (("category", "laboratory"),))
    assert not params_match(obs, (("category", LAB),))


def test_params_match_code_and_condition_and_every_parameter() -> None:
    obs = observation("laboratory", code="2345-7")
    assert params_match(obs, (("code", f"{LOINC}|2345-7"),))
    assert params_match(obs, (("category", "laboratory"), ("code", "2345-7")))
    assert not params_match(obs, (("category", "laboratory"), ("code", "718-7")))  # every one must match
    condition = {
        "resourceType": "Condition",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "problem-list-item",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
    }
    assert params_match(condition, (("category", "problem-list-item"),))
    assert params_match(condition, (("code", "http://snomed.info/sct|44054006"),))
    assert not params_match(condition, (("code", "http://snomed.info/sct|1"),))


def test_params_match_fails_closed() -> None:
    obs = observation()
    assert not params_match(obs, (("status", "final"),))  # a parameter it cannot evaluate
    assert not params_match(
        {"resourceType": "Patient", "category": obs["category"]}, (("category", "laboratory"),)
    )
    for broken in (
        {"resourceType": "Observation"},
        {"resourceType": "Observation", "category": "laboratory"},
        {"resourceType": "Observation", "category": [{"coding": "x"}]},
        {"resourceType": "Observation", "category": [None, {"coding": [None, 3]}]},
        {"resourceType": 3},
    ):
        assert not params_match(broken, (("category", "laboratory"),))
    assert params_match(obs, ())


def test_scope_matches_checks_its_type() -> None:
    scope = parse_scope("patient/Observation.rs?category=laboratory")
    assert scope is not None
    assert scope.matches(observation())
    assert not scope.matches({**observation(), "resourceType": "Condition"})
    assert not scope.matches(observation("vital-signs"))
    wildcard = parse_scope("patient/*.rs")
    assert wildcard is not None and wildcard.matches({"resourceType": "Anything"})


# -- properties --------------------------------------------------------------------------------------
TYPES = st.sampled_from(["Observation", "Condition", "Patient", "Person", "AllergyIntolerance", "*"])
LETTERS = st.lists(st.sampled_from(INTERACTIONS), min_size=1, unique=True).map(
    lambda ls: "".join(c for c in INTERACTIONS if c in ls)
)
VALUE_CHARS = st.sampled_from("abcdefghijklmnopqrstuvwxyzABC0123456789-_.:/|,%")
PARAMS = st.lists(
    st.tuples(st.sampled_from(["category", "code", "status", "_tag"]), st.text(VALUE_CHARS, min_size=1)),
    max_size=3,
).map(tuple)


@given(st.text())
def test_parse_never_raises_and_classifies_every_token(text: str) -> None:
    parsed = ScopeSet.parse(text)
    tokens = {t for t in text.split(" ") if t}
    rendered = {str(s) for s in parsed.scopes}
    assert len(parsed.scopes) + len(parsed.other) + len(parsed.ignored) <= len(tokens)
    for token in tokens:
        scope = parse_scope(token)
        if scope is not None:
            assert str(scope) in rendered
        else:
            assert token in parsed.other or token in parsed.ignored
    assert ScopeSet.parse(str(parsed)).scopes == parsed.scopes  # printing is stable


@given(st.lists(st.one_of(st.text(), st.integers(), st.none(), st.binary())))
def test_parse_never_raises_on_any_claim_value(value: list) -> None:
    ScopeSet.parse(value)
    ScopeSet.from_claims({"scp": value})


@given(st.sampled_from(CONTEXTS), TYPES, LETTERS, PARAMS)
def test_round_trip_of_valid_scopes(context: str, rtype: str, letters: str, params: tuple) -> None:
    scope = Scope(context, rtype, frozenset(letters), params)
    text = str(scope)
    assert parse_scope(text) == scope
    assert ScopeSet.parse(f"openid {text}").scopes == (scope,)


@given(st.sampled_from(CONTEXTS), TYPES, st.sampled_from(["read", "write", "*"]))
def test_v1_and_v2_are_equivalent(context: str, rtype: str, v1: str) -> None:
    v2 = {"read": "rs", "write": "cud", "*": "cruds"}[v1]
    assert parse_scope(f"{context}/{rtype}.{v1}") == parse_scope(f"{context}/{rtype}.{v2}")
    one, two = ScopeSet.parse(f"{context}/{rtype}.{v1}"), ScopeSet.parse(f"{context}/{rtype}.{v2}")
    for letter in INTERACTIONS:
        assert one.allows(CONTEXTS, "Observation", letter) == two.allows(CONTEXTS, "Observation", letter)


@given(st.lists(st.sampled_from(INTERACTIONS), min_size=1, max_size=6))
def test_letters_only_in_order_and_once(letters: list[str]) -> None:
    text = "".join(letters)
    canonical = "".join(c for c in INTERACTIONS if c in letters)
    scope = parse_scope(f"patient/Observation.{text}")
    if text == canonical:
        assert scope is not None and scope.interactions == frozenset(letters)
    else:
        assert scope is None


def test_every_out_of_order_pair_is_refused() -> None:
    for a, b in itertools.permutations(INTERACTIONS, 2):
        valid = INTERACTIONS.index(a) < INTERACTIONS.index(b)
        assert (parse_scope(f"user/Patient.{a}{b}") is not None) is valid


@given(st.sampled_from(CONTEXTS), LETTERS, st.sampled_from(["Observation", "Condition", "Patient", "Zz"]))
def test_wildcard_type_covers_every_type(context: str, letters: str, rtype: str) -> None:
    s = ScopeSet.parse(f"{context}/*.{letters}")
    for letter in INTERACTIONS:
        assert s.allows({context}, rtype, letter) is (letter in letters)
        assert s.narrowing(rtype, letter) == ([()] if letter in letters else [])
