"""Tools for the fault drills on a three-node Apache Kafka cluster (test_kafka_drills.py).

Partition leadership and in-sync replicas read with the admin client, consumers started with their own
group and static member id, ``fhirbridge ingest`` run as the real CLI and its summary parsed, and the
after-drill checks (nothing lost, nothing twice, the ledger verifies, every patient found).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError

from bridge.stores.index.store import IndexStore
from bridge.stream.kafka import KafkaCluster

from .pipeline import Stack

#: how long an admin request may take while a broker is down
_ADMIN_TIMEOUT_MS = 5000


def admin(bootstrap: str) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="fhirbridge-drills", request_timeout_ms=_ADMIN_TIMEOUT_MS
    )


def partitions(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """``describe_topics`` of one topic: each partition's ``partition``, ``leader``, ``replicas``, ``isr``."""
    client = admin(bootstrap)
    try:
        (described,) = client.describe_topics([topic])
    finally:
        client.close()
    return sorted(
        (
            {
                "partition": p["partition_index"],
                "leader": p["leader_id"],
                "replicas": p["replica_nodes"],
                "isr": p["isr_nodes"],
            }
            for p in described["partitions"]
        ),
        key=lambda p: p["partition"],
    )


def busiest_leader(bootstrap: str, topic: str) -> tuple[int, int]:
    """The node leading the most partitions of ``topic`` and how many it leads."""
    leaders = Counter(p["leader"] for p in partitions(bootstrap, topic) if p["leader"] >= 0)
    node, count = leaders.most_common(1)[0]
    return node, count


def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    """The topic's configs that differ from the broker's defaults (kafka-python 3: name -> {value, ...})."""
    client = admin(bootstrap)
    try:
        described = client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        client.close()
    configs = described["topic"][topic]
    return {k: v["value"] if isinstance(v, dict) else v for k, v in configs.items()}


