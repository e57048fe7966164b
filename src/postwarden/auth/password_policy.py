"""Account hygiene: which passwords may be set, and when one has expired.

Rules applied when an administrator sets a password of their own choosing
(``postwarden user add/passwd --password-stdin``); generated passwords
(:func:`postwarden.auth.passwords.generate_password`, 20 random characters)
pass them by construction:

* at least ``[passwords] min_length`` characters (default 12);
* not one of the 30,000 most common passwords, compared without regard to
  case.  The list is the ``passwords`` frequency list bundled with the
  ``zxcvbn`` package (Dropbox's zxcvbn, MIT licence; the list is the top of
  Mark Burnett's / Xato's 10 million leaked passwords corpus).  It ships in
  the wheel: nothing is downloaded at run time.

Expiry: with ``[passwords] max_age_days`` > 0 an *account* password older
than that no longer authenticates: :func:`expiry_check` is registered for
``Stage.AUTH`` and answers 535 5.7.8 "password expired".  Application
passwords (see :class:`postwarden.auth.credentials.CredentialVerifier`) do
not expire; they are revoked one by one.

Security exposure: none at run time beyond the AUTH-stage check, which reads
only the timestamp of an account that has just given a correct password.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import lru_cache

from postwarden import reply as R
from postwarden.auth import passwords
from postwarden.config import PasswordsConfig
from postwarden.observe.log import get_logger

log = get_logger("passwords")

DAY = 86400.0

# RFC 4954 6 / RFC 3463: 5.7.8 "authentication credentials invalid".
PASSWORD_EXPIRED = R.Reply(535, "5.7.8", "Authentication refused: password expired; "
                                         "ask your administrator for a new one")


class PasswordRejected(ValueError):
    """A password that breaks a rule; the message names the rule."""


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The bundled list of common passwords, lower case."""
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(p.lower() for p in FREQUENCY_LISTS["passwords"])


def check_password(password: str, rules: PasswordsConfig) -> None:
    """Raise :class:`PasswordRejected` if ``password`` breaks a rule."""
    if len(password) < rules.min_length:
        raise PasswordRejected(
            f"password refused: shorter than {rules.min_length} characters "
            "([passwords] min_length)")
    if password.lower() in common_passwords():
        raise PasswordRejected(
            "password refused: it is on the list of common passwords; choose another "
            "(or omit --password-stdin to have one generated)")


def given_or_generated(given: str, rules: PasswordsConfig) -> tuple[str, bool]:
    """The password to set, and whether it was generated (so must be shown
    once): ``given`` when there is one, checked against the rules
    (:class:`PasswordRejected`), else a generated one, which always passes."""
    if given:
        check_password(given, rules)
        return given, False
    return passwords.generate_password(), True


def is_expired(changed_at: float | None, rules: PasswordsConfig,
               now: float | None = None) -> bool:
    """True if a password set at ``changed_at`` (Unix time) is too old."""
    if rules.max_age_days <= 0 or changed_at is None:
        return False
    now = time.time() if now is None else now
    return now - changed_at > rules.max_age_days * DAY


# The AUTH-stage check; typed loosely to avoid importing the policy package
# (which imports the session layer) from here.
AuthCheck = Callable[..., Awaitable[R.Verdict]]


def expiry_check(rules: PasswordsConfig,
                 changed_at: Callable[[str], float | None],
                 used_app_password: Callable[[], bool]) -> AuthCheck:
    """A ``Stage.AUTH`` check refusing accounts whose password has expired.

    ``changed_at(username)`` gives the account's ``password_changed`` time;
    ``used_app_password()`` tells whether this session's correct password
    was an application password (those do not expire).
    """

    async def password_age(ctx: object) -> R.Verdict:
        username: str = getattr(ctx, "username", "")
        if rules.max_age_days <= 0 or used_app_password():
            return R.NO_OPINION
        changed = changed_at(username)
        if not is_expired(changed, rules):
            return R.NO_OPINION
        assert changed is not None
        conn = getattr(ctx, "conn", None)
        log.warning("password_expired", user=username,
                    session=getattr(conn, "session_id", None),
                    client=getattr(conn, "peer_ip", None),
                    age_days=round((time.time() - changed) / DAY, 1),
                    max_age_days=rules.max_age_days)
        return R.reject(PASSWORD_EXPIRED, "password expired")

    return password_age
