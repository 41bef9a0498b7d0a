"""A small, fast HL7 v2 ER7 ("pipe and hat") parser.

Design: a message is split once into segments and each segment once into fields (two ``str.split``
calls). Repetitions, components and subcomponents are split only when a field is read, and escape
sequences are decoded only for values that contain the escape character. This is what makes it
several times faster than ``python-hl7``, which builds the whole tree eagerly (see docs/hl7v2.md and
``benchmarks/bench_hl7v2.py``).

What it accepts:

* encoding characters from MSH-1/MSH-2 (including a 5th, the v2.7 truncation character);
* escapes ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh..\\ \\.br\\`` (and ``\\.sp\\``); highlighting (``\\H\\``,
  ``\\N\\``), character-set (``\\C..\\``, ``\\M..\\``) and locally defined (``\\Z..\\``) escapes are removed;
* ``\\r``, ``\\n`` and ``\\r\\n`` segment terminators (mixed, too), blank lines;
* a UTF-8 byte-order mark, MLLP framing bytes (``0x0b`` ... ``0x1c 0x0d``);
* FHS/BHS batch files: the envelope segments are dropped and each MSH starts a new message.

Every error is a :class:`~adapters.errors.ParseError` located by message index, line and segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from adapters.errors import Location, ParseError

ADAPTER = "hl7v2"
BOM = b"\xef\xbb\xbf"
MLLP_START = b"\x0b"
MLLP_END = b"\x1c"
_SEGMENT_NAME = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
_ENVELOPE = frozenset({"FHS", "FTS", "BHS", "BTS"})
_BLANK = " \t\x00\x1a\ufeff"


@dataclass(frozen=True, slots=True)
class Encoding:
    """The delimiters of one message (MSH-1 and MSH-2)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation

    def escape_text(self, text: str) -> str:
        """Escape ``text`` so that it reads back unchanged as one (sub)component value."""
        e = self.escape
        if not e:
            return text
        out = text.replace(e, f"{e}E{e}")
        for ch, code in (
            (self.field, "F"),
            (self.component, "S"),
            (self.subcomponent, "T"),
            (self.repetition, "R"),
        ):
            out = out.replace(ch, f"{e}{code}{e}")
        if self.truncation:
            out = out.replace(self.truncation, f"{e}P{e}")
        return out.replace("\r", f"{e}X0D{e}").replace("\n", f"{e}.br{e}")


DEFAULT_ENCODING = Encoding()


def unescape(value: str, enc: Encoding) -> str:
    """Decode the escape sequences in one (sub)component value.

    An escape sequence without its closing escape character is kept literally (senders do emit lone
    backslashes); unknown sequences are removed, as the standard says receivers should do.
    """
    e = enc.escape
    if not e or e not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        j = value.find(e, i)
        if j < 0:
            out.append(value[i:])
            break
        out.append(value[i:j])
        k = value.find(e, j + 1)
        if k < 0:
            out.append(value[j:])
            break
        seq = value[j + 1 : k]
        i = k + 1
        if seq == "F":
            out.append(enc.field)
        elif seq == "S":
            out.append(enc.component)
        elif seq == "T":
            out.append(enc.subcomponent)
        elif seq == "R":
            out.append(enc.repetition)
        elif seq == "E":
            out.append(e)
        elif seq == "P":
            out.append(enc.truncation or "")
        elif seq in (".br", ".sp"):
            out.append("\n")
        elif seq[:1] == "X":
            out.append(_hex(seq[1:]))
        elif seq == "":
            # "\\" : an empty sequence; keep the two characters rather than lose data
            out.append(e + e)
        # H, N, Cxxyy, Mxxyyzz, Zxxx and other formatting commands are dropped
    return "".join(out)


