"""The relay's fast paths for a submission, against what they must keep true.

A small new envelope's request nonce is written in the log's batch transaction, with the
envelope (``relay.app.NonceClaim``); a batch of new envelopes is one trip to SQLite
(``Storage.sequencer_batch``); the device, the nonce and a new envelope's id and
recipients are read on the event loop's thread (``Storage.read_quick``); both Ed25519
checks run on the verifier's thread (``relay.app.Verifier``). Real relays on loopback,
real SQLite, real PostgreSQL; other writers are other connections to the same database.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import DERM, GP, Device, Relay, RelayFactory, assert_problem, make_envelope, send_raw, sign_headers

from protocol import httpsig, keys, merkle
from protocol.envelope import split_prefix
from protocol.errors import DecodeError, SignatureError
from protocol.keys import DeviceKeys
from protocol.logentry import EntryType, LogEntry
from protocol.note import TlogProof
from relay.app import GC_THRESHOLDS, LOG, METRICS, NONCES_IN_FLIGHT, STORAGE, Verifier, create_app, verify_header
from relay.config import RelayConfig
from relay.log import HIGHWATER, TransparencyLog, tlog_proof_text
from relay.routes import ENVELOPE_TYPE
from relay.storage import Storage


async def _until(condition: Any, what: str) -> None:
    """Poll a real condition (the relay's own state), never a guess of how long it takes."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"never: {what}")


class Held:
    """A signed PUT of a new small envelope whose body waits for :meth:`release`, with a
    nonce chosen here: the request is authenticated (its nonce in flight) before its body."""

    def __init__(self, relay: Relay, sender: Device, to: list[Device] | list[bytes], *, nonce: str | None = None,
                 size: int = 3000) -> None:
        self.relay = relay
        self.sender = sender
        self.ct = os.urandom(size)
        ids = [d if isinstance(d, bytes) else d.device_id for d in to]
        self.eid, self.prefix = make_envelope(sender.keys, ids, self.ct, now=relay.clock())
        self.body = self.prefix + self.ct
        self.nonce = nonce or httpsig.encode_nonce(os.urandom(16))
        self.path = f"/v1/envelopes/{self.eid.hex()}"
        self.headers = sign_headers(sender.keys, "PUT", relay.u(self.path), self.body, created=relay.clock(),
                                    nonce=self.nonce)
        self.headers["Content-Type"] = ENVELOPE_TYPE
        self._go = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield self.body[:100]
        await self._go.wait()
        yield self.body[100:]

    async def start(self) -> None:
        self.task = asyncio.create_task(send_raw(self.relay.session, "PUT", self.relay.u(self.path), self._chunks(),
                                                 headers=self.headers))
        key = (self.sender.device_id, self.nonce)
        await _until(lambda: key in self.relay.app[NONCES_IN_FLIGHT], "the PUT is authenticated")

    def release(self) -> None:
        self._go.set()

    async def reply(self) -> Any:
        assert self.task is not None
        return await self.task

    async def again(self) -> Any:
        """The very same request (headers and body) sent again: a replay."""
        return await send_raw(self.relay.session, "PUT", self.relay.u(self.path), self.body, headers=self.headers)


def _nonces(relay: Relay, device: Device) -> set[str]:
    return {n for (n,) in relay.query("SELECT nonce FROM nonces WHERE device_id = ?", (device.device_id,))}


def _submitted(relay: Relay) -> list[bytes]:
    rows = relay.query("SELECT envelope_id FROM log_leaves WHERE type = ? ORDER BY idx", (int(EntryType.SUBMITTED),))
    return [bytes(r[0]) for r in rows]


def _insert_nonce(relay: Relay, device: Device, nonce: str) -> None:
    """Record a nonce as another node (or process) would: its own connection, committed."""
    if relay.cfg.database != "sqlite":
        from _pg import query  # noqa: PLC0415 - the plugin, imported by pytest_plugins first

        query(relay.cfg.database, "INSERT INTO nonces (device_id, nonce, expires) VALUES (%s, %s, %s)",
              (device.device_id, nonce, relay.clock() + 1000))
        return
    db = sqlite3.connect(relay.data / "relay.sqlite3", isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("INSERT INTO nonces (device_id, nonce, expires) VALUES (?, ?, ?)",
                   (device.device_id, nonce, relay.clock() + 1000))
    finally:
        db.close()


# -- the nonce of a submission, in the log's transaction -----------------------------------------


async def test_a_submission_records_its_nonce_with_its_envelope_and_its_replay_is_refused(relay: Relay) -> None:
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    put = Held(relay, gp, [derm])
    await put.start()
    assert put.nonce not in _nonces(relay, gp)  # not written before the envelope
    put.release()
    first = await put.reply()
    assert first.status == 201, first.body
    assert put.nonce in _nonces(relay, gp)  # committed with it
    assert _submitted(relay) == [put.eid]
    # The same request again, in a later batch: refused as a replay (not answered as a
    # retry of the stored envelope), and nothing more is logged.
    assert_problem(await put.again(), 401, "replayed_request")
    # And a replay that arrives while the first is still in flight, before any batch.
    second = Held(relay, gp, [derm])
    await second.start()
    assert_problem(await second.again(), 401, "replayed_request")
    second.release()
    assert (await second.reply()).status == 201
    assert _submitted(relay) == [put.eid, second.eid]
    assert relay.envelope_count() == 2


async def test_a_nonce_recorded_meanwhile_elsewhere_refuses_only_its_submission(relay_factory: RelayFactory) -> None:
    # A wide group-commit window: both submissions land in one batch (whether they do or
    # not, every assertion below holds).
    relay = await relay_factory(group_commit_ms=300)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    ok, replayed = Held(relay, gp, [derm]), Held(relay, gp, [derm])
    await ok.start()
    await replayed.start()
    size = await relay.app[LOG].size()
    # Another process (another node) records the second one's nonce after the relay
    # checked it and before the batch: the batch's insert meets it.
    _insert_nonce(relay, gp, replayed.nonce)
    ok.release()
    replayed.release()
    good, bad = await ok.reply(), await replayed.reply()
    assert good.status == 201, good.body
    assert_problem(bad, 401, "replayed_request")
    assert _submitted(relay) == [ok.eid]
    assert relay.query("SELECT id FROM envelopes") == [(ok.eid,)]
    assert relay.query("SELECT COUNT(*) FROM deliveries")[0][0] == 1
    assert await relay.app[LOG].size() == size + 1
    assert {ok.nonce, replayed.nonce} <= _nonces(relay, gp)
    assert_problem(await ok.again(), 401, "replayed_request")
    # The relay carries on: the next submission is logged right after.
    after = Held(relay, gp, [derm])
    await after.start()
    after.release()
    assert (await after.reply()).json()["receipt"]["index"] == size + 1


async def test_a_refused_submission_still_records_its_nonce(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    stranger = DeviceKeys.generate(now=relay.clock())
    # Refused by the handler (an unknown recipient) after its nonce was deferred: the nonce
    # is recorded before the answer all the same, as every signed request's is.
    put = Held(relay, gp, [stranger.device_id])
    await put.start()
    put.release()
    assert_problem(await put.reply(), 400, "unknown_recipient")
    assert put.nonce in _nonces(relay, gp)
    assert not relay.app[NONCES_IN_FLIGHT]
    assert_problem(await put.again(), 401, "replayed_request")
    relay.assert_nothing_stored()


async def test_an_item_refused_in_its_batch_leaves_the_others_and_their_nonces(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(group_commit_ms=300)  # one batch for all three (or not: all holds either way)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    size = await relay.app[LOG].size()
    # One envelope's row is refused by the database (a trigger, from another connection):
    # the batch's statements fail together, then each item goes alone, under a savepoint.
    db = sqlite3.connect(relay.data / "relay.sqlite3", isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON envelopes WHEN NEW.size = 777"
                   " BEGIN SELECT RAISE(ABORT, 'refused'); END")
        before, refused, after = Held(relay, gp, [derm]), Held(relay, gp, [derm], size=777), Held(relay, gp, [derm])
        for p in (before, refused, after):
            await p.start()
        for p in (before, refused, after):
            p.release()
        replies = [await p.reply() for p in (before, refused, after)]
        db.execute("DROP TRIGGER refuse")
    finally:
        db.close()
    assert [r.status for r in replies] == [201, 500, 201]
    assert sorted(r.json()["receipt"]["index"] for r in (replies[0], replies[2])) == [size, size + 1]
    assert sorted(_submitted(relay)) == sorted([before.eid, after.eid])
    # Every nonce is recorded: the stored ones with their envelopes, the refused one on its own.
    assert {before.nonce, refused.nonce, after.nonce} <= _nonces(relay, gp)
    for p in (before, refused, after):
        assert_problem(await p.again(), 401, "replayed_request")
    assert relay.envelope_count() == 2


async def test_a_submission_found_replayed_in_its_batch_costs_its_device_no_token(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(rate_limit=0.001, rate_burst=2)  # no refill within the test
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)  # enrolment is public: no token
    put = Held(relay, gp, [derm])
    await put.start()  # a token taken, as the nonce was new when checked
    _insert_nonce(relay, gp, put.nonce)
    put.release()
    assert_problem(await put.reply(), 401, "replayed_request")
    # Given back: the device still has both of its tokens.
    assert (await relay.get(gp.keys, "/v1/inbox")).status == 200
    assert (await relay.get(gp.keys, "/v1/inbox")).status == 200
    assert_problem(await relay.get(gp.keys, "/v1/inbox"), 429, "rate_limited")


@pytest.mark.parametrize("one_trip", [True, False], ids=["one-trip", "step-by-step"])
async def test_a_logged_submission_whose_mark_is_unsound_hears_that_not_replay(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, one_trip: bool
) -> None:
    # The batch commits the envelope with its nonce, then finds the log's high-water mark
    # unsound. The client must hear the log's integrity error (and the relay raise its
    # alarm), not "replay" because its own nonce is found recorded afterwards.
    monkeypatch.setattr(type(relay.app[STORAGE]), "one_trip_batches", one_trip)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    (relay.data / HIGHWATER).write_text("garbage\n")
    put = Held(relay, gp, [derm])
    await put.start()
    put.release()
    assert_problem(await put.reply(), 503, "log_integrity")
    assert relay.app[METRICS].log_alarm is not None
    assert put.nonce in _nonces(relay, gp)
    assert not relay.app[NONCES_IN_FLIGHT]


async def test_a_submission_cancelled_before_its_batch_still_records_its_nonce(relay: Relay) -> None:
    # The client goes away while the relay reads its body (the test server cancels the
    # handler then, as any relay does when it stops): nothing is stored, but the very same
    # request sent again later, here or to another node, is a replay all the same.
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    put = Held(relay, gp, [derm])
    await put.start()
    assert put.task is not None
    put.task.cancel()
    await _until(lambda: not relay.app[NONCES_IN_FLIGHT], "the cancelled request is over")
    assert put.nonce in _nonces(relay, gp)
    assert_problem(await put.again(), 401, "replayed_request")
    relay.assert_nothing_stored()


async def test_a_submission_cancelled_in_its_log_batch_still_records_its_nonce(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client goes away while its entry waits in a log batch, which then refuses it (a
    # trigger, from another connection, refuses its row): the nonce is recorded all the
    # same, and the very same request sent again is a replay.
    relay = await relay_factory(group_commit_ms=300)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    in_log = asyncio.Event()
    append = TransparencyLog.append

    async def noting(self: TransparencyLog, *args: Any, **kwargs: Any) -> Any:
        in_log.set()  # the real append follows: this only says when the request got there
        return await append(self, *args, **kwargs)

    monkeypatch.setattr(TransparencyLog, "append", noting)
    db = sqlite3.connect(relay.data / "relay.sqlite3", isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON envelopes WHEN NEW.size = 777"
                   " BEGIN SELECT RAISE(ABORT, 'refused'); END")
        put = Held(relay, gp, [derm], size=777)
        await put.start()
        put.release()
        await in_log.wait()
        assert put.task is not None
        put.task.cancel()
        await _until(lambda: not relay.app[NONCES_IN_FLIGHT], "the cancelled request is over")
        assert put.nonce in _nonces(relay, gp)
        # A later submission's receipt: the log has answered every batch before it.
        later = Held(relay, gp, [derm])
        await later.start()
        later.release()
        assert (await later.reply()).status == 201
        db.execute("DROP TRIGGER refuse")
    finally:
        db.close()
    assert_problem(await put.again(), 401, "replayed_request")
    assert _submitted(relay) == [later.eid]
    assert relay.envelope_count() == 1


async def test_gc_thresholds_are_the_relays_while_it_serves_and_come_back_after(tmp_path: Path) -> None:
    own = (701, 11, 9)  # this process's, before any relay
    saved = gc.get_threshold()
    gc.set_threshold(*own)
    try:
        servers = [TestServer(create_app(RelayConfig(data=tmp_path / name, listen="127.0.0.1:0")),
                           host="127.0.0.1", port=0) for name in ("a", "b")]
        await servers[0].start_server()
        assert gc.get_threshold() == GC_THRESHOLDS
        await servers[1].start_server()
        await servers[0].close()  # the first to start stops first: the other still serves
        assert gc.get_threshold() == GC_THRESHOLDS
        await servers[1].close()
        assert gc.get_threshold() == own
    finally:
        gc.set_threshold(*saved)


async def test_the_verifier_checks_on_the_loop_once_closed_and_starts_no_thread() -> None:
    # A request still running while the relay cleans up: its checks are still made (and
    # still refuse a bad signature), without a thread nobody would stop.
    verifier = Verifier()
    signing = DeviceKeys.generate(now=0).signing_key
    signature = keys.sign(signing, keys.CTX_ENVELOPE, b"m" * 32)
    good = partial(keys.verify, signing.verify_key, keys.CTX_ENVELOPE, b"m" * 32, signature)
    bad = partial(keys.verify, signing.verify_key, keys.CTX_ENVELOPE, b"n" * 32, signature)
    def threads() -> int:  # verifier threads in this process (other tests' relays' included)
        return sum(t.name.startswith("pli-verify") for t in threading.enumerate())

    before = threads()
    await verifier.check(good)
    assert threads() == before + 1
    verifier.close()
    assert threads() == before
    await verifier.check(good)
    with pytest.raises(SignatureError):
        await verifier.check(bad)
    assert threads() == before


@pytest.mark.slow
async def test_two_nodes_on_postgresql_one_nonce(relay_factory: RelayFactory, pg_dsn: str, tmp_path: Path) -> None:
    a = await relay_factory("a", database=pg_dsn, blob_store="postgresql")
    (tmp_path / "b").mkdir()
    shutil.copy2(a.data / "log.key", tmp_path / "b" / "log.key")
    b = await relay_factory("b", database=pg_dsn, blob_store="postgresql", clock=a.clock)
    gp, derm = await a.enroll(GP), await a.enroll(DERM)
    put = Held(a, gp, [derm])
    await put.start()
    # The same nonce on a request to the other node, while the PUT is in flight there.
    h = sign_headers(gp.keys, "GET", b.u("/v1/inbox"), created=b.clock(), nonce=put.nonce)
    assert (await send_raw(b.session, "GET", b.u("/v1/inbox"), headers=h)).status == 200
    size = await a.app[LOG].size()
    put.release()
    assert_problem(await put.reply(), 401, "replayed_request")
    assert a.envelope_count() == 0
    assert await a.app[LOG].size() == size
    # Both nodes go on appending to the one log.
    for node in (a, b):
        nxt = Held(node, gp, [derm])
        await nxt.start()
        nxt.release()
        r = await nxt.reply()
        assert r.status == 201, r.body
        assert r.json()["receipt"]["index"] == size
        size += 1


# -- one trip per batch -------------------------------------------------------------------------


async def test_one_trip_batches_continue_a_log_another_writer_extends(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(group_commit_ms=0)
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    tlog = relay.app[LOG]
    storage = await Storage.open(relay.data / "relay.sqlite3")
    try:
        from relay.log import open_log  # noqa: PLC0415

        other = await open_log(relay.data, storage, origin="", clock=relay.clock, window=0)
        try:
            receipts: list[dict[str, Any]] = []

            async def submit() -> None:
                put = Held(relay, gp, [derm])
                await put.start()
                put.release()
                r = await put.reply()
                assert r.status == 201, r.body
                receipts.append(r.json()["receipt"])

            async def revoke() -> None:
                # The other writer's entries, in its own transactions, between the relay's batches.
                device_id = os.urandom(16)
                await other.append(lambda now: LogEntry(type=EntryType.DEVICE_REVOKED, time=now,
                                                        device_id=device_id, rpps=DERM),
                                   envelope_id=b"D" + device_id)

            await asyncio.gather(*(submit() for _ in range(20)), *(revoke() for _ in range(10)))
            await revoke()
            # The next batch follows another writer's entry: it takes the steps (which
            # reload the tree), and the one after goes in one trip again.
            at_once = tlog.batches_at_once
            await submit()
            await submit()
            assert tlog.batches_at_once == at_once + 1
        finally:
            await other.close()
    finally:
        await storage.close()
    size = await tlog.size()
    indices = [i for (i,) in relay.query("SELECT idx FROM log_leaves ORDER BY idx")]
    assert size == 2 + 22 + 11
    assert indices == list(range(size))
    leaves = [bytes(d) for (d,) in relay.query("SELECT data FROM log_leaves ORDER BY idx")]
    latest = relay.query("SELECT root FROM log_checkpoints WHERE size = ?", (size,))
    assert bytes(latest[0][0]) == merkle.root_from_leaf_hashes([merkle.leaf_hash(x) for x in leaves])
    vk = tlog.verifier
    for rc in receipts:
        leaf = base64.b64decode(rc["leaf"])
        assert leaves[rc["index"]] == leaf
        TlogProof.from_text(rc["proof"]).verify(merkle.leaf_hash(leaf), vk, origin=tlog.origin)
    # A batch's checkpoint, stored with it, is the one its receipts carry.
    for rc in receipts:
        proof = TlogProof.from_text(rc["proof"])
        cp = proof.checkpoint.split("\n")
        assert relay.query("SELECT note FROM log_checkpoints WHERE size = ?", (int(cp[1]),))[0][0] == proof.checkpoint


async def test_receipts_of_one_trip_batches_are_the_protocols(relay: Relay) -> None:
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    puts = [Held(relay, gp, [derm]) for _ in range(5)]
    for p in puts:
        await p.start()
    for p in puts:
        p.release()
    for p in puts:
        rc = (await p.reply()).json()["receipt"]
        proof = TlogProof.from_text(rc["proof"])
        assert rc["proof"] == TlogProof(index=proof.index, proof=proof.proof, checkpoint=proof.checkpoint).to_text()
        assert rc["proof"] == tlog_proof_text(proof.index, proof.proof, proof.checkpoint)
        assert rc["type"] == LogEntry.from_bytes(base64.b64decode(rc["leaf"])).type.name.lower() == "submitted"
    assert relay.app[LOG].batches_at_once > 0


# -- reads on the event loop's thread ------------------------------------------------------------


async def test_a_device_revoked_by_another_process_is_refused_at_once(relay: Relay) -> None:
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    assert (await relay.get(derm.keys, "/v1/inbox")).status == 200
    db = sqlite3.connect(relay.data / "relay.sqlite3", isolation_level=None)
    try:
        db.execute("UPDATE devices SET revoked = ? WHERE device_id = ?", (relay.clock(), derm.device_id))
    finally:
        db.close()
    assert_problem(await relay.get(derm.keys, "/v1/inbox"), 401, "unauthorized")
    put = Held(relay, derm, [gp])
    r = await send_raw(relay.session, "PUT", relay.u(put.path), put.body, headers=put.headers)
    assert_problem(r, 401, "unauthorized")
    # And a recipient revoked that way is refused too.
    put = Held(relay, gp, [derm])
    r = await send_raw(relay.session, "PUT", relay.u(put.path), put.body, headers=put.headers)
    assert_problem(r, 400, "unknown_recipient")


# -- the verifier's thread ---------------------------------------------------------------------------


async def test_verify_header_agrees_with_signed_header_verify(relay: Relay) -> None:
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    _, prefix = make_envelope(gp.keys, [derm.device_id], b"x" * 100, now=relay.clock())
    signed = split_prefix(prefix)
    assert signed is not None
    header = signed[0]
    gp_key, derm_key = gp.keys.public().sign_key, derm.keys.public().sign_key
    import nacl.signing  # noqa: PLC0415

    assert await verify_header(relay.app, header, gp_key) == header.verify(nacl.signing.VerifyKey(gp_key))
    for key in (derm_key,):
        with pytest.raises(SignatureError) as ours:
            await verify_header(relay.app, header, key)
        with pytest.raises(SignatureError) as theirs:
            header.verify(nacl.signing.VerifyKey(key))
        assert str(ours.value) == str(theirs.value)
    # A header that names another sender, signed by gp: refused the same way.
    _, other = make_envelope(gp.keys, [derm.device_id], b"y" * 10, now=relay.clock(), sender_id=derm.device_id)
    split = split_prefix(other)
    assert split is not None
    with pytest.raises(SignatureError) as ours:
        await verify_header(relay.app, split[0], gp_key)
    with pytest.raises(SignatureError) as theirs:
        split[0].verify(nacl.signing.VerifyKey(gp_key))
    assert str(ours.value) == str(theirs.value)
    # Damaged header bytes.
    damaged = type(header)(raw=header.raw[:-1] + bytes([header.raw[-1] ^ 1]), signature=header.signature)
    with pytest.raises((SignatureError, DecodeError)):
        await verify_header(relay.app, damaged, gp_key)


async def test_bad_signatures_are_refused_through_the_verifier(relay: Relay) -> None:
    gp, derm = await relay.enroll(GP), await relay.enroll(DERM)
    put = Held(relay, gp, [derm])
    # The request signed by another device's key under gp's key id.
    forged = sign_headers(derm.keys, "PUT", relay.u(put.path), put.body, created=relay.clock(),
                          keyid=gp.device_id.hex())
    r = await send_raw(relay.session, "PUT", relay.u(put.path), put.body,
                       headers={**forged, "Content-Type": ENVELOPE_TYPE})
    assert_problem(r, 401, "unauthorized")
    # A header signed by derm, sent (and the request signed) by gp.
    ct = os.urandom(100)
    eid, prefix = make_envelope(derm.keys, [derm.device_id], ct, now=relay.clock(), sender_id=gp.device_id)
    r = await relay.put(gp.keys, eid, prefix + ct)
    assert_problem(r, 400, "bad_signature")
    # Many at once, good and bad mixed: each gets its own answer.
    good = [Held(relay, gp, [derm]) for _ in range(10)]
    replies = await asyncio.gather(
        *(send_raw(relay.session, "PUT", relay.u(p.path), p.body, headers=p.headers) for p in good),
        *(relay.put(gp.keys, eid, prefix + ct) for _ in range(5)),
    )
    assert [x.status for x in replies] == [201] * 10 + [400] * 5
    assert relay.envelope_count() == 10
