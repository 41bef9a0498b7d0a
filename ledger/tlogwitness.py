"""A C2SP ``tlog-witness`` client (https://c2sp.org/tlog-witness): the log asks witnesses to cosign.

When the log has signed a new checkpoint, :class:`TlogWitnessClient` POSTs it to a witness's
``<url>/add-checkpoint`` with the consistency proof from the size the witness last cosigned::

    old <size>
    <base64 proof hash>        (zero or more; none when <size> is 0)
    <empty line>
    <the signed checkpoint>

A witness that cosigned another size answers ``409 Conflict`` with that size (``text/x.tlog.size``):
the client then sends the proof from that size, once. The ``200`` answer holds signature lines; only
``tlog-cosignature/v1`` (algorithm 0x04) lines from the configured witness keys are checked and kept
(a configured key with a bad signature is an error, unknown keys are ignored, as the spec says).

:class:`CheckpointCosigner` runs the clients on a background thread for a writer
(``fhirbridge ledger run``): it never blocks appends, each request has a timeout, a failing witness is
logged and retried later with a growing delay, and the cosignatures are stored with
:meth:`ledger.log.Ledger.add_cosignatures` (as ``POST /ledger/cosignatures`` stores pushed ones), so
``GET /ledger/checkpoint`` serves the cosigned checkpoint.
"""

from __future__ import annotations

import base64
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from ledger import checkpoint as _checkpoint
from ledger import note as _note
from ledger.errors import LedgerError, VerificationError

__all__ = [
    "CheckpointCosigner",
    "TlogWitnessClient",
    "TlogWitnessError",
    "parse_witness_urls",
    "request_body",
]

_MAX_PROOF_LINES = 63  # the spec's limit; a 64-bit tree needs fewer
_MAX_RESPONSE = 64 * 1024
_SIZE_BODY = re.compile(rb"(0|[1-9][0-9]{0,19})\n")
_log = structlog.get_logger("ledger.tlogwitness")

Prover = Callable[[int, int], Sequence[bytes]]
Transport = Callable[[str, bytes, float], tuple[int, str, bytes]]


