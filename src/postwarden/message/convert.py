"""Convert: what outbound delivery must know and change about a message's octets.

Owns three questions the SMTP client asks before sending to a peer:

* :func:`needs_smtputf8`: does the transaction need SMTPUTF8 (RFC 6531)?
  Yes when an envelope address or the top-level header block holds non-ASCII
  octets (RFC 6532 3).  8-bit octets only in the body need 8BITMIME, not this.
* :func:`is_8bit`: does the body need ``BODY=8BITMIME`` (RFC 6152)?
* :func:`downgrade_to_7bit`: re-encode an 8-bit MIME message for a peer that
  lacks 8BITMIME (RFC 6152 3, RFC 1652 3): only leaf parts whose bodies are not
  valid 7bit data (RFC 2045 2.7) change, text/* to quoted-printable and all
  other types to base64; everything else is copied byte for byte.

Why hand-written: ``email``'s generator re-serialises the whole message -- it
refolds headers, rewrites boundaries and line ends and re-encodes parts that
needed nothing -- so bytes a reader (or a DKIM verifier) sees change for no
reason.  Here a small MIME splitter works on offsets into the raw bytes,
recurses into multipart/* and message/rfc822 only where the subtree is not
already clean, and splices in new bytes for the few entities that change.

Decisions:

* Text with 8-bit octets and no charset parameter is labelled
  ``charset=unknown-8bit`` (RFC 1428 3): a relay must not claim a charset it
  does not know, and the default (us-ascii, RFC 2046 4.1.2) would be wrong.
* A message without ``MIME-Version`` whose body changes gains
  ``MIME-Version: 1.0`` (and, if it has no Content-Type, ``text/plain;
  charset=unknown-8bit``): a Content-Transfer-Encoding means nothing without it.
* A part labelled quoted-printable but holding raw 8-bit octets is decoded
  leniently (raw octets stand for themselves, as every decoder reads them) and
  re-encoded; one labelled base64 loses the stray octets, which RFC 2045 6.8
  tells decoders to ignore anyway.
* Raw 8-bit in header fields (top level or body part), in a multipart preamble
  or epilogue, in message/partial or message/external-body (RFC 2046 5.2.2,
  5.2.3: 7bit only), under an unknown transfer encoding, or in a multipart
  whose boundary cannot be found cannot be downgraded: :class:`CannotDowngrade`,
  and the caller bounces.
* Composite entities cannot be encoded (RFC 2045 6.4); when something inside
  one changed, its ``8bit``/``binary`` label becomes ``7bit``.  Only
  message/rfc822 is recursed into; message/global (which RFC 6532 3.5 lets be
  encoded), message/delivery-status and other message/* types are leaves.
* A leaf is re-encoded when its body is not 7bit data: 8-bit octets, but also
  NUL, bare CR or LF (which peers may reject since SMTP smuggling) and lines
  over 998 octets.  Leaves that are clean stay byte-identical, even under an
  ``8bit`` label, so a DKIM signature over them keeps meaning the same bytes.

Security exposure: every byte is untrusted input from a remote sender.
Recursion is bounded (:data:`DOWNGRADE_DEPTH_MAX` nested entities), so is the
number of body parts (:data:`DOWNGRADE_PARTS_MAX`) and the input size
(``max_size``).  Boundary search uses ``bytes.find`` and only re-examines the
rest of a candidate delimiter line, so pathological boundaries cost linear
time; each nesting level scans its bytes a bounded number of times.  Output
grows at most about 3.2 times (quoted-printable of all-8-bit text).  The result
is checked to be ASCII before it is returned, whatever path produced it.
Quoted-printable soft breaks are never allowed to forge a line that starts
like an enclosing boundary (such a part is base64-encoded instead), so the
peer sees the same MIME structure we parsed.  Header lines are copied as they
are (a header line over 998 octets stays one).  The work is CPU-bound, about
a second per 10 MB of 8-bit text: call it off the event loop
(``asyncio.to_thread``) for large messages.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from itertools import pairwise

from postwarden.limits import MESSAGE_SIZE_MAX

# Nested MIME entities followed before giving up (a real message rarely has 5).
DOWNGRADE_DEPTH_MAX = 20
# Body parts (over all multiparts) examined in one message.
DOWNGRADE_PARTS_MAX = 10_000
# Largest message converted: accepted messages are at most the SIZE limit plus
# our trace headers; the margin lets a modestly raised configured limit work.
DOWNGRADE_SIZE_MAX = 2 * MESSAGE_SIZE_MAX
# RFC 5322 2.1.1 / RFC 2045 2.7: at most 998 octets before CRLF.
LINE_OCTETS_MAX = 998
# RFC 2045 6.7 (5) and 6.8: encoded lines are at most 76 characters.
ENCODED_LINE_MAX = 76

# RFC 1428 3: the charset label for 8-bit text whose charset is unknown.
UNKNOWN_8BIT = "unknown-8bit"

STATUS_CONVERSION = "5.6.3"  # RFC 3463: conversion required but not supported
STATUS_UTF8_HEADER = "5.6.9"  # RFC 6531 3.7.5: UTF-8 header cannot be transferred

_HIGH_OCTETS = bytes(range(0x80, 0x100))
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_IDENTITY_CTE = frozenset({"", "7bit", "8bit", "binary"})


class CannotDowngrade(ValueError):
    """The message cannot be sent to a peer without 8BITMIME.

    ``status`` is the RFC 3463 enhanced status code for the bounce:
    ``5.6.3`` (conversion not possible) or ``5.6.9`` (8-bit header fields,
    RFC 6531 3.7.5).
    """

    def __init__(self, reason: str, status: str = STATUS_CONVERSION) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def is_8bit(data: bytes) -> bool:
    """True when ``data`` holds an octet above 127 (RFC 6152: needs 8BITMIME).

    NUL, bare CR/LF and over-long lines make data "binary" rather than 8bit
    (RFC 2045 2.8, 2.9); no SMTP extension short of BINARYMIME allows them, so
    they are not this function's question (downgrade_to_7bit still cleans them
    out of the leaves it re-encodes).
    """
    return not data.isascii()


def needs_smtputf8(sender: str, recipients: list[str], header_block: bytes) -> bool:
    """True when the transaction needs SMTPUTF8 (RFC 6531 3.1, RFC 6532 3).

    Non-ASCII in an envelope address, or raw octets above 127 anywhere in the
    top-level header fields.  ``header_block`` may be the whole message: only
    the bytes before the first empty line are looked at, since 8-bit in the
    body needs 8BITMIME only.  Octets that are not valid UTF-8 are counted too:
    raw 8-bit header octets may travel only under SMTPUTF8, whatever they are.
    """
    if not sender.isascii() or not all(r.isascii() for r in recipients):
        return True
    return not header_block[: _header_block_end(header_block)].isascii()


def downgrade_to_7bit(message: bytes, *, max_size: int = DOWNGRADE_SIZE_MAX) -> bytes:
    """Return ``message`` (CRLF network form) as 7bit data (RFC 6152 3, RFC 1652 3).

    A message that is already valid 7bit data is returned as is (the same
    object).  Otherwise only leaves whose bodies are not 7bit (octets above
    127, NUL, bare CR or LF, lines over 998 octets) are re-encoded; all other
    bytes are copied unchanged.  Raises :class:`CannotDowngrade` when the
    message cannot be made 7-bit safely.
    """
    if _is_7bit_clean(message):
        return message
    if len(message) > max_size:
        raise CannotDowngrade(f"message of {len(message)} octets is too large to convert")
    pieces = _Converter(message).entity(0, len(message), 0, True, "text/plain")
    result = message if pieces is None else b"".join(pieces)
    if not result.isascii():
        # Every path above should have raised already; never send 8-bit.
        raise CannotDowngrade("8-bit octets outside any convertible body part")
    return result


# --- octet classes -----------------------------------------------------------


def _has_bare_line_ends(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def _is_7bit_clean(data: bytes) -> bool:
    """RFC 2045 2.7: ASCII without NUL, CR/LF only as CRLF, lines <= 998."""
    if not data.isascii() or b"\0" in data or _has_bare_line_ends(data):
        return False
    if len(data) <= LINE_OCTETS_MAX:
        return True
    return max(map(len, data.split(b"\r\n"))) <= LINE_OCTETS_MAX


def _header_block_end(data: bytes) -> int:
    if data.startswith((b"\r\n", b"\n")):
        return 0
    ends = [e for e in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if e >= 0]
    return min(ends) if ends else len(data)


# --- encoders ----------------------------------------------------------------


def _encode_quoted_printable(payload: bytes) -> bytes:
    """RFC 2045 6.7 for text: CRLF stays a hard break, bare CR/LF are =0D/=0A.

    binascii escapes the octets (in binary mode CR and LF too, so "=0D=0A" in
    its output is exactly a CRLF of the payload); its own wrapping is dropped
    and redone here because it overruns 76 characters in corner cases (76
    literals before a bare LF; in text mode, white space escaped at a line end).
    """
    flat = binascii.b2a_qp(payload, quotetabs=False, istext=False, header=False)
    flat = flat.replace(b"=\r\n", b"").replace(b"=\n", b"")  # a literal "=" is always =3D
    # RFC 2045 6.7 (3): no white space just before a hard break (binascii
    # escapes it only at the very end).
    flat = flat.replace(b" =0D=0A", b"=20=0D=0A").replace(b"\t=0D=0A", b"=09=0D=0A")
    lines = flat.split(b"=0D=0A")
    if max(map(len, lines)) > ENCODED_LINE_MAX:
        lines = [
            _wrap_quoted_printable(line) if len(line) > ENCODED_LINE_MAX else line for line in lines
        ]
    return b"\r\n".join(lines)


def _wrap_quoted_printable(line: bytes) -> bytes:
    """One encoded line as physical lines of at most 76 characters (RFC 2045 6.7 (5))."""
    out: list[bytes] = []
    pos = 0
    while len(line) - pos > ENCODED_LINE_MAX:
        cut = pos + ENCODED_LINE_MAX - 1  # room for the soft break's "="
        if line[cut - 1] == 0x3D:  # never split an "=XX" escape
            cut -= 1
        elif line[cut - 2] == 0x3D:
            cut -= 2
        out.append(line[pos:cut] + b"=")
        pos = cut
    out.append(line[pos:])
    return b"\r\n".join(out)


def _end_with_soft_break(encoded: bytes) -> bytes:
    """End quoted-printable text with CRLF without adding to what it decodes to.

    A message ends with CRLF (RFC 5321 4.1.1.4); a soft break "=" CRLF decodes
    to nothing, but may not push its line past 76 characters: then the last
    atom (one octet or one "=XX") moves to a line of its own.
    """
    last = len(encoded) - encoded.rfind(b"\n") - 1
    if last < ENCODED_LINE_MAX:
        return encoded + b"=\r\n"
    atom = 3 if encoded[-3:-2] == b"=" else 1  # a literal "=" is always escaped
    return encoded[:-atom] + b"=\r\n" + encoded[-atom:] + b"=\r\n"


def _encode_base64(payload: bytes) -> bytes:
    """RFC 2045 6.8: 76-character lines, CRLF between them."""
    out = base64.b64encode(payload)
    return b"\r\n".join(out[i : i + ENCODED_LINE_MAX] for i in range(0, len(out), ENCODED_LINE_MAX))


# --- header fields -----------------------------------------------------------


@dataclass(slots=True)
class _Field:
    name: bytes  # lower case
    start: int
    colon: int
    end: int  # after the CRLF of its last line (or the region end)


@dataclass(slots=True)
class _Headers:
    fields: list[_Field]
    end: int  # where the header lines end
    body: int  # where the body starts
    separated: bool  # an empty line sits between them

    def first(self, name: bytes) -> _Field | None:
        return next((f for f in self.fields if f.name == name), None)


def _parse_headers(data: bytes, start: int, end: int) -> _Headers:
    """Header lines of the entity in ``data[start:end]`` (RFC 5322 2.2).

    Like ``email``'s parser, a line that is neither a field nor a continuation
    ends the header block and starts the body.
    """
    fields: list[_Field] = []
    pos = start
    while pos < end:
        eol = data.find(b"\r\n", pos, end)
        content_end, line_end = (end, end) if eol < 0 else (eol, eol + 2)
        if content_end == pos and eol >= 0:
            return _Headers(fields, pos, line_end, True)
        if data[pos] in b" \t":
            if fields:
                fields[-1].end = line_end
        else:
            m = _FIELD_NAME.match(data, pos, content_end)
            if m is None:
                return _Headers(fields, pos, pos, False)
            fields.append(_Field(m.group(1).lower(), pos, m.end() - 1, line_end))
        pos = line_end
    return _Headers(fields, end, end, False)


def _field_value(data: bytes, field: _Field) -> str:
    raw = data[field.colon + 1 : field.end].replace(b"\r\n", b"")
    return raw.decode("ascii", "replace").strip()


def _strip_comments(value: str) -> str:
    """Drop RFC 5322 3.2.2 comments (nested, outside quoted strings)."""
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\" and (quoted or depth):
            escaped = True
            if depth == 0:
                out.append(ch)
            continue
        if quoted:
            quoted = ch != '"'
            out.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif depth == 0:
            quoted = ch == '"'
            out.append(ch)
    return "".join(out)


def _split_params(value: str) -> list[str]:
    items: list[str] = []
    cur: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    return items


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _percent_decode(value: str) -> str:
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _parse_content_type(value: str, default: str) -> tuple[str, dict[str, str]]:
    """RFC 2045 5.1 type/subtype and parameters, with RFC 2231 continuations.

    An unparseable type reads as text/plain, as ``email`` reads it.
    """
    items = _split_params(_strip_comments(value))
    ctype = items[0].strip().lower().replace(" ", "").replace("\t", "")
    if not ctype:
        ctype = default
    elif ctype.count("/") != 1 or not all(_TOKEN.match(t) for t in ctype.split("/")):
        ctype = "text/plain"
    plain: dict[str, str] = {}
    pieces: dict[str, dict[int, tuple[str, bool]]] = {}
    for item in items[1:]:
        name, eq, raw = item.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            continue
        val = _unquote(raw)
        # RFC 2231 3 and 4: name*N (continuation), trailing * (percent-encoded).
        extended = name.endswith("*")
        base, star, index = name.rstrip("*").partition("*")
        if not star and not extended:
            plain.setdefault(name, val)
        elif not star:
            pieces.setdefault(base, {}).setdefault(0, (val, True))
        elif index.isdigit():
            pieces.setdefault(base, {}).setdefault(int(index), (val, extended))
    for base, parts in pieces.items():
        if base in plain:
            continue
        text: list[str] = []
        for i in range(len(parts)):
            if i not in parts:
                break
            val, extended = parts[i]
            if extended:
                if i == 0 and val.count("'") >= 2:
                    val = val.split("'", 2)[2]  # charset'language'value
                val = _percent_decode(val)
            text.append(val)
        plain[base] = "".join(text)
    return ctype, plain


def _set_field(data: bytes, field: _Field, value: bytes) -> bytes:
    """The field with a new value, keeping the sender's spelling of its name."""
    return data[field.start : field.colon] + b": " + value + b"\r\n"


