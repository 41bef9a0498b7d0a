""" "Verify" on the patient page (issue 24, browser test 3; bridge/service/ui/static/verify.js) in Chromium.

The service here has a real ledger: a signing key (its ``.pub`` beside it, which the service names to
the browser), a witness whose cosignature the checkpoint carries, 20 unrelated entries (checkpoint 20),
then the patient's two bundles (checkpoint 22, cosigned), then a bundle logged after that checkpoint,
and one bundle that was never logged. Every check is the browser's own (WebCrypto); the tests alter
what travels (``page.route``) or what the browser remembers (``localStorage``) and expect FAILED.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from bridge.config import Settings
from bridge.stores.index.store import IncomingBundle, IndexStore
from bridge.stores.ledger import open_ledger
from ledger import checkpoint as _checkpoint
from ledger import note as _note
from ledger.entry import LedgerEntry
from tests.browser.callback import CallbackListener
from tests.browser.service import BridgeService

pytestmark = pytest.mark.browser

PID = "verify-p"
CLINICIAN = "clinician"
STORE_PREFIX = "fhirbridge.ledger.checkpoint:"
PENDING = "pending (logged after the latest checkpoint)"


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _condition(cid: str, code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f"Patient/{PID}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}], "text": text},
        "onsetDateTime": "2020-05-01",
    }


#: (bundle name, sending organisation, its resources); all but "v-never" are logged
BUNDLES: list[tuple[str, str, list[dict[str, Any]]]] = [
    (
        "v-one",
        "st-mary",
        [
            {"resourceType": "Patient", "id": PID, "name": [{"family": "Verifiable", "given": ["Vera"]}]},
            _condition("v-c1", "44054006", "Diabetes type 2"),
        ],
    ),
    ("v-two", "riverside", [_condition("v-c2", "38341003", "Hypertension")]),
    ("v-late", "st-mary", [_condition("v-c3", "195967001", "Asthma")]),
    ("v-never", "st-mary", [_condition("v-c4", "73211009", "Diabetes mellitus")]),
]


def _entry(name: str, org: str, offset: int) -> LedgerEntry:
    return LedgerEntry(sha(name), org, "browser", "1", "fhir.bundles", 0, offset, "2026-03-11T00:00:00Z")


def key_with_plus(name: str, alg: int = _note.ALG_ED25519) -> tuple[str, str]:
    """A key pair whose verifier key's base64 holds a '+' (the key's own separator): parsed as one key."""
    while True:
        skey, vkey = _note.generate_key(name, alg)
        if "+" in vkey.split("+", 2)[2]:
            return skey, vkey


class LedgerBridge(BridgeService):
    """The browser tests' service, plus a ledger with real entries, its key files and a witness.

    :meth:`BridgeService.start` registers the identities after writing the index and before starting
    ``serve``; the ledger is written at that point too (the environment is known by then)."""

    skey: str = ""
    vkey: str = ""

    def _register(self) -> None:
        super()._register()
        wskey, wvkey = key_with_plus("witness.browser.test", _note.ALG_COSIGNATURE_V1)
        self.env["FHIRBRIDGE_LEDGER_WITNESS_KEYS"] = wvkey
        settings = Settings.from_env(self.env)
        self.skey, self.vkey = key_with_plus(settings.ledger.origin)
        assert settings.ledger.key_file is not None
        settings.ledger.key_file.write_text(self.skey + "\n")
        settings.ledger.key_file.with_suffix(".pub").write_text(self.vkey + "\n")
        index = IndexStore.open(settings.stores.index_url)
        try:
            index.apply(
                [
                    IncomingBundle(
                        {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]},
                        sha(name),
                        org,
                        f"{org}|{PID}",
                        "fhir.bundles",
                        0,
                        i,
                        f"2026-03-1{i}T00:00:00.000Z",
                    )
                    for i, (name, org, resources) in enumerate(BUNDLES, start=1)
                ]
            )
        finally:
            index.close()
        led = open_ledger(
            settings.ledger.url,
            origin=settings.ledger.origin,
            signer_key=self.skey,
            checkpoint_every=1_000_000,
            checkpoint_interval_ms=3_600_000,  # only the first append and checkpoint_now() sign
            witness_keys=[wvkey],
        )
        try:
            led.append([_entry(f"filler-{i}", "elsewhere", 100 + i) for i in range(20)])  # signs 20
            led.append([_entry(name, org, i) for i, (name, org, _) in enumerate(BUNDLES[:2], start=1)])
            note = led.checkpoint_now()
            assert note is not None and note.split("\n")[1] == "22"
            assert led.add_cosignatures(note + _checkpoint.cosign(note, self.vkey, wskey)) == 1
            led.append([_entry("v-late", "st-mary", 3)])  # after the latest checkpoint
        finally:
            led.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, callback: CallbackListener) -> Iterator[LedgerBridge]:
    svc = LedgerBridge(tmp_path_factory.mktemp("browser-verify"), redirect_uri=callback.redirect_uri)
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return str(resp.read().decode())


def checkpoint_size(service: LedgerBridge) -> int:
    return int(get_text(service.url("/ledger/checkpoint")).split("\n")[1])


def open_patient(page: Any, service: LedgerBridge) -> None:
    path = f"/app/Patient/{PID}"
    page.goto(service.url(path))
    assert page.url.startswith(service.url("/auth/authorize?")), page.url
    page.fill("#username", CLINICIAN)
    page.fill("#password", service.passwords[CLINICIAN])
    page.click("button[type=submit]")
    page.wait_for_url(service.url(path))
    page.wait_for_selector("#verify-button")


def verify(page: Any) -> str:
    """Click Verify, wait for the outcome; the page-level status text."""
    page.click("#verify-button")
    page.wait_for_function(
        "() => { const s = document.getElementById('verify-status');"
        " return s && s.dataset.verifyState && s.dataset.verifyState !== 'running'; }"
    )
    return str(page.locator("#verify-status").inner_text())


def row_state(page: Any, key: str) -> str:
    return str(page.locator(f'tr[data-entry="{key}"] .verify-state').inner_text()).strip()


def stored(page: Any) -> dict[str, str]:
    return dict(page.evaluate("() => Object.fromEntries(Object.entries(localStorage))"))


def test_verify_shows_verified_against_the_ledgers_checkpoint(page: Any, service: LedgerBridge) -> None:
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    open_patient(page, service)
    status = verify(page)
    n = checkpoint_size(service)
    assert n == 22
    assert page.locator("#verify-status").get_attribute("data-verify-state") == "partial"
    assert f"verified against checkpoint {n}" in status
    assert f"Checkpoint {n}: signed by the ledger key" in status
    assert "Cosigned by 1 of the 1 witness this service names (witness.browser.test)" in status
    assert f"Ledger key: {service.vkey}" in status
    assert "FAILED" not in status.replace("0 FAILED", "")
    for key in ("Condition/v-c1", "Condition/v-c2"):
        assert row_state(page, key) == f"Ledger: verified against checkpoint {n}"
    assert row_state(page, "Condition/v-c4") == "Ledger: not in the ledger"
    # what the proof covers, and what it does not, in words on the page
    text = page.locator("#verify").inner_text()
    assert "logged unchanged" in text
    assert "that a bundle's content is true" in text and "nor that nothing was left out" in text
    # the browser remembers the checkpoint note, and nothing else
    note = get_text(service.url("/ledger/checkpoint"))
    assert stored(page) == {STORE_PREFIX + page.evaluate("location.origin"): note}
    assert not [c for c in console if "Content Security Policy" in c], console
    assert not [f for f in failed if not f.endswith("/favicon.ico")], failed


def test_an_entry_logged_after_the_checkpoint_is_pending(page: Any, service: LedgerBridge) -> None:
    query = urllib.parse.urlencode({"bundle_sha256": sha("v-late"), "source_org": "st-mary"})
    proved = json.loads(get_text(service.url(f"/ledger/prove?{query}")))
    assert proved["index"] >= checkpoint_size(service) and proved["proof"] is None  # the premise
    open_patient(page, service)
    status = verify(page)
    assert row_state(page, "Condition/v-c3") == f"Ledger: {PENDING}"
    assert page.locator('tr[data-entry="Condition/v-c3"] .verify-state').get_attribute(
        "data-verify-state"
    ) == ("pending")
    assert f"1 {PENDING}" in status and "1 not in the ledger" in status


def _flip(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def test_a_proof_hash_altered_in_flight_fails(page: Any, service: LedgerBridge) -> None:
    altered: list[str] = []

    def tamper(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        for entry in body["entries"]:
            if entry["key"] == "Condition/v-c1":
                delivery = entry["deliveries"][0]
                delivery["proof"][2] = _flip(delivery["proof"][2])
                altered.append(entry["key"])
        route.fulfill(response=response, json=body)

    page.route(f"**/app/Patient/{PID}/proofs", tamper)
    open_patient(page, service)
    status = verify(page)
    assert altered == ["Condition/v-c1"]
    n = checkpoint_size(service)
    assert status.startswith("FAILED (1 of 5 entries: the inclusion proof does not lead to the root")
    assert page.locator("#verify-status").get_attribute("data-verify-state") == "failed"
    assert row_state(page, "Condition/v-c1") == (
        f"Ledger: FAILED (the inclusion proof does not lead to the root of checkpoint {n})"
    )
    assert row_state(page, "Condition/v-c2") == f"Ledger: verified against checkpoint {n}"


def test_a_checkpoint_signed_by_another_key_fails(page: Any, service: LedgerBridge) -> None:
    """The key the browser trusts is the service's configured one, not whatever signed the note."""
    other_skey, _ = _note.generate_key("fhirbridge.example/ledger")

    def resign(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        note = body["checkpoints"][0]
        text = note[: note.rindex("\n\n") + 1]
        body["checkpoints"][0] = _note.sign_note(text, [other_skey])
        route.fulfill(response=response, json=body)

    page.route(f"**/app/Patient/{PID}/proofs", resign)
    open_patient(page, service)
    status = verify(page)
    assert status.startswith("FAILED (the checkpoint is not signed by the ledger key this service names)")
    assert row_state(page, "Condition/v-c1").startswith("Ledger: FAILED (the checkpoint is not signed")
    assert stored(page) == {}  # nothing remembered from a failed verification


def test_a_remembered_earlier_checkpoint_is_checked_for_consistency(page: Any, service: LedgerBridge) -> None:
    open_patient(page, service)
    earlier = get_text(service.url("/ledger/checkpoint?size=20"))
    key = STORE_PREFIX + page.evaluate("location.origin")
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [key, earlier])
    status = verify(page)
    assert "Consistent with checkpoint 20, which this browser saw earlier" in status
    assert stored(page) == {key: get_text(service.url("/ledger/checkpoint"))}  # moved on to 22


