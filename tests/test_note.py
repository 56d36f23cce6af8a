"""Signed notes, checkpoints and tlog proofs (c2sp.org/signed-note, tlog-checkpoint, tlog-proof).

Known answers come from Go's golang.org/x/mod/sumdb/note tests (note_test.go: the
PeterNeumann and EnochRoot keys and signatures, the malformed notes and key strings)
and from the C2SP spec examples. Go itself checks our output in test_log_interop.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import note as note_mod
from protocol.errors import DecodeError, LimitError, PliError, SignatureError
from protocol.merkle import EMPTY_ROOT, CompactRange, ProofError, inclusion_proof, leaf_hash, range_hasher
from protocol.note import (
    MAX_NOTE_SIZE,
    MAX_SIGNATURES,
    TLOG_PROOF_HEADER,
    Checkpoint,
    NoteSignature,
    Signer,
    TlogProof,
    Verifier,
    key_id,
    open_checkpoint,
    open_note,
    sign_checkpoint,
    sign_note,
)

# golang.org/x/mod/sumdb/note note_test.go
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = (
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
GO_NOTE = GO_TEXT + "\n" + PETER_SIG

PETER = Verifier.from_vkey(PETER_VKEY)
ENOCH = Verifier.from_vkey(ENOCH_VKEY)

ORIGIN = "pli.example/log/test"


def peter_signer() -> Signer:
    # A Go signer key is PRIVATE+KEY+name+keyid+base64(0x01 || Ed25519 seed).
    seed = base64.b64decode(PETER_SKEY.split("+", 4)[4])
    assert seed[0] == 1
    return Signer("PeterNeumann", nacl.signing.SigningKey(seed[1:]))


def make_signer(name: str = ORIGIN, seed: int = 1) -> Signer:
    return Signer(name, nacl.signing.SigningKey(bytes([seed]) * 32))


LOG = make_signer()


# --------------------------------------------------------------------------- keys


def test_go_verifier_key_parses() -> None:
    assert PETER.name == "PeterNeumann"
    assert PETER.key_id == bytes.fromhex("c74f20a3")
    assert PETER.vkey == PETER_VKEY
    assert key_id(PETER.name, PETER.public_key) == PETER.key_id
    assert ENOCH.key_id == bytes.fromhex("af0cfe78")


def test_go_signer_key_gives_go_verifier_key() -> None:
    s = peter_signer()
    assert s.verifier == PETER
    assert s.key_id == PETER.key_id


def test_key_id_is_sha256_of_name_newline_type_key() -> None:
    v = LOG.verifier
    expected = hashlib.sha256(ORIGIN.encode() + b"\n\x01" + v.public_key).digest()[:4]
    assert v.key_id == expected
    key64 = base64.b64encode(b"\x01" + v.public_key).decode()
    assert v.vkey == f"{ORIGIN}+{expected.hex()}+{key64}"
    assert Verifier.from_vkey(v.vkey) == v


def test_go_mangled_verifier_keys_are_refused() -> None:
    # note_test.go TestNewVerifier: every proper substring and every byte + 1.
    b = PETER_VKEY
    bad = [b[i:j] for i in range(len(b) + 1) for j in range(i + 1, len(b) + 1) if (i, j) != (0, len(b))]
    bad += [b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :] for i in range(len(b))]
    bad += [
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",  # wrong key length
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # unknown algorithm
        PETER_VKEY.replace("c74f20a3", "C74F20A3"),  # we write and read lowercase hex only
        PETER_VKEY + "+",
        "x" * 2000,
    ]
    accepted = []
    for k in bad:
        try:
            Verifier.from_vkey(k)
        except DecodeError:
            continue
        accepted.append(k)
    assert accepted == []


@pytest.mark.parametrize("name", ["", "a b", "a+b", "tab\there", "nb\u00a0sp", "em\u2003sp", "nl\n", "ctl\x01"])
def test_bad_key_names_are_refused(name: str) -> None:
    with pytest.raises(DecodeError):
        Signer(name, nacl.signing.SigningKey(bytes(32)))
    with pytest.raises(DecodeError):
        Verifier(name, bytes(32))


def test_verifier_needs_a_32_byte_key() -> None:
    with pytest.raises(DecodeError):
        Verifier("a", bytes(31))


# --------------------------------------------------------------------------- notes: Go's vectors


def test_go_sign_vector_reproduced_exactly() -> None:
    assert sign_note(GO_TEXT, peter_signer()) == GO_NOTE


def test_go_open_vectors() -> None:
    text, sigs = open_note(GO_NOTE, [PETER])
    assert text == GO_TEXT
    assert sigs == [NoteSignature("PeterNeumann", PETER.key_id, sigs[0].signature)]
    assert sigs[0].line + "\n" == PETER_SIG

    both = GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG
    # one known key: the other signature is ignored
    _, sigs = open_note(both, [PETER])
    assert [s.name for s in sigs] == ["PeterNeumann"]
    _, sigs = open_note(both.encode(), [PETER, ENOCH])
    assert [s.name for s in sigs] == ["PeterNeumann", "EnochRoot"]
    _, sigs = open_note(both, [ENOCH])
    assert [s.name for s in sigs] == ["EnochRoot"]
    # no known key
    with pytest.raises(SignatureError):
        open_note(both, [LOG.verifier])


def test_go_invalid_signature_is_refused() -> None:
    bad = GO_TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(SignatureError):
        open_note(bad, [PETER])


@pytest.mark.parametrize(
    "msg",
    [
        GO_TEXT,
        GO_TEXT + "\n",
        GO_TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + GO_NOTE,
        b"\xff" + GO_NOTE.encode(),
        GO_TEXT
        + "\n— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        GO_NOTE + "Unexpected line.\n",
    ],
)
def test_go_malformed_notes_are_refused(msg: str | bytes) -> None:
    with pytest.raises(DecodeError):
        open_note(msg, [PETER])


def test_too_many_signatures() -> None:
    others = [make_signer(f"w{i}.example", seed=i + 2) for i in range(MAX_SIGNATURES)]
    full = sign_note("x\n", LOG, *others[: MAX_SIGNATURES - 1])
    _, sigs = open_note(full, [LOG.verifier])
    assert len(sigs) == 1
    over = full + NoteSignature("w99.example", bytes(4), bytes(64)).line + "\n"
    with pytest.raises(LimitError):
        open_note(over, [LOG.verifier])
    with pytest.raises(LimitError):  # Go's case: 101 copies of one line
        open_note(GO_TEXT + "\n" + PETER_SIG * 101, [PETER])


# --------------------------------------------------------------------------- notes: our rules


def test_round_trip_and_witness() -> None:
    witness = make_signer("witness.example", seed=9)
    signed = sign_note("hello\n\nworld\n", LOG, witness)
    text, sigs = open_note(signed, [LOG.verifier, witness.verifier])
    assert text == "hello\n\nworld\n"  # a blank line inside the text is kept
    assert [s.name for s in sigs] == [ORIGIN, "witness.example"]


def test_duplicate_signatures_are_refused() -> None:
    signed = sign_note(GO_TEXT, peter_signer())
    with pytest.raises(DecodeError, match="two signatures"):
        open_note(signed + PETER_SIG, [PETER])
    # the same key id and name, other bytes: still a duplicate
    other = NoteSignature("PeterNeumann", PETER.key_id, bytes(64)).line + "\n"
    with pytest.raises(DecodeError, match="two signatures"):
        open_note(signed + other, [PETER])
    with pytest.raises(DecodeError, match="two signatures"):
        sign_note(GO_TEXT, peter_signer(), peter_signer())


def test_unknown_keys_sharing_a_name_or_an_id_are_ignored() -> None:
    # c2sp.org/signed-note: signatures from unknown keys are ignored, even if they
    # share a name or an id (not both) with a known key.
    same_name = NoteSignature("PeterNeumann", b"\x00\x00\x00\x00", bytes(64)).line + "\n"
    same_id = NoteSignature("PeterNeumann2", PETER.key_id, bytes(64)).line + "\n"
    text, sigs = open_note(GO_NOTE + same_name + same_id, [PETER])
    assert text == GO_TEXT
    assert len(sigs) == 1


def test_known_key_with_bad_signature_fails_the_note() -> None:
    # a good signature by one key does not excuse a bad one by another known key
    bad_enoch = NoteSignature("EnochRoot", ENOCH.key_id, bytes(64)).line + "\n"
    with pytest.raises(SignatureError):
        open_note(GO_NOTE + bad_enoch, [PETER, ENOCH])
    short = NoteSignature("PeterNeumann", PETER.key_id, bytes(63)).line + "\n"
    with pytest.raises(SignatureError):
        open_note(GO_TEXT + "\n" + short, [PETER])


def test_wrong_key_id() -> None:
    raw = bytearray(base64.b64decode(PETER_SIG.rsplit(maxsplit=1)[-1]))
    raw[0] ^= 1
    line = "— PeterNeumann " + base64.b64encode(bytes(raw)).decode() + "\n"
    with pytest.raises(SignatureError, match="no signature by a known key"):
        open_note(GO_TEXT + "\n" + line, [PETER])


@pytest.mark.parametrize("pos", [0, 10, len(GO_TEXT) - 2])
def test_changed_text(pos: int) -> None:
    changed = GO_TEXT[:pos] + chr(ord(GO_TEXT[pos]) ^ 1) + GO_TEXT[pos + 1 :]
    with pytest.raises(SignatureError):
        open_note(changed + "\n" + PETER_SIG, [PETER])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 67 * 8 - 1))
def test_every_signature_bit_matters(bit: int) -> None:
    raw = bytearray(base64.b64decode(PETER_SIG.rsplit(maxsplit=1)[-1]))
    raw[bit // 8] ^= 1 << (bit % 8)
    line = "— PeterNeumann " + base64.b64encode(bytes(raw)).decode() + "\n"
    with pytest.raises(SignatureError):
        open_note(GO_TEXT + "\n" + line, [PETER])


@pytest.mark.parametrize(
    "msg",
    [
        GO_TEXT.replace("\n", "\r\n", 1) + "\n" + PETER_SIG,  # CR
        GO_TEXT + "\n" + PETER_SIG.replace("\n", "\r\n"),
        GO_TEXT.replace(" ", "\t", 1) + "\n" + PETER_SIG,  # TAB
        GO_TEXT + "\n" + PETER_SIG.replace("=\n", "\n"),  # padding missing
        GO_TEXT + "\n" + PETER_SIG.replace("AM=\n", "AN=\n"),  # non-zero padding bits
        GO_TEXT + "\n" + PETER_SIG.replace("— ", "-- "),
        GO_TEXT + "\n" + PETER_SIG.replace("— ", "—"),
        GO_TEXT + "\n" + PETER_SIG.replace("Neumann ", "Neumann  "),
        GO_TEXT + "\n" + "— PeterNeumann\n",
        GO_TEXT + "\n" + "— PeterNeumann AAAA\n",  # not even a key id and a byte
        GO_TEXT[:-1] + "\n" + PETER_SIG,  # text must end in a newline before the blank line
        GO_NOTE + "\n",
        "",
        "\n\n",
    ],
)
def test_malformed_notes(msg: str) -> None:
    with pytest.raises(DecodeError):
        open_note(msg, [PETER])


def test_surrogates_and_bad_utf8() -> None:
    with pytest.raises(DecodeError):
        open_note("\ud800" + GO_NOTE, [PETER])
    with pytest.raises(DecodeError):
        open_note(GO_NOTE.encode().replace(b"If", b"I\xc0"), [PETER])
    with pytest.raises(DecodeError):
        sign_note("\ud800\n", LOG)


def test_note_size_limit() -> None:
    big = "x" * (MAX_NOTE_SIZE - 200) + "\n"
    open_note(sign_note(big, LOG), [LOG.verifier])
    with pytest.raises(LimitError):
        sign_note("x" * MAX_NOTE_SIZE + "\n", LOG)
    huge = "x" * MAX_NOTE_SIZE + "\n\n" + PETER_SIG
    with pytest.raises(LimitError):
        open_note(huge, [PETER])
    with pytest.raises(LimitError):
        open_note(huge.encode(), [PETER])
    # multi-byte characters count as bytes
    with pytest.raises(LimitError):
        open_note("é" * (MAX_NOTE_SIZE // 2) + "\n\n" + PETER_SIG, [PETER])


@pytest.mark.parametrize("text", ["no newline", "", "a\rb\n", "tab\t\n"])
def test_sign_refuses_bad_text(text: str) -> None:
    with pytest.raises(DecodeError):
        sign_note(text, LOG)


def test_verifier_list_must_be_usable() -> None:
    with pytest.raises(ValueError, match="at least one"):
        open_note(GO_NOTE, [])
    impostor = Verifier.__new__(Verifier)
    object.__setattr__(impostor, "name", "PeterNeumann")
    object.__setattr__(impostor, "public_key", bytes(32))
    object.__setattr__(impostor, "key_id", PETER.key_id)
    with pytest.raises(ValueError, match="two verifiers"):
        open_note(GO_NOTE, [PETER, impostor])
    open_note(GO_NOTE, [PETER, PETER])  # the same key twice is not ambiguous


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r"), max_size=200))
def test_any_text_round_trips(body: str) -> None:
    text = "".join(c for c in body if c == "\n" or c >= " ") + "\n"
    signed = sign_note(text, LOG)
    assert open_note(signed, [LOG.verifier])[0] == text
    assert open_note(signed.encode(), [LOG.verifier])[0] == text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_only_our_errors(data: bytes) -> None:
    for parse in (
        lambda: open_note(data, [PETER]),
        lambda: open_note(GO_NOTE.encode() + data, [PETER]),
        lambda: TlogProof.from_text(data),
        lambda: TlogProof.from_text(TLOG_PROOF_HEADER.encode() + b"\n" + data),
        lambda: Checkpoint.from_text(data.decode("utf-8", "replace")),
    ):
        with contextlib.suppress(PliError):
            parse()


# --------------------------------------------------------------------------- C2SP examples


def test_c2sp_signed_note_example_splits_at_the_last_blank_line() -> None:
    # c2sp.org/signed-note: the example's text contains a blank line; its key is not
    # published, so only the structure can be checked.
    example = (
        "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned è subito sera.\n\n"
        "— quasimodo.example/salvatore "
        "NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
    )
    text, sigs = note_mod._split_note(example)
    assert text.endswith("\n\ned è subito sera.\n")
    assert [(s.name, len(s.signature)) for s in sigs] == [("quasimodo.example/salvatore", 64)]
    stranger = Verifier("quasimodo.example/salvatore", bytes(32))  # same name, other key id
    with pytest.raises(SignatureError):
        open_note(example, [stranger])


def test_c2sp_checkpoint_example_parses() -> None:
    # c2sp.org/tlog-checkpoint example body
    body = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    cp = Checkpoint.from_text(body)
    assert (cp.origin, cp.size, cp.extensions) == ("example.com/behind-the-sofa", 20852163, ())
    assert cp.to_text() == body


def test_c2sp_tlog_proof_example_parses() -> None:
    # c2sp.org/tlog-proof example; its signatures are elided ("[...]") in the spec, so
    # it parses but cannot verify.
    example = (
        "c2sp.org/tlog-proof@v1\n"
        "extra YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ\n"
        "index 73894\n"
        "gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=\n"
        "B95lDa8R83lS8n0eG+o0buTxRKQTYFi//1U8anccXmA=\n"
        "EKNzoDWG8LGC0Yp9o+sv3qllpMP9uHQ9B20KNL+Q1zs=\n"
        "RoopEkOdqkYqMB4MJXrbt/hMjOxsVn0IrWjpz1ZMMes=\n"
        "AHCioX9nLjsrse6YhjRRmk1WUEirVOLLRoOQ6vfO5vk=\n"
        "\n"
        "example.com/fancylog\n109482\nsFodV/vSp5O8n9a8QpW6PRY97tfOSW5bsc2Xl/EQi08=\n\n"
        "— example.com/fancylog hI2DJw[...]1roloI=\n"
    )
    p = TlogProof.from_text(example)
    assert p.index == 73894
    assert len(p.proof) == 5
    assert p.extra is not None
    assert p.extra.startswith(b"age-v1.2.1-darwin-arm64.tar.gz")
    assert p.checkpoint.startswith("example.com/fancylog\n109482\n")
    assert p.to_text() == example
    with pytest.raises(DecodeError):
        p.verify(bytes(32), Verifier("example.com/fancylog", bytes(32)), origin="example.com/fancylog")


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip() -> None:
    cp = Checkpoint(ORIGIN, 5, b"\x07" * 32)
    assert cp.to_text() == f"{ORIGIN}\n5\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n"
    signed = sign_checkpoint(cp, LOG)
    assert open_checkpoint(signed, LOG.verifier, origin=ORIGIN) == cp
    assert open_checkpoint(signed.encode(), LOG.verifier, origin=ORIGIN) == cp


def test_checkpoint_extensions_are_kept() -> None:
    cp = Checkpoint(ORIGIN, 1, b"\x01" * 32, ("ext one", "ext two"))
    text = cp.to_text()
    assert text.endswith("\next one\next two\n")
    assert Checkpoint.from_text(text) == cp
    assert open_checkpoint(sign_checkpoint(cp, LOG), LOG.verifier, origin=ORIGIN).extensions == ("ext one", "ext two")


def test_checkpoint_of_another_origin_is_refused() -> None:
    signed = sign_checkpoint(Checkpoint("other.example/log", 1, b"\x01" * 32), LOG)
    with pytest.raises(SignatureError, match="expected"):
        open_checkpoint(signed, LOG.verifier, origin=ORIGIN)


def test_checkpoint_signed_by_another_key_is_refused() -> None:
    impostor = make_signer(ORIGIN, seed=2)  # same name, other key
    signed = sign_checkpoint(Checkpoint(ORIGIN, 1, b"\x01" * 32), impostor)
    with pytest.raises(SignatureError):
        open_checkpoint(signed, LOG.verifier, origin=ORIGIN)


def test_empty_tree_checkpoint() -> None:
    cp = Checkpoint(ORIGIN, 0, EMPTY_ROOT)
    assert Checkpoint.from_text(cp.to_text()) == cp
    with pytest.raises(DecodeError, match="empty tree"):
        Checkpoint(ORIGIN, 0, b"\x01" * 32)


ROOT_B64 = base64.b64encode(b"\x01" * 32).decode()


@pytest.mark.parametrize(
    "text",
    [
        f"{ORIGIN}\n1\n",
        f"{ORIGIN}\n1\n{ROOT_B64}",
        f"\n1\n{ROOT_B64}\n",
        f"{ORIGIN}\n01\n{ROOT_B64}\n",
        f"{ORIGIN}\n+1\n{ROOT_B64}\n",
        f"{ORIGIN}\n-1\n{ROOT_B64}\n",
        f"{ORIGIN}\n 1\n{ROOT_B64}\n",
        f"{ORIGIN}\n9223372036854775808\n{ROOT_B64}\n",
        f"{ORIGIN}\n1\n{ROOT_B64[:-1]}\n",
        f"{ORIGIN}\n1\n{base64.b64encode(bytes(31)).decode()}\n",
        f"{ORIGIN}\n1\n{ROOT_B64}\n\n",
        f"{ORIGIN}\n1\n{ROOT_B64}\n\next\n",
        f"{ORIGIN}\r\n1\n{ROOT_B64}\n",
        f"{ORIGIN}\n\u0661\n{ROOT_B64}\n",  # an Arabic-Indic digit one is not ASCII decimal
    ],
)
def test_malformed_checkpoints(text: str) -> None:
    with pytest.raises(DecodeError):
        Checkpoint.from_text(text)


def test_checkpoint_invariants() -> None:
    for args in (("", 1, bytes(32)), ("a\nb", 1, bytes(32)), ("o", -1, bytes(32)), ("o", 1, bytes(31))):
        with pytest.raises(DecodeError):
            Checkpoint(*args)
    with pytest.raises(DecodeError):
        Checkpoint("o", 1, bytes(32), ("",))
    with pytest.raises(DecodeError):
        Checkpoint("o", True, bytes(32))  # noqa: FBT003


# --------------------------------------------------------------------------- tlog proofs


def build_log(n: int) -> tuple[list[bytes], CompactRange, dict[tuple[int, int], bytes]]:
    leaves = [leaf_hash(b"envelope %d" % i) for i in range(n)]
    c = CompactRange()
    store: dict[tuple[int, int], bytes] = {}
    for x in leaves:
        for node in c.append(x):
            store[node.level, node.index] = node.hash
    return leaves, c, store


def make_proof(n: int, index: int, extra: bytes | None = None) -> tuple[list[bytes], TlogProof]:
    leaves, c, store = build_log(n)
    checkpoint = sign_checkpoint(Checkpoint(ORIGIN, n, c.root()), LOG)
    proof = inclusion_proof(index, n, range_hasher(lambda lv, i: store[lv, i]))
    return leaves, TlogProof(index, tuple(proof), checkpoint, extra)


@pytest.mark.parametrize(("n", "index"), [(1, 0), (2, 1), (7, 6), (8, 0), (13, 12), (13, 5), (100, 99)])
def test_tlog_proof_round_trip_and_verify(n: int, index: int) -> None:
    leaves, p = make_proof(n, index)
    text = p.to_text()
    lines = text.split("\n")
    assert lines[0] == TLOG_PROOF_HEADER
    assert lines[1] == f"index {index}"
    parsed = TlogProof.from_text(text)
    assert parsed == p
    assert TlogProof.from_text(text.encode()) == p
    cp = parsed.verify(leaves[index], LOG.verifier, origin=ORIGIN)
    assert cp.size == n
    with pytest.raises(ProofError):
        parsed.verify(leaf_hash(b"something else"), LOG.verifier, origin=ORIGIN)
    if n > 1:
        with pytest.raises(ProofError):
            parsed.verify(leaves[(index + 1) % n], LOG.verifier, origin=ORIGIN)
    with pytest.raises(SignatureError):
        parsed.verify(leaves[index], make_signer(seed=3).verifier, origin=ORIGIN)
    with pytest.raises(SignatureError):
        parsed.verify(leaves[index], LOG.verifier, origin="another.example/log")


def test_tlog_proof_extra() -> None:
    leaves, p = make_proof(5, 3, extra=b"opaque \x00 bytes")
    text = p.to_text()
    assert text.split("\n")[1] == "extra " + base64.b64encode(b"opaque \x00 bytes").decode()
    assert TlogProof.from_text(text) == p
    TlogProof.from_text(text).verify(leaves[3], LOG.verifier, origin=ORIGIN)
    _, empty = make_proof(5, 3, extra=b"")
    assert empty.to_text().split("\n")[1] == "extra "
    assert TlogProof.from_text(empty.to_text()).extra == b""


def test_tlog_proof_tampering() -> None:
    leaves, p = make_proof(13, 5)
    text = p.to_text()
    # another index, a flipped hash, a dropped hash: the inclusion proof fails
    for bad in (
        text.replace("index 5\n", "index 4\n"),
        text.replace("index 5\n", "index 13\n"),
        text.replace(base64.b64encode(p.proof[1]).decode(), base64.b64encode(bytes(32)).decode()),
        text.replace(base64.b64encode(p.proof[-1]).decode() + "\n", ""),
    ):
        with pytest.raises(ProofError):
            TlogProof.from_text(bad).verify(leaves[5], LOG.verifier, origin=ORIGIN)
    # a checkpoint claiming another size: its signature breaks
    cp_size = text.replace(f"{ORIGIN}\n13\n", f"{ORIGIN}\n14\n")
    with pytest.raises(SignatureError):
        TlogProof.from_text(cp_size).verify(leaves[5], LOG.verifier, origin=ORIGIN)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t.replace(TLOG_PROOF_HEADER, "c2sp.org/tlog-proof@v2"),
        lambda t: "\n" + t,
        lambda t: t.replace("index 5", "index 05"),
        lambda t: t.replace("index 5", "index  5"),
        lambda t: t.replace("index 5", "index -5"),
        lambda t: t.replace("index 5", "Index 5"),
        lambda t: t.replace("index 5\n", "index 5\nextra AAAA\n"),  # extra after index
        lambda t: t.replace("index 5\n", ""),
        lambda t: t.replace("=\n", "\n", 1),  # non-canonical hash
        lambda t: t.replace("index 5\n", "index 5\nAAAA\n"),  # a 3-byte hash
        lambda t: t.split("\n\n", 1)[0] + "\n\n",  # no checkpoint
        lambda t: t.split("\n\n", 1)[0],  # truncated
        lambda t: t.replace("\n", "\r\n", 1),
        lambda t: t.replace(TLOG_PROOF_HEADER + "\n", TLOG_PROOF_HEADER + "\nextra !!!!\n"),
        lambda t: t[:-1],  # the checkpoint lost its final newline
    ],
)
def test_malformed_tlog_proofs(mutate: object) -> None:
    _, p = make_proof(13, 5)
    bad = mutate(p.to_text())  # type: ignore[operator]
    with pytest.raises(DecodeError):
        TlogProof.from_text(bad)


def test_tlog_proof_limits() -> None:
    leaves, p = make_proof(3, 1)
    with pytest.raises(LimitError):
        TlogProof(1, (bytes(32),) * 65, p.checkpoint)
    with pytest.raises(LimitError):
        TlogProof(1, p.proof, p.checkpoint, extra=bytes(4097))
    many = p.to_text().replace("index 1\n", "index 1\n" + (base64.b64encode(bytes(32)).decode() + "\n") * 65)
    with pytest.raises(LimitError):
        TlogProof.from_text(many)
    with pytest.raises(LimitError):
        TlogProof.from_text("x" * (64 * 1024))
    with pytest.raises(DecodeError):
        TlogProof(-1, p.proof, p.checkpoint)
    with pytest.raises(DecodeError):
        TlogProof(1, (bytes(31),), p.checkpoint)
    # no inclusion proof can be valid for an index past the tree size
    with pytest.raises(ProofError):
        TlogProof(3, p.proof, p.checkpoint).verify(leaves[1], LOG.verifier, origin=ORIGIN)


def test_tlog_proof_for_the_empty_tree_never_verifies() -> None:
    checkpoint = sign_checkpoint(Checkpoint(ORIGIN, 0, EMPTY_ROOT), LOG)
    p = TlogProof(0, (), checkpoint)
    assert TlogProof.from_text(p.to_text()) == p
    with pytest.raises(ProofError):
        p.verify(EMPTY_ROOT, LOG.verifier, origin=ORIGIN)


def test_public_names() -> None:
    for name in note_mod.__all__:
        assert hasattr(note_mod, name)


def test_vkey_whose_base64_contains_plus_parses() -> None:
    """Regression: a verifier key string is cut at its first two "+" only, as Go's note does."""
    for seed in range(256):
        signer = Signer("pli-relay.invalid/x", nacl.signing.SigningKey(bytes([seed]) * 32))
        vkey = signer.verifier.vkey
        if "+" in vkey.split("+", 2)[2]:
            assert Verifier.from_vkey(vkey) == signer.verifier
            return
    pytest.fail("no seed gave a base64 key with a '+' in it")
