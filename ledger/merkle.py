"""RFC 9162 Merkle tree hashing, proofs and proof verification, as pure functions.

The verifiers follow transparency-dev/merkle's ``proof/verify.go`` (the reference behaviour for RFC 9162
proofs), including its edge cases:

* inclusion: requires ``0 <= index < size``;
* consistency: requires ``0 < size1 <= size2``, except that ``size1 == size2`` (checked first, as Go
  does) needs an empty proof and equal roots, so ``(0, 0)`` with equal roots is accepted;
* every hash (leaf hash, roots, proof elements) must be exactly 32 bytes.

They return ``None`` on success and raise :class:`~ledger.errors.VerificationError` (or its subclass
:class:`~ledger.errors.RootMismatchError`) on any failure, never a bare ``ValueError``/``IndexError``.

The provers here take every leaf hash and are O(n); the storage-backed log uses the same *range* plans
(:func:`inclusion_ranges`, :func:`consistency_ranges`, :func:`perfect_nodes`) to read O(log n) stored
nodes instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from ledger.errors import OutOfRange, RootMismatchError, VerificationError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "consistency_proof",
    "consistency_ranges",
    "hash_range",
    "inclusion_proof",
    "inclusion_ranges",
    "leaf_hash",
    "node_hash",
    "perfect_nodes",
    "root_from_consistency_proof",
    "root_from_inclusion_proof",
    "root_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_MAX_SIZE = 1 << 64  # sizes are uint64 on the wire (checkpoints, Go verifiers)
_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1 leaf hash: ``SHA-256(0x00 || data)``."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + left + right).digest()


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash (MTH) over ``leaf_hashes``; ``SHA-256("")`` for the empty tree.

    Runs in O(n) time and O(log n) memory with a compact range (a stack of perfect subtree roots).
    """
    stack: list[bytes] = []
    for i, h in enumerate(leaf_hashes):
        stack.append(h)
        n = i + 1
        while n & 1 == 0:  # merge completed perfect subtrees
            right = stack.pop()
            stack[-1] = node_hash(stack[-1], right)
            n >>= 1
    if not stack:
        return EMPTY_ROOT
    h = stack[-1]
    for left in reversed(stack[:-1]):
        h = node_hash(left, h)
    return h


