"""The embedded engine: SQLite in WAL mode with ``synchronous=FULL``.

A committed transaction survives a power cut, which matters because an answer to an
upload is a promise. Every change that spans several rows happens in one ``BEGIN
IMMEDIATE`` transaction, so a crash leaves either all of it or none of it. One process
owns the file (one relay node); admin commands may write beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aiosqlite

from relay.storage import migrations as mig
from relay.storage._base import Row, Step, Storage, Tx
from relay.storage.migrations import Migration

__all__ = ["SqliteStorage"]

_T = TypeVar("_T")


class _SqliteTx(Tx):
    """Every call is one trip to the connection's thread (aiosqlite runs any function
    there through ``Connection._execute``, which its own methods use; the version is
    pinned in pyproject). Under load, each await is a round trip through a busy event
    loop that costs far more than the statement, so the transaction's ``BEGIN`` rides
    with its first statement and ``run_all`` makes one trip of many statements."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        super().__init__()
        self._db = db
        self.begun = False

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        db, begin = self._db, not self.begun
        self.begun = True

        def run() -> _T:
            conn = db._conn  # noqa: SLF001 - on the connection's own thread
            if begin:
                conn.execute("BEGIN IMMEDIATE")
            return fn(conn)

        result: _T = await db._execute(run)  # type: ignore[no-untyped-call]  # noqa: SLF001
        return result

    async def execute(self, sql: str, args: Iterable[Any] = ()) -> int:
        values = tuple(args)
        return await self._call(lambda conn: conn.execute(sql, values).rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._call(lambda conn: conn.executemany(sql, rows))

    async def fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        # Executed and fetched in one call: see SqliteStorage.read_all.
        values = tuple(args)
        return await self._call(lambda conn: list(conn.execute(sql, values).fetchall()))

    async def run_all(self, steps: Sequence[Step], *, savepoint: str | None = None) -> None:
        def run(conn: sqlite3.Connection) -> None:
            if savepoint is not None:
                conn.execute(f"SAVEPOINT {savepoint}")
            try:
                for sql, rows in steps:
                    if rows:
                        conn.executemany(sql, rows)
            except BaseException:
                if savepoint is not None:
                    with contextlib.suppress(sqlite3.Error):  # never hide the error that caused it
                        conn.execute(f"ROLLBACK TO {savepoint}")
                        conn.execute(f"RELEASE {savepoint}")
                raise
            if savepoint is not None:
                conn.execute(f"RELEASE {savepoint}")

        await self._call(run)


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back what a failed statement left open, on the connection's own thread."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # never hide the error that caused it
            conn.execute("ROLLBACK")


def _batch(conn: sqlite3.Connection, expect: tuple[int, bytes], steps: Sequence[Step],
           then: Callable[[], object] | None) -> tuple[bool, Exception | None]:
    """:meth:`SqliteStorage.sequencer_batch` on the writer's thread."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT size, root FROM log_checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        if row is None or (int(row[0]), bytes(row[1])) != expect:
            conn.execute("ROLLBACK")
            return False, None
        for sql, rows in steps:
            if rows:
                conn.executemany(sql, rows)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    if then is not None:
        try:
            then()
        except Exception as e:  # committed all the same: the caller decides
            return True, e
    return True, None


def _quick_connection(path: Path) -> sqlite3.Connection:
    """The read-only connection :meth:`SqliteStorage.read_quick` uses on the event loop's
    thread (only there, never across an await: hence no check of the thread)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA query_only=ON")
        conn.execute("PRAGMA busy_timeout=0")
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteStorage(Storage):
    """One writer connection (writers take ``_write_lock`` so transactions never
    interleave), one read-only connection for everything else, and one more read-only
    connection used on the event loop's own thread for point lookups (:meth:`read_quick`)."""

    engine: ClassVar[str] = "sqlite"
    MIGRATIONS: ClassVar[tuple[Migration, ...]] = mig.SQLITE

    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection, quick: sqlite3.Connection) -> None:
        super().__init__()
        self._db = db
        self._reader = reader
        self._quick = quick
        self._write_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls, path: Path, *, migrations: tuple[Migration, ...] | None = None, check: bool = True
    ) -> SqliteStorage:
        """Reads never go through the writer's connection, so no request can see what a
        transaction in progress wrote and may yet roll back (a checkpoint, a leaf).

        A brand-new database (no table at all) is created at the latest schema, so a new
        data folder works at once; an existing one must be at it already (``check=False``,
        for ``pli-relay migrate``: neither).
        """
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            reader = await aiosqlite.connect(path, isolation_level=None)
        except BaseException:
            await db.close()
            raise
        try:
            quick = _quick_connection(path)
        except BaseException:
            await reader.close()
            await db.close()
            raise
        self = cls(db, reader, quick)
        if migrations is not None:
            self.migrations = migrations  # tests run their own lists
        try:
            await reader.execute("PRAGMA query_only=ON")
            await reader.execute("PRAGMA busy_timeout=5000")
            fresh = not await db.execute_fetchall("SELECT 1 FROM sqlite_master LIMIT 1")
            if fresh and check:
                await self.migrate(now=int(time.time()))
            if check:
                await self.check_schema()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        self._quick.close()
        await self._reader.close()
        await self._db.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._write_lock:
            tx = _SqliteTx(self._db)  # BEGIN IMMEDIATE with its first statement
            try:
                yield tx
                if tx.begun:
                    await self._db.execute("COMMIT")
            except BaseException:
                # On a full disk SQLite may have rolled back already (and a failed COMMIT
                # leaves the transaction open): roll back only what is still open, and never
                # let a failed rollback hide the error that caused it. Asked on the
                # connection's thread, after whatever this transaction queued there (a
                # cancelled first statement still runs, BEGIN with it).
                db = self._db

                def rollback() -> None:
                    conn = db._conn  # noqa: SLF001 - on the connection's own thread
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")

                with contextlib.suppress(sqlite3.Error):
                    await db._execute(rollback)  # type: ignore[no-untyped-call]  # noqa: SLF001
                raise
        for fn in tx.after_commit:
            fn()

    one_trip_batches: ClassVar[bool] = True

    async def sequencer_batch(
        self, expect: tuple[int, bytes], build: Callable[[Tx], list[Step]],
        then: Callable[[], object] | None = None,
    ) -> tuple[bool, Exception | None]:
        # BEGIN IMMEDIATE, the check, every statement, COMMIT and the mark in one call on the
        # writer's thread: under load, each trip costs a turn of a busy event loop.
        async with self._write_lock:
            tx = _SqliteTx(self._db)
            steps = build(tx)
            db = self._db

            def run() -> tuple[bool, Exception | None]:
                return _batch(db._conn, expect, steps, then)  # noqa: SLF001 - on the connection's own thread

            result: tuple[bool, Exception | None] = await db._execute(run)  # type: ignore[no-untyped-call]  # noqa: SLF001
        if result[0]:
            for fn in tx.after_commit:
                fn()
        return result

    async def read_all(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        """Rows from the read-only connection, executed and fetched in one call.

        Requests share this connection: a statement left open between an ``execute`` and
        its fetch keeps the connection in that statement's read snapshot, and another
        request's query would then run in the old snapshot (and miss a committed batch).
        """
        return list(await self._reader.execute_fetchall(sql, tuple(args)))  # type: ignore[arg-type]

    async def write_returning(self, sql: str, args: Sequence[Any]) -> list[Row]:
        # BEGIN, the statement and COMMIT in one trip to the writer's thread, under the
        # write lock: the request nonces' groups, which every signed request waits for.
        async with self._write_lock:
            db = self._db

            def run() -> list[Row]:
                conn = db._conn  # noqa: SLF001 - on the connection's own thread
                conn.execute("BEGIN IMMEDIATE")
                try:
                    rows = list(conn.execute(sql, tuple(args)).fetchall())
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
                return rows

            result: list[Row] = await db._execute(run)  # type: ignore[no-untyped-call]  # noqa: SLF001
            return result

    async def read_quick(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Row]]:
        """Point lookups answered on the event loop's thread, without a trip to a database
        thread: a few B-tree pages, microseconds, far less than the trip (a queue, a thread
        woken, the loop woken again). WAL readers wait for no writer; should this one
        ever be told the database is busy (a recovery in progress), it does not wait
        (``busy_timeout`` 0): the same queries go to the reader's thread instead. Each
        query reads the latest commit (its own snapshot)."""
        conn = self._quick
        try:
            return [conn.execute(sql, args).fetchall() for sql, args in queries]
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
        return await self.read_many(queries)

    async def read_many(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Row]]:
        # One call on the reader's thread for them all (see _SqliteTx), in one snapshot.
        reader = self._reader

        def run() -> list[list[Row]]:
            conn = reader._conn  # noqa: SLF001 - on the connection's own thread
            conn.execute("BEGIN")
            try:
                return [list(conn.execute(sql, tuple(args)).fetchall()) for sql, args in queries]
            finally:
                conn.execute("COMMIT")

        result: list[list[Row]] = await reader._execute(run)  # type: ignore[no-untyped-call]  # noqa: SLF001
        return result

    async def log_nodes(self, need: set[tuple[int, int]], tx: Tx | None = None) -> dict[tuple[int, int], bytes]:
        found: dict[tuple[int, int], bytes] = {}
        pairs = sorted(need)
        for i in range(0, len(pairs), 400):
            chunk = pairs[i : i + 400]
            marks = ",".join("(?, ?)" for _ in chunk)
            sql = f"SELECT level, idx, hash FROM log_nodes WHERE (level, idx) IN (VALUES {marks})"  # noqa: S608
            args = [v for pair in chunk for v in pair]
            rows = await (tx.fetchall(sql, args) if tx is not None else self.read_all(sql, args))
            for level, idx, h in rows:
                found[(level, idx)] = h
        return found

    # -- schema ---------------------------------------------------------------------------

    async def _applied(self) -> list[tuple[int, str]]:
        tables = {r[0] for r in await self._db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_migrations" in tables:
            rows = await self._db.execute_fetchall("SELECT version, name FROM schema_migrations ORDER BY version")
            return [(int(r[0]), str(r[1])) for r in rows]
        if "meta" in tables:
            # Before schema_migrations: the one schema there was, version 1.
            rows = list(await self._db.execute_fetchall("SELECT value FROM meta WHERE key = 'schema'"))
            if rows and rows[0][0] == "1":
                return [(1, "initial")]
        return []

    async def _apply(self, migration: Migration, *, now: int) -> None:
        async with self.transaction() as tx:
            await tx.execute(mig.SCHEMA_MIGRATIONS)
            applied = [(int(r[0]), str(r[1])) for r in await tx.fetchall(
                "SELECT version, name FROM schema_migrations ORDER BY version")]
            if not applied:  # adopt a database from before schema_migrations
                legacy = await self._legacy_version(tx)
                if legacy:
                    await tx.execute("INSERT INTO schema_migrations (version, name, applied) VALUES (1, 'initial', ?)",
                                     (now,))
                    applied = [(1, "initial")]
            mig.refuse_unless_next(applied, migration)
            for statement in migration.statements():
                await tx.execute(statement)
            await tx.execute("INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                             (migration.version, migration.name, now))

    @staticmethod
    async def _legacy_version(tx: Tx) -> bool:
        if not await tx.fetchall("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"):
            return False
        row = await tx.fetchone("SELECT value FROM meta WHERE key = 'schema'")
        return row is not None and row[0] == "1"

