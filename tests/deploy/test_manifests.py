"""The scale-out deployment files are valid, offline: Kubernetes manifests against the schemas
bundled in kubernetes-validate, docker-compose.yml against the compose-spec schema vendored in
check-jsonschema. No cluster and no Docker daemon are needed."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[dict]:
    return [d for p in MANIFESTS for d in _docs(p)]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifest_is_valid_against_bundled_schemas(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    for doc in _docs(path):
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error


def test_kustomization_lists_every_manifest_but_the_secret_template():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in MANIFESTS} - {"secret.example.yaml"}


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _all_docs() if d["kind"] == kind}


def test_k8s_roles_probes_autoscaling_and_disruption_budgets():
    deployments = _by_kind("Deployment")
    assert {"llm-gateway", "llm-worker-async", "llm-worker", "llm-beat"} <= set(deployments)
    gw = deployments["llm-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # probes by pod address must still pass ALLOWED_HOSTS
    config = _by_kind("ConfigMap")["llm-service"]["data"]
    allowed = config["ALLOWED_HOSTS"].split(",")
    for probe in ("readinessProbe", "livenessProbe"):
        hosts = [h["value"] for h in gw[probe]["httpGet"]["httpHeaders"] if h["name"] == "Host"]
        assert hosts and hosts[0] in allowed
    assert config["DJANGO_PROFILE"] == "production"
    # secrets come from the Secret, never the ConfigMap
    secret = _by_kind("Secret")["llm-service"]["stringData"]
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"} <= set(secret)
    assert not {"SECRET_KEY", "DATABASE_URL"} & set(config)
    for d in deployments.values():
        env_from = d["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert {"configMapRef": {"name": "llm-service"}} in env_from
        assert {"secretRef": {"name": "llm-service"}} in env_from
    beat = deployments["llm-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    hpas = {h["spec"]["scaleTargetRef"]["name"] for h in _by_kind("HorizontalPodAutoscaler").values()}
    assert "llm-gateway" in hpas and "llm-beat" not in hpas
    # every PDB and Service selects pods that a Deployment makes
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]
    for pdb in _by_kind("PodDisruptionBudget").values():
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= lab.items() for lab in labels), pdb["metadata"]["name"]
    for svc in _by_kind("Service").values():
        assert any(svc["spec"]["selector"].items() <= lab.items() for lab in labels)


def _compose_schema() -> dict:
    pytest.importorskip("check_jsonschema")
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text())


def test_docker_compose_is_valid_against_compose_spec():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(doc, _compose_schema())


def test_docker_compose_has_every_role_and_dependencies_exist():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"lb", "gateway", "worker-async", "worker", "beat", "migrate", "postgres", "redis"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    assert services["gateway"]["environment"]["DJANGO_PROFILE"] == "production"
    assert "/readyz" in " ".join(services["gateway"]["healthcheck"]["test"])
    assert str(services["beat"]["deploy"]["replicas"]) == "1"
    assert "noeviction" in services["redis"]["command"]
    nginx = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert "server gateway:8000" in nginx


def test_compose_schema_rejects_a_broken_file():
    """The check has teeth: a typo in a key fails it."""
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    doc["services"]["gateway"]["helthcheck"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _compose_schema())


def test_k8s_schema_rejects_a_broken_manifest():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = _docs(K8S / "gateway.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
