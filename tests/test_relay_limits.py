"""Abuse limits (issue "A hostile world"): a relay that clients, the network or its own disk
treat badly refuses with a stable code and a Retry-After, keeps nothing half-written, and
serves again once the cause is gone.

Relays here start as ``pli-relay serve`` starts them (``web.AppRunner`` behind
``relay.limits.listen``, so the connection bound is the real one), with the rate limits'
monotonic clock injected (``Ticks``): no test waits for a bucket to refill. Slow-client
tests use a short ``body_timeout`` and wait for the relay to close the socket. Full disks
are real ones: small tmpfs mounts (root only; skipped otherwise, with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from conftest import (
    CARDIO,
    DERM,
    GP,
    MIDWIFE,
    Clock,
    Relay,
    Reply,
    assert_problem,
    make_envelope,
    send_raw,
    sign_headers,
)
from yarl import URL

from protocol import codec
from protocol.keys import DeviceKeys
from relay.app import LIMITS, create_app
from relay.config import ConfigError, RelayConfig, load_config
from relay.errors import STORAGE_RETRY_AFTER
from relay.limits import Listener, QuotaUsage, listen
from relay.routes import ENVELOPE_TYPE

# -- a relay served as in production, with an injected monotonic clock -------------------------


class Ticks:
    """The relay's monotonic clock (rate limits, enrolment window), moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Served:
    """What ``conftest.Relay`` asks of its server: a port and URLs."""

    def __init__(self, listener: Listener) -> None:
        self.port = listener.port
        self._base = URL(listener.url)

    def make_url(self, path: str) -> URL:
        return self._base.join(URL(path))


@dataclass
class Limited(Relay):
    ticks: Ticks = field(default_factory=Ticks)
    listener: Listener | None = None

    @property
    def gate(self) -> Any:
        assert self.listener is not None
        return self.listener.gate


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Limited]]]:
    stops: list[Callable[[], Awaitable[None]]] = []

    async def make(name: str = "relay", **settings: Any) -> Limited:
        settings.setdefault("purge_interval", 3600.0)
        cfg = RelayConfig(data=tmp_path / name, listen="127.0.0.1:0", **settings)
        clock, ticks = Clock(), Ticks()
        app = create_app(cfg, clock=clock, monotonic=ticks)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await runner.setup()
        listener = await listen(runner, cfg)
        session = aiohttp.ClientSession()

        async def stop() -> None:
            await session.close()
            listener.server.close()
            await runner.cleanup()
            await listener.server.wait_closed()

        stops.append(stop)
        return Limited(app=app, server=_Served(listener), session=session, data=cfg.data, clock=clock, cfg=cfg,  # type: ignore[arg-type]
                       tmp=tmp_path, ticks=ticks, listener=listener)

    yield make
    for stop in reversed(stops):
        await stop()


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait, turn by turn, until the relay reaches a state (no fixed sleep)."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - the relay's own counters, read turn by turn
            await asyncio.sleep(0)
    assert condition(), what


