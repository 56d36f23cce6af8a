"""What a practitioner does with Pli, as async functions the CLI (and practice software) call.

Each workflow fetches bytes, hands them to ``protocol`` to check, and keeps only
what passed: an opened bundle's files appear in the case folder only after the
signature, the recipients, every file hash and the end of the age stream checked out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import mimetypes
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import logstate
from client.api import Progress, RelayClient, unb64
from client.home import Home, Profile, atomic_write
from protocol import age, note
from protocol.bundle import (
    BundleReader,
    FileEntry,
    Layout,
    Manifest,
    Sender,
    bundle_layout,
    check_file_name,
    sign_manifest,
)
from protocol.envelope import MAX_PREFIX, EnvelopeHeader, SignedHeader, seal_header, split_prefix
from protocol.errors import BundleError, DecodeError, NotARecipientError, PliError
from protocol.ids import InvalidIdentifier, check_profession, check_rpps
from protocol.keys import DeviceKeys, DevicePublic
from protocol.logentry import EntryType, sign_answered, sign_read

__all__ = [
    "OpenedEnvelope",
    "SentEnvelope",
    "enroll",
    "inbox",
    "open_envelope",
    "reply",
    "send",
]

DEFAULT_LIFETIME = 30 * 86400
_COPY = 1 << 20


class ClientError(PliError):
    code = "client"


@dataclass
class SentEnvelope:
    envelope_id: str
    case_id: str
    to: list[dict[str, Any]]
    size: int
    received_at: int | None
    first_contacts: list[str] = field(default_factory=list)
    statement_pending: bool = False  # the signed "answered" statement waits for the next sync


@dataclass
class OpenedEnvelope:
    envelope_id: str
    case_id: str
    kind: str
    sender_rpps: str
    sender_name: str
    sender_fingerprint: str
    created: int
    relay_received_at: int | None
    folder: str
    body: dict[str, Any]
    files: list[dict[str, Any]]
    first_contact: bool


def _now() -> int:
    return int(time.time())


def media_type(path: Path) -> str:
    """The file's media type from its first bytes where they say, else from its name."""
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    guessed, _ = mimetypes.guess_type(path.name)
    if guessed in {"application/pdf", "image/jpeg", "image/png"}:
        raise ClientError(f"{path.name}: the name says {guessed} but the content is not")
    return guessed or "application/octet-stream"


_CHANGED = "changed while it was being sent"


@dataclass(frozen=True)
class _Stamp:
    """What the file system says of a file: if it matches later, the bytes have not changed."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, fd: int) -> _Stamp:
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# A file changed within this long before it was hashed may change again without its
# times moving (their granularity is a clock tick on most file systems, 2 s on FAT), so
# its bytes are hashed again while it is sent; any other file is only re-stamped.
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class _Hashed:
    """A file hashed for the manifest, with its stamp from just before it was read."""

    entry: FileEntry
    path: Path
    stamp: _Stamp
    racy: bool


def _hash_file(path: Path, *, now_ns: int | None = None) -> _Hashed:
    """Hash ``path`` for the manifest, and stamp it (``_SentFile`` checks the stamp when
    the file is sent); ``now_ns`` (the wall clock by default) is when.

    Raises:
        BundleError: the file changed size while it was hashed.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    h = hashlib.sha256()
    size = 0
    buf = _hash_buffer()
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        stamp = _Stamp.of(f.fileno())
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL: files hash in parallel on threads
            size += n
    check_file_name(path.name)
    entry = FileEntry(name=path.name, media_type=media_type(path), size=size, sha256=h.digest())
    if size != stamp.size:
        raise BundleError(f"file {path.name!r} {_CHANGED}")
    return _Hashed(entry, path, stamp, racy=max(stamp.mtime_ns, stamp.ctime_ns) > now_ns - _RACY_NS)


_local = threading.local()


