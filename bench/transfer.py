"""Transfer benchmark (issue "Speed", item 3): a large envelope through a real relay,
against a bare aiohttp server doing the plainest streaming upload and download.

    python bench/transfer.py                 # 1 GiB, about a minute on 2 cores
    python bench/transfer.py --size 64M      # quick
    python bench/transfer.py --quick         # CI: 32 MiB, exits non-zero if anything breaks

Three processes: this one (the client: ``client.api.RelayClient`` for the relay, a bare
``aiohttp.ClientSession`` for the baseline), a relay (``python -m relay serve``) and a
baseline server (this file with ``--serve-baseline``: PUT streams the body to a file,
GET is a ``FileResponse``). Each phase runs after ``sync`` so no phase pays for the
previous one's disk writeback; the peak RSS (VmHWM) of the client and of the server is
reset before each phase (``/proc/<pid>/clear_refs``) and read after it.

Phases: baseline PUT, relay upload (``RelayClient.upload``: a signed PUT of the prefix,
then one signed PATCH streaming the ciphertext), baseline GET, relay download
(``RelayClient.download`` into a file), then the two resumes: an upload whose connection
is killed half-way through its PATCH, resumed by calling ``upload`` again from the
relay's offset (bytes sent the second time are counted), and a
download (``client.core._download``, which keeps ``.age.part``) cut half-way and resumed
with a ``Range`` request. The last lines are the figures and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from _common import BenchError, cpu_seconds, start_server, stop  # noqa: E402
from aiohttp import web  # noqa: E402

from client import api, core  # noqa: E402
from client.api import RelayClient  # noqa: E402
from protocol.envelope import EnvelopeHeader, seal_header  # noqa: E402
from protocol.keys import DeviceKeys  # noqa: E402

MiB = 1 << 20
READ = 1 << 18  # the baseline client reads the response as RelayClient.download does
TARGET_RATIO = 0.80
_LIMIT = 1 << 62  # the bench downloads what it uploaded itself; core._download takes a bound
MEMORY_LIMIT = 100 * MiB
SENDER = ("10000005479", "Dr Claire Martin")
RECIPIENT = ("10000012343", "Dr Karim Benali")


class Cut(Exception):
    pass


# -- measurement helpers ---------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)(i?B?)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def hwm(pid: int | str = "self") -> int:
    """Peak resident set size of a process, bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no VmHWM in /proc/status")


