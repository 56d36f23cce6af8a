"""`pli case new` by prompts: each field is checked as it is typed and asked again, with
the reason, until it is right; nothing is written for a request without consent."""

from __future__ import annotations

from pathlib import Path

import pypdf
import pytest
from click.testing import CliRunner, Result

from client.caseform import CaseFormError
from client.cli import cli
from client.home import Home, Profile
from protocol.keys import DeviceKeys


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = Home(tmp_path / "gp")
    h.create(DeviceKeys.generate(now=1_700_000_000), b"passphrase", fast_kdf=True)
    h.save_profile(Profile(relay="http://127.0.0.1:9", device_id="00" * 16, rpps="10000005479",
                           name="Dr Claire Martin", profession="médecin", specialty="SM54"))
    return h.root


def run(home: Path, answers: list[str], *args: str, lang: str = "en") -> tuple[int, str]:
    result = invoke(home, answers, *args, lang=lang)
    return result.exit_code, result.output


def invoke(home: Path, answers: list[str], *args: str, lang: str = "en") -> Result:
    return CliRunner().invoke(
        cli, ["--home", str(home), "case", "new", "--interactive", "--dry-run", *args],
        input="\n".join(answers) + "\n", env={"PLI_LANG": lang},
    )


GOOD = [
    "10000012343",          # RPPS of the specialist
    "Dupont", "Jeanne",     # names
    "12/03/1961", "F",      # birth date, sex
    "2 61 03 75 112 005 08",  # NIR with its key
    "Lésion du dos", "Mélanome ?", "Phototype II",
    "n",                    # urgent?
    "y", "y", "n",          # informed, consented, written?
    "",                     # attachments
]


def test_prompts_build_a_request_and_its_dossier(home: Path) -> None:
    code, out = run(home, GOOD)
    assert code == 0, out
    assert "Request ready (not sent)" in out
    dossier = next((home / "outbox").glob("*/demande-teleexpertise.pdf"))
    text = "\n".join(p.extract_text() for p in pypdf.PdfReader(dossier).pages)
    assert "DUPONT" in text
    assert "261037511200508" in text


def test_a_wrong_digit_is_explained_and_asked_again(home: Path) -> None:
    answers = ["10000012344", *GOOD[:5], "261037511200583", *GOOD[5:]]
    code, out = run(home, answers)
    assert code == 0, out
    assert "should be 3, not 4" in out       # the RPPS's check digit
    assert "should be 08, not 83" in out     # the NIR's key


def test_french_messages_and_impossible_dates(home: Path) -> None:
    answers = [*GOOD[:3], "31/02/1961", "2090-01-01", *GOOD[3:]]
    code, out = run(home, answers, lang="fr")
    assert code == 0, out
    assert "Date de naissance" in out
    assert "n'existe pas" in out or "invalide" in out
    assert "futur" in out


def test_no_consent_no_request(home: Path) -> None:
    answers = [*GOOD[:10], "y", "n", "n", ""]
    result = invoke(home, answers)
    assert isinstance(result.exception, CaseFormError)
    assert "no téléexpertise without the patient's consent" in str(result.exception)
    assert not list((home / "outbox").glob("*/*")) if (home / "outbox").exists() else True
