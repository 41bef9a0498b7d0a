"""fhirbridge: bridge package (streaming, index, query service)."""

__version__ = "0.1.0"
