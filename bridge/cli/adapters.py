"""CLI commands of the adapter SDK: ``convert``, ``adapters list``, ``adapters check``, ``mllp``.

Exit codes: 0 every input converted (or every check passed), 1 an input had a located error (or a
check failed), 2 usage error (unknown adapter, bad option, missing input). Bad input never prints a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import UsageError

if TYPE_CHECKING:
    from adapters.base import Adapter, SourceInfo


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add ``convert`` and ``mllp`` at the top level and ``list``/``check`` to the ``adapters`` group."""
    p = sub.add_parser(
        "convert",
        help="convert files with an adapter, without Kafka",
        description="Convert input files (or directories) to FHIR R4 bundles, one JSON file per "
        "bundle, plus report.json. Exit 0 all converted, 1 some input had errors, 2 usage.",
    )
    p.add_argument("--adapter", "-a", required=True, help="adapter name (see `fhirbridge adapters list`)")
    _source_args(p)
    p.add_argument("--out", "-o", required=True, type=Path, help="output directory (created if missing)")
    p.add_argument("inputs", nargs="+", type=Path, metavar="FILE", help="input files or directories")
    p.set_defaults(func=cmd_convert)

    ad = groups["adapters"]
    lp = ad.add_parser("list", help="list registered adapters")
    lp.set_defaults(func=cmd_list)
    cp = ad.add_parser(
        "check",
        help="run the conformance kit on an adapter",
        description="Convert each input twice and check validity, determinism, Provenance, "
        "references, and located errors for truncated/mutated copies.",
    )
    cp.add_argument("name", help="adapter name")
    cp.add_argument("inputs", nargs="+", type=Path, metavar="FILE")
    _source_args(cp, required=False)
    cp.add_argument("--mutations", type=int, default=12, help="mutated copies per input (default 12)")
    cp.add_argument("--seed", type=int, default=0, help="seed of the mutations (default 0)")
    cp.add_argument("--json", action="store_true", help="print the report as JSON")
    cp.set_defaults(func=cmd_check)

    mp = sub.add_parser("mllp", help="run an MLLP listener that converts HL7 v2 and produces to Kafka")
    mp.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    mp.add_argument("--port", type=int, required=True)
    mp.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="serve /livez, /readyz and /metrics on this port (off by default)",
    )
    mp.add_argument(
        "--health-host", default=None, help="address of the health port (default: the --host address)"
    )
    mp.add_argument(
        "--grace",
        type=float,
        default=20.0,
        help="on SIGTERM, seconds to answer the messages in hand before closing (default 20)",
    )
    _source_args(mp)
    mp.add_argument(
        "--dedup-window",
        type=float,
        default=3600.0,
        help="seconds during which the same message again (MSH-7 aside) is acknowledged but not re-published",
    )
    mp.add_argument("--ack-timeout", type=float, default=30.0, help="seconds to wait for the broker's ack")
    mp.add_argument(
        "--workers",
        type=int,
        default=0,
        help="conversion processes (default 0: convert in the listener's process)",
    )
    tls = mp.add_argument_group(
        "TLS",
        "MLLP over TLS (1.2 or newer); default: FHIRBRIDGE_MLLP_TLS_CERT_FILE, _KEY_FILE, _CLIENT_CA_FILE",
    )
    tls.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="the listener's certificate")
    tls.add_argument(
        "--tls-key",
        type=Path,
        default=None,
        metavar="PEM",
        help="the file holding its private key (unencrypted, readable by this user only)",
    )
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        metavar="PEM",
        help="mutual TLS: accept only clients with a certificate from this CA",
    )
    mp.set_defaults(func=cmd_mllp)


def _source_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--source",
        "-s",
        required=required,
        default=None if required else "conformance",
        help="source organisation id (e.g. st-mary)",
    )
    p.add_argument("--mrn-system", default=None, help="identifier system of the source's MRNs")
    p.add_argument("--encounter-system", default=None, help="identifier system of the source's visit numbers")
    p.add_argument(
        "--timezone", default="UTC", help="IANA zone for local times without an offset (default UTC)"
    )
    p.add_argument(
        "--option",
        "-O",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="adapter option (repeatable), e.g. --option mapping=map.toml",
    )


