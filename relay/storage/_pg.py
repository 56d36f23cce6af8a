"""The engine for several relay nodes: PostgreSQL through asyncpg.

Every node runs the same queries as on SQLite (``?`` becomes ``$n`` here), in READ
COMMITTED transactions from a small pool. Two things differ:

- the log sequencer's batch transaction first takes a transaction-scoped advisory lock
  (``pg_advisory_xact_lock``), so exactly one node appends at a time; each statement after
  it sees what the previous holder committed, and the lock goes with the commit or the
  rollback (a node that dies mid-batch loses its connection, hence its transaction:
  nothing of the batch is kept, and nothing of it was receipted);
- new mail is announced with ``NOTIFY pli_mail`` inside the transaction that stores the
  envelope (delivered only if it commits), and every node ``LISTEN``\\s on one extra
  connection to wake the inbox requests waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import asyncpg
import structlog

from relay.storage import migrations as mig
from relay.storage._base import Row, Step, Storage, Tx
from relay.storage.migrations import Migration

__all__ = ["PostgresStorage", "pg_sql"]

log = structlog.get_logger("pli.relay")

#: advisory lock keys ("pli/log", "pli/mig" as 64-bit integers)
LOG_LOCK = int.from_bytes(b"pli/log\0", "big")
MIGRATE_LOCK = int.from_bytes(b"pli/mig\0", "big")
MAIL_CHANNEL = "pli_mail"
_POOL_SIZE = 10
#: connections holding envelope locks (one per upload request in progress, at most)
_LOCK_POOL_SIZE = 64
#: client-side limit on one statement, seconds (asyncpg raises TimeoutError)
_COMMAND_TIMEOUT = 60.0
_RELISTEN_FIRST = 0.1
_RELISTEN_MAX = 5.0


def server_settings(*, lock_timeout: float, serving: bool) -> dict[str, str]:
    """Session settings of every connection: a frozen peer or a stuck transaction is
    noticed in about a minute, not in the kernel's two hours."""
    settings = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10", "tcp_keepalives_count": "3"}
    if serving:  # not for `pli-relay migrate`: a migration may wait and run long
        settings |= {"idle_in_transaction_session_timeout": "60000",
                     "lock_timeout": str(int(lock_timeout * 1000)),
                     "statement_timeout": str(int(_COMMAND_TIMEOUT * 1000))}
    return settings


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, …`` (our SQL has no ``?`` in literals)."""
    parts = sql.split("?")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        out += [f"${i}", part]
    return "".join(out)


def _rowcount(status: str) -> int:
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


class _PgTx(Tx):
    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__()
        self._conn = conn

    async def execute(self, sql: str, args: Iterable[Any] = ()) -> int:
        values = tuple(args)
        status = await (self._conn.execute(pg_sql(sql), *values) if values else self._conn.execute(sql))
        return _rowcount(status)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(pg_sql(sql), rows)

    async def fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        return [tuple(r) for r in await self._conn.fetch(pg_sql(sql), *args)]


class PostgresStorage(Storage):
    engine: ClassVar[str] = "postgresql"
    MIGRATIONS: ClassVar[tuple[Migration, ...]] = mig.POSTGRES

    def __init__(self, pool: asyncpg.Pool, dsn: str, *, lock_pool: asyncpg.Pool, lock_timeout: float) -> None:
        super().__init__()
        self._pool = pool
        self._lock_pool = lock_pool
        self._dsn = dsn
        self._lock_timeout = lock_timeout
        self._listener: asyncpg.Connection | None = None
        self._listening: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def connect(
        cls, dsn: str, *, migrations: tuple[Migration, ...] | None = None, check: bool = True,
        lock_timeout: float = 10.0,
    ) -> PostgresStorage:
        """A pool on ``dsn``; refuses (SchemaError) a schema not migrated to this relay's.
        ``check=False`` (for ``pli-relay migrate``): no check, no listener, no timeouts on
        statements (a migration may take long)."""
        settings = server_settings(lock_timeout=lock_timeout, serving=check)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=_POOL_SIZE if check else 2,
                                         server_settings=settings, command_timeout=_COMMAND_TIMEOUT if check else None)
        # Envelope locks are held for a whole upload request: on connections of their own,
        # so uploads waiting for the pool can never starve the requests holding them.
        lock_pool = await asyncpg.create_pool(dsn, min_size=0, max_size=_LOCK_POOL_SIZE,
                                              server_settings={k: v for k, v in settings.items()
                                                               if k != "statement_timeout"})
        self = cls(pool, dsn, lock_pool=lock_pool, lock_timeout=lock_timeout)
        if migrations is not None:
            self.migrations = migrations  # tests run their own lists
        if not check:
            return self
        try:
            await self.check_schema()
            await self._listen()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        self._closing = True
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
            self._listening = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self._lock_pool.close()
        await self._pool.close()

    # -- the LISTEN connection ---------------------------------------------------------------

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._dsn, server_settings=server_settings(lock_timeout=self._lock_timeout,
                                                                                  serving=False))
        try:
            await conn.add_listener(MAIL_CHANNEL, self._on_mail)
        except BaseException:
            await conn.close()
            raise
        conn.add_termination_listener(self._on_listener_lost)
        self._listener = conn

    def _on_listener_lost(self, _conn: object) -> None:
        if self._closing or (self._listening is not None and not self._listening.done()):
            return
        log.warning("mail_listener_lost")
        self._listening = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        """Reconnect with backoff, LISTEN again, then wake every waiting inbox: mail
        committed while nobody listened was announced to nobody."""
        delay = _RELISTEN_FIRST
        while not self._closing:
            try:
                await self._listen()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
                log.warning("mail_listener_reconnect_failed", error=type(e).__name__, retry_in=delay)
                await asyncio.sleep(delay)  # backoff against a real server still down
                delay = min(delay * 2, _RELISTEN_MAX)
                continue
            log.info("mail_listener_reconnected")
            self.wake_all()
            return

    def listener_up(self) -> bool:
        """Whether new mail committed on other nodes reaches this node's waiting inboxes now."""
        return self._listener is not None and not self._listener.is_closed()

    @asynccontextmanager
    async def envelope_lock(self, envelope_id: bytes) -> AsyncIterator[object]:
        # A session-level advisory lock on a connection of the lock pool, for the whole
        # request (its transactions come and go on the main pool). A node that dies loses
        # its connection, hence the lock. Waiting is bounded by lock_timeout (55P03: 503).
        key = int.from_bytes(hashlib.sha256(b"pli/envelope\0" + envelope_id).digest()[:8], "big", signed=True)
        # A full lock pool (slow uploads hold their connections) waits no longer than a lock.
        async with self._lock_pool.acquire(timeout=self._lock_timeout) as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
            try:
                yield None
            finally:
                # On a broken connection the lock went with it (the pool discards it).
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._pool.acquire() as conn, conn.transaction():
            tx = _PgTx(conn)
            yield tx
        for fn in tx.after_commit:
            fn()

    @asynccontextmanager
    async def sequencer_transaction(self) -> AsyncIterator[Tx]:
        async with self.transaction() as tx:
            # Bounded: a node frozen while holding the lock (its connection not reset yet)
            # makes this fail with 55P03 after lock_timeout (503 unavailable), not hang.
            await tx.execute(f"SET LOCAL lock_timeout = {int(self._lock_timeout * 1000)}")
            await tx.execute("SELECT pg_advisory_xact_lock(?)", (LOG_LOCK,))
            yield tx

    async def read_all(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        return [tuple(r) for r in await self._pool.fetch(pg_sql(sql), *args)]

    async def log_nodes(self, need: set[tuple[int, int]], tx: Tx | None = None) -> dict[tuple[int, int], bytes]:
        if not need:
            return {}
        pairs = sorted(need)
        sql = ("SELECT n.level, n.idx, n.hash FROM log_nodes n"
               " JOIN unnest(?::int[], ?::bigint[]) AS w(level, idx) ON n.level = w.level AND n.idx = w.idx")
        args = ([p[0] for p in pairs], [p[1] for p in pairs])
        rows = await (tx.fetchall(sql, args) if tx is not None else self.read_all(sql, args))
        return {(int(level), int(idx)): bytes(h) for level, idx, h in rows}

    # -- new mail -------------------------------------------------------------------------

    def mail_steps(self, tx: Tx, device_ids: Sequence[bytes]) -> list[Step]:
        # This node's waiters directly, once committed (even with its listener down);
        # every node's through NOTIFY. At most 64 recipients of 32 hex digits: far below
        # NOTIFY's 8000-byte payload.
        return [*super().mail_steps(tx, device_ids),
                ("SELECT pg_notify(?, ?)", [(MAIL_CHANNEL, ",".join(d.hex() for d in device_ids))])]

    def _on_mail(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            ids = [bytes.fromhex(h) for h in payload.split(",") if h]
        except ValueError:
            log.warning("mail_notification_malformed")
            return
        self._wake(ids)

    # -- schema ---------------------------------------------------------------------------

    async def _applied(self) -> list[tuple[int, str]]:
        if await self._pool.fetchval("SELECT to_regclass('schema_migrations')") is None:
            return []
        rows = await self._pool.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        return [(int(r[0]), str(r[1])) for r in rows]

    async def _apply(self, migration: Migration, *, now: int) -> None:
        async with self.transaction() as tx:
            # Two `pli-relay migrate` at once: the second waits, then finds it applied.
            await tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
            await tx.execute(mig.SCHEMA_MIGRATIONS)
            applied = [(int(r[0]), str(r[1])) for r in await tx.fetchall(
                "SELECT version, name FROM schema_migrations ORDER BY version")]
            mig.refuse_unless_next(applied, migration)
            await tx.execute(migration.sql)  # one multi-statement script, in this transaction
            await tx.execute("INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                             (migration.version, migration.name, now))
