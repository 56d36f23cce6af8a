"""The relay's database: public keys, routing headers and delivery state, never content.

SQLite in WAL mode with ``synchronous=FULL``: a committed transaction survives a power
cut, which matters because an answer to an upload is a promise. Every change that
spans several rows happens in one ``BEGIN IMMEDIATE`` transaction, so a crash leaves
either all of it or none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from relay.errors import RelayError

__all__ = ["Device", "EnvelopeRow", "Practitioner", "Storage"]

SCHEMA_VERSION = 1

_SCHEMA = """
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
);
"""


@dataclass(frozen=True)
class Practitioner:
    rpps: str
    name: str
    profession: str
    specialty: str


@dataclass(frozen=True)
class Device:
    device_id: bytes
    rpps: str
    sign_key: bytes
    cert: bytes
    sig: bytes
    enrolled: int
    revoked: int | None


@dataclass(frozen=True)
class EnvelopeRow:
    id: bytes
    sender: bytes
    prefix: bytes
    envelope_hash: bytes
    size: int
    created: int
    expires: int
    received: int
    state: str
    received_at: int | None


def code_hash(code: str) -> bytes:
    """Invitation codes are stored hashed: a copy of the database enrols nobody."""
    return hashlib.sha256(normalise_code(code).encode()).digest()


def normalise_code(code: str) -> str:
    return "".join(code.split()).replace("-", "").upper()


class Storage:
    """One SQLite connection; writers take ``_write_lock`` so transactions never interleave."""

    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self._db = db
        self._reader = reader
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Storage:
        """Two connections: one for write transactions, one read-only for everything else.

        Reads never go through the writer's connection, so no request can see what a
        transaction in progress wrote and may yet roll back (a checkpoint, a leaf).
        """
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.executescript(_SCHEMA)  # before the reader opens: it must see the tables
        reader = await aiosqlite.connect(path, isolation_level=None)
        await reader.execute("PRAGMA query_only=ON")
        await reader.execute("PRAGMA busy_timeout=5000")
        self = cls(db, reader)
        await self._migrate()
        return self

    async def close(self) -> None:
        await self._reader.close()
        await self._db.close()

    async def _migrate(self) -> None:
        # executescript commits on its own; the statements are idempotent.
        await self._db.executescript(_SCHEMA)
        async with self.transaction() as db:
            cur = await db.execute("SELECT value FROM meta WHERE key = 'schema'")
            row = await cur.fetchone()
            if row is None:
                await db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"database schema {row[0]} is not the one this relay knows ({SCHEMA_VERSION})"
                )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                await self._db.execute("COMMIT")
            except BaseException:
                # On a full disk SQLite may have rolled back already (and a failed COMMIT
                # leaves the transaction open): roll back only what is still open, and never
                # let a failed rollback hide the error that caused it.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        await self._db.execute("ROLLBACK")
                raise

    @asynccontextmanager
    async def _tx(self, tx: aiosqlite.Connection | None) -> AsyncIterator[aiosqlite.Connection]:
        """Join the caller's transaction (the log sequencer's) or open one."""
        if tx is not None:
            yield tx
            return
        async with self.transaction() as db:
            yield db

    @property
    def db(self) -> aiosqlite.Connection:
        """The read-only connection; writes go through :meth:`transaction`."""
        return self._reader

    async def meta(self, key: str) -> str | None:
        row = await self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return str(row[0]) if row else None

    async def set_meta(self, key: str, value: str) -> None:
        async with self.transaction() as db:
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    async def read_one(self, sql: str, args: Iterable[Any] = ()) -> Any:
        rows = await self.read_all(sql, args)
        return rows[0] if rows else None

    async def read_all(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        """Rows from the read-only connection, executed and fetched in one call.

        Requests share this connection: a statement left open between an ``execute`` and
        its fetch keeps the connection in that statement's read snapshot, and another
        request's query would then run in the old snapshot (and miss a committed batch).
        """
        return list(await self._reader.execute_fetchall(sql, tuple(args)))

    _one = read_one
    _all = read_all

    # -- practitioners, invitations, devices ------------------------------------------

    async def create_invitation(
        self, practitioner: Practitioner, code: str, *, now: int, expires: int
    ) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO practitioners (rpps, name, profession, specialty, created)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (rpps) DO UPDATE SET"
                " name = excluded.name, profession = excluded.profession,"
                " specialty = excluded.specialty",
                (practitioner.rpps, practitioner.name, practitioner.profession,
                 practitioner.specialty, now),
            )
            await db.execute(
                "INSERT INTO invitations (code_hash, rpps, created, expires) VALUES (?, ?, ?, ?)",
                (code_hash(code), practitioner.rpps, now, expires),
            )

    async def enroll(
        self,
        code: str,
        *,
        device_id: bytes,
        sign_key: bytes,
        cert: bytes,
        sig: bytes,
        now: int,
        tx: aiosqlite.Connection | None = None,
    ) -> Practitioner:
        """Use an invitation and add the device, atomically.

        Raises:
            RelayError: ``invalid_invitation`` (unknown, used or expired: one answer for
                all three) or ``device_exists``.
        """
        async with self._tx(tx) as db:
            cur = await db.execute(
                "SELECT rpps FROM invitations WHERE code_hash = ? AND used_at IS NULL"
                " AND expires > ?",
                (code_hash(code), now),
            )
            row = await cur.fetchone()
            if row is None:
                raise RelayError(
                    "invalid_invitation", 403, "this invitation code is unknown, used or expired"
                )
            cur = await db.execute(
                "SELECT 1 FROM devices WHERE device_id = ? OR sign_key = ?", (device_id, sign_key)
            )
            if await cur.fetchone() is not None:
                raise RelayError("device_exists", 409, "this device is already enrolled")
            await db.execute(
                "UPDATE invitations SET used_at = ?, device_id = ? WHERE code_hash = ?",
                (now, device_id, code_hash(code)),
            )
            await db.execute(
                "INSERT INTO devices (device_id, rpps, sign_key, cert, sig, enrolled)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (device_id, row[0], sign_key, cert, sig, now),
            )
            cur = await db.execute(
                "SELECT rpps, name, profession, specialty FROM practitioners WHERE rpps = ?", (row[0],)
            )
            p = await cur.fetchone()
        assert p is not None  # the invitation's foreign key guarantees it
        return Practitioner(*p)

    async def practitioner(self, rpps: str) -> Practitioner | None:
        row = await self._one(
            "SELECT rpps, name, profession, specialty FROM practitioners WHERE rpps = ?", (rpps,)
        )
        return Practitioner(*row) if row else None

    async def device(self, device_id: bytes) -> Device | None:
        row = await self._one(
            "SELECT device_id, rpps, sign_key, cert, sig, enrolled, revoked FROM devices"
            " WHERE device_id = ?",
            (device_id,),
        )
        return Device(*row) if row else None

    async def devices_of(self, rpps: str, *, include_revoked: bool = False) -> list[Device]:
        rows = await self._all(
            "SELECT device_id, rpps, sign_key, cert, sig, enrolled, revoked FROM devices"
            " WHERE rpps = ? AND (? OR revoked IS NULL) ORDER BY enrolled, device_id",
            (rpps, include_revoked),
        )
        return [Device(*r) for r in rows]

    async def all_devices(self) -> list[Device]:
        rows = await self._all(
            "SELECT device_id, rpps, sign_key, cert, sig, enrolled, revoked FROM devices"
            " ORDER BY rpps, enrolled"
        )
        return [Device(*r) for r in rows]

    async def revoke_device(self, device_id: bytes, *, now: int, tx: aiosqlite.Connection | None = None) -> bool:
        async with self._tx(tx) as db:
            cur = await db.execute(
                "UPDATE devices SET revoked = ? WHERE device_id = ? AND revoked IS NULL",
                (now, device_id),
            )
            return cur.rowcount == 1

    async def use_nonce(self, device_id: bytes, nonce: str, *, expires: int) -> bool:
        """Record a request nonce; False if this device used it before (a replay)."""
        async with self.transaction() as db:
            cur = await db.execute(
                "INSERT OR IGNORE INTO nonces (device_id, nonce, expires) VALUES (?, ?, ?)",
                (device_id, nonce, expires),
            )
            return cur.rowcount == 1

    # -- envelopes ----------------------------------------------------------------------

    _ENV_COLS = (
        "id, sender, prefix, envelope_hash, size, created, expires, received, state, received_at"
    )

    async def envelope(self, envelope_id: bytes) -> EnvelopeRow | None:
        row = await self._one(
            f"SELECT {self._ENV_COLS} FROM envelopes WHERE id = ?",  # noqa: S608 - constant
            (envelope_id,),
        )
        return EnvelopeRow(*row) if row else None

    async def create_envelope(
        self,
        *,
        envelope_id: bytes,
        sender: bytes,
        prefix: bytes,
        envelope_hash: bytes,
        size: int,
        created: int,
        expires: int,
        to: Iterable[bytes],
        received: int,
        now: int,
        tx: aiosqlite.Connection | None = None,
    ) -> None:
        """Insert an envelope and its deliveries in one transaction."""
        state = "stored" if received == size else "uploading"
        async with self._tx(tx) as db:
            await db.execute(
                "INSERT INTO envelopes (id, sender, prefix, envelope_hash, size, created, expires,"
                " received, state, started_at, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (envelope_id, sender, prefix, envelope_hash, size, created, expires, received,
                 state, now, now if state == "stored" else None),
            )
            await db.executemany(
                "INSERT INTO deliveries (envelope_id, device_id) VALUES (?, ?)",
                [(envelope_id, d) for d in to],
            )

    async def set_received(
        self, envelope_id: bytes, received: int, *, complete: bool, now: int, tx: aiosqlite.Connection | None = None
    ) -> None:
        async with self._tx(tx) as db:
            await db.execute(
                "UPDATE envelopes SET received = ?, state = ?, received_at = ? WHERE id = ?",
                (received, "stored" if complete else "uploading", now if complete else None,
                 envelope_id),
            )

    async def discard_upload(self, envelope_id: bytes) -> None:
        """Forget an upload that can never complete (its bytes do not hash to its header)."""
        async with self.transaction() as db:
            await db.execute("DELETE FROM deliveries WHERE envelope_id = ?", (envelope_id,))
            await db.execute(
                "DELETE FROM envelopes WHERE id = ? AND state = 'uploading'", (envelope_id,)
            )

    async def unacknowledged_bytes(self, sender: bytes, *, now: int) -> int:
        """Ciphertext bytes of ``sender``'s envelopes that not every recipient acknowledged:
        uploads in progress (at their full size) and stored, unexpired envelopes."""
        row = await self._one(
            "SELECT COALESCE(SUM(size), 0) FROM envelopes WHERE sender = ? AND state IN ('uploading', 'stored')"
            " AND all_acked_at IS NULL AND expires > ?",
            (sender, now),
        )
        return int(row[0])

    async def recipients(self, envelope_id: bytes) -> dict[bytes, int | None]:
        rows = await self._all(
            "SELECT device_id, acked_at FROM deliveries WHERE envelope_id = ?", (envelope_id,)
        )
        return {r[0]: r[1] for r in rows}

    async def inbox(self, device_id: bytes, *, now: int) -> list[tuple[EnvelopeRow, str]]:
        cols = ", ".join("e." + c.strip() for c in self._ENV_COLS.split(","))
        rows = await self._all(
            f"SELECT {cols}, COALESCE(s.rpps, '') FROM deliveries d"  # noqa: S608 - constant columns
            " JOIN envelopes e ON e.id = d.envelope_id"
            " LEFT JOIN devices s ON s.device_id = e.sender"
            " WHERE d.device_id = ? AND d.acked_at IS NULL AND e.state = 'stored'"
            " AND e.expires > ? ORDER BY e.received_at, e.id",
            (device_id, now),
        )
        return [(EnvelopeRow(*r[:10]), r[10]) for r in rows]

    async def acknowledge(
        self, envelope_id: bytes, device_id: bytes, *, now: int, tx: aiosqlite.Connection | None = None
    ) -> bool | None:
        """Mark delivered; True when every recipient device has now acknowledged, None if this
        device had already acknowledged (nothing changed)."""
        async with self._tx(tx) as db:
            cur = await db.execute(
                "UPDATE deliveries SET acked_at = ? WHERE envelope_id = ? AND device_id = ?"
                " AND acked_at IS NULL",
                (now, envelope_id, device_id),
            )
            if cur.rowcount == 0:
                return None
            cur = await db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE envelope_id = ? AND acked_at IS NULL",
                (envelope_id,),
            )
            (left,) = await cur.fetchone()  # type: ignore[misc]
            if left == 0:
                await db.execute(
                    "UPDATE envelopes SET all_acked_at = COALESCE(all_acked_at, ?) WHERE id = ?",
                    (now, envelope_id),
                )
            return bool(left == 0)

    async def purgeable(self, *, now: int, ack_retention: int, stale_upload: int) -> list[bytes]:
        """Envelopes whose ciphertext may go: acknowledged by all, expired, or abandoned."""
        rows = await self._all(
            "SELECT id FROM envelopes WHERE state != 'deleted' AND ("
            " (all_acked_at IS NOT NULL AND all_acked_at + ? <= ?)"
            " OR expires <= ?"
            " OR (state = 'uploading' AND started_at + ? <= ?))",
            (ack_retention, now, now, stale_upload, now),
        )
        return [r[0] for r in rows]

    async def mark_deleted(self, envelope_ids: list[bytes]) -> None:
        if not envelope_ids:
            return
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE envelopes SET state = 'deleted' WHERE id = ?", [(i,) for i in envelope_ids]
            )

    async def purge_nonces(self, *, now: int) -> int:
        async with self.transaction() as db:
            cur = await db.execute("DELETE FROM nonces WHERE expires <= ?", (now,))
            return cur.rowcount

    async def envelope_ids(self, state: str) -> set[bytes]:
        """The ids of the envelopes in ``state`` (uploading, stored, deleted)."""
        rows = await self._all("SELECT id FROM envelopes WHERE state = ?", (state,))
        return {r[0] for r in rows}
