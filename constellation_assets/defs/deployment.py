"""The one switch between environments (hooli-style): ``CONSTELLATION_DEPLOYMENT`` = local | k8s.

- ``local`` (default): files on this machine, SQLite Iceberg catalog, worker as a subprocess, CPU; the
  pipeline config is ``$CONSTELLATION_CONFIG`` or ``configs/local_demo.yaml`` (the config of ``make demo``).
- ``k8s``: S3 storage and a shared PostgreSQL SQL catalog (config from ``CONSTELLATION_CONFIG``, catalog
  URI with its password from ``CONSTELLATION_CATALOG_URI``), worker pods through PipesK8sClient with
  ``nvidia.com/gpu``.

Secrets only ever come from ``dagster.EnvVar`` (resolved at run time, never stored in definitions).
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from constellation_assets.defs.k8s import K8S_WORKER_DEFAULTS
from constellation_assets.defs.resources import (
    ConstellationConfigResource,
    LocalShearWorkerResource,
    ShearWorkerResource,
    default_config_path,
)

DEPLOYMENT_ENV_VAR = "CONSTELLATION_DEPLOYMENT"
DEPLOYMENTS = ("local", "k8s")


def current_deployment() -> str:
    name = os.getenv(DEPLOYMENT_ENV_VAR, "local").strip().lower() or "local"
    if name not in DEPLOYMENTS:
        raise ValueError(
            f"{DEPLOYMENT_ENV_VAR}={name!r} is not a known deployment; set it to one of {', '.join(DEPLOYMENTS)}"
        )
    return name


def resources_for(deployment: str | None = None) -> dict[str, Any]:
    deployment = deployment or current_deployment()
    if deployment == "local":
        return {
            # The config file is a plain setting (not a secret); run config can override it per run.
            "pipeline_config": ConstellationConfigResource(config_path=default_config_path()),
            "shear_worker": LocalShearWorkerResource(),
        }
    if deployment == "k8s":
        return {
            "pipeline_config": ConstellationConfigResource(
                config_path=dg.EnvVar("CONSTELLATION_CONFIG"),
                catalog_uri=dg.EnvVar("CONSTELLATION_CATALOG_URI"),
                device="cuda",
            ),
            "shear_worker": ShearWorkerResource(
                backend="k8s",
                image=dg.EnvVar("CONSTELLATION_WORKER_IMAGE"),
                namespace=dg.EnvVar("CONSTELLATION_WORKER_NAMESPACE"),
                **K8S_WORKER_DEFAULTS,
            ),
        }
    raise ValueError(f"unknown deployment {deployment!r}; use one of {', '.join(DEPLOYMENTS)}")


def sensors_on_by_default(deployment: str | None = None) -> bool:
    """Locally, tile discovery runs as soon as ``dagster dev`` starts (a first run needs no switch);
    in production a person turns the sensors on."""
    return (deployment or current_deployment()) == "local"
