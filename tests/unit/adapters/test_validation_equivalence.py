"""The fast R4B validation path accepts and rejects exactly what ``Bundle.model_validate`` does.

Differential tests: every public HL7 v2 sample and synthetic ADT feed must be accepted by the fast
path itself (not only through the fallback); hypothesis-generated mutations of produced bundles
(wrong types, invalid dates, unknown elements, missing required elements, nulls, empty strings,
invalid codes, bad references, elements moved into a position of another type, repeated elements,
reordered keys) must get the same verdict and the same located errors as the R4B models, with the
element cache warm from the valid bundles (so a cached element is tried in every wrong place).
"""

from __future__ import annotations

import copy
import enum
import functools
import math
import re
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from adapters import validation as V
from adapters.base import ConvertedBundle, SourceInfo
from adapters.bundle import BundleBuilder, validate_bundle
from adapters.errors import ValidationFailed
from adapters.hl7v2 import HL7v2Adapter

Outcome = tuple[str, Any]

NOVAL = HL7v2Adapter(validate="false")

ORU = (
    "MSH|^~\\&|LAB|STMARY^2.16.840.1.113883.19.4^ISO|FB|FB|20240305160000-0600||ORU^R01^ORU_R01|L{n}|P|2.5.1\r"
    "PID|1||MRN{n}^^^STMARY^MR||ROE^RICHARD^Q||19751231|M|||1 ELM ST^^SPRINGFIELD^IL^62701^USA^H\r"
    "PV1|1|O|LAB^^^STMARY||||1234567890^WELBY^MARCUS^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO|||||||||||OP|"
    "V{n}^^^STMARY^VN\r"
    "OBR|1|ORD{n}^EPIC|FIL{n}^LAB|24323-8^Comprehensive metabolic panel^LN|||20240305121500-0600\r"
    "OBX|1|NM|2345-7^Glucose^LN||{n}|mg/dL^^UCUM|70-99|H|||F|||20240305121500-0600\r"
    "OBX|2|NM|2160-0^Creatinine^LN||0.9|mg/dL^^UCUM|0.6-1.2|N|||F|||20240305121500-0600\r"
    "OBX|3|ST|8251-1^Comment^LN||hemolysed sample||||||F\r"
    "OBX|4|CE|882-1^ABO and Rh group^LN||A+^A Rh positive^L||||||F\r"
    "SPM|1|SPC{n}&LAB||119297000^Blood specimen^SCT|||||||||||||20240305121500-0600\r"
)
ADT = (
    "MSH|^~\\&|EPICADT|STMARY|FB|FB|20240305143000-0600||ADT^A01^ADT_A01|A{n}|P|2.5.1\r"
    "EVN|A01|20240305143000-0600\r"
    "PID|1||MRN{n}^^^STMARY^MR||DOE^JANE^Q^^MS||19800229|F|||12 MAIN ST^APT 4^SPRINGFIELD^IL^62701^USA^H||"
    "^PRN^PH^^1^217^5551234~^NET^Internet^jane@example.com\r"
    "NK1|1|DOE^JOHN|SPO^Spouse^HL70063|12 MAIN ST^^SPRINGFIELD^IL^62701^USA|^PRN^PH^^1^217^5550000\r"
    "PV1|1|I|4W^401^B^STMARY|E|||1234567890^WELBY^MARCUS^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO|||MED|||||||||"
    "V{n}^^^STMARY^VN|||||||||||||||||||||||||20240305142500\r"
    "AL1|1|DA|70618^Penicillin^RXNORM|SV|Hives|20100101\r"
    "DG1|1||R07.9^Chest pain, unspecified^I10||20240305|A\r"
    "IN1|1|PPO123^Gold PPO|BCBS01^^^STMARY|Blue Cross|PO BOX 1^^CHICAGO^IL^60601|||GRP77\r"
)


def _bundles(message: bytes, src: SourceInfo) -> list[dict[str, Any]]:
    out = []
    for o in NOVAL.convert(message, src):
        assert isinstance(o, ConvertedBundle), o.error  # type: ignore[union-attr]
        out.append(o.bundle)
    return out


