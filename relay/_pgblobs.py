"""Ciphertext in PostgreSQL (``blob_store = "postgresql"``): the table ``blob_chunks``.

A blob is its rows ``(envelope_id, pos, data, written)`` in ``pos`` order, each holding
the bytes from offset ``pos`` (at most :data:`CHUNK` of them), with no gap and no
overlap. An upload buffers at most one chunk in memory and inserts each full chunk as it
fills (one short transaction each); :meth:`Upload.sync` and :meth:`Upload.commit` insert
what is left, so every byte of a request is committed (durable) before the answer, and
a complete envelope's before its receipt's log batch. There is no part and no final
name: the envelope's row (``uploading`` or ``stored``, changed in the log batch) says
which the chunks are, so a failed batch leaves them as the part of a resumable upload.
A write at an offset below the part's end (a retry, or bytes past what the row holds
after a failure) first cuts the part back there. Downloads read one chunk at a time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator

from aiohttp import web

from relay.blobs import BlobStore, Upload, range_bounds
from relay.errors import RelayError
from relay.storage import Storage

__all__ = ["CHUNK", "PgBlobStore"]

#: the largest chunk row, bytes
CHUNK = 1 << 20

# The chunk that holds byte ``?`` (chunks are contiguous: the next one starts at this one's end).
_AT = ("SELECT pos, data FROM blob_chunks WHERE envelope_id = ? AND pos <= ? AND pos + length(data) > ?"
       " ORDER BY pos DESC LIMIT 1")


class _PgUpload(Upload):
    def __init__(self, store: PgBlobStore, envelope_id: bytes, end: int) -> None:
        self._store = store
        self._id = envelope_id
        self._start = end  # where the buffer's first byte goes
        self._buf = bytearray()

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset != self._start + len(self._buf):
            await self._flush()
            if offset > self._start:
                raise RuntimeError("a write past the end of an upload's part")  # the route never asks this
            await self._store.truncate(self._id, offset)
            self._start = offset
        view = memoryview(data)
        while view:
            take = min(CHUNK - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == CHUNK:
                await self._flush()

    async def _flush(self) -> None:
        if not self._buf:
            return
        async with self._store.storage.transaction() as tx:
            await tx.execute("INSERT INTO blob_chunks (envelope_id, pos, data, written) VALUES (?, ?, ?, ?)",
                             (self._id, self._start, bytes(self._buf), int(time.time())))
        self._start += len(self._buf)
        self._buf.clear()

    async def sync(self) -> None:
        await self._flush()

    async def commit(self) -> None:
        await self._flush()

    async def close(self) -> None:
        self._buf.clear()


class PgBlobStore(BlobStore):
    name = "postgresql"

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def _end(self, envelope_id: bytes) -> int | None:
        row = await self.storage.read_one(
            "SELECT pos + length(data) FROM blob_chunks WHERE envelope_id = ? ORDER BY pos DESC LIMIT 1",
            (envelope_id,))
        return int(row[0]) if row is not None else None

    async def has_part(self, envelope_id: bytes) -> bool:
        return await self._end(envelope_id) is not None

    async def open_upload(self, envelope_id: bytes, prefix: bytes, *, new: bool) -> Upload:
        if new:
            await self.delete(envelope_id)
            upload = _PgUpload(self, envelope_id, 0)
            await upload.write(0, prefix)
            return upload
        return _PgUpload(self, envelope_id, await self._end(envelope_id) or 0)

    async def chunks(self, envelope_id: bytes, start: int, stop: int) -> AsyncIterator[bytes]:
        """The blob's bytes ``start`` to ``stop`` (excluded), a chunk at a time."""
        pos = start
        while pos < stop:
            row = await self.storage.read_one(_AT, (envelope_id, pos, pos))
            if row is None:
                raise RelayError("not_found", 404, "the envelope's ciphertext is gone")  # purged meanwhile
            first, data = int(row[0]), bytes(row[1])
            piece = data[pos - first : stop - first]
            pos += len(piece)
            yield piece

    async def part_sha256(self, envelope_id: bytes, skip: int) -> bytes:
        h = hashlib.sha256()
        async for piece in self.chunks(envelope_id, skip, await self._end(envelope_id) or 0):
            h.update(piece)
        return h.digest()

    async def truncate(self, envelope_id: bytes, length: int) -> None:
        async with self.storage.transaction() as tx:
            await tx.execute("DELETE FROM blob_chunks WHERE envelope_id = ? AND pos >= ?", (envelope_id, length))
            await tx.execute(
                "UPDATE blob_chunks SET data = substring(data FROM 1 FOR (?::bigint - pos)::int)"
                " WHERE envelope_id = ? AND pos < ? AND pos + length(data) > ?",
                (length, envelope_id, length, length))

    async def uncommit(self, envelope_id: bytes) -> None:
        """Nothing to do: the chunks stay, as the part of the upload its row says is in progress."""

    async def delete(self, envelope_id: bytes) -> None:
        async with self.storage.transaction() as tx:
            await tx.execute("DELETE FROM blob_chunks WHERE envelope_id = ?", (envelope_id,))

    async def size(self, envelope_id: bytes) -> int | None:
        return await self._end(envelope_id)

    async def response(self, request: web.Request, envelope_id: bytes, content_type: str) -> web.StreamResponse:
        size = await self._end(envelope_id)
        if size is None:
            raise RelayError("not_found", 404, "no such envelope")
        start, stop, partial = range_bounds(request, size)
        status = 206 if partial else 200
        resp = web.StreamResponse(status=status, headers={"Content-Type": content_type, "Accept-Ranges": "bytes"})
        resp.content_length = stop - start
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        pieces = self.chunks(envelope_id, start, stop)
        first = await anext(pieces, b"")  # a blob purged meanwhile is a 404, not a cut answer
        await resp.prepare(request)
        await resp.write(first)
        async for piece in pieces:
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def sweep(self, storage: Storage, *, grace: float) -> list[str]:
        async with storage.transaction() as tx:
            rows = await tx.fetchall(
                "DELETE FROM blob_chunks c WHERE c.written <= ? AND NOT EXISTS (SELECT 1 FROM envelopes e"
                " WHERE e.id = c.envelope_id AND e.state IN ('stored', 'uploading')) RETURNING c.envelope_id",
                (int(time.time() - grace),))
        return sorted({bytes(r[0]).hex() for r in rows})

    async def probe(self) -> None:
        await self.storage.read_one("SELECT 1 FROM blob_chunks LIMIT 1")
