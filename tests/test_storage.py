"""One storage test-suite, run on both engines: what the routes and the log rely on.

Each test gets a ``storage`` opened on SQLite (a file in ``tmp_path``) and on PostgreSQL
(a new database on the throwaway cluster of tests/_pg.py, skipped with the reason when
PostgreSQL is not installed). Then schema migrations (refused twice, out of order, or
unknown), new-mail notifications (across two storages on one PostgreSQL: two nodes), and
some of the relay's end-to-end flows (tests/test_relay.py) run again on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import pytest_asyncio
import structlog
import test_relay
from click.testing import CliRunner
from conftest import DERM, GP, Relay, RelayFactory, assert_problem, make_envelope

from protocol import merkle, note
from protocol.keys import DeviceKeys
from protocol.logentry import EntryType, LogEntry
from relay._pgblobs import CHUNK
from relay.app import BLOBS
from relay.blobs import BlobStore, open_blobs
from relay.cli import cli
from relay.config import RelayConfig
from relay.errors import RelayError
from relay.log import TransparencyLog
from relay.routes import purge_once
from relay.storage import Migration, Practitioner, SchemaError, Storage, open_storage
from relay.storage import migrations as mig

ENGINES = ["sqlite", "postgresql"]
NOW = 1_750_000_000


@pytest.fixture(params=ENGINES)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a storage lives: a SQLite file, or a PostgreSQL database at the latest schema."""
    if request.param == "sqlite":
        return tmp_path / "relay.sqlite3"
    return str(request.getfixturevalue("pg_dsn"))


