"""From a sub-tile manifest to postage stamps, and from per-exposure measurements to one row per source.

Pipeline (all vectorised over sources; no per-pixel Python):

1. For every quadrant of the manifest (one exposure x CCD quadrant), read only the HDUs it needs:
   SCI, RMS, FLG from the DET file, the BKG map and the PSF grid (WGT only when a quadrant has no RMS).
   Decoded quadrants (with their WCS and native PSF grid) are kept in a process-wide LRU cache
   (:data:`QUADRANT_CACHE`, ``CONSTELLATION_QUADRANT_CACHE_MB``, default 256) because neighbouring
   sub-tiles measured by one worker share quadrants; on s3:// the next quadrant is fetched while the
   current one is measured. The tile-level measurement (:func:`iter_quadrant_images`, used by
   :func:`constellation_assets.shear.infer.measure_tile`) instead reads each quadrant of a tile once and
   cuts the stamps of every sub-tile from it, without the cache.
2. World -> pixel for all sources at once (astropy WCS, TPV included); keep the sources whose centre lies
   on the quadrant. The local WCS Jacobian at each source (central differences of the WCS) is kept too.
3. Cut ``stamp_size`` x ``stamp_size`` stamps with one block gather per array (strided window view; the
   few stamps crossing the quadrant edge use a clipped per-pixel index): the source lies at
   pixel ``(H//2 + dy, W//2 + dx)`` with ``|dx|, |dy| <= 0.5`` and ``(dx, dy)`` is returned as
   ``offsets_pix`` (the estimator recentres on it in Fourier space: no resampling of the data).
4. Subtract the background, convert ADU to microJansky per pixel with MAGZEROP/EXPTIME (so exposures share
   one flux unit), and mask pixels with any FLG bit of ``euclid.FLG_MASK_BITS`` set (every documented ESA
   VIS bit except the informational QUADEDGE, STARSIGNAL and OBJECTS), non-finite pixels and pixels off
   the quadrant. Masked pixels get weight 0 and are filled with the image point-symmetric about the
   source centre (an elliptical profile is exactly symmetric under a 180-degree rotation, so this
   preserves both the galaxy light and the noise level), evaluated at the partner's fractional position
   with Keys cubic convolution (a bilinear value smooths the profile: with 5 % cosmic-ray-like masks
   m moves by ~-1e-3 bilinear vs ~-2e-4 cubic, benchmarks/bench_shear_masks.py; setting masked pixels
   to 0 is worse, ~-3e-3); if that partner is masked too the pixel is set to the background (0). An exposure is not used for a source when its central region (radius
   ``center_radius_pix``) holds a masked pixel, when a pixel within ``aperture_radius_pix`` could not be
   filled (it and its partner are masked), or when more than ``max_masked_fraction`` of the stamp is masked
   (e.g. mostly off the quadrant). Sources near a quadrant edge are therefore kept.
5. Noise: the per-stamp noise sigma is the median RMS (or ``1/sqrt(WGT)``) over the unmasked pixels.
6. PSF: the observation's PSF file (``EUC_VIS_GRD-PSF``) holds, per quadrant, a 9 x 9 grid of 21 x 21
   stamps at the native pixel scale, nodes at the cell centres of the quadrant (layout:
   :func:`constellation_assets.io.q1.psf_grid_layout`; optional keywords such as OVERSAMP are honoured).
   Each grid stamp is placed, centred on ``(H//2, W//2)``, in a stamp-sized array (an oversampled effective
   PSF, ``PSFPIXEL = INCLUDED``, is *sampled* every OVERSAMP fine pixels; otherwise OVERSAMP x OVERSAMP
   blocks are summed), then the PSF at each source is the bilinear interpolation between the four nearest
   grid nodes (clamped at the grid border). Both steps are linear, so they commute. The stamps are NOT
   renormalised: the Q1 models are truncated at the 2.1" box (they sum to ~0.93-0.97), and each source's
   PSF sum is returned as ``psf_flux_in_box`` so the estimator can account for the missing wings.

All FITS access goes through :mod:`constellation_assets.io.q1` (byte-range reads of the named HDUs); this
module cuts and processes.

Combining exposures (the statistical choice)
--------------------------------------------
Each (source, exposure) stamp is measured separately in its own detector frame with its own PSF, but
only its FPFS *moments* are kept (:data:`constellation_assets.shear.fpfs.MOMENT_NAMES`, with their
analytic noise covariance). The moments are linear in the image, so after mapping them to the sky
frame (:func:`moments_to_sky_frame`) a source's exposures are averaged with inverse-variance weights
``a_i = 1 / Var(M00_i)`` (the flux-moment noise variance, which depends only on the noise level and the
PSF, never on the galaxy, so it carries no shear response):

    x = sum_i a_i x_i / sum_i a_i,        Cov(x) = sum_i a_i^2 Cov_i / (sum_i a_i)^2,

and the ratios ``e``, the smooth selection on the FPFS S/N, the responses and their noise correction
are formed once per source from ``x`` and ``Cov(x)`` (:func:`combine_exposure_moments`), at the
combined S/N. (Forming them per exposure and averaging ``e`` and ``R`` would apply every nonlinear step,
and its noise bias, at the lower single-exposure S/N.) We do not co-add stamps: exposures are dithered
and (between observations) rotated, so a co-add needs resampling (correlated noise, aliasing) and, with
masked pixels, its effective PSF is no longer the weighted sum of the exposure PSFs. A stamp enters
unless the stamp stage rejected it or it has non-finite pixels or an unusable PSF; a single exposure's
noisy S/N or denominator is never a reason (that would be a selection without a response).
:func:`combine_exposures` (per-exposure ``e``/``R`` averaged) is kept for estimators that give no
moments.

Frames: each exposure's moments (or ``e``/``R``) are measured in its pixel frame and mapped to the sky
frame used throughout the project, GalSim's local world frame ``(u, v) = (west, north)``
(``u = -dRA cos(dec)``), which is the detector frame at position angle 0. So the catalog's ``E1 > 0``
means elongated east-west (along RA) and ``E2 > 0`` elongated along the north-west / south-east
diagonal (position angle counted from west through north). A tool whose shears are in the (x = east,
y = north) frame (position angle from east through north) needs the same ``E1`` and the opposite
``E2``: ``g1 = E1 / <R11>``, ``g2 = -E2 / <R22>`` (TreeCorr: check its convention for ``ra``/``dec``
catalogs and use ``flip_g2`` accordingly, e.g. with the tangential shear around a known lens).
With the local Jacobian ``J = d(u, v)/d(x, y)``: a
parity flip (``det J < 0``) negates ``e2``; the polar decomposition ``J' = Rot(theta) P`` gives the
rotation (``e -> e exp(2 i theta)``, responses rotate with ``cos^2 2theta``/``sin^2 2theta``) and the
WCS distortion shear ``gamma`` of ``P`` (the pixel image is the rotated sky image sheared by
``-gamma``), removed to first order with ``e += R gamma`` before the rotation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from constellation_assets import euclid as _euclid

log = logging.getLogger(__name__)

__all__ = [
    "CENTER_RADIUS_PIX_DEFAULT",
    "FLAG_CENTER_MASKED",
    "FLAG_NO_COVERAGE",
    "FLAG_NO_GOOD_EXPOSURE",
    "FLG_MASK_BITS",
    "PSF_BORDER_WARN_FRACTION",
    "APERTURE_RADIUS_PIX_DEFAULT",
    "MAX_MASKED_FRACTION_DEFAULT",
    "ExposureStamps",
    "PsfGrid",
    "QUADRANT_CACHE",
    "QuadrantCache",
    "QuadrantImages",
    "SourceList",
    "combine_exposures",
    "combine_exposure_moments",
    "moments_to_sky_frame",
    "sky_frame_moment_transform",
    "cut_stamps",
    "fill_masked_symmetric",
    "flux_scale_ujy_per_adu",
    "local_jacobian",
    "quadrant_stamps",
    "iter_quadrant_images",
    "read_quadrant_images",
    "read_source_table",
    "sky_frame_transform",
    "sources_from_manifest",
    "stamp_grid",
    "to_sky_frame",
    "stamp_index",
    "iter_manifest_stamps",
]

#: FLG bits that mask a pixel for shear: the ESA VIS bit map without its informational bits
#: (QUADEDGE, STARSIGNAL, OBJECTS); see :mod:`constellation_assets.euclid`.
FLG_MASK_BITS = _euclid.FLG_MASK_BITS
#: A PSF model stamp whose outermost pixel ring holds more than this fraction of its flux is cut where light
#: remains (logged per PSF HDU).
PSF_BORDER_WARN_FRACTION = 1e-3
#: PSF files already reported as truncated (a warning per file; its other quadrants are logged at DEBUG).
_PSF_CUT_WARNED: set[str] = set()
#: A masked pixel this close to the source centre rejects the exposure (1 px: with the cubic symmetric fill
#: the bias of 5 % cosmic-ray masks is the same as with 2 px, and 14 % instead of 34 % of stamps are lost).
CENTER_RADIUS_PIX_DEFAULT = 1.0
MAX_MASKED_FRACTION_DEFAULT = 0.5
APERTURE_RADIUS_PIX_DEFAULT = 8.0

#: Per-source FLAGS bits set by the stamp stage (the estimator's own flags use bits 0-7).
FLAG_NO_COVERAGE = 1 << 8  # the source lies on no quadrant of the manifest
FLAG_CENTER_MASKED = 1 << 9  # every covering exposure had a masked centre or a mostly masked stamp
FLAG_NO_GOOD_EXPOSURE = 1 << 10  # every usable exposure failed in the estimator (its flags are OR-ed in)

#: Per-exposure rejection reasons (ExposureStamps.reject).
REJECT_CENTER_MASKED = 1
REJECT_TOO_MASKED = 2
REJECT_BAD_NOISE = 4
REJECT_UNFILLED = 8  # a masked pixel within the aperture whose symmetric partner is masked too

_UJY_ZEROPOINT = _euclid.AB_ZEROPOINT_UJY  # AB magnitude of 1 microJansky


# --------------------------------------------------------------------------------------------------
# Sources and images


@dataclasses.dataclass
class SourceList:
    """Sources of a sub-tile: ids and sky positions (deg)."""

    object_id: np.ndarray  # int64
    ra_deg: np.ndarray  # float64
    dec_deg: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.object_id)


@dataclasses.dataclass
class QuadrantImages:
    """The arrays of one quadrant of one exposure (ADU), its WCS header and its PSF grid."""

    key: str  # "{obs_id}-{dither}-{exposure}-{ccd}.{quadrant}"
    exposure: str  # "{obs_id}-{dither}-{exposure}" (exposure 1: nominal, 2: short)
    sci: np.ndarray  # (ny, nx) float32 ADU
    bkg: np.ndarray | None  # (ny, nx) ADU or None (already background-subtracted)
    rms: np.ndarray | None  # (ny, nx) ADU
    wgt: np.ndarray | None  # (ny, nx) ADU^-2 (used when rms is None)
    flg: np.ndarray | None  # (ny, nx) int
    header: Any  # astropy Header of the SCI HDU (WCS, GAIN, EXPTIME, MAGZEROP)
    psf: PsfGrid
    wcs: Any = None  # astropy WCS of ``header``, built once (see :meth:`get_wcs`)

    def get_wcs(self):
        """The quadrant's astropy WCS (built on first use and kept: quadrants are shared by sub-tiles)."""
        if self.wcs is None:
            import warnings

            from astropy.wcs import WCS, FITSFixedWarning

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                self.wcs = WCS(self.header)
        return self.wcs

    @property
    def nbytes(self) -> int:
        arrays = (self.sci, self.bkg, self.rms, self.wgt, self.flg, self.psf.stamps)
        return int(sum(a.nbytes for a in arrays if a is not None)) + sum(
            a.nbytes for a in self.psf._native_cache.values() if isinstance(a, np.ndarray)
        )