async def _closed_by_relay(reader: asyncio.StreamReader) -> bytes:
    """Everything the relay sent until it closed the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


def _raw_head(relay: Relay, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{relay.server.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _enrol_body(code: str, keys: DeviceKeys) -> bytes:
    return codec.encode({"v": 1, "code": code, "device": keys.public().to_record()})


async def _enrol(relay: Relay, code: str, keys: DeviceKeys, *, session: aiohttp.ClientSession | None = None) -> Reply:
    return await send_raw(session or relay.session, "POST", relay.u("/v1/enroll"), _enrol_body(code, keys),
                          headers={"Content-Type": "application/msgpack"})


def _no_submission(relay: Relay, eid: bytes) -> None:
    """No row, no delivery, no blob or part, no log leaf (so no receipt) for this envelope."""
    assert relay.query("SELECT COUNT(*) FROM envelopes WHERE id = ?", (eid,)) == [(0,)]
    assert relay.query("SELECT COUNT(*) FROM deliveries WHERE envelope_id = ?", (eid,)) == [(0,)]
    assert relay.query("SELECT COUNT(*) FROM log_leaves WHERE envelope_id = ?", (eid,)) == [(0,)]
    assert not [p for p in relay.blob_files() if eid.hex() in p.name]


# -- per-device rate limit ----------------------------------------------------------------------


async def test_rate_limit_is_per_device_with_retry_after_and_spares_replays(served: Any) -> None:
    relay: Limited = await served(rate_limit=1.0, rate_burst=3)
    gp = await relay.enroll(GP)  # enrolment is public: no device bucket
    derm = await relay.enroll(DERM)
    first = sign_headers(gp.keys, "GET", relay.u("/v1/inbox"), created=relay.clock())
    assert (await send_raw(relay.session, "GET", relay.u("/v1/inbox"), headers=first)).status == 200
    for _ in range(2):
        assert (await relay.get(gp.keys, "/v1/inbox")).status == 200
    over = sign_headers(gp.keys, "GET", relay.u("/v1/inbox"), created=relay.clock())
    refused = await send_raw(relay.session, "GET", relay.u("/v1/inbox"), headers=over)
    assert_problem(refused, 429, "rate_limited")
    assert refused.headers["Retry-After"] == "1"
    assert (await relay.get(derm.keys, "/v1/inbox")).status == 200  # another device's bucket is full

    relay.ticks.advance(1.0)
    # The refused request wrote no nonce: sent again as it was, it is served now.
    assert (await send_raw(relay.session, "GET", relay.u("/v1/inbox"), headers=over)).status == 200
    relay.ticks.advance(1.0)
    # A replay is refused as one, and spends no token of the device it imitates.
    assert_problem(await send_raw(relay.session, "GET", relay.u("/v1/inbox"), headers=first), 401, "replayed_request")
    assert (await relay.get(gp.keys, "/v1/inbox")).status == 200
    assert_problem(await relay.get(gp.keys, "/v1/inbox"), 429, "rate_limited")


# -- uploads in flight --------------------------------------------------------------------------


def _held_upload(
    relay: Relay, keys: DeviceKeys, to: bytes, release: asyncio.Event
) -> tuple[bytes, asyncio.Task[Reply]]:
    """A PUT that sends its prefix and half its ciphertext, then waits for ``release``."""
    ct = os.urandom(4000)
    eid, prefix = make_envelope(keys, [to], ct, now=relay.clock())
    body = prefix + ct

    async def chunks() -> AsyncIterator[bytes]:
        yield body[: len(prefix) + 2000]
        await release.wait()
        yield body[len(prefix) + 2000 :]

    return eid, asyncio.create_task(relay.put(keys, eid, body, send_body=chunks()))


async def test_uploads_in_flight_are_bounded_per_device_and_in_all(served: Any) -> None:
    relay: Limited = await served(max_uploads_per_device=2, max_uploads_in_flight=3)
    gp, derm, cardio = await relay.enroll(GP), await relay.enroll(DERM), await relay.enroll(CARDIO)
    slots = relay.app[LIMITS].uploads
    release = asyncio.Event()
    held = [_held_upload(relay, gp.keys, derm.device_id, release) for _ in range(2)]
    await _until(lambda: slots.busy == 2, "two uploads in flight")

    ct = os.urandom(100)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    third = await relay.put(gp.keys, eid, prefix + ct)
    assert_problem(third, 429, "rate_limited")
    assert third.headers["Retry-After"] == "1"
    _no_submission(relay, eid)

    held.append(_held_upload(relay, derm.keys, gp.device_id, release))  # another device: room left
    await _until(lambda: slots.busy == 3, "three uploads in flight")
    ceid, cprefix = make_envelope(cardio.keys, [gp.device_id], ct, now=relay.clock())
    busy = await relay.put(cardio.keys, ceid, cprefix + ct)
    assert_problem(busy, 503, "unavailable")
    assert busy.headers["Retry-After"] == "1"
    _no_submission(relay, ceid)

    release.set()
    for _, task in held:
        assert (await task).status == 201
    assert slots.busy == 0
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    assert (await relay.put(cardio.keys, ceid, cprefix + ct)).status == 201


# -- storage quota ------------------------------------------------------------------------------


async def test_quota_counts_bytes_not_yet_acknowledged(served: Any) -> None:
    relay: Limited = await served(device_quota=10_000)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    envelopes = []
    for size in (6000, 6000):
        ct = os.urandom(size)
        envelopes.append((ct, *make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())))
    (ct1, eid1, prefix1), (ct2, eid2, prefix2) = envelopes
    assert (await relay.put(gp.keys, eid1, prefix1 + ct1)).status == 201
    over = await relay.put(gp.keys, eid2, prefix2 + ct2)
    doc = assert_problem(over, 413, "quota_exceeded")
    assert "6000" in doc["detail"]
    assert "Retry-After" not in over.headers  # room comes back with acknowledgements, not with time
    _no_submission(relay, eid2)

    assert (await relay.ack(derm.keys, eid1)).status == 200  # acknowledged: no longer counted
    assert (await relay.put(gp.keys, eid2, prefix2 + ct2)).status == 201
    assert (await relay.put(gp.keys, eid2, prefix2 + ct2)).status == 200  # a retry is not a new envelope

    # An upload in progress counts at its full declared size.
    ct3 = os.urandom(3000)
    eid3, prefix3 = make_envelope(gp.keys, [derm.device_id], ct3, now=relay.clock())
    assert (await relay.put(gp.keys, eid3, prefix3 + ct3[:100])).status == 200  # 9000 bytes now
    for size, status in ((1001, 413), (1000, 201)):
        ct = os.urandom(size)
        eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
        assert (await relay.put(gp.keys, eid, prefix + ct)).status == status
    assert (await relay.patch(gp.keys, eid3, 100, ct3[100:])).status == 201  # finishing is never refused
    # The quota is each device's: the GP's is full, the dermatologist's is not.
    ct = os.urandom(9000)
    eid, prefix = make_envelope(derm.keys, [gp.device_id], ct, now=relay.clock())
    assert (await relay.put(derm.keys, eid, prefix + ct)).status == 201


# -- enrolment guesses --------------------------------------------------------------------------


async def test_enrolment_guesses_are_limited_per_client_address(served: Any) -> None:
    relay: Limited = await served(enroll_failures=3, enroll_window=600.0)
    code = await relay.invite(GP)
    keys = DeviceKeys.generate(now=relay.clock())
    assert_problem(await send_raw(relay.session, "POST", relay.u("/v1/enroll"), b"\xc1",
                                  headers={"Content-Type": "application/msgpack"}), 400, "malformed")
    for _ in range(2):
        assert_problem(await _enrol(relay, "AAAAA-BBBBB-CCCCC-DDDDD", keys), 403, "invalid_invitation")
    # Neither a malformed body nor a successful enrolment counts as a guess.
    other = DeviceKeys.generate(now=relay.clock())
    assert (await _enrol(relay, await relay.invite(DERM), other)).status == 201
    assert_problem(await _enrol(relay, "AAAAA-BBBBB-CCCCC-DDDDE", keys), 403, "invalid_invitation")

    # Three wrong codes: the next attempt is refused before its code is even looked at.
    blocked = await _enrol(relay, code, keys)
    assert_problem(blocked, 429, "rate_limited")
    assert blocked.headers["Retry-After"] == "600"
    assert relay.query("SELECT COUNT(*) FROM invitations WHERE used_at IS NULL") == [(1,)]
    relay.ticks.advance(599)
    assert (await _enrol(relay, code, keys)).headers["Retry-After"] == "1"

    # Another address is not affected.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as elsewhere:
        assert_problem(await _enrol(relay, "AAAAA-BBBBB-CCCCC-DDDDF", keys, session=elsewhere), 403,
                       "invalid_invitation")

    relay.ticks.advance(1)  # the window has passed
    assert (await _enrol(relay, code, keys)).status == 201


async def test_invitation_is_single_use_and_a_revoked_device_cannot_enrol_again(served: Any) -> None:
    relay: Limited = await served()
    gp = await relay.enroll(GP)
    assert_problem(await _enrol(relay, gp.code, DeviceKeys.generate(now=relay.clock())), 403, "invalid_invitation")
    assert await relay.storage.revoke_device(gp.device_id, now=relay.clock())
    assert_problem(await _enrol(relay, await relay.invite(GP), gp.keys), 409, "device_exists")
    assert_problem(await relay.get(gp.keys, "/v1/inbox"), 401, "unauthorized")


# -- slow clients -------------------------------------------------------------------------------


async def test_a_body_that_stops_coming_is_cut_off_and_leaves_nothing(served: Any) -> None:
    relay: Limited = await served(body_timeout=0.3)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)

    # Unauthenticated: an enrolment that announces 1000 bytes and sends 10.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    started = time.monotonic()
    writer.write(_raw_head(relay, "POST", "/v1/enroll", {"Content-Type": "application/msgpack",
                                                         "Content-Length": "1000"}) + b"\x83" * 10)
    assert await _closed_by_relay(reader) == b""  # closed, unanswered
    assert 0.25 <= time.monotonic() - started < 5
    writer.close()

    # Signed: an upload that stops after its prefix and some ciphertext.
    ct = os.urandom(5000)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    path = f"/v1/envelopes/{eid.hex()}"
    headers = sign_headers(gp.keys, "PUT", relay.u(path), prefix + ct, created=relay.clock())
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(_raw_head(relay, "PUT", path, {**headers, "Content-Type": ENVELOPE_TYPE,
                                                 "Content-Length": str(len(prefix) + len(ct))}))
    writer.write(prefix + ct[:1000])
    assert await _closed_by_relay(reader) == b""
    writer.close()
    _no_submission(relay, eid)
    assert relay.incoming_files() == []

    # The relay is well, and the same upload goes through.
    assert (await send_raw(relay.session, "GET", relay.u("/healthz"))).status == 200
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201


async def test_a_body_that_trickles_is_cut_off(served: Any) -> None:
    relay: Limited = await served(body_timeout=0.3)  # and min_body_rate 1 KiB/s
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(_raw_head(relay, "POST", "/v1/enroll", {"Content-Type": "application/msgpack",
                                                         "Content-Length": "4000"}))
    closed = asyncio.create_task(_closed_by_relay(reader))
    started = time.monotonic()
    sent = 0
    with contextlib.suppress(ConnectionError):
        # One byte every 20 ms: never a pause of body_timeout, but far below 1 KiB/s.
        while not closed.done() and time.monotonic() - started < 5:
            writer.write(b"\x00")
            await writer.drain()
            sent += 1
            await asyncio.sleep(0.02)  # the client's pace, which is what is under test
    assert await closed == b""
    assert sent < 200
    assert time.monotonic() - started < 5
    writer.close()


async def test_headers_that_never_end_are_cut_off(served: Any) -> None:
    relay: Limited = await served(body_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    started = time.monotonic()
    writer.write(b"POST /v1/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/msgpack\r\n")
    assert await _closed_by_relay(reader) == b""
    assert time.monotonic() - started < 5
    writer.close()
    assert (await send_raw(relay.session, "GET", relay.u("/healthz"))).status == 200


# -- connections --------------------------------------------------------------------------------


async def test_connections_beyond_the_limit_are_refused_at_once(served: Any) -> None:
    relay: Limited = await served(max_connections=3, body_timeout=30.0)
    held = [await asyncio.open_connection("127.0.0.1", relay.server.port) for _ in range(3)]
    await _until(lambda: relay.gate.open == 3, "three connections open")

    refused = await send_raw(relay.session, "GET", relay.u("/healthz"))
    assert_problem(refused, 503, "unavailable")
    assert refused.headers["Retry-After"] == "1"
    # Beyond the limit even the first bytes of a request are not read: a raw client gets the
    # same answer at once, then the end of the connection.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    writer.write_eof()
    answer = await _closed_by_relay(reader)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b'"code": "unavailable"' in answer
    writer.close()

    # The connections already open are still served.
    for reader, writer in held[:2]:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await _closed_by_relay(reader)).startswith(b"HTTP/1.1 200 ")
        writer.close()
    await _until(lambda: relay.gate.open == 1, "the served connections closed")
    assert (await send_raw(relay.session, "GET", relay.u("/healthz"))).status == 200
    held[2][1].close()
    await _until(lambda: relay.gate.open <= 1, "the idle connection closed")
    gp = await relay.enroll(GP)
    assert (await relay.get(gp.keys, "/v1/inbox")).status == 200


# -- a full or unwritable disk ------------------------------------------------------------------


Mount = Callable[[Path, str], None]


@pytest.fixture
def tmpfs() -> Iterator[Mount]:
    """Mount small tmpfs file systems (as root), unmounted after the test's relays stopped."""
    mounted: list[Path] = []
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs a tmpfs mount: run as root (e.g. in the CI container)")

    def mount(path: Path, size: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk tests need one")
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)
        if path.is_mount():
            subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path, *, leave: int = 0) -> Path:
    """Fill ``folder``'s file system but ``leave`` bytes; returns the filler file."""
    filler = folder / "filler"
    st = os.statvfs(folder)
    room = st.f_bavail * st.f_frsize - leave
    with filler.open("ab") as f:
        try:
            while room > 0:
                room -= f.write(b"\xa5" * min(room, 1 << 16))
                f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler


async def test_full_blob_disk_is_503_leaves_nothing_and_resumes_when_space_returns(tmpfs: Mount, served: Any,
                                                                                    tmp_path: Path) -> None:
    tmpfs(tmp_path / "relay" / "blobs", "1m")
    relay: Limited = await served()
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    filler = _fill(relay.blobs, leave=64 << 10)

    # One request: refused, nothing kept.
    ct = os.urandom(300_000)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    full = await relay.put(gp.keys, eid, prefix + ct)
    assert_problem(full, 503, "storage_unavailable")
    assert full.headers["Retry-After"] == str(STORAGE_RETRY_AFTER)
    _no_submission(relay, eid)
    assert relay.incoming_files() == []

    # Two requests: the first fits, the second does not; the upload stays resumable where
    # the relay said it was, its part holding exactly that.
    ct2 = os.urandom(300_000)
    eid2, prefix2 = make_envelope(gp.keys, [derm.device_id], ct2, now=relay.clock())
    assert (await relay.put(gp.keys, eid2, prefix2 + ct2[:20_000])).json()["offset"] == 20_000
    assert_problem(await relay.patch(gp.keys, eid2, 20_000, ct2[20_000:]), 503, "storage_unavailable")
    assert relay.query("SELECT state, received FROM envelopes WHERE id = ?", (eid2,)) == [("uploading", 20_000)]
    [part] = relay.incoming_files()
    assert part.stat().st_size == len(prefix2) + 20_000
    assert relay.query("SELECT COUNT(*) FROM log_leaves WHERE envelope_id = ?", (eid2,)) == [(0,)]

    # Space returns: the same uploads go through, with their receipts.
    filler.unlink()
    done = await relay.put(gp.keys, eid, prefix + ct)
    assert done.status == 201
    assert done.json()["receipt"]["type"] == "submitted"
    assert (await relay.patch(gp.keys, eid2, 20_000, ct2[20_000:])).status == 201
    assert relay.blob_path(eid).read_bytes() == prefix + ct
    assert relay.blob_path(eid2).read_bytes() == prefix2 + ct2
    assert relay.incoming_files() == []


