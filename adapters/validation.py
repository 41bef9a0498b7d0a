"""Cheaper R4B validation with exactly the verdict of ``Bundle.model_validate`` (see docs/validation.md).

``fhir.resources`` validates every complex element through a Python wrap validator
(``fhir_core.types.FhirBase._validate``) that calls ``ModelClass.model_validate(value)`` on the
element's dict *on its own*: an element's verdict depends only on its model class and its content.
What ``ModelClass.model_validate(element)`` checks is, exactly:

1. ``FHIRAbstractModel.__init__``: the value of ``resourceType`` (``resource_type``);
2. the ``mode="before"`` model validators: ``reject_null_complex_elements`` (a ``None`` item in a list
   of complex elements) and, on ``FHIRPrimitiveExtension`` only, "one of id/extension/fhir_comments"
   (whether those are ``None``);
3. each field on its own (pydantic model fields are validated independently; no FHIR model has a field
   validator): a primitive field with its annotated type, a complex field by the child's own verdict
   (recursively), a list field item by item; unknown keys are rejected (``extra="forbid"``);
4. the ``mode="after"`` validator: required primitives (whether the value is ``None``, and whether its
   ``_field`` extension sibling has a non-empty ``extension``) and choice types (which of the
   ``value[x]`` fields are not ``None``).

Steps 1, 2 and 4 depend only on the element's *shape*: its key set, which values are ``None``, lists,
dicts or scalars of which type, the ``resourceType`` values, and, for ``_field`` extension siblings,
whether their ``extension`` is non-empty. Step 3 depends on the values, field by field.

So an element is accepted here when (a) the same model class has accepted an element of exactly the
same shape before (its full ``model_validate``), (b) every primitive value passes its field's own
validator (a ``TypeAdapter`` of the field's annotation; verdicts of exact ``str``/``int``/``bool``
values are memoised), and (c) every complex child is accepted, recursively, by the same rule. A shape
seen for the first time is settled by ``ModelClass.model_validate(element)`` itself. Anything unusual
(a non-``dict`` element, a non-``str`` key, a value of a type JSON does not produce, a model class with
validators or a configuration other than the ones named above) is left to the library. Whenever this walk raises anything, the caller
validates the original bundle with ``Bundle.model_validate`` and that verdict (and its located error)
is the answer, so the fast path can never reject what the library accepts.
"""

from __future__ import annotations

import math
import threading
import types
import typing
from typing import Any

from pydantic import TypeAdapter

from adapters.errors import AdapterError

#: Upper bounds of the memo tables (each is emptied when full): shapes are bounded by the adapters'
#: code paths (a few thousand); primitive verdicts (per annotation) by the variety of codes, names and
#: dates in a feed.
SHAPES_MAX = 100_000
PRIMITIVES_MAX = 200_000
#: only values up to this many characters are memoised (base64 attachments and long narratives are
#: validated every time rather than kept)
MEMO_CHARS_MAX = 256

# field kinds in a plan
_PRIM, _ONE, _MANY, _ANY, _ANY_MANY = range(5)

#: model class -> {JSON key: (kind, payload, ext, items_optional)}, or None when the class is left
#: to the library. payload: (validator, accepted values) for primitives; the model class of a complex
#: field; (the FHIR_TYPES_MAPS prefix, the declared class) of an "any resource" field.
_plans: dict[type, dict[str, tuple[int, Any, bool, bool]] | None] = {}
#: (model class, shape) pairs whose full validation accepted an element of that shape
_shapes: set[tuple[Any, ...]] = set()
_UNPLANNED: Any = object()
#: annotation of a primitive field -> (its validator, the memo of values it accepted)
_adapters: dict[Any, tuple[Any, set[Any]]] = {}
_resource_classes: dict[str, type] = {}
_state: dict[str, Any] = {}
_lock = threading.Lock()

#: fhir_core's model configuration; with any other (a global override, say) the walk declines
_BASE_CONFIG = {"extra": "forbid", "validate_assignment": True, "populate_by_name": True}
_KNOWN_MODEL_VALIDATORS = frozenset({"reject_null_complex_elements", "validate_after_model_construction"})
_PRIMITIVE_EXTENSION_VALIDATOR = "validate_extension_or_fhir_comment_required"


class _Declined(AdapterError):
    """The walk does not decide this input; the library will."""


def clear_cache() -> None:
    """Forget every memoised shape and primitive verdict (benchmarks use it to measure cold runs)."""
    with _lock:
        _shapes.clear()
        for _validate, accepted in _adapters.values():
            accepted.clear()


def cache_size() -> int:
    """The number of memoised (model class, shape) pairs."""
    return len(_shapes)


def _init() -> dict[str, Any]:
    if not _state:
        # the models and fhir_core take 0.25 s to import: loaded for the first bundle, not at import
        from fhir.resources.R4B.bundle import Bundle  # lazy, as above
        from fhir.resources.R4B.fhirprimitiveextension import FHIRPrimitiveExtension  # lazy, as above
        from fhir_core.fhirabstractmodel import FHIRAbstractModel  # lazy, as above
        from fhir_core.types import FhirBase, FhirElementOrResourceBase  # lazy, as above

        _state.update(
            Bundle=Bundle,
            FhirBase=FhirBase,
            FhirElementOrResourceBase=FhirElementOrResourceBase,
            FHIRAbstractModel=FHIRAbstractModel,
            FHIRPrimitiveExtension=FHIRPrimitiveExtension,
        )
    return _state


