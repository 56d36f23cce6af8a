"""Backup and restore of a relay, on either engine, into one uncompressed tar::

    manifest.json        format, engine, creation time, log origin, size and checkpoint, counts
    relay.sqlite3        SQLite: a consistent snapshot (the online backup API, read side only)
    relay.pgdump         PostgreSQL: ``pg_dump --format=custom --no-owner`` of one snapshot
    log.key              the log's signing key (mode 0600): the backup is a secret
    blobs/<aa>/<id>      the ciphertext of every envelope stored in the snapshot (blob folder)

The database is copied first, then the blobs its snapshot lists, so every blob it
references is in the tar (blobs never change once stored) unless it was purged
meanwhile (counted as ``missing_blobs``: envelopes already due for deletion), and a blob
stored after the snapshot is not. On PostgreSQL the snapshot is exported by a
``REPEATABLE READ`` transaction that also reads the manifest's facts, and ``pg_dump``
dumps exactly that snapshot (``--snapshot``). Uploads in progress are not kept: their
senders resume them from the start (``offset_mismatch``), as after a crash.

A restore goes into a new data folder (and, on PostgreSQL, an empty database through
``pg_restore``), is opened as ``serve`` opens it (the log must match its last signed
checkpoint and be the one the backup recorded), and marks deleted any stored envelope
whose ciphertext is not there (purged while the backup ran).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from relay.blobs import open_blobs
from relay.config import RelayConfig
from relay.log import open_log
from relay.storage import Storage, open_storage

__all__ = [
    "BackupError",
    "backup_postgres",
    "backup_sqlite",
    "check_members",
    "check_restored",
    "drop_restored",
    "extract_members",
    "pg_tool",
    "restore_postgres",
    "restore_sqlite",
    "split_password",
]

BACKUP_FORMAT = "pli-relay-backup"
BACKUP_VERSION = 1
_MEMBER = re.compile(
    r"(manifest\.json|relay\.sqlite3|relay\.pgdump|log\.key|blobs|blobs/[0-9a-f]{2}|blobs/[0-9a-f]{2}/[0-9a-f]{32})"
)
_DB_MEMBER = {"sqlite": "relay.sqlite3", "postgresql": "relay.pgdump"}


class BackupError(Exception):
    """A backup that cannot be made or restored; the message says why."""


# -- writing the tar ----------------------------------------------------------------------------


def _write_tar(to: Path, manifest: dict[str, Any], database: Path, blobs: Path | None,
               stored: list[tuple[bytes, bool]],
               key: Path) -> dict[str, Any]:
    """The backup file: the database copy, the key, then the blobs of ``stored`` (id, in
    the blob store) from the blob folder ``blobs`` (None: they are in the database; small
    envelopes always are), fsynced and renamed into place."""
    if not key.is_file():
        raise BackupError(f"{key}: the log key is missing; a backup without it cannot sign the log again")
    part = to.with_name(to.name + ".part")
    # It holds the log's private key: 0600 from its first byte, whatever the umask.
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    missing = 0
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _add_file(tar, database, _DB_MEMBER[manifest["engine"]])
                _add_file(tar, key, "log.key")
                for envelope_id, in_store in stored if blobs is not None else []:
                    if not in_store:
                        continue
                    assert blobs is not None
                    h = envelope_id.hex()
                    if not _add_file(tar, blobs / h[:2] / h, f"blobs/{h[:2]}/{h}"):
                        missing += 1  # purged after the snapshot: it was due for deletion
                manifest["missing_blobs"] = missing
                raw = json.dumps(manifest, indent=2).encode()
                info = tarfile.TarInfo("manifest.json")
                info.size, info.mtime, info.mode = len(raw), manifest["created"], 0o600
                tar.addfile(info, _Bytes(raw))
            f.flush()
            os.fsync(f.fileno())
        part.replace(to)
        _fsync_dir(to.parent)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return manifest


def _manifest(engine: str, now: int, origin: str | None, head: tuple[Any, ...] | None, stored: int,
              blob_store: str) -> dict[str, Any]:
    return {
        "format": BACKUP_FORMAT, "version": BACKUP_VERSION, "engine": engine, "blob_store": blob_store,
        "created": now, "log_origin": origin,
        "log_size": int(head[0]) if head else 0, "checkpoint": head[1] if head else None,
        "envelopes_stored": stored,
    }


class _Bytes:
    """A file-like object over bytes, for tar.addfile."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos : end]
        self._pos += len(out)
        return out