@pytest.fixture(params=ENGINES)
def empty_location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a storage may live: no database yet (SQLite), an empty one (PostgreSQL)."""
    if request.param == "sqlite":
        return tmp_path / "relay.sqlite3"
    return str(request.getfixturevalue("pg_empty_dsn"))


@pytest_asyncio.fixture
async def storage(location: Path | str) -> AsyncIterator[Storage]:
    s = await Storage.open(location)
    yield s
    await s.close()


def _keys() -> DeviceKeys:
    return DeviceKeys.generate(now=NOW)


async def _enrolled(storage: Storage, rpps: str = GP) -> DeviceKeys:
    keys = _keys()
    code = f"CODE-{os.urandom(4).hex()}"
    await storage.create_invitation(Practitioner(rpps, "Dr Test", "médecin", ""), code, now=NOW, expires=NOW + 60)
    pub = keys.public()
    await storage.enroll(code, device_id=pub.device_id, sign_key=pub.sign_key, cert=pub.cert, sig=pub.sig, now=NOW)
    return keys


async def _envelope(storage: Storage, sender: bytes, to: list[bytes], *, size: int = 100, received: int = 100,
                    expires: int = NOW + 3600) -> bytes:
    eid = os.urandom(16)
    await storage.create_envelope(envelope_id=eid, sender=sender, prefix=b"prefix" + eid, envelope_hash=os.urandom(32),
                                  size=size, created=NOW, expires=expires, to=to, received=received, now=NOW)
    return eid


# -- enrolment, devices, nonces ---------------------------------------------------------------


async def test_enrolment_uses_an_invitation_once(storage: Storage) -> None:
    p = Practitioner(GP, "Dr Claire Martin", "médecin", "SM54")
    await storage.create_invitation(p, "ABCDE-FGHJK", now=NOW, expires=NOW + 60)
    keys = _keys()
    pub = keys.public()
    got = await storage.enroll("abcde fghjk", device_id=pub.device_id, sign_key=pub.sign_key, cert=pub.cert,
                               sig=pub.sig, now=NOW + 1)
    assert got == p
    assert await storage.practitioner(GP) == p
    other = _keys().public()
    with pytest.raises(RelayError) as used:
        await storage.enroll("ABCDE-FGHJK", device_id=other.device_id, sign_key=other.sign_key, cert=other.cert,
                             sig=other.sig, now=NOW + 2)
    assert used.value.code == "invalid_invitation"
    await storage.create_invitation(p, "EXPIR-EDXXX", now=NOW, expires=NOW + 60)
    with pytest.raises(RelayError) as expired:
        await storage.enroll("EXPIR-EDXXX", device_id=other.device_id, sign_key=other.sign_key, cert=other.cert,
                             sig=other.sig, now=NOW + 60)
    assert expired.value.code == "invalid_invitation"
    await storage.create_invitation(p, "AGAIN-XXXXX", now=NOW, expires=NOW + 60)
    with pytest.raises(RelayError) as exists:
        await storage.enroll("AGAIN-XXXXX", device_id=pub.device_id, sign_key=pub.sign_key, cert=pub.cert,
                             sig=pub.sig, now=NOW + 3)
    assert exists.value.code == "device_exists"
    # The refused enrolment left the invitation unused (one transaction).
    assert await storage.read_all("SELECT used_at FROM invitations WHERE used_at IS NULL") == [(None,), (None,)]


async def test_devices_listed_and_revoked_once(storage: Storage) -> None:
    a = await _enrolled(storage, GP)
    b = await _enrolled(storage, GP)
    c = await _enrolled(storage, DERM)
    assert {d.device_id for d in await storage.devices_of(GP)} == {a.device_id, b.device_id}
    assert await storage.revoke_device(a.device_id, now=NOW + 5)
    assert not await storage.revoke_device(a.device_id, now=NOW + 6)
    assert [d.device_id for d in await storage.devices_of(GP)] == [b.device_id]
    assert len(await storage.devices_of(GP, include_revoked=True)) == 2
    d = await storage.device(a.device_id)
    assert d is not None
    assert d.revoked == NOW + 5
    assert d.sign_key == a.public().sign_key
    assert {x.device_id for x in await storage.all_devices()} == {a.device_id, b.device_id, c.device_id}
    assert await storage.device(os.urandom(16)) is None


async def test_a_nonce_is_accepted_once_until_purged(storage: Storage) -> None:
    device = os.urandom(16)
    assert await storage.use_nonce(device, "n1", expires=NOW + 10)
    assert not await storage.use_nonce(device, "n1", expires=NOW + 10)  # a replay
    assert await storage.use_nonce(os.urandom(16), "n1", expires=NOW + 10)  # another device's
    assert await storage.purge_nonces(now=NOW + 9) == 0
    assert await storage.purge_nonces(now=NOW + 10) == 2
    assert await storage.use_nonce(device, "n1", expires=NOW + 20)


async def test_a_failed_write_returning_leaves_no_transaction_open(storage: Storage) -> None:
    # One trip on SQLite (BEGIN, the statement, COMMIT): a failing statement is rolled back
    # there, and the next write goes through.
    with pytest.raises(Exception, match=r"(?i)null"):
        await storage.write_returning("INSERT INTO nonces (device_id, nonce, expires) VALUES (?, ?, NULL)"
                                      " RETURNING nonce", [os.urandom(16), "n"])
    assert await storage.write_returning("INSERT INTO nonces (device_id, nonce, expires) VALUES (?, ?, ?)"
                                         " RETURNING nonce", [os.urandom(16), "n", NOW]) == [("n",)]
    assert await storage.use_nonce(os.urandom(16), "m", expires=NOW)


async def test_nonces_spent_at_once_are_written_together_and_each_is_fresh_once(storage: Storage) -> None:
    # Requests that arrive together have their nonces written in one statement; a nonce
    # twice in one group is fresh for the first request only, whatever the order.
    a, b = os.urandom(16), os.urandom(16)
    assert await storage.use_nonce(a, "old", expires=NOW + 10)
    got = await asyncio.gather(*(storage.use_nonce(d, n, expires=NOW + 10) for d, n in (
        (a, "x"), (b, "x"), (a, "x"), (a, "old"), (b, "y"), (b, "y"))))
    assert got == [True, True, False, False, True, False]
    rows = await storage.read_all("SELECT COUNT(*) FROM nonces")
    assert rows == [(4,)]


# -- envelopes ----------------------------------------------------------------------------------


async def test_envelope_lifecycle_inbox_acknowledge_purge(storage: Storage) -> None:
    gp = await _enrolled(storage, GP)
    r1, r2 = os.urandom(16), os.urandom(16)
    eid = await _envelope(storage, gp.device_id, [r1, r2], size=300, received=100)
    row = await storage.envelope(eid)
    assert row is not None
    assert (row.state, row.received, row.size, row.received_at) == ("uploading", 100, 300, None)
    assert await storage.inbox(r1, now=NOW) == []  # not complete yet
    await storage.set_received(eid, 300, held=100, complete=True, now=NOW + 1)
    row = await storage.envelope(eid)
    assert row is not None
    assert (row.state, row.received, row.received_at) == ("stored", 300, NOW + 1)
    inbox = await storage.inbox(r1, now=NOW + 2)
    assert [(r.id, rpps) for r, rpps in inbox] == [(eid, GP)]
    assert await storage.recipients(eid) == {r1: None, r2: None}
    assert await storage.acknowledge(eid, r1, now=NOW + 3) is False
    assert await storage.acknowledge(eid, r1, now=NOW + 4) is None  # again: nothing changes
    assert await storage.inbox(r1, now=NOW + 4) == []
    assert await storage.purgeable(now=NOW + 4, ack_retention=0, stale_upload=86400) == []
    assert await storage.acknowledge(eid, r2, now=NOW + 5) is True
    assert await storage.recipients(eid) == {r1: NOW + 3, r2: NOW + 5}
    assert await storage.purgeable(now=NOW + 5, ack_retention=10, stale_upload=86400) == []
    assert await storage.purgeable(now=NOW + 15, ack_retention=10, stale_upload=86400) == [eid]
    await storage.mark_deleted([eid])
    assert await storage.envelope_ids("deleted") == {eid}
    assert await storage.purgeable(now=NOW + 15, ack_retention=10, stale_upload=86400) == []


async def test_inbox_hides_expired_envelopes_and_purge_finds_them(storage: Storage) -> None:
    gp = await _enrolled(storage, GP)
    r = os.urandom(16)
    old = await _envelope(storage, gp.device_id, [r], expires=NOW + 10)
    new = await _envelope(storage, gp.device_id, [r], expires=NOW + 1000)
    assert [row.id for row, _ in await storage.inbox(r, now=NOW)] == sorted([old, new])  # same time: by id
    assert [row.id for row, _ in await storage.inbox(r, now=NOW + 10)] == [new]
    assert await storage.purgeable(now=NOW + 10, ack_retention=0, stale_upload=86400) == [old]
    assert await storage.envelope_ids("stored") == {old, new}


async def test_abandoned_or_discarded_uploads(storage: Storage) -> None:
    gp = await _enrolled(storage, GP)
    eid = await _envelope(storage, gp.device_id, [os.urandom(16)], size=100, received=10)
    assert await storage.purgeable(now=NOW + 99, ack_retention=0, stale_upload=100) == []
    assert await storage.purgeable(now=NOW + 100, ack_retention=0, stale_upload=100) == [eid]
    await storage.discard_upload(eid)
    assert await storage.envelope(eid) is None
    assert await storage.recipients(eid) == {}


async def test_quota_counts_unacknowledged_bytes(storage: Storage) -> None:
    gp = await _enrolled(storage, GP)
    r = os.urandom(16)
    assert await storage.unacknowledged_bytes(gp.device_id, now=NOW) == 0
    a = await _envelope(storage, gp.device_id, [r], size=1000, received=1000)
    await _envelope(storage, gp.device_id, [r], size=3 << 30, received=5)  # in progress: counted in full
    await _envelope(storage, gp.device_id, [r], size=7, received=7, expires=NOW + 1)
    assert await storage.unacknowledged_bytes(gp.device_id, now=NOW) == 1000 + (3 << 30) + 7
    assert await storage.unacknowledged_bytes(gp.device_id, now=NOW + 1) == 1000 + (3 << 30)
    assert await storage.acknowledge(a, r, now=NOW + 2) is True
    assert await storage.unacknowledged_bytes(gp.device_id, now=NOW + 2) == 3 << 30


async def test_a_transaction_that_fails_leaves_nothing(storage: Storage) -> None:
    gp = await _enrolled(storage, GP)

    class Boom(Exception):
        pass

    async def fail() -> None:
        async with storage.transaction() as tx:
            await storage.create_envelope(envelope_id=b"x" * 16, sender=gp.device_id, prefix=b"p",
                                          envelope_hash=bytes(32), size=1, created=NOW, expires=NOW + 9,
                                          to=[b"r" * 16], received=1, now=NOW, tx=tx)
            raise Boom

    with pytest.raises(Boom):
        await fail()
    assert await storage.envelope(b"x" * 16) is None
    assert await storage.read_all("SELECT COUNT(*) FROM deliveries") == [(0,)]


async def test_meta_is_set_once_then_kept(storage: Storage) -> None:
    assert await storage.meta("k") is None
    assert await storage.init_meta("k", "first") == "first"
    assert await storage.init_meta("k", "second") == "first"
    await storage.set_meta("k", "third")
    assert await storage.meta("k") == "third"


# -- the log ------------------------------------------------------------------------------------


def _delivered(i: int) -> Callable[[int], LogEntry]:
    return lambda now: LogEntry(type=EntryType.DELIVERED, time=now, envelope_id=i.to_bytes(16, "big"),
                                envelope_hash=bytes(32), device_id=bytes(16))


async def test_log_appends_proves_and_survives_a_restart(location: Path | str) -> None:
    key = nacl.signing.SigningKey(bytes(range(32)))
    clock = [NOW]

    async def opened() -> tuple[Storage, TransparencyLog]:
        s = await Storage.open(location)
        tlog = TransparencyLog(s, key, origin="example.org/pli-test", clock=lambda: clock[0], window=0.002)
        await tlog.open()
        return s, tlog

    storage, tlog = await opened()
    try:
        assert await tlog.checkpoint() == (0, (await tlog.checkpoint(0))[1])
        got = await asyncio.gather(*(tlog.append(_delivered(i), envelope_id=i.to_bytes(16, "big")) for i in range(40)))
        assert sorted(a.index for a in got) == list(range(40))
        assert tlog.batches < 40  # grouped
        first_size, first_note = await tlog.checkpoint()
    finally:
        await tlog.close()
        await storage.close()
    storage, tlog = await opened()
    try:
        clock[0] += 5
        more = [await tlog.append(_delivered(100 + i)) for i in range(5)]
        assert [a.index for a in more] == list(range(40, 45))
        size, text = await tlog.checkpoint()
        assert size == 45
        cp = note.open_checkpoint(text, tlog.verifier, origin=tlog.origin)
        leaves = await tlog.entries(0, 45)
        assert cp.root_hash == merkle.root_from_leaf_hashes([merkle.leaf_hash(leaf) for leaf in leaves])
        for a in [*got, *more]:
            assert leaves[a.index] == a.leaf
            proof = await tlog.inclusion(a.index, 45)
            merkle.verify_inclusion(merkle.leaf_hash(a.leaf), a.index, 45, proof, cp.root_hash)
        old = note.open_checkpoint(first_note, tlog.verifier, origin=tlog.origin)
        merkle.verify_consistency(first_size, 45, await tlog.consistency(first_size, 45), old.root_hash, cp.root_hash)
        assert [i for i, _ in await tlog.leaves_of((3).to_bytes(16, "big"))] == [got[3].index]
    finally:
        await tlog.close()
        await storage.close()


# -- schema migrations ----------------------------------------------------------------------------


def _with_extra(base: tuple[Migration, ...], *extra: Migration) -> tuple[Migration, ...]:
    return (*base, *extra)




def _extra(base: tuple[Migration, ...], n: int) -> Migration:
    """The ``n``-th migration after the engine's own (1: the next one)."""
    return Migration(len(base) + n, f"extra {n}", f"CREATE TABLE extra_{n} (x INTEGER)")


