"""The deployment files agree with the worker they deploy, checked offline.

No Docker engine or cluster is needed: the files are parsed and held against the worker's
own defaults (its HTTP port, its drain timeout, its queue names, its console command).
Where ``kubectl`` or ``hadolint`` are installed, they check the files too.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from worker.config import DEFAULT_HTTP_PORT, Settings
from worker.topology import Names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RABBITMQ_K8S = K8S / "rabbitmq"
DOCKERFILE = DEPLOY / "Dockerfile"
APP = "plugin-state-worker"
APP_LABEL = "app.kubernetes.io/name"
DEFAULTS = Settings()
# The port of /metrics, /healthz and /readyz: the worker's default.
HTTP_PORT = DEFAULT_HTTP_PORT


def load_all(path: Path) -> list[Any]:
    return [document for document in yaml.safe_load_all(path.read_text("utf-8")) if document]


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def manifests(directory: Path = K8S) -> dict[str, dict[str, Any]]:
    """Every Kubernetes object of deploy/k8s (or another directory) by kind (each kind
    occurs once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in load_all(path):
            assert document["kind"] not in found, f"a second {document['kind']} in {path.name}"
            found[document["kind"]] = document
    return found


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_all(DEPLOY / "compose.yaml")[0]["services"]
    return services


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR-default}`` with nothing set: the default."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda match: match.group(1) or "", value)