def reference(bundle: Any) -> Outcome:
    """The verdict of the R4B models themselves."""
    from fhir.resources.R4B.bundle import Bundle

    return _outcome(Bundle.model_validate, bundle)


def _outcome(fn: Any, bundle: Any) -> Outcome:
    try:
        fn(bundle)
    except ValidationError as exc:
        return "invalid", [(e["loc"], e["msg"], e["type"]) for e in exc.errors()]
    except Exception as exc:
        return "error", (type(exc).__name__, str(exc))
    return "ok", None


def assert_same_verdict(bundle: Any) -> Outcome:
    """validate_bundle == Bundle.model_validate (verdict and located errors); fast path never over-accepts."""
    ref = reference(bundle)
    fast = V.fast_accepts(bundle)
    if fast:
        assert ref[0] == "ok", f"fast path accepted a bundle the R4B models reject: {ref}"
    assert _outcome(validate_bundle, bundle) == ref
    # and the fast path really decides plain JSON that is valid (it is not only the fallback at work)
    if ref[0] == "ok" and V._plain_json(bundle):
        assert fast, "fast path declined a valid plain-JSON bundle"
    return ref


# -- every produced bundle is accepted by the fast path --------------------------------------------


def test_every_hl7v2_sample_is_accepted_by_the_fast_path(samples: Path) -> None:
    files = sorted(
        p for p in (samples / "hl7v2").rglob("*") if p.is_file() and p.suffix in (".hl7", ".hl7v2")
    )
    assert len(files) >= 400
    src = SourceInfo("samples", timezone="America/New_York")
    n = 0
    for path in files:
        for b in _bundles(path.read_bytes(), src):
            assert reference(b) == ("ok", None), path
            assert V.fast_accepts(b), path
            n += 1
    assert n >= len(files)


def test_synthetic_adt_feed_is_accepted_by_the_fast_path() -> None:
    from tests.support.demodata import generate

    feeds = generate(12, seed=11)
    n = 0
    for org, msgs in feeds.items():
        src = SourceInfo(org, timezone="America/Chicago")
        for m in msgs:
            for b in _bundles(m.encode(), src):
                assert reference(b) == ("ok", None)
                assert V.fast_accepts(b)
                n += 1
    assert n >= 12


def test_repeated_validation_uses_the_cache_and_agrees() -> None:
    src = SourceInfo("cache", timezone="America/Chicago")
    V.clear_cache()
    b1 = _bundles(ORU.format(n=1).encode(), src)[0]
    assert V.fast_accepts(b1)
    size = V.cache_size()
    assert size > 20
    b2 = _bundles(ORU.format(n=2).encode(), src)[0]
    assert V.fast_accepts(b2)
    # the second message has new ids and identifiers but the same shapes: no new full validation
    assert V.cache_size() == size
    calls: list[type] = []
    real = V._check

    def spy(cls: Any, data: dict[str, Any]) -> None:
        calls.append(cls)
        real(cls, data)

    from fhir.resources.R4B.bundle import Bundle

    original = Bundle.model_validate
    try:
        Bundle.model_validate = None  # type: ignore[assignment]  # a full validation would now fail
        V._check = spy  # type: ignore[assignment]
        assert V.fast_accepts(_bundles(ORU.format(n=3).encode(), src)[0])
    finally:
        Bundle.model_validate = original  # type: ignore[method-assign]
        V._check = real  # type: ignore[assignment]
    assert calls and calls[0] is Bundle


# -- mutations ------------------------------------------------------------------------------------


@functools.cache
def base() -> list[dict[str, Any]]:
    """Valid bundles of several shapes; validating them warms the element cache."""
    from tests.support.demodata import generate

    src = SourceInfo("mut", timezone="America/Chicago")
    out: list[dict[str, Any]] = []
    for n in range(3):
        out += _bundles(ORU.format(n=n).encode(), src)
        out += _bundles(ADT.format(n=n).encode(), src)
    for org, msgs in generate(3, seed=5, hospitals=1).items():
        for m in msgs[:3]:
            out += _bundles(m.encode(), SourceInfo(org, timezone="America/Chicago"))
    for b in out:
        assert reference(b) == ("ok", None)
        validate_bundle(b)  # warm the cache with every element of the valid bundles
    return out


