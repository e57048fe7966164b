"""MTA-STS (RFC 8461): the recipient domain's published outbound TLS policy.

:class:`MtaSts` answers one question for :mod:`postwarden.delivery.remote`:
which :class:`Policy` does a recipient domain publish, if any?

* Discovery (RFC 8461 3.1): the TXT record ``_mta-sts.<domain>``
  (``v=STSv1; id=...``) says a policy exists and names its version.
* Fetch (RFC 8461 3.3): ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
  over HTTPS with a certificate valid for ``mta-sts.<domain>``, status 200,
  no redirects, ``text/plain``, at most :data:`MAX_POLICY_SIZE` octets,
  within a timeout (:class:`PolicyFetcher`).
* Parsing (RFC 8461 3.2): :func:`parse_policy`.
* Caching (RFC 8461 5.1): by domain, for ``max_age`` seconds, with the TXT
  id it was fetched for.  A changed id triggers a refetch; a failed lookup
  or fetch keeps using an unexpired cached policy.  The cache may be kept
  in a JSON file (:class:`PolicyCache`) so that a restart does not forget
  policies: the protection is against an attacker who blocks the fetch.

Applying a policy is the transport's job: ``enforce`` allows only MX hosts
matching the policy (:meth:`Policy.matches`) and requires STARTTLS with a
certificate verified for the MX host name, failures defer (never a
downgrade); ``testing`` delivers as usual and logs what would have failed;
``none`` is no policy.

Why a hand-written HTTP/1.1 client on asyncio streams: the project has no
HTTP client dependency, RFC 8461 needs a tiny subset of HTTP (one GET, no
redirects, no cookies, no proxies), and the fetch must connect to the
address our own resolver gives (so that tests and split-horizon setups can
redirect it) with an explicit TLS context.  urllib would follow redirects,
read unbounded headers and block the event loop.

Security exposure: everything here comes from the recipient domain
(untrusted): DNS TXT data, the HTTPS response.  The response is bounded
(header and body sizes, time), parsed strictly, never followed elsewhere,
and its only effect is to make delivery *stricter* for that domain; a
policy can never relax the configured TLS policy.  An attacker controlling
DNS and the network can suppress a policy that was never cached (RFC 8461
10.1, trust on first use); a cached policy survives such an attack until it
expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.name

from postwarden.delivery.dns import DnsError, DnsPermanent, Resolver
from postwarden.observe.log import get_logger

log = get_logger("mta_sts")

HTTPS_PORT = 443
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
# RFC 8461 3.3: "senders SHOULD impose a limit ... of 64 KB on the policy".
MAX_POLICY_SIZE = 64 * 1024
# RFC 8461 3.2: max_age is at most 31557600 seconds (about a year).
MAX_MAX_AGE = 31_557_600
# RFC 8461 3.3 suggests "a timeout"; one minute is its example upper bound.
FETCH_TIMEOUT = 10.0
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_LINES = 100
# Addresses of mta-sts.<domain> tried per fetch.
MAX_FETCH_ADDRESSES = 3
# Policies kept in the cache (memory and file).
MAX_CACHED_POLICIES = 10_000
CACHE_FILE_NAME = "mta-sts.json"
CACHE_FORMAT = 1

MODES = ("enforce", "testing", "none")

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_TXT_FIELD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")
_MX_PATTERN = re.compile(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
_MAX_AGE = re.compile(r"[0-9]{1,10}")


# -- settings ------------------------------------------------------------


def _bool(table: Mapping[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}: must be true or false")
    return value


@dataclass(frozen=True, slots=True)
class MtaStsSettings:
    """``[delivery]`` keys: ``mta_sts`` (apply recipient domains' MTA-STS
    policies), ``mta_sts_timeout`` (seconds for one policy fetch),
    ``mta_sts_cache`` (keep policies in ``<data_dir>/mta-sts.json``)."""

    enabled: bool = True
    timeout: float = FETCH_TIMEOUT
    cache: bool = True

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> MtaStsSettings:
        """From the ``[delivery]`` table (other keys are ignored); raises
        ``ValueError("KEY: reason")``."""
        timeout = table.get("mta_sts_timeout", FETCH_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ValueError("mta_sts_timeout: must be a number")
        if not 0 < timeout <= 300:
            raise ValueError("mta_sts_timeout: must be more than 0 and at most 300")
        return cls(enabled=_bool(table, "mta_sts", True), timeout=float(timeout),
                   cache=_bool(table, "mta_sts_cache", True))


# -- errors --------------------------------------------------------------


class PolicyError(Exception):
    """The policy could not be had: invalid, or the fetch failed."""


class FetchError(PolicyError):
    """The HTTPS fetch failed (connection, TLS, HTTP status, size, time)."""


# -- the TXT record and the policy --------------------------------------


def parse_txt(records: Sequence[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or ``None``.

    RFC 8461 3.1: records not starting with ``v=STSv1`` are discarded; unless
    exactly one remains, and it is valid, the domain has no policy.
    """
    candidates = [r for r in records if r.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing ";" is allowed
    if not fields or fields[0] != "v=STSv1":
        return None
    policy_id = None
    for f in fields[1:]:
        if not _TXT_FIELD.fullmatch(f):
            return None
        key, value = f.split("=", 1)
        if key == "id" and policy_id is None:
            if not _ID.fullmatch(value):
                return None
            policy_id = value
    return policy_id


def normalize_host(name: str) -> str:
    return name.strip().rstrip(".").lower()


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: ``mx.example.com`` matches itself; ``*.example.com``
    matches exactly one more label on the left (``mx1.example.com``, not
    ``example.com`` nor ``a.b.example.com``).  Case-insensitive."""
    pattern, host = normalize_host(pattern), normalize_host(host)
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy (RFC 8461 3.2); ``policy_id`` is the TXT id it was
    fetched for."""

    mode: str
    max_age: int
    mx: tuple[str, ...] = ()
    policy_id: str = ""

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"

    def matches(self, host: str) -> bool:
        """Is ``host`` (an MX host name) allowed by the ``mx`` patterns?"""
        return any(mx_matches(p, host) for p in self.mx)


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """Parse a policy body; raise :class:`PolicyError` when invalid.

    RFC 8461 3.2: ``key: value`` lines ended by LF or CRLF; ``version:
    STSv1``, ``mode``, ``max_age`` required; ``mx`` repeated (required
    unless the mode is ``none``); unknown keys ignored; of a repeated key
    other than ``mx`` the first counts.  A ``max_age`` above the RFC's
    maximum is capped to it.
    """
    values: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.split("\n"):
        line = raw.removesuffix("\r").rstrip(" \t")
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep or not key or key != key.strip():
            raise PolicyError(f"invalid policy line {line[:80]!r}")
        value = value.strip(" \t")
        if key == "mx":
            if not _MX_PATTERN.fullmatch(value):
                raise PolicyError(f"invalid mx pattern {value[:80]!r}")
            mx.append(normalize_host(value))
        else:
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        raise PolicyError("the policy is not version STSv1")
    mode = values.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"invalid policy mode {mode[:20]!r}")
    max_age_text = values.get("max_age", "")
    if not _MAX_AGE.fullmatch(max_age_text):
        raise PolicyError(f"invalid max_age {max_age_text[:20]!r}")
    if not mx and mode != "none":
        raise PolicyError("the policy lists no mx")
    return Policy(mode, min(int(max_age_text), MAX_MAX_AGE), tuple(mx), policy_id)


