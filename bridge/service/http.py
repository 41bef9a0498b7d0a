"""FHIR-flavoured HTTP helpers shared by every aiohttp route module."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

FHIR_JSON = "application/fhir+json"


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Serialise ``body`` with orjson as ``application/fhir+json``."""
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type=FHIR_JSON,
        charset="utf-8",
        headers=headers,
    )


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def operation_outcome(
    severity: str, code: str, diagnostics: str, *, expression: list[str] | None = None
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_response(status: int, code: str, diagnostics: str, *, severity: str = "error") -> web.Response:
    """An OperationOutcome error response. ``code`` is a FHIR issue-type code (not-found, invalid, ...)."""
    return fhir_response(operation_outcome(severity, code, diagnostics), status=status)


class FhirHTTPError(Exception):
    """Raise from a handler to answer with an OperationOutcome; the middleware renders it."""

    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
