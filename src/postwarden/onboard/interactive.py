"""Interactive ``postwarden init``: a few questions, then a working setup.

Run when ``init`` is started in a terminal without ``--non-interactive``.
It asks only for the mail domain(s), the public host name and the first
account (each with a default; command-line options become the defaults),
then decides the rest itself and says what it decided:

* ports: 25, 587 and 465 unless given; one already in use is reported and
  a free alternative offered;
* the certificate: a Let's Encrypt one for the host name when it exists
  (``/etc/letsencrypt/live/HOST/``), otherwise a self-signed one (and it
  says so, and how to replace it);
* a DKIM key per domain; ``postmaster@`` aliases to the first account when
  that account is not postmaster itself (RFC 5321 4.5.1 requires it).

It ends by printing the DNS records to publish and the mail client
settings.

Security exposure: writes the TLS key (0600) and the data directory
(0700); the account's generated password is printed once, never stored in
clear.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postwarden import bootstrap
from postwarden import config as _config
from postwarden.auth import passwords
from postwarden.storage.sqlite_directory import DirectoryError, SqliteDirectory, check_domain

LETSENCRYPT_LIVE = Path("/etc/letsencrypt/live")
# Offered instead of a standard port that another program holds.
FALLBACK_PORTS = {"mx": 2525, "submission": 5870, "submissions": 4650}


class InitCancelled(Exception):
    """The person stopped answering (end of input)."""


def wanted(args: argparse.Namespace) -> bool:
    """Interactive unless told not to, or not talking to a terminal."""
    return not args.non_interactive and sys.stdin.isatty() and sys.stdout.isatty()


def ask(question: str, default: str, check: Callable[[str], str]) -> str:
    """One question; an empty answer takes ``default``; asked again until
    ``check`` accepts the answer (it raises ValueError with the reason)."""
    while True:
        try:
            answer = input(f"{question} [{default}]: ").strip()
        except EOFError:
            raise InitCancelled("init cancelled (no answer)") from None
        try:
            return check(answer or default)
        except ValueError as exc:
            print(f"  {exc}")


def _domains(text: str) -> str:
    names = [n for n in text.replace(",", " ").split() if n]
    if not names:
        raise ValueError("give at least one domain")
    try:
        return " ".join(dict.fromkeys(check_domain(n) for n in names))
    except DirectoryError as exc:
        raise ValueError(str(exc)) from None


def _hostname(text: str) -> str:
    try:
        return check_domain(text)
    except DirectoryError as exc:
        raise ValueError(str(exc)) from None


def _account(domains: list[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        local, at, domain = text.strip().lower().rpartition("@")
        if not at or not local:
            raise ValueError("give a full address, like postmaster@" + domains[0])
        if domain not in domains:
            raise ValueError(f"the domain must be one of {', '.join(domains)}")
        return f"{local}@{domain}"
    return check


def port_state(host: str, port: int) -> str:
    """"free", "in use" or "privileged" (binding needs root or
    CAP_NET_BIND_SERVICE, which the systemd unit grants)."""
    bind_host = {"*": "0.0.0.0", "localhost": "127.0.0.1"}.get(host, host)
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((bind_host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use"
            if exc.errno == errno.EACCES:
                return "privileged"
            raise
    return "free"


def _choose_port(name: str, host: str, port: int) -> int:
    state = port_state(host, port) if port else "free"
    if state == "privileged":
        print(f"  note: port {port} ({name}) needs root or CAP_NET_BIND_SERVICE to listen on "
              "(the systemd unit in deploy/ grants it)")
    if state != "in use":
        return port
    fallback = FALLBACK_PORTS[name]
    while port_state(host, fallback) != "free":
        fallback += 1
    print(f"  port {port} ({name}) is already in use on {host} (another mail server?).")
    answer = ask(f"  Listen for {name} on port {fallback} instead (yes), or keep {port} (no)?",
                 "yes", lambda a: a.lower() if a.lower() in ("yes", "no", "y", "n") else
                 _bad("answer yes or no"))
    return fallback if answer.startswith("y") else port


def _bad(reason: str) -> str:
    raise ValueError(reason)


@dataclass(frozen=True, slots=True)
class Certificate:
    cert: str
    key: str
    letsencrypt: bool


def find_certificate(hostname: str, live: Path) -> Certificate | None:
    """A Let's Encrypt certificate for ``hostname`` (certbot's live/ links)."""
    directory = live / hostname
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    if cert.is_file() and key.is_file():
        return Certificate(str(cert), str(key), True)
    return None


def run(args: argparse.Namespace) -> int:
    """The whole interactive init; returns the exit status."""
    directory: Path = args.dir.resolve()
    path = directory / _config.DEFAULT_CONFIG
    if path.exists() and not args.force:
        print(f"postwarden: {path} already exists (use --force to overwrite it)",
              file=sys.stderr)
        return 1
    print("Setting up postwarden in", directory)
    print("Press Enter to take the value in [brackets].\n")
    domains = ask("Mail domain(s) (the part after @; several separated by spaces)",
                  args.domain or _guess_domain(), _domains).split()
    hostname = ask("Public host name of this server (its MX; clients connect to it)",
                   args.hostname or f"mail.{domains[0]}", _hostname)
    account = ask("First account (you log in with it; it gets postmaster mail)",
                  f"postmaster@{domains[0]}", _account(domains))
    listen_host = args.listen_host if args.listen_host is not None else "*"
    print()
    ports = {name: _choose_port(name, listen_host, given if given is not None
                                else _config.DEFAULT_PORTS[name])
             for name, given in (("mx", args.mx_port), ("submission", args.submission_port),
                                 ("submissions", args.submissions_port))}
    found = find_certificate(hostname, Path(args.letsencrypt_dir))
    text = bootstrap.render_config(
        hostname=hostname, domain=domains[0], domains=domains, listen_host=listen_host,
        mx_port=ports["mx"], submission_port=ports["submission"],
        submissions_port=ports["submissions"], config_path=str(path), data_dir=args.data_dir,
        cert=found.cert if found else None, key=found.key if found else None)
    cfg = _config.parse(tomllib.loads(text), path)
    assert cfg.tls.cert is not None and cfg.tls.key is not None

    bootstrap.write_install(directory, cfg, path, text,
                            self_signed_for=None if found is not None else (hostname, listen_host))
    print(f"\nwrote {path}")
    print(f"listening on {listen_host}: mx {ports['mx']}, submission {ports['submission']} "
          f"(STARTTLS), submissions {ports['submissions']} (TLS)")
    if found is not None:
        print(f"using the Let's Encrypt certificate {found.cert}")
    else:
        print(f"no certificate found for {hostname} in {args.letsencrypt_dir}: wrote a "
              f"SELF-SIGNED one ({cfg.tls.cert}).  Mail clients will warn about it; get a "
              f"real one (certbot certonly -d {hostname}) and run init again, or set [tls].")

    password = _accounts(cfg, account, domains)
    for domain in domains:
        keys = bootstrap.init_dkim(cfg.data_dir, domain)
        print(f"DKIM: mail from {domain} is signed with selector "
              f"{', '.join(k.selector for k in keys)}")
    if password is not None:
        print(f"\nPassword for {account} (shown only this once; store it now):\n")
        print(f"    {password}\n")
    _closing(cfg, account, domains, path)
    return 0


def _guess_domain() -> str:
    fqdn = socket.getfqdn().lower()
    parts = fqdn.split(".")
    return ".".join(parts[1:]) if len(parts) > 2 else (fqdn if "." in fqdn else "example.org")


def _accounts(cfg: _config.Config, account: str, domains: list[str]) -> str | None:
    """The first account (a new password, or None when it existed), and
    postmaster aliases to it."""
    password = None
    with SqliteDirectory(cfg.db_path, cfg.domains) as d:
        if d.find_account(account) is not None:
            print(f"account {account} already exists; password unchanged")
        else:
            password = passwords.generate_password()
            d.add_user(account, passwords.hash_password(password))
            print(f"created account {account}")
        for domain in domains:
            postmaster = f"postmaster@{domain}"
            if postmaster != account and not d.resolve_sync(postmaster):
                d.add_alias(postmaster, [account])
                print(f"alias {postmaster} -> {account}")
    return password


def _closing(cfg: _config.Config, account: str, domains: list[str], path: Path) -> None:
    from postwarden import cli_dns
    from postwarden.dkim_keys import KeyStore
    from postwarden.onboard.clientconfig import client_settings, render_table

    store = KeyStore.for_data_dir(cfg.data_dir)
    print("=" * 72)
    print("1. Publish these DNS records (at your DNS provider):\n")
    for domain in domains:
        print(cli_dns.render_records(cfg, domain, cli_dns.expected_records(cfg, domain, store)))
    print("=" * 72)
    print("2. Set up a mail client (Outlook, Foxmail, Thunderbird, a phone) with:\n")
    print(render_table(client_settings(cfg, account)))
    print("=" * 72)
    print("3. Start and check:\n")
    print(f"  postwarden -c {path} serve          # or: systemctl start postwarden")
    print(f"  postwarden -c {path} doctor         # checks everything, says what to fix")
    print(f"  POSTWARDEN_PASSWORD='...' postwarden -c {path} send-test --to {account}")
