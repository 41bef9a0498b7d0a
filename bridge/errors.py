"""The root of fhirbridge's exception tree.

Every error fhirbridge raises on purpose derives from :class:`FhirbridgeError`. Details live in
attributes, not in the message text, so that logs can show them as keys and PHI stays out of
message strings.
"""

from __future__ import annotations


class FhirbridgeError(Exception):
    """Base class of every deliberate fhirbridge error."""


class ConfigError(FhirbridgeError):
    """A configuration value is missing or invalid."""


class BrokerUnavailable(FhirbridgeError):
    """No Kafka-compatible broker could be reached or started."""


class TransientError(FhirbridgeError):
    """A dependency (database, broker) is down for now. Consumers pause, back off and retry; nothing is skipped."""
