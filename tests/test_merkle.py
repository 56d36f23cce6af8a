"""RFC 9162 Merkle tree math: known answers, references, tampering, the compact range.

Known answers are the Certificate Transparency test tree used across implementations
(transparency-dev/merkle testonly/constants.go and proof/verify_test.go, the same
values as google/certificate-transparency-go): eight leaves, the root for every size
0..8, every perfect subtree hash, and published inclusion and consistency proofs.

References: the proof generators are compared with the RFC's recursive definitions
(PATH and SUBPROOF, written here over plain lists), and the verifiers' verdicts with a
recursive checker written from RFC 6962 §2.1, on every tree up to ~300 leaves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import merkle
from protocol.errors import DecodeError, PliError
from protocol.merkle import (
    EMPTY_ROOT,
    MAX_PROOF_HASHES,
    MAX_SIZE,
    CompactRange,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    perfect_subtrees,
    range_hasher,
    root_from_leaf_hashes,
    subtree_hash,
    verify_consistency,
    verify_inclusion,
)

h = bytes.fromhex

# transparency-dev/merkle testonly/constants.go: LeafInputs, RootHashes, NodeHashes.
LEAVES = [
    h(x) for x in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")
]
ROOTS = [
    h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]
NODES = [
    [
        h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7"),
        h("07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        h("4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658"),
        h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
        h("46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1"),
    ],
    [
        h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
    ],
    [
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ],
    [h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")],
]
# transparency-dev/merkle proof/verify_test.go: (leaf index, 1-based), tree size, proof.
INCLUSION_VECTORS = [
    (1, 1, []),
    (1, 8, [NODES[0][1], NODES[1][1], NODES[2][1]]),
    (6, 8, [NODES[0][4], NODES[1][3], NODES[2][0]]),
    (3, 3, [NODES[1][0]]),
    (2, 5, [NODES[0][0], NODES[1][1], NODES[0][4]]),
]
CONSISTENCY_VECTORS = [
    (1, 1, []),
    (1, 8, [NODES[0][1], NODES[1][1], NODES[2][1]]),
    (6, 8, [NODES[1][2], NODES[1][3], NODES[2][0]]),
    (2, 5, [NODES[1][1], NODES[0][4]]),
    (6, 7, [NODES[1][2], NODES[0][6], NODES[2][0]]),
]
TEST_LEAF_HASHES = [leaf_hash(x) for x in LEAVES]
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


# --------------------------------------------------------------------------- references


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(m, D[n]), literally."""
    n = len(d)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*ref_path(m, d[:k]), root_from_leaf_hashes(d[k:])]
    return [*ref_path(m - k, d[k:]), root_from_leaf_hashes(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], *, b: bool) -> list[bytes]:
    """RFC 9162 §2.1.4.1 SUBPROOF(m, D[n], b), literally."""
    n = len(d)
    if m == n:
        return [] if b else [root_from_leaf_hashes(d)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*ref_subproof(m, d[:k], b=b), root_from_leaf_hashes(d[k:])]
    return [*ref_subproof(m - k, d[k:], b=False), root_from_leaf_hashes(d[:k])]


