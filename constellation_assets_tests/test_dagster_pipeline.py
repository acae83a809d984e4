"""Real materializations through the Dagster assets on a tiny synthetic field (no placeholders on any path):
synthetic_field -> cosmos_bank -> lens_injections (one shard, COSMOS sources), with checks and metadata."""

import dagster as dg
import pytest
import yaml

pytestmark = pytest.mark.integration

TILE = 102044185


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-tile, one-exposure, 256x256-quadrant field config (seconds to simulate)."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = {
        "tile_ids": [TILE],
        "data": {
            "vis_base_uri": str(root / "q1" / "VIS") + "/",
            "catalog_base_uri": str(root / "q1" / "catalogs" / "MER_FINAL_CATALOG") + "/",
        },
        "output": {"root_uri": str(root / "out")},
        "field": {
            "tile_ids": [TILE],
            "n_dithers": 1,
            "ccd_grid": [1, 1],
            "quadrant_nx_pix": 256,
            "quadrant_ny_pix": 256,
            "galaxy_density_arcmin2": 150,  # every non-empty sub-tile gets many sources
            "star_density_arcmin2": 1,
        },
        "injection": {
            "source_mode": "cosmos",
            "cosmos_bank_h5": str(root / "bank" / "cosmos_bank.h5"),
            "cosmos_salt": "gen5_v1",
            "partitions": 2,
            "n_total_train_per_split": 8,
            "host_snr_min": 5,
            "host_mag_range": [15, 25],
        },
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from constellation_assets.defs.resources import ConstellationConfigResource

    with dg.instance_for_test() as instance:
        yield {
            "instance": instance,
            "resources": {"pipeline_config": ConstellationConfigResource(config_path=str(path))},
        }


def _md(result, key):
    return next(
        e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key.path == [key]
    )


def _checks(result):
    return {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}


def test_field_bank_and_injection_shard(tiny, cosmos_dir):
    from constellation_assets.defs.partitions import register_injection_shards
    from constellation_assets.defs.simulations import (
        cosmos_bank,
        cosmos_bank_valid,
        lens_injection_checks,
        lens_injections,
        synthetic_field,
        synthetic_field_complete,
    )
    from constellation_assets.sim.injection import partition_keys

    inst, res = tiny["instance"], tiny["resources"]
    r = dg.materialize([synthetic_field, synthetic_field_complete], instance=inst, resources=res)
    assert r.success
    assert _checks(r)[("synthetic_field", "field_complete")].passed
    assert _md(r, "synthetic_field")["tiles"].value[0]["tile_id"] == TILE
    assert list(inst.get_dynamic_partitions("mer_tile")) == [str(TILE)]  # the field registers its tiles

    r = dg.materialize(
        [cosmos_bank, cosmos_bank_valid],  # the check reads the stored bank, right after it is written
        instance=inst,
        resources=res,
        run_config={"ops": {"cosmos_bank": {"config": {"cosmos_dir": str(cosmos_dir)}}}},
    )
    assert r.success and _checks(r)[("cosmos_bank", "bank_valid")].passed
    md = _md(r, "cosmos_bank")
    assert md["dagster/row_count"].value > 0 and "hlr_arcsec" in {
        c.name for c in md["dagster/column_schema"].schema.columns
    }

    keys = partition_keys(res["pipeline_config"].load())
    register_injection_shards(inst, keys)
    r = dg.materialize(
        [lens_injections, lens_injection_checks], instance=inst, resources=res, partition_key=keys[0]
    )
    assert r.success
    check = _checks(r)[("lens_injections", "stamps_valid")]
    assert check.passed, check.description
    md = _md(r, "lens_injections")
    assert md["dagster/row_count"].value >= 1
    assert md["effective_config"].value["source_mode"] == "cosmos"
    assert "data:image/png;base64," in md["stamp_mosaic"].value
    assert md["stamp_mosaic_png"].value.endswith(".png")
    assert check.partition == keys[0]
    cols = {c.name for c in md["dagster/column_schema"].schema.columns}
    assert {"source_mode", "cosmos_index", "cosmos_hlr_arcsec"} <= cols


def test_calibration_job(tiny):
    from constellation_assets.defs.resources import ConstellationConfigResource
    from constellation_assets.defs.shear import shear_calibration, shear_calibration_checks

    res = {
        "pipeline_config": ConstellationConfigResource(
            config_path=tiny["resources"]["pipeline_config"].config_path,
            overrides={"calibration.n_galaxies": 8, "calibration.population": "fixed"},
        )
    }
    r = dg.materialize(
        [shear_calibration, shear_calibration_checks], instance=tiny["instance"], resources=res
    )
    assert r.success
    md = _md(r, "shear_calibration")
    assert abs(md["m1"].value) < 0.05 and md["config_hash"].value
    assert md["effective_config"].value["calibration"]["n_galaxies"] == 8
    assert "data:image/png;base64," in md["m_c_fit"].value and md["m_c_fit_png"].value.endswith(".png")
    checks = _checks(r)
    assert checks[("shear_calibration", "m_within_requirement")].passed
