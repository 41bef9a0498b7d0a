"""Score the hl7v2 adapter against the reference converters' expected outputs, on key fields.

    .venv/bin/python benchmarks/score_hl7v2.py [--samples DIR] [--details N] [--json]

For every sample that has an expected bundle (Microsoft FHIR-Converter under
``expected/hl7v2/ms-fhir-converter``; ReportStream under ``expected/hl7v2/reportstream``) it
extracts, from both bundles, *facts* per key field (identifier values, names, birth date, gender,
encounter class and period, codes, values, units, effective times) and counts an expected fact as
agreed when our bundle has the same fact. It prints agreement per message type and per field, and
the most frequent disagreements. The expected outputs are another converter's opinion, not truth:
docs/hl7v2.md explains where we differ on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.base import ConvertedBundle, SourceInfo
from adapters.hl7v2 import HL7v2Adapter

DEFAULT_SAMPLES = Path(
    os.environ.get("FHIRBRIDGE_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "samples")
)


def norm_time(v: Any) -> str | None:
    """Dates as-is; date-times as a UTC instant to the second when they carry an offset."""
    if not isinstance(v, str) or not v:
        return None
    if "T" not in v:
        return v
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return v
    if dt.tzinfo is None:
        return dt.strftime("%Y-%m-%dT%H:%M:%S")
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def codes(cc: Any) -> Iterator[str]:
    if isinstance(cc, dict):
        for c in cc.get("coding", []) or []:
            if c.get("code"):
                yield str(c["code"]).strip()


def number(v: Any) -> str | None:
    if isinstance(v, int | float):
        return f"{float(v):g}"
    return None


def facts(bundle: dict[str, Any]) -> dict[str, set[str]]:
    """Key facts of a bundle, by field name."""
    out: dict[str, set[str]] = defaultdict(set)

    def add(field: str, value: Any) -> None:
        if value is not None and value != "":
            out[field].add(str(value))

    for e in bundle.get("entry", []) or []:
        r = e.get("resource") or {}
        rt = r.get("resourceType")
        if rt == "Patient":
            if r.get("link") and r.get("active") is False:
                continue  # a merged-away patient (ours); the expected side models it differently
            for i in r.get("identifier", []) or []:
                add("Patient.identifier", i.get("value"))
            for n in r.get("name", []) or []:
                add("Patient.name.family", (n.get("family") or "").upper() or None)
                for g in n.get("given", []) or []:
                    add("Patient.name.given", g.upper())
            add("Patient.birthDate", r.get("birthDate"))
            add("Patient.gender", r.get("gender"))
        elif rt == "Encounter":
            add("Encounter.class", (r.get("class") or {}).get("code"))
            p = r.get("period") or {}
            add("Encounter.period.start", norm_time(p.get("start")))
            add("Encounter.period.end", norm_time(p.get("end")))
            for i in r.get("identifier", []) or []:
                add("Encounter.identifier", i.get("value"))
        elif rt == "Observation":
            for c in codes(r.get("code")):
                add("Observation.code", c)
            q = r.get("valueQuantity") or {}
            add("Observation.value", number(q.get("value")))
            add("Observation.unit", q.get("code") or q.get("unit"))
            add("Observation.value", r.get("valueString"))
            for c in codes(r.get("valueCodeableConcept")):
                add("Observation.value", c)
            add("Observation.effective", norm_time(r.get("effectiveDateTime")))
        elif rt == "DiagnosticReport":
            for c in codes(r.get("code")):
                add("DiagnosticReport.code", c)
            add("DiagnosticReport.status", r.get("status"))
            add(
                "DiagnosticReport.effective",
                norm_time(r.get("effectiveDateTime") or (r.get("effectivePeriod") or {}).get("start")),
            )
        elif rt == "Immunization":
            for c in codes(r.get("vaccineCode")):
                add("Immunization.vaccineCode", c)
            add("Immunization.occurrence", norm_time(r.get("occurrenceDateTime")))
            add("Immunization.lotNumber", r.get("lotNumber"))
        elif rt == "ServiceRequest":
            for c in codes(r.get("code")):
                add("ServiceRequest.code", c)
        elif rt == "MedicationRequest":
            for c in codes(r.get("medicationCodeableConcept")):
                add("MedicationRequest.medication", c)
        elif rt == "Condition":
            for c in codes(r.get("code")):
                add("Condition.code", c)
        elif rt == "AllergyIntolerance":
            for c in codes(r.get("code")):
                add("AllergyIntolerance.code", c)
        elif rt == "Appointment":
            add("Appointment.status", r.get("status"))
            add("Appointment.start", norm_time(r.get("start")))
        elif rt == "DocumentReference":
            for c in codes(r.get("type")):
                add("DocumentReference.type", c)
        elif rt == "Specimen":
            for c in codes(r.get("type")):
                add("Specimen.type", c)
        elif rt == "Coverage":
            for i in r.get("identifier", []) or []:
                add("Coverage.identifier", i.get("value"))
    return out


def message_type(data: bytes) -> str:
    text = data.decode("utf-8", "replace").lstrip("\ufeff\x0b")
    line = text.replace("\n", "\r").split("\r", 1)[0]
    if len(line) < 4:
        return "?"
    parts = line.split(line[3])
    mt = parts[8].split(parts[1][:1] or "^") if len(parts) > 8 else ["?"]
    return "^".join(mt[:2])


def pairs(samples: Path) -> Iterator[tuple[str, Path, Path]]:
    ms_in = samples / "hl7v2" / "ms-fhir-converter"
    ms_exp = samples / "expected" / "hl7v2" / "ms-fhir-converter"
    for p in sorted(ms_in.glob("*.hl7")):
        e = ms_exp / (p.stem + ".json")
        if e.is_file():
            yield "microsoft", p, e
    rs_in = samples / "hl7v2" / "reportstream"
    rs_exp = samples / "expected" / "hl7v2" / "reportstream"
    for p in sorted(rs_in.rglob("*.hl7")):
        e = rs_exp / p.relative_to(rs_in).with_suffix(".fhir")
        if e.is_file():
            yield "reportstream", p, e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    ap.add_argument("--details", type=int, default=15, help="show the N most frequent disagreements")
    ap.add_argument("--timezone", default="UTC", help="source time zone for times without an offset")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not (args.samples / "hl7v2").is_dir():
        print(f"no samples at {args.samples}", file=sys.stderr)
        return 2
    import logging

    logging.disable(logging.WARNING)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    adapter = HL7v2Adapter()
    src = SourceInfo("score", timezone=args.timezone)
    # per corpus -> message type -> field -> [agreed, expected]
    table: dict[str, dict[str, dict[str, list[int]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: [0, 0]))
    )
    misses: Counter[str] = Counter()
    converted = failed = 0
    for corpus, inp, exp in pairs(args.samples):
        data = inp.read_bytes()
        try:
            expected = json.loads(exp.read_bytes())
        except ValueError:
            continue
        outs = list(adapter.convert(data, src, filename=str(inp)))
        ours: dict[str, set[str]] = defaultdict(set)
        for o in outs:
            if isinstance(o, ConvertedBundle):
                converted += 1
                for k, v in facts(o.bundle).items():
                    ours[k] |= v
            else:
                failed += 1
        mt = message_type(data)
        for field, values in facts(expected).items():
            agree = len(values & ours.get(field, set()))
            cell = table[corpus][mt][field]
            cell[0] += agree
            cell[1] += len(values)
            for v in sorted(values - ours.get(field, set()))[:3]:
                misses[
                    f"{corpus}: {field}: expected {v[:60]!r}; ours {sorted(ours.get(field, set()))[:3]}"[:200]
                ] += 1
    result: dict[str, Any] = {"converted": converted, "failed": failed, "corpora": {}}
    for corpus, by_type in sorted(table.items()):
        rows = {}
        tot_a = tot_e = 0
        for mt, fields in sorted(by_type.items()):
            a = sum(v[0] for v in fields.values())
            e = sum(v[1] for v in fields.values())
            tot_a += a
            tot_e += e
            rows[mt] = {
                "agreement": round(a / e, 3) if e else None,
                "facts": e,
                "fields": {f: round(v[0] / v[1], 3) for f, v in sorted(fields.items()) if v[1]},
            }
        by_field: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for fields in by_type.values():
            for f, v in fields.items():
                by_field[f][0] += v[0]
                by_field[f][1] += v[1]
        result["corpora"][corpus] = {
            "agreement": round(tot_a / tot_e, 3) if tot_e else None,
            "facts": tot_e,
            "by_message_type": rows,
            "by_field": {
                f: {"agreement": round(v[0] / v[1], 3), "facts": v[1]} for f, v in sorted(by_field.items())
            },
        }
    result["top_disagreements"] = misses.most_common(args.details)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"converted {converted} bundles, {failed} rejected records")
    for corpus, c in result["corpora"].items():
        print(f"\n== {corpus}: overall agreement {c['agreement']:.1%} over {c['facts']} expected facts")
        print(f"{'message type':14} {'agree':>7} {'facts':>6}")
        for mt, row in c["by_message_type"].items():
            ag = f"{row['agreement']:.1%}" if row["agreement"] is not None else "-"
            print(f"{mt:14} {ag:>7} {row['facts']:>6}")
        print(f"\n{'field':34} {'agree':>7} {'facts':>6}")
        for f, row in c["by_field"].items():
            print(f"{f:34} {row['agreement']:>7.1%} {row['facts']:>6}")
    if args.details:
        print("\nmost frequent disagreements:")
        for text, n in result["top_disagreements"]:
            print(f"{n:4}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
