"""Liveness, readiness and metrics of a long-running process that has no web server of its own.

The consumers serve ``/livez``, ``/readyz`` and ``/metrics`` on one port (``--metrics-port``), from a
thread of their own, so that Kubernetes probes and Prometheus see them (docs/deploy.md):

* ``/livez``: 200 while the process's main loop turns (it called :meth:`Health.beat` within
  ``stale_after`` seconds). It never asks Kafka or the database: a broker outage must not make the
  orchestrator restart every consumer, which would only add rebalances to the outage.
* ``/readyz``: 200 when the process does its job or stands by to take it over (a ledger standby);
  503 with the failing check otherwise (starting, a dependency unreachable, stopping).
* ``/metrics``: Prometheus text format of the default registry.

Answers are small JSON documents without identifiers of patients or records.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.logging import get_logger

log = get_logger(__name__)

#: a readiness check: ``(ok, detail)``; ``detail`` is a short word or phrase, never PHI
Check = Callable[[], tuple[bool, str]]


class Health:
    """What ``/livez`` and ``/readyz`` report; the process updates it, the HTTP thread reads it."""

    def __init__(self, stale_after: float = 60.0) -> None:
        self.stale_after = stale_after
        self._beat = time.monotonic()
        self.state = "starting"  # starting | waiting (for a database) | standby | running | stopping
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()

    def beat(self) -> None:
        """The main loop turned."""
        self._beat = time.monotonic()

    def set_state(self, state: str) -> None:
        self.state = state
        self.beat()

    def add_check(self, name: str, check: Check) -> None:
        with self._lock:
            self._checks[name] = check

    def live(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self._beat
        return age <= self.stale_after, {"state": self.state, "loop_age_s": round(age, 1)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        live, body = self.live()
        checks: dict[str, str] = {}
        ok = live and self.state in ("running", "standby")
        if self.state == "running":
            with self._lock:
                items = list(self._checks.items())
            for name, check in items:
                try:
                    passed, detail = check()
                except Exception as exc:  # a check that fails to run is a failed check
                    passed, detail = False, type(exc).__name__
                checks[name] = detail
                ok = ok and passed
        return ok, {**body, "checks": checks}


class _Handler(BaseHTTPRequestHandler):
    health: Health

    def do_GET(self) -> None:  # the http.server API's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            return
        if path in ("/livez", "/readyz"):
            ok, body = self.health.live() if path == "/livez" else self.health.ready()
            self._send(200 if ok else 503, json.dumps({"ok": ok, **body}).encode(), "application/json")
            return
        self._send(404, b'{"ok": false, "error": "not found"}', "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # probes come every few seconds: no access log


def beat_while(health: Health, done: threading.Event, every: float = 5.0) -> None:
    """Keep a process live from a daemon thread until ``done`` is set: a standby waits (for a writer
    lock, for its database) without turning its main loop."""

    def beat() -> None:
        while not done.wait(every):
            health.beat()

    threading.Thread(target=beat, name="health-beat", daemon=True).start()


def serve_health(health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/livez``, ``/readyz`` and ``/metrics`` on ``host``:``port`` from a daemon thread."""
    handler = type("HealthHandler", (_Handler,), {"health": health})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    log.info("health.listening", host=host, port=server.server_address[1])
    return server
