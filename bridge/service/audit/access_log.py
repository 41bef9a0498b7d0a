"""'Who has seen my record': a patient's accesses, each provable against the audit log's signed checkpoint.

:func:`access_log` reads the patient's audit rows (newest first by default) and, for each, says who
(the user's ``issuer|subject`` and ``fhirUser``, the client, the organisation), when, why (purpose of
use, break-the-glass and its reason), what (resource types and counts, or the query) and the outcome,
with the event's place in the audit log:

* ``leaf_index`` and ``leaf_hash`` (base64 of ``SHA-256(0x00 || entry)``, ``entry`` the leaf's
  canonical JSON, whose ``bundle_sha256`` is the SHA-256 of the AuditEvent's canonical JSON);
* ``proof``: the RFC 9162 inclusion proof (base64 hashes, leaf upwards) of that leaf in the tree of the
  **latest signed checkpoint**, which the page carries once (``checkpoint``, with witness cosignatures,
  and its ``size``); or ``pending`` when the event is not yet covered by that checkpoint (appended after
  it, or not appended yet).

A client checks an entry with :func:`ledger.merkle.verify_inclusion(leaf_hash, leaf_index, size, proof,
root)` after verifying the checkpoint's signature with the audit log's key (``ledger.checkpoint.open``).
The functions here are pure over the store and the log: the HTTP routes (``GET
/Patient/{id}/$access-log``, ``AuditEvent?patient=``/``?agent=``) are built on them, and authorise the
caller first.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.service.audit.events import summarize
from bridge.stores.audit import NO_ORGANIZATION, AuditRow, AuditStore, leaf_entry
from ledger import merkle
from ledger.log import Ledger

__all__ = ["AccessLog", "AccessLogEntry", "access_log", "agent_log", "prove_rows"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class AccessLogEntry:
    """One access to the patient's record, and where its AuditEvent is in the audit log."""

    seq: int
    event_id: str
    recorded: str
    agent: str | None
    organization: str | None
    fhir_user: str | None
    client_id: str | None
    purpose: tuple[str, ...]
    break_glass: bool
    break_glass_reason: str | None
    interaction: str | None
    touched: dict[str, int]
    query: str | None
    outcome: str
    sha256: str
    entry: dict[str, Any]
    leaf_hash: str
    leaf_index: int | None
    proof: tuple[str, ...] | None

    @property
    def pending(self) -> bool:
        """Not (yet) covered by the page's checkpoint."""
        return self.proof is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "event_id": self.event_id,
            "recorded": self.recorded,
            "who": {
                "agent": self.agent,
                "organization": self.organization,
                "fhir_user": self.fhir_user,
                "client_id": self.client_id,
            },
            "why": {
                "purpose": list(self.purpose),
                "break_glass": self.break_glass,
                "break_glass_reason": self.break_glass_reason,
            },
            "what": {"interaction": self.interaction, "touched": dict(self.touched), "query": self.query},
            "outcome": self.outcome,
            "sha256": self.sha256,
            "entry": self.entry,
            "leaf_hash": self.leaf_hash,
            "leaf_index": self.leaf_index,
            "proof": None if self.proof is None else list(self.proof),
            "pending": self.pending,
        }


@dataclass(frozen=True, slots=True)
class AccessLog:
    """A page of accesses. ``checkpoint`` (the signed note, with cosignatures) and ``size`` are what the
    entries' proofs are against (None before the first checkpoint); ``next_after`` is the ``after`` of
    the next page (None when this page is not full: there is no next one)."""

    patient_id: str | None
    entries: list[AccessLogEntry] = field(default_factory=list)
    checkpoint: str | None = None
    size: int | None = None
    next_after: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "patient": self.patient_id,
            "checkpoint": self.checkpoint,
            "size": self.size,
            "next_after": self.next_after,
            "entries": [e.to_dict() for e in self.entries],
        }


def prove_rows(
    rows: Sequence[AuditRow], audit_log: Ledger
) -> tuple[list[AccessLogEntry], str | None, int | None]:
    """The entries of ``rows`` with their leaves and inclusion proofs against the latest signed
    checkpoint, and that checkpoint (note with cosignatures) and its size.

    Reads the checkpoint once, so every proof is for the same tree. A row whose hash is not in the log,
    or whose leaf is beyond the checkpoint, has no proof (``pending``). Raises
    :class:`~ledger.errors.StorageUnavailable` when the log cannot be read.
    """
    latest = audit_log.storage.latest_checkpoint()
    size = latest[0] if latest else None
    note = audit_log.checkpoint_at(size) if size is not None else None
    keys = [(r.sha256, r.organization or NO_ORGANIZATION) for r in rows]
    found = audit_log.find_many(keys) if rows else {}
    entries = []
    for row, key in zip(rows, keys, strict=True):
        leaf = leaf_entry(row)
        canonical = leaf.canonical()
        index = found.get(key)
        proof = None
        if index is not None and size is not None and index < size:
            proof = tuple(_b64(h) for h in audit_log.inclusion_proof(index, size))
        said = summarize(row.event())
        entries.append(
            AccessLogEntry(
                seq=row.seq,
                event_id=row.id,
                recorded=row.recorded,
                agent=row.agent,
                organization=row.organization,
                fhir_user=said["fhir_user"],
                client_id=said["client_id"],
                purpose=tuple(said["purpose"]),
                break_glass=row.break_glass,
                break_glass_reason=said["break_glass_reason"],
                interaction=said["interaction"],
                touched=said["touched"],
                query=said["query"],
                outcome=row.outcome,
                sha256=row.sha256,
                entry=leaf.to_dict(),
                leaf_hash=_b64(merkle.leaf_hash(canonical)),
                leaf_index=index,
                proof=proof,
            )
        )
    return entries, note, size


def _page(patient_id: str | None, rows: list[AuditRow], limit: int, audit_log: Ledger) -> AccessLog:
    entries, note, size = prove_rows(rows, audit_log)
    more = len(rows) == limit
    return AccessLog(patient_id, entries, note, size, rows[-1].seq if more and rows else None)


def access_log(
    store: AuditStore,
    audit_log: Ledger,
    patient_id: str,
    *,
    limit: int = 100,
    after: int | None = None,
    newest_first: bool = True,
) -> AccessLog:
    """The accesses to ``patient_id``'s record (allowed and denied), ``limit`` at a time, newest first
    unless ``newest_first`` is false; ``after`` is the previous page's ``next_after``.

    Raises :class:`~bridge.errors.TransientError` (the audit database) or
    :class:`~ledger.errors.StorageUnavailable` (the audit log) when unavailable.
    """
    rows = store.for_patient(patient_id, limit=limit, after=after, descending=newest_first)
    return _page(patient_id, rows, limit, audit_log)


def agent_log(
    store: AuditStore,
    audit_log: Ledger,
    agent: str,
    *,
    limit: int = 100,
    after: int | None = None,
    newest_first: bool = True,
) -> AccessLog:
    """The accesses made by ``agent`` (``issuer|subject``), paged like :func:`access_log`."""
    rows = store.for_agent(agent, limit=limit, after=after, descending=newest_first)
    return _page(None, rows, limit, audit_log)
