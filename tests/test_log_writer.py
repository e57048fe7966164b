"""The log's background writer: lines keep their order, info lines reach
the file within the write interval, warnings at once."""

from __future__ import annotations

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
