"""Browser tests: Debian's Chromium, headless, driven by Playwright's sync API in plain pytest.

* ``bridge``: one ``fhirbridge serve`` per session (:class:`tests.browser.service.BridgeService`) over
  two patients, with the demo's users (fresh passwords) and a public SMART app whose redirect URI is
  ``callback``'s; stopped by its PID.
* ``callback``: the app's side, a loopback HTTP listener that records every redirect it gets.
* ``chromium``: the browser, launched by path from ``/usr/bin/chromium`` (``make test`` installs the
  ``chromium`` package); Playwright never downloads a browser of its own. ``--no-sandbox`` only as
  root, where Chromium refuses to start with its sandbox.
* ``page``: a page in a new browser context per test (no cookies shared between tests); ``dialogs``
  lists the messages of every JavaScript dialog it opened.

These tests run in a pytest process of their own (``make test`` runs ``pytest tests/browser`` after
the rest, which it runs with ``--ignore=tests/browser``). Plain pytest, not pytest-playwright, because
that plugin and the suite's ``asyncio_mode = "auto"`` do not mix, and ``-p no:asyncio`` is refused by
``--strict-config`` (the pytest-asyncio options in pyproject.toml become unknown). Playwright's sync API
needs no running event loop, and no test here is a coroutine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.callback import CallbackListener
from tests.browser.service import BridgeService

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def callback() -> Iterator[CallbackListener]:
    listener = CallbackListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture(scope="session")
def bridge(tmp_path_factory: pytest.TempPathFactory, callback: CallbackListener) -> Iterator[BridgeService]:
    service = BridgeService(tmp_path_factory.mktemp("browser-serve"), redirect_uri=callback.redirect_uri)
    try:
        service.start()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):  # said loudly: these tests never skip
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's package (`apt-get install -y chromium`; `make test` does it)"
        )
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context()
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def dialogs(page: Any) -> list[str]:
    """The messages of the JavaScript dialogs (alert, confirm, prompt) that ``page`` opened, dismissed."""
    seen: list[str] = []

    def on_dialog(dialog: Any) -> None:
        seen.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    return seen
