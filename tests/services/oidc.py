"""An external OpenID Connect issuer for the tests: oidc-provider from npm, started and stopped by PID.

The interoperability test (tests/integration/test_oidc_interop.py) needs an identity provider we did
not write. ``tests/services/oidc/`` holds a small Node program (``provider.mjs``) that configures the
OpenID-certified ``oidc-provider`` package, pinned in ``package.json`` and ``package-lock.json``.
Nothing is installed or running before the tests start, so :class:`OidcProvider`:

* runs ``npm ci`` into ``tests/services/oidc/node_modules`` when it is missing or was installed from
  another lock file (the lock file's SHA-256 is kept beside the packages), under a lock so that two
  test runs do not install at once; later runs start in well under a second;
* makes the issuer's state in a new temporary directory: ``clients.json`` (random client secrets) and
  ``jwks.json`` (its RSA signing keys, made here, so that the test knows every ``kid``), both 0600;
* starts ``node provider.mjs <state dir>`` in its own process group on a free loopback port, waits
  until its OpenID discovery document answers, and stops it by the PID it started;
* rotates the issuer's keys without restarting it: :meth:`OidcProvider.rotate_keys` puts a new key
  first in ``jwks.json`` (it signs from then on; the others stay published) and
  :meth:`OidcProvider.retire_keys` drops all but the first; each then sends SIGHUP, on which the
  program builds a new oidc-provider on the new keys, on the same port, keeping its tokens, and waits
  until the issuer's JWKS shows the change.

Node.js 20 or later must be on ``PATH``, and npm too when the packages are to be installed; without
them :class:`NodeMissing` says so. A run
killed with SIGKILL cannot stop its issuer; the next start finds such orphans by the owner file each
state directory carries (the owning process is gone) and stops them by their PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from joserfc.jwk import RSAKey

from tests.services.postgres import _alive, _cmdline, _free_port

DIR = Path(__file__).resolve().parent / "oidc"
PROGRAM = "provider.mjs"
PREFIX = "fhirbridge-oidc-"
OWNER_FILE = "owner.json"
#: in node_modules: the SHA-256 of the package-lock.json it was installed from
STAMP = ".fhirbridge-lock-sha256"
#: the clients provider.mjs registers: JWT tokens, opaque tokens, and the resource server (introspection)
JWT_CLIENT, OPAQUE_CLIENT, RESOURCE_SERVER = "backend-jwt", "backend-opaque", "fhirbridge"
#: another resource server of the same issuer: its tokens are not for us
OTHER_RESOURCE = "https://other.example.org/fhir"
NODE_MAJOR = 20


class OidcUnavailable(RuntimeError):
    """The test issuer could not be installed or started; the message says why."""


class NodeMissing(OidcUnavailable):
    """Node.js or npm is not installed (or too old)."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise NodeMissing(
            f"{name} is not on PATH: the OpenID Connect interoperability test runs oidc-provider, an npm "
            f"package, and needs Node.js {NODE_MAJOR} or later with npm (https://nodejs.org, or the "
            "distribution's nodejs and npm packages)"
        )
    return path


