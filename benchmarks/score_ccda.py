"""Score fhirbridge's C-CDA output against the expected outputs shipped with the samples.

Run: ``.venv/bin/python benchmarks/score_ccda.py [--verbose]``

The expected outputs in ``../shared/samples/expected/ccda/ms-fhir-converter/`` are Microsoft
FHIR-Converter's opinion, not ground truth, so this measures agreement on key fields:

* per clinical category (conditions, allergies, medications, observations, immunizations, procedures,
  encounters, diagnostic reports, family history): items are matched when they share a code (any
  coding); recall = matched / expected, precision = matched / ours;
* for matched observations, whether the value agrees (quantity value, or a shared value code);
* for the Patient: family, first given name, gender, birth date and identifier values;
* for the Composition: type code and date.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"

CATEGORIES: dict[str, tuple[str, ...]] = {
    "conditions": ("Condition",),
    "allergies": ("AllergyIntolerance",),
    "medications": ("MedicationStatement", "MedicationRequest", "MedicationAdministration"),
    "observations": ("Observation",),
    "immunizations": ("Immunization",),
    "procedures": ("Procedure",),
    "encounters": ("Encounter",),
    "reports": ("DiagnosticReport",),
    "family history": ("FamilyMemberHistory",),
}


def _codes(cc: Any) -> set[str]:
    if not isinstance(cc, dict):
        return set()
    return {c["code"] for c in cc.get("coding", []) or [] if isinstance(c, dict) and c.get("code")}


def _index(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for e in bundle.get("entry", []):
        r = e.get("resource", {})
        rid = r.get("id")
        out[f"{r.get('resourceType')}/{rid}"] = r
        if e.get("fullUrl"):
            out[e["fullUrl"]] = r
    return out


def item_codes(r: dict[str, Any], idx: dict[str, dict[str, Any]]) -> set[str]:
    """The codes identifying a clinical item (following medicationReference to the Medication)."""
    rt = r.get("resourceType")
    if rt in ("MedicationStatement", "MedicationRequest", "MedicationAdministration"):
        if "medicationCodeableConcept" in r:
            return _codes(r["medicationCodeableConcept"])
        ref = (r.get("medicationReference") or {}).get("reference", "")
        return _codes((idx.get(ref) or {}).get("code"))
    if rt == "Immunization":
        return _codes(r.get("vaccineCode"))
    if rt == "Encounter":  # type codes, else the start day (header encounters often have no code)
        start = (r.get("period") or {}).get("start", "")[:10]
        return set().union(*(_codes(t) for t in r.get("type", []) or [{}])) | (
            {f"start:{start}"} if start else set()
        )
    if rt == "AllergyIntolerance":  # FHIR-Converter puts the substance in reaction.substance
        return _codes(r.get("code")).union(
            *(_codes(x.get("substance")) for x in r.get("reaction", []) or [{}])
        )
    if rt == "FamilyMemberHistory":
        return _codes(r.get("relationship"))
    return _codes(r.get("code"))


def obs_value(r: dict[str, Any]) -> tuple[str, Any] | None:
    if "valueQuantity" in r:
        return ("q", r["valueQuantity"].get("value"))
    if "valueCodeableConcept" in r:
        return ("c", frozenset(_codes(r["valueCodeableConcept"])))
    if "valueString" in r:
        return ("s", r["valueString"].strip().lower())
    return None


def _values_agree(a: tuple[str, Any] | None, b: tuple[str, Any] | None) -> bool:
    if a is None or b is None or a[0] != b[0]:
        return False
    if a[0] == "q":
        try:
            return float(a[1]) == float(b[1])
        except (TypeError, ValueError):
            return False
    if a[0] == "c":
        return bool(a[1] & b[1])
    return bool(a[1] == b[1])


def match(expected: list[set[str]], ours: list[set[str]]) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of items that share at least one code."""
    used: set[int] = set()
    pairs = []
    for i, e in enumerate(expected):
        for j, o in enumerate(ours):
            if j not in used and e & o:
                used.add(j)
                pairs.append((i, j))
                break
    return pairs


