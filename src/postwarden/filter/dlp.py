"""Outgoing content review (data-loss prevention) for submitted mail.

Owns the ``dlp`` filter, run on authenticated submission traffic.  Built-in
detectors, each confirmed by its check digits so that random numbers do not
match:

- ``card``: payment card numbers (13-19 digits, spaces or dashes allowed,
  a known issuer prefix, Luhn check, ISO/IEC 7812-1);
- ``cn-id``: Chinese resident identity numbers (18 characters, a valid
  birth date, ISO 7064 MOD 11-2 check character, GB 11643-1999);
- ``iban``: International Bank Account Numbers (country length, mod 97 = 1,
  ISO 13616);
- ``private-key``: PEM/OpenSSH/PGP private key blocks.

Custom patterns (regular expressions) add to these.  Text is taken from the
subject and every text-like part, decoded (base64, quoted-printable), up to
:data:`SCAN_MAX` bytes in total.  What happens on a match is configurable:
``quarantine`` (hold for review, the default), ``reject`` (554 5.7.1), or
``notify`` (deliver, and tell the postmaster).

Security exposure: the log and the quarantine record say which detector
fired and how often, never the matched number itself.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from postwarden.filter.verdict import CONTENT_REFUSED, Action, FilterMessage, FilterVerdict

DETECTORS = ("card", "cn-id", "iban", "private-key")
ACTIONS = ("quarantine", "reject", "notify")
SCAN_MAX = 4 * 1024 * 1024

_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_IBAN = re.compile(r"(?<![A-Z0-9])([A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30})(?![A-Z0-9])")
_KEY = re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY"
                  r"(?: BLOCK)?-----")
# Issuer prefixes (Visa, Mastercard, Amex, Discover, JCB, UnionPay, Diners).
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|6011|64[4-9]|65|35|62|30[0-5]|36|38")
_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"
# ISO 13616 lengths of the commonest countries (others: 15-34 accepted).
_IBAN_LENGTHS = {"AT": 20, "BE": 16, "CH": 21, "CZ": 24, "DE": 22, "DK": 18, "ES": 24,
                 "FI": 18, "FR": 27, "GB": 22, "IE": 22, "IT": 27, "LU": 20, "NL": 18,
                 "NO": 15, "PL": 28, "PT": 25, "SE": 24}


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def is_card(text: str) -> bool:
    digits = text.replace(" ", "").replace("-", "")
    return (13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) is not None
            and luhn(digits))


def is_cn_id(text: str) -> bool:
    text = text.upper()
    if len(text) != 18 or not text[:17].isdigit():
        return False
    try:
        datetime.date(int(text[6:10]), int(text[10:12]), int(text[12:14]))
    except ValueError:
        return False
    total = sum(int(c) * w for c, w in zip(text[:17], _CN_WEIGHTS, strict=True))
    return _CN_CHECK[total % 11] == text[17]


def is_iban(text: str) -> bool:
    iban = text.replace(" ", "").upper()
    expected = _IBAN_LENGTHS.get(iban[:2])
    if expected is not None and len(iban) != expected:
        return False
    if not 15 <= len(iban) <= 34:
        return False
    moved = iban[4:] + iban[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in moved))
    except ValueError:
        return False
    return number % 97 == 1


@dataclass(frozen=True, slots=True)
class DlpPattern:
    name: str
    pattern: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class DlpSettings:
    detectors: tuple[str, ...] = DETECTORS
    patterns: tuple[DlpPattern, ...] = ()
    action: str = "quarantine"


def find(text: str, detectors: tuple[str, ...], patterns: tuple[DlpPattern, ...] = ()
         ) -> dict[str, int]:
    """Matches per detector (name -> count) in ``text``."""
    hits: dict[str, int] = {}

    def add(name: str) -> None:
        hits[name] = hits.get(name, 0) + 1

    # Cheap prefilters: the number detectors need at least ten digits
    # (a Norwegian IBAN has 13, a card 13, an identity number 17), the key
    # detector its marker; most messages skip every regular expression.
    numbers = sum(map(text.count, "0123456789")) >= 10
    if "card" in detectors and numbers:
        for m in _CARD.finditer(text):
            if is_card(m.group()):
                add("card")
    if "cn-id" in detectors and numbers:
        for m in _CN_ID.finditer(text):
            if is_cn_id(m.group()):
                add("cn-id")
    if "iban" in detectors and numbers:
        for m in _IBAN.finditer(text):
            if is_iban(m.group(1)):
                add("iban")
    if "private-key" in detectors and "PRIVATE KEY" in text:
        for _ in _KEY.finditer(text):
            add("private-key")
    for p in patterns:
        for _ in p.pattern.finditer(text):
            add(p.name)
    return hits


def message_text(message: FilterMessage) -> str:
    """The subject and the decoded text of the message, bounded."""
    chunks = [(message.field_value(b"subject") or b"").decode("utf-8", "replace")]
    if not message.multipart and message.field_value(b"content-transfer-encoding") is None:
        chunks.append(message.body[:SCAN_MAX].decode("utf-8", "replace"))
        return "\n".join(chunks)
    left = SCAN_MAX
    data = message.data
    for part in message.mime.parts:
        if left <= 0:
            break
        if not (part.content_type.startswith("text/")
                or part.content_type in ("application/pgp-keys", "application/x-pem-file",
                                         "application/octet-stream")):
            continue
        content = part.decoded(data, left)
        left -= len(content)
        chunks.append(content.decode("utf-8", "replace"))
    return "\n".join(chunks)


class DlpFilter:
    name = "dlp"

    def __init__(self, settings: DlpSettings) -> None:
        self.settings = settings

    def check(self, message: FilterMessage) -> FilterVerdict:
        hits = find(message_text(message), self.settings.detectors, self.settings.patterns)
        if not hits:
            return FilterVerdict(Action.ACCEPT)
        rules = tuple(f"DLP_{name.upper().replace('-', '_')}" for name in sorted(hits))
        reason = "outgoing content review: " + ", ".join(
            f"{name} x{count}" for name, count in sorted(hits.items()))
        action = self.settings.action
        if action == "reject":
            return FilterVerdict(Action.REJECT, reason, CONTENT_REFUSED, rules=rules)
        if action == "notify":
            return FilterVerdict(Action.ACCEPT, reason, rules=rules, notify=True)
        return FilterVerdict(Action.QUARANTINE, reason, rules=rules)
