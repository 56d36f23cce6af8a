"""Operating a relay: metrics, probes, request logs, the effective configuration, the
client's address behind a proxy, `pli-relay stats | purge | backup | restore | config`,
and deploy/ (configuration reference, systemd unit). Real relays, real files, no mocks.
"""

from __future__ import annotations

import asyncio
import base64
import configparser
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from _pg import PgServer
from conftest import DERM, GP, Relay, RelayFactory, assert_problem, make_envelope, send_raw
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from test_relay_cli import ROOT, TIMEOUT, _env, assert_clean_failure, cli

from client import core
from protocol import codec, merkle
from protocol.keys import DeviceKeys
from protocol.note import Checkpoint, Verifier, open_checkpoint
from relay.app import LOG, create_app
from relay.backup import BackupError, backup_sqlite, check_members, check_restored, restore_sqlite, split_password
from relay.config import ConfigError, RelayConfig, load_config_sources
from relay.metrics import METRICS
from relay.ops import READY_CACHE, client_from_forwarded, config_reference, effective_config, mask
from relay.routes import INLINE_MAX
from tools.case_samples import request_body

# -- metrics -------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(relay: Relay, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                                               float]:
    r = await send_raw(relay.session, "GET", relay.u("/metrics"), headers=headers)
    assert r.status == 200, r.body
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(r.body.decode())


async def test_metrics_count_traffic_log_and_refusals_per_relay(relay_factory: RelayFactory) -> None:
    relay = await relay_factory("one", rate_burst=5, rate_limit=0.001)
    other = await relay_factory("two")  # its own registry: nothing of `relay` shows there
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    now = relay.clock()
    ids = []
    for size in (1000, 3000):
        # A ciphertext that is not the one its header hashes: refused, counted by its code.
        eid, prefix = make_envelope(gp.keys, [derm.device_id], os.urandom(size), now=now)
        assert_problem(await relay.put(gp.keys, eid, prefix + os.urandom(size)), 400, "digest_mismatch")
        ct = os.urandom(size)
        eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=now)
        assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
        ids.append(eid)
    assert (await relay.ack(derm.keys, ids[0])).status == 200
    # derm's bucket (5 requests) is spent after the ack and four more (enrolment is unsigned).
    for _ in range(4):
        assert (await relay.get(derm.keys, "/v1/inbox")).status == 200
    assert_problem(await relay.get(derm.keys, "/v1/inbox"), 429, "rate_limited")
    m = await scrape(relay)
    assert m[("pli_relay_log_entries_total", (("type", "submitted"),))] == 2
    assert m[("pli_relay_log_entries_total", (("type", "delivered"),))] == 1
    assert m[("pli_relay_log_entries_total", (("type", "device_enrolled"),))] == 2
    assert m[("pli_relay_log_size", ())] == 5
    # Every entry came in a batch of its own here (requests one after the other).
    assert m[("pli_relay_log_batch_size_count", ())] == 5
    assert m[("pli_relay_log_batch_size_sum", ())] == 5
    assert m[("pli_relay_requests_total", (("route", "put_envelope"), ("status", "201")))] == 2
    assert m[("pli_relay_request_duration_seconds_count", (("route", "put_envelope"),))] == 4
    assert m[("pli_relay_request_body_bytes_total", (("route", "put_envelope"),))] > 4000
    assert m[("pli_relay_rejections_total", (("code", "digest_mismatch"),))] == 2
    assert m[("pli_relay_rejections_total", (("code", "rate_limited"),))] == 1
    assert m[("pli_relay_rate_limited_total", (("limit", "device"),))] == 1
    assert m[("pli_relay_uploads_in_flight", ())] == 0
    assert m[("pli_relay_log_integrity_ok", ())] == 1
    assert (await scrape(relay))[("pli_relay_response_body_bytes_total", (("route", "metrics"),))] > 1000
    m2 = await scrape(other)
    assert ("pli_relay_requests_total", (("route", "put_envelope"), ("status", "201"))) not in m2
    assert m2[("pli_relay_log_size", ())] == 0
    # Labels are route names, codes and types: never an id or a path.
    text = (await send_raw(relay.session, "GET", relay.u("/metrics"))).body.decode()
    for secret in (gp.hex, derm.hex, ids[0].hex(), "/v1/"):
        assert secret not in text


async def test_concurrent_scrapes_count_each_batch_once(relay: Relay) -> None:
    # An HA Prometheus pair scrapes every target twice, at nearly the same time.
    await relay.enroll(GP)
    await relay.enroll(DERM)  # two batches, one entry each
    for m in await asyncio.gather(scrape(relay), scrape(relay), scrape(relay)):
        assert m[("pli_relay_log_batch_size_count", ())] == 2
        assert m[("pli_relay_log_entries_total", (("type", "device_enrolled"),))] == 2


