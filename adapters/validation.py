"""Cheaper R4B validation with exactly the verdict of ``Bundle.model_validate`` (see docs/validation.md).

``fhir.resources`` validates every complex element through a Python wrap validator
(``fhir_core.types.FhirBase._validate``) that calls ``ModelClass.model_validate(value)`` on the
element's dict *on its own*, then checks that the result is an instance of the field's model class.
Given an already-built instance of that class instead of a dict, it skips the nested validation
(``revalidate_instances`` is ``"never"`` in fhir_core's base config). So validating an element
standalone and handing the instance to its parent is exactly what the library does internally,
and an element's verdict depends only on (its model class, its content).

This module exploits that: it walks the bundle guided by the models' field annotations, validates
each complex element bottom-up with its own model class, and memoises the accepted instances by
(model class, canonical JSON of the element). A repeated element (the same ``meta``, coding, unit,
address, practitioner ...) is then not validated again, in any position whose declared type is the
same model class. Only *accepted* elements are memoised. Whenever the fast walk raises anything, the
caller validates the original bundle with ``Bundle.model_validate`` and that verdict (and its
located error) is the answer, so the fast path can never reject what the library accepts.

Input that is not plain JSON data (exact ``dict``/``list``/``str``/``int``/``float``/``bool``/``None``,
finite floats, string keys) is never handled by the fast path: for such values two different
inputs could share one canonical JSON text.
"""

from __future__ import annotations

import math
import threading
import types
import typing
from itertools import islice
from typing import Any

import orjson

#: Upper bound of memoised instances (elements and resources; about 6 KB each on average, so about
#: 60 MB when full). Least recently used first out: when full, the least recently used half is dropped.
CACHE_MAX = 10_000

_cache: dict[tuple[type, bytes], Any] = {}
_cache_lock = threading.Lock()
#: model class -> {JSON key or field name: (is_list, target)}; target is a model class, or a str
#: version prefix for fields typed "any resource" (dispatched on ``resourceType`` like fhir_core).
_plans: dict[type, dict[str, tuple[bool, Any]]] = {}
_resource_classes: dict[str, type] = {}
_state: dict[str, Any] = {}


def clear_cache() -> None:
    """Forget every memoised element (benchmarks use it to measure cold validation)."""
    with _cache_lock:
        _cache.clear()


def cache_size() -> int:
    """The number of memoised (model class, element) pairs."""
    return len(_cache)


def _init() -> dict[str, Any]:
    if not _state:
        from fhir.resources.R4B.bundle import Bundle, BundleEntry
        from fhir_core.fhirabstractmodel import FHIRAbstractModel
        from fhir_core.types import FhirBase, FhirElementOrResourceBase

        _state.update(
            Bundle=Bundle,
            # unique per message: not worth a cache entry
            no_cache=frozenset({Bundle, BundleEntry}),
            FhirBase=FhirBase,
            FhirElementOrResourceBase=FhirElementOrResourceBase,
            FHIRAbstractModel=FHIRAbstractModel,
        )
    return _state


def _unwrap(annotation: Any) -> tuple[bool, Any] | None:
    """(is_list, FhirBase subclass) for ``X``, ``X | None``, ``List[X]``, ``Optional[List[X | None]]``."""
    fhir_base = _state["FhirBase"]
    is_list = False
    ann = annotation
    for _ in range(4):
        origin = typing.get_origin(ann)
        if origin is typing.Union or origin is types.UnionType:
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return None
            ann = args[0]
        elif origin is list:
            if is_list:
                return None
            is_list = True
            (ann,) = typing.get_args(ann)
        elif origin is None:
            if isinstance(ann, type) and issubclass(ann, fhir_base):
                return is_list, ann
            return None
        else:
            return None
    return None


