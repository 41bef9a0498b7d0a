"""The adapter conformance kit (public API; ``fhirbridge adapters check NAME FILE...``).

Generic over any :class:`~adapters.base.Adapter`. For each input it:

1. converts the input twice and checks that
   * the adapter raised nothing (bad records must come back as :class:`RejectedRecord`);
   * every bundle validates against the R4B models (re-validated here, whatever the adapter did);
   * conversion is deterministic (byte-identical bodies, same SHA-256, same order);
   * every bundle holds a Provenance that targets every other resource and names the source
     organisation, the adapter, and the input's SHA-256;
   * every ``reference`` inside the bundle resolves to an entry of the same bundle;
   * every entry is a ``PUT Type/id`` whose id is a UUID;
2. converts truncated and mutated copies of the input and checks that each one either converts to a
   valid bundle or is rejected with a *located* :class:`ParseError` -- never an exception, never an
   :class:`InternalAdapterError`.

The result is a :class:`Report`; :meth:`Report.render` gives the human text, :meth:`Report.to_dict` JSON.
"""

from __future__ import annotations

import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.base import Adapter, ConvertedBundle, Outcome, RejectedRecord, SourceInfo
from adapters.bundle import (
    ADAPTER_IDENTIFIER_SYSTEM,
    INPUT_HASH_SYSTEM,
    ORG_IDENTIFIER_SYSTEM,
    validate_bundle,
)
from adapters.errors import InternalAdapterError, Location

CHECKS = ("no-crash", "r4b-valid", "deterministic", "provenance", "references", "put-entries", "mutations")


@dataclass
class CheckResult:
    name: str
    ok: bool = True
    details: list[str] = field(default_factory=list)

    def fail(self, detail: str) -> None:
        self.ok = False
        if len(self.details) < 20:
            self.details.append(detail)


@dataclass
class FileReport:
    path: str
    bundles: int = 0
    rejected: int = 0
    mutations: int = 0
    checks: dict[str, CheckResult] = field(default_factory=lambda: {c: CheckResult(c) for c in CHECKS})

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "ok": self.ok,
            "bundles": self.bundles,
            "rejected_records": self.rejected,
            "mutations_tried": self.mutations,
            "checks": {n: {"ok": c.ok, "details": c.details} for n, c in self.checks.items()},
        }