def _add_file(tar: tarfile.TarFile, path: Path, name: str) -> bool:
    """Add one file, opened first so a file purged meanwhile is skipped, not half-read."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return False
    with f:
        info = tar.gettarinfo(arcname=name, fileobj=f)
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
        tar.addfile(info, f)
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_target(to: Path) -> None:
    if to.exists():
        raise BackupError(f"{to} exists already; choose a new file name")


# -- SQLite -------------------------------------------------------------------------------------


def backup_sqlite(data: Path, to: Path, *, now: int) -> dict[str, Any]:
    """Write a backup of the SQLite relay in ``data`` to the tar file ``to`` (module docstring)."""
    db_path = data / "relay.sqlite3"
    if not db_path.is_file():
        raise BackupError(f"{db_path}: no relay database here")
    _check_target(to)
    with tempfile.TemporaryDirectory(prefix="pli-backup-", dir=to.parent) as tmp:
        snapshot = Path(tmp) / "relay.sqlite3"
        # A plain reader (query_only): in WAL mode the relay keeps writing meanwhile; the
        # backup API copies one consistent state of the database.
        src = sqlite3.connect(db_path, timeout=30)
        try:
            src.execute("PRAGMA query_only=ON")
            dst = sqlite3.connect(snapshot)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                check = dst.execute("PRAGMA integrity_check").fetchone()
                if check is None or check[0] != "ok":
                    raise BackupError(f"the snapshot failed SQLite's integrity check: {check}")
                # (A database not yet migrated to inline envelopes has them all in the blob folder.)
                inline = any(r[1] == "inline" for r in dst.execute("PRAGMA table_info(envelopes)"))
                stored = [(bytes(r[0]), bool(r[1])) for r in dst.execute(
                    f"SELECT id, {'inline IS NULL' if inline else '1'} FROM envelopes WHERE state = 'stored'")]  # noqa: S608
                origin = dst.execute("SELECT value FROM meta WHERE key = 'log_origin'").fetchone()
                head = dst.execute("SELECT size, note FROM log_checkpoints ORDER BY size DESC LIMIT 1").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
        manifest = _manifest("sqlite", now, origin[0] if origin else None, head, len(stored), "fs")
        return _write_tar(to, manifest, snapshot, data / "blobs", stored, data / "log.key")


# -- PostgreSQL ---------------------------------------------------------------------------------


def pg_tool(name: str) -> str:
    """``pg_dump`` or ``pg_restore``: on PATH, else the newest in Debian's
    ``/usr/lib/postgresql/<version>/bin``."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not candidates:
        raise BackupError(f"{name} not found (on PATH or in /usr/lib/postgresql/*/bin): "
                          "install Debian's postgresql-client package")
    return str(candidates[-1])


def split_password(dsn: str) -> tuple[str, str | None]:
    """The DSN without its password, and the password (for ``PGPASSWORD``: never on a
    command line, where every user of the machine could read it)."""
    scheme, sep, rest = dsn.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return dsn, None
    user, _, password = userinfo.partition(":")
    return f"{scheme}://{user}@{hostport}{slash}{tail}", unquote(password)


