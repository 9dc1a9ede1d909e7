"""The deployment files: the Dockerfile against hadolint, the Kubernetes manifests (Nano on one GPU, the Super
overlay on eight) against the Kubernetes API's own schemas (kubernetes-validate, strict: unknown fields fail), and the
multi-node LeaderWorkerSet (Super on two nodes): its pod templates against those schemas, its own fields against
the LeaderWorkerSet API by hand (kubernetes-validate knows no custom resource), and its commands against the
command lines of Ray and `cosmos3-serve`."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"
NAME_KEYED_LISTS = ("containers", "env", "volumes", "volumeMounts", "ports")  # strategic merge: by `name`
# The LeaderWorkerSet API (kubernetes-sigs/lws, leaderworkerset.x-k8s.io/v1): the fields of its spec and of its
# leaderWorkerTemplate, and their enumerations.
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_SPEC_FIELDS = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE_FIELDS = {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy",
                       "volumeClaimTemplates", "persistentVolumeClaimRetentionPolicy"}  # fmt: skip
LWS_RESTART_POLICIES = {"Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"}
LWS_STARTUP_POLICIES = {"LeaderCreated", "LeaderReady"}
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"  # the controller's pod label: 0 is the leader
GPUS_PER_NODE = 8


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _strategic_merge(base, patch):
    """kustomize's strategic merge of `patch` into `base`, for what our patches use: maps merged key by key, the
    lists of named items merged by name, other values replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if key in NAME_KEYED_LISTS and key in base:
                by_name = {item["name"]: item for item in base[key]}
                for item in value:
                    by_name[item["name"]] = _strategic_merge(by_name.get(item["name"], {}), item)
                merged[key] = list(by_name.values())
            else:
                merged[key] = _strategic_merge(base.get(key), value) if key in base else value
        return merged
    return copy.deepcopy(patch)


def _overlay(directory: Path) -> list[dict]:
    """The manifests a kustomization builds (its resources, its patches applied)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        documents += _overlay(path) if path.is_dir() else _documents(path)
    for patch in kustomization.get("patches", []):
        [change] = _documents(directory / patch["path"])
        for i, document in enumerate(documents):
            if (document["kind"], document["metadata"]["name"]) == (change["kind"], change["metadata"]["name"]):
                documents[i] = _strategic_merge(document, change)
    return documents


def _container(documents: list[dict]) -> dict:
    [deployment] = [document for document in documents if document["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_the_dockerfile_is_hadolint_clean_non_root_and_pinned() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v\d+\.\d+\.\d+$", dockerfile, re.M)  # a version, not latest
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "/v1/health/ready" in dockerfile


@pytest.mark.parametrize("variant", ["base", "super-8gpu"])
def test_kubernetes_manifests_follow_the_api_schemas(variant: str) -> None:
    import kubernetes_validate

    documents = _overlay(K8S / variant)
    assert {document["kind"] for document in documents} == {"Deployment", "Service"}
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    container = _container(documents)
    env = {item["name"]: item for item in container["env"]}
    gpus = 8 if variant == "super-8gpu" else 1
    assert env["NIM_TENSOR_PARALLEL_SIZE"]["value"] == str(gpus)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert env["NIM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "cosmos3-serve-api-key"
    probes = {probe: container[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe",
                                                                          "livenessProbe")}  # fmt: skip
    assert probes == {"startupProbe": "/v1/health/ready", "readinessProbe": "/v1/health/ready",
                      "livenessProbe": "/v1/health/live"}  # fmt: skip
    [deployment] = [document for document in documents if document["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's user


def test_a_manifest_with_an_unknown_field_is_refused() -> None:
    """The validator catches what a typo would do (the test above could not pass vacuously)."""
    import kubernetes_validate

    documents = _overlay(K8S / "base")
    broken = copy.deepcopy(documents)
    _container(broken)["resource"] = {}  # `resources` misspelt
    [deployment] = [document for document in broken if document["kind"] == "Deployment"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _check_leader_worker_set(lws: dict) -> None:
    """A LeaderWorkerSet's fields against the LeaderWorkerSet API (required ones present, no unknown one, enums),
    its metadata and each pod template against the Kubernetes schemas (strict)."""
    import kubernetes_validate

    assert (lws["apiVersion"], lws["kind"]) == (LWS_API_VERSION, "LeaderWorkerSet")
    assert set(lws) <= {"apiVersion", "kind", "metadata", "spec"}
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": lws["metadata"]},
                                 KUBERNETES_VERSION, strict=True)  # ObjectMeta, as any object's  # fmt: skip
    spec = lws["spec"]
    assert set(spec) <= LWS_SPEC_FIELDS, set(spec) - LWS_SPEC_FIELDS
    assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
    assert spec.get("startupPolicy", "LeaderCreated") in LWS_STARTUP_POLICIES
    template = spec["leaderWorkerTemplate"]
    assert set(template) <= LWS_TEMPLATE_FIELDS, set(template) - LWS_TEMPLATE_FIELDS
    assert isinstance(template["size"], int) and template["size"] >= 1
    assert template.get("restartPolicy", "RecreateGroupOnPodRestart") in LWS_RESTART_POLICIES
    for role in ("leaderTemplate", "workerTemplate"):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                        "template": template[role]}  # fmt: skip
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


def _commands(container: dict, program: str) -> list[list[str]]:
    """The words of each `program ...` command in a container's `sh -c` script (continuation lines joined)."""
    assert container["command"] == ["/bin/sh", "-c"]
    script = container["args"][0].replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in script.splitlines()]
    return [words[1:] if words[:1] == ["exec"] else words for words in lines
            if program in words[:2]]  # fmt: skip


