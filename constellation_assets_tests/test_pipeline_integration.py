"""A reduced version of the demo: `constellation run --local` on a small synthetic field, end to end."""

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from constellation_assets_tests.q1_testdata import SMALL_FIELD, TILE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = {
        "field_name": "EDFF",
        "data": {
            "vis_base_uri": str(root / "q1" / "VIS") + "/",
            "catalog_base_uri": str(root / "q1" / "catalogs" / "MER_FINAL_CATALOG") + "/",
        },
        "output": {"root_uri": str(root / "out")},
        "compute": {"workers": 1, "batch_size": 256},
        "field": {**SMALL_FIELD, "shear_g1": 0.05, "shear_g2": -0.03},
    }
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from constellation_assets.cli import main

    res = CliRunner().invoke(main, ["run", "--config", str(path), "--local", "--json"])
    return {"root": root, "path": path, "res": res, "main": main}


def test_run_local_end_to_end(demo):
    res = demo["res"]
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{") :])
    assert out["tiles"] == [TILE]
    assert all(c["passed"] for c in out["checks"]), out["checks"]
    (row,) = out["tile_shear"]
    assert row["G1_TRUE"] == pytest.approx(0.05) and row["G2_TRUE"] == pytest.approx(-0.03)
    # recovered shear is consistent with the input within 4 sigma (and has a meaningful error bar)
    assert 0 < row["G1_ERR"] < 0.05
    assert abs(row["PULL1"]) < 4 and abs(row["PULL2"]) < 4
    for stage in ("prepare", "infer", "assemble"):
        rec = json.loads(Path(out["run_configs"][stage]).read_text())
        assert rec["execution_timestamp_utc"].endswith("Z") and len(rec["config_hash"]) == 16


def test_rerun_is_idempotent_and_queryable(demo):
    from constellation_assets.catalog.query import scan_sources, scan_subtiles
    from constellation_assets.catalog.tables import open_catalog
    from constellation_assets.config import load_config

    cfg = load_config(demo["path"])
    cat = open_catalog(cfg)
    before = scan_sources(cat).num_rows
    res = CliRunner().invoke(demo["main"], ["run", "--config", str(demo["path"]), "--local"])
    assert res.exit_code == 0, res.output
    assert scan_sources(cat).num_rows == before > 0
    assert scan_subtiles(cat).num_rows == 16
    # the catalog is queryable with Polars and DuckDB, as the README shows
    table = cat.load_table("shear.sources")
    df = pl.from_arrow(table.scan(row_filter=f"TILE_ID == {TILE}").to_arrow())
    assert df.height == before and df["OBJECT_ID"].n_unique() == before
    duck = table.scan().to_duckdb("sources")
    assert duck.execute("select count(*) from sources").fetchone()[0] == before
