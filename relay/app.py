"""The relay's aiohttp application: factory, typed state, middlewares.

``create_app(cfg)`` builds everything; storage and background tasks live in
``cleanup_ctx`` so a test and the CLI start and stop the relay the same way.
Two middlewares wrap every handler: ``problem_middleware`` turns every refusal into
``application/problem+json`` (and logs one canonical line per request), and
``auth_middleware`` authenticates the request (SPEC.md §8) before any handler runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import gc
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import nacl.signing
import structlog
from aiohttp import web

from protocol import httpsig, keys
from protocol.envelope import EnvelopeHeader, SignedHeader
from protocol.errors import AuthError, PliError, SignatureError
from relay.blobs import BlobStore, open_blobs
from relay.config import RelayConfig
from relay.errors import RelayError, storage_failure
from relay.limits import BodyTimeout, Limits
from relay.log import LogIntegrityError, TransparencyLog, open_log
from relay.metrics import METRICS, Metrics
from relay.storage import Device, Storage, open_storage

__all__ = ["BLOBS", "CLOCK", "CONFIG", "DEVICE", "GC_THRESHOLDS", "LIMITS", "LOG", "LOG_FIELDS", "MONOTONIC", "NONCE",
           "STORAGE", "VERIFIER", "NonceClaim", "Verifier", "create_app", "spend_nonce", "verify_header",
           "verify_key_of"]

log = structlog.get_logger("pli.relay")

CONFIG = web.AppKey("config", RelayConfig)
STORAGE = web.AppKey("storage", Storage)
BLOBS = web.AppKey("blobs", BlobStore)
LOG = web.AppKey("log", TransparencyLog)
CLOCK: web.AppKey[Callable[[], int]] = web.AppKey("clock")
#: monotonic seconds, for rate limits (injectable: tests move it instead of sleeping)
MONOTONIC: web.AppKey[Callable[[], float]] = web.AppKey("monotonic")
LIMITS = web.AppKey("limits", Limits)


@dataclass
class UploadSlot:
    """One envelope's upload lock, and how many requests hold it or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


UPLOAD_LOCKS: web.AppKey[dict[bytes, UploadSlot]] = web.AppKey("upload_locks")
#: running SHA-256 of each upload in progress: envelope id -> (bytes hashed, hash object)
UPLOAD_HASHES: web.AppKey[dict[bytes, tuple[int, Any]]] = web.AppKey("upload_hashes")

@dataclass
class NonceClaim:
    """A signed request's nonce, not recorded yet: a new small envelope's (``PUT``) is
    written in the log's transaction with the envelope itself (``relay.routes``), so a
    submission makes one commit, not two. Whatever way the request ends, its nonce is
    recorded before its answer (:func:`spend_nonce`), as every signed request's is."""

    device_id: bytes
    nonce: str
    expires: int
    #: committed (with the request's log entry, or on its own)
    spent: bool = False

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.device_id, self.nonce)


#: the authenticated device, set by auth_middleware
DEVICE = web.RequestKey("device", Device)
#: a PUT's request nonce, not yet recorded (set by auth_middleware for the routes in DEFERRED_NONCE)
NONCE = web.RequestKey("nonce", NonceClaim)
#: request nonces in flight on this node, deferred and not yet recorded: a second request
#: with one of them is a replay, refused at once
NONCES_IN_FLIGHT: web.AppKey[set[tuple[bytes, str]]] = web.AppKey("nonces_in_flight")
#: the verified Content-Digest (32 bytes), set by auth_middleware
DIGEST = web.RequestKey("digest", bytes)

