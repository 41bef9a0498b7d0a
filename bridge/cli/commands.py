"""The bridge's own sub-commands: ingest, consumers, serve, broker, topics, keys, demo, replay."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bridge.gctune import tune_gc
from bridge.logging import get_logger


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

    p = groups["ledger"].add_parser("run", help="consume fhir.bundles into the Merkle ledger")
    _consumer_args(p)
    p.add_argument(
        "--unsigned",
        action="store_true",
        help="run without a signing key: entries are appended but no checkpoint is signed (tests only)",
    )
    p.set_defaults(func=cmd_ledger_run)

    p = groups["index"].add_parser("run", help="consume fhir.bundles into the resource index and MPI")
    _consumer_args(p)
    p.set_defaults(func=cmd_index_run)

    p = sub.add_parser("serve", help="run the HTTP query service")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_serve)

    p = groups["broker"].add_parser(
        "start", help="start the embedded broker (noida-db, or tansu) and print its address"
    )
    p.add_argument("--kind", choices=["noida", "tansu"], default=None)
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

    from bridge.cli.demo import register_demo
    from bridge.consumers.replay import register as register_replay

    register_demo(sub)
    register_replay(sub)


def _consumer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", default=None, help="consumer group id")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this many seconds without records (batch jobs, tests)",
    )


def _settings() -> Any:
    from bridge.config import Settings

    return Settings.from_env()


def _fail(message: str, code: int = 1) -> int:
    print(f"fhirbridge: error: {message}", file=sys.stderr)
    return code


# -- ingest ---------------------------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace) -> int:
    from adapters import registry
    from adapters.base import ConvertedBundle, RejectedRecord, SourceInfo
    from adapters.errors import AdapterError
    from bridge.errors import ERRORS_OR_VALUE
    from bridge.ingest.progress import IngestProgress
    from bridge.stream.broker import resolve_bootstrap
    from bridge.stream.producer import Publisher, conversion_headers, nothing_converted
    from bridge.stream.topics import ensure_topics

    settings = _settings()
    try:
        options = dict(_kv(o) for o in args.option)
        adapter = registry.create(args.adapter, options)
        source = SourceInfo(
            args.source,
            mrn_system=args.mrn_system,
            encounter_system=args.encounter_system,
            timezone=args.timezone,
        )
        bootstrap = resolve_bootstrap(settings)
        ensure_topics(bootstrap, settings.topics)
        # Files are throughput work: a longer linger fills batches of ~10-20 records instead of 1-2,
        # which halves the producer's CPU per record (docs/streams.md#producer).
        publisher = Publisher(settings, bootstrap, linger_ms=settings.ingest_linger_ms)
        publisher.signer(source.org_id)  # fail fast when the org has no key
    except ERRORS_OR_VALUE as exc:
        return _fail(str(exc), 2 if isinstance(exc, AdapterError | ValueError) else 1)

    missing = [f for f in args.files if not f.exists()]
    if missing:
        return _fail(f"no such file: {missing[0]}", 2)
    tune_gc(settings.gc_threshold)
    summary = {"converted": 0, "published": 0, "rejected": 0, "warnings": 0}
    reasons: dict[str, int] = {}
    pending: list[Any] = []
    started = time.perf_counter()
    cpu = {"start-up": time.process_time(), "convert": 0.0, "publish": 0.0}
    clock = time.thread_time
    with IngestProgress(len(args.files), enabled=not args.no_progress) as progress:
        for path in args.files:
            progress.start_file(path)
            outcomes = iter(adapter.convert_path(path, source))
            while True:
                t0 = clock()
                outcome = next(outcomes, None)
                t1 = clock()
                cpu["convert"] += t1 - t0
                if outcome is None:
                    break
                if (
                    isinstance(outcome, ConvertedBundle)
                    and (empty := nothing_converted(outcome, adapter.name)) is not None
                ):
                    outcome = RejectedRecord(empty, outcome.raw or b"", outcome.message_id)
                if isinstance(outcome, ConvertedBundle):
                    summary["converted"] += 1
                    summary["warnings"] += len(outcome.warnings)
                    pending.append(publisher.publish(outcome, adapter, source))
                    cpu["publish"] += clock() - t1
                else:
                    summary["rejected"] += 1
                    err = outcome.error
                    loc = err.location.with_file(str(path))
                    reasons[err.message] = reasons.get(err.message, 0) + 1
                    progress.print(
                        f"[red]rejected[/red] {loc}: {err.message}", plain=f"rejected {loc}: {err.message}"
                    )
                    pending.append(
                        publisher.dead_letter(
                            outcome.raw,
                            error=err,
                            stage=f"ingest:{adapter.name}",
                            location=str(loc),
                            file=str(path),
                            headers=conversion_headers(adapter.name, source, options),
                        )
                    )
                progress.advance_record()
                if len(pending) >= 5000:
                    summary["published"] += _settle(pending, publisher)
            progress.finish_file()
        summary["published"] += _settle(pending, publisher)
    publisher.close()
    elapsed = time.perf_counter() - started
    cpu["producer threads and the rest"] = (
        time.process_time() - cpu["start-up"] - cpu["convert"] - cpu["publish"]
    )
    log = get_logger("bridge.ingest")
    log.info(
        "ingest.cpu",
        pid=os.getpid(),
        bundles=summary["converted"],
        cpu_s={k: round(v, 4) for k, v in cpu.items()},
        cpu_ms_per_bundle={
            k: round(v * 1000 / max(1, summary["converted"]), 4) for k, v in cpu.items() if k != "start-up"
        },
    )
    rate = summary["converted"] / elapsed if elapsed > 0 else 0.0
    print(
        f"converted {summary['converted']}, published {summary['published']}, rejected {summary['rejected']}, "
        f"warnings {summary['warnings']} in {elapsed:.2f}s ({rate:.0f} bundles/s)",
        file=sys.stderr,
    )
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  rejected {n}x: {reason}", file=sys.stderr)
    return 1 if summary["rejected"] else 0


def _settle(pending: list[Any], publisher: Any) -> int:
    """Wait for the broker's acknowledgement of every pending record; returns how many bundles were acked."""
    publisher.flush(60)
    acked = 0
    for fut in pending:
        md = fut.get(timeout=60)
        if md.topic == publisher.topics.bundles:
            acked += 1
    pending.clear()
    return acked


