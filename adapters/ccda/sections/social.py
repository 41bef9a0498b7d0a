"""Social history section: smoking status, birth sex, SDOH and other observations -> Observation
(``social-history``); the eICR entries in it are converted by :mod:`.eicr`."""

from __future__ import annotations

from adapters.ccda.datatypes import Ctx, El
from adapters.ccda.sections.eicr import PREGNANCY_OBSERVATION, pregnancy
from adapters.ccda.sections.entry import T, templates
from adapters.ccda.sections.observations import observation


def social(o: El, ctx: Ctx) -> list[str]:
    if o.tag != "observation":
        from adapters.ccda.sections.dispatch import generic  # the dispatcher imports this module

        return generic(o, ctx, "social")
    if PREGNANCY_OBSERVATION in templates(o):
        return pregnancy(o, ctx)
    tpl = templates(o)
    if f"{T}.4.200" in tpl:  # birth sex: a Patient extension in US Core; also kept as an Observation
        val = o.find("value")
        if val is not None and val.get("code") in ("M", "F", "UNK") and ctx.patient_ref:
            pat = ctx.b.get(ctx.patient_ref)
            if pat is not None:
                exts = pat.setdefault("extension", [])
                url = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
                if not any(x.get("url") == url for x in exts):
                    exts.append({"url": url, "valueCode": val.get("code")})
    r = observation(o, ctx, "social-history")
    return [r] if r else []