async def test_metrics_access_follows_the_setting_and_the_forwarded_client(relay_factory: RelayFactory) -> None:
    local = await relay_factory("local", trusted_proxies="127.0.0.0/8")
    assert (await send_raw(local.session, "GET", local.u("/metrics"))).status == 200
    # Through a trusted proxy, the client is the one it names: not loopback, refused.
    far = {"X-Forwarded-For": "203.0.113.7"}
    assert_problem(await send_raw(local.session, "GET", local.u("/metrics"), headers=far), 403, "forbidden")
    on = await relay_factory("on", metrics="on", trusted_proxies="127.0.0.1")
    assert (await send_raw(on.session, "GET", on.u("/metrics"), headers=far)).status == 200
    off = await relay_factory("off", metrics="off")
    assert_problem(await send_raw(off.session, "GET", off.u("/metrics")), 404, "not_found")


# -- probes --------------------------------------------------------------------------------------


async def test_livez_and_readyz(relay: Relay) -> None:
    live = await send_raw(relay.session, "GET", relay.u("/livez"))
    assert (live.status, live.json()) == (200, {"status": "ok"})
    ready = await send_raw(relay.session, "GET", relay.u("/readyz"))
    assert ready.status == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "blobs": "ok", "log": "ok",
                                                          "stopping": "no"}}
    # The blob folder cannot take a file (here: a file stands where the folder was).
    blobs = relay.data / "blobs"
    blobs.rename(relay.data / "blobs.away")
    blobs.write_bytes(b"")
    await asyncio.sleep(READY_CACHE)  # the last probe's answer stands for READY_CACHE seconds
    with capture_logs() as logs:
        doc = assert_problem(await send_raw(relay.session, "GET", relay.u("/readyz")), 503, "storage_unavailable")
    assert doc["detail"] == "not ready: blobs"  # the check's name: its kind is for the operator's log only
    assert next(e for e in logs if e["event"] == "not_ready")["checks"]["blobs"].startswith("OSError")
    assert (await send_raw(relay.session, "GET", relay.u("/livez"))).status == 200  # alive all the same
    blobs.unlink()
    (relay.data / "blobs.away").rename(blobs)
    await asyncio.sleep(READY_CACHE)
    assert (await send_raw(relay.session, "GET", relay.u("/readyz"))).status == 200
    # Stopping: not ready while requests in flight finish.
    await relay.app.shutdown()
    doc = assert_problem(await send_raw(relay.session, "GET", relay.u("/readyz")), 503, "unavailable")
    assert doc["detail"] == "not ready: stopping"  # at once: stopping is not cached


async def test_concurrent_readyz_run_one_probe(relay: Relay) -> None:
    # /readyz is public: a crowd of hits must not drive a database write and an fsync each.
    replies = await asyncio.gather(*(send_raw(relay.session, "GET", relay.u("/readyz")) for _ in range(20)))
    assert [r.status for r in replies] == [200] * 20
    m = await scrape(relay)
    assert m[("pli_relay_readiness_probes_total", ())] == 1
    await asyncio.sleep(READY_CACHE)  # then the next call probes again
    assert (await send_raw(relay.session, "GET", relay.u("/readyz"))).status == 200
    assert (await scrape(relay))[("pli_relay_readiness_probes_total", ())] == 2


async def test_readyz_reports_a_log_integrity_alarm(relay: Relay) -> None:
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    # Someone writes a tree head of their own: the next batch finds no tree behind it.
    size = await relay.app[LOG].size()
    db = sqlite3.connect(relay.data / "relay.sqlite3")
    with db:
        db.execute("INSERT INTO log_checkpoints (size, root, note, created) VALUES (?, ?, 'forged', 0)",
                   (size + 1, bytes(32)))
    db.close()
    ct = os.urandom(100)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert_problem(await relay.put(gp.keys, eid, prefix + ct), 503, "log_integrity")
    doc = assert_problem(await send_raw(relay.session, "GET", relay.u("/readyz")), 503, "log_integrity")
    assert doc["detail"] == "not ready: log"
    text = (await send_raw(relay.session, "GET", relay.u("/metrics"))).body.decode()
    assert samples(text)[("pli_relay_log_integrity_ok", ())] == 0


# -- one canonical log line per request ---------------------------------------------------------


async def test_one_log_line_per_request_with_no_content_and_no_patient(relay: Relay) -> None:
    with capture_logs() as logs:
        gp = await relay.enroll(GP, with_home=True)
        derm = await relay.enroll(DERM, with_home=True)
        assert gp.home is not None
        assert derm.home is not None
        photo = relay.tmp / "photo.bin"
        photo.write_bytes(b"PHOTO-MARKER-5521" * 1000)
        body = request_body(requis_rpps=DERM)
        sent = await core.send(gp.home, gp.keys, to=[DERM], kind="request", body=body, files=[photo])
        got = await relay.get(derm.keys, f"/v1/envelopes/{sent.envelope_id}")
        assert got.status == 200
    requests = [e for e in logs if e["event"] == "request"]
    assert len(requests) >= 6
    for e in requests:
        assert {"route", "status", "ms", "bytes_in", "bytes_out", "device", "method", "error"} <= e.keys(), e
        assert e["route"] != "unmatched"
    upload = next(e for e in requests if e["route"] == "put_envelope" and e["status"] == 201)
    assert upload["device"] == gp.hex
    assert upload["bytes_in"] > 17000
    download = next(e for e in requests if e["route"] == "get_envelope")
    assert download["bytes_out"] == len(got.body)
    assert download["device"] == derm.hex
    everything = json.dumps(logs, default=str)
    patient = json.dumps(body, ensure_ascii=False)
    for name in ("family_name", "given_names", "birth_date"):
        value = json.loads(patient).get("patient", {}).get(name)
        if value:
            assert value not in everything
    assert "PHOTO-MARKER" not in everything
    assert gp.code not in everything
    assert derm.code not in everything
    assert sent.envelope_id not in json.dumps(requests)  # request lines name routes, not paths


