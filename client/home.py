"""A practitioner's Pli folder on their own machine: keys, profile, pins, case store.

Layout (``PLI_HOME``, default ``~/.pli``)::

    device.key        private keys sealed under the passphrase (SPEC.md §3.4)
    profile.json      relay URL, device id, who this device speaks for
    pins.json         the keys seen for each correspondent (trust on first use)
    store.sqlite3     the local case store: every envelope sent or received
    envelopes/        every envelope sent or received, encrypted, as the archive
    cases/<case>/<envelope>/   opened bundles: the files, manifest and signature

Nothing here ever goes to the relay except public keys and ciphertext.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protocol.errors import PliError
from protocol.keys import DeviceKeys, DevicePublic

__all__ = ["Home", "KeyChangedError", "Profile", "atomic_write"]


class HomeError(PliError):
    code = "home"


class KeyChangedError(PliError):
    """A correspondent's keys differ from the ones pinned: possibly a relay swapping keys."""

    code = "key_changed"


@dataclass
class Profile:
    relay: str = ""
    device_id: str = ""
    rpps: str = ""
    name: str = ""
    profession: str = ""
    specialty: str = ""
    log_origin: str = ""
    log_vkey: str = ""
    adeli: str = ""


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write via a temporary file, fsync and rename: a crash leaves the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).chmod(mode)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS envelopes (
    id TEXT PRIMARY KEY,
    case_id TEXT NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('sent', 'received')),
    kind TEXT NOT NULL,
    peer_rpps TEXT NOT NULL,
    peer_name TEXT NOT NULL,
    subject TEXT NOT NULL,
    created INTEGER NOT NULL,
    relay_received_at INTEGER,
    opened_at INTEGER,
    in_reply_to TEXT,
    folder TEXT,
    body TEXT,          -- the manifest body as JSON (bytes as hex): the case's data
    read_at INTEGER,    -- when this device signed that its practitioner read it
    pending INTEGER NOT NULL DEFAULT 0  -- sent: 1 until the relay gave its receipt
);
CREATE INDEX IF NOT EXISTS envelopes_case ON envelopes(case_id, created);
CREATE TABLE IF NOT EXISTS receipts (
    idx INTEGER PRIMARY KEY,
    envelope_id TEXT NOT NULL,
    type TEXT NOT NULL,
    leaf BLOB NOT NULL,
    proof TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_envelope ON receipts(envelope_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    seen_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS consistency (
    first INTEGER NOT NULL,
    second INTEGER NOT NULL,
    proof BLOB NOT NULL,
    PRIMARY KEY (first, second)
);
CREATE TABLE IF NOT EXISTS incidents (
    case_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    text_en TEXT NOT NULL,
    text_fr TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS incidents_case ON incidents(case_id, at);
CREATE TABLE IF NOT EXISTS rejected (
    id TEXT PRIMARY KEY,   -- an envelope that failed verification: set aside, never fetched again
    at INTEGER NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_statements (
    original TEXT NOT NULL,  -- an answered statement the relay did not take yet: sent again at sync
    answer TEXT NOT NULL,
    PRIMARY KEY (original, answer)
);
CREATE TABLE IF NOT EXISTS case_meta (
    case_id TEXT PRIMARY KEY,
    closed_at INTEGER,
    report TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    rpps TEXT NOT NULL,
    name TEXT NOT NULL,
    record BLOB NOT NULL
);
"""
_ADDED_COLUMNS = (("body", "TEXT"), ("read_at", "INTEGER"), ("pending", "INTEGER NOT NULL DEFAULT 0"))


class Home:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def default(cls) -> Home:
        return cls(Path(os.environ.get("PLI_HOME") or Path.home() / ".pli"))

    # -- paths ---------------------------------------------------------------------------

    @property
    def key_file(self) -> Path:
        return self.root / "device.key"

    @property
    def envelopes(self) -> Path:
        return self.root / "envelopes"

    @property
    def cases(self) -> Path:
        return self.root / "cases"

    def exists(self) -> bool:
        return self.key_file.exists()

    # -- keys and profile ----------------------------------------------------------------

    def create(self, keys: DeviceKeys, passphrase: bytes, *, fast_kdf: bool = False) -> None:
        if self.exists():
            raise HomeError(f"{self.root} already holds a device key; refusing to overwrite it")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        kw: dict[str, int] = {}
        if fast_kdf:  # for tests and the demo only: the minimum Argon2id cost libsodium allows
            import nacl.pwhash  # noqa: PLC0415

            kw = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN, "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}
        atomic_write(self.key_file, keys.seal(passphrase, **kw))
        self.save_profile(Profile(device_id=keys.device_id.hex()))

    def unlock(self, passphrase: bytes) -> DeviceKeys:
        if not self.exists():
            raise HomeError(f"no device key in {self.root}: run `pli init` first")
        return DeviceKeys.unseal(self.key_file.read_bytes(), passphrase)

    def profile(self) -> Profile:
        path = self.root / "profile.json"
        if not path.exists():
            return Profile()
        data = json.loads(path.read_text(encoding="utf-8"))
        return Profile(**{k: v for k, v in data.items() if k in Profile.__dataclass_fields__})

    def save_profile(self, profile: Profile) -> None:
        atomic_write(self.root / "profile.json", json.dumps(asdict(profile), indent=2).encode())

    # -- pins (trust on first use, loud on change) ----------------------------------------

    def _pins(self) -> dict[str, Any]:
        path = self.root / "pins.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def pinned(self, rpps: str) -> dict[str, str] | None:
        """Device id (hex) → fingerprint pinned for this practitioner, or None if never seen."""
        entry = self._pins().get(rpps)
        return dict(entry["devices"]) if entry else None

    def trusted_ever(self, rpps: str) -> dict[str, str]:
        """The pinned devices and those pinned once and since gone (revoked): an envelope a
        device sent before its revocation still opens."""
        entry = self._pins().get(rpps) or {}
        return {**entry.get("retired", {}), **entry.get("devices", {})}

    def check_pins(self, rpps: str, devices: list[DevicePublic]) -> bool:
        """Compare a directory answer with the pins. True if this is a first contact (now pinned).

        A device that disappeared (revoked) is dropped silently: fewer recipients is
        safe. A new or changed key is refused until the user checks it and runs
        ``pli trust``: the relay could otherwise add its own key and read what follows.

        Raises:
            KeyChangedError: a device or key differs from the pins.
        """
        seen = {d.device_id.hex(): d.fingerprint for d in devices}
        pinned = self.pinned(rpps)
        if pinned is None:
            self.pin(rpps, devices)
            return True
        new = {k: v for k, v in seen.items() if pinned.get(k) != v}
        if new:
            lines = ", ".join(f"{k[:8]}… ({v})" for k, v in new.items())
            raise KeyChangedError(
                f"the keys of RPPS {rpps} changed since you last exchanged with them: {lines}. "
                f"Check the fingerprint with the practitioner (by phone, in person), then run "
                f"`pli trust {rpps}`."
            )
        if set(seen) != set(pinned):
            self.pin(rpps, devices)
        return False

    def pin(self, rpps: str, devices: list[DevicePublic]) -> None:
        pins = self._pins()
        old = pins.get(rpps) or {}
        current = {d.device_id.hex(): d.fingerprint for d in devices}
        retired = {**old.get("retired", {}), **old.get("devices", {})}
        pins[rpps] = {
            "devices": current,
            "retired": {k: v for k, v in retired.items() if k not in current},
            "pinned_at": int(time.time()),
        }
        atomic_write(self.root / "pins.json", json.dumps(pins, indent=2, sort_keys=True).encode())

    # -- local case store ----------------------------------------------------------------

    @contextmanager
    def store(self) -> Iterator[sqlite3.Connection]:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "store.sqlite3"
        if not path.exists():
            path.touch(mode=0o600)  # patients' data: this user only, like every file here
        db = sqlite3.connect(path)
        try:
            db.executescript(_STORE_SCHEMA)
            have = {r[1] for r in db.execute("PRAGMA table_info(envelopes)")}
            for column, decl in _ADDED_COLUMNS:  # stores made before the case model
                if column not in have:
                    db.execute(f"ALTER TABLE envelopes ADD COLUMN {column} {decl}")
            db.row_factory = sqlite3.Row
            with db:
                yield db
        finally:
            db.close()

    def record(self, **row: Any) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.store() as db:
            db.execute(
                f"INSERT OR REPLACE INTO envelopes ({cols}) VALUES ({marks})",  # noqa: S608 - our keys
                tuple(row.values()),
            )

    def history(self, case_id: str | None = None) -> list[dict[str, Any]]:
        with self.store() as db:
            if case_id is None:
                return [dict(r) for r in db.execute("SELECT * FROM envelopes ORDER BY created, id")]
            return [dict(r) for r in db.execute(
                "SELECT * FROM envelopes WHERE case_id = ? ORDER BY created, id", (case_id,))]

    def forget(self, envelope_id: str) -> None:
        """Drop a sent envelope the relay never accepted (its archive files go with it)."""
        with self.store() as db:
            db.execute("DELETE FROM envelopes WHERE id = ? AND direction = 'sent'", (envelope_id,))
        for suffix in (".prefix", ".age"):
            (self.envelopes / f"{envelope_id}{suffix}").unlink(missing_ok=True)

    def incident(self, case_id: str, at: int, en: str, fr: str) -> None:
        """Keep a technical incident of a case: the compte rendu must state it (DOMAIN.md)."""
        with self.store() as db:
            db.execute("INSERT INTO incidents (case_id, at, text_en, text_fr) VALUES (?, ?, ?, ?)",
                       (case_id, at, en, fr))

    def incidents(self, case_id: str) -> list[dict[str, Any]]:
        with self.store() as db:
            return [dict(r) for r in db.execute(
                "SELECT at, text_en, text_fr FROM incidents WHERE case_id = ? ORDER BY at", (case_id,))]

    def case_meta(self, case_id: str) -> dict[str, Any]:
        with self.store() as db:
            row = db.execute("SELECT closed_at, report FROM case_meta WHERE case_id = ?", (case_id,)).fetchone()
        return dict(row) if row else {"closed_at": None, "report": None}

    def close_case(self, case_id: str, at: int, report: str) -> None:
        with self.store() as db:
            db.execute("INSERT INTO case_meta (case_id, closed_at, report) VALUES (?, ?, ?) "
                       "ON CONFLICT (case_id) DO UPDATE SET report = excluded.report",  # closed once
                       (case_id, at, report))

    def reject(self, envelope_id: str, code: str, reason: str) -> None:
        with self.store() as db:
            db.execute("INSERT OR REPLACE INTO rejected (id, at, code, reason) VALUES (?, ?, ?, ?)",
                       (envelope_id, int(time.time()), code, reason))

    def rejected(self) -> dict[str, dict[str, Any]]:
        with self.store() as db:
            return {r["id"]: dict(r) for r in db.execute("SELECT * FROM rejected")}

    def pending_statements(self) -> list[tuple[str, str]]:
        with self.store() as db:
            return [(r[0], r[1]) for r in db.execute("SELECT original, answer FROM pending_statements")]

    def set_pending_statement(self, original: str, answer: str, *, pending: bool) -> None:
        with self.store() as db:
            if pending:
                db.execute("INSERT OR IGNORE INTO pending_statements VALUES (?, ?)", (original, answer))
            else:
                db.execute("DELETE FROM pending_statements WHERE original = ? AND answer = ?", (original, answer))

    def mark_read(self, envelope_id: str, at: int) -> None:
        with self.store() as db:
            db.execute("UPDATE envelopes SET read_at = ? WHERE id = ?", (at, envelope_id))
