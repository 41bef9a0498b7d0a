"""`fhirbridge demo` (what `make demo` runs) brings the whole stack up with the shipped data."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bridge.stream.broker import free_port

pytestmark = pytest.mark.integration


def _demo(data_dir: Path, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge.cli",
            "demo",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--exit-when-ready",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_demo_runs_to_ready_prints_working_links_and_keeps_its_data(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "demo"
    proc = _demo(data_dir, port)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (
        "Ready: 189 HL7 v2 messages (ADT, ORU, RDE, VXU, MDM) from 2 hospitals are logged and queryable."
        in proc.stdout
    )
    urls = re.findall(r"(http://127\.0\.0\.1:\d+/\S*)", proc.stdout)
    assert any("/$everything" in u for u in urls) and any("/Person/" in u for u in urls)
    # the curl line it prints works, with its token; without one the same request is refused
    (curl,) = [x for x in proc.stdout.splitlines() if "Try it" in x]
    token, url = re.search(r"Bearer ([^']+)' '(http://[^']+)'", curl).groups()  # type: ignore[union-attr]
    # the app's URL, then one line per demo user: role, user name, password
    lines = proc.stdout.splitlines()
    assert f"App  http://127.0.0.1:{port}/app/" in lines
    logins = [x.split(" ", 1) for x in (data_dir / "auth" / "demo-logins.txt").read_text().splitlines()]
    assert [u for u, _ in logins] == ["clinician", "steward", "patient"]
    for user, password in logins:
        assert f"  {user}  {user}  {password}" in lines  # each demo user's role is its user name
    assert (data_dir / "auth" / "demo-logins.txt").stat().st_mode & 0o077 == 0
    # the stack is stopped on exit: nothing listens any more
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=2)

    # the environment it prints makes the README's other commands work on the demo's data
    (line,) = [x.strip() for x in proc.stdout.splitlines() if x.strip().startswith("export ")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIRBRIDGE_", "KAFKA_"))}
    env.update(dict(kv.split("=", 1) for kv in line.removeprefix("export ").split()))
    verify = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "ledger", "verify"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert (data_dir / "env").read_text().strip() == line

    # the token of the curl line is accepted by the service over the demo's data (same port, same keys)
    serve = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "serve"],
        env={**env, "FHIRBRIDGE_HTTP_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
        with urllib.request.urlopen(
            urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        ) as r:
            assert r.status == 200 and b'"resourceType":"Bundle"' in r.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401
        _search_and_export(proc.stdout)
        _clinicians_view(proc.stdout)
        _consent_break_glass_and_access_log(proc.stdout, env, data_dir, tmp_path)
    finally:
        serve.terminate()
        serve.wait(15)

    # a second run reuses what the first kept: the same ledger, nothing ingested again
    key = (data_dir / "ledger.key").read_text()
    again = _demo(data_dir, free_port())
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "reusing the data kept in" in again.stdout and "ingest " not in again.stdout
    assert (data_dir / "ledger.key").read_text() == key

    # --fresh starts over in the directory the demo made
    (data_dir / "logs" / "mine.txt").write_text("made by the first run's user")
    fresh = _demo(data_dir, free_port(), "--fresh")
    assert fresh.returncode == 0, fresh.stdout[-2000:] + fresh.stderr[-2000:]
    assert "ingest " in fresh.stdout and not (data_dir / "logs" / "mine.txt").exists()
    assert (data_dir / "ledger.key").read_text() != key


def test_demo_refuses_a_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for extra in ((), ("--fresh",)):
        proc = _demo(precious, free_port(), *extra)
        assert proc.returncode == 1
        assert "not empty and was not created by the demo" in proc.stderr and "Traceback" not in proc.stderr
        assert sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]


def test_shipped_clinical_feeds_are_what_the_generator_writes(tmp_path: Path) -> None:
    """deploy/demo/clinical and deploy/demo/late are tests/support/democlinical.py's output, unedited
    (`python -m tests.support.democlinical` rewrites them)."""
    from bridge.cli.demo import DEMO_CLINICAL, DEMO_LATE
    from tests.support.democlinical import write

    written = write(tmp_path)
    assert written
    for path in written:
        shipped = {"clinical": DEMO_CLINICAL, "late": DEMO_LATE}[path.relative_to(tmp_path).parts[0]]
        assert (shipped / path.relative_to(tmp_path / shipped.name)).read_bytes() == path.read_bytes(), path
    assert sorted(
        p.relative_to(DEMO_CLINICAL.parent) for d in (DEMO_CLINICAL, DEMO_LATE) for p in d.rglob("*.hl7")
    ) == sorted(p.relative_to(tmp_path) for p in written)


def _search_and_export(stdout: str) -> None:
    """The printed search answers a page of the shared patient's encounters, latest first; the printed
    export kick-off is accepted, and its status URL ends in a manifest whose files download."""
    (search,) = [x for x in stdout.splitlines() if x.strip().startswith("Search ")]
    token, url = re.search(r"Bearer ([^']+)' '(http://[^']+)'", search).groups()  # type: ignore[union-attr]
    auth = {"Authorization": f"Bearer {token}"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=auth)) as r:
        page = json.loads(r.read())
    # `-date` sorts by the latest instant of each period, and a visit not yet ended has none: it
    # comes first (docs/query.md); every offset in the demo is -06:00, so the strings compare
    periods = [e["resource"]["period"] for e in page["entry"] if e["search"]["mode"] == "match"]
    ends = [p.get("end", "9999") for p in periods]
    assert periods and all(p.get("start") for p in periods) and ends == sorted(ends, reverse=True)
    (export,) = [x for x in stdout.splitlines() if x.strip().startswith("Bulk export ")]
    kickoff = re.search(r"'(http://[^']+\$export[^']*)'", export).group(1)  # type: ignore[union-attr]
    request = urllib.request.Request(kickoff, headers={**auth, "Prefer": "respond-async"})
    with urllib.request.urlopen(request) as r:
        assert r.status == 202
        status_url = r.headers["Content-Location"]
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(urllib.request.Request(status_url, headers=auth)) as r:
            if r.status == 200:
                manifest = json.loads(r.read())
                break
        assert time.monotonic() < deadline, "the export did not finish"
        time.sleep(0.5)
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Encounter"}
    with urllib.request.urlopen(urllib.request.Request(manifest["output"][0]["url"], headers=auth)) as r:
        assert r.read().count(b"\n") == manifest["output"][0]["count"]


def _provenance(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per source of a ``$everything`` entry: its entry-provenance parts by name (proofHash a list)."""
    out = []
    for ext in entry.get("extension", ()):
        parts: dict[str, Any] = {"proofHash": []}
        for part in ext["extension"]:
            value = next(v for k, v in part.items() if k.startswith("value"))
            if part["url"] == "proofHash":
                parts["proofHash"].append(value)
            else:
                parts[part["url"]] = value
        out.append(parts)
    return out


