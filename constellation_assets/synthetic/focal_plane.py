"""The reduced VIS focal plane of the synthetic survey: CCD/quadrant geometry, exposures and WCS headers.

A field config describes ``ccd_grid`` CCDs of four quadrants (E lower-left, F lower-right, G upper-right,
H upper-left) of ``quadrant_nx_pix`` x ``quadrant_ny_pix`` pixels, separated by ``ccd_gap_pix``; the real VIS
focal plane is 6 x 6 CCDs of 2048 x 2066-pixel quadrants. Each tile gets ``n_observations`` pointings, each
with ``n_dithers`` dithers; every dither has one nominal exposure (exposure 1, ``exptime_s``) and the dithers
in ``short_exposure_dithers`` also a short one (exposure 2, ``short_exptime_s``) at the same pointing, as in
the real VIS sequence (4 nominal + 2 short exposures).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from constellation_assets.sky.tiles import tangent_to_radec
from constellation_assets.synthetic.layout import rng_for

__all__ = [
    "QUADRANT_LETTERS",
    "Exposure",
    "QuadrantGeom",
    "TPV_K3_PER_DEG2",
    "exposure_layout",
    "focal_plane",
    "focal_plane_halfsize_pix",
    "fp_coords_norm",
    "primary_header",
    "quadrant_header",
]

#: Quadrant letters of a VIS CCD and their position inside the CCD (column, row) in this model.
QUADRANT_LETTERS = ("E", "F", "G", "H")
_QUAD_POS = {"E": (0, 0), "F": (1, 0), "G": (1, 1), "H": (0, 1)}

#: TPV cubic radial distortion coefficient (deg^-2): ~1" at 0.35 deg from the centre, as for VIS.
TPV_K3_PER_DEG2 = 6.0e-3


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


def focal_plane_halfsize_pix(fcfg) -> tuple[float, float]:
    """Half width and half height of the focal plane (pixels)."""
    rows, cols = fcfg.ccd_grid
    width = cols * 2 * fcfg.quadrant_nx_pix + (cols - 1) * fcfg.ccd_gap_pix[0]
    height = rows * 2 * fcfg.quadrant_ny_pix + (rows - 1) * fcfg.ccd_gap_pix[1]
    return width / 2.0, height / 2.0


def fp_coords_norm(fcfg, xfp_pix, yfp_pix):
    """Focal-plane position in units of the half sizes: (u, v) in [-1, 1] over the focal plane."""
    hx, hy = focal_plane_halfsize_pix(fcfg)
    return np.asarray(xfp_pix) / hx, np.asarray(yfp_pix) / hy


@dataclasses.dataclass(frozen=True)
class Exposure:
    """One VIS exposure: its observation, dither, exposure number (1 nominal, 2 short) and pointing."""

    tile_id: int
    obs_id: int
    dither: int
    ra_deg: float  # pointing (focal-plane centre)
    dec_deg: float
    pa_deg: float
    exposure: int = 1
    exptime_s: float = 560.52

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.obs_id, self.dither, self.exposure)


def exposure_layout(cfg) -> list[Exposure]:
    """Every simulated exposure: tile -> observations -> dithers -> exposures (nominal, then short).

    Obs ids count up from ``first_obs_id``. A short exposure shares its dither's pointing.
    """
    from constellation_assets.sky.tiles import tile_center_deg

    f = cfg.field
    out = []
    obs_id = f.first_obs_id
    offsets = list(f.dither_offsets_arcsec) or [(0.0, 0.0)]
    short = set(int(d) for d in f.short_exposure_dithers)
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
                common = (int(tile_id), obs_id, d, float(ra_d), float(dec_d), f.position_angle_deg)
                out.append(Exposure(*common, exposure=1, exptime_s=float(f.exptime_s)))
                if d in short:
                    out.append(Exposure(*common, exposure=2, exptime_s=float(f.short_exptime_s)))
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
        h[f"PV{ax}_7"] = TPV_K3_PER_DEG2  # x^3 (xi^3 for axis 1, eta^3 for axis 2)
        h[f"PV{ax}_9"] = TPV_K3_PER_DEG2  # x y^2
    h["BUNIT"] = "ADU"
    h["GAIN"] = (fcfg.gain_e_per_adu, "e-/ADU")
    h["EXPTIME"] = (exp.exptime_s, "s")
    h["MAGZEROP"] = (f"{fcfg.magzerop:.2f}", "AB mag of 1 ADU/s")
    h["RDNOISE"] = (fcfg.read_noise_e, "e-")
    h["SATURATE"] = (fcfg.saturation_adu, "ADU")
    h["SATLEVEL"] = (fcfg.saturation_adu, "ADU")
    h["CCDID"] = q.ccd
    h["QUADID"] = q.quadrant
    h["OBS_ID"] = exp.obs_id
    h["DITHOBS"] = exp.dither
    h["EXPNUM"] = (exp.exposure, "1 nominal, 2 short")
    h["PTGRA"] = exp.ra_deg
    h["PTGDEC"] = exp.dec_deg
    return h


def primary_header(fcfg, exp: Exposure | None, kind: str, obs_id: int | None = None):
    """Primary HDU of a VIS product file (``exp`` None: the per-observation PSF file of ``obs_id``)."""
    from astropy.io import fits

    h = fits.Header()
    h["TELESCOP"] = "EUCLID"
    h["INSTRUME"] = "VIS"
    h["FILETYPE"] = kind
    h["OBS_ID"] = exp.obs_id if exp is not None else int(obs_id)
    if exp is not None:
        h["DITHOBS"] = exp.dither
        h["EXPNUM"] = (exp.exposure, "1 nominal, 2 short")
        h["PTGRA"] = exp.ra_deg
        h["PTGDEC"] = exp.dec_deg
        h["EXPTIME"] = exp.exptime_s
    h["GAIN"] = fcfg.gain_e_per_adu
    h["MAGZEROP"] = fcfg.magzerop
    h["SIMULATD"] = (True, "synthetic Constellation field")
    h["SIMSEED"] = fcfg.seed
    return fits.PrimaryHDU(header=h)
