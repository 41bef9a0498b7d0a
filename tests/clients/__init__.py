"""Interop tests with FHIR clients we did not write, against a live stack."""