class TlogWitnessError(LedgerError):
    """A witness did not cosign: refused (with its HTTP status), unreachable, or answered garbage."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def parse_witness_urls(urls: Sequence[str] | str) -> list[str]:
    """The witness submission prefixes: ``http(s)://host[:port][/path]`` each, without a trailing slash.

    Accepts a comma-separated string or a sequence; raises :class:`~ledger.errors.LedgerError`.
    """
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = []
    for raw in items:
        url = raw.strip()
        if not url:
            continue
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise LedgerError(f"a tlog-witness URL must be http(s)://host[:port][/prefix], got {url!r}")
        out.append(url.rstrip("/"))
    return out


def request_body(old_size: int, proof: Sequence[bytes], signed_note: str) -> bytes:
    """The ``add-checkpoint`` request body: the old size line, the proof lines, a blank line, the note."""
    if old_size < 0:
        raise ValueError("old size must be >= 0")
    if len(proof) > _MAX_PROOF_LINES:
        raise ValueError("a consistency proof has at most 63 hashes")
    lines = [f"old {old_size}"] + [base64.b64encode(h).decode() for h in proof]
    return ("\n".join(lines) + "\n\n" + signed_note).encode("utf-8")


def _urllib_post(url: str, body: bytes, timeout: float) -> tuple[int, str, bytes]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "text/plain; charset=utf-8"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # http(s) only: parse_witness_urls
            return resp.status, resp.headers.get("Content-Type", ""), resp.read(_MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read(_MAX_RESPONSE + 1)


class TlogWitnessClient:
    """One witness: submits checkpoints of one log and checks the cosignatures it returns.

    ``witness_keys`` are the verifier keys whose cosignatures are accepted (other keys are ignored).
    Remembers the size the witness last cosigned (``known_size``; None until it has answered), so that
    the next submission carries the right proof without a 409 round trip.
    """

    def __init__(
        self,
        url: str,
        witness_keys: Sequence[str | _note.Verifier],
        *,
        timeout: float = 10.0,
        transport: Transport | None = None,
    ) -> None:
        (self.url,) = parse_witness_urls([url])
        self._verifiers = {}
        for k in witness_keys:
            v = k if isinstance(k, _note.Verifier) else _note.Verifier.from_text(k.strip())
            if v.alg == _note.ALG_COSIGNATURE_V1:
                self._verifiers[(v.name, v.key_id)] = v
        if not self._verifiers:
            raise LedgerError("a tlog-witness client needs at least one cosignature (0x04) witness key")
        self.timeout = timeout
        self._post = transport or _urllib_post
        self.known_size: int | None = None

    def submit(self, signed_note: str, prove: Prover) -> list[str]:
        """Ask the witness to cosign ``signed_note`` (signed by the log); returns its verified
        cosignature lines (each ``— <name> <base64>\\n``).

        ``prove(m, n)`` gives the consistency proof from size ``m`` to ``n`` (``0 < m < n``). Raises
        :class:`TlogWitnessError` when the witness refuses, is unreachable or answers garbage, and
        :class:`~ledger.errors.VerificationError` when a cosignature from a configured key is invalid.
        """
        parsed = _note.parse_note(signed_note)
        _origin, size, _root, _ext = _checkpoint.parse_body(parsed.text)
        known = self.known_size
        old = known if known is not None and known <= size else 0
        conflicts = 0
        while True:
            proof = list(prove(old, size)) if 0 < old < size else []
            status, ctype, body = self._send(request_body(old, proof, signed_note))
            if status == 200:
                lines = self._verified_lines(parsed.text, body)
                self.known_size = size
                return lines
            if status == 409 and ctype.split(";")[0].strip().lower() == "text/x.tlog.size":
                m = _SIZE_BODY.fullmatch(body)
                if m is None:
                    raise TlogWitnessError("the witness's 409 answer is not a tree size", status=status)
                witness_size = int(m.group(1))
                self.known_size = witness_size
                if witness_size > size:
                    raise TlogWitnessError(
                        f"the witness has cosigned size {witness_size}, beyond this checkpoint's {size}",
                        status=status,
                    )
                conflicts += 1
                if witness_size == old or conflicts > 2:
                    # the witness holds another root for this size, or keeps moving: never retried blindly
                    raise TlogWitnessError(
                        f"the witness refused size {size} from size {old} (it reports size {witness_size})",
                        status=status,
                    )
                old = witness_size
                continue
            text = body[:200].decode("utf-8", "replace").strip()
            raise TlogWitnessError(f"the witness answered HTTP {status}: {text}", status=status)

    def _send(self, body: bytes) -> tuple[int, str, bytes]:
        try:
            status, ctype, answer = self._post(self.url + "/add-checkpoint", body, self.timeout)
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad URL
            raise TlogWitnessError(f"cannot reach the witness: {type(exc).__name__}: {exc}") from exc
        if len(answer) > _MAX_RESPONSE:
            raise TlogWitnessError("the witness's answer is too large", status=status)
        return status, ctype, answer

    def _verified_lines(self, text: str, body: bytes) -> list[str]:
        try:
            answer = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TlogWitnessError("the witness's answer is not UTF-8") from exc
        try:
            sigs = _note.parse_note(text + "\n" + answer).sigs
        except VerificationError as exc:
            raise TlogWitnessError(f"the witness's answer is not signature lines: {exc}") from exc
        raw_text = text.encode()
        out = []
        for sig in sigs:
            v = self._verifiers.get((sig.name, sig.key_id))
            if v is None:
                continue  # a key this log does not know: ignored
            if not v.verify(raw_text, sig.raw()):
                raise VerificationError(f"invalid cosignature from witness {sig.name}+{sig.key_id:08x}")
            out.append(sig.line())
        if not out:
            raise TlogWitnessError("the witness returned no cosignature from a configured witness key")
        return out


class CheckpointCosigner:
    """Submits each new checkpoint of ``ledger`` to tlog witnesses, on a background thread.

    The thread wakes on :meth:`notify` (the writer calls it after an append or an idle tick) or every
    ``interval`` seconds, and submits the latest signed checkpoint to each witness that has not cosigned
    it yet. A failure is logged and retried after a delay that doubles up to ``max_delay``; it never
    reaches the writer. :meth:`run_once` does one round on the calling thread.
    """

    def __init__(
        self,
        ledger: Any,
        clients: Sequence[TlogWitnessClient],
        *,
        interval: float = 5.0,
        max_delay: float = 300.0,
    ) -> None:
        self.ledger = ledger
        self.clients = list(clients)
        self.interval = interval
        self.max_delay = max_delay
        self._done: dict[int, int] = {}  # client position -> size it cosigned and we stored
        self._failures: dict[int, int] = {}
        self._retry_at: dict[int, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_urls(
        cls, ledger: Any, urls: Sequence[str], witness_keys: Sequence[str], **kw: Any
    ) -> CheckpointCosigner:
        timeout = kw.pop("timeout", 10.0)
        clients = [TlogWitnessClient(u, witness_keys, timeout=timeout) for u in parse_witness_urls(urls)]
        return cls(ledger, clients, **kw)

    def start(self) -> CheckpointCosigner:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tlog-witness-cosigner", daemon=True)
            self._thread.start()
        return self

    def notify(self) -> None:
        """A checkpoint may have been signed: submit it soon (returns at once)."""
        self._wake.set()

    def close(self, timeout: float = 15.0) -> None:
        """Stop the thread (waiting up to ``timeout`` seconds for a request under way)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # never let the thread die: the next round tries again
                _log.warning("tlogwitness.round_failed", error=f"{type(exc).__name__}: {exc}")
            self._wake.wait(self.interval)
            self._wake.clear()

    def run_once(self) -> int:
        """Submit the latest checkpoint to every witness due; returns how many cosignatures were stored."""
        latest = self.ledger.storage.latest_checkpoint()
        if latest is None:
            return 0
        size, signed = latest
        stored = 0
        now = time.monotonic()
        for pos, client in enumerate(self.clients):
            if self._stop.is_set():
                break
            if self._done.get(pos, -1) >= size or self._retry_at.get(pos, 0.0) > now:
                continue
            try:
                lines = client.submit(signed, self.ledger.consistency_proof)
                stored += self.ledger.add_cosignatures(signed + "".join(lines))
            except (LedgerError, OSError) as exc:
                failures = self._failures.get(pos, 0) + 1
                self._failures[pos] = failures
                delay = min(self.max_delay, self.interval * 2 ** (failures - 1))
                self._retry_at[pos] = time.monotonic() + delay
                _log.warning(
                    "tlogwitness.cosign_failed",
                    witness=client.url,
                    size=size,
                    status=getattr(exc, "status", None),
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 1),
                )
                continue
            self._done[pos] = size
            self._failures.pop(pos, None)
            self._retry_at.pop(pos, None)
            _log.info("tlogwitness.cosigned", witness=client.url, size=size)
        return stored
