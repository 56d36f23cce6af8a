"""``pli demo``: a whole case, end to end, in a few seconds.

The relay runs as its own process (``python -m relay serve``), as an ARS would run
it; the client never imports the relay. The two practitioners are two Pli homes in
the work folder, driven through the same library calls as the ``pli`` commands.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from client import audit, billing, cases, core
from client.api import RelayClient
from client.caseform import prepare_request
from client.home import Home
from client.ui import tr
from protocol.errors import PliError
from protocol.keys import DeviceKeys

__all__ = ["run_demo"]

GP = {"key": "gp", "rpps": "10000005479", "name": "Dr Claire Martin", "profession": "médecin",
      "specialty": "SM54 médecine générale"}
DERM = {"key": "dermatologue", "rpps": "10000012343", "name": "Dr Karim Benali", "profession": "médecin",
        "specialty": "SM15 dermatologie"}
# A realistic case, after the dermatology examples of the seeds (DOMAIN.md, "A case").
CASE: dict[str, Any] = {
    "requis": {"rpps": DERM["rpps"], "name": DERM["name"], "specialty": "SM15 dermatologie"},
    "patient": {"family_name": "Dupont", "given_names": "Jeanne", "birth_date": "1961-03-12", "sex": "F",
                "ins": "261037511200508"},
    "motif": "Lésion pigmentée du dos d'évolution récente",
    "question": ("Lésion pigmentée du dos apparue il y a 4 mois, asymétrique, 9 mm, bords irréguliers, "
                 "deux couleurs. Mélanome à exclure ? Merci de votre avis."),
    "context": "Phototype II, coups de soleil dans l'enfance. Pas d'antécédent personnel ni familial de mélanome.",
    "urgency": "routine",
    "consent": {"informed": True, "consented": True, "method": "oral"},
}
PATIENT = "DUPONT Jeanne"
QUESTION = CASE["question"]
MISSING = "Merci d'envoyer une photo dermoscopique de la lésion, avec une règle pour l'échelle."
COMPLEMENT = "Photo dermoscopique jointe ; la lésion mesure 9 x 7 mm."
ANSWER = ("Aspect évocateur de mélanome nodulaire : réseau atypique, voile bleu-blanc. "
          "Exérèse rapide recommandée ; je reçois la patiente lundi en consultation.")
PRESCRIPTIONS = ["Exérèse complète de la lésion avec marge de 2 mm, examen anatomopathologique"]
DEMO_PASSPHRASE = b"demo passphrase, not for real use"


class DemoError(PliError):
    code = "demo"


def make_photo(path: Path, *, seed: int = 0) -> None:
    """A JPEG as a phone takes it: a skin-toned field with a dark irregular spot, and EXIF
    metadata with the place it was taken (which Pli strips before anything leaves)."""
    from PIL import Image, ImageDraw, ImageFilter  # noqa: PLC0415 - only the demo draws

    img = Image.new("RGB", (1600, 1200), (222, 180, 158))
    draw = ImageDraw.Draw(img)
    for i in range(0, 1600, 40):  # skin texture, so the photo is not "blurred"
        draw.line([(i, 0), (i + 300, 1200)], fill=(210 - (i + seed) % 30, 170, 150), width=3)
    draw.ellipse((640, 440, 960, 760), fill=(95, 60, 45))
    draw.ellipse((700 + seed, 500, 880, 700), fill=(60, 35, 30))
    img = img.filter(ImageFilter.SMOOTH)
    exif = Image.Exif()
    exif[0x010F] = "DemoPhone"  # Make
    exif[0x0110] = "Pli demo camera"  # Model
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (48.0, 6.0, 42.0), 3: "W", 4: (1.0, 40.0, 30.0)})  # Rennes
    img.save(path, "JPEG", quality=88, exif=exif)


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
            say(tr(f"11. Le relais n'a jamais détenu de contenu en clair : {sum(scans)} fichiers examinés, "
                   "pendant et après l'échange (nom de la patiente, INS, question, réponse, photos, PDF).",
                   f"11. The relay never held plaintext: {sum(scans)} files scanned during and after "
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
    """What must never be found on the relay: the case's words and the bytes of what was sent."""
    sent = root / "gp" / "cases"
    markers = {
        "patient name": b"DUPONT",
        "patient INS": str(CASE["patient"]["ins"]).encode(),
        "question": QUESTION[:60].encode(),
        "complement": COMPLEMENT[:40].encode(),
        "answer": ANSWER[:60].encode(),
    }
    for name in ("lesion-dos.jpg", "dermoscopie.jpg", "demande-teleexpertise.pdf", "compte-rendu-biologie.pdf"):
        for path in sent.glob(f"*/*/{name}"):
            data = path.read_bytes()
            markers[f"{name} bytes"] = data[len(data) // 2 : len(data) // 2 + 256]
    return markers


async def _exchange(root: Path, url: str, codes: list[str], say: Any, scan: Any) -> dict[str, Any]:  # noqa: PLR0915
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
    now = int(time.time())
    today = dt.datetime.fromtimestamp(now, cases.PARIS).date()

    # 3. The GP prepares the request: checked identifiers, consent, cleaned photo, dossier PDF.
    files = gp_home.root / "to-send"
    files.mkdir(exist_ok=True)
    make_photo(files / "lesion-dos.jpg")
    make_pdf(files / "compte-rendu-biologie.pdf", ["Compte rendu de biologie", "NFS normale, CRP < 5 mg/L"])
    data = {**CASE, "consent": {**CASE["consent"], "date": today.isoformat()}}
    prepared = prepare_request(gp_home, gp_home.profile(), data,
                               [files / "lesion-dos.jpg", files / "compte-rendu-biologie.pdf"],
                               today=today, case_id=os.urandom(16), now=now)
    sent = await cases.send_request(gp_home, gp_keys, prepared)
    case_id = sent.case_id
    say(tr(f"3. Le Dr Martin prépare et envoie la demande : patiente, consentement oral, photo nettoyée "
           f"(EXIF et GPS retirés), dossier PDF pré-rempli ; dossier {case_id[:12]}, "
           f"{sent.size:,} octets chiffrés",
           f"3. Dr Martin prepares and sends the request: patient, oral consent, cleaned photo (EXIF and "
           f"GPS removed), pre-filled dossier PDF; case {case_id[:12]}, {sent.size:,} encrypted bytes"))
    scan()  # the envelope is stored on the relay now: only ciphertext may be there

    # 4-5. The dermatologist sees it, reads it, asks for a dermoscopy photo.
    synced = await cases.sync(derm_home, derm_keys)
    view = cases.case_view(derm_home, case_id, now=int(time.time()))
    say(tr(f"4. Le Dr Benali reçoit {len(synced.new)} dossier « {cases.STATUS_LABELS[view.status][0]} » "
           f"(signature vérifiée), à rendre avant le {_day(view.deadline)}",
           f"4. Dr Benali receives {len(synced.new)} case '{cases.STATUS_LABELS[view.status][1]}' "
           f"(signature verified), due by {_day(view.deadline)}"))
    await cases.show(derm_home, derm_keys, case_id, now=int(time.time()))
    await cases.answer(derm_home, derm_keys, case_id, "complement_request", {"missing": MISSING}, [],
                       now=int(time.time()))
    say(tr(f"5. Il lit le dossier et demande un complément : « {MISSING} »",
           f"5. He reads it and asks for more: \u201c{MISSING}\u201d"))

    # 6. The GP answers into the same case.
    await cases.sync(gp_home, gp_keys)
    await cases.show(gp_home, gp_keys, case_id, now=int(time.time()))
    make_photo(files / "dermoscopie.jpg", seed=20)
    await cases.complement(gp_home, gp_keys, case_id, COMPLEMENT, [files / "dermoscopie.jpg"], now=int(time.time()))
    say(tr("6. Le Dr Martin envoie le complément (photo dermoscopique) dans le même dossier",
           "6. Dr Martin sends the complement (dermoscopy photo) into the same case"))
    scan()

    # 7. The avis, with a prescription.
    await cases.sync(derm_home, derm_keys)
    await cases.answer(derm_home, derm_keys, case_id, "avis",
                       {"avis": ANSWER, "recommendations": "Photoprotection ; surveillance cutanée annuelle.",
                        "prescriptions": PRESCRIPTIONS, "follow_up": "Consultation lundi 9 h."}, [],
                       now=int(time.time()))
    say(tr(f"7. Le Dr Benali rend son avis : « {ANSWER[:70]}… »", f"7. Dr Benali gives his avis: "
           f"\u201c{ANSWER[:70]}…\u201d"))

    # 8. The GP reads it and files the compte rendu.
    await cases.sync(gp_home, gp_keys)
    view, _ = await cases.show(gp_home, gp_keys, case_id, now=int(time.time()))
    if view.status != "answered" or view.envelopes[-1]["body"].get("avis") != ANSWER:
        raise DemoError("the avis does not belong to the case")
    report_path = cases.report(gp_home, case_id, now=int(time.time()))
    say(tr(f"8. Le Dr Martin lit l'avis et produit le compte rendu pour le dossier de la patiente : {report_path}",
           f"8. Dr Martin reads the avis and files the compte rendu for the patient's record: {report_path}"))

    # 9. Billing, on each side.
    month = (today.year, today.month)
    lines = {key: billing.billing_lines(cases.acts(h, now=int(time.time())), month=month)
             for key, (h, _) in homes.items()}
    for key, ls in lines.items():
        doctor = "Dr Martin" if key == "gp" else "Dr Benali"
        for x in ls:
            say(tr(f"9. Facturation ({doctor}) : {x.code} {x.amount_cents / 100:.2f} € le {x.date.isoformat()}",
                   f"9. Billing ({doctor}): {x.code} €{x.amount_cents / 100:.2f} on {x.date.isoformat()}"))

    # 10. The audit package.
    package = root / "audit" / f"dossier-{case_id[:12]}.pliaudit"
    async with RelayClient(url, gp_keys) as r:
        exported = await audit.export_package(gp_home, r, gp_keys, case_id, package, with_content=True)
    report = audit.verify_package(package)
    if not report.ok:
        raise DemoError("the audit package does not verify: " + "; ".join(report.failures))
    say(tr(f"10. Paquet d'audit du dossier exporté ({exported['receipts']} accusés signés) et vérifié hors ligne :",
           f"10. The case's audit package is exported ({exported['receipts']} signed receipts) and verified "
           "offline:"))
    for e in report.timeline:
        env = f" {e['envelope'][:12]}" if e["envelope"] else ""
        say(f"     {e['when']}  {e['event']:<10} {e['who']}{env} {e['detail']}".rstrip())
    say(tr("   Verdict : vérifié — signatures, preuves d'inclusion et cohérence du journal.",
           "   Verdict: verified — signatures, inclusion proofs and log consistency all check out."))
    gp_case = gp_home.cases / case_id / sent.envelope_id
    return {
        "relay": url,
        "case_id": case_id,
        "request": sent.envelope_id,
        "status": view.status,
        "answer_text": ANSWER,
        "attachments": sorted(p.name for p in gp_case.iterdir()),
        "report": str(report_path),
        "billing": {key: [{"code": x.code, "amount_cents": x.amount_cents, "date": x.date.isoformat()} for x in ls]
                    for key, ls in lines.items()},
        "audit_package": str(package),
        "audit": report.to_json(),
    }


def _day(ts: int | None) -> str:
    return dt.datetime.fromtimestamp(ts, cases.PARIS).strftime("%Y-%m-%d") if ts else "-"
