"""Dagster wiring for Constellation: assets, checks, jobs, sensors, schedules and resources (thin).

``defs`` is the code location's Definitions; ``constellation_assets/definitions.py`` only re-exports it.
Domain modules are imported inside asset bodies, so the definitions load without touching any data.
"""

from __future__ import annotations

import dagster as dg

from constellation_assets.defs.catalog import shear_catalog
from constellation_assets.defs.deployment import current_deployment, resources_for
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
    calibration_schedule,
    mer_tile_discovery_sensor,
    tile_pipeline_sensor,
)
from constellation_assets.defs.shear import shear_calibration, shear_measurements
from constellation_assets.defs.simulations import cosmos_bank, lens_injections, synthetic_field
from constellation_assets.defs.tiles import prepare_tile_assets


def build_definitions(deployment: str | None = None) -> dg.Definitions:
    return dg.Definitions.merge(
        maintenance_defs,
        dg.Definitions(
            assets=[
                prepare_tile_assets,
                shear_measurements,
                shear_catalog,
                shear_calibration,
                cosmos_bank,
                lens_injections,
                synthetic_field,
            ],
            jobs=[
                tile_pipeline_job,
                calibration_job,
                cosmos_bank_job,
                injection_job,
                synthetic_field_job,
                register_partitions_job,
            ],
            sensors=[mer_tile_discovery_sensor, tile_pipeline_sensor],
            schedules=[calibration_schedule],
            resources=resources_for(deployment or current_deployment()),
        ),
    )


defs = build_definitions()

__all__ = ["build_definitions", "defs", "injection_shard_partitions", "mer_tile_partitions"]
