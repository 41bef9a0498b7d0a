"""Hash tiles: how the log stores every perfect Merkle node in O(n) space and reads any one cheaply.

A tile at tile-level ``k`` and index ``t`` holds the nodes of tree levels ``8k .. 8k+7`` below one
level-``8(k+1)`` node: up to 256 nodes at its bottom level, 128 above, ... 2 at the top. Its stored form
is ``width`` (how many bottom nodes exist, 1..256) and a blob of the levels concatenated bottom-up, level
``r`` holding ``width >> r`` hashes. A partial tile is rewritten as the log grows; a complete tile never
changes. Any perfect node (level, index) lives in exactly one tile, so a proof of O(log n) nodes reads
O(log n / 8) tiles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from hashlib import sha256

from ledger.merkle import EMPTY_ROOT, HASH_SIZE, hash_range

__all__ = ["TILE_HEIGHT", "TILE_WIDTH", "Tile", "TileBuilder", "level_offset", "locate", "tile_key"]

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
_KEY_SHIFT = 48


def tile_key(k: int, t: int) -> int:
    """A single integer key for tile (tile-level ``k``, index ``t``) used as the storage primary key."""
    return (k << _KEY_SHIFT) | t


def split_key(key: int) -> tuple[int, int]:
    return key >> _KEY_SHIFT, key & ((1 << _KEY_SHIFT) - 1)


def locate(level: int, index: int) -> tuple[int, int, int, int]:
    """``(k, t, r, pos)``: the tile holding node (level, index), its level inside the tile, its position."""
    k, r = divmod(level, TILE_HEIGHT)
    shift = TILE_HEIGHT - r
    return k, index >> shift, r, index & ((1 << shift) - 1)


def level_offset(r: int, width: int) -> int:
    """Byte offset of level ``r`` inside a tile blob of ``width`` bottom nodes."""
    return _OFFSETS[width][r]


_OFFSETS = [
    [HASH_SIZE * sum(w >> j for j in range(r)) for r in range(TILE_HEIGHT + 1)] for w in range(TILE_WIDTH + 1)
]


def blob_size(width: int) -> int:
    return level_offset(TILE_HEIGHT, width)


def node_in_blob(blob: bytes, width: int, r: int, pos: int) -> bytes | None:
    """The hash at (r, pos) of a stored tile, or None if that node is not complete yet."""
    if pos >= width >> r:
        return None
    off = _OFFSETS[width][r] + HASH_SIZE * pos
    return blob[off : off + HASH_SIZE]


@dataclass(slots=True)
class Tile:
    """A tile under construction (the writer's right edge) or decoded for auditing."""

    k: int
    t: int
    levels: list[list[bytes]] = field(default_factory=lambda: [[] for _ in range(TILE_HEIGHT)])

    @property
    def width(self) -> int:
        return len(self.levels[0])

    def encode(self) -> bytes:
        return b"".join(b"".join(level) for level in self.levels)

    @classmethod
    def decode(cls, k: int, t: int, width: int, blob: bytes) -> Tile:
        """Decode a stored tile; raises ValueError if the blob length does not match ``width``."""
        if not 0 < width <= TILE_WIDTH or len(blob) != blob_size(width):
            raise ValueError(f"tile ({k}, {t}) has width {width} and {len(blob)} bytes")
        tile = cls(k, t)
        for r in range(TILE_HEIGHT):
            off = level_offset(r, width)
            tile.levels[r] = [
                bytes(blob[off + i * HASH_SIZE : off + (i + 1) * HASH_SIZE]) for i in range(width >> r)
            ]
        return tile


class TileBuilder:
    """The right edge of the tree: the last tile of every tile-level, updated as leaves are appended.

    Appending a leaf costs O(1) amortised hashes and touches at most one tile per tile-level. Tiles
    changed since the last :meth:`take_dirty` are returned for writing.
    """

    __slots__ = ("_dirty", "current", "size")

    def __init__(self, size: int = 0, last_tiles: Iterable[Tile] = ()) -> None:
        self.size = size
        self.current: dict[int, Tile] = {t.k: t for t in last_tiles}
        self._dirty: dict[tuple[int, int], Tile] = {}
        self._check()

    def _check(self) -> None:
        # The stored right edge must agree with the size; a mismatch means a corrupt or foreign table.
        n = self.size
        k = 0
        while n > 0:
            tile = self.current.get(k)
            expected_t = (n - 1) >> TILE_HEIGHT
            expected_w = n - (expected_t << TILE_HEIGHT)
            if tile is None or tile.t != expected_t or tile.width != expected_w:
                raise ValueError(f"stored tiles at tile-level {k} do not match log size {self.size}")
            n >>= TILE_HEIGHT
            k += 1

    def append(self, leaf_hashes: Iterable[bytes]) -> None:
        """Add leaves at the end. Works level by level over the whole batch (list comprehensions),
        so the Python cost per leaf is a few operations plus, amortised, one node hash."""
        nodes = list(leaf_hashes)
        start = self.size
        self.size += len(nodes)
        level = 0
        while nodes:
            if start & 1:
                left = self.node(level, start - 1)
                if left is None:  # pragma: no cover - the right edge always holds the left sibling
                    raise LookupError(f"node ({level}, {start - 1}) is not on the right edge")
                seq = [left, *nodes]
                first = start - 1
            else:
                seq = nodes
                first = start
            self._put(level, start, nodes)
            # merkle.node_hash inlined over the pairs (the hot loop of an append)
            nodes = [sha256(b"\x01" + a + b).digest() for a, b in zip(seq[0::2], seq[1::2], strict=False)]
            start = first >> 1
            level += 1

    def _tile(self, k: int, t: int) -> Tile:
        tile = self._dirty.get((k, t))
        if tile is None:
            cur = self.current.get(k)
            tile = cur if cur is not None and cur.t == t else Tile(k, t)
            self._dirty[(k, t)] = tile
        cur = self.current.get(k)
        if cur is None or cur.t < t:
            self.current[k] = tile
        return tile

    def _put(self, level: int, start: int, nodes: list[bytes]) -> None:
        k, r = divmod(level, TILE_HEIGHT)
        shift = TILE_HEIGHT - r
        i, pos, n = start, 0, len(nodes)
        while pos < n:
            t = i >> shift
            room = ((t + 1) << shift) - i
            chunk = nodes[pos : pos + room]
            self._tile(k, t).levels[r].extend(chunk)
            i += len(chunk)
            pos += len(chunk)

    def take_dirty(self) -> list[Tile]:
        """The tiles changed since the last call (the caller writes them), in key order."""
        out = [self._dirty[key] for key in sorted(self._dirty)]
        self._dirty.clear()
        return out

    def node(self, level: int, index: int) -> bytes | None:
        """A node held by the right edge or by a tile changed since the last :meth:`take_dirty`."""
        k, t, r, pos = locate(level, index)
        tile = self._dirty.get((k, t))
        if tile is None:
            tile = self.current.get(k)
            if tile is None or tile.t != t:
                return None
        row = tile.levels[r]
        return row[pos] if pos < len(row) else None

    def root(self) -> bytes:
        """The root hash at the current size (the right edge holds every node it needs)."""
        if self.size == 0:
            return EMPTY_ROOT
        return hash_range(0, self.size, self._must_node)

    def _must_node(self, level: int, index: int) -> bytes:
        h = self.node(level, index)
        if h is None:  # pragma: no cover - excluded by the right-edge argument in the module docstring
            raise LookupError(f"node ({level}, {index}) is not on the right edge")
        return h


def needed_tiles(nodes: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """The tiles holding the given perfect nodes ``(level, index)``."""
    out: set[tuple[int, int]] = set()
    for level, idx in nodes:
        k, r = divmod(level, TILE_HEIGHT)
        out.add((k, idx >> (TILE_HEIGHT - r)))
    return out


NodeGetter = Callable[[int, int], bytes]
