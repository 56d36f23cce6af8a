"""The storage interface: what the relay keeps, in SQL both engines speak.

:class:`Storage` holds every query the relay runs, written once with ``?`` placeholders
in the SQL that SQLite and PostgreSQL share; an engine (``_sqlite``, ``_pg``) supplies the
connections, transactions, and the few statements that differ (the log's node lookup,
locking the sequencer, waking waiting inboxes). A :class:`Tx` is one open write
transaction; functions that take ``tx`` join the caller's (the log sequencer's) or open
their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from protocol.envelope import MAX_RECIPIENTS
from relay.errors import RelayError
from relay.storage.migrations import Migration, SchemaError

__all__ = ["Device", "EnvelopeRow", "Practitioner", "Step", "Storage", "Tx", "code_hash", "normalise_code"]

#: request nonces written in one statement at most (3 parameters each: far below either
#: engine's limit on parameters)
NONCE_GROUP = 500

Row = tuple[Any, ...]


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


class Tx(ABC):
    """One open write transaction. SQL uses ``?`` placeholders on both engines."""

    def __init__(self) -> None:
        #: run once the transaction has committed (never on rollback)
        self.after_commit: list[Callable[[], None]] = []

    @abstractmethod
    async def execute(self, sql: str, args: Iterable[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    @abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    @abstractmethod
    async def fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[Row]: ...

    async def fetchone(self, sql: str, args: Iterable[Any] = ()) -> Row | None:
        rows = await self.fetchall(sql, args)
        return rows[0] if rows else None

    async def run_all(self, steps: Sequence[Step], *, savepoint: str | None = None) -> None:
        """Run each step's statement over its rows, in order: under ``savepoint`` if named,
        released at the end, or rolled back to (and released) if one fails, whose error
        comes back. SQLite makes it one trip to its database thread."""
        if savepoint is not None:
            await self.execute(f"SAVEPOINT {savepoint}")
        try:
            for sql, rows in steps:
                if rows:
                    await self.executemany(sql, rows)
        except BaseException:
            if savepoint is not None:
                with contextlib.suppress(Exception):  # never hide the error that caused it
                    await self.execute(f"ROLLBACK TO {savepoint}")
                    await self.execute(f"RELEASE {savepoint}")
            raise
        if savepoint is not None:
            await self.execute(f"RELEASE {savepoint}")


#: a statement and the rows of parameters it runs over (Tx.run_all)
Step = tuple[str, Sequence[Sequence[Any]]]


class Storage(ABC):
    """The relay's database, on one engine. Open with :meth:`open`."""

    engine: ClassVar[str]
    #: the engine's numbered migrations, in order (relay.storage.migrations)
    MIGRATIONS: ClassVar[tuple[Migration, ...]]

    def __init__(self) -> None:
        self.migrations = self.MIGRATIONS
        self._mail_waiters: dict[bytes, set[asyncio.Event]] = {}
        self._nonces: list[tuple[bytes, str, int, asyncio.Future[bool]]] = []
        self._nonce_writer: asyncio.Task[None] | None = None

    @staticmethod
    async def open(
        location: Path | str, *, migrations: tuple[Migration, ...] | None = None, check: bool = True,
        lock_timeout: float = 10.0,
    ) -> Storage:
        """A path: SQLite (a brand-new file is created at the latest schema); a
        ``postgresql://`` DSN: PostgreSQL (migrated beforehand by ``pli-relay migrate``).

        Raises:
            SchemaError: the schema is older than this relay's (run ``pli-relay migrate``)
                or newer / unknown (not with ``check=False``: for ``pli-relay migrate``).
        """
        if isinstance(location, str) and location.startswith(("postgresql://", "postgres://")):
            from relay.storage._pg import PostgresStorage  # noqa: PLC0415 - asyncpg only when asked for

            return await PostgresStorage.connect(location, migrations=migrations, check=check,
                                                 lock_timeout=lock_timeout)
        from relay.storage._sqlite import SqliteStorage  # noqa: PLC0415

        return await SqliteStorage.connect(Path(location), migrations=migrations, check=check)

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A write transaction: committed when the block ends, rolled back if it raises."""

    def envelope_lock(self, envelope_id: bytes) -> AbstractAsyncContextManager[object]:  # noqa: ARG002
        """Held by the request writing an envelope's bytes and row, against every other
        request on that envelope on every node. One node (SQLite): the route's in-process
        lock is all there is, so this holds nothing."""
        return contextlib.nullcontext()

    def sequencer_transaction(self) -> AbstractAsyncContextManager[Tx]:
        """The log sequencer's transaction: only one at a time appends, on every node."""
        return self.transaction()

    #: whether :meth:`sequencer_batch` is offered: a whole log batch in one trip (SQLite)
    one_trip_batches: ClassVar[bool] = False

    async def sequencer_batch(
        self, expect: tuple[int, bytes], build: Callable[[Tx], list[Step]],
        then: Callable[[], object] | None = None,
    ) -> tuple[bool, Exception | None]:
        """A log batch in one sequencer transaction, made in one trip to the database's thread:
        if the latest stored checkpoint is ``expect`` (size, root), the statements ``build(tx)``
        gives (called first, on this thread: ``tx`` only collects ``after_commit``), all or
        none, then commit, then ``then()`` (blocking: the log's high-water mark).

        Returns (False, None), nothing written, if the log is not at ``expect`` (another
        writer appended); else (True, the error ``then`` raised or None).

        Raises:
            Exception: a statement failed: nothing was written.
        """
        raise NotImplementedError

    @abstractmethod
    async def read_all(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        """Rows of a read outside any write transaction (only committed data)."""

    async def write_returning(self, sql: str, args: Sequence[Any]) -> list[Row]:
        """One statement in its own transaction, and the rows it returns (SQLite: one trip)."""
        async with self.transaction() as db:
            return await db.fetchall(sql, args)

    async def read_many(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Row]]:
        """The rows of each query, as :meth:`read_all` (SQLite: in one trip and one snapshot)."""
        return [await self.read_all(sql, args) for sql, args in queries]

    async def read_one(self, sql: str, args: Iterable[Any] = ()) -> Row | None:
        rows = await self.read_all(sql, args)
        return rows[0] if rows else None

    async def read_quick(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Row]]:
        """:meth:`read_many` for a few lookups by key, which every request makes (its device,
        its nonce, a new envelope's id and recipients): SQLite answers them without a trip
        to a database thread. Only committed data, as :meth:`read_all`; not necessarily one
        snapshot for all the queries."""
        return await self.read_many(queries)

    @asynccontextmanager
    async def _tx(self, tx: Tx | None) -> AsyncIterator[Tx]:
        """Join the caller's transaction (the log sequencer's) or open one."""
        if tx is not None:
            yield tx
            return
        async with self.transaction() as db:
            yield db

    # -- schema ---------------------------------------------------------------------------

    @abstractmethod
    async def _applied(self) -> list[tuple[int, str]]:
        """(version, name) of each migration recorded in ``schema_migrations``, in order."""

    @abstractmethod
    async def _apply(self, migration: Migration, *, now: int) -> None:
        """Run one migration and record it, in one transaction, refusing (SchemaError) if
        it is not exactly the next one."""

    async def schema_version(self) -> int:
        return len(await self._applied())

    async def check_schema(self) -> None:
        """Refuse a schema this relay does not know, or one not migrated to the latest.

        Raises:
            SchemaError: with what the operator should do.
        """
        applied = await self._applied()
        _check_prefix(applied, self.migrations)
        latest = len(self.migrations)
        if len(applied) < latest:
            raise SchemaError(
                f"the {self.engine} database is at schema version {len(applied)}, this relay needs "
                f"{latest}: run `pli-relay migrate` first (with the same --data/--database)"
            )

    async def migrate(self, *, now: int) -> list[Migration]:
        """Apply the pending migrations in order, each in its own transaction; returns them."""
        versions = [m.version for m in self.migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise SchemaError(f"this relay's migrations are out of order: {versions}")
        applied = await self._applied()
        _check_prefix(applied, self.migrations)
        done = []
        for m in self.migrations[len(applied):]:
            await self._apply(m, now=now)
            done.append(m)
        return done

    async def apply_migration(self, migration: Migration, *, now: int) -> None:
        """Apply one migration; refused if already applied or not the next one."""
        await self._apply(migration, now=now)

    # -- new mail -------------------------------------------------------------------------

    @asynccontextmanager
    async def mail_waiter(self, device_id: bytes) -> AsyncIterator[asyncio.Event]:
        """An event set when new mail for ``device_id`` is committed (on any node), from
        the moment the block is entered: enter it before reading the inbox."""
        event = asyncio.Event()
        waiters = self._mail_waiters.setdefault(device_id, set())
        waiters.add(event)
        try:
            yield event
        finally:
            waiters.discard(event)
            if not waiters and self._mail_waiters.get(device_id) is waiters:
                del self._mail_waiters[device_id]

    def wake_all(self) -> None:
        """Wake every waiting inbox (they read again and answer): mail may have been
        missed, or the relay is stopping."""
        for waiters in self._mail_waiters.values():
            for event in waiters:
                event.set()

    def waiting(self, device_id: bytes) -> int:
        """Inbox requests of ``device_id`` waiting for mail now, on this node."""
        return len(self._mail_waiters.get(device_id, ()))

    def _wake(self, device_ids: Iterable[bytes]) -> None:
        for d in device_ids:
            for event in self._mail_waiters.get(d, ()):
                event.set()

    async def notify_mail(self, tx: Tx, device_ids: Sequence[bytes]) -> None:
        """Wake the inboxes of ``device_ids`` waiting on any node, once ``tx`` commits."""
        await tx.run_all(self.mail_steps(tx, device_ids))

    def mail_steps(self, tx: Tx, device_ids: Sequence[bytes]) -> list[Step]:
        """:meth:`notify_mail` as statements for :meth:`Tx.run_all` (none on one node)."""
        ids = list(device_ids)
        tx.after_commit.append(lambda: self._wake(ids))
        return []

    # -- log ------------------------------------------------------------------------------

    @abstractmethod
    async def log_nodes(self, need: set[tuple[int, int]], tx: Tx | None = None) -> dict[tuple[int, int], bytes]:
        """The stored hashes of the log nodes ``need`` that exist (through ``tx`` if given)."""

    async def init_meta(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless a value is there already; returns the stored one."""
        async with self.transaction() as tx:
            await tx.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))
            row = await tx.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        assert row is not None
        return str(row[0])

    async def meta(self, key: str) -> str | None:
        row = await self.read_one("SELECT value FROM meta WHERE key = ?", (key,))
        return str(row[0]) if row else None

    async def set_meta(self, key: str, value: str) -> None:
        async with self.transaction() as tx:
            await tx.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    async def logged_acts(self, tx: Tx, envelope_id: bytes, entry_type: int) -> list[bytes]:
        """The leaves of one type about an envelope, seen from inside ``tx``."""
        rows = await tx.fetchall(
            "SELECT data FROM log_leaves WHERE envelope_id = ? AND type = ?", (envelope_id, entry_type)
        )
        return [bytes(r[0]) for r in rows]

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
        tx: Tx | None = None,
    ) -> Practitioner:
        """Use an invitation and add the device, atomically.

        Raises:
            RelayError: ``invalid_invitation`` (unknown, used or expired: one answer for
                all three) or ``device_exists``.
        """
        async with self._tx(tx) as db:
            row = await db.fetchone(
                "SELECT rpps FROM invitations WHERE code_hash = ? AND used_at IS NULL AND expires > ?",
                (code_hash(code), now),
            )
            if row is None:
                raise RelayError(
                    "invalid_invitation", 403, "this invitation code is unknown, used or expired"
                )
            if await db.fetchone(
                "SELECT 1 FROM devices WHERE device_id = ? OR sign_key = ?", (device_id, sign_key)
            ) is not None:
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
            p = await db.fetchone(
                "SELECT rpps, name, profession, specialty FROM practitioners WHERE rpps = ?", (row[0],)
            )
        assert p is not None  # the invitation's foreign key guarantees it
        return Practitioner(*p)

    async def practitioner(self, rpps: str) -> Practitioner | None:
        row = await self.read_one(
            "SELECT rpps, name, profession, specialty FROM practitioners WHERE rpps = ?", (rpps,)
        )
        return Practitioner(*row) if row else None

    _DEV_COLS = "device_id, rpps, sign_key, cert, sig, enrolled, revoked"

    async def envelope_and_devices(
        self, envelope_id: bytes, device_ids: Sequence[bytes]
    ) -> tuple[EnvelopeRow | None, dict[bytes, Device | None]]:
        """:meth:`envelope` and :meth:`device` of each of ``device_ids``, read together (what a
        new submission checks: its id is free, its recipients are enrolled)."""
        ids = list(dict.fromkeys(device_ids))
        marks = ", ".join("?" for _ in ids)
        env, *devs = await self.read_quick([
            (f"SELECT {self._ENV_COLS} FROM envelopes WHERE id = ?", (envelope_id,)),  # noqa: S608 - constant
            *([(f"SELECT {self._DEV_COLS} FROM devices WHERE device_id IN ({marks})", ids)]  # noqa: S608 - placeholders
              if ids else []),
        ])
        found = {bytes(r[0]): Device(*r) for rows in devs for r in rows}
        return (EnvelopeRow(*env[0]) if env else None), {d: found.get(d) for d in device_ids}

    async def device(self, device_id: bytes) -> Device | None:
        rows = (await self.read_quick([(f"SELECT {self._DEV_COLS} FROM devices WHERE device_id = ?",  # noqa: S608
                                        (device_id,))]))[0]
        return Device(*rows[0]) if rows else None

    async def device_and_nonce(self, device_id: bytes, nonce: str) -> tuple[Device | None, bool]:
        """:meth:`device`, and whether this device's request nonce is recorded already (a
        replay), read together: what a signed request is checked against."""
        sql = (f"SELECT {self._DEV_COLS}, EXISTS (SELECT 1 FROM nonces n WHERE n.device_id = d.device_id"  # noqa: S608
               " AND n.nonce = ?) FROM devices d WHERE d.device_id = ?")
        (rows,) = await self.read_quick([(sql, (nonce, device_id))])
        if not rows:
            return None, False
        return Device(*rows[0][:-1]), bool(rows[0][-1])

    async def devices_of(self, rpps: str, *, include_revoked: bool = False) -> list[Device]:
        rows = await self.read_all(
            f"SELECT {self._DEV_COLS} FROM devices"  # noqa: S608 - constant columns
            " WHERE rpps = ? AND (? OR revoked IS NULL) ORDER BY enrolled, device_id",
            (rpps, include_revoked),
        )
        return [Device(*r) for r in rows]

    async def all_devices(self) -> list[Device]:
        rows = await self.read_all(f"SELECT {self._DEV_COLS} FROM devices ORDER BY rpps, enrolled")  # noqa: S608
        return [Device(*r) for r in rows]

    async def revoke_device(self, device_id: bytes, *, now: int, tx: Tx | None = None) -> bool:
        async with self._tx(tx) as db:
            return await db.execute(
                "UPDATE devices SET revoked = ? WHERE device_id = ? AND revoked IS NULL", (now, device_id)
            ) == 1

    async def use_nonce(self, device_id: bytes, nonce: str, *, expires: int) -> bool:
        """Record a request nonce; False if this device used it before (a replay).

        Every signed request spends one, so they are written in groups: the nonces that
        arrive while a group is being written go together in the next one (one
        transaction, one commit), and each caller learns its own answer.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._nonces.append((device_id, nonce, expires, future))
        if self._nonce_writer is None or self._nonce_writer.done():
            self._nonce_writer = asyncio.create_task(self._write_nonces())
        return await future

    async def _write_nonces(self) -> None:
        while self._nonces:
            group, self._nonces = self._nonces[:NONCE_GROUP], self._nonces[NONCE_GROUP:]
            fresh: dict[tuple[bytes, str], int] = {}
            for device_id, nonce, expires, _ in group:
                fresh.setdefault((device_id, nonce), expires)  # a second copy in one group is a replay
            try:
                values = ", ".join("(?, ?, ?)" for _ in fresh)
                rows = await self.write_returning(
                    f"INSERT INTO nonces (device_id, nonce, expires) VALUES {values}"  # noqa: S608 - placeholders only
                    " ON CONFLICT DO NOTHING RETURNING device_id, nonce",
                    [v for (d, n), e in fresh.items() for v in (d, n, e)],
                )
            except Exception as e:  # each caller gets the error (a 503); none is lost
                for *_, future in group:
                    if not future.done():
                        future.set_exception(e)
                continue
            new = {(bytes(r[0]), str(r[1])) for r in rows}
            for device_id, nonce, _, future in group:
                key = (device_id, nonce)
                first = key in new
                new.discard(key)  # only the first request with it is fresh (even if it went away)
                if not future.done():
                    future.set_result(first)

    @staticmethod
    async def record_nonce(tx: Tx, device_id: bytes, nonce: str, expires: int) -> bool:
        """Record a request nonce in ``tx``; False (nothing written) if this device used it before."""
        return await tx.execute(
            "INSERT INTO nonces (device_id, nonce, expires) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (device_id, nonce, expires),
        ) == 1

    # -- envelopes ----------------------------------------------------------------------

    _ENV_COLS = (
        "id, sender, prefix, envelope_hash, size, created, expires, received, state, received_at"
    )

    async def envelope(self, envelope_id: bytes) -> EnvelopeRow | None:
        rows = (await self.read_quick([(f"SELECT {self._ENV_COLS} FROM envelopes WHERE id = ?",  # noqa: S608
                                        (envelope_id,))]))[0]
        return EnvelopeRow(*rows[0]) if rows else None

    async def inline_blob(self, envelope_id: bytes) -> bytes | None:
        """The blob (prefix and ciphertext) of a stored envelope kept in its row; None if
        its ciphertext is in the blob store (or it is not stored)."""
        row = await self.read_one(
            "SELECT prefix, inline FROM envelopes WHERE id = ? AND state = 'stored' AND inline IS NOT NULL",
            (envelope_id,),
        )
        return bytes(row[0]) + bytes(row[1]) if row else None

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
        inline: bytes | None = None,
        tx: Tx | None = None,
    ) -> bool:
        """Insert an envelope and its deliveries in one transaction; False (nothing
        written) if a row with this id exists already: another request created it.
        ``inline``: the whole ciphertext of a small envelope, kept in its row."""
        state = "stored" if received == size else "uploading"
        async with self._tx(tx) as db:
            if not await db.execute(
                "INSERT INTO envelopes (id, sender, prefix, envelope_hash, size, created, expires,"
                " received, state, started_at, received_at, inline) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (id) DO NOTHING",
                (envelope_id, sender, prefix, envelope_hash, size, created, expires, received,
                 state, now, now if state == "stored" else None, inline),
            ):
                return False
            await db.executemany(
                "INSERT INTO deliveries (envelope_id, device_id) VALUES (?, ?)",
                [(envelope_id, d) for d in to],
            )
        return True

    def envelopes_steps(self, tx: Tx, envelopes: list[dict[str, Any]]) -> list[Step]:
        """:meth:`create_envelope` for many complete envelopes at once (arguments as its
        keywords, without ``tx``), as a few statements: the log's bulk write for a burst of
        submissions (``relay.log.Together``). They fail if any id exists (the log then
        writes the envelopes one by one). ``nonce``, if given, is the request nonce
        ``(device_id, nonce, expires)`` recorded with its envelope (as :meth:`record_nonce`):
        they fail if any was recorded before."""
        woken = list(dict.fromkeys(d for e in envelopes for d in e["to"]))
        return [
            # Their requests' nonces (relay.app.NonceClaim), first: a replay fails the step
            # before the larger ones run.
            ("INSERT INTO nonces (device_id, nonce, expires) VALUES (?, ?, ?)",
             [e["nonce"] for e in envelopes if e.get("nonce") is not None]),
            (("INSERT INTO envelopes (id, sender, prefix, envelope_hash, size, created, expires, received,"
             " state, started_at, received_at, inline) VALUES (?,?,?,?,?,?,?,?,'stored',?,?,?)"),
             [(e["envelope_id"], e["sender"], e["prefix"], e["envelope_hash"], e["size"], e["created"],
               e["expires"], e["received"], e["now"], e["now"], e.get("inline")) for e in envelopes]),
            ("INSERT INTO deliveries (envelope_id, device_id) VALUES (?, ?)",
             [(e["envelope_id"], d) for e in envelopes for d in e["to"]]),
            *(step for i in range(0, len(woken), MAX_RECIPIENTS)
              for step in self.mail_steps(tx, woken[i:i + MAX_RECIPIENTS])),
        ]

    async def set_received(
        self, envelope_id: bytes, received: int, *, held: int, complete: bool, now: int, tx: Tx | None = None
    ) -> bool:
        """Move an upload from ``held`` bytes to ``received`` (stored if ``complete``); False
        (nothing changed) unless the row is still an upload holding ``held`` bytes, as the
        caller saw it: another request (on another node) changed it meanwhile."""
        async with self._tx(tx) as db:
            return await db.execute(
                "UPDATE envelopes SET received = ?, state = ?, received_at = ?"
                " WHERE id = ? AND state = 'uploading' AND received = ?",
                (received, "stored" if complete else "uploading", now if complete else None,
                 envelope_id, held),
            ) == 1

    async def discard_upload(self, envelope_id: bytes) -> None:
        """Forget an upload that can never complete (its bytes do not hash to its header)."""
        async with self.transaction() as db:
            await db.execute("DELETE FROM deliveries WHERE envelope_id = ?", (envelope_id,))
            await db.execute("DELETE FROM envelopes WHERE id = ? AND state = 'uploading'", (envelope_id,))

    async def unacknowledged_bytes(self, sender: bytes, *, now: int) -> int:
        """Ciphertext bytes of ``sender``'s envelopes that not every recipient acknowledged:
        uploads in progress (at their full size) and stored, unexpired envelopes."""
        row = await self.read_one(
            "SELECT COALESCE(SUM(size), 0) FROM envelopes WHERE sender = ? AND state IN ('uploading', 'stored')"
            " AND all_acked_at IS NULL AND expires > ?",
            (sender, now),
        )
        assert row is not None
        return int(row[0])

    async def recipients(self, envelope_id: bytes) -> dict[bytes, int | None]:
        rows = (await self.read_quick([("SELECT device_id, acked_at FROM deliveries WHERE envelope_id = ?",
                                        (envelope_id,))]))[0]
        return {r[0]: r[1] for r in rows}

    async def inbox(self, device_id: bytes, *, now: int) -> list[tuple[EnvelopeRow, str]]:
        cols = ", ".join("e." + c.strip() for c in self._ENV_COLS.split(","))
        rows = await self.read_all(
            f"SELECT {cols}, COALESCE(s.rpps, '') FROM deliveries d"  # noqa: S608 - constant columns
            " JOIN envelopes e ON e.id = d.envelope_id"
            " LEFT JOIN devices s ON s.device_id = e.sender"
            " WHERE d.device_id = ? AND d.acked_at IS NULL AND e.state = 'stored'"
            " AND e.expires > ? ORDER BY e.received_at, e.id",
            (device_id, now),
        )
        return [(EnvelopeRow(*r[:10]), r[10]) for r in rows]

    async def acknowledge(
        self, envelope_id: bytes, device_id: bytes, *, now: int, tx: Tx | None = None
    ) -> bool | None:
        """Mark delivered; True when every recipient device has now acknowledged, None if this
        device had already acknowledged (nothing changed)."""
        async with self._tx(tx) as db:
            changed = await db.execute(
                "UPDATE deliveries SET acked_at = ? WHERE envelope_id = ? AND device_id = ? AND acked_at IS NULL",
                (now, envelope_id, device_id),
            )
            if changed == 0:
                return None
            row = await db.fetchone(
                "SELECT COUNT(*) FROM deliveries WHERE envelope_id = ? AND acked_at IS NULL", (envelope_id,)
            )
            assert row is not None
            left = int(row[0])
            if left == 0:
                await db.execute(
                    "UPDATE envelopes SET all_acked_at = COALESCE(all_acked_at, ?) WHERE id = ?",
                    (now, envelope_id),
                )
            return left == 0

    async def purgeable(self, *, now: int, ack_retention: int, stale_upload: int) -> list[bytes]:
        """Envelopes whose ciphertext may go: acknowledged by all, expired, or abandoned."""
        rows = await self.read_all(
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
                "UPDATE envelopes SET state = 'deleted', inline = NULL WHERE id = ?", [(i,) for i in envelope_ids]
            )

    async def purge_nonces(self, *, now: int) -> int:
        async with self.transaction() as db:
            return await db.execute("DELETE FROM nonces WHERE expires <= ?", (now,))

    async def envelope_ids(self, state: str) -> set[bytes]:
        """The ids of the envelopes in ``state`` (uploading, stored, deleted)."""
        rows = await self.read_all("SELECT id FROM envelopes WHERE state = ?", (state,))
        return {r[0] for r in rows}


def _check_prefix(applied: list[tuple[int, str]], known: tuple[Migration, ...]) -> None:
    """The recorded migrations must be the first ones this relay knows, in order."""
    for i, (version, name) in enumerate(applied):
        if i >= len(known) or (known[i].version, known[i].name) != (version, name):
            raise SchemaError(
                f"the database has schema migration {version} ({name}), which this relay does not know: "
                "it was migrated by a newer relay; run that version (or restore a backup)"
            )
