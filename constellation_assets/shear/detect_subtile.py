"""Shear catalog of a sub-tile from detection on the exposures (``shear.detection: pixels``).

The default path (``shear.detection: catalog``) measures stamps at the MER catalog's positions, so which
objects exist, where their centres are and which blends are merged come from a catalog made on the sheared
sky, with no response for it. Here the sources are found by :func:`constellation_assets.shear.detect.detect_exposures`
on the exposures themselves, with their detection and selection responses, and MER serves only to name them
(ids) and for the star prior:

1. **Lattice.** Detections are pixels of one lattice per MER tile: 0.1" pixels in the tile's tangent plane
   (gnomonic about the tile centre, ``u = -xi`` west, ``v = eta`` north), pixel ``(I, J)`` centred on
   ``u = (I + 1/2) h - E/2``, ``v = (J + 1/2) h - E/2`` (``E`` the tile's extended side). Neighbouring
   sub-tiles of a tile therefore evaluate the same lattice pixels.
2. **Blocks.** A sub-tile evaluates its core cell grown by a band (``detection_band_arcsec``) in square
   blocks of ``detection_block_pix`` lattice pixels (plus the peak neighbourhood as padding). For every
   manifest quadrant overlapping a block: the cut-out of background-subtracted, flux-scaled pixels
   (microJy) that covers the block with 5 kernel sigmas of margin (zero and marked off-detector beyond the
   quadrant, so its content does not depend on where the block ends), its FLG/RMS mask (masked pixels
   zeroed, never interpolated; see ``detect_exposures``), the quadrant's noise level (median RMS), the PSF
   model at the block centre (with the stamp path's power-law wings when it is truncated), the local
   Jacobian ``d(u, v)/d(x, y)`` of the exposure's WCS composed with the tangent projection, and the
   exposure position of the block's first lattice pixel. The PSF at the block centre is exact to first
   order for a linear PSF gradient across the block (the errors cancel), not for its curvature.
3. **Frame.** The responses come out in the lattice frame; they are rotated (spin 2) to the local
   (west, north) frame at the block centre, the catalog's frame (tangent-plane north differs from local
   north by ~xi tan(dec): 8e-3 rad at 16' and dec 60 deg).
4. **Names and ownership.** Each detection is named after the nearest MER object within
   ``detection_match_radius_arcsec`` (any MER row of the manifest's catalogs); one matched to a
   POINT_LIKE object is dropped (the star prior: a star has e ~ 0 and R > 0, it dilutes R). A detection
   is kept by the sub-tile that owns its MER object's position (sub-tile core cell and
   ``tile_id_at``), an unmatched one by the sub-tile owning its own position: so each lattice pixel is
   counted once across sub-tiles and tiles, and an object's plateau pixels stay together.
5. **Rows.** Per MER object the plateau pixels are summed: ``WEIGHT = sum w``, ``E = sum w e / sum w``,
   ``R = sum R_pix / sum w`` (so ``sum WEIGHT E / sum WEIGHT R`` over rows equals the detection ensemble
   exactly). Unmatched detections are grouped into 8-connected lattice components, one row each, with
   ``FLAGS`` bit :data:`FLAG_NO_CATALOG_MATCH` and a negative ``OBJECT_ID`` derived from the tile and
   the component's first lattice pixel. Every row is ``IN_CORE``.

Memory: the cut-outs of all blocks of a sub-tile (its core area times the exposures per position, as
float32 + a byte mask), then one block's moment images at a time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from constellation_assets import euclid
from constellation_assets.shear import stamps as st

__all__ = ["FLAG_NO_CATALOG_MATCH", "DetectionLattice", "measure_manifest_detected", "subtile_lattice"]

#: FLAGS bit of a row made of detections that no MER object lies near (kept: they carry weight and response).
FLAG_NO_CATALOG_MATCH = 16

#: Noise correlations are computed on a grid of this many pixels (``detect_exposures(noise_grid_pix=)``).
_NOISE_GRID_PIX = 64


@dataclasses.dataclass(frozen=True)
class DetectionLattice:
    """The lattice pixels ``[i0, i1) x [j0, j1)`` a sub-tile evaluates, and its tile's geometry."""

    tile_id: int
    tile_ra_deg: float
    tile_dec_deg: float
    pixel_arcsec: float
    half_arcsec: float  # E / 2
    i0: int
    i1: int
    j0: int
    j1: int
    #: the sub-tile core cell (xi_min, xi_max, eta_min, eta_max), deg
    core_tangent_deg: tuple[float, float, float, float]
    row: int
    col: int

    def uv(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tangent-plane (u west, v north) arcsec of lattice pixel centres."""
        h = self.pixel_arcsec
        return (np.asarray(i) + 0.5) * h - self.half_arcsec, (np.asarray(j) + 0.5) * h - self.half_arcsec

    def radec(self, u_arcsec: np.ndarray, v_arcsec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from constellation_assets.sky.tiles import tangent_to_radec

        ra, dec = tangent_to_radec(
            -np.asarray(u_arcsec, dtype=np.float64) / 3600.0,
            np.asarray(v_arcsec, dtype=np.float64) / 3600.0,
            self.tile_ra_deg,
            self.tile_dec_deg,
        )
        return np.atleast_1d(ra), np.atleast_1d(dec)

    def owns(self, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
        """Positions this sub-tile owns: inside its core cell (half-open) and owned by its tile."""
        from constellation_assets.sky.tiles import radec_to_tangent, tile_id_at

        ra = np.atleast_1d(np.asarray(ra_deg, dtype=np.float64))
        dec = np.atleast_1d(np.asarray(dec_deg, dtype=np.float64))
        if not len(ra):
            return np.zeros(0, bool)
        xi, eta = radec_to_tangent(ra, dec, self.tile_ra_deg, self.tile_dec_deg)
        x0, x1, y0, y1 = self.core_tangent_deg
        inside = (np.atleast_1d(xi) >= x0) & (np.atleast_1d(xi) < x1) & (np.atleast_1d(eta) >= y0)
        inside &= np.atleast_1d(eta) < y1
        return inside & (np.asarray(tile_id_at(ra, dec)) == self.tile_id)


def subtile_lattice(cfg, manifest: Mapping[str, Any]) -> DetectionLattice:
    """The lattice range a sub-tile evaluates: its core cell grown by ``shear.detection_band_arcsec``."""
    from constellation_assets.sky.subtiles import subtile_grid
    from constellation_assets.sky.tiles import mer_tile

    t = cfg.tiling
    tile = mer_tile(int(manifest["tile_id"]), t.tile_core_arcmin, t.tile_extended_arcmin)
    rows, cols = (int(v) for v in t.sub_tile_grid)
    row, col = int(manifest["sub_tile_row"]), int(manifest["sub_tile_col"])
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(
            f"manifest sub-tile ({row}, {col}) is outside the configured grid {rows} x {cols} "
            "(tiling.sub_tile_grid): run with the config the manifests were prepared with"
        )
    sub = subtile_grid(tile, (rows, cols), t.sub_tile_margin_arcmin)[row * cols + col]
    h = euclid.VIS_PIXEL_SCALE_ARCSEC
    half = tile.extended_arcmin * 30.0
    band = float(cfg.shear.detection_band_arcsec)
    x0, x1, y0, y1 = (3600.0 * v for v in sub.core_tangent_deg)
    u_lo, u_hi = -x1 - band, -x0 + band
    v_lo, v_hi = y0 - band, y1 + band
    return DetectionLattice(
        tile_id=tile.tile_id,
        tile_ra_deg=tile.ra_deg,
        tile_dec_deg=tile.dec_deg,
        pixel_arcsec=h,
        half_arcsec=half,
        i0=int(math.floor((u_lo + half) / h - 0.5)),
        i1=int(math.ceil((u_hi + half) / h - 0.5)) + 1,
        j0=int(math.floor((v_lo + half) / h - 0.5)),
        j1=int(math.ceil((v_hi + half) / h - 0.5)) + 1,
        core_tangent_deg=sub.core_tangent_deg,
        row=row,
        col=col,
    )


# --------------------------------------------------------------------------------------------------
# Blocks and the exposures' cut-outs


@dataclasses.dataclass
class _Block:
    i0: int  # lattice pixel of grid pixel (0, 0)
    j0: int
    n: int  # grid side (interior + 2 pad)
    pad: int
    exposures: list = dataclasses.field(default_factory=list)  # detect.GridExposure
    frame_rotation: float | None = None  # lattice frame -> local (west, north), radians


def _blocks(lat: DetectionLattice, block_pix: int, pad: int) -> list[_Block]:
    out = []
    for j in range(lat.j0, lat.j1, block_pix):
        for i in range(lat.i0, lat.i1, block_pix):
            n_i = min(block_pix, lat.i1 - i)
            n_j = min(block_pix, lat.j1 - j)
            n = max(n_i, n_j) + 2 * pad
            out.append(_Block(i - pad, j - pad, n, pad))
    return out


def _tangent_jacobian(wcs, lat: DetectionLattice, x: float, y: float, step: float = 0.5) -> np.ndarray:
    """``d(u, v)/d(x, y)`` (arcsec / pixel) of the exposure pixels to the lattice's tangent plane."""
    from constellation_assets.sky.tiles import radec_to_tangent

    px = np.array([x + step, x - step, x, x])
    py = np.array([y, y, y + step, y - step])
    ra, dec = wcs.all_pix2world(px, py, 0)
    xi, eta = radec_to_tangent(ra, dec, lat.tile_ra_deg, lat.tile_dec_deg)
    u, v = -np.asarray(xi) * 3600.0, np.asarray(eta) * 3600.0
    return np.array([[u[0] - u[1], u[2] - u[3]], [v[0] - v[1], v[2] - v[3]]], dtype=np.float64) / (2.0 * step)


def _rotation_angle(a: np.ndarray) -> float:
    """Rotation angle (radians) of the near-rotation 2x2 map ``a``."""
    return math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1])


