"""What this device has seen of the relay's log, and the alarm when the log lies.

On every contact the client fetches the relay's latest signed checkpoint and checks
it is consistent with the last one it holds (a consistency proof); every receipt's
checkpoint is checked the same way. It keeps the checkpoints, the consistency links
between them and the receipts in the local case store: together they are the
evidence an audit package is made of, and they let an auditor see that all of them
belong to one append-only history.

A contradiction — a bad signature, a proof that does not verify, two roots for one
size, a log that shrank — is not a log line: it writes ``LOG-ALARM.json`` in the Pli
folder and every later command stops with the alarm until a person has looked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NoReturn

from client.api import RelayClient, unb64
from client.home import Home, atomic_write
from protocol import merkle, note
from protocol.errors import PliError
from protocol.keys import DevicePublic
from protocol.logentry import EntryType, LogEntry

__all__ = ["LogAlarm", "check_log", "store_device", "store_receipt"]

ALARM_FILE = "LOG-ALARM.json"


class LogAlarm(PliError):
    """The relay's log contradicts what this device saw: the relay may be rewriting history."""

    code = "log_alarm"


def alarm(home: Home) -> dict[str, Any] | None:
    path = home.root / ALARM_FILE
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def raise_alarm(home: Home, what: str, detail: str, **evidence: Any) -> NoReturn:
    """Record the alarm on disk (evidence kept), then stop the command."""
    record = {"what": what, "detail": detail, "at": int(time.time()), "relay": home.profile().relay, **evidence}
    if alarm(home) is None:
        atomic_write(home.root / ALARM_FILE, json.dumps(record, indent=2, ensure_ascii=False).encode())
    raise LogAlarm(f"{what}: {detail}")


def verifier(home: Home) -> tuple[note.Verifier, str]:
    profile = home.profile()
    if not profile.log_vkey or not profile.log_origin:
        raise PliError("this device does not know its relay's log key: enrol again", code="no_log_key")
    return note.Verifier.from_vkey(profile.log_vkey), profile.log_origin


def held_checkpoints(home: Home) -> dict[int, tuple[bytes, str]]:
    """size → (root, signed note) of every checkpoint this device verified."""
    with home.store() as db:
        return {int(r["size"]): (bytes(r["root"]), str(r["note"]))
                for r in db.execute("SELECT size, root, note FROM checkpoints")}


def links(home: Home) -> list[tuple[int, int, list[bytes]]]:
    with home.store() as db:
        rows = db.execute("SELECT first, second, proof FROM consistency ORDER BY first, second").fetchall()
    return [(int(r["first"]), int(r["second"]), _split(bytes(r["proof"]))) for r in rows]


def _split(blob: bytes) -> list[bytes]:
    return [blob[i : i + 32] for i in range(0, len(blob), 32)]


async def observe(home: Home, relay: RelayClient, text: str, *, latest: bool) -> note.Checkpoint:
    """Verify a checkpoint and link it to the ones held; alarm on any contradiction.

    ``latest``: this is the relay's current checkpoint, so a smaller size than one
    already seen is a rollback (a receipt's older checkpoint is normal).
    """
    vk, origin = verifier(home)
    try:
        cp = note.open_checkpoint(text, vk, origin=origin)
    except PliError as e:
        raise_alarm(home, "checkpoint not signed by the relay's log key", str(e), checkpoint=text)
    held = held_checkpoints(home)
    roots = {size: root for size, (root, _) in held.items()}
    if latest and held and cp.size < max(held):
        # Checked first: going back to a size seen earlier is a rollback all the same.
        top = max(held)
        raise_alarm(home, "rollback", f"the relay's log went back from size {top} to {cp.size}",
                    checkpoint=text, earlier=held[top][1])
    if cp.size in roots:
        if roots[cp.size] != cp.root_hash:
            raise_alarm(home, "fork", f"two different trees of size {cp.size} signed by the relay",
                        checkpoint=text, earlier=held[cp.size][1])
        return cp
    if held:
        top = max(held)
        first, second = sorted((cp.size, top))
        old_root, new_root = (cp.root_hash, roots[top]) if cp.size < top else (roots[top], cp.root_hash)
        proof = await relay.consistency(first, second)
        try:
            merkle.verify_consistency(first, second, proof, old_root, new_root)
        except PliError as e:
            raise_alarm(home, "fork", f"tree {second} does not extend tree {first}: {e}",
                        checkpoint=text, earlier=held[top][1])
        with home.store() as db:
            db.execute("INSERT OR REPLACE INTO consistency (first, second, proof) VALUES (?, ?, ?)",
                       (first, second, b"".join(proof)))
    with home.store() as db:
        db.execute("INSERT OR IGNORE INTO checkpoints (size, root, note, seen_at) VALUES (?, ?, ?, ?)",
                   (cp.size, cp.root_hash, text, int(time.time())))
    return cp


