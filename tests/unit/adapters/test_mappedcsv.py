"""Mapped CSV adapter: the two shipped mappings on the shared samples, CSV pitfalls, mapping errors."""

from __future__ import annotations

import csv as _csv
import io as _io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import ConvertedBundle, RejectedRecord, SourceInfo
from adapters.common.csvread import BadRow, CsvFileError, Row, read_csv
from adapters.errors import AdapterError
from adapters.mappedcsv import EXAMPLES, MappedCsvAdapter, MappingError, load_mapping
from adapters.mappedcsv.adapter import compact, set_path

SRC = SourceInfo("vendor", timezone="America/Chicago")
LAB_MAPPING = """
name = "simple-lab"
[record]
id = "{specimen_id}"
[[resource]]
name = "patient"
type = "Patient"
key = "{first_name}|{last_name}"
  [[resource.field]]
  path = "name[0].family"
  column = "last_name"
  required = true
  [[resource.field]]
  path = "name[0].given[0]"
  column = "first_name"
  [[resource.field]]
  path = "address[0].state"
  column = "state"
[[resource]]
name = "obs"
type = "Observation"
key = "{specimen_id}"
  [[resource.field]]
  path = "status"
  value = "final"
  [[resource.field]]
  path = "code.text"
  column = "lab"
  required = true
  [[resource.field]]
  path = "subject"
  reference = "patient"
  required = true
  [[resource.field]]
  path = "effectiveDateTime"
  column = "test_time"
  type = "dateTime"
  formats = ["%Y-%m-%dT%H:%M:%S%z", "%m/%d/%Y"]
  required = true
  [[resource.field]]
  path = "valueString"
  column = "observation"
  map = { "covid-19:neg" = "negative", "covid-19:pos" = "positive" }
"""
HEADER = "lab,first_name,last_name,state,test_time,specimen_id,observation\n"


@pytest.fixture
def lab(tmp_path: Path) -> MappedCsvAdapter:
    p = tmp_path / "lab.toml"
    p.write_text(LAB_MAPPING)
    return MappedCsvAdapter(mapping=str(p))


def run(a: MappedCsvAdapter, data: bytes, name: str = "in.csv") -> list[ConvertedBundle | RejectedRecord]:
    return list(a.convert(data, SRC, filename=name))


