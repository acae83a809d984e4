"""Lens deflections: singular isothermal ellipsoid (SIE) and external shear.

Conventions (identical to lenstronomy's ``SIE`` and ``SHEAR`` profiles, and tested against them):

* Angles are in arcsec on the sky plane; ``x`` increases with the image column, ``y`` with the row.
* ``theta_e_arcsec`` is the *product-averaged* (circularised) Einstein radius, i.e. the convergence is
  ``kappa = theta_E / (2 sqrt(q x'^2 + y'^2 / q))`` in the frame aligned with the major axis.
  This is lenstronomy's convention (gravlens-style codes use the major-axis radius instead,
  ``theta_E,major = theta_E / sqrt((1 + q^2) / (2 q))``).
* ``q`` is the minor/major axis ratio of the iso-convergence contours, ``phi_rad`` the position angle of
  the major axis measured counter-clockwise from the +x axis.
* ``(e1, e2)`` follow ``lenstronomy.Util.param_util``: ``phi = arctan2(e2, e1) / 2``,
  ``q = (1 - |e|) / (1 + |e|)``.
* External shear ``(gamma1, gamma2)`` about ``center_arcsec`` deflects by
  ``(g1 dx + g2 dy, g2 dx - g1 dy)``.

The lens equation is ``beta = theta - alpha(theta)``; callers subtract the deflections returned here.

Both numpy (any broadcastable shapes) and batched torch versions are provided. The torch version takes
grids of shape ``(B, H, W)`` (or ``(H, W)``, broadcast) and parameters that are scalars or tensors of
shape ``(B,)``, so one call deflects a whole batch of stamps with different lenses.
"""

from __future__ import annotations

import numpy as np

try:  # torch is a hard dependency of the package, but keep numpy use importable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None

# Below this value of sqrt(1 - q^2) the closed form loses precision; use the series in e instead.
_E_SERIES = 1e-3
_Q_MIN = 1e-4


def ellipticity_to_phi_q(e1, e2):
    """(e1, e2) -> (phi_rad, q) exactly as ``lenstronomy.Util.param_util.ellipticity2phi_q``."""
    if torch is not None and isinstance(e1, torch.Tensor):
        e2 = torch.as_tensor(e2, dtype=e1.dtype, device=e1.device)
        phi = torch.atan2(e2, e1) / 2
        c = torch.clamp(torch.sqrt(e1**2 + e2**2), max=0.9999)
        return phi, (1 - c) / (1 + c)
    e1 = np.asarray(e1, dtype=float)
    e2 = np.asarray(e2, dtype=float)
    phi = np.arctan2(e2, e1) / 2
    c = np.minimum(np.sqrt(e1**2 + e2**2), 0.9999)
    return phi, (1 - c) / (1 + c)


def phi_q_to_ellipticity(phi_rad, q):
    """(phi_rad, q) -> (e1, e2), inverse of :func:`ellipticity_to_phi_q` (lenstronomy's ``phi_q2_ellipticity``)."""
    if torch is not None and isinstance(q, torch.Tensor):
        phi_rad = torch.as_tensor(phi_rad, dtype=q.dtype, device=q.device)
        c = (1 - q) / (1 + q)
        return c * torch.cos(2 * phi_rad), c * torch.sin(2 * phi_rad)
    c = (1 - np.asarray(q, dtype=float)) / (1 + np.asarray(q, dtype=float))
    return c * np.cos(2 * np.asarray(phi_rad, dtype=float)), c * np.sin(2 * np.asarray(phi_rad, dtype=float))


def _check_q(q):
    qa = np.asarray(q, dtype=float)
    if np.any(~np.isfinite(qa)) or np.any(qa <= 0) or np.any(qa > 1):
        raise ValueError(f"SIE axis ratio q must be in (0, 1] (minor/major), got {q!r}")


