"""The relay's database: public keys, routing headers and delivery state, never content.

One interface (:class:`Storage`), two engines: SQLite (``_sqlite``, the embedded
default, one node) and PostgreSQL (``_pg``, several nodes on one database), chosen by
the ``database`` setting; schema migrations in ``migrations``.
"""

from __future__ import annotations

from relay.config import RelayConfig
from relay.storage._base import Device, EnvelopeRow, Practitioner, Step, Storage, Tx, code_hash, normalise_code
from relay.storage.migrations import Migration, NoRelayDataError, SchemaError

__all__ = [
    "Device",
    "EnvelopeRow",
    "Migration",
    "NoRelayDataError",
    "Practitioner",
    "SchemaError",
    "Step",
    "Storage",
    "Tx",
    "code_hash",
    "normalise_code",
    "open_storage",
    "storage_location",
]


def storage_location(cfg: RelayConfig) -> str:
    """The database a relay with ``cfg`` uses: the SQLite file in its data folder, or the DSN."""
    return str(cfg.data / "relay.sqlite3") if cfg.database == "sqlite" else cfg.database


async def open_storage(cfg: RelayConfig, *, check: bool = True, create: bool = False) -> Storage:
    """The relay's storage as ``cfg`` says (see :meth:`Storage.open`).

    Only ``create`` (``serve`` and ``migrate``) makes a new SQLite database (and its data
    folder): any other command pointed at a folder without one would otherwise leave a
    new, empty relay there and report on it.

    Raises:
        NoRelayDataError: no SQLite database in ``cfg.data``, and not ``create``.
        SchemaError: see :meth:`Storage.open`.
    """
    if cfg.database == "sqlite":
        path = cfg.data / "relay.sqlite3"
        if create:
            cfg.data.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise NoRelayDataError(f"no relay database in {cfg.data}; wrong --data or --config?")
        return await Storage.open(path, check=check)
    return await Storage.open(cfg.database, check=check, lock_timeout=cfg.pg_lock_timeout)
