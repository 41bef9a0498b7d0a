"""The MPI linker (``fhirbridge mpi run``): links the Patient versions the index consumers keep, read from
the MPI topic, as the MPI's only writer (docs/mpi.md, "The linker as its own process").

With ``FHIRBRIDGE_MPI_LINKER=topic`` the index sink does not call the MPI: it publishes every Patient
version it keeps (:func:`patient_message`) to ``FHIRBRIDGE_TOPIC_MPI``, keyed by source organisation and
Patient id so that a patient's versions stay in order, and flushes them before its offsets are
committed. This sink consumes that topic. It first waits as a standby for the linker's leader lock on
the MPI database (:class:`~bridge.stores.leader.LeaderLock`), then claims a writer epoch in
``mpi_writer`` that every MPI write transaction checks: a former leader that was paused and wakes up
gets :class:`~bridge.stores.mpi.config.MpiWriterFenced`, commits nothing and exits non-zero.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from bridge.config import Settings
from bridge.consumers.checks import LocatedError, in_batch_order, is_retryable
from bridge.consumers.runtime import ConsumerRuntime, CpuClock, Record, run_consumer
from bridge.errors import TransientError
from bridge.logging import get_logger
from bridge.stores.index.store import IndexStore, content_digest
from bridge.stores.leader import LeaderLock, LeadershipLost, holder_name
from bridge.stores.mpi import PersonIndex
from bridge.stores.mpi.config import MpiWriterFenced

log = get_logger(__name__)

#: the linker's consumer group (one member links; a standby waits for the leader lock before joining)
MPI_GROUP = "fhirbridge-mpi"
#: the linker's leadership, a lock on the MPI database (one MPI, one linker)
MPI_ROLE = "mpi:linker"


class BadPatientMessage(LocatedError):
    """A record of the MPI topic is not a Patient message of :func:`patient_message`."""


class MpiRefused(LocatedError):
    """The MPI could not index the record's Patient (the index keeps it)."""


def patient_key(source_org: str, patient_id: str) -> bytes:
    """The MPI topic's key: a patient's versions land on one partition, in the order the index kept them."""
    return f"{source_org}|{patient_id}".encode()


def patient_message(source_org: str, resource: dict[str, Any], bundle_sha256: str, record: Record) -> bytes:
    """The MPI topic's value: the Patient the index kept, its organisation and where it came from."""
    return orjson.dumps(
        {
            "source_org": source_org,
            "resource": resource,
            "bundle_sha256": bundle_sha256,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
        }
    )


