"""Adapter discovery through entry points, including broken and duplicate plug-ins."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from adapters import registry
from adapters.errors import AdapterError, AdapterLoadError, AdapterNotFound
from adapters.hl7v2 import HL7v2Adapter


def test_builtin_hl7v2_is_registered() -> None:
    assert "hl7v2" in registry.available()
    assert registry.load_class("hl7v2") is HL7v2Adapter
    assert isinstance(registry.get("hl7v2"), HL7v2Adapter)
    assert registry.get("hl7v2") is registry.get("hl7v2")
    a = registry.create("hl7v2", {"validate": "false"})
    assert isinstance(a, HL7v2Adapter) and a.validate is False


def test_unknown_name_and_bad_options() -> None:
    with pytest.raises(AdapterNotFound) as ei:
        registry.load_class("nope")
    assert "hl7v2" in str(ei.value)
    with pytest.raises(AdapterError, match="unknown option 'colour'"):
        registry.create("hl7v2", {"colour": "red"})
    with pytest.raises(AdapterError, match="expected true or false"):
        registry.create("hl7v2", {"validate": "maybe"})


def _fake(monkeypatch: pytest.MonkeyPatch, eps: list[EntryPoint]) -> None:
    monkeypatch.setattr(registry, "entry_points", lambda group: [e for e in eps if e.group == group])


def test_duplicate_names_name_both_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(
        monkeypatch,
        [
            EntryPoint("hl7v2", "adapters.hl7v2:HL7v2Adapter", registry.GROUP),
            EntryPoint("hl7v2", "acme.hl7:Other", registry.GROUP),
        ],
    )
    with pytest.raises(AdapterLoadError) as ei:
        registry.available()
    assert "acme.hl7:Other" in str(ei.value) and "adapters.hl7v2:HL7v2Adapter" in str(ei.value)


def test_import_failure_and_wrong_type_name_the_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(
        monkeypatch,
        [
            EntryPoint("broken", "acme_missing_module:Adapter", registry.GROUP),
            EntryPoint("notanadapter", "adapters.ids:business_key", registry.GROUP),
            EntryPoint("misnamed", "adapters.hl7v2:HL7v2Adapter", registry.GROUP),
        ],
    )
    with pytest.raises(AdapterLoadError, match=r"broken = acme_missing_module:Adapter: cannot be imported"):
        registry.load_class("broken")
    with pytest.raises(AdapterLoadError, match="does not point to a subclass"):
        registry.load_class("notanadapter")
    with pytest.raises(AdapterLoadError, match="declares name 'hl7v2'"):
        registry.load_class("misnamed")
