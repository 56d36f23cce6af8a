"""Merkle tree math of the relay's transparency log (RFC 9162 §2.1, SHA-256).

The log is an append-only list of leaves; its state at ``size`` leaves is summed up
by one 32-byte Merkle Tree Hash (MTH). Inclusion proofs show that a leaf is in a tree
of a given size, consistency proofs that a larger tree extends a smaller one. Both are
the RFC 9162 (= RFC 6962) constructions, bit for bit, so Go's ``sumdb/tlog``,
transparency-dev/merkle, Sigsum and C2SP witnesses check our proofs unchanged.

Hashing (RFC 9162 §2.1.1)::

    MTH({})      = SHA-256()                               (empty tree)
    leaf hash    = SHA-256(0x00 || leaf)
    node hash    = SHA-256(0x01 || left || right)
    MTH(D[0:n])  = node(MTH(D[0:k]), MTH(D[k:n]))   k = largest power of 2 < n

The prefixes keep a leaf from ever being passed off as an interior node.

Who does what:

- a **verifier** (client, auditor) calls :func:`verify_inclusion` and
  :func:`verify_consistency`: pure, bounded, they raise :class:`ProofError` or return
  ``None``, never a bool;
- the **relay** appends leaves to a :class:`CompactRange` (O(log n) state: the
  right-edge perfect subtrees), persists it with :meth:`CompactRange.to_bytes`, and
  stores every perfect subtree hash that :meth:`CompactRange.append` reports as a
  :class:`Node` ``(level, index) -> hash``. Any perfect subtree is then one lookup,
  and :func:`subtree_hash` builds any range a proof needs from O(log n) lookups;
- :func:`inclusion_proof` and :func:`consistency_proof` take a callback
  ``get_hash(start, end) -> MTH(D[start:end])`` and call it O(log n) times, only for
  ranges that are perfect subtrees or end at the tree size (see :data:`SubtreeHashFn`).

Sizes and indexes are below 2^63 (what every other implementation can represent) and
proofs hold at most 64 hashes: a longer one cannot be valid for such a size, so it is
refused before any hashing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from protocol.errors import DecodeError, PliError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_PROOF_HASHES",
    "MAX_SIZE",
    "CompactRange",
    "Node",
    "PerfectHashFn",
    "ProofError",
    "SubtreeHashFn",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "perfect_subtrees",
    "range_hasher",
    "root_from_leaf_hashes",
    "subtree_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
#: Tree sizes and leaf indexes are below this (int64 in Go, Java and SQL).
MAX_SIZE: Final = 1 << 63
#: A proof for a tree below 2^63 leaves holds at most 63 hashes (64 for a consistency
#: proof whose old size is a power of two, counting the prepended old root).
MAX_PROOF_HASHES: Final = 64
#: MTH({}) = SHA-256 of the empty string (RFC 9162 §2.1.1).
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"

#: ``get_hash(start, end)`` returns MTH(D[start:end]). The proof generators only ask
#: for ranges that are either a perfect subtree (``end - start`` a power of two and
#: ``start`` a multiple of it) or the right edge of the tree (``end`` is the tree size
#: and ``start`` a multiple of the largest power of two >= ``end - start``);
#: :func:`subtree_hash` answers both from stored perfect subtrees.
SubtreeHashFn = Callable[[int, int], bytes]
#: ``perfect(level, index)`` returns the hash of the perfect subtree of ``2**level``
#: leaves starting at leaf ``index * 2**level`` (level 0 is the leaf hash itself).
PerfectHashFn = Callable[[int, int], bytes]


class ProofError(PliError):
    """A Merkle proof, or a hash that goes with it, does not prove what it claims."""

    code = "bad_proof"


def leaf_hash(data: bytes) -> bytes:
    """Hash of a log leaf: SHA-256(0x00 || data) (RFC 9162 §2.1.1)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an interior node: SHA-256(0x01 || left || right) (RFC 9162 §2.1.1)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``): where MTH splits."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH of a whole list of leaf hashes, by the RFC's recursive definition.

    O(n) time and memory: the reference the fast paths are tested against, and fine
    for small trees. The relay uses :class:`CompactRange` instead.

    Args:
        hashes: leaf hashes (already :func:`leaf_hash`-ed), 32 bytes each.

    Returns:
        The 32-byte root; :data:`EMPTY_ROOT` for an empty list.
    """
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = _split(n)
    return node_hash(root_from_leaf_hashes(hashes[:k]), root_from_leaf_hashes(hashes[k:]))


# --------------------------------------------------------------------------- subtrees


@dataclass(frozen=True, slots=True)
class Node:
    """A perfect subtree's hash, as the relay stores it.

    It covers leaves ``[index * 2**level, (index + 1) * 2**level)``; level 0 nodes are
    the leaf hashes. Each node is reported exactly once, by the append that completes it.
    """

    level: int
    index: int
    hash: bytes

    @property
    def start(self) -> int:
        return self.index << self.level

    @property
    def end(self) -> int:
        return (self.index + 1) << self.level


def perfect_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The perfect subtrees ``(level, index)`` that tile ``[start, end)``, left to right.

    Only for ranges that are nodes of some Merkle tree: ``start`` must be a multiple of
    the largest power of two that is >= ``end - start`` (true of every range a proof
    asks for). The tiling then follows the binary digits of ``end - start``, largest
    first, which is exactly how MTH splits the range.

    Raises:
        ValueError: the range is empty, out of bounds or not a Merkle node range.
    """
    if not 0 <= start < end <= MAX_SIZE:
        raise ValueError(f"bad subtree range [{start}, {end})")
    width = end - start
    if start % (1 << (width - 1).bit_length()) != 0:
        raise ValueError(f"[{start}, {end}) is not a subtree of any Merkle tree")
    out: list[tuple[int, int]] = []
    pos = start
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            out.append((level, pos >> level))
            pos += 1 << level
    return out


