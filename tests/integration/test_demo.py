"""`fhirbridge demo` (what `make demo` runs) brings the whole stack up with the shipped data."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bridge.broker import free_port

pytestmark = pytest.mark.integration


def test_demo_runs_to_ready_and_prints_working_links(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "demo", "--data-dir", str(tmp_path / "demo"), "--port", str(port), "--exit-when-ready"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Ready: 172 ADT messages from 2 hospitals are logged and queryable." in proc.stdout
    urls = re.findall(r"(http://127\.0\.0\.1:\d+/\S*)", proc.stdout)
    assert any("/$everything" in u for u in urls) and any("/Person/" in u for u in urls)
    # the stack is stopped on exit: nothing listens any more
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=2)