def _clinicians_view(stdout: str) -> None:
    """The shared patient's merged history shows what deploy/demo/clinical was written to show: lab
    results with ranges and H/L flags over several dates, a result both hospitals sent (one entry, two
    proven sources), a result they disagree on, a severe allergy, medications, problems, immunizations
    and documents, and an entry logged after the latest checkpoint; the MPI review queue holds the
    registration with a name typo."""
    (curl,) = [x for x in stdout.splitlines() if "Try it" in x]
    token, url = re.search(r"Bearer ([^']+)' '(http://[^']+)'", curl).groups()  # type: ignore[union-attr]
    auth = {"Authorization": f"Bearer {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}?_proof=true&_count=1000", headers=auth)) as r:
        bundle = json.loads(r.read())
    assert "next" not in {link["relation"] for link in bundle["link"]}
    entries = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_type.setdefault(e["resource"]["resourceType"], []).append(e)
    for rtype in (
        "MedicationRequest",
        "Condition",
        "Immunization",
        "DocumentReference",
        "AllergyIntolerance",
    ):
        assert by_type.get(rtype), rtype

    # lab results: at least 3 tests on at least 4 dates each, every one with its range and flag
    observations = [e["resource"] for e in by_type["Observation"]]
    dates: dict[str, set[str]] = {}
    for obs in observations:
        assert obs["referenceRange"][0]["low"] and obs["referenceRange"][0]["high"], obs
        dates.setdefault(obs["code"]["coding"][0]["code"], set()).add(obs["effectiveDateTime"][:10])
    assert sum(len(d) >= 4 for d in dates.values()) >= 3, dates
    flags = {c["code"] for obs in observations for i in obs["interpretation"] for c in i["coding"]}
    assert {"H", "L", "N"} <= flags

    # one fact both hospitals sent: one entry, a proven source at each
    both = [
        e
        for e in by_type["Observation"]
        if {s["sourceOrg"] for s in _provenance(e)} == {"st-mary", "riverside"}
    ]
    assert both, "no result merged from both hospitals"
    assert all(s["proofHash"] and s["treeSize"] > s["ledgerIndex"] for e in both for s in _provenance(e))

    # one value they disagree on: the same test at the same time, a different value from each
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    disagreements = []
    for e in by_type["Observation"]:
        obs = e["resource"]
        key = (obs["code"]["coding"][0]["code"], obs["effectiveDateTime"])
        orgs = {s["sourceOrg"] for s in _provenance(e)}
        if key in seen and seen[key]["value"] != obs["valueQuantity"]["value"] and seen[key]["orgs"] != orgs:
            disagreements.append(key)
        seen[key] = {"value": obs["valueQuantity"]["value"], "orgs": orgs}
    assert disagreements, "no result the hospitals disagree on"

    # a severe allergy (AL1-4 SV)
    assert any(
        a["resource"].get("criticality") == "high"
        and any(x.get("severity") == "severe" for x in a["resource"].get("reaction", ()))
        for a in by_type["AllergyIntolerance"]
    )

    # an entry logged after the latest checkpoint: no proof yet, and the bundle says so
    pending = [s for e in entries for s in _provenance(e) if not s["proofHash"]]
    assert pending and all(s["ledgerIndex"] >= s.get("treeSize", 0) for s in pending), pending
    outcomes = [
        e["resource"]["issue"][0]["diagnostics"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"
    ]
    assert any("logged after the latest checkpoint" in o for o in outcomes), outcomes

    # the possible match from a name typo waits in the review queue
    base = url.split("/Patient/", 1)[0]
    with urllib.request.urlopen(
        urllib.request.Request(f"{base}/Person/$mpi-review-queue", headers=auth)
    ) as r:
        queue = json.loads(r.read())
    pairs = [
        {p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in link["part"]}
        for link in queue["parameter"]
        if link["name"] == "link"
    ]
    assert any(
        p["matchResult"] == "POSSIBLE_MATCH" and {p["familyA"], p["familyB"]} == {"white", "whtie"}
        for p in pairs
    ), pairs


def _consent_break_glass_and_access_log(stdout: str, env: dict[str, str], data_dir: Path, cwd: Path) -> None:
    """The demo's Consent withholds riverside's record from the st-mary clinician; the printed
    break-the-glass call gets everything; the patient's access log shows both, with proofs."""
    logins = dict(
        line.split(" ", 1) for line in (data_dir / "auth" / "demo-logins.txt").read_text().splitlines()
    )
    assert "Consent: riverside withholds its record" in stdout

    def login(user: str, command: str) -> str:
        argv = (
            shlex.split(command.split("$(", 1)[1].rsplit(")", 1)[0])
            if "$(" in command
            else shlex.split(command)
        )
        assert argv[:3] == ["fhirbridge", "auth", "login"]
        done = subprocess.run(
            [sys.executable, "-m", "bridge.cli", *argv[1:]],
            env={**env, "FHIRBRIDGE_AUTH_PASSWORD": logins[user]},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    (clinician_cmd,) = [x for x in stdout.splitlines() if "TOKEN=$(fhirbridge auth login" in x]
    token = login("clinician", clinician_cmd.strip())
    withheld = re.search(r"Withheld in part .*'(http://\S+)'", stdout).group(1)  # type: ignore[union-attr]

    def get(url: str, **headers: str) -> dict[str, Any]:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", **headers})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def suppressed(bundle: dict[str, Any]) -> bool:
        return any(
            e["resource"]["issue"][0]["code"] == "suppressed"
            for e in bundle["entry"]
            if e["search"]["mode"] == "outcome"
        )

    part = get(withheld)
    assert suppressed(part)
    everything = get(withheld, **{"X-Break-Glass-Reason": "unconscious in the ED"})
    assert not suppressed(everything) and everything["total"] > part["total"]
    # the patient's access log: both accesses, the second flagged, once the audit log has them
    (patient_line,) = [x for x in stdout.splitlines() if "Who has seen it" in x]
    command = patient_line.split("as the patient: ", 1)[1].split(", then", 1)[0]
    access_log = re.search(r"'(http://\S+\$access-log)'", patient_line).group(1)  # type: ignore[union-attr]
    token = login("patient", command)
    appended = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "audit", "run", "--exit-when-idle", "0.5"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert appended.returncode == 0, appended.stderr
    log = get(access_log)
    events = [e["resource"] for e in log["entry"]]
    assert any(any(s["code"] == "110127" for s in e["subtype"]) for e in events)
    proven = [e for e in log["entry"] if any(x["url"] == "proofHash" for x in e["extension"][0]["extension"])]
    assert proven and "meta" in log
