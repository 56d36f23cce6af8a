"""Shared fixtures for the relay tests: a real relay on loopback, real SQLite, real keys.

Nothing is mocked. ``relay`` starts ``relay.app.create_app`` behind aiohttp's
``TestServer`` on 127.0.0.1 port 0 with its data folder in ``tmp_path`` and an
injectable ``Clock``; ``enrolled`` enrols devices through ``POST /v1/enroll`` with an
invitation created on the relay's own storage; ``signed`` sends any request (any
method, path, body, headers) signed as RFC 9421 says, so tests can craft bad ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy
from yarl import URL

from client import core
from client.api import RelayClient
from client.home import Home
from protocol import httpsig
from protocol.envelope import EnvelopeHeader, seal_header
from protocol.keys import DeviceKeys
from relay.app import STORAGE, create_app
from relay.cli import new_invitation_code
from relay.config import RelayConfig
from relay.routes import ENVELOPE_TYPE
from relay.storage import Practitioner, Storage

#: the throwaway PostgreSQL cluster (tests/_pg.py): pg_server, pg_dsn, pg_empty_dsn
pytest_plugins = ["_pg"]

PROBLEM_TYPE = "application/problem+json"

#: valid RPPS numbers (Luhn) and who they are
PRACTITIONERS: dict[str, tuple[str, str, str]] = {
    "10000005479": ("Dr Claire Martin", "médecin", "SM54"),
    "10000012343": ("Dr Paul Durand", "médecin", "dermatologie"),
    "10000023456": ("Dr Anne Leroy", "médecin", "cardiologie"),
    "10000034560": ("Mme Julie Petit", "sage-femme", ""),
}
GP, DERM, CARDIO, MIDWIFE = PRACTITIONERS


class Clock:
    """The relay's clock: real time at creation, then moved only by the test."""

    def __init__(self, now: int | None = None) -> None:
        self.now = int(time.time()) if now is None else now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: int) -> None:
        self.now += seconds


@dataclass
class Reply:
    """A response read whole: status, headers, body bytes."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip()

    def json(self) -> Any:
        return json.loads(self.body)


def sign_headers(
    keys: DeviceKeys,
    method: str,
    url: URL | str,
    body: bytes = b"",
    *,
    created: int | None = None,
    nonce: str | None = None,
    digest_of: bytes | None = None,
    keyid: str | None = None,
) -> dict[str, str]:
    """RFC 9421 headers for one request; ``digest_of`` signs a Content-Digest of other bytes."""
    u = URL(url)
    return httpsig.sign_request(
        method=method,
        authority=httpsig.authority(u.host or "", u.port, u.scheme),
        path=u.raw_path,
        query=u.raw_query_string,
        content_digest=httpsig.content_digest(hashlib.sha256(body if digest_of is None else digest_of).digest()),
        signing_key=keys.signing_key,
        keyid=keyid or keys.device_id.hex(),
        created=int(time.time()) if created is None else created,
        nonce=nonce or httpsig.encode_nonce(os.urandom(16)),
    )


async def send_raw(
    session: aiohttp.ClientSession,
    method: str,
    url: URL | str,
    body: Any = b"",
    *,
    headers: dict[str, str] | None = None,
) -> Reply:
    async with session.request(method, URL(url), data=body if body != b"" else None, headers=headers or {}) as resp:
        data = await resp.read()
        return Reply(resp.status, resp.headers, data)


async def signed(
    session: aiohttp.ClientSession,
    keys: DeviceKeys,
    method: str,
    url: URL | str,
    body: bytes = b"",
    *,
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
    created: int | None = None,
    digest_of: bytes | None = None,
    send_body: Any = None,
) -> Reply:
    """Send one signed request; ``send_body`` (e.g. an async generator) replaces the bytes sent."""
    h = sign_headers(keys, method, url, body, created=created, digest_of=digest_of)
    if content_type:
        h["Content-Type"] = content_type
    h.update(headers or {})
    return await send_raw(session, method, url, body if send_body is None else send_body, headers=h)


def assert_problem(reply: Reply, status: int, code: str | None = None) -> dict[str, Any]:
    """A refusal as SPEC.md §7 says: problem+json with a stable code and the status."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.content_type == PROBLEM_TYPE, reply.headers
    doc = reply.json()
    assert doc["status"] == status
    assert isinstance(doc["code"], str)
    assert doc["type"] == f"https://pli.invalid/errors/{doc['code']}"
    assert isinstance(doc["detail"], str)
    assert "title" in doc
    if code is not None:
        assert doc["code"] == code, doc
    return doc


