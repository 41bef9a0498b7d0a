"""What we produce and serve is exact FHIR R4 (4.0.1), judged by a strict R4 library we did not write.

The judge is SMART's ``fhirclient`` (``fhirclient.models.*``, generated from FHIR 4.0.1): a model built
with ``strict=True`` raises ``FHIRValidationError`` for an element R4 does not define, a wrong JSON type,
a malformed date or a missing required element. It checks:

* every resource of every bundle the adapters make from every shared sample input (one test per file,
  so that a failure names it);
* the R4B -> R4 mapping of ``adapters/r4.py``: unit and property tests, and that its list of what R4B
  adds is the difference between the R4B models and the R4 models, computed here from both;
* the resources the query service builds itself (CapabilityStatement, OperationOutcome, Person,
  AuditEvent, Parameters), with no index.
"""

from __future__ import annotations

import copy
import csv
import functools
import importlib
import inspect
import json
import os
import pkgutil
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fhirclient import models as r4_models
from fhirclient.models.bundle import Bundle as R4Bundle
from fhirclient.models.fhirabstractbase import FHIRAbstractBase, FHIRValidationError
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import Adapter, ConvertedBundle, SourceInfo
from adapters.bundle import BundleBuilder, canonical_json, validate_bundle
from adapters.ccda import CcdaAdapter
from adapters.errors import ValidationFailed
from adapters.fhirjson import FhirPassthroughAdapter
from adapters.hl7v2 import HL7v2Adapter
from adapters.mappedcsv import EXAMPLES, MappedCsvAdapter
from adapters.r4 import (
    OPEN_CHOICES,
    R4B_ONLY_KEYS,
    R4B_ONLY_TYPES,
    REDEFINED_TYPES,
    NotR4,
    bundle_to_r4,
    may_need_mapping,
    resource_to_r4,
)
from adapters.synthea import SyntheaCsvAdapter

# the same place as the `samples` fixture (tests/conftest.py), needed at collection time to parametrise
SAMPLES = Path(
    os.environ.get("FHIRBRIDGE_SAMPLES", Path(__file__).resolve().parents[3].parent / "shared" / "samples")
)
SRC = SourceInfo("samples", timezone="America/New_York")


# -- the judge -----------------------------------------------------------------------------------------
def r4_class(resource_type: str) -> type[FHIRAbstractBase]:
    """fhirclient's R4 model of ``resource_type`` (KeyError when R4 has no such resource type)."""
    try:
        cls = getattr(importlib.import_module(f"fhirclient.models.{resource_type.lower()}"), resource_type)
    except (ImportError, AttributeError):
        raise KeyError(f"R4 has no resource type {resource_type!r}") from None
    return cls  # type: ignore[no-any-return]


def r4_errors(resource: dict[str, Any]) -> list[str]:
    """Why fhirclient's strict R4 model of the resource's type refuses ``resource`` (empty: accepted)."""
    try:
        r4_class(resource["resourceType"])(copy.deepcopy(resource), strict=True)
    except KeyError as exc:
        return [str(exc)]
    except FHIRValidationError as exc:
        return [re.sub(r" object at 0x[0-9a-f]+", "", line.strip()) for line in str(exc).splitlines()]
    return []


def assert_r4(resource: dict[str, Any], where: str = "") -> None:
    errors = r4_errors(resource)
    assert not errors, f"{where} {resource.get('resourceType')}/{resource.get('id')}: {errors}"


def assert_bundle_r4(cb: ConvertedBundle, where: str) -> None:
    for i, e in enumerate(cb.bundle["entry"]):
        assert_r4(e["resource"], f"{where} entry[{i}]")
    R4Bundle(json.loads(cb.body), strict=True)  # the whole bundle too, as served: from its bytes


def test_the_judge_refuses_what_r4_does_not_define() -> None:
    patient = {"resourceType": "Patient", "id": "p", "birthDate": "1980-02-14"}
    assert r4_errors(patient) == []
    assert any("Superfluous" in e for e in r4_errors({**patient, "bogus": 1}))
    assert r4_errors({**patient, "birthDate": "1980-13-01"})
    assert r4_errors({**patient, "active": "true"})  # a JSON string is not a JSON boolean
    ext = {"url": "u", "valueCodeableReference": {"concept": {"text": "x"}}}
    assert any("valueCodeableReference" in e for e in r4_errors({**patient, "extension": [ext]}))
    assert r4_errors({"resourceType": "Citation", "id": "c", "status": "active"})


# -- every sample input, through every adapter that reads its format --------------------------------------
def _manifest_inputs() -> list[tuple[str, str]]:
    """(path, format) of every manifest row with role ``input``."""
    manifest = SAMPLES / "manifest.csv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="", encoding="utf-8") as f:
        return [(row["local_path"], row["format"]) for row in csv.DictReader(f) if row["role"] == "input"]