def _engine_migrations(location: Path | str) -> tuple[Migration, ...]:
    return mig.SQLITE if isinstance(location, Path) else mig.POSTGRES


async def test_migrate_applies_pending_ones_in_order_once(empty_location: Path | str) -> None:
    base = _engine_migrations(empty_location)
    latest = len(base) + 2
    if isinstance(empty_location, str):
        with pytest.raises(SchemaError, match="run `pli-relay migrate`"):
            await Storage.open(empty_location)  # PostgreSQL is never set up implicitly
    storage = await Storage.open(empty_location, check=False,
                                 migrations=_with_extra(base, _extra(base, 1), _extra(base, 2)))
    try:
        assert [m.version for m in await storage.migrate(now=NOW)] == list(range(1, latest + 1))
        assert await storage.migrate(now=NOW) == []
        assert await storage.schema_version() == latest
        with pytest.raises(SchemaError, match="applied already"):
            await storage.apply_migration(_extra(base, 1), now=NOW)
        with pytest.raises(SchemaError, match="out of order"):
            await storage.apply_migration(_extra(base, 4), now=NOW)
        assert await storage.schema_version() == latest
    finally:
        await storage.close()
    # A relay that knows only its own migrations refuses this database: a newer relay migrated it.
    with pytest.raises(SchemaError, match="does not know"):
        await Storage.open(empty_location)


