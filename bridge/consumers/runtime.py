"""One consumer runtime shared by every sink (ledger, index, and any future one).

Guarantees (docs/streams.md):

* **At-least-once delivery, exactly-once effect.** Offsets are committed manually, only after the sink
  has made the batch durable and every poison record of the batch has been acknowledged on the
  dead-letter topic. Sinks are idempotent, so a redelivered batch changes nothing.
* **Poison records** (the sink says *this record* cannot be processed) go to ``fhir.deadletter`` with
  the original key, value and headers plus error class, message, consumer, topic, partition and
  offset; the consumer moves on.
* **Backpressure.** When the sink raises :class:`~bridge.errors.TransientError` (database down) or the
  dead-letter produce fails (broker down), the runtime pauses its partitions, keeps polling so that it
  stays in the group, and retries the same batch with exponential backoff. Nothing is skipped.
* **Graceful shutdown.** ``stop`` (SIGTERM/SIGINT) lets the current batch finish, commits, and leaves
  the group.
"""

from __future__ import annotations

import contextvars
import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import structlog
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata

from bridge.config import Settings
from bridge.errors import FhirbridgeError, TransientError
from bridge.gctune import tune_gc
from bridge.health import Health, beat_while, serve_health
from bridge.logging import get_logger
from bridge.metrics import ConsumerMetrics
from bridge.stores.db import is_retryable
from bridge.stream.broker import resolve_bootstrap
from bridge.stream.producer import Publisher
from bridge.stream.security import client_kwargs, connecting
from bridge.stream.topics import ensure_topics

log = get_logger(__name__)
T = TypeVar("T")


class BadTimestamp(FhirbridgeError):
    """A record's timestamp cannot be written as an RFC 3339 date (outside years 1-9999). The Kafka
    timestamp is not covered by the signature: such a record is poison, not a reason to stop."""


@functools.lru_cache(maxsize=4096)
def _iso_second(seconds: int) -> str:
    try:
        dt = datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        raise BadTimestamp(f"record timestamp {seconds * 1000} ms is outside the years 1-9999") from None
    return f"{dt.year:04d}-{dt:%m-%dT%H:%M:%S}"  # %Y is not zero-padded below year 1000 on glibc


def iso_millis(ms: int) -> str:
    """RFC 3339 UTC with milliseconds (``2026-01-01T00:00:00.123Z``) of a Kafka timestamp.

    The records of a batch share a handful of seconds, so the formatted second is cached: building
    it with ``datetime.isoformat`` for every record cost about 20 µs, in both consumers.
    """
    seconds, milli = divmod(ms, 1000)
    return f"{_iso_second(seconds)}.{milli:03d}Z"


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: int  # ms since the epoch (the producer's CreateTime on Kafka and noida)
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def timestamp_iso(self) -> str:
        return iso_millis(self.timestamp)

    @classmethod
    def from_kafka(cls, m: Any) -> Record:
        return cls(m.topic, m.partition, m.offset, m.timestamp, m.key, m.value, list(m.headers or ()))


