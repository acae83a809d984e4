"""Objects of the synthetic survey: galaxies (COSMOS parametric fits), stars, and the lensing shear field.

- Galaxies: COSMOS F814W parametric fits (single Sersic or bulge + disk, GalSim's COSMOSCatalog recipe),
  packaged in ``constellation_assets/data/cosmos_parametric_f814w.csv``. Magnitudes follow Euclid-like VIS
  number counts (dlog10 N/dm = 0.31); a template is rescaled in size by 10**(-0.1 (m - m_template)) (fainter
  galaxies are smaller). Intrinsic shapes come from the template, orientations are random, then rotated by
  ``intrinsic_rotation_deg`` (90: the shape-noise-cancelling partner of a field).
- Stars: PSF-only point sources with number counts dlog10 N/dm = 0.1 (Milky Way: not lensed).
- Population first, lensing second: the set of objects (truth ids, unlensed positions, intrinsic shapes,
  magnitudes) depends on the seed and the footprint only, never on the shear, so fields that differ in shear
  hold the same objects.
- Lensing (``shear_positions``, default): the whole scene is sheared in the tangent plane of the tile centre
  by the lensing map of a constant reduced shear g with kappa = 0, beta = A theta, A = [[1 - g1, -g2],
  [-g2, 1 + g1]]: image positions theta = A^-1 beta, and each galaxy profile is lensed with the same map
  (shear g, magnification mu = 1 / (1 - |g|^2), so surface brightness is conserved). A +g and a -g field are
  then sheared copies of one unsheared sky. With ``shear_model = smooth_map`` the positions follow the tile
  mean shear and each profile its local shear. ``shear_positions: false``: positions stay unlensed and
  profiles are sheared without magnification. With ``scene_shear_group_arcsec`` set, the map is applied
  about the centre of each friends-of-friends group of galaxies (linking length in arcsec) instead of the
  tile centre: every blend is still an exact sheared copy of its unsheared self, while galaxies do not move
  by g * r across the tile, so +g/-g fields with paired noise keep their common noise (the field calibration
  needs that to reach sigma_m ~1e-3); separations beyond the linking length are left unsheared.
- Shear convention: (g1, g2) in GalSim's local world frame (u = west = -xi, v = north = eta), which equals
  the detector (x, y) frame at ``position_angle_deg = 0``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from constellation_assets.euclid import AB_ZEROPOINT_UJY
from constellation_assets.sky.tiles import radec_to_tangent, tangent_to_radec
from constellation_assets.synthetic.focal_plane import Exposure, focal_plane_halfsize_pix
from constellation_assets.synthetic.layout import rng_for

__all__ = [
    "COSMOS_PARAM_FILE",
    "derive_cosmos_param_table",
    "galaxy_profile",
    "lens_positions",
    "load_cosmos_param_table",
    "object_ids",
    "object_sed_alpha",
    "shear_field",
    "simulate_tile_sources",
    "tile_shear",
    "write_cosmos_param_csv",
]

COSMOS_PARAM_FILE = "cosmos_parametric_f814w.csv"

#: The population is drawn over the exposures' footprint enlarged by this fraction of its half size (plus
#: 5"), so that a whole-scene shear |g| <= 0.1 moves no empty sky into the exposures.
_POPULATION_PAD_FRACTION = 0.1
_POPULATION_PAD_ARCSEC = 5.0

#: SED slopes (f_nu ~ lambda**alpha) of the field's objects: galaxies alpha = 0.6 + 1.4 * bulge fraction
#: + N(0, 0.35) (discs blue, bulges red); stars uniform in [-1.5, 2.5] (hot to cool).
_GAL_ALPHA0, _GAL_ALPHA_BULGE, _GAL_ALPHA_SCATTER = 0.6, 1.4, 0.35
_STAR_ALPHA_RANGE = (-1.5, 2.5)


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


def _powerlaw_mags(r: np.random.Generator, n: int, mmin: float, mmax: float, slope: float) -> np.ndarray:
    """Magnitudes with dlog10 N/dm = slope in [mmin, mmax] (inverse CDF)."""
    a = slope * math.log(10.0)
    u = r.uniform(size=n)
    return mmin + np.log1p(u * np.expm1(a * (mmax - mmin))) / a


def tile_shear(fcfg, tile_id: int) -> tuple[float, float]:
    """The tile's (mean) input shear: ``shear_g1`` / ``shear_g2`` when set, else drawn from the seed."""
    r = rng_for(fcfg.seed, "shear", tile_id)
    amp = fcfg.shear_amplitude
    if fcfg.shear_model == "constant":
        drawn = r.uniform(-amp, amp, size=2)
    else:
        r.uniform(0, 2 * math.pi, size=3)  # the map's direction and phases (see shear_field)
        drawn = r.uniform(-amp / 2, amp / 2, size=2)
    g1 = float(fcfg.shear_g1) if fcfg.shear_g1 is not None else float(drawn[0])
    g2 = float(fcfg.shear_g2) if fcfg.shear_g2 is not None else float(drawn[1])
    return g1, g2


