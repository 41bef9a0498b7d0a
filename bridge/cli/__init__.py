"""The ``fhirbridge`` console script.

Each package contributes its sub-commands through a ``register(sub, groups)`` function in the
modules listed in :data:`REGISTRARS`; ``groups`` holds the shared command groups (``ledger``,
``adapters``, ``mpi``, ``topics``, ``index``, ``witness``) so that a package can add leaf commands to a
group another package also uses. A handler is set with ``parser.set_defaults(func=handler)`` and
returns the process exit code.

Exit codes: 0 success, 1 the work failed (bad input, verification failure), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

REGISTRARS = (
    "bridge.cli.ingest",
    "bridge.cli.consumers",
    "bridge.cli.serve",
    "bridge.cli.broker",
    "bridge.cli.adapters",
    "bridge.cli.ledger",
    "bridge.cli.demo",
    "bridge.cli.replay",
    "bridge.cli.mpi",
    "bridge.cli.auth",
    "bridge.cli.audit",
    "bridge.cli.groups",
)

GROUPS = {
    "ledger": "the Merkle ledger: run its consumer, keys, verification",
    "adapters": "list adapters and run the adapter conformance kit",
    "index": "the resource index consumer",
    "topics": "Kafka topic administration",
    "witness": "run a witness that cosigns ledger checkpoints",
    "mpi": "master patient index tools",
    "broker": "the embedded Kafka-compatible broker",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 2 with a one-line message, never a traceback
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fhirbridge", description="FHIR R4 interoperability bridge")
    parser.add_argument(
        "--log-level", default=None, help="debug, info, warning, error (env FHIRBRIDGE_LOG_LEVEL)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    groups: dict[str, Any] = {}
    for name, help_text in GROUPS.items():
        gp = sub.add_parser(name, help=help_text, description=help_text)
        gsub = gp.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", parser_class=_Parser)
        gsub.required = True
        groups[name] = gsub
    for modname in REGISTRARS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            continue
        mod.register(sub, groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bridge.logging import configure_logging

    configure_logging(args.log_level)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return exit_code(exc)


def exit_code(exc: Exception) -> int:
    """The one map from an error to an exit code, for what a command did not handle itself: a known
    error (any package's root) is a failed run, 1, with its one-line message; anything else is a bug,
    reported as one line naming its class (the message may hold input), also 1, never a traceback."""
    from bridge.errors import ERROR_ROOTS, UsageError

    if isinstance(exc, UsageError):
        print(f"fhirbridge: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, ERROR_ROOTS):
        print(f"fhirbridge: error: {exc}", file=sys.stderr)
    else:
        print(
            f"fhirbridge: internal error ({type(exc).__name__}); run with --log-level debug", file=sys.stderr
        )
        from bridge.logging import get_logger

        get_logger("bridge.cli").debug("cli.internal_error", exc_info=exc)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
