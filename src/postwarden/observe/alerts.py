"""Alerts: rules that notice when something is wrong, and who is told.

The main process evaluates the rules every ``[alerts] interval``:

* ``account_spike``: an account sending ``spike_factor`` times its usual
  rate (its baseline: a moving average of its messages per ``[ratelimit]``
  window) and at least ``spike_min`` messages in the current window.  With
  ``suspend = true`` the account is suspended from sending at once: every
  process refuses its MAIL FROM with 550 5.7.1 until the administrator
  lifts it (``postwarden suspend lift ADDRESS``).  The counts are the rate
  limiter's, in the shared database (so they include what every worker
  process accepted); the detector needs ``[ratelimit]`` on.
* ``account_quota``: an account reached its ``[ratelimit]`` quota.
* ``bounce_rate``: the share of bounces among the last hour's final
  delivery results is above ``bounce_rate`` (with ``bounce_min`` results).
* ``queue_size`` and ``deferred_age``: the queue holds more than
  ``queue_max`` messages; the oldest deferred one is older than
  ``deferred_age``.
* ``certificate``: the listeners' certificate expires within ``cert_days``
  days (or has expired, or cannot be read).
* ``blocklisted``: one of ``own_ips`` is listed in one of ``blocklists``.
* ``filter_down``: a configured clamd or rspamd does not accept connections.

An alert fires once (its key, e.g. ``account_spike:alice@example.org``, is
kept in the database while it holds, across restarts) and is resolved when
its rule stops matching.  Both are sent to the postmaster by mail (from the
null sender, so that no bounce can loop) and POSTed to ``webhook`` as JSON
with ``X-Postwarden-Signature: sha256=HMAC-SHA256(webhook_secret,
"<X-Postwarden-Timestamp>." + body)`` in hex.

Several nodes on PostgreSQL share the alerts table.  The rules on shared
state (:data:`SHARED_RULES`: account spikes and quotas, bounce rate, queue
size, deferred age) are evaluated by one node, the one holding the leader
lock (:meth:`~postwarden.storage.pg_monitor.PgMonitorStore.lead`; another
node takes over when it stops or dies, and finds the alerts already firing
without notifying again).  The rules on a node's own things (its
certificate, its filters, its addresses on blocklists) run on every node,
their keys ending in ``@<hostname>``, each node resolving only its own.
Recording an alert is atomic (:meth:`~postwarden.storage.sqlite_monitor.
MonitorTables.fire`), so even two nodes that evaluate together notify once.

Security exposure: reads the database and the certificate; sends to the
configured webhook (set by the administrator) and queues mail to the
postmaster.  Alert texts quote account names and counts, never message
content.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import hmac
import ipaddress
import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postwarden import reply as R
from postwarden.background import cancel_and_wait
from postwarden.config import Config
from postwarden.envelope import Address, Envelope, Recipient
from postwarden.observe.log import get_logger
from postwarden.policy import CheckContext, Policy, Stage
from postwarden.storage.base import CommitMeta, QueueStore, Reader, is_sqlite
from postwarden.storage.sqlite_monitor import Alert, MonitorTables

log = get_logger("alerts")

SUSPENDED = R.Reply(550, "5.7.1", "Sending suspended for this account, contact the postmaster")
FILTER_CONNECT_TIMEOUT = 3.0
# Rules on state the nodes share (evaluated by one node on PostgreSQL).
SHARED_RULES = frozenset({"account_spike", "account_quota", "bounce_rate", "queue_size",
                          "deferred_age"})


# -- the suspension check (every process) ------------------------------------------


def install_suspension(policy: Policy, store: MonitorTables) -> None:
    """Refuse MAIL FROM of suspended accounts (first check of the stage)."""

    async def suspended_account(ctx: CheckContext) -> R.Verdict:
        user = ctx.conn.auth_user
        if not user or not store.suspended(user):
            return R.NO_OPINION
        return R.reject(SUSPENDED, f"account {user} is suspended from sending")

    policy.checks[Stage.MAIL].insert(0, suspended_account)


# -- rules -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    key: str
    rule: str
    severity: str
    summary: str
    detail: str = ""


def spike_findings(cfg: Config, db: Reader, monitor: MonitorTables,
                   now: float) -> list[Finding]:
    """Accounts far above their baseline or at their quota (reads the rate
    limiter's message counters; folds finished windows into baselines)."""
    rl, ac = cfg.ratelimit, cfg.alerts
    if not rl.enabled or (is_sqlite(db) and db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'protect_rates'").fetchone() is None):
        return []
    window = rl.window
    start = int(now // window) * window
    rows = db.execute("SELECT key, window_start, count FROM protect_rates"
                      " WHERE key LIKE 'msg:acct:%' AND window_start >= ?",
                      (start - window,)).fetchall()
    current: dict[str, float] = {}
    previous: dict[str, float] = {}
    for key, ws, count in rows:
        account = str(key).removeprefix("msg:acct:")
        if int(ws) == start:
            current[account] = float(count)
        else:
            previous[account] = float(count)
            monitor.fold(account, int(ws), float(count))
    baselines = monitor.baselines()
    overlap = 1.0 - (now - start) / window
    out = []
    for account in set(current) | set(previous):
        rate = current.get(account, 0.0) + previous.get(account, 0.0) * overlap
        base = baselines.get(account, (0.0, 0, 0))[0]
        threshold = max(ac.spike_factor * base, float(ac.spike_min))
        if rate >= threshold:
            out.append(Finding(f"account_spike:{account}", "account_spike", "critical",
                               f"account {account} sent {rate:.0f} messages in "
                               f"{window}s, usually {base:.1f}",
                               f"threshold {threshold:.0f} (spike_factor "
                               f"{ac.spike_factor:g} x baseline, at least spike_min "
                               f"{ac.spike_min})"))
        quota = rl.account_quota(account).messages
        if quota > 0 and rate >= quota:
            out.append(Finding(f"account_quota:{account}", "account_quota", "warning",
                               f"account {account} reached its quota of {quota} messages "
                               f"per {window}s"))
    return out


def bounce_findings(cfg: Config, db: Reader, now: float) -> list[Finding]:
    rows = db.execute("SELECT event, count(*) FROM events WHERE ts >= ? AND event IN "
                      "('delivered', 'failed', 'expired') GROUP BY event",
                      (now - 3600,)).fetchall()
    counts = {str(e): int(c) for e, c in rows}
    total = sum(counts.values())
    bounced = counts.get("failed", 0) + counts.get("expired", 0)
    ac = cfg.alerts
    if total >= ac.bounce_min and bounced / total > ac.bounce_rate:
        return [Finding("bounce_rate", "bounce_rate", "warning",
                        f"{bounced} of {total} deliveries in the last hour bounced "
                        f"({100 * bounced / total:.0f}%, threshold "
                        f"{100 * ac.bounce_rate:.0f}%)")]
    return []


def queue_findings(cfg: Config, db: Reader, now: float) -> list[Finding]:
    out = []
    (size,) = db.execute("SELECT count(*) FROM messages").fetchone()
    if size > cfg.alerts.queue_max:
        out.append(Finding("queue_size", "queue_size", "warning",
                           f"{size} messages in the queue (threshold {cfg.alerts.queue_max})"))
    (oldest,) = db.execute(
        "SELECT min(m.received_at) FROM messages m JOIN recipients r ON r.queue_id ="
        " m.queue_id WHERE r.status = 'deferred'").fetchone()
    if oldest is not None and now - oldest > cfg.alerts.deferred_age:
        hours = (now - oldest) / 3600
        out.append(Finding("deferred_age", "deferred_age", "warning",
                           f"the oldest deferred message has waited {hours:.1f} hours"))
    return out


def certificate_findings(cfg: Config, now: float) -> list[Finding]:
    if cfg.tls.cert is None:
        return []
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes())
    except (OSError, ValueError) as exc:
        return [Finding("certificate", "certificate", "critical",
                        f"cannot read the TLS certificate {cfg.tls.cert}: {exc}")]
    expires = cert.not_valid_after_utc.timestamp()
    days = (expires - now) / 86400
    if days <= cfg.alerts.cert_days:
        when = datetime.datetime.fromtimestamp(expires, datetime.UTC).strftime("%Y-%m-%d %H:%M")
        what = "expired" if days <= 0 else f"expires in {days:.1f} days"
        return [Finding("certificate", "certificate", "critical" if days <= 3 else "warning",
                        f"the TLS certificate {cfg.tls.cert} {what} ({when} UTC)")]
    return []


async def blocklist_findings(cfg: Config, resolver: Any) -> list[Finding]:
    out: list[Finding] = []
    if resolver is None:
        return out
    from postwarden.delivery.dns import DnsError

    for ip in cfg.alerts.own_ips:
        addr = ipaddress.ip_address(ip)
        if addr.version == 4:
            reversed_name = ".".join(reversed(ip.split(".")))
        else:
            reversed_name = ".".join(reversed(addr.exploded.replace(":", "")))
        for zone in cfg.alerts.blocklists:
            try:
                answer = await resolver.query(f"{reversed_name}.{zone}", "A")
            except DnsError:  # NXDOMAIN: not listed; a failure: unknown, not an alert
                continue
            if answer is not None:
                codes = ", ".join(sorted(str(r) for r in answer))
                out.append(Finding(f"blocklisted:{ip}:{zone}", "blocklisted", "critical",
                                   f"our address {ip} is listed in {zone} ({codes})"))
    return out


async def filter_findings(cfg: Config) -> list[Finding]:
    f = cfg.filters
    used = set(f.inbound) | set(f.outbound)
    targets = []
    if "clamav" in used:
        targets.append(("clamav", f.clamav.address))
    if "rspamd" in used:
        targets.append(("rspamd", f.rspamd.url))
    out = []
    for name, address in targets:
        problem = await _connect(address)
        if problem:
            out.append(Finding(f"filter_down:{name}", "filter_down", "critical",
                               f"the {name} filter at {address} is down: {problem}"))
    return out


async def _connect(address: str) -> str:
    """"" if something accepts connections at ``address`` (``unix:PATH``,
    ``HOST:PORT`` or an http URL), else the error."""
    try:
        async with asyncio.timeout(FILTER_CONNECT_TIMEOUT):
            if address.startswith("unix:"):
                _, writer = await asyncio.open_unix_connection(address[5:])
            else:
                rest = address.split("://", 1)[-1].split("/", 1)[0]
                host, _, port = rest.rpartition(":")
                if not host:
                    host, port = rest, "443" if address.startswith("https") else "80"
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return ""
    except (OSError, TimeoutError, ValueError) as exc:
        return getattr(exc, "strerror", None) or type(exc).__name__


# -- notification ------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The webhook signature: hex HMAC-SHA256 of ``timestamp + "." + body``."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body,
                    hashlib.sha256).hexdigest()


def post_webhook(url: str, secret: str, payload: dict[str, object], timeout: float) -> None:
    """POST ``payload`` (blocking; raises OSError on failure)."""
    body = json.dumps(payload, sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "postwarden-alerts",
               "X-Postwarden-Timestamp": timestamp}
    if secret:
        headers["X-Postwarden-Signature"] = "sha256=" + sign(secret, timestamp, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if response.status >= 300:
            raise OSError(f"webhook answered {response.status}")


def alert_mail(hostname: str, to: str, state: str, alert: Alert) -> bytes:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    subject = f"[postwarden {state}] {alert.summary}"[:200]
    clean = subject.replace("\r", " ").replace("\n", " ")
    lines = [f"From: postwarden alerts <MAILER-DAEMON@{hostname}>", f"To: <{to}>",
             f"Subject: {clean}", f"Date: {stamp}",
             f"Message-ID: <alert.{int(time.time() * 1000)}.{abs(hash(alert.key))}@{hostname}>",
             "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
             "Auto-Submitted: auto-generated", "",
             f"Alert {state}: {alert.rule} ({alert.severity}) on {hostname}", "",
             alert.summary, ""]
    if alert.detail:
        lines += [alert.detail, ""]
    lines.append(f"Key: {alert.key}")
    return ("\r\n".join(lines) + "\r\n").encode()


class AlertEngine:
    """Evaluates the rules and sends what changed (main process)."""

    def __init__(self, cfg: Config, monitor: MonitorTables, queue: QueueStore | None,
                 resolver: Any = None, metrics: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.monitor = monitor
        self.queue = queue
        self.resolver = resolver
        self.metrics = metrics
        self.clock = clock
        self.postmaster = cfg.alerts.postmaster or (
            f"postmaster@{cfg.domains[0]}" if cfg.domains else "")
        self._task: asyncio.Task[None] | None = None
        self.evaluations = 0
        # Whether this node evaluated the shared rules in the last round
        # (always on SQLite; on PostgreSQL, while it holds the leader lock).
        self.leading = not cfg.storage.postgres

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alerts")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                await self.evaluate()
            except Exception as exc:  # keep watching; the next round retries
                log.error("alerts_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.cfg.alerts.interval)

    def _shared_findings(self, now: float) -> list[Finding]:
        """The rules on the queue, the deliveries and the account counters
        (on PostgreSQL: by the leading node only, see the module docstring)."""
        if self.cfg.storage.postgres:
            from postwarden.storage.pg_monitor import PgMonitorStore

            assert isinstance(self.monitor, PgMonitorStore)
            self.leading = self.monitor.lead()
            return self._rules(self.monitor.session, now) if self.leading else []
        db = sqlite3.connect(f"file:{self.cfg.db_path}?mode=ro", uri=True, timeout=5)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            return self._rules(db, now)
        finally:
            db.close()

    def _rules(self, db: Reader, now: float) -> list[Finding]:
        out = spike_findings(self.cfg, db, self.monitor, now)
        out += bounce_findings(self.cfg, db, now)
        out += queue_findings(self.cfg, db, now)
        return out

    def _node_key(self, f: Finding) -> Finding:
        """On PostgreSQL, a rule on this node's own things: its key names
        the node (another node's certificate is another alert)."""
        if not self.cfg.storage.postgres or f.rule in SHARED_RULES:
            return f
        return dataclasses.replace(f, key=f"{f.key}@{self.cfg.hostname}")

    def _answers_for(self, key: str, rule: str) -> bool:
        """Whether this node resolves the firing alert ``key``."""
        if rule in SHARED_RULES:
            return self.leading
        return not self.cfg.storage.postgres or key.endswith(f"@{self.cfg.hostname}")

    async def evaluate(self) -> list[Finding]:
        """One round: the findings now; fire what is new, resolve what is gone."""
        now = self.clock()
        findings = await asyncio.to_thread(self._shared_findings, now)
        findings += await asyncio.to_thread(certificate_findings, self.cfg, now)
        findings += await blocklist_findings(self.cfg, self.resolver)
        if self.cfg.alerts.filters:
            findings += await filter_findings(self.cfg)
        findings = [self._node_key(f) for f in findings]
        self.evaluations += 1
        firing = await asyncio.to_thread(self.monitor.firing)
        now_keys = {f.key for f in findings}
        for f in findings:
            if f.rule == "account_spike" and self.cfg.alerts.suspend:
                await self._suspend(f)
            if f.key not in firing:
                alert = Alert(f.key, f.rule, f.severity, f.summary, f.detail, self.clock())
                # False: another node recorded it first (and told).
                if await asyncio.to_thread(self.monitor.fire, alert):
                    log.warning("alert", key=f.key, rule=f.rule, severity=f.severity,
                                summary=f.summary)
                    await self.notify("firing", alert)
        for key, alert in firing.items():
            if key not in now_keys and self._answers_for(key, alert.rule) \
                    and await asyncio.to_thread(self.monitor.resolve, key):
                log.info("alert_resolved", key=key, rule=alert.rule)
                await self.notify("resolved", alert)
        return findings

    async def _suspend(self, f: Finding) -> None:
        account = f.key.split(":", 1)[1]
        if await asyncio.to_thread(
                functools.partial(self.monitor.suspend, account, f.summary, "spike detector",
                                  unless_lifted_within=2 * self.cfg.ratelimit.window)):
            log.warning("account_suspended", user=account, reason=f.summary)
            await asyncio.to_thread(self.monitor.audit, "postwarden", "server",
                                    "account suspend", account, {"reason": f.summary})

    async def notify(self, state: str, alert: Alert) -> None:
        ac = self.cfg.alerts
        if ac.webhook:
            payload = {"state": state, "key": alert.key, "rule": alert.rule,
                       "severity": alert.severity, "summary": alert.summary,
                       "detail": alert.detail, "since": alert.since,
                       "host": self.cfg.hostname, "ts": self.clock()}
            try:
                await asyncio.to_thread(post_webhook, ac.webhook, ac.webhook_secret, payload,
                                        ac.webhook_timeout)
                self._count("webhook", state)
            except (OSError, urllib.error.URLError, ValueError) as exc:
                log.error("alert_webhook_failed", key=alert.key, error=str(exc))
        if ac.mail and self.postmaster and self.queue is not None:
            try:
                body = self.queue.new_body()
                body.write(alert_mail(self.cfg.hostname, self.postmaster, state, alert))
                queue_id = await self.queue.commit(
                    body, Envelope(None, recipients=[Recipient(
                        Address.parse_simple(self.postmaster))]),
                    b"", CommitMeta(listener="alerts"))
                log.info("alert_mailed", key=alert.key, state=state, queue_id=queue_id,
                         to=self.postmaster)
                self._count("mail", state)
            except Exception as exc:
                log.error("alert_mail_failed", key=alert.key, error=f"{type(exc).__name__}: "
                                                                   f"{exc}")

    def _count(self, channel: str, state: str) -> None:
        if self.metrics is not None:
            self.metrics.alerts_sent.labels(channel, state).inc()

