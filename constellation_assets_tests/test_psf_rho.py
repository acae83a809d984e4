"""rho statistics of the PSF model against stars on small synthetic fields with and without a model error."""

from __future__ import annotations

import numpy as np
import pytest

from constellation_assets import synthetic as S
from constellation_assets.quality.psf import rho_statistics, select_psf_stars, star_moments, tile_psf_rho
from constellation_assets.synthetic.psf import effective_psf_stamps, field_psf
from constellation_assets_tests.q1_testdata import TILE, small_config

#: Many bright, unsaturated stars and few galaxies: ~150 PSF stars in 8 quadrants x 2 dithers.
STAR_FIELD = {
    "star_density_arcmin2": 150.0,
    "star_mag_min": 18.0,
    "star_mag_max": 21.5,
    "galaxy_density_arcmin2": 10.0,
    "write_mer_mosaics": False,
}
E1_ERROR = 0.02


@pytest.fixture(scope="module")
def rho_fields(tmp_path_factory):
    out = {}
    for name, e1 in (("exact", 0.0), ("e1", E1_ERROR)):
        cfg = small_config(
            tmp_path_factory.mktemp(f"psf_{name}"), field={**STAR_FIELD, "psf_model_e1_error": e1}
        )
        S.simulate_field(cfg)
        out[name] = tile_psf_rho(cfg, TILE, min_sep_arcsec=1.0, max_sep_arcsec=60.0, n_bins=4)
        out[f"{name}_cfg"] = cfg
    return out


def _pad(a: np.ndarray, size: int = 32) -> np.ndarray:
    out = np.zeros((size, size))
    c, h = size // 2, a.shape[0] // 2
    out[c - h : c + h + 1, c - h : c + h + 1] = a
    return out


def test_star_moments_phase_unbiased():
    """A star at random sub-pixel phases against the native model shifted there: no size or shape bias."""
    model = _pad(effective_psf_stamps(0.17, 0.01, 0.0, 0.1, normalize="total")[0])
    psf = field_psf(0.17, 0.01, 0.0)
    rng = np.random.default_rng(3)
    r = []
    for _ in range(40):
        dx, dy = rng.uniform(-0.5, 0.5, 2)
        star = psf.drawImage(nx=32, ny=32, scale=0.1, use_true_center=False, offset=(dx, dy)).array
        m = star_moments(star, model)
        assert abs(m["dx"] - dx) < 0.05 and abs(m["dy"] - dy) < 0.05
        r.append([m["g1_model"] - m["g1_star"], (m["T_model"] - m["T_star"]) / m["T_model"]])
    de1, dt = np.mean(r, axis=0)
    assert abs(de1) < 1e-4 and abs(dt) < 2e-3


def test_rho_exact_model_consistent_with_zero(rho_fields):
    rho, res = rho_fields["exact"]
    assert rho.n_stars > 100 and rho.n_patches >= 8
    assert abs(rho.mean_de1) < 4 * rho.mean_de1_err + 1e-4
    assert abs(rho.mean_de2) < 4 * rho.mean_de2_err + 1e-4
    assert abs(rho.mean_dT_over_T) < 3e-3  # sampling floor of the moments ~ -1e-3
    r1, e1 = np.array(rho.rho["rho1"]), np.array(rho.rho_err["rho1"])
    assert np.all(np.abs(r1) < 4 * e1 + 1e-6)
    assert np.all(np.isfinite(e1)) and np.all(e1 > 0)


def test_rho_model_e1_error(rho_fields):
    rho, res = rho_fields["e1"]
    exact, _ = rho_fields["exact"]
    # Reference: the same moments of the field-centre PSF with and without the model error.
    truth = _pad(effective_psf_stamps(0.17, 0.0, 0.0, 0.1, normalize="total", size=31)[0])
    model = _pad(effective_psf_stamps(0.17, 0.0, 0.0, 0.1, normalize="total", e1_error=E1_ERROR)[0])
    m = star_moments(truth, model)
    ref = m["g1_model"] - m["g1_star"]
    assert 0.01 < ref < 0.02
    assert abs(rho.mean_de1 - ref) < 4 * rho.mean_de1_err + 0.1 * ref
    assert abs(rho.mean_de2) < 4 * rho.mean_de2_err + 1e-4
    # rho1 at small separations ~ de1^2 > 0, far above the exact-model value.
    r1, e1 = rho.rho["rho1"][0], rho.rho_err["rho1"][0]
    assert r1 > 5 * e1 and abs(r1 - rho.mean_de1**2) < 0.2 * rho.mean_de1**2 + 3 * e1
    assert r1 > 20 * abs(exact.rho["rho1"][0])
    # The same stars: the error of the model does not change the star side.
    assert np.allclose(res["g1_star"], rho_fields["exact"][1]["g1_star"], atol=1e-9)


def test_psf_cli(rho_fields, tmp_path):
    """`constellation psf rho` on the field with the model error; `psf errors` on a few galaxies."""
    import json

    import yaml
    from click.testing import CliRunner

    from constellation_assets.cli import main

    path = tmp_path / "field.yaml"
    path.write_text(yaml.safe_dump(rho_fields["e1_cfg"].to_dict()))
    runner = CliRunner()
    args = [
        "psf",
        "rho",
        "--config",
        str(path),
        "--min-sep-arcsec",
        "1",
        "--max-sep-arcsec",
        "60",
        "--n-bins",
        "4",
    ]
    res = runner.invoke(main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    (got,) = json.loads(res.stdout[res.stdout.index("[") :])
    assert got["mean_de1"] == pytest.approx(rho_fields["e1"][0].mean_de1)
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "rho1" in res.stdout and "mean de1" in res.stdout
    res = runner.invoke(main, [*args, "--snr-min", "1e9"])
    assert res.exit_code == 1 and "PSF star" in res.output

    res = runner.invoke(main, ["psf", "errors", "--json", "--n-galaxies", "8", "--stamp-size-pix", "32"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{") :])
    assert data["alpha1"] < 0 < data["dm_dsize"] and data["dg_psf_max"] > 0
    res = runner.invoke(main, ["psf", "errors", "--n-galaxies", "8", "--stamp-size-pix", "32"])
    assert res.exit_code == 0 and "dm/d(dT/T)" in res.stdout
    res = runner.invoke(main, ["psf", "errors", "--n-galaxies", "8", "--dg-psf", "0"])
    assert res.exit_code == 1 and "dg_psf" in res.output


def test_rho_bad_input():
    with pytest.raises(ValueError, match="rho statistics need"):
        rho_statistics({k: np.zeros(1) for k in ("object_id", "ra_deg", "dec_deg", "patch", "g1_star",
                        "g2_star", "g1_model", "g2_model", "T_star", "T_model")})  # fmt: skip
    with pytest.raises(KeyError, match="POINT_LIKE_FLAG"):
        select_psf_stars({"SNR_DETECTION": np.ones(2)})
