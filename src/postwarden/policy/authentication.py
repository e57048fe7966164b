"""What to do with a message once SPF, DKIM, ARC and DMARC have spoken.

Owns the enforcement decisions of inbound sender authentication (the mx
listener), configured in ``[checks]``:

* DMARC (RFC 7489 6.6.4) ``reject`` disposition -> 550 5.7.1 (or a tag);
  ``quarantine`` -> a spam header until content filtering takes it over;
* SPF ``fail`` of a domain that publishes no DMARC policy -> 550 5.7.23
  (RFC 7372), or accept;
* a DNS temporary error that could decide the outcome -> accept with
  ``temperror`` in Authentication-Results, or 451 (RFC 7372 4.7.24 for SPF).

Temporary unless proven permanent: nothing here rejects because a lookup
failed.

Security exposure: decides on attacker-controlled input (the From header,
DNS records of the sender's domain); the reply text names the policy and
the domain, never record contents.
"""

from __future__ import annotations

from dataclasses import dataclass

from postwarden import reply as R
from postwarden.config import ChecksConfig
from postwarden.message.authresults import AuthOutcome
from postwarden.policy.spf import SpfResult

SPF_TEMPERROR = R.Reply(451, "4.7.24", "SPF validation error, please try again later")
DMARC_TEMPERROR = R.Reply(451, "4.7.1", "DMARC validation error, please try again later")


@dataclass(frozen=True, slots=True)
class Decision:
    """``reply`` is None to accept; ``headers`` are extra header lines to add."""

    reply: R.Reply | None
    reason: str
    headers: bytes = b""


def decide(spf: SpfResult, outcome: AuthOutcome, checks: ChecksConfig) -> Decision:
    dmarc = outcome.dmarc
    domain = dmarc.from_domain
    if dmarc.record is None or not domain:
        # No policy was found (or no single From domain to look one up for,
        # which RFC 7489 6.6.1 leaves to local policy: like OpenDMARC's
        # default, such a message is not refused for DMARC).
        return _spf_only(spf, dmarc.result, checks)
    if dmarc.disposition == "reject":
        if checks.dmarc_reject == "reject":
            return Decision(R.Reply(550, "5.7.1",
                                    f"Message rejected by the DMARC policy of {domain}"),
                            f"dmarc {dmarc.result} policy=reject: {dmarc.reason}")
        return Decision(None, "dmarc reject, tagged",
                        _spam_header(f"DMARC policy reject of {domain}"))
    if dmarc.disposition == "quarantine":
        return Decision(None, "dmarc quarantine, tagged",
                        _spam_header(f"DMARC policy quarantine of {domain}"))
    if (checks.temperror == "tempfail" and dmarc.result == "temperror"
            and dmarc.policy in ("reject", "quarantine")):
        return Decision(DMARC_TEMPERROR, f"dmarc temperror: {dmarc.reason}")
    return Decision(None, "accepted")


def _spf_only(spf: SpfResult, dmarc_result: str, checks: ChecksConfig) -> Decision:
    """No DMARC policy applies: SPF alone decides (RFC 7208 8.4)."""
    if checks.temperror == "tempfail" and "temperror" in (spf.result, dmarc_result):
        return Decision(SPF_TEMPERROR, f"spf/dmarc temperror: {spf.comment}")
    if spf.result == "fail" and checks.spf_fail == "reject":
        text = spf.explanation or f"SPF of {spf.domain} does not permit this sender"
        return Decision(R.Reply(550, "5.7.23", _printable(text)),
                        f"spf fail {spf.mechanism} for {spf.domain}, no dmarc policy")
    return Decision(None, "accepted")


def _printable(text: str) -> str:
    return "".join(c for c in text if 32 <= ord(c) < 127)[:300] or "SPF validation failed"


def _spam_header(reason: str) -> bytes:
    return f"X-Postwarden-Spam: yes ({_printable(reason)})\r\n".encode("ascii")
