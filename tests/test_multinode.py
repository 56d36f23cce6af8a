"""Several relay nodes on one PostgreSQL (issue 7): one log, every node answers.

Two (then three) real relay processes (``python -m relay serve --database DSN``) on
different ports share one PostgreSQL database and one data folder (``--data``), as nodes
behind a load balancer share a mounted volume: the blob folder, and the log key
``DATA/log.key`` (created by the first node to start; every node signs with it, and the
log's origin is stored in the database once). A variant keeps the blobs in PostgreSQL
(``blob_store = "postgresql"``): each node has a folder of its own, holding only a copy
of the first node's log key. Submissions go to both nodes at once; then:

- the log is one sequence: leaf indices unique and contiguous, both nodes serve the same
  leaves, and every receipt verifies against its checkpoint;
- a size is signed once: every checkpoint of a given size is the same note, on every node,
  and all of them are consistent (consistency proofs) with each node's latest;
- a node killed (SIGKILL) in the middle of a burst loses nothing it receipted, leaves no
  gap, and the other node carries on (the dead node's batch transaction rolled back with
  its connection, and the advisory lock went with it);
- a recipient waiting on one node (``GET /v1/inbox?wait=N``) is woken within a second by
  a submission on the other (PostgreSQL LISTEN/NOTIFY).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from conftest import DERM, GP, PRACTITIONERS, make_envelope, signed
from yarl import URL

from client.api import RelayClient
from protocol import merkle
from protocol.keys import DeviceKeys
from protocol.logentry import LogEntry
from protocol.note import Checkpoint, TlogProof, Verifier, open_checkpoint
from relay.cli import new_invitation_code
from relay.routes import ENVELOPE_TYPE
from relay.storage import Practitioner, Storage

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX"),
]

_ENV = {
    # One device sends the whole burst: its rate limit out of the way.
    "PLI_RELAY_RATE_LIMIT": "100000", "PLI_RELAY_RATE_BURST": "100000",
    "PLI_RELAY_PURGE_INTERVAL": "3600", "PLI_RELAY_LOG_FORMAT": "json",
}


@dataclass
class Node:
    proc: asyncio.subprocess.Process
    url: str
    stderr: Path

    def u(self, path: str) -> URL:
        return URL(self.url + path)


@dataclass
class Cluster:
    dsn: str
    data: Path
    tmp: Path
    session: aiohttp.ClientSession
    nodes: list[Node] = field(default_factory=list)
    #: "fs": one shared data folder (blobs and log key); "postgresql": blobs in the database,
    #: a data folder per node holding a copy of the first node's log key, and nothing else shared
    blob_store: str = "fs"

    async def start(self) -> Node:
        n = len(self.nodes)
        stderr = self.tmp / f"node{n}.log"
        data = self.data
        if self.blob_store != "fs":
            data = self.tmp / f"node{n}-data"
            if n:
                data.mkdir()
                shutil.copy2(self.tmp / "node0-data" / "log.key", data / "log.key")
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "serve", "--data", str(data), "--database", self.dsn,
                "--listen", "127.0.0.1:0", stdout=asyncio.subprocess.PIPE, stderr=err,
                env={**os.environ, **_ENV, "PLI_RELAY_BLOB_STORE": self.blob_store},
            )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
        except TimeoutError:
            proc.kill()
            raise
        assert line.startswith(b"http://"), (line, stderr.read_text(errors="replace")[-2000:])
        node = Node(proc, line.decode().strip(), stderr)
        self.nodes.append(node)
        return node

    async def enroll(self, node: Node, rpps: str) -> DeviceKeys:
        keys = DeviceKeys.generate(now=int(time.time()))
        code = new_invitation_code()
        name, profession, specialty = PRACTITIONERS[rpps]
        storage = await Storage.open(self.dsn)
        try:
            now = int(time.time())
            await storage.create_invitation(Practitioner(rpps, name, profession, specialty), code, now=now,
                                            expires=now + 600)
        finally:
            await storage.close()
        async with RelayClient(node.url) as client:
            await client.enroll(code, keys.public().to_record())
        return keys

    async def submit(self, node: Node, sender: DeviceKeys, to: list[bytes]) -> tuple[bytes, dict[str, Any]]:
        ct = os.urandom(1500)
        eid, prefix = make_envelope(sender, to, ct, now=int(time.time()))
        r = await signed(self.session, sender, "PUT", node.u(f"/v1/envelopes/{eid.hex()}"), prefix + ct,
                         content_type=ENVELOPE_TYPE)
        assert r.status == 201, r.body[:300]
        return eid, r.json()["receipt"]

    async def get(self, node: Node, path: str) -> bytes:
        async with self.session.get(node.u(path)) as resp:
            assert resp.status == 200, (path, await resp.text())
            return await resp.read()


@pytest_asyncio.fixture
async def cluster(request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with aiohttp.ClientSession() as session:
        c = Cluster(dsn=pg_dsn, data=tmp_path / "shared", tmp=tmp_path, session=session,
                    blob_store=getattr(request, "param", "fs"))
        try:
            yield c
        finally:
            for node in c.nodes:
                if node.proc.returncode is None:
                    node.proc.send_signal(signal.SIGTERM)
            for node in c.nodes:
                try:
                    await asyncio.wait_for(node.proc.wait(), 20)
                except TimeoutError:
                    node.proc.kill()
                    await node.proc.wait()


@dataclass
class Auditor:
    verifier: Verifier
    origin: str

    def open(self, text: str | bytes) -> Checkpoint:
        return open_checkpoint(text, self.verifier, origin=self.origin)

    def check(self, receipt: dict[str, Any]) -> tuple[int, bytes, Checkpoint, str]:
        leaf = base64.b64decode(receipt["leaf"], validate=True)
        LogEntry.from_bytes(leaf)
        proof = TlogProof.from_text(receipt["proof"])
        assert proof.index == receipt["index"]
        checkpoint = proof.verify(merkle.leaf_hash(leaf), self.verifier, origin=self.origin)
        return receipt["index"], leaf, checkpoint, proof.checkpoint


async def _auditor(c: Cluster) -> Auditor:
    vkeys = {(await c.get(n, "/log/vkey")).decode().strip() for n in c.nodes}
    assert len(vkeys) == 1, "every node signs with the one log key"
    origins = {(await c.get(n, "/checkpoint")).decode().split("\n", 1)[0] for n in c.nodes}
    assert len(origins) == 1
    return Auditor(Verifier.from_vkey(vkeys.pop()), origins.pop())


async def _check_one_log(c: Cluster, who: Auditor, receipts: list[dict[str, Any]]) -> int:
    """Every receipt verifies; the log is one gap-free sequence served alike by every node;
    a size has one signed checkpoint; every checkpoint is consistent with the latest."""
    latest = [who.open(await c.get(n, "/checkpoint")) for n in c.nodes]
    size = max(cp.size for cp in latest)
    leaves: list[list[str]] = []
    for n in c.nodes:
        got: list[str] = []
        while len(got) < size:
            doc = await c.get(n, f"/log/entries?start={len(got)}&end={size}")
            got += json.loads(doc)["entries"]
        leaves.append(got)
    assert all(x == leaves[0] for x in leaves), "the nodes serve the same leaves"
    tree = [base64.b64decode(e) for e in leaves[0]]
    assert merkle.root_from_leaf_hashes([merkle.leaf_hash(leaf) for leaf in tree]) == \
        next(cp.root_hash for cp in latest if cp.size == size)
    indices = []
    notes: dict[int, set[str]] = {}
    for r in receipts:
        index, leaf, cp, text = who.check(r)
        assert tree[index] == leaf
        indices.append(index)
        notes.setdefault(cp.size, set()).add(text)
    assert len(indices) == len(set(indices)), "a leaf index was given twice"
    assert set(indices) <= set(range(size))
    for s, texts in notes.items():
        assert len(texts) == 1, f"two different checkpoints of size {s}"
        cp = who.open(texts.pop())
        for n in c.nodes:  # consistent with the latest checkpoint, proved by every node
            doc = json.loads(await c.get(n, f"/log/consistency?first={s}&second={size}"))
            merkle.verify_consistency(s, size, [base64.b64decode(h) for h in doc["proof"]], cp.root_hash,
                                      next(x.root_hash for x in latest if x.size == size))
    return size


@pytest.mark.parametrize("cluster", ["fs", "postgresql"], indirect=True,
                         ids=["shared-folder", "blobs-in-postgresql-no-shared-folder"])
async def test_two_nodes_one_log_concurrent_submissions(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start()
    gp = await cluster.enroll(a, GP)
    derm = await cluster.enroll(b, DERM)
    who = await _auditor(cluster)
    results = await asyncio.gather(*(cluster.submit((a, b)[i % 2], gp, [derm.device_id]) for i in range(60)))
    receipts = [r for _, r in results]
    size = await _check_one_log(cluster, who, receipts)
    assert size == 2 + 60  # two enrolments, sixty submissions: nothing else, no gap
    assert sorted(r["index"] for r in receipts) == list(range(2, 62))
    # Each node lists and serves what the other stored (the blobs on the shared volume, or
    # in the database: then no node's folder holds a blob, only its copy of the log key).
    if cluster.blob_store != "fs":
        kept = sorted(p.name for p in (cluster.tmp / "node1-data").rglob("*") if p.is_file())
        assert kept == ["log.highwater", "log.key"]  # and the node's own high-water mark
    r = await signed(cluster.session, derm, "GET", b.u("/v1/inbox"))
    assert r.status == 200
    assert {e["id"] for e in r.json()["envelopes"]} == {eid.hex() for eid, _ in results}
    for eid, _ in results[:4]:
        assert (await signed(cluster.session, derm, "GET", a.u(f"/v1/envelopes/{eid.hex()}"))).status == 200
    # Acknowledgements on both nodes, and the later submissions still extend one log.
    acks = await asyncio.gather(*(
        signed(cluster.session, derm, "POST", (a, b)[i % 2].u(f"/v1/envelopes/{eid.hex()}/ack"))
        for i, (eid, _) in enumerate(results)
    ))
    assert all(x.status == 200 for x in acks)
    receipts += [x.json()["receipt"] for x in acks]
    assert await _check_one_log(cluster, who, receipts) == 2 + 120


async def test_a_node_killed_mid_burst_loses_nothing_it_receipted(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start()
    gp = await cluster.enroll(a, GP)
    derm = await cluster.enroll(b, DERM)
    who = await _auditor(cluster)
    answered: list[tuple[bytes, dict[str, Any]]] = []
    cut = []
    first_receipts = asyncio.Event()

    async def burst(node: Node, n: int) -> None:
        for _ in range(n):
            try:
                got = await cluster.submit(node, gp, [derm.device_id])
            except (aiohttp.ClientError, AssertionError):
                cut.append(node)  # cut by the kill: no answer, so no promise
                continue
            answered.append(got)
            if len(answered) >= 10:
                first_receipts.set()

    async def kill_a() -> None:
        await first_receipts.wait()
        a.proc.send_signal(signal.SIGKILL)
        await a.proc.wait()

    await asyncio.gather(*(burst(a, 40) for _ in range(4)), *(burst(b, 15) for _ in range(4)), kill_a())
    assert a.proc.returncode == -signal.SIGKILL
    assert cut, "the kill cut no request"
    cluster.nodes.remove(a)
    # The survivor carries on at once: the dead node's lock and transaction are gone.
    answered.append(await cluster.submit(b, gp, [derm.device_id]))
    c = await cluster.start()  # a replacement node, on the same database and volume
    answered.append(await cluster.submit(c, gp, [derm.device_id]))
    size = await _check_one_log(cluster, who, [r for _, r in answered])
    # Every receipted envelope is stored and downloadable, from either node.
    for eid, _ in answered:
        for node in (b, c):
            r = await signed(cluster.session, derm, "GET", node.u(f"/v1/envelopes/{eid.hex()}"))
            assert r.status == 200, (eid.hex(), r.status)
    assert size >= 2 + len(answered)


async def test_mail_submitted_on_one_node_wakes_an_inbox_waiting_on_another(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start()
    gp = await cluster.enroll(a, GP)
    derm = await cluster.enroll(b, DERM)
    waiting = asyncio.create_task(signed(cluster.session, derm, "GET", b.u("/v1/inbox?wait=30")))
    await _until_received(cluster, 1)  # the first signed request of this test
    started = time.monotonic()
    eid, _ = await cluster.submit(a, gp, [derm.device_id])
    r = await asyncio.wait_for(waiting, 10)
    woke = time.monotonic() - started
    assert r.status == 200
    assert [e["id"] for e in r.json()["envelopes"]] == [eid.hex()]
    assert woke < 1, f"the waiting inbox answered {woke:.2f} s after the submission"
    # Nothing new: the long poll ends after its wait, with the envelope still unacknowledged.
    r = await signed(cluster.session, derm, "GET", b.u("/v1/inbox?wait=1"))
    assert [e["id"] for e in r.json()["envelopes"]] == [eid.hex()]


async def _until_received(c: Cluster, nonces: int) -> None:
    """Until the nodes have authenticated ``nonces`` signed requests (the auth middleware
    stores each nonce just before the handler runs): a condition polled, not a guess."""
    storage = await Storage.open(c.dsn)
    try:
        for _ in range(1000):
            row = await storage.read_one("SELECT COUNT(*) FROM nonces")
            if row is not None and int(row[0]) >= nonces:
                return
            await asyncio.sleep(0.005)
    finally:
        await storage.close()
    pytest.fail("the inbox request never reached the node")
