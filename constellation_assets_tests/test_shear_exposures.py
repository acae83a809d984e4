"""Exposures combined at the moment level: sky-frame transform of the moments, inverse-variance
combination, one selection/response per source."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from constellation_assets.shear import fpfs
from constellation_assets.shear import stamps as st

SCALE = 0.1
NPIX = 48


def _moments(obj, psf, noise=0.0):
    img = obj.drawImage(nx=NPIX, ny=NPIX, scale=SCALE, use_true_center=False).array
    psf_img = psf.drawImage(nx=NPIX, ny=NPIX, scale=SCALE, use_true_center=False).array
    out = fpfs.measure_stamps(
        img[None], psf_img, SCALE, noise_sigma=noise, return_moments=True, return_covariance=True,
        precision="float64",
    )  # fmt: skip
    return np.stack([out[k] for k in fpfs.MOMENT_NAMES], axis=1), out["cov"]


def _frame(parity=1.0, theta=0.0, g1=0.0, g2=0.0):
    return {k: np.array([v]) for k, v in dict(parity=parity, theta=theta, gamma1=g1, gamma2=g2).items()}


@pytest.mark.parametrize("theta_deg", [0.0, 30.0, 45.0, 110.0])
def test_rotated_and_mirrored_exposures_give_the_sky_moments(theta_deg):
    """A pixel frame rotated by -theta (and mirrored) measures moments that map back to the sky ones."""
    psf = galsim.Gaussian(fwhm=0.17)
    gal = galsim.Convolve(galsim.Exponential(half_light_radius=0.3).shear(g1=0.2, g2=-0.1), psf)
    sky, _ = _moments(gal, psf)
    theta = np.radians(theta_deg)
    pix, _ = _moments(gal.rotate(-theta * galsim.radians), psf)
    got, _ = st.moments_to_sky_frame(pix, np.zeros((1, 6, 6)), _frame(theta=theta))
    np.testing.assert_allclose(got / sky[0, 0], sky / sky[0, 0], atol=2e-5)
    if theta_deg:
        assert np.abs(pix - sky)[0, 1:].max() / sky[0, 0] > 1e-2
    # Mirrored detector (parity -1: x -> -x of the rotated frame): parity first, then the rotation.
    pix_m, _ = _moments(gal.transform(-1.0, 0.0, 0.0, 1.0).rotate(theta * galsim.radians), psf)
    got_m, _ = st.moments_to_sky_frame(pix_m, np.zeros((1, 6, 6)), _frame(parity=-1.0, theta=theta))
    np.testing.assert_allclose(got_m / sky[0, 0], sky / sky[0, 0], atol=2e-5)


def test_distortion_is_removed_to_first_order():
    psf = galsim.Gaussian(fwhm=0.17)
    gal0 = galsim.Exponential(half_light_radius=0.3).shear(g1=0.2, g2=-0.1)
    sky, _ = _moments(galsim.Convolve(gal0, psf), psf)
    g1, g2 = 3e-3, -2e-3
    pix, _ = _moments(galsim.Convolve(gal0.shear(g1=-g1, g2=-g2), psf), psf)
    got, _ = st.moments_to_sky_frame(pix, np.zeros((1, 6, 6)), _frame(g1=g1, g2=g2))
    err_before = np.abs(pix - sky)[0, :3].max() / sky[0, 0]
    err_after = np.abs(got - sky)[0, :3].max() / sky[0, 0]
    assert err_after < 0.02 * err_before


def test_covariance_transforms_like_the_moments():
    """Cov of sky-frame moments = T Cov T^T: checked against pure-noise stamps measured and rotated."""
    psf = galsim.Moffat(beta=2.5, fwhm=0.17)
    psf_img = psf.drawImage(nx=NPIX, ny=NPIX, scale=SCALE, use_true_center=False).array
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 1.0, (4000, NPIX, NPIX))
    out = fpfs.measure_stamps(
        noise, psf_img, SCALE, noise_sigma=1.0, return_moments=True, return_covariance=True
    )
    mom = np.stack([out[k] for k in fpfs.MOMENT_NAMES], axis=1)
    n = len(mom)
    frame = {
        "parity": -np.ones(n),
        "theta": np.full(n, 0.4),
        "gamma1": np.full(n, 0.01),
        "gamma2": np.zeros(n),
    }
    sky, cov = st.moments_to_sky_frame(mom, out["cov"], frame)
    mc = np.cov(sky.T)
    scale = np.sqrt(np.diag(cov[0]))
    np.testing.assert_allclose(mc / np.outer(scale, scale), cov[0] / np.outer(scale, scale), atol=0.06)


def test_moment_level_combination_is_inverse_variance_and_selects_once():
    # Source 0: two exposures with Var(M00) 1 and 4 (weights 4:1); source 1: one exposure below the cut
    # on its own, above it combined with a second; source 2: only a rejected stamp; source 3 uncovered.
    rng = np.random.default_rng(0)
    base = np.array([20.0, 1.0, -0.5, 30.0, 28.0, 0.3])
    cov1 = np.diag([1.0, 0.5, 0.5, 3.0, 3.0, 1.0])
    si = np.array([0, 0, 1, 1, 2])
    scale_var = np.array([1.0, 4.0, 1.0, 1.0, 1.0])
    mom = np.stack([base + rng.normal(0, 0.1, 6) for _ in si])
    mom[2, 0] = mom[3, 0] = 8.0  # S/N 8 each, 8 * sqrt(2) combined
    cov = cov1[None] * scale_var[:, None, None]
    good = np.array([True, True, True, True, False])
    covered = np.array([2, 2, 1, 0])
    out = st.combine_exposure_moments(
        4, si, mom, cov, good, usable=good, covered=covered, snr_min=10.0, selection_bin_width=2.0
    )
    m0 = (4 * mom[0] + mom[1]) / 5
    assert out["m00"][0] == pytest.approx(m0[0])
    assert out["e1"][0] == pytest.approx(-m0[1] / (m0[0] + 4.0 * np.sqrt((16 + 4) / 25)))
    assert out["snr"][0] == pytest.approx(m0[0] / np.sqrt(0.8))
    assert out["snr"][1] == pytest.approx(8.0 * np.sqrt(2.0))
    assert out["weight"][1] > 0  # selected once, on the combined S/N
    assert list(out["n_exposures"]) == [2, 2, 0, 0]
    assert out["flags"][2] == st.FLAG_CENTER_MASKED and out["weight"][2] == 0
    assert out["flags"][3] == st.FLAG_NO_COVERAGE
    single = st.combine_exposure_moments(1, np.zeros(1, int), mom[2:3], cov[2:3], good[:1], snr_min=10.0)
    assert single["weight"][0] == 0 and single["flags"][0] & fpfs.FLAG_BELOW_SNR_MIN
    # No stamps at all (every source off the manifest's quadrants).
    none = st.combine_exposure_moments(
        3, np.zeros(0, int), np.zeros((0, 6)), np.zeros((0, 6, 6)), np.zeros(0, bool)
    )
    assert np.all(none["weight"] == 0) and np.all(none["flags"] == st.FLAG_NO_COVERAGE)


def test_cubic_symmetric_fill_does_not_smooth_the_profile():
    """Masked pixels filled from the point-symmetric partner at a fractional position: the cubic value
    reproduces a smooth galaxy (median error < 1e-3 of the peak); the bilinear one is ~3x worse
    (the m it leaves: benchmarks/bench_shear_masks.py)."""
    psf = galsim.Moffat(beta=2.5, fwhm=0.17)
    rng = np.random.default_rng(2)
    n = 40
    offsets = rng.uniform(-0.5, 0.5, (n, 2))
    truth = np.stack([
        galsim.Convolve(galsim.Exponential(half_light_radius=0.25).shear(g1=0.2, g2=0.1), psf)
        .drawImage(nx=NPIX, ny=NPIX, scale=SCALE, use_true_center=False, offset=tuple(o)).array
        for o in offsets
    ])  # fmt: skip
    yy, xx = np.mgrid[0:NPIX, 0:NPIX] - NPIX // 2
    r2 = (xx[None] - offsets[:, 0, None, None]) ** 2 + (yy[None] - offsets[:, 1, None, None]) ** 2
    mask = (rng.random(truth.shape) < 0.05) & (r2 > 2.0**2) & (r2 < 8.0**2)
    damaged = np.where(mask, 0.0, truth)
    err = {}
    for method in ("bilinear", "cubic"):
        filled = st.fill_masked_symmetric(damaged, mask, offsets, method=method)
        err[method] = np.median(np.abs(filled - truth)[mask]) / truth.max()
    assert err["cubic"] < 0.5 * err["bilinear"], err
    assert err["cubic"] < 1e-3, err
    with pytest.raises(ValueError, match="method"):
        st.fill_masked_symmetric(damaged, mask, offsets, method="nearest")
