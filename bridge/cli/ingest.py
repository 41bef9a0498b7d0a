"""``fhirbridge ingest``: convert files with an adapter and publish the bundles (docs/streams.md)."""

from __future__ import annotations

import argparse
import sys
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
        ensure_topics(bootstrap, config.kafka.topics)
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
    try:
        summary = ingest_files(
            Pipeline(adapter, source, publisher, options), args.files, progress=not args.no_progress
        )
    finally:
        publisher.close()
    rate = summary.converted / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"converted {summary.converted}, published {summary.published}, rejected {summary.rejected}, "
        f"warnings {summary.warnings} in {summary.seconds:.2f}s ({rate:.0f} bundles/s)",
        file=sys.stderr,
    )
    for reason, n in sorted(summary.reasons.items(), key=lambda kv: -kv[1]):
        print(f"  rejected {n}x: {reason}", file=sys.stderr)
    return 1 if summary.rejected else 0
