"""What each route needs, declared beside its handler: the marks the authorization middleware reads.

Every handler is marked: :func:`public` (no token: the CapabilityStatement, discovery, the ledger's
public reads), :func:`authenticated` (any valid token: metrics), or :func:`needs` (a resource type,
or the path's ``{type}``, and SMART interaction letters, in the token contexts allowed). A handler
without a mark is refused to everyone: deny by default. The middleware checks the mark before the
handler runs, so no query is made for a request the scopes do not cover.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from bridge.errors import FhirbridgeError

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])

ALL_CONTEXTS = frozenset({"patient", "user", "system"})
#: the route's resource type is its ``{type}`` path segment
PATH_TYPE = "{type}"
ATTRIBUTE = "__fhirbridge_access__"


class Forbidden(FhirbridgeError):
    """The token is valid but its scopes do not cover the request (403, ``insufficient_scope``)."""


class Unauthorized(FhirbridgeError):
    """No usable token (401, ``invalid_token``); ``reason`` is short and holds no token content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Need:
    """Every letter of ``interaction`` on ``resource_type`` (``*``: some type; :data:`PATH_TYPE`: the
    path's), granted by scopes of one of ``contexts``."""

    resource_type: str
    interaction: str
    contexts: frozenset[str] = ALL_CONTEXTS


PUBLIC = "public"
AUTHENTICATED = "authenticated"
Mark = Need | str


def public(handler: H) -> H:
    """No token needed: the route serves nothing about a patient."""
    setattr(handler, ATTRIBUTE, PUBLIC)
    return handler


def authenticated(handler: H) -> H:
    """Any valid token, whatever its scopes."""
    setattr(handler, ATTRIBUTE, AUTHENTICATED)
    return handler


def needs(
    resource_type: str, interaction: str, *, contexts: Iterable[str] = ALL_CONTEXTS
) -> Callable[[H], H]:
    """The route needs ``interaction`` (one of ``c r u d s``) on ``resource_type`` in one of ``contexts``."""
    need = Need(resource_type, interaction, frozenset(contexts))

    def mark(handler: H) -> H:
        setattr(handler, ATTRIBUTE, need)
        return handler

    return mark


def mark_of(handler: Any) -> Mark | None:
    """A handler's mark (None: unmarked, so refused)."""
    return getattr(handler, ATTRIBUTE, None)
