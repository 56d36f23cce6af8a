"""Audit benchmark (issue "Speed", item 4): verifying proofs and an audit package on a
log of one million entries takes milliseconds.

    python bench/audit.py            # 1,000,000 leaves, about 15 s
    python bench/audit.py --quick    # CI: 100,000 leaves, exits non-zero if anything breaks

1. Builds a tree of ``--leaves`` leaves in memory with ``protocol.merkle.CompactRange``,
   keeping every perfect subtree it reports (one list per level: nodes of a level are
   completed in index order), and checks the root against an independent computation
   (``subtree_hash`` over the store).
2. Times ``merkle.verify_consistency`` and ``merkle.verify_inclusion`` (proofs made by
   ``consistency_proof`` / ``inclusion_proof`` over ``range_hasher``) for several pairs,
   and checks that a damaged proof is refused.
3. Runs ``python -m client --json demo`` and times ``client.audit.verify_package`` on the
   audit package it exports (a case on a 9-entry log), then on the same package
   re-anchored in a one-million-entry log: the demo's leaves placed at the end of
   the big tree after filler leaves, every receipt's inclusion proof, every checkpoint
   and every consistency proof recomputed for it, the checkpoints signed by a bench log
   key, so the devices' and practitioners' signatures are the demo's own.

The last lines are the per-operation times.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nacl.signing  # noqa: E402

from client.audit import verify_package  # noqa: E402
from protocol import merkle, note  # noqa: E402
from protocol.errors import PliError  # noqa: E402

BENCH_ORIGIN = "bench.pli.invalid/audit"


class BenchError(Exception):
    pass


# -- an in-memory log -------------------------------------------------------------------------


class Tree:
    """A log built with CompactRange; ``levels[l][i]`` is the perfect subtree (l, i)."""

    def __init__(self) -> None:
        self.range = merkle.CompactRange()
        self.levels: list[list[bytes]] = []
        self.roots: dict[int, bytes] = {}

    def append(self, leaf_hash: bytes) -> None:
        for node in self.range.append(leaf_hash):
            if node.level == len(self.levels):
                self.levels.append([])
            self.levels[node.level].append(node.hash)

    def perfect(self, level: int, index: int) -> bytes:
        return self.levels[level][index]

    @property
    def get_hash(self) -> Callable[[int, int], bytes]:
        return merkle.range_hasher(self.perfect)

    def root(self, size: int) -> bytes:
        return merkle.EMPTY_ROOT if size == 0 else self.get_hash(0, size)


def filler(i: int) -> bytes:
    return merkle.leaf_hash(b"bench filler leaf " + i.to_bytes(8, "big"))


def build(n: int, tail: list[bytes] | None = None) -> Tree:
    """``n`` leaves: filler leaves, then the leaf hashes of ``tail`` (if any) at the end."""
    tail = tail or []
    t = Tree()
    for i in range(n - len(tail)):
        t.append(filler(i))
    for h in tail:
        t.append(h)
    return t


def per_op(fn: Callable[[], object], *, min_time: float = 0.2, min_runs: int = 20) -> float:
    """Median seconds per call over batches, after a warm-up call."""
    fn()
    runs: list[float] = []
    batch = 1
    t_end = time.perf_counter() + min_time
    while len(runs) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        runs.append((time.perf_counter() - t0) / batch)
        if runs[-1] * batch < 1e-3:
            batch *= 2
    return statistics.median(runs)


def _us(s: float) -> str:
    return f"{s * 1e6:8.1f} µs ({s * 1e3:.3f} ms)"


# -- proofs --------------------------------------------------------------------------------------


def bench_proofs(t: Tree, n: int) -> tuple[list[str], bool]:
    lines: list[str] = []
    ok = True
    root_n = t.range.root()
    if root_n != t.root(n):
        raise BenchError("CompactRange root and stored-subtree root differ")
    pairs = sorted({(1, n), (n // 2, n), (1 << (n.bit_length() - 1), n), (n - 1, n), (n // 3 + 7, n - n // 5),
                    (n - 1000, n)})
    for m, size in pairs:
        proof = merkle.consistency_proof(m, size, t.get_hash)
        old, new = t.root(m), t.root(size)
        merkle.verify_consistency(m, size, proof, old, new)
        bad = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
        try:
            merkle.verify_consistency(m, size, bad, old, new)
            ok = False
            lines.append(f"  consistency {m}->{size}: a damaged proof was ACCEPTED")
        except merkle.ProofError:
            pass
        s = per_op(functools.partial(merkle.verify_consistency, m, size, proof, old, new))
        g = per_op(functools.partial(merkle.consistency_proof, m, size, t.get_hash), min_runs=5)
        lines.append(f"verify_consistency({m:>9,} -> {size:>9,}) {len(proof):2} hashes: {_us(s)}"
                     f"   [prove: {g * 1e6:.1f} µs]")
    for index in sorted({0, n // 2, n - 1, 123_457 % n, n - n // 7}):
        proof = merkle.inclusion_proof(index, n, t.get_hash)
        leaf = t.perfect(0, index)
        merkle.verify_inclusion(leaf, index, n, proof, root_n)
        try:
            merkle.verify_inclusion(leaf, index ^ 1, n, proof, root_n)
            ok = False
            lines.append(f"  inclusion {index}: a proof for another index was ACCEPTED")
        except merkle.ProofError:
            pass
        s = per_op(functools.partial(merkle.verify_inclusion, leaf, index, n, proof, root_n))
        lines.append(f"verify_inclusion(leaf {index:>9,} of {n:,}) {len(proof):2} hashes: {_us(s)}")
    return lines, ok


# -- audit package ------------------------------------------------------------------------------


def demo_package(work: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "client", "--json", "demo", "--workdir", str(work / "demo")],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    if out.returncode != 0:
        raise BenchError(f"pli demo failed: {out.stdout[-1000:]} {out.stderr[-2000:]}")
    return Path(json.loads(out.stdout)["audit_package"])


def read_package(path: Path) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    members = []
    with tarfile.open(path, "r:") as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            members.append((m.name, f.read()))
    if not members or members[0][0] != "audit.json":
        raise BenchError("audit.json is not the package's first member")
    return json.loads(members[0][1]), members[1:]


def write_package(path: Path, doc: dict[str, Any], content: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("audit.json", json.dumps(doc).encode()), *content]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))


def reanchor(doc: dict[str, Any], n: int) -> tuple[dict[str, Any], str, Tree]:
    """The same case in a log of ``n`` entries: the demo's log is its last leaves."""
    receipts = [r for d in doc["devices"] for r in d["receipts"]] + [r for e in doc["envelopes"] for r in e["receipts"]]
    small = max(note.Checkpoint.from_text(c.split("\n\n")[0] + "\n").size for c in doc["checkpoints"])
    leaves = {int(r["index"]): base64.b64decode(r["leaf"]) for r in receipts}
    tail = [merkle.leaf_hash(leaves[i]) if i in leaves else filler(n + i) for i in range(small)]
    shift = n - small
    tree = build(n, tail)
    signer = note.Signer(BENCH_ORIGIN, nacl.signing.SigningKey.generate())
    signed: dict[int, str] = {}

    def checkpoint(size: int) -> str:
        if size not in signed:
            signed[size] = note.sign_checkpoint(note.Checkpoint(BENCH_ORIGIN, size, tree.root(size)), signer)
        return signed[size]

    def b64(h: bytes) -> str:
        return base64.b64encode(h).decode()

    new = dict(doc)
    new["log"] = {"origin": BENCH_ORIGIN, "vkey": signer.verifier.vkey}
    new["checkpoints"] = [checkpoint(shift + note.Checkpoint.from_text(c.split("\n\n")[0] + "\n").size)
                          for c in doc["checkpoints"]]
    new["consistency"] = [
        {"first": shift + c["first"], "second": shift + c["second"],
         "proof": [b64(h) for h in merkle.consistency_proof(shift + c["first"], shift + c["second"], tree.get_hash)]}
        for c in doc["consistency"]
    ]

    def moved(r: dict[str, Any]) -> dict[str, Any]:
        old = note.TlogProof.from_text(r["proof"])
        size = shift + note.Checkpoint.from_text(old.checkpoint.split("\n\n")[0] + "\n").size
        index = shift + int(r["index"])
        proof = note.TlogProof(index=index, proof=tuple(merkle.inclusion_proof(index, size, tree.get_hash)),
                               checkpoint=checkpoint(size))
        return {**r, "index": index, "proof": proof.to_text()}

    new["devices"] = [{**d, "receipts": [moved(r) for r in d["receipts"]]} for d in doc["devices"]]
    new["envelopes"] = [{**e, "receipts": [moved(r) for r in e["receipts"]]} for e in doc["envelopes"]]
    return new, signer.verifier.vkey, tree


