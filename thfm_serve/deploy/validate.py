"""Offline checks of generated manifests.

- Built-in kinds (Deployment, Service, HPA, ...): kubernetes-validate, which bundles the Kubernetes
  API's JSON schemas, in strict mode (unknown fields are errors).
- PodMonitor (a prometheus-operator CRD): the pydantic models cloudcoil generates from the CRD's
  OpenAPI schema check types, enums and patterns; they ignore unknown fields, so a field the model
  drops on a round trip is reported as unknown here.
- The prometheus-adapter rules (its own config format, no published schema): structural checks.
"""

from __future__ import annotations

from typing import Any

from thfm_serve.errors import ThfmError

K8S_VERSION = "1.33"  # the API version the manifests are checked against (any 1.23+ serves these kinds)
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}


def _strip_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_strip_none(v) for v in obj]
    return obj


def validate_builtin(doc: dict, version: str = K8S_VERSION) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.absolute_path)
        raise ThfmError(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {path}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise ThfmError(e.message) from None


def validate_pod_monitor(doc: dict) -> None:
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor
    from pydantic import ValidationError

    try:
        model = PodMonitor.model_validate(doc)
    except ValidationError as e:
        raise ThfmError(f"PodMonitor/{doc.get('metadata', {}).get('name')}: {e}") from None
    back = _strip_none(model.model_dump(by_alias=True, mode="json"))
    unknown = _dropped(doc, back)
    if unknown:
        raise ThfmError(f"PodMonitor/{doc.get('metadata', {}).get('name')}: unknown fields {unknown}")


def _dropped(a: Any, b: Any, path: str = "") -> list[str]:
    """Keys of a that are missing in b (recursively)."""
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k, v in a.items():
            if k not in b:
                out.append(f"{path}{k}")
            else:
                out += _dropped(v, b[k], f"{path}{k}.")
    elif isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            out += _dropped(x, y, f"{path}{i}.")
    return out


def validate_adapter_rules(rules: Any, metric: str) -> None:
    if not isinstance(rules, list) or not rules:
        raise ThfmError("prometheus-adapter rules: expected a non-empty list")
    names = []
    for i, r in enumerate(rules):
        for key in ("seriesQuery", "metricsQuery", "resources", "name"):
            if key not in r:
                raise ThfmError(f"prometheus-adapter rule {i}: missing {key!r}")
        unknown = set(r) - {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}
        if unknown:
            raise ThfmError(f"prometheus-adapter rule {i}: unknown keys {sorted(unknown)}")
        q = r["metricsQuery"]
        for placeholder in ("<<.LabelMatchers>>", "<<.GroupBy>>"):
            if placeholder not in q:
                raise ThfmError(f"prometheus-adapter rule {i}: metricsQuery lacks {placeholder}")
        if q.count("(") != q.count(")") or q.count("{") != q.count("}"):
            raise ThfmError(f"prometheus-adapter rule {i}: unbalanced brackets in metricsQuery")
        over = r["resources"].get("overrides", {})
        if over.get("pod", {}).get("resource") != "pod" or over.get("namespace", {}).get("resource") != "namespace":
            raise ThfmError(f"prometheus-adapter rule {i}: must map the pod and namespace labels to resources")
        names.append(r["name"].get("as"))
    if metric not in names:
        raise ThfmError(f"prometheus-adapter rules do not serve the metric {metric!r} (they serve {names})")


def validate_documents(docs: list[dict], version: str = K8S_VERSION) -> list[str]:
    """Validate every document; returns one line per document saying how it was checked."""
    import yaml

    report = []
    hpa_metrics = [m["pods"]["metric"]["name"] for d in docs if d.get("kind") == "HorizontalPodAutoscaler"
                   for m in d["spec"].get("metrics", []) if m.get("type") == "Pods"]
    for doc in docs:
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        if (doc.get("apiVersion"), kind) in CRD_KINDS:
            validate_pod_monitor(doc)
            report.append(f"{kind}/{name}: CRD model (prometheus-operator)")
            continue
        validate_builtin(doc, version)
        report.append(f"{kind}/{name}: Kubernetes {version} schema (strict)")
        if kind == "ConfigMap" and "config.yaml" in doc.get("data", {}):
            rules = yaml.safe_load(doc["data"]["config.yaml"]).get("rules")
            for metric in hpa_metrics:
                validate_adapter_rules(rules, metric)
            report.append(f"{kind}/{name}: prometheus-adapter rules (structure; serve {', '.join(hpa_metrics)})")
    return report
