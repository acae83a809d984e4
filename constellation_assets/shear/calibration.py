"""Shear calibration: image simulations with known shear through the production estimator.

Each simulated galaxy gives four stamps: the galaxy sheared by ``+g`` and ``-g`` and the same galaxy
rotated by 90 degrees, sheared by ``+g`` and ``-g`` (a two-element ring test, Nakajima & Bernstein
2007; +/-g pairs as in Sheldon & Huff 2017 and Pujol et al. 2019).  The 90-degree rotation cancels the
intrinsic shape noise exactly, and the ``+g``/``-g`` stamps of one galaxy share one noise field, so
the shear difference is nearly free of noise:

    g_obs = (1 + m) g_true + c,   m = (g+ - g-) / (2 g) - 1,   c = (g+ + g-) / 2,

with ``g+- = sum(w e) / sum(w R)`` over all stamps sheared by ``+-g``.  Even-numbered galaxies are
sheared along component 1, odd-numbered ones along component 2 (shearing both at once would leak the
cross response R12 ~ e1 e2 of each galaxy into m, which a two-element ring does not cancel).  Errors
are delete-one-block jackknife over galaxies.  GalSim renders every stamp (galaxy x PSF x pixel); when
the PSF is 90-degree symmetric the rotated stamps are exact 90-degree rotations of the unrotated ones
(about pixel ``(H//2, W//2)``) and are not re-rendered.

Noisy runs: galaxy fluxes give a matched-filter S/N (``sqrt(sum I^2) / noise_sigma`` of the noiseless
stamp) drawn from ``dN/dS ~ S^snr_power_law_index`` on ``[snr_min, snr_max]``; ``n_noise_realizations``
noise fields per galaxy.  With ``control_variate`` (default) the exact first-order noise term of each
stamp's e and R, ``J(M_noiseless) . M_noise``, is subtracted: it has zero mean, so m and c are unchanged
in expectation, and their errors shrink by about 10x at S/N ~ 10 (the sims know their noise fields).

All randomness comes from ``numpy.random.Generator(PCG64)`` seeded by sha256 of ``(seed, galaxy
index)``, so a galaxy's stamps do not depend on ``n_galaxies`` or chunking.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from constellation_assets.euclid import VIS_PSF_FWHM_ARCSEC
from constellation_assets.shear.ensemble import jackknife_blocks
from constellation_assets.shear.fpfs import (
    MOMENT_NAMES,
    FpfsSettings,
    measure_stamps,
    moment_noise_covariance,
    shear_from_moments,
)

POPULATIONS = ("sersic", "bulge_disk", "cosmos", "fixed")
PSF_MODELS = ("moffat", "gaussian", "airy_gaussian", "image")

#: ``airy_gaussian``: Airy of a 1.2 m aperture with 0.3 central obscuration at 700 nm (lambda / D =
#: 0.12") convolved with a Gaussian (jitter, charge diffusion) of FWHM 0.11": FWHM ~0.17", Airy-ring wings.
AIRY_LAM_OVER_DIAM_ARCSEC = 0.12
AIRY_OBSCURATION = 0.3
AIRY_GAUSSIAN_FWHM_ARCSEC = 0.11


@dataclass(frozen=True)
class CalibrationSettings:
    """Inputs of one calibration run (mirrors the ``calibration`` config section)."""

    n_galaxies: int = 2000
    g_true: float = 0.02
    psf_model: str = "moffat"
    psf_fwhm_arcsec: float = VIS_PSF_FWHM_ARCSEC
    moffat_beta: float = 2.5
    psf_g1: float = 0.0
    psf_g2: float = 0.0
    # The estimator's PSF: the drawn PSF stamp cut to a centred box of this many pixels (0: the whole
    # stamp), as real PSF models are (Q1: 21 x 21), while the galaxies see the full PSF.
    measure_psf_box_pix: int = 0
    psf_wings: str = "extend"
    pixel_scale_arcsec: float = 0.1
    stamp_size_pix: int = 64
    noise_sigma: float = 0.0
    snr_min: float = 10.0
    snr_max: float = 100.0
    snr_power_law_index: float = -2.0
    population: str = "sersic"
    n_noise_realizations: int = 1
    # Noisy runs: each stamp observed in this many exposures, each with noise_sigma * sqrt(n_exposures)
    # (the combined depth is unchanged), combined at the moment level ("moments", the pipeline's way)
    # or as per-exposure e / R ("per_exposure": ratios, cut and responses at the single-exposure S/N).
    n_exposures: int = 1
    # Noisy runs: a catalog-like detection cut without response, as the MER S/N cut upstream: keep a
    # stamp when its flux in a fixed round Gaussian aperture (sigma detection_sigma_arcsec) on the noisy
    # sheared image has S/N >= detection_snr_min (0: no cut).  Disables the control variate.
    detection_snr_min: float = 0.0
    detection_sigma_arcsec: float = 0.15
    exposure_combination: str = "moments"
    control_variate: bool = True
    seed: int = 0
    # Estimator settings (the ``shear`` section).
    sigma_arcsec: float = FpfsSettings.sigma_arcsec
    c_ratio: float = FpfsSettings.c_ratio
    precision: str = FpfsSettings.precision
    noise_bias_correction: bool = FpfsSettings.noise_bias_correction
    # Smooth selection on the measured FPFS S/N (0: none) and the width of its weight ramp.
    estimator_snr_min: float = FpfsSettings.snr_min
    selection_bin_width: float = FpfsSettings.selection_bin_width
    device: str = "cpu"
    batch_size: int = FpfsSettings.batch_size
    chunk_galaxies: int = 256

    def validate(self) -> CalibrationSettings:
        if self.population not in POPULATIONS:
            raise ValueError(f"population={self.population!r} is not one of {POPULATIONS}")
        if self.psf_model not in PSF_MODELS:
            raise ValueError(f"psf_model={self.psf_model!r} is not one of {PSF_MODELS}")
        if self.n_galaxies < 4:
            raise ValueError(
                f"n_galaxies={self.n_galaxies} must be >= 4 (half per shear component, jackknife errors)"
            )
        if not 0 < abs(self.g_true) < 0.2:
            raise ValueError(f"g_true={self.g_true} must be non-zero and |g_true| < 0.2")
        if self.noise_sigma < 0 or self.snr_min <= 0 or self.snr_max < self.snr_min:
            raise ValueError(
                f"need noise_sigma >= 0 and 0 < snr_min <= snr_max; got noise_sigma={self.noise_sigma}, "
                f"snr_min={self.snr_min}, snr_max={self.snr_max}"
            )
        if math.hypot(self.psf_g1, self.psf_g2) >= 0.5:
            raise ValueError(
                f"PSF ellipticity |(psf_g1, psf_g2)| = |({self.psf_g1}, {self.psf_g2})| must be < 0.5"
            )
        if self.stamp_size_pix < 16 or self.stamp_size_pix % 2:
            raise ValueError(f"stamp_size_pix={self.stamp_size_pix} must be even and >= 16")
        if self.measure_psf_box_pix < 0 or (self.measure_psf_box_pix and self.measure_psf_box_pix % 2 == 0):
            raise ValueError(f"measure_psf_box_pix={self.measure_psf_box_pix} must be 0 or an odd box size")
        if self.n_exposures < 1 or self.exposure_combination not in ("moments", "per_exposure"):
            raise ValueError(
                f"n_exposures={self.n_exposures} must be >= 1 and exposure_combination="
                f"{self.exposure_combination!r} one of 'moments', 'per_exposure'"
            )
        if self.n_noise_realizations < 1:
            raise ValueError(f"n_noise_realizations={self.n_noise_realizations} must be >= 1")
        return self


@dataclass
class CalibrationResult:
    """Multiplicative and additive shear bias with 1-sigma jackknife errors."""

    m1: float
    m1_err: float
    m2: float
    m2_err: float
    c1: float
    c1_err: float
    c2: float
    c2_err: float
    n_galaxies: int
    n_stamps: int
    g_true: float
    g1_plus: float
    g1_minus: float
    g2_plus: float
    g2_minus: float
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def within(self, m_max: float, c_max: float) -> bool:
        return max(abs(self.m1), abs(self.m2)) < m_max and max(abs(self.c1), abs(self.c2)) < c_max


def _rng(seed: int, index: int, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(f"constellation/shear-calibration/{purpose}/{seed}/{index}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def rot90_about_centre(arr: np.ndarray) -> np.ndarray:
    """Rotate stamps (..., H, W) by 90 degrees about pixel (H//2, W//2) (cyclic, exact on the grid).

    A source at offset (dx, dy) moves to (dy, -dx); spin-2 quantities change sign.
    """
    return np.roll(np.rot90(arr, axes=(-2, -1)), 1, axis=-2)


def _draw_galaxy(settings: CalibrationSettings, rng: np.random.Generator):
    """One galaxy profile (unit flux, intrinsic shape applied) from the configured population."""
    import galsim

    g_int = min(float(np.hypot(*rng.normal(0.0, 0.2, size=2))), 0.7)  # Rayleigh, sigma 0.2 per component
    beta_rad = rng.uniform(0.0, math.pi)
    pop = settings.population
    if pop == "fixed":
        gal = galsim.Exponential(half_light_radius=0.3)
        g_int = 0.2
    elif pop == "sersic":
        n_sersic = float(np.clip(math.exp(rng.normal(math.log(1.2), 0.5)), 0.5, 4.5))
        hlr = float(np.clip(math.exp(rng.normal(math.log(0.25), 0.35)), 0.08, 1.0))
        gal = galsim.Sersic(n=n_sersic, half_light_radius=hlr)
    elif pop == "cosmos":
        from constellation_assets.shear.cosmos_sersic_table import COSMOS_SERSIC_N_HLR_ARCSEC_G

        n_sersic, hlr, g_int = COSMOS_SERSIC_N_HLR_ARCSEC_G[
            int(rng.integers(len(COSMOS_SERSIC_N_HLR_ARCSEC_G)))
        ]
        gal = galsim.Sersic(n=float(np.clip(n_sersic, 0.3, 6.0)), half_light_radius=float(hlr))
        g_int = min(float(g_int), 0.7)
    else:  # bulge_disk
        hlr_disk = float(np.clip(math.exp(rng.normal(math.log(0.3), 0.35)), 0.1, 1.0))
        bulge_frac = float(rng.uniform(0.0, 0.6))
        disk = galsim.Exponential(half_light_radius=hlr_disk, flux=1.0 - bulge_frac)
        bulge = galsim.DeVaucouleurs(half_light_radius=0.5 * hlr_disk, flux=bulge_frac).shear(
            g=0.5 * g_int, beta=beta_rad * galsim.radians
        )
        disk = disk.shear(g=g_int, beta=beta_rad * galsim.radians)
        return galsim.Add([bulge, disk]).withFlux(1.0)
    return gal.shear(g=g_int, beta=beta_rad * galsim.radians).withFlux(1.0)


def make_psf(settings: CalibrationSettings, psf_image: np.ndarray | None = None):
    """GalSim PSF object for the settings (``psf_image`` for ``psf_model='image'``, pixel included)."""
    import galsim

    if settings.psf_model == "image":
        if psf_image is None:
            raise ValueError("psf_model='image' needs psf_image: a (H, W) PSF image with the pixel response")
        psf = galsim.InterpolatedImage(
            galsim.Image(np.asarray(psf_image, dtype=np.float64), scale=settings.pixel_scale_arcsec)
        )
    elif settings.psf_model == "gaussian":
        psf = galsim.Gaussian(fwhm=settings.psf_fwhm_arcsec)
    elif settings.psf_model == "airy_gaussian":
        psf = galsim.Convolve(
            galsim.Airy(lam_over_diam=AIRY_LAM_OVER_DIAM_ARCSEC, obscuration=AIRY_OBSCURATION),
            galsim.Gaussian(fwhm=AIRY_GAUSSIAN_FWHM_ARCSEC),
        )
    else:
        psf = galsim.Moffat(beta=settings.moffat_beta, fwhm=settings.psf_fwhm_arcsec)
    if settings.psf_g1 or settings.psf_g2:
        psf = psf.shear(g1=settings.psf_g1, g2=settings.psf_g2)
    return psf.withFlux(1.0)


def truncate_psf(psf_stamp: np.ndarray, box_pix: int) -> np.ndarray:
    """The PSF stamp with every pixel outside the centred ``box_pix`` x ``box_pix`` box set to 0 (not
    renormalised: a truncated model sums to less than 1)."""
    h, w = psf_stamp.shape[-2:]
    half = int(box_pix) // 2
    out = np.zeros_like(psf_stamp)
    sl = (slice(h // 2 - half, h // 2 + half + 1), slice(w // 2 - half, w // 2 + half + 1))
    out[sl] = psf_stamp[sl]
    return out


def _draw(obj, settings: CalibrationSettings, offset=(0.0, 0.0)) -> np.ndarray:
    n = settings.stamp_size_pix
    method = "no_pixel" if settings.psf_model == "image" else "auto"
    return obj.drawImage(
        nx=n, ny=n, scale=settings.pixel_scale_arcsec, use_true_center=False, offset=offset, method=method
    ).array.astype(np.float64)


def render_galaxy_quad(settings: CalibrationSettings, index: int, psf, psf_symmetric: bool):
    """Noiseless stamps (4, H, W) of galaxy ``index``: [rot0 +g, rot0 -g, rot90 -g, rot90 +g].

    The shear is ``(+-g, 0)`` for even ``index`` and ``(0, +-g)`` for odd ``index``.

    Returns ``(stamps, offsets (4, 2), shear_sign (4,), snr_target)``; the rot90 stamps are the
    rotated galaxy with the rotated offset, so rows 0 and 3 are the ``+g`` stamps.
    """
    import galsim

    rng = _rng(settings.seed, index, "galaxy")
    gal = _draw_galaxy(settings, rng)
    dx, dy = rng.uniform(-0.5, 0.5, size=2)
    snr_target = _draw_snr(settings, rng)
    g = settings.g_true
    g1_unit, g2_unit = (1.0, 0.0) if index % 2 == 0 else (0.0, 1.0)
    stamps = np.empty((4, settings.stamp_size_pix, settings.stamp_size_pix))
    for j, sign in enumerate((1.0, -1.0)):
        stamps[j] = _draw(
            galsim.Convolve(gal.shear(g1=sign * g * g1_unit, g2=sign * g * g2_unit), psf), settings, (dx, dy)
        )
    if psf_symmetric:
        stamps[2:] = rot90_about_centre(stamps[:2])
    else:
        gal90 = gal.rotate(90.0 * galsim.degrees)
        for j, sign in enumerate((-1.0, 1.0), start=2):
            stamps[j] = _draw(
                galsim.Convolve(gal90.shear(g1=sign * g * g1_unit, g2=sign * g * g2_unit), psf),
                settings,
                (dy, -dx),
            )
    offsets = np.array([[dx, dy], [dx, dy], [dy, -dx], [dy, -dx]])
    return stamps, offsets, np.array([1.0, -1.0, -1.0, 1.0]), snr_target


def _subtract_linear_noise_term(e_r, clean, clean_offsets, noise_only, psf_stamp, cov, settings, measure_kw):
    """Control variate: remove the first-order noise term ``J(M_clean) . M_noise`` from w e and w R.

    The sims know each stamp's noise field, and the moments are linear in the image, so the linear
    noise term of any function of the moments is ``J . M_noise`` with the Jacobian ``J`` taken at the
    noiseless moments.  Its coefficient does not depend on the noise, so its mean is exactly zero: the
    expectation of w e and w R (hence m and c) is unchanged, while the noise-driven scatter (dominant at
    low S/N) drops to second order.  ``e_r`` holds the weighted ``we1, we2, wr11, wr22``.
    """
    import torch

    n_g = len(clean)
    n_real = noise_only[0].shape[0]
    nm = len(MOMENT_NAMES)
    cln = measure_stamps(
        np.concatenate(clean),
        psf_stamp,
        offsets_pix=np.concatenate(clean_offsets),
        return_moments=True,
        **measure_kw,
    )
    m0 = torch.tensor(np.stack([cln[k] for k in MOMENT_NAMES], axis=1), requires_grad=True)
    sigma = torch.sqrt(cov[0, 0]) * torch.ones(m0.shape[0], dtype=torch.float64)
    shape = shear_from_moments(
        m0,
        cov.expand(m0.shape[0], nm, nm),
        sigma,
        settings.c_ratio * sigma,
        settings.estimator_snr_min,
        settings.selection_bin_width,
        settings.noise_bias_correction,
    )
    weighted = {f"w{k}": shape["weight"] * shape[k] for k in ("e1", "e2", "r11", "r22")}
    # Noise-only stamps: variants (0, 1) carry the noise at offset d, (2, 3) the rotated noise at d'.
    nz = np.concatenate(noise_only).reshape(-1, *noise_only[0].shape[2:])  # (n_g * n_real * 2, H, W)
    q_off = np.concatenate(clean_offsets).reshape(n_g, 4, 2)
    nz_off = np.repeat(q_off[:, [0, 2]][:, None], n_real, axis=1).reshape(-1, 2)
    nmo = measure_stamps(nz, psf_stamp, offsets_pix=nz_off, return_moments=True, **measure_kw)
    mn = np.stack([nmo[k] for k in MOMENT_NAMES], axis=1).reshape(n_g, n_real, 2, nm)
    mn = np.repeat(mn, 2, axis=2)  # (n_g, n_real, 4, nm): variant v uses noise v // 2
    out = {}
    for key, value in e_r.items():
        (jac,) = torch.autograd.grad(weighted[key].sum(), m0, retain_graph=True)
        jac = jac.detach().numpy().reshape(n_g, 1, 4, nm)
        term = (jac * mn).sum(-1).reshape(-1)
        out[key] = value - term
    return out


def _detection_snr(images, offsets, settings, n_exp):
    """S/N of the flux in a round Gaussian aperture at the source (a catalog detection S/N proxy)."""
    n, h, w = images.shape
    yy, xx = np.mgrid[0:h, 0:w]
    s = settings.detection_sigma_arcsec / settings.pixel_scale_arcsec
    dx = xx[None] - (w // 2 + offsets[:, 0, None, None])
    dy = yy[None] - (h // 2 + offsets[:, 1, None, None])
    g = np.exp(-0.5 * (dx * dx + dy * dy) / s**2)
    sigma = settings.noise_sigma * math.sqrt(n_exp)
    snr = (images * g).sum(axis=(1, 2)) / (sigma * np.sqrt((g * g).sum(axis=(1, 2))))
    if n_exp > 1:  # exposures of one stamp: combined (equal depth) S/N
        snr = snr.reshape(-1, n_exp).sum(axis=1) / math.sqrt(n_exp)
    return snr


def _measure_exposures(images, offsets, psf_stamp, settings, measure_kw, n_exp):
    """Per-stamp e, R, weight from ``n_exp`` consecutive exposures per stamp (``exposure_combination``)."""
    from constellation_assets.shear.stamps import combine_exposure_moments, combine_exposures

    n = len(images) // n_exp
    si = np.repeat(np.arange(n), n_exp)
    kw = dict(measure_kw, noise_sigma=settings.noise_sigma * math.sqrt(n_exp))
    if settings.exposure_combination == "per_exposure":
        per = measure_stamps(images, psf_stamp, offsets_pix=offsets, **kw)
        return combine_exposures(n, si, per, np.ones(len(si), dtype=bool))
    kw["snr_min"] = 0.0
    per = measure_stamps(
        images, psf_stamp, offsets_pix=offsets, return_moments=True, return_covariance=True, **kw
    )
    mom = np.stack([per[k] for k in MOMENT_NAMES], axis=1)
    return combine_exposure_moments(
        n,
        si,
        mom,
        per["cov"],
        np.ones(len(si), dtype=bool),
        c_ratio=settings.c_ratio,
        snr_min=settings.estimator_snr_min,
        selection_bin_width=settings.selection_bin_width,
        noise_bias_correction=settings.noise_bias_correction,
    )


def _draw_snr(settings: CalibrationSettings, rng: np.random.Generator) -> float:
    """Matched-filter S/N from a power law dN/dS ~ S^index on [snr_min, snr_max]."""
    a, b, k = settings.snr_min, settings.snr_max, settings.snr_power_law_index
    u = rng.uniform()
    if b == a:
        return a
    if abs(k + 1.0) < 1e-12:
        return a * (b / a) ** u
    p = k + 1.0
    return (a**p + u * (b**p - a**p)) ** (1.0 / p)


def _jackknife(num_p, den_p, num_m, den_m, g_true, n_blocks):
    """m, c and their jackknife errors from per-galaxy sums of w*e and w*R for +g and -g stamps."""

    def estimate(sel):
        gp = num_p[sel].sum() / den_p[sel].sum()
        gm = num_m[sel].sum() / den_m[sel].sum()
        return (gp - gm) / (2.0 * g_true) - 1.0, 0.5 * (gp + gm), gp, gm

    n = len(num_p)
    m, c, gp, gm = estimate(np.ones(n, dtype=bool))
    blocks = jackknife_blocks(n, n_blocks)
    nb = blocks.max() + 1
    ms = np.empty(nb)
    cs = np.empty(nb)
    for b in range(nb):
        ms[b], cs[b], _, _ = estimate(blocks != b)
    fac = (nb - 1) / nb
    m_err = math.sqrt(fac * ((ms - ms.mean()) ** 2).sum())
    c_err = math.sqrt(fac * ((cs - cs.mean()) ** 2).sum())
    return m, m_err, c, c_err, gp, gm


def run_calibration(
    cfg: Any = None,
    *,
    psf_image: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> CalibrationResult:
    """Run the shear calibration sims and fit ``g_obs = (1 + m) g_true + c`` for both components.

    Args:
        cfg: ``None`` (defaults), a :class:`CalibrationSettings`, a ``PipelineConfig`` (its
            ``calibration`` and ``shear`` sections), or a mapping of settings.
        psf_image: PSF image (pixel response included) for ``psf_model='image'``.
        progress: optional callback ``(galaxies_done, n_galaxies)``.
        **overrides: any :class:`CalibrationSettings` field.
    """
    settings = settings_from(cfg, **overrides).validate()
    import galsim

    t0 = time.perf_counter()
    psf = make_psf(settings, psf_image)
    psf_symmetric = settings.psf_model != "image" and settings.psf_g1 == 0 and settings.psf_g2 == 0
    psf_stamp = _draw(psf, settings)
    psf_stamp /= psf_stamp.sum()
    if settings.measure_psf_box_pix:
        psf_stamp = truncate_psf(psf_stamp, settings.measure_psf_box_pix)

    n_gal = settings.n_galaxies
    n_real = max(1, settings.n_noise_realizations)
    sums = np.zeros((n_gal, 2, 2, 2))  # galaxy, component, (+g, -g), (sum w e, sum w R)
    noisy = settings.noise_sigma > 0
    measure_kw = dict(
        pixel_scale_arcsec=settings.pixel_scale_arcsec,
        noise_sigma=settings.noise_sigma,
        device=settings.device,
        sigma_arcsec=settings.sigma_arcsec,
        c_ratio=settings.c_ratio,
        noise_bias_correction=settings.noise_bias_correction,
        snr_min=settings.estimator_snr_min,
        selection_bin_width=settings.selection_bin_width,
        psf_wings=settings.psf_wings,
        precision=settings.precision,
        batch_size=settings.batch_size,
    )
    n_exp = settings.n_exposures
    # The control variate needs the estimator to be a function of the combined moments.
    use_cv = (
        noisy
        and settings.control_variate
        and (n_exp == 1 or settings.exposure_combination == "moments")
        and settings.detection_snr_min <= 0
    )
    if use_cv:
        cov = moment_noise_covariance(
            psf_stamp, settings.pixel_scale_arcsec, settings.noise_sigma, settings.sigma_arcsec
        )
    with galsim.utilities.single_threaded():
        for start in range(0, n_gal, settings.chunk_galaxies):
            idx = range(start, min(n_gal, start + settings.chunk_galaxies))
            stamps, offsets, signs, clean, clean_offsets, noise_only = [], [], [], [], [], []
            for i in idx:
                quad, off, sign, snr_target = render_galaxy_quad(settings, i, psf, psf_symmetric)
                if noisy:
                    # Flux so that the matched-filter S/N of the noiseless rot0 stamp is snr_target.
                    quad = quad * (snr_target * settings.noise_sigma / math.sqrt((quad[0] ** 2).sum()))
                    # One noise field per realisation, shared by the +g and -g stamps (noise cancels in
                    # g+ - g-) and rotated with the galaxy for the 90-degree pair.
                    rng = _rng(settings.seed, i, "noise")
                    if n_exp == 1:
                        noise = rng.standard_normal(size=(n_real, *quad.shape[1:]), dtype=np.float32)
                        noise *= np.float32(settings.noise_sigma)
                        noise90 = rot90_about_centre(noise)
                        stamps.append(
                            (quad[None] + np.stack([noise, noise, noise90, noise90], axis=1)).reshape(
                                -1, *quad.shape[1:]
                            )
                        )
                        offsets.append(np.tile(off, (n_real, 1)))
                    else:
                        # (n_real, n_exp, H, W): exposure noise, each sqrt(n_exp) deeper than the total.
                        noise_e = rng.standard_normal(size=(n_real, n_exp, *quad.shape[1:]), dtype=np.float32)
                        noise_e *= np.float32(settings.noise_sigma * math.sqrt(n_exp))
                        noise_e90 = rot90_about_centre(noise_e)
                        per_exp = quad[None, :, None] + np.stack(
                            [noise_e, noise_e, noise_e90, noise_e90], axis=1
                        )
                        stamps.append(per_exp.reshape(-1, *quad.shape[1:]))  # variant-major, then exposure
                        offsets.append(np.tile(np.repeat(off, n_exp, axis=0), (n_real, 1)))
                        noise, noise90 = noise_e.mean(axis=1), noise_e90.mean(axis=1)  # combined noise
                    signs.append(np.tile(sign, n_real))
                    if use_cv:
                        clean.append(quad)
                        clean_offsets.append(off)
                        noise_only.append(np.stack([noise, noise90], axis=1))  # (n_real, 2, H, W)
                else:
                    stamps.append(quad)
                    offsets.append(off)
                    signs.append(sign)
            if noisy and n_exp > 1:
                cat = _measure_exposures(
                    np.concatenate(stamps), np.concatenate(offsets), psf_stamp, settings, measure_kw, n_exp
                )
            else:
                cat = measure_stamps(
                    np.concatenate(stamps), psf_stamp, offsets_pix=np.concatenate(offsets), **measure_kw
                )
            e_r = {f"w{k}": cat["weight"] * cat[k] for k in ("e1", "e2", "r11", "r22")}
            if noisy and settings.detection_snr_min > 0:
                keep = _detection_snr(np.concatenate(stamps), np.concatenate(offsets), settings, n_exp)
                e_r = {k: v * (keep >= settings.detection_snr_min) for k, v in e_r.items()}
            if use_cv:
                e_r = _subtract_linear_noise_term(
                    e_r, clean, clean_offsets, noise_only, psf_stamp, cov, settings, measure_kw
                )
            sign = np.concatenate(signs)
            per_gal = n_real if noisy else 1
            gal_of_stamp = np.repeat(np.arange(len(idx)), 4 * per_gal) + start
            for comp in (0, 1):
                e = e_r[f"we{comp + 1}"]
                r = e_r[f"wr{comp + 1}{comp + 1}"]
                for k, s in enumerate((1.0, -1.0)):
                    sel = sign == s
                    np.add.at(sums[:, comp, k, 0], gal_of_stamp[sel], e[sel])
                    np.add.at(sums[:, comp, k, 1], gal_of_stamp[sel], r[sel])
            if progress is not None:
                progress(idx.stop, n_gal)

    res = {}
    for comp in (0, 1):
        own = sums[comp::2, comp]  # galaxies sheared along this component
        res[comp] = _jackknife(
            own[:, 0, 0], own[:, 0, 1], own[:, 1, 0], own[:, 1, 1], settings.g_true, min(len(own), 100)
        )
    (m1, m1e, c1, c1e, g1p, g1m), (m2, m2e, c2, c2e, g2p, g2m) = res[0], res[1]
    return CalibrationResult(
        m1=float(m1),
        m1_err=float(m1e),
        m2=float(m2),
        m2_err=float(m2e),
        c1=float(c1),
        c1_err=float(c1e),
        c2=float(c2),
        c2_err=float(c2e),
        n_galaxies=n_gal,
        n_stamps=int(n_gal * 4 * (n_real if noisy else 1)),
        g_true=settings.g_true,
        g1_plus=float(g1p),
        g1_minus=float(g1m),
        g2_plus=float(g2p),
        g2_minus=float(g2m),
        seconds=time.perf_counter() - t0,
        config=asdict(settings),
    )


_SHEAR_FIELDS = {
    "sigma_arcsec",
    "c_ratio",
    "noise_bias_correction",
    "precision",
    "device",
    "batch_size",
    "stamp_size_pix",
    "estimator_snr_min",
    "selection_bin_width",
}


def settings_from(cfg: Any = None, **overrides: Any) -> CalibrationSettings:
    """Build :class:`CalibrationSettings` from None, settings, a mapping or a ``PipelineConfig``."""
    names = {f.name for f in fields(CalibrationSettings)}
    values: dict[str, Any] = {}
    if cfg is None:
        pass
    elif isinstance(cfg, CalibrationSettings):
        values = asdict(cfg)
    elif isinstance(cfg, dict):
        values = dict(cfg)
    else:
        # A PipelineConfig: the calibration section, plus estimator and device settings.
        for section_name, allowed in (("shear", _SHEAR_FIELDS), ("calibration", names)):
            section = getattr(cfg, section_name, None)
            if section is None:
                continue
            data = section.model_dump() if hasattr(section, "model_dump") else dict(vars(section))
            values.update({k: v for k, v in data.items() if k in allowed and v is not None})
        compute = getattr(cfg, "compute", None)
        if compute is not None:
            values.setdefault("device", getattr(compute, "device", "cpu"))
            values.setdefault("batch_size", getattr(compute, "batch_size", FpfsSettings.batch_size))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - names)
    if unknown and not (cfg is not None and not isinstance(cfg, dict | CalibrationSettings)):
        raise ValueError(f"unknown calibration settings {unknown}; known: {sorted(names)}")
    return replace(CalibrationSettings(), **{k: v for k, v in values.items() if k in names})


def calibration_figure_png(
    result: CalibrationResult, m_target: float = 2e-3, c_target: float = 5e-4
) -> bytes:
    """PNG of the fit: measured vs true shear for both components, and m, c against the targets."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    g = result.g_true
    gt = np.array([-g, g])
    for comp, (gp, gm, m, c, color) in enumerate(
        (
            (result.g1_plus, result.g1_minus, result.m1, result.c1, "C0"),
            (result.g2_plus, result.g2_minus, result.m2, result.c2, "C1"),
        ),
        start=1,
    ):
        ax1.plot(gt, np.array([gm, gp]) - gt, "o", color=color, label=f"g{comp}")
        xs = np.linspace(-1.2 * g, 1.2 * g, 20)
        ax1.plot(xs, m * xs + c, "-", color=color, lw=1)
    ax1.axhline(0, color="k", lw=0.5)
    ax1.set_xlabel("g_true")
    ax1.set_ylabel("g_obs - g_true")
    ax1.set_title(f"N={result.n_galaxies} galaxies, {result.n_stamps} stamps")
    ax1.legend(fontsize=8)
    labels = ["m1", "m2", "c1", "c2"]
    vals = [result.m1, result.m2, result.c1, result.c2]
    errs = [result.m1_err, result.m2_err, result.c1_err, result.c2_err]
    ax2.errorbar(range(4), vals, yerr=errs, fmt="o", color="k")
    ax2.fill_between([-0.5, 1.5], -m_target, m_target, color="C2", alpha=0.2, label=f"|m|<{m_target:g}")
    ax2.fill_between([1.5, 3.5], -c_target, c_target, color="C3", alpha=0.2, label=f"|c|<{c_target:g}")
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_xticks(range(4), labels)
    ax2.legend(fontsize=8)
    ax2.set_title("shear bias (1-sigma jackknife)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
