"""End to end on H2's synthetic Q1 field: simulate a tiny field -> prepare one tile -> infer its 16 manifests
(through the CLI) -> results readable, every core source in exactly one sub-tile, shear consistent with truth."""

import json

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration

TILE = 102044185


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    from constellation_assets.config import load_config
    from constellation_assets.prepare import prepare_tile
    from constellation_assets.synthetic import simulate_field

    root = tmp_path_factory.mktemp("infer_field")
    d = {
        "tile_ids": [TILE],
        "data": {
            "vis_base_uri": str(root / "q1" / "VIS") + "/",
            "catalog_base_uri": str(root / "q1" / "catalogs" / "MER_FINAL_CATALOG") + "/",
        },
        "output": {"root_uri": str(root / "out")},
        "compute": {"batch_size": 64},
        "field": {
            "tile_ids": [TILE],
            "n_dithers": 2,
            "dither_offsets_arcsec": [[0.0, 0.0], [3.0, 7.0]],
            "ccd_grid": [1, 1],
            "quadrant_nx_pix": 256,
            "quadrant_ny_pix": 256,
            "galaxy_density_arcmin2": 80,
            "star_density_arcmin2": 1,
            "shear_g1": 0.1,
            "shear_g2": -0.06,
        },
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(d))
    cfg = load_config(str(path))
    simulate_field(cfg)
    prep = prepare_tile(cfg, TILE)
    return {"cfg": cfg, "path": path, "prep": prep, "root": root}


def test_field_prepare_infer_16_manifests(field):
    from click.testing import CliRunner

    from constellation_assets.catalog.schema import read_subtile_result
    from constellation_assets.cli import main
    from constellation_assets.shear import ensemble_shear

    prep = field["prep"]
    assert len(prep.manifest_uris) == 16
    res = CliRunner().invoke(main, ["infer", "--config", str(field["path"]), *prep.manifest_uris, "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.output.splitlines() if x.startswith("{")]
    assert len(rows) == 16 and all(r["status"] == "written" for r in rows)

    cols = {}
    for r in rows:
        table, summary = read_subtile_result(r["result_uri"])
        assert summary["N_SOURCES"] == r["n_measured"] and summary["config_hash"] == r["config_hash"]
        for c in table.column_names:
            cols.setdefault(c, []).append(table[c].to_numpy(zero_copy_only=False))
    cat = {c: np.concatenate(v) for c, v in cols.items()}
    core = cat["IN_CORE"]
    # Every selected source is in exactly one sub-tile core.
    core_ids = cat["OBJECT_ID"][core]
    assert len(core_ids) == len(np.unique(core_ids)) == prep.n_core
    # Covered sources are measured on 1-2 exposures; most measurements succeed.
    n_exp = cat["N_EXPOSURES"][core]
    assert n_exp.max() <= 2 and (n_exp == 2).sum() > 0
    good = core & (cat["WEIGHT"] > 0)
    assert good.sum() >= 0.8 * core.sum() and np.all(cat["FLAGS"][good] == 0)
    assert np.all(np.isfinite(cat["E1"])) and 0.2 < cat["R11"][good].mean() < 1.5  # per source R may be < 0
    # Ensemble shear of the tile agrees with the input shear (tiny field: loose, 4 sigma).
    g1, g2, e1, e2 = ensemble_shear(
        {k.lower(): cat[k][good] for k in ("E1", "E2", "R11", "R22")} | {"weight": cat["WEIGHT"][good]},
        n_blocks=20,
    )
    assert abs(g1 - 0.1) < 4 * e1 and abs(g2 + 0.06) < 4 * e2
    assert e1 < 0.05

    # Re-running is a no-op (skipped).
    again = CliRunner().invoke(
        main, ["infer", "--config", str(field["path"]), prep.manifest_uris[5], "--json"]
    )
    assert [json.loads(x)["status"] for x in again.output.splitlines() if x.startswith("{")] == ["skipped"]
