"""The audit log: the hash of every stored AuditEvent, appended in ``seq`` order to a second Merkle log
with signed checkpoints (``fhirbridge audit run``), and its verifier (``fhirbridge audit verify``).

**The mapping.** Leaf ``i`` of the audit log is the ``i``-th audit row in ``seq`` order
(:func:`bridge.stores.audit.leaf_entry`: the event's SHA-256, the organisation, ``offset`` = the row's
``seq``). The log itself says where the appender stopped: the ``offset`` of its last leaf is the last
``seq`` appended, so a restart continues with ``since(that seq)``. Gaps in ``seq`` (PostgreSQL's
sequences skip numbers when a transaction rolls back) are harmless: nothing assumes ``seq == i + 1``.
An append and the position it records are one transaction, so a crash appends a batch wholly or not
at all.

**One writer.** One appender runs per audit log (like ``ledger run``). A second one would only repeat
the work: it reads the same rows in the same order, and the log's idempotency (by hash and
organisation) hands its batches the leaves already appended. When the log's size is not the one it left
it at, the appender reads its position from the log again, and checks that the last leaf names the row
it says (same ``seq``, id and hash). Entries that anything else appends, or a logged row deleted since,
break the mapping: the appender stops with :class:`AuditLogConflict` rather than append after them.

**Verification** (:func:`verify_audit_log`) recomputes every row's hash from its body and walks the rows
and the leaves side by side in ``seq`` order, after checking the log itself with
:func:`ledger.audit.audit` (leaf hashes, tiles, signed checkpoints, their consistency). The first
problem is named by ``seq`` and event id: a leaf without its row (**missing**: a deleted row), a row
whose body, hash or indexed columns no longer match its leaf (**altered**), or a row without a leaf
(**extra**: inserted among logged rows, or older than the grace period and still not logged).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from bridge.config import Settings
from bridge.errors import ConfigError, TransientError
from bridge.health import Health
from bridge.logging import get_logger
from bridge.stores.audit import (
    NO_ORGANIZATION,
    AuditError,
    AuditRow,
    AuditStore,
    columns,
    leaf_entry,
    open_audit_log,
)
from bridge.stores.leader import LeaderLock, holder_name
from bridge.stores.ledger import open_ledger
from ledger.audit import AuditReport, audit
from ledger.entry import LedgerEntry
from ledger.errors import InvalidEntry, InvalidKey, StorageUnavailable
from ledger.log import Ledger
from ledger.note import Signer

log = get_logger(__name__)

#: rows per append transaction
BATCH = 1000


class AuditLogConflict(AuditError):
    """The audit log does not continue where the appender expects (it holds entries the appender did not
    write, or a row repeats a logged event): it stops instead of letting leaves and rows drift apart.
    ``seq`` is the first row concerned."""

    def __init__(self, seq: int) -> None:
        super().__init__(
            f"audit row {seq}: the audit log does not continue where the audit rows do (entries written by "
            "something else, or a row repeating a logged event)"
        )
        self.seq = seq


class AuditAppender:
    """Appends audit rows to the audit log in ``seq`` order, ``batch`` rows per transaction. One per log."""

    def __init__(self, store: AuditStore, audit_log: Ledger, *, batch: int = BATCH) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.store = store
        self.log = audit_log
        self.batch = batch
        self._last_seq: int | None = None  # None: read it from the log
        self._size = 0
        self._horizon: int | None = None  # no row can appear at or below it any more (PostgreSQL)

    def last_appended_seq(self) -> int:
        """The ``seq`` of the last row in the log (the ``offset`` of its last leaf), 0 for an empty log.

        Raises :class:`AuditLogConflict` when that leaf names no such row (the log holds entries the
        appender did not write, or the row was deleted since: ``fhirbridge audit verify`` says which).
        """
        size = self.log.size()
        if size == 0:
            return 0
        leaf = self.log.entry(size - 1)
        row = self.store.get(leaf.message_id) if leaf.message_id else None
        if row is None or row.seq != leaf.offset or row.sha256 != leaf.bundle_sha256:
            raise AuditLogConflict(leaf.offset)
        return leaf.offset

    def step(self) -> int:
        """Append the next batch of rows; how many were appended (0: caught up).

        Raises :class:`AuditLogConflict`, :class:`~bridge.errors.TransientError` (either database is
        unavailable; nothing was appended, call again later).
        """
        try:
            if self._last_seq is not None and self.log.size() != self._size:
                self._last_seq = None  # someone else appended: the log says where things stand
            if self._last_seq is None:
                self._size = self.log.size()
                self._last_seq = self.last_appended_seq()
            upto = self._horizon
            if upto is None or self._last_seq >= upto:  # PostgreSQL: a new horizon once this one is reached
                upto = self._horizon = self.store.horizon()
            rows = self.store.leaves_since(self._last_seq, self.batch, upto=upto)
            if len(rows) < self.batch:
                self._horizon = None  # everything up to it is read (even if its last row is gone)
            if not rows:
                return 0
            indices = self.log.append([leaf_entry(r) for r in rows])
        except StorageUnavailable as exc:
            self._last_seq = None
            raise TransientError("the audit log database is unavailable") from exc
        except BaseException:
            self._last_seq = None
            raise
        expected = list(range(self._size, self._size + len(rows)))
        if indices != expected:
            first = next(r.seq for r, i, e in zip(rows, indices, expected, strict=True) if i != e)
            self._last_seq = None
            raise AuditLogConflict(first)
        self._last_seq = rows[-1].seq
        self._size += len(rows)
        return len(rows)

    def catch_up(self) -> int:
        """Append until no row is left; how many were appended."""
        total = 0
        while n := self.step():
            total += n
        return total


@dataclass(slots=True)
class AppendProgress:
    """What :func:`run_audit_log` has done so far, handed to its ``until``."""

    appended: int = 0
    caught_up: bool = False
    idle_seconds: float = 0.0


def require_audit_signer_key(settings: Settings) -> str:
    """The audit log's signing key, or :class:`ConfigError` naming the path tried and how to make one.

    Like the ledger consumer, the appender refuses to run without a key: it would append leaves that no
    checkpoint ever signs (``--unsigned`` is for tests).
    """
    audit_settings = settings.audit
    path = audit_settings.key_file
    hint = (
        "create one with `fhirbridge audit keygen` (or `fhirbridge ledger keygen --name "
        f"{audit_settings.origin}` and point FHIRBRIDGE_AUDIT_KEY_FILE at the .key file)"
    )
    if path is None or not path.is_file():
        raise ConfigError(f"no audit log signing key at {path}: {hint}")
    try:
        text: str = path.read_text(encoding="utf-8").strip()
        signer = Signer.from_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot read the audit log signing key {path}: {exc.strerror}") from None
    except (InvalidKey, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a signing key ({exc}): {hint}") from None
    if signer.name != audit_settings.origin:
        raise ConfigError(
            f"the audit log signing key {path} is named {signer.name!r}, but the audit log's origin is "
            f"{audit_settings.origin!r} (FHIRBRIDGE_AUDIT_ORIGIN): verifiers look a checkpoint's key up by "
            "its origin"
        )
    return text


def elect_audit_writer(settings: Settings, stop: threading.Event) -> LeaderLock | None:
    """Wait as a standby until this process is the audit log's only appender (as the ledger's writer
    is elected, decision 38): ``None`` when ``stop`` is set first. A leadership lost later sets
    ``stop``; the loop then raises :class:`~bridge.stores.leader.LeadershipLost`."""
    leader = LeaderLock(
        settings.audit.log_url,
        f"audit:{settings.audit.origin}",
        lease_s=settings.ledger.leader_lease_s,
        on_lost=stop.set,
        holder=holder_name(settings.kafka.consumer_instance_id),
    )
    return leader if leader.acquire(stop) else None


def run_audit_log(
    settings: Settings,
    *,
    until: Callable[[AppendProgress], bool] | None = None,
    unsigned: bool = False,
    batch: int = BATCH,
    idle_sleep: float = 0.1,
    max_backoff: float = 5.0,
    leader: LeaderLock | None = None,
    health: Health | None = None,
) -> AppendProgress:
    """The appender's loop: append new audit rows, sign checkpoints (in the append when
    ``checkpoint_every`` entries or ``checkpoint_interval_ms`` have passed; while idle, over the tail of
    a burst once the interval has passed), and back off while a database is unavailable. Once caught up
    it waits ``idle_sleep`` seconds before it looks again, so that a busy service's rows are appended
    in batches of hundreds rather than a few (each append is a durable transaction). Runs until
    ``until(progress)`` is true (checked after every step), then signs a checkpoint over everything
    appended and returns the progress.

    With ``leader`` (:func:`elect_audit_writer`), the appender claims a new writer epoch in the log
    first, so that a former appender that wakes up late has every append refused
    (:class:`~ledger.errors.WriterFenced`), and checks its leadership before every step: a lost one
    raises :class:`~bridge.stores.leader.LeadershipLost` without signing anything more. ``health``,
    when given, is beaten every turn of the loop and not ready while a database is unavailable.

    Raises :class:`ConfigError` without a usable signing key (unless ``unsigned``),
    :class:`AuditLogConflict` when another writer appends to the log.
    """
    signer = None if unsigned else require_audit_signer_key(settings)
    interval = settings.ledger.checkpoint_interval_ms / 1000
    store = AuditStore.open(settings.audit.url)
    try:
        audit_log = open_audit_log(settings, signer_key=signer)
        if leader is not None:
            epoch = audit_log.claim_writer(
                leader.holder, idle_in_transaction_ms=int(3 * settings.ledger.leader_lease_s * 1000)
            )
            log.info("audit.writer", epoch=epoch, holder=leader.holder)
    except BaseException:
        store.close()
        raise
    appender = AuditAppender(store, audit_log, batch=batch)
    progress = AppendProgress()
    backoff = 0.0
    idle_since = time.monotonic()
    last_sign = 0.0
    reachable = {"database": True}
    if health is not None:
        health.add_check(
            "database", lambda: (reachable["database"], "ok" if reachable["database"] else "unavailable")
        )
        health.set_state("running")
    try:
        while True:
            if leader is not None:
                leader.check()
            if health is not None:
                health.beat()
            try:
                n = appender.step()
                if n == 0 and signer is not None and time.monotonic() - last_sign >= interval:
                    audit_log.maybe_checkpoint()
                    last_sign = time.monotonic()
                backoff = 0.0
                reachable["database"] = True
            except (TransientError, StorageUnavailable) as exc:
                reachable["database"] = False
                backoff = min(max(backoff * 2, 0.05), max_backoff)
                log.warning("audit.log_backoff", retry_in=backoff, error=type(exc).__name__)
                time.sleep(backoff)
                continue
            now = time.monotonic()
            if n:
                progress.appended += n
                idle_since = now
            progress.caught_up = n < batch
            progress.idle_seconds = now - idle_since
            if until is not None and until(progress):
                break
            if n == 0:
                time.sleep(idle_sleep)
        if leader is not None:
            leader.check()  # a lost leadership signs nothing more and ends the process with an error
        if health is not None:
            health.set_state("stopping")
        if signer is not None:
            audit_log.checkpoint_now()
        log.info("audit.log_stopped", appended=progress.appended, size=audit_log.size())
        return progress
    finally:
        audit_log.close()
        store.close()
        if leader is not None:
            leader.release()


# -- verification ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditProblem:
    """One finding of :func:`verify_audit_log`: ``kind`` is ``missing`` (a logged event has no row),
    ``altered`` (the row no longer matches its leaf), ``extra`` (a row without a leaf) or ``order`` (the
    log's leaves are not in ``seq`` order); ``seq`` and ``event_id`` name the event."""

    kind: str
    seq: int
    event_id: str | None
    detail: str

    def render(self) -> str:
        return f"{self.kind} event seq {self.seq} id {self.event_id or '?'}: {self.detail}"


@dataclass(slots=True)
class AuditVerifyReport:
    """The outcome of :func:`verify_audit_log`; ``ok`` only when the rows, the leaves and the log agree."""

    rows_checked: int = 0
    leaves: int = 0
    pending: int = 0
    log: AuditReport = field(default_factory=AuditReport)
    problems: list[AuditProblem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.log.ok and not self.problem_count

    @property
    def first(self) -> AuditProblem | None:
        """The first problem in ``seq`` order."""
        return min(self.problems, key=lambda p: p.seq) if self.problems else None

    def add(self, problem: AuditProblem) -> None:
        self.problem_count += 1
        if len(self.problems) < 100:
            self.problems.append(problem)


def _leaves(audit_log: Ledger, size: int, batch: int) -> Iterator[LedgerEntry]:
    for rows in audit_log.storage.iter_entries(0, batch):
        for row in rows:
            if row.index >= size:
                return
            yield LedgerEntry.from_canonical(row.entry)


def _rows(store: AuditStore, batch: int) -> Iterator[AuditRow]:
    for rows in store.iter_all(batch):
        yield from rows


def _mismatch(row: AuditRow, leaf: LedgerEntry) -> str | None:
    """Why ``row`` does not match ``leaf`` (the same ``seq``), or None."""
    body_hash = row.body_sha256()
    if body_hash != leaf.bundle_sha256:
        return "its body's hash differs from the logged hash"
    if row.sha256 != body_hash:
        return "its stored hash differs from its body's hash"
    if row.id != leaf.message_id:
        return "its id differs from the logged event id"
    if (row.organization or NO_ORGANIZATION) != leaf.source_org or row.recorded != leaf.ingested_at:
        return "its organisation or time differs from the logged one"
    try:
        derived = columns(orjson.loads(row.body))
    except (orjson.JSONDecodeError, AuditError):
        return "its body is not an AuditEvent"
    if derived != row.columns():
        return "its indexed columns differ from its body"
    return None


def verify_audit_log(
    store: AuditStore,
    audit_log: Ledger,
    verifier_keys: Sequence[str],
    *,
    trusted_checkpoint: str | None = None,
    grace_seconds: float = 300.0,
    now: datetime | None = None,
    batch: int = 10_000,
) -> AuditVerifyReport:
    """Check every audit row against the audit log, and the log itself (see the module docstring).

    Rows after the last leaf are pending (the appender has not reached them yet) when recorded less
    than ``grace_seconds`` before ``now``; older ones are problems. Returns a report (never raises for
    a bad row or log); raises :class:`~bridge.errors.TransientError` or
    :class:`~ledger.errors.StorageUnavailable` when a database cannot be read.
    """
    report = AuditVerifyReport()
    report.log = audit(audit_log, verifier_keys, trusted_checkpoint=trusted_checkpoint, batch=batch)
    size = report.log.size
    horizon = (now or datetime.now(UTC)).timestamp() - grace_seconds
    leaves = _leaves(audit_log, size, batch)
    rows = _rows(store, batch)
    leaf = next(leaves, None)
    row = next(rows, None)
    previous = -1
    try:
        while leaf is not None or row is not None:
            if leaf is not None and leaf.offset <= previous:
                report.add(AuditProblem("order", leaf.offset, leaf.message_id, "leaf out of seq order"))
                previous, leaf = leaf.offset, next(leaves, None)
                continue
            if leaf is not None and (row is None or leaf.offset < row.seq):
                report.leaves += 1
                report.add(
                    AuditProblem("missing", leaf.offset, leaf.message_id, "logged, but its row is gone")
                )
                previous, leaf = leaf.offset, next(leaves, None)
            elif row is not None and (leaf is None or row.seq < leaf.offset):
                report.rows_checked += 1
                if leaf is not None:
                    report.add(AuditProblem("extra", row.seq, row.id, "a row among logged rows has no leaf"))
                elif _recorded(row) >= horizon:
                    report.pending += 1
                else:
                    report.add(
                        AuditProblem(
                            "extra", row.seq, row.id, f"not logged {grace_seconds:g} s after it was recorded"
                        )
                    )
                row = next(rows, None)
            else:
                assert leaf is not None and row is not None
                report.leaves += 1
                report.rows_checked += 1
                why = _mismatch(row, leaf)
                if why is not None:
                    report.add(AuditProblem("altered", row.seq, row.id, why))
                previous, leaf, row = leaf.offset, next(leaves, None), next(rows, None)
    except InvalidEntry as exc:  # a stored leaf that is not an entry: ledger.audit has reported it
        report.log.bad(None, f"an audit log entry cannot be read: {exc}")
    return report


def _recorded(row: AuditRow) -> float:
    try:
        return datetime.fromisoformat(row.recorded.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")  # an unreadable time is never "recent"


def verify_configured(
    settings: Settings,
    verifier_keys: Sequence[str],
    *,
    audit_url: str | None = None,
    log_url: str | None = None,
    origin: str | None = None,
    trusted_checkpoint: str | None = None,
    grace_seconds: float = 300.0,
) -> AuditVerifyReport:
    """:func:`verify_audit_log` over the databases of ``settings`` (or the URLs given)."""
    audit_settings = settings.audit
    store = AuditStore.open(audit_url or audit_settings.url)
    try:
        audit_log = open_ledger(log_url or audit_settings.log_url, origin=origin or audit_settings.origin)
        try:
            return verify_audit_log(
                store,
                audit_log,
                verifier_keys,
                trusted_checkpoint=trusted_checkpoint,
                grace_seconds=grace_seconds,
            )
        finally:
            audit_log.close()
    finally:
        store.close()


__all__ = [
    "AppendProgress",
    "AuditAppender",
    "AuditLogConflict",
    "AuditProblem",
    "AuditVerifyReport",
    "require_audit_signer_key",
    "run_audit_log",
    "verify_audit_log",
    "verify_configured",
]
