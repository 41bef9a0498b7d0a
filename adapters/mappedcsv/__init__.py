"""Mapped CSV adapter: vendor flat files to FHIR via a declarative TOML mapping."""

from __future__ import annotations

from adapters.mappedcsv.adapter import EXAMPLES, MappedCsvAdapter
from adapters.mappedcsv.mapping import Mapping, MappingError, load_mapping

__all__ = ["EXAMPLES", "MappedCsvAdapter", "Mapping", "MappingError", "load_mapping"]
