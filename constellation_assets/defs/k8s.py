"""The GPU worker pod spec for shear inference on Kubernetes (one place; deploy/ renders it to YAML).

The spec is plain Kubernetes camelCase, as ``kubectl`` and the Dagster Helm chart expect; dagster-k8s's
PipesK8sClient converts it (``base_pod_spec``) and fills in the image, command and the pipes env vars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Container name in the worker pod (the first container receives image, command and pipes env).
WORKER_CONTAINER_NAME = "shear-worker"

#: Kubernetes Secret holding the S3 credentials / catalog URI; mounted as env vars, never in config files.
WORKER_SECRET_NAME = "constellation-secrets"

#: Production worker size (deploy/k8s/gpu-worker-podspec.yaml is rendered from these).
K8S_WORKER_DEFAULTS: dict[str, Any] = {"gpu_count": 1, "memory": "24Gi", "cpu": "6"}

DEFAULT_GPU_NODE_SELECTOR: dict[str, str] = {"nvidia.com/gpu.present": "true"}
DEFAULT_GPU_TOLERATIONS: list[dict[str, str]] = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
]


def gpu_worker_pod_spec(
    *,
    image: str | None = None,
    gpu_count: int = 1,
    memory: str = "16Gi",
    cpu: str = "4",
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, str]] | None = None,
    service_account_name: str | None = "dagster",
    secret_name: str | None = WORKER_SECRET_NAME,
    shm_size: str = "2Gi",
) -> dict[str, Any]:
    """Pod spec of one shear worker: ``gpu_count`` GPUs, guaranteed memory, GPU node selector and taint
    tolerations, and a memory-backed /dev/shm (torch DataLoader workers need more than the 64 MiB default).

    ``gpu_count=0`` gives a CPU worker (no GPU limit, no GPU selector or tolerations).
    """
    if gpu_count < 0:
        raise ValueError(f"gpu_count must be >= 0, got {gpu_count}")
    limits: dict[str, str] = {"memory": memory, "cpu": cpu}
    requests: dict[str, str] = {"memory": memory, "cpu": cpu}
    if gpu_count:
        # Extended resources must have requests == limits; setting the limit is enough for the scheduler.
        limits["nvidia.com/gpu"] = str(gpu_count)
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER_NAME,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": limits, "requests": requests},
        "env": [{"name": "CONSTELLATION_DEPLOYMENT", "value": "k8s"}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if image:
        container["image"] = image
    if secret_name:
        container["envFrom"] = [{"secretRef": {"name": secret_name, "optional": True}}]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}],
    }
    if service_account_name:
        spec["serviceAccountName"] = service_account_name
    if gpu_count:
        spec["nodeSelector"] = dict(node_selector if node_selector is not None else DEFAULT_GPU_NODE_SELECTOR)
        spec["tolerations"] = [
            dict(t) for t in (tolerations if tolerations is not None else DEFAULT_GPU_TOLERATIONS)
        ]
    elif node_selector:
        spec["nodeSelector"] = dict(node_selector)
    return spec


def render_worker_pod_spec_yaml() -> str:
    """The production worker pod spec as committed in deploy/k8s/gpu-worker-podspec.yaml."""
    import yaml

    header = (
        "# GPU shear worker pod spec (PipesK8sClient base_pod_spec). Generated from\n"
        "# constellation_assets/defs/k8s.py: python -m constellation_assets.defs.k8s > deploy/k8s/gpu-worker-podspec.yaml\n"
        "# The image and command are filled in per run (CONSTELLATION_WORKER_IMAGE, the worker module).\n"
    )
    return header + yaml.safe_dump(gpu_worker_pod_spec(**K8S_WORKER_DEFAULTS), sort_keys=False)


if __name__ == "__main__":
    print(render_worker_pod_spec_yaml(), end="")
