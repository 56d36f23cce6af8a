"""``pli``: the practitioner's command.

Every command prints plain French or English (``PLI_LANG``), or one JSON document
with ``--json``. Errors are mapped here, at the boundary: a user sees what went wrong
and what to do, never a traceback (``PLI_DEBUG=1`` shows it for developers).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from client import core
from client.home import Home
from client.ui import Progress, emit, error_text, tr
from protocol.errors import PliError
from protocol.ids import check_rpps
from protocol.keys import DeviceKeys

__all__ = ["main"]

T = TypeVar("T")


class Ctx:
    def __init__(self, home: Home, as_json: bool) -> None:
        self.home = home
        self.json = as_json

    def passphrase(self, *, confirm: bool = False) -> bytes:
        """From PLI_PASSPHRASE_FILE, PLI_PASSPHRASE (scripts), or a hidden prompt."""
        path = os.environ.get("PLI_PASSPHRASE_FILE")
        if path:
            return Path(path).read_text(encoding="utf-8").rstrip("\n").encode()
        env = os.environ.get("PLI_PASSPHRASE")
        if env is not None:
            return env.encode()
        if not sys.stdin.isatty():
            raise click.UsageError(
                tr("pas de phrase de passe : définissez PLI_PASSPHRASE_FILE pour un script",
                   "no passphrase: set PLI_PASSPHRASE_FILE when running from a script")
            )
        first = getpass.getpass(tr("Phrase de passe : ", "Passphrase: "))
        if confirm:
            if len(first) < 8:
                raise click.UsageError(tr("au moins 8 caractères", "at least 8 characters"))
            if getpass.getpass(tr("Encore une fois : ", "Again: ")) != first:
                raise click.UsageError(tr("les deux saisies diffèrent", "the two entries differ"))
        return first.encode()

    def keys(self) -> DeviceKeys:
        return self.home.unlock(self.passphrase())

    def progress(self, label: str) -> Progress:
        return Progress(label, enabled=not self.json)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


pass_ctx = click.make_pass_decorator(Ctx)


def _text_option(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--text-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Read the text from a file (UTF-8).")(f)
    return click.option("--text", help="The text itself.")(f)


def _read_text(text: str | None, text_file: Path | None) -> str:
    if text_file is not None:
        return text_file.read_text(encoding="utf-8")
    if text is None:
        raise click.UsageError(tr("indiquez --text ou --text-file", "give --text or --text-file"))
    return text


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="PLI_HOME",
              help="This device's Pli folder [env PLI_HOME; default ~/.pli].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, for scripts.")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, as_json: bool) -> None:
    """Pli: send a téléexpertise case to a colleague, end-to-end encrypted.

    \b
    First time on this computer:
      pli init                               create this device's keys
      pli enroll https://relay.example CODE  join the relay with your invitation code
    A GP asking for an opinion:
      pli case new --from cas.yaml photo.jpg create, check and send a request (or answer prompts)
      pli cases                              your cases, with their status and 7-day deadline
      pli case show 3f2a                     a case in full (first characters of its id)
      pli case complement 3f2a --text "..." photo2.jpg   when the specialist asks for more
      pli case report 3f2a                   the compte rendu (PDF) for the patient's record
      pli billing --month 2026-11            your RQD / TE2 lines for the month
    A specialist answering:
      pli cases ; pli case show 3f2a
      pli case answer 3f2a --avis "..." --prescription "..."   (or --complement, --refus, --presentiel)
    Try everything at once, with a relay of its own:
      pli demo
    """
    ctx.obj = Ctx(Home(home) if home else Home.default(), as_json)
    # A log alarm stops everything that would trust the relay again, until a person looks.
    from client.logstate import ALARM_FILE, LogAlarm, alarm  # noqa: PLC0415

    raised = alarm(ctx.obj.home) if ctx.invoked_subcommand not in {"audit", "whoami", "demo", None} else None
    if raised:
        raise LogAlarm(
            f"{raised['what']}: {raised['detail']} (recorded in {ctx.obj.home.root / ALARM_FILE}). "
            + tr("Ne vous fiez plus à ce relais ; prévenez son opérateur (votre ARS) "
                 "et gardez ce fichier comme preuve.",
                 "Do not rely on this relay; tell its operator (your ARS) and keep that file as evidence.")
        )


@cli.command()
@click.option("--fast-kdf", is_flag=True, hidden=True, help="Minimum Argon2id cost (tests only).")
@pass_ctx
def init(c: Ctx, fast_kdf: bool) -> None:
    """Create this device's keys, sealed under a passphrase you choose.

    The passphrase never leaves this computer; without it the keys cannot be used.
    Scripts set PLI_PASSPHRASE_FILE (a file holding it) instead of typing it.
    """
    passphrase = c.passphrase(confirm=True)
    if len(passphrase) < 8:
        raise click.UsageError(tr("la phrase de passe doit faire au moins 8 caractères",
                                  "the passphrase must be at least 8 characters long"))
    keys = DeviceKeys.generate(now=int(time.time()))
    c.home.create(keys, passphrase, fast_kdf=fast_kdf)
    pub = keys.public()
    emit(c.json, {"device_id": keys.device_id.hex(), "fingerprint": pub.fingerprint, "home": str(c.home.root)},
         tr(f"Clés créées dans {c.home.root}.\nEmpreinte de cet appareil : {pub.fingerprint}\n"
            "Étape suivante : pli enroll URL CODE",
            f"Keys created in {c.home.root}.\nThis device's fingerprint: {pub.fingerprint}\n"
            "Next: pli enroll URL CODE"))


@cli.command()
@click.argument("url")
@click.argument("code")
@pass_ctx
def enroll(c: Ctx, url: str, code: str) -> None:
    """Join the relay at URL with the one-time invitation CODE its administrator gave you."""
    keys = c.keys()
    p = run(core.enroll(c.home, keys, url, code))
    emit(c.json, asdict(p),
         tr(f"Inscrit sur {p.relay} : {p.name}, RPPS {p.rpps} ({p.profession} {p.specialty}).",
            f"Enrolled on {p.relay}: {p.name}, RPPS {p.rpps} ({p.profession} {p.specialty})."))


@cli.command()
@click.option("--adeli", help="Record your ADELI number (nurses, physiotherapists, orthoptists, speech "
                              "therapists, podiatrists: it goes into your requests and billing).")
@pass_ctx
def whoami(c: Ctx, adeli: str | None) -> None:
    """Show this device's practitioner, relay and fingerprint (to read aloud to a colleague)."""
    keys = c.keys()
    p = c.home.profile()
    if adeli is not None:
        from dataclasses import replace  # noqa: PLC0415

        from protocol.ids import check_adeli  # noqa: PLC0415

        p = replace(p, adeli=check_adeli(adeli))
        c.home.save_profile(p)
    fp = keys.public().fingerprint
    emit(c.json, {**asdict(p), "fingerprint": fp},
         f"{p.name or '-'}  RPPS {p.rpps or '-'}{f'  ADELI {p.adeli}' if p.adeli else ''}\n"
         f"{tr('Relais', 'Relay')}: {p.relay or '-'}\n"
         f"{tr('Appareil', 'Device')}: {keys.device_id.hex()}\n{tr('Empreinte', 'Fingerprint')}: {fp}")


