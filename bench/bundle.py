"""Encrypting and opening a 1 GiB bundle with Pli, against the `age` tool on the same bytes.

    python bench/bundle.py                # 1 GiB in many files, 3 rounds, median reported
    python bench/bundle.py --size 64M     # a quick run
    python bench/bundle.py --rounds 5 --dir /var/tmp
    python bench/bundle.py --pieces       # only the cost of each piece (CPU seconds per GiB)

Pli's side is its real bundle path, in a child process (so its peak memory is its own):
hash every file for the manifest (client.core._hash_files, two at a time, as `pli send`
does), sign the manifest, then client.core._encrypt_bundle writes the tar through age
encryption to a file and fsyncs it; opening is client.core._decrypt_bundle: decrypt,
check the ciphertext's hash against the signed header, verify the manifest signature and
every file's SHA-256, and write the files into a case folder.

age's side is `age -r age1... -o out in` and `age -d -i key -o out in` on one file holding
the same plaintext bytes (the files concatenated), on the same disk. Every input is in the
page cache before each timed step, and dirty pages are synced (untimed) between steps.
Each tool's previous output is deleted just before it runs (what `age -o` does to an
existing file by truncating it), so both write into memory the kernel has just freed: on
this VM, memory left free for a couple of seconds is handed back to the hypervisor (free
page reporting), and the first write into it costs about 2 CPU seconds per GiB more.

Each round first measures how many cores the machine really gives (two processes hashing
at once, against one alone): other virtual machines on the host take their share.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import ROOT, mb_per_s, median, parse_size, peak_rss_mib
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

from client.core import _decrypt_bundle, _encrypt_bundle, _hash_files
from client.home import Home
from protocol import age
from protocol.bundle import Manifest, Sender, bundle_layout, padme, sign_manifest
from protocol.envelope import EnvelopeHeader, SignedHeader, seal_header, split_prefix
from protocol.keys import DeviceKeys
from tools.case_samples import request_body

SENDER = DeviceKeys(sign_seed=b"\x11" * 32, enc_secret=b"\x22" * 32, created=1_767_225_600)
RECIPIENT = DeviceKeys(sign_seed=b"\x33" * 32, enc_secret=b"\x44" * 32, created=1_767_225_600)
ENVELOPE_ID = bytes(range(16))
CASE_ID = bytes(range(16, 32))
MAX_FILE = 48 << 20
BLOCK = 4 << 20


# -- the data --------------------------------------------------------------------------


def file_sizes(total: int) -> list[int]:
    """Many files of mixed sizes (a few small, most 1-48 MiB), summing to ``total``."""
    rng = random.Random(1)
    sizes = [min(total, n) for n in (17, 4096, 150_000)]
    left = total - sum(sizes)
    while left > 0:
        n = min(left, rng.randint(1 << 20, MAX_FILE))
        sizes.append(n)
        left -= n
    return [s for s in sizes if s] if sum(sizes) == total else [total]


def make_data(work: Path, total: int) -> list[Path]:
    """Write the files for Pli, and their concatenation for age (same bytes)."""
    files_dir = work / "in"
    files_dir.mkdir()
    paths: list[Path] = []
    with (work / "plain.bin").open("wb") as whole:
        for i, size in enumerate(file_sizes(total)):
            path = files_dir / f"scan-{i:03d}.dcm"
            with path.open("wb") as f:
                left = size
                while left:
                    block = os.urandom(min(left, BLOCK))
                    f.write(block)
                    whole.write(block)
                    left -= len(block)
            paths.append(path)
    return paths


def warm(*paths: Path) -> None:
    """Read files so both tools start from the page cache."""
    buf = bytearray(BLOCK)
    for p in paths:
        with p.open("rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def settle() -> None:
    os.sync()  # write back the previous step's output outside any timed step


# -- Pli's side (child process) --------------------------------------------------------


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return ru.ru_utime + ru.ru_stime


def worker_encrypt(work: Path) -> dict[str, float]:
    paths = sorted((work / "in").iterdir())
    (work / "pli.age").unlink(missing_ok=True)  # the previous round's, as `age -o` truncates it
    cpu0 = _cpu()
    t0 = time.perf_counter()
    hashed = _hash_files(paths)  # as `pli send` does: two files at a time
    entries = [h.entry for h in hashed]
    t_hash = time.perf_counter() - t0
    pub = SENDER.public()
    manifest = Manifest(
        kind="request", case_id=CASE_ID, envelope_id=ENVELOPE_ID, created=int(time.time()),
        sender=Sender(sign_key=pub.sign_key, enc_key=pub.enc_key, rpps="10000005479", name="Dr Bench"),
        recipients=(RECIPIENT.device_id,), files=tuple(entries),
        body=request_body(motif="bench", question="1 GiB of imaging"),
    )
    raw, sig = sign_manifest(manifest, SENDER.signing_key)
    recipients = [RECIPIENT.public().recipient, pub.recipient]
    size, digest = _encrypt_bundle(work / "pli.age", recipients, raw, sig, hashed)
    seconds = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    now = int(time.time())
    header = EnvelopeHeader(
        id=ENVELOPE_ID, sender=SENDER.device_id, to=(RECIPIENT.device_id,), created=now,
        expires=now + 86400, size=size, sha256=digest,
    )
    (work / "pli.prefix").write_bytes(seal_header(header, SENDER.signing_key).prefix)
    padded = bundle_layout(raw, sig, entries).size  # the plaintext: tar and Padmé padding
    return {"seconds": seconds, "cpu": cpu, "hash_seconds": t_hash, "peak_mib": peak_rss_mib(), "size": size,
            "padded": padded}


def worker_decrypt(work: Path) -> dict[str, float]:
    split = split_prefix((work / "pli.prefix").read_bytes())
    assert split is not None
    signed: SignedHeader = split[0]
    sender = SENDER.public()
    header = signed.verify(sender.verify_key)
    shutil.rmtree(work / "home", ignore_errors=True)  # the previous round's
    home = Home(work / "home")
    cpu0 = _cpu()
    t0 = time.perf_counter()
    opened = _decrypt_bundle(home, RECIPIENT, signed, header, sender, work / "pli.age")
    seconds = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    n = sum(f.size for f in opened.manifest.files)
    return {"seconds": seconds, "cpu": cpu, "peak_mib": peak_rss_mib(), "plaintext": n}


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_worker(mode: str, work: Path) -> dict[str, float]:
    """Run Pli's side in a child; its figures cover the timed work only (not start-up)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", mode, str(work)], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        sys.exit(f"Pli {mode} failed:\n{proc.stderr}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- age's side ------------------------------------------------------------------------


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one command."""
    cpu = _child_cpu()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0, _child_cpu() - cpu


def fsync_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


# -- driver ------------------------------------------------------------------------------


_PROBE = ("import hashlib,time;b=bytes(1<<20);h=hashlib.sha256();t=time.perf_counter()\n"
          "for _ in range(384): h.update(b)\nprint(time.perf_counter()-t)")


def probe_cores() -> float:
    """Cores the machine gives now: 2.0 when two processes hash as fast as one alone."""

    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    alone = min(run(1), run(1))
    return 2 * alone / run(2)


def one_round(work: Path, paths: list[Path], age_bin: str, recipient: str) -> dict[str, float]:
    """Each tool both ways, inputs warm, output synced away between steps, and each tool's
    previous output deleted just before it runs."""
    row: dict[str, float] = {"cores": probe_cores()}
    warm(work / "plain.bin")
    (work / "age.age").unlink(missing_ok=True)
    row["age_enc"], row["age_enc_cpu"] = timed([age_bin, "-r", recipient, "-o", str(work / "age.age"),
                                                str(work / "plain.bin")])
    row["age_sync"] = fsync_seconds(work / "age.age")
    settle()
    warm(work / "age.age")
    (work / "age.out").unlink(missing_ok=True)
    row["age_dec"], row["age_dec_cpu"] = timed([age_bin, "-d", "-i", str(work / "age.key"), "-o",
                                                str(work / "age.out"), str(work / "age.age")])
    settle()
    warm(*paths)
    enc = run_worker("encrypt", work)  # it deletes its previous output itself, just before starting
    settle()
    warm(work / "pli.age")
    dec = run_worker("decrypt", work)
    if dec["plaintext"] != sum(p.stat().st_size for p in paths):
        sys.exit("Pli opened another number of bytes than it sent")
    settle()
    row.update(pli_enc=enc["seconds"], pli_enc_cpu=enc["cpu"], pli_hash=enc["hash_seconds"],
               pli_dec=dec["seconds"], pli_dec_cpu=dec["cpu"], peak=max(enc["peak_mib"], dec["peak_mib"]),
               padded=enc["padded"])
    return row


# -- the pieces ------------------------------------------------------------------------------


def _cpu_per_gib(nbytes: int, times: int, step: Callable[[], object]) -> float:
    """CPU seconds (this process, one thread) per GiB for ``step`` done ``times`` over ``nbytes``."""
    t0 = time.process_time()
    for _ in range(times):
        step()
    return (time.process_time() - t0) * (1 << 30) / nbytes


def pieces(work: Path, sample: int = 256 << 20) -> dict[str, float]:
    """What each piece of the work costs here, alone on one core, in CPU seconds per GiB."""
    block = os.urandom(16 * age.CHUNK_SIZE)
    n = sample // len(block)
    out = bytearray(age.sealed_size(len(block)))
    cost: dict[str, float] = {}
    h = hashlib.sha256()
    cost["SHA-256 (hashlib, OpenSSL)"] = _cpu_per_gib(sample, n, lambda: h.update(block))
    _, sealer = age.start_encryption([age.X25519Identity.generate().recipient])
    cost["ChaCha20-Poly1305 (cryptography, OpenSSL)"] = _cpu_per_gib(
        sample, n, lambda: sealer.seal_into(block, out, final=False))
    chunks = [block[i : i + age.CHUNK_SIZE] for i in range(0, len(block), age.CHUNK_SIZE)]
    key, nonce = os.urandom(32), bytes(12)
    cost["ChaCha20-Poly1305 (PyNaCl, libsodium; not used)"] = _cpu_per_gib(
        sample, n, lambda: [crypto_aead_chacha20poly1305_ietf_encrypt(c, None, nonce, key) for c in chunks])
    buf = bytearray(len(block))
    warm(work / "plain.bin")
    with (work / "plain.bin").open("rb", buffering=0) as f:
        cost["read, from the page cache"] = _cpu_per_gib(sample, n, lambda: f.readinto(buf))
    target = work / "pieces.bin"
    for _ in range(2):  # the second time, into the pages the first one's deletion freed
        with target.open("wb", buffering=0) as f:
            cost["write, into the page cache"] = _cpu_per_gib(sample, n, lambda: f.write(block))
        target.unlink()
    return cost


def report_pieces(cost: dict[str, float], files: int, padded: int) -> None:
    sha, aead, rd, wr = (cost["SHA-256 (hashlib, OpenSSL)"], cost["ChaCha20-Poly1305 (cryptography, OpenSSL)"],
                         cost["read, from the page cache"], cost["write, into the page cache"])
    print("cost of each piece, alone on one core (CPU seconds per GiB):")
    for name, value in cost.items():
        print(f"  {name:48s} {value:5.2f}")
    p = padded / files
    enc = (rd + sha) + p * (rd + aead + sha + wr)
    dec = p * (rd + sha + aead) + (sha + wr)
    print(f"Pli's least work per GiB of files (the bundle is {p:.3f}x the files with tar and Padmé padding):\n"
          f"  encrypt: read + SHA-256 (manifest), then read + seal + SHA-256 (ciphertext) + write = {enc:.2f}\n"
          f"  decrypt: read + SHA-256 (ciphertext) + open, then SHA-256 (each file) + write = {dec:.2f}")


def report(rows: list[dict[str, float]], total: int, n_files: int) -> None:
    m = {k: median([r[k] for r in rows]) for k in rows[0]}
    pli_enc, pli_dec = mb_per_s(total, m["pli_enc"]), mb_per_s(total, m["pli_dec"])
    age_enc, age_dec = mb_per_s(total, m["age_enc"]), mb_per_s(total, m["age_dec"])
    age_enc_sync = mb_per_s(total, m["age_enc"] + m["age_sync"])
    gib = total / (1 << 30)
    print(f"median of {len(rows)} rounds, {total / (1 << 20):.0f} MiB in {n_files} files, "
          f"{m['cores']:.2f} cores available (probe; 2.00 = both cores free; rounds: "
          f"{', '.join(format(r['cores'], '.2f') for r in rows)})")
    print(f"CPU seconds per GiB, all threads: Pli enc {m['pli_enc_cpu'] / gib:.2f} dec {m['pli_dec_cpu'] / gib:.2f} "
          f"(the timed work, without the interpreter's start-up), "
          f"age enc {m['age_enc_cpu'] / gib:.2f} dec {m['age_dec_cpu'] / gib:.2f} (the whole process)")
    print(f"encrypt  Pli {pli_enc:5.0f} MB/s (manifest hashing {m['pli_hash']:.2f} s and fsync included)"
          f"   age {age_enc:5.0f} MB/s (age + fsync {age_enc_sync:.0f} MB/s)")
    print(f"decrypt  Pli {pli_dec:5.0f} MB/s (hash checks included)   age {age_dec:5.0f} MB/s")
    print(f"ratio Pli/age: encrypt {pli_enc / age_enc:.2f} (vs age + fsync {pli_enc / age_enc_sync:.2f}), "
          f"decrypt {pli_dec / age_dec:.2f}")
    print(f"Pli peak memory: {max(r['peak'] for r in rows):.1f} MiB (VmHWM of the child process doing Pli's work)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G", help="total plaintext, e.g. 64M, 1G (default 1G)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    p.add_argument("--dir", default=None, help="where to put the temporary files (default: the system temp dir)")
    p.add_argument("--age", default=shutil.which("age") or "/usr/bin/age", help="the age binary")
    p.add_argument("--pieces", action="store_true", help="only measure what each piece of the work costs")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        mode, work = args.worker
        fn = {"encrypt": worker_encrypt, "decrypt": worker_decrypt}[mode]
        print(json.dumps(fn(Path(work))))
        return

    total = parse_size(args.size)
    base = Path(args.dir or tempfile.gettempdir())
    if str(base.resolve()).startswith("/dev/shm"):
        sys.exit("use a folder on disk, not /dev/shm")
    work = Path(tempfile.mkdtemp(prefix="pli-bench-bundle-", dir=base))
    if args.pieces:  # a fresh process: no allocator state left over from a run
        try:
            sample = min(total, 256 << 20)
            make_data(work, sample)
            tar = total + 1024 * (len(file_sizes(total)) + 3)  # about the tar's size: a header per member
            report_pieces(pieces(work, sample), total, padme(tar))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        t0 = time.perf_counter()
        paths = make_data(work, total)
        identity = age.X25519Identity.generate()
        (work / "age.key").write_text(identity.to_string() + "\n")
        settle()
        print(f"{len(paths)} files, {total:,} bytes in {work} (made in {time.perf_counter() - t0:.1f} s)")
        rows = []
        for r in range(args.rounds):
            row = one_round(work, paths, args.age, identity.recipient.to_string())
            rows.append(row)
            print(
                f"round {r + 1} ({row['cores']:.2f} cores): age enc {row['age_enc']:.2f} s "
                f"(+fsync {row['age_sync']:.2f} s; CPU {row['age_enc_cpu']:.2f} s), "
                f"dec {row['age_dec']:.2f} s (CPU {row['age_dec_cpu']:.2f} s) | Pli enc {row['pli_enc']:.2f} s "
                f"(hashing {row['pli_hash']:.2f} s; CPU {row['pli_enc_cpu']:.2f} s), dec {row['pli_dec']:.2f} s "
                f"(CPU {row['pli_dec_cpu']:.2f} s) | Pli peak {row['peak']:.0f} MiB"
            )
        report(rows, total, len(paths))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    subprocess.run([sys.executable, __file__, "--pieces", "--size", str(total), "--dir", str(base)], check=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
