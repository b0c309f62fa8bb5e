"""`deploy/kubernetes`: each overlay renders with `kubectl kustomize`, runs every role once
with the probes of its own role, unprivileged on a read-only root, with Services and the edge's
disruption budget selecting pods that exist; the config it mounts loads and its rules check
against it; the gpu overlay gives the workers, and only them, a GPU."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.config import load_settings
from node.flow.routing.admin import check
from node.roles import Role, ServiceRole

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = REPO / "deploy" / "kubernetes" / "overlays"
CONFIG = ["--config", "/etc/ainode/node.yaml"]

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed (it renders Kustomize)"
)


def rendered(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def node_containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The node's container of each Deployment, by the role it serves."""
    found = {}
    for deployment in of_kind(docs, "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[:3] == ["serve", *CONFIG] and args[3] == "--role", args
        found[args[4]] = container
    return found


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("overlay", ["example", "production", "gpu"])
def test_every_role_runs_once_probed_by_its_own_health_and_unprivileged(overlay: str) -> None:
    docs = rendered(overlay)
    containers = node_containers(docs)
    assert set(containers) == set(ServiceRole)
    for role, container in containers.items():
        health = ["ainode", "health", *CONFIG, "--role", role]
        assert container["readinessProbe"]["exec"]["command"] == health
        assert container["startupProbe"]["exec"]["command"] == health
        assert container["livenessProbe"]["exec"]["command"] == [*health, "--alive"]
        (database,) = [e for e in container["env"] if e["name"] == "AINODE_DATABASE__URL"]
        assert database["valueFrom"]["secretKeyRef"] == {"name": "ainode-database", "key": "url"}
    for workload in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert "requests" in container["resources"] and "limits" in container["resources"]
        if workload["kind"] == "Deployment":
            (container,) = pod["containers"]
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
    coordinator = next(
        d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("coordinator")
    )
    assert coordinator["spec"]["replicas"] == 2  # one coordinating, one standing by


@pytest.mark.parametrize("overlay", ["example", "production", "gpu"])
def test_services_and_the_budget_select_pods_that_serve_their_ports(overlay: str) -> None:
    docs = rendered(overlay)
    pods = [
        (w["spec"]["template"]["metadata"]["labels"], w["spec"]["template"]["spec"]["containers"])
        for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")
    ]
    for service in of_kind(docs, "Service"):
        chosen = [cs for labels, cs in pods if matches(service["spec"]["selector"], labels)]
        assert chosen, service["metadata"]["name"]
        named = {p["name"] for cs in chosen for c in cs for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
    (budget,) = of_kind(docs, "PodDisruptionBudget")
    edge = [
        labels for labels, _ in pods if matches(budget["spec"]["selector"]["matchLabels"], labels)
    ]
    assert len(edge) == 1 and edge[0]["app.kubernetes.io/component"] == "edge"
    claims = {
        volume["persistentVolumeClaim"]["claimName"]
        for workload in of_kind(docs, "Deployment")
        for volume in workload["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in volume
    }
    assert claims == {claim["metadata"]["name"] for claim in of_kind(docs, "PersistentVolumeClaim")}


def test_the_mounted_config_loads_and_its_rules_check(tmp_path: Path) -> None:
    docs = rendered("example")
    (config_map,) = of_kind(docs, "ConfigMap")
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    (secret,) = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "ainode-database"]
    assert "url" in secret.get("stringData", secret.get("data", {}))
    environ = {
        "AINODE_DATABASE__URL": "postgresql+psycopg://ainode:secret@ainode-postgres:5432/ainode",
        "AINODE_ROUTING__RULES_FILE": str(tmp_path / "rules.yaml"),
        "AINODE_STORAGE__PATH": str(tmp_path / "storage"),
    }
    settings = load_settings(tmp_path / "node.yaml", environ)
    assert settings.database.url.startswith("postgresql+psycopg://ainode:secret@")
    checked = check(settings)
    assert checked.valid, [problem.render() for problem in checked.problems]
    assert checked.rules == 1


def test_only_the_gpu_overlay_s_workers_ask_for_a_gpu() -> None:
    for overlay, wanted in (("production", set()), ("gpu", {"worker"})):
        containers = node_containers(rendered(overlay))
        asking = {r for r, c in containers.items() if "nvidia.com/gpu" in c["resources"]["limits"]}
        assert asking == wanted


def test_the_remote_worker_overlay_needs_only_the_url_and_a_token() -> None:
    docs = rendered("remote-worker")
    assert {doc["kind"] for doc in docs} == {"Deployment"}
    (deployment,) = docs
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["worker", "--node"]
    assert container["args"][2].startswith("https://")
    (token,) = [e for e in container["env"] if e["name"] == "AINODE_WORKER_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["name"] == "ainode-worker-token"
    assert not any(e["name"].startswith("AINODE_DATABASE") for e in container["env"])
    assert not any("persistentVolumeClaim" in volume for volume in pod["volumes"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    # a pod's name is its worker's name: at most 32 characters with the ReplicaSet's suffix
    assert len(deployment["metadata"]["name"]) + len("-5d8f7c9b4f-x2k7q") <= 32


def test_the_podman_overlay_runs_each_role_once_on_the_host_network_over_sqlite(
    tmp_path: Path,
) -> None:
    """What `podman kube play` gets (tests/test_kube_play.py runs it where the image is)."""
    docs = rendered("podman")
    deployments = of_kind(docs, "Deployment")
    assert all(d["spec"]["replicas"] == 1 for d in deployments)  # podman runs one replica
    assert all(d["spec"]["template"]["spec"]["hostNetwork"] is True for d in deployments)
    local = {d["metadata"]["name"]: d for d in deployments if d["metadata"]["name"] != (
        "ainode-remote-worker")}  # fmt: skip
    containers = node_containers([*local.values()])
    assert set(containers) == set(ServiceRole)
    for container in containers.values():
        (database,) = [e for e in container["env"] if e["name"] == "AINODE_DATABASE__URL"]
        assert database["value"] == "sqlite:////var/lib/ainode/ainode.db"  # on the shared volume
    (remote,) = [d for d in deployments if d["metadata"]["name"] == "ainode-remote-worker"]
    pod = remote["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][:3] == ["worker", "--node", "http://127.0.0.1:8088"]
    assert not any("persistentVolumeClaim" in volume for volume in pod["volumes"])
    (claim,) = of_kind(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["volume.podman.io/uid"] == "10001"
    scratch = [  # podman makes each emptyDir a volume named as it is: one per pod
        v["name"] for d in deployments for v in d["spec"]["template"]["spec"]["volumes"]
        if "emptyDir" in v
    ]  # fmt: skip
    assert len(scratch) == len(deployments) == len(set(scratch))

    (config_map,) = of_kind(docs, "ConfigMap")
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    environ = {
        "AINODE_ROUTING__RULES_FILE": str(tmp_path / "rules.yaml"),
        "AINODE_STORAGE__PATH": str(tmp_path / "storage"),
    }
    settings = load_settings(tmp_path / "node.yaml", environ)
    assert check(settings).valid
    token = remote["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]
    (entry,) = settings.http.auth.tokens if settings.http else []
    assert entry.sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert entry.roles == [Role.WORKER]
