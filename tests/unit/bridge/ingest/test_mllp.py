"""The MLLP listener over a real socket: framing, AE with a located ERR, AR when no broker answers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from adapters.base import SourceInfo
from adapters.hl7v2 import HL7v2Adapter
from bridge.config import Settings
from bridge.ingest.mllp import END, START, MllpServer, build_ack, frame

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

    from bridge.stream.envelope import OrgSigner
    from bridge.stream.producer import Publisher, signing_key_path

    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)}).with_bootstrap("127.0.0.1:1")
    OrgSigner.generate("st-mary").save(signing_key_path(settings, "st-mary"))

    def factory() -> Publisher:
        producer = KafkaProducer(
            bootstrap_servers="127.0.0.1:1", api_version=(2, 5), max_block_ms=300, acks="all"
        )
        return Publisher(settings, "127.0.0.1:1", producer=producer)

    return factory


class _DeadLettersOnly:
    """A publisher double whose dead-letter topic takes records (kept here) and whose bundle topic is
    unreachable: the unit tests of rejected messages need the dead letter stored before the AE."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.dead: list[tuple[bytes, str]] = []

    def dead_letter(self, value: bytes, *, error: BaseException, stage: str, **_: Any) -> Any:
        from kafka.future import Future

        self.dead.append((value, f"{stage}: {error}"))
        return Future().success(None)

    def publish(self, *args: Any) -> Any:
        return self.real.publish(*args)

    def close(self, timeout: float = 10) -> None:
        self.real.close(timeout)


@pytest.fixture
def dead_letters(no_broker):  # type: ignore[no-untyped-def]
    made: list[_DeadLettersOnly] = []

    def factory() -> _DeadLettersOnly:
        made.append(_DeadLettersOnly(no_broker()))
        return made[-1]

    factory.made = made  # type: ignore[attr-defined]
    return factory


async def acks_from(factory: Any, *messages: bytes, adapter: Any = None, **options: Any) -> list[bytes]:
    """Start a listener with ``factory``, send ``messages`` over one connection, return the ACKs."""
    server = MllpServer(adapter or HL7v2Adapter(), SRC, factory, **options)
    await server.start("127.0.0.1", 0)
    try:
        return await roundtrip(server.port, *messages)
    finally:
        await server.close()


async def test_bad_message_gets_ae_with_located_err(dead_letters) -> None:  # type: ignore[no-untyped-def]
    (ack,) = await acks_from(dead_letters, BAD)
    msa = seg(ack, "MSA")
    assert msa[1:3] == ["AE", "C101"]
    err = seg(ack, "ERR")
    assert err[2] == "pv1^1"  # ERL-1 the segment ID as written, ERL-2 its first occurrence (line 3)
    assert err[3].startswith("100^")
    assert "line 3" in err[8]
    msh = seg(ack, "MSH")
    assert msh[2:6] == ["FB", "FB", "EPIC", "STM"] and msh[8] == "ACK^A01^ACK"
    (stored,) = [d for pub in dead_letters.made for d in pub.dead]  # nothing lost: the raw message is kept
    assert stored[0] == BAD and "line 3" in stored[1]


async def test_a_rejected_message_that_cannot_be_dead_lettered_gets_ar(no_broker) -> None:  # type: ignore[no-untyped-def]
    (ack,) = await acks_from(no_broker, BAD)
    assert seg(ack, "MSA")[1] == "AR"  # the sender keeps it and sends it again


async def test_no_broker_gives_ar_and_garbage_gives_ae(dead_letters) -> None:  # type: ignore[no-untyped-def]
    server = MllpServer(HL7v2Adapter(), SRC, dead_letters)
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
        data = frame(BAD) + frame(BAD.replace(b"C101", b"C102"))
        step = len(data) // chunks + 1
        a1, a2 = await _send_chunks(server.port, [data[i : i + step] for i in range(0, len(data), step)], 2)
    finally:
        await server.close()
    assert seg(a1[1:-2], "MSA")[2] == "C101" and seg(a2[1:-2], "MSA")[2] == "C102"


