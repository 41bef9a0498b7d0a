"""MLLP listener against a real broker: AA only after the broker's ack, duplicates not re-published."""

from __future__ import annotations

import asyncio
import time

import pytest
from kafka import KafkaConsumer

from adapters.base import SourceInfo
from adapters.hl7v2 import HL7v2Adapter
from bridge.cli import main
from bridge.config import Settings
from bridge.mllp import END, MllpServer, frame
from bridge.publish import Publisher

from .conftest import settings_env

pytestmark = pytest.mark.integration

SRC = SourceInfo("st-mary")
MSG = (
    b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01^ADT_A01|CTRL-1|P|2.5.1\r"
    b"PID|1||MRN-77^^^^MR||DOE^JANE||19800101|F\rPV1|1|I|||||||||||||||||V-9\r"
)


async def send(port: int, *messages: bytes) -> list[tuple[str, float]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for m in messages:
        t0 = time.perf_counter()
        writer.write(frame(m))
        await writer.drain()
        ack = (await asyncio.wait_for(reader.readuntil(END), 60))[1:-2].decode()
        msa = next(line for line in ack.split("\r") if line.startswith("MSA|")).split("|")
        out.append((msa[1], time.perf_counter() - t0))
    writer.close()
    return out


def records(settings: Settings, expect: int, timeout: float = 20) -> list:
    consumer = KafkaConsumer(
        settings.topics.bundles,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
        group_id=None,
    )
    got: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            got.extend(consumer)
            if len(got) >= expect:
                # keep reading a little to see any extra (duplicate) record
                got.extend(consumer)
                break
    finally:
        consumer.close()
    return got


async def test_aa_after_broker_ack_and_dedup(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in settings_env(settings).items():
        monkeypatch.setenv(k, v)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    assert main(["keys", "create", "--org", "st-mary"]) == 0
    assert main(["topics", "create"]) == 0
    assert settings.bootstrap_servers
    server = MllpServer(
        HL7v2Adapter(), SRC, lambda: Publisher(settings, settings.bootstrap_servers or ""), ack_timeout=30
    )
    await server.start("127.0.0.1", 0)
    try:
        other = MSG.replace(b"CTRL-1", b"CTRL-2").replace(b"MRN-77", b"MRN-78")
        acks = await send(server.port, MSG, MSG, other, b"MSH|^~\\&|x\rbad\r")
    finally:
        await server.close()
    assert [a for a, _ in acks] == ["AA", "AA", "AA", "AE"]
    assert server.stats["duplicates"] == 1
    assert server.stats["dead_lettered"] == 1  # the AE'd message is kept, acknowledged by the broker
    got = records(settings, 2)
    assert sorted(r.key for r in got) == [
        b"urn:fhirbridge:st-mary:mrn|MRN-77",
        b"urn:fhirbridge:st-mary:mrn|MRN-78",
    ]


async def test_cli_mllp_command(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fhirbridge mllp` as a process: listens, converts, publishes, acknowledges AA."""
    import socket
    import subprocess
    import sys

    env = settings_env(settings)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    assert main(["keys", "create", "--org", "st-mary"]) == 0
    assert main(["topics", "create"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridge.cli",
            "mllp",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--source",
            "st-mary",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "mllp listener did not start"
                await asyncio.sleep(0.2)
        acks = await send(port, MSG.replace(b"CTRL-1", b"CLI-1"))
        assert [a for a, _ in acks] == ["AA"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    got = records(settings, 1)
    assert [r.key for r in got] == [b"urn:fhirbridge:st-mary:mrn|MRN-77"]


def test_a_producer_dropped_after_a_broker_failure_is_really_closed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kafka-python's close() flushes first and, with a record still pending, raises and leaves the
    producer open (its I/O thread, sockets and retries alive). Found by review: the listener's reset
    after an AR leaked one producer per broker failure."""
    import os
    import threading
    from dataclasses import replace

    from bridge.broker import start_local
    from bridge.config import Topics
    from bridge.mllp import _close_quietly

    handle = start_local("noida", tmp_path)
    try:
        settings = replace(
            Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)}),
            bootstrap_servers=handle.bootstrap,
            topics=Topics(bundles="fb." + os.urandom(3).hex(), partitions=1),
        )
        pub = Publisher(settings, handle.bootstrap)
        pub.producer.send(settings.topics.bundles, b"x").get(10)
        handle.stop()
        pub.producer.send(settings.topics.bundles, b"y")  # pending: the broker is gone
        time.sleep(0.5)
        _close_quietly(pub, timeout=0.5)
        assert pub.producer._closed
        assert not pub.producer._sender.is_alive()
        assert not [t for t in threading.enumerate() if t is pub.producer._sender]
    finally:
        handle.stop()