def reset_hwm(pid: int | str = "self") -> None:
    """Reset the peak RSS to the current RSS (Linux ≥ 4.0: ``echo 5 > clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.digest()


def make_ciphertext(path: Path, size: int) -> bytes:
    """Random bytes (the relay does not parse age), written in 8 MiB pieces; returns SHA-256."""
    rng = random.Random(size)
    h = hashlib.sha256()
    left = size
    with path.open("wb") as f:
        while left:
            block = rng.randbytes(min(left, 8 * MiB))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.digest()


class Phase:
    """Times one phase; resets and reads the peak RSS of this process and of a server, and
    the CPU time each spent in it (all threads)."""

    def __init__(self, name: str, size: int, server_pid: int) -> None:
        self.name, self.size, self.server_pid = name, size, server_pid
        self.seconds = 0.0
        self.client_hwm = self.server_hwm = 0
        self.client_cpu = self.server_cpu = 0.0

    def __enter__(self) -> Self:
        os.sync()  # the previous phase's dirty pages are not this phase's cost
        reset_hwm()
        reset_hwm(self.server_pid)
        self._cpu0 = time.process_time(), cpu_seconds(self.server_pid)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.client_cpu = time.process_time() - self._cpu0[0]
        self.server_cpu = cpu_seconds(self.server_pid) - self._cpu0[1]
        self.client_hwm = hwm()
        self.server_hwm = hwm(self.server_pid)

    @property
    def rate(self) -> float:
        return self.size / MiB / self.seconds

    def line(self) -> str:
        return (f"  {self.name:<26} {self.seconds:7.2f} s  {self.rate:8.1f} MiB/s   "
                f"CPU client {self.client_cpu:5.2f} s, server {self.server_cpu:5.2f} s   "
                f"peak RSS client {self.client_hwm / MiB:5.1f} MiB, server {self.server_hwm / MiB:5.1f} MiB")


# -- processes --------------------------------------------------------------------------------


def invite(data: Path, rpps: str, name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "invite", "--data", str(data), "--rpps", rpps, "--name", name,
         "--profession", "médecin", "--json"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    if out.returncode != 0:
        raise BenchError(f"pli-relay invite: {out.stderr.strip()}")
    return str(json.loads(out.stdout)["code"])


# -- baseline server (a separate process) -------------------------------------------------------


def serve_baseline(folder: Path) -> None:
    """PUT /blob streams the body to a file; GET /blob serves it (sendfile, like the relay)."""

    async def put(request: web.Request) -> web.Response:
        path = folder / "blob"
        n = 0
        with path.open("wb") as f:
            async for chunk in request.content.iter_any():
                f.write(chunk)
                n += len(chunk)
            if request.query.get("fsync"):
                f.flush()
                os.fsync(f.fileno())
        return web.json_response({"size": n})

    async def get(_request: web.Request) -> web.StreamResponse:
        return web.FileResponse(folder / "blob")

    async def main() -> None:
        app = web.Application()
        app.router.add_put("/blob", put)
        app.router.add_get("/blob", get)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server  # noqa: SLF001 - the bound port
        print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def _session() -> aiohttp.ClientSession:
    # The same settings RelayClient uses.
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=120), auto_decompress=False
    )


async def baseline_upload(url: str, src: Path, *, fsync: bool = False) -> None:
    async with _session() as s:
        with src.open("rb") as f:
            async with s.put(f"{url}/blob", data=f, params={"fsync": "1"} if fsync else None) as resp:
                resp.raise_for_status()
                got = (await resp.json())["size"]
    if got != src.stat().st_size:
        raise BenchError(f"baseline server stored {got} bytes")


async def baseline_download(url: str, dst: Path) -> None:
    async with _session() as s, s.get(f"{url}/blob") as resp:
        resp.raise_for_status()
        with dst.open("wb") as f:
            async for chunk in resp.content.iter_chunked(READ):
                f.write(chunk)


# -- relay clients that count, cut, or kill -----------------------------------------------------


class CountingClient(RelayClient):
    """Counts the body bytes of PUT/PATCH requests and the bytes received by downloads;
    can kill the connection in the middle of a PATCH body once ``kill_after`` is reached."""

    def __init__(self, *a: Any, kill_after: int | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.sent = 0
        self.requests: list[tuple[str, int, int]] = []  # (method, offset, body length)
        self.received = 0
        self.range_from: int | None = None
        self.kill_after = kill_after

    async def _request(self, method: str, path: str, *, body: bytes = b"", stream: Any = None, **kw: Any) -> Any:
        query = kw.get("query") or {}
        offset = int(query.get("offset", 0))
        length = stream.length if stream is not None else len(body)
        if method in {"PUT", "PATCH"}:
            self.requests.append((method, offset, length))
        if method == "PATCH" and stream is not None and self.kill_after is not None:
            upto, self.kill_after = self.kill_after - offset, None
            await self._killed_patch(path, stream, kw["digest"], query, upto)
        if method in {"PUT", "PATCH"}:
            self.sent += length
        return await super()._request(method, path, body=body, stream=stream, **kw)

    async def _killed_patch(self, path: str, stream: Any, digest: bytes, query: dict[str, str], upto: int) -> None:
        """Send a correctly signed PATCH whose connection dies once ``upto`` body bytes are sent."""
        url = self._url(path, query)
        headers = self._sign("PATCH", url, b"", digest)
        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Length"] = str(stream.length)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        head = f"PATCH {url.raw_path_qs} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode())
        chunks = stream.chunks()
        async for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            self.sent += len(chunk)
            if self.sent >= upto:
                break
        await chunks.aclose()
        writer.transport.abort()  # a cable pulled: no FIN, no rest of the body
        del reader
        raise Cut

    async def download(self, envelope_id: bytes, sink: Callable[[bytes], None], *, offset: int = 0,
                       progress: api.Progress | None = None) -> None:
        self.range_from = offset

        def counting(chunk: bytes) -> None:
            self.received += len(chunk)
            sink(chunk)

        await super().download(envelope_id, counting, offset=offset, progress=progress)


# -- the benchmark ------------------------------------------------------------------------------


async def enroll(url: str, data: Path) -> tuple[DeviceKeys, DeviceKeys]:
    now = int(time.time())
    out = []
    for rpps, name in (SENDER, RECIPIENT):
        keys = DeviceKeys.generate(now=now)
        async with RelayClient(url) as r:
            answer = await r.enroll(invite(data, rpps, name), keys.public().to_record())
        if answer["device_id"] != keys.device_id.hex():
            raise BenchError("the relay enrolled another device id")
        out.append(keys)
    return out[0], out[1]


def prepare(sender: DeviceKeys, recipient: DeviceKeys, size: int, digest: bytes) -> tuple[bytes, bytes]:
    now = int(time.time())
    header = EnvelopeHeader(id=os.urandom(16), sender=sender.device_id, to=(recipient.device_id,),
                            created=now, expires=now + 86400, size=size, sha256=digest)
    return header.id, seal_header(header, sender.signing_key).prefix


def _fmt(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} B"


async def run(args: argparse.Namespace, work: Path, t0: float) -> bool:  # noqa: C901, PLR0915 - one scripted scenario
    size: int = args.size
    if args.chunk:
        api.UPLOAD_CHUNK = args.chunk
    src = work / "ciphertext.age"
    tg = time.perf_counter()
    digest = make_ciphertext(src, size)
    print(f"{_fmt(size)} of random ciphertext written in {time.perf_counter() - tg:.1f} s "
          f"(UPLOAD_CHUNK {_fmt(api.UPLOAD_CHUNK)}, download read {_fmt(api._READ)})")  # noqa: SLF001

    relay_data = work / "relay"
    relay, relay_url = start_server(
        [sys.executable, "-m", "relay", "serve", "--data", str(relay_data), "--listen", "127.0.0.1:0"],
        work / "relay.log")
    base, base_url = start_server(
        [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", str(work / "baseline")],
        work / "baseline.log")
    ok = True
    try:
        sender, recipient = await enroll(relay_url, relay_data)
        print(f"relay {relay_url} (pid {relay.pid}), baseline {base_url} (pid {base.pid}); 2 devices enrolled")
        best: dict[str, Phase] = {}

        def keep(p: Phase) -> None:
            print(p.line())
            if p.name not in best or p.seconds < best[p.name].seconds:
                best[p.name] = p

        async def up_baseline(_rnd: int) -> None:
            (work / "baseline" / "blob").unlink(missing_ok=True)  # no truncation of the last one in the PUT
            with Phase("baseline upload", size, base.pid) as p:
                await baseline_upload(base_url, src)
            keep(p)

        async def up_durable(_rnd: int) -> None:
            (work / "baseline" / "blob").unlink(missing_ok=True)
            with Phase("baseline upload + fsync", size, base.pid) as p:
                await baseline_upload(base_url, src, fsync=True)
            keep(p)

        async def up_relay(rnd: int) -> None:
            eid, prefix = prepare(sender, recipient, size, digest)
            with profiler(args.profile, relay.pid, f"relay-upload-{rnd + 1}"), \
                    Phase("relay upload", size, relay.pid) as p:
                async with RelayClient(relay_url, sender) as r:
                    state = await r.upload(eid, prefix, src)
            keep(p)
            if not state["complete"] or not state.get("receipt"):
                raise BenchError(f"the relay did not complete the upload: {state}")
            stored.append((eid, prefix))

        async def down_baseline(_rnd: int) -> None:
            dst = work / "baseline-download"
            with Phase("baseline download", size, base.pid) as p:
                await baseline_download(base_url, dst)
            keep(p)
            if sha256_file(dst) != digest:
                raise BenchError("the baseline download differs from the source")
            dst.unlink()

        async def down_relay(_rnd: int) -> None:
            eid, prefix = stored.pop()
            dst = work / "relay-download"
            with Phase("relay download", size + len(prefix), relay.pid) as p, dst.open("wb") as f:
                async with RelayClient(relay_url, recipient) as r:
                    await r.download(eid, f.write)  # type: ignore[arg-type]
            keep(p)
            with dst.open("rb") as f:
                if f.read(len(prefix)) != prefix:
                    raise BenchError("the relay download does not start with the envelope's prefix")
                h = hashlib.sha256()
                while chunk := f.read(8 * MiB):
                    h.update(chunk)
            if h.digest() != digest:
                raise BenchError("the relay download's ciphertext differs from the source")
            dst.unlink()
            async with RelayClient(relay_url, recipient) as r:
                await r.ack(eid)  # the relay deletes the blob: each round starts alike

        stored: list[tuple[bytes, bytes]] = []
        for rnd in range(args.repeat):
            # Rounds alternate which side goes first, so neither always pays for being first
            # (on this VM, the first write into never-touched memory is several times slower).
            order = [up_baseline, up_durable, up_relay, down_baseline, down_relay]
            if rnd % 2:
                order = [up_relay, up_durable, up_baseline, down_relay, down_baseline]
            print(f"round {rnd + 1}/{args.repeat}")
            for phase in order:
                await phase(rnd)

        # -- resume an upload whose connection died half-way through its PATCH
        print("resume:")
        eid, prefix = prepare(sender, recipient, size, digest)
        cut = CountingClient(relay_url, sender, kill_after=size // 2)
        async with cut:
            try:
                await cut.upload(eid, prefix, src)
                raise BenchError("the cut upload completed")
            except Cut:
                pass
        first_sent = cut.sent
        again_up = CountingClient(relay_url, sender)
        async with again_up:
            state = await again_up.upload(eid, prefix, src)  # its PUT waits for the cut PATCH's end
        second = again_up.sent
        patches = [o for m, o, _ in again_up.requests if m == "PATCH"]
        if not state["complete"]:
            raise BenchError("the resumed upload did not complete")
        held = patches[0] if patches else size
        up_ok = 0 < held <= first_sent and second == len(prefix) + size - held
        print(f"  upload cut after {_fmt(first_sent)} of ciphertext sent; the relay kept {_fmt(held)} "
              f"(what reached it); the second upload() sent {_fmt(second)}: its PUT the prefix, then one "
              f"PATCH from offset {held} ({_fmt(size - held)}) -> {'OK' if up_ok else 'WRONG'}")
        ok &= up_ok

        # -- resume a download cut half-way (client.core._download keeps <id>.age.part)
        cases = work / "recipient"
        prefix_path, age_path = cases / f"{eid.hex()}.prefix", cases / f"{eid.hex()}.age"

        def cut_half(have: int, total: int) -> None:
            if have >= total // 2:
                raise Cut

        cut = CountingClient(relay_url, recipient)
        async with cut:
            with contextlib.suppress(Cut):
                await core._download(cut, eid, prefix_path, age_path, cut_half, limit=_LIMIT)  # noqa: SLF001
        first_got = cut.received
        part = age_path.with_name(age_path.name + ".part")
        kept = part.stat().st_size if part.exists() else 0
        again_down = CountingClient(relay_url, recipient)
        async with again_down:
            await core._download(again_down, eid, prefix_path, age_path, None, limit=_LIMIT)  # noqa: SLF001
        again, range_from = again_down.received, again_down.range_from
        down_ok = (age_path.exists() and sha256_file(age_path) == digest
                   and range_from == len(prefix) + kept and again == size - kept)
        print(f"  download cut after {_fmt(first_got)}; {part.name} kept {_fmt(kept)}; the second call asked "
              f"Range: bytes={range_from}- and received {_fmt(again)} -> {'OK' if down_ok else 'WRONG'}")
        ok &= down_ok

        # -- figures, last
        bu, ru, bf = best["baseline upload"], best["relay upload"], best["baseline upload + fsync"]
        bd, rd = best["baseline download"], best["relay download"]
        up_ratio, down_ratio = ru.rate / bu.rate, rd.rate / bd.rate
        client_peak = max(ru.client_hwm, rd.client_hwm)
        relay_peak = max(ru.server_hwm, rd.server_hwm, hwm(relay.pid))
        print(f"RESULT size {_fmt(size)}, best of {args.repeat} round(s), whole run {time.perf_counter() - t0:.1f} s:")
        for p in best.values():
            print(p.line())
        print(f"upload:   relay {ru.rate:7.1f} MiB/s vs baseline {bu.rate:7.1f} MiB/s = {up_ratio:6.1%} "
              f"(target >= {TARGET_RATIO:.0%}) {'OK' if up_ratio >= TARGET_RATIO else 'BELOW'}")
        # The relay answers an upload once its bytes are on disk (its receipt says stored);
        # the baseline above answers with them in the page cache. The same baseline made
        # durable (an fsync before its answer) shows what that costs on this disk.
        print(f"upload:   relay {ru.rate:7.1f} MiB/s vs baseline + fsync {bf.rate:7.1f} MiB/s = "
              f"{ru.rate / bf.rate:6.1%} (the relay's bytes are durable before it answers)")
        print(f"download: relay {rd.rate:7.1f} MiB/s vs baseline {bd.rate:7.1f} MiB/s = {down_ratio:6.1%} "
              f"(target >= {TARGET_RATIO:.0%}) {'OK' if down_ratio >= TARGET_RATIO else 'BELOW'}")
        print(f"peak RSS: client {client_peak / MiB:.1f} MiB, relay {relay_peak / MiB:.1f} MiB "
              f"(limit {MEMORY_LIMIT / MiB:.0f} MiB) "
              f"{'OK' if max(client_peak, relay_peak) < MEMORY_LIMIT else 'OVER'}")
        print(f"resume: upload {'OK' if up_ok else 'FAILED'}, download {'OK' if down_ok else 'FAILED'}")
        ok &= max(client_peak, relay_peak) < MEMORY_LIMIT
        if args.strict:
            ok &= up_ratio >= TARGET_RATIO and down_ratio >= TARGET_RATIO
    finally:
        stop(relay)
        stop(base)
    return ok


@contextlib.contextmanager
def profiler(folder: Path | None, pid: int, name: str) -> Iterator[None]:
    """``py-spy record`` the relay (every thread, idle included) for the phase, as folded stacks."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.folded"
    proc = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--rate", "250", "--idle", "--threads", "--format", "raw",
         "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        print(f"  profile of the relay: {out}")


