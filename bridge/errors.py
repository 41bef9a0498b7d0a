"""The root of the ``bridge`` package's exception tree, and the roots of all three packages.

Every error ``bridge`` raises on purpose derives from :class:`FhirbridgeError`; the ``adapters`` and
``ledger`` packages have roots of their own, since they import nothing from ``bridge``.
:data:`ERROR_ROOTS` holds the three: the CLI maps them to exit codes in one place, the service to
OperationOutcomes. Details live in attributes, not in the message text, so that logs can show them
as keys and PHI stays out of message strings.
"""

from __future__ import annotations

from adapters.errors import AdapterError
from ledger.errors import LedgerError


class FhirbridgeError(Exception):
    """Base class of every deliberate fhirbridge error."""


class UsageError(FhirbridgeError):
    """A command was given arguments it cannot use (exit code 2)."""


class ConfigError(FhirbridgeError):
    """A configuration value is missing or invalid."""


class BrokerUnavailable(FhirbridgeError):
    """No Kafka-compatible broker could be reached or started."""


class TransientError(FhirbridgeError):
    """A dependency (database, broker) is down for now. Consumers pause, back off and retry; nothing is skipped."""


#: every package's error root (see the module docstring)
ERROR_ROOTS: tuple[type[Exception], ...] = (FhirbridgeError, AdapterError, LedgerError)
#: the roots, and ``ValueError`` (a bad value given where a caller checks none, such as an org id)
ERRORS_OR_VALUE: tuple[type[Exception], ...] = (*ERROR_ROOTS, ValueError)
