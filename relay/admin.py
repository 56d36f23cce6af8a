"""``pli-relay`` operations commands: ``config``, ``stats``, ``purge``, ``backup``, ``restore``.

Like the other admin commands they work on the data folder (and database) directly,
beside a serving relay: SQLite in WAL mode lets readers and a writer run together, and
PostgreSQL serves every node and tool at once, so nothing here needs an admin endpoint on
the network. Backups and restores themselves are in ``relay.backup``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from relay.app import BLOBS, CLOCK, CONFIG, STORAGE
from relay.backup import (
    BackupError,
    backup_postgres,
    backup_sqlite,
    check_restored,
    drop_restored,
    restore_postgres,
    restore_sqlite,
)
from relay.blobs import open_blobs
from relay.config import ConfigError, RelayConfig, load_config, load_config_sources
from relay.ops import config_reference, config_text, effective_config
from relay.storage import SchemaError, Storage, open_storage

__all__ = ["COMMANDS", "BackupError", "backup_sqlite", "restore_sqlite"]


def _load(ctx: click.Context, **overrides: Any) -> RelayConfig:
    try:
        return load_config(file=ctx.obj.get("config"), overrides=overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except (BackupError, SchemaError) as e:  # SchemaError: also no database here (NoRelayDataError)
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
        app[BLOBS] = open_blobs(cfg, storage)
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


_database_option = click.option(
    "--database", help="sqlite (in --data), or a PostgreSQL DSN postgresql://user@host/db?passfile=FILE "
    "(the password in a libpq password file, or PGPASSFILE: never on the command line, which every user "
    "of the machine can read) [env PLI_RELAY_DATABASE; default sqlite].",
)


@click.command("backup")
@_data_option
@_database_option
@click.option("--to", "to", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The backup file to write (a tar); refused if it exists.")
@_json_option
@click.pass_context
def backup_command(ctx: click.Context, data: Path | None, database: str | None, to: Path, as_json: bool) -> None:
    """Back up a relay, running or not, into one tar file: a consistent snapshot of the
    database (SQLite's online backup API; PostgreSQL: pg_dump of one snapshot), the log
    key and the ciphertext blobs (copied after the snapshot).

    \b
    The relay keeps serving meanwhile. The file holds the log key: keep it as you keep
    the key (encrypted, offline), e.g. `age -r KEY -o relay.tar.age relay.tar`.
        pli-relay backup --data /var/lib/pli --to /srv/backup/pli-$(date +%F).tar
        pli-relay backup --data /srv/pli --database postgresql://pli@db/pli --to pli.tar
    PostgreSQL: pg_dump and its password (PGPASSWORD, from the DSN) come from Debian's
    postgresql-client. Restore with `pli-relay restore --from FILE --data NEWDIR`.
    """
    cfg = _load(ctx, data=data, database=database)
    now = int(time.time())
    try:
        if cfg.database == "sqlite":
            manifest = backup_sqlite(cfg.data, to, now=now)
        else:
            manifest = asyncio.run(backup_postgres(cfg, to, now=now))
    except (BackupError, sqlite3.Error, OSError) as e:
        raise click.ClickException(f"backup failed: {e}") from e
    summary = {k: manifest[k] for k in ("engine", "log_origin", "log_size", "envelopes_stored", "missing_blobs")}
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
@_database_option
@_json_option
@click.pass_context
def restore_command(ctx: click.Context, source: Path, data: Path, database: str | None, as_json: bool) -> None:
    """Restore a backup into a new data folder (and, for PostgreSQL, a new EMPTY database),
    and check it as `serve` would open it.

    \b
    The log is checked against its last signed checkpoint and must be the one the
    backup recorded. An envelope whose ciphertext is not in the backup (purged while it
    ran) is marked deleted. Then start the relay on the new folder (same log_origin):
        pli-relay restore --from pli-2025-06-01.tar --data /var/lib/pli-restored
        pli-relay serve --data /var/lib/pli-restored
        pli-relay restore --from pli.tar --data /srv/pli-new --database postgresql://pli@db/pli_new
    Clients that hold a later checkpoint than the backup's will see the log shrink and
    refuse it: restore the most recent backup, and tell practitioners (deploy/README.md).
    """
    cfg = _load(ctx, data=data, database=database)
    postgres = cfg.database != "sqlite"
    try:
        manifest = asyncio.run(restore_postgres(source, data, cfg.database)) if postgres \
            else restore_sqlite(source, data)
    except (BackupError, OSError, ValueError) as e:
        raise click.ClickException(f"restore failed: {e}") from e
    cfg = _load(ctx, data=data, database=database, blob_store=manifest.get("blob_store", "fs"))
    try:
        size, gone = asyncio.run(check_restored(cfg, manifest))
    except Exception as e:
        shutil.rmtree(data, ignore_errors=True)  # ours: the folder was absent or empty
        if postgres:
            asyncio.run(drop_restored(cfg.database))  # and the database was empty
        raise click.ClickException(f"restore failed, nothing kept: {e}") from e
    if gone:
        click.echo(f"{len(gone)} envelopes stored in the snapshot had no ciphertext in the backup (purged while "
                   f"it ran); marked deleted: {' '.join(g.hex() for g in gone)}", err=True)
    if as_json:
        click.echo(json.dumps({"data": str(data), "engine": manifest.get("engine", "sqlite"),
                               "log_origin": manifest["log_origin"], "log_size": size,
                               "envelopes_stored": manifest["envelopes_stored"] - len(gone),
                               "marked_deleted": len(gone)}))
        return
    click.echo(f"Restored into {data}: log {manifest['log_origin']} at {size} entries (checked), "
               f"{manifest['envelopes_stored'] - len(gone)} envelopes stored.")
    if postgres and manifest.get("blob_store", "fs") != "fs":
        click.echo(f"Its ciphertext is in the database: run it with blob_store = {manifest['blob_store']}.")


COMMANDS = (config_command, stats_command, purge_command, backup_command, restore_command)
