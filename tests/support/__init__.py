"""Helpers shared by the tests: tokens, Consents, demo data, records."""
