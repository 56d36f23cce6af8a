"""Crash safety: SIGKILL the relay at random moments under load, restart it, check nothing promised was lost.

    python bench/crashloop.py --kills 200              # the long variant (about 10 minutes on 2 cores)
    python bench/crashloop.py --kills 20 --seed 42     # replay a run's choices (its seed is printed)
    python bench/crashloop.py --kills 50 --exhaustive  # every receipt and checkpoint through the relay's
                                                       # proof endpoints after every restart (slower)

The relay runs as its own process (``python -m relay serve --data DIR --listen
127.0.0.1:0``), two devices enrolled through ``pli-relay invite`` and ``POST
/v1/enroll``. Each round, several concurrent clients submit small signed envelopes (one
PUT, or a PUT of the prefix and the first bytes then a PATCH of the rest), and after a
random delay the relay is killed with SIGKILL — mid-request, mid-fsync, mid-batch, as
the moment falls. Now and then it is instead killed while it starts (during its
recovery pass). It is restarted on the same data folder every time.

The harness keeps every receipt the relay issued (the answer's leaf, index and
tlog-proof, verified when received) and every checkpoint it saw. Between a kill and the
restart it reads the database read-only (``sqlite3``, ``mode=ro``) and the blob folder:

- the log's leaf indices are contiguous and end at the last signed checkpoint's size,
  every checkpoint seen is stored with the root seen (one root per size);
- every envelope with an issued receipt is in state ``stored`` and its blob holds
  exactly the bytes uploaded; every stored envelope has exactly one *submitted* leaf and
  no upload in progress has one; a partial upload's file holds what its row says;
- files no row owns (a blob under ``blobs/??/`` whose row is not ``stored``, a part in
  ``blobs/incoming/`` whose row is not ``uploading``) are noted: the restarted relay's
  recovery pass must remove exactly those and log them (``startup_recovery``).

After each restart, through HTTP: the checkpoint verifies with ``/log/vkey`` and is not
older than any seen; the whole log (``/log/entries``) hashes to it, and each prefix of it
to every checkpoint ever seen (so each is consistent with the new one), and the relay's
``/log/consistency`` proofs verify for every checkpoint seen since the last restart plus a
random sample of older ones; every receipt's leaf is at its index, and ``/log/inclusion``
proves the receipts issued since the last restart plus a sample; each envelope id has at
most one *submitted* leaf; every receipted envelope is listed in its recipient's inbox, and
the new ones (plus a sample) answer ``complete`` to ``/status`` and return exactly their
bytes to the recipient. Submissions that got no answer may or may not exist: the harness
retries about half (the retry must return the first leaf, never a second) and asks the
status of the rest, which, if they exist, must be complete and consistent or an upload in
progress without a leaf. The last round checks everything through HTTP (as
``--exhaustive``), stops the relay with SIGTERM and requires no orphan file at all.

Exit status 0 when every check passed; otherwise the first failed check and the seed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import UNLIMITED  # noqa: E402 - the load is a few devices at full speed
from client.api import RelayClient  # noqa: E402
from protocol import httpsig, merkle, note  # noqa: E402
from protocol.envelope import EnvelopeHeader, seal_header  # noqa: E402
from protocol.keys import DeviceKeys  # noqa: E402
from protocol.logentry import EntryType, LogEntry  # noqa: E402
from relay.routes import INLINE_MAX  # noqa: E402

__all__ = ["CrashLoop", "CrashLoopError", "Stats", "main", "run"]

ENVELOPE_TYPE = "application/vnd.pli.envelope"
DEVICES = (("10000005479", "Dr Claire Martin"), ("10000012343", "Dr Karim Benali"))
SAMPLE = 12  # older receipts / checkpoints re-proved through HTTP after each restart


class CrashLoopError(AssertionError):
    """A crash-safety check failed: the message says which, and on what."""


def _check(ok: object, message: str) -> None:
    if not ok:
        raise CrashLoopError(message)


@dataclass
class Submission:
    eid: bytes
    sender: int  # index into CrashLoop.keys
    recipient: int
    prefix: bytes
    ciphertext: bytes
    envelope_hash: bytes
    cut: int | None  # two-step upload: the PUT carries this many ciphertext bytes, a PATCH the rest
    answered: bool = False  # the relay answered the last request of the upload
    receipt: tuple[int, bytes] | None = None  # (index, leaf) of its submitted leaf, once a receipt was issued
    round: int = 0  # the round in which the receipt was received
    absent: bool = False  # unanswered, and the relay said later it never had it

    @property
    def blob(self) -> bytes:
        return self.prefix + self.ciphertext


@dataclass
class Stats:
    kills: int = 0
    startup_kills: int = 0
    submissions: int = 0
    receipts: int = 0
    unanswered: int = 0
    resumed: int = 0
    restarted: int = 0  # resumed uploads the relay sent back to offset 0 (their part file was gone)
    adopted: int = 0  # unanswered, found complete afterwards (receipt taken from /status)
    absent: int = 0
    in_progress: int = 0
    checkpoints: int = 0
    inclusion_proofs: int = 0
    consistency_proofs: int = 0
    fetched: int = 0
    swept: int = 0
    leaves: int = 0
    receipt_checks: int = 0  # receipts checked against the log, summed over restarts
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.kills} kills ({self.startup_kills} during startup), {self.submissions} submissions, "
            f"{self.receipts} receipts ({self.adopted} found after an unanswered request, {self.resumed} resumed, "
            f"{self.restarted} of them from 0), "
            f"{self.unanswered} unanswered ({self.absent} absent, {self.in_progress} left in progress), "
            f"{self.leaves} leaves, {self.checkpoints} checkpoints, {self.receipt_checks} receipt checks, "
            f"{self.inclusion_proofs} inclusion and {self.consistency_proofs} consistency proofs over HTTP, "
            f"{self.fetched} downloads, {self.swept} orphan files swept, {self.seconds:.1f} s"
        )


class Relay:
    """``python -m relay serve`` as a child process; its log (JSON lines) in a file per start."""

    def __init__(self, data: Path, logs: Path) -> None:
        self.data = data
        self.logs = logs
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self.log_path = logs / "relay-0.log"
        self.url = ""

    def spawn(self) -> subprocess.Popen[str]:
        self.starts += 1
        self.log_path = self.logs / f"relay-{self.starts}.log"
        with self.log_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--data", str(self.data), "--listen", "127.0.0.1:0"],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                env={**os.environ, **UNLIMITED, "PLI_RELAY_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)},
            )
        return self.proc

    def start(self) -> str:
        proc = self.spawn()
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # readiness: the first line is the URL
        if not line.startswith("http://"):
            proc.kill()
            proc.wait()
            raise CrashLoopError(f"the relay did not start:\n{self.log_path.read_text()[-3000:]}")
        self.url = line
        return line

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._close()

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise CrashLoopError("the relay did not stop within 30 s of SIGTERM") from None
        self._close()
        _check(rc == 0, f"the relay exited with status {rc} on SIGTERM:\n{self.log_path.read_text()[-3000:]}")

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == name:
                    out.append(record)
        return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class CrashLoop:
    def __init__(self, workdir: Path, *, seed: int, clients: int = 6, burst: tuple[float, float] = (0.2, 0.6),
                 startup_kill_rate: float = 0.1, exhaustive: bool = False, verbose: bool = False) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.data = workdir / "relay"
        workdir.mkdir(parents=True, exist_ok=True)
        self.relay = Relay(self.data, workdir)
        self.clients = clients
        self.burst = burst
        self.startup_kill_rate = startup_kill_rate
        self.exhaustive = exhaustive
        self.verbose = verbose
        self.keys: list[DeviceKeys] = []
        self.verifier: note.Verifier | None = None
        self.vkey = ""
        self.subs: dict[bytes, Submission] = {}
        self.seen: dict[int, bytes] = {}  # every checkpoint seen: size -> root
        self.seen_notes: dict[int, str] = {}
        self.new_sizes: set[int] = set()  # seen since the last check
        self.head = 0  # size of the checkpoint of the last check
        self.round = 0
        self._submitted: Counter[bytes] = Counter()  # submitted leaves per envelope id, as of the last check
        self.stats = Stats()

    # -- the loop ---------------------------------------------------------------------

    async def run(self, kills: int) -> Stats:
        started = time.perf_counter()
        self.relay.start()
        await self._enrol()
        self._say(f"relay at {self.relay.url}, data in {self.data}")
        try:
            load_kills = 0
            while load_kills < kills:
                self.round += 1
                await self._burst_and_kill()
                load_kills += 1
                orphans = self._offline_check(final=False)
                while self.rng.random() < self.startup_kill_rate:
                    await self._startup_kill()
                    orphans = self._offline_check(final=False)
                t0 = time.perf_counter()
                self.relay.start()
                t1 = time.perf_counter()
                self._check_sweep(orphans)
                await self._after_restart(final=load_kills == kills)
                self.stats.seconds = time.perf_counter() - started
                self._say(f"round {self.round} (restart {t1 - t0:.2f} s, checks {time.perf_counter() - t1:.2f} s): "
                          f"{self.stats.line()}")
            self.relay.stop()
            left = self._offline_check(final=True)
            _check(not left, f"files no row owns after a clean stop: {sorted(left)}")
        except BaseException:
            if self.relay.proc is not None:
                self.relay.kill()
            raise
        self.stats.seconds = time.perf_counter() - started
        return self.stats

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    async def _enrol(self) -> None:
        for rpps, name in DEVICES:
            out = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "relay", "invite", "--data", str(self.data), "--rpps", rpps, "--name", name,
                 "--profession", "médecin", "--json"],
                capture_output=True, text=True, check=True, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            keys = DeviceKeys.generate(now=int(time.time()))
            async with RelayClient(self.relay.url) as r:
                answer = await r.enroll(json.loads(out.stdout)["code"], keys.public().to_record())
            self.keys.append(keys)
            if not self.vkey:
                self.vkey = answer["log_vkey"]
                self.verifier = note.Verifier.from_vkey(self.vkey)
                _check(self.verifier.name == answer["log_origin"], "the log's origin is not its key's name")
            _check(answer["log_vkey"] == self.vkey, "the log key changed between two enrolments")

    async def _startup_kill(self) -> None:
        """Kill the relay while it starts: during its recovery pass, or just after."""
        proc = self.relay.spawn()
        await asyncio.sleep(self.rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        self.relay._close()  # noqa: SLF001
        self.stats.kills += 1
        self.stats.startup_kills += 1

    # -- load --------------------------------------------------------------------------

    def _new_submission(self) -> Submission:
        sender = self.rng.randrange(2)
        recipient = 1 - sender
        # Mostly small envelopes (kept in their row), some over INLINE_MAX (in the blob folder).
        roll = self.rng.random()
        size = 0 if roll < 0.03 else self.rng.randint(1, 3000) if roll < 0.8 else \
            self.rng.randint(INLINE_MAX + 1, INLINE_MAX + 4096)
        ciphertext = self.rng.randbytes(size)
        eid = self.rng.randbytes(16)
        now = int(time.time())
        header = EnvelopeHeader(id=eid, sender=self.keys[sender].device_id, to=(self.keys[recipient].device_id,),
                                created=now, expires=now + 86400, size=size,
                                sha256=hashlib.sha256(ciphertext).digest())
        signed = seal_header(header, self.keys[sender].signing_key)
        cut = self.rng.randrange(size) if size and self.rng.random() < 0.3 else None
        sub = Submission(eid, sender, recipient, signed.prefix, ciphertext, signed.envelope_hash, cut)
        self.subs[eid] = sub
        self.stats.submissions += 1
        return sub

    async def _request(self, session: aiohttp.ClientSession, device: int | None, method: str, path: str, *,
                       body: bytes = b"", content_type: str | None = None,
                       query: dict[str, str] | None = None) -> tuple[int, bytes]:
        url = URL(self.relay.url).with_path(path)
        if query:
            url = url.with_query(query)
        headers: dict[str, str] = {}
        if device is not None:
            keys = self.keys[device]
            headers = httpsig.sign_request(
                method=method, authority=httpsig.authority(url.host or "", url.port, url.scheme),
                path=url.raw_path, query=url.raw_query_string,
                content_digest=httpsig.content_digest(hashlib.sha256(body).digest()),
                signing_key=keys.signing_key, keyid=keys.device_id.hex(), created=int(time.time()),
                nonce=httpsig.encode_nonce(os.urandom(16)),
            )
        if content_type:
            headers["Content-Type"] = content_type
        async with session.request(method, url, data=body or None, headers=headers) as resp:
            return resp.status, await resp.read()

    async def _upload(self, session: aiohttp.ClientSession, sub: Submission, *, resume: bool) -> None:
        """Submit (or, after a crash, resume) one envelope; record its receipt.

        Raises aiohttp.ClientError when the relay dies under it.
        """
        path = f"/v1/envelopes/{sub.eid.hex()}"
        first = sub.ciphertext if resume or sub.cut is None else sub.ciphertext[: sub.cut]
        status, body = await self._request(session, sub.sender, "PUT", path, body=sub.prefix + first,
                                           content_type=ENVELOPE_TYPE)
        answer = json.loads(body)
        if status == 409 and resume and answer.get("code") == "offset_mismatch":
            # The relay lost the part file's bytes (or never fsynced them): resume where it says.
            offset = int(answer["offset"])
            self.stats.restarted += 1
            status, body = await self._request(session, sub.sender, "PATCH", path, body=sub.ciphertext[offset:],
                                               content_type="application/octet-stream",
                                               query={"offset": str(offset)})
            answer = json.loads(body)
        elif status == 200 and not answer["complete"] and not resume:
            _check(answer["offset"] == len(first), f"PUT of {sub.eid.hex()}: offset {answer['offset']} "
                   f"after {len(first)} bytes")
            status, body = await self._request(session, sub.sender, "PATCH", path, body=sub.ciphertext[len(first):],
                                               content_type="application/octet-stream",
                                               query={"offset": str(len(first))})
            answer = json.loads(body)
        _check(status in {200, 201} and answer.get("complete") is True and answer.get("receipt"),
               f"upload of {sub.eid.hex()} (resume={resume}) answered {status}: {body[:500]!r}")
        sub.answered = True
        self._take_receipt(sub, answer["receipt"])

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while True:
            sub = self._new_submission()
            try:
                await self._upload(session, sub, resume=False)
            except (TimeoutError, aiohttp.ClientError, ConnectionError, json.JSONDecodeError):
                # The relay died under this request (json: a body cut short). It may or may not exist.
                self.stats.unanswered += 1
                return

    async def _burst_and_kill(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            workers = [asyncio.create_task(self._worker(session)) for _ in range(self.clients)]
            # The one sleep that is not synchronisation: it chooses the moment of the crash.
            await asyncio.sleep(self.rng.uniform(*self.burst))
            for w in workers:
                if w.done() and w.exception() is not None:
                    raise CrashLoopError(f"a client failed under load (before the kill): {w.exception()!r}")
            self.relay.kill()
            self.stats.kills += 1
            await asyncio.gather(*workers)

    # -- receipts and checkpoints -------------------------------------------------------

    def _see_checkpoint(self, text: str) -> note.Checkpoint:
        assert self.verifier is not None
        cp = note.open_checkpoint(text, self.verifier, origin=self.verifier.name)
        known = self.seen.get(cp.size)
        _check(known is None or known == cp.root_hash, f"fork: two roots signed for tree size {cp.size}")
        if known is None:
            self.seen[cp.size] = cp.root_hash
            self.seen_notes[cp.size] = text
            self.new_sizes.add(cp.size)
            self.stats.checkpoints += 1
        return cp

    def _take_receipt(self, sub: Submission, receipt: dict[str, Any]) -> None:
        assert self.verifier is not None
        leaf = base64.b64decode(receipt["leaf"], validate=True)
        index = receipt["index"]
        entry = LogEntry.from_bytes(leaf)
        _check(receipt["type"] == "submitted" and entry.type == EntryType.SUBMITTED,
               f"receipt of {sub.eid.hex()} is not a submitted receipt")
        _check(entry.envelope_id == sub.eid and entry.envelope_hash == sub.envelope_hash
               and entry.device_id == self.keys[sub.sender].device_id,
               f"receipt of {sub.eid.hex()} names another envelope or device")
        proof = note.TlogProof.from_text(receipt["proof"])
        _check(proof.index == index, f"receipt of {sub.eid.hex()}: index {index} but its proof says {proof.index}")
        proof.verify(merkle.leaf_hash(leaf), self.verifier, origin=self.verifier.name)
        self._see_checkpoint(proof.checkpoint)
        if sub.receipt is not None:
            _check(sub.receipt == (index, leaf),
                   f"envelope {sub.eid.hex()} got a second receipt: leaf {index}, first leaf {sub.receipt[0]}")
            return
        sub.receipt = (index, leaf)
        sub.round = self.round
        self.stats.receipts += 1

    # -- between a kill and a restart: the files themselves ------------------------------

    def _offline_check(self, *, final: bool) -> set[str]:
        """Check the database and the blob folder of the stopped relay; return the files no row owns."""
        _check(self.relay.proc is None, "offline check while the relay runs")
        db = sqlite3.connect(f"file:{self.data / 'relay.sqlite3'}?mode=ro", uri=True)
        try:
            leaves = db.execute("SELECT idx, data, envelope_id, type FROM log_leaves ORDER BY idx").fetchall()
            checkpoints = dict(db.execute("SELECT size, root FROM log_checkpoints").fetchall())
            rows = db.execute("SELECT id, state, prefix, size, received, inline FROM envelopes").fetchall()
        finally:
            db.close()
        submitted = self._check_stored_log(leaves, checkpoints)
        orphans = self._check_rows_and_files(rows, submitted)
        blobs = self.data / "blobs"
        return {p.name for p in orphans} if not final else {str(p.relative_to(blobs)) for p in orphans}

    def _check_stored_log(self, leaves: list[Any], checkpoints: dict[int, bytes]) -> Counter[bytes]:
        """The stored leaves and checkpoints agree with each other and with every checkpoint seen."""
        n = len(leaves)
        _check([r[0] for r in leaves] == list(range(n)), "log leaf indices are not contiguous from 0")
        _check(max(checkpoints) == n, f"{n} leaves but the last signed checkpoint is of size {max(checkpoints)}")
        for size, root in self.seen.items():
            _check(checkpoints.get(size) == root, f"checkpoint of size {size} seen but not stored with its root")
        rng = merkle.CompactRange()
        for i, (_, data, _, _) in enumerate(leaves):
            rng.append(merkle.leaf_hash(bytes(data)))
            if i + 1 in checkpoints:
                _check(checkpoints[i + 1] == rng.root(), f"stored checkpoint {i + 1} is not the stored leaves' root")
        submitted = Counter(bytes(eid) for _, _, eid, kind in leaves if kind == EntryType.SUBMITTED)
        dup = [e.hex() for e, c in submitted.items() if c > 1]
        _check(not dup, f"envelopes with more than one submitted leaf: {dup[:5]}")
        for sub in self.subs.values():
            if sub.receipt is not None:
                idx, leaf = sub.receipt
                _check(idx < n and bytes(leaves[idx][1]) == leaf, f"receipted leaf {idx} is not in the database")
        self.stats.leaves = n
        return submitted

    def _check_rows_and_files(self, rows: list[Any], submitted: Counter[bytes]) -> set[Path]:
        """Envelope rows against what was sent and the blob folder; returns the files no row owns."""
        state = {bytes(r[0]): r for r in rows}
        for eid, sub in self.subs.items():
            if sub.receipt is not None:
                _check(eid in state and state[eid][1] == "stored",
                       f"receipted envelope {eid.hex()} is {state[eid][1] if eid in state else 'missing'}")
            if sub.absent:
                _check(eid not in state, f"envelope {eid.hex()} said absent after a restart now exists")
        blobs = self.data / "blobs"
        owned: set[Path] = set()
        for eid, (_, st, prefix, size, received, inline) in state.items():
            sub = self.subs.get(eid)
            _check(sub is not None, f"an envelope nobody sent: {eid.hex()}")
            assert sub is not None
            _check(bytes(prefix) == sub.prefix and size == len(sub.ciphertext), f"row {eid.hex()} is not what was sent")
            blob = blobs / eid.hex()[:2] / eid.hex()
            part = blobs / "incoming" / (eid.hex() + ".part")
            if st == "stored" and inline is not None:  # a small envelope, kept in its row
                _check(submitted[eid] == 1, f"stored envelope {eid.hex()} has {submitted[eid]} submitted leaves")
                _check(bytes(prefix) + bytes(inline) == sub.blob, f"stored envelope {eid.hex()}: row differs")
            elif st == "stored":
                _check(submitted[eid] == 1, f"stored envelope {eid.hex()} has {submitted[eid]} submitted leaves")
                _check(blob.is_file() and blob.read_bytes() == sub.blob,
                       f"stored envelope {eid.hex()}: blob {'differs' if blob.is_file() else 'missing'}")
                owned.add(blob)
            else:
                _check(st == "uploading" and inline is None, f"envelope {eid.hex()} in state {st}")
                _check(submitted[eid] == 0, f"upload in progress {eid.hex()} has a submitted leaf")
                _check(received < size, f"upload in progress {eid.hex()} holds all its {size} bytes")
                if part.is_file():
                    data = part.read_bytes()
                    have = len(data) - len(sub.prefix)
                    _check(data.startswith(sub.prefix) and received <= have <= size
                           and data[len(sub.prefix):] == sub.ciphertext[:have],
                           f"part file of {eid.hex()} does not hold the {received} bytes its row says")
                    owned.add(part)
        for eid in submitted:
            _check(eid in state, f"submitted leaf for {eid.hex()} without its envelope row")
        files = {p for p in blobs.glob("*/*") if p.is_file()}
        orphans = files - owned
        stray = [p for p in blobs.iterdir() if p.is_file()]
        _check(not stray, f"files at the top of blobs/: {stray}")
        return orphans

    def _check_sweep(self, orphans: set[str]) -> None:
        """The restarted relay's recovery pass removed exactly the orphans, and said so."""
        records = self.relay.events("startup_recovery")
        if not orphans:
            _check(not records, f"recovery removed files although none was orphaned: {records}")
            return
        _check(len(records) == 1, f"recovery did not log removing {sorted(orphans)}")
        record = records[0]
        _check(record.get("removed_orphan_blobs") == len(orphans),
               f"recovery logged {record.get('removed_orphan_blobs')} files removed, {len(orphans)} were orphaned")
        if "files" in record:
            _check(set(record["files"]) == orphans, f"recovery logged {record['files']}, expected {sorted(orphans)}")
        left = [p for p in (self.data / "blobs").glob("*/*") if p.name in orphans]
        _check(not left, f"orphan files still there after recovery: {left}")
        self.stats.swept += len(orphans)

    # -- after a restart: through HTTP ---------------------------------------------------

    async def _after_restart(self, *, final: bool) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await self._resume(session, final=final)
            await self._check_log(session, every=final or self.exhaustive)
            await self._check_envelopes(session, every=final or self.exhaustive)

    async def _resume(self, session: aiohttp.ClientSession, *, final: bool) -> None:
        """Retry about half the unanswered submissions (all in the last round)."""
        pending = [s for s in self.subs.values() if not s.answered and s.receipt is None and not s.absent]
        chosen = [s for s in pending if final or self.rng.random() < 0.5]
        for sub in chosen:
            had = sub.receipt
            await self._upload(session, sub, resume=True)
            if had is None:
                self.stats.resumed += 1

    @staticmethod
    async def _each(items: list[Any], check: Any, width: int = 8) -> None:
        """Run ``check(item)`` for every item, ``width`` at a time (the relay answers several at once)."""
        for i in range(0, len(items), width):
            await asyncio.gather(*(check(item) for item in items[i : i + width]))

    async def _get_json(self, session: aiohttp.ClientSession, path: str, query: dict[str, str]) -> Any:
        status, body = await self._request(session, None, "GET", path, query=query)
        _check(status == 200, f"GET {path} {query}: {status} {body[:300]!r}")
        return json.loads(body)

    async def _check_log(self, session: aiohttp.ClientSession, *, every: bool) -> None:
        status, body = await self._request(session, None, "GET", "/log/vkey")
        _check(status == 200 and body.decode().strip() == self.vkey, "the log's verifier key changed")
        status, body = await self._request(session, None, "GET", "/checkpoint")
        _check(status == 200, f"GET /checkpoint: {status}")
        latest = max(self.seen, default=0)
        cp = self._see_checkpoint(body.decode())
        _check(cp.size >= latest, f"rollback: checkpoint of size {cp.size} after one of size {latest}")
        n = cp.size
        leaves: list[bytes] = []
        while len(leaves) < n:
            got = await self._get_json(session, "/log/entries", {"start": str(len(leaves)), "end": str(n)})
            _check(got["start"] == len(leaves) and got["entries"], "GET /log/entries answered nothing")
            leaves += [base64.b64decode(e, validate=True) for e in got["entries"]]
        _check(len(leaves) == n, f"{len(leaves)} entries for a tree of size {n}")
        # The whole log hashes to the new checkpoint, and its prefixes to every checkpoint seen:
        # each of them is consistent with the new one.
        rng = merkle.CompactRange()
        for i, leaf in enumerate(leaves):
            rng.append(merkle.leaf_hash(leaf))
            if i + 1 in self.seen:
                _check(self.seen[i + 1] == rng.root(), f"checkpoint {i + 1} seen is not a prefix of checkpoint {n}")
        _check(rng.root() == cp.root_hash, f"the log's entries do not hash to checkpoint {n}")
        for size in self.seen:
            _check(size <= n, f"checkpoint {size} seen, larger than the relay's latest {n}")
        submitted = Counter(LogEntry.from_bytes(leaf).envelope_id for leaf in leaves
                            if LogEntry.from_bytes(leaf).type == EntryType.SUBMITTED)
        dup = [e.hex() for e, c in submitted.items() if c > 1]
        _check(not dup, f"envelopes with more than one submitted leaf: {dup[:5]}")
        receipted = [s for s in self.subs.values() if s.receipt is not None]
        for sub in receipted:
            assert sub.receipt is not None
            idx, leaf = sub.receipt
            _check(idx < n and leaves[idx] == leaf, f"receipt of {sub.eid.hex()}: leaf {idx} is not in the log")
        self.stats.receipt_checks += len(receipted)
        for eid in submitted:
            _check(eid in self.subs, f"a submitted leaf for an envelope nobody sent: {eid.hex()}")
        # The relay's own proofs.
        sample = self.rng.sample(sorted(self.seen), min(SAMPLE, len(self.seen)))
        sizes = sorted(self.seen) if every else sorted((self.new_sizes | {self.head}) & set(self.seen) | set(sample))

        async def consistent(m: int) -> None:
            got = await self._get_json(session, "/log/consistency", {"first": str(m), "second": str(n)})
            merkle.verify_consistency(m, n, [base64.b64decode(h) for h in got["proof"]], self.seen[m], cp.root_hash)
            self.stats.consistency_proofs += 1

        await self._each(sizes, consistent)
        older = [s for s in receipted if s.round < self.round]
        proved = receipted if every else [s for s in receipted if s.round == self.round] + self.rng.sample(
            older, min(SAMPLE, len(older)))

        async def included(sub: Submission) -> None:
            assert sub.receipt is not None
            idx, leaf = sub.receipt
            got = await self._get_json(session, "/log/inclusion", {"index": str(idx), "tree_size": str(n)})
            merkle.verify_inclusion(merkle.leaf_hash(leaf), idx, n, [base64.b64decode(h) for h in got["proof"]],
                                    cp.root_hash)
            self.stats.inclusion_proofs += 1

        await self._each(proved, included)
        self.new_sizes.clear()
        self.head = n
        self._submitted = submitted

    async def _check_envelopes(self, session: aiohttp.ClientSession, *, every: bool) -> None:
        submitted: Counter[bytes] = self._submitted
        # Unanswered submissions: absent (and no leaf), complete (one leaf; adopt its receipt),
        # or an upload in progress (no leaf).
        for sub in [s for s in self.subs.values() if s.receipt is None and not s.absent]:
            status, body = await self._request(session, sub.sender, "GET", f"/v1/envelopes/{sub.eid.hex()}/status")
            if status == 404:
                _check(submitted[sub.eid] == 0, f"{sub.eid.hex()} is unknown to /status but has a submitted leaf")
                sub.absent = True
                self.stats.absent += 1
                continue
            _check(status == 200, f"status of {sub.eid.hex()}: {status} {body[:300]!r}")
            answer = json.loads(body)
            if answer["complete"]:
                _check(submitted[sub.eid] == 1, f"complete envelope {sub.eid.hex()} has {submitted[sub.eid]} leaves")
                self._take_receipt(sub, answer["receipt"])
                sub.round = self.round
                self.stats.adopted += 1
            else:
                _check(submitted[sub.eid] == 0 and answer["receipt"] is None,
                       f"upload in progress {sub.eid.hex()} has a submitted leaf")
                _check(answer["offset"] < answer["size"] == len(sub.ciphertext),
                       f"upload in progress {sub.eid.hex()}: {answer}")
        self.stats.in_progress = sum(1 for s in self.subs.values() if s.receipt is None and not s.absent)
        receipted = [s for s in self.subs.values() if s.receipt is not None]
        # Every receipted envelope is in its recipient's inbox.
        for device in range(len(self.keys)):
            status, body = await self._request(session, device, "GET", "/v1/inbox")
            _check(status == 200, f"inbox: {status}")
            listed = {bytes.fromhex(e["id"]) for e in json.loads(body)["envelopes"]}
            missing = [s.eid.hex() for s in receipted if s.recipient == device and s.eid not in listed]
            _check(not missing, f"receipted envelopes missing from their recipient's inbox: {missing[:5]}")
            for eid in listed:
                _check(submitted[eid] == 1, f"inbox lists {eid.hex()}, which has {submitted[eid]} submitted leaves")
        older = [s for s in receipted if s.round < self.round]
        chosen = receipted if every else [s for s in receipted if s.round == self.round] + self.rng.sample(
            older, min(SAMPLE, len(older)))
        await self._each(chosen, lambda sub: self._check_receipted(session, sub))

    async def _check_receipted(self, session: aiohttp.ClientSession, sub: Submission) -> None:
        """A receipted envelope: complete, with the same leaf, and its recipient gets exactly its bytes."""
        assert sub.receipt is not None
        status, body = await self._request(session, sub.sender, "GET", f"/v1/envelopes/{sub.eid.hex()}/status")
        _check(status == 200, f"status of receipted {sub.eid.hex()}: {status} {body[:300]!r}")
        answer = json.loads(body)
        _check(answer["complete"] is True and answer["offset"] == len(sub.ciphertext),
               f"receipted envelope {sub.eid.hex()} is not complete: {answer}")
        _check(answer["receipt"]["index"] == sub.receipt[0]
               and base64.b64decode(answer["receipt"]["leaf"]) == sub.receipt[1],
               f"/status of {sub.eid.hex()} gives another leaf than its receipt")
        status, body = await self._request(session, sub.recipient, "GET", f"/v1/envelopes/{sub.eid.hex()}")
        _check(status == 200 and body == sub.blob,
               f"receipted envelope {sub.eid.hex()}: download answered {status}, "
               f"{'same' if body == sub.blob else 'other'} bytes")
        self.stats.fetched += 1


