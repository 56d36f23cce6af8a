"""`pli-relay` as an operator runs it: `python -m relay` in a subprocess, on a real data folder."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from conftest import CARDIO, DERM, GP, PRACTITIONERS, RelayFactory, assert_problem, signed

from client.api import RelayClient
from protocol.keys import DeviceKeys

ROOT = Path(__file__).resolve().parent.parent
CODE = re.compile(r"[0-9A-HJKMNP-TV-Z]{5}(-[0-9A-HJKMNP-TV-Z]{5}){3}")
TIMEOUT = 30


@dataclass
class Run:
    code: int
    out: str
    err: str


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLI_")}
    env["PLI_RELAY_LOG_FORMAT"] = "json"
    return env


async def cli(*args: str | Path) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *map(str, args),
        cwd=ROOT, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def assert_clean_failure(run: Run, *needles: str) -> None:
    assert run.code != 0
    assert "Traceback" not in run.err + run.out
    for needle in needles:
        assert needle in run.err, run.err


async def invite(data: Path, rpps: str, *extra: str) -> dict[str, object]:
    name, profession, specialty = PRACTITIONERS[rpps[-11:]]
    run = await cli("invite", "--data", data, "--rpps", rpps, "--name", name, "--profession", profession,
                    "--specialty", specialty, "--json", *extra)
    assert run.code == 0, run.err
    return json.loads(run.out)


# -- invite -------------------------------------------------------------------------------------


async def test_invite_prints_a_code_that_enrolls(tmp_path: Path, relay_factory: RelayFactory) -> None:
    data = tmp_path / "relay"
    assert (await cli("migrate", "--data", data)).code == 0  # a new relay's database, before it first serves
    name, profession, _ = PRACTITIONERS[GP]
    run = await cli("invite", "--data", data, "--rpps", GP, "--name", name, "--profession", profession)
    assert run.code == 0, run.err
    lines = run.out.strip().splitlines()
    assert GP in lines[0]
    assert name in lines[0]
    assert CODE.fullmatch(lines[-1]), run.out
    doc = await invite(data, DERM, "--ttl", "3600")
    assert CODE.fullmatch(str(doc["code"]))
    assert doc["rpps"] == DERM
    assert doc["name"] == PRACTITIONERS[DERM][0]
    assert isinstance(doc["expires"], int)
    # The database holds only the codes' hashes.
    db = (data / "relay.sqlite3").read_bytes()
    for code in (lines[-1], str(doc["code"])):
        assert code.encode() not in db
        assert code.replace("-", "").encode() not in db

    # Both codes enrol a device on a relay serving that folder.
    relay = await relay_factory("relay")
    for code, rpps in ((lines[-1], GP), (str(doc["code"]), DERM)):
        keys = DeviceKeys.generate(now=relay.clock())
        async with RelayClient(relay.url) as client:
            answer = await client.enroll(code, keys.public().to_record())
        assert (answer["rpps"], answer["name"]) == (rpps, PRACTITIONERS[rpps][0])


async def test_invite_accepts_the_national_id_form(tmp_path: Path) -> None:
    assert (await cli("migrate", "--data", tmp_path / "relay")).code == 0
    doc = await invite(tmp_path / "relay", "8" + CARDIO)
    assert doc["rpps"] == CARDIO


async def test_invite_with_invalid_rpps_fails_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    run = await cli("invite", "--data", data, "--rpps", "10000005478", "--name", "Dr X", "--profession", "médecin")
    assert_clean_failure(run, "--rpps", "should be 9, not 8")
    assert run.code == 2
    assert run.out == ""
    run = await cli("invite", "--data", data, "--rpps", "1000000547", "--name", "Dr X", "--profession", "médecin")
    assert_clean_failure(run, "--rpps", "10 digits")
    run = await cli("invite", "--data", data, "--rpps", "1000000547A", "--name", "Dr X", "--profession", "médecin")
    assert_clean_failure(run, "--rpps", "not a digit")
    run = await cli("invite", "--data", data, "--rpps", GP, "--name", "  ", "--profession", "médecin")
    assert_clean_failure(run, "must not be empty")
    run = await cli("invite", "--data", data, "--rpps", GP, "--name", "Dr X", "--profession", "médecin",
                    "--ttl", "5")
    assert_clean_failure(run, "--ttl")
    run = await cli("invite", "--data", data, "--name", "Dr X", "--profession", "médecin")
    assert_clean_failure(run, "--rpps")
    assert not (data / "relay.sqlite3").exists()  # nothing was created for a refused invitation


async def test_bad_config_fails_cleanly(tmp_path: Path) -> None:
    run = await cli("serve", "--data", tmp_path / "relay", "--listen", "nowhere")
    assert_clean_failure(run, "listen")
    bad = tmp_path / "relay.toml"
    bad.write_text("[relay]\nmax_requets = 5\n", encoding="utf-8")
    run = await cli("--config", bad, "devices", "--data", tmp_path / "relay")
    assert_clean_failure(run, "max_requets")


async def test_admin_commands_in_a_wrong_data_folder_create_no_relay(tmp_path: Path) -> None:
    # A typo in --data: no new, empty relay (database, log key) left there to report on,
    # no invitation stored where the running relay never reads it (review M9).
    typo = tmp_path / "typo-folder"
    name, profession, _ = PRACTITIONERS[GP]
    for args in (("invite", "--rpps", GP, "--name", name, "--profession", profession), ("devices",),
                 ("revoke", "00" * 16), ("stats",)):
        run = await cli(args[0], "--data", typo, *args[1:])
        assert_clean_failure(run, f"no relay database in {typo}; wrong --data or --config?")
        assert not (typo / "relay.sqlite3").exists()
        assert not (typo / "log.key").exists()


# -- devices and revoke ----------------------------------------------------------------------


async def test_devices_and_revoke(tmp_path: Path, relay_factory: RelayFactory) -> None:
    data = tmp_path / "relay"
    assert (await cli("migrate", "--data", data)).code == 0
    run = await cli("devices", "--data", data)
    assert run.code == 0, run.err
    assert "No device enrolled" in run.out

    relay = await relay_factory("relay")
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)

    run = await cli("devices", "--data", data, "--json")
    assert run.code == 0, run.err
    listed = {d["device_id"]: d for d in json.loads(run.out)}
    assert set(listed) == {gp.hex, derm.hex}
    assert listed[gp.hex]["rpps"] == GP
    assert listed[gp.hex]["fingerprint"] == gp.keys.public().fingerprint
    assert listed[gp.hex]["revoked"] is None
    run = await cli("devices", "--data", data)
    assert run.code == 0
    line = next(x for x in run.out.splitlines() if x.startswith(derm.hex))
    assert DERM in line
    assert "active" in line
    assert derm.keys.public().fingerprint in line

    # Revoking beside the running relay takes effect at once.
    assert (await relay.get(derm.keys, "/v1/inbox")).status == 200
    run = await cli("revoke", "--data", data, derm.hex)
    assert run.code == 0, run.err
    assert derm.hex in run.out
    assert_problem(await relay.get(derm.keys, "/v1/inbox"), 401, "unauthorized")
    assert (await relay.get(gp.keys, "/v1/inbox")).status == 200
    run = await cli("devices", "--data", data, "--json")
    listed = {d["device_id"]: d for d in json.loads(run.out)}
    assert isinstance(listed[derm.hex]["revoked"], int)
    assert listed[gp.hex]["revoked"] is None
    run = await cli("devices", "--data", data)
    assert "revoked" in next(x for x in run.out.splitlines() if x.startswith(derm.hex))

    # Revoking twice, an unknown device, or something that is not an id.
    assert_clean_failure(await cli("revoke", "--data", data, derm.hex), "no such active device")
    assert_clean_failure(await cli("revoke", "--data", data, os.urandom(16).hex()), "no such active device")
    run = await cli("revoke", "--data", data, "not-hex")
    assert_clean_failure(run, "32 hex digits")
    assert run.code == 2


# -- serve ---------------------------------------------------------------------------------------


async def test_serve_prints_url_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    errlog = tmp_path / "serve.log"
    with errlog.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--data", str(data), "--listen", "127.0.0.1:0",
            cwd=ROOT, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=err,
        )
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", first), first
        assert not first.endswith(":0")
        async with aiohttp.ClientSession() as session:
            async with session.get(first + "/healthz") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ok"}
            # Admin commands work beside the serving relay: invite, enrol, use, revoke.
            code = str((await invite(data, GP))["code"])
            keys = DeviceKeys.generate(now=0)
            async with RelayClient(first) as client:
                answer = await client.enroll(code, keys.public().to_record())
            assert answer["device_id"] == keys.device_id.hex()
            r = await signed(session, keys, "GET", first + "/v1/inbox")
            assert r.status == 200
            assert r.json() == {"envelopes": []}
            assert (await cli("revoke", "--data", data, keys.device_id.hex())).code == 0
            assert_problem(await signed(session, keys, "GET", first + "/v1/inbox"), 401, "unauthorized")

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), TIMEOUT)
        assert code == 0
        assert await proc.stdout.read() == b""  # the URL was the only line on stdout
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = errlog.read_text(encoding="utf-8")
    assert "Traceback" not in log
    events = [json.loads(line)["event"] for line in log.splitlines() if line.startswith("{")]
    assert events[:2] == ["log_opened", "relay_started"]
    assert events[-2:] == ["relay_stopping", "relay_stopped"]


async def test_serve_on_a_busy_port_fails_cleanly(tmp_path: Path) -> None:
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        run = await cli("serve", "--data", tmp_path / "relay", "--listen", f"127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()
    assert_clean_failure(run, "cannot listen")
    assert run.code == 1
    assert run.out == ""
