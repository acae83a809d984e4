"""Simulation assets: the COSMOS source bank and the lens injections (the Gen5 seed's stage 4c)."""

import os
from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from constellation_assets.defs.checks import evaluations, to_check_result
from constellation_assets.defs.metadata import Timer, plot_metadata, provenance_metadata, table_metadata
from constellation_assets.defs.partitions import (
    injection_shard_partitions,
    register_injection_shards,
    register_tile_partitions,
)
from constellation_assets.defs.plots import mosaic_png
from constellation_assets.defs.resources import ConstellationConfigResource
from constellation_assets.quality.simulations import bank_outcome, field_outcome, injection_shard_outcomes

SIM_GROUP = "simulations"
OWNERS = ["team:simulations"]

BANK_CHECK_DESCRIPTION = (
    "Bank readable, non-empty, unique IDENTs, finite positive hlr_arcsec, Sersic n and axis ratio in range "
    "(reads the stored bank: re-run it from the UI at any time)."
)
INJECTION_CHECKS = [
    dg.AssetCheckSpec(
        "stamps_valid",
        asset="lens_injections",
        blocking=True,
        partitions_def=injection_shard_partitions,
        description="Shard readable, rows == planned tasks, unique task ids, finite pixels in every band, "
        "cosmos_index set exactly in cosmos mode.",
    )
]


@dg.asset(
    group_name=SIM_GROUP,
    owners=OWNERS,
    kinds={"galsim", "s3"},
    description="Embedded demo data: a synthetic Euclid Q1 field (VIS DET/BKG/WGT frames, 9x9-grid PSF files, MER "
    "catalogs) in the exact Q1 layout under data.vis_base_uri / data.catalog_base_uri, with the input shear "
    "recorded as truth. Upstream of the tile assets in the local deployment: 'Materialize all' runs it first. "
    "It also registers its tiles as mer_tile partitions and the config's injection shards. Production reads "
    "Q1 instead.",
)
def synthetic_field(
    context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult]:
    from constellation_assets.sim.injection import partition_keys
    from constellation_assets.synthetic import simulate_field

    cfg = pipeline_config.load()
    timer = Timer()
    with timer.phase("simulate"):
        summary = simulate_field(cfg)
    new_tiles = register_tile_partitions(context.instance, [t.tile_id for t in summary.tiles])
    new_shards = register_injection_shards(context.instance, partition_keys(cfg))
    if new_tiles or new_shards:
        context.log.info(
            f"registered mer_tile partitions {new_tiles} and {len(new_shards)} injection shard(s)"
        )
    tiles = [
        {
            "tile_id": t.tile_id,
            "n_galaxies": t.n_galaxies,
            "n_stars": t.n_stars,
            "g1_true": t.g1_true,
            "g2_true": t.g2_true,
            "skipped": t.skipped,
        }
        for t in summary.tiles
    ]
    yield dg.MaterializeResult(
        metadata={
            **provenance_metadata(cfg, "field"),
            "dagster/row_count": dg.MetadataValue.int(sum(t.n_catalog_rows for t in summary.tiles)),
            **timer.metadata(),
            "field_config_hash": dg.MetadataValue.text(summary.config_hash),
            "n_files": dg.MetadataValue.int(summary.n_files),
            "tiles": dg.MetadataValue.json(tiles),
            "vis_base_uri": dg.MetadataValue.text(cfg.data.vis_base_uri),
        }
    )


@dg.asset_check(
    asset="synthetic_field",
    name="field_complete",
    blocking=True,
    description="Every configured tile has its field_manifest.json (written last) and all files it lists "
    "(reads the stored field: re-run it from the UI at any time).",
)
def synthetic_field_complete(pipeline_config: ConstellationConfigResource) -> dg.AssetCheckResult:
    return to_check_result("synthetic_field", "field_complete", field_outcome(pipeline_config.load()))


class CosmosBankConfig(dg.Config):
    cosmos_dir: str = Field(
        default_factory=lambda: os.getenv("CONSTELLATION_COSMOS_DIR", ""),
        description="Folder with GalSim's COSMOS catalog files (real_galaxy_catalog_*.fits); "
        "default $CONSTELLATION_COSMOS_DIR.",
    )
    include_images: bool = Field(default=False, description="Also store pre-rendered unit-flux images.")
    exclusion_level: str = Field(default="marginal", description="GalSim COSMOS exclusion level.")


def bank_uri(cfg) -> str:
    from constellation_assets.io.uri import join_uri

    return cfg.injection.cosmos_bank_h5 or join_uri(cfg.output.root_uri, "cosmos", "cosmos_bank.h5")


