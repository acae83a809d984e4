"""PSF of the synthetic survey: Airy x Gaussian optics, its focal-plane variation and the Q1 PSF product.

Physics: Airy (lambda/D for 715 nm on the 1.2 m mirror, 30 % obscuration, :mod:`constellation_assets.euclid`)
convolved with a Gaussian (jitter + charge diffusion) tuned so the FWHM is ``psf_fwhm_arcsec`` at the
focal-plane centre, growing by ``psf_fwhm_variation`` to the corners; the Gaussian carries a focal-plane shear
pattern of amplitude ``psf_e_amplitude`` plus a small per-observation offset. The PSF is a function of the
focal-plane position and the observation only: every dither and exposure of an observation sees the same
PSF, as the per-observation PSF product assumes. Pixels are rendered with the full (untruncated) PSF.

PSF product (:func:`psf_grid_image`): per quadrant a 189 x 189 image, a 9 x 9 row-major grid (grid row = y)
of 21 x 21 stamps at the native 0.1" pixel, nodes at the centres of a uniform 9 x 9 partition of the
quadrant. Each stamp is the effective PSF (optics convolved with the pixel) centred on its central pixel,
normalised so the *untruncated* PSF sums to 1 and then cut to 21 x 21: it sums to < 1 (~0.92-0.95), like the
real PSFEx product whose wings beyond the 2.1" box are missing. The model can differ from the rendering PSF by
``psf_model_size_error`` (dT/T) and a shear-convention ellipticity residual (``psf_model_e1_error``,
``psf_model_e2_error``), to measure the effect of PSF-model errors on shear.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from constellation_assets.euclid import (
    TELESCOPE_DIAMETER_M,
    TELESCOPE_OBSCURATION,
    VIS_PSF_GRID,
    VIS_PSF_STAMP_PIX,
    VIS_WAVELENGTH_M,
)
from constellation_assets.synthetic.focal_plane import QuadrantGeom, fp_coords_norm
from constellation_assets.synthetic.layout import rng_for

__all__ = [
    "LAM_OVER_DIAM_ARCSEC",
    "airy_gauss_fwhm_arcsec",
    "band_otf",
    "draw_finite",
    "effective_psf_stamps",
    "field_psf",
    "psf_fwhm_arcsec_at",
    "psf_grid_image",
    "psf_shear_at",
]

#: lambda / D of VIS (arcsec).
LAM_OVER_DIAM_ARCSEC = VIS_WAVELENGTH_M / TELESCOPE_DIAMETER_M * 180.0 / math.pi * 3600.0
_FWHM_PER_SIGMA = 2.3548200450309493


def psf_fwhm_arcsec_at(fcfg, xfp_pix, yfp_pix):
    """Target PSF FWHM (arcsec) at focal-plane pixel position(s): grows quadratically to the corners."""
    u, v = fp_coords_norm(fcfg, xfp_pix, yfp_pix)
    return fcfg.psf_fwhm_arcsec * (1.0 + fcfg.psf_fwhm_variation * 0.5 * (u * u + v * v))


def psf_shear_at(fcfg, obs_id: int, xfp_pix, yfp_pix):
    """PSF (g1, g2) at focal-plane position(s) of an observation: astigmatism-like pattern + per-observation
    offset (the same for all its dithers and exposures)."""
    u, v = fp_coords_norm(fcfg, xfp_pix, yfp_pix)
    j = rng_for(fcfg.seed, "psf-jitter", int(obs_id)).normal(0.0, 0.003, size=2)
    a = fcfg.psf_e_amplitude * 0.5
    return a * (u * u - v * v) + 0.3 * a * u + j[0], a * (2 * u * v) + 0.3 * a * v + j[1]


def airy_gauss_fwhm_arcsec(gauss_fwhm_arcsec, obscuration: float = TELESCOPE_OBSCURATION) -> np.ndarray:
    """FWHM of Airy (x) Gaussian, from the radial profile as a Hankel transform of the product of MTFs.

    I(r) = int k J0(k r) T_airy(k) exp(-k^2 sigma^2 / 2) dk; exact up to quadrature (checked against GalSim).
    """
    import galsim
    from scipy.special import j0

    airy = galsim.Airy(lam_over_diam=LAM_OVER_DIAM_ARCSEC, obscuration=obscuration)
    kmax = 2.0 * math.pi / LAM_OVER_DIAM_ARCSEC  # MTF cutoff (rad / arcsec)
    k = np.linspace(0.0, kmax, 600)
    mtf = np.array([airy.kValue(galsim.PositionD(float(kk), 0.0)).real for kk in k])
    r = np.linspace(0.0, 0.4, 801)
    kr = j0(np.outer(r, k)) * (k * mtf)
    out = []
    for g in np.atleast_1d(gauss_fwhm_arcsec):
        sigma = float(g) / _FWHM_PER_SIGMA
        prof = np.trapezoid(kr * np.exp(-0.5 * (k * sigma) ** 2), k, axis=1)
        half = prof[0] / 2.0
        i = int(np.argmax(prof < half))
        r_half = r[i - 1] + (half - prof[i - 1]) * (r[i] - r[i - 1]) / (prof[i] - prof[i - 1])
        out.append(2.0 * r_half)
    return np.array(out)


@lru_cache(maxsize=4)
def _gauss_fwhm_table(obscuration: float) -> tuple[np.ndarray, np.ndarray]:
    """Total FWHM of Airy (x) Gaussian as a function of the Gaussian FWHM (monotonic, for inversion)."""
    g = np.linspace(0.0, 0.6, 61)
    return g, np.maximum.accumulate(airy_gauss_fwhm_arcsec(g, obscuration))


def gauss_sigma_for_fwhm(fwhm_arcsec) -> np.ndarray:
    """Sigma (arcsec) of the Gaussian that, convolved with the VIS Airy, gives a total FWHM ``fwhm_arcsec``."""
    g_tab, tot_tab = _gauss_fwhm_table(TELESCOPE_OBSCURATION)
    fwhm = np.asarray(fwhm_arcsec, dtype=float)
    if np.any(fwhm <= tot_tab[0]):
        raise ValueError(
            f'PSF FWHM {float(np.min(fwhm)):.3f}" is below the VIS diffraction limit {tot_tab[0]:.3f}"; '
            "raise field.psf_fwhm_arcsec"
        )
    return np.interp(fwhm, tot_tab, g_tab) / _FWHM_PER_SIGMA


def field_psf(fwhm_arcsec: float, g1: float, g2: float, gsparams=None, nudge: float = 0.0):
    """Euclid-like GalSim PSF (before the pixel): Airy x Gaussian(sheared by (g1, g2)) with the given FWHM.

    ``nudge`` scales lambda/D by (1 + nudge): GalSim 2.8's obscured-Airy k-values are NaN at rare k-grid points
    under some sheared transforms; :func:`draw_finite` retries with nudge=1e-6 (physically irrelevant).
    """
    import galsim

    sigma = float(gauss_sigma_for_fwhm(fwhm_arcsec))
    airy = galsim.Airy(
        lam_over_diam=LAM_OVER_DIAM_ARCSEC * (1.0 + nudge),
        obscuration=TELESCOPE_OBSCURATION,
        gsparams=gsparams,
    )
    # The anisotropy lives in the jitter + charge-diffusion Gaussian; the diffraction pattern stays round.
    # (Shearing the obscured Airy itself makes GalSim 2.8 draw NaNs under some WCS jacobians with a pixel.)
    gauss = galsim.Gaussian(sigma=sigma, gsparams=gsparams).shear(g1=float(g1), g2=float(g2))
    return galsim.Convolve(airy, gauss, gsparams=gsparams)


def draw_finite(make_obj: Callable[[float], Any], what: str, **draw_kwargs):
    """Draw ``make_obj(nudge)``; on NaN (GalSim Airy edge case, see :func:`field_psf`) retry nudged, else raise."""
    for nudge in (0.0, 1e-6, 3e-6, 1e-5):
        im = make_obj(nudge).drawImage(**draw_kwargs)
        if np.isfinite(im.array).all():
            return im
    raise RuntimeError(
        f"GalSim drew non-finite pixels for {what}; report this with the field config and seed"
    )


@lru_cache(maxsize=8)
def _airy_mtf_table(nudge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Radial MTF of the obscured Airy (GalSim's own k-values), k in rad/arcsec, zero beyond the cutoff."""
    import galsim

    airy = galsim.Airy(lam_over_diam=LAM_OVER_DIAM_ARCSEC * (1.0 + nudge), obscuration=TELESCOPE_OBSCURATION)
    k = np.linspace(0.0, 2.0 * math.pi / (LAM_OVER_DIAM_ARCSEC * (1.0 + nudge)), 4001)
    mtf = np.array([airy.kValue(galsim.PositionD(float(kk), 0.0)).real for kk in k])
    mtf[-1] = 0.0
    return k, np.nan_to_num(mtf)


