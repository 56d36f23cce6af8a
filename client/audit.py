"""Audit packages: the medico-legal proof of a case, verifiable offline by anyone.

A package (SPEC.md §12) is a POSIX tar: ``audit.json`` — the log's identity, the
checkpoints, the consistency proofs linking them, the devices' certified keys with
their enrolment receipts, each envelope's signed routing header and its receipts
(submitted, delivered, read, answered) with tlog-proofs — and, with ``--with-content``,
``content/<envelope>/`` holding the decrypted manifest, its signature and the files.

``verify_package`` trusts nothing in the package but the log's verifier key (which the
auditor should compare with the one the relay's operator publishes): it checks every
signature, proof and link, then prints the case's timeline.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import logstate
from client.api import RelayClient, RelayUnreachable
from client.home import Home, atomic_write
from protocol import age, merkle, note
from protocol.bundle import BundleReader
from protocol.envelope import EnvelopeHeader, split_prefix
from protocol.errors import PliError
from protocol.keys import CTX_BUNDLE, DevicePublic, verify
from protocol.logentry import EntryType, LogEntry

__all__ = ["AuditError", "export_package", "monitor_once", "verify_package"]

FORMAT = "pli-audit/v1"
MAX_JSON = 64 << 20
_COPY = 1 << 20


class AuditError(PliError):
    code = "audit_failed"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any) -> bytes:
    try:
        return base64.b64decode(str(s), validate=True)
    except ValueError as e:
        raise AuditError(f"not base64: {str(s)[:40]}") from e


# -- export --------------------------------------------------------------------------------


async def export_package(
    home: Home, relay: RelayClient | None, keys: Any, case: str, out: Path, *, with_content: bool
) -> dict[str, Any]:
    """Gather a case's evidence (refreshed from the relay when it answers) into ``out``."""
    history = [h for h in home.history() if h["case_id"].startswith(case.lower())]
    cases = {h["case_id"] for h in history}
    if len(cases) != 1:
        raise AuditError(f"no case matches {case!r}" if not cases else f"{case!r} matches {len(cases)} cases")
    case_id = cases.pop()
    envelopes = [h["id"] for h in history]
    headers = {eid: _archived_header(home, eid) for eid in envelopes}
    devices = {d for h in headers.values() for d in (h[1].sender, *h[1].to)}
    online = relay is not None
    if relay is not None:
        try:
            from client.core import refresh_receipts  # noqa: PLC0415 - core imports nothing of audit

            await refresh_receipts(home, relay, [bytes.fromhex(e) for e in envelopes])
            for device_id in devices:
                info = await relay.device(device_id)
                pub = DevicePublic.from_record({k: _unb64(info[k]) for k in ("sign_key", "cert", "sig")})
                if pub.device_id != device_id:
                    raise AuditError("the relay answered for another device")
                logstate.store_device(home, pub, info["rpps"], info.get("name", ""))
                for receipt in info.get("receipts", []):
                    await logstate.store_receipt(home, relay, device_id.hex(), receipt)
            latest = await logstate.check_log(home, relay)
            await _link_to_latest(home, relay, latest)
        except RelayUnreachable:
            online = False
    doc = _document(home, case_id, envelopes, headers, devices)
    doc["online_refresh"] = online
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "audit.json", json.dumps(doc, indent=2, ensure_ascii=False).encode())
        if with_content:
            for eid in envelopes:
                _add_content(tar, home, keys, eid, headers[eid][1])
    tmp.replace(out)
    return {"case_id": case_id, "envelopes": len(envelopes), "receipts": sum(len(e["receipts"]) for e in
            doc["envelopes"]), "checkpoints": len(doc["checkpoints"]), "with_content": with_content,
            "file": str(out), "online_refresh": online}


def _archived_header(home: Home, eid: str) -> tuple[bytes, EnvelopeHeader]:
    prefix = (home.envelopes / f"{eid}.prefix").read_bytes()
    split = split_prefix(prefix)
    if split is None:
        raise AuditError(f"the archived header of {eid} is cut short")
    return prefix, EnvelopeHeader.from_bytes(split[0].raw)


async def _link_to_latest(home: Home, relay: RelayClient, latest: note.Checkpoint) -> None:
    """Fetch, check and keep a direct consistency proof from every held checkpoint to the latest."""
    held = logstate.held_checkpoints(home)
    for size, (root, _) in held.items():
        if size < latest.size:
            proof = await relay.consistency(size, latest.size)
            merkle.verify_consistency(size, latest.size, proof, root, latest.root_hash)
            with home.store() as db:
                db.execute("INSERT OR REPLACE INTO consistency (first, second, proof) VALUES (?, ?, ?)",
                           (size, latest.size, b"".join(proof)))


