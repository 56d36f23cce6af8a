"""The audit package decoder, fuzzed (issue "A hostile world"): whatever a rogue exporter
puts in a package — any JSON in place of any field, any bytes anywhere in the file — the
verifier returns a report or raises its typed error, never another exception, and never
reports a package it could not fully check as verified."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import audit
from protocol.errors import PliError
from tests.test_audit import Case, _rewrite, case, start_relay  # noqa: F401 - the fixtures

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=40)
    | st.binary(max_size=40).map(lambda b: b.hex()),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in the document a value can be replaced."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _unsigned(place: tuple[Any, ...]) -> bool:
    """Labels the package carries without proof, and says so: who exported it, when, whether
    it refreshed its receipts online, and
    practitioners' names ("as the relay's directory gave them"). Changing them changes what
    is shown, not what is verified."""
    return place[0] in ("exported_at", "exported_by", "online_refresh") or (
        place[0] == "devices" and place[-1] == "name")


def _proved(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without its unproved labels (see _unsigned)."""
    out = {k: v for k, v in doc.items() if k not in ("exported_at", "exported_by", "online_refresh")}
    if isinstance(out.get("devices"), list):
        out["devices"] = [{k: v for k, v in d.items() if k != "name"} if isinstance(d, dict) else d
                          for d in out["devices"]]
    return out


def _outcome(path: Path) -> bool:
    """True if the verifier called it verified; it may only ever refuse in its own words."""
    try:
        return audit.verify_package(path).ok
    except PliError:
        return False


# CI runs a fixed set of examples; FUZZ_N=5000 runs a longer, random campaign.
_N = os.environ.get("FUZZ_N")
FUZZ = settings(max_examples=int(_N or 120), deadline=None, derandomize=_N is None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


async def test_any_json_anywhere_is_reported_not_crashed(case: Case, tmp_path: Path) -> None:  # noqa: F811
    original, _ = audit._read_package(case.package, hash_files=False)
    places = _paths(original)
    out = tmp_path / "fuzzed.pliaudit"

    @FUZZ
    @given(st.sampled_from(places), JSON)
    def replace_one(place: tuple[Any, ...], value: Any) -> None:
        def change(doc: dict[str, Any], _content: dict[str, bytes]) -> None:
            target: Any = doc
            for key in place[:-1]:
                target = target[key]
            target[place[-1]] = copy.deepcopy(value)

        _rewrite(case.package, out, change)
        try:
            doc, _ = audit._read_package(out, hash_files=False)
        except PliError:
            doc = None
        if doc == original or _unsigned(place):
            return  # the value drawn was the one already there, or a label shown as unproved
        assert not _outcome(out), (place, value)

    replace_one()


async def test_any_bytes_anywhere_are_reported_not_crashed(case: Case, tmp_path: Path) -> None:  # noqa: F811
    data = case.package.read_bytes()
    out = tmp_path / "mutated.pliaudit"

    @FUZZ
    @given(st.integers(0, len(data) - 1), st.binary(min_size=1, max_size=16), st.booleans())
    def mutate(at: int, patch: bytes, truncate: bool) -> None:
        mutated = data[:at] if truncate else data[:at] + patch + data[at + len(patch):]
        out.write_bytes(mutated)
        if _outcome(out):
            # Still valid: the change was in tar framing or padding, or it cut off whole
            # envelopes' content (a package may carry content or not); nothing else.
            doc, content = audit._read_package(out, hash_files=False)
            original_doc, original_content = audit._read_package(case.package, hash_files=False)
            assert _proved(doc) == _proved(original_doc), [k for k in doc if doc.get(k) != original_doc.get(k)]
            for eid in {name.split("/")[1] for name in original_content}:
                mine = {k: v for k, v in original_content.items() if k.split("/")[1] == eid}
                kept = {k: v for k, v in content.items() if k.split("/")[1] == eid}
                assert kept in (mine, {}), eid

    mutate()


def test_audit_json_must_be_json(tmp_path: Path) -> None:
    import io  # noqa: PLC0415
    import tarfile  # noqa: PLC0415

    out = tmp_path / "p.pliaudit"
    with tarfile.open(out, "w") as tar:
        body = b"{" + json.dumps({"format": audit.FORMAT}).encode()
        info = tarfile.TarInfo("audit.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    assert not _outcome(out)
