"""Prometheus metrics of one relay (``GET /metrics``), in a registry of its own.

Each application has its own :class:`~prometheus_client.CollectorRegistry` (never the
process-wide one), so several relays in one process (tests, benchmarks) never clash.

Two kinds of figures:

- **this process's traffic**, counted by ``relay.app.problem_middleware`` for every
  answer: requests by route and status, latency histograms by route, body bytes in and
  out by route, refusals by problem code, rate-limit refusals by limit, uploads being
  received, open connections and connections refused at ``max_connections``;
- **facts of the log**, read from the database when scraped (so every node sharing a
  database reports the same figures): its size, its entries by type (``submitted`` are
  the submissions, ``delivered`` the acknowledgements), and the size of each group-commit
  batch (the growth of each new signed checkpoint) since this process started.

Route names, codes and types are the only labels: never an id, a path or an address.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protocol.logentry import EntryType

__all__ = ["CONTENT_TYPE", "METRICS", "Metrics"]

#: the Prometheus text format every Prometheus version reads
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_SCAN = 100_000  # checkpoints read per scrape at most (a backlog is read over several)


class _Connections(Protocol):
    """What a ``relay.limits.ConnectionGate`` knows (duck-typed: only its counters are read)."""

    open: int
    refused: int


@dataclass
class _LogFacts:
    size: int = 0
    checkpoint_seen: int | None = None  # the largest checkpoint size whose batch was observed
    leaves_seen: int = 0  # leaves [0, leaves_seen) are counted in by_type
    by_type: dict[str, int] | None = None


class Metrics:
    """The relay's metrics, and the state ``GET /readyz`` reports besides the database's."""

    def __init__(self, *, uploads_in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pli_relay_requests", "Requests answered, by route name and status",
                                ["route", "status"], registry=r)
        self.duration = Histogram("pli_relay_request_duration_seconds",
                                  "Time from a request's headers to its answer (a download: to its last byte), "
                                  "by route name", ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("pli_relay_request_body_bytes", "Request body bytes received, by route name",
                                ["route"], registry=r)
        self.bytes_out = Counter("pli_relay_response_body_bytes", "Response body bytes sent, by route name",
                                 ["route"], registry=r)
        self.rejections = Counter("pli_relay_rejections", "Refusals (problem+json answers), by problem code",
                                  ["code"], registry=r)
        self.rate_limited = Counter("pli_relay_rate_limited", "429 rate_limited refusals, by limit: device "
                                    "(request rate, uploads per device) or enrolment (wrong codes per address)",
                                    ["limit"], registry=r)
        self.batches = Histogram("pli_relay_log_batch_size", "Entries per group-commit batch (one transaction, "
                                 "one signed checkpoint), batches since this process started",
                                 buckets=_BATCH_BUCKETS, registry=r)
        self._uploads = uploads_in_flight
        #: (route, status): that answer's series of requests, duration, bytes in, bytes out
        self._series: dict[tuple[str, int], tuple[Any, Any, Any, Any]] = {}
        self._connections: _Connections | None = None
        self._log = _LogFacts()
        # One refresh at a time: two overlapping scrapes (an HA Prometheus pair) would
        # otherwise both observe the same new batches.
        self._refreshing = asyncio.Lock()
        self.readiness_probes = Counter("pli_relay_readiness_probes", "Readiness probes run (a database write "
                                        "and a blob store write); GET /readyz runs at most one a second",
                                        registry=r)
        #: the last readiness probe: (its time.monotonic(), its checks) (``relay.ops.readyz``)
        self.ready_checks: tuple[float, dict[str, str]] | None = None
        #: held while a readiness probe runs, so concurrent ``/readyz`` wait for its answer
        self.ready_lock = asyncio.Lock()
        #: the log failed an integrity check (its message); ``/readyz`` answers 503 for good
        self.log_alarm: str | None = None
        #: the relay is stopping (SIGTERM): ``/readyz`` answers 503 while requests in flight finish
        self.stopping = False
        r.register(_Live(self))

    def watch_connections(self, gate: _Connections) -> None:
        """Report the listening socket's open and refused connections (``relay.limits.listen``)."""
        self._connections = gate

    def observe(
        self, *, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int, problem: str | None
    ) -> None:
        """One answered request (called by ``problem_middleware``)."""
        series = self._series.get((route, status))
        if series is None:  # a few routes and statuses: each pair's series looked up once
            series = self._series[(route, status)] = (
                self.requests.labels(route, str(status)), self.duration.labels(route),
                self.bytes_in.labels(route), self.bytes_out.labels(route))
        requests, duration, counted_in, counted_out = series
        requests.inc()
        duration.observe(seconds)
        counted_in.inc(bytes_in)
        counted_out.inc(bytes_out)
        if problem is not None:
            self.rejections.labels(problem).inc()
            if problem == "rate_limited":
                self.rate_limited.labels("enrolment" if route == "enroll" else "device").inc()

    def start_log(self, size: int) -> None:
        """The log's size when this process opened it: batches are observed from there."""
        self._log.size = size
        self._log.checkpoint_seen = size

    async def refresh_log(self, read_all: Callable[[str, tuple[Any, ...]], Awaitable[list[Any]]], size: int) -> None:
        """Bring the log's figures up to ``size`` from the database (before a scrape).

        ``read_all`` is ``Storage.read_all``: new checkpoints give the batch sizes, new
        leaves their types; both only move forward, so each scrape reads only what is new.
        """
        async with self._refreshing:
            await self._refresh_log(read_all, size)

    async def _refresh_log(self, read_all: Callable[[str, tuple[Any, ...]], Awaitable[list[Any]]],
                           size: int) -> None:
        facts = self._log
        if facts.checkpoint_seen is None:
            facts.checkpoint_seen = size
        rows = await read_all(
            "SELECT size FROM log_checkpoints WHERE size > ? ORDER BY size LIMIT ?", (facts.checkpoint_seen, _SCAN)
        )
        previous = facts.checkpoint_seen
        for (s,) in rows:
            self.batches.observe(int(s) - previous)
            previous = int(s)
        facts.checkpoint_seen = previous
        counts = facts.by_type if facts.by_type is not None else dict.fromkeys(_ENTRY_TYPES.values(), 0)
        rows = await read_all(
            "SELECT type, COUNT(*) FROM log_leaves WHERE idx >= ? AND idx < ? GROUP BY type",
            (facts.leaves_seen, size),
        )
        for kind, n in rows:
            name = _ENTRY_TYPES.get(int(kind), "unknown")
            counts[name] = counts.get(name, 0) + int(n)
        facts.by_type = counts
        facts.leaves_seen = max(facts.leaves_seen, size)
        facts.size = size

    def render(self) -> bytes:
        return generate_latest(self.registry)