def ref_inclusion_ok(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """A recursive inclusion checker (the audit path read top-down, RFC 6962 §2.1.1)."""

    def run(p: Sequence[bytes], lo: int, hi: int) -> bytes | None:
        if hi - lo == 1:
            return leaf if not p else None
        if not p:
            return None
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        if index < lo + k:
            sub = run(p[:-1], lo, lo + k)
            return None if sub is None else node_hash(sub, p[-1])
        sub = run(p[:-1], lo + k, hi)
        return None if sub is None else node_hash(p[-1], sub)

    if not 0 <= index < size or any(len(x) != 32 for x in proof):
        return False
    return run(proof, 0, size) == root


def ref_consistency_ok(m: int, n: int, proof: Sequence[bytes], old: bytes, new: bytes) -> bool:
    """A recursive consistency checker (SUBPROOF run backwards, RFC 6962 §2.1.2)."""

    def run(p: Sequence[bytes], lo: int, hi: int) -> tuple[bytes, bytes] | None:
        if m == hi:
            if lo == 0:
                return (old, old) if not p else None
            return (p[0], p[0]) if len(p) == 1 else None
        if not p:
            return None
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        if m <= lo + k:
            sub = run(p[:-1], lo, lo + k)
            return None if sub is None else (sub[0], node_hash(sub[1], p[-1]))
        sub = run(p[:-1], lo + k, hi)
        return None if sub is None else (node_hash(p[-1], sub[0]), node_hash(p[-1], sub[1]))

    if any(len(x) != 32 for x in proof) or not 0 <= m <= n:
        return False
    if m == 0 and old != EMPTY_ROOT:
        return False
    if m == n:
        return not proof and old == new
    if m == 0:
        return not proof
    got = run(proof, 0, n)
    return got == (old, new)


def naive_getter(hashes: Sequence[bytes]) -> merkle.SubtreeHashFn:
    return lambda start, end: root_from_leaf_hashes(hashes[start:end])


def leaves_of(n: int, salt: int = 0) -> list[bytes]:
    return [leaf_hash(b"leaf %d/%d" % (salt, i)) for i in range(n)]


def store_of(hashes: Sequence[bytes]) -> tuple[CompactRange, dict[tuple[int, int], bytes]]:
    c = CompactRange()
    store: dict[tuple[int, int], bytes] = {}
    for x in hashes:
        for node in c.append(x):
            assert (node.level, node.index) not in store
            store[node.level, node.index] = node.hash
    return c, store


def accepts_inclusion(*args: object) -> bool:
    try:
        verify_inclusion(*args)  # type: ignore[arg-type]
    except ProofError:
        return False
    return True


def accepts_consistency(*args: object) -> bool:
    try:
        verify_consistency(*args)  # type: ignore[arg-type]
    except ProofError:
        return False
    return True


def flip(data: bytes, i: int = 0, bit: int = 3) -> bytes:
    b = bytearray(data)
    b[i] ^= 1 << bit
    return bytes(b)


# --------------------------------------------------------------------------- known answers


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert root_from_leaf_hashes([]) == EMPTY_ROOT == ROOTS[0] == hashlib.sha256(b"").digest()
    assert CompactRange().root() == EMPTY_ROOT


def test_leaf_and_node_hashes_match_vectors() -> None:
    assert NODES[0] == TEST_LEAF_HASHES
    for level in range(1, 4):
        for i, expected in enumerate(NODES[level]):
            assert node_hash(NODES[level - 1][2 * i], NODES[level - 1][2 * i + 1]) == expected


@pytest.mark.parametrize("size", range(9))
def test_roots_match_vectors(size: int) -> None:
    assert root_from_leaf_hashes(TEST_LEAF_HASHES[:size]) == ROOTS[size]
    c, _ = store_of(TEST_LEAF_HASHES[:size])
    assert c.root() == ROOTS[size]


def test_compact_range_matches_vector_nodes() -> None:
    _, store = store_of(TEST_LEAF_HASHES)
    assert store == {(level, i): x for level, row in enumerate(NODES) for i, x in enumerate(row)}


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION_VECTORS)
def test_inclusion_vectors(leaf: int, size: int, proof: list[bytes]) -> None:
    index = leaf - 1
    get = naive_getter(TEST_LEAF_HASHES[:size])
    assert inclusion_proof(index, size, get) == proof
    verify_inclusion(TEST_LEAF_HASHES[index], index, size, proof, ROOTS[size])


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION_VECTORS[1:])
def test_inclusion_vectors_tampered(leaf: int, size: int, proof: list[bytes]) -> None:
    # transparency-dev/merkle proof/verify_test.go corruptInclusionProof, every probe.
    index, root, lh = leaf - 1, ROOTS[size], TEST_LEAF_HASHES[leaf - 1]
    probes: list[tuple[str, bytes, int, int, list[bytes], bytes]] = [
        ("index - 1", lh, index - 1, size, proof, root),
        ("index + 1", lh, index + 1, size, proof, root),
        ("index ^ 2", lh, index ^ 2, size, proof, root),
        ("size * 2", lh, index, size * 2, proof, root),
        ("size / 2", lh, index, size // 2, proof, root),
        ("wrong leaf", leaf_hash(b"WrongLeaf"), index, size, proof, root),
        ("empty root", lh, index, size, proof, EMPTY_ROOT),
        ("random root", lh, index, size, proof, SOME_HASH),
        ("trailing garbage", lh, index, size, [*proof, b""], root),
        ("trailing root", lh, index, size, [*proof, root], root),
        ("preceding garbage", lh, index, size, [b"", *proof], root),
        ("preceding root", lh, index, size, [root, *proof], root),
        ("removed component", lh, index, size, proof[:-1], root),
        ("inserted component", lh, index, size, [proof[0], SOME_HASH, *proof[1:]], root),
    ]
    probes += [
        (f"flipped proof[{i}]", lh, index, size, [*proof[:i], flip(p), *proof[i + 1 :]], root)
        for i, p in enumerate(proof)
    ]
    accepted = [desc for desc, *args in probes if accepts_inclusion(*args)]
    assert accepted == []


@pytest.mark.parametrize(("m", "n", "proof"), CONSISTENCY_VECTORS)
def test_consistency_vectors(m: int, n: int, proof: list[bytes]) -> None:
    assert consistency_proof(m, n, naive_getter(TEST_LEAF_HASHES[:n])) == proof
    verify_consistency(m, n, proof, ROOTS[m], ROOTS[n])


@pytest.mark.parametrize(("m", "n", "proof"), CONSISTENCY_VECTORS[1:])
def test_consistency_vectors_tampered(m: int, n: int, proof: list[bytes]) -> None:
    # transparency-dev/merkle proof/verify_test.go corruptConsistencyProof, every probe.
    r1, r2 = ROOTS[m], ROOTS[n]
    probes: list[tuple[str, int, int, list[bytes], bytes, bytes]] = [
        ("m - 1", m - 1, n, proof, r1, r2),
        ("m + 1", m + 1, n, proof, r1, r2),
        ("m ^ 2", m ^ 2, n, proof, r1, r2),
        ("n * 2", m, n * 2, proof, r1, r2),
        ("n / 2", m, n // 2, proof, r1, r2),
        ("wrong root1", m, n, proof, b"WrongRoot", r2),
        ("wrong root2", m, n, proof, r1, b"WrongRoot"),
        ("other root1", m, n, proof, SOME_HASH, r2),
        ("swapped roots", m, n, proof, r2, r1),
        ("empty proof", m, n, [], r1, r2),
        ("trailing garbage", m, n, [*proof, b""], r1, r2),
        ("trailing root1", m, n, [*proof, r1], r1, r2),
        ("trailing root2", m, n, [*proof, r2], r1, r2),
        ("preceding garbage", m, n, [b"", *proof], r1, r2),
        ("preceding root1", m, n, [r1, *proof], r1, r2),
        ("preceding root2", m, n, [r2, *proof], r1, r2),
        ("preceding proof[0]", m, n, [proof[0], *proof], r1, r2),
        ("truncated", m, n, proof[:-1], r1, r2),
    ]
    probes += [
        (f"flipped proof[{i}]", m, n, [*proof[:i], flip(p, bit=4), *proof[i + 1 :]], r1, r2)
        for i, p in enumerate(proof)
    ]
    accepted = [desc for desc, *args in probes if accepts_consistency(*args)]
    assert accepted == []


# --------------------------------------------------------------------------- decided edge cases

A, B = leaf_hash(b"a"), leaf_hash(b"b")


@pytest.mark.parametrize(
    ("m", "n", "proof", "old", "new", "ok"),
    [
        # m == n: nothing to prove; the roots must be equal and the proof empty.
        (0, 0, [], EMPTY_ROOT, EMPTY_ROOT, True),
        (1, 1, [], A, A, True),
        (1, 1, [], A, B, False),
        (1, 1, [A], A, A, False),
        (0, 0, [], A, A, False),  # not the root of the empty tree
        (0, 0, [], EMPTY_ROOT, A, False),
        # m == 0: every tree extends the empty tree (RFC 9162), with an empty proof;
        # the old root must be the empty tree's.
        (0, 1, [], EMPTY_ROOT, A, True),
        (0, 5, [], EMPTY_ROOT, SOME_HASH, True),
        (0, 1, [], A, B, False),
        (0, 1, [A], EMPTY_ROOT, A, False),
        # time travel and empty proofs
        (1, 0, [], A, EMPTY_ROOT, False),
        (2, 1, [], A, B, False),
        (1, 2, [], A, node_hash(A, B), False),
        (1, 2, [B], A, node_hash(A, B), True),
    ],
)
def test_consistency_trivial_cases(m: int, n: int, proof: list[bytes], old: bytes, new: bytes, ok: bool) -> None:
    assert accepts_consistency(m, n, proof, old, new) is ok
    assert ref_consistency_ok(m, n, proof, old, new) is ok


def test_consistency_proof_generation_trivial_cases() -> None:
    get = naive_getter(leaves_of(5))
    assert consistency_proof(0, 5, get) == []
    assert consistency_proof(5, 5, get) == []
    assert consistency_proof(0, 0, get) == []
    for m, n in ((6, 5), (-1, 5), (0, MAX_SIZE)):
        with pytest.raises(ValueError, match="size"):
            consistency_proof(m, n, get)


def test_inclusion_in_empty_tree_is_refused() -> None:
    for root in (EMPTY_ROOT, A):
        assert not accepts_inclusion(A, 0, 0, [], root)
    with pytest.raises(ValueError, match="no leaf"):
        inclusion_proof(0, 0, naive_getter([]))


def test_single_leaf_tree() -> None:
    verify_inclusion(A, 0, 1, [], A)
    assert not accepts_inclusion(A, 0, 1, [], B)
    assert not accepts_inclusion(A, 1, 1, [], A)
    assert not accepts_inclusion(A, 0, 1, [A], A)


@pytest.mark.parametrize(
    "args",
    [
        (A, -1, 4, [B, B], A),
        (A, 0, -4, [B, B], A),
        (A, 0, MAX_SIZE, [B] * 63, A),
        (A, MAX_SIZE, MAX_SIZE, [B] * 63, A),
        (A[:31], 0, 2, [B], A),
        (A, 0, 2, [B], A + b"\x00"),
        (A, 0, 2, [B[:31]], A),
        (A, 0, 2, [bytearray(B)], A),
        (A, 0, 2, [B] * (MAX_PROOF_HASHES + 1), A),
    ],
)
def test_inclusion_bounds(args: tuple[object, ...]) -> None:
    with pytest.raises(ProofError):
        verify_inclusion(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args",
    [
        (-1, 4, [B], A, B),
        (1, MAX_SIZE, [B], A, B),
        (1, 2, [B] * (MAX_PROOF_HASHES + 1), A, B),
        (1, 2, [B[:31]], A, B),
        (1, 2, [B], A[:31], B),
        (1, 2, [B], A, B * 2),
    ],
)
def test_consistency_bounds(args: tuple[object, ...]) -> None:
    with pytest.raises(ProofError):
        verify_consistency(*args)  # type: ignore[arg-type]


def test_proof_error_is_typed() -> None:
    assert issubclass(ProofError, PliError)
    assert ProofError.code == "bad_proof"
    assert "ProofError" in merkle.__all__


# --------------------------------------------------------------------------- huge trees


def _uniform_tree(leaf: bytes) -> merkle.PerfectHashFn:
    """A tree whose leaves are all ``leaf``: every perfect subtree of a level is equal."""
    levels = [leaf]
    for _ in range(63):
        levels.append(node_hash(levels[-1], levels[-1]))
    return lambda level, _index: levels[level]


@pytest.mark.parametrize("size", [MAX_SIZE - 1, (1 << 62) + 1, 1 << 62, 3 << 60])
def test_proofs_near_the_size_limit(size: int) -> None:
    perfect = _uniform_tree(A)
    get = range_hasher(perfect)
    root = subtree_hash(0, size, perfect)
    assert CompactRange.from_store(size, perfect).root() == root
    for index in (0, size // 3, size - 1):
        proof = inclusion_proof(index, size, get)
        assert len(proof) <= MAX_PROOF_HASHES
        verify_inclusion(A, index, size, proof, root)
        assert not accepts_inclusion(A, index, size, proof[:-1], root)
    for m in (1, 2, size // 2, (1 << 61) + 7, size - 1):
        proof = consistency_proof(m, size, get)
        assert len(proof) <= MAX_PROOF_HASHES
        verify_consistency(m, size, proof, subtree_hash(0, m, perfect), root)


# --------------------------------------------------------------------------- against the references

EXHAUSTIVE_SIZES = [*range(1, 34), 63, 64, 65, 127, 128, 129, 255, 256, 257, 300]


@pytest.mark.parametrize("size", EXHAUSTIVE_SIZES)
def test_inclusion_every_index(size: int) -> None:
    hashes = leaves_of(size)
    c, store = store_of(hashes)
    root = root_from_leaf_hashes(hashes)
    assert c.root() == root
    get = range_hasher(lambda level, index: store[level, index])
    for index in range(size):
        proof = inclusion_proof(index, size, get)
        assert proof == ref_path(index, hashes)
        verify_inclusion(hashes[index], index, size, proof, root)
        # the right leaf at a wrong index, and a wrong leaf at the right index
        assert not accepts_inclusion(hashes[index], (index + 1) % size, size, proof, root) or size == 1
        assert not accepts_inclusion(hashes[(index + 1) % size], index, size, proof, root) or size == 1


@pytest.mark.parametrize("n", [*range(1, 34), 64, 65, 100])
def test_consistency_every_old_size(n: int) -> None:
    hashes = leaves_of(n)
    _, store = store_of(hashes)
    get = range_hasher(lambda level, index: store[level, index])
    new = root_from_leaf_hashes(hashes)
    for m in range(n + 1):
        proof = consistency_proof(m, n, get)
        assert proof == (ref_subproof(m, hashes, b=True) if m else [])
        old = root_from_leaf_hashes(hashes[:m])
        verify_consistency(m, n, proof, old, new)
        if proof:
            assert not accepts_consistency(m, n, proof, old, flip(new))
            assert not accepts_consistency(m, n, proof, flip(old), new)


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, 300))
    return size, draw(st.integers(0, size - 1))


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(1, 300))
    return draw(st.integers(0, n)), n


@settings(max_examples=150, deadline=None)
@given(tree_and_index(), st.data())
def test_inclusion_tampering_agrees_with_reference(si: tuple[int, int], data: st.DataObject) -> None:
    size, index = si
    hashes = leaves_of(size, salt=size)
    proof = inclusion_proof(index, size, naive_getter(hashes))
    root = root_from_leaf_hashes(hashes)
    verify_inclusion(hashes[index], index, size, proof, root)
    if proof:  # one flipped bit anywhere in the proof is always caught
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        bad = [*proof[:i], flip(proof[i], bit // 8, bit % 8), *proof[i + 1 :]]
        assert not accepts_inclusion(hashes[index], index, size, bad, root)
    # Any other index, size or proof length: our verdict is the reference's. (A wrong
    # size can be accepted when the path has the same shape: the signed checkpoint
    # binds the size, not the audit path.)
    index2 = data.draw(st.integers(-1, size + 2))
    size2 = data.draw(st.integers(0, 2 * size + 2))
    cut = data.draw(st.integers(0, len(proof) + 1))
    proof2 = [*proof[:cut], *([SOME_HASH] if cut > len(proof) else [])]
    for args in ((index2, size, proof), (index, size2, proof), (index, size, proof2)):
        got = accepts_inclusion(hashes[index], *args, root)
        assert got == ref_inclusion_ok(hashes[index], *args, root)
        if args[0] != index:
            assert not got


@settings(max_examples=150, deadline=None)
@given(two_sizes(), st.data())
def test_consistency_tampering_agrees_with_reference(mn: tuple[int, int], data: st.DataObject) -> None:
    m, n = mn
    hashes = leaves_of(n, salt=n)
    proof = consistency_proof(m, n, naive_getter(hashes))
    old, new = root_from_leaf_hashes(hashes[:m]), root_from_leaf_hashes(hashes)
    verify_consistency(m, n, proof, old, new)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        bad = [*proof[:i], flip(proof[i], bit // 8, bit % 8), *proof[i + 1 :]]
        assert not accepts_consistency(m, n, bad, old, new)
    m2 = data.draw(st.integers(-1, n + 2))
    n2 = data.draw(st.integers(0, 2 * n + 2))
    cut = data.draw(st.integers(0, len(proof) + 1))
    proof2 = [*proof[:cut], *([SOME_HASH] if cut > len(proof) else [])]
    for args in ((m2, n, proof, old, new), (m, n2, proof, old, new), (m, n, proof2, old, new)):
        assert accepts_consistency(*args) == ref_consistency_ok(*args)


# --------------------------------------------------------------------------- compact range and store


def test_compact_range_every_size_up_to_300() -> None:
    hashes = leaves_of(300, salt=7)
    c = CompactRange()
    store: dict[tuple[int, int], bytes] = {}
    for n in range(301):
        assert c.size == n
        assert c.root() == root_from_leaf_hashes(hashes[:n])
        assert len(c.hashes) == n.bit_count()
        blob = c.to_bytes()
        assert len(blob) == len(b"pli-compact-range/v1\n") + 8 + 32 * n.bit_count()
        assert CompactRange.from_bytes(blob) == c
        assert CompactRange.from_store(n, lambda level, index: store[level, index]) == c
        if n < 300:
            nodes = c.append(hashes[n])
            # the leaf, then one parent per trailing 1 bit of n, bottom up
            assert [(x.level, x.index) for x in nodes] == [(lv, n >> lv) for lv in range((~n & (n + 1)).bit_length())]
            for x in nodes:
                assert x.hash == root_from_leaf_hashes(hashes[x.start : x.end])
                store[x.level, x.index] = x.hash
    # every perfect subtree of the 300-leaf tree is stored exactly once
    expected = {(lv, i) for lv in range(9) for i in range(300 >> lv)}
    assert set(store) == expected


def test_compact_range_copy_is_independent() -> None:
    c = CompactRange()
    c.append(A)
    d = c.copy()
    d.append(B)
    assert c.size == 1
    assert d.size == 2
    assert c != d
    assert c.root() == A
    assert "size=1" in repr(c)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"pli-compact-range/v1\n",
        b"pli-compact-range/v2\n" + bytes(8),
        b"pli-compact-range/v1\n" + (1).to_bytes(8, "big"),
        b"pli-compact-range/v1\n" + (1).to_bytes(8, "big") + A + B,
        b"pli-compact-range/v1\n" + (3).to_bytes(8, "big") + A,
        b"pli-compact-range/v1\n" + bytes(8) + A,
        b"pli-compact-range/v1\n" + MAX_SIZE.to_bytes(8, "big") + A,
    ],
)
def test_compact_range_refuses_bad_bytes(blob: bytes) -> None:
    with pytest.raises(DecodeError):
        CompactRange.from_bytes(blob)


def test_compact_range_append_checks_input() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CompactRange().append(b"short")
    full = CompactRange.from_store(MAX_SIZE - 1, _uniform_tree(A))
    with pytest.raises(ValueError, match="full"):
        full.append(A)


def test_perfect_subtrees_and_subtree_hash() -> None:
    assert perfect_subtrees(0, 7) == [(2, 0), (1, 2), (0, 6)]
    assert perfect_subtrees(8, 13) == [(2, 2), (0, 12)]
    assert perfect_subtrees(4, 8) == [(2, 1)]
    hashes = leaves_of(13)
    _, store = store_of(hashes)
    for start, end in ((0, 13), (8, 13), (12, 13), (4, 8), (0, 8)):
        assert subtree_hash(start, end, lambda lv, i: store[lv, i]) == root_from_leaf_hashes(hashes[start:end])
    for start, end in ((3, 5), (2, 6), (5, 5), (-1, 3), (0, MAX_SIZE + 1), (4, 3)):
        with pytest.raises(ValueError, match=r"range|subtree"):
            perfect_subtrees(start, end)


def test_proof_generation_is_logarithmic() -> None:
    calls: list[tuple[int, int]] = []
    perfect = _uniform_tree(A)

    def counting(level: int, index: int) -> bytes:
        calls.append((level, index))
        return perfect(level, index)

    get = range_hasher(counting)
    inclusion_proof(12345, 1_000_003, get)
    assert len(calls) <= 2 * 20
    calls.clear()
    consistency_proof(777_777, 1_000_003, get)
    assert len(calls) <= 2 * 21


def test_too_long_proofs_stop_early() -> None:
    # RFC 9162 steps 4a / 6a: once the walk reaches the root, further hashes are an error
    # by themselves (not only because the root then differs).
    hashes = leaves_of(6)
    get = naive_getter(hashes)
    root = root_from_leaf_hashes(hashes)
    proof = inclusion_proof(5, 6, get)
    with pytest.raises(ProofError, match="too long"):
        verify_inclusion(hashes[5], 5, 6, [*proof, SOME_HASH], root)
    with pytest.raises(ProofError, match="too short"):
        verify_inclusion(hashes[5], 5, 6, proof[:-1], root)
    proof = consistency_proof(3, 6, get)
    old = root_from_leaf_hashes(hashes[:3])
    with pytest.raises(ProofError, match="too long"):
        verify_consistency(3, 6, [*proof, SOME_HASH], old, root)
    with pytest.raises(ProofError, match="too short"):
        verify_consistency(3, 6, proof[:-1], old, root)