def bank_schema(bank) -> dg.TableSchema:
    """One column per HDF5 dataset of the bank (name, dtype and per-row shape)."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name=k, type=str(v.dtype) + (str(tuple(v.shape[1:])) if v.ndim > 1 else ""))
            for k, v in sorted(bank.data.items())
        ]
    )


@dg.asset(
    group_name=SIM_GROUP,
    owners=OWNERS,
    kinds={"hdf5", "galsim"},
    description="COSMOS (HST F814W) parametric source bank: per source IDENT, Sersic n, hlr_arcsec, axis ratio, "
    "position angle, flux/mag, bulge+disk parameters. HDF5 (path or s3://) with input catalog and content hash.",
)
def cosmos_bank(
    context: dg.AssetExecutionContext, config: CosmosBankConfig, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult]:
    from constellation_assets.sim.bank import build_cosmos_bank, load_cosmos_bank

    cfg = pipeline_config.load()
    if not config.cosmos_dir:
        raise dg.Failure(
            "no COSMOS catalog folder: set ops.cosmos_bank.config.cosmos_dir in the run config "
            "(or CONSTELLATION_COSMOS_DIR) to the folder holding real_galaxy_catalog_*.fits"
        )
    out = bank_uri(cfg)
    so = cfg.storage_options(out)
    timer = Timer()
    with timer.phase("build"):
        summary = build_cosmos_bank(
            config.cosmos_dir,
            out,
            include_images=config.include_images,
            exclusion_level=config.exclusion_level,
            storage_options=so,
        )
    bank = load_cosmos_bank(summary.uri, so)  # read back: what the metadata describes is what was stored
    yield dg.MaterializeResult(
        metadata={
            **provenance_metadata(cfg, "bank", extra={"cosmos_dir": config.cosmos_dir}),
            "dagster/row_count": dg.MetadataValue.int(summary.n_sources),
            "dagster/column_schema": bank_schema(bank),
            **timer.metadata(),
            "uri": dg.MetadataValue.path(summary.uri),
            "content_sha256": dg.MetadataValue.text(summary.content_sha256),
            "n_input": dg.MetadataValue.int(summary.n_input),
            "exclusion_level": dg.MetadataValue.text(summary.exclusion_level),
            "input_catalog": dg.MetadataValue.text(summary.input_catalog),
        }
    )


@dg.asset_check(asset="cosmos_bank", name="bank_valid", blocking=True, description=BANK_CHECK_DESCRIPTION)
def cosmos_bank_valid(pipeline_config: ConstellationConfigResource) -> dg.AssetCheckResult:
    from constellation_assets.io.uri import uri_exists
    from constellation_assets.sim.bank import load_cosmos_bank

    cfg = pipeline_config.load()
    uri = bank_uri(cfg)
    so = cfg.storage_options(uri)
    if not uri_exists(uri, so):
        return dg.AssetCheckResult(
            passed=False, description=f"no COSMOS bank at {uri}; materialize cosmos_bank first"
        )
    return to_check_result("cosmos_bank", "bank_valid", bank_outcome(load_cosmos_bank(uri, so)))


@dg.asset(
    deps=["cosmos_bank"],
    partitions_def=injection_shard_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=8),
    group_name=SIM_GROUP,
    owners=OWNERS,
    kinds={"pytorch", "parquet", "iceberg"},
    description="Gen5-style SIE + external-shear lensed arcs (Sersic or COSMOS sources) injected into host "
    "cutouts from the tiles; one Parquet stamp shard per partition '{split}/{shard}', registered in the "
    "Iceberg table sim.injections. Deterministic from seed_base, split_seed and task ids.",
)
def lens_injections(
    context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult]:
    from constellation_assets.sim.injection import (
        _parse_partition,
        discover_hosts,
        read_stamps,
        run_injection,
        shard_uri,
    )

    cfg = pipeline_config.load()
    keys = list(context.partition_keys)
    timer = Timer()
    with timer.phase("hosts"):
        hosts = discover_hosts(cfg)
    with timer.phase("inject"):
        res = run_injection(cfg, partitions=keys, hosts=hosts)
    with timer.phase("read_back"):
        for key in keys:
            split, shard = _parse_partition(key)
            uri = shard_uri(cfg, split, shard)
            table, images = read_stamps(uri, cfg.storage_options(uri))
            md = {
                **table_metadata(table.num_rows, table.schema),
                "split": dg.MetadataValue.text(split),
                "shard": dg.MetadataValue.int(shard),
                "uri": dg.MetadataValue.path(uri),
            }
            band = next(iter(images), None)
            if band is not None and len(images[band]):
                png = mosaic_png(images[band][:36], f"{split}/{shard:05d} {band}")
                md.update(
                    plot_metadata(
                        cfg,
                        "stamp_mosaic",
                        png,
                        f"injected stamps ({band})",
                        stage="injections",
                        name=f"{split}_{shard:05d}",
                    )
                )
            context.add_asset_metadata(md, partition_key=key)
    yield dg.MaterializeResult(
        metadata={
            **provenance_metadata(cfg, cfg.injection.stage_dir, extra={"partitions": keys}),
            **timer.metadata(),
            "config_hash": dg.MetadataValue.text(res.config_hash),
            "run_complete": dg.MetadataValue.bool(res.complete),
            "run_config_uri": dg.MetadataValue.text(str(res.run_config_uri or "")),
            "n_registered": dg.MetadataValue.int(res.n_registered),
            "excluded_frames": dg.MetadataValue.json(dict(res.excluded_frames)),
        }
    )


@dg.multi_asset_check(
    specs=INJECTION_CHECKS,
    name="lens_injection_checks",
    can_subset=True,
    description="Checks of each stored stamp shard against the tasks the config plans (per shard partition).",
)
def lens_injection_checks(
    context: dg.AssetCheckExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    keys = list(context.op_execution_context.partition_keys)
    yield from evaluations(context, INJECTION_CHECKS, injection_shard_outcomes(pipeline_config.load(), keys))
