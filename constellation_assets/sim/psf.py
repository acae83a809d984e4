"""Analytic PSF images (Moffat, Gaussian) on a pixel grid.

Centring convention (shared with the renderer and the shear estimator): the PSF centre falls on the
centre of pixel ``(H // 2, W // 2)`` (0-based row, column), for odd and even sizes alike. Pixel ``(i, j)``
covers ``x in [(j - W//2 - 1/2) s, (j - W//2 + 1/2) s]`` and likewise for ``y`` with the row ``i``.

``pixel_integrated=True`` (default) gives the integral of the profile over each pixel (what a detector
records, what GalSim's ``drawImage(method="auto")`` gives); ``False`` gives point samples of the profile
times the pixel area (GalSim ``method="no_pixel"``). Gaussians are integrated exactly (erf), Moffats by
Gauss-Legendre quadrature inside each pixel. With ``normalize=True`` the image sums to 1; with False it
holds the fraction of a unit-flux profile landing in each pixel (light outside the image is lost).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import erf

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class PSFSpec:
    """One band's analytic PSF: ``model`` "moffat" (needs ``moffat_beta`` > 1) or "gaussian"."""

    model: str
    fwhm_arcsec: float
    moffat_beta: float = 3.5

    def __post_init__(self):
        if self.model not in ("moffat", "gaussian"):
            raise ValueError(f"PSF model must be 'moffat' or 'gaussian', got {self.model!r}")
        if not np.isfinite(self.fwhm_arcsec) or self.fwhm_arcsec <= 0:
            raise ValueError(f"PSF FWHM must be a positive number of arcsec, got {self.fwhm_arcsec!r}")
        if self.model == "moffat" and not (np.isfinite(self.moffat_beta) and self.moffat_beta > 1.0):
            raise ValueError(f"Moffat beta must be > 1 (finite flux), got {self.moffat_beta!r}")

    def image(self, size_pix, pixel_scale_arcsec: float, **kwargs) -> np.ndarray:
        if self.model == "moffat":
            return moffat_psf_image(
                self.fwhm_arcsec, self.moffat_beta, size_pix, pixel_scale_arcsec, **kwargs
            )
        return gaussian_psf_image(self.fwhm_arcsec, size_pix, pixel_scale_arcsec, **kwargs)


def _shape(size_pix) -> tuple[int, int]:
    if np.isscalar(size_pix):
        h = w = int(size_pix)
    else:
        h, w = (int(v) for v in size_pix)
    if h < 1 or w < 1:
        raise ValueError(f"PSF image size must be positive, got {size_pix!r}")
    return h, w


def _pixel_edges(n: int, pixel_scale: float, offset_pix: float) -> np.ndarray:
    """Pixel edge coordinates (arcsec) relative to the profile centre, n + 1 values."""
    return (np.arange(n + 1) - n // 2 - 0.5 - offset_pix) * pixel_scale


def moffat_alpha_arcsec(fwhm_arcsec: float, beta: float) -> float:
    """Moffat scale radius alpha such that I ~ (1 + (r/alpha)^2)^-beta has the given FWHM."""
    return fwhm_arcsec / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def gaussian_psf_image(
    fwhm_arcsec: float,
    size_pix,
    pixel_scale_arcsec: float,
    *,
    pixel_integrated: bool = True,
    normalize: bool = True,
    center_offset_pix: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Circular Gaussian PSF image (H, W) float64, centred on pixel (H//2, W//2) plus ``center_offset_pix`` (dx, dy)."""
    h, w = _shape(size_pix)
    sigma = fwhm_arcsec * _FWHM_TO_SIGMA
    if pixel_integrated:
        ex = _pixel_edges(w, pixel_scale_arcsec, center_offset_pix[0])
        ey = _pixel_edges(h, pixel_scale_arcsec, center_offset_pix[1])
        px = np.diff(0.5 * erf(ex / (np.sqrt(2.0) * sigma)))
        py = np.diff(0.5 * erf(ey / (np.sqrt(2.0) * sigma)))
        img = np.outer(py, px)
    else:
        x = (np.arange(w) - w // 2 - center_offset_pix[0]) * pixel_scale_arcsec
        y = (np.arange(h) - h // 2 - center_offset_pix[1]) * pixel_scale_arcsec
        r2 = y[:, None] ** 2 + x[None, :] ** 2
        img = np.exp(-0.5 * r2 / sigma**2) / (2 * np.pi * sigma**2) * pixel_scale_arcsec**2
    return img / img.sum() if normalize else img


def moffat_psf_image(
    fwhm_arcsec: float,
    beta: float,
    size_pix,
    pixel_scale_arcsec: float,
    *,
    pixel_integrated: bool = True,
    normalize: bool = True,
    center_offset_pix: tuple[float, float] = (0.0, 0.0),
    n_quad: int = 8,
) -> np.ndarray:
    """Untruncated circular Moffat PSF image (H, W) float64, centred on pixel (H//2, W//2).

    The profile is normalised to unit total flux over the infinite plane (GalSim ``Moffat(beta, fwhm)``),
    ``beta`` > 1. ``n_quad`` Gauss-Legendre nodes per axis integrate each pixel.
    """
    if beta <= 1:
        raise ValueError(f"Moffat beta must be > 1, got {beta}")
    h, w = _shape(size_pix)
    alpha = moffat_alpha_arcsec(fwhm_arcsec, beta)
    norm = (beta - 1.0) / (np.pi * alpha**2)
    xc = (np.arange(w) - w // 2 - center_offset_pix[0]) * pixel_scale_arcsec
    yc = (np.arange(h) - h // 2 - center_offset_pix[1]) * pixel_scale_arcsec
    if pixel_integrated:
        nodes, weights = np.polynomial.legendre.leggauss(n_quad)
        nodes = 0.5 * pixel_scale_arcsec * nodes
        weights = 0.5 * weights  # 1-D weights summing to 1: the result is the pixel mean
        img = np.zeros((h, w))
        for ny, wy in zip(nodes, weights, strict=True):
            y2 = (yc + ny)[:, None] ** 2
            for nx, wx in zip(nodes, weights, strict=True):
                img += wy * wx * (1.0 + (y2 + (xc + nx)[None, :] ** 2) / alpha**2) ** (-beta)
    else:
        img = (1.0 + (yc[:, None] ** 2 + xc[None, :] ** 2) / alpha**2) ** (-beta)
    img = img * norm * pixel_scale_arcsec**2
    return img / img.sum() if normalize else img


def psf_image(spec: PSFSpec, size_pix, pixel_scale_arcsec: float, **kwargs) -> np.ndarray:
    """Image of ``spec`` (see :class:`PSFSpec`), keyword options as in the model-specific functions."""
    return spec.image(size_pix, pixel_scale_arcsec, **kwargs)