def make_envelope(
    sender: DeviceKeys,
    to: list[bytes],
    ciphertext: bytes,
    *,
    now: int,
    envelope_id: bytes | None = None,
    created: int | None = None,
    expires: int | None = None,
    size: int | None = None,
    sha256: bytes | None = None,
    sender_id: bytes | None = None,
) -> tuple[bytes, bytes]:
    """(envelope id, signed prefix) for ``ciphertext``; the relay only checks routing, not age."""
    eid = envelope_id or os.urandom(16)
    created = now if created is None else created
    header = EnvelopeHeader(
        id=eid,
        sender=sender_id or sender.device_id,
        to=tuple(to),
        created=created,
        expires=created + 86400 if expires is None else expires,
        size=len(ciphertext) if size is None else size,
        sha256=hashlib.sha256(ciphertext).digest() if sha256 is None else sha256,
    )
    return eid, seal_header(header, sender.signing_key).prefix


@dataclass
class Device:
    keys: DeviceKeys
    rpps: str
    code: str
    home: Home | None = None

    @property
    def device_id(self) -> bytes:
        return self.keys.device_id

    @property
    def hex(self) -> str:
        return self.keys.device_id.hex()


@dataclass
class Relay:
    app: web.Application
    server: TestServer
    session: aiohttp.ClientSession
    data: Path
    clock: Clock
    cfg: RelayConfig
    tmp: Path
    _homes: int = field(default=0)

    @property
    def url(self) -> str:
        return str(self.server.make_url(""))

    def u(self, path: str) -> URL:
        return self.server.make_url(path)

    @property
    def storage(self) -> Storage:
        return self.app[STORAGE]

    @property
    def blobs(self) -> Path:
        return self.data / "blobs"

    @property
    def incoming(self) -> Path:
        return self.data / "blobs" / "incoming"

    def blob_path(self, envelope_id: bytes) -> Path:
        h = envelope_id.hex()
        return self.blobs / h[:2] / h

    def stored_blob(self, envelope_id: bytes) -> bytes | None:
        """An envelope's blob (prefix and ciphertext) where the relay keeps it: in its row
        (a small one, whole in one request) or in the blob folder; None if neither."""
        rows = self.query("SELECT prefix, inline FROM envelopes WHERE id = ? AND inline IS NOT NULL", (envelope_id,))
        if rows:
            return bytes(rows[0][0]) + bytes(rows[0][1])
        path = self.blob_path(envelope_id)
        return path.read_bytes() if path.is_file() else None

    def blob_files(self) -> list[Path]:
        """Every file under the blob folder (final blobs and parts)."""
        return sorted(p for p in self.blobs.rglob("*") if p.is_file())

    def incoming_files(self) -> list[Path]:
        return sorted(self.incoming.iterdir())

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the database through a separate connection, as an auditor would."""
        if self.cfg.database != "sqlite":
            from _pg import query  # noqa: PLC0415 - the plugin, imported by pytest_plugins first

            return query(self.cfg.database, sql, args)
        db = sqlite3.connect(f"file:{self.data / 'relay.sqlite3'}?mode=ro", uri=True)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def envelope_count(self) -> int:
        return self.query("SELECT COUNT(*) FROM envelopes")[0][0]

    def assert_nothing_stored(self) -> None:
        """No envelope row, no delivery row, no blob and no part file."""
        assert self.envelope_count() == 0
        assert self.query("SELECT COUNT(*) FROM deliveries")[0][0] == 0
        assert self.blob_files() == []

    async def invite(self, rpps: str, *, ttl: int = 7 * 86400) -> str:
        name, profession, specialty = PRACTITIONERS.get(rpps, ("Dr Test", "médecin", ""))
        code = new_invitation_code()
        now = self.clock()
        await self.storage.create_invitation(
            Practitioner(rpps=rpps, name=name, profession=profession, specialty=specialty),
            code,
            now=now,
            expires=now + ttl,
        )
        return code

    async def signed(
        self,
        keys: DeviceKeys,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        created: int | None = None,
        **kw: Any,
    ) -> Reply:
        """A signed request at the relay's own time (unless ``created`` says otherwise)."""
        return await signed(
            self.session, keys, method, self.u(path), body, created=self.clock() if created is None else created, **kw
        )

    async def put(self, keys: DeviceKeys, envelope_id: bytes, body: bytes, **kw: Any) -> Reply:
        kw.setdefault("content_type", ENVELOPE_TYPE)
        return await self.signed(keys, "PUT", f"/v1/envelopes/{envelope_id.hex()}", body, **kw)

    async def patch(self, keys: DeviceKeys, envelope_id: bytes, offset: int, body: bytes, **kw: Any) -> Reply:
        kw.setdefault("content_type", "application/octet-stream")
        return await self.signed(keys, "PATCH", f"/v1/envelopes/{envelope_id.hex()}?offset={offset}", body, **kw)

    async def get(self, keys: DeviceKeys, path: str, **kw: Any) -> Reply:
        return await self.signed(keys, "GET", path, **kw)

    async def ack(self, keys: DeviceKeys, envelope_id: bytes) -> Reply:
        return await self.signed(keys, "POST", f"/v1/envelopes/{envelope_id.hex()}/ack")

    async def enroll(self, rpps: str, *, with_home: bool = False, keys: DeviceKeys | None = None) -> Device:
        """A new device for ``rpps``, enrolled over HTTP with a fresh invitation."""
        keys = keys or DeviceKeys.generate(now=self.clock())
        code = await self.invite(rpps)
        home = None
        if with_home:
            self._homes += 1
            home = Home(self.tmp / f"home-{rpps}-{self._homes}")
            home.create(keys, b"pw", fast_kdf=True)
            profile = await core.enroll(home, keys, self.url, code)
            assert profile.device_id == keys.device_id.hex()
        else:
            async with RelayClient(self.url) as client:
                answer = await client.enroll(code, keys.public().to_record())
            assert answer["device_id"] == keys.device_id.hex()
        return Device(keys=keys, rpps=rpps, code=code, home=home)


