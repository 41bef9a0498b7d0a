"""The Node clients' packages: ``npm ci`` into ``tests/clients/node/node_modules`` when needed.

The packages are pinned by ``tests/clients/node/package-lock.json``; its ``.npmrc`` leaves out optional
and peer dependencies (``isomorphic-webcrypto``, a dependency of the SMART client, lists React Native
and Expo as optional: hundreds of packages Node does not use). The lock file's SHA-256 is kept beside
the packages, so a changed lock file installs again; a file lock keeps two test runs from installing
at once. Node.js 20 or later and npm must be on ``PATH``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

DIR = Path(__file__).resolve().parent / "node"
STAMP = ".fhirbridge-lock-sha256"
NODE_MAJOR = 20


class NodeSetupFailed(RuntimeError):
    """Node.js or npm is missing or too old, or ``npm ci`` failed; the message says which."""


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise NodeSetupFailed(
            f"{name} is not on PATH: the client interop tests run the SMART fhirclient and fhir-kit-client "
            f"npm packages and need Node.js {NODE_MAJOR} or later with npm"
        )
    return path


def node() -> str:
    path = tool("node")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        major = int(version.lstrip("v").split(".")[0])
    except ValueError:
        raise NodeSetupFailed(f"cannot tell the version of {path} ({version!r})") from None
    if major < NODE_MAJOR:
        raise NodeSetupFailed(f"{path} is Node.js {version}; the clients need {NODE_MAJOR} or later")
    return path


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def ensure_installed() -> Path:
    """Install the pinned packages unless ``node_modules`` already holds them; returns :data:`DIR`."""
    node()
    digest = hashlib.sha256((DIR / "package-lock.json").read_bytes()).hexdigest()
    stamp = DIR / "node_modules" / STAMP
    if _read(stamp) == digest:
        return DIR
    npm = tool("npm")
    checkout = hashlib.sha256(bytes(DIR)).hexdigest()[:12]
    lock = Path(tempfile.gettempdir()) / f"fhirbridge-clients-npm-{os.getuid()}-{checkout}.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if _read(stamp) == digest:
            return DIR
        try:
            done = subprocess.run(
                [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=DIR,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except subprocess.TimeoutExpired:
            raise NodeSetupFailed(f"npm ci in {DIR} took more than 10 minutes") from None
        if done.returncode != 0:
            raise NodeSetupFailed(
                f"npm ci in {DIR} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}"
            )
        stamp.write_text(digest)
    return DIR
