"""MER products of the synthetic survey: background-subtracted mosaics and the MER final catalog.

Mosaics (``q1/MER/{tile_id}/{VIS|NISP}/EUC_MER_BGSUB-MOSAIC-{token}_TILE...``): image in the primary HDU,
float32, on the tile's 0.1" TAN grid (north up, CRVAL = tile centre, the full 19200 x 19200 tile grid has
CRPIX 9600; a mosaic covers the simulated area only, so its CRPIX is 9600 minus its offset in the full grid),
``MAGZERO = 24.6`` (m_AB = -2.5 log10(pixel value) + MAGZERO), no BUNIT, like the real Q1 mosaics.

Catalog (``field.mer_catalog``):
``measured`` (default)
    sources detected on the noisy VIS mosaic of the tile: a Gaussian-smoothed detection image thresholded
    at ``catalog_detect_nsigma``, local maxima closer than ``catalog_deblend_arcsec`` merged into one
    detection; per detection a windowed (Gaussian-weighted, iterated) centroid, weighted second moments
    (corrected for the weight: SEMIMAJOR_AXIS, ELLIPTICITY, POSITION_ANGLE), a Kron-like radius and the
    aperture flux within it with its noise error (FLUX_DETECTION_TOTAL, FLUXERR_DETECTION_TOTAL), a
    PSF-weighted flux (FLUX_VIS_PSF) and a size-based star/galaxy flag (POINT_LIKE_FLAG). Each detection
    takes the OBJECT_ID of its brightest truth member (truth objects whose nearest detection it is, within
    the deblending radius); detections without a member (noise peaks, artefacts) are SPURIOUS_FLAG = 1.
``truth``
    one row per detectable truth object, quantities from the truth plus noise (the earlier model).
OBJECT_IDs depend on the truth id only (the unlensed position), so fields that differ in shear match by id.
"""

from __future__ import annotations

import math

import numpy as np

from constellation_assets.euclid import (
    AB_ZEROPOINT_UJY,
    BANDS,
    MER_MOSAIC_CRPIX,
    MER_MOSAIC_MAGZERO,
    MER_TILE_NPIX,
    Band,
    canonical_band,
)
from constellation_assets.io.uri import join_uri
from constellation_assets.synthetic.layout import (
    file_timestamp,
    hash_hex,
    mer_base_uri_of,
    mer_mosaic_file_name,
    rng_for,
    write_fits,
)
from constellation_assets.synthetic.population import (
    lensed_galaxy_profile,
    load_cosmos_param_table,
    object_ids,
    object_sed_alpha,
)
from constellation_assets.synthetic.psf import band_otf

__all__ = [
    "MER_BANDS",
    "band_colour_mag",
    "measured_mer_catalog",
    "mer_bands_of",
    "mer_mosaic_header",
    "render_mer_images",
    "truth_mer_catalog",
    "ujy_per_mosaic_unit",
    "write_mer_catalog",
]

#: The Euclid bands of the MER mosaics (:data:`constellation_assets.euclid.BANDS`).
MER_BANDS: dict[str, Band] = BANDS

_MOSAIC_OVERSAMPLING = 2
_MOSAIC_PAD_ARCSEC = 3.0


def ujy_per_mosaic_unit() -> float:
    """uJy of one mosaic pixel unit: 10**(-0.4 (MAGZERO - 23.9))."""
    return 10.0 ** (-0.4 * (MER_MOSAIC_MAGZERO - AB_ZEROPOINT_UJY))


def band_colour_mag(band: str, alpha, ref_band: str = "VIS"):
    """AB colour m_band - m_ref of a power-law SED f_nu ~ lambda**alpha: -2.5 alpha log10(lambda_b / lambda_ref).

    The documented colour model of the synthetic field and of injected sources (alpha > 0: red).
    """
    lb = BANDS[canonical_band(band)].wavelength_um
    lr = BANDS[canonical_band(ref_band)].wavelength_um
    return -2.5 * np.asarray(alpha, dtype=float) * math.log10(lb / lr)


def _band_psf_fwhm(fcfg, band: Band) -> float:
    return float(fcfg.psf_fwhm_arcsec if band.psf_fwhm_arcsec is None else band.psf_fwhm_arcsec)


