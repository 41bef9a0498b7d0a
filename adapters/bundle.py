"""Assemble, stamp with Provenance, validate once, and serialise R4 transaction bundles (public API).

Adapters add resources to a :class:`BundleBuilder`, keyed by their business key, and call
:meth:`BundleBuilder.build`. The builder

* gives every resource its deterministic id (:func:`adapters.ids.resource_id`) unless it has one;
* writes each entry as ``PUT <Type>/<id>`` so that replaying a bundle is an idempotent upsert;
* adds one Provenance targeting every resource, naming the source organisation, the adapter name and
  version, and the SHA-256 of the raw input; conversion warnings become extensions on it;
* validates the whole bundle once against the ``fhir.resources.R4B`` models, then maps what R4B adds
  to R4 (:mod:`adapters.r4`), so that the bundle is FHIR 4.0.1, the version we serve;
* serialises it to canonical JSON (sorted keys, compact UTF-8), whose SHA-256 is the bundle hash.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import structlog
from pydantic import ValidationError

from adapters.base import ConversionWarning, ConvertedBundle, SourceInfo
from adapters.errors import Location, ValidationFailed
from adapters.ids import business_key, resource_id
from adapters.r4 import NotR4, bundle_to_r4, may_need_mapping
from adapters.validation import fast_accepts

log = structlog.get_logger(__name__)

WARNING_EXTENSION_URL = "https://fhirbridge.dev/fhir/StructureDefinition/conversion-warning"
ORG_IDENTIFIER_SYSTEM = "urn:fhirbridge:org"
ADAPTER_IDENTIFIER_SYSTEM = "urn:fhirbridge:adapter"
INPUT_HASH_SYSTEM = "urn:fhirbridge:input-sha256"
PARTICIPANT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
#: Provenance.recorded when the input carries no timestamp of its own. Deliberately not "now":
#: the bundle must be byte-identical when the same input is converted again.
EPOCH = "1970-01-01T00:00:00Z"


def canonical_json(obj: Any) -> bytes:
    """The canonical wire form: compact UTF-8 JSON with sorted keys."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def source_uri(org_id: str) -> str:
    """The ``meta.source`` every resource from ``org_id`` carries."""
    return f"urn:fhirbridge:{org_id}"


_bundle_model: Any = None


def validate_bundle(bundle: dict[str, Any]) -> None:
    """Validate against the R4B models. Raises pydantic's ValidationError, located in the bundle.

    Accepts and rejects exactly what ``Bundle.model_validate(bundle)`` accepts and rejects, with the
    same error. Cheaper on real feeds: :func:`adapters.validation.fast_accepts` walks the bundle,
    validates each primitive value with its field's own type, and builds a model only for an element
    whose shape (keys, None-ness, types) its class has not accepted before (see docs/validation.md).
    When it does not accept, the whole bundle is validated by
    ``Bundle.model_validate``, whose verdict and located error are the answer (the library raises a
    bare ``KeyError``/``TypeError`` for an unknown or non-string ``resourceType``; so does this).
    """
    global _bundle_model
    if fast_accepts(bundle):
        return
    if _bundle_model is None:
        from fhir.resources.R4B.bundle import Bundle  # 0.15 s to import: only once the fast path declines

        _bundle_model = Bundle
    _bundle_model.model_validate(bundle)  # raises with the error located in the bundle
    log.debug("bundle.r4b_fast_validation_declined", reason="not plain JSON, or declined by the fast path")


