"""The SMTP/LMTP client against real servers on loopback: aiosmtpd, and
scripted asyncio servers that give the replies a test needs."""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from fixtures_outbound import (
    OUR_NAME,
    PEER_NAME,
    PasswordCheck,
    ScriptedServer,
    Sink,
    aiosmtpd_server,
    body_source,
    delivery_config,
    free_port,
    make_job,
    server_tls,
)
from postwarden.config import DnsConfig, SmarthostConfig
from postwarden.delivery.dns import Resolver
from postwarden.delivery.remote import LmtpTransport, SmtpTransport
from postwarden.delivery.result import DeliveryResult, DeliveryStatus
from postwarden.delivery.transport import DeliveryJob, Nexthop, parse_nexthop
from postwarden.envelope import MailParams, RcptParams

T = TypeVar("T")
DELIVERED, DEFERRED, FAILED = (DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED,
                               DeliveryStatus.FAILED)


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


def direct(port: int) -> Nexthop:
    return parse_nexthop(f"smtp:[127.0.0.1]:{port}")


def transport(downgrade: Any = None, **kw: Any) -> SmtpTransport:
    # Direct next hops need no DNS; nothing listens on the discard port.
    resolver = Resolver(DnsConfig(nameservers=(("127.0.0.1", 9),), timeout=0.5))
    return SmtpTransport("unused.example", delivery_config(**kw), resolver, downgrade)


async def deliver_to(server: ScriptedServer, job: DeliveryJob | None = None,
                     **kw: Any) -> list[DeliveryResult]:
    job = job or make_job(["bob@example.org"])
    job.nexthop = direct(server.port)
    return await transport(**kw).deliver(job)


def statuses(results: list[DeliveryResult]) -> list[DeliveryStatus]:
    return [r.status for r in results]


# -- plain delivery, replies per recipient ---------------------------------


def test_delivery_to_aiosmtpd() -> None:
    async def go() -> None:
        sink = Sink()
        server, port = await aiosmtpd_server(sink)
        try:
            body = b"Subject: hi\r\n\r\nline one\r\nline two\r\n"
            job = make_job(["bob@example.org", "carol@example.org"], body, direct(port))
            results = await transport(tls="none").deliver(job)
        finally:
            server.close()
        assert statuses(results) == [DELIVERED, DELIVERED]
        assert results[0].relay == f"127.0.0.1[127.0.0.1]:{port}"
        assert results[0].text.startswith("250") and not results[0].peer_dsn
        (env,) = sink.envelopes
        assert env.mail_from == "alice@example.test"
        assert env.rcpt_tos == ["bob@example.org", "carol@example.org"]
        assert env.content == body

    run(go())


def test_rcpt_replies_per_recipient() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            srv.rcpt = {"soft@example.org": "450 4.2.1 mailbox busy",
                        "gone@example.org": "550 5.1.1 no such user"}
            job = make_job(["soft@example.org", "ok@example.org", "gone@example.org"])
            results = await deliver_to(srv, job)
        assert statuses(results) == [DEFERRED, DELIVERED, FAILED]
        assert results[0].dsn == "4.2.1" and results[2].dsn == "5.1.1"
        assert results[2].text == ("host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user "
                                   "(in reply to RCPT TO command)")
        assert results[2].relay == f"127.0.0.1[127.0.0.1]:{srv.port}"
        assert len(srv.messages) == 1

    run(go())


@pytest.mark.parametrize(("attr", "reply", "status", "dsn"), [
    ("data_reply", "451 4.3.0 try again later", DEFERRED, "4.3.0"),
    ("data_reply", "554 5.7.1 go away", FAILED, "5.7.1"),
    ("final", "452 4.3.1 insufficient storage", DEFERRED, "4.3.1"),
    ("final", "550 5.7.1 spam", FAILED, "5.7.1"),
    ("mail_reply", "553 5.1.8 bad sender", FAILED, "5.1.8"),
    ("mail_reply", "451 4.1.8 sender domain unresolvable", DEFERRED, "4.1.8"),
])
def test_transaction_replies_apply_to_accepted_recipients(attr: str, reply: str,
                                                           status: DeliveryStatus,
                                                           dsn: str) -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            setattr(srv, attr, reply)
            srv.rcpt = {"gone@example.org": "550 5.1.1 no such user"}
            job = make_job(["a@example.org", "gone@example.org", "b@example.org"])
            results = await deliver_to(srv, job)
        if attr == "mail_reply":
            assert [r.dsn for r in results] == [dsn] * 3
        else:
            assert statuses(results) == [status, FAILED, status]
            assert results[0].dsn == dsn and results[1].dsn == "5.1.1"
        assert reply in results[0].text

    run(go())


