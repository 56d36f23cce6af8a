"""``pli-relay``: run a relay and administer it.

Admin commands work on the relay's data folder directly (SQLite in WAL mode lets them
run beside a serving relay), so no admin endpoint is exposed on the network.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import click
import structlog
from aiohttp import web

from protocol.errors import PliError
from protocol.ids import check_rpps
from protocol.logentry import EntryType, LogEntry
from relay.admin import COMMANDS
from relay.app import create_app
from relay.config import ConfigError, RelayConfig, load_config, load_config_sources
from relay.limits import listen
from relay.log import LogIntegrityError, Skip, device_subject, open_log
from relay.metrics import METRICS
from relay.ops import config_text, effective_config
from relay.storage import Practitioner, SchemaError, Storage, open_storage

__all__ = ["main"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_SENSITIVE = ("key", "secret", "passphrase", "password", "code", "nonce", "signature", "text", "patient")


@functools.lru_cache(maxsize=1024)
def _sensitive(name: str) -> bool:
    # Field names come from the code, a few dozen of them: each is judged once, not on
    # every line (the test took a tenth of a busy relay's logging).
    return any(s in name.lower() for s in _SENSITIVE)


def redact(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence before rendering: no key material, code or content in a log line.

    Fields whose name suggests a secret are masked, and raw bytes never reach the
    renderer (JSONRenderer would fall back to their repr()).
    """
    for name, value in list(event.items()):
        if _sensitive(name):
            event[name] = "[redacted]"
        elif isinstance(value, (bytes, bytearray, memoryview)):
            event[name] = f"[{len(value)} bytes]"
    return event


def configure_logging(fmt: str = "auto", *, file: TextIO | None = None, cache: bool = True) -> None:
    """JSON lines off a terminal, key=value on one (STYLE §30); called once, here.

    ``file`` (default: standard error) and ``cache`` exist for tests that read what the
    relay would have logged, through the same processors.
    """
    out = sys.stderr if file is None else file
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=cache,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def new_invitation_code() -> str:
    """20 Crockford base32 characters (100 random bits) in four groups of five."""
    raw = "".join(secrets.choice(_CROCKFORD) for _ in range(20))
    return "-".join(raw[i : i + 5] for i in range(0, 20, 5))


