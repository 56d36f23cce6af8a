"""Numbered schema migrations, one list per engine, and what checks them.

A database records each migration applied in ``schema_migrations (version, name,
applied)``. ``pli-relay migrate`` applies the pending ones in order, each in its own
transaction with its record; a migration is refused if it is not exactly the next one
(applied twice, or out of order). A relay refuses to start on a database whose record
is not a prefix of the migrations it knows (a newer relay migrated it) or that lacks
some of them (run ``pli-relay migrate``). A new migration is appended to its engine's
list (to both if both need it) with the next number; an applied one is never edited.

A SQLite database from before this record (``meta.schema = 1``) counts as version 1.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["POSTGRES", "SQLITE", "Migration", "NoRelayDataError", "SchemaError", "refuse_unless_next"]


class SchemaError(RuntimeError):
    """The database's schema is not the one this relay runs on; the message says what to do."""


class NoRelayDataError(SchemaError):
    """No relay database (or log key) where the settings point: a wrong ``--data`` or
    ``--config``, most likely; only ``serve`` and ``migrate`` create them."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    #: statements separated by ``;`` (no ``;`` inside a statement)
    sql: str

    def statements(self) -> list[str]:
        return [s.strip() for s in self.sql.split(";") if s.strip()]


SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied BIGINT NOT NULL)"
)

_SQLITE_1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS practitioners (
    rpps TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    profession TEXT NOT NULL,
    specialty TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS invitations (
    code_hash BLOB PRIMARY KEY,
    rpps TEXT NOT NULL REFERENCES practitioners(rpps),
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    used_at INTEGER,
    device_id BLOB
);
CREATE TABLE IF NOT EXISTS devices (
    device_id BLOB PRIMARY KEY,
    rpps TEXT NOT NULL REFERENCES practitioners(rpps),
    sign_key BLOB NOT NULL UNIQUE,
    cert BLOB NOT NULL,
    sig BLOB NOT NULL,
    enrolled INTEGER NOT NULL,
    revoked INTEGER
);
CREATE INDEX IF NOT EXISTS devices_rpps ON devices(rpps);
CREATE TABLE IF NOT EXISTS nonces (
    device_id BLOB NOT NULL,
    nonce TEXT NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (device_id, nonce)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nonces_expires ON nonces(expires);
CREATE TABLE IF NOT EXISTS envelopes (
    id BLOB PRIMARY KEY,
    sender BLOB NOT NULL,
    prefix BLOB NOT NULL,
    envelope_hash BLOB NOT NULL,
    size INTEGER NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    received INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('uploading', 'stored', 'deleted')),
    started_at INTEGER NOT NULL,
    received_at INTEGER,
    all_acked_at INTEGER
);
CREATE INDEX IF NOT EXISTS envelopes_state ON envelopes(state, expires);
CREATE INDEX IF NOT EXISTS envelopes_sender ON envelopes(sender, state);
CREATE TABLE IF NOT EXISTS deliveries (
    envelope_id BLOB NOT NULL REFERENCES envelopes(id),
    device_id BLOB NOT NULL,
    acked_at INTEGER,
    PRIMARY KEY (envelope_id, device_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_device ON deliveries(device_id, acked_at);
CREATE TABLE IF NOT EXISTS log_leaves (
    idx INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    envelope_id BLOB,
    type INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS log_leaves_envelope ON log_leaves(envelope_id, type) WHERE envelope_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS log_nodes (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    created INTEGER NOT NULL
)
"""

