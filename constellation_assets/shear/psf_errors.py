"""Shear response to PSF-model errors: leakage ``alpha`` of a model ellipticity error and ``dm/d(dT/T)``.

The calibration sims of :mod:`constellation_assets.shear.calibration` (isolated noiseless galaxies, each as
four stamps: ``+-g`` x 0/90-degree ring partners, so intrinsic shapes cancel) are rendered once with the
true PSF and measured several times by the production estimator: with the true PSF as the model, and with
models that differ from it by a known error, as a PSF model fitted to stars does:

- an ellipticity error ``dg_PSF`` (GalSim shear convention, applied to the PSF before the pixel): the
  measured shear gains an additive term ``c_i = alpha_i dg_PSF,i``;
- a size error ``dT/T`` (the PSF dilated by ``sqrt(1 + dT/T)``, flux kept): a multiplicative term
  ``m = beta dT/T`` (``beta = dm/d(dT/T)``; an over-sized model over-corrects the PSF smearing).

Every model is measured on the same stamps, so the differences ``c(+dg) - c(-dg)`` and ``m(+s) - m(-s)``
are free of the population scatter that limits ``m`` and ``c`` themselves; the symmetric difference also
cancels the terms quadratic in the error.  ``c_i = sum(w e_i) / sum(w R_ii)`` over all stamps (the ``+-g``
and ring partners cancel the true shear and the intrinsic shapes), ``m_i`` as in the calibration (stamps
sheared along component ``i``).  Errors: delete-one-block jackknife over galaxies of the differences.

Signs: the errors are model minus truth, so an elongated model gives ``c`` of the opposite sign
(``alpha < 0``) and an over-sized model ``m > 0`` (Moffat beta 2.5, FWHM 0.17", the Sersic population:
``alpha = -0.33``, ``beta = +0.26``; errors counted as truth minus model flip both signs).

The implied PSF-model requirement for a shear requirement ``|m| < m_max``, ``|c| < c_max``: ``|dg_PSF| <
c_max / |alpha|``, ``|dT/T| < m_max / |beta|`` (each error using the whole budget).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from constellation_assets.shear.calibration import (
    CalibrationSettings,
    _draw,
    make_psf,
    render_galaxy_quad,
    settings_from,
    truncate_psf,
)
from constellation_assets.shear.ensemble import jackknife_blocks
from constellation_assets.shear.fpfs import measure_stamps

__all__ = ["PsfErrorResult", "model_psf_stamp", "run_psf_error_response"]


@dataclass
class PsfErrorResult:
    """Shear response to PSF-model errors (1-sigma jackknife errors) and the implied model requirements."""

    psf_model: str
    dg_psf: float  # model ellipticity error used (+- dg_psf on each component)
    size_error: float  # model dT/T used (+- size_error)
    alpha1: float
    alpha1_err: float
    alpha2: float
    alpha2_err: float
    alpha12: float  # dc2 / dg_PSF,1 (cross leakage; 0 for a round PSF)
    alpha12_err: float
    alpha21: float  # dc1 / dg_PSF,2
    alpha21_err: float
    dm1_dsize: float
    dm1_dsize_err: float
    dm2_dsize: float
    dm2_dsize_err: float
    dm_dsize: float  # mean of the two components
    dm_dsize_err: float
    dc1_dsize: float  # additive response to the size error (0 for a round PSF)
    dc1_dsize_err: float
    dc2_dsize: float
    dc2_dsize_err: float
    m_true_model: float  # mean m1, m2 with the true PSF as the model (the estimator's own bias)
    m_requirement: float
    c_requirement: float
    dg_psf_max: float  # |dg_PSF| allowed by c_requirement
    size_error_max: float  # |dT/T| allowed by m_requirement
    n_galaxies: int
    n_stamps: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_psf_stamp(
    settings: CalibrationSettings, dg1: float = 0.0, dg2: float = 0.0, size_error: float = 0.0
) -> np.ndarray:
    """The estimator's PSF stamp of a model that differs from the true PSF by ``(dg1, dg2)``, ``dT/T``.

    The true PSF (:func:`constellation_assets.shear.calibration.make_psf`) is dilated by ``sqrt(1 + dT/T)``
    (flux kept) and then sheared by ``(dg1, dg2)`` before the pixel, as the synthetic survey's
    ``field.psf_model_*_error`` knobs do; drawn like the calibration's PSF stamp (unit sum, cut to
    ``measure_psf_box_pix`` when set).
    """
    if not size_error > -1.0 or math.hypot(dg1, dg2) >= 0.5:
        raise ValueError(
            f"PSF model error dT/T={size_error}, dg=({dg1}, {dg2}): need dT/T > -1 and |dg| < 0.5"
        )
    psf = make_psf(settings)
    if size_error:
        psf = psf.dilate(math.sqrt(1.0 + size_error))
    if dg1 or dg2:
        psf = psf.shear(g1=dg1, g2=dg2)
    stamp = _draw(psf, settings)
    stamp /= stamp.sum()
    if settings.measure_psf_box_pix:
        stamp = truncate_psf(stamp, settings.measure_psf_box_pix)
    return stamp


def _jackknife(fn: Callable[[np.ndarray], float], n: int, n_blocks: int) -> tuple[float, float]:
    """Value of ``fn(selection)`` on all items and its delete-one-block jackknife error."""
    value = fn(np.ones(n, dtype=bool))
    blocks = jackknife_blocks(n, n_blocks)
    nb = int(blocks.max()) + 1
    vals = np.array([fn(blocks != b) for b in range(nb)])
    err = math.sqrt((nb - 1) / nb * ((vals - vals.mean()) ** 2).sum())
    return float(value), float(err)


def run_psf_error_response(
    cfg: Any = None,
    *,
    dg_psf: float = 0.01,
    size_error: float = 0.02,
    m_requirement: float = 2e-3,
    c_requirement: float = 5e-4,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> PsfErrorResult:
    """Measure ``alpha1, alpha2`` (c per model ellipticity error) and ``dm/d(dT/T)`` on the calibration sims.

    Args:
        cfg: as :func:`constellation_assets.shear.calibration.run_calibration` (``None``, settings, a
            mapping or a ``PipelineConfig``); noiseless runs only (``noise_sigma = 0``).
        dg_psf: model ellipticity error (each component in turn, ``+dg_psf`` and ``-dg_psf``).
        size_error: model ``dT/T`` (``+size_error`` and ``-size_error``).
        m_requirement, c_requirement: shear requirement turned into the allowed model errors.
        progress: optional callback ``(galaxies_done, n_galaxies)``.
        **overrides: any :class:`~constellation_assets.shear.calibration.CalibrationSettings` field.
    """
    settings = settings_from(cfg, **overrides).validate()
    if settings.noise_sigma > 0:
        raise ValueError(
            f"noise_sigma={settings.noise_sigma}: the PSF-model error response is measured on noiseless "
            "stamps (the noise would only add scatter to a difference of two models); set noise_sigma=0"
        )
    if settings.psf_model == "image":
        raise ValueError(
            "psf_model='image' has no analytic profile to perturb; use moffat, gaussian or airy_gaussian"
        )
    if not (0 < abs(dg_psf) < 0.2 and 0 < abs(size_error) < 0.5):
        raise ValueError(f"need 0 < |dg_psf| < 0.2 and 0 < |size_error| < 0.5; got {dg_psf}, {size_error}")
    import galsim

    t0 = time.perf_counter()
    psf = make_psf(settings)
    psf_symmetric = settings.psf_g1 == 0 and settings.psf_g2 == 0
    # Model variants: the true PSF, +-dg on each component, +-dT/T.
    variants = {
        "true": (0.0, 0.0, 0.0),
        "g1+": (dg_psf, 0.0, 0.0),
        "g1-": (-dg_psf, 0.0, 0.0),
        "g2+": (0.0, dg_psf, 0.0),
        "g2-": (0.0, -dg_psf, 0.0),
        "T+": (0.0, 0.0, size_error),
        "T-": (0.0, 0.0, -size_error),
    }
    models = {k: model_psf_stamp(settings, *v) for k, v in variants.items()}
    measure_kw = dict(
        pixel_scale_arcsec=settings.pixel_scale_arcsec,
        noise_sigma=0.0,
        device=settings.device,
        sigma_arcsec=settings.sigma_arcsec,
        c_ratio=settings.c_ratio,
        noise_bias_correction=settings.noise_bias_correction,
        snr_min=0.0,
        selection_bin_width=settings.selection_bin_width,
        psf_wings=settings.psf_wings,
        precision=settings.precision,
        batch_size=settings.batch_size,
    )
    n_gal = settings.n_galaxies
    # variant, galaxy, component (e1, e2), shear sign (+g, -g), (sum w e, sum w R)
    sums = {k: np.zeros((n_gal, 2, 2, 2)) for k in variants}
    with galsim.utilities.single_threaded():
        for start in range(0, n_gal, settings.chunk_galaxies):
            idx = range(start, min(n_gal, start + settings.chunk_galaxies))
            stamps, offsets, signs = [], [], []
            for i in idx:
                quad, off, sign, _ = render_galaxy_quad(settings, i, psf, psf_symmetric)
                stamps.append(quad)
                offsets.append(off)
                signs.append(sign)
            images = np.concatenate(stamps)
            offs = np.concatenate(offsets)
            sign = np.concatenate(signs)
            gal = np.repeat(np.arange(len(idx)), 4) + start
            for key, model in models.items():
                cat = measure_stamps(images, model, offsets_pix=offs, **measure_kw)
                for comp in (0, 1):
                    we = cat["weight"] * cat[f"e{comp + 1}"]
                    wr = cat["weight"] * cat[f"r{comp + 1}{comp + 1}"]
                    for k, s in enumerate((1.0, -1.0)):
                        sel = sign == s
                        np.add.at(sums[key][:, comp, k, 0], gal[sel], we[sel])
                        np.add.at(sums[key][:, comp, k, 1], gal[sel], wr[sel])
            if progress is not None:
                progress(idx.stop, n_gal)

    g = settings.g_true
    gal_index = np.arange(n_gal)

    def c_of(key: str, comp: int, sel: np.ndarray) -> float:
        s = sums[key][sel, comp]
        return float(s[..., 0].sum() / s[..., 1].sum())

    def m_of(key: str, comp: int, sel: np.ndarray) -> float:
        own = sel & (gal_index % 2 == comp)
        s = sums[key][own, comp]
        gp = s[:, 0, 0].sum() / s[:, 0, 1].sum()
        gm = s[:, 1, 0].sum() / s[:, 1, 1].sum()
        return float((gp - gm) / (2.0 * g) - 1.0)

    nb = min(n_gal, 100)

    def jk(fn):
        return _jackknife(fn, n_gal, nb)

    a1 = jk(lambda sel: (c_of("g1+", 0, sel) - c_of("g1-", 0, sel)) / (2 * dg_psf))
    a2 = jk(lambda sel: (c_of("g2+", 1, sel) - c_of("g2-", 1, sel)) / (2 * dg_psf))
    a12 = jk(lambda sel: (c_of("g1+", 1, sel) - c_of("g1-", 1, sel)) / (2 * dg_psf))
    a21 = jk(lambda sel: (c_of("g2+", 0, sel) - c_of("g2-", 0, sel)) / (2 * dg_psf))
    b1 = jk(lambda sel: (m_of("T+", 0, sel) - m_of("T-", 0, sel)) / (2 * size_error))
    b2 = jk(lambda sel: (m_of("T+", 1, sel) - m_of("T-", 1, sel)) / (2 * size_error))
    b = jk(
        lambda sel: (
            (m_of("T+", 0, sel) + m_of("T+", 1, sel) - m_of("T-", 0, sel) - m_of("T-", 1, sel))
            / (4 * size_error)
        )
    )
    dc1 = jk(lambda sel: (c_of("T+", 0, sel) - c_of("T-", 0, sel)) / (2 * size_error))
    dc2 = jk(lambda sel: (c_of("T+", 1, sel) - c_of("T-", 1, sel)) / (2 * size_error))
    everyone = np.ones(n_gal, dtype=bool)
    m_true = 0.5 * (m_of("true", 0, everyone) + m_of("true", 1, everyone))
    alpha_max = max(abs(a1[0]), abs(a2[0]))
    return PsfErrorResult(
        psf_model=settings.psf_model,
        dg_psf=float(dg_psf),
        size_error=float(size_error),
        alpha1=a1[0],
        alpha1_err=a1[1],
        alpha2=a2[0],
        alpha2_err=a2[1],
        alpha12=a12[0],
        alpha12_err=a12[1],
        alpha21=a21[0],
        alpha21_err=a21[1],
        dm1_dsize=b1[0],
        dm1_dsize_err=b1[1],
        dm2_dsize=b2[0],
        dm2_dsize_err=b2[1],
        dm_dsize=b[0],
        dm_dsize_err=b[1],
        dc1_dsize=dc1[0],
        dc1_dsize_err=dc1[1],
        dc2_dsize=dc2[0],
        dc2_dsize_err=dc2[1],
        m_true_model=float(m_true),
        m_requirement=float(m_requirement),
        c_requirement=float(c_requirement),
        dg_psf_max=float(c_requirement / alpha_max) if alpha_max > 0 else math.inf,
        size_error_max=float(m_requirement / abs(b[0])) if b[0] != 0 else math.inf,
        n_galaxies=n_gal,
        n_stamps=4 * n_gal,
        seconds=time.perf_counter() - t0,
        config={**asdict(replace(settings)), "dg_psf": dg_psf, "size_error": size_error},
    )
