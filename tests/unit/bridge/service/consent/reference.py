"""A literal, slow reading of the Consent rules, kept only to check bridge.service.consent.evaluate.

It walks the raw Consent JSON for every question: no compilation, no binding to the requester, no
pruning, no memo. It shares the terminology tables with the evaluator (the purpose hierarchy, the code
elements per type, the confidentiality ranks, the code systems) but none of its code: dates, references
and codings are read here again, more slowly and more plainly.

Each element of a provision answers True (matches), False (rules the provision out) or None (cannot be
told: a malformed date; a custodian/author actor, or ``authoredby`` an organisation, when the resource's
source is not given). A provision applies when no element says False; when one says None, it applies if
its type is deny.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.service.consent.evaluate import (
    ACT_CODE,
    ACT_REASON,
    AUTHOR_ELEMENTS,
    CODE_ELEMENTS,
    CONFIDENTIALITY,
    CONFIDENTIALITY_RANK,
    CONSENT_ACTION,
    CONSENT_SCOPE,
    DATA_SIDE_ROLES,
    DEFAULT_CODE_ELEMENTS,
    PARTICIPATION_TYPE,
    PURPOSE_PARENT,
    READ_ACTIONS,
    RESOURCE_TYPES,
    SYSTEM_ALIASES,
    Requester,
)

Result = tuple[bool, str | None, str | None]  # (permit, consent id, provision path)


def interval(text: Any) -> tuple[datetime, datetime] | None:
    """[start, end) of a FHIR date/dateTime/instant by its precision, or None."""
    if not isinstance(text, str):
        return None
    try:
        if len(text) == 4 and text.isdigit():
            start = datetime(int(text), 1, 1, tzinfo=UTC)
            return start, datetime(int(text) + 1, 1, 1, tzinfo=UTC)
        if len(text) == 7 and text[4] == "-":
            start = datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC)
            end = (
                datetime(start.year + 1, 1, 1, tzinfo=UTC)
                if start.month == 12
                else start.replace(month=start.month + 1)
            )
            return start, end
        if len(text) == 10:
            start = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
            return start, start + timedelta(days=1)
        if "T" not in text or len(text) < 19:
            return None
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        head = text[:19]
        rest = text[19:]
        digits = len(rest[1:].split("Z")[0].split("+")[0].split("-")[0]) if rest.startswith(".") else 0
        datetime.strptime(head, "%Y-%m-%dT%H:%M:%S")
        return moment, moment + timedelta(seconds=10.0**-digits)
    except ValueError:
        return None


def period(value: Any) -> tuple[datetime | None, datetime | None] | None:
    """(start, end) of a Period, an open side None; the whole Period None when it cannot be read."""
    if not isinstance(value, Mapping):
        return None
    start = end = None
    if value.get("start") is not None:
        found = interval(value["start"])
        if found is None:
            return None
        start = found[0]
    if value.get("end") is not None:
        found = interval(value["end"])
        if found is None:
            return None
        end = found[1]
    return start, end


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def system_of(coding: Mapping[str, Any]) -> str | None:
    system = coding.get("system")
    return SYSTEM_ALIASES.get(system, system) if system else None


def codings(value: Any) -> list[tuple[str | None, str]]:
    out = []
    for item in as_list(value):
        if not isinstance(item, Mapping):
            continue
        for coding in item["coding"] if isinstance(item.get("coding"), list) else [item]:
            if not isinstance(coding, Mapping):
                continue
            code, system = coding.get("code"), coding.get("system")
            if isinstance(code, str) and code and (system is None or isinstance(system, str)):
                out.append((system_of(coding), code))
    return out


def same(provision_coding: tuple[str | None, str], resource_coding: tuple[str | None, str]) -> bool:
    system, code = provision_coding
    return code == resource_coding[1] and (system is None or system == resource_coding[0])


def local(ref: Any, base_url: str | None) -> str | None:
    if not isinstance(ref, str) or not ref:
        return None
    if base_url and ref.startswith(base_url + "/"):
        ref = ref[len(base_url) + 1 :]
    elif "://" in ref or ref.startswith("urn:") or ref.startswith("#"):
        return None
    if "/_history/" in ref:
        ref = ref.split("/_history/")[0]
    parts = ref.split("/")
    return ref if len(parts) == 2 and parts[0] and parts[1] else None


def all_refs(value: Any, base_url: str | None) -> set[str]:
    out: set[str] = set()
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                if local(item, base_url):
                    out.add(local(item, base_url))  # type: ignore[arg-type]
            else:
                out |= all_refs(item, base_url)
    elif isinstance(value, list):
        for item in value:
            out |= all_refs(item, base_url)
    return out


def covers(provision_purpose: str, requested: str) -> bool:
    code: str | None = requested
    while code is not None:
        if code == provision_purpose:
            return True
        code = PURPOSE_PARENT.get(code)
    return False


class Context:
    def __init__(
        self,
        requester: Requester,
        resource: dict[str, Any],
        now: datetime,
        source: str | None,
        source_refs: frozenset[str],
        clinical_date: Callable[[dict[str, Any]], str | None],
        base_url: str | None,
    ) -> None:
        self.requester, self.resource, self.now = requester, resource, now
        self.source, self.source_refs = source, source_refs
        self.clinical_date, self.base_url = clinical_date, base_url

    def from_source(self, org_id: str | None, org_ref: str | None) -> bool | None:
        if self.source is None and not self.source_refs:
            return None
        return (org_id is not None and org_id == self.source) or (
            org_ref is not None and org_ref in self.source_refs
        )


def combine(states: list[bool | None]) -> bool | None:
    if False in states:
        return False
    return None if None in states else True


def any_of(states: list[bool | None]) -> bool | None:
    if True in states:
        return True
    return None if None in states else False


def ref_type(value: Any) -> str | None:
    return value.removeprefix("http://hl7.org/fhir/StructureDefinition/") if isinstance(value, str) else None


def actor_state(actor: Any, ctx: Context) -> tuple[bool, bool | None]:
    """(names the requester, names the resource's source)."""
    if not isinstance(actor, Mapping) or not isinstance(actor.get("reference"), Mapping):
        return False, False
    data_side = any(
        s in (PARTICIPATION_TYPE, None) and c in DATA_SIDE_ROLES for s, c in codings(actor.get("role"))
    )
    ref = actor["reference"]
    literal = local(ref.get("reference"), ctx.base_url)
    literal_type = literal.split("/")[0] if literal else None
    ident = ref.get("identifier")
    value = ident.get("value") if isinstance(ident, Mapping) else None
    org_id = (
        value
        if isinstance(value, str)
        and value
        and ref_type(ref.get("type")) in (None, "Organization")
        and literal_type in (None, "Organization")
        else None
    )
    org_ref = literal if literal_type == "Organization" else None
    if data_side:
        if org_id is None and org_ref is None:
            return False, False
        return False, ctx.from_source(org_id, org_ref)
    req = ctx.requester
    names = (
        (org_id is not None and org_id == req.organization)
        or (org_ref is not None and org_ref in req.organization_refs)
        or (literal_type in ("Practitioner", "PractitionerRole") and literal == req.practitioner)
    )
    return names, False


def element_states(provision: Mapping[str, Any], ctx: Context) -> list[bool | None]:
    res = ctx.resource
    states: list[bool | None] = []
    if as_list(provision.get("action")):
        states.append(
            any(
                s in (CONSENT_ACTION, None) and c in READ_ACTIONS for s, c in codings(provision.get("action"))
            )
        )
    if provision.get("period") is not None:
        found = period(provision["period"])
        if found is None:
            states.append(None)
        else:
            start, end = found
            states.append((start is None or start <= ctx.now) and (end is None or ctx.now < end))
    if as_list(provision.get("actor")):
        pairs = [actor_state(actor, ctx) for actor in as_list(provision["actor"])]
        if any(names for names, _ in pairs):
            states.append(True)
        else:
            states.append(any_of([source for _, source in pairs]))
    if as_list(provision.get("purpose")):
        states.append(
            any(
                s in (ACT_REASON, None) and covers(c, ctx.requester.purpose)
                for s, c in codings(provision.get("purpose"))
            )
        )
    if as_list(provision.get("class")):
        meta = res.get("meta") if isinstance(res.get("meta"), Mapping) else {}
        profiles = {p.split("|")[0] for p in as_list(meta.get("profile")) if isinstance(p, str)}
        found_class = False
        for system, code in codings(provision.get("class")):
            if "/" in code:
                found_class = found_class or code.split("|")[0] in profiles
            elif system in (RESOURCE_TYPES, None) and code == res.get("resourceType"):
                found_class = True
        states.append(found_class)
    if as_list(provision.get("code")):
        rtype = res.get("resourceType")
        paths = (
            CODE_ELEMENTS.get(rtype, DEFAULT_CODE_ELEMENTS)
            if isinstance(rtype, str)
            else DEFAULT_CODE_ELEMENTS
        )
        values: list[Any] = []
        for path in paths:
            nodes: list[Any] = [res]
            for part in path.split("."):
                nodes = [
                    item for node in nodes if isinstance(node, Mapping) for item in as_list(node.get(part))
                ]
            values.extend(nodes)
        resource_codings = codings(values)
        states.append(any(same(p, r) for p in codings(provision.get("code")) for r in resource_codings))
    if as_list(provision.get("securityLabel")):
        meta = res.get("meta") if isinstance(res.get("meta"), Mapping) else {}
        labels = codings(meta.get("security"))
        found_label = False
        for p in codings(provision.get("securityLabel")):
            for r in labels:
                if same(p, r) or (
                    p[0] in (CONFIDENTIALITY, None)
                    and r[0] in (CONFIDENTIALITY, None)
                    and p[1] in CONFIDENTIALITY_RANK
                    and r[1] in CONFIDENTIALITY_RANK
                    and CONFIDENTIALITY_RANK[r[1]] <= CONFIDENTIALITY_RANK[p[1]]
                ):
                    found_label = True
        states.append(found_label)
    if provision.get("dataPeriod") is not None:
        found = period(provision["dataPeriod"])
        if found is None:
            states.append(None)
        else:
            start, end = found
            date = interval(ctx.clinical_date(res))
            states.append(
                date is not None and (start is None or start <= date[0]) and (end is None or date[1] <= end)
            )
    if as_list(provision.get("data")):
        own = (
            f"{res['resourceType']}/{res['id']}"
            if isinstance(res.get("resourceType"), str) and isinstance(res.get("id"), str) and res["id"]
            else None
        )
        entry_states: list[bool | None] = []
        for entry in as_list(provision["data"]):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("reference"), Mapping):
                continue
            meaning = entry.get("meaning")
            target = local(entry["reference"].get("reference"), ctx.base_url)
            if meaning == "authoredby":
                authors: set[str] = set()
                for key in AUTHOR_ELEMENTS:
                    authors |= all_refs(res.get(key), ctx.base_url)
                ident = entry["reference"].get("identifier")
                value = ident.get("value") if isinstance(ident, Mapping) else None
                org_id = (
                    value
                    if isinstance(value, str)
                    and value
                    and ref_type(entry["reference"].get("type")) in (None, "Organization")
                    else None
                )
                if target is not None and target in authors:
                    entry_states.append(True)
                elif org_id is not None or (target or "").startswith("Organization/"):
                    org_ref = target if (target or "").startswith("Organization/") else None
                    entry_states.append(ctx.from_source(org_id, org_ref))
                else:
                    entry_states.append(False)
            elif meaning == "dependents":
                entry_states.append(
                    target is not None and (target == own or target in all_refs(res, ctx.base_url))
                )
            else:  # instance, related, or no meaning
                entry_states.append(target is not None and target == own)
        states.append(any_of(entry_states))
    return states