def _add_charset(data: bytes, field: _Field) -> bytes:
    """The Content-Type field with ``charset=unknown-8bit`` appended."""
    raw = data[field.start : field.end]
    raw = raw.removesuffix(b"\r\n").rstrip(b" \t;")
    last_line = raw.rsplit(b"\r\n", 1)[-1]
    param = b"charset=" + UNKNOWN_8BIT.encode()
    sep = b"; " if len(last_line) + 2 + len(param) <= 78 else b";\r\n "
    return raw + sep + param + b"\r\n"


# --- the converter -----------------------------------------------------------


@dataclass(slots=True)
class _Delimiter:
    before: int  # start of the CRLF that belongs to the delimiter (RFC 2046 5.1.1)
    after: int  # first octet after the delimiter line
    close: bool


@dataclass(slots=True)
class _Entity:
    """One MIME entity (RFC 2045 2.4) at ``data[start:end]``, headers parsed."""

    start: int
    end: int
    headers: _Headers
    ctype: str
    params: dict[str, str]
    ct_field: _Field | None
    cte_field: _Field | None
    cte: str
    is_message: bool  # a whole message (top level or message/rfc822 body)
    fences: tuple[bytes, ...]  # "--boundary" of every enclosing multipart


def _crosses_fence(encoded: bytes, fences: tuple[bytes, ...]) -> bool:
    """Would a line of ``encoded`` start like an enclosing delimiter?

    Quoted-printable soft breaks split lines anywhere, so "...--b" can become a
    line "--b" that a parser takes for a delimiter (RFC 2046 5.1.1 forbids
    delimiters inside parts).  Prefix match: some parsers are that lax.
    """
    return any(encoded.startswith(f) or b"\r\n" + f in encoded for f in fences)


