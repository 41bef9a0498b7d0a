"""A real fhirbridge stack for the client interop tests, started as subprocesses and stopped by PID.

What ``fhirbridge demo`` runs, with data of our own: the embedded broker (noida-db), the ledger and
index consumers and ``fhirbridge serve``, each started with the CLI in its own process group; the
hospitals' envelope keys and the ledger key made with the CLI; data published with ``fhirbridge
ingest`` (the real path: adapter, signed envelope, Kafka, consumers). The tokens come from the embedded
authorization server the way a client gets them: ``fhirbridge auth token`` (SMART Backend Services, a
registered client key, ``system/*.rs`` with a purpose of use) and ``fhirbridge auth login`` (a patient
signing in to a public SMART app with PKCE).

:meth:`ClientStack.ingest` publishes more messages while the stack runs, and
:meth:`ClientStack.wait_for_bundles` waits until the index and the ledger hold them.
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
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.config import Settings
from bridge.stream.broker import BrokerHandle, free_port, start_local, stop_pid
from tests.clients import labdata
from tests.support import demodata

BACKEND = "clients-backend"
APP = "clients-app"
REDIRECT = "http://127.0.0.1/callback"
PATIENT_USER = "tessa"
SYSTEM_SCOPE = "system/*.rs"
#: v3-ActReason: a system/ token must state why it reads patient data (docs/auth.md)
SYSTEM_PURPOSE = "TREAT"
PATIENT_SCOPE = "patient/*.rs launch/patient"
#: tokens live 300 s; one older than this is replaced before use
TOKEN_REUSE_S = 150
#: one file per running stack: its owner (the test process), its data directory and the PIDs it started
REGISTRY = Path(tempfile.gettempdir()) / f"fhirbridge-clients-{os.getuid()}"


class StackFailed(AssertionError):
    """The stack did not come up, or a command failed; the message carries the logs' last lines."""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge.cli", *args]