def _adapter_for(rel: str, fmt: str) -> Adapter:
    if fmt == "hl7v2":
        return HL7v2Adapter()
    if fmt == "ccda":
        return CcdaAdapter()
    if fmt == "ccda-fragment":
        return CcdaAdapter(fragments="true")
    if fmt == "csv":
        mapping = (
            "simplereport-patients" if rel.startswith("csv/simplereport/") else "reportstream-lab-results"
        )
        return MappedCsvAdapter(mapping=str(EXAMPLES / f"{mapping}.toml"))
    if fmt in ("fhir-stu3-json", "custom-json", "fhir-r4-json"):
        return FhirPassthroughAdapter()  # STU3 and custom JSON are refused; what converts must be R4
    raise AssertionError(f"no adapter for sample format {fmt!r} ({rel}): add it here")


def _inputs() -> list[tuple[str, Callable[[], Adapter]]]:
    out: list[tuple[str, Callable[[], Adapter]]] = [
        (rel, functools.partial(_adapter_for, rel, fmt)) for rel, fmt in _manifest_inputs()
    ]
    # Synthea's export is not in the manifest (synthea/SOURCES.md): its CSV directory and FHIR bundles
    if (SAMPLES / "synthea").is_dir():
        out.append(("synthea/csv", SyntheaCsvAdapter))
        out += [
            (str(p.relative_to(SAMPLES)), FhirPassthroughAdapter)
            for p in sorted((SAMPLES / "synthea" / "fhir").glob("*.json"))
        ]
    return out


INPUTS = _inputs()
#: one input of each adapter, kept out of the slow mark so that `-m "not slow"` still covers them all
QUICK = {
    "hl7v2/ms-fhir-converter/ORU-R01-01.hl7",
    "ccda/ms-fhir-converter/CCD.ccda",
    "csv/reportstream/ReportStream-StandardCSV-ExampleData-20220509.csv",
    "csv/simplereport/patients/valid.csv",
    "synthea/csv",
}


def _convert(rel: str, make: Callable[[], Adapter]) -> list[ConvertedBundle]:
    path = SAMPLES / rel
    adapter = make()
    outs = (
        adapter.convert_path(path, SRC)
        if path.is_dir()
        else adapter.convert(path.read_bytes(), SRC, filename=str(path))
    )
    return [o for o in outs if isinstance(o, ConvertedBundle)]


def test_every_sample_input_is_covered(samples: Path) -> None:
    rels = [rel for rel, _ in INPUTS]
    assert len(rels) == len(set(rels))
    assert len(rels) == 634 + 5  # the manifest's inputs, Synthea's CSV export and its 4 FHIR bundles
    assert set(rels) >= QUICK
    for rel, fmt in _manifest_inputs():
        _adapter_for(rel, fmt)  # every format has its adapter


@pytest.mark.parametrize(
    "rel,make",
    [pytest.param(rel, make, marks=() if rel in QUICK else pytest.mark.slow) for rel, make in INPUTS],
    ids=[rel for rel, _ in INPUTS],
)
def test_sample_output_is_strict_r4(rel: str, make: Callable[[], Adapter], samples: Path) -> None:
    for n, cb in enumerate(_convert(rel, make)):
        assert_bundle_r4(cb, f"{rel} bundle {n}")
        # nothing in our output was R4B-only: the mapping had nothing to change
        assert not bundle_to_r4(copy.deepcopy(cb.bundle))


@pytest.mark.xfail(
    strict=True,
    reason="the fhir passthrough re-emits JSON strings where R4 wants a number or a boolean "
    '("value": "10", "valueBoolean": "true"): pydantic\'s lax mode in the R4B models accepts them; '
    "not an R4B element, so not mapped by adapters/r4.py (to fix in adapters/fhirjson)",
)
@pytest.mark.parametrize("name", ["Parameters.json", "ValueSet.json"])
def test_passthrough_of_json_strings_for_numbers_and_booleans_is_not_r4(name: str, samples: Path) -> None:
    f = samples / "expected" / "fhir" / "ms-fhir-converter-stu3" / name
    [cb] = _convert(str(f.relative_to(samples)), FhirPassthroughAdapter)
    assert_bundle_r4(cb, name)


# -- the mapping, unit by unit ---------------------------------------------------------------------------
def _builder() -> BundleBuilder:
    return BundleBuilder(
        adapter_name="test", adapter_version="1", source=SourceInfo("acme"), input_sha256="0" * 64
    )


def _patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "p1", **extra}


CONCEPT = {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}], "text": "hypertension"}
REFERENCE = {"reference": "Condition/c1", "display": "hypertension"}


