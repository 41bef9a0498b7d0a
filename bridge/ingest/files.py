"""Ingest files: every record through the pipeline, acknowledged by the broker before it counts.

:func:`ingest_files` returns a :class:`Summary`; nothing is counted as published until the broker has
it, and a rejected record is counted only once its dead letter is stored. A record whose publish
fails (the broker refuses it, the producer's delivery timeout passes, ``send`` cannot hand it over) is
counted as failed and kept for a retry by :class:`~bridge.ingest.failed.FailedRecords`; the run goes
on with the next record. After :data:`STOP_AFTER_SEND_ERRORS` ``send`` calls in a row fail (each
waits the producer's ``max_block_ms``: no broker answers), nothing more is sent: every further record
is kept for the retry, unsent.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adapters.base import ConvertedBundle
from bridge.errors import BrokerUnavailable
from bridge.ingest.failed import FailedRecords, Sent
from bridge.ingest.pipeline import Pipeline
from bridge.ingest.progress import IngestProgress
from bridge.logging import get_logger
from bridge.stream.producer import Publisher

log = get_logger(__name__)

#: records in flight before the broker's acknowledgements are awaited
SETTLE_EVERY = 5000
#: ``send`` calls failing in a row after which nothing more is sent
STOP_AFTER_SEND_ERRORS = 3
#: beyond the producer's delivery timeout, how long to wait for its verdict on a record
SETTLE_MARGIN_S = 30.0


class NotSent(BrokerUnavailable):
    """A record not handed to the producer, because publishing stopped after ``send`` kept failing."""


@dataclass
class Summary:
    converted: int = 0
    published: int = 0
    rejected: int = 0
    warnings: int = 0
    seconds: float = 0.0
    #: rejection message -> count
    reasons: dict[str, int] = field(default_factory=dict)
    #: records the broker did not acknowledge (None: no failed-records directory was given)
    failed: FailedRecords | None = None
    #: why publishing stopped early, when ``send`` kept failing
    stopped: str | None = None
    #: where reading stopped when the run was asked to stop (SIGTERM, Ctrl-C): "file" or "file:record"
    interrupted: str | None = None

    @property
    def failed_count(self) -> int:
        return self.failed.count if self.failed is not None else 0


def ingest_files(
    pipeline: Pipeline,
    files: Sequence[Path],
    *,
    progress: bool = True,
    failed_dir: Path = Path("ingest-failed"),
    stop: threading.Event | None = None,
) -> Summary:
    """Convert every file (a directory stands for every file under it) and publish or dead-letter
    each record; returns once the broker acknowledged or refused all of them. The records it refused
    are kept in ``failed_dir``, created on the first one (see :class:`FailedRecords`).

    ``stop`` set (SIGTERM): no further record is read; what was sent is settled as usual, and
    ``summary.interrupted`` says where reading stopped. Sending the same input again is safe: the
    ledger and the index deduplicate by bundle hash."""
    adapter, publisher = pipeline.adapter, pipeline.publisher
    summary = Summary(failed=FailedRecords(failed_dir))
    pending: list[Sent] = []
    send_errors = 0
    started = time.perf_counter()
    cpu = {"start-up": time.process_time(), "convert": 0.0, "publish": 0.0}
    clock = time.thread_time
    with IngestProgress(len(files), enabled=progress) as bar:
        for path in files:
            if stop is not None and stop.is_set():
                summary.interrupted = summary.interrupted or str(path)
                break
            bar.start_file(path)
            outcomes = iter(adapter.convert_path(path, pipeline.source))
            while True:
                if stop is not None and stop.is_set():
                    summary.interrupted = f"{path}, after record {summary.converted + summary.rejected}"
                    break
                t0 = clock()
                outcome = next(outcomes, None)
                t1 = clock()
                cpu["convert"] += t1 - t0
                if outcome is None:
                    break
                outcome = pipeline.decide(outcome)
                if isinstance(outcome, ConvertedBundle):
                    summary.converted += 1
                    summary.warnings += len(outcome.warnings)
                    where = outcome.location.file or str(path)
                    sent = Sent(None, Path(where), str(outcome.location), outcome.raw, outcome)
                else:
                    summary.rejected += 1
                    err = outcome.error
                    loc = err.location.with_file(str(path))
                    summary.reasons[err.message] = summary.reasons.get(err.message, 0) + 1
                    bar.print(
                        f"[red]rejected[/red] {loc}: {err.message}", plain=f"rejected {loc}: {err.message}"
                    )
                    sent = Sent(None, Path(err.location.file or str(path)), str(loc), outcome.raw, None)
                if summary.stopped is not None:
                    _fail(summary, sent, NotSent(summary.stopped))
                else:
                    try:
                        if isinstance(outcome, ConvertedBundle):
                            sent.future = pipeline.publish(outcome)
                        else:
                            sent.future = pipeline.dead_letter(
                                outcome.raw, outcome.error, location=sent.location, file=str(path)
                            )
                        send_errors = 0
                        pending.append(sent)
                    except Exception as exc:  # BrokerUnavailable, KafkaError: counted, kept, reported
                        send_errors += 1
                        _fail(summary, sent, exc)
                        if send_errors >= STOP_AFTER_SEND_ERRORS:
                            summary.stopped = f"{type(exc).__name__}: {exc}"
                            log.error("ingest.stopped_sending", error=summary.stopped, after=send_errors)
                if isinstance(outcome, ConvertedBundle):
                    cpu["publish"] += clock() - t1
                bar.advance_record()
                if len(pending) >= SETTLE_EVERY:
                    summary.published += _settle(pending, publisher, summary)
            bar.finish_file()
        summary.published += _settle(pending, publisher, summary, stopping=summary.interrupted is not None)
    summary.seconds = time.perf_counter() - started
    cpu["producer threads and the rest"] = (
        time.process_time() - cpu["start-up"] - cpu["convert"] - cpu["publish"]
    )
    log.info(
        "ingest.cpu",
        pid=os.getpid(),
        bundles=summary.converted,
        cpu_s={k: round(v, 4) for k, v in cpu.items()},
        cpu_ms_per_bundle={
            k: round(v * 1000 / max(1, summary.converted), 4) for k, v in cpu.items() if k != "start-up"
        },
    )
    return summary


#: once asked to stop, wait at most this long for the broker's verdicts (a pod's grace period is short)
STOP_SETTLE_S = 20.0


def _settle(pending: list[Sent], publisher: Publisher, summary: Summary, stopping: bool = False) -> int:
    """Wait for the broker's verdict on every pending record; returns how many bundles were acked.

    A record the broker refused, or that the producer gave up on, is counted and kept in
    ``summary.failed``. The wait is bounded by the producer's delivery timeout (after which it fails
    the record itself) plus a margin, so that a record reported failed is one the producer gave up on.
    When ``stopping`` (SIGTERM), at most :data:`STOP_SETTLE_S`: a record without a verdict by then is
    kept and reported as failed (it may still arrive; sending it again is deduplicated downstream).
    """
    config = getattr(publisher.producer, "config", None) or {}
    wait_s = float(config.get("delivery_timeout_ms", 120000)) / 1000 + SETTLE_MARGIN_S
    if stopping:
        wait_s = min(wait_s, STOP_SETTLE_S)
    deadline = time.monotonic() + wait_s
    try:
        publisher.flush(wait_s)
    except Exception as exc:  # a flush timeout: each record's own verdict is read below
        log.warning("ingest.flush_failed", error=f"{type(exc).__name__}: {exc}")
    acked = 0
    for sent in pending:
        try:
            md = sent.future.get(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # the broker's or the producer's verdict: counted and kept
            _fail(summary, sent, exc)
            continue
        if md.topic == publisher.topics.bundles:
            acked += 1
    pending.clear()
    return acked


def _fail(summary: Summary, sent: Sent, error: BaseException) -> None:
    assert summary.failed is not None
    if summary.failed.count == 0:
        log.error("ingest.publish_failed", location=sent.location, error=f"{type(error).__name__}: {error}")
    summary.failed.add(sent, error)
