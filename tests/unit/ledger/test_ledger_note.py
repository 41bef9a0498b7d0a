"""Signed notes and checkpoints, checked against Go's golang.org/x/mod/sumdb/note and sum.golang.org."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ledger import checkpoint, note
from ledger.errors import InvalidKey, VerificationError

# From golang.org/x/mod/sumdb/note/note_test.go.
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
PETER_SIG = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
ENOCH_SIG = "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"

# Real checkpoints of the Go checksum database, signed by its published key.
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_NOTES = [
    "go.sum database tree\n15368405\n/g9am3I6YWNKaZX/jkne1fqd9zEyjss+JXyPXG0WfkY=\n\n"
    "— sum.golang.org Az3grqJGUaSGukG9p8nI2vKgiFn7qGHxn0W+mrwyI6Gz3F0t1J3LzmWk/p96Ybf295EjwdSwlzgijq5WA9d1Ded7owM=\n",
    "go.sum database tree\n63512409\nF7eHRPqN/cqPtqti14NKdGGaI1Giw8coWP3KxihFZbg=\n\n"
    "— sum.golang.org Az3gri1OBHKT87Xj8UXU8zjoHGy/X+7Nl94f8TZkELVaasolmGApUsWqwVG9vE6hgqYb/ph/w2vdkLIVRH7bMB/FPQ4=\n",
]


def test_sign_matches_go_known_answer() -> None:
    assert note.sign_note(GO_TEXT, [PETER_SKEY]) == GO_TEXT + "\n" + PETER_SIG


def test_signer_key_derives_go_verifier_key() -> None:
    assert note.Signer.from_text(PETER_SKEY).verifier().to_text() == PETER_VKEY


def test_open_go_note_with_one_known_and_one_unknown_signature() -> None:
    n = note.open_note(GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG, [PETER_VKEY])
    assert n.text == GO_TEXT
    assert [s.name for s in n.sigs] == ["PeterNeumann"]
    assert [s.name for s in n.unverified_sigs] == ["EnochRoot"]


def test_open_go_note_with_both_known() -> None:
    n = note.open_note(GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG, [PETER_VKEY, ENOCH_VKEY])
    assert [s.name for s in n.sigs] == ["PeterNeumann", "EnochRoot"]


def test_open_without_known_signer_fails() -> None:
    with pytest.raises(VerificationError, match="no verifiable signatures"):
        note.open_note(GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG, [])


def test_open_with_invalid_known_signature_fails() -> None:
    bad = GO_TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(VerificationError, match="invalid signature"):
        note.open_note(bad, [PETER_VKEY])


def test_open_rejects_more_than_100_signatures() -> None:
    with pytest.raises(VerificationError, match="malformed"):
        note.open_note(GO_TEXT + "\n" + PETER_SIG * 101, [PETER_VKEY])


@pytest.mark.parametrize(
    "msg",
    [
        GO_TEXT,
        GO_TEXT + "\n",
        GO_TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + GO_TEXT + "\n" + PETER_SIG,
        GO_TEXT
        + "\n"
        + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        GO_TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    ],
)
def test_open_rejects_go_malformed_notes(msg: str) -> None:
    with pytest.raises(VerificationError, match="malformed"):
        note.open_note(msg, [PETER_VKEY])


def test_open_rejects_invalid_utf8() -> None:
    with pytest.raises(VerificationError):
        note.open_note(b"\xff" + (GO_TEXT + "\n" + PETER_SIG).encode(), [PETER_VKEY])


def test_every_mangled_verifier_key_is_rejected() -> None:
    # As TestNewVerifier: every proper substring and every single-byte increment must fail.
    b = PETER_VKEY
    for i in range(0, len(b), 3):
        for j in range(i + 1, len(b) + 1, 5):
            if (i, j) != (0, len(b)):
                with pytest.raises(InvalidKey):
                    note.Verifier.from_text(b[i:j])
    for i in range(len(b)):
        mangled = b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :]
        with pytest.raises(InvalidKey):
            note.Verifier.from_text(mangled)


def test_every_mangled_signer_key_is_rejected() -> None:
    b = PETER_SKEY
    for i in range(len(b)):
        mangled = b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :]
        with pytest.raises(InvalidKey):
            note.Signer.from_text(mangled)
    for j in range(1, len(b)):
        with pytest.raises(InvalidKey):
            note.Signer.from_text(b[:j])


def test_generated_keys_roundtrip_and_key_id_follows_spec() -> None:
    skey, vkey = note.generate_key("example.com/log")
    v = note.Verifier.from_text(vkey)
    assert v.key_id == note.key_id("example.com/log", 0x01, v.public_key)
    assert note.Signer.from_text(skey).verifier() == v
    assert skey.startswith("PRIVATE+KEY+example.com/log+")


@pytest.mark.parametrize("name", ["", "a b", "a+b", "tab\tname"])
def test_generate_key_rejects_invalid_names(name: str) -> None:
    with pytest.raises(InvalidKey):
        note.generate_key(name)


# -- checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", SUMDB_NOTES)
def test_open_real_sum_golang_org_checkpoints(signed: str) -> None:
    cp = checkpoint.open(signed, [SUMDB_VKEY])
    assert cp.origin == "go.sum database tree"
    assert cp.size in (15368405, 63512409)
    assert len(cp.root_hash) == 32
    assert cp.signers == ("sum.golang.org",)


def test_sumdb_checkpoint_with_altered_size_fails() -> None:
    forged = SUMDB_NOTES[0].replace("15368405", "15368406")
    with pytest.raises(VerificationError):
        checkpoint.open(forged, [SUMDB_VKEY])


@pytest.fixture(scope="module")
def log_keys() -> tuple[str, str]:
    return note.generate_key("fhirbridge.example/ledger")


def test_sign_then_open_roundtrip(log_keys: tuple[str, str]) -> None:
    skey, vkey = log_keys
    root = bytes(range(32))
    signed = checkpoint.sign("fhirbridge.example/ledger", 42, root, skey)
    lines = signed.split("\n")
    assert lines[:3] == ["fhirbridge.example/ledger", "42", base64.b64encode(root).decode()]
    assert lines[4].startswith("— fhirbridge.example/ledger ")
    cp = checkpoint.open(signed, [vkey])
    assert (cp.origin, cp.size, cp.root_hash, cp.extensions) == ("fhirbridge.example/ledger", 42, root, ())


def test_open_ignores_unknown_extra_signatures_and_accepts_rotated_keys(log_keys: tuple[str, str]) -> None:
    skey, vkey = log_keys
    new_skey, new_vkey = note.generate_key("fhirbridge.example/ledger")
    body = checkpoint.body("fhirbridge.example/ledger", 7, b"\x07" * 32)
    signed = note.sign_note(body, [skey, new_skey])
    assert checkpoint.open(signed, [vkey]).size == 7
    assert checkpoint.open(signed, [new_vkey]).size == 7
    with_unknown = signed + ENOCH_SIG
    assert checkpoint.open(with_unknown, [vkey]).size == 7


def test_open_with_wrong_key_fails(log_keys: tuple[str, str]) -> None:
    skey, _ = log_keys
    signed = checkpoint.sign("fhirbridge.example/ledger", 1, b"\x01" * 32, skey)
    with pytest.raises(VerificationError):
        checkpoint.open(signed, [PETER_VKEY])


@pytest.mark.parametrize(
    "body",
    [
        "origin\n01\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",  # leading zero
        "origin\n-1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "origin\n18446744073709551616\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",  # 2^64
        "origin\n1\nAAAA\n",  # short root
        "origin\n1\n!!notbase64!!\n",
        "origin\n1\n",  # two lines
        "\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",  # empty origin
        "origin\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\next\n\n",  # note would end the text early
    ],
)
def test_open_rejects_malformed_bodies_even_when_signed(log_keys: tuple[str, str], body: str) -> None:
    skey, vkey = log_keys
    try:
        signed = note.sign_note(body, [skey])
    except VerificationError:
        return  # unsignable is as good as rejected
    with pytest.raises(VerificationError):
        checkpoint.open(signed, [vkey])


def test_extension_lines_are_kept(log_keys: tuple[str, str]) -> None:
    skey, vkey = log_keys
    body = checkpoint.body("o", 3, b"\x03" * 32, ["ext one", "ext two"])
    cp = checkpoint.open(note.sign_note(body, [skey]), [vkey])
    assert cp.extensions == ("ext one", "ext two")
    assert cp.body() == body


def test_cosignature_is_c2sp_tlog_cosignature_v1(log_keys: tuple[str, str]) -> None:
    skey, vkey = log_keys
    wskey, wvkey = note.generate_key("witness.example/w1", note.ALG_COSIGNATURE_V1)
    signed = checkpoint.sign("fhirbridge.example/ledger", 9, b"\x09" * 32, skey)
    line = checkpoint.cosign(signed, vkey, wskey, timestamp=1679315147)
    raw = base64.b64decode(line.split(" ")[2])
    w = note.Verifier.from_text(wvkey)
    assert raw[:4] == w.key_id.to_bytes(4, "big")
    assert int.from_bytes(raw[4:12], "big") == 1679315147
    # The signed message is the spec's: header line, time line, then the checkpoint body.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    body = checkpoint.body("fhirbridge.example/ledger", 9, b"\x09" * 32)
    Ed25519PublicKey.from_public_bytes(w.public_key).verify(
        raw[12:], b"cosignature/v1\ntime 1679315147\n" + body.encode()
    )
    # The key id uses algorithm byte 0x04.
    assert w.key_id == note.key_id("witness.example/w1", 0x04, w.public_key)
    cp = checkpoint.open(signed + line, [vkey, wvkey])
    assert cp.signers == ("fhirbridge.example/ledger", "witness.example/w1")


def test_cosign_refuses_a_note_not_signed_by_the_log(log_keys: tuple[str, str]) -> None:
    _, vkey = log_keys
    other, _ = note.generate_key("fhirbridge.example/ledger")
    wskey, _ = note.generate_key("w", note.ALG_COSIGNATURE_V1)
    signed = checkpoint.sign("fhirbridge.example/ledger", 9, b"\x09" * 32, other)
    with pytest.raises(VerificationError):
        checkpoint.cosign(signed, vkey, wskey)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, (1 << 64) - 1), root=st.binary(min_size=32, max_size=32), pos=st.integers(0, 10_000)
)
def test_property_any_single_byte_change_breaks_the_checkpoint(size: int, root: bytes, pos: int) -> None:
    skey, vkey = _KEYS
    signed = checkpoint.sign("o.example/x", size, root, skey)
    assert checkpoint.open(signed, [vkey]).size == size
    i = pos % len(signed)
    # The last base64 character before "=" carries 2 ignored bits (Go's decoder ignores them too).
    assume(i != len(signed) - 3)
    ch = signed[i]
    repl = "A" if ch != "A" else "B"
    mangled = signed[:i] + repl + signed[i + 1 :]
    with pytest.raises((VerificationError, InvalidKey)):
        checkpoint.open(mangled, [vkey])


_KEYS = note.generate_key("o.example/x")


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300),
        st.builds(lambda a, b: a + "\n\n— " + b + "\n", st.text(max_size=80), st.text(max_size=120)),
    )
)
def test_property_garbage_notes_only_ever_raise_verification_error(garbage: str | bytes) -> None:
    with pytest.raises(VerificationError):
        note.open_note(garbage, [PETER_VKEY])
    if isinstance(garbage, str):
        with contextlib.suppress(VerificationError):  # anything else escaping fails the test
            checkpoint.parse_body(garbage)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_property_garbage_keys_only_ever_raise_invalid_key(garbage: str) -> None:
    for parse in (note.Verifier.from_text, note.Signer.from_text):
        with contextlib.suppress(InvalidKey):  # anything else escaping fails the test
            parse(garbage)
