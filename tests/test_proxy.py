"""deploy/'s nginx configuration, as an ARS runs it: TLS in front of a relay process.

nginx from Debian's packages runs as any user (a temporary prefix, ``daemon off``, its
error log and pid file there) with ``deploy/nginx-pli-relay.conf`` itself, only its
placeholders filled in: loopback ports, a self-signed certificate made here, the relay's
address. Clients trust that certificate through ``PLI_CA_FILE`` (never by turning
verification off). Through it:

- ``pli demo --relay https://…`` runs a whole case;
- a 20 MB envelope goes up in one request while the client still holds its last bytes, so
  nginx must be streaming the body to the relay (a buffering proxy would wait for the end
  and the test would time out), and comes back down byte for byte;
- TLS refuses suites without forward secrecy, plain HTTP redirects only to our own name
  and serves certbot's challenges, and /readyz and /metrics answer allowed addresses only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from conftest import make_envelope, signed
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client.api import RelayClient
from protocol.keys import DeviceKeys
from relay.routes import ENVELOPE_TYPE

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "nginx-pli-relay.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
TIMEOUT = 60
MAX_REQUEST = 24 << 20  # the relay's max_request here: a 20 MB envelope fits one request
BIG = 20_000_000

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian package `nginx`; `make system-deps` installs it as root)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key: RSA, so that
    the suites with a static RSA key exchange could be chosen, and must be refused."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pli relay test")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=True, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "relay.crt", folder / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def render_site(values: dict[str, str]) -> str:
    """deploy/'s configuration with its placeholders filled in, and nothing else changed."""
    text = TEMPLATE.read_text(encoding="utf-8")
    for name, value in values.items():
        assert f"@{name}@" in text, name
        text = text.replace(f"@{name}@", value)
    assert "@" not in "".join(line.split("#")[0] for line in text.splitlines()), "a placeholder left unfilled"
    return text


