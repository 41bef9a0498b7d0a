"""fhirbridge: ledger package.

A verifiable Merkle log (RFC 9162) of ingested bundles with C2SP signed checkpoints and witness
cosignatures. Public modules: :mod:`ledger.merkle`, :mod:`ledger.checkpoint`, :mod:`ledger.note`,
:mod:`ledger.log` (``Ledger``, ``LedgerEntry``), :mod:`ledger.errors`, :mod:`ledger.audit`,
:mod:`ledger.witness`. See ``docs/ledger.md``.
"""
