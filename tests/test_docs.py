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


def test_every_package_is_installed_by_a_plain_pip_install() -> None:
    """A non-editable install (deploy/README.md's) ships exactly the packages pyproject lists:
    a subpackage forgotten there works under ``pip install -e`` and fails in production."""
    import tomllib  # noqa: PLC0415

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("protocol", "relay", "client")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed
