"""A tiny Q1-layout field for the injection tests (fast: ~0.2 s), and a check that hosts are found in it.

Layout as in the Q1 bucket (and the synthetic field): ``{root}/q1/VIS/{obs_id}/EUC_VIS_SWL-DET-...fits`` with
``"{row}-{col}.{quad}.SCI"`` / ``.RMS`` / ``.FLG`` HDUs (TAN WCS, EXPTIME, MAGZEROP as a string, GAIN) and
``{root}/q1/catalogs/MER_FINAL_CATALOG/{tile_id}/EUC_MER_FINAL-CAT_TILE{tile_id}-...fits``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TILE_ID = 102044185
TILE_CENTER = (52.9869, -28.0)
EXPTIME_S = 560.52
MAGZEROP = 24.57
GAIN = 3.48
SKY_ADU = 45.0
QUAD_PIX = 200
PIXEL_SCALE_ARCSEC = 0.1


def _header(crpix, crval):
    from astropy.io import fits

    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRPIX1"], h["CRPIX2"] = crpix
    h["CRVAL1"], h["CRVAL2"] = crval
    h["CD1_1"], h["CD1_2"] = -PIXEL_SCALE_ARCSEC / 3600.0, 0.0
    h["CD2_1"], h["CD2_2"] = 0.0, PIXEL_SCALE_ARCSEC / 3600.0
    h["EXPTIME"] = EXPTIME_S
    h["MAGZEROP"] = f"{MAGZEROP:.2f}"
    h["GAIN"] = GAIN
    return h


def make_tiny_field(root: Path, n_galaxies: int = 40, seed: int = 7, tile_id: int = TILE_ID) -> dict:
    """Write one DET frame (2 quadrants) and one MER catalog under ``root``; return the data config dict."""
    from astropy.io import fits
    from astropy.wcs import WCS

    rng = np.random.default_rng(seed)
    vis = root / "q1" / "VIS"
    cats = root / "q1" / "catalogs" / "MER_FINAL_CATALOG"
    (vis / "2689").mkdir(parents=True, exist_ok=True)
    (cats / str(tile_id)).mkdir(parents=True, exist_ok=True)
    ra0, dec0 = TILE_CENTER
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["EXPTIME"] = EXPTIME_S
    rows = {k: [] for k in ("ra", "dec", "mag", "sma", "pl")}
    yy, xx = np.mgrid[0:QUAD_PIX, 0:QUAD_PIX]
    noise_adu = np.sqrt(SKY_ADU * GAIN + 4.5**2) / GAIN
    for qi, name in enumerate(("3-4.E", "3-4.F")):
        # Quadrants side by side on the sky: F lies QUAD_PIX + 20 pixels east of E.
        crval = (ra0 - qi * (QUAD_PIX + 20) * PIXEL_SCALE_ARCSEC / 3600.0 / np.cos(np.radians(dec0)), dec0)
        h = _header((QUAD_PIX / 2, QUAD_PIX / 2), crval)
        img = np.full((QUAD_PIX, QUAD_PIX), SKY_ADU)
        n = n_galaxies // 2
        x = rng.uniform(35, QUAD_PIX - 35, n)
        y = rng.uniform(35, QUAD_PIX - 35, n)
        mag = rng.uniform(18.0, 21.5, n)
        sig_pix = rng.uniform(2.0, 4.0, n)
        point_like = np.zeros(n, dtype=np.int32)
        point_like[:2] = 1  # two stars: never hosts
        for i in range(n):
            flux = EXPTIME_S * 10 ** (-0.4 * (mag[i] - MAGZEROP))
            s = 1.0 if point_like[i] else sig_pix[i]
            img += flux * np.exp(-0.5 * ((xx - x[i]) ** 2 + (yy - y[i]) ** 2) / s**2) / (2 * np.pi * s**2)
        img = rng.normal(img, noise_adu).astype(np.float32)
        w = WCS(h)
        ra, dec = w.all_pix2world(x, y, 0)
        rows["ra"] += list(ra)
        rows["dec"] += list(dec)
        rows["mag"] += list(mag)
        rows["sma"] += list(np.where(point_like == 1, 1.0, 1.5 * sig_pix))
        rows["pl"] += list(point_like)
        sci = fits.ImageHDU(img, header=h, name=f"{name}.SCI")
        rms = fits.ImageHDU(np.full_like(img, noise_adu), name=f"{name}.RMS")
        flg = fits.ImageHDU(np.zeros(img.shape, dtype=np.int32), name=f"{name}.FLG")
        hdus += [flg, sci, rms]  # Q1 HDUs come in no fixed order
    fits.HDUList(hdus).writeto(
        vis / "2689" / "EUC_VIS_SWL-DET-002689-00-1-0000000__20241013T112246.798360Z.fits"
    )
    n = len(rows["ra"])
    flux_ujy = 10 ** (-0.4 * (np.array(rows["mag"]) - 23.9))
    cols = [
        fits.Column("OBJECT_ID", "K", array=-(10**17) - np.arange(n, dtype=np.int64) * 7919),
        fits.Column("RIGHT_ASCENSION", "D", array=np.array(rows["ra"])),
        fits.Column("DECLINATION", "D", array=np.array(rows["dec"])),
        fits.Column("FLUX_VIS_PSF", "D", array=flux_ujy * 0.5),
        fits.Column("FLUX_DETECTION_TOTAL", "D", array=flux_ujy),
        fits.Column("FLUXERR_DETECTION_TOTAL", "D", array=flux_ujy / 200.0),
        fits.Column("SEMIMAJOR_AXIS", "D", array=np.array(rows["sma"])),
        fits.Column("ELLIPTICITY", "D", array=np.zeros(n)),
        fits.Column("POSITION_ANGLE", "D", array=np.zeros(n)),
        fits.Column("KRON_RADIUS", "D", array=np.array(rows["sma"]) * 2),
        fits.Column("SEGMENTATION_AREA", "J", array=np.full(n, 100, dtype=np.int32)),
        fits.Column("VIS_DET", "J", array=np.ones(n, dtype=np.int32)),
        fits.Column("SPURIOUS_FLAG", "J", array=np.zeros(n, dtype=np.int32)),
        fits.Column("POINT_LIKE_FLAG", "J", array=np.array(rows["pl"], dtype=np.int32)),
        fits.Column("DET_QUALITY_FLAG", "J", array=np.zeros(n, dtype=np.int32)),
    ]
    tab = fits.BinTableHDU.from_columns(cols, name="MER_FINAL_CATALOG")
    fits.HDUList([fits.PrimaryHDU(), tab]).writeto(
        cats / str(tile_id) / f"EUC_MER_FINAL-CAT_TILE{tile_id}-ABC123_20240924T033645.917365Z_00.00.fits"
    )
    return {
        "vis_base_uri": str(vis) + "/",
        "catalog_base_uri": str(cats) + "/",
        "n_point_like": 4,
        "n_catalog": n,
    }


def tiny_config(tmp_path: Path, data: dict, **injection):
    from constellation_assets.config import load_config

    inj = {
        "n_total_train_per_split": 8,
        "partitions": 2,
        "oversampling": 2,
        "output_uri": str(tmp_path / "out"),
    }
    inj.update(injection)
    return load_config(
        {
            "tile_ids": [TILE_ID],
            "data": {"vis_base_uri": data["vis_base_uri"], "catalog_base_uri": data["catalog_base_uri"]},
            "output": {"root_uri": str(tmp_path / "root")},
            "injection": inj,
        }
    )


def test_tiny_field_hosts(tmp_path):
    from constellation_assets.sim.injection import discover_hosts

    data = make_tiny_field(tmp_path / "data")
    cfg = tiny_config(tmp_path, data)
    hs = discover_hosts(cfg)
    assert not hs.problems
    assert len(hs.quadrants) == 2
    # every catalog galaxy that is not point-like and whose stamp fits lies in a quadrant; stars never do
    assert 0 < len(hs.hosts) <= data["n_catalog"] - data["n_point_like"]
    assert all(h.semimajor_axis_pix >= cfg.injection.host_min_semimajor_axis_pix for h in hs.hosts)
    half = cfg.injection.stamp_size_pix // 2
    for h in hs.hosts:
        q = hs.quadrants[(h.frame_uri, h.hdu)]
        assert round(h.x_pix) - half >= 0 and round(h.x_pix) - half + 64 <= q.nx_pix
    # zero point: MAGZEROP (string header) + 2.5 log10(EXPTIME)
    q = next(iter(hs.quadrants.values()))
    assert abs(q.zero_point_mag - (24.57 + 2.5 * np.log10(560.52))) < 1e-9
