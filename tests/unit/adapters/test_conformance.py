"""The conformance kit catches each kind of misbehaving adapter, and passes a good one."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from adapters import conformance
from adapters.base import Adapter, Outcome, RejectedRecord, SourceInfo
from adapters.bundle import BundleBuilder, canonical_json
from adapters.errors import Location
from adapters.hl7v2 import HL7v2Adapter

SRC = SourceInfo("kit")
_counter = itertools.count()


class LineAdapter(Adapter):
    """A tiny real adapter: each line "family,gender" becomes a Patient. Flags make it misbehave."""

    name = "lines"
    version = "0"
    nondeterministic = False
    dangling = False
    crash_on_short = False
    unlocated = False
    no_provenance = False

    def convert(self, data: bytes, source: SourceInfo, *, filename: str | None = None) -> Iterator[Outcome]:
        if self.crash_on_short and len(data) < 10:
            raise IndexError("boom")
        for i, line in enumerate(data.decode("latin-1").splitlines(), start=1):
            parts = line.split(",")
            if len(parts) != 2 or parts[1] not in ("male", "female"):
                loc = Location(file=filename) if self.unlocated else Location(file=filename, line=i)
                yield RejectedRecord(self.error("expected 'family,gender'", loc), line.encode())
                continue
            b = BundleBuilder(
                adapter_name=self.name,
                adapter_version=self.version,
                source=source,
                input_sha256=hashlib.sha256(line.encode()).hexdigest(),
                record_key=str(i),
            )
            p: dict = {"resourceType": "Patient", "name": [{"family": parts[0]}], "gender": parts[1]}
            if self.dangling:
                p["link"] = [
                    {
                        "other": {"reference": "Patient/00000000-0000-0000-0000-000000000000"},
                        "type": "seealso",
                    }
                ]
            b.add(p, parts[0], next(_counter) if self.nondeterministic else 0)
            cb = b.build(routing_key=parts[0])
            if self.no_provenance:
                bundle = {**cb.bundle, "entry": cb.bundle["entry"][:-1]}
                cb = replace(cb, bundle=bundle, body=canonical_json(bundle))
            yield cb


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    p = tmp_path / "in.txt"
    p.write_text("doe,female\nroe,male\n")
    return p


def test_good_adapter_passes(good_file: Path) -> None:
    a = LineAdapter()
    rep = conformance.run(a, [good_file], SRC, mutations=6)
    assert rep.ok, rep.render()
    assert rep.files[0].bundles == 2 and rep.files[0].mutations == 11


@pytest.mark.parametrize(
    ("flag", "check"),
    [
        ("nondeterministic", "deterministic"),
        ("no_provenance", "provenance"),
        ("dangling", "references"),
        ("crash_on_short", "mutations"),
        ("unlocated", "mutations"),
    ],
)
def test_bad_adapters_are_caught(flag: str, check: str, good_file: Path) -> None:
    a = LineAdapter()
    setattr(a, flag, True)
    rep = conformance.run(a, [good_file], SRC, mutations=8)
    assert not rep.ok
    assert not rep.files[0].checks[check].ok, rep.render()
    assert "FAIL" in rep.render()


def test_hl7v2_passes_the_kit(tmp_path: Path) -> None:
    p = tmp_path / "m.hl7"
    p.write_text(
        "MSH|^~\\&|A|B|C|D|20240101120000||ORU^R01|X1|P|2.5.1\r"
        "PID|1||M1^^^^MR||DOE^J||19800101|F\r"
        "OBR|1|P1|F1|1234-5^Glucose^LN|||20240101110000\r"
        "OBX|1|NM|1234-5^Glucose^LN||5.5|mmol/L^^UCUM|3.9-5.6|N|||F\r"
        "SPM|1|S1||BLD^Blood^HL70487\r"
    )
    rep = conformance.run(HL7v2Adapter(), [p], SRC, mutations=16)
    assert rep.ok, rep.render()
    d = rep.to_dict()
    assert d["files"][0]["bundles"] == 1 and d["files"][0]["mutations_tried"] == 21