def of(out: ConvertedBundle, rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_rows_map_and_reference(lab: MappedCsvAdapter) -> None:
    data = (HEADER + "lab1,Gary,Aguilar,FL,2020-10-10T17:42:31+00:00,28504428,covid-19:neg\n").encode()
    [out] = run(lab, data)
    assert isinstance(out, ConvertedBundle)
    [pat], [obs] = of(out, "Patient"), of(out, "Observation")
    assert pat["name"] == [{"family": "Aguilar", "given": ["Gary"]}]
    assert obs["subject"] == {"reference": f"Patient/{pat['id']}"}
    assert obs["effectiveDateTime"] == "2020-10-10T17:42:31Z" and obs["valueString"] == "negative"
    assert out.message_id == "28504428" and out.routing_key == f"Patient/{pat['id']}"
    assert out.body == run(lab, data)[0].body  # type: ignore[union-attr]


def test_quoted_commas_newlines_bom_and_ragged_rows(lab: MappedCsvAdapter) -> None:
    data = (
        "\ufeff"
        + HEADER
        + '"Labs, Inc",Brooke,Johnson,AZ,2020-10-10T17:42:31+00:00,1,covid-19:neg\n'
        + '"Multi\nline lab",Mary,Ponce,FL,2020-10-10T17:42:31+00:00,2,covid-19:pos\n'
        + "lab1,Too,Few\n"
        + "lab1,Gary,Aguilar,FL,2020-10-10T17:42:31+00:00,3,covid-19:neg,EXTRA\n"
        + "\n"
        + "lab1,Ok,Again,FL,01/31/2020,4,covid-19:neg\n"
    ).encode()
    outs = run(lab, data)
    kinds = [type(o).__name__ for o in outs]
    assert kinds == [
        "ConvertedBundle",
        "ConvertedBundle",
        "RejectedRecord",
        "RejectedRecord",
        "ConvertedBundle",
    ]
    assert of(outs[0], "Observation")[0]["code"]["text"] == "Labs, Inc"  # type: ignore[arg-type]
    assert of(outs[1], "Observation")[0]["code"]["text"] == "Multi line lab"  # type: ignore[arg-type]
    assert [o.error.location.line for o in outs if isinstance(o, RejectedRecord)] == [
        5,
        6,
    ]  # record 2 spans 3-4
    assert outs[2].raw == b"lab1,Too,Few\n"  # type: ignore[union-attr]
    assert outs[4].location.line == 8  # type: ignore[union-attr]
    assert of(outs[4], "Observation")[0]["effectiveDateTime"].startswith("2020-01-31")  # type: ignore[arg-type]


def test_bad_values_are_located_and_do_not_abort(lab: MappedCsvAdapter) -> None:
    data = (
        HEADER
        + "lab1,A,B,FL,not-a-date,1,covid-19:neg\n"
        + "lab1,C,D,FL,01/31/2020,2,maybe\n"
        + ",E,F,FL,01/31/2020,3,covid-19:neg\n"
        + "lab1,G,H,FL,01/31/2020,4,covid-19:pos\n"
    ).encode()
    outs = run(lab, data, "weird.csv")
    rej = [o for o in outs if isinstance(o, RejectedRecord)]
    assert [(r.error.location.line, r.error.location.column) for r in rej] == [
        (2, "test_time"),
        (3, "observation"),
        (4, "lab"),
    ]
    assert all(r.error.location.file == "weird.csv" for r in rej)
    assert "not in the value map" in rej[1].error.message
    assert sum(isinstance(o, ConvertedBundle) for o in outs) == 1


def test_encodings(lab: MappedCsvAdapter, tmp_path: Path) -> None:
    row = "lab1,José,Muñoz,FL,01/31/2020,1,covid-19:neg\n"
    latin = (HEADER + row).encode("latin-1")
    [out] = run(lab, latin)
    assert (
        isinstance(out, RejectedRecord) and "encoding" in out.error.message and out.error.location.line == 2
    )
    p = tmp_path / "lab.toml"
    [ok] = run(MappedCsvAdapter(mapping=str(p), encoding="latin-1"), latin)
    assert isinstance(ok, ConvertedBundle) and of(ok, "Patient")[0]["name"][0]["family"] == "Muñoz"


def test_empty_and_header_only(lab: MappedCsvAdapter) -> None:
    [out] = run(lab, b"")
    assert isinstance(out, RejectedRecord) and "empty" in out.error.message
    [out] = run(lab, HEADER.encode())
    assert (
        isinstance(out, RejectedRecord)
        and "no data rows" in out.error.message
        and out.error.location.line == 1
    )
    [out] = run(lab, b"Gary,Aguilar\n")
    assert isinstance(out, RejectedRecord) and "header lacks" in out.error.message


def test_set_path_and_compact() -> None:
    d: dict[str, Any] = {}
    set_path(d, "name[0].given[1]", "B")
    set_path(d, "name[0].family", "F")
    assert compact(d) == {"name": [{"given": ["B"], "family": "F"}]}


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[[resource]]\ntype='Nope'\n", "not an R4 resource type"),
        ("[[resource]]\ntype='Patient'\n[[resource.field]]\npath='name'\n", "exactly one of"),
        ("[[resource]]\ntype='Patient'\n[[resource.field]]\npath='x..y'\nvalue=1\n", "path"),
        (
            "[[resource]]\ntype='Patient'\n[[resource.field]]\npath='x'\nreference='ghost'\n",
            "unknown resource",
        ),
        ("bogus = 1\n", "unknown top-level"),
        ("[[resource\n", "not valid TOML"),
    ],
)
def test_bad_mapping_files(tmp_path: Path, toml: str, needle: str) -> None:
    p = tmp_path / "m.toml"
    p.write_text(toml)
    with pytest.raises(MappingError, match=needle):
        load_mapping(p)


def test_options() -> None:
    [out] = MappedCsvAdapter().convert(b"a,b\n1,2\n", SRC, filename="x.csv")  # listable without options
    assert isinstance(out, RejectedRecord) and "mapping=FILE" in out.error.message
    with pytest.raises(AdapterError, match="cannot read"):
        MappedCsvAdapter(mapping="/nonexistent/m.toml")
    with pytest.raises(AdapterError):
        MappedCsvAdapter(mapping="simplereport-patients", encoding="klingon")
    assert MappedCsvAdapter(mapping="simplereport-patients").mapping.name == "simplereport-patients"


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet='ab,"\n\r;1/:-\ufeff é', max_size=200))
def test_arbitrary_csv_never_raises(text: str) -> None:
    a = MappedCsvAdapter(mapping=str(EXAMPLES / "simplereport-patients.toml"))
    for out in a.convert(text.encode("utf-8"), SRC):
        assert isinstance(out, ConvertedBundle | RejectedRecord)


