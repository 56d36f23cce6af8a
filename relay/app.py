"""The relay's aiohttp application: factory, typed state, middlewares.

``create_app(cfg)`` builds everything; storage and background tasks live in
``cleanup_ctx`` so a test and the CLI start and stop the relay the same way.
Two middlewares wrap every handler: ``problem_middleware`` turns every refusal into
``application/problem+json`` (and logs one canonical line per request), and
``auth_middleware`` authenticates the request (SPEC.md §8) before any handler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import structlog
from aiohttp import web

from protocol import httpsig
from protocol.errors import AuthError, PliError
from relay.blobs import BlobStore, open_blobs
from relay.config import RelayConfig
from relay.errors import RelayError, storage_failure
from relay.limits import BodyTimeout, Limits
from relay.log import LogIntegrityError, TransparencyLog, open_log
from relay.metrics import METRICS, Metrics
from relay.storage import Device, Storage, open_storage

__all__ = ["BLOBS", "CLOCK", "CONFIG", "DEVICE", "LIMITS", "LOG", "MONOTONIC", "STORAGE", "create_app"]

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

#: the authenticated device, set by auth_middleware
DEVICE = web.RequestKey("device", Device)
#: the verified Content-Digest (32 bytes), set by auth_middleware
DIGEST = web.RequestKey("digest", bytes)

PUBLIC_ROUTES = frozenset(
    {"health", "enroll", "checkpoint", "log_vkey", "log_inclusion", "log_consistency", "log_entries", "openapi",
     "livez", "readyz", "metrics"}  # relay.ops: probes, and metrics restricted by their own setting
)
#: the problem code of a refusal, for the request's log line and metrics
PROBLEM_CODE = web.ResponseKey("problem_code", str)
#: a file download's log line, written once aiohttp has prepared the response
PENDING_LINE: web.ResponseKey[dict[str, Any]] = web.ResponseKey("pending_line")
_KEYID = re.compile(r'keyid="([0-9a-f]{32})"')

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
    request_id = uuid.uuid4().hex[:16]
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
    if request.match_info.route.name in PUBLIC_ROUTES or request.match_info.http_exception:
        return await handler(request)
    app = request.app
    cfg = app[CONFIG]
    storage = app[STORAGE]
    now = app[CLOCK]()
    m = _KEYID.search(request.headers.get("Signature-Input", "")[:1024])
    device: Device | None = None
    if m:
        device = await storage.device(bytes.fromhex(m.group(1)))

    def resolve(keyid: str) -> nacl.signing.VerifyKey:
        if device is None or device.device_id.hex() != keyid or device.revoked is not None:
            raise AuthError("unknown or revoked device")
        return nacl.signing.VerifyKey(device.sign_key)

    url = request.url
    verified = httpsig.verify_request(
        method=request.method,
        authority=httpsig.authority(url.host or "", url.port, request.scheme),
        path=url.raw_path,
        query=url.raw_query_string,
        headers=request.headers,
        resolve_key=resolve,
        now=now,
        max_skew=cfg.max_skew,
    )
    assert device is not None  # resolve() raised otherwise
    # The device's rate limit: after the signature (nobody drains another device's bucket),
    # before the nonce is written (a flood costs no write), spent once the nonce is new (a
    # replay costs the device nothing). See relay.limits.
    rate = app[LIMITS].rate
    wait = rate.wait(device.device_id)
    if wait > 0:
        raise RelayError("rate_limited", 429, "too many requests from this device; slow down", retry_after=wait)
    if not await storage.use_nonce(device.device_id, verified.nonce, expires=verified.created + cfg.max_skew + 1):
        raise AuthError("this request was already received (replay)", code="replayed_request")
    rate.take(device.device_id)
    request[DEVICE] = device
    request[DIGEST] = verified.content_digest
    return await handler(request)


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
    limits = app[LIMITS]
    app[METRICS] = Metrics(uploads_in_flight=lambda: limits.uploads.busy)
    app.cleanup_ctx.append(_storage_ctx)
    app.cleanup_ctx.append(_purge_ctx)
    app.on_startup.append(_metrics_start)  # after the cleanup contexts: the log is open
    app.on_shutdown.append(_mark_stopping)
    app.on_response_prepare.append(_log_prepared)
    add_routes(app)
    add_ops_routes(app)
    return app