@pytest.mark.parametrize(
    "value,r4_key,r4_value",
    [
        ({"concept": CONCEPT}, "valueCodeableConcept", CONCEPT),
        ({"reference": REFERENCE}, "valueReference", REFERENCE),
    ],
)
def test_a_codeable_reference_extension_becomes_the_r4_choice_that_says_the_same(
    value: dict[str, Any], r4_key: str, r4_value: dict[str, Any]
) -> None:
    b = _builder()
    b.add(_patient(extension=[{"url": "https://x.example/e", "valueCodeableReference": value}]))
    cb = b.build(routing_key="p1")
    patient = cb.bundle["entry"][0]["resource"]
    assert patient["extension"] == [{"url": "https://x.example/e", r4_key: r4_value}]
    assert (
        b"CodeableReference" not in cb.body and json.loads(cb.body) == cb.bundle
    )  # the bytes are mapped too
    assert_bundle_r4(cb, "mapped")
    validate_bundle(cb.bundle)  # still valid R4B: R4 is a subset


def test_a_bundle_without_r4b_content_is_built_exactly_as_before() -> None:
    b = _builder()
    b.add(_patient(extension=[{"url": "https://x.example/e", "valueCodeableConcept": CONCEPT}]))
    cb = b.build(routing_key="p1")
    assert not may_need_mapping(cb.bundle, cb.body)
    assert cb.body == canonical_json(cb.bundle)


@pytest.mark.parametrize(
    "resource,loc,needle",
    [
        (
            {"resourceType": "Citation", "id": "c1", "status": "active"},
            ("resourceType",),
            "R4B resource type",
        ),
        (
            {
                "resourceType": "Evidence",
                "id": "e1",
                "status": "active",
                "variableDefinition": [{"variableRole": {"text": "population"}}],
            },
            ("resourceType",),
            "redefined in R4B",
        ),
        (
            _patient(extension=[{"url": "u", "valueRatioRange": {"denominator": {"value": 1}}}]),
            ("extension", 0, "valueRatioRange"),
            "range of ratios",
        ),
        (
            _patient(
                extension=[
                    {"url": "u", "valueCodeableReference": {"concept": CONCEPT, "reference": REFERENCE}}
                ]
            ),
            ("extension", 0, "valueCodeableReference"),
            "concept, reference",
        ),
        (
            _patient(extension=[{"url": "u", "valueCodeableReference": {"id": "x", "concept": CONCEPT}}]),
            ("extension", 0, "valueCodeableReference"),
            "concept, id",
        ),
        (
            {
                "resourceType": "PlanDefinition",
                "id": "pd",
                "status": "draft",
                "action": [{"title": "a", "action": [{"title": "b", "subjectCanonical": "http://x/y"}]}],
            },
            ("action", 0, "action", 0, "subjectCanonical"),
            "subjectCanonical",
        ),
        (
            {
                "resourceType": "ActivityDefinition",
                "id": "ad",
                "status": "draft",
                "subjectCanonical": "http://x",
            },
            ("subjectCanonical",),
            "subjectCanonical",
        ),
        (
            _patient(
                contained=[
                    {"resourceType": "SubscriptionTopic", "id": "t", "url": "http://x", "status": "active"}
                ]
            ),
            ("contained", 0, "resourceType"),
            "SubscriptionTopic",
        ),
    ],
)
def test_what_r4_cannot_express_is_refused_located_by_the_builder(
    resource: dict[str, Any], loc: tuple[Any, ...], needle: str
) -> None:
    validate_bundle(
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": resource}]}
    )  # R4B
    b = _builder()
    b.add(copy.deepcopy(resource))
    with pytest.raises(ValidationFailed) as info:
        b.build(routing_key="x")
    [err] = info.value.errors
    assert err["loc"] == ("entry", 0, "resource", *loc) and needle in err["msg"]
    assert isinstance(info.value.__cause__, NotR4)


def test_the_fhir_passthrough_refuses_an_r4b_only_resource_and_maps_a_codeable_reference() -> None:
    citation = {"resourceType": "Citation", "id": "c1", "status": "active"}
    [out] = FhirPassthroughAdapter().convert(json.dumps(citation).encode(), SRC, filename="c.json")
    assert not isinstance(out, ConvertedBundle) and "R4B resource type" in out.error.message
    ext = {"url": "https://x.example/e", "valueCodeableReference": {"reference": {"reference": "Patient/p1"}}}
    [cb] = FhirPassthroughAdapter().convert(json.dumps(_patient(extension=[ext])).encode(), SRC)
    assert isinstance(cb, ConvertedBundle)
    assert cb.bundle["entry"][0]["resource"]["extension"][0]["valueReference"]["reference"].startswith(
        "Patient/"
    )
    assert_bundle_r4(cb, "passthrough")


# -- the mapping, property-tested ----------------------------------------------------------------------------
_texts = st.text(alphabet="abcdefgh", min_size=1, max_size=6)
_concepts = st.fixed_dictionaries({"text": _texts})
_refs = st.fixed_dictionaries({"reference": _texts.map(lambda s: f"Patient/{s}")})