class CpuClock:
    """CPU seconds spent by the calling thread in named stages (``time.thread_time``).

    The runtime and the sinks time whole batches, never single records, so the clock costs a few
    microseconds per batch. ``consumer.cpu`` (logged at shutdown) reports them per record.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.thread_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.thread_time() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def per_record_ms(self, records: int) -> dict[str, float]:
        n = max(1, records)
        return {k: round(v * 1000 / n, 4) for k, v in sorted(self.seconds.items())}


class Sink(Protocol):
    """What a consumer writes into."""

    name: str

    def process(self, records: Sequence[Record]) -> list[tuple[Record, BaseException]]:
        """Durably apply ``records``; return the poison ones with their error.

        Must be idempotent. Raise :class:`~bridge.errors.TransientError` when a dependency is down:
        the whole batch is retried later.
        """
        ...

    def close(self) -> None: ...

    # Optional: ``idle() -> None``, called when a poll returned nothing.


class DeadLetterSink(Protocol):
    def dead_letter(
        self,
        value: bytes | None,
        *,
        key: bytes | None = ...,
        headers: list[tuple[str, bytes]] | None = ...,
        error: BaseException,
        stage: str,
        origin: tuple[str, int, int] | None = ...,
    ) -> Any: ...

    def flush(self, timeout: float | None = None) -> None: ...


def batch_context(records: Sequence[Record]) -> dict[str, Any]:
    """Kafka coordinates of a batch for every log line written while it is handled.

    ``topic``, ``partition`` and ``offset`` are those of the batch's first record; ``offsets`` gives
    the first and last offset per partition. Lines about one record rebind its own coordinates.
    """
    first = records[0]
    spans: dict[str, list[int]] = {}
    for r in records:
        span = spans.setdefault(f"{r.topic}/{r.partition}", [r.offset, r.offset])
        span[0] = min(span[0], r.offset)
        span[1] = max(span[1], r.offset)
    return {"topic": first.topic, "partition": first.partition, "offset": first.offset, "offsets": spans}


def instance_id(settings: Settings, group_id: str) -> str:
    """The static group member id of this process (``FHIRBRIDGE_CONSUMER_INSTANCE_ID``, else group@host).

    Static membership lets a consumer restarted after a crash take over its own partitions at once
    instead of waiting for the dead member to time out; on noida-db 0.2.3 a dead dynamic member is
    never evicted at all, so without it a ``kill -9`` stalls the group. Two consumers of one group on
    one host need distinct ids.
    """
    return settings.kafka.consumer_instance_id or f"{group_id}@{socket.gethostname()}"


def consumer_config(
    settings: Settings, bootstrap: str, group_id: str | None, **overrides: Any
) -> dict[str, Any]:
    """A consumer's kafka-python configuration: :func:`client_kwargs` (TLS, SASL) and the settings below."""
    cfg: dict[str, Any] = {
        **client_kwargs(settings.kafka),
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "client_id": f"fhirbridge-{group_id or 'reader'}",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        # Never the 45 s default: a group join is held about session_timeout_ms / 2.
        "session_timeout_ms": settings.kafka.session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka.heartbeat_interval_ms,
        "max_poll_records": settings.kafka.consumer_batch_size,
        "max_partition_fetch_bytes": settings.kafka.topics.max_message_bytes + 64 * 1024,
        "fetch_max_bytes": max(52428800, settings.kafka.topics.max_message_bytes * 2),
        # Also the rebalance timeout: a member killed with SIGKILL holds up the group's next join
        # this long on some brokers. The runtime polls even while it backs off, so this can be short.
        "max_poll_interval_ms": settings.kafka.max_poll_interval_ms,
    }
    if group_id is not None and static_membership(settings, bootstrap):
        cfg["group_instance_id"] = instance_id(settings, group_id)
    cfg.update(overrides)
    return cfg


_broker_versions: dict[str, tuple[int, ...]] = {}


def static_membership(settings: Settings, bootstrap: str) -> bool:
    """Whether consumers join as static members (``FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP``).

    ``auto``: on brokers older than Apache Kafka 4 (noida-db answers as 3.3), off on Apache Kafka 4.
    noida-db never evicts a dead dynamic member, so there it is required (decision 6). On Apache Kafka
    4 with kafka-python 3.0.12, static members that rejoined after a rebalance were seen to hold their
    partitions without fetching, or to retry commits refused as "rebalance in progress" for minutes
    (decision 37); a dynamic member costs one session timeout (6 s) per restart instead.
    """
    mode = settings.kafka.static_membership
    if mode != "auto":
        return mode == "on"
    version = _broker_versions.get(bootstrap)
    if version is None:
        try:
            with connecting(settings.kafka, bootstrap):
                admin = KafkaAdminClient(
                    **client_kwargs(settings.kafka), bootstrap_servers=bootstrap, client_id="fhirbridge-probe"
                )
            try:
                version = tuple(admin._client.get_broker_version())
            finally:
                admin.close()
        except Exception as exc:  # unknown: keep the membership that works on every broker we know
            log.warning("consumer.broker_version_unknown", error=type(exc).__name__)
            return True
        _broker_versions[bootstrap] = version
    return version < (4, 0)


