"""Node FHIR clients we did not write walk the ``next`` links of a multi-page search to the end.

* the SMART on FHIR JavaScript client (npm ``fhirclient``): ``client.request(url, {pageLimit: 0, flat:
  true})``, as a SMART app holding the token a patient got by signing in (code flow with PKCE);
* ``fhir-kit-client``: ``search`` then ``nextPage`` until there is none, asking for
  ``application/json+fhir``, the media type of FHIR DSTU2 that clients of that age still send (R4
  http.html#mime: servers SHOULD accept it).

The scripts (``tests/clients/node/*.mjs``) print what they got as JSON; the ids must be unique and as
many as the server's total for the same search.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.clients.node_setup import node
from tests.clients.stack import ClientStack

pytestmark = pytest.mark.clients

PAGE = 10


def _run(node_dir: Path, stack: ClientStack, script: str, *args: str, token: str) -> dict[str, Any]:
    done = subprocess.run(
        [node(), script, *args],
        cwd=node_dir,
        env={**os.environ, "FHIR_ACCESS_TOKEN": token, "NODE_NO_WARNINGS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{script} failed ({done.returncode}): {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _server_total(stack: ClientStack, query: str) -> int:
    """The number of matches, as the server counts them (``_summary=count``)."""
    answer = stack.get(f"{query}&_summary=count", token=stack.system_token())
    assert answer["resourceType"] == "Bundle" and isinstance(answer.get("total"), int), answer
    return int(answer["total"])


def test_smart_fhirclient_walks_every_page(stack: ClientStack, node_clients: Path) -> None:
    query = f"/Observation?patient={stack.patient_id}&_count={PAGE}&_total=accurate"
    got = _run(
        node_clients, stack, "smart_client.mjs", stack.base, query.lstrip("/"), token=stack.patient_token()
    )
    total = _server_total(stack, f"/Observation?patient={stack.patient_id}")
    ids = [r["id"] for r in got["resources"]]
    assert got["firstPage"] == PAGE and got["next"], "expected a multi-page search"
    assert got["total"] == total
    assert len(ids) == len(set(ids)), "a resource came twice"
    assert len(ids) == total
    assert {r["type"] for r in got["resources"]} == {"Observation"}


def test_fhir_kit_client_walks_every_page(stack: ClientStack, node_clients: Path) -> None:
    got = _run(
        node_clients,
        stack,
        "fhir_kit_client.mjs",
        stack.base,
        "Observation",
        f"patient={stack.patient_id}&_count={PAGE}&_total=accurate",
        token=stack.patient_token(),
    )
    total = _server_total(stack, f"/Observation?patient={stack.patient_id}")
    matches = [r for r in got["resources"] if r["mode"] != "outcome"]
    ids = [r["id"] for r in matches]
    assert len(got["pages"]) == -(-total // PAGE), got["pages"]
    assert got["total"] == total
    assert len(ids) == len(set(ids)), "a resource came twice"
    assert len(ids) == total
    assert {r["type"] for r in matches} == {"Observation"}