async def test_a_relay_refuses_a_schema_not_migrated_yet(empty_location: Path | str) -> None:
    base = _engine_migrations(empty_location)
    storage = await Storage.open(empty_location, check=False)
    await storage.migrate(now=NOW)
    await storage.close()
    newer = _with_extra(base, _extra(base, 1))
    n = len(base)
    with pytest.raises(SchemaError, match=f"schema version {n}, this relay needs {n + 1}: run `pli-relay migrate`"):
        await Storage.open(empty_location, migrations=newer)
    storage = await Storage.open(empty_location, check=False, migrations=newer)
    assert [m.version for m in await storage.migrate(now=NOW)] == [n + 1]
    await storage.close()
    storage = await Storage.open(empty_location, migrations=newer)
    await storage.close()


async def test_a_migration_out_of_order_is_refused(empty_location: Path | str) -> None:
    base = _engine_migrations(empty_location)
    skipping = _with_extra(base[:1], *base[2:], _extra(base, 2)) if len(base) > 1 else (*base, _extra(base, 2))
    storage = await Storage.open(empty_location, check=False, migrations=skipping)
    try:
        with pytest.raises(SchemaError, match="out of order"):
            await storage.apply_migration(_extra(base, 2), now=NOW)
        with pytest.raises(SchemaError, match="out of order"):
            await storage.migrate(now=NOW)  # the list itself skips 2: refused before anything
        assert await storage.schema_version() == 0
    finally:
        await storage.close()


async def test_a_sqlite_database_from_before_schema_migrations_counts_as_version_1(tmp_path: Path) -> None:
    path = tmp_path / "relay.sqlite3"
    storage = await Storage.open(path, migrations=mig.SQLITE[:1])
    await storage.close()
    import sqlite3  # noqa: PLC0415

    db = sqlite3.connect(path)
    db.execute("DROP TABLE schema_migrations")
    db.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')")
    db.commit()
    db.close()
    storage = await Storage.open(path, migrations=mig.SQLITE[:1])
    assert await storage.schema_version() == 1
    await storage.close()
    with pytest.raises(SchemaError, match="at schema version 1, this relay needs 2"):
        await Storage.open(path)
    storage = await Storage.open(path, check=False)
    assert [m.version for m in await storage.migrate(now=NOW)] == [2]
    assert await storage.read_all("SELECT version FROM schema_migrations ORDER BY version") == [(1,), (2,)]
    await storage.close()
    storage = await Storage.open(path)  # up to date: opens
    await storage.close()


def test_pli_relay_migrate_command(tmp_path: Path, pg_empty_dsn: str) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["migrate", "--data", str(tmp_path), "--database", pg_empty_dsn])
    assert r.exit_code == 0, r.output
    assert "applied migration 1 (initial)" in r.output
    assert "applied migration 2 (blob_chunks)" in r.output
    assert "applied migration 3 (inline_envelopes)" in r.output
    assert "postgresql schema at version 3: up to date" in r.output
    r = runner.invoke(cli, ["migrate", "--data", str(tmp_path), "--database", pg_empty_dsn])
    assert r.exit_code == 0, r.output
    assert "applied" not in r.output
    r = runner.invoke(cli, ["devices", "--data", str(tmp_path)], env={"PLI_RELAY_DATABASE": pg_empty_dsn})
    assert r.exit_code == 0, r.output
    assert "No device enrolled yet" in r.output


def test_serve_refuses_an_unmigrated_database_and_says_what_to_do(tmp_path: Path, pg_empty_dsn: str) -> None:
    # `serve` configures structlog for the whole process (caching loggers on first use):
    # put it back, or later tests' relays log into this test's captured output.
    saved = structlog.get_config()
    try:
        r = CliRunner().invoke(cli, ["serve", "--data", str(tmp_path), "--database", pg_empty_dsn,
                                     "--listen", "127.0.0.1:0"])
    finally:
        structlog.configure(**saved)
    assert r.exit_code == 1
    assert f"schema version 0, this relay needs {len(mig.POSTGRES)}: run `pli-relay migrate`" in r.output


# -- new mail ---------------------------------------------------------------------------------------


async def test_new_mail_wakes_a_waiting_inbox_only_once_committed(location: Path | str) -> None:
    # Two storages on one database: on PostgreSQL, two relay nodes (the notification
    # crosses between them); on SQLite, a second opener sees its own only.
    a = await Storage.open(location)
    b = await Storage.open(location) if isinstance(location, str) else a
    device = os.urandom(16)
    try:
        async with b.mail_waiter(device) as event:
            with contextlib.suppress(ZeroDivisionError):
                async with a.transaction() as tx:
                    await a.notify_mail(tx, [device])
                    _ = 1 / 0  # rolled back: no notification
            async with a.transaction() as tx:
                await a.notify_mail(tx, [os.urandom(16)])  # someone else's mail
            assert not event.is_set()
            started = time.monotonic()
            async with a.transaction() as tx:
                await a.notify_mail(tx, [os.urandom(16), device])
            await asyncio.wait_for(event.wait(), 5)
            assert time.monotonic() - started < 1
    finally:
        if b is not a:
            await b.close()
        await a.close()


# -- blob stores ------------------------------------------------------------------------------------
# Each test runs on the file system store (with SQLite) and on the PostgreSQL store.

BLOB_STORES = ["fs", "postgresql"]


