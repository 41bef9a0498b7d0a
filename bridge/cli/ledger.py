"""``fhirbridge ledger keygen|verify|cosign`` and ``fhirbridge witness run``.

Heavy modules are imported inside the handlers so that building the CLI stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bridge.stores.ledger import open_ledger

DEFAULT_URL_ENV = "FHIRBRIDGE_LEDGER_URL"
ORIGIN_ENV = "FHIRBRIDGE_LEDGER_ORIGIN"
PUBLIC_KEY_ENV = "FHIRBRIDGE_LEDGER_PUBLIC_KEY"


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add ``keygen``, ``verify`` and ``cosign`` to the ``ledger`` group and ``run`` to the ``witness`` group."""
    ledger = groups["ledger"]

    p = ledger.add_parser(
        "keygen",
        help="write an Ed25519 signed-note key pair (<name>.key, <name>.pub)",
        description="Write a C2SP signed-note key pair: the private key PRIVATE+KEY+<name>+<id>+<key> "
        "(mode 0600) and the verifier key <name>+<id>+<key>.",
    )
    p.add_argument("--name", required=True, help="key name; for a log, its checkpoint origin")
    p.add_argument("--out", default=".", help="directory to write the files to (default: .)")
    p.add_argument("--witness", action="store_true", help="a witness cosignature key (algorithm 0x04)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_keygen)

    p = ledger.add_parser(
        "verify",
        help="recompute the tree from the stored entries and check every checkpoint",
        description="Audit the ledger: leaf hashes, tiles, checkpoint signatures and roots, consistency "
        "between successive checkpoints. Exits 1 and reports the first bad index on any problem.",
    )
    p.add_argument(
        "--url", default=os.environ.get(DEFAULT_URL_ENV), help=f"ledger database (env {DEFAULT_URL_ENV})"
    )
    p.add_argument("--origin", default=os.environ.get(ORIGIN_ENV), help=f"log origin (env {ORIGIN_ENV})")
    p.add_argument(
        "--key",
        action="append",
        default=[],
        help=f"log verifier key or a file holding one; repeatable for rotated keys (env {PUBLIC_KEY_ENV})",
    )
    p.add_argument(
        "--from-checkpoint", metavar="FILE", help="a signed checkpoint you kept; the log must match it"
    )
    p.set_defaults(func=_verify)

    p = ledger.add_parser(
        "cosign",
        help="ask the configured C2SP tlog witnesses to cosign the latest checkpoint, and store their cosignatures",
        description="Submit the latest signed checkpoint to each URL of FHIRBRIDGE_LEDGER_TLOG_WITNESSES "
        "(C2SP tlog-witness add-checkpoint, with the consistency proof from the size the witness last cosigned), "
        "check the cosignatures against FHIRBRIDGE_LEDGER_WITNESS_KEYS and store them with the checkpoint. "
        "`fhirbridge ledger run` does this by itself for each new checkpoint. Exits 1 if a witness did not cosign.",
    )
    p.add_argument(
        "--url", default=os.environ.get(DEFAULT_URL_ENV), help=f"ledger database (env {DEFAULT_URL_ENV})"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per witness request (default 10)")
    p.set_defaults(func=_cosign)

    p = groups["witness"].add_parser(
        "run",
        help="poll a ledger's checkpoints, refuse forks and rollbacks, cosign",
        description="Poll LOG_URL/ledger/checkpoint, verify it with the log key and consistency with the last "
        "cosigned checkpoint, cosign (C2SP tlog-cosignature/v1), push the cosignature to the log and serve it "
        "at /witness/checkpoint. Evidence of a split view or rollback is kept in STATE/evidence.",
    )
    p.add_argument("--log-url", required=True, help="base URL of the fhirbridge service")
    p.add_argument("--log-key", required=True, help="the log's verifier key, or a file holding it")
    p.add_argument("--key", required=True, help="the witness private key (a file, or env name via env:NAME)")
    p.add_argument("--state", required=True, help="state directory (last checkpoint, evidence)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls (default 10)")
    p.add_argument(
        "--listen", default="127.0.0.1:8091", help="host:port serving /witness/* (default 127.0.0.1:8091)"
    )
    p.add_argument("--once", action="store_true", help="poll once, print the cosigned note and exit")
    p.set_defaults(func=_witness_run)


def _read_key(value: str) -> str:
    """A key given inline, as a file path, or as ``env:NAME``; surrounding whitespace stripped."""
    if value.startswith("env:"):
        return os.environ.get(value[4:], "").strip()
    path = Path(value)
    if "+" not in value or path.is_file():
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SystemExit(f"error: cannot read key file {value}: {exc.strerror}") from None
    return value.strip()


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _keygen(args: argparse.Namespace) -> int:
    from ledger import note
    from ledger.errors import InvalidKey

    try:
        skey, vkey = note.generate_key(
            args.name, note.ALG_COSIGNATURE_V1 if args.witness else note.ALG_ED25519
        )
    except InvalidKey as exc:
        return _err(str(exc))
    out = Path(args.out)
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.name)
    priv, pub = out / f"{base}.key", out / f"{base}.pub"
    if not args.force and (priv.exists() or pub.exists()):
        return _err(f"{priv} or {pub} exists; use --force to overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(skey + "\n")
        pub.write_text(vkey + "\n", encoding="utf-8")
    except OSError as exc:
        return _err(f"cannot write the key files: {exc.strerror}")
    print(f"private key: {priv}")
    print(f"public key:  {pub}")
    print(vkey)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from bridge.config import Settings
    from ledger.audit import audit
    from ledger.errors import LedgerError

    settings = Settings.from_env()
    url = args.url or settings.ledger.url
    if url.startswith("sqlite://") and not Path(url[len("sqlite://") :]).is_file():
        return _err(f"no ledger database at {url[len('sqlite://') :]} (give --url or set {DEFAULT_URL_ENV})")
    configured = settings.ledger.verifier_key()
    keys = (
        [_read_key(k) for k in args.key]
        or ([os.environ[PUBLIC_KEY_ENV].strip()] if os.environ.get(PUBLIC_KEY_ENV) else [])
        or ([configured] if configured else [])
    )
    if not keys:
        return _err(f"give the log's verifier key with --key or {PUBLIC_KEY_ENV}")
    trusted = None
    if args.from_checkpoint:
        try:
            trusted = Path(args.from_checkpoint).read_text(encoding="utf-8")
        except OSError as exc:
            return _err(f"cannot read {args.from_checkpoint}: {exc.strerror}")
    try:
        origin = args.origin or _origin_from_keys(keys)
        led = open_ledger(url, origin=origin)
        try:
            report = audit(led, keys, trusted_checkpoint=trusted)
        finally:
            led.close()
    except LedgerError as exc:
        return _err(str(exc))
    print(
        f"entries: {report.entries_checked}/{report.size}  checkpoints: {report.checkpoints_checked}  "
        f"tiles: {report.tiles_checked}"
    )
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print("OK: the log is intact")
        return 0
    if report.first_bad_index is not None:
        print(f"FAILED: first bad index {report.first_bad_index}")
    else:
        print("FAILED")
    for problem in report.problems:
        print(f"  - {problem}")
    return 1


def _cosign(args: argparse.Namespace) -> int:
    from bridge.config import Settings
    from ledger.errors import LedgerError
    from ledger.tlogwitness import TlogWitnessClient, parse_witness_urls

    settings = Settings.from_env()
    url = args.url or settings.ledger.url
    if url.startswith("sqlite://") and not Path(url[len("sqlite://") :]).is_file():
        return _err(f"no ledger database at {url[len('sqlite://') :]} (give --url or set {DEFAULT_URL_ENV})")
    try:
        urls = parse_witness_urls(settings.ledger.tlog_witnesses)
        if not urls:
            return _err("no tlog witness configured: set FHIRBRIDGE_LEDGER_TLOG_WITNESSES")
        clients = [TlogWitnessClient(u, settings.ledger.witness_keys, timeout=args.timeout) for u in urls]
        led = open_ledger(url, origin=settings.ledger.origin, witness_keys=list(settings.ledger.witness_keys))
    except LedgerError as exc:
        return _err(str(exc))
    failed = 0
    try:
        latest = led.storage.latest_checkpoint()
        if latest is None:
            return _err("the ledger has no signed checkpoint yet")
        size, note = latest
        for client in clients:
            try:
                lines = client.submit(note, led.consistency_proof)
                led.add_cosignatures(note + "".join(lines))
            except LedgerError as exc:
                print(f"FAILED: {client.url}: {exc}")
                failed += 1
                continue
            print(f"cosigned: size {size} by {client.url} ({len(lines)} cosignature(s))")
    finally:
        led.close()
    return 1 if failed else 0


def _origin_from_keys(keys: list[str]) -> str:
    from ledger.note import Verifier

    return Verifier.from_text(keys[0]).name


def _witness_run(args: argparse.Namespace) -> int:
    import asyncio

    from ledger.errors import LedgerError
    from ledger.witness import Witness, run_witness

    try:
        witness = Witness(_read_key(args.log_key), _read_key(args.key), args.state)
    except (LedgerError, OSError) as exc:
        return _err(str(exc))
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        return _err("--listen must be host:port")
    import signal

    # SIGTERM as Ctrl-C: asyncio.run cancels the loop, the listener is cleaned up, state files are
    # only ever replaced whole (os.replace), so a stop between two polls loses nothing
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return asyncio.run(
            run_witness(witness, args.log_url, args.interval, host or "127.0.0.1", int(port), args.once)
        )
    except KeyboardInterrupt:
        return 0
