"""``pli-relay`` operations commands: ``config``, ``stats``, ``purge``, ``backup``, ``restore``.

Like the other admin commands they work on the data folder (and database) directly,
beside a serving relay: SQLite in WAL mode lets readers and a writer run together, so
nothing here needs an admin endpoint on the network.

A backup (SQLite) is one uncompressed tar (ciphertext does not compress)::

    manifest.json        format, creation time, log origin, size and checkpoint, counts
    relay.sqlite3        a consistent snapshot (SQLite's online backup API, read side only)
    log.key              the log's signing key (mode 0600): the backup is a secret
    blobs/<aa>/<id>      the ciphertext of every envelope stored in the snapshot

Taken in that order, so every blob the snapshot lists is in the tar unless it was purged
meanwhile (counted as ``missing_blobs``: envelopes already due for deletion), and a blob
stored after the snapshot is not. Uploads in progress are not kept: their senders resume
them from the start (``offset_mismatch``), as after a crash.
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
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from relay.app import BLOBS, CLOCK, CONFIG, STORAGE
from relay.blobs import BlobStore
from relay.config import ConfigError, RelayConfig, load_config, load_config_sources
from relay.log import open_log
from relay.ops import config_reference, config_text, effective_config
from relay.storage import Storage, open_storage

__all__ = ["COMMANDS", "BackupError", "backup_sqlite", "restore_sqlite"]

BACKUP_FORMAT = "pli-relay-backup"
BACKUP_VERSION = 1
_MEMBER = re.compile(r"(manifest\.json|relay\.sqlite3|log\.key|blobs|blobs/[0-9a-f]{2}|blobs/[0-9a-f]{2}/[0-9a-f]{32})")
_NOT_YET_PG = (
    "not yet for PostgreSQL: back up a PostgreSQL relay with `pg_dump --format=custom` plus a copy of "
    "DATA/log.key and the blob folder (see deploy/README.md)"
)


class BackupError(Exception):
    """A backup that cannot be made or restored; the message says why."""


def _load(ctx: click.Context, **overrides: Any) -> RelayConfig:
    try:
        return load_config(file=ctx.obj.get("config"), overrides=overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except BackupError as e:
        raise click.ClickException(str(e)) from e


_data_option = click.option(
    "--data", type=click.Path(file_okay=False, path_type=Path),
    help="The relay's data folder [env PLI_RELAY_DATA; default ./pli-relay-data].",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts and monitoring.")


# -- config ----------------------------------------------------------------------------------


@click.command("config")
@_data_option
@_json_option
@click.option("--reference", is_flag=True, help="Print the reference of every setting (Markdown) instead.")
@click.pass_context
def config_command(ctx: click.Context, data: Path | None, as_json: bool, reference: bool) -> None:
    """Show the configuration `serve` would run with: every setting, its value and where
    it comes from (default, file = the --config TOML, env = PLI_RELAY_*, flag).

    Secrets are masked (a database DSN's password). `serve` logs the same at start
    (event `effective_config`).
    """
    if reference:
        click.echo(config_reference(), nl=False)
        return
    try:
        cfg, sources = load_config_sources(file=ctx.obj.get("config"), overrides={"data": data})
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    settings = effective_config(cfg, sources)
    click.echo(json.dumps(settings) if as_json else config_text(settings))


# -- stats -----------------------------------------------------------------------------------


async def collect_stats(storage: Storage, *, now: int) -> dict[str, Any]:
    """The relay's figures, by plain reads (portable SQL: every engine runs it)."""

    async def one(sql: str, args: tuple[Any, ...] = ()) -> int:
        row = await storage.read_one(sql, args)
        return int(row[0]) if row is not None and row[0] is not None else 0

    states = {"uploading": {"count": 0, "bytes": 0}, "stored": {"count": 0, "bytes": 0},
              "deleted": {"count": 0, "bytes": 0}}
    for state, count, size in await storage.read_all(
        "SELECT state, COUNT(*), COALESCE(SUM(CASE WHEN state = 'uploading' THEN received ELSE size END), 0)"
        " FROM envelopes GROUP BY state"
    ):
        states[str(state)] = {"count": int(count), "bytes": int(size)}
    oldest = await one(
        "SELECT MIN(e.received_at) FROM envelopes e JOIN deliveries d ON d.envelope_id = e.id"
        " WHERE d.acked_at IS NULL AND e.state = 'stored' AND e.expires > ?", (now,)
    )
    return {
        "practitioners": await one("SELECT COUNT(*) FROM practitioners"),
        "devices": {"active": await one("SELECT COUNT(*) FROM devices WHERE revoked IS NULL"),
                    "revoked": await one("SELECT COUNT(*) FROM devices WHERE revoked IS NOT NULL")},
        "invitations_pending": await one(
            "SELECT COUNT(*) FROM invitations WHERE used_at IS NULL AND expires > ?", (now,)),
        "envelopes": states,
        "bytes_stored": states["stored"]["bytes"] + states["uploading"]["bytes"],
        "deliveries_pending": await one(
            "SELECT COUNT(*) FROM deliveries d JOIN envelopes e ON e.id = d.envelope_id"
            " WHERE d.acked_at IS NULL AND e.state = 'stored' AND e.expires > ?", (now,)),
        "oldest_unacknowledged_age": now - oldest if oldest else None,
        "log_size": await one("SELECT MAX(size) FROM log_checkpoints"),
        "nonces": await one("SELECT COUNT(*) FROM nonces"),
    }


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "none"
    days, rest = divmod(seconds, 86400)
    return f"{days} d {rest // 3600} h" if days else f"{rest // 3600} h {rest % 3600 // 60} min"


@click.command("stats")
@_data_option
@_json_option
@click.pass_context
def stats_command(ctx: click.Context, data: Path | None, as_json: bool) -> None:
    """Figures of the relay: practitioners, devices (active, revoked), envelopes by state
    and their bytes, pending deliveries, the age of the oldest envelope a recipient has
    not acknowledged yet, the log's size.

    \b
    Safe beside a running relay (reads only). For monitoring, scrape GET /metrics instead;
    `stats --json` suits a cron job or a report:
        pli-relay stats --data /var/lib/pli --json | jq .oldest_unacknowledged_age
    """
    cfg = _load(ctx, data=data)

    async def run() -> dict[str, Any]:
        storage = await open_storage(cfg)
        try:
            return await collect_stats(storage, now=int(time.time()))
        finally:
            await storage.close()

    s = _run(run())
    if as_json:
        click.echo(json.dumps(s))
        return
    env = s["envelopes"]
    click.echo(f"Practitioners        {s['practitioners']}")
    click.echo(f"Devices               {s['devices']['active']} active, {s['devices']['revoked']} revoked")
    click.echo(f"Invitations pending   {s['invitations_pending']}")
    click.echo(f"Envelopes stored      {env['stored']['count']} ({_size(env['stored']['bytes'])})")
    click.echo(f"Uploads in progress   {env['uploading']['count']} ({_size(env['uploading']['bytes'])} received)")
    click.echo(f"Envelopes deleted     {env['deleted']['count']} (rows kept, ciphertext gone)")
    click.echo(f"Deliveries pending    {s['deliveries_pending']}")
    click.echo(f"Oldest unacknowledged {_age(s['oldest_unacknowledged_age'])}")
    click.echo(f"Log size              {s['log_size']} entries")


# -- purge -----------------------------------------------------------------------------------


async def purge_now(cfg: RelayConfig, *, now: int) -> dict[str, Any]:
    """Run the relay's own retention purge (``relay.routes.purge_once``) once, and say what went."""
    from relay.routes import purge_once  # noqa: PLC0415 - routes imports the whole app

    storage = await open_storage(cfg)
    try:
        app = web.Application()
        app[CONFIG] = cfg
        app[CLOCK] = lambda: now
        app[STORAGE] = storage
        app[BLOBS] = BlobStore(cfg.data / "blobs")
        before = await storage.envelope_ids("deleted")
        row = await storage.read_one("SELECT COUNT(*) FROM nonces WHERE expires <= ?", (now,))
        nonces = int(row[0]) if row is not None else 0
        await purge_once(app)
        removed = {"expired": 0, "acknowledged": 0, "abandoned_uploads": 0, "bytes": 0}
        for envelope_id in await storage.envelope_ids("deleted") - before:
            e = await storage.envelope(envelope_id)
            if e is None:
                continue
            kind = "abandoned_uploads" if e.received < e.size else "expired" if e.expires <= now else "acknowledged"
            removed[kind] += 1
            removed["bytes"] += e.received
        removed["nonces"] = nonces
        return removed
    finally:
        await storage.close()


@click.command("purge")
@_data_option
@_json_option
@click.pass_context
def purge_command(ctx: click.Context, data: Path | None, as_json: bool) -> None:
    """Run the retention purge now, as the relay does every purge_interval seconds.

    \b
    It deletes the ciphertext of envelopes that expired, of those every recipient
    acknowledged more than ack_retention seconds ago, and of uploads abandoned for 7
    days, and forgets request nonces too old to be replayed. Receipts, the log and the
    envelopes' rows stay for ever. Safe beside a running relay. Prints what went.
    """
    cfg = _load(ctx, data=data)
    r = _run(purge_now(cfg, now=int(time.time())))
    if as_json:
        click.echo(json.dumps(r))
        return
    total = r["expired"] + r["acknowledged"] + r["abandoned_uploads"]
    click.echo(f"Purged {total} envelopes ({_size(r['bytes'])} of ciphertext): {r['expired']} expired, "
               f"{r['acknowledged']} acknowledged, {r['abandoned_uploads']} abandoned uploads; "
               f"{r['nonces']} old request nonces.")


# -- backup and restore ----------------------------------------------------------------------


def backup_sqlite(data: Path, to: Path, *, now: int) -> dict[str, Any]:
    """Write a backup of the relay in ``data`` to the tar file ``to`` (see module docstring)."""
    db_path = data / "relay.sqlite3"
    if not db_path.is_file():
        raise BackupError(f"{db_path}: no relay database here")
    if to.exists():
        raise BackupError(f"{to} exists already; choose a new file name")
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
                stored = [bytes(r[0]) for r in dst.execute("SELECT id FROM envelopes WHERE state = 'stored'")]
                origin = dst.execute("SELECT value FROM meta WHERE key = 'log_origin'").fetchone()
                head = dst.execute("SELECT size, note FROM log_checkpoints ORDER BY size DESC LIMIT 1").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
        key = data / "log.key"
        if not key.is_file():
            raise BackupError(f"{key}: the log key is missing; a backup without it cannot sign the log again")
        part = to.with_name(to.name + ".part")
        missing = 0
        with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
            manifest: dict[str, Any] = {
                "format": BACKUP_FORMAT, "version": BACKUP_VERSION, "engine": "sqlite", "created": now,
                "log_origin": origin[0] if origin else None,
                "log_size": int(head[0]) if head else 0, "checkpoint": head[1] if head else None,
                "envelopes_stored": len(stored),
            }
            tar.add(snapshot, "relay.sqlite3")
            _add_file(tar, key, "log.key")
            for envelope_id in stored:
                h = envelope_id.hex()
                if not _add_file(tar, data / "blobs" / h[:2] / h, f"blobs/{h[:2]}/{h}"):
                    missing += 1  # purged after the snapshot: it was due for deletion
            manifest["missing_blobs"] = missing
            raw = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size, info.mtime, info.mode = len(raw), now, 0o600
            tar.addfile(info, _Bytes(raw))
        with part.open("rb") as f:
            os.fsync(f.fileno())
        part.replace(to)
    return manifest


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


def restore_sqlite(source: Path, data: Path) -> dict[str, Any]:
    """Unpack the backup ``source`` into the new data folder ``data`` (refused unless absent or empty)."""
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise BackupError(f"{data} is not empty: restore into a new folder")
    try:
        tar = tarfile.open(source, "r:")  # noqa: SIM115 - closed below, after the checks
    except (OSError, tarfile.TarError) as e:
        raise BackupError(f"{source}: not a readable backup ({e})") from e
    data.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{data.name}.restoring-", dir=data.parent))
    try:
        with tar:
            manifest = _unpack(tar, source, work)
        for path in [work, *work.rglob("*")]:
            path.chmod(0o700 if path.is_dir() else 0o600)
        (work / "blobs" / "incoming").mkdir(parents=True, exist_ok=True)
        if data.exists():
            data.rmdir()
        work.rename(data)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _unpack(tar: tarfile.TarFile, source: Path, work: Path) -> dict[str, Any]:
    """Check the members (only what a backup holds: no links, no other paths), extract
    them into ``work`` and return the manifest (removed from ``work``)."""
    members = tar.getmembers()
    for m in members:
        if not _MEMBER.fullmatch(m.name) or not (m.isfile() or m.isdir()):
            raise BackupError(f"{source}: unexpected member {m.name!r}; not a pli-relay backup")
    if not {"manifest.json", "relay.sqlite3", "log.key"} <= {m.name for m in members}:
        raise BackupError(f"{source}: manifest.json, relay.sqlite3 or log.key missing; not a pli-relay backup")
    tar.extractall(work, filter="data")
    manifest: dict[str, Any] = json.loads((work / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("format") != BACKUP_FORMAT or manifest.get("version") != BACKUP_VERSION:
        raise BackupError(f"{source}: backup format {manifest.get('format')!r} "
                          f"version {manifest.get('version')!r} is not one this relay reads")
    (work / "manifest.json").unlink()
    return manifest


async def _check_restored(data: Path, manifest: dict[str, Any]) -> int:
    """Open the restored relay's storage and log as ``serve`` would: the stored tree must
    match its signed checkpoint, and the log be the one the backup recorded."""
    cfg = RelayConfig(data=data)
    storage = await open_storage(cfg)
    try:
        tlog = await open_log(data, storage, origin="", clock=lambda: int(time.time()), window=0)
        try:
            size = await tlog.size()
            if tlog.origin != manifest.get("log_origin") or size != manifest.get("log_size"):
                raise BackupError(f"the restored log ({tlog.origin}, {size} entries) is not the one the backup "
                                  f"recorded ({manifest.get('log_origin')}, {manifest.get('log_size')} entries)")
        finally:
            await tlog.close()
    finally:
        await storage.close()
    return size


@click.command("backup")
@_data_option
@click.option("--to", "to", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The backup file to write (a tar); refused if it exists.")
@_json_option
@click.pass_context
def backup_command(ctx: click.Context, data: Path | None, to: Path, as_json: bool) -> None:
    """Back up a relay, running or not, into one tar file: a consistent snapshot of the
    database (SQLite's online backup API), the log key and the ciphertext blobs.

    \b
    The relay keeps serving meanwhile. The file holds the log key: keep it as you keep
    the key (encrypted, offline), e.g. `age -r KEY -o relay.tar.age relay.tar`.
        pli-relay backup --data /var/lib/pli --to /srv/backup/pli-$(date +%F).tar
    Restore with `pli-relay restore --from FILE --data NEWDIR`.
    """
    cfg = _load(ctx, data=data)
    if cfg.database != "sqlite":
        raise click.ClickException(f"backup: {_NOT_YET_PG}")
    try:
        manifest = backup_sqlite(cfg.data, to, now=int(time.time()))
    except (BackupError, sqlite3.Error, OSError) as e:
        raise click.ClickException(f"backup failed: {e}") from e
    summary = {k: manifest[k] for k in ("log_origin", "log_size", "envelopes_stored", "missing_blobs")}
    if as_json:
        click.echo(json.dumps({"file": str(to), **summary, "checkpoint": manifest["checkpoint"]}))
        return
    click.echo(f"Backup written to {to}: log {summary['log_origin']} at {summary['log_size']} entries, "
               f"{summary['envelopes_stored']} envelopes stored.")
    if summary["missing_blobs"]:
        click.echo(f"{summary['missing_blobs']} envelopes were purged while the backup ran; "
                   "their ciphertext is not in it (they were due for deletion).")
    click.echo("It holds the log key: keep it encrypted and offline.")


@click.command("restore")
@click.option("--from", "source", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file written by `pli-relay backup`.")
@click.option("--data", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The new data folder: absent or empty (never restore over a relay).")
@_json_option
@click.pass_context
def restore_command(ctx: click.Context, source: Path, data: Path, as_json: bool) -> None:
    """Restore a backup into a new data folder, and check it as `serve` would open it.

    \b
    The log is checked against its last signed checkpoint and must be the one the
    backup recorded. Then start the relay on the new folder (same log_origin):
        pli-relay restore --from pli-2025-06-01.tar --data /var/lib/pli-restored
        pli-relay serve --data /var/lib/pli-restored
    Clients that hold a later checkpoint than the backup's will see the log shrink and
    refuse it: restore the most recent backup, and tell practitioners (deploy/README.md).
    """
    cfg = _load(ctx, data=data)
    if cfg.database != "sqlite":
        raise click.ClickException(f"restore: {_NOT_YET_PG}")
    try:
        manifest = restore_sqlite(source, data)
    except (BackupError, OSError, ValueError) as e:
        raise click.ClickException(f"restore failed: {e}") from e
    try:
        size = asyncio.run(_check_restored(data, manifest))
    except Exception as e:
        shutil.rmtree(data, ignore_errors=True)  # ours: the folder was absent or empty
        raise click.ClickException(f"restore failed, nothing kept: {e}") from e
    if as_json:
        click.echo(json.dumps({"data": str(data), "log_origin": manifest["log_origin"], "log_size": size,
                               "envelopes_stored": manifest["envelopes_stored"]}))
        return
    click.echo(f"Restored into {data}: log {manifest['log_origin']} at {size} entries (checked), "
               f"{manifest['envelopes_stored']} envelopes stored.")


COMMANDS = (config_command, stats_command, purge_command, backup_command, restore_command)
