"""MLLP listener against a real broker: AA only after the broker's ack, duplicates not re-published."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import hl7
import pytest
from hl7.client import MLLPClient
from kafka import KafkaConsumer

from adapters.base import SourceInfo
from adapters.hl7v2 import HL7v2Adapter
from bridge.cli import main
from bridge.config import Settings, Topics
from bridge.ingest.mllp import END, MllpServer, frame
from bridge.stream.producer import Publisher

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


def records(settings: Settings, expect: int, timeout: float = 20, topic: str | None = None) -> list:
    consumer = KafkaConsumer(
        topic or settings.kafka.topics.bundles,
        bootstrap_servers=settings.kafka.bootstrap_servers,
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
    assert settings.kafka.bootstrap_servers
    server = MllpServer(
        HL7v2Adapter(),
        SRC,
        lambda: Publisher(settings, settings.kafka.bootstrap_servers or ""),
        ack_timeout=30,
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
    with socket.socket() as s, socket.socket() as h:
        s.bind(("127.0.0.1", 0))
        h.bind(("127.0.0.1", 0))
        port, health_port = s.getsockname()[1], h.getsockname()[1]
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
            "--health-port",
            str(health_port),
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
        assert _health(health_port, "/livez")[0] == 200
        assert _health(health_port, "/readyz") == (
            200,
            {"listener": "listening", "broker": "nothing sent yet"},
        )
        acks = await send(port, MSG.replace(b"CTRL-1", b"CLI-1"))
        assert [a for a, _ in acks] == ["AA"]
        assert _health(health_port, "/readyz")[1]["broker"] == "took the last record"
        # SIGTERM with a sender still connected: the listener stops taking work, closes it, exits 0
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        await asyncio.sleep(0.2)
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        idle.settimeout(5)
        assert idle.recv(1) == b"", "the open connection was closed"
        idle.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    got = records(settings, 1)
    assert [r.key for r in got] == [b"urn:fhirbridge:st-mary:mrn|MRN-77"]


def _health(port: int, path: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read()).get("checks", {})
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()).get("checks", {})


def test_a_producer_dropped_after_a_broker_failure_is_really_closed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kafka-python's close() flushes first and, with a record still pending, raises and leaves the
    producer open (its I/O thread, sockets and retries alive). The listener's reset
    after an AR leaked one producer per broker failure."""
    import os
    import threading
    from dataclasses import replace

    from bridge.config import Topics
    from bridge.ingest.mllp import _close_quietly
    from bridge.stream.broker import start_local

    handle = start_local("noida", tmp_path)
    try:
        base = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
        settings = replace(
            base,
            kafka=replace(
                base.kafka,
                bootstrap_servers=handle.bootstrap,
                topics=Topics(bundles="fb." + os.urandom(3).hex(), partitions=1),
            ),
        )
        pub = Publisher(settings, handle.bootstrap)
        pub.producer.send(settings.kafka.topics.bundles, b"x").get(10)
        handle.stop()
        pub.producer.send(settings.kafka.topics.bundles, b"y")  # pending: the broker is gone
        time.sleep(0.5)
        _close_quietly(pub, timeout=0.5)
        assert pub.producer._closed
        assert not pub.producer._sender.is_alive()
        assert not [t for t in threading.enumerate() if t is pub.producer._sender]
    finally:
        handle.stop()


# -- an AA means the message is kept -------------------------------------------------------
# The sender here is python-hl7's MLLP client, and its parser reads the ACKs.


def mllp_send(port: int, *messages: bytes) -> list[hl7.Message]:
    """Send ``messages`` over one connection with python-hl7's MLLPClient; the ACKs as it parses them."""
    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(60)
        return [hl7.parse(client.send_message(m).strip(b"\x0b\x1c\r").decode()) for m in messages]


def field(ack: hl7.Message, segment: str, n: int) -> str:
    return str(ack.unescape(str(ack.segment(segment)[n])))


