"""The C2SP tlog-witness client (:mod:`ledger.tlogwitness`) against a local witness written to the spec."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from ledger_helpers import make_entry

from bridge.stores.ledger import open_ledger
from ledger import checkpoint as _checkpoint
from ledger import merkle
from ledger import note as _note
from ledger.errors import LedgerError, VerificationError
from ledger.log import Ledger
from ledger.tlogwitness import (
    CheckpointCosigner,
    TlogWitnessClient,
    TlogWitnessError,
    parse_witness_urls,
    request_body,
)

ORIGIN = "example.org/log"


class SpecWitness:
    """A tlog-witness: checks the log's signature, the old size and the proof, then cosigns."""

    def __init__(self, log_key: str, witness_key: str) -> None:
        self.log_key = log_key
        self.witness_key = witness_key
        self.size = 0
        self.root = merkle.EMPTY_ROOT
        self.bodies: list[bytes] = []
        self.tamper = False  # answer a cosignature over other text

    async def add_checkpoint(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        head, _, note = body.decode().partition("\n\n")
        lines = head.split("\n")
        if not lines[0].startswith("old "):
            return web.Response(status=400, text="bad request\n")
        old = int(lines[0][4:])
        proof = [base64.b64decode(x) for x in lines[1:]]
        try:
            cp = _checkpoint.open(note, [self.log_key])
        except VerificationError:
            return web.Response(status=403, text="invalid signature\n")
        if old > cp.size:
            return web.Response(status=400, text="bad request\n")
        if old != self.size:
            return web.Response(status=409, text=f"{self.size}\n", content_type="text/x.tlog.size")
        if old == cp.size and cp.root_hash != self.root:
            return web.Response(status=409, text=f"{self.size}\n", content_type="text/x.tlog.size")
        if 0 < old < cp.size:
            try:
                merkle.verify_consistency(old, cp.size, proof, self.root, cp.root_hash)
            except VerificationError:
                return web.Response(status=422, text="bad consistency proof\n")
        elif proof:
            return web.Response(status=422, text="bad consistency proof\n")
        self.size, self.root = cp.size, cp.root_hash
        log_only = _note.open_note(note, [self.log_key])
        text = log_only.text + ("tampered\n" if self.tamper else "")
        signed = _note.sign_note(text, [self.witness_key])
        return web.Response(text=signed[len(text) + 1 :])


@pytest.fixture
def keys() -> dict[str, str]:
    log_sk, log_vk = _note.generate_key(ORIGIN)
    w_sk, w_vk = _note.generate_key("witness.example/w1", _note.ALG_COSIGNATURE_V1)
    return {"log_sk": log_sk, "log_vk": log_vk, "w_sk": w_sk, "w_vk": w_vk}


@pytest.fixture
def ledger(tmp_path: Path, keys: dict[str, str]) -> Any:
    led = open_ledger(
        f"sqlite:///{tmp_path}/ledger.db",
        origin=ORIGIN,
        signer_key=keys["log_sk"],
        checkpoint_every=1,
        witness_keys=[keys["w_vk"]],
    )
    yield led
    led.close()


@pytest.fixture
async def witness(aiohttp_server: Any, keys: dict[str, str]) -> tuple[SpecWitness, str]:
    w = SpecWitness(keys["log_vk"], keys["w_sk"])
    app = web.Application()
    app.router.add_post("/w/add-checkpoint", w.add_checkpoint)
    server = await aiohttp_server(app)
    return w, str(server.make_url("/w"))


def _latest(led: Ledger) -> tuple[int, str]:
    latest = led.storage.latest_checkpoint()
    assert latest is not None
    return latest


def test_request_body_is_the_spec_format() -> None:
    note = "o\n3\nAAAA\n\n— o sig\n"
    assert request_body(0, [], note) == ("old 0\n\n" + note).encode()
    h1, h2 = b"\x01" * 32, b"\x02" * 32
    body = request_body(2, [h1, h2], note).decode()
    assert body == f"old 2\n{base64.b64encode(h1).decode()}\n{base64.b64encode(h2).decode()}\n\n{note}"
    with pytest.raises(ValueError):
        request_body(1, [h1] * 64, note)


def test_urls_are_http_prefixes() -> None:
    assert parse_witness_urls(" http://a:1/x/ , https://b ") == ["http://a:1/x", "https://b"]
    assert parse_witness_urls("") == []
    for bad in ("ftp://a", "a:1", "http://a?x=1", "http://"):
        with pytest.raises(LedgerError):
            parse_witness_urls(bad)


def test_a_client_needs_a_cosignature_key(keys: dict[str, str]) -> None:
    with pytest.raises(LedgerError, match="0x04"):
        TlogWitnessClient("http://127.0.0.1:1", [keys["log_vk"]])


async def test_submit_first_from_zero_then_with_the_consistency_proof(
    ledger: Ledger, witness: tuple[SpecWitness, str], keys: dict[str, str]
) -> None:
    w, url = witness
    client = TlogWitnessClient(url, [keys["w_vk"]])
    ledger.append([make_entry(i) for i in range(3)])
    size, note = _latest(ledger)
    lines = await asyncio.to_thread(client.submit, note, ledger.consistency_proof)
    assert w.bodies[-1] == ("old 0\n\n" + note).encode()
    assert len(lines) == 1 and lines[0].startswith("— witness.example/w1 ")
    assert client.known_size == size == 3
    assert ledger.add_cosignatures(note + "".join(lines)) == 1
    assert ledger.latest_checkpoint() == note + lines[0]

    ledger.append([make_entry(i) for i in range(3, 8)])
    size, note = _latest(ledger)
    lines = await asyncio.to_thread(client.submit, note, ledger.consistency_proof)
    proof = ledger.consistency_proof(3, 8)
    expected = "old 3\n" + "".join(base64.b64encode(h).decode() + "\n" for h in proof) + "\n" + note
    assert w.bodies[-1] == expected.encode() and len(w.bodies) == 2  # no 409 round trip
    assert w.size == 8 and client.known_size == 8


async def test_409_gives_the_witness_size_and_the_client_retries_with_that_proof(
    ledger: Ledger, witness: tuple[SpecWitness, str], keys: dict[str, str]
) -> None:
    w, url = witness
    ledger.append([make_entry(i) for i in range(5)])
    first = TlogWitnessClient(url, [keys["w_vk"]])
    await asyncio.to_thread(first.submit, _latest(ledger)[1], ledger.consistency_proof)
    ledger.append([make_entry(i) for i in range(5, 9)])
    # a client that does not know the witness (a restarted writer) starts from 0
    fresh = TlogWitnessClient(url, [keys["w_vk"]])
    lines = await asyncio.to_thread(fresh.submit, _latest(ledger)[1], ledger.consistency_proof)
    assert [b.split(b"\n", 1)[0] for b in w.bodies] == [b"old 0", b"old 0", b"old 5"]
    assert lines and fresh.known_size == 9 and w.size == 9
    # a client with a wrong idea of the size is corrected the same way
    ledger.append([make_entry(9)])
    fresh.known_size = 4
    await asyncio.to_thread(fresh.submit, _latest(ledger)[1], ledger.consistency_proof)
    assert [b.split(b"\n", 1)[0] for b in w.bodies[3:]] == [b"old 4", b"old 9"]


async def test_a_witness_ahead_of_the_checkpoint_is_an_error(
    ledger: Ledger, witness: tuple[SpecWitness, str], keys: dict[str, str]
) -> None:
    _w, url = witness
    ledger.append([make_entry(i) for i in range(4)])
    client = TlogWitnessClient(url, [keys["w_vk"]])
    await asyncio.to_thread(client.submit, _latest(ledger)[1], ledger.consistency_proof)
    old_note = ledger.checkpoint_at(4)
    assert old_note is not None
    ledger.append([make_entry(i) for i in range(4, 6)])
    await asyncio.to_thread(client.submit, _latest(ledger)[1], ledger.consistency_proof)
    with pytest.raises(TlogWitnessError, match="beyond") as exc:
        await asyncio.to_thread(client.submit, old_note, ledger.consistency_proof)
    assert exc.value.status == 409


async def test_a_split_view_is_not_retried(
    tmp_path: Path, ledger: Ledger, witness: tuple[SpecWitness, str], keys: dict[str, str]
) -> None:
    w, url = witness
    ledger.append([make_entry(i) for i in range(3)])
    client = TlogWitnessClient(url, [keys["w_vk"]])
    await asyncio.to_thread(client.submit, _latest(ledger)[1], ledger.consistency_proof)
    # the same log key signs another tree of the same size
    other = open_ledger(f"sqlite:///{tmp_path}/other.db", origin=ORIGIN, signer_key=keys["log_sk"])
    try:
        other.append([make_entry(i, org="org-z") for i in range(3)])
        with pytest.raises(TlogWitnessError, match="refused") as exc:
            await asyncio.to_thread(client.submit, _latest(other)[1], other.consistency_proof)
    finally:
        other.close()
    assert exc.value.status == 409
    assert len(w.bodies) == 2 and w.size == 3


async def test_a_bad_cosignature_is_rejected(
    ledger: Ledger, witness: tuple[SpecWitness, str], keys: dict[str, str]
) -> None:
    w, url = witness
    w.tamper = True
    ledger.append([make_entry(0)])
    client = TlogWitnessClient(url, [keys["w_vk"]])
    with pytest.raises(VerificationError, match="invalid cosignature"):
        await asyncio.to_thread(client.submit, _latest(ledger)[1], ledger.consistency_proof)


async def test_cosignatures_of_unknown_keys_are_not_accepted(
    ledger: Ledger, witness: tuple[SpecWitness, str]
) -> None:
    _w, url = witness
    _sk, stranger = _note.generate_key("witness.example/other", _note.ALG_COSIGNATURE_V1)
    ledger.append([make_entry(0)])
    client = TlogWitnessClient(url, [stranger])
    with pytest.raises(TlogWitnessError, match="no cosignature from a configured witness key"):
        await asyncio.to_thread(client.submit, _latest(ledger)[1], ledger.consistency_proof)


@pytest.mark.parametrize(
    ("status", "ctype", "body", "match"),
    [
        (403, "text/plain", b"invalid signature\n", "HTTP 403: invalid signature"),
        (404, "text/plain", b"unknown log\n", "HTTP 404"),
        (422, "text/plain", b"bad consistency proof\n", "HTTP 422"),
        (409, "text/plain", b"3\n", "HTTP 409"),  # not text/x.tlog.size
        (409, "text/x.tlog.size", b"three\n", "not a tree size"),
        (200, "text/plain", b"not a signature line\n", "not signature lines"),
        (200, "text/plain", b"x" * 70_000, "too large"),
    ],
)
def test_refusals_and_garbage_raise(
    ledger: Ledger, keys: dict[str, str], status: int, ctype: str, body: bytes, match: str
) -> None:
    ledger.append([make_entry(0)])
    client = TlogWitnessClient(
        "http://witness.invalid", [keys["w_vk"]], transport=lambda url, data, timeout: (status, ctype, body)
    )
    with pytest.raises(TlogWitnessError, match=match):
        client.submit(_latest(ledger)[1], ledger.consistency_proof)


def test_an_unreachable_witness_is_an_error_with_a_timeout(ledger: Ledger, keys: dict[str, str]) -> None:
    ledger.append([make_entry(0)])
    seen: list[float] = []

    def refuse(url: str, data: bytes, timeout: float) -> tuple[int, str, bytes]:
        seen.append(timeout)
        raise ConnectionRefusedError("refused")

    client = TlogWitnessClient("http://127.0.0.1:9", [keys["w_vk"]], timeout=2.5, transport=refuse)
    with pytest.raises(TlogWitnessError, match="cannot reach"):
        client.submit(_latest(ledger)[1], ledger.consistency_proof)
    assert seen == [2.5]


async def test_cosigner_stores_cosignatures_and_survives_a_failing_witness(
    ledger: Ledger, witness: tuple[SpecWitness, str], keys: dict[str, str]
) -> None:
    w, url = witness
    down = TlogWitnessClient(
        "http://127.0.0.1:9",
        [keys["w_vk"]],
        transport=lambda u, d, t: (_ for _ in ()).throw(ConnectionRefusedError("refused")),
    )
    cosigner = CheckpointCosigner(ledger, [down, TlogWitnessClient(url, [keys["w_vk"]])], interval=0.05)
    assert await asyncio.to_thread(cosigner.run_once) == 0  # no checkpoint yet
    ledger.append([make_entry(i) for i in range(4)])
    cosigner.start()
    try:
        cosigner.notify()
        for _ in range(200):
            if "— witness.example/w1 " in (ledger.latest_checkpoint() or ""):
                break
            await asyncio.sleep(0.02)
        assert "— witness.example/w1 " in (ledger.latest_checkpoint() or "")
        ledger.append([make_entry(i) for i in range(4, 7)])
        cosigner.notify()
        for _ in range(200):
            if w.size == 7 and "— witness.example/w1 " in (ledger.latest_checkpoint() or ""):
                break
            await asyncio.sleep(0.02)
        assert w.size == 7 and "— witness.example/w1 " in (ledger.latest_checkpoint() or "")
    finally:
        await asyncio.to_thread(cosigner.close)
    assert ledger.size() == 7  # the failing witness cost no entry


# -- the writer's hook: the ledger sink ---------------------------------------------------------------


class _FakeCosigner:
    def __init__(self) -> None:
        self.notified = 0
        self.closed = False

    def notify(self) -> None:
        self.notified += 1

    def close(self) -> None:
        self.closed = True


def test_the_ledger_sink_notifies_the_cosigner_when_it_signs(tmp_path: Path, keys: dict[str, str]) -> None:
    from bridge.consumers.ledger_sink import LedgerSink

    led = open_ledger(
        f"sqlite:///{tmp_path}/ledger.db",
        origin=ORIGIN,
        signer_key=keys["log_sk"],
        checkpoint_interval_ms=300,
    )
    fake = _FakeCosigner()
    sink = LedgerSink(led, checker=None, cosigner=fake)  # type: ignore[arg-type]
    sink.idle()  # nothing to sign
    assert fake.notified == 0
    led.append([make_entry(0)])  # signed at once (the first checkpoint)
    led.append([make_entry(1)])  # not signed: within the interval
    sink.idle()
    assert fake.notified == 0
    time.sleep(0.35)
    sink.idle()  # signs size 2
    assert fake.notified == 1 and _latest(led)[0] == 2
    sink.close()
    assert fake.closed


def _sink_env(monkeypatch: Any, tmp_path: Path, keys: dict[str, str], witnesses: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "ledger.key").write_text(keys["log_sk"] + "\n")
    monkeypatch.setenv("FHIRBRIDGE_DATA_DIR", str(data))
    monkeypatch.setenv("FHIRBRIDGE_LEDGER_ORIGIN", ORIGIN)
    monkeypatch.delenv("FHIRBRIDGE_LEDGER_KEY_FILE", raising=False)
    monkeypatch.setenv("FHIRBRIDGE_LEDGER_WITNESS_KEYS", keys["w_vk"])
    monkeypatch.setenv("FHIRBRIDGE_LEDGER_TLOG_WITNESSES", witnesses)


def test_build_ledger_sink_starts_a_cosigner_for_the_configured_witnesses(
    monkeypatch: Any, tmp_path: Path, keys: dict[str, str]
) -> None:
    from bridge.config import Settings
    from bridge.consumers.ledger_sink import build_ledger_sink

    _sink_env(monkeypatch, tmp_path, keys, "http://127.0.0.1:9/a, http://127.0.0.1:9/b")
    settings = Settings.from_env()
    assert settings.ledger.tlog_witnesses == ("http://127.0.0.1:9/a", "http://127.0.0.1:9/b")
    sink = build_ledger_sink(settings, "127.0.0.1:1", receipts=False)
    try:
        assert sink.cosigner is not None
        assert [c.url for c in sink.cosigner.clients] == ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    finally:
        sink.close()
    unsigned = build_ledger_sink(settings, "127.0.0.1:1", receipts=False, unsigned=True)
    assert unsigned.cosigner is None  # signs nothing, so nothing to cosign
    unsigned.close()


def test_build_ledger_sink_refuses_a_bad_witness_url(
    monkeypatch: Any, tmp_path: Path, keys: dict[str, str]
) -> None:
    from bridge.config import Settings
    from bridge.consumers.ledger_sink import build_ledger_sink
    from bridge.errors import ConfigError

    _sink_env(monkeypatch, tmp_path, keys, "witness.example:7380")
    with pytest.raises(ConfigError, match="FHIRBRIDGE_LEDGER_TLOG_WITNESSES"):
        build_ledger_sink(Settings.from_env(), "127.0.0.1:1", receipts=False)
    monkeypatch.setenv("FHIRBRIDGE_LEDGER_TLOG_WITNESSES", "http://127.0.0.1:9")
    monkeypatch.setenv("FHIRBRIDGE_LEDGER_WITNESS_KEYS", "")
    with pytest.raises(ConfigError, match="FHIRBRIDGE_LEDGER_WITNESS_KEYS"):
        build_ledger_sink(Settings.from_env(), "127.0.0.1:1", receipts=False)
