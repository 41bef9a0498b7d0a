"""Records the broker did not acknowledge during ``fhirbridge ingest``, kept on disk for a retry.

A publish can fail after the record was converted: the broker refuses it (``NotEnoughReplicas`` while
too few replicas are in sync), the producer gives up on it (its delivery timeout passes while a
partition has no leader), or ``send`` itself cannot hand it over (no metadata, a full buffer). Such a
record is not published, and ``ingest`` must say so rather than exit 0 (docs/streams.md#fault-drills).

:class:`FailedRecords` writes each one where a retry can find it, in a directory created on the first
failure:

* ``records/<input file name>``: the original bytes of each failed record of that input, when the
  adapter keeps them (the HL7 v2 adapter does), one record a line, so that ``fhirbridge ingest`` on
  ``records/`` converts exactly those records again;
* ``failed.jsonl``: one line per failed record: its input file, location, message id, what failed
  (a ``bundle`` or the ``dead-letter`` of a rejected record), the error, and the converted bundle
  itself when its original bytes are not known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from adapters.base import ConvertedBundle

MANIFEST = "failed.jsonl"
RECORDS = "records"


@dataclass(slots=True)
class Sent:
    """One record handed to the producer: its future and what is needed to keep it if it fails."""

    future: Any
    file: Path
    location: str
    raw: bytes | None
    bundle: ConvertedBundle | None  # None: the dead letter of a rejected record


@dataclass
class FailedRecords:
    directory: Path
    bundles: int = 0  # converted records that were not published
    dead_letters: int = 0  # rejected records whose dead letter was not stored
    without_raw: int = 0  # failed bundles whose original bytes the adapter did not keep
    reasons: dict[str, int] = field(default_factory=dict)  # error class -> count
    _names: dict[Path, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return self.bundles + self.dead_letters

    @property
    def records(self) -> Path:
        """The directory to ingest again: the original bytes of the failed bundles."""
        return self.directory / RECORDS

    @property
    def retryable(self) -> bool:
        """Whether ingesting :attr:`directory` again converts every failed bundle (dead letters aside)."""
        return self.bundles > 0 and self.without_raw == 0

    def add(self, sent: Sent, error: BaseException) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        reason = type(error).__name__
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        entry: dict[str, Any] = {
            "file": str(sent.file),
            "location": sent.location,
            "kind": "bundle" if sent.bundle is not None else "dead-letter",
            "error": f"{reason}: {error}"[:2000],
        }
        if sent.bundle is None:
            self.dead_letters += 1
        else:
            self.bundles += 1
            entry["message_id"] = sent.bundle.message_id
            entry["bundle_sha256"] = sent.bundle.sha256
            if sent.raw is not None:
                entry["retry_file"] = f"{RECORDS}/" + self._append_raw(sent.file, sent.raw)
            else:
                self.without_raw += 1
                entry["bundle"] = orjson.Fragment(sent.bundle.body)
        with open(self.directory / MANIFEST, "ab") as out:
            out.write(orjson.dumps(entry) + b"\n")

    def _append_raw(self, source: Path, raw: bytes) -> str:
        name = self._names.get(source)
        if name is None:
            stem, k = source.name or "input", 2
            name = stem
            taken = set(self._names.values())
            while name in taken:
                name = f"{k}-{stem}"
                k += 1
            self._names[source] = name
        self.records.mkdir(parents=True, exist_ok=True)
        with open(self.records / name, "ab") as out:
            out.write(raw.rstrip(b"\n") + b"\n")
        return name

    def describe(self) -> str:
        """``NotEnoughReplicasError 3x, KafkaTimeoutError 1x``."""
        return ", ".join(f"{k} {v}x" for k, v in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
