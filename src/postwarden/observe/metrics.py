"""Prometheus metrics: what is counted, and the exposition for ``/metrics``.

Counters and histograms are prometheus-client objects; their labelled
children are bound once (per listener, per destination class) so that the
accept path costs an attribute lookup and an ``inc()`` per figure, never a
label lookup.  Figures that are states rather than events (queue size by
state, bans active, suspended accounts, alerts firing) are read from the
database when ``/metrics`` is scraped (:class:`StateCollector`).

Several processes (``processes = N``, see :mod:`postwarden.workers`):
prometheus-client's multiprocess mode.  Every process writes its figures to
memory-mapped files in ``<data_dir>/metrics``; the main process's
``/metrics`` adds them up.  The directory must be named in
``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is first imported in
a process, so this module imports it only inside functions and
:func:`prepare_multiprocess` runs first thing in ``serve``.  The main
process empties the directory when it starts; a worker that died has its
files marked dead (its counts stay in the totals).

Names follow the Prometheus conventions: ``postwarden_`` prefix, counters
end in ``_total``, durations in ``_seconds``, sizes in ``_bytes``.

Security exposure: the figures say how much mail flows and how it fares;
they carry no addresses (label values are listener names, stages, filter
names and fixed words), and are served on the loopback admin listener by
default.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR = "metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RESIDENCE_BUCKETS = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0,
                     86400.0, 2 * 86400.0, 5 * 86400.0)
DNS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Transport kinds (delivery.transport.Nexthop.kind) -> destination class.
DESTINATIONS = {"maildir": "local", "lmtp": "local", "mx": "remote", "smtp": "relay"}


def prepare_multiprocess(data_dir: Path, *, main: bool) -> Path:
    """Name the directory of the shared figures (call before anything
    imports prometheus_client).  The main process starts it empty."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / METRICS_DIR
    if main:
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    _cache_pid_for_values()
    return path


_pid = [os.getpid()]


def _process_id() -> int:
    return _pid[0]


def _cache_pid_for_values() -> None:
    """Multiprocess values look up the process id at every ``inc()`` (a
    getpid(2) each time, several per message) to notice a fork; the id is
    cached here and refreshed in a forked child (``os.register_at_fork``),
    which keeps prometheus-client's rule that simultaneously running
    processes get distinct ids."""
    from prometheus_client import values

    _pid[0] = os.getpid()
    current = values.ValueClass
    if not getattr(current, "_multiprocess", False) or getattr(
            current, "_postwarden_cached_pid", False):
        return  # imported before the directory was named, or done already
    cls = values.MultiProcessValue(process_identifier=_process_id)  # type: ignore[no-untyped-call]
    cls._postwarden_cached_pid = True
    values.ValueClass = cls


