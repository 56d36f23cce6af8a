"""Ciphertext in PostgreSQL (``blob_store = "postgresql"``, relay._pgblobs): what only that
store has. Its shared behaviour (uploads in pieces, resume, ranges, purge, sweep) is in
tests/test_storage.py, run on both stores; two nodes without a shared folder in
tests/test_multinode.py.
"""

from __future__ import annotations

import asyncio
import os

from click.testing import CliRunner
from conftest import DERM, GP, RelayFactory, make_envelope

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
