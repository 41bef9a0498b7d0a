"""``fhirbridge audit run|verify|keygen``: the audit log's appender, its verifier, its key (docs/audit.md)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from bridge.cli._common import fail, settings

PUBLIC_KEY_ENV = "FHIRBRIDGE_AUDIT_PUBLIC_KEY"


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add the ``audit`` group: ``run``, ``verify`` and ``keygen``."""
    help_text = "the access audit: append AuditEvents to the audit log, verify it, make its key"
    group = sub.add_parser("audit", help=help_text, description=help_text)
    gsub = group.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    gsub.required = True

    p = gsub.add_parser(
        "run",
        help="append new audit rows to the audit log and sign its checkpoints (one per log)",
        description="Append the hash of every new AuditEvent (FHIRBRIDGE_AUDIT_URL) to the audit log "
        "(FHIRBRIDGE_AUDIT_LOG_URL), in seq order, and sign checkpoints with FHIRBRIDGE_AUDIT_KEY_FILE. "
        "Several may run: one appends, the others wait as standbys until it stops (a lock on the audit "
        "log's database, a writer epoch checked by every append). One that loses its leadership stops "
        "and exits 1.",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve /livez, /readyz and /metrics on this port"
    )
    p.add_argument(
        "--metrics-host", default=None, help="the address to serve them on (default FHIRBRIDGE_HTTP_HOST)"
    )
    p.add_argument(
        "--unsigned",
        action="store_true",
        help="run without a signing key: leaves are appended but no checkpoint is signed (tests only)",
    )
    p.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit once caught up and idle this long (batch jobs, tests)",
    )
    p.set_defaults(func=cmd_run)

    p = gsub.add_parser(
        "verify",
        help="recompute every audit row's hash and check it against the audit log",
        description="Check the audit log (leaf hashes, tiles, checkpoint signatures and consistency) and "
        "every audit row against its leaf, in seq order. Exits 1 naming the first missing, altered or "
        "extra event (its seq and id).",
    )
    p.add_argument("--url", default=None, help="the audit database (default FHIRBRIDGE_AUDIT_URL)")
    p.add_argument(
        "--log-url", default=None, help="the audit log database (default FHIRBRIDGE_AUDIT_LOG_URL)"
    )
    p.add_argument("--origin", default=None, help="the audit log's origin (default: the key's name)")
    p.add_argument(
        "--key",
        action="append",
        default=[],
        help="the audit log's verifier key or a file holding one; repeatable for rotated keys (env "
        f"{PUBLIC_KEY_ENV}; default the .pub beside FHIRBRIDGE_AUDIT_KEY_FILE)",
    )
    p.add_argument(
        "--from-checkpoint", metavar="FILE", help="a signed checkpoint you kept; the log must match it"
    )
    p.add_argument(
        "--grace",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="rows newer than this may still be waiting for the appender (default 300); older rows "
        "without a leaf fail the check",
    )
    p.set_defaults(func=cmd_verify)

    p = gsub.add_parser(
        "keygen",
        help="write the audit log's signing key where `audit run` looks for it",
        description="Write an Ed25519 signed-note key pair named for the audit log's origin "
        "(FHIRBRIDGE_AUDIT_ORIGIN): the private key at FHIRBRIDGE_AUDIT_KEY_FILE (mode 0600) and the "
        "verifier key beside it (.pub). `fhirbridge ledger keygen --name <origin>` makes the same kind "
        "of key under another file name.",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_keygen)


def _read_key(value: str) -> str:
    """A verifier key given inline or as a file path."""
    path = Path(value)
    if "+" not in value or path.is_file():
        return path.read_text(encoding="utf-8").strip()
    return value.strip()