# -- configuration -------------------------------------------------------------------------------


def test_sources_and_masking(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text('[relay]\nrate_limit = 5\nmetrics = "on"\n', encoding="utf-8")
    cfg, sources = load_config_sources(
        file=toml, env={"PLI_RELAY_METRICS": "off", "PLI_RELAY_DATABASE": "postgresql://pli:s3cret@db:5432/pli"},
        overrides={"listen": "127.0.0.1:0", "data": None},
    )
    shown = effective_config(cfg, sources)
    assert set(shown) == set(RelayConfig.__dataclass_fields__)
    assert shown["rate_limit"] == {"value": "5.0", "source": "file"}
    assert shown["metrics"] == {"value": "off", "source": "env"}
    assert shown["listen"] == {"value": "127.0.0.1:0", "source": "flag"}
    assert shown["data"]["source"] == "default"
    assert shown["database"] == {"value": "postgresql://pli:***@db:5432/pli", "source": "env"}
    assert "s3cret" not in json.dumps(shown)
    assert mask("database", "postgresql://pli@db/pli") == "postgresql://pli@db/pli"
    assert mask("smtp_password", "hunter2") == "***"


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://pli@db/pli?password=s3cret", "postgresql://pli@db/pli?password=***"),
    ("postgresql://pli@db/pli?sslmode=require&sslpassword=s3cret&PassFile=/etc/pli/s3cret",
     "postgresql://pli@db/pli?sslmode=require&sslpassword=***&PassFile=***"),
    ("postgresql://pli:s3cr/et@db/pli", "postgresql://pli:***@db/pli"),  # a URL parser cuts at "/"
    ("postgresql://pli:s3#cret@db/pli", "postgresql://pli:***@db/pli"),
    ("postgresql://pli:s3?cret@db:5432/pli", "postgresql://pli:***@db:5432/pli"),
    ("postgresql://pli:s3@cret@db/pli", "postgresql://pli:***@db/pli"),
    ("postgres://:s3cret@[::1]:5432/pli", "postgres://:***@[::1]:5432/pli"),
    ("postgresql://pli@[::1/pli?x=s3cret", "postgresql://***"),  # unparseable: nothing but the scheme
    ("postgresql://pli@db:s3cret/pli", "postgresql://***"),
    ("host=db user=pli password='s3 cret' dbname=pli", "host=db user=pli password=*** dbname=pli"),
    ("sqlite", "sqlite"),
])
def test_a_dsn_is_shown_without_its_secrets(dsn: str, shown: str) -> None:
    assert mask("database", dsn) == shown
    assert "s3" not in mask("database", dsn)


async def test_serve_logs_its_effective_configuration(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text("[relay]\nrate_burst = 7\n", encoding="utf-8")
    env = {**_env(), "PLI_RELAY_MAX_SKEW": "120"}
    errlog = tmp_path / "serve.log"
    with errlog.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "--config", str(toml), "serve", "--data", str(tmp_path / "relay"),
            "--listen", "127.0.0.1:0", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=err,
        )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        # The configuration is logged right after the start: connections are counted too.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = (await asyncio.wait_for(reader.read(), TIMEOUT)).decode()
        writer.close()
        assert "pli_relay_connections_open 1.0" in text
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), TIMEOUT)
    events = [json.loads(line) for line in errlog.read_text(encoding="utf-8").splitlines() if line.startswith("{")]
    config = next(e for e in events if e["event"] == "effective_config")["settings"]
    assert set(config) == set(RelayConfig.__dataclass_fields__)
    assert config["rate_burst"] == {"value": "7", "source": "file"}
    assert config["max_skew"] == {"value": "120", "source": "env"}
    assert config["listen"] == {"value": "127.0.0.1:0", "source": "flag"}
    assert config["max_request"]["source"] == "default"


