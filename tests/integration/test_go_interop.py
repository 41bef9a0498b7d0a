"""The ledger checked by code we did not write.

* ``tests/go/ledgerverify`` (Go: golang.org/x/mod/sumdb/note, transparency-dev/formats and merkle) verifies
  what ``fhirbridge serve`` serves: the checkpoint signature, every leaf hash recomputed from the entry,
  the inclusion and consistency proofs, and the witnesses' cosignatures; it fails on a wrong key, a
  rewritten log and a tampered entry.
* litewitness (filippo.io/torchwood, pinned in ``tests/go/witness/go.mod``), a C2SP tlog-witness written by
  others, cosigns our checkpoints through :mod:`ledger.tlogwitness`, and the Go verifier requires its
  cosignature.

Go builds both programs (once per session, into a temporary directory). Without Go, or without OpenSSH's
ssh-agent for litewitness, the tests are skipped, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.stores.ledger import open_ledger
from bridge.stream.broker import free_port
from ledger.log import Ledger, LedgerEntry
from ledger.note import ALG_COSIGNATURE_V1, generate_key, key_id
from ledger.tlogwitness import CheckpointCosigner, TlogWitnessClient

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GO_DIR = ROOT / "tests" / "go"
ORIGIN = "fhirbridge.test/go-interop"
WITNESS_NAME = "witness.test/litewitness"


def _tool(name: str, fallback: str | None = None) -> str:
    found = shutil.which(name) or (fallback if fallback and Path(fallback).is_file() else None)
    if found is None:
        message = f"{name} is not installed (needed to build and run the third-party verifier and witness)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must have it")
        pytest.skip(message)
    return found


def _go_build(go: str, module: Path, out: Path, *packages: str) -> None:
    env = {
        **os.environ,
        "GOFLAGS": "-buildvcs=false -mod=readonly",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    proc = subprocess.run(
        [go, "build", "-o", str(out) + os.sep, *packages],
        cwd=module,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"go build in {module} failed:\n{proc.stderr[-4000:]}"


@dataclass(frozen=True)
class GoTools:
    ledgerverify: str
    litewitness: str
    witnessctl: str


@pytest.fixture(scope="module")
def go_tools(tmp_path_factory: pytest.TempPathFactory) -> GoTools:
    go = _tool("go", "/usr/local/go/bin/go")
    out = tmp_path_factory.mktemp("gobin")
    _go_build(go, GO_DIR / "ledgerverify", out, ".")
    _go_build(
        go,
        GO_DIR / "witness",
        out,
        "filippo.io/torchwood/cmd/litewitness",
        "filippo.io/torchwood/cmd/witnessctl",
    )
    return GoTools(str(out / "ledgerverify"), str(out / "litewitness"), str(out / "witnessctl"))


def _entry(i: int, org: str = "org-a", tag: str = "") -> LedgerEntry:
    return LedgerEntry(
        bundle_sha256=hashlib.sha256(f"bundle-{tag}{i}".encode()).hexdigest(),
        source_org=org,
        adapter="hl7v2",
        adapter_version="1.0.0",
        topic="fhir.bundles",
        partition=i % 3,
        offset=i,
        ingested_at="2026-12-07T12:00:00.123Z",
        # message ids that need escaping in canonical JSON: the Go verifier recomputes them byte for byte
        message_id=None if i % 5 == 0 else f'msg-{i} "é\\\t\u2028<&>\u007f',
    )


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIRBRIDGE_", "KAFKA_"))}
    env.update(extra)
    return env


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            pass
        assert proc.poll() is None, f"{what} exited with status {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def _serve(data_dir: Path, **env: str) -> Iterator[str]:
    """``fhirbridge serve`` over the ledger in ``data_dir``; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "serve"],
        env=_clean_env(
            FHIRBRIDGE_DATA_DIR=str(data_dir),
            FHIRBRIDGE_HTTP_PORT=str(port),
            FHIRBRIDGE_LEDGER_ORIGIN=ORIGIN,
            **env,
        ),
        cwd=data_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/ledger/checkpoint", proc, "fhirbridge serve")
        yield base
    finally:
        _stop(proc)