@dataclass
class Report:
    adapter: str
    version: str
    files: list[FileReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.files) and all(f.ok for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "version": self.version,
            "ok": self.ok,
            "files": [f.to_dict() for f in self.files],
        }

    def render(self) -> str:
        lines = [f"conformance check of adapter {self.adapter} {self.version}"]
        for f in self.files:
            lines.append(
                f"\n{'PASS' if f.ok else 'FAIL'}  {f.path}  ({f.bundles} bundle(s), {f.rejected} rejected "
                f"record(s), {f.mutations} mutated copies)"
            )
            for c in f.checks.values():
                lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}")
                lines.extend(f"        - {d}" for d in c.details)
        passed = sum(f.ok for f in self.files)
        lines.append(f"\n{passed}/{len(self.files)} input(s) passed: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def _collect(adapter: Adapter, path: Path, source: SourceInfo) -> tuple[list[Outcome], BaseException | None]:
    out: list[Outcome] = []
    try:
        for o in adapter.convert_path(path, source):
            out.append(o)
    except Exception as exc:
        return out, exc
    return out, None


def _references(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _references(v)


_REL_REF = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")


def check_bundle(cb: ConvertedBundle, rep: FileReport, where: str) -> None:
    """The per-bundle checks: validation, Provenance, references, PUT entries."""
    b = cb.bundle
    try:
        validate_bundle(b)
    except Exception as exc:  # pydantic ValidationError or anything the models raise
        rep.checks["r4b-valid"].fail(f"{where}: {str(exc).splitlines()[0][:300]}")
    entries = b.get("entry") or []
    keys: set[str] = set()
    full_urls: set[str] = set()
    for i, e in enumerate(entries):
        r = e.get("resource") or {}
        rt, rid = r.get("resourceType"), r.get("id")
        keys.add(f"{rt}/{rid}")
        if e.get("fullUrl"):
            full_urls.add(e["fullUrl"])
        req = e.get("request") or {}
        if req.get("method") != "PUT" or req.get("url") != f"{rt}/{rid}":
            rep.checks["put-entries"].fail(f"{where}: entry {i} ({rt}) is not 'PUT {rt}/{rid}'")
        try:
            uuid.UUID(str(rid))
        except ValueError:
            rep.checks["put-entries"].fail(f"{where}: entry {i} ({rt}) id {rid!r} is not a UUID")
    provs = [e["resource"] for e in entries if (e.get("resource") or {}).get("resourceType") == "Provenance"]
    if not provs:
        rep.checks["provenance"].fail(f"{where}: no Provenance in the bundle")
    else:
        prov = provs[-1]
        targets = {t.get("reference") for t in prov.get("target", [])}
        missing = sorted(k for k in keys if not k.startswith("Provenance/") and k not in targets)
        if missing:
            rep.checks["provenance"].fail(
                f"{where}: Provenance does not target {', '.join(missing[:3])}"
                + (" ..." if len(missing) > 3 else "")
            )
        idents = {((a.get("who") or {}).get("identifier") or {}).get("system") for a in prov.get("agent", [])}
        for system, what in (
            (ORG_IDENTIFIER_SYSTEM, "the source organisation"),
            (ADAPTER_IDENTIFIER_SYSTEM, "the adapter name and version"),
        ):
            if system not in idents:
                rep.checks["provenance"].fail(f"{where}: Provenance does not name {what}")
        ents = [((x.get("what") or {}).get("identifier") or {}) for x in prov.get("entity", [])]
        if not any(x.get("system") == INPUT_HASH_SYSTEM and x.get("value") == cb.input_sha256 for x in ents):
            rep.checks["provenance"].fail(f"{where}: Provenance does not carry the input SHA-256")
    for ref in _references(b):
        if ref.startswith("#") or ref in full_urls or ref in keys:
            continue
        if "://" in ref and not ref.startswith("urn:"):
            continue  # an absolute reference to another server is allowed
        if _REL_REF.match(ref) or ref.startswith("urn:uuid:"):
            rep.checks["references"].fail(f"{where}: reference {ref} does not resolve inside the bundle")
        else:
            rep.checks["references"].fail(f"{where}: malformed reference {ref!r}")


def _mutations(data: bytes, seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """Deterministic truncations and mutations of ``data``."""
    n = len(data)
    yield "empty", b""
    for frac in (0.1, 0.33, 0.5, 0.9):
        cut = max(1, int(n * frac))
        yield f"truncated to {cut} of {n} bytes", data[:cut]
    rng = random.Random(seed)
    junk = b"|^~\\&<>\"',;:\x00\xff\r\n\x0b\x1c{}[]"
    for k in range(count):
        if not n:
            break
        buf = bytearray(data)
        kind = k % 4
        if kind == 0:
            for _ in range(max(1, n // 200)):
                buf[rng.randrange(n)] = junk[rng.randrange(len(junk))]
            yield f"mutation {k}: random delimiter bytes", bytes(buf)
        elif kind == 1:
            i = rng.randrange(n)
            yield f"mutation {k}: {min(64, n - i)} bytes deleted at {i}", bytes(buf[:i] + buf[i + 64 :])
        elif kind == 2:
            lines = bytes(buf).splitlines(keepends=True)
            if len(lines) > 1:
                j = rng.randrange(len(lines))
                yield f"mutation {k}: line {j + 1} deleted", b"".join(lines[:j] + lines[j + 1 :])
            else:
                yield f"mutation {k}: bytes reversed", bytes(reversed(buf))
        else:
            i = rng.randrange(n)
            yield (
                f"mutation {k}: garbage inserted at {i}",
                bytes(buf[:i]) + bytes(rng.randrange(256) for _ in range(16)) + bytes(buf[i:]),
            )


def _located(loc: Location) -> bool:
    return any(v is not None for k, v in loc.to_dict().items() if k != "file")


def check_file(
    adapter: Adapter, path: Path, source: SourceInfo, *, mutations: int = 12, seed: int = 0
) -> FileReport:
    """Run every check on one input (a file, or a directory for adapters that read directories)."""
    rep = FileReport(str(path))
    first, exc1 = _collect(adapter, path, source)
    second, exc2 = _collect(adapter, path, source)
    for exc in (exc1, exc2):
        if exc is not None:
            rep.checks["no-crash"].fail(f"convert raised {type(exc).__name__}: {exc}")
            break
    if not first and exc1 is None:
        rep.checks["no-crash"].fail(
            "the adapter yielded nothing: every input must give a bundle or a rejection"
        )
    for i, o in enumerate(first, start=1):
        if isinstance(o, ConvertedBundle):
            rep.bundles += 1
            check_bundle(o, rep, f"record {i}")
        elif isinstance(o, RejectedRecord):
            rep.rejected += 1
            if isinstance(o.error, InternalAdapterError):
                rep.checks["no-crash"].fail(f"record {i}: internal adapter error: {o.error}")
    sig1 = [(type(o).__name__, o.body if isinstance(o, ConvertedBundle) else str(o.error)) for o in first]
    sig2 = [(type(o).__name__, o.body if isinstance(o, ConvertedBundle) else str(o.error)) for o in second]
    if sig1 != sig2:
        diff = next((i for i, (a, b) in enumerate(zip(sig1, sig2, strict=False), start=1) if a != b), None)
        rep.checks["deterministic"].fail(
            f"second conversion differs (record {diff})"
            if diff
            else f"record counts differ: {len(sig1)} vs {len(sig2)}"
        )
    for mname, mpath, cleanup in _mutated_inputs(path, mutations, seed):
        try:
            rep.mutations += 1
            outs, exc = _collect(adapter, mpath, source)
            if exc is not None:
                rep.checks["mutations"].fail(f"{mname}: convert raised {type(exc).__name__}: {exc}")
                continue
            for j, o in enumerate(outs, start=1):
                if isinstance(o, RejectedRecord):
                    if isinstance(o.error, InternalAdapterError):
                        rep.checks["mutations"].fail(
                            f"{mname}: record {j}: internal adapter error: {o.error}"
                        )
                    elif not _located(o.error.location) and not (mname == "empty" and o.error.location.file):
                        rep.checks["mutations"].fail(
                            f"{mname}: record {j}: error without a location: {o.error}"
                        )
                else:
                    sub = FileReport(mname)
                    check_bundle(o, sub, f"{mname}: record {j}")
                    for c in ("r4b-valid", "references", "provenance"):
                        for d in sub.checks[c].details:
                            rep.checks["mutations"].fail(d)
        finally:
            cleanup()
    return rep


def _mutated_inputs(path: Path, count: int, seed: int) -> Iterator[tuple[str, Path, Any]]:
    """Mutated copies on disk. For a directory, the largest file inside a copy of it is mutated."""
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: (-p.stat().st_size, str(p)))
        if not files:
            return
        target_rel = files[0].relative_to(path)
        data = files[0].read_bytes()
    else:
        target_rel = None
        data = path.read_bytes()
    for name, mutated in _mutations(data, seed, count):
        tmp = Path(tempfile.mkdtemp(prefix="fhirbridge-check-"))
        if target_rel is None:
            mpath = tmp / path.name
            mpath.write_bytes(mutated)
        else:
            mpath = tmp / path.name
            shutil.copytree(path, mpath)
            (mpath / target_rel).write_bytes(mutated)
            name = f"{target_rel}: {name}"
        yield name, mpath, lambda tmp=tmp: shutil.rmtree(tmp, ignore_errors=True)


def run(
    adapter: Adapter, paths: list[Path], source: SourceInfo, *, mutations: int = 12, seed: int = 0
) -> Report:
    """Check ``adapter`` on every path; never raises for a misbehaving adapter (it is reported)."""
    report = Report(adapter.name, getattr(adapter, "version", "?"))
    for p in paths:
        report.files.append(check_file(adapter, p, source, mutations=mutations, seed=seed))
    return report