@st.composite
def _extensions(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    """An R4B extension: a plain value, a CodeableReference R4 can say, or nested extensions."""
    kind = draw(st.sampled_from(["string", "concept", "reference", "nested"] if depth < 3 else ["string"]))
    url = f"https://x.example/{draw(_texts)}"
    if kind == "string":
        return {"url": url, "valueString": draw(_texts)}
    if kind == "concept":
        return {"url": url, "valueCodeableReference": {"concept": draw(_concepts)}}
    if kind == "reference":
        return {"url": url, "valueCodeableReference": {"reference": draw(_refs)}}
    return {"url": url, "extension": draw(st.lists(_extensions(depth + 1), min_size=1, max_size=3))}


def _r4_view(ext: dict[str, Any]) -> dict[str, Any]:
    """What the mapping must turn ``ext`` into, written independently of it."""
    out = {k: v for k, v in ext.items() if k not in ("valueCodeableReference", "extension")}
    cr = ext.get("valueCodeableReference")
    if cr is not None:
        out["valueCodeableConcept" if "concept" in cr else "valueReference"] = (
            cr.get("concept") or cr["reference"]
        )
    if "extension" in ext:
        out["extension"] = [_r4_view(e) for e in ext["extension"]]
    return out


def _keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _keys(v)
    elif isinstance(node, list):
        for v in node:
            yield from _keys(v)


@settings(max_examples=150, deadline=None)
@given(st.lists(_extensions(), min_size=1, max_size=4), st.booleans())
def test_mapped_extensions_are_strict_r4_say_the_same_and_map_once(
    exts: list[dict[str, Any]], in_name: bool
) -> None:
    patient = _patient(extension=exts)
    if in_name:  # the same extensions deeper: on an element, and on a primitive (which fhirclient skips)
        patient["name"] = [{"family": "X", "extension": copy.deepcopy(exts)}]
        patient["birthDate"] = "1980-02-14"
        patient["_birthDate"] = {"extension": copy.deepcopy(exts)}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": patient}]}
    validate_bundle(bundle)
    had = any(k.endswith("CodeableReference") for k in _keys(patient))
    assert may_need_mapping(bundle, canonical_json(bundle)) or not had
    before = copy.deepcopy(patient)
    assert bundle_to_r4(bundle) == had
    assert patient["extension"] == [_r4_view(e) for e in before["extension"]]
    assert not R4B_ONLY_KEYS.intersection(_keys(patient))
    assert_r4(patient, "property")
    validate_bundle(bundle)
    again = copy.deepcopy(bundle)
    assert not bundle_to_r4(again) and again == bundle  # idempotent


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(R4B_ONLY_KEYS)), st.integers(0, 3), st.booleans())
def test_the_byte_check_never_misses_what_the_walk_acts_on(key: str, depth: int, contained: bool) -> None:
    """Any R4B-only key, in extensions at any depth, on an element or in a contained resource."""
    node: dict[str, Any] = {"url": "u", key: {}}
    for _ in range(depth):
        node = {"url": "u", "extension": [node]}
    if contained:
        basic = {"resourceType": "Basic", "id": "b", "code": {"text": "t"}, "extension": [node]}
        patient = _patient(contained=[basic])
    else:
        patient = _patient(name=[{"family": "X", "extension": [node]}])
    bundle = {"resourceType": "Bundle", "entry": [{"resource": patient}]}
    assert may_need_mapping(bundle, canonical_json(bundle))
    assert may_need_mapping(bundle, json.dumps(bundle, indent=1).encode())  # with whitespace too
    with pytest.raises(NotR4):  # an empty CodeableReference, a RatioRange, a subjectCanonical: refused
        bundle_to_r4(bundle)


def test_a_resource_nested_in_another_is_walked_even_without_key_markers() -> None:
    topic = {"resourceType": "SubscriptionTopic", "id": "t", "url": "http://x", "status": "active"}
    bundle = {"resourceType": "Bundle", "entry": [{"resource": _patient(contained=[topic])}]}
    assert may_need_mapping(bundle, canonical_json(bundle))
    with pytest.raises(NotR4) as info:
        bundle_to_r4(bundle)
    assert info.value.loc == ("entry", 0, "resource", "contained", 0, "resourceType")


def test_resource_to_r4_locates_under_the_given_path() -> None:
    with pytest.raises(NotR4) as info:
        resource_to_r4({"resourceType": "Ingredient", "id": "i"}, ("Consent",))
    assert info.value.loc == ("Consent", "resourceType")


# -- the list of what R4B adds is complete: the two model sets, compared -----------------------------------
def _r4_classes() -> dict[str, type[FHIRAbstractBase]]:
    out: dict[str, type[FHIRAbstractBase]] = {}
    for m in pkgutil.iter_modules(r4_models.__path__):
        mod = importlib.import_module(f"fhirclient.models.{m.name}")
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, FHIRAbstractBase) and cls.__module__ == mod.__name__:
                out.setdefault(name, cls)
    return out


