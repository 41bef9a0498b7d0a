"""Prometheus metrics of consumers and the HTTP service (``/metrics``), with prometheus_client."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge

CONSUMED = Counter("fhirbridge_consumer_consumed", "Records consumed", ["group", "topic", "partition"])
DEAD = Counter(
    "fhirbridge_consumer_dead_lettered",
    "Records sent to the dead-letter topic",
    ["group", "topic", "partition"],
)
COMMITTED = Gauge(
    "fhirbridge_consumer_committed_offset",
    "Last committed offset (next to read)",
    ["group", "topic", "partition"],
)
LAG = Gauge("fhirbridge_consumer_lag", "High watermark minus position", ["group", "topic", "partition"])
BACKOFF = Counter("fhirbridge_consumer_backoffs", "Times the consumer paused for a dependency", ["group"])


class ConsumerMetrics:
    def __init__(self, group: str) -> None:
        self.group = group

    def consumed(self, records: Iterable[Any]) -> None:
        for r in records:
            CONSUMED.labels(self.group, r.topic, str(r.partition)).inc()

    def dead_lettered(self, records: Iterable[Any]) -> None:
        for r in records:
            DEAD.labels(self.group, r.topic, str(r.partition)).inc()

    def committed(self, offsets: dict[Any, Any]) -> None:
        for tp, om in offsets.items():
            COMMITTED.labels(self.group, tp.topic, str(tp.partition)).set(om.offset)

    def lag(self, topic: str, partition: int, value: int) -> None:
        LAG.labels(self.group, topic, str(partition)).set(value)

    def backoff(self) -> None:
        BACKOFF.labels(self.group).inc()


# -- the service's access control ------------------------------------------------------------------
BREAK_GLASS_ACCESSES = Counter(
    "fhirbridge_break_glass_accesses",
    "Accesses under a break-the-glass override (started: the access that opened the window)",
    ["started"],
)
CONSENT_WITHHELD = Counter(
    "fhirbridge_consent_withheld_resources", "Resources withheld from an answer by a patient's Consent"
)
AUDIT_FAILURES = Counter(
    "fhirbridge_audit_failures", "Accesses refused with 503 because their AuditEvents could not be stored"
)
