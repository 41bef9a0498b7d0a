"""The FHIR REST interactions: read, search, everything, consent, access log, bulk export."""