def seconds(duration: str) -> float:
    """A compose duration such as ``45s`` or ``1m30s``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def drain_timeout(environment: dict[str, str]) -> float:
    value = environment.get("PLUGIN_STATE_DRAIN_TIMEOUT_SECONDS")
    return DEFAULTS.drain_timeout_seconds if value is None else float(value)


def pod_spec(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = manifests()[kind]["spec"]["template"]["spec"]
    return spec


def only_container(kind: str) -> dict[str, Any]:
    (container,) = pod_spec(kind)["containers"]
    assert isinstance(container, dict)
    return container


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text("utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def arguments_of(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile() if name == keyword]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"{arguments} is not the exec (JSON) form"
    return [str(item) for item in value]


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("path", yaml_files(), ids=lambda path: str(path.relative_to(DEPLOY)))
def test_every_yaml_file_in_deploy_parses(path: Path) -> None:
    assert load_all(path), f"{path.name} holds no document"


def kustomization_of(directory: Path) -> dict[str, Any]:
    kustomization: dict[str, Any] = load_all(directory / "kustomization.yaml")[0]
    on_disk = {path.name for path in directory.glob("*.y*ml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk), directory.name
    return kustomization


def test_kustomization_lists_every_manifest_in_deploy_k8s() -> None:
    kustomization = kustomization_of(K8S)
    (image,) = kustomization["images"]
    assert image["name"] == only_container("Deployment")["image"]
    assert image["name"] == only_container("Job")["image"]


# -------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_a_wheel_on_python_3_11_slim_in_two_stages() -> None:
    stages = arguments_of("FROM")
    assert len(stages) >= 2
    args = dict(argument.partition("=")[::2] for argument in arguments_of("ARG"))
    bases = {
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.split()[0]) for stage in stages
    }
    assert bases == {"python:3.11-slim"}
    assert any(command.startswith("pip wheel") for command in arguments_of("RUN"))


def test_dockerfile_runs_the_console_command_as_a_non_root_user() -> None:
    (user,) = arguments_of("USER")
    assert user.split(":")[0] not in {"root", "0"}
    (entrypoint,) = arguments_of("ENTRYPOINT")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["scripts"]
    assert exec_form(entrypoint) == [APP]
    assert APP in scripts
    (command,) = arguments_of("CMD")
    assert exec_form(command) == ["run"]
    assert str(HTTP_PORT) in arguments_of("EXPOSE")


def test_dockerfile_health_check_gets_healthz_with_the_python_standard_library() -> None:
    (healthcheck,) = arguments_of("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert all(option.startswith("--") for option in options.split())
    probe = exec_form(command)
    assert probe[:2] == ["python", "-c"]
    assert "urllib.request" in probe[2]
    assert "/healthz" in probe[2]
    assert f"'{HTTP_PORT}'" in probe[2]  # the fallback when PLUGIN_STATE_HTTP_PORT is unset


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``path`` out: the last matching pattern decides."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path, f"{glob}/*"):
            ignored = not negated
    return ignored


def test_dockerignore_sends_what_the_image_copies_and_nothing_local() -> None:
    lines = (ROOT / ".dockerignore").read_text("utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [
        source
        for arguments in arguments_of("COPY")
        if not arguments.startswith("--from")
        for source in shlex.split(arguments)[:-1]
    ]
    assert copied
    for source in copied:
        assert not dockerignored(source.rstrip("/"), patterns), source
    for local in (".venv", ".git", "tests", ".mypy_cache", "worker/__pycache__", "x.pyc"):
        assert dockerignored(local, patterns), local


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_hadolint_accepts_the_dockerfile() -> None:
    subprocess.run(["hadolint", str(DOCKERFILE)], check=True, timeout=60)


# ----------------------------------------------------------------------------- compose


def test_compose_runs_rabbitmq_and_postgres_16_with_health_checks() -> None:
    services = compose_services()
    rabbitmq, postgres = services["rabbitmq"], services["postgres"]
    assert rabbitmq["image"].startswith("rabbitmq:")
    assert postgres["image"].startswith("postgres:16")
    assert rabbitmq["healthcheck"]["test"][1:] == ["rabbitmq-diagnostics", "-q", "ping"]
    assert "pg_isready" in postgres["healthcheck"]["test"]


def workers() -> dict[str, Any]:
    return {
        name: service
        for name, service in compose_services().items()
        if "run" in service.get("command", [])
    }


def test_compose_runs_three_workers_after_a_successful_migration() -> None:
    services = compose_services()
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    found = workers()
    replicas = sum(service.get("deploy", {}).get("replicas", 1) for service in found.values())
    assert replicas == 3
    for service in found.values():
        assert service["image"] == migrate["image"]
        depends_on = service["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"
        assert depends_on["rabbitmq"]["condition"] == "service_healthy"


def test_compose_checks_that_the_workers_are_ready() -> None:
    for service in workers().values():
        probe = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{HTTP_PORT}/readyz" in probe
        assert service["healthcheck"].get("disable") is not True


def test_compose_lets_workers_drain_before_they_are_killed() -> None:
    for service in workers().values():
        drain = drain_timeout(service["environment"])
        assert seconds(service["stop_grace_period"]) > drain


def test_compose_points_the_worker_at_its_own_services() -> None:
    services = compose_services()
    for name in ("migrate", *workers()):
        environment = {
            key: interpolate(value) for key, value in services[name]["environment"].items()
        }
        settings = Settings.from_env(environment)
        assert urlsplit(settings.database_url).hostname == "postgres"
        assert urlsplit(settings.amqp_url).hostname == "rabbitmq"
        assert (
            urlsplit(settings.amqp_url).username
            == services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]
        )
        assert environment.get("PLUGIN_STATE_HTTP_PORT", str(HTTP_PORT)) == str(HTTP_PORT)


def rabbitmq_conf(text: str) -> dict[str, str]:
    """A rabbitmq.conf (``key = value`` lines, ``#`` comments) as a dict."""
    pairs = (line.strip().partition("=") for line in text.splitlines())
    return {key.strip(): value.strip() for key, _, value in pairs if key and key[0] != "#"}


def cluster_nodes() -> dict[str, Any]:
    """The RabbitMQ nodes of the compose file's ``cluster`` profile."""
    return {
        name: service
        for name, service in compose_services().items()
        if "cluster" in service.get("profiles", [])
    }


def compose_config(name: str) -> Path:
    path: Path = DEPLOY / load_all(DEPLOY / "compose.yaml")[0]["configs"][name]["file"]
    return path


def mounted_configs(service: dict[str, Any]) -> dict[str, Path]:
    return {config["target"]: compose_config(config["source"]) for config in service["configs"]}


def test_compose_runs_only_the_single_broker_setup_without_a_profile() -> None:
    for name, service in compose_services().items():
        assert ("profiles" in service) == (name in cluster_nodes()), name
    assert set(cluster_nodes()) == {"rabbitmq-1", "rabbitmq-2", "rabbitmq-3"}


def test_compose_cluster_nodes_find_each_other_by_name_and_pause_a_minority() -> None:
    nodes = cluster_nodes()
    rabbitmq = compose_services()["rabbitmq"]
    for node in nodes.values():
        conf = rabbitmq_conf(
            mounted_configs(node)["/etc/rabbitmq/conf.d/20-cluster.conf"].read_text()
        )
        assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
        listed = {
            value
            for key, value in conf.items()
            if key.startswith("cluster_formation.classic_config.nodes.")
        }
        # A node's name is rabbit@<its host name>, and each one has its own data.
        assert listed == {f"rabbit@{other['hostname']}" for other in nodes.values()}
        assert conf["cluster_partition_handling"] == "pause_minority"
        assert node["image"] == rabbitmq["image"]
        assert node["healthcheck"]["test"] == rabbitmq["healthcheck"]["test"]
    volumes = [node["volumes"][0].split(":")[0] for node in nodes.values()]
    assert len(set(volumes)) == len(nodes)


def test_compose_cluster_nodes_share_one_erlang_cookie_readable_by_rabbitmq_only() -> None:
    cookies = {
        interpolate(node["environment"]["ERLANG_COOKIE"]) for node in cluster_nodes().values()
    }
    (cookie,) = cookies
    assert cookie
    for node in cluster_nodes().values():
        shell, option, script = node["entrypoint"]
        assert (shell, option) == ("sh", "-ec")
        lines = script.splitlines()
        assert lines[0] == "umask 077"
        assert '"$$ERLANG_COOKIE" > /var/lib/rabbitmq/.erlang.cookie' in lines[1]
        assert "chown rabbitmq:rabbitmq /var/lib/rabbitmq/.erlang.cookie" in lines
        assert lines[-1] == "exec docker-entrypoint.sh rabbitmq-server"


def test_compose_cluster_nodes_enable_the_consistent_hash_exchange() -> None:
    for node in cluster_nodes().values():
        text = mounted_configs(node)["/etc/rabbitmq/enabled_plugins"].read_text()
        plugins = re.fullmatch(r"\s*\[([\w,\s]*)\]\.\s*", text)
        assert plugins is not None, text
        enabled = {plugin.strip() for plugin in plugins.group(1).split(",")}
        # The management image's own plugins, and the exchange that can spread plugins'
        # commands over several prefixes (README, "Beyond one queue").
        assert enabled == {
            "rabbitmq_management",
            "rabbitmq_prometheus",
            "rabbitmq_consistent_hash_exchange",
        }


def test_compose_cluster_nodes_publish_host_ports_of_their_own() -> None:
    published = [
        interpolate(port).split(":")[0]
        for name in ("rabbitmq", *cluster_nodes())
        for port in compose_services()[name]["ports"]
    ]
    assert len(published) == len(set(published))


# -------------------------------------------------------------------------- Kubernetes


def test_every_object_carries_the_one_app_label() -> None:
    for kind, document in manifests().items():
        assert document["metadata"]["labels"][APP_LABEL] == APP, kind
        template = document.get("spec", {}).get("template")
        if template is not None:
            assert template["metadata"]["labels"][APP_LABEL] == APP, kind


def test_deployment_probes_the_port_and_paths_the_worker_serves() -> None:
    container = only_container("Deployment")
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert HTTP_PORT in ports.values()

    def probed(probe: dict[str, Any]) -> tuple[str, int]:
        port = probe["httpGet"]["port"]
        return probe["httpGet"]["path"], ports[port] if isinstance(port, str) else port

    assert probed(container["livenessProbe"]) == ("/healthz", HTTP_PORT)
    assert probed(container["readinessProbe"]) == ("/readyz", HTTP_PORT)
    env = env_of(container)
    assert env.get("PLUGIN_STATE_HTTP_PORT", {"value": str(HTTP_PORT)})["value"] == str(HTTP_PORT)
    assert container["args"] == ["run"]


def test_deployment_gives_workers_longer_than_the_drain_timeout_to_stop() -> None:
    env = {
        name: variable.get("value", "")
        for name, variable in env_of(only_container("Deployment")).items()
    }
    assert pod_spec("Deployment")["terminationGracePeriodSeconds"] > drain_timeout(env)


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_as_non_root_with_resource_requests_and_limits(kind: str) -> None:
    security = pod_spec(kind)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security.get("runAsUser", 1) != 0
    container = only_container(kind)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound]), (kind, bound)


