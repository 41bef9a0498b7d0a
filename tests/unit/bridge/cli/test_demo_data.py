"""The demo and benchmark feeds (bridge/demodata.py, deploy/demo/data) carry the fields where HL7 v2 puts them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.base import ConvertedBundle, SourceInfo
from adapters.hl7v2 import HL7v2Adapter
from bridge.cli.demo import DEMO_DATA
from tests.support.demodata import generate


def _resources(bundles: list[ConvertedBundle], rtype: str) -> list[dict[str, Any]]:
    return [
        e["resource"] for b in bundles for e in b.bundle["entry"] if e["resource"]["resourceType"] == rtype
    ]


def _convert(org: str, messages: list[str]) -> list[ConvertedBundle]:
    adapter = HL7v2Adapter()
    out = [
        o for m in messages for o in adapter.convert(m.encode(), SourceInfo(org, timezone="America/Chicago"))
    ]
    assert all(isinstance(o, ConvertedBundle) for o in out), [
        o for o in out if not isinstance(o, ConvertedBundle)
    ]
    return out  # type: ignore[return-value]


def _shipped() -> dict[str, list[str]]:
    feeds: dict[str, list[str]] = {}
    for org_dir in sorted(p for p in DEMO_DATA.iterdir() if p.is_dir()):
        text = "".join(p.read_bytes().decode() for p in sorted(org_dir.glob("*.hl7")))
        feeds[org_dir.name] = [m for m in text.split("\n") if m.strip()]
    return feeds


@pytest.mark.parametrize("feeds", [_shipped(), generate(12)], ids=["deploy/demo/data", "generate"])
def test_every_encounter_has_its_visit_number_and_admit_time(feeds: dict[str, list[str]]) -> None:
    """PV1-19 (visit number) and PV1-44 (admit time) were written one field early, so no Encounter had them."""
    for org, messages in feeds.items():
        encounters = _resources(_convert(org, messages), "Encounter")
        assert len(encounters) == len(messages)
        for enc in encounters:
            assert enc.get("identifier") and enc["identifier"][0]["value"].startswith("V"), enc
            assert enc.get("period", {}).get("start"), enc


def test_demo_data_is_ours_and_in_the_repository() -> None:
    assert DEMO_DATA.is_dir() and Path(DEMO_DATA).is_relative_to(Path(__file__).resolve().parents[4])
