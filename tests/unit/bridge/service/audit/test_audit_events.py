"""AuditEvents after IHE BALP: valid R4 (the R4B models; AuditEvent is the same in both), one per patient,
with the user, client, organisation, token id, purpose, patient, what was touched, outcome and request id."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from pydantic import ValidationError

from bridge.service.audit.events import agent_key, audit_events, summarize
from bridge.stores.audit import columns
from tests.unit.bridge.service.audit.audit_helpers import ISSUER, T0, access, events

DCM = "http://dicom.nema.org/resources/ontology/DCM"


def _valid(event: dict[str, Any]) -> AuditEvent:
    return AuditEvent.model_validate(event)


def _agent(event: dict[str, Any], system: str, code: str) -> dict[str, Any]:
    found = [
        a
        for a in event["agent"]
        if {"system": system, "code": code}.items() <= a["type"]["coding"][0].items()
    ]
    found += [
        a
        for a in event["agent"]
        if any(c["system"] == system and c["code"] == code for c in a["type"]["coding"][1:])
    ]
    assert len(found) == 1, (system, code)
    return found[0]


def _entities(event: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [e for e in event.get("entity", []) if e.get("role", {}).get("code") == role]


def test_merged_everything_over_three_linked_records_gives_three_valid_events() -> None:
    evs = events(patients=("pat-a", "pat-b", "Patient/pat-c", "pat-a"))
    assert len(evs) == 3
    assert len({e["id"] for e in evs}) == 3
    for ev, pid in zip(evs, ("pat-a", "pat-b", "pat-c"), strict=True):
        model = _valid(ev)
        assert model.type.code == "rest" and model.action == "E" and model.outcome == "0"
        assert [s.code for s in model.subtype] == ["operation"]
        (patient,) = _entities(ev, "1")
        assert patient["what"] == {"reference": f"Patient/{pid}"}
        assert patient["type"]["code"] == "1"  # Person
        assert columns(ev).patient_id == pid


def test_a_search_touching_no_patient_gives_one_event_with_the_query() -> None:
    query = "GET /Observation?code=1234-5&_count=10"
    (ev,) = events(patients=(), interaction="search-type", query=query, touched={})
    _valid(ev)
    assert _entities(ev, "1") == []
    (q,) = _entities(ev, "24")
    assert q["type"]["code"] == "2"  # System Object
    assert base64.b64decode(q["query"]).decode() == query and q["description"] == query
    assert columns(ev).patient_id is None


def test_who_the_client_the_organisation_the_token_and_the_purpose() -> None:
    (ev,) = events(who=access("dr-house", org="st-mary", client="ehr-app", jti="jti-77"))
    user = _agent(ev, "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP")
    assert user["who"] == {
        "identifier": {"system": ISSUER, "value": "dr-house"},
        "reference": "Practitioner/7",
    }
    assert user["requestor"] is True and user["policy"] == ["jti-77"]
    assert user["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
    client = _agent(ev, DCM, "110153")  # Source Role ID: the client of a query or operation
    assert client["who"]["identifier"] == {"system": ISSUER, "value": "ehr-app"}
    server = _agent(ev, DCM, "110152")
    assert server["requestor"] is False
    org = _agent(ev, "http://terminology.hl7.org/CodeSystem/v3-RoleClass", "PROV")
    assert org["who"]["identifier"] == {"system": "urn:fhirbridge:org", "value": "st-mary"}
    (req,) = [e for e in ev["entity"] if e["type"]["code"] == "XrequestId"]
    assert req["what"]["identifier"]["value"] == "req-0"
    touched = {e["type"]["code"]: e["detail"][0]["valueString"] for e in _entities(ev, "4")}
    assert touched == {"Condition": "1", "Observation": "3"}
    cols = columns(ev)
    assert cols.agent == f"{ISSUER}|dr-house" == agent_key(access("dr-house"))
    assert (cols.organization, cols.purpose, cols.break_glass, cols.outcome) == (
        "st-mary",
        "TREAT",
        False,
        "success",
    )


def test_a_read_swaps_the_dicom_roles_as_balp_does() -> None:
    (ev,) = events(action="R", interaction="read", query=None, touched={"Patient": 1})
    _valid(ev)
    assert ev["action"] == "R" and ev["subtype"][0]["code"] == "read"
    assert _agent(ev, DCM, "110152")["who"]["identifier"]["value"] == "ehr-app"  # Destination: the client


def test_break_the_glass_is_coded_with_its_reason() -> None:
    (ev,) = events(purpose=["TREAT", "BTG"], break_glass_reason="unconscious in the ED")
    _valid(ev)
    assert {"system": DCM, "code": "110127", "display": "Emergency Override Started"} in ev["subtype"]
    codes = [(p["coding"][0]["code"], p.get("text")) for p in ev["purposeOfEvent"]]
    assert codes == [("TREAT", None), ("BTG", "unconscious in the ED")]
    cols = columns(ev)
    assert cols.break_glass is True and cols.purpose == "TREAT"
    said = summarize(ev)
    assert said["break_glass"] and said["break_glass_reason"] == "unconscious in the ED"


@pytest.mark.parametrize(("outcome", "code"), [("denied", "4"), ("error", "8")])
def test_refusals_and_failures_without_a_token_are_audited_too(outcome: str, code: str) -> None:
    (ev,) = audit_events(
        None,
        action="R",
        interaction="read",
        patients=["pat-a"],
        touched=None,
        query="GET /Patient/pat-a",
        outcome=outcome,  # type: ignore[arg-type]
        request_id=None,
        purpose=None,
        break_glass_reason=None,
        recorded=T0,
    )
    model = _valid(ev)
    assert model.outcome == code and model.outcomeDesc
    assert all(a["type"]["coding"][0]["code"] != "IRCP" for a in ev["agent"])
    cols = columns(ev)
    assert (cols.agent, cols.organization, cols.outcome) == (None, None, "denied" if code == "4" else "error")


def test_a_backend_token_without_a_subject_is_its_client() -> None:
    (ev,) = events(who=access(None, client="nightly-export", jti="jti-9"))
    _valid(ev)
    client = _agent(ev, DCM, "110153")
    assert client["requestor"] is True and client["policy"] == ["jti-9"]
    assert columns(ev).agent == f"{ISSUER}|nightly-export" == agent_key(access(None, client="nightly-export"))


def test_summarize_reads_back_what_was_written() -> None:
    (ev,) = events(3, query="GET /Patient/pat-a/$everything")
    said = summarize(ev)
    assert said["interaction"] == "operation" and said["fhir_user"] == "Practitioner/7"
    assert said["client_id"] == "ehr-app" and said["purpose"] == ["TREAT"]
    assert said["touched"] == {"Condition": 1, "Observation": 6}
    assert said["query"] == "GET /Patient/pat-a/$everything" and said["request_id"] == "req-3"


def test_events_share_no_mutable_part() -> None:
    a, b = events(patients=("pat-a", "pat-b"))
    a["agent"][0]["who"]["reference"] = "changed"
    a["entity"][-1]["what"]["identifier"]["value"] = "changed"
    assert b["agent"][0]["who"]["reference"] == "Practitioner/7"
    assert b["entity"][-1]["what"]["identifier"]["value"] == "req-0"


@pytest.mark.parametrize(
    "change",
    [
        {"interaction": "peek"},
        {"action": "X"},
        {"outcome": "maybe"},
        {"recorded": datetime(2026, 1, 1)},
        {"purpose": "|TREAT"},
        {"touched": {"Observation": -1}},
    ],
)
def test_bad_arguments_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        events(**change)


def test_the_r4b_model_rejects_what_r4_forbids() -> None:
    """The validation above can fail: an outcome outside the code's pattern is refused."""
    (ev,) = events()
    with pytest.raises(ValidationError):
        _valid({**ev, "outcome": "0 "})


def test_an_access_within_an_open_override_carries_btg_but_not_the_start() -> None:
    (ev,) = events(break_glass_reason="unconscious", break_glass_started=False)
    _valid(ev)
    assert [s["code"] for s in ev["subtype"]] == ["operation"]
    assert columns(ev).break_glass is True
    assert summarize(ev)["break_glass_reason"] == "unconscious"
