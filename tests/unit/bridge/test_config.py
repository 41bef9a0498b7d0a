"""Settings from the environment: the garbage-collector setting and its errors."""

from __future__ import annotations

import gc

import pytest

from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.gctune import tune_gc


def test_gc_threshold_default_and_override() -> None:
    assert Settings.from_env({}).gc_threshold == (50_000, 20, 10)
    assert Settings.from_env({"FHIRBRIDGE_GC_THRESHOLD": "2000, 5, 5"}).gc_threshold == (2000, 5, 5)
    assert Settings.from_env({"FHIRBRIDGE_GC_THRESHOLD": "default"}).gc_threshold is None


@pytest.mark.parametrize("bad", ["", "1,2", "a,b,c", "0,10,10", "700,-1,10", "1,2,3,4"])
def test_a_bad_gc_threshold_names_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match="FHIRBRIDGE_GC_THRESHOLD"):
        Settings.from_env({"FHIRBRIDGE_GC_THRESHOLD": bad})


def test_tune_gc_freezes_the_heap_and_sets_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(None)
        assert gc.get_threshold() == before
        tune_gc((12_345, 7, 3))
        assert gc.get_threshold() == (12_345, 7, 3)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_compression_and_consumer_batching_settings() -> None:
    s = Settings.from_env({})
    assert (s.kafka.compression, s.kafka.consumer_linger_ms, s.kafka.consumer_idle_sleep_ms) == (
        "gzip",
        50,
        20,
    )
    s = Settings.from_env(
        {
            "FHIRBRIDGE_COMPRESSION": "none",
            "FHIRBRIDGE_CONSUMER_LINGER_MS": "0",
            "FHIRBRIDGE_CONSUMER_IDLE_SLEEP_MS": "5",
        }
    )
    assert (s.kafka.compression, s.kafka.consumer_linger_ms, s.kafka.consumer_idle_sleep_ms) == (None, 0, 5)
    with pytest.raises(ConfigError, match="FHIRBRIDGE_COMPRESSION"):
        Settings.from_env({"FHIRBRIDGE_COMPRESSION": "brotli"})


def test_a_compression_codec_must_be_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """kafka-python raises a bare RuntimeError when the producer starts without the codec's library:
    the setting is refused up front with a clear error instead."""
    from kafka import codec

    monkeypatch.setattr(codec, "has_zstd", lambda: True)
    assert Settings.from_env({"FHIRBRIDGE_COMPRESSION": "ZSTD"}).kafka.compression == "zstd"
    monkeypatch.setattr(codec, "has_zstd", lambda: False)
    with pytest.raises(ConfigError, match="FHIRBRIDGE_COMPRESSION=zstd needs its codec library"):
        Settings.from_env({"FHIRBRIDGE_COMPRESSION": "zstd"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FHIRBRIDGE_CONSUMER_IDLE_SLEEP_MS", "0"),  # would bring back the busy loop
        ("FHIRBRIDGE_CONSUMER_IDLE_SLEEP_MS", "-5"),  # time.sleep() would raise inside the consumer
        ("FHIRBRIDGE_CONSUMER_LINGER_MS", "-1"),
        ("FHIRBRIDGE_INGEST_LINGER_MS", "-1"),
        ("FHIRBRIDGE_CONSUMER_BATCH", "0"),
        ("FHIRBRIDGE_PARTITIONS", "0"),
        ("FHIRBRIDGE_SESSION_TIMEOUT_MS", "-6000"),
        ("FHIRBRIDGE_RETENTION_MS", "-2"),
    ],
)
def test_out_of_range_numbers_are_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be at least"):
        Settings.from_env({name: value})
    assert (
        Settings.from_env(
            {"FHIRBRIDGE_RETENTION_MS": "-1", "FHIRBRIDGE_CONSUMER_LINGER_MS": "0"}
        ).kafka.topics.retention_ms
        == -1
    )


def test_every_producer_compresses_as_configured() -> None:
    from bridge.stream.producer import producer_config

    assert producer_config(Settings.from_env({}), "127.0.0.1:1")["compression_type"] == "gzip"
    assert (
        producer_config(Settings.from_env({"FHIRBRIDGE_COMPRESSION": "none"}), "127.0.0.1:1")[
            "compression_type"
        ]
        is None
    )
    cfg = producer_config(Settings.from_env({}), "127.0.0.1:1")
    assert (cfg["acks"], cfg["enable_idempotence"]) == (
        "all",
        True,
    )  # compression leaves the guarantees alone


def test_ingest_lingers_longer_than_the_other_producers(monkeypatch: pytest.MonkeyPatch) -> None:
    import bridge.stream.producer
    from bridge.stream.producer import Publisher, producer_config

    s = Settings.from_env({})
    assert s.kafka.ingest_linger_ms == 50 and producer_config(s, "127.0.0.1:1")["linger_ms"] == 10
    assert Settings.from_env({"FHIRBRIDGE_INGEST_LINGER_MS": "5"}).kafka.ingest_linger_ms == 5
    seen: dict[str, object] = {}

    class _Producer:
        def __init__(self, **cfg: object) -> None:
            seen.update(cfg)

    monkeypatch.setattr(bridge.stream.producer, "KafkaProducer", _Producer)
    Publisher(s, "127.0.0.1:1", linger_ms=s.kafka.ingest_linger_ms)
    assert seen["linger_ms"] == 50 and seen["acks"] == "all" and seen["compression_type"] == "gzip"
