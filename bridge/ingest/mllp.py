"""An asyncio MLLP listener: HL7 v2 in, FHIR bundles to Kafka, HL7 ACKs back.

Framing (MLLP release 2): ``0x0b`` + message + ``0x1c 0x0d``. One connection may carry many frames;
they are answered in order.

Acknowledgement rules (original mode, MSA-1):

* ``AA`` only after the broker acknowledged the bundle (``acks=all``), i.e. after
  ``Publisher.publish(...).get()`` returned.
* ``AE`` when the message is bad, or when nothing in it can be turned into FHIR (an unsupported
  message type: ERR-3 200; no segment we map: 100), and only once the raw message is in the dead
  letters with the reason. The ERR segment carries the located error (ERR-2 location
  ``segment^sequence^field^repetition^component``, ERR-3 the HL7 table 0357 code, ERR-8 the text).
* ``AR`` when the message could not be stored, in the bundles topic or in the dead letters: no
  broker, broker timeout, or a configuration error such as a missing signing key. The sender should
  retry.
* A duplicate is the same message again: the same bytes apart from MSH-7 and segment ends, within
  ``dedup_window`` seconds of its acceptance. It is acknowledged ``AA`` again and not re-published;
  concurrent copies wait for the first. A control id reused for other content is a new message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import multiprocessing
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from ssl import SSLContext
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.base import Adapter, ConvertedBundle, RejectedRecord, SourceInfo
from adapters.bundle import validate_bundle
from adapters.common.ucum import to_ucum
from adapters.errors import InternalAdapterError, ParseError
from bridge.config import Settings, TlsSettings
from bridge.errors import ERROR_ROOTS, BrokerUnavailable
from bridge.ingest.pipeline import conversion_headers, nothing_converted
from bridge.logging import get_logger
from bridge.stream.producer import Publisher
from bridge.tls import client_identity, server_context, warn_if_plaintext

log = get_logger(__name__)


START = b"\x0b"
FS = b"\x1c"
END = FS + b"\r"
MAX_FRAME = 16 * 1024 * 1024
_ack_counter = itertools.count(1)


def frame(message: bytes) -> bytes:
    """Wrap one HL7 message in an MLLP frame."""
    return START + message + END


def _esc(text: str, fs: str = "|", enc: str = "^~\\&") -> str:
    """Escape our own text for an ACK field, with the message's delimiters (``fs`` = MSH-1, ``enc`` =
    MSH-2: component, repetition, escape, subcomponent)."""
    chars = (enc + "^~\\&"[len(enc) :])[:4]
    comp, rep, esc, sub = chars[0], chars[1], chars[2], chars[3]
    return (
        text.replace(esc, f"{esc}E{esc}")
        .replace(fs, f"{esc}F{esc}")
        .replace(comp, f"{esc}S{esc}")
        .replace(sub, f"{esc}T{esc}")
        .replace(rep, f"{esc}R{esc}")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def _message_text(message: bytes) -> str:
    return message.decode("utf-8", errors="replace").lstrip("\ufeff\r\n\x0b ")


def _valid_delimiters(fs: str, enc: str) -> bool:
    """HL7's rule for MSH-1 and MSH-2: 4 encoding characters (5 from v2.7), all distinct, none a
    letter, digit or white space. Text escaped with anything else would be unreadable."""
    chars = fs + enc
    return (
        4 <= len(enc) <= 5
        and len(set(chars)) == len(chars)
        and not any(c.isalnum() or c.isspace() for c in chars)
    )


def _header_fields(message: bytes) -> dict[str, str]:
    """Best-effort MSH fields of an incoming message, for addressing the ACK (never raises).

    With valid delimiters the values are raw (still encoded with the message's own ``fs`` and
    ``encoding``), so that the ACK can copy them as they came. With an invalid MSH-2 the ACK uses the
    standard delimiters, and the values, whose components cannot be told apart, are escaped with
    those. With an unusable MSH-1 no field can be found: nothing is copied."""
    text = _message_text(message)
    if not text.startswith("MSH") or len(text) < 8:
        return {}
    fs = text[3]
    if fs.isalnum() or fs.isspace():
        return {}
    line = text.split("\r", 1)[0].split("\n", 1)[0]
    parts = line.split(fs)

    def get(n: int) -> str:  # MSH-n is parts[n - 1]
        return parts[n - 1] if len(parts) >= n else ""

    enc = get(2)
    own = _valid_delimiters(fs, enc)

    def value(n: int) -> str:
        return get(n) if own else _esc(get(n))

    if own:
        mtype = get(9).split(enc[0])
        trigger = mtype[1] if len(mtype) > 1 else ""
    else:
        fs, enc, trigger = "|", "^~\\&", ""
    return {
        "fs": fs,
        "encoding": enc,
        "sending_app": value(3),
        "sending_fac": value(4),
        "receiving_app": value(5),
        "receiving_fac": value(6),
        "control_id": value(10),
        "processing_id": value(11) or "P",
        "version": value(12) or "2.5",
        "trigger": trigger,
    }


def _segment_sequence(message: bytes, position: int | None) -> tuple[str, int | None]:
    """The segment ID at 1-based ``position`` in the message, and which occurrence of that ID it is
    (what ERL-1 and ERL-2 report)."""
    if position is None:
        return "", None
    text = _message_text(message)
    segments = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s]
    if not 1 <= position <= len(segments):
        return "", None
    fs = text[3] if len(text) > 3 else "|"  # the message's own MSH-1, even where the ACK cannot use it
    names = [s.split(fs, 1)[0][:3] for s in segments[:position]]
    return names[-1], names.count(names[-1])


def _content_digest(message: bytes) -> str:
    """What makes two messages the same message: SHA-256 of the bytes without MSH-7 (the time the
    sender built it, which a re-send after a lost ACK may renew), segment ends normalised and blank
    lines dropped. MSH-3, MSH-4 and MSH-10 are part of it."""
    data = message.removeprefix(b"\xef\xbb\xbf").lstrip(b"\r\n\x0b ")
    segments = [s for s in data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r") if s.strip()]
    if segments and segments[0][:3] == b"MSH" and len(segments[0]) > 3:
        fields = segments[0].split(segments[0][3:4])
        if len(fields) > 6:
            fields[6] = b""
            segments[0] = segments[0][3:4].join(fields)
    return hashlib.sha256(b"\r".join(segments)).hexdigest()


def build_ack(
    message: bytes, code: str, text: str = "", error: ParseError | None = None, err_code: str | None = None
) -> bytes:
    """An HL7 ACK for ``message`` with MSA-1 ``code`` (AA, AE or AR) and, for errors, an ERR segment.

    The ACK uses the message's own delimiters (MSH-1, MSH-2), so the sender's and receiver's
    application and facility (MSH-3..6, swapped), the control id (MSA-2) and the processing id and
    version are copied as they came, components included; only text fhirbridge writes is escaped.
    """
    h = _header_fields(message)
    fs, enc = h.get("fs", "|"), h.get("encoding", "^~\\&")
    comp = enc[0]
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    ctrl = f"ACK{int(time.time())}{next(_ack_counter):06d}"
    trigger = h.get("trigger", "")
    msh = fs.join(
        [
            "MSH",
            enc,
            h.get("receiving_app", "") or "FHIRBRIDGE",
            h.get("receiving_fac", ""),
            h.get("sending_app", ""),
            h.get("sending_fac", ""),
            now,
            "",
            comp.join(["ACK", trigger, "ACK"]) if trigger else "ACK",
            ctrl,
            h.get("processing_id", "") or "P",
            h.get("version", "") or "2.5",
        ]
    )
    segs = [msh, fs.join(["MSA", code, h.get("control_id", ""), _esc(text[:200], fs, enc)])]
    if code != "AA":
        erl = ""
        if error is not None:
            loc = error.location
            name, sequence = _segment_sequence(message, loc.segment_index)
            erl = comp.join(
                _esc(str(x), fs, enc) if x is not None else ""
                for x in (
                    loc.segment or name,
                    sequence,
                    loc.field,
                    loc.repetition,
                    loc.component,
                    loc.subcomponent,
                )
            ).rstrip(comp)
        ecode = err_code or ("207" if code == "AR" else "100")
        ename = {
            "100": "Segment sequence error",
            "101": "Required field missing",
            "102": "Data type error",
            "200": "Unsupported message type",
            "203": "Unsupported version id",
            "207": "Application internal error",
        }.get(ecode, "")
        msg = str(error) if error is not None else text
        segs.append(
            fs.join(
                [
                    "ERR",
                    "",
                    erl,
                    comp.join([ecode, _esc(ename, fs, enc), "HL70357"]),
                    "E",
                    "",
                    "",
                    "",
                    _esc(msg[:500], fs, enc),
                ]
            )
        )
    return ("\r".join(segs) + "\r").encode("utf-8")


def _err_code(error: ParseError) -> str:
    """The HL7 table 0357 code of a rejected message's error."""
    m = error.message.lower()
    loc = error.location
    if "empty" in m or "missing" in m:
        return "101"
    if loc.segment == "MSH" and loc.field == 9:
        return "200"
    if loc.segment == "MSH" and loc.field == 12:
        return "203"
    if "segment" in m:
        return "100"
    return "102"


