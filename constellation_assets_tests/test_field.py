"""Synthetic Euclid Q1 field: layout, headers, PSF product, physics against GalSim, whole-scene shear, paired
noise, the measured MER catalog, determinism and idempotency."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from constellation_assets import euclid
from constellation_assets import synthetic as S
from constellation_assets.io.mer_catalog import MER_COLUMNS, read_mer_catalog
from constellation_assets.io.q1 import DET_RE, MER_RE, PSF_RE
from constellation_assets.sky.tiles import radec_to_tangent, tile_center_deg
from constellation_assets.synthetic import focal_plane as FP
from constellation_assets.synthetic import mer as M
from constellation_assets.synthetic import population as POP
from constellation_assets.synthetic import psf as P
from constellation_assets.synthetic.render import _stamp_size, expose_quadrant
from constellation_assets_tests.q1_testdata import TILE, small_config


@pytest.fixture(scope="module")
def small_field(tmp_path_factory):
    root = tmp_path_factory.mktemp("field")
    cfg = small_config(root)
    summary = S.simulate_field(cfg)
    return cfg, summary, root


#: A one-CCD, one-dither field for the shear pairs (three of them are simulated).
PAIR_FIELD = {
    "ccd_grid": [1, 1],
    "quadrant_nx_pix": 300,
    "quadrant_ny_pix": 300,
    "galaxy_density_arcmin2": 60.0,
    "n_dithers": 1,
    "short_exposure_dithers": [],
    "write_mer_mosaics": False,
    "paired_noise": True,
    "cosmic_rate_per_mpix": 2000.0,
}
G_PAIR = 0.05


@pytest.fixture(scope="module")
def shear_pair(tmp_path_factory):
    """Fields at g = 0, +g and -g (g1 = 0.05), paired noise, whole-scene shear."""
    out = {}
    for name, g1 in (("zero", 0.0), ("plus", G_PAIR), ("minus", -G_PAIR)):
        root = tmp_path_factory.mktemp(f"pair_{name}")
        cfg = small_config(root, field={**PAIR_FIELD, "shear_g1": g1, "shear_g2": 0.0})
        S.simulate_field(cfg)
        out[name] = (cfg, root)
    return out


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def _truth(root: Path) -> dict:
    t = pq.read_table(root / "q1" / "sim_truth" / str(TILE) / "truth_objects.parquet")
    return {k: t.column(k).to_numpy() for k in t.column_names}


def _catalog(root: Path) -> dict:
    (cat,) = _files(root, f"q1/catalogs/MER_FINAL_CATALOG/{TILE}/*.fits")
    t = read_mer_catalog(str(cat))
    return {k: t.column(k).to_numpy() for k in t.column_names}


def test_layout_and_names(small_field):
    cfg, summary, root = small_field
    (t,) = summary.tiles
    assert t.tile_id == TILE and not t.skipped and t.n_galaxies > 50 and t.n_stars > 0
    assert t.n_exposures == 4  # 2 dithers x (nominal + short)
    obs = cfg.field.first_obs_id
    vis = root / "q1" / "VIS" / str(obs)
    names = sorted(p.name for p in vis.iterdir())
    kinds: dict[str, set] = {}
    psf = []
    for n in names:
        m = DET_RE.match(n)
        if m:
            assert int(m["obs_id"]) == obs
            assert m["rest"] == "0000000", n
            kinds.setdefault(m["kind"], set()).add((int(m["dither"]), int(m["exposure"])))
        else:
            assert PSF_RE.match(n), n
            psf.append(n)
    # Every dither has its nominal exposure 1; the first two (default) also a short exposure 2.
    assert kinds == {k: {(0, 1), (0, 2), (1, 1), (1, 2)} for k in ("DET", "BKG", "WGT")}
    # One PSF product per observation folder, named like the real one.
    assert len(psf) == 1 and re.fullmatch(
        r"EUC_VIS_GRD-PSF-000-000000-0000000__\d{8}T\d{6}\.\d{6}Z\.fits", psf[0]
    )
    # Timestamps differ per file (discovery must list, never construct names).
    stamps = [re.search(r"__(\d{8}T\d{6}\.\d{6})Z", n)[1] for n in names]
    assert len(set(stamps)) == len(stamps)
    (cat,) = _files(root, f"q1/catalogs/MER_FINAL_CATALOG/{TILE}/*.fits")
    m = MER_RE.match(cat.name)
    assert m and int(m["tile_id"]) == TILE and m["version"] == "00.00"


def test_short_exposure_layout_options():
    cfg = small_config("/nonexistent", field={"n_dithers": 4, "short_exposure_dithers": [1, 3]})
    exps = FP.exposure_layout(cfg)
    assert [(e.dither, e.exposure) for e in exps] == [(0, 1), (1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]
    assert {e.exposure: e.exptime_s for e in exps} == {
        1: euclid.VIS_EXPTIME_NOMINAL_S,
        2: euclid.VIS_EXPTIME_SHORT_S,
    }
    # A short exposure shares its dither's pointing.
    by = {(e.dither, e.exposure): e for e in exps}
    assert (by[(1, 1)].ra_deg, by[(1, 1)].dec_deg) == (by[(1, 2)].ra_deg, by[(1, 2)].dec_deg)
    none = small_config("/nonexistent", field={"short_exposure_dithers": []})
    assert all(e.exposure == 1 for e in FP.exposure_layout(none))
    with pytest.raises(ValueError, match="short_exposure_dithers"):
        small_config("/nonexistent", field={"n_dithers": 2, "short_exposure_dithers": [2]})


def test_det_file_structure_and_headers(small_field):
    cfg, _, root = small_field
    det = _files(root, "q1/VIS/*/EUC_VIS_SWL-DET-*-00-1-*.fits")[0]
    with fits.open(det) as hdul:
        names = [h.name for h in hdul[1:]]
        expected = {f"1-{c}.{q}.{k}" for c in (1, 2) for q in "EFGH" for k in ("SCI", "RMS", "FLG")}
        assert set(names) == expected and len(names) == len(expected)
        assert names != sorted(names)  # shuffled like Q1 ("may appear in any order")
        sci = hdul["1-2.G.SCI"]
        h = sci.header
        assert sci.data.dtype == np.dtype(">f4") and sci.data.shape == (206, 200)
        assert hdul["1-2.G.FLG"].data.dtype.kind == "i"
        assert h["CTYPE1"] == "RA---TPV" and h["CTYPE2"] == "DEC--TPV"
        assert h["GAIN"] == pytest.approx(3.48) and h["EXPTIME"] == pytest.approx(560.52)
        assert isinstance(h["MAGZEROP"], str) and float(h["MAGZEROP"]) == pytest.approx(24.57)
        w = WCS(h)
        # 0.1"/pixel, x axis pointing west at PA 0.
        scales = np.abs(np.diag(w.pixel_scale_matrix)) * 3600
        assert scales == pytest.approx([0.1, 0.1], rel=1e-6)
        assert w.wcs.cd[0, 0] < 0


def test_short_and_nominal_exposures(small_field):
    """Each exposure is its own file with its own EXPTIME, sky, noise and cosmics; same pointing per dither."""
    cfg, _, root = small_field
    f = cfg.field
    nom = _files(root, "q1/VIS/*/EUC_VIS_SWL-DET-*-00-1-*.fits")[0]
    short = _files(root, "q1/VIS/*/EUC_VIS_SWL-DET-*-00-2-*.fits")[0]
    bkg_n = _files(root, "q1/VIS/*/EUC_VIS_SWL-BKG-*-00-1-*.fits")[0]
    bkg_s = _files(root, "q1/VIS/*/EUC_VIS_SWL-BKG-*-00-2-*.fits")[0]
    with fits.open(nom) as hn, fits.open(short) as hs, fits.open(bkg_n) as bn, fits.open(bkg_s) as bs:
        assert hn[0].header["EXPTIME"] == pytest.approx(560.52) and hs[0].header["EXPTIME"] == pytest.approx(
            89.52
        )
        a, b = hn["1-1.E.SCI"], hs["1-1.E.SCI"]
        assert a.header["EXPTIME"] == pytest.approx(560.52) and b.header["EXPTIME"] == pytest.approx(89.52)
        assert a.header["CRVAL1"] == b.header["CRVAL1"] and a.header["CRPIX2"] == b.header["CRPIX2"]
        ratio = float(np.median(bs["1-1.E"].data)) / float(np.median(bn["1-1.E"].data))
        assert ratio == pytest.approx(89.52 / 560.52, rel=1e-3)
        # Independent noise: sky-subtracted residuals are uncorrelated between the two exposures.
        ra = a.data - bn["1-1.E"].data
        rb = b.data - bs["1-1.E"].data
        ok = (hn["1-1.E.FLG"].data == 0) & (hs["1-1.E.FLG"].data == 0) & (np.abs(ra) < 5 * np.std(ra))
        assert abs(np.corrcoef(ra[ok], rb[ok])[0, 1]) < 0.2
        # Short-exposure sky noise.
        sky_s = f.sky_level_adu * 89.52 / 560.52
        mad = 1.4826 * np.median(np.abs(rb[ok] - np.median(rb[ok])))
        assert mad == pytest.approx(
            math.sqrt(sky_s * f.gain_e_per_adu + f.read_noise_e**2) / f.gain_e_per_adu, rel=0.1
        )
        # Cosmics differ per exposure.
        ca = (hn["1-1.E.FLG"].data & euclid.FLG_COSMIC) != 0
        cb = (hs["1-1.E.FLG"].data & euclid.FLG_COSMIC) != 0
        assert ca.sum() > cb.sum() > 0 and (ca & cb).sum() < 0.5 * cb.sum()


def _gauss_fit_fwhm_arcsec(stamp: np.ndarray, scale: float) -> float:
    """FWHM of a pixel-integrated round Gaussian fitted to the 7 x 7 core of a native stamp."""
    from scipy.optimize import least_squares
    from scipy.special import erf

    c = stamp.shape[0] // 2
    core = stamp[c - 3 : c + 4, c - 3 : c + 4].astype(float)
    edges = np.arange(-3.5, 4.0, 1.0)

    def model(p):
        amp, s = p
        cdf = 0.5 * (1 + erf(edges / (math.sqrt(2) * s)))
        px = np.diff(cdf)
        return amp * np.outer(px, px)

    res = least_squares(lambda p: (model(p) - core).ravel(), x0=[core.sum(), 0.8], bounds=([0, 0.2], [2, 3]))
    return 2.3548 * res.x[1] * scale


def test_psf_file(small_field):
    cfg, _, root = small_field
    f = cfg.field
    (psf,) = _files(root, "q1/VIS/*/EUC_VIS_GRD-PSF-*.fits")
    with fits.open(psf) as hdul:
        names = {h.name for h in hdul[1:]}
        assert names == {f"1-{c}.{q}" for c in (1, 2) for q in "EFGH"}
        hdu = hdul["1-1.E"]
        assert hdu.data.shape == (189, 189)
        for key in ("OVERSAMP", "PSFGRID", "PSFSTAMP", "GRIDX0", "GRIDDX", "GRIDY0", "GRIDDY", "PSFSCALE"):
            assert key not in hdu.header, key
        stamps = hdu.data.reshape(9, 21, 9, 21).transpose(0, 2, 1, 3).astype(float)
        sums = stamps.sum(axis=(2, 3))
        # Truncated by the 2.1" box, not renormalised: like the real product (~0.93-0.97).
        assert np.all((sums > 0.93) & (sums < 0.99))
        peak = stamps.reshape(81, -1).argmax(axis=1)
        assert np.all(peak == 10 * 21 + 10)
        # Native sampling: the core is ~0.17" FWHM in 0.1" pixels (an oversampled stamp would fit ~3x wider).
        fwhm = _gauss_fit_fwhm_arcsec(stamps[4, 4], f.pixel_scale_arcsec)
        assert 0.15 < fwhm < 0.2
        # Position dependent: the corner stamps differ.
        assert np.abs(stamps[0, 0] - stamps[8, 8]).max() > 1e-4
        # The stamps are the rendering PSF (per observation) at the cell centres, row-major (row = y).
        q = next(g for g in FP.focal_plane(f) if g.det_id == "1-1.E")
        i, j = 2, 7
        x = (j + 0.5) * f.quadrant_nx_pix / 9 - 0.5
        y = (i + 0.5) * f.quadrant_ny_pix / 9 - 0.5
        xfp, yfp = q.x0_pix + x + 0.5, q.y0_pix + y + 0.5
        g1, g2 = P.psf_shear_at(f, f.first_obs_id, xfp, yfp)
        ref = P.effective_psf_stamps(
            [P.psf_fwhm_arcsec_at(f, xfp, yfp)], [g1], [g2], 0.1, 1, normalize="total"
        )[0]
        np.testing.assert_allclose(stamps[i, j], ref, atol=1e-6)


def test_psf_model_against_galsim():
    import galsim

    # FWHM of Airy (x) Gaussian from the Hankel transform agrees with GalSim's measurement on a fine image.
    for fwhm in (0.17, 0.2):
        prof = P.field_psf(fwhm, 0.0, 0.0)
        measured = prof.drawImage(nx=151, ny=151, scale=0.004, method="no_pixel").calculateFWHM()
        assert measured == pytest.approx(fwhm, abs=2e-3)
    fw, g1, g2 = 0.18, -0.02, 0.04
    eff = galsim.Convolve(P.field_psf(fw, g1, g2), galsim.Pixel(0.1))
    # Native 0.1" sampling (VIS is undersampled: the k-space aliases are folded in), full-PSF normalisation.
    ref = eff.drawImage(nx=201, ny=201, scale=0.1, method="no_pixel").array[90:111, 90:111]
    mine = P.effective_psf_stamps([fw], [g1], [g2], 0.1, 1, normalize="total")[0]
    assert np.abs(mine - ref).max() < 1e-4 * ref.max()
    assert 0.95 < mine.sum() < 0.98
    # Oversampled by 3, each stamp normalised.
    ref3 = eff.drawImage(nx=21, ny=21, scale=0.1 / 3, method="no_pixel").array
    mine3 = P.effective_psf_stamps([fw], [g1], [g2], 0.1, 3)[0]
    assert np.abs(mine3 - ref3 / ref3.sum()).max() < 2e-3 * ref3.max()
    # PSF-model errors: the optical PSF dilated by sqrt(1 + dT/T), then sheared by the ellipticity residual.
    dt, e1, e2 = 0.08, 0.02, -0.01
    bad = galsim.Convolve(
        P.field_psf(fw, g1, g2).dilate(math.sqrt(1 + dt)).shear(g1=e1, g2=e2), galsim.Pixel(0.1)
    )
    ref_bad = bad.drawImage(nx=201, ny=201, scale=0.1, method="no_pixel").array[90:111, 90:111]
    mine_bad = P.effective_psf_stamps(
        [fw], [g1], [g2], 0.1, 1, normalize="total", size_error=dt, e1_error=e1, e2_error=e2
    )[0]
    assert np.abs(mine_bad - ref_bad).max() < 1e-4 * ref_bad.max()
    assert np.abs(mine_bad - mine).max() > 1e-2 * mine.max()


def test_psf_model_error_config_reaches_the_psf_file(tmp_path):
    cfg = small_config(tmp_path, field={"psf_model_size_error": 0.1, "psf_model_e1_error": 0.01})
    ref = small_config(tmp_path)
    q = FP.focal_plane(cfg.field)[0]
    a, _ = P.psf_grid_image(cfg.field, 2689, q)
    b, _ = P.psf_grid_image(ref.field, 2689, q)

    def moments(img):
        st = img.reshape(9, 21, 9, 21).transpose(0, 2, 1, 3)[4, 4].astype(float)
        yy, xx = np.mgrid[-10:11, -10:11]
        w = np.exp(-0.5 * (xx**2 + yy**2) / 2.0**2) * st
        n = w.sum()
        return (w * xx**2).sum() / n, (w * yy**2).sum() / n

    (axx, ayy), (bxx, byy) = moments(a), moments(b)
    assert axx + ayy > 1.03 * (bxx + byy)  # the model is larger than the rendering PSF
    assert (axx - ayy) - (bxx - byy) > 0.005  # and elongated along x (e1 > 0)


def test_mer_catalog_and_truth(small_field):
    cfg, summary, root = small_field
    (cat,) = _files(root, f"q1/catalogs/MER_FINAL_CATALOG/{TILE}/*.fits")
    t = read_mer_catalog(str(cat))
    for name in MER_COLUMNS:
        assert name in t.column_names
    assert t.num_rows == summary.tiles[0].n_catalog_rows
    ids = t.column("OBJECT_ID").to_numpy()
    assert len(np.unique(ids)) == len(ids)
    assert set(np.unique(t.column("POINT_LIKE_FLAG").to_numpy())) <= {0, 1}

    truth = _truth(root)
    shear = json.loads((root / "q1" / "sim_truth" / str(TILE) / "shear_truth.json").read_text())
    gal = ~truth["IS_STAR"]
    assert (
        np.allclose(truth["G1_TRUE"][gal], shear["G1_TRUE"])
        and abs(shear["G1_TRUE"]) <= cfg.field.shear_amplitude
    )
    assert shear["shear_positions"] is True and shear["intrinsic_rotation_deg"] == 0.0
    # Brightest members carry the MER OBJECT_ID (= their truth-derived id); every real row maps back to one.
    det = truth["OBJECT_ID"][truth["OBJECT_ID"] >= 0]
    assert np.all(det == truth["OBJECT_ID_TRUTH"][truth["OBJECT_ID"] >= 0])
    real = t.filter(t.column("SPURIOUS_FLAG").to_numpy() == 0).column("OBJECT_ID").to_numpy()
    assert set(det) == set(real)
    # Every catalog row's members point at it.
    merged = truth["MERGED_OBJECT_ID"]
    assert set(det) <= set(merged[merged >= 0]) <= set(ids)


def test_measured_catalog_positions_and_fluxes(small_field):
    """Bright isolated sources: measured position within 0.1" of the truth, stars' fluxes right, classes."""
    _, _, root = small_field
    truth, cat = _truth(root), _catalog(root)
    by_id = {int(o): k for k, o in enumerate(cat["OBJECT_ID"])}
    ra, dec = truth["RA"], truth["DEC"]
    flux = truth["FLUX_UJY_TRUE"] * truth["MU"]
    n_checked = 0
    for i in np.nonzero(truth["OBJECT_ID"] >= 0)[0]:
        k = by_id[int(truth["OBJECT_ID"][i])]
        d = np.hypot((ra - ra[i]) * np.cos(np.radians(dec[i])), dec - dec[i]) * 3600
        isolated = not np.any((d > 0) & (d < 2.0) & (flux > 0.05 * flux[i]))
        if not isolated or cat["SNR_DETECTION"][k] < 30 or truth["HLR_ARCSEC"][i] > 0.4:
            continue
        if truth["IS_STAR"][i] and cat["DET_QUALITY_FLAG"][k] & 0x4:
            continue  # saturated
        n_checked += 1
        sep = math.hypot(
            (cat["RIGHT_ASCENSION"][k] - ra[i]) * math.cos(math.radians(dec[i])),
            cat["DECLINATION"][k] - dec[i],
        )
        assert sep * 3600 < 0.1
        if truth["IS_STAR"][i]:
            assert cat["FLUX_VIS_PSF"][k] == pytest.approx(flux[i], rel=0.05)
            assert cat["FLUX_DETECTION_TOTAL"][k] == pytest.approx(flux[i], rel=0.08)
            assert cat["POINT_LIKE_FLAG"][k] == 1
        elif truth["HLR_ARCSEC"][i] > 0.25:
            assert cat["POINT_LIKE_FLAG"][k] == 0
    assert n_checked >= 8