def _shear_matrix(g1: float, g2: float) -> np.ndarray:
    """GalSim's shear matrix S (det 1): a profile sheared by g is f(S^-1 x)."""
    norm = 1.0 / math.sqrt(1.0 - g1 * g1 - g2 * g2)
    return norm * np.array([[1.0 + g1, g2], [g2, 1.0 - g1]])


def effective_psf_stamps(
    fwhm_arcsec,
    g1,
    g2,
    pixel_scale_arcsec: float,
    oversampling: int = 1,
    size: int = VIS_PSF_STAMP_PIX,
    fft_size: int = 96,
    normalize: str = "stamp",
    size_error: float = 0.0,
    e1_error: float = 0.0,
    e2_error: float = 0.0,
) -> np.ndarray:
    """Effective PSF stamps (n, size, size) point-sampled every ``pixel_scale / oversampling``, centred.

    The profile of ``Convolve(field_psf(fwhm, g1, g2), Pixel(pixel_scale))`` drawn with ``method="no_pixel"``
    (checked against GalSim in the tests), evaluated in k-space with numpy: Airy MTF x sheared-Gaussian
    transform x pixel sinc, folded over the sampling's aliases (VIS is undersampled at 0.1"), then an inverse
    FFT of ``fft_size`` samples. ``normalize="stamp"``: each stamp sums to 1; ``"total"``: the untruncated
    PSF sums to 1 per sample of the pixel grid, so a cut stamp sums to its enclosed light (< 1).
    ``size_error`` (dT/T) dilates the optical PSF by sqrt(1 + dT/T) and ``(e1_error, e2_error)`` shears it
    (GalSim g convention) after the dilation: a PSF model that differs from the true PSF.
    """
    if normalize not in ("stamp", "total"):
        raise ValueError(f"normalize must be 'stamp' or 'total', got {normalize!r}")
    fwhm = np.atleast_1d(np.asarray(fwhm_arcsec, dtype=float))
    g1 = np.broadcast_to(np.asarray(g1, dtype=float), fwhm.shape)
    g2 = np.broadcast_to(np.asarray(g2, dtype=float), fwhm.shape)
    sigmas = gauss_sigma_for_fwhm(fwhm)
    dx = pixel_scale_arcsec / oversampling
    kx0 = 2.0 * math.pi * np.fft.rfftfreq(fft_size, dx)
    ky0 = 2.0 * math.pi * np.fft.fftfreq(fft_size, dx)
    k_tab, mtf_tab = _airy_mtf_table()
    # Model error: f_model(x) = f(D^-1 x), D = sqrt(1 + dT/T) S(e_err); its transform is F(D^T k).
    if not (size_error > -1.0 and math.hypot(e1_error, e2_error) < 1.0):
        raise ValueError(
            f"PSF model error dT/T={size_error}, e=({e1_error}, {e2_error}): need dT/T > -1 and |e| < 1"
        )
    d = math.sqrt(1.0 + size_error) * _shear_matrix(e1_error, e2_error)
    # The Airy MTF vanishes beyond k_cut (in the model's frame: |D^T k| > k_cut); aliases m 2 pi / dx bring
    # that power from beyond Nyquist (pi / dx) onto the sampled grid.
    k_need = float(k_tab[-1]) / float(np.linalg.svd(d, compute_uv=False).min())
    n_alias = max(0, math.ceil((k_need - math.pi / dx) * dx / (2.0 * math.pi)))
    shifts = 2.0 * math.pi / dx * np.arange(-n_alias, n_alias + 1)
    kx_list, ky_list, airy_list = [], [], []
    half = pixel_scale_arcsec / 2.0
    for sx in shifts:
        for sy in shifts:
            kx, ky = np.meshgrid(kx0 + sx, ky0 + sy)
            ux = d[0, 0] * kx + d[1, 0] * ky
            uy = d[0, 1] * kx + d[1, 1] * ky
            airy = np.interp(np.hypot(ux, uy), k_tab, mtf_tab, right=0.0)
            box = np.sinc(kx * half / math.pi) * np.sinc(ky * half / math.pi)
            kx_list.append(ux)
            ky_list.append(uy)
            airy_list.append(airy * box)
    ux = np.stack(kx_list)
    uy = np.stack(ky_list)
    ab = np.stack(airy_list)
    out = np.empty((fwhm.size, size, size))
    c = fft_size // 2
    lo, hi = c - size // 2, c + size // 2 + 1
    for n in range(fwhm.size):
        s = _shear_matrix(float(g1[n]), float(g2[n]))
        # Gaussian sheared by S: transform exp(-sigma^2 |S^T k|^2 / 2).
        vx = s[0, 0] * ux + s[1, 0] * uy
        vy = s[0, 1] * ux + s[1, 1] * uy
        otf = (ab * np.exp(-0.5 * sigmas[n] ** 2 * (vx * vx + vy * vy))).sum(axis=0)
        img = np.fft.fftshift(np.fft.irfft2(otf, s=(fft_size, fft_size)))
        stamp = img[lo:hi, lo:hi]
        out[n] = stamp / stamp.sum() if normalize == "stamp" else stamp
    return out


