"""The relay's endpoints (SPEC.md §7). Thin: fetch bytes, hand them to a protocol
checker, persist only what it accepted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
from dataclasses import replace
from typing import Any

import nacl.signing
import structlog
from aiohttp import web

from protocol import codec
from protocol.envelope import EnvelopeHeader, SignedHeader, split_prefix
from protocol.errors import AuthError, DecodeError, LimitError
from protocol.ids import check_rpps
from protocol.keys import DevicePublic, fingerprint
from protocol.logentry import EntryType, LogEntry
from relay.app import (
    BLOBS,
    CLOCK,
    CONFIG,
    DEVICE,
    DIGEST,
    LIMITS,
    LOG,
    LOG_FIELDS,
    NONCE,
    STORAGE,
    UPLOAD_HASHES,
    UPLOAD_LOCKS,
    UploadSlot,
    spend_nonce,
    verify_header,
)
from relay.blobs import Upload, range_bounds
from relay.config import MAX_INBOX_WAIT
from relay.errors import RelayError, not_found
from relay.limits import BodyReader, BodyTimeout, client_address
from relay.log import Skip, Together, device_subject, receipt_json
from relay.logroutes import add_log_routes
from relay.metrics import METRICS
from relay.openapi import add_openapi_route
from relay.storage import Device, EnvelopeRow, Practitioner, Tx

__all__ = ["ENVELOPE_TYPE", "add_routes", "purge_once"]

log = structlog.get_logger("pli.relay")

ENVELOPE_TYPE = "application/vnd.pli.envelope"
MSGPACK_TYPE = "application/msgpack"
MAX_ENROLL = 4096
_STALE_UPLOAD = 7 * 86400
_MAX_RUNNING_HASHES = 10_000  # beyond, uploads in progress are re-read at their end
#: an envelope of at most this many bytes of ciphertext, sent whole in one request, is kept
#: in its database row (answers, statements, short requests): one commit makes it durable
INLINE_MAX = 64 << 10
_HEX_ID = re.compile(r"[0-9a-f]{32}")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", health, name="health")
    app.router.add_post("/v1/enroll", enroll, name="enroll")
    app.router.add_get("/v1/directory/{rpps}", directory, name="directory")
    app.router.add_get("/v1/devices/{device_id}", device_info, name="device")
    app.router.add_get("/v1/inbox", inbox, name="inbox")
    app.router.add_put("/v1/envelopes/{id}", put_envelope, name="put_envelope")
    app.router.add_patch("/v1/envelopes/{id}", patch_envelope, name="patch_envelope")
    app.router.add_get("/v1/envelopes/{id}", get_envelope, name="get_envelope", allow_head=False)
    app.router.add_get("/v1/envelopes/{id}/status", envelope_status, name="envelope_status")
    app.router.add_post("/v1/envelopes/{id}/ack", ack_envelope, name="ack_envelope")
    app.router.add_post("/v1/envelopes/{id}/read", read_envelope, name="read_envelope")
    app.router.add_post("/v1/envelopes/{id}/answered", answered_envelope, name="answered_envelope")
    app.router.add_get("/v1/envelopes/{id}/receipts", envelope_receipts, name="envelope_receipts")
    add_log_routes(app)
    add_openapi_route(app)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _hex_id(text: str, what: str = "id") -> bytes:
    # Exactly 32 lowercase hex digits (SPEC.md conventions): bytes.fromhex alone would also
    # take upper case and skip white space ("%20%20" in a URL), giving ids of 15 bytes.
    if _HEX_ID.fullmatch(text) is None:
        raise DecodeError(f"{what} must be 32 lowercase hex digits")
    return bytes.fromhex(text)


def _require_type(request: web.Request, expected: str) -> None:
    if request.content_type != expected:
        raise RelayError(
            "unsupported_media_type", 415, f"expected Content-Type {expected}, got {request.content_type}"
        )


def _check_length(request: web.Request, limit: int) -> None:
    declared = request.content_length
    if declared is not None and declared > limit:
        raise LimitError(f"request body of {declared} bytes is over the {limit}-byte limit")


async def _small_body(request: web.Request, limit: int) -> bytes:
    """Read a small body whole, refusing it from its declared length or when it lies."""
    _check_length(request, limit)
    data = bytearray()
    reader = BodyReader(request, request.app[CONFIG])
    while chunk := await reader.read():
        data += chunk
        if len(data) > limit:
            raise LimitError(f"request body over the {limit}-byte limit")
    body = bytes(data)
    digest = request.get(DIGEST)
    if digest is not None and not hmac.compare_digest(hashlib.sha256(body).digest(), digest):
        raise RelayError("digest_mismatch", 400, "the body does not match its Content-Digest")
    return body


def _device_json(d: Device) -> dict[str, Any]:
    pub = DevicePublic.from_record({"sign_key": d.sign_key, "cert": d.cert, "sig": d.sig})
    return {
        "device_id": d.device_id.hex(),
        "sign_key": _b64(d.sign_key),
        "cert": _b64(d.cert),
        "sig": _b64(d.sig),
        "fingerprint": fingerprint(pub.sign_key, pub.enc_key),
    }


# -- public ------------------------------------------------------------------------------


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def enroll(request: web.Request) -> web.Response:
    # Wrong codes are counted per client address; past the limit, no code is even looked at.
    with request.app[LIMITS].enrolments.attempt(client_address(request)):
        return await _enroll(request)


async def _enroll(request: web.Request) -> web.Response:
    _require_type(request, MSGPACK_TYPE)
    body = await _small_body(request, MAX_ENROLL)
    r = codec.MapReader(codec.decode(body, limits=codec.Limits(max_size=MAX_ENROLL)), "enrolment")
    codec.expect_version(r, (1,))
    code = r.str_("code", max_len=64)
    device = DevicePublic.from_record(r.raw("device"))
    r.done()
    storage = request.app[STORAGE]
    found: list[Practitioner] = []

    async def action(tx: Tx) -> None:
        found.append(await storage.enroll(
            code, device_id=device.device_id, sign_key=device.sign_key, cert=device.cert,
            sig=device.sig, now=request.app[CLOCK](), tx=tx,
        ))

    def entry(now: int) -> LogEntry:
        # The directory is in the log: a key the relay adds for someone is there for all to see.
        return LogEntry(type=EntryType.DEVICE_ENROLLED, time=now, device_id=device.device_id,
                        rpps=found[0].rpps, record_hash=hashlib.sha256(device.to_bytes()).digest())

    # Indexed under the device id, so GET /v1/devices/{id} finds its enrolment receipt.
    appended = await request.app[LOG].append(entry, action, envelope_id=device_subject(device.device_id))
    p = found[0]
    log.info("device_enrolled", device=device.device_id.hex())
    return web.json_response(
        {
            "device_id": device.device_id.hex(),
            "rpps": p.rpps,
            "name": p.name,
            "profession": p.profession,
            "specialty": p.specialty,
            "log_vkey": request.app[LOG].verifier.vkey,
            "log_origin": request.app[LOG].origin,
            "receipt": request.app[LOG].receipt(appended),
        },
        status=201,
    )


# -- directory ---------------------------------------------------------------------------


async def directory(request: web.Request) -> web.Response:
    rpps = check_rpps(request.match_info["rpps"])
    storage = request.app[STORAGE]
    p = await storage.practitioner(rpps)
    if p is None:
        raise not_found("no practitioner with this RPPS number on this relay")
    devices = await storage.devices_of(rpps)
    tlog = request.app[LOG]
    size, checkpoint = await tlog.checkpoint()
    out = []
    for d in devices:
        # Each device with the proof that its enrolment is in the log, so a client keeps
        # evidence of every key it encrypted to (SPEC.md §11).
        receipts = [receipt_json(i, leaf, await tlog.tlog_proof(i, size=size, checkpoint=checkpoint))
                    for i, leaf in await tlog.device_leaves(d.device_id)]
        out.append({**_device_json(d), "receipts": receipts})
    return web.json_response(
        {"rpps": p.rpps, "name": p.name, "profession": p.profession, "specialty": p.specialty, "devices": out}
    )


async def device_info(request: web.Request) -> web.Response:
    device_id = _hex_id(request.match_info["device_id"], "device id")
    storage = request.app[STORAGE]
    d = await storage.device(device_id)
    if d is None:
        raise not_found("no such device")
    p = await storage.practitioner(d.rpps)
    receipts = []
    for index, leaf in await request.app[LOG].device_leaves(device_id):
        receipts.append(receipt_json(index, leaf, await request.app[LOG].tlog_proof(index)))
    return web.json_response(
        {**_device_json(d), "rpps": d.rpps, "name": p.name if p else "", "revoked": d.revoked is not None,
         "receipts": receipts}
    )


# -- mailbox -----------------------------------------------------------------------------


def _status_json(row: EnvelopeRow) -> dict[str, Any]:
    return {
        "id": row.id.hex(),
        "complete": row.state != "uploading",
        "offset": row.received,
        "size": row.size,
        "envelope_hash": _b64(row.envelope_hash),
        "received_at": row.received_at,
    }


def _wait(request: web.Request) -> int:
    raw = request.query.get("wait", "0")
    if not (raw.isascii() and raw.isdigit()) or (len(raw) > 1 and raw[0] == "0") or int(raw) > MAX_INBOX_WAIT:
        raise DecodeError(f"wait must be a whole number of seconds, 0 to {MAX_INBOX_WAIT}")
    return int(raw)


async def inbox(request: web.Request) -> web.Response:
    device: Device = request[DEVICE]
    await _small_body(request, 0)
    cfg, storage, clock = request.app[CONFIG], request.app[STORAGE], request.app[CLOCK]
    wait = min(_wait(request), cfg.max_inbox_wait)
    if request.app[METRICS].stopping or storage.waiting(device.device_id) >= cfg.max_inbox_waits_per_device:
        # Stopping, or this device holds its share of long polls already (SPEC.md §7.5):
        # the inbox as it is, at once.
        wait = 0
    # Listening before the first read: mail committed in between still wakes this request.
    async with storage.mail_waiter(device.device_id) as mail:
        rows = await storage.inbox(device.device_id, now=clock())
        if not rows and wait > 0:
            # A long poll: answered as soon as mail for this device is committed, on any node.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await mail.wait()
            rows = await storage.inbox(device.device_id, now=clock())
    return web.json_response(
        {
            "envelopes": [
                {
                    "id": row.id.hex(),
                    "from": row.sender.hex(),
                    "from_rpps": rpps,
                    "size": row.size,
                    "created": row.created,
                    "expires": row.expires,
                    "received_at": row.received_at,
                    "envelope_hash": _b64(row.envelope_hash),
                }
                for row, rpps in rows
            ]
        }
    )


async def _visible(request: web.Request, envelope_id: bytes) -> tuple[EnvelopeRow, dict[bytes, int | None]]:
    """The envelope if this device sent it or is a recipient; 404 otherwise, so ids cannot be probed."""
    device: Device = request[DEVICE]
    storage = request.app[STORAGE]
    row = await storage.envelope(envelope_id)
    if row is None:
        raise not_found("no such envelope")
    recipients = await storage.recipients(envelope_id)
    if row.sender != device.device_id and device.device_id not in recipients:
        raise not_found("no such envelope")
    return row, recipients


async def envelope_status(request: web.Request) -> web.Response:
    await _small_body(request, 0)
    row, _ = await _visible(request, _hex_id(request.match_info["id"]))
    receipt = await _existing_receipt(request.app, row.id, EntryType.SUBMITTED) if row.state != "uploading" else None
    return web.json_response({**_status_json(row), "receipt": receipt})


async def get_envelope(request: web.Request) -> web.StreamResponse:
    await _small_body(request, 0)
    row, _ = await _visible(request, _hex_id(request.match_info["id"]))
    device: Device = request[DEVICE]
    if row.state != "stored" or row.expires <= request.app[CLOCK]():
        if row.state == "uploading" and row.sender == device.device_id:
            raise RelayError("not_found", 404, "this envelope's upload is not complete")
        raise not_found("no such envelope")
    # Only a small envelope can be in its row: a large one's download reads no more.
    inline = await request.app[STORAGE].inline_blob(row.id) if row.size <= INLINE_MAX else None
    if inline is not None:
        _check_range(request, len(inline))
        return _bytes_response(request, inline)
    blobs = request.app[BLOBS]
    size = await blobs.size(row.id)
    if size is None:
        raise not_found("no such envelope")
    _check_range(request, size)
    return await blobs.response(request, row.id, ENVELOPE_TYPE)


def _bytes_response(request: web.Request, data: bytes) -> web.Response:
    """A small envelope kept in its row, whole or the Range asked for (checked already)."""
    start, stop, partial = range_bounds(request, len(data))
    if not partial:
        return web.Response(body=data, headers={"Content-Type": ENVELOPE_TYPE, "Accept-Ranges": "bytes"})
    return web.Response(body=data[start:stop], status=206, headers={
        "Content-Type": ENVELOPE_TYPE, "Accept-Ranges": "bytes",
        "Content-Range": f"bytes {start}-{stop - 1}/{len(data)}"})


def _check_range(request: web.Request, size: int) -> None:
    """Refuse a Range the envelope cannot satisfy as problem+json (FileResponse would send
    a bare 416 with the envelope's Content-Type and no body; the blob stores serve the rest)."""
    if "Range" not in request.headers:
        return
    try:
        rng = request.http_range
    except ValueError as e:
        raise RelayError("malformed", 416, "the Range header is not a byte range this relay serves") from e
    if rng.start is not None and rng.start >= size:
        raise RelayError("malformed", 416, f"the envelope has {size} bytes; the range starts past its end")


async def ack_envelope(request: web.Request) -> web.Response:
    await _small_body(request, 0)
    envelope_id = _hex_id(request.match_info["id"])
    row, recipients = await _visible(request, envelope_id)
    device: Device = request[DEVICE]
    if device.device_id not in recipients:
        raise RelayError("forbidden", 403, "only a recipient device acknowledges an envelope")
    if row.state == "uploading":
        raise not_found("no such envelope")
    app = request.app
    now = app[CLOCK]()
    state: list[bool] = []

    async def action(tx: Tx) -> None:
        done = await app[STORAGE].acknowledge(envelope_id, device.device_id, now=now, tx=tx)
        if done is None:
            raise Skip  # acknowledged before: the delivery is already in the log
        state.append(done)

    def entry(t: int) -> LogEntry:
        return LogEntry(type=EntryType.DELIVERED, time=t, envelope_id=envelope_id,
                        envelope_hash=row.envelope_hash, device_id=device.device_id)

    receipt: dict[str, object] | None
    try:
        receipt = app[LOG].receipt(await app[LOG].append(entry, action, envelope_id=envelope_id))
    except Skip:
        receipt = await _existing_receipt(app, envelope_id, EntryType.DELIVERED, device.device_id)
    deleted = False
    if state and state[0]:
        app[LIMITS].quota.forget(row.sender)  # its bytes no longer count against the sender
    if state and state[0] and app[CONFIG].ack_retention == 0 and row.state == "stored":
        await _delete(app, [envelope_id])
        deleted = True
    return web.json_response(
        {"id": envelope_id.hex(), "acknowledged": True, "deleted": deleted, "receipt": receipt}
    )


async def _existing_receipt(
    app: web.Application, envelope_id: bytes, kind: EntryType, device_id: bytes | None = None
) -> dict[str, object] | None:
    for index, leaf in await app[LOG].leaves_of(envelope_id):
        e = LogEntry.from_bytes(leaf)
        if e.type == kind and (device_id is None or e.device_id == device_id):
            return receipt_json(index, leaf, await app[LOG].tlog_proof(index))
    return None


async def _statement(request: web.Request) -> dict[str, Any]:
    body = await _small_body(request, 4096)
    _require_type(request, "application/json")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise DecodeError("the body is not JSON") from e
    if not isinstance(data, dict):
        raise DecodeError("the body must be a JSON object")
    return data


def _field_int(data: dict[str, Any], key: str) -> int:
    v = data.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
        raise DecodeError(f"{key} must be a whole number of seconds")
    return v


def _field_sig(data: dict[str, Any]) -> bytes:
    try:
        sig = base64.b64decode(str(data.get("signature", "")), validate=True)
    except ValueError as e:
        raise DecodeError("signature must be base64") from e
    if len(sig) != 64:
        raise DecodeError("signature must be 64 bytes")
    return sig


async def _recipient_act(request: web.Request, what: str) -> tuple[bytes, dict[str, Any], EnvelopeRow, Device]:
    """The statement, and the envelope it is about: complete, and addressed to this device."""
    envelope_id = _hex_id(request.match_info["id"])
    data = await _statement(request)
    row, recipients = await _visible(request, envelope_id)
    device: Device = request[DEVICE]
    if device.device_id not in recipients:
        raise RelayError("forbidden", 403, f"only a recipient device {what} an envelope")
    if row.state == "uploading":
        raise not_found("no such envelope")
    return envelope_id, data, row, device


async def read_envelope(request: web.Request) -> web.Response:
    """A recipient device says, with its signature, that it opened the envelope (SPEC.md §11.3)."""
    envelope_id, data, row, device = await _recipient_act(request, "reads")
    entry = LogEntry(type=EntryType.READ, time=0, envelope_id=envelope_id, envelope_hash=row.envelope_hash,
                     device_id=device.device_id, act_time=_field_int(data, "read_at"),
                     signature=_field_sig(data))
    entry.verify_act(nacl.signing.VerifyKey(device.sign_key))
    return await _log_act(request, entry)


async def answered_envelope(request: web.Request) -> web.Response:
    """A recipient device says, with its signature, which of its envelopes answers this one."""
    envelope_id, data, row, device = await _recipient_act(request, "answers")
    answer = await request.app[STORAGE].envelope(_hex_id(str(data.get("answer", "")), "answer"))
    if answer is None or answer.sender != device.device_id or answer.state == "uploading":
        raise not_found("no such answer envelope sent by this device")
    entry = LogEntry(type=EntryType.ANSWERED, time=0, envelope_id=envelope_id, envelope_hash=row.envelope_hash,
                     answer_hash=answer.envelope_hash, device_id=device.device_id,
                     act_time=_field_int(data, "answered_at"), signature=_field_sig(data))
    entry.verify_act(nacl.signing.VerifyKey(device.sign_key))
    return await _log_act(request, entry)


async def _log_act(request: web.Request, signed: LogEntry) -> web.Response:
    """Log a practitioner's signed act once; asking again returns the same receipt."""
    app = request.app

    async def action(tx: Tx) -> None:
        for data in await app[STORAGE].logged_acts(tx, signed.envelope_id, int(signed.type)):
            if LogEntry.from_bytes(data).device_id == signed.device_id:
                raise Skip

    try:
        appended = await app[LOG].append(lambda now: replace(signed, time=now), action,
                                         envelope_id=signed.envelope_id)
        return web.json_response({"receipt": app[LOG].receipt(appended)}, status=201)
    except Skip:
        receipt = await _existing_receipt(app, signed.envelope_id, signed.type, signed.device_id)
        return web.json_response({"receipt": receipt}, status=200)


async def envelope_receipts(request: web.Request) -> web.Response:
    """Every logged fact about an envelope, with proofs against the latest checkpoint.

    For its sender and recipients only, and kept after the ciphertext is deleted: this is
    how read and answered receipts travel back to the sender.
    """
    await _small_body(request, 0)
    envelope_id = _hex_id(request.match_info["id"])
    await _visible(request, envelope_id)
    tlog = request.app[LOG]
    size, checkpoint = await tlog.checkpoint()
    receipts = [
        receipt_json(index, leaf, await tlog.tlog_proof(index, size=size, checkpoint=checkpoint))
        for index, leaf in await tlog.leaves_of(envelope_id)
    ]
    return web.json_response({"id": envelope_id.hex(), "receipts": receipts})


async def _delete(app: web.Application, ids: list[bytes]) -> None:
    # Mark first, then unlink: a crash in between leaves an orphan file that the
    # startup sweep removes, never a row that points to a missing blob.
    await app[STORAGE].mark_deleted(ids)
    for envelope_id in ids:
        await app[BLOBS].delete(envelope_id)


async def purge_once(app: web.Application) -> None:
    cfg = app[CONFIG]
    now = app[CLOCK]()
    storage = app[STORAGE]
    ids = await storage.purgeable(now=now, ack_retention=cfg.ack_retention, stale_upload=_STALE_UPLOAD)
    await _delete(app, ids)
    if ids and LIMITS in app:  # (pli-relay purge runs without the serving limits)
        app[LIMITS].quota.forget()
    nonces = await storage.purge_nonces(now=now)
    if ids or nonces:
        log.info("purged", envelopes=len(ids), nonces=nonces)


# -- upload ------------------------------------------------------------------------------


class _Body:
    """Streams a request body, counting against the limit and hashing for Content-Digest.
    (Hashing in a thread, overlapped with receiving, was measured slower here: the GIL
    hand-offs cost more than the overlap gains on two cores shared with the client.)"""

    def __init__(self, request: web.Request, limit: int) -> None:
        _check_length(request, limit)
        self._reader = BodyReader(request, request.app[CONFIG])
        self._limit = limit
        self.count = 0
        self.hash = hashlib.sha256()
        self.cut = False  # the client went away, or stalled, before the body's end

    def share_hash(self, running: Any) -> bool:
        """Hash the body with ``running`` (a hash of nothing yet), when the body is exactly
        the bytes it will hash: a PATCH from ciphertext offset 0 is then hashed once, not
        once for its Content-Digest and again for the header's SHA-256."""
        if self.count:
            return False
        self.hash = running
        return True

    async def chunk(self) -> bytes:
        try:
            data = await self._reader.read()
        except (ConnectionError, BodyTimeout, asyncio.CancelledError):
            # Gone: a reset, a stall, or (aiohttp's handler_cancellation, a stop) cancelled.
            self.cut = True
            raise
        self.count += len(data)
        if self.count > self._limit:
            raise LimitError(f"request body over the {self._limit}-byte limit")
        self.hash.update(data)
        return data


def _check_header(request: web.Request, header: EnvelopeHeader, envelope_id: bytes) -> None:
    cfg = request.app[CONFIG]
    now = request.app[CLOCK]()
    if header.id != envelope_id:
        raise DecodeError("the envelope header names another id than the URL")
    if abs(header.created - now) > cfg.max_created_skew:
        raise RelayError("expired", 400, "the envelope's creation time is too far from the relay's clock")
    if header.expires <= now or header.expires - header.created > cfg.max_lifetime:
        raise RelayError("expired", 400, "the envelope's expiry is in the past or too far away")
    if header.size > cfg.max_envelope:
        raise LimitError(f"envelope of {header.size} bytes is over the {cfg.max_envelope}-byte limit")


def _check_recipients(header: EnvelopeHeader, devices: dict[bytes, Device | None]) -> None:
    for device_id in header.to:
        d = devices.get(device_id)
        if d is None or d.revoked is not None:
            raise RelayError(
                "unknown_recipient", 400, f"recipient device {device_id.hex()} is unknown or revoked"
            )


async def put_envelope(request: web.Request) -> web.Response:
    with request.app[LIMITS].uploads.hold(request[DEVICE].device_id):
        return await _put_envelope(request)


async def _put_envelope(request: web.Request) -> web.Response:
    _require_type(request, ENVELOPE_TYPE)
    envelope_id = _hex_id(request.match_info["id"])
    device: Device = request[DEVICE]
    body = _Body(request, request.app[CONFIG].max_request)
    buf = bytearray()
    # split_prefix answers once MAX_PREFIX bytes are in (or refuses earlier), so the
    # buffer never holds more than MAX_PREFIX plus one network chunk.
    while (split := split_prefix(buf)) is None:
        chunk = await body.chunk()
        if not chunk:
            raise DecodeError("the body ends before the envelope header does")
        buf += chunk
    signed, used = split
    header = await verify_header(request.app, signed, device.sign_key)
    _check_header(request, header, envelope_id)
    async with _upload_lock(request.app, envelope_id):
        row, recipients = await request.app[STORAGE].envelope_and_devices(envelope_id, header.to)
        if row is not None and (row.prefix != signed.prefix or row.sender != device.device_id):
            raise RelayError("envelope_conflict", 409, "this envelope id is taken by other content")
        if row is None:
            _check_recipients(header, recipients)
            if header.size > INLINE_MAX:
                # Its bytes go to the blob store as they come: the nonce is recorded first. A
                # small one's is recorded with the envelope, in the log's transaction.
                await spend_nonce(request)
            reserved = await _check_quota(request, header)
            try:
                return await _receive(request, body, signed, header, row, bytes(buf[used:]), start=0)
            finally:
                request.app[LIMITS].quota.settle(reserved)
        await spend_nonce(request)  # a resumed or repeated upload: its nonce before anything else
        return await _receive(request, body, signed, header, row, bytes(buf[used:]), start=0)


async def _check_quota(request: web.Request, header: EnvelopeHeader) -> list[float]:
    """A new envelope must fit in its sender's quota of bytes not yet acknowledged. No
    Retry-After: room comes back when recipients acknowledge, which no clock predicts."""
    quota = request.app[CONFIG].device_quota
    usage = request.app[LIMITS].quota
    used = usage.get(header.sender)
    if used is None:
        began = usage.began()
        read = await request.app[STORAGE].unacknowledged_bytes(header.sender, now=request.app[CLOCK]())
        usage.set(header.sender, read, began)
        used = usage.get(header.sender)
        assert used is not None
    if used + header.size > quota:
        raise RelayError(
            "quota_exceeded", 413,
            f"this device has {used} bytes on the relay not yet acknowledged by their recipients; "
            f"{header.size} more would pass its quota of {quota} bytes",
        )
    return usage.reserve(header.sender, header.size)


async def patch_envelope(request: web.Request) -> web.Response:
    with request.app[LIMITS].uploads.hold(request[DEVICE].device_id):
        return await _patch_envelope(request)


async def _patch_envelope(request: web.Request) -> web.Response:
    _require_type(request, "application/octet-stream")
    envelope_id = _hex_id(request.match_info["id"])
    device: Device = request[DEVICE]
    raw_offset = request.query.get("offset", "")
    if not (raw_offset.isascii() and raw_offset.isdigit()) or (len(raw_offset) > 1 and raw_offset[0] == "0") \
            or len(raw_offset) > 19:
        raise DecodeError("offset must be a whole number of bytes (decimal, no sign or leading zero)")
    offset = int(raw_offset)
    async with _upload_lock(request.app, envelope_id):
        row = await request.app[STORAGE].envelope(envelope_id)
        if row is None or row.sender != device.device_id:
            _check_length(request, request.app[CONFIG].max_request)
            raise not_found("no such upload")
        # A PATCH may carry the whole rest of the ciphertext (SPEC 7.4): one request, one
        # fsync, at the network's pace; a cut one keeps what arrived and is resumed.
        body = _Body(request, max(request.app[CONFIG].max_request, row.size - offset))
        signed, _ = split_prefix(row.prefix) or (None, 0)
        assert signed is not None  # stored prefixes were split before
        header = EnvelopeHeader.from_bytes(signed.raw)
        if offset != row.received and row.state == "uploading":
            raise RelayError(
                "offset_mismatch", 409, f"the relay holds {row.received} bytes, not {offset}",
                offset=row.received,
            )
        return await _receive(request, body, signed, header, row, b"", start=offset)


class _UploadLock:
    """Serialises the requests on one envelope id: in this process (an asyncio lock), then
    on every node (the storage's envelope lock, on PostgreSQL). The slot is dropped only
    when no request holds or awaits it: dropping it while one still waits would let a
    newcomer create a second lock and write the same part file concurrently."""

    def __init__(self, app: web.Application, envelope_id: bytes) -> None:
        self._locks = app[UPLOAD_LOCKS]
        self._storage = app[STORAGE]
        self._id = envelope_id
        self._slot = self._locks.setdefault(envelope_id, UploadSlot())
        self._held = contextlib.AsyncExitStack()

    async def __aenter__(self) -> None:
        self._slot.users += 1
        try:
            await self._slot.lock.acquire()
        except BaseException:
            self._leave()
            raise
        try:
            await self._held.enter_async_context(self._storage.envelope_lock(self._id))
        except BaseException:
            self._slot.lock.release()
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._held.aclose()
        finally:
            self._slot.lock.release()
            self._leave()

    def _leave(self) -> None:
        self._slot.users -= 1
        if self._slot.users == 0 and self._locks.get(self._id) is self._slot:
            del self._locks[self._id]


def _upload_lock(app: web.Application, envelope_id: bytes) -> _UploadLock:
    return _UploadLock(app, envelope_id)


async def _receive(  # noqa: C901, PLR0912, PLR0915 - one upload state machine, kept in one place
    request: web.Request,
    body: _Body,
    signed: SignedHeader,
    header: EnvelopeHeader,
    row: EnvelopeRow | None,
    first: bytes,
    *,
    start: int,
) -> web.Response:
    """Write ciphertext bytes that begin at ciphertext offset ``start``; complete if all arrived.

    Bytes the relay already holds are skipped (a retry), bytes past ``header.size``
    are refused; nothing is recorded unless the whole body matches its Content-Digest.
    """
    app = request.app
    storage, blobs, now = app[STORAGE], app[BLOBS], app[CLOCK]()
    held = row.received if row is not None else 0
    if row is not None and row.state != "uploading":
        while await body.chunk():
            pass
        _check_digest(request, body)
        receipt = await _existing_receipt(app, row.id, EntryType.SUBMITTED)
        return web.json_response({**_status_json(row), "receipt": receipt}, status=200)
    prefix = signed.prefix
    part_exists = row is not None and await blobs.has_part(header.id)
    if row is not None and not part_exists and held:
        # The partial blob was lost (a crash before its fsync): start again from 0 (unless
        # the row moved meanwhile: then it is not this request's to reset).
        if await storage.set_received(header.id, 0, held=held, complete=False, now=now):
            raise RelayError("offset_mismatch", 409, "the relay holds 0 bytes of this upload", offset=0)
        raise _raced()
    # A small new envelope is kept in memory until its request ends: whole, it goes into its
    # row (no file to write and fsync); cut short, into the blob store as any upload part.
    kept = bytearray() if row is None and start == 0 and header.size <= INLINE_MAX else None
    upload = None if kept is not None else await blobs.open_upload(
        header.id, prefix, new=row is None or not part_exists)
    # The ciphertext is hashed as it streams, across the requests of an upload (kept in
    # memory between them); after a restart or an error the part is re-read at the end.
    running = app[UPLOAD_HASHES]
    resumed = running.pop(header.id, None)
    if row is None:
        ct_hash = hashlib.sha256() if start == 0 else None
    else:
        ct_hash = resumed[1] if resumed is not None and resumed[0] == held else None
    # A body that is the ciphertext from its first byte is hashed once, for both checks.
    shared = ct_hash is not None and start == held == 0 and not first and body.share_hash(ct_hash)
    pos = start
    body_ok = False  # the request's bytes matched their Content-Digest
    try:
        data = first
        while True:
            if data:
                end = pos + len(data)
                if end > header.size:
                    raise DecodeError("more ciphertext than the envelope header's size")  # noqa: TRY301
                if end > held:
                    skip = max(0, held - pos)
                    if upload is None:
                        assert kept is not None
                        kept += memoryview(data)[skip:]
                    else:
                        await upload.write(len(prefix) + pos + skip, memoryview(data)[skip:])
                    if ct_hash is not None and not shared:
                        ct_hash.update(memoryview(data)[skip:])
                pos = end
            data = await body.chunk()
            if not data:
                break
        pos = max(pos, held)  # a retry that sent less than the relay holds
        _check_digest(request, body)
        body_ok = True
        complete = pos == header.size
        if upload is None and not complete:
            assert kept is not None
            upload = await blobs.open_upload(header.id, prefix, new=True)
            await upload.write(len(prefix), memoryview(kept))
        if upload is None:
            assert ct_hash is not None
            _check_ciphertext_hash(ct_hash.digest(), header)
        elif complete:
            if ct_hash is None:
                await upload.sync()  # every byte in the store, where it is re-read
            digest = ct_hash.digest() if ct_hash is not None else await blobs.part_sha256(header.id, len(prefix))
            _check_ciphertext_hash(digest, header)
            await upload.commit()
        else:
            await upload.sync()
            if ct_hash is not None and len(running) < _MAX_RUNNING_HASHES:
                running[header.id] = (pos, ct_hash)
    except BaseException as e:
        # The client went away mid-body (as with IETF resumable uploads, what arrived is
        # kept): the bytes are made durable and counted, the upload resumes from there.
        # Their Content-Digest could not be checked; the header's SHA-256, over the whole
        # ciphertext and signed by the device, is checked at the end.
        if body.cut and row is not None and upload is not None and pos > held \
                and await _keep_cut(app, upload, header, pos=pos, held=held, ct_hash=ct_hash, now=now):
            await upload.close()
            raise
        if upload is not None:
            await upload.close()
        if row is None:
            # Nothing committed yet, and the envelope lock held: the part is this request's.
            await blobs.delete(header.id)
        elif isinstance(e, RelayError) and e.code == "digest_mismatch" and body_ok and pos == header.size:
            # The whole ciphertext is wrong somewhere: nothing can be resumed, discard it.
            # (A body damaged in transit, refused by its Content-Digest, only loses its own bytes.)
            await storage.discard_upload(header.id)
            app[LIMITS].quota.forget(header.sender)
            await blobs.delete(header.id)
        else:
            await blobs.truncate(header.id, len(prefix) + held)
        raise
    inline = bytes(kept) if upload is None and kept is not None else None
    if upload is not None:
        await upload.close()

    claim = request.get(NONCE)
    nonce = None if claim is None or claim.spent else (claim.device_id, claim.nonce, claim.expires)
    envelope_hash = signed.envelope_hash  # a hash each time it is asked for: asked once

    async def record(tx: Tx | None = None) -> None:
        if nonce is not None:
            # The request's nonce, with what it writes (relay.app.NonceClaim): in the log's
            # transaction, or on its own before the row of an upload left incomplete.
            if tx is None:
                await spend_nonce(request)
            elif not await storage.record_nonce(tx, *nonce):
                raise AuthError("this request was already received (replay)", code="replayed_request")
        if row is None:
            done = await storage.create_envelope(
                envelope_id=header.id, sender=header.sender, prefix=prefix,
                envelope_hash=envelope_hash, size=header.size, created=header.created,
                expires=header.expires, to=header.to, received=pos, now=now, inline=inline, tx=tx,
            )
        else:
            done = await storage.set_received(header.id, pos, held=held, complete=complete, now=now, tx=tx)
        if not done:
            raise _Raced  # the row is not as this request saw it: another request's work
        if complete and tx is not None:
            await storage.notify_mail(tx, header.to)  # wakes waiting inboxes, on every node

    receipt = None
    if complete:
        # Stored and logged in one transaction: the answer carries the receipt, with the
        # device's signature in the leaf and the batch's signed checkpoint.
        def entry(t: int) -> LogEntry:
            return LogEntry(type=EntryType.SUBMITTED, time=t, envelope_id=header.id,
                            envelope_hash=envelope_hash, device_id=header.sender,
                            signature=signed.signature)

        # A new envelope whole in this request (the usual small one) is written with the
        # other new envelopes of its batch, a few statements for them all.
        together = None if row is not None else Together(storage.envelopes_steps, {
            "envelope_id": header.id, "sender": header.sender, "prefix": prefix,
            "envelope_hash": envelope_hash, "size": header.size, "created": header.created,
            "expires": header.expires, "to": header.to, "received": pos, "now": now, "inline": inline,
            "nonce": nonce})
        try:
            appended = await app[LOG].append(entry, record, envelope_id=header.id, together=together)
            if claim is not None and nonce is not None:
                claim.spent = True  # committed with the envelope (both ways of writing it record it)
        except _Raced:
            return await _after_race(request, header.id, prefix)
        except Exception:
            # Not logged, so not stored: no blob under its final name. An upload begun in
            # earlier requests keeps its bytes as a part (its row still says uploading) and
            # resumes; a single-request one leaves nothing. (Not on cancellation: a caller
            # gone mid-batch still has its leaf logged, and its blob must stay.)
            if row is None:
                await _forget_new(app, header.id)
            elif (current := await storage.envelope(header.id)) is None or current.state != "stored":
                await blobs.uncommit(header.id)  # never a blob whose row says stored (logged)
            raise
        receipt = app[LOG].receipt(appended)
        # On the request's one log line (relay.app.problem_middleware), which names no id
        # (the leaf names the envelope, in the log): a line of its own cost as much as the
        # rest of the answer.
        request[LOG_FIELDS] = {"size": header.size, "recipients": len(header.to), "leaf": appended.index}
    else:
        try:
            await record()
        except _Raced:
            return await _after_race(request, header.id, prefix)
        except Exception:
            # The row did not move: neither do the bytes (a new upload leaves nothing). (Not
            # on cancellation: the transaction may have committed all the same.)
            if row is None:
                await _forget_new(app, header.id)
            else:
                await blobs.truncate(header.id, len(prefix) + held)
            raise
    # The row as this request wrote it (under the envelope's lock): no need to read it back.
    new_row = EnvelopeRow(id=header.id, sender=header.sender, prefix=prefix, envelope_hash=envelope_hash,
                          size=header.size, created=header.created, expires=header.expires, received=pos,
                          state="stored" if complete else "uploading", received_at=now if complete else None)
    return web.json_response({**_status_json(new_row), "receipt": receipt}, status=201 if complete else 200)


async def _keep_cut(app: web.Application, upload: Upload, header: EnvelopeHeader, *, pos: int, held: int,
                    ct_hash: Any, now: int) -> bool:
    """Make the bytes of a cut request durable and move the upload's offset to them; False
    (the caller then drops them, as for any failed request) if that cannot be done."""
    try:
        await upload.sync()
        if not await app[STORAGE].set_received(header.id, pos, held=held, complete=False, now=now):
            return False
    except Exception as e:  # the client is gone: nothing to answer, the bytes are dropped
        log.warning("upload_cut_not_kept", envelope=header.id.hex(), error=type(e).__name__)
        return False
    running = app[UPLOAD_HASHES]
    if ct_hash is not None and len(running) < _MAX_RUNNING_HASHES:
        running[header.id] = (pos, ct_hash)
    log.info("upload_cut", envelope=header.id.hex(), offset=pos, size=header.size)
    return True


class _Raced(Exception):
    """The envelope's row changed under this request (another request, on another node,
    created or moved it): this request's bytes and row writes are not to be undone."""


def _raced() -> RelayError:
    return RelayError("envelope_conflict", 409, "another request changed this upload meanwhile; "
                      "ask its status (HEAD) and resume", retry_after=1)


async def _forget_new(app: web.Application, envelope_id: bytes) -> None:
    """Remove what a request that found no row wrote, unless a row exists now: then the
    blob (maybe already receipted) belongs to the request that created it."""
    if await app[STORAGE].envelope(envelope_id) is None:
        await app[BLOBS].delete(envelope_id)


async def _after_race(request: web.Request, envelope_id: bytes, prefix: bytes) -> web.Response:
    """Another request created or completed the envelope first: answer as a retry of it
    would be answered (with its receipt), never undoing its work."""
    row = await request.app[STORAGE].envelope(envelope_id)
    if row is None or row.prefix != prefix or row.state == "uploading":
        raise _raced()
    if row.state != "stored":
        raise not_found("no such envelope")
    receipt = await _existing_receipt(request.app, envelope_id, EntryType.SUBMITTED)
    return web.json_response({**_status_json(row), "receipt": receipt}, status=200)


def _check_digest(request: web.Request, body: _Body) -> None:
    if not hmac.compare_digest(body.hash.digest(), request[DIGEST]):
        raise RelayError("digest_mismatch", 400, "the body does not match its Content-Digest")


def _check_ciphertext_hash(digest: bytes, header: EnvelopeHeader) -> None:
    if not hmac.compare_digest(digest, header.sha256):
        raise RelayError("digest_mismatch", 400, "the ciphertext does not match the header's SHA-256")
