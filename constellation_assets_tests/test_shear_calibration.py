"""Calibration sims: ring test m and c through the production estimator, determinism, figure."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from constellation_assets.config import load_config
from constellation_assets.shear import measure_stamps
from constellation_assets.shear.calibration import (
    CalibrationResult,
    CalibrationSettings,
    calibration_figure_png,
    make_psf,
    render_galaxy_quad,
    rot90_about_centre,
    run_calibration,
    settings_from,
)

FAST = dict(stamp_size_pix=48, chunk_galaxies=64)


def test_noiseless_ring_test_recovers_shear():
    """Sersic population, Euclid-like Moffat PSF (0.17", 0.1" pixels): |m| < 3e-3, c ~ 0."""
    res = run_calibration(n_galaxies=40, population="sersic", noise_sigma=0.0, seed=3, **FAST)
    assert isinstance(res, CalibrationResult)
    for m, m_err in ((res.m1, res.m1_err), (res.m2, res.m2_err)):
        assert abs(m) < 3e-3
        assert 0 < m_err < 1e-3
    # Round PSF and 90-degree pairs: c vanishes up to rounding.
    assert abs(res.c1) < 1e-6 and abs(res.c2) < 1e-6
    assert res.n_stamps == 160
    assert set(res.to_dict()) >= {
        "m1",
        "m1_err",
        "m2",
        "m2_err",
        "c1",
        "c1_err",
        "c2",
        "c2_err",
        "n_galaxies",
    }


def test_biased_estimator_is_detected():
    """The test can fail: an estimator scale that is far too small (weight below the PSF) shows up."""
    res = run_calibration(n_galaxies=8, population="fixed", sigma_arcsec=0.06, **FAST)
    assert max(abs(res.m1), abs(res.m2)) > 3e-3


def test_anisotropic_psf_additive_bias_is_small():
    res = run_calibration(n_galaxies=16, population="sersic", psf_g1=0.05, psf_g2=-0.03, seed=1, **FAST)
    assert abs(res.c1) < 5e-4 and abs(res.c2) < 5e-4
    assert abs(res.m1) < 3e-3 and abs(res.m2) < 3e-3


def test_noisy_run_has_honest_errors():
    res = run_calibration(
        n_galaxies=24,
        population="bulge_disk",
        noise_sigma=1.0,
        n_noise_realizations=4,
        snr_min=20.0,
        snr_max=100.0,
        seed=5,
        **FAST,
    )
    assert res.n_stamps == 24 * 4 * 4
    for m, m_err in ((res.m1, res.m1_err), (res.m2, res.m2_err)):
        assert 1e-4 < m_err < 0.05
        assert abs(m) < 5 * m_err + 3e-3


def test_fpfs_snr_selection_with_its_noise_corrected_response_is_unbiased():
    """Smooth cut at FPFS S/N 10 on a population at matched-filter S/N 10-100 (~12 % of it below the cut,
    ~20 % within 10-12): the selection response with its noise term removed keeps |m| at the 1e-3 level
    (full size, 4000 galaxies x 25 noise fields: benchmarks/bench_calibration.py)."""
    res = run_calibration(
        n_galaxies=400,
        population="sersic",
        noise_sigma=1.0,
        n_noise_realizations=10,
        stamp_size_pix=32,
        snr_min=10.0,
        snr_max=100.0,
        seed=3,
        estimator_snr_min=10.0,
        selection_bin_width=2.0,
    )
    for m, m_err in ((res.m1, res.m1_err), (res.m2, res.m2_err)):
        assert m_err < 5e-3
        assert abs(m) < 3 * m_err + 1e-3


def test_exposures_combined_at_the_moment_level():
    """Four exposures per stamp at half the S/N each, combined at the moment level with the FPFS S/N cut
    applied once on the combined moments: unbiased, with the control variate still exact."""
    res = run_calibration(
        n_galaxies=120,
        population="sersic",
        noise_sigma=1.0,
        n_noise_realizations=4,
        n_exposures=4,
        stamp_size_pix=32,
        snr_min=10.0,
        snr_max=100.0,
        seed=4,
        estimator_snr_min=10.0,
    )
    assert res.n_stamps == 120 * 4 * 4
    for m, m_err in ((res.m1, res.m1_err), (res.m2, res.m2_err)):
        assert m_err < 1.5e-2
        assert abs(m) < 3 * m_err + 1e-3
    with pytest.raises(ValueError, match="exposure_combination"):
        run_calibration(n_galaxies=4, exposure_combination="coadd")


def test_control_variate_keeps_the_mean_and_shrinks_the_error():
    kw = dict(n_galaxies=24, population="sersic", noise_sigma=1.0, n_noise_realizations=4, seed=8, **FAST)
    with_cv = run_calibration(control_variate=True, **kw)
    without = run_calibration(control_variate=False, **kw)
    for comp in ("1", "2"):
        m_cv, m_raw = getattr(with_cv, "m" + comp), getattr(without, "m" + comp)
        err_cv, err_raw = getattr(with_cv, f"m{comp}_err"), getattr(without, f"m{comp}_err")
        assert err_cv < 0.5 * err_raw
        assert abs(m_cv - m_raw) < 3 * err_raw


def test_fpfs_kwargs_from_config():
    from constellation_assets.shear.fpfs import fpfs_kwargs_from_config

    cfg = load_config(None, {"shear.sigma_arcsec": 0.3, "shear.estimator_snr_min": 5.0})
    kw = fpfs_kwargs_from_config(cfg)
    assert kw["sigma_arcsec"] == 0.3 and kw["snr_min"] == 5.0 and kw["device"] == cfg.compute.device
    img = np.zeros((2, 32, 32))
    img[:, 16, 16] = 1.0
    psf = np.zeros((32, 32))
    psf[16, 16] = 1.0
    assert measure_stamps(img, psf, noise_sigma=0.1, **kw)["flags"].shape == (2,)


def test_rotated_stamp_equals_rendering_the_rotated_galaxy():
    """The 90-degree trick for symmetric PSFs is exact: compare with GalSim rendering the rotated scene."""
    settings = CalibrationSettings(population="cosmos", **FAST)
    psf = make_psf(settings)
    fast, offsets, signs, _ = render_galaxy_quad(settings, 6, psf, psf_symmetric=True)
    slow, offsets2, signs2, _ = render_galaxy_quad(settings, 6, psf, psf_symmetric=False)
    # Pixels agree to GalSim's own FFT rendering accuracy; the measured shapes agree to ~1e-8.
    np.testing.assert_allclose(fast, slow, atol=3e-3 * fast.max())
    np.testing.assert_array_equal(offsets, offsets2)
    psf_img = psf.drawImage(nx=48, ny=48, scale=0.1, use_true_center=False).array
    a = measure_stamps(fast, psf_img, offsets_pix=offsets, precision="float64")
    b = measure_stamps(slow, psf_img, offsets_pix=offsets, precision="float64")
    for key in ("e1", "e2", "r11", "r22"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)
    np.testing.assert_allclose(a["e1"][2:], -a["e1"][:2], atol=1e-9)
    assert list(signs) == [1, -1, -1, 1]


def test_rot90_about_centre_keeps_centre_pixel():
    a = np.zeros((6, 6))
    a[3, 3] = 1.0
    a[3, 5] = 2.0  # dx = +2 -> (dy, -dx) = (0, -2)... rotated to dx' = 0, dy' = -2
    r = rot90_about_centre(a)
    assert r[3, 3] == 1.0 and r[1, 3] == 2.0


def test_deterministic_and_independent_of_chunking():
    a = run_calibration(
        n_galaxies=8,
        population="fixed",
        noise_sigma=0.5,
        n_noise_realizations=2,
        stamp_size_pix=32,
        chunk_galaxies=3,
    )
    b = run_calibration(
        n_galaxies=8,
        population="fixed",
        noise_sigma=0.5,
        n_noise_realizations=2,
        stamp_size_pix=32,
        chunk_galaxies=8,
    )
    # Chunking changes only the float32 batch reductions (round-off ~1e-8 in m), never the drawn galaxies.
    assert a.m1 == pytest.approx(b.m1, abs=1e-6) and a.c2 == pytest.approx(b.c2, abs=1e-6)
    q1 = render_galaxy_quad(CalibrationSettings(seed=9), 4, galsim.Gaussian(fwhm=0.17), True)[0]
    q2 = render_galaxy_quad(
        CalibrationSettings(seed=9, n_galaxies=10_000), 4, galsim.Gaussian(fwhm=0.17), True
    )[0]
    np.testing.assert_array_equal(q1, q2)


def test_settings_from_config_and_validation():
    cfg = load_config(None, {"calibration.n_galaxies": 12, "calibration.seed": 7})
    s = settings_from(cfg, noise_sigma=0.3)
    assert s.n_galaxies == 12 and s.seed == 7 and s.noise_sigma == 0.3
    assert s.sigma_arcsec == cfg.shear.sigma_arcsec and s.moffat_beta == cfg.calibration.moffat_beta
    with pytest.raises(ValueError, match="population"):
        run_calibration(n_galaxies=8, population="elliptical")
    with pytest.raises(ValueError, match="unknown calibration settings"):
        settings_from({"n_galaxy": 3})
    with pytest.raises(ValueError, match="psf_image"):
        run_calibration(n_galaxies=8, psf_model="image")


def test_supplied_psf_image():
    settings = CalibrationSettings(psf_fwhm_arcsec=0.2, **FAST)
    psf_img = make_psf(settings).drawImage(nx=48, ny=48, scale=0.1, use_true_center=False).array
    res = run_calibration(n_galaxies=8, population="fixed", psf_model="image", psf_image=psf_img, **FAST)
    assert abs(res.m1) < 5e-3 and abs(res.m2) < 5e-3


def test_figure_png():
    res = CalibrationResult(
        1e-4, 2e-4, -1e-4, 2e-4, 1e-5, 1e-5, 0.0, 1e-5, 10, 40, 0.02, 0.02, -0.02, 0.02, -0.02, 1.0
    )
    png = calibration_figure_png(res)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