# ---------------------------------------------------------------------------------------------------
# Proof plans: which leaf ranges a proof is made of. A range [lo, hi) appearing in an RFC 9162 proof is
# always an RFC 9162 subtree: lo is a multiple of a power of two >= hi - lo.


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (requires n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes form the inclusion proof of ``index`` in a tree of ``size``.

    Ordered from the leaf upwards (RFC 9162 §2.1.3.1). Requires ``0 <= index < size``.
    """
    if not 0 <= index < size:
        raise OutOfRange(f"index {index} is not below size {size}", value=index, limit=size)
    out: list[tuple[int, int]] = []
    lo, hi, m = 0, size, index
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
            m -= k
    out.reverse()
    return out


def consistency_ranges(size1: int, size2: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes form the consistency proof from ``size1`` to ``size2``.

    RFC 9162 §2.1.4.1 SUBPROOF, ordered as the RFC orders it. Requires ``0 < size1 <= size2``
    (``size1 == size2`` gives an empty plan).
    """
    if not 0 < size1 <= size2:
        raise OutOfRange(
            f"consistency needs 0 < size1 <= size2, got {size1}, {size2}", value=size1, limit=size2
        )
    out: list[tuple[int, int]] = []
    lo, hi, m, whole = 0, size2, size1, True
    while True:
        n = hi - lo
        if m == n:
            if not whole:
                out.append((lo, hi))
            break
        k = _split(n)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
            m -= k
            whole = False
    out.reverse()
    return out


def perfect_nodes(lo: int, hi: int) -> list[tuple[int, int]]:
    """Decompose the leaf range ``[lo, hi)`` into perfect subtrees, left to right.

    Each item is ``(level, index)``: the node covering leaves ``[index << level, (index + 1) << level)``.
    For an RFC 9162 subtree range, folding these hashes right to left gives the range's MTH.
    """
    out: list[tuple[int, int]] = []
    while lo < hi:
        level = (lo & -lo).bit_length() - 1 if lo else (hi - lo).bit_length() - 1
        while lo + (1 << level) > hi:
            level -= 1
        out.append((level, lo >> level))
        lo += 1 << level
    return out


def hash_range(lo: int, hi: int, get_node: Callable[[int, int], bytes]) -> bytes:
    """The MTH of leaves ``[lo, hi)`` (an RFC 9162 subtree range) from perfect-node hashes."""
    nodes = perfect_nodes(lo, hi)
    h = get_node(*nodes[-1])
    for level, idx in reversed(nodes[:-1]):
        h = node_hash(get_node(level, idx), h)
    return h


class _Levels:
    """Every perfect node of an in-memory tree (O(n) to build)."""

    __slots__ = ("levels",)

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        level = list(leaf_hashes)
        self.levels = [level]
        while len(level) > 1:
            level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            self.levels.append(level)

    def node(self, level: int, index: int) -> bytes:
        return self.levels[level][index]


def _check_tree(leaf_hashes: Sequence[bytes], size: int) -> None:
    if size > len(leaf_hashes):
        raise OutOfRange(
            f"size {size} exceeds the {len(leaf_hashes)} leaves given", value=size, limit=len(leaf_hashes)
        )


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """The RFC 9162 inclusion proof of leaf ``index`` in the tree of the first ``size`` leaves.

    Requires ``0 <= index < size <= len(leaf_hashes)``; raises :class:`~ledger.errors.OutOfRange`.
    """
    _check_tree(leaf_hashes, size)
    plan = inclusion_ranges(index, size)
    tree = _Levels(leaf_hashes[:size])
    return [hash_range(lo, hi, tree.node) for lo, hi in plan]


def consistency_proof(leaf_hashes: Sequence[bytes], size1: int, size2: int) -> list[bytes]:
    """The RFC 9162 consistency proof between the trees of the first ``size1`` and ``size2`` leaves.

    Requires ``0 < size1 <= size2 <= len(leaf_hashes)``; raises :class:`~ledger.errors.OutOfRange`.
    """
    _check_tree(leaf_hashes, size2)
    plan = consistency_ranges(size1, size2)
    tree = _Levels(leaf_hashes[:size2])
    return [hash_range(lo, hi, tree.node) for lo, hi in plan]


# ---------------------------------------------------------------------------------------------------
# Verification (a port of transparency-dev/merkle proof/verify.go with input validation added).


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise VerificationError(f"{what} is not bytes")
    b = bytes(value)
    if len(b) != HASH_SIZE:
        raise VerificationError(f"{what} has {len(b)} bytes, want {HASH_SIZE}")
    return b


def _check_size(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise VerificationError(f"{what} is not an integer")
    if not 0 <= value < _MAX_SIZE:
        raise VerificationError(f"{what} {value} is outside 0..2^64-1")
    return value


def _check_proof(proof: object) -> list[bytes]:
    if isinstance(proof, bytes | bytearray | str) or not isinstance(proof, Sequence):
        raise VerificationError("proof is not a sequence of hashes")
    return [_check_hash(p, f"proof[{i}]") for i, p in enumerate(proof)]


def _decomp_incl_proof(index: int, size: int) -> tuple[int, int]:
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if (index >> i) & 1 == 0 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1 == 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def root_from_inclusion_proof(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof. Requires ``0 <= index < size``.

    Raises :class:`~ledger.errors.VerificationError` on malformed input or a wrong proof length.
    """
    index = _check_size(index, "index")
    size = _check_size(size, "size")
    if index >= size:
        raise VerificationError(f"index is beyond size: {index} >= {size}")
    leaf = _check_hash(leaf_hash, "leaf hash")
    hashes = _check_proof(proof)
    inner, border = _decomp_incl_proof(index, size)
    if len(hashes) != inner + border:
        raise VerificationError(f"wrong proof size {len(hashes)}, want {inner + border}")
    res = _chain_inner(leaf, hashes[:inner], index)
    return _chain_border_right(res, hashes[inner:])


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` leaves with root ``root``.

    Requires ``0 <= index < size``. Returns ``None``; raises :class:`~ledger.errors.VerificationError`
    (:class:`~ledger.errors.RootMismatchError` when only the root differs).
    """
    expected = _check_hash(root, "root")
    calculated = root_from_inclusion_proof(leaf_hash, index, size, proof)
    if calculated != expected:
        raise RootMismatchError(expected, calculated)


def root_from_consistency_proof(size1: int, size2: int, proof: Sequence[bytes], root1: bytes) -> bytes:
    """The root of the ``size2`` tree implied by a consistency proof from ``(size1, root1)``.

    Requires ``0 < size1 <= size2`` (or ``size1 == size2`` with an empty proof). Verifies ``root1`` on the
    way; raises :class:`~ledger.errors.VerificationError` on any failure.
    """
    size1 = _check_size(size1, "size1")
    size2 = _check_size(size2, "size2")
    r1 = _check_hash(root1, "root1")
    hashes = _check_proof(proof)
    if size2 < size1:
        raise VerificationError(f"size2 ({size2}) < size1 ({size1})")
    if size1 == size2:
        if hashes:
            raise VerificationError("size1 == size2, but the proof is not empty")
        return r1
    if size1 == 0:
        raise VerificationError("a consistency proof from the empty tree is meaningless")
    if not hashes:
        raise VerificationError("empty proof")

    inner, border = _decomp_incl_proof(size1 - 1, size2)
    shift = (size1 & -size1).bit_length() - 1
    inner -= shift
    if size1 == 1 << shift:
        seed, start = r1, 0
    else:
        seed, start = hashes[0], 1
    if len(hashes) != start + inner + border:
        raise VerificationError(f"wrong proof size {len(hashes)}, want {start + inner + border}")
    rest = hashes[start:]
    mask = (size1 - 1) >> shift
    hash1 = _chain_inner_right(seed, rest[:inner], mask)
    hash1 = _chain_border_right(hash1, rest[inner:])
    if hash1 != r1:
        raise RootMismatchError(r1, hash1, "consistency proof does not match root1")
    hash2 = _chain_inner(seed, rest[:inner], mask)
    return _chain_border_right(hash2, rest[inner:])


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """Check that the tree ``(size2, root2)`` extends the tree ``(size1, root1)``.

    Requires ``0 < size1 <= size2``; ``size1 == size2`` needs an empty proof and equal roots. Returns
    ``None``; raises :class:`~ledger.errors.VerificationError` on any failure.
    """
    expected = _check_hash(root2, "root2")
    calculated = root_from_consistency_proof(size1, size2, proof, root1)
    if calculated != expected:
        raise RootMismatchError(expected, calculated, "consistency proof does not match root2")
