"""Dagster wiring for Constellation: assets, checks, jobs, sensors, schedules and resources (thin).

``defs`` is the code location's Definitions; ``constellation_assets/definitions.py`` only re-exports it.
Domain modules are imported inside asset bodies, so the definitions load without touching any data.
"""

from __future__ import annotations

import dagster as dg

from constellation_assets.defs.calibration_field import (
    field_calibration,
    field_calibration_checks,
    field_calibration_job,
)
from constellation_assets.defs.catalog import shear_catalog, shear_catalog_checks
from constellation_assets.defs.deployment import current_deployment, resources_for, sensors_on_by_default
from constellation_assets.defs.jobs import (
    calibration_job,
    cosmos_bank_job,
    injection_job,
    register_partitions_job,
    synthetic_field_job,
    tile_pipeline_job,
)
from constellation_assets.defs.maintenance import maintenance_defs
from constellation_assets.defs.partitions import injection_shard_partitions, mer_tile_partitions
from constellation_assets.defs.sensors import (
    build_discovery_sensor,
    calibration_schedule,
    tile_pipeline_sensor,
)
from constellation_assets.defs.shear import (
    shear_calibration,
    shear_calibration_checks,
    shear_measurement_checks,
    shear_measurements,
)
from constellation_assets.defs.simulations import (
    cosmos_bank,
    cosmos_bank_valid,
    lens_injection_checks,
    lens_injections,
    synthetic_field,
    synthetic_field_complete,
)
from constellation_assets.defs.tiles import build_prepare_tile_assets, prepare_tile_checks

# Assets of other parts of the pipeline (one import and one entry each).
EXTRA_ASSETS: list = []


def build_definitions(deployment: str | None = None) -> dg.Definitions:
    deployment = deployment or current_deployment()
    local = deployment == "local"
    discovery_status = (
        dg.DefaultSensorStatus.RUNNING
        if sensors_on_by_default(deployment)
        else dg.DefaultSensorStatus.STOPPED
    )
    return dg.Definitions.merge(
        maintenance_defs,
        dg.Definitions(
            assets=[
                # Locally the synthetic field writes the tiles' input data, so it is upstream of them.
                build_prepare_tile_assets(field_upstream=local),
                shear_measurements,
                shear_catalog,
                shear_calibration,
                field_calibration,
                cosmos_bank,
                lens_injections,
                synthetic_field,
                *EXTRA_ASSETS,
            ],
            asset_checks=[
                prepare_tile_checks,
                shear_measurement_checks,
                shear_catalog_checks,
                cosmos_bank_valid,
                synthetic_field_complete,
                shear_calibration_checks,
                field_calibration_checks,
                lens_injection_checks,
            ],
            jobs=[
                tile_pipeline_job,
                calibration_job,
                field_calibration_job,
                cosmos_bank_job,
                injection_job,
                synthetic_field_job,
                register_partitions_job,
            ],
            sensors=[build_discovery_sensor(discovery_status), tile_pipeline_sensor],
            schedules=[calibration_schedule],
            resources=resources_for(deployment),
        ),
    )


defs = build_definitions()

__all__ = ["build_definitions", "defs", "injection_shard_partitions", "mer_tile_partitions"]