def _document(
    home: Home, case_id: str, envelopes: list[str], headers: dict[str, tuple[bytes, EnvelopeHeader]],
    devices: set[bytes],
) -> dict[str, Any]:
    profile = home.profile()
    with home.store() as db:
        device_rows = {r["device_id"]: dict(r) for r in db.execute("SELECT * FROM devices")}
    env_docs = []
    used_sizes: set[int] = set()
    for eid in envelopes:
        receipts = logstate.receipts_of(home, eid)
        used_sizes |= {_proof_size(home, r["proof"]) for r in receipts}
        env_docs.append({"id": eid, "prefix": _b64(headers[eid][0]),
                         "receipts": [_receipt_doc(r) for r in receipts]})
    dev_docs = []
    for d in sorted(devices):
        row = device_rows.get(d.hex())
        if row is None:
            continue
        receipts = logstate.receipts_of(home, d.hex())
        used_sizes |= {_proof_size(home, r["proof"]) for r in receipts}
        dev_docs.append({"device_id": d.hex(), "rpps": row["rpps"], "name": row["name"],
                         "record": _b64(bytes(row["record"])), "receipts": [_receipt_doc(r) for r in receipts]})
    # Every checkpoint this device verified and every link between them: small, and
    # whatever path ties a receipt's checkpoint to the latest is then in the package.
    held = logstate.held_checkpoints(home)
    sizes = sorted(held)
    missing = used_sizes - set(sizes)
    if missing:
        raise AuditError(f"receipts refer to checkpoints this device never kept: {sorted(missing)}")
    links = [{"first": a, "second": b, "proof": [_b64(h) for h in p]} for a, b, p in logstate.links(home)]
    return {
        "format": FORMAT,
        "case_id": case_id,
        "exported_at": int(time.time()),
        "exported_by": {"rpps": profile.rpps, "name": profile.name, "device_id": profile.device_id},
        "log": {"origin": profile.log_origin, "vkey": profile.log_vkey},
        "checkpoints": [held[s][1] for s in sizes],
        "consistency": links,
        "devices": dev_docs,
        "envelopes": env_docs,
    }


def _proof_size(home: Home, proof_text: str) -> int:
    vk, origin = logstate.verifier(home)
    return note.open_checkpoint(note.TlogProof.from_text(proof_text).checkpoint, vk, origin=origin).size


def _receipt_doc(r: dict[str, Any]) -> dict[str, Any]:
    return {"type": r["type"], "index": r["index"], "leaf": _b64(r["leaf"]), "proof": r["proof"]}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_content(tar: tarfile.TarFile, home: Home, keys: Any, eid: str, header: EnvelopeHeader) -> None:
    """Decrypt the archived envelope into the package, streaming: memory stays flat."""
    with home.store() as db:
        row = db.execute("SELECT record FROM devices WHERE device_id = ?", (header.sender.hex(),)).fetchone()
    if row is None:
        raise AuditError(f"the sender's keys of {eid} are not known on this device")
    sender = DevicePublic.from_bytes(bytes(row["record"]))
    base = f"content/{eid}/"
    with (home.envelopes / f"{eid}.age").open("rb") as f:
        reader = BundleReader(age.DecryptReader(f, [keys.identity]), sender=sender, envelope=header,
                              me=keys.device_id)
        _add(tar, base + "manifest", reader.manifest_bytes)
        _add(tar, base + "manifest.sig", reader.signature)
        for entry, stream in reader.files():
            info = tarfile.TarInfo(base + "files/" + entry.name)
            info.size, info.mtime, info.mode = entry.size, 0, 0o644
            tar.addfile(info, stream)  # type: ignore[arg-type]  # reads exactly info.size bytes
        reader.finish()


# -- verification ----------------------------------------------------------------------------


@dataclass
class Report:
    ok: bool = True
    checks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    case_id: str = ""
    log_vkey: str = ""

    def fail(self, what: str) -> None:
        self.ok = False
        self.failures.append(what)

    def to_json(self) -> dict[str, Any]:
        return {"verdict": "verified" if self.ok else "FAILED", "case_id": self.case_id, "log_vkey": self.log_vkey,
                "failures": self.failures, "checks": self.checks, "timeline": self.timeline}


