"""Truncated PSF models (Q1 PSF stamps stop at 21 x 21 native pixels): wing extension and diagnostic."""

from __future__ import annotations

import logging

import galsim
import numpy as np
import pytest

from constellation_assets.shear import fpfs, measure_stamps
from constellation_assets.shear.calibration import run_calibration, truncate_psf
from constellation_assets.shear.fpfs import PSF_BORDER_FRACTION_WARN, extend_psf_wings, psf_support_half_size

FAST = dict(stamp_size_pix=64, population="sersic", g_true=0.02, seed=11)


def test_truncated_airy_psf_bias_is_removed_by_the_fitted_wing():
    """Galaxies drawn with the full Airy x Gaussian PSF, measured with its 21 x 21 cut-out (sum < 1):
    as given, m1 shifts by ~3e-3; with the fitted power-law wing the shift is < 1e-3."""
    kw = dict(n_galaxies=24, psf_model="airy_gaussian", **FAST)
    full = run_calibration(**kw)
    cut = run_calibration(measure_psf_box_pix=21, psf_wings="none", **kw)
    ext = run_calibration(measure_psf_box_pix=21, psf_wings="extend", **kw)
    assert abs(cut.m1 - full.m1) > 2e-3  # the truncation bias is there
    assert abs(ext.m1 - full.m1) < 1e-3 and abs(ext.m2 - full.m2) < 1e-3
    assert abs(ext.m1 - full.m1) < 0.3 * abs(cut.m1 - full.m1)


def test_wing_fit_recovers_a_power_law_and_moffat_tail():
    n = 64
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    r2 = xx**2 + yy**2
    moffat = (1 + r2 / 1.5**2) ** -2.5
    cut = truncate_psf(moffat, 21)
    import torch

    t = torch.from_numpy(cut)[None]
    half = psf_support_half_size(t)
    assert half == 10
    ext, ok = extend_psf_wings(t, half)
    assert bool(ok[0])
    far = (np.maximum(abs(xx), abs(yy)) > 10) & (r2 < 30**2)
    rel = np.abs(ext[0].numpy()[far] / moffat[far] - 1)
    assert np.median(rel) < 0.05  # r^-5 tail continued from the ring at r = 7..10
    np.testing.assert_array_equal(
        ext[0].numpy()[~(np.maximum(abs(xx), abs(yy)) > 10)], cut[np.maximum(abs(xx), abs(yy)) <= 10]
    )


def test_truncated_psf_is_reported(caplog):
    psf = galsim.Moffat(beta=2.5, fwhm=0.17)
    img = psf.drawImage(nx=48, ny=48, scale=0.1, use_true_center=False).array
    gal = galsim.Convolve(galsim.Exponential(half_light_radius=0.3), psf)
    stamp = gal.drawImage(nx=48, ny=48, scale=0.1, use_true_center=False).array[None]
    full = measure_stamps(stamp, img, 0.1)
    assert full["psf_border_frac"][0] == 0.0  # PSF fills the stamp: nothing to extend or report
    fpfs._TRUNCATION_WARNED.clear()  # reported once per process and box size: start afresh
    with caplog.at_level(logging.WARNING, logger="constellation_assets.shear.fpfs"):
        cut15 = measure_stamps(stamp, truncate_psf(img, 15), 0.1)
    assert cut15["psf_border_frac"][0] > PSF_BORDER_FRACTION_WARN
    assert "PSF model truncated" in caplog.text and "15x15" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="constellation_assets.shear.fpfs"):
        again = measure_stamps(stamp, truncate_psf(img, 15), 0.1)  # the next batch of the same run
    assert again["psf_border_frac"][0] == cut15["psf_border_frac"][0] and "truncated" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="constellation_assets.shear.fpfs"):
        cut31 = measure_stamps(stamp, truncate_psf(img, 31), 0.1)
    assert 0 < cut31["psf_border_frac"][0] < PSF_BORDER_FRACTION_WARN and "truncated" not in caplog.text
    with pytest.raises(ValueError, match="psf_wings"):
        measure_stamps(stamp, img, 0.1, psf_wings="moffat")