def _hex(digits: str) -> str:
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class Field:
    """One repetition of a field: components and subcomponents, split lazily, decoded on read."""

    __slots__ = ("_comps", "_dec", "enc", "raw")

    def __init__(self, raw: str, enc: Encoding) -> None:
        self.raw = raw
        self.enc = enc
        self._comps: list[str] | None = None
        self._dec: list[str] | None = None

    @property
    def comps(self) -> list[str]:
        c = self._comps
        if c is None:
            c = self._comps = self.raw.split(self.enc.component)
        return c

    def __bool__(self) -> bool:
        return bool(self.raw)

    def _decode_all(self) -> list[str]:
        enc = self.enc
        comps = self.comps
        raw = self.raw
        if enc.subcomponent not in raw and (not enc.escape or enc.escape not in raw):
            self._dec = comps
            return comps
        out = []
        for v in comps:
            if enc.subcomponent in v:
                v = v.split(enc.subcomponent, 1)[0]
            if enc.escape and enc.escape in v:
                v = unescape(v, enc)
            out.append(v)
        self._dec = out
        return out

    def c(self, n: int = 1, s: int = 1) -> str:
        """Component ``n``, subcomponent ``s`` (1-based), decoded; ``""`` when absent."""
        if s == 1:
            d = self._dec
            if d is None:
                d = self._decode_all()
            return d[n - 1] if n <= len(d) else ""
        comps = self.comps
        if n > len(comps):
            return ""
        v = comps[n - 1]
        enc = self.enc
        if not v or enc.subcomponent not in v:
            return ""
        subs = v.split(enc.subcomponent)
        v = subs[s - 1] if s <= len(subs) else ""
        if enc.escape and enc.escape in v:
            return unescape(v, enc)
        return v

    def subs(self, n: int) -> list[str]:
        """All subcomponents of component ``n``, decoded."""
        comps = self.comps
        if n > len(comps) or not comps[n - 1]:
            return []
        return [unescape(v, self.enc) for v in comps[n - 1].split(self.enc.subcomponent)]

    def component(self, n: int) -> Field:
        """Component ``n`` as a Field whose "components" are its subcomponents (for nested types)."""
        comps = self.comps
        raw = comps[n - 1] if n <= len(comps) else ""
        return (
            Field(raw.replace(self.enc.subcomponent, self.enc.component), self.enc)
            if raw
            else Field("", self.enc)
        )

    def text(self) -> str:
        """The whole value decoded, components joined by a space (for free-text fields)."""
        if self.enc.component not in self.raw and self.enc.subcomponent not in self.raw:
            return unescape(self.raw, self.enc)
        parts = [unescape(x, self.enc) for c in self.comps for x in c.split(self.enc.subcomponent) if x]
        return " ".join(p for p in parts if p)

    def __repr__(self) -> str:
        return f"Field({self.raw!r})"


_EMPTY_FIELD = Field("", DEFAULT_ENCODING)


class Segment:
    """One segment. ``fields[n]`` is field ``n`` (1-based; for MSH, field 1 is the separator)."""

    __slots__ = ("_reps", "enc", "fields", "index", "line", "name")

    def __init__(self, name: str, fields: list[str], enc: Encoding, index: int, line: int) -> None:
        self.name = name
        self.fields = fields
        self.enc = enc
        self.index = index  # 1-based position in the message
        self.line = line  # 1-based line in the input
        self._reps: dict[int, list[Field]] = {}

    def raw(self, n: int) -> str:
        f = self.fields
        return f[n] if n < len(f) else ""

    def reps(self, n: int) -> list[Field]:
        """All repetitions of field ``n`` (an empty list when the field is empty). Cached."""
        cached = self._reps.get(n)
        if cached is not None:
            return cached
        f = self.fields
        raw = f[n] if n < len(f) else ""
        enc = self.enc
        if not raw:
            out: list[Field] = []
        elif self.name == "MSH" and n <= 2:
            out = [Field(enc.escape_text(raw), enc)]
        elif enc.repetition in raw:
            out = [Field(r, enc) for r in raw.split(enc.repetition)]
        else:
            out = [Field(raw, enc)]
        self._reps[n] = out
        return out

    def f(self, n: int, rep: int = 1) -> Field:
        """Repetition ``rep`` of field ``n`` (an empty Field when absent)."""
        reps = self._reps.get(n)
        if reps is None:
            reps = self.reps(n)
        return reps[rep - 1] if rep <= len(reps) else _EMPTY_FIELD

    def v(self, n: int, c: int = 1, s: int = 1) -> str:
        """Field ``n`` (first repetition), component ``c``, subcomponent ``s``, decoded."""
        f = self.fields
        if n >= len(f) or not f[n]:
            return ""
        if n <= 2 and self.name == "MSH":
            return f[n] if c == 1 else ""
        return self.f(n).c(c, s)

    def loc(self, field: int | None = None, rep: int | None = None, comp: int | None = None) -> Location:
        return Location(
            segment=self.name,
            segment_index=self.index,
            line=self.line,
            field=field,
            repetition=rep,
            component=comp,
        )

    def __repr__(self) -> str:
        return f"Segment({self.name}, {len(self.fields) - 1} fields)"


class Message:
    """A parsed message: its segments, delimiters and position in the input."""

    __slots__ = ("enc", "index", "raw", "segments")

    def __init__(self, segments: list[Segment], enc: Encoding, index: int, raw: str) -> None:
        self.segments = segments
        self.enc = enc
        self.index = index
        self.raw = raw

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def first(self, name: str) -> Segment | None:
        for s in self.segments:
            if s.name == name:
                return s
        return None

    def all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    @property
    def version(self) -> str:
        return self.msh.v(12)

    @property
    def control_id(self) -> str:
        return self.msh.v(10)

    @property
    def message_type(self) -> tuple[str, str, str]:
        f = self.msh.f(9)
        return f.c(1), f.c(2), f.c(3)

    def to_er7(self) -> str:
        """The message re-encoded with ``\\r`` segment terminators (the original field text)."""
        out = []
        for s in self.segments:
            if s.name == "MSH":
                out.append("MSH" + s.fields[1] + s.fields[2] + "".join(s.fields[1] + x for x in s.fields[3:]))
            else:
                out.append(self.enc.field.join(s.fields))
        return "\r".join(out) + "\r"


