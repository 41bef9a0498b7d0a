"""R4B -> R4 (4.0.1) at production time: what the R4B models accept and R4 does not define (public API).

Bundles are validated against ``fhir.resources.R4B`` (FHIR 4.3.0), but fhirbridge serves and declares
FHIR 4.0.1. R4B is R4 plus a small set of additions; a strict R4 client refuses any of them. Comparing
the R4B models with strict R4 models element by element (``tests/unit/adapters/test_r4_output.py`` does
it with SMART's ``fhirclient``) gives exactly these additions, and this module's answer to each:

* the data type ``CodeableReference`` (new in R4B) as the choice of an open-type element
  (``Extension.value[x]``, ``ElementDefinition.defaultValue[x]``/``fixed[x]``/``pattern[x]``/
  ``example.value[x]``): **mapped** when R4 can say the same thing, i.e. when it holds only a
  ``concept`` (-> ``<name>CodeableConcept``) or only a ``reference`` (-> ``<name>Reference``), and has
  no ``id``/``extension`` of its own; otherwise refused;
* the data type ``RatioRange`` (new in R4B) in the same positions: refused (R4 has no range of ratios);
* ``ActivityDefinition.subjectCanonical``, ``PlanDefinition.subjectCanonical`` and
  ``PlanDefinition.action.subjectCanonical`` (at any depth of ``action``), the only elements of that name
  in either version: refused (R4 has only a CodeableConcept or Reference subject);
* the resource types new in R4B (:data:`R4B_ONLY_TYPES`), and ``Evidence`` and ``EvidenceVariable``,
  whose R4B definitions replace R4's (R4B Evidence lacks R4's required ``exposureBackground``): refused.

"Refused" raises :class:`NotR4`, located; nothing is dropped silently. Everything else R4B accepts is
the same in R4, so a bundle with none of the above is returned untouched (and its bytes unchanged).
Required value-set bindings are not compared: neither model set checks codes.
"""

from __future__ import annotations

from typing import Any

from adapters.errors import AdapterError

#: Resource types defined by R4B (4.3.0) and absent from R4 (4.0.1).
R4B_ONLY_TYPES = frozenset(
    {
        "AdministrableProductDefinition",
        "Citation",
        "ClinicalUseDefinition",
        "EvidenceReport",
        "Ingredient",
        "ManufacturedItemDefinition",
        "MedicinalProductDefinition",
        "NutritionProduct",
        "PackagedProductDefinition",
        "RegulatedAuthorization",
        "SubscriptionStatus",
        "SubscriptionTopic",
        "SubstanceDefinition",
    }
)
#: Resource types R4 has, redefined by R4B so that R4B content is not R4 content.
REDEFINED_TYPES = frozenset({"Evidence", "EvidenceVariable"})
#: the one element name that R4B adds to resources R4 has (ActivityDefinition, PlanDefinition and its
#: actions); no R4 element has this name
SUBJECT_CANONICAL = "subjectCanonical"
#: the open-type choice elements whose R4B type list adds CodeableReference and RatioRange
OPEN_CHOICES = ("value", "defaultValue", "fixed", "pattern")

Path = tuple[str | int, ...]


class NotR4(AdapterError):
    """Valid R4B content that R4 (4.0.1) cannot express. ``loc`` is its path from where the mapping
    started (``('entry', 3, 'resource', 'extension', 0, 'valueRatioRange')``)."""

    def __init__(self, loc: Path, reason: str) -> None:
        super().__init__(f"{'.'.join(str(p) for p in loc)}: {reason}")
        self.loc = loc
        self.reason = reason


#: the keys R4B adds to elements R4 has (see the module doc)
R4B_ONLY_KEYS = frozenset(
    {f"{choice}{t}" for choice in OPEN_CHOICES for t in ("CodeableReference", "RatioRange")}
    | {SUBJECT_CANONICAL, "_" + SUBJECT_CANONICAL}
)
#: every key of R4B_ONLY_KEYS ends with one of these and its closing quote
_KEY_MARKERS = (b'CodeableReference"', b'RatioRange"', b'subjectCanonical"')
_REFUSED_TYPES = R4B_ONLY_TYPES | REDEFINED_TYPES


