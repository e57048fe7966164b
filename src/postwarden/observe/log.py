"""Structured logs: one line per event, JSON lines or logfmt.

Every line has ``ts``, ``level``, ``event`` and the fields given, such as
``session`` (session id) and ``queue_id``, so that one message can be
followed from connect to delivery with a grep.

A line is formatted when it is written: by the writer thread for lines at
level info and below (see :func:`background_writes`), up to
:data:`WRITE_INTERVAL` after they were logged, so the event loop only
records them.  Callers therefore pass values they do not change afterwards
(strings, numbers, fresh lists).  JSON lines are encoded by orjson, which
takes a tenth of the time of the standard library's encoder; what orjson
refuses (strings with lone surrogates, integers beyond 64 bits) falls back to
the standard encoder.

Security exposure: fields come from untrusted clients (HELO names,
addresses).  They are escaped by the JSON/logfmt encoders, so a client cannot
forge log lines.  Passwords and message bodies are never passed here.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

import orjson

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


# A line not yet formatted: the time it was logged, its level, component,
# event and fields.
_Record = tuple[float, str, str, str, dict[str, Any]]


class _Sink:
    def __init__(self) -> None:
        self.stream: TextIO = sys.stderr
        self.format = "json"
        self.level = _LEVELS["info"]
        self.lock = threading.Lock()
        # Lines waiting for the writer thread (see background_writes()).
        self.pending: list[_Record] | None = None
        self.wake = threading.Condition(self.lock)
        self.writer: threading.Thread | None = None
        self.io = threading.Lock()

    def write(self, records: list[_Record]) -> None:
        """Called holding ``lock``, which it releases: the lines are
        formatted and written under ``io`` only, taken before ``lock`` is let
        go, so that batches are written in the order they were taken."""
        self.io.acquire()
        self.lock.release()
        try:
            fmt = self.format
            self.stream.write("".join([_render(r, fmt) for r in records]))
            self.stream.flush()
        except (OSError, ValueError):
            pass
        finally:
            self.io.release()
            self.lock.acquire()

    def run_writer(self) -> None:
        with self.lock:
            while True:
                if self.pending is not None and len(self.pending) < MAX_PENDING:
                    self.wake.wait(WRITE_INTERVAL)
                records = self.pending
                if records:
                    self.pending = []
                    self.write(records)
                if records is None:
                    return


_sink = _Sink()

# How long a line at level info or debug may wait to be written by the
# background writer.
WRITE_INTERVAL = 0.05
# ... or sooner when this many lines are waiting.
MAX_PENDING = 512


def background_writes(enabled: bool) -> None:
    """Let a thread write lines at level info and below, WRITE_INTERVAL at
    the latest after they were logged, instead of a write(2) per line on the
    event loop: a busy server logs several lines per message.  Warnings and
    errors are still written at once (with what is pending before them).
    ``False`` writes what is pending and stops the thread."""
    if enabled:
        with _sink.lock:
            if _sink.writer is not None:
                return
            _sink.pending = []
            _sink.writer = threading.Thread(target=_sink.run_writer, name="log-writer",
                                            daemon=True)
        _sink.writer.start()
        return
    with _sink.lock:
        writer, _sink.writer = _sink.writer, None
        records, _sink.pending = _sink.pending, None
        if records:
            _sink.write(records)
        _sink.wake.notify()
    if writer is not None:
        writer.join(5)


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set the format (``json`` or ``logfmt``), the minimum level and the stream."""
    _sink.format = fmt
    _sink.level = _LEVELS[level]
    if stream is not None:
        _sink.stream = stream


def _logfmt_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    if s and all(c.isalnum() or c in "-_./@:+<>=," for c in s):
        return s
    return json.dumps(s)


# What orjson refuses; ASCII output, so that a lone surrogate is written as
# an escape instead of failing the file's UTF-8 encoding.
_JSON = json.JSONEncoder(default=str)
# Dataclasses and datetimes are written as str() gives them, as the
# standard encoder's default=str does.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def format_line(record: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        try:
            return orjson.dumps(record, default=str, option=_ORJSON_OPTIONS).decode()
        except TypeError:  # a lone surrogate, an integer beyond 64 bits
            return _JSON.encode(record)
    return " ".join(f"{k}={_logfmt_value(v)}" for k, v in record.items())


class _Clock:
    """ISO 8601 timestamps; the seconds part is formatted once per second.
    Used by the writer thread and by threads writing at once: the second
    and its text are replaced together."""

    cached = (-1, "")

    def format(self, t: float) -> str:
        sec = int(t)
        second, prefix = self.cached
        if sec != second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self.cached = (sec, prefix)
        return f"{prefix}.{int((t - sec) * 1000):03d}Z"


_clock = _Clock()


def _render(r: _Record, fmt: str) -> str:
    """One line of text, newline included.  Never raises: a field that
    cannot be written (its ``str()`` fails) costs its own fields, not the
    line, nor the writer thread and the lines after it."""
    t, level, component, event, fields = r
    record: dict[str, Any] = {"ts": _clock.format(t), "level": level,
                              "component": component, "event": event}
    record.update({k: v for k, v in fields.items() if v is not None})
    try:
        return format_line(record, fmt) + "\n"
    except Exception as exc:
        return format_line({"ts": _clock.format(t), "level": level, "component": component,
                            "event": event,
                            "log_error": f"fields not written: {type(exc).__name__}"},
                           fmt) + "\n"


class Logger:
    """A named logger; ``component`` is added to every line."""

    def __init__(self, component: str) -> None:
        self.component = component

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if _LEVELS[level] < _sink.level:
            return
        record = (time.time(), level, self.component, event, fields)
        with _sink.lock:
            pending = _sink.pending
            if pending is not None and level in ("info", "debug"):
                pending.append(record)
                if len(pending) >= MAX_PENDING:
                    _sink.wake.notify()
                return
            if pending:
                records = [*pending, record]
                pending.clear()
            else:
                records = [record]
            _sink.write(records)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


def get_logger(component: str) -> Logger:
    return Logger(component)
