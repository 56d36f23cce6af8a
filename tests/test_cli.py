"""End to end: the `pli` and `pli-relay` commands as a user runs them, against a relay process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.demo import make_pdf, make_photo, scan_for_plaintext

GP_RPPS = "10000005479"
DERM_RPPS = "10000012343"
PATIENT = "Patient Zoé Témoin-Unique"
QUESTION = "Question clinique marqueur-7731 : lésion du cuir chevelu ?"


def _env(home: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLI_")}
    env["PLI_LANG"] = "en"
    if home is not None:
        env["PLI_HOME"] = str(home)
        env["PLI_PASSPHRASE_FILE"] = str(home.parent / f"{home.name}.pass")
    env.update(extra)
    return env


def pli(home: Path | None, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "client", *args], capture_output=True, text=True, env=_env(home, **env),
        timeout=120, check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, f"pli {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def relay_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, env=_env(), timeout=60, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@dataclass
class Relay:
    url: str
    data: Path
    proc: subprocess.Popen[str]

    def invite(self, rpps: str, name: str) -> str:
        out = relay_cmd("invite", "--data", str(self.data), "--rpps", rpps, "--name", name,
                        "--profession", "médecin", "--json")
        assert out.returncode == 0, out.stderr
        return str(json.loads(out.stdout)["code"])


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    data = tmp_path / "relay"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--data", str(data), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.stderr else ""
    yield Relay(url=url, data=data, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    # Off a terminal the relay logs JSON lines, one per request, and never case content.
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(line.get("event") == "request" for line in lines)
    assert any(line.get("event") == "relay_stopped" for line in lines)
    for marker in (PATIENT, QUESTION, "Dr Karim Benali"):
        assert marker not in err


def practitioner(tmp_path: Path, relay: Relay, name: str, rpps: str, full: str) -> Path:
    home = tmp_path / name
    (tmp_path / f"{name}.pass").write_text("correct horse battery staple\n")
    pli(home, "init", "--fast-kdf")
    out = pli(home, "--json", "enroll", relay.url, relay.invite(rpps, full))
    assert json.loads(out.stdout)["rpps"] == rpps
    return home


CASE_YAML = f"""
# A case file as practice software writes it (README, "pli case new --from")
requis:
  rpps: "{DERM_RPPS}"
  name: Dr Karim Benali
patient:
  family_name: Témoin-Unique
  given_names: Zoé
  birth_date: 1961-03-12
  sex: F
  ins: "261037511200508"
motif: Lésion du cuir chevelu
question: "{QUESTION}"
context: Pas d'antécédent.
urgency: routine
consent:
  informed: oui
  consented: oui
  method: oral
attachments:
  - photo.jpg
