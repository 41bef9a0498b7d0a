"""A ``fhirbridge serve`` process for the browser tests, over an index written in-process, stopped by PID.

No broker and no consumers: the index is written with :meth:`IndexStore.apply` (as the service tests
do), and the embedded authorization server's users and the public SMART app are registered with the
CLI (``fhirbridge auth users add``, ``auth clients add``), the way ``fhirbridge demo`` registers its
own (:func:`bridge.cli.demo._demo_identities`): the same user ids, kinds and app scopes, fresh
passwords; and the web app's client (``/app``, bridge/service/ui), with its redirect URI on this
service. The service runs with ``start_new_session`` and is stopped by its PID (its process group);
a run killed before it could stop the service leaves a note that the next run reads
(:func:`reap_orphans`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.cli.demo import DEMO_APP_SCOPES, DEMO_USERS
from bridge.config import Settings
from bridge.stores.index.store import IncomingBundle, IndexStore
from bridge.stores.mpi import PersonIndex
from bridge.stream.broker import free_port, stop_pid
from tests.support.consent import deny_organization

APP = "browser-app"
#: the web app's own public client (bridge/service/ui), its scopes, and the clinician who signs in to it
UI_CLIENT = "browser-ui"
UI_SCOPE = "openid fhirUser user/*.rs"
#: what the app's client may be granted: user/Person.u (the steward desk's link and unlink) in a
#: steward's sign-in only (/app/login?role=steward; the issuer refuses it to other users)
UI_CLIENT_SCOPE = f"{UI_SCOPE} user/Person.u"
#: the signed-in patient's record, and another patient whose name is markup
PATIENT_A = "browser-pa"
PATIENT_B = "browser-pb"
PATIENT_A_FAMILY = "Quackenbush"
#: a possible match for the steward desk: one person's records at two hospitals, the family name
#: mistyped at riverside and the address changed (the MPI scores it about 0.65: POSSIBLE_MATCH)
TYPO_ST_MARY = "browser-pc"
TYPO_RIVERSIDE = "browser-pd"
TYPO_RIVERSIDE_MRN = "RS-4242"
#: one person's records at two hospitals, linked by the MPI (MATCH): a fact both sent, a creatinine
#: whose values disagree, and potassium results with the lab's range, one flagged H
LINKED_ST_MARY = "browser-pe"
LINKED_RIVERSIDE = "browser-pf"
#: one person's records at two hospitals (MATCH), riverside's withheld from st-mary (the clinician's
#: organisation, which may break the glass) by a Consent filed at riverside; the patient user
#: :data:`GLASS_PATIENT_USER` signs in as the st-mary record (to read its $access-log)
GLASS_ST_MARY = "browser-pg"
GLASS_RIVERSIDE = "browser-ph"
GLASS_RIVERSIDE_MRN = "RS-6006"
GLASS_PATIENT_USER = "glass-patient"
#: a name that runs script if it is ever written into a page as HTML
MARKUP_NAME = '<img src=x onerror="window.__xss=1;alert(1)">'
#: one note per running service: the test process, the data directory, the service's PID
REGISTRY = Path(tempfile.gettempdir()) / f"fhirbridge-browser-{os.getuid()}"


class ServiceFailed(AssertionError):
    """The service did not come up, or a CLI command failed; the message carries the log's tail."""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge.cli", *args]


def _bundle(sha: str, org: str, resources: list[dict[str, Any]]) -> IncomingBundle:
    return IncomingBundle(
        {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]},
        sha,
        org,
        f"{org}|1",
        "fhir.bundles",
        0,
        0,
        "2026-03-11T00:00:00.000Z",
    )


def _patient(pid: str, family: str, given: str, ssn: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn}],
        "name": [{"family": family, "given": [given]}],
        "birthDate": "1980-02-14",
    }


def _glucose(oid: str, pid: str, when: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": "mg/dL",
            "system": "http://unitsofmeasure.org",
            "code": "mg/dL",
        },
    }


