"""MTA-STS (RFC 8461): parsing tables, the policy fetch over real HTTPS on
loopback (trustme certificates), the cache, and delivery under a policy to
an aiosmtpd sink with STARTTLS.  DNS comes from a LoopbackDns."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session
from tests.conftest import json_log_events as events

from dns_server import LoopbackDns
from fixtures_outbound import Sink, aiosmtpd_server, delivery_config, make_job, server_tls
from postwarden.config import DnsConfig
from postwarden.delivery.dns import Resolver
from postwarden.delivery.mta_sts import (
    MAX_MAX_AGE,
    FetchError,
    MtaSts,
    MtaStsSettings,
    Policy,
    PolicyCache,
    PolicyError,
    PolicyFetcher,
    mx_matches,
    parse_policy,
    parse_txt,
    policy_domain,
)
from postwarden.delivery.remote import SmtpTransport
from postwarden.delivery.result import DeliveryResult, DeliveryStatus

T = TypeVar("T")
DELIVERED, DEFERRED = DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED
DOMAIN = "example.org"
MX_HOST = "mx1.example.org"
POLICY_HOST = f"mta-sts.{DOMAIN}"


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


def policy_text(mode: str = "enforce", mx: tuple[str, ...] = ("mx1.example.org",),
                max_age: int = 86400) -> str:
    lines = "".join(f"mx: {m}\r\n" for m in mx)
    return f"version: STSv1\r\nmode: {mode}\r\n{lines}max_age: {max_age}\r\n"


# -- tables ------------------------------------------------------------------


@pytest.mark.parametrize(("records", "expected"), [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1; id=abc ; ext=value"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # others discarded
    (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # two: no policy
    ([], None),
    (["v=STSv1"], None),  # no id
    (["v=STSv1; id="], None),
    (["v=STSv1; id=has-dash"], None),
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv2; id=abc"], None),
    (["v=STSv1; id=abc; broken"], None),
])
def test_parse_txt(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize(("pattern", "host", "expected"), [
    ("mx1.example.org", "mx1.example.org", True),
    ("mx1.example.org", "MX1.Example.ORG.", True),
    ("mx1.example.org", "mx2.example.org", False),
    ("*.example.org", "mx1.example.org", True),
    ("*.example.org", "example.org", False),
    ("*.example.org", "a.b.example.org", False),
    ("*.example.org", "mx1.example.org.evil.test", False),
    ("*.example.org", ".example.org", False),
])
def test_mx_matches(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def test_parse_policy_example_from_the_rfc() -> None:
    policy = parse_policy("version: STSv1\nmode: enforce\nmx: mail.example.com\n"
                          "mx: *.example.net\nmx: backupmx.example.com\nmax_age: 604800\n",
                          "abc")
    assert policy == Policy("enforce", 604800, ("mail.example.com", "*.example.net",
                                                "backupmx.example.com"), "abc")
    assert policy.enforced and policy.matches("x.example.net")
    assert not policy.matches("example.net")


@pytest.mark.parametrize(("text", "check"), [
    ("version: STSv1\r\nmode: testing\r\nmx: a.example\r\nmax_age: 60\r\n",
     lambda p: p.mode == "testing" and p.max_age == 60),
    ("version: STSv1\nmode: none\nmax_age: 60", lambda p: p.mode == "none" and p.mx == ()),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 99999999999"[:-1] + "\n",
     lambda p: p.max_age == MAX_MAX_AGE),  # capped
    ("version:STSv1\nmode:enforce\nmx:A.Example.\nmax_age:1\nunknown: x\n",
     lambda p: p.mx == ("a.example",)),
    ("version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 5\n",
     lambda p: p.mode == "enforce"),  # the first of a repeated key
    ("version: STSv1  \nmode: enforce\t\nmx: a.example\nmax_age: 5\n\n",
     lambda p: p.mode == "enforce"),  # trailing white space, empty last line
])
def test_parse_policy_valid(text: str, check: Any) -> None:
    assert check(parse_policy(text))


@pytest.mark.parametrize("text", [
    "",
    "mode: enforce\nmx: a.example\nmax_age: 5\n",  # no version
    "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 5\n",
    "version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 5\n",
    "version: STSv1\nmode: reject\nmx: a.example\nmax_age: 5\n",
    "version: STSv1\nmode: enforce\nmax_age: 5\n",  # no mx
    "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -5\n",
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",
    "version: STSv1\nmode: enforce\nmx: a b.example\nmax_age: 5\n",
    "version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 5\n",
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\ngarbage line\n",
    "<html>Not found</html>",
])
def test_parse_policy_invalid(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


@pytest.mark.parametrize(("domain", "expected"), [
    ("Example.ORG.", "example.org"),
    ("[192.0.2.1]", None),
    ("localhost", None),
    ("b\u00fccher.example", "xn--bcher-kva.example"),
    ("a..example", None),
])
def test_policy_domain(domain: str, expected: str | None) -> None:
    assert policy_domain(domain) == expected


@pytest.mark.parametrize(("table", "expected"), [
    ({}, MtaStsSettings(True, 10.0, True)),
    ({"mta_sts": False, "mta_sts_timeout": 3, "mta_sts_cache": False, "tls": "may"},
     MtaStsSettings(False, 3.0, False)),
])
def test_settings(table: dict[str, Any], expected: MtaStsSettings) -> None:
    assert MtaStsSettings.from_table(table) == expected


@pytest.mark.parametrize(("table", "key"), [
    ({"mta_sts": "yes"}, "mta_sts"),
    ({"mta_sts_timeout": 0}, "mta_sts_timeout"),
    ({"mta_sts_timeout": True}, "mta_sts_timeout"),
    ({"mta_sts_cache": 1}, "mta_sts_cache"),
])
def test_settings_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}: "):
        MtaStsSettings.from_table(table)


# -- an HTTPS policy server on loopback ---------------------------------------


class PolicyServer:
    """Serves one response to every request (change the attributes between
    requests): ``status``, ``headers``, ``body``; ``chunked`` sends the body
    in chunks; ``content_length=False`` ends the body by closing."""

    def __init__(self, tls: ssl.SSLContext, body: str = "") -> None:
        self.tls = tls
        self.status = "200 OK"
        self.content_type = "text/plain; charset=utf-8"
        self.extra_headers: list[str] = []
        self.body = (body or policy_text()).encode()
        self.chunked = False
        self.content_length = True
        self.requests: list[list[str]] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> PolicyServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> PolicyServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            lines = []
            while (line := (await reader.readline()).decode().rstrip("\r\n")):
                lines.append(line)
            self.requests.append(lines)
            head = [f"HTTP/1.1 {self.status}", *self.extra_headers]
            if self.content_type:
                head.append(f"Content-Type: {self.content_type}")
            if self.chunked:
                head.append("Transfer-Encoding: chunked")
                body = b"".join(b"%x\r\n%s\r\n" % (len(self.body[i:i + 100]),
                                                   self.body[i:i + 100])
                                for i in range(0, len(self.body), 100)) + b"0\r\n\r\n"
            else:
                if self.content_length:
                    head.append(f"Content-Length: {len(self.body)}")
                body = self.body
            writer.write(("\r\n".join([*head, "Connection: close"]) + "\r\n\r\n").encode()
                         + body)
            await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def policy_tls(ca: trustme.CA) -> ssl.SSLContext:
    return server_tls(ca, POLICY_HOST)


def zones(txt: str = "v=STSv1; id=first") -> dict[str, Any]:
    return {
        DOMAIN: {"MX": [(10, MX_HOST)]},
        MX_HOST: {"A": ["127.0.0.1"]},
        "other.example.org": {"A": ["127.0.0.1"]},
        f"_mta-sts.{DOMAIN}": {"TXT": [txt]},
        POLICY_HOST: {"A": ["127.0.0.1"]},
    }


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    with LoopbackDns(zones()) as server:
        yield server


def resolver_for(dns: LoopbackDns) -> Resolver:
    return Resolver(DnsConfig(nameservers=dns.nameservers, timeout=2.0))


def fetcher(dns: LoopbackDns, port: int, client_tls: ssl.SSLContext) -> PolicyFetcher:
    return PolicyFetcher(resolver_for(dns), https_port=port, ssl_context=client_tls,
                         timeout=3.0)


def mta_sts(dns: LoopbackDns, port: int, client_tls: ssl.SSLContext, **kw: Any) -> MtaSts:
    resolver = resolver_for(dns)
    return MtaSts(resolver, PolicyFetcher(resolver, https_port=port, ssl_context=client_tls,
                                          timeout=3.0), **kw)


# -- fetching over HTTPS -------------------------------------------------------


def test_fetch_over_https(dns: LoopbackDns, policy_tls: ssl.SSLContext,
                          client_tls: ssl.SSLContext) -> None:
    async def go() -> None:
        async with PolicyServer(policy_tls) as srv:
            text = await fetcher(dns, srv.port, client_tls).fetch(DOMAIN)
        assert parse_policy(text).mx == (MX_HOST,)
        request = srv.requests[0]
        assert request[0] == "GET /.well-known/mta-sts.txt HTTP/1.1"
        assert f"Host: {POLICY_HOST}:{srv.port}" in request

    run(go())


@pytest.mark.parametrize("setup", ["chunked", "until-close"])
def test_fetch_body_framings(dns: LoopbackDns, policy_tls: ssl.SSLContext,
                             client_tls: ssl.SSLContext, setup: str) -> None:
    async def go() -> None:
        body = policy_text(mx=tuple(f"mx{i}.example.org" for i in range(30)))
        async with PolicyServer(policy_tls, body) as srv:
            srv.chunked = setup == "chunked"
            srv.content_length = False
            assert await fetcher(dns, srv.port, client_tls).fetch(DOMAIN) == body

    run(go())


@pytest.mark.parametrize(("change", "reason"), [
    ({"status": "301 Moved Permanently",
      "extra_headers": ["Location: https://evil.example/"]}, "redirected"),
    ({"status": "404 Not Found"}, "HTTP 404"),
    ({"content_type": "text/html"}, "not text/plain"),
    ({"content_type": ""}, "not text/plain"),
    ({"body": b"x" * (64 * 1024 + 1)}, "larger than"),
    ({"body": b"x" * (64 * 1024 + 1), "chunked": True}, "larger than"),
    ({"body": b"x" * (64 * 1024 + 1), "content_length": False}, "larger than"),
    ({"body": b"\xff\xfe"}, "not UTF-8"),
    ({"extra_headers": ["X-Big: " + "y" * 20000]}, "too"),
])
def test_fetch_refuses(dns: LoopbackDns, policy_tls: ssl.SSLContext,
                       client_tls: ssl.SSLContext, change: dict[str, Any],
                       reason: str) -> None:
    async def go() -> None:
        async with PolicyServer(policy_tls) as srv:
            for k, v in change.items():
                setattr(srv, k, v)
            with pytest.raises(FetchError, match=reason):
                await fetcher(dns, srv.port, client_tls).fetch(DOMAIN)

    run(go())


@pytest.mark.parametrize("cert", ["wrong-name", "untrusted-ca"])
def test_fetch_needs_a_valid_certificate_for_the_policy_host(
        dns: LoopbackDns, ca: trustme.CA, client_tls: ssl.SSLContext, cert: str) -> None:
    tls = (server_tls(ca, "www.example.org") if cert == "wrong-name"
           else server_tls(trustme.CA(), POLICY_HOST))

    async def go() -> None:
        async with PolicyServer(tls) as srv:
            with pytest.raises(FetchError, match=r"certificate of mta-sts\.example\.org "
                                                 r"not verified"):
                await fetcher(dns, srv.port, client_tls).fetch(DOMAIN)
            assert srv.requests == []

    run(go())


def test_fetcher_refuses_an_unverifying_context(dns: LoopbackDns) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    with pytest.raises(ValueError):
        PolicyFetcher(resolver_for(dns), ssl_context=ctx)


def test_fetch_times_out(dns: LoopbackDns, client_tls: ssl.SSLContext) -> None:
    async def go() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # a ClientHello arrives; never answered

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        f = PolicyFetcher(resolver_for(dns), https_port=port, ssl_context=client_tls,
                          timeout=0.5)
        try:
            with pytest.raises(FetchError, match="timed out"):
                await f.fetch(DOMAIN)
        finally:
            server.close()

    run(go())


# -- discovery and the cache ---------------------------------------------------


def test_policy_is_cached_and_refetched_when_the_id_changes(
        dns: LoopbackDns, policy_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    async def go() -> None:
        async with PolicyServer(policy_tls) as srv:
            sts = mta_sts(dns, srv.port, client_tls)
            first = await sts.policy_for(DOMAIN)
            again = await sts.policy_for("EXAMPLE.org.")
            assert first is not None and first.policy_id == "first" and again == first
            assert len(srv.requests) == 1  # the same id: no fetch
            srv.body = policy_text(mode="testing").encode()
            dns.set(f"_mta-sts.{DOMAIN}", {"TXT": ["v=STSv1; id=second"]})
            changed = await sts.policy_for(DOMAIN)
            assert changed is not None and changed.mode == "testing"
            assert changed.policy_id == "second" and len(srv.requests) == 2

    run(go())


def test_concurrent_lookups_share_one_fetch(dns: LoopbackDns, policy_tls: ssl.SSLContext,
                                            client_tls: ssl.SSLContext) -> None:
    async def go() -> None:
        async with PolicyServer(policy_tls) as srv:
            sts = mta_sts(dns, srv.port, client_tls)
            results = await asyncio.gather(*(sts.policy_for(DOMAIN) for _ in range(5)))
        assert len({r.policy_id for r in results if r}) == 1 and len(srv.requests) == 1

    run(go())


def test_cached_policy_used_when_the_server_is_down(
        dns: LoopbackDns, policy_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    now = [1000.0]

    async def go() -> None:
        srv = await PolicyServer(policy_tls, policy_text(max_age=600)).start()
        sts = mta_sts(dns, srv.port, client_tls, clock=lambda: now[0])
        fetched = await sts.policy_for(DOMAIN)
        await srv.stop()
        # RFC 8461 5.1: a new id whose policy cannot be fetched, a lost
        # TXT record, a DNS failure: the unexpired cached policy stays.
        dns.set(f"_mta-sts.{DOMAIN}", {"TXT": ["v=STSv1; id=second"]})
        assert await sts.policy_for(DOMAIN) == fetched
        dns.remove(f"_mta-sts.{DOMAIN}")
        assert await sts.policy_for(DOMAIN) == fetched
        dns.set(f"_mta-sts.{DOMAIN}", "SERVFAIL")
        assert await sts.policy_for(DOMAIN) == fetched
        now[0] += 601  # expired: gone
        assert await sts.policy_for(DOMAIN) is None

    run(go())


def test_no_record_no_policy(dns: LoopbackDns, client_tls: ssl.SSLContext) -> None:
    async def go() -> None:
        dns.remove(f"_mta-sts.{DOMAIN}")
        assert await mta_sts(dns, 9, client_tls).policy_for(DOMAIN) is None
        dns.set(f"_mta-sts.{DOMAIN}", {"TXT": ["v=STSv1; id=x"]})
        # A record but no server (nothing listens on the discard port).
        assert await mta_sts(dns, 9, client_tls).policy_for(DOMAIN) is None
        assert await mta_sts(dns, 9, client_tls).policy_for("[192.0.2.1]") is None

    run(go())


def test_cache_file_survives_a_restart(dns: LoopbackDns, policy_tls: ssl.SSLContext,
                                       client_tls: ssl.SSLContext, tmp_path: Path) -> None:
    path = tmp_path / "mta-sts.json"

    async def go() -> None:
        async with PolicyServer(policy_tls) as srv:
            fetched = await mta_sts(dns, srv.port, client_tls,
                                    cache=PolicyCache(path)).policy_for(DOMAIN)
        assert path.stat().st_mode & 0o777 == 0o600
        # The server is gone; a new instance reads the file.
        restarted = mta_sts(dns, srv.port, client_tls, cache=PolicyCache(path))
        assert await restarted.policy_for(DOMAIN) == fetched

    run(go())


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"format": 99, "policies": {}}',
    '{"format": 1, "policies": {"example.org": {"id": "x", "policy": "junk", '
    '"fetched": 0, "expires": 1e12}}}',
    '{"format": 1, "policies": {"example.org": {"id": "bad id", "policy": "version: '
    'STSv1\\nmode: none\\nmax_age: 1", "fetched": 0, "expires": 1e12}}}',
])
def test_bad_cache_file_is_ignored(tmp_path: Path, content: str) -> None:
    path = tmp_path / "mta-sts.json"
    path.write_text(content)
    assert len(PolicyCache(path)) == 0


def test_cache_file_format(tmp_path: Path) -> None:
    path = tmp_path / "mta-sts.json"
    cache = PolicyCache(path, max_entries=2)
    from postwarden.delivery.mta_sts import CachedPolicy

    async def go() -> None:
        for i, domain in enumerate(["a.example", "b.example", "c.example"]):
            text = policy_text(mx=(f"mx.{domain}",))
            await cache.put(domain, CachedPolicy(parse_policy(text, f"id{i}"), text, 0.0,
                                                 100.0 + i), 50.0)

    run(go())
    data = json.loads(path.read_text())
    # The earliest to expire is dropped when over the cap.
    assert sorted(data["policies"]) == ["b.example", "c.example"]
    assert sorted(d for d in PolicyCache(path)._entries) == ["b.example", "c.example"]


# -- delivery under a policy ---------------------------------------------------


class TlsSink(Sink):
    """A Sink that notes whether each message came over TLS."""

    def __init__(self) -> None:
        super().__init__()
        self.tls: list[bool] = []
        self.ehlos = 0  # two per session with STARTTLS

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        self.ehlos += 1
        return await super().handle_EHLO(server, session, envelope, hostname, responses)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.tls.append(session.ssl is not None)
        return await super().handle_DATA(server, session, envelope)


async def deliver(dns: LoopbackDns, https_port: int, client_tls: ssl.SSLContext,
                  mx_tls: ssl.SSLContext | None, ca_file: Path, *, tls: str = "may",
                  sink: TlsSink | None = None) -> tuple[DeliveryResult, TlsSink]:
    sink = sink or TlsSink()
    kw: dict[str, Any] = {"tls_context": mx_tls} if mx_tls is not None else {}
    server, port = await aiosmtpd_server(sink, **kw)
    resolver = resolver_for(dns)
    sts = MtaSts(resolver, PolicyFetcher(resolver, https_port=https_port,
                                         ssl_context=client_tls, timeout=3.0))
    transport = SmtpTransport("mail.example.test", delivery_config(tls=tls, ca_file=ca_file),
                              resolver, mx_port=port, mta_sts=sts)
    try:
        (result,) = await transport.deliver(make_job([f"bob@{DOMAIN}"]))
    finally:
        server.close()
    return result, sink


def test_enforce_matching_mx_delivers_over_verified_tls(
        dns: LoopbackDns, ca: trustme.CA, ca_file: Path, policy_tls: ssl.SSLContext,
        client_tls: ssl.SSLContext, log_lines: io.StringIO) -> None:
    async def go() -> None:
        async with PolicyServer(policy_tls) as srv:
            result, sink = await deliver(dns, srv.port, client_tls,
                                         server_tls(ca, MX_HOST), ca_file, tls="none")
        assert result.status is DELIVERED, result
        assert sink.tls == [True]  # "none" configured, enforce wins
        tls = [e for e in events(log_lines) if e["event"] == "tls"]
        assert tls and tls[0]["verified"] is True

    run(go())


@pytest.mark.parametrize("mx_cert", ["untrusted-ca", "wrong-name", "no-starttls"])
def test_enforce_never_downgrades(dns: LoopbackDns, ca: trustme.CA, ca_file: Path,
                                  policy_tls: ssl.SSLContext, client_tls: ssl.SSLContext,
                                  mx_cert: str) -> None:
    mx_tls = {"untrusted-ca": server_tls(trustme.CA(), MX_HOST),
              "wrong-name": server_tls(ca, "other.example.org"),
              "no-starttls": None}[mx_cert]

    async def go() -> None:
        async with PolicyServer(policy_tls) as srv:
            result, sink = await deliver(dns, srv.port, client_tls, mx_tls, ca_file)
            assert result.status is DEFERRED and result.dsn == "4.7.5", result
            assert sink.envelopes == []
            # The same server without the policy takes the message ("may").
            srv.body = policy_text(mode="none").encode()
            dns.set(f"_mta-sts.{DOMAIN}", {"TXT": ["v=STSv1; id=none"]})
            result, sink = await deliver(dns, srv.port, client_tls, mx_tls, ca_file)
            assert result.status is DELIVERED and len(sink.envelopes) == 1

    run(go())


def test_enforce_mx_not_in_policy_is_deferred(dns: LoopbackDns, ca: trustme.CA,
                                              ca_file: Path, policy_tls: ssl.SSLContext,
                                              client_tls: ssl.SSLContext) -> None:
    async def go() -> None:
        async with PolicyServer(policy_tls, policy_text(mx=("*.other.example",))) as srv:
            result, sink = await deliver(dns, srv.port, client_tls, server_tls(ca, MX_HOST),
                                         ca_file)
        assert result.status is DEFERRED and result.dsn == "4.7.5"
        assert "not allowed by the MTA-STS policy of example.org" in result.text
        assert sink.ehlos == 0  # never connected

    run(go())


def test_enforce_skips_unlisted_mx_for_a_listed_one(
        dns: LoopbackDns, ca: trustme.CA, ca_file: Path, policy_tls: ssl.SSLContext,
        client_tls: ssl.SSLContext) -> None:
    async def go() -> None:
        dns.set(DOMAIN, {"MX": [(5, "other.example.org"), (10, MX_HOST)]})
        async with PolicyServer(policy_tls, policy_text(mx=("mx1.example.org",))) as srv:
            result, sink = await deliver(dns, srv.port, client_tls, server_tls(ca, MX_HOST),
                                         ca_file)
        assert result.status is DELIVERED and len(sink.envelopes) == 1
        assert f"{MX_HOST}[127.0.0.1]" in result.relay

    run(go())


def test_testing_mode_delivers_and_logs(dns: LoopbackDns, ca_file: Path,
                                        policy_tls: ssl.SSLContext,
                                        client_tls: ssl.SSLContext,
                                        log_lines: io.StringIO) -> None:
    async def go() -> None:
        async with PolicyServer(policy_tls, policy_text(mode="testing")) as srv:
            result, sink = await deliver(dns, srv.port, client_tls,
                                         server_tls(trustme.CA(), MX_HOST), ca_file)
        assert result.status is DELIVERED and sink.tls == [True]
        failures = [e for e in events(log_lines) if e["event"] == "mta_sts_testing_failure"]
        assert failures and "certificate" in failures[0]["reason"]

    run(go())


def test_testing_mode_mx_mismatch_delivers_and_logs(
        dns: LoopbackDns, ca: trustme.CA, ca_file: Path, policy_tls: ssl.SSLContext,
        client_tls: ssl.SSLContext, log_lines: io.StringIO) -> None:
    async def go() -> None:
        text = policy_text(mode="testing", mx=("*.other.example",))
        async with PolicyServer(policy_tls, text) as srv:
            result, _ = await deliver(dns, srv.port, client_tls, server_tls(ca, MX_HOST),
                                      ca_file)
        assert result.status is DELIVERED
        assert any(e["event"] == "mta_sts_testing_failure" and e.get("host") == MX_HOST
                   for e in events(log_lines))

    run(go())


def test_no_policy_keeps_the_configured_behaviour(dns: LoopbackDns, ca_file: Path,
                                                  client_tls: ssl.SSLContext) -> None:
    async def go() -> None:
        dns.remove(f"_mta-sts.{DOMAIN}")
        result, sink = await deliver(dns, 9, client_tls, server_tls(trustme.CA(), MX_HOST),
                                     ca_file)
        assert result.status is DELIVERED and sink.tls == [True]

    run(go())


def test_from_settings(tmp_path: Path, dns: LoopbackDns) -> None:
    resolver = resolver_for(dns)
    assert MtaSts.from_settings(MtaStsSettings(enabled=False), resolver, tmp_path) is None
    sts = MtaSts.from_settings(MtaStsSettings(timeout=2.0), resolver, tmp_path)
    assert sts is not None and sts.cache.path == tmp_path / "mta-sts.json"
    assert sts.fetcher.timeout == 2.0 and sts.fetcher.https_port == 443
    memory = MtaSts.from_settings(MtaStsSettings(cache=False), resolver, tmp_path)
    assert memory is not None and memory.cache.path is None
