"""Simulation assets: the COSMOS source bank and the lens injections (the Gen5 seed's stage 4c)."""

import os
from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from constellation_assets.defs.metadata import Timer, png_markdown, provenance_metadata, table_metadata
from constellation_assets.defs.partitions import injection_shard_partitions
from constellation_assets.defs.plots import mosaic_png
from constellation_assets.defs.resources import ConstellationConfigResource

SIM_GROUP = "simulations"
OWNERS = ["team:simulations"]

BANK_CHECKS = [
    dg.AssetCheckSpec(
        "bank_valid",
        asset="cosmos_bank",
        blocking=True,
        description="Bank readable, non-empty, unique IDENTs, finite positive hlr_arcsec, Sersic n and axis ratio in range.",
    )
]
INJECTION_CHECKS = [
    dg.AssetCheckSpec(
        "stamps_valid",
        asset="lens_injections",
        blocking=True,
        description="Shard readable, rows == planned tasks, unique task ids, finite pixels in every band, "
        "cosmos_index set exactly in cosmos mode.",
    )
]


FIELD_CHECKS = [
    dg.AssetCheckSpec(
        "field_complete",
        asset="synthetic_field",
        blocking=True,
        description="Every configured tile has its field_manifest.json (written last) and all files it lists.",
    )
]


