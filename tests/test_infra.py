"""infra/: the Kubernetes manifests validate, and everything they and the Dockerfiles name exists and validates.

Built-in kinds are checked against the Kubernetes JSON schemas that PyPI's ``kubernetes-validate`` ships, strictly
(unknown fields are errors). No PyPI package ships KubeRay's CRD schemas, so the KubeRay kinds are checked against
``KUBERAY_SCHEMAS`` below, written from KubeRay's ray.io/v1 API reference (v1.6) for the fields these manifests
may use, with unknown fields refused; every pod template and Service inside them goes through the Kubernetes
schemas like a built-in object.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from ogclip.config import DataPipelineConfig, EvalConfig, TrainJobConfig, load_yaml_config
from ogclip_jobs.cli import build_parser
from ogclip_jobs.submit import normalise_argv

ROOT = Path(__file__).resolve().parents[1]
K8S, DOCKER = ROOT / "infra" / "k8s", ROOT / "infra" / "docker"
K8S_VERSION = "1.33"
IMAGES = {"cpu": "registry.example.com/ogclip/ogclip-cpu:0.1.0", "gpu": "registry.example.com/ogclip/ogclip-gpu:0.1.0"}
RAY_TOKEN_SECRET = ("ogclip-ray-token", "auth_token")  # KubeRay's authOptions.secretName reads this key
# `ogclip` commands a manifest or the README may run, and the schema of the --config each one reads.
COMMAND_SCHEMAS = {("data", "pipeline"): DataPipelineConfig, ("train",): TrainJobConfig, ("eval",): EvalConfig}

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT = {"type": "object"}
_NON_NEGATIVE = {"type": "integer", "minimum": 0}
_AUTH_OPTIONS = {"type": "object", "additionalProperties": False, "properties": {
    "mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
    "enableK8sTokenAuth": {"type": "boolean"}}}
_AUTOSCALER_OPTIONS = {"type": "object", "additionalProperties": False, "properties": {
    "resources": _OBJECT, "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
    "securityContext": _OBJECT, "idleTimeoutSeconds": _NON_NEGATIVE, "version": {"enum": ["v1", "v2"]},
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "env": {"type": "array"},
    "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"}}}
_HEAD_GROUP = {"type": "object", "additionalProperties": False, "required": ["template"], "properties": {
    "template": _OBJECT, "headService": _OBJECT, "enableIngress": {"type": "boolean"}, "rayStartParams": _STRING_MAP,
    "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}}
_WORKER_GROUP = {"type": "object", "additionalProperties": False, "required": ["groupName", "template"],
                 "properties": {"groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                "replicas": _NON_NEGATIVE, "minReplicas": _NON_NEGATIVE,
                                "maxReplicas": _NON_NEGATIVE, "idleTimeoutSeconds": _NON_NEGATIVE,
                                "numOfHosts": {"type": "integer", "minimum": 1}, "suspend": {"type": "boolean"},
                                "rayStartParams": _STRING_MAP, "template": _OBJECT, "scaleStrategy": _OBJECT}}
_RAY_CLUSTER_SPEC = {"type": "object", "additionalProperties": False, "required": ["headGroupSpec"], "properties": {
    "rayVersion": {"type": "string"}, "authOptions": _AUTH_OPTIONS, "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": _AUTOSCALER_OPTIONS, "headServiceAnnotations": _STRING_MAP, "suspend": {"type": "boolean"},
    "managedBy": {"type": "string"}, "gcsFaultToleranceOptions": _OBJECT, "headGroupSpec": _HEAD_GROUP,
    "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP}}}
_RAY_JOB_SPEC = {"type": "object", "additionalProperties": False, "required": ["entrypoint"], "properties": {
    "entrypoint": {"type": "string", "minLength": 1}, "rayClusterSpec": _RAY_CLUSTER_SPEC,
    "clusterSelector": _STRING_MAP, "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode",
                                                                "SidecarMode"]},
    "activeDeadlineSeconds": {"type": "integer", "minimum": 1}, "backoffLimit": _NON_NEGATIVE,
    "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": _NON_NEGATIVE,
    "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"}, "metadata": _STRING_MAP,
    "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
    "entrypointResources": {"type": "string"}, "submitterPodTemplate": _OBJECT, "suspend": {"type": "boolean"},
    "submitterConfig": {"type": "object", "additionalProperties": False,
                        "properties": {"backoffLimit": _NON_NEGATIVE}},
    "managedBy": {"type": "string"}, "deletionStrategy": _OBJECT}}
_RAY_SERVICE_SPEC = {"type": "object", "additionalProperties": False, "required": ["rayClusterConfig"],
                     "properties": {
                         "serveConfigV2": {"type": "string"}, "rayClusterConfig": _RAY_CLUSTER_SPEC,
                         "upgradeStrategy": {"type": "object", "additionalProperties": False, "properties": {
                             "type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
                             "clusterUpgradeOptions": _OBJECT}},
                         "serveService": _OBJECT, "excludeHeadPodFromServeSvc": {"type": "boolean"},
                         "rayClusterDeletionDelaySeconds": _NON_NEGATIVE}}


def _kuberay(kind: str, spec: dict) -> dict:
    metadata = {"type": "object", "required": ["name", "namespace"], "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 48},
        "namespace": {"type": "string"}, "labels": _STRING_MAP, "annotations": _STRING_MAP},
        "additionalProperties": False}
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": metadata,
                           "spec": spec}}


KUBERAY_SCHEMAS = {"RayCluster": _kuberay("RayCluster", _RAY_CLUSTER_SPEC), "RayJob": _kuberay("RayJob", _RAY_JOB_SPEC),
                   "RayService": _kuberay("RayService", _RAY_SERVICE_SPEC)}


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


def validate_manifest(doc: dict) -> None:
    """Kubernetes schemas for built-in kinds; KubeRay's fields here, and its pod templates and Services as k8s."""
    if doc["kind"] not in KUBERAY_SCHEMAS:
        _validate_k8s(doc)
        return
    jsonschema.validate(doc, KUBERAY_SCHEMAS[doc["kind"]])
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "a RayJob has its own cluster xor a selector"
    clusters = [spec] if doc["kind"] == "RayCluster" else [spec.get("rayClusterSpec") or spec.get("rayClusterConfig")]
    for cluster in filter(None, clusters):
        for _, group, template in groups(cluster):
            _validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})
            if "headService" in group:
                _validate_k8s(group["headService"])
    if "serveService" in spec:
        _validate_k8s({"apiVersion": "v1", "kind": "Service", **spec["serveService"]})


