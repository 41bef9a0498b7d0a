"""The Consent evaluator (issue 22): the issue's scenarios, the choices where FHIR R4 is silent or
contradicts itself, and property tests against a literal reference evaluator (reference.py).

The cost per decision is measured by ``benchmarks/bench_consent.py`` (µs per decision for policies of
1-3 Consents over 1,000 resources), not here: the machine is shared.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.service.consent.evaluate import (
    ACT_CODE,
    ACT_REASON,
    CONFIDENTIALITY,
    CONSENT_SCOPE,
    PARTICIPATION_TYPE,
    RESOURCE_TYPES,
    ConsentPolicy,
    Decision,
    Requester,
    fhir_interval,
    index_clinical_date,
    purposes_covered,
)
from bridge.stores.index.rules import CLINICAL_DATE_PATHS, clinical_date
from tests.unit.bridge.service.consent import reference

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
BASE = "https://fhir.example.org/fhir"
ST_MARY = Requester("st-mary", "TREAT", frozenset({"Organization/o-stmary"}))
RIVERSIDE = Requester("riverside", "TREAT", frozenset({"Organization/o-riverside"}))
PRIVACY = {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]}


def org(identifier: str, role: str = "PRCP") -> dict[str, Any]:
    """An actor naming an organisation by a logical reference (its source organisation id)."""
    return {
        "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": role}]},
        "reference": {"type": "Organization", "identifier": {"value": identifier}},
    }


def actor_ref(reference: str, role: str = "PRCP") -> dict[str, Any]:
    return {
        "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": role}]},
        "reference": {"reference": reference},
    }


def of_class(*types: str) -> list[dict[str, str]]:
    return [{"system": RESOURCE_TYPES, "code": t} for t in types]


def purpose(*codes: str) -> list[dict[str, str]]:
    return [{"system": ACT_REASON, "code": c} for c in codes]


def consent(provision: dict[str, Any] | None, cid: str = "c1", **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Consent",
        "id": cid,
        "status": "active",
        "scope": PRIVACY,
        **fields,
    }
    if provision is not None:
        out["provision"] = provision
    return out


def resource(rtype: str = "Observation", rid: str = "r1", **fields: Any) -> dict[str, Any]:
    return {"resourceType": rtype, "id": rid, **fields}


RESOURCES = [
    resource("Observation", "o1", code={"coding": [{"system": "http://loinc.org", "code": "2345-7"}]}),
    resource("Condition", "c1"),
    resource("AllergyIntolerance", "a1"),
    resource("Patient", "p1"),
]

#: riverside's Consent: nothing to st-mary
DENY_ST_MARY = consent({"type": "deny", "actor": [org("st-mary")]}, "riverside-deny-st-mary")


def decide(policy: ConsentPolicy, requester: Requester, res: dict[str, Any], **kw: Any) -> Decision:
    return policy.decide(requester, res, now=kw.pop("now", NOW), **kw)


# -- the scenario ------------------------------------------------------------------------------
@pytest.mark.parametrize("default", ["permit", "deny"])
def test_a_deny_for_st_mary_denies_every_resource_to_st_mary(default: str) -> None:
    policy = ConsentPolicy([DENY_ST_MARY], default)
    for res in RESOURCES:
        decision = decide(policy, ST_MARY, res)
        assert decision == Decision(
            False, "riverside-deny-st-mary", "provision", "Consent riverside-deny-st-mary, provision: deny"
        )
        other = decide(policy, RIVERSIDE, res)
        assert other.permit is (default == "permit") and other.consent_id is None
    assert policy.bind(ST_MARY, now=NOW).constant is not None  # one decision for every resource


def test_st_mary_named_by_an_organization_we_hold() -> None:
    policy = ConsentPolicy(
        [consent({"type": "deny", "actor": [actor_ref("Organization/o-stmary")]})], "permit"
    )
    assert not decide(policy, ST_MARY, RESOURCES[0]).permit
    assert decide(policy, RIVERSIDE, RESOURCES[0]).permit
    # a requester whose Organization resources are not known is not recognised by a literal reference
    assert decide(policy, Requester("st-mary", "TREAT"), RESOURCES[0]).permit


def test_a_nested_exception_permits_allergies_to_st_mary() -> None:
    c = consent(
        {
            "type": "deny",
            "actor": [org("st-mary")],
            "provision": [{"type": "permit", "class": of_class("AllergyIntolerance")}],
        }
    )
    policy = ConsentPolicy([c], "permit")
    allergy = decide(policy, ST_MARY, resource("AllergyIntolerance", "a1"))
    assert allergy.permit and allergy.provision_path == "provision.provision[0]"
    assert not decide(policy, ST_MARY, resource("Observation", "o1")).permit
    assert decide(policy, RIVERSIDE, resource("Observation", "o1")).consent_id is None
    explained = policy.explain(ST_MARY, now=NOW)
    assert explained.outcome == "depends"
    assert [(d.provision_path, d.effect, d.elements) for d in explained.depends_on] == [
        ("provision.provision[0]", "permit", ("class",))
    ]


def test_a_research_deny_leaves_treatment_alone() -> None:
    policy = ConsentPolicy([consent({"type": "deny", "purpose": purpose("HRESCH")})], "permit")
    assert decide(policy, ST_MARY, RESOURCES[0]).permit
    research = Requester("st-mary", "HRESCH")
    assert not decide(policy, research, RESOURCES[0]).permit
    # a purpose covers the purposes it subsumes (v3-ActReason): clinical trial research is research
    assert not decide(policy, Requester("st-mary", "CLINTRCH"), RESOURCES[0]).permit
    assert {"HRESCH", "CLINTRCH", "CLINTRCHPC"} <= purposes_covered("HRESCH")
    assert "TREAT" not in purposes_covered("HRESCH")


def test_opt_out_of_treatment_except_emergencies() -> None:
    """The R4 pattern "withhold authorization for treatment except for emergency treatment"."""
    c = consent(
        {
            "type": "deny",
            "purpose": purpose("TREAT"),
            "provision": [{"type": "permit", "purpose": purpose("ETREAT")}],
        }
    )
    policy = ConsentPolicy([c], "permit")
    assert not decide(policy, ST_MARY, RESOURCES[0]).permit
    assert decide(policy, Requester("st-mary", "ETREAT"), RESOURCES[0]).permit
    assert decide(policy, Requester("st-mary", "BTG"), RESOURCES[0]).permit  # BTG is an emergency treatment
    assert decide(policy, Requester("st-mary", "HPAYMT"), RESOURCES[0]).consent_id is None


def test_a_consent_applies_within_its_period_only() -> None:
    c = consent(
        {"type": "deny", "actor": [org("st-mary")], "period": {"start": "2024-01-01", "end": "2024-12-31"}}
    )
    policy = ConsentPolicy([c], "permit")
    assert not decide(policy, ST_MARY, RESOURCES[0], now=datetime(2024, 12, 31, 23, 59, tzinfo=UTC)).permit
    assert decide(policy, ST_MARY, RESOURCES[0], now=datetime(2025, 1, 1, tzinfo=UTC)).permit  # expired
    assert decide(policy, ST_MARY, RESOURCES[0], now=datetime(2023, 12, 31, 23, 0, tzinfo=UTC)).permit
    # a nested provision's period limits that provision only
    nested = consent(
        {
            "type": "deny",
            "actor": [org("st-mary")],
            "provision": [{"type": "permit", "period": {"end": "2025-01-01"}}],
        }
    )
    policy = ConsentPolicy([nested], "permit")
    assert decide(policy, ST_MARY, RESOURCES[0], now=datetime(2024, 6, 1, tzinfo=UTC)).permit
    assert not decide(policy, ST_MARY, RESOURCES[0], now=NOW).permit


def test_a_consent_issued_later_does_not_apply_yet() -> None:
    policy = ConsentPolicy([{**DENY_ST_MARY, "dateTime": "2025-07-01"}], "permit")
    assert decide(policy, ST_MARY, RESOURCES[0]).permit
    assert not decide(policy, ST_MARY, RESOURCES[0], now=datetime(2025, 7, 1, 0, 1, tzinfo=UTC)).permit


@pytest.mark.parametrize("status", ["draft", "proposed", "inactive", "rejected", "entered-in-error", None])
def test_only_active_consents_count(status: str | None) -> None:
    policy = ConsentPolicy([{**DENY_ST_MARY, "status": status}], "permit")
    assert decide(policy, ST_MARY, RESOURCES[0]) == Decision(
        True, None, None, "no Consent applies: the base policy (permit)"
    )
    assert policy.ignored == [("riverside-deny-st-mary", f"status {status!r}, not active")]


def test_the_stricter_consent_of_two_linked_records_wins() -> None:
    """The same person's records at riverside and st-mary carry different Consents: deny wins."""
    permits = consent({"type": "permit", "actor": [org("st-mary")]}, "at-st-mary")
    policy = ConsentPolicy([permits, DENY_ST_MARY], "deny")
    assert decide(policy, ST_MARY, RESOURCES[0]).consent_id == "riverside-deny-st-mary"
    policy = ConsentPolicy([permits], "deny")
    assert decide(policy, ST_MARY, RESOURCES[0]).consent_id == "at-st-mary"
    assert not decide(policy, RIVERSIDE, RESOURCES[0]).permit  # opt-in deployment: nothing else shared