def cmd_run(args: argparse.Namespace) -> int:
    from bridge.consumers.audit_log import (
        AppendProgress,
        elect_audit_writer,
        require_audit_signer_key,
        run_audit_log,
    )
    from bridge.errors import ERROR_ROOTS, ConfigError
    from bridge.gctune import tune_gc
    from bridge.health import Health, beat_while, serve_health
    from bridge.logging import get_logger

    cfg = settings()
    if args.unsigned:
        get_logger("bridge.audit").warning("audit.unsigned", detail="no checkpoint will be signed")
    else:
        try:  # the first thing to say when the key is missing
            require_audit_signer_key(cfg)
        except ConfigError as exc:
            return fail(str(exc))
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    idle = args.exit_when_idle

    def until(progress: AppendProgress) -> bool:
        return stopping.is_set() or (
            idle is not None and progress.caught_up and progress.idle_seconds >= idle
        )

    health = Health()
    if args.metrics_port:
        serve_health(health, args.metrics_host or cfg.http.host, args.metrics_port)
    tune_gc(cfg.gc_threshold)
    try:
        health.set_state("standby")
        waiting = threading.Event()
        beat_while(health, waiting)
        try:
            leader = elect_audit_writer(cfg, stopping)
        finally:
            waiting.set()
        if leader is None:  # stopped while a standby
            return 0
        progress = run_audit_log(cfg, until=until, unsigned=args.unsigned, leader=leader, health=health)
    except ERROR_ROOTS as exc:
        return fail(str(exc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"appended {progress.appended} audit events", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bridge.consumers.audit_log import verify_configured
    from bridge.errors import ERROR_ROOTS
    from ledger.note import Verifier

    cfg = settings()
    audit_url = args.url or cfg.audit.url
    log_url = args.log_url or cfg.audit.log_url
    for name, url in (("audit database", audit_url), ("audit log", log_url)):
        if url.startswith("sqlite://") and not Path(url[len("sqlite://") :]).is_file():
            return fail(f"no {name} at {url[len('sqlite://') :]}")
    try:
        keys = [_read_key(k) for k in args.key]
    except OSError as exc:
        return fail(f"cannot read a key file: {exc.strerror}")
    if not keys and os.environ.get(PUBLIC_KEY_ENV):
        keys = [os.environ[PUBLIC_KEY_ENV].strip()]
    if not keys and (configured := cfg.audit.verifier_key()):
        keys = [configured]
    if not keys:
        return fail(f"give the audit log's verifier key with --key or {PUBLIC_KEY_ENV}")
    trusted = None
    if args.from_checkpoint:
        try:
            trusted = Path(args.from_checkpoint).read_text(encoding="utf-8")
        except OSError as exc:
            return fail(f"cannot read {args.from_checkpoint}: {exc.strerror}")
    try:
        origin = args.origin or Verifier.from_text(keys[0]).name
        report = verify_configured(
            cfg,
            keys,
            audit_url=audit_url,
            log_url=log_url,
            origin=origin,
            trusted_checkpoint=trusted,
            grace_seconds=args.grace,
        )
    except ERROR_ROOTS as exc:
        return fail(str(exc))
    print(
        f"audit rows: {report.rows_checked}  leaves: {report.leaves}/{report.log.size}  "
        f"pending: {report.pending}  checkpoints: {report.log.checkpoints_checked}  "
        f"tiles: {report.log.tiles_checked}"
    )
    for note in report.log.notes:
        print(f"note: {note}")
    if report.ok:
        print("OK: every audit event is logged and unchanged, and the audit log is intact")
        return 0
    first = report.first
    if first is not None:
        print(
            f"FAILED: first {first.kind} event: seq {first.seq} id {first.event_id or '?'} ({first.detail})"
        )
    else:
        print("FAILED: the audit log itself does not verify")
    for problem in report.problems:
        print(f"  - {problem.render()}")
    if report.problem_count > len(report.problems):
        print(f"  ... {report.problem_count - len(report.problems)} more")
    if not report.log.ok:
        where = (
            f" (first bad leaf {report.log.first_bad_index})"
            if report.log.first_bad_index is not None
            else ""
        )
        print(f"  audit log{where}:")
        for message in report.log.problems:
            print(f"  - {message}")
    return 1


def cmd_keygen(args: argparse.Namespace) -> int:
    from ledger import note

    cfg = settings()
    priv = cfg.audit.key_file
    if priv is None:  # pragma: no cover - from_env always sets it
        return fail("FHIRBRIDGE_AUDIT_KEY_FILE is not set")
    pub = priv.with_suffix(".pub")
    if not args.force and (priv.exists() or pub.exists()):
        return fail(f"{priv} or {pub} exists; use --force to overwrite")
    skey, vkey = note.generate_key(cfg.audit.origin, note.ALG_ED25519)
    try:
        priv.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(skey + "\n")
        pub.write_text(vkey + "\n", encoding="utf-8")
    except OSError as exc:
        return fail(f"cannot write the key files: {exc.strerror}")
    print(f"private key: {priv}")
    print(f"public key:  {pub}")
    print(vkey)
    return 0
