"""The embedded authorization server's sign-in, as a SMART app's user goes through it in Chromium:
authorization request with PKCE, the form, the redirect to the app with the code, the code exchanged
for a token the FHIR API accepts; a wrong password; the page's headers, cookie and framing; markup
carried by the request or typed into the form stays text.

At most two failed sign-ins in the whole session: the server blocks every sign-in from one address
after five (docs/auth.md), and every test here signs in from 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import urllib.parse
from dataclasses import dataclass
from typing import Any

import pytest

from tests.browser.callback import CallbackListener
from tests.browser.service import (
    APP,
    MARKUP_NAME,
    PATIENT_A,
    PATIENT_A_FAMILY,
    PATIENT_B,
    BridgeService,
    get_json,
    http_status,
    post_form,
)

pytestmark = pytest.mark.browser

PATIENT_SCOPE = "openid fhirUser launch/patient patient/*.rs"


@dataclass(frozen=True)
class AuthRequest:
    """One authorization request: its URL, and what the app keeps to check the answer."""

    url: str
    state: str
    verifier: str


def auth_request(bridge: BridgeService, scope: str = PATIENT_SCOPE, state: str | None = None) -> AuthRequest:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = state or secrets.token_urlsafe(16)
    query = urllib.parse.urlencode(
        {
            "response_type": "code",
            "client_id": APP,
            "redirect_uri": bridge.redirect_uri,
            "scope": scope,
            "state": state,
            "aud": bridge.base,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    return AuthRequest(bridge.url(f"/auth/authorize?{query}"), state, verifier)


def sign_in(page: Any, user: str, password: str) -> None:
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("button[type=submit]")


def exchange(bridge: BridgeService, request: AuthRequest, code: str) -> tuple[int, Any]:
    return post_form(
        bridge.url("/auth/token"),
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": bridge.redirect_uri,
            "client_id": APP,
            "code_verifier": request.verifier,
        },
    )


def test_patient_signs_in_and_the_code_buys_a_token(
    page: Any, bridge: BridgeService, callback: CallbackListener
) -> None:
    request = auth_request(bridge)
    page.goto(request.url)
    assert page.locator("h1").inner_text() == "Sign in"
    assert APP in page.locator("body").inner_text()  # the form names the app asking
    sign_in(page, "patient", bridge.passwords["patient"])
    page.wait_for_url(f"{callback.redirect_uri}?**")

    assert page.locator("#done").is_visible()
    answer = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)
    assert answer["state"] == [request.state]
    assert set(answer) == {"code", "state"}
    assert callback.callbacks(request.state) == [answer]  # the app got one redirect, this one

    status, body = exchange(bridge, request, answer["code"][0])
    assert status == 200, body
    assert body["token_type"].lower() == "bearer"
    assert body["patient"] == PATIENT_A
    assert set(body["scope"].split()) == set(PATIENT_SCOPE.split())
    token = body["access_token"]
    patient = get_json(bridge.url(f"/Patient/{PATIENT_A}"), token)
    assert patient["name"][0]["family"] == PATIENT_A_FAMILY
    assert http_status(bridge.url(f"/Patient/{PATIENT_B}"), token) == 403  # bound to the signed-in patient

    status, again = exchange(bridge, request, answer["code"][0])  # one use only
    assert (status, again["error"]) == (400, "invalid_grant")


def test_wrong_verifier_spends_the_code(page: Any, bridge: BridgeService, callback: CallbackListener) -> None:
    request = auth_request(bridge)
    page.goto(request.url)
    sign_in(page, "patient", bridge.passwords["patient"])
    page.wait_for_url(f"{callback.redirect_uri}?**")
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)["code"][0]

    forged = AuthRequest(request.url, request.state, secrets.token_urlsafe(48))
    status, body = exchange(bridge, forged, code)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = exchange(bridge, request, code)
    assert (status, body["error"]) == (400, "invalid_grant")


def test_wrong_password_shows_an_error_and_sends_no_code(
    page: Any, bridge: BridgeService, callback: CallbackListener
) -> None:
    request = auth_request(bridge)
    page.goto(request.url)
    sign_in(page, "patient", bridge.passwords["patient"] + "-wrong")
    alert = page.get_by_role("alert")
    alert.wait_for()

    assert alert.inner_text() == "The user id or the password is wrong."
    assert urllib.parse.urlsplit(page.url).path == "/auth/authorize"
    assert "code=" not in page.url
    assert page.locator("#username").input_value() == "patient"
    assert page.locator("#password").input_value() == ""
    assert callback.callbacks(request.state) == []

    # the form shown again still works: the right password now gets the code
    sign_in(page, "patient", bridge.passwords["patient"])
    page.wait_for_url(f"{callback.redirect_uri}?**")
    assert len(callback.callbacks(request.state)) == 1


def test_sign_in_page_headers_and_cookie(page: Any, bridge: BridgeService) -> None:
    response = page.goto(auth_request(bridge).url)
    assert response is not None and response.status == 200
    headers = response.headers
    assert headers["cache-control"] == "no-store"
    csp = {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split(";") if d.strip()}
    assert csp["default-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert "script-src" not in csp  # default-src 'none' covers script: the page runs none
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"

    (cookie,) = [c for c in page.context.cookies() if c["name"] == "fhirbridge_signin"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/auth/authorize"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: out of a script's reach


def test_sign_in_page_cannot_be_framed(page: Any, bridge: BridgeService, callback: CallbackListener) -> None:
    src = auth_request(bridge).url
    callback.pages["/framer"] = f'<!doctype html><iframe id="f" src="{src.replace("&", "&amp;")}"></iframe>'
    with page.expect_response(lambda r: r.url.startswith(bridge.url("/auth/authorize"))) as answer:
        page.goto(callback.base + "/framer")
    assert answer.value.status == 200  # the server answered; the browser refused to show it
    page.wait_for_load_state("load")
    (frame,) = [f for f in page.frames if f != page.main_frame]
    assert frame.locator("#password").count() == 0
    assert not frame.url.startswith(bridge.base)


def test_markup_in_the_state_is_text_and_comes_back_unchanged(
    page: Any, bridge: BridgeService, callback: CallbackListener, dialogs: list[str]
) -> None:
    request = auth_request(bridge, state=f'"><b id="injected">x</b>{MARKUP_NAME}')
    page.goto(request.url)
    assert page.locator("input[name=state]").input_value() == request.state
    assert page.locator("#injected, img").count() == 0
    sign_in(page, "patient", bridge.passwords["patient"])
    page.wait_for_url(f"{callback.redirect_uri}?**")
    assert len(callback.callbacks(request.state)) == 1
    assert dialogs == []
    assert page.evaluate("window.__xss") is None


def test_markup_typed_as_the_user_id_is_shown_back_as_text(
    page: Any, bridge: BridgeService, callback: CallbackListener, dialogs: list[str]
) -> None:
    request = auth_request(bridge)
    page.goto(request.url)
    sign_in(page, MARKUP_NAME, "not-the-password")
    page.get_by_role("alert").wait_for()
    assert page.locator("#username").input_value() == MARKUP_NAME
    assert page.locator("img").count() == 0
    assert dialogs == []
    assert page.evaluate("window.__xss") is None
    assert callback.callbacks(request.state) == []
