"""HTTP endpoints of the Merkle ledger (mounted by the query service).

* ``GET /ledger/checkpoint``: the latest signed checkpoint (C2SP signed note, with witness
  cosignatures), ``text/plain``; ``?size=n`` returns the stored checkpoint of that size.
* ``GET /ledger/entries/{index}``: the entry and its leaf hash.
* ``GET /ledger/proof/inclusion?leaf_hash=<hex>&size=<n>`` (or ``?index=<i>``): an RFC 9162 inclusion
  proof; ``size`` defaults to the latest checkpoint's size.
* ``GET /ledger/proof/consistency?from=<n>&to=<m>``: a consistency proof; ``to`` defaults likewise.
* ``GET /ledger/prove?bundle_sha256=<hex>&source_org=<org>``: index, entry, proof and checkpoint in one.
* ``POST /ledger/cosignatures``: a witness pushes its cosigned checkpoint (``text/plain``); only
  cosignatures from the ledger's configured witness keys are kept.

Hashes are base64 in JSON. Errors are FHIR OperationOutcomes: 400 bad input, 404 unknown index,
422 a rejected cosignature, 503 when the database is unavailable.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from aiohttp import web

from bridge.service.auth.marks import public
from bridge.service.context import Backend, run_db
from bridge.service.http import (
    FhirHTTPError,
    json_response,
    outcome_response,
    path_index,
    query_index,
    read_body,
)
from ledger.errors import OutOfRange
from ledger.log import Ledger

routes = web.RouteTableDef()

_HEX32 = re.compile(r"[0-9a-fA-F]{64}")
_MAX_BODY = 64 * 1024


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def _bad(message: str) -> FhirHTTPError:
    return FhirHTTPError(400, "invalid", message)


def _ledger(backend: Backend) -> Ledger:
    return backend.ledger()  # type: ignore[no-any-return]


def _default_size(led: Ledger) -> int:
    latest = led.storage.latest_checkpoint()
    return latest[0] if latest is not None else led.size()


@routes.get("/ledger/checkpoint")
@public
async def get_checkpoint(request: web.Request) -> web.StreamResponse:
    """The latest signed checkpoint (``?size=n``: the stored one of that size), ``text/plain``."""
    size = query_index(request, "size") if "size" in request.query else None

    def fetch(backend: Backend) -> str | None:
        led = _ledger(backend)
        return led.latest_checkpoint() if size is None else led.checkpoint_at(size)

    note = await run_db(request, fetch)
    if note is None:
        return outcome_response(404, "not-found", "no signed checkpoint")
    return web.Response(text=note, content_type="text/plain", charset="utf-8")


@routes.get("/ledger/entries/{index}")
@public
async def get_entry(request: web.Request) -> web.StreamResponse:
    """One entry and its leaf hash."""
    index = path_index(request, "index")

    def fetch(backend: Backend) -> dict[str, Any]:
        led = _ledger(backend)
        return {"index": index, "leaf_hash": _b64(led.leaf_hash(index)), "entry": led.entry(index).to_dict()}

    return json_response(await run_db(request, fetch))


@routes.get("/ledger/proof/inclusion")
@public
async def get_inclusion(request: web.Request) -> web.StreamResponse:
    """An RFC 9162 inclusion proof of ``leaf_hash`` or ``index`` at ``size`` (default: the latest checkpoint's)."""
    leaf_hex = request.query.get("leaf_hash")
    if leaf_hex is not None and not _HEX32.fullmatch(leaf_hex):
        raise _bad("leaf_hash must be 64 hex characters")
    if leaf_hex is None and "index" not in request.query:
        raise _bad("give leaf_hash=<hex> or index=<n>")
    index_param = None if leaf_hex is not None else query_index(request, "index")
    size_param = query_index(request, "size") if "size" in request.query else None

    def prove(backend: Backend) -> dict[str, Any]:
        led = _ledger(backend)
        size = _default_size(led) if size_param is None else size_param
        if leaf_hex is not None:
            found = led.find_leaf(bytes.fromhex(leaf_hex))
            if found is None:
                raise OutOfRange("no entry has this leaf hash", value=-1, limit=size)
            index = found
        else:
            assert index_param is not None
            index = index_param
        if index >= size:
            raise _bad(f"index {index} is not below size {size}")
        proof = led.inclusion_proof(index, size)
        return {
            "index": index,
            "size": size,
            "leaf_hash": _b64(led.leaf_hash(index)),
            "proof": [_b64(p) for p in proof],
            "checkpoint": led.checkpoint_at(size),
        }

    return json_response(await run_db(request, prove))


@routes.get("/ledger/proof/consistency")
@public
async def get_consistency(request: web.Request) -> web.StreamResponse:
    """A consistency proof from ``from`` to ``to`` (default: the latest checkpoint's size)."""
    size1 = query_index(request, "from")
    to_param = query_index(request, "to") if "to" in request.query else None

    def prove(backend: Backend) -> dict[str, Any]:
        led = _ledger(backend)
        size2 = _default_size(led) if to_param is None else to_param
        if not 0 < size1 <= size2:
            raise _bad(f"need 0 < from <= to, got from={size1}, to={size2}")
        return {"from": size1, "to": size2, "proof": [_b64(p) for p in led.consistency_proof(size1, size2)]}

    return json_response(await run_db(request, prove))


@routes.get("/ledger/prove")
@public
async def get_prove(request: web.Request) -> web.StreamResponse:
    """Index, entry, inclusion proof and checkpoint of a bundle, in one answer."""
    bundle = request.query.get("bundle_sha256", "")
    org = request.query.get("source_org", "")
    if not _HEX32.fullmatch(bundle) or not org:
        raise _bad("give bundle_sha256=<64 hex> and source_org=<org>")
    result = await run_db(request, lambda backend: _ledger(backend).prove(bundle.lower(), org))
    if result is None:
        return outcome_response(404, "not-found", "this bundle is not in the ledger")
    return json_response(result)


@routes.post("/ledger/cosignatures")
@public
async def post_cosignatures(request: web.Request) -> web.StreamResponse:
    """A witness's cosigned checkpoint (``text/plain``); only the configured witnesses' cosignatures are kept."""
    body = await read_body(request, _MAX_BODY)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad("the body must be a UTF-8 signed note") from exc
    count = await run_db(request, lambda backend: _ledger(backend).add_cosignatures(text))
    return json_response({"accepted": count})
