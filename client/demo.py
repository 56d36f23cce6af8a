"""``pli demo``: a whole case, end to end, in a few seconds.

The relay runs as its own process (``python -m relay serve``), as an ARS would run
it; the client never imports the relay. The two practitioners are two Pli homes in
the work folder, driven through the same library calls as the ``pli`` commands.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from client import audit, core
from client.api import RelayClient
from client.home import Home
from client.ui import tr
from protocol.errors import PliError
from protocol.keys import DeviceKeys

__all__ = ["run_demo"]

GP = {"key": "gp", "rpps": "10000005479", "name": "Dr Claire Martin", "profession": "médecin",
      "specialty": "SM54 médecine générale"}
DERM = {"key": "dermatologue", "rpps": "10000012343", "name": "Dr Karim Benali", "profession": "médecin",
        "specialty": "SM15 dermatologie"}
PATIENT = "Mme Jeanne Dupont, née le 12/03/1961"
QUESTION = ("Lésion pigmentée du dos apparue il y a 4 mois, asymétrique, 9 mm, bords irréguliers. "
            "Mélanome à exclure ? Merci de votre avis.")
ANSWER = ("Avis : aspect évocateur de mélanome nodulaire. Exérèse rapide recommandée ; "
          "je reçois la patiente lundi en consultation.")
DEMO_PASSPHRASE = b"demo passphrase, not for real use"


class DemoError(PliError):
    code = "demo"


def make_photo(path: Path) -> None:
    """A real PNG (a skin-toned field with a dark irregular spot), written without imaging libraries."""
    w = h = 160
    rows = bytearray()
    for y in range(h):
        rows.append(0)
        for x in range(w):
            dx, dy = x - 80, y - 84
            r2 = dx * dx + dy * dy * 1.3 + 9 * ((x * 7 + y * 3) % 5)
            if r2 < 900:
                px = (70, 45, 35)
            elif r2 < 1300:
                px = (120, 80, 60)
            else:
                px = (224 - y // 8, 182 - y // 10, 160 - x // 12)
            rows += bytes(px)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(bytes(rows), 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def make_pdf(path: Path, lines: list[str]) -> None:
    """A one-page PDF that any viewer opens (Helvetica, WinAnsi for French accents)."""

    def esc(s: str) -> str:
        raw = s.encode("cp1252", "replace").decode("latin-1")
        return raw.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    text = "BT /F1 12 Tf 56 780 Td 16 TL " + " ".join(f"({esc(line)}) '" for line in lines) + " ET"
    content = text.encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 5 0 R >> >>"
            b" /Contents 4 0 R >>"
        ),
        b"<< /Length " + str(len(content)).encode() + b" >>\nstream\n" + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))


class _Relay:
    """The embedded relay, as a child process on a free loopback port."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> str:
        self.data.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PLI_RELAY_LOG_FORMAT": "json"}
        log = (self.data.parent / "relay.log").open("a")
        self.proc = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [sys.executable, "-m", "relay", "serve", "--data", str(self.data), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # the relay prints its URL once listening
        if not line.startswith("http://"):
            self.stop()
            raise DemoError(tr(f"le relais n'a pas démarré (voir {self.data.parent / 'relay.log'})",
                               f"the relay did not start (see {self.data.parent / 'relay.log'})"))
        self.url = line
        return line

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def invite(relay_data: Path, who: dict[str, str]) -> str:
    out = subprocess.run(  # noqa: S603 - our own module, fixed arguments
        [sys.executable, "-m", "relay", "invite", "--data", str(relay_data), "--rpps", who["rpps"],
         "--name", who["name"], "--profession", who["profession"], "--specialty", who["specialty"], "--json"],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise DemoError(f"pli-relay invite: {out.stderr.strip()}")
    return str(json.loads(out.stdout)["code"])


def scan_for_plaintext(root: Path, markers: dict[str, bytes]) -> tuple[int, list[str]]:
    """Look for each marker in every file under ``root``; returns files read and what was found."""
    found = []
    count = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        count += 1
        data = path.read_bytes()
        found += [f"{name} in {path}" for name, needle in markers.items() if needle and needle in data]
    return count, found


def run_demo(
    *,
    workdir: Path | None,
    relay_url: str | None,
    relay_data: Path | None,
    codes: str | None,
    as_json: bool,
) -> dict[str, Any]:
    say = (lambda _s: None) if as_json else print
    if relay_url and not (relay_data or codes):
        raise DemoError(tr("avec --relay, donnez --relay-data DIR ou --codes CODE_MG,CODE_SPÉ",
                           "with --relay, give --relay-data DIR or --codes GP_CODE,SPECIALIST_CODE"))
    temp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="pli-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    relay = _Relay(relay_data or root / "relay")
    started = time.monotonic()
    try:
        if relay_url:
            url = relay_url
            say(tr(f"1. Relais existant : {url}", f"1. Using the relay at {url}"))
        else:
            url = relay.start()
            say(tr(f"1. Relais démarré sur {url} (données dans {relay.data})",
                   f"1. Relay started at {url} (data in {relay.data})"))
        code_list = codes.split(",") if codes else [invite(relay.data, GP), invite(relay.data, DERM)]
        if len(code_list) != 2:
            raise DemoError("--codes takes two codes separated by a comma")
        scans: list[int] = []

        def scan() -> None:
            """Look through the relay's storage for the case's plaintext (when we can see it)."""
            if relay_url and not relay_data:
                return
            count, found = scan_for_plaintext(relay.data, _markers(root))
            if found:
                raise DemoError("PLAINTEXT FOUND ON THE RELAY: " + "; ".join(found))
            scans.append(count)

        result = asyncio.run(_exchange(root, url, code_list, say, scan))
        scan()
        if scans:
            say(tr(f"9. Le relais n'a jamais détenu de contenu en clair : {sum(scans)} fichiers examinés, "
                   "pendant et après l'échange (nom de la patiente, question, réponse, photo, PDF).",
                   f"9. The relay never held plaintext: {sum(scans)} files scanned during and after "
                   "the exchange (patient name, question, answer, photo and PDF bytes)."))
            result["relay_files_scanned"] = sum(scans)
        result["seconds"] = round(time.monotonic() - started, 2)
        result["workdir"] = None if temp else str(root)
        say(tr(f"Démonstration réussie en {result['seconds']} s.", f"Demo passed in {result['seconds']} s."))
        return result
    finally:
        relay.stop()
        if temp:
            shutil.rmtree(root, ignore_errors=True)


def _markers(root: Path) -> dict[str, bytes]:
    files = root / "gp" / "to-send"
    return {
        "patient name": PATIENT.encode(),
        "question": QUESTION[:60].encode(),
        "answer": ANSWER[:60].encode(),
        "photo bytes": (files / "lesion-dos.png").read_bytes()[-512:],
        "pdf bytes": (files / "dossier.pdf").read_bytes()[:300],
    }


async def _exchange(root: Path, url: str, codes: list[str], say: Any, scan: Any) -> dict[str, Any]:
    homes: dict[str, tuple[Home, DeviceKeys]] = {}
    for who, code in zip((GP, DERM), codes, strict=True):
        home = Home(root / who["key"])
        if home.exists():
            keys = home.unlock(DEMO_PASSPHRASE)
        else:
            keys = DeviceKeys.generate(now=int(time.time()))
            home.create(keys, DEMO_PASSPHRASE)
        if not home.profile().relay:
            await core.enroll(home, keys, url, code)
        homes[who["key"]] = (home, keys)
        say(tr(f"2. {who['name']} ({who['specialty']}) inscrit(e), empreinte {keys.public().fingerprint}",
               f"2. {who['name']} ({who['specialty']}) enrolled, fingerprint {keys.public().fingerprint}"))
    gp_home, gp_keys = homes["gp"]
    derm_home, derm_keys = homes["dermatologue"]

    files = gp_home.root / "to-send"
    files.mkdir(exist_ok=True)
    make_photo(files / "lesion-dos.png")
    make_pdf(files / "dossier.pdf", [
        "Dossier de téléexpertise",
        f"Patient : {PATIENT}",
        f"Requérant : {GP['name']}, RPPS {GP['rpps']}",
        f"Requis : {DERM['name']}, RPPS {DERM['rpps']}",
        "Consentement : patiente informée, consentement oral recueilli.",
        "Question : " + QUESTION[:70], QUESTION[70:],
    ])
    sent = await core.send(
        gp_home, gp_keys, to=[DERM["rpps"]], kind="request",
        body={"subject": "Lésion pigmentée du dos", "patient": PATIENT, "text": QUESTION},
        files=[files / "lesion-dos.png", files / "dossier.pdf"],
    )
    say(tr(f"3. Le Dr Martin envoie le dossier (photo + PDF) : pli {sent.envelope_id[:12]}, "
           f"{sent.size:,} octets chiffrés", f"3. Dr Martin sends the case (photo + PDF): envelope "
           f"{sent.envelope_id[:12]}, {sent.size:,} encrypted bytes"))

    scan()  # the envelope is stored on the relay now: only ciphertext may be there
    waiting = await core.inbox(derm_home, derm_keys)
    say(tr(f"4. Le Dr Benali a {len(waiting)} pli en attente", f"4. Dr Benali has {len(waiting)} envelope waiting"))
    opened = await core.open_envelope(derm_home, derm_keys, sent.envelope_id)
    say(tr(f"5. Le Dr Benali ouvre le pli : signature du Dr Martin vérifiée, "
           f"{len(opened.files)} pièces jointes dans {opened.folder}",
           f"5. Dr Benali opens it: Dr Martin's signature verified, "
           f"{len(opened.files)} attachments in {opened.folder}"))
    answer = await core.reply(derm_home, derm_keys, opened.envelope_id, text=ANSWER, files=[])
    scan()
    say(tr(f"6. Le Dr Benali répond : pli {answer.envelope_id[:12]}",
           f"6. Dr Benali answers: envelope {answer.envelope_id[:12]}"))
    back = await core.open_envelope(gp_home, gp_keys, answer.envelope_id)
    if back.case_id != sent.case_id or back.body.get("text") != ANSWER:
        raise DemoError("the answer does not belong to the case")
    say(tr(f"7. Le Dr Martin lit la réponse (signature vérifiée) : « {back.body['text']} »",
           f"7. Dr Martin reads the answer (signature verified): \u201c{back.body['text']}\u201d"))
    package = root / "audit" / f"dossier-{sent.case_id[:12]}.pliaudit"
    async with RelayClient(url, gp_keys) as r:
        exported = await audit.export_package(gp_home, r, gp_keys, sent.case_id, package, with_content=True)
    report = audit.verify_package(package)
    if not report.ok:
        raise DemoError("the audit package does not verify: " + "; ".join(report.failures))
    say(tr(f"8. Paquet d'audit du dossier exporté ({exported['receipts']} accusés signés) et vérifié hors ligne :",
           f"8. The case's audit package is exported ({exported['receipts']} signed receipts) and verified offline:"))
    for e in report.timeline:
        env = f" {e['envelope'][:12]}" if e["envelope"] else ""
        say(f"     {e['when']}  {e['event']:<10} {e['who']}{env} {e['detail']}".rstrip())
    say(tr("   Verdict : vérifié — signatures, preuves d'inclusion et cohérence du journal.",
           "   Verdict: verified — signatures, inclusion proofs and log consistency all check out."))
    return {
        "relay": url,
        "case_id": sent.case_id,
        "request": sent.envelope_id,
        "answer": answer.envelope_id,
        "answer_text": back.body["text"],
        "attachments": [f["name"] for f in opened.files],
        "audit_package": str(package),
        "audit": report.to_json(),
    }
