"""deploy/kubernetes: every manifest is a valid object of its kind (checked with the
kubernetes client's models, which must reproduce each document field for field), RBAC is
read-only and minimal, and the DaemonSet is unprivileged with NET_ADMIN only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from l4lb.k8s.options import parse_kube_proxy_configuration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MODELS = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
}


def _documents() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def _model(doc: dict[str, Any]) -> Any:
    name = MODELS[(doc["apiVersion"], doc["kind"])]
    return client.ApiClient().deserialize(json.dumps(doc), name, "application/json")


def test_all_kinds_are_there() -> None:
    assert set(_documents()) == {k for _, k in MODELS}


@pytest.mark.parametrize("kind", sorted(k for _, k in MODELS))
def test_manifest_round_trips_through_the_model(kind: str) -> None:
    """Unknown or misspelt fields are dropped by the model, so a round trip exposes them."""
    doc = _documents()[kind]
    again = client.ApiClient().sanitize_for_serialization(_model(doc))
    assert again == doc


def test_cluster_role_is_read_only_and_minimal() -> None:
    docs = _documents()
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in docs["ClusterRole"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("", "services"): ["get", "list", "watch"],
        ("discovery.k8s.io", "endpointslices"): ["get", "list", "watch"],
        ("", "nodes"): ["get"],
    }
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]
    sa = docs["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
    ]


def test_daemonset_is_host_network_unprivileged_net_admin_only() -> None:
    docs = _documents()
    ds = _model(docs["DaemonSet"])
    pod = ds.spec.template.spec
    assert pod.host_network is True
    assert pod.service_account_name == docs["ServiceAccount"]["metadata"]["name"]
    (container,) = pod.containers
    sc = container.security_context
    assert sc.privileged is False and sc.allow_privilege_escalation is False
    assert sc.capabilities.add == ["NET_ADMIN"] and sc.capabilities.drop == ["ALL"]
    probe = container.liveness_probe.http_get
    assert (probe.path, probe.port) == ("/livez", 10256)
    assert container.command[:2] == ["l4lb", "kube-proxy"]
    # The --config the container gets is the ConfigMap's key, mounted where it points.
    config_flag = next(a for a in container.command if a.startswith("--config="))
    mount = next(m for m in container.volume_mounts if m.name == "config")
    volume = next(v for v in pod.volumes if v.name == "config")
    cm = docs["ConfigMap"]
    assert volume.config_map.name == cm["metadata"]["name"]
    key = config_flag.split("=", 1)[1].removeprefix(mount.mount_path + "/")
    assert key in cm["data"]


def test_configmap_holds_a_clean_kube_proxy_configuration() -> None:
    cm = _documents()["ConfigMap"]
    opts = parse_kube_proxy_configuration(yaml.safe_load(cm["data"]["config.yaml"]))
    assert opts.warnings == ()
    assert opts.proxy_mode == "userspace"
    assert opts.healthz_bind_address.port == 10256
    assert opts.kubeconfig is None  # in-cluster
