"""The deployment files: the Dockerfile against hadolint, the Kubernetes manifests (Nano on one GPU, the Super
overlay on eight) against the Kubernetes API's own schemas (kubernetes-validate, strict: unknown fields fail)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"
NAME_KEYED_LISTS = ("containers", "env", "volumes", "volumeMounts", "ports")  # strategic merge: by `name`


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