@pytest.mark.parametrize("doc", [d for _, d in MANIFESTS], ids=[name for name, _ in MANIFESTS])
def test_manifest_validates(doc: dict) -> None:
    assert doc["metadata"].get("namespace") == "ogclip" or doc["kind"] == "Namespace"
    validate_manifest(doc)


def test_validation_is_not_vacuous() -> None:
    """A typo anywhere, in a KubeRay field, a pod template or a built-in object, fails validation."""
    cluster = copy.deepcopy(BY_KIND["RayCluster"][0])
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    job = copy.deepcopy(next(d for d in BY_KIND["RayJob"] if "rayClusterSpec" in d["spec"]))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    statefulset = copy.deepcopy(BY_KIND["StatefulSet"][0])
    statefulset["spec"]["replica"] = 1
    service = copy.deepcopy(BY_KIND["RayService"][0])
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"] = {"num-cpus": 0}  # must be a string
    for broken in (cluster, job, statefulset, service):
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            validate_manifest(broken)


def test_expected_objects_exist() -> None:
    kinds = {name.split(":")[1] for name, _ in MANIFESTS}
    for needed in ("Namespace/ogclip", "PersistentVolumeClaim/ogclip-data", "StatefulSet/ogclip-neo4j",
                   "Service/ogclip-neo4j", "RayCluster/ogclip", "RayJob/ogclip-data", "RayJob/ogclip-train-8gpu",
                   "NetworkPolicy/default-deny-ingress"):
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
    assert job["spec"]["clusterSelector"].items() <= cluster["metadata"]["labels"].items()
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
    from ogclip.config import ServeConfig

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
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "pip wheel --no-deps" in runs and f'ogclip_platform-*.whl)[{flavour}]"' in runs
    assert "--constraint /tmp/constraints.txt" in runs
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