def _hash_buffer() -> bytearray:
    """This thread's read buffer: one per thread, not one per file (fresh pages cost faults)."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(_COPY)
    return buf


def _hash_files(paths: list[Path]) -> list[_Hashed]:
    """Hash files for a manifest, two at a time (one per core): a gigabyte takes half as long."""
    if len(paths) < 2:
        return [_hash_file(p) for p in paths]
    with ThreadPoolExecutor(2, thread_name_prefix="pli-hash") as pool:
        return list(pool.map(_hash_file, paths))


def file_entry(path: Path) -> FileEntry:
    """A file as the manifest lists it: name, media type, size and SHA-256."""
    return _hash_file(path).entry


class _Channel:
    """A bounded pipe between two threads: one ``write``s, the other ``read``s.

    It carries the decrypted bundle from the thread that decrypts it to the one that
    parses it, in the pieces they were decrypted in (one age chunk each), so hashing,
    ChaCha20-Poly1305 and file I/O use both cores. The writer waits while ``limit``
    bytes wait in it (the reader takes them all at once: at most about twice ``limit``
    are in memory). The writer ends it with ``close(error)``: the reader gets every byte written, then
    ``error`` (if any); the reader ends it early with ``cancel()``, after which
    ``write`` raises. ``read(n)`` returns at most one piece (fewer than ``n`` bytes is
    not the end; ``b""`` is), and takes every waiting piece at once, to lock less.
    """

    def __init__(self, limit: int = 8 << 20) -> None:
        self._items: deque[bytes] = deque()
        self._queued = 0
        self._limit = limit
        self._cond = threading.Condition()
        self._closed = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._mine: deque[bytes] = deque()  # the reader's pieces, taken out of _items
        self._head = b""
        self._pos = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        item = data if type(data) is bytes else bytes(data)
        if item:
            self.write_many([item])
        return len(item)

    def write_many(self, items: list[bytes]) -> None:
        size = sum(map(len, items))
        with self._cond:
            while self._queued >= self._limit and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                raise _CancelledError
            self._items.extend(items)
            self._queued += size
            self._cond.notify()

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._closed = True
            self._error = error
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._items.clear()
            self._cond.notify_all()

    def _take(self) -> bytes | None:
        if not self._mine:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    if self._error is not None:
                        raise self._error
                    return None
                self._mine, self._items = self._items, self._mine
                self._queued = 0
                self._cond.notify()
        return self._mine.popleft()

    def read(self, n: int = -1) -> bytes:
        if self._pos == len(self._head):
            item = self._take()
            if item is None:
                return b""
            self._head, self._pos = item, 0
        if n < 0 or (self._pos == 0 and n >= len(self._head)):
            data = self._head[self._pos :]  # a whole piece: no copy
        else:
            data = self._head[self._pos : self._pos + n]
        self._pos += len(data)
        return data


class _CancelledError(Exception):
    """The reading side of a _Channel went away."""


def _produce(channel: _Channel, work: Callable[[], object]) -> threading.Thread:
    """Run ``work`` (which writes into ``channel``) on a thread; its outcome closes the channel."""

    def run() -> None:
        try:
            work()
        except _CancelledError:
            channel.close()
        except BaseException as e:  # handed to the reading thread, which raises it
            channel.close(e)
        else:
            channel.close()

    thread = threading.Thread(target=run, name="pli-bundle", daemon=True)
    thread.start()
    return thread


# -- enrolment and directory ----------------------------------------------------------------


async def enroll(home: Home, keys: DeviceKeys, relay_url: str, code: str) -> Profile:
    """Join a relay; pin its log key (trust on first use, like the practitioners' keys)."""
    me = keys.public()
    async with RelayClient(relay_url) as relay:
        answer = await relay.enroll(code, me.to_record())
        try:
            profile = Profile(
                relay=relay_url.rstrip("/"), device_id=answer["device_id"], rpps=answer["rpps"],
                name=answer["name"], profession=answer["profession"], specialty=answer["specialty"],
                log_origin=answer["log_origin"], log_vkey=answer["log_vkey"],
            )
            receipt = answer["receipt"]
        except KeyError as e:
            raise DecodeError(f"the relay's enrolment answer lacks {e}") from e
        if note.Verifier.from_vkey(profile.log_vkey).name != profile.log_origin:
            raise DecodeError("the relay's log key is not named by its log's origin")
        home.save_profile(profile)
        entry = await logstate.store_receipt(home, relay, me.device_id.hex(), receipt)
        if entry.record_hash != hashlib.sha256(me.to_bytes()).digest() or entry.rpps != profile.rpps:
            logstate.raise_alarm(home, "enrolment logged wrongly", "the log records other keys for this device")
        logstate.store_device(home, me, profile.rpps, profile.name)
        await logstate.check_log(home, relay)
    return profile


def _record_from_json(d: dict[str, Any]) -> DevicePublic:
    try:
        record = {"sign_key": unb64(d["sign_key"]), "cert": unb64(d["cert"]), "sig": unb64(d["sig"])}
    except (KeyError, TypeError, ValueError) as e:
        raise DecodeError("the relay sent a malformed device record") from e
    return DevicePublic.from_record(record)


async def practitioner_devices(
    relay: RelayClient, home: Home, rpps: str
) -> tuple[dict[str, Any], list[DevicePublic], bool]:
    """A practitioner's verified device keys, checked against the pins (see Home.check_pins)."""
    rpps = check_rpps(rpps)
    info = await relay.directory(rpps)
    if info.get("rpps") != rpps:
        raise BundleError(f"the relay answered for another practitioner than RPPS {rpps}")
    devices = [_record_from_json(d) for d in info.get("devices", [])]
    for d, raw in zip(devices, info.get("devices", []), strict=True):
        if d.device_id.hex() != raw.get("device_id"):
            raise DecodeError("the relay's directory lists a device under the wrong id")
    if not devices:
        raise ClientError(f"{info.get('name', rpps)} has no enrolled device yet")
    # Every key we may encrypt to must be in the log, enrolled for this very RPPS: a relay
    # cannot slip in a key it never logged (for everyone to see) as someone's device.
    for d, raw in zip(devices, info.get("devices", []), strict=True):
        await _check_enrolled(home, relay, d, rpps, raw.get("receipts", []))
    first = home.check_pins(rpps, devices)
    for d in devices:
        logstate.store_device(home, d, rpps, info.get("name", ""))
    return info, devices, first


async def _check_enrolled(
    home: Home, relay: RelayClient, device: DevicePublic, rpps: str, receipts: list[dict[str, Any]]
) -> None:
    """Keep and check the device's enrolment receipt: its leaf names this record and RPPS."""
    record_hash = hashlib.sha256(device.to_bytes()).digest()
    for receipt in receipts:
        entry = await logstate.store_receipt(home, relay, device.device_id.hex(), receipt)
        if entry.type == EntryType.DEVICE_ENROLLED and entry.record_hash == record_hash and entry.rpps == rpps:
            return
    raise BundleError(
        f"the relay lists device {device.device_id.hex()[:12]} for RPPS {rpps} without proof in its log "
        "that it was enrolled for them"
    )


def _session(home: Home) -> Profile:
    profile = home.profile()
    if not profile.relay:
        raise ClientError("this device is not enrolled: run `pli enroll URL CODE` first")
    return profile


# -- sending ---------------------------------------------------------------------------------


async def send(
    home: Home,
    keys: DeviceKeys,
    *,
    to: list[str],
    kind: str,
    body: dict[str, Any],
    files: list[Path],
    case_id: bytes | None = None,
    lifetime: int = DEFAULT_LIFETIME,
    progress: Progress | None = None,
    relay: RelayClient | None = None,
) -> SentEnvelope:
    """Build, sign, encrypt and upload one envelope; keep it in the local archive.

    ``files`` must not change until this returns. Each is hashed once, for the manifest,
    and not again while it is encrypted: a change the file system records (size, times,
    inode) refuses the send, but one it does not (bytes changed through a shared memory
    map before they are written back) would leave a bundle that the recipient refuses
    for its hash. Pli's own commands send copies they made in the case folder."""
    profile = _session(home)
    for f in files:
        if not f.is_file():
            raise ClientError(f"{f}: no such file")
    hashed = await asyncio.to_thread(_hash_files, files)
    entries = [h.entry for h in hashed]
    if len({e.name.casefold() for e in entries}) != len(entries):
        raise ClientError("two attachments have the same name; rename one")
    async with _relay(home, profile, keys, relay) as r:
        recipients: list[DevicePublic] = []
        peers: list[dict[str, Any]] = []
        first_contacts: list[str] = []
        for rpps in to:
            info, devices, first = await practitioner_devices(r, home, rpps)
            recipients += devices
            peers.append({"rpps": info["rpps"], "name": info["name"]})
            if first:
                first_contacts.append(info["rpps"])
        me = keys.public()
        recipient_ids = tuple(dict.fromkeys(d.device_id for d in recipients if d.device_id != me.device_id))
        if not recipient_ids:
            raise ClientError("no recipient device other than this one: check the RPPS numbers")
        envelope_id = os.urandom(16)
        case = case_id or os.urandom(16)
        now = _now()
        manifest = Manifest(
            kind=kind,
            case_id=case,
            envelope_id=envelope_id,
            created=now,
            sender=Sender(sign_key=me.sign_key, enc_key=me.enc_key, rpps=profile.rpps, name=profile.name),
            recipients=recipient_ids,
            files=tuple(entries),
            body=body,
        )
        raw, sig = sign_manifest(manifest, keys.signing_key)
        by_id = {d.device_id: d for d in recipients}
        age_recipients = [by_id[i].recipient for i in recipient_ids] + [me.recipient]
        home.envelopes.mkdir(parents=True, exist_ok=True)
        ct_path = home.envelopes / f"{envelope_id.hex()}.age"
        size, digest = await asyncio.to_thread(_encrypt_bundle, ct_path, age_recipients, raw, sig, hashed)
        header = EnvelopeHeader(
            id=envelope_id, sender=me.device_id, to=recipient_ids, created=now,
            expires=now + lifetime, size=size, sha256=digest,
        )
        signed = seal_header(header, keys.signing_key)
        atomic_write(home.envelopes / f"{envelope_id.hex()}.prefix", signed.prefix, mode=0o600)
        # Recorded before the upload, as pending: if the connection drops, the next sync
        # resumes this very envelope (same id: the relay keeps it once) instead of the user
        # sending a second one, and the case already counts it.
        home.record(
            id=envelope_id.hex(), case_id=case.hex(), direction="sent", kind=kind,
            peer_rpps=",".join(p["rpps"] for p in peers), peer_name=", ".join(p["name"] for p in peers),
            subject=str(body.get("motif", "")), created=now, relay_received_at=None,
            in_reply_to=body["in_reply_to"].hex() if "in_reply_to" in body else None,
            body=body_json(body), read_at=now, pending=1,
        )
        try:
            state = await _deliver(home, r, envelope_id, signed, ct_path, progress)
        except PliError as e:
            if e.code != "relay_unreachable":
                home.forget(envelope_id.hex())  # refused: nothing was sent, nothing is pending
            else:
                e.pending_envelope = envelope_id.hex()  # type: ignore[attr-defined]  # for the files
            raise
    return SentEnvelope(
        envelope_id=envelope_id.hex(), case_id=case.hex(), to=peers, size=size,
        received_at=state.get("received_at"), first_contacts=first_contacts,
    )


async def _deliver(
    home: Home, r: RelayClient, envelope_id: bytes, signed: SignedHeader, ct_path: Path, progress: Progress | None,
) -> dict[str, Any]:
    """Upload (or resume) an envelope, check its receipt, and mark it delivered to the relay."""
    state = await r.upload(envelope_id, signed.prefix, ct_path, progress=progress)
    if not state.get("receipt"):
        raise ClientError("the relay stored the envelope without a receipt")
    entry = await logstate.store_receipt(home, r, envelope_id.hex(), state["receipt"])
    if entry.envelope_hash != signed.envelope_hash or entry.signature != signed.signature:
        logstate.raise_alarm(home, "submission logged wrongly", "the receipt names another envelope")
    with home.store() as db:
        db.execute("UPDATE envelopes SET pending = 0, relay_received_at = ? WHERE id = ?",
                    (state.get("received_at"), envelope_id.hex()))
    return state


async def resume_pending(home: Home, r: RelayClient) -> tuple[list[str], list[tuple[str, PliError]]]:
    """Upload what an interrupted command left pending; returns what went and what the relay refused.

    A refused one (for instance held back beyond the relay's window for a first upload) is
    dropped from its case, so the practitioner can send it again.
    """
    sent: list[str] = []
    refused: list[tuple[str, PliError]] = []
    for row in home.history():
        if not row.get("pending"):
            continue
        eid = row["id"]
        split = split_prefix((home.envelopes / f"{eid}.prefix").read_bytes())
        if split is None:
            raise DecodeError(f"the archived header of {eid} is cut short")
        try:
            await _deliver(home, r, bytes.fromhex(eid), split[0], home.envelopes / f"{eid}.age", None)
        except PliError as e:
            if e.code in ("relay_unreachable", "log_alarm"):
                raise
            home.forget(eid)
            home.incident(row["case_id"], _now(), f"envelope {eid[:12]} could not be delivered ({e.code}); "
                          "send it again", f"le pli {eid[:12]} n'a pas pu être remis ({e.code}) ; renvoyez-le")
            refused.append((eid, e))
            continue
        sent.append(eid)
        original = row.get("in_reply_to")
        if original and any(h["id"] == original and h["direction"] == "received" for h in home.history(row["case_id"])):
            home.set_pending_statement(original, eid, pending=True)
    return sent, refused


async def refresh_receipts(home: Home, r: RelayClient, envelope_ids: list[bytes]) -> int:
    """Fetch and verify the receipts the relay holds for these envelopes; returns how many were new."""
    new = 0
    for eid in envelope_ids:
        known = {x["index"] for x in logstate.receipts_of(home, eid.hex())}
        for receipt in await r.receipts(eid):
            if receipt.get("index") not in known:
                await logstate.store_receipt(home, r, eid.hex(), receipt)
                new += 1
    return new


_BLOCK = 16 * age.CHUNK_SIZE  # plaintext per block (1 MiB): one hand-off between threads per block
_SEALED_BLOCK = age.sealed_size(_BLOCK)
_DEPTH = 6  # blocks in flight in each pipeline: memory stays flat, threads rarely wait
_SYNC_EVERY = 64 << 20  # the ciphertext is written back to disk as it goes, not all at the fsync


def _write_all(f: Any, data: memoryview) -> None:
    while data:
        n = f.write(data)
        data = data[n:]


class _CiphertextSink:
    """Writes the ciphertext on the caller's thread and hashes it, in order, on another.

    The caller fills buffers from ``buffer()`` and hands them back with ``submit``: the
    SHA-256 (which releases the GIL) runs alongside the caller's encryption and writes.
    A third thread starts writing the file back to disk every ``_SYNC_EVERY`` bytes, so
    the final fsync has little left to do. At most ``_DEPTH`` buffers exist;
    ``finish()`` waits for everything and raises the first error.
    """

    def __init__(self, f: Any) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self.size = 0
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="pli-hash")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="pli-sync")
        self._sync: Future[None] | None = None
        self._synced = 0
        self._free = [bytearray(_SEALED_BLOCK) for _ in range(_DEPTH)]
        self._inflight: deque[tuple[bytearray | None, Future[None]]] = deque()

    def buffer(self) -> bytearray:
        while not self._free:
            self._retire()
        return self._free.pop()

    def submit(self, buf: bytearray | bytes, n: int) -> None:
        view = memoryview(buf)[:n]
        self._inflight.append((buf if isinstance(buf, bytearray) else None, self._hasher.submit(self._h.update, view)))
        _write_all(self._f, view)
        self.size += n
        if self.size - self._synced >= _SYNC_EVERY and (self._sync is None or self._sync.done()):
            if self._sync is not None:
                self._sync.result()
            self._synced = self.size
            self._sync = self._syncer.submit(_datasync, self._f.fileno())

    def _retire(self) -> None:
        buf, hashing = self._inflight.popleft()
        hashing.result()
        if buf is not None:
            self._free.append(buf)

    def finish(self) -> bytes:
        """Wait for every buffer to be hashed and the file to be on disk; the digest."""
        while self._inflight:
            self._retire()
        if self._sync is not None:
            self._sync.result()
        os.fsync(self._f.fileno())
        return self._h.digest()

    def close(self) -> None:
        for _, hashing in self._inflight:
            hashing.cancel()
        for pool in (self._hasher, self._syncer):
            pool.shutdown(wait=True)


