"""The embedded authorization server's signing keys: one active EC P-256 key (ES256), and the retired
keys whose tokens may still be valid.

They live in one JSON file, ``<keys dir>/signing.json`` (mode 0600, the directory 0700), made on first
use like the ledger's key. :func:`rotate` makes a new active key; the old one keeps only its public part
and stays published at ``/auth/jwks`` for the token lifetime plus :data:`CLOCK_SKEW` after it was
retired, so a token signed just before a rotation verifies until it expires. A running service sees a
rotation made by another process (``fhirbridge auth rotate-key``) on its next use of the keys: the
file is replaced atomically, and :func:`signing_keys` reloads it when its inode or mtime changes.

:func:`current_jwks` is what an in-process verifier calls for the published key set.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

from bridge.config import Settings
from bridge.logging import get_logger
from bridge.stores.auth import AuthError

log = get_logger(__name__)

KEYRING_FILE = "signing.json"
ALGORITHM = "ES256"
#: seconds a retired key stays published beyond the token lifetime (verifiers' clocks differ)
CLOCK_SKEW = 60


class KeyFileError(AuthError):
    """The signing key file cannot be read, parsed or written (the message names the file, never a key)."""


@dataclass(frozen=True, slots=True)
class RetiredKey:
    """A key that signs no more: its public JWK, and when it stopped signing (epoch seconds)."""

    jwk: dict[str, Any]
    retired_at: int


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The active private key and the retired public keys."""

    active: ECKey
    retired: tuple[RetiredKey, ...] = ()

    @property
    def kid(self) -> str:
        return str(self.active.kid)

    def signing_set(self) -> KeySet:
        """The active key as a key set: joserfc then writes its ``kid`` into the JWS header."""
        return KeySet([self.active])

    def jwks(self, lifetime: int, now: int | None = None) -> dict[str, Any]:
        """The public keys a verifier needs at ``now``: the active one, and each retired one until
        ``lifetime + CLOCK_SKEW`` seconds after its retirement."""
        t = int(time.time()) if now is None else now
        keys = [self.active.as_dict(private=False)]
        keys += [r.jwk for r in self.retired if t < r.retired_at + lifetime + CLOCK_SKEW]
        return {"keys": keys}

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "active": self.active.as_dict(private=True),
                "retired": [{"key": r.jwk, "retired_at": r.retired_at} for r in self.retired],
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_json(cls, data: bytes, path: Path) -> KeyRing:
        try:
            doc = orjson.loads(data)
            active = ECKey.import_key(doc["active"])
            if not active.is_private or active.get("crv") != "P-256" or not active.kid:
                raise ValueError("the active key is not a private P-256 key with a kid")
            retired = tuple(RetiredKey(dict(r["key"]), int(r["retired_at"])) for r in doc.get("retired", []))
            for r in retired:
                if ECKey.import_key(r.jwk).is_private:
                    raise ValueError("a retired key holds private material")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, JoseError) as exc:
            raise KeyFileError(f"the signing key file {path} is malformed ({type(exc).__name__})") from None
        return cls(active, retired)


def new_key() -> ECKey:
    """A new EC P-256 signing key, its ``kid`` the RFC 7638 thumbprint."""
    return ECKey.generate_key("P-256", {"alg": ALGORITHM, "use": "sig"}, private=True, auto_kid=True)


def keyring_path(keys_dir: Path) -> Path:
    return keys_dir / KEYRING_FILE


def load_or_create(keys_dir: Path) -> KeyRing:
    """The key ring in ``keys_dir``, made (with a new key) when there is none."""
    path = keyring_path(keys_dir)
    if path.is_file():
        return _read(path)
    with _locked(keys_dir):
        if path.is_file():  # made by another process while this one waited for the lock
            return _read(path)
        ring = KeyRing(new_key())
        _write(path, ring)
    log.info("auth.key_created", kid=ring.kid, path=str(path))
    return ring


def rotate(keys_dir: Path, lifetime: int, now: int | None = None) -> KeyRing:
    """Make a new active key; the previous one is retired (public part only) and published until the
    tokens it signed have expired. Retired keys past that are dropped. Returns the new ring."""
    t = int(time.time()) if now is None else now
    load_or_create(keys_dir)
    path = keyring_path(keys_dir)
    with _locked(keys_dir):
        old = _read(path)
        kept = [r for r in old.retired if t < r.retired_at + lifetime + CLOCK_SKEW]
        retired = (RetiredKey(old.active.as_dict(private=False), t), *kept)
        ring = KeyRing(new_key(), retired)
        _write(path, ring)
    log.info("auth.key_rotated", kid=ring.kid, retired_kid=old.kid)
    return ring


_cache: dict[Path, tuple[tuple[int, int, int], KeyRing]] = {}
_cache_lock = threading.Lock()


def signing_keys(settings: Settings) -> KeyRing:
    """The configured key ring (made on first use), read again only when the file has changed."""
    keys_dir = settings.auth.keys_dir
    path = keyring_path(keys_dir)
    with _cache_lock:
        try:
            st = path.stat()
        except FileNotFoundError:
            ring = load_or_create(keys_dir)
            st = path.stat()
        else:
            cached = _cache.get(path)
            if cached is not None and cached[0] == (st.st_ino, st.st_mtime_ns, st.st_size):
                return cached[1]
            ring = _read(path)
        _cache[path] = ((st.st_ino, st.st_mtime_ns, st.st_size), ring)
        return ring


def current_jwks(settings: Settings, now: int | None = None) -> dict[str, Any]:
    """The published JWKS (public keys only): the active key and the retired ones whose tokens may still
    be valid. Cheap after the first call (a ``stat`` of the key file)."""
    return signing_keys(settings).jwks(settings.auth.token_lifetime, now)


def _read(path: Path) -> KeyRing:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise KeyFileError(f"cannot read the signing key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        log.warning("auth.key_file_mode", path=str(path), mode=oct(mode), expected="0o600")
    return KeyRing.from_json(data, path)


def _write(path: Path, ring: KeyRing) -> None:
    """Replace ``path`` atomically with ``ring`` (a 0600 file, synced before and after the rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(ring.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write the signing key file {path}: {exc.strerror}") from None


@contextmanager
def _locked(keys_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``keys_dir`` (made 0700 when missing) across processes."""
    try:
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(keys_dir / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot use the key directory {keys_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
