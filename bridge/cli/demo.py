"""``fhirbridge demo``: the whole stack on one machine, with our own demo data.

Starts the embedded broker (noida-db), creates signing keys for the demo hospitals and the ledger,
runs the ledger consumer, the index consumer and the HTTP service as separate processes, ingests the
shipped HL7 v2 feeds (``deploy/demo/data``: ADT; ``deploy/demo/clinical``: the shared patient's labs,
allergies, problems, medications, immunizations and documents), waits until everything is logged,
checkpointed and queryable, then ingests ``deploy/demo/late`` so that one entry is logged after the
latest checkpoint, and prints the URLs to open. Ctrl-C stops every process it started.

The data directory is the demo's own: it is created and marked (``.fhirbridge-demo``) on the first
run, and a later run starts the stack again on the data it kept (nothing is ingested twice, since
the bundles and their ledger entries are idempotent). ``--fresh`` clears a directory the demo
marked. The demo never deletes, nor writes into, a non-empty directory it did not create.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bridge.errors import FhirbridgeError
from bridge.stores.ledger import open_ledger

DEMO_DATA = Path(__file__).resolve().parents[2] / "deploy" / "demo" / "data"
#: the shared patient's clinical feeds (tests/support/democlinical.py), per hospital like DEMO_DATA
DEMO_CLINICAL = DEMO_DATA.parent / "clinical"
#: what the demo ingests after the ledger's checkpoint, so that it is logged but not yet provable
DEMO_LATE = DEMO_DATA.parent / "late"
#: what the web app's client may be granted (docs/ui.md): user/Person.u only in a steward's sign-in
DEMO_UI_SCOPES = "openid fhirUser user/*.rs user/Person.u"
#: the checkpoint cadence of the demo's ledger after the late entry: it is pending for that long
DEMO_LATE_INTERVAL_MS = 10 * 60 * 1000
MARKER = ".fhirbridge-demo"
#: st-mary's clinicians may break the glass in the demo (docs/consent.md); nobody may by default
BREAK_GLASS_ORGS = "st-mary"


def _env(data_dir: Path, bootstrap: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FHIRBRIDGE_DATA_DIR": str(data_dir),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "FHIRBRIDGE_HTTP_PORT": str(port),
            "FHIRBRIDGE_LOG_FORMAT": "json",
            "FHIRBRIDGE_CHECKPOINT_INTERVAL_MS": "500",
            "FHIRBRIDGE_BREAK_GLASS_ORGANIZATIONS": BREAK_GLASS_ORGS,
        }
    )
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge.cli", *args]


def _get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class DemoFailed(FhirbridgeError):
    """The demo could not bring the stack up (a process exited, a wait timed out, a directory refused)."""


def prepare_data_dir(data_dir: Path, *, fresh: bool) -> bool:
    """Make ``data_dir`` the demo's; returns True when it holds a previous run's data to reuse.

    Raises :class:`DemoFailed` for a non-empty directory without the demo's marker (the demo may
    not delete, nor mix its files with, what it did not create), for a file in its place, and when
    a demo still runs there.
    """
    from bridge.stream.broker import running_local

    if data_dir.exists() and not data_dir.is_dir():
        raise DemoFailed(f"{data_dir} exists and is not a directory")
    marked = (data_dir / MARKER).is_file()
    if data_dir.is_dir() and any(data_dir.iterdir()) and not marked:
        raise DemoFailed(
            f"{data_dir} is not empty and was not created by the demo; the demo will neither use nor delete "
            "it: give --data-dir a new or empty directory"
        )
    if marked and running_local(data_dir) is not None:
        raise DemoFailed(f"a demo is already running with the data in {data_dir} (stop it first)")
    if marked and fresh:
        shutil.rmtree(data_dir)
        marked = False
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MARKER).write_text(
        "This directory belongs to `fhirbridge demo`; `fhirbridge demo --fresh` clears it.\n"
    )
    return marked and (data_dir / "index.db").exists()


def environment_lines(data_dir: Path, port: int | None = None, patient: str | None = None) -> list[str]:
    """The environment under which the other commands work on the demo's data and broker (and, for the
    README's examples, its service's URL as ``BASE`` and the shared patient as ``PATIENT``)."""
    line = f"export FHIRBRIDGE_DATA_DIR={data_dir} FHIRBRIDGE_BREAK_GLASS_ORGANIZATIONS={BREAK_GLASS_ORGS}"
    if port is not None:
        line += f" FHIRBRIDGE_HTTP_PORT={port} BASE=http://127.0.0.1:{port}"
    if patient is not None:
        line += f" PATIENT={patient}"
    return [line]


def _wait(predicate: Any, timeout: float, what: str, children: list[Any] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise DemoFailed(
                    f"{child.args[3]} exited with code {child.returncode} while waiting for {what}"
                )
        try:
            if predicate():
                return
        except Exception:  # not ready yet
            pass
        time.sleep(0.3)
    raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")


def run_demo(
    data_dir: Path,
    port: int,
    *,
    data: Path = DEMO_DATA,
    clinical: Path = DEMO_CLINICAL,
    late: Path = DEMO_LATE,
    exit_when_ready: bool = False,
    fresh: bool = False,
) -> int:
    from bridge.config import Settings
    from bridge.stores.index.store import IndexStore
    from bridge.stream.broker import free_port, start_local
    from ledger.note import generate_key

    try:
        reuse = prepare_data_dir(data_dir, fresh=fresh)
    except DemoFailed as exc:
        print(f"fhirbridge demo: {exc}", file=sys.stderr)
        return 1
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    port = port or free_port()
    if reuse:
        print(
            f"fhirbridge demo: reusing the data kept in {data_dir} (`--fresh`, or `make demo FRESH=1`, starts over)"
        )
    else:
        print(f"fhirbridge demo: data in {data_dir} (kept after Ctrl-C; the next run reuses it)")
    broker = start_local("noida", data_dir)
    print(f"  broker      noida-db at {broker.bootstrap} (pid {broker.pid})")
    env = _env(data_dir, broker.bootstrap, port)
    settings = Settings.from_env(env)
    children: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        children.append(
            subprocess.Popen(
                _cli(*args),
                env={**env, **(extra_env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        out.close()
        print(f"  {name:<11} pid {children[-1].pid}, log {logs / (name + '.log')}")
        return children[-1]

    def stop_all(*_: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        broker.stop()

    try:
        orgs = sorted(p.name for p in data.iterdir() if p.is_dir())
        from bridge.stream.producer import signing_key_path

        # the hospitals' keys, and the service's own organisation's (its API writes: Consents)
        for org in [*orgs, settings.auth.organization]:
            if not signing_key_path(
                settings, org
            ).exists():  # a kept key stays: its bundles are signed with it
                subprocess.run(
                    _cli("keys", "create", "--org", org), env=env, check=True, stdout=subprocess.DEVNULL
                )
        assert settings.ledger.key_file is not None
        if not settings.ledger.key_file.exists():  # a new key would orphan the kept checkpoints
            skey, vkey = generate_key(settings.ledger.origin)
            fd = os.open(settings.ledger.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(skey + "\n")
            settings.ledger.key_file.with_suffix(".pub").write_text(vkey + "\n")
        assert settings.audit.key_file is not None
        if not settings.audit.key_file.exists():  # the audit log's key, kept like the ledger's
            subprocess.run(_cli("audit", "keygen"), env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(_cli("topics", "create"), env=env, check=True, stdout=subprocess.DEVNULL)
        ledger_proc = spawn("ledger", "ledger", "run")
        spawn("audit", "audit", "run")
        spawn("index", "index", "run")
        spawn("serve", "serve")
        base = f"http://127.0.0.1:{port}"
        _wait(
            lambda: _get_json(f"{base}/metadata")["resourceType"] == "CapabilityStatement",
            30,
            "the HTTP service",
            children,
        )
        expected = _count_messages(data) + _count_messages(clinical)
        late_count = _count_messages(late)
        index = IndexStore.open(settings.stores.index_url)
        stored = index.counts()["bundles"]
        index.close()
        if stored < expected:  # a first run, or one stopped before it had everything
            for org in orgs:
                _ingest(env, org, sorted((data / org).glob("*.hl7")) + sorted((clinical / org).glob("*.hl7")))
        index = IndexStore.open(settings.stores.index_url)
        ledger = open_ledger(settings.ledger.url, origin=settings.ledger.origin)
        _wait(
            lambda: index.counts()["bundles"] >= expected and ledger.size() >= expected,
            120,
            f"{expected} bundles in the index and the ledger",
            children,
        )
        pending = None
        late_marker = data_dir / "late-ingested"
        if not late_marker.exists():
            _wait(
                lambda: _checkpoint_size(ledger) >= expected,
                30,
                f"a signed checkpoint over the first {expected} entries",
                children,
            )
            # From here on the demo's ledger signs a checkpoint every DEMO_LATE_INTERVAL_MS (as a log
            # with a slow cadence does), so the late entry below stays pending, visibly, for that long
            ledger_proc.send_signal(signal.SIGTERM)
            try:
                ledger_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                ledger_proc.kill()
                ledger_proc.wait()
            children.remove(ledger_proc)
            spawn(
                "ledger",
                "ledger",
                "run",
                extra_env={"FHIRBRIDGE_CHECKPOINT_INTERVAL_MS": str(DEMO_LATE_INTERVAL_MS)},
            )
            before = index.counts()["bundles"], ledger.size()
            for org in sorted(p.name for p in late.iterdir() if p.is_dir()):
                _ingest(env, org, sorted((late / org).glob("*.hl7")))
            _wait(
                lambda: (
                    index.counts()["bundles"] >= before[0] + late_count
                    and ledger.size() >= before[1] + late_count
                ),
                60,
                f"the {late_count} late bundle(s) in the index and the ledger",
                children,
            )
            pending = ledger.size() - _checkpoint_size(ledger)
            late_marker.write_text("deploy/demo/late was ingested after the ledger's checkpoint\n")
        shared = _shared_patient(index)
        index.close()
        ledger.close()
        person_id = None
        if shared:
            from bridge.stores.mpi import PersonIndex

            mpi = PersonIndex.open(settings.stores.mpi_url)
            holder: dict[str, str | None] = {}

            def linked() -> bool:
                holder["person"] = mpi.person_id(shared[0])
                return holder["person"] is not None

            _wait(linked, 60, "the master patient index", children)
            person_id = holder["person"]
            mpi.close()
        logins, token_command, token = _demo_identities(
            settings, env, data_dir, shared[0] if shared else None
        )
        print(
            f"\nReady: {expected + late_count} HL7 v2 messages (ADT, ORU, RDE, VXU, MDM) from {len(orgs)} hospitals "
            "are logged and queryable.\n"
        )
        print(f"App  {base}/app/")
        print(
            "Demo logins (role, user, password; also in " + str(data_dir / "auth" / "demo-logins.txt") + "):"
        )
        for role, user, password in logins:
            print(f"  {role}  {user}  {password}")
        print()
        print(f"  Home                 {base}/")
        print(f"  Capability statement {base}/metadata")
        print(f"  Signed checkpoint    {base}/ledger/checkpoint")
        print(f"  OpenAPI              {base}/openapi.json")
        if shared:
            pid, system, value = shared
            print(f"  Merged history       {base}/Patient/{pid}/$everything")
            print(f"  With ledger proofs   {base}/Patient/{pid}/$everything?_proof=true")
            print(f"  Same SSN, all sites  {base}/Patient?identifier={system}|{value}")
            print(f"  Person (MPI)         {base}/Person/{person_id}")
            print(f"  MPI review queue     {base}/Person/$mpi-review-queue")
            print(
                "\nA clinician's view of the shared patient (deploy/demo/clinical, tests/support/democlinical.py):"
            )
            print(
                f"  Lab results          {base}/Patient/{pid}/$everything?_type=Observation   (ranges, H/L flags)"
            )
            print(
                "  Sent by both sites   the glucose of 2026-03-09: one entry with two sources (_proof=true)"
            )
            print(
                "  Disagreement         the creatinine of 2026-03-09: 1.4 mg/dL at st-mary, 1.2 mg/dL at riverside"
            )
            print(
                f"  Allergies            {base}/Patient/{pid}/$everything?_type=AllergyIntolerance   (penicillin: high)"
            )
            if pending:
                print(
                    f"  Not yet provable     {pending} entry logged after the latest checkpoint (st-mary's potassium of "
                    "2026-04-20, ingested late; the demo's ledger now signs every 10 minutes, so it is pending "
                    "until the next checkpoint)"
                )
            print(
                "  Possible match       a riverside registration with a name typo (WHTIE) waits in the review queue"
            )
        print(
            "\nEvery route but /metadata, /.well-known/* and the ledger's reads needs an access token (SMART):"
        )
        print(f"  A token (5 minutes)  {token_command}")
        if shared:
            print(
                f"  Try it               curl -H 'Authorization: Bearer {token}' '{base}/Patient/{shared[0]}/$everything'"
            )
            print(
                f"  Search               curl -H 'Authorization: Bearer {token}' "
                f"'{base}/Encounter?patient={shared[0]}&_sort=-date&_count=5'"
            )
            print(
                f"  Bulk export          curl -i -H 'Authorization: Bearer {token}' -H 'Prefer: respond-async' "
                f"'{base}/$export?_type=Patient,Encounter'   (then GET the Content-Location it answers)"
            )
        print(f"  Sign-in (SMART apps) {base}/auth/authorize   (the demo logins above)")
        print(f"  SMART configuration  {base}/.well-known/smart-configuration")
        if shared:
            consent = _demo_consent(settings, base, data_dir)
            login = (
                f"fhirbridge auth login --client {DEMO_APP} --redirect-uri {DEMO_REDIRECT} --user clinician "
                "--scope 'user/*.rs' --purpose ETREAT"
            )
            print(f"\nConsent: {consent}")
            print(
                "  The clinician's token (password in .demo/auth/demo-logins.txt, via FHIRBRIDGE_AUTH_PASSWORD):"
            )
            print(f"    TOKEN=$({login})")
            print(
                f"  Withheld in part     curl -s -H \"Authorization: Bearer $TOKEN\" '{base}/Patient/{shared[0]}/$everything'"
            )
            print(
                f'  Break the glass      curl -s -H "Authorization: Bearer $TOKEN" -H \'X-Break-Glass-Reason: '
                f"unconscious in the ED' '{base}/Patient/{shared[0]}/$everything'"
            )
            print(
                f"  Who has seen it      as the patient: fhirbridge auth login --client {DEMO_APP} --redirect-uri "
                f"{DEMO_REDIRECT} --user patient --scope 'patient/*.rs launch/patient', then "
                f"'{base}/Patient/{shared[0]}/$access-log'"
            )
        env_file = data_dir / "env"
        env_lines = environment_lines(data_dir, port, shared[0] if shared else None)
        env_file.write_text("\n".join(env_lines) + "\n")
        print(
            f"\nThe other commands (`fhirbridge ledger verify`, `replay`, `ingest`, ...) work on this demo's data and "
            f"broker in a shell with\n  {chr(10).join(env_lines)}\n(also in {env_file}: `. {env_file}`)"
        )
        if exit_when_ready:
            return 0
        print("\nPress Ctrl-C to stop.")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(c.poll() is None for c in children):
            time.sleep(1)
        print("a demo process exited; see the logs above", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (DemoFailed, subprocess.CalledProcessError) as exc:
        print(f"fhirbridge demo: failed: {exc}", file=sys.stderr)
        for log_file in sorted(logs.glob("*.log")):
            tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
            if tail:
                print(f"--- last lines of {log_file}", *tail, sep="\n", file=sys.stderr)
        return 1
    finally:
        stop_all()


#: the demo's users of the sign-in form: (id, kind, extra arguments)
DEMO_USERS = (
    ("clinician", "clinician", ("--organization", "st-mary", "--fhir-user", "Practitioner/demo-clinician")),
    ("steward", "steward", ()),
    ("patient", "patient", ()),
)
DEMO_CLIENT = "demo-backend"
#: the demo's public SMART app (authorization code with PKCE); nothing listens at its redirect URI:
#: `fhirbridge auth login` reads the redirect instead of following it
DEMO_APP = "demo-app"
DEMO_REDIRECT = "http://127.0.0.1/callback"
DEMO_APP_SCOPES = "openid fhirUser launch/patient patient/*.rs user/*.rs user/Consent.cru"
DEMO_CONSENT = (
    Path(__file__).resolve().parents[2]
    / "deploy"
    / "demo"
    / "consents"
    / "riverside-withholds-from-st-mary.json"
)


def _demo_identities(
    settings: Any, env: dict[str, str], data_dir: Path, patient: str | None
) -> tuple[list[tuple[str, str, str]], str, str]:
    """Demo users (their passwords kept in ``<data>/auth/demo-logins.txt``, mode 0600), a backend-services
    client with its key, and a token of that client from the running service: the logins to print
    (role, user, password), the command that gets a token, and a token."""
    import secrets

    from bridge.stores.auth import AuthClient, AuthStore

    auth_dir = data_dir / "auth"
    auth_dir.mkdir(exist_ok=True)
    logins_file = auth_dir / "demo-logins.txt"
    if logins_file.exists():
        logins = dict(line.split(" ", 1) for line in logins_file.read_text().splitlines() if " " in line)
    else:
        logins = {uid: secrets.token_urlsafe(9) for uid, _, _ in DEMO_USERS}
        fd = os.open(logins_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{uid} {pw}\n" for uid, pw in logins.items()))
    store = AuthStore.open(settings.auth.url)
    try:
        missing_users = [u for u in DEMO_USERS if store.user(u[0]) is None]
        has_client = store.client(DEMO_CLIENT) is not None
    finally:
        store.close()
    for uid, kind, extra in missing_users:
        if kind == "patient" and patient is None:
            continue
        args = ("--patient", patient) if kind == "patient" and patient else extra
        subprocess.run(
            _cli("auth", "users", "add", "--id", uid, "--kind", kind, *args),
            env={**env, "FHIRBRIDGE_AUTH_PASSWORD": logins[uid]},
            check=True,
            stdout=subprocess.DEVNULL,
        )
    key_file = auth_dir / f"{DEMO_CLIENT}.jwk"
    if not key_file.exists():
        subprocess.run(
            _cli("auth", "keygen", "--name", DEMO_CLIENT, "--out", str(auth_dir)),
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    store = AuthStore.open(settings.auth.url)
    try:
        has_app = store.client(DEMO_APP) is not None
        # the web app's client (docs/ui.md), its redirect URI on this run's port
        ui = AuthClient(
            settings.ui.client_id,
            "public",
            tuple(DEMO_UI_SCOPES.split()),
            (f"{settings.http.fhir_base()}/app/callback",),
        )
        if store.client(ui.client_id) != ui:
            if store.client(ui.client_id) is not None:
                store.remove_client(ui.client_id)
            store.add_client(ui)
    finally:
        store.close()
    if not has_app:
        subprocess.run(
            _cli(
                "auth",
                "clients",
                "add",
                "--id",
                DEMO_APP,
                "--public",
                "--redirect-uri",
                DEMO_REDIRECT,
                "--scope",
                DEMO_APP_SCOPES,
            ),
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if not has_client:
        subprocess.run(
            _cli(
                "auth",
                "clients",
                "add",
                "--id",
                DEMO_CLIENT,
                "--jwks-file",
                str(auth_dir / f"{DEMO_CLIENT}.jwks.json"),
                "--scope",
                "system/*.rs",
            ),
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    argv = (
        "auth",
        "token",
        "--client",
        DEMO_CLIENT,
        "--key-file",
        str(key_file),
        "--scope",
        "system/*.rs",
        "--purpose",
        "TREAT",
    )
    token = subprocess.run(_cli(*argv), env=env, check=True, capture_output=True, text=True).stdout.strip()
    shown = [(kind, uid, logins[uid]) for uid, kind, _ in DEMO_USERS if kind != "patient" or patient]
    command = (
        f"FHIRBRIDGE_DATA_DIR={data_dir} FHIRBRIDGE_HTTP_PORT={env['FHIRBRIDGE_HTTP_PORT']} fhirbridge auth token "
        f"--client {DEMO_CLIENT} --key-file {key_file} --scope 'system/*.rs' --purpose TREAT"
    )
    return shown, command, token


def _demo_consent(settings: Any, base: str, data_dir: Path) -> str:
    """Write the demo's Consent through the API, as riverside's registrar (the demo steward) would: the
    file names the patient by SSN; the registrar finds riverside's record of them. Returns what it did."""
    import orjson

    from bridge.service.auth.client import sign_in
    from bridge.stores.index.store import IndexStore

    consent = orjson.loads(DEMO_CONSENT.read_bytes())
    ident = consent["patient"]["identifier"]
    index = IndexStore.open(settings.stores.index_url)
    try:
        record = next(
            (
                pid
                for pid in index.patients_by_identifier(ident["system"], ident["value"])
                if ((index.get("Patient", pid) or {}).get("meta") or {}).get("source")
                == "urn:fhirbridge:riverside"
            ),
            None,
        )
        kept = index.get("Consent", consent["id"]) is not None
    finally:
        index.close()
    if record is None:
        return "none written (riverside has no record of the demo patient)"
    what = f"riverside withholds its record Patient/{record} from st-mary ({DEMO_CONSENT.name})"
    if kept:
        return what + ", kept from the previous run"
    consent["patient"] = {"reference": f"Patient/{record}"}
    logins = dict(
        line.split(" ", 1)
        for line in (data_dir / "auth" / "demo-logins.txt").read_text().splitlines()
        if " " in line
    )
    token = sign_in(
        base, DEMO_APP, DEMO_REDIRECT, "steward", logins["steward"], "user/Consent.cru user/Patient.rs"
    )
    request = urllib.request.Request(
        f"{base}/Consent/{consent['id']}",
        data=orjson.dumps(consent),
        method="PUT",
        headers={"Authorization": f"Bearer {token['access_token']}", "Content-Type": "application/fhir+json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        if resp.status not in (200, 201):
            raise DemoFailed(f"the demo Consent was refused (HTTP {resp.status})")
    return what


def _count_messages(data: Path) -> int:
    return sum(p.read_bytes().count(b"MSH|") for p in data.rglob("*.hl7"))


def _ingest(env: dict[str, str], org: str, files: list[Path]) -> None:
    print(f"  ingest      {org}: {len(files)} files")
    subprocess.run(
        _cli(
            "ingest", "--adapter", "hl7v2", "--source", org, "--timezone", "America/Chicago", *map(str, files)
        ),
        env=env,
        check=True,
    )


def _checkpoint_size(ledger: Any) -> int:
    """The size of the ledger's latest signed checkpoint (0 before the first): its note's second line."""
    note = ledger.latest_checkpoint()
    return int(note.split("\n")[1]) if note else 0


def _shared_patient(index: Any) -> tuple[str, str, str] | None:
    """A patient whose SSN appears at more than one hospital."""
    rows = index.db.query(
        """SELECT a.patient_id, a.system, a.value FROM patient_identifiers a
           JOIN patient_identifiers b ON a.system = b.system AND a.value = b.value AND a.patient_id < b.patient_id
           WHERE a.system LIKE '%ssn%' ORDER BY a.value LIMIT 1"""
    )
    return (rows[0][0], rows[0][1], rows[0][2]) if rows else None


def register(sub: Any, groups: dict[str, Any]) -> None:
    p = sub.add_parser("demo", help="run the whole stack locally with the shipped demo data")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".demo"),
        help="the demo's own directory: created if missing, reused if the demo made it (default .demo)",
    )
    p.add_argument(
        "--fresh", action="store_true", help="clear the data a previous demo run kept in --data-dir"
    )
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--exit-when-ready", action="store_true", help="stop everything once the data is queryable"
    )
    p.set_defaults(
        func=lambda a: run_demo(
            a.data_dir.resolve(), a.port, exit_when_ready=a.exit_when_ready, fresh=a.fresh
        )
    )
