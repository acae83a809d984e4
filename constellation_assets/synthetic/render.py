"""Rendering of the synthetic VIS exposures: quadrant images, sky, noise, detector defects, cosmics, files.

Each object is drawn with GalSim through the quadrant's local WCS, convolved with the full (untruncated) PSF
at its focal-plane position (:func:`constellation_assets.synthetic.psf.field_psf`), once per dither: the
nominal and short exposures of a dither share the pointing and the PSF, so the short exposure's model is the
nominal one scaled by the exposure-time ratio. Per exposure: sky (``sky_level_adu`` per nominal exposure,
scaled with EXPTIME, 2 % gradient), noise, saturation, cosmic rays (rate per exposure time), and the fixed
hot/cold pixels of the quadrant.

Noise: by default Poisson on electrons (GAIN e-/ADU) plus Gaussian read noise. With ``paired_noise`` the
noise is Gaussian with the Poisson variance of (model + sky) plus the read noise, drawn as
z * sigma(pixel) with z from a stream that depends on the exposure and quadrant only: two fields that differ
only in shear have identical noise, cosmics and masks away from sources (common random numbers). Under
whole-scene shear (``shear_positions``) a galaxy at distance r from the tile centre moves by ~|g| r between
a +g and a -g field (2.4" at 2' for g = 0.02), so it sits on other noise pixels: the common noise then
cancels only for galaxies within ~1 pixel / |g| of the centre, while shape noise still cancels through
``intrinsic_rotation_deg`` partners. With ``shear_positions: false`` galaxies keep their pixels and the pixel
noise cancels too.
"""

from __future__ import annotations

import math

import numpy as np

from constellation_assets.euclid import FLG_COLD, FLG_COSMIC, FLG_HOT, FLG_INVALID, FLG_SAT
from constellation_assets.synthetic.focal_plane import (
    Exposure,
    QuadrantGeom,
    focal_plane,
    fp_coords_norm,
    primary_header,
    quadrant_header,
)
from constellation_assets.synthetic.layout import (
    det_file_name,
    file_timestamp,
    psf_file_name,
    rng_for,
    write_fits,
)
from constellation_assets.synthetic.population import lensed_galaxy_profile, load_cosmos_param_table
from constellation_assets.synthetic.psf import (
    draw_finite,
    field_psf,
    psf_fwhm_arcsec_at,
    psf_grid_image,
    psf_shear_at,
)

__all__ = [
    "exposure_files",
    "expose_quadrant",
    "psf_file_uri",
    "render_dither",
    "render_quadrant_model",
    "write_psf_product",
]

#: FLG bits that zero the weight map.
_WGT_MASK = FLG_INVALID | FLG_HOT | FLG_COLD | FLG_SAT


def _stamp_size(hlr_arcsec: float, mag: float, is_star: bool, scale: float) -> int:
    if is_star:
        n = 33 if mag > 21 else (65 if mag > 18 else 129)
    else:
        n = int(2 * math.ceil(5.0 * math.hypot(hlr_arcsec, 0.12) / scale) + 1)
        n = min(max(n, 25), 161)
    return n | 1


def render_quadrant_model(cfg, exp: Exposure, q: QuadrantGeom, truth: dict, xy) -> np.ndarray:
    """Noiseless source image (ADU per nominal exposure, float64) of one quadrant at ``exp``'s pointing."""
    import galsim

    f = cfg.field
    nx, ny = f.quadrant_nx_pix, f.quadrant_ny_pix
    x, y = xy  # FITS 1-based pixel coordinates of every truth object in this quadrant
    # GalSim's default accuracy: a relaxed folding_threshold makes the Airy's k-space values NaN on some FFT
    # grids under a non-diagonal WCS jacobian (GalSim 2.8), which draw_finite would catch.
    gsp = galsim.GSParams(folding_threshold=1e-2, maximum_fft_size=8192)
    image = galsim.ImageF(nx, ny, xmin=1, ymin=1)
    cat = load_cosmos_param_table()
    wcs = galsim.GSFitsWCS(header=galsim.FitsHeader(header=quadrant_header(f, exp, q)))
    pix_scale = f.pixel_scale_arcsec
    sel = np.nonzero((x > -40) & (x < nx + 40) & (y > -40) & (y < ny + 40))[0]
    for i in sel:
        is_star = bool(truth["IS_STAR"][i])
        n = _stamp_size(float(truth["HLR_ARCSEC"][i]), float(truth["MAG_VIS_TRUE"][i]), is_star, pix_scale)
        if x[i] < 1 - n // 2 or x[i] > nx + n // 2 or y[i] < 1 - n // 2 or y[i] > ny + n // 2:
            continue
        xfp, yfp = q.x0_pix + x[i] - 0.5, q.y0_pix + y[i] - 0.5
        fwhm = float(psf_fwhm_arcsec_at(f, xfp, yfp))
        pg1, pg2 = (float(v) for v in psf_shear_at(f, exp.obs_id, xfp, yfp))
        flux = float(truth["FLUX_ADU_PER_EXPOSURE"][i])
        gal = None if is_star else lensed_galaxy_profile(cat, i, truth, gsparams=gsp)

        def make(nudge, gal=gal, fwhm=fwhm, pg1=pg1, pg2=pg2, flux=flux):
            psf = field_psf(fwhm, pg1, pg2, gsparams=gsp, nudge=nudge)
            return psf.withFlux(flux) if gal is None else galsim.Convolve(gal, psf, gsparams=gsp)

        ix, iy = int(round(x[i])), int(round(y[i]))
        pos = galsim.PositionD(float(x[i]), float(y[i]))
        what = f"truth object {i} (star={is_star}) in {q.det_id} of obs {exp.obs_id} dither {exp.dither}"
        stamp = draw_finite(make, what, nx=n, ny=n, wcs=wcs.local(pos), offset=(x[i] - ix, y[i] - iy))
        stamp.setCenter(ix, iy)
        b = stamp.bounds & image.bounds
        if b.isDefined():
            image[b] += stamp[b]
    return image.array.astype(np.float64)