def _blob_settings(request: pytest.FixtureRequest, blob_store: str) -> dict[str, Any]:
    if blob_store == "fs":
        return {}
    return {"database": request.getfixturevalue("pg_dsn"), "blob_store": blob_store}


@pytest_asyncio.fixture(params=BLOB_STORES)
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Storage, BlobStore]]:
    cfg = RelayConfig(data=tmp_path, **_blob_settings(request, request.param))
    storage = await open_storage(cfg, create=True)
    yield storage, open_blobs(cfg, storage)
    await storage.close()


async def _put_part(store: BlobStore, eid: bytes, prefix: bytes, offset: int, data: bytes, *, new: bool = False,
                    commit: bool = False) -> None:
    """One request's worth of writes, made durable as the upload route does."""
    up = await store.open_upload(eid, prefix, new=new)
    try:
        if data:
            await up.write(offset, data)
        await (up.commit() if commit else up.sync())
    finally:
        await up.close()


async def test_blob_store_upload_in_pieces_resumes_truncates_commits_and_deletes(
    blobs: tuple[Storage, BlobStore],
) -> None:
    _, store = blobs
    prefix = b"P" * 300
    ct = os.urandom(2 * CHUNK + 12_345)
    eid = os.urandom(16)
    assert not await store.has_part(eid)
    await _put_part(store, eid, prefix, len(prefix), ct[: CHUNK + 5], new=True)
    assert await store.has_part(eid)
    held = len(prefix) + CHUNK + 5
    # A request that failed after writing: its bytes go, back to what the row holds.
    await _put_part(store, eid, prefix, held, os.urandom(70_000))
    await store.truncate(eid, held)
    # Resumed in two more requests, the first retried from below the part's end.
    await _put_part(store, eid, prefix, held, ct[CHUNK + 5 : CHUNK + 900_000])
    await _put_part(store, eid, prefix, held, ct[CHUNK + 5 : CHUNK + 1_000_000])
    await _put_part(store, eid, prefix, len(prefix) + CHUNK + 1_000_000, ct[CHUNK + 1_000_000 :], commit=True)
    assert await store.size(eid) == len(prefix) + len(ct)
    # A log batch that failed: back to a part, which hashes and commits again.
    await store.uncommit(eid)
    assert await store.has_part(eid)
    assert await store.part_sha256(eid, len(prefix)) == hashlib.sha256(ct).digest()
    await _put_part(store, eid, prefix, 0, b"", commit=True)
    assert await store.size(eid) == len(prefix) + len(ct)
    # A new upload of the same id starts over.
    other = os.urandom(16)
    await _put_part(store, other, prefix, len(prefix), b"abc", new=True)
    await _put_part(store, other, prefix, len(prefix), b"xy", new=True, commit=True)
    assert await store.size(other) == len(prefix) + 2
    for gone in (eid, other):
        await store.delete(gone)
        assert await store.size(gone) is None
        assert not await store.has_part(gone)


async def test_blob_store_sweep_removes_only_what_no_envelope_owns(blobs: tuple[Storage, BlobStore]) -> None:
    storage, store = blobs
    gp = await _enrolled(storage)
    stored = await _envelope(storage, gp.device_id, [gp.device_id])
    uploading = await _envelope(storage, gp.device_id, [gp.device_id], size=100, received=10)
    orphan = os.urandom(16)
    for eid in (stored, uploading, orphan):
        await _put_part(store, eid, b"prefix", 6, b"x" * 10, new=True, commit=eid != uploading)
    assert await store.sweep(storage, grace=3600) == []  # written just now: maybe another node's
    assert await store.sweep(storage, grace=0) == [orphan.hex()]
    assert await store.size(stored) == 16
    assert await store.has_part(uploading)
    assert not await store.has_part(orphan)