def _unwrap(annotation: Any) -> tuple[bool, bool, Any] | None:
    """(is_list, items_optional, FhirBase subclass) for ``X``, ``X | None``, ``Optional[List[X | None]]``."""
    fhir_base = _state["FhirBase"]
    is_list = False
    items_optional = False
    ann = annotation
    for _ in range(5):
        origin = typing.get_origin(ann)
        if origin is typing.Union or origin is types.UnionType:
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return None
            if is_list:
                items_optional = True
            ann = args[0]
        elif origin is list:
            if is_list:
                return None
            is_list = True
            (ann,) = typing.get_args(ann)
        elif origin is None:
            if isinstance(ann, type) and issubclass(ann, fhir_base):
                return is_list, items_optional, ann
            return None
        else:
            return None
    return None


def _adapter(annotation: Any) -> tuple[Any, set[Any]]:
    """The validator of a primitive field's annotation (shared by every field with that annotation)."""
    found = _adapters.get(annotation)
    if found is None:
        found = _adapters[annotation] = (TypeAdapter(annotation).validate_python, set())
    return found


def _plan(cls: type) -> dict[str, tuple[int, Any, bool, bool]] | None:
    """How to walk ``cls``'s JSON keys, or None when the class is left whole to the library."""
    if cls in _plans:
        return _plans[cls]
    st = _init()
    plan: dict[str, tuple[int, Any, bool, bool]] | None = _build_plan(cls, st)
    _plans[cls] = plan
    return plan


def _build_plan(cls: Any, st: dict[str, Any]) -> dict[str, tuple[int, Any, bool, bool]] | None:
    # only the validation behaviour described in the module docstring is modelled
    if cls.__init__ is not st["FHIRAbstractModel"].__init__:
        return None
    if dict(cls.model_config) != _BASE_CONFIG:
        return None  # e.g. FHIRAbstractModel.set_global_model_config(strict=True): not modelled
    decorators = cls.__pydantic_decorators__
    allowed = set(_KNOWN_MODEL_VALIDATORS)
    if cls is st["FHIRPrimitiveExtension"]:
        allowed.add(_PRIMITIVE_EXTENSION_VALIDATOR)
    if (
        set(decorators.model_validators) != allowed
        or decorators.field_validators
        or decorators.validators
        or decorators.root_validators
    ):
        return None
    ext_cls = st["FHIRPrimitiveExtension"]
    by_name: dict[str, tuple[int, Any, bool, bool]] = {}
    by_alias: dict[str, tuple[int, Any, bool, bool]] = {}
    for name, field in cls.model_fields.items():
        if field.metadata or field.validation_alias not in (None, field.alias):
            return None  # constraints outside the annotation, or another input key: not modelled
        # a required field (no default) is part of the shape: its key is present or not
        found = _unwrap(field.annotation)
        step: tuple[int, Any, bool, bool]
        if found is None:
            step = (_PRIM, _adapter(field.annotation), False, False)
        else:
            is_list, items_optional, fhir_type = found
            if issubclass(fhir_type, st["FhirElementOrResourceBase"]):
                declared = (fhir_type._prefix, fhir_type.get_model_klass())
                step = (_ANY_MANY if is_list else _ANY, declared, False, items_optional)
            else:
                target = fhir_type.get_model_klass()
                ext = target is ext_cls and not is_list
                step = (_MANY if is_list else _ONE, target, ext, items_optional)
        by_name[name] = step
        if field.alias:
            by_alias[field.alias] = step
    for name, field in cls.model_fields.items():
        if field.alias and field.alias != name and field.alias in cls.model_fields:
            return None  # a key that is one field's alias and another's name: not modelled
    return {**by_name, **by_alias}


def _resource_class(prefix: str, resource_type: str) -> type | None:
    key = prefix + resource_type + "Type"
    cls = _resource_classes.get(key)
    if cls is not None:
        return cls
    from fhir_core.constraints import FHIR_TYPES_MAPS  # fhir_core: loaded with the models (_init)
    from pydantic._internal._validators import import_string  # lazy, as above

    path = FHIR_TYPES_MAPS.get(key)
    if path is None:
        return None  # not remembered: unknown names are unbounded
    found: type = import_string(path)
    _resource_classes[key] = found
    return found


#: exact types of the scalar values the walk validates itself (what JSON parsers and the adapters
#: produce); anything else (a generator, which validation would consume before the library's fallback
#: sees it, a tuple, a str subclass...) is left to the library
_PLAIN_SCALARS = frozenset({str, int, bool, float, type(None)})


