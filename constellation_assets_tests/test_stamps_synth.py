"""Small synthetic Q1-layout quadrants for the stamp/infer/worker tests (fixtures and writers, no tests).

One exposure = one DET file (``{ccd}.{quad}.SCI/.RMS/.FLG``), one BKG file and one PSF file (9 x 9 grid of
21 x 21 effective-PSF stamps oversampled x3) holding a single quadrant, with a TAN WCS of any
rotation/parity. Galaxies are GalSim Gaussians sheared in GalSim's world frame (u west, v north) and drawn
through the local WCS, convolved with the position-dependent PSF the PSF file models.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PIX = 0.1
OVS = 3
NQ = 160  # quadrant size (pixels)
CCD, QUAD = "1-1", "E"
RA0, DEC0 = 52.9869, -28.0


def psf_fwhm_at(x, y, nx=NQ, ny=NQ):
    """PSF FWHM (arcsec) varying linearly across the quadrant."""
    return 0.17 + 0.05 * (np.asarray(x) / nx) + 0.02 * (np.asarray(y) / ny)


def psf_profile(fwhm):
    import galsim

    return galsim.Gaussian(fwhm=float(fwhm))


def wcs_header(pa_deg=0.0, flip=False, crval=(RA0, DEC0), crpix=(NQ / 2, NQ / 2)):
    from astropy.io import fits

    s = PIX / 3600.0
    pa = math.radians(pa_deg)
    sign = -1.0 if not flip else 1.0  # standard images: RA increases to the left (x runs west)
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"] = crval
    h["CRPIX1"], h["CRPIX2"] = crpix
    h["CD1_1"] = sign * s * math.cos(pa)
    h["CD1_2"] = s * math.sin(pa)
    h["CD2_1"] = -sign * s * math.sin(pa)
    h["CD2_2"] = s * math.cos(pa)
    h["CUNIT1"] = h["CUNIT2"] = "deg"
    return h


def psf_grid_image(nx=NQ, ny=NQ):
    import galsim

    grid = np.zeros((189, 189), np.float32)
    xs = (np.arange(9) + 0.5) * nx / 9 - 0.5
    ys = (np.arange(9) + 0.5) * ny / 9 - 0.5
    pix = galsim.Pixel(PIX)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            eff = galsim.Convolve(psf_profile(psf_fwhm_at(x, y, nx, ny)), pix)
            im = eff.drawImage(nx=21, ny=21, scale=PIX / OVS, method="no_pixel").array
            grid[i * 21 : (i + 1) * 21, j * 21 : (j + 1) * 21] = im / im.sum()
    keys = {
        "PSFGRID": 9,
        "PSFSTAMP": 21,
        "OVERSAMP": OVS,
        "PSFPIXEL": "INCLUDED",
        "GRIDX0": float(xs[0] + 1),
        "GRIDDX": nx / 9,
        "GRIDY0": float(ys[0] + 1),
        "GRIDDY": ny / 9,
    }
    return grid, keys


def render_quadrant(
    header, gals, noise_sigma=0.0, sky=10.0, seed=1, nx=NQ, ny=NQ, magzerop=24.57, exptime=560.52
):
    """SCI (ADU, sky included), RMS, FLG, BKG arrays; ``gals`` rows: ra, dec, flux_adu, sigma_arcsec, g1, g2."""
    import galsim
    from astropy.wcs import WCS

    gwcs = galsim.GSFitsWCS(header=galsim.FitsHeader(header=header))
    w = WCS(header)
    image = galsim.ImageD(nx, ny, xmin=1, ymin=1)
    for ra, dec, flux, sig, g1, g2 in gals:
        x, y = w.all_world2pix([ra], [dec], 1)
        x, y = float(x[0]), float(y[0])
        psf = psf_profile(psf_fwhm_at(x - 1, y - 1, nx, ny))
        gal = galsim.Gaussian(sigma=sig, flux=flux).shear(g1=g1, g2=g2)
        obj = galsim.Convolve(gal, psf)
        ix, iy = int(round(x)), int(round(y))
        pos = galsim.PositionD(x, y)
        st = obj.drawImage(nx=65, ny=65, wcs=gwcs.local(pos), offset=(x - ix, y - iy))
        st.setCenter(ix, iy)
        b = st.bounds & image.bounds
        if b.isDefined():
            image[b] += st[b]
    rng = np.random.Generator(np.random.PCG64(seed))
    sci = image.array + sky + (rng.normal(0, noise_sigma, image.array.shape) if noise_sigma > 0 else 0.0)
    rms = np.full((ny, nx), max(noise_sigma, 1e-3), np.float32)
    flg = np.zeros((ny, nx), np.int32)
    bkg = np.full((ny, nx), sky, np.float32)
    h = header.copy()
    h["MAGZEROP"] = f"{magzerop:.2f}"
    h["EXPTIME"] = exptime
    h["GAIN"] = 3.48
    return sci.astype(np.float32), rms, flg, bkg, h


def write_exposure(folder: Path, obs_id: int, dither: int, arrays, nx=NQ, ny=NQ) -> dict:
    """Write DET/BKG/PSF FITS files; returns the manifest quadrant entry."""
    from astropy.io import fits

    sci, rms, flg, bkg, h = arrays
    folder.mkdir(parents=True, exist_ok=True)
    det = f"{CCD}.{QUAD}"
    stem = f"{obs_id:06d}-{dither:02d}-1-0000000__20241017T000000.000000Z.fits"
    paths = {k: folder / f"EUC_VIS_SWL-{k}-{stem}" for k in ("DET", "BKG")}
    paths["PSF"] = folder / f"EUC_VIS_GRD-PSF-{stem}"
    hs = h.copy()
    hs["EXTNAME"] = f"{det}.SCI"
    rh = fits.Header({"EXTNAME": f"{det}.RMS"})
    fh = fits.Header({"EXTNAME": f"{det}.FLG"})
    # FLG first and SCI last: readers must find HDUs by name, not order.
    fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(flg, fh), fits.ImageHDU(rms, rh), fits.ImageHDU(sci, hs)]
    ).writeto(paths["DET"], overwrite=True)
    bh = h.copy()
    bh["EXTNAME"] = det
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(bkg, bh)]).writeto(paths["BKG"], overwrite=True)
    grid, keys = psf_grid_image(nx, ny)
    ph = fits.Header()
    ph["EXTNAME"] = det
    for k, v in keys.items():
        ph[k] = v
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(grid, ph)]).writeto(paths["PSF"], overwrite=True)
    return {
        "sci_path": str(paths["DET"]),
        "bkg_path": str(paths["BKG"]),
        "wgt_path": "",
        "psf_path": str(paths["PSF"]),
        "quadrant": det,
        "ccd": CCD,
        "obs_id": f"{obs_id:06d}",
        "dither": f"{dither:02d}",
    }


def galaxy_positions(n, header, seed=3, margin=20, nx=NQ, ny=NQ):
    """(ra, dec) of ``n`` galaxies at random sub-pixel positions inside the quadrant (away from the edges)."""
    from astropy.wcs import WCS

    rng = np.random.Generator(np.random.PCG64(seed))
    k = int(np.ceil(np.sqrt(n)))  # a jittered k x k grid keeps neighbours out of each other's stamps
    gx, gy = np.meshgrid(np.linspace(margin, nx - margin, k), np.linspace(margin, ny - margin, k))
    pick = rng.permutation(k * k)[:n]
    x = gx.ravel()[pick] + rng.uniform(-0.5, 0.5, n)
    y = gy.ravel()[pick] + rng.uniform(-0.5, 0.5, n)
    ra, dec = WCS(header).all_pix2world(x, y, 0)
    return np.asarray(ra), np.asarray(dec), x, y


def write_manifest(folder: Path, quadrants, ra, dec, tile_id=102044185, row=1, col=2, core_mask=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(ra), dtype=np.int64) + 10_000_000_000
    cat = folder / "sources.parquet"
    pq.write_table(
        pa.table(
            {
                "OBJECT_ID": ids,
                "RIGHT_ASCENSION": np.asarray(ra, float),
                "DECLINATION": np.asarray(dec, float),
            }
        ),
        cat,
    )
    core = ids if core_mask is None else ids[np.asarray(core_mask, bool)]
    m = {
        "tile_id": tile_id,
        "sub_tile_row": row,
        "sub_tile_col": col,
        "sky_bounds": {
            "core_ra": [float(np.min(ra)), float(np.max(ra))],
            "core_dec": [float(np.min(dec)), float(np.max(dec))],
            "extended_ra": [float(np.min(ra)) - 0.01, float(np.max(ra)) + 0.01],
            "extended_dec": [float(np.min(dec)) - 0.01, float(np.max(dec)) + 0.01],
        },
        "quadrants": list(quadrants),
        "source_catalog": str(cat),
        "sources_uri": str(cat),
        "source_ids": ids.tolist(),
        "core_source_ids": core.tolist(),
        "inference": {},
        "gal": {},
    }
    path = folder / f"manifest_{tile_id}_{row}_{col}.yaml"
    path.write_text(yaml.safe_dump(m, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# The real Q1 layout (per-exposure DET/BKG/WGT, one native GRD-PSF file per observation), tiny sizes.

#: Real Q1 example: ``EUC_VIS_SWL-DET-002704-00-2-0000000__20241017T042759.344384Z.fits`` (a short exposure).
REAL_SHORT_DET = "EUC_VIS_SWL-DET-002704-00-2-0000000__20241017T042759.344384Z.fits"


def vis_name(kind: str, obs_id: int, dither: int, exposure: int, ts: str) -> str:
    """Q1 VIS file name of a DET / BKG / WGT file."""
    return f"EUC_VIS_SWL-{kind}-{obs_id:06d}-{dither:02d}-{exposure}-0000000__{ts}Z.fits"


def psf_name(ts: str) -> str:
    """Q1 VIS PSF product name (one per observation folder)."""
    return f"EUC_VIS_GRD-PSF-000-000000-0000000__{ts}Z.fits"


def native_psf_grid(nx=NQ, ny=NQ, beta=1.7, n=9, s=21, fwhm=None):
    """A Q1-like PSF HDU image (n s x n s): n x n native-pixel stamps of a Moffat(beta) effective PSF.

    Each stamp is the pixel-convolved PSF point-sampled at 0.1" on an s x s box, drawn with unit total flux:
    the box holds only part of it (beta 1.7 at FWHM ~0.2": sums ~0.95, like the Q1 PSFEx models), and the
    stamp sums are returned too (n, n). Node (i, j) models quadrant pixel ((j + 1/2) nx / n - 1/2, ...).
    """
    import galsim

    img = np.zeros((n * s, n * s), np.float32)
    sums = np.zeros((n, n))
    xs = (np.arange(n) + 0.5) * nx / n - 0.5
    ys = (np.arange(n) + 0.5) * ny / n - 0.5
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            f = float(psf_fwhm_at(x, y, nx, ny)) if fwhm is None else float(fwhm)
            prof = galsim.Moffat(beta=beta, fwhm=f) if beta else galsim.Gaussian(fwhm=f)
            eff = galsim.Convolve(prof, galsim.Pixel(PIX))
            st = eff.drawImage(nx=s, ny=s, scale=PIX, method="no_pixel").array
            img[i * s : (i + 1) * s, j * s : (j + 1) * s] = st
            sums[i, j] = st.astype(np.float64).sum()
    return img, sums


def q1_wcs_header(det_index: int = 0, nx=NQ, ny=NQ):
    """A TAN WCS for quadrant ``det_index`` of a tiny focal plane (quadrants side by side in RA)."""
    return wcs_header(crval=(RA0 - det_index * (nx + 10) * PIX / 3600.0 / math.cos(math.radians(DEC0)), DEC0),
                      crpix=(nx / 2, ny / 2))  # fmt: skip


def write_q1_exposure(
    folder: Path,
    obs_id: int,
    dither: int,
    exposure: int,
    ts: str,
    quads: dict,
    exptime_s: float,
    exptime_in_sci: bool = False,
    companions_ts: str | None = None,
) -> dict[str, Path]:
    """Write the DET, BKG and WGT files of one exposure in the Q1 layout; returns {kind: path}.

    ``quads``: {det_id: (sci, rms, flg, bkg, header)} (e.g. from :func:`render_quadrant`). EXPTIME goes in
    the DET primary header (and in the SCI headers only with ``exptime_in_sci``); MAGZEROP stays a string
    in the SCI header. The extensions are written in a scrambled order (RMS, FLG, SCI per quadrant, quadrants
    in reverse order): readers must find HDUs by name. Companions carry their own timestamp (``companions_ts``).
    """
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    cts = companions_ts or ts
    paths = {
        "DET": folder / vis_name("DET", obs_id, dither, exposure, ts),
        "BKG": folder / vis_name("BKG", obs_id, dither, exposure, cts),
        "WGT": folder / vis_name("WGT", obs_id, dither, exposure, cts),
    }
    prim = fits.Header()
    prim["EXPTIME"] = exptime_s
    prim["OBS_ID"] = obs_id
    prim["RA"], prim["DEC"] = RA0, DEC0
    det_hdus, bkg_hdus, wgt_hdus = [fits.PrimaryHDU(header=prim)], [fits.PrimaryHDU()], [fits.PrimaryHDU()]
    for det_id, (sci, rms, flg, bkg, h) in reversed(list(quads.items())):
        hs = h.copy()
        if not exptime_in_sci:
            hs.remove("EXPTIME", ignore_missing=True)
        else:
            hs["EXPTIME"] = exptime_s
        hs["EXTNAME"] = f"{det_id}.SCI"
        det_hdus += [
            fits.ImageHDU(np.asarray(rms, np.float32), fits.Header({"EXTNAME": f"{det_id}.RMS"})),
            fits.ImageHDU(np.asarray(flg, np.int32), fits.Header({"EXTNAME": f"{det_id}.FLG"})),
            fits.ImageHDU(np.asarray(sci, np.float32), hs),
        ]
        bh = h.copy()
        bh.remove("EXPTIME", ignore_missing=True)
        bh["EXTNAME"] = det_id
        bkg_hdus.append(fits.ImageHDU(np.asarray(bkg, np.float32), bh))
        wgt_hdus.append(
            fits.ImageHDU((1.0 / np.square(rms)).astype(np.float32), fits.Header({"EXTNAME": det_id}))
        )
    for kind, hdus in (("DET", det_hdus), ("BKG", bkg_hdus), ("WGT", wgt_hdus)):
        fits.HDUList(hdus).writeto(paths[kind], overwrite=True)
    return paths


def write_q1_psf(folder: Path, ts: str, quads: dict, beta=1.7) -> Path:
    """The observation's PSF file: one 189 x 189 HDU per quadrant named ``{det_id}``, no grid keywords."""
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / psf_name(ts)
    hdus = [fits.PrimaryHDU()]
    for det_id, shape in quads.items():
        img, _ = native_psf_grid(nx=shape[1], ny=shape[0], beta=beta)
        hdus.append(fits.ImageHDU(img, fits.Header({"EXTNAME": det_id})))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def flat_quadrant(det_index: int, nx=40, ny=42, sky=12.0):
    """Constant sky SCI/RMS/FLG/BKG arrays and a header (for discovery and index tests)."""
    h = q1_wcs_header(det_index, nx, ny)
    h["MAGZEROP"] = "24.56605"
    h["GAIN"] = 3.48
    sci = np.full((ny, nx), sky, np.float32)
    return (
        sci,
        np.ones((ny, nx), np.float32),
        np.zeros((ny, nx), np.int32),
        np.full((ny, nx), sky, np.float32),
        h,
    )
