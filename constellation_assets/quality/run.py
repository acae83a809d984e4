"""Run the quality checks on the Iceberg catalog or on sub-tile result files."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import polars as pl
import pyarrow as pa

from constellation_assets.catalog.schema import (
    SOURCE_RESULT_SCHEMA,
    SOURCES_TABLE_ARROW_SCHEMA,
    SUBTILE_SCHEMA,
    SUBTILES_TABLE_ARROW_SCHEMA,
)
from constellation_assets.quality.checks import (
    SUBTILES_PER_TILE,
    CheckOutcome,
    Frame,
    Tiling,
    check_finite_shear,
    check_positive_errors,
    check_positive_responses,
    check_run_consistency,
    check_schema,
    check_shear_bounded,
    check_shear_vs_truth,
    check_sources_in_core,
    check_subtile_count,
    check_unique_object_ids,
    check_unique_subtiles,
)

TRUTH_COLUMNS = ("TILE_ID", "G1_TRUE", "G2_TRUE")

#: The outcomes of :func:`run_catalog_checks`, in order (the shear_catalog asset checks).
CATALOG_CHECK_NAMES = (
    "schema_sources",
    "schema_subtiles",
    "subtile_row_count",
    "unique_subtiles",
    "unique_object_id",
    "sources_in_core",
    "finite_shear",
    "shear_below_one",
    "positive_errors",
    "positive_responses",
    "run_consistency",
    "shear_vs_truth",
)
#: The outcomes of :func:`measurement_checks` (the shear_measurements asset checks).
MEASUREMENT_CHECK_NAMES = ("results_complete", "finite_shear", "positive_responses")


def load_truth(truth: Any, storage_options: dict | None = None) -> pl.DataFrame | None:
    """A truth table (TILE_ID, G1_TRUE, G2_TRUE) from a frame, pyarrow table, or Parquet/CSV/JSON URI."""
    if truth is None:
        return None
    if isinstance(truth, pl.LazyFrame):
        truth = truth.collect()
    elif isinstance(truth, pa.Table):
        truth = pl.from_arrow(truth)
    elif isinstance(truth, (str,)) or hasattr(truth, "__fspath__"):
        from constellation_assets.io.uri import open_uri

        uri = str(truth)
        with open_uri(uri, "rb", storage_options=storage_options) as fh:
            if uri.endswith(".csv"):
                truth = pl.read_csv(fh)
            elif uri.endswith(".json"):
                truth = pl.read_json(fh)
            else:
                truth = pl.read_parquet(fh)
    if not isinstance(truth, pl.DataFrame):
        raise TypeError(f"truth must be a polars/pyarrow table or a file URI, got {type(truth).__name__}")
    missing = [c for c in TRUTH_COLUMNS if c not in truth.columns]
    if missing:
        raise ValueError(f"truth table lacks column(s) {missing}; it needs {list(TRUTH_COLUMNS)}")
    return truth.select(TRUTH_COLUMNS)


def field_truth(cfg: Any, tile_ids: Iterable[int]) -> pl.DataFrame | None:
    """Input shear of synthetic-field tiles (TILE_ID, G1_TRUE, G2_TRUE) from their ``shear_truth.json``.

    The synthetic field writes ``{truth_base}/{tile_id}/shear_truth.json``; real Q1 tiles have none.
    Returns None when no tile has a truth file.
    """
    import json

    from constellation_assets.io.uri import join_uri, read_text, uri_exists
    from constellation_assets.synthetic import tile_truth_uri

    rows = []
    for tile_id in sorted({int(t) for t in tile_ids}):
        uri = join_uri(tile_truth_uri(cfg, tile_id), "shear_truth.json")
        opts = cfg.storage_options(uri)
        if not uri_exists(uri, opts):
            continue
        rec = json.loads(read_text(uri, opts))
        rows.append({"TILE_ID": tile_id, "G1_TRUE": float(rec["G1_TRUE"]), "G2_TRUE": float(rec["G2_TRUE"])})
    return (
        pl.DataFrame(rows, schema={"TILE_ID": pl.Int64, "G1_TRUE": pl.Float64, "G2_TRUE": pl.Float64})
        if rows
        else None
    )


def run_checks(
    sources: Frame,
    subtiles: Frame,
    *,
    expected: int | None = None,
    truth: Any = None,
    tiling: Tiling | None = None,
    n_sigma: float = 4.0,
    sources_schema: pa.Schema | None = None,
    subtiles_schema: pa.Schema | None = None,
    geometry: bool = True,
) -> list[CheckOutcome]:
    """All checks on one (sources, subtiles) pair of frames, in a fixed order."""
    truth_df = load_truth(truth)
    outcomes: list[CheckOutcome] = []
    if sources_schema is not None:
        outcomes.append(check_schema(sources, sources_schema, "schema_sources"))
    if subtiles_schema is not None:
        outcomes.append(check_schema(subtiles, subtiles_schema, "schema_subtiles"))
    outcomes += [
        check_subtile_count(
            subtiles,
            expected,
            subtiles_per_tile=(tiling.grid[0] * tiling.grid[1]) if tiling else SUBTILES_PER_TILE,
        ),
        check_unique_subtiles(subtiles),
        check_unique_object_ids(sources),
        check_sources_in_core(sources, tiling, geometry=geometry),
        check_finite_shear(sources, subtiles),
        check_shear_bounded(subtiles, sources),
        check_positive_errors(subtiles),
        check_positive_responses(sources),
        check_run_consistency(sources, subtiles),
        check_shear_vs_truth(subtiles, truth_df, n_sigma=n_sigma),
    ]
    return outcomes


def catalog_frames(
    catalog: Any,
    tile_ids: Iterable[int] | None = None,
    namespace: str | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(sources, subtiles) of the Iceberg catalog as DataFrames (optionally only some tiles).

    Reads through PyIceberg (its FileIO carries the catalog's S3 settings); per-tile predicates are
    pushed down, so the per-partition checks read one tile.
    """
    from constellation_assets.catalog.query import scan_sources, scan_subtiles
    from constellation_assets.catalog.tables import DEFAULT_NAMESPACE, load_tables

    ns = namespace or DEFAULT_NAMESPACE
    load_tables(catalog, ns)  # clear error when nothing was assembled yet
    tiles = list(tile_ids) if tile_ids is not None else None
    src = scan_sources(catalog, tiles, namespace=ns)
    sub = scan_subtiles(catalog, tiles, namespace=ns)
    return pl.from_arrow(src), pl.from_arrow(sub)


