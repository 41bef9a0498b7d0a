"""Tiles: the stored right edge reproduces RFC 9162 roots across tile boundaries and reloads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import merkle
from ledger.tiles import Tile, TileBuilder, locate, node_in_blob

LEAVES = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(70_000)]


def _last_tiles(tiles: list[Tile]) -> list[Tile]:
    last: dict[int, Tile] = {}
    for t in tiles:
        if t.k not in last or t.t > last[t.k].t:
            last[t.k] = t
    return [Tile.decode(t.k, t.t, t.width, t.encode()) for t in last.values()]


@pytest.mark.parametrize("n", [1, 255, 256, 257, 65_535, 65_536, 65_537, 70_000])
def test_root_across_tile_levels(n: int) -> None:
    b = TileBuilder()
    b.append(LEAVES[:n])
    assert b.root() == merkle.root_hash(LEAVES[:n])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), more=st.integers(1, 600))
def test_property_reloaded_edge_continues_the_same_tree(n: int, more: int) -> None:
    b = TileBuilder()
    b.append(LEAVES[:n])
    stored = {(t.k, t.t): t for t in b.take_dirty()}
    reloaded = TileBuilder(n, _last_tiles(list(stored.values())))
    reloaded.append(LEAVES[n : n + more])
    assert reloaded.root() == merkle.root_hash(LEAVES[: n + more])
    # Every perfect node of the final tree is where locate() says it is.
    for t in reloaded.take_dirty():
        stored[(t.k, t.t)] = t
    for level, idx in merkle.perfect_nodes(0, n + more):
        k, tt, r, pos = locate(level, idx)
        tile = stored[(k, tt)]
        got = node_in_blob(tile.encode(), tile.width, r, pos)
        lo, hi = idx << level, (idx + 1) << level
        assert got == merkle.root_hash(LEAVES[lo:hi])


def test_a_right_edge_that_disagrees_with_the_size_is_refused() -> None:
    b = TileBuilder()
    b.append(LEAVES[:300])
    last = _last_tiles(b.take_dirty())
    with pytest.raises(ValueError, match="do not match"):
        TileBuilder(301, last)


def test_decode_rejects_a_blob_of_the_wrong_length() -> None:
    with pytest.raises(ValueError):
        Tile.decode(0, 0, 3, b"\x00" * 10)
