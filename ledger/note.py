"""C2SP signed notes (https://c2sp.org/signed-note), compatible with golang.org/x/mod/sumdb/note.

Keys:

* verifier key: ``<name>+<hex key id>+<base64(alg || public key)>``;
* signer key: ``PRIVATE+KEY+<name>+<hex key id>+<base64(alg || Ed25519 seed)>``;
* key id: the first 4 bytes (big endian) of ``SHA-256(name || 0x0A || alg || public key)``.

Two algorithms are supported: ``0x01`` Ed25519 note signatures (the log's own signature) and ``0x04``
Ed25519 ``tlog-cosignature/v1`` cosignatures (https://c2sp.org/tlog-cosignature), whose signature is
``u64 timestamp || Ed25519(“cosignature/v1\\ntime <t>\\n” || note text)``. A 0x04 signer key uses the same
``PRIVATE+KEY+`` encoding with algorithm byte 0x04 (the Go package only defines 0x01 private keys).

:func:`open_note` follows Go's ``note.Open``: signatures from unknown keys are kept as unverified and
otherwise ignored, a known key with a bad signature is an error, at most 100 signatures, and at least
one must verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ledger.errors import InvalidKey, VerificationError

__all__ = [
    "ALG_COSIGNATURE_V1",
    "ALG_ED25519",
    "Note",
    "Signature",
    "Signer",
    "Verifier",
    "generate_key",
    "key_id",
    "open_note",
    "parse_note",
    "sign_note",
]

ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04
_SIG_PREFIX = "— "  # U+2014 EM DASH, then a space
_MAX_SIGS = 100


def _valid_name(name: str) -> bool:
    return (
        bool(name)
        and "+" not in name
        and not any(c.isspace() or unicodedata.category(c) == "Zs" for c in name)
    )


def key_id(name: str, alg: int, public_key: bytes) -> int:
    """The signed-note key id: ``SHA-256(name || "\\n" || alg || key)[:4]`` as a big-endian uint32."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True, slots=True)
