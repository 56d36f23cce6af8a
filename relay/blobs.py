"""Ciphertext blobs: one interface, two stores, chosen by the ``blob_store`` setting.

A blob holds the whole envelope (prefix then ciphertext), so a download is one stream
with range support. An upload, in one or several requests, writes bytes at absolute
offsets into its envelope's *part* through an :class:`Upload`; between requests the part
is made durable (:meth:`Upload.sync`), and a complete, hash-checked one is made durable
as the envelope's blob (:meth:`Upload.commit`) before its receipt is given. A failed
request puts the part back to what the envelope's row says it holds (:meth:`BlobStore.truncate`),
a failed log batch turns the blob back into a part (:meth:`BlobStore.uncommit`), so an
upload stays resumable; the startup sweep removes what no envelope owns.

- :class:`FsBlobStore` (``fs``, the default): files in the data folder. Uploads grow
  ``incoming/<id>.part``; only a complete upload is renamed to ``<aa>/<id>``, after an
  fsync of the file and of its folder, so a crash never leaves a half-written blob under
  a final name. Several nodes share it through a mounted volume.
- ``relay._pgblobs.PgBlobStore`` (``postgresql``): chunks of at most 1 MiB in the
  relay's PostgreSQL database, so the database is the one thing to back up and replicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from aiohttp import web

from relay.errors import storage_failure

if TYPE_CHECKING:
    from relay.config import RelayConfig
    from relay.storage import Storage

__all__ = ["BlobStore", "FsBlobStore", "Upload", "open_blobs", "range_bounds"]


def range_bounds(request: web.Request, size: int) -> tuple[int, int, bool]:
    """``(start, stop, partial)`` of the bytes a request's ``Range`` asks of ``size``
    (checked by the route already: ``bytes=a-``, ``a-b`` or ``-n``); the whole if none."""
    if "Range" not in request.headers:
        return 0, size, False
    rng = request.http_range
    if rng.start is not None and rng.start < 0 and rng.stop is None:
        return max(0, size + rng.start), size, True
    if rng.start is not None:
        return rng.start, min(rng.stop if rng.stop is not None else size, size), True
    return 0, size, True


class Upload(ABC):
    """One request's writes into an envelope's part (offsets count from the prefix's first byte)."""

    @abstractmethod
    async def write(self, offset: int, data: bytes | memoryview) -> None: ...

    @abstractmethod
    async def sync(self) -> None:
        """Make what was written durable, as a part (between the requests of an upload)."""

    @abstractmethod
    async def commit(self) -> None:
        """Make the complete part durable as the envelope's blob (before its receipt)."""

    @abstractmethod
    async def close(self) -> None: ...


class BlobStore(ABC):
    """Where ciphertext lives. Errors of a full or unwritable store are raised as
    ``503 storage_unavailable`` (relay.errors.storage_failure)."""

    name: ClassVar[str]

    @abstractmethod
    async def has_part(self, envelope_id: bytes) -> bool:
        """Whether an upload in progress has bytes here."""

    @abstractmethod
    async def open_upload(self, envelope_id: bytes, prefix: bytes, *, new: bool) -> Upload:
        """Continue an upload's part, or (``new``) start it over from ``prefix``."""

    @abstractmethod
    async def part_sha256(self, envelope_id: bytes, skip: int) -> bytes:
        """SHA-256 of a part's bytes after the first ``skip`` (the ciphertext, past the prefix)."""

    @abstractmethod
    async def truncate(self, envelope_id: bytes, length: int) -> None:
        """Cut a part back to ``length`` bytes (what its envelope's row says it holds)."""

    @abstractmethod
    async def uncommit(self, envelope_id: bytes) -> None:
        """Put a committed blob back as its upload's part (its log batch failed)."""

    @abstractmethod
    async def delete(self, envelope_id: bytes) -> None:
        """Remove an envelope's blob and part, if any."""

    @abstractmethod
    async def size(self, envelope_id: bytes) -> int | None:
        """The committed blob's size in bytes; None if there is none. (A store where the
        envelope's row alone tells a blob from a part answers for either.)"""

    @abstractmethod
    async def response(self, request: web.Request, envelope_id: bytes, content_type: str) -> web.StreamResponse:
        """The blob as the answer to ``request`` (whole, or the part its ``Range`` asks for)."""

    @abstractmethod
    async def sweep(self, storage: Storage, *, grace: float) -> list[str]:
        """Remove what no envelope owns (left by a crash); returns what went. Anything
        written less than ``grace`` seconds ago stays (another node may be writing it)."""

    @abstractmethod
    async def probe(self) -> None:
        """Raise unless the store takes a write now (for ``/readyz``)."""


def open_blobs(cfg: RelayConfig, storage: Storage) -> BlobStore:
    """The blob store ``cfg`` names (``postgresql`` keeps blobs in ``storage``)."""
    if cfg.blob_store == "postgresql":
        from relay._pgblobs import PgBlobStore  # noqa: PLC0415 - asyncpg only when asked for

        return PgBlobStore(storage)
    return FsBlobStore(cfg.data / "blobs")


# -- on the file system ---------------------------------------------------------------------------


#: a long upload has its written bytes sent to the disk every this many bytes, in a thread,
#: while more arrive: its last fsync (before the receipt) then waits for little
_WRITE_BEHIND = 64 << 20


class _FsUpload(Upload):
    """Writes into the page cache as bytes arrive (a thread per write was measured no
    faster here); one fsync in flight at most, behind the writes."""

    def __init__(self, store: FsBlobStore, envelope_id: bytes, fd: int) -> None:
        self._store = store
        self._id = envelope_id
        self._fd = fd
        self._unsynced = 0
        self._behind: asyncio.Future[None] | None = None

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        # Into the page cache: made durable by sync() or commit(), in a thread.
        _pwrite(self._fd, offset, data)
        self._unsynced += len(data)
        if self._unsynced >= _WRITE_BEHIND and (self._behind is None or self._behind.done()):
            if self._behind is not None:
                self._behind.result()  # a failed write-behind fails the request
            self._unsynced = 0
            self._behind = asyncio.ensure_future(asyncio.to_thread(_fsync, self._fd))

    async def _caught_up(self) -> None:
        if self._behind is not None:
            # Shielded: a cancelled request leaves the thread's fsync to finish; close() waits.
            await asyncio.shield(self._behind)
            self._behind = None

    async def sync(self) -> None:
        await self._caught_up()
        await asyncio.to_thread(_fsync, self._fd)

    async def commit(self) -> None:
        await self._caught_up()
        await asyncio.to_thread(self._store.commit, self._id, self._fd)

    async def close(self) -> None:
        behind, self._behind = self._behind, None
        if behind is None or behind.done():
            if behind is not None and not behind.cancelled():
                behind.exception()  # seen: the request failed or ended for its own reason
            os.close(self._fd)
            return
        fd = self._fd

        def closed(f: asyncio.Future[None]) -> None:  # never while a thread still syncs it
            if not f.cancelled():
                f.exception()
            os.close(fd)

        behind.add_done_callback(closed)


class FsBlobStore(BlobStore):
    name = "fs"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def final_path(self, envelope_id: bytes) -> Path:
        h = envelope_id.hex()
        return self.root / h[:2] / h

    def part_path(self, envelope_id: bytes) -> Path:
        return self.incoming / (envelope_id.hex() + ".part")

    async def has_part(self, envelope_id: bytes) -> bool:
        return self.part_path(envelope_id).exists()

    async def open_upload(self, envelope_id: bytes, prefix: bytes, *, new: bool) -> Upload:
        path = self.part_path(envelope_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if new else os.open(path, os.O_WRONLY)
        except OSError as e:
            raise _storage_error(e) from e
        if new:
            try:
                _pwrite(fd, 0, prefix)
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)  # a new part that cannot take its prefix leaves nothing
                raise
        return _FsUpload(self, envelope_id, fd)

    async def part_sha256(self, envelope_id: bytes, skip: int) -> bytes:
        return await asyncio.to_thread(_file_sha256, self.part_path(envelope_id), skip)

    async def truncate(self, envelope_id: bytes, length: int) -> None:
        # Shrinking a file never needs space: this works on a full disk too.
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.part_path(envelope_id), length)

    async def uncommit(self, envelope_id: bytes) -> None:
        # If even the rename back fails, the blob goes and the upload restarts from 0.
        try:
            self.final_path(envelope_id).replace(self.part_path(envelope_id))
        except OSError:
            self.final_path(envelope_id).unlink(missing_ok=True)

    def commit(self, envelope_id: bytes, fd: int) -> None:
        """Make a complete part durable under its final name (blocking: run in a thread)."""
        final = self.final_path(envelope_id)
        try:
            os.fsync(fd)
            created = not final.parent.exists()
            final.parent.mkdir(exist_ok=True)
            self.part_path(envelope_id).replace(final)
            # A new <aa>/ folder must itself survive a power cut: fsync its parent too.
            folders = (final.parent, self.incoming, *((self.root,) if created else ()))
            for folder in folders:
                dfd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise _storage_error(e) from e

    async def delete(self, envelope_id: bytes) -> None:
        for path in (self.final_path(envelope_id), self.part_path(envelope_id)):
            path.unlink(missing_ok=True)

    async def size(self, envelope_id: bytes) -> int | None:
        try:
            return self.final_path(envelope_id).stat().st_size
        except FileNotFoundError:
            return None

    async def response(
        self, request: web.Request, envelope_id: bytes, content_type: str  # noqa: ARG002 - read when prepared
    ) -> web.StreamResponse:
        # sendfile, with Range (and If-Range) as aiohttp serves files.
        return web.FileResponse(self.final_path(envelope_id), headers={"Content-Type": content_type})

    async def sweep(self, storage: Storage, *, grace: float) -> list[str]:
        stored = await storage.envelope_ids("stored")
        uploading = await storage.envelope_ids("uploading")
        return await asyncio.to_thread(self.sweep_files, stored=stored, uploading=uploading, grace=grace)

    def sweep_files(self, *, stored: set[bytes], uploading: set[bytes], grace: float = 0) -> list[str]:
        """:meth:`sweep` over the files: a blob under its final name belongs to a stored
        envelope, a part file to an upload in progress. A crash after an upload's last
        request renamed its part into place but before its log batch committed leaves a
        final blob whose row is still uploading: it goes too (the upload resumes from the
        row, from 0 as its part is gone)."""
        removed = []
        recent = time.time() - grace
        for path in self.root.glob("*/*"):
            part = path.parent == self.incoming
            try:
                eid = bytes.fromhex(path.name.removesuffix(".part") if part else path.name)
            except ValueError:
                continue
            if eid not in (uploading if part else stored):
                with contextlib.suppress(FileNotFoundError):
                    if grace and path.stat().st_mtime > recent:
                        continue
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    async def probe(self) -> None:
        await asyncio.to_thread(_probe_folder, self.root)


def _pwrite(fd: int, offset: int, data: bytes | memoryview) -> None:
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as e:
        raise _storage_error(e) from e


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise _storage_error(e) from e


def _file_sha256(path: Path, skip: int) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(skip)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def _probe_folder(folder: Path) -> None:
    # Written, fsynced and removed: the folder takes a file now (space, permissions, mount).
    fd, name = tempfile.mkstemp(prefix=".readyz-", dir=folder)
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        Path(name).unlink()


def _storage_error(e: OSError) -> Exception:
    """A full or unwritable disk as ``503 storage_unavailable``; anything else as it is."""
    return storage_failure(e) or e
