"""`fhirbridge convert` and `fhirbridge adapters list/check`: outputs, report.json, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.cli import main

GOOD = (
    "MSH|^~\\&|A|B|C|D|20240101120000+0100||ADT^A01|C1|P|2.5\r"
    "PID|1||MRN1^^^^MR||DOE^JANE||19800101|F\r"
    "PV1|1|I|||||||||||||||||V1\r"
)
BAD = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|C2|P|2.5\rPID|1||MRN2\rbad segment\r"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    g = tmp_path / "good.hl7"
    g.write_text(GOOD + GOOD.replace("C1", "C3").replace("MRN1", "MRN3"))
    b = tmp_path / "bad.hl7"
    b.write_text(BAD)
    return g, b


def test_convert_ok(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "convert",
            "--adapter",
            "hl7v2",
            "--source",
            "st-mary",
            "--timezone",
            "Europe/Paris",
            "--mrn-system",
            "https://st-mary/mrn",
            str(files[0]),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    (f,) = report["files"]
    assert f["status"] == "ok" and [b["message_id"] for b in f["bundles"]] == ["C1", "C3"]
    assert f["bundles"][0]["routing_key"] == "https://st-mary/mrn|MRN1"
    bundle = json.loads((out / f["bundles"][0]["output"]).read_bytes())
    assert bundle["resourceType"] == "Bundle"
    assert sorted(p.name for p in out.iterdir()) == ["good.0001.json", "good.0002.json", "report.json"]
    assert "2 bundle(s) from 1 file(s), 0 with errors" in capsys.readouterr().out


def test_convert_error_exit_1_with_located_message(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    rc = main(["convert", "-a", "hl7v2", "-s", "st-mary", str(files[0]), str(files[1]), "-o", str(out)])
    assert rc == 1
    report = json.loads((out / "report.json").read_text())
    by_file = {Path(f["file"]).name: f for f in report["files"]}
    assert by_file["good.hl7"]["status"] == "ok"
    err = by_file["bad.hl7"]
    assert err["status"] == "error"
    assert err["errors"][0]["location"]["line"] == 3 and err["errors"][0]["location"]["message_index"] == 1
    text = capsys.readouterr()
    assert "Traceback" not in text.out + text.err
    assert "line 3" in text.out


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "-a", "nope", "-s", "x", "-o", "OUT", "IN"],
        ["convert", "-a", "hl7v2", "-s", "x", "-o", "OUT", "MISSING"],
        ["convert", "-a", "hl7v2", "-s", "bad org", "-o", "OUT", "IN"],
        ["convert", "-a", "hl7v2", "-s", "x", "--timezone", "Mars/Olympus", "-o", "OUT", "IN"],
        ["convert", "-a", "hl7v2", "-s", "x", "--option", "novalue", "-o", "OUT", "IN"],
        ["convert", "-a", "hl7v2", "-s", "x", "--option", "colour=red", "-o", "OUT", "IN"],
        ["convert", "-a", "hl7v2", "-o", "OUT", "IN"],
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        str(files[0])
        if a == "IN"
        else str(tmp_path / "out")
        if a == "OUT"
        else str(tmp_path / "missing.hl7")
        if a == "MISSING"
        else a
        for a in argv
    ]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = int(exc.code or 0)
    assert rc == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err


def test_convert_empty_directory_is_a_located_error(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    rc = main(["convert", "-a", "hl7v2", "-s", "x", str(d), "-o", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rc == 1 and "holds no files" in report["files"][0]["errors"][0]["message"]


def test_convert_directory_reads_every_file_recursively_in_a_stable_order(tmp_path: Path) -> None:
    d = tmp_path / "feeds"
    (d / "b" / "deeper").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "z.hl7").write_text(GOOD.replace("C1", "Z1"))
    (d / "a.hl7").write_text(GOOD.replace("C1", "A1"))
    (d / "b" / "deeper" / "feed").write_text(
        GOOD.replace("C1", "B1")
    )  # no suffix: real feeds often have none
    (d / ".hidden.hl7").write_text(GOOD.replace("C1", "H1"))
    (d / ".git" / "x.hl7").write_text(GOOD.replace("C1", "G1"))
    rc = main(["convert", "-a", "hl7v2", "-s", "x", str(d), "-o", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rc == 0, report
    (f,) = report["files"]
    assert [b["message_id"] for b in f["bundles"]] == ["A1", "B1", "Z1"]
    assert [b["location"]["file"] for b in f["bundles"]] == [
        str(d / "a.hl7"),
        str(d / "b" / "deeper" / "feed"),
        str(d / "z.hl7"),
    ]


def test_convert_directory_with_a_bad_file_locates_the_error_in_that_file(tmp_path: Path) -> None:
    d = tmp_path / "feeds"
    d.mkdir()
    (d / "good.hl7").write_text(GOOD)
    (d / "bad.hl7").write_text(BAD)
    rc = main(["convert", "-a", "hl7v2", "-s", "x", str(d), "-o", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rc == 1
    (err,) = report["files"][0]["errors"]
    assert err["location"]["file"] == str(d / "bad.hl7") and err["location"]["line"] == 3
    assert [b["message_id"] for b in report["files"][0]["bundles"]] == ["C1"]


def test_adapters_list(capsys: pytest.CaptureFixture[str]) -> None:
    main(["adapters", "list"])
    assert "hl7v2" in capsys.readouterr().out


def test_adapters_check_passes_on_good_input(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["adapters", "check", "hl7v2", str(files[0]), "--mutations", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and "[ok] deterministic" in out
