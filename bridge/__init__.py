"""fhirbridge: bridge package."""
