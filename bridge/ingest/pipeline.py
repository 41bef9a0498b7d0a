"""The one ingest pipeline: a converted record is published, or its bytes are dead-lettered with why.

Files (:mod:`bridge.ingest.files`), the MLLP listener (:mod:`bridge.ingest.mllp`) and a replay of
ingest dead letters all decide the same way (:meth:`Pipeline.decide`): a bundle that holds nothing but
its own Provenance is not published, since its record would be reported as kept while none of it
became FHIR. A dead letter carries how the record was converted (:func:`conversion_headers`), so that
:func:`convert_again` can convert it the same way once an adapter supports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka.producer.future import FutureRecordMetadata

from adapters import registry
from adapters.base import Adapter, ConvertedBundle, Outcome, RejectedRecord, SourceInfo
from adapters.errors import AdapterError, Location, ParseError
from bridge.logging import get_logger
from bridge.stream.envelope import H_SOURCE
from bridge.stream.producer import Publisher

log = get_logger(__name__)

# How a dead letter from ingest or MLLP was converted, so that a replay converts it the same way.
H_ADAPTER = "fb-adapter"
H_ADAPTER_OPTIONS = "fb-adapter-options"
H_SOURCE_TIMEZONE = "fb-source-timezone"
H_SOURCE_MRN_SYSTEM = "fb-source-mrn-system"
H_SOURCE_ENCOUNTER_SYSTEM = "fb-source-encounter-system"

#: Conversion warnings that say why a record gave no resources, in the order they are reported.
_WHY_EMPTY = ("no-content", "missing-segment", "no-patient")


def nothing_converted(converted: ConvertedBundle, adapter_name: str) -> ParseError | None:
    """The located reason when a bundle holds nothing but the Provenance its adapter adds, else None.

    Such a record was read but none of it became FHIR (an unsupported message type, a message with
    no segment the adapter maps): publishing the empty bundle would report the record as kept while
    its content is nowhere.
    """
    for entry in converted.bundle.get("entry") or ():
        resource = entry.get("resource") or {}
        if resource.get("resourceType") != "Provenance" or resource.get("target"):
            return None
    unsupported = next((w for w in converted.warnings if w.code == "unsupported-message-type"), None)
    if unsupported is not None:
        # the warning goes on to say the known segments were mapped generically: none were
        what = unsupported.message.split(";", 1)[0]
        where = Location(**{**converted.location.to_dict(), **unsupported.location.to_dict()})
        return ParseError(
            f"{what}: nothing in it was converted to FHIR", adapter=adapter_name, location=where
        )
    why = "; ".join(w.message for code in _WHY_EMPTY for w in converted.warnings if w.code == code)
    return ParseError(
        f"nothing in this record was converted to FHIR: {why or 'it gave no resources'}",
        adapter=adapter_name,
        location=converted.location,
    )


def conversion_headers(
    adapter_name: str, source: SourceInfo, options: dict[str, str] | None = None
) -> list[tuple[str, bytes]]:
    """The headers of an ingest or MLLP dead letter that say how to convert its record again."""
    out = [(H_SOURCE, source.org_id), (H_ADAPTER, adapter_name), (H_SOURCE_TIMEZONE, source.timezone)]
    if source.mrn_system:
        out.append((H_SOURCE_MRN_SYSTEM, source.mrn_system))
    if source.encounter_system:
        out.append((H_SOURCE_ENCOUNTER_SYSTEM, source.encounter_system))
    if options:
        out.append((H_ADAPTER_OPTIONS, json.dumps(options, sort_keys=True)))
    return [(k, v.encode("utf-8")) for k, v in out]


def conversion_from_headers(headers: dict[str, str]) -> tuple[dict[str, str], SourceInfo]:
    """The adapter options and the source of :func:`conversion_headers` (raises ValueError when unusable)."""
    options = json.loads(headers.get(H_ADAPTER_OPTIONS) or "{}")
    if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        raise ValueError(f"{H_ADAPTER_OPTIONS} is not an object of strings")
    source = SourceInfo(
        headers.get(H_SOURCE, ""),
        mrn_system=headers.get(H_SOURCE_MRN_SYSTEM) or None,
        encounter_system=headers.get(H_SOURCE_ENCOUNTER_SYSTEM) or None,
        timezone=headers.get(H_SOURCE_TIMEZONE) or "UTC",
    )
    return options, source


@dataclass
class Pipeline:
    """Convert -> sign -> publish, or dead-letter: one adapter, one source, one publisher."""

    adapter: Adapter
    source: SourceInfo
    publisher: Publisher
    options: dict[str, str] = field(default_factory=dict)
    stage: str = "ingest"

    def decide(self, outcome: Outcome) -> Outcome:
        """``outcome``, or the rejection a bundle of nothing but its Provenance is."""
        if isinstance(outcome, ConvertedBundle):
            empty = nothing_converted(outcome, self.adapter.name)
            if empty is not None:
                return RejectedRecord(empty, outcome.raw or b"", outcome.message_id)
        return outcome

    def publish(self, converted: ConvertedBundle) -> FutureRecordMetadata:
        return self.publisher.publish(converted, self.adapter, self.source)

    def dead_letter(
        self, raw: bytes, error: ParseError, *, location: str | None = None, file: str | None = None
    ) -> FutureRecordMetadata:
        """The record's bytes to the dead letters, with the located reason and how it was converted."""
        return self.publisher.dead_letter(
            raw,
            error=error,
            stage=f"{self.stage}:{self.adapter.name}",
            location=location or str(error.location),
            file=file,
            headers=conversion_headers(self.adapter.name, self.source, self.options),
        )


@dataclass
class Reconverted:
    """What converting dead letters again gave: the publishes in flight, and how many still fail."""

    futures: list[Any] = field(default_factory=list)
    published: int = 0
    failed: int = 0


def convert_again(
    value: bytes, headers: dict[str, str], adapter_name: str, publisher: Publisher
) -> Reconverted:
    """Convert an ingest or MLLP dead letter again, with the adapter, options and source it was converted
    with, and publish what converts; what still fails stays a dead letter (counted and logged)."""
    out = Reconverted()
    try:
        options, source = conversion_from_headers(headers)
        adapter = registry.create(adapter_name, options)
    except (ValueError, AdapterError) as exc:  # a header or an adapter we cannot use: the letter stays
        out.failed += 1
        log.warning("replay.still_failing", error=f"cannot convert again: {type(exc).__name__}: {exc}")
        return out
    pipeline = Pipeline(adapter, source, publisher, options)
    outcomes: Iterable[Outcome] = adapter.convert(value, source, filename=headers.get("fb-dl-file"))
    for outcome in map(pipeline.decide, outcomes):
        if isinstance(outcome, ConvertedBundle):
            out.futures.append(pipeline.publish(outcome))
            out.published += 1
        else:
            out.failed += 1
            log.warning(
                "replay.still_failing", location=str(outcome.error.location), error=outcome.error.message
            )
    return out