# -- the HTTPS fetch -----------------------------------------------------


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise FetchError("HTTP line too long") from None
    except asyncio.IncompleteReadError:
        raise FetchError("connection closed in the HTTP response") from None
    return line.rstrip(b"\r\n")


async def read_response(reader: asyncio.StreamReader, max_size: int = MAX_POLICY_SIZE
                        ) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.x response: ``(status, headers, body)``; the body
    only for a 200.  Header names lowercased.  Bounded everywhere."""
    status_line = (await _read_line(reader)).decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code_text = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not code_text.isdigit():
        raise FetchError(f"not an HTTP response: {status_line[:60]!r}")
    status = int(code_text)
    headers: dict[str, str] = {}
    size = len(status_line)
    while True:
        line = await _read_line(reader)
        size += len(line) + 2
        if size > MAX_HEADER_BYTES or len(headers) > MAX_HEADER_LINES:
            raise FetchError("HTTP response header too large")
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            raise FetchError("folded HTTP header line")  # RFC 9112 5.2
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise FetchError("invalid HTTP header line")
        name = name.lower()
        value = value.strip(" \t")
        if name not in headers:
            headers[name] = value
        elif name == "content-length":
            if headers[name] != value:
                raise FetchError("conflicting Content-Length headers")
        else:  # RFC 9110 5.3: repeated fields combine with commas
            headers[name] = f"{headers[name]}, {value}"
    if status != 200:
        return status, headers, b""
    return status, headers, await _read_body(reader, headers, max_size)


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str],
                     max_size: int) -> bytes:
    too_big = FetchError(f"policy larger than {max_size} octets")
    try:
        te = headers.get("transfer-encoding", "").strip().lower()
        if te:
            if te != "chunked":
                raise FetchError(f"unsupported Transfer-Encoding {te[:30]!r}")
            return await _read_chunked(reader, max_size)
        if "content-length" in headers:
            text = headers["content-length"]
            if not text.isdigit() or len(text) > 12:
                raise FetchError("invalid Content-Length")
            length = int(text)
            if length > max_size:
                raise too_big
            return await reader.readexactly(length)
        body = await reader.read(max_size + 1)  # until the close, bounded
        while body and len(body) <= max_size:
            more = await reader.read(max_size + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > max_size:
            raise too_big
        return body
    except asyncio.IncompleteReadError:
        raise FetchError("connection closed in the HTTP body") from None


async def _read_chunked(reader: asyncio.StreamReader, max_size: int) -> bytes:
    body = b""
    while True:
        size_text = (await _read_line(reader)).split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 8 or not all(
                c in b"0123456789abcdefABCDEF" for c in size_text):
            raise FetchError("invalid chunk size")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > max_size:
            raise FetchError(f"policy larger than {max_size} octets")
        body += await reader.readexactly(size)
        if await _read_line(reader):
            raise FetchError("invalid chunk end")
    for _ in range(MAX_HEADER_LINES):  # trailers, up to the empty line
        if not await _read_line(reader):
            return body
    raise FetchError("too many HTTP trailers")


class PolicyFetcher:
    """GET ``https://mta-sts.<domain>/.well-known/mta-sts.txt``.

    ``mta-sts.<domain>`` is resolved through ``resolver`` (A/AAAA); the TLS
    connection verifies the certificate for that name with ``ssl_context``
    (default: the system's trust store).  ``https_port`` and the context
    are parameters so that tests can serve policies on loopback.
    """

    def __init__(self, resolver: Resolver, *, https_port: int = HTTPS_PORT,
                 ssl_context: ssl.SSLContext | None = None, timeout: float = FETCH_TIMEOUT,
                 max_size: int = MAX_POLICY_SIZE) -> None:
        self.resolver = resolver
        self.https_port = https_port
        if ssl_context is None:
            ssl_context = ssl.create_default_context()
            ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        # RFC 8461 3.3: the certificate must be valid for the policy host.
        if not ssl_context.check_hostname or ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("the MTA-STS fetch context must verify certificates and names")
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.max_size = max_size

    async def fetch(self, domain: str) -> str:
        """The policy text; raises :class:`FetchError`."""
        host = f"mta-sts.{domain}"
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    addresses = await self.resolver.addresses(host)
                except DnsError as exc:
                    raise FetchError(exc.text) from None
                if not addresses:
                    raise FetchError(f"host {host} has no address records")
                reason = ""
                for address in addresses[:MAX_FETCH_ADDRESSES]:
                    try:
                        return await self._get(host, address)
                    except ssl.SSLCertVerificationError as exc:
                        reason = f"certificate of {host} not verified: {exc.verify_message}"
                    except OSError as exc:  # refused, reset, TLS alerts
                        reason = f"cannot fetch from {host}[{address}]: " \
                                 f"{getattr(exc, 'reason', None) or exc.strerror or exc}"
                raise FetchError(reason)
        except TimeoutError:
            raise FetchError(f"fetching the policy from {host} timed out") from None

    async def _get(self, host: str, address: str) -> str:
        reader, writer = await asyncio.open_connection(
            address, self.https_port, ssl=self.ssl_context, server_hostname=host,
            limit=MAX_HEADER_BYTES)
        try:
            authority = host if self.https_port == HTTPS_PORT else f"{host}:{self.https_port}"
            writer.write(f"GET {WELL_KNOWN_PATH} HTTP/1.1\r\nHost: {authority}\r\n"
                         f"User-Agent: postwarden\r\nAccept: text/plain\r\n"
                         f"Connection: close\r\n\r\n".encode("ascii"))
            await writer.drain()
            status, headers, body = await read_response(reader, self.max_size)
        finally:
            writer.transport.abort()  # one request; no graceful TLS shutdown needed
        if 300 <= status < 400:
            # RFC 8461 3.3: "senders MUST NOT follow redirects".
            raise FetchError(f"policy host {host} redirected (HTTP {status}), not followed")
        if status != 200:
            raise FetchError(f"policy host {host} answered HTTP {status}")
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "text/plain":
            raise FetchError(f"policy from {host} is {media_type or 'untyped'!r}, "
                             "not text/plain")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchError(f"policy from {host} is not UTF-8") from None


# -- the cache -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    policy: Policy
    text: str  # as fetched: the file stores this and parses it again
    fetched: float
    expires: float


class PolicyCache:
    """Policies by domain, in memory, optionally kept in a JSON file.

    The file is read once when made (entries that do not parse are
    dropped: the file validates itself) and rewritten, atomically, after
    each change.  Losing it loses only trust-on-first-use state.
    """

    def __init__(self, path: Path | None = None, *,
                 max_entries: int = MAX_CACHED_POLICIES) -> None:
        self.path = path
        self.max_entries = max_entries
        self._entries: dict[str, CachedPolicy] = {}
        self._save_lock = asyncio.Lock()
        if path is not None:
            self._load(path)

    def get(self, domain: str) -> CachedPolicy | None:
        return self._entries.get(domain)

    def __len__(self) -> int:
        return len(self._entries)

    async def put(self, domain: str, entry: CachedPolicy, now: float) -> None:
        self._entries[domain] = entry
        if len(self._entries) > self.max_entries:
            for d in [d for d, e in self._entries.items() if e.expires <= now]:
                del self._entries[d]
            while len(self._entries) > self.max_entries:
                del self._entries[min(self._entries, key=lambda d: self._entries[d].expires)]
        if self.path is not None:
            async with self._save_lock:
                await asyncio.to_thread(self._save, self.path, self._snapshot())

    def _snapshot(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "policies": {
            d: {"id": e.policy.policy_id, "fetched": e.fetched, "expires": e.expires,
                "policy": e.text} for d, e in self._entries.items()}}

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("mta_sts_cache_unreadable", path=str(path), error=str(exc))
            return
        policies = data.get("policies") if isinstance(data, dict) else None
        if not isinstance(policies, dict) or data.get("format") != CACHE_FORMAT:
            log.warning("mta_sts_cache_unreadable", path=str(path), error="unknown format")
            return
        for domain, item in list(policies.items())[:self.max_entries]:
            try:
                entry = CachedPolicy(parse_policy(item["policy"], str(item["id"])),
                                     item["policy"], float(item["fetched"]),
                                     float(item["expires"]))
            except (PolicyError, KeyError, TypeError, ValueError, AttributeError):
                continue
            if _ID.fullmatch(entry.policy.policy_id) and isinstance(domain, str):
                self._entries[domain] = entry

    @staticmethod
    def _save(path: Path, snapshot: dict[str, Any]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(snapshot, f, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("mta_sts_cache_write_failed", path=str(path), error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()


# -- discovery -----------------------------------------------------------


def policy_domain(domain: str) -> str | None:
    """The ASCII (A-label) form of a recipient domain, or ``None`` for
    what cannot have a policy (address literals, invalid names)."""
    domain = normalize_host(domain)
    if not domain or domain.startswith("[") or "." not in domain:
        return None
    try:
        return dns.name.from_unicode(domain).to_text(omit_final_dot=True).lower()
    except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel,
            ValueError, UnicodeError):
        return None


class MtaSts:
    """The MTA-STS policy of recipient domains (see the module docstring)."""

    def __init__(self, resolver: Resolver, fetcher: PolicyFetcher | None = None, *,
                 cache: PolicyCache | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.resolver = resolver
        self.fetcher = fetcher if fetcher is not None else PolicyFetcher(resolver)
        self.cache = cache if cache is not None else PolicyCache()
        self.clock = clock
        self._inflight: dict[str, asyncio.Future[Policy | None]] = {}

    @classmethod
    def from_settings(cls, settings: MtaStsSettings, resolver: Resolver, data_dir: Path,
                      ssl_context: ssl.SSLContext | None = None) -> MtaSts | None:
        """As ``app.py`` makes it: ``None`` when disabled; the cache file in
        ``data_dir`` when enabled."""
        if not settings.enabled:
            return None
        fetcher = PolicyFetcher(resolver, ssl_context=ssl_context, timeout=settings.timeout)
        cache = PolicyCache(data_dir / CACHE_FILE_NAME if settings.cache else None)
        return cls(resolver, fetcher, cache=cache)

    async def policy_for(self, domain: str) -> Policy | None:
        """The policy of ``domain`` (mode ``none`` included), or ``None``
        when it has none we can get.  Never raises for DNS or HTTPS trouble.
        Concurrent calls for one domain share one discovery."""
        name = policy_domain(domain)
        if name is None:
            return None
        future = self._inflight.get(name)
        if future is None:
            future = asyncio.ensure_future(self._discover(name))
            self._inflight[name] = future
            future.add_done_callback(lambda _f: self._inflight.pop(name, None))
        return await asyncio.shield(future)

    async def _txt_id(self, domain: str) -> str | None:
        try:
            answer = await self.resolver.query(f"_mta-sts.{domain}", "TXT")
        except DnsPermanent:  # NXDOMAIN: no policy published
            return None
        if answer is None:
            return None
        records = [b"".join(getattr(rr, "strings", ())).decode("latin-1") for rr in answer]
        return parse_txt(records)

    async def _discover(self, domain: str) -> Policy | None:
        now = self.clock()
        cached = self.cache.get(domain)
        if cached is not None and cached.expires <= now:
            cached = None
        fallback = cached.policy if cached is not None else None
        try:
            policy_id = await self._txt_id(domain)
        except DnsError as exc:
            # RFC 8461 5.1: a failed discovery keeps the cached policy.
            log.info("mta_sts_txt_failed", domain=domain, error=exc.text,
                     cached=fallback is not None)
            return fallback
        if policy_id is None:
            # RFC 8461 8.3: a domain withdraws a policy by publishing mode
            # "none"; a vanished record (or an attacker) does not end it.
            return fallback
        if cached is not None and cached.policy.policy_id == policy_id:
            return fallback
        try:
            text = await self.fetcher.fetch(domain)
            policy = parse_policy(text, policy_id)
        except PolicyError as exc:
            log.warning("mta_sts_fetch_failed", domain=domain, id=policy_id, error=str(exc),
                        cached=fallback is not None)
            return fallback
        log.info("mta_sts_policy", domain=domain, id=policy_id, mode=policy.mode,
                 max_age=policy.max_age, mx=list(policy.mx))
        await self.cache.put(domain, CachedPolicy(policy, text, now, now + policy.max_age), now)
        return policy