"""


@pytest.fixture
def two(tmp_path: Path, relay: Relay) -> tuple[Path, Path, Path]:
    gp = practitioner(tmp_path, relay, "gp", GP_RPPS, "Dr Claire Martin")
    derm = practitioner(tmp_path, relay, "derm", DERM_RPPS, "Dr Karim Benali")
    files = tmp_path / "files"
    files.mkdir()
    make_photo(files / "photo.jpg")
    make_pdf(files / "ecg.pdf", ["ECG", PATIENT])
    (files / "case.yaml").write_text(CASE_YAML, encoding="utf-8")
    return gp, derm, files


def new_case(gp: Path, files: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return pli(gp, "--json", "case", "new", "--from", str(files / "case.yaml"), *extra, check=check)


def test_full_case_through_the_commands(tmp_path: Path, relay: Relay, two: tuple[Path, Path, Path]) -> None:
    gp, derm, files = two
    sent = json.loads(new_case(gp, files, str(files / "ecg.pdf")).stdout)
    assert sent["sent"] is True
    assert sent["first_contacts"] == [DERM_RPPS]
    assert sorted(sent["files"]) == ["demande-teleexpertise.pdf", "ecg.pdf", "photo.jpg", "photo.thumb.jpg"]
    case = sent["case"]

    # While the envelope sits on the relay, its storage holds only ciphertext.
    markers = {"patient": "Témoin-Unique".upper().encode(), "question": QUESTION.encode(),
               "pdf": (files / "ecg.pdf").read_bytes()[:200]}
    count, found = scan_for_plaintext(relay.data, markers)
    assert count >= 2
    assert found == []

    listed = json.loads(pli(derm, "--json", "cases").stdout)
    assert listed["new"] == 1
    [row] = listed["cases"]
    assert (row["case"], row["status"], row["role"], row["unread"]) == (case, "to_answer", "requis", 1)
    shown = json.loads(pli(derm, "--json", "case", "show", case[:8]).stdout)
    assert shown["read_signed"] is True
    request = shown["envelopes"][0]
    assert request["body"]["question"] == QUESTION
    folder = Path(request["folder"]) / "files"
    assert (folder / "ecg.pdf").read_bytes() == (files / "ecg.pdf").read_bytes()

    asked = pli(derm, "--json", "case", "answer", case[:8], "--complement", "Une photo de plus.")
    assert json.loads(asked.stdout)["kind"] == "complement_request"
    assert json.loads(pli(gp, "--json", "cases").stdout)["cases"][0]["status"] == "complement_asked"
    pli(gp, "case", "complement", case[:8], "--text", "Voici.", str(files / "photo.jpg"))
    pli(derm, "cases")
    pli(derm, "case", "answer", case[:8], "--avis", "Kératose séborrhéique.", "--prescription", "Rien")
    gp_cases = json.loads(pli(gp, "--json", "cases").stdout)["cases"]
    assert gp_cases[0]["status"] == "answered"
    report = json.loads(pli(gp, "--json", "case", "report", case[:8]).stdout)
    assert Path(report["report"]).read_bytes().startswith(b"%PDF-")
    assert json.loads(pli(gp, "--json", "cases").stdout)["cases"][0]["status"] == "closed"
    bill = json.loads(pli(gp, "--json", "billing", "--month", time.strftime("%Y-%m")).stdout)
    assert [line["code"] for line in bill["lines"]] == ["RQD"]
    csv_out = pli(derm, "billing", "--month", time.strftime("%Y-%m"), "--csv").stdout
    assert "TE2" in csv_out
    assert ";" in csv_out

    # Acknowledged by every recipient: the relay keeps no ciphertext of any envelope.
    assert not [p for p in (relay.data / "blobs").rglob("*") if p.is_file()]


def test_human_output_is_plain_text(two: tuple[Path, Path, Path]) -> None:
    gp, derm, files = two
    out = pli(gp, "case", "new", "--from", str(files / "case.yaml")).stdout
    assert "Request sent to Dr Karim Benali (RPPS 10000012343)" in out
    assert "First exchange" in out
    listing = pli(derm, "cases").stdout
    assert "1 new envelope(s) received and verified" in listing
    assert "to answer" in listing
    french = pli(derm, "cases", "--offline", PLI_LANG="fr").stdout
    assert "à traiter" in french


def test_archived_envelope_opens_with_the_age_tool(two: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import shutil  # noqa: PLC0415
    import tarfile  # noqa: PLC0415

    if shutil.which("age") is None:
        pytest.skip("the `age` tool is not installed (Debian package age; `make test` installs it as root)")
    gp, derm, files = two
    sent = json.loads(new_case(gp, files).stdout)
    pli(derm, "cases")
    from client.home import Home  # noqa: PLC0415

    keys = Home(derm).unlock(b"correct horse battery staple")
    identity = tmp_path / "derm.agekey"
    identity.write_text(keys.identity.to_string() + "\n")
    archived = derm / "envelopes" / f"{sent['envelope']}.age"
    plain = subprocess.run(["age", "-d", "-i", str(identity), str(archived)], capture_output=True, check=True).stdout
    out = tmp_path / "extracted"
    out.mkdir()
    import io  # noqa: PLC0415

    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        names = tar.getnames()
        tar.extractall(out, filter="data")
    assert names == ["pli/manifest", "pli/manifest.sig", "files/demande-teleexpertise.pdf", "files/photo.jpg",
                     "files/photo.thumb.jpg"]
    assert (out / "files" / "demande-teleexpertise.pdf").read_bytes().startswith(b"%PDF-")


def test_invalid_rpps_is_explained_digit_by_digit(two: tuple[Path, Path, Path]) -> None:
    gp, _, files = two
    out = new_case(gp, files, "--to", "10000012344", check=False)
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["error"] == "invalid_identifier"
    assert "should be 3, not 4" in err["message"]
    human = pli(gp, "case", "new", "--from", str(files / "case.yaml"), "--to", "10000012344", check=False,
                PLI_LANG="fr")
    assert "chiffre de contrôle" in human.stderr or "clé" in human.stderr


def test_case_without_consent_is_refused(two: tuple[Path, Path, Path]) -> None:
    gp, _, files = two
    (files / "case.yaml").write_text(CASE_YAML.replace("consented: oui", "consented: non"), encoding="utf-8")
    out = new_case(gp, files, check=False)
    assert out.returncode == 1
    assert json.loads(out.stdout)["error"] == "invalid_case"
    assert json.loads(pli(gp, "--json", "cases", "--offline").stdout)["cases"] == []


def test_answer_needs_exactly_one_kind(two: tuple[Path, Path, Path]) -> None:
    gp, _, _ = two
    out = pli(gp, "case", "answer", "abcd", "--avis", "x", "--refus", "y", check=False)
    assert out.returncode == 2
    assert "exactly one" in out.stderr


def test_errors_are_typed_in_json(two: tuple[Path, Path, Path]) -> None:
    gp, _, _ = two
    out = pli(gp, "--json", "case", "show", "ffffffff", check=False)
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["error"] == "case"
    assert "no case" in err["message"]


def test_wrong_passphrase(two: tuple[Path, Path, Path], tmp_path: Path) -> None:
    gp, _, _ = two
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not the passphrase\n")
    out = pli(gp, "cases", check=False, PLI_PASSPHRASE_FILE=str(wrong))
    assert out.returncode == 1
    assert "wrong passphrase" in out.stderr


def test_used_invitation_code_is_refused(tmp_path: Path, relay: Relay) -> None:
    code = relay.invite(GP_RPPS, "Dr Claire Martin")
    for name in ("one", "two"):
        (tmp_path / f"{name}.pass").write_text("pass phrase 1234\n")
        pli(tmp_path / name, "init", "--fast-kdf")
    pli(tmp_path / "one", "enroll", relay.url, code)
    out = pli(tmp_path / "two", "enroll", relay.url, code, check=False)
    assert out.returncode == 1
    assert "unknown, already used or expired" in out.stderr


def test_unreachable_relay_says_so(tmp_path: Path) -> None:
    (tmp_path / "h.pass").write_text("pass phrase 1234\n")
    pli(tmp_path / "h", "init", "--fast-kdf")
    out = pli(tmp_path / "h", "enroll", "http://127.0.0.1:9", "AAAAA-BBBBB-CCCCC-DDDDD", check=False)
    assert out.returncode == 1
    assert "does not answer" in out.stderr


def test_key_change_is_refused_until_trusted(tmp_path: Path, relay: Relay, two: tuple[Path, Path, Path]) -> None:
    gp, _derm, files = two
    send = ("case", "new", "--from", str(files / "case.yaml"))
    pli(gp, *send)
    # The dermatologist's practitioner entry gains a device the GP never saw (what a
    # compromised relay would do to read the next cases).
    practitioner(tmp_path, relay, "derm2", DERM_RPPS, "Dr Karim Benali")
    out = pli(gp, *send, check=False)
    assert out.returncode == 1
    assert "keys of RPPS 10000012343 changed" in out.stderr
    shown = json.loads(pli(gp, "--json", "trust", DERM_RPPS, "--show").stdout)
    assert len(shown["devices"]) == 2
    pli(gp, "trust", DERM_RPPS, "--yes")
    pli(gp, *send)


def test_help_teaches() -> None:
    top = pli(None, "--help").stdout
    assert "pli enroll" in top
    assert "pli demo" in top
    assert "pli case new" in top
    for cmd in (("init",), ("enroll",), ("cases",), ("case", "new"), ("case", "show"), ("case", "answer"),
                ("case", "complement"), ("case", "report"), ("billing",), ("trust",), ("demo",), ("whoami",)):
        assert pli(None, *cmd, "--help").returncode == 0
    relay_help = relay_cmd("--help")
    assert "pli-relay invite" in relay_help.stdout


def test_demo_keeps_its_workdir(tmp_path: Path) -> None:
    out = pli(None, "--json", "demo", "--workdir", str(tmp_path / "d"))
    result = json.loads(out.stdout)
    assert result["status"] == "answered"
    assert result["attachments"] == ["compte-rendu-biologie.pdf", "demande-teleexpertise.pdf", "lesion-dos.jpg",
                                     "lesion-dos.thumb.jpg"]
    assert Path(result["report"]).is_file()
    assert sorted(line["code"] for lines in result["billing"].values() for line in lines) == ["RQD", "TE2"]
    for sub in ("relay", "gp", "dermatologue"):
        assert (tmp_path / "d" / sub).is_dir()


def test_demo_prints_each_step() -> None:
    out = pli(None, "demo").stdout
    for step in ("1. Relay started", "3. Dr Martin prepares and sends", "EXIF and GPS removed", "5. He reads it",
                 "6. Dr Martin sends the complement", "7. Dr Benali gives his avis", "8. Dr Martin reads the avis",
                 "9. Billing (Dr Martin): RQD", "9. Billing (Dr Benali): TE2",
                 "10. The case's audit package is exported", "Verdict: verified",
                 "11. The relay never held plaintext", "Demo passed"):
        assert step in out
