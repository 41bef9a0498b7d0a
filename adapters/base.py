"""The adapter interface (public API; documented in docs/adapters.md).

An adapter turns the raw bytes of one export (an HL7 v2 file, a C-CDA document, a CSV export, ...)
into FHIR R4 transaction bundles. It never talks to Kafka and never does I/O beyond what it is given.

Contract:

* ``convert(data, source, filename=...)`` yields one :class:`Outcome` per record in the input: a
  :class:`ConvertedBundle` when the record converted, or a :class:`RejectedRecord` carrying a located
  :class:`~adapters.errors.ParseError` and the record's raw bytes when it did not. A bad record never
  aborts the rest of the input, and nothing is dropped silently.
* Output is deterministic: the same bytes and ``SourceInfo`` give byte-identical bundles
  (see :mod:`adapters.ids` and :func:`adapters.bundle.canonical_json`).
* Each bundle holds a Provenance naming the source organisation, the adapter name and version, and
  the SHA-256 of the raw input. Use :class:`adapters.bundle.BundleBuilder`, which does this and
  validates once against the R4B models.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from adapters.errors import AdapterError, Location, ParseError

FHIRBRIDGE_SYSTEM_BASE = "urn:fhirbridge"


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """Who sent the data and how its identifiers are named.

    ``org_id`` is the sending organisation's id in fhirbridge (e.g. ``"st-mary"``). ``mrn_system`` and
    ``encounter_system`` are the identifier systems of its MRNs and visit numbers; they default to
    ``urn:fhirbridge:<org_id>:mrn`` and ``urn:fhirbridge:<org_id>:encounter``. ``timezone`` is the IANA zone
    used for local times that carry no offset. ``assigning_authorities`` maps an HL7 v2 assigning
    authority (CX-4) or a CDA ``@root`` to the FHIR identifier system to use for it.
    """

    org_id: str
    mrn_system: str | None = None
    encounter_system: str | None = None
    timezone: str = "UTC"
    name: str | None = None
    assigning_authorities: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.org_id or any(c in self.org_id for c in "|/ \t\r\n"):
            raise ValueError(f"invalid source org id {self.org_id!r}: use letters, digits, '-', '.', '_'")
        if self.timezone not in ("", "UTC"):
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                # an unknown zone would read every local time as UTC: hours off, without a word
                raise ValueError(
                    f"unknown time zone {self.timezone!r}: give an IANA zone such as America/Chicago"
                ) from None

    @property
    def mrn_system_uri(self) -> str:
        return self.mrn_system or f"{FHIRBRIDGE_SYSTEM_BASE}:{self.org_id}:mrn"

    @property
    def encounter_system_uri(self) -> str:
        return self.encounter_system or f"{FHIRBRIDGE_SYSTEM_BASE}:{self.org_id}:encounter"

    def system_for(self, authority: str | None, kind: str = "id") -> str:
        """The identifier system for an assigning authority, else one scoped to this source."""
        if authority:
            for key, system in self.assigning_authorities:
                if key == authority:
                    return system
            if authority[:1].isdigit() and all(p.isdigit() for p in authority.split(".")):
                return f"urn:oid:{authority}"
            return f"{FHIRBRIDGE_SYSTEM_BASE}:{self.org_id}:{kind}:{authority}"
        return f"{FHIRBRIDGE_SYSTEM_BASE}:{self.org_id}:{kind}"


@dataclass(frozen=True, slots=True)
class ConversionWarning:
    """Something the adapter could not map faithfully. Recorded in the bundle and in the logs."""

    code: str  # short machine code, e.g. "unknown-code-system", "unmapped-segment"
    message: str
    location: Location = field(default_factory=Location)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "location": self.location.to_dict()}


@dataclass(frozen=True, slots=True)
class ConvertedBundle:
    """One validated R4 transaction bundle and what the streaming layer needs to route it.

    ``body`` is the canonical JSON (sorted keys, compact, UTF-8) of ``bundle``; ``sha256`` is its hex
    digest. ``routing_key`` is the source patient key (used as the Kafka record key), ``message_id``
    the record's id in the source system (MSH-10, CDA id, CSV line) when it has one. ``raw`` is the
    record's original bytes, when the adapter keeps them: the streaming layer dead-letters them if it
    refuses the bundle (one that holds nothing but its Provenance, say), so that the record can be
    converted again later.
    """

    bundle: dict[str, Any]
    body: bytes
    sha256: str
    routing_key: str
    message_id: str | None
    input_sha256: str
    warnings: tuple[ConversionWarning, ...] = ()
    location: Location = field(default_factory=Location)
    raw: bytes | None = None


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A record that could not be converted: the located error and the record's original bytes."""

    error: ParseError
    raw: bytes
    message_id: str | None = None


Outcome = ConvertedBundle | RejectedRecord


class Adapter(ABC):
    """Base class of every adapter. Subclasses set ``name`` and ``version`` and implement ``convert``.

    Adapters are registered through the ``fhirbridge.adapters`` entry-point group, built-in ones
    included, and are instantiated with no arguments.
    """

    name: ClassVar[str]
    version: ClassVar[str]

    def __init__(self, **options: str) -> None:
        """Adapters take string options (``--option key=value`` on the command line).

        Subclasses that accept options override this, validate them, and raise
        :class:`~adapters.errors.AdapterError` with a clear message for a bad or unknown one.
        """
        if options:
            raise AdapterError(f"adapter {self.name!r} takes no options; got {', '.join(sorted(options))}")

    #: Human description shown by ``fhirbridge adapters list``.
    description: ClassVar[str] = ""
    #: File suffixes this adapter usually reads (a hint for tooling, not enforced).
    suffixes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def convert(self, data: bytes, source: SourceInfo, *, filename: str | None = None) -> Iterator[Outcome]:
        """Convert ``data``; yield one outcome per record. Never raise for bad input records.

        An input so broken that no record can be found (e.g. not XML at all) yields a single
        :class:`RejectedRecord` for the whole input.
        """

    def convert_path(self, path: Path, source: SourceInfo) -> Iterator[Outcome]:
        """Convert a file, or every file under a directory (recursively, in a stable order).

        A directory's files are its regular files at any depth, hidden names (``.*``) and symbolic
        links to directories left out, sorted by their path relative to the directory. An empty
        directory, or a file that cannot be read, yields a located :class:`RejectedRecord`, so that
        nothing given on the command line disappears without a word. Adapters whose input *is* a
        directory (a Synthea export) override this.
        """
        if not path.is_dir():
            yield from self.convert(path.read_bytes(), source, filename=str(path))
            return
        files = files_under(path)
        if not files:
            yield RejectedRecord(
                self.error("the directory holds no files to convert", Location(file=str(path))), b""
            )
            return
        for file in files:
            try:
                data = file.read_bytes()
            except OSError as exc:
                yield RejectedRecord(
                    self.error(f"cannot read: {exc.strerror}", Location(file=str(file))), b""
                )
                continue
            yield from self.convert(data, source, filename=str(file))

    def error(self, message: str, location: Location | None = None) -> ParseError:
        return ParseError(message, adapter=self.name, location=location)


def files_under(directory: Path) -> list[Path]:
    """The regular files under ``directory`` at any depth, hidden names skipped, in a stable order."""
    found: list[tuple[tuple[str, ...], Path]] = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(root)
        for name in names:
            file = base / name
            if not name.startswith(".") and file.is_file():
                found.append((file.relative_to(directory).parts, file))
    return [file for _, file in sorted(found)]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