def effect_of(provision: Mapping[str, Any], parent: str | None, rule: str | None) -> str:
    kind = provision.get("type")
    if kind in ("permit", "deny"):
        return kind
    if kind is not None:
        return "deny"
    if parent is not None:
        return "permit" if parent == "deny" else "deny"
    return rule or "deny"


def policy_rule(consent: Mapping[str, Any]) -> str | None:
    for system, code in codings(consent.get("policyRule")):
        if system in (ACT_CODE, None) and code in ("OPTIN", "OPTINR"):
            return "permit"
        if system in (ACT_CODE, None) and code in ("OPTOUT", "OPTOUTE"):
            return "deny"
    return None


def decide_provision(
    provision: Mapping[str, Any],
    path: str,
    parent: str | None,
    rule: str | None,
    ctx: Context,
    extra: bool | None,
) -> tuple[str, str] | None:
    effect = effect_of(provision, parent, rule)
    state = combine([*element_states(provision, ctx), extra])
    applies = (effect == "deny") if state is None else state
    if not applies:
        return None
    found = []
    for index, child in enumerate(as_list(provision.get("provision"))):
        if isinstance(child, Mapping):
            result = decide_provision(child, f"{path}.provision[{index}]", effect, None, ctx, True)
            if result is not None:
                found.append(result)
    for result in found:
        if result[0] == "deny":
            return result
    return found[0] if found else (effect, path)