def seed_index(settings: Settings) -> None:
    """Two patients of two hospitals, each with a glucose result; B's family name is :data:`MARKUP_NAME`."""
    store = IndexStore.open(settings.stores.index_url)
    try:
        store.apply(
            [
                _bundle(
                    "b1",
                    "st-mary",
                    [
                        _patient(PATIENT_A, PATIENT_A_FAMILY, "Adelheid", "900000001"),
                        _glucose("browser-oa", PATIENT_A, "2026-01-10T08:00:00Z", 98),
                    ],
                ),
                _bundle(
                    "b2",
                    "riverside",
                    [
                        _patient(PATIENT_B, MARKUP_NAME, "Bo", "900000002"),
                        _glucose("browser-ob", PATIENT_B, "2026-02-10T08:00:00Z", 131),
                    ],
                ),
            ]
        )
    finally:
        store.close()


def _typo_patient(
    pid: str, family: str, org: str, mrn: str, line: str, city: str, postal: str
) -> dict[str, Any]:
    mr = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"type": mr, "system": f"urn:mrn:{org}", "value": mrn}],
        "name": [{"family": family, "given": ["Bartholomew"]}],
        "birthDate": "1975-06-02",
        "gender": "male",
        "address": [{"line": [line], "city": city, "postalCode": postal}],
    }


def seed_typo_pair(settings: Settings) -> None:
    """:data:`TYPO_ST_MARY` and :data:`TYPO_RIVERSIDE`, each with a glucose result, in the index and in
    the MPI (one batch each, as two deliveries would arrive), where they are a possible match."""
    st_mary = _typo_patient(
        TYPO_ST_MARY, "Featherstonehaugh", "st-mary", "SM-4242", "7 Quarry Lane", "Eastwick", "40404"
    )
    riverside = _typo_patient(
        TYPO_RIVERSIDE,
        "Featherstonhaugh",
        "riverside",
        TYPO_RIVERSIDE_MRN,
        "90 Mill Road",
        "Westfield",
        "50505",
    )
    store = IndexStore.open(settings.stores.index_url)
    try:
        store.apply(
            [
                _bundle(
                    "b3",
                    "st-mary",
                    [st_mary, _glucose("browser-oc", TYPO_ST_MARY, "2026-01-12T08:00:00Z", 104)],
                ),
                _bundle(
                    "b4",
                    "riverside",
                    [riverside, _glucose("browser-od", TYPO_RIVERSIDE, "2026-02-12T08:00:00Z", 142)],
                ),
            ]
        )
    finally:
        store.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    try:
        mpi.upsert_patients([("st-mary", st_mary)])
        mpi.upsert_patients([("riverside", riverside)])
    finally:
        mpi.close()


def _linked_patient(pid: str, org: str, mrn: str) -> dict[str, Any]:
    mr = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "900000005"},
            {"type": mr, "system": f"urn:mrn:{org}", "value": mrn},
        ],
        "name": [{"family": "Linkwater", "given": ["Dorothea"]}],
        "birthDate": "1966-09-30",
        "gender": "female",
        "address": [{"line": ["12 Orchard Row"], "city": "Northbury", "postalCode": "30303"}],
    }


def _lab(
    oid: str, pid: str, code: str, text: str, when: str, value: float, unit: str, **extra: Any
) -> dict[str, Any]:
    category = {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}
        ]
    }
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [category],
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": text},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit},
        **extra,
    }