def run_catalog_checks(
    cfg_or_catalog: Any,
    expected: int | None = None,
    truth: Any = None,
    *,
    tile_ids: Iterable[int] | None = None,
    n_sigma: float = 4.0,
    tiling: Tiling | None = None,
    namespace: str | None = None,
) -> list[CheckOutcome]:
    """All checks on the shear catalog of a PipelineConfig (or an open PyIceberg catalog).

    ``expected``: expected sub-tile row count (tiles x 16); default: the tiles present x 16, which
    catches incomplete tiles but not missing ones -- pass it to detect missing tiles. ``truth``: frame
    or URI with TILE_ID, G1_TRUE, G2_TRUE, or ``"field"`` for the synthetic field's truth files
    (``field_truth``). ``tile_ids`` restricts every check to those tiles (the
    per-partition form the Dagster asset checks use).
    """
    from pyiceberg.catalog import Catalog

    from constellation_assets.catalog.tables import namespace_from_config, open_catalog

    if isinstance(cfg_or_catalog, Catalog):
        catalog = cfg_or_catalog
        tiling = tiling or Tiling()
        ns = namespace
    else:
        catalog = open_catalog(cfg_or_catalog)
        tiling = tiling or Tiling.from_config(cfg_or_catalog)
        ns = namespace or namespace_from_config(cfg_or_catalog)
        if isinstance(truth, str) and truth != "field":
            truth = load_truth(truth, cfg_or_catalog.storage_options(truth))
    sources, subtiles = catalog_frames(catalog, tile_ids, ns)
    if isinstance(truth, str) and truth == "field":
        if isinstance(cfg_or_catalog, Catalog):
            raise ValueError(
                "truth='field' needs a PipelineConfig (it locates the synthetic field's truth files)"
            )
        present = subtiles["TILE_ID"].unique().to_list()
        truth = field_truth(cfg_or_catalog, present)
    return run_checks(
        sources,
        subtiles,
        expected=expected,
        truth=truth,
        tiling=tiling,
        n_sigma=n_sigma,
        sources_schema=SOURCES_TABLE_ARROW_SCHEMA,
        subtiles_schema=SUBTILES_TABLE_ARROW_SCHEMA,
    )


