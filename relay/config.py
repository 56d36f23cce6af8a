"""The relay's settings: one dataclass, documented defaults, three sources.

Precedence, lowest first: defaults, a TOML file (``--config``), environment variables
``PLI_RELAY_<FIELD>`` (upper-case), command-line flags. Every input limit lives here
(STYLE §16), so an operator sees in one place what the relay accepts.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "RelayConfig", "load_config"]


class ConfigError(Exception):
    """A setting that cannot be used; the message names it."""


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    data: Path = Path("pli-relay-data")
    """Folder holding the SQLite database and the ciphertext blobs."""
    listen: str = "127.0.0.1:8470"
    """HOST:PORT to listen on; port 0 picks a free one (printed at start)."""
    max_request: int = 8 << 20
    """Largest request body, bytes; larger envelopes are uploaded in several requests."""
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
    log_format: str = "auto"
    """``json``, ``console`` or ``auto`` (JSON unless stderr is a terminal)."""

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"listen: expected HOST:PORT, got {self.listen!r}")
        for name in ("max_request", "max_envelope", "max_skew", "max_lifetime", "invitation_ttl"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.log_format not in {"auto", "json", "console"}:
            raise ConfigError("log_format: json, console or auto")


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
    known = {f.name for f in fields(RelayConfig)}
    values: dict[str, Any] = {}
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
    environ = os.environ if env is None else env
    for k in known:
        v = environ.get(f"PLI_RELAY_{k.upper()}")
        if v is not None:
            values[k] = _coerce(k, v)
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = _coerce(k, v)
    return replace(RelayConfig(), **values)
