"""The ledger and index sinks, both driven by :class:`bridge.consumers.runtime.ConsumerRuntime`.

Both check every record's envelope (headers present, value hash matches, signature by a trusted org
key) before using it; a record that fails goes to the dead letters with the reason, never into the
ledger as valid.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from bridge.consumers.runtime import BadTimestamp, CpuClock, Record
from bridge.errors import ConfigError, FhirbridgeError, TransientError
from bridge.logging import get_logger
from bridge.stores.index.store import IncomingBundle, IndexStore, content_digest
from bridge.stores.ledger import open_configured_ledger
from bridge.stream import envelope

if TYPE_CHECKING:
    from bridge.mpi import PersonIndex
    from ledger.log import Ledger

log = get_logger(__name__)


class LocatedError(FhirbridgeError):
    """A record's fault, with where in its value it lies (``field``, written to the dead letter)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BadBundle(LocatedError):
    """The record's value is not a FHIR Bundle we can read."""


#: FHIR R4 ``id``: 1 to 64 ASCII letters, digits, '-' and '.' (what every built-in adapter writes)
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def parse_bundle(value: bytes) -> dict[str, Any]:
    try:
        bundle = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadBundle(f"value is not JSON: {exc}", field="value") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BadBundle("value is not a FHIR Bundle", field="resourceType")
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        raise BadBundle("bundle has no entry array", field="entry")
    for i, e in enumerate(entries):
        r = e.get("resource") if isinstance(e, dict) else None
        if (
            not isinstance(r, dict)
            or not isinstance(r.get("resourceType"), str)
            or not isinstance(r.get("id"), str)
        ):
            raise BadBundle(f"entry[{i}] has no resource with resourceType and id", field=f"entry[{i}]")
        if not _FHIR_ID.fullmatch(r["id"]):  # found by review: "" (and NUL, which PostgreSQL cannot store)
            raise BadBundle(
                f"entry[{i}].resource.id {r['id'][:80]!r} is not a FHIR id (1-64 of A-Z a-z 0-9 - .)",
                field=f"entry[{i}].resource.id",
            )
    return bundle


def in_batch_order(
    records: Sequence[Record], poison: list[tuple[Record, BaseException]]
) -> list[tuple[Record, BaseException]]:
    """The poison records in the order of the batch (the sinks find them in several passes)."""
    if len(poison) < 2:
        return poison
    order = {id(r): i for i, r in enumerate(records)}
    return sorted(poison, key=lambda p: order.get(id(p[0]), len(order)))


def check_bundle(value: bytes) -> None:
    """Raise :class:`BadBundle` unless ``value`` is a FHIR Bundle :func:`parse_bundle` accepts."""
    parse_bundle(value)


class EnvelopeChecker:
    """Parse and authenticate a record's envelope against the trust registry."""

    def __init__(self, trust: envelope.TrustRegistry | None) -> None:
        self.trust = trust

    def check(self, rec: Record) -> envelope.Envelope:
        env = envelope.parse(rec.headers, rec.value)
        if self.trust is None:
            raise envelope.SignatureError(
                "no trust registry configured: refusing unauthenticated records", field="fb-signature"
            )
        self.trust.verify(env)
        return env

    def check_many(
        self, records: Sequence[Record], poison: list[tuple[Record, BaseException]]
    ) -> list[tuple[Record, envelope.Envelope]]:
        """Check every record; the failures are appended to ``poison`` with their error."""
        ok: list[tuple[Record, envelope.Envelope]] = []
        for rec in records:
            try:
                ok.append((rec, self.check(rec)))  # rejects a record without a value
            except envelope.EnvelopeError as exc:
                poison.append((rec, exc))
        return ok


