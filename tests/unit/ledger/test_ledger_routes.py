"""The /ledger HTTP routes, through aiohttp's test client on a real SQLite ledger."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from ledger_helpers import ledger_app

from bridge.stores.ledger import open_ledger
from ledger import checkpoint, merkle, note
from ledger.log import Ledger, LedgerEntry

ORIGIN = "fhirbridge.test/http"
SKEY, VKEY = note.generate_key(ORIGIN)
WSKEY, WVKEY = note.generate_key("witness.test/http", note.ALG_COSIGNATURE_V1)


def entry(i: int) -> LedgerEntry:
    return LedgerEntry(
        hashlib.sha256(b"b%d" % i).hexdigest(), "org", "fhir", "1", "t", 0, i, "2024-05-01T00:00:00Z"
    )


@pytest.fixture
def led(tmp_path: Any) -> Iterator[Ledger]:
    ledger = open_ledger(
        f"sqlite:///{tmp_path}/l.db",
        origin=ORIGIN,
        signer_key=SKEY,
        checkpoint_every=10,
        witness_keys=[WVKEY],
    )
    ledger.append([entry(i) for i in range(25)])  # checkpoints at 25 (first), none after
    yield ledger
    ledger.close()


@pytest.fixture
async def client(led: Ledger, aiohttp_client: Any) -> Any:
    app = ledger_app(lambda: led)
    return await aiohttp_client(app)


async def test_checkpoint_is_a_signed_note_in_text_plain(client: Any) -> None:
    resp = await client.get("/ledger/checkpoint")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    cp = checkpoint.open(await resp.text(), [VKEY])
    assert cp.size == 25


async def test_checkpoint_404_when_none(tmp_path: Any, aiohttp_client: Any) -> None:
    empty = open_ledger(f"sqlite:///{tmp_path}/e.db", origin=ORIGIN)
    app = ledger_app(lambda: empty)
    c = await aiohttp_client(app)
    resp = await c.get("/ledger/checkpoint")
    assert resp.status == 404
    assert (await resp.json())["resourceType"] == "OperationOutcome"
    empty.close()


async def test_entry(client: Any) -> None:
    resp = await client.get("/ledger/entries/7")
    body = await resp.json()
    assert body["entry"]["offset"] == 7
    assert base64.b64decode(body["leaf_hash"]) == merkle.leaf_hash(entry(7).canonical())
    assert (await client.get("/ledger/entries/99")).status == 404
    bad = await client.get("/ledger/entries/-1")
    assert bad.status == 400 and (await bad.json())["issue"][0]["code"] == "invalid"


async def test_inclusion_by_index_and_by_leaf_hash_verify_against_the_checkpoint(client: Any) -> None:
    cp = checkpoint.open(await (await client.get("/ledger/checkpoint")).text(), [VKEY])
    leaf = merkle.leaf_hash(entry(11).canonical())
    for query in ({"index": "11"}, {"leaf_hash": leaf.hex()}, {"leaf_hash": leaf.hex(), "size": "25"}):
        resp = await client.get("/ledger/proof/inclusion", params=query)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert (body["index"], body["size"]) == (11, 25)
        merkle.verify_inclusion(leaf, 11, 25, [base64.b64decode(p) for p in body["proof"]], cp.root_hash)
    small = await (await client.get("/ledger/proof/inclusion", params={"index": "3", "size": "5"})).json()
    assert small["size"] == 5 and small["checkpoint"] is None


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({}, 400),
        ({"index": "x"}, 400),
        ({"leaf_hash": "zz"}, 400),
        ({"leaf_hash": "00" * 32}, 404),
        ({"index": "30"}, 400),
        ({"index": "3", "size": "99"}, 404),
        ({"index": "\u00b2"}, 400),  # isdigit() but not a number int() takes
        ({"index": "3", "size": "99999999999999999999"}, 400),  # past BIGINT
    ],
)
async def test_inclusion_bad_requests(client: Any, query: dict[str, str], status: int) -> None:
    resp = await client.get("/ledger/proof/inclusion", params=query)
    assert resp.status == status
    assert (await resp.json())["resourceType"] == "OperationOutcome"


async def test_consistency(client: Any, led: Ledger) -> None:
    resp = await client.get("/ledger/proof/consistency", params={"from": "10", "to": "25"})
    body = await resp.json()
    proof = [base64.b64decode(p) for p in body["proof"]]
    merkle.verify_consistency(10, 25, proof, led.root_hash(10), led.root_hash(25))
    default_to = await (await client.get("/ledger/proof/consistency", params={"from": "10"})).json()
    assert default_to["to"] == 25
    for query in ({"from": "0", "to": "5"}, {"from": "6", "to": "5"}, {"to": "5"}):
        assert (await client.get("/ledger/proof/consistency", params=query)).status == 400
    assert (await client.get("/ledger/proof/consistency", params={"from": "1", "to": "26"})).status == 404


async def test_prove(client: Any) -> None:
    resp = await client.get(
        "/ledger/prove", params={"bundle_sha256": entry(4).bundle_sha256, "source_org": "org"}
    )
    body = await resp.json()
    assert body["index"] == 4 and body["size"] == 25
    missing = await client.get("/ledger/prove", params={"bundle_sha256": "0" * 64, "source_org": "org"})
    assert missing.status == 404


async def test_cosignatures_are_accepted_and_attached(client: Any) -> None:
    signed = await (await client.get("/ledger/checkpoint")).text()
    line = checkpoint.cosign(signed, VKEY, WSKEY)
    resp = await client.post("/ledger/cosignatures", data=(signed + line).encode())
    assert resp.status == 200 and (await resp.json()) == {"accepted": 1}
    attached = await (await client.get("/ledger/checkpoint")).text()
    assert checkpoint.open(attached, [VKEY, WVKEY]).signers == (ORIGIN, "witness.test/http")
    rejected = await client.post("/ledger/cosignatures", data=b"garbage")
    assert rejected.status == 422
    assert (await client.post("/ledger/cosignatures", data=b"\xff\xfe")).status == 400


async def test_entry_and_checkpoint_numbers_past_bigint_or_not_ascii_are_400(client: Any) -> None:
    for path in (
        "/ledger/entries/%C2%B2",
        "/ledger/entries/99999999999999999999",
        "/ledger/checkpoint?size=99999999999999999999",
    ):
        resp = await client.get(path)
        assert resp.status == 400, path
        assert (await resp.json())["resourceType"] == "OperationOutcome"
