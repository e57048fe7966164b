"""SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN.

Each mechanism is a small sans-I/O exchange: the session feeds it the client's
lines and gets back either a challenge to send (334), the credentials to
verify, or a failure reply.  Verification itself (argon2id) is not here.

Security exposure: decodes untrusted base64 carrying passwords.  Passwords
are never logged or put into replies; decoding errors are answered with a
generic 501.  The session offers these mechanisms only over TLS.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from postwarden import reply as R

MECHANISMS = ("PLAIN", "LOGIN")


@dataclass(frozen=True, slots=True)
class Challenge:
    text: str  # base64, sent as "334 <text>"

    def reply(self) -> R.Reply:
        return R.Reply(334, "", self.text)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = ""

    def __repr__(self) -> str:  # never show the password
        return f"Credentials(username={self.username!r})"


@dataclass(frozen=True, slots=True)
class Failure:
    reply: R.Reply
    reason: str


Step = Challenge | Credentials | Failure


def _b64decode(text: str) -> bytes | None:
    if text == "=":  # RFC 4954 4: "=" is an empty initial response
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Mechanism:
    name = ""

    def start(self, initial: str | None) -> Step:
        raise NotImplementedError

    def step(self, line: str) -> Step:
        raise NotImplementedError


class Plain(Mechanism):
    """RFC 4616: one message ``authzid NUL authcid NUL passwd``."""

    name = "PLAIN"

    def start(self, initial: str | None) -> Step:
        if initial is None:
            return Challenge("")
        return self.step(initial)

    def step(self, line: str) -> Step:
        if line == "*":
            return Failure(R.AUTH_CANCELLED, "client cancelled")
        raw = _b64decode(line)
        if raw is None:
            return Failure(R.AUTH_BAD_ENCODING, "bad base64")
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            return Failure(R.AUTH_BAD_ENCODING, "bad PLAIN message")
        texts = [_utf8(p) for p in parts]
        authzid, authcid, password = texts
        if authzid is None or authcid is None or password is None or not authcid:
            return Failure(R.AUTH_BAD_ENCODING, "bad PLAIN message")
        # No proxy authorisation: an authzid must name the same user.
        if authzid and authzid.lower() != authcid.lower():
            return Failure(R.AUTH_FAILED, "authzid differs from authcid")
        return Credentials(authcid, password)


class Login(Mechanism):
    """The LOGIN mechanism (draft-murchison-sasl-login): user, then password."""

    name = "LOGIN"
    USERNAME = base64.b64encode(b"Username:").decode()
    PASSWORD = base64.b64encode(b"Password:").decode()

    def __init__(self) -> None:
        self.username: str | None = None

    def start(self, initial: str | None) -> Step:
        if initial is None:
            return Challenge(self.USERNAME)
        return self.step(initial)

    def step(self, line: str) -> Step:
        if line == "*":
            return Failure(R.AUTH_CANCELLED, "client cancelled")
        raw = _b64decode(line)
        text = None if raw is None else _utf8(raw)
        if text is None:
            return Failure(R.AUTH_BAD_ENCODING, "bad base64")
        if self.username is None:
            if not text:
                return Failure(R.AUTH_BAD_ENCODING, "empty username")
            self.username = text
            return Challenge(self.PASSWORD)
        return Credentials(self.username, text)


def mechanism(name: str) -> Mechanism | None:
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    return None