class ConsumerRuntime:
    """Polls ``topics`` as ``group_id`` and feeds batches to ``sink``."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        sink: Sink,
        dead_letters: DeadLetterSink,
        *,
        group_id: str,
        topics: Sequence[str] | None = None,
        consumer: KafkaConsumer | None = None,
        metrics: ConsumerMetrics | None = None,
        max_backoff: float = 30.0,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.dead_letters = dead_letters
        self.group_id = group_id
        self.topics = list(topics or [settings.kafka.topics.bundles])
        if consumer is None:
            with connecting(settings.kafka, bootstrap):
                consumer = KafkaConsumer(**consumer_config(settings, bootstrap, group_id))
            _await_partitions(consumer, self.topics)
            consumer.subscribe(self.topics)
        self.consumer = consumer
        self.metrics = metrics or ConsumerMetrics(group_id)
        self.max_backoff = max_backoff
        self.backing_off = False
        self._quiet = 0  # batches in a row that came back empty
        self._delivered_at = time.monotonic()  # when the last batch came (the stall check)
        self._behind: dict[Any, int] = {}  # partitions behind at the last stall check, and positions
        self._uncommitted: dict[TopicPartition, OffsetAndMetadata] = {}  # a refused commit's offsets
        self._refused_since: float | None = None  # first commit refused since the last one accepted
        self.health = health or Health()
        self.health.add_check("broker", self._broker_check)
        self.health.add_check("group", self._group_check)
        self.health.add_check(
            "sink", lambda: (not self.backing_off, "backing off" if self.backing_off else "ok")
        )
        self._stop = threading.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{sink.name}")
        self.processed = 0
        self.dead_lettered = 0
        self.cpu = (
            CpuClock()
        )  # the polling thread's stages; the worker's are added by _process_and_dead_letter
        self._cpu_lock = threading.Lock()
        self._process_cpu0 = time.process_time()

    # -- control --------------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _broker_check(self) -> tuple[bool, str]:
        """Connected to at least one broker of the cluster (kafka-python keeps its fetch connections
        open while it consumes; it has no public call for this)."""
        client = getattr(self.consumer, "_client", None)
        brokers = client.cluster.brokers() if client is not None else set()
        ok = any(client.connected(b.node_id) for b in brokers) if client is not None else False
        return ok, "connected" if ok else "unreachable"

    def _group_check(self) -> tuple[bool, str]:
        """Ready with partitions, or as a member the group gave none (more members than partitions)."""
        assigned = len(self.consumer.assignment())
        if assigned:
            return True, f"{assigned} partitions"
        coordinator = getattr(self.consumer, "_coordinator", None)
        generation = getattr(getattr(coordinator, "_generation", None), "generation_id", -1)
        return (generation > 0, "member without partitions" if generation > 0 else "joining")

    # -- main loop ------------------------------------------------------------------------------
    def run(self, *, until: Callable[[], bool] | None = None, poll_timeout_ms: int = 500) -> None:
        """Consume until :meth:`stop` (or ``until()`` returns True after a batch or an idle poll)."""
        log.info("consumer.start", group=self.group_id, topics=self.topics, sink=self.sink.name)
        self.health.set_state("running")
        try:
            while not self._stop.is_set():
                self.health.beat()
                t0 = time.thread_time()
                records = self.poll_batch(poll_timeout_ms)
                self.cpu.add("poll", time.thread_time() - t0)
                if records:
                    self.handle_batch(records)
                    self._delivered_at = time.monotonic()
                else:
                    self._idle()
                    self._unstick()
                with self.cpu.stage("lag"):
                    self._update_lag()
                if until is not None and until():
                    break
        finally:
            self.health.set_state("stopping")
            self.close()

    #: One kafka-python ``poll`` lasts at most this long; the runtime sleeps between polls instead.
    POLL_SLICE_MS = 2

    def poll_batch(self, timeout_ms: int = 500) -> list[Record]:
        """One batch: up to ``consumer_batch_size`` records, gathered for at most ``consumer_linger_ms``
        after the first one arrived; ``[]`` when nothing came within ``timeout_ms``.

        kafka-python's ``poll(timeout)`` sends the next fetch as soon as one is answered, and noida-db
        answers an empty fetch at once instead of holding it for ``fetch_max_wait_ms``. A consumer that
        has caught up therefore spun through thousands of empty fetches a second (a whole core between
        the two consumers and the broker). So the runtime polls in short slices and sleeps between
        them: ``consumer_idle_sleep_ms``, doubling after each empty batch up to
        ``consumer_idle_max_sleep_ms`` (on Apache Kafka too: an idle consumer polling every 20 ms cost about
        10% of a core, and as much again on the broker; decision 37). Waiting up to ``consumer_linger_ms`` for a fuller batch also makes every per-batch cost
        (the sink's transaction, the offset commit, the receipts' acknowledgement) rarer while the
        stream trickles in; a backlog fills a batch at once and is not delayed.
        """
        size = self.settings.kafka.consumer_batch_size
        linger = self.settings.kafka.consumer_linger_ms / 1000
        idle_sleep = self.settings.kafka.consumer_idle_sleep_ms / 1000
        idle_max = max(idle_sleep, self.settings.kafka.consumer_idle_max_sleep_ms / 1000)
        start = time.monotonic()
        first_at: float | None = None
        records: list[Record] = []
        while True:
            # Without an assignment the group (re)join is still under way: give it a whole poll.
            slice_ms = self.POLL_SLICE_MS if self.consumer.assignment() else min(timeout_ms, 200)
            polled = self.consumer.poll(timeout_ms=slice_ms, max_records=size - len(records))
            for msgs in polled.values():
                records.extend(Record.from_kafka(m) for m in msgs)
            now = time.monotonic()
            if records:
                if first_at is None:
                    first_at = now
                left = first_at + linger - now
            else:
                left = start + timeout_ms / 1000 - now
            if len(records) >= size or left <= 0 or self._stop.is_set():
                self._quiet = 0 if records else self._quiet + 1
                return records
            # caught up for a while: sleep longer between polls, up to consumer_idle_max_sleep_ms
            # (each empty poll costs a fetch on the broker and about 2 ms of CPU here)
            pause = idle_sleep if records else min(idle_sleep * 2 ** min(self._quiet, 6), idle_max)
            time.sleep(min(left, pause))

    def handle_batch(self, records: list[Record]) -> None:
        """Process one batch with retry, dead-letter its poison records, then commit.

        The sink runs in a worker thread while this thread keeps polling with every partition
        paused, so a slow batch (a big MPI refit, a slow database) never exceeds
        ``max_poll_interval_ms`` and never costs the consumer its group membership.
        """
        with self.cpu.stage("metrics"):
            self.metrics.consumed(records)
        with structlog.contextvars.bound_contextvars(**batch_context(records)):
            log.debug("consumer.batch", records=len(records))
            self._handle_batch(records)

    def _handle_batch(self, records: list[Record]) -> None:
        delay = 0.2
        paused = False
        while True:
            try:
                poison = self._in_worker(lambda: self._process_and_dead_letter(records))
                break
            except (TransientError, KafkaError) as exc:
                if self._stop.is_set():
                    # SIGTERM while the database or the broker is away: hand the batch back (its offsets
                    # stay uncommitted, so whoever takes the partitions gets it again) and stop, within
                    # the grace period, instead of retrying until the outage ends
                    log.warning("consumer.batch_handed_back", sink=self.sink.name, records=len(records))
                    return
                paused = self.backing_off = True
                log.warning("consumer.backoff", sink=self.sink.name, error=str(exc), retry_in=round(delay, 2))
                self.metrics.backoff()
                # keep polling (partitions paused: returns nothing) so heartbeats continue and we stay in the group
                end = time.monotonic() + delay
                while time.monotonic() < end and not self._stop.is_set():
                    self._poll_paused(min(200, int(delay * 1000)))
                delay = min(delay * 2, self.max_backoff)
        if paused:
            self.consumer.resume(*self.consumer.paused())
            self.backing_off = False
            log.info("consumer.resumed", sink=self.sink.name)
        self.processed += len(records) - len(poison)
        self.dead_lettered += len(poison)
        with self.cpu.stage("commit"):
            self._commit(records)

    def _process_and_dead_letter(self, records: list[Record]) -> list[tuple[Record, BaseException]]:
        t0 = time.thread_time()
        poison = self.sink.process(records)
        t1 = time.thread_time()
        self._dead_letter(poison)
        t2 = time.thread_time()
        with self._cpu_lock:
            self.cpu.add("sink", t1 - t0)
            self.cpu.add("dead_letter", t2 - t1)
        return poison

    def _in_worker(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the worker thread (with this thread's log context); poll (paused) meanwhile."""
        ctx = contextvars.copy_context()
        future = self._worker.submit(ctx.run, fn)
        try:
            return future.result(timeout=1.0)
        except FutureTimeout:
            pass
        previously_paused = set(self.consumer.paused())
        try:
            while True:
                try:
                    return future.result(timeout=0.05)
                except FutureTimeout:
                    self._poll_paused(200)
        finally:
            still = set(self.consumer.paused()) - previously_paused
            if still:
                self.consumer.resume(*still)

    def _poll_paused(self, timeout_ms: int) -> None:
        """Poll while a batch is in progress or backing off: heartbeats go on and the group membership
        is kept, but nothing is consumed.

        Every assigned partition is paused first, including any that a rebalance assigned since the
        last poll: kafka-python gives a newly assigned partition a fresh, unpaused state at its
        committed offset. If a poll still returns records (the rebalance happened inside it), each
        partition is sought back to its first returned offset, so those records are fetched again
        later. Dropping them would move the position past them, and the next commit would make the
        skip permanent.
        """
        self.health.beat()
        consumer = self.consumer
        unpaused = set(consumer.assignment()) - set(consumer.paused())
        if unpaused:
            consumer.pause(*unpaused)
        for tp, msgs in consumer.poll(timeout_ms=timeout_ms).items():
            if msgs:
                consumer.seek(tp, min(m.offset for m in msgs))

    def _idle(self) -> None:
        """Give the sink a chance to do deferred work (the ledger signs the tail of a burst)."""
        idle = getattr(self.sink, "idle", None)
        if idle is None:
            return
        try:
            idle()
        except TransientError as exc:
            log.warning("consumer.idle_failed", sink=self.sink.name, error=str(exc))

    def _dead_letter(self, poison: list[tuple[Record, BaseException]]) -> None:
        if not poison:
            return
        futures = []
        for rec, err in poison:
            with structlog.contextvars.bound_contextvars(
                topic=rec.topic, partition=rec.partition, offset=rec.offset
            ):
                log.warning(
                    "record.dead_lettered",
                    sink=self.sink.name,
                    error_class=type(err).__name__,
                    error=str(err),
                )
            futures.append(
                self.dead_letters.dead_letter(
                    rec.value,
                    key=rec.key,
                    headers=rec.headers,
                    error=err,
                    stage=f"{self.sink.name}:{self.group_id}",
                    origin=(rec.topic, rec.partition, rec.offset),
                )
            )
        self.dead_letters.flush(30)
        for fut in futures:
            fut.get(timeout=30)  # raises KafkaError when the broker did not take it: retried by the caller
        self.metrics.dead_lettered(rec for rec, _ in poison)

    def _commit(self, records: list[Record]) -> None:
        last: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            last[tp] = max(last.get(tp, -1), r.offset)
        offsets = {tp: OffsetAndMetadata(off + 1, "", -1) for tp, off in last.items()}
        try:
            self.consumer.commit(offsets)
        except (CommitFailedError, RebalanceInProgressError) as exc:
            # The group rebalanced while we worked: the new owner will redeliver; the sink is idempotent.
            # If the partitions stay ours, the commit is tried again when the consumer is next idle.
            log.warning("consumer.commit_failed", error=str(exc))
            for tp, om in offsets.items():
                if tp not in self._uncommitted or self._uncommitted[tp].offset < om.offset:
                    self._uncommitted[tp] = om
            self._refused_since = self._refused_since or time.monotonic()
            self._rejoin_if_refused_too_long()
            return
        self._refused_since = None
        for tp in offsets:
            self._uncommitted.pop(tp, None)
        self.metrics.committed(offsets)

    def _commit_again(self) -> None:
        """Commit what a refused commit left, for the partitions that are still ours."""
        assigned = self.consumer.assignment()
        offsets = {tp: om for tp, om in self._uncommitted.items() if tp in assigned}
        self._uncommitted.clear()
        if not offsets:
            return
        try:
            self.consumer.commit(offsets)
        except (CommitFailedError, RebalanceInProgressError, KafkaError) as exc:
            log.info("consumer.commit_retry_failed", error=f"{type(exc).__name__}")
            self._uncommitted.update(offsets)
            self._refused_since = self._refused_since or time.monotonic()
            self._rejoin_if_refused_too_long()
            return
        self._refused_since = None
        log.info("consumer.commit_retried", partitions=len(offsets))
        self.metrics.committed(offsets)

    def _rejoin_if_refused_too_long(self) -> None:
        """The broker keeps saying "rebalance in progress" while kafka-python believes its membership
        stable: seen for static members rejoining on noida-db and Apache Kafka 4, and for a dynamic
        member on Kafka 4 after another joined (it kept consuming every partition, the new member's
        too, and never rejoined). Only a new join ends that; the records it handled meanwhile are
        redelivered to their owners, which the sinks take as no-ops."""
        refused_for = time.monotonic() - (self._refused_since or time.monotonic())
        if refused_for <= self.REFUSED_REJOIN_S:
            return
        log.warning("consumer.refused_rejoin", seconds=round(refused_for, 1))
        self._refused_since = time.monotonic()
        self.consumer.unsubscribe()
        self.consumer.subscribe(self.topics)

    #: Seconds without a record after which the runtime checks that it is not stalled behind data.
    STALL_S = 30.0
    #: Seconds of commits refused in a row after which the runtime rejoins its group.
    REFUSED_REJOIN_S = 20.0

    def _unstick(self) -> None:
        """Between batches nothing should be paused, and an assignment with records behind it should
        deliver them. Seen on a three-node Apache Kafka: after an offset commit refused during a
        rebalance, a static member held all the partitions (the broker said so) and fetched nothing
        for minutes. So a pause left over between batches is lifted, and a consumer that got nothing
        for ``STALL_S`` seconds, twice in a row at the same positions behind records, rejoins."""
        paused = self.consumer.paused()
        if paused:
            log.warning("consumer.stale_pause_resumed", partitions=len(paused))
            self.consumer.resume(*paused)
        if self._uncommitted:
            self._commit_again()
        if time.monotonic() - self._delivered_at < self.STALL_S:
            return
        self._delivered_at = time.monotonic()  # check again one STALL_S later
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=3000)
            positions = {tp: self.consumer.position(tp, timeout_ms=2000) for tp in assigned}
        except KafkaError as exc:
            log.warning("consumer.stall_check_failed", error=f"{type(exc).__name__}: {exc}")
            return
        behind = {tp: pos for tp, pos in positions.items() if pos is not None and ends.get(tp, 0) > pos}
        # stalled: behind at two checks in a row without moving (a record that came after the last
        # fetch is behind once, not twice at the same position)
        stalled = [tp for tp, pos in behind.items() if self._behind.get(tp) == pos]
        self._behind = behind
        if stalled:
            log.warning("consumer.stalled_rejoin", partitions=len(stalled), seconds=self.STALL_S)
            self._behind = {}
            self.consumer.unsubscribe()
            self.consumer.subscribe(self.topics)

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                pos = self.consumer.position(tp)
            except KafkaError:
                continue
            self.metrics.lag(tp.topic, tp.partition, max(0, high - pos))

    def cpu_report(self) -> dict[str, Any]:
        """CPU milliseconds per consumed record: the whole process, the polling thread's stages, the sink's.

        ``process`` includes every thread (kafka-python's heartbeat thread too) since the runtime was
        created; ``sink`` is the worker thread inside ``Sink.process``, and ``sink.*`` the sink's own
        breakdown of it when the sink keeps a :class:`CpuClock` as ``cpu``.
        """
        n = self.processed + self.dead_lettered
        out: dict[str, Any] = {
            "records": n,
            "process": round((time.process_time() - self._process_cpu0) * 1000 / max(1, n), 4),
        }
        with self._cpu_lock:
            out.update(self.cpu.per_record_ms(n))
        sink_cpu = getattr(self.sink, "cpu", None)
        if isinstance(sink_cpu, CpuClock):
            out.update({f"sink.{k}": v for k, v in sink_cpu.per_record_ms(n).items()})
        return out

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        try:
            self.consumer.close(autocommit=False)
        except Exception as exc:  # closing must not mask the reason we stopped
            log.warning("consumer.close_failed", error=str(exc))
        self.sink.close()
        log.info(
            "consumer.stopped",
            group=self.group_id,
            processed=self.processed,
            dead_lettered=self.dead_lettered,
            pid=os.getpid(),
            cpu_ms_per_record=self.cpu_report(),
        )