def _after_fork() -> None:
    _pid[0] = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def process_dead(pid: int) -> None:
    """A worker is gone: its live gauges no longer count."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class _Null:
    """Stands in for a metric when metrics are off."""

    def inc(self, amount: float = 1.0) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


NULL: Any = _Null()


class ListenerMetrics:
    """The figures of one SMTP listener, bound once."""

    __slots__ = (
        "_rejected",
        "_rejects",
        "accepted",
        "auth_failed",
        "auth_ok",
        "bytes",
        "connected",
        "name",
        "recipients",
        "refused",
        "tls",
    )

    def __init__(self, name: str, metrics: Metrics | None) -> None:
        self.name = name
        self._rejects: dict[tuple[str, int], Any] = {}
        if metrics is None:
            self.connected = self.refused = self.tls = self.auth_ok = self.auth_failed = NULL
            self.accepted = self.recipients = self.bytes = NULL
            self._rejected: Any = None
            return
        self.connected = metrics.connections.labels(name, "accepted")
        self.refused = metrics.connections.labels(name, "refused")
        self.tls = metrics.tls_sessions.labels(name)
        self.auth_ok = metrics.auth.labels(name, "success")
        self.auth_failed = metrics.auth.labels(name, "failure")
        self.accepted = metrics.accepted.labels(name)
        self.recipients = metrics.recipients.labels(name)
        self.bytes = metrics.received_bytes.labels(name)
        self._rejected = metrics.rejected

    def rejected(self, stage: str, code: int) -> None:
        """A refusal at ``stage`` (connect, helo, auth, mail, rcpt, data, filter)."""
        if self._rejected is None:
            return
        key = (stage, code // 100)
        child = self._rejects.get(key)
        if child is None:
            kind = "temporary" if code < 500 else "permanent"
            child = self._rejects[key] = self._rejected.labels(self.name, stage, kind)
        child.inc()


class Metrics:
    """Every counter and histogram of one server process.  ``multiprocess``:
    the figures go to the shared directory (see the module docstring);
    otherwise to a registry of this object's own (so that several servers
    in one process, as in tests, count apart)."""

    def __init__(self, *, multiprocess: bool = False) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.multiprocess = multiprocess and bool(os.environ.get(MULTIPROC_ENV))
        self.registry = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.connections = Counter(
            "postwarden_smtp_connections", "SMTP connections by listener and result "
            "(accepted: greeted; refused: turned away before the greeting)",
            ["listener", "result"], registry=reg)
        self.tls_sessions = Counter(
            "postwarden_smtp_tls_sessions", "SMTP connections that established TLS "
            "(STARTTLS or implicit TLS)", ["listener"], registry=reg)
        self.auth = Counter("postwarden_smtp_auth", "SMTP AUTH attempts by result",
                            ["listener", "result"], registry=reg)
        self.accepted = Counter("postwarden_messages_accepted",
                                "Messages accepted (committed to the queue)", ["listener"],
                                registry=reg)
        self.rejected = Counter(
            "postwarden_messages_rejected", "SMTP refusals by listener, stage (reason) "
            "and kind (permanent 5xx, temporary 4xx)", ["listener", "reason", "kind"],
            registry=reg)
        self.recipients = Counter("postwarden_recipients_accepted",
                                  "Recipients of accepted messages", ["listener"],
                                  registry=reg)
        self.received_bytes = Counter("postwarden_received_bytes",
                                      "Bytes of accepted messages", ["listener"], registry=reg)
        self.deliveries = Counter(
            "postwarden_deliveries", "Delivery attempts per recipient by result "
            "(delivered, deferred, failed) and destination class (local, remote, relay)",
            ["result", "destination"], registry=reg)
        self.delivery_seconds = Histogram(
            "postwarden_delivery_duration_seconds", "Time of one delivery attempt to one "
            "next hop", ["destination"], buckets=DELIVERY_BUCKETS, registry=reg)
        self.residence = Histogram(
            "postwarden_queue_residence_seconds", "Time from acceptance to the final "
            "result (delivered or failed) of a recipient", ["result"],
            buckets=RESIDENCE_BUCKETS, registry=reg)
        self.filter_verdicts = Counter(
            "postwarden_filter_verdicts", "Content filter verdicts by filter and action",
            ["filter", "verdict"], registry=reg)
        self.dns_seconds = Histogram(
            "postwarden_dns_lookup_duration_seconds", "DNS lookups sent to the resolver "
            "(cache misses)", ["type"], buckets=DNS_BUCKETS, registry=reg)
        self.dns_failures = Counter(
            "postwarden_dns_lookup_failures", "DNS lookups that failed temporarily "
            "(servfail, timeout, error)", ["type", "reason"], registry=reg)
        self.alerts_sent = Counter("postwarden_alert_notifications",
                                   "Alert notifications sent (firing or resolved)",
                                   ["channel", "state"], registry=reg)
        self.feedback_reports = Counter(
            "postwarden_feedback_reports", "Feedback reports (ARF) received, by result "
            "(matched: about mail this server sent; unmatched; malformed)", ["result"],
            registry=reg)
        self._listeners: dict[str, ListenerMetrics] = {}
        self._deliveries: dict[tuple[str, str], Any] = {}
        self._delivery_seconds: dict[str, Any] = {}
        self._residence: dict[str, Any] = {}
        self._dns: dict[str, Any] = {}
        self._filter_verdicts: dict[tuple[str, str], Any] = {}
        self.collectors: list[Any] = []

    # -- bound children -----------------------------------------------------

    def listener(self, name: str) -> ListenerMetrics:
        lm = self._listeners.get(name)
        if lm is None:
            lm = self._listeners[name] = ListenerMetrics(name, self)
        return lm

    def delivery(self, result: str, kind: str) -> None:
        """One recipient's attempt through a transport of ``kind``."""
        dest = DESTINATIONS.get(kind, "other")
        child = self._deliveries.get((result, dest))
        if child is None:
            child = self._deliveries[(result, dest)] = self.deliveries.labels(result, dest)
        child.inc()

    def delivery_time(self, kind: str, seconds: float) -> None:
        dest = DESTINATIONS.get(kind, "other")
        child = self._delivery_seconds.get(dest)
        if child is None:
            child = self._delivery_seconds[dest] = self.delivery_seconds.labels(dest)
        child.observe(seconds)

    def residence_time(self, result: str, seconds: float) -> None:
        child = self._residence.get(result)
        if child is None:
            child = self._residence[result] = self.residence.labels(result)
        child.observe(max(0.0, seconds))

    def feedback(self, result: str) -> None:
        """A feedback report examined: matched, unmatched or malformed."""
        self.feedback_reports.labels(result).inc()

    def dns_lookup(self, rdtype: str, outcome: str, seconds: float) -> None:
        """Called by the resolver after each lookup it sent."""
        child = self._dns.get(rdtype)
        if child is None:
            child = self._dns[rdtype] = self.dns_seconds.labels(rdtype)
        child.observe(seconds)
        if outcome in ("servfail", "timeout", "error"):
            self.dns_failures.labels(rdtype, outcome).inc()

    def filter_verdict(self, name: str, verdict: str) -> None:
        child = self._filter_verdicts.get((name, verdict))
        if child is None:
            child = self._filter_verdicts[(name, verdict)] = self.filter_verdicts.labels(
                name, verdict)
        child.inc()

    # -- exposition -----------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format for ``/metrics`` (blocking: database reads)."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            assert self.registry is not None
            registry = CollectorRegistry()
            registry.register(_Forward(self.registry))
        for collector in self.collectors:
            registry.register(collector)
        return bytes(generate_latest(registry))


