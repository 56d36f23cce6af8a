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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import logstate
from client.api import Progress, RelayClient, unb64
from client.home import Home, Profile, atomic_write
from protocol import age, note
from protocol.bundle import BundleReader, FileEntry, Manifest, Sender, check_file_name, sign_manifest, write_bundle
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
_PIECE = 1 << 16  # under glibc's mmap threshold: no fresh pages (page faults) per read


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


def file_entry(path: Path) -> FileEntry:
    """A file as the manifest lists it: name, media type, size and SHA-256."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(_COPY)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL: files hash in parallel on threads
            size += n
    check_file_name(path.name)
    return FileEntry(name=path.name, media_type=media_type(path), size=size, sha256=h.digest())


class _Channel:
    """A bounded pipe between two threads: one ``write``s, the other ``read``s.

    It lets the bundle's tar be produced (or consumed) on one thread while age
    encryption (or decryption) runs on another, so hashing, ChaCha20-Poly1305 and file
    I/O use both cores. At most ``limit`` bytes wait in it. The writer ends it with
    ``close(error)``: the reader gets every byte written, then ``error`` (if any); the
    reader ends it early with ``cancel()``, after which ``write`` raises.
    """

    def __init__(self, limit: int = 8 << 20) -> None:
        self._items: deque[bytes] = deque()
        self._queued = 0
        self._limit = limit
        self._cond = threading.Condition()
        self._closed = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._head = b""
        self._pos = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        item = data if type(data) is bytes else bytes(data)
        if not item:
            return 0
        with self._cond:
            while self._queued >= self._limit and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                raise _CancelledError
            self._items.append(item)
            self._queued += len(item)
            self._cond.notify()
        return len(item)

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
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._items:
                item = self._items.popleft()
                self._queued -= len(item)
                self._cond.notify()
                return item
            if self._error is not None:
                raise self._error
            return None

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        want = n
        try:
            while want:
                avail = len(self._head) - self._pos
                if not avail:
                    item = self._take()
                    if item is None:
                        break
                    self._head, self._pos = item, 0
                    continue
                take = avail if want < 0 else min(want, avail)
                if self._pos == 0 and take == avail:
                    parts.append(self._head)  # a whole item: no copy
                    self._head = b""
                else:
                    parts.append(self._head[self._pos : self._pos + take])
                    self._pos += take
                if want > 0:
                    want -= take
        except BaseException:
            if not parts:
                raise  # else the error comes again on the next read, after these bytes
        return parts[0] if len(parts) == 1 else b"".join(parts)


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
    """Build, sign, encrypt and upload one envelope; keep it in the local archive."""
    profile = _session(home)
    for f in files:
        if not f.is_file():
            raise ClientError(f"{f}: no such file")
    entries = await asyncio.to_thread(lambda: [file_entry(f) for f in files])
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
        size, digest = await asyncio.to_thread(
            _encrypt_bundle, ct_path, age_recipients, raw, sig, list(zip(entries, files, strict=True))
        )
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


class _HashingWriter:
    """Writes to ``f`` and hashes what it wrote (unless told not to), on a thread of its own.

    Writes are gathered into batches of about ``_COPY`` bytes; the file write and the
    SHA-256 release the GIL, so they run alongside encryption. At most two batches
    wait; ``flush()`` waits for all and raises the first write error.
    """

    def __init__(self, f: Any, *, hashing: bool = True) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0
        self._hashing = hashing
        self._parts: list[bytes] = []
        self._size = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pli-write")
        self._inflight: deque[Future[None]] = deque()

    def write(self, data: bytes) -> int:
        item = data if type(data) is bytes else bytes(data)
        self._parts.append(item)
        self._size += len(item)
        self.n += len(item)
        if self._size >= _COPY:
            self._submit()
        return len(item)

    def _submit(self) -> None:
        if self._parts:
            self._inflight.append(self._pool.submit(self._write_out, self._parts))
            self._parts, self._size = [], 0
        while len(self._inflight) > 2:
            self._inflight.popleft().result()

    def _write_out(self, parts: list[bytes]) -> None:
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.f.write(data)
        if self._hashing:
            self.h.update(data)

    def flush(self) -> None:
        self._submit()
        while self._inflight:
            self._inflight.popleft().result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for f in self._inflight:
                f.cancel()
            self._pool.shutdown(wait=True)


def _encrypt_bundle(
    path: Path,
    recipients: list[age.X25519Recipient],
    manifest: bytes,
    sig: bytes,
    files: list[tuple[FileEntry, Path]],
) -> tuple[int, bytes]:
    # The tar (reading and re-hashing each file) is written on one thread; this one
    # encrypts it (sealing chunks on age's worker thread), hashes and writes the result.
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as raw:
        out = _HashingWriter(raw)
        handles = [(e, p.open("rb")) for e, p in files]
        channel = _Channel()
        producer = _produce(channel, lambda: write_bundle(channel, manifest, sig, handles))
        try:
            age.encrypt_stream(channel, out, recipients)
            out.flush()
        finally:
            channel.cancel()
            producer.join()
            out.close()
            for _, h in handles:
                h.close()
        raw.flush()
        os.fsync(raw.fileno())
    tmp.replace(path)
    return out.n, out.h.digest()


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


class _HashingReader:
    def __init__(self, f: Any) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.f.read(n)
        self.h.update(data)
        self.n += len(data)
        return data


def _decrypt_bundle(
    home: Home, keys: DeviceKeys, signed: SignedHeader, header: EnvelopeHeader,
    sender: DevicePublic, age_path: Path,
) -> _Opened:
    staging = home.cases / f".incoming-{header.id.hex()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "files").mkdir(parents=True)
    try:
        with age_path.open("rb") as raw:
            src = _HashingReader(raw)
            # Decryption (reading and hashing the ciphertext, chunks opened on age's
            # worker thread) feeds this thread, which checks and writes the files.
            decrypting = age.DecryptReader(src, [keys.identity])
            channel = _Channel()
            producer = _produce(channel, lambda: decrypting._copy_to(channel))  # noqa: SLF001
            try:
                reader = BundleReader(channel, sender=sender, envelope=header, me=keys.device_id)
                for entry, stream in reader.files():
                    with (staging / "files" / entry.name).open("xb") as out:
                        writer = _HashingWriter(out, hashing=False)  # writes overlap the reading
                        try:
                            while chunk := stream.read(_PIECE):
                                writer.write(chunk)
                            writer.flush()
                        finally:
                            writer.close()
                reader.finish()
            finally:
                channel.cancel()
                producer.join()
            if src.n != header.size or not hmac.compare_digest(src.h.digest(), header.sha256):
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
