"""What both sinks check before using a record: its envelope (headers, value hash, a trusted org's
signature) and its bundle (a FHIR Bundle whose resources have FHIR ids); a record that fails goes to
the dead letters with the located reason, never into a store as valid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson

from bridge.consumers.runtime import Record
from bridge.errors import FhirbridgeError
from bridge.stores.db import is_retryable as is_retryable  # the sinks' name for it
from bridge.stream import envelope


class LocatedError(FhirbridgeError):
    """A record's fault, with where in its value it lies (``field``, written to the dead letter)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BadBundle(LocatedError):
    """The record's value is not a FHIR Bundle we can read."""


#: FHIR R4 ``id``: 1 to 64 ASCII letters, digits, '-' and '.' (what every built-in adapter writes)
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def parse_bundle(value: bytes) -> dict[str, Any]:
    try:
        bundle = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadBundle(f"value is not JSON: {exc}", field="value") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BadBundle("value is not a FHIR Bundle", field="resourceType")
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        raise BadBundle("bundle has no entry array", field="entry")
    for i, e in enumerate(entries):
        r = e.get("resource") if isinstance(e, dict) else None
        if (
            not isinstance(r, dict)
            or not isinstance(r.get("resourceType"), str)
            or not isinstance(r.get("id"), str)
        ):
            raise BadBundle(f"entry[{i}] has no resource with resourceType and id", field=f"entry[{i}]")
        if not _FHIR_ID.fullmatch(r["id"]):  # "" and NUL (which PostgreSQL cannot store) included
            raise BadBundle(
                f"entry[{i}].resource.id {r['id'][:80]!r} is not a FHIR id (1-64 of A-Z a-z 0-9 - .)",
                field=f"entry[{i}].resource.id",
            )
    return bundle


def in_batch_order(
    records: Sequence[Record], poison: list[tuple[Record, BaseException]]
) -> list[tuple[Record, BaseException]]:
    """The poison records in the order of the batch (the sinks find them in several passes)."""
    if len(poison) < 2:
        return poison
    order = {id(r): i for i, r in enumerate(records)}
    return sorted(poison, key=lambda p: order.get(id(p[0]), len(order)))


def check_bundle(value: bytes) -> None:
    """Raise :class:`BadBundle` unless ``value`` is a FHIR Bundle :func:`parse_bundle` accepts."""
    parse_bundle(value)


class EnvelopeChecker:
    """Parse and authenticate a record's envelope against the trust registry."""

    def __init__(self, trust: envelope.TrustRegistry | None) -> None:
        self.trust = trust

    def check(self, rec: Record) -> envelope.Envelope:
        env = envelope.parse(rec.headers, rec.value)
        if self.trust is None:
            raise envelope.SignatureError(
                "no trust registry configured: refusing unauthenticated records", field="fb-signature"
            )
        self.trust.verify(env)
        return env

    def check_many(
        self, records: Sequence[Record], poison: list[tuple[Record, BaseException]]
    ) -> list[tuple[Record, envelope.Envelope]]:
        """Check every record; the failures are appended to ``poison`` with their error."""
        ok: list[tuple[Record, envelope.Envelope]] = []
        for rec in records:
            try:
                ok.append((rec, self.check(rec)))  # rejects a record without a value
            except envelope.EnvelopeError as exc:
                poison.append((rec, exc))
        return ok


def load_checker(settings: Any) -> EnvelopeChecker:
    """The envelope checker over the configured trust registry (none configured: every record is refused)."""
    path = settings.trust.registry_file or settings.data_dir / "trust.json"
    return EnvelopeChecker(envelope.TrustRegistry.load(path) if path.is_file() else None)
