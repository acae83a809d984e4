"""PSF model against stars: per-star residuals and the rho statistics (Jarvis et al. 2016, DES SV).

Stars: MER catalog rows with POINT_LIKE_FLAG = 1, SPURIOUS_FLAG = 0, VIS_DET > 0, no saturation / blend
/ shear-reject DET_QUALITY_FLAG bit and detection S/N >= ``snr_min`` (default 50). Every (star, exposure)
is cut from its quadrant by the shear stamp stage (:func:`constellation_assets.shear.stamps.quadrant_stamps`:
background subtracted, masked pixels filled, rejected exposures dropped), and the PSF model at the star is
the quadrant's PSF grid interpolated there (:class:`~constellation_assets.shear.stamps.PsfGrid`).

Moments (the choice matters: VIS is undersampled at 0.1"): the star's centroid and size come from GalSim
HSM adaptive moments (``galsim.hsm.FindAdaptiveMom``); then star and model are measured with the *same*
fixed round Gaussian weight (sigma = :data:`WEIGHT_SCALE` = 2 x the star's HSM sigma) centred on that
centroid, the model first shifted to the centroid in Fourier space. Weighted moments are linear in the
image, and the aliasing difference between a star sampled at sub-pixel phase d and a native model shifted
to d averages to zero over phases; the wide weight keeps the HSM centroid's own aliasing error out of the
sizes. The weighted covariance is then de-weighted (``M = (M_w^-1 - W^-1)^-1``, exact for a Gaussian), so
e and T are close to the profile's own (VIS Airy x Gaussian PSF, noiseless, random phases: mean dT/T -7e-4
and de ~1e-6 with the 2 x sigma weight; -1.9e-2 with 1 x sigma; HSM on both images +1.9 %; an unshifted
model +12 %). Per star at S/N 100: sigma(de) ~0.014, sigma(dT/T) ~0.036. A model sheared by 0.02 (optics,
before the pixel) shows de1 ~0.016, a model dilated by dT/T = 0.02 shows dT/T ~0.014 (the pixel dilutes
both). Ellipticity ``e = (M11 - M22 + 2i M12) / (M11 + M22)`` is turned into the shear convention
``g = e / (1 + sqrt(1 - |e|^2))``; size ``T = M11 + M22`` (arcsec^2). Both are rotated from the detector to
the sky frame (GalSim's (u, v) = (west, north), parity included) with the local WCS.

Residuals follow Jarvis et al. (2016): ``de = e_model - e_star``, ``dT/T = (T_model - T_star) / T_model``,
and with ``e = e_model``:

    rho1 = <de* de>,  rho2 = <e* de>,  rho3 = <(e dT/T)* (e dT/T)>,  rho4 = <de* (e dT/T)>,
    rho5 = <e* (e dT/T)>,

each the real part (xi_+) of the two-point correlation in log-spaced angular bins, by cKDTree pair counting
over pairs of different stars (the same star in two exposures is not a pair: its noise is independent but
its residual would add a zero-lag term). Errors: delete-one jackknife over quadrant exposures (a pair is
dropped when either star lies in the removed quadrant).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "RHO_NAMES",
    "RhoResult",
    "measure_star_residuals",
    "rho_statistics",
    "select_psf_stars",
    "star_moments",
    "tile_psf_rho",
]

#: Weight sigma of the star and model moments in units of the star's HSM sigma (see the module docstring).
WEIGHT_SCALE = 2.0
RHO_NAMES = ("rho1", "rho2", "rho3", "rho4", "rho5")
#: DET_QUALITY_FLAG bits that drop a star: blended (0x2) and the shear-reject bits (saturation 0x4/0x8, ...).
STAR_DET_QUALITY_REJECT = 0x2 | 0x78C


def select_psf_stars(table: Any, snr_min: float = 50.0) -> np.ndarray:
    """Bool mask of the MER catalog rows usable as PSF stars (see the module docstring)."""
    from constellation_assets.io.mer_catalog import _column, selection_snr

    snr = selection_snr(table, "PSF star selection")
    with np.errstate(invalid="ignore"):
        mask = snr >= float(snr_min)
    mask &= np.asarray(_column(table, "POINT_LIKE_FLAG")) == 1
    mask &= np.asarray(_column(table, "SPURIOUS_FLAG")) == 0
    mask &= np.asarray(_column(table, "VIS_DET")) > 0
    mask &= (np.asarray(_column(table, "DET_QUALITY_FLAG")).astype(np.int64) & STAR_DET_QUALITY_REJECT) == 0
    return np.asarray(mask, dtype=bool)


def _fourier_shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``img`` moved by (dx, dy) pixels (x = columns) with a Fourier phase (periodic, exact for band-limited)."""
    h, w = img.shape
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    ft = np.fft.rfft2(img) * np.exp(-2j * math.pi * (kx * dx + ky * dy))
    return np.fft.irfft2(ft, s=(h, w))


