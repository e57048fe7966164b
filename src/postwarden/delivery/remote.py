"""Outbound transports: SMTP to MX hosts or a configured relay, and LMTP.

:class:`SmtpTransport` delivers a :class:`~postwarden.delivery.transport.DeliveryJob`
whose next hop is ``mx`` (the MX hosts of the recipient domain), ``smtp:host``
(the MX hosts of ``host``) or ``smtp:[host]:port`` (exactly that host).  It
tries the hosts best first, and each host's addresses in turn (RFC 5321 5.1),
until every recipient has a final answer:

* a connection failure, a 4xx/5xx greeting or EHLO, a TLS failure under
  ``encrypt``/``verify`` or a lost connection moves on to the next address;
* a recipient deferred by one host (RCPT 4xx, DATA 4xx) is offered to the
  next one, as Postfix does; a 5xx for a recipient, or a delivery, is final;
* under ``may`` a failed TLS handshake is retried on the same host in
  plaintext (as Postfix does);
* at most :data:`MAX_ADDRESSES` addresses and :data:`MAX_SESSIONS` sessions
  per delivery (Postfix's ``smtp_mx_address_limit``/``smtp_mx_session_limit``).

The TLS policy is the smarthost's for the smarthost, otherwise the
strictest ``[tls_policy]`` of the recipients' domains (default
``[delivery] tls``).  Two published policies override it, per MX host, the
first that applies (:meth:`SmtpTransport._host_tls`):

1. DANE (RFC 7672, :mod:`postwarden.delivery.dane`): the host has
   DNSSEC-authenticated TLSA records; TLS is required and the certificate
   must match them;
2. MTA-STS (RFC 8461, :mod:`postwarden.delivery.mta_sts`) of the recipient
   domain, for ``mx`` next hops: ``enforce`` skips MX hosts the policy does
   not list and requires TLS verified for the host name (``verify``);
   ``testing`` tries ``verify`` first and, when that fails, logs it and
   delivers under the configured policy.

A failure under either defers (4.7.5); it is never downgraded.
Connections are capped at ``max_connections`` in all and
``max_per_destination`` per next hop.

:class:`LmtpTransport` delivers ``lmtp:`` next hops (TCP or a unix socket).

Neither raises for a delivery problem: every failure is a
:class:`~postwarden.delivery.result.DeliveryResult`, temporary unless proven
permanent.

Security exposure: the recipient domain (untrusted) selects the servers
through DNS; answers are bounded (:mod:`postwarden.delivery.dns`).  The
smarthost password is sent only to the smarthost's next hop, only over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from postwarden.config import DeliveryConfig
from postwarden.delivery.connection_cache import ConnectionCache
from postwarden.delivery.dane import Dane, DaneTemporary
from postwarden.delivery.dns import DnsError, Resolver, is_ip
from postwarden.delivery.mta_sts import MtaSts, Policy
from postwarden.delivery.result import DeliveryResult, DeliveryStatus
from postwarden.delivery.router import domain_of
from postwarden.delivery.smtp_client import (
    Peer,
    SessionError,
    SessionOptions,
    SmtpClient,
    StaleConnection,
    client_tls_context,
)
from postwarden.delivery.smtp_transaction import Transaction
from postwarden.delivery.transport import SMTP_PORT, DeliveryJob, Nexthop
from postwarden.observe.log import get_logger

log = get_logger("remote")

MAX_ADDRESSES = 5
MAX_SESSIONS = 2
# Strictness of the TLS policies, to pick the strictest of several domains.
TLS_STRENGTH = {"none": 0, "may": 1, "encrypt": 2, "verify": 3}
# "452 4.5.3 too many recipients": the rest go in another transaction.
TOO_MANY_RECIPIENTS = "4.5.3"

Downgrade = Callable[[bytes], bytes]


def strictest(policies: Iterable[str]) -> str:
    return max(policies, key=lambda p: TLS_STRENGTH.get(p, 3), default="may")


@dataclasses.dataclass(frozen=True, slots=True)
class TlsPlan:
    """What the published policies say about one destination: the
    recipient domain's MTA-STS policy (``mx`` next hops only) and whether
    its MX hosts may use DANE (the MX answer was authenticated, or the host
    came from the configuration)."""

    domain: str
    sts: Policy | None = None
    dane: bool = False


HostTls = tuple[SessionOptions, SessionOptions | None]


class ConnectionLimiter:
    """At most ``total`` connections, and ``per_destination`` per next-hop key."""

    def __init__(self, total: int, per_destination: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_destination = per_destination
        self._destinations: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self.active = 0

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        sem, users = self._destinations.get(key, (None, 0))
        if sem is None:
            sem = asyncio.Semaphore(self._per_destination)
        self._destinations[key] = (sem, users + 1)
        try:
            async with sem, self._total:
                self.active += 1
                try:
                    yield
                finally:
                    self.active -= 1
        finally:
            sem, users = self._destinations[key]
            if users <= 1:
                del self._destinations[key]  # no unbounded growth
            else:
                self._destinations[key] = (sem, users - 1)


async def run_session(peer: Peer, options: SessionOptions, job: DeliveryJob,
                      indices: Sequence[int], limiter: ConnectionLimiter,
                      downgrade: Downgrade | None, cache: ConnectionCache | None = None,
                      ) -> dict[int, DeliveryResult] | SessionError:
    """One connection: open (or take one from ``cache``), one transaction
    (more after "too many recipients"), close (or give it back to
    ``cache``).  Results by recipient index, or why it failed."""
    async with limiter.slot(job.nexthop.key):
        key = cache.key(peer, options) if cache is not None else None
        while True:
            client = await cache.take(key) if cache is not None else None
            reused = client is not None
            if client is None:
                client = SmtpClient(peer, options, downgrade)
            kept = False
            try:
                if not reused:
                    await client.open()
                out: dict[int, DeliveryResult] = {}
                todo = list(indices)
                while todo:
                    results = await client.send(Transaction.from_job(job, todo))
                    out.update(zip(todo, results, strict=True))
                    progressed = any(r.status is DeliveryStatus.DELIVERED for r in results)
                    todo = [i for i, r in zip(todo, results, strict=True)
                            if r.status is DeliveryStatus.DEFERRED
                            and r.dsn == TOO_MANY_RECIPIENTS]
                    if not progressed or not client.usable:
                        break
                kept = cache is not None and cache.put(key, client)
                return out
            except StaleConnection:
                # Only the first transaction on a cached connection can
                # raise it: nothing counted; the next cached one, or a new one.
                continue
            except SessionError as exc:
                return exc
            finally:
                if not kept:
                    await client.close()


class SmtpTransport:
    """Remote delivery over SMTP (see the module docstring)."""

    def __init__(self, hostname: str, delivery: DeliveryConfig, resolver: Resolver,
                 downgrade: Downgrade | None = None, *, mx_port: int = SMTP_PORT,
                 mta_sts: MtaSts | None = None, dane: Dane | None = None) -> None:
        # ``mx_port``: the port of MX hosts; 25 except in loopback test networks.
        self.mx_port = mx_port
        # Published TLS policies (module docstring); None: not used.
        self.mta_sts = mta_sts
        self.dane = dane if dane is not None and dane.active else None
        self.helo_name = delivery.helo_name or hostname
        self.delivery = delivery
        self.resolver = resolver
        self.downgrade = downgrade
        self.limiter = ConnectionLimiter(delivery.max_connections,
                                         delivery.max_per_destination)
        self.cache = ConnectionCache(delivery.connection_cache_time)
        self._contexts: dict[str, ssl.SSLContext | None] = {}

    async def close(self) -> None:
        """QUIT the cached connections (at shutdown)."""
        await self.cache.close()

    def _tls_context(self, policy: str) -> ssl.SSLContext | None:
        if policy not in self._contexts:
            self._contexts[policy] = client_tls_context(policy, self.delivery.ca_file)
        return self._contexts[policy]

    def _options(self, policy: str, credentials: tuple[str, str] | None) -> SessionOptions:
        d = self.delivery
        return SessionOptions(self.helo_name, policy, self._tls_context(policy), credentials,
                              lmtp=False, chunking=d.chunking,
                              connect_timeout=d.connect_timeout,
                              greeting_timeout=d.greeting_timeout,
                              command_timeout=d.command_timeout, data_timeout=d.data_timeout)

    async def deliver(self, job: DeliveryJob) -> list[DeliveryResult]:
        """One result per ``job.recipients`` entry, in order; never raises."""
        try:
            return await self._deliver(job)
        except Exception as exc:
            log.error("delivery_error", queue_id=job.message.queue_id,
                      nexthop=job.nexthop.key, error=repr(exc))
            return [DeliveryResult.deferred("4.3.0", "internal error during delivery")
                    ] * len(job.recipients)

    async def _deliver(self, job: DeliveryJob) -> list[DeliveryResult]:
        n = len(job.recipients)
        if not n:
            return []
        hop = job.nexthop
        smarthost = self.delivery.smarthost
        credentials = None
        if smarthost is not None and hop.key == smarthost.nexthop.key:
            policy = smarthost.tls
            if smarthost.username:
                credentials = (smarthost.username, smarthost.password)
        else:
            policy = strictest(self.delivery.policy_for(domain_of(r.address))
                               for r in job.recipients)
        try:
            options = self._options(policy, credentials)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls_context_failed", policy=policy, error=str(exc))
            return [DeliveryResult.deferred("4.7.5", "cannot set up TLS (trust store)")] * n

        if hop.kind not in ("mx", "smtp"):
            return [DeliveryResult.deferred("4.3.5", f"next hop {hop} is not SMTP")] * n
        lookup_mx = hop.kind == "mx" or hop.mx_lookup
        port = self.mx_port if hop.kind == "mx" else hop.port or SMTP_PORT
        domain = hop.host or (domain_of(job.recipients[0].address) if n else "")
        implicit = False
        # RFC 7672 2.2.2: DANE needs an authenticated MX answer; a host
        # named in the configuration is as trusted as the configuration.
        dane = self.dane is not None
        if lookup_mx:
            try:
                answer = await self.resolver.lookup_mx(domain)
            except DnsError as exc:
                # Only the recipient's own domain can prove a recipient
                # wrong; a configured relay that is missing is our problem.
                if exc.permanent and hop.kind == "mx":
                    return [DeliveryResult.failed(exc.dsn, exc.text)] * n
                return [DeliveryResult.deferred("4.4.3", exc.text)] * n
            hosts, implicit = list(answer.hosts), answer.implicit
            dane = dane and answer.authenticated
        else:
            hosts = [domain]
        sts = None
        if self.mta_sts is not None and hop.kind == "mx":
            sts = await self.mta_sts.policy_for(domain)
            if sts is not None and sts.mode == "none":
                sts = None
        plan = TlsPlan(domain, sts, dane) if sts is not None or dane else None
        return await self._try_hosts(job, hosts, port, options, implicit and hop.kind == "mx",
                                     plan)

    async def _host_tls(self, host: str, port: int, options: SessionOptions,
                        plan: TlsPlan | None, secure: bool) -> HostTls | DeliveryResult:
        """The session options for ``host`` (and, under MTA-STS testing, the
        ones to fall back to after a TLS failure), or why not to use it.
        ``secure``: its address records were DNSSEC-authenticated."""
        if plan is None:
            return options, None
        try:
            if plan.dane and secure and self.dane is not None:
                try:
                    tlsa = await self.dane.lookup(host, port)
                except DaneTemporary as exc:
                    return DeliveryResult.deferred(exc.dsn, exc.text)
                if tlsa is not None:
                    log.info("tls_policy", host=host, source="dane",
                             usable_records=len(tlsa.records))
                    check = tlsa.checker(host) if tlsa.records else None
                    return dataclasses.replace(options, tls="encrypt",
                                               tls_context=self._tls_context("encrypt"),
                                               peer_check=check), None
            sts = plan.sts
            if sts is None:
                return options, None
            if not sts.matches(host):
                if sts.enforced:
                    return DeliveryResult.deferred(
                        "4.7.5", f"MX host {host} is not allowed by the MTA-STS policy of "
                                 f"{plan.domain}")
                log.warning("mta_sts_testing_failure", domain=plan.domain, host=host,
                            reason="MX host not in the policy")
                return options, None
            verify = dataclasses.replace(options, tls="verify",
                                         tls_context=self._tls_context("verify"))
        except (OSError, ssl.SSLError) as exc:
            log.error("tls_context_failed", policy="verify", error=str(exc))
            return DeliveryResult.deferred("4.7.5", "cannot set up TLS (trust store)")
        log.info("tls_policy", host=host, source="mta-sts", mode=sts.mode)
        if sts.enforced:
            return verify, None
        if options.tls in ("none", "verify"):  # testing: nothing to find out
            return options, None
        return verify, options

    async def _try_hosts(self, job: DeliveryJob, hosts: list[str], port: int,
                         options: SessionOptions, implicit_mx: bool,
                         plan: TlsPlan | None = None) -> list[DeliveryResult]:
        n = len(job.recipients)
        final: list[DeliveryResult | None] = [None] * n
        pending = list(range(n))
        last_for: dict[int, DeliveryResult] = {}
        last = DeliveryResult.deferred("4.4.3", "no mail host found")
        tried = sessions = 0
        for host in hosts:
            if not pending or tried >= MAX_ADDRESSES or sessions >= MAX_SESSIONS:
                break
            try:
                if plan is not None and plan.dane:
                    addresses, secure = await self.resolver.addresses_secure(host)
                else:
                    addresses, secure = await self.resolver.addresses(host), False
            except DnsError as exc:
                last = DeliveryResult.deferred("4.4.3", exc.text)
                continue
            if not addresses:
                if implicit_mx:  # RFC 5321 5.1: no MX and no address: no mail
                    last = DeliveryResult.failed("5.1.2", f"domain {host} has no MX or "
                                                          "address records")
                else:
                    last = DeliveryResult.deferred("4.4.3", f"host {host} has no address "
                                                            "records")
                continue
            host_tls = await self._host_tls(host, port, options, plan, secure)
            if isinstance(host_tls, DeliveryResult):
                last = host_tls
                log.info("host_skipped", queue_id=job.message.queue_id, host=host,
                         reason=host_tls.text)
                continue
            host_options, testing_fallback = host_tls
            for address in addresses:
                if not pending or tried >= MAX_ADDRESSES or sessions >= MAX_SESSIONS:
                    break
                tried += 1
                peer = Peer(host, address, port)
                used = host_options
                outcome = await run_session(peer, used, job, pending, self.limiter,
                                            self.downgrade, self.cache)
                if (testing_fallback is not None and isinstance(outcome, SessionError)
                        and (outcome.tls_failed or outcome.dsn == "4.7.5")):
                    # MTA-STS testing (RFC 8461 5): report, deliver as usual.
                    log.warning("mta_sts_testing_failure", relay=peer.relay,
                                reason=outcome.text)
                    used = testing_fallback
                    outcome = await run_session(peer, used, job, pending, self.limiter,
                                                self.downgrade, self.cache)
                if (isinstance(outcome, SessionError) and outcome.tls_failed
                        and used.tls == "may"):
                    # Opportunistic TLS that fails is retried without (Postfix).
                    log.info("tls_fallback", relay=peer.relay, reason=outcome.text)
                    plain = dataclasses.replace(used, tls="none", tls_context=None)
                    outcome = await run_session(peer, plain, job, pending, self.limiter,
                                                self.downgrade, self.cache)
                if isinstance(outcome, SessionError):
                    if outcome.dsn != "4.4.1":
                        sessions += 1  # it got past connecting
                    last = outcome.result(peer.relay)
                    log.info("session_failed", queue_id=job.message.queue_id,
                             relay=peer.relay, dsn=outcome.dsn, reason=outcome.text)
                    if outcome.permanent:
                        pending = self._settle(final, pending, last)
                    continue
                sessions += 1
                for i, result in outcome.items():
                    if result.status is DeliveryStatus.DEFERRED:
                        last_for[i] = result
                    else:
                        final[i] = result
                pending = [i for i in pending if final[i] is None]
        return [final[i] or last_for.get(i) or last for i in range(n)]

    @staticmethod
    def _settle(final: list[DeliveryResult | None], pending: list[int],
                result: DeliveryResult) -> list[int]:
        for i in pending:
            final[i] = result
        return []


class LmtpTransport:
    """Delivery to an LMTP server (RFC 2033): ``lmtp:unix:/path`` or
    ``lmtp:[host]:port``; one reply per recipient after the data."""

    def __init__(self, hostname: str, delivery: DeliveryConfig,
                 downgrade: Downgrade | None = None) -> None:
        d = delivery
        self.options = SessionOptions(d.helo_name or hostname, "none", None, None, lmtp=True,
                                      connect_timeout=d.connect_timeout,
                                      greeting_timeout=d.greeting_timeout,
                                      command_timeout=d.command_timeout,
                                      data_timeout=d.data_timeout)
        self.downgrade = downgrade
        self.limiter = ConnectionLimiter(d.max_connections, d.max_per_destination)

    async def deliver(self, job: DeliveryJob) -> list[DeliveryResult]:
        """One result per ``job.recipients`` entry, in order; never raises."""
        n = len(job.recipients)
        try:
            peers = await self._peers(job.nexthop)
        except OSError as exc:
            return [DeliveryResult.deferred("4.4.3", f"cannot resolve LMTP host "
                                                     f"{job.nexthop.host}: {exc}")] * n
        except ValueError as exc:
            return [DeliveryResult.deferred("4.3.5", str(exc))] * n
        last = DeliveryResult.deferred("4.4.1", "no LMTP server address")
        final: list[DeliveryResult | None] = [None] * n
        try:
            for peer in peers[:MAX_ADDRESSES]:
                pending = [i for i in range(n) if final[i] is None]
                if not pending:
                    break
                outcome = await run_session(peer, self.options, job, pending, self.limiter,
                                            self.downgrade)
                if isinstance(outcome, SessionError):
                    last = outcome.result(peer.relay)
                    continue
                for i, result in outcome.items():
                    final[i] = result
                break  # LMTP: the server that answered is the final word
        except Exception as exc:
            log.error("delivery_error", queue_id=job.message.queue_id,
                      nexthop=job.nexthop.key, error=repr(exc))
            last = DeliveryResult.deferred("4.3.0", "internal error during delivery")
        return [r or last for r in final]

    async def _peers(self, hop: Nexthop) -> list[Peer]:
        if hop.kind != "lmtp":
            raise ValueError(f"next hop {hop} is not LMTP")
        if hop.unix_path:
            return [Peer(f"lmtp:unix:{hop.unix_path}", unix_path=hop.unix_path)]
        if is_ip(hop.host):
            return [Peer(hop.host, hop.host, hop.port)]
        # Configured (trusted) name: the system resolver is fine here.
        infos = await asyncio.get_running_loop().getaddrinfo(hop.host, hop.port,
                                                             type=socket.SOCK_STREAM)
        seen: list[str] = []
        for info in infos:
            addr = str(info[4][0])
            if addr not in seen:
                seen.append(addr)
        return [Peer(hop.host, addr, hop.port) for addr in seen]
