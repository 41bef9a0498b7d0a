"""Regenerate docs/img/ui-*.png, the screenshots in docs/ui.md, from the browser tests' data.

    .venv/bin/python -m tests.browser.screenshots [OUT_DIR]      # default: docs/img

The pages are the browser tests' own: the services of :mod:`tests.browser.service` (the linked person,
the typo pair) and :mod:`tests.browser.test_verify` (a signed, witnessed ledger), all synthetic, no PHI,
each started on a loopback port in a temporary directory and stopped by its PID. Debian's Chromium
(``/usr/bin/chromium``), headless, 1280 px wide; each picture is the viewport (1280 x 800) scrolled to
what it shows, so the files stay small.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.browser.callback import CallbackListener
from tests.browser.conftest import CHROMIUM
from tests.browser.service import LINKED_ST_MARY, TYPO_RIVERSIDE, TYPO_ST_MARY, BridgeService
from tests.browser.test_app import sign_in_to_app
from tests.browser.test_review import STEWARD
from tests.browser.test_review import sign_in as steward_sign_in
from tests.browser.test_verify import LedgerBridge, open_patient, verify

OUT = Path(__file__).resolve().parents[2] / "docs" / "img"
WIDTH, HEIGHT = 1280, 800
PATIENT = f"/app/Patient/{LINKED_ST_MARY}"
PAIR = f"/app/review/{TYPO_ST_MARY}/{TYPO_RIVERSIDE}"


def summary(page: Any, bridge: BridgeService) -> None:
    sign_in_to_app(page, bridge, PATIENT)


def results(page: Any, bridge: BridgeService) -> None:
    sign_in_to_app(page, bridge, PATIENT)
    page.goto(bridge.url(PATIENT + "?type=results"))
    figure = page.locator("figure.trend", has=page.locator("figcaption", has_text="Potassium"))
    figure.locator("svg.trend-chart").wait_for()
    page.evaluate("document.getElementById('labs').scrollIntoView()")


def drawer(page: Any, bridge: BridgeService) -> None:
    sign_in_to_app(page, bridge, PATIENT)
    prov = page.locator("section#encounters tbody tr").first.locator("details.prov")
    prov.locator("summary").click()
    page.evaluate("document.getElementById('encounters').scrollIntoView()")


def verified(page: Any, service: BridgeService) -> None:
    assert isinstance(service, LedgerBridge)
    open_patient(page, service)
    verify(page)
    page.evaluate("document.getElementById('verify').scrollIntoView()")


def queue(page: Any, bridge: BridgeService) -> None:
    steward_sign_in(page, bridge, STEWARD, "/app/review")


def pair(page: Any, bridge: BridgeService) -> None:
    steward_sign_in(page, bridge, STEWARD, PAIR)
    page.locator("svg.waterfall").scroll_into_view_if_needed()


#: file name, the service it needs ("bridge" or "ledger"), and how to bring the page to what it shows
SHOTS: list[tuple[str, str, Callable[[Any, BridgeService], None]]] = [
    ("ui-summary.png", "bridge", summary),
    ("ui-results.png", "bridge", results),
    ("ui-drawer.png", "bridge", drawer),
    ("ui-verify.png", "ledger", verified),
    ("ui-queue.png", "bridge", queue),
    ("ui-pair.png", "bridge", pair),
]


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="fhirbridge-shots-") as tmp:
        listener = CallbackListener()
        services = {
            "bridge": BridgeService(Path(tmp) / "bridge", redirect_uri=listener.redirect_uri),
            "ledger": LedgerBridge(Path(tmp) / "ledger", redirect_uri=listener.redirect_uri),
        }
        try:
            for svc in services.values():
                svc.root.mkdir()
                svc.start()
            args = ["--no-sandbox"] if os.geteuid() == 0 else []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
                try:
                    for name, which, bring in SHOTS:
                        context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
                        context.set_default_timeout(30_000)
                        try:
                            page = context.new_page()
                            bring(page, services[which])
                            page.wait_for_timeout(200)  # the last scroll painted
                            page.screenshot(path=str(out / name))
                        finally:
                            context.close()
                        print(f"{out / name}: {(out / name).stat().st_size} bytes")
                finally:
                    browser.close()
        finally:
            for svc in services.values():
                svc.stop()
            listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
