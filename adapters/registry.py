"""Adapter discovery through the ``fhirbridge.adapters`` entry-point group (public API).

Built-in adapters register exactly as third-party ones do, in their distribution's metadata::

    [project.entry-points."fhirbridge.adapters"]
    acme-flat = "acme_fhirbridge.adapter:AcmeFlatAdapter"

A broken entry point (import failure, not an :class:`~adapters.base.Adapter` subclass, or a name
registered twice by different targets) raises :class:`~adapters.errors.AdapterLoadError` naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib.metadata import EntryPoint, entry_points

from adapters.base import Adapter
from adapters.errors import AdapterLoadError, AdapterNotFound

GROUP = "fhirbridge.adapters"


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        prior = found.get(ep.name)
        if prior is not None and prior.value != ep.value:
            raise AdapterLoadError(
                f"{ep.name} = {ep.value}",
                f"duplicate adapter name {ep.name!r}: also registered as {prior.value}",
            )
        found[ep.name] = ep
    return found


def available() -> list[str]:
    """Names of all registered adapters, sorted."""
    return sorted(_entry_points())


def load_class(name: str) -> type[Adapter]:
    eps = _entry_points()
    ep = eps.get(name)
    if ep is None:
        raise AdapterNotFound(name, sorted(eps))
    try:
        cls = ep.load()
    except Exception as exc:  # an import failure in a plugin must name the plugin
        raise AdapterLoadError(
            f"{ep.name} = {ep.value}", f"cannot be imported: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise AdapterLoadError(
            f"{ep.name} = {ep.value}", "does not point to a subclass of adapters.base.Adapter"
        )
    if getattr(cls, "name", None) != name:
        raise AdapterLoadError(
            f"{ep.name} = {ep.value}",
            f"class declares name {getattr(cls, 'name', None)!r}, entry point says {name!r}",
        )
    return cls


@cache
def get(name: str) -> Adapter:
    """The (cached) adapter instance registered under ``name``, with no options."""
    return load_class(name)()


def create(name: str, options: Mapping[str, str] | None = None) -> Adapter:
    """A new instance of adapter ``name`` configured with ``options``."""
    return load_class(name)(**dict(options or {}))
