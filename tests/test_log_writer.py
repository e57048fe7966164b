"""The log's background writer: lines keep their order, info lines reach
the file within the write interval, warnings at once."""

from __future__ import annotations

import calendar
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postwarden.observe import log as logmod


@pytest.fixture
def logfile(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "postwarden.log"
    with path.open("a", encoding="utf-8") as stream:
        logmod.configure("json", "info", stream)
        try:
            yield path
        finally:
            logmod.background_writes(False)
            logmod.configure("json", "info", sys.stderr)


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_keep_their_order_across_threads_and_levels(logfile: Path) -> None:
    logmod.background_writes(True)
    log = logmod.get_logger("test")

    def burst(name: str) -> None:
        for i in range(500):
            (log.warning if i % 100 == 99 else log.info)("line", thread=name, i=i)

    threads = [threading.Thread(target=burst, args=(f"t{n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logmod.background_writes(False)  # writes what is pending
    records = lines(logfile)
    assert len(records) == 1500
    for name in ("t0", "t1", "t2"):
        assert [r["i"] for r in records if r["thread"] == name] == list(range(500))


def test_info_is_written_within_the_interval_and_warnings_at_once(logfile: Path) -> None:
    logmod.background_writes(True)
    log = logmod.get_logger("test")
    log.info("first")
    deadline = time.monotonic() + 1.0
    while not lines(logfile) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert [r["event"] for r in lines(logfile)] == ["first"]
    log.info("second")
    log.warning("third")  # written now, after what was pending
    assert [r["event"] for r in lines(logfile)] == ["first", "second", "third"]


def test_without_the_writer_every_line_is_written_at_once(logfile: Path) -> None:
    logmod.get_logger("test").info("direct")
    assert [r["event"] for r in lines(logfile)] == ["direct"]


def test_fields_of_every_kind_are_written_as_json(logfile: Path) -> None:
    """What a client sends may hold anything: a HELO decoded with lone
    surrogates, a number beyond 64 bits, objects that are not JSON."""
    logmod.background_writes(True)
    log = logmod.get_logger("test")
    log.info("surrogate", helo="bad\udcff.example")
    log.info("big", n=2**70, small=-3, ratio=0.25, ok=True)
    log.info("objects", path=Path("/var/spool/x"), error=ValueError("no"), none=None)
    log.info("text", value='quote " backslash \\ newline \n tab \t ünïcode ✉')
    logmod.background_writes(False)
    records = lines(logfile)
    assert [r["event"] for r in records] == ["surrogate", "big", "objects", "text"]
    assert records[0]["helo"] == "bad\udcff.example"
    assert (records[1]["n"], records[1]["small"], records[1]["ratio"], records[1]["ok"]) == (
        2**70, -3, 0.25, True)
    assert records[2]["path"] == "/var/spool/x" and records[2]["error"] == "no"
    assert "none" not in records[2]  # None fields are left out
    assert records[3]["value"] == 'quote " backslash \\ newline \n tab \t ünïcode ✉'
    assert len(logfile.read_text().splitlines()) == 4  # one line each


def test_a_line_carries_the_time_it_was_logged_not_written(
        logfile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logmod, "WRITE_INTERVAL", 5.0)
    logmod.background_writes(True)
    log = logmod.get_logger("test")
    before = time.time()
    log.info("early")
    time.sleep(0.3)
    assert not lines(logfile)  # still waiting for the writer
    logmod.background_writes(False)  # written now, 0.3 s after it was logged
    (record,) = lines(logfile)
    stamp = calendar.timegm(time.strptime(str(record["ts"])[:19], "%Y-%m-%dT%H:%M:%S"))
    stamp += int(str(record["ts"])[20:23]) / 1000
    assert before - 0.002 <= stamp < before + 0.2


def test_a_field_that_cannot_be_written_costs_only_its_line(logfile: Path) -> None:
    """Lines are formatted by the writer thread: a value whose str() fails
    must not stop it (the lines after it would pile up unwritten)."""
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    logmod.background_writes(True)
    log = logmod.get_logger("test")
    log.info("before")
    log.info("broken", value=Broken(), session="s1")
    log.info("after")
    deadline = time.monotonic() + 2
    while len(lines(logfile)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    records = lines(logfile)
    assert [r["event"] for r in records] == ["before", "broken", "after"]
    assert "fields not written" in str(records[1]["log_error"])
    log.info("later")  # the writer thread still runs
    deadline = time.monotonic() + 2
    while len(lines(logfile)) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines(logfile)[-1]["event"] == "later"
