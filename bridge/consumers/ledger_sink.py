"""The ledger sink: one leaf per bundle (hash and provenance, no PHI), deduplicated by (hash, source);
a receipt per append to ``ledger.receipts`` before the offsets are committed (docs/streams.md)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import orjson
from kafka import KafkaProducer

from bridge.consumers.checks import BadBundle, EnvelopeChecker, check_bundle, in_batch_order, load_checker
from bridge.consumers.runtime import BadTimestamp, CpuClock, Record
from bridge.errors import ConfigError, TransientError
from bridge.logging import get_logger
from bridge.stores.leader import LeaderLock, holder_name
from bridge.stores.ledger import open_configured_ledger
from bridge.stream.producer import producer_config
from ledger.errors import EntryTooLarge, InvalidEntry, InvalidKey, LedgerError, StorageUnavailable
from ledger.log import Ledger, LedgerEntry
from ledger.note import Signer
from ledger.tlogwitness import CheckpointCosigner, TlogWitnessClient, parse_witness_urls

log = get_logger(__name__)


class LedgerSink:
    """Appends one leaf per bundle (hash and provenance metadata, no PHI); dedupes by (hash, source)."""

    name = "ledger"

    def __init__(
        self,
        ledger: Ledger,
        checker: EnvelopeChecker,
        receipts: Any | None = None,
        receipts_topic: str = "ledger.receipts",
        cosigner: CheckpointCosigner | None = None,
        leader: LeaderLock | None = None,
    ) -> None:
        self.ledger = ledger
        # the single-writer lock this sink appends under (None: the caller guarantees one writer)
        self.leader = leader
        # asks the tlog witnesses to cosign new checkpoints, on its own thread (never blocks appends)
        self.cosigner = cosigner
        self.checker = checker
        self.receipts = receipts
        self.receipts_topic = receipts_topic
        self.cpu = CpuClock()

    def process(self, records: Sequence[Record]) -> list[tuple[Record, BaseException]]:
        if self.leader is not None:
            self.leader.check()  # a writer that lost its lock stops before touching the batch

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
            if self.cosigner is not None:
                self.cosigner.notify()  # the append may have signed a checkpoint
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

        try:
            signed = self.ledger.maybe_checkpoint()
        except StorageUnavailable as exc:
            raise TransientError(str(exc)) from exc
        if signed is not None and self.cosigner is not None:
            self.cosigner.notify()

    def close(self) -> None:
        if self.cosigner is not None:
            self.cosigner.close()
        self.ledger.close()
        if self.leader is not None:
            self.leader.release()
            self.leader.check()  # a lost leadership ends the process with an error, not with 0


def require_ledger_signer_key(settings: Any) -> str:
    """The ledger's signing key, or :class:`ConfigError` naming the path tried and how to make one.

    A writer without a key would append entries and never sign a checkpoint, so that nobody could
    verify them: the ledger consumer refuses to start instead (``--unsigned`` is for tests).
    """

    path = settings.ledger.key_file
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
    if signer.name != settings.ledger.origin:
        raise ConfigError(
            f"the ledger signing key {path} is named {signer.name!r}, but the ledger's origin is "
            f"{settings.ledger.origin!r} (FHIRBRIDGE_LEDGER_ORIGIN): verifiers look a checkpoint's key up by its origin"
        )
    return text


def build_ledger_sink(
    settings: Any, bootstrap: str, *, receipts: bool = True, unsigned: bool = False, elect: bool = False
) -> LedgerSink:
    """The ledger consumer's sink. ``elect``: first wait to be the log's only writer (``ledger run``);
    a one-off tool (replay, tests) appends beside the writer, serialised by the database instead."""
    if not unsigned:
        require_ledger_signer_key(settings)
    witnesses = [] if unsigned else tlog_witness_clients(settings)
    producer = None
    if receipts:
        from bridge.stream.security import connecting  # TLS/SASL and a one-line failure (docs/streams.md)

        with connecting(settings.kafka, bootstrap):
            producer = KafkaProducer(
                **producer_config(settings, bootstrap, client_id="fhirbridge-ledger-receipts")
            )
    leader = elect_writer(settings) if elect else None
    try:
        # --unsigned signs nothing, even with a key file at hand (it said so, and signed)
        ledger = open_configured_ledger(
            settings, signer_key=None if unsigned else settings.ledger.signer_key()
        )
        if leader is not None:
            epoch = ledger.claim_writer(
                leader.holder, idle_in_transaction_ms=int(3 * settings.ledger.leader_lease_s * 1000)
            )
            log.info("ledger.writer", epoch=epoch, holder=leader.holder)
    except BaseException:
        if leader is not None:
            leader.release()
        raise
    cosigner = CheckpointCosigner(ledger, witnesses).start() if witnesses else None
    return LedgerSink(
        ledger, load_checker(settings), producer, settings.kafka.topics.receipts, cosigner, leader
    )


def elect_writer(settings: Any) -> LeaderLock:
    """Wait as a standby until this process is the ledger's only writer (decision 38).

    Nothing is consumed while waiting. When the leadership is lost later, SIGTERM stops the consumer
    loop at once, the sink refuses the batch in hand, and the process exits non-zero; the writer
    epoch refuses any append it still had under way.
    """
    leader = LeaderLock(
        settings.ledger.url,
        f"ledger:{settings.ledger.origin}",
        lease_s=settings.ledger.leader_lease_s,
        on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM),
        holder=holder_name(settings.kafka.consumer_instance_id),
    )
    leader.acquire()
    return leader


def tlog_witness_clients(settings: Any) -> list[TlogWitnessClient]:
    """A client per ``FHIRBRIDGE_LEDGER_TLOG_WITNESSES`` URL, or :class:`ConfigError` saying what is wrong."""
    try:
        urls = parse_witness_urls(settings.ledger.tlog_witnesses)
        return [TlogWitnessClient(u, settings.ledger.witness_keys) for u in urls]
    except LedgerError as exc:
        raise ConfigError(
            f"FHIRBRIDGE_LEDGER_TLOG_WITNESSES: {exc} (their keys go in FHIRBRIDGE_LEDGER_WITNESS_KEYS)"
        ) from None