def node() -> str:
    """The ``node`` executable, checked to be recent enough for oidc-provider 9."""
    path = _tool("node")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        major = int(version.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise NodeMissing(f"cannot tell the version of {path}: {exc}") from None
    if major < NODE_MAJOR:
        raise NodeMissing(f"{path} is Node.js {version.strip()}; oidc-provider 9 needs {NODE_MAJOR} or later")
    return path


def _lock_digest() -> str:
    return hashlib.sha256((DIR / "package-lock.json").read_bytes()).hexdigest()


def ensure_installed() -> None:
    """``npm ci`` into ``DIR/node_modules`` unless it holds what the lock file names (by its digest)."""
    digest = _lock_digest()
    stamp = DIR / "node_modules" / STAMP
    if _read(stamp) == digest:
        return
    npm = _tool("npm")
    checkout = hashlib.sha256(bytes(DIR)).hexdigest()[:12]
    lock = Path(tempfile.gettempdir()) / f"fhirbridge-oidc-npm-{os.getuid()}-{checkout}.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run may be installing: wait for it, then look again
        if _read(stamp) == digest:
            return
        try:
            result = subprocess.run(
                [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=DIR,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except subprocess.TimeoutExpired:
            raise OidcUnavailable(f"npm ci in {DIR} took more than 10 minutes") from None
        if result.returncode != 0:
            raise OidcUnavailable(
                f"npm ci in {DIR} failed ({result.returncode}): {(result.stderr or result.stdout)[-2000:]}"
            )
        stamp.write_text(digest)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def reap_orphans(tmp: Path | None = None) -> list[int]:
    """Stop issuers whose owning test run died without stopping them; returns their PIDs."""
    stopped: list[int] = []
    for base in Path(tmp or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = json.loads((base / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(owner.get("owner_pid", 0))):
            continue
        pid = int(owner.get("node_pid") or 0)
        # the PID must still be that issuer's node, not a reused number
        if pid and _alive(pid) and str(base) in _cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(pid)
        shutil.rmtree(base, ignore_errors=True)
    return stopped


def new_signing_key() -> dict[str, Any]:
    """A private RSA signing JWK (RS256) whose ``kid`` is its RFC 7638 thumbprint."""
    key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, private=True)
    return {**key.as_dict(private=True), "kid": key.thumbprint()}


def _write_private(path: Path, document: Any) -> None:
    """Write JSON readable by us alone, atomically (the issuer may read the file at any time)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(document, fh)
    os.replace(tmp, path)


class OidcProvider:
    """One oidc-provider issuer on a free loopback port, whose tokens are for ``fhir_base``.

    ``url`` is its issuer URL, ``secrets`` the client secrets (:data:`JWT_CLIENT`,
    :data:`OPAQUE_CLIENT`, :data:`RESOURCE_SERVER`), ``discovery`` its OpenID discovery document and
    ``kids`` its signing keys' ids, the signing one first.
    """

    def __init__(self, fhir_base: str) -> None:
        self.fhir_base = fhir_base
        self.base: Path | None = None
        self.port = 0
        self.secrets = {c: secrets.token_urlsafe(24) for c in (JWT_CLIENT, OPAQUE_CLIENT, RESOURCE_SERVER)}
        self.keys: list[dict[str, Any]] = []
        self.discovery: dict[str, Any] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def kids(self) -> list[str]:
        return [k["kid"] for k in self.keys]

    @property
    def log(self) -> Path:
        assert self.base is not None
        return self.base / "provider.log"

    def start(self, timeout: float = 30.0) -> None:
        """Install if needed, then start the issuer and return once its discovery document answers."""
        node_path = node()
        reap_orphans()
        ensure_installed()
        self.base = Path(tempfile.mkdtemp(prefix=PREFIX))
        self.keys = [new_signing_key()]
        _write_private(self.base / "clients.json", self.secrets)
        _write_private(self.base / "jwks.json", {"keys": self.keys})
        for _attempt in range(3):  # a port taken between choosing and binding it: choose another
            self.port = _free_port()
            env = {
                **os.environ,
                "OIDC_PORT": str(self.port),
                "OIDC_FHIR_BASE": self.fhir_base,
                "OIDC_OTHER_RESOURCE": OTHER_RESOURCE,
            }
            with open(self.log, "ab") as out:
                self._proc = subprocess.Popen(
                    [node_path, PROGRAM, str(self.base)],
                    cwd=DIR,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self._write_owner()
            if self._wait_ready(timeout):
                return
        raise OidcUnavailable(f"oidc-provider could not bind a port: {self.log_tail()}")

    def _write_owner(self) -> None:
        assert self.base is not None
        owner = {"owner_pid": os.getpid(), "node_pid": self.pid}
        (self.base / OWNER_FILE).write_text(json.dumps(owner))

    def _wait_ready(self, timeout: float) -> bool:
        """True once discovery answers with our issuer; False when node could not bind its port."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                if code == 3:  # provider.mjs: listen failed
                    return False
                raise OidcUnavailable(f"oidc-provider exited with code {code}: {self.log_tail()}")
            try:
                self.discovery = self.get_json("/.well-known/openid-configuration")
            except (OSError, ValueError) as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise OidcUnavailable(
                        f"oidc-provider not ready after {timeout:.0f} s: {exc}; {self.log_tail()}"
                    ) from exc
                time.sleep(0.05)
                continue
            if self.discovery.get("issuer") != self.url:
                raise OidcUnavailable(f"the discovery document names another issuer: {self.discovery}")
            return True

    def get_json(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=2) as response:
            document: dict[str, Any] = json.loads(response.read())
            return document

    def rotate_keys(self) -> str:
        """A new signing key, first in the issuer's JWKS; the others stay published. Returns its kid."""
        self._reload([new_signing_key(), *self.keys])
        return self.kids[0]

    def retire_keys(self) -> list[str]:
        """Drop every key but the signing one from the issuer's JWKS; returns the kids dropped."""
        dropped = self.kids[1:]
        self._reload(self.keys[:1])
        return dropped

    def _reload(self, keys: list[dict[str, Any]], timeout: float = 10.0) -> None:
        assert self.base is not None and self.pid is not None, "the issuer is not running"
        _write_private(self.base / "jwks.json", {"keys": keys})
        os.kill(self.pid, signal.SIGHUP)
        wanted = [k["kid"] for k in keys]
        deadline = time.monotonic() + timeout
        while [k.get("kid") for k in self.get_json("/jwks").get("keys", [])] != wanted:
            if time.monotonic() > deadline:
                raise OidcUnavailable(f"the issuer did not take its new keys: {self.log_tail()}")
            time.sleep(0.02)
        self.keys = keys

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except (OSError, AssertionError):
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the node process we started, by its PID (SIGTERM, then SIGKILL to its group)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def destroy(self) -> None:
        """Stop the issuer and remove its state directory."""
        self.stop()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> OidcProvider:
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def main() -> None:
    """``python -m tests.services.oidc [FHIR base]``: start an issuer by hand, print it, stop on Ctrl-C."""
    with OidcProvider(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080") as issuer:
        print(
            f"issuer {issuer.url} (pid {issuer.pid}; Ctrl-C stops it)",
            json.dumps(issuer.secrets),
            sep="\n",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
