"""infra/: the Kubernetes manifests validate, and everything they and the Dockerfiles name exists and validates.

Built-in kinds are checked against the Kubernetes JSON schemas that PyPI's ``kubernetes-validate`` ships, strictly
(unknown fields are errors).

RayCluster, RayJob and RayService are checked against the ``openAPIV3Schema`` of KubeRay's own
CustomResourceDefinitions, of the release the README installs (``KUBERAY_VERSION``), read the way the API server
reads a structural schema (``structural_to_json_schema``): a field that an object does not declare is an error,
because the API server would drop it without a word, unless the object allows it (``additionalProperties`` or
``x-kubernetes-preserve-unknown-fields``); ``x-kubernetes-int-or-string`` takes an integer or a string and nothing
else (``cpu: 0.5`` is refused, ``cpu: "500m"`` is the spelling); ``nullable``, the int32/int64 formats and the
uniqueness of ``x-kubernetes-list-type`` map and set lists are enforced; a field carrying CEL rules
(``x-kubernetes-validations``) is refused, since they are not evaluated here. The metadata of a KubeRay object is
Kubernetes' ObjectMeta and goes through the Kubernetes schema; the pod templates inside go through it as well.

Schema validation cannot see the KubeRay operator's own checks, which leave a resource in ``ValidationFailed`` (for
example a RayJob's clusterSelector, which names a RayCluster by the key ``ray.io/cluster`` and is no label
selector). ``kuberay_operator_errors`` restates those of KubeRay's validation (``ray-operator/controllers/ray/utils/
validation.go`` at the same release) that bear on these manifests, plus a few stricter project rules for settings the
operator would silently ignore; it is tested on its own.

The CRDs are read from ``$OGCLIP_KUBERAY_CRDS``, else from ``shared/kuberay-crds/v<KUBERAY_VERSION>`` inside or
beside the checkout: the unmodified ``ray.io_{rayclusters,rayjobs,rayservices}.yaml`` of
``ray-operator/config/crd/bases/`` at KubeRay's tag ``v<KUBERAY_VERSION>``. Without them the CRD tests are skipped and
say so.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.metadata
import json
import os
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from ogclip.config import load_yaml_config
from ogclip_jobs.cli import build_parser
from ogclip_jobs.config import DataPipelineConfig, EvalConfig, TrainJobConfig
from ogclip_jobs.submit import normalise_argv

ROOT = Path(__file__).resolve().parents[1]
K8S, DOCKER = ROOT / "infra" / "k8s", ROOT / "infra" / "docker"
K8S_VERSION = "1.33"
KUBERAY_VERSION = "1.6.2"  # the operator (and CRDs) README.md installs with helm
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
IMAGES = {"cpu": "registry.example.com/ogclip/ogclip-cpu:0.1.0", "gpu": "registry.example.com/ogclip/ogclip-gpu:0.1.0"}
RAY_TOKEN_SECRET = ("ogclip-ray-token", "auth_token")  # KubeRay's authOptions.secretName reads this key
RWX_STORAGE_CLASS = "ogclip-rwx"  # the placeholder StorageClass of the shared volume; README step 3 replaces it
RAY_METRICS_PORT = 8080  # KubeRay's default --metrics-export-port, declared as the container port `metrics`
PROMETHEUS_NAMESPACE = "prometheus-system"
# `ogclip` commands a manifest or the README may run, and the schema of the --config each one reads.
COMMAND_SCHEMAS = {("data", "pipeline"): DataPipelineConfig, ("train",): TrainJobConfig, ("eval",): EvalConfig}


def _load_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


MANIFESTS = _load_manifests()
BY_KIND: dict[str, list[dict]] = {}
for _, _doc in MANIFESTS:
    BY_KIND.setdefault(_doc["kind"], []).append(_doc)
KUBERAY_MANIFESTS = [(name, doc) for name, doc in MANIFESTS if doc["kind"] in KUBERAY_KINDS]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every Ray cluster the manifests create: RayClusters, RayJobs' own clusters, RayServices' clusters."""
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in BY_KIND.get("RayCluster", [])]
    specs += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in BY_KIND.get("RayJob", [])
              if "rayClusterSpec" in d["spec"]]
    specs += [(f"RayService/{d['metadata']['name']}", d["spec"]["rayClusterConfig"])
              for d in BY_KIND.get("RayService", [])]
    return specs


def groups(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group name, group spec, pod template) of a Ray cluster's head and worker groups."""
    head = spec["headGroupSpec"]
    return [("head", head, head["template"])] + [(g["groupName"], g, g["template"]) for g in
                                                spec.get("workerGroupSpecs", [])]