async def _pg_run(tool: str, dsn: str, *args: str) -> None:
    """Run ``pg_dump`` / ``pg_restore`` on ``dsn``, the password in its environment."""
    bare, password = split_password(dsn)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    proc = await asyncio.create_subprocess_exec(
        pg_tool(tool), "--no-password", *args, f"--dbname={bare}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip()
        if password:
            text = text.replace(password, "****")
        raise BackupError(f"{tool} failed (exit status {proc.returncode}): {text[-2000:]}")


@asynccontextmanager
async def _pg_connection(dsn: str) -> AsyncIterator[Any]:
    import asyncpg  # noqa: PLC0415 - asyncpg only when asked for

    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as e:
        raise BackupError(f"cannot connect to the database: {type(e).__name__}: {e}") from e
    try:
        yield conn
    finally:
        await conn.close()


async def backup_postgres(cfg: RelayConfig, to: Path, *, now: int) -> dict[str, Any]:
    """Write a backup of the PostgreSQL relay ``cfg`` (its database, its data folder's log
    key and blob folder) to the tar file ``to`` (module docstring)."""
    _check_target(to)
    key = cfg.data / "log.key"
    if not key.is_file():
        raise BackupError(f"{key}: the log key is missing; a backup without it cannot sign the log again")
    to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pli-backup-", dir=to.parent) as tmp:
        dump = Path(tmp) / "relay.pgdump"
        async with _pg_connection(cfg.database) as conn, conn.transaction(isolation="repeatable_read",
                                                                          readonly=True):
            # One snapshot for the manifest's facts, the list of blobs and the dump.
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            inline = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
                " WHERE table_name = 'envelopes' AND column_name = 'inline' AND table_schema = current_schema())")
            stored = [(bytes(r[0]), bool(r[1])) for r in await conn.fetch(
                f"SELECT id, {'inline IS NULL' if inline else 'TRUE'} FROM envelopes WHERE state = 'stored'")]  # noqa: S608
            origin = await conn.fetchval("SELECT value FROM meta WHERE key = 'log_origin'")
            head = await conn.fetchrow("SELECT size, note FROM log_checkpoints ORDER BY size DESC LIMIT 1")
            if cfg.blob_store == "fs" and await conn.fetchval(
                    "SELECT to_regclass('blob_chunks') IS NOT NULL AND EXISTS (SELECT 1 FROM blob_chunks)"):
                raise BackupError("this database holds the relay's ciphertext (blob_store = postgresql) but the "
                                  "configuration says blob_store = fs: run backup with the relay's own settings "
                                  "(--config FILE or PLI_RELAY_BLOB_STORE=postgresql)")
            await _pg_run("pg_dump", cfg.database, "--format=custom", "--no-owner", f"--snapshot={snapshot}",
                          f"--file={dump}")
        manifest = _manifest("postgresql", now, origin, tuple(head) if head else None, len(stored), cfg.blob_store)
        blobs = cfg.data / "blobs" if cfg.blob_store == "fs" else None
        return await asyncio.to_thread(_write_tar, to, manifest, dump, blobs, stored, key)


_USER_TABLES = (
    "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
    " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"
)


async def _user_tables(dsn: str) -> list[str]:
    async with _pg_connection(dsn) as conn:
        return [str(r[0]) for r in await conn.fetch(_USER_TABLES)]


async def restore_postgres(source: Path, data: Path, dsn: str) -> dict[str, Any]:
    """Unpack the backup ``source`` of a PostgreSQL relay into the new data folder ``data``
    and the EMPTY database ``dsn`` (``pg_restore``, in one transaction)."""
    _check_empty_folder(data)
    if await _user_tables(dsn):
        raise BackupError("the target database is not empty: restore into a new, empty database "
                          "(createdb), never over a relay's")
    manifest, work = _unpack_to_work(source, data, engine="postgresql")
    restored = False
    try:
        dump = work / "relay.pgdump"
        # One transaction: a dump that fails half-way leaves the database empty.
        await _pg_run("pg_restore", dsn, "--no-owner", "--no-privileges", "--exit-on-error",
                      "--single-transaction", str(dump))
        restored = True
        dump.unlink()
        _install(work, data)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if restored:
            await drop_restored(dsn)
        raise
    return manifest


async def drop_restored(dsn: str) -> None:
    """Empty again a database a failed restore filled (it was empty before)."""
    async with _pg_connection(dsn) as conn, conn.transaction():
        for name in await conn.fetch(_USER_TABLES + " AND c.relkind IN ('r', 'p')"):
            schema, _, table = str(name[0]).partition(".")
            await conn.execute(f'DROP TABLE IF EXISTS "{schema}"."{table}" CASCADE')


# -- restore, both engines ----------------------------------------------------------------------


def restore_sqlite(source: Path, data: Path) -> dict[str, Any]:
    """Unpack the backup ``source`` into the new data folder ``data`` (refused unless absent or empty)."""
    _check_empty_folder(data)
    manifest, work = _unpack_to_work(source, data, engine="sqlite")
    try:
        _install(work, data)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _check_empty_folder(data: Path) -> None:
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise BackupError(f"{data} is not empty: restore into a new folder")


def _unpack_to_work(source: Path, data: Path, *, engine: str) -> tuple[dict[str, Any], Path]:
    try:
        tar = tarfile.open(source, "r:")  # noqa: SIM115 - closed below, after the checks
    except (OSError, tarfile.TarError) as e:
        raise BackupError(f"{source}: not a readable backup ({e})") from e
    data.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{data.name}.restoring-", dir=data.parent))
    try:
        with tar:
            manifest = _unpack(tar, source, work)
        _check_engine(manifest, source, engine)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest, work


def _check_engine(manifest: dict[str, Any], source: Path, engine: str) -> None:
    if manifest.get("engine", "sqlite") != engine:
        other = {"sqlite": "a SQLite relay (restore it without --database)",
                 "postgresql": "a PostgreSQL relay: give --database with a new, empty database"}
        raise BackupError(f"{source} is the backup of {other.get(manifest.get('engine', ''), 'another engine')}")


