"""``postwarden trace``, ``status``, ``audit`` and ``suspend``: follow
messages, see how the server is doing, what administrators did, and which
accounts may not send.

* ``trace [--id QUEUEID] [--message-id ID] [--from A] [--to A] [--since T]
  [--until T] [--limit N] [--json]``: the messages matching every criterion
  given, newest first, each with its full history
  (:mod:`postwarden.observe.trace`).  Times are ISO 8601 (``2026-11-26``,
  ``2026-11-26T09:00``, UTC unless an offset is given) or an age (``2h``,
  ``30m``, ``7d``: that long ago).
* ``status [--json]``: whether the server runs and is ready (its
  ``/readyz`` when ``[admin]`` is on, else the control socket), the queue
  by state, the last hour's deliveries, active alerts, bans and suspensions.
* ``audit [--since T] [--limit N] [--json]``: the audit log.
* ``suspend list|add|lift``: accounts suspended from sending.

Security exposure: administrator only (the data directory is 0700).
Values that came from clients are printed with control characters escaped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from postwarden import config as _config
from postwarden import control
from postwarden.observe import health
from postwarden.observe import trace as trace_mod
from postwarden.storage.factory import has_state, monitor_store, open_reader

Handler = Callable[[_config.Config, argparse.Namespace], int]
_AGE = re.compile(r"\A(\d+(?:\.\d+)?)([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ObserveCommandError(Exception):
    """A command of this module failed (one line, exit status 1)."""


def parse_time(text: str, now: float | None = None) -> float:
    """An ISO 8601 time (UTC unless it says otherwise) or an age ("2h")."""
    value = text.strip()
    m = _AGE.match(value.lower())
    if m:
        return (now if now is not None else time.time()) - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time (e.g. 2026-11-26T09:00, or an age: 30m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _safe(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _need_db(cfg: _config.Config) -> None:
    if not has_state(cfg):
        raise ObserveCommandError(f"no database at {cfg.db_path} (has the server run?)")


# -- trace ---------------------------------------------------------------------------


def cmd_trace(cfg: _config.Config, args: argparse.Namespace) -> int:
    _need_db(cfg)
    q = trace_mod.Query(queue_id=args.id or "", message_id=args.message_id or "",
                        sender=args.sender or "", rcpt=args.rcpt or "",
                        since=args.since, until=args.until, limit=args.limit)
    traces = trace_mod.search(cfg, q)
    if args.json:
        print(json.dumps([t.summary() for t in traces], indent=2))
        return 0
    if not traces:
        print("no matching messages")
        return 1
    for t in traces:
        s = t.summary()
        print(f"{t.queue_id}  from=<{_safe(str(s['sender']))}>"
              + (f"  message-id={_safe(str(s['message_id']))}" if s["message_id"] else ""))
        for e in t.events:
            fields = [f"to=<{_safe(e.rcpt)}>" if e.rcpt else "",
                      f"relay={_safe(e.relay)}" if e.relay else "",
                      f"dsn={e.dsn}" if e.dsn else "",
                      _safe(e.reply) if e.reply else ""]
            print(f"  {_when(e.ts)}  {e.event:<9} " + ", ".join(f for f in fields if f))
            if e.detail:
                print(f"  {'':23}  {'':9} {_safe(e.detail)}")
        print()
    return 0


# -- status --------------------------------------------------------------------------------


def _readyz(cfg: _config.Config) -> dict[str, Any] | None:
    host, port = _config.parse_hostport("admin.address", cfg.admin.address)
    host = {"*": "127.0.0.1", "::": "::1", "0.0.0.0": "127.0.0.1", "localhost": "127.0.0.1"
            }.get(host, host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except urllib.error.HTTPError as exc:  # 503: not ready, with the reasons
        data = json.loads(exc.read() or b"{}")
        return data
    except (OSError, ValueError):
        return None


def status(cfg: _config.Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.admin.enabled:
        ready = _readyz(cfg)
        out["running"] = ready is not None
        out["ready"] = bool(ready and ready.get("ready"))
        out["checks"] = (ready or {}).get("checks", {})
    else:
        out["running"] = control.request(cfg.data_dir, "ping") if cfg.data_dir.exists() \
            else False
        out["ready"] = None
    if has_state(cfg):  # the shared queue on PostgreSQL, from any node
        now = time.time()
        db = open_reader(cfg)
        try:
            out["queue"] = health.queue_state(db, now)
            out["last_hour"] = health.delivery_rates(db, now - 3600)
            out.update(health.protection_state(db, now))
        finally:
            db.close()
        with monitor_store(cfg) as store:
            out["alerts"] = [{"key": a.key, "severity": a.severity, "summary": a.summary,
                              "since": a.since} for a in store.firing().values()]
            out["suspended"] = [a for a, *_ in store.suspensions()]
    return out


def cmd_status(cfg: _config.Config, args: argparse.Namespace) -> int:
    s = status(cfg)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0 if s["running"] else 1
    state = "not running" if not s["running"] else (
        "running, ready" if s["ready"] else "running" if s["ready"] is None
        else "running, NOT READY")
    print(f"server: {state}")
    for name, value in s.get("checks", {}).items():
        print(f"  {name}: {value}")
    if "queue" in s:
        q = s["queue"]
        m, r = q["messages"], q["recipients"]
        print(f"queue: {sum(m.values())} messages ({m['active']} active, {m['held']} held, "
              f"{m['corrupt']} corrupt); recipients {r['queued']} queued, "
              f"{r['deferred']} deferred; oldest {q['oldest_seconds']:.0f}s")
        h = s["last_hour"]
        print(f"last hour: {h['received']} received, {h['delivered']} delivered, "
              f"{h['deferred']} deferred, {h['bounced']} bounced")
        print(f"bans active: {s['bans_active']}; accounts suspended: "
              f"{s['accounts_suspended']}")
        for a in s["alerts"]:
            print(f"ALERT {a['severity']}: {_safe(a['summary'])} (since {_when(a['since'])})")
        for account in s["suspended"]:
            print(f"suspended: {account}")
    return 0 if s["running"] else 1


# -- audit, suspend ------------------------------------------------------------------------


def cmd_audit(cfg: _config.Config, args: argparse.Namespace) -> int:
    _need_db(cfg)
    with monitor_store(cfg) as store:
        entries = store.audit_entries(args.since, args.limit)
    if args.json:
        print(json.dumps([e.__dict__ if hasattr(e, "__dict__") else {
            f: getattr(e, f) for f in e.__slots__} for e in entries], indent=2))
        return 0
    for e in entries:
        print(f"{_when(e.ts)}  {_safe(e.actor):<20} {e.source:<6} {e.action:<22} "
              f"{_safe(e.target)}  {_safe(e.detail)}  {e.result}")
    return 0


def cmd_suspend_list(cfg: _config.Config, args: argparse.Namespace) -> int:
    _need_db(cfg)
    with monitor_store(cfg) as store:
        rows = store.suspensions()
    if not rows:
        print("no suspended accounts")
    for account, reason, since, by in rows:
        print(f"{account}  since {_when(since)}  by {by or 'administrator'}: {_safe(reason)}")
    return 0


def cmd_suspend_add(cfg: _config.Config, args: argparse.Namespace) -> int:
    _need_db(cfg)
    with monitor_store(cfg) as store:
        store.suspend(args.address, args.reason, "administrator")
    print(f"{args.address} may not send (within a second on every process)")
    return 0


def cmd_suspend_lift(cfg: _config.Config, args: argparse.Namespace) -> int:
    _need_db(cfg)
    with monitor_store(cfg) as store:
        if not store.unsuspend(args.address):
            raise ObserveCommandError(f"{args.address} is not suspended")
    print(f"{args.address} may send again")
    return 0


def add_parsers(sub: Any, with_config: Callable[[Handler], Callable[[argparse.Namespace], int]]
                ) -> None:
    sp = sub.add_parser("trace", help="find messages and show their history")
    sp.add_argument("--id", help="queue id")
    sp.add_argument("--message-id", help="Message-ID header field")
    sp.add_argument("--from", dest="sender", metavar="ADDRESS", help="envelope sender")
    sp.add_argument("--to", dest="rcpt", metavar="ADDRESS", help="recipient")
    sp.add_argument("--since", type=parse_time, metavar="TIME",
                    help="ISO time (UTC) or age such as 2h")
    sp.add_argument("--until", type=parse_time, metavar="TIME")
    sp.add_argument("--limit", type=int, default=trace_mod.DEFAULT_LIMIT,
                    help="at most this many messages (newest first)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=with_config(cmd_trace))

    sp = sub.add_parser("status", help="is the server running and ready; queue, deliveries, "
                                       "alerts")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=with_config(cmd_status))

    sp = sub.add_parser("audit", help="the log of administrative actions")
    sp.add_argument("--since", type=parse_time, metavar="TIME")
    sp.add_argument("--limit", type=int, default=200)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=with_config(cmd_audit))

    susp = sub.add_parser("suspend", help="accounts suspended from sending").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    susp.add_parser("list", help="list suspended accounts").set_defaults(
        func=with_config(cmd_suspend_list))
    sp = susp.add_parser("add", help="suspend an account from sending")
    sp.add_argument("address")
    sp.add_argument("--reason", default="suspended by the administrator")
    sp.set_defaults(func=with_config(cmd_suspend_add))
    sp = susp.add_parser("lift", help="let a suspended account send again")
    sp.add_argument("address")
    sp.set_defaults(func=with_config(cmd_suspend_lift))
