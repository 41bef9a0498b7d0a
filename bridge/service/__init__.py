"""The aiohttp query service: FHIR API, ledger routes, MPI operations, the web app."""
