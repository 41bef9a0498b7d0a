"""What a request handler needs from the application: the settings, the stores, and one thread policy.

Every blocking call (a database query, a proof) runs through :func:`run_db` in the :class:`Backend`'s
thread pool, each thread with its own store connections, so a slow query never blocks the event loop.
:func:`base_url` is the one place links are built from.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from bridge.config import Settings
from bridge.logging import get_logger
from bridge.stores.audit import AuditStore, open_audit_log
from bridge.stores.auth import AuthStore
from bridge.stores.breakglass import BreakGlassStore
from bridge.stores.exports import ExportStore
from bridge.stores.index.store import IndexStore

log = get_logger(__name__)
T = TypeVar("T")


class Backend:
    """Per-thread handles to the stores, and an executor to run blocking calls in."""

    def __init__(
        self,
        settings: Settings,
        *,
        index_factory: Callable[[], IndexStore] | None = None,
        ledger_factory: Callable[[], Any] | None = None,
        mpi_factory: Callable[[], Any] | None = None,
        threads: int = 4,
    ) -> None:
        self.settings = settings
        self._index_factory = index_factory or (lambda: IndexStore.open(settings.stores.index_url))
        self._ledger_factory = ledger_factory
        self._mpi_factory = mpi_factory
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fhirbridge-db")

    def _get(self, name: str, factory: Callable[[], Any] | None) -> Any:
        obj = getattr(self._local, name, None)
        if obj is None:
            if factory is None:
                return None
            obj = factory()
            setattr(self._local, name, obj)
            with self._lock:
                self._all.append(obj)
        return obj

    def index(self) -> IndexStore:
        return self._get("index", self._index_factory)  # type: ignore[no-any-return]

    def ledger(self) -> Any:
        return self._get("ledger", self._ledger_factory)

    def mpi(self) -> Any:
        return self._get("mpi", self._mpi_factory)

    def auth(self) -> AuthStore:
        """The embedded authorization server's store (clients, users, codes, seen assertions)."""
        store: AuthStore = self._get("auth", lambda: AuthStore.open(self.settings.auth.url))
        return store

    def audit(self) -> AuditStore:
        """The access audit's store (``FHIRBRIDGE_AUDIT_URL``): every access's AuditEvents."""
        store: AuditStore = self._get("audit", lambda: AuditStore.open(self.settings.audit.url))
        return store

    def audit_log(self) -> Any:
        """The audit log (the second Merkle log, read only here): the proofs of the access log."""
        return self._get("audit_log", lambda: open_audit_log(self.settings))

    def break_glass(self) -> BreakGlassStore:
        """The break-the-glass windows, in the audit database."""
        store: BreakGlassStore = self._get(
            "break_glass", lambda: BreakGlassStore.open(self.settings.audit.url)
        )
        return store

    def exports(self) -> ExportStore:
        """The Bulk Data export jobs, their files and the defined groups (``FHIRBRIDGE_EXPORT_DB``)."""
        store: ExportStore = self._get("exports", lambda: ExportStore.open(self.settings.export.url))
        return store

    @property
    def has_ledger(self) -> bool:
        return self._ledger_factory is not None

    @property
    def has_mpi(self) -> bool:
        return self._mpi_factory is not None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        def _close_all() -> None:
            for obj in self._all:
                try:
                    obj.close()
                except Exception as exc:  # closing one store must not prevent closing the others
                    log.warning("backend.close_failed", error=str(exc))

        self.executor.shutdown(wait=True)
        _close_all()


SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", Backend)
ALLOWED_HOSTS: web.AppKey[frozenset[str] | None] = web.AppKey("allowed_hosts")


def stores(request: web.Request) -> Backend:
    """The application's stores (per-thread handles; use them inside :func:`run_db`)."""
    return request.app[BACKEND]


async def run_db(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """``fn(backend, *args)`` in the stores' thread pool."""
    backend = request.app[BACKEND]
    return await backend.run(fn, backend, *args)


def base_url(request: web.Request) -> str:
    """The base of every link the service writes: ``FHIRBRIDGE_PUBLIC_URL``, else the request's own
    scheme and ``Host`` (which the host middleware has checked against the allowed names)."""
    configured = request.app[SETTINGS].http.public_base_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"
