"""``fhirbridge serve``: the HTTP query service (docs/query.md)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from bridge.cli._common import settings


def register(sub: Any, groups: dict[str, Any]) -> None:
    p = sub.add_parser("serve", help="run the HTTP query service")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from bridge.gctune import tune_gc
    from bridge.service.app import run

    config = settings()
    config = replace(
        config,
        http=replace(config.http, host=args.host or config.http.host, port=args.port or config.http.port),
    )
    tune_gc(config.gc_threshold)
    run(config)
    return 0