class _R4BElement(typing.NamedTuple):
    type: str  # a complex type's model name, else the JSON kind of a primitive: str, bool, int, number
    is_list: bool
    required: bool
    choice: str | None  # the choice element it is part of, required or not
    choice_required: bool


def _r4b_elements(cls: Any) -> dict[str, _R4BElement]:
    """JSON name -> what the R4B model says of each element of ``cls``."""
    out = {}
    for field in cls.model_fields.values():
        extra = field.json_schema_extra
        if not isinstance(extra, dict) or not extra.get("element_property"):
            continue
        text = str(field.annotation)
        m = re.search(r"abc\.(\w+)Type\b", text)
        kind = (
            "bool"
            if "bool" in text
            else "number"
            if "Decimal" in text
            else "int"
            if "[int" in text
            else "str"
        )
        out[str(field.alias)] = _R4BElement(
            m.group(1) if m else kind,
            "List[" in text,
            field.is_required() or bool(extra.get("element_required")),
            typing.cast(str | None, extra.get("one_of_many")),
            bool(extra.get("one_of_many_required")),
        )
    return out


#: fhirclient's Python type of an R4 primitive -> its JSON kind
_R4_KINDS = {"str": "str", "bool": "bool", "int": "int", "float": "number"}


def _r4b_additions() -> tuple[set[str], set[tuple[str, str]], set[tuple[str, str, str]]]:
    """(resource types R4 lacks, {(R4B class, element)} that R4's class of that element lacks,
    {(R4B class, element, difference)} for the elements both have: list or not, required in R4 only, a
    required choice in R4 only, another type or JSON kind), found by walking every R4B resource type's
    elements alongside R4's, from the R4B models and fhirclient's."""
    from fhir.resources.R4B import get_fhir_model_class

    r4 = _r4_classes()
    types_r4_lacks: set[str] = set()
    elements: set[tuple[str, str]] = set()
    shapes: set[tuple[str, str, str]] = set()
    seen: set[tuple[str, str]] = set()

    def walk(b_name: str, r4_name: str) -> None:
        if (b_name, r4_name) in seen:
            return
        seen.add((b_name, r4_name))
        b_cls, r_cls = get_fhir_model_class(b_name), r4[r4_name]
        # fhirclient: (name, json name, type, is list, of many, not optional)
        r_props = {p[1]: p for p in r_cls().elementProperties()}
        b_props = _r4b_elements(b_cls)
        r4_choices = {p[4] for p in r_props.values() if p[4] and p[5]}
        b_choices = {b.choice for b in b_props.values() if b.choice and b.choice_required}
        shapes.update((b_name, c, "a required choice in R4 only") for c in r4_choices - b_choices)
        for name, b in b_props.items():
            if name not in r_props:
                elements.add((b_name, name))
                continue
            _, _, r_type, r_list, r_choice, r_required = r_props[name]
            if r_list != b.is_list:
                shapes.add((b_name, name, f"list in R4: {r_list}, in R4B: {b.is_list}"))
            if r_required and not r_choice and not b.required:
                shapes.add((b_name, name, "required in R4 only"))
            r_name = "Reference" if r_type.__name__ == "FHIRReference" else r_type.__name__
            if hasattr(r_type, "elementProperties"):
                if b.type == "Resource" and r_name == "Resource":
                    continue
                if b.type != r_name:
                    shapes.add((b_name, name, f"type in R4: {r_name}, in R4B: {b.type}"))
                else:
                    walk(b.type, r_type.__name__)
            elif _R4_KINDS.get(r_name, "str") != b.type:
                shapes.add((b_name, name, f"JSON kind in R4: {r_name}, in R4B: {b.type}"))

    import fhir.resources.R4B as r4b_package

    for m in pkgutil.iter_modules(r4b_package.__path__):
        if m.name in ("fhirtypes", "fhirtypesvalidators") or m.ispkg:
            continue
        mod = importlib.import_module(f"fhir.resources.R4B.{m.name}")
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            bases = [b.__name__ for b in cls.__mro__[1:]]
            if cls.__module__ != mod.__name__ or not (
                "DomainResource" in bases or name in ("Bundle", "Parameters", "Binary")
            ):
                continue
            if typing.cast(Any, cls).get_resource_type() != name:
                continue
            if name not in r4:
                types_r4_lacks.add(name)
            else:
                walk(name, name)
    return types_r4_lacks, elements, shapes


