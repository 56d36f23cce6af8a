"""Talking to a relay: every request signed (SPEC.md §8), every refusal typed.

The relay is not trusted with anything but routing: this module only moves bytes and
JSON; what those bytes mean is checked by ``protocol`` in ``client.core``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nacl.signing
from yarl import URL

from protocol import codec, httpsig
from protocol.envelope import EnvelopeHeader, split_prefix
from protocol.errors import PliError
from protocol.keys import DeviceKeys

__all__ = ["RelayClient", "RelayProblem", "RelayUnreachable"]

ENVELOPE_TYPE = "application/vnd.pli.envelope"
UPLOAD_CHUNK = 4 << 20  # under the relay's default 8 MiB request limit: a PUT's most, a fallback PATCH's
_READ = 1 << 18

Progress = Callable[[int, int], None]


class RelayProblem(PliError):
    """The relay refused a request; ``code`` is its stable error code (SPEC.md §9)."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(detail, code=code)
        self.status = status
        self.body = body or {}


class RelayUnreachable(PliError):
    code = "relay_unreachable"


def ssl_context() -> ssl.SSLContext | None:
    """Trust the system's CAs, plus a relay certificate named by PLI_CA_FILE (never 'no verify')."""
    cafile = os.environ.get("PLI_CA_FILE")
    if not cafile:
        return None
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile)
    return ctx


