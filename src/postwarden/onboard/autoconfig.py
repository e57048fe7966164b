"""Autoconfiguration documents: how mail clients configure themselves.

* Thunderbird (and the clients that share its format: K-9, FairEmail,
  Evolution): ``config-v1.1.xml`` of the Mozilla ISPDB format, fetched from
  ``https://autoconfig.DOMAIN/mail/config-v1.1.xml`` or
  ``https://DOMAIN/.well-known/autoconfig/mail/config-v1.1.xml``.
* Outlook: Autodiscover "POX" (plain old XML, [MS-OXDSCLI]): a POST of an
  ``<EMailAddress>`` to ``/autodiscover/autodiscover.xml`` answered with the
  ``outlook/responseschema/2006a`` protocols.
* Apple (iOS, macOS): a configuration profile (``.mobileconfig``, a plist)
  with one ``com.apple.mail.managed`` payload.
* The MTA-STS policy file (RFC 8461 3.2).

All of them come from :func:`postwarden.onboard.clientconfig.client_settings`;
none has anything to say unless an IMAP server is configured (a client
account needs somewhere to read mail: the formats require an incoming
server), which :class:`NoIncomingServer` reports.

Security exposure: the Autodiscover request body is untrusted XML from the
internet.  It is size-limited by the caller and refused when it has a
DOCTYPE (no entities, so no entity expansion or external fetch); only the
``EMailAddress`` element is read.  The answers never say whether an account
exists (the same settings for any address of a local domain), so they
cannot be used to harvest addresses.
"""

from __future__ import annotations

import plistlib
import uuid
import xml.etree.ElementTree as ET

from postwarden import config as _config
from postwarden.onboard.clientconfig import ClientSettings, Endpoint, client_settings

THUNDERBIRD_VERSION = "1.1"
AUTODISCOVER_REQUEST_NS = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006")
AUTODISCOVER_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
# The request body limit (an Autodiscover request is a few hundred bytes).
AUTODISCOVER_MAX_BODY = 16 * 1024
MOBILECONFIG_TYPE = "application/x-apple-aspen-config"
# A fixed namespace: the same account gets the same payload UUIDs, so
# installing a new download replaces the old profile instead of adding one.
_UUID_NS = uuid.UUID("8a6f1f8e-3c5e-4b0a-9d2f-6e1c0b7d4a21")


class NoIncomingServer(Exception):
    """No ``[clients] imap_server``: clients cannot be configured."""


class BadRequest(Exception):
    """An Autodiscover request that cannot be read."""


def _settings(cfg: _config.Config, address: str, ports: dict[str, int] | None
              ) -> ClientSettings:
    s = client_settings(cfg, address, ports)
    if not s.incoming:
        raise NoIncomingServer("no IMAP server is configured ([clients] imap_server)")
    return s


def _text(parent: ET.Element, tag: str, text: str) -> ET.Element:
    el = ET.SubElement(parent, tag)
    el.text = text
    return el


def _xml(root: ET.Element) -> bytes:
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


# RFC 8461 3.2: max_age in seconds (one week).
MTA_STS_MAX_AGE = 604800


def mta_sts_policy(cfg: _config.Config) -> str:
    """The MTA-STS policy file (RFC 8461 3.2, CRLF lines): our host name
    is the one MX; the mode is ``[http] mta_sts_mode``."""
    return (f"version: STSv1\r\nmode: {cfg.http.mta_sts_mode}\r\nmx: {cfg.hostname}\r\n"
            f"max_age: {MTA_STS_MAX_AGE}\r\n")


# -- Thunderbird -------------------------------------------------------------


def thunderbird(cfg: _config.Config, domain: str, ports: dict[str, int] | None = None
                ) -> bytes:
    """``config-v1.1.xml`` for ``domain`` (usernames as ``%EMAILADDRESS%``,
    which Thunderbird replaces with the address being set up)."""
    s = _settings(cfg, "", ports)
    root = ET.Element("clientConfig", version=THUNDERBIRD_VERSION)
    provider = ET.SubElement(root, "emailProvider", id=domain)
    _text(provider, "domain", domain)
    _text(provider, "displayName", f"{domain} mail")
    _text(provider, "displayShortName", domain)

    def server(tag: str, ep: Endpoint) -> None:
        el = ET.SubElement(provider, tag, type=ep.protocol)
        _text(el, "hostname", ep.server)
        _text(el, "port", str(ep.port))
        _text(el, "socketType", "SSL" if ep.implicit_tls else "STARTTLS")
        # "password-cleartext": a normal password, inside TLS.
        _text(el, "authentication", "password-cleartext")
        _text(el, "username", "%EMAILADDRESS%")

    for ep in s.incoming:
        server("incomingServer", ep)
    for ep in s.outgoing:
        server("outgoingServer", ep)
    return _xml(root)