def _kv(option: str) -> tuple[str, str]:
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise ValueError(f"--option expects KEY=VALUE, got {option!r}")
    return key, value


# -- consumers ------------------------------------------------------------------------------------
def _run_consumer(args: argparse.Namespace, sink_factory: Any, default_group: str) -> int:
    from bridge.consumers.runtime import ConsumerRuntime
    from bridge.errors import ERROR_ROOTS
    from bridge.stream.broker import resolve_bootstrap
    from bridge.stream.producer import Publisher
    from bridge.stream.topics import ensure_topics

    settings = _settings()
    try:
        bootstrap = resolve_bootstrap(settings)
        ensure_topics(bootstrap, settings.topics)
        sink = sink_factory(settings, bootstrap)
        dead = Publisher(settings, bootstrap)
        runtime = ConsumerRuntime(settings, bootstrap, sink, dead, group_id=args.group or default_group)
    except ERROR_ROOTS as exc:
        return _fail(str(exc))
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=settings.http_host)
    tune_gc(settings.gc_threshold)
    runtime.install_signal_handlers()
    until = None
    if args.exit_when_idle:
        idle = {"since": time.monotonic(), "seen": 0}

        def until() -> bool:
            if runtime.processed + runtime.dead_lettered != idle["seen"]:
                idle["seen"] = runtime.processed + runtime.dead_lettered
                idle["since"] = time.monotonic()
            return bool(time.monotonic() - idle["since"] > args.exit_when_idle)

    try:
        runtime.run(until=until)
    finally:
        dead.close()
    return 0


