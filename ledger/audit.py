"""Full audit of a stored log: ``fhirbridge ledger verify``.

Recomputes the tree from the stored entries (never trusting stored hashes), and checks:

1. every row: indices contiguous from 0, the stored leaf hash equals ``SHA-256(0x00 || entry)``, the
   entry is valid canonical JSON and its indexed columns match it;
2. every stored tile equals the recomputed one (tiles serve the proofs);
3. every stored checkpoint: its signature (against the given verifier keys), origin, and root equal
   the recomputed root at its size; successive checkpoints are consistent (proved from stored tiles);
4. optionally a checkpoint the auditor kept (``--from-checkpoint``): the log still has that root at
   that size, and is consistent with it.

The first bad index is reported when rows were altered.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

from ledger import checkpoint as _checkpoint
from ledger import merkle
from ledger.entry import LedgerEntry
from ledger.errors import LedgerError, VerificationError
from ledger.log import Ledger
from ledger.storage import dedup_key, leaf_key
from ledger.tiles import Tile, TileBuilder

__all__ = ["AuditReport", "audit"]


@dataclass(slots=True)
class AuditReport:
    """The outcome of :func:`audit`. ``ok`` is True only when no problem was found."""

    size: int = 0
    entries_checked: int = 0
    checkpoints_checked: int = 0
    tiles_checked: int = 0
    first_bad_index: int | None = None
    problems: list[str] = field(default_factory=list)
    #: remarks that are not problems (e.g. entries appended while the audit ran)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad(self, index: int | None, message: str) -> None:
        if index is not None and (self.first_bad_index is None or index < self.first_bad_index):
            self.first_bad_index = index
        if len(self.problems) < 100:
            self.problems.append(message)


def audit(
    ledger: Ledger,
    verifier_keys: Sequence[str],
    *,
    trusted_checkpoint: str | None = None,
    batch: int = 10_000,
) -> AuditReport:
    """Audit the whole log; returns a report (never raises for a bad log, only for a bad database).

    Raises :class:`~ledger.errors.StorageUnavailable` when the database cannot be read.
    """
    report = AuditReport()
    storage = ledger.storage
    # A live log may grow while it is audited: the audit covers the first ``size`` entries. Checkpoints
    # are read first, so none of them can be newer than ``size``.
    cps = storage.checkpoints()
    report.size = size = storage.size()
    roots: dict[int, bytes] = {}
    wanted = {s for s, _, _ in cps if 0 < s <= size}
    trusted = None
    if trusted_checkpoint is not None:
        try:
            trusted = _checkpoint.open(trusted_checkpoint, verifier_keys)
        except (VerificationError, LedgerError) as exc:
            report.bad(None, f"trusted checkpoint: {exc}")
        else:
            if trusted.origin != ledger.origin:
                report.bad(
                    None, f"trusted checkpoint is for the log {trusted.origin!r}, not {ledger.origin!r}"
                )
                trusted = None
            elif trusted.size > size:
                report.bad(
                    None, f"trusted checkpoint has size {trusted.size} but the log has only {size} entries"
                )
            elif trusted.size > 0:
                wanted.add(trusted.size)

    builder = TileBuilder()
    recomputed: dict[tuple[int, int], Tile] = {}
    expected = 0
    for rows in storage.iter_entries(0, batch):
        for row in rows:
            if row.index >= size and row.index == expected:
                break  # appended after the audit started
            if row.index != expected:
                report.bad(expected, f"index {expected}: row missing (next stored index is {row.index})")
                return _finish(report, ledger, cps, roots, trusted, {}, verifier_keys, complete=False)
            leaf = merkle.leaf_hash(row.entry)
            if leaf != row.leaf_hash:
                report.bad(row.index, f"index {row.index}: stored leaf hash does not match the entry")
            try:
                entry = LedgerEntry.from_canonical(row.entry)
                if entry.canonical() != row.entry:
                    raise LedgerError("not canonical")
                if row.dkey != dedup_key(entry.bundle_sha256, entry.source_org) or row.lkey != leaf_key(leaf):
                    raise LedgerError("index keys differ from the entry")
            except LedgerError as exc:
                report.bad(row.index, f"index {row.index}: entry invalid: {exc}")
            builder.append([leaf])
            expected += 1
            report.entries_checked += 1
            if expected in wanted:
                roots[expected] = builder.root()
        for tile in builder.take_dirty():
            recomputed[(tile.k, tile.t)] = tile
        if len(recomputed) > 64:
            _compare_tiles(report, ledger, recomputed, final=False)
        if expected >= size:
            break
    grown = storage.size()
    if grown > size:
        # the stored partial tiles now hold the new entries too: only the complete ones compare
        recomputed = {k: t for k, t in recomputed.items() if t.width == 256}
        report.notes.append(
            f"{grown - size} entries were appended while the audit ran; it covers the first {size}"
        )
    if expected != size:
        report.bad(expected, f"the log claims {size} entries but {expected} are stored")
    return _finish(report, ledger, cps, roots, trusted, recomputed, verifier_keys, complete=True)


def _compare_tiles(
    report: AuditReport, ledger: Ledger, tiles: dict[tuple[int, int], Tile], *, final: bool
) -> None:
    # Complete tiles can be compared (and forgotten) at once; partial ones only at the end.
    keys = set(tiles) if final else {k for k, t in tiles.items() if t.width == 256}
    stored = ledger.storage.get_tiles(keys)
    for key in sorted(keys):
        tile = tiles.pop(key)
        report.tiles_checked += 1
        got = stored.get(key)
        if got is None or got != (tile.width, tile.encode()):
            first = None
            if tile.k == 0 and got is not None:
                try:
                    st = Tile.decode(tile.k, tile.t, got[0], got[1])
                    diffs = [
                        i
                        for i, (a, b) in enumerate(zip(st.levels[0], tile.levels[0], strict=False))
                        if a != b
                    ]
                    first = (tile.t << 8) + diffs[0] if diffs else None
                except ValueError:  # wrong length: the whole tile is suspect
                    first = tile.t << 8
            elif tile.k == 0:
                first = tile.t << 8
            report.bad(first, f"stored tile {key} differs from the recomputed tree")


def _finish(
    report: AuditReport,
    ledger: Ledger,
    cps: list[tuple[int, bytes, str]],
    roots: dict[int, bytes],
    trusted: _checkpoint.Checkpoint | None,
    recomputed: dict[tuple[int, int], Tile],
    verifier_keys: Sequence[str],
    *,
    complete: bool,
) -> AuditReport:
    if complete:
        _compare_tiles(report, ledger, recomputed, final=True)
    prev: tuple[int, bytes] | None = None
    range_hint: int | None = None  # when only a checkpoint root betrays a change: the range's start
    for size, stored_root, note in cps:
        report.checkpoints_checked += 1
        try:
            cp = _checkpoint.open(note, verifier_keys)
        except (VerificationError, LedgerError) as exc:
            report.bad(None, f"checkpoint {size}: {exc}")
            continue
        if cp.origin != ledger.origin or cp.size != size or cp.root_hash != stored_root:
            report.bad(None, f"checkpoint {size}: signed body does not match its stored size/root/origin")
            continue
        calc = roots.get(size)
        if calc is None:
            if complete:
                report.bad(None, f"checkpoint {size}: beyond the stored entries")
            continue
        if calc != cp.root_hash:
            lo = prev[0] if prev else 0
            range_hint = lo if range_hint is None else min(range_hint, lo)
            report.bad(
                None, f"checkpoint {size}: root differs from the recomputed tree (entries {lo}..{size - 1})"
            )
        if prev is not None:
            try:
                proof = ledger.consistency_proof(prev[0], size)
                merkle.verify_consistency(prev[0], size, proof, prev[1], cp.root_hash)
            except (VerificationError, LedgerError) as exc:
                report.bad(None, f"checkpoints {prev[0]} -> {size}: not consistent ({exc})")
        prev = (size, cp.root_hash)
    if trusted is not None and trusted.size in roots:
        calc = roots[trusted.size]
        if calc != trusted.root_hash:
            report.bad(
                None,
                f"trusted checkpoint {trusted.size}: the log's tree at that size has another root "
                f"({base64.b64encode(calc).decode()})",
            )
    if report.first_bad_index is None and range_hint is not None:
        report.first_bad_index = range_hint
    return report