def seed_linked_person(settings: Settings) -> None:
    """:data:`LINKED_ST_MARY` and :data:`LINKED_RIVERSIDE` (one person, MATCH in the MPI): asthma from
    both, creatinine 1.1 (st-mary) and 1.4 mg/dL (riverside) at one time, potassium 4.2, 5.8 (H) and
    4.6 mmol/L with the range 3.5-5.1, and a riverside encounter."""
    k_range = {
        "referenceRange": [
            {"low": {"value": 3.5, "unit": "mmol/L"}, "high": {"value": 5.1, "unit": "mmol/L"}}
        ]
    }
    high = {
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "H",
                    }
                ]
            }
        ]
    }

    def asthma(cid: str, pid: str) -> dict[str, Any]:
        code = {"coding": [{"system": "http://snomed.info/sct", "code": "195967001"}], "text": "Asthma"}
        return {
            "resourceType": "Condition",
            "id": cid,
            "subject": {"reference": f"Patient/{pid}"},
            "code": code,
            "onsetDateTime": "2019-04-02",
        }

    sm, rs = LINKED_ST_MARY, LINKED_RIVERSIDE
    st_mary = _linked_patient(sm, "st-mary", "SM-5005")
    riverside = _linked_patient(rs, "riverside", "RS-5005")
    store = IndexStore.open(settings.stores.index_url)
    try:
        store.apply(
            [
                _bundle(
                    "b5",
                    "st-mary",
                    [
                        st_mary,
                        asthma("browser-asthma-sm", sm),
                        _lab(
                            "browser-k1",
                            sm,
                            "2823-3",
                            "Potassium",
                            "2026-01-05T08:00:00Z",
                            4.2,
                            "mmol/L",
                            **k_range,
                        ),
                        _lab(
                            "browser-k2",
                            sm,
                            "2823-3",
                            "Potassium",
                            "2026-02-05T08:00:00Z",
                            5.8,
                            "mmol/L",
                            **k_range,
                            **high,
                        ),
                        _lab("browser-cr1", sm, "2160-0", "Creatinine", "2026-02-05T08:00:00Z", 1.1, "mg/dL"),
                    ],
                ),
                _bundle(
                    "b6",
                    "riverside",
                    [
                        riverside,
                        asthma("browser-asthma-rs", rs),
                        _lab("browser-cr2", rs, "2160-0", "Creatinine", "2026-02-05T08:00:00Z", 1.4, "mg/dL"),
                        _lab(
                            "browser-k3",
                            rs,
                            "2823-3",
                            "Potassium",
                            "2026-03-05T08:00:00Z",
                            4.6,
                            "mmol/L",
                            **k_range,
                        ),
                        {
                            "resourceType": "Encounter",
                            "id": "browser-enc",
                            "status": "finished",
                            "class": {"code": "AMB", "display": "ambulatory visit"},
                            "subject": {"reference": f"Patient/{rs}"},
                            "period": {"start": "2026-03-05T07:30:00Z"},
                        },
                    ],
                ),
            ]
        )
    finally:
        store.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    try:
        mpi.upsert_patients([("st-mary", st_mary)])
        mpi.upsert_patients([("riverside", riverside)])
    finally:
        mpi.close()


def seed_withheld_person(settings: Settings) -> None:
    """:data:`GLASS_ST_MARY` and :data:`GLASS_RIVERSIDE` (one person, MATCH in the MPI), each with a
    glucose result, and riverside's Consent denying st-mary the record (tests/support/consent.py)."""

    def patient(pid: str, org: str, mrn: str) -> dict[str, Any]:
        return {
            **_linked_patient(pid, org, mrn),
            "name": [{"family": "Glasswell", "given": ["Imogen"]}],
            "birthDate": "1958-11-21",
            "address": [{"line": ["3 Lantern Yard"], "city": "Southmere", "postalCode": "60606"}],
        }

    st_mary = patient(GLASS_ST_MARY, "st-mary", "SM-6006")
    riverside = patient(GLASS_RIVERSIDE, "riverside", GLASS_RIVERSIDE_MRN)
    for p in (st_mary, riverside):
        p["identifier"][0] = {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "900000006"}
    store = IndexStore.open(settings.stores.index_url)
    try:
        store.apply(
            [
                _bundle(
                    "b7",
                    "st-mary",
                    [st_mary, _glucose("browser-og", GLASS_ST_MARY, "2026-01-14T08:00:00Z", 101)],
                ),
                _bundle(
                    "b8",
                    "riverside",
                    [
                        riverside,
                        _glucose("browser-oh", GLASS_RIVERSIDE, "2026-02-14T08:00:00Z", 163),
                        deny_organization("browser-consent", GLASS_RIVERSIDE, "st-mary"),
                    ],
                ),
            ]
        )
    finally:
        store.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    try:
        mpi.upsert_patients([("st-mary", st_mary)])
        mpi.upsert_patients([("riverside", riverside)])
    finally:
        mpi.close()