def test_421_mid_pipeline_keeps_the_replies_read() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            srv.rcpt = {"b@example.org": "421 4.3.2 shutting down"}
            results = await deliver_to(srv, make_job(["a@example.org", "b@example.org",
                                                      "c@example.org"]))
        assert statuses(results) == [DEFERRED] * 3
        assert "421 4.3.2 shutting down" in results[1].text
        assert "lost connection" in results[0].text and "lost connection" in results[2].text
        assert srv.messages == []

    run(go())


def test_all_recipients_refused_sends_no_data() -> None:
    async def go() -> None:
        async with ScriptedServer(extensions=()) as srv:  # no PIPELINING
            srv.rcpt = {"x@example.org": "550 5.1.1 unknown"}
            results = await deliver_to(srv, make_job(["x@example.org"]))
        assert statuses(results) == [FAILED]
        assert "DATA" not in srv.sessions[0].verbs()
        assert srv.messages == []

    run(go())


def test_connection_refused_is_deferred() -> None:
    async def go() -> None:
        port = free_port()
        job = make_job(["bob@example.org"], nexthop=direct(port))
        (result,) = await transport().deliver(job)
        assert result.status is DEFERRED and result.dsn == "4.4.1"
        assert "refused" in result.text.lower() and f"127.0.0.1[127.0.0.1]:{port}" in result.text

    run(go())


def test_greeting_timeout() -> None:
    async def go() -> None:
        async with ScriptedServer(greeting=None) as srv:
            (result,) = await deliver_to(srv, greeting_timeout=0.3)
        assert result.status is DEFERRED and result.dsn == "4.4.2"
        assert "timed out while receiving the initial server greeting" in result.text

    run(go())


def test_ehlo_refused_falls_back_to_helo() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            srv.ehlo_reply = "502 5.5.2 what is EHLO"
            job = make_job(["bob@example.org"], params=MailParams(body="8BITMIME"),
                           body=b"Subject: x\r\n\r\nplain\r\n")
            (result,) = await deliver_to(srv, job)
        assert result.status is DELIVERED
        verbs = srv.sessions[0].verbs()
        assert verbs[:2] == ["EHLO", "HELO"]
        assert srv.sessions[0].commands[2][1] == "MAIL FROM:<alice@example.test>"

    run(go())


def test_mail_loop_is_detected() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            srv.ehlo_name = OUR_NAME
            (result,) = await deliver_to(srv)
        assert result.status is FAILED and result.dsn == "5.4.6"
        assert "loops back to myself" in result.text

    run(go())


def test_unreadable_message_is_never_ended_with_a_dot() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"Subject: half\r\n\r\n" + b"x" * 100_000 + b"\r\n"
        raise OSError("spool file vanished")

    async def go() -> None:
        async with ScriptedServer() as srv:
            job = make_job(["bob@example.org"], source=broken)
            (result,) = await deliver_to(srv, job)
            await asyncio.sleep(0.05)
        assert result.status is DEFERRED and result.dsn == "4.3.0"
        assert "spool" not in result.text  # no internals in bounce text
        assert srv.messages == []

    run(go())


# -- PIPELINING, DSN, SIZE -------------------------------------------------


def test_pipelining_sends_envelope_in_one_write() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            await deliver_to(srv, make_job(["a@example.org", "b@example.org"]))
        s = srv.sessions[0]
        reads = s.read_of("MAIL") + s.read_of("RCPT") + s.read_of("DATA")
        assert len(reads) == 4 and len(set(reads)) == 1, s.commands

    run(go())


def test_no_pipelining_one_command_at_a_time() -> None:
    async def go() -> None:
        async with ScriptedServer(extensions=("8BITMIME",)) as srv:
            results = await deliver_to(srv, make_job(["a@example.org", "b@example.org"]))
        assert statuses(results) == [DELIVERED, DELIVERED]
        s = srv.sessions[0]
        reads = s.read_of("MAIL") + s.read_of("RCPT") + s.read_of("DATA")
        assert len(set(reads)) == 4, s.commands

    run(go())


