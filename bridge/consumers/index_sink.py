"""The index sink: every resource upserted by its deterministic id, with its bundle's provenance; the
Patient versions the index keeps feed the MPI (docs/query.md, docs/mpi.md): in-process
(``FHIRBRIDGE_MPI_LINKER=inline``), or through the MPI topic to ``fhirbridge mpi run`` (``topic``). What
the index keeps is R4: a bundle produced before the adapters mapped R4B to R4 is mapped here
(docs/validation.md)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from kafka import KafkaProducer
from kafka.errors import KafkaError

from adapters.r4 import NotR4, bundle_to_r4, may_need_mapping
from bridge.consumers.checks import (
    BadBundle,
    EnvelopeChecker,
    LocatedError,
    in_batch_order,
    is_retryable,
    load_checker,
    parse_bundle,
)
from bridge.consumers.mpi_sink import elect_linker, patient_key, patient_message, transaction_lease_s
from bridge.consumers.runtime import BadTimestamp, CpuClock, Record
from bridge.errors import TransientError
from bridge.logging import get_logger
from bridge.stores.index.store import IncomingBundle, IndexStore, content_digest
from bridge.stores.leader import LeaderLock, LeadershipLost
from bridge.stores.mpi import PersonIndex
from bridge.stores.mpi.config import MpiWriterFenced
from bridge.stream.broker import resolve_bootstrap
from bridge.stream.producer import producer_config
from bridge.stream.security import connecting  # TLS/SASL and a one-line failure (docs/streams.md)

log = get_logger(__name__)


class MpiRefused(LocatedError):
    """The MPI could not index a Patient of the record's bundle (the bundle itself is in the index)."""


class NotR4Bundle(LocatedError):
    """The record's bundle holds R4B content that R4 cannot express (:mod:`adapters.r4`): the index,
    which serves R4, does not keep it."""


class _PatientEntry(NamedTuple):
    source_org: str
    resource: dict[str, Any]
    record: Record
    #: the Patient's position in its bundle's ``entry`` array
    entry: int
    bundle_sha256: str = ""