@cli.command()
@click.argument("rpps")
@click.option("--yes", is_flag=True, help="Accept the keys shown without asking.")
@click.option("--show", is_flag=True, help="Only show the keys and their fingerprints.")
@pass_ctx
def trust(c: Ctx, rpps: str, yes: bool, show: bool) -> None:
    """Show a practitioner's device fingerprints and, once checked aloud with them, pin them."""
    from client.api import RelayClient  # noqa: PLC0415

    rpps = check_rpps(rpps)
    keys = c.keys()
    profile = c.home.profile()

    async def fetch() -> tuple[dict[str, Any], list[Any]]:
        async with RelayClient(profile.relay, keys) as r:
            info = await r.directory(rpps)
        return info, [core._record_from_json(d) for d in info["devices"]]  # noqa: SLF001

    info, devices = run(fetch())
    rows = [{"device_id": d.device_id.hex(), "fingerprint": d.fingerprint} for d in devices]
    if show or c.json:
        emit(c.json, {"rpps": rpps, "name": info["name"], "devices": rows, "pinned": c.home.pinned(rpps)},
             "\n".join(f"{info['name']}: {r['device_id'][:12]}  {r['fingerprint']}" for r in rows))
        if show:
            return
    if not c.json:
        click.echo("\n".join(f"{info['name']}: {r['device_id'][:12]}  {r['fingerprint']}" for r in rows))
    if not yes and not click.confirm(tr("Ces empreintes sont-elles celles que le praticien vous a lues ?",
                                         "Are these the fingerprints the practitioner read to you?")):
        raise SystemExit(1)
    c.home.pin(rpps, devices)
    if not c.json:
        click.echo(tr("Clés épinglées.", "Keys pinned."))


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep everything here: DIR/relay, DIR/<practitioner> (default: a temporary folder, removed).")
@click.option("--relay", "relay_url", help="Use this running relay instead of starting one.")
@click.option("--relay-data", type=click.Path(file_okay=False, path_type=Path),
              help="With --relay: that relay's data folder, to create the two invitations.")