async def _send_chunks(port: int, chunks: list[bytes], acks: int) -> list[bytes]:
    """Write ``chunks`` one by one (as separate TCP writes), then read ``acks`` framed ACKs."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(0.01)
    got = [await asyncio.wait_for(reader.readuntil(END), 10) for _ in range(acks)]
    writer.close()
    await writer.wait_closed()
    return got


async def test_conversion_in_a_worker_process(dead_letters) -> None:  # type: ignore[no-untyped-def]
    acks = await acks_from(dead_letters, BAD, GOOD, workers=1)
    assert [seg(a, "MSA")[1] for a in acks] == ["AE", "AR"]
    assert "line 3" in seg(acks[0], "ERR")[8]


# -- regressions ---------------------------------------------------------------------------------


async def test_a_frame_without_the_trailing_cr_is_answered(no_broker) -> None:  # type: ignore[no-untyped-def]
    """A frame that ends in FS alone used to wait for a CR that never came; the next frame then threw
    it away unanswered."""
    server = MllpServer(HL7v2Adapter(), SRC, no_broker)
    await server.start("127.0.0.1", 0)
    try:
        a1, a2 = await _send_chunks(
            server.port, [START + BAD + b"\x1c", frame(BAD.replace(b"C101", b"C102"))], 2
        )
    finally:
        await server.close()
    assert seg(a1[1:-2], "MSA")[2] == "C101" and seg(a2[1:-2], "MSA")[2] == "C102"


def test_ack_copies_the_senders_fields_with_their_own_delimiters() -> None:
    """MSH-3..6 are copied as they came (components included), and the ACK uses the message's MSH-1
    and MSH-2; only text fhirbridge writes is escaped."""
    ack = build_ack(b"MSH|^~\\&|EPIC^1.2.3^ISO|ST\\T\\M|FB|FB|x||ORU^R01|ID9|P|2.5.1\r", "AE", "bad ^ value")
    assert seg(ack, "MSH")[2:6] == ["FB", "FB", "EPIC^1.2.3^ISO", "ST\\T\\M"]
    assert seg(ack, "MSA") == ["MSA", "AE", "ID9", "bad \\S\\ value"]
    odd = build_ack(b"MSH#*~\\&#EPIC*1.2.3*ISO#STM#FB#FB#x##ADT*A01#ID7#P#2.4\r", "AR", "retry # later")
    fields = odd.decode().split("\r")[0].split("#")
    assert fields[:6] == ["MSH", "*~\\&", "FB", "FB", "EPIC*1.2.3*ISO", "STM"]
    assert fields[8] == "ACK*A01*ACK" and fields[11] == "2.4"
    msa = odd.decode().split("\r")[1].split("#")
    assert msa == ["MSA", "AR", "ID7", "retry \\F\\ later"]
    err = odd.decode().split("\r")[2].split("#")
    assert err[3] == "207*Application internal error*HL70357"


async def test_an_adapter_bug_gets_ar_and_the_message_is_kept(dead_letters) -> None:  # type: ignore[no-untyped-def]
    """A bug in the adapter is not the sender's error: AR (retry later), not AE, and the raw message is
    in the dead letters (it was answered AE and kept nowhere)."""

    class Broken(HL7v2Adapter):
        def convert_message(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("mapping bug")

    (ack,) = await acks_from(dead_letters, GOOD, adapter=Broken())
    assert seg(ack, "MSA")[1] == "AR" and seg(ack, "ERR")[3].startswith("207^")
    assert [d[0] for pub in dead_letters.made for d in pub.dead] == [GOOD]


# -- an AA means the message is kept -------------------------------------------------------


def test_mllp_listens_on_loopback_unless_told_otherwise() -> None:
    """Like `serve`: an MLLP port open on every interface took PHI from anyone who could reach it."""
    from bridge.cli import build_parser

    args = build_parser().parse_args(["mllp", "--port", "2575", "--source", "st-mary"])
    assert args.host == "127.0.0.1"
    args = build_parser().parse_args(["mllp", "--host", "0.0.0.0", "--port", "2575", "--source", "st-mary"])
    assert args.host == "0.0.0.0"


def _adapter_error(message: bytes) -> Any:
    from adapters.base import RejectedRecord

    (outcome,) = HL7v2Adapter().convert(message, SRC, filename="mllp")
    assert isinstance(outcome, RejectedRecord)
    return outcome.error


def test_ae_text_is_readable_when_the_messages_delimiters_are_invalid() -> None:
    """MSH-2 'ab' made 'a' the component separator of the ACK's own text ('inv\\S\\lid ...'): an
    invalid MSH-2 gets an ACK in the standard delimiters, read here by python-hl7."""
    import hl7

    message = b"MSH|ab|EPIC|STM|FB|FB|20240101120000||ADT^A01|C7|P|2.5.1\rPID|1||M1^^^^MR\r"
    err = _adapter_error(message)
    ack = hl7.parse(build_ack(message, "AE", err.message, err).decode())
    assert str(ack.segment("MSH")[2]) == "^~\\&"
    assert str(ack.segment("MSA")[2]) == "C7"  # the sender can still match the ACK to its message
    assert ack.unescape(str(ack.segment("MSA")[3])) == err.message
    assert "invalid encoding characters 'ab' in MSH-2" in ack.unescape(str(ack.segment("ERR")[8]))
    assert str(ack.segment("ERR")[2]) == "MSH^1^2"


def test_erl_names_a_bad_segment_by_its_id_alone() -> None:
    """ERL-1 is the segment ID: it was the segment's first three characters, a delimiter included."""
    message = b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01|C8|P|2.5.1\rPID|1||M1^^^^MR\rxx|1\r"
    err = _adapter_error(message)
    assert seg(build_ack(message, "AE", err.message, err), "ERR")[2] == "xx^1"


def test_the_same_message_is_the_same_content_apart_from_msh7() -> None:
    """What the listener de-duplicates on: a re-send with a renewed MSH-7 or other segment ends is the
    same message; a reused control id with any other content is not."""
    from bridge.ingest.mllp import _content_digest

    msg = b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01|C1|P|2.5.1\rPID|1||M1^^^^MR||DOE^J\r"
    same = _content_digest(msg)
    assert _content_digest(msg.replace(b"20240101120000", b"20240101123000")) == same
    assert _content_digest(msg.replace(b"\r", b"\r\n")) == same
    assert _content_digest(b"\xef\xbb\xbf" + msg + b"\r\r") == same
    assert _content_digest(msg.replace(b"M1^", b"M2^")) != same  # a reused control id
    assert _content_digest(msg.replace(b"|C1|", b"|C2|")) != same
    assert _content_digest(msg.replace(b"|EPIC|", b"|CERNER|")) != same