class IndexSink:
    """Upserts every resource by its deterministic id, with the bundle's provenance; feeds the MPI."""

    name = "index"

    def __init__(
        self,
        store: IndexStore,
        checker: EnvelopeChecker,
        mpi: PersonIndex | None = None,
        mpi_factory: Callable[[], PersonIndex] | None = None,
        *,
        mpi_producer: Any | None = None,
        mpi_topic: str = "mpi.patients",
        leader: LeaderLock | None = None,
    ) -> None:
        self.store = store
        self.checker = checker
        self.mpi = mpi
        self.mpi_factory = mpi_factory
        # linking inline under the MPI's leader lock and writer epoch (``index run``); None: the caller
        # guarantees one MPI writer (replay, tests)
        self.leader = leader
        # FHIRBRIDGE_MPI_LINKER=topic: the kept Patient versions go to ``mpi_topic`` instead of the MPI
        self.mpi_producer = mpi_producer
        self.mpi_topic = mpi_topic
        self.cpu = CpuClock()

    def process(self, records: Sequence[Record]) -> list[tuple[Record, BaseException]]:
        if self.leader is not None:
            self.leader.check()  # an inline linker that lost its lock stops before touching the batch
        poison: list[tuple[Record, BaseException]] = []
        incoming: list[IncomingBundle] = []
        patients: list[_PatientEntry] = []
        with self.cpu.stage("envelope"):
            checked = self.checker.check_many(records, poison)
        t0 = time.thread_time()
        for rec, env in checked:
            try:
                bundle = parse_bundle(rec.value or b"")
                received_at = rec.timestamp_iso
                # bundles of older releases may hold what R4B adds; since then the adapters map it
                if may_need_mapping(bundle, rec.value or b""):
                    bundle_to_r4(bundle)
            except (BadBundle, BadTimestamp) as exc:
                poison.append((rec, exc))
                continue
            except NotR4 as exc:
                poison.append((rec, NotR4Bundle(str(exc), ".".join(str(p) for p in exc.loc))))
                continue
            incoming.append(
                IncomingBundle(
                    bundle=bundle,
                    bundle_sha256=env.bundle_sha256,
                    source_org=env.source_org,
                    source_patient=rec.key.decode("utf-8", "replace") if rec.key else None,
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                    received_at=received_at,
                )
            )
            for i, e in enumerate(bundle["entry"]):
                if e["resource"]["resourceType"] == "Patient":
                    patients.append(_PatientEntry(env.source_org, e["resource"], rec, i, env.bundle_sha256))
        self.cpu.add("parse", time.thread_time() - t0)
        if incoming:
            with self.cpu.stage("store"):
                self.store.apply(incoming)  # TransientError propagates: the runtime backs off
        if patients and self.mpi_producer is not None:
            with self.cpu.stage("mpi_topic"):
                self._publish_kept(patients)
        elif patients and (self.mpi is not None or self.mpi_factory is not None):
            with self.cpu.stage("mpi"):
                self._feed_mpi(patients, poison)
        return in_batch_order(records, poison)

    def _kept(self, patients: list[_PatientEntry]) -> list[_PatientEntry]:
        """The Patient versions the index keeps (see :meth:`_feed_mpi`)."""
        current = self.store.current_versions("Patient", [p.resource["id"] for p in patients])
        return [p for p in patients if current.get(p.resource["id"]) == content_digest(p.resource)]

    def _publish_kept(self, patients: list[_PatientEntry]) -> None:
        """Publish the kept Patient versions to the MPI topic for ``fhirbridge mpi run``, acknowledged by
        every in-sync replica before this returns: the runtime commits the batch's offsets only after,
        so nothing is acknowledged that the linker will not see. A broker that does not take them is
        transient (the batch is retried; the index upserts and the messages are idempotent for it)."""
        kept = self._kept(patients)
        if not kept:
            return
        producer = self.mpi_producer
        assert producer is not None
        try:
            futures = [
                producer.send(
                    self.mpi_topic,
                    key=patient_key(p.source_org, p.resource["id"]),
                    value=patient_message(p.source_org, p.resource, p.bundle_sha256, p.record),
                )
                for p in kept
            ]
            producer.flush(30)
            for f in futures:
                f.get(timeout=30)
        except KafkaError as exc:
            raise TransientError(
                f"MPI topic {self.mpi_topic} did not take the Patients: {type(exc).__name__}: {exc}"
            ) from exc

    def _feed_mpi(self, patients: list[_PatientEntry], poison: list[tuple[Record, BaseException]]) -> None:
        """Give the MPI the Patient versions the index keeps, and nothing else.

        A delivery the index did not keep (an older version arriving late, or a replay of the stream
        from an earlier offset) is not current, so it must not reach the MPI either: the MPI takes
        each upsert as the latest, and would re-score the older demographics and add to the link
        history on every replay. If the MPI refuses the batch for a reason other than its database,
        the Patients are tried one by one, and the records of those it refuses go to the dead letters
        with the reason, so that one bad record cannot stop the consumer.
        """
        kept = self._kept(patients)
        if not kept:
            return
        try:
            self._upsert_mpi([(p.source_org, p.resource) for p in kept])
            return
        except (TransientError, MpiWriterFenced, LeadershipLost):
            raise
        except Exception as exc:  # the record's fault, or the MPI's: find the Patients it refuses
            log.warning(
                "index.mpi_batch_refused", error_class=type(exc).__name__, error=str(exc), patients=len(kept)
            )
        refused: set[int] = set()
        for p in kept:
            if id(p.record) in refused:
                continue
            try:
                self._upsert_mpi([(p.source_org, p.resource)])
            except (TransientError, MpiWriterFenced, LeadershipLost):
                raise
            except Exception as exc:
                refused.add(id(p.record))
                poison.append(
                    (
                        p.record,
                        MpiRefused(
                            f"entry[{p.entry}] (Patient/{p.resource['id']}): {type(exc).__name__}: {exc}",
                            f"entry[{p.entry}]",
                        ),
                    )
                )

    def _upsert_mpi(self, patients: list[tuple[str, dict[str, Any]]]) -> None:
        """Feed the MPI; a lost database connection is transient: reopen the MPI on the next try."""
        try:
            if self.mpi is None:
                assert self.mpi_factory is not None
                self.mpi = self.mpi_factory()
            self.mpi.upsert_patients(patients)
        except MpiWriterFenced as exc:
            log.error("mpi.writer_fenced", ours=exc.ours, current=exc.current)
            raise
        except Exception as exc:
            if not is_retryable(exc):
                raise
            if self.mpi is not None:
                with contextlib.suppress(Exception):
                    self.mpi.close()
            self.mpi = None if self.mpi_factory is not None else self.mpi
            raise TransientError(f"MPI database unavailable: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.store.close()
        if self.mpi is not None:
            self.mpi.close()
        if self.mpi_producer is not None:
            with contextlib.suppress(Exception):
                self.mpi_producer.close(timeout=10)
        if self.leader is not None:
            self.leader.release()
            self.leader.check()  # a lost leadership ends the process with an error, not with 0


def build_index_sink(settings: Any, bootstrap: str | None = None, *, elect: bool = False) -> IndexSink:
    """The index consumer's sink. With ``FHIRBRIDGE_MPI_LINKER=topic`` it opens no MPI but a producer
    for the MPI topic (``bootstrap``: the consumer's broker, else the configured one).

    Inline (``FHIRBRIDGE_MPI_LINKER=inline``), the index consumer is the MPI's linker, which has one
    writer (decisions 21-25). With ``elect`` (``fhirbridge index run``) it first waits as a standby for
    the linker's lock on the MPI database, as ``fhirbridge mpi run`` does, then claims a writer epoch
    that every MPI write checks: a second inline index consumer, or an inline one beside a linker,
    waits instead of writing the MPI beside it. Without ``elect`` the caller guarantees one writer.
    """
    if settings.stores.mpi_linker == "topic":
        bootstrap = bootstrap or resolve_bootstrap(settings)
        with connecting(settings.kafka, bootstrap):
            producer = KafkaProducer(**producer_config(settings, bootstrap, client_id="fhirbridge-index-mpi"))
        return IndexSink(
            IndexStore.open(settings.stores.index_url),
            load_checker(settings),
            mpi_producer=producer,
            mpi_topic=settings.kafka.topics.mpi,
        )

    def mpi_factory() -> PersonIndex:
        return PersonIndex.open(settings.stores.mpi_url)

    if not elect:
        return IndexSink(
            IndexStore.open(settings.stores.index_url), load_checker(settings), mpi_factory(), mpi_factory
        )
    log.info(
        "index.inline_linking",
        detail="this index consumer links the MPI in-process (FHIRBRIDGE_MPI_LINKER=inline), one at a time:"
        " another one waits as a standby. To scale index consumers out, set FHIRBRIDGE_MPI_LINKER=topic and"
        " run `fhirbridge mpi run`",
    )
    leader = elect_linker(settings)
    lease = transaction_lease_s(settings)
    try:
        mpi = mpi_factory()
        epoch = mpi.claim_writer(leader.holder, lease_s=lease)
        log.info("mpi.writer", epoch=epoch, holder=leader.holder)
        store = IndexStore.open(settings.stores.index_url)
    except BaseException:
        leader.release()
        raise

    def held_factory() -> PersonIndex:  # a reconnection writes under the same epoch, never claims anew
        reopened = mpi_factory()
        reopened.hold_writer(epoch, lease_s=lease)
        return reopened

    return IndexSink(store, load_checker(settings), mpi, held_factory, leader=leader)
