"""The Kubernetes manifests and the Dockerfile agree with the code; split from test_triton_repo.py."""

from __future__ import annotations

import yaml
from triton_fakes import ROOT

# --- Kubernetes manifests ---------------------------------------------------------------------------------

DEPLOY = ROOT / "deploy"


def _manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and {"apiVersion", "kind"} <= set(doc), path
            # kustomize's own file is the one object without a name.
            assert doc["kind"] == "Kustomization" or doc["metadata"]["name"], path
            docs[doc["kind"]] = doc
    return docs


def test_manifests_have_the_required_fields():
    docs = _manifests()
    assert {k: d["apiVersion"] for k, d in docs.items()} == {
        "ConfigMap": "v1", "Deployment": "apps/v1", "HorizontalPodAutoscaler": "autoscaling/v2",
        "Kustomization": "kustomize.config.k8s.io/v1beta1", "PersistentVolumeClaim": "v1",
        "PodMonitor": "monitoring.coreos.com/v1", "Service": "v1"}
    dep = docs["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [container] = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:") and container["image"].endswith("-py3")
    assert "--model-repository=/models" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert mounts["model-repository"] == "/models" and mounts["dshm"] == "/dev/shm" and set(mounts) == set(volumes)
    assert volumes["model-repository"]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"][
        "metadata"]["name"]

    svc = docs["Service"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]} == {8000: "http", 8001: "grpc", 8002: "metrics"}
    assert docs["PodMonitor"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"

    kustomize = docs["Kustomization"]
    assert all((DEPLOY / r).is_file() for r in kustomize["resources"])


def test_hpa_scales_on_the_adapter_metric():
    docs = _manifests()
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": docs["Deployment"]["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    [rule] = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"] == "avg_time_queue_us"
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us")
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= set(
        w.split("{")[0] for w in rule["metricsQuery"].replace("(", " ").split() if w.startswith("nv_"))
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_dockerfile_and_readme_agree_with_the_code():
    from export.serve import BACKEND_REQUIREMENTS, NGC_TAG

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"TRITON_TAG={NGC_TAG}" in dockerfile and all(r.split("<")[0] in dockerfile for r in BACKEND_REQUIREMENTS)
    assert f"tritonserver:{NGC_TAG}-py3" in (DEPLOY / "deployment.yaml").read_text()
    readme = (DEPLOY / "README.md").read_text()
    for name in ("deployment.yaml", "hpa.yaml", "prometheus-adapter-rules.yaml", "avg_time_queue_us", "replicas"):
        assert name in readme