@click.option("--codes", help="With --relay: two invitation codes GP,SPECIALIST instead of --relay-data.")
@pass_ctx
def demo(c: Ctx, workdir: Path | None, relay_url: str | None, relay_data: Path | None, codes: str | None) -> None:
    """Run a whole case end to end: a relay, a GP and a dermatologist, a photo and a PDF,
    the question, the answer, and a check that the relay holds no plaintext."""
    from client.demo import run_demo  # noqa: PLC0415

    result = run_demo(workdir=workdir, relay_url=relay_url, relay_data=relay_data, codes=codes,
                      as_json=c.json)
    if c.json:
        emit(True, result, "")


@cli.group()
def audit() -> None:
    """Prove a case: export its audit package, verify one offline, monitor a relay's log.

    \b
      pli audit export 3f2a -o cas-3f2a.pliaudit [--with-content]
      pli audit verify cas-3f2a.pliaudit [--vkey KEY]
      pli audit monitor https://relay.ars.example [--interval 300]
    """


@audit.command(name="export")
@click.argument("case")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The package file to write.")
@click.option("--with-content", is_flag=True,
              help="Include the decrypted manifest and files (medical content: handle as a medical record).")
@pass_ctx
def audit_export(c: Ctx, case: str, out: Path, with_content: bool) -> None:
    """Write CASE's audit package: receipts, proofs, checkpoints, keys (and the content with --with-content)."""
    from client.api import RelayClient  # noqa: PLC0415
    from client.audit import export_package  # noqa: PLC0415

    keys = c.keys()
    profile = c.home.profile()

    async def go() -> dict[str, Any]:
        async with RelayClient(profile.relay, keys) as r:
            return await export_package(c.home, r, keys, case, out, with_content=with_content)

    result = run(go())
    emit(c.json, result, tr(
        f"Paquet d'audit écrit : {out} ({result['envelopes']} plis, {result['receipts']} accusés, "
        f"{result['checkpoints']} points de contrôle{', avec le contenu' if with_content else ''}).\n"
        f"Vérification hors ligne : pli audit verify {out}",
        f"Audit package written: {out} ({result['envelopes']} envelopes, {result['receipts']} receipts, "
        f"{result['checkpoints']} checkpoints{', with content' if with_content else ''}).\n"
        f"Verify offline: pli audit verify {out}"))