def test_too_many_recipients_continue_on_the_same_connection() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            srv.max_rcpts = 2
            rcpts = [f"r{i}@example.org" for i in range(5)]
            results = await deliver_to(srv, make_job(rcpts))
        assert statuses(results) == [DELIVERED] * 5
        assert len(srv.sessions) == 1 and srv.sessions[0].verbs().count("MAIL") == 3
        assert len(srv.messages) == 3

    run(go())


def test_dsn_parameters_passed_when_offered() -> None:
    params = MailParams(ret="HDRS", envid="id+1=x")
    rcpts = [("bob@example.org", RcptParams(("SUCCESS", "FAILURE"), "rfc822;Bob+x@example.org")),
             ("eve@example.org", RcptParams(("NEVER",), None))]

    async def go() -> tuple[list[DeliveryResult], list[DeliveryResult], list[str], list[str]]:
        async with ScriptedServer(extensions=("PIPELINING", "DSN")) as srv:
            with_dsn = await deliver_to(srv, make_job(rcpts, params=params))
            srv.extensions = ["PIPELINING"]
            without = await deliver_to(srv, make_job(rcpts, params=params))
        return (with_dsn, without, [c for _, c in srv.sessions[0].commands],
                [c for _, c in srv.sessions[1].commands])

    with_dsn, without, cmds, plain_cmds = run(go())
    assert "MAIL FROM:<alice@example.test> RET=HDRS ENVID=id+2B1+3Dx" in cmds
    assert "RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx@example.org" \
        in cmds
    assert "RCPT TO:<eve@example.org> NOTIFY=NEVER" in cmds
    assert all(r.peer_dsn for r in with_dsn)
    assert "MAIL FROM:<alice@example.test>" in plain_cmds
    assert "RCPT TO:<bob@example.org>" in plain_cmds
    assert not any(r.peer_dsn for r in without)


def test_size_too_big_sends_nothing() -> None:
    async def go() -> None:
        async with ScriptedServer(extensions=("PIPELINING", "SIZE 100")) as srv:
            body = b"Subject: big\r\n\r\n" + b"x" * 500 + b"\r\n"
            # (Without the connection cache: one connection per delivery.)
            (result,) = await deliver_to(srv, make_job(["bob@example.org"], body),
                                         connection_cache_time=0)
            small = await deliver_to(srv, make_job(["bob@example.org"], b"S: x\r\n\r\nhi\r\n"),
                                     connection_cache_time=0)
        assert result.status is FAILED and result.dsn == "5.3.4"
        assert "exceeds size limit 100" in result.text
        assert srv.sessions[0].verbs() == ["EHLO", "QUIT"]
        assert small[0].status is DELIVERED
        assert srv.sessions[1].commands[1][1].endswith(" SIZE=12")

    run(go())


# -- 8BITMIME and SMTPUTF8 -------------------------------------------------

EIGHT_BIT = "Subject: caf\u00e9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nna\u00efve\r\n"


def test_8bitmime_passed_when_offered() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            job = make_job(["bob@example.org"], EIGHT_BIT.encode(),
                           params=MailParams(body="8BITMIME"))
            (result,) = await deliver_to(srv, job)
        assert result.status is DELIVERED
        assert srv.sessions[0].commands[1][1].endswith(" BODY=8BITMIME")
        assert srv.messages == [EIGHT_BIT.encode()]

    run(go())


def test_8bit_to_7bit_server() -> None:
    def downgrade(data: bytes) -> bytes:
        return data.decode().encode("ascii", "backslashreplace")

    def failing(data: bytes) -> bytes:
        raise ValueError("cannot convert")

    async def go() -> None:
        async with ScriptedServer(extensions=("PIPELINING",)) as srv:
            params = MailParams(body="8BITMIME")
            job = make_job(["bob@example.org"], EIGHT_BIT.encode(), params=params)
            (no_converter,) = await deliver_to(srv, job)
            job.nexthop = direct(srv.port)
            (broken,) = await transport(failing).deliver(job)
            (converted,) = await transport(downgrade).deliver(job)
            ascii_job = make_job(["bob@example.org"], b"Subject: x\r\n\r\nascii\r\n", params=params)
            (ascii_only,) = await deliver_to(srv, ascii_job)
        assert no_converter.status is FAILED and no_converter.dsn == "5.6.3"
        assert broken.status is FAILED and broken.dsn == "5.6.3"
        assert converted.status is DELIVERED and ascii_only.status is DELIVERED
        assert srv.messages == [downgrade(EIGHT_BIT.encode()), b"Subject: x\r\n\r\nascii\r\n"]
        assert all("BODY=" not in c for s in srv.sessions for _, c in s.commands)

    run(go())