async def test_config_command_and_reference(tmp_path: Path) -> None:
    run = await cli("config", "--data", tmp_path / "d", "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["data"] == {"value": str(tmp_path / "d"), "source": "flag"}
    run = await cli("config")
    assert "Effective configuration" in run.out
    run = await cli("config", "--reference")
    assert run.out == config_reference()


def test_deploy_readme_holds_the_configuration_reference() -> None:
    # One reference, generated from relay/config.py (`pli-relay config --reference`), kept identical.
    text = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- settings:begin -->\n", "<!-- settings:end -->"
    assert begin in text
    assert end in text
    assert text.split(begin, 1)[1].split(end, 1)[0] == config_reference(), \
        "deploy/README.md's reference is stale: paste `pli-relay config --reference` between the markers"
    for name in RelayConfig.__dataclass_fields__:
        assert f"| `{name}` |" in text, name
        assert f"`PLI_RELAY_{name.upper()}`" in text, name


def test_systemd_unit_stops_gracefully_and_is_confined() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "pli-relay.service", encoding="utf-8")
    service = unit["Service"]
    stop = int(service["TimeoutStopSec"].removesuffix("s"))
    assert stop > RelayConfig().shutdown_timeout
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert " serve" in service["ExecStart"]
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
                       ("ReadWritePaths", "/var/lib/pli")):
        assert service[key] == value, key



def _installed_units(tmp_path: Path) -> list[Path]:
    """deploy/'s units, their programs pointed at this checkout (systemd-analyze checks that they exist)."""
    units = []
    for name in ("pli-relay.service", "pli-relay-backup.service", "pli-relay-backup.timer"):
        text = (ROOT / "deploy" / name).read_text(encoding="utf-8")
        text = text.replace("/opt/pli/venv/bin/pli-relay", str(Path(sys.executable).with_name("pli-relay")))
        text = text.replace("/opt/pli/src/deploy/", f"{ROOT}/deploy/")
        (tmp_path / name).write_text(text, encoding="utf-8")
        units.append(tmp_path / name)
    return units