# -- Outlook Autodiscover (POX) ----------------------------------------------


def autodiscover_address(body: bytes) -> str:
    """The ``EMailAddress`` of an Autodiscover request."""
    if len(body) > AUTODISCOVER_MAX_BODY:
        raise BadRequest("request too large")
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise BadRequest("DTDs are not accepted")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise BadRequest(f"not XML: {exc}") from None
    for el in root.iter():
        if el.tag in (f"{{{AUTODISCOVER_REQUEST_NS}}}EMailAddress", "EMailAddress"):
            address = (el.text or "").strip()
            local, at, domain = address.rpartition("@")
            if at and local and domain and " " not in address and len(address) <= 254:
                return address.lower()
            raise BadRequest("bad EMailAddress")
    raise BadRequest("no EMailAddress")


def autodiscover(cfg: _config.Config, address: str, ports: dict[str, int] | None = None
                 ) -> bytes:
    """The POX response for ``address``: one IMAP and the SMTP protocols."""
    s = _settings(cfg, address, ports)
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_NS)
    response = ET.SubElement(root, "Response", xmlns=OUTLOOK_NS)
    user = ET.SubElement(response, "User")
    _text(user, "DisplayName", address)
    account = ET.SubElement(response, "Account")
    _text(account, "AccountType", "email")
    _text(account, "Action", "settings")
    for ep in (*s.incoming, *s.outgoing[:1]):
        proto = ET.SubElement(account, "Protocol")
        _text(proto, "Type", ep.protocol.upper())
        _text(proto, "Server", ep.server)
        _text(proto, "Port", str(ep.port))
        _text(proto, "DomainRequired", "off")
        _text(proto, "LoginName", ep.username)
        _text(proto, "SPA", "off")
        # Encryption "SSL": TLS from the first byte; "TLS": STARTTLS.
        _text(proto, "SSL", "on")
        _text(proto, "Encryption", "SSL" if ep.implicit_tls else "TLS")
        _text(proto, "AuthRequired", "on")
        if ep.protocol == "smtp":
            _text(proto, "UsePOPAuth", "on")
            _text(proto, "SMTPLast", "off")
    return _xml(root)


def autodiscover_error(code: int, message: str) -> bytes:
    """An Autodiscover error response (600: invalid request; 603: the
    address is not served here)."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_NS)
    response = ET.SubElement(root, "Response")
    error = ET.SubElement(response, "Error")
    _text(error, "ErrorCode", str(code))
    _text(error, "Message", message)
    _text(error, "DebugData", "")
    return _xml(root)


# -- Apple configuration profile -----------------------------------------------


def mobileconfig(cfg: _config.Config, address: str, ports: dict[str, int] | None = None
                 ) -> bytes:
    """An unsigned configuration profile with the IMAP/SMTP account."""
    s = _settings(cfg, address, ports)
    incoming, outgoing = s.incoming[0], s.outgoing[0]
    domain = s.display_domain
    reverse = ".".join(reversed(cfg.hostname.split(".")))
    account = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{reverse}.postwarden.mail.{address}",
        "PayloadUUID": str(uuid.uuid5(_UUID_NS, f"mail:{address}")).upper(),
        "PayloadDisplayName": f"{address} (IMAP)",
        "EmailAccountDescription": address,
        "EmailAccountName": address,
        "EmailAccountType": "EmailTypeIMAP",
        "EmailAddress": address,
        "IncomingMailServerHostName": incoming.server,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerUsername": incoming.username,
        "OutgoingMailServerHostName": outgoing.server,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerUsername": outgoing.username,
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{reverse}.postwarden.{address}",
        "PayloadUUID": str(uuid.uuid5(_UUID_NS, f"profile:{address}")).upper(),
        "PayloadDisplayName": f"{domain} mail",
        "PayloadDescription": f"Mail account {address} on {cfg.hostname}",
        "PayloadOrganization": domain,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [account],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)