# -- the scope, the type, and how R4 is read where it is silent ----------------------------------------
def test_a_consent_without_a_scope_counts_and_another_scope_does_not() -> None:
    no_scope = {k: v for k, v in DENY_ST_MARY.items() if k != "scope"}
    assert not decide(ConsentPolicy([no_scope], "permit"), ST_MARY, RESOURCES[0]).permit
    research = {**DENY_ST_MARY, "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "research"}]}}
    policy = ConsentPolicy([research], "permit")
    assert decide(policy, ST_MARY, RESOURCES[0]).permit
    assert policy.ignored == [("riverside-deny-st-mary", "scope is not patient-privacy")]


@pytest.mark.parametrize(
    ("rule", "permit", "note"),
    [
        ("OPTOUT", False, "no type: the policyRule's"),
        ("OPTOUTE", False, "no type: the policyRule's"),
        ("OPTIN", True, "no type: the policyRule's"),
        (None, False, "no type and no OPTIN/OPTOUT policyRule: read as deny"),
    ],
)
def test_a_root_without_a_type_takes_the_policy_rule(rule: str | None, permit: bool, note: str) -> None:
    fields = {"policyRule": {"coding": [{"system": ACT_CODE, "code": rule}]}} if rule else {}
    policy = ConsentPolicy([consent({"actor": [org("st-mary")]}, **fields)], "deny" if permit else "permit")
    decision = decide(policy, ST_MARY, RESOURCES[0])
    assert (
        decision.permit is permit
        and decision.reason == f"Consent c1, provision: {'permit' if permit else 'deny'}; {note}"
    )


def test_a_consent_without_provisions_is_its_policy_rule_for_everyone() -> None:
    optout = consent(None, policyRule={"coding": [{"system": ACT_CODE, "code": "OPTOUT"}]})
    assert not decide(ConsentPolicy([optout], "permit"), RIVERSIDE, RESOURCES[0]).permit


def test_a_nested_provision_without_a_type_is_the_opposite_of_its_parent() -> None:
    c = consent({"type": "deny", "actor": [org("st-mary")], "provision": [{"class": of_class("Patient")}]})
    decision = decide(ConsentPolicy([c], "deny"), ST_MARY, resource("Patient"))
    assert decision.permit and decision.reason.endswith("no type: the opposite of its parent's")


def test_a_type_that_is_neither_permit_nor_deny_reads_as_deny() -> None:
    c = consent({"type": "Permit", "actor": [org("st-mary")]})
    assert not decide(ConsentPolicy([c], "permit"), ST_MARY, RESOURCES[0]).permit


def test_deny_wins_among_siblings_and_the_deepest_decides() -> None:
    c = consent(
        {
            "type": "deny",
            "provision": [
                {
                    "type": "permit",
                    "class": of_class("Observation"),
                    "provision": [{"type": "deny", "code": [{"coding": [{"code": "2345-7"}]}]}],
                },
                {"type": "permit", "actor": [org("st-mary")]},
            ],
        }
    )
    policy = ConsentPolicy([c], "permit")
    assert decide(policy, ST_MARY, RESOURCES[0]).provision_path == "provision.provision[0].provision[0]"
    assert decide(policy, ST_MARY, RESOURCES[1]).provision_path == "provision.provision[1]"
    assert decide(policy, RIVERSIDE, RESOURCES[1]).provision_path == "provision"


def test_an_unreadable_date_applies_a_deny_and_drops_a_permit() -> None:
    deny = consent({"type": "deny", "actor": [org("st-mary")], "period": {"start": "2024-13-01"}})
    decision = decide(ConsentPolicy([deny], "permit"), ST_MARY, RESOURCES[0])
    assert not decision.permit and "could not be read" in decision.reason
    permit = consent({"type": "permit", "actor": [org("st-mary")], "period": {"end": "soon"}})
    assert not decide(ConsentPolicy([permit], "deny"), ST_MARY, RESOURCES[0]).permit


def test_a_provision_about_other_actions_does_not_govern_reads() -> None:
    action = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "correct"}]}
    ]
    c = consent({"type": "deny", "actor": [org("st-mary")], "action": action})
    assert decide(ConsentPolicy([c], "permit"), ST_MARY, RESOURCES[0]).permit
    access = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]}
    ]
    c = consent({"type": "deny", "actor": [org("st-mary")], "action": action + access})
    assert not decide(ConsentPolicy([c], "permit"), ST_MARY, RESOURCES[0]).permit


