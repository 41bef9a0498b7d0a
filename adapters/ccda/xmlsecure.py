"""Hardened XML parsing for C-CDA input.

Defences, each tested in tests/unit/adapters/test_ccda_security.py:

* **size limit** (``max_bytes``, default 20 MiB) checked before any parsing;
* **no DTDs at all**: a ``<!DOCTYPE`` anywhere in the prolog is refused before parsing (in any of the
  encodings XML allows), and the parsed tree is checked again for an internal or external subset;
* **no entity expansion** (``resolve_entities=False``): "billion laughs" cannot expand;
* **no network and no external entities** (``no_network=True``, ``load_dtd=False``);
* **no huge trees** (``huge_tree=False``: libxml2's own depth and text-node limits stay on).

Namespaces are removed from element tags after parsing (``sdtc:`` elements become ``sdtc_<name>``),
so the converters use short paths such as ``recordTarget/patientRole``.
"""

from __future__ import annotations

import re
from typing import Any

from lxml import etree

from adapters.errors import AdapterError

CDA_NS = "urn:hl7-org:v3"
SDTC_NS = "urn:hl7-org:sdtc"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
DEFAULT_MAX_BYTES = 20 * 1024 * 1024

_DOCTYPE_PATTERNS = (
    b"<!DOCTYPE",
    "<!DOCTYPE".encode("utf-16-le"),
    "<!DOCTYPE".encode("utf-16-be"),
    "<!DOCTYPE".encode("utf-32-le"),
    "<!DOCTYPE".encode("utf-32-be"),
    b"<!ENTITY",
    "<!ENTITY".encode("utf-16-le"),
    "<!ENTITY".encode("utf-16-be"),
)


_ROOT_NS = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?ClinicalDocument\b[^>]*?(\s+xmlns=[\"']urn:hl7-org:v3[\"'])")


class UnsafeXml(AdapterError):
    """The document uses a forbidden XML feature or is too large. ``str()`` says which."""


class BadXml(AdapterError):
    """The document is not well-formed XML. Carries ``line`` when libxml2 reports one."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


def _parser(recover: bool = False) -> etree.XMLParser:
    return etree.XMLParser(
        recover=recover,
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        collect_ids=False,
    )


def parse(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, notes: list[str] | None = None) -> Any:
    """Parse ``data`` securely and return the root element, with namespace-free tags.

    A document whose only defect is an undeclared namespace prefix (``xsi:type`` without
    ``xmlns:xsi``, common in hand-written examples) is parsed leniently and a note is appended to
    ``notes``. Raises :class:`UnsafeXml` (too large, DTD, entity declarations) or :class:`BadXml`.
    """
    if len(data) > max_bytes:
        raise UnsafeXml(f"document is {len(data)} bytes, over the {max_bytes}-byte limit (option max_bytes)")
    # A DTD or entity declaration can only appear before the root element; look at the prolog and
    # a generous margin (a DTD can be long). Case-sensitive, as XML is.
    head = data[: 1 << 16]
    for pat in _DOCTYPE_PATTERNS:
        if pat in head:
            raise UnsafeXml("DTDs and entity declarations are forbidden in C-CDA input (<!DOCTYPE> found)")
    # Fast path: drop the CDA default-namespace declaration on the root start tag, so the common
    # case needs no per-element renaming. Anything still namespaced is renamed below.
    m = _ROOT_NS.search(data, 0, 1 << 16)
    if m is not None:
        data = data[: m.start(1)] + data[m.end(1) :]
    parser = _parser()
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if isinstance(exc.lineno, int) and exc.lineno > 0 else None
        errors = list(parser.error_log)
        if not errors or any(e.domain_name != "NAMESPACE" for e in errors):
            raise BadXml(f"not well-formed XML: {exc.msg}", line) from None
        root = etree.fromstring(data, _parser(recover=True))
        if root is None:
            raise BadXml(f"not well-formed XML: {exc.msg}", line) from None
        if notes is not None:
            notes.append(f"namespace error, parsed leniently: {errors[0].message} (line {errors[0].line})")
        for el in root.iter():
            tag = el.tag
            if isinstance(tag, str) and ":" in tag and tag[0] != "{":
                prefix, _, local = tag.partition(":")
                el.tag = f"sdtc_{local}" if prefix == "sdtc" else local
            xt = el.attrib.pop("xsi:type", None) if isinstance(tag, str) else None
            if xt is not None:
                el.set(XSI_TYPE, xt)
    except ValueError as exc:  # e.g. a unicode string with an encoding declaration
        raise BadXml(f"not XML: {exc}") from None
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None or tree.docinfo.externalDTD is not None:
        raise UnsafeXml("DTDs are forbidden in C-CDA input")
    for ent in root.iter(etree.Entity):
        raise UnsafeXml(f"entity references are forbidden in C-CDA input ({ent.text})")
    for el in root.iter(f"{{{CDA_NS}}}*", f"{{{SDTC_NS}}}*"):
        ns, _, local = el.tag[1:].partition("}")
        el.tag = f"sdtc_{local}" if ns == SDTC_NS else local
    if isinstance(root.tag, str) and root.tag[0] == "{":  # a root in another namespace: not C-CDA
        raise BadXml(f"the root element {root.tag} is not in the C-CDA namespace {CDA_NS}")
    return root