def test_a_rewritten_log_fails(page: Any, service: LedgerBridge) -> None:
    """A checkpoint the browser saw earlier, signed by the ledger's own key, that the current log does
    not extend (another root at size 20): the log was rewritten."""
    open_patient(page, service)
    forged = _checkpoint.sign(
        "fhirbridge.example/ledger", 20, hashlib.sha256(b"another history").digest(), service.skey
    )
    key = STORE_PREFIX + page.evaluate("location.origin")
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [key, forged])
    status = verify(page)
    assert status.startswith(
        "FAILED (the log was rewritten: checkpoint 22 is not consistent with checkpoint 20 seen earlier"
    )
    assert row_state(page, "Condition/v-c1").startswith("Ledger: FAILED (the log was rewritten")
    assert stored(page) == {key: forged}  # the evidence stays; the new checkpoint is not adopted


def test_without_ed25519_the_page_says_nothing_was_verified(page: Any, service: LedgerBridge) -> None:
    page.add_init_script(
        """(() => {
          const subtle = crypto.subtle, importKey = subtle.importKey.bind(subtle);
          subtle.importKey = (format, key, alg, ...rest) =>
            (alg && (alg.name || alg) === "Ed25519")
              ? Promise.reject(new DOMException("Ed25519 is not supported", "NotSupportedError"))
              : importKey(format, key, alg, ...rest);
        })();"""
    )
    open_patient(page, service)
    status = verify(page)
    assert status.startswith("Not verified: this browser's WebCrypto does not support Ed25519 signatures")
    assert page.locator("#verify-status").get_attribute("data-verify-state") == "unsupported"
    assert "verified against" not in page.locator("main").inner_text()
    assert row_state(page, "Condition/v-c1").startswith("Ledger: not verified (")