# -- the elements --------------------------------------------------------------------------------------
def test_a_custodian_actor_names_where_the_data_comes_from() -> None:
    """R4's consent-example-Out: CST (custodian) names the organisation holding the data, not a reader."""
    c = consent({"type": "deny", "actor": [org("st-mary", role="CST")]})
    policy = ConsentPolicy([c], "permit")
    assert not decide(policy, RIVERSIDE, RESOURCES[0], source="st-mary").permit
    assert decide(policy, RIVERSIDE, RESOURCES[0], source="riverside").permit
    assert decide(policy, ST_MARY, RESOURCES[0], source="riverside").permit
    # the source not given: a deny cannot be ruled out, so it applies
    assert not decide(policy, RIVERSIDE, RESOURCES[0]).permit
    permit = consent({"type": "permit", "actor": [actor_ref("Organization/o-stmary", role="AUT")]})
    policy = ConsentPolicy([permit], "deny")
    assert decide(
        policy, RIVERSIDE, RESOURCES[0], source="st-mary", source_refs=frozenset({"Organization/o-stmary"})
    ).permit
    assert not decide(policy, RIVERSIDE, RESOURCES[0]).permit


def test_a_practitioner_actor() -> None:
    c = consent({"type": "deny", "actor": [actor_ref("Practitioner/dr-who")]})
    policy = ConsentPolicy([c], "permit")
    who = Requester("st-mary", "TREAT", practitioner="Practitioner/dr-who")
    assert not decide(policy, who, RESOURCES[0]).permit
    assert decide(policy, ST_MARY, RESOURCES[0]).permit


