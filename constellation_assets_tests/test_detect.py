"""Peak detection with its shear response (`shear/detect.py`): against the stamp estimator, finite
differences of GalSim-sheared images, and the noise covariance it assumes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from constellation_assets.shear import detect, fpfs

galsim = pytest.importorskip("galsim")

PIX = 0.1
N = 96


@pytest.fixture(scope="module")
def psf():
    obj = galsim.Moffat(beta=2.5, fwhm=0.17)
    return obj, obj.drawImage(nx=31, ny=31, scale=PIX).array


def _render(psf_obj, g1=0.0, g2=0.0, offset=(0.3, -0.2), flux=1.0, n=N, about=(0, 0)):
    """A Sersic galaxy at ``offset`` (pixels) from pixel (n//2, n//2), the whole image sheared about the
    pixel ``about`` (offset from (n//2, n//2) too)."""
    a = np.array([[1 + g1, g2], [g2, 1 - g1]])
    c = np.asarray(about, dtype=float)
    off = c + a @ (np.asarray(offset, dtype=float) - c)
    gal = galsim.Sersic(n=1.2, half_light_radius=0.25).shear(g1=0.15, g2=-0.1)
    if g1 or g2:
        gal = gal.shear(g1=g1, g2=g2)
    img = galsim.Convolve(gal.withFlux(flux), psf_obj).drawImage(
        nx=n, ny=n, scale=PIX, offset=tuple(off), use_true_center=False
    )
    return img.array


def test_peak_offsets_are_a_symmetric_disk():
    offs = detect.peak_offsets(4)
    assert len(offs) == 48
    assert not np.any((offs == 0).all(axis=1))
    assert len(detect.peak_offsets(4, 2.0)) == 40  # the 8 nearest pixels left out
    as_set = {tuple(o) for o in offs}
    assert all((-x, -y) in as_set and (-y, x) in as_set for x, y in as_set)  # 180 and 90 degrees
    with pytest.raises(ValueError, match="peak_radius_pix"):
        detect.peak_offsets(0)


def test_noiseless_galaxy_is_one_detection_measured_like_a_stamp(psf):
    psf_obj, psf_img = psf
    img = _render(psf_obj)
    res = detect.detect_peaks(img, psf_img, PIX, 0.0, peak_inner_pix=0.0)
    assert len(res["x"]) == 1  # the strict maximum
    assert (res["x"][0], res["y"][0]) == (N // 2, N // 2)
    assert res["weight"][0] == 1.0
    # With the nearest pixels left out of the comparison the peak is a plateau around the same pixel.
    plateau = detect.detect_peaks(img, psf_img, PIX, 0.0)
    assert 1 <= len(plateau["x"]) <= 4
    assert np.all(np.abs(plateau["x"] - N // 2) <= 1) and np.all(np.abs(plateau["y"] - N // 2) <= 1)
    # The stamp estimator at the same centre (offset 0) on the same image, full PSF on the same grid.
    psf_full = psf_obj.drawImage(nx=N, ny=N, scale=PIX, use_true_center=False).array
    st = fpfs.measure_stamps(img[None], psf_full, PIX, 0.0, offsets_pix=np.zeros((1, 2)), precision="float64")
    for k in ("e1", "e2", "r11", "r22", "r12"):
        assert res[k][0] == pytest.approx(st[k][0], rel=2e-5, abs=1e-7), k


@pytest.mark.parametrize(
    "offset, noise_sigma",
    [
        ((0.3, -0.2), 0.0),  # shape response only (weight 1)
        ((0.47, 0.1), 5e-3),  # plateau pixels with the peak step in its ramp
        ((0.3, -0.2), 8.5e-3),  # ... and the S/N weight too (snr ~ 11.6)
    ],
)
def test_response_matches_finite_differences_of_sheared_images(psf, offset, noise_sigma):
    """R_ab of a noiseless image (noise term off) = d phi_a / d g_b of images rendered with GalSim
    shears +-eps about the detection pixel, detection weight and S/N weight included."""
    psf_obj, psf_img = psf
    kw = dict(noise_sigma=noise_sigma, snr_min=10.0, noise_bias_correction=False)
    base = detect.detect_peaks(_render(psf_obj, offset=offset), psf_img, PIX, **kw)
    assert len(base["x"]) >= 2
    # Every detection, the images sheared about its own pixel.
    for i0 in range(len(base["x"])):
        _check_detection(psf_obj, psf_img, offset, base, i0, kw)
    if noise_sigma > 0:
        assert np.any((base["w_det"] > 1e-3) & (base["w_det"] < 0.97))  # the detection term is exercised


def _check_detection(psf_obj, psf_img, offset, base, i0, kw):
    cx, cy = base["x"][i0], base["y"][i0]
    about = (cx - N // 2, cy - N // 2)
    eps = 1e-4
    for b in (0, 1):
        phis = []
        for sign in (1.0, -1.0):
            g = [0.0, 0.0]
            g[b] = sign * eps
            r = detect.detect_peaks(_render(psf_obj, *g, offset=offset, about=about), psf_img, PIX, **kw)
            j = np.nonzero((r["x"] == cx) & (r["y"] == cy))[0][0]
            phis.append(np.array([r["phi1"][j], r["phi2"][j]]))
        fd = (phis[0] - phis[1]) / (2 * eps)
        an = np.array([base[f"r1{b + 1}"][i0], base[f"r2{b + 1}"][i0]])
        # The estimator's own discretisation (noiseless m ~ -2e-4 to -5e-4) bounds the agreement.
        np.testing.assert_allclose(fd, an, rtol=0, atol=1.5e-3 * np.abs(an).max())


def test_noise_correlation_matches_pure_noise_images(psf):
    """The analytic covariances of moments at two pixels (what the noise term and the peak step's scale
    use) equal their scatter over pure-noise images."""
    import torch

    _, psf_img = psf
    rng = np.random.default_rng(5)
    n, sig = 48, 2.0
    pairs = [("m00", "m00", (0, 0)), ("m00", "m00", (2, 1)), ("m2c", "m00", (3, 0)), ("dx", "m00", (2, 0)),
             ("a1", "m2c", (0, 1)), ("m2s", "m2s", (1, 1))]  # fmt: skip
    samples = {p: [] for p in pairs}
    for _ in range(600):
        mom = detect.moment_images(rng.normal(0.0, sig, (n, n)), psf_img, PIX)
        for a, b, (dx, dy) in pairs:
            # Cov(M_a(p + D), M_b(p)) at p = (10, 10) and one more pixel per image (independent enough).
            for py, px in ((10, 10), (30, 30)):
                samples[(a, b, (dx, dy))].append((mom[a][py + dy, px + dx], mom[b][py, px]))
    _, inv_p = detect._moment_images(
        torch.zeros((n, n), dtype=torch.float64), torch.as_tensor(psf_img), 0.35 / PIX, 1e-4
    )
    cov = detect.NoiseCorrelation((n, n), inv_p, 0.35 / PIX, sig**2)
    for a, b, (dx, dy) in pairs:
        xs = np.array(samples[(a, b, (dx, dy))])
        emp = np.cov(xs.T)[0, 1]
        scale = np.sqrt(np.var(xs[:, 0]) * np.var(xs[:, 1]))
        ana = float(cov(a, b)[dy % n, dx % n])
        assert abs(emp - ana) < 0.12 * scale, (a, b, dx, dy, emp, ana)
    # The noise model is kept per (PSF, shape, kernel, noise level): a second image reuses it, same results.
    img = rng.normal(0.0, sig, (n, n))
    detect._NOISE_MODELS.clear()
    first = detect.detect_peaks(img, psf_img, PIX, sig, snr_min=2.0)
    again = detect.detect_peaks(img, psf_img, PIX, sig, snr_min=2.0)
    assert len(detect._NOISE_MODELS) == 1 and len(first["x"]) > 0
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    # A flat image has no strict maxima.
    assert len(detect.detect_peaks(np.full((n, n), 1e-3), psf_img, PIX, sig, snr_min=0.0)["x"]) == 0


def test_bad_inputs_name_the_problem(psf):
    _, psf_img = psf
    img = np.zeros((64, 64))
    with pytest.raises(ValueError, match="2-d"):
        detect.detect_peaks(img[None], psf_img, PIX, 1.0)
    bad = img.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        detect.detect_peaks(bad, psf_img, PIX, 1.0)
    with pytest.raises(ValueError, match="PSF sum"):
        detect.detect_peaks(img, np.zeros_like(psf_img), PIX, 1.0)
    with pytest.raises(ValueError, match="larger than the image"):
        detect.detect_peaks(np.zeros((16, 16)), psf_img, PIX, 1.0)
    with pytest.raises(ValueError, match="peak_nu_min"):
        detect.detect_peaks(img, psf_img, PIX, 1.0, peak_nu_min=-1.0)


def _scene_image(psf_obj, rng_seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(rng_seed)
    img = np.zeros((n, n))
    for _ in range(6):
        gal = galsim.Sersic(n=1.0, half_light_radius=0.3).shear(
            g1=rng.uniform(-0.3, 0.3), g2=rng.uniform(-0.3, 0.3)
        )
        off = tuple(rng.uniform(-25, 25, 2))
        img += galsim.Convolve(gal.withFlux(60), psf_obj).drawImage(nx=n, ny=n, scale=PIX, offset=off).array
    return img + rng.normal(0.0, 1.0, (n, n))


def _same_detections(ref, res):
    kr = {(x, y): i for i, (x, y) in enumerate(zip(ref["x"], ref["y"], strict=True))}
    kt = {(x, y): i for i, (x, y) in enumerate(zip(res["x"], res["y"], strict=True))}
    assert set(kr) == set(kt) and len(kr) > 5
    for k in (
        "weight",
        "phi1",
        "phi2",
        "r11",
        "r12",
        "r21",
        "r22",
        "dphi1_dx",
        "dphi1_dy",
        "dphi2_dx",
        "dphi2_dy",
    ):
        a = np.array([ref[k][kr[c]] for c in sorted(kr)])
        b = np.array([res[k][kt[c]] for c in sorted(kr)])
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10 * max(1.0, np.abs(a).max()), err_msg=k)


def test_exposure_frames_rotations_and_flips_reproduce_the_grid_image(psf):
    """An exposure rotated by 90 degrees or mirrored (exact on the pixel grid) gives the detections,
    weights, ellipticities and noise-corrected responses of the grid-aligned image: the frame maps of the
    moments, gradients and noise covariances are right."""
    psf_obj, psf_img = psf
    n = 96
    img = _scene_image(psf_obj, 4, n)
    ref = detect.detect_peaks(img, psf_img, PIX, 1.0, snr_min=5.0)
    ident = detect.GridExposure(img, psf_img, 1.0, np.diag([PIX, PIX]), (0.0, 0.0))
    rot = detect.GridExposure(
        np.rot90(img), np.rot90(psf_img), 1.0, np.array([[0, -PIX], [PIX, 0]]), (0.0, n - 1.0)
    )
    flip = detect.GridExposure(
        img[:, ::-1], psf_img[:, ::-1], 1.0, np.array([[-PIX, 0], [0, PIX]]), (n - 1.0, 0.0)
    )
    for exp in (ident, rot, flip):
        _same_detections(ref, detect.detect_exposures([exp], (n, n), PIX, snr_min=5.0))
    with pytest.raises(ValueError, match="peak_omega"):
        detect.detect_exposures([ident], (n, n), peak_omega=0.0)
    with pytest.raises(ValueError, match="noise_sigma"):
        detect.detect_exposures(
            [ident, detect.GridExposure(img, psf_img, 0.0, ident.jacobian, (0.0, 0.0))], (n, n)
        )


def _exposure(psf_obj, jac, dither, g, gal_pos, about=(0, 0), n=80, grid_centre=(32, 32), flux=1.0):
    """A noiseless exposure (GalSim, local Jacobian WCS) of a galaxy at ``gal_pos`` (arcsec from grid
    pixel ``grid_centre``), the scene sheared by ``g`` about grid pixel ``grid_centre + about``.

    Returns the image, the PSF image in the exposure's pixels and the pixel position of grid pixel (0, 0).
    """
    wcs = galsim.JacobianWCS(jac[0, 0], jac[0, 1], jac[1, 0], jac[1, 1])
    a = np.array([[1 + g[0], g[1]], [g[1], 1 - g[0]]])
    centre = PIX * np.asarray(about, dtype=float)
    pos = centre + a @ (np.asarray(gal_pos, dtype=float) - centre)
    gal = galsim.Sersic(n=1.2, half_light_radius=0.25).shear(g1=0.15, g2=-0.1).withFlux(flux)
    gal = gal.shear(g1=g[0], g2=g[1]).shift(*pos)
    img = (
        galsim.Convolve(gal, psf_obj)
        .drawImage(nx=n, ny=n, wcs=wcs, offset=dither, use_true_center=False)
        .array
    )
    psf_img = psf_obj.drawImage(nx=31, ny=31, wcs=wcs).array
    p0 = np.array([n // 2 + dither[0], n // 2 + dither[1]]) - np.linalg.inv(jac) @ (
        PIX * np.asarray(grid_centre)
    )
    return img, psf_img, p0


@pytest.mark.parametrize("angle_deg, parity", [(30.0, 1.0), (-65.0, -1.0)])
def test_dithered_rotated_exposures_response_matches_finite_differences(psf, angle_deg, parity):
    """Two exposures, one rotated (and mirrored) with a slightly different pixel scale, both dithered by a
    fraction of a pixel: the combined detection's responses (peak and S/N weights in their ramps) equal
    finite differences of GalSim images sheared about the detection's grid pixel."""
    psf_obj, _ = psf
    c, sn = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    jacs = [np.diag([PIX, PIX]), 1.02 * PIX * np.array([[c, -sn], [sn, c]]) @ np.diag([parity, 1.0])]
    dithers = [(0.31, -0.17), (-0.42, 0.23)]
    gal_pos = (0.02, -0.03)
    kw = dict(snr_min=10.0, noise_bias_correction=False)
    sig = 6e-3

    def run(g, about):
        exps = []
        for jac, dth in zip(jacs, dithers, strict=True):
            img, psf_img, p0 = _exposure(psf_obj, jac, dth, g, gal_pos, about)
            exps.append(detect.GridExposure(img, psf_img, sig, jac, tuple(p0)))
        return detect.detect_exposures(exps, (64, 64), PIX, **kw)

    base = run((0.0, 0.0), (0, 0))
    assert len(base["x"]) >= 1
    assert np.any((base["w_det"] > 0.02) & (base["w_det"] < 0.98)) or np.any(base["weight"] < 0.98)
    eps = 1e-4
    for i0 in range(len(base["x"])):
        about = (int(base["x"][i0]) - 32, int(base["y"][i0]) - 32)
        for b in (0, 1):
            phis = []
            for sign in (1.0, -1.0):
                g = [0.0, 0.0]
                g[b] = sign * eps
                r = run(tuple(g), about)
                j = np.nonzero((r["x"] == base["x"][i0]) & (r["y"] == base["y"][i0]))[0][0]
                phis.append(np.array([r["phi1"][j], r["phi2"][j]]))
            fd = (phis[0] - phis[1]) / (2 * eps)
            an = np.array([base[f"r1{b + 1}"][i0], base[f"r2{b + 1}"][i0]])
            np.testing.assert_allclose(fd, an, rtol=0, atol=1.5e-3 * np.abs(an).max() + 1e-12)


def test_response_about_the_galaxy_centre_matches_a_galaxy_centred_shear(psf):
    """GalSim shears a profile about its own centre, which for every plateau pixel is a shear about the
    pixel plus a move of the scene: ``response_about`` adds that move (the position gradient of phi) and
    then equals finite differences of the summed phi; the pixel-centred responses alone do not."""
    psf_obj, psf_img = psf
    gal = galsim.Sersic(n=1.17, half_light_radius=0.26).shear(g1=-0.3, g2=-0.1)
    off = np.array([-0.31, 0.19])
    flux = 16.6 / np.sqrt((galsim.Convolve(gal, psf_obj).drawImage(scale=PIX, nx=64, ny=64).array ** 2).sum())
    kw = dict(snr_min=10.0, noise_bias_correction=False)

    def image(g1, g2):
        obj = galsim.Convolve(gal.shear(g1=g1, g2=g2).withFlux(flux), psf_obj)
        return obj.drawImage(nx=N, ny=N, scale=PIX, offset=tuple(off)).array

    base = detect.detect_peaks(image(0.0, 0.0), psf_img, PIX, 1.0, **kw)
    assert np.any((base["w_det"] > 0.05) & (base["w_det"] < 0.95))
    about = detect.response_about(base, (N - 1) / 2 + off[0], (N - 1) / 2 + off[1])
    eps = 1e-4
    for b in (0, 1):
        g = np.zeros(2)
        g[b] = eps
        rp = detect.detect_peaks(image(*g), psf_img, PIX, 1.0, **kw)
        rm = detect.detect_peaks(image(*-g), psf_img, PIX, 1.0, **kw)
        for a in (1, 2):
            fd = (rp[f"phi{a}"].sum() - rm[f"phi{a}"].sum()) / (2 * eps)
            r_about = about[f"r{a}{b + 1}"].sum()
            tol = 2e-3 * abs(base[f"r{b + 1}{b + 1}"].sum())
            assert r_about == pytest.approx(fd, abs=tol)
            if a == b + 1:
                assert abs(base[f"r{a}{b + 1}"].sum() - fd) > 5 * tol  # the move matters here


def test_masked_exposure_is_left_out_where_its_mask_reaches(psf):
    """Two exposures of one scene, the second with a masked disc: pixels the mask's reach touches
    (1 kernel sigma + 2 pixels) are detected on the first exposure alone (exactly its single-exposure result there),
    the others on both; an all-False mask changes nothing; masked pixels may hold NaN."""
    psf_obj, psf_img = psf
    n = 96
    img1 = _scene_image(psf_obj, 4, n)
    img2 = img1 + np.random.default_rng(9).normal(0.0, 1.0, (n, n))  # same scene, more noise
    jac = np.diag([PIX, PIX])
    kw = dict(snr_min=5.0)
    e1 = detect.GridExposure(img1, psf_img, 1.0, jac, (0.0, 0.0))
    e2 = detect.GridExposure(img2, psf_img, math.sqrt(2.0), jac, (0.0, 0.0))
    both = detect.detect_exposures([e1, e2], (n, n), PIX, **kw)
    only1 = detect.detect_exposures([e1], (n, n), PIX, **kw)
    assert set(both["n_exposures"].tolist()) == {2}
    no_mask = detect.GridExposure(img2, psf_img, math.sqrt(2.0), jac, (0.0, 0.0), mask=np.zeros((n, n), bool))
    same = detect.detect_exposures([e1, no_mask], (n, n), PIX, **kw)
    for k in ("x", "y", "weight", "phi1", "r11", "r22"):
        np.testing.assert_array_equal(same[k], both[k])

    # Mask a disc over the brightest detection in exposure 2 (NaN under the mask: never read).
    i0 = int(np.argmax(both["snr"]))
    yy, xx = np.mgrid[:n, :n]
    disc = (xx - both["x"][i0]) ** 2 + (yy - both["y"][i0]) ** 2 <= 3.0**2
    bad = img2.copy()
    bad[disc] = np.nan
    e2m = detect.GridExposure(bad, psf_img, math.sqrt(2.0), jac, (0.0, 0.0), mask=disc)
    res = detect.detect_exposures([e1, e2m], (n, n), PIX, **kw)
    one = res["n_exposures"] == 1
    assert one.any() and (~one).any()
    assert np.all(res["exposure_set"][one] == 1)
    s = 3.5  # sigma_arcsec / PIX
    r_mask = 1.0 * s + 2.0  # mask_radius_sigma (default 1) kernel sigmas + the interpolation's taps
    dist = np.hypot(res["x"] - both["x"][i0], res["y"] - both["y"][i0])
    assert np.all(dist[one] <= r_mask + 3.0 + 0.5) and np.all(dist[~one] > r_mask)
    key1 = {(x, y): i for i, (x, y) in enumerate(zip(only1["x"], only1["y"], strict=True))}
    for i in np.nonzero(one)[0]:
        j = key1[(res["x"][i], res["y"][i])]
        for k in ("weight", "phi1", "phi2", "r11", "r12", "r21", "r22"):
            np.testing.assert_allclose(res[k][i], only1[k][j], rtol=1e-10, atol=1e-14, err_msg=k)
    with pytest.raises(ValueError, match="mask shape"):
        detect.detect_exposures(
            [detect.GridExposure(img1, psf_img, 1.0, jac, (0.0, 0.0), mask=np.zeros((3, 3), bool))], (n, n)
        )


def test_noise_model_on_a_small_grid_equals_the_image_grid(psf):
    """The noise correlations computed on a 48-pixel grid (``noise_grid_pix``) give the noise-corrected
    responses of the full-image computation: the correlations are local."""
    psf_obj, psf_img = psf
    n = 96
    img = _scene_image(psf_obj, 5, n)
    exp = detect.GridExposure(img, psf_img, 1.0, np.diag([PIX, PIX]), (0.0, 0.0))
    ref = detect.detect_exposures([exp], (n, n), PIX, snr_min=5.0)
    small = detect.detect_exposures([exp], (n, n), PIX, snr_min=5.0, noise_grid_pix=48)
    np.testing.assert_array_equal(small["x"], ref["x"])
    for k in ("weight", "phi1", "r11", "r12", "r21", "r22"):
        np.testing.assert_allclose(small[k], ref[k], rtol=1e-6, atol=1e-9 * np.abs(ref[k]).max(), err_msg=k)


def _noisy_scene(psf_obj, jac, dither, noise_seed, n=96, grid_centre=(48, 48)):
    """Six galaxies (S/N ~ 10-50) drawn on an exposure with the local Jacobian ``jac`` and the
    sub-pixel ``dither``, white noise of unit variance; returns the image, PSF image and the exposure pixel
    position of grid pixel (0, 0) (:class:`detect.GridExposure`)."""
    rng = np.random.default_rng(5)
    wcs = galsim.JacobianWCS(*np.asarray(jac, dtype=float).ravel())
    img = np.zeros((n, n))
    for flux in (105.0, 112.0, 115.0, 250.0, 300.0, 400.0):
        gal = galsim.Sersic(n=1.0, half_light_radius=rng.uniform(0.2, 0.35))
        gal = gal.shear(g1=rng.uniform(-0.3, 0.3), g2=rng.uniform(-0.3, 0.3)).withFlux(flux)
        obj = galsim.Convolve(gal.shift(*rng.uniform(-2.0, 2.0, 2)), psf_obj)
        img += obj.drawImage(nx=n, ny=n, wcs=wcs, offset=dither, use_true_center=False).array
    img += np.random.default_rng(noise_seed).normal(0.0, 1.0, (n, n))
    psf_img = psf_obj.drawImage(nx=31, ny=31, wcs=wcs).array
    p0 = np.array([n // 2 + dither[0], n // 2 + dither[1]]) - np.linalg.inv(jac) @ (
        PIX * np.asarray(grid_centre)
    )
    return img, psf_img, tuple(p0)


def _same_as_autograd(monkeypatch, run):
    """``run()`` with the closed-form derivatives of phi and with automatic differentiation: the same
    detections, weights, phi and responses to 1e-12 of each quantity's largest value."""
    res = run()
    with monkeypatch.context() as m:
        m.setattr(detect, "_phi_derivatives", detect._phi_derivatives_autograd)
        ref = run()
    np.testing.assert_array_equal(res["x"], ref["x"])
    np.testing.assert_array_equal(res["y"], ref["y"])
    for k in (
        "weight",
        "w_det",
        "phi1",
        "phi2",
        "r11",
        "r12",
        "r21",
        "r22",
        "dphi1_dx",
        "dphi1_dy",
        "dphi2_dx",
        "dphi2_dy",
    ):
        np.testing.assert_allclose(res[k], ref[k], rtol=0, atol=1e-12 * np.abs(ref[k]).max(), err_msg=k)
    return res


@pytest.mark.parametrize(
    "noise_sigma, kw",
    [
        (1.0, dict()),
        (1.0, dict(peak_nu_min=0.5)),  # some peak steps exactly 0 (T = 0)
        (1.0, dict(noise_bias_correction=False)),
        (1.0, dict(snr_min=0.0, peak_inner_pix=0.0)),  # no S/N weight (every noise peak), 48 neighbours
        (0.0, dict()),  # noiseless: weight 1
    ],
)
def test_closed_form_derivatives_match_automatic_differentiation(psf, monkeypatch, noise_sigma, kw):
    psf_obj, _ = psf
    img, psf_img, _ = _noisy_scene(psf_obj, np.diag([PIX, PIX]), (0.0, 0.0), 1)
    res = _same_as_autograd(monkeypatch, lambda: detect.detect_peaks(img, psf_img, PIX, noise_sigma, **kw))
    if noise_sigma > 0 and kw.get("snr_min", 10.0) > 0:
        u = res["weight"] / np.where(res["w_det"] > 0, res["w_det"], 1.0)
        assert np.sum((res["w_det"] > 0.05) & (res["w_det"] < 0.95)) >= 3  # the peak steps' ramps
        assert np.sum((u > 0.05) & (u < 0.95)) >= 1  # ... and the S/N weight's
        assert np.sum(res["weight"] > 0.95) >= 2
        if kw.get("peak_nu_min", 0.0) > 0:
            assert np.any(res["w_det"] == 0.0)


def test_closed_form_derivatives_match_automatic_differentiation_on_exposures(psf, monkeypatch):
    """Two dithered exposures, one rotated by 30 degrees with another pixel scale (noise correction of
    the combined moments)."""
    psf_obj, _ = psf
    c, s = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
    exps = []
    for jac, dither, seed in (
        (np.diag([PIX, PIX]), (0.31, -0.17), 2),
        (1.02 * PIX * np.array([[c, -s], [s, c]]), (-0.42, 0.23), 3),
    ):
        img, psf_img, p0 = _noisy_scene(psf_obj, jac, dither, seed)
        exps.append(detect.GridExposure(img, psf_img, 1.0, jac, p0))
    res = _same_as_autograd(monkeypatch, lambda: detect.detect_exposures(exps, (96, 96), PIX))
    assert np.sum((res["w_det"] > 0.05) & (res["w_det"] < 0.95)) >= 3
    assert np.sum(res["weight"] > 0.95) >= 2


def _keys_interp_reference(img, px, py):
    """Keys-cubic value and tap moments ``sum c (p - q)_x img``, ``sum c (p - q)_y img`` of one image at
    the points ``(px, py)``, tap by tap (cyclic indices): the reference of ``detect._KeysTaps``."""
    ny, nx = img.shape
    x0, y0 = np.floor(px), np.floor(py)
    tx, ty = px - x0, py - y0

    def weight(d):
        d = np.abs(d)
        near = (1.5 * d - 2.5) * d * d + 1.0
        far = ((-0.5 * d + 2.5) * d - 4.0) * d + 2.0
        return np.where(d <= 1.0, near, np.where(d < 2.0, far, 0.0))

    out = np.zeros((3,) + px.shape)
    for dy in range(-1, 3):
        for dx in range(-1, 3):
            v = img[(y0.astype(int) + dy) % ny, (x0.astype(int) + dx) % nx]
            c = weight(dx - tx) * weight(dy - ty) * v
            out += np.stack([c, (dx - tx) * c, (dy - ty) * c])
    return out


def test_stacked_interpolation_equals_one_image_at_a_time():
    """The taps computed once and applied to a stack of images (with the taps' moments, and mapped by a
    matrix) equal the tap-by-tap interpolation of each image, for a rotated and scaled Jacobian whose
    points wrap around the image edges."""
    import torch

    rng = np.random.default_rng(3)
    ny, nx, n = 37, 41, 5
    imgs = rng.normal(size=(ny, nx, n))
    c, s = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
    jinv = np.linalg.inv(1.02 * np.array([[c, -s], [s, c]]))
    jj, ii = np.mgrid[0:45, 0:43].astype(float)
    px = -3.7 + jinv[0, 0] * ii + jinv[0, 1] * jj
    py = 2.2 + jinv[1, 0] * ii + jinv[1, 1] * jj
    px[0, :3], py[0, :3] = (5.0, -1e-17, 7.0 - 1e-16), (3.0, 4.0, -2.0)  # integer and almost-integer points
    ref = np.stack([_keys_interp_reference(imgs[..., k], px, py) for k in range(n)], axis=-1)  # (3, ..., n)
    ref = ref.reshape(3, -1, n).transpose(1, 0, 2)  # (P, 3, n)
    taps = detect._KeysTaps(torch.as_tensor(px), torch.as_tensor(py), (ny, nx))
    stack = torch.as_tensor(imgs)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(taps(stack).numpy(), ref[:, 0], rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(taps(stack, tap_moments=True).numpy(), ref, rtol=0, atol=1e-13 * scale)
    combine = rng.normal(size=(4, 3 * n))
    np.testing.assert_allclose(
        taps(stack, tap_moments=True, combine=torch.as_tensor(combine)).numpy(),
        ref.reshape(len(ref), -1) @ combine.T,
        rtol=0,
        atol=1e-12 * scale,
    )


@pytest.mark.parametrize(
    "offset, noise_sigma, rel_width",
    [
        ((0.47, 0.1), 2e-3, 0.01),  # S/N ~ 50: plateau-edge pixels in the widened ramp
        ((0.3, -0.2), 5e-4, 0.02),  # S/N ~ 200: the step's scale set by kappa F(c), not sigma_v
    ],
)
def test_relative_peak_width_response_matches_finite_differences(psf, offset, noise_sigma, rel_width):
    """With the peak step's scale ``sqrt(sigma_v^2 + (kappa F(c))^2)`` (``peak_rel_width``) the responses,
    which now carry the step's dependence on ``M00`` through its scale, equal finite differences of GalSim
    images sheared about each detection's pixel."""
    psf_obj, psf_img = psf
    kw = dict(noise_sigma=noise_sigma, snr_min=10.0, noise_bias_correction=False, peak_rel_width=rel_width)
    img = _render(psf_obj, offset=offset)
    base = detect.detect_peaks(img, psf_img, PIX, **kw)
    assert len(base["x"]) >= 2
    assert np.any((base["w_det"] > 1e-3) & (base["w_det"] < 0.97))
    plain = detect.detect_peaks(img, psf_img, PIX, **{**kw, "peak_rel_width": 0.0})
    assert np.abs(base["w_det"] - plain["w_det"]).max() > 0.1  # the relative width matters here
    for i0 in range(len(base["x"])):
        _check_detection(psf_obj, psf_img, offset, base, i0, kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(peak_rel_width=0.01),
        dict(peak_rel_width=0.02),
        dict(peak_rel_width=0.02, peak_nu_min=0.5),
        dict(peak_rel_width=0.01, noise_bias_correction=False),
        dict(peak_rel_width=0.2, peak_omega=0.5),  # the scale kappa F(c) >> sigma_v for every detection
    ],
)
def test_closed_form_derivatives_with_relative_peak_width_match_automatic_differentiation(
    psf, monkeypatch, kw
):
    """The closed-form gradient and noise term with the step's scale depending on ``M00``
    (``peak_rel_width > 0``) equal automatic differentiation of the formula."""
    psf_obj, _ = psf
    img, psf_img, _ = _noisy_scene(psf_obj, np.diag([PIX, PIX]), (0.0, 0.0), 1)
    res = _same_as_autograd(monkeypatch, lambda: detect.detect_peaks(img, psf_img, PIX, 1.0, **kw))
    assert np.sum((res["w_det"] > 0.05) & (res["w_det"] < 0.95)) >= 3  # the peak steps' ramps
    if kw.get("peak_nu_min", 0.0) > 0:
        assert np.any(res["w_det"] == 0.0)


def test_relative_peak_width_zero_is_the_plain_step_and_negative_is_refused(psf):
    psf_obj, _ = psf
    img, psf_img, _ = _noisy_scene(psf_obj, np.diag([PIX, PIX]), (0.0, 0.0), 1)
    ref = detect.detect_peaks(img, psf_img, PIX, 1.0)
    res = detect.detect_peaks(img, psf_img, PIX, 1.0, peak_rel_width=0.0)
    for k in ref:
        np.testing.assert_array_equal(res[k], ref[k], err_msg=k)
    with pytest.raises(ValueError, match="peak_rel_width"):
        detect.detect_peaks(img, psf_img, PIX, 1.0, peak_rel_width=-0.1)
    exp = detect.GridExposure(img, psf_img, 1.0, np.diag([PIX, PIX]), (0.0, 0.0))
    with pytest.raises(ValueError, match="peak_rel_width"):
        detect.detect_exposures([exp], (96, 96), PIX, peak_rel_width=-0.1)


def test_closed_form_derivatives_with_relative_peak_width_match_automatic_differentiation_on_exposures(
    psf, monkeypatch
):
    psf_obj, _ = psf
    c, s = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
    exps = []
    for jac, dither, seed in (
        (np.diag([PIX, PIX]), (0.31, -0.17), 2),
        (1.02 * PIX * np.array([[c, -s], [s, c]]), (-0.42, 0.23), 3),
    ):
        img, psf_img, p0 = _noisy_scene(psf_obj, jac, dither, seed)
        exps.append(detect.GridExposure(img, psf_img, 1.0, jac, p0))
    res = _same_as_autograd(
        monkeypatch, lambda: detect.detect_exposures(exps, (96, 96), PIX, peak_rel_width=0.01)
    )
    assert np.sum((res["w_det"] > 0.05) & (res["w_det"] < 0.95)) >= 2