def _read_package(path: Path, *, hash_files: bool = True) -> tuple[dict[str, Any], dict[str, bytes]]:
    """audit.json and the content members. With ``hash_files`` (verification), an
    attachment's value is its SHA-256, computed as it streams: memory stays flat."""
    content: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            if first is None or first.name != "audit.json" or not first.isreg() or first.size > MAX_JSON:
                raise AuditError("not a Pli audit package: audit.json must come first")
            f = tar.extractfile(first)
            assert f is not None
            doc = json.loads(f.read().decode("utf-8"))
            while (m := tar.next()) is not None:
                if not m.isreg() or not m.name.startswith("content/") or ".." in m.name.split("/"):
                    raise AuditError(f"unexpected member {m.name!r} in the package")
                g = tar.extractfile(m)
                assert g is not None
                if hash_files and "/files/" in m.name:
                    h = hashlib.sha256()
                    while chunk := g.read(_COPY):
                        h.update(chunk)
                    content[m.name] = h.digest()
                elif m.size > MAX_JSON:
                    raise AuditError(f"member {m.name!r} is too large")
                else:
                    content[m.name] = g.read()
    except (OSError, tarfile.TarError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditError(f"cannot read the package: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AuditError(f"not a {FORMAT} package")
    return doc, content


def verify_package(path: Path, *, vkey: str | None = None) -> Report:
    """Check everything in a package offline; never raises for a failed check, reports it.

    ``vkey``: the log verifier key the auditor trusts (from the relay's operator); when
    omitted, the package's own is used and the report says so.

    Raises:
        AuditError: the file is not a package at all.
    """
    rep = Report()
    try:
        return _verify(path, vkey, rep)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # A package shaped otherwise than SPEC §12 says: report it, never crash on it.
        rep.fail(f"malformed package: {type(e).__name__} {e}")
        return rep


_DOC_KEYS = frozenset({"format", "case_id", "exported_at", "exported_by", "online_refresh", "log", "checkpoints",
                       "consistency", "devices", "envelopes"})


def _verify(path: Path, vkey: str | None, rep: Report) -> Report:  # noqa: C901, PLR0912, PLR0915
    doc, content = _read_package(path)
    rep.case_id = str(doc.get("case_id", ""))
    unknown = sorted(set(doc) - _DOC_KEYS)
    if unknown:  # fail closed: a field this verifier does not know could be meant to say something
        rep.fail(f"unknown field(s) in audit.json: {', '.join(map(repr, unknown))}")
    try:
        log_doc = doc["log"]
        verifier = note.Verifier.from_vkey(vkey or log_doc["vkey"])
        # The origin is the trusted key's name (SPEC §11.4), never the package's say-so.
        origin = verifier.name
        if str(log_doc.get("origin")) != origin:
            rep.fail(f"the package names log {log_doc.get('origin')!r}, but the key is for {origin!r}")
    except (KeyError, TypeError, PliError) as e:
        raise AuditError(f"the package names no valid log key: {e}") from e
    rep.log_vkey = verifier.vkey
    if vkey and vkey != log_doc.get("vkey"):
        rep.fail("the package names another log key than the one you trust")
    if not vkey:
        rep.checks.append("log key taken from the package: compare it with the one the relay's operator publishes")

    # 1. Checkpoints: each signed by the log; one root per size (else: a fork).
    roots: dict[int, bytes] = {}
    for text in doc.get("checkpoints", []):
        try:
            cp = note.open_checkpoint(str(text), verifier, origin=origin)
        except PliError as e:
            rep.fail(f"checkpoint signature: {e}")
            continue
        if cp.size in roots and roots[cp.size] != cp.root_hash:
            rep.fail(f"FORK: two different trees of size {cp.size} signed by the log")
        roots[cp.size] = cp.root_hash
    rep.checks.append(f"{len(roots)} checkpoint(s) signed by {verifier.name}")

    # 2. Consistency: every checkpoint is a prefix of the largest one.
    extends: dict[int, set[int]] = {}
    for link in doc.get("consistency", []):
        try:
            a, b = link["first"], link["second"]
            if type(a) is not int or type(b) is not int:
                raise TypeError("sizes must be integers")  # noqa: TRY301 - reported below
            proof = [_unb64(h) for h in link["proof"]]
            if a not in roots or b not in roots:  # a package holds nothing it does not use
                raise KeyError("no checkpoint of that size in the package")  # noqa: TRY301
            merkle.verify_consistency(a, b, proof, roots[a], roots[b])
            extends.setdefault(a, set()).add(b)
        except (KeyError, TypeError, ValueError, PliError) as e:
            rep.fail(f"consistency proof {link.get('first')}→{link.get('second')}: {e}")
    if roots:
        top = max(roots)
        for size in roots:
            if size != top and not _reaches(size, top, extends):
                rep.fail(f"checkpoint of size {size} is not proved to be a prefix of size {top}")
        rep.checks.append(f"all checkpoints consistent with the tree of size {top}")

    def proved(receipt: dict[str, Any], what: str) -> LogEntry | None:
        try:
            leaf = _unb64(receipt["leaf"])
            entry = LogEntry.from_bytes(leaf)
            tp = note.TlogProof.from_text(str(receipt["proof"]))
            cp = tp.verify(merkle.leaf_hash(leaf), verifier, origin=origin)
        except (KeyError, TypeError, PliError) as e:
            rep.fail(f"{what}: {e}")
            return None
        if tp.index != receipt.get("index"):
            rep.fail(f"{what}: the receipt's index differs from its proof's")
            return None
        if receipt.get("type") != entry.type.name.lower():  # an unsigned label must not disagree
            rep.fail(f"{what}: the receipt says {receipt.get('type')!r} but its leaf is {entry.type.name.lower()!r}")
            return None
        if roots.get(cp.size) != cp.root_hash:
            rep.fail(f"{what}: its checkpoint (size {cp.size}) is not among the package's consistent checkpoints")
            return None
        return entry

    # 3. Devices: certified keys, enrolment logged with the record's hash.
    devices: dict[bytes, tuple[DevicePublic, str, str, int]] = {}
    for d in doc.get("devices", []):
        try:
            record = _unb64(d["record"])
            pub = DevicePublic.from_bytes(record)
        except (KeyError, PliError) as e:
            rep.fail(f"device record: {e}")
            continue
        enrolled_at = -1
        for r in d.get("receipts", []):
            ent = proved(r, f"enrolment of device {pub.device_id.hex()[:12]}")
            if ent and ent.type == EntryType.DEVICE_ENROLLED:
                if ent.device_id != pub.device_id or ent.record_hash != hashlib.sha256(record).digest():
                    rep.fail(f"device {pub.device_id.hex()[:12]}: the log records other keys")
                elif ent.rpps != d.get("rpps"):
                    rep.fail(f"device {pub.device_id.hex()[:12]}: enrolled for RPPS {ent.rpps}, not {d.get('rpps')}")
                else:
                    enrolled_at = int(r["index"])
                    rep.timeline.append(_event(ent, r, d.get("name", ""), d.get("rpps", ""), "enrolled"))
        if enrolled_at < 0:
            rep.fail(f"device {pub.device_id.hex()[:12]}: no proof of its enrolment in the log")
            continue
        if d.get("device_id") != pub.device_id.hex():  # an unsigned label must not disagree
            rep.fail(f"device {pub.device_id.hex()[:12]}: listed under another id")
            continue
        devices[pub.device_id] = (pub, str(d.get("rpps", "")), str(d.get("name", "")), enrolled_at)
    rep.checks.append(f"{len(devices)} device(s): keys certified, enrolment logged for their RPPS "
                      "(names are as the relay's directory gave them; the log proves RPPS numbers)")

    # 4. Envelopes: signed header, each receipt proved and its signature by the right device.
    hashes: dict[bytes, tuple[str, EnvelopeHeader]] = {}
    checked: set[str] = set()
    for env in doc.get("envelopes", []):
        eid = str(env.get("id", ""))
        try:
            split = split_prefix(_unb64(env.get("prefix", "")))
        except PliError as e:
            rep.fail(f"envelope {eid[:12]}: header {e}")
            continue
        if split is None:
            rep.fail(f"envelope {eid[:12]}: header cut short")
            continue
        signed = split[0]
        header = None
        # Verify first: the header is decoded only once a known device's signature holds.
        for pub, *_ in devices.values():
            try:
                header = signed.verify(pub.verify_key)
                break
            except PliError:
                continue
        if header is None:
            rep.fail(f"envelope {eid[:12]}: its header is signed by no device of the package")
            continue
        if header.id.hex() != eid:
            rep.fail(f"envelope {eid[:12]}: the header names another id")
            continue
        hashes[signed.envelope_hash] = (eid, header)
    for env in doc.get("envelopes", []):
        eid = str(env.get("id", ""))
        known = [(h, e) for h, (i, e) in hashes.items() if i == eid]
        if not known:
            continue
        env_hash, header = known[0]
        kinds = set()
        for r in env.get("receipts", []):
            entry = proved(r, f"receipt {r.get('type')} of {eid[:12]}")
            if entry is None:
                continue
            if entry.envelope_id != header.id or entry.envelope_hash != env_hash:
                rep.fail(f"receipt {entry.type.name.lower()} of {eid[:12]}: names another envelope")
                continue
            dev = devices.get(entry.device_id)
            if dev is None:
                rep.fail(f"receipt {entry.type.name.lower()} of {eid[:12]}: device not in the package")
                continue
            allowed = {header.sender} if entry.type == EntryType.SUBMITTED else set(header.to)
            if entry.device_id not in allowed:
                rep.fail(f"receipt {entry.type.name.lower()} of {eid[:12]}: by a device not party to it")
                continue
            if int(r["index"]) < dev[3]:
                rep.fail(f"receipt {entry.type.name.lower()} of {eid[:12]}: logged before its device's enrolment")
            if entry.type in (EntryType.SUBMITTED, EntryType.READ, EntryType.ANSWERED):
                try:
                    entry.verify_act(dev[0].verify_key)
                except PliError as e:
                    rep.fail(f"receipt {entry.type.name.lower()} of {eid[:12]}: device signature {e}")
                    continue
            extra = ""
            if entry.type == EntryType.ANSWERED:
                answer = hashes.get(entry.answer_hash)
                extra = f"by envelope {answer[0][:12]}" if answer else "by an envelope not in the package"
            kinds.add(entry.type)
            rep.timeline.append(_event(entry, r, dev[2], dev[1], extra=extra))
        if EntryType.SUBMITTED not in kinds:
            rep.fail(f"envelope {eid[:12]}: no proof of its submission")
        # 5. Content: the manifest signed by the sender for this envelope, files matching it.
        if any(k.startswith(f"content/{eid}/") for k in content):
            sender_dev = devices[header.sender]
            checked |= _check_content(rep, content, eid, header, sender_dev[0], sender_dev[1], rep.case_id)
    stray = sorted(set(content) - checked)
    if stray:
        rep.fail(f"content not covered by any verified manifest: {', '.join(stray[:5])}")
    rep.checks.append(f"{len(hashes)} envelope(s): headers signed by their senders, receipts proved")
    rep.timeline.sort(key=lambda e: (e["time"], e["index"]))
    return rep


def _reaches(size: int, top: int, extends: dict[int, set[int]]) -> bool:
    frontier, seen = [size], {size}
    while frontier:
        s = frontier.pop()
        if s == top:
            return True
        for nxt in extends.get(s, ()):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return False


def _event(
    entry: LogEntry, receipt: dict[str, Any], name: str, rpps: str, what: str = "", extra: str = ""
) -> dict[str, Any]:
    return {
        "time": entry.time,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry.time)),
        "event": what or entry.type.name.lower(),
        "envelope": entry.envelope_id.hex(),
        "device": entry.device_id.hex(),
        "who": f"{name} (RPPS {rpps})" if name else f"RPPS {rpps}",
        "index": int(receipt["index"]),
        "detail": extra,
    }