@dg.asset(
    group_name=SIM_GROUP,
    owners=OWNERS,
    kinds={"galsim", "s3"},
    check_specs=FIELD_CHECKS,
    description="Embedded demo data: a synthetic Euclid Q1 field (VIS DET/BKG/WGT frames, 9x9-grid PSF files, MER "
    "catalogs) in the exact Q1 layout under data.vis_base_uri / data.catalog_base_uri, with the input shear "
    "recorded as truth. Materialize it before the tile assets for the local demo; production reads Q1 instead.",
)
def synthetic_field(
    context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    from constellation_assets.io.uri import uri_exists
    from constellation_assets.synthetic import simulate_field

    cfg = pipeline_config.load()
    timer = Timer()
    with timer.phase("simulate"):
        summary = simulate_field(cfg)
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
    missing = [u for t in summary.tiles for u in t.files if not uri_exists(u, cfg.storage_options(u))]
    yield dg.AssetCheckResult(
        asset_key="synthetic_field",
        check_name="field_complete",
        passed=not missing and bool(summary.tiles),
        description=f"{len(missing)} listed files missing"
        if missing
        else f"{len(summary.tiles)} tiles complete",
        metadata={"missing": dg.MetadataValue.json(missing[:20])},
    )


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


def bank_check(bank) -> dg.AssetCheckResult:
    import numpy as np

    d = bank.data
    n = len(d["ident"])
    problems = []
    if n == 0:
        problems.append("bank is empty")
    if len(np.unique(d["ident"])) != n:
        problems.append("duplicate IDENT")
    hlr = np.asarray(d["hlr_arcsec"], float)
    if not np.all(np.isfinite(hlr) & (hlr > 0)):
        problems.append(f"{int(np.sum(~(np.isfinite(hlr) & (hlr > 0))))} non-positive/non-finite hlr_arcsec")
    n_s = np.asarray(d["sersic_n"], float)
    if not np.all((n_s >= 0.3) & (n_s <= 6.0)):
        problems.append("Sersic n outside [0.3, 6]")
    q = np.asarray(d["q"], float)
    if not np.all((q > 0) & (q <= 1.0)):
        problems.append("axis ratio outside (0, 1]")
    return dg.AssetCheckResult(
        asset_key="cosmos_bank",
        check_name="bank_valid",
        passed=not problems,
        description="; ".join(problems) or f"{n} sources valid",
        metadata={"n_sources": n, "median_hlr_arcsec": float(np.median(hlr)) if n else 0.0},
    )


@dg.asset(
    group_name=SIM_GROUP,
    owners=OWNERS,
    kinds={"hdf5", "galsim"},
    check_specs=BANK_CHECKS,
    description="COSMOS (HST F814W) parametric source bank: per source IDENT, Sersic n, hlr_arcsec, axis ratio, "
    "position angle, flux/mag, bulge+disk parameters. HDF5 (path or s3://) with input catalog and content hash.",
)
def cosmos_bank(
    context: dg.AssetExecutionContext, config: CosmosBankConfig, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
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
    bank = load_cosmos_bank(summary.uri, so)
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
    yield bank_check(bank)


def stamps_check(
    cfg, split: str, shard: int, uri: str, n_expected: int, table, images
) -> dg.AssetCheckResult:
    import numpy as np

    problems = []
    if table.num_rows != n_expected:
        problems.append(f"{table.num_rows} rows, {n_expected} tasks planned")
    if "task_id" in table.column_names and len(set(table.column("task_id").to_pylist())) != table.num_rows:
        problems.append("duplicate task_id")
    for band, arr in images.items():
        bad = int(np.sum(~np.isfinite(arr)))
        if bad:
            problems.append(f"{bad} non-finite pixels in band {band}")
    if "cosmos_index" in table.column_names:
        n_null = table.column("cosmos_index").null_count
        if cfg.injection.source_mode == "cosmos" and n_null:
            problems.append(f"{n_null} rows without cosmos_index in cosmos mode")
        if cfg.injection.source_mode == "sersic" and n_null != table.num_rows:
            problems.append("cosmos_index set in sersic mode")
    return dg.AssetCheckResult(
        asset_key="lens_injections",
        check_name="stamps_valid",
        passed=not problems,
        description="; ".join(problems) or f"{table.num_rows} stamps valid ({split} shard {shard})",
        metadata={"rows": table.num_rows, "bands": sorted(images)},
    )


@dg.asset(
    deps=["cosmos_bank"],
    partitions_def=injection_shard_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=8),
    group_name=SIM_GROUP,
    owners=OWNERS,
    kinds={"pytorch", "parquet", "iceberg"},
    check_specs=INJECTION_CHECKS,
    description="Gen5-style SIE + external-shear lensed arcs (Sersic or COSMOS sources) injected into host "
    "cutouts from the tiles; one Parquet stamp shard per partition '{split}/{shard}', registered in the "
    "Iceberg table sim.injections. Deterministic from seed_base, split_seed and task ids.",
)
def lens_injections(
    context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    from constellation_assets.sim.injection import (
        _parse_partition,
        discover_hosts,
        plan_tasks,
        read_stamps,
        run_injection,
        shard_uri,
    )

    cfg = pipeline_config.load()
    split, shard = _parse_partition(context.partition_key)
    timer = Timer()
    with timer.phase("hosts"):
        hosts = discover_hosts(cfg)
    with timer.phase("inject"):
        res = run_injection(cfg, partitions=[context.partition_key], hosts=hosts)
    uri = shard_uri(cfg, split, shard)
    so = cfg.storage_options(uri)
    with timer.phase("read_back"):
        table, images = read_stamps(uri, so)
        n_expected = sum(1 for t in plan_tasks(cfg, hosts) if (t.split, t.shard) == (split, shard))
    md = {
        **provenance_metadata(cfg, cfg.injection.stage_dir, extra={"split": split, "shard": shard}),
        **table_metadata(table.num_rows, table.schema),
        **timer.metadata(),
        "uri": dg.MetadataValue.path(uri),
        "config_hash": dg.MetadataValue.text(res.config_hash),
        "run_complete": dg.MetadataValue.bool(res.complete),
        "run_config_uri": dg.MetadataValue.text(str(res.run_config_uri or "")),
        "n_registered": dg.MetadataValue.int(res.n_registered),
    }
    band = next(iter(images), None)
    if band is not None and len(images[band]):
        md["stamp_mosaic"] = png_markdown(
            mosaic_png(images[band][:36], f"{split}/{shard:05d} {band}"), f"injected stamps ({band})"
        )
    yield dg.MaterializeResult(metadata=md)
    yield stamps_check(cfg, split, shard, uri, n_expected, table, images)
