"""Parsing of envelope paths and their ESMTP parameters (untrusted input).

Owns the grammar of RFC 5321 section 4.1.2 (Path, Mailbox, Local-part,
Domain, address literals), its SMTPUTF8 extension (RFC 6531 3.3), and the
parameters of MAIL and RCPT: SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8
(RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461), AUTH (RFC 4954 5).

Written by hand because ``email.utils`` parses RFC 5322 header syntax, which
is far looser than an SMTP path, and would accept forms that relay testers
use.  Everything here is pure and total: bad input raises
:class:`PathError` carrying the reply to send, never anything else.

Security exposure: every string here comes from the network.  Forms that can
carry sender-specified routing (percent hack, bang paths, quoted ``@``,
source routes) are flagged so that policy never relays them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from postwarden import reply as R
from postwarden.envelope import Address, MailParams, RcptParams

# RFC 5321 4.5.3.1.1-3: length limits of the parts of a path.
LOCAL_PART_MAX = 64
DOMAIN_MAX = 255
PATH_MAX = 256
# RFC 3461 4.4: ENVID is at most 100 characters.
ENVID_MAX = 100

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING_ASCII = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
# RFC 6531 3.3: atext is extended with UTF8-non-ascii.
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*\Z")
# qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
_QUOTED_ASCII = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LABEL_ASCII = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_LABEL_UTF8 = re.compile(r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*"
                         r"[A-Za-z0-9\u0080-\U0010ffff])?\Z")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")


class PathError(ValueError):
    """Bad path or parameter; ``reply`` is what the client is told."""

    def __init__(self, reply: R.Reply, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Path:
    """A parsed path.  ``address`` is ``None`` for the null path ``<>``.

    ``routing`` is true when the local part carries sender-specified routing
    (``%``, ``!`` or a quoted ``@``); ``source_route`` holds an obsolete
    A-d-l (RFC 5321 4.1.2), which is ignored for delivery (RFC 5321 C).
    """

    address: Address | None
    source_route: tuple[str, ...] = ()
    routing: bool = False


def _check_domain(domain: str, utf8: bool) -> str:
    if domain.startswith("[") and domain.endswith("]"):
        return _check_literal(domain)
    if not domain or len(domain) > DOMAIN_MAX:
        raise PathError(R.ADDRESS_SYNTAX, f"bad domain length {len(domain)}")
    label_re = _LABEL_UTF8 if utf8 or not domain.isascii() else _LABEL_ASCII
    labels = domain.split(".")
    for label in labels:
        if not label_re.match(label):
            raise PathError(R.ADDRESS_SYNTAX, f"bad domain {domain!r}")
    if not utf8 and not domain.isascii():
        # RFC 6531 3.4: a U-label domain needs SMTPUTF8.
        raise PathError(R.SMTPUTF8_REQUIRED, "non-ASCII domain without SMTPUTF8")
    return domain.lower()


def _check_literal(literal: str) -> str:
    """RFC 5321 4.1.3 address literals: [IPv4] or [IPv6:addr]."""
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        if all(part.isdigit() for part in inner.split(".")) and inner.count(".") == 3:
            return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        pass
    raise PathError(R.ADDRESS_SYNTAX, f"bad address literal {literal!r}")


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    """Split at the ``@`` that separates local part and domain.

    The local part may be a quoted string containing ``@``; after it, exactly
    one ``@`` must remain (``u@ext@host`` is a syntax error).
    """
    if mailbox.startswith('"'):
        i = 1
        while i < len(mailbox):
            c = mailbox[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                break
            i += 1
        else:
            raise PathError(R.ADDRESS_SYNTAX, "unterminated quoted local part")
        local, rest = mailbox[: i + 1], mailbox[i + 1 :]
        if not rest.startswith("@"):
            raise PathError(R.ADDRESS_SYNTAX, "quoted local part without domain")
        return local, rest[1:]
    local, sep, domain = mailbox.partition("@")
    if not sep:
        raise PathError(R.ADDRESS_SYNTAX, "address without domain")
    return local, domain


def _canonical_local(local: str, utf8: bool) -> tuple[str, bool]:
    """Validate a local part; return its canonical form and the routing flag.

    A quoted string whose content is a valid dot-string is unquoted
    (RFC 5321 4.1.2: the two forms are equivalent).
    """
    dot_re = _DOT_STRING_UTF8 if utf8 else _DOT_STRING_ASCII
    quoted_re = _QUOTED_UTF8 if utf8 else _QUOTED_ASCII
    if dot_re.match(local):
        text = local
    elif quoted_re.match(local):
        content = re.sub(r"\\(.)", r"\1", local[1:-1])
        text = content if dot_re.match(content) else local
    else:
        if not utf8 and not local.isascii() and (
                _DOT_STRING_UTF8.match(local) or _QUOTED_UTF8.match(local)):
            raise PathError(R.SMTPUTF8_REQUIRED, "non-ASCII local part without SMTPUTF8")
        raise PathError(R.ADDRESS_SYNTAX, f"bad local part {local!r}")
    if len(local.encode("utf-8")) > LOCAL_PART_MAX:
        raise PathError(R.ADDRESS_SYNTAX, "local part too long")
    routing = any(c in text for c in "%!@")
    return text, routing


def parse_path(text: str, *, utf8: bool = False, allow_null: bool = False,
               allow_postmaster: bool = False) -> Path:
    """Parse ``<...>`` as it follows ``MAIL FROM:`` or ``RCPT TO:``.

    ``utf8`` allows RFC 6531 non-ASCII addresses (the client gave SMTPUTF8).
    ``allow_null`` accepts ``<>`` (reverse path).  ``allow_postmaster``
    accepts the bare ``<Postmaster>`` of RFC 5321 4.5.1, returned with an
    empty domain.
    """
    if len(text.encode("utf-8")) > PATH_MAX:
        raise PathError(R.ADDRESS_SYNTAX, "path too long")
    if not (text.startswith("<") and text.endswith(">")):
        raise PathError(R.ADDRESS_SYNTAX, "path not enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return Path(None)
        raise PathError(R.ADDRESS_SYNTAX, "null path not allowed here")
    if allow_postmaster and inner.lower() == "postmaster":
        return Path(Address("postmaster", ""))
    route: tuple[str, ...] = ()
    if inner.startswith("@"):
        # RFC 5321 4.1.2 A-d-l: "@one,@two:" before the mailbox.
        adl, sep, mailbox = inner.partition(":")
        if not sep:
            raise PathError(R.ADDRESS_SYNTAX, "bad source route")
        hops = []
        for hop in adl.split(","):
            if not hop.startswith("@"):
                raise PathError(R.ADDRESS_SYNTAX, "bad source route")
            hops.append(_check_domain(hop[1:], utf8))
        route = tuple(hops)
        inner = mailbox
    local_raw, domain_raw = _split_mailbox(inner)
    local, routing = _canonical_local(local_raw, utf8)
    domain = _check_domain(domain_raw, utf8)
    return Path(Address(local, domain), route, routing)


def xtext_decode(value: str) -> str:
    """RFC 3461 4: xtext, with ``+XX`` hex escapes."""
    if not _XTEXT.match(value):
        raise PathError(R.PARAM_SYNTAX, "bad xtext")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}"
                   for c in value)


def split_params(text: str) -> dict[str, str | None]:
    """``KEY=VALUE KEY2 ...`` into an upper-cased keyword map (RFC 5321 4.1.2)."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not _ESMTP_KEYWORD.match(key):
            raise PathError(R.PARAM_SYNTAX, f"bad parameter {item!r}")
        if sep and not _ESMTP_VALUE.match(value):
            raise PathError(R.PARAM_SYNTAX, f"bad parameter value {item!r}")
        ukey = key.upper()
        if ukey in params:
            raise PathError(R.PARAM_SYNTAX, f"duplicate parameter {ukey}")
        params[ukey] = value if sep else None
    return params