def _verify(tools: GoTools, base: str, log_key: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tools.ledgerverify, "-url", base, "-log-key", log_key, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _new_ledger(data_dir: Path, witness_keys: list[str] | None = None) -> tuple[Ledger, str]:
    """A signing ledger at ``data_dir/ledger.db`` (the key in ``ledger.key``/``.pub``); returns it and its
    verifier key."""
    signer, verifier = generate_key(ORIGIN)
    (data_dir / "ledger.key").write_text(signer + "\n")
    (data_dir / "ledger.pub").write_text(verifier + "\n")
    led = open_ledger(
        f"sqlite://{data_dir / 'ledger.db'}",
        origin=ORIGIN,
        signer_key=signer,
        checkpoint_every=10,
        checkpoint_interval_ms=3_600_000,
        witness_keys=witness_keys or [],
    )
    return led, verifier


def test_go_verifier_accepts_the_served_ledger_and_rejects_tampering(
    go_tools: GoTools, tmp_path: Path
) -> None:
    led, log_key = _new_ledger(tmp_path)
    try:
        for start in range(0, 37, 6):  # several batches, a checkpoint every 10 entries
            led.append([_entry(i) for i in range(start, min(start + 6, 37))])
        led.checkpoint_now()
        assert led.size() == 37

        with _serve(tmp_path) as base:
            saved = tmp_path / "seen-checkpoint.txt"
            ok = _verify(go_tools, base, log_key, "-save-checkpoint", str(saved))
            assert ok.returncode == 0, ok.stdout + ok.stderr
            assert "37 leaf hashes recomputed from the entries, 37 inclusion proofs OK" in ok.stdout
            assert "root: recomputed from all 37 entries, matches the checkpoint" in ok.stdout
            assert ok.stdout.rstrip().endswith("OK")
            assert saved.read_text().startswith(f"{ORIGIN}\n37\n")

            # a sample of leaves, and the key given through the environment
            sampled = subprocess.run(
                [go_tools.ledgerverify, "-leaves", "5"],
                env={**os.environ, "LEDGERVERIFY_URL": base, "LEDGERVERIFY_LOG_KEY": log_key},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sampled.returncode == 0, sampled.stdout + sampled.stderr
            assert "5 leaf hashes recomputed" in sampled.stdout

            # another key of the same name did not sign this log
            _other_signer, other_key = generate_key(ORIGIN)
            wrong = _verify(go_tools, base, other_key)
            assert wrong.returncode == 1
            assert "FAILED: checkpoint: failed to verify signatures" in wrong.stderr

            # the log is rewritten and re-signed with its own key: self-consistent, so only a verifier
            # that kept the old checkpoint can tell
            led.reset()
            led.append([_entry(i, tag="rewritten-") for i in range(40)])
            led.checkpoint_now()
            fresh = _verify(go_tools, base, log_key, "-leaves", "3")
            assert fresh.returncode == 0, fresh.stdout + fresh.stderr
            forked = _verify(go_tools, base, log_key, "-leaves", "3", "-old-checkpoint", str(saved))
            assert forked.returncode == 1, forked.stdout + forked.stderr
            assert "not consistent with the old one" in forked.stderr

            # an entry changed in the database after it was logged
            with sqlite3.connect(tmp_path / "ledger.db") as db:
                db.execute(
                    "UPDATE ledger_entries SET entry = CAST(replace(CAST(entry AS TEXT), 'org-a', 'org-b') AS BLOB)"
                    " WHERE idx = 7"
                )
            tampered = _verify(go_tools, base, log_key)
            assert tampered.returncode == 1, tampered.stdout + tampered.stderr
            assert "FAILED: entry 7: the leaf hash recomputed from the entry" in tampered.stderr

            # the latest checkpoint's root changed in the database: its signature no longer holds
            with sqlite3.connect(tmp_path / "ledger.db") as db:
                ((size, note),) = db.execute(
                    "SELECT size, note FROM ledger_checkpoints ORDER BY size DESC LIMIT 1"
                )
                origin, n, root, rest = note.split("\n", 3)
                forged_root = base64.b64encode(bytes(32)).decode()
                assert root != forged_root
                db.execute(
                    "UPDATE ledger_checkpoints SET note = ? WHERE size = ?",
                    ("\n".join([origin, n, forged_root, rest]), size),
                )
            forged = _verify(go_tools, base, log_key, "-leaves", "1")
            assert forged.returncode == 1, forged.stdout + forged.stderr
            assert "FAILED: checkpoint: failed to verify signatures" in forged.stderr
    finally:
        led.close()


# -- the third-party witness -------------------------------------------------------------------------


@dataclass(frozen=True)
class Litewitness:
    url: str
    verifier_key: str
    db: str


def _ssh_witness_key(pub_line: str, name: str) -> tuple[str, str]:
    """The SSH SHA256 fingerprint and the C2SP cosignature/v1 verifier key of an ssh-ed25519 public key."""
    blob = base64.b64decode(pub_line.split()[1])
    raw = blob[-32:]
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    vkey = f"{name}+{key_id(name, ALG_COSIGNATURE_V1, raw):08x}+{base64.b64encode(bytes([4]) + raw).decode()}"
    return fingerprint, vkey


@contextmanager
def _litewitness(tools: GoTools, log_key: str) -> Iterator[Litewitness]:
    """litewitness on a loopback port, its key in a dedicated ssh-agent, its state in a temporary directory,
    configured (with witnessctl) to witness our log; every process it starts is stopped by PID."""
    ssh_agent, ssh_add, ssh_keygen = _tool("ssh-agent"), _tool("ssh-add"), _tool("ssh-keygen")
    state = Path(tempfile.mkdtemp(prefix="lw-"))  # short: the agent's socket path has a length limit
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(
            [ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", "litewitness", "-f", str(state / "key")],
            check=True,
            timeout=30,
        )
        fingerprint, vkey = _ssh_witness_key((state / "key.pub").read_text(), WITNESS_NAME)
        sock = state / "agent.sock"
        agent = subprocess.Popen(
            [ssh_agent, "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        procs.append(agent)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.05)
        subprocess.run(
            [ssh_add, "-q", str(state / "key")],
            env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
            check=True,
            capture_output=True,
            timeout=30,
        )
        db = str(state / "litewitness.db")
        for args in (["add-log", "-origin", ORIGIN], ["add-key", "-origin", ORIGIN, "-key", log_key]):
            subprocess.run(
                [tools.witnessctl, args[0], "-db", db, *args[1:]], check=True, capture_output=True, timeout=60
            )
        port = free_port()
        log_file = state / "litewitness.log"
        with open(log_file, "wb") as out:
            witness = subprocess.Popen(
                [
                    tools.litewitness,
                    "-db",
                    db,
                    "-name",
                    WITNESS_NAME,
                    "-ssh-agent",
                    str(sock),
                    "-key",
                    fingerprint,
                    "-listen",
                    f"127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(witness)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_http(url + "/", witness, "litewitness")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{log_file.read_text()[-3000:]}") from None
        # the key litewitness announces is the one derived here from the SSH public key
        assert f"vkey={vkey}" in log_file.read_text()
        yield Litewitness(url, vkey, db)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(state, ignore_errors=True)


def _has_cosignature(led: Ledger, name: str) -> bool:
    note = led.latest_checkpoint()
    return note is not None and f"\n— {name} " in note


def test_litewitness_cosigns_our_checkpoints_and_the_go_verifier_requires_it(
    go_tools: GoTools, tmp_path: Path
) -> None:
    signer, log_key = generate_key(ORIGIN)
    (tmp_path / "ledger.key").write_text(signer + "\n")
    with _litewitness(go_tools, log_key) as lw:
        led = open_ledger(
            f"sqlite://{tmp_path / 'ledger.db'}",
            origin=ORIGIN,
            signer_key=signer,
            checkpoint_every=8,
            checkpoint_interval_ms=3_600_000,
            witness_keys=[lw.verifier_key],
        )
        cosigner = CheckpointCosigner.from_urls(led, [lw.url], [lw.verifier_key], interval=0.2).start()
        try:
            # the writer appends; each append that signs a checkpoint wakes the cosigner, which asks the
            # witness (old 0 first, then old <its size> with a consistency proof)
            for start in range(0, 30, 6):
                led.append([_entry(i) for i in range(start, start + 6)])
                cosigner.notify()
            # checkpoints were signed at sizes 6, 18 and 30 (8 entries or more after the last, per append)
            deadline = time.monotonic() + 30
            while not _has_cosignature(led, WITNESS_NAME):
                assert time.monotonic() < deadline, f"no cosignature stored: {led.latest_checkpoint()}"
                time.sleep(0.1)
            assert [size for size, _root, _note in led.storage.checkpoints()] == [6, 18, 30]
            assert led.storage.latest_checkpoint()[0] == 30  # type: ignore[index]
        finally:
            cosigner.close()

        # a client that does not know the witness's size starts from 0: litewitness answers 409 with its
        # size, and the client sends the proof from there
        led.append([_entry(i) for i in range(30, 41)])
        led.checkpoint_now()
        fresh = TlogWitnessClient(lw.url, [lw.verifier_key])
        size, note = led.storage.latest_checkpoint()  # type: ignore[misc]
        assert size == 41
        lines = fresh.submit(note, led.consistency_proof)
        assert fresh.known_size == 41 and lines[0].startswith(f"— {WITNESS_NAME} ")
        assert led.add_cosignatures(note + "".join(lines)) == 1

        # `fhirbridge ledger cosign` with the settings of a deployment
        led.append([_entry(i) for i in range(41, 50)])
        led.checkpoint_now()
        env = _clean_env(
            FHIRBRIDGE_DATA_DIR=str(tmp_path),
            FHIRBRIDGE_LEDGER_ORIGIN=ORIGIN,
            FHIRBRIDGE_LEDGER_WITNESS_KEYS=lw.verifier_key,
            FHIRBRIDGE_LEDGER_TLOG_WITNESSES=lw.url + "/",
        )
        cli = subprocess.run(
            [sys.executable, "-m", "bridge.cli", "ledger", "cosign"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert f"cosigned: size 50 by {lw.url}" in cli.stdout
        listed = subprocess.run(
            [go_tools.witnessctl, "list-logs", "-db", lw.db], capture_output=True, text=True, timeout=60
        )
        assert '"size":50' in listed.stdout, listed.stdout + listed.stderr

        with _serve(tmp_path, FHIRBRIDGE_LEDGER_WITNESS_KEYS=lw.verifier_key) as base:
            ok = _verify(go_tools, base, log_key, "-witness-key", lw.verifier_key)
            assert ok.returncode == 0, ok.stdout + ok.stderr
            assert f"cosignature: witness {WITNESS_NAME} OK" in ok.stdout
            assert "50 leaf hashes recomputed" in ok.stdout

            # another witness key (same name) is required: its cosignature is absent
            _s, impostor = generate_key(WITNESS_NAME, ALG_COSIGNATURE_V1)
            missing = _verify(go_tools, base, log_key, "-witness-key", impostor, "-leaves", "2")
            assert missing.returncode == 1
            assert f"no valid cosignature from witness {WITNESS_NAME}" in missing.stderr

            # a checkpoint the witness has not cosigned yet fails when the cosignature is required
            led.append([_entry(i) for i in range(50, 53)])
            led.checkpoint_now()
            uncosigned = _verify(go_tools, base, log_key, "-witness-key", lw.verifier_key, "-leaves", "2")
            assert uncosigned.returncode == 1
            assert "no valid cosignature from witness" in uncosigned.stderr
        led.close()
