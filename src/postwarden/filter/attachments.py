"""Dangerous attachments: blocked by file name and by detected type.

Owns the ``attachments`` filter.  A part is blocked when

- its file name ends in a blocked extension (``invoice.pdf.exe`` is an
  ``.exe``; trailing dots and spaces are ignored, as Windows ignores them,
  and a right-to-left override character in a name is always blocked: it
  exists to hide the real extension);
- its content is of a blocked kind whatever its name: ``executable`` (PE
  ``MZ``, ELF, Mach-O), ``script`` (``#!`` first line), ``office-macro``
  (an OLE2 document with a VBA project, an Office Open XML package with
  ``vbaProject.bin``);
- it is a zip archive holding such a file (archives inside archives are
  opened down to :data:`ZIP_DEPTH` levels, at most :data:`ZIP_MEMBERS`
  members each, reading only the first bytes of small members: a zip
  bomb is never inflated);
- it is an encrypted zip and ``encrypted`` says ``reject``/``quarantine``
  (the contents cannot be checked).

The MIME walk is skipped for single-part messages without a file name
(the common plain-text case), so the filter costs almost nothing there:
two header lookups.

Security exposure: reads untrusted archives in memory; every size and
count is bounded (see :mod:`postwarden.filter.mime` for the MIME bounds).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

from postwarden.filter.mime import Part
from postwarden.filter.verdict import (
    ACCEPT,
    ATTACHMENT_BLOCKED,
    Action,
    FilterMessage,
    FilterVerdict,
)

EXECUTABLE_EXTENSIONS = ("exe", "com", "scr", "pif", "dll", "cpl", "msi", "msp", "msc",
                         "sys", "drv", "ocx", "appx", "msix", "application", "gadget")
SCRIPT_EXTENSIONS = ("bat", "cmd", "vbs", "vbe", "js", "jse", "wsf", "wsh", "wsc", "ps1",
                     "psm1", "hta", "lnk", "reg", "scf", "inf", "jar", "sct", "url")
MACRO_EXTENSIONS = ("docm", "dotm", "xlsm", "xltm", "xlam", "pptm", "potm", "ppam", "ppsm",
                    "sldm")
DEFAULT_EXTENSIONS = EXECUTABLE_EXTENSIONS + SCRIPT_EXTENSIONS + MACRO_EXTENSIONS
KINDS = ("executable", "script", "office-macro")
ENCRYPTED_ACTIONS = ("allow", "quarantine", "reject")
ACTIONS = ("reject", "quarantine")

ZIP_DEPTH = 3
ZIP_MEMBERS = 500
ZIP_MEMBER_READ = 64 * 1024  # bytes of a member read for type detection
ZIP_MEMBER_MAX = 16 * 1024 * 1024  # members claiming more are not read
SNIFF = 64 * 1024
RTLO = "\u202e"


@dataclass(frozen=True, slots=True)
class AttachmentSettings:
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    kinds: tuple[str, ...] = KINDS
    encrypted: str = "quarantine"
    action: str = "reject"


def extension(name: str) -> str:
    """The extension Windows would act on: the last one, lower case, after
    trailing dots and spaces are dropped."""
    stripped = name.rstrip(". \t")
    base = stripped.rpartition("/")[2].rpartition("\\")[2]
    if "." not in base:
        return ""
    return base.rpartition(".")[2].lower()


def detect(content: bytes) -> str:
    """The blocked kind of ``content`` ("" when none): magic numbers."""
    if content[:2] == b"MZ":
        return "executable"
    if content[:4] == b"\x7fELF" or content[:4] in (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf",
                                                    b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe"):
        return "executable"
    if content[:2] == b"#!":
        return "script"
    # An OLE2 compound file (MS-CFB) with a VBA storage.
    if content[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" and (
            b"V\x00B\x00A\x00" in content or b"_VBA_PROJECT" in content):
        return "office-macro"
    return ""


class AttachmentsFilter:
    name = "attachments"

    def __init__(self, settings: AttachmentSettings) -> None:
        self.settings = settings
        self.extensions = frozenset(settings.extensions)
        self.kinds = frozenset(settings.kinds)

    def check(self, message: FilterMessage) -> FilterVerdict:
        # One part without a name (neither multipart nor a name= or
        # filename= parameter): only a non-text body is worth a look.
        ctype = message.field_value(b"content-type")
        if ctype is None or ctype[:10].lower() != b"multipart/":
            disp = message.field_value(b"content-disposition")
            named = ((ctype is not None and b"name" in ctype.lower())
                     or (disp is not None and b"name" in disp.lower()))
            if not named and (not self.kinds or ctype is None
                              or ctype[:5].lower() == b"text/"):
                return ACCEPT
        return self.check_parts(message)

    def check_parts(self, message: FilterMessage) -> FilterVerdict:
        """The verdict from every MIME part (the walk ``check`` skips for a
        single unnamed text part)."""
        structure = message.mime
        findings: list[str] = []
        encrypted: list[str] = []
        data = message.data
        for part in structure.parts:
            problem = self._check_part(part, data, encrypted)
            if problem:
                findings.append(problem)
        if findings:
            reason = "; ".join(findings[:10])
            if self.settings.action == "quarantine":
                return FilterVerdict(Action.QUARANTINE, reason, rules=("BLOCKED_ATTACHMENT",))
            return FilterVerdict(Action.REJECT, reason, ATTACHMENT_BLOCKED,
                                 rules=("BLOCKED_ATTACHMENT",))
        if encrypted and self.settings.encrypted != "allow":
            reason = "encrypted archive: " + ", ".join(encrypted[:10])
            if self.settings.encrypted == "reject":
                return FilterVerdict(Action.REJECT, reason, ATTACHMENT_BLOCKED,
                                     rules=("ENCRYPTED_ARCHIVE",))
            return FilterVerdict(Action.QUARANTINE, reason, rules=("ENCRYPTED_ARCHIVE",))
        return ACCEPT

    def _check_part(self, part: Part, data: bytes, encrypted: list[str]) -> str:
        name = part.filename
        shown = name or f"<{part.content_type}>"
        if name:
            if RTLO in name:
                return f"{shown!r}: right-to-left override in file name"
            ext = extension(name)
            if ext in self.extensions:
                inner = extension(name.rstrip(". \t")[: -len(ext) - 1])
                double = f" (double extension .{inner}.{ext})" if inner else ""
                return f"{shown!r}: blocked extension .{ext}{double}"
        if part.content_type.startswith("multipart/"):
            return ""
        head = part.decoded(data, SNIFF if not _maybe_zip(name, part) else ZIP_MEMBER_MAX * 2)
        kind = detect(head)
        if kind and kind in self.kinds:
            return f"{shown!r}: {kind} content"
        if head[:4] == b"PK\x03\x04":
            return self._check_zip(head, shown, encrypted, 1)
        return ""

    def _check_zip(self, content: bytes, shown: str, encrypted: list[str], depth: int) -> str:
        try:
            archive = zipfile.ZipFile(io.BytesIO(content))
            infos = archive.infolist()
        except Exception:  # not a readable zip: nothing to see inside
            return ""
        macro_package = False
        for info in infos[:ZIP_MEMBERS]:
            member = info.filename
            where = f"{shown} -> {member!r}"
            if RTLO in member:
                return f"{where}: right-to-left override in file name"
            if info.flag_bits & 0x1:
                encrypted.append(shown)
                continue
            ext = extension(member)
            if ext in self.extensions:
                return f"{where}: blocked extension .{ext}"
            if member.lower().endswith("vbaproject.bin"):
                macro_package = True
                continue
            if info.file_size > ZIP_MEMBER_MAX or info.is_dir():
                continue
            try:
                with archive.open(info) as f:
                    head = f.read(ZIP_MEMBER_READ if depth >= ZIP_DEPTH else ZIP_MEMBER_MAX)
            except Exception:
                continue  # a broken member
            kind = detect(head)
            if kind and kind in self.kinds:
                return f"{where}: {kind} content"
            if head[:4] == b"PK\x03\x04" and depth < ZIP_DEPTH:
                problem = self._check_zip(head, where, encrypted, depth + 1)
                if problem:
                    return problem
        if macro_package and "office-macro" in self.kinds:
            return f"{shown}: office-macro content (vbaProject.bin)"
        return ""


def _maybe_zip(name: str, part: Part) -> bool:
    """Whether the part may be an archive worth decoding whole."""
    ext = extension(name)
    return (ext in ("zip", "docx", "xlsx", "pptx", "docm", "xlsm", "pptm", "jar", "odt")
            or "zip" in part.content_type or part.content_type.startswith("application/"))