def _quadrant_noise_and_pixels(quad: st.QuadrantImages):
    """Background-subtracted microJy image, its mask and its noise level (microJy): the median RMS of the
    unmasked pixels. One level per quadrant (the noise model of the detection is stationary; VIS
    background noise varies little across a quadrant), so a block's noise does not depend on where
    blocks end."""
    scale = st.flux_scale_ujy_per_adu(quad.header)
    sci = np.asarray(quad.sci, dtype=np.float32)
    if quad.bkg is not None:
        sci = sci - np.asarray(quad.bkg, dtype=np.float32)
    mask = ~np.isfinite(sci)
    if quad.flg is not None:
        mask |= (np.asarray(quad.flg).astype(np.int64) & st.FLG_MASK_BITS) != 0
    if quad.rms is not None:
        noise = np.asarray(quad.rms, dtype=np.float32)
    elif quad.wgt is not None:
        w = np.asarray(quad.wgt, dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            noise = np.where(w > 0, 1.0 / np.sqrt(w), np.nan).astype(np.float32)
    else:
        raise ValueError(f"quadrant {quad.key} has neither an RMS nor a WGT map: cannot estimate the noise")
    mask |= ~(np.isfinite(noise) & (noise > 0))
    sci = np.where(mask, 0.0, sci).astype(np.float32) * np.float32(scale)
    good = noise[~mask]
    sigma = float(np.median(good)) * scale if good.size else math.nan
    return sci, mask, sigma


def _add_quadrant(
    blocks: list[_Block], lat: DetectionLattice, quad: st.QuadrantImages, sigma_arcsec: float, psf_size: int
) -> None:
    """Cut this quadrant's region of every block it overlaps (appended to the block's exposures).

    A cut-out extends 5 kernel sigmas + 4 pixels beyond the block (``detect_exposures`` uses moments
    3 sigmas + 2 pixels inside a cut-out's edges, the transforms being cyclic: 5 sigmas keep the light a
    kernel misses or wraps around below 1e-5), to an FFT-friendly size; beyond the quadrant it is zero
    and marked ``outside`` (treated like an edge).
    """
    from constellation_assets.shear import detect

    wcs = quad.get_wcs()
    ny, nx = quad.sci.shape
    h = lat.pixel_arcsec
    prepared = None
    if not blocks:
        return
    from constellation_assets.sky.tiles import radec_to_tangent

    # Blocks near the quadrant's footprint (its corners in the lattice's plane, grown by a block and the
    # kernel's margin), then their centres in this quadrant's pixels, all at once.
    half_n = np.array([0.5 * (b.n - 1) for b in blocks])
    u_all, v_all = lat.uv(
        np.array([b.i0 for b in blocks]) + half_n, np.array([b.j0 for b in blocks]) + half_n
    )
    cra, cdec = wcs.all_pix2world(
        np.array([0.0, nx - 1.0, 0.0, nx - 1.0]), np.array([0.0, 0.0, ny - 1.0, ny - 1.0]), 0
    )
    cxi, ceta = radec_to_tangent(cra, cdec, lat.tile_ra_deg, lat.tile_dec_deg)
    cu, cv = -np.asarray(cxi) * 3600.0, np.asarray(ceta) * 3600.0
    grow = half_n * h * 1.5 + 5.0 * sigma_arcsec + 2.0
    near = (u_all >= cu.min() - grow) & (u_all <= cu.max() + grow) & (v_all >= cv.min() - grow)
    near &= v_all <= cv.max() + grow
    idx = np.nonzero(near)[0]
    if not len(idx):
        return
    ra_all, dec_all = lat.radec(u_all[idx], v_all[idx])
    xs, ys = (
        np.asarray(v, dtype=np.float64).reshape(-1) for v in wcs.all_world2pix(ra_all, dec_all, 0, quiet=True)
    )
    for k, x_c, y_c in zip(idx, xs, ys, strict=True):
        b, c = blocks[k], half_n[k]
        x_c, y_c = float(x_c), float(y_c)
        if not (math.isfinite(x_c) and math.isfinite(y_c)):
            continue
        jac = _tangent_jacobian(wcs, lat, x_c, y_c)
        jinv = np.linalg.inv(jac)
        margin_pix = int(math.ceil(5.0 * sigma_arcsec / math.sqrt(abs(np.linalg.det(jac))))) + 4
        corners = np.array([[0, 0], [b.n - 1, 0], [0, b.n - 1], [b.n - 1, b.n - 1]], dtype=np.float64) - c
        pix = np.array([x_c, y_c]) + (jinv @ (corners.T * h)).T
        x_lo = int(math.floor(pix[:, 0].min())) - margin_pix
        x_hi = int(math.ceil(pix[:, 0].max())) + margin_pix + 1
        y_lo = int(math.floor(pix[:, 1].min())) - margin_pix
        y_hi = int(math.ceil(pix[:, 1].max())) + margin_pix + 1
        # FFT-friendly sizes, at least the PSF model's.
        x_hi = x_lo + _fft_size(max(x_hi - x_lo, psf_size))
        y_hi = y_lo + _fft_size(max(y_hi - y_lo, psf_size))
        cx_lo, cy_lo, cx_hi, cy_hi = max(x_lo, 0), max(y_lo, 0), min(x_hi, nx), min(y_hi, ny)
        if cx_hi - cx_lo <= 2 * margin_pix + 2 or cy_hi - cy_lo <= 2 * margin_pix + 2:
            continue  # no pixel of the block is measurable on this quadrant
        if prepared is None:
            prepared = _quadrant_noise_and_pixels(quad)
        sci, mask, sigma = prepared
        if not sigma > 0:
            break  # nothing unmasked on this quadrant
        # The whole cut-out, zero beyond the quadrant (``outside``): its content does not depend on where
        # the block ends, so neither do the moments the cyclic transforms give near the quadrant's edge.
        cut = np.zeros((y_hi - y_lo, x_hi - x_lo), dtype=np.float32)
        cut_mask = np.zeros(cut.shape, dtype=bool)
        outside = np.ones(cut.shape, dtype=bool)
        inner = (slice(cy_lo - y_lo, cy_hi - y_lo), slice(cx_lo - x_lo, cx_hi - x_lo))
        cut[inner] = sci[cy_lo:cy_hi, cx_lo:cx_hi]
        cut_mask[inner] = mask[cy_lo:cy_hi, cx_lo:cx_hi]
        outside[inner] = False
        psf = _psf_with_wings(quad.psf.at(np.array([x_c]), np.array([y_c]), psf_size)[0])
        if psf is None:
            continue  # no usable PSF model here: the block is measured on the other exposures
        origin = np.array([x_c, y_c]) - jinv @ (np.array([c, c]) * h) - np.array([x_lo, y_lo])
        b.exposures.append(
            detect.GridExposure(
                image=np.ascontiguousarray(cut),
                psf=psf,
                noise_sigma=sigma,
                jacobian=jac,
                origin_pix=(float(origin[0]), float(origin[1])),
                mask=cut_mask if cut_mask.any() else None,
                outside=outside if outside.any() else None,
            )
        )
        if b.frame_rotation is None:
            local = st.local_jacobian(wcs, np.array([x_c]), np.array([y_c]))[0]
            b.frame_rotation = _rotation_angle(local @ jinv)


def _fft_size(n: int) -> int:
    """The smallest integer >= n whose prime factors are 2, 3 and 5 (fast transforms)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _psf_with_wings(psf: np.ndarray) -> np.ndarray | None:
    """The PSF model with the estimator's treatment of truncation (:func:`fpfs.extend_psf_wings`: a model
    cut at a box smaller than the stamp gets a fitted power-law wing out to the stamp's edges, as the stamp
    path does); None for an unusable (non-positive) model."""
    import torch

    from constellation_assets.shear import fpfs

    if not (np.isfinite(psf).all() and float(psf.sum()) > 0):
        return None
    psf_t = torch.as_tensor(np.asarray(psf, dtype=np.float64))[None]
    ny, nx = psf.shape
    support = fpfs.psf_support_half_size(psf_t)
    if 0 < support < min(ny // 2, nx // 2) - 1 and support >= 2 * fpfs.WING_RING_PIX:
        psf_t = fpfs.extend_psf_wings(psf_t, support)[0]
    return psf_t[0].numpy()


def _rotate_spin2(res: dict[str, np.ndarray], theta: float) -> None:
    """Rotate ``phi`` and the response matrix of detections by the frame rotation ``theta`` (in place):
    ``phi' = Q phi``, ``R' = Q R Q^T`` with ``Q`` the rotation by ``2 theta``."""
    if theta == 0.0 or not len(res["x"]):
        return
    c, s = math.cos(2.0 * theta), math.sin(2.0 * theta)
    q = np.array([[c, -s], [s, c]])
    phi = q @ np.stack([res["phi1"], res["phi2"]])
    e = q @ np.stack([res["e1"], res["e2"]])
    r = np.stack([[res["r11"], res["r12"]], [res["r21"], res["r22"]]])  # (2, 2, n)
    r = np.einsum("ab,bcn,dc->adn", q, r, q)
    res["phi1"], res["phi2"] = phi
    res["e1"], res["e2"] = e
    res["r11"], res["r12"], res["r21"], res["r22"] = r[0, 0], r[0, 1], r[1, 0], r[1, 1]


# --------------------------------------------------------------------------------------------------
# MER names and the star prior


def _mer_objects(
    manifest: Mapping[str, Any], storage_options: Callable[[str], dict], cache: dict | None = None
):
    """OBJECT_ID, RA, Dec and POINT_LIKE_FLAG of every row of the manifest's MER catalogs (deduplicated).

    ``cache``: catalogs already read, by URI (the sub-tiles of a tile share them)."""
    from constellation_assets.io.mer_catalog import read_mer_catalog

    uris = list(dict.fromkeys([manifest.get("source_catalog"), *(manifest.get("source_catalogs") or [])]))
    cols = ["OBJECT_ID", "RIGHT_ASCENSION", "DECLINATION", "POINT_LIKE_FLAG"]
    cache = {} if cache is None else cache
    parts = []
    for uri in (str(u) for u in uris if u):
        if uri not in cache:
            t = read_mer_catalog(uri, storage_options(uri), columns=cols)
            cache[uri] = {c: t.column(c).to_numpy() for c in cols}
        parts.append(cache[uri])
    if not parts:
        raise ValueError(
            "shear.detection: pixels needs the manifest's MER catalog (source_catalog) for ids and the star "
            "prior; re-run `constellation prepare`"
        )
    out = {c: np.concatenate([p[c] for p in parts]) for c in cols}
    _, first = np.unique(out["OBJECT_ID"], return_index=True)
    first = np.sort(first)
    return {c: v[first] for c, v in out.items()}


def _unmatched_ids(tile_id: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Negative ids of unmatched components from the tile and the component's first lattice pixel."""
    return -(np.int64(tile_id) * np.int64(1 << 30) + j.astype(np.int64) * np.int64(1 << 15) + i) - 1


