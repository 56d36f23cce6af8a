"""Refusals the relay makes on its own account, beside the protocol's parse errors.

All are :class:`protocol.errors.PliError`, so one middleware turns every refusal into
``application/problem+json`` with the error's stable ``code`` and ``status`` (and a
``Retry-After`` header when the refusal says when to come back).

A full or unwritable disk is not the client's fault and not a bug either:
:func:`storage_failure` recognises it, whether the blob store (``OSError``), SQLite
(``sqlite3.Error``) or PostgreSQL met it, and turns it into ``503 storage_unavailable``.
"""

from __future__ import annotations

import errno
import math
import sqlite3

from protocol.errors import PliError

__all__ = [
    "PG_RETRYABLE",
    "STORAGE_RETRY_AFTER",
    "RelayError",
    "forbidden",
    "not_found",
    "rate_limited",
    "storage_failure",
    "storage_unavailable",
    "unavailable",
]

#: seconds a client is asked to wait when the relay's disk is full or unwritable
STORAGE_RETRY_AFTER = 60

#: errno values that mean "this disk cannot take a write now", not "this is a bug"
_STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)
#: SQLite primary result codes of the same kind: BUSY (another writer held the lock past
#: busy_timeout), READONLY, IOERR, FULL, CANTOPEN
_SQLITE_STORAGE_CODES = frozenset({5, 8, 10, 13, 14})


class RelayError(PliError):
    """A refusal with an explicit code and status (SPEC.md §9).

    ``retry_after`` (seconds) becomes a ``Retry-After`` header; ``extra`` members are
    added to the problem document.
    """

    def __init__(
        self, code: str, status: int, message: str, *, retry_after: float | None = None, **extra: object
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))
        self.extra = extra


def not_found(what: str = "no such resource") -> RelayError:
    return RelayError("not_found", 404, what)


def forbidden(what: str) -> RelayError:
    return RelayError("forbidden", 403, what)


def unavailable(what: str, *, retry_after: float = 1) -> RelayError:
    """The relay is busy (too many connections or uploads at once): retry shortly."""
    return RelayError("unavailable", 503, what, retry_after=retry_after)


def rate_limited(what: str, *, retry_after: float) -> RelayError:
    return RelayError("rate_limited", 429, what, retry_after=retry_after)


def storage_unavailable() -> RelayError:
    return RelayError(
        "storage_unavailable", 503,
        "the relay cannot write to its storage right now (disk full or not writable); nothing was "
        "recorded, try again later",
        retry_after=STORAGE_RETRY_AFTER,
    )


def storage_failure(e: BaseException) -> RelayError | None:  # noqa: PLR0911 - one answer per kind
    """``503 storage_unavailable`` if ``e`` says the disk or database cannot take a write
    now, ``503 unavailable`` if it is busy (a lock or statement timed out, a deadlock or
    serialization failure: retry shortly), else None (a bug: 500)."""
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
        return storage_unavailable()
    if isinstance(e, ConnectionError | TimeoutError):
        # The database server refused, reset or stopped answering (OSError subclasses,
        # whatever their errno); TimeoutError: asyncpg's command_timeout, a pool acquire.
        return storage_unavailable() if isinstance(e, ConnectionError) else _busy()
    if _is_asyncpg_interface_error(e):
        return storage_unavailable()  # "connection is closed", "another operation is in progress"…
    if isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_STORAGE_CODES:
        return storage_unavailable()
    # PostgreSQL (asyncpg errors carry the SQLSTATE): out of space or resources, the server
    # shutting down, a read-only standby, the connection lost.
    sqlstate = getattr(e, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(("53", "57P", "08", "25006")):
        return storage_unavailable()
    if sqlstate in _PG_BUSY:
        return _busy()
    return None


#: SQLSTATEs of a busy database, not a broken one: serialization failure, deadlock,
#: lock_timeout (lock_not_available), statement_timeout (query_canceled),
#: idle_in_transaction_session_timeout
_PG_BUSY = frozenset({"40001", "40P01", "55P03", "57014", "25P03"})
#: SQLSTATEs worth running a transaction again for, once
PG_RETRYABLE = frozenset({"40001", "40P01"})


def _busy() -> RelayError:
    return unavailable("the relay's database is busy (a lock or a statement timed out); nothing was "
                       "recorded, try again shortly", retry_after=5)


def _is_asyncpg_interface_error(e: BaseException) -> bool:
    # Without importing asyncpg (optional): its client-side errors, which carry no SQLSTATE.
    return any(c.__module__.startswith("asyncpg") and c.__name__ == "InterfaceError" for c in type(e).__mro__)
