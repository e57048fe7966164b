"""The MIME structure of a message, walked on raw bytes within fixed bounds.

Owns the one MIME walker the content filters share (attachments, outbound
review).  It does not use the ``email`` package: it splits entities at
their boundary lines (RFC 2046 5.1.1), reads each part's header with
:mod:`postwarden.message.rawheaders`, and decodes base64 and
quoted-printable bodies (RFC 2045 6.7, 6.8) only when a caller asks.

Bounds (hostile input cannot make it hang or grow without limit):

- nesting: multiparts and message/rfc822 are entered at most
  :data:`MAX_DEPTH` levels deep; deeper entities are kept as opaque leaves;
- parts: at most :data:`MAX_PARTS` parts are recorded; the rest is not
  walked (``truncated`` is set, and filters may treat that as suspicious);
- part headers: at most :data:`PART_HEADER_MAX` bytes of a part are read as
  its header;
- decoding: at most ``limit`` bytes of a part are decoded.

The walk is iterative (no recursion) and each multipart's range is searched
once for its boundary, so the work is linear in the size of the message
times the nesting bound.  Malformed structure (no boundary parameter, a
missing closing delimiter, duplicated boundaries, broken base64) never
raises: it is counted in ``defects`` and the walk goes on with what it can
see.

Security exposure: the input is an untrusted message.
"""

from __future__ import annotations

import binascii
import re
import urllib.parse
from dataclasses import dataclass, field

from postwarden.message import rawheaders

MAX_DEPTH = 20
MAX_PARTS = 1000
PART_HEADER_MAX = 64 * 1024
# Bytes of one part decoded at most (for type detection and archive reading).
DECODE_MAX = 32 * 1024 * 1024
BOUNDARY_MAX = 200  # RFC 2046 5.1.1: 70 characters; allow sloppy senders

