"""Our transparency log against Go's golang.org/x/mod/sumdb/{note,tlog}, both ways.

The Go side is tests/go/tlogcheck, built offline from Debian's
golang-golang-x-mod-dev sources (GOPATH mode, no module download). It opens our
signed checkpoints with ``note.Open``, runs our inclusion and consistency proofs
through ``tlog.CheckRecord`` / ``tlog.CheckTree``, parses our c2sp.org/tlog-proof
files, generates its own proofs (``tlog.ProveRecord`` / ``ProveTree``) for us to
compare byte for byte, and signs notes for us to open.

sumdb's tlog is RFC 6962 hashing (RecordHash = SHA-256(0x00 || data), NodeHash with
0x01), the same as ours; its "go.sum database tree" note is a checkpoint whose origin
is that line. Two differences, both outside what we produce: tlog calls the empty
tree's hash all zeros (RFC 9162 and we: SHA-256()), and CheckTree refuses old size 0.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from protocol.merkle import (
    CompactRange,
    Node,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    range_hasher,
)
from protocol.note import Checkpoint, Signer, TlogProof, open_note, sign_checkpoint, sign_note

GOPATH = Path(os.environ.get("PLI_GOPATH", "/usr/share/gocode"))
GO_SOURCES = GOPATH / "src/golang.org/x/mod/sumdb"
PROGRAM = Path(__file__).parent / "go" / "tlogcheck"

ORIGIN = "pli.example/log/interop"
LOG = Signer(ORIGIN, nacl.signing.SigningKey(bytes(range(32))))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def tlogcheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("the Go toolchain is not installed (CI installs golang-go; see Makefile)")
    if not (GO_SOURCES / "note" / "note.go").is_file() or not (GO_SOURCES / "tlog" / "tlog.go").is_file():
        pytest.skip(f"golang.org/x/mod sources not found under {GOPATH} (Debian package golang-golang-x-mod-dev)")
    out = tmp_path_factory.mktemp("go")
    env = {
        **os.environ,
        "GOPATH": str(GOPATH),
        "GO111MODULE": "off",  # GOPATH mode: no go.mod, nothing downloaded
        "GOFLAGS": "",
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
        "GOCACHE": str(out / "cache"),
    }
    binary = out / "tlogcheck"
    proc = subprocess.run(
        [go, "build", "-o", str(binary), "."], cwd=PROGRAM, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return binary


def run_go(binary: Path, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(binary)], input=json.dumps({"cases": cases}), capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    results: list[dict[str, Any]] = json.loads(proc.stdout)["results"]
    assert len(results) == len(cases)
    return results


def build_log(n: int, salt: str = "") -> tuple[list[bytes], CompactRange, dict[tuple[int, int], bytes], list[Node]]:
    data = [f"{salt}record {i}".encode() for i in range(n)]
    c = CompactRange()
    store: dict[tuple[int, int], bytes] = {}
    emitted: list[Node] = []
    for d in data:
        for node in c.append(leaf_hash(d)):
            store[node.level, node.index] = node.hash
            emitted.append(node)
    return data, c, store, emitted


def flip_b64(s: str) -> str:
    raw = bytearray(base64.b64decode(s))
    raw[0] ^= 1
    return b64(bytes(raw))


# --------------------------------------------------------------------------- checkpoints and notes


@pytest.mark.parametrize("origin", [ORIGIN, "go.sum database tree"])
def test_go_opens_our_checkpoints(tlogcheck: Path, origin: str) -> None:
    cases: list[dict[str, Any]] = []
    expected = []
    for n in (0, 1, 2, 3, 7, 8, 13, 100, 1000):
        _, c, _, _ = build_log(n)
        signed = sign_checkpoint(Checkpoint(origin, n, c.root()), LOG)
        cases.append({"op": "open_checkpoint", "note": signed, "vkey": LOG.verifier.vkey, "origin": origin})
        expected.append({"ok": True, "size": n, "hash": b64(c.root())})
    # tampered: another root, another size, another origin, another key
    good = cases[4]["note"]
    root_line = good.split("\n")[2]
    for bad_note, origin_asked, vkey in (
        (good.replace(root_line, flip_b64(root_line)), origin, LOG.verifier.vkey),
        (good.replace("\n7\n", "\n6\n", 1), origin, LOG.verifier.vkey),
        (good, origin + "x", LOG.verifier.vkey),
        (good, origin, Signer(ORIGIN, nacl.signing.SigningKey(bytes(32))).verifier.vkey),
    ):
        cases.append({"op": "open_checkpoint", "note": bad_note, "vkey": vkey, "origin": origin_asked})
        expected.append({"ok": False})
    results = run_go(tlogcheck, cases)
    for want, got in zip(expected, results, strict=True):
        assert {k: got.get(k) for k in want} == want, got


def test_go_verifies_our_note_with_a_witness(tlogcheck: Path) -> None:
    witness = Signer("witness.example", nacl.signing.SigningKey(bytes([7]) * 32))
    signed = sign_note("several\nlines\n\nwith a blank one\n", LOG, witness)
    results = run_go(
        tlogcheck,
        [
            {"op": "open_note", "note": signed, "vkey": LOG.verifier.vkey},
            {"op": "open_note", "note": signed, "vkey": witness.verifier.vkey},
        ],
    )
    for r in results:
        assert r["ok"], r
        assert r["text"] == "several\nlines\n\nwith a blank one\n"
        assert (r["sigs"], r["unverified"]) == (1, 1)


def test_go_signs_notes_we_open(tlogcheck: Path) -> None:
    seed = bytes(range(32))
    signer = Signer(ORIGIN, nacl.signing.SigningKey(seed))
    seed64 = b64(b"\x01" + seed)  # Go signer key: PRIVATE+KEY+name+keyid+base64(0x01 || seed)
    skey = f"PRIVATE+KEY+{ORIGIN}+{signer.key_id.hex()}+{seed64}"
    texts = ["hello\n", Checkpoint(ORIGIN, 3, bytes(range(32))).to_text(), "é, ü and 😀\n\nand more\n"]
    results = run_go(tlogcheck, [{"op": "sign", "skey": skey, "text": t} for t in texts])
    for text, r in zip(texts, results, strict=True):
        assert r["ok"], r
        assert r["note"] == sign_note(text, signer)  # Ed25519 is deterministic: same bytes
        assert open_note(r["note"], [signer.verifier])[0] == text


# --------------------------------------------------------------------------- proofs


SIZES = [*range(1, 18), 31, 32, 33, 64, 100, 257]


def test_go_checks_our_inclusion_proofs(tlogcheck: Path) -> None:
    cases: list[dict[str, Any]] = []
    expected: list[bool] = []
    for n in SIZES:
        data, c, store, _ = build_log(n)
        get = range_hasher(lambda lv, i, s=store: s[lv, i])  # type: ignore[misc]
        root = b64(c.root())
        indexes = range(n) if n <= 33 else (0, 1, n // 2, n - 2, n - 1)
        for index in indexes:
            proof = [b64(x) for x in inclusion_proof(index, n, get)]
            case = {"op": "check_record", "size": n, "index": index, "leaf": b64(leaf_hash(data[index])), "root": root}
            cases.append({**case, "proof": proof})
            expected.append(True)
            if proof:
                cases.append({**case, "proof": [flip_b64(proof[0]), *proof[1:]]})
                expected.append(False)
                cases.append({**case, "proof": proof[:-1]})
                expected.append(False)
            cases.append({**case, "proof": proof, "leaf": b64(leaf_hash(b"not logged"))})
            expected.append(False)
    results = run_go(tlogcheck, cases)
    assert [r["ok"] for r in results] == expected


def test_go_checks_our_consistency_proofs(tlogcheck: Path) -> None:
    cases: list[dict[str, Any]] = []
    expected: list[bool] = []
    for n in SIZES:
        _, c, store, _ = build_log(n)
        get = range_hasher(lambda lv, i, s=store: s[lv, i])  # type: ignore[misc]
        olds = range(1, n + 1) if n <= 33 else (1, 2, 31, 32, 33, n // 2, n - 1, n)
        for m in olds:  # Go's CheckTree refuses m == 0 (we accept it, see test_merkle)
            old = CompactRange.from_store(m, lambda lv, i, s=store: s[lv, i])  # type: ignore[misc]
            proof = [b64(x) for x in consistency_proof(m, n, get)]
            case = {
                "op": "check_tree",
                "old_size": m,
                "new_size": n,
                "old_root": b64(old.root()),
                "new_root": b64(c.root()),
            }
            cases.append({**case, "proof": proof})
            expected.append(True)
            if proof:
                cases.append({**case, "proof": [*proof[:-1], flip_b64(proof[-1])]})
                expected.append(False)
                cases.append({**case, "proof": proof[1:]})
                expected.append(False)
    results = run_go(tlogcheck, cases)
    assert [r["ok"] for r in results] == expected


def test_our_proofs_are_gos_proofs(tlogcheck: Path) -> None:
    n = 40
    data, _, _, emitted = build_log(n, salt="go ")
    [r] = run_go(tlogcheck, [{"op": "prove", "leaves": [b64(d) for d in data]}])
    assert r["ok"], r
    # tlog stores, for each record, the leaf hash then the subtrees it completes: the
    # same nodes, in the same order, as CompactRange.append reports.
    assert [b64(x.hash) for x in emitted] == r["stored"]
    for size in range(1, n + 1):
        _, c, store, _ = build_log(size, salt="go ")
        get = range_hasher(lambda lv, i, s=store: s[lv, i])  # type: ignore[misc]
        assert b64(c.root()) == r["roots"][size - 1]
        assert [[b64(x) for x in inclusion_proof(i, size, get)] for i in range(size)] == r["records"][size]
        assert [[b64(x) for x in consistency_proof(m, size, get)] for m in range(1, size + 1)] == r["trees"][size][1:]


# --------------------------------------------------------------------------- tlog proofs


def test_go_checks_our_tlog_proofs(tlogcheck: Path) -> None:
    cases: list[dict[str, Any]] = []
    expected: list[bool] = []
    for n, index, extra in ((1, 0, None), (2, 1, b"x"), (13, 12, None), (13, 4, b""), (100, 99, b"\x00" * 40)):
        data, c, store, _ = build_log(n)
        checkpoint = sign_checkpoint(Checkpoint(ORIGIN, n, c.root()), LOG)
        proof = inclusion_proof(index, n, range_hasher(lambda lv, i, s=store: s[lv, i]))  # type: ignore[misc]
        p = TlogProof(index, tuple(proof), checkpoint, extra)
        text = p.to_text()
        assert TlogProof.from_text(text).verify(leaf_hash(data[index]), LOG.verifier, origin=ORIGIN).size == n
        case = {"op": "tlog_proof", "text": text, "vkey": LOG.verifier.vkey, "origin": ORIGIN}
        cases.append({**case, "leaf": b64(leaf_hash(data[index]))})
        expected.append(True)
        cases.append({**case, "leaf": b64(leaf_hash(b"not logged"))})
        expected.append(False)
        cases.append(
            {**case, "leaf": b64(leaf_hash(data[index])), "text": text.replace(f"index {index}\n", "index 0\n")}
        )
        expected.append(index == 0)
    results = run_go(tlogcheck, cases)
    assert [r["ok"] for r in results] == expected
    assert results[3]["extra"] == b64(b"x")  # the first case of the second proof