def set_topic_config(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    """Set ``configs`` on ``topic`` (incrementally: its other configs stay)."""
    client = admin(bootstrap)
    try:
        response = client.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        client.close()
    wait_until(
        lambda: all(topic_config(bootstrap, topic).get(k) == v for k, v in configs.items()),
        20,
        f"{configs} on {topic}",
        lambda: (response, topic_config(bootstrap, topic)),
    )


def wait_known_everywhere(cluster: KafkaCluster, topics: list[str], timeout: float = 30) -> None:
    """Until every node's metadata has every partition of ``topics`` with a leader.

    A consumer that joins its group while the broker it asks does not yet know the topic gets no
    partitions (kafka-python logs "No partition metadata for topic ..."), and as a static member it
    kept none through a whole rolling restart: see the report of issue 25. The drills start their
    consumers after this, so that each drill tests its own fault.
    """
    deadline = time.monotonic() + timeout
    missing: Any = None
    while time.monotonic() < deadline:
        try:
            missing = [
                (node.node_id, t)
                for node in cluster.nodes
                for t in topics
                if not (ps := partitions(node.address(), t)) or any(p["leader"] < 0 for p in ps)
            ]
        except Exception as exc:  # a topic not known yet is an error on some paths
            missing = f"{type(exc).__name__}: {exc}"
        if not missing:
            return
        time.sleep(0.2)
    pytest.fail(f"topics not known to every node after {timeout:.0f}s: {missing}")


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies (PR_SET_PDEATHSIG), so none outlives a killed run."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def wait_in_sync(bootstrap: str, topics: list[str], replicas: int, timeout: float = 90) -> float:
    """Until every partition of ``topics`` has a leader and ``replicas`` in-sync replicas; returns seconds."""
    started = time.monotonic()
    state: Any = None
    while time.monotonic() - started < timeout:
        try:
            state = {t: partitions(bootstrap, t) for t in topics}
            if all(p["leader"] >= 0 and len(p["isr"]) >= replicas for ps in state.values() for p in ps):
                return time.monotonic() - started
        except Exception as exc:  # a node still starting: ask again
            state = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    pytest.fail(f"partitions not back in sync with {replicas} replicas after {timeout:.0f}s: {state}")


def end_offsets(bootstrap: str, topic: str) -> int:
    """How many records ``topic`` holds (its partitions' end offsets summed); -1 while a partition
    has no leader to ask."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        offsets = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return sum(offsets.values())
    except KafkaError:
        return -1
    finally:
        consumer.close()


def wait_until(
    pred: Callable[[], bool], timeout: float, what: str, state: Callable[[], Any] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; state {state()}")
        time.sleep(0.25)


def assigned(bootstrap: str, group: str) -> dict[str, int]:
    """Static member id -> partitions assigned, of a ``Stable`` consumer group ({} while it rebalances)."""
    client = admin(bootstrap)
    try:
        info = client.describe_groups([group])[group]
    except KafkaError:
        return {}
    finally:
        client.close()
    if info.get("group_state") != "Stable":
        return {}
    out: dict[str, int] = {}
    for member in info.get("members") or ():
        assignment = member.get("member_assignment") or {}
        if isinstance(assignment, dict):
            held = sum(len(t.get("partitions") or ()) for t in assignment.get("assigned_partitions") or ())
        else:
            held = len(assignment.partitions())
        if held:
            out[member.get("group_instance_id") or member.get("member_id")] = held
    return out


def start_consumer(
    kind: str, env: dict[str, str], log: Path, group: str, instance: str
) -> subprocess.Popen[bytes]:
    """``fhirbridge <kind> run --group <group>`` as static member ``instance``, its own process group."""
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", kind, "run", "--group", group],
        env={**env, "FHIRBRIDGE_CONSUMER_INSTANCE_ID": instance},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    out.close()
    return proc


# -- fhirbridge ingest as the real CLI ---------------------------------------------------------------

_SUMMARY = re.compile(r"converted (\d+), published (\d+), rejected (\d+), failed (\d+),")
_FAILED = re.compile(r"FAILED: (\d+) records were not acknowledged")
_RETRY = re.compile(r"retry them with: (.+)$", re.M)


@dataclass
class IngestRun:
    code: int
    output: str
    converted: int
    published: int
    rejected: int
    failed: int
    retry: list[str] | None  # the command it printed, when some failed

    def describe(self) -> str:
        return f"exit {self.code}: " + "\n".join(self.output.strip().splitlines()[-12:])


def ingest_command(source: str, files: list[Path], failed_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bridge.cli",
        "ingest",
        *("--adapter", "hl7v2", "--source", source, "--no-progress"),
        *("--failed-dir", str(failed_dir)),
        *map(str, files),
    ]


def start_ingest(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    out.close()
    return proc


def ingest_result(proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> IngestRun:
    code = proc.wait(timeout)
    output = log.read_text(errors="replace")
    summary = _SUMMARY.search(output)
    assert summary is not None, f"ingest printed no summary ({code}):\n{output[-3000:]}"
    converted, published, rejected, failed = map(int, summary.groups())
    retry = _RETRY.search(output)
    return IngestRun(
        code, output, converted, published, rejected, failed, shlex.split(retry.group(1)) if retry else None
    )


def check_ingest_report(run: IngestRun, expected: int) -> None:
    """The run's report adds up: every record converted is published or named as failed, and exit 0
    means none failed; a failure is counted, kept, and a retry command is printed."""
    assert run.converted == expected and run.rejected == 0, run.describe()
    assert run.published + run.failed == run.converted, run.describe()
    if run.failed == 0:
        assert run.code == 0, run.describe()
        assert "FAILED" not in run.output, run.describe()
        return
    assert run.code != 0, f"{run.failed} publishes failed and ingest exited 0: {run.describe()}"
    failed = _FAILED.search(run.output)
    assert failed is not None and int(failed.group(1)) == run.failed, run.describe()
    assert run.retry is not None and Path(run.retry[-1]).is_dir(), run.describe()


def retry_failed(run: IngestRun, env: dict[str, str], log: Path) -> IngestRun | None:
    """Run the retry command ``ingest`` printed (as the CLI, ``fhirbridge`` being ``python -m bridge.cli``)."""
    if run.retry is None:
        return None
    assert run.retry[:2] == ["fhirbridge", "ingest"]
    cmd = [sys.executable, "-m", "bridge.cli", *run.retry[1:]]
    cmd[4:4] = ["--no-progress", "--failed-dir", str(log.with_suffix(".failed"))]
    again = ingest_result(start_ingest(cmd, env, log), log)
    assert again.code == 0 and again.published == run.failed, again.describe()
    return again


# -- after each drill ---------------------------------------------------------------------------------


def patient_count(index: IndexStore) -> int:
    return int(index.db.query("SELECT COUNT(*) FROM resources WHERE resource_type = 'Patient'")[0][0])


def check_stack(
    stack: Stack,
    n: int,
    mrns: list[str],
    procs: dict[str, subprocess.Popen[bytes]],
    logs: list[Path],
    *,
    timeout: float = 180,
) -> float:
    """Wait until the ledger and the index hold ``n`` bundles, then: 0 lost, 0 duplicate leaves, the
    ledger verifies, ``n`` patients indexed and a sample of ``mrns`` found. Returns the catch-up time."""
    started = time.monotonic()
    ledger = stack.open_ledger()
    index = IndexStore.open(stack.settings.stores.index_url)
    try:

        def state() -> str:
            tails = "\n".join(
                f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-6:])
                for p in logs
                if p.exists()
            )
            exits = {k: p.poll() for k, p in procs.items()}
            return f"ledger {ledger.size()}, index {index.counts()}, exits {exits}\n{tails}"

        wait_until(
            lambda: ledger.size() >= n and index.counts()["bundles"] >= n, timeout, "the consumers", state
        )
        caught_up = time.monotonic() - started
        time.sleep(2)  # anything still in flight would show up as an extra leaf
        assert ledger.size() == n, f"0 lost, 0 duplicate leaves: {ledger.size()} leaves for {n} bundles"
        assert len({ledger.entry(i).bundle_sha256 for i in range(n)}) == n, "a bundle appended twice"
        assert index.counts()["bundles"] == n
        assert patient_count(index) == n
        step = max(1, len(mrns) // 50)
        for mrn in mrns[::step]:
            found = index.patients_by_identifier(None, mrn)
            assert len(found) == 1, f"patient {mrn}: {found}"
            assert index.get("Patient", found[0]) is not None
        assert stack.cli("ledger", "verify", "--key", stack.vkey) == 0
    finally:
        ledger.close()
        index.close()
    return caught_up


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, int | None]:
    """SIGTERM each consumer still running (their exit codes), SIGKILL what does not stop."""
    import signal

    codes: dict[str, int | None] = {}
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            codes[name] = proc.wait(10)
    return codes


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def stop_cluster(cluster: KafkaCluster) -> None:
    """Every node stopped by its PID, whatever happened: SIGTERM to all at once, SIGKILL of the process
    group of any still running 10 s later (the drill's data is thrown away, so no node waits for a
    controlled shutdown the others can no longer answer)."""
    import contextlib
    import signal

    running = [n.process for n in cluster.nodes if n.process is not None and n.process.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
