"""Relay settings: defaults, TOML file, environment, flags, in that order; clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.cli import redact
from relay.config import ConfigError, RelayConfig, load_config


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == RelayConfig()
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8470)


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "relay.toml"
    f.write_text('[relay]\ndata = "/srv/pli"\nmax_request = 1024\nlisten = "0.0.0.0:9000"\n')
    cfg = load_config(file=f, env={"PLI_RELAY_MAX_REQUEST": "2048"}, overrides={"listen": "[::1]:0"})
    assert cfg.data == Path("/srv/pli")
    assert cfg.max_request == 2048
    assert (cfg.host, cfg.port) == ("::1", 0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[relay]\nunknown_setting = 1\n", "unknown setting"),
        ("[relay]\nmax_request = 'lots'\n", "max_request"),
        ("[relay\n", "config file"),
        ('[relay]\nlisten = "nohost"\n', "HOST:PORT"),
        ("[relay]\nmax_envelope = 0\n", "must be positive"),
        ('[relay]\nlog_format = "xml"\n', "log_format"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "relay.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(file=f, env={})


def test_bad_environment_value() -> None:
    with pytest.raises(ConfigError, match="max_skew"):
        load_config(env={"PLI_RELAY_MAX_SKEW": "five"})


def test_redaction_masks_secrets_and_bytes() -> None:
    event = {"event": "x", "invitation_code": "ABCDE", "sign_key": b"k" * 32, "blob": b"\x00" * 10, "size": 3}
    out = redact(None, "info", event)
    assert out["invitation_code"] == "[redacted]"
    assert out["sign_key"] == "[redacted]"
    assert out["blob"] == "[10 bytes]"
    assert out["size"] == 3