def read_patient_message(value: bytes | None) -> tuple[str, dict[str, Any]]:
    """``(source_org, Patient)`` of an MPI topic record, or :class:`BadPatientMessage`."""
    try:
        msg = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        raise BadPatientMessage(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise BadPatientMessage("not a JSON object")
    org, resource = msg.get("source_org"), msg.get("resource")
    if not isinstance(org, str) or not org:
        raise BadPatientMessage("no source_org", "source_org")
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        raise BadPatientMessage("resource is not a Patient", "resource")
    if not isinstance(resource.get("id"), str):
        raise BadPatientMessage("the Patient has no id", "resource.id")
    return org, resource


class MpiSink:
    """Links the Patient messages of the MPI topic into persons, as the MPI's only writer."""

    name = "mpi"

    def __init__(
        self,
        mpi_factory: Callable[[], PersonIndex],
        *,
        leader: LeaderLock | None = None,
        epoch: int | None = None,
        lease_s: float | None = None,
        mpi: PersonIndex | None = None,
        index_factory: Callable[[], IndexStore] | None = None,
    ) -> None:
        self.mpi_factory = mpi_factory
        self.mpi = mpi
        # links only the versions this index holds as current (None: every message, e.g. a benchmark);
        # opened at the first batch: a standby, or a leader before any message, leaves the index alone
        self.index_factory = index_factory
        self.index: IndexStore | None = None
        # the lock and the writer epoch this sink writes under (None: the caller guarantees one writer)
        self.leader = leader
        self.epoch = epoch
        self.lease_s = lease_s
        self.cpu = CpuClock()
        self.linked = 0
        self.superseded = 0

    def process(self, records: Sequence[Record]) -> list[tuple[Record, BaseException]]:
        if self.leader is not None:
            self.leader.check()  # a linker that lost its lock stops before touching the batch
        poison: list[tuple[Record, BaseException]] = []
        items: list[tuple[Record, str, dict[str, Any]]] = []
        with self.cpu.stage("parse"):
            for rec in records:
                try:
                    org, resource = read_patient_message(rec.value)
                except BadPatientMessage as exc:
                    poison.append((rec, exc))
                    continue
                items.append((rec, org, resource))
        if items and self.index_factory is not None:
            with self.cpu.stage("current"):
                items = self._current(items)
        if items:
            with self.cpu.stage("link"):
                self._link(items, poison)
        return in_batch_order(records, poison)

    def _current(
        self, items: list[tuple[Record, str, dict[str, Any]]]
    ) -> list[tuple[Record, str, dict[str, Any]]]:
        """The messages whose Patient version the index holds as current now. A message of a version
        the index has since replaced is dropped (the newer one's message follows it, or preceded it
        when two index consumers briefly shared a partition during a rebalance): the MPI takes every
        upsert as the latest, so a late older version must not reach it (decision 25)."""
        assert self.index_factory is not None
        try:
            if self.index is None:
                self.index = self.index_factory()
            current = self.index.current_versions("Patient", [r["id"] for _, _, r in items])
        except Exception as exc:
            if not is_retryable(exc):
                raise
            if self.index is not None:
                with contextlib.suppress(Exception):
                    self.index.close()
            self.index = None
            raise TransientError(f"index database unavailable: {type(exc).__name__}: {exc}") from exc
        kept = [it for it in items if current.get(it[2]["id"]) == content_digest(it[2])]
        self.superseded += len(items) - len(kept)
        return kept

    def _link(
        self, items: list[tuple[Record, str, dict[str, Any]]], poison: list[tuple[Record, BaseException]]
    ) -> None:
        """One transaction for the batch; if the MPI refuses it for a reason of the records', the Patients
        one by one, the refused ones to the dead letters (as the index sink's inline feed does). Upserting
        a version the MPI already holds changes nothing, so redeliveries and replays are harmless."""
        try:
            self._upsert([(org, resource) for _, org, resource in items])
            self.linked += len(items)
            return
        except (TransientError, MpiWriterFenced, LeadershipLost):
            raise
        except Exception as exc:
            log.warning(
                "mpi.batch_refused", error_class=type(exc).__name__, error=str(exc), patients=len(items)
            )
        for rec, org, resource in items:
            try:
                self._upsert([(org, resource)])
                self.linked += 1
            except (TransientError, MpiWriterFenced, LeadershipLost):
                raise
            except Exception as exc:
                poison.append(
                    (rec, MpiRefused(f"Patient/{resource['id']}: {type(exc).__name__}: {exc}", "resource"))
                )

    def _upsert(self, patients: list[tuple[str, dict[str, Any]]]) -> None:
        """Upsert under the claimed epoch; a lost database connection is transient (reopened next time,
        under the same epoch: a reconnection never claims anew)."""
        try:
            if self.mpi is None:
                self.mpi = self.mpi_factory()
                if self.epoch is not None:
                    self.mpi.hold_writer(self.epoch, lease_s=self.lease_s)
            self.mpi.upsert_patients(patients)
        except MpiWriterFenced as exc:
            log.error("mpi.writer_fenced", ours=exc.ours, current=exc.current)
            raise
        except Exception as exc:
            if not (is_retryable(exc) or _session_ended(exc)):
                raise
            if self.mpi is not None:
                with contextlib.suppress(Exception):
                    self.mpi.close()
            self.mpi = None
            raise TransientError(f"MPI database unavailable: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self.mpi is not None:
            with contextlib.suppress(Exception):
                self.mpi.close()
        if self.index is not None:
            with contextlib.suppress(Exception):
                self.index.close()
        if self.leader is not None:
            self.leader.release()
            self.leader.check()  # a lost leadership ends the process with an error, not with 0


def _session_ended(exc: BaseException) -> bool:
    """PostgreSQL ended the session (an idle-in-transaction timeout after a pause, an administrator):
    the connection is gone, not the batch's fault; retried on a new connection."""
    return getattr(exc, "sqlstate", None) in ("25P03", "57P01", "57P05")


def transaction_lease_s(settings: Settings) -> float:
    """How long a linker's MPI session may sit idle inside a transaction before PostgreSQL ends it: a
    paused former leader would otherwise hold the writers' lock, and the new leader's claim with it.
    Three leases: far longer than the linker computes between two statements."""
    return 3 * settings.ledger.leader_lease_s


def build_mpi_sink(settings: Settings, *, elect: bool = True, follow_index: bool = True) -> MpiSink:
    """The linker's sink. ``elect``: first wait as a standby until this process is the MPI's only writer,
    then claim a writer epoch (``fhirbridge mpi run``); without it the caller guarantees one writer.
    ``follow_index``: link only the versions the index (``FHIRBRIDGE_INDEX_URL``) holds as current."""
    url = settings.stores.mpi_url

    def mpi_factory() -> PersonIndex:
        return PersonIndex.open(url)

    def index_factory() -> IndexStore:
        return IndexStore.open(settings.stores.index_url)

    index = index_factory if follow_index else None
    if not elect:
        return MpiSink(mpi_factory, mpi=mpi_factory(), index_factory=index)
    leader = elect_linker(settings)
    try:
        mpi = mpi_factory()
        lease = transaction_lease_s(settings)
        epoch = mpi.claim_writer(leader.holder, lease_s=lease)
        log.info("mpi.writer", epoch=epoch, holder=leader.holder)
    except BaseException:
        leader.release()
        raise
    return MpiSink(mpi_factory, leader=leader, epoch=epoch, lease_s=lease, mpi=mpi, index_factory=index)


def elect_linker(settings: Settings) -> LeaderLock:
    """Wait as a standby until this process is the MPI's only linker (its lock on the MPI database).

    Nothing is consumed while waiting: the consumer joins its group only once it leads. When the
    leadership is lost later, SIGTERM stops the consumer loop, the sink refuses the batch in hand and
    the process exits non-zero; the writer epoch refuses any write it still had under way.
    """
    leader = LeaderLock(
        settings.stores.mpi_url,
        MPI_ROLE,
        lease_s=settings.ledger.leader_lease_s,
        on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM),
        holder=holder_name(settings.kafka.consumer_instance_id),
    )
    leader.acquire()
    return leader


def run_linker(
    settings: Settings,
    group_id: str = MPI_GROUP,
    *,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    exit_when_idle: float | None = None,
    sink_factory: Callable[[Settings], MpiSink] | None = None,
) -> ConsumerRuntime:
    """:func:`bridge.consumers.runtime.run_consumer` for the MPI topic: until SIGTERM/SIGINT (or
    ``exit_when_idle`` seconds without a record); ``/metrics``, ``/livez`` and ``/readyz`` on
    ``metrics_host``:``metrics_port`` from before the leader lock is awaited (a standby is live and
    ready). Returns the stopped runtime (its counts)."""
    if settings.stores.mpi_linker != "topic":
        log.warning(
            "mpi.linker_mode",
            detail="FHIRBRIDGE_MPI_LINKER is not 'topic' here: index consumers configured alike link inline "
            "and publish nothing to the MPI topic",
        )
    factory = sink_factory or build_mpi_sink
    return run_consumer(
        settings,
        lambda config, _bootstrap: factory(config),
        group_id,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        exit_when_idle=exit_when_idle,
        topics=[settings.kafka.topics.mpi],
    )
