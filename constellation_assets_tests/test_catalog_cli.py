"""`constellation assemble` and `constellation validate` end to end on a local SQLite catalog."""

from __future__ import annotations

import json

import polars as pl
import yaml
from click.testing import CliRunner

from constellation_assets.cli import main
from constellation_assets_tests.catalog_testdata import core_count, make_tile_results

T1, T2 = 102044185, 102044186


def test_assemble_and_validate(tmp_path):
    results = tmp_path / "out" / "results"
    make_tile_results(str(results), T1, g_true=(0.02, -0.01))
    make_tile_results(str(results), T2, g_true=(0.02, -0.01))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"root_uri": str(tmp_path / "out")}}))
    runner = CliRunner()

    # default RESULTS: the config's result folder; run twice (idempotent)
    for _ in range(2):
        res = runner.invoke(main, ["assemble", "--config", str(config), "--json"])
        assert res.exit_code == 0, res.output
    done = json.loads(res.stdout)
    assert {d["tile_id"]: d["n_sources"] for d in done} == {T1: core_count(T1), T2: core_count(T2)}

    truth = tmp_path / "truth.parquet"
    pl.DataFrame({"TILE_ID": [T1, T2], "G1_TRUE": [0.02, 0.02], "G2_TRUE": [-0.01, -0.01]}).write_parquet(
        truth
    )
    res = runner.invoke(
        main, ["validate", "--config", str(config), "--expected", "32", "--truth", str(truth), "--json"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["passed"] and {c["name"] for c in report["checks"]} >= {
        "subtile_row_count",
        "shear_vs_truth",
    }

    res = runner.invoke(main, ["validate", "--config", str(config), "--truth", str(truth)])
    assert res.exit_code == 0, res.output
    assert "unique_object_id" in res.stdout and "Recovered vs injected" in res.stdout

    # a missing tile: the count check fails and the command exits non-zero
    res = runner.invoke(main, ["validate", "--config", str(config), "--expected", "48"])
    assert res.exit_code == 1
    assert "FAIL" in res.stdout

    # only one tile checked
    res = runner.invoke(
        main, ["validate", "--config", str(config), "--tile", str(T1), "--expected", "16", "--json"]
    )
    assert res.exit_code == 0, res.output


def test_cli_errors_are_clear(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"root_uri": str(tmp_path / "out")}}))
    runner = CliRunner()
    res = runner.invoke(main, ["assemble", "--config", str(config), str(tmp_path / "nothing-here")])
    assert res.exit_code == 1 and "does not exist" in res.output
    res = runner.invoke(main, ["validate", "--config", str(config)])
    assert res.exit_code == 1 and "constellation assemble" in res.output


def test_validate_uses_synthetic_field_truth(tmp_path):
    results = tmp_path / "out" / "results"
    make_tile_results(str(results), T1, g_true=(0.02, -0.01))
    truth_dir = tmp_path / "truth" / str(T1)
    truth_dir.mkdir(parents=True)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output": {"root_uri": str(tmp_path / "out")},
                "field": {"truth_base_uri": str(tmp_path / "truth")},
            }
        )
    )
    runner = CliRunner()
    assert runner.invoke(main, ["assemble", "--config", str(config)]).exit_code == 0
    (truth_dir / "shear_truth.json").write_text(json.dumps({"G1_TRUE": 0.02, "G2_TRUE": -0.01}))
    res = runner.invoke(main, ["validate", "--config", str(config), "--json"])
    assert res.exit_code == 0, res.output
    check = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "shear_vs_truth")
    assert check["metadata"]["n_tiles_with_truth"] == 1 and check["severity"] == "error"
    # a truth far from what the data say makes validate fail
    (truth_dir / "shear_truth.json").write_text(json.dumps({"G1_TRUE": -0.2, "G2_TRUE": -0.01}))
    assert runner.invoke(main, ["validate", "--config", str(config)]).exit_code == 1
    assert runner.invoke(main, ["validate", "--config", str(config), "--truth", "none"]).exit_code == 0