@pytest.mark.parametrize("blob_store", BLOB_STORES)
async def test_relay_upload_in_pieces_resume_range_download_and_purge(
    relay_factory: RelayFactory, request: pytest.FixtureRequest, blob_store: str
) -> None:
    relay = await relay_factory(max_request=700_000, **_blob_settings(request, blob_store))
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    ct = os.urandom(2 * CHUNK + 4321)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    r = await relay.put(gp.keys, eid, prefix + ct[:400_000])
    assert (r.status, r.json()["offset"]) == (200, 400_000)
    # A retried PUT resends bytes the relay holds: skipped. A damaged piece loses only itself.
    assert (await relay.put(gp.keys, eid, prefix + ct[:300_000])).json()["offset"] == 400_000
    bad = await relay.patch(gp.keys, eid, 400_000, ct[400_000:1_000_000], digest_of=b"other bytes")
    assert_problem(bad, 400, "digest_mismatch")
    assert_problem(await relay.patch(gp.keys, eid, 123, ct[123:500]), 409, "offset_mismatch")
    offset = 400_000
    while offset < len(ct):
        piece = ct[offset : offset + 650_000]
        r = await relay.patch(gp.keys, eid, offset, piece)
        offset += len(piece)
        assert r.status == (201 if offset == len(ct) else 200), r.body[:300]
    assert r.json()["receipt"] is not None
    whole = prefix + ct
    path = f"/v1/envelopes/{eid.hex()}"
    assert (await relay.get(derm.keys, path)).body == whole
    for rng, start, stop in ((f"bytes={CHUNK - 7}-", CHUNK - 7, len(whole)), ("bytes=-100", len(whole) - 100,
                             len(whole)), (f"bytes=10-{CHUNK + 20}", 10, CHUNK + 21)):
        r = await relay.get(derm.keys, path, headers={"Range": rng})
        assert (r.status, r.body == whole[start:stop]) == (206, True), rng
        assert r.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(whole)}"
    for rng in (f"bytes={len(whole)}-", "bytes=abc", "bytes=10-5"):
        assert_problem(await relay.get(derm.keys, path, headers={"Range": rng}), 416)
    ready = await relay.signed(derm.keys, "GET", "/readyz")
    assert ready.json()["checks"]["blobs"] == "ok"
    # Acknowledged by its only recipient: the ciphertext goes at once.
    assert (await relay.ack(derm.keys, eid)).json()["deleted"] is True
    assert await relay.app[BLOBS].size(eid) is None
    assert_problem(await relay.get(derm.keys, path), 404, "not_found")
    # Expired: purged.
    short = os.urandom(3000)
    sid, sprefix = make_envelope(gp.keys, [derm.device_id], short, now=relay.clock(), expires=relay.clock() + 60)
    assert (await relay.put(gp.keys, sid, sprefix + short)).status == 201
    # Small and whole in one request: kept in its row, not in the blob store; served the same.
    small = sprefix + short
    assert await relay.app[BLOBS].size(sid) is None
    assert relay.stored_blob(sid) == small
    spath = f"/v1/envelopes/{sid.hex()}"
    assert (await relay.get(derm.keys, spath)).body == small
    for rng, start, stop in (("bytes=100-", 100, len(small)), ("bytes=-50", len(small) - 50, len(small)),
                             ("bytes=10-20", 10, 21), (f"bytes=0-{len(small) + 99}", 0, len(small))):
        r = await relay.get(derm.keys, spath, headers={"Range": rng})
        assert (r.status, r.body == small[start:stop]) == (206, True), rng
        assert r.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(small)}"
    for rng in (f"bytes={len(small)}-", "bytes=abc", "bytes=10-5"):
        assert_problem(await relay.get(derm.keys, spath, headers={"Range": rng}), 416)
    relay.clock.advance(61)
    await purge_once(relay.app)
    assert relay.stored_blob(sid) is None
    assert relay.query("SELECT state, inline FROM envelopes WHERE id = ?", (sid,)) == [("deleted", None)]


# -- the relay's own flows, on PostgreSQL -------------------------------------------------------------

_FLOWS: list[Callable[..., Awaitable[Any]]] = [
    test_relay.test_enroll_then_directory_lists_verifiable_record,
    test_relay.test_revoked_device_leaves_directory,
    test_relay.test_full_flow_send_inbox_open_ack_reply,
    test_relay.test_not_deleted_until_every_recipient_device_acknowledges,
    test_relay.test_expired_envelope_is_hidden_then_purged,
    test_relay.test_old_nonces_are_purged,
    test_relay.test_put_is_idempotent_and_conflicts_on_other_content,
    test_relay.test_chunked_resumable_upload,
    test_relay.test_a_cut_patch_keeps_what_arrived_and_the_upload_resumes,
    test_relay.test_bytes_kept_from_a_cut_patch_are_checked_at_the_end,
    test_relay.test_inbox_lists_oldest_first_and_only_own_envelopes,
]


@pytest.mark.parametrize("flow", _FLOWS, ids=lambda f: f.__name__.removeprefix("test_"))
async def test_relay_flow_on_postgresql(flow: Callable[..., Awaitable[Any]], relay_factory: RelayFactory,
                                        pg_dsn: str, tmp_path: Path) -> None:
    relay: Relay = await relay_factory(database=pg_dsn)
    if "tmp_path" in flow.__code__.co_varnames[: flow.__code__.co_argcount]:
        await flow(relay, tmp_path)
    else:
        await flow(relay)


async def test_inbox_long_poll_on_one_node(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    for bad in ("abc", "61", "05", "-1", "1.5"):
        assert_problem(await relay.get(derm.keys, f"/v1/inbox?wait={bad}"), 400, "malformed")
    waiting = asyncio.create_task(relay.get(derm.keys, "/v1/inbox?wait=30"))
    # Until the request holds its place (its nonce is stored just before the handler runs).
    for _ in range(1000):
        if relay.query("SELECT COUNT(*) FROM nonces WHERE device_id = ?", (derm.device_id,))[0][0] >= 6:
            break
        await asyncio.sleep(0.005)
    ct = os.urandom(500)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    started = time.monotonic()
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    r = await asyncio.wait_for(waiting, 10)
    assert time.monotonic() - started < 1
    assert [e["id"] for e in r.json()["envelopes"]] == [eid.hex()]


# -- several nodes on one envelope, one log, one listener (review of issue 7) -------------------------


async def _two_nodes(relay_factory: RelayFactory, pg_dsn: str, tmp_path: Path, blob_store: str,
                     **settings: Any) -> tuple[Relay, Relay]:
    """Two relays (two create_app) on one PostgreSQL database: with ``fs``, one shared data
    folder; with ``postgresql``, a folder each, the second holding a copy of the log key."""
    if blob_store == "fs":
        a = await relay_factory("shared", database=pg_dsn, **settings)
        return a, await relay_factory("shared", database=pg_dsn, **settings)
    a = await relay_factory("a", database=pg_dsn, blob_store=blob_store, **settings)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "log.key").write_bytes((a.data / "log.key").read_bytes())
    return a, await relay_factory("b", database=pg_dsn, blob_store=blob_store, **settings)


