"""`fhirbridge ingest` when publishes fail: every failed record is counted, kept for a retry and reported,
and the run exits non-zero. Before, the first failed future's exception ended the run with one line
naming its class: no count, the records after it never read, nothing kept for a retry."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError, NotEnoughReplicasError

from adapters.base import SourceInfo
from adapters.hl7v2 import HL7v2Adapter
from bridge.errors import BrokerUnavailable
from bridge.ingest import files as ingest_files_mod
from bridge.ingest.files import STOP_AFTER_SEND_ERRORS, ingest_files
from bridge.ingest.pipeline import Pipeline

TOPIC = "fhir.bundles.t"
DL_TOPIC = "fhir.deadletter.t"


def message(i: int) -> bytes:
    return (
        f"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01^ADT_A01|C{i}|P|2.5.1\r"
        f"PID|1||M{i}^^^^MR||DOE^JANE{i}||19800101|F\r"
    ).encode()


BAD = b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01|CBAD|P|2.5.1\rPID|1||M1\rpv1|oops\r"


class FakeFuture:
    def __init__(self, topic: str, error: BaseException | None) -> None:
        self.topic, self.error = topic, error

    def get(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(topic=self.topic, partition=0, offset=0)


class FakePublisher:
    """A Publisher whose broker refuses what ``verdict(n)`` says (n counts every record sent)."""

    def __init__(
        self, verdict: Callable[[int], BaseException | None], send_error: Callable[[int], bool]
    ) -> None:
        self.topics = SimpleNamespace(bundles=TOPIC, deadletter=DL_TOPIC)
        self.producer = SimpleNamespace(config={"delivery_timeout_ms": 1000})
        self.verdict, self.send_error = verdict, send_error
        self.sent = 0
        self.bundles: list[str] = []

    def _send(self, topic: str) -> FakeFuture:
        self.sent += 1
        if self.send_error(self.sent):
            raise BrokerUnavailable(f"cannot produce to {topic}: KafkaTimeoutError")
        return FakeFuture(topic, self.verdict(self.sent))

    def publish(self, converted: Any, adapter: Any, source: Any, **_: Any) -> FakeFuture:
        fut = self._send(TOPIC)
        if fut.error is None:
            self.bundles.append(converted.message_id)
        return fut

    def dead_letter(self, value: bytes | None, **_: Any) -> FakeFuture:
        return self._send(DL_TOPIC)

    def flush(self, timeout: float | None = None) -> None:
        pass


def run(
    tmp_path: Path,
    records: list[bytes],
    verdict: Callable[[int], BaseException | None] = lambda n: None,
    send_error: Callable[[int], bool] = lambda n: False,
) -> tuple[Any, FakePublisher]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(b"\n".join(records) + b"\n")
    publisher = FakePublisher(verdict, send_error)
    pipeline = Pipeline(HL7v2Adapter(), SourceInfo("st-mary"), publisher)  # type: ignore[arg-type]
    summary = ingest_files(pipeline, [feed], progress=False, failed_dir=tmp_path / "failed")
    return summary, publisher


def manifest(summary: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (summary.failed.directory / "failed.jsonl").read_text().splitlines()]


def test_failed_futures_are_counted_kept_and_the_rest_still_published(tmp_path: Path) -> None:
    refuse = {3: NotEnoughReplicasError("2 < 2"), 7: KafkaTimeoutError("delivery timeout"), 8: None}
    summary, publisher = run(tmp_path, [message(i) for i in range(1, 11)], lambda n: refuse.get(n))
    assert (summary.converted, summary.published, summary.failed_count) == (10, 8, 2)
    assert summary.converted == summary.published + summary.failed.bundles
    assert summary.failed.reasons == {"NotEnoughReplicasError": 1, "KafkaTimeoutError": 1}
    assert len(publisher.bundles) == 8
    # the failed records' own bytes, ready for `fhirbridge ingest` again
    kept = (summary.failed.records / "feed.hl7").read_bytes()
    assert kept == message(3) + b"\n" + message(7) + b"\n"
    again, _ = run(tmp_path / "retry", [m for m in kept.split(b"\n") if m])
    assert (again.converted, again.published, again.failed_count) == (2, 2, 0)
    entries = manifest(summary)
    assert [e["message_id"] for e in entries] == ["C3", "C7"]
    assert entries[0]["kind"] == "bundle" and entries[0]["error"].startswith("NotEnoughReplicasError")
    assert entries[0]["retry_file"] == "records/feed.hl7"


def test_a_dead_letter_that_is_not_stored_is_a_failure_too(tmp_path: Path) -> None:
    summary, _ = run(tmp_path, [message(1), BAD], lambda n: NotEnoughReplicasError() if n == 2 else None)
    assert (summary.converted, summary.published, summary.rejected) == (1, 1, 1)
    assert (summary.failed.bundles, summary.failed.dead_letters) == (0, 1)
    assert manifest(summary)[0]["kind"] == "dead-letter"
    assert not summary.failed.records.exists()  # nothing to convert again: it would be rejected again


def test_no_failure_no_directory(tmp_path: Path) -> None:
    summary, _ = run(tmp_path, [message(i) for i in range(5)])
    assert (summary.converted, summary.published, summary.failed_count) == (5, 5, 0)
    assert not (tmp_path / "failed").exists()


def test_send_failing_in_a_row_stops_sending_and_keeps_the_rest(tmp_path: Path) -> None:
    summary, publisher = run(tmp_path, [message(i) for i in range(1, 21)], send_error=lambda n: n >= 5)
    assert publisher.sent == 4 + STOP_AFTER_SEND_ERRORS
    assert (summary.converted, summary.published, summary.failed_count) == (20, 4, 16)
    assert summary.stopped is not None and "BrokerUnavailable" in summary.stopped
    kept = (summary.failed.records / "feed.hl7").read_bytes().split(b"\n")
    assert [m for m in kept if m] == [message(i) for i in range(5, 21)]
    assert summary.failed.reasons == {"BrokerUnavailable": STOP_AFTER_SEND_ERRORS, "NotSent": 13}


def test_one_send_failure_does_not_stop_the_run(tmp_path: Path) -> None:
    summary, publisher = run(tmp_path, [message(i) for i in range(1, 11)], send_error=lambda n: n == 2)
    assert (summary.published, summary.failed_count, summary.stopped) == (9, 1, None)
    assert publisher.sent == 10


def test_the_cli_exits_1_and_says_how_many_failed_where_they_are_and_how_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge.cli import main
    from bridge.stream import broker, producer, topics

    monkeypatch.setenv("FHIRBRIDGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    fake = FakePublisher(
        lambda n: NotEnoughReplicasError("not enough") if n % 4 == 0 else None, lambda n: False
    )
    fake.signer = lambda org: None  # type: ignore[attr-defined]
    fake.close = lambda timeout=10: None  # type: ignore[attr-defined]
    monkeypatch.setattr(producer, "Publisher", lambda *a, **k: fake)
    monkeypatch.setattr(topics, "ensure_topics", lambda *a, **k: [])
    monkeypatch.setattr(broker, "resolve_bootstrap", lambda s: "127.0.0.1:1")
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(b"\n".join(message(i) for i in range(1, 13)) + b"\n")
    failed_dir = tmp_path / "failed"
    code = main(
        [
            *("ingest", "--adapter", "hl7v2", "--source", "st-mary", "--no-progress"),
            *("--failed-dir", str(failed_dir), str(feed)),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "converted 12, published 9, rejected 0, failed 3," in err
    assert "FAILED: 3 records were not acknowledged by the broker (NotEnoughReplicasError 3x)" in err
    assert str(failed_dir / "failed.jsonl") in err
    assert (
        f"retry them with: fhirbridge ingest --adapter hl7v2 --source st-mary --timezone UTC {failed_dir / 'records'}"
        in err
    )
    assert len((failed_dir / "failed.jsonl").read_text().splitlines()) == 3


def test_the_cli_exits_0_when_every_publish_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge.cli import main
    from bridge.stream import broker, producer, topics

    monkeypatch.setenv("FHIRBRIDGE_DATA_DIR", str(tmp_path / "data"))
    fake = FakePublisher(lambda n: None, lambda n: False)
    fake.signer = lambda org: None  # type: ignore[attr-defined]
    fake.close = lambda timeout=10: None  # type: ignore[attr-defined]
    monkeypatch.setattr(producer, "Publisher", lambda *a, **k: fake)
    monkeypatch.setattr(topics, "ensure_topics", lambda *a, **k: [])
    monkeypatch.setattr(broker, "resolve_bootstrap", lambda s: "127.0.0.1:1")
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(b"\n".join(message(i) for i in range(1, 6)) + b"\n")
    assert main(["ingest", "--adapter", "hl7v2", "--source", "st-mary", "--no-progress", str(feed)]) == 0
    err = capsys.readouterr().err
    assert "converted 5, published 5, rejected 0, failed 0," in err and "FAILED" not in err
    assert not (tmp_path / "data" / "ingest-failed").exists()


def test_settle_waits_no_longer_than_the_delivery_timeout_and_a_margin(tmp_path: Path) -> None:
    waits: list[float] = []

    class Slow(FakeFuture):
        def get(self, timeout: float | None = None) -> Any:
            waits.append(timeout or 0)
            raise KafkaTimeoutError("Timeout after waiting")

    publisher = FakePublisher(lambda n: None, lambda n: False)
    publisher.publish = lambda *a, **k: Slow(TOPIC, None)  # type: ignore[method-assign]
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(message(1))
    pipeline = Pipeline(HL7v2Adapter(), SourceInfo("st-mary"), publisher)  # type: ignore[arg-type]
    summary = ingest_files(pipeline, [feed], progress=False, failed_dir=tmp_path / "failed")
    assert summary.failed_count == 1
    assert 0 < waits[0] <= 1 + ingest_files_mod.SETTLE_MARGIN_S


def test_a_stop_request_ends_reading_settles_what_was_sent_and_says_where_it_stopped(tmp_path: Path) -> None:
    import threading

    stop = threading.Event()

    def verdict(n: int) -> BaseException | None:
        if n == 4:
            stop.set()  # SIGTERM arrives while the fourth record is being sent
        return None

    tmp_path.mkdir(parents=True, exist_ok=True)
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(b"\n".join(message(i) for i in range(1, 11)) + b"\n")
    other = tmp_path / "second.hl7"
    other.write_bytes(message(11) + b"\n")
    publisher = FakePublisher(verdict, lambda n: False)
    pipeline = Pipeline(HL7v2Adapter(), SourceInfo("st-mary"), publisher)  # type: ignore[arg-type]
    summary = ingest_files(pipeline, [feed, other], progress=False, failed_dir=tmp_path / "failed", stop=stop)
    assert (summary.converted, summary.published, summary.failed_count) == (4, 4, 0)
    assert publisher.bundles == ["C1", "C2", "C3", "C4"]
    assert summary.interrupted == f"{feed}, after record 4"