def _plan(cls: type) -> dict[str, tuple[bool, Any]]:
    plan = _plans.get(cls)
    if plan is not None:
        return plan
    st = _init()
    if cls.model_config.get("revalidate_instances", "never") != "never":  # type: ignore[attr-defined]
        raise RuntimeError(f"{cls.__name__} revalidates instances; the fast path does not apply")
    by_name: dict[str, tuple[bool, Any]] = {}
    by_alias: dict[str, tuple[bool, Any]] = {}
    for name, field in cls.model_fields.items():  # type: ignore[attr-defined]
        found = _unwrap(field.annotation)
        if found is None:
            continue
        is_list, fhir_type = found
        target: Any
        if issubclass(fhir_type, st["FhirElementOrResourceBase"]):
            target = fhir_type._prefix  # dispatched on resourceType, as fhir_core does
        else:
            target = fhir_type.get_model_klass()
        by_name[name] = (is_list, target)
        if field.alias:
            by_alias[field.alias] = (is_list, target)
    # a JSON key is looked up as an alias first (populate_by_name), as pydantic does; were a key the
    # alias of one field and the name of another, a wrong guess would only make the parent reject the
    # instance and the caller fall back to the full validation, never accept
    plan = {**by_name, **by_alias}
    _plans[cls] = plan
    return plan


def _resource_class(prefix: str, resource_type: str) -> type | None:
    key = prefix + resource_type + "Type"
    cls = _resource_classes.get(key)
    if cls is None:
        from fhir_core.constraints import FHIR_TYPES_MAPS
        from pydantic._internal._validators import import_string

        path = FHIR_TYPES_MAPS.get(key)
        if path is None:
            return None
        cls = import_string(path)
        _resource_classes[key] = cls
    return cls


def _store(key: tuple[type, bytes], inst: Any) -> None:
    if len(_cache) >= CACHE_MAX:
        with _cache_lock:
            if len(_cache) >= CACHE_MAX:
                for old in list(islice(iter(_cache), CACHE_MAX // 2)):
                    _cache.pop(old, None)
    _cache[key] = inst


def _instance(cls: type, data: dict[str, Any]) -> Any:
    """The validated instance of ``cls`` for the element ``data`` (memoised); raises when invalid."""
    if cls in _state["no_cache"]:
        return cls.model_validate(_substituted(cls, data))  # type: ignore[attr-defined]
    key = (cls, orjson.dumps(data, option=orjson.OPT_SORT_KEYS))
    inst = _cache.pop(key, None)
    if inst is None:
        inst = cls.model_validate(_substituted(cls, data))  # type: ignore[attr-defined]
        _store(key, inst)
    else:
        _cache[key] = inst  # most recently used last
    return inst


def _child(target: Any, item: Any) -> Any:
    if type(item) is not dict:
        return item  # left to the parent's validation, exactly as given
    if isinstance(target, str):
        rtype = item.get("resourceType")
        if type(rtype) is not str:
            return item
        cls = _resource_class(target, rtype)
        if cls is None:
            return item
        return _instance(cls, item)
    return _instance(target, item)


def _substituted(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` whose complex elements are replaced by their validated instances."""
    plan = _plan(cls)
    out: dict[str, Any] | None = None
    for k, v in data.items():
        step = plan.get(k)
        if step is None:
            continue
        is_list, target = step
        if is_list:
            if type(v) is not list:
                continue
            new: Any = [_child(target, item) for item in v]
        else:
            if type(v) is not dict:
                continue
            new = _child(target, v)
        if out is None:
            out = dict(data)
        out[k] = new
    return out if out is not None else data


def _plain_json(v: Any) -> bool:
    """True when ``v`` is plain JSON data: exact builtin types, string keys, finite floats."""
    t = type(v)
    if t is str or t is int or t is bool or v is None:
        return True
    if t is dict:
        for k, x in v.items():
            if type(k) is not str:
                return False
            tx = type(x)
            if tx is str or tx is int or tx is bool or x is None:
                continue
            if not _plain_json(x):
                return False
        return True
    if t is list:
        for x in v:
            tx = type(x)
            if tx is str or tx is int or tx is bool or x is None:
                continue
            if not _plain_json(x):
                return False
        return True
    if t is float:
        return math.isfinite(v)
    return False


def fast_accepts(bundle: Any) -> bool:
    """True only when ``Bundle.model_validate(bundle)`` (R4B) accepts ``bundle``.

    False means "not decided here": the input is not plain JSON data, or some element was rejected
    (or the walk failed for any reason); the caller must then run ``Bundle.model_validate`` itself,
    whose verdict and located error are authoritative. Never raises.
    """
    try:
        st = _init()
        if type(bundle) is not dict or not _plain_json(bundle):
            return False
        _instance(st["Bundle"], bundle)
        return True
    except Exception:
        return False
