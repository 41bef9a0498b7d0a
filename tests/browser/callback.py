"""A tiny HTTP listener on a loopback port standing in for a SMART app: its redirect URI, and pages of
another origin (one that frames the sign-in form, for instance).

Every request is recorded (path and query), so a test can tell whether, and with what, the
authorization server redirected the browser to the app.
"""

from __future__ import annotations

import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CALLBACK_PATH = "/callback"


class CallbackListener:
    """Listens on ``127.0.0.1`` on a port of its own until :meth:`close`; ``pages`` maps a path to the
    HTML served there (the callback path answers a fixed page)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.pages: dict[str, str] = {}
        self._lock = threading.Lock()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                with listener._lock:
                    listener.requests.append((parts.path, urllib.parse.parse_qs(parts.query)))
                    page = listener.pages.get(parts.path)
                if parts.path == CALLBACK_PATH:
                    page = "<!doctype html><title>callback</title><p id=done>the app got the redirect</p>"
                body = (page or "not found").encode()
                self.send_response(200 if page is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.redirect_uri = self.base + CALLBACK_PATH
        self._thread = threading.Thread(target=self._server.serve_forever, name="callback", daemon=True)
        self._thread.start()

    def callbacks(self, state: str) -> list[dict[str, list[str]]]:
        """The queries of the redirects to the callback that carried ``state``."""
        with self._lock:
            return [q for path, q in self.requests if path == CALLBACK_PATH and q.get("state") == [state]]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
