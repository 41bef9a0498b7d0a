"""bridge/stream/kafka.py without starting a JVM: what it asks of the machine, and what it writes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import BrokerUnavailable
from bridge.stream import kafka


def _run_returning(stdout: str = "", stderr: str = "", code: int = 0) -> Any:
    calls: list[list[str]] = []

    def run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, code, stdout, stderr)

    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_without_java_the_error_names_it_and_the_embedded_alternative(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka.shutil, "which", lambda name: None)
    with pytest.raises(BrokerUnavailable, match=r"'java' on PATH \(Java 17 or newer.*--kind noida"):
        kafka.check_java()


def test_without_maven_the_error_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FHIRBRIDGE_KAFKA_CACHE", str(tmp_path))
    monkeypatch.setattr(kafka.shutil, "which", lambda name: None if name == "mvn" else f"/usr/bin/{name}")
    with pytest.raises(BrokerUnavailable, match=r"'mvn' on PATH \(Apache Maven"):
        kafka.classpath()


@pytest.mark.parametrize(
    ("banner", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_292"', 8),
    ],
)
def test_java_major_reads_old_and_new_version_banners(
    monkeypatch: pytest.MonkeyPatch, banner: str, major: int
) -> None:
    monkeypatch.setattr(kafka.subprocess, "run", _run_returning(stderr=banner))
    assert kafka.java_major("/usr/bin/java") == major


def test_a_java_older_than_17_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(kafka.subprocess, "run", _run_returning(stderr='openjdk version "11.0.2"'))
    with pytest.raises(BrokerUnavailable, match="needs Java 17 or newer; `java` on PATH is Java 11"):
        kafka.check_java()


def test_a_failed_resolution_reports_mavens_last_lines_and_caches_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FHIRBRIDGE_KAFKA_CACHE", str(tmp_path))
    monkeypatch.setattr(kafka.shutil, "which", lambda name: f"/usr/bin/{name}")
    run = _run_returning(stdout="[ERROR] Could not resolve org.apache.kafka:kafka_2.13", code=1)
    monkeypatch.setattr(kafka.subprocess, "run", run)
    with pytest.raises(
        BrokerUnavailable, match=r"Maven could not resolve Apache Kafka (?s:.*)Could not resolve"
    ):
        kafka.classpath()
    assert run.calls[0][:4] == ["/usr/bin/mvn", "-B", "-q", "-f"]
    assert "dependency:copy-dependencies" in run.calls[0]
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def test_a_resolved_classpath_is_reused_without_maven(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FHIRBRIDGE_KAFKA_CACHE", str(tmp_path))
    monkeypatch.setattr(kafka.shutil, "which", lambda name: f"/usr/bin/{name}")

    def fake_mvn(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        out = Path(next(a for a in cmd if a.startswith("-DoutputDirectory=")).split("=", 1)[1])
        out.mkdir(parents=True)
        (out / f"kafka_2.13-{kafka.kafka_version()}.jar").write_bytes(b"jar")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(kafka.subprocess, "run", fake_mvn)
    lib = kafka.classpath()
    assert (lib / f"kafka_2.13-{kafka.kafka_version()}.jar").exists()
    monkeypatch.setattr(kafka.subprocess, "run", _run_returning(code=1))  # Maven would fail now
    assert kafka.classpath() == lib


def test_the_pom_pins_kafka_4() -> None:
    assert kafka.kafka_version().split(".")[0] == "4"


def _node(tmp_path: Path, node_id: int = 1) -> kafka.KafkaNode:
    return kafka.KafkaNode(
        node_id,
        tmp_path / f"node-{node_id}",
        {"PLAINTEXT": 9000 + node_id, "CONTROLLER": 9100 + node_id},
        {"PLAINTEXT": "PLAINTEXT", "CONTROLLER": "PLAINTEXT"},
    )


def test_one_node_is_a_kraft_broker_and_controller_on_loopback_with_replication_one(tmp_path: Path) -> None:
    props = kafka.node_properties(_node(tmp_path), "1@127.0.0.1:9101", replication=1)
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9001,CONTROLLER://127.0.0.1:9101"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9001"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:9101"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert "zookeeper.connect" not in props


def test_three_nodes_replicate_internal_topics_three_times_with_two_in_sync(tmp_path: Path) -> None:
    props = kafka.node_properties(
        _node(tmp_path, 2), "1@h:1,2@h:2,3@h:3", replication=3, extra={"min.insync.replicas": "2"}
    )
    assert props["node.id"] == "2"
    assert props["offsets.topic.replication.factor"] == "3"
    assert props["transaction.state.log.min.isr"] == "2"
    assert props["min.insync.replicas"] == "2"


def test_a_formatted_node_is_read_back_from_its_properties(tmp_path: Path) -> None:
    node = _node(tmp_path)
    node.directory.mkdir()
    props = kafka.node_properties(node, "1@127.0.0.1:9101", replication=1)
    (node.directory / "server.properties").write_text(kafka._properties_text(props))
    assert kafka._formatted_node(node.directory) is None  # not formatted yet
    (node.directory / "data").mkdir()
    (node.directory / "data" / "meta.properties").write_text("node.id=1\n")
    again = kafka._formatted_node(node.directory)
    assert again is not None
    assert again.ports == node.ports and again.client_listener == "PLAINTEXT"
    assert again.address() == "127.0.0.1:9001"


def test_cluster_ids_are_22_url_safe_characters_never_read_as_an_option() -> None:
    ids = {kafka.new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 22 and "=" not in i and "+" not in i and "/" not in i for i in ids)
    # one random id in 64 starts with "-", which `kafka-storage format -t` took for an option
    assert not [i for i in ids if i.startswith("-")]
    assert any(i[0] == "_" for i in ids)  # the other URL-safe character is still drawn
