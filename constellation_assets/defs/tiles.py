"""Tile preparation assets (per MER tile partition): sources, quadrants and the sub-tile manifests.

One domain call (``constellation_assets.prepare.prepare_tile``) produces all three, so they are one
multi-asset step: the manifests are only ever written together with the source and quadrant tables
they were derived from. Checks run in the same step on the files just written.
"""

from collections.abc import Iterator

import dagster as dg

from constellation_assets.defs.checks import check_specs, results_for
from constellation_assets.defs.metadata import Timer, png_markdown, provenance_metadata, table_metadata
from constellation_assets.defs.partitions import mer_tile_partitions
from constellation_assets.defs.resources import ConstellationConfigResource

#: Tiles per run in a backfill (BackfillPolicy.multi_run): 60,000 tiles -> 2,400 runs.
TILE_BACKFILL_BATCH = 25
TILE_BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=TILE_BACKFILL_BATCH)

TILES_GROUP = "tiles"
OWNERS = ["team:shear-platform"]

SOURCES_CHECKS = check_specs(
    "tile_sources",
    ["unique_object_id", "sources_in_core", "shear_grade"],
    blocking=["unique_object_id", "sources_in_core"],
    descriptions={
        "unique_object_id": "No OBJECT_ID twice in the tile's source table (catalog overlaps deduplicated).",
        "sources_in_core": "Rows flagged OWNED & IN_CORE lie in the core of their sub-tile (geometry recomputed).",
        "shear_grade": "Every row passes the shear-grade selection (S/N, VIS_DET, spurious/point-like/quality flags).",
    },
)
QUADRANT_CHECKS = check_specs(
    "tile_quadrants",
    ["quadrants_found"],
    blocking=["quadrants_found"],
    descriptions={"quadrants_found": "At least one VIS quadrant overlaps the tile's extended area."},
)
MANIFEST_CHECKS = check_specs(
    "subtile_manifests",
    ["manifest_count", "core_membership"],
    blocking=["manifest_count", "core_membership"],
    descriptions={
        "manifest_count": "One manifest per sub-tile (rows x cols of the grid, 16 by default).",
        "core_membership": "Every owned core source of the tile is in exactly one sub-tile manifest's core list.",
    },
)


def tile_outcomes(cfg, result) -> list:
    """Quality outcomes (``constellation_assets.quality.CheckOutcome``) for one prepared tile."""
    import numpy as np
    import polars as pl
    import pyarrow.parquet as pq

    from constellation_assets.io.mer_catalog import shear_selection
    from constellation_assets.io.uri import open_uri
    from constellation_assets.prepare import load_manifest
    from constellation_assets.quality import (
        CheckOutcome,
        Tiling,
        check_sources_in_core,
        check_unique_object_ids,
    )

    with open_uri(result.sources_uri, "rb", cfg.storage_options(result.sources_uri)) as fh:
        table = pq.read_table(fh)
    sources = pl.from_arrow(table)
    core = sources.filter(pl.col("OWNED") & pl.col("IN_CORE")).rename(
        {"RIGHT_ASCENSION": "RA", "DECLINATION": "DEC"}
    )
    out = [check_unique_object_ids(sources), check_sources_in_core(core, Tiling.from_config(cfg))]
    passing = np.asarray(shear_selection(table, cfg.shear.snr_min), dtype=bool)
    out.append(
        CheckOutcome(
            "shear_grade",
            bool(passing.all()),
            "error",
            f"{int((~passing).sum())} of {len(passing)} rows fail the shear-grade selection",
            {"n_rows": len(passing), "n_failing": int((~passing).sum())},
        )
    )
    out.append(
        CheckOutcome(
            "quadrants_found",
            result.n_quadrants > 0,
            "error",
            f"{result.n_quadrants} quadrant(s) overlap the extended area"
            if result.n_quadrants
            else f"no VIS quadrant overlaps tile {result.tile_id}; check data.vis_base_uri",
            {"n_quadrants": result.n_quadrants},
        )
    )
    n_expected = int(result.grid[0]) * int(result.grid[1])
    out.append(
        CheckOutcome(
            "manifest_count",
            len(result.manifest_uris) == n_expected,
            "error",
            f"{len(result.manifest_uris)} manifests, {n_expected} sub-tiles",
            {"n_manifests": len(result.manifest_uris), "n_expected": n_expected},
        )
    )
    ids = []
    for uri in result.manifest_uris:
        m = load_manifest(uri, cfg.storage_options(uri), cfg=cfg)
        ids += [int(i) for i in m["core_source_ids"]]
    listed = pl.DataFrame({"OBJECT_ID": pl.Series(ids, dtype=pl.Int64)})
    dup = check_unique_object_ids(listed)
    want = set(core["OBJECT_ID"].to_list())
    missing, extra = want - set(ids), set(ids) - want
    ok = dup.passed and not missing and not extra
    out.append(
        CheckOutcome(
            "core_membership",
            ok,
            "error",
            f"{len(ids)} core sources in {len(result.manifest_uris)} manifests, each exactly once"
            if ok
            else f"{dup.metadata.get('n_duplicated', 0)} in several cores, {len(missing)} in none, "
            f"{len(extra)} not owned core sources",
            {"n_listed": len(ids), "n_core": len(want), "n_missing": len(missing), "n_extra": len(extra)},
        )
    )
    return out