@pytest.fixture
def ready(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's settings with a signing key for st-mary and the topics created."""
    for k, v in settings_env(settings).items():
        monkeypatch.setenv(k, v)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    assert main(["keys", "create", "--org", "st-mary"]) == 0
    assert main(["topics", "create"]) == 0
    return settings


def listener(settings: Settings) -> MllpServer:
    return MllpServer(
        HL7v2Adapter(),
        SRC,
        lambda: Publisher(settings, settings.kafka.bootstrap_servers or ""),
        ack_timeout=30,
    )


REUSED = MSG.replace(b"MRN-77", b"MRN-78").replace(
    b"DOE^JANE", b"ROE^RICHARD"
)  # CTRL-1 again, another patient


async def test_a_reused_control_id_with_other_content_is_published(ready: Settings) -> None:
    """(MSH-3, MSH-4, MSH-10) alone made the second message a 'duplicate: already accepted' that was never
    published. A duplicate is the same content; a re-send with a renewed MSH-7 still is one."""
    server = listener(ready)
    await server.start("127.0.0.1", 0)
    try:
        resent = MSG.replace(b"20240101120000", b"20240101120500")
        acks = await asyncio.to_thread(mllp_send, server.port, MSG, REUSED, resent, REUSED)
    finally:
        await server.close()
    assert [field(a, "MSA", 1) for a in acks] == ["AA"] * 4
    assert [field(a, "MSA", 2) for a in acks] == ["CTRL-1"] * 4
    assert ["duplicate" in field(a, "MSA", 3) for a in acks] == [False, False, True, True]
    assert server.stats["duplicates"] == 2 and server.stats["reused_ids"] == 1
    got = records(ready, 2)
    assert sorted(r.key for r in got) == [
        b"urn:fhirbridge:st-mary:mrn|MRN-77",
        b"urn:fhirbridge:st-mary:mrn|MRN-78",
    ]


async def test_concurrent_copies_are_published_once_and_a_reused_id_beside_them_too(ready: Settings) -> None:
    server = listener(ready)
    await server.start("127.0.0.1", 0)
    try:
        acks = await asyncio.gather(
            *(asyncio.to_thread(mllp_send, server.port, m) for m in (MSG, MSG, REUSED))
        )
    finally:
        await server.close()
    assert [field(a, "MSA", 1) for (a,) in acks] == ["AA"] * 3
    assert server.stats["duplicates"] == 1
    got = records(ready, 2)
    assert sorted(r.key for r in got) == [
        b"urn:fhirbridge:st-mary:mrn|MRN-77",
        b"urn:fhirbridge:st-mary:mrn|MRN-78",
    ]


MFN = (
    b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||MFN^M02^MFN_M02|MFN-1|P|2.5.1\r"
    b"MFI|PRA^Practitioner master file^HL70175||UPD|||AL\rMFE|MAD|||DR1^^^^PRN\rSTF|DR1|DR1^^^^PRN|DOE^JOHN\r"
)
ONLY_MSH = b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01^ADT_A01|MSH-ONLY-1|P|2.5.1\r"
#: A timestamp where MSH-9 belongs. Mapped generically, its PID became a Patient.
GARBLED = (
    b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||20240101120000|GARBLED-1|P|2.5.1\r"
    b"PID|1||MRN-80^^^^MR||DOE^JANE\r"
)
BAD_DELIMITERS = (
    b"MSH|ab|EPIC|STM|FB|FB|20240101120000||ADT^A01|DELIM-1|P|2.5.1\rPID|1||MRN-81^^^^MR||DOE^JANE\r"
)


async def test_what_cannot_be_converted_is_dead_lettered_then_answered_ae(ready: Settings) -> None:
    """An unsupported message type, an MSH-only message and a garbled MSH were answered AA with no ERR
    (the first two published as bundles holding nothing but their Provenance, the last as a Patient)."""
    server = listener(ready)
    await server.start("127.0.0.1", 0)
    sent = [MFN, ONLY_MSH, GARBLED, BAD_DELIMITERS]
    try:
        acks = await asyncio.to_thread(mllp_send, server.port, *sent)
    finally:
        await server.close()
    assert [field(a, "MSA", 1) for a in acks] == ["AE"] * 4
    assert [field(a, "MSA", 2) for a in acks] == ["MFN-1", "MSH-ONLY-1", "GARBLED-1", "DELIM-1"]
    assert [str(a["ERR.F3.R1.C1"]) for a in acks] == ["200", "100", "200", "102"]
    assert [str(a.segment("ERR")[2]) for a in acks] == ["MSH^1^9", "", "MSH^1^9", "MSH^1^2"]
    texts = [field(a, "ERR", 8) for a in acks]
    assert "MFN^M02 is not one of the supported message types" in texts[0]
    assert "ADT^A01 message produced no resources" in texts[1]
    assert "'20240101120000' is not a message type code" in texts[2]
    assert "invalid encoding characters 'ab' in MSH-2" in texts[3]  # readable: standard delimiters
    assert not any("DOE" in str(a) for a in acks)  # no patient data in an ACK
    assert server.stats["dead_lettered"] == 4 and server.stats["aa"] == 0
    dead = records(ready, 4, topic=ready.kafka.topics.deadletter)
    assert sorted(r.value for r in dead) == sorted(sent)  # each kept as it came, with its reason
    reasons = {r.value: dict(r.headers)["fb-dl-error-message"].decode() for r in dead}
    assert "nothing in it was converted to FHIR" in reasons[MFN]
    assert dict(dead[0].headers)["fb-dl-stage"] == b"mllp:hl7v2"
    assert records(ready, 0) == []  # and nothing in the bundles topic
    # a replay converts them again the same way (they were copied into the bundles topic as they were)
    assert main(["replay", "--dead-letters"]) == 0
    assert records(ready, 0) == []


async def test_a_message_that_cannot_be_dead_lettered_gets_ar(ready: Settings) -> None:
    """The bundles topic works but the dead letters cannot be written (an illegal topic name): the
    unsupported message is kept nowhere, so the sender must keep it: AR, not AE (it was AA)."""
    broken = replace(
        ready,
        kafka=replace(
            ready.kafka,
            topics=Topics(bundles=ready.kafka.topics.bundles, deadletter="no such topic!", partitions=3),
        ),
    )
    server = listener(broken)
    await server.start("127.0.0.1", 0)
    try:
        (ack,) = await asyncio.to_thread(mllp_send, server.port, MFN)
    finally:
        await server.close()
    assert field(ack, "MSA", 1) == "AR" and "retry" in field(ack, "MSA", 3)
    assert records(ready, 0) == []