def subtree_hash(start: int, end: int, perfect: PerfectHashFn) -> bytes:
    """MTH(D[start:end]) from stored perfect subtree hashes, in O(log n) lookups.

    A perfect range is one lookup. A right-edge range ``[start, size)`` is the fold,
    right to left, of the perfect subtrees that tile it: MTH splits off the largest
    power of two first, and that is the first tile.

    Args:
        start: first leaf of the range.
        end: one past the last leaf.
        perfect: lookup of a perfect subtree hash by ``(level, index)``.

    Raises:
        ValueError: the range is not a Merkle node range (see :func:`perfect_subtrees`).

    Returns:
        The 32-byte hash of the range.
    """
    tiles = perfect_subtrees(start, end)
    h = perfect(*tiles[-1])
    for level, index in reversed(tiles[:-1]):
        h = node_hash(perfect(level, index), h)
    return h


def range_hasher(perfect: PerfectHashFn) -> SubtreeHashFn:
    """Adapt a ``(level, index)`` store into the ``get_hash(start, end)`` the provers take."""

    def get_hash(start: int, end: int) -> bytes:
        return subtree_hash(start, end, perfect)

    return get_hash


# --------------------------------------------------------------------------- proofs


def _check_size(name: str, value: int) -> None:
    if not 0 <= value < MAX_SIZE:
        raise ValueError(f"{name} must be in [0, 2^63), got {value}")