class LedgerSink:
    """Appends one leaf per bundle (hash and provenance metadata, no PHI); dedupes by (hash, source)."""

    name = "ledger"

    def __init__(
        self,
        ledger: Ledger,
        checker: EnvelopeChecker,
        receipts: Any | None = None,
        receipts_topic: str = "ledger.receipts",
    ) -> None:
        self.ledger = ledger
        self.checker = checker
        self.receipts = receipts
        self.receipts_topic = receipts_topic
        self.cpu = CpuClock()

    def process(self, records: Sequence[Record]) -> list[tuple[Record, BaseException]]:
        from ledger.errors import EntryTooLarge, InvalidEntry, StorageUnavailable
        from ledger.log import LedgerEntry

        poison: list[tuple[Record, BaseException]] = []
        entries: list[LedgerEntry] = []
        kept: list[Record] = []
        with self.cpu.stage("envelope"):
            checked = self.checker.check_many(records, poison)
        with self.cpu.stage("parse"):
            parsed = []
            for rec, env in checked:
                try:
                    check_bundle(rec.value or b"")
                except BadBundle as exc:
                    poison.append((rec, exc))
                    continue
                parsed.append((rec, env))
        t0 = time.thread_time()
        for rec, env in parsed:
            try:
                entry = LedgerEntry(
                    bundle_sha256=env.bundle_sha256,
                    source_org=env.source_org,
                    adapter=env.adapter,
                    adapter_version=env.adapter_version,
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                    ingested_at=rec.timestamp_iso,
                    message_id=env.message_id or None,
                )
                entry.canonical()  # raises EntryTooLarge over 64 KB
            except (EntryTooLarge, InvalidEntry, BadTimestamp) as exc:
                poison.append((rec, exc))
                continue
            entries.append(entry)
            kept.append(rec)
        self.cpu.add("entry", time.thread_time() - t0)
        if entries:
            try:
                with self.cpu.stage("append"):
                    indices = self.ledger.append(entries)
            except StorageUnavailable as exc:
                raise TransientError(str(exc)) from exc
            if self.receipts is not None:
                t0 = time.thread_time()
                futures = [
                    self.receipts.send(
                        self.receipts_topic,
                        key=e.bundle_sha256.encode(),
                        value=orjson.dumps(
                            {
                                "bundle_sha256": e.bundle_sha256,
                                "source_org": e.source_org,
                                "leaf_index": idx,
                                "topic": r.topic,
                                "partition": r.partition,
                                "offset": r.offset,
                            }
                        ),
                    )
                    for e, idx, r in zip(entries, indices, kept, strict=True)
                ]
                self.receipts.flush(30)
                for f in futures:
                    f.get(timeout=30)
                self.cpu.add("receipts", time.thread_time() - t0)
        return in_batch_order(records, poison)

    def idle(self) -> None:
        """Sign a checkpoint over entries appended since the last one, once the interval has passed."""
        from ledger.errors import StorageUnavailable

        try:
            self.ledger.maybe_checkpoint()
        except StorageUnavailable as exc:
            raise TransientError(str(exc)) from exc

    def close(self) -> None:
        self.ledger.close()


class MpiRefused(LocatedError):
    """The MPI could not index a Patient of the record's bundle (the bundle itself is in the index)."""


class _PatientEntry(NamedTuple):
    source_org: str
    resource: dict[str, Any]
    record: Record
    #: the Patient's position in its bundle's ``entry`` array
    entry: int


