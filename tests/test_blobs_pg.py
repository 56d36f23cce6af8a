"""Ciphertext in PostgreSQL (``blob_store = "postgresql"``, relay._pgblobs): what only that
store has. Its shared behaviour (uploads in pieces, resume, ranges, purge, sweep) is in
tests/test_storage.py, run on both stores; two nodes without a shared folder in
tests/test_multinode.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import test_relay
from click.testing import CliRunner
from conftest import DERM, GP, RelayFactory, make_envelope, sign_headers

from client.api import RelayClient
from relay._pgblobs import CHUNK
from relay.cli import cli
from relay.storage import Storage
from relay.storage import migrations as mig


async def _migrate_to_1(dsn: str) -> list[int]:
    storage = await Storage.open(dsn, check=False, migrations=mig.POSTGRES[:1])
    try:
        return [m.version for m in await storage.migrate(now=0)]
    finally:
        await storage.close()


async def _chunk_rows(dsn: str) -> list[tuple[object, ...]]:
    storage = await Storage.open(dsn)
    try:
        return await storage.read_all("SELECT COUNT(*) FROM blob_chunks")
    finally:
        await storage.close()


def test_the_chunk_table_migration_applies_once_on_a_version_1_database(pg_empty_dsn: str) -> None:
    assert asyncio.run(_migrate_to_1(pg_empty_dsn)) == [1]
    # An older relay's database: this relay refuses it until migrated, then migrates only 2.
    r = CliRunner().invoke(cli, ["serve", "--database", pg_empty_dsn, "--listen", "127.0.0.1:0"])
    assert "schema version 1, this relay needs 3: run `pli-relay migrate`" in r.output
    r = CliRunner().invoke(cli, ["migrate", "--database", pg_empty_dsn])
    assert r.exit_code == 0, r.output
    assert "applied migration 1" not in r.output
    assert "applied migration 2 (blob_chunks)" in r.output
    assert "applied migration 3 (inline_envelopes)" in r.output
    r = CliRunner().invoke(cli, ["migrate", "--database", pg_empty_dsn])
    assert "applied" not in r.output
    assert asyncio.run(_chunk_rows(pg_empty_dsn)) == [(0,)]


async def test_an_envelope_is_stored_in_contiguous_chunks_of_at_most_1_mib(
    relay_factory: RelayFactory, pg_dsn: str
) -> None:
    relay = await relay_factory(database=pg_dsn, blob_store="postgresql")
    assert not relay.blobs.exists() or relay.blob_files() == []
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    ct = os.urandom(3 * CHUNK + 77)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    rows = relay.query("SELECT pos, length(data) FROM blob_chunks WHERE envelope_id = ? ORDER BY pos", (eid,))
    assert [pos for pos, _ in rows] == [i * CHUNK for i in range(len(rows))]
    assert all(n <= CHUNK for _, n in rows)
    assert sum(n for _, n in rows) == len(prefix) + len(ct)
    assert relay.blob_files() == []  # nothing on disk: the database is the one thing to back up
    assert (await relay.get(derm.keys, f"/v1/envelopes/{eid.hex()}")).body == prefix + ct


async def test_a_cut_patch_keeps_what_arrived_and_the_upload_resumes(
    relay_factory: RelayFactory, pg_dsn: str, tmp_path: Path
) -> None:
    # As on the file store (tests/test_relay.py): a PATCH cut mid-way keeps the bytes that
    # reached the relay, here whole chunks committed as they filled and the one in memory
    # committed at the cut; the client resumes from there. The relay runs as `pli-relay
    # serve` does, without handler cancellation: the reset reaches the handler as such.
    relay = await relay_factory(database=pg_dsn, blob_store="postgresql", handler_cancellation=False)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    ct = os.urandom(6 * CHUNK)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix)).json()["offset"] == 0
    path = f"/v1/envelopes/{eid.hex()}?offset=0"
    headers = sign_headers(gp.keys, "PATCH", relay.u(path), ct, created=relay.clock())
    send = 2 * CHUNK + 12_345
    writer = await test_relay._start_raw(relay, "PATCH", path, "application/octet-stream", headers, ct, send)

    def stored() -> int:
        return int(relay.query("SELECT COALESCE(SUM(length(data)), 0) FROM blob_chunks WHERE envelope_id = ?",
                               (eid,))[0][0])

    deadline = time.monotonic() + 30
    while stored() < 2 * CHUNK:  # two chunks committed: the relay's own rows, polled
        assert time.monotonic() < deadline, "the relay never stored the bytes sent"
        await asyncio.sleep(0.01)
    test_relay._reset(writer)
    # A retried PUT waits for the cut request's end (the envelope's lock): it sees the bytes
    # kept, at least the two chunks, at most what was sent (a reset drops what was unread).
    held = (await relay.put(gp.keys, eid, prefix)).json()["offset"]
    assert 2 * CHUNK - len(prefix) <= held <= send
    assert relay.query("SELECT received, state FROM envelopes WHERE id = ?", (eid,)) == [(held, "uploading")]
    rows = relay.query("SELECT data FROM blob_chunks WHERE envelope_id = ? ORDER BY pos", (eid,))
    assert b"".join(bytes(r[0]) for r in rows) == prefix + ct[:held]
    file = tmp_path / "ct.age"
    file.write_bytes(ct)
    offsets: list[int] = []
    async with RelayClient(relay.url, gp.keys) as client:
        state = await client.upload(eid, prefix, file, progress=lambda done, _total: offsets.append(done))
    assert offsets[0] == held
    assert (state["complete"], state["offset"]) == (True, len(ct))
    assert (await relay.get(derm.keys, f"/v1/envelopes/{eid.hex()}")).body == prefix + ct