def cmd_ledger_run(args: argparse.Namespace) -> int:
    from bridge.consumers.sinks import build_ledger_sink

    def factory(settings: Any, bootstrap: str) -> Any:
        return build_ledger_sink(settings, bootstrap, unsigned=args.unsigned)

    if args.unsigned:
        get_logger("bridge.ledger").warning("ledger.unsigned", detail="no checkpoint will be signed")
    else:
        from bridge.consumers.sinks import require_ledger_signer_key
        from bridge.errors import ConfigError

        try:  # before any broker is looked for: a missing key is the first thing to say
            require_ledger_signer_key(_settings())
        except ConfigError as exc:
            return _fail(str(exc))
    return _run_consumer(args, factory, "fhirbridge-ledger")


def cmd_index_run(args: argparse.Namespace) -> int:
    from bridge.consumers.sinks import build_index_sink

    return _run_consumer(args, lambda settings, bootstrap: build_index_sink(settings), "fhirbridge-index")


# -- service, broker, topics, keys ----------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bridge.service import app as service

    settings = _settings()
    settings = replace(
        settings, http_host=args.host or settings.http_host, http_port=args.port or settings.http_port
    )
    tune_gc(settings.gc_threshold)
    service.run(settings)
    return 0


def cmd_broker_start(args: argparse.Namespace) -> int:
    from bridge.errors import ERROR_ROOTS
    from bridge.stream.broker import running_local, start_local

    settings = _settings()
    existing = running_local(settings.data_dir)
    if existing is not None:
        print(existing.bootstrap)
        return 0
    try:
        handle = start_local(args.kind or settings.local_broker, settings.data_dir, args.port)
    except ERROR_ROOTS as exc:
        return _fail(str(exc))
    print(handle.bootstrap, flush=True)
    if args.foreground:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            handle.stop()
    return 0


def cmd_broker_stop(args: argparse.Namespace) -> int:
    import json

    from bridge.stream.broker import STATE_FILE, stop_pid

    settings = _settings()
    state_file = settings.data_dir / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return _fail("no embedded broker is running (no broker.json in the data directory)")
    stop_pid(int(state["pid"]))
    state_file.unlink(missing_ok=True)
    print(f"stopped {state['kind']} broker at {state['bootstrap']}")
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from bridge.errors import ERROR_ROOTS
    from bridge.stream.broker import resolve_bootstrap
    from bridge.stream.topics import ensure_topics, topic_specs

    settings = _settings()
    try:
        created = ensure_topics(resolve_bootstrap(settings), settings.topics)
    except ERROR_ROOTS as exc:
        return _fail(str(exc))
    for spec in topic_specs(settings.topics):
        state = "created" if spec.name in created else "exists"
        print(f"{spec.name}\t{spec.partitions} partitions\t{state}\t{spec.configs}")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from bridge.stream.envelope import OrgSigner, TrustedKey, TrustRegistry, utc_now
    from bridge.stream.producer import signing_key_path

    settings = _settings()
    key_path = signing_key_path(settings, args.org)
    registry_path = settings.trust_registry_file or settings.data_dir / "trust.json"
    signer = OrgSigner.generate(args.org)
    if key_path.exists():
        key_path.rename(key_path.with_suffix(f".{int(time.time())}.retired"))
    signer.save(key_path)
    registry = TrustRegistry.load(registry_path) if registry_path.is_file() else TrustRegistry()
    registry.add(
        args.org, TrustedKey(signer.key_id, signer.public_bytes, args.not_before or utc_now(), args.not_after)
    )
    registry.save(registry_path)
    print(f"org {args.org}: key {signer.key_id} written to {key_path}; trusted in {registry_path}")
    return 0