def _weighted_moments(img: np.ndarray, cx: float, cy: float, sigma_pix: float) -> tuple[float, float, float]:
    """Distortion (e1, e2) and size T (pix^2) of ``img`` from its moments under a round Gaussian weight.

    The weighted covariance ``M_w`` (second moments / flux under the weight ``W = sigma_pix^2 I`` at
    (cx, cy)) is de-weighted, ``M = (M_w^-1 - W^-1)^-1`` (exact for a Gaussian profile), so e and T are the
    profile's own, not diluted by the weight; ``e = (M11 - M22, 2 M12) / T`` with ``T = M11 + M22``.
    """
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dx, dy = xx - cx, yy - cy
    wi = np.exp(-0.5 * (dx * dx + dy * dy) / sigma_pix**2) * img
    f = wi.sum()
    if not f > 0:
        return math.nan, math.nan, math.nan
    mw = np.array([[(wi * dx * dx).sum(), (wi * dx * dy).sum()], [0.0, (wi * dy * dy).sum()]]) / f
    mw[1, 0] = mw[0, 1]
    try:
        inv = np.linalg.inv(mw) - np.eye(2) / sigma_pix**2
        if np.linalg.eigvalsh(inv).min() <= 0:
            return math.nan, math.nan, math.nan
        m = np.linalg.inv(inv)
    except np.linalg.LinAlgError:
        return math.nan, math.nan, math.nan
    tr = m[0, 0] + m[1, 1]
    return (m[0, 0] - m[1, 1]) / tr, 2.0 * m[0, 1] / tr, tr