def inclusion_proof(index: int, size: int, get_hash: SubtreeHashFn) -> list[bytes]:
    """The audit path PATH(index, D[0:size]) (RFC 9162 §2.1.3.1), leaf side first.

    Walks down from the root towards the leaf, taking at each level the hash of the
    subtree not taken: O(log size) calls to ``get_hash``, of which at most one is for
    a right-edge (imperfect) range.

    Args:
        index: the leaf, ``0 <= index < size``.
        size: the tree size the proof is for.
        get_hash: MTH(D[start:end]) for the ranges described at :data:`SubtreeHashFn`.

    Raises:
        ValueError: ``index`` is not a leaf of a tree of ``size`` leaves.

    Returns:
        The proof hashes, from the leaf's sibling up to the root's child.
    """
    _check_size("size", size)
    if not 0 <= index < size:
        raise ValueError(f"no leaf {index} in a tree of size {size}")
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(get_hash(lo + k, hi))
            hi = lo + k
        else:
            path.append(get_hash(lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_proof(m: int, n: int, get_hash: SubtreeHashFn) -> list[bytes]:
    """PROOF(m, D[0:n]) (RFC 9162 §2.1.4.1): tree ``n`` extends tree ``m``.

    The RFC's SUBPROOF recursion, unrolled into a walk down the new tree: at each level
    the subtree the old tree does not fully cover on the other side is recorded; where
    the walk reaches a subtree that is entirely old, its hash is recorded too, unless it
    is the whole old tree (the verifier has that root already). O(log n) calls.

    ``m == 0`` and ``m == n`` give an empty proof (nothing to prove; see
    :func:`verify_consistency`).

    Args:
        m: the old size, ``0 <= m <= n``.
        n: the new size.
        get_hash: MTH(D[start:end]) for the ranges described at :data:`SubtreeHashFn`.

    Raises:
        ValueError: ``m > n`` or a size out of range.

    Returns:
        The proof hashes, deepest first, as RFC 9162 orders them.
    """
    _check_size("new size", n)
    if not 0 <= m <= n:
        raise ValueError(f"no consistency proof from size {m} to size {n}")
    if m in (0, n):
        return []
    path: list[bytes] = []
    lo, hi = 0, n
    whole_old_tree = True  # the RFC's flag b: [lo, hi) starts at leaf 0
    while m != hi:
        k = _split(hi - lo)
        if m <= lo + k:
            path.append(get_hash(lo + k, hi))
            hi = lo + k
        else:
            path.append(get_hash(lo, lo + k))
            lo += k
            whole_old_tree = False
    if not whole_old_tree:
        path.append(get_hash(lo, hi))
    path.reverse()
    return path


# --------------------------------------------------------------------------- verification


def _check_hash(name: str, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ProofError(f"{name} is not a {HASH_SIZE}-byte hash")


def _check_proof(proof: Sequence[bytes]) -> None:
    if len(proof) > MAX_PROOF_HASHES:
        raise ProofError(f"a proof holds at most {MAX_PROOF_HASHES} hashes")
    for i, h in enumerate(proof):
        _check_hash(f"proof[{i}]", h)


def _check_proof_size(name: str, value: int) -> None:
    if not 0 <= value < MAX_SIZE:
        raise ProofError(f"{name} must be in [0, 2^63), got {value}")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that ``leaf`` is leaf ``index`` of the tree of ``size`` leaves with ``root``.

    RFC 9162 §2.1.3.2, step by step (including the final ``sn == 0`` check, which
    refuses a proof too short for the size). The size of a tree with an empty proof is
    1, and the leaf hash is then the root.

    Args:
        leaf: the leaf *hash* (:func:`leaf_hash` of the leaf's bytes), 32 bytes.
        index: the leaf's position, ``0 <= index < size``.
        size: the size of the tree ``root`` is the head of.
        proof: the audit path, leaf side first, at most :data:`MAX_PROOF_HASHES`.
        root: the tree's root hash, 32 bytes.

    Raises:
        ProofError: a malformed input, or the proof does not lead to ``root``.
    """
    _check_hash("leaf hash", leaf)
    _check_hash("root", root)
    _check_proof(proof)
    _check_proof_size("size", size)
    _check_proof_size("index", index)
    # 1. leaf_index >= tree_size fails (this also refuses every proof for size 0).
    if index >= size:
        raise ProofError(f"no leaf {index} in a tree of size {size}")
    # 2-3.
    fn, sn = index, size - 1
    r = leaf
    # 4.
    for p in proof:
        if sn == 0:  # 4a. the proof is longer than the path to the root
            raise ProofError("inclusion proof too long")
        if fn & 1 or fn == sn:  # 4b. p is a left sibling
            r = node_hash(p, r)
            # 4b.ii: fn == sn is the last node of its level; climb past the levels
            # where it has no sibling.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:  # p is a right sibling
            r = node_hash(r, p)
        fn >>= 1  # 4c.
        sn >>= 1
    # 5.
    if sn != 0:
        raise ProofError("inclusion proof too short")
    if not hmac.compare_digest(r, root):
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(m: int, n: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes) -> None:
    """Check that the tree of size ``n`` with ``new_root`` extends the one of size ``m``.

    RFC 9162 §2.1.4.2, step by step (including the final ``sn == 0`` check). The two
    trivial cases have nothing to prove, so their proof must be empty:

    - ``m == n``: the roots must be equal;
    - ``m == 0``: every tree extends the empty tree (RFC 9162 §2.1.4: the proof from
      size 0 is empty and always valid). We still require ``old_root`` to be
      MTH({}) = SHA-256(): a size-0 tree head with another root is not the head of any
      tree, and accepting it would let a forged "empty" checkpoint pass unnoticed.

    Args:
        m: the old size, ``0 <= m <= n``.
        n: the new size.
        proof: the consistency path, at most :data:`MAX_PROOF_HASHES` hashes.
        old_root: root of the tree of size ``m``, 32 bytes.
        new_root: root of the tree of size ``n``, 32 bytes.

    Raises:
        ProofError: a malformed input, ``m > n``, or the proof does not prove it.
    """
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    _check_proof(proof)
    _check_proof_size("old size", m)
    _check_proof_size("new size", n)
    if m > n:
        raise ProofError(f"old size {m} is larger than new size {n}")
    if m in (0, n):
        _verify_trivial_consistency(m, n, proof, old_root, new_root)
        return
    # 1.
    if not proof:
        raise ProofError("empty consistency proof")
    fr, sr = _run_consistency(m, n, proof, old_root)
    # 7. (sn == 0 is checked by _run_consistency)
    if not hmac.compare_digest(fr, old_root):
        raise ProofError("consistency proof does not lead to the old root")
    if not hmac.compare_digest(sr, new_root):
        raise ProofError("consistency proof does not lead to the new root")


def _verify_trivial_consistency(m: int, n: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes) -> None:
    """The cases with nothing to prove: ``m == n`` (same root) and ``m == 0`` (empty tree)."""
    if proof:
        raise ProofError("a consistency proof from the empty tree or between equal sizes is empty")
    if m == 0 and not hmac.compare_digest(old_root, EMPTY_ROOT):
        raise ProofError("the root of the empty tree is SHA-256 of nothing")
    if m == n and not hmac.compare_digest(old_root, new_root):
        raise ProofError("two different roots for the same tree size")


def _run_consistency(m: int, n: int, proof: Sequence[bytes], old_root: bytes) -> tuple[bytes, bytes]:
    """RFC 9162 §2.1.4.2 steps 2-7 for ``0 < m < n``: the old and new roots the proof implies."""
    # 2. If m is a power of two, the old tree is a perfect subtree of the new one and
    # its root is the proof's implicit first hash.
    path = list(proof)
    if m & (m - 1) == 0:
        path.insert(0, old_root)
    # 3-4.
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:  # 6a.
            raise ProofError("consistency proof too long")
        if fn & 1 or fn == sn:  # 6b.
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:  # 6b.iii
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1  # 6c.
        sn >>= 1
    # 7.
    if sn != 0:
        raise ProofError("consistency proof too short")
    return fr, sr


# --------------------------------------------------------------------------- compact range


_COMPACT_MAGIC: Final = b"pli-compact-range/v1\n"


class CompactRange:
    """The right edge of a growing tree: enough to append and to compute the root.

    For a tree of ``size`` leaves it holds one perfect subtree hash per set bit of
    ``size``, largest (leftmost) first: at most 63 hashes, whatever the size. This is
    the relay's sequencer state; it survives restarts through :meth:`to_bytes` /
    :meth:`from_bytes`, or is rebuilt from the node store with :meth:`from_store`.

    Serialised form (SPEC.md, transparency log): ``"pli-compact-range/v1\\n" ||
    u64be(size) || hash*``, one 32-byte hash per set bit of ``size``, leftmost first.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """The right-edge perfect subtree hashes, leftmost (largest) first."""
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> list[Node]:
        """Append one leaf hash; return the perfect subtrees it completes.

        The returned nodes are the leaf itself at level 0, then each parent that
        becomes complete, bottom up: a relay stores them all (``(level, index) ->
        hash``) and can then serve :func:`subtree_hash` for any proof. Amortised O(1)
        hashes per append, O(log n) at worst.

        Args:
            leaf: the leaf *hash*, 32 bytes.

        Raises:
            ValueError: not a 32-byte hash, or the tree is full (2^63 - 1 leaves).

        Returns:
            The new :class:`Node` s, level 0 first.
        """
        if not isinstance(leaf, bytes) or len(leaf) != HASH_SIZE:
            raise ValueError("a leaf hash is 32 bytes")
        if self._size >= MAX_SIZE - 1:
            raise ValueError("the tree is full")
        index = self._size
        h = leaf
        new = [Node(0, index, h)]
        level = 0
        # Each trailing 1 bit of the old size is a perfect subtree of the same width
        # as the one just completed, to its left: merge them.
        while index >> level & 1:
            h = node_hash(self._hashes.pop(), h)
            level += 1
            new.append(Node(level, index >> level, h))
        self._hashes.append(h)
        self._size += 1
        return new

    def root(self) -> bytes:
        """MTH of the tree so far; :data:`EMPTY_ROOT` while empty."""
        if not self._hashes:
            return EMPTY_ROOT
        h = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            h = node_hash(left, h)
        return h

    def copy(self) -> CompactRange:
        c = CompactRange()
        c._size = self._size
        c._hashes = list(self._hashes)
        return c

    def to_bytes(self) -> bytes:
        return _COMPACT_MAGIC + self._size.to_bytes(8, "big") + b"".join(self._hashes)

    @classmethod
    def from_bytes(cls, data: bytes) -> CompactRange:
        """Restore a range saved by :meth:`to_bytes`.

        Raises:
            DecodeError: wrong magic, size out of range, or a length that does not
                match the size's number of set bits.
        """
        head = len(_COMPACT_MAGIC)
        if not data.startswith(_COMPACT_MAGIC) or len(data) < head + 8:
            raise DecodeError("not a compact range")
        size = int.from_bytes(data[head : head + 8], "big")
        if size >= MAX_SIZE:
            raise DecodeError("compact range size out of range")
        body = data[head + 8 :]
        if len(body) != HASH_SIZE * size.bit_count():
            raise DecodeError("compact range length does not match its size")
        c = cls()
        c._size = size
        c._hashes = [body[i : i + HASH_SIZE] for i in range(0, len(body), HASH_SIZE)]
        return c

    @classmethod
    def from_store(cls, size: int, perfect: PerfectHashFn) -> CompactRange:
        """Rebuild the range of a tree of ``size`` leaves from stored perfect subtrees.

        One lookup per set bit of ``size``.

        Raises:
            ValueError: ``size`` out of range.
        """
        _check_size("size", size)
        c = cls()
        c._size = size
        c._hashes = [perfect(level, index) for level, index in perfect_subtrees(0, size)] if size else []
        return c

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"