@audit.command(name="verify")
@click.argument("package", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--vkey", help="The log key you trust (as the relay's operator publishes it); default: the package's.")
@pass_ctx
def audit_verify(c: Ctx, package: Path, vkey: str | None) -> None:
    """Verify an audit package offline and print the case's timeline. Exit 1 if anything fails."""
    from client.audit import verify_package  # noqa: PLC0415

    rep = verify_package(package, vkey=vkey)
    if c.json:
        emit(True, rep.to_json(), "")
    else:
        lines = [tr(f"Dossier {rep.case_id}", f"Case {rep.case_id}"), tr("Chronologie (heure du journal du relais) :",
                 "Timeline (relay log time):")]
        for e in rep.timeline:
            env = f" {tr('pli', 'envelope')} {e['envelope'][:12]}" if e["envelope"] else ""
            lines.append(f"  {e['when']}  {e['event']:<10} {e['who']}{env} {e['detail']}".rstrip())
        lines += [f"  ✓ {check}" for check in rep.checks]
        lines += [f"  ✗ {failure}" for failure in rep.failures]
        lines.append(tr("VERDICT : vérifié — signatures, preuves et points de contrôle concordent." if rep.ok
                        else f"VERDICT : ÉCHEC — {len(rep.failures)} vérification(s) en échec.",
                        "VERDICT: verified — every signature, proof and checkpoint checks out." if rep.ok
                        else f"VERDICT: FAILED — {len(rep.failures)} check(s) failed."))
        print("\n".join(lines))
    if not rep.ok:
        sys.exit(1)


@audit.command(name="monitor")
@click.argument("url")
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to keep what was seen [default ~/.pli-monitor/<relay>.json].")
@click.option("--vkey", help="The log key to trust (default: fetched on the first run, then pinned).")
@click.option("--interval", type=click.FloatRange(1), help="Check again every N seconds until Ctrl-C.")
@pass_ctx
def audit_monitor(c: Ctx, url: str, state: Path | None, vkey: str | None, interval: float | None) -> None:
    """Follow a relay's log: each checkpoint must extend the last one seen, and its entries
    must hash to it. Exit 3 on a fork, a rollback or a bad signature (and every run after)."""
    import hashlib  # noqa: PLC0415

    from client.api import RelayClient  # noqa: PLC0415
    from client.audit import AuditError, monitor_once  # noqa: PLC0415

    path = state or Path.home() / ".pli-monitor" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)

    async def go() -> None:
        async with RelayClient(url) as r:
            while True:
                result = await monitor_once(r, path, vkey=vkey)
                emit(c.json, result, tr(
                    f"{time.strftime('%H:%M:%S')} journal {result['origin']} : taille {result['size']}, "
                    f"{result['new_entries']} nouvelle(s) entrée(s) vérifiée(s), cohérent.",
                    f"{time.strftime('%H:%M:%S')} log {result['origin']}: size {result['size']}, "
                    f"{result['new_entries']} new entries verified, consistent."))
                if result["first_run"] and not vkey and not c.json:
                    print(tr(f"  Première observation : clé du journal épinglée {result['vkey']} — comparez-la "
                             "à celle que publie l'opérateur du relais.",
                             f"  First run: log key pinned {result['vkey']} — compare it with the one the "
                             "relay's operator publishes."))
                if interval is None:
                    return
                await asyncio.sleep(interval)

    try:
        run(go())
    except AuditError as e:
        _fail("log_alarm", tr(f"ALERTE : {e}", f"ALERT: {e}"), 3)


def main() -> None:
    try:
        cli(prog_name="pli", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(tr("Interrompu.", "Interrupted."), err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except PliError as e:
        _fail(e.code, error_text(e), 3 if e.code == "log_alarm" else 1)
    except KeyboardInterrupt:
        click.echo(tr("Interrompu.", "Interrupted."), err=True)
        sys.exit(130)
    except OSError as e:
        _fail("os_error", f"{e.strerror or e}: {e.filename or ''}".rstrip(": "), 1)
    except Exception as e:
        if os.environ.get("PLI_DEBUG"):
            traceback.print_exc()
        _fail("internal", tr(f"Erreur interne ({type(e).__name__}). Relancez avec PLI_DEBUG=1 pour le détail.",
                             f"Internal error ({type(e).__name__}). Run again with PLI_DEBUG=1 for details."), 2)


def _fail(code: str, text: str, status: int) -> None:
    if "--json" in sys.argv[1:]:
        print(json.dumps({"error": code, "message": text}, ensure_ascii=False))
    else:
        click.echo(f"pli: {text}", err=True)
    sys.exit(status)


from client import cli_cases  # noqa: E402, F401 - registers `pli case`, `pli cases`, `pli billing`

if __name__ == "__main__":
    main()