@dataclass
class BridgeService:
    """``fhirbridge serve`` on a free loopback port over ``root``; ``passwords`` are the demo users'."""

    root: Path
    redirect_uri: str
    port: int = field(default_factory=free_port)
    passwords: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "serve.log"

    def start(self) -> None:
        reap_orphans()
        self.data_dir.mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIRBRIDGE_", "KAFKA_"))}
        self.env.update(
            {
                "FHIRBRIDGE_DATA_DIR": str(self.data_dir),
                "FHIRBRIDGE_HTTP_PORT": str(self.port),
                "FHIRBRIDGE_LOG_FORMAT": "json",
                "FHIRBRIDGE_UI_CLIENT_ID": UI_CLIENT,
                "FHIRBRIDGE_UI_SCOPE": UI_SCOPE,
                "FHIRBRIDGE_BREAK_GLASS_ORGANIZATIONS": "st-mary",
            }
        )
        seed_index(Settings.from_env(self.env))
        seed_typo_pair(Settings.from_env(self.env))
        seed_linked_person(Settings.from_env(self.env))
        seed_withheld_person(Settings.from_env(self.env))
        self._register()
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(
                _cli("serve"),
                env=self.env,
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._note()
        self._wait_ready(timeout=60)

    def stop(self) -> None:
        """Stop the service by the PID it was started with (it leads its own process group)."""
        if self.process is not None and self.process.poll() is None:
            stop_pid(self.process.pid, timeout=10)
        self._note_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServiceFailed(f"serve exited with {self.process.returncode}\n{self.log_tail()}")
            try:
                if get_json(self.url("/metadata"))["resourceType"] == "CapabilityStatement":
                    return
            except Exception as exc:  # not listening yet
                last = exc
            time.sleep(0.2)
        raise ServiceFailed(f"serve did not answer /metadata in {timeout:.0f}s ({last!r})\n{self.log_tail()}")

    def url(self, path: str) -> str:
        return self.base + path

    # ------------------------------------------------------------------ identities, with the CLI

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            _cli(*args),
            env={**self.env, **(env or {})},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise ServiceFailed(
                f"fhirbridge {' '.join(args[:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def _register(self) -> None:
        self.run(
            "auth",
            "clients",
            "add",
            "--id",
            APP,
            "--public",
            "--redirect-uri",
            self.redirect_uri,
            "--scope",
            DEMO_APP_SCOPES,
        )
        self.run(
            "auth",
            "clients",
            "add",
            "--id",
            UI_CLIENT,
            "--public",
            "--redirect-uri",
            self.url("/app/callback"),
            "--scope",
            UI_CLIENT_SCOPE,
        )
        for uid, kind, extra in DEMO_USERS:
            password = secrets.token_urlsafe(12)
            args = ("--patient", PATIENT_A) if kind == "patient" else extra
            self.run(
                "auth",
                "users",
                "add",
                "--id",
                uid,
                "--kind",
                kind,
                *args,
                env={"FHIRBRIDGE_AUTH_PASSWORD": password},
            )
            self.passwords[uid] = password
        password = secrets.token_urlsafe(12)
        self.run(
            "auth",
            "users",
            "add",
            "--id",
            GLASS_PATIENT_USER,
            "--kind",
            "patient",
            "--patient",
            GLASS_ST_MARY,
            env={"FHIRBRIDGE_AUTH_PASSWORD": password},
        )
        self.passwords[GLASS_PATIENT_USER] = password

    # ------------------------------------------------------------------ orphans

    @property
    def _note_file(self) -> Path:
        return REGISTRY / f"{os.getpid()}-{self.port}.json"

    def _note(self) -> None:
        REGISTRY.mkdir(mode=0o700, exist_ok=True)
        assert self.process is not None
        note = {"owner": os.getpid(), "data_dir": str(self.data_dir), "pid": self.process.pid}
        self._note_file.write_text(json.dumps(note))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans() -> list[int]:
    """Stop the services of earlier runs that died before stopping them: only a PID whose test process
    is gone and whose environment still names that run's data directory (not a reused PID)."""
    stopped: list[int] = []
    for note_file in REGISTRY.glob("*.json"):
        try:
            note = json.loads(note_file.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(note.get("owner", 0))):
            continue
        pid = int(note.get("pid", 0))
        with contextlib.suppress(OSError):
            if pid and note["data_dir"].encode() in Path(f"/proc/{pid}/environ").read_bytes():
                stop_pid(pid, timeout=5)
                stopped.append(pid)
        note_file.unlink(missing_ok=True)
    return stopped


# ---------------------------------------------------------------------- HTTP, as an app's back end


def get_json(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
        return json.loads(resp.read())


def http_status(url: str, token: str | None = None) -> int:
    """The status of a GET (an error status too)."""
    try:
        get_json(url, token)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def post_form(url: str, form: dict[str, str]) -> tuple[int, Any]:
    """POST ``form`` urlencoded; the status and the JSON answer, errors included."""
    data = urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
