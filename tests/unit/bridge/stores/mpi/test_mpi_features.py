from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mpi_helpers import SSN, patient

from bridge.stores.mpi.config import DEFAULT_STRONG_SYSTEMS, MpiInputError
from bridge.stores.mpi.features import extract_features, features_digest, norm_birth_date, norm_name


def test_normalisation() -> None:
    p = patient(
        "x",
        "  José-María ",
        "O'Brien Smith",
        "1980-04-02",
        "female",
        line="12  Elm St.",
        city="São Paulo",
        postal="AB1 2CD",
        phone="+44 (0)20 7946 0958",
        ssn="123-45-6789",
        mrn="M1",
    )
    f = extract_features(p, DEFAULT_STRONG_SYSTEMS)
    assert f["g"] == "josemaria" and f["f"] == "obriensmith"
    assert f["gn"] and f["fm"]
    assert f["b"] == "19800402" and f["s"] == "female"
    assert f["a"] == "12 elm st" and f["c"] == "sao paulo" and f["z"] == "ab12cd"
    assert f["t"] == "0209460958"[-10:] or f["t"].endswith("79460958")
    assert f["i"] == [[SSN, "123456789"]]  # the MRN is not a strong identifier


def test_official_name_and_home_address_preferred() -> None:
    p = {
        "resourceType": "Patient",
        "id": "x",
        "name": [
            {"use": "nickname", "given": ["Bo"], "family": "B"},
            {"use": "official", "given": ["Robert"], "family": "Brown"},
        ],
        "address": [{"use": "work", "city": "Work"}, {"use": "home", "city": "Home"}],
        "gender": "unknown",
    }
    f = extract_features(p, ())
    assert (f["g"], f["f"], f["c"], f["s"]) == ("robert", "brown", "home", "")


@pytest.mark.parametrize(
    ("raw", "out"),
    [
        ("1980-04-02", "19800402"),
        ("1980-04", "198004"),
        ("1980", "1980"),
        ("1980-04-02T10:00:00Z", "19800402"),
        ("garbage", ""),
        (None, ""),
        (19800402, ""),
    ],
)
def test_birth_dates(raw: Any, out: str) -> None:
    assert norm_birth_date(raw) == out


@pytest.mark.parametrize(
    "bad",
    [
        {"resourceType": "Observation", "id": "o"},
        {"resourceType": "Patient"},
        {"resourceType": "Patient", "id": ""},
        "Patient",
        None,
    ],
)
def test_not_a_patient(bad: Any) -> None:
    with pytest.raises(MpiInputError):
        extract_features(bad, ())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    name=json_values,
    address=json_values,
    telecom=json_values,
    identifier=json_values,
    birth=json_values,
    gender=json_values,
)
def test_malformed_elements_never_raise(
    name: Any, address: Any, telecom: Any, identifier: Any, birth: Any, gender: Any
) -> None:
    p = {
        "resourceType": "Patient",
        "id": "p",
        "name": name,
        "address": address,
        "telecom": telecom,
        "identifier": identifier,
        "birthDate": birth,
        "gender": gender,
    }
    f = extract_features(p, (SSN,))
    assert all(isinstance(f[k], str) for k in ("g", "f", "b", "s", "a", "c", "z", "t"))
    assert len(features_digest(f)) == 32


def _elements(keys: dict[str, Any]) -> Any:
    """Lists of FHIR-shaped elements whose known keys hold plausible or arbitrary JSON values."""
    return st.lists(
        st.fixed_dictionaries({}, optional={k: v | json_values for k, v in keys.items()}), max_size=3
    )


@settings(max_examples=300, deadline=None)
@given(
    names=_elements(
        {
            "use": st.sampled_from(["official", "usual"]),
            "given": st.just(["Ann"]),
            "family": st.just("Lee"),
            "text": st.just("Ann Lee"),
        }
    ),
    addresses=_elements(
        {
            "use": st.just("home"),
            "period": st.just({"end": "2020"}),
            "line": st.just(["1 Main St"]),
            "city": st.just("Metro"),
            "postalCode": st.just("12345"),
        }
    ),
    telecom=_elements({"system": st.sampled_from(["phone", "sms"]), "value": st.just("555 123 4567")}),
    identifiers=_elements({"system": st.just(SSN), "value": st.just("123-45-6789")}),
)
def test_malformed_values_inside_well_formed_elements_never_raise(
    names: Any, addresses: Any, telecom: Any, identifiers: Any
) -> None:
    """Two home addresses, one with a ``period`` that is not an object, raised
    AttributeError (the random JSON above rarely builds several element-shaped objects)."""
    p = {
        "resourceType": "Patient",
        "id": "p",
        "name": names,
        "address": addresses,
        "telecom": telecom,
        "identifier": identifiers,
    }
    f = extract_features(p, (SSN,))
    assert all(isinstance(f[k], str) for k in ("g", "f", "b", "s", "a", "c", "z", "t"))


def test_two_home_addresses_with_a_period_that_is_not_an_object() -> None:
    addresses = [{"use": "home", "period": "2020", "city": "A"}, {"use": "home", "city": "B"}]
    f = extract_features({"resourceType": "Patient", "id": "p", "address": addresses}, (SSN,))
    assert f["c"] == "a"


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20))
def test_norm_name_is_idempotent_ascii(s: str) -> None:
    n = norm_name(s)
    assert n == norm_name(n) and n.isascii() and (n == "" or n.isalpha())


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(alphabet="0123456789-T: \u0663\uff14x", max_size=14),
        st.from_regex(r"\A\s?\d{4}-\d{2}-\d{2}(T\d{2}:\d{2})?\s?\Z"),
    ),
    st.text(alphabet="aB c\t\u00e9-.,\n\u00a01", max_size=20),
)
def test_fast_paths_equal_the_regular_expressions(date: str, text: str) -> None:
    """Birth dates in the usual full form skip the regular expression, and text is single-spaced by
    split/join: both must give what the patterns alone give (Unicode digits and spaces included)."""
    import re

    from bridge.stores.mpi.features import _DATE, _fold, norm_text

    m = _DATE.match(date.strip())
    assert norm_birth_date(date) == ("".join(p for p in m.groups() if p) if m else "")
    want = re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", _fold(text))).strip()
    assert norm_text(text) == want


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "use": st.sampled_from(["official", "usual", "home", "work", "old", None]),
                    "period": st.one_of(
                        st.none(), st.fixed_dictionaries({}, optional={"end": st.just("2020")})
                    ),
                },
            ),
            st.integers(),
            st.none(),
        ),
        max_size=3,
    )
)
def test_single_name_and_address_fast_paths_follow_the_rule(items: list[Any]) -> None:
    """One name or one address is taken as it is; that must be what the preference rules pick anyway."""
    from bridge.stores.mpi.features import _pick_address, _pick_name

    dicts = [x for x in items if isinstance(x, dict)]
    name = next(
        (n for use in ("official", "usual", None) for n in dicts if use is None or n.get("use") == use), {}
    )
    home = [a for a in dicts if a.get("use") == "home" and not (a.get("period") or {}).get("end")]
    address = home[0] if home else (dicts[0] if dicts else {})
    assert _pick_name(items) is name or _pick_name(items) == name == {}
    assert _pick_address(items) is address or _pick_address(items) == address == {}


def test_a_patient_id_with_a_nul_character_is_refused() -> None:
    """PostgreSQL cannot store U+0000 in text: refused up front, located by the caller."""
    with pytest.raises(MpiInputError, match="NUL"):
        extract_features({"resourceType": "Patient", "id": "a\x00b"}, ())
