"""Deterministic resource ids (public API).

Every resource id is a UUIDv5 over ``<source org>|<resource type>|<business key>``. The business key
per resource type is documented in docs/adapters.md; adapters build it with :func:`business_key` so
that re-converting the same input yields the same ids, and re-ingesting it updates rather than
duplicates.
"""

from __future__ import annotations

import uuid

#: Namespace of all fhirbridge resource ids. Never change it: every stored id depends on it.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://fhirbridge.dev/ns/resource-id")


def business_key(*parts: object) -> str:
    """Join key parts unambiguously (``None`` becomes empty; ``|`` and ``\\`` are escaped)."""
    out = []
    for p in parts:
        s = "" if p is None else str(p)
        out.append(s.replace("\\", "\\\\").replace("|", "\\|"))
    return "|".join(out)


def resource_id(source_org: str, resource_type: str, key: str) -> str:
    """The deterministic id of a resource: UUIDv5(NAMESPACE, "org|type|key")."""
    return str(uuid.uuid5(NAMESPACE, f"{source_org}|{resource_type}|{key}"))