def test_references_under_the_fhir_base_and_with_versions_are_local() -> None:
    c = consent({"type": "deny", "actor": [actor_ref(f"{BASE}/Organization/o-stmary/_history/2")]})
    assert not decide(ConsentPolicy([c], "permit", base_url=BASE + "/"), ST_MARY, RESOURCES[0]).permit
    foreign = consent(
        {"type": "deny", "actor": [actor_ref("https://elsewhere.example/Organization/o-stmary")]}
    )
    assert decide(ConsentPolicy([foreign], "permit", base_url=BASE), ST_MARY, RESOURCES[0]).permit


def test_code_matches_the_codes_of_the_resource_type() -> None:
    loinc = [{"coding": [{"system": "http://loinc.org", "code": "2345-7"}]}]
    policy = ConsentPolicy([consent({"type": "deny", "code": loinc})], "permit")
    assert not decide(policy, ST_MARY, RESOURCES[0]).permit
    snomed = resource(
        "Observation", code={"coding": [{"system": "http://snomed.info/sct", "code": "2345-7"}]}
    )
    assert decide(policy, ST_MARY, snomed).permit
    med = resource("MedicationRequest", medicationCodeableConcept=loinc[0])
    assert not decide(policy, ST_MARY, med).permit
    component = resource("Observation", component=[{"code": loinc[0]}])
    assert not decide(policy, ST_MARY, component).permit


def test_security_labels_confidentiality_is_a_high_water_mark() -> None:
    restricted = consent({"type": "deny", "securityLabel": [{"system": CONFIDENTIALITY, "code": "R"}]})
    policy = ConsentPolicy([restricted], "permit")

    def labelled(*codes: tuple[str, str]) -> dict[str, Any]:
        return resource(meta={"security": [{"system": s, "code": c} for s, c in codes]})

    assert not decide(policy, ST_MARY, labelled((CONFIDENTIALITY, "R"))).permit
    assert not decide(policy, ST_MARY, labelled((CONFIDENTIALITY, "N"))).permit  # R or lower
    assert decide(policy, ST_MARY, labelled((CONFIDENTIALITY, "V"))).permit
    assert decide(policy, ST_MARY, resource()).permit  # unlabelled
    psy = consent({"type": "deny", "securityLabel": [{"system": ACT_CODE, "code": "PSY"}]})
    policy = ConsentPolicy([psy], "permit")
    assert not decide(policy, ST_MARY, labelled((ACT_CODE, "PSY"), (CONFIDENTIALITY, "N"))).permit
    assert decide(policy, ST_MARY, labelled((CONFIDENTIALITY, "N"))).permit


