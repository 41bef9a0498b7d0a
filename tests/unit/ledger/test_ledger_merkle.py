"""The Merkle core, tested three ways: published vectors, a literal reference, and hypothesis."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import merkle
from ledger.errors import OutOfRange, RootMismatchError, VerificationError

# The Certificate Transparency / transparency-dev/merkle test tree (RFC 6962 leaves).
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (3, 8): [
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (7, 8): [
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (0, 1): [],
}
CT_CONSISTENCY = {
    (1, 1): [],
    (1, 8): CT_INCLUSION[(0, 8)],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
CT_HASHES = [merkle.leaf_hash(x) for x in CT_LEAVES]


def h(x: str) -> bytes:
    return bytes.fromhex(x)


# -- a slow, literal RFC 9162 §2.1 reference, kept only to check the fast code ----------------------


def ref_mth(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [ref_mth(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, leaves[:k], b), ref_mth(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


# -- vectors -----------------------------------------------------------------------------------------


def test_leaf_hash_is_sha256_of_zero_prefix() -> None:
    assert merkle.leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()


def test_empty_tree_root_is_sha256_of_empty_string() -> None:
    assert merkle.root_hash([]) == hashlib.sha256(b"").digest()
    assert merkle.EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("size", range(1, 9))
def test_root_hash_matches_ct_vectors(size: int) -> None:
    assert merkle.root_hash(CT_HASHES[:size]).hex() == CT_ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size"), list(CT_INCLUSION))
def test_inclusion_proof_matches_ct_vectors(index: int, size: int) -> None:
    proof = merkle.inclusion_proof(CT_HASHES, index, size)
    assert [p.hex() for p in proof] == CT_INCLUSION[(index, size)]
    merkle.verify_inclusion(CT_HASHES[index], index, size, proof, h(CT_ROOTS[size - 1]))


@pytest.mark.parametrize(("size1", "size2"), list(CT_CONSISTENCY))
def test_consistency_proof_matches_ct_vectors(size1: int, size2: int) -> None:
    proof = merkle.consistency_proof(CT_HASHES, size1, size2)
    assert [p.hex() for p in proof] == CT_CONSISTENCY[(size1, size2)]
    merkle.verify_consistency(size1, size2, proof, h(CT_ROOTS[size1 - 1]), h(CT_ROOTS[size2 - 1]))


# -- systematic corruptions of good proofs (as transparency-dev's JSON vectors do) -------------------


def _inclusion_corruptions(index: int, size: int, proof: list[bytes], leaf: bytes, root: bytes):  # type: ignore[no-untyped-def]
    yield "index+1", (leaf, index + 1, size, proof, root)
    if index > 0:
        yield "index-1", (leaf, index - 1, size, proof, root)
    yield "size+1", (leaf, index, size + 1, proof, root)
    # (size - 1 is not a corruption in general: index 0 has the same proof shape in trees of 7 and 8.)
    yield "extra hash", (leaf, index, size, [*proof, proof[0] if proof else leaf], root)
    if proof:
        yield "truncated", (leaf, index, size, proof[:-1], root)
        for i in range(len(proof)):
            bad = bytearray(proof[i])
            bad[0] ^= 1
            yield f"flip proof[{i}]", (leaf, index, size, [*proof[:i], bytes(bad), *proof[i + 1 :]], root)
    yield "wrong leaf", (merkle.leaf_hash(b"evil"), index, size, proof, root)
    yield "wrong root", (leaf, index, size, proof, hashlib.sha256(b"x").digest())
    yield "short leaf", (leaf[:31], index, size, proof, root)
    yield "short root", (leaf, index, size, proof, root[:31])
    yield "index == size", (leaf, size, size, proof, root)
    yield "negative index", (leaf, -1, size, proof, root)


@pytest.mark.parametrize(("index", "size"), [(0, 8), (3, 8), (7, 8), (0, 1), (4, 5)])
def test_inclusion_corruptions_are_rejected(index: int, size: int) -> None:
    proof = merkle.inclusion_proof(CT_HASHES, index, size)
    root = h(CT_ROOTS[size - 1])
    for name, args in _inclusion_corruptions(index, size, proof, CT_HASHES[index], root):
        with pytest.raises(VerificationError):
            merkle.verify_inclusion(*args)
            pytest.fail(f"corruption {name!r} was accepted")


@pytest.mark.parametrize(("size1", "size2"), [(1, 8), (6, 8), (2, 5), (3, 7), (4, 8)])
def test_consistency_corruptions_are_rejected(size1: int, size2: int) -> None:
    proof = merkle.consistency_proof(CT_HASHES, size1, size2)
    r1, r2 = h(CT_ROOTS[size1 - 1]), h(CT_ROOTS[size2 - 1])
    cases = {
        "swapped roots": (size1, size2, proof, r2, r1),
        "size1+1": (size1 + 1, size2, proof, r1, r2),
        # (size2 + 1 is not a corruption in general: 2 -> 5 and 2 -> 6 have the same proof shape.)
        "truncated": (size1, size2, proof[:-1], r1, r2),
        "extra": (size1, size2, [*proof, proof[0]], r1, r2),
        "empty": (size1, size2, [], r1, r2),
    }
    for i in range(len(proof)):
        bad = bytearray(proof[i])
        bad[-1] ^= 0x80
        cases[f"flip {i}"] = (size1, size2, [*proof[:i], bytes(bad), *proof[i + 1 :]], r1, r2)
    for name, args in cases.items():
        with pytest.raises(VerificationError):
            merkle.verify_consistency(*args)
            pytest.fail(f"corruption {name!r} was accepted")


# -- transparency-dev edge cases -------------------------------------------------------------------


def test_consistency_equal_sizes_needs_empty_proof_and_equal_roots() -> None:
    r = h(CT_ROOTS[3])
    merkle.verify_consistency(4, 4, [], r, r)
    with pytest.raises(VerificationError):
        merkle.verify_consistency(4, 4, [r], r, r)
    with pytest.raises(RootMismatchError) as info:
        merkle.verify_consistency(4, 4, [], r, h(CT_ROOTS[2]))
    assert info.value.expected == h(CT_ROOTS[2]) and info.value.calculated == r


def test_consistency_from_zero_is_rejected() -> None:
    with pytest.raises(VerificationError):
        merkle.verify_consistency(0, 3, [h(CT_ROOTS[2])], merkle.EMPTY_ROOT, h(CT_ROOTS[2]))


def test_consistency_with_size2_below_size1_is_rejected() -> None:
    with pytest.raises(VerificationError):
        merkle.verify_consistency(5, 3, [], h(CT_ROOTS[4]), h(CT_ROOTS[2]))


def test_inclusion_index_at_or_past_size_is_rejected() -> None:
    for index in (8, 9, 1 << 70):
        with pytest.raises(VerificationError):
            merkle.verify_inclusion(CT_HASHES[0], index, 8, [], h(CT_ROOTS[7]))


@pytest.mark.parametrize(
    "garbage",
    [None, "abc", b"abc", 5, [None], [b"short"], ["a" * 32], [1, 2, 3]],
)
def test_garbage_proofs_raise_verification_error_only(garbage: object) -> None:
    with pytest.raises(VerificationError):
        merkle.verify_inclusion(CT_HASHES[0], 0, 8, garbage, h(CT_ROOTS[7]))  # type: ignore[arg-type]
    with pytest.raises(VerificationError):
        merkle.verify_consistency(1, 8, garbage, h(CT_ROOTS[0]), h(CT_ROOTS[7]))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [True, 1.5, "3", None, -1, 1 << 64])
def test_garbage_sizes_raise_verification_error_only(bad: object) -> None:
    with pytest.raises(VerificationError):
        merkle.verify_inclusion(CT_HASHES[0], 0, bad, [], h(CT_ROOTS[0]))  # type: ignore[arg-type]
    with pytest.raises(VerificationError):
        merkle.verify_consistency(bad, 8, [], h(CT_ROOTS[0]), h(CT_ROOTS[7]))  # type: ignore[arg-type]


def test_provers_reject_out_of_range_requests() -> None:
    with pytest.raises(OutOfRange):
        merkle.inclusion_proof(CT_HASHES, 8, 8)
    with pytest.raises(OutOfRange):
        merkle.inclusion_proof(CT_HASHES, 0, 9)
    with pytest.raises(OutOfRange):
        merkle.consistency_proof(CT_HASHES, 0, 4)
    with pytest.raises(OutOfRange):
        merkle.consistency_proof(CT_HASHES, 5, 4)


# -- against the reference, exhaustively for small trees -------------------------------------------


def test_fast_code_equals_reference_for_all_small_trees() -> None:
    leaves = [merkle.leaf_hash(i.to_bytes(2, "big")) for i in range(33)]
    for n in range(1, 34):
        assert merkle.root_hash(leaves[:n]) == ref_mth(leaves[:n])
        for m in range(n):
            assert merkle.inclusion_proof(leaves, m, n) == ref_path(m, leaves[:n])
        for m in range(1, n + 1):
            assert merkle.consistency_proof(leaves, m, n) == ref_subproof(m, leaves[:n], True)


# -- hypothesis: random tree, prove, verify, corrupt one bit ---------------------------------------


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[list[bytes], int, int]:
    n = draw(st.integers(min_value=1, max_value=300))
    seed = draw(st.binary(min_size=1, max_size=8))
    leaves = [merkle.leaf_hash(seed + i.to_bytes(4, "big")) for i in range(n)]
    return leaves, draw(st.integers(0, n - 1)), n


@settings(max_examples=150, deadline=None)
@given(data=tree_and_index(), bit=st.integers(0, 255), which=st.integers(0, 1000))
def test_property_inclusion_roundtrip_and_bit_flip(
    data: tuple[list[bytes], int, int], bit: int, which: int
) -> None:
    leaves, index, size = data
    root = merkle.root_hash(leaves)
    proof = merkle.inclusion_proof(leaves, index, size)
    assert proof == ref_path(index, leaves) if size <= 64 else True
    merkle.verify_inclusion(leaves[index], index, size, proof, root)
    targets = [*proof, leaves[index], root]
    t = which % len(targets)
    flipped = bytearray(targets[t])
    flipped[bit // 8] ^= 1 << (bit % 8)
    items = list(targets)
    items[t] = bytes(flipped)
    with pytest.raises(VerificationError):
        merkle.verify_inclusion(items[-2], index, size, items[:-2], items[-1])


@settings(max_examples=150, deadline=None)
@given(data=tree_and_index(), bit=st.integers(0, 255), which=st.integers(0, 1000), m=st.integers(1, 300))
def test_property_consistency_roundtrip_and_bit_flip(
    data: tuple[list[bytes], int, int], bit: int, which: int, m: int
) -> None:
    leaves, _, size2 = data
    size1 = 1 + (m - 1) % size2
    r1, r2 = merkle.root_hash(leaves[:size1]), merkle.root_hash(leaves)
    proof = merkle.consistency_proof(leaves, size1, size2)
    merkle.verify_consistency(size1, size2, proof, r1, r2)
    targets = [*proof, r1, r2]
    t = which % len(targets)
    flipped = bytearray(targets[t])
    flipped[bit // 8] ^= 1 << (bit % 8)
    items = list(targets)
    items[t] = bytes(flipped)
    with pytest.raises(VerificationError):
        merkle.verify_consistency(size1, size2, items[:-2], items[-2], items[-1])


@settings(max_examples=100, deadline=None)
@given(lo=st.integers(0, 1 << 20), n=st.integers(1, 1 << 12))
def test_property_perfect_nodes_tile_the_range(lo: int, n: int) -> None:
    nodes = merkle.perfect_nodes(lo, lo + n)
    pos = lo
    for level, idx in nodes:
        assert idx << level == pos
        pos += 1 << level
    assert pos == lo + n
