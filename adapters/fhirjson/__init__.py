"""FHIR R4 JSON passthrough adapter (resources, Bundles, Bulk Data NDJSON)."""

from __future__ import annotations

from adapters.fhirjson.adapter import FhirPassthroughAdapter, detect_stu3

__all__ = ["FhirPassthroughAdapter", "detect_stu3"]
