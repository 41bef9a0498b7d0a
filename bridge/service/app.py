"""The query service (aiohttp): merged, de-duplicated, provable patient histories.

``create_app`` wires the index store, the ledger and the MPI (each optional, for tests) and mounts
the route modules. Database work runs in a small thread pool with one connection per thread, so a
slow query never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.config import Settings
from bridge.logging import get_logger
from bridge.service.http import FhirHTTPError, fhir_response, operation_outcome
from bridge.stores.index.store import IndexStore

log = get_logger(__name__)
T = TypeVar("T")

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", object)
ALLOWED_HOSTS: web.AppKey[frozenset[str] | None] = web.AppKey("allowed_hosts")

FHIR_VERSION = "4.0.1"


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
        self._index_factory = index_factory or (lambda: IndexStore.open(settings.index_url))
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


@web.middleware
async def outcome_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except FhirHTTPError as exc:
        return fhir_response(operation_outcome("error", exc.code, exc.diagnostics), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not-found", 405: "not-supported", 400: "invalid"}.get(exc.status, "processing")
        return fhir_response(operation_outcome("error", code, exc.reason or str(exc)), status=exc.status)
    except Exception as exc:
        log.exception("http.unhandled", path=request.path)
        return fhir_response(
            operation_outcome(
                "fatal", "exception", f"internal error ({type(exc).__name__}); see the server log"
            ),
            status=500,
        )


@web.middleware
async def host_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse a ``Host`` the service was not configured to answer for (the links it builds use it)."""
    allowed = request.app[ALLOWED_HOSTS]
    if allowed is not None and _host_name(request.host) not in allowed:
        return fhir_response(
            operation_outcome(
                "error",
                "invalid",
                "this service does not answer for the host named in the Host header "
                "(FHIRBRIDGE_ALLOWED_HOSTS, FHIRBRIDGE_PUBLIC_URL)",
            ),
            status=400,
        )
    return await handler(request)


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header value: ``[::1]:8080`` -> ``::1``, ``Example.org:80`` -> ``example.org``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def backend_of(request: web.Request) -> Backend:
    return request.app[BACKEND]  # type: ignore[return-value]


async def metadata(request: web.Request) -> web.Response:
    from bridge.service.fhir.capability import capability_statement

    return fhir_response(capability_statement(base_url(request)))


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def home(request: web.Request) -> web.Response:
    base = base_url(request)
    links = [
        ("Capability statement", f"{base}/metadata"),
        ("Signed ledger checkpoint", f"{base}/ledger/checkpoint"),
        ("OpenAPI document", f"{base}/openapi.json"),
        ("Prometheus metrics", f"{base}/metrics"),
        ("Search patients by identifier", f"{base}/Patient?identifier=SYSTEM|VALUE"),
    ]
    items = "".join(f'<li><a href="{u}">{t}</a> <code>{u}</code></li>' for t, u in links)
    html = f"<!doctype html><title>fhirbridge</title><h1>fhirbridge</h1><ul>{items}</ul>"
    return web.Response(text=html, content_type="text/html")


def base_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].public_base_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"


def create_app(settings: Settings, backend: Backend | None = None) -> web.Application:
    from bridge.service import openapi
    from bridge.service.fhir import query

    app = web.Application(middlewares=[host_middleware, outcome_middleware], client_max_size=16 * 1024 * 1024)
    app[SETTINGS] = settings
    app[ALLOWED_HOSTS] = settings.allowed_host_names()
    be = backend or default_backend(settings)
    app[BACKEND] = be
    app.router.add_get("/", home)
    app.router.add_get("/metadata", metadata)
    app.router.add_get("/metrics", metrics)
    query.setup_query_routes(app)
    openapi.setup_openapi_routes(app)
    if be.has_ledger:
        from bridge.service.ledger import setup_ledger_routes

        setup_ledger_routes(app, be.ledger)
    if be.has_mpi:
        from bridge.mpi.routes import setup_mpi_routes

        setup_mpi_routes(app, be.mpi)

    async def _close(_: web.Application) -> None:
        be.close()

    app.on_cleanup.append(_close)
    return app


def default_backend(settings: Settings) -> Backend:
    def ledger_factory() -> Any:
        from bridge.stores.ledger import open_configured_ledger

        return open_configured_ledger(settings)

    def mpi_factory() -> Any:
        from bridge.mpi import PersonIndex

        return PersonIndex.open(settings.mpi_url)

    return Backend(settings, ledger_factory=ledger_factory, mpi_factory=mpi_factory)


def run(settings: Settings) -> None:
    app = create_app(settings)
    log.info("http.start", url=f"http://{settings.http_host}:{settings.http_port}/")
    web.run_app(app, host=settings.http_host, port=settings.http_port, print=None, access_log=None)