def mer_bands_of(fcfg) -> list[Band]:
    """The bands of ``field.mer_bands`` (one clear error for an unknown or empty list)."""
    unknown = [b for b in fcfg.mer_bands if canonical_band(b) not in BANDS]
    if unknown or not fcfg.mer_bands:
        raise ValueError(
            f"field.mer_bands {list(fcfg.mer_bands)}: unknown band(s) {unknown}; "
            f"use a non-empty subset of {list(BANDS)}"
        )
    return [BANDS[canonical_band(b)] for b in fcfg.mer_bands]


def mer_mosaic_header(fcfg, tile_id: int, x_lo: int, y_lo: int, nx: int, ny: int, band: Band):
    """Header of a mosaic covering full-tile pixels [x_lo, x_lo + nx) x [y_lo, y_lo + ny) (0-based)."""
    from astropy.io import fits

    from constellation_assets.sky.tiles import tile_center_deg

    ra_t, dec_t = tile_center_deg(int(tile_id))
    s = fcfg.pixel_scale_arcsec / 3600.0
    c = int(MER_MOSAIC_CRPIX)  # full-tile CRPIX (1-based) of the real mosaics
    h = fits.Header()
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CRVAL1"] = float(ra_t)
    h["CRVAL2"] = float(dec_t)
    h["CRPIX1"] = float(c - x_lo)
    h["CRPIX2"] = float(c - y_lo)
    h["CD1_1"] = -s
    h["CD1_2"] = 0.0
    h["CD2_1"] = 0.0
    h["CD2_2"] = s
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["RADESYS"] = "ICRS"
    h["EQUINOX"] = 2000.0
    h["MAGZERO"] = (MER_MOSAIC_MAGZERO, "AB magnitude of 1 pixel unit")
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


def _mosaic_noise_sigma(fcfg, band: Band, exptimes_s: list[float]) -> float:
    """Per-pixel noise (mosaic units) of a band: VIS from the inverse-variance stack of the exposures' sky +
    read noise; NISP scaled by depth.

    sigma_b = sigma_VIS * 10**(0.4 (m5_VIS - m5_b)) * sqrt(Neff_VIS / Neff_b), Neff = 4 pi (FWHM/2.355)^2 / p^2 + 1.
    """
    gain = fcfg.gain_e_per_adu
    inv_var = 0.0
    for t in exptimes_s or [fcfg.exptime_s]:
        sky_var_adu = (fcfg.sky_level_adu * t / fcfg.exptime_s * gain + fcfg.read_noise_e**2) / gain**2
        unit_per_adu = 10.0 ** (-0.4 * (fcfg.magzerop + 2.5 * math.log10(t) - MER_MOSAIC_MAGZERO))
        inv_var += 1.0 / (sky_var_adu * unit_per_adu**2)
    sigma_vis = math.sqrt(1.0 / inv_var)
    vis = BANDS["VIS"]

    def neff(b):
        return 4 * math.pi * (_band_psf_fwhm(fcfg, b) / 2.3548 / fcfg.pixel_scale_arcsec) ** 2 + 1.0

    return (
        sigma_vis
        * 10.0 ** (0.4 * (vis.depth_5sigma_point_mag - band.depth_5sigma_point_mag))
        * math.sqrt(neff(vis) / neff(band))
    )


