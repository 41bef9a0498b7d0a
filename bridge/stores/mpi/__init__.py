"""Master patient index: Fellegi–Sunter record linkage of Patient records into persons.

Public API::

    from bridge.stores.mpi import PersonIndex, MatchState, MpiConfig
    mpi = PersonIndex.open("sqlite:///var/lib/fhirbridge/mpi.db")
    mpi.upsert_patients([("org-a", patient_resource), ...])
    mpi.linked_patient_ids("patient-1")

See docs/mpi.md for the matching model, the thresholds and the storage layout.
"""

from __future__ import annotations

from bridge.stores.mpi.config import (
    MatchState,
    MpiConfig,
    MpiConflict,
    MpiError,
    MpiInputError,
    MpiNotFound,
)
from bridge.stores.mpi.persons import person_id_for
from bridge.stores.mpi.store import PersonIndex

__all__ = [
    "MatchState",
    "MpiConfig",
    "MpiConflict",
    "MpiError",
    "MpiInputError",
    "MpiNotFound",
    "PersonIndex",
    "person_id_for",
]
