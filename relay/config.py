"""The relay's settings: one dataclass, documented defaults, three sources.

Precedence, lowest first: defaults, a TOML file (``--config``), environment variables
``PLI_RELAY_<FIELD>`` (upper-case), command-line flags. Every input limit lives here
(STYLE §16), so an operator sees in one place what the relay accepts.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "RelayConfig", "load_config", "load_config_sources"]


#: the longest ``?wait=`` the protocol allows (SPEC.md §7.5), seconds
MAX_INBOX_WAIT = 60


class ConfigError(Exception):
    """A setting that cannot be used; the message names it."""


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    data: Path = Path("pli-relay-data")
    """Folder holding the SQLite database, the ciphertext blobs and the log key."""
    database: str = "sqlite"
    """``sqlite`` (one file in ``data``: one relay node) or a PostgreSQL DSN
    ``postgresql://user@host/db`` (several nodes on one database); its password in a libpq
    password file (``?passfile=/etc/pli/pgpass`` or ``PGPASSFILE``), not in the DSN."""
    blob_store: str = "fs"
    """Where ciphertext is kept: ``fs`` (files in ``data``'s ``blobs`` folder; several nodes
    share it on a mounted volume) or ``postgresql`` (1 MiB chunks in the PostgreSQL
    ``database``: one thing to back up and replicate; only with a PostgreSQL database)."""
    listen: str = "127.0.0.1:8470"
    """HOST:PORT to listen on; port 0 picks a free one (printed at start)."""
    max_request: int = 8 << 20
    """Largest request body, bytes, but for a PATCH, which may carry the rest of its envelope (SPEC §7.4)."""
    max_envelope: int = 2 << 30
    """Largest envelope (ciphertext), bytes."""
    max_skew: int = 300
    """How far a request signature's ``created`` may be from the relay's clock, seconds."""
    max_created_skew: int = 600
    """How far an envelope's ``created`` may be from the relay's clock, seconds."""
    max_lifetime: int = 90 * 86400
    """Longest an envelope may ask to be kept (``expires - created``), seconds."""
    ack_retention: int = 0
    """How long a ciphertext is kept after every recipient acknowledged it, seconds."""
    invitation_ttl: int = 7 * 86400
    """Default lifetime of an invitation code, seconds."""
    purge_interval: float = 60.0
    """How often expired envelopes, acknowledged blobs and old nonces are purged, seconds."""
    shutdown_timeout: float = 30.0
    """Grace period for requests in flight when stopping, seconds."""
    log_origin: str = ""
    """The transparency log's name (C2SP origin), e.g. ``relay.ars-bretagne.example/pli``.
    Empty: ``pli-relay.invalid/<key id>`` on first start. It never changes afterwards."""
    group_commit_ms: float = 5.0
    """How long the log sequencer gathers submissions into one transaction and checkpoint, ms."""
    max_inbox_wait: float = 60.0
    """Longest a ``GET /v1/inbox?wait=N`` is held open waiting for new mail, seconds, at most
    60 (the protocol's limit; keep it under the reverse proxy's read timeout)."""
    max_inbox_waits_per_device: int = 2
    """Long polls (``GET /v1/inbox?wait=N``) one device may hold open at once; beyond, the
    inbox is answered at once, without waiting (SPEC.md §7.5)."""
    pg_lock_timeout: float = 10.0
    """PostgreSQL: longest wait for the log sequencer's lock or an envelope's lock held by
    another node, seconds; then the request is answered ``503 unavailable`` (with
    ``Retry-After``) and nothing of it is recorded."""
    log_format: str = "auto"
    """``json``, ``console`` or ``auto`` (JSON unless stderr is a terminal)."""

    # -- abuse limits (the hostile-world issue) ------------------------------------------
    body_timeout: float = 60.0
    """Longest wait for a request's headers (from the connection's start or the previous
    answer) and longest pause inside a request body, seconds; the connection is then closed."""
    min_body_rate: int = 1024
    """After ``body_timeout`` seconds, a request body must have arrived at this average rate
    at least (bytes per second), so a client trickling bytes is cut off too."""
    max_connections: int = 512
    """Open client connections at most; beyond, a new connection is answered ``503
    unavailable`` (with ``Retry-After``) and closed at once."""
    max_uploads_in_flight: int = 256
    """Upload requests (PUT, PATCH) being received at once, all devices together; beyond:
    ``503 unavailable`` with ``Retry-After``."""
    max_uploads_per_device: int = 32
    """Upload requests being received at once from one device; beyond: ``429 rate_limited``."""
    rate_limit: float = 20.0
    """Signed requests per second one device may sustain (token bucket refill rate)."""
    rate_burst: int = 100
    """Signed requests one device may send in a burst (token bucket size); beyond the
    bucket: ``429 rate_limited`` with ``Retry-After``."""
    device_quota: int = 10 << 30
    """Ciphertext bytes one device may have on the relay that its recipients have not all
    acknowledged yet (uploads in progress count at their full size); a new envelope over it:
    ``413 quota_exceeded``."""
    enroll_failures: int = 10
    """Failed enrolment attempts (unknown, used or expired codes) one client address may
    make per ``enroll_window``; beyond: ``429 rate_limited`` with ``Retry-After``."""
    enroll_window: float = 600.0
    """The window of ``enroll_failures``, seconds."""

    # -- operations ----------------------------------------------------------------------
    metrics: str = "local"
    """``GET /metrics`` (Prometheus): ``local`` answers loopback clients only, ``on`` everyone,
    ``off`` nobody (404)."""
    trusted_proxies: str = ""
    """Comma-separated addresses or networks (CIDR) of reverse proxies whose
    ``X-Forwarded-For`` names the client; empty: the header is ignored and the client is
    the connection's peer."""

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def __post_init__(self) -> None:  # noqa: C901 - one check per setting, in one place
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"listen: expected HOST:PORT, got {self.listen!r}")
        for name in ("max_request", "max_envelope", "max_skew", "max_lifetime", "invitation_ttl", "max_inbox_wait",
                     "max_inbox_waits_per_device", "pg_lock_timeout",
                     "body_timeout", "min_body_rate", "max_connections", "max_uploads_in_flight",
                     "max_uploads_per_device", "rate_limit", "rate_burst", "device_quota",
                     "enroll_failures", "enroll_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_inbox_wait > MAX_INBOX_WAIT:
            raise ConfigError(f"max_inbox_wait: at most {MAX_INBOX_WAIT} seconds (the protocol's limit on "
                              f"?wait=), got {self.max_inbox_wait}")
        if self.log_format not in {"auto", "json", "console"}:
            raise ConfigError("log_format: json, console or auto")
        if self.database != "sqlite" and not self.database.startswith(("postgresql://", "postgres://")):
            raise ConfigError("database: sqlite, or a DSN postgresql://user:password@host:port/dbname")
        if self.blob_store not in {"fs", "postgresql"}:
            raise ConfigError(f"blob_store: fs or postgresql, got {self.blob_store!r}")
        if self.blob_store == "postgresql" and self.database == "sqlite":
            raise ConfigError("blob_store = postgresql keeps ciphertext in the PostgreSQL database: set `database` "
                              "to a DSN postgresql://user:password@host/db, or use blob_store = fs with SQLite")
        if self.metrics not in {"local", "on", "off"}:
            raise ConfigError("metrics: local, on or off")
        try:
            self.proxy_networks  # noqa: B018 - parsed once here so a typo stops the start
        except ValueError as e:
            raise ConfigError(f"trusted_proxies: {e}") from e

    @property
    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``trusted_proxies`` parsed (ValueError on a typo)."""
        parts = [p.strip() for p in self.trusted_proxies.split(",")]
        return tuple(ipaddress.ip_network(p, strict=False) for p in parts if p)


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in fields(RelayConfig)}
    kind = kinds[name]
    try:
        if kind == "Path":
            return Path(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}") from e
    return str(value)


def load_config(
    *,
    file: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> RelayConfig:
    """Merge the three sources over the defaults (see module docstring)."""
    return load_config_sources(file=file, env=env, overrides=overrides)[0]


def load_config_sources(
    *,
    file: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[RelayConfig, dict[str, str]]:
    """:func:`load_config`, and where each setting came from: ``default``, ``file``
    (the TOML file), ``env`` (its ``PLI_RELAY_*`` variable) or ``flag``."""
    known = {f.name for f in fields(RelayConfig)}
    values: dict[str, Any] = {}
    sources = dict.fromkeys(known, "default")
    if file is not None:
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {file}: {e}") from e
        section = raw.get("relay", raw)
        for k, v in section.items():
            if k not in known:
                raise ConfigError(f"config file {file}: unknown setting {k!r}")
            values[k] = _coerce(k, v)
            sources[k] = "file"
    environ = os.environ if env is None else env
    for k in known:
        v = environ.get(f"PLI_RELAY_{k.upper()}")
        if v is not None:
            values[k] = _coerce(k, v)
            sources[k] = "env"
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = _coerce(k, v)
            sources[k] = "flag"
    return replace(RelayConfig(), **values), sources
