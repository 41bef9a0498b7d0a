"""The patient page with a master patient index: records linked by MATCH are one patient; a
POSSIBLE_MATCH is announced as under review and its data is not shown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.auth.discovery import issuer_url
from bridge.service.context import Backend
from bridge.service.ui.login import SESSIONS
from bridge.service.ui.session import SESSION_COOKIE
from bridge.service.ui.summary import possible_matches
from bridge.stores.audit import AuditStore
from bridge.stores.index.store import IndexStore
from bridge.stores.mpi import PersonIndex
from tests.support.auth import token
from tests.support.mpi_records import A, B, C, bundle, condition


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Any, Settings]]:
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
    index = IndexStore.open(settings.stores.index_url)
    index.apply(
        [
            bundle("h1", "org-a", [A, condition("cond-a", "a1", "Asthma")]),
            bundle("h2", "org-b", [B, condition("cond-b", "b1", "Gout")]),
            bundle("h3", "org-c", [C, condition("cond-c", "c2", "Psoriasis")]),
        ]
    )
    index.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    mpi.upsert_patients([("org-a", A), ("org-b", B), ("org-c", C)])
    assert mpi.linked_patient_ids("a1") == ["a1", "b1"]
    assert "c2" in mpi.linked_patient_ids("a1", include_possible=True)
    app = create_app(settings, Backend(settings, mpi_factory=lambda: mpi))
    async with TestClient(TestServer(app)) as client:
        session = app[SESSIONS].create(token(settings, subject="dr-who"), 4102444800.0, "dr-who", None)
        client.session.cookie_jar.update_cookies({SESSION_COOKIE: session.id})
        yield client, settings
    mpi.close()


@pytest.mark.parametrize("pid", ["a1", "b1"])
async def test_a_possible_match_is_announced_and_not_shown(env: tuple[Any, Settings], pid: str) -> None:
    client, settings = env
    resp = await client.get(f"/app/Patient/{pid}")
    assert resp.status == 200
    page = await resp.text()
    assert "Linked records: 2 from 2 hospitals" in page
    assert "Asthma" in page and "Gout" in page
    assert "1 possible match of this patient is under review by a data steward." in page
    assert "Psoriasis" not in page and "org-c" not in page
    store = AuditStore.open(settings.audit.url)
    try:
        rows = [(r.agent, r.patient_id) for batch in store.iter_all() for r in batch]
    finally:
        store.close()
    agent = issuer_url(settings.http.fhir_base()) + "|dr-who"
    assert {(agent, "a1"), (agent, "b1")} <= set(rows)
    assert all(a == agent for a, _ in rows)
    assert (agent, "c2") not in rows  # the possible match's record was not read


async def test_the_other_side_of_the_pair_is_announced_too(env: tuple[Any, Settings]) -> None:
    client, _ = env
    page = await (await client.get("/app/Patient/c2")).text()
    assert "Psoriasis" in page and "Linked records: 1 from 1 hospital" in page
    assert "1 possible match of this patient is under review" in page  # a1 and b1: one person
    assert "Asthma" not in page and "Gout" not in page


def test_possible_matches_counts_other_persons() -> None:
    ext = "https://fhirbridge.dev/fhir/StructureDefinition/"

    def link(target: str, code: str, person: str | None = None) -> dict[str, Any]:
        exts: list[dict[str, Any]] = [{"url": ext + "mpi-match-state", "valueCode": code}]
        if person:
            exts.append({"url": ext + "mpi-other-person", "valueReference": {"reference": person}})
        return {"target": {"reference": target}, "extension": exts}

    person = {
        "link": [
            link("Patient/a", "MATCH"),
            link("Patient/x1", "POSSIBLE_MATCH", "Person/x"),
            link("Patient/x2", "POSSIBLE_MATCH", "Person/x"),  # another record of the same person
            link("Patient/y", "POSSIBLE_MATCH", "Person/y"),
            link("Patient/z", "POSSIBLE_MATCH"),  # no person named: counted by its record
        ]
    }
    assert possible_matches(person) == 3
    assert possible_matches({"link": [link("Patient/a", "MATCH")]}) == 0
    assert possible_matches({}) == 0