def expose_quadrant(cfg, exp: Exposure, q: QuadrantGeom, model_nominal: np.ndarray):
    """SCI, RMS, FLG, BKG, WGT arrays (float32 ADU / int32 flags) of one exposure of one quadrant."""
    f = cfg.field
    nx, ny = f.quadrant_nx_pix, f.quadrant_ny_pix
    t_ratio = exp.exptime_s / f.exptime_s
    model = model_nominal * t_ratio
    # Smooth sky: 2 % gradient across the focal plane (shared by all quadrants of the exposure).
    yy, xx = np.mgrid[0:ny, 0:nx]
    u, v = fp_coords_norm(f, q.x0_pix + xx + 0.5, q.y0_pix + yy + 0.5)
    sky = f.sky_level_adu * t_ratio * (1.0 + 0.01 * u + 0.01 * v)

    gain, rn = f.gain_e_per_adu, f.read_noise_e
    ids = (exp.obs_id, exp.dither, exp.exposure, q.det_id)
    expected_e = np.clip((model + sky) * gain, 0.0, None)
    noise_rng = rng_for(f.seed, "noise", *ids)
    if f.paired_noise:
        z = noise_rng.standard_normal(expected_e.shape)
        sci = model + sky + f.noise_sign * z * np.sqrt(expected_e + rn * rn) / gain
    else:
        electrons = noise_rng.poisson(expected_e).astype(np.float64)
        electrons += noise_rng.normal(0.0, rn, size=expected_e.shape)
        sci = electrons / gain
    rms = np.sqrt(expected_e + rn * rn) / gain
    flg = np.zeros((ny, nx), dtype=np.int32)

    # Detector defects are fixed per quadrant (same pixels in every exposure).
    drng = rng_for(f.seed, "defects", q.det_id)
    n_hot = int(drng.poisson(f.hot_pixel_fraction * nx * ny))
    hy, hx = drng.integers(0, ny, n_hot), drng.integers(0, nx, n_hot)
    sci[hy, hx] += drng.uniform(500.0, 20000.0, n_hot) * t_ratio / gain
    flg[hy, hx] |= FLG_HOT
    n_cold = int(drng.poisson(f.cold_pixel_fraction * nx * ny))
    cy, cx = drng.integers(0, ny, n_cold), drng.integers(0, nx, n_cold)
    sci[cy, cx] *= 0.05
    flg[cy, cx] |= FLG_COLD

    # Cosmic rays (own stream: independent of the image): straight tracks of 1-15 pixels, ~1000 e- each.
    crng = rng_for(f.seed, "cosmics", *ids)
    n_cr = int(crng.poisson(f.cosmic_rate_per_mpix * t_ratio * nx * ny / 1e6))
    for _ in range(n_cr):
        length = 1 + int(crng.exponential(4.0))
        ang = crng.uniform(0, math.pi)
        x0, y0 = crng.uniform(0, nx), crng.uniform(0, ny)
        t = np.arange(length + 1)
        px = np.clip((x0 + t * math.cos(ang)).astype(int), 0, nx - 1)
        py = np.clip((y0 + t * math.sin(ang)).astype(int), 0, ny - 1)
        sci[py, px] += crng.uniform(300.0, 3000.0, size=len(t)) / gain
        flg[py, px] |= FLG_COSMIC

    sat = sci >= f.saturation_adu
    sci[sat] = f.saturation_adu
    flg[sat] |= FLG_SAT

    bkg_rms2 = (np.clip(sky * gain, 0.0, None) + rn * rn) / (gain * gain)
    wgt = np.where((flg & _WGT_MASK) != 0, 0.0, 1.0 / bkg_rms2)
    return sci.astype(np.float32), rms.astype(np.float32), flg, sky.astype(np.float32), wgt.astype(np.float32)