class IndexSink:
    """Upserts every resource by its deterministic id, with the bundle's provenance; feeds the MPI."""

    name = "index"

    def __init__(
        self,
        store: IndexStore,
        checker: EnvelopeChecker,
        mpi: PersonIndex | None = None,
        mpi_factory: Callable[[], PersonIndex] | None = None,
    ) -> None:
        self.store = store
        self.checker = checker
        self.mpi = mpi
        self.mpi_factory = mpi_factory
        self.cpu = CpuClock()

    def process(self, records: Sequence[Record]) -> list[tuple[Record, BaseException]]:
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
            except (BadBundle, BadTimestamp) as exc:
                poison.append((rec, exc))
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
                    patients.append(_PatientEntry(env.source_org, e["resource"], rec, i))
        self.cpu.add("parse", time.thread_time() - t0)
        if incoming:
            with self.cpu.stage("store"):
                self.store.apply(incoming)  # TransientError propagates: the runtime backs off
        if patients and (self.mpi is not None or self.mpi_factory is not None):
            with self.cpu.stage("mpi"):
                self._feed_mpi(patients, poison)
        return in_batch_order(records, poison)

    def _feed_mpi(self, patients: list[_PatientEntry], poison: list[tuple[Record, BaseException]]) -> None:
        """Give the MPI the Patient versions the index keeps, and nothing else.

        A delivery the index did not keep (an older version arriving late, or a replay of the stream
        from an earlier offset) is not current, so it must not reach the MPI either: the MPI takes
        each upsert as the latest, and would re-score the older demographics and add to the link
        history on every replay (found by review). If the MPI refuses the batch for a reason other
        than its database, the Patients are tried one by one, and the records of those it refuses
        go to the dead letters with the reason (one bad record no longer stops the consumer).
        """
        current = self.store.current_versions("Patient", [p.resource["id"] for p in patients])
        kept = [p for p in patients if current.get(p.resource["id"]) == content_digest(p.resource)]
        if not kept:
            return
        try:
            self._upsert_mpi([(p.source_org, p.resource) for p in kept])
            return
        except TransientError:
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
            except TransientError:
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
        except Exception as exc:
            if not _is_connection_error(exc):
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


# -- construction shared by the CLI, the demo, replay and the tests --------------------------------
def load_checker(settings: Any) -> EnvelopeChecker:
    """The envelope checker over the configured trust registry (none configured: every record is refused)."""
    path = settings.trust_registry_file or settings.data_dir / "trust.json"
    return EnvelopeChecker(envelope.TrustRegistry.load(path) if path.is_file() else None)


def require_ledger_signer_key(settings: Any) -> str:
    """The ledger's signing key, or :class:`ConfigError` naming the path tried and how to make one.

    A writer without a key would append entries and never sign a checkpoint, so that nobody could
    verify them: the ledger consumer refuses to start instead (``--unsigned`` is for tests).
    """
    from ledger.errors import InvalidKey
    from ledger.note import Signer

    path = settings.ledger_key_file
    hint = (
        "create one with `fhirbridge ledger keygen --name ORIGIN --out DIR` and point FHIRBRIDGE_LEDGER_KEY_FILE "
        "at the .key file (or run `fhirbridge ledger run --unsigned`, for tests only)"
    )
    if path is None or not path.is_file():
        raise ConfigError(f"no ledger signing key at {path}: {hint}")
    try:
        text: str = path.read_text(encoding="utf-8").strip()
        signer = Signer.from_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot read the ledger signing key {path}: {exc.strerror}") from None
    except (InvalidKey, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a ledger signing key ({exc}): {hint}") from None
    if signer.name != settings.ledger_origin:
        raise ConfigError(
            f"the ledger signing key {path} is named {signer.name!r}, but the ledger's origin is "
            f"{settings.ledger_origin!r} (FHIRBRIDGE_LEDGER_ORIGIN): verifiers look a checkpoint's key up by its origin"
        )
    return text


def build_ledger_sink(
    settings: Any, bootstrap: str, *, receipts: bool = True, unsigned: bool = False
) -> LedgerSink:
    if not unsigned:
        require_ledger_signer_key(settings)
    producer = None
    if receipts:
        from kafka import KafkaProducer

        from bridge.stream.producer import producer_config

        producer = KafkaProducer(
            **producer_config(settings, bootstrap, client_id="fhirbridge-ledger-receipts")
        )
    ledger = open_configured_ledger(settings, signer_key=settings.ledger_signer_key())
    return LedgerSink(ledger, load_checker(settings), producer, settings.topics.receipts)


def build_index_sink(settings: Any) -> IndexSink:
    from bridge.mpi import PersonIndex

    def mpi_factory() -> PersonIndex:
        return PersonIndex.open(settings.mpi_url)

    return IndexSink(IndexStore.open(settings.index_url), load_checker(settings), mpi_factory(), mpi_factory)


def _is_connection_error(exc: BaseException) -> bool:
    """A database connection lost, refused or locked: worth retrying, never the record's fault."""
    import sqlite3

    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