# --------------------------------------------------------------------------------------------------
# input framing


def decode_input(data: bytes) -> tuple[str, bool]:
    """Bytes to text: strip a BOM; UTF-8, else Latin-1. Returns the text and whether it fell back."""
    if data.startswith(BOM):
        data = data[3:]
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("latin-1"), True


def split_lines(text: str) -> list[str]:
    """Segment lines: any of CR, LF, CRLF ends a segment; MLLP framing characters are removed."""
    if "\x0b" in text or "\x1c" in text:
        text = text.replace("\x0b", "\r").replace("\x1c", "\r")
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return text.split("\r")


@dataclass(slots=True)
class RawMessage:
    """The lines of one message before parsing, with its position in the input."""

    index: int
    first_line: int
    lines: list[tuple[int, str]]

    @property
    def text(self) -> str:
        return "\r".join(line for _, line in self.lines) + "\r"


def split_messages(text: str) -> Iterator[RawMessage | ParseError]:
    """Split an input (single message, many messages, a FHS/BHS batch, MLLP frames) into messages.

    Yields a :class:`ParseError` for lines that belong to no message (text before the first MSH).
    """
    current: RawMessage | None = None
    index = 0
    stray: list[int] = []
    for lineno, line in enumerate(split_lines(text), start=1):
        stripped = line.strip(_BLANK)
        if not stripped:
            continue  # blank lines, DOS end-of-file (0x1a) and NUL padding between messages
        head = line[:3]
        if head == "MSH":
            if current is not None:
                yield current
            index += 1
            current = RawMessage(index, lineno, [(lineno, line)])
        elif head in _ENVELOPE and (len(line) == 3 or not line[3].isalnum()):
            if current is not None:
                yield current
                current = None
        elif current is None:
            stray.append(lineno)
        else:
            current.lines.append((lineno, line))
    if current is not None:
        yield current
    if stray:
        yield ParseError(
            f"{len(stray)} line(s) outside any message (no MSH segment before them)",
            adapter=ADAPTER,
            location=Location(line=stray[0]),
        )


def parse_message(raw: RawMessage) -> Message:
    """Parse one message's lines. Raises :class:`ParseError` located at the offending segment."""
    first_lineno, msh_line = raw.lines[0]
    if len(msh_line) < 8:
        raise ParseError(
            "MSH segment too short to hold the encoding characters",
            adapter=ADAPTER,
            location=Location(message_index=raw.index, line=first_lineno, segment="MSH", segment_index=1),
        )
    fs = msh_line[3]
    end = msh_line.find(fs, 4)
    enc_chars = msh_line[4:end] if end > 0 else msh_line[4:]
    if (
        len(enc_chars) < 4
        or len(enc_chars) > 5
        or fs in enc_chars
        or len(set(enc_chars + fs)) != len(enc_chars) + 1
    ):
        raise ParseError(
            f"invalid encoding characters {enc_chars!r} in MSH-2 "
            "(expected 4 or 5 distinct characters, e.g. ^~\\&)",
            adapter=ADAPTER,
            location=Location(
                message_index=raw.index, line=first_lineno, segment="MSH", segment_index=1, field=2
            ),
        )
    if fs.isalnum() or fs.isspace():
        raise ParseError(
            f"invalid field separator {fs!r} in MSH-1",
            adapter=ADAPTER,
            location=Location(
                message_index=raw.index, line=first_lineno, segment="MSH", segment_index=1, field=1
            ),
        )
    enc = Encoding(fs, enc_chars[0], enc_chars[1], enc_chars[2], enc_chars[3], enc_chars[4:5])
    segments: list[Segment] = []
    for i, (lineno, line) in enumerate(raw.lines, start=1):
        parts = line.split(fs)
        name = parts[0].strip()
        if i == 1:
            fields = ["MSH", fs, enc_chars, *parts[2:]] if end > 0 else ["MSH", fs, enc_chars]
        else:
            if not _SEGMENT_NAME.match(name):
                raise ParseError(
                    # the line is not quoted: a line break inside a field makes it free text (a note, a name)
                    "invalid segment name: the line does not start with three upper-case letters or digits "
                    "and the field separator (a line break inside a field?)",
                    adapter=ADAPTER,
                    location=Location(message_index=raw.index, line=lineno, segment_index=i),
                )
            if name == "MSH":  # pragma: no cover - split_messages starts a new message at MSH
                raise ParseError("MSH inside a message", adapter=ADAPTER, location=Location(line=lineno))
            parts[0] = name
            fields = parts
        segments.append(Segment(name, fields, enc, i, lineno))
    return Message(segments, enc, raw.index, raw.text)


def parse(text: str) -> list[Message]:
    """Parse every message in ``text``; raises the first :class:`ParseError` (convenience for tests)."""
    out = []
    for item in split_messages(text):
        if isinstance(item, ParseError):
            raise item
        out.append(parse_message(item))
    return out