RelayFactory = Callable[..., Awaitable[Relay]]


class _TestServer(TestServer):
    """aiohttp's TestServer on 127.0.0.1, port 0, with handler cancellation as asked (it
    always turns it on, whatever its constructor is given)."""

    def __init__(self, app: web.Application, *, handler_cancellation: bool) -> None:
        super().__init__(app, host="127.0.0.1", port=0)
        self._handler_cancellation = handler_cancellation

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        kwargs["handler_cancellation"] = self._handler_cancellation
        return web.AppRunner(self.app, **kwargs)


@pytest_asyncio.fixture
async def relay_factory(tmp_path: Path) -> AsyncIterator[RelayFactory]:
    """Start relays with chosen settings: ``await relay_factory(max_request=65536)``."""
    started: list[Relay] = []

    async def make(name: str = "relay", *, clock: Clock | None = None, handler_cancellation: bool = True,
                   **settings: Any) -> Relay:
        # handler_cancellation: aiohttp's test server cancels a handler whose client went
        # away; `pli-relay serve` does not (the handler then sees the connection reset).
        clock = clock or Clock()
        settings.setdefault("purge_interval", 3600.0)  # tests call purge_once themselves
        cfg = RelayConfig(data=tmp_path / name, listen="127.0.0.1:0", **settings)
        app = create_app(cfg, clock=clock)
        server = _TestServer(app, handler_cancellation=handler_cancellation)
        await server.start_server()
        session = aiohttp.ClientSession()
        r = Relay(app=app, server=server, session=session, data=cfg.data, clock=clock, cfg=cfg, tmp=tmp_path)
        started.append(r)
        return r

    yield make
    for r in started:
        await r.session.close()
        await r.server.close()


@pytest_asyncio.fixture
async def relay(relay_factory: RelayFactory) -> Relay:
    """A running relay with default settings."""
    return await relay_factory()


@pytest.fixture
def enrolled(relay: Relay) -> Callable[..., Awaitable[Device]]:
    """``await enrolled(rpps)`` → an enrolled device (keys, id) on ``relay``."""
    return relay.enroll
