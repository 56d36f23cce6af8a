"""Ciphertext blobs on disk: written under a temporary name, fsynced, renamed.

A blob file holds the whole envelope (prefix then ciphertext), so a download is one
``sendfile`` with range support. Uploads grow ``incoming/<id>.part``; only a complete,
hash-checked upload is renamed to ``<aa>/<id>``, after an fsync of the file and of its
folder, so a crash never leaves a half-written blob under a final name.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from relay.errors import storage_failure

__all__ = ["BlobStore"]


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def final_path(self, envelope_id: bytes) -> Path:
        h = envelope_id.hex()
        return self.root / h[:2] / h

    def part_path(self, envelope_id: bytes) -> Path:
        return self.incoming / (envelope_id.hex() + ".part")

    def open_part(self, envelope_id: bytes, prefix: bytes, *, new: bool) -> int:
        """Open (or start) an upload's part file for appending; returns a raw fd."""
        path = self.part_path(envelope_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if new else os.open(path, os.O_WRONLY)
        except OSError as e:
            raise _storage_error(e) from e
        if new:
            try:
                self.write(fd, 0, prefix)
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)  # a new part that cannot take its prefix leaves nothing
                raise
        return fd

    @staticmethod
    def write(fd: int, offset: int, data: bytes | memoryview) -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as e:
            raise _storage_error(e) from e

    @staticmethod
    def sync(fd: int) -> None:
        """fsync a part between the requests of an upload (blocking: run in a thread)."""
        try:
            os.fsync(fd)
        except OSError as e:
            raise _storage_error(e) from e

    def truncate(self, envelope_id: bytes, length: int) -> None:
        # Shrinking a file never needs space: this works on a full disk too.
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.part_path(envelope_id), length)

    def uncommit(self, envelope_id: bytes) -> None:
        """Put a committed blob back as its upload's part file (its log batch failed), so the
        upload stays resumable; if even that fails, the blob goes and the upload restarts."""
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

    def delete(self, envelope_id: bytes) -> None:
        for path in (self.final_path(envelope_id), self.part_path(envelope_id)):
            path.unlink(missing_ok=True)

    def sweep(self, *, stored: set[bytes], uploading: set[bytes], grace: float = 0) -> list[str]:
        """Remove files no envelope owns (left by a crash); returns their names.

        A blob under its final name belongs to a stored envelope, a part file to an upload
        in progress. A crash after an upload's last request renamed its part into place but
        before its log batch committed leaves a final blob whose row is still uploading: it
        goes too (the upload resumes from the row, from 0 as its part is gone). Files
        modified less than ``grace`` seconds ago are kept (another node may be writing them).
        """
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


def _storage_error(e: OSError) -> Exception:
    """A full or unwritable disk as ``503 storage_unavailable``; anything else as it is."""
    return storage_failure(e) or e
