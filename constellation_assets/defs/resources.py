"""Dagster resources: the pipeline config and the shear worker launcher.

Assets never branch on the environment: they ask these resources, and :mod:`.deployment` decides which
resource instances a deployment gets.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from constellation_assets.defs.k8s import gpu_worker_pod_spec

WORKER_MODULE = "constellation_assets.shear.worker"

#: The one place the pipeline config of the local deployment comes from: ``$CONSTELLATION_CONFIG`` when set,
#: else the local demo config that ``make demo`` and ``constellation run`` use, so the UI, ``dagster job execute``,
#: the CLI and the README's queries read and write the same files and Iceberg catalog.
CONFIG_ENV_VAR = "CONSTELLATION_CONFIG"
DEFAULT_LOCAL_CONFIG = "configs/local_demo.yaml"


def default_config_path() -> str:
    return os.getenv(CONFIG_ENV_VAR) or DEFAULT_LOCAL_CONFIG


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


class ConstellationConfigResource(dg.ConfigurableResource):
    """Where the pipeline config comes from: a YAML/JSON path or ``s3://`` URI plus overrides.

    ``load()`` returns the validated ``PipelineConfig`` exactly as the CLI loads it
    (``constellation_assets.config.load_config``), then applies the deployment's settings (catalog URI,
    output root, device), which win over the file because they describe where the code runs.
    """

    config_path: str | None = Field(
        default=None,
        description="Pipeline config file (local path or s3:// URI). The local deployment sets it from "
        f"${CONFIG_ENV_VAR} (default {DEFAULT_LOCAL_CONFIG}, the config of `make demo`); empty: built-in defaults.",
    )
    overrides: dict[str, Any] | None = Field(
        default=None,
        description="Flags as for the CLI ('variant', 'compute.batch_size', ...): values present in the "
        "config file win over them (Gen5 precedence).",
    )
    catalog_uri: str | None = Field(
        default=None, description="Deployment's Iceberg SQL catalog URI (password only via PGPASSWORD)."
    )
    output_root_uri: str | None = Field(default=None, description="Deployment's output root (path or s3://).")
    device: str | None = Field(default=None, description="Deployment's compute device: cpu | cuda.")

    _cache: Any = PrivateAttr(default=None)

    def deployment_settings(self) -> dict[str, Any]:
        """Settings the deployment forces over the config file (where the storage and GPUs are)."""
        forced: dict[str, Any] = {}
        if self.catalog_uri:
            forced.setdefault("output", {})["catalog_uri"] = self.catalog_uri
        if self.output_root_uri:
            forced.setdefault("output", {})["root_uri"] = self.output_root_uri
        if self.device:
            forced.setdefault("compute", {})["device"] = self.device
        return forced

    def load(self):
        """The validated PipelineConfig (cached for the life of this resource instance)."""
        if self._cache is None:
            from constellation_assets.config import load_config

            path = self.config_path
            if path and "://" not in str(path) and not os.path.exists(path):
                raise dg.Failure(
                    f"pipeline config {path!r} not found (relative to {os.getcwd()}); start dagster from the "
                    f"repository root or set {CONFIG_ENV_VAR} to the config file"
                )
            cfg = load_config(path, overrides=self.overrides or None)
            forced = self.deployment_settings()
            if forced:
                cfg = load_config(_deep_merge(cfg.model_dump(mode="json"), forced))
            self._cache = cfg
        return self._cache


class ShearWorkerBase(dg.ConfigurableResource):
    """Launches ``python -m constellation_assets.shear.worker`` through dagster-pipes (what the assets need)."""

    backend: str = Field(default="subprocess", description="subprocess | k8s")
    python_executable: str | None = Field(default=None, description="Python for subprocess workers.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the worker.")

    def command(self, args: Sequence[str]) -> list[str]:
        python = self.python_executable or (sys.executable if self.backend == "subprocess" else "python")
        return [python, "-m", WORKER_MODULE, *args]

    def run(
        self,
        context: dg.AssetExecutionContext,
        args: Sequence[str],
        extras: Mapping[str, Any] | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        env = dict(self.env)
        if self.backend == "subprocess":
            client = dg.PipesSubprocessClient()
            return client.run(context=context, command=self.command(args), extras=dict(extras or {}), env=env)
        if self.backend == "k8s" and isinstance(self, ShearWorkerResource):
            from dagster_k8s import PipesK8sClient

            return PipesK8sClient().run(
                context=context,
                command=self.command(args),
                image=self.image,
                namespace=self.namespace,
                env=env,
                extras=dict(extras or {}),
                base_pod_spec=self.pod_spec(),
                pod_wait_timeout=self.pod_wait_timeout_s,
            )
        raise dg.DagsterInvariantViolationError(
            f"{type(self).__name__}.backend={self.backend!r} is not supported; use 'subprocess' "
            "(LocalShearWorkerResource) or 'k8s' (ShearWorkerResource)"
        )


class LocalShearWorkerResource(ShearWorkerBase):
    """The local deployment's worker: a subprocess on this machine (no pod settings to show or set)."""


class ShearWorkerResource(ShearWorkerBase):
    """Worker with the Kubernetes settings: ``backend="k8s"`` runs one pod per call through PipesK8sClient with
    the GPU worker pod spec of :mod:`.k8s`; ``backend="subprocess"`` ignores them."""

    image: str | None = Field(default=None, description="Worker image (k8s).")
    namespace: str | None = Field(default=None, description="Namespace of worker pods (k8s).")
    gpu_count: int = Field(default=1, description="nvidia.com/gpu limit per worker pod (k8s).")
    memory: str = Field(default="16Gi", description="Memory request = limit per worker pod (k8s).")
    cpu: str = Field(default="4", description="CPU request = limit per worker pod (k8s).")
    node_selector: dict[str, str] | None = Field(default=None, description="Node selector (k8s).")
    pod_wait_timeout_s: float = Field(default=6 * 3600.0, description="Max seconds a worker pod may run.")

    def pod_spec(self) -> dict[str, Any]:
        return gpu_worker_pod_spec(
            image=self.image,
            gpu_count=self.gpu_count,
            memory=self.memory,
            cpu=self.cpu,
            node_selector=self.node_selector,
        )
