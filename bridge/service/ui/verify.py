"""In-browser verification of the ledger proofs (issue 24, "Verify"; docs/ui.md, *Verification*).

* ``GET /app/Patient/{id}/proofs``: the proof material of the patient page's entries, as JSON, read
  from ``Patient/{id}/$everything?_proof=true`` with the session's token (so the scopes, the consent
  gate and the audit apply as to any read), together with the keys the browser must trust: the
  ledger's verifier key and the witnesses' keys **from this service's configuration**
  (``<FHIRBRIDGE_LEDGER_KEY_FILE>.pub``, ``FHIRBRIDGE_LEDGER_WITNESS_KEYS``), never from a checkpoint.
* ``GET /app/static/verify.js``: the script that checks it all in the browser (WebCrypto SHA-256 and
  Ed25519), with ``GET /ledger/checkpoint`` and ``GET /ledger/proof/consistency`` for the rest.

This module checks nothing cryptographic itself: the point is that the browser does, so the server's
word is not needed for a "verified". It only reshapes the API's provenance extensions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from bridge.logging import get_logger
from bridge.service.auth.marks import public
from bridge.service.context import SETTINGS
from bridge.service.ui.api import fhir_get, path_of
from bridge.service.ui.login import SESSIONS, current_session
from bridge.service.ui.views import EVERYTHING_COUNT, MAX_ENTRIES
from ledger import note as _note
from ledger.errors import InvalidKey

log = get_logger(__name__)
routes = web.RouteTableDef()
SCRIPT = Path(__file__).parent / "static" / "verify.js"
PROVENANCE_EXT = "https://fhirbridge.dev/fhir/StructureDefinition/entry-provenance"
CHECKPOINT_EXT = "https://fhirbridge.dev/fhir/StructureDefinition/ledger-checkpoint"


def trusted_keys(settings: Any) -> tuple[str | None, list[str], list[str]]:
    """``(ledger verifier key, witness verifier keys, problems)`` from the configuration. A key that does
    not parse, or of the wrong algorithm, is left out and named in ``problems`` (never its material)."""
    problems: list[str] = []
    log_key: str | None = None
    try:
        configured = settings.ledger.verifier_key()
    except OSError:
        configured = None
    if configured:
        try:
            verifier = _note.Verifier.from_text(configured.strip())
        except InvalidKey as exc:
            problems.append(f"the configured ledger public key is not usable: {exc}")
        else:
            if verifier.alg != _note.ALG_ED25519:
                problems.append("the configured ledger public key is not an Ed25519 note key")
            else:
                log_key = verifier.to_text()
    else:
        problems.append(
            "this service has no ledger public key configured (the .pub file beside the key file)"
        )
    witnesses: list[str] = []
    for i, text in enumerate(settings.ledger.witness_keys):
        try:
            w = _note.Verifier.from_text(text.strip())
        except InvalidKey as exc:
            problems.append(f"configured witness key {i + 1} is not usable: {exc}")
            continue
        if w.alg != _note.ALG_COSIGNATURE_V1:
            problems.append(f"configured witness key {i + 1} is not a cosignature (0x04) key")
            continue
        witnesses.append(w.to_text())
    return log_key, witnesses, problems


def _sub(ext: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    values: dict[str, Any] = {}
    proof: list[str] = []
    for part in ext.get("extension") or []:
        if not isinstance(part, dict):
            continue
        url = part.get("url")
        value = next((v for k, v in part.items() if k.startswith("value")), None)
        if url == "proofHash":
            proof.append(str(value))
        elif isinstance(url, str) and url not in values:
            values[url] = value
    return values, proof


def deliveries(item: dict[str, Any], checkpoint: int | None) -> list[dict[str, Any]]:
    """The proof material of each delivery of one ``$everything`` entry, as the browser reads it."""
    out: list[dict[str, Any]] = []
    for ext in item.get("extension") or []:
        if not isinstance(ext, dict) or ext.get("url") != PROVENANCE_EXT:
            continue
        values, proof = _sub(ext)
        d: dict[str, Any] = {
            "source_org": values.get("sourceOrg"),
            "bundle_sha256": values.get("bundleSha256"),
            "received_at": values.get("receivedAt"),
            "ledger_index": values.get("ledgerIndex"),
            "checkpoint": checkpoint,
        }
        if "ledgerEntry" in values or "treeSize" in values or proof:
            d.update(
                ledger_entry=values.get("ledgerEntry"),
                leaf_hash=values.get("leafHash"),
                tree_size=values.get("treeSize"),
                proof=proof,
            )
        out.append(d)
    return out


def _checkpoint_note(bundle: dict[str, Any]) -> str | None:
    for ext in (bundle.get("meta") or {}).get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == CHECKPOINT_EXT:
            value = next((v for k, v in ext.items() if k.startswith("value")), None)
            return value if isinstance(value, str) else None
    return None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@routes.get("/app/Patient/{id:(?!\\.+(?:/|$))[A-Za-z0-9\\-\\.]{1,64}}/proofs")
@public  # the session is the app's gate; the API checks the session's token on every read
async def proofs(request: web.Request) -> web.StreamResponse:
    """The patient's entries' proofs, the checkpoint(s) they are proven against and the trusted keys."""
    session = current_session(request)
    if session is None:
        return _error(401, "not signed in")
    pid = request.match_info["id"]
    checkpoints: list[str] = []
    entries: list[dict[str, Any]] = []
    notices: list[str] = []
    path: str | None = (
        f"/Patient/{pid}/$everything?{urlencode({'_count': EVERYTHING_COUNT, '_proof': 'true'})}"
    )
    read = 0
    while path is not None and read < MAX_ENTRIES:
        answer = await fhir_get(request, session.access_token, path)
        if answer.status == 401:
            request.app[SESSIONS].end(session.id)
            return _error(401, "the session has ended: sign in again")
        if answer.status != 200:
            return _error(answer.status if answer.status >= 400 else 502, answer.diagnostics())
        bundle = answer.body
        note = _checkpoint_note(bundle)
        cp: int | None = None
        if note is not None:
            if note not in checkpoints:
                checkpoints.append(note)
            cp = checkpoints.index(note)
        for item in bundle.get("entry") or []:
            resource = item.get("resource") or {}
            if (item.get("search") or {}).get("mode") == "outcome" or resource.get(
                "resourceType"
            ) == "OperationOutcome":
                for issue in resource.get("issue") or []:
                    text = issue.get("diagnostics")
                    if isinstance(text, str) and (
                        "proof" in text or "ledger" in text or "checkpoint" in text
                    ):
                        notices.append(text)
                continue
            entries.append(
                {
                    "key": f"{resource.get('resourceType')}/{resource.get('id')}",
                    "deliveries": deliveries(item, cp),
                }
            )
        read += len(bundle.get("entry") or [])
        nxt = next((lk.get("url") for lk in bundle.get("link") or [] if lk.get("relation") == "next"), None)
        path = path_of(str(nxt)) if nxt else None
    log_key, witnesses, problems = trusted_keys(request.app[SETTINGS])
    return web.json_response(
        {
            "patient": pid,
            "origin": request.app[SETTINGS].ledger.origin,
            "log_key": log_key,
            "witness_keys": witnesses,
            "key_problems": problems,
            "checkpoints": checkpoints,
            "entries": entries,
            "notices": list(dict.fromkeys(notices)),
            "truncated": path is not None,
        }
    )


@routes.get("/app/static/verify.js")
@public
async def script(request: web.Request) -> web.StreamResponse:
    """The verifier (vanilla JavaScript, no build step)."""
    return web.Response(body=SCRIPT.read_bytes(), content_type="text/javascript", charset="utf-8")
