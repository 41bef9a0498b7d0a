"""``fhirbridge replay``: re-drive a sink, copy a topic, or re-drive dead letters (docs/streams.md).

Reads in assign mode (no consumer group, nothing committed), from ``--from-offset`` or
``--from-time`` (``offsets_for_times``; a partition with no record at or after that time has nothing
to replay) up to the partition's high watermark as reported by the fetch responses (not
``end_offsets``, which tansu gets wrong), dropping records after ``--to-time``.

Ledger rebuilds reproduce the original tree exactly: every ledger append publishes a receipt
(bundle hash, source, leaf index) to ``ledger.receipts`` before its offsets are committed, so a rebuild
appends entries in receipt order; entries without a receipt follow in (timestamp, partition, offset)
order. Duplicate records of one bundle keep the first (lowest offset), as the live consumer did.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import OffsetOutOfRangeError

from bridge.config import Settings
from bridge.consumers.index_sink import build_index_sink
from bridge.consumers.ledger_sink import build_ledger_sink
from bridge.consumers.runtime import ConsumerRuntime, Record, consumer_config
from bridge.errors import ConfigError
from bridge.logging import get_logger
from bridge.stream import envelope
from bridge.stream.producer import Publisher, producer_config
from bridge.stream.security import connecting

log = get_logger(__name__)


class Reconverted(Protocol):
    futures: list[Any]
    published: int
    failed: int


class Reconvert(Protocol):
    """Converts a dead letter's record again and publishes what converts (the ingest pipeline's)."""

    def __call__(
        self, value: bytes, headers: dict[str, str], adapter_name: str, publisher: Publisher
    ) -> Reconverted: ...


def parse_time_ms(value: str, what: str) -> int:
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not an ISO 8601 time") from None
    if dt.tzinfo is None:
        raise ConfigError(f"{what}: {value!r} needs a UTC offset (e.g. 2026-11-17T00:00:00Z)")
    ms = int(dt.timestamp() * 1000)
    if ms < 0:
        raise ConfigError(f"{what}: {value!r} is before 1970: Kafka record times start at the Unix epoch")
    return ms


@dataclass
class PartitionReport:
    partition: int
    start: int | None
    read: int = 0
    after_to_time: int = 0
    last_offset: int | None = None
    #: the start offset was past the partition's last record
    past_end: bool = False
    #: (position, high watermark) when the broker stopped sending before the end was reached
    incomplete: tuple[int, int | None] | None = None


@dataclass
class ReplayReport:
    topic: str
    partitions: dict[int, PartitionReport] = field(default_factory=dict)
    processed: int = 0
    dead_lettered: int = 0
    copied: int = 0

    @property
    def complete(self) -> bool:
        return all(p.incomplete is None for p in self.partitions.values())

    def lines(self) -> list[str]:
        out = [f"topic {self.topic}"]
        for p in sorted(self.partitions.values(), key=lambda r: r.partition):
            if p.start is None:
                out.append(f"  partition {p.partition}: nothing at or after --from-time")
            elif p.past_end:
                out.append(
                    f"  partition {p.partition}: offset {p.start} is past the last record: nothing to replay"
                )
            else:
                extra = f", {p.after_to_time} after --to-time skipped" if p.after_to_time else ""
                out.append(f"  partition {p.partition}: from offset {p.start}, {p.read} records{extra}")
                if p.incomplete is not None:
                    out.append(
                        f"  partition {p.partition}: INCOMPLETE: no records for 3 s at offset {p.incomplete[0]}, "
                        f"before the high watermark {p.incomplete[1]}; run the replay again"
                    )
        out.append(f"processed {self.processed}, dead-lettered {self.dead_lettered}, copied {self.copied}")
        return out


class Reader:
    """Reads a bounded range of a topic without a consumer group."""

    def __init__(self, settings: Settings, bootstrap: str, topic: str) -> None:
        self.topic = topic
        # no reset policy: a position past the end (--from-offset beyond the last record) must be reported
        # as "nothing to replay", not silently reset to the beginning
        with connecting(settings.kafka, bootstrap):
            self.consumer = KafkaConsumer(
                **consumer_config(
                    settings, bootstrap, None, enable_auto_commit=False, auto_offset_reset="none"
                )
            )

    def partitions(self, only: Sequence[int] | None) -> list[TopicPartition]:
        deadline = time.monotonic() + 15
        parts = self.consumer.partitions_for_topic(self.topic)
        while parts is None and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = self.consumer.partitions_for_topic(self.topic)
        if not parts:
            raise ConfigError(f"topic {self.topic!r} does not exist")
        if only:
            missing = set(only) - set(parts)
            if missing:
                raise ConfigError(f"topic {self.topic!r} has no partition {sorted(missing)}")
            parts = set(only)
        return [TopicPartition(self.topic, p) for p in sorted(parts)]

    def start_offsets(
        self, tps: list[TopicPartition], from_offset: int | None, from_time_ms: int | None
    ) -> dict[TopicPartition, int | None]:
        begin = self.consumer.beginning_offsets(tps)
        if from_time_ms is not None:
            found = self.consumer.offsets_for_times({tp: from_time_ms for tp in tps})
            return {tp: (None if found.get(tp) is None else found[tp].offset) for tp in tps}
        if from_offset is not None:
            return {tp: max(from_offset, begin[tp]) for tp in tps}
        return dict(begin)

    def read(
        self,
        starts: dict[TopicPartition, int | None],
        report: ReplayReport,
        to_time_ms: int | None,
        batch: int = 500,
        idle_s: float = 3.0,
        frozen_end: bool = False,
    ) -> Iterator[list[Record]]:
        """Yield batches (in each partition's offset order) until every partition reaches its high watermark.

        ``frozen_end``: the end is the first high watermark seen, so that records written to the topic
        during the replay (a dead-letter re-drive writes the ones that fail again) are left for later
        instead of being read again and again."""
        ends: dict[TopicPartition, int] = {}
        active = [tp for tp, off in starts.items() if off is not None]
        for tp, off in starts.items():
            report.partitions[tp.partition] = PartitionReport(tp.partition, off)
        if not active:
            return
        self.consumer.assign(active)
        for tp in active:
            self.consumer.seek(tp, starts[tp])
        pending = set(active)
        last_data = time.monotonic()
        while pending:
            try:
                polled = self.consumer.poll(timeout_ms=500, max_records=batch)
            except OffsetOutOfRangeError as exc:
                out_of_range = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
                gone = [tp for tp in out_of_range if tp in pending]
                if not gone:
                    raise
                begin = self.consumer.beginning_offsets(gone)
                for tp in gone:
                    if out_of_range[tp] < begin[tp]:  # deleted by retention meanwhile: from what is left
                        self.consumer.seek(tp, begin[tp])
                        continue
                    report.partitions[tp.partition].past_end = True  # started past the end: nothing here
                    pending.discard(tp)
                    self.consumer.pause(tp)
                continue
            out: list[Record] = []
            for tp, msgs in polled.items():
                rep = report.partitions[tp.partition]
                if frozen_end and tp not in ends and (high := self.consumer.highwater(tp)) is not None:
                    ends[tp] = high
                for m in msgs:
                    if tp in ends and m.offset >= ends[tp]:
                        break
                    rep.read += 1
                    rep.last_offset = m.offset
                    if to_time_ms is not None and m.timestamp > to_time_ms:
                        rep.after_to_time += 1
                        continue
                    out.append(Record.from_kafka(m))
            if out:
                yield out
            if polled:
                last_data = time.monotonic()  # after the caller's work on the batch: that is not idleness
            for tp in list(pending):
                high = ends.get(tp, self.consumer.highwater(tp))
                if high is not None and self.consumer.position(tp) >= high:
                    pending.discard(tp)
                    rep = report.partitions[tp.partition]
                    if rep.read == 0 and rep.start is not None and rep.start >= high:
                        rep.past_end = True  # a broker that answers past the end without an error
                    if tp in ends:
                        self.consumer.pause(tp)
            if time.monotonic() - last_data > idle_s:
                for tp in pending:  # said in the report (and the exit code), never a silent short replay
                    report.partitions[tp.partition].incomplete = (
                        self.consumer.position(tp),
                        self.consumer.highwater(tp),
                    )
                break

    def close(self) -> None:
        self.consumer.close()


def replay(
    settings: Settings,
    bootstrap: str,
    *,
    sink_name: str | None = None,
    to_topic: str | None = None,
    topic: str | None = None,
    partitions: Sequence[int] | None = None,
    from_offset: int | None = None,
    from_time: str | None = None,
    to_time: str | None = None,
    rebuild: bool = False,
    dead_letters: bool = False,
    dry_run: bool = False,
    reconvert: Reconvert | None = None,
) -> ReplayReport:
    """Run one replay. See the module docstring; raises ConfigError for an inconsistent request.

    ``reconvert`` converts an ingest or MLLP dead letter again (the ingest pipeline's
    ``convert_again``); without it such letters stay where they are.
    """
    if not dry_run and (sink_name is None) == (to_topic is None) and not dead_letters:
        raise ConfigError("give exactly one of --sink or --to-topic (or --dead-letters, or --dry-run)")
    if rebuild and (
        from_offset is not None or from_time or to_time or partitions or dead_letters or to_topic
    ):
        raise ConfigError(
            "--rebuild replays the whole topic: it takes no range, partition, --dead-letters or --to-topic"
        )
    if rebuild and sink_name is None:
        raise ConfigError("--rebuild needs --sink ledger or --sink index")
    if from_offset is not None and from_time:
        raise ConfigError("give --from-offset or --from-time, not both")
    source = topic or (settings.kafka.topics.deadletter if dead_letters else settings.kafka.topics.bundles)
    if to_topic is not None and to_topic == source:
        raise ConfigError(f"--to-topic {to_topic!r} is the topic being read: a copy into itself never ends")
    from_ms = parse_time_ms(from_time, "--from-time") if from_time else None
    to_ms = parse_time_ms(to_time, "--to-time") if to_time else None
    if from_ms is not None and to_ms is not None and to_ms < from_ms:
        raise ConfigError("--to-time is before --from-time: nothing would be replayed")

    reader = Reader(settings, bootstrap, source)
    report = ReplayReport(source)
    try:
        tps = reader.partitions(partitions)
        starts = reader.start_offsets(tps, from_offset, from_ms)
        batches = reader.read(
            starts, report, to_ms, batch=settings.kafka.consumer_batch_size, frozen_end=dead_letters
        )
        if dry_run:
            for _ in batches:
                pass
            return report
        if dead_letters:
            _redrive_dead_letters(settings, bootstrap, batches, report, sink_name, to_topic, reconvert)
        elif to_topic:
            _copy(settings, bootstrap, batches, report, to_topic)
        elif sink_name == "ledger" and rebuild:
            _rebuild_ledger(settings, bootstrap, batches, report)
        else:
            assert sink_name is not None
            _into_sink(settings, bootstrap, batches, report, sink_name, rebuild)
    finally:
        reader.close()
    return report


def _build_sink(settings: Settings, bootstrap: str, name: str) -> Any:

    if name == "ledger":
        return build_ledger_sink(settings, bootstrap)
    if name == "index":
        return build_index_sink(settings)
    raise ConfigError(f"unknown sink {name!r} (ledger or index)")


class _NoGroupRuntime(ConsumerRuntime):
    """The shared runtime's batch handling (retry, dead letters), without group commits."""

    def _commit(self, records: list[Record]) -> None:
        return None


def _into_sink(
    settings: Settings,
    bootstrap: str,
    batches: Iterator[list[Record]],
    report: ReplayReport,
    name: str,
    rebuild: bool,
) -> None:
    sink = _build_sink(settings, bootstrap, name)
    if rebuild:
        _reset(sink)
    dead = Publisher(settings, bootstrap)
    runtime = _NoGroupRuntime(settings, bootstrap, sink, dead, group_id=f"replay-{name}", consumer=_Idle())
    try:
        for batch in batches:
            runtime.handle_batch(batch)
        report.processed, report.dead_lettered = runtime.processed, runtime.dead_lettered
    finally:
        sink.close()
        dead.close()


def _reset(sink: Any) -> None:
    if sink.name == "ledger":
        sink.ledger.reset()
    else:
        sink.store.reset()
        if sink.mpi is not None:
            sink.mpi.reset()


def _rebuild_ledger(
    settings: Settings, bootstrap: str, batches: Iterator[list[Record]], report: ReplayReport
) -> None:

    order = _receipt_order(settings, bootstrap)
    first: dict[tuple[str, str], Record] = {}
    unreadable: list[Record] = []
    for batch in batches:
        for rec in batch:
            try:
                env = envelope.parse(rec.headers, rec.value)
            except envelope.EnvelopeError:
                unreadable.append(rec)  # the sink rejects it again below, without a second dead letter
                continue
            key = (env.bundle_sha256, env.source_org)
            prior = first.get(key)
            if prior is None or (rec.partition, rec.offset) < (prior.partition, prior.offset):
                first[key] = rec

    def sort_key(item: tuple[tuple[str, str], Record]) -> tuple[int, int, int, int]:
        key, rec = item
        idx = order.get(key)
        return (0, idx, 0, 0) if idx is not None else (1, rec.timestamp, rec.partition, rec.offset)

    ordered = [rec for _, rec in sorted(first.items(), key=sort_key)]
    sink = build_ledger_sink(settings, bootstrap)
    try:
        sink.ledger.reset()
        for i in range(0, len(ordered), settings.kafka.consumer_batch_size):
            chunk = ordered[i : i + settings.kafka.consumer_batch_size]
            poison = sink.process(chunk)
            report.processed += len(chunk) - len(poison)
            report.dead_lettered += len(poison)
        report.dead_lettered += len(unreadable)
    finally:
        sink.close()


def _receipt_order(settings: Settings, bootstrap: str) -> dict[tuple[str, str], int]:
    reader = Reader(settings, bootstrap, settings.kafka.topics.receipts)
    order: dict[tuple[str, str], int] = {}
    try:
        tps = reader.partitions(None)
        scratch = ReplayReport(settings.kafka.topics.receipts)
        for batch in reader.read(reader.start_offsets(tps, None, None), scratch, None):
            for rec in batch:
                try:
                    r = orjson.loads(rec.value or b"")
                    order[(r["bundle_sha256"], r["source_org"])] = int(r["leaf_index"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("replay.bad_receipt", partition=rec.partition, offset=rec.offset)
    except ConfigError:
        return {}
    finally:
        reader.close()
    return order


def _copy(
    settings: Settings, bootstrap: str, batches: Iterator[list[Record]], report: ReplayReport, to_topic: str
) -> None:
    with connecting(settings.kafka, bootstrap):
        producer = KafkaProducer(**producer_config(settings, bootstrap, client_id="fhirbridge-replay"))
    try:
        for batch in batches:
            futures = [
                producer.send(to_topic, key=r.key, value=r.value, headers=r.headers, timestamp_ms=r.timestamp)
                for r in batch
            ]
            producer.flush(60)
            for f in futures:
                f.get(60)
            report.copied += len(batch)
    finally:
        producer.close()


def _redrive_dead_letters(
    settings: Settings,
    bootstrap: str,
    batches: Iterator[list[Record]],
    report: ReplayReport,
    sink_name: str | None,
    to_topic: str | None,
    reconvert: Reconvert | None,
) -> None:
    """Re-convert ingest-stage dead letters with their adapter; re-send consumer-stage ones to the bundles topic
    (or process them with ``--sink``)."""
    publisher = Publisher(settings, bootstrap)
    sink = _build_sink(settings, bootstrap, sink_name) if sink_name else None
    runtime = (
        _NoGroupRuntime(settings, bootstrap, sink, publisher, group_id="replay-deadletters", consumer=_Idle())
        if sink
        else None
    )
    target = to_topic or settings.kafka.topics.bundles
    try:
        for batch in batches:
            futures: list[Any] = []
            to_sink: list[Record] = []
            for rec in batch:
                h = envelope.headers_dict(rec.headers)
                original = [(k, v) for k, v in rec.headers if not k.startswith("fb-dl-")]
                stage = h.get("fb-dl-stage", "")
                if stage.startswith(("ingest:", "mllp:")):
                    if reconvert is None:
                        report.dead_lettered += 1
                        continue
                    again = reconvert(rec.value or b"", h, stage.split(":", 1)[1], publisher)
                    futures += again.futures
                    report.processed += again.published
                    report.dead_lettered += again.failed
                elif runtime is not None:
                    to_sink.append(
                        Record(
                            rec.topic, rec.partition, rec.offset, rec.timestamp, rec.key, rec.value, original
                        )
                    )
                else:
                    futures.append(
                        publisher.producer.send(target, key=rec.key, value=rec.value, headers=original)
                    )
                    report.copied += 1
            if runtime is not None and to_sink:
                before = (runtime.processed, runtime.dead_lettered)
                runtime.handle_batch(to_sink)
                report.processed += runtime.processed - before[0]
                report.dead_lettered += runtime.dead_lettered - before[1]
            publisher.flush(60)
            for f in futures:
                f.get(60)
    finally:
        publisher.close()
        if sink is not None:
            sink.close()


class _Idle:
    """Stands in for the group consumer in replays: nothing to pause, commit or close."""

    def assignment(self) -> set[Any]:
        return set()

    def paused(self) -> set[Any]:
        return set()

    def pause(self, *_: Any) -> None: ...

    def resume(self, *_: Any) -> None: ...

    def poll(self, timeout_ms: int = 0, **_: Any) -> dict[Any, Any]:
        time.sleep(min(0.2, timeout_ms / 1000))
        return {}

    def close(self, **_: Any) -> None: ...

    def commit(self, *_: Any) -> None: ...