def _ray_start(words: list[str]) -> dict:
    """The options of a `ray start` command, as Ray's own command line parses them (unknown ones fail)."""
    from ray.scripts.scripts import start

    assert words[:2] == ["ray", "start"]
    return start.make_context("ray start", words[2:]).params


def test_the_multinode_leader_worker_set_serves_super_across_two_nodes_over_ray() -> None:
    import kubernetes_validate
    from cosmos3_serve.server.cli import build_parser

    documents = _overlay(K8S / "multinode")
    assert {document["kind"] for document in documents} == {"LeaderWorkerSet", "Service"}
    [lws] = [document for document in documents if document["kind"] == "LeaderWorkerSet"]
    [service] = [document for document in documents if document["kind"] == "Service"]
    kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)
    _check_leader_worker_set(lws)

    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader_pod, worker_pod = template["leaderTemplate"], template["workerTemplate"]
    [leader] = leader_pod["spec"]["containers"]
    [worker] = worker_pod["spec"]["containers"]
    for container in (leader, worker):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(GPUS_PER_NODE)

    # The leader: the Ray head, then the server over the whole cluster's GPUs through the Ray executor.
    [head] = [_ray_start(words) for words in _commands(leader, "ray")]
    assert head["head"] and head["port"] == 6379 and head["num_gpus"] == GPUS_PER_NODE
    [serve] = _commands(leader, "cosmos3-serve")
    args = build_parser().parse_args(serve[1:])
    assert args.command == "serve" and args.distributed_executor_backend == "ray"
    assert args.tensor_parallel_size == template["size"] * GPUS_PER_NODE
    env = {item["name"]: item for item in leader["env"]}
    assert env["NIM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "cosmos3-serve-api-key"
    probes = {probe: leader[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe",
                                                                       "livenessProbe")}  # fmt: skip
    assert probes == {"startupProbe": "/v1/health/ready", "readinessProbe": "/v1/health/ready",
                      "livenessProbe": "/v1/health/live"}  # fmt: skip
    assert leader_pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

    # The worker: joins the leader's head and stays in the foreground (its container lives as long as the node).
    [join] = [_ray_start(words) for words in _commands(worker, "ray")]
    assert join["address"] == "${LWS_LEADER_ADDRESS}:6379" and join["block"] and join["num_gpus"] == GPUS_PER_NODE
    for container in (leader, worker):
        env = {item["name"]: item for item in container["env"]}
        assert env["VLLM_HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    for pod in (leader_pod, worker_pod):
        assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's user

    # The Service selects each group's leader (worker index 0), the only pod serving HTTP.
    selector = dict(service["spec"]["selector"])
    assert selector.pop(LWS_WORKER_INDEX) == "0"
    assert selector.items() <= leader_pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in {port["name"] for port in leader["ports"]}


def test_a_leader_worker_set_with_an_unknown_field_is_refused() -> None:
    """The hand-written checks catch a misspelt field of the custom resource, and the schemas one of its pods."""
    [lws] = [document for document in _overlay(K8S / "multinode") if document["kind"] == "LeaderWorkerSet"]
    import kubernetes_validate

    misspelt = copy.deepcopy(lws)
    template = misspelt["spec"]["leaderWorkerTemplate"]
    template["workerTemplates"] = template.pop("workerTemplate")
    with pytest.raises(AssertionError):
        _check_leader_worker_set(misspelt)
    broken_pod = copy.deepcopy(lws)
    broken_pod["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _check_leader_worker_set(broken_pod)