async def test_full_database_disk_is_503_records_nothing_and_resumes(tmpfs: Mount, served: Any,
                                                                     tmp_path: Path) -> None:
    data = tmp_path / "relay"
    tmpfs(data, "8m")
    tmpfs(data / "blobs", "4m")  # room for blobs: only the database's disk is full
    relay: Limited = await served()
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    code = await relay.invite(CARDIO)
    cardio = DeviceKeys.generate(now=relay.clock())

    # Every signed request writes its nonce first: refused, before anything else happens.
    filler = _fill(data)
    assert_problem(await relay.get(derm.keys, "/v1/inbox"), 503, "storage_unavailable")
    refused = await _enrol(relay, code, cardio)
    assert_problem(refused, 503, "storage_unavailable")
    assert refused.headers["Retry-After"] == str(STORAGE_RETRY_AFTER)
    filler.unlink()

    # The disk fills while an upload streams: its blob is written, its log batch cannot commit.
    ct = os.urandom(200_000)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    body = prefix + ct
    release = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:50_000]
        await release.wait()
        yield body[50_000:]

    upload = asyncio.create_task(relay.put(gp.keys, eid, body, send_body=chunks()))
    part = relay.incoming / f"{eid.hex()}.part"
    await _until(lambda: part.exists() and part.stat().st_size > 0, "the upload has begun")
    filler = _fill(data)
    release.set()
    assert_problem(await upload, 503, "storage_unavailable")
    _no_submission(relay, eid)
    assert relay.blob_files() == []

    filler.unlink()

    # The same when the completing request of an upload in two requests meets the full disk:
    # the upload stays where it was, resumable.
    ct2 = os.urandom(200_000)
    eid2, prefix2 = make_envelope(gp.keys, [derm.device_id], ct2, now=relay.clock())
    assert (await relay.put(gp.keys, eid2, prefix2 + ct2[:50_000])).json()["offset"] == 50_000
    release = asyncio.Event()
    rest = ct2[50_000:]

    async def rest_chunks() -> AsyncIterator[bytes]:
        yield rest[:50_000]
        await release.wait()
        yield rest[50_000:]

    patch = asyncio.create_task(relay.patch(gp.keys, eid2, 50_000, rest, send_body=rest_chunks()))
    part2 = relay.incoming / f"{eid2.hex()}.part"
    await _until(lambda: part2.stat().st_size > len(prefix2) + 50_000, "the second request has begun")
    filler = _fill(data)
    release.set()
    assert_problem(await patch, 503, "storage_unavailable")
    assert relay.query("SELECT state, received FROM envelopes WHERE id = ?", (eid2,)) == [("uploading", 50_000)]
    assert relay.query("SELECT COUNT(*) FROM log_leaves WHERE envelope_id = ?", (eid2,)) == [(0,)]
    assert not relay.blob_path(eid2).exists()
    assert part2.is_file()

    # Space returns: the same requests succeed, and the log is whole.
    filler.unlink()
    assert (await relay.get(derm.keys, "/v1/inbox")).json() == {"envelopes": []}
    assert (await _enrol(relay, code, cardio)).status == 201
    done = await relay.put(gp.keys, eid, body)
    assert done.status == 201
    assert relay.blob_path(eid).read_bytes() == body
    assert (await relay.patch(gp.keys, eid2, 50_000, rest)).status == 201
    assert relay.blob_path(eid2).read_bytes() == prefix2 + ct2
    size = relay.query("SELECT MAX(size) FROM log_checkpoints")[0][0]
    assert relay.query("SELECT COUNT(*) FROM log_leaves") == [(size,)] == [(5,)]  # 3 enrolments, 2 submissions
    assert (await relay.enroll(MIDWIFE)).rpps == MIDWIFE


