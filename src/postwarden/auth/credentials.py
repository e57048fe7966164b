"""SMTP AUTH verification: the account password or an application password.

An account may have up to :data:`~postwarden.storage.sqlite_directory.MAX_APP_PASSWORDS`
application passwords (``postwarden user app-password add``): generated
secrets, one per device or program, each revocable on its own.  They are
valid only for SMTP AUTH under the account's own username, and they are
stored as argon2id hashes like the account password.

:class:`CredentialVerifier` is the ``verify_password`` callable of the
session (``async (hash, password) -> bool``): it tries the account password
first, then every application password of the account that owns that hash.
Cost: a failed attempt costs one argon2id verification per credential
(1 + the number of application passwords, at most 11, ~50 ms each), all in
one worker thread, so the event loop never waits; the time of a failure
depends only on how many application passwords the account has, never on
how close the guess was.  An unknown user verifies the session's dummy hash
(no application passwords), as before.

Which kind of credential succeeded is recorded in a context variable of the
session's task, so that the ``Stage.AUTH`` expiry check that runs right
after (in the same task) can exempt application passwords from
``[passwords] max_age_days``.

Security exposure: receives passwords from unauthenticated clients; never
logs them; fails closed on any malformed stored hash
(:func:`postwarden.auth.passwords.verify_password`).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable

from postwarden.auth.passwords import verify_password
from postwarden.observe.log import get_logger

log = get_logger("auth")

# The id of the application password that authenticated the current AUTH
# attempt, or None (account password, or no success).
_app_password_used: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "postwarden_app_password_used", default=None)


def used_app_password() -> bool:
    """True if the last successful verification in this task used an
    application password."""
    return _app_password_used.get() is not None


def verify_candidates(account_hash: str, app_hashes: list[tuple[int, str]],
                      password: str) -> tuple[bool, int | None]:
    """``(ok, app_id)``: the account password, then each application password."""
    if verify_password(account_hash, password):
        return True, None
    for app_id, app_hash in app_hashes:
        if verify_password(app_hash, password):
            return True, app_id
    return False, None


class CredentialVerifier:
    """``await verifier(account_hash, password)`` -> bool (see module docstring).

    ``app_hashes(account_hash)`` returns the ``(id, hash)`` pairs of the
    application passwords of the account owning ``account_hash``.
    """

    def __init__(self, app_hashes: Callable[[str], list[tuple[int, str]]]) -> None:
        self.app_hashes = app_hashes

    async def __call__(self, account_hash: str | None, password: str) -> bool:
        _app_password_used.set(None)
        if account_hash is None:
            return await asyncio.to_thread(verify_password, None, password)
        candidates = self.app_hashes(account_hash)
        ok, app_id = await asyncio.to_thread(verify_candidates, account_hash, candidates,
                                             password)
        if ok and app_id is not None:
            _app_password_used.set(app_id)
            log.info("app_password_used", app_password_id=app_id)
        return ok