def test_smtputf8() -> None:
    utf8_rcpt = "j\u00f6rg@example.org"
    params = MailParams(smtputf8=True, body="8BITMIME")

    async def go() -> None:
        plain_sink, utf8_sink = Sink(), Sink()
        plain, plain_port = await aiosmtpd_server(plain_sink)
        utf8, utf8_port = await aiosmtpd_server(utf8_sink, enable_SMTPUTF8=True)
        t = transport(tls="none")
        try:
            needs = make_job([utf8_rcpt], EIGHT_BIT.encode(), direct(plain_port), params=params)
            (refused,) = await t.deliver(needs)
            header_only = make_job(["bob@example.org"], EIGHT_BIT.encode(), direct(plain_port),
                                   params=params)
            (refused_header,) = await t.deliver(header_only)
            ascii_msg = make_job(["bob@example.org"], b"Subject: x\r\n\r\nna\xc3\xafve\r\n",
                                 direct(plain_port), params=params)
            (ascii_ok,) = await t.deliver(ascii_msg)
            needs.nexthop = direct(utf8_port)
            (delivered,) = await t.deliver(needs)
        finally:
            plain.close()
            utf8.close()
        assert refused.status is FAILED and refused.dsn == "5.6.7"
        assert refused_header.status is FAILED and refused_header.dsn == "5.6.7"
        assert ascii_ok.status is DELIVERED
        assert "SMTPUTF8" not in plain_sink.envelopes[0].mail_options
        assert delivered.status is DELIVERED
        (env,) = utf8_sink.envelopes
        assert env.rcpt_tos == [utf8_rcpt] and "SMTPUTF8" in env.mail_options
        assert env.content == EIGHT_BIT.encode()

    run(go())


# -- DATA transparency and streaming ----------------------------------------


def test_dot_stuffing_arrives_intact() -> None:
    body = (b".leading dot on the first line\r\nSubject: dots\r\n\r\n.\r\n..\r\n.x\r\n"
            b"a.b\r\n...\r\n. \r\nend without newline")

    async def go() -> None:
        sink = Sink()
        server, port = await aiosmtpd_server(sink)
        try:
            for chunk in (1, 2, 3, 7, 4096):
                job = make_job(["bob@example.org"], nexthop=direct(port),
                               source=body_source(body, chunk))
                (result,) = await transport(tls="none").deliver(job)
                assert result.status is DELIVERED
        finally:
            server.close()
        assert [e.content for e in sink.envelopes] == [body + b"\r\n"] * 5

    run(go())


def test_streams_a_5_mb_message() -> None:
    line = b"." + b"0123456789abcdef" * 4 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (5 * 1024 * 1024 // len(line))
    pulled: list[int] = []

    async def go() -> None:
        sink = Sink()
        server, port = await aiosmtpd_server(sink)

        async def source() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 32768):
                pulled.append(i)
                yield body[i:i + 32768]

        try:
            job = make_job(["bob@example.org"], nexthop=direct(port), source=source)
            (result,) = await transport(tls="none").deliver(job)
        finally:
            server.close()
        assert result.status is DELIVERED
        assert sink.envelopes[0].content == body
        assert len(pulled) > 100  # read chunk by chunk, not at once

    run(go())


# -- TLS ---------------------------------------------------------------------


def test_may_uses_starttls(ca: trustme.CA) -> None:
    async def go() -> None:
        async with ScriptedServer(tls=server_tls(ca)) as srv:
            (result,) = await deliver_to(srv, tls="may")
        assert result.status is DELIVERED
        s = srv.sessions[0]
        assert s.tls and s.verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]

    run(go())


