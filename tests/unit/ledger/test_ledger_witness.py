"""Witnesses: cosign consistent growth; refuse (and keep evidence of) split views and rollbacks."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from aiohttp import ClientSession, web
from ledger_helpers import ledger_app

from bridge.stores.ledger import open_ledger
from ledger import checkpoint, note
from ledger.errors import CheckpointMismatch, InvalidKey, VerificationError
from ledger.log import Ledger, LedgerEntry
from ledger.witness import Witness, poll_once, witness_app

ORIGIN = "fhirbridge.test/witnessed"
SKEY, VKEY = note.generate_key(ORIGIN)
WSKEY, WVKEY = note.generate_key("witness.test/w1", note.ALG_COSIGNATURE_V1)


def entry(i: int, org: str = "org") -> LedgerEntry:
    return LedgerEntry(
        hashlib.sha256(b"%d" % i).hexdigest(), org, "fhir", "1", "t", 0, i, "2024-05-01T00:00:00Z"
    )


def new_log(tmp_path: Any, name: str) -> Ledger:
    return open_ledger(
        f"sqlite:///{tmp_path}/{name}.db",
        origin=ORIGIN,
        signer_key=SKEY,
        checkpoint_every=1,
        witness_keys=[WVKEY],
    )


def test_witness_cosigns_consistent_growth(tmp_path: Any) -> None:
    log = new_log(tmp_path, "log")
    w = Witness(VKEY, WSKEY, tmp_path / "w")
    log.append([entry(i) for i in range(5)])
    first = w.observe(log.latest_checkpoint() or "", now=1_700_000_000)
    assert checkpoint.open(first, [WVKEY]).size == 5
    log.append([entry(i) for i in range(5, 12)])
    second = log.latest_checkpoint() or ""
    assert w.needs_proof(second) == (5, 12)
    cosigned = w.observe(second, log.consistency_proof(5, 12))
    cp = checkpoint.open(cosigned, [VKEY, WVKEY])
    assert cp.size == 12 and cp.signers == (ORIGIN, "witness.test/w1")
    assert w.state() is not None and w.state().size == 12  # type: ignore[union-attr]
    assert w.evidence() == []


def test_split_view_is_detected_and_evidence_kept(tmp_path: Any) -> None:
    honest, fork = new_log(tmp_path, "a"), new_log(tmp_path, "b")
    honest.append([entry(i) for i in range(6)])
    fork.append([entry(i, org="other") for i in range(6)])  # same origin, same key, same size, other tree
    w = Witness(VKEY, WSKEY, tmp_path / "w")
    w.observe(honest.latest_checkpoint() or "")
    forked = fork.latest_checkpoint() or ""
    with pytest.raises(CheckpointMismatch) as info:
        w.observe(forked)
    assert info.value.kind == "split-view"
    [evidence] = w.evidence()
    assert evidence["kind"] == "split-view"
    # Both notes in the evidence are signed by the log: that is the proof of its misbehaviour.
    a = checkpoint.open(evidence["previous"], [VKEY])
    b = checkpoint.open(evidence["received"], [VKEY])
    assert a.size == b.size and a.root_hash != b.root_hash
    assert w.state().size == 6 and w.state().root_hash == a.root_hash  # type: ignore[union-attr]


def test_rollback_is_detected(tmp_path: Any) -> None:
    log = new_log(tmp_path, "log")
    log.append([entry(i) for i in range(3)])
    old = log.latest_checkpoint() or ""
    log.append([entry(i) for i in range(3, 9)])
    w = Witness(VKEY, WSKEY, tmp_path / "w")
    w.observe(log.latest_checkpoint() or "")
    with pytest.raises(CheckpointMismatch) as info:
        w.observe(old)
    assert info.value.kind == "rollback"
    assert [e["kind"] for e in w.evidence()] == ["rollback"]


def test_a_fork_that_grew_is_caught_by_the_consistency_proof(tmp_path: Any) -> None:
    honest, fork = new_log(tmp_path, "a"), new_log(tmp_path, "b")
    honest.append([entry(i) for i in range(4)])
    fork.append([entry(i, org="x") for i in range(9)])
    w = Witness(VKEY, WSKEY, tmp_path / "w")
    w.observe(honest.latest_checkpoint() or "")
    grown = fork.latest_checkpoint() or ""
    with pytest.raises(CheckpointMismatch) as info:
        w.observe(grown, fork.consistency_proof(4, 9))
    assert info.value.kind == "inconsistent"
    with pytest.raises(CheckpointMismatch):
        w.observe(grown, [])  # no proof at all is refused too


def test_notes_not_signed_by_the_log_are_rejected_without_touching_state(tmp_path: Any) -> None:
    other_skey, _ = note.generate_key(ORIGIN)
    w = Witness(VKEY, WSKEY, tmp_path / "w")
    with pytest.raises(VerificationError):
        w.observe(checkpoint.sign(ORIGIN, 3, b"\x03" * 32, other_skey))
    assert w.state() is None


def test_a_log_key_cannot_be_used_as_witness_key(tmp_path: Any) -> None:
    with pytest.raises(InvalidKey):
        Witness(VKEY, SKEY, tmp_path / "w")


async def test_poll_once_end_to_end_pushes_cosignature_to_the_log(tmp_path: Any, aiohttp_server: Any) -> None:
    log = new_log(tmp_path, "log")
    app = ledger_app(lambda: log)
    server = await aiohttp_server(app)
    url = str(server.make_url("/"))
    w = Witness(VKEY, WSKEY, tmp_path / "w")
    witness_server = await aiohttp_server(witness_app(w))
    async with ClientSession() as session:
        assert await poll_once(w, session, url) is None  # no checkpoint yet
        log.append([entry(i) for i in range(4)])
        await poll_once(w, session, url)
        log.append([entry(i) for i in range(4, 10)])
        cosigned = await poll_once(w, session, url)
        assert cosigned is not None
        # The log attached the cosignature to its checkpoint.
        attached = log.latest_checkpoint() or ""
        assert checkpoint.open(attached, [VKEY, WVKEY]).signers == (ORIGIN, "witness.test/w1")
        # The witness serves it, and its key.
        async with session.get(witness_server.make_url("/witness/checkpoint")) as resp:
            assert checkpoint.open(await resp.text(), [WVKEY]).size == 10
        async with session.get(witness_server.make_url("/witness/key")) as resp:
            assert (await resp.text()).strip() == WVKEY
        async with session.get(witness_server.make_url("/witness/evidence")) as resp:
            assert json.loads(await resp.text()) == []
    log.close()


async def test_witness_cli_loop_once_cosigns_and_prints(
    tmp_path: Any, aiohttp_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from ledger.witness import run_witness

    log = new_log(tmp_path, "log")
    log.append([entry(i) for i in range(3)])
    app = ledger_app(lambda: log)
    server = await aiohttp_server(app)
    w = Witness(VKEY, WSKEY, tmp_path / "w")
    assert await run_witness(w, str(server.make_url("/")), 0.0, "127.0.0.1", 0, True) == 0
    printed = capsys.readouterr().out
    printed = printed[printed.index(ORIGIN + "\n") :]  # unconfigured structlog also writes to stdout
    assert checkpoint.open(printed, [VKEY, WVKEY]).size == 3
    # A rollback served by the log makes the loop report failure (exit status 1), with evidence kept.
    log.append([entry(i) for i in range(3, 6)])
    assert await run_witness(w, str(server.make_url("/")), 0.0, "127.0.0.1", 0, True) == 0
    log.reset()
    log.append([entry(i) for i in range(2)])
    assert await run_witness(w, str(server.make_url("/")), 0.0, "127.0.0.1", 0, True) == 1
    assert [e["kind"] for e in w.evidence()] == ["rollback"]
    log.close()


async def test_an_unavailable_proof_is_transient_not_evidence(tmp_path: Any, aiohttp_server: Any) -> None:
    import aiohttp

    log = new_log(tmp_path, "log")
    log.append([entry(i) for i in range(3)])
    w = Witness(VKEY, WSKEY, tmp_path / "w")
    w.observe(log.latest_checkpoint() or "")
    log.append([entry(i) for i in range(3, 7)])

    async def checkpoint_handler(request: web.Request) -> web.Response:
        return web.Response(text=log.latest_checkpoint() or "", content_type="text/plain")

    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    app = web.Application()
    app.router.add_get("/ledger/checkpoint", checkpoint_handler)
    app.router.add_get("/ledger/proof/consistency", unavailable)
    server = await aiohttp_server(app)
    async with ClientSession() as session:
        with pytest.raises(aiohttp.ClientResponseError):
            await poll_once(w, session, str(server.make_url("/")), push=False)
    assert w.evidence() == []
    assert w.state().size == 3  # type: ignore[union-attr]
    log.close()