def test_data_period_holds_resources_whose_clinical_date_it_contains() -> None:
    c = consent({"type": "deny", "dataPeriod": {"start": "2020-03-01", "end": "2020-12-31"}})
    policy = ConsentPolicy([c], "permit")  # the index's clinical dates
    assert not decide(policy, ST_MARY, resource(effectiveDateTime="2020-06-15T10:00:00+02:00")).permit
    assert not decide(policy, ST_MARY, resource(effectiveDateTime="2020-12-31")).permit
    assert decide(policy, ST_MARY, resource(effectiveDateTime="2021-01-01T00:00:00Z")).permit
    assert decide(policy, ST_MARY, resource(effectiveDateTime="2020")).permit  # the year is not inside
    assert decide(policy, ST_MARY, resource()).permit  # no clinical date: not in any data period
    assert decide(policy, ST_MARY, resource(effectiveDateTime="2020-02-29T23:59:59Z")).permit
    custom = ConsentPolicy([c], "permit", clinical_date=lambda r: r.get("when"))
    assert not decide(custom, ST_MARY, resource(when="2020-03")).permit


def test_data_references() -> None:
    def data(meaning: str, ref: dict[str, Any]) -> dict[str, Any]:
        return consent({"type": "deny", "data": [{"meaning": meaning, "reference": ref}]})

    instance = ConsentPolicy([data("instance", {"reference": "Observation/o1"})], "permit")
    assert not decide(instance, ST_MARY, resource("Observation", "o1")).permit
    assert decide(instance, ST_MARY, resource("Observation", "o2")).permit
    dependents = ConsentPolicy([data("dependents", {"reference": "Encounter/e1"})], "permit")
    assert not decide(dependents, ST_MARY, resource("Encounter", "e1")).permit
    assert not decide(dependents, ST_MARY, resource(encounter={"reference": "Encounter/e1"})).permit
    assert decide(dependents, ST_MARY, resource(encounter={"reference": "Encounter/e2"})).permit
    by_doctor = ConsentPolicy([data("authoredby", {"reference": "Practitioner/p1"})], "permit")
    assert not decide(by_doctor, ST_MARY, resource(performer=[{"reference": "Practitioner/p1"}])).permit
    assert decide(by_doctor, ST_MARY, resource(subject={"reference": "Practitioner/p1"})).permit
    by_org = ConsentPolicy([data("authoredby", {"identifier": {"value": "st-mary"}})], "permit")
    assert not decide(by_org, RIVERSIDE, RESOURCES[0], source="st-mary").permit
    assert decide(by_org, RIVERSIDE, RESOURCES[0], source="riverside").permit


def test_class_may_name_a_profile() -> None:
    profile = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"
    policy = ConsentPolicy([consent({"type": "deny", "class": [{"code": profile}]})], "permit")
    assert not decide(policy, ST_MARY, resource(meta={"profile": [profile + "|6.1.0"]})).permit
    assert decide(policy, ST_MARY, resource()).permit


# -- explain, binding, preconditions -------------------------------------------------------------------
def test_explain_without_a_resource() -> None:
    policy = ConsentPolicy([DENY_ST_MARY], "permit")
    assert policy.explain(ST_MARY, now=NOW).outcome == "deny"
    assert policy.explain(RIVERSIDE, now=NOW).decision == Decision(
        True, None, None, "no Consent applies: the base policy (permit)"
    )
    always = consent(
        {
            "type": "deny",
            "actor": [org("st-mary")],
            "provision": [{"type": "deny", "class": of_class("Patient")}],
        }
    )
    explained = ConsentPolicy([always], "permit").explain(ST_MARY, now=NOW)
    assert explained.outcome == "deny" and explained.decision is None and len(explained.depends_on) == 1


def test_bind_is_remembered_for_the_same_requester_and_time() -> None:
    policy = ConsentPolicy([DENY_ST_MARY], "permit")
    assert policy.bind(ST_MARY, now=NOW) is policy.bind(ST_MARY, now=NOW)
    assert policy.bind(ST_MARY, now=NOW) is not policy.bind(ST_MARY, now=NOW + timedelta(seconds=1))


