"""An asyncio MLLP listener: HL7 v2 in, FHIR bundles to Kafka, HL7 ACKs back.

Framing (MLLP release 2): ``0x0b`` + message + ``0x1c 0x0d``. One connection may carry many frames;
they are answered in order.

Acknowledgement rules (original mode, MSA-1):

* ``AA`` only after the broker acknowledged the bundle (``acks=all``), i.e. after
  ``Publisher.publish(...).get()`` returned.
* ``AE`` when the message is bad: the ERR segment carries the located error (ERR-2 location
  ``segment^sequence^field^repetition^component``, ERR-3 the HL7 table 0357 code, ERR-8 the text).
* ``AR`` when the message could not be stored: no broker, broker timeout, or a configuration error
  such as a missing signing key. The sender should retry.
* A message whose MSH-10 (with MSH-3/MSH-4) was already published within ``dedup_window`` seconds is
  acknowledged ``AA`` again and not re-published. Concurrent duplicates wait for the first copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bridge.errors import BrokerUnavailable, FhirbridgeError
from bridge.logging import get_logger

if TYPE_CHECKING:
    from adapters.base import Adapter, ConvertedBundle, SourceInfo
    from adapters.errors import ParseError


def _log() -> Any:
    """The logger, looked up per use (a module-level cached proxy would pin a closed stream in tests)."""
    return get_logger("bridge.mllp")


START = b"\x0b"
END = b"\x1c\r"
MAX_FRAME = 16 * 1024 * 1024
_ack_counter = itertools.count(1)


def frame(message: bytes) -> bytes:
    """Wrap one HL7 message in an MLLP frame."""
    return START + message + END


def _esc(text: str) -> str:
    """Escape text for an ACK field (standard delimiters)."""
    return (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def _header_fields(message: bytes) -> dict[str, str]:
    """Best-effort MSH fields of an incoming message, for addressing the ACK (never raises)."""
    try:
        text = message.decode("utf-8", errors="replace").lstrip("\ufeff\r\n\x0b ")
    except Exception:  # pragma: no cover - decode with errors=replace does not raise
        return {}
    if not text.startswith("MSH") or len(text) < 8:
        return {}
    fs = text[3]
    line = text.split("\r", 1)[0].split("\n", 1)[0]
    parts = line.split(fs)

    def get(n: int) -> str:  # MSH-n is parts[n - 1]
        return parts[n - 1] if len(parts) >= n else ""

    comp = get(2)[:1] or "^"
    mtype = get(9).split(comp)
    return {
        "sending_app": get(3),
        "sending_fac": get(4),
        "receiving_app": get(5),
        "receiving_fac": get(6),
        "control_id": get(10),
        "processing_id": get(11) or "P",
        "version": (get(12).split(comp)[0] or "2.5"),
        "trigger": mtype[1] if len(mtype) > 1 else "",
        "encoding": get(2) or "^~\\&",
    }


def build_ack(
    message: bytes, code: str, text: str = "", error: ParseError | None = None, err_code: str | None = None
) -> bytes:
    """An HL7 ACK for ``message`` with MSA-1 ``code`` (AA, AE or AR) and, for errors, an ERR segment."""
    h = _header_fields(message)
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    ctrl = f"ACK{int(time.time())}{next(_ack_counter):06d}"
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            _esc(h.get("receiving_app", "")) or "FHIRBRIDGE",
            _esc(h.get("receiving_fac", "")),
            _esc(h.get("sending_app", "")),
            _esc(h.get("sending_fac", "")),
            now,
            "",
            f"ACK^{_esc(h.get('trigger', ''))}^ACK" if h.get("trigger") else "ACK",
            ctrl,
            _esc(h.get("processing_id", "P")) or "P",
            _esc(h.get("version", "2.5")) or "2.5",
        ]
    )
    segs = [msh, f"MSA|{code}|{_esc(h.get('control_id', ''))}|{_esc(text[:200])}"]
    if code != "AA":
        erl = ""
        if error is not None:
            loc = error.location
            erl = "^".join(
                _esc(str(x)) if x is not None else ""
                for x in (
                    loc.segment or "",
                    loc.segment_index,
                    loc.field,
                    loc.repetition,
                    loc.component,
                    loc.subcomponent,
                )
            )
            erl = erl.rstrip("^")
        ecode = err_code or ("207" if code == "AR" else "100")
        ename = {
            "100": "Segment sequence error",
            "101": "Required field missing",
            "102": "Data type error",
            "200": "Unsupported message type",
            "207": "Application internal error",
        }.get(ecode, "")
        msg = str(error) if error is not None else text
        segs.append(f"ERR||{erl}|{ecode}^{ename}^HL70357|E||||{_esc(msg[:500])}")
    return ("\r".join(segs) + "\r").encode("utf-8")


def _err_code(error: ParseError) -> str:
    m = error.message.lower()
    if "empty" in m or "missing" in m:
        return "101"
    if "segment" in m:
        return "100"
    return "102"


class MllpServer:
    """Converts each framed message with ``adapter`` and publishes it; see the module docstring.

    ``publisher_factory`` returns a :class:`bridge.publish.Publisher` (it is called again after a
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
        self._seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._inflight: dict[tuple[str, str, str], asyncio.Future[bytes]] = {}
        self._lock = asyncio.Lock()
        self._publisher_lock = asyncio.Lock()
        self.server: asyncio.Server | None = None
        self.stats = {"received": 0, "aa": 0, "ae": 0, "ar": 0, "duplicates": 0}
        #: conversion is CPU-bound: with workers > 0 it runs in a pool of processes (spawned, so the
        #: Kafka producer's threads are never forked) and the event loop only does I/O.
        self._pool: ProcessPoolExecutor | None = None
        self._workers = workers
        if workers > 0:
            self._pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn")
            )

    # ------------------------------------------------------------------------------ networking
    async def start(self, host: str, port: int) -> asyncio.Server:
        if self._pool is not None:  # spawn the workers and import the adapter before the first message
            loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(loop.run_in_executor(self._pool, _warm, type(self.adapter)) for _ in range(self._workers))
            )
        self.server = await asyncio.start_server(self._client, host, port, limit=MAX_FRAME)
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
        try:
            while True:
                try:
                    await reader.readuntil(START)
                    data = await reader.readuntil(END)
                except asyncio.IncompleteReadError:
                    break
                except asyncio.LimitOverrunError:
                    _log().warning("mllp.frame_too_large", peer=str(peer), limit=MAX_FRAME)
                    writer.write(frame(build_ack(b"", "AR", f"frame larger than {MAX_FRAME} bytes")))
                    await writer.drain()
                    break
                message = data[: -len(END)]
                if START in message:  # a new frame started before the previous ended: keep the last
                    message = message.rsplit(START, 1)[1]
                ack = await self.handle(message)
                writer.write(frame(ack))
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            _log().info("mllp.connection_lost", peer=str(peer), error=str(exc))
        finally:
            writer.close()  # no wait_closed(): the transport closes on its own, also at shutdown

    # ------------------------------------------------------------------------------ processing
    async def handle(self, message: bytes) -> bytes:
        """Process one message and return the ACK bytes (unframed). Never raises."""
        self.stats["received"] += 1
        from adapters.base import ConvertedBundle, RejectedRecord

        try:
            if self._pool is not None:
                loop = asyncio.get_running_loop()
                outcomes = await loop.run_in_executor(
                    self._pool, convert_all, self.adapter, self.source, message
                )
            else:
                outcomes = convert_all(self.adapter, self.source, message)
        except Exception as exc:  # a crashing adapter: report, do not drop the connection
            _log().exception("mllp.adapter_crash")
            self.stats["ar"] += 1
            return build_ack(message, "AR", f"internal error: {type(exc).__name__}")
        rejected = [o for o in outcomes if isinstance(o, RejectedRecord)]
        bundles = [o for o in outcomes if isinstance(o, ConvertedBundle)]
        if rejected or not bundles:
            self.stats["ae"] += 1
            if rejected:
                err = rejected[0].error
                _log().info("mllp.rejected", error=str(err))
                return build_ack(message, "AE", err.message, err, _err_code(err))
            return build_ack(message, "AE", "no message in frame", None, "100")
        if len(bundles) > 1:
            self.stats["ae"] += 1
            return build_ack(message, "AE", "one message per MLLP frame expected", None, "100")
        cb = bundles[0]
        h = _header_fields(message)
        key = (h.get("sending_app", ""), h.get("sending_fac", ""), cb.message_id or "")
        if not cb.message_id:
            return await self._publish(message, cb)
        async with self._lock:
            self._expire()
            if key in self._seen:
                self.stats["duplicates"] += 1
                self.stats["aa"] += 1
                _log().info("mllp.duplicate", message_id=cb.message_id)
                return build_ack(message, "AA", "duplicate: already accepted")
            pending = self._inflight.get(key)
            if pending is None:
                fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                self._inflight[key] = fut
        if pending is not None:
            first_ack = await asyncio.shield(pending)
            if b"MSA|AA|" in first_ack:
                self.stats["duplicates"] += 1
                self.stats["aa"] += 1
                return build_ack(message, "AA", "duplicate: already accepted")
            return await self.handle_again(message, cb, key)
        try:
            ack = await self._publish(message, cb)
            if b"MSA|AA|" in ack:
                async with self._lock:
                    self._seen[key] = time.monotonic()
                    while len(self._seen) > self.max_dedup:
                        self._seen.popitem(last=False)
            fut.set_result(ack)
            return ack
        except BaseException:
            fut.set_result(build_ack(message, "AR", "cancelled"))
            raise
        finally:
            self._inflight.pop(key, None)

    async def handle_again(self, message: bytes, cb: ConvertedBundle, key: tuple[str, str, str]) -> bytes:
        """A duplicate of a copy that was not accepted: try publishing this one."""
        ack = await self._publish(message, cb)
        if b"MSA|AA|" in ack:
            async with self._lock:
                self._seen[key] = time.monotonic()
        return ack

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.dedup_window
        while self._seen:
            _key, t = next(iter(self._seen.items()))
            if t >= cutoff:
                break
            self._seen.popitem(last=False)

    async def _publish(self, message: bytes, cb: ConvertedBundle) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            if self._publisher is None:
                async with self._publisher_lock:  # one producer, however many connections arrive at once
                    if self._publisher is None:
                        self._publisher = await loop.run_in_executor(None, self.publisher_factory)
            future = self._publisher.publish(cb, self.adapter, self.source)
            await asyncio.wait_for(_broker_ack(loop, future), self.ack_timeout)
        except FhirbridgeError as exc:
            return self._reject(message, exc, reset=isinstance(exc, BrokerUnavailable))
        except Exception as exc:  # kafka errors (timeouts, not enough replicas, ...) -> retryable AR
            return self._reject(message, exc, reset=True)
        self.stats["aa"] += 1
        _log().info("mllp.accepted", message_id=cb.message_id, bundle_sha256=cb.sha256)
        return build_ack(message, "AA")

    def _reject(self, message: bytes, exc: BaseException, *, reset: bool) -> bytes:
        self.stats["ar"] += 1
        _log().warning("mllp.not_stored", error=f"{type(exc).__name__}: {exc}")
        if reset and self._publisher is not None:
            pub, self._publisher = self._publisher, None
            _close_quietly(pub, timeout=0)
        return build_ack(message, "AR", f"not stored, retry later: {type(exc).__name__}: {exc}")


def _warm(adapter_class: type) -> str:
    """Runs in a pool worker at start-up: the adapter's modules (and R4B models) get imported."""
    from adapters.bundle import validate_bundle

    validate_bundle({"resourceType": "Bundle", "type": "transaction"})
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
    with contextlib.suppress(Exception):  # closing a broken producer must not mask the original problem
        pub.close(timeout)


async def serve_forever(
    host: str,
    port: int,
    adapter: Adapter,
    source: SourceInfo,
    *,
    dedup_window: float = 3600.0,
    ack_timeout: float = 30.0,
    workers: int = 0,
) -> None:
    """Run the listener with the configured Kafka publisher until cancelled."""
    from bridge.config import Settings
    from bridge.publish import Publisher

    settings = Settings.from_env()
    server = MllpServer(
        adapter,
        source,
        lambda: Publisher.from_settings(settings),
        dedup_window=dedup_window,
        ack_timeout=ack_timeout,
        workers=workers,
    )
    srv = await server.start(host, port)
    _log().info("mllp.listening", host=host, port=server.port, source=source.org_id)
    try:
        async with srv:
            await srv.serve_forever()
    finally:
        await server.close()
