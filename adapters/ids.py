"""Deterministic resource ids (public API).

Every resource id is a UUIDv5 over ``<source org>|<resource type>|<business key>``. The business key
per resource type is documented in docs/adapters.md; adapters build it with :func:`business_key` so
that re-converting the same input yields the same ids, and re-ingesting it updates rather than
duplicates.
"""

from __future__ import annotations

import hashlib
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


_NS_BYTES = NAMESPACE.bytes


def resource_id(source_org: str, resource_type: str, key: str) -> str:
    """The deterministic id of a resource: UUIDv5(NAMESPACE, "org|type|key").

    Computed directly (SHA-1, RFC 4122 version and variant bits); identical to ``uuid.uuid5``.
    """
    h = bytearray(hashlib.sha1(_NS_BYTES + f"{source_org}|{resource_type}|{key}".encode()).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
