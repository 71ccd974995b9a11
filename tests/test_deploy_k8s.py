"""`thfm deploy k8s`: manifests generated from a real exported repository, validated offline against
the Kubernetes API schemas (kubernetes-validate, strict) and the prometheus-operator CRD models
(cloudcoil), and checked for what they must do: probes on Triton's health endpoints, shared memory,
non-root, a headless Service selecting the pods, an HPA on the metric the adapter rules serve, which
a real tritonserver exports.

Not run here: a Kubernetes API server, the Prometheus adapter, Helm (no helm binary is available from
the package registries these machines reach).
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import PodMonitor

from serverfix import exported_repo, served_repo, start_server

K8S = "1.33"
THFM = [sys.executable, "-m", "thfm_serve.cli"]


@pytest.fixture(scope="module")
def repo(request, tmp_path_factory, tiny_checkpoint):
    return exported_repo(request.config, tmp_path_factory, tiny_checkpoint)


def _generate(repo, out, *extra):
    proc = subprocess.run(THFM + ["deploy", "k8s", "--repo", str(repo), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p for p in out.glob("[0-9][0-9]-*.yaml"))
    docs = [yaml.safe_load(p.read_text()) for p in files]
    assert list(yaml.safe_load_all((out / "all.yaml").read_text())) == docs
    return {d["kind"]: d for d in docs}, docs


def _validate(doc):
    if doc["kind"] == "PodMonitor":
        PodMonitor.model_validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S, strict=True)


@pytest.mark.parametrize("variant", [
    ("cpu", ["--repository-url", "s3://models/thfm-tiny"]),
    ("gpu", ["--gpu", "--repository-url", "gs://models/thfm-tiny", "--image", "registry.example/thfm-triton:1"]),
    ("pvc", ["--repository-url", "pvc", "--namespace", "vision", "--max-replicas", "8"]),
], ids=lambda v: v[0])
def test_manifests_are_valid_and_wired(repo, tmp_path, variant):
    name, extra = variant
    kinds, docs = _generate(repo, tmp_path / name, *extra)
    for doc in docs:
        _validate(doc)
    want = {"ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler", "PodMonitor", "ConfigMap",
            "PodDisruptionBudget"} | ({"PersistentVolumeClaim"} if name == "pvc" else set())
    assert set(kinds) == want

    dep = kinds["Deployment"]
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    args = c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # Triton's health endpoints on its HTTP port.
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert f"--http-port={ports['http']}" in args and f"--grpc-port={ports['grpc']}" in args
    assert f"--metrics-port={ports['metrics']}" in args
    # Shared memory for the python backend, memory-backed.
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and vols[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
    # Non-root, no escalation.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Resource requests grow with the exported weights (measured here from the files).
    weights = sum(p.stat().st_size for p in Path(repo).rglob("*.onnx*") if "polygraphy" not in p.parts)
    mem = _bytes(c["resources"]["requests"]["memory"])
    assert mem >= weights + (1 << 30) and c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"]
    assert mem >= _bytes(vols[shm[0]["name"]]["emptyDir"]["sizeLimit"])  # shm is charged to the pod's memory
    if name == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and "--allow-gpu-metrics=true" in args
        assert c["image"] == "registry.example/thfm-triton:1"
        assert any(e["name"] == "GOOGLE_APPLICATION_CREDENTIALS" for e in c["env"])
        assert "--model-repository=gs://models/thfm-tiny" in args
    else:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    if name == "cpu":
        assert "--model-repository=s3://models/thfm-tiny" in args and c["envFrom"][0]["secretRef"]["optional"]
    if name == "pvc":
        claim = kinds["PersistentVolumeClaim"]["metadata"]["name"]
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in vols.values())
        assert "--model-repository=/models" in args
        assert all(d["metadata"]["namespace"] == "vision" for d in docs)
        assert kinds["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 8

    # The headless Service selects exactly the Deployment's pods and exposes gRPC.
    svc = kinds["Service"]["spec"]
    labels = pod["metadata"]["labels"]
    assert svc["clusterIP"] == "None"
    assert svc["selector"].items() <= labels.items() and dep["spec"]["selector"]["matchLabels"] == svc["selector"]
    assert any(p["port"] == ports["grpc"] for p in svc["ports"])
    # PodMonitor scrapes the named metrics port of those pods.
    mon = kinds["PodMonitor"]["spec"]
    assert mon["selector"]["matchLabels"].items() <= labels.items()
    assert {e["port"] for e in mon["podMetricsEndpoints"]} == {"metrics"}
    # The HPA's metric is the one the adapter rules (ConfigMap and chart values) serve.
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert "replicas" not in dep["spec"] and hpa["minReplicas"] >= 1  # the HPA owns the count
    metric = hpa["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yaml"])["rules"]
    chart = yaml.safe_load((tmp_path / name / "prometheus-adapter-values.yaml").read_text())
    assert chart["rules"]["custom"] == rules
    assert [r["name"]["as"] for r in rules] == [metric]


def _bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", q)
    assert m, q
    return int(m.group(1)) << (20 if m.group(2) == "Mi" else 30)


def test_the_validators_reject_broken_manifests(repo, tmp_path):
    """The schema checks are not a formality: a wrong type, an unknown field and a bad CRD value fail."""
    kinds, _ = _generate(repo, tmp_path / "k")
    dep = yaml.safe_load(yaml.safe_dump(kinds["Deployment"]))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S, strict=True)
    svc = yaml.safe_load(yaml.safe_dump(kinds["Service"]))
    svc["spec"]["clusterIp"] = "None"  # misspelt: strict mode refuses unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S, strict=True)
    mon = yaml.safe_load(yaml.safe_dump(kinds["PodMonitor"]))
    mon["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(Exception, match="interval"):
        PodMonitor.model_validate(mon)

    from thfm_serve.deploy.validate import validate_documents
    from thfm_serve.errors import ThfmError

    with pytest.raises(ThfmError, match="containerPort"):
        validate_documents([dep])
    mon = yaml.safe_load(yaml.safe_dump(kinds["PodMonitor"]))
    mon["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    with pytest.raises(ThfmError, match="unknown fields"):
        validate_documents([mon])
    hpa = kinds["HorizontalPodAutoscaler"]
    cm = yaml.safe_load(yaml.safe_dump(kinds["ConfigMap"]))
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace("as: thfm_queue_compute_ratio", "as: other")
    with pytest.raises(ThfmError, match="do not serve the metric"):
        validate_documents([hpa, cm])


@pytest.mark.parametrize("args,message", [
    (["--repository-url", "ftp://x/y"], "expected s3://"),
    (["--name", "Bad_Name"], "not a Kubernetes name"),
    (["--replicas", "5", "--max-replicas", "2"], "--replicas"),
])
def test_bad_options_fail_with_a_clear_error(repo, tmp_path, args, message):
    proc = subprocess.run(THFM + ["deploy", "k8s", "--repo", str(repo), "--out", str(tmp_path / "o"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_not_a_repository(tmp_path):
    proc = subprocess.run(THFM + ["deploy", "k8s", "--repo", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr, proc.stderr


@pytest.mark.server
def test_a_real_tritonserver_exports_the_metrics_the_adapter_rules_use(request, tmp_path_factory, tiny_checkpoint,
                                                                       tmp_path):
    from thfm_serve.deploy.k8s import DeployOptions, adapter_rules

    repo = served_repo(request.config, tmp_path_factory, tiny_checkpoint)
    rules = adapter_rules(DeployOptions(repo=repo))
    names = set()
    for r in rules:
        names |= set(re.findall(r"(nv_[a-z_]+)\{", r["metricsQuery"]))
        model = re.search(r'model="([^"]+)"', r["metricsQuery"]).group(1)
    assert names
    srv = start_server(repo, tmp_path)
    try:
        text = urllib.request.urlopen(f"http://{srv.metrics_url}/metrics", timeout=10).read().decode()
    finally:
        srv.stop()
    for n in names:
        assert re.search(rf'^{n}\{{[^}}]*model="{model}"', text, re.M), f"{n} for model {model} not in /metrics"
