"""Integration tests: real brokers (noida-db, tansu) and PostgreSQL."""