def test_systemd_units_verify_and_the_backup_runs_confined_as_pli(tmp_path: Path) -> None:
    backup = configparser.ConfigParser(strict=False, interpolation=None)
    backup.optionxform = str  # type: ignore[assignment,method-assign]
    backup.read(ROOT / "deploy" / "pli-relay-backup.service", encoding="utf-8")
    service = backup["Service"]
    assert (service["Type"], service["User"], service["UMask"]) == ("oneshot", "pli", "0077")
    assert service["ExecStartPost"].startswith("+")  # the metric as root, after a success only
    assert "/srv/backup" in service["ReadWritePaths"].split()
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read(ROOT / "deploy" / "pli-relay-backup.timer", encoding="utf-8")
    assert timer["Timer"]["Persistent"] == "true"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    run = subprocess.run([analyze, "verify", *map(str, _installed_units(tmp_path))],
                         capture_output=True, text=True, check=False, timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pli-relay" not in run.stderr, run.stderr  # no warning about our units either


async def _tool(*args: str, env: dict[str, str] | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, out.decode() + err.decode()
    return out


async def test_nightly_backup_is_encrypted_and_its_age_reported(tmp_path: Path, relay: Relay) -> None:
    if shutil.which("age") is None or shutil.which("age-keygen") is None:
        pytest.skip("age is not installed (Debian package age)")
    await relay.enroll(GP)
    identity, recipients, backups, textfile = (tmp_path / n for n in ("id.txt", "rcpt.txt", "backup", "textfile"))
    await _tool("age-keygen", "-o", str(identity))
    recipients.write_bytes(await _tool("age-keygen", "-y", str(identity)))
    backups.mkdir()
    config = tmp_path / "relay.toml"
    config.write_text(f'[relay]\ndata = "{relay.data}"\n', encoding="utf-8")
    env = {**_env(), "PLI_BACKUP_DIR": str(backups), "PLI_RELAY_CONFIG": str(config),
           "PLI_BACKUP_RECIPIENTS": str(recipients), "PLI_TEXTFILE_DIR": str(textfile),
           "PLI_RELAY_BIN": str(Path(sys.executable).with_name("pli-relay"))}
    script = str(ROOT / "deploy" / "pli-relay-backup")
    await _tool(script, env=env)
    await _tool(script, "--metric", env=env)
    [encrypted] = list(backups.iterdir())  # the plaintext is gone
    assert re.fullmatch(r"pli-\d{4}-\d\d-\d\dT\d{6}Z\.tar\.age", encrypted.name)
    assert encrypted.stat().st_mode & 0o777 == 0o600
    assert b"log.key" not in encrypted.read_bytes()
    plain = tmp_path / "plain.tar"
    await _tool("age", "-d", "-i", str(identity), "-o", str(plain), str(encrypted))
    with tarfile.open(plain) as tar:
        assert tar.extractfile("log.key").read() == (relay.data / "log.key").read_bytes()  # type: ignore[union-attr]
    report = samples((textfile / "pli_relay_backup.prom").read_text(encoding="utf-8"))
    assert abs(report[("pli_relay_backup_last_success_timestamp_seconds", ())] - encrypted.stat().st_mtime) < 2
    assert report[("pli_relay_backup_size_bytes", ())] == encrypted.stat().st_size


async def test_prometheus_files_scrape_the_relay_and_alert_on_real_metrics(relay: Relay) -> None:
    scrape_config = yaml.safe_load((ROOT / "deploy" / "prometheus-pli-relay.yml").read_text(encoding="utf-8"))
    rules = yaml.safe_load((ROOT / "deploy" / "pli-relay-alerts.yml").read_text(encoding="utf-8"))
    assert scrape_config["rule_files"] == ["/etc/prometheus/pli-relay-alerts.yml"]
    jobs = {job["job_name"]: job for job in scrape_config["scrape_configs"]}
    assert jobs["pli-relay"]["static_configs"][0]["targets"] == [RelayConfig().listen]
    assert jobs["pli-relay-readyz"]["static_configs"][0]["targets"] == [f"http://{RelayConfig().listen}/readyz"]
    r = await send_raw(relay.session, "GET", relay.u("/metrics"))
    families = {f.name for f in text_string_to_metric_families(r.body.decode())}
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    assert {"PliRelayNotReady", "PliRelayLogIntegrity", "PliRelayStorageUnavailable", "PliRelayServerErrors",
            "PliRelayDiskFilling", "PliRelayBackupStale", "PliRelayClockUnsynchronised"} <= set(alerts)
    for name, expr in alerts.items():
        for metric in re.findall(r"pli_relay_\w+", expr):
            if not metric.startswith("pli_relay_backup_"):  # written by deploy/pli-relay-backup
                assert metric.removesuffix("_total") in families, (name, metric)
    assert "pli_relay_backup_last_success_timestamp_seconds" in (ROOT / "deploy" / "pli-relay-backup").read_text()

# -- behind a reverse proxy ----------------------------------------------------------------------


def test_forwarded_for_is_read_from_the_nearest_hop() -> None:
    trusted = RelayConfig(trusted_proxies="127.0.0.1, 10.0.0.0/8").proxy_networks
    assert client_from_forwarded("127.0.0.1", ["203.0.113.9"], trusted) == "203.0.113.9"
    # A client prepends what it likes: only hops added by trusted proxies are believed.
    assert client_from_forwarded("127.0.0.1", ["198.51.100.1, 203.0.113.9"], trusted) == "203.0.113.9"
    assert client_from_forwarded("127.0.0.1", ["203.0.113.9, 10.1.2.3"], trusted) == "203.0.113.9"
    assert client_from_forwarded("192.0.2.5", ["203.0.113.9"], trusted) == "192.0.2.5"  # not a proxy of ours
    assert client_from_forwarded("127.0.0.1", ["garbage"], trusted) == "127.0.0.1"
    with pytest.raises(Exception, match="trusted_proxies"):
        RelayConfig(trusted_proxies="10.0.0.300")


async def test_enrolment_limit_counts_the_forwarded_client(relay_factory: RelayFactory) -> None:
    # A well-formed enrolment with an unknown code.
    bad = codec.encode({"v": 1, "code": "AAAAA-BBBBB-CCCCC-DDDDD",
                        "device": DeviceKeys.generate(now=0).public().to_record()})

    async def guess(relay: Relay, client: str) -> int:
        r = await send_raw(relay.session, "POST", relay.u("/v1/enroll"), bad,
                           headers={"Content-Type": "application/msgpack", "X-Forwarded-For": client})
        return r.status

    proxied = await relay_factory("proxied", enroll_failures=2, trusted_proxies="127.0.0.1")
    assert [await guess(proxied, "203.0.113.1") for _ in range(3)] == [403, 403, 429]
    assert await guess(proxied, "203.0.113.2") == 403  # another client behind the proxy: its own budget
    # By default the header is ignored: it cannot buy a fresh budget per guess.
    direct = await relay_factory("direct", enroll_failures=2)
    assert [await guess(direct, f"203.0.113.{i}") for i in range(3)] == [403, 403, 429]


# -- stats, purge --------------------------------------------------------------------------------


async def test_stats_and_purge(relay_factory: RelayFactory) -> None:
    relay = await relay_factory("relay", ack_retention=0)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    now = relay.clock()
    ct = os.urandom(5000)
    short, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=now, expires=now + 60)
    assert (await relay.put(gp.keys, short, prefix + ct)).status == 201
    kept, prefix2 = make_envelope(gp.keys, [derm.device_id], ct, now=now)
    assert (await relay.put(gp.keys, kept, prefix2 + ct)).status == 201
    run = await cli("stats", "--data", relay.data, "--json")
    assert run.code == 0, run.err
    s = json.loads(run.out)
    assert s["practitioners"] == 2
    assert s["devices"] == {"active": 2, "revoked": 0}
    assert s["envelopes"]["stored"] == {"count": 2, "bytes": 10000}
    assert s["bytes_stored"] == 10000
    assert s["log_size"] == 4
    assert s["deliveries_pending"] == 2
    assert isinstance(s["oldest_unacknowledged_age"], int)
    run = await cli("stats", "--data", relay.data)
    assert "Envelopes stored      2" in run.out
    # Nothing is due yet; once `short` expired (the relay's own clock is real time here,
    # so the envelope is written expired instead), the purge removes it and says so.
    run = await cli("purge", "--data", relay.data, "--json")
    assert json.loads(run.out) == {"expired": 0, "acknowledged": 0, "abandoned_uploads": 0, "bytes": 0,
                                   "nonces": json.loads(run.out)["nonces"]}
    db = sqlite3.connect(relay.data / "relay.sqlite3")
    with db:
        db.execute("UPDATE envelopes SET expires = 1 WHERE id = ?", (short,))
    db.close()
    run = await cli("purge", "--data", relay.data)
    assert run.code == 0, run.err
    assert "Purged 1 envelopes" in run.out
    assert "1 expired" in run.out
    assert relay.stored_blob(short) is None
    assert relay.stored_blob(kept) is not None
    s = json.loads((await cli("stats", "--data", relay.data, "--json")).out)
    assert s["envelopes"]["deleted"]["count"] == 1


# -- backup and restore --------------------------------------------------------------------------


def _open(note: bytes, vkey: str) -> Checkpoint:
    origin = note.decode().split("\n", 1)[0]
    return open_checkpoint(note, Verifier.from_vkey(vkey), origin=origin)


async def test_backup_of_a_running_relay_restores_the_same_envelopes_and_log(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    old = await relay_factory("old")
    gp = await old.enroll(GP, with_home=True)
    derm = await old.enroll(DERM, with_home=True)
    assert gp.home is not None
    photo = tmp_path / "photo.bin"
    sent = []
    for size in (50_000, 50_001, 100_000):  # two kept in their rows (small), one in the blob folder
        photo.write_bytes(os.urandom(size))
        sent.append(await core.send(gp.home, gp.keys, to=[DERM], kind="request",
                                    body=request_body(requis_rpps=DERM), files=[photo]))
    originals = {}
    for s in sent:
        r = await old.get(derm.keys, f"/v1/envelopes/{s.envelope_id}")
        assert r.status == 200
        originals[s.envelope_id] = r.body
    vkey = (await send_raw(old.session, "GET", old.u("/log/vkey"))).body.decode().strip()
    before = _open((await send_raw(old.session, "GET", old.u("/checkpoint"))).body, vkey)

    backup = tmp_path / "relay-backup.tar"
    run = await cli("backup", "--data", old.data, "--to", backup, "--json")  # the old relay keeps serving
    assert run.code == 0, run.err
    made = json.loads(run.out)
    assert (made["log_size"], made["envelopes_stored"], made["missing_blobs"]) == (before.size, 3, 0)
    with tarfile.open(backup) as tar:
        names = set(tar.getnames())
        assert tar.getmember("log.key").mode == 0o600
    assert {"manifest.json", "relay.sqlite3", "log.key"} <= names
    assert sum(n.startswith("blobs/") for n in names) == 1
    assert old.query("SELECT COUNT(*) FROM envelopes WHERE inline IS NOT NULL") == [(2,)]
    assert (await old.get(derm.keys, "/v1/inbox")).status == 200  # still serving
    assert_clean_failure(await cli("backup", "--data", old.data, "--to", backup), "exists")

    # Never over something: a non-empty target is refused and left as it was.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x", encoding="utf-8")
    assert_clean_failure(await cli("restore", "--from", backup, "--data", busy), "not empty")
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]

    run = await cli("restore", "--from", backup, "--data", tmp_path / "new", "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["log_size"] == before.size
    new = await relay_factory("new")
    for envelope_id, body in originals.items():
        r = await new.get(derm.keys, f"/v1/envelopes/{envelope_id}")
        assert r.status == 200
        assert r.body == body
    # The same log, and it goes on: an acknowledgement on the restored relay extends it,
    # and a consistency proof links the checkpoint held before the backup to the new one.
    assert (await new.ack(derm.keys, bytes.fromhex(sent[0].envelope_id))).status == 200
    assert (await send_raw(new.session, "GET", new.u("/log/vkey"))).body.decode().strip() == vkey
    after = _open((await send_raw(new.session, "GET", new.u("/checkpoint"))).body, vkey)
    assert after.origin == before.origin
    assert after.size == before.size + 1
    r = await send_raw(new.session, "GET", new.u(f"/log/consistency?first={before.size}&second={after.size}"))
    proof = [base64.b64decode(h) for h in r.json()["proof"]]
    merkle.verify_consistency(before.size, after.size, proof, before.root_hash, after.root_hash)


async def test_restore_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("x", encoding="utf-8")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, "../escape")
    assert_clean_failure(await cli("restore", "--from", evil, "--data", tmp_path / "new"), "unexpected member")
    assert not (tmp_path / "new").exists()
    assert not (tmp_path / "escape").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".new")] == []