def run(workdir: Path, *, kills: int, seed: int, **options: Any) -> Stats:
    """Run the crash loop in ``workdir`` (its ``relay`` folder is the relay's data); raise CrashLoopError."""
    return asyncio.run(CrashLoop(workdir, seed=seed, **options).run(kills))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200, help="SIGKILLs under load [200]")
    ap.add_argument("--seed", type=int, help="seed of the run's choices (random when absent; printed)")
    ap.add_argument("--clients", type=int, default=6, help="concurrent submitting clients [6]")
    ap.add_argument("--min-delay", type=float, default=0.2, help="shortest load before a kill, s [0.2]")
    ap.add_argument("--max-delay", type=float, default=0.6, help="longest load before a kill, s [0.6]")
    ap.add_argument("--startup-kills", type=float, default=0.1,
                    help="chance, after each kill, of one more kill while the relay starts [0.1]")
    ap.add_argument("--exhaustive", action="store_true",
                    help="prove every receipt and checkpoint through HTTP after every restart")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"crashloop seed {seed} (replay: python bench/crashloop.py --kills {args.kills} --seed {seed})", flush=True)
    options = {"clients": args.clients, "burst": (args.min_delay, args.max_delay),
               "startup_kill_rate": args.startup_kills, "exhaustive": args.exhaustive, "verbose": not args.quiet}
    with contextlib.ExitStack() as stack:
        workdir = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pli-crashloop-")))
        try:
            stats = run(workdir, kills=args.kills, seed=seed, **options)
        except CrashLoopError as e:
            print(f"FAILED (seed {seed}): {e}", file=sys.stderr)
            if args.keep is None:
                print("rerun with --keep DIR to keep the data folder", file=sys.stderr)
            raise SystemExit(1) from None
    print(f"crashloop passed: {stats.line()}")


if __name__ == "__main__":
    main()
