"""The MLLP listener over a real socket: framing, AE with a located ERR, AR when no broker answers."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.base import SourceInfo
from adapters.hl7v2 import HL7v2Adapter
from bridge.config import Settings
from bridge.mllp import END, START, MllpServer, build_ack, frame

SRC = SourceInfo("st-mary")
GOOD = b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01^ADT_A01|C100|P|2.5.1\rPID|1||M1^^^^MR||DOE^J\r"
BAD = b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01|C101|P|2.5.1\rPID|1||M1\rpv1|oops\r"


async def roundtrip(port: int, *messages: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    acks = []
    for m in messages:
        writer.write(frame(m))
        await writer.drain()
        data = await asyncio.wait_for(reader.readuntil(END), 30)
        assert data.startswith(START)
        acks.append(data[1:-2])
    writer.close()
    await writer.wait_closed()
    return acks


def seg(ack: bytes, name: str) -> list[str]:
    for line in ack.decode().split("\r"):
        if line.startswith(name + "|"):
            return line.split("|")
    raise AssertionError(f"no {name} in {ack!r}")


@pytest.fixture
def no_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A factory of real Publishers whose real KafkaProducer points at a closed port."""
    from kafka import KafkaProducer

    from bridge.envelope import OrgSigner
    from bridge.publish import Publisher, signing_key_path

    settings = replace(
        Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)}), bootstrap_servers="127.0.0.1:1"
    )
    OrgSigner.generate("st-mary").save(signing_key_path(settings, "st-mary"))

    def factory() -> Publisher:
        producer = KafkaProducer(
            bootstrap_servers="127.0.0.1:1", api_version=(2, 5), max_block_ms=300, acks="all"
        )
        return Publisher(settings, "127.0.0.1:1", producer=producer)

    return factory


async def test_bad_message_gets_ae_with_located_err(no_broker) -> None:  # type: ignore[no-untyped-def]
    server = MllpServer(HL7v2Adapter(), SRC, no_broker)
    await server.start("127.0.0.1", 0)
    try:
        (ack,) = await roundtrip(server.port, BAD)
    finally:
        await server.close()
    msa = seg(ack, "MSA")
    assert msa[1:3] == ["AE", "C101"]
    err = seg(ack, "ERR")
    assert err[2] == "^3"  # segment index 3 (ERL: segment^sequence^field...)
    assert err[3].startswith("100^")
    assert "line 3" in err[8]
    msh = seg(ack, "MSH")
    assert msh[2:6] == ["FB", "FB", "EPIC", "STM"] and msh[8] == "ACK^A01^ACK"


async def test_no_broker_gives_ar_and_garbage_gives_ae(no_broker) -> None:  # type: ignore[no-untyped-def]
    server = MllpServer(HL7v2Adapter(), SRC, no_broker)
    await server.start("127.0.0.1", 0)
    try:
        acks = await roundtrip(server.port, GOOD, b"hello", GOOD)
    finally:
        await server.close()
    assert [seg(a, "MSA")[1] for a in acks] == ["AR", "AE", "AR"]
    assert "retry" in seg(acks[0], "MSA")[3]
    assert server.stats["ar"] == 2 and server.stats["aa"] == 0


def test_build_ack_escapes_and_addresses() -> None:
    ack = build_ack(b"MSH|^~\\&|A|B|C|D|x||ORU^R01|ID|P|2.3\r", "AE", "bad | value")
    assert seg(ack, "MSA") == ["MSA", "AE", "ID", "bad \\F\\ value"]
    assert seg(ack, "MSH")[11] == "2.3"
    assert build_ack(b"", "AR", "x").startswith(b"MSH|^~\\&|FHIRBRIDGE|")


@pytest.mark.parametrize("chunks", [1, 3])
async def test_frames_split_across_packets(chunks: int, no_broker) -> None:  # type: ignore[no-untyped-def]
    server = MllpServer(HL7v2Adapter(), SRC, no_broker)
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        data = frame(BAD) + frame(BAD.replace(b"C101", b"C102"))
        step = len(data) // chunks + 1
        for i in range(0, len(data), step):
            writer.write(data[i : i + step])
            await writer.drain()
            await asyncio.sleep(0.01)
        a1 = await asyncio.wait_for(reader.readuntil(END), 10)
        a2 = await asyncio.wait_for(reader.readuntil(END), 10)
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()
    assert seg(a1[1:-2], "MSA")[2] == "C101" and seg(a2[1:-2], "MSA")[2] == "C102"


async def test_conversion_in_a_worker_process(no_broker) -> None:  # type: ignore[no-untyped-def]
    server = MllpServer(HL7v2Adapter(), SRC, no_broker, workers=1)
    await server.start("127.0.0.1", 0)
    try:
        acks = await roundtrip(server.port, BAD, GOOD)
    finally:
        await server.close()
    assert [seg(a, "MSA")[1] for a in acks] == ["AE", "AR"]
    assert "line 3" in seg(acks[0], "ERR")[8]