class _Converter:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.parts = 0

    def entity(
        self,
        start: int,
        end: int,
        depth: int,
        is_message: bool,
        default_type: str,
        fences: tuple[bytes, ...] = (),
    ) -> list[bytes] | None:
        """New bytes for ``data[start:end]``, or None when nothing changes."""
        data = self.data
        if _is_7bit_clean(data[start:end]):
            return None
        if depth > DOWNGRADE_DEPTH_MAX:
            raise CannotDowngrade(f"MIME nesting deeper than {DOWNGRADE_DEPTH_MAX} levels")
        h = _parse_headers(data, start, end)
        if not data[start : h.end].isascii():
            raise CannotDowngrade("8-bit octets in header fields", STATUS_UTF8_HEADER)
        ct_field = h.first(b"content-type")
        ct_value = _field_value(data, ct_field) if ct_field else ""
        ctype, params = _parse_content_type(ct_value, default_type)
        cte_field = h.first(b"content-transfer-encoding")
        cte = _strip_comments(_field_value(data, cte_field)).strip().lower() if cte_field else ""
        e = _Entity(start, end, h, ctype, params, ct_field, cte_field, cte, is_message, fences)

        if ctype.startswith("multipart/"):
            body = self.multipart(e, depth)
        elif ctype == "message/rfc822":
            body = self.entity(h.body, end, depth + 1, True, "text/plain", fences)
        elif ctype in ("message/partial", "message/external-body"):
            if data[h.body : end].isascii():
                return None
            raise CannotDowngrade(f"8-bit octets in {ctype} (7bit only, RFC 2046 5.2)")
        else:
            return self.leaf(e)
        if body is None:
            return None
        replace: dict[int, bytes] = {}
        if cte_field is not None and cte in ("8bit", "binary"):
            replace[cte_field.start] = _set_field(data, cte_field, b"7bit")
        add = [b"MIME-Version: 1.0\r\n"] if is_message and not h.first(b"mime-version") else []
        return [*self.header_block(e, replace, add), *body]

    def leaf(self, e: _Entity) -> list[bytes] | None:
        data, h = self.data, e.headers
        body = data[h.body : e.end]
        if e.cte in _IDENTITY_CTE:
            if _is_7bit_clean(body):
                return None
            payload = body
        elif e.cte == "quoted-printable":
            if body.isascii():
                return None
            payload = binascii.a2b_qp(body)
        elif e.cte == "base64":
            if body.isascii():
                return None
            # RFC 2045 6.8: decoders ignore octets outside the alphabet.
            return [data[e.start : h.body], body.translate(None, _HIGH_OCTETS)]
        elif body.isascii():
            return None
        else:
            raise CannotDowngrade(f"8-bit octets under Content-Transfer-Encoding {e.cte[:40]!r}")

        at_end = e.end == len(data)
        is_text = e.ctype.startswith("text/")
        encoded = _encode_quoted_printable(payload) if is_text else b""
        if is_text and not _crosses_fence(encoded, e.fences):
            new_cte = b"quoted-printable"
            if at_end and encoded and not encoded.endswith(b"\r\n"):
                encoded = _end_with_soft_break(encoded)
        else:
            # base64 has no "-": it never makes a delimiter (RFC 2046 5.1.1).
            new_cte, encoded = b"base64", _encode_base64(payload)
            if at_end and encoded:
                encoded += b"\r\n"

        replace: dict[int, bytes] = {}
        add: list[bytes] = []
        if e.is_message and not h.first(b"mime-version"):
            add.append(b"MIME-Version: 1.0\r\n")
        if is_text and "charset" not in e.params and not payload.isascii():
            if e.ct_field is None:
                add.append(b"Content-Type: text/plain; charset=" + UNKNOWN_8BIT.encode() + b"\r\n")
            else:
                replace[e.ct_field.start] = _add_charset(data, e.ct_field)
        if e.cte_field is None:
            add.append(b"Content-Transfer-Encoding: " + new_cte + b"\r\n")
        else:
            replace[e.cte_field.start] = _set_field(data, e.cte_field, new_cte)
            for other in h.fields:
                if other.name == b"content-transfer-encoding" and other is not e.cte_field:
                    replace[other.start] = b""  # a second label would contradict ours
        return [*self.header_block(e, replace, add), encoded]

    def header_block(self, e: _Entity, replace: dict[int, bytes], add: list[bytes]) -> list[bytes]:
        """The entity's header lines with edits, then the empty line."""
        data, h = self.data, e.headers
        out: list[bytes] = []
        pos = e.start
        for field in h.fields:
            if field.start in replace:
                out += (data[pos : field.start], replace[field.start])
                pos = field.end
        out.append(data[pos : h.end])
        if add:
            if h.end > e.start and not data.endswith(b"\r\n", e.start, h.end):
                out.append(b"\r\n")
            out += add
        out.append(data[h.end : h.body] if h.separated else b"\r\n")
        return out

    def multipart(self, e: _Entity, depth: int) -> list[bytes] | None:
        """New bytes for a multipart body (RFC 2046 5.1.1), or None."""
        data = self.data
        start, end = e.headers.body, e.end
        if _is_7bit_clean(data[start:end]):
            return None
        boundary = e.params.get("boundary", "").rstrip()  # RFC 2046 5.1.1: no trailing space
        if not boundary or not boundary.isascii():
            raise CannotDowngrade("8-bit multipart without a usable boundary parameter")
        fence = b"--" + boundary.encode("ascii")
        delimiters = self.delimiters(start, end, fence)
        if not delimiters:
            raise CannotDowngrade("8-bit multipart whose boundary never occurs")
        if not data[start : delimiters[0].before].isascii():
            raise CannotDowngrade("8-bit octets in a multipart preamble")
        last = delimiters[-1]
        if last.close and not data[last.after : end].isascii():
            raise CannotDowngrade("8-bit octets in a multipart epilogue")
        bounds = [(d.after, max(d.after, n.before)) for d, n in pairwise(delimiters)]
        if not last.close:
            bounds.append((last.after, end))  # no close delimiter: the part runs to the end
        child_type = "message/rfc822" if e.ctype == "multipart/digest" else "text/plain"
        fences = (*e.fences, fence)
        out: list[bytes] = []
        pos = start
        for part_start, part_end in bounds:
            new = self.entity(part_start, part_end, depth + 1, False, child_type, fences)
            if new is not None:
                out.append(data[pos:part_start])
                out.extend(new)
                pos = part_end
        if not out:
            return None
        out.append(data[pos:end])
        return out

    def delimiters(self, start: int, end: int, dash_boundary: bytes) -> list[_Delimiter]:
        """Delimiter lines up to and including the close delimiter.

        Linear: each ``find`` resumes past the previous candidate, and checking
        a candidate reads only the rest of its line's padding.
        """
        data = self.data
        found: list[_Delimiter] = []
        pos = start
        if data.startswith(dash_boundary, start, end):
            d = self._delimiter_at(start, start, end, dash_boundary)
            if d is not None:
                found.append(d)
                pos = d.after - 2 if d.after < end else end
        needle = b"\r\n" + dash_boundary
        while not (found and found[-1].close):
            i = data.find(needle, pos, end)
            if i < 0:
                break
            d = self._delimiter_at(i, i + 2, end, dash_boundary)
            if d is None:
                pos = i + 1
                continue
            found.append(d)
            if len(found) + self.parts > DOWNGRADE_PARTS_MAX:
                raise CannotDowngrade(f"more than {DOWNGRADE_PARTS_MAX} body parts")
            # Like email's line-based parser, the CRLF ending one delimiter line
            # may begin the next ("--b CRLF --b": an empty part between them).
            pos = d.after - 2 if d.after < end else end
        self.parts += len(found)
        return found

    def _delimiter_at(self, before: int, at: int, end: int, dash: bytes) -> _Delimiter | None:
        data = self.data
        p = at + len(dash)
        close = data.startswith(b"--", p, end)
        if close:
            p += 2
        while p < end and data[p] in b" \t":  # transport padding
            p += 1
        if p == end:
            return _Delimiter(before, end, close)
        if data.startswith(b"\r\n", p, end):
            return _Delimiter(before, p + 2, close)
        return None
