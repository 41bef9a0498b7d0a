"""The ledger entry: a canonical JSON record of one ingested bundle, with no PHI."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import orjson

from ledger.errors import EntryTooLarge, InvalidEntry

__all__ = ["MAX_ENTRY_BYTES", "LedgerEntry", "canonical_many"]

MAX_ENTRY_BYTES = 64 * 1024
_HEX_DIGITS = "0123456789abcdef"
_HEX_BYTES = _HEX_DIGITS.encode()
_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|\+00:00)")
_STR_FIELDS = ("source_org", "adapter", "adapter_version", "topic")
# Batch checks: every byte mapped to itself but digits to '9', and the shapes _RFC3339_UTC allows after that.
_DIGITS_TO_9 = bytes(range(256)).translate(bytes.maketrans(b"0123456789", b"9" * 10))
_TS_SHAPES = frozenset(
    b"9999-99-99T99:99:99" + fraction + zone
    for fraction in [b""] + [b"." + b"9" * k for k in range(1, 10)]
    for zone in (b"Z", b"+00:00")
)
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')  # printable ASCII but '"' and '\\'
_U64_MAX = (1 << 64) - 1  # orjson refuses larger integers
_FIELDS = attrgetter(
    "adapter",
    "adapter_version",
    "bundle_sha256",
    "ingested_at",
    "message_id",
    "offset",
    "partition",
    "source_org",
    "topic",
)
# The canonical form of an entry whose strings are printable ASCII without '"' or '\\': for such strings
# orjson's output is the string itself between quotes, so formatting gives the same bytes.
_TEMPLATE = (
    '{"adapter":"%s","adapter_version":"%s","bundle_sha256":"%s","ingested_at":"%s","message_id":%s,'
    '"offset":%d,"partition":%d,"source_org":"%s","topic":"%s"}'
)
_TEMPLATE_ID = _TEMPLATE.replace('"message_id":%s', '"message_id":"%s"')  # formats a _FIELDS row as is
_TEMPLATE_NO_ID = _TEMPLATE.replace('"message_id":%s', '"message_id":null')  # the row without message_id


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What the ledger records about one bundle. It holds identifiers and provenance only, never PHI.

    ``ingested_at`` is RFC 3339 UTC (``Z`` or ``+00:00``); the consumer passes the Kafka record time so
    that a replay produces the same entries and the same tree.
    """

    bundle_sha256: str
    source_org: str
    adapter: str
    adapter_version: str
    topic: str
    partition: int
    offset: int
    ingested_at: str
    message_id: str | None = None

    def validate(self) -> None:
        """Raise :class:`~ledger.errors.InvalidEntry` naming the first bad field."""
        # Hot path (every append): exact type checks, one regex per pattern; the dataclass does not
        # enforce its annotations, so values are treated as plain objects here.
        bundle: object = self.bundle_sha256
        if type(bundle) is not str or len(bundle) != 64 or bundle.strip(_HEX_DIGITS):
            raise InvalidEntry("bundle_sha256 must be 64 lowercase hex characters")
        so: object = self.source_org
        ad: object = self.adapter
        av: object = self.adapter_version
        tp: object = self.topic
        if not (
            type(so) is str
            and so
            and type(ad) is str
            and ad
            and type(av) is str
            and av
            and type(tp) is str
            and tp
        ):
            strs = (so, ad, av, tp)
            bad = next(n for n, v in zip(_STR_FIELDS, strs, strict=True) if not (type(v) is str and v))
            raise InvalidEntry(f"{bad} must be a non-empty string")
        pa: object = self.partition
        of: object = self.offset
        if not (type(pa) is int and pa >= 0 and type(of) is int and of >= 0):
            bad = "partition" if not (type(pa) is int and pa >= 0) else "offset"
            raise InvalidEntry(f"{bad} must be a non-negative integer")
        ingested: object = self.ingested_at
        if type(ingested) is not str or not _RFC3339_UTC.fullmatch(ingested):
            raise InvalidEntry("ingested_at must be an RFC 3339 UTC timestamp")
        message_id: object = self.message_id
        if message_id is not None and type(message_id) is not str:
            raise InvalidEntry("message_id must be a string or None")

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "adapter_version": self.adapter_version,
            "bundle_sha256": self.bundle_sha256,
            "ingested_at": self.ingested_at,
            "message_id": self.message_id,
            "offset": self.offset,
            "partition": self.partition,
            "source_org": self.source_org,
            "topic": self.topic,
        }

    def canonical(self) -> bytes:
        """Canonical JSON (sorted keys, compact, UTF-8): the bytes whose leaf hash the log commits to.

        Raises :class:`~ledger.errors.InvalidEntry` for a bad field and
        :class:`~ledger.errors.EntryTooLarge` above 64 KB.
        """
        self.validate()
        try:
            data = orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:  # e.g. a surrogate in a string
            raise InvalidEntry("entry is not JSON-serialisable") from exc
        if len(data) > MAX_ENTRY_BYTES:
            raise EntryTooLarge(len(data), MAX_ENTRY_BYTES)
        return data

    @classmethod
    def from_canonical(cls, data: bytes) -> LedgerEntry:
        """Parse stored canonical JSON; raises :class:`~ledger.errors.InvalidEntry` if it is not one."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidEntry("stored entry is not JSON") from exc
        if not isinstance(obj, dict):
            raise InvalidEntry("stored entry is not a JSON object")
        try:
            entry = cls(**obj)
        except TypeError as exc:
            raise InvalidEntry("stored entry has unexpected or missing fields") from exc
        entry.validate()
        return entry


def canonical_many(entries: Sequence[LedgerEntry]) -> list[bytes]:
    """``[e.canonical() for e in entries]``, computed for the whole batch at once.

    Same bytes and same errors as calling :meth:`LedgerEntry.canonical` on each entry in order (the
    first invalid entry raises :class:`~ledger.errors.InvalidEntry` or
    :class:`~ledger.errors.EntryTooLarge`); a non-entry raises :class:`~ledger.errors.InvalidEntry`.
    The common batch (every string printable ASCII without quotes or backslashes) is validated with a
    few C-level checks over the joined fields and formatted without a JSON encoder call per entry;
    any other batch takes the per-entry path.
    """
    if not entries:
        return []
    try:
        fast = _canonical_fast(entries)
    except (AttributeError, TypeError):  # not LedgerEntry objects, or a field of the wrong type
        fast = None
    if fast is not None:
        return fast
    out = []
    for e in entries:
        try:
            canonical = e.canonical
        except AttributeError as exc:
            raise InvalidEntry("append() takes LedgerEntry objects") from exc
        out.append(canonical())
    return out


def _canonical_fast(entries: Sequence[LedgerEntry]) -> list[bytes] | None:
    """The canonical bytes if every entry passes the batch checks, else None (use the slow path)."""
    if any(type(e) is not LedgerEntry for e in entries):
        return None
    rows = list(map(_FIELDS, entries))
    n = len(rows)
    ad, av, bundle, ts, mid, of, pa, so, tp = zip(*rows, strict=True)
    # bundle_sha256: 64 lowercase hex characters each (join raises TypeError for a non-string).
    bj = "".join(bundle)
    if len(bj) != 64 * n or set(map(len, bundle)) != {64} or not bj.isascii():
        return None
    if bj.encode().translate(None, _HEX_BYTES):  # deletes the hex digits: anything left is bad
        return None
    # The other strings: non-empty, printable ASCII, no '"' or '\\' (so no JSON escaping is needed).
    # Joined by '"', which may not occur inside them: n*4 - 1 separators, no two adjacent.
    sj = '"'.join(ad + av + so + tp)
    if not sj.isascii():
        return None
    sb = sj.encode()
    # deleting the allowed characters must leave exactly the separators
    if sb.translate(None, _PLAIN) != b'"' * (4 * n - 1) or b'""' in sb or sb[:1] == b'"' or sb[-1:] == b'"':
        return None
    # ingested_at: each has the shape of an RFC 3339 UTC timestamp once every digit is mapped to '9'
    # (the same test as the regex of LedgerEntry.validate; ASCII, so a newline separates exactly).
    tj = "\n".join(ts)
    if not tj.isascii() or tj.count("\n") != n - 1:
        return None
    if not set(tj.encode().translate(_DIGITS_TO_9).split(b"\n")) <= _TS_SHAPES:
        return None
    # message_id: None or a string (possibly empty) that needs no escaping.
    if set(map(type, mid)) - {str, type(None)}:
        return None
    ids = [m for m in mid if m is not None]
    if ids:
        mj = "".join(ids)
        if not mj.isascii() or not mj.isprintable() or '"' in mj or "\\" in mj:
            return None
    # partition, offset: exact ints in 0 .. 2**64 - 1.
    if set(map(type, pa)) != {int} or set(map(type, of)) != {int}:
        return None
    if min(pa) < 0 or min(of) < 0 or max(pa) > _U64_MAX or max(of) > _U64_MAX:
        return None
    with_id, without_id = _TEMPLATE_ID, _TEMPLATE_NO_ID
    out = [
        (with_id % r).encode() if r[4] is not None else (without_id % (r[:4] + r[5:])).encode() for r in rows
    ]
    if max(map(len, out)) > MAX_ENTRY_BYTES:
        return None
    return out