def _check_content(
    rep: Report, content: dict[str, bytes], eid: str, header: EnvelopeHeader, sender: DevicePublic,
    sender_rpps: str, case_id: str,
) -> set[str]:
    """Check one envelope's content; return the member names its verified manifest covers."""
    from protocol.bundle import Manifest  # noqa: PLC0415

    base = f"content/{eid}/"
    try:
        raw, sig = content[base + "manifest"], content[base + "manifest.sig"]
        verify(sender.verify_key, CTX_BUNDLE, raw, sig)
        m = Manifest.from_bytes(raw)
    except (KeyError, PliError) as e:
        rep.fail(f"content of {eid[:12]}: manifest {e}")
        return set()
    if m.envelope_id != header.id or set(m.recipients) != set(header.to):
        rep.fail(f"content of {eid[:12]}: the manifest was signed for another envelope")
        return set()
    if m.case_id.hex() != case_id:
        rep.fail(f"content of {eid[:12]}: signed for case {m.case_id.hex()[:12]}, not this package's case")
    if m.sender.rpps != sender_rpps:
        rep.fail(f"content of {eid[:12]}: the sender signed as RPPS {m.sender.rpps}, enrolled as {sender_rpps}")
    covered = {base + "manifest", base + "manifest.sig"}
    for f in m.files:
        name = base + "files/" + f.name
        covered.add(name)
        digest = content.get(name)  # hashed as it was read (see _read_package)
        if digest is None or digest != f.sha256:
            rep.fail(f"content of {eid[:12]}: file {f.name!r} does not match the signed manifest")
            return covered
    rep.checks.append(f"content of {eid[:12]}: manifest signed by the sender for this case, "
                      f"{len(m.files)} file(s) match")
    return covered


