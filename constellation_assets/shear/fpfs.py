"""Batched FPFS shear estimator in PyTorch (the kernel every stage calls).

Method
------
Fourier Power Function Shapelets (FPFS; Li, Li & Mandelbaum 2018, MNRAS 481, 4445; Li & Mandelbaum
2023, MNRAS 521, 4904; Li et al. 2024, AnaCal) measures shear from Gaussian-weighted moments of the
PSF-deconvolved Fourier image, with shear responses that are themselves linear moments of the same
image, so the estimator is analytic and non-iterative.

For a stamp ``I`` and its PSF ``P`` (both centred on pixel ``(H//2, W//2)``, PSF normalised to unit sum)
the deconvolved Fourier image of the pre-PSF galaxy is ``f(k) = I(k) / P(k) * exp(i k.d)``, where the
phase recentres the measurement on the catalog position ``d`` (``offsets_pix``).  With the Fourier
weight ``W(k) = exp(-sigma^2 |k|^2 / 2)`` (``sigma = sigma_arcsec``) we measure

    M00 = sum W f,   M2c = sum sigma^2 (kx^2 - ky^2) W f,   M2s = sum 2 sigma^2 kx ky W f,

the two response moments

    A1 = sum [2 sigma^2 k^2 - sigma^4 (kx^2 - ky^2)^2] W f,   A2 = sum [2 sigma^2 k^2 - 4 sigma^4 kx^2 ky^2] W f,

and the cross-response moment ``B12 = sum 2 sigma^4 (kx^2 - ky^2) kx ky W f``.

A shear ``A = [[1+g1, g2], [g2, 1-g1]]`` of the pre-PSF image maps ``f(k) -> f(A k)`` (unit
determinant), so the derivative of any moment ``sum w f`` is ``sum -(grad w . S k) f``; for the
weights above this gives ``dM00/dg1 = M2c``, ``dM2c/dg1 = -A1``, ``dM00/dg2 = M2s``, ``dM2s/dg2 = -A2``
and ``dM2c/dg2 = dM2s/dg1 = B12``.  The ellipticity and its first-order shear responses are

    e1 = -M2c / D,   R11 = de1/dg1 = A1 / D + M2c^2 / D^2,   R12 = de1/dg2 = -B12 / D + M2c M2s / D^2,

with ``D = M00 + C``, where ``C = c_ratio * sigma(M00)`` is a constant set by the noise level only (so it
has no shear response).  The ensemble shear is ``g1 = sum(w e1) / sum(w R11)``.

Selection and noise (:func:`shear_from_moments`): with ``snr_min > 0`` each source gets the smooth
weight ``w = u(snr)`` of its measured FPFS ``snr = M00 / sigma(M00)`` (0 below ``snr_min``, 1 above
``snr_min + selection_bin_width``, C2 in between), and ``w e`` is differentiated exactly, selection
term ``u' e dsnr/dg`` included.  All cuts on measured quantities go through such weights; the MER
detection cut upstream has no response.  ``e`` and ``R`` are nonlinear functions of noisy linear
moments whose noise covariance is known analytically (white pixel noise ``sigma_n``:
``Cov(Ma, Mb) = sigma_n^2 Npix sum wa wb / |P|^2``).  The measured response
``grad(w e) . dx/dg`` evaluated at the noisy moments carries the noise term ``E[grad(w e) . L n]``
(e.g. ``E[e dsnr/dg]`` picks up ``-u' Var(M2c) / (sigma D)``); for Gaussian noise Stein's lemma gives
it exactly as ``sum (L Cov)_ij d_i d_j (w e)``, which is subtracted per source, so
``sum w e / sum w R`` is unbiased to all orders in the noise at linear order in the shear (the
ellipticities themselves are not corrected: the ensemble needs the response of their noisy mean).
Exposures are combined at the moment level before any of this
(:func:`constellation_assets.shear.stamps.combine_exposure_moments`).

Frames: ``e1 > 0`` is elongated along the stamp's x axis (columns), ``e2 > 0`` along x = y; the
pipeline maps moments to the sky frame ``(west, north)`` before combining exposures (see
:mod:`constellation_assets.shear.stamps` for the catalog's E1/E2 convention).

Compute: one real FFT per stamp, one complex multiply for the recentring phase (per-stamp PSFs: one
more for ``1/P``) and one small real matmul against the precomputed weight matrix (a shared PSF's
``1/P`` is folded into it).  Per-stamp PSFs are transformed batch by batch next to their stamps, in
the working precision, with ``1/P = s conj(Q) / |Q|^2`` from the raw transform ``Q`` and the PSF sum
``s`` (no complex division or square root; see :func:`_prepare_psf_batch`).  Everything stays in
torch on ``device``; the noise covariance, e and R are computed in float64.  With
``precision="float32"`` the FFTs, ``1/P`` and the moment matmul run in float32: its rounding (~1e-7
relative) is far below the 1e-4 level of shear calibration.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Bit flags of the ``flags`` column (0 means a good measurement).
FLAG_NONFINITE_INPUT = 1
FLAG_NONPOSITIVE_DENOMINATOR = 2
FLAG_BELOW_SNR_MIN = 4
FLAG_BAD_PSF = 8

#: Index of each moment in the stacked moment vectors.
MOMENT_NAMES = ("m00", "m2c", "m2s", "a1", "a2", "b12")
_M00, _M2C, _M2S, _A1, _A2, _B12 = range(6)
N_MOMENTS = len(MOMENT_NAMES)

#: A PSF Fourier amplitude below this fraction of its zero-frequency value is not deconvolved.
PSF_FLOOR_DEFAULT = 1e-4


@dataclass(frozen=True)
class FpfsSettings:
    """Estimator settings (the ``shear`` config section feeds these)."""

    sigma_arcsec: float = 0.35
    c_ratio: float = 4.0
    snr_min: float = 0.0
    selection_bin_width: float = 2.0
    noise_bias_correction: bool = True
    batch_size: int = 4096
    precision: str = "float32"
    psf_floor: float = PSF_FLOOR_DEFAULT


def _dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    if precision == "float64":
        return torch.float64, torch.complex128
    if precision == "float32":
        return torch.float32, torch.complex64
    raise ValueError(f"precision={precision!r} is not supported: use 'float32' or 'float64'")


def resolve_device(device: str | torch.device) -> torch.device:
    """torch device for a config value; ``"auto"`` picks CUDA when present."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} requested but CUDA is not available: use device='cpu' or 'auto'"
        )
    return dev