def psf_grid_image(fcfg, obs_id: int, q: QuadrantGeom) -> tuple[np.ndarray, dict]:
    """The 189 x 189 PSF-product image of one quadrant (9 x 9 native 21 x 21 stamps) and its header keys.

    Stamp (i, j) models the PSF at 0-based quadrant pixel ((j + 0.5) nx / 9 - 0.5, (i + 0.5) ny / 9 - 0.5);
    the header carries no grid keywords (like the real product).
    """
    nx, ny = fcfg.quadrant_nx_pix, fcfg.quadrant_ny_pix
    n_grid, n = VIS_PSF_GRID, VIS_PSF_STAMP_PIX
    xs = (np.arange(n_grid) + 0.5) * nx / n_grid - 0.5
    ys = (np.arange(n_grid) + 0.5) * ny / n_grid - 0.5
    gx, gy = np.meshgrid(xs, ys)  # [i (row, y), j (col, x)]
    xfp, yfp = q.x0_pix + gx + 0.5, q.y0_pix + gy + 0.5
    fwhm = psf_fwhm_arcsec_at(fcfg, xfp, yfp).ravel()
    g1, g2 = psf_shear_at(fcfg, obs_id, xfp, yfp)
    stamps = effective_psf_stamps(
        fwhm,
        np.ravel(g1),
        np.ravel(g2),
        fcfg.pixel_scale_arcsec,
        1,
        normalize="total",
        size_error=fcfg.psf_model_size_error,
        e1_error=fcfg.psf_model_e1_error,
        e2_error=fcfg.psf_model_e2_error,
    )
    grid = stamps.reshape(n_grid, n_grid, n, n).transpose(0, 2, 1, 3).reshape(n_grid * n, n_grid * n)
    return grid.astype(np.float32), {"EXTNAME": q.det_id}


