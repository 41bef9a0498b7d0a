"""The ``hl7v2`` adapter: ER7 messages (single, batch, MLLP-framed) to FHIR R4 transaction bundles."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import ClassVar

import structlog

from adapters.base import Adapter, ConvertedBundle, Outcome, RejectedRecord, SourceInfo
from adapters.bundle import EPOCH, BundleBuilder
from adapters.errors import AdapterError, InternalAdapterError, Location, ParseError, ValidationFailed
from adapters.hl7v2 import datatypes as dt
from adapters.hl7v2.er7 import Message, RawMessage, Segment, decode_input, parse_message, split_messages
from adapters.hl7v2.mapping import Conversion

log = structlog.get_logger(__name__)


SUPPORTED_VERSIONS = (
    "2.1",
    "2.2",
    "2.3",
    "2.3.1",
    "2.4",
    "2.5",
    "2.5.1",
    "2.6",
    "2.7",
    "2.7.1",
    "2.8",
    "2.8.1",
    "2.8.2",
    "2.9",
)

#: Message types with a dedicated mapping (docs/hl7v2.md). Others are mapped generically, with a warning.
SUPPORTED_MESSAGE_TYPES = frozenset({"ADT", "ORU", "OUL", "VXU", "ORM", "OML", "SIU", "MDM", "RDE", "DFT"})
#: The shape of a message type code (HL7 table 0076: ADT, ORU, MFN, ...; local ones start with Z).
#: Anything else in MSH-9.1, a timestamp say, means the MSH fields are shifted, so that MSH-10 and
#: MSH-12 cannot be trusted either.
_MESSAGE_TYPE_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]{2}")
#: Message types that describe one patient: a missing PID is reported as a warning.
PID_REQUIRED = frozenset({"ADT", "VXU", "MDM", "RDE", "DFT", "BAR"})
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class HL7v2Adapter(Adapter):
    """HL7 v2.x (ER7) to FHIR R4.

    Options (``--option key=value``):

    * ``validate`` (``true``/``false``, default true): validate each bundle against R4B.
    * ``strict-version`` (default false): reject messages whose MSH-12 is outside 2.1-2.9.

    Subclass and override :meth:`map_z_segment` to map site-specific Z-segments (docs/adapters.md).
    """

    name: ClassVar[str] = "hl7v2"
    version: ClassVar[str] = "1.0.0"
    description: ClassVar[str] = "HL7 v2.3-2.8 ER7 messages (single, batch FHS/BHS, MLLP-framed) to FHIR R4"
    suffixes: ClassVar[tuple[str, ...]] = (".hl7", ".hl7v2", ".er7", ".txt", ".msg")

    def __init__(self, **options: str) -> None:
        self.validate = True
        self.strict_version = False
        for key, value in options.items():
            v = str(value).strip().lower()
            if key in ("validate", "strict-version", "strict_version"):
                if v not in _TRUE + _FALSE:
                    raise AdapterError(f"adapter 'hl7v2': option {key}={value!r}: expected true or false")
                if key == "validate":
                    self.validate = v in _TRUE
                else:
                    self.strict_version = v in _TRUE
            else:
                raise AdapterError(
                    f"adapter 'hl7v2': unknown option {key!r} (known: validate, strict-version)"
                )

    # ------------------------------------------------------------------------------ extension hooks
    def map_z_segment(self, conv: Conversion, seg: Segment) -> bool:
        """Map a Z-segment; return True when handled. Default: not handled (a warning is recorded).

        ``conv.b`` is the :class:`~adapters.bundle.BundleBuilder`; ``conv.patient_ref`` /
        ``conv.encounter_ref`` are the message's Patient and Encounter references (or None);
        ``seg.v(n, c, s)`` reads a decoded value.
        """
        return False

    # ---------------------------------------------------------------------------------- convert
    def convert(self, data: bytes, source: SourceInfo, *, filename: str | None = None) -> Iterator[Outcome]:
        """Yield one outcome per message in ``data`` (a message, a batch file, or MLLP frames).

        Never raises for bad input: unparseable messages become :class:`RejectedRecord` with a located
        :class:`ParseError`; a bug in the mapping becomes an :class:`InternalAdapterError` record.
        """
        text, latin1 = decode_input(data)
        found = False
        for item in split_messages(text):
            if isinstance(item, ParseError):
                loc = item.location.with_file(filename)
                yield RejectedRecord(ParseError(item.message, adapter=self.name, location=loc), b"")
                continue
            found = True
            yield self._convert_one(item, source, filename, latin1)
        if not found:
            stripped = text.strip("\ufeff \t\r\n\x0b\x1c")
            msg = "empty input" if not stripped else "no MSH segment found: not an HL7 v2 message"
            yield RejectedRecord(self.error(msg, Location(file=filename, line=1 if stripped else None)), data)

    def _convert_one(
        self, raw: RawMessage, source: SourceInfo, filename: str | None, latin1: bool
    ) -> Outcome:
        raw_text = raw.text
        raw_bytes = raw_text.encode("utf-8")
        try:
            msg = parse_message(raw)
        except ParseError as exc:
            return RejectedRecord(
                ParseError(exc.message, adapter=self.name, location=exc.location.with_file(filename)),
                raw_bytes,
            )
        control_id = msg.control_id or None
        try:
            return self.convert_message(msg, source, raw_bytes, filename=filename, latin1=latin1)
        except ParseError as exc:
            return RejectedRecord(
                ParseError(exc.message, adapter=self.name, location=exc.location.with_file(filename)),
                raw_bytes,
                control_id,
            )
        except ValidationFailed as exc:
            log.error("hl7v2.invalid_output", error=str(exc), file=filename, message_index=raw.index)
            return RejectedRecord(
                InternalAdapterError(
                    str(exc),
                    adapter=self.name,
                    location=Location(file=filename, message_index=raw.index, line=raw.first_line),
                ),
                raw_bytes,
                control_id,
            )
        except Exception as exc:  # a mapping bug must not take down the other messages
            log.exception("hl7v2.internal_error", file=filename, message_index=raw.index)
            return RejectedRecord(
                InternalAdapterError(
                    f"internal error: {type(exc).__name__}: {exc}",
                    adapter=self.name,
                    location=Location(file=filename, message_index=raw.index, line=raw.first_line),
                ),
                raw_bytes,
                control_id,
            )

    def convert_message(
        self,
        msg: Message,
        source: SourceInfo,
        raw_bytes: bytes,
        *,
        filename: str | None = None,
        latin1: bool = False,
    ) -> ConvertedBundle:
        """Convert one parsed message. Raises :class:`ParseError` or :class:`ValidationFailed`."""
        msh = msg.msh
        base = Location(file=filename, message_index=msg.index, line=msh.line, segment="MSH", segment_index=1)
        mtype = msh.f(9)
        if not mtype.c(1):
            raise ParseError(
                "MSH-9 (message type) is empty",
                adapter=self.name,
                location=Location(**{**base.to_dict(), "field": 9}),
            )
        if not _MESSAGE_TYPE_CODE.fullmatch(mtype.c(1).split("_", 1)[0]):
            raise ParseError(
                f"MSH-9 (message type) {mtype.c(1)[:20]!r} is not a message type code "
                "(HL7 table 0076, such as ADT or ORU): the MSH fields may be shifted",
                adapter=self.name,
                location=Location(**{**base.to_dict(), "field": 9}),
            )
        version = msg.version
        if self.strict_version and version not in SUPPORTED_VERSIONS:
            raise ParseError(
                f"unsupported HL7 version {version!r} in MSH-12",
                adapter=self.name,
                location=Location(**{**base.to_dict(), "field": 12}),
            )
        input_sha = hashlib.sha256(raw_bytes).hexdigest()
        builder = BundleBuilder(
            adapter_name=self.name,
            adapter_version=self.version,
            source=source,
            input_sha256=input_sha,
            record_key=msg.control_id or str(msg.index),
        )

        def warn(code: str, message: str, loc: Location) -> None:
            builder.warn(code, message, loc)

        ctx = dt.Context(source=source, warn=warn, message_index=msg.index)
        if latin1:
            warn(
                "encoding", "input is not valid UTF-8; decoded as Latin-1", Location(message_index=msg.index)
            )
        if version and version not in SUPPORTED_VERSIONS:
            warn(
                "unsupported-version",
                f"HL7 version {version!r} is outside 2.1-2.9; converted as 2.x",
                Location(message_index=msg.index, segment="MSH", segment_index=1, field=12),
            )
        if mtype.c(1).upper() in PID_REQUIRED and msg.first("PID") is None:
            warn(
                "missing-segment",
                f"{mtype.c(1)}^{mtype.c(2)} message has no PID segment: no Patient, and nothing refers to one",
                Location(message_index=msg.index, segment="PID"),
            )
        if mtype.c(1).upper() not in SUPPORTED_MESSAGE_TYPES:
            warn(
                "unsupported-message-type",
                f"{mtype.c(1)}^{mtype.c(2)} is not one of the supported message types "
                f"({', '.join(sorted(SUPPORTED_MESSAGE_TYPES))}); its known segments were mapped generically",
                Location(message_index=msg.index, segment="MSH", segment_index=1, field=9),
            )
        recorded = dt.fhir_instant(ctx, msh.v(7), Location(message_index=msg.index, segment="MSH", field=7))
        builder.recorded = recorded or EPOCH
        conv = Conversion(self, msg, builder, ctx)
        conv.run()
        if len(builder) == 0:
            warn(
                "no-content",
                f"{conv.msg_type}^{conv.trigger} message produced no resources",
                Location(message_index=msg.index),
            )
        if builder.warnings:
            log.warning(
                "hl7v2.conversion_warnings",
                file=filename,
                message_index=msg.index,
                message_id=msg.control_id,
                count=len(builder.warnings),
                # codes and locations only: a warning's text may quote the value it is about
                warnings=[f"{w.code} at {w.location}" for w in builder.warnings],
            )
        return builder.build(
            routing_key=conv.routing_key or f"message:{input_sha}",
            message_id=msg.control_id or None,
            location=Location(file=filename, message_index=msg.index, line=msh.line),
            validate=self.validate,
            raw=raw_bytes,
        )