Path_ = tuple[Any, ...]


def _walk(node: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


def _set(root: Any, path: Path_, value: Any) -> None:
    node = root
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _get(root: Any, path: Path_) -> Any:
    for p in path:
        root = root[p]
    return root


_DATE_KEYS = re.compile(
    r"(?i)(date|time|start|end|recorded|timestamp|issued|authoredOn|lastUpdated|birth|onset|period)"
)
_CODE_KEYS = {"code", "gender", "status", "use", "method", "system", "unit", "rank", "mode", "language"}
WRONG_VALUES: list[Any] = [123, 1.5, True, "text", [], {}, ["x"], {"x": 1}, [{}], [None], -0.0, 10**30]
BAD_DATES = [
    "2024-13-01",
    "2024-02-30",
    "20240305",
    "yesterday",
    "2024-03-05T25:00:00Z",
    "2024-03-05T10:00:00",
    "2024-03-05T10:00",
    "1980-02-29T",
    "2023-02-29",
    "",
    "2024-03-05 10:00:00Z",
    "+2024-03-05",
]
BAD_CODES = ["not a code", "bad\tcode", " lead", "trail ", "", "x" * 5000, "ünïcode", "a\nb", "PUT ", "put"]
BAD_REFS: list[Any] = [
    "Patient/1",
    {"reference": 5},
    {"reference": {"reference": "Patient/1"}},
    {"reference": "Patient/1", "bogus": 1},
    [{"reference": "Patient/1"}],
    {"type": 5},
    {"identifier": "MRN1"},
    {"identifier": {"value": 1}},
    {},
    {"reference": ""},
    {"display": None},
]
KINDS = [
    "wrong_type",
    "invalid_date",
    "unknown_element",
    "missing_element",
    "null_complex",
    "empty_string",
    "invalid_code",
    "bad_reference",
    "transplant",
    "repeat",
    "reorder",
]


def _mutate(b: dict[str, Any], kind: str, data: st.DataObject) -> dict[str, Any]:
    m = copy.deepcopy(b)
    nodes = [(p, v) for p, v in _walk(m) if p]
    dicts = [p for p, v in _walk(m) if isinstance(v, dict)]

    def pick(seq: Any) -> Any:
        seq = list(seq)
        assume(seq)  # a previous mutation may have left nothing of this kind
        return data.draw(st.sampled_from(seq))

    choose = data.draw
    if kind == "wrong_type":
        path, old = pick(nodes)
        new = pick([w for w in WRONG_VALUES if type(w) is not type(old)])
        _set(m, path, new)
    elif kind == "invalid_date":
        paths = [
            p for p, v in nodes if isinstance(p[-1], str) and _DATE_KEYS.search(p[-1]) and isinstance(v, str)
        ]
        paths += [p for p, v in nodes if isinstance(v, str) and re.match(r"\d{4}-\d\d", v)]
        _set(m, pick(paths), pick(BAD_DATES))
    elif kind == "unknown_element":
        path = pick(dicts)
        key = pick(["bogus", "_bogus", "resourceType", "valueFoo", "id_", "fhir_comments", "_id"])
        _get(m, path)[key] = pick(["x", {"extension": []}, 1])
    elif kind == "missing_element":
        path = pick([p for p in dicts if _get(m, p)])
        node = _get(m, path)
        del node[pick(sorted(node))]
    elif kind == "null_complex":
        path, old = pick([(p, v) for p, v in nodes if isinstance(v, dict | list)])
        if isinstance(old, list) and choose(st.booleans()):
            old.insert(choose(st.integers(0, len(old))), None)
        else:
            _set(m, path, None)
    elif kind == "empty_string":
        path = pick([p for p, v in nodes if isinstance(v, str)])
        _set(m, path, pick(["", " ", "\t"]))
    elif kind == "invalid_code":
        paths = [p for p, v in nodes if isinstance(v, str) and isinstance(p[-1], str) and p[-1] in _CODE_KEYS]
        _set(m, pick(paths), pick(BAD_CODES))
    elif kind == "bad_reference":
        paths = [
            p for p in dicts if p and ("reference" in _get(m, p) or p[-1] in ("subject", "patient", "who"))
        ]
        _set(m, pick(paths), copy.deepcopy(pick(BAD_REFS)))
    elif kind == "transplant":
        # an element (already cached as valid in its own position) moved into a position of another type
        src_path = pick([p for p in dicts if p])
        dst_path = pick([p for p, _ in nodes if p != src_path and p[: len(src_path)] != src_path])
        _set(m, dst_path, copy.deepcopy(_get(m, src_path)))
    elif kind == "repeat":
        # repeated elements: a list gets another copy of one of its items, or of an element from elsewhere
        lists = [p for p, v in nodes if isinstance(v, list) and v]
        path = pick(lists)
        target = _get(m, path)
        if choose(st.booleans()):
            item = copy.deepcopy(pick(target))
        else:
            item = copy.deepcopy(_get(m, pick([p for p in dicts if p])))
        target.insert(choose(st.integers(0, len(target))), item)
    elif kind == "reorder":
        for path in choose(st.lists(st.sampled_from(dicts), max_size=12)):
            node = _get(m, path)
            items = list(node.items())
            order = choose(st.permutations(range(len(items))))
            node.clear()
            node.update(items[i] for i in order)
    return m


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutation_verdict_equals_r4b_models(kind: str, data: st.DataObject) -> None:
    b = data.draw(st.sampled_from(base()))
    validate_bundle(b)  # every element of the original is in the cache, whatever ran before
    mutant = _mutate(b, kind, data)
    before = copy.deepcopy(mutant)
    ref = assert_same_verdict(mutant)
    event(f"R4B models: {ref[0]}")
    assert mutant == before  # validation never modifies its input
    if kind == "reorder":
        assert ref == ("ok", None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_double_mutation_verdict_equals_r4b_models(data: st.DataObject) -> None:
    b = data.draw(st.sampled_from(base()))
    m = _mutate(b, data.draw(st.sampled_from(KINDS)), data)
    m = _mutate(m, data.draw(st.sampled_from(KINDS)), data)
    event(f"R4B models: {assert_same_verdict(m)[0]}")


def test_cached_element_in_a_position_of_another_type() -> None:
    src = SourceInfo("pos", timezone="America/Chicago")
    b = _bundles(ADT.format(n=3).encode(), src)[0]
    validate_bundle(b)
    patient = b["entry"][0]["resource"]
    ident = patient["identifier"][0]
    coding = ident["type"]["coding"][0]
    bare = {"system": ident["system"], "value": ident["value"]}
    verdicts = []
    for field, value in [
        ("maritalStatus", ident),  # an Identifier where a CodeableConcept goes
        ("maritalStatus", {"coding": [ident]}),  # ... where a Coding goes
        ("identifier", [coding]),  # a Coding where an Identifier goes
        ("telecom", [bare]),  # an Identifier that is also a valid ContactPoint
        ("telecom", [ident]),  # ... and one that is not
        ("meta", patient["address"][0]),  # an Address where Meta goes
        ("address", [patient["meta"]]),  # Meta where an Address goes
        ("managingOrganization", {"coding": [coding]}),  # a CodeableConcept where a Reference goes
        ("contact", [patient["name"][0]]),  # a HumanName where a Patient.contact goes
        ("link", [{"other": patient["meta"], "type": "seealso"}]),
    ]:
        m = copy.deepcopy(b)
        m["entry"][0]["resource"][field] = copy.deepcopy(value)
        verdicts.append(assert_same_verdict(m)[0])
    assert "ok" in verdicts and "invalid" in verdicts
    # a whole cached resource as the resource of another entry, and as an element
    m = copy.deepcopy(b)
    m["entry"][1]["resource"] = copy.deepcopy(patient)
    assert assert_same_verdict(m)[0] == "ok"
    m["entry"][1]["resource"]["meta"] = copy.deepcopy(patient)
    assert assert_same_verdict(m)[0] == "invalid"


# -- which classes the walk models --------------------------------------------------------------


def test_every_r4b_class_is_modelled_by_the_walk() -> None:
    """A fhir.resources/fhir_core upgrade that adds a validator or a config would show up here."""
    from fhir_core.constraints import FHIR_TYPES_MAPS
    from pydantic._internal._validators import import_string

    V._init()
    classes = {import_string(p) for k, p in list(FHIR_TYPES_MAPS.items()) if k.startswith("R4.")}
    assert len(classes) > 600
    assert [c.__name__ for c in classes if V._plan(c) is None] == []


def test_a_class_with_its_own_validator_is_left_to_the_library() -> None:
    from fhir.resources.R4B.coding import Coding
    from pydantic import field_validator

    class UpperCoding(Coding):
        @field_validator("code")
        @classmethod
        def upper(cls, v: Any) -> Any:
            if v is not None and v != v.upper():
                raise ValueError("codes are upper case here")
            return v

    assert V._plan(UpperCoding) is None
    V._check(UpperCoding, {"system": "http://x", "code": "ABC"})
    with pytest.raises(ValidationError):
        V._check(UpperCoding, {"system": "http://x", "code": "abc"})  # the library's own verdict


# -- the same shape with a different verdict -------------------------------------------------------


def test_required_primitive_and_its_extension_sibling() -> None:
    """Bundle.type is required: an ``_type`` with a non-empty ``extension`` stands in for it, an empty one does not."""
    src = SourceInfo("shape", timezone="America/Chicago")
    b = _bundles(ADT.format(n=11).encode(), src)[0]
    ext = {"url": "http://example.org/why", "valueString": "unknown"}
    ok = copy.deepcopy(b)
    del ok["type"]
    ok["_type"] = {"extension": [ext]}
    assert assert_same_verdict(ok)[0] == "ok"
    assert V.fast_accepts(ok)  # that shape is now known as accepted
    for stand_in in ({"extension": []}, {"id": "x"}, {"id": "x", "extension": []}):
        m = copy.deepcopy(ok)
        m["_type"] = stand_in
        assert assert_same_verdict(m)[0] == "invalid", stand_in
        assert not V.fast_accepts(m)


def test_choice_types_and_primitive_values_under_a_known_shape() -> None:
    src = SourceInfo("shape", timezone="America/Chicago")
    b = _bundles(ORU.format(n=12).encode(), src)[0]
    validate_bundle(b)
    i = next(i for i, e in enumerate(b["entry"]) if "valueQuantity" in e["resource"])
    both = copy.deepcopy(b)
    both["entry"][i]["resource"]["valueString"] = "7.2"  # value[x] twice
    assert assert_same_verdict(both)[0] == "invalid"
    for field, bad in [
        ("status", "final "),
        ("effectiveDateTime", "2024-02-30"),
        ("effectiveDateTime", "2024-03-05T25:00:00Z"),
    ]:
        m = copy.deepcopy(b)
        assert field in m["entry"][i]["resource"]
        m["entry"][i]["resource"][field] = bad  # same shape as the accepted original, a bad value
        assert assert_same_verdict(m)[0] == "invalid", field
        assert not V.fast_accepts(m)
    q = copy.deepcopy(b)
    q["entry"][i]["resource"]["valueQuantity"]["value"] = (
        8.25  # a new, valid value: decided without the library
    )
    assert assert_same_verdict(q)[0] == "ok"
    assert V.fast_accepts(q)


def test_a_json_string_in_a_complex_position() -> None:
    """fhir_core parses a string given for a complex element as JSON; the walk does the same."""
    src = SourceInfo("shape", timezone="America/Chicago")
    b = _bundles(ADT.format(n=13).encode(), src)[0]
    validate_bundle(b)
    verdicts = []
    for text in ('{"text": "Married"}', '{"bogus": 1}', "not json", '{"coding": "x"}'):
        m = copy.deepcopy(b)
        m["entry"][0]["resource"]["maritalStatus"] = text
        verdicts.append(assert_same_verdict(m)[0])
    assert verdicts[0] == "ok" and set(verdicts[1:]) == {"invalid"}


# -- inputs that are not plain JSON never reach the cache ---------------------------------------


class Gender(str, enum.Enum):  # noqa: UP042 - a str-mixin enum, as older code writes it
    F = "female"


@pytest.mark.parametrize(
    "path, value",
    [
        (("entry", 0, "resource", "gender"), Gender.F),
        (("entry", 0, "resource", "birthDate"), date(1980, 2, 29)),
        (("entry", 0, "resource", "name"), ({"family": "DOE"},)),
        (("entry", 0, "resource", "active"), 1),
        (("entry", 0, "resource", "active"), math.nan),
        (("entry", 0, "resource", "multipleBirthInteger"), 2.0),
        (("entry", 0, "resource", "multipleBirthInteger"), math.inf),
        (("entry", 0, "resource", "multipleBirthInteger"), 10**40),
    ],
)
def test_non_plain_values_get_the_library_verdict(path: Path_, value: Any) -> None:
    src = SourceInfo("np", timezone="America/Chicago")
    b = _bundles(ADT.format(n=7).encode(), src)[0]
    assert b["entry"][0]["resource"]["resourceType"] == "Patient"
    validate_bundle(b)  # warm: the plain-JSON equivalent of the element is cached
    m = copy.deepcopy(b)
    _set(m, path, value)
    assert_same_verdict(m)


# -- the builder's behaviour is unchanged -------------------------------------------------------


def test_builder_raises_located_validation_failed() -> None:
    src = SourceInfo("bld", timezone="America/Chicago")
    for bad_birth in ("1980-02-30", "1980-02-29"):
        builder = BundleBuilder(adapter_name="t", adapter_version="1", source=src, input_sha256="0" * 64)
        builder.add({"resourceType": "Practitioner", "name": [{"family": "WELBY"}]}, "p1")
        builder.add({"resourceType": "Patient", "birthDate": bad_birth, "gender": "female"}, "pt1")
        if bad_birth == "1980-02-29":
            out = builder.build(routing_key="k")
            assert reference(out.bundle) == ("ok", None)
            continue
        with pytest.raises(ValidationFailed) as info:
            builder.build(routing_key="k")
        assert [e["loc"][:4] for e in info.value.errors] == [("entry", 1, "resource", "birthDate")]


# -- inputs that are not plain JSON -------------------------------------------------------------------


def test_a_str_enum_resource_type_cannot_open_the_cache_to_another_member() -> None:
    """The cache records the exact resourceType string; a str subclass is left to the library, so one
    accepted member of a str enum cannot vouch for another."""

    class RT(enum.StrEnum):
        BUNDLE = "Bundle"
        PATIENT = "Patient"

    assert V.fast_accepts({"resourceType": RT.BUNDLE, "type": "collection"}) is False
    bad = {"resourceType": RT.PATIENT, "type": "collection"}
    assert V.fast_accepts(bad) is False
    assert reference(bad)[0] != "ok"
    with pytest.raises((ValidationError, KeyError, TypeError)):
        validate_bundle(bad)


def test_a_generator_value_is_left_whole_to_the_library() -> None:
    """Validating a generator would consume it, and the library's fallback would then judge an empty
    list: an unusual value type is declined before anything reads it."""

    def make() -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "collection", "fhir_comments": (x for x in [5])}

    assert reference(make())[0] == "invalid"
    with pytest.raises(ValidationError):
        validate_bundle(make())
    patient = {"resourceType": "Patient", "name": [{"given": (g for g in ["Ann", 5])}]}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient}]}
    assert V.fast_accepts(bundle) is False


def test_long_values_and_unknown_resource_types_are_not_remembered() -> None:
    """Memory stays bounded by the variety of short values: a base64 attachment is validated each
    time, not kept, and an unknown resourceType (the library rejects it) is not remembered."""
    data = "QUJD" * 10_000
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": {"resourceType": "Binary", "contentType": "text/plain", "data": data}}],
    }
    assert V.fast_accepts(bundle) and V.fast_accepts(bundle)
    assert not any(data in accepted for _validate, accepted in V._adapters.values())
    before = len(V._resource_classes)
    for i in range(50):
        odd = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": {"resourceType": f"Nope{i}"}}],
        }
        assert V.fast_accepts(odd) is False
    assert len(V._resource_classes) == before
