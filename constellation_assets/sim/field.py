"""Synthetic Euclid Q1 field: VIS exposures, PSF files and MER catalogs in the exact Q1 layout.

``simulate_field(cfg)`` writes, below ``cfg.data.vis_base_uri`` and ``cfg.data.catalog_base_uri`` (local or
s3://), the files the pipeline reads from the public Q1 bucket:

``{vis}/{obs_id}/EUC_VIS_SWL-DET-{obs_id:06d}-{dither:02d}-1-0000000__{YYYYMMDDTHHMMSS.ffffff}Z.fits``
    multi-extension FITS, three float32/int32 image HDUs per quadrant named ``"{row}-{col}.{quad}.SCI"``,
    ``.RMS``, ``.FLG`` (quadrants E, F, G, H) in shuffled order; each SCI header holds a TPV WCS, GAIN,
    EXPTIME and MAGZEROP (as a string, like some real headers).
``...-BKG-...`` / ``...-WGT-...``
    background (ADU) and inverse-variance weight maps, one HDU ``"{row}-{col}.{quad}"`` per quadrant.
``EUC_VIS_GRD-PSF-{obs_id:06d}-{dither:02d}-1-0000000__{ts}Z.fits``
    per quadrant a 189 x 189 image: a 9 x 9 grid of 21 x 21 PSF stamps, **oversampled** by
    ``field.psf_oversampling`` (default 3, i.e. 0.0333"/pixel), each the effective PSF (optics + jitter
    convolved with the 0.1" pixel response) at the quadrant position given in the header, summing to 1.
``{catalogs}/{tile_id}/EUC_MER_FINAL-CAT_TILE{tile_id}-{HASH}_{ts}Z_00.00.fits``
    FITS binary table with every column of :data:`constellation_assets.io.mer_catalog.MER_COLUMNS`.
``{q1}/MER/{tile_id}/{VIS|NISP}/EUC_MER_BGSUB-MOSAIC-{VIS|NIR-Y|NIR-J|NIR-H}_TILE{tile_id}-{HASH}_{ts}Z_00.00.fits``
    (``field.write_mer_mosaics``, bands ``field.mer_bands``) background-subtracted mosaics in uJy/pixel
    (MAGZERO 23.9) on the tile's 0.1" TAN grid (CRVAL = tile centre, CRPIX of the full 19200 x 19200 tile shifted
    to the simulated area, which is all they cover), image in the primary HDU; see :func:`render_mer_mosaics`.
    Assumed real layout: one folder per instrument (VIS, NISP) holding one file per band; discovery
    (:func:`constellation_assets.io.q1.discover_mer_mosaics`) reads the band from the file name, so a
    per-band folder layout works too.

Truth (not part of Q1) goes to ``{truth_base}/{tile_id}/``: ``truth_objects.parquet`` (one row per rendered
object) and ``shear_truth.json`` (G1_TRUE, G2_TRUE, model, seed), plus ``field_manifest.json`` that lists
every file written and the config hash; it is written last, so a tile is complete iff it exists.

Physics
- Galaxies: COSMOS F814W parametric fits (single Sersic or bulge + disk, GalSim's COSMOSCatalog recipe),
  packaged in ``constellation_assets/data/cosmos_parametric_f814w.csv``. Magnitudes follow Euclid-like VIS
  number counts (dlog10 N/dm = 0.31); a template is rescaled in size by 10**(-0.1 (m - m_template))
  (fainter galaxies are smaller). Intrinsic shapes and orientations come from the template
  (orientation randomised), then the lensing shear g is applied (no magnification: mu = 1).
- Stars: PSF-only point sources with number counts dlog10 N/dm = 0.1.
- PSF: Airy (lambda/D for 715 nm on a 1.2 m mirror, 30 % obscuration) convolved with a Gaussian (jitter +
  charge diffusion) tuned so the FWHM is ``psf_fwhm_arcsec`` at the focal-plane centre, growing by
  ``psf_fwhm_variation`` to the corners; the Gaussian carries a focal-plane shear pattern of amplitude
  ``psf_e_amplitude`` plus a small per-exposure jitter shear.
- Detector: sky ``sky_level_adu`` with a 2 % gradient, Poisson noise on electrons (GAIN e-/ADU) plus read
  noise, saturation, cosmic rays (flag bit 4), hot (bit 1) and cold (bit 2) pixels, saturated (bit 3).
- Shear convention: (g1, g2) in GalSim's local world frame (u = west = -RA cos(dec), v = north), which equals
  the detector (x, y) frame at ``position_angle_deg = 0``.

Everything random derives from sha256(seed, ids) (see :func:`rng_for`); re-running gives identical files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from constellation_assets.io.uri import (
    DataAccessError,
    atomic_output,
    atomic_write_bytes,
    get_fs,
    join_uri,
    read_text,
    uri_exists,
)
from constellation_assets.sky.tiles import radec_to_tangent, tangent_to_radec

log = logging.getLogger(__name__)

__all__ = [
    "COSMOS_PARAM_FILE",
    "FieldSummary",
    "QUADRANT_LETTERS",
    "TileFieldSummary",
    "derive_cosmos_param_table",
    "det_file_name",
    "exposure_layout",
    "field_psf",
    "load_cosmos_param_table",
    "psf_fwhm_arcsec_at",
    "rng_for",
    "simulate_field",
    "tile_truth_uri",
]

#: Quadrant letters of a VIS CCD and their position inside the CCD (column, row) in this model:
#: E lower-left, F lower-right, G upper-right, H upper-left.
QUADRANT_LETTERS = ("E", "F", "G", "H")
_QUAD_POS = {"E": (0, 0), "F": (1, 0), "G": (1, 1), "H": (0, 1)}

COSMOS_PARAM_FILE = "cosmos_parametric_f814w.csv"

#: FLG bits (Q1): 0 INVALID, 1 HOT, 2 COLD, 3 SATURATED, 4 COSMIC.
FLAG_INVALID, FLAG_HOT, FLAG_COLD, FLAG_SATURATED, FLAG_COSMIC = (1 << b for b in range(5))

#: Optics: VIS band centre and Euclid primary mirror.
_LAMBDA_M = 715e-9
_DIAMETER_M = 1.2
_OBSCURATION = 0.3
_LAM_OVER_DIAM_ARCSEC = _LAMBDA_M / _DIAMETER_M * 180.0 / math.pi * 3600.0

#: TPV cubic radial distortion coefficient (deg^-2): ~1" at 0.35 deg from the centre, as for VIS.
_TPV_K3 = 6.0e-3

#: MER magnitude zero point for fluxes in microJansky.
_UJY_ZP = 23.9

_PSF_STAMP_PIX = 21
_PSF_GRID = 9


# ----------------------------------------------------------------------------------------------------------
# Determinism


def rng_for(seed: int, *ids: Any) -> np.random.Generator:
    """A PCG64 generator seeded from sha256 of the seed and stable ids (never global RNG state)."""
    key = "|".join(str(x) for x in (seed, *ids)).encode()
    digest = hashlib.sha256(key).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def _hash_hex(seed: int, *ids: Any, n: int = 6) -> str:
    return hashlib.sha256("|".join(str(x) for x in (seed, *ids)).encode()).hexdigest()[:n].upper()


def _timestamp(seed: int, *ids: Any) -> str:
    """Deterministic, distinct per file: Q1 processing dates in autumn 2024 with microseconds."""
    r = rng_for(seed, "timestamp", *ids)
    base = dt.datetime(2024, 9, 20, tzinfo=dt.UTC)
    t = base + dt.timedelta(
        seconds=int(r.integers(0, 40 * 86400)), microseconds=int(r.integers(0, 1_000_000))
    )
    return t.strftime("%Y%m%dT%H%M%S.%f")


def det_file_name(kind: str, obs_id: int, dither: int, ts: str) -> str:
    """Q1 VIS file name; ``kind`` is DET, BKG, WGT or PSF."""
    if kind == "PSF":
        return f"EUC_VIS_GRD-PSF-{obs_id:06d}-{dither:02d}-1-0000000__{ts}Z.fits"
    return f"EUC_VIS_SWL-{kind}-{obs_id:06d}-{dither:02d}-1-0000000__{ts}Z.fits"


def mer_file_name(tile_id: int, hash6: str, ts: str) -> str:
    return f"EUC_MER_FINAL-CAT_TILE{tile_id}-{hash6}_{ts}Z_00.00.fits"


# ----------------------------------------------------------------------------------------------------------
# COSMOS parametric table


def derive_cosmos_param_table(
    cosmos_dir: str | Path, file_name: str = "real_galaxy_catalog_23.5_example_fits.fits"
):
    """Parametric galaxy parameters from a GalSim COSMOS ``*_fits.fits`` catalog (GalSim's recipe).

    Returns a dict of numpy arrays: ident, mag_auto (F814W AB), zphot, use_bulgefit, sersic_n,
    sersic_hlr_arcsec, sersic_q, sersic_beta_rad, bulge_hlr_arcsec, bulge_q, bulge_beta_rad, disk_hlr_arcsec,
    disk_q, disk_beta_rad, bulge_frac. Rows GalSim would reject (no viable fit) are dropped.
    """
    from astropy.io import fits

    path = Path(cosmos_dir) / file_name
    if not path.exists():
        raise FileNotFoundError(
            f"COSMOS parametric catalog not found: {path}; pass the folder holding {file_name}"
        )
    d = fits.getdata(path, 1)
    use_b = np.asarray(d["use_bulgefit"]).astype(bool)
    viable = np.asarray(d["viable_sersic"]).astype(bool)
    keep = use_b | viable
    d = d[keep]
    use_b = use_b[keep]
    s = np.asarray(d["sersicfit"], dtype=float)
    b = np.asarray(d["bulgefit"], dtype=float)
    hlr = np.asarray(d["hlr"], dtype=float)
    flux = np.asarray(d["flux"], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        bfrac = np.where(use_b, flux[:, 1] / (flux[:, 1] + flux[:, 2]), 0.0)
    ok = np.isfinite(bfrac) & (bfrac >= 0) & (bfrac <= 1)
    out = {
        "ident": np.asarray(d["IDENT"], dtype=np.int64),
        "mag_auto": np.asarray(d["mag_auto"], dtype=float),
        "zphot": np.asarray(d["zphot"], dtype=float),
        "use_bulgefit": use_b.astype(np.int8),
        "sersic_n": np.clip(s[:, 2], 0.3, 6.0),
        "sersic_hlr_arcsec": hlr[:, 0],
        "sersic_q": s[:, 3],
        "sersic_beta_rad": s[:, 7],
        "bulge_hlr_arcsec": np.where(use_b, hlr[:, 1], 0.0),
        "bulge_q": np.where(use_b, b[:, 11], 1.0),
        "bulge_beta_rad": np.where(use_b, b[:, 15], 0.0),
        "disk_hlr_arcsec": np.where(use_b, hlr[:, 2], 0.0),
        "disk_q": np.where(use_b, b[:, 3], 1.0),
        "disk_beta_rad": np.where(use_b, b[:, 7], 0.0),
        "bulge_frac": np.where(use_b, bfrac, 0.0),
    }
    return {k: v[ok] for k, v in out.items()}


def write_cosmos_param_csv(table: dict, path: str | Path) -> None:
    cols = list(table)
    lines = [",".join(cols)]
    for i in range(len(table[cols[0]])):
        lines.append(
            ",".join(
                repr(float(table[c][i])) if table[c].dtype.kind == "f" else str(int(table[c][i]))
                for c in cols
            )
        )
    Path(path).write_text("\n".join(lines) + "\n")


@lru_cache(maxsize=1)
def load_cosmos_param_table() -> dict[str, np.ndarray]:
    """The packaged COSMOS parametric table (works without the shared COSMOS folder)."""
    text = resources.files("constellation_assets").joinpath("data", COSMOS_PARAM_FILE).read_text()
    rows = [line.split(",") for line in text.strip().splitlines()]
    header, body = rows[0], rows[1:]
    out = {}
    for j, name in enumerate(header):
        vals = [r[j] for r in body]
        if name in ("ident", "use_bulgefit"):
            out[name] = np.array([int(v) for v in vals], dtype=np.int64)
        else:
            out[name] = np.array([float(v) for v in vals], dtype=float)
    return out


# ----------------------------------------------------------------------------------------------------------
# Geometry: the reduced VIS focal plane


@dataclasses.dataclass(frozen=True)
class QuadrantGeom:
    ccd: str  # "row-col", 1-based
    quadrant: str  # E/F/G/H
    x0_pix: float  # lower-left corner in focal-plane pixels (origin at the focal-plane centre)
    y0_pix: float

    @property
    def det_id(self) -> str:
        return f"{self.ccd}.{self.quadrant}"


def focal_plane(fcfg) -> list[QuadrantGeom]:
    """Quadrants of the reduced focal plane, in focal-plane pixel coordinates (centre at 0, 0)."""
    rows, cols = fcfg.ccd_grid
    nx, ny = fcfg.quadrant_nx_pix, fcfg.quadrant_ny_pix
    gx, gy = fcfg.ccd_gap_pix
    width = cols * 2 * nx + (cols - 1) * gx
    height = rows * 2 * ny + (rows - 1) * gy
    out = []
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            cx0 = -width / 2 + (c - 1) * (2 * nx + gx)
            cy0 = -height / 2 + (r - 1) * (2 * ny + gy)
            for q in QUADRANT_LETTERS:
                qx, qy = _QUAD_POS[q]
                out.append(QuadrantGeom(f"{r}-{c}", q, cx0 + qx * nx, cy0 + qy * ny))
    return out


def _focal_plane_halfsize_pix(fcfg) -> tuple[float, float]:
    rows, cols = fcfg.ccd_grid
    width = cols * 2 * fcfg.quadrant_nx_pix + (cols - 1) * fcfg.ccd_gap_pix[0]
    height = rows * 2 * fcfg.quadrant_ny_pix + (rows - 1) * fcfg.ccd_gap_pix[1]
    return width / 2.0, height / 2.0


@dataclasses.dataclass(frozen=True)
class Exposure:
    tile_id: int
    obs_id: int
    dither: int
    ra_deg: float  # pointing (focal-plane centre)
    dec_deg: float
    pa_deg: float


def exposure_layout(cfg) -> list[Exposure]:
    """Every simulated exposure: tile -> observations -> dithers, obs ids counting up from ``first_obs_id``."""
    from constellation_assets.sky.tiles import tile_center_deg

    f = cfg.field
    out = []
    obs_id = f.first_obs_id
    offsets = list(f.dither_offsets_arcsec) or [(0.0, 0.0)]
    for tile_id in f.tile_ids:
        ra_t, dec_t = tile_center_deg(int(tile_id))
        for k in range(f.n_observations):
            r = rng_for(f.seed, "pointing", tile_id, k)
            jx, jy = r.uniform(-1, 1, size=2) * f.pointing_jitter_arcsec / 3600.0
            ra_p, dec_p = tangent_to_radec(jx, jy, ra_t, dec_t)
            pa = math.radians(f.position_angle_deg)
            for d in range(f.n_dithers):
                dx, dy = offsets[d % len(offsets)]
                # Detector axes -> sky (xi east, eta north): x runs west at PA 0.
                xi = (-dx * math.cos(pa) + dy * math.sin(pa)) / 3600.0
                eta = (dx * math.sin(pa) + dy * math.cos(pa)) / 3600.0
                ra_d, dec_d = tangent_to_radec(xi, eta, float(ra_p), float(dec_p))
                out.append(Exposure(int(tile_id), obs_id, d, float(ra_d), float(dec_d), f.position_angle_deg))
            obs_id += 1
    return out


def quadrant_header(fcfg, exp: Exposure, q: QuadrantGeom):
    """SCI header of one quadrant: TPV WCS (cubic radial distortion) + Q1 calibration keywords."""
    from astropy.io import fits

    s = fcfg.pixel_scale_arcsec / 3600.0
    pa = math.radians(exp.pa_deg)
    h = fits.Header()
    h["EXTNAME"] = f"{q.det_id}.SCI"
    h["CTYPE1"] = "RA---TPV"
    h["CTYPE2"] = "DEC--TPV"
    h["CRVAL1"] = exp.ra_deg
    h["CRVAL2"] = exp.dec_deg
    # FITS pixel p (1-based) centre sits at focal-plane pixel x0 + p - 0.5; the centre (0, 0) at p = 0.5 - x0.
    h["CRPIX1"] = 0.5 - q.x0_pix
    h["CRPIX2"] = 0.5 - q.y0_pix
    h["CD1_1"] = -s * math.cos(pa)
    h["CD1_2"] = s * math.sin(pa)
    h["CD2_1"] = s * math.sin(pa)
    h["CD2_2"] = s * math.cos(pa)
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    for ax in (1, 2):
        h[f"PV{ax}_0"] = 0.0
        h[f"PV{ax}_1"] = 1.0
        h[f"PV{ax}_2"] = 0.0
        h[f"PV{ax}_7"] = _TPV_K3  # x^3 (xi^3 for axis 1, eta^3 for axis 2)
        h[f"PV{ax}_9"] = _TPV_K3  # x y^2
    h["BUNIT"] = "ADU"
    h["GAIN"] = (fcfg.gain_e_per_adu, "e-/ADU")
    h["EXPTIME"] = (fcfg.exptime_s, "s")
    h["MAGZEROP"] = (f"{fcfg.magzerop:.2f}", "AB mag of 1 ADU/s")
    h["RDNOISE"] = (fcfg.read_noise_e, "e-")
    h["SATURATE"] = (fcfg.saturation_adu, "ADU")
    h["CCDID"] = q.ccd
    h["QUADID"] = q.quadrant
    h["OBS_ID"] = exp.obs_id
    h["DITHOBS"] = exp.dither
    h["PTGRA"] = exp.ra_deg
    h["PTGDEC"] = exp.dec_deg
    return h


# ----------------------------------------------------------------------------------------------------------
# PSF model


def _fp_coords_norm(fcfg, xfp_pix, yfp_pix):
    hx, hy = _focal_plane_halfsize_pix(fcfg)
    return np.asarray(xfp_pix) / hx, np.asarray(yfp_pix) / hy


def psf_fwhm_arcsec_at(fcfg, xfp_pix, yfp_pix):
    """Target PSF FWHM (arcsec) at focal-plane pixel position(s): grows quadratically to the corners."""
    u, v = _fp_coords_norm(fcfg, xfp_pix, yfp_pix)
    return fcfg.psf_fwhm_arcsec * (1.0 + fcfg.psf_fwhm_variation * 0.5 * (u * u + v * v))


def psf_shear_at(fcfg, exp: Exposure, xfp_pix, yfp_pix):
    """PSF (g1, g2) at focal-plane position(s): astigmatism-like pattern + per-exposure jitter ellipticity."""
    u, v = _fp_coords_norm(fcfg, xfp_pix, yfp_pix)
    j = rng_for(fcfg.seed, "psf-jitter", exp.obs_id, exp.dither).normal(0.0, 0.003, size=2)
    a = fcfg.psf_e_amplitude * 0.5
    return a * (u * u - v * v) + 0.3 * a * u + j[0], a * (2 * u * v) + 0.3 * a * v + j[1]


def airy_gauss_fwhm_arcsec(gauss_fwhm_arcsec, obscuration: float = _OBSCURATION) -> np.ndarray:
    """FWHM of Airy (x) Gaussian, from the radial profile as a Hankel transform of the product of MTFs.

    I(r) = int k J0(k r) T_airy(k) exp(-k^2 sigma^2 / 2) dk; exact up to quadrature (checked against GalSim).
    """
    import galsim
    from scipy.special import j0

    airy = galsim.Airy(lam_over_diam=_LAM_OVER_DIAM_ARCSEC, obscuration=obscuration)
    kmax = 2.0 * math.pi / _LAM_OVER_DIAM_ARCSEC  # MTF cutoff (rad / arcsec)
    k = np.linspace(0.0, kmax, 600)
    mtf = np.array([airy.kValue(galsim.PositionD(float(kk), 0.0)).real for kk in k])
    r = np.linspace(0.0, 0.4, 801)
    kr = j0(np.outer(r, k)) * (k * mtf)
    out = []
    for g in np.atleast_1d(gauss_fwhm_arcsec):
        sigma = float(g) / 2.3548200450309493
        prof = np.trapezoid(kr * np.exp(-0.5 * (k * sigma) ** 2), k, axis=1)
        half = prof[0] / 2.0
        i = int(np.argmax(prof < half))
        r_half = r[i - 1] + (half - prof[i - 1]) * (r[i] - r[i - 1]) / (prof[i] - prof[i - 1])
        out.append(2.0 * r_half)
    return np.array(out)


@lru_cache(maxsize=4)
def _gauss_fwhm_table(obscuration: float) -> tuple[np.ndarray, np.ndarray]:
    """Total FWHM of Airy (x) Gaussian as a function of the Gaussian FWHM (monotonic, for inversion)."""
    g = np.linspace(0.0, 0.6, 61)
    return g, np.maximum.accumulate(airy_gauss_fwhm_arcsec(g, obscuration))


def field_psf(fwhm_arcsec: float, g1: float, g2: float, gsparams=None, nudge: float = 0.0):
    """Euclid-like GalSim PSF (before the pixel): Airy x Gaussian(sheared by (g1, g2)) with the given FWHM.

    ``nudge`` scales lambda/D by (1 + nudge): GalSim 2.8's obscured-Airy k-values are NaN at rare k-grid points
    under some sheared transforms; :func:`_draw_finite` retries with nudge=1e-6 (physically irrelevant).
    """
    import galsim

    g_tab, tot_tab = _gauss_fwhm_table(_OBSCURATION)
    if fwhm_arcsec <= tot_tab[0]:
        raise ValueError(
            f'PSF FWHM {fwhm_arcsec:.3f}" is below the VIS diffraction limit {tot_tab[0]:.3f}"; raise psf_fwhm_arcsec'
        )
    gfwhm = float(np.interp(fwhm_arcsec, tot_tab, g_tab))
    airy = galsim.Airy(
        lam_over_diam=_LAM_OVER_DIAM_ARCSEC * (1.0 + nudge), obscuration=_OBSCURATION, gsparams=gsparams
    )
    # The anisotropy lives in the jitter + charge-diffusion Gaussian; the diffraction pattern stays round.
    # (Shearing the obscured Airy itself makes GalSim 2.8 draw NaNs under some WCS jacobians with a pixel.)
    gauss = galsim.Gaussian(fwhm=gfwhm, gsparams=gsparams).shear(g1=float(g1), g2=float(g2))
    return galsim.Convolve(airy, gauss, gsparams=gsparams)


def _draw_finite(make_obj: Callable[[float], Any], what: str, **draw_kwargs):
    """Draw ``make_obj(nudge)``; on NaN (GalSim Airy edge case, see :func:`field_psf`) retry nudged, else raise."""
    for nudge in (0.0, 1e-6, 3e-6, 1e-5):
        im = make_obj(nudge).drawImage(**draw_kwargs)
        if np.isfinite(im.array).all():
            return im
    raise RuntimeError(
        f"GalSim drew non-finite pixels for {what}; report this with the field config and seed"
    )


@lru_cache(maxsize=8)
def _airy_mtf_table(nudge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Radial MTF of the obscured Airy (GalSim's own k-values), k in rad/arcsec, zero beyond the cutoff."""
    import galsim

    airy = galsim.Airy(lam_over_diam=_LAM_OVER_DIAM_ARCSEC * (1.0 + nudge), obscuration=_OBSCURATION)
    k = np.linspace(0.0, 2.0 * math.pi / (_LAM_OVER_DIAM_ARCSEC * (1.0 + nudge)), 4001)
    mtf = np.array([airy.kValue(galsim.PositionD(float(kk), 0.0)).real for kk in k])
    mtf[-1] = 0.0
    return k, np.nan_to_num(mtf)


def effective_psf_stamps(
    fwhm_arcsec,
    g1,
    g2,
    pixel_scale_arcsec: float,
    oversampling: int,
    size: int = _PSF_STAMP_PIX,
    fft_size: int = 256,
) -> np.ndarray:
    """Effective PSF stamps (n, size, size), each summing to 1, point-sampled at ``pixel_scale/oversampling``.

    The same profile as ``Convolve(field_psf(fwhm, g1, g2), Pixel(pixel_scale))`` drawn with
    ``method="no_pixel"`` (checked against GalSim in the tests), evaluated in k-space with numpy so a 9 x 9 grid
    per quadrant costs milliseconds: Airy MTF x sheared-Gaussian transform x pixel sinc, then an inverse FFT.
    """
    fwhm = np.atleast_1d(np.asarray(fwhm_arcsec, dtype=float))
    g1 = np.broadcast_to(np.asarray(g1, dtype=float), fwhm.shape)
    g2 = np.broadcast_to(np.asarray(g2, dtype=float), fwhm.shape)
    dx = pixel_scale_arcsec / oversampling
    kx, ky = np.meshgrid(
        2.0 * math.pi * np.fft.rfftfreq(fft_size, dx), 2.0 * math.pi * np.fft.fftfreq(fft_size, dx)
    )
    kr = np.hypot(kx, ky)
    k_tab, mtf_tab = _airy_mtf_table()
    airy = np.interp(kr, k_tab, mtf_tab, right=0.0)
    half = pixel_scale_arcsec / 2.0
    box = np.sinc(kx * half / math.pi) * np.sinc(ky * half / math.pi)
    g_tab, tot_tab = _gauss_fwhm_table(_OBSCURATION)
    out = np.empty((fwhm.size, size, size))
    c = fft_size // 2
    for n in range(fwhm.size):
        sigma = float(np.interp(fwhm[n], tot_tab, g_tab)) / 2.3548200450309493
        a, b = g1[n], g2[n]
        norm = 1.0 / math.sqrt(1.0 - a * a - b * b)
        # Shear matrix S (GalSim convention); a profile f(S^-1 x) has transform f~(S^T k) since det S = 1.
        s11, s12, s22 = (1 + a) * norm, b * norm, (1 - a) * norm
        u = s11 * kx + s12 * ky
        v = s12 * kx + s22 * ky
        gauss = np.exp(-0.5 * sigma * sigma * (u * u + v * v))
        img = np.fft.fftshift(np.fft.irfft2(airy * gauss * box, s=(fft_size, fft_size)))
        stamp = img[c - size // 2 : c + size // 2 + 1, c - size // 2 : c + size // 2 + 1]
        out[n] = stamp / stamp.sum()
    return out


def psf_grid_image(fcfg, exp: Exposure, q: QuadrantGeom) -> tuple[np.ndarray, dict]:
    """The 189 x 189 PSF-file image of one quadrant (9 x 9 stamps of 21 x 21, oversampled) and header keys."""
    nx, ny = fcfg.quadrant_nx_pix, fcfg.quadrant_ny_pix
    ovs = fcfg.psf_oversampling
    scale = fcfg.pixel_scale_arcsec / ovs
    # Stamp (i, j) models the PSF at quadrant pixel (x, y) = ((j + 0.5) nx / 9, (i + 0.5) ny / 9) (0-based pixel).
    xs = (np.arange(_PSF_GRID) + 0.5) * nx / _PSF_GRID - 0.5
    ys = (np.arange(_PSF_GRID) + 0.5) * ny / _PSF_GRID - 0.5
    gx, gy = np.meshgrid(xs, ys)  # [i (row, y), j (col, x)]
    xfp, yfp = q.x0_pix + gx + 0.5, q.y0_pix + gy + 0.5
    fwhm = psf_fwhm_arcsec_at(fcfg, xfp, yfp).ravel()
    g1, g2 = psf_shear_at(fcfg, exp, xfp, yfp)
    stamps = effective_psf_stamps(fwhm, np.ravel(g1), np.ravel(g2), fcfg.pixel_scale_arcsec, ovs)
    n = _PSF_STAMP_PIX
    grid = (
        stamps.reshape(_PSF_GRID, _PSF_GRID, n, n).transpose(0, 2, 1, 3).reshape(_PSF_GRID * n, _PSF_GRID * n)
    )
    keys = {
        "EXTNAME": q.det_id,
        "PSFGRID": (_PSF_GRID, "stamps per axis"),
        "PSFSTAMP": (_PSF_STAMP_PIX, "stamp size (PSF pixels)"),
        "OVERSAMP": (ovs, "PSF pixels per detector pixel"),
        "PSFSCALE": (scale, "arcsec per PSF pixel"),
        "PSFPIXEL": ("INCLUDED", "detector pixel response convolved in"),
        "GRIDX0": (float(xs[0] + 1), "FITS x (1-based) of stamp column 0"),
        "GRIDDX": (float(nx / _PSF_GRID), "x step between stamp columns (pixels)"),
        "GRIDY0": (float(ys[0] + 1), "FITS y (1-based) of stamp row 0"),
        "GRIDDY": (float(ny / _PSF_GRID), "y step between stamp rows (pixels)"),
        "CCDID": q.ccd,
        "QUADID": q.quadrant,
    }
    return grid.astype(np.float32), keys


# ----------------------------------------------------------------------------------------------------------
# Sources


def _powerlaw_mags(r: np.random.Generator, n: int, mmin: float, mmax: float, slope: float) -> np.ndarray:
    """Magnitudes with dlog10 N/dm = slope in [mmin, mmax] (inverse CDF)."""
    a = slope * math.log(10.0)
    u = r.uniform(size=n)
    return mmin + np.log1p(u * np.expm1(a * (mmax - mmin))) / a


def _shear_field(fcfg, tile_id: int, xi_arcmin, eta_arcmin) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Input shear (g1, g2) at tile-tangent-plane positions, and the tile-mean truth."""
    r = rng_for(fcfg.seed, "shear", tile_id)
    amp = fcfg.shear_amplitude
    if fcfg.shear_model == "constant":
        drawn = r.uniform(-amp, amp, size=2)
        g1 = fcfg.shear_g1 if fcfg.shear_g1 is not None else float(drawn[0])
        g2 = fcfg.shear_g2 if fcfg.shear_g2 is not None else float(drawn[1])
        n = np.shape(xi_arcmin)[0]
        return np.full(n, g1), np.full(n, g2), g1, g2
    # Smooth map: mean (drawn or given) plus a plane-wave E-mode-like pattern.
    k = 2 * math.pi / fcfg.shear_wavelength_arcmin
    ang, ph1, ph2 = r.uniform(0, 2 * math.pi, size=3)
    mean = r.uniform(-amp / 2, amp / 2, size=2)
    g1m = fcfg.shear_g1 if fcfg.shear_g1 is not None else float(mean[0])
    g2m = fcfg.shear_g2 if fcfg.shear_g2 is not None else float(mean[1])
    phase = k * (np.cos(ang) * np.asarray(xi_arcmin) + np.sin(ang) * np.asarray(eta_arcmin))
    g1 = g1m + 0.5 * amp * np.cos(phase + ph1)
    g2 = g2m + 0.5 * amp * np.sin(phase + ph2)
    return g1, g2, g1m, g2m


def _object_ids(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Euclid-like OBJECT_IDs encoding the position (RA*1e7 x 1e9 + (Dec+90)*1e7), made unique."""
    ids = np.round(ra * 1e7).astype(np.int64) * 1_000_000_000 + np.round((dec + 90.0) * 1e7).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    for i in range(1, len(s)):
        if s[i] <= s[i - 1]:
            s[i] = s[i - 1] + 1
    out = np.empty_like(ids)
    out[order] = s
    return out


def simulate_tile_sources(cfg, tile_id: int, exposures: list[Exposure]) -> dict[str, np.ndarray]:
    """Truth table of one tile: galaxies and stars over the area its exposures cover (vectorised draws)."""
    from constellation_assets.sky.tiles import tile_center_deg

    f = cfg.field
    ra_t, dec_t = tile_center_deg(int(tile_id))
    # Area: the union of exposure footprints (box in the tile tangent plane) plus a 5" border.
    hx, hy = _focal_plane_halfsize_pix(f)
    corners_xi, corners_eta = [], []
    for e in exposures:
        xi_c, eta_c = radec_to_tangent(e.ra_deg, e.dec_deg, ra_t, dec_t)
        if e.pa_deg % 180 == 0:
            ex, ey = hx * f.pixel_scale_arcsec / 3600.0, hy * f.pixel_scale_arcsec / 3600.0
        else:  # rotated focal plane: bound it by its half-diagonal
            ex = ey = math.hypot(hx, hy) * f.pixel_scale_arcsec / 3600.0
        corners_xi += [float(xi_c) - ex, float(xi_c) + ex]
        corners_eta += [float(eta_c) - ey, float(eta_c) + ey]
    pad = 5.0 / 3600.0
    xi_lo, xi_hi = min(corners_xi) - pad, max(corners_xi) + pad
    eta_lo, eta_hi = min(corners_eta) - pad, max(corners_eta) + pad
    area_arcmin2 = (xi_hi - xi_lo) * (eta_hi - eta_lo) * 3600.0

    r = rng_for(f.seed, "sources", tile_id)
    n_gal = int(r.poisson(f.galaxy_density_arcmin2 * area_arcmin2))
    n_star = int(r.poisson(f.star_density_arcmin2 * area_arcmin2))
    n = n_gal + n_star
    xi = r.uniform(xi_lo, xi_hi, size=n)
    eta = r.uniform(eta_lo, eta_hi, size=n)
    ra, dec = tangent_to_radec(xi, eta, ra_t, dec_t)
    is_star = np.zeros(n, dtype=bool)
    is_star[n_gal:] = True

    mag = np.empty(n)
    mag[:n_gal] = _powerlaw_mags(r, n_gal, f.galaxy_mag_min, f.galaxy_mag_max, 0.31)
    mag[n_gal:] = _powerlaw_mags(r, n_star, f.star_mag_min, f.star_mag_max, 0.10)

    cat = load_cosmos_param_table()
    idx = r.integers(0, len(cat["ident"]), size=n)
    idx[is_star] = -1
    ti = np.where(is_star, 0, idx)
    size_scale = np.where(is_star, 0.0, 10.0 ** (-0.1 * (mag - cat["mag_auto"][ti])))
    size_scale = np.clip(size_scale, 0.25, 2.0)
    rot = r.uniform(0.0, math.pi, size=n)  # new orientation: the template's own angle is randomised
    rot = rot + math.radians(f.intrinsic_rotation_deg)  # after the draw: paired fields share the stream

    g1, g2, g1m, g2m = _shear_field(f, tile_id, xi * 60.0, eta * 60.0)
    g1 = np.where(is_star, 0.0, g1)
    g2 = np.where(is_star, 0.0, g2)

    use_b = np.where(is_star, 0, cat["use_bulgefit"][ti])
    # Effective single-component size/shape for the catalog: Sersic fit (bulge+disk: flux-weighted).
    hlr = (
        np.where(
            use_b == 1,
            cat["bulge_frac"][ti] * cat["bulge_hlr_arcsec"][ti]
            + (1 - cat["bulge_frac"][ti]) * cat["disk_hlr_arcsec"][ti],
            cat["sersic_hlr_arcsec"][ti],
        )
        * size_scale
    )
    q = np.where(use_b == 1, cat["disk_q"][ti], cat["sersic_q"][ti])
    q = np.where(is_star, 1.0, q)
    flux_adu = f.exptime_s * 10.0 ** (-0.4 * (mag - f.magzerop))
    truth = {
        "TRUE_ID": np.arange(n, dtype=np.int64),
        "RA": ra,
        "DEC": dec,
        "IS_STAR": is_star,
        "MAG_VIS_TRUE": mag,
        "FLUX_ADU_PER_EXPOSURE": flux_adu,
        "FLUX_UJY_TRUE": 10.0 ** (-0.4 * (mag - _UJY_ZP)),
        "COSMOS_INDEX": idx.astype(np.int64),
        "COSMOS_IDENT": np.where(is_star, -1, cat["ident"][ti]).astype(np.int64),
        "SIZE_SCALE": size_scale,
        "ROTATION_RAD": rot,
        "USE_BULGEFIT": use_b.astype(np.int8),
        "HLR_ARCSEC": np.where(is_star, 0.0, hlr),
        "Q_INTRINSIC": q,
        "G1_TRUE": g1,
        "G2_TRUE": g2,
    }
    truth["_g_mean"] = np.array([g1m, g2m])
    return truth


def galaxy_profile(cat: dict, i: int, truth: dict, gsparams=None):
    """GalSim profile of truth row ``i`` before shear and PSF (flux in ADU per exposure)."""
    import galsim

    t = int(truth["COSMOS_INDEX"][i])
    flux = float(truth["FLUX_ADU_PER_EXPOSURE"][i])
    s = float(truth["SIZE_SCALE"][i])
    rot = float(truth["ROTATION_RAD"][i]) * galsim.radians
    if int(cat["use_bulgefit"][t]) == 1:
        bf = float(cat["bulge_frac"][t])
        bulge = galsim.DeVaucouleurs(
            half_light_radius=float(cat["bulge_hlr_arcsec"][t]) * s, flux=flux * bf, gsparams=gsparams
        )
        disk = galsim.Exponential(
            half_light_radius=float(cat["disk_hlr_arcsec"][t]) * s, flux=flux * (1 - bf), gsparams=gsparams
        )
        bq, dq = float(cat["bulge_q"][t]), float(cat["disk_q"][t])
        if bq < 1:
            bulge = bulge.shear(q=bq, beta=float(cat["bulge_beta_rad"][t]) * galsim.radians)
        if dq < 1:
            disk = disk.shear(q=dq, beta=float(cat["disk_beta_rad"][t]) * galsim.radians)
        gal = galsim.Add([bulge, disk])
    else:
        n = round(float(cat["sersic_n"][t]) * 10) / 10.0  # GalSim caches Sersic tables per n
        gal = galsim.Sersic(
            n=min(max(n, 0.3), 6.0),
            half_light_radius=float(cat["sersic_hlr_arcsec"][t]) * s,
            flux=flux,
            gsparams=gsparams,
        )
        sq = float(cat["sersic_q"][t])
        if sq < 1:
            gal = gal.shear(q=sq, beta=float(cat["sersic_beta_rad"][t]) * galsim.radians)
    return gal.rotate(rot)


# ----------------------------------------------------------------------------------------------------------
# Rendering one exposure


def _stamp_size(hlr_arcsec: float, mag: float, is_star: bool, scale: float) -> int:
    if is_star:
        n = 33 if mag > 21 else (65 if mag > 18 else 129)
    else:
        n = int(2 * math.ceil(5.0 * math.hypot(hlr_arcsec, 0.12) / scale) + 1)
        n = min(max(n, 25), 161)
    return n | 1


def _render_quadrant(cfg, exp: Exposure, q: QuadrantGeom, truth: dict, xy: tuple[np.ndarray, np.ndarray]):
    """SCI, RMS, FLG, BKG, WGT arrays of one quadrant (float32 ADU / int32 flags)."""
    import galsim

    f = cfg.field
    nx, ny = f.quadrant_nx_pix, f.quadrant_ny_pix
    x, y = xy  # FITS 1-based pixel coordinates of every truth object in this quadrant
    # GalSim's default accuracy: a relaxed folding_threshold makes the Airy's k-space values NaN on some FFT
    # grids under a non-diagonal WCS jacobian (GalSim 2.8), which the stamp check below would catch.
    gsp = galsim.GSParams(folding_threshold=1e-2, maximum_fft_size=8192)
    image = galsim.ImageF(nx, ny, xmin=1, ymin=1)
    cat = load_cosmos_param_table()
    hdr = quadrant_header(f, exp, q)
    wcs = galsim.GSFitsWCS(header=galsim.FitsHeader(header=hdr))
    pix_scale = f.pixel_scale_arcsec
    sel = np.nonzero((x > -40) & (x < nx + 40) & (y > -40) & (y < ny + 40))[0]
    for i in sel:
        is_star = bool(truth["IS_STAR"][i])
        n = _stamp_size(float(truth["HLR_ARCSEC"][i]), float(truth["MAG_VIS_TRUE"][i]), is_star, pix_scale)
        if x[i] < 1 - n // 2 or x[i] > nx + n // 2 or y[i] < 1 - n // 2 or y[i] > ny + n // 2:
            continue
        xfp, yfp = q.x0_pix + x[i] - 0.5, q.y0_pix + y[i] - 0.5
        fwhm = float(psf_fwhm_arcsec_at(f, xfp, yfp))
        pg1, pg2 = (float(v) for v in psf_shear_at(f, exp, xfp, yfp))
        flux = float(truth["FLUX_ADU_PER_EXPOSURE"][i])
        gal = None
        if not is_star:
            gal = galaxy_profile(cat, i, truth, gsparams=gsp).shear(
                g1=float(truth["G1_TRUE"][i]), g2=float(truth["G2_TRUE"][i])
            )

        def make(nudge, gal=gal, fwhm=fwhm, pg1=pg1, pg2=pg2, flux=flux):
            psf = field_psf(fwhm, pg1, pg2, gsparams=gsp, nudge=nudge)
            return psf.withFlux(flux) if gal is None else galsim.Convolve(gal, psf, gsparams=gsp)

        ix, iy = int(round(x[i])), int(round(y[i]))
        pos = galsim.PositionD(float(x[i]), float(y[i]))
        what = f"truth object {i} (star={is_star}) in {q.det_id} of obs {exp.obs_id} dither {exp.dither}"
        stamp = _draw_finite(make, what, nx=n, ny=n, wcs=wcs.local(pos), offset=(x[i] - ix, y[i] - iy))
        stamp.setCenter(ix, iy)
        b = stamp.bounds & image.bounds
        if b.isDefined():
            image[b] += stamp[b]

    model = image.array.astype(np.float64)
    # Smooth sky: 2 % gradient across the focal plane (shared by all quadrants of the exposure).
    yy, xx = np.mgrid[0:ny, 0:nx]
    u, v = _fp_coords_norm(f, q.x0_pix + xx + 0.5, q.y0_pix + yy + 0.5)
    sky = f.sky_level_adu * (1.0 + 0.01 * u + 0.01 * v)

    gain, rn = f.gain_e_per_adu, f.read_noise_e
    rng = rng_for(f.seed, "noise", exp.obs_id, exp.dither, q.det_id)
    expected_e = np.clip((model + sky) * gain, 0.0, None)
    if f.paired_noise:  # one unit-normal field per quadrant, whatever the sources: fields share the noise
        noise = np.sqrt(expected_e + rn * rn) * rng.standard_normal(expected_e.shape)
        electrons = expected_e + f.noise_sign * noise
    else:
        electrons = rng.poisson(expected_e).astype(np.float64) + rng.normal(0.0, rn, size=expected_e.shape)
    sci = electrons / gain
    rms = np.sqrt(expected_e + rn * rn) / gain
    flg = np.zeros((ny, nx), dtype=np.int32)

    # Detector defects are fixed per quadrant (same pixels in every exposure).
    drng = rng_for(f.seed, "defects", q.det_id)
    n_hot = int(drng.poisson(f.hot_pixel_fraction * nx * ny))
    hy, hx = drng.integers(0, ny, n_hot), drng.integers(0, nx, n_hot)
    sci[hy, hx] += drng.uniform(500.0, 20000.0, n_hot) / gain
    flg[hy, hx] |= FLAG_HOT
    n_cold = int(drng.poisson(f.cold_pixel_fraction * nx * ny))
    cy, cx = drng.integers(0, ny, n_cold), drng.integers(0, nx, n_cold)
    sci[cy, cx] *= 0.05
    flg[cy, cx] |= FLAG_COLD

    # Cosmic rays: straight tracks of 1-15 pixels depositing ~1000 e- per pixel.
    n_cr = int(rng.poisson(f.cosmic_rate_per_mpix * nx * ny / 1e6))
    for _ in range(n_cr):
        length = 1 + int(rng.exponential(4.0))
        ang = rng.uniform(0, math.pi)
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        t = np.arange(length + 1)
        px = np.clip((x0 + t * math.cos(ang)).astype(int), 0, nx - 1)
        py = np.clip((y0 + t * math.sin(ang)).astype(int), 0, ny - 1)
        sci[py, px] += rng.uniform(300.0, 3000.0, size=len(t)) / gain
        flg[py, px] |= FLAG_COSMIC

    sat = sci >= f.saturation_adu
    sci[sat] = f.saturation_adu
    flg[sat] |= FLAG_SATURATED

    bkg_rms2 = (np.clip(sky * gain, 0.0, None) + rn * rn) / (gain * gain)
    wgt = np.where((flg & (FLAG_INVALID | FLAG_HOT | FLAG_COLD | FLAG_SATURATED)) != 0, 0.0, 1.0 / bkg_rms2)
    return (
        sci.astype(np.float32),
        rms.astype(np.float32),
        flg,
        sky.astype(np.float32),
        wgt.astype(np.float32),
        hdr,
    )


def _write_fits(uri: str, hdus: list, storage_options: dict | None) -> None:
    from astropy.io import fits

    hl = fits.HDUList(hdus)
    with atomic_output(uri, storage_options, suffix=".fits") as tmp:
        hl.writeto(tmp, overwrite=True, output_verify="silentfix")


def _primary(fcfg, exp: Exposure, kind: str):
    from astropy.io import fits

    h = fits.Header()
    h["TELESCOP"] = "EUCLID"
    h["INSTRUME"] = "VIS"
    h["FILETYPE"] = kind
    h["OBS_ID"] = exp.obs_id
    h["DITHOBS"] = exp.dither
    h["PTGRA"] = exp.ra_deg
    h["PTGDEC"] = exp.dec_deg
    h["EXPTIME"] = fcfg.exptime_s
    h["GAIN"] = fcfg.gain_e_per_adu
    h["MAGZEROP"] = fcfg.magzerop
    h["SIMULATD"] = (True, "synthetic Constellation field")
    h["SIMSEED"] = fcfg.seed
    return fits.PrimaryHDU(header=h)


def _exposure_files(cfg, exp: Exposure) -> dict[str, str]:
    folder = join_uri(cfg.data.vis_base_uri, str(exp.obs_id))
    return {
        kind: join_uri(
            folder,
            det_file_name(
                kind, exp.obs_id, exp.dither, _timestamp(cfg.field.seed, kind, exp.obs_id, exp.dither)
            ),
        )
        for kind in ("DET", "BKG", "WGT", "PSF")
    }


def render_exposure(cfg, exp: Exposure, truth: dict) -> tuple[dict[str, str], dict]:
    """Render and write the DET/BKG/WGT/PSF files of one exposure; returns their URIs and coverage counts."""
    from astropy.io import fits
    from astropy.wcs import WCS

    f = cfg.field
    files = _exposure_files(cfg, exp)
    det_hdus, bkg_hdus, wgt_hdus, psf_hdus = [], [], [], []
    covered = np.zeros(len(truth["RA"]), dtype=np.int32)
    for q in focal_plane(f):
        hdr = quadrant_header(f, exp, q)
        w = WCS(hdr)
        x, y = w.all_world2pix(truth["RA"], truth["DEC"], 1)
        inside = (x >= 0.5) & (x <= f.quadrant_nx_pix + 0.5) & (y >= 0.5) & (y <= f.quadrant_ny_pix + 0.5)
        covered += inside
        sci, rms, flg, bkg, wgt, hdr = _render_quadrant(cfg, exp, q, truth, (x, y))
        rms_h = fits.Header()
        rms_h["EXTNAME"] = f"{q.det_id}.RMS"
        rms_h["BUNIT"] = "ADU"
        flg_h = fits.Header()
        flg_h["EXTNAME"] = f"{q.det_id}.FLG"
        flg_h["FLAGBITS"] = "0 INVALID,1 HOT,2 COLD,3 SATURATED,4 COSMIC"
        det_hdus += [
            fits.ImageHDU(sci, header=hdr),
            fits.ImageHDU(rms, header=rms_h),
            fits.ImageHDU(flg, header=flg_h),
        ]
        wcs_only = hdr.copy()
        for k in ("EXTNAME",):
            wcs_only[k] = q.det_id
        bkg_hdus.append(fits.ImageHDU(bkg, header=wcs_only.copy()))
        wgt_h = wcs_only.copy()
        wgt_h["BUNIT"] = "ADU-2"
        wgt_hdus.append(fits.ImageHDU(wgt, header=wgt_h))
        grid, keys = psf_grid_image(f, exp, q)
        ph = fits.Header()
        for k, v in keys.items():
            ph[k] = v
        psf_hdus.append(fits.ImageHDU(grid, header=ph))
    # Q1 extensions "may appear in any order": shuffle deterministically per exposure.
    order = rng_for(f.seed, "hdu-order", exp.obs_id, exp.dither).permutation(len(det_hdus))
    det_hdus = [det_hdus[i] for i in order]
    so = cfg.storage_options(files["DET"])
    _write_fits(files["DET"], [_primary(f, exp, "DET")] + det_hdus, so)
    _write_fits(files["BKG"], [_primary(f, exp, "BKG")] + bkg_hdus, so)
    _write_fits(files["WGT"], [_primary(f, exp, "WGT")] + wgt_hdus, so)
    _write_fits(files["PSF"], [_primary(f, exp, "PSF")] + psf_hdus, so)
    return files, {"covered": covered}


# ----------------------------------------------------------------------------------------------------------
# MER background-subtracted mosaics (VIS + NISP), resampled to the tile's 0.1"/pixel TAN grid


@dataclasses.dataclass(frozen=True)
class MerBand:
    """One MER mosaic band: config name, file-name token, folder, instrument, optics and depth."""

    name: str  # config / FILTER name (MER DPDD: VIS, NIR_Y, NIR_J, NIR_H)
    token: str  # in the file name: EUC_MER_BGSUB-MOSAIC-{token}_TILE...
    folder: str  # q1/MER/{tile_id}/{folder}/
    instrument: str
    wavelength_um: float  # effective wavelength (power-law colours, diffraction scale)
    psf_fwhm_arcsec: float | None  # FWHM in the resampled mosaic (None: field.psf_fwhm_arcsec)
    depth_5sigma_point_mag: float  # 5-sigma point-source depth (AB), sets the noise relative to VIS


#: Euclid bands of the MER mosaics. Depths follow the Euclid Wide Survey (VIS ~26.2, NISP ~24.5 AB, 5 sigma
#: point source); NISP FWHMs are those of the resampled MER mosaics (~0.45-0.5"), wavelengths the band centres.
MER_BANDS: dict[str, MerBand] = {
    "VIS": MerBand("VIS", "VIS", "VIS", "VIS", 0.715, None, 26.2),
    "NIR_Y": MerBand("NIR_Y", "NIR-Y", "NISP", "NISP", 1.081, 0.45, 24.5),
    "NIR_J": MerBand("NIR_J", "NIR-J", "NISP", "NISP", 1.367, 0.47, 24.6),
    "NIR_H": MerBand("NIR_H", "NIR-H", "NISP", "NISP", 1.772, 0.50, 24.5),
}
#: Aliases accepted for band names (NISP filters are often called Y, J, H).
BAND_ALIASES = {
    "Y": "NIR_Y",
    "J": "NIR_J",
    "H": "NIR_H",
    "NIR-Y": "NIR_Y",
    "NIR-J": "NIR_J",
    "NIR-H": "NIR_H",
}
#: MER mosaic pixel unit: microJansky per pixel, i.e. zero point 23.9 AB (header MAGZERO).
MER_MAGZERO = _UJY_ZP
#: Full MER tile grid: 19200 x 19200 pixels of 0.1" about the tile centre.
MER_TILE_NPIX = 19200
#: SED slopes (f_nu ~ lambda**alpha) of the field's objects: galaxies alpha = 0.6 + 1.4 * bulge fraction
#: + N(0, 0.35) (discs blue, bulges red); stars uniform in [-1.5, 2.5] (hot to cool).
_GAL_ALPHA0, _GAL_ALPHA_BULGE, _GAL_ALPHA_SCATTER = 0.6, 1.4, 0.35
_STAR_ALPHA_RANGE = (-1.5, 2.5)
_MOSAIC_OVERSAMPLING = 2
_MOSAIC_PAD_ARCSEC = 3.0


def canonical_band(band: str) -> str:
    """``"Y"`` / ``"NIR-Y"`` / ``"NIR_Y"`` -> ``"NIR_Y"``; unknown names are returned unchanged (upper case)."""
    b = str(band).strip().upper()
    return BAND_ALIASES.get(b, b)


def band_colour_mag(band: str, alpha, ref_band: str = "VIS"):
    """AB colour m_band - m_ref of a power-law SED f_nu ~ lambda**alpha: -2.5 alpha log10(lambda_b / lambda_ref).

    The documented colour model of the synthetic field and of injected sources (alpha > 0: red).
    """
    lb = MER_BANDS[canonical_band(band)].wavelength_um
    lr = MER_BANDS[canonical_band(ref_band)].wavelength_um
    return -2.5 * np.asarray(alpha, dtype=float) * math.log10(lb / lr)


def mer_mosaic_file_name(band: str, tile_id: int, hash6: str, ts: str) -> str:
    """``EUC_MER_BGSUB-MOSAIC-{VIS|NIR-Y|NIR-J|NIR-H}_TILE{tile_id}-{HASH}_{ts}Z_00.00.fits``."""
    return (
        f"EUC_MER_BGSUB-MOSAIC-{MER_BANDS[canonical_band(band)].token}_TILE{tile_id}-{hash6}_{ts}Z_00.00.fits"
    )


def mer_base_uri_of(cfg) -> str:
    """``{q1 root}/MER/`` next to the configured VIS folder (the Q1 layout)."""
    return join_uri(_q1_root_of(cfg.data.vis_base_uri), "MER") + "/"


def _band_psf_fwhm(fcfg, band: MerBand) -> float:
    return float(fcfg.psf_fwhm_arcsec if band.psf_fwhm_arcsec is None else band.psf_fwhm_arcsec)


def band_otf(fwhm_arcsec: float, wavelength_um: float, kx, ky, pixel_scale_arcsec: float) -> np.ndarray:
    """Optical transfer function of a band's effective PSF: Airy(lambda/D, 30 % obscured) x Gaussian x pixel.

    The Gaussian (jitter, charge diffusion, resampling) is tuned so Airy (x) Gaussian has FWHM ``fwhm_arcsec``;
    Airy scales with wavelength: MTF_lambda(k) = MTF_VIS(k lambda / lambda_VIS). ``kx``, ``ky`` in rad/arcsec.
    """
    r = wavelength_um / (_LAMBDA_M * 1e6)
    g_tab, tot_tab = _gauss_fwhm_table(_OBSCURATION)
    if fwhm_arcsec / r <= tot_tab[0]:
        raise ValueError(
            f'PSF FWHM {fwhm_arcsec:.3f}" is below the diffraction limit at {wavelength_um} um; raise it'
        )
    sigma = r * float(np.interp(fwhm_arcsec / r, tot_tab, g_tab)) / 2.3548200450309493
    k_tab, mtf_tab = _airy_mtf_table()
    # Airy MTF by table look-up (4001 samples to the cutoff: < 2e-4 error), zero beyond the cutoff; the
    # Gaussian and the pixel box are separable in kx, ky.
    kx = np.asarray(kx, dtype=np.float32)
    ky = np.asarray(ky, dtype=np.float32)
    step = float(k_tab[1] - k_tab[0])
    idx = np.sqrt(kx * kx + ky * ky) * np.float32(r / step) + np.float32(0.5)
    table = np.append(mtf_tab, 0.0).astype(np.float32)
    otf = table[np.minimum(idx.astype(np.int32), len(mtf_tab))]
    half = pixel_scale_arcsec / 2.0
    fx = np.exp(-0.5 * sigma * sigma * kx * kx) * np.sinc(kx * half / math.pi)
    fy = np.exp(-0.5 * sigma * sigma * ky * ky) * np.sinc(ky * half / math.pi)
    otf *= fx.astype(np.float32)
    otf *= fy.astype(np.float32)
    return otf


def object_sed_alpha(fcfg, tile_id: int, truth: dict) -> np.ndarray:
    """SED slope alpha of every truth object (see ``_GAL_ALPHA0``): deterministic per tile."""
    cat = load_cosmos_param_table()
    is_star = np.asarray(truth["IS_STAR"], dtype=bool)
    n = len(is_star)
    r = rng_for(fcfg.seed, "sed", tile_id)
    ti = np.where(is_star, 0, np.asarray(truth["COSMOS_INDEX"]))
    bf = np.where(
        cat["use_bulgefit"][ti] == 1, cat["bulge_frac"][ti], np.clip((cat["sersic_n"][ti] - 1.0) / 3.0, 0, 1)
    )
    alpha = _GAL_ALPHA0 + _GAL_ALPHA_BULGE * bf + r.normal(0.0, _GAL_ALPHA_SCATTER, n)
    return np.where(is_star, r.uniform(*_STAR_ALPHA_RANGE, n), alpha)


def mer_mosaic_header(fcfg, tile_id: int, x_lo: int, y_lo: int, nx: int, ny: int, band: MerBand):
    """Header of a mosaic covering full-tile pixels [x_lo, x_lo + nx) x [y_lo, y_lo + ny) (0-based)."""
    from astropy.io import fits

    from constellation_assets.sky.tiles import tile_center_deg

    ra_t, dec_t = tile_center_deg(int(tile_id))
    s = fcfg.pixel_scale_arcsec / 3600.0
    c = MER_TILE_NPIX / 2.0 + 0.5  # full-tile CRPIX (1-based): the tile centre sits between the middle pixels
    h = fits.Header()
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CRVAL1"] = float(ra_t)
    h["CRVAL2"] = float(dec_t)
    h["CRPIX1"] = c - x_lo
    h["CRPIX2"] = c - y_lo
    h["CD1_1"] = -s
    h["CD1_2"] = 0.0
    h["CD2_1"] = 0.0
    h["CD2_2"] = s
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["RADESYS"] = "ICRS"
    h["EQUINOX"] = 2000.0
    h["BUNIT"] = ("uJy", "microJansky per pixel (background subtracted)")
    h["MAGZERO"] = (MER_MAGZERO, "AB magnitude of 1 pixel unit")
    h["TELESCOP"] = "EUCLID"
    h["INSTRUME"] = band.instrument
    h["FILTER"] = band.name
    h["TILEID"] = int(tile_id)
    h["TILEX0"] = (int(x_lo), "0-based x of pixel 0 in the full tile grid")
    h["TILEY0"] = (int(y_lo), "0-based y of pixel 0 in the full tile grid")
    h["PSF_FWHM"] = (_band_psf_fwhm(fcfg, band), "arcsec, effective PSF of the mosaic")
    h["SIMULATD"] = (True, "synthetic Constellation field")
    h["SIMSEED"] = fcfg.seed
    return h


def _mosaic_noise_sigma_ujy(fcfg, band: MerBand, n_exposures: int) -> float:
    """Per-pixel noise of a band: VIS from the stacked exposures' sky + read noise; NISP scaled by depth.

    sigma_b = sigma_VIS * 10**(0.4 (m5_VIS - m5_b)) * sqrt(Neff_VIS / Neff_b), Neff = 4 pi (FWHM/2.355)^2 / p^2 + 1.
    """
    gain = fcfg.gain_e_per_adu
    sky_var_adu = (fcfg.sky_level_adu * gain + fcfg.read_noise_e**2) / gain**2
    ujy_per_adu = 10.0 ** (-0.4 * (fcfg.magzerop + 2.5 * math.log10(fcfg.exptime_s) - MER_MAGZERO))
    sigma_vis = math.sqrt(sky_var_adu / max(n_exposures, 1)) * ujy_per_adu
    vis = MER_BANDS["VIS"]

    def neff(b):
        return 4 * math.pi * (_band_psf_fwhm(fcfg, b) / 2.3548 / fcfg.pixel_scale_arcsec) ** 2 + 1.0

    return (
        sigma_vis
        * 10.0 ** (0.4 * (vis.depth_5sigma_point_mag - band.depth_5sigma_point_mag))
        * math.sqrt(neff(vis) / neff(band))
    )


def _mer_bands(fcfg) -> list[MerBand]:
    unknown = [b for b in fcfg.mer_bands if canonical_band(b) not in MER_BANDS]
    if unknown or not fcfg.mer_bands:
        raise ValueError(
            f"field.mer_bands {list(fcfg.mer_bands)}: unknown band(s) {unknown}; "
            f"use a non-empty subset of {list(MER_BANDS)}"
        )
    return [MER_BANDS[canonical_band(b)] for b in fcfg.mer_bands]


def render_mer_mosaics(cfg, tile_id: int, truth: dict, n_exposures: int) -> dict[str, str]:
    """Write the tile's background-subtracted MER mosaics (one per ``field.mer_bands``), return {band: uri}.

    Each covers the simulated area on the tile's 0.1" TAN grid (a sub-grid of the full 19200 x 19200 tile).
    Rendering: every object's intrinsic profile (sheared, unit flux) is drawn once, point-sampled at
    0.1"/``_MOSAIC_OVERSAMPLING``; per band the objects are added with their band fluxes (VIS magnitude +
    power-law colour, :func:`band_colour_mag`), the canvas is convolved in Fourier space with the band's OTF
    (Airy x Gaussian x 0.1" pixel, :func:`band_otf`) and sampled at the pixel centres; stars enter as exact
    sub-pixel-shifted deltas. White Gaussian noise at the band's depth; units uJy/pixel (MAGZERO 23.9).
    """
    import scipy.fft as sfft
    from astropy.io import fits
    from astropy.wcs import WCS

    f = cfg.field
    bands = _mer_bands(f)
    ra, dec = np.asarray(truth["RA"]), np.asarray(truth["DEC"])
    # Area: the objects' bounding box on the full tile grid (plus 2").
    h0 = mer_mosaic_header(f, tile_id, 0, 0, MER_TILE_NPIX, MER_TILE_NPIX, bands[0])
    xf, yf = WCS(h0).all_world2pix(ra, dec, 0)
    m = int(round(2.0 / f.pixel_scale_arcsec))
    x_lo, y_lo = int(np.floor(xf.min())) - m, int(np.floor(yf.min())) - m
    nx, ny = int(np.ceil(xf.max())) + m + 1 - x_lo, int(np.ceil(yf.max())) + m + 1 - y_lo
    x, y = xf - x_lo, yf - y_lo  # 0-based mosaic pixel coordinates
    pad1 = int(math.ceil(_MOSAIC_PAD_ARCSEC / f.pixel_scale_arcsec))  # canvas padding in pixels
    sub = f.pixel_scale_arcsec / _MOSAIC_OVERSAMPLING
    os_max = _MOSAIC_OVERSAMPLING

    is_star = np.asarray(truth["IS_STAR"], dtype=bool)
    alpha = object_sed_alpha(f, tile_id, truth)
    flux_vis = np.asarray(truth["FLUX_UJY_TRUE"], dtype=float)
    # Intrinsic (pre-PSF) galaxy stamps, unit flux, point-sampled on the finest grid (sub-pixel index s <->
    # mosaic pixel coordinate s / os_max - pad1; pixel centres at multiples of os_max).
    cat = load_cosmos_param_table()
    unit = dict(truth)
    unit["FLUX_ADU_PER_EXPOSURE"] = np.ones(len(ra))
    stamps: list[tuple[int, int, int, np.ndarray]] = []
    for i in np.nonzero(~is_star)[0]:
        xs, ys = (pad1 + x[i]) * os_max, (pad1 + y[i]) * os_max
        n = int(2 * math.ceil(6.0 * float(truth["HLR_ARCSEC"][i]) / sub) + 1)
        n = min(max(n, 9), 401)
        ix, iy = int(round(xs)), int(round(ys))
        prof = galaxy_profile(cat, i, unit).shear(
            g1=float(truth["G1_TRUE"][i]), g2=float(truth["G2_TRUE"][i])
        )
        im = prof.drawImage(nx=n, ny=n, scale=sub, method="no_pixel", offset=(xs - ix, ys - iy)).array
        tot = float(im.sum())
        if not (np.isfinite(tot) and tot > 0):
            continue
        stamps.append((i, ix - n // 2, iy - n // 2, (im / tot).astype(np.float32)))
    star_idx = np.nonzero(is_star)[0]
    star_otfs: dict = {}
    ts = _timestamp(f.seed, "MER-MOSAIC", tile_id)
    hash6 = _hash_hex(f.seed, "mer-mosaic-hash", tile_id)
    out: dict[str, str] = {}
    for band in bands:
        fwhm = _band_psf_fwhm(f, band)
        # NISP (FWHM >= 3 pixels) is well sampled at 0.1": convolve on the pixel grid; VIS on the finer grid.
        os_b = 1 if fwhm / f.pixel_scale_arcsec >= 3.0 else os_max
        step = os_max // os_b
        nxs = sfft.next_fast_len((nx + 2 * pad1) * os_b, real=True)
        nys = sfft.next_fast_len((ny + 2 * pad1) * os_b, real=True)
        w_flux = flux_vis * 10.0 ** (-0.4 * band_colour_mag(band.name, alpha))
        canvas = np.zeros((nys, nxs), dtype=np.float32)
        for i, x0, y0, st in stamps:
            fx, fy = (-x0) % step, (-y0) % step  # first stamp sample on this band's grid
            d = st[fy::step, fx::step] * np.float32(w_flux[i] * step * step)
            px0, py0 = (x0 + fx) // step, (y0 + fy) // step
            hy, hx = d.shape
            ys_ = slice(max(py0, 0), min(py0 + hy, nys))
            xs_ = slice(max(px0, 0), min(px0 + hx, nxs))
            canvas[ys_, xs_] += d[ys_.start - py0 : ys_.stop - py0, xs_.start - px0 : xs_.stop - px0]
        cell = f.pixel_scale_arcsec / os_b
        ky = (2 * math.pi * sfft.fftfreq(nys, cell)).astype(np.float32)[:, None]
        kx = (2 * math.pi * sfft.rfftfreq(nxs, cell)).astype(np.float32)[None, :]
        ft = sfft.rfft2(canvas, workers=2)
        del canvas
        ft *= band_otf(fwhm, band.wavelength_um, kx, ky, f.pixel_scale_arcsec).astype(np.float32)
        img = sfft.irfft2(ft, s=(nys, nxs), workers=2)
        del ft
        # Pixel value = pixel-averaged surface brightness x pixel area = grid value x os_b^2.
        img = img[pad1 * os_b : (pad1 + ny) * os_b : os_b, pad1 * os_b : (pad1 + nx) * os_b : os_b]
        img = img.astype(np.float64) * float(os_b * os_b)
        for i in star_idx:
            _add_star(img, x[i], y[i], w_flux[i], float(truth["MAG_VIS_TRUE"][i]), band, f, star_otfs)
        sigma = _mosaic_noise_sigma_ujy(f, band, n_exposures)
        noise = rng_for(f.seed, "mer-noise", tile_id, band.name).standard_normal(img.shape, dtype=np.float32)
        data = img.astype(np.float32) + noise * np.float32(sigma)
        hdr = mer_mosaic_header(f, tile_id, x_lo, y_lo, nx, ny, band)
        hdr["NOISESIG"] = (sigma, "uJy, per-pixel noise sigma")
        uri = join_uri(
            mer_base_uri_of(cfg),
            str(tile_id),
            band.folder,
            mer_mosaic_file_name(band.name, tile_id, hash6, ts),
        )
        _write_fits(uri, [fits.PrimaryHDU(data, header=hdr)], cfg.storage_options(uri))
        out[band.name] = uri
    return out


def _add_star(
    img: np.ndarray, x: float, y: float, flux: float, mag_vis: float, band: MerBand, fcfg, cache: dict
):
    """Add an exact point source (effective PSF shifted in Fourier space) centred at 0-based pixel (x, y)."""
    import scipy.fft as sfft

    # Well-sampled bands (FWHM >= 3 pixels, NISP) on the pixel grid, VIS on the finer grid.
    os_ = 1 if _band_psf_fwhm(fcfg, band) / fcfg.pixel_scale_arcsec >= 3.0 else _MOSAIC_OVERSAMPLING
    n = 32 if mag_vis > 21 else (64 if mag_vis > 18 else 128)  # stamp side in pixels (even)
    key = (band.name, n)
    if key not in cache:
        sub = fcfg.pixel_scale_arcsec / os_
        m = n * os_
        ky = (2 * math.pi * sfft.fftfreq(m, sub))[:, None]
        kx = (2 * math.pi * sfft.rfftfreq(m, sub))[None, :]
        otf = band_otf(_band_psf_fwhm(fcfg, band), band.wavelength_um, kx, ky, fcfg.pixel_scale_arcsec)
        cache[key] = (otf, kx * sub, ky * sub)
    otf, kxs, kys = cache[key]
    ix, iy = int(round(x)), int(round(y))
    dx, dy = (x - ix) * os_, (y - iy) * os_  # sub-pixel shift from the stamp centre (sub-grid units)
    m = n * os_
    c = m // 2  # stamp centre index (even: a pixel centre after decimation)
    phase = np.exp(-1j * kys * (dy + c)) * np.exp(-1j * kxs * (dx + c))  # separable shift
    st = sfft.irfft2(otf * phase, s=(m, m))[::os_, ::os_] * (flux * os_ * os_)
    h = n // 2
    y0, x0 = iy - h, ix - h
    ys, xs = slice(max(y0, 0), min(y0 + n, img.shape[0])), slice(max(x0, 0), min(x0 + n, img.shape[1]))
    if ys.start < ys.stop and xs.start < xs.stop:
        img[ys, xs] += st[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]


# ----------------------------------------------------------------------------------------------------------
# MER catalog


def _mer_catalog(
    cfg, tile_id: int, truth: dict, n_cover: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Synthetic MER final catalog columns (measured quantities with noise) and the truth row of each entry."""
    from constellation_assets.io.mer_catalog import MER_COLUMNS

    f = cfg.field
    r = rng_for(f.seed, "mer", tile_id)
    n = len(truth["RA"])
    is_star = truth["IS_STAR"]
    hlr = truth["HLR_ARCSEC"]
    fwhm = f.psf_fwhm_arcsec
    r_psf = fwhm / 2.0
    r_obs = np.hypot(hlr, r_psf)  # circularised observed half-light radius (arcsec)
    flux_ujy = truth["FLUX_UJY_TRUE"]
    flux_adu = truth["FLUX_ADU_PER_EXPOSURE"]
    gain = f.gain_e_per_adu
    sky_var = (f.sky_level_adu * gain + f.read_noise_e**2) / gain**2  # ADU^2 per pixel per exposure
    area_pix = math.pi * (2.0 * r_obs / f.pixel_scale_arcsec) ** 2
    n_exp = np.maximum(n_cover, 1)
    var_adu = (area_pix * sky_var + flux_adu / gain) / n_exp
    err_ujy = np.sqrt(var_adu) * flux_ujy / flux_adu
    meas = flux_ujy + r.normal(0.0, 1.0, n) * err_ujy
    snr = meas / err_ujy
    keep = (snr >= f.catalog_snr_min) & (n_cover > 0)
    rows = np.nonzero(keep)[0]

    # Observed ellipse: intrinsic q + shear, smeared by the PSF (moments add in quadrature).
    q_int = truth["Q_INTRINSIC"]
    e_int = (1 - q_int**2) / (1 + q_int**2)
    rot = truth["ROTATION_RAD"]
    e1 = e_int * np.cos(2 * rot) + 2 * truth["G1_TRUE"]
    e2 = e_int * np.sin(2 * rot) + 2 * truth["G2_TRUE"]
    smear = hlr**2 / (hlr**2 + r_psf**2)
    e_obs = np.clip(np.hypot(e1, e2) * smear, 0.0, 0.95)
    q_obs = np.sqrt((1 - e_obs) / (1 + e_obs))
    beta_deg = np.degrees(0.5 * np.arctan2(e2, e1))
    pa_deg = (beta_deg - 90.0) % 180.0  # GalSim frame (u west, v north) -> east of north

    sat_star = is_star & (flux_adu * 0.2 > f.saturation_adu)  # peak pixel ~ 20 % of the flux for this PSF
    near_sat = np.zeros(n, dtype=bool)
    if sat_star.any():
        sx, sy = truth["RA"][sat_star], truth["DEC"][sat_star]
        cosd = math.cos(math.radians(float(np.mean(truth["DEC"]))))
        for a, b in zip(sx, sy, strict=True):
            near_sat |= np.hypot((truth["RA"] - a) * cosd, truth["DEC"] - b) * 3600 < 3.0
    dq = np.where(sat_star, 0x4, 0) | np.where(near_sat & ~sat_star, 0x8, 0)

    psf_frac = np.where(is_star, 1.0, fwhm**2 / (fwhm**2 + (2 * hlr) ** 2))
    cols = {
        "RIGHT_ASCENSION": truth["RA"],
        "DECLINATION": truth["DEC"],
        "FLUX_VIS_PSF": meas * psf_frac,
        "FLUX_DETECTION_TOTAL": meas,
        "FLUXERR_DETECTION_TOTAL": err_ujy,
        "SEMIMAJOR_AXIS": r_obs / np.sqrt(q_obs) / f.pixel_scale_arcsec,
        "ELLIPTICITY": 1.0 - q_obs,
        "POSITION_ANGLE": pa_deg,
        "KRON_RADIUS": np.maximum(3.5, 2.5 * r_obs / f.pixel_scale_arcsec),
        "SEGMENTATION_AREA": np.maximum(5, np.round(area_pix)).astype(np.int64),
        "VIS_DET": np.ones(n, dtype=np.int64),
        "SPURIOUS_FLAG": np.zeros(n, dtype=np.int64),
        "POINT_LIKE_FLAG": is_star.astype(np.int64),
        "DET_QUALITY_FLAG": dq.astype(np.int64),
    }
    cols = {k: np.asarray(v)[rows] for k, v in cols.items()}
    # Spurious detections (artefacts around bright stars / noise peaks): low S/N, flagged.
    n_sp = int(r.poisson(f.spurious_fraction * len(rows)))
    if n_sp:
        pick = r.integers(0, n, n_sp)
        dra = r.normal(0, 2.0 / 3600, n_sp)
        ddec = r.normal(0, 2.0 / 3600, n_sp)
        fl = r.uniform(0.05, 0.5, n_sp)
        extra = {
            "RIGHT_ASCENSION": truth["RA"][pick] + dra,
            "DECLINATION": truth["DEC"][pick] + ddec,
            "FLUX_VIS_PSF": fl,
            "FLUX_DETECTION_TOTAL": fl,
            "FLUXERR_DETECTION_TOTAL": fl / r.uniform(3, 8, n_sp),
            "SEMIMAJOR_AXIS": r.uniform(1, 3, n_sp),
            "ELLIPTICITY": r.uniform(0, 0.5, n_sp),
            "POSITION_ANGLE": r.uniform(0, 180, n_sp),
            "KRON_RADIUS": np.full(n_sp, 3.5),
            "SEGMENTATION_AREA": np.full(n_sp, 5, dtype=np.int64),
            "VIS_DET": np.ones(n_sp, dtype=np.int64),
            "SPURIOUS_FLAG": np.ones(n_sp, dtype=np.int64),
            "POINT_LIKE_FLAG": np.zeros(n_sp, dtype=np.int64),
            "DET_QUALITY_FLAG": np.zeros(n_sp, dtype=np.int64),
        }
        cols = {k: np.concatenate([cols[k], extra[k]]) for k in cols}
        rows = np.concatenate([rows, np.full(n_sp, -1)])
    cols["OBJECT_ID"] = _object_ids(cols["RIGHT_ASCENSION"], cols["DECLINATION"])
    out = {}
    for name, dtype in _mer_dtypes(MER_COLUMNS).items():
        if name not in cols:
            raise KeyError(
                f"synthetic MER catalog has no column {name!r} (required by io.mer_catalog.MER_COLUMNS)"
            )
        out[name] = np.asarray(cols[name]).astype(dtype)
    return out, rows


def _mer_dtypes(mer_columns) -> dict[str, np.dtype]:
    """Normalise MER_COLUMNS (mapping or sequence of (name, dtype)) to numpy dtypes."""
    import pyarrow as pa

    items = mer_columns.items() if hasattr(mer_columns, "items") else list(mer_columns)
    out = {}
    for name, dtype in items:
        if isinstance(dtype, pa.DataType):
            out[name] = np.dtype(dtype.to_pandas_dtype())
        else:
            out[name] = np.dtype(dtype)
    return out


def _write_mer_catalog(
    uri: str, cols: dict[str, np.ndarray], tile_id: int, storage_options: dict | None
) -> None:
    from astropy.io import fits

    fits_cols = []
    for name, arr in cols.items():
        code = {"i": {2: "I", 4: "J", 8: "K"}, "f": {4: "E", 8: "D"}, "u": {1: "B"}, "b": {1: "L"}}[
            arr.dtype.kind
        ][arr.dtype.itemsize]
        fits_cols.append(fits.Column(name=name, format=code, array=arr))
    table = fits.BinTableHDU.from_columns(fits_cols)
    table.header["EXTNAME"] = "MER_FINAL_CATALOG"
    table.header["TILEID"] = tile_id
    ph = fits.PrimaryHDU()
    ph.header["TILEID"] = tile_id
    ph.header["SIMULATD"] = True
    _write_fits(uri, [ph, table], storage_options)


# ----------------------------------------------------------------------------------------------------------
# Driver


@dataclasses.dataclass
class TileFieldSummary:
    tile_id: int
    obs_ids: list[int]
    n_galaxies: int
    n_stars: int
    n_catalog_rows: int
    g1_true: float
    g2_true: float
    files: list[str]
    skipped: bool


@dataclasses.dataclass
class FieldSummary:
    tiles: list[TileFieldSummary]
    seconds: float
    config_hash: str

    @property
    def n_files(self) -> int:
        return sum(len(t.files) for t in self.tiles)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _q1_root_of(uri: str) -> str:
    s = str(uri).rstrip("/")
    if "/q1/" in s + "/":
        return (s + "/").split("/q1/", 1)[0] + "/q1"
    return s.rsplit("/", 1)[0] if "/" in s else s


def tile_truth_uri(cfg, tile_id: int) -> str:
    """Folder of a tile's truth files (``{truth_base}/{tile_id}``)."""
    base = cfg.field.truth_base_uri or join_uri(_q1_root_of(cfg.data.vis_base_uri), "sim_truth")
    return join_uri(base, str(tile_id))


def field_config_hash(cfg) -> str:
    d = cfg.field.model_dump(mode="json")
    d.pop("truth_base_uri", None)
    # MER mosaics are an add-on product tracked in the manifest: switching them on keeps the exposures valid.
    d.pop("write_mer_mosaics", None)
    d.pop("mer_bands", None)
    # Paired-field keys at their defaults leave the hash (and so existing fields) unchanged.
    if not d.get("paired_noise"):
        d.pop("paired_noise", None)
    if not d.get("intrinsic_rotation_deg"):
        d.pop("intrinsic_rotation_deg", None)
    if d.get("noise_sign", 1) == 1:
        d.pop("noise_sign", None)
    d["_generator"] = "constellation-field-v1"
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _existing_manifest(cfg, tile_id: int) -> dict | None:
    uri = join_uri(tile_truth_uri(cfg, tile_id), "field_manifest.json")
    so = cfg.storage_options(uri)
    if not uri_exists(uri, so):
        return None
    try:
        return json.loads(read_text(uri, so))
    except (json.JSONDecodeError, DataAccessError) as exc:
        log.warning("unreadable field manifest %s (%s): regenerating the tile", uri, exc)
        return None


def _remove_files(cfg, uris: list[str]) -> None:
    for uri in uris:
        fs, path = get_fs(uri, cfg.storage_options(uri))
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)


def _write_parquet(uri: str, columns: dict[str, np.ndarray], storage_options: dict | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(uri, buf.getvalue(), storage_options)


def simulate_tile(
    cfg, tile_id: int, exposures: list[Exposure], force: bool = False, progress: Callable | None = None
) -> TileFieldSummary:
    """Simulate (or skip, if complete and unchanged) one tile's exposures, catalog and truth."""
    f = cfg.field
    h = field_config_hash(cfg)
    prev = _existing_manifest(cfg, tile_id)
    if prev is not None and not force:
        all_there = all(uri_exists(u, cfg.storage_options(u)) for u in prev.get("files", []))
        if prev.get("config_hash") == h and all_there:
            log.info("tile %s: synthetic field complete (config hash %s), skipping", tile_id, h)
            files = list(prev["files"])
            if f.write_mer_mosaics and set(prev.get("mer_mosaics") or {}) != {
                canonical_band(b) for b in f.mer_bands
            }:
                files = _add_mer_mosaics(cfg, tile_id, prev, len(exposures))
            return TileFieldSummary(
                tile_id,
                prev["obs_ids"],
                prev["n_galaxies"],
                prev["n_stars"],
                prev["n_catalog_rows"],
                prev["G1_TRUE"],
                prev["G2_TRUE"],
                files,
                True,
            )
        if prev.get("config_hash") != h:
            raise FileExistsError(
                f"tile {tile_id}: a synthetic field made with a different field config (hash "
                f"{prev.get('config_hash')} != {h}) exists under {tile_truth_uri(cfg, tile_id)}; "
                "re-run with force=True (--force) to replace it, or write to another data root"
            )
    if prev is not None:
        # Drop the completeness marker first: an interrupted regeneration must never look complete.
        _remove_files(cfg, [join_uri(tile_truth_uri(cfg, tile_id), "field_manifest.json")])
        _remove_files(cfg, list(prev.get("files", [])))

    truth = simulate_tile_sources(cfg, tile_id, exposures)
    g_mean = truth.pop("_g_mean")
    files: list[str] = []
    n_cover = np.zeros(len(truth["RA"]), dtype=np.int32)
    for e in exposures:
        ef, info = render_exposure(cfg, e, truth)
        files += list(ef.values())
        n_cover += info["covered"]
        if progress:
            progress()

    mer, rows = _mer_catalog(cfg, tile_id, truth, n_cover)
    ts = _timestamp(f.seed, "MER", tile_id)
    mer_uri = join_uri(
        cfg.data.catalog_base_uri,
        str(tile_id),
        mer_file_name(tile_id, _hash_hex(f.seed, "mer-hash", tile_id), ts),
    )
    _write_mer_catalog(mer_uri, mer, tile_id, cfg.storage_options(mer_uri))
    files.append(mer_uri)
    mosaics = render_mer_mosaics(cfg, tile_id, truth, len(exposures)) if f.write_mer_mosaics else {}
    files += list(mosaics.values())

    # Truth: every simulated object, with its MER OBJECT_ID when detected (-1 otherwise).
    obj_id = np.full(len(truth["RA"]), -1, dtype=np.int64)
    real = rows >= 0
    obj_id[rows[real]] = mer["OBJECT_ID"][real]
    truth_cols = {"TILE_ID": np.full(len(truth["RA"]), tile_id, dtype=np.int64), "OBJECT_ID": obj_id, **truth}
    truth_cols["N_EXPOSURES"] = n_cover
    tdir = tile_truth_uri(cfg, tile_id)
    tuple_uri = join_uri(tdir, "truth_objects.parquet")
    _write_parquet(tuple_uri, truth_cols, cfg.storage_options(tuple_uri))
    n_gal = int((~truth["IS_STAR"]).sum())
    n_star = int(truth["IS_STAR"].sum())
    shear = {
        "tile_id": tile_id,
        "G1_TRUE": float(g_mean[0]),
        "G2_TRUE": float(g_mean[1]),
        "shear_model": f.shear_model,
        "frame": "GalSim local world frame (u = west, v = north); equals detector x, y at position_angle_deg = 0",
        "seed": f.seed,
        "config_hash": h,
    }
    shear_uri = join_uri(tdir, "shear_truth.json")
    atomic_write_bytes(shear_uri, json.dumps(shear, indent=2).encode(), cfg.storage_options(shear_uri))
    files += [tuple_uri, shear_uri]
    obs_ids = sorted({e.obs_id for e in exposures})
    manifest = {
        "tile_id": tile_id,
        "config_hash": h,
        "obs_ids": obs_ids,
        "n_galaxies": n_gal,
        "n_stars": n_star,
        "n_catalog_rows": int(len(rows)),
        "G1_TRUE": shear["G1_TRUE"],
        "G2_TRUE": shear["G2_TRUE"],
        "files": files,
        "mer_mosaics": mosaics,
    }
    man_uri = join_uri(tdir, "field_manifest.json")
    atomic_write_bytes(man_uri, json.dumps(manifest, indent=2).encode(), cfg.storage_options(man_uri))
    return TileFieldSummary(
        tile_id, obs_ids, n_gal, n_star, int(len(rows)), shear["G1_TRUE"], shear["G2_TRUE"], files, False
    )


def _add_mer_mosaics(cfg, tile_id: int, prev: dict, n_exposures: int) -> list[str]:
    """Write the MER mosaics of a complete tile from its truth table and record them in its manifest."""
    import pyarrow.parquet as pq

    tdir = tile_truth_uri(cfg, tile_id)
    truth_uri = join_uri(tdir, "truth_objects.parquet")
    fs, path = get_fs(truth_uri, cfg.storage_options(truth_uri))
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh)
    truth = {k: table.column(k).to_numpy() for k in table.column_names}
    old = set((prev.get("mer_mosaics") or {}).values())
    mosaics = render_mer_mosaics(cfg, tile_id, truth, n_exposures)
    _remove_files(cfg, sorted(old - set(mosaics.values())))
    files = [u for u in prev["files"] if u not in old] + list(mosaics.values())
    manifest = {**prev, "files": files, "mer_mosaics": mosaics}
    man_uri = join_uri(tdir, "field_manifest.json")
    atomic_write_bytes(man_uri, json.dumps(manifest, indent=2).encode(), cfg.storage_options(man_uri))
    return files


def simulate_field(cfg, force: bool = False, progress: bool = False) -> FieldSummary:
    """Write the synthetic field of ``cfg.field`` in the Q1 layout under ``cfg.data`` (idempotent).

    A tile whose ``field_manifest.json`` records the same field config and whose files all exist is skipped;
    ``force=True`` regenerates it (removing the files listed in the old manifest first).
    """
    t0 = time.perf_counter()
    if cfg.field.write_mer_mosaics:
        _mer_bands(cfg.field)  # fail before any rendering
    exposures = exposure_layout(cfg)
    by_tile: dict[int, list[Exposure]] = {}
    for e in exposures:
        by_tile.setdefault(e.tile_id, []).append(e)
    tiles = []
    if progress:
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            task = bar.add_task("simulating exposures", total=len(exposures))
            for tile_id, exps in by_tile.items():
                s = simulate_tile(cfg, tile_id, exps, force=force, progress=lambda: bar.advance(task))
                if s.skipped:
                    bar.advance(task, len(exps))
                tiles.append(s)
    else:
        for tile_id, exps in by_tile.items():
            tiles.append(simulate_tile(cfg, tile_id, exps, force=force))
    return FieldSummary(tiles, time.perf_counter() - t0, field_config_hash(cfg))
