"""Catalog asset: per-tile idempotent overwrite of the Iceberg shear tables (the tiles of the run), checked
per tile partition with the quality functions of `constellation validate`."""

from collections.abc import Iterator

import dagster as dg

from constellation_assets.defs.checks import check_specs, tile_checks
from constellation_assets.defs.metadata import Timer, plot_metadata, provenance_metadata, table_metadata
from constellation_assets.defs.partitions import mer_tile_partitions
from constellation_assets.defs.resources import ConstellationConfigResource
from constellation_assets.defs.tiles import TILE_BACKFILL_POLICY
from constellation_assets.quality.run import CATALOG_CHECK_NAMES
from constellation_assets.quality.tiles import shear_catalog_outcomes, tile_result_uris

CATALOG_CHECK_DESCRIPTIONS = {
    "schema_sources": "shear.sources has the catalog schema.",
    "schema_subtiles": "shear.subtiles has the catalog schema.",
    "subtile_row_count": "shear.subtiles holds one row per sub-tile of the tile (grid rows x cols).",
    "unique_subtiles": "No sub-tile appears twice.",
    "unique_object_id": "No OBJECT_ID appears twice in shear.sources for the tile.",
    "sources_in_core": "Every catalog source lies inside its sub-tile core (geometry recomputed).",
    "finite_shear": "Finite E1/E2/G1/G2 and weights.",
    "shear_below_one": "|g| < 1 for sub-tiles and sources.",
    "positive_errors": "G1_ERR, G2_ERR > 0.",
    "positive_responses": "Shear responses R11, R22 and weights > 0.",
    "run_consistency": "Sources and sub-tile rows of the tile come from the same run.",
    "shear_vs_truth": "Recovered tile shear agrees with the input shear where truth exists.",
}
CATALOG_CHECKS = check_specs(
    "shear_catalog",
    list(CATALOG_CHECK_NAMES),  # the outcomes of quality.run_catalog_checks, in order
    blocking=["schema_sources", "unique_object_id", "sources_in_core", "finite_shear"],
    descriptions=CATALOG_CHECK_DESCRIPTIONS,
    partitions_def=mer_tile_partitions,
)
shear_catalog_checks = tile_checks(
    "shear_catalog_checks",
    CATALOG_CHECKS,
    shear_catalog_outcomes,
    "The quality checks of `constellation validate`, on each tile's rows of shear.sources / shear.subtiles.",
)


@dg.asset(
    deps=["shear_measurements"],
    partitions_def=mer_tile_partitions,
    backfill_policy=TILE_BACKFILL_POLICY,
    group_name="catalog",
    owners=["team:shear-platform"],
    kinds={"iceberg", "polars"},
    description="Core-area sources of the tile's sub-tile results written to the Iceberg tables shear.sources "
    "and shear.subtiles, replacing the tile's rows in one commit per table (re-running never duplicates; "
    "commits retry on conflict). Each tile partition's materialization shows its sub-tile shear map. Query the "
    "tables with PyIceberg, DuckDB or Polars on the catalog of the pipeline config (output.catalog_uri; README "
    "'Querying the catalog').",
)
def shear_catalog(
    context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult]:
    from constellation_assets.catalog import (
        SOURCES_ICEBERG_SCHEMA,
        assemble_results,
        open_catalog,
        scan_subtiles,
    )
    from constellation_assets.catalog.tables import namespace_from_config

    cfg = pipeline_config.load()
    tile_ids = [int(k) for k in context.partition_keys]
    timer = Timer()
    uris = {t: tile_result_uris(cfg, t) for t in tile_ids}
    absent = [t for t, u in uris.items() if not u]
    if absent:
        raise dg.Failure(
            f"no sub-tile results for tile(s) {absent} under {cfg.output.results}; "
            "materialize shear_measurements for these partitions first"
        )
    catalog = open_catalog(cfg)
    namespace = namespace_from_config(cfg)
    with timer.phase("assemble"):
        # The stage `constellation assemble` runs (also writes its run_config record).
        assembled = assemble_results(
            cfg, [u for t in tile_ids for u in uris[t]], run_id=context.run_id, catalog=catalog
        )
    grid = tuple(int(x) for x in cfg.tiling.sub_tile_grid)
    with timer.phase("plots"):
        subtiles = scan_subtiles(catalog, tile_ids, namespace=namespace).to_pydict()
        for res in assembled:
            context.add_asset_metadata(
                _tile_metadata(cfg, res, subtiles, grid, SOURCES_ICEBERG_SCHEMA, namespace),
                partition_key=str(res.tile_id),
            )
    from constellation_assets.defs.calibration_field import field_calibration_provenance

    yield dg.MaterializeResult(
        metadata={
            **provenance_metadata(cfg, "assemble", extra={"tiles": tile_ids}),
            **timer.metadata(),
            # The field-level calibration (m, c, config hash) this catalog commit was assembled under.
            **field_calibration_provenance(context.instance),
            "run_tiles": dg.MetadataValue.json([str(t) for t in tile_ids]),
            "table": dg.MetadataValue.text(f"{namespace}.sources"),
        }
    )


def _tile_metadata(cfg, res, subtiles: dict, grid, schema, namespace: str) -> dict:
    """One tile's commit (snapshots, attempts, rows) and its sub-tile shear map."""
    from constellation_assets.defs.plots import subtile_whisker_png

    # assemble_tile counts the attempts of both table commits (2 when nothing conflicted); a clean commit of
    # the tile reports 1, each retry after a conflict adds 1.
    retries = max(int(res.commit_attempts) - 2, 0)
    md = {
        **table_metadata(res.n_sources, schema),
        "tile_id": dg.MetadataValue.int(int(res.tile_id)),
        "iceberg_snapshot_id": dg.MetadataValue.int(int(res.sources_snapshot_id or 0)),
        "iceberg_subtiles_snapshot_id": dg.MetadataValue.int(int(res.subtiles_snapshot_id or 0)),
        "commit_attempts": dg.MetadataValue.int(1 + retries),
        "commit_retries": dg.MetadataValue.int(retries),
        "n_subtiles": dg.MetadataValue.int(res.n_subtiles),
        "n_margin_dropped": dg.MetadataValue.int(res.n_margin_dropped),
        "missing_subtiles": dg.MetadataValue.json([list(x) for x in res.missing_subtiles]),
        "table": dg.MetadataValue.text(f"{namespace}.sources"),
    }
    sel = [i for i, t in enumerate(subtiles.get("TILE_ID", [])) if int(t) == int(res.tile_id)]
    if sel:

        def col(name):
            return [subtiles[name][i] for i in sel]

        png = subtile_whisker_png(
            grid,
            col("SUBTILE_ROW"),
            col("SUBTILE_COL"),
            col("G1"),
            col("G2"),
            col("N_SOURCES"),
            f"tile {res.tile_id}: shear per sub-tile "
            f"({sum(int(n) > 0 for n in col('N_SOURCES'))} of {grid[0] * grid[1]} hold sources)",
        )
        md.update(
            plot_metadata(
                cfg,
                "shear_map",
                png,
                f"tile {res.tile_id}: sub-tile shear",
                stage="assemble",
                name=str(res.tile_id),
            )
        )
    return md