# -- settings -----------------------------------------------------------------------------------


def test_limit_settings_have_defaults_a_toml_key_and_an_environment_variable(tmp_path: Path) -> None:
    cfg = load_config(env={})
    assert (cfg.body_timeout, cfg.min_body_rate, cfg.max_connections, cfg.max_uploads_in_flight,
            cfg.max_uploads_per_device, cfg.rate_limit, cfg.rate_burst, cfg.device_quota, cfg.enroll_failures,
            cfg.enroll_window) == (60.0, 1024, 512, 256, 32, 20.0, 100, 10 << 30, 10, 600.0)
    f = tmp_path / "relay.toml"
    f.write_text("[relay]\nrate_limit = 5.5\nmax_connections = 64\nenroll_window = 60\n")
    cfg = load_config(file=f, env={"PLI_RELAY_DEVICE_QUOTA": "1000", "PLI_RELAY_BODY_TIMEOUT": "2.5",
                                   "PLI_RELAY_MAX_CONNECTIONS": "32"})
    assert (cfg.rate_limit, cfg.max_connections, cfg.enroll_window, cfg.device_quota, cfg.body_timeout) == (
        5.5, 32, 60.0, 1000, 2.5)
    for name in ("rate_burst", "max_uploads_per_device", "min_body_rate"):
        with pytest.raises(ConfigError, match=name):
            load_config(env={f"PLI_RELAY_{name.upper()}": "0"})