def time_package(path: Path, vkey: str | None) -> tuple[float, Any]:
    report = verify_package(path, vkey=vkey)
    if not report.ok:
        raise BenchError(f"{path.name} did not verify: {report.failures}")
    return per_op(functools.partial(verify_package, path, vkey=vkey), min_runs=10, min_time=0.5), report


def bench_package(work: Path, n: int) -> tuple[list[str], bool]:
    t0 = time.perf_counter()
    pkg = demo_package(work)
    print(f"demo case run in {time.perf_counter() - t0:.1f} s; package {pkg.name} ({pkg.stat().st_size:,} bytes)")
    doc, content = read_package(pkg)
    s_small, rep = time_package(pkg, None)
    receipts = sum(len(d["receipts"]) for d in doc["devices"]) + sum(len(e["receipts"]) for e in doc["envelopes"])
    t0 = time.perf_counter()
    big_doc, vkey, _ = reanchor(doc, n)
    big = work / f"big-{pkg.name}"
    write_package(big, big_doc, content)
    print(f"package re-anchored in a log of {n:,} entries in {time.perf_counter() - t0:.1f} s")
    s_big, big_rep = time_package(big, vkey)
    ok = True
    # A damaged package must fail: flip one hash of one receipt's inclusion proof.
    bad_doc = json.loads(json.dumps(big_doc))
    r = bad_doc["envelopes"][0]["receipts"][0]
    lines = r["proof"].split("\n")
    h = bytearray(base64.b64decode(lines[2]))
    h[0] ^= 1
    lines[2] = base64.b64encode(bytes(h)).decode()
    r["proof"] = "\n".join(lines)
    bad = work / "damaged.pliaudit"
    write_package(bad, bad_doc, content)
    if verify_package(bad, vkey=vkey).ok:
        ok = False
        print("a package with a damaged inclusion proof was ACCEPTED")
    size_small = max(int(c.split("\n")[1]) for c in doc["checkpoints"])
    small_line = (f"verify_package, demo case on its own {size_small}-entry log "
                  f"({len(doc['checkpoints'])} checkpoints, {receipts} receipts, {len(rep.timeline)} events): "
                  f"{s_small * 1e3:8.2f} ms")
    big_line = (f"verify_package, same case in a {n:,}-entry log "
                f"({len(big_doc['checkpoints'])} checkpoints, {receipts} receipts, {len(big_rep.timeline)} events): "
                f"{s_big * 1e3:8.2f} ms")
    return [small_line, big_line], ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leaves", type=int, default=1_000_000, help="log size [1,000,000]")
    ap.add_argument("--quick", action="store_true", help="CI: 100,000 leaves")
    args = ap.parse_args(argv)
    n = 100_000 if args.quick else args.leaves
    if n < 2048:
        ap.error("--leaves: at least 2048")
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        tree = build(n)
        built = time.perf_counter() - t0
        print(f"{n:,}-leaf tree built with CompactRange in {built:.1f} s "
              f"({built / n * 1e6:.2f} µs per append, {sum(len(x) for x in tree.levels):,} stored subtrees)")
        proof_lines, ok1 = bench_proofs(tree, n)
        del tree
        with tempfile.TemporaryDirectory(prefix="pli-bench-audit-") as tmp:
            pkg_lines, ok2 = bench_package(Path(tmp), n)
    except (BenchError, PliError, ValueError) as e:
        print(f"FAILED: {e}")
        return 1
    ok = ok1 and ok2
    print(f"RESULT ({'all proofs verified, damaged ones refused' if ok else 'FAILED'}; "
          f"whole run {time.perf_counter() - t_start:.1f} s), per operation:")
    for line in proof_lines + pkg_lines:
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
