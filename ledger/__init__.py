"""fhirbridge: ledger package."""