class ClientStack:
    """One stack in ``root``: ``base`` is the FHIR base URL, ``patient_id`` the lab patient's id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.broker: BrokerHandle | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.messages = 0  # HL7 v2 messages published so far (one bundle each)
        self.patient_id = ""
        self._password = secrets.token_urlsafe(12)
        self._tokens: dict[str, tuple[float, str]] = {}
        self._batch = 0
        self.env: dict[str, str] = {}
        self.backend_key = self.data_dir / "client-keys" / f"{BACKEND}.jwk"

    # ------------------------------------------------------------------ start and stop

    def start(self) -> None:
        reap_orphans()
        self.data_dir.mkdir(parents=True)
        self.logs.mkdir()
        self.broker = start_local("noida", self.data_dir, log_file=self.logs / "broker.log")
        self._record()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIRBRIDGE_", "KAFKA_"))}
        env.update(
            {
                "FHIRBRIDGE_DATA_DIR": str(self.data_dir),
                "KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap,
                "FHIRBRIDGE_HTTP_PORT": str(self.port),
                "FHIRBRIDGE_LOG_FORMAT": "json",
                "FHIRBRIDGE_CHECKPOINT_INTERVAL_MS": "300",
                "FHIRBRIDGE_LEDGER_KEY_FILE": str(self.data_dir / "fhirbridge.example_ledger.key"),
            }
        )
        self.env = env
        self.run("ledger", "keygen", "--name", "fhirbridge.example/ledger", "--out", str(self.data_dir))
        for hospital in demodata.HOSPITALS[:2]:
            self.run("keys", "create", "--org", hospital.org_id)
        self.run("topics", "create")
        for name, args in (
            ("ledger", ("ledger", "run")),
            ("index", ("index", "run")),
            ("serve", ("serve",)),
        ):
            self._spawn(name, *args)
        self._wait(lambda: self.get("/metadata")["resourceType"] == "CapabilityStatement", 60, "serve")
        self._register_clients()
        population = demodata.generate(24, hospitals=2, seed=23)
        for org, messages in population.items():
            self.ingest(org, messages)
        self.ingest(labdata.PATIENT.hospital.org_id, [labdata.adt_registration()])
        self.ingest(labdata.PATIENT.hospital.org_id, labdata.lab_messages(labdata.INITIAL, first_control=1))
        self.wait_for_bundles()
        self.patient_id = self._find_patient()
        self._add_patient_user()

    def stop(self) -> None:
        """Stop every process this stack started, by the PID it started (each leads its own group)."""
        for child in self.children.values():
            if child.poll() is None:
                stop_pid(child.pid, timeout=10)
        if self.broker is not None:
            self.broker.stop()
        self._registry_file.unlink(missing_ok=True)

    @property
    def _registry_file(self) -> Path:
        return REGISTRY / f"{os.getpid()}-{self.port}.json"

    def _record(self) -> None:
        """Note the PIDs this stack started, so that a run killed before :meth:`stop` is cleaned up by
        the next one (:func:`reap_orphans`)."""
        REGISTRY.mkdir(mode=0o700, exist_ok=True)
        pids = [c.pid for c in self.children.values()] + (
            [self.broker.pid] if self.broker and self.broker.pid else []
        )
        document = {"owner": os.getpid(), "data_dir": str(self.data_dir), "pids": pids}
        tmp = self._registry_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(document))
        os.replace(tmp, self._registry_file)

    def _spawn(self, name: str, *args: str) -> None:
        with open(self.logs / f"{name}.log", "ab") as out:
            self.children[name] = subprocess.Popen(
                _cli(*args),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._record()

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def check_alive(self) -> None:
        for name, child in self.children.items():
            if child.poll() is not None:
                raise StackFailed(f"{name} exited with {child.returncode}\n{self.log_tails()}")

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if predicate():
                    return
            except Exception as exc:  # not ready yet
                last = exc
            time.sleep(0.2)
        raise StackFailed(f"timed out after {timeout:.0f}s waiting for {what} ({last!r})\n{self.log_tails()}")

    # ------------------------------------------------------------------ the CLI

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
        done = subprocess.run(
            _cli(*args),
            env={**self.env, **(env or {})},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise StackFailed(
                f"fhirbridge {' '.join(args[:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def ingest(self, org: str, messages: list[str]) -> None:
        """Publish HL7 v2 ``messages`` from ``org`` with ``fhirbridge ingest`` (returns once the broker has
        them; :meth:`wait_for_bundles` waits for the consumers)."""
        self._batch += 1
        path = self.root / "feeds" / org / f"batch-{self._batch:04d}.hl7"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(messages) + "\n", encoding="utf-8")
        self.run("ingest", "--adapter", "hl7v2", "--source", org, "--timezone", "America/Chicago", str(path))
        self.messages += len(messages)

    def index_bundles(self) -> int:
        from bridge.stores.index.store import IndexStore

        index = IndexStore.open(self.settings.stores.index_url)
        try:
            return index.counts()["bundles"]
        finally:
            index.close()

    def ledger_size(self) -> int:
        from bridge.stores.ledger import open_ledger

        ledger = open_ledger(self.settings.ledger.url, origin=self.settings.ledger.origin)
        try:
            return ledger.size()
        finally:
            ledger.close()

    def wait_for_bundles(self, timeout: float = 120) -> None:
        """Wait until every message published so far is a bundle in the index and a leaf in the ledger."""
        want = self.messages
        self._wait(
            lambda: self.index_bundles() >= want and self.ledger_size() >= want,
            timeout,
            f"{want} bundles in the index and the ledger",
        )

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    # ------------------------------------------------------------------ identities and tokens

    def _register_clients(self) -> None:
        keys = self.data_dir / "client-keys"
        keys.mkdir()
        self.run("auth", "keygen", "--name", BACKEND, "--out", str(keys))
        self.run(
            "auth",
            "clients",
            "add",
            "--id",
            BACKEND,
            "--jwks-file",
            str(keys / f"{BACKEND}.jwks.json"),
            "--scope",
            SYSTEM_SCOPE,
        )
        self.run(
            "auth",
            "clients",
            "add",
            "--id",
            APP,
            "--public",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            f"openid fhirUser {PATIENT_SCOPE}",
        )

    def _find_patient(self) -> str:
        p = labdata.PATIENT
        found = self.get(f"/Patient?identifier={labdata.SSN_SYSTEM}|{p.ssn}", token=self.system_token())
        ids = [e["resource"]["id"] for e in found.get("entry", []) if e["search"]["mode"] == "match"]
        if len(ids) != 1:
            raise StackFailed(f"expected one Patient with the lab patient's SSN, got {ids}")
        return str(ids[0])

    def _add_patient_user(self) -> None:
        self.run(
            "auth",
            "users",
            "add",
            "--id",
            PATIENT_USER,
            "--kind",
            "patient",
            "--patient",
            self.patient_id,
            env={"FHIRBRIDGE_AUTH_PASSWORD": self._password},
        )

    def _token(self, kind: str, mint: Callable[[], str]) -> str:
        cached = self._tokens.get(kind)
        if cached is None or time.monotonic() - cached[0] > TOKEN_REUSE_S:
            cached = (time.monotonic(), mint())
            self._tokens[kind] = cached
        return cached[1]

    def system_token(self) -> str:
        """A SMART Backend Services token (client credentials, ``system/*.rs``, purpose TREAT)."""
        return self._token(
            "system",
            lambda: self.run(
                "auth",
                "token",
                "--client",
                BACKEND,
                "--key-file",
                str(self.backend_key),
                "--scope",
                SYSTEM_SCOPE,
                "--purpose",
                SYSTEM_PURPOSE,
            ).strip(),
        )

    def patient_token(self) -> str:
        """The lab patient's token from signing in to the public SMART app (code flow with PKCE)."""
        return self._token(
            "patient",
            lambda: self.run(
                "auth",
                "login",
                "--client",
                APP,
                "--redirect-uri",
                REDIRECT,
                "--user",
                PATIENT_USER,
                "--scope",
                PATIENT_SCOPE,
                env={"FHIRBRIDGE_AUTH_PASSWORD": self._password},
            ).strip(),
        )

    # ------------------------------------------------------------------ HTTP

    def url(self, path_or_url: str) -> str:
        return path_or_url if path_or_url.startswith("http") else self.base + path_or_url

    def get(self, path_or_url: str, *, token: str | None = None, **headers: str) -> Any:
        """GET JSON; an HTTP error raises with the status and body (up to 2 000 characters)."""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url(path_or_url), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:2000]
            raise AssertionError(f"GET {path_or_url} -> HTTP {exc.code}: {body}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _started_for(pid: int, data_dir: str) -> bool:
    """Whether ``pid`` is still a process of the stack in ``data_dir`` (not a reused PID): its
    environment or command line names the directory."""
    for part in ("environ", "cmdline"):
        with contextlib.suppress(OSError):
            if data_dir.encode() in Path(f"/proc/{pid}/{part}").read_bytes():
                return True
    return False


def reap_orphans() -> list[int]:
    """Stop the processes of stacks whose test run died without stopping them; returns their PIDs."""
    stopped: list[int] = []
    for entry in REGISTRY.glob("*.json"):
        try:
            document = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(document.get("owner", 0))):
            continue
        for pid in document.get("pids", []):
            if _alive(pid) and _started_for(pid, document["data_dir"]):
                stop_pid(pid, timeout=5)
                stopped.append(pid)
        entry.unlink(missing_ok=True)
    return stopped