def test_blends_are_merged():
    """Two sources 0.3" apart give one detection with the brighter one's OBJECT_ID; 1.2" apart: two."""
    cfg = small_config("/nonexistent", field={"ccd_grid": [1, 1], "n_dithers": 1})
    f = cfg.field
    ra0, dec0 = tile_center_deg(TILE)
    sep = np.array([0.0, 0.3, 4.0, 5.2]) / 3600.0
    ra = ra0 + sep / math.cos(math.radians(dec0))
    dec = np.full(4, dec0)
    mag = np.array([21.0, 22.0, 21.5, 21.0])
    truth = {
        "RA": ra,
        "DEC": dec,
        "IS_STAR": np.ones(4, dtype=bool),
        "MAG_VIS_TRUE": mag,
        "FLUX_UJY_TRUE": 10 ** (-0.4 * (mag - 23.9)),
        "FLUX_ADU_PER_EXPOSURE": f.exptime_s * 10 ** (-0.4 * (mag - f.magzerop)),
        "MU": np.ones(4),
        "HLR_ARCSEC": np.zeros(4),
        "COSMOS_INDEX": np.full(4, -1),
        "OBJECT_ID_TRUTH": np.array([11, 12, 13, 14]),
    }
    # A padding object far away so the mosaic covers the scene with margin.
    for k in truth:
        truth[k] = np.concatenate([truth[k], truth[k][:1]])
    truth["RA"][-1] -= 10.0 / 3600.0
    truth["MAG_VIS_TRUE"][-1] = 30.0
    truth["FLUX_UJY_TRUE"][-1] = 1e-4
    truth["FLUX_ADU_PER_EXPOSURE"][-1] = 1e-4
    truth["OBJECT_ID_TRUTH"][-1] = 15
    ((band, img, hdr),) = list(M.render_mer_images(cfg, TILE, truth, [560.52] * 4, [euclid.BANDS["VIS"]]))
    cols, brightest, member_of = M.measured_mer_catalog(
        cfg, TILE, truth, np.ones(5), img, hdr, lambda r, d: np.ones(len(r))
    )
    real = cols["SPURIOUS_FLAG"] == 0
    assert sorted(cols["OBJECT_ID"][real]) == [11, 13, 14]
    assert member_of[0] == member_of[1] and member_of[2] != member_of[3]
    k = int(np.nonzero(cols["OBJECT_ID"] == 11)[0][0])
    assert cols["DET_QUALITY_FLAG"][k] & 0x2  # blended


