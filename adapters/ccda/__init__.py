"""C-CDA R2.1 adapter (secure XML parsing; header, 14 section kinds, 9 document types)."""

from __future__ import annotations

from adapters.ccda.adapter import DOCUMENT_TYPES, CcdaAdapter, document_type

__all__ = ["DOCUMENT_TYPES", "CcdaAdapter", "document_type"]
