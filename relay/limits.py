"""Abuse limits: what one client may ask of the relay, and what all of them may at once.

- :class:`RateLimiter`: a token bucket per device over its signed requests (``rate_limit``
  per second, ``rate_burst`` at once): ``429 rate_limited`` with ``Retry-After``. Checked
  after the signature verifies (nobody drains another device's bucket) and before the
  nonce is written (a flood costs no database write); a token is taken only once the
  nonce is accepted (a replay costs the victim nothing).
- :class:`EnrolmentGuard`: wrong invitation codes per client address in a sliding window
  (``enroll_failures`` per ``enroll_window``): ``429 rate_limited`` before the next code
  is even looked at. IPv6 addresses count per /64, the block one subscriber gets.
- :class:`UploadSlots`: upload requests being received at once, per device (``429``) and
  in all (``503 unavailable``), both with ``Retry-After``.
- :class:`BodyReader`: the next bytes of a request body; a client that pauses longer than
  ``body_timeout``, or trickles below ``min_body_rate`` after it, has its connection closed.
- :class:`ConnectionGate` and :func:`listen`: at most ``max_connections`` open connections;
  the next one is answered ``503 unavailable`` at once (a fixed answer: no parsing, no
  handler) and closed.

Time is injected (``clock``: monotonic seconds) so tests move it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from relay.config import RelayConfig
from relay.errors import RelayError, rate_limited, unavailable

__all__ = [
    "BodyReader",
    "BodyTimeout",
    "ConnectionGate",
    "EnrolmentGuard",
    "Limits",
    "Listener",
    "QuotaUsage",
    "RateLimiter",
    "UploadSlots",
    "client_address",
    "listen",
]

log = structlog.get_logger("pli.relay")

Clock = Callable[[], float]
_MAX_TRACKED = 100_000  # addresses (or idle devices) remembered at most


class RateLimiter:
    """A token bucket per key: ``burst`` tokens, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, when)

    def _level(self, key: bytes, now: float) -> float:
        tokens, when = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + max(0.0, now - when) * self._rate)

    def wait(self, key: bytes) -> float:
        """Seconds until ``key`` has a token (0: it has one now)."""
        level = self._level(key, self._clock())
        return 0.0 if level >= 1 else (1 - level) / self._rate

    def give_back(self, key: bytes) -> None:
        """Return a token :meth:`take` spent (the request turned out to be a replay)."""
        if key in self._buckets:
            now = self._clock()
            self._buckets[key] = (min(self._burst, self._level(key, now) + 1), now)

    def take(self, key: bytes) -> None:
        """Spend a token. Requests that passed :meth:`wait` together may take the level
        below zero: the debt is paid back before the next request is let through."""
        now = self._clock()
        self._buckets[key] = (self._level(key, now) - 1, now)
        if len(self._buckets) > _MAX_TRACKED:  # forget the full buckets: they are the default
            for k in [k for k in self._buckets if self._level(k, now) >= self._burst]:
                del self._buckets[k]


class EnrolmentGuard:
    """Wrong invitation codes per client address, in a sliding window."""

    def __init__(self, limit: int, window: float, clock: Clock) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._attempts: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._attempts.pop(key, deque())
        while times and times[0] <= now - self._window:
            times.popleft()
        if times:
            self._attempts[key] = times  # re-inserted: the dict stays in least-recent order
        return times

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try a code again (0: now)."""
        now = self._clock()
        times = self._recent(key, now)
        return 0.0 if len(times) < self._limit else times[len(times) - self._limit] + self._window - now

    @contextlib.contextmanager
    def attempt(self, key: str) -> Iterator[None]:
        """One enrolment attempt. It counts from its start (so concurrent guesses cannot
        slip past the limit together) and is forgotten unless the code was refused."""
        wait = self.retry_after(key)
        if wait > 0:
            raise rate_limited(
                "too many wrong invitation codes from this address; try again later", retry_after=wait
            )
        now = self._clock()
        times = self._recent(key, now)
        times.append(now)
        self._attempts[key] = times
        while len(self._attempts) > _MAX_TRACKED:
            del self._attempts[next(iter(self._attempts))]
        failed = False
        try:
            yield
        except RelayError as e:
            failed = e.code == "invalid_invitation"
            raise
        finally:
            if not failed:
                with contextlib.suppress(ValueError):
                    times.remove(now)
                if not times and self._attempts.get(key) is times:
                    del self._attempts[key]


def client_address(request: web.Request) -> str:
    """The peer's address, IPv6 reduced to its /64. Behind a reverse proxy this is the
    proxy's address: every client then shares one enrolment budget."""
    remote = request.remote or "unknown"
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class UploadSlots:
    """Upload requests being received, per device and in all."""

    def __init__(self, total: int, per_device: int) -> None:
        self.total = total
        self.per_device = per_device
        self.busy = 0
        self._by_device: dict[bytes, int] = {}

    @contextlib.contextmanager
    def hold(self, device: bytes) -> Iterator[None]:
        mine = self._by_device.get(device, 0)
        if mine >= self.per_device:
            raise rate_limited(
                f"this device already has {mine} uploads in progress; finish one first", retry_after=1
            )
        if self.busy >= self.total:
            raise unavailable("the relay is receiving as many uploads as it takes; try again shortly")
        self.busy += 1
        self._by_device[device] = mine + 1
        try:
            yield
        finally:
            self.busy -= 1
            left = self._by_device[device] - 1
            if left:
                self._by_device[device] = left
            else:
                del self._by_device[device]