@pytest.mark.slow
def test_adapters_r4_knows_every_addition_of_r4b_and_no_other() -> None:
    types_r4_lacks, elements, shapes = _r4b_additions()
    assert types_r4_lacks == set(R4B_ONLY_TYPES)
    # Evidence and EvidenceVariable are refused whole: every element R4B adds to them is covered
    outside = {(cls, el) for cls, el in elements if not cls.startswith(tuple(REDEFINED_TYPES))}
    keys = {el for _, el in outside}
    assert keys == set(R4B_ONLY_KEYS) - {"_subjectCanonical"}, sorted(outside)
    hosts = {cls for cls, el in outside if el != "subjectCanonical"}
    assert hosts == {"Extension", "ElementDefinition", "ElementDefinitionExample"}, hosts
    assert {cls for cls, el in outside if el == "subjectCanonical"} == {
        "ActivityDefinition",
        "PlanDefinition",
        "PlanDefinitionAction",
    }
    assert {
        el[: -len(t)] for el in keys for t in ("CodeableReference", "RatioRange") if el.endswith(t)
    } <= set(OPEN_CHOICES)
    assert {cls for cls, _ in elements} & set(REDEFINED_TYPES)  # they do differ
    # every element both define has the same cardinality, type and JSON kind, outside the redefined types
    assert {s for s in shapes if not s[0].startswith(tuple(REDEFINED_TYPES))} == set()
    assert {s[0] for s in shapes} & set(REDEFINED_TYPES)


# -- what the service builds itself ----------------------------------------------------------------------------
def test_capability_statement_is_strict_r4() -> None:
    from bridge.service.fhir.capability import capability_statement

    cs = capability_statement("https://fhir.example/base", issuer="https://idp.example")
    assert cs["fhirVersion"] == "4.0.1"
    assert_r4(cs, "metadata")
    for rest in cs["rest"]:  # every type it declares is an R4 resource type
        for res in rest["resource"]:
            r4_class(res["type"])


def test_operation_outcomes_are_strict_r4() -> None:
    from bridge.service.consent.enforce import suppressed_outcome
    from bridge.service.http import operation_outcome

    assert_r4(operation_outcome("error", "invalid", "bad _count"))
    assert_r4(operation_outcome("warning", "not-supported", "x", expression=["Patient.name"]))
    assert_r4(suppressed_outcome())


def test_person_and_mpi_parameters_are_strict_r4() -> None:
    from bridge.service.mpi import _parameters, _part, person_resource

    link = {
        "patient_a": "pa",
        "patient_b": "pb",
        "state": "MATCH",
        "origin": "auto",
        "score": 12.5,
        "actor": "https://idp|admin",
        "reason": "same SSN",
        "updated_at": "2026-12-07T09:00:00.000Z",
    }
    possible = {**link, "patient_b": "pz", "state": "POSSIBLE_MATCH", "other_person_id": "person-2"}
    person = person_resource(
        {
            "id": "person-1",
            "patients": [
                {"patient_id": "pa", "source_org": "st-mary", "updated_at": "2026-12-07T08:00:00.000Z"},
                {"patient_id": "pb", "source_org": "riverside", "updated_at": "2026-12-07T08:30:00.000Z"},
            ],
            "links": [link, possible],
        }
    )
    assert_r4(person, "Person")
    params = _parameters(
        [
            ("pair", {"part": [_part("patientA", {"reference": "Patient/pa"}), _part("score", 0.5)]}),
            ("linked", {"valueBoolean": True}),
            ("count", {"valueInteger": 2}),
        ]
    )
    assert_r4(params, "Parameters")


def test_audit_events_are_strict_r4() -> None:
    from tests.unit.bridge.service.audit.audit_helpers import access, events

    cases = [
        events(),
        events(1, patients=(), touched=None, query=None, request_id=None),
        events(2, break_glass_reason="patient unconscious", purpose=["ETREAT", "http://x.example|R"]),
        events(3, who=access(None), outcome="error", action="R", interaction="read"),
        events(4, client_address="192.0.2.7", outcome="denied"),
    ]
    for i, evs in enumerate(cases):
        for ev in evs:
            assert_r4(ev, f"AuditEvent case {i}")


