"""The ledger's exceptions.

Verification has one failure type, :class:`VerificationError`; its subclasses only add detail.
Lower-level exceptions (``InvalidSignature``, ``binascii.Error``, ``ValueError``, database errors) are
translated at the boundary with ``raise ... from exc``. Details live in attributes, not in the text.
"""

from __future__ import annotations

__all__ = [
    "CheckpointMismatch",
    "EntryTooLarge",
    "InvalidEntry",
    "InvalidKey",
    "LedgerError",
    "OutOfRange",
    "RootMismatchError",
    "StorageUnavailable",
    "VerificationError",
]


class LedgerError(Exception):
    """Base class of every ledger error (the ``ledger`` package's one root; it imports nothing from fhirbridge)."""


class VerificationError(LedgerError):
    """A proof, signature, checkpoint or stored row failed verification (or was malformed)."""


class RootMismatchError(VerificationError):
    """A recomputed root hash differs from the expected one; carries both values."""

    def __init__(self, expected: bytes, calculated: bytes, message: str = "root hash mismatch") -> None:
        super().__init__(message)
        self.expected = expected
        self.calculated = calculated


class CheckpointMismatch(VerificationError):
    """Two checkpoints cannot both be true: a split view (same size, other root) or a rollback."""

    def __init__(self, kind: str, message: str, *, old: str, new: str) -> None:
        super().__init__(message)
        self.kind = kind  # "split-view", "rollback" or "inconsistent"
        self.old = old
        self.new = new


class OutOfRange(LedgerError):
    """An index or tree size is outside the log (or the tree the caller passed)."""

    def __init__(self, message: str, *, value: int, limit: int) -> None:
        super().__init__(message)
        self.value = value
        self.limit = limit


class InvalidKey(LedgerError):
    """A signed-note key string is malformed or its key id does not match."""


class InvalidEntry(LedgerError):
    """A ledger entry has a missing or ill-typed field."""


class EntryTooLarge(InvalidEntry):
    """An entry's canonical JSON is larger than the 64 KB limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"ledger entry is {size} bytes; the limit is {limit}")
        self.size = size
        self.limit = limit


class StorageUnavailable(LedgerError):
    """The database cannot be reached (refused, lost, locked); retry later, the Ledger reconnects."""


class WriterFenced(LedgerError):
    """Another writer claimed the log (a higher writer epoch): this one appends nothing more.

    Raised inside the append (or checkpoint) transaction, which is rolled back. The writer that gets
    it has lost its leadership and must stop without committing anything it consumed.
    """

    def __init__(self, ours: int, current: int) -> None:
        super().__init__(
            f"another ledger writer took over (writer epoch {current}, ours {ours}): this writer stops"
        )
        self.ours = ours
        self.current = current
