"""CPU cost of the default content-filter chains per message.

``python -m bench.filter_chain``: a 2 KB smtp-source style message (From,
To, Date, Message-Id and 80-byte lines) through the default inbound chain
(built-in rules, attachments) and outbound chain (attachments, outgoing
content review), driven without an event loop (the built-in filters never
yield).  Prints microseconds per message (best of 5).
"""

from __future__ import annotations

import functools
import timeit

from postwarden.filter.chain import ChainResult, FilterChain
from postwarden.filter.service import build_chain
from postwarden.filter.settings import FilterSettings
from postwarden.filter.verdict import FilterMessage

HEAD = (b"From: <sender@example.org>\r\nTo: <rcpt@example.test>\r\n"
        b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-Id: <20261126.1@example.org>\r\n\r\n")
LINE = b"x" * 78 + b"\r\n"
MESSAGE = HEAD + LINE * ((2048 - len(HEAD)) // len(LINE))


def run(chain: FilterChain, direction: str) -> ChainResult:
    coro = chain.run(FilterMessage(data=MESSAGE, direction=direction, client_ip="127.0.0.1",
                                   sender="sender@example.org",
                                   recipients=("rcpt@example.test",)))
    try:
        coro.send(None)
    except StopIteration as done:
        result: ChainResult = done.value
        return result
    raise RuntimeError("a built-in filter yielded to the event loop")


def main() -> None:
    s = FilterSettings()
    print(f"message: {len(MESSAGE)} bytes")
    for direction, names in (("inbound", s.inbound), ("outbound", s.outbound)):
        chain = build_chain(names, s)
        n = 20000
        best = min(timeit.repeat(functools.partial(run, chain, direction), number=n,
                                 repeat=5))
        print(f"{direction} ({', '.join(names)}): {best / n * 1e6:.1f} us per message")


if __name__ == "__main__":
    main()