def shear_field(fcfg, tile_id: int, xi_arcmin, eta_arcmin) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Input shear (g1, g2) at tile-tangent-plane positions, and the tile mean."""
    g1m, g2m = tile_shear(fcfg, tile_id)
    n = np.shape(xi_arcmin)[0]
    if fcfg.shear_model == "constant":
        return np.full(n, g1m), np.full(n, g2m), g1m, g2m
    # Smooth map: the mean plus a plane-wave pattern of amplitude shear_amplitude / 2.
    r = rng_for(fcfg.seed, "shear", tile_id)
    amp = fcfg.shear_amplitude
    ang, ph1, ph2 = r.uniform(0, 2 * math.pi, size=3)
    k = 2 * math.pi / fcfg.shear_wavelength_arcmin
    phase = k * (np.cos(ang) * np.asarray(xi_arcmin) + np.sin(ang) * np.asarray(eta_arcmin))
    g1 = g1m + 0.5 * amp * np.cos(phase + ph1)
    g2 = g2m + 0.5 * amp * np.sin(phase + ph2)
    return g1, g2, g1m, g2m


def lens_positions(xi_deg, eta_deg, g1: float, g2: float) -> tuple[np.ndarray, np.ndarray]:
    """Image positions theta = A^-1 beta of source positions beta (tile tangent plane, xi east, eta north).

    A = [[1 - g1, -g2], [-g2, 1 + g1]] (kappa = 0) acts in the shear frame (u = -xi, v = eta).
    """
    u, v = -np.asarray(xi_deg, dtype=float), np.asarray(eta_deg, dtype=float)
    det = 1.0 - g1 * g1 - g2 * g2
    tu = ((1.0 + g1) * u + g2 * v) / det
    tv = (g2 * u + (1.0 - g1) * v) / det
    return -tu, tv


def blend_group_centres(
    xi_deg: np.ndarray, eta_deg: np.ndarray, weight: np.ndarray, link_arcsec: float
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted centre of each object's friends-of-friends group (linking length ``link_arcsec``).

    Objects closer than the linking length (directly or through a chain) form one group; an isolated object
    is its own group and its own centre.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    xi, eta, w = (np.asarray(a, dtype=float) for a in (xi_deg, eta_deg, weight))
    n = len(xi)
    if n == 0:
        return xi.copy(), eta.copy()
    pairs = cKDTree(np.column_stack([xi, eta])).query_pairs(link_arcsec / 3600.0, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    wsum = np.bincount(label, weights=w)
    cx = np.bincount(label, weights=w * xi) / wsum
    cy = np.bincount(label, weights=w * eta) / wsum
    return cx[label], cy[label]


def object_ids(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Euclid-like OBJECT_IDs encoding a position (RA*1e7 x 1e9 + (Dec+90)*1e7), made unique."""
    ids = np.round(np.asarray(ra_deg) * 1e7).astype(np.int64) * 1_000_000_000 + np.round(
        (np.asarray(dec_deg) + 90.0) * 1e7
    ).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    for i in range(1, len(s)):
        if s[i] <= s[i - 1]:
            s[i] = s[i - 1] + 1
    out = np.empty_like(ids)
    out[order] = s
    return out


def _footprint_box(cfg, tile_id: int, exposures: list[Exposure]) -> tuple[float, float, float, float]:
    """Tile-tangent-plane box (deg) holding every exposure's focal plane, padded for whole-scene shear."""
    from constellation_assets.sky.tiles import tile_center_deg

    f = cfg.field
    ra_t, dec_t = tile_center_deg(int(tile_id))
    hx, hy = focal_plane_halfsize_pix(f)
    xs, es = [], []
    for e in exposures:
        xi_c, eta_c = radec_to_tangent(e.ra_deg, e.dec_deg, ra_t, dec_t)
        if e.pa_deg % 180 == 0:
            ex, ey = hx * f.pixel_scale_arcsec / 3600.0, hy * f.pixel_scale_arcsec / 3600.0
        else:  # rotated focal plane: bound it by its half-diagonal
            ex = ey = math.hypot(hx, hy) * f.pixel_scale_arcsec / 3600.0
        xs += [float(xi_c) - ex, float(xi_c) + ex]
        es += [float(eta_c) - ey, float(eta_c) + ey]
    xi_lo, xi_hi, eta_lo, eta_hi = min(xs), max(xs), min(es), max(es)
    # Pad relative to the tile centre: a shear moves a point by up to |g| times its distance from it.
    px = _POPULATION_PAD_FRACTION * max(abs(xi_lo), abs(xi_hi)) + _POPULATION_PAD_ARCSEC / 3600.0
    py = _POPULATION_PAD_FRACTION * max(abs(eta_lo), abs(eta_hi)) + _POPULATION_PAD_ARCSEC / 3600.0
    return xi_lo - px, xi_hi + px, eta_lo - py, eta_hi + py