def test_none_never_uses_tls(ca: trustme.CA) -> None:
    async def go() -> None:
        async with ScriptedServer(tls=server_tls(ca)) as srv:
            (result,) = await deliver_to(srv, tls="none")
        assert result.status is DELIVERED and not srv.sessions[0].tls
        assert "STARTTLS" not in srv.sessions[0].verbs()

    run(go())


def test_encrypt_without_starttls_is_deferred() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            (result,) = await deliver_to(srv, tls="encrypt")
        assert result.status is DEFERRED and result.dsn == "4.7.5"
        assert "TLS is required, but was not offered" in result.text
        assert "MAIL" not in srv.sessions[0].verbs()

    run(go())


def test_may_falls_back_to_plaintext_after_failed_handshake() -> None:
    async def go() -> None:
        async with ScriptedServer(tls=None) as srv:
            srv.break_tls = True
            srv.extensions.append("STARTTLS")
            (result,) = await deliver_to(srv, tls="may")
            (strict,) = await deliver_to(srv, tls="encrypt")
        assert result.status is DELIVERED
        assert "STARTTLS" in srv.sessions[0].verbs()
        assert "STARTTLS" not in srv.sessions[1].verbs() and len(srv.messages) == 1
        assert strict.status is DEFERRED and strict.dsn == "4.7.5"
        assert "TLS handshake" in strict.text

    run(go())


def test_plaintext_after_starttls_reply_is_refused() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            srv.inject_after_starttls = True
            srv.extensions.append("STARTTLS")
            (result,) = await deliver_to(srv, tls="encrypt")
        assert result.status is DEFERRED and result.dsn == "4.7.5"
        assert "sent data after its STARTTLS reply" in result.text

    run(go())


@pytest.mark.parametrize(("cert_name", "status"), [("127.0.0.1", DELIVERED),
                                                   ("wrong.example", DEFERRED)])
def test_verify_checks_the_certificate_name(ca: trustme.CA, ca_file: Path, cert_name: str,
                                            status: DeliveryStatus) -> None:
    async def go() -> None:
        async with ScriptedServer(tls=server_tls(ca, cert_name)) as srv:
            (result,) = await deliver_to(srv, tls="verify", ca_file=ca_file)
        assert result.status is status
        if status is DEFERRED:
            assert result.dsn == "4.7.5" and "certificate" in result.text
            assert "MAIL" not in srv.sessions[0].verbs()

    run(go())


def test_verify_needs_a_trusted_ca(ca_file: Path) -> None:
    other = trustme.CA()

    async def go() -> None:
        async with ScriptedServer(tls=server_tls(other, "127.0.0.1")) as srv:
            (result,) = await deliver_to(srv, tls="verify", ca_file=ca_file)
        assert result.status is DEFERRED and "not verified" in result.text

    run(go())


# -- AUTH to a smarthost -----------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smarthost_auth(ca: trustme.CA, mechanism: str) -> None:
    async def go() -> None:
        sink = Sink()
        check = PasswordCheck("relay-user", "s3cret \u00e9")
        exclude = [m for m in ("PLAIN", "LOGIN") if m != mechanism]
        server, port = await aiosmtpd_server(sink, tls_context=server_tls(ca),
                                             authenticator=check, auth_require_tls=True,
                                             auth_exclude_mechanism=exclude)
        hop = direct(port)
        try:
            results = {}
            for password in ("s3cret \u00e9", "wrong"):
                smarthost = SmarthostConfig(hop, "relay-user", password, "encrypt")
                job = make_job(["bob@example.org"], nexthop=hop)
                (results[password],) = await transport(smarthost=smarthost).deliver(job)
        finally:
            server.close()
        ok, bad = results["s3cret \u00e9"], results["wrong"]
        assert ok.status is DELIVERED and len(sink.envelopes) == 1
        assert bad.status is DEFERRED and bad.dsn.startswith("4.7")
        assert "SASL authentication failed" in bad.text and "535" in bad.text
        assert "wrong" not in bad.text
        assert [m for m, _ in check.attempts] == [mechanism, mechanism]

    run(go())


def test_credentials_only_for_the_smarthost(ca: trustme.CA) -> None:
    async def go() -> None:
        async with ScriptedServer(tls=server_tls(ca)) as srv:
            srv.extensions.append("AUTH PLAIN")
            smarthost = SmarthostConfig(parse_nexthop("smtp:[127.0.0.2]:2525"), "u", "p",
                                        "encrypt")
            (result,) = await deliver_to(srv, smarthost=smarthost)
        assert result.status is DELIVERED and "AUTH" not in srv.sessions[0].verbs()

    run(go())