# The same tables in PostgreSQL's types: bytea for bytes, bigint for times, sizes and indices.
_POSTGRES_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE practitioners (
    rpps TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    profession TEXT NOT NULL,
    specialty TEXT NOT NULL,
    created BIGINT NOT NULL
);
CREATE TABLE invitations (
    code_hash BYTEA PRIMARY KEY,
    rpps TEXT NOT NULL REFERENCES practitioners(rpps),
    created BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    used_at BIGINT,
    device_id BYTEA
);
CREATE TABLE devices (
    device_id BYTEA PRIMARY KEY,
    rpps TEXT NOT NULL REFERENCES practitioners(rpps),
    sign_key BYTEA NOT NULL UNIQUE,
    cert BYTEA NOT NULL,
    sig BYTEA NOT NULL,
    enrolled BIGINT NOT NULL,
    revoked BIGINT
);
CREATE INDEX devices_rpps ON devices(rpps);
CREATE TABLE nonces (
    device_id BYTEA NOT NULL,
    nonce TEXT NOT NULL,
    expires BIGINT NOT NULL,
    PRIMARY KEY (device_id, nonce)
);
CREATE INDEX nonces_expires ON nonces(expires);
CREATE TABLE envelopes (
    id BYTEA PRIMARY KEY,
    sender BYTEA NOT NULL,
    prefix BYTEA NOT NULL,
    envelope_hash BYTEA NOT NULL,
    size BIGINT NOT NULL,
    created BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    received BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('uploading', 'stored', 'deleted')),
    started_at BIGINT NOT NULL,
    received_at BIGINT,
    all_acked_at BIGINT
);
CREATE INDEX envelopes_state ON envelopes(state, expires);
CREATE INDEX envelopes_sender ON envelopes(sender, state);
CREATE TABLE deliveries (
    envelope_id BYTEA NOT NULL REFERENCES envelopes(id),
    device_id BYTEA NOT NULL,
    acked_at BIGINT,
    PRIMARY KEY (envelope_id, device_id)
);
CREATE INDEX deliveries_device ON deliveries(device_id, acked_at);
CREATE TABLE log_leaves (
    idx BIGINT PRIMARY KEY,
    data BYTEA NOT NULL,
    envelope_id BYTEA,
    type INTEGER NOT NULL
);
CREATE INDEX log_leaves_envelope ON log_leaves(envelope_id, type) WHERE envelope_id IS NOT NULL;
CREATE TABLE log_nodes (
    level INTEGER NOT NULL,
    idx BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);
CREATE TABLE log_checkpoints (
    size BIGINT PRIMARY KEY,
    root BYTEA NOT NULL,
    note TEXT NOT NULL,
    created BIGINT NOT NULL
)
"""

# Ciphertext kept in the database (blob_store = "postgresql", relay._pgblobs): each row the
# bytes of one envelope's blob from offset `pos`, at most 1 MiB; `written` (Unix seconds)
# spares the chunks of another node's upload in flight from the startup sweep.
_POSTGRES_2 = """
CREATE TABLE blob_chunks (
    envelope_id BYTEA NOT NULL,
    pos BIGINT NOT NULL CHECK (pos >= 0),
    data BYTEA NOT NULL CHECK (length(data) BETWEEN 1 AND 1048576),
    written BIGINT NOT NULL,
    PRIMARY KEY (envelope_id, pos)
);
CREATE INDEX blob_chunks_written ON blob_chunks(written)
"""


# Small envelopes (whole in one request, at most relay.routes.INLINE_MAX bytes of ciphertext)
# keep their ciphertext in their row: stored and logged in one commit, no file to fsync.
_INLINE = "ALTER TABLE envelopes ADD COLUMN inline {}"


def refuse_unless_next(applied: list[tuple[int, str]], migration: Migration) -> None:
    current = applied[-1][0] if applied else 0
    if any(v == migration.version for v, _ in applied):
        raise SchemaError(f"schema migration {migration.version} ({migration.name}) was applied already")
    if migration.version != current + 1:
        raise SchemaError(
            f"schema migration {migration.version} ({migration.name}) is out of order: "
            f"the database is at version {current}, the next one is {current + 1}"
        )


SQLITE: tuple[Migration, ...] = (
    Migration(1, "initial", _SQLITE_1),
    Migration(2, "inline_envelopes", _INLINE.format("BLOB")),
)
POSTGRES: tuple[Migration, ...] = (
    Migration(1, "initial", _POSTGRES_1),
    Migration(2, "blob_chunks", _POSTGRES_2),
    Migration(3, "inline_envelopes", _INLINE.format("BYTEA")),
)