def _validate_k8s(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# -- KubeRay's CRD schemas, read as the API server reads them ------------------------------------------------------


def kuberay_crd_dir() -> Path | None:
    """The folder of KubeRay's CRD files, or None when this machine has none (the CRD tests then skip)."""
    configured = os.environ.get("OGCLIP_KUBERAY_CRDS")
    if configured:
        return Path(configured)  # set on purpose: a wrong path fails below instead of skipping
    for base in (ROOT, ROOT.parent):
        candidate = base / "shared" / "kuberay-crds" / f"v{KUBERAY_VERSION}"
        if candidate.is_dir():
            return candidate
    return None


def _require_crds() -> Path:
    folder = kuberay_crd_dir()
    if folder is None:
        pytest.skip(f"KubeRay v{KUBERAY_VERSION} CRDs not found: set OGCLIP_KUBERAY_CRDS to a folder holding "
                    f"ray.io_{{rayclusters,rayjobs,rayservices}}.yaml of ray-operator/config/crd/bases/ at tag "
                    f"v{KUBERAY_VERSION}")
    return folder


# Keywords of a structural schema that are not JSON Schema, or that structural_to_json_schema turns into JSON Schema.
_CONVERTED = {"nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"}


def structural_to_json_schema(node: dict, *, in_junctor: bool = False) -> dict:
    """A Kubernetes structural schema node as a JSON Schema (draft 4, which OpenAPI v3.0 builds on) with the API
    server's semantics:

    * an object keeps only the fields it declares (``properties``); the API server prunes the others silently, so
      here they are errors, unless the node declares ``additionalProperties`` (a map) or
      ``x-kubernetes-preserve-unknown-fields: true`` (then undeclared fields are kept and not checked);
    * ``x-kubernetes-int-or-string: true``: an integer or a string, never a float, bool or null (the generated
      ``anyOf: [{type: integer}, {type: string}]`` says the same and is replaced by that type); value checks such as
      a Quantity's ``pattern`` apply to the string form only, as in JSON Schema;
    * ``nullable: true`` admits null; without it null is an error (the API server drops such a null field);
    * the ``x-kubernetes-list-type`` and ``x-kubernetes-validations`` keywords are kept for ``CRDValidator``.

    Nodes under anyOf/allOf/oneOf/not (``in_junctor``) only add value checks to the fields their parent declares,
    so they get no ``additionalProperties`` of their own.
    """
    if node.get("x-kubernetes-embedded-resource"):
        raise NotImplementedError("x-kubernetes-embedded-resource: an embedded object needs its apiVersion, kind and "
                                  "metadata checked; KubeRay's CRDs have none, so this converter does not do it")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural_to_json_schema(sub, in_junctor=in_junctor) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural_to_json_schema(value, in_junctor=in_junctor or key == "not")
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural_to_json_schema(sub, in_junctor=True) for sub in value]
        elif key not in _CONVERTED:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
        out.pop("anyOf", None)
    if node.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    declares_object = node.get("type") == "object" or "properties" in node
    if (declares_object and not in_junctor and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    """x-kubernetes-list-type: `set` items are unique; `map` items are unique by their list-map-keys, a key the item
    leaves out counting as its default (the API server defaults before it compares: two ports 8080 with and without
    `protocol: TCP` collide)."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        for index, item in enumerate(instance):
            if item in instance[:index]:
                yield jsonschema.ValidationError(f"{item!r} appears twice in a list of type set")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        declared = schema.get("items", {}).get("properties", {})
        seen: set[str] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = json.dumps({k: item.get(k, declared.get(k, {}).get("default")) for k in keys}, sort_keys=True)
            if key in seen:
                yield jsonschema.ValidationError(f"two items of a list of type map have the same key {key}")
            seen.add(key)


def _cel_rules(validator: Any, rules: list[dict], instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    """CEL rules are not evaluated here: a manifest that sets a field carrying them fails until a test checks it."""
    yield jsonschema.ValidationError("this field carries CEL rules (x-kubernetes-validations) that the test does not "
                                     "evaluate: " + "; ".join(rule["rule"] for rule in rules))


K8S_FORMATS = jsonschema.FormatChecker(formats=())


@K8S_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@K8S_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules})


@functools.cache
def kuberay_validator(kind: str) -> Any:
    """A validator of one KubeRay kind from the storage version of its CRD, for whole manifests."""
    path = _require_crds() / f"ray.io_{KUBERAY_KINDS[kind]}.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind, path
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["served"], f"{path}: the storage version {version['name']} is not served"
    schema = structural_to_json_schema(version["schema"]["openAPIV3Schema"])
    properties = schema["properties"]
    properties["apiVersion"] = {"enum": [f"ray.io/{version['name']}"]}
    properties["kind"] = {"enum": [kind]}
    # A root `metadata` is ObjectMeta, which the API server checks itself whatever the CRD says (here: a bare
    # `type: object`); validate_manifest checks it against Kubernetes' schema.
    properties["metadata"] = {"type": "object"}
    # The operator writes `status` (a subresource); the API server ignores one in a manifest, so it is refused.
    properties.pop("status", None)
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    CRDValidator.check_schema(schema)
    return CRDValidator(schema, format_checker=K8S_FORMATS)


def crd_errors(doc: dict) -> list[str]:
    """Every way `doc` breaks its KubeRay CRD's schema, each as `path: message`."""
    errors = kuberay_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def validate_manifest(doc: dict) -> None:
    """Built-in kinds against Kubernetes' schemas; KubeRay kinds against their CRD's schema, their metadata and every
    pod template and Service inside them against Kubernetes' schemas as well."""
    if doc["kind"] not in KUBERAY_KINDS:
        _validate_k8s(doc)
        return
    errors = crd_errors(doc)
    if errors:
        raise jsonschema.ValidationError(f"{doc['kind']}/{doc['metadata'].get('name')}: " + "; ".join(errors))
    _validate_k8s({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})  # ObjectMeta
    spec = doc["spec"]
    for cluster in filter(None, [spec if doc["kind"] == "RayCluster" else None, spec.get("rayClusterSpec"),
                                 spec.get("rayClusterConfig")]):
        for _, group, template in groups(cluster):
            _validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})
            if "headService" in group:
                _validate_k8s({"apiVersion": "v1", "kind": "Service", **group["headService"]})
    if "submitterPodTemplate" in spec:
        _validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                       "template": spec["submitterPodTemplate"]})
    if "serveService" in spec:
        _validate_k8s({"apiVersion": "v1", "kind": "Service", **spec["serveService"]})


# -- the KubeRay operator's own checks ------------------------------------------------------------------------------

RAY_CLUSTER_KEY = "ray.io/cluster"  # the one clusterSelector key KubeRay reads: the RayCluster's name
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # the operator derives longer names from these
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")
_AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"


def _head_env(cluster: dict) -> dict[str, dict]:
    containers = cluster["headGroupSpec"]["template"].get("spec", {}).get("containers") or [{}]
    return {e["name"]: e for e in containers[0].get("env", [])}


def _ray_version(text: str) -> Version | None:
    try:
        return Version(text)
    except ValueError:
        return None