# -- LMTP --------------------------------------------------------------------


def lmtp_job(hop: Nexthop) -> DeliveryJob:
    return make_job(["ok@example.test", "full@example.test", "gone@example.test",
                     "unknown@example.test", "ok2@example.test"], nexthop=hop)


def check_lmtp(results: list[DeliveryResult], srv: ScriptedServer) -> None:
    assert statuses(results) == [DELIVERED, DEFERRED, FAILED, FAILED, DELIVERED]
    assert results[1].dsn == "4.2.2" and "(in reply to end of DATA command)" in results[1].text
    assert results[3].dsn == "5.1.1" and "(in reply to RCPT TO command)" in results[3].text
    assert srv.sessions[0].verbs()[0] == "LHLO"


def lmtp_server(**kw: Any) -> ScriptedServer:
    srv = ScriptedServer(lmtp=True, extensions=("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME"),
                         **kw)
    srv.rcpt = {"unknown@example.test": "550 5.1.1 unknown user"}
    srv.lmtp_final = {"full@example.test": "452 4.2.2 mailbox full",
                      "gone@example.test": "552 5.2.2 over quota for good"}
    return srv


def test_lmtp_per_recipient_replies_tcp() -> None:
    async def go() -> None:
        async with lmtp_server() as srv:
            t = LmtpTransport("mail.example.test", delivery_config())
            results = await t.deliver(lmtp_job(parse_nexthop(f"lmtp:[127.0.0.1]:{srv.port}")))
        check_lmtp(results, srv)
        assert results[0].relay == f"127.0.0.1[127.0.0.1]:{srv.port}"

    run(go())


def test_lmtp_per_recipient_replies_unix_socket() -> None:
    async def go() -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "lmtp.sock")
            async with lmtp_server(unix_path=path) as srv:
                t = LmtpTransport("mail.example.test", delivery_config())
                results = await t.deliver(lmtp_job(parse_nexthop(f"lmtp:unix:{path}")))
            check_lmtp(results, srv)
            assert results[0].relay == f"lmtp:unix:{path}"

    run(go())


def test_lmtp_server_missing() -> None:
    async def go() -> None:
        t = LmtpTransport("mail.example.test", delivery_config())
        (result,) = await t.deliver(make_job(["a@example.test"],
                                             nexthop=parse_nexthop("lmtp:unix:/nonexistent/s")))
        assert result.status is DEFERRED and result.dsn == "4.4.1"

    run(go())


# -- connection caps -----------------------------------------------------------


@pytest.mark.parametrize(("per_destination", "expected"), [(1, 1), (3, 3)])
def test_connections_per_destination_capped(per_destination: int, expected: int) -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            srv.final_delay = 0.2
            t = transport(max_per_destination=per_destination)
            jobs = [make_job([f"r{i}@example.org"], nexthop=direct(srv.port)) for i in range(3)]
            results = await asyncio.gather(*(t.deliver(j) for j in jobs))
        assert all(r.status is DELIVERED for (r,) in results)
        assert srv.max_active == expected
        assert t.limiter.active == 0

    run(go())


def test_tls_context_for_verify_uses_system_store_when_no_ca_file() -> None:
    from postwarden.delivery.smtp_client import client_tls_context

    ctx = client_tls_context("verify")
    assert ctx is not None and ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    may = client_tls_context("may")
    assert may is not None and may.verify_mode is ssl.CERT_NONE
    assert client_tls_context("none") is None
    assert PEER_NAME  # the scripted servers' name


def test_opportunistic_contexts_load_no_ca_certificates() -> None:
    """may and encrypt check no certificate, so they do not pay for loading
    the system store (tens of milliseconds on the event loop at the first
    delivery); they keep TLS 1.2 at least and the default context's options."""
    from postwarden.delivery.smtp_client import client_tls_context

    default = ssl.create_default_context()
    for policy in ("may", "encrypt"):
        ctx = client_tls_context(policy)
        assert ctx is not None and ctx.cert_store_stats()["x509_ca"] == 0
        assert ctx.verify_mode is ssl.CERT_NONE and not ctx.check_hostname
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
        assert ctx.options == default.options