def test_preconditions() -> None:
    with pytest.raises(ValueError, match="base policy"):
        ConsentPolicy([], "allow")
    with pytest.raises(ValueError, match="timezone"):
        ConsentPolicy([], "deny").bind(ST_MARY, now=datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("text", "width"),
    [
        ("2020", 366 * 86400),
        ("2020-02", 29 * 86400),
        ("2020-02-29", 86400),
        ("2020-01-01T00:00:00Z", 1),
        ("2020-01-01T00:00:00.25Z", 0.01),
    ],
)
def test_fhir_interval_is_as_wide_as_the_precision(text: str, width: float) -> None:
    lo, hi = fhir_interval(text)  # type: ignore[misc]
    assert hi - lo == pytest.approx(width)


@pytest.mark.parametrize("text", ["2020-13", "2021-02-29", "2020-01-01T24:00:00Z", "soon", "20200101", 2020])
def test_fhir_interval_refuses_what_is_not_a_date(text: object) -> None:
    assert fhir_interval(text) is None


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([*CLINICAL_DATE_PATHS, "Patient", 7]),
    st.dictionaries(
        st.sampled_from(sorted({p.split(".")[0] for paths in CLINICAL_DATE_PATHS.values() for p in paths})),
        st.one_of(
            st.sampled_from(["2020-01-01", "", 5, None, ["2020"]]),
            st.dictionaries(
                st.sampled_from(["start", "end", "collectedDateTime", "period"]),
                st.sampled_from(["2021", "", {"start": "2022"}]),
            ),
        ),
    ),
)
def test_the_default_clinical_date_is_the_index_rule(rtype: object, fields: dict[str, Any]) -> None:
    res = {"resourceType": rtype, **fields}
    assert index_clinical_date(res) == clinical_date(res)


# -- properties against the reference ------------------------------------------------------------------
ORGS = ["st-mary", "riverside", "north"]
ORG_REFS = ["Organization/o-stmary", "Organization/o-riverside"]
PRACTITIONERS = ["Practitioner/p1", "PractitionerRole/r1"]
PURPOSES = ["TREAT", "ETREAT", "BTG", "HRESCH", "CLINTRCH", "HPAYMT", "HOPERAT", "PUBHLTH"]
TYPES = ["Observation", "Condition", "AllergyIntolerance", "Patient"]
# both evaluators read these alike (binary fractions only: float and datetime arithmetic agree)
DATES = [
    "2020",
    "2020-06",
    "2020-06-15",
    "2020-06-15T10:00:00Z",
    "2020-06-15T23:30:00-05:00",
    "2021-01-01T00:00:00.5Z",
    "2025-06-01",
    "2025-06-01T12:00:00Z",
]
BAD_DATES = ["2020-13-01", "2021-02-29", "yesterday"]
NOWS = [NOW, datetime(2020, 6, 15, 12, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC)]
CODES = [
    ("http://loinc.org", "2345-7"),
    ("http://snomed.info/sct", "2345-7"),
    (None, "2345-7"),
    ("http://loinc.org", "8867-4"),
]
LABELS = [
    (CONFIDENTIALITY, "N"),
    (CONFIDENTIALITY, "R"),
    (CONFIDENTIALITY, "V"),
    (ACT_CODE, "PSY"),
    (None, "R"),
]
PROFILE = "http://example.org/StructureDefinition/lab"


def coding(pair: tuple[str | None, str]) -> dict[str, str]:
    return {"code": pair[1]} if pair[0] is None else {"system": pair[0], "code": pair[1]}


