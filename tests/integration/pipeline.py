"""Helpers that run the real pipeline pieces (CLI ingest, consumer runtimes) inside a test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import main
from bridge.config import Settings
from bridge.consumers.index_sink import build_index_sink
from bridge.consumers.ledger_sink import build_ledger_sink
from bridge.consumers.runtime import ConsumerRuntime
from bridge.stores.ledger import open_configured_ledger
from bridge.stream.producer import Publisher
from ledger.log import Ledger
from ledger.note import generate_key

from .conftest import settings_env


@dataclass
class Stack:
    settings: Settings
    vkey: str
    skey: str

    def cli(self, *args: str) -> int:
        return main(list(args))

    def open_ledger(self) -> Ledger:
        return open_configured_ledger(self.settings, signer_key=self.settings.ledger.signer_key())

    def runtime(self, kind: str, group: str) -> ConsumerRuntime:
        s = self.settings
        bootstrap = s.require_bootstrap()
        sink: Any = build_ledger_sink(s, bootstrap) if kind == "ledger" else build_index_sink(s)
        return ConsumerRuntime(s, bootstrap, sink, Publisher(s, bootstrap), group_id=group)

    def drain(
        self, kind: str, group: str, expected: Callable[[ConsumerRuntime], bool], timeout: float = 90
    ) -> ConsumerRuntime:
        """Run a consumer until ``expected(runtime)`` holds, then stop it gracefully."""
        rt = self.runtime(kind, group)
        done = threading.Event()
        deadline = time.monotonic() + timeout

        def until() -> bool:
            if expected(rt):
                done.set()
                return True
            return time.monotonic() > deadline

        rt.run(until=until, poll_timeout_ms=200)
        if not done.is_set():
            pytest.fail(
                f"{kind} consumer did not reach the expected state within {timeout}s "
                f"(processed {rt.processed}, dead-lettered {rt.dead_lettered})"
            )
        return rt


def make_stack(settings: Settings, monkeypatch: pytest.MonkeyPatch, orgs: list[str]) -> Stack:
    for k, v in settings_env(settings).items():
        monkeypatch.setenv(k, v)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for org in orgs:
        assert main(["keys", "create", "--org", org]) == 0
    skey, vkey = generate_key(settings.ledger.origin)
    assert settings.ledger.key_file is not None
    settings.ledger.key_file.write_text(skey)
    settings.ledger.key_file.with_suffix(".pub").write_text(vkey)
    assert main(["topics", "create"]) == 0
    return Stack(settings, vkey, skey)


def write_feeds(tmp: Path, n_people: int, seed: int = 11) -> dict[str, list[Path]]:
    from tests.support.demodata import generate, write_files

    feeds = generate(n_people, hospitals=2, overlap=0.5, seed=seed, messages_per_patient=2)
    return {org: paths for org, paths in write_files(tmp / "feeds", feeds, per_file=10).items() if paths}


def count_messages(files: dict[str, list[Path]]) -> int:
    return sum(p.read_bytes().count(b"MSH|") for fs in files.values() for p in fs)
