"""fhirbridge: adapters package."""