def test_quota_usage_is_read_once_a_second_and_errs_only_upwards() -> None:
    now = [100.0]
    usage = QuotaUsage(lambda: now[0], ttl=1.0, most=3)
    sender = b"s" * 16
    assert usage.get(sender) is None  # never read: the caller sums it in the database
    began = usage.began()
    usage.set(sender, 1000, began)
    a = usage.reserve(sender, 500)  # let in after the read: added from the check on
    assert usage.get(sender) == 1500
    now[0] += 0.5
    usage.settle(a)  # its request ended: still added until a read begun later counts it
    assert usage.get(sender) == 1500
    now[0] += 0.5
    assert usage.get(sender) is None  # a second old: read again
    b = usage.reserve(sender, 300)  # in flight across the read: added whatever the read saw
    usage.set(sender, 1500, usage.began())  # began after `a` settled: `a` is in it
    assert usage.get(sender) == 1800
    usage.settle(b)
    usage.forget(sender)  # an acknowledgement freed room: read again at the next submission
    assert usage.get(sender) is None
    usage.set(sender, 100, began)  # a read that began before `b` settled: `b` still added
    assert usage.get(sender) == 400
    for i in range(4):  # bounded: past `most` senders, every read is read again
        usage.set(bytes([i]) * 16, i, usage.began())
    assert usage.get(bytes([0]) * 16) is None
    assert usage.get(bytes([3]) * 16) == 3
    usage.forget()
    assert usage.get(bytes([3]) * 16) is None