# -- the index: bundles of older releases, produced before the mapping, are mapped when indexed --------------
def test_the_index_sink_maps_r4b_bundles_of_older_releases_and_dead_letters_what_r4_cannot_say(
    tmp_path: Path,
) -> None:
    import hashlib

    from bridge.consumers.checks import EnvelopeChecker
    from bridge.consumers.index_sink import IndexSink
    from bridge.consumers.runtime import Record
    from bridge.stores.index.store import IndexStore
    from bridge.stream.envelope import Envelope, OrgSigner, TrustedKey, TrustRegistry, utc_now

    signer = OrgSigner.generate("st-mary")
    trust = TrustRegistry()
    trust.add("st-mary", TrustedKey(signer.key_id, signer.public_bytes, "2020-01-01T00:00:00Z", None))

    def record(offset: int, resources: list[dict[str, Any]]) -> Record:
        # what an older release produced: R4B-valid, not mapped (never through BundleBuilder.build)
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": r} for r in resources],
        }
        validate_bundle(bundle)
        value = canonical_json(bundle)
        env = Envelope("st-mary", "fhir", "1", hashlib.sha256(value).hexdigest(), utc_now(), f"m{offset}")
        headers = signer.sign(env).headers()
        return Record("fhir.bundles", 0, offset, 1_767_225_600_000 + offset, b"st-mary|p", value, headers)

    ext = {"url": "https://x.example/e", "valueCodeableReference": {"concept": CONCEPT}}
    obs = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/p1"},
        "extension": [ext],
    }
    ratio = {"url": "https://x.example/r", "valueRatioRange": {"denominator": {"value": 1}}}
    store = IndexStore.open(f"sqlite://{tmp_path / 'index.db'}")
    sink = IndexSink(store, EnvelopeChecker(trust), None)
    poison = sink.process(
        [
            record(0, [_patient(extension=[ext]), obs]),
            record(1, [{"resourceType": "Patient", "id": "p2", "extension": [ratio]}]),
            record(2, [{"resourceType": "Citation", "id": "c1", "status": "active"}]),
        ]
    )
    assert [(r.offset, type(e).__name__, getattr(e, "field", None)) for r, e in poison] == [
        (1, "NotR4Bundle", "entry.0.resource.extension.0.valueRatioRange"),
        (2, "NotR4Bundle", "entry.0.resource.resourceType"),
    ]
    for rtype, rid in (("Patient", "p1"), ("Observation", "o1")):
        stored = store.get(rtype, rid)
        assert stored is not None and stored["extension"] == [
            {"url": ext["url"], "valueCodeableConcept": CONCEPT}
        ]
        assert_r4(stored, "indexed")
    assert store.get("Patient", "p2") is None and store.get("Citation", "c1") is None
    sink.close()