def _source(args: argparse.Namespace) -> SourceInfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from adapters.base import SourceInfo

    try:
        ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(
            f"unknown time zone {args.timezone!r} (use an IANA name such as Europe/Paris)"
        ) from None
    try:
        return SourceInfo(
            org_id=args.source,
            mrn_system=args.mrn_system,
            encounter_system=args.encounter_system,
            timezone=args.timezone,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _options(args: argparse.Namespace) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        opts[key.strip()] = value
    return opts


def _adapter(name: str, options: dict[str, str]) -> Adapter:
    from adapters import registry
    from adapters.errors import AdapterError

    try:
        return registry.create(name, options)
    except AdapterError as exc:
        raise UsageError(str(exc)) from None
    except TypeError as exc:  # an adapter whose __init__ does not take these options
        raise UsageError(f"adapter {name!r} rejected the options: {exc}") from None


def _usage(msg: str) -> int:
    print(f"fhirbridge: error: {msg}", file=sys.stderr)
    return 2


def cmd_convert(args: argparse.Namespace) -> int:
    """The ``convert`` command; see the module docstring for exit codes."""
    from bridge.ingest.convert import convert_to_directory

    try:
        source = _source(args)
        adapter = _adapter(args.adapter, _options(args))
        missing = [str(p) for p in args.inputs if not p.exists()]
        if missing:
            raise UsageError(f"input not found: {', '.join(missing)}")
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} exists and is not a directory")
        args.out.mkdir(parents=True, exist_ok=True)
    except UsageError as exc:
        return _usage(str(exc))
    except OSError as exc:
        return _usage(f"cannot create {args.out}: {exc.strerror}")

    report = convert_to_directory(adapter, source, args.inputs, args.out, on_file=_print_file)
    summary = report["summary"]
    s = summary
    print(
        f"{s['bundles']} bundle(s) from {s['files']} file(s), {s['files_with_errors']} with errors, "
        f"{s['warnings']} warning(s); report: {args.out / 'report.json'}"
    )
    return 1 if report["status"] == "error" else 0


def _print_file(entry: dict[str, Any]) -> None:
    status = "ok" if entry["status"] == "ok" else "ERROR"
    print(
        f"{status:5}  {entry['file']}: {len(entry['bundles'])} bundle(s), {len(entry['warnings'])} warning(s)"
    )
    for e in entry["errors"][:20]:
        print(f"       error: {e['where']}: {e['message']}")


def cmd_list(args: argparse.Namespace) -> int:
    """``adapters list``: name, version and description; broken entry points are reported, exit 1."""
    from importlib.metadata import entry_points

    from adapters import registry
    from adapters.errors import AdapterError

    rc = 0
    try:
        names = registry.available()
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        names = sorted({ep.name for ep in entry_points(group=registry.GROUP)})
        rc = 1
    for name in names:
        try:
            cls = registry.load_class(name)
            print(f"{name:14} {getattr(cls, 'version', '?'):10} {getattr(cls, 'description', '')}")
        except AdapterError as exc:
            print(f"{name:14} {'BROKEN':10} {exc}")
            rc = 1
    return rc


def cmd_check(args: argparse.Namespace) -> int:
    """``adapters check``: the conformance kit. 0 all passed, 1 a check failed, 2 usage."""
    import orjson

    from adapters import conformance

    try:
        source = _source(args)
        adapter = _adapter(args.name, _options(args))
        missing = [str(p) for p in args.inputs if not p.exists()]
        if missing:
            raise UsageError(f"input not found: {', '.join(missing)}")
        if args.mutations < 0:
            raise UsageError("--mutations must be >= 0")
    except UsageError as exc:
        return _usage(str(exc))
    report = conformance.run(adapter, list(args.inputs), source, mutations=args.mutations, seed=args.seed)
    if args.json:
        print(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(report.render())
    return 0 if report.ok else 1


def cmd_mllp(args: argparse.Namespace) -> int:
    """``mllp``: serve until interrupted. 2 on usage errors, 1 if the listener cannot start."""
    import asyncio

    try:
        source = _source(args)
        adapter = _adapter("hl7v2", _options(args))
        if args.workers < 0:
            raise UsageError("--workers must be >= 0")
    except UsageError as exc:
        return _usage(str(exc))
    from bridge.config import Settings
    from bridge.errors import ERROR_ROOTS
    from bridge.gctune import tune_gc
    from bridge.ingest.mllp import serve_forever

    try:
        config = Settings.from_env()
        tune_gc(config.gc_threshold)
        asyncio.run(
            serve_forever(
                args.host,
                args.port,
                adapter,
                source,
                dedup_window=args.dedup_window,
                ack_timeout=args.ack_timeout,
                workers=args.workers,
                tls=config.mllp.tls.with_paths(args.tls_cert, args.tls_key, args.tls_client_ca),
                health=(args.health_host or args.host, args.health_port) if args.health_port else None,
                grace=args.grace,
            )
        )
    except ERROR_ROOTS as exc:
        print(f"fhirbridge mllp: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fhirbridge mllp: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0
