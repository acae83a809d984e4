"""Tile preparation assets (per MER tile partition): sources, quadrants and the sub-tile manifests.

One domain call (``constellation_assets.prepare.prepare``, the stage ``constellation prepare`` runs) produces
all three for the tiles of the run, so they are one multi-asset step: the manifests are only ever written
together with the source and quadrant tables they were derived from. The checks (``prepare_tile_checks``)
read the stored files back, per tile partition, right after the step and whenever re-executed from the UI.
"""

from collections.abc import Iterator

import dagster as dg

from constellation_assets.defs.checks import check_specs, tile_checks
from constellation_assets.defs.metadata import Timer, plot_metadata, provenance_metadata, table_metadata
from constellation_assets.defs.partitions import mer_tile_partitions
from constellation_assets.defs.resources import ConstellationConfigResource
from constellation_assets.quality.tiles import prepared_tile_outcomes

#: Tiles per run in a backfill (BackfillPolicy.multi_run): 60,000 tiles -> 2,400 runs. Every tile asset
#: iterates ``context.partition_keys`` and reports metadata and check results per tile partition.
TILE_BACKFILL_BATCH = 25
TILE_BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=TILE_BACKFILL_BATCH)

TILES_GROUP = "tiles"
OWNERS = ["team:shear-platform"]

#: How a newcomer gets the first tiles through (shown on the tile assets in the UI).
FIRST_RUN = (
    "First run: the tiles appear as mer_tile partitions once mer_tile_discovery_sensor has ticked (on by "
    "default locally; or run register_partitions_job). Then open the asset graph, click 'Materialize all' and "
    "pick all partitions: synthetic_field runs first, then tiles in batches of 25 per run."
)

SOURCES_CHECKS = check_specs(
    "tile_sources",
    ["unique_object_id", "sources_in_core", "shear_grade"],
    blocking=["unique_object_id", "sources_in_core"],
    partitions_def=mer_tile_partitions,
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
    partitions_def=mer_tile_partitions,
    descriptions={"quadrants_found": "At least one VIS quadrant overlaps the tile's extended area."},
)
MANIFEST_CHECKS = check_specs(
    "subtile_manifests",
    ["manifest_count", "core_membership"],
    blocking=["manifest_count", "core_membership"],
    partitions_def=mer_tile_partitions,
    descriptions={
        "manifest_count": "One manifest per sub-tile (rows x cols of the grid, 16 by default).",
        "core_membership": "Every owned core source of the tile is in exactly one sub-tile manifest's core list.",
    },
)


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


def build_prepare_tile_assets(field_upstream: bool = True) -> dg.AssetsDefinition:
    """The prepare multi-asset; ``field_upstream`` puts synthetic_field upstream of the tile assets (the local
    demo, where it writes their input data), so "Materialize all" and backfills order it first."""
    field_dep = ["synthetic_field"] if field_upstream else []
    where = (
        "Local demo: its input is the synthetic_field asset (upstream). "
        if field_upstream
        else "Input: Euclid Q1 data under data.vis_base_uri / data.catalog_base_uri. "
    )

    @dg.multi_asset(
        specs=[
            dg.AssetSpec(
                "tile_sources",
                description="MER final catalog of the tile (+ neighbours inside its extended area) -> "
                "shear-grade selection (S/N >= 10, VIS_DET, spurious/point-like/quality flags) -> sub-tile "
                "assignment (SUBTILE_ROW/COL, OWNED, IN_CORE). Parquet, one file per tile. "
                + where
                + FIRST_RUN,
                group_name=TILES_GROUP,
                owners=OWNERS,
                kinds={"python", "parquet", "polars"},
                deps=field_dep,
            ),
            dg.AssetSpec(
                "tile_quadrants",
                description="VIS DET/BKG/WGT quadrants and PSF files whose footprint (quadrant WCS) overlaps "
                "the tile's extended area (32'), with HDU byte offsets, from the cached quadrant index. "
                "Parquet; the PSF grid of the first quadrant is shown in the materialization.",
                group_name=TILES_GROUP,
                owners=OWNERS,
                kinds={"python", "parquet", "s3"},
                deps=field_dep,
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
        partitions_def=mer_tile_partitions,
        backfill_policy=TILE_BACKFILL_POLICY,
        can_subset=False,
        name="prepare_tile",
    )
    def prepare_tile_assets(
        context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
    ) -> Iterator[dg.MaterializeResult]:
        from constellation_assets.prepare import prepare

        cfg = pipeline_config.load()
        tile_ids = [int(k) for k in context.partition_keys]
        timer = Timer()
        with timer.phase("prepare"):
            results = prepare(cfg, tile_ids, progress=False)  # also writes the stage's run_config record
        for result in results:
            _report_tile(context, cfg, result)
        batch = {
            **provenance_metadata(cfg, "prepare", extra={"tiles": tile_ids}),
            **timer.metadata(),
            "run_tiles": dg.MetadataValue.json([str(t) for t in tile_ids]),
        }
        for key in ("tile_sources", "tile_quadrants", "subtile_manifests"):
            yield dg.MaterializeResult(asset_key=key, metadata=batch)

    return prepare_tile_assets


def _report_tile(context: dg.AssetExecutionContext, cfg, result) -> None:
    """Per-partition metadata of one prepared tile (shown on that tile's materialization)."""
    key = str(result.tile_id)
    common = {
        "tile_id": dg.MetadataValue.int(int(result.tile_id)),
        "inputs_hash": dg.MetadataValue.text(result.inputs_hash),
        "up_to_date_skipped": dg.MetadataValue.bool(bool(result.skipped)),
        "tile_seconds": dg.MetadataValue.float(round(float(result.seconds), 3)),
    }
    context.add_asset_metadata(
        {
            **common,
            **table_metadata(result.n_sources, result.sources_schema),
            "uri": dg.MetadataValue.path(result.sources_uri),
            "n_core": dg.MetadataValue.int(result.n_core),
            "n_catalog_rows": dg.MetadataValue.int(result.n_catalog_rows),
            "catalog_uri": dg.MetadataValue.path(result.catalog_uri),
        },
        asset_key="tile_sources",
        partition_key=key,
    )
    quad_md = {
        **common,
        **table_metadata(result.n_quadrants, result.quadrants_schema),
        "uri": dg.MetadataValue.path(result.quadrants_uri),
    }
    try:
        png = _psf_preview(cfg, result.quadrants_uri)
    except (OSError, ValueError, KeyError, IndexError) as exc:  # a preview never fails the tile; say why
        context.log.warning(f"tile {key}: PSF preview skipped: {exc}")
        png = None
    if png is not None:
        quad_md.update(
            plot_metadata(
                cfg,
                "psf_grid",
                png,
                f"tile {key}: PSF model grid of the first overlapping quadrant",
                stage="prepare",
                name=key,
            )
        )
    context.add_asset_metadata(quad_md, asset_key="tile_quadrants", partition_key=key)
    context.add_asset_metadata(
        {
            **common,
            "dagster/row_count": dg.MetadataValue.int(len(result.manifest_uris)),
            "grid": dg.MetadataValue.json(list(result.grid)),
            "manifest_uris": dg.MetadataValue.json(list(result.manifest_uris)),
        },
        asset_key="subtile_manifests",
        partition_key=key,
    )


prepare_tile_assets = build_prepare_tile_assets(field_upstream=True)

prepare_tile_checks = tile_checks(
    "prepare_tile_checks",
    [*SOURCES_CHECKS, *QUADRANT_CHECKS, *MANIFEST_CHECKS],
    prepared_tile_outcomes,
    "Checks of each prepared tile, read back from the stored files (per tile partition).",
)