def _await_partitions(consumer: KafkaConsumer, topics: Sequence[str], timeout: float = 30.0) -> None:
    """Subscribe only once the broker we ask knows every topic's partitions.

    A topic created a moment ago on a cluster is not yet in every broker's metadata. A static member
    that joined its group in that moment was seen, on a three-node Apache Kafka, to keep an empty
    assignment for minutes (kafka-python does not implement KIP-814, so a rejoining static leader gets
    its cached, empty assignment back). Waiting costs nothing once the topics are known.
    """
    deadline = time.monotonic() + timeout
    while True:
        missing = [t for t in topics if not consumer.partitions_for_topic(t)]
        if not missing or time.monotonic() > deadline:
            if missing:
                log.warning("consumer.no_partition_metadata", topics=missing, waited_s=timeout)
            return
        time.sleep(0.2)


def build_sink_when_reachable(
    factory: Callable[[Settings, str], Any],
    settings: Settings,
    bootstrap: str,
    health: Health,
    *,
    first_delay: float = 0.5,
    max_backoff: float = 30.0,
) -> Any:
    """``factory(settings, bootstrap)``, once the sink's database answers.

    A consumer started before its database (a pod scheduled before PostgreSQL is ready, a restart in
    the middle of a database restart) waits, logging each try and not ready (``/readyz`` 503, state
    ``waiting``), instead of exiting with the driver's error. Only a database that cannot be reached
    or is locked is waited for (:func:`bridge.stores.db.is_retryable`); anything else, such as a
    malformed URL or a missing table, raises at once.
    """
    delay = first_delay
    while True:
        try:
            sink = factory(settings, bootstrap)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            health.set_state("waiting")
            log.warning("consumer.database_unreachable", error=type(exc).__name__, retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, max_backoff)
            continue
        if health.state == "waiting":
            log.info("consumer.database_reached")
            health.set_state("standby")
        return sink


