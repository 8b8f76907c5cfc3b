#!/usr/bin/env python3
"""Checks behind scripts/check-deploy (run it through that script, which sets up
the tools: it calls `python scripts/check_deploy.py <check>` once per check and
reports PASS/FAIL from the exit code).

Checks:
  chart        helm lint --strict + render + kubernetes-validate --strict for every
               values file, CRD objects' required fields, restricted PSS, cross-object
               references, values.schema.json coverage, chart guard rails
  argocd       AppProject/Application fields; every Application's chart path and
               valueFiles exist, render, validate, and only use kinds the project allows
  alerts-sync  deploy/prometheus/alerts.yaml == the chart's PrometheusRule groups
  gen-alerts   rewrite deploy/prometheus/alerts.yaml from the chart
  dashboard    dashboard JSON: copies byte-identical, datasource only via variable,
               every variable used is defined
  dockerfile   COPY sources exist, binary name matches Cargo.toml, non-root, exec-form
               HEALTHCHECK, every path Cargo needs is in the build context
  queries      the live check: service + real Prometheus, every dashboard/alert/
               recording/analysis/adapter query runs and uses only scraped metrics
  config       the service binary starts with the environment every values file
               gives the pod, answers /livez, and exits 0 on SIGTERM; the Ingress
               paths answer, and the chart's public paths = its OpenAPI paths + /docs
"""
from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fibonacci-api"
DASHBOARD = CHART / "dashboards" / "fibonacci-api.json"
DASHBOARD_COPY = ROOT / "grafana" / "dashboards" / "fibonacci-api.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = [ROOT / "deploy" / "prometheus" / "alerts_test.yaml",
               ROOT / "deploy" / "prometheus" / "alerts_longterm_test.yaml"]
VENV_BIN = Path(sys.executable).parent

# Kubernetes versions whose schemas every rendered object must satisfy: the
# chart's kubeVersion floor, a middle one, and the newest the installed
# kubernetes-validate knows (1.25..1.37 for kubernetes-validate 1.37.0).
K8S_VERSIONS = ["1.30.0", "1.33.0", "1.37.0"]

# The values files the chart is linted, rendered and validated with. The
# release/namespace pair matches how the ArgoCD Applications deploy it.
VALUES_FILES = {
    "default": None,
    "staging": CHART / "values-staging.yaml",
    "production": CHART / "values-production.yaml",
    "all-features": CHART / "ci" / "all-features-values.yaml",
    "external-redis": CHART / "ci" / "external-redis-values.yaml",
    "external-redis-cluster": CHART / "ci" / "external-redis-cluster-values.yaml",
    "keda-linkerd": CHART / "ci" / "keda-linkerd-values.yaml",
    "linkerd": CHART / "ci" / "linkerd-values.yaml",
    "chaos": CHART / "ci" / "chaos-values.yaml",
}

CRD_KINDS = {
    ("monitoring.coreos.com", "ServiceMonitor"),
    ("monitoring.coreos.com", "PrometheusRule"),
    ("argoproj.io", "Rollout"),
    ("argoproj.io", "AnalysisTemplate"),
    ("argoproj.io", "Application"),
    ("argoproj.io", "AppProject"),
    ("argoproj.io", "ApplicationSet"),
    ("monitoring.coreos.com", "AlertmanagerConfig"),
    ("keda.sh", "ScaledObject"),
    ("security.istio.io", "PeerAuthentication"),
    ("security.istio.io", "AuthorizationPolicy"),
    ("external-secrets.io", "ExternalSecret"),
    ("external-secrets.io", "ClusterSecretStore"),
    ("chaos-mesh.org", "Schedule"),
}
CHAOS_SCHEMA = ROOT / "deploy" / "schemas" / "chaos-mesh.org_v1alpha1_schedule.json"

# Metrics that dashboards and alerts may use although the service does not
# export them: they come from the cluster, so the live check cannot scrape them.
#   up          Prometheus' own per-target series
#   kube_*      kube-state-metrics (HPA replicas, pod readiness, restarts)
#   container_* cAdvisor via the kubelet (CPU throttling)
EXTERNAL_METRIC_NAMES = {"up"}
EXTERNAL_METRIC_PREFIXES = ("kube_", "container_")
# Labels Prometheus (or the Prometheus Operator) attaches to scraped series;
# the live check's scrape config sets namespace and pod statically.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container",
                 "rollouts_pod_template_hash"}


class CheckFailed(Exception):
    pass


def fail(msg: str) -> None:
    raise CheckFailed(msg)


def info(msg: str) -> None:
    print(f"  {msg}", flush=True)


# --------------------------------------------------------------------------- YAML


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate mapping keys (Kubernetes' strict
    decoding does too, and PyYAML would silently keep the last one)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_all(text: str, where: str) -> list[dict]:
    try:
        return [d for d in yaml.load_all(text, Loader=UniqueKeyLoader) if d]
    except yaml.YAMLError as e:
        fail(f"{where}: invalid YAML: {e}")
    return []


def load_file(path: Path) -> dict:
    docs = load_all(path.read_text(), str(path.relative_to(ROOT)))
    return docs[0] if docs else {}


# --------------------------------------------------------------------------- helm


def helm():
    import helm_python  # noqa: PLC0415 (installed in the venv by check-deploy)
    return helm_python


def values_of(name: str) -> dict:
    path = VALUES_FILES[name]
    return load_file(path) if path else {}


def render(values: dict, release: str = "fibonacci-api", namespace: str = "fibonacci-api",
           chart: Path = CHART) -> tuple[list[dict], str]:
    """Render like `helm template`; returns (objects, NOTES.txt)."""
    with helm().Chart.load(str(chart)) as c:
        out = c.render(values, name=release, namespace=namespace, is_install=True)
    objects, notes = [], ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in load_all(text, path):
            doc.setdefault("__source", path)
            objects.append(doc)
    return objects, notes


HELPERS_TEMPLATE = "zz-check-deploy-helpers.yaml"


def chart_helpers(values: dict) -> dict:
    """What named templates of the chart's _helpers.tpl give for these values, as Helm
    renders them (a copy of the chart with one more template printing them), so the
    checks compare against the chart's own definitions rather than a copy of them:
    publicPaths (the service's public paths, which ingress.paths may route) and
    managedEnv (the variables extraEnv may not set)."""
    with tempfile.TemporaryDirectory(prefix="check-deploy-helpers-") as tmp:
        chart = Path(tmp) / CHART.name
        shutil.copytree(CHART, chart)
        (chart / "templates" / HELPERS_TEMPLATE).write_text(
            '{{ dict "publicPaths" (include "fibonacci-api.publicPaths" . | fromJsonArray)'
            ' "managedEnv" (include "fibonacci-api.managedEnv" . | fromJson) | toJson }}\n')
        objects, _ = render(values, chart=chart)
    return next(strip_source(o) for o in objects if o["__source"].endswith("/" + HELPERS_TEMPLATE))


def check_managed_env(label: str, values: dict, objects: list[dict]) -> None:
    """Every variable the chart itself gives the API container (its ConfigMap and its
    env list, less the values file's extraEnv) is one fibonacci-api.managedEnv lists:
    a variable added to the pod spec is refused in extraEnv too."""
    managed = chart_helpers(values)["managedEnv"]
    workload = next(o for o in objects if o["kind"] in ("Deployment", "Rollout")
                    and dig(o, "spec", "template", "metadata", "labels", "app.kubernetes.io/component") == "api")
    container = workload["spec"]["template"]["spec"]["containers"][0]
    names = {e["name"] for e in container.get("env", [])} - {e["name"] for e in values.get("extraEnv") or []}
    for ef in container.get("envFrom", []):
        cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ef["configMapRef"]["name"])
        names |= set(cm["data"])
    missing = sorted(names - set(managed))
    need(not missing, workload, f"{label}: the chart sets {', '.join(missing)} in the API container, but "
                                "fibonacci-api.managedEnv (_helpers.tpl) does not list it: extraEnv could override it")


