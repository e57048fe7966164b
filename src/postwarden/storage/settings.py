"""The ``[storage]`` section of the config file: which backend stores the
queue (and, later, the rest of the shared state).

* ``backend = "sqlite"`` (the default): the embedded database and spool
  directory under ``data_dir``; nothing to install.
* ``backend = "postgres"``: a PostgreSQL database shared by several nodes
  (:mod:`postwarden.storage.pg_queue`).  ``dsn`` names it
  (``postgresql://user@host:5432/db``); ``schema`` is the PostgreSQL schema
  postwarden creates and migrates its tables in; ``pool_min`` / ``pool_max``
  size the connection pool of each process; ``lease`` is how long a claimed
  delivery stays reserved for its node without a renewal (a node that dies
  leaves its deliveries to others after at most this long);
  ``heartbeat`` is how often a node renews its leases and says it is alive;
  ``shared_spool_dir`` (optional, an absolute path) is a directory every
  node mounts (NFS, CephFS...) where message bodies larger than the inline
  limit are kept as files instead of in the database.

:mod:`postwarden.config` reads the file; ``from_table`` raises
``ValueError("KEY: reason")``, which becomes a ``ConfigError`` naming
``storage.KEY``.

Security exposure: the DSN may hold a password; it is never logged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BACKENDS = ("sqlite", "postgres")
_SCHEMA_NAME = re.compile(r"\A[a-z_][a-z0-9_]{0,62}\Z")


@dataclass(frozen=True, slots=True)
class StorageSettings:
    backend: str = "sqlite"
    dsn: str = ""
    schema: str = "postwarden"
    pool_min: int = 2
    pool_max: int = 10
    lease: float = 60.0
    heartbeat: float = 5.0
    shared_spool_dir: str = ""

    @property
    def postgres(self) -> bool:
        return self.backend == "postgres"

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> StorageSettings:
        d = cls()
        for k in table:
            if k not in {"backend", "dsn", "schema", "pool_min", "pool_max", "lease",
                         "heartbeat", "shared_spool_dir"}:
                raise ValueError(f"{k}: unknown key")
        backend = table.get("backend", d.backend)
        if backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}")
        dsn = table.get("dsn", "")
        if not isinstance(dsn, str):
            raise ValueError("dsn: must be a string (postgresql://user@host:5432/database)")
        if backend == "postgres":
            if not dsn:
                raise ValueError('dsn: is required when backend = "postgres" '
                                 "(postgresql://user@host:5432/database)")
            if not dsn.startswith(("postgresql://", "postgres://")):
                raise ValueError("dsn: must start with postgresql:// "
                                 "(postgresql://user@host:5432/database)")
        elif dsn:
            raise ValueError('dsn: only used with backend = "postgres"')
        schema = table.get("schema", d.schema)
        if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
            raise ValueError("schema: must be a lower-case SQL identifier "
                             "(letters, digits, _; at most 63)")
        pool_min = _whole(table, "pool_min", d.pool_min, 1)
        pool_max = _whole(table, "pool_max", d.pool_max, 1)
        if pool_max < pool_min:
            raise ValueError(f"pool_max: must be at least pool_min ({pool_min})")
        if pool_max > 1000:
            raise ValueError("pool_max: must be at most 1000")
        lease = _seconds(table, "lease", d.lease, 1.0)
        heartbeat = _seconds(table, "heartbeat", d.heartbeat, 0.1)
        if heartbeat * 2 > lease:
            raise ValueError(f"heartbeat: must be at most half the lease ({lease:g}s): "
                             "a lease is renewed at each heartbeat")
        spool = table.get("shared_spool_dir", "")
        if not isinstance(spool, str):
            raise ValueError("shared_spool_dir: must be a string (an absolute path)")
        if spool:
            if backend != "postgres":
                raise ValueError('shared_spool_dir: only used with backend = "postgres" '
                                 "(one node keeps its spool in data_dir)")
            if not spool.startswith("/") or "\0" in spool:
                raise ValueError(f"shared_spool_dir: must be an absolute path, not {spool!r}")
            if any(part == ".." for part in spool.split("/")):
                raise ValueError("shared_spool_dir: must not contain '..'")
        return cls(backend=str(backend), dsn=dsn, schema=schema, pool_min=pool_min,
                   pool_max=pool_max, lease=lease, heartbeat=heartbeat,
                   shared_spool_dir=spool.rstrip("/") or spool)


def _whole(table: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: must be a whole number")
    if value < minimum:
        raise ValueError(f"{key}: must be at least {minimum}")
    return value


def _seconds(table: Mapping[str, Any], key: str, default: float, minimum: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: must be a number of seconds")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{key}: must be at least {minimum:g} seconds")
    return float(value)