def run_consumer(
    settings: Settings,
    sink_factory: Callable[[Settings, str], Any],
    group_id: str,
    *,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    exit_when_idle: float | None = None,
    topics: Sequence[str] | None = None,
) -> ConsumerRuntime:
    """Run a consumer group member until SIGTERM/SIGINT (or, with ``exit_when_idle``, until that many
    seconds pass without a record): the topics made if missing; ``/metrics``, ``/livez`` and ``/readyz``
    served on ``metrics_host``:``metrics_port`` (bridge/health.py) from before the sink is built, so a
    standby (a ledger writer waiting for the lock) is live and ready while it waits."""
    health = Health()
    if metrics_port:
        serve_health(health, metrics_host or settings.http.host, metrics_port)
    bootstrap = resolve_bootstrap(settings)
    ensure_topics(bootstrap, settings.kafka.topics, settings.kafka)
    health.set_state("standby")
    waiting = threading.Event()
    beat_while(health, waiting)
    try:
        sink = build_sink_when_reachable(sink_factory, settings, bootstrap, health)
    finally:
        waiting.set()
    dead = Publisher(settings, bootstrap)
    runtime = ConsumerRuntime(
        settings, bootstrap, sink, dead, group_id=group_id, topics=topics, health=health
    )
    tune_gc(settings.gc_threshold)
    runtime.install_signal_handlers()
    until = None
    if exit_when_idle:
        idle = {"since": time.monotonic(), "seen": 0}

        def until() -> bool:
            if runtime.processed + runtime.dead_lettered != idle["seen"]:
                idle["seen"] = runtime.processed + runtime.dead_lettered
                idle["since"] = time.monotonic()
            return bool(time.monotonic() - idle["since"] > exit_when_idle)

    try:
        runtime.run(until=until)
    finally:
        dead.close()
    return runtime
