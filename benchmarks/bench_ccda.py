"""C-CDA conversion throughput and output size: fhirbridge vs python-fhir-converter vs ccda-to-fhir.

Run: ``.venv/bin/python benchmarks/bench_ccda.py [--repeat N] [--all]``

Same process, same documents (the 22 Microsoft FHIR-Converter C-CDA samples, or with ``--all`` every
sample document). For each converter: docs/s and ms/doc (best of ``--repeat`` passes after a warm-up),
resources per document, and *valid* resources per document (each resource checked against the
``fhir.resources.R4B`` model of its type). fhirbridge's time includes its R4B validation of the whole
bundle; the peers' times do not include any validation. Also reports Synthea CSV patients/s.

Peers are optional (the ``bench`` extra): a missing one is reported, not fatal. The machine may be
shared with other work, so compare the figures of one run with each other, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"


def _valid_count(bundle: dict[str, Any]) -> tuple[int, int]:
    from fhir.resources.R4B import get_fhir_model_class

    total = valid = 0
    for e in bundle.get("entry", []) or []:
        res = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(res, dict):
            continue
        total += 1
        try:
            get_fhir_model_class(res["resourceType"]).model_validate(res)
            valid += 1
        except Exception:
            pass
    return total, valid


def _time(fn: Callable[[bytes], dict[str, Any] | None], docs: list[bytes], repeat: int) -> tuple[float, int]:
    failures = 0
    for d in docs:  # warm-up (imports, template compilation, model building)
        try:
            fn(d)
        except Exception:
            failures += 1
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for d in docs:
            with contextlib.suppress(Exception):  # a failing document still costs its time
                fn(d)
        best = min(best, time.perf_counter() - t0)
    return best, failures


def ours() -> Callable[[bytes], dict[str, Any] | None]:
    from adapters.base import ConvertedBundle, SourceInfo
    from adapters.ccda import CcdaAdapter

    a = CcdaAdapter()
    src = SourceInfo("bench")

    def run(d: bytes) -> dict[str, Any] | None:
        [out] = list(a.convert(d, src))
        if not isinstance(out, ConvertedBundle):
            raise RuntimeError(str(out.error))
        return out.bundle

    return run


def python_fhir_converter() -> Callable[[bytes], dict[str, Any] | None]:
    from fhir_converter.renderers import CcdaRenderer

    r = CcdaRenderer()

    def run(d: bytes) -> dict[str, Any] | None:
        return dict(r.render_to_fhir("CCD", d.decode("utf-8-sig")))

    return run


def ccda_to_fhir() -> Callable[[bytes], dict[str, Any] | None]:
    import logging

    from ccda_to_fhir import convert_document

    logging.disable(logging.CRITICAL)  # it logs every resource at INFO and tracebacks at ERROR

    def run(d: bytes) -> dict[str, Any] | None:
        return dict(convert_document(d.decode("utf-8-sig"))["bundle"])

    return run


def bench_synthea(repeat: int) -> None:
    from adapters.base import ConvertedBundle, SourceInfo
    from adapters.synthea import SyntheaCsvAdapter

    d = SAMPLES / "synthea" / "csv"
    if not d.is_dir():
        print("synthea: samples missing")
        return
    a = SyntheaCsvAdapter()
    src = SourceInfo("bench")
    n = sum(isinstance(o, ConvertedBundle) for o in a.convert_path(d, src))
    best = float("inf")
    resources = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        outs = list(a.convert_path(d, src))
        best = min(best, time.perf_counter() - t0)
        resources = sum(len(o.bundle["entry"]) for o in outs if isinstance(o, ConvertedBundle))
    print(
        f"synthea-csv: {n} patients, {resources} resources, best {best * 1000:.0f} ms "
        f"-> {n / best:.2f} patients/s, {resources / best:.0f} resources/s (incl. R4B validation)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--all", action="store_true", help="all 29 sample documents, not just Microsoft's 22")
    args = ap.parse_args(argv)
    ms = SAMPLES / "ccda" / "ms-fhir-converter"
    if not ms.is_dir():
        print(f"samples not found at {SAMPLES}", file=sys.stderr)
        return 1
    paths = sorted(ms.glob("*.ccda"))
    if args.all:
        paths = sorted(p for p in (SAMPLES / "ccda").rglob("*") if p.is_file() and "fragments" not in p.parts)
    docs = [p.read_bytes() for p in paths]
    print(f"{len(docs)} C-CDA documents, best of {args.repeat} passes (after one warm-up pass)")
    print(f"{'converter':24} {'docs/s':>8} {'ms/doc':>8} {'fail':>5} {'res/doc':>8} {'valid/doc':>9}")
    results: dict[str, float] = {}
    for name, factory in (
        ("fhirbridge (ccda)", ours),
        ("python-fhir-converter", python_fhir_converter),
        ("ccda-to-fhir", ccda_to_fhir),
    ):
        try:
            fn = factory()
        except ImportError as exc:
            print(f"{name:24} not installed ({exc})")
            continue
        best, failures = _time(fn, docs, args.repeat)
        total = valid = 0
        for d in docs:
            try:
                b = fn(d)
            except Exception:
                continue
            t, v = _valid_count(b or {})
            total += t
            valid += v
        ok = len(docs) - failures
        results[name] = best / len(docs)
        print(
            f"{name:24} {len(docs) / best:8.1f} {best / len(docs) * 1000:8.2f} {failures:5d} "
            f"{total / max(ok, 1):8.1f} {valid / max(ok, 1):9.1f}"
        )
    if "fhirbridge (ccda)" in results and "python-fhir-converter" in results:
        print(
            f"speed-up vs python-fhir-converter: "
            f"{results['python-fhir-converter'] / results['fhirbridge (ccda)']:.2f}x"
        )
    bench_synthea(max(1, args.repeat // 2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
