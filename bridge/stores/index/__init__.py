"""The resource index: FHIR resources and their provenance, keyed by deterministic ids."""

from bridge.stores.index.store import IndexStore, StoredResource

__all__ = ["IndexStore", "StoredResource"]
