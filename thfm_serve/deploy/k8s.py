"""Kubernetes manifests for a fleet of tritonservers serving a THFM model repository.

`thfm deploy k8s --repo REPO --out DIR` reads the exported repository (its manifest, its models'
sizes and request limits) and writes plain manifests, one file per resource plus `all.yaml` with
every document:

- Deployment: NVIDIA's tritonserver image (a derived one that has thfm_serve installed, because the
  python-backend models import it; see model_repository/README.md), loading the repository from
  object storage (s3://, gs://) or a PersistentVolumeClaim; readiness, liveness and startup probes on
  Triton's own health endpoints; a memory-backed /dev/shm for the python backend (which moves tensors
  between processes through shared memory, and Docker's default 64 MiB is too small); requests from
  the exported models' sizes; non-root, no privilege escalation, no capabilities.
- Service, headless (clusterIP: None): DNS answers with one address per ready pod. gRPC keeps one
  HTTP/2 connection per channel, so through a ClusterIP every request of a client lands on the one pod
  its connection reached; with the headless name `thfm predict --url NAME:8001` and `thfm batch`
  expand the name into every pod (client/resolve.py) and spread the windows over them.
- HorizontalPodAutoscaler (autoscaling/v2) on a per-pod custom metric, `thfm_queue_compute_ratio`:
  the entry model's queue time over its compute time from Triton's metrics, served to the HPA by the
  Prometheus adapter with the rules written beside it (a ConfigMap for an adapter installed from
  manifests and a values file for its Helm chart).
- PodMonitor (prometheus-operator) scraping the metrics port; PodDisruptionBudget; a ServiceAccount
  that mounts no API token; a PersistentVolumeClaim when the repository lives on one.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thfm_serve.errors import ThfmError

logger = logging.getLogger(__name__)

# Triton 2.51 (the version this project serves with) ships in NVIDIA's 24.10 containers.
TRITON_BASE_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
DEFAULT_IMAGE = "thfm-triton:0.1.0"  # the derived image of model_repository/README.md
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
MOUNT = "/models"  # where a PVC-held repository is mounted
METRIC = "thfm_queue_compute_ratio"
TRITON_UID = 1000  # the triton-server user of NVIDIA's image
GiB, MiB = 1 << 30, 1 << 20
WEIGHT_SUFFIXES = (".onnx", ".data", ".plan", ".npz", ".safetensors", ".bin")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_URL = re.compile(r"^(s3|gs)://[^/\s]+(/\S*)?$")


@dataclass
class DeployOptions:
    repo: Path
    gpu: bool = False
    image: str = DEFAULT_IMAGE
    repository_url: str | None = None  # s3://..., gs://... or "pvc"; default: s3://CHANGE-ME/<repo name>
    name: str = "thfm-triton"
    namespace: str | None = None
    replicas: int = 1
    max_replicas: int = 4
    target_queue_ratio: float = 0.5  # scale out when requests wait half as long as they compute
    credentials_secret: str = "thfm-model-repository-credentials"
    pvc_size: str | None = None
    storage_class: str | None = None
    cpu: str | None = None
    labels: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not _NAME.match(self.name) or len(self.name) > 50:
            raise ThfmError(f"--name {self.name!r} is not a Kubernetes name (lowercase letters, digits, '-'; "
                            "at most 50 characters)")
        if self.namespace is not None and (not _NAME.match(self.namespace) or len(self.namespace) > 63):
            raise ThfmError(f"--namespace {self.namespace!r} is not a Kubernetes namespace name")
        if self.repository_url not in (None, "pvc") and not _URL.match(self.repository_url):
            raise ThfmError(f"--repository-url {self.repository_url!r}: expected s3://BUCKET/PATH, gs://BUCKET/PATH "
                            "or pvc")
        if not 1 <= self.replicas <= self.max_replicas:
            raise ThfmError(f"need 1 <= --replicas ({self.replicas}) <= --max-replicas ({self.max_replicas})")
        if not self.target_queue_ratio > 0:
            raise ThfmError(f"--target-queue-ratio must be > 0, got {self.target_queue_ratio}")
        if not self.image or any(c.isspace() for c in self.image):
            raise ThfmError(f"--image {self.image!r} is not an image reference")


@dataclass
class RepoFacts:
    """What the manifests need to know about the exported repository."""

    target: str
    precision: str
    models: list[str]
    weight_bytes: int  # model files (ONNX, external data, engines, embeddings)
    total_bytes: int
    max_request_bytes: int
    max_in_flight: int


def read_repo(repo: Path) -> RepoFacts:
    from thfm_serve.repository import check_repository

    manifest = check_repository(repo)  # CheckpointError naming what is missing
    weights = total = 0
    for p in Path(repo).rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts:
            size = p.stat().st_size
            total += size
            if p.name.endswith(WEIGHT_SUFFIXES) and "polygraphy" not in p.parts:
                weights += size
    limits = manifest.get("limits") or {}
    return RepoFacts(target=manifest.get("target", "cpu"), precision=manifest.get("precision", "fp32"),
                     models=list(manifest.get("models", [])), weight_bytes=weights, total_bytes=total,
                     max_request_bytes=int(limits.get("max_request_bytes") or 256 * MiB),
                     max_in_flight=int(limits.get("max_in_flight") or 8))


def _quantity(n_bytes: int) -> str:
    """Bytes -> a Kubernetes quantity in whole MiB (or GiB when exact), rounded up."""
    mib = max(1, math.ceil(n_bytes / MiB))
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def sizing(facts: RepoFacts, gpu: bool) -> dict[str, int]:
    """Memory figures (bytes) derived from the repository.

    - shm: the python backend passes every request and response through /dev/shm; room for the
      requests in flight at the largest allowed request size, at least 1 GiB.
    - memory: on CPU every python model holds its onnxruntime session (the weights, once) and
      activations of the same order, so twice the weights; on a GPU the weights live in GPU memory and
      the host holds a staging copy while loading. Plus 2 GiB for tritonserver, the python stubs and
      decoding, plus the shm volume, which a memory-backed emptyDir charges to the container.
    - storage: tritonserver copies a repository from object storage to local disk before loading.
    """
    shm = max(GiB, 2 * facts.max_request_bytes * max(1, min(facts.max_in_flight, 4)))
    shm = int(math.ceil(shm / GiB) * GiB)
    working = facts.weight_bytes * (1 if gpu else 2) + 2 * GiB
    return {"shm": shm, "memory": working + shm, "storage": facts.total_bytes + GiB}


def _labels(opts: DeployOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": "thfm-triton", "app.kubernetes.io/instance": opts.name,
            "app.kubernetes.io/component": "inference", **opts.labels}


def _selector(opts: DeployOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": "thfm-triton", "app.kubernetes.io/instance": opts.name}


def _meta(opts: DeployOptions, name: str, **more) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels(opts)}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta.update(more)
    return meta


def _repository_location(opts: DeployOptions) -> str:
    if opts.repository_url == "pvc":
        return MOUNT
    return opts.repository_url or f"s3://CHANGE-ME/{Path(opts.repo).resolve().name}"


def _probe(path: str, period: int, failures: int, initial: int = 0) -> dict[str, Any]:
    probe: dict[str, Any] = {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
                             "timeoutSeconds": 5, "failureThreshold": failures}
    if initial:
        probe["initialDelaySeconds"] = initial
    return probe


def deployment(opts: DeployOptions, facts: RepoFacts) -> dict[str, Any]:
    size = sizing(facts, opts.gpu)
    location = _repository_location(opts)
    args = [
        f"--model-repository={location}",
        f"--http-port={HTTP_PORT}", f"--grpc-port={GRPC_PORT}", f"--metrics-port={METRICS_PORT}",
        "--model-control-mode=none",
        # Not ready until every model has loaded, and a model that fails to load stops the pod, so a
        # broken repository shows as a crash loop instead of a pod that answers with errors.
        "--strict-readiness=true", "--exit-on-error=true",
        "--allow-metrics=true", f"--allow-gpu-metrics={'true' if opts.gpu else 'false'}",
        "--allow-cpu-metrics=true",
    ]
    env: list[dict[str, Any]] = []
    env_from: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity(size["shm"])}},
        {"name": "tmp", "emptyDir": {"sizeLimit": _quantity(size["storage"])}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    if location.startswith("s3://"):
        # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION (and AWS_ENDPOINT_URL for
        # S3-compatible stores) from a Secret; optional, so IRSA or node roles work without it.
        env_from.append({"secretRef": {"name": opts.credentials_secret, "optional": True}})
    elif location.startswith("gs://"):
        volumes.append({"name": "gcs-credentials", "secret": {"secretName": opts.credentials_secret,
                                                                 "optional": True}})
        mounts.append({"name": "gcs-credentials", "mountPath": "/var/secrets/gcs", "readOnly": True})
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/gcs/key.json"})
    else:
        volumes.append({"name": "model-repository",
                        "persistentVolumeClaim": {"claimName": f"{opts.name}-repository", "readOnly": True}})
        mounts.append({"name": "model-repository", "mountPath": MOUNT, "readOnly": True})
    requests = {"cpu": opts.cpu or ("2" if opts.gpu else "4"), "memory": _quantity(size["memory"]),
                "ephemeral-storage": _quantity(size["storage"])}
    # Memory limit = request: a pod is never killed for memory the scheduler did not reserve. No
    # CPU limit: CFS throttling only adds latency to a server that is already the bottleneck.
    limits: dict[str, str] = {"memory": requests["memory"]}
    if opts.gpu:
        requests["nvidia.com/gpu"] = "1"
        limits["nvidia.com/gpu"] = "1"
    container: dict[str, Any] = {
        "name": "tritonserver",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["tritonserver"],
        "args": args,
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        # Startup: downloading and loading a 1.3B repository takes minutes; allow up to 20 minutes
        # before liveness starts counting.
        "startupProbe": _probe("/v2/health/ready", 10, 120),
        "readinessProbe": _probe("/v2/health/ready", 5, 3),
        "livenessProbe": _probe("/v2/health/live", 10, 6),
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": TRITON_UID,
                            "runAsGroup": TRITON_UID, "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": mounts,
    }
    if env:
        container["env"] = env
    if env_from:
        container["envFrom"] = env_from
    pod_spec: dict[str, Any] = {
        "serviceAccountName": opts.name,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": TRITON_UID, "runAsGroup": TRITON_UID,
                            "fsGroup": TRITON_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        # tritonserver finishes the requests in flight on SIGTERM; give a CPU window time to finish.
        "terminationGracePeriodSeconds": 120,
        "containers": [container],
        "volumes": volumes,
    }
    if opts.gpu:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    annotations = {"thfm.dev/repository-target": facts.target, "thfm.dev/repository-precision": facts.precision,
                   "thfm.dev/model-bytes": str(facts.weight_bytes)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(opts, opts.name, annotations=annotations),
        "spec": {
            # No `replicas`: the HPA owns the count (minReplicas); a replicas field here would reset
            # it to that number on every `kubectl apply`.
            "selector": {"matchLabels": _selector(opts)},
            # Never below the current capacity during a rollout: new pods load their models first.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": _labels(opts)}, "spec": pod_spec},
        },
    }


def headless_service(opts: DeployOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(opts, opts.name),
        "spec": {
            "clusterIP": "None",
            # Only ready pods are in DNS: a client never gets a pod that is still loading.
            "publishNotReadyAddresses": False,
            "selector": _selector(opts),
            "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                      {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                      {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


def autoscaler(opts: DeployOptions) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(opts, opts.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": opts.name},
            "minReplicas": opts.replicas,
            "maxReplicas": opts.max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": METRIC},
                "target": {"type": "AverageValue", "averageValue": f"{round(opts.target_queue_ratio * 1000)}m"},
            }}],
            "behavior": {
                # A new pod needs minutes to load its models: scale out at once, in slowly.
                "scaleUp": {"stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
                "scaleDown": {"stabilizationWindowSeconds": 600,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]},
            },
        },
    }


def adapter_rules(opts: DeployOptions) -> list[dict[str, Any]]:
    """prometheus-adapter custom-metrics rules: per pod, the entry model's queue time over its compute
    time over the last 2 minutes (both Triton counters in microseconds)."""
    model = 'model="thfm"'
    queue = f"sum(rate(nv_inference_queue_duration_us{{<<.LabelMatchers>>,{model}}}[2m])) by (<<.GroupBy>>)"
    compute = f"sum(rate(nv_inference_compute_infer_duration_us{{<<.LabelMatchers>>,{model}}}[2m])) by (<<.GroupBy>>)"
    return [{
        "seriesQuery": f'nv_inference_queue_duration_us{{namespace!="",pod!="",{model}}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": "^nv_inference_queue_duration_us$", "as": METRIC},
        # An idle pod computes nothing: clamp the divisor so the ratio is 0, not NaN.
        "metricsQuery": f"{queue} / clamp_min({compute}, 1)",
    }]


def adapter_configmap(opts: DeployOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(opts, f"{opts.name}-adapter-rules"),
        "data": {"config.yaml": to_yaml({"rules": adapter_rules(opts)})},
    }


def adapter_helm_values(opts: DeployOptions) -> dict[str, Any]:
    """Values for the prometheus-community/prometheus-adapter chart."""
    return {"rules": {"default": False, "custom": adapter_rules(opts)}}


def pod_monitor(opts: DeployOptions) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(opts, opts.name),
        "spec": {
            "selector": {"matchLabels": _selector(opts)},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def disruption_budget(opts: DeployOptions) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(opts, opts.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(opts)}},
    }


def service_account(opts: DeployOptions) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(opts, opts.name),
            "automountServiceAccountToken": False}


def repository_claim(opts: DeployOptions, facts: RepoFacts) -> dict[str, Any]:
    spec: dict[str, Any] = {
        # Read by every replica at once.
        "accessModes": ["ReadOnlyMany"],
        "resources": {"requests": {"storage": opts.pvc_size or _quantity(facts.total_bytes + GiB)}},
    }
    if opts.storage_class:
        spec["storageClassName"] = opts.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(opts, f"{opts.name}-repository"), "spec": spec}


def manifests(opts: DeployOptions) -> list[dict[str, Any]]:
    """Every resource, in the order `kubectl apply -f all.yaml` should create them."""
    opts.validate()
    facts = read_repo(Path(opts.repo))
    if opts.gpu and facts.target != "gpu":
        logger.warning("%s is a %r repository: its models run on CPU (python backend + onnxruntime) even in a "
                       "GPU pod; export with --target gpu for TensorRT", opts.repo, facts.target)
    docs = [service_account(opts)]
    if opts.repository_url == "pvc":
        docs.append(repository_claim(opts, facts))
    docs += [deployment(opts, facts), headless_service(opts), disruption_budget(opts), autoscaler(opts),
             pod_monitor(opts), adapter_configmap(opts)]
    return docs


def _dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        # Multi-line strings (the adapter's config.yaml) as literal blocks, readable in the file.
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return Dumper


def to_yaml(doc: Any) -> str:
    import yaml

    return yaml.dump(doc, Dumper=_dumper(), sort_keys=False, width=120)


def write_manifests(opts: DeployOptions, out: str | Path, docs: list[dict[str, Any]] | None = None) -> list[Path]:
    """One YAML file per resource (NN-kind-name.yaml), all.yaml with every document, and the
    prometheus-adapter chart values; returns the paths written. docs: manifests(opts), when the
    caller already has them."""
    docs = manifests(opts) if docs is None else docs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = out / f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        path.write_text(to_yaml(doc))
        paths.append(path)
    all_path = out / "all.yaml"
    all_path.write_text("---\n".join(to_yaml(d) for d in docs))
    values = out / "prometheus-adapter-values.yaml"
    values.write_text("# helm install prometheus-adapter prometheus-community/prometheus-adapter -f THIS_FILE\n"
                      + to_yaml(adapter_helm_values(opts)))
    summary = out / "deploy.json"
    summary.write_text(json.dumps({"resources": [f"{d['kind']}/{d['metadata']['name']}" for d in docs],
                                   "headless_service": f"{opts.name}:{GRPC_PORT}", "metric": METRIC,
                                   "sizing": sizing(read_repo(Path(opts.repo)), opts.gpu)}, indent=2) + "\n")
    return paths + [all_path, values, summary]
