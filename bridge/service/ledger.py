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

import asyncio
import base64
import functools
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.service.http import json_response, outcome_response

if TYPE_CHECKING:
    from ledger.log import Ledger

_HEX32 = re.compile(r"[0-9a-fA-F]{64}")
_MAX_BODY = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def _int_param(request: web.Request, name: str, *, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise _Bad(f"query parameter {name!r} is required")
        return default
    value = _index(raw)
    if value is None:
        raise _Bad(f"query parameter {name!r} must be a non-negative integer below 2**63")
    return value


def _index(raw: str) -> int | None:
    """A non-negative integer written in ASCII digits that fits the databases' BIGINT, else None
    (``str.isdigit`` also accepts characters such as ``²``, which ``int`` refuses)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        return None
    value = int(raw)
    return value if value < 2**63 else None


class _Bad(Exception):
    pass


def _errors(handler: Handler) -> Handler:
    """Map ledger errors to OperationOutcome responses (no traceback ever reaches the client)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        from ledger.errors import InvalidEntry, LedgerError, OutOfRange, StorageUnavailable, VerificationError

        try:
            return await handler(request)
        except _Bad as exc:
            return outcome_response(400, "invalid", str(exc))
        except OutOfRange as exc:
            return outcome_response(404, "not-found", str(exc))
        except StorageUnavailable:
            return outcome_response(503, "transient", "the ledger database is unavailable; retry later")
        except VerificationError as exc:
            return outcome_response(422, "processing", f"rejected: {exc}")
        except InvalidEntry as exc:
            return outcome_response(500, "exception", f"stored entry is invalid: {exc}")
        except LedgerError as exc:
            return outcome_response(500, "exception", str(exc))

    return wrapped


def setup_ledger_routes(app: web.Application, get_ledger: Callable[[], Ledger]) -> None:
    """Add the ``/ledger/*`` routes to ``app``; ``get_ledger`` returns the (shared) open Ledger."""

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def default_size(led: Ledger) -> int:
        latest = led.storage.latest_checkpoint()
        return latest[0] if latest is not None else led.size()

    @_errors
    async def get_checkpoint(request: web.Request) -> web.StreamResponse:
        led = get_ledger()
        if "size" in request.query:
            note = await run(led.checkpoint_at, _int_param(request, "size"))
        else:
            note = await run(led.latest_checkpoint)
        if note is None:
            return outcome_response(404, "not-found", "no signed checkpoint")
        return web.Response(text=note, content_type="text/plain", charset="utf-8")

    @_errors
    async def get_entry(request: web.Request) -> web.StreamResponse:
        index = _index(request.match_info["index"])
        if index is None:
            raise _Bad("the entry index must be a non-negative integer below 2**63")
        led = get_ledger()

        def fetch() -> dict[str, Any]:
            return {
                "index": index,
                "leaf_hash": _b64(led.leaf_hash(index)),
                "entry": led.entry(index).to_dict(),
            }

        return json_response(await run(fetch))

    @_errors
    async def get_inclusion(request: web.Request) -> web.StreamResponse:
        led = get_ledger()
        leaf_hex = request.query.get("leaf_hash")
        if leaf_hex is not None and not _HEX32.fullmatch(leaf_hex):
            raise _Bad("leaf_hash must be 64 hex characters")
        if leaf_hex is None and "index" not in request.query:
            raise _Bad("give leaf_hash=<hex> or index=<n>")
        index_param = None if leaf_hex is not None else _int_param(request, "index")
        size_param = _int_param(request, "size") if "size" in request.query else None

        def prove() -> dict[str, Any]:
            size = default_size(led) if size_param is None else size_param
            if leaf_hex is not None:
                found = led.find_leaf(bytes.fromhex(leaf_hex))
                if found is None:
                    from ledger.errors import OutOfRange

                    raise OutOfRange("no entry has this leaf hash", value=-1, limit=size)
                index = found
            else:
                assert index_param is not None
                index = index_param
            if index >= size:
                raise _Bad(f"index {index} is not below size {size}")
            proof = led.inclusion_proof(index, size)
            return {
                "index": index,
                "size": size,
                "leaf_hash": _b64(led.leaf_hash(index)),
                "proof": [_b64(p) for p in proof],
                "checkpoint": led.checkpoint_at(size),
            }

        return json_response(await run(prove))

    @_errors
    async def get_consistency(request: web.Request) -> web.StreamResponse:
        led = get_ledger()
        size1 = _int_param(request, "from")
        to_param = _int_param(request, "to") if "to" in request.query else None

        def prove() -> dict[str, Any]:
            size2 = default_size(led) if to_param is None else to_param
            if not 0 < size1 <= size2:
                raise _Bad(f"need 0 < from <= to, got from={size1}, to={size2}")
            return {
                "from": size1,
                "to": size2,
                "proof": [_b64(p) for p in led.consistency_proof(size1, size2)],
            }

        return json_response(await run(prove))

    @_errors
    async def get_prove(request: web.Request) -> web.StreamResponse:
        led = get_ledger()
        bundle = request.query.get("bundle_sha256", "")
        org = request.query.get("source_org", "")
        if not _HEX32.fullmatch(bundle) or not org:
            raise _Bad("give bundle_sha256=<64 hex> and source_org=<org>")
        result = await run(led.prove, bundle.lower(), org)
        if result is None:
            return outcome_response(404, "not-found", "this bundle is not in the ledger")
        return json_response(result)

    @_errors
    async def post_cosignatures(request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > _MAX_BODY:
            raise _Bad("body too large")
        body = await request.content.read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            raise _Bad("body too large")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Bad("the body must be a UTF-8 signed note") from exc
        count = await run(get_ledger().add_cosignatures, text)
        return json_response({"accepted": count})

    app.router.add_get("/ledger/checkpoint", get_checkpoint)
    app.router.add_get("/ledger/entries/{index}", get_entry)
    app.router.add_get("/ledger/proof/inclusion", get_inclusion)
    app.router.add_get("/ledger/proof/consistency", get_consistency)
    app.router.add_get("/ledger/prove", get_prove)
    app.router.add_post("/ledger/cosignatures", post_cosignatures)
