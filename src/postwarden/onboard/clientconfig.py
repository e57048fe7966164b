"""Client settings: what a person types into a mail client.

:func:`client_settings` computes, from the config, the servers a mail
client uses for one account: SMTP submission on 587 (STARTTLS, RFC 6409)
and 465 (implicit TLS, RFC 8314), with normal password authentication and
the full address as username, and incoming mail over IMAP when
``[clients] imap_server`` names one (for example Dovecot).  The CLI
(``postwarden client-config``), ``init``, and the autoconfiguration
documents (:mod:`postwarden.onboard.autoconfig`) all read this one
computation; an admin web page can call it the same way.

Security exposure: none (it formats public facts; no secret is read).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from postwarden import config as _config
from postwarden.onboard.settings import IMAP_PORTS

STARTTLS = "STARTTLS"
SSL_TLS = "SSL/TLS"
NORMAL_PASSWORD = "normal password"
# The username of a generic table (no address given).
ANY_USER = "your full email address"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server a mail client talks to."""

    protocol: str  # "smtp" or "imap"
    role: str  # "outgoing" or "incoming"
    server: str
    port: int
    security: str  # STARTTLS or SSL/TLS
    authentication: str
    username: str

    @property
    def implicit_tls(self) -> bool:
        return self.security == SSL_TLS


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Everything a mail client needs for one account, preferred first."""

    address: str  # empty for the generic table
    display_domain: str
    outgoing: tuple[Endpoint, ...]
    incoming: tuple[Endpoint, ...]

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.incoming + self.outgoing


def _listener_port(cfg: _config.Config, mode: str, ports: Mapping[str, int]) -> int | None:
    """The port of the first enabled listener of ``mode`` (the running
    server's bound port when given in ``ports``, by listener name)."""
    for lst in cfg.listeners:
        if lst.enabled and lst.mode == mode:
            return ports.get(lst.name, lst.port)
    return None


def client_settings(cfg: _config.Config, address: str = "",
                    ports: Mapping[str, int] | None = None) -> ClientSettings:
    """The settings for ``address`` (an account; empty: any account).

    ``ports`` maps listener names to the ports actually bound (a running
    server on port 0); ``[clients]`` ports, when set, win over both."""
    bound = ports or {}
    server = cfg.clients.server or cfg.hostname
    username = address or ANY_USER
    domain = address.rpartition("@")[2] if "@" in address else (
        cfg.domains[0] if cfg.domains else server)
    outgoing: list[Endpoint] = []
    # Implicit TLS first: RFC 8314 3.3 prefers it to STARTTLS.
    for mode, override, security in (
            (_config.MODE_SUBMISSIONS, cfg.clients.submissions_port, SSL_TLS),
            (_config.MODE_SUBMISSION, cfg.clients.submission_port, STARTTLS)):
        port = override or _listener_port(cfg, mode, bound)
        if port:
            outgoing.append(Endpoint("smtp", "outgoing", server, port, security,
                                     NORMAL_PASSWORD, username))
    incoming: list[Endpoint] = []
    if cfg.clients.imap_server:
        sec = cfg.clients.imap_security
        incoming.append(Endpoint(
            "imap", "incoming", cfg.clients.imap_server,
            cfg.clients.imap_port or IMAP_PORTS[sec], SSL_TLS if sec == "ssl" else STARTTLS,
            NORMAL_PASSWORD, username))
    return ClientSettings(address, domain, tuple(outgoing), tuple(incoming))


def render_table(settings: ClientSettings) -> str:
    """The plain-text table for a person setting up Outlook, Foxmail,
    Thunderbird or a phone by hand."""
    who = settings.address or "every account"
    lines = [f"Mail client settings for {who}", ""]
    header = f"{'':<22} {'SERVER':<28} {'PORT':<5} {'ENCRYPTION':<10} AUTHENTICATION"
    lines.append(header)
    for ep in settings.endpoints:
        label = ("Incoming (IMAP)" if ep.protocol == "imap"
                 else f"Outgoing (SMTP {ep.port})")
        lines.append(f"{label:<22} {ep.server:<28} {ep.port:<5} {ep.security:<10} "
                     f"{ep.authentication}")
    lines += ["", f"Username: {settings.endpoints[0].username if settings.endpoints else ''}",
              "Password: the account's password (or an application password: "
              "postwarden user app-password add ADDRESS)"]
    if not settings.incoming:
        lines += ["", "Incoming mail: no IMAP server is configured ([clients] imap_server); "
                      "postwarden only sends and receives SMTP.  docs/deploy.md shows how "
                      "to add Dovecot for reading mail."]
    if settings.outgoing:
        lines += ["", "Either outgoing server works; prefer SSL/TLS on "
                      f"{settings.outgoing[0].port} when the client offers it (RFC 8314)."]
    return "\n".join(lines) + "\n"