def flux_scale_ujy_per_adu(header: Mapping[str, Any]) -> float:
    """microJansky per ADU of a quadrant: ``10**(-0.4 (MAGZEROP - 23.9)) / EXPTIME``.

    MAGZEROP is the AB magnitude of 1 ADU/s (it may be stored as a string). Without MAGZEROP/EXPTIME the
    data stay in ADU (scale 1) and a warning is logged.
    """
    try:
        zp = float(str(header["MAGZEROP"]).strip())
        exptime = float(header["EXPTIME"])
        if not (math.isfinite(zp) and exptime > 0):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        log.warning("quadrant header lacks a usable MAGZEROP/EXPTIME: stamps stay in ADU (scale 1)")
        return 1.0
    return 10.0 ** (-0.4 * (zp - _UJY_ZEROPOINT)) / exptime


# --------------------------------------------------------------------------------------------------
# PSF grid


@dataclasses.dataclass
class PsfGrid:
    """A quadrant's PSF model: ``stamps[i, j]`` is the PSF at quadrant pixel ``(x_nodes[j], y_nodes[i])``.

    Stamps keep the values of the file (no renormalisation): ``flux_in_box`` is each stamp's sum, i.e. the
    fraction of the PSF flux the model holds inside its box (Q1: ~0.93-0.97, the wings are cut).
    """

    stamps: np.ndarray  # (n_y, n_x, S, S) float64, as stored (bad stamps: 0)
    x_nodes: np.ndarray  # (n_x,) 0-based quadrant pixel x of each grid column
    y_nodes: np.ndarray  # (n_y,) 0-based quadrant pixel y of each grid row
    oversampling: int = 1
    pixel_included: bool = True
    _native_cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_image(
        cls,
        image: np.ndarray,
        header: Mapping[str, Any],
        quadrant_shape: tuple[int, int],
        source: str = "",
    ) -> PsfGrid:
        """Parse a PSF-file HDU (Q1: 189 x 189 = 9 x 9 stamps of 21 x 21 native pixels, no grid keywords).

        The layout comes from :func:`constellation_assets.io.q1.psf_grid_layout`. Non-finite or non-positive
        stamps are set to 0 (the estimator flags a zero PSF). ``source`` names the HDU in log messages; a
        warning is logged when a stamp's border ring holds more than :data:`PSF_BORDER_WARN_FRACTION` of its flux.
        """
        from constellation_assets.io.q1 import psf_grid_layout, psf_grid_stamps

        lay = psf_grid_layout(np.shape(image), header, quadrant_shape, source)
        stamps = psf_grid_stamps(image, lay)
        sums = stamps.sum(axis=(2, 3), keepdims=True)
        bad = ~np.isfinite(sums) | (sums <= 0)
        stamps = np.where(bad, 0.0, stamps)
        grid = cls(
            stamps=stamps,
            x_nodes=lay.x_nodes_pix,
            y_nodes=lay.y_nodes_pix,
            oversampling=lay.oversampling,
            pixel_included=lay.pixel_included,
        )
        ring = grid.border_fraction
        n_cut = int((ring > PSF_BORDER_WARN_FRACTION).sum())
        if n_cut:
            fib = grid.flux_in_box[~bad[..., 0, 0]]
            file_key = (source or "PSF grid").split("[", 1)[0]
            level = logging.DEBUG if file_key in _PSF_CUT_WARNED else logging.WARNING
            _PSF_CUT_WARNED.add(file_key)
            log.log(
                level,
                "%s: PSF model cut where light remains: in %d of %d stamps the border ring of the %d x %d box "
                "holds > %.0e of the flux (max %.2g); stamp sums %.3f-%.3f (psf_flux_in_box)",
                source or "PSF grid", n_cut, ring.size, stamps.shape[-2], stamps.shape[-1],
                PSF_BORDER_WARN_FRACTION, float(ring.max()),
                float(fib.min()) if fib.size else 0.0, float(fib.max()) if fib.size else 0.0,
            )  # fmt: skip
        if bad.any():
            log.warning(
                "%s: %d PSF stamps are non-finite or empty (set to 0)", source or "PSF grid", int(bad.sum())
            )
        return grid

    @property
    def flux_in_box(self) -> np.ndarray:
        """(n_y, n_x) sum of each stamp as stored: the PSF flux fraction the model holds inside its box."""
        return self.stamps.sum(axis=(2, 3))

    @property
    def border_fraction(self) -> np.ndarray:
        """(n_y, n_x) fraction of each stamp's flux in its outermost pixel ring (0 for an empty stamp)."""
        st = self.stamps
        inner = st[:, :, 1:-1, 1:-1].sum(axis=(2, 3)) if min(st.shape[-2:]) > 2 else 0.0
        tot = st.sum(axis=(2, 3))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(tot > 0, (tot - inner) / np.where(tot > 0, tot, 1.0), 0.0)

    def native(self, size: int) -> np.ndarray:
        """Grid stamps at detector sampling, centred on ``(size//2, size//2)``: (n_y, n_x, size, size) float32.

        Native stamps (OVERSAMP 1) are placed as stored; point samples of an oversampled effective PSF are
        scaled to the flux of the stored stamp; pixel-free oversampled PSFs are summed in blocks. No
        renormalisation to unit sum. A ``size`` smaller than the model crops it (logged once).
        """
        if size in self._native_cache:
            return self._native_cache[size]
        ovs = self.oversampling
        s = self.stamps.shape[-1]
        c = s // 2
        if ovs == 1:
            small, cs = self.stamps, c
        elif self.pixel_included:
            k_max = c // ovs
            idx = c + np.arange(-k_max, k_max + 1) * ovs
            small = self.stamps[:, :, idx[:, None], idx[None, :]]
            ssum = small.sum(axis=(2, 3), keepdims=True)
            fine = self.stamps.sum(axis=(2, 3), keepdims=True)
            small = np.where(ssum > 0, small * fine / np.where(ssum > 0, ssum, 1.0), 0.0)
            cs = k_max
        else:  # integrate the (pixel-free) PSF over each detector pixel: sum ovs x ovs blocks
            half = ovs // 2
            k_max = (c - half) // ovs
            k = np.arange(-k_max, k_max + 1)
            offs = np.arange(-half, ovs - half)
            idx = (c + k[:, None] * ovs + offs[None, :]).reshape(-1)
            fine = self.stamps[:, :, idx[:, None], idx[None, :]]
            m = len(k)
            small = fine.reshape(*fine.shape[:2], m, ovs, m, ovs).sum(axis=(3, 5))
            cs = k_max
        m = small.shape[-1]
        out = np.zeros((*small.shape[:2], size, size), dtype=np.float64)
        lo = size // 2 - cs  # stamp pixel 0 lands on output pixel lo
        a, b = max(lo, 0), min(lo + m, size)
        out[:, :, a:b, a:b] = small[:, :, a - lo : b - lo, a - lo : b - lo]
        if a > lo or b < lo + m:
            kept = out.sum(axis=(2, 3))
            full = small.sum(axis=(2, 3))
            with np.errstate(divide="ignore", invalid="ignore"):
                lost = float(np.nanmax(np.where(full > 0, 1.0 - kept / np.where(full > 0, full, 1.0), 0.0)))
            log.warning(
                "PSF model of %d pixels cropped to the %d-pixel stamp: up to %.2g of its flux dropped",
                m,
                size,
                lost,
            )
        out = out.astype(np.float32)
        self._native_cache[size] = out
        return out

    def at(self, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
        """PSF (N, size, size) float32 at 0-based quadrant pixel positions: bilinear between the 4 nearest nodes."""
        grid = self.native(size)
        ix, tx = _bilinear_index(np.asarray(x, dtype=np.float64), self.x_nodes)
        iy, ty = _bilinear_index(np.asarray(y, dtype=np.float64), self.y_nodes)
        tx = tx.astype(np.float32)[:, None, None]
        ty = ty.astype(np.float32)[:, None, None]
        # Only the grid's support (a few pixels around the centre) is interpolated; the rest stays 0,
        # exactly what the full-stamp interpolation of zeros gives.
        r_lo, r_hi, c_lo, c_hi = self._support(size)
        g = grid[:, :, r_lo:r_hi, c_lo:c_hi]
        box = (1 - ty) * (1 - tx) * g[iy, ix]
        box += (1 - ty) * tx * g[iy, ix + 1]
        box += ty * (1 - tx) * g[iy + 1, ix]
        box += ty * tx * g[iy + 1, ix + 1]
        out = np.zeros((len(ix), size, size), dtype=np.float32)
        out[:, r_lo:r_hi, c_lo:c_hi] = box
        return out

    def _support(self, size: int) -> tuple[int, int, int, int]:
        """Row/column bounds of the nonzero pixels of any native grid stamp."""
        key = ("support", size)
        if key not in self._native_cache:
            nz = np.any(self.native(size) != 0, axis=(0, 1))
            rows, cols = np.nonzero(nz.any(axis=1))[0], np.nonzero(nz.any(axis=0))[0]
            if len(rows) == 0:
                self._native_cache[key] = (0, 0, 0, 0)
            else:
                self._native_cache[key] = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
        return self._native_cache[key]


def _bilinear_index(v: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower node index and fraction for evenly spaced nodes (clamped: constant beyond the border)."""
    n = len(nodes)
    if n == 1:
        return np.zeros(len(v), dtype=np.intp), np.zeros(len(v))
    step = (nodes[-1] - nodes[0]) / (n - 1)
    f = np.clip((v - nodes[0]) / step, 0.0, n - 1.0)
    i = np.minimum(np.floor(f).astype(np.intp), n - 2)
    return i, f - i


# --------------------------------------------------------------------------------------------------
# Geometry


def local_jacobian(wcs, x: np.ndarray, y: np.ndarray, step_pix: float = 0.5) -> np.ndarray:
    """``J = d(u, v) / d(x, y)`` in arcsec per pixel at 0-based pixel positions, (N, 2, 2).

    ``(u, v)`` is the local sky frame (GalSim's world frame): ``u = -dRA cos(dec)`` (west), ``v = dDec``
    (north). Central differences of the full WCS (distortions included).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    h = step_pix
    px = np.concatenate([x + h, x - h, x, x])
    py = np.concatenate([y, y, y + h, y - h])
    ra, dec = wcs.all_pix2world(px, py, 0)
    ra = ra.reshape(4, -1)
    dec = dec.reshape(4, -1)
    cosd = np.cos(np.radians(dec.mean(axis=0)))
    dra = (ra[[0, 2]] - ra[[1, 3]] + 180.0) % 360.0 - 180.0  # RA wrap
    du = -dra * cosd * 3600.0 / (2 * h)  # (2, N): d/dx, d/dy
    dv = (dec[[0, 2]] - dec[[1, 3]]) * 3600.0 / (2 * h)
    return np.stack([np.stack([du[0], du[1]], axis=-1), np.stack([dv[0], dv[1]], axis=-1)], axis=1)


def sky_frame_transform(jac: np.ndarray) -> dict[str, np.ndarray]:
    """Decompose local Jacobians (N, 2, 2) into parity, rotation, pixel scale and distortion shear.

    Returns ``parity`` (+1/-1), ``theta`` (rad; sky = pixel frame rotated by theta), ``scale_arcsec``
    (sqrt |det J|) and ``gamma1``/``gamma2`` (shear of the sky -> pixel mapping that is removed).
    """
    j = np.array(jac, dtype=np.float64)
    det = j[:, 0, 0] * j[:, 1, 1] - j[:, 0, 1] * j[:, 1, 0]
    parity = np.where(det < 0, -1.0, 1.0)
    j[:, :, 0] *= parity[:, None]  # J' = J F with F = diag(parity, 1): det J' > 0
    a, b, c, d = j[:, 0, 0], j[:, 0, 1], j[:, 1, 0], j[:, 1, 1]
    theta = np.arctan2(c - b, a + d)
    ct, st = np.cos(theta), np.sin(theta)
    # P = Rot(-theta) J' (symmetric, positive definite)
    p11 = ct * a + st * c
    p12 = ct * b + st * d
    p22 = -st * b + ct * d
    tr = p11 + p22
    return {
        "parity": parity,
        "theta": theta,
        "scale_arcsec": np.sqrt(np.abs(det)),
        "gamma1": (p11 - p22) / tr,
        "gamma2": 2.0 * p12 / tr,
    }


def to_sky_frame(
    e1: np.ndarray, e2: np.ndarray, r11: np.ndarray, r22: np.ndarray, frame: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-frame ellipticities/responses -> sky frame (see the module docstring)."""
    e2 = e2 * frame["parity"]
    e1 = e1 + r11 * frame["gamma1"]
    e2 = e2 + r22 * frame["gamma2"]
    c2, s2 = np.cos(2 * frame["theta"]), np.sin(2 * frame["theta"])
    e1s = c2 * e1 - s2 * e2
    e2s = s2 * e1 + c2 * e2
    r11s = c2 * c2 * r11 + s2 * s2 * r22
    r22s = s2 * s2 * r11 + c2 * c2 * r22
    return e1s, e2s, r11s, r22s


# --------------------------------------------------------------------------------------------------
# Cut-outs


def stamp_grid(x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row/column index arrays (N, size) of stamps centred on the nearest pixel, and offsets (N, 2) = (dx, dy)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ix = np.floor(x + 0.5).astype(np.intp)
    iy = np.floor(y + 0.5).astype(np.intp)
    ar = np.arange(size, dtype=np.intp) - size // 2
    return iy[:, None] + ar, ix[:, None] + ar, np.stack([x - ix, y - iy], axis=1)


def stamp_index(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flat pixel indices (N, H, W) into an image of ``shape`` (clipped) and the mask of pixels on the image."""
    ny, nx = shape
    ok_r = (rows >= 0) & (rows < ny)
    ok_c = (cols >= 0) & (cols < nx)
    r = np.clip(rows, 0, ny - 1)
    c = np.clip(cols, 0, nx - 1)
    return r[:, :, None] * nx + c[:, None, :], ok_r[:, :, None] & ok_c[:, None, :]


def cut_stamps(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, dtype=np.float32, index=None
) -> tuple[np.ndarray, np.ndarray]:
    """Gather (N, H, W) stamps from ``image`` at index arrays from :func:`stamp_grid` (one ``take``).

    ``index``: a precomputed :func:`stamp_index` to share between the arrays of one quadrant.
    Returns ``(stamps, inside)``; pixels off the image are 0 and ``inside`` is False there.
    """
    flat, inside = index if index is not None else stamp_index(rows, cols, image.shape)
    stamps = np.asarray(image).reshape(-1).take(flat).astype(dtype, copy=False)
    stamps[~inside] = 0
    return stamps, inside


def _keys_cubic(t: np.ndarray) -> np.ndarray:
    """Keys (a = -1/2) cubic convolution weights (..., 4) for taps at -1, 0, 1, 2 and fraction ``t``."""
    t = t[..., None]
    d = np.abs(np.array([-1.0, 0.0, 1.0, 2.0]) - t)
    near = (1.5 * d - 2.5) * d * d + 1.0
    far = ((-0.5 * d + 2.5) * d - 4.0) * d + 2.0
    return np.where(d <= 1.0, near, np.where(d < 2.0, far, 0.0))


def fill_masked_symmetric(
    stamps: np.ndarray,
    mask: np.ndarray,
    offsets: np.ndarray,
    return_unfilled: bool = False,
    method: str = "cubic",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Fill masked pixels with the image point-symmetric about the source centre (0 where unavailable).

    The centre is ``(H//2 + dy, W//2 + dx)``; the partner of pixel ``(r, c)`` is ``2 centre - (r, c)``,
    at a fractional position (``frac(2 d)``, the same for every pixel of a stamp). ``method="cubic"``
    (default) evaluates it with Keys cubic convolution over its 4 x 4 neighbours when they are all
    unmasked (third-order accurate: no smoothing of the profile, which a bilinear value would impose:
    5 % cosmic-ray-like masks give m ~ -3e-3 bilinear, see benchmarks/bench_shear_masks.py); otherwise,
    and with ``method="bilinear"``, bilinearly from its 4 neighbours when they are unmasked, else the
    nearest pixel when that one is unmasked, else 0 (the background). Work is done on the masked pixels
    only. Returns a new array (and, with ``return_unfilled``, the mask of pixels that had to be set to 0).
    """
    if method not in ("cubic", "bilinear"):
        raise ValueError(f"method={method!r} is not supported: use 'cubic' or 'bilinear'")
    n, h, w = stamps.shape
    out = stamps.copy()
    unfilled = np.zeros_like(mask)
    nn, rr, cc = np.nonzero(mask)
    if len(nn):
        py = 2 * (h // 2) + 2.0 * offsets[nn, 1] - rr  # partner position (float pixel coordinates)
        px = 2 * (w // 2) + 2.0 * offsets[nn, 0] - cc
        fy, fx = np.floor(py), np.floor(px)
        ty, tx = (py - fy).astype(stamps.dtype), (px - fx).astype(stamps.dtype)
        r0, c0 = fy.astype(np.intp), fx.astype(np.intp)

        def gather(r, c):
            ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            r, c = np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)
            return stamps[nn, r, c], ok & ~mask[nn, r, c]

        v00, g00 = gather(r0, c0)
        v01, g01 = gather(r0, c0 + 1)
        v10, g10 = gather(r0 + 1, c0)
        v11, g11 = gather(r0 + 1, c0 + 1)
        bil = (1 - ty) * (1 - tx) * v00 + (1 - ty) * tx * v01 + ty * (1 - tx) * v10 + ty * tx * v11
        all4 = g00 & g01 & g10 & g11
        vn, gn = gather(np.rint(py).astype(np.intp), np.rint(px).astype(np.intp))
        value = np.where(all4, bil, np.where(gn, vn, 0))
        if method == "cubic":
            wy = _keys_cubic(ty.astype(np.float64))  # (M, 4)
            wx = _keys_cubic(tx.astype(np.float64))
            cub = np.zeros(len(nn))
            all16 = np.ones(len(nn), dtype=bool)
            for i in range(4):
                for j in range(4):
                    v, g = gather(r0 - 1 + i, c0 - 1 + j)
                    cub += wy[:, i] * wx[:, j] * v
                    all16 &= g
            value = np.where(all16, cub.astype(stamps.dtype), value)
        out[nn, rr, cc] = value
        unfilled[nn, rr, cc] = ~all4 & ~gn
    return (out, unfilled) if return_unfilled else out


def _masked_median(values: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """Row-wise median of the unmasked values of (N, M) (NaN for a fully masked row), vectorised.

    With ``m`` masked values in a row, ``m // 2`` of them are set to -inf and the others to +inf, so the
    unmasked order statistics ``(k - 1) // 2`` and ``k // 2`` (``k = M - m``) sit at full-row positions
    ``m // 2 + (k - 1) // 2`` and ``m // 2 + k // 2``, which are always among ``M // 2 - 1 ... M // 2``
    (one O(M) partition instead of a sort; the same values are picked as with a sort).
    """
    n, m_all = values.shape
    if n == 0 or m_all == 0:
        return np.full(n, np.nan)
    n_masked = masked.sum(axis=1)
    k = m_all - n_masked
    n_lo = n_masked // 2  # masked values sent to -inf
    v = np.where(masked, np.inf, values)
    rr, cc = np.nonzero(masked)  # row-major: each row's masked pixels are contiguous, in column order
    rank = np.arange(len(rr)) - (np.cumsum(n_masked) - n_masked)[rr]
    low = rank < n_lo[rr]
    v[rr[low], cc[low]] = -np.inf
    lo = np.clip(n_lo + (k - 1) // 2, 0, m_all - 1)[:, None]
    hi = np.clip(n_lo + k // 2, 0, m_all - 1)[:, None]
    kth = sorted({min(max(i, 0), m_all - 1) for i in ((m_all - 1) // 2 - 1, m_all // 2 - 1, m_all // 2)})
    v = np.partition(v, kth, axis=1)
    with np.errstate(invalid="ignore"):  # fully masked rows: -inf + inf, replaced by NaN below
        med = 0.5 * (
            np.take_along_axis(v, lo, 1)[:, 0].astype(np.float64) + np.take_along_axis(v, hi, 1)[:, 0]
        )
    return np.where(k > 0, med, np.nan)


class _StampCutter:
    """Cut-outs of the stamps of one quadrant from each of its arrays (same geometry for all of them).

    All stamps are copied in one gather of blocks from a strided window view (row copies, no per-pixel
    index arrays); the few crossing a quadrant edge are then redone with the clipped flat-index gather
    of :func:`cut_stamps` (pixels off the quadrant are 0 and flagged as outside).
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]):
        ny, nx = shape
        h, w = rows.shape[1], cols.shape[1]
        n = rows.shape[0]
        self.size = (h, w)
        r0, c0 = rows[:, 0], cols[:, 0]
        self.windowed = ny >= h and nx >= w
        interior = (r0 >= 0) & (c0 >= 0) & (r0 + h <= ny) & (c0 + w <= nx)
        if not self.windowed:
            interior[:] = False
        self.r0 = np.clip(r0, 0, max(ny - h, 0))
        self.c0 = np.clip(c0, 0, max(nx - w, 0))
        self.i_edge = np.nonzero(~interior)[0]
        self.edge_index = (
            stamp_index(rows[self.i_edge], cols[self.i_edge], shape) if len(self.i_edge) else None
        )
        self.inside = np.ones((n, h, w), dtype=bool)
        if self.edge_index is not None:
            self.inside[self.i_edge] = self.edge_index[1]

    def cut(self, image: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) stamps of ``image`` in ``dtype`` (native byte order; None keeps the image's kind)."""
        image = np.asarray(image)
        if dtype is None:
            dtype = image.dtype.newbyteorder("=")
        h, w = self.size
        if self.windowed:
            out = np.lib.stride_tricks.sliding_window_view(image, (h, w))[self.r0, self.c0]
            out = out.astype(dtype, copy=False)
        else:
            out = np.empty((len(self.r0), h, w), dtype=dtype)
        if self.edge_index is not None:
            flat, inside = self.edge_index
            edge = image.reshape(-1).take(flat)
            edge[~inside] = 0
            out[self.i_edge] = edge
        return out, self.inside


def _center_masked(mask: np.ndarray, offsets: np.ndarray, radius: float) -> np.ndarray:
    n, h, w = mask.shape
    k = int(math.ceil(radius)) + 1
    r0, c0 = max(h // 2 - k, 0), max(w // 2 - k, 0)
    sub = mask[:, r0 : h // 2 + k + 1, c0 : w // 2 + k + 1]
    rr = np.arange(r0, r0 + sub.shape[1]) - h // 2
    cc = np.arange(c0, c0 + sub.shape[2]) - w // 2
    d2 = (rr[None, :, None] - offsets[:, 1, None, None]) ** 2 + (
        cc[None, None, :] - offsets[:, 0, None, None]
    ) ** 2
    return (sub & (d2 <= radius * radius)).any(axis=(1, 2))


# --------------------------------------------------------------------------------------------------
# One quadrant -> stamps


@dataclasses.dataclass
class ExposureStamps:
    """Stamps of the sources whose centre lies on one quadrant of one exposure."""

    key: str
    exposure: str
    source_index: np.ndarray  # (n,) index into the SourceList
    images: np.ndarray  # (n, H, W) float32, background-subtracted, microJy / pixel, masked pixels filled
    psf: np.ndarray  # (n, H, W) float32, unit sum, centred on (H//2, W//2)
    noise_sigma: np.ndarray  # (n,) float64, same unit as images
    offsets_pix: np.ndarray  # (n, 2) (dx, dy) of the source from pixel (H//2, W//2)
    x_pix: np.ndarray  # (n,) 0-based quadrant pixel position
    y_pix: np.ndarray
    jacobian: np.ndarray  # (n, 2, 2) d(u, v)/d(x, y), arcsec / pixel
    masked_fraction: np.ndarray  # (n,)
    reject: np.ndarray  # (n,) int: REJECT_* bits (0: usable)
    #: (n,) sum of each source's PSF model: the flux fraction inside the model's box (Q1 ~0.93-0.97; the
    #: estimator normalises the PSF, so truncation is known only from this). None: not computed.
    psf_flux_in_box: np.ndarray | None = None
    #: (n,) pixel scale (arcsec) the estimator's weight kernel is built with: the quadrant's scale at its
    #: centre, the same for all its stamps, so a stamp's moments do not depend on which stamps share its
    #: batch (sub-tile or tile runs, any batch size). None: the batch's median scale.
    kernel_scale_arcsec: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source_index)

    def select(self, sel: np.ndarray) -> ExposureStamps:
        return ExposureStamps(
            self.key,
            self.exposure,
            *(None if (v := getattr(self, f.name)) is None else v[sel] for f in dataclasses.fields(self)[2:]),
        )


def quadrant_stamps(
    quad: QuadrantImages,
    sources: SourceList,
    stamp_size: int,
    *,
    center_radius_pix: float = CENTER_RADIUS_PIX_DEFAULT,
    max_masked_fraction: float = MAX_MASKED_FRACTION_DEFAULT,
    aperture_radius_pix: float = APERTURE_RADIUS_PIX_DEFAULT,
    wcs=None,
) -> ExposureStamps:
    """Cut, clean and describe the stamps of every source whose centre lies on this quadrant."""
    if wcs is None:
        wcs = quad.get_wcs()
    ny, nx = quad.sci.shape
    x, y = wcs.all_world2pix(sources.ra_deg, sources.dec_deg, 0)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    on = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    idx = np.nonzero(on)[0]
    x, y = x[idx], y[idx]
    size = int(stamp_size)
    if len(idx) == 0:
        return ExposureStamps(
            quad.key, quad.exposure, idx, np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.float32),
            np.zeros(0), np.zeros((0, 2)), x, y, np.zeros((0, 2, 2)), np.zeros(0), np.zeros(0, np.int32),
            np.zeros(0), np.zeros(0),
        )  # fmt: skip
    rows, cols, offsets = stamp_grid(x, y, size)

    scale = flux_scale_ujy_per_adu(quad.header)
    cutter = _StampCutter(rows, cols, quad.sci.shape)
    sci, inside = cutter.cut(quad.sci)
    if quad.bkg is not None:
        sci -= cutter.cut(quad.bkg)[0]
    mask = ~inside | ~np.isfinite(sci)
    if quad.flg is not None:
        flg = cutter.cut(quad.flg, dtype=None)[0]
        mask |= (flg & FLG_MASK_BITS) != 0
        del flg
    if quad.rms is not None:
        noise = cutter.cut(quad.rms)[0]
    elif quad.wgt is not None:
        w = cutter.cut(quad.wgt)[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            noise = np.where(w > 0, 1.0 / np.sqrt(w), np.nan).astype(np.float32)
        del w
    else:
        raise ValueError(f"quadrant {quad.key} has neither an RMS nor a WGT map: cannot estimate the noise")
    mask |= ~(np.isfinite(noise) & (noise > 0))
    sci = np.where(mask, 0, sci).astype(np.float32, copy=False) * np.float32(scale)

    n = len(idx)
    sigma = _masked_median(noise.reshape(n, -1), mask.reshape(n, -1)) * scale
    del noise

    masked_fraction = mask.reshape(n, -1).mean(axis=1)
    reject = np.where(_center_masked(mask, offsets, center_radius_pix), REJECT_CENTER_MASKED, 0).astype(
        np.int32
    )
    reject |= np.where(masked_fraction > max_masked_fraction, REJECT_TOO_MASKED, 0).astype(np.int32)
    reject |= np.where(np.isfinite(sigma) & (sigma > 0), 0, REJECT_BAD_NOISE).astype(np.int32)
    sigma = np.where(np.isfinite(sigma), sigma, 0.0)

    images, unfilled = fill_masked_symmetric(sci, mask, offsets, return_unfilled=True)
    del sci, mask
    reject |= np.where(_center_masked(unfilled, offsets, aperture_radius_pix), REJECT_UNFILLED, 0).astype(
        np.int32
    )
    del unfilled
    psf = quad.psf.at(x, y, size)
    jac = local_jacobian(wcs, x, y)
    centre = local_jacobian(wcs, np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0]))[0]
    kernel_scale = float(np.sqrt(abs(np.linalg.det(centre))))
    return ExposureStamps(
        key=quad.key,
        exposure=quad.exposure,
        source_index=idx,
        images=images,
        psf=psf,
        noise_sigma=sigma,
        offsets_pix=offsets,
        x_pix=x,
        y_pix=y,
        jacobian=jac,
        masked_fraction=masked_fraction,
        reject=reject,
        psf_flux_in_box=psf.sum(axis=(1, 2), dtype=np.float64),
        kernel_scale_arcsec=np.full(n, kernel_scale),
    )


# --------------------------------------------------------------------------------------------------
# Reading quadrants (only the HDUs needed)


#: Plausible detector pixel scales (arcsec); a WCS outside this range has wrong units (e.g. CUNIT arcsec on
#: degree CD values) and would silently put every source in the wrong place.
PIXEL_SCALE_RANGE_ARCSEC = (0.01, 2.0)


def check_wcs_units(header: Mapping[str, Any], uri: str, hdu: str = "") -> None:
    """Reject a quadrant WCS whose units are not degrees or whose pixel scale is implausible."""
    from constellation_assets.io.uri import DataAccessError

    units = [str(header.get(f"CUNIT{i}", "deg")).strip().lower() for i in (1, 2)]
    if any(u not in ("deg", "") for u in units):
        raise DataAccessError(
            uri,
            f"WCS of {hdu or 'the SCI HDU'} has CUNIT1/2 = {units}; celestial axes must be in degrees",
            "fix the header units (CUNITi = 'deg' with CD/CDELT in degrees) or regenerate the file",
        )
    cd = [[float(header.get(f"CD{i}_{j}", 0.0)) for j in (1, 2)] for i in (1, 2)]
    if not any(cd[0] + cd[1]):
        cd = [[float(header.get("CDELT1", 0.0)), 0.0], [0.0, float(header.get("CDELT2", 0.0))]]
    scale_arcsec = abs(cd[0][0] * cd[1][1] - cd[0][1] * cd[1][0]) ** 0.5 * 3600.0
    lo, hi = PIXEL_SCALE_RANGE_ARCSEC
    if scale_arcsec and not lo <= scale_arcsec <= hi:
        raise DataAccessError(
            uri,
            f"WCS of {hdu or 'the SCI HDU'} gives a pixel scale of {scale_arcsec:.3g} arcsec (expected {lo}-{hi})",
            "check the header units of the CD matrix (degrees per pixel) or regenerate the file",
        )


def _entry_exposure(entry: Mapping[str, Any]) -> int:
    """Exposure index of a quadrant entry: its ``exposure`` field, else the DET file name, else 1."""
    if entry.get("exposure") is not None:
        return int(entry["exposure"])
    from constellation_assets.io.q1 import DET_RE

    m = DET_RE.match(str(entry.get("sci_path", "")).rsplit("/", 1)[-1])
    return int(m["exposure"]) if m else 1


def _psf_hdu_key(entry: Mapping[str, Any]) -> tuple | None:
    """Identity of an entry's PSF HDU (file, HDU, byte range); None when the entry has no byte offsets."""
    if entry.get("psf_hdu") is None or entry.get("psf_header_offset") is None:
        return None
    return tuple(
        str(entry.get(f"psf_{k}")) for k in ("path", "hdu", "header_offset", "data_offset", "data_size")
    )


def read_quadrant_images(
    entry: Mapping[str, Any],
    storage_options: dict | None = None,
    files: Any = None,
    *,
    psf_hdus: dict | None = None,
) -> QuadrantImages:
    """Read the SCI/RMS/FLG, BKG and PSF HDUs of one manifest quadrant entry (WGT only without RMS).

    All reads go through :func:`constellation_assets.io.q1.read_quadrant_hdus`: byte ranges from the entry's
    offsets, or by HDU name through the process-wide header walk cache for entries without offsets.
    ``files`` is accepted for older callers and unused (the walks are cached in ``io.q1.HDU_TABLES``).
    ``psf_hdus``: a dict kept by the caller across entries, so that a PSF HDU shared by several exposures
    (the dithers of an observation share its PSF file) is read once.
    """
    from constellation_assets.io.q1 import entry_det_id, hdu_candidates, read_quadrant_hdus
    from constellation_assets.io.uri import DataAccessError

    det = entry_det_id(entry)
    exposure = f"{int(entry.get('obs_id'))}-{int(entry.get('dither'))}-{_entry_exposure(entry)}"
    key = f"{exposure}-{det}"
    psf_key = _psf_hdu_key(entry) if psf_hdus is not None else None
    if psf_key is not None and psf_key in psf_hdus:
        arrays = read_quadrant_hdus(dict(entry), storage_options, ["sci", "rms", "flg", "bkg"])
        arrays["psf"] = psf_hdus[psf_key]
    else:
        arrays = read_quadrant_hdus(dict(entry), storage_options=storage_options)
        if psf_key is not None and "psf" in arrays:
            psf_hdus[psf_key] = arrays["psf"]
    for kind in ("sci", "psf"):
        if kind not in arrays or arrays[kind][0] is None:
            where = entry.get("sci_path" if kind == "sci" else "psf_path")
            raise DataAccessError(
                str(where),
                f"HDU {kind.upper()} of quadrant {det} not found (tried {hdu_candidates(entry, kind)})",
                "check that the manifest matches the files (re-run `constellation prepare --force`)",
            )
    sci, header = arrays["sci"]
    psf_img, psf_header = arrays["psf"]
    check_wcs_units(header, str(entry.get("sci_path")), f"quadrant {det}")

    def _get(kind):
        got = arrays.get(kind)
        return None if got is None else got[0]

    return QuadrantImages(
        key=key,
        exposure=exposure,
        sci=np.asarray(sci, dtype=np.float32),
        bkg=_get("bkg"),
        rms=_get("rms"),
        wgt=_get("wgt"),
        flg=_get("flg"),
        header=header,
        psf=PsfGrid.from_image(psf_img, psf_header, sci.shape, source=f"{entry.get('psf_path')}[{det}]"),
    )


class QuadrantCache:
    """Process-wide LRU cache of decoded quadrants (arrays, header, WCS, PSF grid and its native stamps).

    Neighbouring sub-tiles overlap (extended areas) and share most quadrants, and a worker measures all
    the sub-tiles of a tile in one process: each quadrant is then read, decoded and its WCS/PSF grid
    prepared once instead of once per sub-tile. Bounded by ``max_bytes`` of arrays (least recently used
    dropped first); ``CONSTELLATION_QUADRANT_CACHE_MB`` sets the default budget (0 disables it). Entries
    are keyed by the manifest entry (paths, HDU names and offsets) and each local file's size and
    modification time (for s3:// its ETag), so a rewritten file is read again.
    """

    def __init__(self, max_bytes: int):
        import threading

        self.max_bytes = int(max_bytes)
        self._items: dict[Any, QuadrantImages] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key) -> QuadrantImages | None:
        if key is None or self.max_bytes <= 0:
            return None
        with self._lock:
            quad = self._items.pop(key, None)
            if quad is None:
                self.misses += 1
                return None
            self._items[key] = quad  # most recently used last
            self.hits += 1
            return quad

    def put(self, key, quad: QuadrantImages) -> None:
        if key is None or self.max_bytes <= 0:
            return
        size = quad.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._items and self._bytes + size > self.max_bytes:
                self._bytes -= self._items.pop(next(iter(self._items))).nbytes
            self._items[key] = quad
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _cache_budget_bytes() -> int:
    import os

    try:
        return int(float(os.environ.get("CONSTELLATION_QUADRANT_CACHE_MB", "256")) * 2**20)
    except ValueError:
        return 256 * 2**20


#: The process-wide quadrant cache used by :func:`iter_manifest_stamps`.
QUADRANT_CACHE = QuadrantCache(_cache_budget_bytes())


def _quadrant_cache_key(entry: Mapping[str, Any], storage_options: dict | None) -> tuple | None:
    """Cache key of a manifest quadrant entry (None: do not cache)."""
    import json
    import os

    from constellation_assets.io.uri import get_fs, is_s3

    if QUADRANT_CACHE.max_bytes <= 0:
        return None
    versions = []
    try:
        for k in ("sci_path", "bkg_path", "psf_path", "wgt_path"):
            uri = entry.get(k)
            if not uri:
                continue
            uri = str(uri)
            if is_s3(uri):
                fs, path = get_fs(uri, storage_options)
                info = fs.info(path)
                versions.append((uri, str(info.get("ETag") or info.get("LastModified")), info.get("size")))
            else:
                stat = os.stat(uri)
                versions.append((uri, stat.st_mtime_ns, stat.st_size))
    except Exception:  # unreadable here: the reader reports the error, without caching
        return None
    return json.dumps(dict(entry), sort_keys=True, default=str), tuple(versions)


# --------------------------------------------------------------------------------------------------
# Manifest -> stamps


def read_source_table(manifest: Mapping[str, Any], storage_options: dict | None = None):
    """The manifest's source catalog (``sources_uri``, else ``source_catalog``): OBJECT_ID, RIGHT_ASCENSION,
    DECLINATION of every row, as a pyarrow table."""
    import pyarrow.parquet as pq

    from constellation_assets.io.uri import DataAccessError, open_uri

    uri = manifest.get("sources_uri") or manifest.get("source_catalog")
    if not uri:
        raise ValueError(
            "manifest has neither 'sources_uri' (Parquet of the tile's sources) nor 'source_catalog'; "
            "re-run `constellation prepare`"
        )
    cols = ["OBJECT_ID", "RIGHT_ASCENSION", "DECLINATION"]
    try:
        if str(uri).lower().endswith((".fits", ".fits.gz", ".fit")):
            from constellation_assets.io.mer_catalog import read_mer_catalog

            table = read_mer_catalog(str(uri), storage_options, columns=cols)
        else:
            with open_uri(str(uri), "rb", storage_options) as fh:
                table = pq.read_table(fh, columns=cols)
    except (KeyError, ValueError) as exc:
        raise DataAccessError(
            str(uri), f"source catalog lacks columns {cols} ({exc})", "re-run `constellation prepare`"
        ) from exc
    return table


def sources_from_manifest(
    manifest: Mapping[str, Any], storage_options: dict | None = None, *, table: Any = None
) -> tuple[SourceList, np.ndarray]:
    """The manifest's sources (its ``source_ids`` rows) and the IN_CORE mask.

    Read from ``sources_uri`` (the prepared Parquet of the tile's sources, which also holds the neighbours'
    sources of the extended area), else from ``source_catalog`` (Parquet, or a MER final catalog FITS).
    ``table``: that catalog already read (:func:`read_source_table`), e.g. once for all sub-tiles of a tile.
    """
    if table is None:
        table = read_source_table(manifest, storage_options)
    uri = manifest.get("sources_uri") or manifest.get("source_catalog")
    oid = table["OBJECT_ID"].to_numpy().astype(np.int64)
    ra = table["RIGHT_ASCENSION"].to_numpy().astype(np.float64)
    dec = table["DECLINATION"].to_numpy().astype(np.float64)
    ids = manifest.get("source_ids")
    if ids is not None and len(ids) == 0:  # an empty sub-tile (possibly with an empty catalog): no sources
        oid, ra, dec = oid[:0], ra[:0], dec[:0]
    elif ids is not None:
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(oid, kind="stable")
        pos = np.searchsorted(oid[order], ids)
        pos = np.clip(pos, 0, max(len(oid) - 1, 0))
        found = len(oid) > 0
        if not found or not np.all(oid[order][pos] == ids):
            missing = ids[~np.isin(ids, oid)] if found else ids
            raise ValueError(
                f"{len(missing)} source_ids of the manifest are not in {uri} (e.g. {missing[:3].tolist()}); "
                "the manifest and the source catalog disagree: re-run `constellation prepare --force`"
            )
        sel = order[pos]
        oid, ra, dec = oid[sel], ra[sel], dec[sel]
    core_ids = manifest.get("core_source_ids")
    in_core = (
        np.isin(oid, np.asarray(core_ids, dtype=np.int64))
        if core_ids is not None
        else np.ones(len(oid), bool)
    )
    return SourceList(oid, ra, dec), in_core


def iter_manifest_stamps(
    manifest: Mapping[str, Any],
    sources: SourceList,
    stamp_size: int,
    storage_options: Callable[[str], dict | None] | dict | None = None,
    *,
    reader: Callable[[Mapping[str, Any], dict | None], QuadrantImages] | None = None,
    center_radius_pix: float = CENTER_RADIUS_PIX_DEFAULT,
    max_masked_fraction: float = MAX_MASKED_FRACTION_DEFAULT,
) -> Iterator[ExposureStamps]:
    """Yield the stamps of each quadrant of the manifest in turn (one quadrant in memory at a time).

    ``storage_options``: fsspec options, or a function of the URI giving them (``cfg.storage_options``).
    """
    entries = list(manifest.get("quadrants") or [])

    def load(entry: Mapping[str, Any]) -> QuadrantImages:
        opts = (
            storage_options(str(entry.get("sci_path", ""))) if callable(storage_options) else storage_options
        )
        if reader:
            return reader(entry, opts)
        key = _quadrant_cache_key(entry, opts)
        quad = QUADRANT_CACHE.get(key)
        if quad is None:
            quad = read_quadrant_images(entry, opts)
            quad.get_wcs()  # built here, in the prefetch thread, and cached with the quadrant
            quad.psf.native(int(stamp_size))
            QUADRANT_CACHE.put(key, quad)
        return quad

    for _, quad, exc in _loaded_in_order(entries, load):
        if exc is not None:
            raise exc
        stamps = quadrant_stamps(
            quad,
            sources,
            stamp_size,
            center_radius_pix=center_radius_pix,
            max_masked_fraction=max_masked_fraction,
        )
        del quad
        if len(stamps):
            yield stamps


def _loaded_in_order(
    entries: list[Mapping[str, Any]], load: Callable[[Mapping[str, Any]], QuadrantImages]
) -> Iterator[tuple[int, QuadrantImages | None, Exception | None]]:
    """``(i, load(entries[i]), None)`` or ``(i, None, error)`` for each entry, in order.

    Quadrants on object storage: the next one is fetched (network I/O, decoding, WCS) in a background
    thread while this one is cut and measured (reads stay strictly one after the other, at most one
    quadrant ahead). Local files are read in line: page-cache reads are CPU-bound copies, and a second
    thread only competes with the estimator for the same cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    from constellation_assets.io.uri import is_s3

    ahead = any(is_s3(str(e.get("sci_path", ""))) for e in entries)
    pool_cm = ThreadPoolExecutor(1, "quadrant-prefetch") if ahead else contextlib.nullcontext()
    with pool_cm as pool:
        nxt = pool.submit(load, entries[0]) if ahead and entries else None
        for i, entry in enumerate(entries):
            try:
                if ahead:
                    fut = nxt
                    nxt = pool.submit(load, entries[i + 1]) if i + 1 < len(entries) else None
                    quad = fut.result()
                else:
                    quad = load(entry)
            except Exception as exc:
                yield i, None, exc
                continue
            yield i, quad, None
            del quad


def iter_quadrant_images(
    entries: list[Mapping[str, Any]],
    stamp_size: int,
    storage_options: Callable[[str], dict | None] | dict | None = None,
) -> Iterator[tuple[int, QuadrantImages | None, Exception | None]]:
    """Read each quadrant entry once, in order: yields ``(i, quadrant, None)`` or ``(i, None, error)``.

    For a tile-level measurement (:func:`constellation_assets.shear.infer.measure_tile`): the quadrants
    bypass :data:`QUADRANT_CACHE` (each is read exactly once per call and released by the caller, so at
    most the current quadrant and, on s3://, the one fetched ahead are in memory). The WCS and the native
    PSF grid are prepared in the reading thread, as in :func:`iter_manifest_stamps`. A quadrant that
    cannot be read is reported with its error (the caller fails the sub-tiles that need it) and the others
    are still read.
    """
    psf_hdus: dict = {}  # PSF HDUs shared by the dithers of an observation: read once

    def load(entry: Mapping[str, Any]) -> QuadrantImages:
        opts = (
            storage_options(str(entry.get("sci_path", ""))) if callable(storage_options) else storage_options
        )
        quad = read_quadrant_images(entry, opts, psf_hdus=psf_hdus)
        quad.get_wcs()
        quad.psf.native(int(stamp_size))
        return quad

    return _loaded_in_order(entries, load)


# --------------------------------------------------------------------------------------------------
# Per-exposure measurements -> one row per source


def combine_exposures(
    n_sources: int,
    source_index: np.ndarray,
    meas: Mapping[str, np.ndarray],
    usable: np.ndarray,
    covered: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Inverse-variance combination of per-(source, exposure) sky-frame measurements (module docstring).

    ``meas`` holds per-stamp arrays ``e1, e2, r11, r22, weight, snr, m00, flags`` (sky frame, from the
    estimator); ``usable`` marks stamps not rejected by the stamp stage. ``covered`` (N,) counts the
    exposures on which each source lies (for flags). Returns per-source ``e1, e2, r11, r22, weight,
    snr, n_exposures, flags``.
    """
    si = np.asarray(source_index, dtype=np.intp)
    w = np.asarray(meas["weight"], dtype=np.float64)
    est_flags = np.asarray(meas["flags"], dtype=np.int64)
    snr = np.asarray(meas["snr"], dtype=np.float64)
    m00 = np.asarray(meas["m00"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_m00 = np.abs(m00 / snr)
    finite_sigma = np.isfinite(sigma_m00) & (sigma_m00 > 0)
    # Noiseless stamps (snr = inf) get equal weights; otherwise a_i = 1 / Var(M00_i).
    a = np.where(
        finite_sigma, 1.0 / np.where(finite_sigma, sigma_m00, 1.0) ** 2, np.where(np.isinf(snr), 1.0, 0.0)
    )
    good = usable & (w > 0) & (est_flags == 0) & (a > 0)
    aw = np.where(good, a * w, 0.0)
    den = np.bincount(si, weights=aw, minlength=n_sources)
    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in ("e1", "e2", "r11", "r22"):
            num = np.bincount(si, weights=aw * np.where(good, meas[name], 0.0), minlength=n_sources)
            out[name] = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        a_good = np.where(good, a, 0.0)
        sum_a = np.bincount(si, weights=a_good, minlength=n_sources)
        out["weight"] = np.where(sum_a > 0, den / np.where(sum_a > 0, sum_a, 1.0), 0.0)
        # Inverse-variance combined flux moment and its S/N.
        flux = np.bincount(si, weights=np.where(good & finite_sigma, a * m00, 0.0), minlength=n_sources)
        sum_a_fin = np.bincount(si, weights=np.where(good & finite_sigma, a, 0.0), minlength=n_sources)
        snr_c = np.where(sum_a_fin > 0, flux / np.sqrt(np.where(sum_a_fin > 0, sum_a_fin, 1.0)), 0.0)
        snr_inf = np.bincount(si, weights=(good & np.isinf(snr)).astype(float), minlength=n_sources) > 0
        out["snr"] = np.where(snr_inf & (sum_a_fin == 0), np.inf, snr_c)
    n_exp = np.bincount(si, weights=good.astype(np.float64), minlength=n_sources).astype(np.int64)
    n_usable = np.bincount(si, weights=usable.astype(np.float64), minlength=n_sources).astype(np.int64)
    n_cov = (
        np.asarray(covered, dtype=np.int64)
        if covered is not None
        else np.bincount(si, minlength=n_sources).astype(np.int64)
    )
    or_flags = np.zeros(n_sources, dtype=np.int64)
    sel = usable & ~good
    np.bitwise_or.at(or_flags, si[sel], est_flags[sel])
    flags = np.zeros(n_sources, dtype=np.int64)
    flags |= np.where(n_cov == 0, FLAG_NO_COVERAGE, 0)
    flags |= np.where((n_cov > 0) & (n_usable == 0), FLAG_CENTER_MASKED, 0)
    flags |= np.where((n_usable > 0) & (n_exp == 0), FLAG_NO_GOOD_EXPOSURE | or_flags, 0)
    out["n_exposures"] = n_exp
    out["flags"] = flags.astype(np.int32)
    for name in ("e1", "e2", "r11", "r22", "weight"):
        out[name] = np.where(n_exp > 0, out[name], 0.0)
    return out


def sky_frame_moment_transform(frame: Mapping[str, np.ndarray]) -> np.ndarray:
    """Linear maps (N, 6, 6) taking pixel-frame FPFS moments to the sky frame (module docstring).

    Moments in the order of :data:`constellation_assets.shear.fpfs.MOMENT_NAMES`
    (``m00, m2c, m2s, a1, a2, b12``). Steps, as in :func:`to_sky_frame`: the parity flip negates the
    odd moments ``m2s`` and ``b12``; the WCS distortion ``gamma`` is removed to first order with the
    moments' own shear derivatives, ``x += gamma_1 dx/dg1 + gamma_2 dx/dg2`` (``dM00/dg = (M2c, M2s)``,
    ``dM2c/dg = (-A1, B12)``, ``dM2s/dg = (B12, -A2)``; the response moments' own derivatives are second
    order and dropped); the rotation by ``theta`` turns ``(m2c, m2s)`` as a spin-2 vector and the
    response tensor ``J = dM2/dg = [[-A1, B12], [B12, -A2]]`` as ``Rot(2 theta) J Rot(2 theta)^T``.
    """
    parity = np.asarray(frame["parity"], dtype=np.float64)
    n = len(parity)
    g1 = np.asarray(frame["gamma1"], dtype=np.float64)
    g2 = np.asarray(frame["gamma2"], dtype=np.float64)
    c2, s2 = np.cos(2 * frame["theta"]), np.sin(2 * frame["theta"])
    eye = np.broadcast_to(np.eye(6), (n, 6, 6))
    p = eye * np.stack([np.ones(n), np.ones(n), parity, np.ones(n), np.ones(n), parity], axis=1)[:, None, :]
    d = np.array(eye)
    d[:, 0, 1], d[:, 0, 2] = g1, g2
    d[:, 1, 3], d[:, 1, 5] = -g1, g2
    d[:, 2, 5], d[:, 2, 4] = g1, -g2
    r = np.zeros((n, 6, 6))
    r[:, 0, 0] = 1.0
    r[:, 1, 1], r[:, 1, 2] = c2, -s2
    r[:, 2, 1], r[:, 2, 2] = s2, c2
    r[:, 3, 3], r[:, 3, 4], r[:, 3, 5] = c2 * c2, s2 * s2, 2 * c2 * s2
    r[:, 4, 3], r[:, 4, 4], r[:, 4, 5] = s2 * s2, c2 * c2, -2 * c2 * s2
    r[:, 5, 3], r[:, 5, 4], r[:, 5, 5] = -c2 * s2, c2 * s2, c2 * c2 - s2 * s2
    return r @ d @ p


def moments_to_sky_frame(
    moments: np.ndarray, cov: np.ndarray, frame: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-frame moments (N, 6) and their noise covariance (N, 6, 6) in the sky frame."""
    t = sky_frame_moment_transform(frame)
    mom = np.einsum("nij,nj->ni", t, moments)
    return mom, t @ cov @ np.transpose(t, (0, 2, 1))


def combine_exposure_moments(
    n_sources: int,
    source_index: np.ndarray,
    moments: np.ndarray,
    cov: np.ndarray,
    good: np.ndarray,
    *,
    usable: np.ndarray | None = None,
    est_flags: np.ndarray | None = None,
    covered: np.ndarray | None = None,
    c_ratio: float = 4.0,
    snr_min: float = 0.0,
    selection_bin_width: float = 2.0,
    noise_bias_correction: bool = True,
) -> dict[str, np.ndarray]:
    """One measurement per source from its exposures' sky-frame moments (see the module docstring).

    FPFS moments are linear in the image, so each source's exposures are averaged at the moment level
    with inverse-variance weights ``a_i = 1 / Var(M00_i)`` (noise and PSF only, no shear response):
    ``x = sum a_i x_i / sum a_i``, ``Cov = sum a_i^2 Cov_i / (sum a_i)^2``. The ratios, the smooth
    S/N selection, the responses and their noise correction are then formed once per source, at the
    combined S/N (:func:`constellation_assets.shear.fpfs.shear_from_moments`). ``good`` (M,) marks the
    stamps that enter; ``usable`` the stamps not rejected by the stamp stage and ``est_flags`` the
    estimator's per-stamp flags (for the per-source FLAGS); ``covered`` (N,) counts the exposures on
    which each source lies. Returns per-source ``e1, e2, r11, r22, r12, r21, weight, snr, m00,
    n_exposures, flags`` (``weight * e1`` and ``weight * r11`` are what the ensemble sums).
    """
    import torch

    from constellation_assets.shear import fpfs

    si = np.asarray(source_index, dtype=np.intp)
    good = np.asarray(good, dtype=bool)
    usable = good if usable is None else np.asarray(usable, dtype=bool)
    var0 = np.asarray(cov[:, 0, 0], dtype=np.float64) if len(si) else np.zeros(0)
    noiseless = np.bincount(si[good], weights=(var0[good] > 0).astype(float), minlength=n_sources) == 0
    # Inverse-variance weights; a source whose stamps are all noiseless gets equal weights.
    with np.errstate(divide="ignore"):
        a = np.where(var0 > 0, 1.0 / np.where(var0 > 0, var0, 1.0), 0.0)
    a = np.where(noiseless[si] & (var0 <= 0), 1.0, a) if len(si) else a
    a = np.where(good, a, 0.0)
    sum_a = np.bincount(si, weights=a, minlength=n_sources).astype(np.float64)
    nm = moments.shape[1]
    # Per-source sums, one bincount per moment / covariance entry (np.add.at is ~10x slower).
    # (np.bincount returns int64 for an empty input: cast.)
    mom_c = np.stack(
        [np.bincount(si, weights=a * moments[:, i], minlength=n_sources) for i in range(nm)], 1
    ).astype(np.float64)
    cov_flat = cov.reshape(len(si), nm * nm)
    cov_c = (
        np.stack(
            [np.bincount(si, weights=a * a * cov_flat[:, k], minlength=n_sources) for k in range(nm * nm)], 1
        )
        .astype(np.float64)
        .reshape(n_sources, nm, nm)
    )
    has = sum_a > 0
    inv = np.where(has, 1.0 / np.where(has, sum_a, 1.0), 0.0)
    mom_c *= inv[:, None]
    cov_c *= (inv * inv)[:, None, None]

    mom_t = torch.from_numpy(mom_c)
    cov_t = torch.from_numpy(cov_c)
    sigma = cov_t[:, 0, 0].clamp_min(0).sqrt()
    shape = fpfs.shear_from_moments(
        mom_t, cov_t, sigma, c_ratio * sigma, snr_min, selection_bin_width, noise_bias_correction
    )
    n_exp = np.bincount(si, weights=good.astype(np.float64), minlength=n_sources).astype(np.int64)
    n_usable = np.bincount(si, weights=usable.astype(np.float64), minlength=n_sources).astype(np.int64)
    n_cov = (
        np.asarray(covered, dtype=np.int64)
        if covered is not None
        else np.bincount(si, minlength=n_sources).astype(np.int64)
    )
    flags = np.zeros(n_sources, dtype=np.int64)
    if est_flags is not None:
        or_flags = np.zeros(n_sources, dtype=np.int64)
        sel = usable & ~good
        np.bitwise_or.at(or_flags, si[sel], np.asarray(est_flags, dtype=np.int64)[sel])
        flags |= np.where((n_usable > 0) & (n_exp == 0), FLAG_NO_GOOD_EXPOSURE | or_flags, 0)
    else:
        flags |= np.where((n_usable > 0) & (n_exp == 0), FLAG_NO_GOOD_EXPOSURE, 0)
    flags |= np.where(n_cov == 0, FLAG_NO_COVERAGE, 0)
    flags |= np.where((n_cov > 0) & (n_usable == 0), FLAG_CENTER_MASKED, 0)
    den = shape["denominator"].numpy()
    flags |= np.where(has & ~(den > 0), fpfs.FLAG_NONPOSITIVE_DENOMINATOR, 0)
    weight = shape["weight"].numpy()
    if snr_min > 0:
        flags |= np.where(has & ~(weight > 0), fpfs.FLAG_BELOW_SNR_MIN, 0)
    ok = has & (flags == 0)
    out = {k: np.where(ok, shape[k].numpy(), 0.0) for k in ("e1", "e2", "r11", "r22", "r12", "r21", "weight")}
    snr = shape["snr"].numpy()
    out["snr"] = np.where(has, snr, 0.0)
    out["m00"] = mom_c[:, 0]
    out["n_exposures"] = n_exp
    out["flags"] = flags.astype(np.int32)
    return out
