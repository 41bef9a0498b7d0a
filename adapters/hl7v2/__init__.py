"""The HL7 v2 adapter (entry point ``hl7v2 = "adapters.hl7v2:HL7v2Adapter"``)."""

from __future__ import annotations

from adapters.hl7v2.adapter import HL7v2Adapter
from adapters.hl7v2.mapping import Conversion

__all__ = ["Conversion", "HL7v2Adapter"]