def may_need_mapping(bundle: dict[str, Any], body: bytes) -> bool:
    """False only when :func:`bundle_to_r4` would find nothing to do in ``bundle``, whose JSON is
    ``body`` as an encoder writes it (orjson, json: the letters of a key are never ``\\u``-escaped):
    no key of :data:`R4B_ONLY_KEYS` appears in the text, no entry is of a refused type, and no resource
    is nested in another (``"resourceType"`` occurs once per entry and once for the bundle). True may be
    a false alarm (such text inside a string value, or a contained resource); :func:`bundle_to_r4` then
    changes nothing. Four scans of the bytes (about 35 µs for a 33 kB bundle) instead of a walk of
    every element (about 200 µs)."""
    if any(marker in body for marker in _KEY_MARKERS):
        return True
    tops = 1 if "resourceType" in bundle else 0
    for entry in bundle.get("entry") or ():
        res = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(res, dict) and "resourceType" in res:
            if res["resourceType"] in _REFUSED_TYPES:
                return True
            tops += 1
    return body.count(b'"resourceType"') != tops


def bundle_to_r4(bundle: dict[str, Any]) -> bool:
    """Map every ``entry[i].resource`` of a valid R4B bundle to R4, in place (see the module doc).

    Returns whether anything changed. Raises :class:`NotR4` located at ``('entry', i, 'resource', ...)``
    for content R4 cannot express; the bundle may then be partly mapped."""
    changed = False
    for i, entry in enumerate(bundle.get("entry") or ()):
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            changed |= _resource(entry["resource"], (((None, "entry"), i), "resource"))
    return changed


def resource_to_r4(resource: dict[str, Any], loc: Path = ()) -> bool:
    """Map one valid R4B resource (with its contained and nested resources) to R4, in place.

    Returns whether anything changed; raises :class:`NotR4`, located under ``loc``."""
    chain: Any = None
    for part in loc:
        chain = (chain, part)
    return _resource(resource, chain)


# The walk keeps its location as a chain of pairs (parent, key), flattened only for an error: building a
# path tuple at every key made the walk of a 33 kB bundle cost 600 µs.
def _path(chain: Any) -> Path:
    parts: list[str | int] = []
    while chain is not None:
        chain, part = chain
        parts.append(part)
    return tuple(reversed(parts))


def _resource(res: dict[str, Any], chain: Any) -> bool:
    rtype = res.get("resourceType")
    if rtype in R4B_ONLY_TYPES:
        raise NotR4(_path((chain, "resourceType")), f"{rtype} is an R4B resource type that R4 does not have")
    if rtype in REDEFINED_TYPES:
        raise NotR4(
            _path((chain, "resourceType")), f"{rtype} is redefined in R4B; its content is not R4's {rtype}"
        )
    return _element(res, chain)


def _element(node: dict[str, Any], chain: Any) -> bool:
    changed = False
    for key in R4B_ONLY_KEYS.intersection(node):
        here = (chain, key)
        if key.endswith(SUBJECT_CANONICAL):
            raise NotR4(_path(here), "subjectCanonical is new in R4B; R4 has no canonical subject")
        if key.endswith("RatioRange"):
            raise NotR4(_path(here), "RatioRange is an R4B data type; R4 cannot express a range of ratios")
        value = node.pop(key)
        r4_key = _codeable_reference(key[: -len("CodeableReference")], value, here)
        node[r4_key] = value["concept" if "concept" in value else "reference"]
        changed = True
    for key, value in node.items():
        if type(value) is dict:
            here = (chain, key)
            changed |= _resource(value, here) if "resourceType" in value else _element(value, here)
        elif type(value) is list:
            for i, item in enumerate(value):
                if type(item) is dict:
                    at = ((chain, key), i)
                    changed |= _resource(item, at) if "resourceType" in item else _element(item, at)
    return changed


def _codeable_reference(prefix: str, value: Any, chain: Any) -> str:
    """The R4 key for a CodeableReference ``value`` of choice ``prefix``; raises NotR4 when R4 would
    lose part of it."""
    keys = set(value) if isinstance(value, dict) else set()
    if keys == {"concept"}:
        return prefix + "CodeableConcept"
    if keys == {"reference"}:
        return prefix + "Reference"
    raise NotR4(
        _path(chain),
        "CodeableReference is an R4B data type; R4 can carry it only as a concept alone or a reference "
        f"alone, and this one has {', '.join(sorted(keys)) or 'nothing'}",
    )