def simulate_tile_sources(cfg, tile_id: int, exposures: list[Exposure]) -> dict[str, np.ndarray]:
    """Truth table of one tile: galaxies and stars over the area its exposures cover (vectorised draws).

    Columns: TRUE_ID, RA/DEC (observed, lensed), RA_UNLENSED/DEC_UNLENSED, IS_STAR, MAG_VIS_TRUE (unlensed),
    FLUX_ADU_PER_EXPOSURE (unlensed, nominal exposure), FLUX_UJY_TRUE, MU, COSMOS_INDEX, COSMOS_IDENT,
    SIZE_SCALE, ROTATION_RAD (applied, including intrinsic_rotation_deg), USE_BULGEFIT, HLR_ARCSEC,
    Q_INTRINSIC, G1_TRUE, G2_TRUE, OBJECT_ID_TRUTH (the MER OBJECT_ID this object gets when it is the
    brightest member of a detection; a function of the unlensed position only). ``_g_mean`` holds the
    tile-mean shear.
    """
    from constellation_assets.sky.tiles import tile_center_deg

    f = cfg.field
    ra_t, dec_t = tile_center_deg(int(tile_id))
    xi_lo, xi_hi, eta_lo, eta_hi = _footprint_box(cfg, tile_id, exposures)
    area_arcmin2 = (xi_hi - xi_lo) * (eta_hi - eta_lo) * 3600.0

    r = rng_for(f.seed, "sources", tile_id)
    n_gal = int(r.poisson(f.galaxy_density_arcmin2 * area_arcmin2))
    n_star = int(r.poisson(f.star_density_arcmin2 * area_arcmin2))
    n = n_gal + n_star
    xi = r.uniform(xi_lo, xi_hi, size=n)
    eta = r.uniform(eta_lo, eta_hi, size=n)
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
    rot = np.where(is_star, 0.0, rot + math.radians(f.intrinsic_rotation_deg))

    ra_src, dec_src = tangent_to_radec(xi, eta, ra_t, dec_t)
    g1, g2, g1m, g2m = shear_field(f, tile_id, xi * 60.0, eta * 60.0)
    g1 = np.where(is_star, 0.0, g1)
    g2 = np.where(is_star, 0.0, g2)
    if f.shear_positions:
        if f.scene_shear_group_arcsec:
            # Shear each blend group about its own centre: inside a group the scene is an exact sheared copy,
            # and an isolated galaxy keeps its pixels (and so its paired noise) in every field.
            gal = ~is_star
            cx, cy = xi.copy(), eta.copy()
            cx[gal], cy[gal] = blend_group_centres(
                xi[gal], eta[gal], 10.0 ** (-0.4 * mag[gal]), f.scene_shear_group_arcsec
            )
            lx, le = lens_positions(xi - cx, eta - cy, g1m, g2m)
            lx, le = lx + cx, le + cy
        else:
            lx, le = lens_positions(xi, eta, g1m, g2m)
        xi_obs, eta_obs = np.where(is_star, xi, lx), np.where(is_star, eta, le)
        mu = np.where(is_star, 1.0, 1.0 / (1.0 - g1 * g1 - g2 * g2))
    else:
        xi_obs, eta_obs = xi, eta
        mu = np.ones(n)
    ra, dec = tangent_to_radec(xi_obs, eta_obs, ra_t, dec_t)

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
        "RA": np.asarray(ra, dtype=float),
        "DEC": np.asarray(dec, dtype=float),
        "RA_UNLENSED": np.asarray(ra_src, dtype=float),
        "DEC_UNLENSED": np.asarray(dec_src, dtype=float),
        "IS_STAR": is_star,
        "MAG_VIS_TRUE": mag,
        "FLUX_ADU_PER_EXPOSURE": flux_adu,
        "FLUX_UJY_TRUE": 10.0 ** (-0.4 * (mag - AB_ZEROPOINT_UJY)),
        "MU": mu,
        "COSMOS_INDEX": idx.astype(np.int64),
        "COSMOS_IDENT": np.where(is_star, -1, cat["ident"][ti]).astype(np.int64),
        "SIZE_SCALE": size_scale,
        "ROTATION_RAD": rot,
        "USE_BULGEFIT": use_b.astype(np.int8),
        "HLR_ARCSEC": np.where(is_star, 0.0, hlr),
        "Q_INTRINSIC": q,
        "G1_TRUE": g1,
        "G2_TRUE": g2,
        "OBJECT_ID_TRUTH": object_ids(ra_src, dec_src),
    }
    truth["_g_mean"] = np.array([g1m, g2m])
    return truth


def galaxy_profile(cat: dict, i: int, truth: dict, gsparams=None):
    """GalSim profile of truth row ``i`` before lensing and PSF (flux in ADU per nominal exposure)."""
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


def lensed_galaxy_profile(cat: dict, i: int, truth: dict, gsparams=None):
    """Truth row ``i`` as observed before the PSF: :func:`galaxy_profile` lensed by (G1_TRUE, G2_TRUE, MU)."""
    g1, g2 = float(truth["G1_TRUE"][i]), float(truth["G2_TRUE"][i])
    mu = float(truth["MU"][i]) if "MU" in truth else 1.0
    gal = galaxy_profile(cat, i, truth, gsparams=gsparams)
    return gal.lens(g1, g2, mu) if mu != 1.0 else gal.shear(g1=g1, g2=g2)


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