def test_whole_scene_shear(shear_pair):
    """The +g and -g fields are sheared copies of the g = 0 sky: same objects, positions mapped by A^-1."""
    t0 = _truth(shear_pair["zero"][1])
    ra_t, dec_t = tile_center_deg(TILE)
    for name, g1 in (("plus", G_PAIR), ("minus", -G_PAIR)):
        tg = _truth(shear_pair[name][1])
        np.testing.assert_array_equal(tg["TRUE_ID"], t0["TRUE_ID"])
        np.testing.assert_array_equal(tg["OBJECT_ID_TRUTH"], t0["OBJECT_ID_TRUTH"])
        np.testing.assert_allclose(tg["RA_UNLENSED"], t0["RA"], rtol=0, atol=1e-12)
        xi0, eta0 = radec_to_tangent(t0["RA"], t0["DEC"], ra_t, dec_t)
        xig, etag = radec_to_tangent(tg["RA"], tg["DEC"], ra_t, dec_t)
        star = t0["IS_STAR"]
        # theta = A^-1 beta with A = [[1 - g1, 0], [0, 1 + g1]] in (u = -xi, v = eta): xi / (1 - g1), eta / (1 + g1).
        np.testing.assert_allclose(xig[~star], xi0[~star] / (1 - g1), rtol=0, atol=1e-10)
        np.testing.assert_allclose(etag[~star], eta0[~star] / (1 + g1), rtol=0, atol=1e-10)
        np.testing.assert_allclose(xig[star], xi0[star], atol=1e-12)  # stars are not lensed
        assert np.allclose(tg["MU"][~star], 1 / (1 - g1**2))
        assert np.allclose(tg["G1_TRUE"][~star], g1)
        shear = json.loads(
            (shear_pair[name][1] / "q1" / "sim_truth" / str(TILE) / "shear_truth.json").read_text()
        )
        assert shear["G1_TRUE"] == pytest.approx(g1) and shear["G2_TRUE"] == 0.0
    # The images follow: measured positions of bright isolated galaxies in +g = lensed g = 0 measured positions.
    c0, cp = _catalog(shear_pair["zero"][1]), _catalog(shear_pair["plus"][1])
    common, i0, ip = np.intersect1d(c0["OBJECT_ID"], cp["OBJECT_ID"], return_indices=True)
    good = (
        (c0["SNR_DETECTION"][i0] > 20)
        & (c0["DET_QUALITY_FLAG"][i0] & 0x6 == 0)
        & (c0["SPURIOUS_FLAG"][i0] == 0)
    )
    assert good.sum() >= 5
    x0, e0 = radec_to_tangent(c0["RIGHT_ASCENSION"][i0][good], c0["DECLINATION"][i0][good], ra_t, dec_t)
    xp, ep = radec_to_tangent(cp["RIGHT_ASCENSION"][ip][good], cp["DECLINATION"][ip][good], ra_t, dec_t)
    pl = c0["POINT_LIKE_FLAG"][i0][good] == 1
    dx = (xp - np.where(pl, x0, x0 / (1 - G_PAIR))) * 3600
    de = (ep - np.where(pl, e0, e0 / (1 + G_PAIR))) * 3600
    assert np.median(np.hypot(dx, de)) < 0.03
    # ... while the shift itself is large (the tile centre is ~20" away from these sources).
    assert np.median(np.hypot(xp - x0, ep - e0)[~pl] * 3600) > 0.3