def _config_sources(ctx: click.Context, **overrides: Any) -> tuple[RelayConfig, dict[str, str]]:
    try:
        return load_config_sources(file=ctx.obj.get("config"), overrides=overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


def _config(ctx: click.Context, **overrides: Any) -> RelayConfig:
    try:
        return load_config(file=ctx.obj.get("config"), overrides=overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file of settings (a [relay] table). Environment variables PLI_RELAY_* override it.")
@click.pass_context
def cli(ctx: click.Context, config: Path | None) -> None:
    """Run a Pli relay: it stores ciphertext envelopes between practitioners' devices and
    never sees a patient's name, a photo, a question or an answer.

    \b
    Start:        pli-relay serve --data /var/lib/pli --listen 127.0.0.1:8470
    Invite:       pli-relay invite --data /var/lib/pli --rpps 10000005479 \\
                      --name "Dr Claire Martin" --profession médecin --specialty SM54
    List devices: pli-relay devices --data /var/lib/pli
    Operations:   pli-relay stats | purge | config   (each with --data, --json, --help)
    Back up:      pli-relay backup --data /var/lib/pli --to /srv/backup/pli.tar
    Restore:      pli-relay restore --from /srv/backup/pli.tar --data /var/lib/pli-new
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


_data_option = click.option(
    "--data", type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the database and blobs [env PLI_RELAY_DATA; default ./pli-relay-data].",
)
_database_option = click.option(
    "--database", help="sqlite (in --data), or a PostgreSQL DSN postgresql://user@host/db?passfile=FILE "
    "(the password in a libpq password file, or PGPASSFILE: never on the command line, which every user "
    "of the machine can read) [env PLI_RELAY_DATABASE; default sqlite].",
)


@cli.command()
@_data_option
@_database_option
@click.option("--listen", help="HOST:PORT; port 0 picks a free port [env PLI_RELAY_LISTEN; default 127.0.0.1:8470].")
@click.pass_context
def serve(ctx: click.Context, data: Path | None, database: str | None, listen: str | None) -> None:
    """Serve the relay until SIGTERM or Ctrl-C, then finish requests in flight.

    The first line on standard output is the URL it listens on, for scripts.
    """
    cfg, sources = _config_sources(ctx, data=data, database=database, listen=listen)
    configure_logging(cfg.log_format)
    try:
        asyncio.run(_serve(cfg, sources))
    except (SchemaError, LogIntegrityError) as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:
        raise click.ClickException(f"cannot listen on {cfg.listen}: {e.strerror}") from e


async def _serve(cfg: RelayConfig, sources: dict[str, str] | None = None) -> None:
    log = structlog.get_logger("pli.relay")
    app = create_app(cfg)
    runner = web.AppRunner(app, shutdown_timeout=cfg.shutdown_timeout, access_log=None)
    await runner.setup()
    server: asyncio.Server | None = None
    try:  # also on a failed start: closing the storage ends its thread, so the process can exit
        # Our own listening socket, so open connections are bounded (relay.limits).
        listener = await listen(runner, cfg)
        server = listener.server
        print(listener.url, flush=True)
        log.info("relay_started", url=listener.url, data=str(cfg.data), max_request=cfg.max_request,
                 max_envelope=cfg.max_envelope, max_connections=cfg.max_connections)
        app[METRICS].watch_connections(listener.gate)
        # Every setting, its value and its source, secrets masked (relay.ops.effective_config).
        settings = effective_config(cfg, sources or {})
        log.info("effective_config", settings=settings)
        if sys.stderr.isatty():
            print(config_text(settings), file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("relay_stopping")
    finally:
        if server is not None:
            server.close()  # no new connections; those open finish their requests below
        await runner.cleanup()
        if server is not None:
            await server.wait_closed()
    log.info("relay_stopped")


def _with_storage(cfg: RelayConfig, fn: Any, *, check: bool = True, create: bool = False) -> Any:
    async def run() -> Any:
        storage = await open_storage(cfg, check=check, create=create)
        try:
            return await fn(storage)
        finally:
            await storage.close()

    try:
        return asyncio.run(run())
    except (SchemaError, LogIntegrityError) as e:
        raise click.ClickException(str(e)) from e


@cli.command()
@_data_option
@_database_option
@click.pass_context
def migrate(ctx: click.Context, data: Path | None, database: str | None) -> None:
    """Bring the database's schema up to this relay's: apply the pending migrations in order.

    Run it after installing a new version and before `serve` (PostgreSQL: also once, on
    an empty database). Each migration runs in its own transaction; one already applied
    or out of order is refused, and a schema newer than this relay's is left alone.
    """
    cfg = _config(ctx, data=data, database=database)

    async def run(storage: Storage) -> tuple[list[str], int]:
        done = await storage.migrate(now=int(time.time()))
        return [f"{m.version} ({m.name})" for m in done], await storage.schema_version()

    done, version = _with_storage(cfg, run, check=False, create=True)
    for name in done:
        click.echo(f"applied migration {name}")
    click.echo(f"{'sqlite' if cfg.database == 'sqlite' else 'postgresql'} schema at version {version}: up to date")


@cli.command()
@_data_option
@click.option("--rpps", required=True, help="The practitioner's RPPS number (11 digits).")
@click.option("--name", required=True, help='Name as colleagues know it, e.g. "Dr Claire Martin".')
@click.option("--profession", required=True, help="médecin, sage-femme, infirmier, ...")
@click.option("--specialty", default="", help="Specialty code or name, e.g. SM54 or dermatologie.")
@click.option("--ttl", type=click.IntRange(60, 90 * 86400), help="Seconds the code stays valid [default 7 days].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def invite(ctx: click.Context, data: Path | None, rpps: str, name: str, profession: str,
           specialty: str, ttl: int | None, as_json: bool) -> None:
    """Create a one-time enrolment code for a practitioner's device.

    Give the code to the practitioner by a channel you trust (in person, by phone
    after checking who is calling); they run `pli enroll URL CODE`.
    """
    cfg = _config(ctx, data=data)
    try:
        rpps = check_rpps(rpps)
    except PliError as e:
        raise click.BadParameter(e.message, param_hint="--rpps") from e
    if not name.strip() or not profession.strip():
        raise click.BadParameter("must not be empty", param_hint="--name/--profession")
    code = new_invitation_code()
    now = int(time.time())
    expires = now + (ttl or cfg.invitation_ttl)
    p = Practitioner(rpps=rpps, name=name.strip(), profession=profession.strip(), specialty=specialty.strip())
    _with_storage(cfg, lambda s: s.create_invitation(p, code, now=now, expires=expires))
    if as_json:
        click.echo(json.dumps({"code": code, "rpps": rpps, "name": p.name, "expires": expires}))
    else:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))
        click.echo(f"Invitation for {p.name} (RPPS {rpps}), single use, valid until {when}:")
        click.echo(code)


@cli.command()
@_data_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def devices(ctx: click.Context, data: Path | None, as_json: bool) -> None:
    """List enrolled devices with their practitioner and fingerprint."""
    from protocol.keys import DevicePublic  # noqa: PLC0415

    cfg = _config(ctx, data=data)
    rows = _with_storage(cfg, lambda s: s.all_devices())
    out = []
    for d in rows:
        pub = DevicePublic.from_record({"sign_key": d.sign_key, "cert": d.cert, "sig": d.sig})
        out.append({"device_id": d.device_id.hex(), "rpps": d.rpps, "fingerprint": pub.fingerprint,
                    "enrolled": d.enrolled, "revoked": d.revoked})
    if as_json:
        click.echo(json.dumps(out))
        return
    if not out:
        click.echo("No device enrolled yet. Create an invitation with `pli-relay invite`.")
    for o in out:
        state = "revoked" if o["revoked"] else "active"
        click.echo(f"{o['device_id']}  RPPS {o['rpps']}  {state}  {o['fingerprint']}")


@cli.command()
@_data_option
@click.argument("device_id")
@click.pass_context
def revoke(ctx: click.Context, data: Path | None, device_id: str) -> None:
    """Revoke a device (lost or stolen laptop): it is refused everywhere from now on."""
    cfg = _config(ctx, data=data)
    try:
        raw = bytes.fromhex(device_id)
    except ValueError as e:
        raise click.BadParameter("a device id is 32 hex digits", param_hint="DEVICE_ID") from e
    if len(raw) != 16:
        raise click.BadParameter("a device id is 32 hex digits", param_hint="DEVICE_ID")

    async def run(storage: Storage) -> int | None:
        # Revocation is a log leaf too: a relay cannot quietly drop or restore a device.
        tlog = await open_log(cfg.data, storage, origin=cfg.log_origin, clock=lambda: int(time.time()), window=0)
        found: list[str] = []

        async def action(tx: Any) -> None:
            device = await storage.device(raw)
            if device is None or not await storage.revoke_device(raw, now=int(time.time()), tx=tx):
                raise Skip
            found.append(device.rpps)

        try:
            appended = await tlog.append(
                lambda now: LogEntry(type=EntryType.DEVICE_REVOKED, time=now, device_id=raw, rpps=found[0]),
                action, envelope_id=device_subject(raw),
            )
        except Skip:
            return None
        finally:
            await tlog.close()
        return appended.index

    leaf = _with_storage(cfg, run)
    if leaf is None:
        raise click.ClickException("no such active device")
    click.echo(f"Device {device_id} revoked (log entry {leaf}).")


for _command in COMMANDS:  # config, stats, purge, backup, restore (relay.admin)
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="pli-relay")


if __name__ == "__main__":
    main()
