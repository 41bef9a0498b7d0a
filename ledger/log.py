"""The ledger: an append-only, idempotent Merkle log of :class:`LedgerEntry` records.

Appends are batched into one durable transaction per :meth:`Ledger.append` call, cost O(log n) node
hashes per entry (amortised O(1)) through the tile right edge, and sign a C2SP checkpoint every
``checkpoint_every`` entries or ``checkpoint_interval_ms`` milliseconds. Proofs read O(log n) stored
nodes (a handful of tiles). See ``docs/ledger.md``.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ledger import checkpoint as _checkpoint
from ledger import merkle
from ledger import note as _note
from ledger.entry import LedgerEntry, canonical_many
from ledger.errors import InvalidEntry, InvalidKey, LedgerError, OutOfRange, VerificationError
from ledger.storage import Connector, InsertRow, Storage, Txn, dedup_keys, leaf_key, leaf_keys, open_storage
from ledger.tiles import TILE_WIDTH, TileBuilder, locate, needed_tiles, node_in_blob

__all__ = ["Ledger", "LedgerEntry"]

_TILE_CACHE = 512  # complete tiles never change, so they can be cached (16 KB each at most)


class Ledger:
    """A verifiable log over a :class:`~ledger.storage.Storage`. Thread-safe; one writer process."""

    def __init__(
        self,
        storage: Storage,
        *,
        origin: str,
        signer_key: str | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval_ms: int = 1000,
        witness_keys: Sequence[str] = (),
    ) -> None:
        if not origin or "\n" in origin or origin != origin.strip():
            raise LedgerError("the log origin must be one non-empty line without surrounding spaces")
        if checkpoint_every < 1 or checkpoint_interval_ms < 0:
            raise LedgerError("checkpoint_every must be >= 1 and checkpoint_interval_ms >= 0")
        self._storage = storage
        self.origin = origin
        # Keys read from files usually end with a newline; the key syntax itself has no whitespace.
        self._signer = _note.Signer.from_text(signer_key.strip()) if signer_key else None
        if self._signer is not None and self._signer.alg != _note.ALG_ED25519:
            raise InvalidKey("the log key must be an Ed25519 note key (algorithm 0x01)")
        self.verifier_key = self._signer.verifier().to_text() if self._signer else None
        self._witnesses = [_note.Verifier.from_text(k.strip()) for k in witness_keys]
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_ms = checkpoint_interval_ms
        self._builder: TileBuilder | None = None
        self._builder_epoch = -1
        self._lock = threading.RLock()
        self._tile_cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._epoch = -1

    @classmethod
    def open(
        cls,
        connector: Connector,
        *,
        origin: str,
        signer_key: str | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval_ms: int = 1000,
        witness_keys: Sequence[str] = (),
    ) -> Ledger:
        """Open the log in the database ``connector`` connects to, creating it (fhirbridge opens it with
        ``bridge.stores.ledger.open_ledger(url, ...)``).

        ``signer_key`` (``PRIVATE+KEY+...``) is needed only by the writer; ``witness_keys`` are the
        verifier keys whose cosignatures :meth:`add_cosignatures` accepts. Raises
        :class:`~ledger.errors.StorageUnavailable`, :class:`~ledger.errors.InvalidKey` or
        :class:`~ledger.errors.LedgerError` (another log's database, bad URL).
        """
        storage = open_storage(connector, origin)
        try:
            return cls(
                storage,
                origin=origin,
                signer_key=signer_key,
                checkpoint_every=checkpoint_every,
                checkpoint_interval_ms=checkpoint_interval_ms,
                witness_keys=witness_keys,
            )
        except BaseException:
            storage.close()
            raise

    # -- writing ------------------------------------------------------------------------------------
    def append(self, entries: Sequence[LedgerEntry]) -> list[int]:
        """Append ``entries`` in one transaction, durable when this returns; their indices, in order.

        Idempotent: an entry whose ``(bundle_sha256, source_org)`` is already logged (or earlier in
        the same batch) gets the existing index and is not appended again. Signs a checkpoint in the
        same transaction when due. Raises :class:`~ledger.errors.InvalidEntry` /
        :class:`~ledger.errors.EntryTooLarge` (nothing is written) or
        :class:`~ledger.errors.StorageUnavailable` (nothing is written; retry later).
        """
        if not entries:
            return []
        # Everything that needs no database is done before locking: validation and canonical JSON
        # (nothing is written on error), the idempotency keys and the leaf hashes.
        datas = canonical_many(entries)
        try:
            keys = [(e.bundle_sha256, e.source_org) for e in entries]
            dkeys = dedup_keys([b for b, _ in keys])
        except (AttributeError, TypeError, ValueError) as exc:  # not a LedgerEntry
            raise InvalidEntry("append() takes LedgerEntry objects") from exc
        sha256 = hashlib.sha256
        leaves = [sha256(b"\x00" + d).digest() for d in datas]  # merkle.leaf_hash, inlined
        with self._lock:
            try:
                with self._storage.write() as txn:
                    return self._append_locked(txn, keys, dkeys, datas, leaves)
            except BaseException:
                self._builder = None  # the in-memory right edge may be ahead of the database
                raise

    def _edge(self, txn: Txn, size: int, epoch: int) -> TileBuilder:
        # The in-memory right edge is reused only if nobody else appended or reset since.
        b = self._builder
        if b is None or b.size != size or self._builder_epoch != epoch:
            try:
                b = TileBuilder(size, txn.last_tiles())
            except ValueError as exc:
                raise LedgerError(f"stored tiles are inconsistent with the log size: {exc}") from exc
            self._builder = b
            self._builder_epoch = epoch
        return b

    def _append_locked(
        self,
        txn: Txn,
        keys: list[tuple[str, str]],
        dkeys: list[int],
        datas: list[bytes],
        leaves: list[bytes],
    ) -> list[int]:
        size, epoch = txn.size_epoch()
        builder = self._edge(txn, size, epoch)
        existing = txn.find_many(keys, dkeys)
        nxt = size
        # distinct dedup keys imply distinct (bundle, source) keys; equal ones (a replay within the
        # batch, or a rare 32-bit collision) take the exact per-entry path
        if not existing and len(set(dkeys)) == len(dkeys):
            # The common batch: every entry is new. Vectorised: one comprehension per column.
            nxt = size + len(keys)
            out = list(range(size, nxt))
            new_leaves = leaves
            rows: list[InsertRow] = list(
                zip(
                    out,
                    leaves,
                    datas,
                    dkeys,
                    leaf_keys(leaves),
                    strict=True,
                )
            )
        else:
            out = []
            rows = []
            new_leaves = []
            for key, data, dkey, leaf in zip(keys, datas, dkeys, leaves, strict=True):
                idx = existing.get(key)
                if idx is None:
                    idx = nxt
                    nxt += 1
                    existing[key] = idx
                    new_leaves.append(leaf)
                    rows.append((idx, leaf, data, dkey, leaf_key(leaf)))
                out.append(idx)
        if rows:
            builder.append(new_leaves)
            txn.insert_entries(rows)
            txn.put_tiles(builder.take_dirty())
            txn.set_size(nxt)
        if self._signer is not None and nxt > 0:
            last = txn.last_checkpoint()
            now = time.time()
            if last is None or (
                nxt > last[0]
                and (
                    nxt - last[0] >= self.checkpoint_every
                    or (now - last[1]) * 1000 >= self.checkpoint_interval_ms
                )
            ):
                self._sign_locked(txn, nxt, builder.root(), now)
        return out

    def _sign_locked(self, txn: Txn, size: int, root: bytes, now: float) -> str:
        assert self._signer is not None
        note = _note.sign_note(_checkpoint.body(self.origin, size, root), [self._signer])
        txn.put_checkpoint(size, root, note, now)
        return note

    def checkpoint_now(self) -> str | None:
        """Sign and store a checkpoint for the current size (if none exists at that size yet).

        Returns the stored note for the current size, or None without a signer key or when the log
        is empty. Raises :class:`~ledger.errors.StorageUnavailable`.
        """
        if self._signer is None:
            return None
        with self._lock:
            try:
                with self._storage.write() as txn:
                    size, epoch = txn.size_epoch()
                    if size == 0:
                        return None
                    last = txn.last_checkpoint()
                    if last is None or last[0] < size:
                        self._sign_locked(txn, size, self._edge(txn, size, epoch).root(), time.time())
            except BaseException:
                self._builder = None
                raise
        return self._storage.checkpoint_at(size)

    def maybe_checkpoint(self) -> str | None:
        """Sign a checkpoint if entries are unsigned and ``checkpoint_interval_ms`` has passed since the
        last one (at once when there is none); returns the new note, else None.

        For an idle consumer to call periodically, so that the last entries of a burst get signed within
        the interval, and no sooner: a log that signs every N minutes keeps that cadence when idle.
        """
        if self._signer is None:
            return None
        latest = self._storage.latest_checkpoint()
        size = self.size()
        if size == 0 or (latest is not None and latest[0] >= size):
            return None  # nothing unsigned: no write transaction
        with self._lock:
            try:
                with self._storage.write() as txn:
                    size, epoch = txn.size_epoch()
                    last = txn.last_checkpoint()
                    now = time.time()
                    if size == 0 or (
                        last is not None
                        and (last[0] >= size or (now - last[1]) * 1000 < self.checkpoint_interval_ms)
                    ):
                        return None
                    self._sign_locked(txn, size, self._edge(txn, size, epoch).root(), now)
            except BaseException:
                self._builder = None
                raise
        return self._storage.checkpoint_at(size)

    def reset(self) -> None:
        """Delete every entry, tile, checkpoint and cosignature: the log restarts empty.

        DANGER: this destroys the log's history. Checkpoints already published or cosigned by
        witnesses become unprovable, and witnesses will refuse (and record as a rollback) any smaller
        checkpoint this log signs afterwards. Only for ``fhirbridge replay --rebuild`` on a log that was
        never published, or after deliberately retiring the origin.
        """
        with self._lock:
            self._storage.reset()
            self._builder = None
            self._tile_cache.clear()

    def claim_writer(self, holder: str, idle_in_transaction_ms: int | None = None) -> int:
        """Make this handle the log's only writer: returns the new writer epoch. Any append or
        checkpoint through another handle that claimed before is refused from now on
        (:class:`~ledger.errors.WriterFenced`), as are this handle's once another one claims."""
        with self._lock:
            self._builder = None
            return self._storage.claim_writer(holder, idle_in_transaction_ms)

    def writer(self) -> tuple[int, str, float] | None:
        """The current writer's epoch, name and claim time, or ``None`` if nobody claimed the log."""
        return self._storage.writer()

    def close(self) -> None:
        """Close the database connection; safe to call twice."""
        self._storage.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------------------
    def size(self) -> int:
        """The number of committed entries."""
        return self._storage.size()

    def find(self, bundle_sha256: str, source_org: str) -> int | None:
        """The index of the entry for ``(bundle_sha256, source_org)``, or None."""
        return self._storage.find(bundle_sha256, source_org)

    def find_many(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The index of every logged ``(bundle_sha256, source_org)`` of ``keys`` (absent: not logged),
        in a few queries however many keys there are."""
        return self._storage.find_many_committed(keys)

    def find_leaf(self, leaf_hash: bytes) -> int | None:
        """The (first) index whose leaf hash is ``leaf_hash``, or None."""
        return self._storage.find_leaf(leaf_hash)

    def entry(self, index: int) -> LedgerEntry:
        """The entry at ``index``; raises :class:`~ledger.errors.OutOfRange` when there is none."""
        row = self._storage.get_entry(index)
        if row is None:
            raise OutOfRange(f"no entry at index {index}", value=index, limit=self.size())
        return LedgerEntry.from_canonical(row.entry)

    def leaf_hash(self, index: int) -> bytes:
        """The stored leaf hash at ``index``; raises :class:`~ledger.errors.OutOfRange`."""
        row = self._storage.get_entry(index)
        if row is None:
            raise OutOfRange(f"no entry at index {index}", value=index, limit=self.size())
        return row.leaf_hash

    def _fold(self, ranges: Sequence[tuple[int, int]], check_size: int | None = None) -> list[bytes]:
        """The MTH of each RFC 9162 subtree range, from the stored perfect nodes (O(log n) tiles).

        With ``check_size``, first check that the log holds that many entries (as :meth:`_check_size`),
        reading the size in the same statement as the tiles: one database round trip per proof.
        """
        plans = [merkle.perfect_nodes(lo, hi) for lo, hi in ranges]
        need = needed_tiles(node for plan in plans for node in plan)
        blobs: dict[tuple[int, int], tuple[int, bytes]] = {}
        missing = set()
        cache = self._tile_cache
        for key in need:
            blob = cache.get(key)
            if blob is not None:
                blobs[key] = (TILE_WIDTH, blob)
            else:
                missing.add(key)
        fetched: dict[tuple[int, int], tuple[int, bytes]] = {}
        if check_size is not None:
            current, epoch, fetched = self._storage.size_epoch_tiles(missing)
            if epoch != self._epoch:  # reset by another process: the cached tiles are stale, read all
                self._check_size(check_size)
                return self._fold(ranges)
            if not 0 <= check_size <= current:
                raise OutOfRange(
                    f"tree size {check_size} is beyond the log size {current}",
                    value=check_size,
                    limit=current,
                )
        elif missing:
            fetched = self._storage.get_tiles(missing)
        if fetched:
            for key, (width, blob) in fetched.items():
                blobs[key] = (width, blob)
                if width == TILE_WIDTH:
                    with self._lock:
                        cache[key] = blob
                        if len(cache) > _TILE_CACHE:
                            cache.popitem(last=False)

        def get(level: int, index: int) -> bytes:
            k, t, r, pos = locate(level, index)
            found = blobs.get((k, t))
            h = node_in_blob(found[1], found[0], r, pos) if found else None
            if h is None:
                raise LedgerError(f"tree node ({level}, {index}) is missing from storage")
            return h

        out = []
        node_hash = merkle.node_hash
        for plan in plans:
            h = get(*plan[-1])
            for level, idx in reversed(plan[:-1]):
                h = node_hash(get(level, idx), h)
            out.append(h)
        return out

    def _check_size(self, size: int) -> None:
        current, epoch = self._storage.size_epoch()
        if epoch != self._epoch:  # another process reset the log: cached complete tiles are stale
            with self._lock:
                self._tile_cache.clear()
                self._epoch = epoch
        if not 0 <= size <= current:
            raise OutOfRange(f"tree size {size} is beyond the log size {current}", value=size, limit=current)

    def root_hash(self, size: int | None = None) -> bytes:
        """The RFC 9162 root at ``size`` (default: the current size), from O(log n) stored nodes."""
        if size is None:
            size = self.size()
        self._check_size(size)
        if size == 0:
            return merkle.EMPTY_ROOT
        return self._fold([(0, size)])[0]

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """The inclusion proof of ``index`` in the tree of ``size`` entries (``0 <= index < size``).

        Raises :class:`~ledger.errors.OutOfRange`.
        """
        return self._fold(merkle.inclusion_ranges(index, size), check_size=size)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """The consistency proof between sizes ``0 < size1 <= size2 <= size()``.

        Raises :class:`~ledger.errors.OutOfRange`.
        """
        return self._fold(merkle.consistency_ranges(size1, size2), check_size=size2)

    def latest_checkpoint(self) -> str | None:
        """The latest signed checkpoint note with any stored witness cosignature lines appended."""
        latest = self._storage.latest_checkpoint()
        return None if latest is None else self._cosigned(*latest)

    def checkpoint_at(self, size: int) -> str | None:
        """The stored checkpoint for exactly ``size`` entries (with cosignatures), or None."""
        note = self._storage.checkpoint_at(size)
        return None if note is None else self._cosigned(size, note)

    def _cosigned(self, size: int, note: str) -> str:
        """A stored checkpoint note with the witness cosignature lines stored for its size appended."""
        return note + "".join(self._storage.cosignatures(size))

    def add_cosignatures(self, cosigned_note: str) -> int:
        """Store the witness cosignatures found on ``cosigned_note`` (a checkpoint this log signed).

        Only signatures from the configured ``witness_keys`` are checked and kept; returns how many
        were stored. Raises :class:`~ledger.errors.VerificationError` when the note is malformed, is
        not a checkpoint this log stored, or carries no valid configured cosignature.
        """
        parsed = _note.parse_note(cosigned_note)
        origin, size, _root, _ext = _checkpoint.parse_body(parsed.text)
        stored = self._storage.checkpoint_at(size)
        if origin != self.origin or stored is None or _note.parse_note(stored).text != parsed.text:
            raise VerificationError("the cosigned checkpoint is not one this log signed")
        known = {(w.name, w.key_id): w for w in self._witnesses}
        text = parsed.text.encode()
        count = 0
        for sig in parsed.sigs:
            w = known.get((sig.name, sig.key_id))
            if w is None or w.alg != _note.ALG_COSIGNATURE_V1:
                continue
            if not w.verify(text, sig.raw()):
                raise VerificationError(f"invalid cosignature from {sig.name}+{sig.key_id:08x}")
            self._storage.put_cosignature(size, sig.name, sig.key_id, sig.line(), time.time())
            count += 1
        if count == 0:
            raise VerificationError("no valid cosignature from a configured witness")
        return count

    def prove(self, bundle_sha256: str, source_org: str) -> dict[str, Any] | None:
        """Everything a client needs to check that a bundle is in the log, or None if it is not.

        Returns ``{"index", "size", "leaf_hash", "entry", "proof", "checkpoint"}`` with base64 hashes,
        proven against the latest signed checkpoint (``size`` is that checkpoint's size). When the
        entry is newer than the latest checkpoint, ``proof`` is None and ``checkpoint`` is the latest
        one (the entry will be covered by the next checkpoint).
        """
        index = self.find(bundle_sha256, source_org)
        if index is None:
            return None
        row = self._storage.get_entry(index)
        assert row is not None
        latest = self._storage.latest_checkpoint()  # read once: the note and the proof are for one size
        note = None if latest is None else self._cosigned(*latest)
        out: dict[str, Any] = {
            "index": index,
            "leaf_hash": base64.b64encode(row.leaf_hash).decode(),
            "entry": LedgerEntry.from_canonical(row.entry).to_dict(),
            "size": None,
            "proof": None,
            "checkpoint": note,
        }
        if latest is not None and index < latest[0]:
            out["size"] = latest[0]
            out["proof"] = [base64.b64encode(h).decode() for h in self.inclusion_proof(index, latest[0])]
        return out

    @property
    def storage(self) -> Storage:
        return self._storage
