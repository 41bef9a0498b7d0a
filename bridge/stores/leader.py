"""Leadership of a single-writer role (the ledger sequencer): one process holds it, the others wait.

* **PostgreSQL**: a session advisory lock (``pg_try_advisory_lock``) on a connection of its own. The
  lock lives as long as that session: a leader killed with SIGKILL loses it at once (the kernel closes
  the socket); a leader that is paused (SIGSTOP, a stalled VM) or cut off loses it when PostgreSQL ends
  the session, after ``idle_session_timeout`` (the lease, set on the session) or the TCP keepalives set
  on it. A live leader keeps the session busy with a ``SELECT 1`` every quarter of the lease.
* **SQLite** (one machine): an exclusive ``flock`` on ``<database>.<role hash>.writer.lock``, which the kernel
  releases when the process dies.

The lock alone cannot stop a paused leader from appending once it wakes up: it does not know yet that
it lost. The writer epoch does (``ledger_writer``, :meth:`ledger.log.Ledger.claim_writer`): a new
leader claims a higher epoch, and every append transaction checks it (decision 38).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.errors import FhirbridgeError
from bridge.logging import get_logger

log = get_logger(__name__)


class LeadershipLost(FhirbridgeError):
    """This process held a single-writer role and lost it: it stops, commits nothing more, exits non-zero."""


def holder_name(instance_id: str | None = None) -> str:
    """How this process names itself as a leader: the consumer's instance id and pid, else host:pid."""
    return f"{instance_id or socket.gethostname()}:{os.getpid()}"


def lock_key(role: str) -> int:
    """A stable signed 64-bit advisory lock key for ``role``."""
    return int.from_bytes(hashlib.sha256(f"fhirbridge:{role}".encode()).digest()[:8], "big", signed=True)


class LeaderLock:
    """Wait for, hold and watch the leadership of ``role`` on the database at ``url``."""

    def __init__(
        self,
        url: str,
        role: str,
        *,
        lease_s: float = 10.0,
        poll_s: float = 1.0,
        on_lost: Callable[[], None] | None = None,
        holder: str | None = None,
    ) -> None:
        self.url = url
        self.role = role
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.on_lost = on_lost
        self.holder = holder or holder_name()
        self.lost = threading.Event()
        self._closed = threading.Event()
        self._conn: Any = None
        self._file: Any = None
        self._watch: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return (self._conn is not None or self._file is not None) and not self.lost.is_set()

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block as a standby until this process leads (True), or until ``stop`` is set (False)."""
        stop = stop or threading.Event()
        said = False
        while not stop.is_set():
            if self._try_once():
                log.info("leader.acquired", role=self.role, holder=self.holder)
                return True
            if not said:
                log.info("leader.standby", role=self.role, holder=self.holder)
                said = True
            stop.wait(self.poll_s)
        return False

    def _try_once(self) -> bool:
        if self.url.startswith("sqlite"):
            return self._try_file()
        return self._try_postgres()

    def _try_file(self) -> bool:
        # one lock file per role (the ledger and the MPI may share a directory, or a database file)
        suffix = hashlib.sha256(self.role.encode()).hexdigest()[:8]
        path = Path(self.url[len("sqlite://") :] + f".{suffix}.writer.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held for as long as we lead
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._file = fh
        return True

    def _try_postgres(self) -> bool:
        import psycopg  # a PostgreSQL ledger needs the driver anyway

        lease_ms = int(self.lease_s * 1000)
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(2, int(self.lease_s)),
                keepalives=1,
                keepalives_idle=max(1, int(self.lease_s / 4)),
                keepalives_interval=1,
                keepalives_count=3,
                # a keepalive query unanswered this long (a partition) fails instead of hanging
                tcp_user_timeout=lease_ms,
            )
        except psycopg.Error as exc:
            log.warning("leader.database_unavailable", role=self.role, error=type(exc).__name__)
            return False
        try:
            # PostgreSQL ends this session, and with it the lock, when we stop talking for a lease
            conn.execute(f"SET idle_session_timeout = {lease_ms}")
            conn.execute(f"SET tcp_keepalives_idle = {max(1, int(self.lease_s / 4))}")
            conn.execute("SET tcp_keepalives_interval = 1")
            conn.execute("SET tcp_keepalives_count = 3")
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(self.role),)).fetchone()
        except psycopg.Error as exc:
            log.warning("leader.database_unavailable", role=self.role, error=type(exc).__name__)
            with contextlib.suppress(Exception):
                conn.close()
            return False
        if not (row and row[0]):
            conn.close()
            return False
        self.lost.clear()
        self._closed.clear()
        self._conn = conn
        self._watch = threading.Thread(target=self._keepalive, name=f"leader-{self.role}", daemon=True)
        self._watch.start()
        return True

    def _keepalive(self) -> None:
        while not self._closed.wait(self.lease_s / 4):
            try:
                row = self._conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                    " AND granted AND (classid::bigint << 32) | objid::bigint = %s::bigint",
                    (lock_key(self.role),),
                ).fetchone()
                if not row or not row[0]:
                    raise RuntimeError("the advisory lock is no longer held by this session")
            except Exception as exc:
                if self._closed.is_set():
                    return
                self.lost.set()
                log.error("leader.lost", role=self.role, holder=self.holder, error=type(exc).__name__)
                if self.on_lost is not None:
                    self.on_lost()
                return

    def check(self) -> None:
        """Raise :class:`LeadershipLost` if the leadership was lost."""
        if self.lost.is_set():
            raise LeadershipLost(
                f"this process lost the {self.role} leadership (its database session ended): it stops"
                " without committing and exits; a restart waits as a standby"
            )

    def release(self) -> None:
        self._closed.set()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