def _primitive(payload: tuple[Any, set[Any]], v: Any) -> None:
    """Raises unless the field's validator accepts ``v`` (and keeps ``None``-ness, as step 4 needs).

    Accepted exact ``str`` values are memoised as themselves, ``int``/``bool`` values and lists of
    ``str`` as (type, value) pairs, in a set per annotation; anything else is validated every time.
    """
    validate, accepted = payload
    t = type(v)
    key: Any = None
    if t is str:
        if len(v) <= MEMO_CHARS_MAX:
            key = v
    elif t is int or t is bool:
        key = (t, v)
    elif t is list:
        if all(type(x) is str for x in v):
            if sum(map(len, v)) <= MEMO_CHARS_MAX:
                key = (t, tuple(v))
        elif not all(type(x) in _PLAIN_SCALARS for x in v):
            raise _Declined("a list item of an unusual type")
    elif t not in _PLAIN_SCALARS:
        raise _Declined("a primitive value of an unusual type")
    if key is not None and key in accepted:
        return
    out = validate(v)
    if (out is None) != (v is None):
        raise _Declined("a primitive validator changed None-ness")
    if key is not None:
        if len(accepted) >= PRIMITIVES_MAX:
            accepted.clear()
        accepted.add(key)


def _resource(declared: tuple[str, type], item: Any) -> tuple[type, Any]:
    """The class fhir_core validates an "any resource" value with, and the shape detail for it."""
    if type(item) is not dict:
        raise _Declined("an 'any resource' value that is not an object")
    if "resourceType" not in item:
        return declared[1], None  # validated as the declared class (Resource or Element) itself
    rtype = item["resourceType"]
    if type(rtype) is not str:
        raise _Declined("a resourceType that is not a string")
    cls = _resource_class(declared[0], rtype)
    if cls is None:
        raise _Declined("unknown resourceType")
    return cls, rtype


def _check(cls: Any, data: dict[str, Any]) -> None:
    """Raises unless ``cls.model_validate(data)`` accepts ``data`` (see the module docstring)."""
    plan = _plans.get(cls, _UNPLANNED)
    if plan is _UNPLANNED:
        plan = _plan(cls)
    if plan is None:
        cls.model_validate(data)
        return
    parts: list[Any] = [cls]  # the shape, flat: cls, then per key: key, kind of value[, detail]
    add = parts.append
    for k, v in data.items():
        if type(k) is not str:
            raise _Declined("a non-string key")
        step = plan.get(k)
        if step is None:  # resourceType, or an unknown key (the first validation rejects that shape)
            if v is not None and type(v) is not str:
                raise _Declined("a resourceType (or unknown key) that is not a plain string")
            add(k)
            add(v)
            continue
        kind, payload, ext, items_optional = step
        add(k)
        if v is None:
            add(None)
        elif kind == _PRIM:
            if type(v) is not str or v not in payload[1]:
                _primitive(payload, v)
            add(type(v))
        elif kind == _ONE:
            tv = type(v)
            if tv is dict:
                _check(payload, v)
                add(bool(v.get("extension")) if ext else dict)
            elif (tv is str or tv is bytes) and not ext:
                payload.model_validate_json(v)  # what fhir_core does with a string in that position
                add(tv)
            else:
                raise _Declined("a complex element that is not an object")
        elif kind == _MANY:
            if type(v) is not list:
                raise _Declined("a list field that is not a list")
            nones = False
            for item in v:
                if type(item) is dict:
                    _check(payload, item)
                elif item is None and items_optional:
                    nones = True
                else:
                    raise _Declined("a list item that is not an object")
            add((bool(v), nones))
        elif kind == _ANY:
            rcls, rtype = _resource(payload, v)
            _check(rcls, v)
            add(rtype)
        else:  # _ANY_MANY
            if type(v) is not list:
                raise _Declined("a list field that is not a list")
            rtypes = []
            for item in v:
                rcls, rtype = _resource(payload, item)
                _check(rcls, item)
                rtypes.append(rtype)
            add(tuple(rtypes))
    shape = tuple(parts)
    if shape in _shapes:
        return
    cls.model_validate(data)  # a shape seen for the first time: the library decides
    if len(_shapes) >= SHAPES_MAX:
        _shapes.clear()
    _shapes.add(shape)


def _plain_json(v: Any) -> bool:
    """True when ``v`` is plain JSON data: exact builtin types, string keys, finite floats.

    Not needed by the walk (it dispatches on exact types); tests use it to state that every valid
    plain-JSON bundle is decided by the fast path itself.
    """
    t = type(v)
    if t is str or t is int or t is bool or v is None:
        return True
    if t is dict:
        return all(type(k) is str and _plain_json(x) for k, x in v.items())
    if t is list:
        return all(_plain_json(x) for x in v)
    if t is float:
        return math.isfinite(v)
    return False


def fast_accepts(bundle: Any) -> bool:
    """True only when ``Bundle.model_validate(bundle)`` (R4B) accepts ``bundle``.

    False means "not decided here": some element was rejected, or the input is of a kind the walk
    leaves to the library; the caller must then run ``Bundle.model_validate`` itself, whose verdict
    and located error are authoritative. Never raises.
    """
    try:
        st = _init()
        if type(bundle) is not dict:
            return False
        _check(st["Bundle"], bundle)
        return True
    except Exception:
        return False