def _datasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


class _SentFile:
    """A file being read into the bundle, refused if it is not exactly the one hashed.

    Its stamp (device, inode, size, times) must be the one taken before it was hashed,
    when it is opened and again after its last byte is read; a file changed too
    recently for its times to tell is hashed again as it is read.
    """

    def __init__(self, hashed: _Hashed) -> None:
        self._hashed = hashed
        try:
            self._f = hashed.path.open("rb", buffering=0)
        except FileNotFoundError as e:
            raise self._changed() from e
        self._h = hashlib.sha256() if hashed.racy else None
        try:
            self._check_stamp()
        except BaseException:
            self._f.close()
            raise

    def _changed(self) -> BundleError:
        return BundleError(f"file {self._hashed.entry.name!r} {_CHANGED}")

    def _check_stamp(self) -> None:
        if _Stamp.of(self._f.fileno()) != self._hashed.stamp:
            raise self._changed()

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` from the file."""
        got = 0
        while got < len(view):
            n = self._f.readinto(view[got:])
            if not n:
                raise self._changed()  # shorter than hashed
            got += n
        if self._h is not None:
            self._h.update(view)

    def finish(self) -> None:
        """After the file's last byte: check it did not change meanwhile."""
        try:
            self._check_stamp()
            if self._h is not None and not hmac.compare_digest(self._h.digest(), self._hashed.entry.sha256):
                raise self._changed()
        finally:
            self._f.close()

    def close(self) -> None:
        self._f.close()


def _plaintext_blocks(layout: Layout, files: list[_Hashed]) -> Iterator[tuple[memoryview, bool]]:
    """The bundle's plaintext in ``_BLOCK``-sized blocks (the last one shorter), each with
    whether it is the final one; file data is read straight into the block. Each block
    is only valid until the next one is asked for."""
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    fill = done = 0
    sources = iter(files)

    def parts() -> Iterator[tuple[int, bytes | _SentFile | None]]:
        for part in layout.parts:
            if isinstance(part, bytes):
                yield len(part), part
                continue
            sent = _SentFile(next(sources))
            try:
                yield part.size, sent
                sent.finish()
            finally:
                sent.close()
        yield layout.padding, None  # zeros

    for size, src in parts():
        pos = 0
        while pos < size:
            take = min(size - pos, _BLOCK - fill)
            target = view[fill : fill + take]
            if isinstance(src, bytes):
                target[:] = src[pos : pos + take]
            elif src is None:
                target[:] = _ZERO_BLOCK[:take]
            else:
                src.read_into(target)
            pos += take
            fill += take
            if fill == _BLOCK:
                done += _BLOCK
                yield view, done == layout.size
                fill = 0
    if fill:
        yield view[:fill], True


_ZERO_BLOCK = memoryview(bytes(_BLOCK))


def _encrypt_bundle(
    path: Path,
    recipients: list[age.X25519Recipient],
    manifest: bytes,
    sig: bytes,
    files: list[_Hashed],
) -> tuple[int, bytes]:
    """Write the bundle's age file to ``path`` (fsynced); its size and SHA-256.

    This thread reads the files into the tar's blocks, seals them (ChaCha20-Poly1305
    releases the GIL) and writes them; another hashes the ciphertext meanwhile.

    Raises:
        BundleError: a file changed since it was hashed.
    """
    layout = bundle_layout(manifest, sig, [f.entry for f in files])
    header, sealer = age.start_encryption(recipients)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb", buffering=0) as raw:
            sink = _CiphertextSink(raw)
            try:
                sink.submit(header, len(header))
                for block, final in _plaintext_blocks(layout, files):
                    out = sink.buffer()
                    sink.submit(out, sealer.seal_into(block, out, final=final))
                digest = sink.finish()
            finally:
                sink.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sink.size, digest


class _relay:  # noqa: N801 - used as a context manager helper
    """Reuse a caller's RelayClient, or open one for this call; either way, check the
    relay's log against what this device saw before doing anything else."""

    def __init__(self, home: Home, profile: Profile, keys: DeviceKeys, given: RelayClient | None) -> None:
        self._home = home
        self._given = given
        self._own = None if given else RelayClient(profile.relay, keys)

    async def __aenter__(self) -> RelayClient:
        if self._given is not None:
            relay = self._given
        else:
            assert self._own is not None
            relay = await self._own.__aenter__()
        try:
            await logstate.check_log(self._home, relay)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return relay

    async def __aexit__(self, *exc: object) -> None:
        if self._own is not None:
            await self._own.__aexit__(*exc)


# -- receiving ---------------------------------------------------------------------------------


async def inbox(home: Home, keys: DeviceKeys, *, relay: RelayClient | None = None) -> list[dict[str, Any]]:
    profile = _session(home)
    async with _relay(home, profile, keys, relay) as r:
        entries = await r.inbox()
    for e in entries:
        pinned = home.pinned(e.get("from_rpps", "")) or {}
        e["known_sender"] = e.get("from") in pinned
    return entries


async def _find(r: RelayClient, envelope_id: str) -> dict[str, Any]:
    """An inbox entry by full id or unique prefix (people type the first characters)."""
    entries = await r.inbox()
    matches = [e for e in entries if e["id"].startswith(envelope_id.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ClientError(f"no envelope {envelope_id!r} waiting in your inbox (see `pli inbox`)")
    raise ClientError(f"{envelope_id!r} matches {len(matches)} envelopes: type more characters")


async def open_envelope(  # noqa: C901, PLR0915 - the checks of SPEC.md §6.2, in order, then filing
    home: Home,
    keys: DeviceKeys,
    envelope_id: str,
    *,
    progress: Progress | None = None,
    relay: RelayClient | None = None,
    acknowledge: bool = True,
    mark_read: bool = True,
) -> OpenedEnvelope:
    """Download, verify, decrypt and file one envelope, then acknowledge it to the relay.

    With ``mark_read`` the device signs, in the log, that its practitioner read it; the
    case commands file envelopes first and sign that only when the case is shown.
    """
    profile = _session(home)
    async with _relay(home, profile, keys, relay) as r:
        entry = await _find(r, envelope_id)
        eid = bytes.fromhex(entry["id"])
        prefix_path = home.envelopes / f"{eid.hex()}.prefix"
        age_path = home.envelopes / f"{eid.hex()}.age"
        await _download(r, eid, prefix_path, age_path, progress, limit=MAX_PREFIX + int(entry["size"]))
        signed, _ = split_prefix(prefix_path.read_bytes()) or (None, 0)
        if signed is None:
            raise DecodeError("the downloaded envelope is cut short")
        # Who sent it: the relay says which device; the directory and our pins say whose.
        dev_info = await r.device(bytes.fromhex(entry["from"]))
        sender = _record_from_json(dev_info)
        if sender.device_id.hex() != entry["from"] or dev_info.get("rpps") != entry.get("from_rpps"):
            raise BundleError("the relay's answers about the sender disagree")
        await _check_enrolled(home, r, sender, str(dev_info["rpps"]), dev_info.get("receipts", []))
        # Read the pins before the directory call below updates them (a device revoked
        # since it sent is dropped from the pins there, and must still be recognised).
        pinned = home.trusted_ever(dev_info["rpps"])
        info, devices, first = await practitioner_devices(r, home, dev_info["rpps"])
        # The sender must be a device we trust for that practitioner: listed now (and
        # matching our pins, checked above), or pinned earlier with these very keys (a
        # device revoked since it sent). Never on the relay's word alone: a relay could
        # otherwise invent a "revoked" device and sign envelopes as anyone.
        listed = sender.device_id in {d.device_id for d in devices}
        if not listed and pinned.get(sender.device_id.hex()) != sender.fingerprint:
            raise BundleError("the sending device is not one of its practitioner's trusted devices")
        try:
            header = signed.verify(sender.verify_key)
            if header.id != eid:
                raise BundleError("the envelope carries another id than the one asked for")
            if keys.device_id not in header.to:
                raise NotARecipientError("this device is not a recipient of this envelope")
            opened = await asyncio.to_thread(
                _decrypt_bundle, home, keys, signed, header, sender, age_path
            )
            problem = _claims_problem(opened.manifest, dev_info["rpps"], info)
            if problem:
                shutil.rmtree(opened.folder, ignore_errors=True)
                raise BundleError(problem)
        except PliError as e:
            _set_aside(prefix_path, age_path)
            home.reject(eid.hex(), e.code, str(e))  # kept as evidence, never downloaded again
            raise
        # Opened and verified: file it at once (so nothing acknowledged can go missing), then
        # say so, signed, in the log if asked (the read receipt travels back to the sender),
        # and acknowledge delivery so the relay may delete it.
        m = opened.manifest
        name = str(info.get("name") or m.sender.name)  # the directory's name, not the sender's claim
        result = OpenedEnvelope(
            envelope_id=eid.hex(), case_id=m.case_id.hex(), kind=m.kind, sender_rpps=m.sender.rpps,
            sender_name=name, sender_fingerprint=sender.fingerprint, created=m.created,
            relay_received_at=entry.get("received_at"), folder=str(opened.folder),
            body={k: (v.hex() if isinstance(v, bytes) else v) for k, v in m.body.items()},
            files=[{"name": f.name, "type": f.media_type, "size": f.size, "sha256": f.sha256.hex()} for f in m.files],
            first_contact=first,
        )
        home.record(
            id=eid.hex(), case_id=m.case_id.hex(), direction="received", kind=m.kind,
            peer_rpps=m.sender.rpps, peer_name=name, subject=str(m.body.get("motif", "")),
            created=m.created, relay_received_at=entry.get("received_at"), opened_at=_now(),
            in_reply_to=m.body["in_reply_to"].hex() if "in_reply_to" in m.body else None,
            folder=str(opened.folder), body=body_json(m.body), read_at=None,
        )
        atomic_write(opened.folder / "envelope.json",
                     json.dumps(result.__dict__, indent=2, ensure_ascii=False).encode())
        if mark_read:
            await _sign_read(home, keys, r, eid, signed.envelope_hash)
        if acknowledge:
            acked = await r.ack(eid)
            await logstate.store_receipt(home, r, eid.hex(), acked["receipt"])
        # Keep the log's evidence of this envelope (its submission) and, for an answer, of
        # the question's fate (delivered, read, answered): an audit export then works offline.
        # Best effort: an answer naming an envelope this device may not query loses nothing.
        try:
            await refresh_receipts(home, r, [eid] + ([m.body["in_reply_to"]] if "in_reply_to" in m.body else []))
        except PliError as e:
            if e.code in ("log_alarm", "relay_unreachable"):
                raise
    return result


async def _download(
    r: RelayClient, eid: bytes, prefix_path: Path, age_path: Path, progress: Progress | None, *, limit: int
) -> None:
    """Fetch the envelope as ``<id>.prefix`` + ``<id>.age`` (so `age -d` opens the archive),
    resuming a cut download from the ``.age.part`` it left."""
    if prefix_path.exists() and age_path.exists():
        return
    part = age_path.with_name(age_path.name + ".part")
    prefix_path.parent.mkdir(parents=True, exist_ok=True)
    if prefix_path.exists():
        offset = len(prefix_path.read_bytes()) + (part.stat().st_size if part.exists() else 0)
    else:
        offset = 0
    buf = bytearray()
    out = part.open("ab" if offset else "wb")

    received = [offset]

    def sink(chunk: bytes) -> None:
        # Never more than the inbox announced: a relay cannot fill the disk with bytes
        # that will only be checked at the end.
        received[0] += len(chunk)
        if received[0] > limit:
            raise DecodeError("the relay sent more bytes than the envelope's announced size")
        if offset or prefix_path.exists():
            out.write(chunk)
            return
        buf.extend(chunk)
        split = split_prefix(buf)
        if split is not None:
            _, used = split
            atomic_write(prefix_path, bytes(buf[:used]))
            out.write(buf[used:])
            buf.clear()

    try:
        await r.download(eid, sink, offset=offset, progress=progress)
        out.flush()
        os.fsync(out.fileno())
    finally:
        out.close()
    if not prefix_path.exists():
        raise DecodeError("the relay sent less than an envelope header")
    part.replace(age_path)


def _claims_problem(m: Manifest, rpps: str, directory: dict[str, Any]) -> str | None:
    """What a verified bundle claims that its sender's directory entry contradicts, if anything:
    a signed bundle could otherwise pass a nurse's avis off as a médecin's."""
    if m.sender.rpps != rpps:
        return "the bundle claims another practitioner than the sending device's"
    claimed = m.body.get("author", {}).get("profession") if isinstance(m.body.get("author"), dict) else None
    try:
        listed = check_profession(str(directory.get("profession", ""))).code
    except InvalidIdentifier:
        return f"the directory lists an unknown profession for RPPS {rpps}"
    if claimed != listed:
        return f"the bundle claims the profession {claimed!r}; the directory lists {listed!r} for RPPS {rpps}"
    return None


def _set_aside(*paths: Path) -> None:
    """Keep a refused envelope as evidence, out of the way of a fresh download."""
    rejected = paths[0].parent / "rejected"
    rejected.mkdir(exist_ok=True)
    for p in paths:
        if p.exists():
            p.replace(rejected / f"{p.name}.{int(time.time())}")


class _Opened:
    def __init__(self, manifest: Manifest, folder: Path) -> None:
        self.manifest = manifest
        self.folder = folder


class _CiphertextFeed:
    """Reads the age file, hashes it and decrypts it into a ``_Channel``, on its own thread,
    a block of 16 chunks at a time (the SHA-256 and ChaCha20-Poly1305 release the GIL)."""

    def __init__(self, f: Any, size: int, start: int, opener: age.PayloadOpener, channel: _Channel) -> None:
        self._f = f
        self._size = size
        self._start = start
        self._opener = opener
        self._channel = channel
        self.digest = b""

    def _read(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self._f.readinto(view[got:])
            if not n:
                raise BundleError("the ciphertext does not match its signed header")  # it shrank
            got += n

    def run(self) -> None:
        h = hashlib.sha256()
        buf = bytearray(max(self._start, 16 * (age.CHUNK_SIZE + 16)))
        head = memoryview(buf)[: self._start]
        self._read(head)
        h.update(head)
        pos = self._start
        final = False
        while not final:
            view = memoryview(buf)[: min(len(buf), self._size - pos)]
            self._read(view)
            h.update(view)
            pos += len(view)
            final = pos == self._size
            self._channel.write_many(self._opener.open(view, final=final))
        self.digest = h.digest()


def _decrypt_bundle(
    home: Home, keys: DeviceKeys, signed: SignedHeader, header: EnvelopeHeader,
    sender: DevicePublic, age_path: Path,
) -> _Opened:
    """Check, decrypt and file a downloaded envelope's bundle; the files appear in the
    case folder only once every check passed (SPEC.md §6.2).

    A thread reads, hashes and decrypts the age file (``_CiphertextFeed``); this one
    parses the tar, checks each file's SHA-256 and writes the files.
    """
    staging = home.cases / f".incoming-{header.id.hex()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "files").mkdir(parents=True)
    try:
        with age_path.open("rb", buffering=0) as raw:
            size = os.fstat(raw.fileno()).st_size
            if size != header.size:
                raise BundleError("the ciphertext does not match its signed header")  # noqa: TRY301
            opener, start = age.start_decryption(raw.read(age.MAX_HEADER_SIZE + 16), [keys.identity])
            raw.seek(0)
            channel = _Channel(4 << 20)
            feed = _CiphertextFeed(raw, size, start, opener, channel)
            producer = _produce(channel, feed.run)
            try:
                reader = BundleReader(channel, sender=sender, envelope=header, me=keys.device_id)
                for entry, data in reader.files():
                    with (staging / "files" / entry.name).open("xb", buffering=0) as out:
                        for piece in data.chunks():
                            _write_all(out, piece)
                reader.finish()
            finally:
                channel.cancel()
                producer.join()
            if not hmac.compare_digest(feed.digest, header.sha256):
                raise BundleError("the ciphertext does not match its signed header")  # noqa: TRY301
        (staging / "manifest").write_bytes(reader.manifest_bytes)
        (staging / "manifest.sig").write_bytes(reader.signature)
        (staging / "envelope.prefix").write_bytes(signed.prefix)
        folder = home.cases / reader.manifest.case_id.hex() / header.id.hex()
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.rmtree(folder)
        staging.replace(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _Opened(reader.manifest, folder)


async def _sign_read(home: Home, keys: DeviceKeys, r: RelayClient, eid: bytes, envelope_hash: bytes) -> int:
    """Sign, in the relay's log, that this device's practitioner read the envelope."""
    read_at = _now()
    read = await r.read(eid, read_at, sign_read(keys.signing_key, envelope_hash, read_at))
    await logstate.store_receipt(home, r, eid.hex(), read["receipt"])
    home.mark_read(eid.hex(), read_at)
    return read_at


async def mark_read(home: Home, keys: DeviceKeys, envelope_ids: list[str], *, relay: RelayClient | None = None) -> None:
    """Sign the read statements of envelopes filed earlier and now shown to the practitioner."""
    if not envelope_ids:
        return
    profile = _session(home)
    async with _relay(home, profile, keys, relay) as r:
        for eid in envelope_ids:
            await _sign_read(home, keys, r, bytes.fromhex(eid), _envelope_hash(home, eid))


def body_json(body: dict[str, Any]) -> str:
    """A manifest body as the local store keeps it: JSON, byte strings as hex."""

    def plain(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return json.dumps(plain(body), ensure_ascii=False, sort_keys=True)


async def reply(
    home: Home,
    keys: DeviceKeys,
    envelope_id: str,
    *,
    kind: str,
    body: dict[str, Any],
    files: list[Path],
    progress: Progress | None = None,
    relay: RelayClient | None = None,
) -> SentEnvelope:
    """Answer a received envelope: same case, to the practitioner who sent it, then sign
    (in the log) that this envelope answers it."""
    matches = [h for h in home.history() if h["id"].startswith(envelope_id.lower()) and h["direction"] == "received"]
    if len(matches) != 1:
        raise ClientError(
            f"no single received envelope matches {envelope_id!r}"
            if not matches else f"{envelope_id!r} matches several envelopes: type more characters"
        )
    original = matches[0]
    profile = _session(home)
    async with _relay(home, profile, keys, relay) as r:
        sent = await send(
            home, keys, to=[original["peer_rpps"]], kind=kind,
            body={**body, "in_reply_to": bytes.fromhex(original["id"])},
            files=files, case_id=bytes.fromhex(original["case_id"]), progress=progress, relay=r,
        )
        # The answered receipt: this device signs that its envelope answers the original. The
        # answer is already delivered: if the relay cannot take the statement now, it is kept
        # and sent again at the next sync (the relay logs it once, whatever the retries).
        home.set_pending_statement(original["id"], sent.envelope_id, pending=True)
        try:
            await _send_statement(home, keys, r, original["id"], sent.envelope_id)
        except PliError as e:
            if e.code != "relay_unreachable":
                raise
            sent.statement_pending = True
    return sent


async def _send_statement(home: Home, keys: DeviceKeys, r: RelayClient, original: str, answer: str) -> None:
    answered_at = _now()
    question, answer_hash = _envelope_hash(home, original), _envelope_hash(home, answer)
    result = await r.answered(bytes.fromhex(original), bytes.fromhex(answer), answered_at,
                              sign_answered(keys.signing_key, question, answer_hash, answered_at))
    await logstate.store_receipt(home, r, original, result["receipt"])
    home.set_pending_statement(original, answer, pending=False)


async def send_pending_statements(home: Home, keys: DeviceKeys, r: RelayClient) -> int:
    """Send the "answered" statements an interrupted answer left behind; returns how many."""
    done = 0
    for original, answer in home.pending_statements():
        await _send_statement(home, keys, r, original, answer)
        done += 1
    return done


def _envelope_hash(home: Home, envelope_id: str) -> bytes:
    split = split_prefix((home.envelopes / f"{envelope_id}.prefix").read_bytes())
    if split is None:
        raise DecodeError(f"the archived header of {envelope_id} is cut short")
    return split[0].envelope_hash


ProgressFactory = Callable[[str], Progress | None]
