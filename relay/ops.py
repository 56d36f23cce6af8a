"""What an operator's tools ask of a running relay: liveness, readiness, metrics, the
client's address behind a reverse proxy, and the relay's effective configuration.

- ``GET /livez``: the process answers (200, nothing checked: a failing liveness probe
  restarts the relay, which must not happen because its database is slow).
- ``GET /readyz``: 200 when the database answers and takes a write, the blob store takes
  a write, the log has not failed an integrity check and the relay is not stopping; else
  ``503`` problem+json naming the failed checks (their kinds go to the log only). The
  database and blob writes run at most once a second, one probe at a time: concurrent
  and repeated calls get the last probe's result (the route is public).
- ``GET /metrics``: Prometheus text (``relay.metrics``); the setting ``metrics`` says who
  may read it: ``local`` (default) loopback clients only, ``on`` everyone, ``off`` nobody.
- :func:`forwarded_middleware`: behind a reverse proxy listed in ``trusted_proxies``, the
  client is the address ``X-Forwarded-For`` names (so the enrolment limit, which counts
  per client address, and the ``metrics = local`` check see the real client).
- :func:`effective_config`: every setting, its value and where it came from, secrets masked.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import ipaddress
import re
import time
from dataclasses import fields
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from relay import config as config_module
from relay.app import BLOBS, CLOCK, CONFIG, LOG, STORAGE, Handler
from relay.config import RelayConfig
from relay.errors import RelayError, forbidden, not_found
from relay.metrics import CONTENT_TYPE, METRICS

__all__ = [
    "READY_CACHE",
    "READY_TIMEOUT",
    "add_ops_routes",
    "client_from_forwarded",
    "config_reference",
    "config_text",
    "effective_config",
    "forwarded_middleware",
    "mask",
]

log = structlog.get_logger("pli.relay")

#: seconds /readyz waits for the database and the disk before answering 503
READY_TIMEOUT = 3.0
#: seconds a readiness probe's result answers ``/readyz`` before the next probe
READY_CACHE = 1.0


def add_ops_routes(app: web.Application) -> None:
    app.router.add_get("/livez", livez, name="livez")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")


async def livez(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    state = app[METRICS]
    checks = {**await _probe(app), "log": "integrity alarm" if state.log_alarm else "ok",
              "stopping": "yes" if state.stopping else "no"}
    failed = [name for name, value in checks.items() if value not in {"ok", "no"}]
    if not failed:
        return web.json_response({"status": "ready", "checks": checks})
    # The world (a load balancer) gets the names of the failed checks; their kinds are
    # in this node's log, for its operator.
    detail = "not ready: " + ", ".join(failed)
    if state.log_alarm:
        raise RelayError("log_integrity", 503, detail)
    if state.stopping:
        raise RelayError("unavailable", 503, detail, retry_after=5)
    raise RelayError("storage_unavailable", 503, detail, retry_after=5)


async def _probe(app: web.Application) -> dict[str, str]:
    """The database and blob store checks: at most one probe a second, one at a time
    (``/readyz`` is public: its hits must not drive writes and fsyncs), the others
    answered from the last one."""
    state = app[METRICS]
    async with state.ready_lock:
        now = time.monotonic()
        if state.ready_checks is not None and now - state.ready_checks[0] < READY_CACHE:
            return state.ready_checks[1]
        state.readiness_probes.inc()
        checks: dict[str, str] = {}
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                # A write, not a read: a database that answers but refuses writes (disk full,
                # read-only replica) cannot take an envelope.
                await app[STORAGE].set_meta("readyz", str(app[CLOCK]()))
            checks["database"] = "ok"
        except Exception as e:  # any failure is "not ready", named by its kind
            checks["database"] = _kind(e)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await app[BLOBS].probe()
            checks["blobs"] = "ok"
        except Exception as e:  # as above
            checks["blobs"] = _kind(e)
        if any(v != "ok" for v in checks.values()):
            log.warning("not_ready", checks=checks)
        state.ready_checks = (time.monotonic(), checks)
        return checks


def _kind(e: BaseException) -> str:
    # The error's kind, never its text (file names hold ids).
    if isinstance(e, TimeoutError):
        return f"no answer within {READY_TIMEOUT:g} s"
    if isinstance(e, OSError) and e.errno is not None:
        import errno  # noqa: PLC0415 - only on failure

        return f"OSError {errno.errorcode.get(e.errno, e.errno)}"
    return type(e).__name__


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    setting = app[CONFIG].metrics
    if setting == "off":
        raise not_found("metrics are off on this relay (setting metrics)")
    if setting == "local" and not _is_loopback(request.remote):
        raise forbidden("metrics are served to loopback clients only (setting metrics = local)")
    m = app[METRICS]
    await m.refresh_log(app[STORAGE].read_all, await app[LOG].size())
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE})


def _is_loopback(remote: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# -- behind a reverse proxy ------------------------------------------------------------------

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def client_from_forwarded(peer: str | None, forwarded_for: list[str], trusted: Networks) -> str | None:
    """The client's address: the peer, unless the peer is a trusted proxy; then the
    ``X-Forwarded-For`` hops are read from the right (the nearest) and the first one that
    is not a trusted proxy is the client. A client can prepend anything to the header,
    never append: only the hops our own proxies added are believed. A malformed hop stops
    the walk at the last address known good."""
    current = peer
    hops = [h.strip() for line in forwarded_for for h in line.split(",")]
    for hop in [peer or "", *reversed(hops)]:
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return current
        current = str(ip)
        if not any(ip in net for net in trusted):
            return current
    return current


def forwarded_middleware(trusted: Networks) -> Any:
    """A middleware that sets ``request.remote`` to the client a trusted proxy names."""

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.getall("X-Forwarded-For", [])
        if header:
            client = client_from_forwarded(request.remote, header, trusted)
            if client is not None and client != request.remote:
                request = request.clone(remote=client)
        return await handler(request)

    return forwarded


# -- configuration ---------------------------------------------------------------------------

_SECRET_NAMES = ("password", "secret", "token", "passphrase")


#: libpq connection parameters that hold a secret or say where one is (in a URI's query or
#: a ``key=value`` string)
_SECRET_PARAM = re.compile(r"(?i)(?<![\w-])((?:ssl)?password|passfile)(\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s#]*)")


def mask(name: str, value: object) -> str:
    """A setting's value as it may be shown: any setting named like a secret is ``***``;
    in a URL or DSN, the password of its user part and the values of its ``password``,
    ``sslpassword`` and ``passfile`` parameters are ``***``, and a URL that does not parse
    shows only its scheme."""
    text = str(value)
    if any(s in name.lower() for s in _SECRET_NAMES):
        return "***" if text else ""
    text = _SECRET_PARAM.sub(r"\1\2***", text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    # The user part ends at the LAST "@": a password may hold "/", "#", "?" or "@" unencoded,
    # where a URL parser would cut it and show its end as the host or the path.
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{hostpart}"
    masked = f"{scheme}://{rest}"
    try:
        _ = urlsplit(masked).port  # raises on what no client would parse the same way
    except ValueError:
        return f"{scheme}://***"
    return masked


def effective_config(cfg: RelayConfig, sources: dict[str, str]) -> dict[str, dict[str, str]]:
    """Every setting: its value (masked) and its source (default, file, env, flag)."""
    return {
        f.name: {"value": mask(f.name, getattr(cfg, f.name)), "source": sources.get(f.name, "default")}
        for f in fields(RelayConfig)
    }


def config_text(settings: dict[str, dict[str, str]]) -> str:
    """The effective configuration for a terminal: one aligned line per setting."""
    width = max(len(name) for name in settings)
    lines = ["Effective configuration (value, and where it comes from):"]
    lines += [f"  {name:<{width}}  {s['value'] or '(empty)'}  [{s['source']}]" for name, s in settings.items()]
    return "\n".join(lines)


def _docstrings() -> dict[str, str]:
    """The attribute docstrings of RelayConfig (the string after each field), from its source."""
    tree = ast.parse(inspect.getsource(config_module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RelayConfig")
    docs: dict[str, str] = {}
    body = cls.body
    for node, after in zip(body, [*body[1:], None], strict=True):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default_text(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"`{value}` ({value >> 30} GiB)" if value % (1 << 30) == 0 else f"`{value}` ({value >> 20} MiB)"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    return f"`{text}`" if text else "(empty)"


def config_reference() -> str:
    """The configuration reference (a Markdown table) generated from ``relay/config.py``:
    every setting, its default, its environment variable and its meaning. ``deploy/README.md``
    holds a copy that a test keeps identical."""
    docs = _docstrings()
    default = RelayConfig()
    rows = ["| setting (TOML key) | default | environment variable | meaning |", "|---|---|---|---|"]
    for f in fields(RelayConfig):
        meaning = docs.get(f.name, "").replace("|", "\\|").replace("``", "`")
        rows.append(f"| `{f.name}` | {_default_text(getattr(default, f.name))} | `PLI_RELAY_{f.name.upper()}` "
                    f"| {meaning} |")
    return "\n".join(rows) + "\n"
