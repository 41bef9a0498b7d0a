"""Synthea CSV export adapter (directory or zip; one bundle per patient)."""

from __future__ import annotations

from adapters.synthea.adapter import SyntheaCsvAdapter

__all__ = ["SyntheaCsvAdapter"]
