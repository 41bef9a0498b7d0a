"""A witness: polls a log's checkpoints, checks they only ever grow consistently, and cosigns them.

State lives in a directory: ``state.json`` (the last checkpoint cosigned), ``cosigned.txt`` (that
checkpoint with this witness's ``tlog-cosignature/v1`` line), and ``evidence/`` (one JSON file per
refused checkpoint: a split view, a rollback or an inconsistent extension, each holding both notes
signed by the log, which is the proof of its misbehaviour).

Protocol (see ``docs/ledger.md``): the witness pulls ``GET {log}/ledger/checkpoint`` and, when the
log grew, ``GET {log}/ledger/proof/consistency?from=&to=``; it pushes its cosigned note to
``POST {log}/ledger/cosignatures`` and serves it at ``GET /witness/checkpoint``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from ledger import checkpoint as _checkpoint
from ledger import merkle
from ledger import note as _note
from ledger.errors import CheckpointMismatch, InvalidKey, LedgerError, VerificationError

__all__ = ["Witness", "WitnessState"]


@dataclass(frozen=True, slots=True)
class WitnessState:
    origin: str
    size: int
    root_hash: bytes
    note: str


class Witness:
    """Checks and cosigns one log's checkpoints. Not thread-safe; one per log and state directory."""

    def __init__(self, log_key: str, witness_key: str, state_dir: str | os.PathLike[str]) -> None:
        self.log_key = log_key
        _note.Verifier.from_text(log_key)  # fail early on a malformed key
        self._signer = _note.Signer.from_text(witness_key)
        if self._signer.alg != _note.ALG_COSIGNATURE_V1:
            raise InvalidKey("a witness key must be a cosignature key (algorithm 0x04): use keygen --witness")
        self.verifier_key = self._signer.verifier().to_text()
        self.dir = Path(state_dir)
        (self.dir / "evidence").mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return self._signer.name

    def state(self) -> WitnessState | None:
        """The last checkpoint this witness cosigned, or None before the first one."""
        path = self.dir / "state.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return WitnessState(data["origin"], int(data["size"]), base64.b64decode(data["root"]), data["note"])

    def cosigned(self) -> str | None:
        """The last cosigned note (the log's note plus this witness's signature line)."""
        path = self.dir / "cosigned.txt"
        return path.read_text() if path.exists() else None

    def evidence(self) -> list[dict[str, Any]]:
        """Every recorded refusal, oldest first."""
        return [json.loads(p.read_text()) for p in sorted((self.dir / "evidence").glob("*.json"))]

    def needs_proof(self, signed_note: str) -> tuple[int, int] | None:
        """``(from, to)`` when observing ``signed_note`` needs a consistency proof, else None.

        Raises :class:`~ledger.errors.VerificationError` if the log did not sign the note.
        """
        cp = _checkpoint.open(signed_note, [self.log_key])
        last = self.state()
        if last is None or last.size == 0 or cp.size <= last.size:
            return None
        return last.size, cp.size

    def observe(
        self, signed_note: str, proof: Sequence[bytes] | None = None, *, now: int | None = None
    ) -> str:
        """Check ``signed_note`` against the last cosigned checkpoint and cosign it.

        Returns the cosigned note. Raises :class:`~ledger.errors.CheckpointMismatch` (after writing the
        evidence) for a split view, a rollback or an inconsistent extension; raises
        :class:`~ledger.errors.VerificationError` when the log's signature does not verify or the
        origin changed. The state only advances after every check passed.
        """
        cp = _checkpoint.open(signed_note, [self.log_key])
        log_only = self._log_signed_only(signed_note)
        last = self.state()
        if last is not None:
            if cp.origin != last.origin:
                raise VerificationError(f"origin changed from {last.origin!r} to {cp.origin!r}")
            if cp.size < last.size:
                self._refuse("rollback", f"size went back from {last.size} to {cp.size}", last, log_only)
            if cp.size == last.size and cp.root_hash != last.root_hash:
                self._refuse("split-view", f"two roots for size {cp.size}", last, log_only)
            if cp.size > last.size and last.size > 0:
                try:
                    merkle.verify_consistency(
                        last.size, cp.size, list(proof or []), last.root_hash, cp.root_hash
                    )
                except VerificationError as exc:
                    self._refuse(
                        "inconsistent",
                        f"no valid consistency proof from {last.size} to {cp.size}: {exc}",
                        last,
                        log_only,
                        proof=proof,
                    )
        line = _checkpoint.cosign(log_only, self.log_key, self._signer.to_text(), timestamp=now)
        cosigned = log_only + line
        self._write(
            "state.json",
            json.dumps(
                {
                    "origin": cp.origin,
                    "size": cp.size,
                    "root": base64.b64encode(cp.root_hash).decode(),
                    "note": log_only,
                }
            ),
        )
        self._write("cosigned.txt", cosigned)
        return cosigned

    def _log_signed_only(self, signed_note: str) -> str:
        # Keep only the log's own signature(s), dropping other witnesses' lines.
        opened = _note.open_note(signed_note, [self.log_key])
        return _note.Note(opened.text, opened.sigs).to_text()

    def _refuse(
        self, kind: str, message: str, last: WitnessState, new: str, *, proof: Sequence[bytes] | None = None
    ) -> None:
        record = {
            "kind": kind,
            "message": message,
            "detected_at": int(time.time()),
            "previous": last.note,
            "received": new,
            "proof": [base64.b64encode(p).decode() for p in proof or []],
        }
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{time.time_ns() % 10**9:09d}-{kind}.json"
        self._write(f"evidence/{name}", json.dumps(record, indent=2))
        raise CheckpointMismatch(kind, message, old=last.note, new=new)

    def _write(self, rel: str, text: str) -> None:
        path = self.dir / rel
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