def main_config(prefix: Path, site: Path) -> str:
    """The http{} around the site, everything in ``prefix`` (no root needed)."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers may then read the temporary prefix
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                            "uwsgi", "scgi"))
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n{temp}\n    include {site};\n}}\n"
    )


@dataclass
class Proxied:
    url: str  # https, through nginx
    http_url: str  # nginx's plain HTTP server (redirects, ACME challenges)
    relay_url: str  # the relay itself, plain HTTP on loopback
    acme: Path  # the ACME webroot
    data: Path
    cert: Path
    prefix: Path

    def ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


async def _stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest_asyncio.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[Proxied]:
    assert NGINX is not None
    data = tmp_path / "relay"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLI_")}
    env.update(PLI_RELAY_LOG_FORMAT="json", PLI_RELAY_MAX_REQUEST=str(MAX_REQUEST),
               PLI_RELAY_TRUSTED_PROXIES="127.0.0.1")
    with (tmp_path / "relay.log").open("wb") as err:
        relay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--data", str(data), "--listen", "127.0.0.1:0",
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=err,
        )
    nginx: asyncio.subprocess.Process | None = None
    try:
        assert relay.stdout is not None
        relay_url = (await asyncio.wait_for(relay.stdout.readline(), TIMEOUT)).decode().strip()
        assert relay_url.startswith("http://127.0.0.1:"), (tmp_path / "relay.log").read_text()
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        cert, key = make_certificate(prefix)
        https, http = _free_port(), _free_port()
        site = prefix / "pli-relay.conf"
        acme = prefix / "acme"
        acme.mkdir()
        site.write_text(render_site({
            "SERVER_NAME": "127.0.0.1", "HTTPS_LISTEN": f"127.0.0.1:{https}", "HTTP_LISTEN": f"127.0.0.1:{http}",
            "CERT": str(cert), "KEY": str(key), "RELAY": relay_url.removeprefix("http://"),
            "MAX_BODY": f"{MAX_REQUEST + (1 << 20)}", "ACCESS_LOG": str(prefix / "access.log"),
            "ACME_ROOT": str(acme),
        }), encoding="utf-8")
        conf = prefix / "nginx.conf"
        conf.write_text(main_config(prefix, site), encoding="utf-8")
        nginx = await asyncio.create_subprocess_exec(
            NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        url = f"https://127.0.0.1:{https}"
        p = Proxied(url=url, http_url=f"http://127.0.0.1:{http}", relay_url=relay_url, acme=acme, data=data,
                    cert=cert, prefix=prefix)
        await _until_serving(p, nginx)
        yield p
    finally:
        if nginx is not None:
            await _stop(nginx, signal.SIGQUIT)  # graceful: finish what is in flight
        await _stop(relay)
    assert relay.returncode == 0, (tmp_path / "relay.log").read_text()


async def _until_serving(p: Proxied, nginx: asyncio.subprocess.Process) -> None:
    """Wait for nginx to answer /livez through TLS (it prints nothing when ready)."""
    deadline = time.monotonic() + TIMEOUT
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=p.ssl())) as session:
        while True:
            if nginx.returncode is not None:
                err = (await nginx.stderr.read()).decode() if nginx.stderr else ""
                log = (p.prefix / "error.log").read_text() if (p.prefix / "error.log").exists() else ""
                pytest.fail(f"nginx exited ({nginx.returncode}): {err}\n{log}")
            try:
                async with session.get(p.url + "/livez") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectorError:
                pass
            assert time.monotonic() < deadline, "nginx did not start serving"
            await asyncio.sleep(0.05)  # polling a real condition (nginx reports no readiness)


async def _relay_cli(*args: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLI_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, err.decode()
    return dict(json.loads(out))


async def test_pli_demo_through_the_tls_proxy(proxied: Proxied) -> None:
    # Verification stays on: without the certificate named, the client refuses the proxy.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(proxied.url + "/livez")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLI_")}
    env.update(PLI_LANG="en", PLI_CA_FILE=str(proxied.cert))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client", "demo", "--relay", proxied.url, "--relay-data", str(proxied.data),
        "--workdir", str(proxied.data.parent / "demo"), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, out.decode() + err.decode()
    assert "Demo passed" in out.decode(), out.decode()
    assert f"Using the relay at {proxied.url}" in out.decode()
    # The requests went through nginx (its access log), not around it.
    access = (proxied.prefix / "access.log").read_text(encoding="utf-8")
    assert "PUT /v1/envelopes/" in access
    assert "POST /v1/enroll" in access



async def test_a_big_envelope_streams_through_the_proxy_both_ways(proxied: Proxied) -> None:
    code = str((await _relay_cli("invite", "--data", str(proxied.data), "--rpps", "10000005479",
                                 "--name", "Dr Claire Martin", "--profession", "médecin", "--json"))["code"])
    keys = DeviceKeys.generate(now=int(time.time()))
    os.environ["PLI_CA_FILE"] = str(proxied.cert)  # RelayClient reads it, as the `pli` command does
    try:
        async with RelayClient(proxied.url) as client:
            await client.enroll(code, keys.public().to_record())
    finally:
        del os.environ["PLI_CA_FILE"]
    ciphertext = os.urandom(BIG)
    eid, prefix = make_envelope(keys, [keys.device_id], ciphertext, now=int(time.time()))
    body = prefix + ciphertext
    part = proxied.data / "blobs" / "incoming" / f"{eid.hex()}.part"
    held = 1 << 20

    async def send() -> AsyncIterator[bytes]:
        # All but the last MiB, then wait until the relay itself holds most of it: only a
        # proxy that streams the body lets that happen before the body is complete.
        for i in range(0, len(body) - held, 1 << 20):
            yield body[i : min(i + (1 << 20), len(body) - held)]
        deadline = time.monotonic() + TIMEOUT
        while not (part.exists() and part.stat().st_size >= BIG // 2):
            assert time.monotonic() < deadline, "the relay got nothing before the body's end: the proxy buffers"
            await asyncio.sleep(0.02)  # polling the relay's part file, a real condition
        yield body[len(body) - held :]

    url = f"{proxied.url}/v1/envelopes/{eid.hex()}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=proxied.ssl())) as session:
        reply = await signed(session, keys, "PUT", url, body, content_type=ENVELOPE_TYPE, send_body=send())
        assert reply.status == 201, reply.body[:300]
        assert reply.json()["receipt"]["type"] == "submitted"
        down = await signed(session, keys, "GET", url)
        assert down.status == 200
        assert down.body == body


async def test_an_envelope_over_the_proxys_body_limit_goes_in_pieces(proxied: Proxied, tmp_path: Path) -> None:
    # The client sends the ciphertext in one PATCH; nginx refuses a body over its
    # client_max_body_size (413, its own HTML page), and the client goes on in 4 MiB pieces.
    code = str((await _relay_cli("invite", "--data", str(proxied.data), "--rpps", "10000005479",
                                 "--name", "Dr Claire Martin", "--profession", "médecin", "--json"))["code"])
    keys = DeviceKeys.generate(now=int(time.time()))
    ciphertext = os.urandom(MAX_REQUEST + (3 << 20))  # over nginx's limit here (max_request + 1 MiB)
    path = tmp_path / "ct.age"
    path.write_bytes(ciphertext)
    eid, prefix = make_envelope(keys, [keys.device_id], ciphertext, now=int(time.time()))
    offsets: list[int] = []
    os.environ["PLI_CA_FILE"] = str(proxied.cert)
    try:
        async with RelayClient(proxied.url, keys) as client:
            await client.enroll(code, keys.public().to_record())
            state = await client.upload(eid, prefix, path, progress=lambda done, _total: offsets.append(done))
    finally:
        del os.environ["PLI_CA_FILE"]
    assert (state["complete"], state["offset"]) == (True, len(ciphertext))
    assert state["receipt"]["type"] == "submitted"
    assert (proxied.data / "blobs" / eid.hex()[:2] / eid.hex()).read_bytes() == prefix + ciphertext
    access = (proxied.prefix / "access.log").read_text(encoding="utf-8")
    assert " 413 " in access  # the whole-rest PATCH, refused by nginx
    assert access.count("PATCH /v1/envelopes/") >= 1 + len(ciphertext) // (4 << 20)


async def test_readiness_and_metrics_answer_allowed_addresses_only(proxied: Proxied) -> None:
    # This machine (127.0.0.1, allowed) gets them through the proxy; any other address
    # (here 127.0.0.2, a different source address on the loopback) is refused by nginx,
    # while /livez stays public.
    for source, expected in (("127.0.0.1", 200), ("127.0.0.2", 403)):
        connector = aiohttp.TCPConnector(ssl=proxied.ssl(), local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            for path in ("/readyz", "/metrics"):
                async with session.get(proxied.url + path) as resp:
                    assert resp.status == expected, (source, path)
            async with session.get(proxied.url + "/livez") as resp:
                assert resp.status == 200


async def _handshake(proxied: Proxied, ciphers: str, version: ssl.TLSVersion) -> str:
    """The suite nginx agrees on for a client offering only ``ciphers`` in ``version``."""
    ctx = proxied.ssl()
    ctx.minimum_version = ctx.maximum_version = version
    if version == ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers(ciphers + ":@SECLEVEL=0")  # let the client offer what the server must refuse
    host, port = proxied.url.removeprefix("https://").split(":")
    _, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    try:
        suite = writer.get_extra_info("cipher")
        return str(suite[0])
    finally:
        writer.close()


@pytest.mark.parametrize("suite", ["AES256-SHA", "AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA",
                                   "ECDHE-RSA-AES256-SHA384"])
async def test_tls_refuses_suites_without_forward_secrecy_or_aead(proxied: Proxied, suite: str) -> None:
    # Static RSA key exchange (no forward secrecy) and CBC with SHA-1/SHA-384 MACs: nginx's
    # default (HIGH:!aNULL:!MD5) accepts them; Mozilla's intermediate profile does not.
    with pytest.raises(ssl.SSLError):
        await _handshake(proxied, suite, ssl.TLSVersion.TLSv1_2)
    assert await _handshake(proxied, "ECDHE-RSA-AES128-GCM-SHA256", ssl.TLSVersion.TLSv1_2) \
        == "ECDHE-RSA-AES128-GCM-SHA256"
    assert (await _handshake(proxied, "", ssl.TLSVersion.TLSv1_3)).startswith("TLS_")


async def test_plain_http_redirects_to_our_name_and_serves_acme_challenges(proxied: Proxied) -> None:
    token = "x4Bq-Zr7_token"
    (proxied.acme / ".well-known" / "acme-challenge").mkdir(parents=True)
    (proxied.acme / ".well-known" / "acme-challenge" / token).write_text("token.thumbprint", encoding="ascii")
    async with aiohttp.ClientSession() as session:
        # A foreign Host header is not reflected: the redirect goes to our server_name.
        async with session.get(proxied.http_url + "/v1/inbox?wait=1", allow_redirects=False,
                               headers={"Host": "evil.example"}) as resp:
            assert resp.status == 308
            assert resp.headers["Location"] == "https://127.0.0.1/v1/inbox?wait=1"
            assert resp.headers["Server"] == "nginx"  # server_tokens off: no version
        # certbot's renewal (HTTP-01) reads its token over plain HTTP, unredirected.
        async with session.get(f"{proxied.http_url}/.well-known/acme-challenge/{token}",
                               allow_redirects=False) as resp:
            assert resp.status == 200
            assert await resp.text() == "token.thumbprint"
        async with session.get(f"{proxied.http_url}/.well-known/acme-challenge/missing",
                               allow_redirects=False) as resp:
            assert resp.status == 404
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=proxied.ssl())) as session,
                session.get(proxied.url + "/livez") as resp):
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
        assert resp.headers["Server"] == "nginx"
