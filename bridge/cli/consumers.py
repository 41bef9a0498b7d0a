"""``fhirbridge ledger run`` and ``fhirbridge index run``: the two consumer groups (docs/streams.md)."""

from __future__ import annotations

import argparse
from typing import Any

from bridge.cli._common import fail, settings


def register(sub: Any, groups: dict[str, Any]) -> None:
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


def _consumer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", default=None, help="consumer group id")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics (Prometheus), /livez and /readyz on this port",
    )
    p.add_argument(
        "--metrics-host",
        default=None,
        help="address of that port (default FHIRBRIDGE_HTTP_HOST, 127.0.0.1; 0.0.0.0 in a container)",
    )
    p.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this many seconds without records (batch jobs, tests)",
    )


def _run(args: argparse.Namespace, sink_factory: Any, default_group: str) -> int:
    from bridge.consumers.runtime import run_consumer
    from bridge.errors import ERROR_ROOTS

    try:
        run_consumer(
            settings(),
            sink_factory,
            args.group or default_group,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            exit_when_idle=args.exit_when_idle,
        )
    except ERROR_ROOTS as exc:
        return fail(str(exc))
    return 0


def cmd_ledger_run(args: argparse.Namespace) -> int:
    from bridge.consumers.ledger_sink import build_ledger_sink, require_ledger_signer_key
    from bridge.errors import ConfigError
    from bridge.logging import get_logger

    def factory(config: Any, bootstrap: str) -> Any:
        return build_ledger_sink(config, bootstrap, unsigned=args.unsigned, elect=True)

    if args.unsigned:
        get_logger("bridge.ledger").warning("ledger.unsigned", detail="no checkpoint will be signed")
    else:
        try:  # before any broker is looked for: a missing key is the first thing to say
            require_ledger_signer_key(settings())
        except ConfigError as exc:
            return fail(str(exc))
    return _run(args, factory, "fhirbridge-ledger")


def cmd_index_run(args: argparse.Namespace) -> int:
    from bridge.consumers.index_sink import build_index_sink

    return _run(args, lambda config, bootstrap: build_index_sink(config, elect=True), "fhirbridge-index")