@pytest.mark.parametrize(
    ("kind", "variables"),
    [
        ("Deployment", ("PLUGIN_STATE_DATABASE_URL", "PLUGIN_STATE_AMQP_URL")),
        ("Job", ("PLUGIN_STATE_DATABASE_URL",)),
    ],
)
def test_urls_come_from_the_secret(kind: str, variables: tuple[str, ...]) -> None:
    secret = manifests()["Secret"]
    env = env_of(only_container(kind))
    for variable in variables:
        reference = env[variable]["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"]
        # Raises ConfigError for a URL the worker would refuse at start-up.
        Settings.from_env({variable: secret["stringData"][reference["key"]]})


def test_migration_job_runs_migrate_once() -> None:
    job = manifests()["Job"]
    assert only_container("Job")["args"] == ["migrate"]
    assert pod_spec("Job")["restartPolicy"] in {"Never", "OnFailure"}
    assert job["spec"]["backoffLimit"] >= 1


def test_disruption_budget_selects_the_workers_only() -> None:
    selector = manifests()["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    deployment, job = manifests()["Deployment"], manifests()["Job"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_keda_scales_the_deployment_on_the_commands_queue_length() -> None:
    objects = manifests()
    scaled = objects["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    assert scaled["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == Names(DEFAULTS.prefix).commands_queue
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert int(trigger["metadata"]["value"]) > 0
    authentication = objects["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == authentication["metadata"]["name"]
    (reference,) = authentication["spec"]["secretTargetRef"]
    secret = objects["Secret"]
    assert reference["parameter"] == "host"
    assert reference["name"] == secret["metadata"]["name"]
    host = secret["stringData"][reference["key"]]
    # KEDA's AMQP client reads an empty path as the empty vhost: the vhost must be explicit.
    assert urlsplit(host).scheme in {"amqp", "amqps"}
    assert urlsplit(host).path == "/%2F"


# ------------------------------------------------------------ Kubernetes: RabbitMQ cluster


def rabbitmq_cluster() -> dict[str, Any]:
    cluster: dict[str, Any] = manifests(RABBITMQ_K8S)["RabbitmqCluster"]
    return cluster


def test_rabbitmq_kustomization_lists_every_manifest_beside_it() -> None:
    kustomization_of(RABBITMQ_K8S)
    # Not part of the workers' kustomization: they deploy where the operator is not installed.
    assert not any("rabbitmq" in resource for resource in kustomization_of(K8S)["resources"])


def test_rabbitmq_cluster_runs_three_nodes_with_the_consistent_hash_exchange() -> None:
    spec = rabbitmq_cluster()["spec"]
    assert rabbitmq_cluster()["apiVersion"] == "rabbitmq.com/v1beta1"
    assert spec["replicas"] == 3
    assert "rabbitmq_consistent_hash_exchange" in spec["rabbitmq"]["additionalPlugins"]
    assert spec["image"] == compose_services()["rabbitmq"]["image"]


def test_rabbitmq_cluster_pauses_a_minority_as_the_compose_cluster_does() -> None:
    config = rabbitmq_conf(rabbitmq_cluster()["spec"]["rabbitmq"]["additionalConfig"])
    (node, *_) = cluster_nodes().values()
    compose = rabbitmq_conf(
        mounted_configs(node)["/etc/rabbitmq/conf.d/20-cluster.conf"].read_text()
    )
    assert config["cluster_partition_handling"] == "pause_minority"
    assert config["cluster_partition_handling"] == compose["cluster_partition_handling"]


def test_rabbitmq_cluster_has_resources_with_its_memory_limit_equal_to_the_request() -> None:
    resources = rabbitmq_cluster()["spec"]["resources"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[bound]), bound
    # RabbitMQ's memory high watermark is a share of the limit: it must be there.
    assert resources["limits"]["memory"] == resources["requests"]["memory"]


def test_rabbitmq_nodes_spread_over_kubernetes_nodes_and_are_evicted_one_at_a_time() -> None:
    cluster = rabbitmq_cluster()
    # The operator labels the cluster's pods app.kubernetes.io/name: <the cluster's name>.
    pods = {APP_LABEL: cluster["metadata"]["name"]}
    (term,) = cluster["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["labelSelector"]["matchLabels"] == pods
    assert term["topologyKey"] == "kubernetes.io/hostname"
    budget = manifests(RABBITMQ_K8S)["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"] == pods
    assert budget["maxUnavailable"] == 1


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_every_object_with_the_released_image() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    documents = [document for document in yaml.safe_load_all(built) if document]
    assert sorted(document["kind"] for document in documents) == sorted(manifests())
    images = {
        container["image"]
        for document in documents
        if "template" in document.get("spec", {})
        for container in document["spec"]["template"]["spec"]["containers"]
    }
    (image,) = images
    assert ":" in image


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_rabbitmq_cluster() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(RABBITMQ_K8S)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    kinds = sorted(document["kind"] for document in yaml.safe_load_all(built) if document)
    assert kinds == sorted(manifests(RABBITMQ_K8S))