@contextlib.contextmanager
def workdir(given: Path | None, keep: bool) -> Iterator[Path]:
    if given:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    path = Path(tempfile.mkdtemp(prefix="pli-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="ciphertext size, e.g. 64M, 1G [1G]")
    ap.add_argument("--quick", action="store_true", help="CI: 32 MiB, one round")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the four timed phases; best is kept [2]")
    ap.add_argument("--chunk", type=parse_size,
                    help="override client.api.UPLOAD_CHUNK (the one-PUT size, and the fallback PATCH size)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a ratio is under 80 %%")
    ap.add_argument("--profile", type=Path, help="py-spy the relay during its uploads, folded stacks into this folder")
    ap.add_argument("--workdir", type=Path, help="keep files here (default: a temporary folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--serve-baseline", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return 0
    if args.quick:
        args.size, args.repeat = 32 * MiB, 1
    if args.size < 3 * (args.chunk or api.UPLOAD_CHUNK):
        ap.error("--size must hold at least three upload pieces (e.g. 16M)")
    t0 = time.perf_counter()
    try:
        with workdir(args.workdir, args.keep) as work:
            ok = asyncio.run(run(args, work, t0))
    except (BenchError, api.RelayProblem, api.RelayUnreachable) as e:
        print(f"FAILED: {e}")
        return 1
    if not ok:
        print("FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