def strip_source(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__source"}


def group_of(obj: dict) -> str:
    api = obj.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def kid(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} ({obj.get('__source', '?')})"


def lint(values: dict, label: str) -> None:
    for kv in K8S_VERSIONS:
        report = helm().lint(str(CHART), values, strict=True, kube_version=f"v{kv}",
                             namespace="fibonacci-api")
        bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        if bad or report.get("errors"):
            fail(f"helm lint --strict ({label}, k8s {kv}): "
                 + "; ".join(f"{m.get('path')}: {m.get('error')}" for m in bad)
                 + " ".join(report.get("errors") or []))


def kubernetes_validate(objects: list[dict], label: str) -> int:
    """kubernetes-validate --strict (its own CLI) on every non-CRD object, for
    every version in K8S_VERSIONS. Returns the number of objects validated."""
    core = [strip_source(o) for o in objects if (group_of(o), o.get("kind")) not in CRD_KINDS]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, obj in enumerate(core):
            f = Path(tmp) / f"{i:03d}-{obj['kind']}-{obj['metadata']['name']}.yaml"
            f.write_text(yaml.safe_dump(obj))
            files.append(str(f))
        cmd = [str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet"]
        for kv in K8S_VERSIONS:
            cmd += ["-k", kv]
        proc = subprocess.run(cmd + files, capture_output=True, text=True)
        if proc.returncode != 0 or "ERROR" in proc.stdout or "WARN" in proc.stdout:
            fail(f"kubernetes-validate --strict ({label}):\n{proc.stdout}{proc.stderr}")
    return len(core)


# --------------------------------------------------------------------------- CRD checks

DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def need(cond, obj, msg):
    if not cond:
        fail(f"{kid(obj)}: {msg}")


def dig(obj, *path, default=None):
    cur = obj
    for p in path:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
            cur = cur[p]
        else:
            return default
    return cur


def check_pod_template_spec(obj, tmpl):
    need(isinstance(tmpl, dict), obj, "spec.template missing")
    containers = dig(tmpl, "spec", "containers")
    need(isinstance(containers, list) and containers, obj, "spec.template.spec.containers missing")
    for c in containers:
        need(c.get("name") and c.get("image"), obj, "every container needs name and image")


def check_rule_groups(obj, groups, where):
    need(isinstance(groups, list) and groups, obj, f"{where}: groups must be a non-empty list")
    names = set()
    for g in groups:
        need(isinstance(g.get("name"), str) and g["name"], obj, f"{where}: every group needs a name")
        need(g["name"] not in names, obj, f"{where}: duplicate group {g['name']}")
        names.add(g["name"])
        need(isinstance(g.get("rules"), list) and g["rules"], obj, f"{where}: group {g['name']} has no rules")
        for r in g["rules"]:
            need(("alert" in r) != ("record" in r), obj, f"{where}: a rule needs exactly one of alert/record: {r}")
            need(isinstance(r.get("expr"), str) and r["expr"].strip(), obj, f"{where}: rule without expr: {r}")
            if "for" in r:
                need(DURATION.match(str(r["for"])), obj, f"{where}: bad 'for' {r['for']!r}")
            if "alert" in r:
                labels, ann = r.get("labels") or {}, r.get("annotations") or {}
                need(labels.get("severity") in ("critical", "warning", "info"), obj,
                     f"{where}: alert {r['alert']} needs severity critical|warning|info")
                for a in ("summary", "description", "runbook_url"):
                    need(ann.get(a), obj, f"{where}: alert {r['alert']} needs annotation {a}")
                need(str(ann["runbook_url"]).startswith("http"), obj, f"{where}: {r['alert']} runbook_url not a URL")


def check_crd_object(obj: dict, all_objects: list[dict]) -> None:
    """Required fields of the CRD kinds, as their controllers would reject them."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    md = obj.get("metadata") or {}
    need(md.get("name") and DNS1123.match(md["name"]), obj, "metadata.name missing or not DNS-1123")
    need(isinstance(spec, dict) and spec, obj, "spec missing")
    if kind == "ServiceMonitor":
        need(obj["apiVersion"] == "monitoring.coreos.com/v1", obj, "apiVersion must be monitoring.coreos.com/v1")
        need(isinstance(spec.get("selector"), dict), obj, "spec.selector required")
        eps = spec.get("endpoints")
        need(isinstance(eps, list) and eps, obj, "spec.endpoints must be a non-empty list")
        for ep in eps:
            need(ep.get("port") or ep.get("targetPort"), obj, "every endpoint needs port or targetPort")
            for k in ("interval", "scrapeTimeout"):
                if k in ep:
                    need(DURATION.match(str(ep[k])), obj, f"endpoint {k} {ep[k]!r} is not a duration")
    elif kind == "PrometheusRule":
        need(obj["apiVersion"] == "monitoring.coreos.com/v1", obj, "apiVersion must be monitoring.coreos.com/v1")
        check_rule_groups(obj, spec.get("groups"), "spec")
    elif kind == "Rollout":
        need(obj["apiVersion"] == "argoproj.io/v1alpha1", obj, "apiVersion must be argoproj.io/v1alpha1")
        need(isinstance(dig(spec, "selector", "matchLabels"), dict), obj, "spec.selector.matchLabels required")
        check_pod_template_spec(obj, spec.get("template"))
        tlabels = dig(spec, "template", "metadata", "labels") or {}
        for k, v in spec["selector"]["matchLabels"].items():
            need(tlabels.get(k) == v, obj, f"selector {k}={v} does not match the pod template labels")
        canary = dig(spec, "strategy", "canary")
        need(isinstance(canary, dict) or isinstance(dig(spec, "strategy", "blueGreen"), dict), obj,
             "spec.strategy.canary or blueGreen required")
        if canary:
            need(isinstance(canary.get("steps"), list) and canary["steps"], obj, "canary.steps must be non-empty")
            for t in dig(canary, "analysis", "templates", default=[]) or []:
                name = t.get("templateName")
                need(any(o.get("kind") == "AnalysisTemplate" and o["metadata"]["name"] == name for o in all_objects),
                     obj, f"analysis template {name} is not rendered")
    elif kind == "AnalysisTemplate":
        need(obj["apiVersion"] == "argoproj.io/v1alpha1", obj, "apiVersion must be argoproj.io/v1alpha1")
        metrics = spec.get("metrics")
        need(isinstance(metrics, list) and metrics, obj, "spec.metrics must be a non-empty list")
        declared = {a.get("name") for a in spec.get("args") or []}
        for m in metrics:
            need(m.get("name"), obj, "every metric needs a name")
            prov = m.get("provider") or {}
            need(len(prov) == 1, obj, f"metric {m.get('name')} needs exactly one provider")
            if "prometheus" in prov:
                need(dig(prov, "prometheus", "address") and dig(prov, "prometheus", "query"), obj,
                     "prometheus provider needs address and query")
            used = set(re.findall(r"\{\{\s*args\.([A-Za-z0-9_-]+)\s*\}\}", json.dumps(m)))
            need(used <= declared, obj, f"metric {m['name']} uses undeclared args {used - declared}")
    elif kind == "Application":
        check_application(obj)
    elif kind == "AppProject":
        need(isinstance(spec.get("sourceRepos"), list) and spec["sourceRepos"], obj, "spec.sourceRepos required")
        need(isinstance(spec.get("destinations"), list) and spec["destinations"], obj, "spec.destinations required")
        for d in spec["destinations"]:
            need(d.get("server") or d.get("name"), obj, "every destination needs server or name")
            need(d.get("namespace"), obj, "every destination needs a namespace")
    elif kind == "ApplicationSet":
        need(isinstance(spec.get("generators"), list) and spec["generators"], obj, "spec.generators required")
        need(isinstance(spec.get("template"), dict), obj, "spec.template required")


def check_application(obj: dict) -> None:
    spec = obj.get("spec") or {}
    need(obj["apiVersion"] == "argoproj.io/v1alpha1", obj, "apiVersion must be argoproj.io/v1alpha1")
    need(spec.get("project"), obj, "spec.project required")
    sources = spec.get("sources") or ([spec["source"]] if spec.get("source") else [])
    need(sources, obj, "spec.source or spec.sources required")
    for s in sources:
        need(s.get("repoURL"), obj, "source.repoURL required")
        need(s.get("path") or s.get("chart") or s.get("ref"), obj, "source needs path, chart or ref")
        need(s.get("targetRevision"), obj, "source.targetRevision required (never track an implicit HEAD)")
    dest = spec.get("destination") or {}
    need(dest.get("server") or dest.get("name"), obj, "destination.server or name required")
    need(dest.get("namespace"), obj, "destination.namespace required")


# --------------------------------------------------------------------------- core-object checks

POD_KINDS = {"Deployment", "Rollout", "StatefulSet", "DaemonSet", "Job", "Pod"}


def pod_spec_of(obj):
    if obj.get("kind") == "Pod":
        return obj.get("spec") or {}, obj.get("metadata", {}).get("labels") or {}
    return dig(obj, "spec", "template", "spec") or {}, dig(obj, "spec", "template", "metadata", "labels") or {}


def check_restricted(obj: dict) -> None:
    """The restricted Pod Security Standard plus the chart's own hardening."""
    spec, _ = pod_spec_of(obj)
    psc = spec.get("securityContext") or {}
    need(spec.get("automountServiceAccountToken") is False, obj, "automountServiceAccountToken must be false")
    need(spec.get("enableServiceLinks") is False, obj, "enableServiceLinks must be false")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        need(sc.get("allowPrivilegeEscalation") is False, obj, f"{where}: allowPrivilegeEscalation must be false")
        need(sc.get("readOnlyRootFilesystem") is True, obj, f"{where}: readOnlyRootFilesystem must be true")
        need("ALL" in (dig(sc, "capabilities", "drop") or []), obj, f"{where}: capabilities must drop ALL")
        need(not dig(sc, "capabilities", "add"), obj, f"{where}: no capabilities may be added")
        need(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, obj, f"{where}: runAsNonRoot must be true")
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        need(uid is None or uid != 0, obj, f"{where}: runAsUser 0")
        seccomp = dig(sc, "seccompProfile", "type") or dig(psc, "seccompProfile", "type")
        need(seccomp in ("RuntimeDefault", "Localhost"), obj, f"{where}: seccompProfile RuntimeDefault required")
        res = c.get("resources") or {}
        need(dig(res, "requests", "cpu") and dig(res, "requests", "memory") and dig(res, "limits", "memory"), obj,
             f"{where}: requests (cpu, memory) and a memory limit are required")
        need(":latest" not in c["image"] and (":" in c["image"].split("/")[-1] or "@" in c["image"]), obj,
             f"{where}: image {c['image']} must be pinned")


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_references(objects: list[dict]) -> None:
    """What the API server cannot see: objects that point at each other."""
    by_kind: dict[str, list[dict]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    workloads = [o for o in objects if o["kind"] in ("Deployment", "Rollout")]
    pods = [(o, *pod_spec_of(o)) for o in objects if o["kind"] in POD_KINDS]

    for svc in by_kind.get("Service", []):
        sel = dig(svc, "spec", "selector") or {}
        targets = [(o, spec) for o, spec, labels in pods if o["kind"] != "Pod" and matches(sel, labels)]
        need(len(targets) == 1, svc, f"selector {sel} must select exactly one workload, got {len(targets)}")
        ports = {p.get("name") for c in targets[0][1]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort")
            need(not isinstance(tp, str) or tp in ports, svc, f"targetPort {tp} is not a container port")
    for o, spec, labels in pods:
        for c in spec.get("containers", []):
            ports = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = dig(c, probe, "httpGet", "port") or dig(c, probe, "tcpSocket", "port")
                need(port is None or not isinstance(port, str) or port in ports, o,
                     f"{probe} port {port} is not a container port")
            for ef in c.get("envFrom", []):
                cm = dig(ef, "configMapRef", "name")
                need(cm is None or ("ConfigMap", cm) in names, o, f"envFrom ConfigMap {cm} is not rendered")
        sa = spec.get("serviceAccountName")
        need(sa is None or ("ServiceAccount", sa) in names, o, f"serviceAccountName {sa} is not rendered")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        need((ref["kind"], ref["name"]) in names, hpa, f"scaleTargetRef {ref['kind']}/{ref['name']} is not rendered")
        need(not dig(next(o for o in objects if o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"]),
                     "spec", "replicas"), hpa, "the HPA's target sets spec.replicas: a sync would fight the HPA")
    for so in by_kind.get("ScaledObject", []):
        ref = so["spec"]["scaleTargetRef"]
        target = next((o for o in objects if o["kind"] == ref.get("kind", "Deployment") and o["metadata"]["name"] == ref["name"]), None)
        need(target, so, f"scaleTargetRef {ref.get('kind')}/{ref['name']} is not rendered")
        need(not dig(target, "spec", "replicas"), so, "the ScaledObject's target sets spec.replicas: a sync would fight KEDA")
        need(not [h for h in by_kind.get("HorizontalPodAutoscaler", []) if h["spec"]["scaleTargetRef"]["name"] == ref["name"]], so,
             "an HPA and a ScaledObject (which makes its own HPA) scale the same workload")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = dig(pdb, "spec", "selector", "matchLabels")
        need(any(matches(sel, labels) for o, _, labels in pods if o["kind"] != "Pod"), pdb, "selects no pods")
    for np in by_kind.get("NetworkPolicy", []):
        sel = dig(np, "spec", "podSelector", "matchLabels")
        need(any(matches(sel, labels) for o, _, labels in pods if o["kind"] != "Pod"), np, "selects no pods")
    for ing in by_kind.get("Ingress", []):
        for rule in ing["spec"].get("rules", []):
            for p in dig(rule, "http", "paths", default=[]):
                svc = dig(p, "backend", "service", "name")
                need(("Service", svc) in names, ing, f"backend Service {svc} is not rendered")
    for sm in by_kind.get("ServiceMonitor", []):
        sel = dig(sm, "spec", "selector", "matchLabels")
        svcs = [s for s in by_kind.get("Service", []) if matches(sel, s["metadata"].get("labels"))]
        need(len(svcs) == 1, sm, f"selector must match exactly one Service, got {len(svcs)}")
        ports = {p.get("name") for p in svcs[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            need(ep.get("port") in ports, sm, f"endpoint port {ep.get('port')} is not a Service port")
    for cm in by_kind.get("ConfigMap", []):
        if cm["metadata"]["name"].endswith("-dashboard"):
            need(cm["metadata"]["labels"].get("grafana_dashboard") == "1", cm, "dashboard ConfigMap needs grafana_dashboard: \"1\"")
            data = cm.get("data", {}).get("fibonacci-api.json")
            need(data is not None, cm, "dashboard ConfigMap has no fibonacci-api.json")
            need(json.loads(data) == json.loads(DASHBOARD.read_text()), cm,
                 "dashboard ConfigMap content differs from dashboards/fibonacci-api.json")
    # The checksum annotation rolls the pods when the ConfigMap changes.
    for w in workloads:
        if not any("configMapRef" in ef for c in dig(w, "spec", "template", "spec", "containers") for ef in c.get("envFrom", [])):
            continue
        ann = dig(w, "spec", "template", "metadata", "annotations") or {}
        need(re.fullmatch(r"[0-9a-f]{64}", ann.get("checksum/config", "")), w, "checksum/config annotation missing")
        spec = dig(w, "spec", "template", "spec")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        cmname = next(ef["configMapRef"]["name"] for ef in spec["containers"][0]["envFrom"] if "configMapRef" in ef)
        cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cmname)
        drain = int(cm["data"].get("SHUTDOWN_DRAIN_SECONDS", 5))
        deadline = -(-int(cm["data"].get("REQUEST_TIMEOUT_MS", 10000)) // 1000)
        pre = dig(spec["containers"][0], "lifecycle", "preStop", "sleep", "seconds") or 0
        need(grace >= pre + drain + deadline, w,
             f"terminationGracePeriodSeconds {grace} < preStop {pre} + drain {drain} + request deadline {deadline}")


ADMIN_PATHS = ("/metrics", "/livez", "/readyz")


def ingress_routes(path: str, path_type: str, target: str) -> bool:
    """Whether an Ingress path of this type matches a request path (Kubernetes
    semantics: Prefix matches whole path elements)."""
    if path_type == "Exact":
        return target == path
    base = path.rstrip("/")
    return base == "" or target == base or target.startswith(base + "/")


def notes_commands(notes: str) -> list[str]:
    return [line.split("#")[0].strip().rstrip("&").strip() for line in notes.splitlines()
            if re.match(r"\s+(kubectl|helm|curl) ", line)]


def check_notes(label: str, values: dict, objects: list[dict], notes: str) -> None:
    """Every command NOTES.txt prints must work in the mode the chart was
    installed in: the objects it names exist, in the release's namespace."""
    N = {"kind": "NOTES.txt", "metadata": {"name": label}}
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    namespace = next(o["metadata"]["namespace"] for o in objects if o["kind"] == "Service")
    merged = deep_merge(load_file(CHART / "values.yaml"), values)
    short = {"svc": "Service", "deployment": "Deployment", "hpa": "HorizontalPodAutoscaler", "pod": "Pod"}
    # What NOTES says about Redis is what the pods get.
    env = pod_environment(objects)
    has_redis = bool({"REDIS_URL", "REDIS_CLUSTER_NODES"} & set(env))
    need(("No Redis" in notes) != has_redis, N, f"NOTES says {'no Redis' if 'No Redis' in notes else 'Redis'} but the "
                                                 f"pods get {sorted({'REDIS_URL', 'REDIS_CLUSTER_NODES'} & set(env)) or 'neither REDIS_URL nor REDIS_CLUSTER_NODES'}")
    for cmd in notes_commands(notes):
        words = cmd.split()
        if "-n" in words:
            need(words[words.index("-n") + 1] == namespace, N, f"{cmd!r}: not the release's namespace {namespace}")
        if words[0] == "helm":
            need(words[1] == "test" and merged["tests"]["enabled"] and not merged["argocd"]["managed"], N,
                 f"{cmd!r}: no Helm release to test (tests disabled, or deployed by Argo CD)")
            continue
        if words[0] == "curl":
            url = urllib.parse.urlparse(words[-1].strip("'\""))
            if url.hostname not in ("127.0.0.1", "localhost"):
                routed = [o for o in objects if o["kind"] == "Ingress"
                          for r in o["spec"]["rules"] if r.get("host") == url.hostname
                          for pth in r["http"]["paths"] if ingress_routes(pth["path"], pth["pathType"], url.path)]
                need(routed, N, f"{cmd!r}: no Ingress routes {url.hostname}{url.path}")
            continue
        if words[1:3] == ["argo", "rollouts"]:
            need(("Rollout", words[-3] if words[-2] == "-n" else words[-1]) in names, N,
                 f"{cmd!r}: no Rollout of that name (the Argo Rollouts plugin needs rollout.enabled)")
            continue
        for w in words:
            m = re.fullmatch(r"([a-z.]+)/([a-z0-9-]+)", w)
            if m:
                need(m.group(1) in short, N, f"{cmd!r}: kubectl has no status viewer or short name {m.group(1)!r}")
                need((short[m.group(1)], m.group(2)) in names, N, f"{cmd!r}: {short[m.group(1)]} {m.group(2)} is not rendered")
                if m.group(1) == "pod":
                    hook = dig(next(o for o in objects if o["kind"] == "Pod" and o["metadata"]["name"] == m.group(2)),
                               "metadata", "annotations", "argocd.argoproj.io/hook")
                    need(hook == "PostSync", N, f"{cmd!r}: that pod only exists when Argo CD runs it as a PostSync hook")
        if "port-forward" in words:
            port = int(words[-1].split(":")[1])
            svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == words[-2].split("/")[1])
            need(port in {p["port"] for p in svc["spec"]["ports"]}, N, f"{cmd!r}: the Service has no port {port}")
        if "hpa" in words:
            need(("HorizontalPodAutoscaler", words[words.index("hpa") + 1]) in names, N, f"{cmd!r}: no HPA rendered")


def check_failure_paths(label: str, values: dict, objects: list[dict], notes: str) -> None:
    """Issue 13's render-time guarantees, on every values file."""
    merged = deep_merge(load_file(CHART / "values.yaml"), values)
    by_kind: dict[str, list[dict]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    # /metrics and the probes never reach the internet.
    for ing in by_kind.get("Ingress", []):
        for rule in ing["spec"]["rules"]:
            for pth in rule["http"]["paths"]:
                for admin_path in ADMIN_PATHS:
                    need(not ingress_routes(pth["path"], pth["pathType"], admin_path), ing,
                         f"{pth['path']} ({pth['pathType']}) routes {admin_path} from the internet")
                need(dig(pth, "backend", "service", "port", "name") == "http", ing, "routes to another port than the API's")
    # Prometheus can scrape what the ServiceMonitor scrapes.
    for sm in by_kind.get("ServiceMonitor", []):
        for np in by_kind.get("NetworkPolicy", []):
            if dig(np, "spec", "podSelector", "matchLabels", "app.kubernetes.io/component") != "api":
                continue
            for ep in sm["spec"]["endpoints"]:
                admitted = [r for r in np["spec"].get("ingress", [])
                            if any(pp.get("port") == ep["port"] for pp in r.get("ports", []))
                            and (not r.get("from") or all(peer in r["from"] for peer in merged["networkPolicy"]["metricsFrom"])
                                 and merged["networkPolicy"]["metricsFrom"])]
                need(admitted, np, f"no ingress rule admits Prometheus (networkPolicy.metricsFrom) on port {ep['port']}, "
                                   "which the ServiceMonitor scrapes")
    # The requests-per-second metric only where the values say an adapter runs.
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        pods_metrics = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        need(bool(pods_metrics) == bool(merged["autoscaling"]["requestsPerSecond"]["enabled"]), hpa,
             "Pods metric present though autoscaling.requestsPerSecond is off, or the reverse")
    # Behind a cloud load balancer straight to the Service (LoadBalancer or
    # NodePort), externalTrafficPolicy Cluster SNATs every connection to a node
    # address: without X-Forwarded-For from trusted proxies all clients would
    # share a few nodes' connection caps and rate limits.
    for svc in by_kind.get("Service", []):
        if svc["spec"].get("type") in ("LoadBalancer", "NodePort"):
            need(svc["spec"].get("externalTrafficPolicy") == "Local" or merged["config"]["TRUSTED_PROXIES"], svc,
                 f"type {svc['spec']['type']} with externalTrafficPolicy {svc['spec'].get('externalTrafficPolicy', 'Cluster')} "
                 "and no TRUSTED_PROXIES: every client arrives as a node's address")
            # ...and it is on the internet: the API port only, and that port
            # serving no /metrics or probes (the admin listener has them).
            need(all(p_.get("targetPort") == "http" for p_ in svc["spec"]["ports"]) and merged["admin"]["enabled"], svc,
                 f"type {svc['spec']['type']} exposes ports {[p_.get('targetPort') for p_ in svc['spec']['ports']]} with "
                 f"admin.enabled={merged['admin']['enabled']}: /metrics, /livez and /readyz would be on the load balancer")
    # Memory: the service's documented bounds (docs/reliability.md "Memory stays flat"): 20 MiB +
    # 1.5 x CACHE_MAX_BYTES + 155 B x RATE_LIMIT_MAX_KEYS with its cache and limiter full,
    # its normal state, which the request must cover (a pod above its request is first in
    # line for eviction under node pressure); plus 96 KiB per connection it may hold
    # (MAX_CONNECTIONS, and 64 on the admin port), parked on unfinished request heads,
    # which the limit must cover (else an OOM kill).
    def quantity(q) -> float:
        m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
        units = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
        need(m and m.group(2) in units, {"kind": "quantity", "metadata": {"name": str(q)}}, "unparsable memory quantity")
        return float(m.group(1)) * units[m.group(2)]
    for w in (o for o in objects if o["kind"] in ("Deployment", "Rollout")
              and dig(o, "spec", "template", "metadata", "labels", "app.kubernetes.io/component") == "api"):
        env = pod_environment(objects)
        full = 20 * 2**20 + 1.5 * int(env.get("CACHE_MAX_BYTES", 67108864)) + 155 * int(env.get("RATE_LIMIT_MAX_KEYS", 100000))
        parked = 96 * 2**10 * (int(env.get("MAX_CONNECTIONS", 10000)) + (64 if "ADMIN_LISTEN_ADDR" in env else 0))
        res = w["spec"]["template"]["spec"]["containers"][0]["resources"]
        have = quantity(res["requests"]["memory"])
        need(have >= full, w, f"resources.requests.memory {res['requests']['memory']} < {full / 2**20:.0f}Mi, what "
                              "CACHE_MAX_BYTES and RATE_LIMIT_MAX_KEYS need (20 MiB + 1.5 x cache + 155 B x keys)")
        have = quantity(res["limits"]["memory"])
        need(have >= full + parked, w, f"resources.limits.memory {res['limits']['memory']} < {(full + parked) / 2**20:.0f}Mi, "
                                       "what CACHE_MAX_BYTES, RATE_LIMIT_MAX_KEYS and MAX_CONNECTIONS need (20 MiB + "
                                       "1.5 x cache + 155 B x keys + 96 KiB x connections)")
    # Dual-stack listeners.
    for cm in by_kind.get("ConfigMap", []):
        for key in ("LISTEN_ADDR", "ADMIN_LISTEN_ADDR"):
            if key in cm.get("data", {}):
                need(cm["data"][key].startswith("[::]:"), cm, f"{key}={cm['data'][key]}: listen on [::] (dual-stack), "
                                                              "or IPv6-only clusters cannot probe or reach the pods")
    # Every alert says which environment it comes from.
    for pr in by_kind.get("PrometheusRule", []):
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                if "alert" in r:
                    need(r["labels"].get("environment") and
                         r["labels"].get("environment") == merged["prometheusRule"].get("environment"), pr,
                         f"alert {r['alert']}: environment label {r['labels'].get('environment')!r}, "
                         f"values say {merged['prometheusRule']['environment']!r}")
    check_notes(label, values, objects, notes)
    check_optional_parts(label, merged, objects)


SECRET_SETTINGS = ("REDIS_URL", "REDIS_CLUSTER_NODES", "REDIS_PASSWORD", "AUTH_JWT_HS256_SECRET")


def check_optional_parts(label: str, merged: dict, objects: list[dict]) -> None:
    """Issue 15's optional parts, as the platform team adopting them would
    check them: cost labels everywhere, secrets never in a ConfigMap, mesh
    policies that admit the scrape, the probes and the test pods, KEDA on the
    release's own series, the load test aimed at the Service."""
    by_kind: dict[str, list[dict]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    pods = [(o, *pod_spec_of(o)) for o in objects if o["kind"] in POD_KINDS]
    api = next(o for o in objects if o["kind"] in ("Deployment", "Rollout")
               and dig(o, "spec", "template", "metadata", "labels", "app.kubernetes.io/component") == "api")
    api_spec = api["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in api_spec["containers"][0]["ports"]}
    svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == api["metadata"]["name"])
    # Cost attribution: every object and every pod carries commonLabels.
    for o in objects:
        have = o["metadata"].get("labels") or {}
        need(all(have.get(k) == str(v) for k, v in merged["commonLabels"].items()), o,
             f"commonLabels {merged['commonLabels']} missing from its labels")
    for o, _, labels in pods:
        need(all(labels.get(k) == str(v) for k, v in merged["commonLabels"].items()), o,
             "commonLabels missing from its pod template")
    # ...and so do the pods Chaos Mesh runs for the chaos workflows' load tasks.
    for sched in by_kind.get("Schedule", []):
        for t in dig(sched, "spec", "workflow", "templates", default=[]):
            if t.get("templateType") == "Task":
                have = dig(t, "task", "labels", default={}) or {}
                need(all(have.get(k) == str(v) for k, v in merged["commonLabels"].items()), sched,
                     f"task {t['name']}: commonLabels {merged['commonLabels']} missing from its pod's labels {have}")
    # Secrets never in a ConfigMap.
    for cm in by_kind.get("ConfigMap", []):
        leaked = [k for k in (cm.get("data") or {}) if k in SECRET_SETTINGS]
        need(not leaked, cm, f"secret settings {leaked} in a ConfigMap")
    # The ExternalSecret writes exactly the keys the pods read.
    for es in by_kind.get("ExternalSecret", []):
        target = es["spec"]["target"]["name"]
        written = {d["secretKey"] for d in es["spec"]["data"]}
        read = {dig(e, "valueFrom", "secretKeyRef", "key") for c in api_spec["containers"] for e in c.get("env", [])
                if dig(e, "valueFrom", "secretKeyRef", "name") == target}
        need(read == written, es, f"writes keys {sorted(written)} of Secret {target}, the API pods read {sorted(read)}")
    # Mesh: every pod the chart runs joins it the same way, and its policies
    # admit what must get through.
    meshed = merged["mesh"]["istio"]["enabled"] or merged["mesh"]["linkerd"]["enabled"]
    if meshed:
        key = "sidecar.istio.io/nativeSidecar" if merged["mesh"]["istio"]["enabled"] else \
            "config.alpha.linkerd.io/proxy-enable-native-sidecar"
        for o in pods:
            ann = (o[0]["metadata"].get("annotations") if o[0]["kind"] == "Pod" else
                   dig(o[0], "spec", "template", "metadata", "annotations")) or {}
            need(ann.get(key) == "true", o[0], f"not a native sidecar ({key}): a Job would never finish, "
                                               "and the app could start before its proxy or outlive it")
        port = "15012" if merged["mesh"]["istio"]["enabled"] else "8086"
        for np in by_kind.get("NetworkPolicy", []):
            egress = json.dumps(np["spec"].get("egress"))
            need(f'"port": {port}' in egress, np, f"no egress to the mesh control plane (port {port}): the proxy never gets ready")
    for pa in by_kind.get("PeerAuthentication", []):
        need(pa["spec"]["mtls"]["mode"] == "STRICT", pa, "mTLS must be STRICT")
        need(matches(pa["spec"]["selector"]["matchLabels"], api["spec"]["template"]["metadata"]["labels"]), pa,
             "selector does not select the API pods")
        for p_, mode in (pa["spec"].get("portLevelMtls") or {}).items():
            need(int(p_) == ports.get("admin"), pa, f"port {p_} relaxed to {mode['mode']}: only the admin port may be")
    for ap in by_kind.get("AuthorizationPolicy", []):
        need(ap["spec"]["action"] == "ALLOW" and matches(ap["spec"]["selector"]["matchLabels"],
                                                         api["spec"]["template"]["metadata"]["labels"]), ap,
             "must be an ALLOW policy on the API pods")
        allowed = {}
        for r in ap["spec"]["rules"]:
            for op in r["to"]:
                for p_ in op["operation"]["ports"]:
                    need(int(p_) in ports.values(), ap, f"port {p_} is no container port {ports}")
                    allowed.setdefault(int(p_), []).append(r.get("from"))
        principal = f"{merged['mesh']['istio']['trustDomain']}/ns/{api['metadata']['namespace']}/sa/{api_spec['serviceAccountName']}"
        need(any(f and principal in f[0]["source"]["principals"] for f in allowed.get(ports["http"], [])), ap,
             f"the test and load pods ({principal}) cannot call the API port")
        for o, spec, labels in pods:
            if labels.get("app.kubernetes.io/component") == "test":
                need(spec.get("serviceAccountName") == api_spec["serviceAccountName"], o,
                     "a test pod under another identity than the one the AuthorizationPolicy admits")
        for sm in by_kind.get("ServiceMonitor", []):
            for ep in sm["spec"]["endpoints"]:
                target = next(p_["targetPort"] for p_ in svc["spec"]["ports"] if p_["name"] == ep["port"])
                need(ports[target] in allowed, ap, f"no rule admits Prometheus on port {ports[target]}, which it scrapes")
                plaintext = ep.get("scheme", "http") == "http"
                relaxed = {int(k) for pa in by_kind.get("PeerAuthentication", []) for k in (pa["spec"].get("portLevelMtls") or {})}
                need(not plaintext or ports[target] in relaxed, ap,
                     f"Prometheus scrapes port {ports[target]} in plaintext but mTLS is STRICT there")
    # KEDA reads this release's own series.
    for so in by_kind.get("ScaledObject", []):
        q = next(t for t in so["spec"]["triggers"] if t["type"] == "prometheus")["metadata"]["query"]
        need(f'namespace="{so["metadata"]["namespace"]}"' in q and f'job="{svc["metadata"]["name"]}"' in q, so,
             f"the Prometheus trigger does not select this release's namespace and job: {q}")
    # KEDA's admission webhook (CheckFallbackValid) refuses a fallback unless
    # every trigger is an AverageValue one other than cpu/memory: such a
    # ScaledObject is never admitted, and the release never autoscales.
    for so in by_kind.get("ScaledObject", []):
        if so["spec"].get("fallback"):
            refused = [t.get("name") or t["type"] for t in so["spec"]["triggers"]
                       if t["type"] in ("cpu", "memory") or t.get("metricType") != "AverageValue"]
            need(not refused, so, f"fallback with triggers {refused}: KEDA refuses a fallback next to cpu/memory or "
                                  "non-AverageValue triggers (its webhook rejects the object)")
    # Pods that are given a Redis address (from any source: in-cluster, values,
    # their own Secret, the ExternalSecret) can reach it through the NetworkPolicy.
    redis_env = {e["name"] for c in api_spec["containers"] for e in c.get("env", [])} & {"REDIS_URL", "REDIS_CLUSTER_NODES"}
    redis_port = 6379 if merged["redis"]["enabled"] else merged["networkPolicy"]["egress"]["redis"]["port"]
    for np in by_kind.get("NetworkPolicy", []):
        if redis_env and matches(dig(np, "spec", "podSelector", "matchLabels"), api["spec"]["template"]["metadata"]["labels"]):
            need(any(p_.get("port") == redis_port for r in np["spec"].get("egress") or [] for p_ in r.get("ports", [])), np,
                 f"the API pods get {sorted(redis_env)} but no egress rule opens port {redis_port}: the cache tier and the "
                 "cluster-wide rate limits would never reach Redis")
    # Behind a mesh sidecar the service's TCP peer is the proxy in the pod
    # (Istio's inbound cluster binds 127.0.0.6, ::6 on IPv6; Linkerd forwards
    # from 127.0.0.1; either may use the pod's own address): unless those are
    # TRUSTED_PROXIES, every client shares one address's connections
    # (MAX_CONNECTIONS_PER_ADDRESS) and one rate limit, and X-Forwarded-For is ignored.
    if meshed:
        env = pod_environment(objects)
        nets = [ipaddress.ip_network(x.strip(), strict=False) for x in env.get("TRUSTED_PROXIES", "").split(",") if x.strip()]
        peers = (["127.0.0.6", "::6"] if merged["mesh"]["istio"]["enabled"] else ["127.0.0.1", "::1"]) \
            + POD_IPS_STAND_IN.split(",")
        missing = [p_ for p_ in peers if not any(ipaddress.ip_address(p_) in n for n in nets)]
        need(not missing, api, f"TRUSTED_PROXIES={env.get('TRUSTED_PROXIES')!r} does not hold the mesh proxy's addresses "
                               f"{missing}: every client would be one address to the service")
    # Linkerd replaces the target port of meshed-to-meshed traffic by its
    # inbound port 4143 (linkerd.io "Network Policy"): a policy that does not
    # admit 4143 blocks the chart's own meshed pods (test, load test, Redis)
    # and any meshed client, from every peer the other rules admit.
    if merged["mesh"]["linkerd"]["enabled"]:
        for np in by_kind.get("NetworkPolicy", []):
            rules = np["spec"].get("ingress") or []
            inbound = [r for r in rules if any(p_.get("port") == 4143 for p_ in r.get("ports", []))]
            need(not rules or inbound, np, "no ingress rule opens Linkerd's inbound port 4143: every meshed client is refused")
            others = [peer for r in rules if r not in inbound for peer in (r.get("from") or [None])]
            admitted = [peer for r in inbound for peer in (r.get("from") or [None])]
            need(None in admitted or (None not in others and all(p_ in admitted for p_ in others)), np,
                 f"port 4143 admits {admitted}, less than the other rules {others}")
            for r in np["spec"].get("egress") or []:
                if any("podSelector" in peer and "namespaceSelector" not in peer for peer in r.get("to") or []):
                    need(any(p_.get("port") == 4143 for p_ in r.get("ports", [])), np,
                         f"egress to the release's meshed pods {r['to']} without port 4143: Linkerd sends there")
    # The load test aims at the Service, on its port.
    for o, spec, labels in pods:
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if "LOAD_BASE_URL" in env:
                url = urllib.parse.urlparse(env["LOAD_BASE_URL"])
                need(url.hostname == svc["metadata"]["name"] and url.port == svc["spec"]["ports"][0]["port"], o,
                     f"LOAD_BASE_URL {env['LOAD_BASE_URL']} is not the API Service")


def schema_coverage(schema: dict, values: dict, path: str = "") -> list[str]:
    """Every value must be declared in values.schema.json: objects with
    properties must forbid unknown keys; objects without properties are
    Kubernetes types passed through (validated by kubernetes-validate)."""
    problems = []
    if not isinstance(values, dict):
        return problems
    props = schema.get("properties")
    if props is None:
        return problems
    if schema.get("additionalProperties") is not False:
        problems.append(f"{path or '<root>'}: schema object has properties but allows unknown keys")
    for k, v in values.items():
        if k not in props:
            problems.append(f"{path}.{k}: not declared in values.schema.json")
            continue
        sub = props[k]
        if not sub.get("description") and "properties" not in sub and sub.get("type") in ("array", "object") \
                and "items" not in sub and "additionalProperties" not in sub:
            problems.append(f"{path}.{k}: pass-through schema without a description")
        problems += schema_coverage(sub, v, f"{path}.{k}")
    return problems


def cmd_chart() -> None:
    h = helm()
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = load_file(CHART / "values.yaml")
    total = 0
    for label, path in VALUES_FILES.items():
        values = values_of(label)
        problems = schema_coverage(schema, defaults) + schema_coverage(schema, values)
        if problems:
            fail("values.schema.json does not cover every value:\n  " + "\n  ".join(sorted(set(problems))))
        lint(values, label)
        objects, notes = render(values)
        need(notes.strip(), {"kind": "NOTES.txt", "metadata": {"name": label}}, "NOTES.txt renders empty")
        n = kubernetes_validate(objects, label)
        kinds = sorted({o["kind"] for o in objects})
        for o in objects:
            if (group_of(o), o["kind"]) in CRD_KINDS:
                check_crd_object(o, objects)
            if o["kind"] in POD_KINDS:
                check_restricted(o)
            need(o["metadata"].get("namespace"), o, "metadata.namespace must be set (GitOps diffs and `kubectl apply -f`)")
        check_references(objects)
        check_failure_paths(label, values, objects, notes)
        check_managed_env(label, values, objects)
        if label == "default":
            # `helm install` with defaults must scale both ways on a cluster
            # without prometheus-adapter: no Pods metric the HPA cannot read.
            for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
                need(all(m["type"] == "Resource" for m in hpa["spec"]["metrics"]), hpa,
                     "the default HPA reads a metric only prometheus-adapter serves: without it the HPA reports "
                     "FailedGetPodsMetric and never scales down")
        total += len(objects)
        info(f"{label:15s} lint ok ({', '.join(K8S_VERSIONS)}); {len(objects)} objects, {n} validated "
             f"--strict for {len(K8S_VERSIONS)} Kubernetes versions, {len(objects) - n} CRD objects checked: {', '.join(kinds)}")

    # The values that must make rendering fail, each with the reason it must
    # and a word the error message must contain (so it fails for that reason).
    restricted = {"ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
                  "metricsFrom": []}

    def ingress_paths(paths: list[tuple[str, str]]) -> dict:
        return {"ingress": {"enabled": True, "paths": [{"path": p, "pathType": t} for p, t in paths]},
                "config": {"TRUSTED_PROXIES": "10.0.0.0/8"}}

    must_fail = {
        "unknown key (schema rejects typos)": ({"replicaCont": 3}, "replicaCont"),
        "weakened security context": ({"securityContext": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"),
        "grace period shorter than the drain": ({"terminationGracePeriodSeconds": 10}, "terminationGracePeriodSeconds"),
        "preStop sleep not covered by the grace period": ({"lifecycle": {"preStopSleepSeconds": 15}}, "terminationGracePeriodSeconds"),
        "in-cluster and external Redis together": ({"redis": {"enabled": True}, "externalRedis": {"url": "redis://r:6379"}}, "exclusive"),
        "one Redis node and a Redis Cluster together": (
            {"externalRedis": {"url": "redis://r:6379", "clusterNodes": ["redis://c:6379"]}}, "exclusive"),
        "cluster seed nodes that are not redis URLs": (
            {"externalRedis": {"clusterNodes": ["c:6379"]}}, "clusterNodes"),
        "latency SLO threshold that is not a bucket": ({"prometheusRule": {"slo": {"latencyThreshold": "0.2"}}}, "latencyThreshold"),
        "canary analysis without the ServiceMonitor": ({"rollout": {"enabled": True}}, "serviceMonitor.enabled"),
        "NetworkPolicy that blocks the scrape": (
            {"serviceMonitor": {"enabled": True}, "networkPolicy": restricted}, "metricsFrom"),
        "Ingress routing / (and so /metrics) to the internet": (
            {"ingress": {"enabled": True, "paths": [{"path": "/", "pathType": "Prefix"}]}}, "/metrics"),
        "Ingress routing /metrics through a Prefix with a trailing slash": (
            {"ingress": {"enabled": True, "paths": [{"path": "/metrics/", "pathType": "Prefix"}]}}, "/metrics"),
        "Ingress routing everything through a Prefix of slashes": (
            {"ingress": {"enabled": True, "paths": [{"path": "//", "pathType": "Prefix"}]}}, "/metrics"),
        "Ingress routing /metrics": (
            {"ingress": {"enabled": True, "paths": [{"path": "/metrics", "pathType": "Exact"}]}}, "/metrics"),
        "Ingress path type that could route anything": (
            {"ingress": {"enabled": True, "paths": [{"path": "/fibonacci", "pathType": "ImplementationSpecific"}]}}, "pathType"),
        "canary measured before it has two scrapes and a rate window": (
            {"rollout": {"enabled": True, "analysis": {"initialDelay": "1m"}}, "serviceMonitor": {"enabled": True}}, "initialDelay"),
        "an Ingress whose only path is the docs page, with the page off": (
            {"ingress": {"enabled": True, "paths": [{"path": "/docs", "pathType": "Prefix"}]},
             "config": {"DOCS_ENABLED": False, "TRUSTED_PROXIES": "10.0.0.0/8"}}, "nothing left to route"),
        "an Ingress without hosts (no rules: an invalid Ingress that routes nothing)": (
            {"ingress": {"enabled": True, "hosts": []}, "config": {"TRUSTED_PROXIES": "10.0.0.0/8"}}, "ingress.hosts"),
        # Ingress paths that route to no page of the service, and duplicates (outside attack).
        "an Ingress Prefix path in the wrong case (/DOCS: the service is case-sensitive)": (
            ingress_paths([("/DOCS", "Prefix")]), "/DOCS (Prefix) routes to no page"),
        "an Ingress Prefix path that is not whole segments of a public path (/doc)": (
            ingress_paths([("/doc", "Prefix")]), "/doc (Prefix) routes to no page"),
        "an Ingress Prefix path that only starts like a public path (/docs.json)": (
            ingress_paths([("/docs.json", "Prefix")]), "/docs.json (Prefix) routes to no page"),
        "an Exact Ingress path with a trailing slash the service does not serve (/health/)": (
            ingress_paths([("/health/", "Exact")]), "/health/ (Exact) routes to no page"),
        "an Ingress path listed twice": (
            ingress_paths([("/health", "Exact"), ("/fibonacci", "Exact"), ("/health", "Exact")]), "/health (Exact) twice"),
        "an Ingress Prefix path listed twice, once with a trailing slash": (
            ingress_paths([("/docs", "Prefix"), ("/docs/", "Prefix")]), "/docs/ (Prefix) twice"),
        "an Ingress without TRUSTED_PROXIES (every client would be the controller)": (
            {"ingress": {"enabled": True}}, "TRUSTED_PROXIES"),
        "extraEnv turning the docs page off behind the chart's back (the Ingress would still route /docs)": (
            {"ingress": {"enabled": True}, "config": {"TRUSTED_PROXIES": "10.0.0.0/8"},
             "extraEnv": [{"name": "DOCS_ENABLED", "value": "false"}]}, "config.DOCS_ENABLED"),
        "extraEnv setting a variable of the pod spec (REDIS_URL: NOTES and the NetworkPolicy would not know)": (
            {"extraEnv": [{"name": "REDIS_URL", "value": "redis://r:6379"}]}, "extraEnv sets REDIS_URL"),
        "extraEnv listing one variable twice (the pod keeps only the last; server-side apply can refuse it)": (
            {"extraEnv": [{"name": "HTTP_PROXY", "value": "http://a:3128"},
                          {"name": "HTTP_PROXY", "value": "http://b:3128"}]}, "extraEnv lists HTTP_PROXY twice"),
        "a JWT key through extraEnv without an audience (the service would refuse to start)": (
            {"extraEnv": [{"name": "AUTH_JWT_JWKS_URL", "value": "https://idp.example/jwks.json"}]},
            "extraEnv sets AUTH_JWT_JWKS_URL (auth on) but config.AUTH_JWT_AUDIENCE is empty"),
        "a JWT key through extraEnv with an audience of spaces (the service trims it to none and refuses to start)": (
            {"config": {"AUTH_JWT_AUDIENCE": " "},
             "extraEnv": [{"name": "AUTH_JWT_JWKS_URL", "value": "https://idp.example/jwks.json"}]},
            "extraEnv sets AUTH_JWT_JWKS_URL (auth on) but config.AUTH_JWT_AUDIENCE is empty"),
        "a JWT key through extraEnv in lower case (the service never reads it: auth silently off)": (
            {"extraEnv": [{"name": "auth_jwt_hs256_secret", "value": "s" * 32}]},
            "did you mean AUTH_JWT_HS256_SECRET?"),
        "a setting through extraEnv with a trailing space in its name (the service never reads it)": (
            {"config": {"AUTH_JWT_AUDIENCE": "fibonacci-api"},
             "extraEnv": [{"name": "AUTH_JWT_JWKS_URL ", "value": "https://idp.example/jwks.json"}]},
            "did you mean AUTH_JWT_JWKS_URL?"),
        "the allocator's options through extraEnv (the memory model and limit rely on the compiled-in ones)": (
            {"extraEnv": [{"name": "_RJEM_MALLOC_CONF", "value": "background_thread:false"}]},
            "extraEnv sets _RJEM_MALLOC_CONF"),
        "an alert label that the rules set themselves": (
            {"prometheusRule": {"enabled": True, "alertLabels": {"environment": "prod"}}}, "environment"),
        # Issue 15's optional parts.
        "the HPA and a KEDA ScaledObject both on": (
            {"keda": {"enabled": True}, "serviceMonitor": {"enabled": True}}, "exclusive"),
        "KEDA without the scrape its trigger reads": (
            {"keda": {"enabled": True}, "autoscaling": {"enabled": False}}, "serviceMonitor.enabled"),
        "a cost label that overrides a selector label": (
            {"commonLabels": {"app.kubernetes.io/name": "billing"}}, "commonLabels"),
        "an ExternalSecret with nothing in it": ({"externalSecret": {"enabled": True}}, "externalSecret.data"),
        "the Redis address from the ExternalSecret and the in-cluster Redis": (
            {"redis": {"enabled": True}, "externalSecret": {"enabled": True, "data": [
                {"env": "REDIS_URL", "remoteRef": {"key": "k"}}]}}, "exclusive"),
        "REDIS_URL and REDIS_CLUSTER_NODES both from the ExternalSecret": (
            {"externalSecret": {"enabled": True, "data": [{"env": "REDIS_URL", "remoteRef": {"key": "k"}},
                                                          {"env": "REDIS_CLUSTER_NODES", "remoteRef": {"key": "k"}}]}}, "exclusive"),
        "a JWT secret without an audience (the service would refuse to start)": (
            {"externalSecret": {"enabled": True, "data": [{"env": "AUTH_JWT_HS256_SECRET", "remoteRef": {"key": "k"}}]}},
            "AUTH_JWT_AUDIENCE"),
        "a setting the ExternalSecret may not carry": (
            {"externalSecret": {"enabled": True, "data": [{"env": "MAX_N", "remoteRef": {"key": "k"}}]}}, "externalSecret/data/0/env"),
        "Istio and Linkerd both": ({"mesh": {"istio": {"enabled": True}, "linkerd": {"enabled": True}}}, "exclusive"),
        "Istio admitting no one to the API": (
            {"mesh": {"istio": {"enabled": True, "ingressPrincipals": []}}}, "ingressPrincipals"),
        "Istio STRICT mTLS with Prometheus outside the mesh and no admin port": (
            {"mesh": {"istio": {"enabled": True}}, "serviceMonitor": {"enabled": True}}, "admin.enabled"),
        "paging with no PagerDuty routing key Secret": (
            {"alertmanagerConfig": {"enabled": True, "pagerduty": {"routingKeySecret": {"name": ""}}}}, "routingKeySecret"),
        "the load test from one address without a trusted proxy": ({"loadTest": {"enabled": True}}, "TRUSTED_PROXIES"),
        "chaos experiments in production": (
            {"chaos": {"enabled": True}, "redis": {"enabled": True}, "config": {"TRUSTED_PROXIES": "10.0.0.0/8"}}, "production"),
        # The platform review's (issue 13/15 "independent review").
        "a LoadBalancer Service that SNATs every client to a node address": (
            {"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster"}, "admin": {"enabled": True}},
            "externalTrafficPolicy"),
        "a LoadBalancer straight to pods under Istio's STRICT mTLS (plaintext from outside the mesh)": (
            {"service": {"type": "LoadBalancer"}, "admin": {"enabled": True}, "mesh": {"istio": {"enabled": True}}},
            "STRICT mTLS refuses"),
        "a LoadBalancer Service whose API port still serves /metrics (no admin port)": (
            {"service": {"type": "LoadBalancer"}}, "admin.enabled"),
        "a memory limit a full cache outgrows (OOM-killed once the cache fills)": (
            {"config": {"CACHE_MAX_BYTES": 268435456}}, "resources.limits.memory"),
        "a memory limit MAX_CONNECTIONS parked on unfinished request heads outgrow": (
            {"config": {"MAX_CONNECTIONS": 10000}}, "96 KiB x connections"),
        "a memory limit in a quantity the chart cannot check (0.2Gi)": (
            {"resources": {"limits": {"cpu": "1", "memory": "0.2Gi"}}}, "cannot read this quantity"),
        "MAX_CONNECTIONS nulled (the guard would read 0, the binary run its own 10000)": (
            {"config": {"MAX_CONNECTIONS": None}}, "MAX_CONNECTIONS"),
        "DOCS_ENABLED nulled and set to false through extraEnv (/docs left routed)": (
            {"config": {"DOCS_ENABLED": None}, "extraEnv": [{"name": "DOCS_ENABLED", "value": "false"}],
             "ingress": {"enabled": True, "hosts": [{"host": "f.example.com"}]}}, "DOCS_ENABLED"),
        "MAX_CONNECTIONS past what the binary accepts (and past int64 in the memory check)": (
            {"config": {"MAX_CONNECTIONS": 200000000000000}}, "MAX_CONNECTIONS"),
        "an Exact path under /docs/ that is no file of the page": (
            {"ingress": {"enabled": True, "hosts": [{"host": "f.example.com"}],
                         "paths": [{"path": "/docs/a/b/c", "pathType": "Exact"}]}}, "routes to no page"),
        "Istio's ingress gateway kept out by the NetworkPolicy (nobody reaches the API)": (
            {"mesh": {"istio": {"enabled": True}}, "networkPolicy": {"ingressFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]}}, "does not admit"),
        "Redis chaos without the in-cluster Redis it targets": (
            {"chaos": {"enabled": True}, "config": {"TRUSTED_PROXIES": "10.0.0.0/8"},
             "prometheusRule": {"environment": "staging"}}, "redis.enabled"),
    }
    for why, (values, word) in must_fail.items():
        try:
            render(values)
        except CheckFailed:
            raise
        except Exception as e:  # noqa: BLE001 - HelmRenderError / HelmValuesError
            need(word in str(e), {"kind": "values", "metadata": {"name": why}},
                 f"rendering failed, but the message does not name {word!r}: {e}")
            continue
        fail(f"rendering should fail for {why}: {values}")
    info(f"{len(must_fail)} invalid values sets rejected: {', '.join(must_fail)}")
    # Their counterparts render: auth through extraEnv with an audience, a key setting
    # left empty (auth off) without one, and a lower-case name that is no setting.
    for values in ({"config": {"AUTH_JWT_AUDIENCE": "fibonacci-api"},
                    "extraEnv": [{"name": "AUTH_JWT_JWKS_URL", "value": "https://idp.example/jwks.json"}]},
                   {"extraEnv": [{"name": "AUTH_JWT_JWKS_URL", "value": ""}]},
                   {"extraEnv": [{"name": "http_proxy", "value": "http://proxy.example:3128"}]}):
        render(values)
    with h.Chart.load(str(CHART)) as c:
        need(c.metadata.get("kubeVersion"), {"kind": "Chart", "metadata": {"name": "fibonacci-api"}}, "kubeVersion unset")


SEMVER = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$")


def application_chart(app: dict, proj: dict) -> tuple[Path, dict, str]:
    """The chart an Application deploys, as (local chart dir, merged values,
    description). A chart from the OCI registry is stood in for by this
    repository's chart (the release of that version is built from it); its
    valueFiles may come from another source by `$ref/path`."""
    spec = app["spec"]
    sources = spec.get("sources") or [spec["source"]]
    for src in sources:
        need(src["repoURL"] in proj["spec"]["sourceRepos"], app, f"repoURL {src['repoURL']} not in the project's sourceRepos")
    refs = {s["ref"]: s for s in sources if s.get("ref")}
    charts = [s for s in sources if s.get("chart") or s.get("path")]
    need(len(charts) == 1, app, "exactly one source must be the chart (path or chart)")
    src = charts[0]
    if src.get("chart"):
        chart_meta = load_file(CHART / "Chart.yaml")
        need(src["chart"] == chart_meta["name"], app, f"chart {src['chart']} is not this repository's {chart_meta['name']}")
        need(SEMVER.match(str(src["targetRevision"])), app,
             f"chart targetRevision {src['targetRevision']!r} must be one released version, not a range or a branch")
        chart, where = CHART, f"oci {src['repoURL']}/{src['chart']}:{src['targetRevision']}"
    else:
        chart, where = ROOT / src["path"], f"{src['path']}@{src['targetRevision']}"
        need((chart / "Chart.yaml").is_file(), app, f"chart path {src['path']} has no Chart.yaml")
    values = {}
    for vf in dig(src, "helm", "valueFiles", default=[]) or []:
        if vf.startswith("$"):
            ref, _, rel = vf[1:].partition("/")
            need(ref in refs, app, f"valueFile {vf}: no source with ref {ref}")
            need(refs[ref]["repoURL"] == proj["spec"]["sourceRepos"][0], app, f"valueFile {vf}: ref {ref} is not this repository")
            p = ROOT / rel
        else:
            need(not src.get("chart"), app, f"valueFile {vf}: a chart from a registry has only its own values.yaml")
            p = chart / vf
        need(p.is_file(), app, f"valueFile {vf} does not exist ({p.relative_to(ROOT)})")
        values = deep_merge(values, load_file(p))
    return chart, values, where


def expand_application_set(appset: dict) -> list[dict]:
    """The Applications an ApplicationSet's list generator makes: its template
    with every {{.key}} of each element substituted (Go templates, as
    goTemplate: true with missingkey=error: an unknown key fails here too)."""
    spec = appset["spec"]
    need(spec.get("goTemplate") is True and "missingkey=error" in (spec.get("goTemplateOptions") or []), appset,
         "goTemplate: true with missingkey=error, so a typo in a key fails instead of rendering empty")
    elements = [e for g in spec["generators"] for e in dig(g, "list", "elements", default=[])]
    need(elements, appset, "only list generators are checked here, and this one has no elements")
    template = json.dumps(spec["template"])
    apps = []
    for e in elements:
        def sub(m, e=e):
            need(m.group(1) in e, appset, f"template uses {{{{.{m.group(1)}}}}}, which element {e} does not have")
            return str(e[m.group(1)])
        app = {"apiVersion": appset["apiVersion"], "kind": "Application"} | json.loads(
            re.sub(r"\{\{\s*\.([A-Za-z0-9_]+)\s*\}\}", sub, template))
        app["metadata"]["namespace"] = appset["metadata"]["namespace"]
        app["__source"] = f"{appset['__source']} element {e}"
        apps.append(app)
    names = [a["metadata"]["name"] for a in apps]
    need(len(set(names)) == len(names), appset, f"generated Application names collide: {names}")
    return apps


def cmd_argocd() -> None:
    docs = []
    for f in sorted((ROOT / "argocd").glob("*.yaml")) + sorted((ROOT / "argocd" / "multi-region").glob("*.yaml")):
        for d in load_all(f.read_text(), str(f.relative_to(ROOT))):
            d["__source"] = str(f.relative_to(ROOT))
            docs.append(d)
    apps = [d for d in docs if d.get("kind") == "Application"]
    for appset in (d for d in docs if d.get("kind") == "ApplicationSet"):
        check_crd_object(appset, docs)
        generated = expand_application_set(appset)
        info(f"{appset['metadata']['name']} ({appset['__source']}): generates "
             + ", ".join(a["metadata"]["name"] for a in generated))
        apps += generated
    projects = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "AppProject"}
    need(apps, {"kind": "argocd", "metadata": {"name": "-"}}, "no Application in argocd/")
    for d in docs:
        need((group_of(d), d.get("kind")) in CRD_KINDS, d, "unexpected kind in argocd/")
        check_crd_object(d, docs)
    envs = set()
    for app in apps:
        spec = app["spec"]
        proj = projects.get(spec["project"])
        need(proj, app, f"project {spec['project']} is not defined in argocd/")
        dest = spec["destination"]
        need(any(d.get("namespace") in (dest["namespace"], "*") and
                 (d.get("server") == dest.get("server") or d.get("name") == dest.get("name"))
                 for d in proj["spec"]["destinations"]), app, "destination not allowed by the project")
        sp = spec.get("syncPolicy") or {}
        need(dig(sp, "automated", "prune") is True and dig(sp, "automated", "selfHeal") is True, app,
             "automated sync with prune and selfHeal required")
        need("CreateNamespace=true" in (sp.get("syncOptions") or []), app, "CreateNamespace=true required")
        need(dig(sp, "retry", "limit"), app, "syncPolicy.retry required")
        ignored = {(i.get("group"), i.get("kind")) for i in spec.get("ignoreDifferences") or []
                   if "/spec/replicas" in (i.get("jsonPointers") or [])}
        need({("apps", "Deployment"), ("argoproj.io", "Rollout")} <= ignored, app,
             "ignoreDifferences must cover /spec/replicas of Deployment and Rollout (the HPA owns it)")
        need("RespectIgnoreDifferences=true" in (sp.get("syncOptions") or []), app,
             "RespectIgnoreDifferences=true required, or a sync still resets the HPA's replicas")
        chart, values, where = application_chart(app, proj)
        if app["metadata"].get("labels", {}).get("environment") == "production":
            # Production never follows a branch: a chart change reaches it only
            # as a released, signed version that the promotion pull request pins.
            src = next(s for s in (spec.get("sources") or [spec.get("source")]) if s.get("chart") or s.get("path"))
            need(src.get("chart") and SEMVER.match(str(src["targetRevision"])), app,
                 f"production deploys the chart from {where}: pin a released chart version (OCI) instead of a branch")
        need(dig(values, "argocd", "managed") is True, app, "its values must set argocd.managed: true")
        release = next((dig(s, "helm", "releaseName") for s in (spec.get("sources") or [spec.get("source")])
                        if dig(s, "helm", "releaseName")), None) or app["metadata"]["name"]
        objects, _ = render(values, release=release, namespace=dest["namespace"], chart=chart)
        kubernetes_validate(objects, app["metadata"]["name"])
        for o in objects:
            if (group_of(o), o["kind"]) in CRD_KINDS:
                check_crd_object(o, objects)
        check_references(objects)
        allowed = {(w["group"], w["kind"]) for w in proj["spec"].get("namespaceResourceWhitelist", [])}
        for o in objects:
            ann = o["metadata"].get("annotations") or {}
            if ann.get("argocd.argoproj.io/hook") == "Skip":
                continue
            need((group_of(o), o["kind"]) in allowed, o,
                 f"kind not in AppProject {proj['metadata']['name']}'s namespaceResourceWhitelist: ArgoCD would refuse to sync it")
            need(o["metadata"]["namespace"] == dest["namespace"], o, "renders into another namespace than the destination")
        envs.add((dest.get("server") or dest.get("name"), dest["namespace"]))
        info(f"{app['metadata']['name']}: {where} -> {len(objects)} objects in {dest['namespace']}, rendered and validated")
    need(len(envs) == len(apps), {"kind": "argocd", "metadata": {"name": "-"}}, "two Applications deploy to one namespace of one cluster")
    # The project admits every kind the chart can render (any values file,
    # the optional parts on), and nothing else.
    renderable = {(group_of(o), o["kind"]) for label in VALUES_FILES for o in render(values_of(label))[0]}
    for proj in projects.values():
        listed = {(w["group"], w["kind"]) for w in proj["spec"].get("namespaceResourceWhitelist", [])}
        need(renderable == listed, proj, f"namespaceResourceWhitelist differs from what the chart can render: "
                                         f"missing {sorted(renderable - listed)}, never rendered {sorted(listed - renderable)}")
    check_promotion_workflow()


def check_promotion_workflow() -> None:
    """promote.yml moves production's chart version and image together, after
    verifying both signatures, in one pull request."""
    W = {"kind": "workflow", "metadata": {"name": "promote.yml"}}
    wf = load_file(ROOT / ".github" / "workflows" / "promote.yml")
    steps = wf["jobs"]["promote"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    app_path = wf["env"].get("PRODUCTION_APP")
    regions_path = wf["env"].get("PRODUCTION_REGIONS")
    need(regions_path and (ROOT / regions_path).is_file(), W, "env.PRODUCTION_REGIONS must name the production ApplicationSet")
    need(app_path and (ROOT / app_path).is_file(), W, "env.PRODUCTION_APP must name production's Application file")
    bump = next((s for s in steps if "$PRODUCTION_APP" in s.get("run", "")), None)
    need(bump and "$PRODUCTION_VALUES" in bump["run"] and "$PRODUCTION_REGIONS" in bump["run"], W,
         "one step must set the image (values-production.yaml) and the chart version (the Application and the "
         "regional ApplicationSet) together")
    need(re.search(r'\.spec\.template\.spec\.sources\[\] \| select\(\.chart == "fibonacci-api"\) \| \.targetRevision\) = '
                   r'strenv\(VERSION\)', bump["run"]), W, "the ApplicationSet's chart version must be bumped too")
    need(re.search(r'select\(\.chart == "fibonacci-api"\) \| \.targetRevision\) = strenv\(VERSION\)', bump["run"]), W,
         "the chart source's targetRevision must be set to the promoted version")
    need(re.search(r"\.image\.digest = strenv\(DIGEST\)", bump["run"]), W, "the image digest must be pinned")
    pr = next(s for s in steps if "create-pull-request" in s.get("uses", ""))
    need(all(k in pr["with"]["add-paths"] for k in ("PRODUCTION_APP", "PRODUCTION_VALUES", "PRODUCTION_REGIONS")), W,
         "the pull request must carry the three files")
    appset = load_file(ROOT / regions_path)
    versions = {s_["targetRevision"] for s_ in appset["spec"]["template"]["spec"]["sources"] if s_.get("chart")}
    single = {s_["targetRevision"] for s_ in load_file(ROOT / app_path)["spec"]["sources"] if s_.get("chart")}
    need(versions == single, W, f"production's chart version differs: {regions_path} {versions}, {app_path} {single}")
    need(runs.count("cosign verify") >= 2 and "${CHART}:${VERSION}" in runs, W,
         "the image's and the chart's signatures must both be verified")
    # The Application the bump edits has exactly one chart source for the select() to hit.
    app = load_file(ROOT / app_path)
    hits = [s for s in app["spec"].get("sources", []) if s.get("chart") == "fibonacci-api"]
    need(len(hits) == 1, W, f"{app_path} must have exactly one source with chart fibonacci-api, has {len(hits)}")
    info(f"promote.yml verifies image and chart signatures and bumps {app_path}'s chart version with the image digest")


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


NODE_VALIDATOR = r"""
import * as argocd from "@kubernetes-models/argo-cd/argoproj.io/v1alpha1";
import * as rollouts from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1";
import * as promop from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import * as promopAlpha from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1alpha1";
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";
import * as istio from "@kubernetes-models/istio/security.istio.io/v1";
import * as eso from "@kubernetes-models/external-secrets/external-secrets.io/v1";
import { readFileSync } from "node:fs";
const models = {
  "argoproj.io/v1alpha1": { ...rollouts, ...argocd },
  "monitoring.coreos.com/v1": promop,
  "monitoring.coreos.com/v1alpha1": promopAlpha,
  "keda.sh/v1alpha1": keda,
  "security.istio.io/v1": istio,
  "external-secrets.io/v1": eso,
};
const docs = JSON.parse(readFileSync(0, "utf8"));
let bad = 0;
for (const [where, obj] of docs) {
  const Model = (models[obj.apiVersion] || {})[obj.kind];
  if (!Model) { console.log(`NO MODEL ${where}: ${obj.apiVersion} ${obj.kind}`); bad++; continue; }
  try { new Model(obj).validate(); console.log(`ok ${where}`); }
  catch (e) { console.log(`INVALID ${where}: ${e.message}`); bad++; }
}
process.exit(bad ? 1 : 0);
"""
NPM_MODELS = ["@kubernetes-models/argo-cd@4.0.0", "@kubernetes-models/argo-rollouts@2.0.0",
              "@kubernetes-models/prometheus-operator@6.0.0", "@kubernetes-models/keda@2.0.0",
              "@kubernetes-models/istio@3.0.1", "@kubernetes-models/external-secrets@2.0.0"]


def chaos_validate(docs: list[tuple[str, dict]]) -> list[str]:
    """Chaos Mesh objects against the CRD schema vendored from Chaos Mesh
    (deploy/schemas/README.md): no validator package for it works offline."""
    import jsonschema  # noqa: PLC0415 (check-jsonschema's dependency, in the venv)
    validator = jsonschema.Draft7Validator(json.loads(CHAOS_SCHEMA.read_text()))
    return [f"INVALID {where}: {e.json_path}: {e.message}" for where, obj in docs
            for e in validator.iter_errors(obj)]


def node_validate(docs: list[tuple[str, dict]]) -> subprocess.CompletedProcess:
    prefix = Path(os.environ.get("CHECK_DEPLOY_NPM", ROOT / ".cache" / "npm-deploy"))
    script = prefix / "validate-crs.mjs"
    script.write_text(NODE_VALIDATOR)
    return subprocess.run(["node", str(script)], input=json.dumps(docs), capture_output=True, text=True)


def cmd_crd_schemas() -> None:
    """Every custom resource the chart and argocd/ ship, validated against its
    CRD's schema (@kubernetes-models/{argo-cd,argo-rollouts,prometheus-operator})."""
    docs = []
    for f in sorted((ROOT / "argocd").glob("*.yaml")) + sorted((ROOT / "argocd" / "multi-region").glob("*.yaml")):
        for d in load_all(f.read_text(), str(f.relative_to(ROOT))):
            docs.append((f"{f.relative_to(ROOT)} {d['kind']}/{d['metadata']['name']}", d))
    for f in sorted((ROOT / "deploy" / "external-secrets").glob("*.yaml")):
        for d in load_all(f.read_text(), str(f.relative_to(ROOT))):
            docs.append((f"{f.relative_to(ROOT)} {d['kind']}/{d['metadata']['name']}", d))
    for label in VALUES_FILES:
        objects, _ = render(values_of(label))
        for o in objects:
            if (group_of(o), o["kind"]) in CRD_KINDS:
                docs.append((f"{label} {o['kind']}/{o['metadata']['name']}", strip_source(o)))
    chaos = [(w, d) for w, d in docs if group_of(d) == "chaos-mesh.org"]
    docs = [(w, d) for w, d in docs if group_of(d) != "chaos-mesh.org"]
    proc = node_validate(docs)
    problems = chaos_validate(chaos)
    if proc.returncode != 0 or problems:
        fail("custom resources that their CRD schema rejects:\n    " + "\n    ".join(
            [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("ok ")] + problems))
    need(chaos, {"kind": "chaos", "metadata": {"name": "-"}}, "no Chaos Mesh object rendered by any values file")
    # The validator must be able to say no: a broken Application and Rollout.
    app = next(d for w, d in docs if d["kind"] == "Application")
    broken = json.loads(json.dumps(app))
    (broken["spec"].get("sources") or [broken["spec"].get("source")])[0]["targetRevision"] = {"not": "a string"}
    ro = next(d for w, d in docs if d["kind"] == "Rollout")
    broken_ro = json.loads(json.dumps(ro))
    broken_ro["spec"]["strategy"]["canary"]["steps"] = [{"setWeight": "ten"}]
    broken_more = []

    def first(kind):
        return json.loads(json.dumps(next(d for w, d in docs if d["kind"] == kind)))
    so = first("ScaledObject")
    so["spec"]["triggers"][0].pop("type")
    broken_more.append(("ScaledObject with a trigger without a type", so))
    pa = first("PeerAuthentication")
    pa["spec"]["mtls"]["mode"] = "STRICTEST"
    broken_more.append(("PeerAuthentication with mode STRICTEST", pa))
    ap = first("AuthorizationPolicy")
    ap["spec"]["action"] = "PERMIT"
    broken_more.append(("AuthorizationPolicy with action PERMIT", ap))
    es = first("ExternalSecret")
    es["spec"]["data"][0]["remoteRef"] = {"property": "no-key"}
    broken_more.append(("ExternalSecret whose remoteRef has no key", es))
    amc = first("AlertmanagerConfig")
    amc["spec"]["receivers"][0]["webhookConfigs"][0]["urlSecret"] = "https://hooks.example.com/token-in-git"
    broken_more.append(("AlertmanagerConfig with the webhook URL as a string instead of a Secret reference", amc))
    for what, obj in [("Application with an object as targetRevision", broken), ("Rollout with setWeight 'ten'", broken_ro)] \
            + broken_more:
        if node_validate([(what, obj)]).returncode == 0:
            fail(f"the schema validation accepted a {what}: it checks nothing")
    sched = json.loads(json.dumps(chaos[0][1]))
    sched["spec"]["type"] = 42
    pod_kill = json.loads(json.dumps(next(d for w, d in chaos if "pod-kill" in d["metadata"]["name"])))
    next(t for t in pod_kill["spec"]["workflow"]["templates"] if t["name"] == "fault")["podChaos"]["gracePeriod"] = "soon"
    for what, obj in (("Schedule whose type is a number", sched), ("PodChaos with gracePeriod 'soon'", pod_kill)):
        if not chaos_validate([(what, obj)]):
            fail(f"the Chaos Mesh schema accepted a {what}: it checks nothing")
    kinds = sorted({d["kind"] for _, d in docs + chaos})
    docs += chaos
    info(f"{len(docs)} custom resources valid against their CRD schemas ({', '.join(kinds)}); "
         "broken ones are rejected")


# --------------------------------------------------------------------------- alerts


ALERTS_VALUES = {"prometheusRule": {"enabled": True}, "redis": {"enabled": True}}
ALERTS_HEADER = """\
# Generated from the Helm chart's PrometheusRule (helm/fibonacci-api/templates/_rules.tpl)
# for release "fibonacci-api" in namespace "fibonacci-api" with Redis configured.
# Do not edit: change the chart, then run `scripts/check-deploy gen-alerts`.
# scripts/check-deploy fails while this file and the chart differ.
"""


def chart_rule_groups() -> list[dict]:
    objects, _ = render(ALERTS_VALUES)
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    if len(rules) != 1:
        fail("the chart must render exactly one PrometheusRule with prometheusRule.enabled")
    return rules[0]["spec"]["groups"]


class BlockDumper(yaml.SafeDumper):
    pass


def _str_rep(dumper, data):
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


BlockDumper.add_representer(str, _str_rep)


def cmd_gen_alerts() -> None:
    text = ALERTS_HEADER + yaml.dump({"groups": chart_rule_groups()}, Dumper=BlockDumper, sort_keys=False, width=1000)
    ALERTS.write_text(text)
    info(f"wrote {ALERTS.relative_to(ROOT)}")


def cmd_alerts_sync() -> None:
    plain = load_file(ALERTS)
    if plain.get("groups") != chart_rule_groups():
        fail(f"{ALERTS.relative_to(ROOT)} differs from the chart's PrometheusRule: run `scripts/check-deploy gen-alerts`")
    check_rule_groups({"kind": "rules", "metadata": {"name": str(ALERTS.relative_to(ROOT))}}, plain["groups"], "groups")
    alerts = sorted({r["alert"] for g in plain["groups"] for r in g["rules"] if "alert" in r})
    tested = set()
    for f in ALERT_TESTS:
        tests = load_file(f)
        tested |= {a.get("alertname") for t in tests.get("tests", []) for a in t.get("alert_rule_test", [])
                   if a.get("exp_alerts")}
    untested = set(alerts) - tested
    if untested:
        fail(f"alerts without a firing promtool test in alerts_test.yaml: {sorted(untested)}")
    # runbook_url is runbookBaseUrl + "#<alert in lower case>": the anchor of a
    # heading named after the alert in the file the base URL names.
    base = load_file(CHART / "values.yaml")["prometheusRule"]["runbookBaseUrl"]
    runbook = ROOT / base.split("/blob/main/", 1)[-1]
    if "/blob/main/" not in base or not runbook.is_file():
        fail(f"prometheusRule.runbookBaseUrl {base} names no file of this repository")
    anchors = {m.lower() for m in re.findall(r"^#+\s+`?([A-Za-z]+)`?\s*$", runbook.read_text(), re.M)}
    missing = [a for a in alerts if a.lower() not in anchors]
    if missing:
        fail(f"alerts without a runbook section in {runbook.relative_to(ROOT)} (a heading named after the alert): {missing}")
    info(f"identical to the chart; {len(alerts)} alerts, each with a firing unit test and a runbook section")


ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yaml"
# Who each environment's alerts must reach, by severity, in the example route.
EXPECTED_RECEIVERS = {("production", "critical"): "pager", ("production", "warning"): "tickets",
                      ("staging", "critical"): "chat", ("staging", "warning"): "chat"}


def cmd_alert_routes() -> None:
    """deploy/alertmanager/alertmanager.yaml is valid (amtool check-config) and
    routes every alert the chart renders for production and staging where it
    promises: production critical pages, staging never does."""
    A = {"kind": "alertmanager", "metadata": {"name": str(ALERTMANAGER.relative_to(ROOT))}}
    proc = subprocess.run(["amtool", "check-config", str(ALERTMANAGER)], capture_output=True, text=True)
    need(proc.returncode == 0, A, f"amtool check-config:\n{proc.stdout}{proc.stderr}")
    routed = 0
    for label in ("production", "staging"):
        objects, _ = render(values_of(label))
        rules = [r for o in objects if o["kind"] == "PrometheusRule" for g in o["spec"]["groups"]
                 for r in g["rules"] if "alert" in r]
        need(rules, A, f"{label}: no alerts rendered")
        for r in rules:
            labels = dict(r["labels"], alertname=r["alert"], namespace="fibonacci-api", job="fibonacci-api")
            proc = subprocess.run(["amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}"]
                                  + [f"{k}={v}" for k, v in sorted(labels.items())], capture_output=True, text=True)
            got = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
            want = EXPECTED_RECEIVERS[(labels["environment"], labels["severity"])]
            need(got == want, A, f"{label} alert {r['alert']} {r['labels']} reaches {got!r}, expected {want!r}")
            routed += 1
        if label == "production":
            inhibited = check_inhibitions(ALERTMANAGER, "fibonacci-api", rules, A)
    info(f"amtool: config valid; {routed} rendered alerts routed as promised "
         "(production critical -> pager, warning -> tickets; staging -> chat, never the pager); "
         f"a running Alertmanager held back exactly the promised alerts in {inhibited} inhibition cases")
    check_alertmanager_config_routes()


def operator_alertmanager_config(amc: dict) -> dict:
    """The Alertmanager configuration the Prometheus Operator generates from one
    AlertmanagerConfig (its default OnNamespace matcher strategy): the object's
    route under a catch-all root, with a namespace matcher and `continue: true`,
    receivers named <namespace>/<name>/<receiver>. Secret references become
    stand-in values: only the routing is under test."""
    ns, name = amc["metadata"]["namespace"], amc["metadata"]["name"]

    def rname(r):
        return f"{ns}/{name}/{r}"

    def matchers(ms):
        return [f'{m["name"]}{m.get("matchType", "=")}"{m["value"]}"' for m in ms or []]

    def route(r, top=False):
        out = {"receiver": rname(r["receiver"]),
               "matchers": ([f'namespace="{ns}"'] if top else []) + matchers(r.get("matchers"))}
        for k, v in (("groupBy", "group_by"), ("groupWait", "group_wait"), ("groupInterval", "group_interval"),
                     ("repeatInterval", "repeat_interval")):
            if k in r:
                out[v] = r[k]
        if top:
            out["continue"] = True
        if r.get("routes"):
            out["routes"] = [route(x) for x in r["routes"]]
        return out
    receivers = [{"name": "null"}]
    for r in amc["spec"]["receivers"]:
        rc = {"name": rname(r["name"])}
        if r.get("webhookConfigs"):
            rc["webhook_configs"] = [{"url": "https://tickets.example.invalid/hook"} for _ in r["webhookConfigs"]]
        if r.get("pagerdutyConfigs"):
            rc["pagerduty_configs"] = [{"routing_key": "stand-in"} for _ in r["pagerdutyConfigs"]]
        receivers.append(rc)
    namespaced = f'namespace="{ns}"'

    def inhibit(rule):
        # The operator appends the namespace matcher to both sides (unless present).
        src, tgt = matchers(rule.get("sourceMatch")), matchers(rule.get("targetMatch"))
        return {"source_matchers": src + [namespaced] * (namespaced not in src),
                "target_matchers": tgt + [namespaced] * (namespaced not in tgt),
                "equal": rule.get("equal", [])}
    return {"route": {"receiver": "null", "routes": [route(amc["spec"]["route"], top=True)]}, "receivers": receivers,
            "inhibit_rules": [inhibit(r) for r in amc["spec"].get("inhibitRules", [])]}


def check_inhibitions(config: Path, namespace: str, rules: list[dict], where: dict) -> int:
    """Runs a real Alertmanager with `config`, fires sets of the chart's rendered
    alerts at it and checks which it holds back: RateLimitsNotShared while RedisDown
    fires for the same release (and not alone, nor for another release's RedisDown),
    everything while FibonacciApiDown fires, an SLO's ticket while its page fires.
    amtool cannot test inhibition; the running Alertmanager can (its API reports
    `inhibitedBy` per alert). Returns the number of cases checked."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    need(binary, where, "no Alertmanager binary (Debian's prometheus-alertmanager) to check inhibition with")
    def rule(name: str) -> dict:
        return next(r for r in rules if r["alert"] == name)
    # The pages and tickets of one SLO share their alert name: an alert is its name,
    # severity and (per case) job.
    pages = [r for r in rules if r["labels"].get("severity") == "critical" and r["labels"].get("slo")]
    tickets = [r for r in rules if r["labels"].get("severity") == "warning" and r["labels"].get("slo")]
    slo = next(((p, t) for p in pages for t in tickets if p["labels"]["slo"] == t["labels"]["slo"]), None)
    need(slo, where, "no SLO with both a critical and a warning alert rendered: the SLO inhibition is untested")
    redis_down, not_shared, down = (rule(n) for n in
                                    ("FibonacciApiRedisDown", "FibonacciApiRateLimitsNotShared", "FibonacciApiDown"))
    # (alerts fired with their job label, and whether each must be held back): every
    # rule requires an equal job, so the cases cannot touch each other.
    cases = [
        [(redis_down, "redis", False), (not_shared, "redis", True)],
        [(not_shared, "alone", False)],
        [(redis_down, "other-release", False), (not_shared, "this-release", False)],
        [(down, "down", False), (redis_down, "down", True), (slo[1], "down", True)],
        [(slo[0], "slo", False), (slo[1], "slo", True)],
    ]

    def key(labels: dict) -> tuple:
        return labels["alertname"], labels["severity"], labels["job"]

    def labels_of(r: dict, job: str) -> dict:
        return dict(r["labels"], alertname=r["alert"], namespace=namespace, job=job)
    tmp = Path(tempfile.mkdtemp(prefix="check-deploy-am-"))
    atexit.register(shutil.rmtree, tmp, True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start([binary, f"--config.file={config}", f"--storage.path={tmp}", f"--web.listen-address=127.0.0.1:{port}",
                  "--cluster.listen-address="], tmp / "alertmanager.log")
    try:
        poll("Alertmanager ready", lambda: http(f"{base}/-/ready")[0] == 200, timeout=30)
        now = time.time()

        def stamp(t: float) -> str:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        fired = [{"labels": labels_of(r, job), "startsAt": stamp(now - 60), "endsAt": stamp(now + 3600)}
                 for case in cases for r, job, _ in case]
        req = urllib.request.Request(f"{base}/api/v2/alerts", data=json.dumps(fired).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            need(r.status == 200, where, f"Alertmanager refused the alerts: HTTP {r.status}")
        want = {key(labels_of(r, job)): held for case in cases for r, job, held in case}

        def held_back():
            got = {key(a["labels"]): bool(a["status"]["inhibitedBy"])
                   for a in json.loads(http(f"{base}/api/v2/alerts")[1])}
            return got if got == want else None
        try:
            poll("the expected inhibitions", held_back, timeout=20, every=0.5)
        except CheckFailed:
            got = json.loads(http(f"{base}/api/v2/alerts")[1])
            need(False, where, "inhibition differs from the promise: " + "; ".join(
                f'{key(a["labels"])}: held back={bool(a["status"]["inhibitedBy"])}, expected {want.get(key(a["labels"]))}'
                for a in got if bool(a["status"]["inhibitedBy"]) != want.get(key(a["labels"]))))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return len(cases)


def check_alertmanager_config_routes() -> None:
    """The chart's AlertmanagerConfig, as the operator turns it into Alertmanager
    configuration, checked with amtool: every alert the chart renders for
    production pages when critical and opens a ticket when a warning; for
    staging (prometheusRule.environment staging) nothing ever pages; alerts of
    another namespace never reach this release's receivers."""
    tmp = Path(tempfile.mkdtemp(prefix="check-deploy-amc-"))
    atexit.register(shutil.rmtree, tmp, True)
    routed = inhibited = 0
    for label, env in (("production", "production"), ("staging", "staging")):
        values = deep_merge(values_of(label), {"alertmanagerConfig": {"enabled": True}})
        objects, _ = render(values, namespace=f"fibonacci-api-{label}")
        amc = next(o for o in objects if o["kind"] == "AlertmanagerConfig")
        ns, prefix = amc["metadata"]["namespace"], f"{amc['metadata']['namespace']}/{amc['metadata']['name']}/"
        cfg = tmp / f"{label}.yaml"
        cfg.write_text(yaml.safe_dump(operator_alertmanager_config(strip_source(amc)), sort_keys=False))
        proc = subprocess.run(["amtool", "check-config", str(cfg)], capture_output=True, text=True)
        need(proc.returncode == 0, amc, f"amtool check-config of the operator's translation:\n{proc.stdout}{proc.stderr}")
        rules = [r for o in objects if o["kind"] == "PrometheusRule" for g in o["spec"]["groups"]
                 for r in g["rules"] if "alert" in r]
        for r in rules:
            for namespace, want_any in ((ns, True), ("someone-else", False)):
                labels = dict(r["labels"], alertname=r["alert"], namespace=namespace, job="fibonacci-api")
                proc = subprocess.run(["amtool", "config", "routes", "test", f"--config.file={cfg}"]
                                      + [f"{k}={v}" for k, v in sorted(labels.items())], capture_output=True, text=True)
                got = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
                want = "null" if not want_any else prefix + (
                    "pager" if r["labels"]["severity"] == "critical" and env == "production" else "tickets")
                need(got == want, amc, f"{label}: alert {r['alert']} {labels} reaches {got!r}, expected {want!r}")
                routed += 1
        inhibited += check_inhibitions(cfg, ns, rules, amc)
    info(f"AlertmanagerConfig (as the operator translates it), amtool: {routed} alert x namespace cases routed as promised "
         "(production critical -> PagerDuty, warning -> webhook; staging never pages; other namespaces untouched); "
         f"a running Alertmanager held back exactly the promised alerts in {inhibited} inhibition cases")


# --------------------------------------------------------------------------- dashboard


def dashboard_panels(d: dict):
    for p in d.get("panels", []):
        yield p
        yield from p.get("panels", []) or []


def cmd_dashboard() -> None:
    raw = DASHBOARD.read_bytes()
    if not DASHBOARD_COPY.exists() or DASHBOARD_COPY.read_bytes() != raw:
        fail(f"{DASHBOARD_COPY.relative_to(ROOT)} is not a byte-identical copy of {DASHBOARD.relative_to(ROOT)}: "
             f"cp {DASHBOARD.relative_to(ROOT)} {DASHBOARD_COPY.relative_to(ROOT)}")
    d = json.loads(raw)
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    need(variables.get("datasource", {}).get("type") == "datasource", {"kind": "dashboard", "metadata": {"name": "-"}},
         "a datasource variable is required")
    bad_uids = []

    def walk(node, where):
        if isinstance(node, dict):
            ds = node.get("datasource")
            # Prometheus through ${datasource}, Loki (the logs panel) through ${loki_datasource}.
            if isinstance(ds, dict) and (ds.get("uid"), ds.get("type")) not in (
                    ("${datasource}", "prometheus"), ("$datasource", "prometheus"), ("${loki_datasource}", "loki")):
                bad_uids.append(f"{where}: {ds}")
            if isinstance(ds, str) and ds not in ("${datasource}", "$datasource"):
                bad_uids.append(f"{where}: {ds}")
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
    walk(d, "dashboard")
    if bad_uids:
        fail("hard-coded datasources (use ${datasource}):\n  " + "\n  ".join(bad_uids))
    ids, exprs = set(), 0
    for p in dashboard_panels(d):
        need(p["id"] not in ids, {"kind": "panel", "metadata": {"name": p.get("title")}}, "duplicate panel id")
        ids.add(p["id"])
        for t in p.get("targets", []):
            exprs += 1
            used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", t["expr"]))
            unknown = {u for u in used if not u.startswith("__") and u not in variables}
            need(not unknown, {"kind": "panel", "metadata": {"name": p["title"]}}, f"undefined variables {unknown}")
    need(d.get("uid") and d.get("title"), {"kind": "dashboard", "metadata": {"name": "-"}}, "uid and title required")
    check_dashboard_failure_paths(d)
    info(f"{len(ids)} panels, {exprs} queries; copies identical; datasource only through ${{datasource}}")


SLO_VARIABLES = {"availability_target": "availabilityTarget", "latency_target": "latencyTarget",
                 "latency_threshold": "latencyThreshold"}


def check_dashboard_failure_paths(d: dict) -> None:
    """What makes a dashboard lie during an incident (issue 13): blended
    environments, range counts drawn as time series, pods that never show up,
    SLO numbers that are not the chart's."""
    D = {"kind": "dashboard", "metadata": {"name": DASHBOARD.name}}
    variables = {v["name"]: v for v in d["templating"]["list"]}
    for name in ("namespace", "job"):
        v = variables.get(name) or {}
        need(v.get("type") == "query" and v.get("includeAll") is False and v.get("multi") is False, D,
             f"variable ${name} must be single-select without All: the headline numbers would blend staging and production")
    slo = load_file(CHART / "values.yaml")["prometheusRule"]["slo"]
    for var, key in SLO_VARIABLES.items():
        v = variables.get(var)
        need(v is not None, D, f"variable ${var} (prometheusRule.slo.{key}) missing: SLO numbers must not be hard-coded")
        need(str(v.get("query")) == str(slo[key]), D,
             f"variable ${var} defaults to {v.get('query')!r} but the chart's prometheusRule.slo.{key} is {slo[key]!r}")
    exprs = [(f"panel {p['title']!r}", p, t["expr"]) for p in dashboard_panels(d) for t in p.get("targets", [])]
    exprs += [(f"annotation {a['name']!r}", a, a["expr"]) for a in d["annotations"]["list"] if a.get("expr")]
    for where, owner, e in exprs:
        need(not re.search(r'(namespace|job)=~"\$\{?(namespace|job)', e), D,
             f"{where}: select the single namespace/job with =, not =~: {e}")
        # A quantile shown for itself (p50, p99) is not an SLO number.
        bare = re.sub(r"histogram_quantile\(\s*[0-9.]+\s*,", "histogram_quantile(", e)
        for var, key in SLO_VARIABLES.items():
            literal = str(slo[key])
            need(not re.search(rf"(?<![0-9.]){re.escape(literal)}(?![0-9])", bare), D,
                 f"{where}: hard-coded SLO number {literal}: use ${var}")
        if owner.get("type") == "timeseries":
            need("$__range" not in e, D,
                 f"{where}: a time series over [$__range] draws the whole range's total at every point: use $__rate_interval")
    # The HPA panels find the chart's HPA (named $job) and KEDA's (keda-hpa-$job).
    for where, owner, e in exprs:
        for op, value in re.findall(r'horizontalpodautoscaler(=~|=)"([^"]*)"', e):
            pattern = value.replace("${job}", "fibonacci-api").replace("$job", "fibonacci-api")
            for hpa in ("fibonacci-api", "keda-hpa-fibonacci-api"):
                need(re.fullmatch(pattern, hpa) if op == "=~" else pattern == hpa, D,
                     f"{where}: horizontalpodautoscaler{op}\"{value}\" misses the HPA {hpa} (keda.enabled names it so)")
    # Every metric of the service's contract (docs/operations.md "Metrics") is
    # on the dashboard: a signal nobody can see is a failure nobody notices (the
    # connections refused at accept, for one, never reach http_requests_total).
    ops = (ROOT / "docs" / "operations.md").read_text()
    need("\n## Metrics\n" in ops, D, "docs/operations.md has no \"## Metrics\" section: the metric contract moved?")
    metrics_section = ops.split("\n## Metrics\n", 1)[-1].split("\n## ", 1)[0]
    contract = re.findall(r"^\| `([a-z_]+)` \|", metrics_section, re.M)
    # ...and the contract is every metric the service exports (src/metrics.rs names
    # each once): one added without a row is one nobody is told about.
    exported = re.findall(r'^pub const [A-Z_]+: &str = "([a-z_]+)";', (ROOT / "src" / "metrics.rs").read_text(), re.M)
    need(exported and not set(exported) - set(contract), D,
         f"metrics exported (src/metrics.rs) without a row in docs/operations.md's table: {sorted(set(exported) - set(contract))}")
    shown = " ".join(e for _, _, e in exprs)
    unseen = [m for m in contract if m != "process_" and not re.search(rf"\b{m}(_bucket|_count|_sum)?\b", shown)]
    need(contract and not unseen, D, f"metrics of docs/operations.md's contract on no panel: {unseen}")
    # A legend never states an SLO number of its own: the variables do.
    for p in dashboard_panels(d):
        for t in p.get("targets", []):
            need(not re.search(r"(?<![$\w{])[0-9]+(\.[0-9]+)?\s*(ms|s)\b", t.get("legendFormat", "")), D,
                 f"panel {p['title']!r}: legend {t.get('legendFormat')!r} hard-codes a threshold: use ${{latency_threshold}}")
    # The "Pod starts" annotation counts the API's pods only (not the load-test
    # Job's fibonacci-api-loadtest-xxxxx): the hash segments use Kubernetes'
    # alphabet, which has no vowels.
    for a in d["annotations"]["list"]:
        for pod_re in re.findall(r'pod=~"([^"]*)"', a.get("expr", "")):
            pod_re = pod_re.replace("${job}", "fibonacci-api").replace("$job", "fibonacci-api")
            need(not re.fullmatch(pod_re, "fibonacci-api-loadtest-x2x4k") and re.fullmatch(pod_re, "fibonacci-api-7d9f8b6c5-x2x4k"),
                 D, f"annotation {a['name']!r}: pod=~\"{pod_re}\" must match the API's pods and not the load-test Job's")
    for a in d["annotations"]["list"]:
        need("changes(" not in a.get("expr", ""), D,
             f"annotation {a['name']!r}: changes() on per-pod series never sees a new pod (its series starts with it)")


# The SLIs, written once here as the chart writes them once (_rules.tpl
# "fibonacci-api.sli.*"): every place that computes them must be this
# expression, so the alerts, the dashboard and the canary cannot drift apart.
def sli_error_ratio(sel: str, by: str, window: str, status: str = "5..") -> str:
    agg = f"sum by ({by})" if by else "sum"
    return (f'({agg} (rate(http_requests_total{{{sel}, status=~"{status}"}}[{window}]))'
            f' or 0 * {agg} (rate(http_requests_total{{{sel}}}[{window}])))'
            f' / {agg} (rate(http_requests_total{{{sel}}}[{window}]))')


def sli_slow_ratio(sel: str, by: str, window: str, le_regex: str) -> str:
    agg = f"sum by ({by})" if by else "sum"
    return (f"1 - (({agg} (rate(http_request_duration_seconds_bucket{{{sel}, le=~`{le_regex}(\\.0)?`}}[{window}]))"
            f" or 0 * {agg} (rate(http_request_duration_seconds_count{{{sel}}}[{window}])))"
            f" / {agg} (rate(http_request_duration_seconds_count{{{sel}}}[{window}])))")


# The business metric (issue 15 item 10): fibonacci_requested_n, a histogram of
# the n of successful answers with buckets at these bounds, labelled
# answered_from = memory | redis | computation. The dashboard shows it per range
# of n, one query per range, written once here (check sli-sync compares).
REQUESTED_N_BUCKETS = [10, 100, 1000, 10000, 100000, 1000000]


def le_regex(bound) -> str:
    """Both renderings of a bucket bound: the exporter's (le="10") and
    Prometheus 3's normalised one (le="10.0", le="1e+06")."""
    if bound == "+Inf":
        return r"\+Inf"
    g = f"{float(bound):g}"
    forms = [str(bound), rf"{bound}\.0"] + ([g.replace("+", r"\+")] if "e" in g else [])
    return "|".join(forms)


def requested_n_ranges() -> list[tuple]:
    bounds = [None] + REQUESTED_N_BUCKETS + ["+Inf"]
    return list(zip(bounds[:-1], bounds[1:]))


def requested_n_range_label(lo, hi) -> str:
    if lo is None:
        return f"n ≤ {hi:,}"
    return f"n > {lo:,}" if hi == "+Inf" else f"{lo + 1:,} ≤ n ≤ {hi:,}"


def _requested_n(sel: str, bound, window: str) -> str:
    return f"sum(rate(fibonacci_requested_n_bucket{{{sel}, le=~`{le_regex(bound)}`}}[{window}]))"


def requested_n_range_rate(sel: str, lo, hi, window: str) -> str:
    """Answers per second whose n is in (lo, hi]: the difference of two cumulative buckets."""
    top = _requested_n(sel, hi, window)
    return top if lo is None else f"{top} - {_requested_n(sel, lo, window)}"


def requested_n_range_memory_ratio(sel: str, lo, hi, window: str) -> str:
    """Share of the answers in (lo, hi] served from memory; 0 (not empty) when
    none were, as long as the range had answers at all."""
    mem = requested_n_range_rate(f'{sel}, answered_from="memory"', lo, hi, window)
    everything = requested_n_range_rate(sel, lo, hi, window)
    return f"(({mem}) or 0 * ({everything})) / ({everything})"


def promql_norm(q: str) -> str:
    return re.sub(r"\s+", "", q)


def cmd_sli_sync() -> None:
    """The error and slow ratios in the recording rules, the dashboard and the
    canary analysis are the one definition above."""
    checked = []

    def same(where: str, got: str, want: str) -> None:
        if promql_norm(got) != promql_norm(want):
            fail(f"{where} is not the SLI expression of the chart's rules:\n    got:  {' '.join(got.split())}"
                 f"\n    want: {want}")
        checked.append(where)
    rel = {"namespace": "fibonacci-api", "job": "fibonacci-api"}
    values = deep_merge(load_file(CHART / "values.yaml"), ALERTS_VALUES)
    threshold = str(values["prometheusRule"]["slo"]["latencyThreshold"])
    sel = f'namespace="{rel["namespace"]}", job="{rel["job"]}", route="/fibonacci"'
    records = {r["record"]: r["expr"] for g in chart_rule_groups() for r in g["rules"] if "record" in r}
    windows = sorted({m.group(1) for k in records for m in [re.search(r"ratio_rate(\w+)$", k)] if m})
    need({"5m", "30m", "1h", "6h", "3d"} <= set(windows), {"kind": "rules", "metadata": {"name": "recording"}},
         f"recording rules for the burn-rate windows 5m, 30m, 1h, 6h, 3d: have {windows}")
    for w in windows:
        same(f"recording rule fibonacci_api:request_errors:ratio_rate{w}",
             records[f"fibonacci_api:request_errors:ratio_rate{w}"], sli_error_ratio(sel, "namespace, job", w))
        same(f"recording rule fibonacci_api:request_slow:ratio_rate{w}",
             records[f"fibonacci_api:request_slow:ratio_rate{w}"],
             sli_slow_ratio(sel, "namespace, job", w, re.escape(threshold)))
    d = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard_panels(d)}
    dsel = 'namespace="$namespace", job="$job"'
    dfib = dsel + ', route="/fibonacci"'
    expected = {
        ("Error ratio (5xx)", "A"): sli_error_ratio(dfib, "", "$__rate_interval"),
        ("Availability (range)", "A"): f"1 - ({sli_error_ratio(dfib, '', '$__range')})",
        ("Error ratio by route", "A"): sli_error_ratio(dsel, "route", "$__rate_interval"),
        ("Error ratio by route", "B"): sli_error_ratio(dsel, "route", "$__rate_interval", status="4.."),
        ("Requests within the latency threshold (latency SLI)", "A"):
            f"1 - ({sli_slow_ratio(dfib, '', '$__rate_interval', '${latency_threshold:regex}')})",
    }
    for (title, ref), want in expected.items():
        if title.startswith(("Answers by", "Memory cache")):
            continue  # by legend, below
        need(title in panels, {"kind": "dashboard", "metadata": {"name": title}}, "panel missing")
        t = next(t for t in panels[title]["targets"] if t["refId"] == ref)
        same(f"dashboard panel {title!r} {ref}", t["expr"], want)
    for lo, hi in requested_n_ranges():
        expected[("Answers by requested n", requested_n_range_label(lo, hi))] = \
            requested_n_range_rate(dsel, lo, hi, "$__rate_interval")
        expected[("Memory cache hit ratio by requested n", requested_n_range_label(lo, hi))] = \
            requested_n_range_memory_ratio(dsel, lo, hi, "$__rate_interval")
    for (title, ref), want in expected.items():
        if title.startswith(("Answers by", "Memory cache")):
            need(title in panels, {"kind": "dashboard", "metadata": {"name": title}}, "panel missing")
            t = next((t for t in panels[title]["targets"] if t["legendFormat"] == ref), None)
            need(t, {"kind": "dashboard", "metadata": {"name": title}}, f"no query for the range {ref}")
            same(f"dashboard panel {title!r} {ref}", t["expr"], want)
    objects, _ = render(values_of("all-features"))
    for o in objects:
        if o["kind"] == "AnalysisTemplate":
            for m in o["spec"]["metrics"]:
                csel = (f'namespace="{o["metadata"]["namespace"]}", job="fibonacci-api", route="/fibonacci", '
                        'rollouts_pod_template_hash="{{args.canary-hash}}"')
                window = values_of("all-features").get("rollout", {}).get("analysis", {}).get("rateWindow") \
                    or load_file(CHART / "values.yaml")["rollout"]["analysis"]["rateWindow"]
                same(f"AnalysisTemplate {o['metadata']['name']} metric {m['name']}",
                     m["provider"]["prometheus"]["query"], f"({sli_error_ratio(csel, '', window)}) or on() vector(NaN)")
    need(any(c.startswith("AnalysisTemplate") for c in checked), {"kind": "AnalysisTemplate", "metadata": {"name": "-"}},
         "no AnalysisTemplate rendered with all-features values")
    info(f"{len(checked)} SLI expressions are the chart's one definition: " + "; ".join(checked))


def argo_outcome(metric: dict, value: float) -> str:
    """How Argo Rollouts judges one measurement: its successCondition and
    failureCondition (expr-lang; the chart uses only !, &&, isNaN, <=, >)
    evaluated on result = [value]."""
    def ev(cond: str) -> bool:
        py = cond.replace("&&", " and ").replace("||", " or ").replace("!isNaN", "not isNaN")
        need(re.fullmatch(r"[\sA-Za-z0-9_.\[\]()<>=]*", py), {"kind": "AnalysisTemplate", "metadata": {"name": "-"}},
             f"condition {cond!r} uses more than this check understands")
        return bool(eval(py, {"__builtins__": {}}, {"isNaN": lambda x: x != x, "result": [value]}))  # noqa: S307
    if metric.get("failureCondition") and ev(metric["failureCondition"]):
        return "Failed"
    if metric.get("successCondition") and ev(metric["successCondition"]):
        return "Successful"
    return "Inconclusive"


def run_promtool_tests(tmp: Path, name: str, rule_files: list[str], tests: list[dict]) -> None:
    doc = {"rule_files": rule_files, "evaluation_interval": "15s",
           "group_eval_order": ["fibonacci-api.slo.rules", "fibonacci-api.alerts"] if rule_files else [],
           "tests": tests}
    path = tmp / f"{name}_test.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
    proc = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"promtool test rules {name}:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")


def series(name: str, labels: dict, values: str) -> dict:
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def cmd_promql_scenarios() -> None:
    """Scenario tests, with promtool, of queries the chart renders from values:
    the latency SLI for an integer threshold in both renderings of its bucket
    (le="1" from the exporter, le="1.0" as Prometheus 3 stores it), the canary
    analysis (all-5xx canary, healthy canary, no canary traffic) judged by its
    own success and failure conditions, and the dashboard's SLI stats and pod
    annotation during an outage."""
    tmp = Path(tempfile.mkdtemp(prefix="check-deploy-promql-"))
    atexit.register(shutil.rmtree, tmp, True)
    rel = {"namespace": "fibonacci-api", "job": "fibonacci-api"}

    # 1. latency threshold "1": both bucket renderings.
    objects, _ = render(deep_merge(ALERTS_VALUES, {"prometheusRule": {"slo": {"latencyThreshold": "1"}}}))
    groups = next(o for o in objects if o["kind"] == "PrometheusRule")["spec"]["groups"]
    (tmp / "rules-le1.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000))
    tests = []
    for le in ("1", "1.0"):
        for slow, pages in ((300, True), (2, False)):
            base = rel | {"pod": "fibonacci-api-7d9f8b6c5-x2x4k", "method": "GET", "route": "/fibonacci", "status": "200"}
            tests.append({
                "name": f'le="{le}": {slow / 10:g}% slower than 1 s {"pages" if pages else "stays silent"}',
                "interval": "15s",
                "input_series": [
                    series("http_request_duration_seconds_bucket", base | {"le": "0.5"}, f"1000+{(1000 - slow) // 2}x80"),
                    series("http_request_duration_seconds_bucket", base | {"le": le}, f"1000+{1000 - slow}x80"),
                    series("http_request_duration_seconds_bucket", base | {"le": "+Inf"}, "1000+1000x80"),
                    series("http_request_duration_seconds_count", base, "1000+1000x80"),
                ],
                "promql_expr_test": [
                    {"expr": "round(fibonacci_api:request_slow:ratio_rate5m, 0.0001)", "eval_time": "10m",
                     "exp_samples": [{"labels": '{job="fibonacci-api", namespace="fibonacci-api"}', "value": slow / 1000}]},
                    {"expr": 'count(ALERTS{alertname="FibonacciApiLatencyBurnRate", alertstate="firing", severity="critical"})',
                     "eval_time": "15m", "exp_samples": [{"labels": "{}", "value": 2}] if pages else []},
                ]})
    run_promtool_tests(tmp, "latency-threshold", ["rules-le1.yaml"], tests)
    info('latency SLI with latencyThreshold "1": le="1" and le="1.0" buckets give the same ratio; '
         "30% slow pages, 0.2% slow stays silent, in both renderings")

    # 2. the canary analysis, judged by its own conditions.
    objects, _ = render(values_of("all-features"))
    at = next(o for o in objects if o["kind"] == "AnalysisTemplate")
    metric = at["spec"]["metrics"][0]
    canary, stable = "5f7d9c8b6", "6c4b7f9d2"
    query = re.sub(r"\{\{\s*args\.canary-hash\s*\}\}", canary, metric["provider"]["prometheus"]["query"])
    delay = metric.get("initialDelay")
    need(delay, at, "initialDelay missing: the first measurement would run before the canary has been scraped")

    def pod(hash_, status, values, n=0):
        return series("http_requests_total", rel | {"pod": f"fibonacci-api-{hash_}-p{n}xyz", "route": "/fibonacci",
                                                     "method": "GET", "status": status,
                                                     "rollouts_pod_template_hash": hash_}, values)
    stable_pods = [pod(stable, "200", "50000+300x40", 1), pod(stable, "500", "12+0x40", 1)]
    scenarios = [
        ("a canary answering only 5xx", [pod(canary, "500", "0+75x40")], 1.0, "Failed"),
        ("a healthy canary (0.2% 5xx)", [pod(canary, "200", "0+998x40"), pod(canary, "500", "0+2x40")], 0.002, "Successful"),
        ("a canary without traffic yet", [], float("nan"), "Inconclusive"),
    ]
    tests = []
    for what, canary_series, value, outcome in scenarios:
        got = argo_outcome(metric, value)
        need(got == outcome, at, f"{what}: the conditions judge {value} {got}, expected {outcome}")
        is_nan = value != value
        tests.append({
            "name": f"canary analysis: {what} measures {value} ({outcome})",
            "interval": "15s",
            "input_series": stable_pods + canary_series,
            "promql_expr_test": [{
                # promtool cannot expect NaN: x != bool x is 1 exactly for NaN.
                "expr": f"({query}) != bool ({query})" if is_nan else f"round({query}, 0.0001)",
                "eval_time": delay,
                "exp_samples": [{"labels": "{}", "value": 1 if is_nan else value}]}]})
    tests.append({
        "name": "canary analysis: before two scrapes of the canary the measurement is NaN (why initialDelay)",
        "interval": "15s",
        "input_series": stable_pods + [series("http_requests_total", rel | {
            "pod": f"fibonacci-api-{canary}-p0xyz", "route": "/fibonacci", "method": "GET", "status": "200",
            "rollouts_pod_template_hash": canary}, "_x4 0+998x36")],
        "promql_expr_test": [{"expr": f"({query}) != bool ({query})", "eval_time": "1m",
                              "exp_samples": [{"labels": "{}", "value": 1}]}]})
    run_promtool_tests(tmp, "canary-analysis", [], tests)
    limit = metric.get("failureLimit", 0)
    info(f"canary analysis ({metric['name']}, initialDelay {delay}): only-5xx canary measures 1 -> Failed, "
         f"aborted at the {limit + 1}. failed measurement; healthy 0.002 -> Successful; no traffic NaN -> Inconclusive")

    # 3. the dashboard during a total outage.
    d = json.loads(DASHBOARD.read_text())
    values = dashboard_variable_values(d)
    panels = {p["title"]: p for p in dashboard_panels(d)}

    def dq(title, ref="A"):
        return grafana_expr(next(t for t in panels[title]["targets"] if t["refId"] == ref)["expr"], values)
    ann = next(a for a in d["annotations"]["list"] if a.get("expr"))
    base = rel | {"method": "GET", "route": "/fibonacci"}
    outage = [series("http_requests_total", base | {"pod": "fibonacci-api-7d9f8b6c5-x2x4k", "status": "500"}, "0+60x40"),
              series("http_request_duration_seconds_bucket", base | {"pod": "a", "status": "500", "le": "0.1"}, "0x40"),
              series("http_request_duration_seconds_bucket", base | {"pod": "a", "status": "500", "le": "+Inf"}, "0+60x40"),
              series("http_request_duration_seconds_count", base | {"pod": "a", "status": "500"}, "0+60x40"),
              series("kube_pod_created", {"namespace": "fibonacci-api", "pod": "fibonacci-api-7d9f8b6c5-x2x4k"}, "0x40"),
              # a pod created at 5m (its series starts then, with its creation time)
              series("kube_pod_created", {"namespace": "fibonacci-api", "pod": "fibonacci-api-7d9f8b6c5-q8wzt"}, "_x19 300x20"),
              series("kube_pod_created", {"namespace": "fibonacci-api", "pod": "fibonacci-api-redis-6b5d4c8f7-r2d2x"}, "_x19 300x20")]
    tests = [{
        "name": "dashboard during a total outage (every answer 5xx, every answer slow) and a new pod",
        "interval": "15s",
        "input_series": outage,
        "promql_expr_test": [
            {"expr": dq("Error ratio (5xx)"), "eval_time": "6m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": dq("Availability (range)"), "eval_time": "6m", "exp_samples": [{"labels": "{}", "value": 0}]},
            {"expr": dq("Error ratio by route"), "eval_time": "6m",
             "exp_samples": [{"labels": '{route="/fibonacci"}', "value": 1}]},
            {"expr": dq("Requests within the latency threshold (latency SLI)"), "eval_time": "6m",
             "exp_samples": [{"labels": "{}", "value": 0}]},
            {"expr": grafana_expr(ann["expr"], values), "eval_time": "6m",
             "exp_samples": [{"labels": '{pod="fibonacci-api-7d9f8b6c5-q8wzt"}', "value": 1}]},
            {"expr": grafana_expr(ann["expr"], values), "eval_time": "9m", "exp_samples": []},
        ]}]
    run_promtool_tests(tmp, "dashboard", [], tests)

    # 4. the business panels (fibonacci_requested_n) from both renderings of
    #    the buckets: the exporter's le="10", Prometheus 3's le="10.0"/"1e+06".
    d = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard_panels(d)}
    per_second = {"memory": [2, 1, 0, 0, 0, 0, 0], "computation": [0, 1, 1, 0, 0, 0, 0]}
    want_rate, want_hit = [2, 2, 1, 0, 0, 0, 0], [1, 0.5, 0, None, None, None, None]
    tests = []
    for style in ("exporter", "prometheus3"):
        inputs = []
        for source, rates in per_second.items():
            cumulative = 0
            for (lo, hi), r in zip(requested_n_ranges(), rates):
                cumulative += r
                if hi == "+Inf":
                    le = "+Inf"
                elif style == "exporter":
                    le = str(hi)
                else:
                    le = f"{float(hi):g}" if "e" in f"{float(hi):g}" else f"{hi}.0"
                inputs.append(series("fibonacci_requested_n_bucket", rel | {"pod": "fibonacci-api-7d9f8b6c5-x2x4k",
                                     "answered_from": source, "le": le}, f"0+{cumulative * 15}x40"))
        exprs = []
        for (lo, hi), rate_, hit in zip(requested_n_ranges(), want_rate, want_hit):
            label = requested_n_range_label(lo, hi)
            q = next(t["expr"] for t in panels["Answers by requested n"]["targets"] if t["legendFormat"] == label)
            exprs.append({"expr": f"round({grafana_expr(q, values)}, 0.001)", "eval_time": "8m",
                          "exp_samples": [{"labels": "{}", "value": rate_}]})
            if hit is not None:
                q = next(t["expr"] for t in panels["Memory cache hit ratio by requested n"]["targets"] if t["legendFormat"] == label)
                exprs.append({"expr": f"round({grafana_expr(q, values)}, 0.001)", "eval_time": "8m",
                              "exp_samples": [{"labels": "{}", "value": hit}]})
        tests.append({"name": f"business panels, {style} bucket labels", "interval": "15s", "input_series": inputs,
                      "promql_expr_test": exprs})
    run_promtool_tests(tmp, "business-panels", [], tests)
    info("business panels with le=\"10\" and le=\"10.0\"/\"1e+06\" buckets: answers per range of n 2, 2, 1, 0...; "
         "memory hit ratio 100% for n <= 10, 50% for 11-100, 0% (not empty) for 101-1,000")
    info("dashboard during a total outage: 5xx ratio 100%, availability 0, latency SLI 0; "
         f"annotation {ann['name']!r} shows the pod created at 5 m, and not the Redis pod")


ALLOY = ROOT / "deploy" / "alloy" / "config.alloy"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "datasources.yaml"


def alloy_components(text: str) -> tuple[dict[str, str], list[str]]:
    """Alloy's configuration syntax, enough to check references: the top-level
    blocks (`type.name "label" { ... }`) and every `a.b.c.export` reference."""
    text = re.sub(r"//[^\n]*", "", text)
    need(text.count("{") == text.count("}"), {"kind": "alloy", "metadata": {"name": ALLOY.name}}, "unbalanced braces")
    blocks, depth, i = {}, 0, 0
    for m in re.finditer(r'([a-z_.]+)\s+"([A-Za-z0-9_]+)"\s*\{|[{}]', text):
        if m.group(1) and depth == 0:
            blocks[f"{m.group(1)}.{m.group(2)}"] = m.group(1)
            depth += 1
        elif m.group(0).endswith("{"):
            depth += 1
        else:
            depth -= 1
    refs = re.findall(r"=\s*\[?\s*((?:[a-z_]+\.)+[A-Za-z0-9_]+)\.(?:receiver|targets|output)\b", text)
    return blocks, refs


def cmd_logs_config() -> None:
    """Logs in Loki, linked to traces: compose runs Loki and Alloy with the
    files this repository ships; Alloy's pipeline references only components it
    defines and ends in Loki; Grafana's data sources link both ways (a log
    line's trace_id opens the trace in Jaeger, a trace opens its logs in Loki),
    every uid they name exists, the fields they match are the ones Alloy
    attaches, and the dashboard's logs panel selects labels Alloy sets."""
    A = {"kind": "alloy", "metadata": {"name": str(ALLOY.relative_to(ROOT))}}
    text = ALLOY.read_text()
    blocks, refs = alloy_components(text)
    for r in refs:
        need(r in blocks, A, f"references {r}, which is not defined (defined: {sorted(blocks)})")
    need(any(t == "loki.write" for t in blocks.values()), A, "no loki.write: the lines go nowhere")
    url = re.search(r'url\s*=\s*"([^"]+)"', text).group(1)
    compose = load_file(ROOT / "compose.yaml")
    services = compose["services"]
    need(urllib.parse.urlparse(url).hostname in services, A, f"pushes to {url}: no such compose service")
    for svc, path in (("loki", "deploy/loki/loki.yaml"), ("alloy", "deploy/alloy/config.alloy")):
        vols = [v.split(":")[0] for v in services[svc].get("volumes", [])]
        need(f"./{path}" in vols, {"kind": "compose", "metadata": {"name": svc}}, f"does not mount ./{path}")
    need(services["api"]["environment"].get("LOG_FORMAT") == "json", {"kind": "compose", "metadata": {"name": "api"}},
         "LOG_FORMAT must be json: Alloy parses JSON lines")
    loki_cfg = load_file(ROOT / "deploy" / "loki" / "loki.yaml")
    need(dig(loki_cfg, "limits_config", "allow_structured_metadata") is True, A,
         "Loki must accept structured metadata (trace_id, request_id)")
    structured = set(re.findall(r"^\s*([a-z_]+)\s*=\s*\"\",?$",
                                re.search(r"stage\.structured_metadata\s*\{(.*?)\n  \}", text, re.S).group(1), re.M))
    labels = set(re.findall(r"^\s*([a-z_]+)\s*=\s*\"\",?$",
                            re.search(r"stage\.labels\s*\{(.*?)\n  \}", text, re.S).group(1), re.M))
    labels |= set(re.findall(r'target_label\s*=\s*"([a-z_]+)"', text))
    need({"trace_id", "request_id"} <= structured, A, f"trace_id and request_id must be structured metadata: {structured}")
    # Grafana's data sources.
    D = {"kind": "datasources", "metadata": {"name": str(DATASOURCES.relative_to(ROOT))}}
    dss = {d["uid"]: d for d in load_file(DATASOURCES)["datasources"]}
    lokis = [d for d in dss.values() if d["type"] == "loki"]
    need(lokis, D, "no Loki data source")
    loki = lokis[0]
    need(urllib.parse.urlparse(loki["url"]).hostname in services, D, f"Loki at {loki['url']}: no such compose service")
    fields = {f["matcherRegex"]: f for f in dig(loki, "jsonData", "derivedFields", default=[])}
    need("trace_id" in fields, D, "no derived field for trace_id: log lines would not open their trace")
    for name, f in fields.items():
        need(f.get("matcherType") == "label" and name in structured | labels, D,
             f"derived field {name}: must match a label or structured metadata field Alloy attaches ({sorted(structured)})")
        need(f.get("datasourceUid") in dss, D, f"derived field {name} links to data source uid {f.get('datasourceUid')!r}, "
                                               f"which is not provisioned ({sorted(dss)})")
        need("$${__value.raw}" in f.get("url", ""), D, f"derived field {name}: url must use $${{__value.raw}} "
                                                        "($$ escapes provisioning's own $ expansion)")
    need(dss[fields["trace_id"]["datasourceUid"]]["type"] in ("jaeger", "tempo"), D, "trace_id must open a tracing data source")
    tracing = dss[fields["trace_id"]["datasourceUid"]]
    t2l = dig(tracing, "jsonData", "tracesToLogsV2") or {}
    need(t2l.get("datasourceUid") == loki["uid"], D, f"{tracing['name']}: tracesToLogsV2 must name the Loki uid {loki['uid']}")
    need(t2l.get("filterByTraceID") is True, D, f"{tracing['name']}: tracesToLogsV2.filterByTraceID must be true")
    for tag in t2l.get("tags", []):
        need(tag.get("value", tag["key"]) in labels, D, f"tracesToLogsV2 tag {tag} maps to {tag.get('value')}, not a Loki label "
                                                        f"Alloy sets ({sorted(labels)})")
    # The dashboard's logs panel selects what Alloy labels.
    d = json.loads(DASHBOARD.read_text())
    for p in dashboard_panels(d):
        for t in p.get("targets", []):
            if dig(t, "datasource", "type") == "loki":
                used = set(re.findall(r"([a-z_]+)\s*=~?\s*\"", t["expr"]))
                need(used <= labels | {"namespace"}, D, f"logs panel {p['title']!r} selects {used - labels}, "
                                                          f"labels Alloy does not set ({sorted(labels)})")
    info(f"Alloy: {len(blocks)} components, {len(refs)} references all defined, JSON lines -> labels {sorted(labels)} + "
         f"structured metadata {sorted(structured)} -> {url}; Grafana: derived fields {sorted(fields)} -> "
         f"{', '.join(sorted({f['datasourceUid'] for f in fields.values()}))}, {tracing['name']} -> logs in {loki['name']}")


def cmd_log_lines() -> None:
    """The fields Alloy reads (stage.json) are in the lines the service really
    writes: the real binary with LOG_FORMAT=json and tracing on (to a local
    port that accepts nothing), one request with an X-Request-Id."""
    binary = service_binary()
    atexit.register(_cleanup)
    tmp = Path(tempfile.mkdtemp(prefix="check-deploy-logs-"))
    atexit.register(shutil.rmtree, tmp, True)
    wanted = dict(re.findall(r'^\s*([a-z_]+)\s*=\s*"([^"]+)",?$',
                             re.search(r"stage\.json\s*\{(.*?)\n  \}", ALLOY.read_text(), re.S).group(1), re.M))
    port, sink = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "REDIS_", "RATE_LIMIT"))}
    env |= {"LISTEN_ADDR": f"127.0.0.1:{port}", "LOG_FORMAT": "json", "RUST_LOG": "info", "SHUTDOWN_DRAIN_SECONDS": "0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink}", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    log = tmp / "service.log"
    svc = start([str(binary)], log, env=env)
    poll("the service's /health", lambda: http(f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200, 30)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/fibonacci?n=10", headers={"X-Request-Id": "check-deploy.42"})
    urllib.request.urlopen(req, timeout=5).read()

    def line():
        for raw in log.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if doc.get("request_id") == "check-deploy.42":
                return doc
        return None
    doc = poll("the request's log line", line, 10)
    svc.terminate()
    svc.wait(timeout=20)
    missing = [f"{src} (for {name})" for name, src in wanted.items() if src not in doc]
    need(not missing, {"kind": "alloy", "metadata": {"name": ALLOY.name}},
         f"stage.json reads fields the service does not write: {missing}; a request's line: {doc}")
    need(re.fullmatch(r"[0-9a-f]{32}", doc["trace_id"]), {"kind": "log line", "metadata": {"name": "-"}},
         f"trace_id {doc['trace_id']!r} is not a W3C trace id: Jaeger could not open it")
    info(f"a request's JSON line has every field Alloy reads ({', '.join(sorted(wanted.values()))}); "
         f"request_id {doc['request_id']}, trace_id {doc['trace_id']}")


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        lines.append((word.upper(), rest.strip()))
        buf = ""
    return lines


def dockerignore_excludes(patterns: list[str], rel: str) -> bool:
    """Docker's .dockerignore semantics for the patterns this repo uses: the
    last matching pattern wins; '!' re-includes; a directory pattern covers its
    contents."""
    def to_regex(pat: str) -> re.Pattern:
        out = ""
        for token in re.split(r"(\*\*|\*|\?)", pat):
            out += {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        return re.compile(out)
    excluded = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for p in patterns:
        neg = p.startswith("!")
        rx = to_regex((p[1:] if neg else p).strip("/"))
        if any(rx.fullmatch(pre) for pre in prefixes):
            excluded = not neg
    return excluded


def cmd_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    ins = dockerfile_instructions(text)
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    bins = [b["name"] for b in cargo.get("bin", [])] or [cargo["package"]["name"]]
    D = {"kind": "Dockerfile", "metadata": {"name": "Dockerfile"}}
    need("fibonacci-api" in bins, D, f"Cargo.toml has no [[bin]] fibonacci-api (bins: {bins})")
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    # Files Cargo needs to build: the manifest, lockfile, every declared target
    # (a declared target whose file is missing fails `cargo build` for all
    # targets), the default src/ targets and any build script.
    needed = ["Cargo.toml", "Cargo.lock"]
    default_dirs = {"bin": "src/bin", "bench": "benches", "test": "tests", "example": "examples"}
    for section in ("lib", "bin", "bench", "test", "example"):
        entries = cargo.get(section)
        entries = [entries] if isinstance(entries, dict) else (entries or [])
        for e in entries:
            if e.get("path"):
                needed.append(e["path"])
            elif section != "lib" and not (section == "bin" and e.get("name") == cargo["package"]["name"]):
                name = e["name"]
                d = default_dirs[section]
                found = [p for p in (f"{d}/{name}.rs", f"{d}/{name}/main.rs") if (ROOT / p).exists()]
                needed.append(found[0] if found else f"{d}/{name}.rs")
    for default in ("src/main.rs", "src/lib.rs"):
        if (ROOT / default).exists():
            needed.append(default)
    build = cargo.get("package", {}).get("build")
    if build or (ROOT / "build.rs").exists():
        needed.append(build if isinstance(build, str) else "build.rs")
    # Targets cargo only auto-discovers (not declared) may stay out of the
    # context: a missing directory just means no such target.
    needed = list(dict.fromkeys(needed))
    copies_all = False
    for word, rest in ins:
        if word in ("COPY", "ADD"):
            args = [a for a in rest.split() if not a.startswith("--")]
            if any(a.startswith("--from") for a in rest.split()):
                continue
            if rest.strip().startswith("["):
                args = json.loads(rest[rest.index("["):])
            for src in args[:-1]:
                if src in (".", "./"):
                    copies_all = True
                    continue
                need((ROOT / src).exists(), D, f"{word} source {src} does not exist")
                need(not dockerignore_excludes(ignore, src.rstrip("/")), D, f"{word} source {src} is excluded by .dockerignore")
    for path in needed:
        need((ROOT / path).exists(), D, f"Cargo.toml needs {path}, which does not exist")
        need(not dockerignore_excludes(ignore, path), D, f"{path} is needed by cargo but excluded by .dockerignore")
        if not copies_all:
            need(any(word == "COPY" and (path.split("/")[0] in rest.split()) for word, rest in ins), D,
                 f"{path} is needed by cargo but never COPYed")
    for secret in (".git", "target", ".venv", ".env"):
        need(dockerignore_excludes(ignore, secret), D, f".dockerignore must exclude {secret}")
    stages = [rest for word, rest in ins if word == "FROM"]
    final = stages[-1]
    need("distroless" in final or final.startswith("scratch"), D, f"final stage {final} is not distroless/scratch")
    stage_names = set()
    for s in stages:
        words = s.split()
        image = words[0]
        if image not in stage_names:
            need(image == "scratch" or ":" in image or "@" in image, D, f"FROM {image} is not pinned")
            need(not image.endswith(":latest"), D, f"FROM {image}: never :latest")
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2])
    user = [rest for word, rest in ins if word == "USER"]
    need(user and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", user[-1]), D, "final USER must be a numeric non-root uid[:gid]")
    build_cmds = " ".join(rest for word, rest in ins if word == "RUN")
    need("--bin fibonacci-api" in build_cmds and "--locked" in build_cmds, D, "cargo build --locked --bin fibonacci-api missing")
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    need(entry and json.loads(entry[-1])[0].endswith("/fibonacci-api"), D, "ENTRYPOINT must exec the fibonacci-api binary")
    hc = [rest for word, rest in ins if word == "HEALTHCHECK"]
    need(hc and "CMD [" in hc[-1], D, "HEALTHCHECK must use the exec form (no shell in distroless)")
    hc_cmd = json.loads(hc[-1][hc[-1].index("["):])
    need(hc_cmd[0] == json.loads(entry[-1])[0] and "healthcheck" in hc_cmd, D,
         "HEALTHCHECK must run the binary's healthcheck subcommand")
    build_rs = ROOT / (build if isinstance(build, str) else "build.rs")
    if build_rs.exists() and "GIT_REVISION" in build_rs.read_text():
        need("GIT_REVISION=" in build_cmds, D, "build.rs reads GIT_REVISION but the build does not set it (no .git in the context)")
    exposed = " ".join(rest for word, rest in ins if word == "EXPOSE")
    need("5000" in exposed, D, "EXPOSE 5000 missing")
    labels = " ".join(rest for word, rest in ins if word == "LABEL")
    for lab in ("org.opencontainers.image.source", "org.opencontainers.image.version", "org.opencontainers.image.revision"):
        need(lab in labels, D, f"OCI label {lab} missing")
    info(f"binary fibonacci-api (Cargo.toml bins: {bins}); build context has {', '.join(needed)}; "
         f"{len(stages)} stages, final {final.split()[0]}, USER {user[-1]}")


TRACE_FLUSH_SECONDS = 10  # the OTLP exporter's default export timeout (OTEL_EXPORTER_OTLP_TIMEOUT)


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"([0-9.]+)(ms|s|m|h)", str(text))
    need(parts and "".join(a + b for a, b in parts) == str(text), {"kind": "duration", "metadata": {"name": str(text)}},
         "not a duration")
    return sum(float(a) * units[b] for a, b in parts)


def image_ref(ref: str) -> tuple[str, str]:
    """(repository with registry, tag) of an image reference, Docker Hub names normalised."""
    ref = ref.split("@")[0]
    name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "latest")
    if "/" not in name:
        name = "docker.io/library/" + name
    elif "." not in name.split("/")[0]:
        name = "docker.io/" + name
    return name, tag


def cmd_images() -> None:
    """Reproducible image and covered images: every base image pinned by
    digest, no build-time timestamp, SOURCE_DATE_EPOCH from the commit;
    compose's stop_grace_period above the service's worst-case shutdown;
    Dependabot watching every image the chart, compose and CI run; Chart.yaml's
    artifacthub.io/images naming what the chart deploys."""
    D = {"kind": "Dockerfile", "metadata": {"name": "Dockerfile"}}
    ins = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    stages = set()
    for word, rest in ins:
        if word == "FROM":
            image = rest.split()[0]
            if image not in stages and image != "scratch":
                need(re.search(r":[^/@]+@sha256:[0-9a-f]{64}$", image), D,
                     f"FROM {image}: pin tag@sha256:digest (the tag tells Dependabot the version line)")
            if " AS " in rest.upper():
                stages.add(rest.split()[-1])
    for word, rest in ins:
        need(not (word in ("ARG", "LABEL") and re.search(r"CREATED|image\.created", rest)), D,
             f"{word} {rest[:60]}: a build-time timestamp makes every build different (BuildKit takes dates "
             "from SOURCE_DATE_EPOCH)")
    release = load_file(ROOT / ".github" / "workflows" / "release.yml")
    build = next(st for st in release["jobs"]["image"]["steps"] if "build-push-action" in st.get("uses", ""))
    need("SOURCE_DATE_EPOCH=" in build["with"]["build-args"] and "CREATED" not in build["with"]["build-args"], D,
         "release.yml must pass SOURCE_DATE_EPOCH (the commit time), not a CREATED build time")
    need("rewrite-timestamp=true" in build["with"]["outputs"], D, "release.yml: rewrite-timestamp=true for reproducible layers")

    # compose: Docker must not kill the API before it has drained and flushed.
    compose = load_file(ROOT / "compose.yaml")
    api = compose["services"]["api"]
    env = api.get("environment") or {}
    drain = float(env.get("SHUTDOWN_DRAIN_SECONDS", 5))
    deadline = float(env.get("REQUEST_TIMEOUT_MS", 10000)) / 1000
    worst = drain + deadline + TRACE_FLUSH_SECONDS
    grace = duration_seconds(api.get("stop_grace_period", "10s"))
    need(grace > worst, {"kind": "compose", "metadata": {"name": "api"}},
         f"stop_grace_period {grace:g}s does not exceed the worst-case shutdown {worst:g}s "
         f"(drain {drain:g} + request deadline {deadline:g} + trace flush {TRACE_FLUSH_SECONDS})")

    # Dependabot covers every image.
    dep = load_file(ROOT / ".github" / "dependabot.yml")
    ecosystems = {(u["package-ecosystem"], u["directory"].rstrip("/") or "/") for u in dep["updates"]}
    covered: dict[tuple[str, str], str] = {}
    for word, rest in ins:
        if word == "FROM" and rest.split()[0] not in stages:
            need(("docker", "/") in ecosystems, D, "Dependabot (docker, /) must watch the Dockerfile's base images")
            covered[image_ref(rest.split()[0])] = "Dockerfile"
    for name, svc in compose["services"].items():
        if svc.get("image") and not svc.get("build"):
            need(("docker-compose", "/") in ecosystems, D, "Dependabot (docker-compose, /) must watch compose.yaml")
            covered[image_ref(svc["image"])] = "compose.yaml"
    chart_dir = "/" + str(CHART.relative_to(ROOT))
    # Every pod the chart can run: the API, the in-cluster Redis, the test pod, the load test.
    objects, _ = render({"redis": {"enabled": True}, "loadTest": {"enabled": True},
                         "config": {"TRUSTED_PROXIES": "10.0.0.0/8"}})
    deployed = {c["image"] for o in objects if o["kind"] in POD_KINDS for c in pod_spec_of(o)[0]["containers"]}
    own = load_file(CHART / "values.yaml")["image"]["repository"]
    for img in deployed:
        if img.startswith(own):
            continue  # our own image: release.yml and promote.yml pin it
        need(("helm", chart_dir) in ecosystems, D, f"Dependabot (helm, {chart_dir}) must watch the chart's image {img}")
        covered.setdefault(image_ref(img), "the chart")
    ci = load_file(ROOT / ".github" / "workflows" / "ci.yml")
    for job, spec in ci["jobs"].items():
        for name, svc in (spec.get("services") or {}).items():
            ref = image_ref(svc["image"])
            need(ref in covered, {"kind": "ci.yml", "metadata": {"name": f"{job}.services.{name}"}},
                 f"{svc['image']} is not an image Dependabot keeps current (it watches no workflow service "
                 f"containers): use the same image as {', '.join(sorted({f'{r[0]}:{r[1]}' for r in covered if r[0] == ref[0]})) or 'compose or the chart'}")

    # Chart.yaml names the images the chart deploys.
    chart_meta = load_file(CHART / "Chart.yaml")
    listed = {i["image"] for i in yaml.safe_load(chart_meta["annotations"]["artifacthub.io/images"])}
    need(listed == deployed, {"kind": "Chart", "metadata": {"name": "Chart.yaml"}},
         f"artifacthub.io/images {sorted(listed)} != the images the chart deploys {sorted(deployed)}")
    chart_job = release["jobs"]["chart"]["steps"]
    need(any("artifacthub.io/images" in st.get("run", "") for st in chart_job), D,
         "release.yml rewrites the chart's image to the release digest: it must rewrite artifacthub.io/images too")
    info(f"base images pinned by digest; no build timestamp; compose grace {grace:g}s > worst-case shutdown {worst:g}s; "
         f"Dependabot watches {len(covered)} images (Dockerfile, compose, chart; CI's service image is one of them); "
         "artifacthub.io/images = the chart's images")


# --------------------------------------------------------------------------- PromQL


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                   "bool", "offset", "atan2", "nan", "inf", "start", "end"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}


def promql_selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The vector selectors of a PromQL expression as (metric name, [(label, op,
    value)]). A small tokenizer rather than a parser: enough for metric-name
    and label checks (Prometheus itself checks the syntax)."""
    out, i, n = [], 0, len(expr)

    def skip_ws(j):
        while j < n and expr[j] in " \t\r\n":
            j += 1
        return j

    def read_string(j):
        q = expr[j]
        j += 1
        buf = ""
        while j < n and expr[j] != q:
            if expr[j] == "\\" and q != "`":
                buf += expr[j: j + 2]
                j += 2
                continue
            buf += expr[j]
            j += 1
        return buf, j + 1

    def read_matchers(j):
        matchers = []
        j += 1  # '{'
        while True:
            j = skip_ws(j)
            if j >= n or expr[j] == "}":
                return matchers, j + 1
            if expr[j] == ",":
                j += 1
                continue
            m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(expr, j)
            if not m:
                fail(f"cannot read label matchers at {expr[j:j + 30]!r} in {expr!r}")
            label = m.group(0)
            j = skip_ws(m.end())
            op = re.compile(r"=~|!~|!=|=").match(expr, j).group(0)
            j = skip_ws(j + len(op))
            value, j = read_string(j)
            matchers.append((label, op, value))

    while i < n:
        c = expr[i]
        if c in " \t\r\n":
            i += 1
        elif c == "#":
            while i < n and expr[i] != "\n":
                i += 1
        elif c in "\"'`":
            _, i = read_string(i)
        elif c == "[":
            i = expr.index("]", i) + 1
        elif c == "{":
            matchers, i = read_matchers(i)
            name = next((v for lab, op, v in matchers if lab == "__name__" and op == "="), "")
            out.append((name, matchers))
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            m = re.compile(r"[0-9.]+([eE][+-]?[0-9]+)?[a-zA-Z0-9]*").match(expr, i)
            i = m.end()
        elif c.isalpha() or c in "_:":
            m = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*").match(expr, i)
            word, i = m.group(0), m.end()
            j = skip_ws(i)
            if word.lower() in GROUPING and j < n and expr[j] == "(":
                i = expr.index(")", j) + 1
            elif word.lower() in PROMQL_KEYWORDS or word in AGGREGATIONS:
                pass  # keyword, or an aggregation (its `by (...)` may come first)
            elif j < n and expr[j] == "(":
                pass  # function or aggregation
            elif j < n and expr[j] == "{":
                matchers, i = read_matchers(j)
                out.append((word, matchers))
            else:
                out.append((word, []))
        else:
            i += 1
    return out


# --------------------------------------------------------------------------- live queries

CHILDREN: list[subprocess.Popen] = []


def _cleanup(*_):
    for p in reversed(CHILDREN):
        if p.poll() is None:
            p.terminate()
    for p in reversed(CHILDREN):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    CHILDREN.clear()


def _on_signal(signum, _frame):
    _cleanup()
    sys.exit(128 + signum)


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free on every address, IPv4 and IPv6 (the service binds [::]),
    and not handed out before in this run."""
    while True:
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::", 0))
                port = s.getsockname()[1]
        except OSError:  # no IPv6 on this kernel
            with socket.socket() as s:
                s.bind(("0.0.0.0", 0))
                port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def http(url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def poll(what: str, fn, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (OSError, urllib.error.URLError, ValueError) as e:
            last = e
        time.sleep(every)
    fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    f = open(log, "wb")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    CHILDREN.append(p)
    return p


def prom_query(base: str, q: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    status, body = http(url, timeout=15)
    try:
        data = json.loads(body)
    except ValueError:
        return {"status": "error", "error": f"HTTP {status}: {body[:200]!r}"}
    return data


GRAFANA_REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")


def dashboard_variable_values(d: dict) -> dict[str, str]:
    """What each dashboard variable stands for in the live check: the release the
    check scrapes (namespace and job fibonacci-api) and the textboxes' defaults."""
    values = {}
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            values[v["name"]] = "fibonacci-api"
        elif v["type"] in ("textbox", "constant", "custom"):
            values[v["name"]] = str(v["query"]).split(",")[0]
    return values


def grafana_expr(expr: str, values: dict[str, str]) -> str:
    """Substitute Grafana's built-in and dashboard variables with concrete values,
    applying the `:regex` format as Grafana does."""
    builtins = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m", "__range_s": "300",
                "__interval_ms": "5000", "__range_ms": "300000"}

    def sub(m):
        name, fmt = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), None)
        if name in builtins:
            return builtins[name]
        if name not in values:
            fail(f"unknown Grafana variable ${name} in {expr!r}")
        value = values[name]
        return GRAFANA_REGEX_SPECIAL.sub(r"\\\1", value) if fmt == "regex" else value
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([a-z]+))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, expr)


def collect_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query this repository ships."""
    queries = []
    d = json.loads(DASHBOARD.read_text())
    variables = dashboard_variable_values(d)
    for p in dashboard_panels(d):
        for t in p.get("targets", []):
            if dig(t, "datasource", "type") == "loki":
                continue  # LogQL: check config-files proves its labels are the shipper's
            queries.append((f"dashboard panel {p['title']!r} {t['refId']}", grafana_expr(t["expr"], variables)))
    for a in d.get("annotations", {}).get("list", []):
        if a.get("expr"):
            queries.append((f"dashboard annotation {a['name']!r}", grafana_expr(a["expr"], variables)))
    for v in d["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)", q.strip())
        need(m, {"kind": "variable", "metadata": {"name": v["name"]}}, f"unsupported variable query {q!r}")
        queries.append((f"dashboard variable ${v['name']}", f"group by ({m.group(2)}) ({grafana_expr(m.group(1), variables)})"))
    for g in load_file(ALERTS)["groups"]:
        for r in g["rules"]:
            queries.append((f"rule {r.get('alert') or r.get('record')} ({g['name']})", r["expr"]))
    objects, _ = render(values_of("all-features"))
    for o in objects:
        if o["kind"] == "AnalysisTemplate":
            for m in o["spec"]["metrics"]:
                q = re.sub(r"\{\{\s*args\.[A-Za-z0-9_-]+\s*\}\}", "0123456789", m["provider"]["prometheus"]["query"])
                queries.append((f"AnalysisTemplate {o['metadata']['name']} metric {m['name']}", q))
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-prometheus-adapter-rules"):
            for rule in yaml.safe_load(o["data"]["config.yaml"])["rules"]:
                q = (rule["metricsQuery"].replace("<<.Series>>", "http_requests_total")
                     .replace("<<.LabelMatchers>>", 'namespace="fibonacci-api",pod=~".*"').replace("<<.GroupBy>>", "pod"))
                queries.append(("prometheus-adapter metricsQuery", q))
                queries.append(("prometheus-adapter seriesQuery", rule["seriesQuery"]))
    for o in render(values_of("keda-linkerd"), namespace="fibonacci-api")[0]:
        if o["kind"] == "ScaledObject":
            for t in o["spec"]["triggers"]:
                if t["type"] == "prometheus":
                    queries.append((f"KEDA ScaledObject trigger {t['name']}", t["metadata"]["query"]))
    return queries


def send_traffic(base: str) -> dict[int, int]:
    """The traffic mix: 200s (cache misses, then hits), 400s, a 404, probes,
    and more than 30 requests from one client so the per-minute limit answers 429."""
    counts: dict[int, int] = {}

    def hit(path, method="GET"):
        status, _ = http(base + path, method=method)
        counts[status] = counts.get(status, 0) + 1
        return status
    for path in ("/health", "/livez", "/readyz", "/openapi.json", "/metrics", "/does-not-exist"):
        hit(path)
    hit("/fibonacci", method="POST")
    for n in (0, 1, 2, 10, 90, 500, 1000):       # misses: computed
        hit(f"/fibonacci?n={n}")
    for n in (10, 10, 500):                       # hits: served from the cache
        hit(f"/fibonacci?n={n}")
    for bad in ("abc", "-1", "1001", "", "1.5", "10&n=11"):  # 400s
        hit(f"/fibonacci?n={bad}")
    hit("/fibonacci")                             # n missing: 400
    for _ in range(25):                           # past 30/minute: 429s
        hit("/fibonacci?n=42")
    return counts


def cmd_queries() -> None:
    binary = service_binary()
    prometheus, redis_server = shutil.which("prometheus"), shutil.which("redis-server")
    if not prometheus:
        fail("prometheus not installed (scripts/check-deploy installs it)")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    atexit.register(_cleanup)
    tmp = Path(tempfile.mkdtemp(prefix="check-deploy-"))
    atexit.register(shutil.rmtree, tmp, True)
    try:
        _run_queries(binary, prometheus, redis_server, tmp)
    except CheckFailed:
        for log in sorted(tmp.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"  --- last lines of {log.name}:\n    " + "\n    ".join(tail), flush=True)
        raise
    finally:
        _cleanup()


def _run_queries(binary: Path, prometheus: str, redis_server: str | None, tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "REDIS_", "RATE_LIMIT"))}
    # A private Redis so redis_up and the Redis cache tier exist, and rate-limit
    # counters start from zero on every run (a shared Redis keeps yesterday's).
    if redis_server:
        rport = free_port()
        start([redis_server, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(tmp)], tmp / "redis.log")
        poll("redis", lambda: socket.create_connection(("127.0.0.1", rport), timeout=1).close() or True, 20)
        env["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
    port = free_port()
    env.update({"LISTEN_ADDR": f"127.0.0.1:{port}", "RATE_LIMITS": "30/minute,50/hour,200/day",
                "LOG_FORMAT": "json", "RUST_LOG": "warn", "SHUTDOWN_DRAIN_SECONDS": "0"})
    env.pop("ADMIN_LISTEN_ADDR", None)
    svc = start([str(binary)], tmp / "service.log", env=env)
    base = f"http://127.0.0.1:{port}"

    def ready():
        if svc.poll() is not None:
            fail(f"the service exited with {svc.returncode}")
        return http(base + "/readyz", timeout=1)[0] == 200
    poll("the service's /readyz", ready, 60)
    info(f"service {binary.relative_to(ROOT) if binary.is_relative_to(ROOT) else binary} on {base}"
         + (f", Redis {env['REDIS_URL']}" if "REDIS_URL" in env else ", no redis-server: without Redis"))

    pport = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{
            "job_name": "fibonacci-api", "metrics_path": "/metrics",
            # namespace and pod as the Prometheus Operator would attach them, so
            # the rules' namespace/job selectors match as in a cluster.
            "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                "labels": {"namespace": "fibonacci-api", "pod": "fibonacci-api-check"}}],
        }],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = start([prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                  f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"], tmp / "prometheus.log")
    pbase = f"http://127.0.0.1:{pport}"

    def scraped_up():
        if prom.poll() is not None:
            fail(f"prometheus exited with {prom.returncode}")
        r = prom_query(pbase, 'up{job="fibonacci-api"} == 1')
        return r.get("status") == "success" and r["data"]["result"]
    poll("Prometheus' first successful scrape", scraped_up, 60)

    counts = send_traffic(base)
    traffic_end = time.time()
    info("traffic: " + ", ".join(f"{n} x {code}" for code, n in sorted(counts.items())))
    for code, why in ((200, "answers"), (400, "invalid n"), (404, "unknown path"), (429, "rate limit")):
        if not counts.get(code):
            fail(f"the traffic mix produced no {code} ({why}): {counts}")

    status, body = http(base + "/metrics")
    if status != 200:
        fail(f"/metrics answered {status}")
    exposition = body.decode()
    families = set(re.findall(r"^# TYPE ([A-Za-z_:][A-Za-z0-9_:]*) ", exposition, re.M))
    sample_names = set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", exposition, re.M))

    def caught_up():
        # Three scrapes after the traffic (so rate() has points) and every
        # series name of the exposition stored.
        r = prom_query(pbase, 'timestamp(up{job="fibonacci-api"})')
        if not (r.get("status") == "success" and r["data"]["result"]
                and float(r["data"]["result"][0]["value"][1]) > traffic_end + 3):
            return False
        names = json.loads(http(f"{pbase}/api/v1/label/__name__/values?"
                                + urllib.parse.urlencode({"match[]": '{job="fibonacci-api"}'}))[1])["data"]
        return set(names) >= sample_names and names
    stored = set(poll("Prometheus to store the scrapes after the traffic", caught_up, 60))

    def rules_evaluated():
        groups = json.loads(http(f"{pbase}/api/v1/rules")[1])["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if not rules:
            return False
        for r in rules:
            if r.get("health") == "err":
                fail(f"Prometheus rule {r['name']} failed: {r.get('lastError')}")
        last = [r.get("lastEvaluation", "") for r in rules]
        return all(not s.startswith("0001") for s in last) and rules
    rules = poll("Prometheus to evaluate every rule", rules_evaluated, 60)
    recorded = {r["name"] for r in rules if r["type"] == "recording"}
    info(f"Prometheus on {pbase} loaded {len(rules)} rules from {ALERTS.relative_to(ROOT)}; "
         f"{len(families)} metric families scraped")

    series_labels: dict[str, dict[str, set[str]]] = {}

    def labels_of(name: str) -> dict[str, set[str]]:
        if name not in series_labels:
            url = f"{pbase}/api/v1/series?" + urllib.parse.urlencode({"match[]": f'{name}{{job="fibonacci-api"}}'})
            found: dict[str, set[str]] = {}
            for s in json.loads(http(url)[1])["data"]:
                for k, v in s.items():
                    found.setdefault(k, set()).add(v)
            series_labels[name] = found
        return series_labels[name]

    problems, empty, ok = [], [], 0
    queries = collect_queries()
    for where, q in queries:
        r = prom_query(pbase, q)
        if r.get("status") != "success":
            problems.append(f"{where}: does not run: {r.get('error')}\n      {q}")
            continue
        if not r["data"]["result"]:
            empty.append(where)
        for name, matchers in promql_selectors(q):
            if not name:
                problems.append(f"{where}: selector without a metric name\n      {q}")
                continue
            if name in EXTERNAL_METRIC_NAMES or name.startswith(EXTERNAL_METRIC_PREFIXES):
                continue
            if name in recorded:
                continue
            if name not in stored:
                problems.append(f"{where}: metric {name} is not in the service's scrape\n      {q}")
                continue
            present = labels_of(name)
            for label, op, value in matchers:
                if label in TARGET_LABELS or label == "__name__" or re.fullmatch(value if "~" in op else re.escape(value), ""):
                    continue
                if label not in present:
                    problems.append(f"{where}: {name} has no label {label!r} (has {sorted(present)})\n      {q}")
                elif op == "=~" and label == "le" and not any(re.fullmatch(value, v) for v in present[label]):
                    problems.append(f"{where}: no {name} bucket matches le=~{value!r} "
                                    f"(buckets: {sorted(present[label])})\n      {q}")
                elif op == "=" and value not in present[label]:
                    problems.append(f"{where}: no {name} series has {label}={value!r} "
                                    f"(values: {sorted(present[label])})\n      {q}")
        ok += 1
    if problems:
        fail(f"{len(problems)} of {len(queries)} queries are broken against the live scrape:\n    "
             + "\n    ".join(problems))
    info(f"{len(queries)} queries ran (dashboard panels, annotation, variables, recording and alert rules, "
         f"canary analysis, prometheus-adapter); every metric, label and le bucket they name is in the scrape")
    if empty:
        info(f"{len(empty)} returned no data with this traffic (no 5xx, cluster-only metrics...): "
             + "; ".join(empty))


def service_binary() -> Path:
    binary = Path(os.environ.get("FIBONACCI_API_BIN", ROOT / "target" / "debug" / "fibonacci-api"))
    if not binary.is_absolute():
        binary = ROOT / binary
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        fail(f"service binary {binary} not found: build it first (cargo build --bin fibonacci-api) "
             "or point FIBONACCI_API_BIN at it")
    return binary


# The pod's addresses (downward API status.podIPs) where an environment needs
# them: a dual-stack pod.
POD_IPS_STAND_IN = "10.244.1.23,fd00:10:244:1::17"


def pod_environment(objects: list[dict]) -> dict[str, str]:
    """The API container's environment as Kubernetes would build it: envFrom
    ConfigMaps, then env (literal values, $(VAR) expanded; Secret and
    downward-API references replaced by stand-ins)."""
    workload = next(o for o in objects if o["kind"] in ("Deployment", "Rollout")
                    and dig(o, "spec", "template", "metadata", "labels", "app.kubernetes.io/component") == "api")
    container = workload["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for ef in container.get("envFrom", []):
        cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ef["configMapRef"]["name"])
        env.update(cm["data"])
    stand_ins = {"REDIS_URL": "redis://127.0.0.1:1/0", "REDIS_CLUSTER_NODES": "redis://127.0.0.1:1",
                 "REDIS_PASSWORD": "secret",
                 # As long as a real one must be (>= 32 bytes).
                 "AUTH_JWT_HS256_SECRET": "stand-in-secret-for-check-deploy-0123456789"}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), ""), e["value"])
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = stand_ins.get(e["name"], "stand-in")
        elif dig(e, "valueFrom", "fieldRef", "fieldPath") in ("status.podIP", "status.podIPs"):
            ips = POD_IPS_STAND_IN.split(",")
            env[e["name"]] = ips[0] if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" else ",".join(ips)
        else:
            env[e["name"]] = "stand-in"
    return env


def check_ingress_reaches_the_api(label: str, objects: list[dict], base: str) -> None:
    """The Ingress and the service agree: every path an Ingress of this render routes
    answers something other than 404 on the public port, and the chart's default paths
    route every public path of the service's own OpenAPI document, so an endpoint added
    to the service fails here until values.yaml routes it. The chart's list of public
    paths (fibonacci-api.publicPaths, what the Ingress guard admits) must be that
    document's paths less the admin routes, plus /docs, and each must answer."""
    for ing in (o for o in objects if o["kind"] == "Ingress"):
        for pth in {p["path"] for r in ing["spec"]["rules"] for p in r["http"]["paths"] or []}:
            # A Prefix path's trailing slash is not part of the requests it routes.
            target = pth.rstrip("/") or "/"
            try:
                status = http(base + target)[0]
            except OSError as e:
                fail(f"{label}: GET {target} for the Ingress path {pth}: {e}")
            need(status != 404, ing, f"{label}: the Ingress routes {pth}, which the service answers 404 ({target})")
    if label == "default":
        status, body = http(base + "/openapi.json")
        need(status == 200, {"kind": "Service", "metadata": {"name": label}}, f"/openapi.json answered {status}")
        paths = load_file(CHART / "values.yaml")["ingress"]["paths"]
        api_public = {p for p in json.loads(body)["paths"] if p not in ADMIN_PATHS}
        chart_public = chart_helpers({})["publicPaths"]
        need(sorted(chart_public) == sorted(api_public | {"/docs"}),
             {"kind": "_helpers.tpl", "metadata": {"name": "fibonacci-api.publicPaths"}},
             f"the chart's public paths {sorted(chart_public)} differ from the service's: its OpenAPI document's "
             f"{sorted(api_public)} and /docs; update fibonacci-api.publicPaths (and ingress.paths)")
        for pth in chart_public:
            status = http(base + pth)[0]
            need(status != 404, {"kind": "_helpers.tpl", "metadata": {"name": "fibonacci-api.publicPaths"}},
                 f"the chart lists {pth} as a public path, which the service answers 404")
        for api_path in json.loads(body)["paths"]:
            if api_path in ADMIN_PATHS:
                continue
            target = re.sub(r"\{[^}]*\}", "1", api_path)
            need(any(ingress_routes(p["path"], p["pathType"], target) for p in paths),
                 {"kind": "values.yaml", "metadata": {"name": "ingress.paths"}},
                 f"the API serves {api_path} but the chart's default ingress.paths do not route it")


def cmd_config() -> None:
    """Start the real binary with the environment each values file gives the
    pod: a setting the chart passes that the service rejects fails here, not
    in a crash-looping rollout."""
    binary = service_binary()
    signal.signal(signal.SIGTERM, _on_signal)
    atexit.register(_cleanup)
    tmp = Path(tempfile.mkdtemp(prefix="check-deploy-config-"))
    atexit.register(shutil.rmtree, tmp, True)
    # All values files at once (each on its own ports), so the drains overlap.
    runs = []
    for label in VALUES_FILES:
        objects, _ = render(values_of(label))
        pod_env = pod_environment(objects)
        port, admin = free_port(), free_port()
        # The chart's own addresses ([::], dual-stack) with free ports.
        pod_env["LISTEN_ADDR"] = re.sub(r":[0-9]+$", f":{port}", pod_env["LISTEN_ADDR"])
        if "ADMIN_LISTEN_ADDR" in pod_env:
            pod_env["ADMIN_LISTEN_ADDR"] = re.sub(r":[0-9]+$", f":{admin}", pod_env["ADMIN_LISTEN_ADDR"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | pod_env
        log = tmp / f"{label}.log"
        proc = start([str(binary)], log, env=env)
        runs.append((label, pod_env, log, proc, (port, admin if "ADMIN_LISTEN_ADDR" in pod_env else None), objects))
    for label, pod_env, log, proc, (port, admin), objects in runs:
        def alive():
            if proc.poll() is not None:
                fail(f"{label}: the service exited with {proc.returncode} on the chart's configuration:\n    "
                     + "\n    ".join(log.read_text(errors="replace").splitlines()[-10:]))
            return http(f"http://127.0.0.1:{admin or port}/livez", timeout=1)[0] == 200
        poll(f"{label}: /livez", alive, 30)
        # What kubelet probes, the Service and Prometheus reach, over IPv4 and
        # IPv6 alike; with the admin port, the public one serves no admin route.
        got, want = {}, {}
        for host in ("127.0.0.1", "[::1]"):
            got[f"{host} /health"], want[f"{host} /health"] = http(f"http://{host}:{port}/health")[0], 200
            got[f"{host} /livez"], want[f"{host} /livez"] = http(f"http://{host}:{admin or port}/livez")[0], 200
            got[f"{host} /metrics"], want[f"{host} /metrics"] = http(f"http://{host}:{admin or port}/metrics")[0], 200
            if admin:
                got[f"{host} public /metrics"], want[f"{host} public /metrics"] = http(f"http://{host}:{port}/metrics")[0], 404
        if got != want:
            fail(f"{label}: LISTEN_ADDR={pod_env['LISTEN_ADDR']} ADMIN_LISTEN_ADDR={pod_env.get('ADMIN_LISTEN_ADDR')}: "
                 f"answers {got}, expected {want}")
        check_ingress_reaches_the_api(label, objects, f"http://127.0.0.1:{port}")
    for _, _, _, proc, _, _ in runs:
        proc.send_signal(signal.SIGTERM)
    for label, pod_env, log, proc, _, _ in runs:
        try:
            code = proc.wait(timeout=int(pod_env.get("SHUTDOWN_DRAIN_SECONDS", 5)) + 15)
        except subprocess.TimeoutExpired:
            fail(f"{label}: the service did not exit within the drain + deadline after SIGTERM")
        if code != 0:
            fail(f"{label}: exit code {code} after SIGTERM (expected 0 after a graceful shutdown)")
        keys = sorted(k for k in pod_env if k not in ("POD_NAME", "POD_NAMESPACE", "NODE_NAME"))
        info(f"{label:15s} started with {len(keys)} settings ({', '.join(keys)}), answered IPv4 and IPv6 on "
             f"{pod_env['LISTEN_ADDR']}{' (admin routes only on ' + pod_env['ADMIN_LISTEN_ADDR'] + ')' if 'ADMIN_LISTEN_ADDR' in pod_env else ''}, "
             "exited 0 on SIGTERM")


def cmd_loadtest() -> None:
    """The staging load test (files/loadtest.py, as the chart's ConfigMap
    renders it, with the Job's environment) against the real binary: it passes
    against a healthy service reached through a trusted proxy, and fails when
    the service does not trust the pod (every request one client: the
    X-Forwarded-For check and the 429s fail it) and when answers fail (n above
    the service's MAX_N)."""
    binary = service_binary()
    signal.signal(signal.SIGTERM, _on_signal)
    atexit.register(_cleanup)
    tmp = Path(tempfile.mkdtemp(prefix="check-deploy-loadtest-"))
    atexit.register(shutil.rmtree, tmp, True)
    values = values_of("staging") | {"loadTest": {"enabled": True, "durationSeconds": 5}}
    objects, _ = render(values, namespace="fibonacci-api-staging")
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-loadtest"))
    need(cm["data"]["loadtest.py"].strip() == (CHART / "files" / "loadtest.py").read_text().strip(), cm,
         "the ConfigMap's script differs from files/loadtest.py")
    script = tmp / "loadtest.py"
    script.write_text(cm["data"]["loadtest.py"])
    job = next(o for o in objects if o["kind"] == "Job")
    need(dig(job, "metadata", "annotations", "argocd.argoproj.io/hook") == "PostSync", job,
         "staging runs it as an Argo CD PostSync hook")
    jwt_stand_in = "stand-in-secret-for-check-deploy-0123456789"

    def container_env(job_obj: dict) -> dict:
        # Secret references (the JWT key under auth) get the stand-in the service gets.
        return {e["name"]: e["value"] if "value" in e else jwt_stand_in
                for e in job_obj["spec"]["template"]["spec"]["containers"][0]["env"]}
    job_env = container_env(job)
    pod_env = pod_environment(objects)

    def run(what: str, service_env: dict, expect_ok: bool, must_say: str = "", job_env: dict = job_env) -> str:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "REDIS_", "RATE_LIMIT"))}
        env |= {k: v for k, v in pod_env.items() if not k.startswith(("REDIS_", "OTEL_EXPORTER"))}
        env |= {"LISTEN_ADDR": f"127.0.0.1:{port}", "RUST_LOG": "warn", "SHUTDOWN_DRAIN_SECONDS": "0"} | service_env
        log = tmp / f"service-{port}.log"
        svc = start([str(binary)], log, env=env)
        poll("the service's /health", lambda: http(f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200, 30)
        run_env = dict(os.environ) | job_env | {"LOAD_BASE_URL": f"http://127.0.0.1:{port}"}
        proc = subprocess.run([sys.executable, str(script)], env=run_env, capture_output=True, text=True, timeout=120)
        svc.terminate()
        svc.wait(timeout=20)
        out = proc.stdout + proc.stderr
        ok = proc.returncode == 0
        if ok != expect_ok or must_say not in out:
            fail(f"{what}: exit {proc.returncode}, expected {'0' if expect_ok else 'non-zero'}"
                 f"{' saying ' + repr(must_say) if must_say else ''}:\n    " + "\n    ".join(out.splitlines()[-25:]))
        summary = next((line for line in out.splitlines() if line.startswith("summary ")), "summary {}")
        return summary[8:]
    trusted = {"TRUSTED_PROXIES": "127.0.0.0/8"}
    healthy = run("a healthy service through a trusted proxy", trusted, True)
    info(f"healthy service, staging's RATE_LIMITS {pod_env['RATE_LIMITS']}, the pod a trusted proxy: passes; {healthy}")
    untrusted = run("the pod outside TRUSTED_PROXIES", {"TRUSTED_PROXIES": ""}, False, "X-Forwarded-For believed")
    info(f"the pod outside TRUSTED_PROXIES: fails (one client: X-Forwarded-For check, then 429s); {untrusted}")
    broken = run("a service that refuses part of the asked range", trusted | {"MAX_N": "500"}, False, "error ratio")
    info(f"a service whose MAX_N is below the range the test asks for: fails on answers and error ratio; {broken}")

    # JWT auth on (the key from the ExternalSecret): the load signs tokens with
    # it, and the smoke test pod, which holds none, expects the 401 challenge.
    auth_values = deep_merge(values, {"config": {"AUTH_JWT_AUDIENCE": "fibonacci-api", "AUTH_JWT_ISSUER": "https://id.example"},
                                      "externalSecret": {"enabled": True, "data": [
                                          {"env": "AUTH_JWT_HS256_SECRET", "secretKey": "jwt",
                                           "remoteRef": {"key": "fibonacci-api/staging", "property": "jwt"}}]}})
    auth_objects, _ = render(auth_values, namespace="fibonacci-api-staging")
    auth_env = {"AUTH_JWT_HS256_SECRET": jwt_stand_in, "AUTH_JWT_AUDIENCE": "fibonacci-api", "AUTH_JWT_ISSUER": "https://id.example"}
    with_auth = run("JWT auth on", trusted | auth_env, True,
                    job_env=container_env(next(o for o in auth_objects if o["kind"] == "Job")))
    info(f"JWT auth on: the load signs its requests with the ExternalSecret's key, passes; {with_auth}")
    for what, objs, service_env in (("auth off", objects, {}), ("JWT auth on", auth_objects, auth_env)):
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "REDIS_", "RATE_LIMIT", "AUTH_JWT"))}
        env |= {"LISTEN_ADDR": f"127.0.0.1:{port}", "RUST_LOG": "warn", "SHUTDOWN_DRAIN_SECONDS": "0"} | service_env
        svc = start([str(binary)], tmp / f"smoke-{port}.log", env=env)
        poll("the service's /health", lambda: http(f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200, 30)
        pod = next(o for o in objs if o["kind"] == "Pod" and o["metadata"]["name"].endswith("-test"))
        c = pod["spec"]["containers"][0]
        proc = subprocess.run(c["command"] + c["args"], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ) | {"BASE_URL": f"http://127.0.0.1:{port}"})
        svc.terminate()
        svc.wait(timeout=20)
        need(proc.returncode == 0, pod, f"the smoke test ({what}) fails against the real service:\n    "
             + "\n    ".join((proc.stdout + proc.stderr).splitlines()[-8:]))
        info(f"smoke test pod's script ({what}) against the real service: {' / '.join(proc.stdout.split(chr(10))[-3:-1])}")

    # Behind a mesh sidecar every connection comes from the proxy inside the
    # pod (Istio: 127.0.0.6; Linkerd: 127.0.0.1): the service must trust it as
    # a proxy, or all clients share one address's MAX_CONNECTIONS_PER_ADDRESS
    # and one rate limit. The chart's own pod environment, the real binary, and
    # more concurrent connections from the proxy's address than one address may
    # hold, each request naming another client in X-Forwarded-For (as the
    # ingress gateway or controller does).
    for label, proxy in (("all-features", "127.0.0.6"), ("keda-linkerd", "127.0.0.1"), ("linkerd", "127.0.0.1")):
        mesh_env = pod_environment(render(values_of(label))[0])
        port, admin = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "REDIS_", "RATE_LIMIT", "AUTH_JWT"))}
        env |= {k: v for k, v in mesh_env.items() if not k.startswith(("REDIS_", "OTEL_EXPORTER", "AUTH_JWT"))}
        env |= {"LISTEN_ADDR": f"127.0.0.1:{port}", "RUST_LOG": "warn", "SHUTDOWN_DRAIN_SECONDS": "0"}
        if "ADMIN_LISTEN_ADDR" in env:
            env["ADMIN_LISTEN_ADDR"] = f"127.0.0.1:{admin}"
        log = tmp / f"mesh-{label}.log"
        svc = start([str(binary)], log, env=env)
        poll(f"{label}: the service's /health", lambda: http(f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200, 30)
        clients = int(env.get("MAX_CONNECTIONS_PER_ADDRESS", 64)) + 36
        socks, answers = [], []
        try:
            for i in range(clients):
                sk = socket.socket()
                sk.settimeout(10)
                sk.bind((proxy, 0))
                sk.connect(("127.0.0.1", port))
                socks.append(sk)
            for i, sk in enumerate(socks):
                try:
                    sk.sendall(f"GET /fibonacci?n=10 HTTP/1.1\r\nHost: fibonacci-api\r\n"
                               f"X-Forwarded-For: 198.18.{i // 200}.{i % 200 + 1}\r\n\r\n".encode())
                except OSError:
                    pass
            for sk in socks:
                head = b""
                try:
                    while b"\r\n\r\n" not in head:
                        chunk = sk.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                except OSError:
                    pass
                status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/1.1 ") else "closed"
                left = re.search(rb"(?im)^ratelimit-remaining:\s*([0-9]+)", head)
                answers.append((status, left.group(1).decode() if left else None))
        finally:
            for sk in socks:
                sk.close()
            svc.terminate()
            svc.wait(timeout=20)
        statuses = sorted({a for a, _ in answers})
        remaining = sorted({r for _, r in answers if r is not None})
        need(statuses == ["200"] and len(remaining) == 1, {"kind": "mesh", "metadata": {"name": label}},
             f"{clients} clients through the sidecar at {proxy} (TRUSTED_PROXIES={mesh_env.get('TRUSTED_PROXIES')!r}): "
             f"answers {[(s_, sum(1 for a, _ in answers if a == s_)) for s_ in statuses]}, RateLimit-Remaining "
             f"{remaining}: all clients count as the proxy's one address")
        info(f"{label}: {clients} clients through the mesh proxy at {proxy}, more than one address may hold: all 200, "
             f"each its own rate limit (RateLimit-Remaining {remaining[0]})")


# --------------------------------------------------------------------------- container image

# The image is the binary on distroless cc (glibc, CA bundle): 37 MB when this
# budget was set. A budget, not a measurement: past it something heavy came in.
IMAGE_SIZE_BUDGET_MB = 50
IMAGE = "localhost/fibonacci-api:check-deploy"


def image_tools() -> Path:
    """The stand-in image scripts (podman against local base images): an
    explicit override, the clone's sibling shared/, or the workplace's."""
    for cand in (os.environ.get("FIBONACCI_IMAGE_TOOLS"), ROOT.parent / "shared" / "image", Path("/work/shared/image")):
        if cand and (Path(cand) / "build-and-run.sh").is_file():
            return Path(cand)
    fail("no stand-in image scripts: set FIBONACCI_IMAGE_TOOLS, or put shared/image next to the repository")
    return Path()


def podman(tools: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, CONTAINERS_CONF=str(tools / "containers.conf"),
               CONTAINERS_REGISTRIES_CONF=str(tools / "registries.conf"))
    proc = subprocess.run(["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        fail(f"podman {' '.join(args[:3])}...: {proc.stderr.strip()[-1500:]}")
    return proc


def cmd_image() -> None:
    """Build the real Dockerfile (podman, stand-in base images) and run the
    image as a cluster would: read-only root filesystem, its own user, a
    non-default dual-stack LISTEN_ADDR and an ADMIN_LISTEN_ADDR, its
    HEALTHCHECK, SIGTERM; and keep it under the size budget with no build
    timestamp in it."""
    tools = image_tools()
    I = {"kind": "image", "metadata": {"name": IMAGE}}
    t0 = time.monotonic()
    standins = subprocess.run([str(tools / "standins.sh")], capture_output=True, text=True)
    if standins.returncode != 0:
        fail(f"standins.sh:\n{(standins.stdout + standins.stderr)[-3000:]}")
    t_standins = time.monotonic() - t0
    # The time of the last commit that changed what the build reads (the
    # allow-listed context and the Dockerfile): a commit that changes nothing
    # the image is built from builds the same image, cached or not.
    inputs = ["Dockerfile", ".dockerignore"] + [line[1:].rstrip("/") for line in
                                                (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    epoch = subprocess.run(["git", "log", "-1", "--format=%ct", "--", *inputs], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip() or "0"
    build_args = ["--build-arg", f"SOURCE_DATE_EPOCH={epoch}", "--timestamp", epoch,
                  "--build-arg", "VERSION=check", "--build-arg", "REVISION=check"]
    # build-and-run.sh: the build, then its own smoke run (LISTEN_ADDR on a free
    # 127.0.0.1 port, /health, HEALTHCHECK, SIGTERM).
    t0 = time.monotonic()
    proc = subprocess.run([str(tools / "build-and-run.sh"), str(ROOT), *build_args],
                          env=dict(os.environ, IMAGE=IMAGE, SKIP_PROBE="1"), capture_output=True, text=True)
    t_build = time.monotonic() - t0
    results = proc.stdout[proc.stdout.find("== results =="):]
    if proc.returncode != 0 or not re.search(r"exit after stop:\s+0\b", results):
        fail(f"build-and-run.sh (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    info(f"standins.sh {t_standins:.0f}s, build-and-run.sh {t_build:.0f}s: " + "; ".join(
        line.strip() for line in results.splitlines()[1:] if line.split(":")[0].strip() in
        ("image size", "image USER", "runs as (uid gid)", "read-only rootfs", "healthcheck by hand", "exit after stop")))

    # Size budget.
    size_mb = int(podman(tools, "image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()) / 1e6
    need(size_mb <= IMAGE_SIZE_BUDGET_MB, I, f"{size_mb:.1f} MB exceeds the {IMAGE_SIZE_BUDGET_MB} MB budget")
    # No build timestamp: the image says it was created at the commit, and a
    # rebuild of the same commit is the same image.
    meta = json.loads(podman(tools, "image", "inspect", IMAGE).stdout)[0]
    created = meta.get("Created", "")
    # A cached build keeps the date of the build that made its layers, so the
    # date is some commit's (SOURCE_DATE_EPOCH), never the time of a build.
    commit_times = {time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(t))) for t in subprocess.run(
        ["git", "log", "--format=%ct"], capture_output=True, text=True, cwd=ROOT).stdout.split()}
    need(created[:19] in commit_times, I, f"created {created}: not a commit's time (SOURCE_DATE_EPOCH) but the build's")
    labels = (meta.get("Config") or {}).get("Labels") or {}
    need("org.opencontainers.image.created" not in labels, I, "a build-time created label")
    first_id = meta["Id"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    stripped = Path(tempfile.mkstemp(prefix="Dockerfile.")[1])
    atexit.register(stripped.unlink, True)
    stripped.write_text(re.sub(r"@sha256:[0-9a-f]{64}", "", dockerfile))  # stand-ins exist by tag only
    podman(tools, "build", "--pull=never", "--isolation=chroot", "--network=host", "--format", "docker",
           "-f", str(stripped), "-t", IMAGE, *build_args, str(ROOT), timeout=1800)
    second_id = podman(tools, "image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    need(second_id == first_id, I, f"rebuilding the same commit gave image {second_id[:12]}, not {first_id[:12]}")

    # Run it as a cluster would, on a non-default dual-stack address with an admin port.
    port, admin = free_port(), free_port()
    name = f"check-deploy-{os.getpid()}"
    podman(tools, "rm", "-f", name, check=False)
    atexit.register(lambda: podman(tools, "rm", "-f", "-t", "2", name, check=False))
    podman(tools, "run", "-d", "--name", name, "--read-only", "--read-only-tmpfs=false", "--network=host",
           "-e", f"LISTEN_ADDR=[::]:{port}", "-e", f"ADMIN_LISTEN_ADDR=[::]:{admin}",
           "-e", "SHUTDOWN_DRAIN_SECONDS=1", "-e", "RUST_LOG=warn", IMAGE)

    def running():
        state = podman(tools, "inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        if state != "true":
            logs = podman(tools, "logs", name, check=False)
            fail(f"the container exited: {(logs.stdout + logs.stderr)[-1500:]}")
        return http(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200
    poll("the container's /readyz on the admin port", running, 60)
    seen = {}
    for host in ("127.0.0.1", "[::1]"):
        seen[f"{host} /health"] = http(f"http://{host}:{port}/health")[0]
        seen[f"{host} /metrics"] = http(f"http://{host}:{port}/metrics")[0]
    seen["admin /metrics"] = http(f"http://127.0.0.1:{admin}/metrics")[0]
    expected = {"127.0.0.1 /health": 200, "[::1] /health": 200, "127.0.0.1 /metrics": 404, "[::1] /metrics": 404,
                "admin /metrics": 200}
    need(seen == expected, I, f"answers {seen}, expected {expected} (IPv4 and IPv6 on [::]; /metrics only on the admin port)")
    pid = podman(tools, "inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    uids = re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)
    need(uids == "65532", I, f"runs as uid {uids}, not the image's 65532")
    need(podman(tools, "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name).stdout.strip() == "true", I,
         "root filesystem not read-only")
    hc_cfg = meta.get("Healthcheck") or meta.get("HealthCheck") or (meta.get("Config") or {}).get("Healthcheck") or {}
    test = [t for t in hc_cfg.get("Test", []) if t]
    need(test[:1] == ["CMD"], I, f"HEALTHCHECK {test}: exec form expected")
    hc = podman(tools, "exec", name, *test[1:], check=False)
    need(hc.returncode == 0, I, f"HEALTHCHECK {' '.join(test[1:])} failed in the container: {hc.stdout}{hc.stderr}")
    run_hc = podman(tools, "healthcheck", "run", name, check=False)
    need(run_hc.returncode == 0, I, f"podman healthcheck run: {run_hc.stdout}{run_hc.stderr}")
    t0 = time.monotonic()
    podman(tools, "kill", "--signal", "TERM", name)
    code = podman(tools, "wait", name, timeout=60).stdout.strip()
    stopped = time.monotonic() - t0
    need(code == "0", I, f"exit code {code} after SIGTERM (expected 0: drain, then exit)")
    info(f"{size_mb:.1f} MB (budget {IMAGE_SIZE_BUDGET_MB}); created at the commit, rebuild identical ({first_id[:12]}); "
         f"read-only, uid 65532, LISTEN_ADDR=[::]:{port} answers IPv4 and IPv6, /metrics only on ADMIN_LISTEN_ADDR, "
         f"HEALTHCHECK healthy, SIGTERM -> exit 0 in {stopped:.1f}s")


# --------------------------------------------------------------------------- docs

CHART_README = CHART / "README.md"
README = ROOT / "README.md"


def values_default_cell(v) -> str | None:
    """How the chart README writes a scalar default; None for objects and lists,
    whose defaults the table may leave to values.yaml."""
    if isinstance(v, (dict, list)):
        return None
    if isinstance(v, str):
        return '`""`' if v == "" else f"`{v}`"
    return f"`{json.dumps(v)}`"


def chart_values_keys(values: dict) -> dict[str, object]:
    """The keys the chart README's table must document: every top-level key and
    every key of a top-level object (`parent.key`). Deeper keys are described in
    their parent's row: a leaf-level table would be ~260 rows, most of them the
    fields of Kubernetes objects passed through as they are."""
    keys = {}
    for k, v in values.items():
        keys[k] = v
        if isinstance(v, dict):
            for k2, v2 in v.items():
                keys[f"{k}.{k2}"] = v2
    return keys


def check_chart_values_table(readme_text: str, values: dict) -> list[str]:
    """Problems of the chart README's values table against values.yaml."""
    rows = {}
    for line in readme_text.split("\n## Values\n", 1)[-1].splitlines():
        m = re.match(r"^\| `([^`]+)` \| (.*?) \| .*\S.* \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    keys = chart_values_keys(values)
    problems = [f"values.yaml key `{k}` missing from {CHART_README.relative_to(ROOT)}'s values table"
                for k in keys if k not in rows]
    problems += [f"{CHART_README.relative_to(ROOT)} documents `{k}`, which values.yaml does not have"
                 for k in rows if k not in keys]
    for k, v in keys.items():
        want = values_default_cell(v)
        if k in rows and want is not None and rows[k] != want:
            problems.append(f"{CHART_README.relative_to(ROOT)}: default of `{k}` is {rows[k]}, values.yaml says {want}")
    return problems


def git_top_level_entries() -> set[str]:
    """The repository's top-level entries as Git tracks them (directories with a
    trailing slash): what a fresh clone has."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    entries = set()
    for path in out.decode().split("\0"):
        if path:
            head, sep, _ = path.partition("/")
            entries.add(head + "/" if sep else head)
    return entries


def check_repository_layout(readme_text: str, tracked: set[str]) -> list[str]:
    """Problems of the README's "Repository layout" table against the tree: each
    row's first cell names one or more top-level entries in backticks."""
    if "\n## Repository layout\n" not in readme_text:
        return ["README.md has no \"## Repository layout\" section"]
    section = readme_text.split("\n## Repository layout\n", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            listed |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return ([f"README.md's repository layout does not list `{e}` (a top-level entry of git ls-files)"
             for e in sorted(tracked - listed)]
            + [f"README.md's repository layout lists `{e}`, which is not in the tree" for e in sorted(listed - tracked)])


def cmd_docs() -> None:
    """The documentation that describes the tree stays in step with it: the
    chart README's values table covers values.yaml, and the README's repository
    layout lists exactly the top-level entries Git tracks."""
    problems = check_chart_values_table(CHART_README.read_text(), load_file(CHART / "values.yaml"))
    problems += check_repository_layout(README.read_text(), git_top_level_entries())
    if problems:
        fail("; ".join(problems))
    info(f"chart README documents all {len(chart_values_keys(load_file(CHART / 'values.yaml')))} values "
         f"(top level and second level); README layout = the {len(git_top_level_entries())} top-level entries of git ls-files")


# --------------------------------------------------------------------------- main

COMMANDS = {
    "chart": cmd_chart, "argocd": cmd_argocd, "alerts-sync": cmd_alerts_sync, "gen-alerts": cmd_gen_alerts,
    "dashboard": cmd_dashboard, "sli-sync": cmd_sli_sync, "image": cmd_image, "images": cmd_images, "alert-routes": cmd_alert_routes, "crd-schemas": cmd_crd_schemas, "promql-scenarios": cmd_promql_scenarios, "dockerfile": cmd_dockerfile, "queries": cmd_queries, "config": cmd_config,
    "loadtest": cmd_loadtest, "logs-config": cmd_logs_config, "log-lines": cmd_log_lines, "docs": cmd_docs,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}}", file=sys.stderr)
        sys.exit(2)
    try:
        COMMANDS[sys.argv[1]]()
    except CheckFailed as e:
        print(f"  error: {e}", flush=True)
        sys.exit(1)
