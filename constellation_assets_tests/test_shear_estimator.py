"""FPFS kernel: analytic moments, responses, recentring, noise covariance, API contract."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
import torch

from constellation_assets.shear import ensemble_shear, measure_stamps
from constellation_assets.shear.fpfs import FLAG_NONFINITE_INPUT

PIXEL_SCALE_ARCSEC = 0.1
NPIX = 48
SIGMA_ARCSEC = 0.25


def _draw(obj, offset=(0.0, 0.0), npix=NPIX):
    return obj.drawImage(
        nx=npix, ny=npix, scale=PIXEL_SCALE_ARCSEC, use_true_center=False, offset=offset
    ).array.astype(np.float64)


@pytest.fixture(scope="module")
def gauss_psf():
    psf = galsim.Gaussian(fwhm=0.3)
    return psf, _draw(psf)


def _analytic_gaussian(sigma_gal_arcsec, g1, g2, sigma_arcsec):
    """e1, e2, R11, R22 of a pre-PSF elliptical Gaussian: Gaussian integrals over k, C = 0."""
    gg = np.hypot(g1, g2)
    a = np.array([[1 + g1, g2], [g2, 1 - g1]]) / np.sqrt(1 - gg**2)
    cov_real = sigma_gal_arcsec**2 * a @ a.T
    s = np.linalg.inv(cov_real + sigma_arcsec**2 * np.eye(2))  # <k k^T> under the weighted Gaussian
    e1 = -(sigma_arcsec**2) * (s[0, 0] - s[1, 1])
    e2 = -2 * sigma_arcsec**2 * s[0, 1]
    ek2 = s[0, 0] + s[1, 1]
    eq1 = 3 * s[0, 0] ** 2 + 3 * s[1, 1] ** 2 - 2 * (s[0, 0] * s[1, 1] + 2 * s[0, 1] ** 2)
    eq2 = 4 * (s[0, 0] * s[1, 1] + 2 * s[0, 1] ** 2)
    r11 = 2 * sigma_arcsec**2 * ek2 - sigma_arcsec**4 * eq1 + e1**2
    r22 = 2 * sigma_arcsec**2 * ek2 - sigma_arcsec**4 * eq2 + e2**2
    return e1, e2, r11, r22


@pytest.mark.parametrize("g1,g2", [(0.2, -0.1), (-0.05, 0.3), (0.0, 0.0)])
def test_elliptical_gaussian_matches_analytic(gauss_psf, g1, g2):
    psf, psf_img = gauss_psf
    sigma_gal = 0.3
    img = _draw(galsim.Convolve(galsim.Gaussian(sigma=sigma_gal).shear(g1=g1, g2=g2), psf))
    cat = measure_stamps(img[None], psf_img, PIXEL_SCALE_ARCSEC, sigma_arcsec=SIGMA_ARCSEC, c_ratio=0.0)
    e1, e2, r11, r22 = _analytic_gaussian(sigma_gal, g1, g2, SIGMA_ARCSEC)
    assert cat["e1"][0] == pytest.approx(e1, abs=2e-6)
    assert cat["e2"][0] == pytest.approx(e2, abs=2e-6)
    assert cat["r11"][0] == pytest.approx(r11, rel=2e-5)
    assert cat["r22"][0] == pytest.approx(r22, rel=2e-5)
    assert cat["flags"][0] == 0 and cat["weight"][0] == 1.0


def test_response_equals_finite_difference_of_applied_shear():
    """R is de/dg for a shear applied to the pre-PSF galaxy (Sersic galaxy, Moffat PSF)."""
    psf = galsim.Moffat(beta=2.5, fwhm=0.17)
    psf_img = _draw(psf)
    gal = galsim.Sersic(n=1.5, half_light_radius=0.3).shear(g1=0.15, g2=0.1)
    dg = 2e-3
    stamps = [_draw(galsim.Convolve(gal, psf))]
    for g1, g2 in ((dg, 0), (-dg, 0), (0, dg), (0, -dg)):
        stamps.append(_draw(galsim.Convolve(gal.shear(g1=g1, g2=g2), psf)))
    cat = measure_stamps(np.array(stamps), psf_img, PIXEL_SCALE_ARCSEC)
    fd_r11 = (cat["e1"][1] - cat["e1"][2]) / (2 * dg)
    fd_r22 = (cat["e2"][3] - cat["e2"][4]) / (2 * dg)
    assert fd_r11 == pytest.approx(cat["r11"][0], rel=1e-3)
    assert fd_r22 == pytest.approx(cat["r22"][0], rel=1e-3)


def test_shear_sign_convention(gauss_psf):
    """A galaxy stretched along x (g1 > 0) has e1 > 0; along the diagonal, e2 > 0."""
    psf, psf_img = gauss_psf
    imgs = np.array(
        [
            _draw(galsim.Convolve(galsim.Gaussian(sigma=0.3).shear(g1=g1, g2=g2), psf))
            for g1, g2 in ((0.1, 0), (0, 0.1))
        ]
    )
    cat = measure_stamps(imgs, psf_img, PIXEL_SCALE_ARCSEC, precision="float64")
    assert cat["e1"][0] > 0.02 and abs(cat["e2"][0]) < 1e-9
    assert cat["e2"][1] > 0.02 and abs(cat["e1"][1]) < 1e-9


def test_offsets_recentre_the_measurement(gauss_psf):
    psf, psf_img = gauss_psf
    gal = galsim.Convolve(galsim.Exponential(half_light_radius=0.35).shear(g1=0.1, g2=-0.2), psf)
    offsets = np.array([[0.0, 0.0], [0.3, -0.4], [-0.5, 0.5], [2.0, 1.0]])
    imgs = np.array([_draw(gal, tuple(o)) for o in offsets])
    cat = measure_stamps(imgs, psf_img, PIXEL_SCALE_ARCSEC, offsets_pix=offsets)
    np.testing.assert_allclose(cat["e1"], cat["e1"][0], atol=2e-5)
    np.testing.assert_allclose(cat["e2"], cat["e2"][0], atol=2e-5)
    np.testing.assert_allclose(cat["r11"], cat["r11"][0], rtol=2e-5)
    # Without the offsets the shifted stamps measure something else.
    wrong = measure_stamps(imgs, psf_img, PIXEL_SCALE_ARCSEC)
    assert abs(wrong["e1"][3] - cat["e1"][0]) > 1e-3


def test_noise_covariance_matches_monte_carlo(gauss_psf):
    """snr = M00 / sigma(M00): on pure-noise stamps it must have unit variance."""
    _, psf_img = gauss_psf
    rng = np.random.Generator(np.random.PCG64(7))
    noise = rng.normal(0.0, 2.5, size=(3000, NPIX, NPIX))
    cat = measure_stamps(noise, psf_img, PIXEL_SCALE_ARCSEC, noise_sigma=2.5, c_ratio=1e6)
    assert np.std(cat["snr"]) == pytest.approx(1.0, abs=0.05)
    assert abs(np.mean(cat["snr"])) < 0.1


def test_noise_bias_correction_reduces_bias(gauss_psf):
    """Low-S/N ratio bias of e and R is removed to second order (same galaxy, many noise fields)."""
    psf, psf_img = gauss_psf
    clean = _draw(galsim.Convolve(galsim.Gaussian(sigma=0.25, flux=1.0).shear(g1=0.3, g2=0.0), psf))
    cov_probe = measure_stamps(clean[None], psf_img, PIXEL_SCALE_ARCSEC, noise_sigma=1.0)
    scale = 12.0 / cov_probe["snr"][0]  # flux giving FPFS S/N ~ 12
    rng = np.random.Generator(np.random.PCG64(11))
    noise = rng.normal(0.0, 1.0, size=(1500, NPIX, NPIX))
    imgs = clean[None] * scale + noise
    imgs = np.concatenate([imgs, clean[None] * scale - noise])  # antithetic: odd noise terms cancel
    kw = dict(pixel_scale_arcsec=PIXEL_SCALE_ARCSEC, noise_sigma=1.0)
    # Noiseless values with the same C (no correction: there is no noise in this stamp).
    ref = measure_stamps(clean[None] * scale, psf_img, noise_bias_correction=False, **kw)
    corrected = measure_stamps(imgs, psf_img, **kw)
    raw = measure_stamps(imgs, psf_img, noise_bias_correction=False, **kw)
    bias_raw = raw["e1"].mean() - ref["e1"][0]
    bias_corr = corrected["e1"].mean() - ref["e1"][0]
    rbias_raw = raw["r11"].mean() - ref["r11"][0]
    rbias_corr = corrected["r11"].mean() - ref["r11"][0]
    assert abs(bias_raw) > 5e-4 and abs(rbias_raw) > 2e-3  # the bias is there to be removed
    assert abs(bias_corr) < 0.25 * abs(bias_raw)
    assert abs(rbias_corr) < 0.25 * abs(rbias_raw)


def test_batching_precision_device_and_psf_forms_agree(gauss_psf):
    psf, psf_img = gauss_psf
    rng = np.random.Generator(np.random.PCG64(3))
    imgs = np.array(
        [
            _draw(
                galsim.Convolve(
                    galsim.Exponential(half_light_radius=0.3, flux=50).shear(
                        g1=rng.uniform(-0.3, 0.3), g2=rng.uniform(-0.3, 0.3)
                    ),
                    psf,
                )
            )
            for _ in range(7)
        ]
    ) + rng.normal(0, 0.05, size=(7, NPIX, NPIX))
    base = measure_stamps(imgs, psf_img, noise_sigma=0.05, precision="float64")
    per_stamp_psf = measure_stamps(
        imgs, np.repeat(psf_img[None] * 3.0, 7, axis=0), noise_sigma=0.05, batch_size=3, precision="float64"
    )
    as_tensor = measure_stamps(
        torch.as_tensor(imgs, dtype=torch.float32),
        torch.as_tensor(psf_img),
        noise_sigma=np.full(7, 0.05),
        precision="float32",
        batch_size=2,
    )
    for key in ("e1", "e2", "r11", "r22", "snr"):
        np.testing.assert_allclose(per_stamp_psf[key], base[key], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(as_tensor[key], base[key], rtol=1e-4, atol=1e-5)
    assert set(base) >= {"e1", "e2", "r11", "r22", "weight", "flags", "snr"}
    assert all(v.shape == (7,) for v in base.values())


def test_bad_inputs_are_flagged_or_rejected(gauss_psf):
    _, psf_img = gauss_psf
    imgs = np.zeros((3, NPIX, NPIX))
    imgs[:, NPIX // 2, NPIX // 2] = 1.0
    imgs[1, 0, 0] = np.nan
    cat = measure_stamps(imgs, psf_img)
    assert cat["flags"][1] & FLAG_NONFINITE_INPUT and cat["weight"][1] == 0.0
    assert cat["flags"][0] == 0
    with pytest.raises(ValueError, match="psf must have shape"):
        measure_stamps(imgs, psf_img[:-2])
    with pytest.raises(ValueError, match="offsets_pix"):
        measure_stamps(imgs, psf_img, offsets_pix=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="noise_sigma"):
        measure_stamps(imgs, psf_img, noise_sigma=-1.0)
    with pytest.raises(ValueError, match="precision"):
        measure_stamps(imgs, psf_img, precision="float16")


def test_selection_response_only_near_the_cut(gauss_psf):
    psf, psf_img = gauss_psf
    rng = np.random.Generator(np.random.PCG64(5))
    gal = _draw(galsim.Convolve(galsim.Exponential(half_light_radius=0.3).shear(g1=0.2), psf))
    probe = measure_stamps(gal[None], psf_img, noise_sigma=1.0)
    fluxes = np.linspace(5, 20, 200) / probe["snr"][0]
    imgs = gal[None] * fluxes[:, None, None] + rng.normal(0, 1.0, (200, NPIX, NPIX))
    cat = measure_stamps(imgs, psf_img, noise_sigma=1.0, snr_min=10.0, selection_bin_width=1.0)
    cut = cat["snr"] < 10.0
    assert np.all(cat["weight"][cut] == 0) and np.all(cat["weight"][~cut] == 1)
    near = (cat["snr"] >= 10.0) & (cat["snr"] < 11.0)
    assert np.all(cat["r11_sel"][~near] == 0) and np.any(cat["r11_sel"][near] != 0)
    np.testing.assert_allclose(cat["r11"], cat["r11_shape"] + cat["r11_sel"])


def test_ensemble_shear_ratio_and_jackknife():
    rng = np.random.Generator(np.random.PCG64(1))
    n = 4000
    r = rng.uniform(0.5, 1.0, n)
    cat = {
        "e1": 0.03 * r + rng.normal(0, 0.2, n),
        "e2": -0.01 * r + rng.normal(0, 0.2, n),
        "r11": r,
        "r22": r,
        "weight": np.ones(n),
    }
    g1, g2, g1_err, g2_err = ensemble_shear(cat)
    assert g1 == pytest.approx(cat["e1"].sum() / r.sum())
    expected_err = 0.2 / np.sqrt(n) / r.mean()
    assert g1_err == pytest.approx(expected_err, rel=0.3)
    assert g2_err == pytest.approx(expected_err, rel=0.3)
    assert abs(g1 - 0.03) < 4 * g1_err and abs(g2 + 0.01) < 4 * g2_err
    cat["weight"][:] = 0.0
    assert all(np.isnan(v) for v in ensemble_shear(cat))