_ENTRY_TYPES = {int(t): t.name.lower() for t in EntryType}


class _Live(Collector):
    """Figures read when scraped: gauges over the relay's state, counters kept elsewhere."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        return []  # no fixed description: which figures exist depends on the relay's state

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield GaugeMetricFamily("pli_relay_uploads_in_flight", "Upload requests (PUT, PATCH) being received",
                                value=m._uploads())  # noqa: SLF001 - same module
        facts = m._log  # noqa: SLF001 - same module
        yield GaugeMetricFamily("pli_relay_log_size", "Entries in the transparency log (its latest signed "
                                "checkpoint's tree size)", value=facts.size)
        entries = CounterMetricFamily("pli_relay_log_entries", "Log entries by type: submitted (submissions), "
                                      "delivered (acknowledgements), read, answered, device_enrolled, device_revoked",
                                      labels=["type"])
        for name, n in sorted((facts.by_type or {}).items()):
            entries.add_metric([name], n)
        yield entries
        yield GaugeMetricFamily("pli_relay_log_integrity_ok", "1 while the log is sound; 0 once it failed an "
                                "integrity check (an operator must look: see deploy/README.md)",
                                value=0 if m.log_alarm else 1)
        gate = m._connections  # noqa: SLF001 - same module
        if gate is not None:
            yield GaugeMetricFamily("pli_relay_connections_open", "Client connections open", value=gate.open)
            yield CounterMetricFamily("pli_relay_connections_refused", "Connections answered 503 at once because "
                                      "max_connections were open", value=gate.refused)


METRICS = web.AppKey("metrics", Metrics)