def fpfs_kwargs_from_config(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`measure_stamps` from a ``PipelineConfig`` (shear + compute sections)."""
    shear = cfg.shear
    compute = getattr(cfg, "compute", None)
    return {
        "sigma_arcsec": shear.sigma_arcsec,
        "c_ratio": shear.c_ratio,
        "snr_min": shear.estimator_snr_min,
        "selection_bin_width": shear.selection_bin_width,
        "noise_bias_correction": shear.noise_bias_correction,
        "precision": shear.precision,
        "batch_size": getattr(compute, "batch_size", FpfsSettings.batch_size),
        "device": getattr(compute, "device", "cpu"),
    }


def _as_tensor(x: Any, name: str, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Tensor on ``device`` (``dtype`` None keeps a float input's dtype, without copying)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype or x.dtype)
    try:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            arr = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a float array or torch tensor, got {type(x).__name__}") from exc
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.to(device=device, dtype=dtype or t.dtype)


def fourier_weights(
    ny: int, nx: int, pixel_scale_arcsec: float, sigma_arcsec: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight matrix (K, 5) on the rfft half plane, rfft multiplicities folded in.

    Returns ``(weights, mult, kx_pix, ky_pix)``; ``mult`` (K,) is the half-plane multiplicity; ``kx_pix``/``ky_pix`` are angular wavenumbers in
    radians per pixel on the (ny, nx//2+1) grid, used for the recentring phase.
    """
    ky_pix = 2.0 * math.pi * torch.fft.fftfreq(ny, dtype=torch.float64, device=device)
    kx_pix = 2.0 * math.pi * torch.fft.rfftfreq(nx, dtype=torch.float64, device=device)
    ky_pix, kx_pix = torch.meshgrid(ky_pix, kx_pix, indexing="ij")
    s = sigma_arcsec / pixel_scale_arcsec  # weight scale in pixels
    kx = kx_pix * s
    ky = ky_pix * s
    k2 = kx * kx + ky * ky
    gauss = torch.exp(-0.5 * k2)
    q1 = kx * kx - ky * ky
    q2 = 2.0 * kx * ky
    w = torch.stack(
        [
            gauss,
            q1 * gauss,
            q2 * gauss,
            (2.0 * k2 - q1 * q1) * gauss,
            (2.0 * k2 - q2 * q2) * gauss,
            q1 * q2 * gauss,
        ],
        dim=-1,
    )
    # Half-plane sum == full-plane sum: interior columns stand for +k and -k.  The Nyquist row and
    # column (even sizes) have no unique partner; dropping them keeps the estimator exactly
    # symmetric under 90-degree rotations (their Gaussian weight is ~exp(-(pi s)^2 / 2) anyway).
    mult = torch.full((ny, nx // 2 + 1), 2.0, dtype=torch.float64, device=device)
    mult[:, 0] = 1.0
    if nx % 2 == 0:
        mult[:, -1] = 0.0
    if ny % 2 == 0:
        mult[ny // 2, :] = 0.0
    w = w * mult[..., None]
    return w.reshape(-1, N_MOMENTS), mult.reshape(-1), kx_pix, ky_pix


def _moments_batch(
    images: torch.Tensor,
    inv_psf_f: torch.Tensor | None,
    weights_ri: torch.Tensor,
    kx_pix: torch.Tensor,
    ky_pix: torch.Tensor,
    offsets: torch.Tensor | None,
) -> torch.Tensor:
    """Moments (B, 6) in float64 for one batch of stamps.

    ``weights_ri`` (2K, 5) acts on ``view_as_real`` of the half-plane transform, so the real part of
    ``sum_k w(k) f(k)`` is a single real matmul.  For a shared PSF ``1/P(k)`` is already folded into it
    (``inv_psf_f`` is None); otherwise ``inv_psf_f`` (B, ny, nxh) divides each stamp.  Stamp and PSF
    share the centre pixel, so its phase cancels in the ratio and no stamp needs rolling.
    """
    f = torch.fft.rfft2(images)  # (B, ny, nxh)
    if inv_psf_f is not None:
        f = f * inv_psf_f
    if offsets is not None:
        # Source at (H//2 + dy, W//2 + dx): multiply by exp(+i k.d) (separable) to centre it.
        ph_x = offsets[:, 0, None] * kx_pix[0][None, :]
        ph_y = offsets[:, 1, None] * ky_pix[:, 0][None, :]
        cx = torch.polar(torch.ones_like(ph_x), ph_x).to(f.dtype)
        cy = torch.polar(torch.ones_like(ph_y), ph_y).to(f.dtype)
        f = f * (cy[:, :, None] * cx[:, None, :])
    fr = torch.view_as_real(f).reshape(f.shape[0], -1)
    return (fr @ weights_ri).to(torch.float64)


def _weights_ri(weights: torch.Tensor, inv_psf_flat: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(2K, 6) real matrix with Re/Im rows interleaved: ``Re(f w / P) = Re f Re(w/P) - Im f Im(w/P)``."""
    wc = weights.to(torch.complex128)
    if inv_psf_flat is not None:
        wc = wc * inv_psf_flat[:, None]
    out = torch.stack([wc.real, -wc.imag], dim=1)  # (K, 2, 6)
    return out.reshape(-1, weights.shape[1]).to(dtype)


_TRIU = torch.triu_indices(N_MOMENTS, N_MOMENTS)  # the 21 distinct entries of a symmetric 6 x 6


def _pair_weights(weights: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """(K, 21) float64 products ``wa wb`` (a <= b) divided once by the half-plane multiplicity (see below)."""
    i, j = _TRIU.to(weights.device)
    pair = weights[:, i] * weights[:, j]  # (K, 21)
    inv_mult = torch.where(mult > 0, 1.0 / mult.clamp_min(1.0), torch.zeros_like(mult))
    return pair * inv_mult[:, None]


def _cov_from_inv_psf2(
    inv_psf2: torch.Tensor, pair: torch.Tensor, npix: int, noise_var: torch.Tensor
) -> torch.Tensor:
    """``Cov = sigma_n^2 Npix sum_k wa wb / |P|^2``: (B, 6, 6) float64 from ``1/|P|^2`` ((B or 1), K)."""
    tri = inv_psf2.to(torch.float64) @ pair  # (B, 21): each symmetric pair once
    cov = torch.empty((tri.shape[0], N_MOMENTS, N_MOMENTS), dtype=torch.float64, device=tri.device)
    i, j = _TRIU.to(tri.device)
    cov[:, i, j] = tri
    cov[:, j, i] = tri
    return cov * (noise_var * npix)[:, None, None]


def _noise_covariance(
    inv_psf2: torch.Tensor, weights: torch.Tensor, mult: torch.Tensor, npix: int, noise_var: torch.Tensor
) -> torch.Tensor:
    """Cov(Ma, Mb) for white pixel noise: (B, 6, 6), float64.

    With ``Ma = sum_k wa(k) f(k)`` over the full plane, ``Ma = sum_x n(x) Ka(x)`` and Parseval gives
    ``Cov = sigma_n^2 * Npix * sum_k wa wb / |P|^2``.  ``inv_psf2`` is ``1/|P(k)|^2`` on the half
    plane ((B or 1), K), zero where not deconvolved; the weights carry the multiplicity once each,
    so the pair product is divided by it once.
    """
    return _cov_from_inv_psf2(inv_psf2, _pair_weights(weights, mult), npix, noise_var)


@functools.lru_cache(maxsize=16)
def _weight_tables(
    ny: int, nx: int, pixel_scale_arcsec: float, sigma_arcsec: float, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """:func:`fourier_weights` and :func:`_pair_weights`, computed once per geometry (read-only tensors)."""
    weights, mult, kx_pix, ky_pix = fourier_weights(ny, nx, pixel_scale_arcsec, sigma_arcsec, device)
    return weights, mult, kx_pix, ky_pix, _pair_weights(weights, mult)


def _prepare_psf(psf_t: torch.Tensor, psf_floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``1/P(k)`` (complex128, zero where |P| <= psf_floor), ``1/|P|^2`` flattened, bad-PSF mask.

    The PSF is normalised (``f(0)`` is then the flux) and keeps its centre pixel where the stamps have it.
    """
    psf_sum = psf_t.sum(dim=(-2, -1))
    bad_psf = ~torch.isfinite(psf_sum) | (psf_sum <= 0)
    psf_n = psf_t / torch.where(bad_psf, torch.ones_like(psf_sum), psf_sum)[:, None, None]
    psf_f = torch.fft.rfft2(psf_n)
    psf_ok = psf_f.abs() > psf_floor
    safe_f = torch.where(psf_ok, psf_f, torch.ones((), dtype=psf_f.dtype, device=psf_f.device))
    inv_psf_f = torch.where(psf_ok, 1.0 / safe_f, torch.zeros((), dtype=psf_f.dtype, device=psf_f.device))
    inv_psf2 = (inv_psf_f.abs() ** 2).reshape(inv_psf_f.shape[0], -1)
    return inv_psf_f, inv_psf2, bad_psf


def _prepare_psf_batch(
    psf_b: torch.Tensor, psf_floor: float, rdtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_prepare_psf` for one batch of per-stamp PSFs, in the working precision ``rdtype``.

    Same quantities, fewer passes: with the raw transform ``Q(k)`` and the PSF sum ``s`` (``P = Q / s``),
    ``|P| > floor  <=>  |Q|^2 > (floor s)^2``, ``1/P = s conj(Q) / |Q|^2`` and ``1/|P|^2 = s^2 / |Q|^2``
    (no complex division, no square root).  A PSF with a non-finite sum deconvolves nothing (as in
    :func:`_prepare_psf`); a non-positive sum leaves it unnormalised; both are flagged bad.
    Returns ``(1/P (B, ny, nxh) complex, 1/|P|^2 (B, K) rdtype, bad (B,))``.
    """
    b = psf_b.shape[0]
    psf_b = psf_b.to(rdtype)
    s = psf_b.reshape(b, -1).sum(dim=1)
    nonfinite = ~torch.isfinite(s)
    bad = nonfinite | (s <= 0)
    if bool(nonfinite.any()):
        psf_b = torch.where(
            nonfinite[:, None, None], torch.zeros((), dtype=rdtype, device=psf_b.device), psf_b
        )
    s = torch.where(bad, torch.ones_like(s), s)[:, None, None]
    q_f = torch.fft.rfft2(psf_b)
    q_ri = torch.view_as_real(q_f)
    q2 = q_ri[..., 0].square() + q_ri[..., 1].square()
    # 1/|Q|^2 where |Q| > floor s, else 0 (1/inf).
    inv_q2 = torch.where(q2 > (psf_floor * s).square(), q2, torch.inf).reciprocal_()
    conj = torch.tensor([1.0, -1.0], dtype=rdtype, device=q2.device)
    inv_f = torch.view_as_complex(q_ri * ((inv_q2 * s)[..., None] * conj))  # s conj(Q) / |Q|^2
    inv_p2 = (inv_q2 * s.square()).reshape(b, -1)
    return inv_f, inv_p2, bad


#: A PSF stamp whose outermost pixel frame holds more than this fraction of its flux is truncated.
PSF_BORDER_FRACTION_WARN = 1e-3

#: (box size, wings extended) of the truncated PSF models already reported at WARNING in this process.
_TRUNCATION_WARNED: set[tuple[int, bool]] = set()
#: Width of the outer ring of a truncated PSF model on which its power-law wing is fitted (pixels).
WING_RING_PIX = 4


def psf_support_half_size(psf_t: torch.Tensor) -> int:
    """Half-size ``h`` of the centred square box ``(H//2 +- h, W//2 +- h)`` holding every nonzero PSF pixel."""
    ny, nx = psf_t.shape[-2:]
    nz = (psf_t != 0).reshape(-1, ny, nx).any(dim=0)
    rows = torch.nonzero(nz.any(dim=1)).flatten()
    cols = torch.nonzero(nz.any(dim=0)).flatten()
    if len(rows) == 0:
        return 0
    cy, cx = ny // 2, nx // 2
    return int(max(cy - rows[0], rows[-1] - cy, cx - cols[0], cols[-1] - cx))


def psf_border_fraction(psf_t: torch.Tensor, half: int) -> torch.Tensor:
    """Fraction (N,) of each PSF's flux in the outermost pixel frame of its support box (truncation test)."""
    ny, nx = psf_t.shape[-2:]
    cy, cx = ny // 2, nx // 2
    box = psf_t[..., cy - half : cy + half + 1, cx - half : cx + half + 1].to(torch.float64)
    inner = box[..., 1:-1, 1:-1].sum(dim=(-2, -1)) if half >= 1 else torch.zeros(box.shape[:-2])
    total = box.sum(dim=(-2, -1))
    safe = torch.where(total != 0, total, torch.ones_like(total))
    return torch.where(total != 0, (total - inner) / safe, torch.zeros_like(total))


def extend_psf_wings(
    psf_t: torch.Tensor, half: int, ring_pix: int = WING_RING_PIX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend PSF stamps truncated to the box ``|x|, |y| <= half`` with a fitted power-law wing.

    Real PSF models stop at a few arcsec (Euclid Q1: 21 x 21 native pixels) while the galaxy light was
    convolved with the full PSF; deconvolving with the truncated (renormalised) stamp misestimates the
    low-k transfer function.  For each PSF (N, H, W) the azimuthal mean profile in the ``ring_pix``
    outermost one-pixel annuli inside the box (radii ``half - ring_pix + 1 .. half``) is fitted with
    ``I(r) = A r^-gamma`` (least squares in log-log, ``gamma`` clamped to [2, 8]) and the pixels
    outside the box are set to that law, so the stamp carries the wing out to its own edges (the
    galaxy stamp's extent); the estimator then normalises the whole stamp to unit sum.  A PSF whose
    ring is not positive keeps its truncated form.  Returns ``(extended psf, ok (N,))``.
    """
    ny, nx = psf_t.shape[-2:]
    cy, cx = ny // 2, nx // 2
    radii, member, log_r, outside = _wing_geometry(ny, nx, half, ring_pix, psf_t.device)
    if len(radii) < 2:
        return psf_t, torch.zeros(psf_t.shape[0], dtype=torch.bool, device=psf_t.device)
    box = psf_t[:, cy - half : cy + half + 1, cx - half : cx + half + 1].to(torch.float64)
    prof = box.reshape(box.shape[0], -1) @ member  # (N, R): azimuthal means in the ring annuli
    ok = (prof > 0).all(dim=1)
    logp = torch.log(torch.where(prof > 0, prof, torch.ones_like(prof)))
    logr = torch.log(radii)
    lr = logr - logr.mean()
    slope = ((logp - logp.mean(dim=1, keepdim=True)) * lr).sum(dim=1) / (lr * lr).sum()
    gamma = (-slope).clamp(2.0, 8.0)
    log_a = (logp + gamma[:, None] * logr).mean(dim=1)
    dt = psf_t.dtype
    wing = torch.exp(log_a.to(dt)[:, None, None] - gamma.to(dt)[:, None, None] * log_r.to(dt)[None])
    ext = torch.where(outside[None] & ok[:, None, None], wing, psf_t)
    return ext, ok


@functools.lru_cache(maxsize=16)
def _wing_geometry(
    ny: int, nx: int, half: int, ring_pix: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ring radii (R,), annulus averaging matrix ((2h+1)^2, R), log r (H, W) and the outside-box mask."""
    cy, cx = ny // 2, nx // 2
    yy = torch.arange(ny, dtype=torch.float64, device=device) - cy
    xx = torch.arange(nx, dtype=torch.float64, device=device) - cx
    r = torch.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    radii = torch.arange(half - ring_pix + 1, half + 1, dtype=torch.float64, device=device)
    radii = radii[radii >= 1]
    rb = torch.round(r[cy - half : cy + half + 1, cx - half : cx + half + 1]).reshape(-1)
    member = (rb[:, None] == radii[None, :]).to(torch.float64)
    member = member / member.sum(dim=0).clamp_min(1.0)
    outside = (yy.abs()[:, None] > half) | (xx.abs()[None, :] > half)
    return radii, member, torch.log(r.clamp_min(1.0)), outside


def moment_noise_covariance(
    psf: Any,
    pixel_scale_arcsec: float,
    noise_sigma: float,
    sigma_arcsec: float = FpfsSettings.sigma_arcsec,
    psf_floor: float = FpfsSettings.psf_floor,
) -> torch.Tensor:
    """Noise covariance (6, 6) of the moments :data:`MOMENT_NAMES` for white pixel noise."""
    psf_t = _as_tensor(psf, "psf", torch.device("cpu"), torch.float64)[None]
    ny, nx = psf_t.shape[-2:]
    weights, mult, _, _ = fourier_weights(ny, nx, pixel_scale_arcsec, sigma_arcsec, torch.device("cpu"))
    _, inv_psf2, _ = _prepare_psf(psf_t, psf_floor)
    var = torch.tensor([float(noise_sigma) ** 2], dtype=torch.float64)
    return _noise_covariance(inv_psf2, weights, mult, ny * nx, var)[0]


def selection_weight(
    snr: torch.Tensor, snr_min: float, width: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth selection weight ``u(snr)`` and its first two derivatives ``du/dsnr``, ``d2u/dsnr2``.

    ``u`` rises from 0 at ``snr_min`` to 1 at ``snr_min + width`` as the quintic smooth step
    ``t^3 (10 - 15 t + 6 t^2)`` (``t = (snr - snr_min) / width``; C2-continuous, so the response and its
    noise correction have no delta functions).  ``snr_min <= 0`` means no selection: ``u = 1``.
    """
    if snr_min <= 0:
        one = torch.ones_like(snr)
        return one, torch.zeros_like(snr), torch.zeros_like(snr)
    if width <= 0:
        raise ValueError(f"selection_bin_width={width} must be > 0 when snr_min > 0")
    t = ((snr - snr_min) / width).clamp(0.0, 1.0)
    u = t**3 * (10.0 + t * (-15.0 + 6.0 * t))
    du = 30.0 * t**2 * (1.0 - t) ** 2 / width
    d2u = 60.0 * t * (1.0 - t) * (1.0 - 2.0 * t) / width**2
    return u, du, d2u


def shear_from_moments(
    mom: torch.Tensor,
    cov: torch.Tensor | None,
    sigma_m00: torch.Tensor,
    c_const: torch.Tensor,
    snr_min: float = FpfsSettings.snr_min,
    selection_bin_width: float = FpfsSettings.selection_bin_width,
    correct: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-source weight, ellipticity and noise-corrected shear responses from moments (N, 6).

    ``mom`` follows :data:`MOMENT_NAMES`; ``cov`` (N, 6, 6) is their noise covariance (None: noiseless);
    ``sigma_m00`` (N,) the flux-moment noise (``snr = M00 / sigma_m00``) and ``c_const`` (N,) the
    denominator constant ``C`` (``c_ratio * sigma_m00``): constants of the source, without shear response.  With the selection weight
    ``u(snr)`` of :func:`selection_weight` the shear estimator of component ``a`` is

        g_a = sum_i u_i e_a,i / sum_i u_i R_aa,i,    e_1 = -M2c / D,  e_2 = -M2s / D,  D = M00 + C.

    Response: ``F = u e`` is a function of the moments ``x``, whose shear derivative is linear in them,
    ``dx/dg_b = L_b x`` (``dM00/dg1 = M2c``, ``dM2c/dg1 = -A1``, ``dM2c/dg2 = dM2s/dg1 = B12``, ...).
    The ensemble needs ``d E[F(x + n)] / dg = E[grad F(x + n) . L_b x]``, but the measured
    ``grad F(x_obs) . L_b x_obs`` also carries ``E[grad F(x + n) . L_b n]``; for Gaussian noise
    ``n ~ N(0, Cov)`` Stein's lemma makes that term exactly ``sum_ij (L_b Cov)_ij E[d_i d_j F]``, so

        R_ab = grad F_a . L_b x_obs - sum_ij (L_b Cov)_ij d_i d_j F_a(x_obs)

    is an unbiased estimate of the response of ``E[sum u e]`` to any order in the noise (no Taylor
    series: the numerator needs no correction, and the selection may be as sharp as the variance
    allows).  This is the noise bias of the selection response (``E[e dnu/dg]`` picks up
    ``-u' Var(M2c) / (sigma D)``) and of the shape response removed together.

    Returns float64 tensors ``weight`` (= u), ``e1, e2`` (ellipticities), ``r11, r22, r12, r21`` (per unit
    weight: ``weight * r11`` is the response of ``weight * e1``), their parts ``r11_shape, r22_shape``
    (terms in ``u``) and ``r11_sel, r22_sel`` (terms in ``u'``, ``u''``), ``snr`` and ``denominator``.
    """
    sig = torch.where(sigma_m00 > 0, sigma_m00, torch.ones_like(sigma_m00))
    snr = torch.where(sigma_m00 > 0, mom[:, _M00] / sig, torch.full_like(sigma_m00, math.inf))
    u, u1, u2 = selection_weight(snr, snr_min, selection_bin_width)
    if snr_min <= 0:
        u = torch.ones_like(snr)
    d = mom[:, _M00] + c_const
    safe_d = torch.where(d > 0, d, torch.ones_like(d))
    inv_d = 1.0 / safe_d
    inv_sig = 1.0 / sig
    use_cov = correct and cov is not None

    def c(i: int, j: int) -> torch.Tensor:
        return cov[:, i, j]

    out: dict[str, torch.Tensor] = {"weight": u, "snr": snr, "denominator": d}
    for comp, (ni, nx, ai) in enumerate(((_M2C, _M2S, _A1), (_M2S, _M2C, _A2)), start=1):
        other = 3 - comp
        n = mom[:, ni]
        e = -n * inv_d
        # F = u e.  dF/dM00 = u a0 + u' a1, dF/dN = -u / D; Hessian terms in (M00, N) (d2F/dN2 = 0):
        a0 = n * inv_d**2
        a1 = -n * inv_d * inv_sig
        h0, h1, h2 = -2.0 * n * inv_d**3, 2.0 * n * inv_d**2 * inv_sig, -n * inv_d * inv_sig**2
        k0, k1 = inv_d**2, -inv_d * inv_sig
        # Own component: dM00/dg = N, dN/dg = -A.
        shape = a0 * n + mom[:, ai] * inv_d
        sel_u1 = a1 * n
        sel_u2 = torch.zeros_like(n)
        # Cross component: dM00/dg_other = Nx, dN/dg_other = B12.
        x_shape = a0 * mom[:, nx] - mom[:, _B12] * inv_d
        x_u1 = a1 * mom[:, nx]
        x_u2 = torch.zeros_like(n)
        if use_cov:
            t_h = c(ni, _M00)  # (L Cov) entries paired with d2F/dM00^2
            t_k = c(ni, ni) - c(ai, _M00)  # ... with d2F/dM00 dN (both orderings)
            shape = shape - (h0 * t_h + k0 * t_k)
            sel_u1 = sel_u1 - (h1 * t_h + k1 * t_k)
            sel_u2 = sel_u2 - h2 * t_h
            x_h = c(nx, _M00)
            x_k = c(nx, ni) + c(_B12, _M00)
            x_shape = x_shape - (h0 * x_h + k0 * x_k)
            x_u1 = x_u1 - (h1 * x_h + k1 * x_k)
            x_u2 = x_u2 - h2 * x_h
        pos = u > 0
        safe_u = torch.where(pos, u, torch.ones_like(u))
        sel = torch.where(pos, (u1 * sel_u1 + u2 * sel_u2) / safe_u, torch.zeros_like(u))
        x_sel = torch.where(pos, (u1 * x_u1 + u2 * x_u2) / safe_u, torch.zeros_like(u))
        out[f"e{comp}"] = e
        out[f"r{comp}{comp}_shape"] = shape
        out[f"r{comp}{comp}_sel"] = sel
        out[f"r{comp}{comp}"] = shape + sel
        out[f"r{comp}{other}"] = x_shape + x_sel
    return out


def shape_from_moments(
    moments: torch.Tensor, cov: torch.Tensor | None, c_const: torch.Tensor, correct: bool = True
) -> dict[str, torch.Tensor]:
    """:func:`shear_from_moments` without selection, with the denominator constant ``c_const`` (N,)."""
    if cov is not None:
        sigma = cov[:, _M00, _M00].clamp_min(0).sqrt()
    else:
        sigma = torch.zeros(moments.shape[0], dtype=moments.dtype, device=moments.device)
    return shear_from_moments(moments, cov, sigma, c_const, 0.0, 1.0, correct)


def measure_stamps(
    images: Any,
    psf: Any,
    pixel_scale_arcsec: float = 0.1,
    noise_sigma: Any = 0.0,
    offsets_pix: Any = None,
    device: str | torch.device = "cpu",
    *,
    sigma_arcsec: float = FpfsSettings.sigma_arcsec,
    c_ratio: float = FpfsSettings.c_ratio,
    snr_min: float = FpfsSettings.snr_min,
    selection_bin_width: float = FpfsSettings.selection_bin_width,
    noise_bias_correction: bool = FpfsSettings.noise_bias_correction,
    batch_size: int = FpfsSettings.batch_size,
    precision: str = FpfsSettings.precision,
    psf_floor: float = FpfsSettings.psf_floor,
    return_moments: bool = False,
    return_covariance: bool = False,
    psf_wings: str = "extend",
) -> dict[str, np.ndarray]:
    """Measure FPFS ellipticities and analytic shear responses on a batch of stamps.

    Args:
        images: (N, H, W) background-subtracted stamps (numpy or torch), flux units per pixel.
        psf: (H, W) or (N, H, W) PSF images (pixel response included, like the stamps), centred on
            pixel ``(H//2, W//2)``; any normalisation.
        pixel_scale_arcsec: pixel size.
        noise_sigma: per-pixel noise standard deviation of ``images``: scalar or (N,).
        offsets_pix: optional (N, 2) ``(dx, dy)`` of each source from pixel ``(H//2, W//2)``.
        device: torch device ("cpu", "cuda", ...).
        sigma_arcsec: real-space scale of the Gaussian FPFS weight (larger than the PSF sigma).
        c_ratio: ellipticity denominator constant ``C`` in units of ``sigma(M00)``.
        noise_bias_correction: apply the second-order noise-bias correction.
        batch_size: stamps per FFT batch (bounds memory).
        precision: FFT, ``1/P`` and moment precision, "float32" (default, ~2x faster) or "float64"; e, R
            and the noise covariance sums are always float64.
        snr_min: smooth selection on the measured FPFS ``snr`` (0: none): the weight rises from 0 at
            ``snr_min`` to 1 at ``snr_min + selection_bin_width`` (:func:`selection_weight`); its
            noise-corrected response is in ``r11``/``r22`` (see :func:`shear_from_moments`).
        return_moments: also return the raw moments :data:`MOMENT_NAMES` (pixel frame).
        psf_wings: PSF stamps whose nonzero pixels stop inside the stamp (a truncated PSF model):
            ``"extend"`` (default) continues them with a power-law wing fitted to their outer ring
            (:func:`extend_psf_wings`; for a support box of half-size >= 8 pixels, so the ring is in the
            wing), ``"none"`` deconvolves the truncated stamp as given.  Either way
            ``psf_border_frac`` reports the flux fraction in the support box's outermost pixel frame;
            above :data:`PSF_BORDER_FRACTION_WARN` the PSF model is truncated (logged).
        return_covariance: also return ``cov`` (N, 6, 6), the moments' noise covariance (to combine
            exposures at the moment level, :func:`constellation_assets.shear.stamps.combine_exposure_moments`).

    Returns:
        dict of float64 numpy arrays of length N: ``e1, e2, r11, r22, r12, r21, r11_shape, r22_shape,
        r11_sel, r22_sel, weight, snr, m00`` and int32 ``flags``.  Ensemble shear:
        ``g1 = sum(weight*e1) / sum(weight*r11)`` (see :func:`ensemble_shear`); ``weight*r12`` is the
        response of ``weight*e1`` to ``g2``.  Frame: the stamp's pixel frame, ``e1 > 0`` elongated
        along x (columns), ``e2 > 0`` along x = y.
    """
    dev = resolve_device(device)
    rdtype, _ = _dtypes(precision)
    # Stamps stay where they are (host memory for numpy input) and travel to the device one batch at a
    # time, so device memory is bounded by batch_size whatever N is.
    host = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
    host_dtype = images.dtype if isinstance(images, torch.Tensor) else np.asarray(images).dtype
    keep = host_dtype in (torch.float32, torch.float64, np.float32, np.float64)
    imgs = _as_tensor(images, "images", host, None if keep else rdtype)
    if imgs.ndim == 2:
        imgs = imgs[None]
    if imgs.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W); got {tuple(imgs.shape)}")
    n, ny, nx = imgs.shape
    if sigma_arcsec <= 0 or pixel_scale_arcsec <= 0:
        raise ValueError(
            f"sigma_arcsec={sigma_arcsec} and pixel_scale_arcsec={pixel_scale_arcsec} must be > 0"
        )
    # Per-stamp PSFs stay on the host (like the stamps) and travel one batch at a time.
    psf_host = psf.device if isinstance(psf, torch.Tensor) else torch.device("cpu")
    psf_t = _as_tensor(psf, "psf", psf_host, None)
    if not psf_t.is_floating_point():
        psf_t = psf_t.to(torch.float64)
    if psf_t.ndim == 2:
        psf_t = psf_t[None]
    if psf_t.ndim != 3 or psf_t.shape[1:] != (ny, nx) or psf_t.shape[0] not in (1, n):
        raise ValueError(
            f"psf must have shape ({ny}, {nx}) or ({n}, {ny}, {nx}) to match images; got {tuple(psf_t.shape)}"
        )
    noise = _as_tensor(noise_sigma, "noise_sigma", dev, torch.float64).reshape(-1)
    if noise.numel() == 1:
        noise = noise.expand(n)
    if noise.numel() != n or bool((noise < 0).any()) or not bool(torch.isfinite(noise).all()):
        raise ValueError("noise_sigma must be a finite scalar or length-N array >= 0")
    offs = None
    if offsets_pix is not None:
        offs = _as_tensor(offsets_pix, "offsets_pix", dev, torch.float64)
        if offs.shape != (n, 2):
            raise ValueError(f"offsets_pix must have shape ({n}, 2) as (dx, dy); got {tuple(offs.shape)}")

    if psf_wings not in ("extend", "none"):
        raise ValueError(f"psf_wings={psf_wings!r} is not supported: use 'extend' or 'none'")
    support = psf_support_half_size(psf_t)
    truncated = 0 < support < min(ny // 2, nx // 2) - 1  # room outside the model's box
    # The wing is fitted on the ring half - 3 .. half: only meaningful when that ring lies outside the core.
    extend = truncated and psf_wings == "extend" and support >= 2 * WING_RING_PIX
    border = torch.zeros(n, dtype=torch.float64, device=dev)

    weights, mult, kx_pix, ky_pix, pair = _weight_tables(
        ny, nx, float(pixel_scale_arcsec), float(sigma_arcsec), dev
    )
    with_noise = bool((noise > 0).any())

    moments = torch.empty((n, N_MOMENTS), dtype=torch.float64, device=dev)
    finite = torch.empty(n, dtype=torch.bool, device=dev)
    shared_psf = psf_t.shape[0] == 1
    if shared_psf:
        psf_d = psf_t.to(dev, torch.float64)
        if truncated:
            border[:] = psf_border_fraction(psf_d, support)[0]
        if extend:
            psf_d = extend_psf_wings(psf_d, support)[0]
        inv_psf_f, inv_psf2, bad_psf = _prepare_psf(psf_d, psf_floor)
        w_ri = _weights_ri(weights, inv_psf_f.reshape(-1), rdtype)
        cov = _cov_from_inv_psf2(inv_psf2, pair, npix=ny * nx, noise_var=noise**2) if with_noise else None
    else:
        # Per-stamp PSFs: 1/P(k), 1/|P|^2 and the noise covariance are built batch by batch, in the working
        # precision, next to the stamps they deconvolve (memory bounded by batch_size, one pass each).
        w_ri = _weights_ri(weights, None, rdtype)
        cov = torch.empty((n, N_MOMENTS, N_MOMENTS), dtype=torch.float64, device=dev) if with_noise else None
        bad_psf = torch.empty(n, dtype=torch.bool, device=dev)
    for start in range(0, n, max(1, int(batch_size))):
        stop = min(n, start + int(batch_size))
        batch = imgs[start:stop].to(device=dev, dtype=rdtype, non_blocking=True)
        # Any NaN/inf makes the stamp sum non-finite: a cheap test, and nan_to_num only when needed.
        fin = torch.isfinite(batch.sum(dim=(-2, -1)))
        finite[start:stop] = fin
        if not bool(fin.all()):
            batch = torch.nan_to_num(batch, nan=0.0, posinf=0.0, neginf=0.0)
        inv_f = None
        if not shared_psf:
            psf_b = psf_t[start:stop].to(device=dev, non_blocking=True)
            if truncated:
                border[start:stop] = psf_border_fraction(psf_b, support)
            if extend:
                psf_b = extend_psf_wings(psf_b, support)[0]
            inv_f, q2, bad_psf[start:stop] = _prepare_psf_batch(psf_b, psf_floor, rdtype)
            del psf_b
            if cov is not None:
                cov[start:stop] = _cov_from_inv_psf2(q2, pair, ny * nx, noise[start:stop] ** 2)
            del q2
        moments[start:stop] = _moments_batch(
            batch, inv_f, w_ri, kx_pix, ky_pix, None if offs is None else offs[start:stop]
        )

    if cov is not None and cov.shape[0] == 1:
        cov = cov.expand(n, N_MOMENTS, N_MOMENTS)
    if cov is not None:
        sigma_m00 = cov[:, _M00, _M00].clamp_min(0).sqrt()
    else:
        sigma_m00 = torch.zeros(n, dtype=torch.float64, device=dev)
    shape = shear_from_moments(
        moments,
        cov,
        sigma_m00,
        c_ratio * sigma_m00,
        snr_min,
        selection_bin_width,
        noise_bias_correction,
    )
    snr = shape["snr"]
    flags = torch.zeros(n, dtype=torch.int32, device=dev)
    flags |= torch.where(finite, 0, FLAG_NONFINITE_INPUT).to(torch.int32)
    flags |= torch.where(shape["denominator"] > 0, 0, FLAG_NONPOSITIVE_DENOMINATOR).to(torch.int32)
    bad_psf_n = bad_psf.expand(n) if bad_psf.shape[0] == 1 else bad_psf
    flags |= torch.where(bad_psf_n, FLAG_BAD_PSF, 0).to(torch.int32)
    if snr_min > 0:
        flags |= torch.where(shape["weight"] > 0, 0, FLAG_BELOW_SNR_MIN).to(torch.int32)

    good = flags == 0
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    result_t = {
        k: torch.where(good, shape[k], zero)
        for k in ("e1", "e2", "r11", "r22", "r12", "r21", "r11_shape", "r22_shape", "r11_sel", "r22_sel")
    }
    result_t["weight"] = torch.where(good, shape["weight"], zero)
    result_t["snr"] = snr
    result_t["m00"] = moments[:, _M00]
    result_t["psf_border_frac"] = border
    if truncated:
        worst = float(border.max()) if n else 0.0
        key = (2 * support + 1, bool(extend))
        if worst > PSF_BORDER_FRACTION_WARN:
            # once per process and box size at WARNING (every batch of a run has the same PSF product), then DEBUG
            level = logging.DEBUG if key in _TRUNCATION_WARNED else logging.WARNING
            _TRUNCATION_WARNED.add(key)
            log.log(
                level,
                "PSF model truncated: its %dx%d support box carries up to %.2e of its flux in the outermost "
                "pixel frame (> %.0e); %s",
                2 * support + 1,
                2 * support + 1,
                worst,
                PSF_BORDER_FRACTION_WARN,
                "wings extended with a fitted power law" if extend else "deconvolved as truncated",
            )
    result_t["flags"] = flags
    if return_moments:
        for i, name in enumerate(MOMENT_NAMES[1:], start=1):
            result_t[name] = moments[:, i]
    if return_covariance:
        result_t["cov"] = (
            cov
            if cov is not None
            else torch.zeros((n, N_MOMENTS, N_MOMENTS), dtype=torch.float64, device=dev)
        )
    # Single device->host transfer at the very end.
    return {k: v.detach().cpu().numpy() for k, v in result_t.items()}
