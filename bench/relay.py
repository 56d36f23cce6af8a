"""Relay submissions per second, against a bare aiohttp handler measured in the same run.

    python bench/relay.py                 # 8 s per run, 64 connections
    python bench/relay.py --quick         # a short run, for CI

Each submission is a real one: a 4 KiB envelope whose routing header is signed by the
device, sent as a PUT signed with RFC 9421, checked, stored durably (SQLite WAL with
synchronous=FULL, as shipped), logged in the transparency log and answered with its
receipt and inclusion proof. Requests are built and signed before the timed phase and
replayed by a small raw-socket HTTP/1.1 client, so the load generator's own cost is
low; it runs in this process, the relay (one worker) in another.

The baseline is a bare aiohttp handler that reads the body and answers 200, in its own
process, fed the very same requests by the same client.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_seconds, start_server, stop

from client.api import RelayClient
from protocol import httpsig
from protocol.envelope import EnvelopeHeader, seal_header
from protocol.keys import DeviceKeys

BODY = 4096
GP = ("10000005479", "Dr Claire Martin")
DERM = ("10000012343", "Dr Karim Benali")


async def _enrol(url: str, data: Path) -> tuple[DeviceKeys, DeviceKeys]:
    keys = []
    for rpps, name in (GP, DERM):
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "relay", "invite", "--data", str(data), "--rpps", rpps, "--name", name,
             "--profession", "médecin", "--json"], capture_output=True, text=True, check=True,
        )
        k = DeviceKeys.generate(now=int(time.time()))
        async with RelayClient(url) as r:
            await r.enroll(json.loads(out.stdout)["code"], k.public().to_record())
        keys.append(k)
    return keys[0], keys[1]


def _requests(url: str, sender: DeviceKeys, recipient: DeviceKeys, n: int) -> list[bytes]:
    """n complete HTTP/1.1 requests, each a signed submission of a fresh 4 KiB envelope."""
    host = url.removeprefix("http://")
    authority = host
    now = int(time.time())
    keyid = sender.device_id.hex()
    signing = sender.signing_key
    out = []
    for _ in range(n):
        eid = os.urandom(16)
        ct = os.urandom(BODY)
        header = EnvelopeHeader(id=eid, sender=sender.device_id, to=(recipient.device_id,), created=now,
                                expires=now + 86400, size=len(ct), sha256=hashlib.sha256(ct).digest())
        body = seal_header(header, signing).prefix + ct
        path = f"/v1/envelopes/{eid.hex()}"
        headers = httpsig.sign_request(
            method="PUT", authority=authority, path=path, query="",
            content_digest=httpsig.content_digest(hashlib.sha256(body).digest()),
            signing_key=signing, keyid=keyid, created=now, nonce=httpsig.encode_nonce(os.urandom(16)),
        )
        head = (f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/vnd.pli.envelope\r\n"
                f"Content-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
        out.append(head.encode() + body)
    return out


async def _load(url: str, requests: list[bytes], connections: int, seconds: float) -> dict[str, float]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    it = iter(requests)
    latencies: list[float] = []
    errors = 0
    deadline = 0.0

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                req = next(it, None)
                if req is None:
                    return
                t0 = time.perf_counter()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if status >= 300:
                    errors += 1
                    if errors <= 3:
                        print("refused:", head.split(b"\r\n")[0].decode(), file=sys.stderr)
        finally:
            writer.close()

    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0,
        "done": float(len(latencies)),
        "errors": float(errors),
    }


def baseline_server() -> None:
    """A bare aiohttp handler: read the body, answer 200 (run as its own process)."""
    from aiohttp import web  # noqa: PLC0415

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True}, status=201)

    async def main() -> None:
        app = web.Application(client_max_size=8 << 20)
        app.router.add_put("/v1/envelopes/{id}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
        print(f"http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def _relay_run(tmp: Path, name: str, n: int, connections: int, seconds: float, env: dict[str, str],
               profile: Path | None = None, spy_args: tuple[str, ...] = ()) -> dict[str, float]:
    data = tmp / name
    proc, url = start_server([sys.executable, "-m", "relay", "serve", "--data", str(data), "--listen", "127.0.0.1:0"],
                             Path(os.devnull), {"PLI_RELAY_LOG_FORMAT": "json", **env})
    spy = None
    try:
        gp, derm = asyncio.run(_enrol(url, data))
        reqs = _requests(url, gp, derm, n)
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            out = profile / f"{name}.folded"
            spy = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "-r", "250", "-f", "raw", *spy_args,
                 "--pid", str(proc.pid), "-o", str(out), "-d", str(int(seconds) + 2)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches before the timed phase
        cpu, loop = cpu_seconds(proc.pid), cpu_seconds(proc.pid, proc.pid)
        result = asyncio.run(_load(url, reqs, connections, seconds))
        cpu, loop = cpu_seconds(proc.pid) - cpu, cpu_seconds(proc.pid, proc.pid) - loop
        result["cpu_us"] = 1e6 * cpu / max(1.0, result["done"])
        result["loop_us"] = 1e6 * loop / max(1.0, result["done"])
        if spy is not None:
            spy.wait()
            print(f"profile: {out}", file=sys.stderr)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        stop(proc)
    return result


def _baseline_run(n: int, connections: int, seconds: float) -> dict[str, float]:
    proc, url = start_server([sys.executable, __file__, "--baseline-server"], Path(os.devnull))
    try:
        dummy = DeviceKeys.generate(now=int(time.time()))
        reqs = _requests(url, dummy, dummy, n)
        cpu = cpu_seconds(proc.pid)
        result = asyncio.run(_load(url, reqs, connections, seconds))
        result["cpu_us"] = 1e6 * (cpu_seconds(proc.pid) - cpu) / max(1.0, result["done"])
    finally:
        stop(proc)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--requests", type=int, default=40_000, help="requests signed ahead per run")
    ap.add_argument("--quick", action="store_true", help="a short run (CI)")
    ap.add_argument("--only", choices=("baseline", "relay", "relay0"), action="append",
                    help="run only these (repeatable); default: all three")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="py-spy the relay during its timed runs (raw folded stacks) into DIR")
    ap.add_argument("--spy", action="append", default=[], metavar="ARG",
                    help="more py-spy arguments with --profile (e.g. --spy=--native --spy=--idle)")
    ap.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        baseline_server()
        return
    if args.quick:
        args.seconds, args.requests, args.connections = 1.0, 1500, 16
    runs = set(args.only or ("baseline", "relay", "relay0"))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pli-bench-") as t:
        tmp = Path(t)
        if "baseline" in runs:
            results["baseline"] = _baseline_run(args.requests, args.connections, args.seconds)
        if "relay" in runs:
            results["relay"] = _relay_run(tmp, "relay", args.requests, args.connections, args.seconds, {},
                                          args.profile, tuple(args.spy))
        if "relay0" in runs:
            results["relay0"] = _relay_run(tmp, "relay0", args.requests, args.connections, args.seconds,
                                           {"PLI_RELAY_GROUP_COMMIT_MS": "0"}, args.profile, tuple(args.spy))
    _report(results)


def _report(results: dict[str, dict[str, float]]) -> None:
    refused = {k: r["errors"] for k, r in results.items() if k != "baseline" and r["errors"]}
    if refused:
        raise SystemExit(f"relay refused submissions: {refused}")
    labels = {"baseline": "bare aiohttp handler", "relay": "Pli relay", "relay0": "Pli relay, group commit 0 ms"}
    for key, r in results.items():
        loop = f" (event loop's thread {r['loop_us']:.0f})" if "loop_us" in r else ""
        print(f"{labels[key]:<30} {r['rps']:8.0f} req/s   p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms"
              f"   CPU {r['cpu_us']:4.0f} µs/request{loop}   ({r['done']:.0f} requests)")
    base = results.get("baseline")
    if base is not None:
        if "relay" in results:
            print(f"relay / baseline: {results['relay']['rps'] / base['rps']:.1%} (target >= 35%)")
        if "relay0" in results:
            print(f"group commit 0 ms / baseline: {results['relay0']['rps'] / base['rps']:.1%}")


if __name__ == "__main__":
    main()
