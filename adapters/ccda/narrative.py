"""CDA section narrative (``<text>``) -> FHIR Narrative XHTML, keeping the original content.

CDA's narrative block is close to XHTML; the mapping follows the FHIR CDA-on-FHIR guidance:
``content``->``span``, ``paragraph``->``p``, ``list``->``ul``/``ol``, ``item``->``li``,
``linkHtml``->``a``, ``caption``->``caption`` inside tables (``p`` elsewhere), ``footnote``->``span``.
``ID`` becomes ``id`` and ``styleCode`` becomes ``class``. ``renderMultiMedia`` becomes a note span.
Anything else is unwrapped to its text so the output is always well-formed, valid FHIR XHTML.
"""

from __future__ import annotations

from html import escape
from typing import Any

XHTML_NS = "http://www.w3.org/1999/xhtml"
_MAP = {
    "content": "span",
    "paragraph": "p",
    "item": "li",
    "linkHtml": "a",
    "footnote": "span",
    "footnoteRef": "span",
    "br": "br",
    "sub": "sub",
    "sup": "sup",
    "table": "table",
    "thead": "thead",
    "tbody": "tbody",
    "tfoot": "tfoot",
    "tr": "tr",
    "td": "td",
    "th": "th",
    "colgroup": "colgroup",
    "col": "col",
}
_ATTRS = {"colspan", "rowspan", "align", "valign"}
_ALLOWED_IN_TABLE = {"caption"}


def _attrs(el: Any, tag: str) -> str:
    parts: list[str] = []
    i = el.get("ID")
    if i:
        parts.append(f' id="{escape(i)}"')
    sc = el.get("styleCode")
    if sc:
        parts.append(f' class="{escape(sc)}"')
    for a in _ATTRS:
        v = el.get(a)
        if v:
            parts.append(f' {a}="{escape(v)}"')
    if tag == "a":
        href = el.get("href")
        if href and not href.lower().startswith("javascript:"):
            parts.append(f' href="{escape(href)}"')
    return "".join(parts)


def _render(el: Any, out: list[str], parent: str) -> None:
    tag = el.tag if isinstance(el.tag, str) else ""
    if tag == "list":
        html = "ol" if el.get("listType") == "ordered" else "ul"
    elif tag == "caption":
        html = "caption" if parent == "table" else "p"
    elif tag == "renderMultiMedia":
        out.append('<span class="renderMultiMedia">[multimedia]</span>')
        if el.tail:
            out.append(escape(el.tail))
        return
    else:
        html = _MAP.get(tag, "")
    if html == "br":
        out.append("<br/>")
    else:
        if html:
            out.append(f"<{html}{_attrs(el, html)}>")
        if el.text:
            out.append(escape(el.text))
        for child in el:
            _render(child, out, html or parent)
        if html:
            out.append(f"</{html}>")
    if el.tail:
        out.append(escape(el.tail))


def to_xhtml(text_el: Any) -> str | None:
    """The XHTML ``div`` for a section ``<text>`` element, or ``None`` when it has no content."""
    if text_el is None:
        return None
    out: list[str] = [f'<div xmlns="{XHTML_NS}">']
    if text_el.text:
        out.append(escape(text_el.text))
    for child in text_el:
        _render(child, out, "div")
    out.append("</div>")
    html = "".join(out)
    if not "".join(text_el.itertext()).strip() and len(text_el) == 0:
        return None
    return html


def plain_div(text: str) -> str:
    return f'<div xmlns="{XHTML_NS}"><p>{escape(text)}</p></div>'
