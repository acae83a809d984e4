"""Peak detection with its shear response (AnaCal-style detection for the FPFS estimator).

Why
---
A catalog made on the sheared sky (which objects exist, where their centres are, which blends are merged)
depends on the shear, and an estimator fed with it has no response for that dependence: a windowed
centroid measured on the same noisy image costs m ~ -2e-3 at S/N 10-100, and merging or splitting of
blends in the detection changes m by percents (the field sims' measured MER catalog). Following Li et al.
(2022, 2024; AnaCal) the detection here is itself a smooth function of linear moments of the image, so it
is differentiated with the measurement.

Definition
----------
For an image ``I`` with white pixel noise ``sigma_n`` and PSF ``P`` (unit sum), the deconvolved Fourier
image ``f = I(k) / P(k)`` (0 where ``|P| <= psf_floor``) gives, at every pixel ``p``, the FPFS moments of
:mod:`constellation_assets.shear.fpfs` centred on ``p``, ``M_a(p) = sum_k w_a(k) f(k) exp(i k.p)`` (one
inverse FFT per moment); ``F(p) = M00(p)`` is the smoothed deconvolved image. A pixel ``c`` is a detection
with weight

    w(c) = T(c) u(snr(c)),   T(c) = prod_{r_in <= |d| <= r} t((F(c) - F(c + d)) / sigma_v(d)),

where ``t`` is the C2 quintic step from 0 at ``nu_min`` to 1 at ``nu_min + omega`` (``nu_min = 0``: only
pixels above every pixel of the annulus count), ``r`` = ``peak_radius_pix``, ``r_in`` =
``peak_inner_pix`` (default 2: the 8 nearest pixels are left out, so a source centred between pixels is
a plateau of 1-4 pixels with weight ~1 each, not a near-tie of two pixels with weight ~0; the estimator
sums over all of them), ``sigma_v(d)`` the noise of ``F(c) - F(c + d)``, and ``u`` the FPFS S/N weight of :func:`fpfs.selection_weight`
(``snr = M00(c) / sigma(M00)``). With ``peak_rel_width = kappa > 0`` the step's scale is
``s(d) = sqrt(sigma_v(d)^2 + (kappa F(c))^2)`` instead of ``sigma_v(d)``: for bright sources the
neighbour differences grow with the flux while ``sigma_v`` does not, so the ramp is narrow in position
and the plateau's edge pixels carry large responses of both signs; a scale growing with ``F(c)`` widens
it. ``w`` is still a smooth function of the same linear moments, so the response below stays exact. As
the step's argument is then at most ``(1 - F(c + d) / F(c)) / kappa``, and the kernel keeps
``F(c + d) / F(c)`` at 0.85-0.9 at 2 pixels for compact sources (0.35" kernel on 0.1" pixels), ``kappa
omega`` must stay well below ~0.15 for bright sources to reach ``T = 1`` (kappa ~0.01; at 0.05 nearly
every ``T`` is ~0). The ellipticity is measured at ``c`` itself (an integer pixel: no centroid is
estimated), ``e_1 = -M2c(c) / (M00(c) + C)``, and the ensemble shear is
``g_a = sum_c w e_a / sum_c R_aa`` over all detections.

Response
--------
Every quantity ``y = (M00(c), M2c(c), M2s(c), F(c + d_1), ...)`` entering ``Phi_a = w e_a`` is linear in
the image, and so is its derivative under a shear about ``c``: with ``S_1 = diag(1, -1)``,
``S_2 = [[0, 1], [1, 0]]``,

    dM00/dg_b = M2c, M2s;  dM2c/dg = (-A1, B12);  dM2s/dg = (B12, -A2);
    dF(c + d)/dg_b = M2_b(c + d) - (S_b d) . grad F(c + d)

(the first term reshapes the kernel about ``c + d``, the second moves the point ``c + d``; both follow from
``d/dg sum w f = sum -(grad_k w . S k) f`` with ``w = W exp(i k.d)``). So ``R_ab = grad Phi_a . L_b y``,
and the noise term ``E[grad Phi . L_b n]`` of the measured response is removed exactly for Gaussian noise
(Stein's lemma), ``R_ab -= sum_ij Cov((L_b y)_i, y_j) d_i d_j Phi_a``, with the covariances of moments at
two pixels from the stationary correlation ``Cov(M_a(p + D), M_b(p)) = sigma_n^2 N sum_k w_a conj(w_b)
|1/P|^2 exp(i k.D)``. On a noiseless image that term must be left out (``noise_bias_correction=False``):
it is the expectation over noise, large for detections in the peak step's ramp. The gradient and the
Hessian's contraction with the covariances are closed forms (``Phi`` is a product of one-variable
functions of ``M00 - F(c + d_j)``, ``M00`` and ``M2/(M00 + C)``; :func:`_phi_derivatives`), vectorised
over detections, with no (d, d) Hessian formed per detection.

A shear about any other point ``O`` differs by a move of the scene by ``g S (p - O)``, which a fixed pixel
grid averages out over the population (uniform sub-pixel positions: ``int (S d) . grad Phi d^2d =
-tr(S) int Phi = 0``); :func:`response_about` gives the response about ``O`` (each detection's position
gradient of ``Phi`` is returned), which in simulations with a known shear centre is an exact control
variate of the +-g pairs. Several exposures of one region: :func:`detect_exposures`.

Frames as in :mod:`fpfs`: ``e1 > 0`` elongated along x (columns), ``e2 > 0`` along x = y.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np
import torch

from constellation_assets.shear import fpfs

__all__ = [
    "GridExposure",
    "NoiseCorrelation",
    "detect_exposures",
    "detect_peaks",
    "ensemble_shear",
    "moment_images",
    "peak_offsets",
]

#: Detections are C2-smooth in the neighbour differences: the step rises over this many noise sigmas.
PEAK_OMEGA_DEFAULT = 3.0
#: Radius (pixels) of the neighbourhood a detection must exceed.
PEAK_RADIUS_PIX_DEFAULT = 4
#: ... from this distance on: the nearest pixels are left out, so that a source centred between pixels is
#: not a near-tie of two pixels (weight ~0 on both) but a plateau of pixels that each carry weight ~1.
PEAK_INNER_PIX_DEFAULT = 2.0


def peak_offsets(radius_pix: int, inner_pix: float = 0.0) -> np.ndarray:
    """Integer offsets ``(dx, dy)`` with ``max(inner_pix, 1) <= |d| <= radius_pix`` (a detection's neighbourhood)."""
    r = int(radius_pix)
    if r < 1:
        raise ValueError(f"peak_radius_pix={radius_pix} must be >= 1")
    if not 0 <= inner_pix <= r:
        raise ValueError(f"peak_inner_pix={inner_pix} must be in [0, peak_radius_pix={r}]")
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = dx * dx + dy * dy
    keep = (d2 <= r * r) & (d2 >= max(inner_pix, 1.0) ** 2)
    return np.stack([dx[keep], dy[keep]], axis=1).astype(np.int64)


#: Noise models of recent (PSF, image shape, kernel, noise level) combinations (:func:`detect_peaks`).
_NOISE_MODELS: dict[tuple, NoiseCorrelation] = {}
_NOISE_MODELS_MAX = 8


def _check_peak_settings(peak_omega: float, peak_nu_min: float, peak_rel_width: float = 0.0) -> None:
    if peak_nu_min < 0:
        raise ValueError(f"peak_nu_min={peak_nu_min} must be >= 0 (only strict maxima are visited)")
    if peak_omega <= 0:
        raise ValueError(f"peak_omega={peak_omega} must be > 0")
    if not peak_rel_width >= 0:
        raise ValueError(f"peak_rel_width={peak_rel_width} must be >= 0")


def _step(t: torch.Tensor) -> torch.Tensor:
    """Quintic smooth step ``t^3 (10 - 15 t + 6 t^2)`` on [0, 1] (C2)."""
    t = t.clamp(0.0, 1.0)
    return t**3 * (10.0 + t * (-15.0 + 6.0 * t))


def _step_derivatives(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_step` and its first two derivatives ``30 t^2 (1 - t)^2``, ``60 t (1 - t) (1 - 2 t)`` (0 off [0, 1])."""
    t = t.clamp(0.0, 1.0)
    return _step(t), 30.0 * t**2 * (1.0 - t) ** 2, 60.0 * t * (1.0 - t) * (1.0 - 2.0 * t)


def _kernels(ny: int, nx: int, s: float) -> dict[str, torch.Tensor]:
    """FPFS weights of every moment on the rfft half plane (complex128), Nyquist row/column zeroed."""
    ky = 2.0 * math.pi * torch.fft.fftfreq(ny, dtype=torch.float64)
    kx = 2.0 * math.pi * torch.fft.rfftfreq(nx, dtype=torch.float64)
    ky, kx = torch.meshgrid(ky, kx, indexing="ij")
    sx, sy = kx * s, ky * s
    k2 = sx * sx + sy * sy
    gauss = torch.exp(-0.5 * k2)
    if nx % 2 == 0:
        gauss[:, -1] = 0.0
    if ny % 2 == 0:
        gauss[ny // 2, :] = 0.0
    q1 = sx * sx - sy * sy
    q2 = 2.0 * sx * sy
    real = {
        "m00": gauss,
        "m2c": q1 * gauss,
        "m2s": q2 * gauss,
        "a1": (2.0 * k2 - q1 * q1) * gauss,
        "a2": (2.0 * k2 - q2 * q2) * gauss,
        "b12": q1 * q2 * gauss,
    }
    out = {k: v.to(torch.complex128) for k, v in real.items()}
    # Gradient of F per pixel: d/dp sum W f exp(i k.p) = sum i k W f exp(i k.p).
    out["dx"] = 1j * (kx * gauss).to(torch.complex128)
    out["dy"] = 1j * (ky * gauss).to(torch.complex128)
    # Gradients of M2c and M2s (the interpolation's response terms, :func:`detect_exposures`).
    for name in ("m2c", "m2s"):
        out[f"dx_{name}"] = 1j * (kx * real[name]).to(torch.complex128)
        out[f"dy_{name}"] = 1j * (ky * real[name]).to(torch.complex128)
    return out


#: The moments :func:`detect_peaks` needs (the rest of :func:`_kernels` serve :func:`detect_exposures`).
_GRID_MOMENTS = ("m00", "m2c", "m2s", "a1", "a2", "b12", "dx", "dy")


def _centred_psf(psf: torch.Tensor, ny: int, nx: int) -> torch.Tensor:
    """The PSF (centre pixel ``(h//2, w//2)``) on an (ny, nx) grid with its centre at pixel (0, 0)."""
    ph, pw = psf.shape
    if ph > ny or pw > nx:
        raise ValueError(f"PSF image {ph}x{pw} is larger than the image {ny}x{nx}")
    out = torch.zeros((ny, nx), dtype=torch.float64)
    rows = (torch.arange(ph) - ph // 2) % ny
    cols = (torch.arange(pw) - pw // 2) % nx
    out[rows[:, None], cols[None, :]] = psf.to(torch.float64)
    return out


def _inverse_psf(psf_t: torch.Tensor, ny: int, nx: int, psf_floor: float) -> torch.Tensor:
    """``1/P`` on the rfft half plane of an (ny, nx) grid (0 where ``|P| <= psf_floor``); ``psf_t`` of unit sum."""
    p_f = torch.fft.rfft2(_centred_psf(psf_t, ny, nx))
    ok = p_f.abs() > psf_floor
    return torch.where(ok, 1.0 / torch.where(ok, p_f, torch.ones_like(p_f)), torch.zeros_like(p_f))


def _moment_images(
    img: torch.Tensor,
    psf_t: torch.Tensor,
    s: float,
    psf_floor: float,
    names: tuple[str, ...] = _GRID_MOMENTS,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Moment images ``M_a(p)`` of the kernels ``names`` of :func:`_kernels`, and ``1/P``."""
    ny, nx = img.shape
    psf_sum = float(psf_t.sum())
    if not math.isfinite(psf_sum) or psf_sum <= 0:
        raise ValueError(f"PSF sum {psf_sum} is not positive: the PSF model is unusable")
    inv_p = _inverse_psf(psf_t / psf_sum, ny, nx, psf_floor)
    f = torch.fft.rfft2(img) * inv_p
    npix = ny * nx
    kern = _kernels(ny, nx, s)
    return {k: npix * torch.fft.irfft2(kern[k] * f, s=(ny, nx)) for k in names}, inv_p


def moment_images(
    image: Any,
    psf: Any,
    pixel_scale_arcsec: float = 0.1,
    sigma_arcsec: float = fpfs.FpfsSettings.sigma_arcsec,
    psf_floor: float = fpfs.FpfsSettings.psf_floor,
) -> dict[str, np.ndarray]:
    """The moments of every kernel (``m00, m2c, m2s, a1, a2, b12, dx, dy``) centred on every pixel."""
    img = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float64))
    psf_t = torch.as_tensor(np.ascontiguousarray(psf, dtype=np.float64))
    mom, _ = _moment_images(img, psf_t, float(sigma_arcsec) / float(pixel_scale_arcsec), psf_floor)
    return {k: v.numpy() for k, v in mom.items()}


class NoiseCorrelation:
    """``Cov(M_a(p + D), M_b(p))`` over the offsets ``D`` (an (H, W) image, cyclic) for white pixel noise.

    ``sigma_n^2 N sum_k w_a conj(w_b) |1/P|^2 exp(i k.D)`` (``N`` pixels: the transforms are unnormalised),
    computed once per pair of kernels.  Call with two kernel names of :func:`_kernels`.
    """

    def __init__(self, shape: tuple[int, int], inv_p: torch.Tensor, s: float, noise_var: float):
        self.ny, self.nx = int(shape[0]), int(shape[1])
        self._inv_p2 = inv_p.abs() ** 2
        self._scale = float(noise_var) * float(self.ny * self.nx) ** 2
        self._kern = _kernels(self.ny, self.nx, s)
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        #: ``Cov((L y)_i, y_j)`` matrices of :func:`_detect_core` per neighbourhood.
        self.lc_cache: dict[bytes, torch.Tensor] = {}

    def __call__(self, a: str, b: str) -> torch.Tensor:
        if (a, b) not in self._cache:
            spec = self._kern[a] * self._kern[b].conj() * self._inv_p2
            self._cache[(a, b)] = self._scale * torch.fft.irfft2(spec, s=(self.ny, self.nx))
        return self._cache[(a, b)]


def detect_peaks(
    image: Any,
    psf: Any,
    pixel_scale_arcsec: float = 0.1,
    noise_sigma: float = 0.0,
    *,
    sigma_arcsec: float = fpfs.FpfsSettings.sigma_arcsec,
    c_ratio: float = fpfs.FpfsSettings.c_ratio,
    snr_min: float = 10.0,
    selection_bin_width: float = fpfs.FpfsSettings.selection_bin_width,
    peak_radius_pix: int = PEAK_RADIUS_PIX_DEFAULT,
    peak_inner_pix: float = PEAK_INNER_PIX_DEFAULT,
    peak_omega: float = PEAK_OMEGA_DEFAULT,
    peak_nu_min: float = 0.0,
    peak_rel_width: float = 0.0,
    border_pix: int | None = None,
    psf_floor: float = fpfs.FpfsSettings.psf_floor,
    noise_bias_correction: bool = True,
) -> dict[str, np.ndarray]:
    """Detect sources as weighted peaks of the smoothed deconvolved image and measure their shear.

    Args:
        image: (H, W) background-subtracted image with white Gaussian pixel noise of std ``noise_sigma``.
        psf: (h, w) PSF image (pixel included) centred on ``(h//2, w//2)``; any normalisation.
        pixel_scale_arcsec, sigma_arcsec, c_ratio, psf_floor: as :func:`fpfs.measure_stamps`.
        snr_min, selection_bin_width: the smooth FPFS S/N weight ``u`` (0 at ``snr_min``).
        peak_radius_pix: a detection exceeds every pixel within this radius (in ``F``).
        peak_omega, peak_nu_min: the peak step rises from ``peak_nu_min`` to ``peak_nu_min + peak_omega``
            noise sigmas of each neighbour difference (``peak_nu_min >= 0``: strict maxima only, which
            are all this function visits).
        peak_rel_width: ``kappa >= 0``; the step's unit is ``sqrt(sigma_v^2 + (kappa F(c))^2)`` instead of
            the difference's noise ``sigma_v`` (a wider ramp for bright sources; 0: ``sigma_v``).
        border_pix: pixels this close to the image edge are not detections (the transforms are
            cyclic); default ``peak_radius_pix`` + 3 kernel sigmas.
        noise_bias_correction: subtract the noise term of the responses (Stein's lemma).

    ``noise_sigma = 0`` (noiseless image): every strict maximum is a detection with weight 1.

    Returns numpy arrays, one entry per detection: ``x, y`` (pixel column, row), ``weight`` (``w``),
    ``w_det`` (``T``), ``snr``, ``e1, e2``, ``phi1, phi2`` (``w e``) and ``r11, r12, r21, r22``
    (``d phi_a / d g_b``, noise term removed). Ensemble: :func:`ensemble_shear`.
    """
    img = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float64))
    psf_t = torch.as_tensor(np.ascontiguousarray(psf, dtype=np.float64))
    if img.ndim != 2 or psf_t.ndim != 2:
        raise ValueError(
            f"image and psf must be 2-d arrays, got shapes {tuple(img.shape)}, {tuple(psf_t.shape)}"
        )
    _check_peak_settings(peak_omega, peak_nu_min, peak_rel_width)
    if not torch.isfinite(img).all():
        raise ValueError("image has non-finite pixels: fill or mask them before detection")
    ny, nx = img.shape
    s = float(sigma_arcsec) / float(pixel_scale_arcsec)
    offs = peak_offsets(peak_radius_pix, peak_inner_pix)
    if border_pix is None:
        border_pix = int(peak_radius_pix) + int(math.ceil(3.0 * s))

    mom, inv_p = _moment_images(img, psf_t, s, psf_floor, names=_GRID_MOMENTS + _GRADIENTS2)
    var = float(noise_sigma) ** 2
    cov_fn = None
    lc_cache = None
    if var > 0:
        # The noise model depends on the PSF, the image shape, the kernel and the noise level only: kept
        # for the next image with the same ones (a survey block, a simulation's scenes).
        key = (hashlib.sha1(psf_t.numpy().tobytes()).hexdigest(), psf_t.shape, ny, nx, s, psf_floor, var)
        cached = _NOISE_MODELS.pop(key, None)
        cov_image = cached if cached is not None else NoiseCorrelation((ny, nx), inv_p, s, var)
        _NOISE_MODELS[key] = cov_image
        while len(_NOISE_MODELS) > _NOISE_MODELS_MAX:
            _NOISE_MODELS.pop(next(iter(_NOISE_MODELS)))
        lc_cache = cov_image.lc_cache

        def cov_fn(a: str, b: str, dxy: np.ndarray) -> torch.Tensor:
            img_ab = cov_image(a, b)
            return img_ab[torch.as_tensor(dxy[:, 1] % ny), torch.as_tensor(dxy[:, 0] % nx)]

    valid = torch.zeros((ny, nx), dtype=torch.bool)
    bd = int(border_pix)
    valid[bd : ny - bd, bd : nx - bd] = True
    return _detect_core(
        mom,
        cov_fn,
        valid,
        offs,
        lc_cache=lc_cache,
        c_ratio=c_ratio,
        snr_min=snr_min,
        selection_bin_width=selection_bin_width,
        peak_omega=peak_omega,
        peak_nu_min=peak_nu_min,
        peak_rel_width=peak_rel_width,
        noise_bias_correction=noise_bias_correction,
    )


def _detect_core(
    mom: dict[str, torch.Tensor],
    cov_fn,
    valid: torch.Tensor,
    offs: np.ndarray,
    *,
    c_ratio: float,
    snr_min: float,
    selection_bin_width: float,
    peak_omega: float,
    peak_nu_min: float,
    peak_rel_width: float,
    noise_bias_correction: bool,
    resp_extra: dict[tuple[str, int], torch.Tensor] | None = None,
    lc_cache: dict | None = None,
) -> dict[str, np.ndarray]:
    """Detections and their responses from moment images on one grid (see the module docstring).

    ``mom`` holds (H, W) images of every kernel of :func:`_kernels` in the grid's frame (gradients per grid
    pixel); ``cov_fn(a, b, D)`` returns ``Cov(M_a(p + D), M_b(p))`` for integer grid offsets ``D`` (m, 2)
    ``(dx, dy)`` (None: noiseless); ``valid`` marks the grid pixels that may be detections (their whole
    neighbourhood must hold valid moments). ``resp_extra[(name, b)]`` (images) are added to the shear
    responses of ``m00``, ``m2c``, ``m2s`` (the interpolation terms of :func:`detect_exposures`).
    """
    f_img = mom["m00"]
    ny, nx = f_img.shape
    n_nb = len(offs)
    noisy = cov_fn is not None
    zero = np.zeros((1, 2), dtype=np.int64)
    sigma_f = math.sqrt(float(cov_fn("m00", "m00", zero)[0])) if noisy else 0.0

    # Candidates: strict maxima of F over the neighbourhood, above the S/N floor.
    # (Compared at the pixels above the floor only: a few percent of the grid.)
    cand = valid.clone()
    if snr_min > 0 and noisy:
        cand &= f_img > snr_min * sigma_f
    cy, cx = torch.nonzero(cand, as_tuple=True)
    f_c = f_img[cy, cx]
    peak = torch.ones(len(cy), dtype=torch.bool)
    for dx, dy in offs:
        peak &= f_c > f_img[(cy + int(dy)) % ny, (cx + int(dx)) % nx]
    cy, cx = cy[peak], cx[peak]
    n = len(cy)

    # The detection pixels and their neighbourhoods (n, n_nb), gathered from every image at once.
    off_x = torch.as_tensor(np.asarray(offs[:, 0], dtype=np.float64))
    off_y = torch.as_tensor(np.asarray(offs[:, 1], dtype=np.float64))
    nb_rows = (cy[:, None] + torch.as_tensor(offs[:, 1])) % ny
    nb_cols = (cx[:, None] + torch.as_tensor(offs[:, 0])) % nx

    def at(name: str) -> torch.Tensor:
        return mom[name][cy, cx]

    def around(img: torch.Tensor) -> torch.Tensor:
        return img[nb_rows, nb_cols]

    y = torch.empty((n, 3 + n_nb), dtype=torch.float64)
    y[:, 0], y[:, 1], y[:, 2] = at("m00"), at("m2c"), at("m2s")
    y[:, 3:] = around(mom["m00"])
    ly = torch.empty((2, n, 3 + n_nb), dtype=torch.float64)
    ly[0, :, 0], ly[0, :, 1], ly[0, :, 2] = at("m2c"), -at("a1"), at("b12")
    ly[1, :, 0], ly[1, :, 1], ly[1, :, 2] = at("m2s"), at("b12"), -at("a2")
    grad_nb = around(mom["dx"]), around(mom["dy"])  # grad F at the neighbours
    ly[0, :, 3:] = around(mom["m2c"]) - (off_x * grad_nb[0] - off_y * grad_nb[1])
    ly[1, :, 3:] = around(mom["m2s"]) - (off_y * grad_nb[0] + off_x * grad_nb[1])
    if resp_extra is not None:
        for b in range(2):
            for i, name in enumerate(("m00", "m2c", "m2s")):
                ly[b, :, i] += resp_extra[(name, b)][cy, cx]
            ly[b, :, 3:] += around(resp_extra[("m00", b)])

    # Noise scales (constants of the noise and PSF only: no shear response).
    if noisy:
        c00 = cov_fn("m00", "m00", np.asarray(offs, dtype=np.int64)).to(torch.float64)
        sigma_v = (2.0 * (sigma_f**2 - c00)).clamp_min(1e-300).sqrt()
    else:
        sigma_v = torch.ones(n_nb, dtype=torch.float64)
    c_const = c_ratio * sigma_f

    out: dict[str, np.ndarray] = {
        "x": cx.numpy().astype(np.int64),
        "y": cy.numpy().astype(np.int64),
    }
    if n == 0:
        for k in ("weight", "w_det", "snr", "e1", "e2", "phi1", "phi2", "r11", "r12", "r21", "r22") + tuple(
            f"dphi{a}_d{c}" for a in (1, 2) for c in "xy"
        ):
            out[k] = np.zeros(0)
        return out
    if noisy and noise_bias_correction:
        lc_key = np.asarray(offs).tobytes()
        lc = lc_cache.get(lc_key) if lc_cache is not None else None
        if lc is None:
            lc = _lc_matrices(cov_fn, offs)  # (2, d, d)
            if lc_cache is not None:
                lc_cache[lc_key] = lc
    else:
        lc = None
    vals, jac, noise_term, t_det, u = _phi_derivatives(
        y,
        sigma_v if noisy else None,
        sigma_f,
        c_const,
        lc,
        snr_min=snr_min,
        selection_bin_width=selection_bin_width,
        peak_omega=peak_omega,
        peak_nu_min=peak_nu_min,
        peak_rel_width=peak_rel_width,
    )
    resp = torch.einsum("nai,bni->nab", jac, ly)  # (n, 2 (a), 2 (b))
    if noise_term is not None:
        resp = resp - noise_term
    # Gradient of phi with respect to the detection's position (every y moved with it): what a shear
    # about another point adds (:func:`response_about`).
    grad_y = torch.empty((2, n, 3 + n_nb), dtype=torch.float64)
    for k, (gname_x, gname_y) in enumerate(_GRADIENT_NAMES):
        grad_y[0, :, k], grad_y[1, :, k] = at(gname_x), at(gname_y)
    grad_y[0, :, 3:], grad_y[1, :, 3:] = grad_nb
    gphi = torch.einsum("nai,kni->nak", jac, grad_y)  # (n, 2 (a), 2 (x, y))
    d = y[:, 0] + c_const
    e1, e2 = -y[:, 1] / d, -y[:, 2] / d
    out.update(
        weight=(t_det * u).numpy(),
        w_det=t_det.numpy(),
        snr=(y[:, 0] / sigma_f).numpy() if noisy else np.full(n, np.inf),
        e1=e1.numpy(),
        e2=e2.numpy(),
        phi1=vals[:, 0].numpy(),
        phi2=vals[:, 1].numpy(),
        r11=resp[:, 0, 0].numpy(),
        r12=resp[:, 0, 1].numpy(),
        r21=resp[:, 1, 0].numpy(),
        r22=resp[:, 1, 1].numpy(),
        dphi1_dx=gphi[:, 0, 0].numpy(),
        dphi1_dy=gphi[:, 0, 1].numpy(),
        dphi2_dx=gphi[:, 1, 0].numpy(),
        dphi2_dy=gphi[:, 1, 1].numpy(),
    )
    return out


def _phi_derivatives(
    y: torch.Tensor,
    sigma_v: torch.Tensor | None,
    sigma_f: float,
    c_const: float,
    lc: torch.Tensor | None,
    *,
    snr_min: float,
    selection_bin_width: float,
    peak_omega: float,
    peak_nu_min: float,
    peak_rel_width: float,
):
    """``Phi_a(y) = w e_a`` of every detection (module docstring), its gradient and the noise term, closed form.

    ``y`` (n, d) are the variables of :func:`_detect_core` (``M00, M2c, M2s, F(c + d_j)``), ``sigma_v``
    (d - 3,) the noise of the neighbour differences (None: noiseless, ``w = 1``), ``lc`` (2, d, d) the
    matrices of :func:`_lc_matrices` (None: no noise term). Returns ``phi`` (n, 2), ``grad phi`` (n, 2, d),
    ``sum_ij d_i d_j Phi_a lc_bij`` (n, 2, 2) or None, ``T`` and ``u`` (n,).

    With ``z_j = ((M00 - F_j) / sigma_v_j - nu_min) / omega`` and ``b_j = e_0 - e_{3+j}`` (``dz_j / dy =
    b_j / (sigma_v_j omega)``), ``T = prod_j t(z_j)`` has the gradient ``T g`` and the Hessian
    ``T (g g^T + sum_j beta_j b_j b_j^T)``, where ``g = sum_j alpha_j b_j`` and ``alpha_j``, ``beta_j`` are
    the first two derivatives of ``log t(z_j)`` in ``M00``; a factor ``t_j = 0`` has ``t'_j = t''_j = 0``
    (the step is flat below 0), so then ``T``, its gradient and its Hessian all vanish.

    ``peak_rel_width = kappa > 0``: ``z_j = ((M00 - F_j) / s_j - nu_min) / omega`` with
    ``s_j = sqrt(sigma_v_j^2 + kappa^2 M00^2)``, so ``dz_j / dy = r_m e_0 - r_f e_{3+j}`` with ``r_f =
    1 / (s_j omega)``, ``r_m = r_f - D_j q_j / (s_j^2 omega)`` (``D_j = M00 - F_j``, ``q_j = ds_j / dM00 =
    kappa^2 M00 / s_j``), and ``z_j`` has the Hessian ``z_mm e_0 e_0^T + z_mf (e_0 e_{3+j}^T + e_{3+j}
    e_0^T)``, ``z_mf = q_j / (s_j^2 omega)``, ``z_mm = (-2 q_j + D_j (2 q_j^2 / s_j - kappa^2 sigma_v_j^2 /
    s_j^3)) / (s_j^2 omega)``. Then ``g = sum_j (t'_j / t_j) dz_j / dy`` and the Hessian of ``log T`` is
    ``sum_j (t''_j / t_j - (t'_j / t_j)^2) dz_j/dy dz_j/dy^T + (t'_j / t_j) Hess z_j``; its contraction with
    ``lc_b`` again needs only ``lc_b00``, ``lc_b0j + lc_bj0`` and ``lc_bjj``.  With ``w = T u``
    and ``e_a = -y_a / (M00 + C)`` the product rule gives the rest.  The Hessian of ``Phi`` is never
    formed: its contraction with ``lc_b`` needs ``g^T lc_b g``, the diagonal ``b_j^T lc_b b_j`` and the
    first three rows and columns of ``lc_b`` only (O(d^2) per detection, no (d, d) array each).  Equal to
    automatic differentiation (:func:`_phi_derivatives_autograd`) to rounding (``test_detect.py``).
    """
    n, d = y.shape
    m00 = y[:, 0]
    den = m00 + c_const
    e = -y[:, 1:3] / den[:, None]  # (n, 2)
    if sigma_v is None:
        t_det = torch.ones(n, dtype=torch.float64)
        u = torch.ones(n, dtype=torch.float64)
        grad_w = torch.zeros((n, d), dtype=torch.float64)
        g = None
    else:
        diff = m00[:, None] - y[:, 3:]  # (n, d - 3)
        if peak_rel_width > 0:
            # s_j = sqrt(sigma_v_j^2 + (kappa M00)^2): z_j depends on M00 through s_j too.
            k2 = peak_rel_width**2
            scale = (sigma_v**2 + k2 * m00[:, None] ** 2).sqrt()
        else:
            scale = sigma_v.expand(n, -1)
        z = (diff / scale - peak_nu_min) / peak_omega
        s, s1, s2 = _step_derivatives(z)
        pos = s > 0
        safe = torch.where(pos, s, torch.ones_like(s))
        rate_f = 1.0 / (scale * peak_omega)  # -dz_j / dF_j
        if peak_rel_width > 0:
            q = k2 * m00[:, None] / scale  # ds_j / dM00
            rate_m = rate_f - diff * q / (scale**2 * peak_omega)  # dz_j / dM00
            # d2 z_j / dM00^2 and d2 z_j / dM00 dF_j (d2 s_j / dM00^2 = kappa^2 sigma_v_j^2 / s_j^3).
            z_mm = (-2.0 * q + diff * (2.0 * q**2 / scale - k2 * sigma_v**2 / scale**3)) / (
                scale**2 * peak_omega
            )
            z_mf = q / (scale**2 * peak_omega)
        else:
            rate_m = rate_f
        a1 = torch.where(pos, s1 / safe, torch.zeros_like(s))  # d log t_j / d z_j
        a2 = torch.where(pos, s2 / safe, torch.zeros_like(s))  # t''_j / t_j
        alpha = a1 * rate_f  # -d log t_j / d F_j
        alpha_m = a1 * rate_m if peak_rel_width > 0 else alpha  # d log t_j / d M00
        beta = a2 * rate_f**2 - alpha**2  # d2 log t_j / d F_j^2
        t_det = torch.prod(s, dim=1)
        u, u1, u2 = fpfs.selection_weight(m00 / sigma_f, snr_min, selection_bin_width)
        u1, u2 = u1 / sigma_f, u2 / sigma_f**2
        g = torch.zeros((n, d), dtype=torch.float64)  # gradient of log T
        g[:, 0] = alpha_m.sum(dim=1)
        g[:, 3:] = -alpha
        grad_w = t_det[:, None] * u[:, None] * g
        grad_w[:, 0] += t_det * u1
    w = t_det * u
    # grad e_a = -(e_a e_0 + e_a') / D with e_a' the unit vector of M2c (a = 1) or M2s (a = 2).
    jac = e[:, :, None] * grad_w[:, None, :]
    jac[:, :, 0] -= (w / den)[:, None] * e
    jac[:, 0, 1] -= w / den
    jac[:, 1, 2] -= w / den
    vals = w[:, None] * e
    if lc is None:
        return vals, jac, None, t_det, u
    sym = lc + lc.transpose(1, 2)  # (2, d, d)
    l00 = lc[:, 0, 0]  # (2,)
    # <Hess w, lc_b> = T [u (g^T lc_b g + sum_j beta_j b_j^T lc_b b_j) + u' g . sym_b[:, 0] + u'' lc_b00].
    if g is None:
        hw = torch.zeros((n, 2), dtype=torch.float64)
    else:
        quad = torch.einsum("bni,ni->nb", torch.matmul(g, lc), g)
        ljj = torch.diagonal(lc, dim1=1, dim2=2)[:, 3:]  # (2, d - 3)
        if peak_rel_width > 0:
            # sum_j [grad z_j^T lc_b grad z_j (t''_j / t_j - (t'_j / t_j)^2) + <Hess z_j, lc_b> t'_j / t_j]
            # with grad z_j = rate_m e_0 - rate_f e_{3+j} and Hess z_j = z_mm e_0 e_0^T + z_mf (e_0 e_{3+j}^T
            # + e_{3+j} e_0^T).
            b_mm = a2 * rate_m**2 - alpha_m**2
            b_mf = a2 * rate_m * rate_f - alpha_m * alpha
            curv = (
                b_mm.sum(dim=1)[:, None] * l00
                - b_mf @ sym[:, 0, 3:].T
                + beta @ ljj.T
                + (a1 * z_mm).sum(dim=1)[:, None] * l00
                + (a1 * z_mf) @ sym[:, 0, 3:].T
            )
        else:
            curv = beta @ (l00[:, None] - sym[:, 0, 3:] + ljj).T
        hw = t_det[:, None] * (
            u[:, None] * (quad + curv) + u1[:, None] * (g @ sym[:, :, 0].T) + u2[:, None] * l00
        )
    # Hess Phi_a = e_a Hess w + grad w (grad e_a)^T + grad e_a (grad w)^T + w Hess e_a, with
    # Hess e_a: [0, 0] = 2 e_a / D^2, [0, a'] = [a', 0] = 1 / D^2.
    q = grad_w @ sym[:, :, :3]  # (2, n, 3): grad w^T sym_b, first three columns
    cross = -(e[:, :, None] * q[:, :, 0].T[:, None, :] + q[:, :, 1:3].permute(1, 2, 0)) / den[:, None, None]
    hess_e = (2.0 * e[:, :, None] * l00 + sym[:, 0, 1:3].T) / (den**2)[:, None, None]
    noise_term = e[:, :, None] * hw[:, None, :] + cross + w[:, None, None] * hess_e
    return vals, jac, noise_term, t_det, u


def _phi_derivatives_autograd(
    y: torch.Tensor,
    sigma_v: torch.Tensor | None,
    sigma_f: float,
    c_const: float,
    lc: torch.Tensor | None,
    *,
    snr_min: float,
    selection_bin_width: float,
    peak_omega: float,
    peak_nu_min: float,
    peak_rel_width: float,
):
    """:func:`_phi_derivatives` by automatic differentiation (``torch.func``; the reference of the tests)."""
    from torch.func import hessian, jacrev, vmap

    noisy = sigma_v is not None

    def phi(yv: torch.Tensor) -> torch.Tensor:
        m00 = yv[0]
        if noisy:
            v = (m00 - yv[3:]) / (sigma_v**2 + (peak_rel_width * m00) ** 2).sqrt()
            t_det = torch.prod(_step((v - peak_nu_min) / peak_omega))
            u, _, _ = fpfs.selection_weight((m00 / sigma_f)[None], snr_min, selection_bin_width)
            w = t_det * u[0]
        else:
            w = torch.ones((), dtype=yv.dtype)
        d = m00 + c_const
        return torch.stack([-w * yv[1] / d, -w * yv[2] / d])

    vals = vmap(phi)(y)
    jac = vmap(jacrev(phi))(y)
    noise_term = None
    if lc is not None:
        noise_term = torch.einsum("naij,bij->nab", vmap(hessian(phi))(y), lc)
    if noisy:
        v = (y[:, :1] - y[:, 3:]) / (sigma_v**2 + (peak_rel_width * y[:, :1]) ** 2).sqrt()
        t_det = torch.prod(_step((v - peak_nu_min) / peak_omega), dim=1)
        u, _, _ = fpfs.selection_weight(y[:, 0] / sigma_f, snr_min, selection_bin_width)
    else:
        t_det = torch.ones(len(y), dtype=torch.float64)
        u = torch.ones(len(y), dtype=torch.float64)
    return vals, jac, noise_term, t_det, u


def response_about(res: dict[str, np.ndarray], x0: float, y0: float) -> dict[str, np.ndarray]:
    """Responses ``r11, r12, r21, r22`` of each detection to a shear about the grid point ``(x0, y0)``.

    :func:`detect_peaks` differentiates every detection for a shear about its own pixel; a shear about
    another point ``O`` also moves the scene by ``g S (p - O)`` relative to the pixel ``p``, which adds
    ``-(S_b (p - O)) . grad_p phi_a``. Over a statistically homogeneous sky (or uniformly random
    sub-pixel positions) that term averages to zero, so both are unbiased responses; in image
    simulations with a known shear centre the response about it follows each scene's own shear, so the
    +-g pairs cancel far better (an exact control variate, for simulations only).
    """
    dx = res["x"].astype(np.float64) - float(x0)
    dy = res["y"].astype(np.float64) - float(y0)
    out = {}
    for a in (1, 2):
        gx, gy = res[f"dphi{a}_dx"], res[f"dphi{a}_dy"]
        out[f"r{a}1"] = res[f"r{a}1"] - (dx * gx - dy * gy)
        out[f"r{a}2"] = res[f"r{a}2"] - (dy * gx + dx * gy)
    return out


def _lc_matrices(cov_fn, offs: np.ndarray) -> torch.Tensor:
    """``Cov((L_b y)_i, y_j)`` (2, d, d) for the variables of :func:`_detect_core` (module docstring)."""
    n_nb = len(offs)
    d = 3 + n_nb
    pos = np.concatenate([np.zeros((3, 2), dtype=np.int64), np.asarray(offs, dtype=np.int64)], axis=0)
    var_names = ["m00", "m2c", "m2s"] + ["m00"] * n_nb
    # (L_b y)_i as sums of coefficient x moment at pos[i].
    terms: list[list[list[tuple[float, str]]]] = [[], []]
    terms[0] += [[(1.0, "m2c")], [(-1.0, "a1")], [(1.0, "b12")]]
    terms[1] += [[(1.0, "m2s")], [(1.0, "b12")], [(-1.0, "a2")]]
    for dx, dy in offs:
        dx, dy = float(dx), float(dy)
        terms[0].append([(1.0, "m2c"), (-dx, "dx"), (dy, "dy")])
        terms[1].append([(1.0, "m2s"), (-dy, "dx"), (-dx, "dy")])
    diff = (pos[:, None, :] - pos[None, :, :]).reshape(-1, 2)  # pos_i - pos_j, row-major in (i, j)
    names = sorted({nm for t in terms for row in t for _, nm in row})
    lc = torch.zeros((2, d, d), dtype=torch.float64)
    for j_name in ("m00", "m2c", "m2s"):
        jmask = torch.tensor([nm == j_name for nm in var_names])
        table = {a: cov_fn(a, j_name, diff).to(torch.float64).reshape(d, d) for a in names}
        for b in range(2):
            for i in range(d):
                acc = torch.zeros(d, dtype=torch.float64)
                for coef, a_name in terms[b][i]:
                    acc = acc + coef * table[a_name][i]
                lc[b, i] = torch.where(jmask, acc, lc[b, i])
    return lc


def ensemble_shear(res: dict[str, np.ndarray]) -> tuple[float, float]:
    """``(g1, g2) = (sum phi1 / sum r11, sum phi2 / sum r22)`` of one :func:`detect_peaks` result."""
    return float(np.sum(res["phi1"]) / np.sum(res["r11"])), float(np.sum(res["phi2"]) / np.sum(res["r22"]))


# ----------------------------------------------------------------------------------------------------
# Several exposures: moments interpolated onto a common grid, mapped to its frame, combined.


@dataclasses.dataclass(frozen=True)
class GridExposure:
    """One exposure of a region, placed on the detection grid.

    ``jacobian`` is ``d(u, v) / d(x, y)`` (arcsec per pixel; columns ``d/dx``, ``d/dy``) from the exposure's
    pixels to the grid frame ``(u, v)``, whose pixel ``(i, j)`` sits at ``(u, v) = (i, j) h``;
    ``origin_pix`` is the exposure pixel position ``(x, y)`` of grid pixel ``(0, 0)``.
    """

    image: np.ndarray
    psf: np.ndarray
    noise_sigma: float
    jacobian: np.ndarray
    origin_pix: tuple[float, float]
    #: (ny, nx) bool, True where a pixel is masked (its value is not used: it is set to 0). None: no mask.
    mask: np.ndarray | None = None
    #: (ny, nx) bool, True where the exposure has no data (beyond its detector's edge; set to 0): treated
    #: like the image's own edges, i.e. no moment within 3 kernel sigmas + 2 pixels of it is used. A
    #: cut-out padded this way has the same content whatever part of the detector it was cut from.
    outside: np.ndarray | None = None


class _KeysTaps:
    """Keys (a = -1/2) cubic interpolation of images at fixed fractional pixel positions (cyclic indices).

    Exact for polynomials of degree <= 2, so the interpolated moments keep their shear responses to third
    order. ``px``, ``py`` (any shape, flattened to ``P`` points) on images of ``shape`` (ny, nx): the 4 x 4
    taps and weights are computed once and serve any number of images. Called on a (ny, nx, n) stack it
    returns (P, n) values; with ``tap_moments`` (P, 3, n): the value and ``sum_p c_p (p - q)_x img(p)``,
    ``sum_p c_p (p - q)_y img(p)`` (the taps' offsets from the point ``q``, pixels). With ``combine``
    (m, k n) it returns (P, m), those values (flattened per point) times ``combine.T``, formed chunk by
    chunk. The taps of all images are gathered at once as rows of the stack (numpy's ``take`` of rows is
    several times faster than torch's indexing on the CPU), in chunks of points that stay in the cache.
    """

    _CHUNK = 1024

    def __init__(self, px: torch.Tensor, py: torch.Tensor, shape: tuple[int, int]):
        ny, nx = int(shape[0]), int(shape[1])
        px = np.asarray(px, dtype=np.float64).reshape(-1)
        py = np.asarray(py, dtype=np.float64).reshape(-1)
        x0, y0 = np.floor(px), np.floor(py)
        tx, ty = px - x0, py - y0
        wx, wy = self._weights(tx), self._weights(ty)  # (P, 4)
        taps = np.arange(-1, 3)
        ix, iy = x0.astype(np.int64), y0.astype(np.int64)
        # Flat indices of the 4 x 4 taps (row-major), wrapped around the edges (cyclic) where they reach out.
        self._flat = (iy * nx + ix)[:, None] + (taps[:, None] * nx + taps[None, :]).reshape(16)
        out = np.flatnonzero((ix < 1) | (ix > nx - 3) | (iy < 1) | (iy > ny - 3))
        if len(out):
            cols = (ix[out, None] + taps) % nx
            rows = (iy[out, None] + taps) % ny
            self._flat[out] = (rows[:, :, None] * nx + cols[:, None, :]).reshape(-1, 16)
        # Weights of the value and of the x, y tap moments, c_p (1, (p - q)_x, (p - q)_y), are separable:
        # (wy wx, wy (wx off_x), (wy off_y) wx).
        self._wy3 = np.stack([wy, wy, wy * (taps - ty[:, None])], axis=1)  # (P, 3, 4)
        self._wx3 = np.stack([wx, wx * (taps - tx[:, None]), wx], axis=1)
        self.shape = (ny, nx)

    @staticmethod
    def _weights(t: np.ndarray) -> np.ndarray:
        """Weights (..., 4) of the taps -1, 0, 1, 2 for the fraction ``t`` in [0, 1]: they lie at distances
        ``1 + t``, ``t``, ``1 - t``, ``2 - t`` (the kernel's two pieces agree, at 0, at distances 1 and 2)."""

        def near(d):
            return (1.5 * d - 2.5) * d * d + 1.0

        def far(d):
            return ((-0.5 * d + 2.5) * d - 4.0) * d + 2.0

        return np.stack([far(1.0 + t), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)

    def __call__(
        self, stack: torch.Tensor, tap_moments: bool = False, combine: torch.Tensor | None = None
    ) -> torch.Tensor:
        ny, nx, n = stack.shape
        if (ny, nx) != self.shape:
            raise ValueError(f"images of shape {(ny, nx)}, taps for {self.shape}")
        rows = stack.reshape(ny * nx, n).contiguous().numpy()
        n_w = 3 if tap_moments else 1
        n_pts = len(self._flat)
        if combine is None:
            res = torch.empty((n_pts, n_w, n), dtype=torch.float64)
        else:
            combine_t = combine.to(torch.float64).T
            res = torch.empty((n_pts, combine_t.shape[1]), dtype=torch.float64)
        for a in range(0, n_pts, self._CHUNK):
            b = min(a + self._CHUNK, n_pts)
            w = np.einsum("pkr,pkc->pkrc", self._wy3[a:b, :n_w], self._wx3[a:b, :n_w]).reshape(b - a, n_w, 16)
            vals = torch.from_numpy(np.matmul(w, np.take(rows, self._flat[a:b], axis=0)))  # (c, n_w, n)
            if combine is None:
                res[a:b] = vals
            else:  # torch's matmul: numpy's BLAS may start threads for this one
                torch.mm(vals.reshape(b - a, n_w * n), combine_t, out=res[a:b])
        return res[:, 0] if combine is None and not tap_moments else res


#: Gradient images of m00, m2c, m2s (the interpolation's response terms).
_GRADIENT_NAMES = (("dx", "dy"), ("dx_m2c", "dy_m2c"), ("dx_m2s", "dy_m2s"))
_GRADIENTS2 = ("dx_m2c", "dy_m2c", "dx_m2s", "dy_m2s")
#: The moment images :func:`detect_exposures` interpolates (the order of their stack).
_EXPOSURE_IMAGES = _GRID_MOMENTS + _GRADIENTS2


def _grid_map(t: torch.Tensor) -> torch.Tensor:
    """(18, 3 n) linear map of an exposure's interpolated images :data:`_EXPOSURE_IMAGES` (``n`` = 12; value,
    x and y tap moments, flattened as by :class:`_KeysTaps`) to the grid frame (``t``: :func:`_frame_matrix`).

    Rows: the 8 moments :data:`_GRID_MOMENTS`; the interpolation terms of the responses of m00, m2c, m2s
    (x 2 shears, row-major); the grid-frame gradients of the grid-frame m2c, m2s (x (d/dx, d/dy)). An
    interpolated moment's derivative under a shear about a point carries -sum_p c_p (S_b (p - q)) . grad M(p):
    with E_ab = sum c (p - q)_a d_b M (pixel frame), -(E_xx - E_yy) for g'1 and -(E_yx + E_xy) for g'2,
    mapped to the grid's moments (T) and shears (the spin-2 block R of T: g'_pix = R^T g_grid). The
    gradients: the pair turned by R, the position by the chain rule.
    """
    n = len(_EXPOSURE_IMAGES)

    def col(k: int, name: str) -> int:  # k: 0 value, 1 x tap moment, 2 y tap moment
        return k * n + _EXPOSURE_IMAGES.index(name)

    out = torch.zeros((18, 3 * n), dtype=torch.float64)
    for i, name in enumerate(_GRID_MOMENTS):
        out[:8, col(0, name)] = t[:, i]
    pix = torch.zeros((6, 3 * n), dtype=torch.float64)  # pixel frame: (m00, m2c, m2s) x (g'1, g'2)
    for ia, (gx_name, gy_name) in enumerate(_GRADIENT_NAMES):
        pix[2 * ia, col(1, gx_name)], pix[2 * ia, col(2, gy_name)] = -1.0, 1.0
        pix[2 * ia + 1, col(2, gx_name)], pix[2 * ia + 1, col(1, gy_name)] = -1.0, -1.0
    rot = t[1:3, 1:3]
    out[8:14] = torch.kron(t[:3, :3], rot) @ pix  # vec(T3 E R^T) = (T3 x R) vec(E)
    grad = torch.zeros((4, 3 * n), dtype=torch.float64)  # pixel frame: (m2c, m2s) x (d/dx, d/dy)
    for m, name in enumerate(_GRADIENTS2):
        grad[m, col(0, name)] = 1.0
    out[14:] = torch.kron(rot, t[6:, 6:]) @ grad
    return out


def _frame_matrix(jac: np.ndarray, grid_scale: float) -> np.ndarray:
    """(8, 8) map of pixel-frame moments (order :data:`_GRID_MOMENTS`) to the grid frame.

    The FPFS moments follow :func:`stamps.sky_frame_moment_transform` (parity, first-order distortion,
    rotation); the gradient is the chain rule ``grad_grid F = h J^-T grad_pix F`` (exact).
    """
    from constellation_assets.shear import stamps

    frame = stamps.sky_frame_transform(np.asarray(jac, dtype=np.float64)[None])
    t = np.zeros((8, 8))
    t[:6, :6] = stamps.sky_frame_moment_transform(frame)[0]
    t[6:, 6:] = grid_scale * np.linalg.inv(np.asarray(jac, dtype=np.float64)).T
    return t


def detect_exposures(
    exposures: list[GridExposure],
    grid_shape: tuple[int, int],
    grid_scale_arcsec: float = 0.1,
    *,
    sigma_arcsec: float = fpfs.FpfsSettings.sigma_arcsec,
    c_ratio: float = fpfs.FpfsSettings.c_ratio,
    snr_min: float = 10.0,
    selection_bin_width: float = fpfs.FpfsSettings.selection_bin_width,
    peak_radius_pix: int = PEAK_RADIUS_PIX_DEFAULT,
    peak_inner_pix: float = PEAK_INNER_PIX_DEFAULT,
    peak_omega: float = PEAK_OMEGA_DEFAULT,
    peak_nu_min: float = 0.0,
    peak_rel_width: float = 0.0,
    psf_floor: float = fpfs.FpfsSettings.psf_floor,
    noise_bias_correction: bool = True,
    mask_radius_sigma: float = 1.0,
    noise_grid_pix: int | None = None,
) -> dict[str, np.ndarray]:
    """:func:`detect_peaks` on several exposures of one region, combined at the moment level.

    Each exposure's moment images (its own PSF, pixel scale and kernel scale ``sigma_arcsec / scale``)
    are interpolated at the grid pixels (Keys cubic), mapped to the grid frame (:func:`_frame_matrix`) and averaged with the
    inverse-variance weights ``a_e = 1 / Var(M00_e)`` (noise and PSF only); the noise covariance of the
    average is ``sum a_e^2 Cov_e / (sum a_e)^2`` with each exposure's stationary correlation taken at the
    grid offsets mapped into its pixels. Detections are grid pixels (``x``, ``y`` = grid column, row);
    each uses the exposures whose moments are valid over its whole neighbourhood, away from the exposure's
    edges (the transforms are cyclic), and with no masked pixel within ``mask_radius_sigma`` kernel sigmas
    (+ 2 pixels of interpolation taps) of the pixel itself (its neighbours' ``F`` only enter the peak
    test, so masks are not grown by the neighbourhood: at 1e-3 cosmic-ray clusters per pixel, 1 sigma
    leaves out ~8 % of an exposure, the neighbourhood would make it ~30 %). Masked pixels are set to 0,
    never interpolated; the exposure sets depend on the detector, not on the sky, so they carry no shear
    response. Pixels with the
    same set are combined and detected together (``n_exposures``, ``exposure_set`` (bit k: exposure k) per
    detection); pixels no exposure covers are not detections.

    Responses: an interpolated moment ``v(q) = sum_p c_p(q) M(p)`` is a linear functional of the image
    like the moments themselves, and its exact derivative under a shear about ``P_c`` is
    ``sum_p c_p [L M(p) - (S (p - P_c)) . grad M(p)]``: the interpolated kernel responses, the move of
    ``q`` relative to ``P_c``, and the taps' own offsets ``sum_p c_p (S (p - q)) . grad M(p)``, which
    is computed too (gradient images of m00, m2c, m2s) and mapped to the grid's moments and shears.
    So the interpolation costs no consistency: for two dithered exposures, one rotated by 30 degrees,
    finite differences match the responses to 6e-4 (the estimator's own discretisation), vs 7e-3
    without the tap terms (3e-3 / 6e-4 with moment images sampled at 1/2 / 1/4 pixel instead)
    (``test_detect.py::test_dithered_rotated_exposures_response_matches_finite_differences``). The tap
    terms' noise covariance is left out of the noise correction (it is second order in the spacing).

    ``noise_grid_pix``: the noise correlations (a function of the PSF, kernel and noise level only, needed at
    offsets of a few pixels) are computed on a grid of this size instead of the exposure's image (its
    periodic images are negligible beyond a few kernel sigmas): ~20x cheaper for survey blocks, results
    equal to 7e-9 at 48 pixels, 1e-13 at 64 (9e-5 at 32) for a 0.35" kernel on 0.1" pixels
    (``test_detect.py``). It must hold the PSF image.
    """
    if not exposures:
        raise ValueError("detect_exposures needs at least one exposure")
    if len(exposures) > 62:
        raise ValueError(
            f"detect_exposures takes at most 62 exposures of a region (exposure sets are int64 bit masks), "
            f"got {len(exposures)}: use smaller blocks"
        )
    _check_peak_settings(peak_omega, peak_nu_min, peak_rel_width)
    gy, gx = int(grid_shape[0]), int(grid_shape[1])
    h = float(grid_scale_arcsec)
    offs = peak_offsets(peak_radius_pix, peak_inner_pix)
    noisy = [float(e.noise_sigma) > 0 for e in exposures]
    if any(noisy) and not all(noisy):
        raise ValueError("detect_exposures: either every exposure has noise_sigma > 0 or none has")
    jj, ii = torch.meshgrid(
        torch.arange(gy, dtype=torch.float64), torch.arange(gx, dtype=torch.float64), indexing="ij"
    )
    per_exp = []
    for k, e in enumerate(exposures):
        img = torch.as_tensor(np.ascontiguousarray(e.image, dtype=np.float64))
        psf_t = torch.as_tensor(np.ascontiguousarray(e.psf, dtype=np.float64))
        masked = None
        if e.mask is not None:
            masked = np.asarray(e.mask, dtype=bool)
            if masked.shape != tuple(img.shape):
                raise ValueError(
                    f"exposure {k}: mask shape {masked.shape} differs from the image's {tuple(img.shape)}"
                )
            if masked.any():
                img = img.masked_fill(torch.as_tensor(masked), 0.0)
            else:
                masked = None
        off_detector = None
        if e.outside is not None:
            off_detector = np.asarray(e.outside, dtype=bool)
            if off_detector.shape != tuple(img.shape):
                raise ValueError(
                    f"exposure {k}: outside shape {off_detector.shape} differs from the image's {tuple(img.shape)}"
                )
            if off_detector.any():
                img = img.masked_fill(torch.as_tensor(off_detector), 0.0)
            else:
                off_detector = None
        if img.ndim != 2 or psf_t.ndim != 2 or not torch.isfinite(img).all():
            raise ValueError(
                f"exposure {k}: image and psf must be finite 2-d arrays (non-finite pixels: mask them)"
            )
        jac = np.asarray(e.jacobian, dtype=np.float64)
        scale = math.sqrt(abs(float(np.linalg.det(jac))))
        s = float(sigma_arcsec) / scale
        mom, inv_p = _moment_images(img, psf_t, s, psf_floor, _EXPOSURE_IMAGES)
        stack = torch.stack([mom.pop(nm) for nm in _EXPOSURE_IMAGES], dim=-1)  # (ny, nx, 12)
        npix = float(img.shape[0] * img.shape[1])
        jinv = np.linalg.inv(jac) * h
        px = float(e.origin_pix[0]) + jinv[0, 0] * ii + jinv[0, 1] * jj
        py = float(e.origin_pix[1]) + jinv[1, 0] * ii + jinv[1, 1] * jj
        margin = int(math.ceil(3.0 * s)) + 2
        ny, nx = img.shape
        valid = (px >= margin) & (px <= nx - 1 - margin) & (py >= margin) & (py <= ny - 1 - margin)
        if off_detector is not None:
            ix = torch.round(px).long().clamp(0, nx - 1)
            iy = torch.round(py).long().clamp(0, ny - 1)
            valid &= ~torch.as_tensor(_dilate_disc(off_detector, margin))[iy, ix]
        clear = None  # pixels whose own moments no masked pixel reaches
        if masked is not None:
            radius = mask_radius_sigma * s + 2.0  # + the interpolation's taps
            near = torch.as_tensor(_dilate_disc(masked, radius))
            ix = torch.round(px).long().clamp(0, nx - 1)
            iy = torch.round(py).long().clamp(0, ny - 1)
            clear = ~near[iy, ix]
        # Interpolated at the valid pixels only (the others are never read: each detection uses the
        # exposures valid over its whole neighbourhood), all moments at once, the gradient images with the
        # taps' offsets too (the interpolation terms of the responses), mapped to the grid frame; per unit
        # of npix.
        sel = torch.nonzero(valid.reshape(-1)).flatten()
        taps = _KeysTaps(px.reshape(-1)[sel], py.reshape(-1)[sel], (ny, nx))
        t = torch.as_tensor(_frame_matrix(jac, h))
        on_grid = torch.zeros((gy * gx, 18), dtype=torch.float64)
        on_grid[sel] = taps(stack, tap_moments=True, combine=_grid_map(t) / npix)
        on_grid = on_grid.reshape(gy, gx, 18)
        corr = None
        if noisy[k] and noise_grid_pix:
            g = int(noise_grid_pix)
            inv_pg = _inverse_psf(psf_t / float(psf_t.sum()), g, g, psf_floor)
            corr = NoiseCorrelation((g, g), inv_pg, s, float(e.noise_sigma) ** 2 / float(g * g) ** 2)
        elif noisy[k]:
            corr = NoiseCorrelation((ny, nx), inv_p, s, float(e.noise_sigma) ** 2 / npix**2)
        var00 = float(t[0] @ _pixel_cov0(corr, t[0] != 0) @ t[0]) if corr is not None else 1.0
        per_exp.append(
            dict(
                vals=on_grid[..., :8],
                resp=on_grid[..., 8:14].reshape(gy, gx, 3, 2),  # (m00, m2c, m2s) x (g1, g2)
                grad2=on_grid[..., 14:].reshape(gy, gx, 2, 2),  # (m2c, m2s) x (d/dx, d/dy)
                valid=valid,
                clear=clear,
                t=t,
                corr=corr,
                corr_at={},
                jinv=jinv,
                a=1.0 / var00,
            )
        )

    # Each candidate pixel uses the exposures whose moments are valid over its whole neighbourhood (the
    # edges: cyclic transforms) and that no masked pixel reaches at the pixel itself (a neighbour's F only
    # enters the peak test): pixels are grouped by that exposure set, and each group is combined and
    # detected on its own, so a detection's moments, neighbours and noise model come from the same exposures.
    r = int(peak_radius_pix)
    set_bits = torch.zeros((gy, gx), dtype=torch.int64)
    for k, p in enumerate(per_exp):
        # Valid over the (2r + 1)^2 square around the pixel: eroded along x, then along y.
        along_x = p["valid"].clone()
        for dx in range(-r, r + 1):
            along_x &= torch.roll(p["valid"], shifts=-dx, dims=1)
        eroded = along_x.clone()
        for dy in range(-r, r + 1):
            eroded &= torch.roll(along_x, shifts=-dy, dims=0)
        eroded[:r, :] = False
        eroded[-r:, :] = False
        eroded[:, :r] = False
        eroded[:, -r:] = False
        if p["clear"] is not None:
            eroded &= p["clear"]
        set_bits |= eroded.long() << k
    parts = []
    for bits in torch.unique(set_bits[set_bits > 0]).tolist():
        members = [p for k, p in enumerate(per_exp) if (bits >> k) & 1]
        mom_c, cov_fn, extra = _combined_moments(members, noisy=all(noisy))
        res = _detect_core(
            mom_c,
            cov_fn,
            set_bits == bits,
            offs,
            resp_extra=extra,
            c_ratio=c_ratio,
            snr_min=snr_min,
            selection_bin_width=selection_bin_width,
            peak_omega=peak_omega,
            peak_nu_min=peak_nu_min,
            peak_rel_width=peak_rel_width,
            noise_bias_correction=noise_bias_correction,
        )
        res["n_exposures"] = np.full(len(res["x"]), len(members), dtype=np.int64)
        res["exposure_set"] = np.full(len(res["x"]), bits, dtype=np.int64)
        parts.append(res)
    if not parts:
        mom_c, cov_fn, extra = _combined_moments(per_exp, noisy=all(noisy))
        empty = _detect_core(
            mom_c,
            cov_fn,
            torch.zeros((gy, gx), dtype=torch.bool),
            offs,
            resp_extra=extra,
            c_ratio=c_ratio,
            snr_min=snr_min,
            selection_bin_width=selection_bin_width,
            peak_omega=peak_omega,
            peak_nu_min=peak_nu_min,
            peak_rel_width=peak_rel_width,
            noise_bias_correction=noise_bias_correction,
        )
        empty["n_exposures"] = np.zeros(0, dtype=np.int64)
        empty["exposure_set"] = np.zeros(0, dtype=np.int64)
        return empty
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    order = np.lexsort((out["x"], out["y"]))
    return {key: v[order] for key, v in out.items()}


def _dilate_disc(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` grown by a disc of ``radius`` pixels (True where a masked pixel lies within ``radius``):
    the Euclidean distance transform, linear in the pixels whatever the radius."""
    from scipy import ndimage

    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    return ndimage.distance_transform_edt(~mask) <= radius


class _CombinedImage:
    """``sum_e w_e X_e`` of grid images, computed only at the pixels it is indexed with."""

    def __init__(self, images: list[torch.Tensor], weights: list[float]):
        self.images, self.weights = images, weights

    def __getitem__(self, idx) -> torch.Tensor:
        return sum(w * img[idx] for w, img in zip(self.weights, self.images, strict=True))


def _combined_moments(members: list[dict], noisy: bool):
    """Inverse-variance combination of the exposures ``members`` on the grid: ``(moments, cov_fn, resp_extra)``
    arguments of :func:`_detect_core` (``cov_fn`` None without noise)."""
    a_sum = sum(p["a"] for p in members)
    w = [p["a"] / a_sum for p in members]

    def lazy(get) -> _CombinedImage:
        return _CombinedImage([get(p) for p in members], w)

    # F is needed everywhere (the peak search); the other images only at the detections and their
    # neighbourhoods, so they are combined where indexed (a block has one set per combination of
    # exposures that edges and masks leave: many sets, each with few detections).
    mom_c: dict[str, Any] = {"m00": sum(wi * p["vals"][..., 0] for wi, p in zip(w, members, strict=True))}
    for i, nm in enumerate(_GRID_MOMENTS[1:], start=1):
        mom_c[nm] = lazy(lambda p, i=i: p["vals"][..., i])
    for i, name in enumerate(("m2c", "m2s")):
        mom_c[f"dx_{name}"] = lazy(lambda p, i=i: p["grad2"][..., i, 0])
        mom_c[f"dy_{name}"] = lazy(lambda p, i=i: p["grad2"][..., i, 1])
    extra = {
        (nm, b): lazy(lambda p, i=i, b=b: p["resp"][..., i, b])
        for i, nm in enumerate(("m00", "m2c", "m2s"))
        for b in range(2)
    }
    cov_fn = None
    if noisy:

        def cov_fn(a: str, b: str, dxy: np.ndarray) -> torch.Tensor:
            ia, ib = _GRID_MOMENTS.index(a), _GRID_MOMENTS.index(b)
            d = torch.as_tensor(np.asarray(dxy, dtype=np.float64))
            total = torch.zeros(len(d), dtype=torch.float64)
            for p in members:
                ta, tb = p["t"][ia], p["t"][ib]
                coef = torch.outer(ta, tb)  # pixel-frame pairs making up the grid pair (a, b)
                # Asked for at once: those of a and of every grid moment but m00 (the noise terms of the
                # responses ask for all of these against each b: one interpolation serves them all).
                rows = (p["t"][1:] != 0).any(dim=0) | (ta != 0)
                pairs = rows[:, None] & (tb != 0)[None, :]
                acc = torch.tensordot(coef, _correlations_at(p, d, pairs), dims=2)
                total = total + p["a"] ** 2 * acc
            return total / a_sum**2

    return mom_c, cov_fn, extra


def _correlations_at(p: dict, d: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The exposure's noise correlations (8, 8, m) of the pixel-frame moments :data:`_GRID_MOMENTS` at
    the grid offsets ``d`` (m, 2), interpolated in its pixels; computed for the pairs where ``pairs``
    ((8, 8) bool) is True (0 where none was asked for yet) and kept in ``p`` per offsets (the same offsets
    serve every call of one detection and every exposure set)."""
    key = (tuple(d.shape), d.numpy().tobytes())
    cached = p["corr_at"].get(key)
    if cached is None:
        dpx = d @ torch.as_tensor(p["jinv"]).T  # grid offsets -> pixel offsets (dx, dy)
        corr = p["corr"]
        taps = _KeysTaps(dpx[:, 0], dpx[:, 1], (corr.ny, corr.nx))
        cached = p["corr_at"][key] = (taps, torch.zeros((8, 8, len(d)), dtype=torch.float64), set())
    taps, values, done = cached
    new = [pr for pr in map(tuple, torch.nonzero(pairs).tolist()) if pr not in done]
    if new:
        imgs = torch.stack([p["corr"](_GRID_MOMENTS[i2], _GRID_MOMENTS[j2]) for i2, j2 in new], dim=-1)
        for (i2, j2), v in zip(new, taps(imgs).T, strict=True):
            values[i2, j2] = v
        done.update(new)
    return values


def _pixel_cov0(corr: NoiseCorrelation, used: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-offset noise covariance (8, 8) of the pixel-frame moments :data:`_GRID_MOMENTS`; with ``used``
    ((8,) bool) only between those moments, 0 elsewhere (each pair costs an inverse FFT)."""
    out = torch.zeros((8, 8), dtype=torch.float64)
    for i, a in enumerate(_GRID_MOMENTS):
        for j, b in enumerate(_GRID_MOMENTS):
            if used is None or (used[i] and used[j]):
                out[i, j] = corr(a, b)[0, 0]
    return out
