"""FPFS kernel: analytic moments, responses, recentring, noise covariance, API contract."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
import torch

from constellation_assets.shear import ensemble_shear, measure_stamps
from constellation_assets.shear.fpfs import FLAG_BELOW_SNR_MIN, FLAG_NONFINITE_INPUT

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
    # Cross responses (B12 moment): de1/dg2 and de2/dg1, non-zero for this e1 e2 != 0 galaxy.
    fd_r12 = (cat["e1"][3] - cat["e1"][4]) / (2 * dg)
    fd_r21 = (cat["e2"][1] - cat["e2"][2]) / (2 * dg)
    assert abs(cat["r12"][0]) > 0.01 and abs(cat["r21"][0]) > 0.01
    assert fd_r12 == pytest.approx(cat["r12"][0], abs=1e-3 * cat["r11"][0])
    assert fd_r21 == pytest.approx(cat["r21"][0], abs=1e-3 * cat["r22"][0])


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


def _noisy_pm_shear(psf, comp, scale_snr, n_noise, seed, delta=0.01):
    """Galaxy sheared by +delta / -delta along ``comp`` with one shared set of noise fields."""
    gal = galsim.Exponential(half_light_radius=0.3).shear(g1=0.25, g2=-0.15)
    shear = (dict(g1=delta), dict(g1=-delta)) if comp == 1 else (dict(g2=delta), dict(g2=-delta))
    clean = [_draw(galsim.Convolve(gal.shear(**s), psf)) for s in shear]
    probe = measure_stamps(clean[0][None], _draw(psf), PIXEL_SCALE_ARCSEC, noise_sigma=1.0)
    scale = scale_snr / probe["snr"][0]
    noise = np.random.Generator(np.random.PCG64(seed)).normal(0.0, 1.0, size=(n_noise, NPIX, NPIX))
    noise = np.concatenate([noise, -noise])  # antithetic
    return [c[None] * scale + noise for c in clean], delta


@pytest.mark.parametrize("snr_min", [0.0, 10.0])
def test_response_is_the_derivative_of_the_noisy_mean(gauss_psf, snr_min):
    """E[weight R] equals d E[weight e] / dg (finite difference with shared noise), with and without a
    smooth selection on the measured S/N (galaxy at S/N 11, cut at 10): the noise terms of the shape and
    selection responses are removed; without the correction the selection response is ~4 % off."""
    psf, psf_img = gauss_psf
    kw = dict(
        pixel_scale_arcsec=PIXEL_SCALE_ARCSEC, noise_sigma=1.0, snr_min=snr_min, selection_bin_width=2.0
    )
    for comp in (1, 2):
        (plus, minus), delta = _noisy_pm_shear(psf, comp, 11.0, 6000, 11 + comp)
        e, r, other, rx = f"e{comp}", f"r{comp}{comp}", f"e{3 - comp}", f"r{3 - comp}{comp}"
        for correct in (True, False):
            cp = measure_stamps(plus, psf_img, noise_bias_correction=correct, **kw)
            cm = measure_stamps(minus, psf_img, noise_bias_correction=correct, **kw)
            fd = (cp["weight"] * cp[e] - cm["weight"] * cm[e]) / (2 * delta)
            d = fd - 0.5 * (cp["weight"] * cp[r] + cm["weight"] * cm[r])
            bias, err = d.mean() / fd.mean(), d.std() / np.sqrt(len(d)) / fd.mean()
            if correct:
                assert abs(bias) < 4 * err + 1e-3, (comp, bias, err)
                fdx = (cp["weight"] * cp[other] - cm["weight"] * cm[other]) / (2 * delta)
                dx = fdx - 0.5 * (cp["weight"] * cp[rx] + cm["weight"] * cm[rx])
                assert abs(dx.mean()) < 4 * dx.std() / np.sqrt(len(dx)) + 1e-3 * fd.mean()
            elif snr_min > 0:
                assert bias > 4 * err and bias > 0.02, (comp, bias, err)  # the noise term is there


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
    cut = cat["snr"] <= 10.0
    assert np.all(cat["weight"][cut] == 0) and np.all(cat["flags"][cut] & FLAG_BELOW_SNR_MIN)
    full = cat["snr"] >= 11.0
    assert np.all(cat["weight"][full] == 1)
    ramp = ~cut & ~full  # smooth step between snr_min and snr_min + width
    assert np.all((cat["weight"][ramp] > 0) & (cat["weight"][ramp] < 1))
    t = (cat["snr"][ramp] - 10.0) / 1.0
    np.testing.assert_allclose(cat["weight"][ramp], t**3 * (10 - 15 * t + 6 * t**2), rtol=1e-12)
    assert np.all(cat["r11_sel"][~ramp] == 0) and np.all(cat["r11_sel"][ramp] != 0)
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


def test_ratio_jackknife_equals_deleting_each_block():
    import math

    from constellation_assets.shear.ensemble import jackknife_blocks, ratio_jackknife

    rng = np.random.default_rng(3)
    num, den = rng.normal(1.0, 0.5, 237), rng.uniform(0.5, 1.5, 237)
    est, err = ratio_jackknife(num, den, 20)
    labels = jackknife_blocks(237, 20)
    vals = np.array([num[labels != b].sum() / den[labels != b].sum() for b in range(20)])
    assert est == pytest.approx(num.sum() / den.sum(), rel=1e-12)
    assert err == pytest.approx(math.sqrt(19 / 20 * ((vals - vals.mean()) ** 2).sum()), rel=1e-10)
    assert all(math.isnan(v) for v in ratio_jackknife(np.zeros(0), np.zeros(0)))
    assert math.isnan(ratio_jackknife(np.ones(1), np.ones(1))[1])
