"""The Kubernetes manifests (deploy/k8s): valid against the Kubernetes schemas, and consistent with the code.

Every document is checked offline by ``kubernetes-validate`` in strict mode (unknown fields are errors) for
the oldest Kubernetes the manifests support (1.30: ``preStop.sleep``) and the newest it knows. Then what a
schema cannot see: the files kustomize lists are the files there are, selectors select the pods they are
meant for, probes hit the cloud's ``/health`` and ``/ready``, the termination grace period covers the
cloud's whole drain (G1 and G2 in a cluster), every ``GKT_CLOUD_`` variable is one the cloud reads, the
cloud's upstream is the production-stack router of the pinned release, and every Secret key the pods read
is documented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cloud_service.settings import CloudSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Read by the cloud once the durable ledger and shared limits land (issue 19, points 1 and 2).
PENDING_ENV = {"GKT_CLOUD_DATABASE_URL", "GKT_CLOUD_REDIS_URL"}


def kustomization(path: Path = K8S) -> dict[str, Any]:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in kustomization()["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def cloud_container() -> dict[str, Any]:
    (container,) = find("Deployment", "gkt-cloud")["spec"]["template"]["spec"]["containers"]
    return container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    docs = documents()
    assert len(docs) >= 10
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}") from exc


def test_the_validator_catches_what_it_should() -> None:
    """The check above can fail: a misspelled field and a wrong type are errors in strict mode."""
    deployment = find("Deployment", "gkt-cloud")
    bad = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)
    bad = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def test_kustomize_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    overlay = kustomization(K8S / "vllm-stack")
    assert overlay["resources"] == [".."] and overlay["namespace"] == kustomization()["namespace"]


def test_selectors_select_their_pods() -> None:
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for _, d in documents() if d["kind"] in ("Deployment", "StatefulSet")}
    for name, doc in documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert selects(doc["spec"]["selector"]["matchLabels"], pods[doc["metadata"]["name"]]), name
        if doc["kind"] == "Service":
            assert selects(doc["spec"]["selector"], pods[doc["metadata"]["name"]]), name
            for port in doc["spec"]["ports"]:
                names = {p["name"] for c in _containers(doc["metadata"]["name"]) for p in c["ports"]}
                assert port["targetPort"] in names, (name, port)
    pdb = find("PodDisruptionBudget", "gkt-cloud")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pods["gkt-cloud"])
    assert pdb["spec"]["maxUnavailable"] == 1 < find("Deployment", "gkt-cloud")["spec"]["replicas"]


def _containers(workload: str) -> list[dict[str, Any]]:
    (doc,) = [d for _, d in documents() if d["kind"] in ("Deployment", "StatefulSet")
              and d["metadata"]["name"] == workload]
    return doc["spec"]["template"]["spec"]["containers"]


def test_network_policies_select_the_teacher_tier_and_the_stores() -> None:
    values = yaml.safe_load((K8S / "vllm-stack" / "values.yaml").read_text())
    cloud = find("Deployment", "gkt-cloud")["spec"]["template"]["metadata"]["labels"]
    targets = {
        "gkt-postgres": find("StatefulSet", "gkt-postgres")["spec"]["template"]["metadata"]["labels"],
        "gkt-redis": find("Deployment", "gkt-redis")["spec"]["template"]["metadata"]["labels"],
        "gkt-teacher-router": values["routerSpec"]["labels"],
        "gkt-teacher": values["servingEngineSpec"]["labels"],
    }
    for name, labels in targets.items():
        spec = find("NetworkPolicy", name)["spec"]
        assert selects(spec["podSelector"]["matchLabels"], labels), name
        (rule,) = spec["ingress"]
        sources = [f["podSelector"]["matchLabels"] for f in rule["from"]]
        allowed = values["routerSpec"]["labels"] if name == "gkt-teacher" else cloud
        assert any(selects(s, allowed) for s in sources), name


def test_cloud_probes_hit_health_and_ready() -> None:
    c = cloud_container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"  # liveness never depends on the upstream (H1)
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = _env(c)
    assert port[c["readinessProbe"]["httpGet"]["port"]] == int(env["GKT_CLOUD_PORT"])
    assert env["GKT_CLOUD_HOST"] == "0.0.0.0"


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<secret>") for e in container["env"]}


def test_termination_grace_covers_the_whole_drain() -> None:
    """SIGTERM starts the drain (shared/serve.py): running work may finish for GKT_CLOUD_DRAIN_TIMEOUT_S, streams
    still open get half a second to take their error frame, then uvicorn's graceful shutdown takes a quarter of
    the drain. The preStop sleep comes first and counts against the same grace period."""
    spec = find("Deployment", "gkt-cloud")["spec"]["template"]["spec"]
    c = cloud_container()
    env = _env(c)
    drain = float(env.get("GKT_CLOUD_DRAIN_TIMEOUT_S", CloudSettings.model_fields["drain_timeout_s"].default))
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + drain + 0.5 + max(1, round(drain / 4))
    grace = spec["terminationGracePeriodSeconds"]
    assert needed + 2 <= grace <= needed + 15, (needed, grace)  # room to exit; no needless wait on a hung pod
    assert c["readinessProbe"]["failureThreshold"] * c["readinessProbe"]["periodSeconds"] <= pre_stop + drain


def test_every_cloud_variable_is_one_the_cloud_reads() -> None:
    fields = {f"GKT_CLOUD_{name.upper()}" for name in CloudSettings.model_fields}
    names = set(_env(cloud_container()))
    unknown = {n for n in names if n.startswith("GKT_CLOUD_")} - fields - PENDING_ENV
    assert not unknown, unknown
    env = _env(cloud_container())
    assert env["GKT_CLOUD_BACKEND"] == "openai"
    CloudSettings.model_validate({k[len("GKT_CLOUD_"):].lower(): v for k, v in env.items()
                                  if k in fields and v != "<secret>"})


def test_the_cloud_calls_the_router_of_the_pinned_release() -> None:
    (chart,) = kustomization(K8S / "vllm-stack")["helmCharts"]
    assert chart["name"] == "vllm-stack" and chart["version"] and chart["valuesFile"] == "values.yaml"
    env = _env(cloud_container())
    assert env["GKT_CLOUD_UPSTREAM_URL"] == f"http://{chart['releaseName']}-router-service/v1"
    values = yaml.safe_load((K8S / "vllm-stack" / "values.yaml").read_text())
    (model,) = values["servingEngineSpec"]["modelSpec"]
    args = model["vllmConfig"]["extraArgs"]
    assert args[args.index("--served-model-name") + 1] == env["GKT_CLOUD_UPSTREAM_MODEL"]
    assert model["replicaCount"] >= 2 and values["routerSpec"]["routingLogic"]
    key = values["servingEngineSpec"]["vllmApiKey"]
    upstream_key = next(e for e in cloud_container()["env"] if e["name"] == "GKT_CLOUD_UPSTREAM_API_KEY")
    assert upstream_key["valueFrom"]["secretKeyRef"] == {"name": key["secretName"], "key": key["secretKey"]}


def test_every_secret_the_pods_read_is_documented() -> None:
    guide = (ROOT / "docs" / "DEPLOY.md").read_text()
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for _, d in documents() if d["kind"] in ("Deployment", "StatefulSet")
            for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if "valueFrom" in e}
    assert len(refs) >= 4
    for name, key in refs:
        assert f"kubectl -n gkt create secret generic {name}" in guide, name
        assert f"--from-literal={key}=" in guide, (name, key)
