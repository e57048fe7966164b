"""The relay tester's forms: recipient addresses an open-relay test tries.

An open relay accepts, from a stranger, mail for a domain it does not
serve.  Relay testers try the plain form and the routing tricks that
fooled older servers: the percent hack, bang paths, quoted local parts,
source routes (RFC 5321 C), a double ``@``, trailing dots and address
literals.  ``postwarden doctor`` sends them, after ``MAIL FROM`` of an
outside sender, to its own mx listener (never ``DATA``: nothing is sent).

Security exposure: it talks SMTP to our own listener only.
"""

from __future__ import annotations

import smtplib

OUTSIDE = "relay-test.invalid"  # RFC 2606: never a real domain


def relay_forms(local_domain: str, outside: str = OUTSIDE) -> list[str]:
    """The recipients to try; none may be accepted from a stranger."""
    d = local_domain
    return [
        f"victim@{outside}",
        f"victim%{outside}@{d}",
        f"{outside}!victim@{d}",
        f'"victim@{outside}"@{d}',
        f"@{d}:victim@{outside}",
        f"victim@{outside}@{d}",
        f"victim@{outside}.",
        "victim@[192.0.2.1]",
    ]


def try_relay(host: str, port: int, local_domain: str, *, timeout: float = 10.0
              ) -> list[tuple[str, int, str]]:
    """Each form that was accepted: (recipient, code, reply text).  Raises
    ``OSError`` / ``smtplib.SMTPException`` when the session fails."""
    accepted: list[tuple[str, int, str]] = []
    with smtplib.SMTP(host, port, local_hostname="relay-test.invalid",
                      timeout=timeout) as smtp:
        smtp.ehlo()
        for rcpt in relay_forms(local_domain):
            code, _ = smtp.mail(f"tester@{OUTSIDE}")
            if code != 250:
                raise smtplib.SMTPResponseException(code, b"MAIL FROM refused")
            # smtplib adds the angle brackets; the address goes out verbatim.
            code, text = smtp.docmd("RCPT TO:", f"<{rcpt}>")
            if 200 <= code < 300:
                accepted.append((rcpt, code, text.decode("utf-8", "replace")))
            smtp.rset()
    return accepted
