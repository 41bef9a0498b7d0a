"""The adapter SDK contracts: SourceInfo, ids, Location/ParseError, BundleBuilder."""

from __future__ import annotations

import hashlib
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.base import SourceInfo
from adapters.bundle import (
    ADAPTER_IDENTIFIER_SYSTEM,
    EPOCH,
    INPUT_HASH_SYSTEM,
    ORG_IDENTIFIER_SYSTEM,
    WARNING_EXTENSION_URL,
    BundleBuilder,
    canonical_json,
)
from adapters.errors import Location, ParseError, ValidationFailed
from adapters.ids import NAMESPACE, business_key, resource_id


def test_source_info_defaults_and_validation() -> None:
    s = SourceInfo("st-mary")
    assert s.mrn_system_uri == "urn:fhirbridge:st-mary:mrn"
    assert s.encounter_system_uri == "urn:fhirbridge:st-mary:encounter"
    assert s.system_for("1.2.3") == "urn:oid:1.2.3"
    assert s.system_for("LAB", "patient") == "urn:fhirbridge:st-mary:patient:LAB"
    assert (
        SourceInfo("x", assigning_authorities=(("LAB", "https://lab/ids"),)).system_for("LAB")
        == "https://lab/ids"
    )
    for bad in ("", "a|b", "a b", "a/b"):
        with pytest.raises(ValueError):
            SourceInfo(bad)


def test_resource_id_is_uuid5_over_org_type_key() -> None:
    rid = resource_id("org", "Patient", "k")
    assert rid == str(uuid.uuid5(NAMESPACE, "org|Patient|k"))
    assert uuid.UUID(rid).version == 5
    assert resource_id("org", "Patient", "k") != resource_id("org2", "Patient", "k")
    assert resource_id("org", "Patient", "k") != resource_id("org", "Encounter", "k")


@given(
    st.lists(st.one_of(st.none(), st.text(max_size=8), st.integers()), max_size=5),
    st.lists(st.one_of(st.none(), st.text(max_size=8), st.integers()), max_size=5),
)
def test_business_key_is_injective(a: list, b: list) -> None:
    norm = lambda xs: ["" if x is None else str(x) for x in xs]  # noqa: E731
    if norm(a) != norm(b) and (a or b):
        assert (
            business_key(*a) != business_key(*b)
            or (len(a) == 0 and norm(b) == [""])
            or (len(b) == 0 and norm(a) == [""])
        )


def test_location_str_and_dict() -> None:
    loc = Location(file="f.hl7", message_index=2, segment="PID", field=3, repetition=2, component=4)
    assert str(loc) == "f.hl7, message 2, segment PID-3[2].4"
    assert loc.to_dict() == {
        "file": "f.hl7",
        "message_index": 2,
        "segment": "PID",
        "field": 3,
        "repetition": 2,
        "component": 4,
    }
    assert str(Location()) == "(unknown location)"
    e = ParseError("bad", adapter="hl7v2", location=loc)
    assert str(e) == "hl7v2: f.hl7, message 2, segment PID-3[2].4: bad"
    assert e.to_dict()["location"]["field"] == 3


def _builder(**kw: object) -> BundleBuilder:
    return BundleBuilder(
        adapter_name="demo",
        adapter_version="9.9",
        source=SourceInfo("org1", name="Org One"),
        input_sha256=hashlib.sha256(b"x").hexdigest(),
        **kw,
    )  # type: ignore[arg-type]


def test_builder_provenance_put_entries_and_canonical_body() -> None:
    b = _builder(recorded="2024-01-01T00:00:00Z")
    pref = b.add({"resourceType": "Patient", "gender": "female"}, "sys", "123")
    b.add(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": pref},
        },
        "obs",
        1,
    )
    b.warn("unknown-code", "code Q unknown", Location(segment="OBX", field=3))
    cb = b.build(routing_key="sys|123", message_id="m1")
    entries = cb.bundle["entry"]
    assert [e["request"] for e in entries] == [
        {"method": "PUT", "url": f"{e['resource']['resourceType']}/{e['resource']['id']}"} for e in entries
    ]
    prov = entries[-1]["resource"]
    assert prov["resourceType"] == "Provenance"
    assert {t["reference"] for t in prov["target"]} == {pref, f"Observation/{entries[1]['resource']['id']}"}
    whos = {a["who"]["identifier"]["system"]: a["who"]["identifier"]["value"] for a in prov["agent"]}
    assert whos == {ORG_IDENTIFIER_SYSTEM: "org1", ADAPTER_IDENTIFIER_SYSTEM: "demo@9.9"}
    assert prov["entity"][0]["what"]["identifier"] == {
        "system": INPUT_HASH_SYSTEM,
        "value": hashlib.sha256(b"x").hexdigest(),
    }
    (ext,) = prov["extension"]
    assert ext["url"] == WARNING_EXTENSION_URL
    assert {"url": "location", "valueString": "segment OBX-3"} in ext["extension"]
    assert cb.body == orjson.dumps(cb.bundle, option=orjson.OPT_SORT_KEYS)
    assert cb.sha256 == hashlib.sha256(cb.body).hexdigest()
    assert canonical_json({"b": 1, "a": [2]}) == b'{"a":[2],"b":1}'
    assert entries[0]["resource"]["id"] == resource_id("org1", "Patient", business_key("sys", "123"))


def test_builder_same_key_replaces_and_epoch_default() -> None:
    b = _builder()
    r1 = b.add({"resourceType": "Practitioner", "name": [{"family": "A"}]}, "npi", "1")
    r2 = b.add({"resourceType": "Practitioner", "name": [{"family": "B"}]}, "npi", "1")
    assert r1 == r2 and len(b) == 1
    cb = b.build(routing_key="k")
    assert cb.bundle["timestamp"] == EPOCH
    assert cb.bundle["entry"][0]["resource"]["name"] == [{"family": "B"}]


def test_builder_rejects_invalid_fhir_with_located_error() -> None:
    b = _builder()
    b.add({"resourceType": "Patient", "birthDate": "1980-13-01"}, "k")
    with pytest.raises(ValidationFailed) as ei:
        b.build(routing_key="k", location=Location(file="f", message_index=1))
    assert "birthDate" in str(ei.value) and "message 1" in str(ei.value)


def test_builder_needs_a_key() -> None:
    with pytest.raises(ValueError):
        _builder().add({"resourceType": "Patient"})


@given(st.text(max_size=20), st.sampled_from(["Patient", "Observation"]), st.text(max_size=40))
def test_fast_resource_id_equals_uuid5(org: str, rtype: str, key: str) -> None:
    assert resource_id(org, rtype, key) == str(uuid.uuid5(NAMESPACE, f"{org}|{rtype}|{key}"))


def test_an_unknown_time_zone_is_refused_not_read_as_utc() -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown time zone 'America/Chicagoo'"):
        SourceInfo("st-mary", timezone="America/Chicagoo")
    assert SourceInfo("st-mary", timezone="America/Chicago").timezone == "America/Chicago"
    assert SourceInfo("st-mary").timezone == "UTC"
