from __future__ import annotations

import structlog

from bridge.config import Settings
from bridge.consumer import Record, batch_context, consumer_config, instance_id


def test_batch_log_context_names_topic_partitions_and_offsets() -> None:
    records = [Record("fhir.bundles", p, o, 0, None, b"", []) for p, o in [(0, 5), (1, 9), (0, 7), (1, 8)]]
    ctx = batch_context(records)
    assert ctx["topic"] == "fhir.bundles" and ctx["partition"] == 0 and ctx["offset"] == 5
    assert ctx["offsets"] == {"fhir.bundles/0": [5, 7], "fhir.bundles/1": [8, 9]}
    with structlog.contextvars.bound_contextvars(**ctx):
        assert structlog.contextvars.get_contextvars()["offsets"] == ctx["offsets"]


def test_consumer_config_never_keeps_the_45s_session_default_and_is_static() -> None:
    s = Settings.from_env({})
    cfg = consumer_config(s, "127.0.0.1:1", "fhirbridge-ledger")
    assert (cfg["session_timeout_ms"], cfg["heartbeat_interval_ms"]) == (6000, 1500)
    assert cfg["enable_auto_commit"] is False
    assert cfg["group_instance_id"] == instance_id(s, "fhirbridge-ledger")
    assert "group_instance_id" not in consumer_config(s, "127.0.0.1:1", None)
    s2 = Settings.from_env({"FHIRBRIDGE_CONSUMER_INSTANCE_ID": "ledger-2"})
    assert consumer_config(s2, "127.0.0.1:1", "g")["group_instance_id"] == "ledger-2"


def test_record_timestamp_is_rfc3339_utc() -> None:
    assert Record("t", 0, 0, 1_767_225_600_123, None, None).timestamp_iso == "2026-01-01T00:00:00.123Z"