def split_path_and_params(arg: str, prefix: str) -> tuple[str, str]:
    """Split ``FROM:<path> params`` into the path and the parameter text.

    Tolerates a space after the colon (common client behaviour) but not
    inside the path; the path ends at the first ``>`` outside quotes.
    """
    if arg[: len(prefix)].upper() != prefix:
        raise PathError(R.PARAM_SYNTAX, f"expected {prefix}")
    rest = arg[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        raise PathError(R.ADDRESS_SYNTAX, "path not enclosed in <>")
    in_quote = False
    i = 1
    while i < len(rest):
        c = rest[i]
        if c == "\\" and in_quote:
            i += 2
            continue
        if c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            break
        i += 1
    else:
        raise PathError(R.ADDRESS_SYNTAX, "path not enclosed in <>")
    path, params = rest[: i + 1], rest[i + 1 :]
    if params and not params.startswith(" "):
        raise PathError(R.PARAM_SYNTAX, "junk after path")
    return path, params.strip(" ")


def parse_mail_params(text: str, *, esmtp: bool, size_max: int) -> MailParams:
    params = split_params(text)
    if params and not esmtp:
        raise PathError(R.PARAM_UNRECOGNIZED, "parameters need EHLO")
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise PathError(R.PARAM_SYNTAX, "bad SIZE")
            size = int(value)
            if size > size_max:
                raise PathError(R.MESSAGE_TOO_BIG, f"declared SIZE {size} > {size_max}")
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise PathError(R.PARAM_UNRECOGNIZED, f"unsupported BODY={value}")
            body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                raise PathError(R.PARAM_SYNTAX, "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise PathError(R.PARAM_SYNTAX, "bad RET")
            ret = value.upper()
        elif key == "ENVID":
            if value is None:
                raise PathError(R.PARAM_SYNTAX, "bad ENVID")
            envid = xtext_decode(value)
            if len(envid) > ENVID_MAX:
                raise PathError(R.PARAM_SYNTAX, "ENVID too long")
        elif key == "AUTH":
            if value is None:
                raise PathError(R.PARAM_SYNTAX, "bad AUTH")
            auth = xtext_decode(value)
        else:
            raise PathError(R.PARAM_UNRECOGNIZED, f"unsupported parameter {key}")
    return MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid,
                      auth=auth)


_NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")


def parse_rcpt_params(text: str, *, esmtp: bool) -> RcptParams:
    params = split_params(text)
    if params and not esmtp:
        raise PathError(R.PARAM_UNRECOGNIZED, "parameters need EHLO")
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for key, value in params.items():
        if key == "NOTIFY":
            if value is None:
                raise PathError(R.PARAM_SYNTAX, "bad NOTIFY")
            items = tuple(v.upper() for v in value.split(","))
            # RFC 3461 4.1: NEVER, or a combination of the other three.
            combination = all(i in _NOTIFY_VALUES for i in items)
            if items == ("NEVER",) or (items and combination and len(set(items)) == len(items)):
                notify = items
            else:
                raise PathError(R.PARAM_SYNTAX, f"bad NOTIFY={value}")
        elif key == "ORCPT":
            if value is None:
                raise PathError(R.PARAM_SYNTAX, "bad ORCPT")
            addr_type, sep, addr = value.partition(";")
            if not sep or not addr_type or not addr or not _ESMTP_KEYWORD.match(addr_type):
                raise PathError(R.PARAM_SYNTAX, "bad ORCPT")
            # RFC 6533 3: utf-8 type uses its own encoding; keep it verbatim.
            decoded = addr if addr_type.lower() == "utf-8" else xtext_decode(addr)
            orcpt = f"{addr_type.lower()};{decoded}"
        else:
            raise PathError(R.PARAM_UNRECOGNIZED, f"unsupported parameter {key}")
    return RcptParams(notify=notify, orcpt=orcpt)
