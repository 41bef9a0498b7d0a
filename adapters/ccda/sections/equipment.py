"""Medical equipment section: Non-Medicinal Supply -> Device and DeviceUseStatement; a procedure's
product instance -> Device."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, effective, first, identifiers
from adapters.ccda.sections.entry import add, add_note, entry_text, negated, status_code
from adapters.ccda.sections.plan import planned


def product_devices(el: El, ctx: Ctx) -> list[str]:
    """Device for each product instance (``participant/participantRole/playingDevice``) of ``el``."""
    out = []
    for part in el.findall("participant"):
        pr = part.find("participantRole")
        dev_el = pr.find("playingDevice") if pr is not None else None
        if dev_el is None:
            continue
        dtype = concept(dev_el.find("code"), ctx)
        udi = [i for i in identifiers(pr, ctx) if i["system"] != "urn:ietf:rfc:3986"]
        if dtype is None and not udi:
            continue
        device: dict[str, Any] = {"resourceType": "Device", "patient": {"reference": ctx.patient_ref}}
        if dtype:
            device["type"] = dtype
        if udi:
            device["udiCarrier"] = [{"deviceIdentifier": udi[0]["value"], "carrierHRF": udi[0]["value"]}]
            device["identifier"] = udi
        out.append(add(ctx, pr, device, "device"))
    return out


def device_use(el: El, ctx: Ctx) -> list[str]:
    """Non-Medicinal Supply Activity (4.50) or a procedure's product instance -> Device + DeviceUseStatement."""
    if el.tag == "organizer":  # e.g. the Implant UDI organizer: convert what it groups
        from adapters.ccda.sections.dispatch import convert_entry  # the dispatcher imports this module

        return [
            r
            for comp in el.findall("component")
            for child in comp
            if isinstance(child.tag, str)
            for r in convert_entry(child, ctx, "equipment")
        ]
    if el.get("moodCode") in ("INT", "RQO", "PRP", "ARQ"):
        return planned(el, ctx)
    pr = first(el, "participant/participantRole")
    dev_el = pr.find("playingDevice") if pr is not None else None
    dtype = concept(dev_el.find("code"), ctx) if dev_el is not None else None
    if dtype is None:
        t = entry_text(el, ctx)
        dtype = {"text": t} if t else None
    if dtype is None:
        ctx.warn("device-no-code", "supply has no device code or text; skipped", el)
        return []
    device: dict[str, Any] = {
        "resourceType": "Device",
        "type": dtype,
        "patient": {"reference": ctx.patient_ref},
    }
    udi = [i for i in identifiers(pr, ctx) if i["system"] != "urn:ietf:rfc:3986"] if pr is not None else []
    if udi:
        device["udiCarrier"] = [{"deviceIdentifier": udi[0]["value"], "carrierHRF": udi[0]["value"]}]
        device["identifier"] = udi
    dev_ref = add(ctx, el, device, "device")
    res: dict[str, Any] = {
        "resourceType": "DeviceUseStatement",
        "status": "stopped"
        if negated(el)
        else {
            "completed": "completed",
            "active": "active",
            "aborted": "stopped",
            "cancelled": "stopped",
            "nullified": "entered-in-error",
        }.get(status_code(el), "active"),
        "subject": {"reference": ctx.patient_ref},
        "device": {"reference": dev_ref},
    }
    point, per = effective(el.find("effectiveTime"), ctx)
    if per:
        res["timingPeriod"] = per
    elif point:
        res["timingDateTime"] = point
    add_note(res, el, ctx)
    return [add(ctx, el, res), dev_ref]
