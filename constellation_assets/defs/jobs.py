"""Jobs: the per-tile pipeline, calibration, injection, and tile registration."""

import dagster as dg

from constellation_assets.defs.partitions import (
    injection_shard_partitions,
    mer_tile_partitions,
    register_injection_shards,
    register_tile_partitions,
)
from constellation_assets.defs.resources import ConstellationConfigResource

TILE_ASSETS = ["tile_sources", "tile_quadrants", "subtile_manifests", "shear_measurements", "shear_catalog"]

tile_pipeline_job = dg.define_asset_job(
    "tile_pipeline_job",
    selection=dg.AssetSelection.assets(*TILE_ASSETS),
    partitions_def=mer_tile_partitions,
    description="One MER tile end to end: prepare -> shear inference (gpu pool) -> Iceberg catalog.",
)

calibration_job = dg.define_asset_job(
    "calibration_job",
    selection=dg.AssetSelection.assets("shear_calibration"),
    description="Shear calibration on image simulations with known shear (m, c with errors).",
)

cosmos_bank_job = dg.define_asset_job(
    "cosmos_bank_job",
    selection=dg.AssetSelection.assets("cosmos_bank"),
    description="Build the COSMOS parametric source bank (HDF5).",
)

synthetic_field_job = dg.define_asset_job(
    "synthetic_field_job",
    selection=dg.AssetSelection.assets("synthetic_field"),
    description="Write the synthetic Q1-layout field (local demo input).",
)

injection_job = dg.define_asset_job(
    "injection_job",
    selection=dg.AssetSelection.assets("lens_injections"),
    partitions_def=injection_shard_partitions,
    description="Lens-injection stamps for one '{split}/{shard}' partition (e.g. train/00003).",
)


@dg.op(description="Register the config's MER tiles and injection shards as partitions (in batches).")
def register_config_partitions(
    context: dg.OpExecutionContext, pipeline_config: ConstellationConfigResource
) -> None:
    from constellation_assets.io.q1 import discover_tile_ids
    from constellation_assets.sim.injection import partition_keys

    cfg = pipeline_config.load()
    tiles = discover_tile_ids(cfg)
    new_tiles = register_tile_partitions(context.instance, tiles)
    shards = partition_keys(cfg)
    new_shards = register_injection_shards(context.instance, shards)
    context.log.info(
        f"mer_tile: {len(new_tiles)} new of {len(tiles)}; injection_shard: {len(new_shards)} new of {len(shards)}"
    )


@dg.job(
    description="Register the tiles (config tile_ids or the MER catalog prefix) and the injection shards of "
    "the pipeline config as partitions; reads no pixel data."
)
def register_partitions_job():
    register_config_partitions()