class Verifier:
    """A parsed verifier key: checks signatures by ``name`` with key id ``key_id``."""

    name: str
    key_id: int
    alg: int
    public_key: bytes

    @classmethod
    def from_text(cls, vkey: str) -> Verifier:
        """Parse ``<name>+<hex id>+<base64 key>``; raises :class:`~ledger.errors.InvalidKey`."""
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise InvalidKey("a verifier key is <name>+<hex key id>+<base64 key>")
        name, hex_id, b64 = parts
        if not _valid_name(name) or len(hex_id) != 8:
            raise InvalidKey("malformed verifier key name or key id")
        try:
            kid = int(hex_id, 16)
            raw = _b64decode(b64)
        except (ValueError, binascii.Error) as exc:
            raise InvalidKey("malformed verifier key encoding") from exc
        if len(raw) != 33 or raw[0] not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise InvalidKey("unknown verifier algorithm or wrong key length")
        if key_id(name, raw[0], raw[1:]) != kid:
            raise InvalidKey("verifier key id does not match the key")
        try:
            Ed25519PublicKey.from_public_bytes(raw[1:])
        except ValueError as exc:
            raise InvalidKey("verifier key is not an Ed25519 public key") from exc
        return cls(name, kid, raw[0], raw[1:])

    def to_text(self) -> str:
        return (
            f"{self.name}+{self.key_id:08x}+{base64.b64encode(bytes([self.alg]) + self.public_key).decode()}"
        )

    def verify(self, text: bytes, sig: bytes) -> bool:
        """True when ``sig`` (without the 4-byte key id) is a valid signature of note text ``text``."""
        pub = Ed25519PublicKey.from_public_bytes(self.public_key)
        if self.alg == ALG_COSIGNATURE_V1:
            if len(sig) != 8 + 64:
                return False
            (ts,) = struct.unpack(">Q", sig[:8])
            if ts >= 1 << 63:
                return False
            msg = b"cosignature/v1\ntime %d\n" % ts + text
            sig = sig[8:]
        else:
            msg = text
        try:
            pub.verify(sig, msg)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Signer:
    """A parsed signer (private) key."""

    name: str
    key_id: int
    alg: int
    seed: bytes

    @classmethod
    def from_text(cls, skey: str) -> Signer:
        """Parse ``PRIVATE+KEY+<name>+<hex id>+<base64 key>``; raises :class:`~ledger.errors.InvalidKey`.

        The message never contains the key material.
        """
        parts = skey.split("+", 4)
        if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
            raise InvalidKey("a signer key is PRIVATE+KEY+<name>+<hex key id>+<base64 key>")
        name, hex_id, b64 = parts[2:]
        if not _valid_name(name) or len(hex_id) != 8:
            raise InvalidKey("malformed signer key name or key id")
        try:
            kid = int(hex_id, 16)
            raw = _b64decode(b64)
        except (ValueError, binascii.Error) as exc:
            raise InvalidKey("malformed signer key encoding") from exc
        if len(raw) != 33 or raw[0] not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise InvalidKey("unknown signer algorithm or wrong key length")
        signer = cls(name, kid, raw[0], raw[1:])
        if key_id(name, signer.alg, signer.public_key()) != kid:
            raise InvalidKey("signer key id does not match the key")
        return signer

    def public_key(self) -> bytes:
        priv = Ed25519PrivateKey.from_private_bytes(self.seed)
        return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def verifier(self) -> Verifier:
        return Verifier(self.name, self.key_id, self.alg, self.public_key())

    def to_text(self) -> str:
        return f"PRIVATE+KEY+{self.name}+{self.key_id:08x}+{base64.b64encode(bytes([self.alg]) + self.seed).decode()}"

    def sign(self, text: bytes, *, timestamp: int | None = None) -> bytes:
        """The signature bytes (without key id) over note text ``text``.

        For a cosigner key (0x04) the signature is ``u64 timestamp || Ed25519 signature``; ``timestamp``
        defaults to now (POSIX seconds).
        """
        priv = Ed25519PrivateKey.from_private_bytes(self.seed)
        if self.alg == ALG_COSIGNATURE_V1:
            ts = int(time.time()) if timestamp is None else timestamp
            if not 0 <= ts < 1 << 63:
                raise InvalidKey("cosignature timestamp out of range")
            return struct.pack(">Q", ts) + priv.sign(b"cosignature/v1\ntime %d\n" % ts + text)
        return priv.sign(text)


