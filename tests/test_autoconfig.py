"""The HTTP listener: Thunderbird autoconfig, Outlook Autodiscover (POX),
the Apple configuration profile and the MTA-STS policy, fetched over real
sockets from a running server, checked for what each client parses."""

from __future__ import annotations

import plistlib
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest
from tests.conftest import DOMAIN, HOSTNAME, ServerThread

from postwarden.delivery.mta_sts import parse_policy

HTTP = """
[http]
enabled = true
address = "127.0.0.1:0"
[clients]
imap_server = "imap.example.test"
"""
AD_REQ = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
AD = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"
OUTLOOK = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
# What Thunderbird's readFromXML accepts.
TB_SOCKET_TYPES = {"plain", "SSL", "STARTTLS"}
TB_AUTH = {"password-cleartext", "password-encrypted", "NTLM", "GSAPI", "client-IP-address",
           "TLS-client-cert", "OAuth2", "none"}


def fetch(st: ServerThread, path: str, *, host: str = "", data: bytes | None = None,
          ) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{st.server.http.port}{path}", data=data,
                                 method="POST" if data is not None else "GET")
    if host:
        req.add_header("Host", host)
    if data is not None:
        req.add_header("Content-Type", "text/xml")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def http_server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server(HTTP)


def _tb_server(el: ET.Element) -> dict[str, Any]:
    fields = {child.tag: (child.text or "") for child in el}
    assert set(fields) >= {"hostname", "port", "socketType", "authentication", "username"}
    assert 0 < int(fields["port"]) < 65536
    assert fields["socketType"] in TB_SOCKET_TYPES
    assert fields["authentication"] in TB_AUTH
    return {"type": el.get("type"), **fields}


@pytest.mark.parametrize("path", ["/mail/config-v1.1.xml?emailaddress=alice%40example.test",
                                  "/.well-known/autoconfig/mail/config-v1.1.xml"])