class BundleBuilder:
    """Collects the resources converted from one input record.

    ``record_key`` identifies the record inside the input (e.g. the message index); together with the
    input hash it makes the bundle id. ``recorded`` is the instant the source produced the record (an
    FHIR instant with offset); when the input has none, :data:`EPOCH` is used, never the wall clock.
    """

    def __init__(
        self,
        *,
        adapter_name: str,
        adapter_version: str,
        source: SourceInfo,
        input_sha256: str,
        record_key: str = "0",
        recorded: str | None = None,
    ) -> None:
        self.adapter_name = adapter_name
        self.adapter_version = adapter_version
        self.source = source
        self.input_sha256 = input_sha256
        self.record_key = record_key
        self.recorded = recorded or EPOCH
        self.warnings: list[ConversionWarning] = []
        self._entries: dict[str, dict[str, Any]] = {}

    # -- ids and references -------------------------------------------------------------------
    def id_for(self, resource_type: str, *key: object) -> str:
        return resource_id(self.source.org_id, resource_type, business_key(*key))

    def ref(self, resource_type: str, *key: object) -> str:
        """A ``Type/id`` reference to the resource with this business key (added or not)."""
        return f"{resource_type}/{self.id_for(resource_type, *key)}"

    def has(self, reference: str) -> bool:
        return reference in self._entries

    # -- content --------------------------------------------------------------------------------
    def add(self, resource: dict[str, Any], *key: object) -> str:
        """Add ``resource`` under its business key; returns its ``Type/id`` reference.

        A second resource with the same type and key replaces the first (the later segment wins),
        so a message that repeats a practitioner yields one Practitioner.
        """
        rtype = resource["resourceType"]
        if "id" not in resource:
            if not key:
                raise ValueError(f"{rtype} needs an id or a business key")
            resource["id"] = self.id_for(rtype, *key)
        meta = resource.setdefault("meta", {})
        meta.setdefault("source", source_uri(self.source.org_id))
        ref = f"{rtype}/{resource['id']}"
        self._entries[ref] = resource
        return ref

    def get(self, reference: str) -> dict[str, Any] | None:
        return self._entries.get(reference)

    def warn(self, code: str, message: str, location: Location | None = None) -> None:
        self.warnings.append(ConversionWarning(code, message, location or Location()))

    def __len__(self) -> int:
        return len(self._entries)

    # -- output ---------------------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        org = self.source.org_id
        prov: dict[str, Any] = {
            "resourceType": "Provenance",
            "id": resource_id(org, "Provenance", business_key(self.input_sha256, self.record_key)),
            "meta": {"source": source_uri(org)},
            "target": [{"reference": ref} for ref in self._entries],
            "recorded": self.recorded,
            "activity": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                        "code": "CREATE",
                        "display": "create",
                    }
                ]
            },
            "agent": [
                {
                    "type": {
                        "coding": [{"system": PARTICIPANT_TYPE_SYSTEM, "code": "author", "display": "Author"}]
                    },
                    "who": {
                        "identifier": {"system": ORG_IDENTIFIER_SYSTEM, "value": org},
                        "display": self.source.name or org,
                    },
                },
                {
                    "type": {
                        "coding": [
                            {"system": PARTICIPANT_TYPE_SYSTEM, "code": "assembler", "display": "Assembler"}
                        ]
                    },
                    "who": {
                        "identifier": {
                            "system": ADAPTER_IDENTIFIER_SYSTEM,
                            "value": f"{self.adapter_name}@{self.adapter_version}",
                        },
                        "display": f"fhirbridge {self.adapter_name} adapter {self.adapter_version}",
                    },
                },
            ],
            "entity": [
                {
                    "role": "source",
                    "what": {
                        "identifier": {"system": INPUT_HASH_SYSTEM, "value": self.input_sha256},
                        "display": f"{self.adapter_name} input, SHA-256 {self.input_sha256}",
                    },
                }
            ],
        }
        if self.warnings:
            prov["extension"] = [_warning_extension(w) for w in self.warnings]
        return prov

    def build(
        self,
        *,
        routing_key: str,
        message_id: str | None = None,
        location: Location | None = None,
        validate: bool = True,
        raw: bytes | None = None,
    ) -> ConvertedBundle:
        """Finish the bundle. Raises :class:`ValidationFailed` when it is not valid R4B, or holds R4B
        content that R4 cannot express (:class:`adapters.r4.NotR4`); what R4 can express otherwise is
        mapped to R4 (:mod:`adapters.r4`).

        ``raw``, the record's original bytes, is carried on the result for dead letters (not hashed)."""
        entries = list(self._entries.values())
        prov = self.provenance()
        entries.append(prov)
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": resource_id(self.source.org_id, "Bundle", business_key(self.input_sha256, self.record_key)),
            "type": "transaction",
            "timestamp": self.recorded,
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{r['id']}",
                    "resource": r,
                    "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
                }
                for r in entries
            ],
        }
        if validate:
            try:
                validate_bundle(bundle)
            except (KeyError, TypeError) as exc:
                # the R4B models raise these bare for an unknown, empty or non-string resourceType
                raise ValidationFailed(
                    self.adapter_name,
                    [{"loc": ("entry", "resource", "resourceType"), "msg": f"{type(exc).__name__}: {exc}"}],
                    location,
                ) from exc
            except ValidationError as exc:
                raise ValidationFailed(
                    self.adapter_name,
                    [{"loc": e["loc"], "msg": e["msg"]} for e in exc.errors()],
                    location,
                ) from exc
        body = canonical_json(bundle)
        if may_need_mapping(bundle, body):  # a few scans of the bytes; the walk only when R4B may be there
            try:
                if bundle_to_r4(bundle):
                    body = canonical_json(bundle)
            except NotR4 as exc:
                raise ValidationFailed(
                    self.adapter_name, [{"loc": exc.loc, "msg": exc.reason}], location
                ) from exc
        return ConvertedBundle(
            bundle=bundle,
            body=body,
            sha256=hashlib.sha256(body).hexdigest(),
            routing_key=routing_key,
            message_id=message_id,
            input_sha256=self.input_sha256,
            warnings=tuple(self.warnings),
            location=location or Location(),
            raw=raw,
        )


def _warning_extension(w: ConversionWarning) -> dict[str, Any]:
    ext: list[dict[str, Any]] = [
        {"url": "code", "valueCode": w.code},
        {"url": "message", "valueString": w.message},
    ]
    loc = str(Location(**{k: v for k, v in w.location.to_dict().items() if k != "file"}))
    if loc != "(unknown location)":
        ext.append({"url": "location", "valueString": loc})
    return {"url": WARNING_EXTENSION_URL, "extension": ext}
