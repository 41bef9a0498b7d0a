"""Patient consent (issue 22): a person's FHIR R4 privacy Consents, evaluated for each access.

:mod:`bridge.service.consent.evaluate` is the pure evaluator (no I/O): which Consent and provision
permit or deny a requester's read of a resource, or the deployment's base policy when none applies.
The rules are in docs/consent.md.
"""
