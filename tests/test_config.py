"""config.parse/load: every problem is a ConfigError naming the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from postwarden import config


def base() -> dict[str, Any]:
    return {
        "hostname": "mail.example.org",
        "data_dir": "data",
        "domains": ["example.org"],
        "listeners": {
            "mx": {"address": "127.0.0.1:25"},
            "submission": {"address": "127.0.0.1:587"},
            "submissions": {"address": "[::1]:465"},
        },
        "tls": {"cert": "tls/cert.pem", "key": "tls/key.pem"},
    }


def with_(path: str, value: Any) -> dict[str, Any]:
    """``base()`` with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    data = copy.deepcopy(base())
    *parents, last = path.split(".")
    table = data
    for p in parents:
        table = table.setdefault(p, {})
    if value is ...:
        del table[last]
    else:
        table[last] = value
    return data


def test_valid(tmp_path: Path) -> None:
    cfg = config.parse(base(), tmp_path / "postwarden.toml")
    assert cfg.hostname == "mail.example.org"
    assert cfg.data_dir == tmp_path.resolve() / "data"
    assert cfg.db_path == cfg.data_dir / "postwarden.db"
    assert cfg.domains == ("example.org",)
    sub = cfg.listener("submissions")
    assert sub is not None and (sub.host, sub.port, sub.implicit_tls) == ("::1", 465, True)
    mx = cfg.listener("mx")
    assert mx is not None and not mx.auth_required
    assert cfg.tls.key == tmp_path.resolve() / "tls/key.pem"
    assert cfg.tls.min_version == "TLSv1.2"


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        (with_("hostname", ...), "hostname", "is required"),
        (with_("hostname", ""), "hostname", "non-empty"),
        (with_("hostname", "bad_host.example"), "hostname", "not a valid domain"),
        (with_("hostname", 42), "hostname", "non-empty string"),
        (with_("hostname", "mäil.example.org"), "hostname", "A-label"),
        (with_("domains", "example.org"), "domains", "list"),
        (with_("domains", ["ex ample.org"]), "domains", "not a valid domain"),
        (with_("colour", "blue"), "colour", "unknown key"),
        (with_("listeners.mx.port", 25), "listeners.mx.port", "unknown key"),
        (with_("tls.ciphers", "ALL"), "tls.ciphers", "unknown key"),
        (with_("limits.max_size", 1), "limits.max_size", "unknown key"),
        (with_("listeners.mx.address", ...), "listeners.mx.address", "is required"),
        (with_("listeners.mx.address", "127.0.0.1"), "listeners.mx.address", "HOST:PORT"),
        (with_("listeners.mx.address", ":25"), "listeners.mx.address", "HOST:PORT"),
        (with_("listeners.mx.address", 25), "listeners.mx.address", "string"),
        (with_("listeners.mx.address", "127.0.0.1:smtp"), "listeners.mx.address",
         "not a number"),
        (with_("listeners.mx.address", "127.0.0.1:70000"), "listeners.mx.address",
         "out of range"),
        (with_("listeners.mx.address", "mail.example.org:25"), "listeners.mx.address",
         "not an IP address"),
        (with_("listeners.mx.address", "::1:25"), "listeners.mx.address", "[ADDR]:PORT"),
        (with_("listeners.mx.address", "[::1]25"), "listeners.mx.address", "[IPv6]:PORT"),
        (with_("listeners.mx.address", "[::1"), "listeners.mx.address", "[IPv6]:PORT"),
        (with_("listeners.mx.address", "[nope]:25"), "listeners.mx.address",
         "not an IP address"),
        (with_("listeners.mx.mode", "relay"), "listeners.mx.mode", "must be one of"),
        (with_("listeners.mx.enabled", "yes"), "listeners.mx.enabled", "true or false"),
        (with_("listeners.mx", "127.0.0.1:25"), "listeners.mx", "must be a table"),
        (with_("tls", ...), "listeners.submission", "needs TLS"),
        (with_("tls.key", ...), "tls", "together"),
        (with_("tls.min_version", "TLSv1.0"), "tls.min_version", "must be one of"),
        (with_("tls.min_version", "1.3"), "tls.min_version", "must be one of"),
        (with_("limits.recipients_max", "100"), "limits.recipients_max", "number"),
        (with_("limits.recipients_max", 1.5), "limits.recipients_max", "integer"),
        (with_("limits.recipients_max", -1), "limits.recipients_max", "at least"),
        (with_("limits.command_timeout", True), "limits.command_timeout", "number"),
        (with_("queue.workers", 0.5), "queue.workers", "integer"),
        (with_("delivery.chunking", "no"), "delivery.chunking", "true or false"),
        (with_("log.format", "xml"), "log.format", "must be one of"),
        (with_("log.level", "trace"), "log.level", "must be one of"),
    ],
)
def test_parse_errors(data: dict[str, Any], key: str, problem: str, tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(data, tmp_path / "postwarden.toml")
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{key}: ")


def test_delivery_chunking_defaults_on(tmp_path: Path) -> None:
    assert config.parse(base(), tmp_path / "postwarden.toml").delivery.chunking
    off = config.parse(with_("delivery.chunking", False), tmp_path / "postwarden.toml")
    assert off.delivery.chunking is False


def test_submission_without_tls_is_fine_when_disabled(tmp_path: Path) -> None:
    data = with_("tls", ...)
    data["listeners"]["submission"]["enabled"] = False
    data["listeners"]["submissions"]["enabled"] = False
    cfg = config.parse(data, tmp_path / "postwarden.toml")
    assert cfg.tls.cert is None


def _files(tmp_path: Path, key_mode: int) -> Path:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls/cert.pem").write_text("cert")
    key = tmp_path / "tls/key.pem"
    key.write_text("key")
    key.chmod(key_mode)
    path = tmp_path / "postwarden.toml"
    path.write_text(
        'hostname = "mail.example.org"\n'
        '[listeners.submission]\naddress = "127.0.0.1:587"\n'
        '[tls]\ncert = "tls/cert.pem"\nkey = "tls/key.pem"\n')
    return path


def test_load_accepts_private_key(tmp_path: Path) -> None:
    cfg = config.load(_files(tmp_path, 0o600))
    assert cfg.tls.key is not None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_load_refuses_key_readable_by_others(tmp_path: Path, mode: int) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(_files(tmp_path, mode))
    assert info.value.key == "tls.key"
    assert "readable by others" in info.value.problem
    # Commands that do not use TLS may skip the file checks.
    config.load(tmp_path / "postwarden.toml", check_files=False)


def test_load_missing_cert(tmp_path: Path) -> None:
    path = _files(tmp_path, 0o600)
    (tmp_path / "tls/cert.pem").unlink()
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert info.value.key == "tls.cert"


def test_load_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("hostname = \n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(bad)


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    assert config.default_path() == Path("postwarden.toml")
    monkeypatch.setenv(config.CONFIG_ENV, str(tmp_path / "x.toml"))
    assert config.default_path() == tmp_path / "x.toml"