def exposure_files(cfg, exp: Exposure) -> dict[str, str]:
    """URIs of an exposure's DET, BKG and WGT files."""
    from constellation_assets.io.uri import join_uri

    folder = join_uri(cfg.data.vis_base_uri, str(exp.obs_id))
    return {
        kind: join_uri(
            folder,
            det_file_name(
                kind,
                exp.obs_id,
                exp.dither,
                file_timestamp(cfg.field.seed, kind, exp.obs_id, exp.dither, exp.exposure),
                exposure=exp.exposure,
            ),
        )
        for kind in ("DET", "BKG", "WGT")
    }


def psf_file_uri(cfg, obs_id: int) -> str:
    """URI of an observation's PSF product."""
    from constellation_assets.io.uri import join_uri

    ts = file_timestamp(cfg.field.seed, "PSF", obs_id)
    return join_uri(cfg.data.vis_base_uri, str(obs_id), psf_file_name(ts))


def write_psf_product(cfg, obs_id: int) -> str:
    """Write the observation's PSF product (one image HDU per quadrant, ``3-4.F``); returns its URI."""
    from astropy.io import fits

    f = cfg.field
    hdus = [primary_header(f, None, "PSF", obs_id=obs_id)]
    for q in focal_plane(f):
        grid, keys = psf_grid_image(f, obs_id, q)
        h = fits.Header()
        for k, v in keys.items():
            h[k] = v
        hdus.append(fits.ImageHDU(grid, header=h))
    uri = psf_file_uri(cfg, obs_id)
    write_fits(uri, hdus, cfg.storage_options(uri))
    return uri


def render_dither(cfg, exposures: list[Exposure], truth: dict) -> tuple[list[str], np.ndarray]:
    """Render and write the DET/BKG/WGT files of the exposures of one dither (same pointing).

    Returns the URIs written and, per truth object, how many of these exposures cover it.
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    f = cfg.field
    ref = exposures[0]
    if any(
        (e.obs_id, e.dither, e.ra_deg, e.dec_deg) != (ref.obs_id, ref.dither, ref.ra_deg, ref.dec_deg)
        for e in exposures
    ):
        raise ValueError("render_dither needs the exposures of one dither (same observation and pointing)")
    hdus = {e.exposure: {"DET": [], "BKG": [], "WGT": []} for e in exposures}
    covered = np.zeros(len(truth["RA"]), dtype=np.int32)
    for q in focal_plane(f):
        hdr = quadrant_header(f, ref, q)
        x, y = WCS(hdr).all_world2pix(truth["RA"], truth["DEC"], 1)
        inside = (x >= 0.5) & (x <= f.quadrant_nx_pix + 0.5) & (y >= 0.5) & (y <= f.quadrant_ny_pix + 0.5)
        covered += inside * len(exposures)
        model = render_quadrant_model(cfg, ref, q, truth, (x, y))
        for e in exposures:
            sci, rms, flg, bkg, wgt = expose_quadrant(cfg, e, q, model)
            sci_h = quadrant_header(f, e, q)
            rms_h = fits.Header()
            rms_h["EXTNAME"] = f"{q.det_id}.RMS"
            rms_h["BUNIT"] = "ADU"
            flg_h = fits.Header()
            flg_h["EXTNAME"] = f"{q.det_id}.FLG"
            flg_h["FLAGBITS"] = "ESA VIS flag map: 0 INVALID,1 HOT,2 COLD,3 SAT,4 COSMIC"
            hdus[e.exposure]["DET"] += [
                fits.ImageHDU(sci, header=sci_h),
                fits.ImageHDU(rms, header=rms_h),
                fits.ImageHDU(flg, header=flg_h),
            ]
            wcs_only = sci_h.copy()
            wcs_only["EXTNAME"] = q.det_id
            hdus[e.exposure]["BKG"].append(fits.ImageHDU(bkg, header=wcs_only.copy()))
            wgt_h = wcs_only.copy()
            wgt_h["BUNIT"] = "ADU-2"
            hdus[e.exposure]["WGT"].append(fits.ImageHDU(wgt, header=wgt_h))
    written = []
    for e in exposures:
        files = exposure_files(cfg, e)
        det = hdus[e.exposure]["DET"]
        # Q1 extensions "may appear in any order": shuffle deterministically per exposure.
        order = rng_for(f.seed, "hdu-order", e.obs_id, e.dither, e.exposure).permutation(len(det))
        det = [det[i] for i in order]
        so = cfg.storage_options(files["DET"])
        write_fits(files["DET"], [primary_header(f, e, "DET"), *det], so)
        write_fits(files["BKG"], [primary_header(f, e, "BKG"), *hdus[e.exposure]["BKG"]], so)
        write_fits(files["WGT"], [primary_header(f, e, "WGT"), *hdus[e.exposure]["WGT"]], so)
        written += [files["DET"], files["BKG"], files["WGT"]]
    return written, covered
