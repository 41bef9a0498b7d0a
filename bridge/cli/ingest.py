"""``fhirbridge ingest``: convert files with an adapter and publish the bundles (docs/streams.md)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bridge.cli._common import fail, kv, settings


def register(sub: Any, groups: dict[str, Any]) -> None:
    p = sub.add_parser("ingest", help="convert files with an adapter and publish the bundles to Kafka")
    p.add_argument("--adapter", required=True, help="adapter name (see `fhirbridge adapters list`)")
    p.add_argument("--source", required=True, help="source organisation id")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="adapter option (repeatable)"
    )
    p.add_argument("--mrn-system", default=None, help="identifier system of the source's MRNs")
    p.add_argument("--encounter-system", default=None, help="identifier system of the source's visit numbers")
    p.add_argument("--timezone", default="UTC", help="IANA zone for source times without an offset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--failed-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where records the broker did not acknowledge are kept for a retry "
        "(default: DATA_DIR/ingest-failed/<UTC time>-<pid>; created only when one fails)",
    )
    p.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="input files or directories (every file under them)",
    )
    p.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace) -> int:
    from adapters import registry
    from adapters.base import SourceInfo
    from adapters.errors import AdapterError
    from bridge.errors import ERRORS_OR_VALUE
    from bridge.gctune import tune_gc
    from bridge.ingest.files import ingest_files
    from bridge.ingest.pipeline import Pipeline
    from bridge.stream.broker import resolve_bootstrap
    from bridge.stream.producer import Publisher
    from bridge.stream.topics import ensure_topics

    config = settings()
    try:
        options = dict(kv(o) for o in args.option)
        adapter = registry.create(args.adapter, options)
        source = SourceInfo(
            args.source,
            mrn_system=args.mrn_system,
            encounter_system=args.encounter_system,
            timezone=args.timezone,
        )
        bootstrap = resolve_bootstrap(config)
        ensure_topics(bootstrap, config.kafka.topics, config.kafka)
        # Files are throughput work: a longer linger fills batches of ~10-20 records instead of 1-2,
        # which halves the producer's CPU per record (docs/streams.md#producer).
        publisher = Publisher(config, bootstrap, linger_ms=config.kafka.ingest_linger_ms)
        publisher.signer(source.org_id)  # fail fast when the org has no key
    except ERRORS_OR_VALUE as exc:
        return fail(str(exc), 2 if isinstance(exc, AdapterError | ValueError) else 1)
    missing = [f for f in args.files if not f.exists()]
    if missing:
        return fail(f"no such file: {missing[0]}", 2)
    tune_gc(config.gc_threshold)
    failed_dir = args.failed_dir or (
        config.data_dir / "ingest-failed" / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    )
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())  # stop reading, settle, report
    try:
        summary = ingest_files(
            Pipeline(adapter, source, publisher, options),
            args.files,
            progress=not args.no_progress,
            failed_dir=failed_dir,
            stop=stop,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        publisher.close()
    rate = summary.converted / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"converted {summary.converted}, published {summary.published}, rejected {summary.rejected}, "
        f"failed {summary.failed_count}, warnings {summary.warnings} in {summary.seconds:.2f}s "
        f"({rate:.0f} bundles/s)",
        file=sys.stderr,
    )
    for reason, n in sorted(summary.reasons.items(), key=lambda kv: -kv[1]):
        print(f"  rejected {n}x: {reason}", file=sys.stderr)
    if summary.interrupted:
        print(
            f"STOPPED: asked to stop (SIGTERM); reading stopped at {summary.interrupted}. What was read is"
            " settled above; running the same command again is safe (the ledger and the index deduplicate)",
            file=sys.stderr,
        )
    if summary.failed is not None and summary.failed.count:
        _report_failed(summary, args)
        return 1
    return 1 if summary.rejected or summary.interrupted else 0


def _report_failed(summary: Any, args: argparse.Namespace) -> None:
    """What failed to publish, where it is kept and how to retry it (docs/streams.md#fault-drills)."""
    failed = summary.failed
    print(
        f"FAILED: {failed.count} records were not acknowledged by the broker ({failed.describe()}): "
        f"{failed.bundles} bundles not published, {failed.dead_letters} dead letters not stored",
        file=sys.stderr,
    )
    if summary.stopped:
        print(f"  publishing stopped after repeated send failures: {summary.stopped}", file=sys.stderr)
    print(
        f"  each is listed with its location and error in {failed.directory / 'failed.jsonl'}",
        file=sys.stderr,
    )
    if failed.bundles > failed.without_raw:
        retry = ["fhirbridge", "ingest", "--adapter", args.adapter, "--source", args.source]
        for opt in args.option:
            retry += ["--option", opt]
        for flag, value in (
            ("--mrn-system", args.mrn_system),
            ("--encounter-system", args.encounter_system),
            ("--timezone", args.timezone),
        ):
            if value is not None:
                retry += [flag, value]
        retry.append(str(failed.records))
        print(
            f"  the {failed.bundles - failed.without_raw} failed records are in {failed.records}; "
            f"retry them with: {shlex.join(retry)}",
            file=sys.stderr,
        )
    if failed.without_raw:
        print(
            f"  {failed.without_raw} failed bundles have no original record (the adapter keeps none): "
            f"their bundles are in failed.jsonl; ingest their input files again",
            file=sys.stderr,
        )
