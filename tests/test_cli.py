"""End to end: the `pli` and `pli-relay` commands as a user runs them, against a relay process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


@pytest.fixture
def two(tmp_path: Path, relay: Relay) -> tuple[Path, Path, Path]:
    gp = practitioner(tmp_path, relay, "gp", GP_RPPS, "Dr Claire Martin")
    derm = practitioner(tmp_path, relay, "derm", DERM_RPPS, "Dr Karim Benali")
    files = tmp_path / "files"
    files.mkdir()
    make_photo(files / "photo.png")
    make_pdf(files / "dossier.pdf", ["Dossier", PATIENT])
    return gp, derm, files


def test_full_exchange_through_the_commands(tmp_path: Path, relay: Relay, two: tuple[Path, Path, Path]) -> None:
    gp, derm, files = two
    sent = json.loads(pli(gp, "--json", "send", "--to", DERM_RPPS, "--subject", "Cuir chevelu",
                          "--patient", PATIENT, "--text", QUESTION,
                          str(files / "photo.png"), str(files / "dossier.pdf")).stdout)
    assert sent["to"] == [{"rpps": DERM_RPPS, "name": "Dr Karim Benali"}]
    assert sent["first_contacts"] == [DERM_RPPS]

    waiting = json.loads(pli(derm, "--json", "inbox").stdout)
    assert [w["id"] for w in waiting] == [sent["envelope_id"]]
    assert waiting[0]["from_rpps"] == GP_RPPS

    # While the envelope sits on the relay, its storage holds only ciphertext.
    markers = {
        "patient": PATIENT.encode(),
        "question": QUESTION.encode(),
        "photo": (files / "photo.png").read_bytes()[-400:],
        "pdf": (files / "dossier.pdf").read_bytes()[:200],
    }
    count, found = scan_for_plaintext(relay.data, markers)
    assert count >= 2
    assert found == []

    opened = json.loads(pli(derm, "--json", "open", sent["envelope_id"][:8]).stdout)
    assert opened["sender_rpps"] == GP_RPPS
    assert opened["body"] == {"subject": "Cuir chevelu", "patient": PATIENT, "text": QUESTION}
    folder = Path(opened["folder"])
    for name in ("photo.png", "dossier.pdf"):
        assert (folder / "files" / name).read_bytes() == (files / name).read_bytes()
    assert json.loads(pli(derm, "--json", "inbox").stdout) == []

    answer = json.loads(pli(derm, "--json", "reply", opened["envelope_id"], "--text", "Avis : kératose.").stdout)
    assert answer["case_id"] == sent["case_id"]
    back = json.loads(pli(gp, "--json", "open", answer["envelope_id"]).stdout)
    assert back["kind"] == "reply"
    assert back["body"] == {"in_reply_to": sent["envelope_id"], "text": "Avis : kératose."}
    assert back["case_id"] == sent["case_id"]

    # Acknowledged by every recipient: the relay keeps no ciphertext of either envelope.
    assert not [p for p in (relay.data / "blobs").rglob("*") if p.is_file()]


def test_human_output_is_plain_text(two: tuple[Path, Path, Path]) -> None:
    gp, derm, files = two
    out = pli(gp, "send", "--to", DERM_RPPS, "--subject", "S", "--patient", PATIENT, "--text", "Q",
              str(files / "photo.png")).stdout
    assert "Sent to Dr Karim Benali (RPPS 10000012343)" in out
    assert "First exchange" in out
    inbox = pli(derm, "inbox").stdout
    assert "1 envelope(s) waiting" in inbox
    french = pli(derm, "inbox", PLI_LANG="fr").stdout
    assert "1 pli(s) en attente" in french


def test_archived_envelope_opens_with_the_age_tool(two: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import shutil  # noqa: PLC0415
    import tarfile  # noqa: PLC0415

    if shutil.which("age") is None:
        pytest.skip("the `age` tool is not installed (Debian package age; `make test` installs it as root)")
    gp, derm, files = two
    sent = json.loads(pli(gp, "--json", "send", "--to", DERM_RPPS, "--subject", "S", "--patient", PATIENT,
                          "--text", QUESTION, str(files / "photo.png")).stdout)
    pli(derm, "open", sent["envelope_id"])
    from client.home import Home  # noqa: PLC0415

    keys = Home(derm).unlock(b"correct horse battery staple")
    identity = tmp_path / "derm.agekey"
    identity.write_text(keys.identity.to_string() + "\n")
    archived = derm / "envelopes" / f"{sent['envelope_id']}.age"
    plain = subprocess.run(["age", "-d", "-i", str(identity), str(archived)], capture_output=True, check=True).stdout
    out = tmp_path / "extracted"
    out.mkdir()
    import io  # noqa: PLC0415

    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        names = tar.getnames()
        tar.extractall(out, filter="data")
    assert names == ["pli/manifest", "pli/manifest.sig", "files/photo.png"]
    assert (out / "files" / "photo.png").read_bytes() == (files / "photo.png").read_bytes()


def test_invalid_rpps_is_explained_digit_by_digit(two: tuple[Path, Path, Path]) -> None:
    gp, _, files = two
    out = pli(gp, "send", "--to", "10000012344", "--subject", "S", "--patient", "P", "--text", "Q",
              str(files / "photo.png"), check=False)
    assert out.returncode == 1
    assert "check digit" in out.stderr
    assert "should be 3, not 4" in out.stderr


def test_errors_are_typed_in_json(two: tuple[Path, Path, Path]) -> None:
    gp, _, _ = two
    out = pli(gp, "--json", "open", "ffffffff", check=False)
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["error"] == "client"
    assert "no envelope" in err["message"]


def test_wrong_passphrase(two: tuple[Path, Path, Path], tmp_path: Path) -> None:
    gp, _, _ = two
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not the passphrase\n")
    out = pli(gp, "inbox", check=False, PLI_PASSPHRASE_FILE=str(wrong))
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
    send = ("send", "--to", DERM_RPPS, "--subject", "S", "--patient", "P", "--text", "Q", str(files / "photo.png"))
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
    for cmd in ("init", "enroll", "send", "inbox", "open", "reply", "trust", "demo", "whoami"):
        assert pli(None, cmd, "--help").returncode == 0
    relay_help = relay_cmd("--help")
    assert "pli-relay invite" in relay_help.stdout


def test_demo_keeps_its_workdir(tmp_path: Path) -> None:
    out = pli(None, "--json", "demo", "--workdir", str(tmp_path / "d"))
    result = json.loads(out.stdout)
    assert result["answer_text"].startswith("Avis")
    assert result["attachments"] == ["lesion-dos.png", "dossier.pdf"]
    for sub in ("relay", "gp", "dermatologue"):
        assert (tmp_path / "d" / sub).is_dir()


def test_demo_prints_each_step() -> None:
    out = pli(None, "demo").stdout
    for step in ("1. Relay started", "3. Dr Martin sends", "5. Dr Benali opens", "7. Dr Martin reads",
                 "8. The case's audit package is exported", "Verdict: verified", "9. The relay never held plaintext",
                 "Demo passed"):
        assert step in out
