"""Checks of one prepared tile (sources, quadrants, sub-tile manifests), read back from where ``prepare``
wrote them, so they run right after preparation and again at any later time on the stored files.

Each function returns ``CheckOutcome``s named as the Dagster asset checks; a missing or unreadable file is a
failed outcome that names the file and what to run, never an exception.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from constellation_assets.quality.checks import (
    CheckOutcome,
    Tiling,
    check_sources_in_core,
    check_unique_object_ids,
)

SOURCES_CHECK_NAMES = ("unique_object_id", "sources_in_core", "shear_grade")
QUADRANT_CHECK_NAMES = ("quadrants_found",)
MANIFEST_CHECK_NAMES = ("manifest_count", "core_membership")


def _fail(names, message: str, **metadata) -> list[CheckOutcome]:
    return [CheckOutcome(n, False, "error", message, dict(metadata)) for n in names]


def _read_parquet(cfg: Any, uri: str):
    import pyarrow.parquet as pq

    from constellation_assets.io.uri import open_uri

    with open_uri(uri, "rb", cfg.storage_options(uri)) as fh:
        return pq.read_table(fh)


def _core_sources(sources: pl.DataFrame) -> pl.DataFrame:
    return sources.filter(pl.col("OWNED") & pl.col("IN_CORE")).rename(
        {"RIGHT_ASCENSION": "RA", "DECLINATION": "DEC"}
    )


def tile_sources_outcomes(cfg: Any, tile_id: int) -> list[CheckOutcome]:
    """unique_object_id, sources_in_core (geometry recomputed), shear_grade (selection re-applied)."""
    from constellation_assets.io.mer_catalog import shear_selection
    from constellation_assets.io.uri import uri_exists
    from constellation_assets.prepare import tile_sources_uri

    uri = tile_sources_uri(cfg, tile_id)
    if not uri_exists(uri, cfg.storage_options(uri)):
        return _fail(
            SOURCES_CHECK_NAMES, f"{uri} not found; materialize tile_sources for tile {tile_id}", uri=uri
        )
    table = _read_parquet(cfg, uri)
    sources = pl.from_arrow(table)
    out = [
        check_unique_object_ids(sources),
        check_sources_in_core(_core_sources(sources), Tiling.from_config(cfg)),
    ]
    passing = np.asarray(shear_selection(table, cfg.shear.snr_min), dtype=bool)
    n_fail = int((~passing).sum())
    out.append(
        CheckOutcome(
            "shear_grade",
            bool(passing.all()),
            "error",
            f"{n_fail} of {len(passing)} rows fail the shear-grade selection",
            {"n_rows": len(passing), "n_failing": n_fail},
        )
    )
    return out


def tile_quadrants_outcomes(cfg: Any, tile_id: int) -> list[CheckOutcome]:
    """quadrants_found: at least one VIS quadrant overlaps the tile's extended area."""
    from constellation_assets.io.uri import uri_exists
    from constellation_assets.prepare import tile_quadrants_uri

    uri = tile_quadrants_uri(cfg, tile_id)
    if not uri_exists(uri, cfg.storage_options(uri)):
        return _fail(QUADRANT_CHECK_NAMES, f"{uri} not found; materialize tile_quadrants for tile {tile_id}")
    n = _read_parquet(cfg, uri).num_rows
    msg = (
        f"{n} quadrant(s) overlap the extended area"
        if n
        else f"no VIS quadrant overlaps tile {tile_id}; check data.vis_base_uri"
    )
    return [CheckOutcome("quadrants_found", n > 0, "error", msg, {"n_quadrants": n})]


def subtile_manifest_outcomes(cfg: Any, tile_id: int) -> list[CheckOutcome]:
    """manifest_count (one per sub-tile of the grid) and core_membership (every owned core source of the
    tile in exactly one manifest's core list)."""
    from constellation_assets.io.uri import uri_exists
    from constellation_assets.prepare import load_manifest, manifest_uri, tile_sources_uri

    rows, cols = (int(x) for x in cfg.tiling.sub_tile_grid)
    wanted = [manifest_uri(cfg, tile_id, r, c) for r in range(rows) for c in range(cols)]
    present = [u for u in wanted if uri_exists(u, cfg.storage_options(u))]
    out = [
        CheckOutcome(
            "manifest_count",
            len(present) == len(wanted),
            "error",
            f"{len(present)} manifests, {len(wanted)} sub-tiles",
            {"n_manifests": len(present), "n_expected": len(wanted)},
        )
    ]
    src_uri = tile_sources_uri(cfg, tile_id)
    if not uri_exists(src_uri, cfg.storage_options(src_uri)):
        return out + _fail(["core_membership"], f"{src_uri} not found; materialize tile_sources first")
    core = _core_sources(pl.from_arrow(_read_parquet(cfg, src_uri)))
    ids: list[int] = []
    for uri in present:
        m = load_manifest(uri, cfg.storage_options(uri), cfg=cfg)
        ids += [int(i) for i in m["core_source_ids"]]
    dup = check_unique_object_ids(pl.DataFrame({"OBJECT_ID": pl.Series(ids, dtype=pl.Int64)}))
    want = set(core["OBJECT_ID"].to_list())
    missing, extra = want - set(ids), set(ids) - want
    ok = dup.passed and not missing and not extra
    out.append(
        CheckOutcome(
            "core_membership",
            ok,
            "error",
            f"{len(ids)} core sources in {len(present)} manifests, each exactly once"
            if ok
            else f"{dup.metadata.get('n_duplicated', 0)} in several cores, {len(missing)} in none, "
            f"{len(extra)} not owned core sources",
            {"n_listed": len(ids), "n_core": len(want), "n_missing": len(missing), "n_extra": len(extra)},
        )
    )
    return out


def prepared_tile_outcomes(cfg: Any, tile_id: int) -> list[CheckOutcome]:
    """All checks of one prepared tile (sources, quadrants, manifests)."""
    return (
        tile_sources_outcomes(cfg, tile_id)
        + tile_quadrants_outcomes(cfg, tile_id)
        + subtile_manifest_outcomes(cfg, tile_id)
    )


def tile_result_uris(cfg: Any, tile_id: int) -> list[str]:
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


def shear_measurement_outcomes(cfg: Any, tile_id: int) -> list[CheckOutcome]:
    """Checks of a tile's sub-tile result files (before assembly): results_complete, finite_shear,
    positive_responses. The catalog-level checks (schema, duplicates, cores, truth) run on shear_catalog."""
    from constellation_assets.quality.run import measurement_checks

    return measurement_checks(cfg, int(tile_id), tile_result_uris(cfg, tile_id))


def shear_catalog_outcomes(cfg: Any, tile_id: int) -> list[CheckOutcome]:
    """All catalog checks restricted to one tile, with the synthetic field's truth where it exists."""
    from constellation_assets.catalog.tables import CatalogConfigError
    from constellation_assets.quality.run import CATALOG_CHECK_NAMES, field_truth, run_catalog_checks

    rows, cols = (int(x) for x in cfg.tiling.sub_tile_grid)
    try:
        return run_catalog_checks(
            cfg, expected=rows * cols, truth=field_truth(cfg, [tile_id]), tile_ids=[int(tile_id)]
        )
    except CatalogConfigError as exc:  # no shear tables yet: every check fails and says why
        return _fail(CATALOG_CHECK_NAMES, f"{exc}; materialize shear_catalog for tile {tile_id}")
