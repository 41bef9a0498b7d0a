"""Apache Kafka on this machine: the broker's classpath from Maven Central, and KRaft nodes started from it.

``fhirbridge broker start --kind kafka`` and the integration tests use this module (decision 37):

* :func:`classpath` resolves the jars that ``kafka-pom.xml`` (shipped next to this file) names, with
  Maven's ``dependency:copy-dependencies``, into ``$FHIRBRIDGE_KAFKA_CACHE`` (default
  ``~/.cache/fhirbridge/kafka``), one directory per content hash of the POM, so a second start does not
  touch the network. Nothing is downloaded from anywhere but the Maven repositories Maven is set up for.
* :func:`start_kafka` formats a KRaft log directory (``kafka.tools.StorageTool format``) and starts a
  combined broker+controller node (``kafka.Kafka``) in its own process group, on loopback ports.
* :func:`start_cluster` starts three (or ``n``) such nodes forming one KRaft quorum, each its own
  process, so a test can ``kill -9`` and restart one of them.

The settings that make a one-machine broker usable for development are in :data:`LOCAL_DEFAULTS`; each
departs from Kafka's own defaults only where a single node cannot meet them (replication factors of 3)
or where a shorter wait costs nothing (``group.initial.rebalance.delay.ms``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bridge.errors import BrokerUnavailable
from bridge.logging import get_logger
from bridge.stream.broker import free_port, stop_pid, wait_ready

log = get_logger(__name__)

_HERE = Path(__file__).resolve().parent
POM = _HERE / "kafka-pom.xml"
LOG4J = _HERE / "kafka-log4j2.yaml"
MIN_JAVA = 17

# Local-only departures from Kafka's defaults (a real cluster keeps its own).
LOCAL_DEFAULTS: dict[str, str] = {
    "num.partitions": "1",
    "group.initial.rebalance.delay.ms": "0",
    "offsets.topic.num.partitions": "10",
    "transaction.state.log.num.partitions": "10",
    "auto.create.topics.enable": "true",
    "log.segment.bytes": str(64 * 1024 * 1024),
}


def kafka_version() -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if match is None:  # pragma: no cover - the shipped file has it
        raise BrokerUnavailable(f"{POM}: no <kafka.version>")
    return match.group(1)


def _cache_root() -> Path:
    configured = os.environ.get("FHIRBRIDGE_KAFKA_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fhirbridge" / "kafka"


def _which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BrokerUnavailable(
            f"Apache Kafka needs {name!r} on PATH ({'Java 17 or newer' if name == 'java' else 'Apache Maven'},"
            " e.g. `apt-get install openjdk-17-jre-headless maven`); or use the embedded broker: --kind noida"
        )
    return found


def java_major(java: str | None = None) -> int:
    """The major version of the ``java`` on PATH (``java -version`` prints e.g. ``openjdk version "17.0.15"``)."""
    out = subprocess.run(
        [java or _which("java"), "-version"], capture_output=True, text=True, timeout=60, check=False
    )
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        raise BrokerUnavailable(
            f"cannot read the Java version from `java -version`: {out.stderr.strip()[:200]}"
        )
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def classpath() -> Path:
    """The directory holding the broker's jars, resolved with Maven on first use and cached."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    target = _cache_root() / f"{kafka_version()}-{digest}"
    lib = target / "lib"
    if (target / "complete").exists():
        return lib
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one resolver at a time; the others wait and reuse its result
        if (target / "complete").exists():
            return lib
        mvn = _which("mvn")
        staging = target.parent / f".{target.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        started = time.monotonic()
        log.info("kafka.resolve", version=kafka_version(), cache=str(target))
        done = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging / 'lib'}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if done.returncode != 0 or not any((staging / "lib").glob("kafka_2.13-*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise BrokerUnavailable(
                f"Maven could not resolve Apache Kafka {kafka_version()} from {POM.name}:\n{tail}"
            )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        (target / "complete").write_text(f"{kafka_version()}\n")
        log.info(
            "kafka.resolved", seconds=round(time.monotonic() - started, 1), jars=len(list(lib.iterdir()))
        )
    return lib


def check_java() -> str:
    java = _which("java")
    major = java_major(java)
    if major < MIN_JAVA:
        raise BrokerUnavailable(
            f"Apache Kafka 4 needs Java {MIN_JAVA} or newer; `java` on PATH is Java {major}"
        )
    return java


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (as ``kafka-storage
    random-uuid``). Like Kafka's own ``Uuid.randomUuid()``, never one that starts with ``-``, which
    ``kafka-storage format -t`` would read as an option (one start in 64 failed that way)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class KafkaNode:
    """One combined broker+controller KRaft node: its ports, directory and (while running) process."""

    node_id: int
    directory: Path
    ports: dict[str, int]  # listener name -> port; CONTROLLER is the quorum's
    protocols: dict[str, str]  # listener name -> security protocol
    properties: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def address(self, listener: str | None = None) -> str:
        name = listener or self.client_listener
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def client_listener(self) -> str:
        return next(name for name in self.ports if name != "CONTROLLER")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _properties_text(props: Mapping[str, str]) -> str:
    lines = ["# written by fhirbridge (bridge/stream/kafka.py)"]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


def node_properties(
    node: KafkaNode, voters: str, *, replication: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    listeners = ",".join(f"{name}://127.0.0.1:{port}" for name, port in node.ports.items())
    advertised = ",".join(
        f"{name}://127.0.0.1:{port}" for name, port in node.ports.items() if name != "CONTROLLER"
    )
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": voters,
        "controller.listener.names": "CONTROLLER",
        "listeners": listeners,
        "advertised.listeners": advertised,
        "inter.broker.listener.name": node.client_listener,
        "listener.security.protocol.map": ",".join(f"{n}:{p}" for n, p in node.protocols.items()),
        "log.dirs": str(node.directory / "data"),
        "offsets.topic.replication.factor": str(replication),
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(min(2, replication)),
        "share.coordinator.state.topic.replication.factor": str(replication),
        "share.coordinator.state.topic.min.isr": str(min(2, replication)),
        **LOCAL_DEFAULTS,
    }
    props.update(extra or {})
    return props


def _java_command(java: str, lib: Path, main: str, args: Sequence[str], heap: str) -> list[str]:
    opts = os.environ.get("FHIRBRIDGE_KAFKA_JAVA_OPTS", "").split()
    return [
        java,
        f"-Xms{heap}",
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J}",
        *opts,
        "-cp",
        f"{lib}/*",
        main,
        *args,
    ]


