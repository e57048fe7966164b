"""The DKIM key store: file modes, rotation, public records."""

from __future__ import annotations

import base64
import datetime
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postwarden import bootstrap
from postwarden.dkim_keys import (
    DkimKeyError,
    KeyStore,
    default_selector,
    mirror,
    public_record,
    snapshot,
)

DOMAIN = "example.test"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> KeyStore:
    return KeyStore.for_data_dir(data_dir)


def test_layout_and_modes(store: KeyStore, data_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        key = store.generate(DOMAIN, "sel1")
        ed = store.generate(DOMAIN, "sel2", "ed25519", activate=True)
    finally:
        os.umask(old)
    assert key.path == data_dir / "dkim" / DOMAIN / "sel1.rsa.key"
    assert ed.path == data_dir / "dkim" / DOMAIN / "sel2.ed25519.key"
    for d in (data_dir, data_dir / "dkim", data_dir / "dkim" / DOMAIN):
        assert mode(d) == 0o700, d
    for f in (key.path, ed.path, data_dir / "dkim" / DOMAIN / "state.json"):
        assert mode(f) == 0o600, f
    assert not [p for p in key.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert key.path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_rsa_is_2048_bits_and_ed25519_is_ed25519(store: KeyStore) -> None:
    private = store.generate(DOMAIN, "r").private_key()
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert private.public_key().public_numbers().e == 65537
    assert isinstance(store.generate(DOMAIN, "e", "ed25519").private_key(),
                      ed25519.Ed25519PrivateKey)


def test_public_record_rsa(store: KeyStore) -> None:
    key = store.generate(DOMAIN, "sel1")
    record = public_record(key)
    assert record.startswith("v=DKIM1; k=rsa; p=")
    der = base64.b64decode(record.split("p=", 1)[1], validate=True)
    public = serialization.load_der_public_key(der)  # SubjectPublicKeyInfo
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.public_numbers() == key.private_key().public_key().public_numbers()
    assert key.dns_name == "sel1._domainkey.example.test"


def test_public_record_ed25519_is_the_raw_32_byte_key(store: KeyStore) -> None:
    key = store.generate(DOMAIN, "sel1", "ed25519")
    record = public_record(key)
    assert record.startswith("v=DKIM1; k=ed25519; p=")
    raw = base64.b64decode(record.split("p=", 1)[1], validate=True)
    assert len(raw) == 32  # RFC 8463 4.2: not wrapped in SubjectPublicKeyInfo
    private = key.private_key()
    assert raw == private.public_key().public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)
    assert key.signature_algorithm == "ed25519-sha256"


def test_rotation_without_downtime(store: KeyStore, data_dir: Path) -> None:
    old = store.generate(DOMAIN, "old", activate=True)
    assert [k.selector for k in store.active(DOMAIN)] == ["old"]
    # A new key is inactive until its record is published and it is activated.
    new = store.generate(DOMAIN, "new")
    assert not new.active
    assert [k.selector for k in store.active(DOMAIN)] == ["old"]
    store.activate(DOMAIN, "new")
    assert [k.selector for k in store.active(DOMAIN)] == ["new", "old"]  # overlap
    store.deactivate(DOMAIN, old.selector)
    assert [k.selector for k in store.active(DOMAIN)] == ["new"]
    # The old key stays on disk (its record stays published for a while).
    assert [(k.selector, k.active) for k in store.list_keys(DOMAIN)] == [
        ("new", True), ("old", False)]
    state = json.loads((data_dir / "dkim" / DOMAIN / "state.json").read_text())
    assert state == {"active": ["new"]}
    # Idempotent both ways.
    store.activate(DOMAIN, "new")
    store.deactivate(DOMAIN, "old")
    assert [k.selector for k in store.active(DOMAIN)] == ["new"]


def test_dual_signing_keys_rsa_first(store: KeyStore) -> None:
    store.generate(DOMAIN, "a-ed", "ed25519", activate=True)
    store.generate(DOMAIN, "z-rsa", "rsa", activate=True)
    assert [k.algorithm for k in store.active(DOMAIN)] == ["rsa", "ed25519"]


def test_a_selector_is_never_overwritten(store: KeyStore) -> None:
    key = store.generate(DOMAIN, "sel1")
    pem = key.path.read_bytes()
    with pytest.raises(DkimKeyError, match="already exists"):
        store.generate(DOMAIN, "sel1")
    with pytest.raises(DkimKeyError, match="already exists"):
        store.generate(DOMAIN, "SEL1", "ed25519")  # one selector, one key
    assert key.path.read_bytes() == pem


def test_default_selectors() -> None:
    day = datetime.date(2026, 3, 9)
    assert default_selector("rsa", day) == "pw202603"
    assert default_selector("ed25519", day) == "pw202603e"


def test_default_selector_used(store: KeyStore) -> None:
    assert store.generate(DOMAIN).selector == default_selector("rsa")
    assert store.generate(DOMAIN, algorithm="ed25519").selector == default_selector("ed25519")


@pytest.mark.parametrize("domain", ["../etc", "a/b", "", ".", "a..b", "-a.test", "ä.test",
                                    "a b.test"])
def test_unsafe_domain_names_are_refused(store: KeyStore, domain: str) -> None:
    with pytest.raises(DkimKeyError):
        store.generate(domain, "sel1")


@pytest.mark.parametrize("selector", ["../x", "a/b", "a..b", "x.rsa.key/..", "-x", "s_1"])
def test_unsafe_selectors_are_refused(store: KeyStore, selector: str) -> None:
    with pytest.raises(DkimKeyError):
        store.generate(DOMAIN, selector)


def test_names_are_lower_cased(store: KeyStore) -> None:
    key = store.generate("Example.TEST.", "Sel.One")
    assert (key.domain, key.selector) == ("example.test", "sel.one")
    assert store.get("EXAMPLE.test", "SEL.ONE").path == key.path


def test_unknown_selector_and_algorithm(store: KeyStore) -> None:
    with pytest.raises(DkimKeyError, match="no DKIM key"):
        store.activate(DOMAIN, "nope")
    with pytest.raises(DkimKeyError, match="algorithm"):
        store.generate(DOMAIN, "sel1", "dsa")


def test_broken_key_cannot_be_activated(store: KeyStore) -> None:
    key = store.generate(DOMAIN, "sel1")
    key.path.write_text("garbage")
    with pytest.raises(DkimKeyError, match="PEM"):
        store.activate(DOMAIN, "sel1")
    assert store.active(DOMAIN) == []


def test_corrupt_state_file_is_an_error(store: KeyStore, data_dir: Path) -> None:
    store.generate(DOMAIN, "sel1", activate=True)
    (data_dir / "dkim" / DOMAIN / "state.json").write_text("{")
    with pytest.raises(DkimKeyError, match="JSON"):
        store.active(DOMAIN)


def test_listing(store: KeyStore) -> None:
    assert store.domains() == [] and store.list_keys(DOMAIN) == []
    store.generate(DOMAIN, "b")
    store.generate(DOMAIN, "a", "ed25519")
    store.generate("other.test", "c")
    (store.root / DOMAIN / "notes.txt").write_text("ignored")
    assert store.domains() == ["example.test", "other.test"]
    assert [(k.selector, k.algorithm) for k in store.list_keys(DOMAIN)] == [
        ("a", "ed25519"), ("b", "rsa")]


def test_init_dkim(data_dir: Path) -> None:
    keys = bootstrap.init_dkim(data_dir, DOMAIN)
    assert [(k.algorithm, k.active, k.selector) for k in keys] == [
        ("rsa", True, default_selector("rsa"))]
    assert mode(keys[0].path) == 0o600
    # Again (init --force): the same key, not a new one.
    again = bootstrap.init_dkim(data_dir, DOMAIN)
    assert again == keys
    assert len(KeyStore.for_data_dir(data_dir).list_keys(DOMAIN)) == 1


# ---- copies of the shared keys (PostgreSQL backend) -------------------------

def test_a_mirror_holds_exactly_the_rows_private_and_signing_as_they_say(
        store: KeyStore, tmp_path: Path) -> None:
    store.generate(DOMAIN, "a", "rsa", activate=True)
    store.generate(DOMAIN, "b", "ed25519")
    store.generate("other.test", "c", "ed25519", activate=True)
    rows = snapshot(store)
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        (DOMAIN, "a", "rsa", True), (DOMAIN, "b", "ed25519", False),
        ("other.test", "c", "ed25519", True)]
    copy = KeyStore(tmp_path / "copy" / "dkim")
    mirror(copy, rows)
    assert snapshot(copy) == rows
    assert [k.selector for k in copy.active(DOMAIN)] == ["a"]
    for key in copy.list_keys(DOMAIN):
        assert mode(key.path) == 0o600 and mode(key.path.parent) == 0o700
    # A key gone from the rows is removed; activation follows the rows.
    mirror(copy, [(DOMAIN, "b", "ed25519", rows[1][3], True)])
    assert [k.selector for k in copy.list_keys(DOMAIN)] == ["b"]
    assert [k.selector for k in copy.active(DOMAIN)] == ["b"]
    assert copy.list_keys("other.test") == []


@pytest.mark.parametrize(("domain", "selector", "algorithm"), [
    ("../etc", "a", "rsa"), (DOMAIN, "a/b", "rsa"), (DOMAIN, "..", "rsa"),
    (DOMAIN, "a", "dsa")])
def test_a_mirror_refuses_rows_whose_names_are_not_safe_paths(
        tmp_path: Path, domain: str, selector: str, algorithm: str) -> None:
    copy = KeyStore(tmp_path / "dkim")
    with pytest.raises(DkimKeyError):
        mirror(copy, [(domain, selector, algorithm, b"pem", True)])
    assert not (tmp_path / "etc").exists()