async def test_quota_counts_an_upload_in_flight_across_a_new_read(served: Any) -> None:
    # A passes the check and stalls; a second later B's check reads the database again,
    # where A is not yet: A is still counted (this node let it in), and once A is stored
    # the quota holds, so C is refused.
    relay: Limited = await served(device_quota=100_000)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    usage = relay.app[LIMITS].quota

    def envelope(size: int) -> tuple[bytes, bytes]:
        ct = os.urandom(size)
        eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
        return eid, prefix + ct

    eid_a, body_a = envelope(60_000)
    release = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield body_a[:1000]
        await release.wait()
        yield body_a[1000:]

    a = asyncio.create_task(relay.put(gp.keys, eid_a, body_a, send_body=stalled()))
    await _until(lambda: usage.get(gp.device_id) == 60_000, "A let in")
    relay.ticks.advance(1.0)
    eid_b, body_b = envelope(30_000)
    assert (await relay.put(gp.keys, eid_b, body_b)).status == 201
    release.set()
    assert (await a).status == 201
    eid_c, body_c = envelope(20_000)
    assert_problem(await relay.put(gp.keys, eid_c, body_c), 413, "quota_exceeded")
    relay.ticks.advance(1.0)  # read again: the database has A and B, still no room for C
    assert_problem(await relay.put(gp.keys, eid_c, body_c), 413, "quota_exceeded")