def _stat_modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


async def test_backup_file_is_private_and_restore_needs_no_extraction_filter(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    ct = os.urandom(INLINE_MAX + 1)  # in the blob folder, so in the backup's blobs/
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    backup = tmp_path / "b.tar"
    old = os.umask(0o022)  # Debian's default: a plain open() would make the file world-readable
    try:
        backup_sqlite(relay.data, backup, now=relay.clock())
    finally:
        os.umask(old)
    assert backup.stat().st_mode & 0o777 == 0o600  # it holds the log's private key
    assert not backup.with_name("b.tar.part").exists()

    # Debian 12's Python 3.11.2 has neither extractall(filter=...) nor tarfile.data_filter:
    # restore must not lean on tarfile's extraction at all.
    def refused(*_a: object, **_k: object) -> None:
        raise AssertionError("restore used tarfile's own extraction")

    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.setattr(tarfile.TarFile, "extractall", refused)
    monkeypatch.setattr(tarfile.TarFile, "extract", refused)
    new = tmp_path / "new"
    manifest = restore_sqlite(backup, new)
    modes = _stat_modes(new)
    assert {name for name, mode in modes.items() if (new / name).is_dir() and mode != 0o700} == set()
    assert {name for name, mode in modes.items() if (new / name).is_file() and mode != 0o600} == set()
    assert "blobs/incoming" in modes
    h = eid.hex()
    assert (new / "blobs" / h[:2] / h).read_bytes() == relay.stored_blob(eid)
    assert (new / "log.key").read_bytes() == (relay.data / "log.key").read_bytes()
    size, gone = await check_restored(RelayConfig(data=new), manifest)
    assert (size, gone) == (manifest["log_size"], [])


async def test_a_backup_from_before_the_last_migration_restores_migrated(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    # The backup an upgrade begins with holds the older schema: restoring it with the new
    # relay migrates the restored database (it is new and the relay's own) and checks it.
    relay = await relay_factory("old")
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    ct = os.urandom(INLINE_MAX + 1)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    backup_sqlite(relay.data, tmp_path / "now.tar", now=relay.clock())
    older = tmp_path / "older"
    restore_sqlite(tmp_path / "now.tar", older)
    db = sqlite3.connect(older / "relay.sqlite3")  # as the relay before inline envelopes left it
    db.execute("ALTER TABLE envelopes DROP COLUMN inline")
    db.execute("DELETE FROM schema_migrations WHERE version = 2")
    db.commit()
    db.close()
    backup_sqlite(older, tmp_path / "older.tar", now=relay.clock())

    run = await cli("restore", "--from", tmp_path / "older.tar", "--data", tmp_path / "new", "--json")
    assert run.code == 0, run.err
    db = sqlite3.connect(tmp_path / "new" / "relay.sqlite3")
    try:
        assert db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [(1,), (2,)]
    finally:
        db.close()
    new = await relay_factory("new")
    assert (await new.get(derm.keys, f"/v1/envelopes/{eid.hex()}")).body == prefix + ct


def _hostile(kind: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo("log.key")
    if kind == "absolute":
        info.name = "/tmp/log.key"
    elif kind == "dotdot":
        info.name = "blobs/../../escape"
    elif kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "relay.sqlite3"
    elif kind == "chardev":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "chardev", "fifo", "duplicate"])
def test_restore_refuses_a_hostile_tar(tmp_path: Path, kind: str) -> None:
    evil = tmp_path / "evil.tar"
    manifest = json.dumps({"format": "pli-relay-backup", "version": 1, "engine": "sqlite"}).encode()
    with tarfile.open(evil, "w") as tar:
        for name, raw in (("manifest.json", manifest), ("relay.sqlite3", b"db"), ("log.key", b"k" * 32)):
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        if kind == "duplicate":  # a second log.key, which an extraction would write over the first
            info = tarfile.TarInfo("log.key")
            info.size = 32
            tar.addfile(info, io.BytesIO(b"x" * 32))
        else:
            tar.addfile(_hostile(kind))
    with pytest.raises(BackupError, match="unexpected member"):
        restore_sqlite(evil, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]
    with tarfile.open(evil) as tar:
        members = tar.getmembers()
    with pytest.raises(BackupError, match="unexpected member"):
        check_members(members, evil)


@pytest.mark.parametrize("blob_store", ["fs", "postgresql"])
async def test_backup_of_a_running_postgresql_relay_restores_the_same_envelopes_and_log(
    tmp_path: Path, relay_factory: RelayFactory, pg_server: PgServer, pg_dsn: str, blob_store: str
) -> None:
    old = await relay_factory("old", database=pg_dsn, blob_store=blob_store)
    gp = await old.enroll(GP, with_home=True)
    derm = await old.enroll(DERM, with_home=True)
    assert gp.home is not None
    photo = tmp_path / "photo.bin"
    sent = []
    for i in range(3):
        photo.write_bytes(os.urandom(1_500_000 + i))  # more than one chunk in the database
        sent.append(await core.send(gp.home, gp.keys, to=[DERM], kind="request",
                                    body=request_body(requis_rpps=DERM), files=[photo]))
    originals = {}
    for s in sent:
        r = await old.get(derm.keys, f"/v1/envelopes/{s.envelope_id}")
        assert r.status == 200
        originals[s.envelope_id] = r.body
    vkey = (await send_raw(old.session, "GET", old.u("/log/vkey"))).body.decode().strip()
    before = _open((await send_raw(old.session, "GET", old.u("/checkpoint"))).body, vkey)

    async def submissions_meanwhile() -> int:
        for _ in range(4):
            ct = os.urandom(INLINE_MAX + 1)  # in the blob store, like the three before
            eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=old.clock())
            assert (await old.put(gp.keys, eid, prefix + ct)).status == 201
        return 4

    backup = tmp_path / "relay-backup.tar"
    settings = tmp_path / "relay.toml"  # the relay's own settings, as an operator runs the tools
    settings.write_text(f'[relay]\ndatabase = "{pg_dsn}"\nblob_store = "{blob_store}"\n', encoding="utf-8")
    if blob_store == "postgresql":  # without them, the backup would miss the ciphertext: refused
        assert_clean_failure(await cli("backup", "--data", old.data, "--database", pg_dsn, "--to", backup),
                             "blob_store = postgresql")
        assert not backup.exists()
    run, _ = await asyncio.gather(  # the old relay keeps serving, and taking envelopes, meanwhile
        cli("--config", settings, "backup", "--data", old.data, "--to", backup, "--json"), submissions_meanwhile())
    assert run.code == 0, run.err
    made = json.loads(run.out)
    assert made["engine"] == "postgresql"
    assert made["log_size"] >= before.size
    assert made["envelopes_stored"] >= 3
    assert made["missing_blobs"] == 0
    with tarfile.open(backup) as tar:
        names = set(tar.getnames())
        assert tar.getmember("log.key").mode == 0o600
    assert {"manifest.json", "relay.pgdump", "log.key"} <= names
    blob_files = sum(n.startswith("blobs/") for n in names)
    assert blob_files == (made["envelopes_stored"] if blob_store == "fs" else 0)  # else: in the dump

    # Never over something: a database with tables (here the old relay's) is refused, untouched.
    assert_clean_failure(await cli("restore", "--from", backup, "--data", tmp_path / "x", "--database", pg_dsn),
                         "not empty")
    assert not (tmp_path / "x").exists()
    assert (await old.get(derm.keys, "/v1/inbox")).status == 200
    # A SQLite target for a PostgreSQL backup says what to give.
    assert_clean_failure(await cli("restore", "--from", backup, "--data", tmp_path / "y"), "--database")

    new_dsn = pg_server.create_database()
    run = await cli("restore", "--from", backup, "--data", tmp_path / "new", "--database", new_dsn, "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["log_size"] == made["log_size"]
    new = await relay_factory("new", database=new_dsn, blob_store=blob_store)
    for envelope_id, body in originals.items():
        r = await new.get(derm.keys, f"/v1/envelopes/{envelope_id}")
        assert r.status == 200
        assert r.body == body
        r = await new.get(derm.keys, f"/v1/envelopes/{envelope_id}", headers={"Range": "bytes=1048570-"})
        assert (r.status, r.body) == (206, body[1048570:])
    # The same log, and it goes on: a consistency proof links the checkpoint held before the
    # backup, and the backup's own, to the restored relay's after one more entry.
    assert (await new.ack(derm.keys, bytes.fromhex(sent[0].envelope_id))).status == 200
    assert (await send_raw(new.session, "GET", new.u("/log/vkey"))).body.decode().strip() == vkey
    after = _open((await send_raw(new.session, "GET", new.u("/checkpoint"))).body, vkey)
    assert (after.origin, after.size) == (before.origin, made["log_size"] + 1)
    for held in (before, _open(made["checkpoint"].encode(), vkey)):
        r = await send_raw(new.session, "GET", new.u(f"/log/consistency?first={held.size}&second={after.size}"))
        proof = [base64.b64decode(h) for h in r.json()["proof"]]
        merkle.verify_consistency(held.size, after.size, proof, held.root_hash, after.root_hash)


def test_pg_tools_get_the_password_from_the_environment_never_the_command_line(tmp_path: Path) -> None:
    assert split_password("postgresql://pli:p%40ss@db.example:5432/pli?sslmode=require") == (
        "postgresql://pli@db.example:5432/pli?sslmode=require", "p@ss")
    assert split_password("postgresql://pli@db/pli") == ("postgresql://pli@db/pli", None)
    from click.testing import CliRunner  # noqa: PLC0415

    from relay.cli import cli as relay_cli  # noqa: PLC0415

    (tmp_path / "log.key").write_bytes(b"k" * 32)
    env = {"PLI_RELAY_DATABASE": "postgresql://pli:s3cr3t-pw@127.0.0.1:1/pli"}
    result = CliRunner().invoke(relay_cli, ["backup", "--data", str(tmp_path), "--to", str(tmp_path / "b.tar")],
                                env=env)
    assert result.exit_code == 1
    assert "backup failed: cannot connect to the database" in result.output
    assert "s3cr3t" not in result.output
    assert not (tmp_path / "b.tar").exists()


def test_blobs_in_postgresql_need_a_postgresql_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="blob_store = postgresql keeps ciphertext in the PostgreSQL database"):
        RelayConfig(data=tmp_path, blob_store="postgresql")
    with pytest.raises(ConfigError, match="blob_store: fs or postgresql"):
        RelayConfig(data=tmp_path, blob_store="s3")


def test_app_has_its_own_registry(tmp_path: Path) -> None:
    a = create_app(RelayConfig(data=tmp_path / "a"))
    b = create_app(RelayConfig(data=tmp_path / "b"))
    assert a[METRICS].registry is not b[METRICS].registry
    assert re.search(r"pli_relay_uploads_in_flight 0", a[METRICS].render().decode())