class RelayClient:
    """One relay, one device. Use as ``async with RelayClient(url, keys) as relay``."""

    def __init__(self, base_url: str, keys: DeviceKeys | None = None) -> None:
        self.base = URL(base_url.rstrip("/"))
        if self.base.scheme not in {"http", "https"} or not self.base.host:
            raise PliError(f"relay address {base_url!r} is not an http(s) URL", code="bad_url")
        self._keys = keys
        self._signing: nacl.signing.SigningKey | None = keys.signing_key if keys else None
        self._keyid = keys.device_id.hex() if keys else ""
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RelayClient:  # noqa: PYI034 - final class in practice
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context() or True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=120),
            auto_decompress=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use RelayClient in `async with`")
        return self._session

    def _url(self, path: str, query: dict[str, str] | None = None) -> URL:
        url = self.base.with_path(self.base.path.rstrip("/") + path)
        return url.with_query(query) if query else url

    def _sign(self, method: str, url: URL, body: bytes, digest: bytes | None = None) -> dict[str, str]:
        if self._signing is None:
            raise RuntimeError("this client has no device key")
        return httpsig.sign_request(
            method=method,
            authority=httpsig.authority(url.host or "", url.port, url.scheme),
            path=url.raw_path,
            query=url.raw_query_string,
            content_digest=httpsig.content_digest(digest if digest is not None else hashlib.sha256(body).digest()),
            signing_key=self._signing,
            keyid=self._keyid,
            created=int(time.time()),
            nonce=httpsig.encode_nonce(os.urandom(16)),
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        query: dict[str, str] | None = None,
        signed: bool = True,
        ok: tuple[int, ...] = (200, 201),
        digest: bytes | None = None,
        stream: _Stream | None = None,
    ) -> Any:
        """``digest``: the body's SHA-256, when the caller has it already (required with
        ``stream``, a body sent as it is read rather than held in memory)."""
        url = self._url(path, query)
        headers = self._sign(method, url, body, digest) if signed else {}
        if content_type:
            headers["Content-Type"] = content_type
        data: bytes | AsyncIterator[bytes] | None = body or None
        if stream is not None:
            headers["Content-Length"] = str(stream.length)
            data = stream.chunks()
        try:
            async with self.session.request(method, url, data=data, headers=headers) as resp:
                if resp.status not in ok:
                    await _raise_problem(resp)
                return await resp.json()
        except aiohttp.ClientError as e:
            if stream is not None and stream.failed is not None:
                raise stream.failed from e
            raise RelayUnreachable(f"cannot reach the relay at {self.base}: {e}") from e

    # -- endpoints -----------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/healthz", signed=False)
        return result

    async def enroll(self, code: str, device_record: dict[str, bytes]) -> dict[str, Any]:
        body = codec.encode({"v": 1, "code": code, "device": device_record})
        result: dict[str, Any] = await self._request(
            "POST", "/v1/enroll", body=body, content_type="application/msgpack", signed=False
        )
        return result

    async def directory(self, rpps: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", f"/v1/directory/{rpps}")
        return result

    async def device(self, device_id: bytes) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", f"/v1/devices/{device_id.hex()}")
        return result

    async def inbox(self) -> list[dict[str, Any]]:
        result = await self._request("GET", "/v1/inbox")
        return list(result["envelopes"])

    async def status(self, envelope_id: bytes) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", f"/v1/envelopes/{envelope_id.hex()}/status")
        return result

    async def ack(self, envelope_id: bytes) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("POST", f"/v1/envelopes/{envelope_id.hex()}/ack")
        return result

    async def checkpoint(self) -> str:
        """The log's latest signed checkpoint, as text (public: unsigned request)."""
        url = self._url("/checkpoint")
        try:
            async with self.session.get(url) as resp:
                if resp.status != 200:
                    await _raise_problem(resp)
                raw = await resp.content.read(32768 + 1)
        except aiohttp.ClientError as e:
            raise RelayUnreachable(f"cannot reach the relay at {self.base}: {e}") from e
        if len(raw) > 32768:
            raise RelayProblem(200, "too_large", "the relay's checkpoint is too large")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RelayProblem(200, "malformed", "the relay's checkpoint is not UTF-8") from e

    async def log_vkey(self) -> str:
        result = await self._text("/log/vkey")
        return result.strip()

    async def _text(self, path: str) -> str:
        try:
            async with self.session.get(self._url(path)) as resp:
                if resp.status != 200:
                    await _raise_problem(resp)
                return (await resp.content.read(4096)).decode("utf-8", "replace")
        except aiohttp.ClientError as e:
            raise RelayUnreachable(f"cannot reach the relay at {self.base}: {e}") from e

    async def consistency(self, first: int, second: int) -> list[bytes]:
        result = await self._request(
            "GET", "/log/consistency", query={"first": str(first), "second": str(second)}, signed=False
        )
        return [unb64(h) for h in result["proof"]]

    async def entries(self, start: int, end: int) -> list[bytes]:
        result = await self._request(
            "GET", "/log/entries", query={"start": str(start), "end": str(end)}, signed=False
        )
        return [unb64(e) for e in result["entries"]]

    async def receipts(self, envelope_id: bytes) -> list[dict[str, Any]]:
        result = await self._request("GET", f"/v1/envelopes/{envelope_id.hex()}/receipts")
        return list(result["receipts"])

    async def read(self, envelope_id: bytes, read_at: int, signature: bytes) -> dict[str, Any]:
        body = json.dumps({"read_at": read_at, "signature": b64(signature)}).encode()
        result: dict[str, Any] = await self._request(
            "POST", f"/v1/envelopes/{envelope_id.hex()}/read", body=body, content_type="application/json"
        )
        return result

    async def answered(self, envelope_id: bytes, answer: bytes, answered_at: int, signature: bytes) -> dict[str, Any]:
        body = json.dumps({"answer": answer.hex(), "answered_at": answered_at, "signature": b64(signature)}).encode()
        result: dict[str, Any] = await self._request(
            "POST", f"/v1/envelopes/{envelope_id.hex()}/answered", body=body, content_type="application/json"
        )
        return result

    async def upload(
        self, envelope_id: bytes, prefix: bytes, ciphertext: Path, *, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Upload an envelope, resuming where the relay stopped if an earlier attempt was cut.

        An envelope of at most ``UPLOAD_CHUNK`` bytes goes in one PUT. A bigger one: its
        prefix in a PUT, then its ciphertext streamed from the file in one PATCH (SPEC 7.4),
        whose Content-Digest is the header's SHA-256: no second pass over the file. A relay
        keeps the bytes of a cut PATCH, so the next call resumes from its offset (hashing
        the rest first). If the relay or a proxy refuses so big a body (413), the rest goes
        in PATCHes of ``UPLOAD_CHUNK`` bytes, as older relays require.
        """
        size = ciphertext.stat().st_size
        path = f"/v1/envelopes/{envelope_id.hex()}"
        if len(prefix) + size <= UPLOAD_CHUNK:
            state: dict[str, Any] = await self._request(
                "PUT", path, body=prefix + await asyncio.to_thread(ciphertext.read_bytes), content_type=ENVELOPE_TYPE)
        else:
            signed = split_prefix(prefix)
            if signed is None:
                raise PliError("the envelope's prefix is incomplete", code="bad_envelope")
            whole = EnvelopeHeader.from_bytes(signed[0].raw).sha256
            state = await self._request("PUT", path, body=prefix, content_type=ENVELOPE_TYPE)
            piece: int | None = None  # bytes per PATCH; None: the whole rest
            while not state["complete"]:
                offset = int(state["offset"])
                if progress:
                    progress(offset, size)
                end = size if piece is None else min(size, offset + piece)
                digest = whole if (offset, end) == (0, size) else await asyncio.to_thread(
                    _sha256_range, ciphertext, offset, end)
                body = _Stream(ciphertext, offset, end, (lambda done: progress(done, size)) if progress else None)
                try:
                    state = await self._request(
                        "PATCH", path, stream=body, content_type="application/octet-stream",
                        query={"offset": str(offset)}, digest=digest,
                    )
                except RelayProblem as e:
                    if e.status == 413 and piece is None:
                        piece = UPLOAD_CHUNK
                    elif e.code != "offset_mismatch" or "offset" not in e.body:
                        raise
                    state = {"complete": False, "offset": e.body.get("offset", offset)}
        if progress:
            progress(size, size)
        return state

    async def download(
        self,
        envelope_id: bytes,
        sink: Callable[[bytes], None],
        *,
        offset: int = 0,
        progress: Progress | None = None,
    ) -> None:
        """Stream an envelope from byte ``offset`` into ``sink`` (a ``Range`` request resumes a cut download)."""
        url = self._url(f"/v1/envelopes/{envelope_id.hex()}")
        headers = self._sign("GET", url, b"")
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            async with self.session.get(url, headers=headers) as resp:
                if resp.status not in (200, 206):
                    await _raise_problem(resp)
                skip = offset if resp.status == 200 else 0  # a relay that ignored the range
                have = offset
                total = offset + (resp.content_length or 0) - skip
                async for received in resp.content.iter_chunked(_READ):
                    chunk = received
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                        if not chunk:
                            continue
                    sink(chunk)
                    have += len(chunk)
                    if progress:
                        progress(have, total)
        except aiohttp.ClientError as e:
            raise RelayUnreachable(
                f"download interrupted ({e}); run the same command again to resume"
            ) from e


async def _raise_problem(resp: aiohttp.ClientResponse) -> None:
    try:
        body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        raise RelayProblem(resp.status, body["code"], str(body.get("detail", "")), body)
    raise RelayProblem(resp.status, "http_error", f"the relay answered HTTP {resp.status}")


class _Stream:
    """Bytes ``start``..``end`` of a file, read in a thread a piece ahead of the one being
    sent: memory holds two pieces, whatever the file's size."""

    PIECE = 1 << 20

    def __init__(self, path: Path, start: int, end: int, sent: Callable[[int], None] | None) -> None:
        self.path, self.start, self.length = path, start, end - start
        self._sent = sent
        #: why the stream stopped short, if it did: aiohttp reports it as a lost
        #: connection, and the user must hear about the file instead
        self.failed: PliError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        with self.path.open("rb") as f:
            f.seek(self.start)
            left = self.length
            ahead: asyncio.Future[bytes] | None = asyncio.ensure_future(
                asyncio.to_thread(f.read, min(self.PIECE, left)))
            try:
                while ahead is not None:
                    data = await ahead
                    if not data:
                        self.failed = PliError(f"{self.path.name} got shorter while it was sent", code="file_changed")
                        raise self.failed
                    left -= len(data)
                    ahead = None if left <= 0 else asyncio.ensure_future(
                        asyncio.to_thread(f.read, min(self.PIECE, left)))
                    yield data
                    if self._sent:
                        self._sent(self.start + self.length - left)
            finally:
                if ahead is not None:  # the request was cut: let the read end before the file closes
                    with contextlib.suppress(Exception):
                        await asyncio.shield(ahead)


def _sha256_range(path: Path, start: int, end: int) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (data := f.read(min(1 << 20, left))):
            h.update(data)
            left -= len(data)
    return h.digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
