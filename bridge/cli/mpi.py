"""``fhirbridge mpi ...`` commands: ``link`` (batch linkage of a Patient NDJSON file) and ``run`` (the
MPI linker, a consumer of the MPI topic: docs/mpi.md, "The linker as its own process")."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add ``link`` to the ``mpi`` command group."""
    p = groups["mpi"].add_parser(
        "link",
        help="link a population of FHIR Patient resources (NDJSON) and write the linked pairs as CSV",
        description=(
            "Runs the same matcher as the MPI service over INPUT: blocking, EM-estimated Fellegi-Sunter "
            "weights with term-frequency adjustment, strong-identifier rule. Writes one row per linked pair: "
            "id_a,id_b,state,score (state MATCH or POSSIBLE_MATCH; score = match probability)."
        ),
    )
    p.add_argument(
        "input",
        metavar="INPUT.ndjson",
        help="FHIR R4 Patient resources, one JSON object per line ('-' = stdin)",
    )
    p.add_argument("--out", required=True, metavar="LINKS.csv", help="output CSV ('-' = stdout)")
    p.add_argument(
        "--persons", metavar="PERSONS.csv", help="also write patient_id,person_id (union-find of MATCH pairs)"
    )
    p.add_argument(
        "--match-threshold", type=float, default=None, help="MATCH probability threshold (default 0.95)"
    )
    p.add_argument(
        "--possible-threshold",
        type=float,
        default=None,
        help="POSSIBLE_MATCH probability threshold (default 0.30)",
    )
    p.add_argument(
        "--strong-system",
        action="append",
        default=None,
        metavar="URI",
        help="identifier system treated as a strong person identifier (repeatable; replaces the defaults)",
    )
    p.add_argument(
        "--no-em", action="store_true", help="use the prior m/u parameters instead of estimating them"
    )
    p.add_argument("--no-tf", action="store_true", help="disable the term-frequency adjustment")
    p.add_argument("--model-out", metavar="MODEL.json", help="write the estimated parameters as JSON")
    p.set_defaults(func=_cmd_link)

    p = groups["mpi"].add_parser(
        "run",
        help="link the Patient versions of the MPI topic into persons (FHIRBRIDGE_MPI_LINKER=topic)",
        description=(
            "Consumes FHIRBRIDGE_TOPIC_MPI (published by `index run` with FHIRBRIDGE_MPI_LINKER=topic) into the "
            "MPI at FHIRBRIDGE_MPI_URL. Several may run: one links, the others wait as standbys until it "
            "stops (a lock on the MPI database, a writer epoch checked by every MPI write). A linker that "
            "loses its leadership stops without committing and exits 1."
        ),
    )
    p.add_argument("--group", default=None, help="consumer group id (default fhirbridge-mpi)")
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve /metrics, /livez and /readyz on this port"
    )
    p.add_argument(
        "--metrics-host", default=None, help="the address to serve them on (default FHIRBRIDGE_HTTP_HOST)"
    )
    p.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this many seconds without records (batch jobs, tests)",
    )
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from bridge.cli._common import fail, settings
    from bridge.consumers.mpi_sink import MPI_GROUP, run_linker
    from bridge.errors import ERROR_ROOTS

    try:
        run_linker(
            settings(),
            args.group or MPI_GROUP,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            exit_when_idle=args.exit_when_idle,
        )
    except ERROR_ROOTS as exc:
        return fail(str(exc))
    return 0


def _cmd_link(args: argparse.Namespace) -> int:
    import contextlib
    import csv
    import dataclasses

    import orjson

    from bridge.stores.mpi.config import MpiConfig, MpiError
    from bridge.stores.mpi.features import extract_features
    from bridge.stores.mpi.matcher import link_records
    from bridge.stores.mpi.persons import person_id_for

    try:
        overrides: dict[str, Any] = {}
        if args.match_threshold is not None:
            overrides["match_threshold"] = args.match_threshold
        if args.possible_threshold is not None:
            overrides["possible_threshold"] = args.possible_threshold
        if args.strong_system:
            overrides["strong_identifier_systems"] = tuple(args.strong_system)
        if args.no_tf:
            overrides["term_frequency"] = False
        config = dataclasses.replace(MpiConfig(), **overrides)
    except MpiError as exc:
        print(f"fhirbridge mpi link: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    ids: list[str] = []
    feats = []
    seen: dict[str, int] = {}
    try:
        stream = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"fhirbridge mpi link: error: cannot read {args.input}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAIL
    with stream:
        for lineno, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            where = f"{args.input}:{lineno}"
            try:
                resource = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                print(f"fhirbridge mpi link: error: {where}: invalid JSON: {exc}", file=sys.stderr)
                return EXIT_FAIL
            try:
                f = extract_features(resource, config.strong_identifier_systems)
            except MpiError as exc:
                print(f"fhirbridge mpi link: error: {where}: {exc}", file=sys.stderr)
                return EXIT_FAIL
            pid = resource["id"]
            if pid in seen:
                print(
                    f"fhirbridge mpi link: error: {where}: duplicate Patient id {pid!r} (first on line "
                    f"{seen[pid]})",
                    file=sys.stderr,
                )
                return EXIT_FAIL
            seen[pid] = lineno
            ids.append(pid)
            feats.append(f)

    result = link_records(feats, config, fit=not args.no_em)
    linked = result.linked(include_possible=True)
    rows = []
    for k in linked:
        a, b = ids[int(result.ia[k])], ids[int(result.ib[k])]
        if b < a:
            a, b = b, a
        rows.append((a, b, str(result.state[k]), f"{float(result.prob[k]):.6f}"))
    rows.sort()
    try:
        out = sys.stdout if args.out == "-" else open(args.out, "w", newline="", encoding="utf-8")  # noqa: SIM115
        with out if out is not sys.stdout else contextlib.nullcontext(out) as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["id_a", "id_b", "state", "score"])
            w.writerows(rows)
        if args.persons:
            with open(args.persons, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh, lineterminator="\n")
                w.writerow(["patient_id", "person_id"])
                for group in result.clusters(len(ids)):
                    pid = person_id_for(ids[group[0]])
                    for row in sorted(ids[i] for i in group):
                        w.writerow([row, pid])
        if args.model_out:
            with open(args.model_out, "wb") as fb:
                fb.write(orjson.dumps(result.model.to_json(), option=orjson.OPT_INDENT_2))
    except OSError as exc:
        print(f"fhirbridge mpi link: error: cannot write output: {exc}", file=sys.stderr)
        return EXIT_FAIL
    n_match = sum(1 for r in rows if r[2] == "MATCH")
    print(
        f"{len(ids)} records, {result.candidates} candidate pairs, {n_match} MATCH, {len(rows) - n_match} "
        f"POSSIBLE_MATCH, {len(result.clusters(len(ids)))} persons (parameters: {result.model.source}, "
        f"match rate among candidates {result.model.lam:.3f})",
        file=sys.stderr,
    )
    return EXIT_OK
