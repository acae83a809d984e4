"""Synthetic Euclid Q1 field: layout, headers, physics against GalSim, determinism and idempotency."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from constellation_assets.io.mer_catalog import MER_COLUMNS, read_mer_catalog
from constellation_assets.io.q1 import DET_RE, MER_RE, PSF_RE
from constellation_assets.sim import field as F
from constellation_assets_tests.q1_testdata import TILE, small_config


@pytest.fixture(scope="module")
def small_field(tmp_path_factory):
    root = tmp_path_factory.mktemp("field")
    cfg = small_config(root)
    summary = F.simulate_field(cfg)
    return cfg, summary, root


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def test_layout_and_names(small_field):
    cfg, summary, root = small_field
    (t,) = summary.tiles
    assert t.tile_id == TILE and not t.skipped and t.n_galaxies > 50 and t.n_stars > 0
    obs = cfg.field.first_obs_id
    vis = root / "q1" / "VIS" / str(obs)
    names = sorted(p.name for p in vis.iterdir())
    kinds = {}
    for n in names:
        m = DET_RE.match(n)
        if m:
            assert int(m["obs_id"]) == obs
            kinds.setdefault(m["kind"], set()).add(int(m["dither"]))
        else:
            assert PSF_RE.match(n), n
            kinds.setdefault("PSF", set()).add(int(n.split("-")[3]))
    assert kinds == {k: {0, 1} for k in ("DET", "BKG", "WGT", "PSF")}
    # Timestamps differ per file (discovery must list, never construct names).
    stamps = [re.search(r"__(\d{8}T\d{6}\.\d{6})Z", n)[1] for n in names]
    assert len(set(stamps)) == len(stamps)
    (cat,) = _files(root, f"q1/catalogs/MER_FINAL_CATALOG/{TILE}/*.fits")
    m = MER_RE.match(cat.name)
    assert m and int(m["tile_id"]) == TILE and m["version"] == "00.00"


def test_det_file_structure_and_headers(small_field):
    cfg, _, root = small_field
    det = _files(root, "q1/VIS/*/EUC_VIS_SWL-DET-*-00-*.fits")[0]
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


def test_psf_file(small_field):
    cfg, _, root = small_field
    psf = _files(root, "q1/VIS/*/EUC_VIS_GRD-PSF-*-01-*.fits")[0]
    with fits.open(psf) as hdul:
        hdu = hdul["1-1.E"]
        assert hdu.data.shape == (189, 189)
        assert hdu.header["OVERSAMP"] == 3 and hdu.header["PSFPIXEL"] == "INCLUDED"
        stamps = hdu.data.reshape(9, 21, 9, 21).transpose(0, 2, 1, 3)
        sums = stamps.sum(axis=(2, 3))
        assert np.allclose(sums, 1.0, atol=1e-5)
        # Every stamp peaks at its centre pixel (10, 10).
        peak = stamps.reshape(81, -1).argmax(axis=1)
        assert np.all(peak == 10 * 21 + 10)
        # Position dependent: the corner stamps differ.
        assert np.abs(stamps[0, 0] - stamps[8, 8]).max() > 1e-4


def test_psf_model_against_galsim():
    import galsim

    # FWHM of Airy (x) Gaussian from the Hankel transform agrees with GalSim's measurement on a fine image.
    for fwhm in (0.17, 0.2):
        prof = F.field_psf(fwhm, 0.0, 0.0)
        measured = prof.drawImage(nx=151, ny=151, scale=0.004, method="no_pixel").calculateFWHM()
        assert measured == pytest.approx(fwhm, abs=2e-3)
    # The numpy k-space PSF stamps equal GalSim's drawing of Convolve(PSF, Pixel) sampled at 0.1"/3.
    fw, g1, g2 = 0.18, -0.02, 0.04
    ref = galsim.Convolve(F.field_psf(fw, g1, g2), galsim.Pixel(0.1))
    ref = ref.drawImage(nx=21, ny=21, scale=0.1 / 3, method="no_pixel").array
    ref /= ref.sum()
    mine = F.effective_psf_stamps([fw], [g1], [g2], 0.1, 3)[0]
    assert np.abs(mine - ref).max() < 1e-4 * ref.max() * 10


def test_mer_catalog_and_truth(small_field):
    cfg, summary, root = small_field
    (cat,) = _files(root, f"q1/catalogs/MER_FINAL_CATALOG/{TILE}/*.fits")
    t = read_mer_catalog(str(cat))
    for name in MER_COLUMNS:
        assert name in t.column_names
    assert t.num_rows == summary.tiles[0].n_catalog_rows
    ids = t.column("OBJECT_ID").to_numpy()
    assert len(np.unique(ids)) == len(ids)
    assert t.column("SPURIOUS_FLAG").to_numpy().sum() >= 0
    assert set(np.unique(t.column("POINT_LIKE_FLAG").to_numpy())) <= {0, 1}

    import pyarrow.parquet as pq

    truth = pq.read_table(root / "q1" / "sim_truth" / str(TILE) / "truth_objects.parquet")
    shear = json.loads((root / "q1" / "sim_truth" / str(TILE) / "shear_truth.json").read_text())
    gal = ~truth.column("IS_STAR").to_numpy()
    g1 = truth.column("G1_TRUE").to_numpy()[gal]
    assert np.allclose(g1, shear["G1_TRUE"]) and abs(shear["G1_TRUE"]) <= cfg.field.shear_amplitude
    # Detected truth objects carry the MER OBJECT_ID; every real catalog row maps back to one.
    det = truth.column("OBJECT_ID").to_numpy()
    det = det[det >= 0]
    real = t.filter(t.column("SPURIOUS_FLAG").to_numpy() == 0).column("OBJECT_ID").to_numpy()
    assert set(det) == set(real)


def test_rendered_star_flux_position_and_noise(small_field):
    """A bright unsaturated star: flux and position as in the truth; sky noise as expected."""
    import pyarrow.parquet as pq

    cfg, _, root = small_field
    f = cfg.field
    truth = pq.read_table(root / "q1" / "sim_truth" / str(TILE) / "truth_objects.parquet").to_pydict()
    det = _files(root, "q1/VIS/*/EUC_VIS_SWL-DET-*-00-*.fits")[0]
    bkg = _files(root, "q1/VIS/*/EUC_VIS_SWL-BKG-*-00-*.fits")[0]
    ra, dec = np.array(truth["RA"]), np.array(truth["DEC"])
    best = None
    with fits.open(det) as hd, fits.open(bkg) as hb:
        for c in (1, 2):
            for q in "EFGH":
                sci = hd[f"1-{c}.{q}.SCI"]
                x, y = WCS(sci.header).all_world2pix(ra, dec, 0)
                for i in np.nonzero(np.array(truth["IS_STAR"]))[0]:
                    if not (20 < x[i] < f.quadrant_nx_pix - 20 and 20 < y[i] < f.quadrant_ny_pix - 20):
                        continue
                    flux = truth["FLUX_ADU_PER_EXPOSURE"][i]
                    if flux * 0.25 > f.saturation_adu or flux < 2000:
                        continue
                    # isolated: no other object brighter than 1 % of it within 2"
                    d = np.hypot((ra - ra[i]) * np.cos(np.radians(dec[i])), dec - dec[i]) * 3600
                    near = (d < 2.0) & (d > 0) & (np.array(truth["FLUX_ADU_PER_EXPOSURE"]) > 0.01 * flux)
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
    # Sky noise in empty pixels (flag-free, away from sources: use the lowest 60 % of pixels is biased, so
    # compare the robust std of the whole image, dominated by sky) with sqrt(sky * gain + rn^2) / gain.
    pix = img[flg == 0]
    mad = 1.4826 * np.median(np.abs(pix - np.median(pix)))
    expected = np.sqrt(f.sky_level_adu * f.gain_e_per_adu + f.read_noise_e**2) / f.gain_e_per_adu
    assert mad == pytest.approx(expected, rel=0.1)


def test_flags_cosmics_and_hot_pixels(small_field):
    _, _, root = small_field
    det = _files(root, "q1/VIS/*/EUC_VIS_SWL-DET-*-01-*.fits")[0]
    with fits.open(det) as hdul:
        flg = np.concatenate([hdul[f"1-{c}.{q}.FLG"].data.ravel() for c in (1, 2) for q in "EFGH"])
        sci = np.concatenate([hdul[f"1-{c}.{q}.SCI"].data.ravel() for c in (1, 2) for q in "EFGH"])
    cosmic = (flg & F.FLAG_COSMIC) != 0
    hot = (flg & F.FLAG_HOT) != 0
    assert cosmic.sum() > 10 and hot.sum() > 0
    assert np.median(sci[cosmic]) > np.median(sci) + 50  # cosmic-ray tracks are bright


def test_deterministic_and_idempotent(small_field, tmp_path):
    cfg, summary, root = small_field
    # Same config elsewhere: byte-identical files.
    cfg2 = small_config(tmp_path)
    s2 = F.simulate_field(cfg2)
    for a, b in zip(sorted(summary.tiles[0].files), sorted(s2.tiles[0].files), strict=True):
        assert Path(a).name == Path(b).name
        if a.endswith(".fits"):
            assert (
                hashlib.sha256(Path(a).read_bytes()).digest() == hashlib.sha256(Path(b).read_bytes()).digest()
            )
    # Re-run: skipped, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.fits")}
    s3 = F.simulate_field(cfg2)
    assert s3.tiles[0].skipped
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.fits")} == before
    # A different field config over existing data is refused unless forced; forced replaces the files.
    cfg3 = small_config(tmp_path, field={"seed": 7})
    with pytest.raises(FileExistsError, match="force"):
        F.simulate_field(cfg3)
    s4 = F.simulate_field(cfg3, force=True)
    assert not s4.tiles[0].skipped
    dets = list(tmp_path.rglob("EUC_VIS_SWL-DET-*.fits"))
    assert len(dets) == 2  # old timestamps gone, no duplicates for discovery to trip on


def test_smooth_shear_map(tmp_path):
    cfg = small_config(tmp_path, field={"shear_model": "smooth_map", "n_dithers": 1, "ccd_grid": [1, 1]})
    exps = F.exposure_layout(cfg)
    truth = F.simulate_tile_sources(cfg, TILE, exps)
    gal = ~truth["IS_STAR"]
    g1 = truth["G1_TRUE"][gal]
    assert g1.std() > 1e-3  # varies across the field
    assert np.all(np.abs(g1) < 0.1)


def test_cosmos_table_matches_galsim(cosmos_dir):
    """The packaged table is GalSim's COSMOS parametric recipe: same table, same rendered galaxies."""
    import galsim

    derived = F.derive_cosmos_param_table(cosmos_dir)
    packaged = F.load_cosmos_param_table()
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
        mine = F.galaxy_profile(packaged, 0, truth)
        a = galsim.Convolve(mine, psf).drawImage(nx=64, ny=64, scale=0.05).array
        b = galsim.Convolve(ref, psf).drawImage(nx=64, ny=64, scale=0.05).array
        # Sersic n is rounded to 0.1 in the field (GalSim caches profiles per n): allow a small difference.
        assert np.abs(a - b).max() < 0.05 * b.max(), i


def test_field_default_config_is_demo_sized():
    from constellation_assets.config import load_config

    f = load_config().field
    assert len(f.tile_ids) >= 2 and all(100_000_000 <= t <= 999_999_999 for t in f.tile_ids)
    assert f.gain_e_per_adu == 3.48 and f.exptime_s == 560.52 and f.magzerop == 24.57
    assert 0.16 <= f.psf_fwhm_arcsec <= 0.2