def generate_key(name: str, alg: int = ALG_ED25519) -> tuple[str, str]:
    """A fresh Ed25519 key pair ``(signer key, verifier key)`` for ``name``.

    ``alg`` is 0x01 for a log (note signatures) or 0x04 for a witness (cosignatures). Raises
    :class:`~ledger.errors.InvalidKey` for an invalid name or algorithm.
    """
    if not _valid_name(name):
        raise InvalidKey("a key name must be non-empty, without spaces or '+'")
    if alg not in (ALG_ED25519, ALG_COSIGNATURE_V1):
        raise InvalidKey(f"unsupported algorithm {alg:#04x}")
    priv = Ed25519PrivateKey.generate()
    seed = priv.private_bytes_raw()
    pub = priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    kid = key_id(name, alg, pub)
    return Signer(name, kid, alg, seed).to_text(), Verifier(name, kid, alg, pub).to_text()


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature line: ``— <name> <base64(key id || signature)>``."""

    name: str
    key_id: int
    base64: str

    def line(self) -> str:
        return f"{_SIG_PREFIX}{self.name} {self.base64}\n"

    def raw(self) -> bytes:
        return _b64decode(self.base64)[4:]


@dataclass(frozen=True, slots=True)
class Note:
    """A parsed note: its text (ending in a newline) and its signatures."""

    text: str
    sigs: tuple[Signature, ...]
    unverified_sigs: tuple[Signature, ...] = ()

    def to_text(self) -> str:
        return self.text + "\n" + "".join(s.line() for s in self.sigs + self.unverified_sigs)


def _check_text(text: str) -> None:
    for ch in text:
        if ch < " " and ch != "\n":
            raise VerificationError("malformed note: control character")


def parse_note(msg: str | bytes) -> Note:
    """Split a signed note into text and signatures without verifying any (all are ``sigs``).

    Raises :class:`~ledger.errors.VerificationError` ("malformed note") on any syntax error.
    """
    if isinstance(msg, bytes):
        try:
            msg = msg.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise VerificationError("malformed note: not UTF-8") from exc
    _check_text(msg)
    split = msg.rfind("\n\n")
    if split < 0:
        raise VerificationError("malformed note: no signature block")
    text, block = msg[: split + 1], msg[split + 2 :]
    if not block or not block.endswith("\n"):
        raise VerificationError("malformed note: signature block must end with a newline")
    sigs: list[Signature] = []
    for line in block[:-1].split("\n"):
        if not line.startswith(_SIG_PREFIX):
            raise VerificationError("malformed note: signature line without the em dash prefix")
        name, _, b64 = line[len(_SIG_PREFIX) :].partition(" ")
        try:
            raw = _b64decode(b64)
        except (ValueError, binascii.Error) as exc:
            raise VerificationError("malformed note: bad signature base64") from exc
        if not _valid_name(name) or not b64 or len(raw) < 5:
            raise VerificationError("malformed note: bad signature line")
        sigs.append(Signature(name, int.from_bytes(raw[:4], "big"), b64))
        if len(sigs) > _MAX_SIGS:
            raise VerificationError("malformed note: too many signatures")
    return Note(text, tuple(sigs))


def _verifier_map(verifiers: Sequence[str | Verifier]) -> dict[tuple[str, int], list[Verifier]]:
    out: dict[tuple[str, int], list[Verifier]] = {}
    for v in verifiers:
        ver = v if isinstance(v, Verifier) else Verifier.from_text(v)
        lst = out.setdefault((ver.name, ver.key_id), [])
        if ver not in lst:
            lst.append(ver)
    return out


def open_note(msg: str | bytes, verifiers: Sequence[str | Verifier]) -> Note:
    """Verify a signed note against known verifier keys, then return it.

    Returns the note with verified ``sigs`` and ignored ``unverified_sigs`` (unknown keys). Raises
    :class:`~ledger.errors.VerificationError` when the note is malformed, a known key's signature is
    invalid, or no known key signed it; :class:`~ledger.errors.InvalidKey` for a malformed verifier key.
    """
    known = _verifier_map(verifiers)
    note = parse_note(msg)
    text = note.text.encode()
    verified: list[Signature] = []
    unverified: list[Signature] = []
    seen: set[tuple[str, int]] = set()
    seen_unverified: set[str] = set()
    for sig in note.sigs:
        key = (sig.name, sig.key_id)
        cands = known.get(key)
        if cands is None:
            if sig.line() not in seen_unverified:
                seen_unverified.add(sig.line())
                unverified.append(sig)
            continue
        if len(cands) > 1:
            raise VerificationError(f"ambiguous key {sig.name}+{sig.key_id:08x}")
        if key in seen:
            continue
        seen.add(key)
        if not cands[0].verify(text, sig.raw()):
            raise VerificationError(f"invalid signature for key {sig.name}+{sig.key_id:08x}")
        verified.append(sig)
    if not verified:
        raise VerificationError("note has no verifiable signatures")
    return Note(note.text, tuple(verified), tuple(unverified))


def sign_note(text: str, signers: Sequence[str | Signer], *, timestamp: int | None = None) -> str:
    """Sign note ``text`` (which must end in a newline) with each signer, as Go's ``note.Sign`` does.

    Raises :class:`~ledger.errors.VerificationError` for malformed text and
    :class:`~ledger.errors.InvalidKey` for a malformed signer key.
    """
    if not text.endswith("\n"):
        raise VerificationError("malformed note: text must end with a newline")
    _check_text(text)
    lines = []
    for s in signers:
        signer = s if isinstance(s, Signer) else Signer.from_text(s)
        raw = signer.key_id.to_bytes(4, "big") + signer.sign(text.encode(), timestamp=timestamp)
        lines.append(Signature(signer.name, signer.key_id, base64.b64encode(raw).decode()).line())
    return text + "\n" + "".join(lines)
