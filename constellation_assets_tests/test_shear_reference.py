"""Cross-check against the reference FPFS implementation (AnaCal) on the same stamps."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from constellation_assets.shear import measure_stamps
from constellation_assets.shear.calibration import CalibrationSettings, make_psf, render_galaxy_quad

anacal_fpfs = pytest.importorskip("anacal.fpfs")


def test_shear_per_galaxy_matches_anacal():
    """With the same Gaussian scale and C = 0, e / R of each stamp equals AnaCal's (shapelet normalisation
    differs by a constant that cancels), and so does the ensemble shear."""
    settings = CalibrationSettings(stamp_size_pix=64, population="cosmos")
    psf = make_psf(settings)
    psf_img = psf.drawImage(nx=64, ny=64, scale=0.1, use_true_center=False).array
    stamps = np.concatenate([render_galaxy_quad(settings, i, psf, True)[0] for i in range(6)])
    n = len(stamps)
    mosaic = np.concatenate(list(stamps), axis=1).astype(np.float32)  # 64 x (64 n), centres on the grid
    det = np.zeros(n, dtype=[("y", "f8"), ("x", "f8")])
    det["y"] = 32
    det["x"] = np.arange(n) * 64 + 32
    task = anacal_fpfs.FpfsTask(npix=64, pixel_scale=0.1, sigma_shapelets=0.35, psf_array=psf_img)
    modes = task.run(gal_array=mosaic, psf=psf_img, det=det)["data"]
    ref = anacal_fpfs.measure_fpfs(C0=0.0, x_array=modes)
    ours = measure_stamps(stamps.astype(np.float32), psf_img, 0.1, sigma_arcsec=0.35, c_ratio=0.0)
    np.testing.assert_allclose(ours["e1"] / ours["r11"], ref["e1"] / ref["de1_dg1"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours["e2"] / ours["r22"], ref["e2"] / ref["de2_dg2"], rtol=1e-4, atol=1e-6)
    plus = np.tile([True, False, False, True], 6)  # the +g stamps of each quad
    assert ours["e1"][plus].sum() / ours["r11"][plus].sum() == pytest.approx(
        ref["e1"][plus].sum() / ref["de1_dg1"][plus].sum(), rel=1e-4
    )


def test_hsm_regauss_agrees_on_a_well_sampled_gaussian():
    """For a Gaussian galaxy and PSF, the FPFS response-corrected shape and HSM's PSF-corrected distortion
    both see the same intrinsic orientation and the same ordering of ellipticities."""
    psf = galsim.Gaussian(fwhm=0.3)
    psf_img = psf.drawImage(nx=48, ny=48, scale=0.1, use_true_center=False)
    e_in = [(0.1, 0.0), (0.0, -0.2), (0.25, 0.15)]
    imgs, hsm = [], []
    for g1, g2 in e_in:
        img = galsim.Convolve(galsim.Gaussian(sigma=0.3).shear(g1=g1, g2=g2), psf).drawImage(
            nx=48, ny=48, scale=0.1, use_true_center=False
        )
        imgs.append(img.array)
        res = galsim.hsm.EstimateShear(img, psf_img, shear_est="REGAUSS")
        hsm.append((res.corrected_e1, res.corrected_e2))
    ours = measure_stamps(np.array(imgs), psf_img.array, 0.1)
    hsm = np.array(hsm)
    true_e = (
        np.array([galsim.Shear(g1=g1, g2=g2).e1 for g1, g2 in e_in]),
        np.array([galsim.Shear(g1=g1, g2=g2).e2 for g1, g2 in e_in]),
    )
    np.testing.assert_allclose(hsm[:, 0], true_e[0], atol=5e-3)  # HSM recovers the input distortion
    np.testing.assert_allclose(hsm[:, 1], true_e[1], atol=5e-3)
    assert np.all(np.sign(ours["e1"][np.abs(true_e[0]) > 0]) == np.sign(true_e[0][np.abs(true_e[0]) > 0]))
    assert np.argsort(ours["e1"]).tolist() == np.argsort(true_e[0]).tolist()
