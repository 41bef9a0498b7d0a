"""Consent evaluation benchmark: the cost of deciding an ``$everything`` of 1,000 resources.

    .venv/bin/python benchmarks/bench_consent.py [--resources 1000] [--rounds 50]

For three policies shaped like the issue's (1-3 Consents, a few provisions), measures in one run:

* ``bind``: building the :class:`ConsentPolicy` from the Consents' JSON and binding it to the request's
  requester and time (once per request);
* ``decide``: :meth:`BoundPolicy.decide` over the 1,000 resources (µs per decision, ms per request);
* peer: the literal reference evaluator of the tests (tests/unit/bridge/service/consent/reference.py),
  which reads the raw JSON for every question, on the first 200 resources.

The policies:

* ``deny-st-mary``: riverside's Consent denying st-mary, asked by st-mary: the decision does not depend
  on the resource, so it is made once at bind;
* ``class+purpose``: the same with a nested permit for AllergyIntolerance, and a second Consent denying
  research: only the resource type looks at the resource, so decisions are remembered per type and source;
* ``data-dependent``: three Consents whose provisions look at codes, security labels, the clinical date
  and a custodian actor: every resource is evaluated.

Prints the best and the median of the rounds (the CPU may be shared with other work: the best is the
cost, the median what a loaded machine sees), and the peer's best per decision with the ratio. The
target is well under 1 ms per 1,000 decisions for a typical policy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.service.consent.evaluate import (
    ACT_REASON,
    CONFIDENTIALITY,
    CONSENT_SCOPE,
    PARTICIPATION_TYPE,
    RESOURCE_TYPES,
    ConsentPolicy,
    Requester,
    index_clinical_date,
)
from tests.unit.bridge.service.consent import reference

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
PRIVACY = {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]}
REQUESTER = Requester("st-mary", "TREAT", frozenset({"Organization/o-stmary"}), "Practitioner/p1")


def actor(org: str, role: str = "PRCP") -> dict[str, Any]:
    return {
        "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": role}]},
        "reference": {"type": "Organization", "identifier": {"value": org}},
    }


def consent(cid: str, provision: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": "active",
        "scope": PRIVACY,
        "dateTime": "2024-01-01",
        "provision": provision,
    }


POLICIES: dict[str, list[dict[str, Any]]] = {
    "deny-st-mary": [consent("riverside-1", {"type": "deny", "actor": [actor("st-mary")]})],
    "class+purpose": [
        consent(
            "riverside-1",
            {
                "type": "deny",
                "actor": [actor("st-mary")],
                "provision": [
                    {"type": "permit", "class": [{"system": RESOURCE_TYPES, "code": "AllergyIntolerance"}]}
                ],
            },
        ),
        consent("st-mary-1", {"type": "deny", "purpose": [{"system": ACT_REASON, "code": "HRESCH"}]}),
    ],
    "data-dependent": [
        consent(
            "riverside-1",
            {
                "type": "permit",
                "period": {"start": "2024-01-01", "end": "2026-01-01"},
                "provision": [
                    {
                        "type": "deny",
                        "code": [{"coding": [{"system": "http://loinc.org", "code": "5195-3"}]}],
                    },
                    {"type": "deny", "securityLabel": [{"system": CONFIDENTIALITY, "code": "R"}]},
                ],
            },
        ),
        consent(
            "st-mary-1", {"type": "deny", "dataPeriod": {"end": "2015-12-31"}, "actor": [actor("st-mary")]}
        ),
        consent("north-1", {"type": "deny", "actor": [actor("north", role="CST")]}),
    ],
}


def resources(n: int) -> list[tuple[dict[str, Any], str]]:
    """``n`` resources of a person as the index holds them, with their source organisation."""
    kinds = ["Observation", "Observation", "Observation", "Condition", "MedicationRequest", "Encounter"]
    kinds += ["AllergyIntolerance", "Procedure", "Immunization", "DiagnosticReport"]
    sources = ["st-mary", "riverside", "riverside", "north"]
    out = []
    for i in range(n):
        rtype = kinds[i % len(kinds)]
        date = f"{2010 + i % 15}-{1 + i % 12:02d}-{1 + i % 28:02d}T08:30:00Z"
        res: dict[str, Any] = {"resourceType": rtype, "id": f"r{i}", "subject": {"reference": "Patient/p1"}}
        if rtype == "Observation":
            res["code"] = {
                "coding": [{"system": "http://loinc.org", "code": ["2345-7", "5195-3", "718-7"][i % 3]}]
            }
            res["category"] = [{"coding": [{"code": "laboratory"}]}]
            res["effectiveDateTime"] = date
            res["meta"] = {"security": [{"system": CONFIDENTIALITY, "code": "NRV"[i % 3]}]}
        elif rtype == "Condition":
            res["code"] = {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}
            res["onsetDateTime"] = date
        elif rtype == "Encounter":
            res["period"] = {"start": date}
        out.append((res, sources[i % len(sources)]))
    return out


def timed_us(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """(best, median) of ``rounds`` calls, in µs."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6, statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--resources", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    items = resources(args.resources)
    peer_items = items[:200]
    print(f"{args.resources} resources, {args.rounds} rounds; best / median; per decision and per request")
    print(
        f"{'policy':<16} {'bind µs':>15} {'decide µs':>15} {'request ms':>15} {'peer µs':>8} {'peer/us':>8}"
    )
    for name, consents in POLICIES.items():

        def bind(consents: list[dict[str, Any]] = consents) -> object:
            return ConsentPolicy(consents, "permit").bind(REQUESTER, now=NOW)

        def decide_all(consents: list[dict[str, Any]] = consents) -> object:
            bound = ConsentPolicy(consents, "permit").bind(REQUESTER, now=NOW)
            return [bound.decide(res, source=src) for res, src in items]

        def peer(consents: list[dict[str, Any]] = consents) -> object:
            return [
                reference.decide(
                    consents, "permit", REQUESTER, res, NOW, source=src, clinical_date=index_clinical_date
                )
                for res, src in peer_items
            ]

        bind_us = timed_us(bind, args.rounds)
        request_us = timed_us(decide_all, args.rounds)
        per_decision = [(request_us[i] - bind_us[i]) / len(items) for i in (0, 1)]
        peer_per = timed_us(peer, max(3, args.rounds // 10))[0] / len(peer_items)
        print(
            f"{name:<16} {bind_us[0]:>7.1f}/{bind_us[1]:<7.1f} {per_decision[0]:>7.3f}/{per_decision[1]:<7.3f}"
            f" {request_us[0] / 1000:>7.3f}/{request_us[1] / 1000:<7.3f} {peer_per:>8.1f}"
            f" {peer_per / max(per_decision[0], 1e-3):>7.0f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
