"""C2SP ``tlog-checkpoint`` signed tree heads (https://c2sp.org/tlog-checkpoint).

A checkpoint body is three lines (origin, decimal size without leading zeros, base64 root hash) plus
optional non-empty extension lines; it is carried in a signed note (:mod:`ledger.note`).
:func:`open` verifies the signatures first, then parses the body, as sigstore-python does.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ledger import note as _note
from ledger.errors import VerificationError
from ledger.merkle import HASH_SIZE

__all__ = ["Checkpoint", "body", "cosign", "open", "parse_body", "sign"]

_SIZE_RE = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A verified tree head. ``signers`` names the keys whose signatures verified."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()
    signers: tuple[str, ...] = ()

    def body(self) -> str:
        """The note text this checkpoint was parsed from (ends in a newline)."""
        return body(self.origin, self.size, self.root_hash, self.extensions)


def body(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """The checkpoint note text. Raises :class:`~ledger.errors.VerificationError` on invalid fields."""
    if not origin or "\n" in origin:
        raise VerificationError("checkpoint origin must be one non-empty line")
    size_obj: object = size
    if not isinstance(size_obj, int) or isinstance(size_obj, bool) or not 0 <= size_obj < 1 << 64:
        raise VerificationError("checkpoint size must be an integer in 0..2^64-1")
    if len(root) != HASH_SIZE:
        raise VerificationError(f"checkpoint root must be {HASH_SIZE} bytes")
    for ext in extensions:
        if not ext or "\n" in ext:
            raise VerificationError("checkpoint extension lines must be non-empty single lines")
    lines = [origin, str(size), base64.b64encode(root).decode(), *extensions]
    return "\n".join(lines) + "\n"


def parse_body(text: str) -> tuple[str, int, bytes, tuple[str, ...]]:
    """Parse a checkpoint body into ``(origin, size, root, extensions)``.

    Raises :class:`~ledger.errors.VerificationError` when it is not a C2SP checkpoint body.
    """
    if not text.endswith("\n"):
        raise VerificationError("malformed checkpoint: body must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise VerificationError("malformed checkpoint: fewer than three lines")
    origin, size_text, root_text, *extensions = lines
    if not origin:
        raise VerificationError("malformed checkpoint: empty origin")
    if not _SIZE_RE.fullmatch(size_text) or int(size_text) >= 1 << 64:
        raise VerificationError("malformed checkpoint: invalid log size")
    try:
        root = base64.b64decode(root_text.encode("ascii"), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise VerificationError("malformed checkpoint: root hash is not base64") from exc
    if len(root) != HASH_SIZE:
        raise VerificationError(f"malformed checkpoint: root hash has {len(root)} bytes")
    if any(not e for e in extensions):
        raise VerificationError("malformed checkpoint: empty extension line")
    return origin, int(size_text), root, tuple(extensions)


def sign(origin: str, size: int, root: bytes, signer_key: str) -> str:
    """A signed checkpoint note for ``(origin, size, root)``, signed with a ``PRIVATE+KEY+...`` key.

    Raises :class:`~ledger.errors.InvalidKey` for a malformed key and
    :class:`~ledger.errors.VerificationError` for invalid fields.
    """
    return _note.sign_note(body(origin, size, root), [signer_key])


def open(note: str, verifier_keys: Sequence[str]) -> Checkpoint:  # shadows the builtin: the public API name
    """Verify ``note`` against ``verifier_keys`` (at least one must have signed it), then parse it.

    Unknown signatures are ignored. Raises :class:`~ledger.errors.VerificationError` on a bad or
    unknown signature or a malformed body; :class:`~ledger.errors.InvalidKey` for a malformed key.
    """
    opened = _note.open_note(note, verifier_keys)
    origin, size, root, extensions = parse_body(opened.text)
    return Checkpoint(origin, size, root, extensions, tuple(s.name for s in opened.sigs))


def cosign(note: str, log_verifier_key: str, witness_key: str, *, timestamp: int | None = None) -> str:
    """A C2SP ``tlog-cosignature/v1`` signature line by ``witness_key`` (algorithm 0x04) for ``note``.

    The log's signature is verified first. Returns one ``— <witness> <base64>`` line (with newline).
    Raises :class:`~ledger.errors.VerificationError` or :class:`~ledger.errors.InvalidKey`.
    """
    opened = _note.open_note(note, [log_verifier_key])
    parse_body(opened.text)
    signer = _note.Signer.from_text(witness_key)
    if signer.alg != _note.ALG_COSIGNATURE_V1:
        raise VerificationError("a witness key must be a cosignature (0x04) key")
    signed = _note.sign_note(opened.text, [signer], timestamp=timestamp)
    return signed[len(opened.text) + 1 :]
