"""Table tests for the sans-I/O protocol engine: sequences, limits, framing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden import reply as R
from postwarden.limits import Limits
from postwarden.smtp import protocol as P


class Driver:
    """Feeds bytes and answers events like a permissive session."""

    def __init__(self, limits: Limits | None = None, **answers: R.Reply) -> None:
        self.proto = P.ServerProtocol(limits or Limits())
        self.events: list[object] = []
        self.content = bytearray()
        self.messages: list[bytes] = []
        self.answers = answers

    def feed(self, data: bytes, step: int | None = None) -> str:
        chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
        for chunk in chunks:
            self.proto.receive(chunk)
            self._drain()
        return self.proto.data_to_send().decode()

    def _drain(self) -> None:
        while True:
            ev = self.proto.next_event()
            if ev is P.NEED_DATA:
                return
            self.events.append(ev)
            if isinstance(ev, P.DataChunk):
                self.content += ev.data
                continue
            if isinstance(ev, P.Quit):
                continue
            name = type(ev).__name__
            if name in self.answers:
                self.proto.respond(self.answers[name])
            elif isinstance(ev, P.Data):
                self.proto.respond(R.START_DATA)
            elif isinstance(ev, P.DataEnd | P.BdatEnd):
                if isinstance(ev, P.DataEnd) or ev.last:
                    self.messages.append(bytes(self.content))
                    self.content.clear()
                self.proto.respond(R.OK)
            elif isinstance(ev, P.Auth):
                self.proto.respond(R.Reply(334, "", ""))
            else:
                self.proto.respond(R.OK)


def codes(output: str) -> list[str]:
    """The reply codes of the final lines of each reply."""
    return [line[:3] for line in output.splitlines() if len(line) > 3 and line[3] == " "]


TXN = b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.test>\r\n"


@pytest.mark.parametrize(("commands", "expected"), [
    (b"MAIL FROM:<a@b.example>\r\n", ["503"]),  # no EHLO
    (b"EHLO\r\n", ["501"]),
    (b"EHLO c\r\nRCPT TO:<u@x.example>\r\n", ["250", "503"]),
    (b"EHLO c\r\nDATA\r\n", ["250", "503"]),
    (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n", ["250", "250", "554"]),
    (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n", ["250", "250", "503"]),
    (b"EHLO c\r\nMAIL FROM:a@b.example\r\n", ["250", "501"]),
    (b"EHLO c\r\nMAIL FROM:<a@b.example> FOO=1\r\n", ["250", "555"]),
    (b"HELO c\r\nMAIL FROM:<a@b.example> SIZE=10\r\n", ["250", "555"]),  # no ESMTP params
    (b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=99999999999\r\n", ["250", "552"]),
    (b"EHLO c\r\nMAIL FROM:<a@b.example> BODY=8BITMIME SMTPUTF8\r\n", ["250", "250"]),
    (b"EHLO c\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\n", ["250", "555"]),
    (b"EHLO c\r\nMAIL FROM:<a@b.example> RET=HDRS ENVID=abc+2Bd\r\n", ["250", "250"]),
    (b"EHLO c\r\nMAIL FROM:<a@b.example> RET=ALL\r\n", ["250", "501"]),
    (b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=1 SIZE=2\r\n", ["250", "501"]),
    (TXN[:-2] + b" NOTIFY=NEVER,SUCCESS\r\n", ["250", "250", "501"]),
    (TXN[:-2] + b" NOTIFY=SUCCESS,DELAY ORCPT=rfc822;u+40x.example\r\n", ["250", "250", "250"]),
    (b"NOOP\r\nHELP\r\nVRFY\r\nRSET\r\nQUIT\r\n", ["250", "214", "501", "250", "221"]),
    (b"EXPN list\r\nTURN\r\nFOO\r\n", ["502", "502", "500"]),
    (b"EHLO c\r\nSTARTTLS now\r\n", ["250", "501"]),
    (b"EHLO c\r\nAUTH\r\n", ["250", "501"]),
    (b"EHLO c\r\nBDAT 3 LAST\r\nabcNOOP\r\n", ["250", "503", "250"]),  # octets consumed
    (b"EHLO c\r\nBDAT x\r\n", ["250", "501", "421"]),
    (TXN + b"DATA extra\r\n", ["250", "250", "250", "501"]),
    (TXN + b"BDAT 2\r\nhiDATA\r\n", ["250", "250", "250", "250", "503"]),
])
def test_sequences(commands: bytes, expected: list[str]) -> None:
    assert codes(Driver().feed(commands)) == expected


def test_pipelined_replies_in_order_and_one_batch() -> None:
    d = Driver()
    out = d.feed(TXN + b"RCPT TO:<v@example.test>\r\nDATA\r\n")
    assert codes(out) == ["250", "250", "250", "250", "354"]
    out = d.feed(b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<b@c.example>\r\nQUIT\r\n")
    assert codes(out) == ["250", "250", "221"]
    assert d.messages == [b"Subject: x\r\n\r\nbody\r\n"]
    assert d.proto.closed


@pytest.mark.parametrize("step", [None, 1, 2, 3, 5, 7])
def test_dot_unstuffing_across_chunk_boundaries(step: int | None) -> None:
    d = Driver()
    d.feed(TXN + b"DATA\r\n")
    body = b"..first\r\nmid\r\n..\r\n...x\r\n.\r\n"
    d.feed(body + b"NOOP\r\n", step=step)
    assert d.messages == [b".first\r\nmid\r\n.\r\n..x\r\n"]


@pytest.mark.parametrize("step", [None, 1, 4])
def test_empty_message(step: int | None) -> None:
    d = Driver()
    d.feed(TXN + b"DATA\r\n")
    d.feed(b".\r\n", step=step)
    assert d.messages == [b""]


# SMTP smuggling (CVE-2023-51764 class): only CRLF.CRLF ends DATA.
SMUGGLING = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\n", b"\r\n.\n", b"\n.\r", b"\r\n.\r",
             b"\r\n.\r\r\n", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("sequence", SMUGGLING)
@pytest.mark.parametrize("step", [None, 1])
def test_smuggling_sequences_do_not_end_data(sequence: bytes, step: int | None) -> None:
    d = Driver()
    d.feed(TXN + b"DATA\r\n")
    smuggled = b"MAIL FROM:<evil@b.example>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nforged\r\n"
    out = d.feed(b"Subject: hi\r\n\r\nbody" + sequence + smuggled + b".\r\n", step=step)
    assert d.messages and len(d.messages) == 1
    assert smuggled in d.messages[0]
    assert codes(out) == ["250"]
    assert not any(isinstance(e, P.Mail) and "evil" in str(e.path.address) for e in d.events)


def _reference_content(wire: bytes) -> tuple[bytes, bytes]:
    """DATA content and what follows it, the slow and obvious way: the
    whole input at once, ended by the first CRLF.CRLF after a virtual CRLF,
    each CRLF.. unstuffed to CRLF. (RFC 5321 4.5.2)."""
    text = b"\r\n" + wire
    end = text.find(b"\r\n.\r\n")
    return text[: end + 2].replace(b"\r\n..", b"\r\n.")[2:], text[end + 5:]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n.", b"\r\n..",
                                 b"..", b"\r\r\n"]), max_size=40),
       st.integers(min_value=1, max_value=12))
def test_content_is_the_same_however_the_input_is_split(parts: list[bytes], step: int) -> None:
    # Every split of the input gives the content that scanning the whole
    # input at once gives, and the same replies to what follows it.
    wire = b"".join(parts) + b"\r\n.\r\nNOOP\r\n"
    content, _ = _reference_content(wire)
    whole, split = Driver(), Driver()
    for d in (whole, split):
        d.feed(TXN + b"DATA\r\n")
    out = whole.feed(wire)
    assert split.feed(wire, step=step) == out
    assert whole.messages[:1] == split.messages[:1] == [content]
    assert whole.messages == split.messages


@pytest.mark.parametrize("step", [None, 7, 4096, 65536])
@pytest.mark.parametrize("cycle", [
    [b"..stuffed", b"..", b".not", b"...", b"plain", b"..", b"\r.", b".x"],
    [b"..", b".x"], [b"..", b"..", b".x"], [b"..", b"..", b"..", b"x"],
])
def test_many_lines_beginning_with_a_dot(cycle: list[bytes], step: int | None) -> None:
    # Past a few such lines per read, the rest of the read is unstuffed in
    # bulk: the same content, at C speed whatever a client sends.
    wire = b"".join(cycle[i % len(cycle)] + b"\r\n" for i in range(3000))
    wire += b".\r\nNOOP\r\n"
    content, _ = _reference_content(wire)
    d = Driver()
    d.feed(TXN + b"DATA\r\n")
    out = d.feed(wire, step=step)
    assert d.messages == [content]
    assert codes(out) == ["250", "250"]


@pytest.mark.parametrize("count", range(14, 20))
def test_the_end_right_after_the_dot_lines_of_a_read(count: int) -> None:
    # Around the number of dot lines handled one by one, the end of data
    # right after the last of them is still found.
    d = Driver()
    d.feed(TXN + b"DATA\r\n")
    out = d.feed(b"..\r\n" * count + b".\r\nNOOP\r\n")
    assert d.messages == [b".\r\n" * count]
    assert codes(out) == ["250", "250"]


def test_long_command_line_rejected_and_connection_usable() -> None:
    d = Driver()
    out = d.feed(b"EHLO c\r\nNOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert codes(out) == ["250", "500", "250"]


def test_overlong_line_without_newline_is_discarded() -> None:
    d = Driver()
    out = d.feed(b"EHLO c\r\n" + b"x" * 20000)
    assert codes(out) == ["250", "500"]
    out = d.feed(b"yyy\r\nNOOP\r\n")
    assert codes(out) == ["250"]


def test_auth_line_may_be_long() -> None:
    d = Driver()
    out = d.feed(b"EHLO c\r\nAUTH PLAIN " + b"A" * 2000 + b"\r\n")
    assert codes(out) == ["250", "334"]
    assert isinstance(d.events[-1], P.Auth)


def test_errors_limit_disconnects() -> None:
    d = Driver(Limits(errors_max=3))
    out = d.feed(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert codes(out) == ["500", "500", "500", "421"]
    assert d.proto.closed


def test_recipient_limit() -> None:
    d = Driver(Limits(recipients_max=2))
    out = d.feed(TXN + b"RCPT TO:<b@example.test>\r\nRCPT TO:<c@example.test>\r\n")
    assert codes(out) == ["250", "250", "250", "250", "452"]


def test_long_text_lines_are_flagged() -> None:
    d = Driver()
    d.feed(TXN + b"DATA\r\n")
    d.feed(b"a" * 999 + b"\r\n.\r\n")  # 1001 octets with CRLF
    end = [e for e in d.events if isinstance(e, P.DataEnd)]
    assert end and end[0].long_lines
    d.feed(TXN[16:] + b"DATA\r\n")  # next transaction: MAIL, RCPT
    d.feed(b"a" * 998 + b"\r\n.\r\n")
    end = [e for e in d.events if isinstance(e, P.DataEnd)]
    assert not end[1].long_lines


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([997, 998, 999]), st.integers(0, 2100)),
                min_size=1, max_size=12),
       st.integers(min_value=1, max_value=4096))
def test_a_long_line_is_found_wherever_the_chunks_split(lengths: list[int], step: int) -> None:
    # Lines of these lengths (with CRLF), fed in chunks of ``step`` octets:
    # flagged exactly when one is over 1000 octets (RFC 5321 4.5.3.1.6).
    body = b"".join(b"b" * n + b"\r\n" for n in lengths)
    d = Driver()
    d.feed(TXN + b"DATA\r\n")
    d.feed(body + b".\r\n", step=step)
    (end,) = [e for e in d.events if isinstance(e, P.DataEnd)]
    assert end.long_lines == any(n + 2 > 1000 for n in lengths)


@pytest.mark.parametrize("step", [None, 1000, 4096, 65536, 199_999])
def test_an_overlong_command_line_costs_only_itself(step: int | None) -> None:
    """500 once for the line, however it arrives (all at once included),
    and the commands that came after it in the same read are answered."""
    d = Driver()
    out = d.feed(b"EHLO c\r\nNOOP " + b"a" * 200_000 + b"\r\nNOOP\r\nNOOP\r\n", step=step)
    assert codes(out) == ["250", "500", "250", "250"]
    assert "5.5.2 Line too long" in out


def test_bdat_chunks_and_last() -> None:
    d = Driver()
    out = d.feed(TXN + b"BDAT 4\r\nab\r\nBDAT 0 LAST\r\nNOOP\r\n")
    assert codes(out) == ["250"] * 6
    assert d.messages == [b"ab\r\n"]


def test_bdat_after_failed_chunk_is_refused() -> None:
    d = Driver(BdatEnd=R.MESSAGE_TOO_BIG)
    out = d.feed(TXN + b"BDAT 2\r\nabBDAT 2 LAST\r\ncd")
    assert codes(out) == ["250", "250", "250", "552", "503"]


def test_starttls_discards_pipelined_plaintext() -> None:
    d = Driver(StartTls=R.READY_TLS)
    out = d.feed(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x.example>\r\n")
    assert codes(out) == ["250", "220"]
    assert d.proto.state is P.State.TLS
    d.proto.tls_started()
    assert d.proto.buffered == 0
    out = d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(out) == ["503"]  # EHLO again is required after TLS


def test_auth_exchange_and_cancel() -> None:
    d = Driver()
    out = d.feed(b"EHLO c\r\nAUTH LOGIN\r\n*\r\n")
    assert codes(out) == ["250", "334", "250"]
    assert isinstance(d.events[-1], P.AuthResponse) and d.events[-1].line == "*"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    d = Driver()
    d.feed(b"EHLO c\r\n" + data)
    d.feed(data, step=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n",
    b"DATA\r\n", b"hello\r\n", b".\r\n", b"RSET\r\n", b"NOOP\r\n", b"BDAT 3\r\nabc",
    b"BDAT 1 LAST\r\nz", b"AUTH PLAIN\r\n", b"*\r\n", b"STARTTLS\r\n", b"\r\n", b"\n.\n",
]), max_size=30), st.integers(min_value=1, max_value=9))
def test_command_soup_replies_once_per_command(parts: list[bytes], step: int) -> None:
    """Any sequence gets replies, never an exception, and never loses order."""
    d = Driver()
    d.feed(b"".join(parts), step=step)
    assert d.proto.data_to_send() == b""
