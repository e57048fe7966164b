"""Queue ids: the time first, 80 random bits after it; ids of both formats
are found in feedback reports."""

from __future__ import annotations

import base64
import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden import ids
from postwarden.message import feedback

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
NEW_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{25}")


def decode_ms(queue_id: str) -> int:
    value = 0
    for c in queue_id[:9]:
        value = value * 32 + CROCKFORD.index(c)
    return value


def test_a_queue_id_is_the_time_in_milliseconds_then_random_characters() -> None:
    before = time.time_ns() // 1_000_000
    queue_id = ids.new_queue_id()
    after = time.time_ns() // 1_000_000
    assert NEW_ID.fullmatch(queue_id), queue_id
    assert before <= decode_ms(queue_id) <= after


def test_queue_ids_sort_in_the_order_they_were_made() -> None:
    made = []
    for _ in range(5):
        made.append(ids.new_queue_id())
        time.sleep(0.002)
    assert sorted(made) == made
    assert len(set(made)) == len(made)


def test_ids_of_one_millisecond_differ_in_all_of_their_random_part() -> None:
    made = [ids.new_queue_id() for _ in range(2000)]
    assert len(set(made)) == len(made)
    tails = [m[9:] for m in made]
    # Every one of the 16 random characters takes many values (80 random
    # bits; the last character carries 5 of them, none fixed by the encoding).
    for position in range(16):
        assert len({t[position] for t in tails}) > 16, position


def reference_queue_id(ms: int, random10: bytes) -> str:
    """The format spelled out: RFC 4648 base32 of the 45 time bits and the
    80 random bits (125 bits, 3 zero bits after them), in Crockford's
    alphabet."""
    bits = ((ms % (1 << 45)) << 83) | (int.from_bytes(random10, "big") << 3)
    rfc4648 = base64.b32encode(bits.to_bytes(16, "big"))[:25].decode()
    return rfc4648.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", CROCKFORD))


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=2**50), st.binary(min_size=10, max_size=10))
def test_queue_id_matches_the_format(ms: int, random10: bytes) -> None:
    assert ids.queue_id_at(ms, random10) == reference_queue_id(ms, random10)


def report(received_id: str) -> bytes:
    return (
        "From: <feedback@remote.example>\r\nTo: <fbl@example.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nabuse report\r\n"
        "--b\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nVersion: 1\r\n\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        "Received: from client.example (client.example [192.0.2.1])\r\n"
        f"\tby mail.example.test (postwarden) with ESMTPSA id {received_id};\r\n"
        "\tThu, 26 Nov 2026 22:00:00 +0000\r\n"
        "Message-ID: <m1@example.test>\r\n\r\n--b--\r\n").encode()


def test_a_feedback_report_names_queue_ids_of_both_formats() -> None:
    new = ids.new_queue_id()
    old = "ABCDEFGHIJKLMNOP"  # 16 characters of RFC 4648 base32, before the time prefix
    for queue_id in (new, old):
        parsed = feedback.parse(report(queue_id))
        assert parsed is not None and parsed.queue_ids == (queue_id,)
    # Neither a shorter nor a longer run of id characters is taken for one.
    for wrong in (new[:-1], new + "A", old[:-1], "abcdefghijklmnop"):
        parsed = feedback.parse(report(wrong))
        assert parsed is not None and parsed.queue_ids == (), wrong