def counts(consent: Any) -> bool:
    if not isinstance(consent, Mapping) or consent.get("resourceType", "Consent") != "Consent":
        return False
    if consent.get("status") != "active":
        return False
    scope = codings(consent.get("scope"))
    return not scope or any(c == "patient-privacy" and s in (CONSENT_SCOPE, None) for s, c in scope)


def decide(
    consents: list[Any],
    default: str,
    requester: Requester,
    resource: dict[str, Any],
    now: datetime,
    *,
    source: str | None = None,
    source_refs: frozenset[str] = frozenset(),
    clinical_date: Callable[[dict[str, Any]], str | None],
    base_url: str | None = None,
) -> Result:
    ctx = Context(requester, resource, now, source, source_refs, clinical_date, base_url)
    decided: list[tuple[str, str, str]] = []
    for index, consent in enumerate(consents):
        if not counts(consent):
            continue
        cid = consent.get("id") if isinstance(consent.get("id"), str) and consent.get("id") else f"#{index}"
        extra: bool | None = True
        if consent.get("dateTime") is not None:
            issued = interval(consent["dateTime"])
            if issued is None:
                extra = None
            elif issued[0] > now:
                continue
        root = consent.get("provision") if isinstance(consent.get("provision"), Mapping) else {}
        result = decide_provision(root, "provision", None, policy_rule(consent), ctx, extra)
        if result is not None:
            decided.append((result[0], cid, result[1]))
    for effect, cid, path in decided:
        if effect == "deny":
            return False, cid, path
    for _effect, cid, path in decided:
        return True, cid, path
    return default == "permit", None, None
