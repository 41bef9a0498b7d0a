"""``fhirbridge replay``: re-drive a sink, copy a topic, or re-drive dead letters (docs/streams.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kafka.errors import KafkaError

from bridge.config import Settings
from bridge.consumers.replay import replay
from bridge.errors import ERROR_ROOTS, ConfigError
from bridge.ingest.pipeline import convert_again
from bridge.stream.broker import resolve_bootstrap


def register(sub: Any, groups: dict[str, Any]) -> None:
    p = sub.add_parser("replay", help="re-drive a sink, copy a topic, or re-drive dead letters from Kafka")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sink", choices=["ledger", "index"], help="write into this sink")
    target.add_argument(
        "--to-topic", help="copy the records (key, value, headers, timestamp) into this topic"
    )
    p.add_argument(
        "--topic",
        default=None,
        help="source topic (default fhir.bundles, or fhir.deadletter with --dead-letters)",
    )
    p.add_argument(
        "--partition", type=int, action="append", default=None, help="only this partition (repeatable)"
    )
    p.add_argument("--from-offset", type=int, default=None)
    p.add_argument("--from-time", default=None, metavar="ISO8601")
    p.add_argument("--to-time", default=None, metavar="ISO8601")
    p.add_argument(
        "--rebuild", action="store_true", help="empty the sink first, then rebuild it from the whole topic"
    )
    p.add_argument("--dead-letters", action="store_true", help="re-drive dead-lettered records (after a fix)")
    p.add_argument("--dry-run", action="store_true", help="count records per partition; write nothing")
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
        report = replay(
            settings,
            resolve_bootstrap(settings),
            sink_name=args.sink,
            to_topic=args.to_topic,
            topic=args.topic,
            partitions=args.partition,
            from_offset=args.from_offset,
            from_time=args.from_time,
            to_time=args.to_time,
            rebuild=args.rebuild,
            dead_letters=args.dead_letters,
            dry_run=args.dry_run,
            reconvert=convert_again,
        )
    except ConfigError as exc:
        print(f"fhirbridge replay: error: {exc}", file=sys.stderr)
        return 2
    except (*ERROR_ROOTS, KafkaError) as exc:
        print(f"fhirbridge replay: error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0 if report.complete else 1