@pytest.mark.parametrize("blob_store", BLOB_STORES)
async def test_same_put_and_patch_on_two_nodes_at_once_never_lose_a_receipted_envelope(
    relay_factory: RelayFactory, pg_dsn: str, tmp_path: Path, blob_store: str
) -> None:
    # A client retrying after a lost answer reaches the other node while the first is
    # still at work: nodes serialise on the envelope, and neither undoes the other's work.
    a, b = await _two_nodes(relay_factory, pg_dsn, tmp_path, blob_store, max_request=300_000)
    gp, derm = await a.enroll(GP), await a.enroll(DERM)
    sent: dict[bytes, bytes] = {}
    statuses = []
    for i in range(12):
        ct = os.urandom(200_000)
        eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=a.clock())
        sent[eid] = prefix + ct
        if i % 2:  # PATCH: the same last piece to both nodes
            assert (await a.put(gp.keys, eid, prefix + ct[:120_000])).status == 200
            replies = await asyncio.gather(a.patch(gp.keys, eid, 120_000, ct[120_000:]),
                                           b.patch(gp.keys, eid, 120_000, ct[120_000:]))
        else:
            replies = await asyncio.gather(a.put(gp.keys, eid, prefix + ct), b.put(gp.keys, eid, prefix + ct))
        statuses.append(sorted(r.status for r in replies))
        assert all(r.status in (200, 201) for r in replies), [(r.status, r.body[:200]) for r in replies]
        assert all(r.json()["receipt"] is not None for r in replies)
    assert all(s == [200, 201] for s in statuses), statuses
    for eid, whole in sent.items():
        for node in (a, b):
            got = await node.get(derm.keys, f"/v1/envelopes/{eid.hex()}")
            assert (got.status, got.body == whole) == (200, True)
        assert a.query("SELECT state, received FROM envelopes WHERE id = ?", (eid,)) == [("stored", 200_000)]


async def test_a_conditional_reset_leaves_an_upload_another_request_moved(storage: Storage) -> None:
    # What a request on another node saw (an upload at 100 bytes) is stale once the row
    # moved: its reset or its completion changes nothing.
    gp, derm = await _enrolled(storage), await _enrolled(storage, DERM)
    eid = await _envelope(storage, gp.device_id, [derm.device_id], size=300, received=100)
    assert await storage.set_received(eid, 300, held=100, complete=True, now=NOW)
    assert not await storage.set_received(eid, 0, held=100, complete=False, now=NOW)
    assert not await storage.set_received(eid, 300, held=100, complete=True, now=NOW)
    row = await storage.envelope(eid)
    assert row is not None
    assert (row.state, row.received) == ("stored", 300)
    assert not await storage.create_envelope(
        envelope_id=eid, sender=gp.device_id, prefix=b"p", envelope_hash=bytes(32), size=1, created=NOW,
        expires=NOW + 60, to=[derm.device_id], received=0, now=NOW)


def _rollback_to(relay: Relay, size: int) -> None:
    """The database goes back to tree size ``size`` under the running relay (a failover to
    a lagging replica, a restore under it): leaves, nodes and checkpoints past it gone."""
    for sql in ("DELETE FROM log_leaves WHERE idx >= ?", "DELETE FROM log_checkpoints WHERE size > ?",
                "DELETE FROM log_nodes WHERE (idx + 1) * (1 << level) > ?"):
        if relay.cfg.database == "sqlite":
            import sqlite3  # noqa: PLC0415

            db = sqlite3.connect(relay.data / "relay.sqlite3")
            db.execute(sql, (size,))
            db.commit()
            db.close()
        else:
            from _pg import query  # noqa: PLC0415

            query(relay.cfg.database, sql, (size,))


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_log_rollback_under_a_running_node_stops_appends(
    relay_factory: RelayFactory, request: pytest.FixtureRequest, engine: str
) -> None:
    settings = {} if engine == "sqlite" else {"database": request.getfixturevalue("pg_dsn")}
    relay = await relay_factory(**settings)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    size = relay.query("SELECT MAX(size) FROM log_checkpoints")[0][0]
    ct = os.urandom(500)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    _rollback_to(relay, size)
    ct = os.urandom(500)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert_problem(await relay.put(gp.keys, eid, prefix + ct), 503, "log_integrity")
    # Nothing was signed for the size it had signed already.
    assert relay.query("SELECT COUNT(*) FROM log_checkpoints WHERE size > ?", (size,)) == [(0,)]


async def test_restart_on_an_older_copy_of_the_database_is_refused(tmp_path: Path) -> None:
    from relay.log import HIGHWATER, LogIntegrityError, open_log  # noqa: PLC0415

    data = tmp_path / "data"
    storage = await open_storage(RelayConfig(data=data), create=True)
    tlog = await open_log(data, storage, origin="pli.example/relay", clock=lambda: NOW, window=0, create=True)
    await tlog.append(_delivered(0))
    await tlog.close()
    await storage.close()
    older = (data / "relay.sqlite3").read_bytes()  # a backup (closed: no WAL left)
    storage = await open_storage(RelayConfig(data=data))
    tlog = await open_log(data, storage, origin="pli.example/relay", clock=lambda: NOW, window=0)
    for i in (1, 2):
        await tlog.append(_delivered(i))
    await tlog.close()
    await storage.close()
    assert (data / HIGHWATER).read_text().split()[0] == "3"
    (data / "relay.sqlite3").write_bytes(older)  # restored over the newer one
    storage = await open_storage(RelayConfig(data=data))
    try:
        with pytest.raises(LogIntegrityError, match="went back to size 1, below the size 3"):
            await open_log(data, storage, origin="pli.example/relay", clock=lambda: NOW, window=0)
    finally:
        await storage.close()