# --------------------------------------------------------------------------------------------------
# The sub-tile


def detection_kwargs(cfg) -> dict[str, Any]:
    """``detect_exposures`` settings from the ``shear`` config section (the estimator's, and the mask reach)."""
    sh = cfg.shear
    return dict(
        sigma_arcsec=float(sh.sigma_arcsec),
        c_ratio=float(sh.c_ratio),
        snr_min=float(sh.estimator_snr_min),
        selection_bin_width=float(sh.selection_bin_width),
        noise_bias_correction=bool(sh.noise_bias_correction),
        mask_radius_sigma=float(sh.detection_mask_radius_sigma),
    )


def measure_manifest_detected(
    cfg,
    manifest: Mapping[str, Any],
    storage_options: Callable[[str], dict] | None = None,
    progress: Callable[[int], None] | None = None,
    mer_cache: dict | None = None,
):
    """Detect and measure a sub-tile (module docstring). Returns ``(table, n_detections)``: a pyarrow table
    with the SOURCE_RESULT_SCHEMA columns, one row per MER object (or unmatched component).
    ``mer_cache``: a dict kept across the sub-tiles of a tile (its MER catalogs are read once)."""
    import pyarrow as pa
    from scipy.spatial import cKDTree

    from constellation_assets.shear import detect
    from constellation_assets.sky.tiles import radec_to_tangent

    opts = storage_options or cfg.storage_options
    lat = subtile_lattice(cfg, manifest)
    kw = detection_kwargs(cfg)
    r_peak = detect.PEAK_RADIUS_PIX_DEFAULT
    pad = r_peak + 1
    block_pix = int(cfg.shear.detection_block_pix)
    blocks = _blocks(lat, block_pix, pad)
    psf_size = int(cfg.shear.stamp_size_pix)

    def load(entry: Mapping[str, Any]) -> st.QuadrantImages:
        o = opts(str(entry.get("sci_path", "")))
        key = st._quadrant_cache_key(entry, o)  # quadrants shared by neighbouring sub-tiles: read once
        quad = st.QUADRANT_CACHE.get(key)
        if quad is None:
            quad = st.read_quadrant_images(entry, o)
            quad.get_wcs()
            st.QUADRANT_CACHE.put(key, quad)
        return quad

    entries = list(manifest.get("quadrants") or [])
    for _, quad, exc in st._loaded_in_order(entries, load):
        if exc is not None:
            raise exc
        _add_quadrant(blocks, lat, quad, kw["sigma_arcsec"], psf_size)
        del quad

    parts = []
    for b in blocks:
        if b.exposures:
            res = detect.detect_exposures(
                b.exposures, (b.n, b.n), lat.pixel_arcsec, noise_grid_pix=_NOISE_GRID_PIX, **kw
            )
            inner = (
                (res["x"] >= b.pad)
                & (res["x"] < b.n - b.pad)
                & (res["y"] >= b.pad)
                & (res["y"] < b.n - b.pad)
            )
            res = {k: v[inner] for k, v in res.items()}
            res["i"] = res["x"] + b.i0
            res["j"] = res["y"] + b.j0
            inside = (res["i"] >= lat.i0) & (res["i"] < lat.i1) & (res["j"] >= lat.j0) & (res["j"] < lat.j1)
            res = {k: v[inside] for k, v in res.items()}
            _rotate_spin2(res, b.frame_rotation or 0.0)
            parts.append(res)
            if progress:
                progress(len(res["i"]))  # the progress bars count stamps; here detections
        b.exposures = []  # release the cut-outs
    keys = ("i", "j", "weight", "snr", "phi1", "phi2", "r11", "r22", "n_exposures")
    det = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in keys}
    n_det = len(det["i"])
    u, v = lat.uv(det["i"], det["j"])
    ra, dec = lat.radec(u, v)

    # Names: the nearest MER object within the match radius (tangent plane of the tile, arcsec).
    mer = _mer_objects(manifest, opts, mer_cache)
    mxi, meta = radec_to_tangent(
        mer["RIGHT_ASCENSION"], mer["DECLINATION"], lat.tile_ra_deg, lat.tile_dec_deg
    )
    mer_uv = np.stack([-np.atleast_1d(mxi) * 3600.0, np.atleast_1d(meta) * 3600.0], axis=1)
    match = np.full(n_det, -1, np.int64)
    if len(mer_uv) and n_det:
        ok = np.all(np.isfinite(mer_uv), axis=1)
        idx_ok = np.nonzero(ok)[0]
        if len(idx_ok):
            dist, nn = cKDTree(mer_uv[idx_ok]).query(
                np.stack([u, v], axis=1), distance_upper_bound=float(cfg.shear.detection_match_radius_arcsec)
            )
            hit = np.isfinite(dist)
            match[hit] = idx_ok[nn[hit]]
    star = np.zeros(n_det, bool)
    star[match >= 0] = np.asarray(mer["POINT_LIKE_FLAG"])[match[match >= 0]] == 1
    owner_ra = np.where(match >= 0, mer["RIGHT_ASCENSION"][np.maximum(match, 0)], ra)
    owner_dec = np.where(match >= 0, mer["DECLINATION"][np.maximum(match, 0)], dec)
    keep = ~star & lat.owns(owner_ra, owner_dec) & (det["weight"] > 0)

    # Rows: matched detections summed per MER object; unmatched ones per 8-connected lattice component.
    group = np.where(match >= 0, match, -1)
    un = np.nonzero(keep & (match < 0))[0]
    if len(un):
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        pairs = cKDTree(np.stack([det["i"][un], det["j"][un]], axis=1).astype(float)).query_pairs(
            1.5, output_type="ndarray"
        )
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(un), len(un)))
        _, lab = connected_components(graph, directed=False)
        group[un] = len(mer["OBJECT_ID"]) + lab
    sel = np.nonzero(keep)[0]
    g_of = group[sel]
    uniq, inv = np.unique(g_of, return_inverse=True)
    n_rows = len(uniq)

    def gsum(x):
        return np.bincount(inv, weights=np.asarray(x, dtype=np.float64)[sel], minlength=n_rows)

    w_sum = gsum(det["weight"])
    with np.errstate(invalid="ignore", divide="ignore"):
        e1, e2 = gsum(det["phi1"]) / w_sum, gsum(det["phi2"]) / w_sum
        r11, r22 = gsum(det["r11"]) / w_sum, gsum(det["r22"]) / w_sum
    snr = np.full(n_rows, -np.inf)
    np.maximum.at(snr, inv, det["snr"][sel])
    n_exp = np.zeros(n_rows, np.int64)
    np.maximum.at(n_exp, inv, det["n_exposures"][sel].astype(np.int64))
    is_mer = uniq < len(mer["OBJECT_ID"])
    oid = np.zeros(n_rows, np.int64)
    row_ra = np.zeros(n_rows)
    row_dec = np.zeros(n_rows)
    oid[is_mer] = np.asarray(mer["OBJECT_ID"], np.int64)[uniq[is_mer]]
    row_ra[is_mer] = mer["RIGHT_ASCENSION"][uniq[is_mer]]
    row_dec[is_mer] = mer["DECLINATION"][uniq[is_mer]]
    if (~is_mer).any():
        # Unmatched: weighted position, id from the component's first lattice pixel.
        ww = np.asarray(det["weight"], np.float64)[sel]
        u_row = np.bincount(inv, weights=ww * u[sel], minlength=n_rows) / w_sum
        v_row = np.bincount(inv, weights=ww * v[sel], minlength=n_rows) / w_sum
        ra_u, dec_u = lat.radec(u_row[~is_mer], v_row[~is_mer])
        row_ra[~is_mer], row_dec[~is_mer] = ra_u, dec_u
        first_k = np.full(n_rows, np.iinfo(np.int64).max)
        lin = det["j"][sel].astype(np.int64) * np.int64(1 << 15) + det["i"][sel].astype(np.int64)
        np.minimum.at(first_k, inv, lin)
        fk = first_k[~is_mer]
        oid[~is_mer] = _unmatched_ids(lat.tile_id, fk % (1 << 15), fk // (1 << 15))
    flags = np.where(is_mer, 0, FLAG_NO_CATALOG_MATCH).astype(np.int32)
    table = pa.table(
        {
            "TILE_ID": pa.array(np.full(n_rows, lat.tile_id, np.int64)),
            "SUBTILE_ROW": pa.array(np.full(n_rows, lat.row, np.int8)),
            "SUBTILE_COL": pa.array(np.full(n_rows, lat.col, np.int8)),
            "OBJECT_ID": pa.array(oid),
            "RA": pa.array(row_ra),
            "DEC": pa.array(row_dec),
            "E1": pa.array(e1.astype(np.float32)),
            "E2": pa.array(e2.astype(np.float32)),
            "R11": pa.array(r11.astype(np.float32)),
            "R22": pa.array(r22.astype(np.float32)),
            "WEIGHT": pa.array(w_sum.astype(np.float32)),
            "SNR": pa.array(snr.astype(np.float32)),
            "N_EXPOSURES": pa.array(n_exp.astype(np.int16)),
            "FLAGS": pa.array(flags),
            "IN_CORE": pa.array(np.ones(n_rows, bool)),
        }
    )
    return table, n_det
