"""Source-plane light profiles (Sersic, bulge + disk) and deterministic source choices.

Sersic convention (GalSim's ``Sersic(n, half_light_radius=hlr, flux=F).shear(q=q, beta=phi)``):

* ``hlr_arcsec`` is the *circularised* half-light radius sqrt(a b); the major-axis half-light radius is
  ``hlr_arcsec / sqrt(q)``. The shear conserves area, so the total flux stays ``flux``.
* ``I(R) = I_e exp(-b_n [(R / hlr)^(1/n) - 1])`` with the elliptical radius
  ``R^2 = q x'^2 + y'^2 / q`` (x' along the major axis, at angle ``phi_rad`` counter-clockwise from +x),
  ``b_n`` solving ``gamma(2n, b_n) = Gamma(2n) / 2`` exactly (``scipy.special.gammaincinv``), and
  ``I_e = F b_n^(2n) / (2 pi n hlr^2 e^(b_n) Gamma(2n))`` (surface brightness per arcsec^2 at R = hlr).
* No truncation (like GalSim's default ``trunc=0``).

Flux in ADU from a magnitude: ``flux_adu = 10 ** (-0.4 (mag - zero_point))``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy.special import gamma as gamma_fn
from scipy.special import gammaincinv

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

SERSIC_N_MIN = 0.3  # GalSim's supported range; COSMOS fits are clipped to it the same way
SERSIC_N_MAX = 6.2


def choose_cosmos_index(task_id: str, n_sources: int, salt: str = "") -> int:
    """Deterministic COSMOS template choice (the Gen5 seed's formula, public interface).

    ``int(sha256((task_id + salt).encode()).hexdigest()[:16], 16) % n_sources``.
    """
    if n_sources <= 0:
        raise ValueError(f"n_sources must be positive to choose a COSMOS template, got {n_sources}")
    h = hashlib.sha256((task_id + salt).encode("utf-8")).hexdigest()
    return int(h[:16], 16) % n_sources


def sersic_b(n):
    """Exact b_n (gamma(2n, b_n) = Gamma(2n)/2), scalar or array."""
    n = np.asarray(n, dtype=float)
    if np.any(n <= 0):
        raise ValueError(f"Sersic index n must be > 0, got {n}")
    return gammaincinv(2.0 * n, 0.5)


def sersic_ie(flux, hlr_arcsec, n):
    """Surface brightness (flux per arcsec^2) at the half-light radius of a Sersic of total ``flux``."""
    n = np.asarray(n, dtype=float)
    b = sersic_b(n)
    hlr = np.asarray(hlr_arcsec, dtype=float)
    if np.any(hlr <= 0):
        raise ValueError(f"half-light radius must be > 0 arcsec, got {hlr_arcsec}")
    return (
        np.asarray(flux, dtype=float) * b ** (2 * n) / (2 * np.pi * n * hlr**2 * np.exp(b) * gamma_fn(2 * n))
    )


def flux_from_mag(mag, zero_point):
    """Total flux in ADU (per the zero point's exposure) of a source of AB/Vega ``mag``."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - np.asarray(zero_point, dtype=float)))


def mag_from_flux(flux, zero_point):
    flux = np.asarray(flux, dtype=float)
    return np.asarray(zero_point, dtype=float) - 2.5 * np.log10(flux)


def sersic_sb(x_arcsec, y_arcsec, *, flux, hlr_arcsec, n, q=1.0, phi_rad=0.0, center_arcsec=(0.0, 0.0)):
    """Sersic surface brightness (flux per arcsec^2) at (x, y) arcsec, numpy; see the module docstring."""
    x = np.asarray(x_arcsec, dtype=float) - center_arcsec[0]
    y = np.asarray(y_arcsec, dtype=float) - center_arcsec[1]
    c, s = np.cos(phi_rad), np.sin(phi_rad)
    xr = c * x + s * y
    yr = -s * x + c * y
    r = np.sqrt(q * xr**2 + yr**2 / q) / hlr_arcsec
    b = sersic_b(n)
    return sersic_ie(flux, hlr_arcsec, n) * np.exp(-b * (r ** (1.0 / n) - 1.0))


@dataclass
class SourceComponents:
    """A batch of multi-component sources (Sersic, or bulge + disk), all arrays of shape (B, C).

    ``flux_frac`` sums to 1 over the components of a source (the flux per band is applied by the
    renderer); ``center_arcsec`` (B, 2) is the source centre in the source plane, shared by components.
    Unused component slots have ``flux_frac == 0``.
    """

    flux_frac: np.ndarray
    hlr_arcsec: np.ndarray
    n: np.ndarray
    q: np.ndarray
    phi_rad: np.ndarray
    center_arcsec: np.ndarray

    def __post_init__(self):
        arrays = {
            k: np.atleast_2d(np.asarray(getattr(self, k), dtype=float))
            for k in ("flux_frac", "hlr_arcsec", "n", "q", "phi_rad")
        }
        shape = arrays["flux_frac"].shape
        for k, v in arrays.items():
            if v.shape != shape:
                raise ValueError(f"source component array {k!r} has shape {v.shape}, expected {shape}")
            setattr(self, k, v)
        self.center_arcsec = np.asarray(self.center_arcsec, dtype=float).reshape(shape[0], 2)
        used = self.flux_frac > 0
        if np.any(self.hlr_arcsec[used] <= 0):
            raise ValueError(f"source half-light radii must be > 0 arcsec, got {self.hlr_arcsec[used]}")
        if np.any((self.q[used] <= 0) | (self.q[used] > 1)):
            raise ValueError(f"source axis ratios must be in (0, 1], got {self.q[used]}")
        if np.any((self.n[used] < SERSIC_N_MIN) | (self.n[used] > SERSIC_N_MAX)):
            raise ValueError(
                f"Sersic indices must be in [{SERSIC_N_MIN}, {SERSIC_N_MAX}], got {self.n[used]}"
            )

    @property
    def batch_size(self) -> int:
        return self.flux_frac.shape[0]

    @classmethod
    def sersic(cls, hlr_arcsec, n, q, phi_rad, center_arcsec) -> SourceComponents:
        """Single-Sersic sources; each argument a scalar or (B,) array, ``center_arcsec`` (B, 2)."""
        hlr, n_, q_, phi = np.broadcast_arrays(
            *(np.atleast_1d(np.asarray(v, dtype=float)) for v in (hlr_arcsec, n, q, phi_rad))
        )
        center = np.asarray(center_arcsec, dtype=float).reshape(-1, 2)
        b = max(len(hlr), len(center))
        col = lambda v: np.broadcast_to(v, (b,)).reshape(b, 1).copy()  # noqa: E731
        return cls(
            np.ones((b, 1)),
            col(hlr),
            col(n_),
            col(q_),
            col(phi),
            np.broadcast_to(center, (b, 2)).copy(),
        )

    def select(self, index) -> SourceComponents:
        return SourceComponents(
            self.flux_frac[index],
            self.hlr_arcsec[index],
            self.n[index],
            self.q[index],
            self.phi_rad[index],
            self.center_arcsec[index],
        )


def sersic_sb_torch(
    x_arcsec,
    y_arcsec,
    comps: SourceComponents,
    dtype=None,
    device=None,
    *,
    core_compact_arcsec: float | None = None,
    core_min_n: float = 1.5,
):
    """Unit-total-flux surface brightness (per arcsec^2) of a batch of multi-component sources.

    ``x_arcsec``, ``y_arcsec``: (B, ...) source-plane positions. Returns a tensor of the same shape.
    ``b_n`` and ``I_e`` are computed once per component in float64 with scipy.

    With ``core_compact_arcsec`` it returns ``(sb, rho)``: ``rho`` is the distance (arcsec, minor-axis
    metric sqrt(q^2 x'^2 + y'^2)) to the nearest centre of a component that is cuspy (n > ``core_min_n``) or
    compact (minor-axis hlr below ``core_compact_arcsec``), i.e. where point sampling is inaccurate; +inf
    where there is no such component.
    """
    dtype = dtype or x_arcsec.dtype
    device = device or x_arcsec.device
    bsz, ncomp = comps.flux_frac.shape
    extra = x_arcsec.ndim - 1
    n_safe = np.where(comps.flux_frac > 0, comps.n, 1.0)
    hlr_safe = np.where(comps.flux_frac > 0, comps.hlr_arcsec, 1.0)
    b_n = sersic_b(n_safe)
    ie = sersic_ie(comps.flux_frac, hlr_safe, n_safe)

    def t(a):
        return torch.as_tensor(np.array(a), dtype=dtype, device=device).reshape(bsz, *([1] * extra))

    cx = t(comps.center_arcsec[:, 0])
    cy = t(comps.center_arcsec[:, 1])
    x = x_arcsec - cx
    y = y_arcsec - cy
    out = torch.zeros_like(x)
    rho = (
        torch.full(x.shape, float("inf"), dtype=dtype, device=device)
        if core_compact_arcsec is not None
        else None
    )
    for k in range(ncomp):
        used = comps.flux_frac[:, k] > 0
        if not np.any(used):
            continue
        phi = comps.phi_rad[:, k]
        c, s = t(np.cos(phi)), t(np.sin(phi))
        q_np = np.where(used, comps.q[:, k], 1.0)
        qk = t(q_np)
        xr = c * x + s * y
        yr = -s * x + c * y
        r = torch.sqrt(qk * xr**2 + yr**2 / qk) / t(hlr_safe[:, k])
        # exp(log(ie) - b (r^(1/n) - 1)) keeps the bright cores of large-n profiles in float32 range
        log_ie = np.log(np.maximum(ie[:, k], 1e-300))
        expo = t(log_ie) - t(b_n[:, k]) * (torch.pow(r, t(1.0 / n_safe[:, k])) - 1.0)
        out = out + torch.where(t(used.astype(float)) > 0, torch.exp(expo), torch.zeros_like(expo))
        if rho is not None:
            compact = hlr_safe[:, k] * np.sqrt(q_np) < core_compact_arcsec
            flag = used & ((n_safe[:, k] > core_min_n) | compact)
            if np.any(flag):
                # minor-axis distance sqrt(q^2 x'^2 + y'^2) = sqrt(q) * hlr * r
                dist = r * t(np.sqrt(q_np) * hlr_safe[:, k])
                rho = torch.where(t(flag.astype(float)) > 0, torch.minimum(rho, dist), rho)
    return (out, rho) if rho is not None else out
