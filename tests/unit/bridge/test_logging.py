"""The service log stays one JSON event per line, malformed requests included, without their bytes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bridge.config import Settings
from bridge.logging import configure_logging
from bridge.service.app import Backend, create_app


@pytest.fixture
def json_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The root logger's handlers and level restored after a test that configures logging."""
    saved = logging.root.handlers[:], logging.root.level
    monkeypatch.setenv("FHIRBRIDGE_LOG_FORMAT", "json")
    yield
    logging.root.handlers[:] = saved[0]
    logging.root.setLevel(saved[1])


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read(200)
    writer.close()
    return answer


async def test_malformed_requests_log_one_json_warning_each(
    tmp_path: Path, json_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(
        force=True
    )  # in the test's own phase: its handler writes to this phase's captured stderr
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
    runner = web.AppRunner(create_app(settings, Backend(settings)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    secret = b"SSN123456789"
    try:
        for request in (
            b"GET /Patient?identifier="
            + secret
            + b"x" * 20000
            + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",  # URL too long
            b"GET /metadata HTTP/1.1\r\nHost: localhost\r\nX-Note: "
            + secret
            + b"a" * 20000
            + b"\r\n\r\n",  # header
            b"GET /Patient?name="
            + secret
            + b"\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n",  # NUL in the request line
        ):
            assert (await _raw(port, request)).startswith(b"HTTP/1.")
    finally:
        await runner.cleanup()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), "\n".join(lines)  # every line is JSON
    events: list[dict[str, Any]] = [json.loads(line) for line in lines]
    bad = [e for e in events if e["event"] == "http.bad_request"]
    assert len(bad) == 3 and all(e["level"] == "warning" and e["status"] == 400 for e in bad)
    assert {e["error"] for e in bad} >= {"LineTooLong"}
    assert "Traceback" not in err and secret.decode() not in err


def test_a_cached_logger_writes_to_the_stderr_of_the_moment(
    json_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loggers are cached on first use; one made under a stream since closed (a test's) must not write to it."""
    import io

    from bridge.logging import get_logger

    configure_logging(force=True)
    log = get_logger("bridge.test")
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    log.info("test.first")
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    log.info("test.second")
    assert json.loads(second.getvalue())["event"] == "test.second"


def test_phi_keys_are_dropped_from_every_event(json_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from bridge.logging import get_logger

    configure_logging(force=True)
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    get_logger("bridge.test").warning("test.event", name="DOE^JANE", ssn="123456789", mrn="M1", count=3)
    logging.getLogger("aiohttp.test").warning("stdlib %s", "event", extra={"birth_date": "1980-02-14"})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["count"] == 3 and first["redacted"] == ["mrn", "name", "ssn"]
    assert second["redacted"] == ["birth_date"]
    assert "DOE" not in out.getvalue() and "123456789" not in out.getvalue() and "1980" not in out.getvalue()
