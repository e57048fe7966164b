"""argon2id hashing, verification that never raises, generated passwords."""

from __future__ import annotations

import asyncio

import pytest

from postwarden.auth import passwords


@pytest.fixture(scope="module")
def stored() -> str:
    return passwords.hash_password("correct horse")


def test_hash_is_argon2id_with_our_parameters(stored: str) -> None:
    assert stored.startswith("$argon2id$v=19$")
    assert f"m={passwords.MEMORY_COST_KIB},t={passwords.TIME_COST}," in stored
    assert passwords.is_password_hash(stored)
    assert not passwords.needs_rehash(stored)


def test_hashes_are_salted(stored: str) -> None:
    assert passwords.hash_password("correct horse") != stored


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        ("correct horse", True),
        ("correct horse ", False),
        ("Correct horse", False),
        ("", False),
        ("\udcff", False),  # lone surrogate (undecodable SASL input): no exception
    ],
)
def test_verify(stored: str, candidate: str, expected: bool) -> None:
    assert passwords.verify_password(stored, candidate) is expected


@pytest.mark.parametrize(
    "bad_hash",
    [
        "",
        "plaintext",
        "$argon2id$",
        "$argon2id$v=19$m=65536,t=3,p=4$bm90YmFzZTY0$",
        "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$aGFzaA",  # parameters out of range
        "$2b$12$abcdefghijklmnopqrstuuJ3.bMcGCxw7lS9NbEIDwfZHMkbgNXe6",  # bcrypt
    ],
)
def test_malformed_hash_is_false_not_exception(bad_hash: str) -> None:
    assert passwords.verify_password(bad_hash, "anything") is False
    assert passwords.needs_rehash(bad_hash) is True


def test_unknown_user_verifies_against_dummy() -> None:
    assert passwords.verify_password(None, "anything") is False


def test_old_parameters_need_rehash() -> None:
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("pw")
    assert passwords.verify_password(weak, "pw")
    assert passwords.needs_rehash(weak)


def test_verify_async_runs_off_the_event_loop(stored: str) -> None:
    async def scenario() -> tuple[bool, bool, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        task = asyncio.create_task(ticker())
        ok = await passwords.verify_password_async(stored, "correct horse")
        bad = await passwords.verify_password_async(stored, "wrong")
        task.cancel()
        return ok, bad, ticks

    ok, bad, ticks = asyncio.run(scenario())
    assert ok and not bad
    assert ticks > 0  # the loop kept running while argon2 worked


def test_generate_password() -> None:
    pws = {passwords.generate_password() for _ in range(50)}
    assert len(pws) == 50
    for pw in pws:
        assert len(pw) == passwords.GENERATED_LENGTH
        assert set(pw) <= set(passwords.ALPHABET)
    assert not set("0O1lI") & set(passwords.ALPHABET)
