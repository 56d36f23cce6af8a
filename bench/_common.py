"""Small helpers shared by the benchmarks: sizes, medians, peak memory, the repo on sys.path."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``512K``, ``1GiB`` or a plain byte count."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    number = s[: len(s) - len(unit)]
    value = int(float(number) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # noqa: PLC0415 - fallback off Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), or of its thread
    ``tid`` alone, from /proc."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


# A benchmark's load generator is a few devices sending as fast as they can: the per-device
# abuse limits (rate, uploads in flight) would measure themselves, not the relay.
UNLIMITED = {"PLI_RELAY_RATE_LIMIT": "1000000", "PLI_RELAY_RATE_BURST": "1000000",
             "PLI_RELAY_MAX_UPLOADS_PER_DEVICE": "100000"}


class BenchError(Exception):
    """Something a benchmark checks went wrong: the run fails (non-zero exit)."""


def start_server(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start a server that prints its URL as its first stdout line."""
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, **UNLIMITED, **(env or {})})
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise BenchError(f"{argv[:4]} did not start: {log.read_text()[-2000:]}")
    return proc, url


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
