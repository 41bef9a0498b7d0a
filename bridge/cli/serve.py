"""``fhirbridge serve``: the HTTP query service (docs/query.md)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from bridge.cli._common import settings


def register(sub: Any, groups: dict[str, Any]) -> None:
    p = sub.add_parser("serve", help="run the HTTP query service")
    p.add_argument(
        "--host", default=None, help="address to listen on (default FHIRBRIDGE_HTTP_HOST, 127.0.0.1)"
    )
    p.add_argument("--port", type=int, default=None, help="port (default FHIRBRIDGE_HTTP_PORT, 8080)")
    tls = p.add_argument_group(
        "TLS", "HTTPS (TLS 1.2 or newer); default: FHIRBRIDGE_TLS_CERT_FILE, _KEY_FILE, _CLIENT_CA_FILE"
    )
    tls.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="the service's certificate")
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
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from bridge.gctune import tune_gc
    from bridge.service.app import run

    config = settings()
    config = replace(
        config,
        http=replace(
            config.http,
            host=args.host or config.http.host,
            port=args.port or config.http.port,
            tls=config.http.tls.with_paths(args.tls_cert, args.tls_key, args.tls_client_ca),
        ),
    )
    tune_gc(config.gc_threshold)
    run(config)
    return 0
