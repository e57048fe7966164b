"""Composition root: builds every object explicitly and runs the service.

:class:`Server` wires config -> storage (queue store, directory) -> policy
-> TLS contexts -> listeners and the queue runner, starts them, and stops
them in the reverse order.  :func:`serve` runs a server until SIGTERM/SIGINT;
SIGHUP reloads the TLS certificate without dropping connections.

Security exposure: decides what listens where.  Nothing listens that the
config does not name; submission listeners refuse to start without TLS
(checked by :mod:`postwarden.config`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from postwarden import __version__
from postwarden.auth import password_policy
from postwarden.auth.credentials import CredentialVerifier, used_app_password
from postwarden.auth.passwords import hash_password
from postwarden.config import Config, ConfigError
from postwarden.config import load as load_config
from postwarden.control import ControlServer
from postwarden.delivery.dane import Dane
from postwarden.delivery.dns import Resolver
from postwarden.delivery.maildir import MaildirDelivery, MaildirTransport
from postwarden.delivery.mta_sts import MtaSts
from postwarden.delivery.remote import LmtpTransport, SmtpTransport
from postwarden.delivery.router import Router
from postwarden.delivery.smtp_client import client_tls_context
from postwarden.delivery.transport import Transport
from postwarden.filter.service import filter_service
from postwarden.message.convert import downgrade_to_7bit
from postwarden.observe import alerts as alerts_mod
from postwarden.observe import audit, health
from postwarden.observe import log as logmod
from postwarden.observe import metrics as metrics_mod
from postwarden.observe.log import get_logger
from postwarden.policy import (
    Stage,
    access,
    bans,
    connlimit,
    default_policy,
    dnsbl,
    greylist,
    ratelimit,
)
from postwarden.policy.connlimit import ConnectionTable
from postwarden.policy.dmarc import default_psl
from postwarden.queue import handover
from postwarden.queue.runner import HandOver, QueueRunner
from postwarden.smtp.listener import Listener
from postwarden.smtp.session import ServerContext
from postwarden.smtp.steering import Acceptor, ProcessLoad, create_block
from postwarden.smtp.tls import TlsContexts
from postwarden.storage import migrate
from postwarden.storage.base import QueuedMessage
from postwarden.storage.factory import (
    admin_store,
    monitor_store,
    open_quarantine,
    queue_store,
    signing_keys,
)
from postwarden.storage.sqlite_directory import SqliteDirectory
from postwarden.storage.sqlite_protect import SqliteProtectStore
from postwarden.storage.sqlite_quarantine import QuarantineStore
from postwarden.workers import (
    WorkerArgs,
    WorkerPool,
    connection_table,
    die_with_parent,
    process_count,
)

if TYPE_CHECKING:
    from postwarden.policy.bans import ProtectStore
    from postwarden.policy.greylist import GreylistStore
    from postwarden.storage.factory import AnyMonitorStore, AnyQueueStore

log = get_logger("app")

# Answers kept by the shared resolver (for their TTL).
DNS_CACHE_ENTRIES = 20000


class Server:
    """A whole postwarden instance, startable and stoppable in-process."""

    def __init__(self, config: Config, *, processes: int = 1,
                 worker: WorkerArgs | None = None,
                 conn_table: ConnectionTable | None = None) -> None:
        """``processes``: how many processes accept mail; ``worker``: this
        is a worker process, with these inherited sockets; ``conn_table``:
        the connection counts shared among the processes (see workers.py)."""
        self.config = config
        self.processes = processes
        self.worker = worker
        self.conn_table = conn_table
        # Which process takes a new connection (smtp/steering.py): each
        # publishes its load in a block the main process makes, and accepts
        # by all of them.
        self.load: ProcessLoad | None = None
        self.acceptor: Acceptor | None = None
        self.steering_fd = -1
        if worker is not None:
            self.load = ProcessLoad(worker.steering_fd, worker.slot)
        elif processes > 1:
            self.steering_fd = create_block(processes)
            self.load = ProcessLoad(self.steering_fd, 0)
        if self.load is not None:
            self.acceptor = Acceptor(self.load)
        self.listeners: list[Listener] = []
        self.runner: QueueRunner | None = None
        self.store: AnyQueueStore | None = None
        self.directory: SqliteDirectory | None = None
        self.directory_replica: Any = None  # pg_directory.DirectoryReplica (PostgreSQL)
        self.dkim_replica: Any = None  # pg_dkim.DkimReplica (PostgreSQL)
        self.tls = TlsContexts(config.tls)
        self.control: ControlServer | None = None
        self.greylist: GreylistStore | None = None
        self.protect: ProtectStore | None = None
        self.quarantine: QuarantineStore | None = None
        self.http: Any = None  # postwarden.onboard.web.HttpService when [http] enabled
        self.admin: Any = None  # the same for [admin] (postwarden.observe.admin)
        self.metrics: Any = metrics_mod.NULL_METRICS
        self.monitor: AnyMonitorStore | None = None
        self.alerts: alerts_mod.AlertEngine | None = None
        self._stopped = asyncio.Event()

    def port(self, name: str) -> int:
        for lst in self.listeners:
            if lst.config.name == name:
                return lst.port
        raise KeyError(name)

    async def start(self) -> None:
        cfg = self.config
        for d in (cfg.data_dir, cfg.spool_dir, cfg.mail_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A schema from a newer postwarden is refused; an older one is backed
        # up, then upgraded (postwarden.storage.migrate).
        if self.worker is None:  # the main process migrated before starting workers
            await asyncio.to_thread(migrate.prepare, cfg)
        if cfg.storage.postgres:  # a cache of the shared directory
            from postwarden.storage.pg_directory import cache_directory

            self.directory = cache_directory(cfg.data_dir, cfg.domains)
        else:
            self.directory = SqliteDirectory(cfg.db_path, cfg.domains)
        # [storage] backend: SQLite (default) or PostgreSQL shared by nodes.
        self.store = queue_store(cfg, node=self.worker is None)
        self.store.events_keep = cfg.trace.retention
        await self.store.start()
        if cfg.storage.postgres:
            from postwarden.storage.pg_directory import DirectoryReplica
            from postwarden.storage.pg_queue import PgQueueStore

            assert isinstance(self.store, PgQueueStore)
            self.directory_replica = DirectoryReplica(self.store.pool, self.directory)
            await self.directory_replica.start()
            if cfg.dkim.sign and self.worker is None:  # the node's copy of the shared keys
                from postwarden.storage.pg_dkim import DkimReplica

                self.dkim_replica = DkimReplica(self.store.pool, signing_keys(cfg))
                await self.dkim_replica.start()
        # Metrics: shared among the processes when there are several
        # (PROMETHEUS_MULTIPROC_DIR, set by serve()).
        metrics = self.metrics = metrics_mod.Metrics(multiprocess=self.processes > 1)
        if self.worker is None and not cfg.storage.postgres:
            metrics.collectors.append(metrics_mod.StateCollector(
                lambda: health.state_gauges(cfg.db_path)))
        elif self.worker is None:  # the shared queue, and this node's leases
            from postwarden.storage.pg_queue import PgQueueStore, node_gauges

            assert isinstance(self.store, PgQueueStore)
            metrics.collectors.append(metrics_mod.StateCollector(
                functools.partial(node_gauges, self.store, self._monitor_state)))
        resolver = Resolver(cfg.dns, dnssec=cfg.delivery.dane.dnssec_trust_ad,
                            cache=DNS_CACHE_ENTRIES)
        resolver.observe = metrics.dns_lookup
        policy = default_policy()
        # Protection first: access lists, then connection limits (both go to
        # the front of the connect stage; an allowed client skips the rest).
        self.connlimit = connlimit.install(policy, cfg.connections, self.conn_table,
                                           self.processes)
        self.access = access.install(policy, cfg)
        # Account hygiene: an expired account password is refused (535 5.7.8).
        policy.register(Stage.AUTH, password_policy.expiry_check(
            cfg.passwords, self.directory.password_changed, used_app_password))
        # Bans (refused at connect, before any DNS lookup), brute-force and
        # harvest counters, rate limits: state shared in the database.
        pg_pool = None
        if cfg.storage.postgres:  # shared by the nodes
            from postwarden.storage.pg_protect import PgProtectStore
            from postwarden.storage.pg_queue import PgQueueStore

            assert isinstance(self.store, PgQueueStore)
            pg_pool = self.store.pool
            self.protect = PgProtectStore(pg_pool)
        else:
            self.protect = SqliteProtectStore(cfg.db_path)
        bans.install(policy, self.protect, cfg.bans)
        ratelimit.install(policy, self.protect, cfg.ratelimit)
        # Accounts suspended by the spike detector or the administrator
        # (first MAIL check, before the rate limits); shared by the nodes on
        # PostgreSQL.
        self.monitor = await asyncio.to_thread(functools.partial(monitor_store, cfg,
                                                                   server=True))
        alerts_mod.install_suspension(policy, self.monitor)
        # Screening: DNSBL/DNSWL at connect, greylisting at RCPT (both optional).
        listed = dnsbl.install(policy, cfg.dnsbl, resolver)
        self.greylist = greylist.install(policy, cfg, pg_pool)
        ctx = ServerContext(config=cfg, tls=self.tls, directory=self.directory,
                            queue=self.store, policy=policy,
                            verify_password=CredentialVerifier(
                                self.directory.app_password_hashes),
                            resolver=resolver,
                            dkim_keys=signing_keys(cfg) if cfg.dkim.sign else None,
                            dummy_hash=await asyncio.to_thread(hash_password, os.urandom(16).hex()),
                            metrics=metrics)
        self.quarantine = open_quarantine(cfg)  # [storage] backend
        ctx.filters = filter_service(cfg, self.store, self.quarantine, listed)
        if ctx.filters is not None:
            ctx.filters.on_verdict = metrics.filter_verdict
        if cfg.admin.enabled and cfg.admin.web:
            # Feedback reports become complaints on the accounts' webhooks.
            from postwarden.web.complaints import Complaints

            ctx.complaints = Complaints(self.store, admin_store(cfg), metrics)
        self.context = ctx
        if cfg.checks.verify:
            # DMARC's organisational domains: read the Public Suffix List now,
            # not while the first message waits.
            await asyncio.to_thread(default_psl)
        if self.worker is not None:
            # Deliveries are the main process's: hand it what we commit.
            sender = handover.Sender(self.worker.notify_fd)
            if isinstance(self.store, HandOver):
                self.store.on_queued.append(sender.message)
            else:  # a shared queue: the main process claims it by a scan
                self.store.on_commit.append(sender.wake)
        elif cfg.queue.workers > 0:  # workers = 0: an accept-only node
            router = Router(self.directory.is_local_domain, self.directory.resolve,
                            cfg.delivery)
            mta_sts = MtaSts.from_settings(
                cfg.delivery.mta_sts, resolver, cfg.data_dir,
                ssl_context=client_tls_context("verify", cfg.delivery.ca_file))
            smtp = SmtpTransport(cfg.hostname, cfg.delivery, resolver,
                                 downgrade=downgrade_to_7bit, mx_port=cfg.delivery.mx_port,
                                 mta_sts=mta_sts,
                                 dane=Dane.from_settings(cfg.delivery.dane, resolver))
            transports: dict[str, Transport] = {
                "maildir": MaildirTransport(MaildirDelivery(cfg.mail_dir), router.mailboxes),
                "smtp": smtp,
                "mx": smtp,
                "lmtp": LmtpTransport(cfg.hostname, cfg.delivery, downgrade=downgrade_to_7bit),
            }
            measured = {kind: metrics_mod.MeasuredTransport(t, kind, metrics)
                        for kind, t in transports.items()}
            self.runner = QueueRunner(self.store, router, measured, cfg.queue,
                                      hostname=cfg.hostname)
            self.runner.on_results.append(metrics_mod.residence_hook(metrics))
            if self.load is not None:
                self.runner.on_load = self.load.delivering
            await self.runner.start()
        if self.worker is None:
            self.control = ControlServer(cfg.data_dir, self.wake)
            await self.control.start()
        inherited = self.worker.adopt() if self.worker is not None else {}
        try:
            for lc in cfg.listeners:
                if not lc.enabled:
                    continue
                if self.worker is not None and lc.name not in inherited:
                    continue
                lst = Listener(lc, ctx, inherited.get(lc.name), acceptor=self.acceptor,
                               load=self.load)
                await lst.start()
                self.listeners.append(lst)
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"listeners.{lc.name}.address",
                              f"cannot listen on {lc.host}:{lc.port}: {exc.strerror}") from None
        if cfg.http.enabled and self.worker is None:  # the main process serves HTTP
            await self._start_http()
        if self.worker is None:
            await self._start_monitoring(resolver)
        log.info("ready", version=__version__, hostname=cfg.hostname, pid=os.getpid(),
                 worker=self.worker.slot if self.worker is not None else None,
                 listeners={lst.config.name: lst.port for lst in self.listeners})

    def _monitor_state(self) -> dict[str, Any]:
        """The shared suspensions and alerts, counted (``/metrics`` on
        PostgreSQL; called in a thread)."""
        from postwarden.storage.pg_monitor import PgMonitorStore

        if not isinstance(self.monitor, PgMonitorStore):  # not started, or stopping
            return {"accounts_suspended": 0, "alerts_firing": {"warning": 0, "critical": 0}}
        return self.monitor.state()

    async def _start_http(self) -> None:
        """The autoconfiguration / MTA-STS web listener (imported only when on)."""
        from postwarden.onboard.web import HttpService

        assert self.directory is not None
        self.http = HttpService(self.config, self.directory.is_local_domain,
                                lambda: {lst.config.name: lst.port for lst in self.listeners})
        try:
            await self.http.start()
        except ConfigError:
            self.http = None
            await self.stop()
            raise

    async def _start_monitoring(self, resolver: Resolver) -> None:
        """Main process: the admin listener, the alert rules, and an audit
        entry when the config file changed since the last start."""
        cfg = self.config
        assert self.monitor is not None
        # (Nodes sharing the audit log on PostgreSQL: each its own file.)
        await asyncio.to_thread(audit.config_loaded, self.monitor, cfg.path,
                                cfg.hostname if cfg.storage.postgres else "")
        if cfg.alerts.enabled:
            self.alerts = alerts_mod.AlertEngine(cfg, self.monitor, self.store, resolver,
                                                 self.metrics)
            await self.alerts.start()
        if cfg.admin.enabled:
            from postwarden.observe.admin import build_admin_app
            from postwarden.onboard.web import HttpService

            admin = HttpService(cfg, _no_domain, app=build_admin_app(self), key="admin.address")
            try:
                await admin.start()
            except ConfigError:
                await self.stop()
                raise
            self.admin = admin

    def wake(self) -> None:
        """Look for due deliveries now (``queue flush`` over the control socket)."""
        if self.runner is not None:
            self.runner.wake()

    def hand_over(self, msg: QueuedMessage) -> None:
        """A message a worker process committed: deliver it now."""
        if self.runner is not None:
            self.runner.hand_over(msg)

    def reload(self) -> None:
        """SIGHUP: pick up a renewed certificate; sessions in progress go on."""
        self.tls.reload()
        self._reload_protection()

    def _reload_protection(self) -> None:
        """SIGHUP: the config file's [access] and [connections], and the
        access entries of the database."""
        if not hasattr(self, "access"):
            return
        try:
            fresh = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            fresh = None
        self.access.reload(fresh.access if fresh is not None else None)
        if fresh is not None:
            self.connlimit.settings = fresh.connections

    async def stop(self, grace: float = 10.0) -> None:
        if hasattr(self, "context"):
            self.context.shutting_down = True
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.alerts is not None:
            await self.alerts.stop()
            self.alerts = None
        for lst in self.listeners:
            await lst.close()
        await asyncio.gather(*(lst.stop(grace) for lst in self.listeners))
        self.listeners.clear()
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.runner is not None:
            await self.runner.stop(self.config.queue.shutdown_timeout)
            self.runner = None
        if hasattr(self, "context") and self.context.complaints is not None:
            await self.context.complaints.close()
            self.context.complaints = None
        if self.directory_replica is not None:
            await self.directory_replica.stop()
            self.directory_replica = None
        if self.dkim_replica is not None:
            await self.dkim_replica.stop()
            self.dkim_replica = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.directory is not None:
            self.directory.close()
            self.directory = None
        if self.greylist is not None:
            self.greylist.close()
            self.greylist = None
        if self.protect is not None:
            self.protect.close()
            self.protect = None
        if self.quarantine is not None:
            self.quarantine.close()
            self.quarantine = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if hasattr(self, "access"):
            self.access.close()
        log.info("stopped")


async def _no_domain(_: str) -> bool:
    return False


# Seconds sessions in progress get to finish on SIGTERM.
SHUTDOWN_GRACE = 10.0


async def _run(config: Config, worker: WorkerArgs | None) -> int:
    processes = process_count(config.processes)
    table: ConnectionTable | None = None
    table_fd = -1
    if worker is not None:
        table = worker.table()
    elif processes > 1:
        table, table_fd = connection_table(processes)
    server = Server(config, processes=processes, worker=worker, conn_table=table)
    loop = asyncio.get_running_loop()
    logmod.background_writes(True)
    pool: WorkerPool | None = None
    stop = asyncio.Event()
    try:
        await server.start()
        if worker is None and table is not None:
            pool = WorkerPool(config.path, processes - 1,
                              {lst.config.name: lst.fds for lst in server.listeners},
                              server.wake, grace=SHUTDOWN_GRACE, table=table,
                              table_fd=table_fd,
                              steering_fd=server.steering_fd,
                              on_vacated=server.load.vacate if server.load else None,
                              on_exit=metrics_mod.process_dead,
                              on_message=server.hand_over)
            await pool.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def reload() -> None:
            server.reload()
            if pool is not None:
                pool.reload()

        loop.add_signal_handler(signal.SIGHUP, reload)
        if worker is not None:
            orphan = asyncio.create_task(_exit_with_parent(worker.main_pid, stop))
        await stop.wait()
        log.info("shutdown")
        if pool is not None:
            await asyncio.gather(server.stop(SHUTDOWN_GRACE), pool.stop())
        else:
            await server.stop(SHUTDOWN_GRACE)
        if worker is not None:
            orphan.cancel()
        return 0
    finally:
        logmod.background_writes(False)


async def _exit_with_parent(parent: int, stop: asyncio.Event) -> None:
    """A worker whose main process died stops too (it would otherwise go on
    accepting on the inherited sockets): at once by the SIGTERM the kernel
    sends (see serve()), else when it finds itself orphaned."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    stop.set()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (a faster event loop on libuv), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(config: Config, worker: WorkerArgs | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code.  ``worker``: run as
    a worker process of a main ``serve`` (see workers.py)."""
    if worker is not None:
        die_with_parent(worker.main_pid)
    stream = sys.stderr
    if config.log.file is not None:
        config.log.file.parent.mkdir(parents=True, exist_ok=True)
        stream = open(config.log.file, "a", encoding="utf-8")  # noqa: SIM115
    logmod.configure(config.log.format, config.log.level, stream)
    if process_count(config.processes) > 1:
        # Before prometheus_client is imported (observe/metrics.py).
        metrics_mod.prepare_multiprocess(config.data_dir, main=worker is None)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(_run(config, worker))
    except ConfigError as exc:
        print(f"postwarden: config error: {exc}", file=sys.stderr)
        return 1
    except migrate.SchemaError as exc:
        print(f"postwarden: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            if stream is not sys.stderr:
                stream.close()