async def poll_once(witness: Witness, session: Any, log_url: str, *, push: bool = True) -> str | None:
    """One poll: fetch the log's checkpoint (and proof), observe it, push the cosignature.

    Returns the cosigned note, or None when the log has no checkpoint yet. Raises what
    :meth:`Witness.observe` raises, and ``aiohttp.ClientError`` on network failures.
    """
    base = log_url.rstrip("/")
    async with session.get(f"{base}/ledger/checkpoint") as resp:
        if resp.status == 404:
            return None
        resp.raise_for_status()
        signed = await resp.text()
    proof: list[bytes] | None = None
    need = witness.needs_proof(signed)
    if need is not None:
        async with session.get(
            f"{base}/ledger/proof/consistency", params={"from": need[0], "to": need[1]}
        ) as resp:
            # A failed fetch is transient, not evidence: only a served proof that does not verify is.
            resp.raise_for_status()
            body = await resp.json()
            try:
                proof = [base64.b64decode(p, validate=True) for p in body.get("proof", [])]
            except (ValueError, TypeError, AttributeError):
                proof = []  # garbage served as a proof counts as no valid proof
    cosigned = witness.observe(signed, proof)
    if push:
        async with session.post(
            f"{base}/ledger/cosignatures", data=cosigned.encode(), headers={"Content-Type": "text/plain"}
        ) as resp:
            await resp.read()
    return cosigned


def witness_app(witness: Witness) -> web.Application:
    """An aiohttp application serving ``GET /witness/checkpoint``, ``/witness/key``, ``/witness/evidence``."""

    async def get_checkpoint(request: web.Request) -> web.Response:
        cosigned = witness.cosigned()
        if cosigned is None:
            return web.Response(status=404, text="no checkpoint cosigned yet\n")
        return web.Response(text=cosigned, content_type="text/plain")

    async def get_key(request: web.Request) -> web.Response:
        return web.Response(text=witness.verifier_key + "\n", content_type="text/plain")

    async def get_evidence(request: web.Request) -> web.Response:
        return web.json_response(witness.evidence())

    app = web.Application()
    app.router.add_get("/witness/checkpoint", get_checkpoint)
    app.router.add_get("/witness/key", get_key)
    app.router.add_get("/witness/evidence", get_evidence)
    return app


async def run_witness(
    witness: Witness, log_url: str, interval: float, host: str, port: int, once: bool
) -> int:
    """Poll ``log_url`` every ``interval`` seconds, cosigning what is consistent, and serve the witness
    application on ``host:port`` (``once``: one poll, the cosigned note printed, no server). Returns 1
    when a poll failed or a checkpoint was refused (the evidence is kept), else 0."""
    log = structlog.get_logger("ledger.witness")
    runner = None
    if not once:
        runner = web.AppRunner(witness_app(witness))
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info("witness.listening", host=host, port=port, key=witness.verifier_key)
    status = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            while True:
                try:
                    cosigned = await poll_once(witness, session, log_url)
                    if cosigned is not None:
                        log.info("witness.cosigned", size=int(cosigned.split("\n")[1]))
                        if once:
                            print(cosigned, end="")
                except CheckpointMismatch as exc:
                    log.error("witness.refused", kind=exc.kind, reason=str(exc))
                    status = 1
                except (TimeoutError, LedgerError, aiohttp.ClientError) as exc:
                    log.warning("witness.poll_failed", error=f"{type(exc).__name__}: {exc}")
                    status = 1
                if once:
                    return status
                await asyncio.sleep(interval)
    finally:
        if runner is not None:
            await runner.cleanup()