_PARAM = re.compile(
    rb';\s*([!#-\'*+.0-9A-Z^-~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.IGNORECASE)
_ENCODED_WORD = re.compile(r"=\?[^?]+\?[bBqQ]\?[^?]*\?=")


@dataclass(slots=True)
class Part:
    """One leaf entity: its content type, file name, transfer encoding and
    where its body is in the message."""

    content_type: str  # "type/subtype", lower case ("text/plain" by default)
    filename: str
    encoding: str  # Content-Transfer-Encoding, lower case ("" if none)
    start: int  # body offsets in the message
    end: int
    depth: int
    attachment: bool = False  # Content-Disposition: attachment

    def raw(self, data: bytes) -> bytes:
        return data[self.start:self.end]

    def decoded(self, data: bytes, limit: int = DECODE_MAX) -> bytes:
        """The body with its transfer encoding undone (at most ``limit``
        bytes); broken encodings decode as far as they can."""
        if self.encoding == "base64":
            return decode_base64(data[self.start:min(self.end, self.start + limit * 4 // 3 + 4)]
                                 )[:limit]
        raw = data[self.start:min(self.end, self.start + limit * 3)]
        if self.encoding == "quoted-printable":
            return binascii.a2b_qp(raw)[:limit]
        return raw[:limit]


@dataclass(slots=True)
class Structure:
    parts: list[Part] = field(default_factory=list)
    truncated: bool = False  # MAX_PARTS reached: the rest was not walked
    too_deep: bool = False  # MAX_DEPTH reached somewhere
    defects: int = 0


def decode_base64(raw: bytes) -> bytes:
    """Lenient base64: characters outside the alphabet are skipped; a
    truncated last quantum is dropped."""
    try:
        return binascii.a2b_base64(raw, strict_mode=False)
    except binascii.Error:
        clean = re.sub(rb"[^A-Za-z0-9+/]", b"", raw)
        clean = clean[: len(clean) - len(clean) % 4]
        try:
            return binascii.a2b_base64(clean)
        except binascii.Error:
            return b""


def parse_params(value: bytes) -> tuple[str, dict[str, str]]:
    """A Content-Type or Content-Disposition value: the lower-cased first
    token and its parameters (RFC 2045 5.1; RFC 2231 continuations and
    charset'lang'value encoding)."""
    semi = value.find(b";")
    head = (value if semi < 0 else value[:semi]).strip().lower()
    params: dict[str, str] = {}
    pieces: dict[str, dict[int, tuple[str, bool]]] = {}
    if semi >= 0:
        for m in _PARAM.finditer(value, semi):
            name = m.group(1).decode("ascii", "replace").lower()
            raw = m.group(2)
            if raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
                raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
            text = raw.decode("utf-8", "replace")
            # RFC 2231 3, 4: name*0*, name*1, ... and name*=charset'lang'value
            base, star, rest = name.partition("*")
            if star:
                encoded = rest.endswith("*") or rest == ""
                index = rest.rstrip("*")
                pieces.setdefault(base, {})[int(index) if index.isdigit() else 0] = (
                    text, encoded)
            else:
                params.setdefault(name, text)
    for base, parts in pieces.items():
        out = []
        for i in sorted(parts):
            text, encoded = parts[i]
            if encoded:
                if i == min(parts) and text.count("'") >= 2:
                    charset, _, rest = text.partition("'")
                    text = urllib.parse.unquote(rest.partition("'")[2],
                                                encoding=_charset(charset), errors="replace")
                else:
                    text = urllib.parse.unquote(text, errors="replace")
            out.append(text)
        params[base] = "".join(out)
    return head.decode("ascii", "replace"), params


def _charset(name: str) -> str:
    import codecs

    try:
        return codecs.lookup(name or "utf-8").name
    except LookupError:
        return "utf-8"


def _decode_words(text: str) -> str:
    """RFC 2047 encoded words in a file name (=?utf-8?b?...?=)."""
    if "=?" not in text or not _ENCODED_WORD.search(text):
        return text
    from email.header import decode_header

    try:
        out = []
        for chunk, charset in decode_header(text):
            if isinstance(chunk, bytes):
                out.append(chunk.decode(_charset(charset or "utf-8"), "replace"))
            else:
                out.append(chunk)
        return "".join(out)
    except Exception:  # a malformed encoded word: keep the text as it is
        return text


def walk(data: bytes, header: rawheaders.HeaderBlock | None = None) -> Structure:
    """The leaf parts of ``data`` (a whole message), in order."""
    out = Structure()
    # Entities still to visit: (header start, entity end, depth, default type).
    stack: list[tuple[int, int, int, str]] = [(0, len(data), 0, "text/plain")]
    first = True
    while stack:
        start, end, depth, default = stack.pop()
        if first and header is not None:
            head, first = header, False
            body_start = header.body_start
        else:
            first = False
            head = rawheaders.parse_part_header(data[start:min(end, start + PART_HEADER_MAX)])
            body_start = start + head.body_start
            if head.body_start >= PART_HEADER_MAX:
                out.defects += 1
        hdata = data[start:start + head.end]
        ctype_raw = cte = disp = b""
        for f in head.fields:
            ln = f.lname
            if ln == b"content-type" and not ctype_raw:
                ctype_raw = f.value(hdata)
            elif ln == b"content-transfer-encoding" and not cte:
                cte = f.value(hdata)
            elif ln == b"content-disposition" and not disp:
                disp = f.value(hdata)
        ctype, params = parse_params(ctype_raw) if ctype_raw else (default, {})
        if "/" not in ctype:
            if ctype_raw:
                out.defects += 1
            ctype = default
        if ctype.startswith("multipart/") or ctype == "message/rfc822":
            if depth >= MAX_DEPTH:
                out.too_deep = True
            elif ctype == "message/rfc822":
                stack.append((body_start, end, depth + 1, "text/plain"))
                continue
            else:
                children = _split(data, body_start, end, params.get("boundary", ""))
                if children is None:
                    out.defects += 1  # no usable boundary: one opaque part
                else:
                    child_default = ("message/rfc822" if ctype == "multipart/digest"
                                     else "text/plain")  # RFC 2046 5.1.5
                    for c_start, c_end in reversed(children):
                        stack.append((c_start, c_end, depth + 1, child_default))
                    if len(out.parts) + len(stack) > MAX_PARTS:
                        out.truncated = True
                        return out
                    continue
        dtype, dparams = parse_params(disp) if disp else ("", {})
        name = dparams.get("filename") or params.get("name") or ""
        out.parts.append(Part(ctype, _decode_words(name).strip(),
                              cte.strip().lower().decode("ascii", "replace"),
                              min(body_start, end), end, depth, dtype == "attachment"))
        if len(out.parts) >= MAX_PARTS:
            out.truncated = bool(stack)
            return out
    return out


def _split(data: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]] | None:
    """The body parts of a multipart between ``start`` and ``end``: the
    text between delimiter lines ``--boundary`` (RFC 2046 5.1.1).  None when
    there is no usable boundary."""
    if not boundary or len(boundary) > BOUNDARY_MAX:
        return None
    delim = b"--" + boundary.encode("utf-8", "replace")
    parts: list[tuple[int, int]] = []
    pos = start
    part_start = -1
    while True:
        i = data.find(delim, pos, end)
        if i < 0:
            break
        pos = i + len(delim)
        if i != start and data[i - 1:i] != b"\n":
            continue  # not at the start of a line
        line_end = data.find(b"\n", pos, end)
        after = data[pos:pos + 2]
        if part_start >= 0:
            # The CRLF before the delimiter belongs to the delimiter.
            stop = i - 2 if data[i - 2:i] == b"\r\n" else i - 1
            parts.append((part_start, max(part_start, stop)))
            if len(parts) > MAX_PARTS:
                return parts
        if after == b"--":
            return parts  # the close delimiter
        part_start = end if line_end < 0 else line_end + 1
    if part_start >= 0 and part_start < end:
        parts.append((part_start, end))  # no close delimiter: to the end
    return parts if parts else None