class QuotaUsage:
    """Each sender's bytes not yet acknowledged, as the quota check counts them.

    Summing them is a query over all of a sender's envelopes on the relay, too dear for
    every submission of a busy sender: the sum is read at most once every ``ttl`` seconds
    per sender. To it is added every new envelope this node let in that the read may have
    missed: from the check on (:meth:`reserve`), through its request, and after it
    (:meth:`settle`) until a read that began later counts it from the database. So on one
    node the count errs only upwards (an envelope may be counted twice, never missed).
    Acknowledgements and purges on this node drop the read (:meth:`forget`); those on
    other nodes, like their new envelopes, show at the next read, within ``ttl``.
    Events are ordered by a counter, not the clock, so ties cannot hide an envelope.
    """

    def __init__(self, clock: Clock, ttl: float = 1.0, most: int = 100_000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._most = most
        self._events = 0
        self._read: dict[bytes, tuple[float, int]] = {}  # sender: (read at, sum)
        self._let_in: dict[bytes, list[list[float]]] = {}  # sender: [settled as event n (inf: in flight), size]
        self._let_in_bytes: dict[bytes, int] = {}  # sender: the sum of its _let_in sizes (kept, not summed each time)

    def _next(self) -> int:
        self._events += 1
        return self._events

    def get(self, sender: bytes) -> int | None:
        """The sender's count, or None: read the sum (call :meth:`began` first) and :meth:`set` it."""
        read = self._read.get(sender)
        if read is None or self._clock() - read[0] >= self._ttl:
            return None
        return read[1] + self._let_in_bytes.get(sender, 0)

    def began(self) -> int:
        """Mark the start of a read (pass it to :meth:`set`)."""
        return self._next()

    def set(self, sender: bytes, used: int, began: int) -> None:
        """The database's sum for ``sender``, from a read that began at ``began``: it counts
        every envelope settled before, which stop being added."""
        if len(self._read) >= self._most:
            self._read.clear()  # bounded whatever the number of senders: they are read again
            self._let_in = {k: v for k, v in self._let_in.items() if any(n == math.inf for n, _ in v)}
            self._let_in_bytes = {k: int(sum(size for _, size in v)) for k, v in self._let_in.items()}
        self._read[sender] = (self._clock(), used)
        kept = [e for e in self._let_in.get(sender, ()) if e[0] > began]
        if kept:
            self._let_in[sender] = kept
            self._let_in_bytes[sender] = int(sum(size for _, size in kept))
        else:
            self._let_in.pop(sender, None)
            self._let_in_bytes.pop(sender, None)

    def reserve(self, sender: bytes, size: int) -> list[float]:
        """Count a new envelope let in now; :meth:`settle` it when its request ends."""
        entry = [math.inf, float(size)]
        self._let_in.setdefault(sender, []).append(entry)
        self._let_in_bytes[sender] = self._let_in_bytes.get(sender, 0) + size
        return entry

    def settle(self, entry: list[float]) -> None:
        """Its request ended (stored or not: counted until the next read either way)."""
        entry[0] = self._next()

    def forget(self, sender: bytes | None = None) -> None:
        """Drop one sender's read (it freed room), or every read (``None``: a purge)."""
        if sender is None:
            self._read.clear()
        else:
            self._read.pop(sender, None)


@dataclass
class Limits:
    """The relay's limiters, in the app's state (``relay.app.LIMITS``)."""

    cfg: RelayConfig
    clock: Clock
    rate: RateLimiter = field(init=False)
    enrolments: EnrolmentGuard = field(init=False)
    uploads: UploadSlots = field(init=False)
    quota: QuotaUsage = field(init=False)

    def __post_init__(self) -> None:
        self.rate = RateLimiter(self.cfg.rate_limit, self.cfg.rate_burst, self.clock)
        self.enrolments = EnrolmentGuard(self.cfg.enroll_failures, self.cfg.enroll_window, self.clock)
        self.uploads = UploadSlots(self.cfg.max_uploads_in_flight, self.cfg.max_uploads_per_device)
        self.quota = QuotaUsage(self.clock)


# -- slow clients --------------------------------------------------------------------------


class BodyTimeout(Exception):
    """The client stopped sending its body, or trickles it: its connection is closed."""


class BodyReader:
    """Reads a request body chunk by chunk, within ``body_timeout`` and ``min_body_rate``.

    The next chunk must come within ``body_timeout`` seconds, and by ``body_timeout +
    received / min_body_rate`` seconds after the first read: past the grace period, the
    body must have come at ``min_body_rate`` on average. Otherwise the connection is
    closed (no answer: the client is not reading either) and :class:`BodyTimeout` raised.
    """

    def __init__(self, request: web.Request, cfg: RelayConfig) -> None:
        self._request = request
        self._timeout = cfg.body_timeout
        self._rate = cfg.min_body_rate
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self.count = 0

    async def read(self) -> bytes:
        """The next bytes (b"" at the end of the body)."""
        content = self._request.content
        data = content.read_nowait()
        if data or content.at_eof():
            # Bytes already here (or none to come): no clock to set, nothing to wait for.
            self.count += len(data)
            return data
        deadline = min(self._loop.time() + self._timeout, self._start + self._timeout + self.count / self._rate)
        try:
            async with asyncio.timeout_at(deadline):
                data = await self._request.content.readany()
        except TimeoutError:
            log.warning("body_timeout", received=self.count, seconds=round(self._loop.time() - self._start, 3))
            self._request.protocol.force_close()
            raise BodyTimeout(f"no body bytes within the time allowed ({self.count} received)") from None
        self.count += len(data)
        return data


# -- connections ---------------------------------------------------------------------------


def _busy_answer() -> bytes:
    body = json.dumps({
        "type": "https://pli.invalid/errors/unavailable", "title": "unavailable", "status": 503,
        "detail": "the relay has as many connections open as it takes; try again shortly", "code": "unavailable",
    }).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
        f"Retry-After: 1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_BUSY = _busy_answer()
_BUSY_LINGER = 2.0  # seconds a refused connection may stay open for its client to read the answer
_LOG_EVERY = 60.0  # seconds between two log lines about refused connections


class ConnectionGate:
    """The listening socket's protocol factory: aiohttp's for up to ``limit`` open
    connections, then a fixed ``503`` answer. Refused connections that linger are bounded
    too (by ``limit`` again): beyond, they are reset without an answer."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int) -> None:
        self._factory = factory
        self.limit = limit
        self.open = 0  # connections served
        self.refusing = 0  # refused connections not closed yet
        self.refused = 0  # refused since the start
        self._logged: float | None = None

    def __call__(self) -> asyncio.Protocol:
        if self.open < self.limit:
            self.open += 1
            return _Counted(self._factory(), self)
        self.refused += 1
        now = time.monotonic()
        if self._logged is None or now - self._logged >= _LOG_EVERY:  # a flood must not flood the log
            self._logged = now
            log.warning("connection_limit_reached", max_connections=self.limit, refused_so_far=self.refused)
        return _Busy(self)


class _Counted(asyncio.Protocol):
    """aiohttp's protocol, unchanged, with the gate told when its connection ends."""

    def __init__(self, inner: asyncio.Protocol, gate: ConnectionGate) -> None:
        self._inner = inner
        self._gate = gate
        self._counted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._gate.open -= 1
        self._inner.connection_lost(exc)


class _Busy(asyncio.Protocol):
    """Answers 503 at once, reads and drops whatever the client sends, closes when the
    client does (or after a short linger), so the client reads the answer, not a reset."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._gate.refusing += 1
        if self._gate.refusing > self._gate.limit:
            transport.abort()
            return
        transport.write(_BUSY)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_BUSY_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: the answer is the same for all

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's signature
        self._gate.refusing -= 1
        if self._timer is not None:
            self._timer.cancel()


@dataclass
class Listener:
    """A relay listening on a socket through its :class:`ConnectionGate`."""

    server: asyncio.Server
    gate: ConnectionGate
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


async def listen(runner: web.AppRunner, cfg: RelayConfig) -> Listener:
    """Listen on ``cfg.host:cfg.port`` (after ``runner.setup()``), connections bounded by
    ``cfg.max_connections``. Stop with ``server.close()``, then ``runner.cleanup()``."""
    assert runner.server is not None, "runner.setup() first"
    gate = ConnectionGate(runner.server, cfg.max_connections)
    server = await asyncio.get_running_loop().create_server(gate, cfg.host, cfg.port, backlog=128)
    port = server.sockets[0].getsockname()[1] if server.sockets else cfg.port
    return Listener(server=server, gate=gate, host=cfg.host, port=port)
