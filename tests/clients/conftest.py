"""The client interop tests' stack: one per session, started by the first test that needs it.

``stack`` is a :class:`tests.clients.stack.ClientStack` (broker, ledger and index consumers, ``fhirbridge
serve``, data ingested through the real pipeline, tokens from the embedded authorization server),
stopped by PID at the end of the session. ``node_clients`` is the directory of the Node clients, with
its packages installed by ``npm ci`` when they are missing or older than the lock file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients.stack import ClientStack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientStack]:
    s = ClientStack(tmp_path_factory.mktemp("clients-stack"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def node_clients() -> Path:
    from tests.clients.node_setup import NodeSetupFailed, ensure_installed

    try:
        return ensure_installed()
    except NodeSetupFailed as exc:  # said loudly: these tests never skip
        pytest.fail(str(exc))
