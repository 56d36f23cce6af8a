"""The documents stay true: every test the threat model cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_threat_model_cites_only_tests_that_exist() -> None:
    text = (ROOT / "docs" / "THREAT_MODEL.md").read_text(encoding="utf-8")
    files = set(re.findall(r"tests/(test_[a-z_]+)\.py", text))
    assert files, "the threat model cites no test"
    defined = {
        m for f in (ROOT / "tests").glob("test_*.py")
        for m in re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", f.read_text(encoding="utf-8"), re.MULTILINE)
    }
    for f in files:
        assert (ROOT / "tests" / f"{f}.py").is_file(), f
    cited = set(re.findall(r"::(test_[a-z0-9_]+)", text))
    assert cited - defined == set()