def sie_deflection(
    x_arcsec,
    y_arcsec,
    theta_e_arcsec=1.2,
    q=0.6,
    phi_rad=0.3,
    center_arcsec=(0.0, 0.0),
    *,
    e1=None,
    e2=None,
):
    """Deflection (alpha_x, alpha_y) in arcsec of a singular isothermal ellipsoid at (x, y) arcsec.

    lenstronomy convention: ``theta_e_arcsec`` is the product-averaged (circularised) Einstein radius,
    ``q`` the minor/major axis ratio in (0, 1], ``phi_rad`` the major-axis angle from +x (counter-clockwise).
    Instead of (q, phi_rad) the ellipticity (e1, e2) may be given (lenstronomy ``ellipticity2phi_q``);
    then q and phi_rad are ignored. q = 1 is the singular isothermal sphere,
    alpha = theta_E (x, y) / r. Torch tensors are dispatched to :func:`sie_deflection_torch`.
    """
    if torch is not None and isinstance(x_arcsec, torch.Tensor):
        return sie_deflection_torch(
            x_arcsec, y_arcsec, theta_e_arcsec, q, phi_rad, center_arcsec, e1=e1, e2=e2
        )
    if (e1 is None) != (e2 is None):
        raise ValueError("give both e1 and e2, or neither (then q and phi_rad are used)")
    if e1 is not None:
        phi_rad, q = ellipticity_to_phi_q(e1, e2)
    _check_q(q)
    x = np.asarray(x_arcsec, dtype=float) - center_arcsec[0]
    y = np.asarray(y_arcsec, dtype=float) - center_arcsec[1]
    q = np.asarray(q, dtype=float)
    theta_e = np.asarray(theta_e_arcsec, dtype=float)
    cos_p, sin_p = np.cos(phi_rad), np.sin(phi_rad)
    # rotate into the frame of the major axis
    xr = cos_p * x + sin_p * y
    yr = -sin_p * x + cos_p * y
    ax_r, ay_r = _sie_major_axis_np(xr, yr, theta_e * np.sqrt(q), q)
    return cos_p * ax_r - sin_p * ay_r, sin_p * ax_r + cos_p * ay_r


def _sie_major_axis_np(x, y, b, q):
    """Kormann et al. / Keeton & Kochanek deflection with the major axis along x, b = theta_E sqrt(q)."""
    psi = np.sqrt(q**2 * x**2 + y**2)
    psi = np.maximum(psi, 1e-300)
    e = np.sqrt(np.clip(1.0 - q**2, 0.0, None))
    u = x / psi
    v = y / psi
    small = e < _E_SERIES
    e_safe = np.where(small, 1.0, e)
    ax_exact = np.arctan(e_safe * u) / e_safe
    ay_exact = np.arctanh(np.clip(e_safe * v, -1 + 1e-15, 1 - 1e-15)) / e_safe
    ax_series = u - e**2 * u**3 / 3
    ay_series = v + e**2 * v**3 / 3
    return b * np.where(small, ax_series, ax_exact), b * np.where(small, ay_series, ay_exact)


def shear_deflection(x_arcsec, y_arcsec, gamma1=0.0, gamma2=0.0, center_arcsec=(0.0, 0.0)):
    """External-shear deflection (g1 dx + g2 dy, g2 dx - g1 dy) about ``center_arcsec`` (lenstronomy SHEAR)."""
    if torch is not None and isinstance(x_arcsec, torch.Tensor):
        return shear_deflection_torch(x_arcsec, y_arcsec, gamma1, gamma2, center_arcsec)
    x = np.asarray(x_arcsec, dtype=float) - center_arcsec[0]
    y = np.asarray(y_arcsec, dtype=float) - center_arcsec[1]
    return gamma1 * x + gamma2 * y, gamma2 * x - gamma1 * y