PUBLIC_ROUTES = frozenset(
    {"health", "enroll", "checkpoint", "log_vkey", "log_inclusion", "log_consistency", "log_entries", "openapi",
     "livez", "readyz", "metrics"}  # relay.ops: probes, and metrics restricted by their own setting
)
#: the problem code of a refusal, for the request's log line and metrics
PROBLEM_CODE = web.ResponseKey("problem_code", str)
#: what a handler adds to its request's log line (e.g. the envelope stored and its leaf)
LOG_FIELDS: web.RequestKey[dict[str, Any]] = web.RequestKey("log_fields")
#: a file download's log line, written once aiohttp has prepared the response
PENDING_LINE: web.ResponseKey[dict[str, Any]] = web.ResponseKey("pending_line")
_KEYID = re.compile(r'keyid="([0-9a-f]{32})"')
_NONCE = re.compile(r'nonce="([A-Za-z0-9_-]{22,64})"')
#: routes whose request nonce is recorded with what the request writes (NonceClaim)
DEFERRED_NONCE = frozenset({"put_envelope"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    """An RFC 9457 problem document; ``code`` is the stable machine-readable part."""
    body = {
        "type": f"https://pli.invalid/errors/{code}",
        "title": code.replace("_", " "),
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    resp = web.json_response(body, status=status, content_type="application/problem+json")
    resp[PROBLEM_CODE] = code
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Signature realm="pli"'
    return resp


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = os.urandom(8).hex()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "malformed")
        resp = problem(e.status, code, e.reason)
        if "Allow" in e.headers:  # RFC 9110 §15.5.6: a 405 lists the methods the resource allows
            resp.headers["Allow"] = e.headers["Allow"]
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # every refusal becomes problem+json (see _refusal)
        resp = _refusal(request, e)
    device = request.get(DEVICE)
    line: dict[str, Any] = {
        "method": request.method,
        "route": _route_name(request),
        "status": resp.status,
        "device": device.device_id.hex() if device else None,
        "seconds": time.perf_counter() - started,
        "bytes_in": request.content.total_bytes,  # body bytes as received on the wire
        "error": resp.get(PROBLEM_CODE),
    }
    extra = request.get(LOG_FIELDS)
    if extra is not None:
        line.update(extra)
    if isinstance(resp, web.FileResponse) and not resp.prepared:
        # A download's status (200, 206, 304...) and length are known once aiohttp prepares
        # it, after this middleware: its line is written then (_log_prepared).
        resp[PENDING_LINE] = line  # on the response: a proxied request is a clone of aiohttp's
    else:
        _log_request(request.app, line, resp.content_length if resp.content_length is not None else resp.body_length)
    return resp


def _log_request(app: web.Application, line: dict[str, Any], bytes_out: int) -> None:
    """The request's one canonical log line, and its metrics: route names, never paths or ids
    but the device's; sizes and times, never content."""
    seconds = line.pop("seconds")
    app[METRICS].observe(route=line["route"], status=line["status"], seconds=seconds, bytes_in=line["bytes_in"],
                         bytes_out=bytes_out, problem=line["error"])
    log.info("request", **line, ms=round(seconds * 1000, 2), bytes_out=bytes_out)


async def _log_prepared(request: web.Request, response: web.StreamResponse) -> None:
    line = response.get(PENDING_LINE)
    if line is not None:
        del response[PENDING_LINE]
        _log_request(request.app, {**line, "status": response.status}, response.content_length or 0)


def _refusal(request: web.Request, e: Exception) -> web.Response:
    """The answer to a handler's exception: its problem document, a 503 for a full or
    unwritable disk (blob folder or database: not a bug), a 500 for anything else."""
    if isinstance(e, BodyTimeout):
        return web.Response(status=408)  # the connection is closed already: for the log line only
    if isinstance(e, LogIntegrityError):
        # The log contradicts itself: refuse to vouch for anything until an operator looks.
        log.critical("log_integrity", error=str(e), route=_route_name(request))
        request.app[METRICS].log_alarm = str(e)  # /readyz answers 503 from now on
        return problem(503, "log_integrity", "the relay's log failed an integrity check; nothing was recorded")
    refusal = storage_failure(e)
    if refusal is not None:
        log.warning("storage_unavailable", route=_route_name(request), error=_describe(e))
        e = refusal
    if isinstance(e, RelayError):
        resp = problem(e.status, e.code, e.message, **e.extra)
        if e.retry_after is not None:
            resp.headers["Retry-After"] = str(e.retry_after)
        return resp
    if isinstance(e, PliError):
        return problem(e.status, e.code, e.message)
    log.error("internal_error", method=request.method, route=_route_name(request), exc_info=e)
    return problem(500, "internal", "the relay failed; the request was not applied")


def _describe(e: BaseException) -> str:
    # The error's kind, never its text: an OSError's names a file, and file names hold ids.
    if isinstance(e, OSError):
        return f"OSError {_errno_name(e.errno)}"
    return f"{type(e).__name__} {getattr(e, 'sqlite_errorname', '')}".strip()


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, str(number))


def _route_name(request: web.Request) -> str:
    # The route's name, never its path: paths hold ids, and logs should not hold more
    # than they need.
    info = request.match_info.route
    return info.name or "unmatched"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name
    if route in PUBLIC_ROUTES or request.match_info.http_exception:
        return await handler(request)
    app = request.app
    storage = app[STORAGE]
    device, verified, recorded = await _authenticate(request)
    # The device's rate limit: after the signature (nobody drains another device's bucket),
    # before the nonce is written (a flood costs no write), spent once the nonce is new (a
    # replay costs the device nothing). See relay.limits.
    rate = app[LIMITS].rate
    wait = rate.wait(device.device_id)
    if wait > 0:
        raise RelayError("rate_limited", 429, "too many requests from this device; slow down", retry_after=wait)
    in_flight = app[NONCES_IN_FLIGHT]
    key = (device.device_id, verified.nonce)
    if recorded or key in in_flight:
        raise _replayed()
    expires = verified.created + app[CONFIG].max_skew + 1
    request[DEVICE] = device
    request[DIGEST] = verified.content_digest
    if route not in DEFERRED_NONCE:
        if not await storage.use_nonce(device.device_id, verified.nonce, expires=expires):
            raise _replayed()
        rate.take(device.device_id)
        return await handler(request)
    # Recorded with what the request writes, or on its own before its answer (NonceClaim);
    # the token is taken now and given back if the nonce turns out to be a replay.
    claim = NonceClaim(device.device_id, verified.nonce, expires)
    request[NONCE] = claim
    in_flight.add(key)
    rate.take(device.device_id)
    return await _with_claim(request, handler, claim)


async def _authenticate(request: web.Request) -> tuple[Device, httpsig.VerifiedRequest, bool]:
    """The device that signed ``request`` (SPEC.md §8), what its signature proves, and
    whether its nonce is recorded already (a replay).

    Raises:
        AuthError: no valid signature of an enrolled, unrevoked device.
    """
    app = request.app
    signature_input = request.headers.get("Signature-Input", "")[:1024]
    m = _KEYID.search(signature_input)
    n = _NONCE.search(signature_input)
    looked_up = n.group(1) if n else ""
    device: Device | None = None
    seen = False
    if m:
        # The device and, read with it, whether the nonce is known: a replay is refused
        # after the signature, before any write.
        device, seen = await app[STORAGE].device_and_nonce(bytes.fromhex(m.group(1)), looked_up)

    def resolve(keyid: str) -> nacl.signing.VerifyKey:
        if device is None or device.device_id.hex() != keyid or device.revoked is not None:
            raise AuthError("unknown or revoked device")
        return verify_key_of(device.sign_key)

    url = request.url
    prepared = httpsig.prepare_request(
        method=request.method,
        authority=httpsig.authority(url.host or "", url.port, request.scheme),
        path=url.raw_path,
        query=url.raw_query_string,
        headers=request.headers,
        resolve_key=resolve,
        now=app[CLOCK](),
        max_skew=app[CONFIG].max_skew,
    )
    await app[VERIFIER].check(prepared.check)  # the Ed25519 check, on the verifier's thread
    assert device is not None  # resolve() raised otherwise
    verified = prepared.request
    return device, verified, seen and looked_up == verified.nonce


async def _with_claim(request: web.Request, handler: Handler, claim: NonceClaim) -> web.StreamResponse:
    """Run the handler of a request whose nonce is deferred; record the nonce before its
    answer unless the handler did (with what it wrote). The nonce stays in flight until
    then: a replay sent meanwhile is refused at once. Should the nonce fail to be written
    (the database), that failure is the answer: no answer goes out before its nonce is
    recorded."""
    try:
        try:
            resp = await handler(request)
        except asyncio.CancelledError as e:
            # The client went away, or the relay is stopping: the nonce is recorded all the
            # same, so that the same request sent again, here or to another node, is
            # refused. Even if the request's entry waits in a log batch: the batch may yet
            # refuse it, or never run. (If it has not run, it then refuses that entry, whose
            # nonce is taken: the envelope is not stored, and its client, gone, has no
            # receipt for it.)
            if not claim.spent:
                with contextlib.suppress(Exception):
                    await asyncio.shield(spend_nonce(request, e))
            raise
        except BaseException as e:
            await spend_nonce(request, e)
            raise
        await spend_nonce(request)
        return resp
    finally:
        request.app[NONCES_IN_FLIGHT].discard(claim.key)


class Verifier:
    """The relay's Ed25519 checks (each request's signature, each new envelope's header),
    on a thread of their own, in bulk.

    libsodium releases the GIL while it checks (about 55 µs each): the event loop's
    thread, the relay's bottleneck, goes on with other requests meanwhile. The checks
    that arrive while a bulk runs go together in the next one, and each bulk costs the
    loop one wake-up. Only the curve arithmetic goes there: Python work on that thread
    would wait for the GIL the loop holds, and make the loop wait for it in turn.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[], object], asyncio.Future[None]]] = []
        self._running = False
        self._closed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def check(self, check: Callable[[], object]) -> None:
        """Run ``check`` (it raises if the signature does not verify) on the verifier's
        thread; what it raises comes back here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((check, future))
        if not self._running:
            self._start(loop)
        await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        items, self._waiting = self._waiting, []
        checks = [check for check, _ in items]
        if self._closed:
            # The relay is stopping and its thread is gone: a request still running is
            # checked here, on the loop (no thread started that nobody would stop).
            self._settle(items, _run_checks(checks))
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pli-verify")
        try:
            job = loop.run_in_executor(self._executor, _run_checks, checks)
        except RuntimeError as e:  # the loop or the executor is shutting down: every caller learns it
            self._settle(items, [e] * len(items))
            return
        self._running = True
        job.add_done_callback(lambda done: self._finished(loop, items, done))

    def _finished(self, loop: asyncio.AbstractEventLoop,
                  items: list[tuple[Callable[[], object], asyncio.Future[None]]],
                  job: asyncio.Future[list[BaseException | None]]) -> None:
        self._running = False
        try:
            outcomes = job.result()
        except BaseException as e:  # the executor stopped: every caller learns it
            outcomes = [e] * len(items)
        self._settle(items, outcomes)
        if self._waiting and not loop.is_closed():
            self._start(loop)

    @staticmethod
    def _settle(items: list[tuple[Callable[[], object], asyncio.Future[None]]],
                outcomes: list[BaseException | None]) -> None:
        for (_, future), outcome in zip(items, outcomes, strict=True):
            if future.done():  # its request went away
                continue
            if outcome is None:
                future.set_result(None)
            else:
                future.set_exception(outcome)

    def close(self) -> None:
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _run_checks(checks: list[Callable[[], object]]) -> list[BaseException | None]:
    outcomes: list[BaseException | None] = []
    for check in checks:
        try:
            check()
        except Exception as e:  # handed back to its caller
            outcomes.append(e)
        else:
            outcomes.append(None)
    return outcomes


#: the relay's Ed25519 checks (Verifier)
VERIFIER = web.AppKey("verifier", Verifier)


async def verify_header(app: web.Application, signed: SignedHeader, sign_key: bytes) -> EnvelopeHeader:
    """``signed.verify(VerifyKey(sign_key))``, step for step, with its Ed25519 check on the
    verifier's thread (:class:`Verifier`).

    Raises:
        SignatureError: not signed by ``sign_key``, or names another sender.
        DecodeError: the header does not decode.
    """
    key = verify_key_of(sign_key)
    await app[VERIFIER].check(partial(keys.verify, key, keys.CTX_ENVELOPE, signed.envelope_hash, signed.signature))
    header = EnvelopeHeader.from_bytes(signed.raw)
    if header.sender != keys.device_id_of(sign_key):
        raise SignatureError("envelope header names a sender other than its signer")
    return header


async def _close_verifier(app: web.Application) -> None:
    app[VERIFIER].close()


async def spend_nonce(request: web.Request, cause: BaseException | None = None) -> None:
    """Record the request's deferred nonce now, if not already (a no-op for other requests).

    ``cause``: the error the request already failed with. It stands, even if the nonce
    was recorded already: a batch may have committed the request's envelope and nonce
    before an error was found (the log's high-water mark, say), and the client must hear
    that error, not "replay".

    Raises:
        AuthError: ``replayed_request``, without ``cause``: the nonce was recorded before
            (another request, on this node or another, committed it first).
    """
    claim = request.get(NONCE)
    if claim is None or claim.spent:
        return
    recorded = await request.app[STORAGE].use_nonce(claim.device_id, claim.nonce, expires=claim.expires)
    claim.spent = True
    if recorded:
        return
    if cause is None or (isinstance(cause, AuthError) and cause.code == "replayed_request"):
        # A replay (found now, or by the log's batch): it costs its device no token.
        request.app[LIMITS].rate.give_back(claim.device_id)
    if cause is None:
        raise _replayed()


def _replayed() -> AuthError:
    return AuthError("this request was already received (replay)", code="replayed_request")


#: the verify key of each signing key seen lately (building one costs more than a lookup)
_VERIFY_KEYS: dict[bytes, nacl.signing.VerifyKey] = {}


def verify_key_of(sign_key: bytes) -> nacl.signing.VerifyKey:
    vk = _VERIFY_KEYS.get(sign_key)
    if vk is None:
        if len(_VERIFY_KEYS) >= 10_000:
            _VERIFY_KEYS.clear()
        vk = _VERIFY_KEYS[sign_key] = nacl.signing.VerifyKey(sign_key)
    return vk


async def _storage_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    cfg.data.mkdir(parents=True, exist_ok=True)
    storage = await open_storage(cfg, create=True)
    try:
        blobs = open_blobs(cfg, storage)
        # On PostgreSQL other nodes share the blob store: a blob without its row may be
        # theirs, in flight; only those untouched for a day are a crash's leftovers.
        removed = await blobs.sweep(storage, grace=0 if cfg.database == "sqlite" else 86400)
    except BaseException:
        await storage.close()
        raise
    app[STORAGE] = storage
    app[BLOBS] = blobs
    if removed:
        log.warning("startup_recovery", removed_orphan_blobs=len(removed), files=sorted(removed))
    try:
        tlog = await open_log(cfg.data, storage, origin=cfg.log_origin, clock=app[CLOCK],
                              window=cfg.group_commit_ms / 1000, create=True)
    except BaseException:
        await storage.close()
        raise
    app[LOG] = tlog
    log.info("log_opened", origin=tlog.origin, vkey=tlog.verifier.vkey, size=await tlog.size())
    yield
    await tlog.close()
    await storage.close()


async def _purge_ctx(app: web.Application) -> AsyncIterator[None]:
    from relay.routes import purge_once  # noqa: PLC0415 - routes imports this module

    async def loop() -> None:
        while True:
            await asyncio.sleep(app[CONFIG].purge_interval)
            try:
                await purge_once(app)
            except Exception:
                log.exception("purge_failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


#: the cyclic garbage collector's thresholds while a relay serves (Python's are 700, 10, 10)
GC_THRESHOLDS = (5000, 20, 10)


#: relays serving in this process, and the thresholds before the first (restored after the last)
_GC_TUNED: list[tuple[int, ...]] = []


async def _gc_ctx(_app: web.Application) -> AsyncIterator[None]:
    # A submission allocates a few hundred short-lived containers, and 64 of them in
    # flight keep Python's young generation past 700 objects all the time: it was collected
    # about a hundred times a second (and the older ones with it, a full pass over every
    # object of the process taking 25 ms), some 40 µs of each submission's CPU. These
    # thresholds make that a few times a second; memory is still reclaimed by reference
    # counting as before, only cycles wait a little longer. The process's own thresholds
    # come back once no relay serves in it (tests run many in one process).
    _GC_TUNED.append(gc.get_threshold())
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        first = _GC_TUNED[0]
        _GC_TUNED.pop()
        if not _GC_TUNED:
            gc.set_threshold(*first)


async def _metrics_start(app: web.Application) -> None:
    app[METRICS].start_log(await app[LOG].size())


async def _mark_stopping(app: web.Application) -> None:
    app[METRICS].stopping = True
    # Long polls answer now (with what the inbox holds), not when the shutdown grace ends.
    if STORAGE in app:
        app[STORAGE].wake_all()


def create_app(
    cfg: RelayConfig,
    *,
    clock: Callable[[], int] | None = None,
    monotonic: Callable[[], float] | None = None,
) -> web.Application:
    """Build a relay. ``clock`` (Unix seconds) is injectable for tests of expiry,
    ``monotonic`` (seconds) for tests of rate limits."""
    from relay.ops import add_ops_routes, forwarded_middleware  # noqa: PLC0415 - ops imports this module
    from relay.routes import add_routes  # noqa: PLC0415 - routes imports this module

    middlewares = [problem_middleware, auth_middleware]
    if cfg.proxy_networks:  # first: every later step sees the client, not the proxy
        middlewares.insert(0, forwarded_middleware(cfg.proxy_networks))
    app = web.Application(
        middlewares=middlewares,
        client_max_size=cfg.max_request,
        # A request's headers must arrive within body_timeout of the connection's start (or
        # of the previous answer); a refused body is drained for as long at most.
        handler_args={"keepalive_timeout": cfg.body_timeout, "lingering_time": min(10.0, cfg.body_timeout)},
    )
    app[CONFIG] = cfg
    app[CLOCK] = clock or (lambda: int(time.time()))
    app[MONOTONIC] = monotonic or time.monotonic
    app[LIMITS] = Limits(cfg, app[MONOTONIC])
    app[UPLOAD_LOCKS] = {}
    app[UPLOAD_HASHES] = {}
    app[NONCES_IN_FLIGHT] = set()
    app[VERIFIER] = Verifier()
    limits = app[LIMITS]
    app[METRICS] = Metrics(uploads_in_flight=lambda: limits.uploads.busy)
    app.cleanup_ctx.append(_storage_ctx)
    app.cleanup_ctx.append(_purge_ctx)
    app.cleanup_ctx.append(_gc_ctx)
    app.on_startup.append(_metrics_start)  # after the cleanup contexts: the log is open
    app.on_shutdown.append(_mark_stopping)
    app.on_response_prepare.append(_log_prepared)
    app.on_cleanup.append(_close_verifier)
    add_routes(app)
    add_ops_routes(app)
    return app