def render_mer_images(cfg, tile_id: int, truth: dict, exptimes_s: list[float], bands: list[Band]):
    """The tile's background-subtracted mosaics as (band, image float32, header) in memory.

    Each covers the simulated area on the tile's 0.1" TAN grid (a sub-grid of the full 19200 x 19200 tile).
    Rendering: every galaxy's lensed profile (unit flux) is drawn once, point-sampled at
    0.1"/``_MOSAIC_OVERSAMPLING``; per band the objects are added with their band fluxes (VIS magnitude +
    power-law colour, :func:`band_colour_mag`, times the magnification MU), the canvas is convolved in Fourier
    space with the band's OTF (Airy x Gaussian x 0.1" pixel, :func:`band_otf`) and sampled at the pixel
    centres; stars enter as exact sub-pixel-shifted deltas. White Gaussian noise at the band's depth from a
    stream that depends on the tile and band only (paired across fields that differ in shear).
    """
    import scipy.fft as sfft
    from astropy.wcs import WCS

    f = cfg.field
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
    unit_per_ujy = 1.0 / ujy_per_mosaic_unit()

    is_star = np.asarray(truth["IS_STAR"], dtype=bool)
    alpha = object_sed_alpha(f, tile_id, truth)
    mu = np.asarray(truth["MU"], dtype=float) if "MU" in truth else np.ones(len(ra))
    flux_vis = np.asarray(truth["FLUX_UJY_TRUE"], dtype=float) * mu * unit_per_ujy
    # Lensed (pre-PSF) galaxy stamps, unit flux, point-sampled on the finest grid (sub-pixel index s <->
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
        prof = lensed_galaxy_profile(cat, i, unit)
        im = prof.drawImage(nx=n, ny=n, scale=sub, method="no_pixel", offset=(xs - ix, ys - iy)).array
        tot = float(im.sum())
        if not (np.isfinite(tot) and tot > 0):
            continue
        stamps.append((i, ix - n // 2, iy - n // 2, (im / tot).astype(np.float32)))
    star_idx = np.nonzero(is_star)[0]
    star_otfs: dict = {}
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
        sigma = _mosaic_noise_sigma(f, band, exptimes_s)
        noise = rng_for(f.seed, "mer-noise", tile_id, band.name).standard_normal(img.shape, dtype=np.float32)
        data = img.astype(np.float32) + noise * np.float32(sigma)
        hdr = mer_mosaic_header(f, tile_id, x_lo, y_lo, nx, ny, band)
        hdr["NOISESIG"] = (sigma, "per-pixel noise sigma (pixel units)")
        yield band, data, hdr


def write_mer_mosaic(cfg, tile_id: int, band: Band, data: np.ndarray, hdr) -> str:
    """Write one band's mosaic (image in the primary HDU); returns its URI."""
    from astropy.io import fits

    f = cfg.field
    ts = file_timestamp(f.seed, "MER-MOSAIC", tile_id)
    hash6 = hash_hex(f.seed, "mer-mosaic-hash", tile_id)
    uri = join_uri(
        mer_base_uri_of(cfg), str(tile_id), band.folder, mer_mosaic_file_name(band.name, tile_id, hash6, ts)
    )
    write_fits(uri, [fits.PrimaryHDU(data, header=hdr)], cfg.storage_options(uri))
    return uri


def _add_star(
    img: np.ndarray, x: float, y: float, flux: float, mag_vis: float, band: Band, fcfg, cache: dict
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


def _vis_psf_image(fcfg, size: int) -> np.ndarray:
    """The VIS mosaic's effective PSF on the pixel grid, unit flux, centred on pixel (size // 2, size // 2)."""
    img = np.zeros((size, size))
    band = BANDS["VIS"]
    _add_star(img, size // 2, size // 2, 1.0, 22.0, band, fcfg, {})
    return img


# ----------------------------------------------------------------------------------------------------------
# MER catalog


def _spurious_ids(ra: np.ndarray, dec: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """Position-encoded ids for detections without a truth member, distinct from the truth ids."""
    ids = object_ids(ra, dec)
    used = set(int(v) for v in taken)
    out = np.empty_like(ids)
    for k, v in enumerate(ids):
        v = int(v)
        while v in used:
            v += 1
        used.add(v)
        out[k] = v
    return out


def _cutouts(img: np.ndarray, iy: np.ndarray, ix: np.ndarray, r: int) -> np.ndarray:
    """(n, 2r+1, 2r+1) boxes of ``img`` centred on integer pixels (zero outside the image)."""
    pad = np.pad(img, r)
    off = np.arange(-r, r + 1)
    return pad[(iy + r)[:, None, None] + off[None, :, None], (ix + r)[:, None, None] + off[None, None, :]]


def measured_mer_catalog(
    cfg, tile_id: int, truth: dict, n_cover: np.ndarray, vis_image: np.ndarray, vis_header, covered_fn
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Sources detected and measured on the VIS mosaic (see the module docstring).

    ``covered_fn(ra, dec)`` -> how many VIS exposures cover each position (a detection outside every exposure
    is dropped). Returns the catalog columns, the truth row of each entry's brightest member (-1: spurious),
    and per truth row the catalog row it is merged into (-1: not in the catalog).
    """
    from astropy.wcs import WCS
    from scipy import ndimage
    from scipy.spatial import cKDTree

    f = cfg.field
    scale = f.pixel_scale_arcsec
    img = np.asarray(vis_image, dtype=np.float64)
    sigma = float(vis_header["NOISESIG"])
    w = WCS(vis_header)
    # 1. Detection: Gaussian-smoothed image above n sigma, local maxima within the deblending radius merged.
    s_det = 1.0
    sm = ndimage.gaussian_filter(img, s_det, mode="constant", truncate=4.0)
    delta = np.zeros((33, 33))
    delta[16, 16] = 1.0
    sigma_sm = sigma * math.sqrt(float((ndimage.gaussian_filter(delta, s_det, truncate=4.0) ** 2).sum()))
    r_blend = max(1, int(round(f.catalog_deblend_arcsec / scale)))
    peaks = (sm > f.catalog_detect_nsigma * sigma_sm) & (
        sm == ndimage.maximum_filter(sm, size=2 * r_blend + 1, mode="constant")
    )
    edge = 3
    peaks[:edge, :] = peaks[-edge:, :] = False
    peaks[:, :edge] = peaks[:, -edge:] = False
    py, px = np.nonzero(peaks)
    r = 15
    cut = _cutouts(img, py, px, r)
    cut_sm = _cutouts(sm, py, px, r)
    off = np.arange(-r, r + 1, dtype=float)
    yy, xx = np.meshgrid(off, off, indexing="ij")
    # 2. Windowed centroid (Gaussian weight sigma 2 pixels, iterated, steps clipped to 1 pixel).
    s_w = 2.0
    cx = np.zeros(len(px))
    cy = np.zeros(len(px))
    for _ in range(5):
        wgt = np.exp(
            -0.5 * ((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2) / s_w**2
        )
        wi = wgt * cut
        norm = wi.sum(axis=(1, 2))
        ok = norm > 0
        nx_ = np.where(ok, (wi * xx[None]).sum(axis=(1, 2)) / np.where(ok, norm, 1.0), cx)
        ny_ = np.where(ok, (wi * yy[None]).sum(axis=(1, 2)) / np.where(ok, norm, 1.0), cy)
        cx = np.clip(cx + np.clip(nx_ - cx, -1.0, 1.0), -r_blend, r_blend)
        cy = np.clip(cy + np.clip(ny_ - cy, -1.0, 1.0), -r_blend, r_blend)
    dxs = xx[None] - cx[:, None, None]
    dys = yy[None] - cy[:, None, None]
    rr = np.hypot(dxs, dys)
    # 3. Weighted second moments (weight sigma 2.5 pixels), corrected for the weight (exact for Gaussians).
    s_m = 2.5
    wm = np.exp(-0.5 * rr**2 / s_m**2) * cut
    nm = np.maximum(wm.sum(axis=(1, 2)), 1e-30)
    mxx = (wm * dxs**2).sum(axis=(1, 2)) / nm
    myy = (wm * dys**2).sum(axis=(1, 2)) / nm
    mxy = (wm * dxs * dys).sum(axis=(1, 2)) / nm
    tr, dt = mxx + myy, np.sqrt((mxx - myy) ** 2 + 4 * mxy**2)
    lam1 = np.clip(0.5 * (tr + dt), 0.05, 0.9 * s_m**2)
    lam2 = np.clip(0.5 * (tr - dt), 0.05, 0.9 * s_m**2)
    a2 = lam1 * s_m**2 / (s_m**2 - lam1)
    b2 = lam2 * s_m**2 / (s_m**2 - lam2)
    a_pix, b_pix = np.sqrt(a2), np.sqrt(b2)
    theta_x = 0.5 * np.degrees(np.arctan2(2 * mxy, mxx - myy))  # major axis, from +x towards +y
    # 4. Kron-like radius and aperture flux with its noise error.
    pos = np.clip(cut, 0.0, None) * (rr < 3.0 * a_pix[:, None, None] + 3.0)
    r1 = (pos * rr).sum(axis=(1, 2)) / np.maximum(pos.sum(axis=(1, 2)), 1e-30)
    kron = np.clip(2.5 * r1, 3.5, float(r))
    ap = rr <= kron[:, None, None]
    n_ap = ap.sum(axis=(1, 2))
    unit = ujy_per_mosaic_unit()
    # Aperture correction of a point source (the PSF light beyond the Kron radius), as for a total flux.
    psf = _vis_psf_image(f, 2 * r + 1)
    r_psf = np.hypot(xx, yy)
    radii = np.arange(3.0, r + 1.0, 0.25)
    ee = np.array([psf[r_psf <= rad].sum() for rad in radii])
    ap_corr = np.interp(kron, radii, ee)
    flux = (cut * ap).sum(axis=(1, 2)) * unit / ap_corr
    flux_err = sigma * np.sqrt(n_ap) * unit / ap_corr
    snr = flux / np.maximum(flux_err, 1e-30)
    # 5. PSF-weighted flux: Gaussian window calibrated on the mosaic PSF so a point source gets its flux.
    s_p = 1.2
    g_c = np.exp(-0.5 * (xx**2 + yy**2) / s_p**2)
    calib = float((psf * g_c).sum())
    g_w = np.exp(-0.5 * rr**2 / s_p**2)
    flux_psf = (cut * g_w).sum(axis=(1, 2)) / calib * unit
    # Size of a point source measured the same way: the star/galaxy separation.
    wp = np.exp(-0.5 * (xx**2 + yy**2) / s_m**2) * psf
    t_psf_m = float((wp * (xx**2 + yy**2)).sum() / wp.sum())
    lam_psf = 0.5 * t_psf_m
    t_psf = 2 * lam_psf * s_m**2 / (s_m**2 - lam_psf)
    point_like = (snr >= 10.0) & ((a2 + b2) < t_psf * (1.1 + 2.0 / np.maximum(snr, 1.0)))
    seg = ((cut_sm > f.catalog_detect_nsigma * sigma_sm) & (rr <= r)).sum(axis=(1, 2))

    xd, yd = px + cx, py + cy
    ra_d, dec_d = w.all_pix2world(xd, yd, 0)
    idx = np.nonzero(snr >= f.catalog_snr_min)[0]
    idx = idx[covered_fn(ra_d[idx], dec_d[idx]) > 0]

    # 6. Truth members: every truth object belongs to its nearest kept detection within the blend radius.
    xt, yt = w.all_world2pix(np.asarray(truth["RA"]), np.asarray(truth["DEC"]), 0)
    member_of = np.full(len(xt), -1, dtype=np.int64)
    brightest = np.full(len(idx), -1, dtype=np.int64)
    n_members = np.zeros(len(idx), dtype=np.int64)
    if len(idx):
        tree = cKDTree(np.column_stack([xd[idx], yd[idx]]))
        dist, near = tree.query(np.column_stack([xt, yt]), distance_upper_bound=r_blend + 0.5)
        matched = np.isfinite(dist)
        member_of[matched] = near[matched]
        mflux = np.asarray(truth["FLUX_UJY_TRUE"]) * (np.asarray(truth["MU"]) if "MU" in truth else 1.0)
        order = np.lexsort((-mflux, member_of))  # by detection, brightest first
        order = order[member_of[order] >= 0]
        first = np.ones(len(order), dtype=bool)
        first[1:] = member_of[order][1:] != member_of[order][:-1]
        brightest[member_of[order][first]] = order[first]
        np.add.at(n_members, member_of[matched], 1)
    real = brightest >= 0
    obj = np.empty(len(idx), dtype=np.int64)
    obj[real] = np.asarray(truth["OBJECT_ID_TRUTH"])[brightest[real]]
    obj[~real] = _spurious_ids(ra_d[idx][~real], dec_d[idx][~real], obj[real])

    is_star = np.asarray(truth["IS_STAR"], dtype=bool)
    flux_adu = np.asarray(truth["FLUX_ADU_PER_EXPOSURE"])
    sat_star = is_star & (flux_adu * 0.2 > f.saturation_adu)  # peak pixel ~ 20 % of the flux for this PSF
    dq = np.zeros(len(idx), dtype=np.int64)
    if sat_star.any():
        sat_tree = cKDTree(np.column_stack([xt[sat_star], yt[sat_star]]))
        d_sat, _ = sat_tree.query(np.column_stack([xd[idx], yd[idx]]))
        dq |= np.where(d_sat * scale < 3.0, 0x8, 0)
        bright_sat = np.zeros(len(idx), dtype=bool)
        bright_sat[real] = sat_star[brightest[real]]
        dq = np.where(bright_sat, (dq & ~0x8) | 0x4, dq)
    dq |= np.where(n_members > 1, 0x2, 0)  # blended (informational)
    # Position angle east of north: +x is west and +y north on the mosaic, so x -> y is west -> north.
    pa_deg = (90.0 - theta_x[idx]) % 180.0
    cols = {
        "OBJECT_ID": obj,
        "RIGHT_ASCENSION": ra_d[idx],
        "DECLINATION": dec_d[idx],
        "FLUX_VIS_PSF": flux_psf[idx],
        "FLUX_DETECTION_TOTAL": flux[idx],
        "FLUXERR_DETECTION_TOTAL": flux_err[idx],
        "SEMIMAJOR_AXIS": a_pix[idx],
        "ELLIPTICITY": 1.0 - b_pix[idx] / a_pix[idx],
        "POSITION_ANGLE": pa_deg,
        "KRON_RADIUS": kron[idx],
        "SEGMENTATION_AREA": np.maximum(seg[idx], 1),
        "VIS_DET": np.ones(len(idx), dtype=np.int64),
        "SPURIOUS_FLAG": (~real).astype(np.int64),
        "POINT_LIKE_FLAG": point_like[idx].astype(np.int64),
        "DET_QUALITY_FLAG": dq,
    }
    return _typed(cols), brightest, member_of


def truth_mer_catalog(
    cfg, tile_id: int, truth: dict, n_cover: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """MER catalog columns from the truth (quantities with noise) and the truth row of each entry."""
    f = cfg.field
    r = rng_for(f.seed, "mer", tile_id)
    n = len(truth["RA"])
    is_star = truth["IS_STAR"]
    hlr = truth["HLR_ARCSEC"]
    fwhm = f.psf_fwhm_arcsec
    r_psf = fwhm / 2.0
    r_obs = np.hypot(hlr, r_psf)  # circularised observed half-light radius (arcsec)
    mu = np.asarray(truth["MU"]) if "MU" in truth else np.ones(n)
    flux_ujy = truth["FLUX_UJY_TRUE"] * mu
    flux_adu = truth["FLUX_ADU_PER_EXPOSURE"] * mu
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

    sat_star = is_star & (flux_adu * 0.2 > f.saturation_adu)
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
        "OBJECT_ID": np.asarray(truth["OBJECT_ID_TRUTH"]),
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
        extra["OBJECT_ID"] = _spurious_ids(extra["RIGHT_ASCENSION"], extra["DECLINATION"], cols["OBJECT_ID"])
        cols = {k: np.concatenate([cols[k], extra[k]]) for k in cols}
        rows = np.concatenate([rows, np.full(n_sp, -1)])
    member_of = np.full(n, -1, dtype=np.int64)
    real = rows >= 0
    member_of[rows[real]] = np.nonzero(real)[0]
    return _typed(cols), rows, member_of


def _typed(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The catalog columns in the order and dtypes of :data:`constellation_assets.io.mer_catalog.MER_COLUMNS`."""
    from constellation_assets.io.mer_catalog import MER_COLUMNS

    out = {}
    for name, dtype in _mer_dtypes(MER_COLUMNS).items():
        if name not in cols:
            raise KeyError(
                f"synthetic MER catalog has no column {name!r} (required by io.mer_catalog.MER_COLUMNS)"
            )
        out[name] = np.asarray(cols[name]).astype(dtype)
    return out


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


def write_mer_catalog(
    uri: str, cols: dict[str, np.ndarray], tile_id: int, storage_options: dict | None
) -> None:
    """Write the MER final catalog: a FITS binary table (EXTNAME MER_FINAL_CATALOG) after an empty primary."""
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
    write_fits(uri, [ph, table], storage_options)
