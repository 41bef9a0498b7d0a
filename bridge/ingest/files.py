"""Ingest files: every record through the pipeline, acknowledged by the broker before it counts.

:func:`ingest_files` returns a :class:`Summary`; nothing is counted as published until the broker has
it, and a rejected record is counted only once its dead letter is stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.base import ConvertedBundle
from bridge.ingest.pipeline import Pipeline
from bridge.ingest.progress import IngestProgress
from bridge.logging import get_logger
from bridge.stream.producer import Publisher

log = get_logger(__name__)

#: records in flight before the broker's acknowledgements are awaited
SETTLE_EVERY = 5000


@dataclass
class Summary:
    converted: int = 0
    published: int = 0
    rejected: int = 0
    warnings: int = 0
    seconds: float = 0.0
    #: rejection message -> count
    reasons: dict[str, int] = field(default_factory=dict)


def ingest_files(pipeline: Pipeline, files: Sequence[Path], *, progress: bool = True) -> Summary:
    """Convert every file (a directory stands for every file under it) and publish or dead-letter
    each record; returns once the broker acknowledged all of them."""
    adapter, publisher = pipeline.adapter, pipeline.publisher
    summary = Summary()
    pending: list[Any] = []
    started = time.perf_counter()
    cpu = {"start-up": time.process_time(), "convert": 0.0, "publish": 0.0}
    clock = time.thread_time
    with IngestProgress(len(files), enabled=progress) as bar:
        for path in files:
            bar.start_file(path)
            outcomes = iter(adapter.convert_path(path, pipeline.source))
            while True:
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
                    pending.append(pipeline.publish(outcome))
                    cpu["publish"] += clock() - t1
                else:
                    summary.rejected += 1
                    err = outcome.error
                    loc = err.location.with_file(str(path))
                    summary.reasons[err.message] = summary.reasons.get(err.message, 0) + 1
                    bar.print(
                        f"[red]rejected[/red] {loc}: {err.message}", plain=f"rejected {loc}: {err.message}"
                    )
                    pending.append(pipeline.dead_letter(outcome.raw, err, location=str(loc), file=str(path)))
                bar.advance_record()
                if len(pending) >= SETTLE_EVERY:
                    summary.published += _settle(pending, publisher)
            bar.finish_file()
        summary.published += _settle(pending, publisher)
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


def _settle(pending: list[Any], publisher: Publisher) -> int:
    """Wait for the broker's acknowledgement of every pending record; returns how many bundles were acked."""
    publisher.flush(60)
    acked = 0
    for fut in pending:
        md = fut.get(timeout=60)
        if md.topic == publisher.topics.bundles:
            acked += 1
    pending.clear()
    return acked