dates = st.sampled_from(DATES + BAD_DATES)
periods = st.fixed_dictionaries({}, optional={"start": dates, "end": dates})
roles = st.sampled_from(["PRCP", "IRCP", "CST", "AUT", None])
references = st.one_of(
    st.sampled_from(
        ORG_REFS
        + PRACTITIONERS
        + [
            "Patient/x",
            f"{BASE}/Organization/o-stmary",
            "https://x.example/Organization/o-stmary",
            "Organization/o-stmary/_history/3",
        ]
    ).map(lambda r: {"reference": r}),
    st.builds(
        lambda v, t: {"identifier": {"value": v}, **({"type": t} if t else {})},
        st.sampled_from(ORGS),
        st.sampled_from([None, "Organization", "Practitioner"]),
    ),
)
actors = st.builds(
    lambda role, ref: {
        **({"role": {"coding": [{"system": PARTICIPATION_TYPE, "code": role}]}} if role else {}),
        "reference": ref,
    },
    roles,
    references,
)
data_entries = st.builds(
    lambda meaning, ref: {"meaning": meaning, "reference": ref},
    st.sampled_from(["instance", "related", "dependents", "authoredby"]),
    st.one_of(
        st.sampled_from(["Observation/o1", "Encounter/e1", "Practitioner/p1", "Organization/o-stmary"]).map(
            lambda r: {"reference": r}
        ),
        st.sampled_from(ORGS).map(lambda v: {"identifier": {"value": v}}),
    ),
)
leaf_elements: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["permit", "deny", "permit", "deny", "bogus"]),
    "period": periods,
    "actor": st.lists(actors, min_size=1, max_size=2),
    "purpose": st.lists(
        st.sampled_from(PURPOSES).map(lambda c: {"system": ACT_REASON, "code": c}), min_size=1, max_size=2
    ),
    "class": st.lists(
        st.sampled_from([*TYPES, PROFILE]).map(
            lambda t: {"code": t} if "/" in t else {"system": RESOURCE_TYPES, "code": t}
        ),
        min_size=1,
        max_size=2,
    ),
    "code": st.lists(st.sampled_from(CODES).map(lambda p: {"coding": [coding(p)]}), min_size=1, max_size=2),
    "securityLabel": st.lists(st.sampled_from(LABELS).map(coding), min_size=1, max_size=2),
    "dataPeriod": periods,
    "data": st.lists(data_entries, min_size=1, max_size=2),
    "action": st.lists(
        st.sampled_from(["access", "correct", "disclose"]).map(lambda c: {"coding": [{"code": c}]}),
        min_size=1,
        max_size=2,
    ),
}


def provisions(depth: int, only: str | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """Random provisions (at most two elements besides the type, so that they often apply); ``only``
    fixes every type (deny-only Consents)."""
    elements = st.dictionaries(
        st.sampled_from([k for k in leaf_elements if k != "type"]), st.none(), max_size=2
    ).flatmap(lambda keys: st.fixed_dictionaries({k: leaf_elements[k] for k in keys}))
    kind = (
        st.just({"type": only})
        if only
        else st.fixed_dictionaries({}, optional={"type": leaf_elements["type"]})
    )
    base = st.tuples(kind, elements).map(lambda kv: {**kv[0], **kv[1]})
    if depth == 0:
        return base
    return st.tuples(base, st.lists(provisions(depth - 1, only), max_size=2)).map(
        lambda bc: {**bc[0], **({"provision": bc[1]} if bc[1] else {})}
    )


def consents(
    status: st.SearchStrategy[str] | None = None, only: str | None = None
) -> st.SearchStrategy[dict[str, Any]]:
    statuses = (
        st.sampled_from(["active", "active", "active", "draft", "inactive", "entered-in-error"])
        if status is None
        else status
    )
    required: dict[str, st.SearchStrategy[Any]] = {"resourceType": st.just("Consent"), "status": statuses}
    optional: dict[str, st.SearchStrategy[Any]] = {"provision": provisions(2, only)}
    if only:  # every provision states the type, the root included
        required, optional = {**required, **optional}, {}
    return st.fixed_dictionaries(
        required,
        optional={
            **optional,
            "id": st.sampled_from(["a", "b", "c"]),
            "scope": st.sampled_from(
                [PRIVACY, {"coding": [{"system": CONSENT_SCOPE, "code": "research"}]}, {"text": "privacy"}]
            ),
            "dateTime": dates,
            "policyRule": st.sampled_from(["OPTIN", "OPTOUT", "cric"]).map(
                lambda c: {"coding": [{"system": ACT_CODE, "code": c}]}
            ),
        },
    )


resources = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(TYPES), "id": st.sampled_from(["o1", "e1", "x"])},
    optional={
        "code": st.sampled_from(CODES).map(lambda p: {"coding": [coding(p)]}),
        "meta": st.fixed_dictionaries(
            {},
            optional={
                "security": st.lists(st.sampled_from(LABELS).map(coding), max_size=2),
                "profile": st.just([PROFILE]),
            },
        ),
        "when": st.sampled_from(DATES + BAD_DATES),
        "encounter": st.just({"reference": "Encounter/e1"}),
        "performer": st.sampled_from(
            [[{"reference": "Practitioner/p1"}], [{"reference": "Organization/o-stmary"}]]
        ),
    },
)
requesters = st.builds(
    Requester,
    organization=st.sampled_from([*ORGS, None]),
    purpose=st.sampled_from(PURPOSES),
    organization_refs=st.frozensets(st.sampled_from(ORG_REFS), max_size=1),
    practitioner=st.sampled_from([*PRACTITIONERS, None]),
)
sources = st.tuples(st.sampled_from([*ORGS, None]), st.frozensets(st.sampled_from(ORG_REFS), max_size=1))


