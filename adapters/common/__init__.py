"""Helpers shared by the C-CDA, Synthea CSV and mapped CSV adapters (code systems, dates)."""