# -- what the HTTP API answers, over a small SQLite index of adapter output ---------------------------------
def _served(body: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Check one answer strictly: the resource, and for a Bundle each entry's resource and the whole
    bundle. Returns the entries' resources."""
    assert_r4(body, where)
    if body.get("resourceType") != "Bundle":
        return [body]
    resources = [e["resource"] for e in body.get("entry", []) if "resource" in e]
    for i, r in enumerate(resources):
        assert_r4(r, f"{where} entry[{i}]")
    return resources


@pytest.mark.slow
async def test_every_answer_of_the_http_api_is_strict_r4(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from bridge.config import Settings
    from bridge.service.app import create_app
    from bridge.service.context import Backend
    from bridge.stores.index.store import IncomingBundle, IndexStore
    from bridge.stores.mpi import PersonIndex
    from tests.support.auth import bearer
    from tests.support.consent import deny_organization
    from tests.support.demodata import generate

    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
    produced: list[tuple[str, ConvertedBundle]] = []
    for org, messages in generate(3, overlap=1.0, messages_per_patient=1).items():
        for msg in messages:
            [cb] = HL7v2Adapter().convert(msg.encode(), SourceInfo(org, timezone="America/Chicago"))
            assert isinstance(cb, ConvertedBundle)
            produced.append((org, cb))
    oru = SAMPLES / "hl7v2" / "ms-fhir-converter" / "ORU-R01-01.hl7"
    produced += [("lab", cb) for cb in _convert(str(oru.relative_to(SAMPLES)), HL7v2Adapter)]
    patients = [
        (org, e["resource"])
        for org, cb in produced
        for e in cb.bundle["entry"]
        if e["resource"]["resourceType"] == "Patient"
    ]
    pid = patients[0][1]["id"]
    lab_pid = next(p["id"] for org, p in patients if org == "lab")
    b = BundleBuilder(
        adapter_name="consent", adapter_version="1", source=SourceInfo("riverside"), input_sha256="1" * 64
    )
    b.add(deny_organization("deny-1", pid, "lab"))
    produced.append(("riverside", b.build(routing_key=f"Patient/{pid}")))
    store = IndexStore.open(settings.stores.index_url)
    store.apply(
        [
            IncomingBundle(
                cb.bundle, cb.sha256, org, cb.routing_key, "fhir.bundles", 0, i, "2026-03-02T08:00:00.000Z"
            )
            for i, (org, cb) in enumerate(produced)
        ]
    )
    store.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    mpi.upsert_patients(patients)
    person = mpi.person_id(pid)
    obs = next(
        e["resource"]["id"]
        for _, cb in produced
        for e in cb.bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
    )
    identifier = patients[0][1]["identifier"][0]
    urls = [
        "/metadata",
        f"/Patient/{pid}",
        f"/Observation/{obs}",
        f"/Patient?identifier={identifier['system']}|{identifier['value']}",
        f"/Patient/{pid}/$everything",
        f"/Patient/{pid}/$everything?_type=Observation,Encounter&_count=2",
        f"/Patient/{lab_pid}/$everything",
        f"/Patient/{lab_pid}/$everything?_proof=true",
        f"/Observation?patient={lab_pid}&_include=Observation:subject&_revinclude=Provenance:target",
        f"/Observation?patient={lab_pid}&_summary=true",
        f"/Observation?patient={lab_pid}&_elements=code,status",
        f"/Encounter?patient={pid}&_total=accurate",
        f"/Person/{person}",
        "/Person/$mpi-review-queue",
        f"/Person/$mpi-history?id={pid}",
        f"/Consent?patient={pid}",
        "/Consent/deny-1/_history",
        f"/Patient/{pid}/$consent-decision?actor=lab",
        f"/Patient/{pid}/$access-log",
        f"/AuditEvent?patient={pid}",
        # errors: OperationOutcomes
        "/Patient/unknown-id",
        f"/Patient/{pid}/$everything?_count=zero",
        "/Observation/no-such-observation",
    ]
    # every bundle in a ledger with a checkpoint, so that $everything?_proof=true carries proofs
    from bridge.stores.ledger import open_ledger
    from ledger import note
    from ledger.log import LedgerEntry

    ledger_url, origin = f"sqlite:///{tmp_path / 'ledger.db'}", "test.fhirbridge/ledger"
    signer_key, _ = note.generate_key(origin)
    led = open_ledger(ledger_url, origin=origin, signer_key=signer_key)
    led.append(
        [
            LedgerEntry(cb.sha256, org, "hl7v2", "1", "fhir.bundles", 0, i, "2026-03-02T08:00:00Z", None)
            for i, (org, cb) in enumerate(produced)
        ]
    )
    led.checkpoint_now()
    led.close()
    backend = Backend(
        settings, mpi_factory=lambda: mpi, ledger_factory=lambda: open_ledger(ledger_url, origin=origin)
    )
    headers = bearer(
        settings, "user/*.rs", organization="st-mary", purpose="TREAT", fhir_user="Practitioner/7"
    )
    seen: set[str] = set()
    async with TestClient(TestServer(create_app(settings, backend)), headers=headers) as client:
        for url in urls:
            resp = await client.get(url)
            body = await resp.json()
            expected = {200} if url in urls[:-3] else set(range(400, 500))  # the last three are errors
            assert resp.status in expected, (url, body)
            for r in _served(body, f"GET {url} ({resp.status})"):
                seen.add(r["resourceType"])
            if "_proof=true" in url:  # the proofs are there, as entry extensions
                assert any("extension" in e for e in body["entry"]), body
        # the MPI's manual decisions answer a Person and a Parameters
        decider = bearer(settings, "user/Person.u", organization="st-mary", fhir_user="Practitioner/7")
        other = patients[1][1]["id"]
        for op in ("$mpi-unlink", "$mpi-link"):
            params = {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "patientA", "valueReference": {"reference": f"Patient/{pid}"}},
                    {"name": "patientB", "valueString": other},
                    {"name": "reason", "valueString": "checked"},
                ],
            }
            resp = await client.post(f"/Person/{op}", json=params, headers=decider)
            body = await resp.json()
            assert resp.status == 200, (op, body)
            seen.update(r["resourceType"] for r in _served(body, f"POST /Person/{op}"))
        # a Consent with R4B content R4 cannot express is refused before anything is published
        ratio = {"url": "https://x.example/r", "valueRatioRange": {"denominator": {"value": 1}}}
        resp = await client.put(
            "/Consent/deny-2",
            data=json.dumps({**deny_organization("deny-2", pid, "lab"), "extension": [ratio]}),
            headers={
                **bearer(settings, "user/Consent.cru", organization="riverside"),
                "Content-Type": "application/fhir+json",
            },
        )
        body = await resp.json()
        assert resp.status == 422 and "Consent.extension.0.valueRatioRange" in body["issue"][0]["diagnostics"]
        _served(body, "PUT /Consent (422)")
    mpi.close()
    assert {"CapabilityStatement", "Patient", "Observation", "Person", "Parameters", "Consent"} <= seen, seen
    assert {
        "AuditEvent",
        "OperationOutcome",
        "Encounter",
        "DiagnosticReport",
        "Specimen",
        "Provenance",
    } <= seen, seen


def test_a_consent_written_through_the_api_is_mapped_to_r4_or_refused() -> None:
    from bridge.service.fhir.consent import _r4_consent
    from bridge.service.http import FhirHTTPError
    from tests.support.consent import deny_organization

    ext = {"url": "https://x.example/e", "valueCodeableReference": {"concept": CONCEPT}}
    body = {**deny_organization("c1", "p1", "st-mary"), "extension": [ext]}
    _r4_consent(body)
    assert body["extension"] == [{"url": ext["url"], "valueCodeableConcept": CONCEPT}]
    assert_r4(body, "Consent")
    topic = {"resourceType": "SubscriptionTopic", "id": "t", "url": "http://x", "status": "active"}
    with pytest.raises(FhirHTTPError) as info:
        _r4_consent({**deny_organization("c2", "p1", "st-mary"), "contained": [topic]})
    assert info.value.status == 422 and "Consent.contained.0.resourceType" in info.value.diagnostics