def score_pair(expected: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Per-category counts and header agreement for one document."""
    e_idx, o_idx = _index(expected), _index(ours)
    e_res = [e["resource"] for e in expected.get("entry", [])]
    o_res = [e["resource"] for e in ours.get("entry", [])]
    out: dict[str, Any] = {"categories": {}}
    for cat, types in CATEGORIES.items():
        e_items = [r for r in e_res if r.get("resourceType") in types]
        o_items = [r for r in o_res if r.get("resourceType") in types]
        e_codes = [item_codes(r, e_idx) for r in e_items]
        o_codes = [item_codes(r, o_idx) for r in o_items]
        pairs = match(e_codes, o_codes)
        c = {"expected": len(e_items), "ours": len(o_items), "matched": len(pairs)}
        if cat == "observations":
            c["value_compared"] = sum(1 for i, _ in pairs if obs_value(e_items[i]) is not None)
            c["value_agree"] = sum(
                1 for i, j in pairs if _values_agree(obs_value(e_items[i]), obs_value(o_items[j]))
            )
        out["categories"][cat] = c
    ep = next((r for r in e_res if r.get("resourceType") == "Patient"), {})
    op = next((r for r in o_res if r.get("resourceType") == "Patient"), {})

    def pfields(p: dict[str, Any]) -> dict[str, Any]:
        n = (p.get("name") or [{}])[0]
        return {
            "family": n.get("family"),
            "given": (n.get("given") or [None])[0],
            "gender": p.get("gender"),
            "birthDate": p.get("birthDate"),
            "identifiers": frozenset(i.get("value") for i in p.get("identifier", []) or []),
        }

    ef, of_ = pfields(ep), pfields(op)
    out["patient"] = {k: (ef[k] == of_[k] if k != "identifiers" else ef[k] <= of_[k]) for k in ef if ef[k]}
    ec = next((r for r in e_res if r.get("resourceType") == "Composition"), {})
    oc = next((r for r in o_res if r.get("resourceType") == "Composition"), {})
    out["composition"] = {
        "type": bool(_codes(ec.get("type")) & _codes(oc.get("type"))),
        "date": (ec.get("date") or "")[:10] == (oc.get("date") or "")[:10],
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    from adapters.base import ConvertedBundle, SourceInfo
    from adapters.ccda import CcdaAdapter

    inputs = SAMPLES / "ccda" / "ms-fhir-converter"
    expected_dir = SAMPLES / "expected" / "ccda" / "ms-fhir-converter"
    if not inputs.is_dir():
        print(f"samples not found at {SAMPLES}", file=sys.stderr)
        return 1
    adapter = CcdaAdapter()
    src = SourceInfo("score")
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    patient: dict[str, list[bool]] = defaultdict(list)
    comp: dict[str, list[bool]] = defaultdict(list)
    for p in sorted(inputs.glob("*.ccda")):
        exp_path = expected_dir / (p.stem + ".json")
        if not exp_path.exists():
            continue
        [out] = list(adapter.convert(p.read_bytes(), src, filename=p.name))
        if not isinstance(out, ConvertedBundle):
            print(f"{p.name}: REJECTED {out.error}")
            continue
        s = score_pair(json.loads(exp_path.read_bytes()), out.bundle)
        for cat, c in s["categories"].items():
            for k, v in c.items():
                totals[cat][k] += v
        for k, v in s["patient"].items():
            patient[k].append(v)
        for k, v in s["composition"].items():
            comp[k].append(v)
        if args.verbose:
            row = ", ".join(
                f"{cat} {c['matched']}/{c['expected']} (ours {c['ours']})"
                for cat, c in s["categories"].items()
                if c["expected"] or c["ours"]
            )
            print(f"{p.name}: {row}")
    print(f"{'category':16} {'expected':>8} {'ours':>6} {'matched':>8} {'recall':>7} {'precision':>9}")
    all_e = all_o = all_m = 0
    for cat, c in totals.items():
        e, o, m = c["expected"], c["ours"], c["matched"]
        all_e, all_o, all_m = all_e + e, all_o + o, all_m + m
        rec = f"{m / e:.0%}" if e else "-"
        prec = f"{m / o:.0%}" if o else "-"
        print(f"{cat:16} {e:8d} {o:6d} {m:8d} {rec:>7} {prec:>9}")
    print(
        f"{'all':16} {all_e:8d} {all_o:6d} {all_m:8d} {all_m / max(all_e, 1):7.0%} {all_m / max(all_o, 1):9.0%}"
    )
    oc = totals["observations"]
    if oc["value_compared"]:
        print(
            f"observation values agree on {oc['value_agree']}/{oc['value_compared']} matched observations "
            f"({oc['value_agree'] / oc['value_compared']:.0%})"
        )
    print("patient fields: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in patient.items()))
    print("composition: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in comp.items()))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