class MllpServer:
    """Converts each framed message with ``adapter`` and publishes it; see the module docstring.

    ``publisher_factory`` returns a :class:`bridge.stream.producer.Publisher` (it is called again after a
    failure, so a broker that comes back is picked up); it may raise
    :class:`~bridge.errors.BrokerUnavailable`.
    """

    def __init__(
        self,
        adapter: Adapter,
        source: SourceInfo,
        publisher_factory: Callable[[], Any],
        *,
        dedup_window: float = 3600.0,
        ack_timeout: float = 30.0,
        max_dedup: int = 100_000,
        workers: int = 0,
    ) -> None:
        self.adapter = adapter
        self.source = source
        self.publisher_factory = publisher_factory
        self.dedup_window = dedup_window
        self.ack_timeout = ack_timeout
        self.max_dedup = max_dedup
        self._publisher: Any = None
        #: content digest of each message accepted within the window -> (when, its sender and control id)
        self._seen: OrderedDict[str, tuple[float, tuple[str, str, str]]] = OrderedDict()
        #: how many of those carry each (MSH-3, MSH-4, MSH-10): a reuse of a control id is logged
        self._ids: dict[tuple[str, str, str], int] = {}
        #: content digest -> whether the copy being processed was accepted
        self._inflight: dict[str, asyncio.Future[bool]] = {}
        self._lock = asyncio.Lock()
        self._publisher_lock = asyncio.Lock()
        self.server: asyncio.Server | None = None
        #: stop taking work (SIGTERM): each connection ends after answering the message in hand
        self.stopping = False
        #: whether the broker took the last record we sent (None: nothing sent yet); /readyz reads it
        self.broker_ok: bool | None = None
        self.broker_failed_at = 0.0  # monotonic time of the last refusal
        self._busy = 0  # messages read and not yet answered
        self._writers: set[asyncio.StreamWriter] = set()
        self.stats = {
            "received": 0,
            "aa": 0,
            "ae": 0,
            "ar": 0,
            "duplicates": 0,
            "reused_ids": 0,
            "dead_lettered": 0,
        }
        #: conversion is CPU-bound: with workers > 0 it runs in a pool of processes (spawned, so the
        #: Kafka producer's threads are never forked) and the event loop only does I/O.
        self._pool: ProcessPoolExecutor | None = None
        self._workers = workers
        if workers > 0:
            self._pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn")
            )

    # ------------------------------------------------------------------------------ networking
    async def start(self, host: str, port: int, ssl: SSLContext | None = None) -> asyncio.Server:
        """Listen on ``host``:``port`` (0: a free port, see :attr:`port`). With ``ssl`` (a context from
        :func:`bridge.tls.server_context`) the frames travel over TLS, and with a client CA in it only
        clients holding a certificate from that CA get through the handshake. Without TLS, an address
        other than loopback is logged as ``mllp.plaintext_bind``."""
        warn_if_plaintext("mllp.plaintext_bind", host, port, tls=ssl is not None)
        if self._pool is not None:  # spawn the workers and import the adapter before the first message
            loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(loop.run_in_executor(self._pool, _warm, type(self.adapter)) for _ in range(self._workers))
            )
        self.server = await asyncio.start_server(self._client, host, port, limit=MAX_FRAME, ssl=ssl)
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self._publisher is not None:
            pub, self._publisher = self._publisher, None
            await asyncio.get_running_loop().run_in_executor(None, _close_quietly, pub)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=False, cancel_futures=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        identity = client_identity(writer)  # mutual TLS: the verified certificate's subject
        if identity is not None:
            log.info("mllp.client", peer=str(peer), **identity.log_fields())
        self._writers.add(writer)
        try:
            while not self.stopping:
                try:
                    await reader.readuntil(START)
                    # the frame ends at FS; its trailing CR, if the sender wrote one, is skipped by the
                    # next readuntil(START), so a sender that omits it is still answered
                    data = await reader.readuntil(FS)
                except asyncio.IncompleteReadError:
                    break
                except asyncio.LimitOverrunError:
                    log.warning("mllp.frame_too_large", peer=str(peer), limit=MAX_FRAME)
                    writer.write(frame(build_ack(b"", "AR", f"frame larger than {MAX_FRAME} bytes")))
                    await writer.drain()
                    break
                if self.stopping:  # read while draining: no answer, so the sender sends it again
                    break
                message = data[: -len(FS)]
                if START in message:  # a new frame started before the previous ended: keep the last
                    partial, message = message.rsplit(START, 1)
                    # the sender gets no ACK for the unfinished one and sends it again, as MLLP expects
                    log.warning("mllp.partial_frame_discarded", peer=str(peer), bytes=len(partial))
                self._busy += 1
                try:
                    ack = await self.handle(message)
                    writer.write(frame(ack))
                    await writer.drain()
                finally:
                    self._busy -= 1
        except (ConnectionError, OSError) as exc:
            log.info("mllp.connection_lost", peer=str(peer), error=str(exc))
        finally:
            self._writers.discard(writer)
            writer.close()  # no wait_closed(): the transport closes on its own, also at shutdown

    async def drain(self, grace: float) -> None:
        """Stop taking work: close the listening socket, let every message in hand be answered (for at
        most ``grace`` seconds), then close the connections. A sender whose message got no answer
        sends it again to the next listener, as MLLP expects; nothing answered AA is lost."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while self._busy and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for writer in list(self._writers):
            writer.close()
        log.info("mllp.drained", unanswered=self._busy)

    # ------------------------------------------------------------------------------ processing
    async def handle(self, message: bytes) -> bytes:
        """Process one message and return the ACK bytes (unframed). Never raises."""
        self.stats["received"] += 1
        h = _header_fields(message)
        if not h.get("control_id"):  # nothing the sender could correlate a duplicate ACK with
            return (await self._process(message))[0]
        ids = (h.get("sending_app", ""), h.get("sending_fac", ""), h["control_id"])
        digest = _content_digest(message)
        async with self._lock:
            self._expire()
            if digest in self._seen:
                return self._duplicate(message, ids)
            pending = self._inflight.get(digest)
            if pending is None:
                fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                self._inflight[digest] = fut
                if self._ids.get(ids):
                    # a counter reset, or two feeds sharing ids: other content, so a new message
                    self.stats["reused_ids"] += 1
                    log.warning(
                        "mllp.control_id_reused",
                        message_id=ids[2],
                        sending_app=ids[0],
                        sending_facility=ids[1],
                    )
        if pending is not None:
            if await asyncio.shield(pending):
                return self._duplicate(message, ids)
            # the first copy was not kept: this one stands on its own
            ack, accepted = await self._process(message)
            if accepted:
                await self._remember(digest, ids)
            return ack
        try:
            ack, accepted = await self._process(message)
            if accepted:
                await self._remember(digest, ids)
            fut.set_result(accepted)
            return ack
        except BaseException:
            fut.set_result(False)
            raise
        finally:
            self._inflight.pop(digest, None)

    def _duplicate(self, message: bytes, ids: tuple[str, str, str]) -> bytes:
        self.stats["duplicates"] += 1
        self.stats["aa"] += 1
        log.info("mllp.duplicate", message_id=ids[2])
        return build_ack(message, "AA", "duplicate: already accepted")

    async def _remember(self, digest: str, ids: tuple[str, str, str]) -> None:
        async with self._lock:
            if digest not in self._seen:
                self._ids[ids] = self._ids.get(ids, 0) + 1
            self._seen[digest] = (time.monotonic(), ids)
            self._seen.move_to_end(digest)
            while len(self._seen) > self.max_dedup:
                self._forget_oldest()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.dedup_window
        while self._seen and next(iter(self._seen.values()))[0] < cutoff:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _digest, (_t, ids) = self._seen.popitem(last=False)
        left = self._ids.get(ids, 1) - 1
        if left > 0:
            self._ids[ids] = left
        else:
            self._ids.pop(ids, None)

    async def _process(self, message: bytes) -> tuple[bytes, bool]:
        """Convert and store one message: the ACK, and whether the bundle was accepted (AA)."""
        try:
            if self._pool is not None:
                loop = asyncio.get_running_loop()
                outcomes = await loop.run_in_executor(
                    self._pool, convert_all, self.adapter, self.source, message
                )
            else:
                outcomes = convert_all(self.adapter, self.source, message)
        except Exception as exc:  # a crashing adapter: report, do not drop the connection
            log.exception("mllp.adapter_crash")
            self.stats["ar"] += 1
            return build_ack(message, "AR", f"internal error: {type(exc).__name__}"), False
        rejected = [o for o in outcomes if isinstance(o, RejectedRecord)]
        bundles = [o for o in outcomes if isinstance(o, ConvertedBundle)]
        if rejected:
            err = rejected[0].error
            code = "207" if isinstance(err, InternalAdapterError) else _err_code(err)
        elif len(bundles) != 1:
            what = "no message in frame" if not bundles else "one message per MLLP frame expected"
            err, code = ParseError(what, adapter=self.adapter.name), "100"
        else:
            empty = nothing_converted(bundles[0], self.adapter.name)
            if empty is None:
                return await self._publish(message, bundles[0])
            err = empty
            code = "200" if (err.location.segment, err.location.field) == ("MSH", 9) else "100"
        log.info("mllp.rejected", error=str(err), code=code)
        # nothing is lost: the raw message goes to the dead letters with the located reason before
        # the sender is told (if that fails, AR: the sender keeps it and retries)
        stored = await self._dead_letter(message, err)
        if stored is not None:
            return stored, False
        if code == "207":  # our bug, not the sender's: retry later
            self.stats["ar"] += 1
            return build_ack(
                message, "AR", f"internal error, kept in the dead letters: {err.message}", err, code
            ), False
        self.stats["ae"] += 1
        return build_ack(message, "AE", err.message, err, code), False

    async def _get_publisher(self) -> Any:
        if self._publisher is None:
            async with self._publisher_lock:  # one producer, however many connections arrive at once
                if self._publisher is None:
                    loop = asyncio.get_running_loop()
                    self._publisher = await loop.run_in_executor(None, self.publisher_factory)
        return self._publisher

    async def _stored(self, message: bytes, send: Callable[[Any], Any]) -> bytes | None:
        """Run ``send(publisher)`` and wait for the broker's acknowledgement: ``None`` once the broker
        has the record, else the AR to answer (the sender keeps the message and sends it again)."""
        loop = asyncio.get_running_loop()
        try:
            publisher = await self._get_publisher()
            await asyncio.wait_for(_broker_ack(loop, send(publisher)), self.ack_timeout)
        except ERROR_ROOTS as exc:
            if isinstance(exc, BrokerUnavailable):
                self.broker_ok, self.broker_failed_at = False, time.monotonic()
            return self._reject(message, exc, reset=isinstance(exc, BrokerUnavailable))
        except Exception as exc:  # kafka errors (timeouts, not enough replicas, ...) -> retryable AR
            self.broker_ok, self.broker_failed_at = False, time.monotonic()
            return self._reject(message, exc, reset=True)
        self.broker_ok = True
        return None

    async def _dead_letter(self, message: bytes, err: ParseError) -> bytes | None:
        """Store a rejected message in the dead letters; ``None`` once the broker has it, else the AR."""
        failed = await self._stored(
            message,
            lambda publisher: publisher.dead_letter(
                message,
                error=err,
                stage=f"mllp:{self.adapter.name}",
                location=str(err.location),
                headers=conversion_headers(self.adapter.name, self.source),
            ),
        )
        if failed is None:
            self.stats["dead_lettered"] += 1
        return failed

    async def _publish(self, message: bytes, cb: ConvertedBundle) -> tuple[bytes, bool]:
        failed = await self._stored(
            message, lambda publisher: publisher.publish(cb, self.adapter, self.source)
        )
        if failed is not None:
            return failed, False
        self.stats["aa"] += 1
        log.info("mllp.accepted", message_id=cb.message_id, bundle_sha256=cb.sha256)
        return build_ack(message, "AA"), True

    def _reject(self, message: bytes, exc: BaseException, *, reset: bool) -> bytes:
        self.stats["ar"] += 1
        log.warning("mllp.not_stored", error=f"{type(exc).__name__}: {exc}")
        if reset and self._publisher is not None:
            pub, self._publisher = self._publisher, None
            # off the event loop: closing waits for the producer's I/O thread
            asyncio.get_running_loop().run_in_executor(None, _close_quietly, pub, 1.0)
        return build_ack(message, "AR", f"not stored, retry later: {type(exc).__name__}: {exc}")


def _warm(adapter_class: type) -> str:
    """Runs in a pool worker at start-up: the adapter's modules (and R4B models) get imported, and the
    UCUM parser built (about 0.3 s, which the first lab message would otherwise wait for)."""
    validate_bundle({"resourceType": "Bundle", "type": "transaction"})
    to_ucum("mg/dL")
    return adapter_class.__name__


def convert_all(adapter: Adapter, source: SourceInfo, message: bytes) -> list[Any]:
    """All outcomes of one framed message (module-level so that a process pool can run it)."""
    return list(adapter.convert(message, source, filename="mllp"))


def _broker_ack(loop: asyncio.AbstractEventLoop, future: Any) -> asyncio.Future[Any]:
    """An asyncio future resolved when kafka-python's produce future is (acks=all: all in-sync replicas).

    Callbacks run on the producer's I/O thread; they hand the result to the event loop thread-safely,
    so no executor thread is parked per in-flight message.
    """
    done: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if done.done():  # timed out and cancelled meanwhile
            return
        if exc is None:
            done.set_result(value)
        else:
            done.set_exception(exc)

    def ok(value: Any) -> None:
        loop.call_soon_threadsafe(settle, value, None)

    def failed(exc: BaseException) -> None:
        loop.call_soon_threadsafe(settle, None, exc)

    future.add_callback(ok)
    future.add_errback(failed)
    return done


def _close_quietly(pub: Any, timeout: float = 5) -> None:
    """Close a publisher; never raises (closing a broken producer must not mask the original problem).

    kafka-python's ``close`` flushes first and gives up, leaving the producer open (its I/O thread and
    sockets alive, its retries still sending), when records are still pending after ``timeout``. Then
    the I/O thread is stopped and the pending records are failed: their senders were answered AR.
    """
    try:
        pub.close(timeout)
        return
    except Exception as exc:
        log.info("mllp.producer_force_close", error=f"{type(exc).__name__}: {exc}")
    producer = getattr(pub, "producer", pub)
    sender = getattr(producer, "_sender", None)
    with contextlib.suppress(Exception):
        if sender is not None:
            sender.force_close()
            sender.join(timeout)
    with contextlib.suppress(Exception):
        producer.close(0)


async def serve_forever(
    host: str,
    port: int,
    adapter: Adapter,
    source: SourceInfo,
    *,
    dedup_window: float = 3600.0,
    ack_timeout: float = 30.0,
    workers: int = 0,
    tls: TlsSettings | None = None,
    health: tuple[str, int] | None = None,
    grace: float = 20.0,
) -> None:
    """Run the listener with the configured Kafka publisher until SIGTERM or SIGINT (or cancelled).
    ``tls`` (default: the ``FHIRBRIDGE_MLLP_TLS_*`` settings) is checked before anything starts: a
    :class:`~bridge.errors.ConfigError` if it cannot be served as configured. ``health``: serve
    ``/livez``, ``/readyz`` and ``/metrics`` on that address. On SIGTERM the listener stops taking
    work and answers what it holds within ``grace`` seconds (:meth:`MllpServer.drain`)."""
    settings = Settings.from_env()
    tls = settings.mllp.tls if tls is None else tls
    context = server_context(tls, env_prefix="FHIRBRIDGE_MLLP_TLS") if tls.enabled else None
    server = MllpServer(
        adapter,
        source,
        lambda: Publisher.from_settings(settings),
        dedup_window=dedup_window,
        ack_timeout=ack_timeout,
        workers=workers,
    )
    srv = await server.start(host, port, ssl=context)
    log.info(
        "mllp.listening",
        host=host,
        port=server.port,
        source=source.org_id,
        tls=context is not None,
        mutual_tls=context is not None and tls.client_ca_file is not None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = await _serve_health(server, *health) if health is not None else None
    try:
        async with srv:
            await stop.wait()
            log.info("mllp.stopping", grace_s=grace)
            await server.drain(grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.close()
        if runner is not None:
            await runner.cleanup()


#: seconds after the broker's last refusal during which /readyz says not ready
READY_AFTER_REFUSAL_S = 30.0


async def _serve_health(server: MllpServer, host: str, port: int) -> web.AppRunner:
    """``/livez`` (the event loop answers), ``/readyz`` (listening, not stopping, and the broker took
    the last record sent, if any) and ``/metrics``, on their own port."""

    async def livez(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "state": "stopping" if server.stopping else "running"})

    async def readyz(_: web.Request) -> web.Response:
        # a refusal counts for READY_AFTER_REFUSAL_S only: an unready listener gets no new traffic, so
        # nothing would ever clear it (and every replica hit by the same broker blip stays out)
        if server.broker_ok is False and time.monotonic() - server.broker_failed_at > READY_AFTER_REFUSAL_S:
            server.broker_ok = None
        checks = {
            "listener": "listening" if server.server is not None and not server.stopping else "closed",
            "broker": {
                None: "nothing sent yet",
                True: "took the last record",
                False: "refused the last record",
            }[server.broker_ok],
        }
        ok = checks["listener"] == "listening" and server.broker_ok is not False
        return web.json_response({"ok": ok, "checks": checks}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("health.listening", host=host, port=port)
    return runner
