"""Dead letters, replay guarantees and time-based replay, on the real local brokers."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer

from bridge.consumers.replay import replay
from bridge.stores.index.store import IndexStore
from bridge.stream.envelope import Envelope, OrgSigner, utc_now
from bridge.stream.producer import Publisher

from .pipeline import Stack, count_messages, make_stack, write_feeds

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(settings, monkeypatch: pytest.MonkeyPatch) -> Stack:  # type: ignore[no-untyped-def]
    return make_stack(settings, monkeypatch, ["st-mary", "riverside"])


def _ingest(stack: Stack, files: dict[str, list[Path]]) -> None:
    for org, paths in files.items():
        assert (
            stack.cli("ingest", "--adapter", "hl7v2", "--source", org, "--no-progress", *map(str, paths)) == 0
        )


def _dead_letters(stack: Stack, n: int) -> list:  # type: ignore[type-arg]
    consumer = KafkaConsumer(
        stack.settings.kafka.topics.deadletter,
        bootstrap_servers=stack.settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10000,
    )
    out = []
    for m in consumer:
        out.append(m)
        if len(out) >= n:
            break
    consumer.close()
    return out


def _send_raw(stack: Stack, value: bytes, env: Envelope, signer: OrgSigner | None) -> None:
    pub = Publisher(stack.settings, stack.settings.kafka.bootstrap_servers or "")
    signed = signer.sign(env) if signer else env
    pub.producer.send(
        stack.settings.kafka.topics.bundles, key=b"k", value=value, headers=signed.headers()
    ).get(30)
    pub.close()


def _env_for(value: bytes, org: str = "st-mary", message_id: str = "X1") -> Envelope:
    return Envelope(
        source_org=org,
        adapter="hl7v2",
        adapter_version="1.0.0",
        bundle_sha256=hashlib.sha256(value).hexdigest(),
        produced_at=utc_now(),
        message_id=message_id,
    )


def test_poison_mix_lands_in_dead_letters_and_good_records_land(stack: Stack, tmp_path: Path) -> None:
    files = write_feeds(tmp_path, 6)
    n = count_messages(files)
    _ingest(stack, files)
    trusted = OrgSigner.load(stack.settings.data_dir / "keys" / "st-mary.key")
    forger = OrgSigner("st-mary", trusted.key_id, OrgSigner.generate("st-mary").private_key)
    bundle = b'{"resourceType":"Bundle","type":"transaction","entry":[]}'
    _send_raw(stack, b"{not json", _env_for(b"{not json"), trusted)  # bad JSON
    _send_raw(stack, bundle, _env_for(bundle), forger)  # forged signature
    _send_raw(stack, bundle, _env_for(bundle, message_id="M" * 70_000), trusted)  # oversized ledger entry
    _send_raw(stack, bundle + b" ", _env_for(bundle), trusted)  # value does not match hash

    ledger = stack.open_ledger()
    rt = stack.drain("ledger", "g-ledger", lambda rt: rt.processed + rt.dead_lettered >= n + 4)
    assert (rt.processed, rt.dead_lettered) == (n, 4)
    assert ledger.size() == n
    reasons = {dict(m.headers)[b"fb-dl-error-class".decode()].decode() for m in _dead_letters(stack, 4)}
    assert reasons == {"BadBundle", "SignatureError", "EntryTooLarge", "EnvelopeError"}
    dl = _dead_letters(stack, 4)
    for m in dl:
        h = dict(m.headers)
        assert h["fb-dl-topic"].decode() == stack.settings.kafka.topics.bundles
        assert h["fb-dl-stage"].startswith(b"ledger:")
        assert "fb-dl-offset" in h and "fb-dl-partition" in h and "fb-dl-error-message" in h
        assert "fb-source-org" in h  # the original headers are kept
    ledger.close()


def test_replay_guarantees_ledger_and_index(stack: Stack, tmp_path: Path) -> None:
    files = write_feeds(tmp_path, 14, seed=5)
    n = count_messages(files)
    _ingest(stack, files)
    _ingest(stack, files)  # duplicates on the topic must not change anything
    ledger = stack.open_ledger()
    index = IndexStore.open(stack.settings.stores.index_url)
    stack.drain("ledger", "g-ledger", lambda rt: rt.processed >= 2 * n)
    stack.drain("index", "g-index", lambda rt: rt.processed >= 2 * n)
    size, root, fingerprint = ledger.size(), ledger.root_hash(), index.fingerprint()
    assert size == n

    s, bootstrap = stack.settings, stack.settings.kafka.bootstrap_servers or ""
    report = replay(s, bootstrap, sink_name="ledger", rebuild=True)
    assert report.processed == n
    assert (ledger.size(), ledger.root_hash()) == (size, root)
    report = replay(s, bootstrap, sink_name="index", rebuild=True)
    assert index.fingerprint() == fingerprint
    for _ in range(2):  # replaying into a full store changes nothing
        replay(s, bootstrap, sink_name="ledger")
        replay(s, bootstrap, sink_name="index")
        assert (ledger.size(), ledger.root_hash(), index.fingerprint()) == (size, root, fingerprint)
    assert stack.cli("ledger", "verify", "--key", stack.vkey) == 0
    dry = replay(s, bootstrap, dry_run=True, partitions=[0])
    assert set(dry.partitions) == {0} and dry.partitions[0].read > 0
    # an offset past the end is nothing to replay, not "from the beginning"
    past = replay(s, bootstrap, dry_run=True, from_offset=10**6)
    assert all(p.past_end and p.read == 0 for p in past.partitions.values()) and past.complete
    ledger.close()
    index.close()


def test_a_slow_sink_does_not_end_a_replay_early(stack: Stack, tmp_path: Path) -> None:
    """The time the caller spends on a batch is not the broker being idle (a rebuild
    whose batches took over 3 s stopped early, with exit 0, and left a partial index)."""
    from bridge.consumers.replay import Reader, ReplayReport

    files = write_feeds(tmp_path, 3, seed=8)
    _ingest(stack, files)
    n = count_messages(files)
    s, bootstrap = stack.settings, stack.settings.kafka.bootstrap_servers or ""
    reader = Reader(s, bootstrap, s.kafka.topics.bundles)
    report = ReplayReport(s.kafka.topics.bundles)
    try:
        tps = reader.partitions(None)
        got = 0
        for batch in reader.read(
            reader.start_offsets(tps, None, None), report, None, batch=max(1, n // 4), idle_s=0.5
        ):
            got += len(batch)
            time.sleep(0.7)  # longer than the idle limit
    finally:
        reader.close()
    assert got == n and report.complete


@pytest.mark.broker_quirk("tansu", "offsets_for_times uses the broker's store time")
def test_time_based_replay(stack: Stack, tmp_path: Path) -> None:
    first = write_feeds(tmp_path / "a", 4, seed=1)
    _ingest(stack, first)
    time.sleep(1.5)
    cut = datetime.now(UTC).isoformat()
    time.sleep(0.5)
    second = write_feeds(tmp_path / "b", 3, seed=2)
    _ingest(stack, second)
    s, bootstrap = stack.settings, stack.settings.kafka.bootstrap_servers or ""
    after = replay(s, bootstrap, dry_run=True, from_time=cut)
    assert sum(p.read for p in after.partitions.values()) == count_messages(second)
    before = replay(s, bootstrap, dry_run=True, to_time=cut)
    assert sum(p.read - p.after_to_time for p in before.partitions.values()) == count_messages(first)
    future = replay(s, bootstrap, dry_run=True, from_time="2100-01-01T00:00:00Z")
    assert all(p.start is None and p.read == 0 for p in future.partitions.values())


def test_dead_letters_redrive_after_fix(stack: Stack, tmp_path: Path) -> None:
    from bridge.cli import main

    # an org rotates to a key the registry does not trust yet: its records are dead-lettered...
    files = {org: paths for org, paths in write_feeds(tmp_path, 6).items() if paths}
    org, paths = sorted(files.items())[0]
    key_path = stack.settings.data_dir / "keys" / f"{org}.key"
    trusted = stack.settings.data_dir / "trust.json"
    saved = trusted.read_text()
    assert main(["keys", "create", "--org", org]) == 0
    new_trust = trusted.read_text()
    trusted.write_text(saved)
    assert stack.cli("ingest", "--adapter", "hl7v2", "--source", org, "--no-progress", *map(str, paths)) == 0
    n = count_messages({org: paths})
    ledger = stack.open_ledger()
    rt = stack.drain("ledger", "g-ledger", lambda rt: rt.dead_lettered >= n)
    assert rt.processed == 0 and ledger.size() == 0
    # a re-drive before the fix: every record fails again and is dead-lettered again, once; the re-drive
    # stops at the end it saw first instead of reading its own new dead letters
    early = replay(
        stack.settings, stack.settings.kafka.bootstrap_servers or "", dead_letters=True, sink_name="ledger"
    )
    assert (early.processed, early.dead_lettered) == (0, n)
    # ...until the fix (trusting the new key); then the dead letters are re-driven into the ledger: the
    # originals and their copies from the early re-drive, which the ledger dedupes
    trusted.write_text(new_trust)
    assert key_path.exists()
    report = replay(
        stack.settings, stack.settings.kafka.bootstrap_servers or "", dead_letters=True, sink_name="ledger"
    )
    assert report.processed == 2 * n
    assert ledger.size() == n
    ledger.close()


def test_copy_to_topic_keeps_key_headers_and_timestamp(stack: Stack, tmp_path: Path) -> None:
    files = write_feeds(tmp_path, 2)
    _ingest(stack, files)
    n = count_messages(files)
    s, bootstrap = stack.settings, stack.settings.kafka.bootstrap_servers or ""
    target = s.kafka.topics.bundles + ".copy"
    report = replay(s, bootstrap, to_topic=target)
    assert report.copied == n
    src = {
        (m.key, m.value, m.timestamp, tuple(m.headers))
        for m in _read_all(bootstrap, s.kafka.topics.bundles, n)
    }
    dst = {(m.key, m.value, m.timestamp, tuple(m.headers)) for m in _read_all(bootstrap, target, n)}
    assert src == dst
    assert all(orjson.loads(v)["resourceType"] == "Bundle" for _, v, _, _ in dst)


def _read_all(bootstrap: str, topic: str, n: int) -> list:  # type: ignore[type-arg]
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=10000
    )
    out = []
    for m in consumer:
        out.append(m)
        if len(out) >= n:
            break
    consumer.close()
    return out
