"""Analytic PSF images against GalSim drawImage, centring and normalisation."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from constellation_assets.sim.psf import PSFSpec, gaussian_psf_image, moffat_psf_image

# tight GalSim accuracy, so that the comparison tests our images, not GalSim's default k-space truncation
GSP = galsim.GSParams(kvalue_accuracy=1e-7, maxk_threshold=1e-5, folding_threshold=1e-4)


def _galsim(obj, n, scale, method="auto"):
    offset = (0.5, 0.5) if n % 2 == 0 else (0.0, 0.0)  # GalSim centres even images on a pixel corner
    return obj.drawImage(nx=n, ny=n, scale=scale, offset=offset, method=method).array


@pytest.mark.parametrize("n", [25, 24])
@pytest.mark.parametrize(("fwhm", "beta"), [(0.17, 3.5), (0.3, 2.5), (1.2, 4.5)])
def test_moffat_matches_galsim(n, fwhm, beta):
    ref = _galsim(galsim.Moffat(beta=beta, fwhm=fwhm, gsparams=GSP), n, 0.1)
    img = moffat_psf_image(fwhm, beta, n, 0.1, normalize=False)
    assert np.abs(img - ref).max() < 2e-5 * ref.max()
    ref_np = _galsim(galsim.Moffat(beta=beta, fwhm=fwhm, gsparams=GSP), n, 0.1, method="no_pixel")
    img_np = moffat_psf_image(fwhm, beta, n, 0.1, normalize=False, pixel_integrated=False)
    assert np.abs(img_np - ref_np).max() < 2e-5 * ref_np.max()


@pytest.mark.parametrize("n", [25, 24])
@pytest.mark.parametrize("fwhm", [0.12, 0.17, 0.9])
def test_gaussian_matches_galsim(n, fwhm):
    ref = _galsim(galsim.Gaussian(fwhm=fwhm, gsparams=GSP), n, 0.1)
    img = gaussian_psf_image(fwhm, n, 0.1, normalize=False)
    assert np.abs(img - ref).max() < 2e-5 * ref.max()


@pytest.mark.parametrize("shape", [(21, 21), (20, 20), (21, 24)])
def test_normalised_and_centred(shape):
    h, w = shape
    for img in (
        moffat_psf_image(0.2, 3.5, shape, 0.1),
        gaussian_psf_image(0.2, shape, 0.1),
        PSFSpec("moffat", 0.2, 2.5).image(shape, 0.1),
    ):
        assert img.shape == shape
        assert img.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.unravel_index(img.argmax(), img.shape) == (h // 2, w // 2)
        yy, xx = np.mgrid[:h, :w]
        # a symmetric profile: first moments on pixel (H//2, W//2) up to the truncation asymmetry of even sizes
        tol = 1e-12 if (h % 2 and w % 2) else 0.05
        assert abs((img * xx).sum() - w // 2) < tol
        assert abs((img * yy).sum() - h // 2) < tol


def test_fwhm_is_the_fwhm():
    # finely sampled profile: half maximum at r = FWHM / 2
    for img in (
        moffat_psf_image(0.5, 3.0, 201, 0.005, pixel_integrated=False),
        gaussian_psf_image(0.5, 201, 0.005, pixel_integrated=False),
    ):
        row = img[100] / img[100, 100]
        assert row[100 + 50] == pytest.approx(0.5, abs=1e-9)


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError, match="beta"):
        PSFSpec("moffat", 0.2, 1.0)
    with pytest.raises(ValueError, match="FWHM"):
        PSFSpec("gaussian", -0.1)
    with pytest.raises(ValueError, match="model"):
        PSFSpec("airy", 0.2)
