"""Shear response to PSF-model errors on the calibration sims: leakage alpha and dm/d(dT/T)."""

from __future__ import annotations

import numpy as np
import pytest

from constellation_assets.shear.calibration import _draw, make_psf, render_galaxy_quad, settings_from
from constellation_assets.shear.fpfs import measure_stamps
from constellation_assets.shear.psf_errors import model_psf_stamp, run_psf_error_response

KW = dict(n_galaxies=64, stamp_size_pix=48, psf_fwhm_arcsec=0.17, moffat_beta=2.5, seed=7)


@pytest.fixture(scope="module")
def moffat():
    return run_psf_error_response(psf_model="moffat", **KW)


def test_response_signs_and_symmetry(moffat):
    r = moffat
    # An elongated model over-corrects: galaxies appear elongated the other way (c = alpha dg, alpha < 0);
    # an over-sized model over-corrects the smearing (m = beta dT/T, beta > 0); magnitudes ~ T_PSF / T_gal.
    assert -0.6 < r.alpha1 < -0.15 and -0.6 < r.alpha2 < -0.15
    assert 0.1 < r.dm_dsize < 0.5
    assert r.alpha1_err > 0 and r.dm_dsize_err > 0
    # Round PSF: both components alike, no cross leakage, no additive response to size.
    assert abs(r.alpha1 - r.alpha2) < 4 * np.hypot(r.alpha1_err, r.alpha2_err)
    assert abs(r.alpha12) < 4 * r.alpha12_err + 5e-3 and abs(r.alpha21) < 4 * r.alpha21_err + 5e-3
    assert abs(r.dc1_dsize) < 1e-4 and abs(r.dc2_dsize) < 1e-4
    assert abs(r.m_true_model) < 3e-3
    assert r.dg_psf_max == pytest.approx(5e-4 / max(abs(r.alpha1), abs(r.alpha2)))
    assert r.size_error_max == pytest.approx(2e-3 / abs(r.dm_dsize))


def test_linear_in_model_error(moffat):
    """c from one model with a small dg, measured directly, equals alpha * dg (the response is linear)."""
    s = settings_from(None, psf_model="moffat", **KW)
    psf = make_psf(s)
    quads = [render_galaxy_quad(s, i, psf, True) for i in range(s.n_galaxies)]
    images = np.concatenate([q[0] for q in quads])
    offsets = np.concatenate([q[1] for q in quads])
    dg = 0.004
    kw = dict(pixel_scale_arcsec=0.1, offsets_pix=offsets, snr_min=0.0)
    c = {}
    for key, model in (("true", _draw(psf, s) / _draw(psf, s).sum()), ("pert", model_psf_stamp(s, dg1=dg))):
        cat = measure_stamps(images, model, **kw)
        c[key] = (cat["weight"] * cat["e1"]).sum() / (cat["weight"] * cat["r11"]).sum()
    assert c["pert"] - c["true"] == pytest.approx(
        moffat.alpha1 * dg, rel=0.05, abs=3 * moffat.alpha1_err * dg
    )


def test_airy_gaussian_and_bad_input():
    r = run_psf_error_response(psf_model="airy_gaussian", **KW)
    assert -0.6 < r.alpha1 < -0.1 and 0.05 < r.dm_dsize < 0.5
    with pytest.raises(ValueError, match="noiseless"):
        run_psf_error_response(noise_sigma=1.0, **KW)
    with pytest.raises(ValueError, match="dg_psf"):
        run_psf_error_response(dg_psf=0.0, **KW)