def _to_shear(e1: np.ndarray, e2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distortion -> shear convention: g = e / (1 + sqrt(1 - |e|^2))."""
    den = 1.0 + np.sqrt(np.clip(1.0 - e1 * e1 - e2 * e2, 0.0, None))
    return e1 / den, e2 / den


def star_moments(
    star: np.ndarray,
    model: np.ndarray,
    pixel_scale_arcsec: float = 0.1,
    weight_scale: float = WEIGHT_SCALE,
) -> dict[str, float] | None:
    """Moments of one star stamp and the PSF model stamp (centred on ``(H//2, W//2)``) at the star.

    Returns shear-convention ``g1_star, g2_star, g1_model, g2_model`` and ``T_star, T_model`` (arcsec^2), the
    centroid offset ``dx, dy`` (pixels from the stamp centre) and ``sigma_pix``; ``None`` when HSM fails.
    """
    import galsim

    star = np.asarray(star, dtype=np.float64)
    h, w = star.shape
    try:
        res = galsim.hsm.FindAdaptiveMom(galsim.Image(star, scale=1.0), strict=True)
    except galsim.errors.GalSimHSMError:
        return None
    cx, cy = res.moments_centroid.x - 1.0, res.moments_centroid.y - 1.0  # GalSim images are 1-based
    sig = float(res.moments_sigma)  # pixels
    dx, dy = cx - w // 2, cy - h // 2
    if not (sig > 0 and abs(dx) < 2 and abs(dy) < 2):
        return None
    shifted = _fourier_shift(np.asarray(model, dtype=np.float64), dx, dy)
    es1, es2, ts = _weighted_moments(star, cx, cy, weight_scale * sig)
    em1, em2, tm = _weighted_moments(shifted, cx, cy, weight_scale * sig)
    if not all(math.isfinite(v) for v in (es1, es2, ts, em1, em2, tm)):
        return None
    gs1, gs2 = _to_shear(np.array(es1), np.array(es2))
    gm1, gm2 = _to_shear(np.array(em1), np.array(em2))
    p2 = pixel_scale_arcsec**2
    return {
        "g1_star": float(gs1), "g2_star": float(gs2), "g1_model": float(gm1), "g2_model": float(gm2),
        "T_star": ts * p2, "T_model": tm * p2, "dx": dx, "dy": dy, "sigma_pix": sig,
    }  # fmt: skip


_RESIDUAL_COLUMNS = (
    "object_id", "ra_deg", "dec_deg", "patch", "g1_star", "g2_star", "g1_model", "g2_model", "T_star",
    "T_model", "masked_fraction",
)  # fmt: skip


def measure_star_residuals(
    quadrant_entries: Sequence[Mapping[str, Any]],
    stars: Any,
    *,
    stamp_size_pix: int = 32,
    max_masked_fraction: float = 0.05,
    storage_options: Callable[[str], dict | None] | dict | None = None,
    reader: Callable[[Mapping[str, Any], dict | None], Any] | None = None,
) -> dict[str, np.ndarray]:
    """Star and model moments for every (star, quadrant exposure) of ``quadrant_entries``.

    ``quadrant_entries``: manifest quadrant entries (a manifest's ``quadrants``, or
    ``prepare._quadrant_entry`` of quadrant index rows); ``stars``: a
    :class:`~constellation_assets.shear.stamps.SourceList`. Columns of the result: ``object_id, ra_deg,
    dec_deg, patch`` (index of the quadrant entry), ``g1/g2_star``, ``g1/g2_model`` (sky frame, shear
    convention), ``T_star, T_model`` (arcsec^2) and the stamp's ``masked_fraction``. A star-exposure is
    left out when the stamp stage rejects it, when more than ``max_masked_fraction`` of its stamp is
    masked (quadrant edge, cosmic rays: the point-symmetric fill is exact only for a symmetric PSF) or when
    its moments fail.
    """
    from constellation_assets.shear.stamps import (
        iter_manifest_stamps,
        sky_frame_transform,
    )

    rows: dict[str, list] = {k: [] for k in _RESIDUAL_COLUMNS}
    if len(stars) == 0:
        return {k: np.asarray(v) for k, v in rows.items()}
    for patch, entry in enumerate(quadrant_entries):
        stamps_iter = iter_manifest_stamps(
            {"quadrants": [entry]}, stars, stamp_size_pix, storage_options, reader=reader
        )
        for st in stamps_iter:
            frame = sky_frame_transform(st.jacobian)
            scale = frame["scale_arcsec"]
            for k in range(len(st)):
                if st.reject[k] or st.masked_fraction[k] > max_masked_fraction:
                    continue
                m = star_moments(st.images[k], st.psf[k], float(scale[k]))
                if m is None:
                    continue
                c2, s2 = math.cos(2 * frame["theta"][k]), math.sin(2 * frame["theta"][k])
                par = frame["parity"][k]
                for who in ("star", "model"):
                    g1, g2 = m[f"g1_{who}"], par * m[f"g2_{who}"]
                    rows[f"g1_{who}"].append(c2 * g1 - s2 * g2)
                    rows[f"g2_{who}"].append(s2 * g1 + c2 * g2)
                i = int(st.source_index[k])
                rows["object_id"].append(int(stars.object_id[i]))
                rows["ra_deg"].append(float(stars.ra_deg[i]))
                rows["dec_deg"].append(float(stars.dec_deg[i]))
                rows["patch"].append(patch)
                rows["T_star"].append(m["T_star"])
                rows["T_model"].append(m["T_model"])
                rows["masked_fraction"].append(float(st.masked_fraction[k]))
    out = {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}
    out["object_id"] = out["object_id"].astype(np.int64)
    out["patch"] = out["patch"].astype(np.int64)
    return out


@dataclasses.dataclass
class RhoResult:
    """rho1..rho5 (xi_+) per angular bin with jackknife errors, and the mean residuals."""

    theta_arcsec: list[float]  # pair-weighted mean separation per bin
    bin_edges_arcsec: list[float]
    n_pairs: list[int]
    rho: dict[str, list[float]]
    rho_err: dict[str, list[float]]
    mean_de1: float
    mean_de1_err: float
    mean_de2: float
    mean_de2_err: float
    mean_dT_over_T: float
    mean_dT_over_T_err: float
    mean_g1_model: float
    mean_g2_model: float
    mean_T_model_arcsec2: float
    n_measurements: int
    n_stars: int
    n_patches: int
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _jackknife_err(values: np.ndarray) -> np.ndarray:
    """Delete-one jackknife error along axis 0 (NaN rows, e.g. an emptied bin, are ignored)."""
    ok = np.isfinite(values)
    n = ok.sum(axis=0)
    mean = np.where(n > 0, np.where(ok, values, 0.0).sum(axis=0) / np.where(n > 0, n, 1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (n - 1) / np.where(n > 0, n, 1) * np.where(ok, (values - mean) ** 2, 0.0).sum(axis=0)
        return np.where(n > 1, np.sqrt(var), np.nan)


def rho_statistics(
    res: Mapping[str, np.ndarray],
    *,
    min_sep_arcsec: float = 2.0,
    max_sep_arcsec: float = 600.0,
    n_bins: int = 8,
) -> RhoResult:
    """rho1..rho5 of star residuals from :func:`measure_star_residuals` (see the module docstring)."""
    from scipy.spatial import cKDTree

    if not (0 < min_sep_arcsec < max_sep_arcsec and n_bins >= 1):
        raise ValueError(
            f"need 0 < min_sep_arcsec < max_sep_arcsec and n_bins >= 1; got {min_sep_arcsec}, {max_sep_arcsec}, {n_bins}"
        )
    n = len(res["object_id"])
    if n < 2:
        raise ValueError(
            f"{n} star measurement(s): rho statistics need stars in at least two places; lower snr_min or use a larger field"
        )
    e = res["g1_model"] + 1j * res["g2_model"]
    de = (res["g1_model"] - res["g1_star"]) + 1j * (res["g2_model"] - res["g2_star"])
    dt = (res["T_model"] - res["T_star"]) / res["T_model"]
    q = e * dt
    pairs_of = {"rho1": (de, de), "rho2": (e, de), "rho3": (q, q), "rho4": (de, q), "rho5": (e, q)}
    patch = np.unique(res["patch"], return_inverse=True)[1]
    n_p = int(patch.max()) + 1

    dec0 = float(np.mean(res["dec_deg"]))
    ra0 = float(np.angle(np.mean(np.exp(1j * np.radians(res["ra_deg"])))) * 180.0 / math.pi)
    x = ((res["ra_deg"] - ra0 + 180.0) % 360.0 - 180.0) * math.cos(math.radians(dec0)) * 3600.0
    y = (res["dec_deg"] - dec0) * 3600.0
    tree = cKDTree(np.column_stack([x, y]))
    ij = tree.query_pairs(max_sep_arcsec, output_type="ndarray")
    i, j = (ij[:, 0], ij[:, 1]) if len(ij) else (np.zeros(0, int), np.zeros(0, int))
    sep = np.hypot(x[i] - x[j], y[i] - y[j])
    edges = np.geomspace(min_sep_arcsec, max_sep_arcsec, n_bins + 1)
    b = np.searchsorted(edges, sep, side="right") - 1
    keep = (b >= 0) & (b < n_bins) & (res["object_id"][i] != res["object_id"][j])
    i, j, b, sep = i[keep], j[keep], b[keep], sep[keep]
    pi, pj = patch[i], patch[j]
    both = pi == pj

    def binned(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tot = np.bincount(b, weights=v, minlength=n_bins)
        per = np.zeros((n_p, n_bins))
        np.add.at(per, (pi, b), v)
        np.add.at(per, (pj[~both], b[~both]), v[~both])
        return tot, per

    npairs, npairs_p = binned(np.ones(len(b)))
    theta = binned(sep)[0] / np.where(npairs > 0, npairs, 1)
    rho, rho_err = {}, {}
    for name, (a, c) in pairs_of.items():
        v = 0.5 * (a[i] * np.conj(c[j]) + a[j] * np.conj(c[i])).real
        tot, per = binned(v)
        with np.errstate(invalid="ignore", divide="ignore"):
            full = np.where(npairs > 0, tot / npairs, np.nan)
            jk = (tot[None] - per) / (npairs[None] - npairs_p)
        jk[~np.isfinite(jk)] = np.nan
        rho[name] = [float(v) for v in full]
        rho_err[name] = [float(v) for v in _jackknife_err(jk)]

    def mean_jk(v: np.ndarray) -> tuple[float, float]:
        s = np.bincount(patch, weights=v, minlength=n_p)
        c = np.bincount(patch, minlength=n_p).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            jk = (s.sum() - s) / (c.sum() - c)
        err = float(_jackknife_err(jk[:, None])[0]) if n_p > 1 else math.nan
        return float(v.mean()), err

    d1, d2, dtm = mean_jk(de.real), mean_jk(de.imag), mean_jk(dt)
    return RhoResult(
        theta_arcsec=[float(t) for t in theta],
        bin_edges_arcsec=[float(v) for v in edges],
        n_pairs=[int(v) for v in npairs],
        rho=rho,
        rho_err=rho_err,
        mean_de1=d1[0],
        mean_de1_err=d1[1],
        mean_de2=d2[0],
        mean_de2_err=d2[1],
        mean_dT_over_T=dtm[0],
        mean_dT_over_T_err=dtm[1],
        mean_g1_model=float(e.real.mean()),
        mean_g2_model=float(e.imag.mean()),
        mean_T_model_arcsec2=float(res["T_model"].mean()),
        n_measurements=n,
        n_stars=int(len(np.unique(res["object_id"]))),
        n_patches=n_p,
        config={"min_sep_arcsec": min_sep_arcsec, "max_sep_arcsec": max_sep_arcsec, "n_bins": n_bins},
    )


def _tile_quadrant_entries(cfg, tile_id: int) -> list[dict]:
    """Quadrant entries of every exposure overlapping the tile's extended area (prepare's quadrant index)."""
    from constellation_assets.io.q1 import build_quadrant_index, discover_vis_exposures, quadrants_overlapping
    from constellation_assets.prepare import _quadrant_entry, quadrant_index_cache_uri
    from constellation_assets.sky.tiles import mer_tile

    tc = cfg.tiling
    tile = mer_tile(int(tile_id), tc.tile_core_arcmin, tc.tile_extended_arcmin)
    vis_so = cfg.storage_options(cfg.data.vis_base_uri)
    exposures = discover_vis_exposures(
        cfg.data.vis_base_uri,
        storage_options=vis_so,
        include_short_exposures=cfg.data.include_short_exposures,
    )
    index = build_quadrant_index(
        exposures,
        cache_uri=quadrant_index_cache_uri(cfg),
        storage_options=vis_so,
        cache_storage_options=cfg.storage_options(cfg.output.root_uri),
        overlap_box=tile.extended,
    )
    return [_quadrant_entry(r) for r in quadrants_overlapping(index, tile.extended).to_pylist()]


def tile_psf_rho(
    cfg,
    tile_id: int,
    *,
    snr_min: float = 50.0,
    stamp_size_pix: int = 32,
    max_masked_fraction: float = 0.05,
    min_sep_arcsec: float = 2.0,
    max_sep_arcsec: float = 600.0,
    n_bins: int = 8,
) -> tuple[RhoResult, dict[str, np.ndarray]]:
    """rho statistics of one tile: its MER catalog's PSF stars in every quadrant exposure covering it.

    Returns the :class:`RhoResult` and the per-measurement residual table.
    """
    from constellation_assets.io.mer_catalog import read_mer_catalog
    from constellation_assets.io.q1 import discover_mer_catalog
    from constellation_assets.shear.stamps import SourceList

    cat_uri = discover_mer_catalog(
        cfg.data.catalog_base_uri, int(tile_id), cfg.storage_options(cfg.data.catalog_base_uri)
    )
    table = read_mer_catalog(cat_uri, cfg.storage_options(cat_uri))
    sel = select_psf_stars(table, snr_min)
    stars = SourceList(
        table.column("OBJECT_ID").to_numpy()[sel].astype(np.int64),
        table.column("RIGHT_ASCENSION").to_numpy()[sel].astype(np.float64),
        table.column("DECLINATION").to_numpy()[sel].astype(np.float64),
    )
    if len(stars) < 2:
        raise ValueError(
            f"tile {tile_id}: {len(stars)} PSF star(s) with S/N >= {snr_min} in {cat_uri}; lower --snr-min "
            "or use a tile with more stars"
        )
    entries = _tile_quadrant_entries(cfg, int(tile_id))
    res = measure_star_residuals(
        entries,
        stars,
        stamp_size_pix=stamp_size_pix,
        max_masked_fraction=max_masked_fraction,
        storage_options=cfg.storage_options,
    )
    rho = rho_statistics(res, min_sep_arcsec=min_sep_arcsec, max_sep_arcsec=max_sep_arcsec, n_bins=n_bins)
    rho.config.update(
        {"tile_id": int(tile_id), "snr_min": snr_min, "catalog": cat_uri, "n_catalog_stars": len(stars)}
    )
    return rho, res
