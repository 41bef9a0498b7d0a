"""MPI configuration, match states and errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from bridge.errors import FhirbridgeError

SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"

#: Identifier systems treated as strong (person-level) identifiers by default. Medical record numbers are
#: deliberately absent: an MRN identifies a record at one provider, not a person.
DEFAULT_STRONG_SYSTEMS: tuple[str, ...] = (
    SSN_SYSTEM,
    "urn:oid:2.16.840.1.113883.4.1",  # SSN by OID
    "http://hl7.org/fhir/sid/us-medicare",
    "urn:oid:2.16.840.1.113883.4.3",  # US driver's licence (generic OID root)
    "http://hl7.org/fhir/sid/us-dl",
    "urn:oid:2.16.840.1.113883.2.4.6.3",  # Dutch BSN
    "https://fhir.nhs.uk/Id/nhs-number",
    "http://ns.electronichealth.net.au/id/hi/ihi/1.0",
    "urn:oid:1.2.36.146.595.217.0.1",  # Australian IHI
)


class MatchState(enum.StrEnum):
    """Outcome of comparing two patient records."""

    MATCH = "MATCH"
    POSSIBLE_MATCH = "POSSIBLE_MATCH"
    NO_MATCH = "NO_MATCH"

    def __str__(self) -> str:
        return self.value


class MpiError(FhirbridgeError):
    """Base class of MPI errors."""


class MpiNotFound(MpiError):
    """A patient or person id is not in the index."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident!r} is not in the master patient index")
        self.kind = kind
        self.ident = ident


class MpiConflict(MpiError):
    """A manual decision contradicts another manual decision."""


class MpiWriterFenced(MpiError):
    """Another linker claimed the MPI (a higher writer epoch, ``mpi_writer``): this one writes nothing more.

    Raised inside the write transaction, which is rolled back. The linker that gets it has lost its
    leadership: it stops without committing what it consumed and exits non-zero (docs/mpi.md).
    """

    def __init__(self, ours: int, current: int) -> None:
        super().__init__(
            f"another MPI linker took over (writer epoch {current}, ours {ours}): this linker stops"
        )
        self.ours = ours
        self.current = current


class MpiInputError(MpiError):
    """A patient resource cannot be indexed (not a Patient, no id, ...)."""

    def __init__(self, message: str, *, location: str | None = None) -> None:
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location


@dataclass(frozen=True)
class MpiConfig:
    """Tunable matcher and index settings. All defaults are documented in docs/mpi.md.

    ``match_threshold`` and ``possible_threshold`` are posterior match probabilities (0..1).
    """

    match_threshold: float = 0.95
    possible_threshold: float = 0.30
    strong_identifier_systems: tuple[str, ...] = DEFAULT_STRONG_SYSTEMS
    #: a MATCH also needs at least this much evidence (log2 Bayes factor, prior excluded), so that a high
    #: match rate among candidates cannot auto-link on weak evidence
    min_match_evidence_bits: float = 4.0
    #: equal strong identifiers auto-link only if the demographics alone give at least this probability
    identifier_corroboration: float = 0.05
    #: EM runs once the index holds this many records, then again each time it has grown by ``em_refit_factor``.
    em_min_records: int = 1000
    em_refit_factor: float = 2.0
    #: at most this many records are sampled for an EM fit
    em_sample_records: int = 50_000
    em_max_iterations: int = 60
    #: blocks larger than this are skipped (they would produce too many candidate pairs)
    max_block_size: int = 100
    #: weight of the priors (pseudo-counts) in EM; keeps empty levels away from 0 probability
    prior_strength: float = 20.0
    term_frequency: bool = True
    #: cap (in bits) of the term-frequency adjustment in either direction
    tf_max_adjustment_bits: float = 4.0
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.possible_threshold <= self.match_threshold < 1.0:
            raise MpiError(
                "thresholds must satisfy 0 < possible_threshold <= match_threshold < 1, got "
                f"possible={self.possible_threshold} match={self.match_threshold}"
            )
        if self.max_block_size < 2:
            raise MpiError("max_block_size must be at least 2")
        if self.prior_strength < 0 or self.em_min_records < 1 or self.em_sample_records < 2:
            raise MpiError("prior_strength must be >= 0, em_min_records >= 1, em_sample_records >= 2")
        if self.em_refit_factor <= 1.0:
            raise MpiError("em_refit_factor must be greater than 1")
        if not 0.0 <= self.identifier_corroboration <= 1.0 or self.tf_max_adjustment_bits < 0:
            raise MpiError("identifier_corroboration must be in [0, 1] and tf_max_adjustment_bits >= 0")
