"""The ER7 parser: delimiters, escapes, repetitions, framing, batches; property-tested round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.errors import ParseError
from adapters.hl7v2.er7 import Encoding, decode_input, parse, split_messages, unescape

ENC = Encoding()


def test_escapes() -> None:
    assert unescape(r"A\F\B\S\C\T\D\R\E\E\F", ENC) == "A|B^C&D~E\\F"
    assert unescape(r"line1\.br\line2", ENC) == "line1\nline2"
    assert unescape("\\X41424344\\", ENC) == "ABCD"
    assert unescape("\\XC3A9\\", ENC) == "é"
    assert unescape("\\H\\bold\\N\\", ENC) == "bold"
    assert unescape(r"no escape", ENC) == "no escape"
    assert unescape("lone \\ backslash", ENC) == "lone \\ backslash"


def test_custom_encoding_characters_from_msh() -> None:
    (m,) = parse("MSH#:*$@#A#B#C#D#20240101##ADT:A01#1#P#2.5\rPID#1##X1:::AUTH@1.2@ISO:MR*Y2##DOE:JO$S$E\r")
    pid = m.first("PID")
    assert pid is not None
    assert [r.c(1) for r in pid.reps(3)] == ["X1", "Y2"]
    assert pid.f(3).c(4, 2) == "1.2"
    assert pid.f(5).c(2) == "JO:E"
    assert m.message_type == ("ADT", "A01", "")
    assert m.msh.v(1) == "#" and m.msh.v(2) == ":*$@"


def test_truncation_character_v27() -> None:
    (m,) = parse("MSH|^~\\&#|A|B|C|D|20240101||ORU^R01^ORU_R01|1|P|2.7\rPID|1||X\r")
    assert m.enc.truncation == "#"
    assert m.version == "2.7"


def test_line_endings_and_blank_lines() -> None:
    text = "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\r\n\r\nPID|1\nPV1|1|I\r"
    (m,) = parse(text)
    assert [s.name for s in m.segments] == ["MSH", "PID", "PV1"]
    assert [s.line for s in m.segments] == [1, 3, 4]


def test_bom_and_latin1() -> None:
    assert decode_input(b"\xef\xbb\xbfMSH")[0] == "MSH"
    text, fell_back = decode_input(b"MSH|caf\xe9")
    assert fell_back and text.endswith("é")


def test_mllp_frames_and_batch() -> None:
    m1 = "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rPID|1\r"
    m2 = "MSH|^~\\&|A|B|C|D|1||ADT^A01|2|P|2.5\rPID|2\r"
    framed = f"\x0b{m1}\x1c\r\x0b{m2}\x1c\r"
    assert [m.control_id for m in parse(framed)] == ["1", "2"]
    batch = f"FHS|^~\\&\rBHS|^~\\&\r{m1}{m2}BTS|2\rFTS|1"
    assert [m.control_id for m in parse(batch)] == ["1", "2"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("MSH|^~\\&|A\rPID|1\rpid|2\r", (3, None)),
        ("MSH|^~|A\r", (1, 2)),
        ("MSH|^^\\&|A\r", (1, 2)),
        ("MSH\r", (1, None)),
    ],
)
def test_located_errors(text: str, where: tuple[int, int | None]) -> None:
    with pytest.raises(ParseError) as ei:
        parse(text)
    assert ei.value.location.line == where[0]
    assert ei.value.location.field == where[1]
    assert ei.value.location.message_index == 1
    assert "hl7v2" in str(ei.value)


def test_text_before_first_msh_is_an_error() -> None:
    items = list(split_messages("garbage\rMSH|^~\\&|A\r"))
    assert isinstance(items[-1], ParseError) and items[-1].location.line == 1


# ---- property: any values, escaped and encoded, read back unchanged -------------------------------
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
_sub = st.lists(_text, min_size=1, max_size=3)
_comp = st.lists(_sub, min_size=1, max_size=4)
_rep = st.lists(_comp, min_size=1, max_size=3)
_fields = st.lists(_rep, min_size=1, max_size=6)


def _encode(fields: list[list[list[list[str]]]], enc: Encoding) -> str:
    return enc.field.join(
        enc.repetition.join(
            enc.component.join(enc.subcomponent.join(enc.escape_text(s) for s in comp) for comp in rep)
            for rep in field
        )
        for field in fields
    )


@settings(max_examples=150, deadline=None)
@given(
    segments=st.lists(_fields, min_size=1, max_size=4),
    delims=st.sampled_from(
        [Encoding(), Encoding("#", ":", "*", "$", "@"), Encoding("|", "^", "~", "\\", "&", "#")]
    ),
    eol=st.sampled_from(["\r", "\n", "\r\n"]),
)
def test_round_trip(segments: list, delims: Encoding, eol: str) -> None:
    fs = delims.field
    text = f"MSH{fs}{delims.msh2}{fs}APP{fs}FAC{fs}{fs}{fs}20240101{fs}{fs}ADT^A01{fs}42{fs}P{fs}2.5{eol}"
    for i, fields in enumerate(segments):
        text += f"Z{i:02d}{fs}" + _encode(fields, delims) + eol
    (m,) = parse(text)
    assert len(m.segments) == len(segments) + 1
    for seg, fields in zip(m.segments[1:], segments, strict=True):
        for n, field in enumerate(fields, start=1):
            reps = seg.reps(n)
            # a field whose encoding is empty reads back as "no repetitions"
            if _encode([field], delims) == "":
                assert reps == []
                continue
            assert len(reps) == len(field)
            for r, rep in zip(reps, field, strict=True):
                for c, comp in enumerate(rep, start=1):
                    for s, sub in enumerate(comp, start=1):
                        assert r.c(c, s) == sub


def test_padding_and_dos_eof_between_messages_are_ignored() -> None:
    m = "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rPID|1\r"
    assert [x.control_id for x in parse(m + "\x00\x00\r\x1a\r" + m.replace("|1|P", "|2|P") + "\x1a")] == [
        "1",
        "2",
    ]


def test_an_invalid_segment_name_error_does_not_quote_the_line() -> None:
    """A line break inside a field turns free text into a 'segment'; its words must not reach the error
    (which goes into ACKs, dead-letter headers and logs)."""
    text = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\rPID|1||M1\rOBX|1|TX|||Patient reports\rSmith family history\r"
    with pytest.raises(ParseError) as exc:
        parse(text)
    assert "Smith" not in str(exc.value) and "invalid segment name" in str(exc.value)
    assert exc.value.location.line == 4
