"""Each quality check passes on good data and fails on data broken in exactly its way."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from constellation_assets.catalog.schema import SOURCE_RESULT_SCHEMA, SUBTILE_SCHEMA
from constellation_assets.quality import (
    all_passed,
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
    result_frames,
    run_checks,
    run_result_checks,
    tile_shear_summary,
)
from constellation_assets_tests.catalog_testdata import SHAPE_NOISE, make_tile_results

T1, T2 = 102044185, 102044186
G_TRUE = {T1: (0.02, -0.01), T2: (-0.03, 0.015)}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("results"))
    uris = []
    for t in (T1, T2):
        uris += make_tile_results(out, t, n_sources=600, g_true=G_TRUE[t])
    sources, subtiles = result_frames(uris)
    core = sources.filter(pl.col("IN_CORE"))
    truth = pl.DataFrame(
        {
            "TILE_ID": [T1, T2],
            "G1_TRUE": [G_TRUE[T1][0], G_TRUE[T2][0]],
            "G2_TRUE": [G_TRUE[T1][1], G_TRUE[T2][1]],
        }
    )
    return {"uris": uris, "sources": core, "all_sources": sources, "subtiles": subtiles, "truth": truth}


def test_all_checks_pass_on_good_results(good):
    outcomes = run_result_checks(good["uris"], expected=32, truth=good["truth"])
    failed = {o.name: o.message for o in outcomes if not o.passed}
    assert not failed, failed
    assert all_passed(outcomes)
    names = [o.name for o in outcomes]
    assert {
        "schema_sources",
        "subtile_row_count",
        "unique_object_id",
        "sources_in_core",
        "shear_vs_truth",
    } <= set(names)
    # lazy frames work the same as eager ones
    lazy = run_checks(good["sources"].lazy(), good["subtiles"].lazy(), expected=32)
    assert all(o.passed for o in lazy)


def test_schema(good):
    assert check_schema(good["all_sources"], SOURCE_RESULT_SCHEMA).passed
    assert check_schema(good["subtiles"], SUBTILE_SCHEMA).passed
    bad = good["subtiles"].with_columns(pl.col("G1").cast(pl.Float64)).drop("METHOD")
    out = check_schema(bad, SUBTILE_SCHEMA)
    assert not out.passed and out.metadata["missing"] == ["METHOD"] and "G1" in out.metadata["wrong_types"]


def test_subtile_count(good):
    sub = good["subtiles"]
    assert check_subtile_count(sub).passed
    assert not check_subtile_count(sub, expected=48).passed  # a third tile missing entirely
    out = check_subtile_count(sub.filter(~((pl.col("TILE_ID") == T2) & (pl.col("SUBTILE_ROW") == 3))))
    assert not out.passed and out.metadata["incomplete_tiles"] == [{"TILE_ID": T2, "n": 12}]
    doubled = pl.concat([sub, sub.head(1)])
    assert not check_unique_subtiles(doubled).passed
    assert check_unique_subtiles(sub).passed


def test_duplicate_object_ids(good):
    src = good["sources"]
    assert check_unique_object_ids(src).passed
    out = check_unique_object_ids(pl.concat([src, src.head(3)]))
    assert not out.passed and out.metadata["n_duplicated"] == 3
    # the margin rows duplicate neighbours' core sources: that is why only IN_CORE rows are kept
    assert not check_unique_object_ids(good["all_sources"]).passed


def test_sources_in_core_geometry(good):
    src = good["sources"]
    assert check_sources_in_core(src).passed
    # a source labelled with the neighbouring sub-tile (its position is 8' away from that core)
    moved = src.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then((pl.col("SUBTILE_COL") + 1) % 4)
        .otherwise(pl.col("SUBTILE_COL"))
        .cast(pl.Int8)
        .alias("SUBTILE_COL")
    )
    out = check_sources_in_core(moved)
    assert not out.passed and out.metadata["n_outside"] == 1
    # margin rows are outside their sub-tile core (IN_CORE false, and geometrically outside)
    out = check_sources_in_core(good["all_sources"])
    assert not out.passed and out.metadata["n_in_core_false"] > 0 and out.metadata["n_outside"] > 0
    # a source shifted 1 degree away is owned by another tile
    shifted = src.with_columns(
        pl.when(pl.int_range(pl.len()) < 2).then(pl.col("DEC") + 1.0).otherwise(pl.col("DEC")).alias("DEC")
    )
    assert check_sources_in_core(shifted).metadata["n_outside"] == 2


def test_finite_bounded_errors(good):
    src, sub = good["sources"], good["subtiles"]
    assert check_finite_shear(src, sub).passed
    nan_src = src.with_columns(
        pl.when(pl.int_range(pl.len()) == 5).then(np.nan).otherwise(pl.col("E1")).alias("E1")
    )
    out = check_finite_shear(nan_src, sub)
    assert not out.passed and out.metadata["non_finite"]["E1"] == 1
    inf_sub = sub.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(np.inf).otherwise(pl.col("G2")).alias("G2")
    )
    assert not check_finite_shear(None, inf_sub).passed
    # an empty sub-tile's NaN shear is not an error
    empty = sub.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(0).otherwise(pl.col("N_SOURCES")).alias("N_SOURCES"),
        pl.when(pl.int_range(pl.len()) == 0).then(np.nan).otherwise(pl.col("G1")).alias("G1"),
    )
    assert check_finite_shear(None, empty).passed
    assert check_shear_bounded(sub).passed
    big = sub.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(0.8).otherwise(pl.col("G1")).alias("G1"))
    big = big.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(0.7).otherwise(pl.col("G2")).alias("G2"))
    assert not check_shear_bounded(big).passed  # |g| = 1.06 although each component < 1
    assert check_positive_errors(sub).passed
    zero = sub.with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(0.0).otherwise(pl.col("G1_ERR")).alias("G1_ERR")
    )
    assert not check_positive_errors(zero).passed


def test_positive_responses(good):
    src = good["sources"]
    out = check_positive_responses(src)
    assert out.passed and out.metadata["fraction_sources_nonpositive_response"] == 0
    # a few negative per-source responses are allowed (noise), a negative ensemble is not
    some = src.with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(-0.5).otherwise(pl.col("R11")).alias("R11")
    )
    assert check_positive_responses(some).passed
    key = (pl.col("TILE_ID") == T1) & (pl.col("SUBTILE_ROW") == 1) & (pl.col("SUBTILE_COL") == 1)
    flipped = src.with_columns(pl.when(key).then(-pl.col("R22")).otherwise(pl.col("R22")).alias("R22"))
    out = check_positive_responses(flipped)
    assert not out.passed and out.metadata["n_bad_subtiles"] == 1
    # a sub-tile whose sources all have WEIGHT 0 (all below the estimator's S/N cut) divides no shear
    unweighted = src.with_columns(pl.when(key).then(0.0).otherwise(pl.col("WEIGHT")).alias("WEIGHT"))
    out = check_positive_responses(unweighted)
    assert out.passed and out.metadata["n_unweighted_subtiles"] == 1
    assert out.metadata["n_subtiles"] == check_positive_responses(src).metadata["n_subtiles"] - 1
    both = flipped.with_columns(pl.when(key).then(0.0).otherwise(pl.col("WEIGHT")).alias("WEIGHT"))
    assert check_positive_responses(both).passed  # the flipped response carries no weight


def test_shear_vs_truth(good):
    sub, truth = good["subtiles"], good["truth"]
    summary = tile_shear_summary(sub, truth)
    assert summary["TILE_ID"].to_list() == [T1, T2]
    # inverse-variance combination of 16 sub-tiles: error = sigma_e / sqrt(N core sources)
    n = summary["N_SOURCES"].to_numpy()
    assert np.allclose(summary["G1_ERR"].to_numpy(), SHAPE_NOISE / np.sqrt(n), rtol=1e-5)
    out = check_shear_vs_truth(sub, truth)
    assert out.passed and out.metadata["n_tiles_with_truth"] == 2 and out.metadata["dof"] == 4
    # a wrong truth (shear sign flipped) is many sigma away
    wrong = truth.with_columns(-pl.col("G1_TRUE"))
    out = check_shear_vs_truth(sub, wrong)
    assert not out.passed and out.metadata["max_abs_pull"] > 4
    skipped = check_shear_vs_truth(sub, None)
    assert skipped.passed and skipped.severity == "warn"


def test_run_consistency(good):
    src = good["sources"].with_columns(pl.lit("run-a").alias("RUN_ID"))
    sub = good["subtiles"]
    assert check_run_consistency(src, sub).passed
    newer = src.with_columns(
        pl.when(pl.col("TILE_ID") == T2).then(pl.lit("run-b")).otherwise("RUN_ID").alias("RUN_ID")
    )
    out = check_run_consistency(newer, sub)
    assert not out.passed and out.metadata["tiles"] == [T2]
    missing_row = sub.filter(
        ~((pl.col("TILE_ID") == T1) & (pl.col("SUBTILE_ROW") == 0) & (pl.col("SUBTILE_COL") == 0))
    )
    assert not check_run_consistency(src, missing_row).passed


def test_missing_columns_fail_with_a_message(good):
    out = check_unique_object_ids(good["sources"].drop("OBJECT_ID"))
    assert not out.passed and "OBJECT_ID" in out.message


def test_measurement_checks(good, tmp_path):
    from constellation_assets.config import load_config
    from constellation_assets.quality import measurement_checks

    cfg = load_config(None)
    t1_uris = [u for u in good["uris"] if "/102044185_" in u]
    out = {o.name: o for o in measurement_checks(cfg, T1, t1_uris)}
    assert set(out) == {"results_complete", "finite_shear", "positive_responses"}
    assert all(o.passed for o in out.values()), {k: o.message for k, o in out.items()}
    out = {o.name: o for o in measurement_checks(cfg, T1, t1_uris[1:])}
    assert not out["results_complete"].passed and out["results_complete"].metadata["missing"] == [[0, 0]]
    assert out["finite_shear"].passed
    broken = tmp_path / "102044185_0_0.parquet"
    broken.write_bytes(b"PAR1 not really")
    out = {o.name: o for o in measurement_checks(cfg, T1, [str(broken), *t1_uris[1:]])}
    assert not out["results_complete"].passed and "102044185_0_0.parquet" in out["results_complete"].message
    assert not out["finite_shear"].passed  # could not be evaluated: must not look green


def test_subtile_row_count_follows_the_configured_grid(good):
    from constellation_assets.quality import Tiling

    # the same 16-row tiles read as an 8 x 8 grid are incomplete; as the default 4 x 4 grid they are complete
    fine = run_checks(
        good["sources"], good["subtiles"], expected=128, tiling=Tiling(grid=(8, 8)), geometry=False
    )
    count = next(o for o in fine if o.name == "subtile_row_count")
    assert not count.passed and "64 sub-tiles" in count.message
    default = run_checks(good["sources"], good["subtiles"], expected=32, tiling=Tiling(), geometry=False)
    assert next(o for o in default if o.name == "subtile_row_count").passed


# ----------------------------------------------------------------------------- stored-output checks


def test_tile_checks_on_missing_outputs_fail_and_name_the_file(tmp_path):
    from constellation_assets.config import load_config
    from constellation_assets.quality import prepared_tile_outcomes, shear_measurement_outcomes

    cfg = load_config({"output": {"root_uri": str(tmp_path / "out")}})
    out = {o.name: o for o in prepared_tile_outcomes(cfg, T1)}
    assert set(out) == {
        "unique_object_id",
        "sources_in_core",
        "shear_grade",
        "quadrants_found",
        "manifest_count",
        "core_membership",
    }
    assert not any(o.passed for o in out.values())
    assert "tile_sources.parquet not found" in out["unique_object_id"].message
    assert out["manifest_count"].metadata == {"n_manifests": 0, "n_expected": 16}
    meas = {o.name: o for o in shear_measurement_outcomes(cfg, T1)}
    assert (
        not meas["results_complete"].passed
        and "16 sub-tile result(s) missing" in meas["results_complete"].message
    )


def test_calibration_outcomes_against_requirement():
    from constellation_assets.quality.calibration import calibration_outcomes

    ok = {
        "m1": 1e-3,
        "m1_err": 5e-4,
        "m2": -1.5e-3,
        "m2_err": 5e-4,
        "c1": 1e-4,
        "c1_err": 1e-4,
        "c2": 0.0,
        "c2_err": 1e-4,
    }
    m, c = calibration_outcomes(ok, 2e-3, 5e-4)
    assert m.passed and c.passed and m.severity == "warn"
    m, c = calibration_outcomes({**ok, "m2": -3e-3, "c1": 6e-4}, 2e-3, 5e-4)
    assert not m.passed and "3.00e-03" in m.message and not c.passed


def test_stamps_outcome_catches_each_problem():
    import pyarrow as pa

    from constellation_assets.quality.simulations import stamps_outcome

    table = pa.table({"task_id": [1, 2, 3], "cosmos_index": pa.array([4, None, 6], pa.int64())})
    good = {"VIS": np.zeros((3, 8, 8), np.float32)}
    o = stamps_outcome("sersic", "train", 0, 3, pa.table({"task_id": [1, 2, 3]}), good)
    assert o.passed, o.message
    bad = {"VIS": np.full((3, 8, 8), np.nan, np.float32)}
    o = stamps_outcome("cosmos", "train", 0, 4, table.set_column(0, "task_id", pa.array([1, 1, 3])), bad)
    assert not o.passed
    for part in ("3 rows, 4 tasks planned", "duplicate task_id", "non-finite pixels", "without cosmos_index"):
        assert part in o.message
