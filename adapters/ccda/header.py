"""The C-CDA header: Patient, Practitioner, Organization, Location, Encounter (encompassingEncounter)."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import (
    Ctx,
    El,
    addresses,
    birth_date,
    concept,
    first,
    human_names,
    id_key,
    identifiers,
    org_name,
    telecoms,
    ts,
)
from adapters.common.race import CDC_RACE_ETHNICITY, ethnicity_extension, race_extension

_GENDER = {"M": "male", "F": "female", "UN": "other", "U": "unknown", "UNK": "unknown"}


def _cdc_codings(codes: list[El]) -> list[dict[str, Any]]:
    """CDC race/ethnicity codings of ``raceCode``/``ethnicGroupCode`` elements; null-flavoured ones skipped."""
    out = []
    for c in codes:
        code = c.get("code")
        if not code or c.get("nullFlavor"):
            continue
        coding = {"system": CDC_RACE_ETHNICITY, "code": code}
        if c.get("displayName"):
            coding["display"] = c.get("displayName")
        out.append(coding)
    return out


def patient(pr: El, ctx: Ctx) -> str:
    """recordTarget/patientRole -> Patient; returns its reference. Keyed by the first MRN."""
    p = pr.find("patient")
    res: dict[str, Any] = {"resourceType": "Patient"}
    ids = identifiers(pr, ctx)
    if ids:
        res["identifier"] = ids
    if p is not None:
        names = human_names(p, ctx)
        if names:
            res["name"] = names
        g = p.find("administrativeGenderCode")
        if g is not None:
            code = g.get("code")
            if code:
                res["gender"] = _GENDER.get(code, "unknown")
                if code not in _GENDER:
                    ctx.warn("unknown-gender", f"administrativeGenderCode {code!r} mapped to unknown", g)
        bd = birth_date(p.find("birthTime"), ctx)
        if bd:
            res["birthDate"] = bd
        dec_t = ts(p.find("sdtc_deceasedTime"), ctx)
        dec_i = p.find("sdtc_deceasedInd")
        if dec_t:
            res["deceasedDateTime"] = dec_t
        elif dec_i is not None and dec_i.get("value") in ("true", "false"):
            res["deceasedBoolean"] = dec_i.get("value") == "true"
        ms = concept(p.find("maritalStatusCode"), ctx)
        if ms:
            res["maritalStatus"] = ms
        exts = []
        race = race_extension(_cdc_codings(p.findall("raceCode") + p.findall("sdtc_raceCode")))
        if race:
            exts.append(race)
        eth = ethnicity_extension(
            _cdc_codings(p.findall("ethnicGroupCode") + p.findall("sdtc_ethnicGroupCode"))
        )
        if eth:
            exts.append(eth)
        if exts:
            res["extension"] = exts
        comms = []
        for lc in p.findall("languageCommunication"):
            lang = lc.find("languageCode")
            if lang is not None and lang.get("code"):
                comm: dict[str, Any] = {
                    "language": {"coding": [{"system": "urn:ietf:bcp:47", "code": lang.get("code")}]}
                }
                pi = lc.find("preferenceInd")
                if pi is not None and pi.get("value") in ("true", "false"):
                    comm["preferred"] = pi.get("value") == "true"
                comms.append(comm)
        if comms:
            res["communication"] = comms
        contacts = []
        for gd in p.findall("guardian"):
            c: dict[str, Any] = {}
            rel = concept(gd.find("code"), ctx)
            if rel:
                c["relationship"] = [rel]
            n = human_names(gd.find("guardianPerson"), ctx)
            if n:
                c["name"] = n[0]
            tel = telecoms(gd, ctx)
            if tel:
                c["telecom"] = tel
            ad = addresses(gd, ctx)
            if ad:
                c["address"] = ad[0]
            if c:
                contacts.append(c)
        if contacts:
            res["contact"] = contacts
    else:
        ctx.warn("no-patient-element", "patientRole has no patient element", pr)
    tel = telecoms(pr, ctx)
    if tel:
        res["telecom"] = tel
    ad = addresses(pr, ctx)
    if ad:
        res["address"] = ad
    po = pr.find("providerOrganization")
    if po is not None:
        r = organization(po, ctx)
        if r:
            res["managingOrganization"] = {"reference": r}
    # The business key is the identifier itself (system, value), as the hl7v2 adapter does, so the same
    # MRN from the same source upserts one Patient whichever adapter carried it.
    if ids:
        return ctx.b.add(res, ids[0]["system"], ids[0]["value"])
    return ctx.b.add(res, "doc", ctx.doc_key)


def practitioner(ae: El | None, ctx: Ctx) -> str | None:
    """assignedAuthor/assignedEntity -> Practitioner (or Device for authoringDevice); None when empty."""
    if ae is None:
        return None
    person = first(ae, "assignedPerson", "associatedPerson", "informationRecipient")
    device = ae.find("assignedAuthoringDevice")
    names = human_names(person, ctx) if person is not None else []
    ids = identifiers(ae, ctx)
    if not names and device is not None:
        dev: dict[str, Any] = {"resourceType": "Device"}
        mn = device.find("manufacturerModelName")
        sn = device.find("softwareName")
        dn = []
        if mn is not None and (mn.text or "").strip():
            dn.append({"name": mn.text.strip(), "type": "model-name"})
        if sn is not None and (sn.text or "").strip():
            dn.append({"name": sn.text.strip(), "type": "user-friendly-name"})
        if dn:
            dev["deviceName"] = dn
        if ids:
            dev["identifier"] = ids
        key = id_key(ae) or f"{ctx.doc_key}#device:{'/'.join(d['name'] for d in dn)}"
        return ctx.b.add(dev, "device", key)
    if not names and not ids:
        ro = ae.find("representedOrganization")
        return organization(ro, ctx) if ro is not None else None
    res: dict[str, Any] = {"resourceType": "Practitioner"}
    if ids:
        res["identifier"] = ids
    if names:
        res["name"] = names
    tel = telecoms(ae, ctx)
    if tel:
        res["telecom"] = tel
    ad = addresses(ae, ctx)
    if ad:
        res["address"] = ad
    spec = concept(ae.find("code"), ctx)
    if spec:
        res["qualification"] = [{"code": spec}]
    with_ext = [i for i in ids if i["system"] != "urn:ietf:rfc:3986"]
    if with_ext:  # an id with an extension (NPI, a local id): (system, value), as the hl7v2 adapter does
        return ctx.b.add(res, with_ext[0]["system"], with_ext[0]["value"])
    # root-only ids are often the organisation's OID, shared by its staff: add the name
    nm = names[0] if names else {}
    return ctx.b.add(res, "name", id_key(ae), nm.get("family"), "+".join(nm.get("given", [])), nm.get("text"))


def organization(o: El | None, ctx: Ctx, extra_ids_from: El | None = None) -> str | None:
    """An organization element -> Organization; None when it has neither id nor name."""
    if o is None:
        return None
    ids = identifiers(o, ctx)
    if extra_ids_from is not None and extra_ids_from is not o:
        ids += [i for i in identifiers(extra_ids_from, ctx) if i not in ids]
    name = org_name(o)
    if not ids and not name:
        return None
    res: dict[str, Any] = {"resourceType": "Organization"}
    if ids:
        res["identifier"] = ids
    if name:
        res["name"] = name
    tel = telecoms(o, ctx)
    if tel:
        res["telecom"] = tel
    ad = addresses(o, ctx)
    if ad:
        res["address"] = ad
    with_ext = [i for i in ids if i["system"] != "urn:ietf:rfc:3986"]
    if with_ext:
        return ctx.b.add(res, with_ext[0]["system"], with_ext[0]["value"])
    # a root-only OID or no id: example documents reuse one OID for several organisations, so add the name
    return ctx.b.add(
        res, "name", id_key(o) or (id_key(extra_ids_from) if extra_ids_from is not None else None), name
    )


def practitioner_role(ae: El, practitioner_ref: str, ctx: Ctx) -> str | None:
    """The role of a Practitioner in the organisation its assignedEntity represents -> PractitionerRole
    (practitioner, organization, the entity's code and telecom); None without an organisation.

    Keyed by the two references, so the same person in the same organisation is one role per source."""
    ro = ae.find("representedOrganization")
    org_ref = organization(ro, ctx) if ro is not None else None
    if org_ref is None:
        return None
    role: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "practitioner": {"reference": practitioner_ref},
        "organization": {"reference": org_ref},
    }
    code = concept(ae.find("code"), ctx)
    if code:
        role["code"] = [code]
    tel = telecoms(ae, ctx)
    if tel:
        role["telecom"] = tel
    return ctx.b.add(role, "role", practitioner_ref, org_ref)


def location(el: El, ctx: Ctx, *, managing_organization: str | None = None) -> str | None:
    """participantRole (SDLOC) or healthCareFacility -> Location (managed by the service provider
    organisation, when the facility names one)."""
    place = first(el, "playingEntity", "location")
    name = org_name(place) if place is not None else None
    res: dict[str, Any] = {"resourceType": "Location"}
    ids = identifiers(el, ctx)
    if ids:
        res["identifier"] = ids
    if name:
        res["name"] = name
    t = concept(el.find("code"), ctx)
    if t:
        res["type"] = [t]
    ad = addresses(el, ctx) or (addresses(place, ctx) if place is not None else [])
    if ad:
        res["address"] = ad[0]
    tel = telecoms(el, ctx)
    if tel:
        res["telecom"] = tel
    if len(res) == 1:
        return None
    if managing_organization:
        res["managingOrganization"] = {"reference": managing_organization}
    k = id_key(el) or f"{ctx.doc_key}#loc:{name}:{ctx.tree.getpath(el)}"
    return ctx.b.add(res, "loc", k)