def _param(value, ref: torch.Tensor) -> torch.Tensor:
    """Scalar or (B,) parameter -> tensor broadcastable against ref of shape (B, H, W) or (H, W)."""
    t = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1:
        raise ValueError(f"lens parameters must be scalars or 1-D (B,) tensors, got shape {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (max(ref.ndim, 3) - 1)))


def sie_deflection_torch(
    x_arcsec,
    y_arcsec,
    theta_e_arcsec=1.2,
    q=0.6,
    phi_rad=0.3,
    center_arcsec=(0.0, 0.0),
    *,
    e1=None,
    e2=None,
):
    """Batched torch SIE deflection, same convention as :func:`sie_deflection`.

    ``x_arcsec``/``y_arcsec``: tensors of shape (B, H, W) or (H, W); ``theta_e_arcsec``, ``q``, ``phi_rad``,
    ``e1``, ``e2``: scalars or (B,) tensors; ``center_arcsec``: a pair of scalars, or a (B, 2) tensor.
    Returns (alpha_x, alpha_y) broadcast to (B, H, W).
    """
    ref = x_arcsec
    if (e1 is None) != (e2 is None):
        raise ValueError("give both e1 and e2, or neither (then q and phi_rad are used)")
    if e1 is not None:
        phi_rad, q = ellipticity_to_phi_q(
            torch.as_tensor(e1, dtype=ref.dtype, device=ref.device),
            torch.as_tensor(e2, dtype=ref.dtype, device=ref.device),
        )
    qt = _param(q, ref)
    if bool(torch.any((qt <= 0) | (qt > 1) | ~torch.isfinite(qt))):
        raise ValueError(f"SIE axis ratio q must be in (0, 1] (minor/major), got {q!r}")
    cx, cy = _center(center_arcsec, ref)
    x = x_arcsec - cx
    y = y_arcsec - cy
    phi = _param(phi_rad, ref)
    theta_e = _param(theta_e_arcsec, ref)
    cos_p, sin_p = torch.cos(phi), torch.sin(phi)
    xr = cos_p * x + sin_p * y
    yr = -sin_p * x + cos_p * y
    psi = torch.sqrt(qt**2 * xr**2 + yr**2).clamp_min(1e-30)
    e = torch.sqrt(torch.clamp(1.0 - qt**2, min=0.0))
    u = xr / psi
    v = yr / psi
    small = e < _E_SERIES
    e_safe = torch.where(small, torch.ones_like(e), e)
    ax_r = torch.where(small, u - e**2 * u**3 / 3, torch.atan(e_safe * u) / e_safe)
    ay_r = torch.where(
        small,
        v + e**2 * v**3 / 3,
        torch.atanh(torch.clamp(e_safe * v, -1 + 1e-7, 1 - 1e-7)) / e_safe,
    )
    b = theta_e * torch.sqrt(qt)
    ax_r = b * ax_r
    ay_r = b * ay_r
    return cos_p * ax_r - sin_p * ay_r, sin_p * ax_r + cos_p * ay_r


def _center(center_arcsec, ref):
    c = torch.as_tensor(center_arcsec, dtype=ref.dtype, device=ref.device)
    if c.ndim == 1:
        return c[0], c[1]
    if c.ndim == 2 and c.shape[1] == 2:
        return _param(c[:, 0], ref), _param(c[:, 1], ref)
    raise ValueError(f"center_arcsec must be (x, y) or a (B, 2) tensor, got shape {tuple(c.shape)}")


def shear_deflection_torch(x_arcsec, y_arcsec, gamma1=0.0, gamma2=0.0, center_arcsec=(0.0, 0.0)):
    """Batched torch external-shear deflection; gamma1/gamma2 scalars or (B,) tensors."""
    cx, cy = _center(center_arcsec, x_arcsec)
    x = x_arcsec - cx
    y = y_arcsec - cy
    g1 = _param(gamma1, x_arcsec)
    g2 = _param(gamma2, x_arcsec)
    return g1 * x + g2 * y, g2 * x - g1 * y


def sis_magnification(beta_arcsec: float, theta_e_arcsec: float) -> float:
    """Total point-source magnification of a singular isothermal sphere, source at radius beta.

    |mu_+| + |mu_-| = 2 theta_E / beta inside the Einstein radius (beta < theta_E), 1 + theta_E/beta outside.
    """
    if beta_arcsec <= 0:
        raise ValueError(f"source offset beta_arcsec must be > 0, got {beta_arcsec}")
    if beta_arcsec < theta_e_arcsec:
        return 2.0 * theta_e_arcsec / beta_arcsec
    return 1.0 + theta_e_arcsec / beta_arcsec