# -- the shipped mappings on the shared samples ------------------------------------------------------
def test_simplereport_patients_mapping(samples: Path) -> None:
    a = MappedCsvAdapter(mapping=str(EXAMPLES / "simplereport-patients.toml"))
    base = samples / "csv" / "simplereport" / "patients"

    def conv(name: str) -> list[ConvertedBundle | RejectedRecord]:
        return list(a.convert((base / name).read_bytes(), SRC, filename=name))

    [valid] = conv("valid.csv")
    assert isinstance(valid, ConvertedBundle)
    [pat] = of(valid, "Patient")
    assert pat["birthDate"] == "1980-11-03" and pat["gender"] == "female"
    assert pat["extension"][0]["extension"][0]["valueCoding"]["code"] == "2054-5"
    assert pat["telecom"][0] == {"system": "phone", "value": "410-867-5309", "use": "mobile"}
    assert len([o for o in conv("slightlyLargeFile.csv") if isinstance(o, ConvertedBundle)]) == 17
    malformed = conv("malformed.csv")
    assert [o.error.location.line for o in malformed if isinstance(o, RejectedRecord)] == [4, 5]
    [missing] = conv("missingRequiredFields.csv")
    assert isinstance(missing, RejectedRecord) and missing.error.location.column == "race"
    [invalid] = conv("invalidValues.csv")
    assert isinstance(invalid, RejectedRecord) and invalid.error.location.line == 2
    [no_header] = conv("missingHeaders.csv")
    assert isinstance(no_header, RejectedRecord) and no_header.error.location.line == 1
    dup = conv("duplicatePatients.csv")
    assert [o.bundle["entry"][0]["resource"]["id"] for o in dup if isinstance(o, ConvertedBundle)] == [
        dup[0].bundle["entry"][0]["resource"]["id"]
    ] * 2  # type: ignore[union-attr]
    for f in sorted(base.glob("*.csv")):  # every sample: no crash, every outcome located
        for o in conv(f.name):
            if isinstance(o, RejectedRecord):
                assert o.error.location.file == f.name and o.error.location.line


def test_reportstream_lab_results_mapping(samples: Path) -> None:
    a = MappedCsvAdapter(mapping=str(EXAMPLES / "reportstream-lab-results.toml"))
    f = samples / "csv" / "reportstream" / "ReportStream-StandardCSV-ExampleData-20220509.csv"
    outs = list(a.convert(f.read_bytes(), SRC, filename=f.name))
    assert len(outs) == 5 and all(isinstance(o, ConvertedBundle) for o in outs)
    first = outs[0]
    assert isinstance(first, ConvertedBundle)
    [obs] = of(first, "Observation")
    [pat] = of(first, "Patient")
    [lab_org] = of(first, "Organization")
    assert obs["code"]["coding"][0] == {"system": "http://loinc.org", "code": "94534-5"}
    assert obs["valueCodeableConcept"]["coding"][0]["code"] == "260373001"
    assert obs["effectiveDateTime"] == "2021-12-20T14:00:00-06:00"
    assert obs["subject"]["reference"] == f"Patient/{pat['id']}"
    assert obs["performer"][0]["reference"] == f"Organization/{lab_org['id']}"
    assert pat["birthDate"] == "1962-01-20"
    up = samples / "csv" / "reportstream" / "SR-UPLOAD.csv"
    assert all(isinstance(o, ConvertedBundle) for o in a.convert(up.read_bytes(), SRC, filename=up.name))


# -- the shared CSV reader (adapters.common.csvread), property-tested -------------------------------

_cell = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=12
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(_cell, min_size=3, max_size=3), max_size=8))
def test_csv_reader_round_trips_quoted_cells_with_first_line_numbers(rows: list[list[str]]) -> None:
    buf = _io.StringIO()
    w = _csv.writer(buf, lineterminator="\n")
    w.writerow(["a", "b", "c"])
    starts = []
    line = 2
    for r in rows:
        starts.append(line)
        w.writerow(r)
        line += sum(c.count("\n") for c in r) + 1
    header, out = read_csv(buf.getvalue())
    assert header == ["a", "b", "c"]
    got = list(out)
    kept = [(r, s) for r, s in zip(rows, starts, strict=True) if any(c.strip() for c in r)]
    assert all(isinstance(g, Row) for g in got)
    assert [(list(g.values.values()), g.line) for g in got if isinstance(g, Row)] == kept


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=10))
def test_csv_reader_flags_every_ragged_row(widths: list[int]) -> None:
    text = "a,b,c\n" + "".join(",".join(f"v{i}" for i in range(w)) + "\n" for w in widths)
    _, out = read_csv(text)
    got = list(out)
    assert [isinstance(g, BadRow) for g in got] == [w != 3 for w in widths]
    assert [g.line for g in got] == list(range(2, 2 + len(widths)))


def test_csv_reader_keeps_raw_rows_across_unusual_line_breaks_and_refuses_repeated_columns() -> None:
    """A rejected row carries its own text, whatever line breaks sit inside values (str.splitlines would
    also break at \\x0c, \\x85 (Latin-1 0x85), \\u2028 ...); a repeated column name, which would overwrite
    the earlier column, is refused."""
    text = "a,b\nx\x85y,1\nonly-one\n"
    _, out = read_csv(text)
    got = list(out)
    assert isinstance(got[0], Row) and got[0].values["a"] == "x\x85y"
    assert isinstance(got[1], BadRow) and got[1].raw == "only-one\n" and got[1].line == 3
    with pytest.raises(CsvFileError, match="more than once in the header: last_name"):
        read_csv("first_name,last_name,Other,last_name\nA,B,C,D\n")