class _Forward:
    """Another registry's figures, in the registry of one scrape."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Any]:
        return list(self.registry.collect())


class StateCollector:
    """Figures read at scrape time: ``gauges()`` returns
    ``(name, help, {label tuple: value}, label names)`` entries; gauges,
    except those named ``..._total``, which are counters (a count since the
    process started, e.g. the node's lease takeovers)."""

    def __init__(self, gauges: Callable[[], Iterable[tuple[str, str, dict[tuple[str, ...],
                                                                          float], tuple[str, ...]]]]
                 ) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, doc, values, labels in self.gauges():
            family: GaugeMetricFamily | CounterMetricFamily
            if name.endswith("_total"):
                family = CounterMetricFamily(name, doc, labels=list(labels))
            else:
                family = GaugeMetricFamily(name, doc, labels=list(labels))
            for key, value in values.items():
                family.add_metric(list(key), value)
            yield family


NULL_LISTENER = ListenerMetrics("", None)


class NullMetrics:
    """Metrics off (tests that build a ServerContext by hand)."""

    def listener(self, name: str) -> ListenerMetrics:
        return NULL_LISTENER

    def feedback(self, result: str) -> None:
        pass


NULL_METRICS: Any = NullMetrics()


class MeasuredTransport:
    """A transport whose attempts are timed and counted (by destination
    class of its ``kind``); delivers through ``inner``."""

    def __init__(self, inner: Any, kind: str, metrics: Metrics) -> None:
        self.inner = inner
        self.kind = kind
        self.metrics = metrics

    async def deliver(self, job: Any) -> list[Any]:
        start = time.monotonic()
        results: list[Any] = await self.inner.deliver(job)
        self.metrics.delivery_time(self.kind, time.monotonic() - start)
        for result in results:
            self.metrics.delivery(result.status.value, self.kind)
        return results


def residence_hook(metrics: Metrics) -> Callable[[Any, list[Any]], None]:
    """For ``QueueRunner.on_results``: the queue residence of each recipient
    that reached its final state."""

    def hook(msg: Any, results: list[Any]) -> None:
        now = time.time()
        for r in results:
            status = r.status.value
            if status in ("delivered", "failed"):
                metrics.residence_time(status, now - msg.received_at)
    return hook
