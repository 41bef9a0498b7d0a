"""What a request's token grants: :class:`Access`, built by the middleware from the verified token.

A ``patient/`` grant is limited to the patient's compartment: every Patient record the MPI links to
the token's ``patient`` through MATCH links (a POSSIBLE_MATCH never widens access). Handlers ask
:class:`Access` about the ids and resources they are about to return.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bridge.service.auth.marks import Forbidden, Need
from bridge.service.auth.scopes import ScopeSet
from bridge.service.auth.tokens import AccessContext


@dataclass
class Access:
    """What the request's token grants, and the patient compartment when a ``patient/`` scope is the grant.

    ``compartment`` is filled by the middleware for a token with ``patient/`` scopes (the MPI person of
    its ``patient``); it is None for user and system tokens.
    """

    context: AccessContext
    compartment: frozenset[str] | None = None
    _cache: dict[tuple[str, str], tuple[bool, bool]] = field(default_factory=dict)

    @property
    def scopes(self) -> ScopeSet:
        return self.context.scopes

    @property
    def purposes(self) -> tuple[str, ...]:
        """The purposes of use of the request: those the token states; TREAT for a ``user/`` token
        that states none; none for any other (a ``system/`` token must state its own)."""
        stated = self.context.purpose_of_use
        if stated:
            return stated
        return ("TREAT",) if "user" in self.scopes.contexts() else ()

    def grant(self, resource_type: str, interaction: str) -> tuple[bool, bool]:
        """(allowed, limited to the compartment): allowed by some scope; limited when only ``patient/``
        scopes allow it (a user or system scope that allows it lifts the limit)."""
        key = (resource_type, interaction)
        if key not in self._cache:
            broad = self.scopes.allows(("user", "system"), resource_type, interaction)
            narrow = self.scopes.allows(("patient",), resource_type, interaction)
            self._cache[key] = (broad or narrow, narrow and not broad)
        return self._cache[key]

    def allows(self, resource_type: str, interaction: str) -> bool:
        return self.grant(resource_type, interaction)[0]

    def check(self, need: Need, resource_type: str) -> None:
        """Raise :class:`Forbidden` unless scopes in ``need.contexts`` grant every letter of the need's
        interaction on ``resource_type`` (``*``: on some type)."""
        if not resource_type or not self.scopes.allows(need.contexts, resource_type, need.interaction):
            what = "any type" if resource_type == "*" else (resource_type or "this type")
            raise Forbidden(f"the token's scopes do not grant {need.interaction!r} on {what}")

    def require_patient(
        self, patient_id: str, resource_type: str = "Patient", interaction: str = "r"
    ) -> None:
        """Raise :class:`Forbidden` when ``patient_id`` is outside what the token may see: the same
        answer whether that patient exists or not (the check reads nothing)."""
        allowed, limited = self.grant(resource_type, interaction)
        if not allowed or (limited and patient_id not in (self.compartment or frozenset())):
            raise Forbidden("the token's scopes do not cover this patient")

    def readable_types(self, candidates: Iterable[str]) -> list[str]:
        """The candidate types the token may read (``r``)."""
        return [t for t in candidates if self.allows(t, "r")]

    def permits(self, resource: dict[str, Any], interaction: str = "r") -> bool:
        """Whether the granular narrowing (``?category=``, ``?code=``) of the granting scopes admits ``resource``."""
        return self.scopes.grants(resource, interaction)

    def narrowed(self, resource_type: str, interaction: str = "r") -> bool:
        """Whether some resources of ``resource_type`` may be refused by a narrowing query (so that each
        must be looked at), rather than all of them granted or none."""
        return self.scopes.narrowing(resource_type, interaction) not in ([], [()])

    def in_compartment(self, patient_ids: Iterable[str], resource_type: str, interaction: str = "r") -> bool:
        """Whether a resource that refers to ``patient_ids`` may be returned (always, without a limit)."""
        allowed, limited = self.grant(resource_type, interaction)
        if not allowed:
            return False
        return not limited or bool(self.compartment and self.compartment.intersection(patient_ids))