def test_thunderbird_autoconfig(http_server: ServerThread, path: str) -> None:
    status, headers, body = fetch(http_server, path, host=f"autoconfig.{DOMAIN}")
    assert status == 200 and "xml" in headers["content-type"]
    root = ET.fromstring(body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id") == DOMAIN
    assert [d.text for d in provider.findall("domain")] == [DOMAIN]
    incoming = [_tb_server(e) for e in provider.findall("incomingServer")]
    outgoing = [_tb_server(e) for e in provider.findall("outgoingServer")]
    assert incoming == [{"type": "imap", "hostname": "imap.example.test", "port": "993",
                         "socketType": "SSL", "authentication": "password-cleartext",
                         "username": "%EMAILADDRESS%"}]
    # The ports the server really listens on, implicit TLS first.
    assert [(o["type"], o["hostname"], int(o["port"]), o["socketType"]) for o in outgoing] == [
        ("smtp", HOSTNAME, http_server.port("submissions"), "SSL"),
        ("smtp", HOSTNAME, http_server.port("submission"), "STARTTLS")]


def test_thunderbird_unknown_domain_is_not_served(http_server: ServerThread) -> None:
    status, _h, _b = fetch(http_server, "/mail/config-v1.1.xml?emailaddress=a%40other.example")
    assert status == 404
    status, _h, _b = fetch(http_server, "/.well-known/autoconfig/mail/config-v1.1.xml",
                           host="autoconfig.other.example")
    assert status == 404


def autodiscover_request(address: str) -> bytes:
    return f"""<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="{AD_REQ}">
  <Request>
    <EMailAddress>{address}</EMailAddress>
    <AcceptableResponseSchema>{OUTLOOK[1:-1]}</AcceptableResponseSchema>
  </Request>
</Autodiscover>""".encode()


def test_outlook_autodiscover(http_server: ServerThread) -> None:
    status, headers, body = fetch(http_server, "/autodiscover/autodiscover.xml",
                                  data=autodiscover_request(f"Alice@{DOMAIN}"))
    assert status == 200 and "xml" in headers["content-type"]
    root = ET.fromstring(body)
    assert root.tag == f"{AD}Autodiscover"
    account = root.find(f"{OUTLOOK}Response/{OUTLOOK}Account")
    assert account is not None
    assert account.findtext(f"{OUTLOOK}AccountType") == "email"
    assert account.findtext(f"{OUTLOOK}Action") == "settings"
    protocols = {p.findtext(f"{OUTLOOK}Type"): {c.tag.removeprefix(OUTLOOK): c.text for c in p}
                 for p in account.findall(f"{OUTLOOK}Protocol")}
    assert set(protocols) == {"IMAP", "SMTP"}
    imap, smtp = protocols["IMAP"], protocols["SMTP"]
    assert (imap["Server"], imap["Port"], imap["Encryption"], imap["SSL"]) == (
        "imap.example.test", "993", "SSL", "on")
    assert (smtp["Server"], int(smtp["Port"] or 0), smtp["Encryption"]) == (
        HOSTNAME, http_server.port("submissions"), "SSL")
    for p in (imap, smtp):
        assert p["LoginName"] == f"alice@{DOMAIN}"
        assert p["AuthRequired"] == "on" and p["SPA"] == "off"
    # Outlook also asks with the capitalised path.
    status, _h, body2 = fetch(http_server, "/Autodiscover/Autodiscover.xml",
                              data=autodiscover_request(f"alice@{DOMAIN}"))
    assert status == 200 and body2 == body


@pytest.mark.parametrize("body,code", [
    (autodiscover_request("alice@other.example"), "603"),
    (b"not xml at all", "600"),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>', "600"),
    (autodiscover_request("no-at-sign"), "600"),
])
def test_outlook_autodiscover_errors(http_server: ServerThread, body: bytes, code: str) -> None:
    status, _h, resp = fetch(http_server, "/autodiscover/autodiscover.xml", data=body)
    assert status == 200
    root = ET.fromstring(resp)
    assert root.findtext(f"{AD}Response/{AD}Error/{AD}ErrorCode") == code


def test_apple_mobileconfig_is_a_valid_profile(http_server: ServerThread) -> None:
    status, headers, body = fetch(http_server, f"/mobileconfig?email=alice%40{DOMAIN}")
    assert status == 200
    assert headers["content-type"] == "application/x-apple-aspen-config"
    assert "attachment" in headers["content-disposition"]
    profile = plistlib.loads(body)  # raises unless a valid plist
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    uuid.UUID(profile["PayloadUUID"])
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    uuid.UUID(mail["PayloadUUID"])
    assert mail["PayloadUUID"] != profile["PayloadUUID"]
    assert mail["EmailAccountType"] == "EmailTypeIMAP"
    assert mail["EmailAddress"] == f"alice@{DOMAIN}"
    assert (mail["IncomingMailServerHostName"], mail["IncomingMailServerPortNumber"],
            mail["IncomingMailServerUseSSL"]) == ("imap.example.test", 993, True)
    assert (mail["OutgoingMailServerHostName"], mail["OutgoingMailServerPortNumber"],
            mail["OutgoingMailServerUseSSL"]) == (HOSTNAME, http_server.port("submissions"),
                                                  True)
    assert mail["IncomingMailServerAuthentication"] == "EmailAuthPassword"
    assert mail["OutgoingMailServerUsername"] == f"alice@{DOMAIN}"
    # The same download twice: the same profile (it replaces, not adds).
    assert fetch(http_server, f"/mobileconfig?email=alice%40{DOMAIN}")[2] == body
    assert fetch(http_server, "/mobileconfig?email=alice%40other.example")[0] == 404
    assert fetch(http_server, "/mobileconfig")[0] == 400


def test_mta_sts_policy(http_server: ServerThread) -> None:
    status, headers, body = fetch(http_server, "/.well-known/mta-sts.txt",
                                  host=f"mta-sts.{DOMAIN}")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    policy = parse_policy(body.decode())  # what senders' MTA-STS parsers read
    assert policy.mode == "testing" and policy.mx == (HOSTNAME,)
    assert fetch(http_server, "/.well-known/mta-sts.txt", host="mta-sts.other.example")[0] == 404


def test_no_imap_server_no_client_autoconfig(make_server: Callable[..., ServerThread]) -> None:
    st = make_server('[http]\nenabled = true\naddress = "127.0.0.1:0"\n')
    status, _h, body = fetch(st, f"/mail/config-v1.1.xml?emailaddress=a%40{DOMAIN}")
    assert status == 404 and b"imap_server" in body
    assert fetch(st, "/.well-known/mta-sts.txt")[0] == 200


def test_http_listener_is_off_by_default(server: ServerThread) -> None:
    assert server.server.http is None
