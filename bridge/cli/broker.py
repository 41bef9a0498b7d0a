"""``fhirbridge broker start|stop``, ``topics create`` and ``keys create``: the stream's administration."""

from __future__ import annotations

import argparse
import time
from typing import Any

from bridge.cli._common import fail, settings


def register(sub: Any, groups: dict[str, Any]) -> None:
    p = groups["broker"].add_parser(
        "start",
        help="start a local broker and print its address: noida-db (embedded, the default), kafka (Apache"
        " Kafka from Maven Central; needs Java 17 and Maven) or tansu",
    )
    p.add_argument("--kind", choices=["noida", "kafka", "tansu"], default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--foreground", action="store_true", help="stay attached; stop the broker on Ctrl-C")
    p.set_defaults(func=cmd_broker_start)
    p = groups["broker"].add_parser("stop", help="stop the embedded broker started by `broker start`")
    p.set_defaults(func=cmd_broker_stop)

    p = groups["topics"].add_parser("create", help="create fhir.bundles, fhir.deadletter and ledger.receipts")
    p.set_defaults(func=cmd_topics_create)

    keys = sub.add_parser("keys", help="source organisation signing keys and the trust registry")
    ksub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    p = ksub.add_parser("create", help="create an Ed25519 signing key for an org and trust it")
    p.add_argument("--org", required=True)
    p.add_argument("--not-before", default=None, help="RFC 3339 start of validity (default: now)")
    p.add_argument("--not-after", default=None, help="RFC 3339 end of validity (default: none)")
    p.set_defaults(func=cmd_keys_create)


def cmd_broker_start(args: argparse.Namespace) -> int:
    from bridge.errors import ERROR_ROOTS
    from bridge.stream.broker import running_local, start_local

    config = settings()
    existing = running_local(config.data_dir)
    if existing is not None:
        print(existing.bootstrap)
        return 0
    try:
        handle = start_local(args.kind or config.kafka.local_broker, config.data_dir, args.port)
    except ERROR_ROOTS as exc:
        return fail(str(exc))
    print(handle.bootstrap, flush=True)
    if args.foreground:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            handle.stop()
    return 0


def cmd_broker_stop(args: argparse.Namespace) -> int:
    from bridge.stream.broker import stop_running

    state = stop_running(settings().data_dir)
    if state is None:
        return fail("no embedded broker is running (no broker.json in the data directory)")
    print(f"stopped {state['kind']} broker at {state['bootstrap']}")
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from bridge.errors import ERROR_ROOTS
    from bridge.stream.broker import resolve_bootstrap
    from bridge.stream.topics import ensure_topics, topic_specs

    config = settings()
    try:
        created = ensure_topics(resolve_bootstrap(config), config.kafka.topics, config.kafka)
    except ERROR_ROOTS as exc:
        return fail(str(exc))
    for spec in topic_specs(config.kafka.topics):
        state = "created" if spec.name in created else "exists"
        print(f"{spec.name}\t{spec.partitions} partitions\t{state}\t{spec.configs}")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from bridge.stream.envelope import create_org_key
    from bridge.stream.producer import signing_key_path

    config = settings()
    key_path = signing_key_path(config, args.org)
    registry_path = config.trust.registry_file or config.data_dir / "trust.json"
    signer = create_org_key(
        key_path, registry_path, args.org, not_before=args.not_before, not_after=args.not_after
    )
    print(f"org {args.org}: key {signer.key_id} written to {key_path}; trusted in {registry_path}")
    return 0