async def check_log(home: Home, relay: RelayClient) -> note.Checkpoint:
    """On every contact: the relay's latest checkpoint must extend what this device saw."""
    return await observe(home, relay, await relay.checkpoint(), latest=True)


async def store_receipt(home: Home, relay: RelayClient, subject: str, receipt: dict[str, Any]) -> LogEntry:
    """Verify a receipt (leaf, inclusion proof, checkpoint) and keep it under ``subject``
    (an envelope id, or a device id for enrolment leaves)."""
    vk, origin = verifier(home)
    try:
        leaf = unb64(str(receipt["leaf"]))
        entry = LogEntry.from_bytes(leaf)
        proof_text = str(receipt["proof"])
        proof = note.TlogProof.from_text(proof_text)
        if proof.index != receipt["index"]:
            raise PliError("the receipt's index and its proof's differ", code="bad_proof")  # noqa: TRY301  # noqa: TRY301
        proof.verify(merkle.leaf_hash(leaf), vk, origin=origin)
    except (KeyError, TypeError, ValueError) as e:
        raise_alarm(home, "malformed receipt", f"the relay sent a receipt that does not parse: {e}")
    except PliError as e:
        raise_alarm(home, "receipt does not verify", str(e), receipt=receipt)
    device_leaf = entry.type in (EntryType.DEVICE_ENROLLED, EntryType.DEVICE_REVOKED)
    about = entry.device_id if device_leaf else entry.envelope_id
    if about.hex() != subject:
        raise_alarm(home, "receipt for something else", f"a receipt for {subject} names another subject")
    _check_act(home, entry, subject)
    await observe(home, relay, proof.checkpoint, latest=False)
    with home.store() as db:
        db.execute("INSERT OR REPLACE INTO receipts (idx, envelope_id, type, leaf, proof) VALUES (?, ?, ?, ?, ?)",
                   (proof.index, subject, entry.type.name.lower(), leaf, proof_text))
    return entry


def _check_act(home: Home, entry: LogEntry, subject: str) -> None:
    """What this device can check of a leaf beyond its proof: the envelope's hash against
    the header it archived, and the practitioner's signature when it knows the device."""
    prefix = home.envelopes / f"{subject}.prefix"
    if entry.envelope_id and prefix.exists():
        from protocol.envelope import split_prefix  # noqa: PLC0415

        split = split_prefix(prefix.read_bytes())
        if split is not None and split[0].envelope_hash != entry.envelope_hash:
            raise_alarm(home, "receipt for another envelope", f"the log's leaf for {subject} names another header")
    if entry.type in (EntryType.SUBMITTED, EntryType.READ, EntryType.ANSWERED):
        with home.store() as db:
            row = db.execute("SELECT record FROM devices WHERE device_id = ?", (entry.device_id.hex(),)).fetchone()
        if row is not None:
            try:
                entry.verify_act(DevicePublic.from_bytes(bytes(row["record"])).verify_key)
            except PliError as e:
                raise_alarm(home, "forged act in the log", f"{entry.type.name.lower()} of {subject}: {e}")


def store_device(home: Home, device: DevicePublic, rpps: str, name: str) -> None:
    with home.store() as db:
        db.execute("INSERT OR REPLACE INTO devices (device_id, rpps, name, record) VALUES (?, ?, ?, ?)",
                   (device.device_id.hex(), rpps, name, device.to_bytes()))


def receipts_of(home: Home, subject: str) -> list[dict[str, Any]]:
    with home.store() as db:
        rows = db.execute("SELECT idx, type, leaf, proof FROM receipts WHERE envelope_id = ? ORDER BY idx",
                          (subject,)).fetchall()
    return [{"index": int(r["idx"]), "type": r["type"], "leaf": bytes(r["leaf"]), "proof": r["proof"]} for r in rows]


def alarm_path(home: Home) -> Path:
    return home.root / ALARM_FILE