def _install(work: Path, data: Path) -> None:
    (work / "blobs" / "incoming").mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in [work, *work.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    if data.exists():
        data.rmdir()
    work.rename(data)
    _fsync_dir(data.parent)


def check_members(members: list[tarfile.TarInfo], source: Path) -> None:
    """Refuse a tar that holds anything but what a backup holds: only the names of
    ``_MEMBER`` (so no absolute path, no ``..``), only regular files and directories (no
    symbolic or hard link, no device, no FIFO), each name once, and the manifest, the log
    key and a database."""
    seen: set[str] = set()
    for m in members:
        if not _MEMBER.fullmatch(m.name) or not (m.isreg() or m.isdir()) or m.name in seen:
            raise BackupError(f"{source}: unexpected member {m.name!r}; not a pli-relay backup")
        seen.add(m.name)
    if not {"manifest.json", "log.key"} <= seen or not seen & set(_DB_MEMBER.values()):
        raise BackupError(f"{source}: manifest.json, the database or log.key missing; not a pli-relay backup")


def extract_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], work: Path) -> None:
    """Write the members ``check_members`` accepted under the folder ``work``: directories
    0700, files 0600, each file created anew (never through an existing name or link).

    Our own loop, not ``TarFile.extractall``: its ``filter=`` argument (and
    ``tarfile.data_filter``) do not exist in Debian 12's Python 3.11.2, and nothing of the
    tar's own modes, owners or times is wanted."""
    root = work.resolve()
    for m in members:
        target = root / m.name
        if not target.resolve().is_relative_to(root):  # already excluded by the names; kept as a guard
            raise BackupError(f"unexpected member {m.name!r}; not a pli-relay backup")
        if m.isdir():
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            continue
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        src = tar.extractfile(m)
        if src is None:
            raise BackupError(f"unexpected member {m.name!r}; not a pli-relay backup")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())


def _unpack(tar: tarfile.TarFile, source: Path, work: Path) -> dict[str, Any]:
    """Check the members (only what a backup holds: no links, no other paths), extract
    them into ``work`` and return the manifest (removed from ``work``)."""
    members = tar.getmembers()
    check_members(members, source)
    names = {m.name for m in members}
    extract_members(tar, members, work)
    manifest: dict[str, Any] = json.loads((work / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("format") != BACKUP_FORMAT or manifest.get("version") != BACKUP_VERSION:
        raise BackupError(f"{source}: backup format {manifest.get('format')!r} "
                          f"version {manifest.get('version')!r} is not one this relay reads")
    if _DB_MEMBER.get(manifest.get("engine", "sqlite")) not in names:
        raise BackupError(f"{source}: the {manifest.get('engine')} database is missing; not a pli-relay backup")
    (work / "manifest.json").unlink()
    return manifest


async def check_restored(cfg: RelayConfig, manifest: dict[str, Any]) -> tuple[int, list[bytes]]:
    """Open the restored relay's storage and log as ``serve`` would: the stored tree must
    match its signed checkpoint, and the log be the one the backup recorded. Then mark
    deleted every stored envelope whose ciphertext is not (whole) in the blob store: it
    was purged while the backup ran. Returns the log's size and those envelopes.

    A backup made by an older relay holds an older schema: the restored database is new
    and this relay's, so it is migrated first (as ``pli-relay migrate`` would)."""
    storage = await open_storage(cfg, check=False)
    try:
        await storage.migrate(now=int(time.time()))
        await storage.check_schema()
        tlog = await open_log(cfg.data, storage, origin="", clock=lambda: int(time.time()), window=0)
        try:
            size = await tlog.size()
            if tlog.origin != manifest.get("log_origin") or size != manifest.get("log_size"):
                raise BackupError(f"the restored log ({tlog.origin}, {size} entries) is not the one the backup "
                                  f"recorded ({manifest.get('log_origin')}, {manifest.get('log_size')} entries)")
        finally:
            await tlog.close()
        gone = await _without_blob(cfg, storage)
        await storage.mark_deleted(gone)
    finally:
        await storage.close()
    return size, gone


async def _without_blob(cfg: RelayConfig, storage: Storage) -> list[bytes]:
    blobs = open_blobs(cfg, storage)
    gone = []
    for envelope_id in sorted(await storage.envelope_ids("stored")):
        row = await storage.envelope(envelope_id)
        if row is None or await storage.inline_blob(envelope_id) is not None:
            continue
        if await blobs.size(envelope_id) != len(row.prefix) + row.size:
            gone.append(envelope_id)
    return gone
