"""SMART App Launch 2.2 scopes: the grammar, and what a set of scopes grants.

A resource scope is ``(patient|user|system)/(Type|*).<permissions>[?param=value&...]``:

* the v2 permissions are the letters ``c r u d s`` (create, read, update, delete, search), at least one,
  each at most once and in that order (``.cr`` is valid, ``.rc`` is not);
* the v1 permissions ``.read``, ``.write`` and ``.*`` are read as ``rs``, ``cud`` and ``cruds``;
* the query (v2 only) narrows the scope to the resources matching every ``param=value`` in it
  (the granular scopes of HTI-1 and US Core, such as
  ``patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory``).

The non-resource scopes ``openid``, ``fhirUser``, ``launch``, ``launch/patient``, ``launch/encounter``,
``offline_access`` and ``online_access`` are recognised and kept; they grant no data access. Anything
else, malformed or unknown, is kept in :attr:`ScopeSet.ignored` for diagnostics: parsing never raises,
whatever a token holds.

Query parameters are kept as written (percent-encoded, commas meaning "or" as in FHIR search), so a
scope prints back exactly as it was parsed. :func:`params_match` evaluates them; it knows the token
parameters ``category`` and ``code`` of Observation and Condition, and a parameter it does not know
matches nothing (a narrowing it cannot evaluate never widens access).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

#: the launch contexts, in the order of the SMART specification
CONTEXTS: tuple[str, ...] = ("patient", "user", "system")
#: the v2 permission letters, in the order they must be written
INTERACTIONS = "cruds"
#: v1 permission -> v2 letters
V1_PERMISSIONS: Mapping[str, str] = {"read": "rs", "write": "cud", "*": "cruds"}
#: the scopes that are recognised but grant no data access
NON_RESOURCE_SCOPES: frozenset[str] = frozenset(
    {"openid", "fhirUser", "launch", "launch/patient", "launch/encounter", "offline_access", "online_access"}
)

#: the query parameters of a scope, as written: ((name, raw value), ...)
Params = tuple[tuple[str, str], ...]

# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_RESOURCE_SCOPE = re.compile(
    r"(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.(read|write|\*|c?r?u?d?s?)(?:\?(.*))?", re.ASCII
)
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}", re.ASCII)

#: (resource type, query parameter) -> the element holding the CodeableConcept(s) it searches
TOKEN_ELEMENTS: Mapping[tuple[str, str], str] = {
    ("Observation", "category"): "category",
    ("Observation", "code"): "code",
    ("Condition", "category"): "category",
    ("Condition", "code"): "code",
}


@dataclass(frozen=True, slots=True)
class Scope:
    """One resource scope. ``resource_type`` is a FHIR type name or ``*``; ``interactions`` holds
    letters of ``cruds``; ``params`` the query as written. Raises ValueError on other values."""

    context: str
    resource_type: str
    interactions: frozenset[str]
    params: Params = ()

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"scope context must be one of {CONTEXTS}")
        if not self.interactions or not self.interactions <= frozenset(INTERACTIONS):
            raise ValueError(f"scope interactions must be a non-empty subset of {INTERACTIONS!r}")

    def __str__(self) -> str:
        letters = "".join(c for c in INTERACTIONS if c in self.interactions)
        query = "&".join(f"{name}={value}" for name, value in self.params)
        return f"{self.context}/{self.resource_type}.{letters}" + (f"?{query}" if query else "")

    def covers(self, resource_type: str, interaction: str) -> bool:
        """Whether the scope is about ``resource_type`` (or every type) and includes ``interaction``,
        whatever its query narrows it to."""
        return interaction in self.interactions and self.resource_type in ("*", resource_type)

    def matches(self, resource: Mapping[str, Any]) -> bool:
        """Whether ``resource`` (a FHIR resource as JSON) is of this scope's type and matches every
        parameter of its query. Never raises on a malformed resource; it matches nothing."""
        rtype = resource.get("resourceType") if isinstance(resource, Mapping) else None
        if not isinstance(rtype, str) or self.resource_type not in ("*", rtype):
            return False
        return params_match(resource, self.params)


@dataclass(frozen=True, slots=True)
class ScopeSet:
    """The scopes of one access token: resource scopes, recognised non-resource scopes (``other``),
    and the ``ignored`` ones (malformed or unknown), kept for diagnostics only."""

    scopes: tuple[Scope, ...] = ()
    other: frozenset[str] = frozenset()
    ignored: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: object) -> ScopeSet:
        """The scopes of a ``scope`` claim (space-separated text) or an ``scp`` claim (text, or a list of
        scopes). Never raises: what is not a scope, including a non-text list item, is ignored."""
        if isinstance(value, str):
            tokens: Iterable[object] = value.split(" ")
        elif isinstance(value, list | tuple):
            tokens = (t for item in value for t in (item.split(" ") if isinstance(item, str) else [item]))
        else:
            tokens = [] if value is None else [value]
        scopes: dict[Scope, None] = {}
        other: set[str] = set()
        ignored: dict[str, None] = {}
        for token in tokens:
            if not isinstance(token, str):
                ignored[f"<{type(token).__name__}>"] = None
                continue
            if not token:
                continue
            if token in NON_RESOURCE_SCOPES:
                other.add(token)
                continue
            scope = parse_scope(token)
            if scope is None:
                ignored[token] = None
            else:
                scopes[scope] = None
        return cls(tuple(scopes), frozenset(other), tuple(ignored))

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> ScopeSet:
        """The scopes of a token's claims: ``scope`` (RFC 8693, RFC 9068), else ``scp`` (as Okta and
        Entra ID write them), else none."""
        value = claims.get("scope")
        return cls.parse(claims.get("scp") if value is None else value)

    def __str__(self) -> str:
        return " ".join([*(str(s) for s in self.scopes), *sorted(self.other)])

    def contexts(self) -> frozenset[str]:
        """The launch contexts (``patient``, ``user``, ``system``) the resource scopes name."""
        return frozenset(s.context for s in self.scopes)

    def allows(self, context_kinds: Iterable[str] | str, resource_type: str, interaction: str) -> bool:
        """Whether scopes of ``context_kinds`` cover every letter of ``interaction`` (one or more of
        ``cruds``, ValueError otherwise) on ``resource_type``, with or without a narrowing query: when
        this is true, :meth:`narrowing` says on which resources. ``resource_type`` ``*`` asks about some
        type, whichever (a route whose resources' types are known only once read)."""
        kinds = _kinds(context_kinds)
        if not interaction or any(c not in INTERACTIONS for c in interaction):
            raise ValueError(f"interaction must be letters of {INTERACTIONS!r}")
        relevant = [
            s
            for s in self.scopes
            if s.context in kinds and (resource_type == "*" or s.resource_type in ("*", resource_type))
        ]
        return all(any(c in s.interactions for s in relevant) for c in interaction)

    def narrowing(
        self, resource_type: str, interaction: str, context_kinds: Iterable[str] | str = CONTEXTS
    ) -> list[Params]:
        """On which resources of ``resource_type`` (a type name) the set grants ``interaction`` (one
        letter of ``cruds``, ValueError otherwise):

        * ``[]``: on none (no scope covers it);
        * ``[()]``: on all of them (a covering scope has no query);
        * otherwise the query of each covering scope: a resource is granted when it matches one of them
          (:func:`params_match`).
        """
        kinds = _kinds(context_kinds)
        _check_interaction(interaction)
        out: list[Params] = []
        for s in self.scopes:
            if s.context in kinds and s.covers(resource_type, interaction):
                if not s.params:
                    return [()]
                if s.params not in out:
                    out.append(s.params)
        return out

    def grants(
        self, resource: Mapping[str, Any], interaction: str, context_kinds: Iterable[str] | str = CONTEXTS
    ) -> bool:
        """Whether the set grants ``interaction`` on ``resource`` (a FHIR resource as JSON): a covering
        scope without a query, or one whose query the resource matches."""
        rtype = resource.get("resourceType") if isinstance(resource, Mapping) else None
        if not isinstance(rtype, str):
            return False
        return any(
            params_match(resource, params) for params in self.narrowing(rtype, interaction, context_kinds)
        )


def parse_scope(text: str) -> Scope | None:
    """One resource scope, or None when ``text`` is not one (never raises)."""
    if not isinstance(text, str) or len(text) > 4096 or not _SCOPE_TOKEN.fullmatch(text):
        return None
    m = _RESOURCE_SCOPE.fullmatch(text)
    if m is None:
        return None
    context, rtype, permissions, query = m.groups()
    letters = V1_PERMISSIONS.get(permissions)
    if letters is None:
        letters = permissions  # v2: the regex admits the letters in order only, each once
    elif query is not None:
        return None  # a v1 scope has no query
    if not letters:
        return None
    params: list[tuple[str, str]] = []
    if query is not None:
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            if not eq or not value or not _PARAM_NAME.fullmatch(name):
                return None
            params.append((name, value))
    return Scope(context, rtype, frozenset(letters), tuple(params))


def params_match(resource: Mapping[str, Any], params: Params) -> bool:
    """Whether ``resource`` matches every parameter of ``params`` (an empty query matches everything).

    A token value is ``system|code``, ``code`` (any system), ``|code`` (no system) or ``system|`` (any
    code of the system), percent-decoded; commas separate alternatives. Only the parameters of
    :data:`TOKEN_ELEMENTS` are known: another one matches nothing. Never raises on a malformed resource.
    """
    if not params:
        return True
    rtype = resource.get("resourceType") if isinstance(resource, Mapping) else None
    if not isinstance(rtype, str):
        return False
    for name, raw in params:
        element = TOKEN_ELEMENTS.get((rtype, name))
        if element is None:
            return False
        codings = list(_codings(resource.get(element)))
        if not any(_token_matches(codings, unquote(alt)) for alt in raw.split(",")):
            return False
    return True


def _codings(value: object) -> Iterable[Mapping[str, Any]]:
    concepts = value if isinstance(value, list) else [value]
    for concept in concepts:
        if isinstance(concept, Mapping) and isinstance(concept.get("coding"), list):
            yield from (c for c in concept["coding"] if isinstance(c, Mapping))


def _token_matches(codings: list[Mapping[str, Any]], token: str) -> bool:
    if not token:
        return False
    if "|" not in token:
        return any(c.get("code") == token for c in codings)
    system, _, code = token.partition("|")
    if not system and not code:
        return False
    for c in codings:
        if system and c.get("system") != system:
            continue
        if not system and c.get("system") is not None:
            continue
        if code and c.get("code") != code:
            continue
        return True
    return False


def _kinds(context_kinds: Iterable[str] | str) -> frozenset[str]:
    return frozenset([context_kinds]) if isinstance(context_kinds, str) else frozenset(context_kinds)


def _check_interaction(interaction: str) -> None:
    if len(interaction) != 1 or interaction not in INTERACTIONS:
        raise ValueError(f"interaction must be one letter of {INTERACTIONS!r}")