def result_frames(
    result_uris: Iterable[str], storage_options: dict | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(sources, subtiles) frames from sub-tile result files (all rows, IN_CORE kept)."""
    from constellation_assets.catalog.schema import read_subtile_result, subtiles_table

    tables, summaries = [], []
    for uri in result_uris:
        table, summary = read_subtile_result(uri, storage_options=storage_options)
        tables.append(table)
        summaries.append(summary)
    src = pa.concat_tables(tables) if tables else SOURCE_RESULT_SCHEMA.empty_table()
    return pl.from_arrow(src), pl.from_arrow(subtiles_table(summaries))


def run_result_checks(
    result_uris: Iterable[str],
    expected: int | None = None,
    truth: Any = None,
    *,
    tiling: Tiling | None = None,
    n_sigma: float = 4.0,
    storage_options: dict | None = None,
) -> list[CheckOutcome]:
    """The checks on sub-tile result files before assembly: core rows only (IN_CORE), as the catalog will hold."""
    sources, subtiles = result_frames(result_uris, storage_options)
    core = sources.filter(pl.col("IN_CORE"))
    outcomes = run_checks(
        core,
        subtiles,
        expected=expected,
        truth=truth,
        tiling=tiling,
        n_sigma=n_sigma,
        sources_schema=SOURCE_RESULT_SCHEMA,
        subtiles_schema=SUBTILE_SCHEMA,
    )
    # Run IDs in result files come from the summaries; consistency is by construction there.
    return [o for o in outcomes if o.name != "run_consistency"]


def check_results_complete(
    result_uris: Iterable[str],
    tile_id: int,
    grid: tuple[int, int] = (4, 4),
    storage_options: dict | None = None,
) -> tuple[CheckOutcome, pl.DataFrame | None, pl.DataFrame | None]:
    """One readable result file with the result schema per sub-tile of ``tile_id``.

    Returns the outcome and, when every present file was readable, the (sources, subtiles) frames.
    """
    from constellation_assets.catalog.schema import ResultFileError, parse_subtile_result_name

    name = "results_complete"
    uris = list(result_uris)
    wanted = {(r, c) for r in range(grid[0]) for c in range(grid[1])}
    present: set[tuple[int, int]] = set()
    unreadable: list[str] = []
    foreign: list[str] = []
    for uri in uris:
        try:
            t, r, c = parse_subtile_result_name(uri)
        except ResultFileError:
            foreign.append(uri)
            continue
        if t != int(tile_id):
            foreign.append(uri)
        else:
            present.add((r, c))
    frames: tuple[pl.DataFrame | None, pl.DataFrame | None] = (None, None)
    try:
        frames = result_frames([u for u in uris if u not in foreign], storage_options)
    except ResultFileError as exc:
        unreadable.append(str(exc))
    missing = sorted(wanted - present)
    passed = not missing and not unreadable and not foreign
    parts = []
    if missing:
        parts.append(f"{len(missing)} sub-tile result(s) missing: {missing[:8]}")
    if unreadable:
        parts.append(unreadable[0])
    if foreign:
        parts.append(f"{len(foreign)} file(s) not of tile {tile_id}: {foreign[:3]}")
    msg = (
        f"{len(present)} of {len(wanted)} sub-tile results present and readable"
        if passed
        else "; ".join(parts)
    )
    meta = {"n_results": len(present), "expected": len(wanted), "missing": [list(m) for m in missing]}
    return CheckOutcome(name, passed, "error", msg, meta), frames[0], frames[1]


def measurement_checks(cfg: Any, tile_id: int, results: Any) -> list[CheckOutcome]:
    """Checks of one tile's shear measurements (the ``shear_measurements`` asset): results_complete,
    finite_shear (values finite and |g| < 1), positive_responses (ensemble responses and weights).

    ``results``: the tile's result URIs, or an object with a ``result_uris`` attribute.
    """
    uris = list(getattr(results, "result_uris", results))
    grid = tuple(cfg.tiling.sub_tile_grid) if cfg is not None else (4, 4)
    opts = cfg.storage_options(uris[0]) if (cfg is not None and uris) else None
    complete, sources, subtiles = check_results_complete(uris, tile_id, grid, opts)
    outcomes = [complete]
    if sources is None or subtiles is None:
        reason = "result files could not be read: see results_complete"
        outcomes += [
            CheckOutcome("finite_shear", False, "error", reason, {}),
            CheckOutcome("positive_responses", False, "error", reason, {}),
        ]
        return outcomes
    core = sources.filter(pl.col("IN_CORE"))
    finite = check_finite_shear(core, subtiles)
    bounded = check_shear_bounded(subtiles, core)
    outcomes.append(
        CheckOutcome(
            "finite_shear",
            finite.passed and bounded.passed,
            "error",
            f"{finite.message}; {bounded.message}",
            {**finite.metadata, **bounded.metadata},
        )
    )
    outcomes.append(check_positive_responses(core))
    return outcomes


def all_passed(outcomes: Iterable[CheckOutcome]) -> bool:
    """True when no check with severity 'error' failed."""
    return all(o.passed or o.severity != "error" for o in outcomes)
