"""Shared by the Ledger tests: the entries they append, and the service over one ledger (the ``url``
fixture is in conftest.py)."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable

from aiohttp import web

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.context import Backend
from ledger.log import Ledger, LedgerEntry


def ledger_app(get_ledger: Callable[[], Ledger]) -> web.Application:
    """The query service with ``get_ledger``'s ledger (its index, unused, in a directory of its own)."""
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": tempfile.mkdtemp(prefix="fhirbridge-ledger-test-")})
    return create_app(settings, Backend(settings, ledger_factory=get_ledger))


def make_entry(i: int, org: str = "org-a", offset: int | None = None) -> LedgerEntry:
    return LedgerEntry(
        bundle_sha256=hashlib.sha256(f"bundle-{i}".encode()).hexdigest(),
        source_org=org,
        adapter="hl7v2",
        adapter_version="1.0.0",
        topic="fhir.bundles",
        partition=i % 3,
        offset=i if offset is None else offset,
        ingested_at="2024-05-01T12:00:00Z",
        message_id=f"msg-{i}",
    )