def test_paired_noise(shear_pair):
    """+g and -g frames share noise, cosmics and masks: the pixel difference is zero away from sources."""
    rp, rm = shear_pair["plus"][1], shear_pair["minus"][1]
    (dp,) = _files(rp, "q1/VIS/*/EUC_VIS_SWL-DET-*.fits")
    (dm,) = _files(rm, "q1/VIS/*/EUC_VIS_SWL-DET-*.fits")
    tp, tm = _truth(rp), _truth(rm)
    with fits.open(dp) as hp, fits.open(dm) as hm:
        for q in "EFGH":
            a, b = hp[f"1-1.{q}.SCI"], hm[f"1-1.{q}.SCI"]
            diff = a.data.astype(float) - b.data.astype(float)
            fa, fb = hp[f"1-1.{q}.FLG"].data, hm[f"1-1.{q}.FLG"].data
            np.testing.assert_array_equal(fa & ~euclid.FLG_SAT, fb & ~euclid.FLG_SAT)
            assert ((fa & euclid.FLG_COSMIC) != 0).sum() > 5
            # Outside the rendered footprint (stamp box) of every object of both fields, the frames are
            # identical to float32 precision.
            near = np.zeros(diff.shape, dtype=bool)
            w = WCS(a.header)
            for t in (tp, tm):
                x, y = w.all_world2pix(t["RA"], t["DEC"], 0)
                for i in range(len(x)):
                    n = _stamp_size(
                        float(t["HLR_ARCSEC"][i]), float(t["MAG_VIS_TRUE"][i]), bool(t["IS_STAR"][i]), 0.1
                    )
                    ix, iy = round(x[i]), round(y[i])
                    near[
                        max(iy - n // 2, 0) : max(iy + n // 2 + 1, 0),
                        max(ix - n // 2, 0) : max(ix + n // 2 + 1, 0),
                    ] = True
            far = ~near
            assert far.sum() > 0.05 * diff.size
            assert np.abs(diff[far]).max() < 1e-3
            assert np.abs(diff[near]).max() > 1.0  # the sources do differ
    # Unpaired (Poisson) noise differs everywhere: the test above can fail.
    cfg_np = small_config(rp / "unpaired", field={**PAIR_FIELD, "paired_noise": False, "shear_g1": G_PAIR})
    cfg_nm = small_config(rm / "unpaired", field={**PAIR_FIELD, "paired_noise": False, "shear_g1": -G_PAIR})
    q = FP.focal_plane(cfg_np.field)[0]
    (e,) = FP.exposure_layout(cfg_np)
    zeros = np.zeros((cfg_np.field.quadrant_ny_pix, cfg_np.field.quadrant_nx_pix))
    a = expose_quadrant(cfg_np, e, q, zeros)[0]
    b = expose_quadrant(cfg_nm, e, q, zeros + 1e-3)[0]
    assert np.mean(a != b) > 0.5


def test_object_ids_match_across_shear(shear_pair):
    """The +g and -g catalogs match by OBJECT_ID (away from the field edges, which the shear moves)."""
    from constellation_assets.synthetic.field import exposure_coverage

    (cfg_p, rp), (_, rm) = shear_pair["plus"], shear_pair["minus"]
    cp, cm = _catalog(rp), _catalog(rm)
    tp, tm = _truth(rp), _truth(rm)
    exps = FP.exposure_layout(cfg_p)
    inner = np.ones(len(tp["RA"]), dtype=bool)
    for t in (tp, tm):
        for dx, dy in ((3, 0), (-3, 0), (0, 3), (0, -3)):
            ra = t["RA"] + dx / 3600.0 / np.cos(np.radians(t["DEC"]))
            inner &= exposure_coverage(cfg_p, exps, ra, t["DEC"] + dy / 3600.0) > 0
    by_p = {int(o): k for k, o in enumerate(cp["OBJECT_ID"])}
    ids_m = set(cm["OBJECT_ID"][cm["SPURIOUS_FLAG"] == 0])
    sel = [
        i
        for i in np.nonzero(inner & (tp["OBJECT_ID"] >= 0))[0]
        if cp["SNR_DETECTION"][by_p[int(tp["OBJECT_ID"][i])]] > 15
    ]
    assert len(sel) >= 15
    matched = np.mean([int(tp["OBJECT_ID"][i]) in ids_m for i in sel])
    assert matched >= 0.95
    # All real ids are distinct truth-derived ids; the truth ids of one population are shared.
    np.testing.assert_array_equal(tp["OBJECT_ID_TRUTH"], tm["OBJECT_ID_TRUTH"])


def test_intrinsic_rotation_and_constant_shear():
    base = small_config("/nonexistent", field={"shear_g1": 0.02, "shear_g2": -0.01})
    rot = small_config(
        "/nonexistent", field={"shear_g1": 0.02, "shear_g2": -0.01, "intrinsic_rotation_deg": 90}
    )
    exps = FP.exposure_layout(base)
    a = POP.simulate_tile_sources(base, TILE, exps)
    b = POP.simulate_tile_sources(rot, TILE, exps)
    gal = ~a["IS_STAR"]
    np.testing.assert_allclose(b["ROTATION_RAD"][gal] - a["ROTATION_RAD"][gal], math.pi / 2)
    np.testing.assert_array_equal(a["RA"], b["RA"])
    assert np.all(a["G1_TRUE"][gal] == 0.02) and np.all(a["G2_TRUE"][gal] == -0.01)
    np.testing.assert_array_equal(a["_g_mean"], [0.02, -0.01])
    # The 90-degree partner's intrinsic ellipticity is the negative of the original's.
    import galsim

    cat = POP.load_cosmos_param_table()
    i = int(np.nonzero(gal & (a["HLR_ARCSEC"] > 0.2))[0][0])
    psf = galsim.Gaussian(fwhm=0.1)
    ea = (
        galsim.Convolve(POP.galaxy_profile(cat, i, a), psf)
        .drawImage(nx=64, ny=64, scale=0.05)
        .FindAdaptiveMom()
    )
    eb = (
        galsim.Convolve(POP.galaxy_profile(cat, i, b), psf)
        .drawImage(nx=64, ny=64, scale=0.05)
        .FindAdaptiveMom()
    )
    assert eb.observed_shape.g1 == pytest.approx(-ea.observed_shape.g1, abs=2e-3)
    assert eb.observed_shape.g2 == pytest.approx(-ea.observed_shape.g2, abs=2e-3)
    # Unset shear: drawn per tile within the amplitude.
    drawn = POP.tile_shear(small_config("/nonexistent").field, TILE)
    assert all(abs(g) <= 0.03 for g in drawn)


def test_truth_catalog_mode():
    cfg = small_config("/nonexistent", field={"mer_catalog": "truth"})
    exps = FP.exposure_layout(cfg)
    truth = POP.simulate_tile_sources(cfg, TILE, exps)
    truth.pop("_g_mean")
    n_cover = np.ones(len(truth["RA"]), dtype=np.int32)
    cols, rows, member_of = M.truth_mer_catalog(cfg, TILE, truth, n_cover)
    assert list(cols) == list(MER_COLUMNS)
    real = rows >= 0
    np.testing.assert_array_equal(cols["OBJECT_ID"][real], truth["OBJECT_ID_TRUTH"][rows[real]])
    assert len(np.unique(cols["OBJECT_ID"])) == len(rows)


def test_rendered_star_flux_position_and_noise(small_field):
    """A bright unsaturated star: flux and position as in the truth; sky noise as expected."""
    cfg, _, root = small_field
    f = cfg.field
    truth = _truth(root)
    det = _files(root, "q1/VIS/*/EUC_VIS_SWL-DET-*-00-1-*.fits")[0]
    bkg = _files(root, "q1/VIS/*/EUC_VIS_SWL-BKG-*-00-1-*.fits")[0]
    ra, dec = truth["RA"], truth["DEC"]
    best = None
    with fits.open(det) as hd, fits.open(bkg) as hb:
        for c in (1, 2):
            for q in "EFGH":
                sci = hd[f"1-{c}.{q}.SCI"]
                x, y = WCS(sci.header).all_world2pix(ra, dec, 0)
                for i in np.nonzero(truth["IS_STAR"])[0]:
                    if not (20 < x[i] < f.quadrant_nx_pix - 20 and 20 < y[i] < f.quadrant_ny_pix - 20):
                        continue
                    flux = truth["FLUX_ADU_PER_EXPOSURE"][i]
                    if flux * 0.25 > f.saturation_adu or flux < 2000:
                        continue
                    # isolated: no other object brighter than 1 % of it within 2"
                    d = np.hypot((ra - ra[i]) * np.cos(np.radians(dec[i])), dec - dec[i]) * 3600
                    near = (d < 2.0) & (d > 0) & (truth["FLUX_ADU_PER_EXPOSURE"] > 0.01 * flux)
                    if near.any():
                        continue
                    if best is None or flux > best[0]:
                        img = sci.data.astype(float) - hb[f"1-{c}.{q}"].data
                        flg = hd[f"1-{c}.{q}.FLG"].data
                        best = (flux, img, flg, x[i], y[i])
    assert best is not None, "no isolated bright star in the small field"
    flux, img, flg, x0, y0 = best
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    r = np.hypot(xx - x0, yy - y0)
    ap = (r < 12) & (flg == 0)
    measured = img[ap].sum()
    assert measured == pytest.approx(flux * 0.97, rel=0.05)  # ~3 % of an Airy's light lies beyond 1.2"
    w = np.where(ap & (r < 4), img, 0.0)
    cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    assert abs(cx - x0) < 0.1 and abs(cy - y0) < 0.1
    pix = img[flg == 0]
    mad = 1.4826 * np.median(np.abs(pix - np.median(pix)))
    expected = np.sqrt(f.sky_level_adu * f.gain_e_per_adu + f.read_noise_e**2) / f.gain_e_per_adu
    assert mad == pytest.approx(expected, rel=0.1)


def test_flags_cosmics_and_hot_pixels(small_field):
    _, _, root = small_field
    det = _files(root, "q1/VIS/*/EUC_VIS_SWL-DET-*-01-1-*.fits")[0]
    with fits.open(det) as hdul:
        flg = np.concatenate([hdul[f"1-{c}.{q}.FLG"].data.ravel() for c in (1, 2) for q in "EFGH"])
        sci = np.concatenate([hdul[f"1-{c}.{q}.SCI"].data.ravel() for c in (1, 2) for q in "EFGH"])
    cosmic = (flg & euclid.FLG_COSMIC) != 0
    hot = (flg & euclid.FLG_HOT) != 0
    assert cosmic.sum() > 10 and hot.sum() > 0
    assert np.median(sci[cosmic]) > np.median(sci) + 50  # cosmic-ray tracks are bright


def test_deterministic_and_idempotent(small_field, tmp_path):
    cfg, summary, root = small_field
    # Same config elsewhere: byte-identical files.
    cfg2 = small_config(tmp_path)
    s2 = S.simulate_field(cfg2)
    for a, b in zip(sorted(summary.tiles[0].files), sorted(s2.tiles[0].files), strict=True):
        assert Path(a).name == Path(b).name
        if a.endswith(".fits"):
            assert (
                hashlib.sha256(Path(a).read_bytes()).digest() == hashlib.sha256(Path(b).read_bytes()).digest()
            )
    # Re-run: skipped, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.fits")}
    s3 = S.simulate_field(cfg2)
    assert s3.tiles[0].skipped
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.fits")} == before
    # A different field config over existing data is refused unless forced; forced replaces the files.
    cfg3 = small_config(tmp_path, field={"seed": 7})
    with pytest.raises(FileExistsError, match="force"):
        S.simulate_field(cfg3)
    s4 = S.simulate_field(cfg3, force=True)
    assert not s4.tiles[0].skipped
    dets = list(tmp_path.rglob("EUC_VIS_SWL-DET-*.fits"))
    assert len(dets) == 4  # old timestamps gone, no duplicates for discovery to trip on
    assert len(list(tmp_path.rglob("EUC_VIS_GRD-PSF-*.fits"))) == 1


def test_smooth_shear_map():
    cfg = small_config(
        "/nonexistent", field={"shear_model": "smooth_map", "n_dithers": 1, "ccd_grid": [1, 1]}
    )
    exps = FP.exposure_layout(cfg)
    truth = POP.simulate_tile_sources(cfg, TILE, exps)
    gal = ~truth["IS_STAR"]
    g1 = truth["G1_TRUE"][gal]
    assert g1.std() > 1e-3  # varies across the field
    assert np.all(np.abs(g1) < 0.1)


def test_cosmos_table_matches_galsim(cosmos_dir):
    """The packaged table is GalSim's COSMOS parametric recipe: same table, same rendered galaxies."""
    import galsim

    derived = POP.derive_cosmos_param_table(cosmos_dir)
    packaged = POP.load_cosmos_param_table()
    for k in packaged:
        assert np.allclose(derived[k], packaged[k], rtol=1e-12, atol=0), k
    cat = galsim.COSMOSCatalog(
        file_name="real_galaxy_catalog_23.5_example.fits",
        dir=str(cosmos_dir),
        use_real=False,
        exclusion_level="none",
    )
    ident = packaged["ident"]
    for i in range(0, cat.nobjects, 17):
        ref = cat.makeGalaxy(i, gal_type="parametric", sersic_prec=0.0)
        j = int(np.nonzero(ident == cat.param_cat["IDENT"][cat.orig_index[i]])[0][0])
        truth = {
            "COSMOS_INDEX": np.array([j]),
            "FLUX_ADU_PER_EXPOSURE": np.array([ref.flux]),
            "SIZE_SCALE": np.array([1.0]),
            "ROTATION_RAD": np.array([0.0]),
        }
        psf = galsim.Gaussian(fwhm=0.1)  # bounded FFT sizes (bare de Vaucouleurs cores need huge ones)
        mine = POP.galaxy_profile(packaged, 0, truth)
        a = galsim.Convolve(mine, psf).drawImage(nx=64, ny=64, scale=0.05).array
        b = galsim.Convolve(ref, psf).drawImage(nx=64, ny=64, scale=0.05).array
        # Sersic n is rounded to 0.1 in the field (GalSim caches profiles per n): allow a small difference.
        assert np.abs(a - b).max() < 0.05 * b.max(), i


def test_field_default_config_is_demo_sized():
    from constellation_assets.config import load_config

    f = load_config().field
    assert len(f.tile_ids) >= 2 and all(100_000_000 <= t <= 999_999_999 for t in f.tile_ids)
    assert f.gain_e_per_adu == 3.48 and f.exptime_s == 560.52 and f.magzerop == 24.57
    assert f.short_exptime_s == euclid.VIS_EXPTIME_SHORT_S and f.short_exposure_dithers == [0, 1]
    assert f.shear_positions and not f.paired_noise and f.mer_catalog == "measured"
    assert (f.psf_model_size_error, f.psf_model_e1_error, f.psf_model_e2_error) == (0.0, 0.0, 0.0)
    assert 0.16 <= f.psf_fwhm_arcsec <= 0.2


def test_public_reexports():
    from constellation_assets.synthetic import (
        MER_BANDS,
        band_colour_mag,
        canonical_band,
        simulate_field,
        tile_truth_uri,
    )

    assert MER_BANDS is euclid.BANDS and canonical_band("Y") == "NIR_Y"
    assert band_colour_mag("VIS", 1.0) == 0.0 and callable(simulate_field) and callable(tile_truth_uri)


def test_scene_shear_about_blend_groups():
    """With scene_shear_group_arcsec, each friends-of-friends group is sheared about its own centre: relative
    positions inside a group follow A^-1 exactly, isolated galaxies do not move, stars never move."""
    g1, g2, link = 0.05, -0.03, 2.0
    base = {"galaxy_density_arcmin2": 200.0, "scene_shear_group_arcsec": link}
    zero = small_config("/nonexistent", field={**base, "shear_g1": 0.0, "shear_g2": 0.0})
    sheared = small_config("/nonexistent", field={**base, "shear_g1": g1, "shear_g2": g2})
    exps = FP.exposure_layout(zero)
    t0 = POP.simulate_tile_sources(zero, TILE, exps)
    tg = POP.simulate_tile_sources(sheared, TILE, exps)
    np.testing.assert_array_equal(t0["TRUE_ID"], tg["TRUE_ID"])
    ra_t, dec_t = tile_center_deg(TILE)
    x0, e0 = radec_to_tangent(t0["RA"], t0["DEC"], ra_t, dec_t)
    xg, eg = radec_to_tangent(tg["RA"], tg["DEC"], ra_t, dec_t)
    gal = ~t0["IS_STAR"]
    cx, cy = POP.blend_group_centres(x0[gal], e0[gal], 10 ** (-0.4 * t0["MAG_VIS_TRUE"][gal]), link)
    lx, le = POP.lens_positions(x0[gal] - cx, e0[gal] - cy, g1, g2)
    np.testing.assert_allclose(xg[gal], lx + cx, rtol=0, atol=1e-11)
    np.testing.assert_allclose(eg[gal], le + cy, rtol=0, atol=1e-11)
    np.testing.assert_allclose(xg[~gal], x0[~gal], rtol=0, atol=1e-12)
    alone = (np.abs(cx - x0[gal]) < 1e-12) & (np.abs(cy - e0[gal]) < 1e-12)
    grouped = ~alone
    assert alone.sum() > 10 and grouped.sum() > 10
    np.testing.assert_allclose(xg[gal][alone], x0[gal][alone], rtol=0, atol=1e-12)  # isolated: no shift
    # Inside a group, the separation vector of two members is mapped by A^-1 (the scene is a sheared copy).
    i, j = np.nonzero(grouped & (np.abs(cx - cx[np.argmax(grouped)]) < 1e-12))[0][:2]
    d0 = np.array([x0[gal][j] - x0[gal][i], e0[gal][j] - e0[gal][i]])
    dg = np.array([xg[gal][j] - xg[gal][i], eg[gal][j] - eg[gal][i]])
    np.testing.assert_allclose(dg, POP.lens_positions(d0[0], d0[1], g1, g2), rtol=0, atol=1e-12)
    shift = np.hypot(xg[gal] - x0[gal], eg[gal] - e0[gal]) * 3600
    assert shift.max() < 3 * link * 0.1  # never the g * r of a tile-centred map (~g * 100" here)
