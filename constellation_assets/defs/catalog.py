"""Catalog asset: per-tile idempotent overwrite of the Iceberg shear tables, checked with quality/."""

from collections.abc import Iterator

import dagster as dg

from constellation_assets.defs.checks import check_specs, results_for
from constellation_assets.defs.metadata import Timer, png_markdown, provenance_metadata, table_metadata
from constellation_assets.defs.partitions import mer_tile_partitions
from constellation_assets.defs.plots import shear_whisker_png
from constellation_assets.defs.resources import ConstellationConfigResource
from constellation_assets.defs.tiles import TILE_BACKFILL_POLICY

#: Names are those of the quality functions (constellation_assets.quality.run_checks), as printed by
#: `constellation validate`.
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
    list(CATALOG_CHECK_DESCRIPTIONS),
    blocking=["schema_sources", "unique_object_id", "sources_in_core", "finite_shear"],
    descriptions=CATALOG_CHECK_DESCRIPTIONS,
)


def tile_result_uris(cfg, tile_id: int) -> list[str]:
    """The sub-tile result files of one tile under ``output.results`` (per-tile folder or flat)."""
    from constellation_assets.catalog import expand_result_uris, group_results_by_tile
    from constellation_assets.io.uri import join_uri, uri_exists

    results = cfg.output.results
    opts = cfg.storage_options(results)
    tile_dir = join_uri(results, str(tile_id))
    where = tile_dir if uri_exists(tile_dir, opts) else results
    if not uri_exists(where, opts):
        return []
    return group_results_by_tile(expand_result_uris([where], opts)).get(int(tile_id), [])


def tile_truth(cfg, tile_id: int):
    """Input shear of a synthetic-field tile as a one-row frame (TILE_ID, G1_TRUE, G2_TRUE), else None.

    Real Q1 tiles have no truth; the synthetic field writes ``{truth_base}/{tile_id}/shear_truth.json``.
    """
    import json

    import polars as pl

    from constellation_assets.io.uri import join_uri, read_text, uri_exists
    from constellation_assets.synthetic import tile_truth_uri

    uri = join_uri(tile_truth_uri(cfg, tile_id), "shear_truth.json")
    opts = cfg.storage_options(uri)
    if not uri_exists(uri, opts):
        return None
    rec = json.loads(read_text(uri, opts))
    return pl.DataFrame(
        {"TILE_ID": [int(tile_id)], "G1_TRUE": [float(rec["G1_TRUE"])], "G2_TRUE": [float(rec["G2_TRUE"])]}
    )


@dg.asset(
    deps=["shear_measurements"],
    partitions_def=mer_tile_partitions,
    backfill_policy=TILE_BACKFILL_POLICY,
    group_name="catalog",
    owners=["team:shear-platform"],
    kinds={"iceberg", "polars"},
    check_specs=CATALOG_CHECKS,
    description="Core-area sources of the tile's sub-tile results written to the Iceberg tables shear.sources "
    "and shear.subtiles, replacing the tile's rows in one commit per table (re-running never duplicates; "
    "commits retry on conflict).",
)
def shear_catalog(
    context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    from constellation_assets.catalog import assemble_tile, open_catalog, scan_subtiles
    from constellation_assets.catalog.assemble import code_version
    from constellation_assets.catalog.tables import namespace_from_config
    from constellation_assets.provenance import config_hash
    from constellation_assets.quality import run_catalog_checks

    cfg = pipeline_config.load()
    tile_id = int(context.partition_key)
    timer = Timer()
    uris = tile_result_uris(cfg, tile_id)
    if not uris:
        raise dg.Failure(
            f"no sub-tile results for tile {tile_id} under {cfg.output.results}; "
            "materialize shear_measurements for this partition first"
        )
    catalog = open_catalog(cfg)
    namespace = namespace_from_config(cfg)
    with timer.phase("assemble"):
        res = assemble_tile(
            catalog,
            tile_id,
            uris,
            run_id=context.run_id,
            config_hash=config_hash(cfg),
            code_version=code_version(),
            namespace=namespace,
            storage_options=cfg.storage_options(uris[0]),
        )
    n_expected = int(cfg.tiling.sub_tile_grid[0]) * int(cfg.tiling.sub_tile_grid[1])
    with timer.phase("checks"):
        outcomes = run_catalog_checks(
            cfg, expected=n_expected, truth=tile_truth(cfg, tile_id), tile_ids=[tile_id]
        )
    subtiles = scan_subtiles(catalog, [tile_id], namespace=namespace)
    from constellation_assets.catalog import SOURCES_ICEBERG_SCHEMA

    md = {
        **provenance_metadata(cfg, "assemble", extra={"tile_id": tile_id}),
        **table_metadata(res.n_sources, SOURCES_ICEBERG_SCHEMA.as_arrow()),
        **timer.metadata(),
        "iceberg_snapshot_id": dg.MetadataValue.int(int(res.sources_snapshot_id or 0)),
        "iceberg_subtiles_snapshot_id": dg.MetadataValue.int(int(res.subtiles_snapshot_id or 0)),
        "commit_attempts": dg.MetadataValue.int(res.commit_attempts),
        "n_subtiles": dg.MetadataValue.int(res.n_subtiles),
        "n_margin_dropped": dg.MetadataValue.int(res.n_margin_dropped),
        "missing_subtiles": dg.MetadataValue.json([list(x) for x in res.missing_subtiles]),
        "table": dg.MetadataValue.text(f"{namespace}.sources"),
    }
    if subtiles.num_rows:
        s = subtiles.to_pydict()
        md["shear_map"] = png_markdown(
            shear_whisker_png(s["RA"], s["DEC"], s["G1"], s["G2"], f"tile {tile_id}: sub-tile shear"),
            "per-sub-tile shear whiskers",
        )
    yield dg.MaterializeResult(metadata=md)
    yield from results_for("shear_catalog", CATALOG_CHECKS, outcomes)
