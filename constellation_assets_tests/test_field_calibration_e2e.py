"""`constellation calibrate --field` end to end on a small paired field (configs/field_calibration_small.yaml):
synthetic Q1-layout fields -> prepare -> stamps -> estimator -> assembly -> m, c; plus a deliberately broken
estimator (responses x 1.05) that the calibration must catch, and the Dagster asset with its checks.

Bounds: on this size (~650 isolated galaxies, ~500 with FPFS weight > 0, 4 fields: +/-g, each with noise N
and -N) the isolated-galaxy m has a jackknife error of ~0.007-0.012; with the default selection (MER S/N >= 4,
FPFS S/N >= 10 weight) the production path measured m1 = +0.010 +- 0.007, m2 = +0.018 +- 0.012 for isolated
galaxies (before the FPFS cut: +0.016 +- 0.008, +0.020 +- 0.006), so the test bound is |m| < 0.05: a 5 %
response error fails it (responses x 0.95 moves m by +0.054). Blended galaxies (neighbour < 1.5") are not used for the
bound: with shape-only shear (shear_positions: false, see configs/field_calibration_small.yaml) the response
of a blend is not the one the field applies, and their m is -0.14 / -0.32 +- 0.1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from constellation_assets.config import FieldConfig

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not {"paired_noise", "intrinsic_rotation_deg", "noise_sign"} <= set(FieldConfig.model_fields),
        reason="the field generator of this version has no paired-field keys",
    ),
]

REPO = Path(__file__).resolve().parents[1]
M_BOUND = 0.05
SCALE = 0.95  # the broken estimator's response factor


def _config(tmp: Path, **calibration) -> Path:
    d = yaml.safe_load((REPO / "configs" / "field_calibration_small.yaml").read_text())
    d["data"] = {
        "vis_base_uri": str(tmp / "base" / "q1" / "VIS") + "/",
        "catalog_base_uri": str(tmp / "base" / "q1" / "catalogs" / "MER_FINAL_CATALOG") + "/",
    }
    d["output"] = {"root_uri": str(tmp / "out")}
    d["calibration"] = {**d["calibration"], "field_work_dir": str(tmp / "work"), **calibration}
    path = tmp / f"field_calibration_{len(list(tmp.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _isolated(res: dict) -> dict:
    return next(b for b in res["bins"] if b["variable"] == "blended" and b["bin"] == "isolated")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from constellation_assets.cli import main

    tmp = tmp_path_factory.mktemp("fieldcal")
    path = _config(tmp)
    res = CliRunner().invoke(main, ["calibrate", "--field", "--config", str(path), "--json"])
    assert res.exit_code == 0, res.output
    return {"tmp": tmp, "path": path, "json": json.loads(res.stdout[res.stdout.index("{") :])}


def test_field_calibration_through_the_production_path(calibrated):
    d = calibrated["json"]
    for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err", "n_matched", "bins", "g_true"):
        assert k in d
    assert d["g_true"] == [0.02, 0.02]
    assert set(d["fields"]) == {"plus", "minus", "plus_negnoise", "minus_negnoise"}
    # n_objects counts every MER-preselected row, also those the FPFS S/N >= 10 weight gives 0 in every field;
    # matched: weighted in all fields (the FPFS weight of objects near the cut differs between N and -N)
    n_weighted = max(f["n_measured"] for f in d["fields"].values())
    assert d["n_matched"] > 400 and d["n_matched"] >= 0.85 * n_weighted
    # the MER preselection boundary, post hoc on the same rows: no cut at or below the run's snr_min
    cuts = {(c["selection"], c["mer_snr_min"]): c for c in d["mer_cuts"]}
    assert {("all rows", 0.0), ("isolated", 10.0)} <= set(cuts)
    assert cuts[("all rows", 0.0)]["dm1"] == 0.0 and cuts[("all rows", 0.0)]["m1"] == pytest.approx(d["m1"])
    assert sum(b["n_rows"] for b in d["mer_snr_census"]) == sum(f["n_rows"] for f in d["fields"].values())
    assert d["n_subtiles"] >= 4
    # each field's catalog recovers the sign of its shear (shape noise ~0.015 per field)
    assert d["fields"]["plus"]["g1"] > 0 > d["fields"]["minus"]["g1"]
    iso = _isolated(d)
    assert iso["n_objects"] > 400
    for comp in ("m1", "m2"):
        assert 0 < iso[f"{comp}_err"] < 0.015, iso
        assert abs(iso[comp]) < M_BOUND, iso
    bins = {b["variable"] for b in d["bins"]}
    assert {"snr", "hlr_arcsec", "neighbour_arcsec", "n_exposures", "blended"} <= bins
    # every field's data and catalog lives in its own root under the work dir
    work = Path(d["work_dir"])
    assert all((work / name / "output" / "catalog.db").exists() for name in d["fields"])


def test_a_five_percent_response_error_is_caught(calibrated, tmp_path, monkeypatch):
    """The same fields re-measured with every response scaled by 0.95 (a broken estimator)."""
    import constellation_assets.shear as shear_pkg
    from constellation_assets.config import load_config
    from constellation_assets.shear import fpfs
    from constellation_assets.shear.field_calibration import run_field_calibration

    real = shear_pkg.measure_stamps

    def broken(*args, **kwargs):
        out = dict(real(*args, **kwargs))
        out["r11"] = np.asarray(out["r11"]) * SCALE
        out["r22"] = np.asarray(out["r22"]) * SCALE
        return out

    monkeypatch.setattr(shear_pkg, "measure_stamps", broken)
    # The pipeline forms e and R once per source from exposure-combined moments: scale them there too.
    real_moments = fpfs.shear_from_moments

    def broken_moments(*args, **kwargs):
        out = dict(real_moments(*args, **kwargs))
        for k in ("r11", "r22"):
            out[k] = out[k] * SCALE
        return out

    monkeypatch.setattr(fpfs, "shear_from_moments", broken_moments)
    good = calibrated["json"]
    path = _config(tmp_path)
    for name in good["fields"]:  # reuse the rendered fields; new outputs
        (tmp_path / "work" / name).mkdir(parents=True)
        os.symlink(Path(good["work_dir"]) / name / "data", tmp_path / "work" / name / "data")
    res = run_field_calibration(load_config(path), progress=False).to_dict()
    iso, iso_good = _isolated(res), _isolated(good)
    for comp in ("m1", "m2"):
        # g scales by exactly 1/0.95 (same images): m moves by (1 + m)(1/0.95 - 1) = +0.053 to +0.054
        expected = (1 + iso_good[comp]) / SCALE - 1
        assert iso[comp] == pytest.approx(expected, abs=2e-4)
        assert res[comp] == pytest.approx((1 + good[comp]) / SCALE - 1, abs=2e-3)
        assert abs(iso[comp]) > M_BOUND  # the test bound fails on the broken estimator


def test_dagster_asset_checks_and_metadata(calibrated):
    from constellation_assets.defs.calibration_field import (
        FIELD_CALIBRATION_CHECKS,
        field_calibration,
        field_calibration_checks,
        field_calibration_provenance,
    )
    from constellation_assets.defs.resources import ConstellationConfigResource

    assert all(s.blocking for s in FIELD_CALIBRATION_CHECKS)
    # same fields (up to date: reused), requirements that the measured m cannot meet -> blocked
    path = _config(calibrated["tmp"], m_requirement=1e-6, c_requirement=1e-6)
    res = {"pipeline_config": ConstellationConfigResource(config_path=str(path))}
    with dg.instance_for_test() as instance:
        assert "none" in field_calibration_provenance(instance)["field_calibration"].value
        r = dg.materialize(
            [field_calibration, field_calibration_checks],
            instance=instance,
            resources=res,
            raise_on_error=False,
        )
        (mat,) = r.get_asset_materialization_events()
        md = mat.materialization.metadata
        assert md["m1"].value == pytest.approx(calibrated["json"]["m1"], abs=1e-9)
        assert md["effective_config"].value["calibration"]["m_requirement"] == 1e-6
        assert "data:image/png;base64," in md["m_vs_bin"].value
        assert md["n_matched"].value == calibrated["json"]["n_matched"]
        checks = {e.check_name: e for e in r.get_asset_check_evaluations()}
        assert set(checks) == {"m_within_requirement", "c_within_requirement"}
        assert not checks["m_within_requirement"].passed
        assert checks["m_within_requirement"].severity == dg.AssetCheckSeverity.ERROR
        prov = field_calibration_provenance(instance)["field_calibration"].value
        assert prov["m1"] == pytest.approx(md["m1"].value) and prov["within_requirement"] is False