def format_storage(
    java: str, lib: Path, node: KafkaNode, cluster_id: str, extra_args: Sequence[str] = ()
) -> None:
    """``kafka-storage format``: write meta.properties and the bootstrap metadata of a new node."""
    done = subprocess.run(
        _java_command(
            java,
            lib,
            "kafka.tools.StorageTool",
            ["format", "-t", cluster_id, "-c", str(node.directory / "server.properties"), *extra_args],
            "256m",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise BrokerUnavailable(
            f"kafka-storage format failed for node {node.node_id}: {done.stdout}{done.stderr}"[:2000]
        )


def launch(java: str, lib: Path, node: KafkaNode, heap: str = "512m") -> None:
    """Start (or restart) a formatted node in its own process group; its output goes to ``broker.log``."""
    with open(node.directory / "broker.log", "ab") as out:
        node.process = subprocess.Popen(
            _java_command(java, lib, "kafka.Kafka", [str(node.directory / "server.properties")], heap),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@dataclass
class KafkaCluster:
    """Nodes of one KRaft quorum started by :func:`start_cluster` (a single node is a cluster of one)."""

    nodes: list[KafkaNode]
    java: str
    lib: Path
    heap: str = "512m"

    @property
    def bootstrap(self) -> str:
        return ",".join(node.address() for node in self.nodes)

    def bootstrap_for(self, listener: str) -> str:
        return ",".join(node.address(listener) for node in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def kill(self, node_id: int) -> None:
        """``kill -9`` one node (its whole process group)."""
        node = self.node(node_id)
        if node.process is not None and node.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=30)

    def stop_node(self, node_id: int, timeout: float = 60.0) -> None:
        """SIGTERM one node (a controlled shutdown: leadership moves first), SIGKILL after ``timeout``."""
        node = self.node(node_id)
        if node.process is not None:
            stop_pid(node.process.pid, timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=5)

    def start_node(self, node_id: int, timeout: float = 90.0) -> None:
        node = self.node(node_id)
        launch(self.java, self.lib, node, self.heap)
        wait_node(node, timeout)

    def stop(self) -> None:
        for node in self.nodes:
            self.stop_node(node.node_id, timeout=30.0)


def wait_node(node: KafkaNode, timeout: float = 90.0) -> None:
    """Until the node's client listener accepts connections and it answers a metadata request."""
    if node.protocols[node.client_listener] != "PLAINTEXT":
        _wait_port(node, timeout)
        return
    wait_ready(node.address(), timeout=timeout, process=node.process)


def _wait_port(node: KafkaNode, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process is not None and node.process.poll() is not None:
            raise BrokerUnavailable(f"Kafka node {node.node_id} exited with code {node.process.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", node.ports[node.client_listener]), 1),
        ):
            return
        time.sleep(0.2)
    raise BrokerUnavailable(f"Kafka node {node.node_id} not listening after {timeout:.0f}s")


def start_cluster(
    directory: Path,
    n: int = 3,
    *,
    listeners: Mapping[str, str] | None = None,
    properties: Mapping[str, str] | None = None,
    format_args: Sequence[str] = (),
    ports: Mapping[str, Sequence[int]] | None = None,
    heap: str = "512m",
    timeout: float = 120.0,
) -> KafkaCluster:
    """Format and start ``n`` KRaft nodes forming one quorum; returns once every node answers.

    ``listeners`` maps client listener names to security protocols (default ``{"PLAINTEXT":
    "PLAINTEXT"}``); the first is the inter-broker listener. ``properties`` is added to every node's
    ``server.properties`` (``{node}`` in a value is replaced by the node's directory). ``format_args``
    go to ``kafka-storage format`` (for example ``--add-scram``). ``ports`` pins a listener's ports,
    one per node; the rest are free loopback ports.
    """
    java = check_java()
    lib = classpath()
    listeners = dict(listeners or {"PLAINTEXT": "PLAINTEXT"})
    names = [*listeners, "CONTROLLER"]
    free = iter(_free_ports(len(names) * n))
    nodes: list[KafkaNode] = []
    for i in range(n):
        node_dir = directory / f"node-{i + 1}"
        node_dir.mkdir(parents=True, exist_ok=True)
        node_ports = {name: (ports[name][i] if ports and name in ports else next(free)) for name in names}
        protocols = {**listeners, "CONTROLLER": "PLAINTEXT"}
        nodes.append(KafkaNode(i + 1, node_dir, node_ports, protocols))
    voters = ",".join(f"{node.node_id}@127.0.0.1:{node.ports['CONTROLLER']}" for node in nodes)
    cluster_id = new_cluster_id()
    for node in nodes:
        extra = {k: v.replace("{node}", str(node.directory)) for k, v in (properties or {}).items()}
        node.properties = node_properties(node, voters, replication=min(3, n), extra=extra)
        (node.directory / "server.properties").write_text(_properties_text(node.properties))
        format_storage(java, lib, node, cluster_id, format_args)
    cluster = KafkaCluster(nodes, java, lib, heap)
    try:
        for node in nodes:
            launch(java, lib, node, heap)
        for node in nodes:
            wait_node(node, timeout)
    except BaseException:
        cluster.stop()
        raise
    log.info("kafka.started", nodes=n, bootstrap=cluster.bootstrap, version=kafka_version())
    return cluster


def start_kafka(directory: Path, port: int | None = None, **kwargs: object) -> KafkaCluster:
    """One combined broker+controller node (the integration suite's and ``broker start``'s).

    A directory that already holds a formatted node is started again as it was (same ports, same
    topics and offsets), unless another ``port`` is asked for.
    """
    existing = _formatted_node(directory / "node-1")
    if existing is not None and not kwargs and port in (None, existing.ports[existing.client_listener]):
        java, lib = check_java(), classpath()
        cluster = KafkaCluster([existing], java, lib)
        launch(java, lib, existing)
        try:
            wait_node(existing)
        except BaseException:
            cluster.stop()
            raise
        return cluster
    if existing is not None:
        shutil.rmtree(directory / "node-1")
    ports = {"PLAINTEXT": [port]} if port else None
    return start_cluster(directory, 1, ports=ports, **kwargs)  # type: ignore[arg-type]


def _formatted_node(node_dir: Path) -> KafkaNode | None:
    """The node a previous start formatted in ``node_dir``, read back from its server.properties."""
    try:
        text = (node_dir / "server.properties").read_text()
    except OSError:
        return None
    if not (node_dir / "data" / "meta.properties").exists():
        return None
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    ports = {
        url.split("://")[0]: int(url.rsplit(":", 1)[1])
        for url in props.get("listeners", "").split(",")
        if url
    }
    protocols = dict(
        pair.split(":", 1) for pair in props.get("listener.security.protocol.map", "").split(",")
    )
    if "CONTROLLER" not in ports or len(ports) < 2:
        return None
    ordered = {name: ports[name] for name in ports if name != "CONTROLLER"} | {
        "CONTROLLER": ports["CONTROLLER"]
    }
    return KafkaNode(int(props.get("node.id", "1")), node_dir, ordered, protocols, props)
