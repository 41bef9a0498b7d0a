"""/livez, /readyz and /metrics of the consumers (bridge/health.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from bridge.health import Health, serve_health


@pytest.fixture
def served() -> Iterator[tuple[Health, str]]:
    health = Health(stale_after=60)
    server = serve_health(health, "127.0.0.1", 0)
    yield health, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_starting_is_live_but_not_ready(served: tuple[Health, str]) -> None:
    _, base = served
    assert _get(base + "/livez")[0] == 200
    status, body = _get(base + "/readyz")
    assert status == 503 and body["state"] == "starting"


def test_a_standby_is_ready_without_asking_its_checks(served: tuple[Health, str]) -> None:
    health, base = served
    health.add_check("broker", lambda: (False, "unreachable"))
    health.set_state("standby")
    assert _get(base + "/readyz") == (200, {"ok": True, "state": "standby", "loop_age_s": 0.0, "checks": {}})


def test_running_is_ready_only_when_every_check_passes(served: tuple[Health, str]) -> None:
    health, base = served
    reachable = {"db": True}
    health.add_check("broker", lambda: (True, "connected"))
    health.add_check("sink", lambda: (reachable["db"], "ok" if reachable["db"] else "backing off"))
    health.set_state("running")
    status, body = _get(base + "/readyz")
    assert status == 200 and body["checks"] == {"broker": "connected", "sink": "ok"}
    reachable["db"] = False
    status, body = _get(base + "/readyz")
    assert status == 503 and body["checks"]["sink"] == "backing off"
    assert _get(base + "/livez")[0] == 200, "liveness never depends on a dependency"


def test_a_check_that_raises_fails_readiness_by_its_exception_class(served: tuple[Health, str]) -> None:
    health, base = served

    def boom() -> tuple[bool, str]:
        raise ConnectionError("secret detail")

    health.add_check("broker", boom)
    health.set_state("running")
    status, body = _get(base + "/readyz")
    assert status == 503 and body["checks"] == {"broker": "ConnectionError"}


def test_a_loop_that_stopped_turning_is_not_live(served: tuple[Health, str]) -> None:
    health, base = served
    health.stale_after = 0.0
    health.set_state("running")
    health._beat -= 1
    status, body = _get(base + "/livez")
    assert status == 503 and body["loop_age_s"] >= 1


def test_metrics_and_unknown_paths(served: tuple[Health, str]) -> None:
    _, base = served
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        assert resp.status == 200 and b"python_info" in resp.read()
    assert _get(base + "/nope")[0] == 404
