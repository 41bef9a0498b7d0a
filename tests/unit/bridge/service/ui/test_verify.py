"""``GET /app/Patient/{id}/proofs`` (bridge/service/ui/verify.py): the proof material of the patient
page's entries, read with the user's token, and the keys the browser must trust, from the service's
configuration. The browser's own checks are in tests/browser/test_verify.py; here the material is
checked with the ledger's Python verifiers, so a reshaping mistake fails."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.context import Backend
from bridge.service.ui.login import SESSIONS
from bridge.service.ui.security import CONTENT_SECURITY_POLICY
from bridge.service.ui.session import SESSION_COOKIE
from bridge.service.ui.verify import trusted_keys
from bridge.stores.index.store import IncomingBundle, IndexStore
from bridge.stores.ledger import open_configured_ledger
from ledger import checkpoint as _checkpoint
from ledger import merkle
from ledger import note as _note
from ledger.entry import LedgerEntry
from tests.support.auth import token

ORIGIN = "fhirbridge.test/ledger"


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _bundle(name: str, org: str, resources: list[dict[str, Any]], offset: int) -> IncomingBundle:
    return IncomingBundle(
        {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]},
        sha(name),
        org,
        f"{org}|1",
        "fhir.bundles",
        0,
        offset,
        "2026-03-11T00:00:00.000Z",
    )


def _entry(name: str, org: str, offset: int) -> LedgerEntry:
    return LedgerEntry(sha(name), org, "test", "1", "fhir.bundles", 0, offset, "2026-03-11T00:00:00Z")


def _condition(cid: str, code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": "Patient/pa"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}], "text": text},
        "onsetDateTime": "2020-05-01",
    }


class Env:
    def __init__(self, client: Any, app: web.Application, settings: Settings, vkey: str, wkey: str) -> None:
        self.client, self.app, self.settings = client, app, settings
        self.vkey, self.wkey = vkey, wkey

    def sign_in(self, access: str | None = None) -> str:
        access = access or token(self.settings, subject="dr-who", organization="st-mary")
        session = self.app[SESSIONS].create(access, 4102444800.0, "dr-who", "Practitioner/7")
        self.client.session.cookie_jar.update_cookies({SESSION_COOKIE: session.id})
        return session.id


def make_settings(tmp_path: Path, witness_vkey: str) -> Settings:
    return Settings.from_env(
        {
            "FHIRBRIDGE_DATA_DIR": str(tmp_path),
            "FHIRBRIDGE_LEDGER_ORIGIN": ORIGIN,
            "FHIRBRIDGE_CHECKPOINT_EVERY": "1000000",
            "FHIRBRIDGE_CHECKPOINT_INTERVAL_MS": "3600000",
            "FHIRBRIDGE_LEDGER_WITNESS_KEYS": witness_vkey,
        }
    )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    wskey, wvkey = _note.generate_key("witness.test", _note.ALG_COSIGNATURE_V1)
    settings = make_settings(tmp_path, wvkey)
    skey, vkey = _note.generate_key(ORIGIN)
    assert settings.ledger.key_file is not None
    settings.ledger.key_file.write_text(skey + "\n")
    settings.ledger.key_file.with_suffix(".pub").write_text(vkey + "\n")
    index = IndexStore.open(settings.stores.index_url)
    index.apply(
        [
            _bundle(
                "one",
                "st-mary",
                [
                    {"resourceType": "Patient", "id": "pa", "name": [{"family": "DOE"}]},
                    _condition("c1", "44054006", "Diabetes"),
                ],
                1,
            ),
            _bundle("two", "riverside", [_condition("c2", "38341003", "Hypertension")], 2),
            _bundle("late", "st-mary", [_condition("c3", "195967001", "Asthma")], 3),
            _bundle("never", "st-mary", [_condition("c4", "73211009", "Diabetes mellitus")], 4),
        ]
    )
    index.close()
    led = open_configured_ledger(settings, signer_key=skey)
    led.append([_entry(f"filler-{i}", "elsewhere", 100 + i) for i in range(5)])
    led.append([_entry("one", "st-mary", 1), _entry("two", "riverside", 2)])
    note = led.checkpoint_now()
    assert note is not None
    led.add_cosignatures(note + _checkpoint.cosign(note, vkey, wskey))
    led.append([_entry("late", "st-mary", 3)])  # after the checkpoint: pending
    led.close()
    app = create_app(settings, Backend(settings, ledger_factory=lambda: open_configured_ledger(settings)))
    async with TestClient(TestServer(app)) as client:
        yield Env(client, app, settings, vkey, wvkey)


async def _proofs(env: Env, pid: str = "pa") -> tuple[int, dict[str, Any]]:
    resp = await env.client.get(f"/app/Patient/{pid}/proofs")
    return resp.status, await resp.json()


async def test_proofs_need_a_session(env: Env) -> None:
    status, body = await _proofs(env)
    assert status == 401
    assert body == {"error": "not signed in"}


async def test_the_material_verifies_with_the_configured_keys(env: Env) -> None:
    env.sign_in()
    status, body = await _proofs(env)
    assert status == 200
    # the trusted keys are the configuration's, exactly
    assert body["log_key"] == env.vkey
    assert body["witness_keys"] == [env.wkey]
    assert body["key_problems"] == []
    assert body["origin"] == ORIGIN
    (note,) = body["checkpoints"]
    cp = _checkpoint.open(note, [env.vkey, env.wkey])
    assert cp.size == 7
    assert set(cp.signers) == {ORIGIN, "witness.test"}  # the cosignature travels with the note
    by_key = {e["key"]: e["deliveries"] for e in body["entries"]}
    assert set(by_key) == {"Patient/pa", "Condition/c1", "Condition/c2", "Condition/c3", "Condition/c4"}
    for key in ("Patient/pa", "Condition/c1", "Condition/c2"):
        (d,) = by_key[key]
        entry = base64.b64decode(d["ledger_entry"])
        leaf = merkle.leaf_hash(entry)
        assert base64.b64decode(d["leaf_hash"]) == leaf
        assert LedgerEntry.from_canonical(entry).bundle_sha256 == d["bundle_sha256"]
        assert LedgerEntry.from_canonical(entry).source_org == d["source_org"]
        assert d["tree_size"] == cp.size and d["checkpoint"] == 0
        proof = [base64.b64decode(h) for h in d["proof"]]
        assert proof  # a 7-leaf tree: never an empty path
        merkle.verify_inclusion(leaf, d["ledger_index"], cp.size, proof, cp.root_hash)
    (late,) = by_key["Condition/c3"]
    assert late["ledger_index"] == 7 and "proof" not in late and "tree_size" not in late
    (never,) = by_key["Condition/c4"]
    assert never["ledger_index"] is None and "proof" not in never
    assert any("after the latest checkpoint" in n or "logged after" in n for n in body["notices"]), body[
        "notices"
    ]


async def test_an_unknown_session_token_ends_the_session(env: Env) -> None:
    sid = env.sign_in("not-a-token")
    status, body = await _proofs(env)
    assert status == 401
    assert "sign in again" in body["error"]
    assert env.app[SESSIONS].get(sid) is None


async def test_a_patient_outside_the_token_is_refused(env: Env) -> None:
    env.sign_in(token(env.settings, "user/Consent.rs", subject="dr-who"))  # reads no type of $everything
    status, body = await _proofs(env)
    assert status == 403
    assert body["error"]


def test_keys_come_from_the_configuration_only(tmp_path: Path) -> None:
    skey, vkey = _note.generate_key("other.test")
    settings = make_settings(tmp_path, vkey)  # a log key given as a witness key: refused
    log_key, witnesses, problems = trusted_keys(settings)
    assert log_key is None and witnesses == []
    assert any("no ledger public key" in p for p in problems)
    assert any("not a cosignature" in p for p in problems)
    assert settings.ledger.key_file is not None
    settings.ledger.key_file.with_suffix(".pub").write_text("nonsense+00000000+AAAA\n")
    log_key, _, problems = trusted_keys(settings)
    assert log_key is None and any("not usable" in p for p in problems)
    assert skey not in " ".join(problems)


async def test_the_script_is_served_and_loaded_by_the_patient_page(env: Env) -> None:
    resp = await env.client.get("/app/static/verify.js")
    assert resp.status == 200
    assert resp.content_type == "text/javascript"
    assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    text = await resp.text()
    assert text == (Path(__file__).parents[5] / "bridge/service/ui/static/verify.js").read_text()
    assert "crypto.subtle" in text and "localStorage" in text
    env.sign_in()
    page = await (await env.client.get("/app/Patient/pa")).text()
    assert '<script src="/app/static/verify.js" defer></script>' in page
    assert 'data-entry="Condition/c1"' in page and 'data-entry="Condition/c3"' in page