# -- monitoring ----------------------------------------------------------------------------


MONITOR_BATCH = 1000
MONITOR_MAX_ENTRIES = 200_000


async def monitor_once(  # noqa: C901, PLR0912 - each branch is one alarm the spec names
    relay: RelayClient, state_path: Path, *, vkey: str | None = None
) -> dict[str, Any]:
    """Fetch the relay's checkpoint, check it extends the last one seen, replay the new
    leaves into the kept right edge of the tree, save the state. Raises AuditError on a
    fork, a rollback, a bad signature or leaves that do not make the signed root."""
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("alarm"):
        raise AuditError(f"ALARM (recorded {state['alarm']['when']}): {state['alarm']['what']}")
    first_run = not state
    key = vkey or state.get("vkey") or await relay.log_vkey()
    if state and key != state["vkey"]:
        raise AuditError("the verifier key differs from the one this monitor has followed")
    verifier = note.Verifier.from_vkey(key)
    text = await relay.checkpoint()

    def alarm(what: str) -> AuditError:
        state["alarm"] = {"what": what, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          "checkpoint": text}
        atomic_write(state_path, json.dumps(state, indent=2).encode())
        return AuditError(what)

    try:
        cp = note.open_checkpoint(text, verifier, origin=verifier.name)
    except PliError as e:
        raise alarm(f"the checkpoint is not signed by the log's key: {e}") from e
    rng = merkle.CompactRange.from_bytes(bytes.fromhex(state["range"])) if state else merkle.CompactRange()
    old_size = int(state.get("size", 0))
    old_root = bytes.fromhex(state["root"]) if state else merkle.EMPTY_ROOT
    if cp.size < old_size:
        raise alarm(f"ROLLBACK: the log went back from size {old_size} to {cp.size}")
    if cp.size == old_size and cp.root_hash != old_root:
        raise alarm(f"FORK: another tree of size {cp.size} than the one seen before")
    if cp.size > old_size > 0:
        try:
            merkle.verify_consistency(old_size, cp.size, await relay.consistency(old_size, cp.size), old_root,
                                      cp.root_hash)
        except PliError as e:
            raise alarm(f"FORK: the tree of size {cp.size} does not extend the one of size {old_size}: {e}") from e
    replayed = 0
    while rng.size < cp.size and replayed < MONITOR_MAX_ENTRIES:
        asked = min(cp.size, rng.size + MONITOR_BATCH) - rng.size
        leaves = await relay.entries(rng.size, rng.size + asked)
        if not leaves:
            raise alarm("the relay serves no entries below its checkpoint's size")
        if len(leaves) > asked:
            raise alarm(f"the relay served {len(leaves)} entries where {asked} were asked")
        for leaf in leaves:
            try:
                LogEntry.from_bytes(leaf)
            except PliError as e:
                raise alarm(f"entry {rng.size} is not a Pli log entry: {e}") from e
            rng.append(merkle.leaf_hash(leaf))
            replayed += 1
    if rng.size == cp.size and rng.root() != cp.root_hash:
        raise alarm(f"the entries served do not hash to the signed root of size {cp.size}")
    state.update({"url": str(relay.base), "vkey": key, "size": cp.size, "root": cp.root_hash.hex(),
                  "range": rng.to_bytes().hex() if rng.size == cp.size else state.get("range", ""),
                  "checkpoint": text, "checked_at": int(time.time())})
    if rng.size != cp.size:  # more to replay than one run does: keep the replayed prefix
        state.update({"size": old_size, "root": old_root.hex(), "range": rng.to_bytes().hex()})
    atomic_write(state_path, json.dumps(state, indent=2).encode())
    return {"status": "ok", "first_run": first_run, "size": cp.size, "root": cp.root_hash.hex(),
            "new_entries": replayed, "vkey": key, "origin": cp.origin}
