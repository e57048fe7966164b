"""DKIM signing keys: generation, storage, and which selectors sign.

Layout, under ``<data_dir>/dkim`` (every directory 0700)::

    <domain>/<selector>.rsa.key        PEM (PKCS#8), mode 0600
    <domain>/<selector>.ed25519.key    PEM (PKCS#8), mode 0600
    <domain>/state.json                {"active": ["<selector>", ...]}

A selector names one key, whatever its algorithm: the DNS record
``<selector>._domainkey.<domain>`` holds one public key (RFC 6376 3.6.2.1).
Several active selectors mean several signatures per message: one RSA and
one Ed25519 key give the dual signing of RFC 8463 3, and two keys of the
same algorithm are the overlap of a rotation.

Rotation without downtime: ``generate`` a new selector (inactive), publish
its record (:func:`public_record`), wait until ``postwarden dns check``
sees it, ``activate`` it, then ``deactivate`` the old one (and keep the old
record published for a few days, for messages still in transit).

Key files are created once (``O_EXCL``) with their final mode and never
rewritten; the state file is replaced atomically (temporary file, fsync,
rename, fsync of the directory), so a crash leaves the old or the new set
of active selectors, never a torn one.

Security exposure: holds private keys.  Names of files come from domain
names and selectors given by the administrator; both are checked to be DNS
labels (letters, digits, hyphens; no empty label, so no ``..`` and no
``/``) before they become paths.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("rsa", "ed25519")
# RFC 8301 3.2: at least 1024 bits, SHOULD be 2048 for signers.
RSA_BITS = 2048
RSA_EXPONENT = 65537
STATE_FILE = "state.json"
KEY_SUFFIX = ".key"
DIR_MODE = 0o700
KEY_MODE = 0o600
# The suffix of a default Ed25519 selector (pw202611 and pw202611e).
ED25519_SELECTOR_SUFFIX = "e"
# RFC 1035 2.3.4: labels of at most 63 octets, names of at most 255.
LABEL_MAX = 63
NAME_MAX = 253

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
# Parsed keys by file, with the mtime they were read at (signing threads share it).
_KEY_CACHE: dict[Path, tuple[int, PrivateKey]] = {}
_KEY_CACHE_LOCK = threading.Lock()


class DkimKeyError(Exception):
    """A key operation failed; the message is one line for the CLI."""


@dataclass(frozen=True, slots=True)
class Key:
    """One key on disk.  ``active``: it signs outgoing mail."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    path: Path
    active: bool = False

    @property
    def dns_name(self) -> str:
        """Where the public key is published (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def signature_algorithm(self) -> str:
        """The ``a=`` tag (RFC 6376 3.3, RFC 8463 3)."""
        return "rsa-sha256" if self.algorithm == "rsa" else "ed25519-sha256"

    def private_key(self) -> PrivateKey:
        """The parsed private key; parsed again only when the file changed
        (every submitted message is signed: no read and parse per message)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as exc:
            raise DkimKeyError(f"cannot read DKIM key {self.path}: {exc.strerror}") from None
        with _KEY_CACHE_LOCK:
            cached = _KEY_CACHE.get(self.path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        key = self._load_private_key()
        with _KEY_CACHE_LOCK:
            _KEY_CACHE[self.path] = (mtime, key)
        return key

    def _load_private_key(self) -> PrivateKey:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise DkimKeyError(f"cannot read DKIM key {self.path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise DkimKeyError(f"{self.path}: not a PEM private key ({exc})") from None
        if self.algorithm == "rsa" and isinstance(key, rsa.RSAPrivateKey):
            return key
        if self.algorithm == "ed25519" and isinstance(key, ed25519.Ed25519PrivateKey):
            return key
        raise DkimKeyError(f"{self.path}: not an {self.algorithm} private key")

    def public_key_b64(self) -> str:
        """The ``p=`` value: base64 of the DER SubjectPublicKeyInfo for RSA
        (RFC 6376 3.6.1), of the raw 32-octet public key for Ed25519
        (RFC 8463 4.2)."""
        return public_key_b64(self.private_key())


def public_key_b64(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_record(key: Key) -> str:
    """The TXT record value to publish at ``key.dns_name``."""
    k = "rsa" if key.algorithm == "rsa" else "ed25519"
    return f"v=DKIM1; k={k}; p={key.public_key_b64()}"


def default_selector(algorithm: str = "rsa", when: datetime.date | None = None) -> str:
    """``pw<YYYYMM>`` for RSA, ``pw<YYYYMM>e`` for Ed25519."""
    day = when or datetime.datetime.now(datetime.UTC).date()
    base = f"pw{day.year:04d}{day.month:02d}"
    return base + (ED25519_SELECTOR_SUFFIX if algorithm == "ed25519" else "")


def _check_name(text: str, what: str) -> str:
    """A DNS name of LDH labels, lower-cased, without a trailing dot.  The
    result is safe as one path component (no "/", no empty label)."""
    name = text.strip().lower().removesuffix(".")
    if not name or len(name) > NAME_MAX or not name.isascii():
        raise DkimKeyError(f"{what} {text!r} is not a valid DNS name (ASCII, A-labels)")
    for label in name.split("."):
        if (not label or len(label) > LABEL_MAX or label[0] == "-" or label[-1] == "-"
                or not all(c.isalnum() or c == "-" for c in label)):
            raise DkimKeyError(f"{what} {text!r} is not a valid DNS name")
    return name


def check_domain(text: str) -> str:
    return _check_name(text, "domain")


def check_selector(text: str) -> str:
    # RFC 6376 3.1: selector = sub-domain *( "." sub-domain ).
    return _check_name(text, "selector")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) with ``mode`` from the start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise DkimKeyError(f"{path} already exists") from None
    try:
        os.fchmod(fd, mode)  # not widened by the umask, nor narrowed
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    _fsync_dir(path.parent)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_private_key(algorithm: str) -> PrivateKey:
    if algorithm == "rsa":
        return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS)
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise DkimKeyError(f"unknown DKIM key algorithm {algorithm!r} "
                       f"(one of {', '.join(ALGORITHMS)})")


class KeyStore:
    """The keys under ``root`` (``<data_dir>/dkim``).  Every call reads the
    disk: the CLI and a running server share the store without a cache."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> KeyStore:
        return cls(data_dir / "dkim")

    # -- paths and state

    def _domain_dir(self, domain: str) -> Path:
        return self.root / check_domain(domain)

    def _ensure_dir(self, domain: str) -> Path:
        path = self._domain_dir(domain)
        # Every directory created here is private, the missing data
        # directory included (mkdir's parents=True would use the umask).
        missing = [d for d in (path, *path.parents) if not d.exists()]
        for d in reversed(missing):
            d.mkdir(mode=DIR_MODE, exist_ok=True)
        for d in (self.root, path):
            os.chmod(d, DIR_MODE)
        return path

    def _read_state(self, domain: str) -> list[str]:
        path = self._domain_dir(domain) / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise DkimKeyError(f"cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise DkimKeyError(f"{path}: not valid JSON ({exc})") from None
        active = data.get("active") if isinstance(data, dict) else None
        if not isinstance(active, list) or not all(isinstance(s, str) for s in active):
            raise DkimKeyError(f"{path}: \"active\" must be a list of selectors")
        return [check_selector(s) for s in active]

    def _write_state(self, domain: str, active: Iterable[str]) -> None:
        path = self._ensure_dir(domain) / STATE_FILE
        data = json.dumps({"active": sorted(set(active))}, indent=2) + "\n"
        _write_atomic(path, data.encode("utf-8"), KEY_MODE)

    # -- queries

    def domains(self) -> list[str]:
        """Domains that have a key directory."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            try:
                name = check_domain(p.name)
            except DkimKeyError:
                continue
            if p.is_dir() and name == p.name:
                out.append(name)
        return sorted(out)

    def list_keys(self, domain: str) -> list[Key]:
        """Every key of ``domain``, sorted by selector."""
        domain = check_domain(domain)
        directory = self._domain_dir(domain)
        if not directory.is_dir():
            return []
        active = set(self._read_state(domain))
        keys = []
        for p in directory.iterdir():
            parts = p.name.rsplit(".", 2)
            if len(parts) != 3 or "." + parts[2] != KEY_SUFFIX or parts[1] not in ALGORITHMS:
                continue
            try:
                selector = check_selector(parts[0])
            except DkimKeyError:
                continue
            keys.append(Key(domain, selector, parts[1], p, selector in active))
        return sorted(keys, key=lambda k: (k.selector, k.algorithm))

    def get(self, domain: str, selector: str) -> Key:
        selector = check_selector(selector)
        for key in self.list_keys(domain):
            if key.selector == selector:
                return key
        raise DkimKeyError(f"no DKIM key {selector} for {check_domain(domain)}")

    def active(self, domain: str) -> list[Key]:
        """The keys that sign mail from ``domain`` (RSA first: RFC 8463 3
        suggests signing with both while verifiers catch up)."""
        keys = [k for k in self.list_keys(domain) if k.active]
        return sorted(keys, key=lambda k: (ALGORITHMS.index(k.algorithm), k.selector))

    # -- changes

    def generate(self, domain: str, selector: str | None = None, algorithm: str = "rsa",
                 *, activate: bool = False) -> Key:
        """Create a new key (inactive unless ``activate``).  An existing
        selector is never overwritten."""
        if algorithm not in ALGORITHMS:
            raise DkimKeyError(f"unknown DKIM key algorithm {algorithm!r} "
                               f"(one of {', '.join(ALGORITHMS)})")
        domain = check_domain(domain)
        selector = check_selector(selector or default_selector(algorithm))
        if any(k.selector == selector for k in self.list_keys(domain)):
            raise DkimKeyError(f"DKIM selector {selector} already exists for {domain}")
        directory = self._ensure_dir(domain)
        path = directory / f"{selector}.{algorithm}{KEY_SUFFIX}"
        _write_new(path, _private_pem(new_private_key(algorithm)), KEY_MODE)
        if activate:
            return self.activate(domain, selector)
        return Key(domain, selector, algorithm, path, False)

    def activate(self, domain: str, selector: str) -> Key:
        key = self.get(domain, selector)
        key.private_key()  # never activate a key that cannot sign
        if not key.active:
            self._write_state(key.domain, [*self._read_state(key.domain), key.selector])
        return Key(key.domain, key.selector, key.algorithm, key.path, True)

    def deactivate(self, domain: str, selector: str) -> Key:
        key = self.get(domain, selector)
        if key.active:
            self._write_state(key.domain,
                              [s for s in self._read_state(key.domain) if s != key.selector])
        return Key(key.domain, key.selector, key.algorithm, key.path, False)


# One key as the PostgreSQL backend stores it: (domain, selector,
# algorithm, private key PEM, active).
KeyRow = tuple[str, str, str, bytes, bool]


def snapshot(store: KeyStore) -> list[KeyRow]:
    """Every key of ``store`` with its PEM, sorted (what
    :mod:`postwarden.storage.pg_dkim` writes to the shared table)."""
    rows: list[KeyRow] = []
    for domain in store.domains():
        for key in store.list_keys(domain):
            try:
                pem = key.path.read_bytes()
            except OSError as exc:
                raise DkimKeyError(f"cannot read DKIM key {key.path}: {exc.strerror}") from None
            rows.append((domain, key.selector, key.algorithm, pem, key.active))
    return sorted(rows)


def mirror(store: KeyStore, rows: Iterable[KeyRow]) -> None:
    """Make the files of ``store`` hold exactly ``rows``: missing or changed
    key files written (0600, atomically), the others removed, each domain's
    active selectors set.  Names are checked as everywhere here before they
    become paths; a row with a bad name or algorithm is refused."""
    wanted: dict[str, dict[str, tuple[str, bytes, bool]]] = {}
    for domain, selector, algorithm, pem, active in rows:
        if algorithm not in ALGORITHMS:
            raise DkimKeyError(f"DKIM key {selector} of {domain}: unknown algorithm "
                               f"{algorithm!r}")
        wanted.setdefault(check_domain(domain), {})[check_selector(selector)] = (
            algorithm, bytes(pem), bool(active))
    for domain in sorted(set(store.domains()) | set(wanted)):
        keys = wanted.get(domain, {})
        directory = store._ensure_dir(domain)
        names = {f"{sel}.{alg}{KEY_SUFFIX}": pem for sel, (alg, pem, _a) in keys.items()}
        for key in store.list_keys(domain):
            if key.path.name not in names:
                key.path.unlink(missing_ok=True)
        for name, pem in names.items():
            path = directory / name
            if not path.exists() or path.read_bytes() != pem:
                _write_atomic(path, pem, KEY_MODE)
        signing = sorted(sel for sel, (_alg, _pem, on) in keys.items() if on)
        if sorted(set(store._read_state(domain))) != signing:
            store._write_state(domain, signing)