async def test_a_terminated_listener_reconnects_and_long_polls_wake_on_both_nodes(pg_dsn: str) -> None:
    from _pg import query  # noqa: PLC0415

    from relay.storage._pg import PostgresStorage  # noqa: PLC0415

    a, b = await Storage.open(pg_dsn), await Storage.open(pg_dsn)
    assert isinstance(a, PostgresStorage)
    device = os.urandom(16)
    try:
        assert a._listener is not None
        pid = a._listener.get_server_pid()
        async with a.mail_waiter(device) as woken:
            query(pg_dsn, "SELECT pg_terminate_backend(?)", (pid,))
            # The reconnection wakes every waiter (what was announced meanwhile is lost).
            await asyncio.wait_for(woken.wait(), 10)
        assert a.listener_up()
        assert a._listener.get_server_pid() != pid
        for writer in (a, b):  # mail stored on the same node, then on another
            async with a.mail_waiter(device) as mail:
                async with writer.transaction() as tx:
                    await writer.notify_mail(tx, [device])
                await asyncio.wait_for(mail.wait(), 5)
    finally:
        await b.close()
        await a.close()


async def test_a_stuck_log_lock_holder_gets_a_put_answered_503_not_hung(
    relay_factory: RelayFactory, pg_dsn: str
) -> None:
    import asyncpg  # noqa: PLC0415

    from relay.storage._pg import LOG_LOCK  # noqa: PLC0415

    relay = await relay_factory(database=pg_dsn, pg_lock_timeout=0.5)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    holder = await asyncpg.connect(pg_dsn)  # a node frozen mid-batch (its connection not reset)
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT pg_advisory_xact_lock($1)", LOG_LOCK)
        ct = os.urandom(500)
        eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
        r = await asyncio.wait_for(relay.put(gp.keys, eid, prefix + ct), 5)
        assert_problem(r, 503, "unavailable")
        assert r.headers["Retry-After"]
        assert relay.query("SELECT COUNT(*) FROM log_leaves WHERE envelope_id = ?", (eid,)) == [(0,)]
    finally:
        await holder.close()
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201  # the lock gone: stored


async def test_connection_level_postgresql_errors_are_503_not_500(pg_dsn: str) -> None:
    import asyncpg  # noqa: PLC0415
    from _pg import query  # noqa: PLC0415

    from relay.errors import storage_failure  # noqa: PLC0415

    raised: list[BaseException] = []
    conn = await asyncpg.connect(pg_dsn)
    query(pg_dsn, "SELECT pg_terminate_backend(?)", (conn.get_server_pid(),))
    for _ in range(2):  # the terminated backend, then the closed connection
        try:
            await conn.fetchval("SELECT 1")
        except Exception as e:
            raised.append(e)
    await conn.close()
    try:
        await conn.fetchval("SELECT 1")
    except asyncpg.InterfaceError as e:
        raised.append(e)
    port = int(pg_dsn.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    with contextlib.suppress(OSError):
        await asyncpg.connect(pg_dsn.replace(f":{port}/", ":1/"))  # nothing listens there
    try:
        await asyncpg.connect(pg_dsn.replace(f":{port}/", ":1/"))
    except OSError as e:
        raised.append(e)
    busy = []
    a, b = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:  # a real deadlock (40P01), and a lock_timeout (55P03)
        for c in (a, b):
            await c.execute("BEGIN")
        await a.execute("SELECT pg_advisory_xact_lock(1)")
        await b.execute("SELECT pg_advisory_xact_lock(2)")
        crossed = await asyncio.gather(a.execute("SELECT pg_advisory_xact_lock(2)"),
                                       b.execute("SELECT pg_advisory_xact_lock(1)"), return_exceptions=True)
        busy += [e for e in crossed if isinstance(e, asyncpg.PostgresError)]  # one of the two is the victim
        for c in (a, b):
            await c.execute("ROLLBACK")
        await a.execute("BEGIN")
        await a.execute("SELECT pg_advisory_xact_lock(3)")
        await b.execute("SET lock_timeout = 50")
        try:
            await b.execute("SELECT pg_advisory_xact_lock(3)")
        except asyncpg.PostgresError as e:
            busy.append(e)
    finally:
        await a.close()
        await b.close()
    assert len(raised) == 4, raised
    assert [getattr(e, "sqlstate", None) for e in busy] == ["40P01", "55P03"]
    for e in raised:
        refusal = storage_failure(e)
        assert refusal is not None, repr(e)
        assert (refusal.status, refusal.code, refusal.retry_after is not None) == (503, "storage_unavailable", True)
    for e in busy:
        refusal = storage_failure(e)
        assert refusal is not None, repr(e)
        assert (refusal.status, refusal.code, refusal.retry_after is not None) == (503, "unavailable", True)


async def test_a_device_holds_at_most_two_long_polls_and_a_shutdown_answers_them(relay: Relay) -> None:
    from relay.app import STORAGE  # noqa: PLC0415

    derm = await relay.enroll(DERM)
    storage = relay.app[STORAGE]
    polls = [asyncio.create_task(relay.get(derm.keys, "/v1/inbox?wait=60")) for _ in range(2)]
    async def held() -> None:
        while storage.waiting(derm.device_id) < 2:  # noqa: ASYNC110 - no hook: polled, bounded below
            await asyncio.sleep(0.005)

    await asyncio.wait_for(held(), 10)
    # A third is answered at once, without waiting.
    r = await asyncio.wait_for(relay.get(derm.keys, "/v1/inbox?wait=60"), 5)
    assert (r.status, r.json()) == (200, {"envelopes": []})
    assert storage.waiting(derm.device_id) == 2
    await relay.app.shutdown()  # a restart: the long polls answer now, not after the grace period
    for r in await asyncio.wait_for(asyncio.gather(*polls), 5):
        assert (r.status, r.json()) == (200, {"envelopes": []})


def test_max_inbox_wait_over_the_protocols_60_seconds_is_refused() -> None:
    from relay.config import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match="max_inbox_wait: at most 60 seconds"):
        RelayConfig(max_inbox_wait=120)