def _psf_preview(cfg, quadrants_uri: str):
    """PNG of the first quadrant's PSF grid (9 x 9 PSF stamps), or None when there is no PSF file."""
    import pyarrow.parquet as pq
    from astropy.io import fits

    from constellation_assets.defs.plots import psf_grid_png
    from constellation_assets.io.uri import open_uri

    with open_uri(quadrants_uri, "rb", cfg.storage_options(quadrants_uri)) as fh:
        q = pq.read_table(fh)
    cols = set(q.column_names)
    path_col = next((c for c in ("psf_path", "PSF_PATH", "psf_uri") if c in cols), None)
    if q.num_rows == 0 or path_col is None:
        return None
    row = q.slice(0, 1).to_pylist()[0]
    psf_uri = row[path_col]
    if not psf_uri:
        return None
    ext = f"{row['ccd']}.{row['quadrant']}" if "ccd" in row and "quadrant" in row else 1
    with open_uri(psf_uri, "rb", cfg.storage_options(psf_uri)) as fh, fits.open(fh) as hdul:
        names = {h.name for h in hdul}
        hdu = hdul[ext] if isinstance(ext, str) and ext.upper() in names else hdul[1 if len(hdul) > 1 else 0]
        img = hdu.data
    return psf_grid_png(img, f"PSF grid {ext}")


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "tile_sources",
            description="MER final catalog of the tile (+ neighbours inside its extended area) -> shear-grade "
            "selection (S/N >= 10, VIS_DET, spurious/point-like/quality flags) -> sub-tile assignment "
            "(SUBTILE_ROW/COL, OWNED, IN_CORE). Parquet, one file per tile.",
            group_name=TILES_GROUP,
            owners=OWNERS,
            kinds={"python", "parquet", "polars"},
        ),
        dg.AssetSpec(
            "tile_quadrants",
            description="VIS DET/BKG/WGT quadrants and PSF files whose footprint (quadrant WCS) overlaps the "
            "tile's extended area (32'), with HDU byte offsets, from the cached quadrant index. Parquet.",
            group_name=TILES_GROUP,
            owners=OWNERS,
            kinds={"python", "parquet", "s3"},
        ),
        dg.AssetSpec(
            "subtile_manifests",
            description="One manifest YAML per sub-tile (4x4 grid, 8' cores + 1' margins): sky bounds, "
            "quadrant paths, source ids and core source ids; the input of shear inference.",
            group_name=TILES_GROUP,
            owners=OWNERS,
            kinds={"python", "yaml"},
            deps=["tile_sources", "tile_quadrants"],
        ),
    ],
    check_specs=[*SOURCES_CHECKS, *QUADRANT_CHECKS, *MANIFEST_CHECKS],
    partitions_def=mer_tile_partitions,
    backfill_policy=TILE_BACKFILL_POLICY,
    can_subset=False,
    name="prepare_tile",
)
def prepare_tile_assets(
    context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    from constellation_assets.prepare import prepare_tile

    cfg = pipeline_config.load()
    tile_id = int(context.partition_key)
    timer = Timer()
    with timer.phase("prepare"):
        result = prepare_tile(cfg, tile_id)
    with timer.phase("checks"):
        outcomes = tile_outcomes(cfg, result)
    prov = provenance_metadata(cfg, "prepare", extra={"tile_id": tile_id})
    common = {
        **prov,
        **timer.metadata(),
        "tile_id": dg.MetadataValue.int(tile_id),
        "inputs_hash": dg.MetadataValue.text(result.inputs_hash),
        "up_to_date_skipped": dg.MetadataValue.bool(bool(result.skipped)),
    }
    yield dg.MaterializeResult(
        asset_key="tile_sources",
        metadata={
            **common,
            **table_metadata(result.n_sources, result.sources_schema),
            "uri": dg.MetadataValue.path(result.sources_uri),
            "n_core": dg.MetadataValue.int(result.n_core),
            "n_catalog_rows": dg.MetadataValue.int(result.n_catalog_rows),
            "catalog_uri": dg.MetadataValue.path(result.catalog_uri),
        },
    )
    quad_md = {
        **common,
        **table_metadata(result.n_quadrants, result.quadrants_schema),
        "uri": dg.MetadataValue.path(result.quadrants_uri),
    }
    try:
        png = _psf_preview(cfg, result.quadrants_uri)
    except Exception as exc:  # a preview must never fail the tile; say why it is missing
        context.log.warning(f"PSF preview skipped: {exc}")
        png = None
    if png is not None:
        quad_md["psf_grid"] = png_markdown(png, "PSF model grid of the first overlapping quadrant")
    yield dg.MaterializeResult(asset_key="tile_quadrants", metadata=quad_md)
    yield dg.MaterializeResult(
        asset_key="subtile_manifests",
        metadata={
            **common,
            "dagster/row_count": dg.MetadataValue.int(len(result.manifest_uris)),
            "grid": dg.MetadataValue.json(list(result.grid)),
            "manifest_uris": dg.MetadataValue.json(list(result.manifest_uris)),
        },
    )
    yield from results_for("tile_sources", SOURCES_CHECKS, outcomes)
    yield from results_for("tile_quadrants", QUADRANT_CHECKS, outcomes)
    yield from results_for("subtile_manifests", MANIFEST_CHECKS, outcomes)
