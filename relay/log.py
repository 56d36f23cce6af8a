"""The relay's transparency log: storage, the group-commit sequencer, proofs.

Every fact worth proving (a device enrolled or revoked, an envelope submitted,
delivered, read, answered) is appended as a leaf (``protocol.logentry``). The
sequencer gathers the appends that arrive within ``window`` seconds into one database
transaction and one signed checkpoint: each submitter gets its leaf index and the
checkpoint at once, and a burst of submissions pays one fsync and one signature.

Storage, in the relay's database:

- ``log_leaves(idx, data, envelope_id, type)``: the leaves;
- ``log_nodes(level, idx, hash)``: every perfect subtree hash, written by the append
  that completes it, so any proof is O(log n) lookups and no append ever rehashes
  old leaves;
- ``log_checkpoints(size, root, note)``: every signed checkpoint. A size, once signed,
  is never signed again with another root: the sequencer refuses (and stops) first.

Writers other than this process (``pli-relay revoke``, other relay nodes on one
PostgreSQL) append through the same class: each batch runs in the storage's sequencer
transaction (exclusive on every engine: ``BEGIN IMMEDIATE`` on SQLite, an advisory lock
on PostgreSQL) and re-reads the tree size inside it, so the in-memory right edge of the
tree can never silently diverge from the database, and the checkpoint of a size is
signed and stored in the very transaction that appends its leaves: a size is never
signed twice, whichever node appends next. Every node serves the latest stored checkpoint.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import structlog

from protocol import merkle, note
from protocol.logentry import EntryType, LogEntry
from relay.errors import PG_RETRYABLE, storage_failure
from relay.storage import NoRelayDataError, Step, Storage, Tx

__all__ = [
    "HIGHWATER", "Appended", "HighWater", "LogIntegrityError", "Skip", "Together", "TransparencyLog", "device_subject",
    "load_log_key", "receipt_json", "tlog_proof_text",
]

log = structlog.get_logger("pli.relay.log")

Action = Callable[[Tx], Awaitable[None]]
_ZERO = bytes(32)
MAX_BATCH = 2048


class LogIntegrityError(RuntimeError):
    """The stored log contradicts itself or a signed checkpoint: the relay must stop."""


class Skip(Exception):
    """Raised by an action: nothing to append (e.g. an acknowledgement given twice)."""


@dataclass(frozen=True)
class Appended:
    index: int
    leaf: bytes
    size: int
    checkpoint: str
    #: the leaf's inclusion proof at ``size``, computed from the batch in memory
    proof: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Together:
    """Writes that many items of a batch make with one statement per table (a burst of
    new envelopes): ``steps(tx, payloads)`` gives them for all the batch's items with the
    same ``steps``; they run with the items' leaves (and, when nothing else is in the
    batch, its nodes and checkpoint) in one ``Tx.run_all``. If that fails, those items
    fall back to their own ``action``, one savepoint each, like every other item: so
    ``action`` must make the same writes for one item."""

    steps: Callable[[Tx, list[Any]], list[Step]]
    payload: Any


@dataclass
class _Pending:
    make: Callable[[int], LogEntry]
    action: Action | None
    envelope_id: bytes | None
    future: asyncio.Future[Appended] = field(repr=False)
    together: Together | None = None


def load_log_key(data: Path, *, create: bool = False) -> nacl.signing.SigningKey:
    """The relay's log key, created on first start (``DATA/log.key``, mode 0600).

    Its public half is the log's identity for ever: keep a copy offline (see the
    runbook); a new key needs a new log origin.

    Raises:
        NoRelayDataError: no key in ``data``, and not ``create`` (only ``serve`` creates one).
    """
    path = data / "log.key"
    if path.exists():
        seed = bytes.fromhex(path.read_text(encoding="ascii").strip())
        return nacl.signing.SigningKey(seed)
    if not create:
        raise NoRelayDataError(f"no relay log key in {data}; wrong --data or --config?")
    key = nacl.signing.SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(bytes(key).hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


async def open_log(
    data: Path, storage: Storage, *, origin: str, clock: Callable[[], int], window: float, create: bool = False
) -> TransparencyLog:
    """The relay's log over ``storage``: key from ``data`` (made if ``create``), origin from
    the setting, else the stored one, else ``pli-relay.invalid/<key id>`` (chosen once, on
    first start); its high-water mark in ``data`` (:class:`HighWater`)."""
    key = load_log_key(data, create=create)
    if not origin:
        origin = await storage.meta("log_origin") or ""
    if not origin:
        origin = "pli-relay.invalid/" + note.key_id("pli-relay", bytes(key.verify_key)).hex()
    tlog = TransparencyLog(storage, key, origin=origin, clock=clock, window=window,
                           highwater=HighWater(data / HIGHWATER))
    await tlog.open()
    return tlog


#: the high-water mark's file name in the data folder
HIGHWATER = "log.highwater"


class HighWater:
    """The latest size and root this data folder's relay signed, kept outside the database
    (``DATA/log.highwater``: ``<size> <root hex>``), fsynced before a receipt is answered.

    A database that goes backwards (restored from an older backup, a failover to a lagging
    replica, a point-in-time recovery) would otherwise be extended under the same key and
    origin: a second, different root for a size already published, that is a fork. Nodes
    sharing the data folder share the mark; nodes with a folder each keep their own.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[int, bytes] | None:
        try:
            size, root = self.path.read_text(encoding="ascii").split()
            return int(size), bytes.fromhex(root)
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise LogIntegrityError(f"{self.path} is not a log high-water mark (<size> <root hex>)") from e

    def write(self, size: int, root: bytes) -> None:
        """Atomically, durably (blocking: run in a thread); never lowers the mark."""
        current = self.read()
        if current is not None and current[0] >= size:
            return
        fd, tmp = tempfile.mkstemp(prefix=".log.highwater-", dir=self.path.parent)
        try:
            os.write(fd, f"{size} {root.hex()}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            Path(tmp).replace(self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class TransparencyLog:
    def __init__(
        self,
        storage: Storage,
        key: nacl.signing.SigningKey,
        *,
        origin: str,
        clock: Callable[[], int],
        window: float,
        highwater: HighWater | None = None,
    ) -> None:
        self.storage = storage
        self.highwater = highwater
        #: the largest size (and its root) this process or its data folder knows was signed
        self._signed: tuple[int, bytes] = (0, b"")
        self.origin = origin
        self.signer = note.Signer(origin, key)
        self.verifier = self.signer.verifier
        self._clock = clock
        self._window = window
        self._range = merkle.CompactRange()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._failed: LogIntegrityError | None = None
        self.batches = 0
        #: of those, how many went to the database in one trip (:meth:`_commit_at_once`); the
        #: others went step by step (another writer appended, an item was refused, PostgreSQL)
        self.batches_at_once = 0
        #: the last batch's answering (its high-water mark, then its receipts), which
        #: overlaps the next batch's transaction until its commit; each waits for the one before
        self._publishing: asyncio.Task[None] | None = None

    # -- start and stop ------------------------------------------------------------------

    async def open(self) -> None:
        """Check the identity and the stored tree, and sign the empty tree on first start.

        Raises:
            LogIntegrityError: another origin or key than the stored ones, or a stored
                tree whose root is not its last signed checkpoint's.
        """
        for key, value in (("log_origin", self.origin), ("log_vkey", self.verifier.vkey)):
            # Set once, by whichever node starts first; every later start must agree.
            stored = await self.storage.init_meta(key, value)
            if stored != value:
                raise LogIntegrityError(
                    f"this relay's log has {key} {stored!r}, not {value!r}: a log's origin and key "
                    "never change (start a new log, with a new origin, in a new data folder)"
                )
        mark = self.highwater.read() if self.highwater is not None else None
        if mark is not None:
            self._signed = mark
        async with self.storage.sequencer_transaction() as tx:
            await self._reload(tx)
            if mark is not None:
                row = await tx.fetchone("SELECT root FROM log_checkpoints WHERE size = ?", (mark[0],))
                if row is None or bytes(row[0]) != mark[1]:
                    raise LogIntegrityError(
                        f"the database's log does not hold the checkpoint of size {mark[0]} this relay "
                        f"signed ({self.highwater.path if self.highwater else ''}): it is another log, "
                        "or a fork; start a new log (a new log_origin, in a new data folder)")
            if self._range.size == 0 and await tx.fetchone("SELECT 1 FROM log_checkpoints WHERE size = 0") is None:
                await self._store_checkpoint(tx, self._range)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # A sequencer stopped by a LogIntegrityError has already reported it.
            with contextlib.suppress(asyncio.CancelledError, LogIntegrityError):
                await self._task
            self._task = None
        if self._publishing is not None:
            await self._publishing  # committed batches get their answers

    # -- appending -----------------------------------------------------------------------

    async def append(
        self,
        make: Callable[[int], LogEntry],
        action: Action | None = None,
        *,
        envelope_id: bytes | None = None,
        together: Together | None = None,
    ) -> Appended:
        """Run ``action``, then append the entry ``make(now)``, in one transaction.

        ``action`` writes whatever else must be true exactly when the leaf exists (an
        envelope marked stored, a delivery marked acknowledged). If it raises, nothing
        of this item is kept and the error comes back to the caller; the other items of
        the batch are unaffected.

        Raises:
            LogIntegrityError: the sequencer has stopped on an integrity failure.
        """
        if self._failed is not None:
            raise self._failed
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(make, action, envelope_id, future, together))
        return await future

    async def _next_batch(self) -> list[_Pending]:
        first = await self._queue.get()
        if self._window > 0:
            await asyncio.sleep(self._window)
        batch = [first]
        while not self._queue.empty() and len(batch) < MAX_BATCH:
            batch.append(self._queue.get_nowait())
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if self._failed is not None:  # the answering of an earlier batch found the mark unsound
                self._stop(batch, self._failed)
                raise self._failed
            try:
                try:
                    if not await self._commit_at_once(batch):
                        await self._commit(batch)
                except Exception as e:
                    if getattr(e, "sqlstate", None) not in PG_RETRYABLE:
                        raise
                    # A deadlock or serialization failure rolled the whole batch back: once more.
                    log.warning("log_batch_retried", sqlstate=getattr(e, "sqlstate", None))
                    await self._commit([p for p in batch if not p.future.done()])
            except LogIntegrityError as e:
                self._stop(batch, e)
                raise
            except Exception as e:
                log.exception("log_batch_failed", items=len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)

    def _stop(self, batch: list[_Pending], e: LogIntegrityError) -> None:
        """Stop for good: this batch, whatever is queued behind it and every later append are refused."""
        log.critical("log_integrity_failure", error=str(e))
        self._failed = e
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        for p in batch:
            if not p.future.done():
                p.future.set_exception(e)

    async def _commit_at_once(self, batch: list[_Pending]) -> bool:
        """The usual batch (new envelopes only, written together) in one trip to the
        database (``Storage.sequencer_batch``): its statements, its checkpoint, the commit
        and the high-water mark, then the answers. False, with nothing written, when
        anything is out of the ordinary: another writer appended, an item is refused, the
        engine has no such trip (PostgreSQL); :meth:`_commit` then does it step by step
        (and refuses what it must)."""
        if not self.storage.one_trip_batches or any(p.together is None for p in batch):
            return False
        if self._publishing is not None:
            await self._publishing  # the mark of a batch before, first (it never goes down)
        if self._failed is not None:
            raise self._failed
        before = self._range
        rng = before.copy()
        done: list[tuple[_Pending, int, bytes]] = []
        leaves: list[tuple[int, bytes, bytes | None, int]] = []
        nodes: list[tuple[int, int, bytes]] = []
        groups = self._together(batch)
        try:
            self._leaves(batch, rng, self._clock(), done, leaves, nodes)
        except Exception:  # an item's own error: refused alone, by _commit
            return False
        root = rng.root()
        checkpoint = note.sign_checkpoint(note.Checkpoint(self.origin, rng.size, root), self.signer)

        def build(tx: Tx) -> list[Step]:
            steps: list[Step] = []
            for items in groups:
                together = items[0].together
                assert together is not None
                steps += together.steps(tx, [p.together.payload for p in items if p.together is not None])
            return [
                *steps,
                ("INSERT INTO log_leaves (idx, data, envelope_id, type) VALUES (?, ?, ?, ?)", leaves),
                ("INSERT INTO log_nodes (level, idx, hash) VALUES (?, ?, ?)", nodes),
                ("INSERT INTO log_checkpoints (size, root, note, created) VALUES (?, ?, ?, ?)",
                 [(rng.size, root, checkpoint, self._clock())]),
            ]

        mark = self.highwater
        then = (lambda: mark.write(rng.size, root)) if mark is not None and rng.size > self._signed[0] else None
        try:
            committed, mark_error = await self.storage.sequencer_batch((before.size, before.root()), build, then)
        except Exception as e:
            if storage_failure(e) is not None:
                raise  # the disk: the whole batch fails (503 for each)
            log.info("log_together_refused", items=len(batch), error=str(e))
            return False
        if not committed:
            return False  # another writer appended: _commit reloads the tree first
        self._range = rng
        self.batches += 1
        self.batches_at_once += 1
        self._answer(before, rng, nodes, done, checkpoint, mark_error)
        return True

    @staticmethod
    def _leaves(batch: list[_Pending], rng: merkle.CompactRange, now: int, done: list[tuple[_Pending, int, bytes]],
                leaves: list[tuple[int, bytes, bytes | None, int]], nodes: list[tuple[int, int, bytes]]) -> None:
        """Make the batch's entries and append them to ``rng``: what was appended (``done``),
        the rows of ``log_leaves`` and the nodes they complete."""
        for p in batch:
            entry = p.make(now)
            leaf = entry.to_bytes()
            leaves.append((rng.size, leaf, p.envelope_id, int(entry.type)))
            done.append((p, rng.size, leaf))
            nodes += [(n.level, n.index, n.hash) for n in rng.append(merkle.leaf_hash(leaf))]

    def _answer(self, before: merkle.CompactRange, rng: merkle.CompactRange, nodes: list[tuple[int, int, bytes]],
                done: list[tuple[_Pending, int, bytes]], checkpoint: str, mark_error: Exception | None) -> None:
        """Answer a batch :meth:`_commit_at_once` committed, as :meth:`_publish` does."""
        mark = self.highwater
        root = rng.root()
        if mark_error is not None and not isinstance(mark_error, OSError):
            # A mark that is not one: an error for each, as any batch failure (see _publish).
            log.error("highwater_write_failed", path=str(mark.path if mark else ""), size=rng.size,
                      exc_info=mark_error)
            if isinstance(mark_error, LogIntegrityError):
                self._failed = mark_error
            for p, _, _ in done:
                if not p.future.done():
                    p.future.set_exception(mark_error)
            return
        if mark_error is not None:
            # Committed: its submitters get their receipts; the next batch raises the mark.
            log.error("highwater_write_failed", path=str(mark.path if mark else ""), size=rng.size,
                      exc_info=mark_error)
        self._signed = max(self._signed, (rng.size, root))
        proofs = _batch_proofs(before, nodes, rng.size, [index for _, index, _ in done])
        for (p, index, leaf), proof in zip(done, proofs, strict=True):
            if not p.future.done():  # a caller that went away still has its leaf logged
                p.future.set_result(Appended(index=index, leaf=leaf, size=rng.size, checkpoint=checkpoint,
                                             proof=proof))

    async def _commit(self, batch: list[_Pending]) -> None:
        done: list[tuple[_Pending, int, bytes]] = []
        refused: list[tuple[_Pending, Exception]] = []
        try:
            async with self.storage.sequencer_transaction() as tx:
                await self._reload(tx)
                rng = self._range.copy()
                now = self._clock()
                nodes: list[tuple[int, int, bytes]] = []  # every node the batch completes
                stored = 0  # how many of them are written already
                checkpoint = None
                alone = [p for p in batch if p.together is None]
                groups = self._together(batch)
                for i, items in enumerate(groups):
                    last = not alone and i == len(groups) - 1
                    written = await self._write_together(tx, items, rng, now, nodes, sign=last)
                    if written is None:
                        alone += items  # refused together: one by one, below
                        continue
                    rng, checkpoint = written[0], written[1]
                    done += written[2]
                    stored = len(nodes)
                for p in alone:
                    nodes += await self._write_one(tx, p, rng, now, done, refused)
                if not done:
                    return
                if checkpoint is None or stored < len(nodes):
                    await tx.executemany("INSERT INTO log_nodes (level, idx, hash) VALUES (?, ?, ?)", nodes[stored:])
                    checkpoint = await self._store_checkpoint(tx, rng)
                assert checkpoint is not None
                proofs = _batch_proofs(self._range, nodes, rng.size, [index for _, index, _ in done])
                # Committed only once the batch before has its mark: were the mark found
                # unsound meanwhile, nothing more is signed (this batch rolls back).
                if self._publishing is not None:
                    await self._publishing
                if self._failed is not None:
                    raise self._failed
        finally:
            # Only once the transaction is over: a refused caller (Skip) goes on to read its
            # existing receipt through the same connection, and must not see this batch
            # half done. A caller that went away (cancelled future) is skipped.
            for p, error in refused:
                if not p.future.done():
                    p.future.set_exception(error)
        self._range = rng
        self.batches += 1
        self._publishing = asyncio.create_task(self._publish(self._publishing, done, rng, checkpoint, proofs))

    @staticmethod
    async def _write_one(
        tx: Tx, p: _Pending, rng: merkle.CompactRange, now: int, done: list[tuple[_Pending, int, bytes]],
        refused: list[tuple[_Pending, Exception]],
    ) -> list[tuple[int, int, bytes]]:
        """Run ``p``'s action and write its leaf, under a savepoint: a refusal undoes only it."""
        await tx.execute("SAVEPOINT item")
        try:
            # The action first: it may learn what the entry records (an invitation's RPPS)
            # or find there is nothing to record (Skip).
            if p.action is not None:
                await p.action(tx)
            entry = p.make(now)
            leaf = entry.to_bytes()
        except BaseException as e:
            if storage_failure(e) is not None:
                raise  # the disk, not this item: the whole batch fails (503 for each)
            await tx.execute("ROLLBACK TO item")
            await tx.execute("RELEASE item")
            if isinstance(e, Exception):
                refused.append((p, e))
                return []
            raise
        index = rng.size
        # Inserted now, not after the loop: a later item's action in this same batch must
        # see it (an act logged twice in one batch is logged once).
        await tx.execute(
            "INSERT INTO log_leaves (idx, data, envelope_id, type) VALUES (?, ?, ?, ?)",
            (index, leaf, p.envelope_id, int(entry.type)),
        )
        await tx.execute("RELEASE item")
        done.append((p, index, leaf))
        return [(n.level, n.index, n.hash) for n in rng.append(merkle.leaf_hash(leaf))]

    @staticmethod
    def _together(batch: list[_Pending]) -> list[list[_Pending]]:
        groups: dict[object, list[_Pending]] = {}
        for p in batch:
            if p.together is not None:
                groups.setdefault(p.together.steps, []).append(p)
        return list(groups.values())

    async def _write_together(
        self, tx: Tx, items: list[_Pending], rng: merkle.CompactRange, now: int,
        nodes: list[tuple[int, int, bytes]], *, sign: bool,
    ) -> tuple[merkle.CompactRange, str | None, list[tuple[_Pending, int, bytes]]] | None:
        """Write ``items`` (one ``Together.steps``), their leaves and the nodes they
        complete in one ``run_all``, with the batch's checkpoint too if ``sign`` (nothing
        follows them). Returns the grown range, the checkpoint and what was appended; None
        (nothing of them written) if the database refused them."""
        grown = rng.copy()
        added: list[tuple[_Pending, int, bytes]] = []
        leaves: list[tuple[int, bytes, bytes | None, int]] = []
        new: list[tuple[int, int, bytes]] = []
        try:
            self._leaves(items, grown, now, added, leaves, new)
            assert items[0].together is not None
            steps = items[0].together.steps(tx, [p.together.payload for p in items if p.together is not None])
        except Exception as e:  # one item's own error: each goes alone, and that one is refused
            log.info("log_together_refused", items=len(items), error=str(e))
            return None
        steps += [
            ("INSERT INTO log_leaves (idx, data, envelope_id, type) VALUES (?, ?, ?, ?)", leaves),
            ("INSERT INTO log_nodes (level, idx, hash) VALUES (?, ?, ?)", new),
        ]
        checkpoint = None
        if sign:
            # No other writer since _reload (the sequencer's transaction is exclusive) and
            # sizes only grow: no checkpoint of this size can exist. Were one there, the
            # insert fails, and _store_checkpoint, after the fallback, refuses to sign.
            checkpoint = note.sign_checkpoint(note.Checkpoint(self.origin, grown.size, grown.root()), self.signer)
            steps.append(("INSERT INTO log_checkpoints (size, root, note, created) VALUES (?, ?, ?, ?)",
                          [(grown.size, grown.root(), checkpoint, self._clock())]))
        try:
            await tx.run_all(steps, savepoint="together")
        except Exception as e:
            if storage_failure(e) is not None:
                raise
            log.info("log_together_refused", items=len(items), error=str(e))
            return None
        nodes += new
        return grown, checkpoint, added

    async def _publish(self, before: asyncio.Task[None] | None, done: list[tuple[_Pending, int, bytes]],
                       rng: merkle.CompactRange, checkpoint: str, proofs: list[tuple[bytes, ...]]) -> None:
        """Raise the high-water mark (durably), then answer the batch's submitters; after
        the batch ``before`` did (the mark never goes down), while the sequencer goes on
        with the next batch (a mark behind the database is harmless: it only guards
        against a database behind the mark)."""
        if before is not None:
            await before  # never raises: every failure is answered below
        if self.highwater is not None and rng.size > self._signed[0]:
            try:
                await asyncio.to_thread(self.highwater.write, rng.size, rng.root())
            except OSError:
                # The batch is committed: its submitters get their receipts (a refusal here
                # would undo a logged upload). The mark is a guard against a database going
                # backwards; the next batch raises it, and the operator is told now.
                log.exception("highwater_write_failed", path=str(self.highwater.path), size=rng.size)
            except Exception as e:  # a mark that is not one: an error for each, as any batch failure
                log.exception("highwater_write_failed", path=str(self.highwater.path), size=rng.size)
                if isinstance(e, LogIntegrityError):
                    self._failed = e  # every later append is refused, as after any integrity failure
                for p, _, _ in done:
                    if not p.future.done():
                        p.future.set_exception(e)
                return
        self._signed = max(self._signed, (rng.size, rng.root()))
        for (p, index, leaf), proof in zip(done, proofs, strict=True):
            if not p.future.done():  # a caller that went away still has its leaf logged
                p.future.set_result(Appended(index=index, leaf=leaf, size=rng.size, checkpoint=checkpoint,
                                             proof=proof))

    async def _store_checkpoint(self, tx: Tx, rng: merkle.CompactRange) -> str:
        root = rng.root()
        row = await tx.fetchone("SELECT root FROM log_checkpoints WHERE size = ?", (rng.size,))
        if row is not None and row[0] != root:
            raise LogIntegrityError(
                f"refusing to sign a second, different root for tree size {rng.size}"
            )
        text = note.sign_checkpoint(note.Checkpoint(self.origin, rng.size, root), self.signer)
        if row is None:
            await tx.execute(
                "INSERT INTO log_checkpoints (size, root, note, created) VALUES (?, ?, ?, ?)",
                (rng.size, root, text, self._clock()),
            )
        return text

    async def _reload(self, tx: Tx) -> None:
        """Bring the in-memory right edge in line with the database (another writer may have appended)."""
        row = await tx.fetchone("SELECT size, root FROM log_checkpoints ORDER BY size DESC LIMIT 1")
        size = int(row[0]) if row else 0
        if size == self._range.size and (size == 0 or self._range.hashes):
            self._refuse_going_back(size)
            if row is not None and bytes(row[1]) != self._range.root():
                raise LogIntegrityError(f"the database's checkpoint of size {size} is not the one this relay signed")
            return
        need = merkle.perfect_subtrees(0, size) if size else []
        found = await self._nodes(tx, set(need))
        rng = merkle.CompactRange.from_store(size, lambda level, idx: found[(level, idx)])
        row = await tx.fetchone("SELECT root FROM log_checkpoints WHERE size = ?", (size,))
        if row is not None and row[0] != rng.root():
            raise LogIntegrityError(f"the stored tree of size {size} does not match its signed checkpoint")
        row = await tx.fetchone("SELECT MAX(idx) FROM log_leaves")  # one index lookup
        leaves = 0 if row is None or row[0] is None else int(row[0]) + 1
        if leaves != size:
            raise LogIntegrityError(
                f"the database holds {leaves} log leaves (by index), but the last signed "
                f"checkpoint is of size {size}: refusing to sign that size again"
            )
        self._refuse_going_back(size)
        self._range = rng

    def _refuse_going_back(self, size: int) -> None:
        """Sizes only move forward: signing on from a database that went back would sign
        a second root for a size already published (a fork)."""
        signed = max(self._signed[0], self._range.size)
        if size < signed:
            raise LogIntegrityError(
                f"the database's log went back to size {size}, below the size {signed} this relay already "
                "signed (a restore of an older backup, or a failover to a lagging replica): bring back the "
                "newer database, or start a new log (a new log_origin, in a new data folder)")

    # -- reading and proving ---------------------------------------------------------------

    async def _nodes(self, tx: Tx | None, need: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        found = await self.storage.log_nodes(need, tx)
        missing = need - found.keys()
        if missing:
            raise LogIntegrityError(f"log nodes missing from storage: {sorted(missing)[:4]}")
        return found

    async def _prove(self, prover: Callable[[merkle.SubtreeHashFn], list[bytes]]) -> list[bytes]:
        # Two passes: the first learns which perfect subtrees the proof needs (their
        # values do not change which ones), one query fetches them, the second computes.
        need: set[tuple[int, int]] = set()

        def record(level: int, idx: int) -> bytes:
            need.add((level, idx))
            return _ZERO

        prover(merkle.range_hasher(record))
        found = await self._nodes(None, need)
        return prover(merkle.range_hasher(lambda level, idx: found[(level, idx)]))

    async def size(self) -> int:
        row = await self.storage.read_one("SELECT MAX(size) FROM log_checkpoints")
        return int(row[0]) if row and row[0] is not None else 0

    async def checkpoint(self, size: int | None = None) -> tuple[int, str]:
        """The signed checkpoint of ``size`` (the latest when None)."""
        if size is None:
            row = await self.storage.read_one("SELECT size, note FROM log_checkpoints ORDER BY size DESC LIMIT 1")
        else:
            row = await self.storage.read_one("SELECT size, note FROM log_checkpoints WHERE size = ?", (size,))
        if row is None:
            raise KeyError(size)
        return int(row[0]), str(row[1])

    async def inclusion(self, index: int, size: int) -> list[bytes]:
        return await self._prove(lambda get: merkle.inclusion_proof(index, size, get))

    async def consistency(self, first: int, second: int) -> list[bytes]:
        return await self._prove(lambda get: merkle.consistency_proof(first, second, get))

    async def tlog_proof(self, index: int, *, size: int | None = None, checkpoint: str | None = None) -> str:
        """A c2sp.org/tlog-proof for leaf ``index`` (against the latest checkpoint by default)."""
        if size is None or checkpoint is None:
            size, checkpoint = await self.checkpoint()
        proof = await self.inclusion(index, size)
        return note.TlogProof(index=index, proof=tuple(proof), checkpoint=checkpoint).to_text()

    def receipt(self, appended: Appended) -> dict[str, object]:
        """What a client keeps: the leaf and its proof against the batch's own checkpoint.

        The same as :func:`receipt_json` of a ``note.TlogProof``, without checking again what
        this relay just made (its leaf, its proof, the checkpoint it signed): every
        submission's answer carries one."""
        leaf = appended.leaf
        return {
            "type": _ENTRY_NAMES[leaf[1]],
            "index": appended.index,
            "leaf": base64.b64encode(leaf).decode(),
            "proof": tlog_proof_text(appended.index, appended.proof, appended.checkpoint),
        }


    async def entries(self, start: int, end: int) -> list[bytes]:
        rows = await self.storage.read_all(
            "SELECT data FROM log_leaves WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
        )
        return [bytes(r[0]) for r in rows]

    async def device_leaves(self, device_id: bytes) -> list[tuple[int, bytes]]:
        """The enrolment and revocation leaves of a device.

        They are indexed under :func:`device_subject` (17 bytes), so no client-chosen
        envelope id (16 bytes) can ever mix its leaves with a device's.
        """
        return await self.leaves_of(device_subject(device_id))

    async def leaves_of(self, envelope_id: bytes) -> list[tuple[int, bytes]]:
        # Only leaves under a signed checkpoint (no proof exists for others).
        rows = await self.storage.read_all(
            "SELECT idx, data FROM log_leaves WHERE envelope_id = ?"
            " AND idx < (SELECT COALESCE(MAX(size), 0) FROM log_checkpoints) ORDER BY idx",
            (envelope_id,),
        )
        return [(int(r[0]), bytes(r[1])) for r in rows]


def _batch_proofs(
    before: merkle.CompactRange, nodes: list[tuple[int, int, bytes]], size: int, indices: list[int]
) -> list[tuple[bytes, ...]]:
    """The inclusion proofs, at ``size``, of leaves a batch appended to the tree ``before``.

    No lookup needed: a proof of a new leaf is made of subtrees that either hold a new
    leaf (each a perfect subtree the batch completed, in ``nodes``, or a fold of them)
    or lie wholly before the batch, and then each is one of ``before``'s right-edge
    subtrees (the tiling of [0, before.size) takes, at a subtree's start, the largest
    aligned width that fits, and the subtree's parent does not fit).
    """
    known = {(level, idx): h for (level, idx), h in zip(
        merkle.perfect_subtrees(0, before.size) if before.size else [], before.hashes, strict=True)}
    known.update(((level, idx), h) for level, idx, h in nodes)
    fold = merkle.range_hasher(lambda level, idx: known[(level, idx)])
    seen: dict[tuple[int, int], bytes] = {}

    def get(start: int, end: int) -> bytes:
        # The batch's proofs share most of their subtrees: each is folded once.
        h = seen.get((start, end))
        if h is None:
            h = seen[(start, end)] = fold(start, end)
        return h

    return [tuple(merkle.inclusion_proof(index, size, get)) for index in indices]


_ENTRY_NAMES = {int(t): t.name.lower() for t in EntryType}


def tlog_proof_text(index: int, proof: tuple[bytes, ...], checkpoint: str) -> str:
    """``note.TlogProof(index, proof, checkpoint).to_text()`` (no ``extra``), for values this
    relay made itself: nothing to check, only to write."""
    b64 = base64.b64encode
    return "".join([f"{note.TLOG_PROOF_HEADER}\nindex {index}\n",
                    *[b64(h).decode("ascii") + "\n" for h in proof], "\n", checkpoint])


def device_subject(device_id: bytes) -> bytes:
    """The index key of a device's leaves in ``log_leaves.envelope_id``."""
    return b"D" + device_id


def receipt_json(index: int, leaf: bytes, proof: str) -> dict[str, object]:
    """A receipt as the relay hands it out: the leaf, its type, its index and a tlog-proof."""
    entry = LogEntry.from_bytes(leaf)
    return {
        "type": entry.type.name.lower(),
        "index": index,
        "leaf": base64.b64encode(leaf).decode(),
        "proof": proof,
    }