def ray_cluster_spec_errors(cluster: dict, annotations: dict[str, str]) -> list[str]:
    """KubeRay's checks of a Ray cluster's spec (ValidateRayClusterSpec) that can concern these manifests."""
    errors = []
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    options = cluster.get("autoscalerOptions") or {}
    head_env = _head_env(cluster)
    v2 = options.get("version") == "v2"
    v2_by_env = head_env.get(_AUTOSCALER_V2_ENV, {}).get("value") in ("1", "true")
    for name, group, template in groups(cluster):
        if not template.get("spec", {}).get("containers"):
            errors.append(f"group {name} has no container")
        params = group.get("rayStartParams") or {}
        if any(params.get(key) for key in _RAY_START_RESOURCES) and group.get("resources"):
            errors.append(f"group {name} sets resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"group {name}: rayStartParams['labels'] is not supported, use the group's labels")
        if v2 and template.get("spec", {}).get("restartPolicy", "Never") != "Never":
            errors.append(f"group {name}: restartPolicy must be Never or unset with autoscaler v2")
        if name == "head":
            continue
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(f"worker group {name} needs minReplicas and maxReplicas without autoscaling")
        if low is not None and high is not None and low > high:
            errors.append(f"worker group {name} has minReplicas {low} > maxReplicas {high}")
        if group.get("idleTimeoutSeconds") is not None and not (v2 or v2_by_env):
            errors.append(f"worker group {name}: idleTimeoutSeconds needs autoscaler v2")
        if group.get("suspend"):
            errors.append(f"worker group {name}: suspend needs the RayJobDeletionPolicy feature gate and no "
                          "autoscaler")
    if annotations.get("ray.io/ft-enabled") and cluster.get("gcsFaultToleranceOptions"):
        errors.append("ray.io/ft-enabled and gcsFaultToleranceOptions are both set")
    if not autoscaling and v2_by_env:
        errors.append(f"{_AUTOSCALER_V2_ENV} is set but enableInTreeAutoscaling is not")
    if autoscaling and options.get("version") and _AUTOSCALER_V2_ENV in head_env:
        errors.append(f"both autoscalerOptions.version and {_AUTOSCALER_V2_ENV} are set")
    auth = cluster.get("authOptions") or {}
    k8s_auth = bool(auth.get("enableK8sTokenAuth"))
    if auth.get("mode") == "token":
        version = _ray_version(cluster.get("rayVersion", ""))
        if version is None or version < Version("2.52.0"):
            errors.append(f"authOptions.mode token needs rayVersion >= 2.52.0, got {cluster.get('rayVersion')!r}")
        if k8s_auth and (version is None or version < Version("2.55.0") or auth.get("secretName")):
            errors.append("enableK8sTokenAuth needs rayVersion >= 2.55.0 and no secretName")
    elif k8s_auth:
        errors.append("enableK8sTokenAuth needs authOptions.mode token")
    return errors


def _submitter_sets_command(spec: dict) -> bool:
    containers = (spec.get("submitterPodTemplate") or {}).get("spec", {}).get("containers") or [{}]
    return bool(containers[0].get("command"))


def ray_job_errors(spec: dict, annotations: dict[str, str]) -> list[str]:
    """KubeRay's checks of a RayJob (ValidateRayJobSpec), then project rules (marked) for settings it would ignore."""
    errors = []
    mode = spec.get("submissionMode", "K8sJobMode")
    selector = spec.get("clusterSelector") or {}
    backoff = spec.get("backoffLimit")
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if spec.get("suspend") and not shutdown:
        errors.append("suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("deletionStrategy"):
        errors.append("deletionStrategy needs the RayJobDeletionPolicy feature gate, which the README's install "
                      "leaves off")
    if not selector and not spec.get("rayClusterSpec"):
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    if selector:
        if not selector.get(RAY_CLUSTER_KEY):
            errors.append(f"clusterSelector must name the RayCluster with the key {RAY_CLUSTER_KEY} (KubeRay reads "
                          f"no other key; it is no label selector), got {selector}")
        if spec.get("suspend"):
            errors.append("a RayJob with a clusterSelector cannot be suspended")
        if mode == "SidecarMode":
            errors.append("clusterSelector is not supported in SidecarMode")
        if backoff:
            errors.append("backoffLimit is incompatible with a clusterSelector")
        # Project rules: KubeRay accepts these and ignores them.
        if set(selector) - {RAY_CLUSTER_KEY}:
            errors.append(f"(project) clusterSelector keys other than {RAY_CLUSTER_KEY} are ignored: "
                          f"{sorted(set(selector) - {RAY_CLUSTER_KEY})}")
        if "rayClusterSpec" in spec:
            errors.append("(project) rayClusterSpec is ignored when a clusterSelector picks an existing cluster")
    if mode == "InteractiveMode" and backoff:
        errors.append("backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec:
            errors.append("SidecarMode supports neither submitterPodTemplate nor submitterConfig")
        head = (spec.get("rayClusterSpec") or {}).get("headGroupSpec", {}).get("template", {}).get("spec", {})
        if head.get("restartPolicy", "Never") != "Never":
            errors.append("restartPolicy of the head pod must be Never or unset in SidecarMode")
    if mode != "K8sJobMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
        errors.append(f"(project) {mode} has no submitter Job: submitterPodTemplate and submitterConfig are ignored")
    if mode == "K8sJobMode" and "submitterPodTemplate" in spec and not spec["submitterPodTemplate"].get(
            "spec", {}).get("containers"):
        errors.append("submitterPodTemplate needs a container (the operator configures the first one)")
    entrypoint = str(spec.get("entrypoint") or "").strip()
    if mode == "InteractiveMode" and entrypoint:
        errors.append("(project) InteractiveMode waits for a job submitted by hand: its entrypoint is never run")
    if mode != "InteractiveMode" and not entrypoint and not (mode == "K8sJobMode" and _submitter_sets_command(spec)):
        errors.append("(project) the job needs an entrypoint: the operator submits it to Ray's job API")
    if "entrypointResources" in spec:
        try:
            resources = json.loads(spec["entrypointResources"])
        except ValueError:
            resources = None
        if not isinstance(resources, dict) or not all(isinstance(v, int | float) for v in resources.values()):
            errors.append("entrypointResources must be a JSON object of resource amounts")
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    except yaml.YAMLError:
        runtime_env = None
    if not isinstance(runtime_env, dict):
        errors.append("runtimeEnvYAML must be a YAML mapping")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            errors.append(f"{field} must be positive")
    if backoff is not None and backoff < 0:
        errors.append("backoffLimit must not be negative")
    if spec.get("rayClusterSpec"):
        if (spec["rayClusterSpec"].get("authOptions") or {}).get("enableK8sTokenAuth"):
            errors.append("K8s token auth is not supported for a RayJob")
        errors += ray_cluster_spec_errors(spec["rayClusterSpec"], annotations)
    return errors


def ray_service_errors(spec: dict, annotations: dict[str, str]) -> list[str]:
    """KubeRay's checks of a RayService (ValidateRayServiceSpec)."""
    cluster = spec["rayClusterConfig"]
    errors = ray_cluster_spec_errors(cluster, annotations)
    if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
        errors.append("K8s token auth is not supported for a RayService")
    if (cluster["headGroupSpec"].get("headService") or {}).get("metadata", {}).get("name"):
        errors.append("rayClusterConfig.headGroupSpec.headService.metadata.name must not be set")
    upgrade = spec.get("upgradeStrategy") or {}
    if upgrade.get("type") not in (None, "None", "NewCluster", "NewClusterWithIncrementalUpgrade"):
        errors.append(f"upgradeStrategy.type {upgrade['type']!r} is not None, NewCluster or "
                      "NewClusterWithIncrementalUpgrade")
    if upgrade.get("type") == "NewClusterWithIncrementalUpgrade":
        options = upgrade.get("clusterUpgradeOptions") or {}
        if not cluster.get("enableInTreeAutoscaling") or not options.get("gatewayClassName"):
            errors.append("NewClusterWithIncrementalUpgrade needs autoscaling and clusterUpgradeOptions with a "
                          "gatewayClassName")
    if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        errors.append("rayClusterDeletionDelaySeconds must not be negative")
    return errors


def kuberay_operator_errors(doc: dict) -> list[str]:
    """What the KubeRay operator would refuse in a KubeRay manifest (the resource would sit in ValidationFailed)."""
    kind, metadata, spec = doc["kind"], doc["metadata"], doc["spec"]
    annotations = metadata.get("annotations") or {}
    name = metadata["name"]
    errors = []
    if len(name) > MAX_NAME_LENGTH[kind] or not _DNS_1035_LABEL.fullmatch(name):
        errors.append(f"{kind} name {name!r} must be a DNS-1035 label of at most {MAX_NAME_LENGTH[kind]} characters")
    if kind == "RayCluster":
        errors += ray_cluster_spec_errors(spec, annotations)
        if (spec.get("upgradeStrategy") or {}).get("type") not in (None, "Recreate", "None"):
            errors.append("a RayCluster's upgradeStrategy.type is Recreate or None")
    elif kind == "RayJob":
        errors += ray_job_errors(spec, annotations)
    else:
        errors += ray_service_errors(spec, annotations)
    return errors


# -- the manifests validate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [d for _, d in MANIFESTS], ids=[name for name, _ in MANIFESTS])
def test_manifest_validates(doc: dict) -> None:
    assert doc["metadata"].get("namespace") == "ogclip" or doc["kind"] == "Namespace"
    validate_manifest(doc)


@pytest.mark.parametrize("doc", [d for _, d in KUBERAY_MANIFESTS], ids=[name for name, _ in KUBERAY_MANIFESTS])
def test_the_kuberay_operator_accepts_the_manifest(doc: dict) -> None:
    assert kuberay_operator_errors(doc) == []


def _edit(kind: str, change: Callable[[dict], Any], *, select: Callable[[dict], bool] = lambda d: True) -> dict:
    doc = copy.deepcopy(next(d for d in BY_KIND[kind] if select(d)))
    change(doc)
    return doc


def _own_cluster(doc: dict) -> bool:
    return "rayClusterSpec" in doc["spec"]


def _first_worker(spec: dict) -> dict:
    return spec["workerGroupSpecs"][0]


def _container(template: dict) -> dict:
    return template["spec"]["containers"][0]


# (what is wrong, the broken manifest, a piece of the expected message)
SCHEMA_BREAKS: list[tuple[str, Callable[[], dict], str]] = [
    ("typo in a KubeRay field", lambda: _edit("RayCluster", lambda d: _first_worker(d["spec"]).update(
        minReplica=1)), "'minReplica' was unexpected"),
    ("unknown top-level field", lambda: _edit("RayJob", lambda d: d.update(specs={})), "'specs' was unexpected"),
    ("status in a manifest", lambda: _edit("RayJob", lambda d: d.update(status={})), "'status' was unexpected"),
    ("wrong apiVersion", lambda: _edit("RayService", lambda d: d.update(apiVersion="ray.io/v1alpha1")),
     "is not one of ['ray.io/v1']"),
    ("typo deep in a pod template", lambda: _edit("RayJob", lambda d: _container(
        _first_worker(d["spec"]["rayClusterSpec"])["template"]).update(resource={}), select=_own_cluster),
     "'resource' was unexpected"),
    ("typo in a pod template's metadata", lambda: _edit("RayCluster", lambda d: d["spec"]["headGroupSpec"][
        "template"]["metadata"].update(label={})), "'label' was unexpected"),
    ("rayStartParams value not a string", lambda: _edit("RayService", lambda d: d["spec"]["rayClusterConfig"][
        "headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})), "0 is not of type 'string'"),
    ("a float quantity (int-or-string)", lambda: _edit("RayCluster", lambda d: _container(_first_worker(
        d["spec"])["template"])["resources"]["limits"].update(cpu=0.5)), "0.5 is not of type 'integer', 'string'"),
    ("a malformed quantity string", lambda: _edit("RayCluster", lambda d: _container(_first_worker(
        d["spec"])["template"])["resources"]["limits"].update(memory="32 GiB")), "does not match"),
    ("a float port (int-or-string)", lambda: _edit("RayCluster", lambda d: d["spec"]["headGroupSpec"][
        "template"]["spec"]["containers"][0].update(readinessProbe={"tcpSocket": {"port": 8265.5}})),
     "8265.5 is not of type 'integer', 'string'"),
    ("a string for an integer", lambda: _edit("RayCluster", lambda d: _first_worker(d["spec"]).update(
        maxReplicas="16")), "'16' is not of type 'integer'"),
    ("int32 overflow", lambda: _edit("RayJob", lambda d: d["spec"].update(activeDeadlineSeconds=2**31),
                                     select=_own_cluster), "is not a 'int32'"),
    ("null where null is not allowed", lambda: _edit("RayCluster", lambda d: d["spec"].update(
        workerGroupSpecs=None)), "None is not of type 'array'"),
    ("two containers of one name (list-type map)", lambda: _edit("RayCluster", lambda d: d["spec"][
        "headGroupSpec"]["template"]["spec"]["containers"].append(copy.deepcopy(_container(d["spec"][
            "headGroupSpec"]["template"])))), "same key"),
    ("a field with CEL rules", lambda: _edit("RayJob", lambda d: d["spec"].update(
        managedBy="ray.io/kuberay-operator")), "CEL rules"),
    ("required field missing", lambda: _edit("RayService", lambda d: d["spec"].pop("rayClusterConfig")),
     "'rayClusterConfig' is a required property"),
]


def test_int_or_string_takes_an_integer_or_a_string() -> None:
    """Quantities and ports are int-or-string: `cpu: 8`, `cpu: "8"`, `cpu: 500m` and `port: dashboard` all pass."""
    for cpu in (8, "8", "500m", "7.5"):
        doc = _edit("RayCluster", lambda d, cpu=cpu: _container(_first_worker(d["spec"])["template"])[
            "resources"]["limits"].update(cpu=cpu))
        assert crd_errors(doc) == [], cpu
    for port in (8265, "dashboard"):
        doc = _edit("RayCluster", lambda d, port=port: _container(d["spec"]["headGroupSpec"]["template"]).update(
            readinessProbe={"tcpSocket": {"port": port}}))
        assert crd_errors(doc) == [], port


def test_metadata_goes_through_kubernetes_objectmeta() -> None:
    doc = _edit("RayJob", lambda d: d["metadata"].update(label={"a": "b"}))
    assert crd_errors(doc) == []  # the CRD's root metadata is a bare object: the API server checks ObjectMeta itself
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(doc)


def test_structural_schema_semantics() -> None:
    """The conversion on a small schema: undeclared fields, maps, preserve-unknown-fields, nullable, list types."""
    structural = {"type": "object", "properties": {
        "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "integer", "format": "int32"}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"known": {"type": "integer"}}},
        "maybe": {"type": "string", "nullable": True},
        "size": {"x-kubernetes-int-or-string": True, "pattern": "^[0-9]+Gi$",
                 "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "ports": {"type": "array", "x-kubernetes-list-type": "map",
                  "x-kubernetes-list-map-keys": ["port", "protocol"],
                  "items": {"type": "object", "required": ["port"], "properties": {
                      "port": {"type": "integer"}, "protocol": {"type": "string", "default": "TCP"}}}},
        "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}}}
    validator = CRDValidator(structural_to_json_schema(structural), format_checker=K8S_FORMATS)

    def errors(instance: dict) -> list[str]:
        return [e.message for e in validator.iter_errors(instance)]

    good = {"strict": {"a": "x"}, "map": {"k": 1}, "free": {"known": 1, "anything": {"goes": True}}, "maybe": None,
            "size": 3, "ports": [{"port": 80}, {"port": 80, "protocol": "UDP"}], "tags": ["a", "b"]}
    assert errors(good) == []
    assert errors({**good, "size": "3Gi"}) == []
    for bad in ({"strict": {"a": "x", "b": "y"}}, {"other": 1}, {"map": {"k": "1"}}, {"map": {"k": 2**31}},
                {"free": {"known": "1"}}, {"strict": None}, {"size": 1.5}, {"size": True}, {"size": "3 Gi"},
                {"ports": [{"port": 80}, {"port": 80, "protocol": "TCP"}]}, {"tags": ["a", "a"]}):
        assert errors({**good, **bad}), bad


# (what is wrong, the broken manifest, a piece of the expected message)
OPERATOR_BREAKS: list[tuple[str, Callable[[], dict], str]] = [
    ("clusterSelector as a label selector", lambda: _edit("RayJob", lambda d: d["spec"].update(
        clusterSelector={"ogclip.io/cluster": "shared"}), select=lambda d: not _own_cluster(d)), RAY_CLUSTER_KEY),
    ("clusterSelector with an extra key", lambda: _edit("RayJob", lambda d: d["spec"]["clusterSelector"].update(
        {"ogclip.io/cluster": "shared"}), select=lambda d: not _own_cluster(d)), "keys other than"),
    ("clusterSelector and rayClusterSpec", lambda: _edit("RayJob", lambda d: d["spec"].update(
        clusterSelector={RAY_CLUSTER_KEY: "ogclip"}), select=_own_cluster), "rayClusterSpec is ignored"),
    ("neither clusterSelector nor rayClusterSpec", lambda: _edit("RayJob", lambda d: d["spec"].pop(
        "clusterSelector"), select=lambda d: not _own_cluster(d)), "one of rayClusterSpec or clusterSelector"),
    ("backoffLimit on a selected cluster", lambda: _edit("RayJob", lambda d: d["spec"].update(backoffLimit=2),
                                                          select=lambda d: not _own_cluster(d)), "backoffLimit"),
    ("clusterSelector in SidecarMode", lambda: _edit("RayJob", lambda d: d["spec"].update(
        submissionMode="SidecarMode"), select=lambda d: not _own_cluster(d)), "SidecarMode"),
    ("submitterPodTemplate in SidecarMode", lambda: _edit("RayJob", lambda d: d["spec"].update(
        submissionMode="SidecarMode", submitterPodTemplate={"spec": {"containers": [{"name": "s"}]}}),
        select=_own_cluster), "SidecarMode supports neither"),
    ("submitterPodTemplate in HTTPMode", lambda: _edit("RayJob", lambda d: d["spec"].update(
        submitterPodTemplate={"spec": {"containers": [{"name": "s"}]}}), select=_own_cluster), "no submitter Job"),
    ("submitterPodTemplate without a container", lambda: _edit("RayJob", lambda d: d["spec"].update(
        submissionMode="K8sJobMode", submitterPodTemplate={"spec": {"containers": []}}), select=_own_cluster),
     "needs a container"),
    ("no entrypoint", lambda: _edit("RayJob", lambda d: d["spec"].update(entrypoint=" ")), "needs an entrypoint"),
    ("entrypoint in InteractiveMode", lambda: _edit("RayJob", lambda d: d["spec"].update(
        submissionMode="InteractiveMode", backoffLimit=0), select=_own_cluster), "never run"),
    ("backoffLimit in InteractiveMode", lambda: _edit("RayJob", lambda d: d["spec"].update(
        submissionMode="InteractiveMode"), select=_own_cluster), "incompatible with InteractiveMode"),
    ("TTL without shutdown", lambda: _edit("RayJob", lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
                                           select=_own_cluster), "ttlSecondsAfterFinished"),
    ("a zero deadline", lambda: _edit("RayJob", lambda d: d["spec"].update(activeDeadlineSeconds=0)),
     "activeDeadlineSeconds must be positive"),
    ("runtimeEnvYAML not a mapping", lambda: _edit("RayJob", lambda d: d["spec"].update(
        runtimeEnvYAML="- a list")), "runtimeEnvYAML"),
    ("a RayJob name too long", lambda: _edit("RayJob", lambda d: d["metadata"].update(name="a" * 48)),
     "at most 47"),
    ("a name that is no DNS-1035 label", lambda: _edit("RayCluster", lambda d: d["metadata"].update(
        name="1ogclip")), "DNS-1035"),
    ("token auth on an old Ray", lambda: _edit("RayService", lambda d: d["spec"]["rayClusterConfig"].update(
        rayVersion="2.51.0")), ">= 2.52.0"),
    ("minReplicas above maxReplicas", lambda: _edit("RayCluster", lambda d: _first_worker(d["spec"]).update(
        minReplicas=20)), "minReplicas 20 > maxReplicas"),
    ("resources twice", lambda: _edit("RayCluster", lambda d: d["spec"]["headGroupSpec"].update(
        resources={"CPU": "1"})), "both rayStartParams and resources"),
    ("worker idle timeout without autoscaler v2", lambda: _edit("RayCluster", lambda d: _first_worker(
        d["spec"]).update(idleTimeoutSeconds=60)), "autoscaler v2"),
    ("bounds missing without autoscaling", lambda: _edit("RayJob", lambda d: _first_worker(
        d["spec"]["rayClusterSpec"]).pop("maxReplicas"), select=_own_cluster), "needs minReplicas and maxReplicas"),
    ("a RayService upgrade type of RayCluster's", lambda: _edit("RayService", lambda d: d["spec"].update(
        upgradeStrategy={"type": "Recreate"})), "upgradeStrategy.type"),
]


BREAKS = [(f"crd: {what}", crd_errors, b, e) for what, b, e in SCHEMA_BREAKS] + [
    (f"operator: {what}", kuberay_operator_errors, b, e) for what, b, e in OPERATOR_BREAKS]


@pytest.mark.parametrize(("check", "break_", "expected"), [case[1:] for case in BREAKS],
                         ids=[case[0] for case in BREAKS])
def test_a_broken_manifest_is_refused(check: Callable[[dict], list[str]], break_: Callable[[], dict],
                                      expected: str) -> None:
    """Each break is refused by its checker (the CRD schema, or the operator's own rules) with the expected message."""
    errors = check(break_())
    assert any(expected in error for error in errors), errors


def test_the_crds_are_the_release_the_readme_installs() -> None:
    assert f"kuberay/kuberay-operator --version {KUBERAY_VERSION}" in readme_cluster_section()
    folder = kuberay_crd_dir()
    if folder is not None:
        assert folder.name == f"v{KUBERAY_VERSION}" or "OGCLIP_KUBERAY_CRDS" in os.environ
        assert {f"ray.io_{plural}.yaml" for plural in KUBERAY_KINDS.values()} <= {p.name for p in folder.iterdir()}


def test_core_validation_is_not_vacuous() -> None:
    """A typo in a built-in object fails validation."""
    statefulset = copy.deepcopy(BY_KIND["StatefulSet"][0])
    statefulset["spec"]["replica"] = 1
    policy = copy.deepcopy(BY_KIND["NetworkPolicy"][0])
    policy["spec"]["podSelectors"] = {}
    for broken in (statefulset, policy):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_manifest(broken)


def test_expected_objects_exist() -> None:
    kinds = {name.split(":")[1] for name, _ in MANIFESTS}
    for needed in ("Namespace/ogclip", "PersistentVolumeClaim/ogclip-data", "StatefulSet/ogclip-neo4j",
                   "Service/ogclip-neo4j", "Service/ogclip-neo4j-headless", "RayCluster/ogclip", "RayJob/ogclip-data",
                   "RayJob/ogclip-train-8gpu", "NetworkPolicy/default-deny-ingress",
                   "NetworkPolicy/ray-metrics-from-prometheus"):
        assert needed in kinds
    assert len(BY_KIND["RayService"]) == 1


# -- security: token auth, private ports, secrets -------------------------------------------------------------------


def test_ray_token_auth_stays_on_with_a_secret_token() -> None:
    for name, spec in ray_cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET[0]}, name
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not spec["headGroupSpec"].get("enableIngress", False), name
        assert Version(spec["rayVersion"]) >= Version("2.52"), "Ray token authentication needs Ray 2.52+"


def test_nothing_is_exposed_outside_the_cluster() -> None:
    services = BY_KIND.get("Service", []) + [d["spec"]["serveService"] for d in BY_KIND["RayService"]
                                             if "serveService" in d["spec"]]
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not BY_KIND.get("Ingress")
    policies = {p["metadata"]["name"]: p["spec"] for p in BY_KIND["NetworkPolicy"]}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    dashboard = [p for p in policies.values() for rule in p.get("ingress", []) for port in rule.get("ports", [])
                 if port["port"] == 8265]
    assert len(dashboard) == 1 and dashboard[0]["podSelector"] == {"matchLabels": {"ray.io/node-type": "head"}}
    (rule,) = dashboard[0]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}]
    for policy in policies.values():  # no rule admits anything from outside the cluster (ipBlock)
        assert all("ipBlock" not in peer for rule in policy.get("ingress", []) for peer in rule.get("from", []))


def _secret_refs(obj: Any) -> set[tuple[str, str]]:
    refs = set()
    if isinstance(obj, dict):
        if "secretKeyRef" in obj:
            refs.add((obj["secretKeyRef"]["name"], obj["secretKeyRef"]["key"]))
        if obj.get("mode") == "token" and "secretName" in obj:
            refs.add((obj["secretName"], RAY_TOKEN_SECRET[1]))
        for value in obj.values():
            refs |= _secret_refs(value)
    elif isinstance(obj, list):
        for value in obj:
            refs |= _secret_refs(value)
    return refs


def readme_cluster_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Running on a cluster")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else None]


def test_every_secret_the_manifests_read_is_created_in_the_readme() -> None:
    created = set()
    shell = readme_cluster_section().replace("\\\n", " ")  # join continued lines
    for command in re.findall(r"kubectl[^\n]*create secret generic[^\n]*", shell):
        name = re.search(r"create secret generic (\S+)", command).group(1)
        created |= {(name, key) for key in re.findall(r"--from-literal=([A-Za-z0-9_.-]+)=", command)}
    refs = set().union(*(_secret_refs(doc) for _, doc in MANIFESTS))
    assert RAY_TOKEN_SECRET in refs and ("ogclip-neo4j", "NEO4J_AUTH") in refs
    assert refs <= created, f"secrets read but never created: {sorted(refs - created)}"


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_ray_pods_images_resources_and_graph_credentials() -> None:
    ray_version = ray.__version__
    for name, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray_version, f"{name}: rayVersion must be the images' Ray"
        for group_name, group, template in groups(spec):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
            assert pod["securityContext"]["fsGroup"] == 1000
            assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "ray"  # the network policies
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "ogclip-data"
            assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
            (container,) = pod["containers"]
            gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
            assert container["image"] == IMAGES["gpu" if gpus else "cpu"], f"{name}/{group_name}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}/{group_name} {kind}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data", "/dev/shm"}
            env = _env(container)
            for variable, key in (("OGCLIP_NEO4J_URI", "uri"), ("OGCLIP_NEO4J_PASSWORD", "password")):
                assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "ogclip-neo4j", "key": key}
            assert env["OGCLIP_HOME"]["value"].startswith("/data/")
            assert not any(k.startswith("RAY_AUTH") for k in env), "KubeRay's authOptions sets the token itself"
            if group_name != "head":
                assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group_name
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: nothing runs on the head"
    pvc = next(d for d in BY_KIND["PersistentVolumeClaim"] if d["metadata"]["name"] == "ogclip-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_neo4j_takes_its_password_from_the_secret() -> None:
    (statefulset,) = BY_KIND["StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"neo4j:5\.\d+(\.\d+)?-community", container["image"])
    assert _env(container)["NEO4J_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": "ogclip-neo4j", "key": "NEO4J_AUTH"}
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def _pod_templates() -> list[tuple[str, dict]]:
    """(namespace, pod template) of every workload: StatefulSets and every Ray pod."""
    templates = [(d["metadata"]["namespace"], d["spec"]["template"]) for d in BY_KIND.get("StatefulSet", [])]
    for kind in KUBERAY_KINDS:
        for doc in BY_KIND.get(kind, []):
            cluster = {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
                       "RayService": doc["spec"].get("rayClusterConfig")}[kind]
            if cluster:
                templates += [(doc["metadata"]["namespace"], t) for _, _, t in groups(cluster)]
    return templates


def _selects(match_labels: dict[str, str], template: dict) -> bool:
    return match_labels.items() <= template["metadata"].get("labels", {}).items()


def test_statefulsets_are_governed_by_headless_services() -> None:
    services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in BY_KIND["Service"]}
    for statefulset in BY_KIND["StatefulSet"]:
        key = (statefulset["metadata"]["namespace"], statefulset["spec"]["serviceName"])
        assert key in services, f"{key}: the StatefulSet's serviceName names no Service"
        governing = services[key]["spec"]
        assert governing.get("clusterIP") == "None", f"{key} must be headless (clusterIP: None)"
        assert _selects(governing["selector"], statefulset["spec"]["template"]), f"{key} selects other pods"


def test_services_select_pods_that_have_their_ports() -> None:
    templates = _pod_templates()
    for service in BY_KIND["Service"]:
        namespace, spec = service["metadata"]["namespace"], service["spec"]
        pods = [t for ns, t in templates if ns == namespace and _selects(spec["selector"], t)]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for port in spec["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in pods:
                declared = {(p.get("name"), p["containerPort"]) for c in pod["spec"]["containers"]
                            for p in c.get("ports", [])}
                assert any(target in pair for pair in declared), f"{service['metadata']['name']}: no port {target}"


def test_the_shared_volume_names_a_documented_rwx_storage_class() -> None:
    (pvc,) = [d for d in BY_KIND["PersistentVolumeClaim"] if d["metadata"]["name"] == "ogclip-data"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == RWX_STORAGE_CLASS
    # The README's apply command replaces exactly this line with the cluster's own RWX class.
    line = f"storageClassName: {RWX_STORAGE_CLASS}"
    assert (K8S / "namespace.yaml").read_text().count(line) == 1
    section = readme_cluster_section()
    assert re.search(rf'sed "s#{line}#storageClassName: \$\w+#" infra/k8s/namespace.yaml \| kubectl apply -f -',
                     section), "README step 3 no longer sets the storage class"
    assert "kubectl apply -f infra/k8s/namespace.yaml" not in section  # that would keep the placeholder


def test_prometheus_may_scrape_the_ray_metrics_port() -> None:
    """Under default-deny, exactly one policy opens Ray's metrics port, to Prometheus's pods, on every Ray pod."""
    ray_templates = [t for _, t in _pod_templates() if t["metadata"]["labels"].get("app.kubernetes.io/component")
                     == "ray"]
    opening = [p for p in BY_KIND["NetworkPolicy"] for rule in p["spec"].get("ingress", [])
               if any(port.get("port") in (RAY_METRICS_PORT, "metrics") for port in rule.get("ports", []))]
    assert len(opening) == 1, [p["metadata"]["name"] for p in opening]
    (policy,) = opening
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"] and all(_selects(spec["podSelector"]["matchLabels"], t)
                                                      for t in ray_templates)
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": RAY_METRICS_PORT}]
    # One peer with both selectors: Prometheus's pods in Prometheus's namespace (two peers would admit either).
    namespace = {"matchLabels": {"kubernetes.io/metadata.name": PROMETHEUS_NAMESPACE}}
    assert rule["from"] == [{"namespaceSelector": namespace,
                             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    for name, cluster in ray_cluster_specs():  # nothing moves the port away from KubeRay's default
        for group_name, group, template in groups(cluster):
            assert group.get("rayStartParams", {}).get("metrics-export-port", str(RAY_METRICS_PORT)) == str(
                RAY_METRICS_PORT), f"{name}/{group_name}"
            for port in _container(template).get("ports", []):
                assert port.get("name") != "metrics" or port["containerPort"] == RAY_METRICS_PORT
    assert PROMETHEUS_NAMESPACE in readme_cluster_section()


# -- entrypoints and configs ------------------------------------------------------------------------------------------


def check_ogclip_command(argv: list[str]) -> tuple[tuple[str, ...], Any]:
    """Parse an ``ogclip`` command line with the real CLI; validate the config it names. Returns (command, config)."""
    assert argv[0] == "ogclip", argv
    args = build_parser().parse_args(normalise_argv(argv[1:]))
    if args.command == "submit":
        return check_ogclip_command(["ogclip", *args.job])
    command = tuple(a for a in (args.command, getattr(args, "data_command", None)) if a)
    config = getattr(args, "config", None)
    if config is None:
        return command, None
    path = ROOT / Path(config).relative_to("/app") if Path(config).is_absolute() else ROOT / config
    assert path.is_file(), f"{argv}: {path} does not exist"
    return command, load_yaml_config(path, COMMAND_SCHEMAS[command])


def test_ray_job_entrypoints_exist_and_their_configs_validate() -> None:
    seen = set()
    for job in BY_KIND["RayJob"]:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert not {"&&", "||", ";", "|"} & set(argv), "one command per job"
        command, config = check_ogclip_command(argv)
        assert config is not None and str(job["spec"]["entrypoint"]).split("--config ")[1].startswith("/app/")
        seen.add(command)
    assert seen == {("data", "pipeline"), ("train",)}


def test_the_training_job_is_the_papers_8_by_32_run() -> None:
    job = next(d for d in BY_KIND["RayJob"] if d["spec"]["entrypoint"].startswith("ogclip train"))
    _, cfg = check_ogclip_command(shlex.split(job["spec"]["entrypoint"]))
    assert cfg.num_workers * cfg.train.batch_size == 256 and cfg.num_workers == 8
    assert cfg.use_gpu is True and str(cfg.data).startswith("/data/") and str(cfg.output_dir).startswith("/data/")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] and spec["backoffLimit"] >= 1  # retries resume from the checkpoint
    (worker,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == cfg.num_workers and worker["replicas"] == worker["maxReplicas"] == 1
    assert cfg.num_workers * cfg.cpus_per_worker < int(limits["cpu"])  # room left for Ray Data's decoding tasks
    # The shared cluster's GPU group is made of the same 8-GPU training groups.
    shared = BY_KIND["RayCluster"][0]["spec"]["workerGroupSpecs"]
    assert any(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) == 8
               for g in shared)


def test_data_job_runs_on_the_shared_cluster() -> None:
    job = next(d for d in BY_KIND["RayJob"] if d["spec"]["entrypoint"].startswith("ogclip data"))
    (cluster,) = BY_KIND["RayCluster"]
    # KubeRay finds the cluster by name, in the RayJob's own namespace; the job brings no cluster of its own.
    assert job["spec"]["clusterSelector"] == {RAY_CLUSTER_KEY: cluster["metadata"]["name"]}
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"] and "rayClusterSpec" not in job["spec"]
    _, cfg = check_ogclip_command(shlex.split(job["spec"]["entrypoint"]))
    assert str(cfg.output_dir).startswith("/data/")
    train = next(d for d in BY_KIND["RayJob"] if d["spec"]["entrypoint"].startswith("ogclip train"))
    _, train_cfg = check_ogclip_command(shlex.split(train["spec"]["entrypoint"]))
    assert train_cfg.data == cfg.output_dir / "stages" / "shards" / "parquet"  # training reads what the job writes


def test_readme_commands_parse() -> None:
    """Every `ogclip …` line of the README's cluster section is a real command with a valid config."""
    lines = [re.sub(r"^\.venv/bin/", "", line.strip()) for line in readme_cluster_section().splitlines()]
    lines = [line for line in lines if line.startswith("ogclip ")]
    assert any(line.startswith("ogclip submit") for line in lines)
    for line in lines:
        check_ogclip_command(shlex.split(line.split(" #")[0]))


def test_rayservice_serves_the_classifier_with_autoscaling_and_zero_downtime_upgrades() -> None:
    (service,) = BY_KIND["RayService"]
    spec = service["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}  # a new cluster takes traffic only once healthy
    serve = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve["applications"]
    module_name, _, attribute = app["import_path"].partition(":")
    assert (module_name, attribute) == ("ogclip_serve.app", "build_app")
    from ogclip_serve.config import ServeConfig

    cfg = ServeConfig.model_validate(app["args"])  # what build_app makes of its args
    assert cfg.host == "0.0.0.0" and cfg.port == serve["http_options"]["port"]
    scaling = cfg.deployment.autoscaling
    assert cfg.deployment.num_gpus > 0 and scaling.max_replicas > scaling.min_replicas
    assert str(cfg.bundle).startswith("/data/")
    # The builder is looked up in the module's source, not imported: importing it builds the Serve app.
    source = ROOT / "serve" / Path(*module_name.split(".")).with_suffix(".py")
    assert attribute in {node.name for node in ast.parse(source.read_text()).body if isinstance(node, ast.FunctionDef)}
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"]  # more replicas than GPUs → the Ray autoscaler adds GPU pods
    (gpu,) = [g for _, g, t in groups(cluster) if "nvidia.com/gpu" in t["spec"]["containers"][0]["resources"]["limits"]]
    gpus_per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpu["maxReplicas"] * gpus_per_pod >= cfg.deployment.autoscaling.max_replicas * cfg.deployment.num_gpus
    for _, _, template in groups(cluster):
        assert _env(template["spec"]["containers"][0])["OGCLIP_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == (
            "ogclip-api-token")


# -- images ---------------------------------------------------------------------------------------------------------


def _constraints(flavour: str) -> dict[str, str]:
    pins = {}
    for line in (DOCKER / f"constraints-{flavour}.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _instructions(flavour: str) -> list[tuple[str, str]]:
    text = (DOCKER / f"Dockerfile.{flavour}").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


# ids that are not bare "gpu": that keyword is the `gpu` marker, which skips tests on machines without CUDA.
@pytest.mark.parametrize("flavour", ["cpu", "gpu"], ids=["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_builds_the_wheel_and_runs_unprivileged(flavour: str) -> None:
    steps = _instructions(flavour)
    bases = [args.split()[0] for op, args in steps if op == "FROM"]
    assert all(":" in base and not base.endswith(":latest") for base in bases), bases
    runtime = bases[-1]
    assert runtime == ("nvidia/cuda:13.0.2-runtime-ubuntu24.04" if flavour == "gpu" else "ubuntu:24.04")
    runs = " ".join(" ".join(args.split()) for op, args in steps if op == "RUN")
    assert "pip wheel --no-deps" in runs
    # Layers: the dependencies from the pins alone, then the project's wheel without dependencies (checked), so a
    # code change rebuilds one small layer.
    wheel = steps.index(("COPY", "--from=wheel /dist /tmp/dist"))
    pinned = [i for i, (op, args) in enumerate(steps) if op == "RUN" and ("pip install --requirement" in args
                                                                         or "--constraint /tmp/constraints" in args)]
    assert pinned and max(pinned) < wheel, "dependencies must be installed before the project's code is copied"
    assert "pip install --no-deps /tmp/dist/ogclip_platform-*.whl && pip check" in runs
    if flavour == "cpu":  # PyTorch's CPU build, without PyPI's CUDA libraries
        assert '--index-url "$TORCH_INDEX_URL"' in runs and "nvidia-" in runs
    for op, args in steps:  # everything copied from the build context exists
        if op == "COPY" and "--from=" not in args:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            assert all((ROOT / source).exists() for source in sources), args
    copies = [args for op, args in steps if op == "COPY"]
    assert f"infra/docker/constraints-{flavour}.txt /tmp/constraints.txt" in copies
    assert "--chown=1000:1000 infra /app/infra" in copies  # /app/infra/configs: the manifests' config paths
    users = [args for op, args in steps if op == "USER"]
    assert users == ["1000:1000"]
    (entrypoint,) = [args for op, args in steps if op == "ENTRYPOINT"]
    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")
               if e.value.startswith("ogclip_jobs.")}
    assert yaml.safe_load(entrypoint) == ["ogclip"] and "ogclip" in scripts
    assert "wget" in runs  # KubeRay's probes
    ignore = [line for line in (DOCKER / f"Dockerfile.{flavour}.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "**" and {"!pyproject.toml", "!README.md", "!platform/", "!infra/"} <= set(ignore)


def test_image_pins_resolve_together() -> None:
    gpu, cpu = _constraints("gpu"), _constraints("cpu")
    # vllm 0.32.0's metadata pins torch==2.13.0 and torchvision==0.28.0; the three move together.
    assert (gpu["vllm"], gpu["torch"], gpu["torchvision"]) == ("0.32.0", "2.13.0", "0.28.0")
    assert gpu["ray"] == cpu["ray"] == ray.__version__
    shared = set(gpu) & set(cpu)
    assert {"torch", "torchvision", "numpy", "pyarrow", "ray"} <= shared
    assert {name: cpu[name] for name in shared} == {name: gpu[name] for name in shared}, "CPU and GPU images differ"
    assert "vllm" not in cpu and "faiss-cpu" in cpu and "faiss-gpu-cu12" in gpu and "sam2" in gpu
    requirements = [Requirement(r) for r in importlib.metadata.requires("ogclip-platform")]
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "gpu"}):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name in gpu:
            assert Version(gpu[name]) in requirement.specifier, f"{name}=={gpu[name]} breaks {requirement}"


@pytest.mark.parametrize("flavour", ["cpu", "gpu"], ids=["constraints-cpu", "constraints-gpu"])
def test_every_dependency_of_the_image_is_pinned(flavour: str) -> None:
    """A dependency added to pyproject.toml without a pin would float in the images: regenerate the constraints
    (the command is in the header of infra/docker/constraints-*.txt)."""
    pins = _constraints(flavour)
    missing = []
    for requirement in map(Requirement, importlib.metadata.requires("ogclip-platform")):
        applies = requirement.marker is None or requirement.marker.evaluate({"extra": flavour})
        if applies and requirement.name.lower().replace("_", "-") not in pins:
            missing.append(str(requirement))
    assert not missing, f"not in infra/docker/constraints-{flavour}.txt: {missing}"