def band_otf(fwhm_arcsec: float, wavelength_um: float, kx, ky, pixel_scale_arcsec: float) -> np.ndarray:
    """Optical transfer function of a band's effective PSF: Airy(lambda/D, 30 % obscured) x Gaussian x pixel.

    The Gaussian (jitter, charge diffusion, resampling) is tuned so Airy (x) Gaussian has FWHM ``fwhm_arcsec``;
    Airy scales with wavelength: MTF_lambda(k) = MTF_VIS(k lambda / lambda_VIS). ``kx``, ``ky`` in rad/arcsec.
    """
    r = wavelength_um / (VIS_WAVELENGTH_M * 1e6)
    g_tab, tot_tab = _gauss_fwhm_table(TELESCOPE_OBSCURATION)
    if fwhm_arcsec / r <= tot_tab[0]:
        raise ValueError(
            f'PSF FWHM {fwhm_arcsec:.3f}" is below the diffraction limit at {wavelength_um} um; raise it'
        )
    sigma = r * float(np.interp(fwhm_arcsec / r, tot_tab, g_tab)) / _FWHM_PER_SIGMA
    k_tab, mtf_tab = _airy_mtf_table()
    # Airy MTF by table look-up (4001 samples to the cutoff: < 2e-4 error), zero beyond the cutoff; the
    # Gaussian and the pixel box are separable in kx, ky.
    kx = np.asarray(kx, dtype=np.float32)
    ky = np.asarray(ky, dtype=np.float32)
    step = float(k_tab[1] - k_tab[0])
    idx = np.sqrt(kx * kx + ky * ky) * np.float32(r / step) + np.float32(0.5)
    table = np.append(mtf_tab, 0.0).astype(np.float32)
    otf = table[np.minimum(idx.astype(np.int32), len(mtf_tab))]
    half = pixel_scale_arcsec / 2.0
    fx = np.exp(-0.5 * sigma * sigma * kx * kx) * np.sinc(kx * half / math.pi)
    fy = np.exp(-0.5 * sigma * sigma * ky * ky) * np.sinc(ky * half / math.pi)
    otf *= fx.astype(np.float32)
    otf *= fy.astype(np.float32)
    return otf