def when(res: dict[str, Any]) -> str | None:
    value = res.get("when")
    return value if isinstance(value, str) else None


def real(
    policy_consents: list[dict[str, Any]],
    default: str,
    req: Requester,
    now: datetime,
    items: list[tuple[dict[str, Any], tuple[str | None, frozenset[str]]]],
) -> list[Decision]:
    bound = ConsentPolicy(policy_consents, default, clinical_date=when, base_url=BASE).bind(req, now=now)
    return [bound.decide(res, source=src, source_refs=refs) for res, (src, refs) in items]


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
cases = st.tuples(
    st.lists(consents(), max_size=3),
    st.sampled_from(["permit", "deny"]),
    requesters,
    st.sampled_from(NOWS),
    st.lists(st.tuples(resources, sources), min_size=1, max_size=4),
)
#: Consents that count, with a bare root and more nesting: most resources meet a Consent, and the
#: provisions that look at the resource decide more often
dense_consents = st.builds(
    lambda cid, children: {
        "resourceType": "Consent",
        "id": cid,
        "status": "active",
        "provision": {"type": "deny", "provision": children},
    },
    st.sampled_from(["a", "b", "c"]),
    st.lists(provisions(2), min_size=1, max_size=3),
)
dense_cases = st.tuples(
    st.lists(st.one_of(dense_consents, consents(status=st.just("active"))), min_size=1, max_size=3),
    st.sampled_from(["permit", "deny"]),
    requesters,
    st.sampled_from(NOWS),
    st.lists(st.tuples(resources, sources), min_size=1, max_size=6),
)


@PROPERTY
@given(st.one_of(cases, dense_cases))
def test_the_evaluator_agrees_with_the_reference(case: tuple[Any, ...]) -> None:
    policy_consents, default, req, now, items = case
    decisions = real(policy_consents, default, req, now, items)
    for (res, (src, refs)), decision in zip(items, decisions, strict=True):
        expected = reference.decide(
            policy_consents,
            default,
            req,
            res,
            now,
            source=src,
            source_refs=refs,
            clinical_date=when,
            base_url=BASE,
        )
        assert (decision.permit, decision.consent_id, decision.provision_path) == expected


@PROPERTY
@given(st.one_of(cases, dense_cases), consents(status=st.just("active"), only="deny"))
def test_adding_a_deny_consent_never_turns_a_deny_into_a_permit(
    case: tuple[Any, ...], extra: dict[str, Any]
) -> None:
    policy_consents, default, req, now, items = case
    before = real(policy_consents, default, req, now, items)
    for position in (0, len(policy_consents)):
        after = real(
            [*policy_consents[:position], extra, *policy_consents[position:]], default, req, now, items
        )
        for old, new in zip(before, after, strict=True):
            assert new.permit <= old.permit


@PROPERTY
@given(
    cases, consents(status=st.sampled_from(["draft", "proposed", "inactive", "rejected", "entered-in-error"]))
)
def test_an_inactive_consent_never_changes_a_decision(case: tuple[Any, ...], extra: dict[str, Any]) -> None:
    policy_consents, default, req, now, items = case
    assert real([*policy_consents, extra], default, req, now, items) == real(
        policy_consents, default, req, now, items
    )


@PROPERTY
@given(cases)
def test_the_base_policy_decides_when_no_consent_applies(case: tuple[Any, ...]) -> None:
    policy_consents, default, req, now, items = case
    for decision in real(policy_consents, default, req, now, items):
        if decision.consent_id is None:
            assert decision.permit is (default == "permit") and decision.provision_path is None
    inactive = [{**c, "status": "inactive"} for c in policy_consents]
    expected = Decision(default == "permit", None, None, f"no Consent applies: the base policy ({default})")
    assert real(inactive, default, req, now, items) == [expected] * len(items)


@PROPERTY
@given(st.one_of(cases, dense_cases))
def test_explain_covers_every_resource_decision(case: tuple[Any, ...]) -> None:
    policy_consents, default, req, now, items = case
    policy = ConsentPolicy(policy_consents, default, clinical_date=when, base_url=BASE)
    explained = policy.explain(req, now=now)
    for res, (src, refs) in items:
        decision = policy.decide(req, res, now=now, source=src, source_refs=refs)
        if explained.outcome != "depends":
            assert decision.permit is (explained.outcome == "permit")
        if explained.decision is not None:
            assert decision == explained.decision
