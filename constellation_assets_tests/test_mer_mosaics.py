"""MER background-subtracted mosaics: synthetic layout/WCS/photometry, discovery, row-range cutouts, and
4-band (VIS + NISP) injection runs with hosts from the mosaics."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from constellation_assets import synthetic as F
from constellation_assets.io import q1
from constellation_assets.io.uri import DataAccessError
from constellation_assets.sim import injection as inj
from constellation_assets.sky.tiles import tile_center_deg
from constellation_assets.synthetic.population import object_sed_alpha
from constellation_assets_tests.q1_testdata import SMALL_FIELD, TILE, small_config
from constellation_assets_tests.test_injection_field import make_tiny_field, tiny_config

BANDS = ["VIS", "NIR_Y", "NIR_J", "NIR_H"]
PSF = {"VIS": 0.17, "NIR_Y": 0.45, "NIR_J": 0.47, "NIR_H": 0.5}
#: A slightly larger focal plane than the shared small field, so a few hosts fit whole stamps.
FIELD = {"quadrant_nx_pix": 260, "quadrant_ny_pix": 260, "galaxy_density_arcmin2": 70.0}
INJ = {
    "bands": BANDS,
    "psf_fwhm_arcsec": PSF,
    "stamp_size_pix": 40,
    "n_total_train_per_split": 8,
    "partitions": 2,
    "register_catalog": False,
    "oversampling": 2,
    "split_fractions": {"train": 1.0, "val": 0.0, "test": 0.0},
    "host_mag_range": [17.0, 24.5],
    "host_min_semimajor_axis_pix": 1.0,
    "host_snr_min": 10.0,
}


@pytest.fixture(scope="module")
def mer_field(tmp_path_factory):
    root = tmp_path_factory.mktemp("merfield")
    cfg = small_config(root, field=FIELD)
    F.simulate_field(cfg)
    return root, cfg


def _inj_cfg(root: Path, out: str, **kw):
    return small_config(root, field=FIELD, injection={**INJ, "output_uri": str(root / out), **kw})


def _truth(root: Path) -> dict:
    t = pq.read_table(root / "q1" / "sim_truth" / str(TILE) / "truth_objects.parquet")
    return {k: t.column(k).to_numpy() for k in t.column_names}


def test_mosaic_layout_names_and_wcs(mer_field):
    root, cfg = mer_field
    files = sorted((root / "q1" / "MER" / str(TILE)).glob("*/*.fits"))
    by_band = {}
    for p in files:
        m = q1.MER_MOSAIC_RE.match(p.name)
        assert m and int(m["tile_id"]) == TILE and m["version"] == "00.00", p.name
        band = q1.mer_band_name(m["band"])
        assert p.parent.name == ("VIS" if band == "VIS" else "NISP")
        by_band[band] = p
    assert sorted(by_band) == sorted(BANDS)
    assert {m.split("-")[-1] for m in [p.name.split("_TILE")[0] for p in files]} >= {"VIS", "Y", "J", "H"}
    ra_t, dec_t = tile_center_deg(TILE)
    shapes = set()
    truth = _truth(root)
    for band, p in by_band.items():
        assert p.stat().st_size < 30e6
        with fits.open(p) as hdul:
            h, d = hdul[0].header, hdul[0].data
        shapes.add(d.shape)
        assert d.dtype == np.dtype(">f4") and "BUNIT" not in h and h["MAGZERO"] == pytest.approx(24.6)
        assert h["CTYPE1"] == "RA---TAN" and h["CTYPE2"] == "DEC--TAN" and h["FILTER"] == band
        assert (h["CRVAL1"], h["CRVAL2"]) == pytest.approx((ra_t, dec_t))
        # A sub-grid of the full 19200 x 19200 tile, whose CRPIX is 9600 (the real mosaics').
        assert h["CRPIX1"] + h["TILEX0"] == 9600 and h["CRPIX2"] + h["TILEY0"] == 9600
        w = WCS(h)
        assert np.abs(np.diag(w.pixel_scale_matrix)) * 3600 == pytest.approx([0.1, 0.1], rel=1e-9)
        x, y = w.all_world2pix(truth["RA"], truth["DEC"], 0)
        assert x.min() > 0 and y.min() > 0 and x.max() < d.shape[1] - 1 and y.max() < d.shape[0] - 1
    assert len(shapes) == 1


def test_mosaic_photometry_colours_and_psf(mer_field):
    """Isolated bright stars: flux = VIS flux x power-law colour, centroid on the WCS position, FWHM per band."""
    root, cfg = mer_field
    truth = _truth(root)
    alpha = object_sed_alpha(cfg.field, TILE, truth)
    found = q1.discover_mer_mosaics(F.mer_base_uri_of(cfg), TILE)
    star = np.nonzero(truth["IS_STAR"] & (truth["MAG_VIS_TRUE"] < 21.5))[0]
    assert len(star)
    fwhm = {}
    for band in BANDS:
        with fits.open(found[band]) as hdul:
            d = hdul[0].data.astype(float)
            x, y = WCS(hdul[0].header).all_world2pix(truth["RA"], truth["DEC"], 0)
        for i in star:
            ix, iy = int(round(x[i])), int(round(y[i]))
            if not (16 <= ix < d.shape[1] - 16 and 16 <= iy < d.shape[0] - 16):
                continue
            cut = d[iy - 15 : iy + 16, ix - 15 : ix + 16]
            # Pixel units of MAGZERO 24.6: flux_uJy * 10**(0.4 (24.6 - 23.9)).
            expect = truth["FLUX_UJY_TRUE"][i] * 10 ** (-0.4 * (F.band_colour_mag(band, alpha[i]) - 0.7))
            # 3.1" box: > 93 % of the Airy x Gaussian light, and noise is tiny for these stars.
            assert 0.93 < cut.sum() / expect < 1.0
            yy, xx = np.mgrid[iy - 15 : iy + 16, ix - 15 : ix + 16]
            assert abs((cut * xx).sum() / cut.sum() - x[i]) < 0.05
            assert abs((cut * yy).sum() / cut.sum() - y[i]) < 0.05
            fwhm.setdefault(band, 2.0 * np.sqrt((cut > cut.max() / 2).sum() / np.pi) * 0.1)
            break
    assert fwhm["VIS"] < 0.3 and all(0.35 < fwhm[b] < 0.65 for b in BANDS[1:])


def test_discovery_picks_newest_and_reads_band_from_name(mer_field, tmp_path):
    root, cfg = mer_field
    base = F.mer_base_uri_of(cfg)
    assert base == str(root / "q1" / "MER") + "/"
    assert q1.default_mer_base_uri(str(root / "q1" / "VIS")) == base
    found = q1.discover_mer_mosaics(base, TILE)
    assert sorted(found) == sorted(BANDS)
    assert q1.discover_mer_mosaics(base, TILE, bands=["VIS", "NIR-H"]).keys() == {"VIS", "NIR_H"}
    assert q1.discover_mer_mosaics(base, 102044186) == {}
    # Another layout (one folder per band), an older reprocessing and foreign files: newest per band wins.
    alt = tmp_path / "MER" / str(TILE)
    for band, uri in found.items():
        (alt / band).mkdir(parents=True)
        shutil.copy(uri, alt / band / Path(uri).name)
    old = Path(found["NIR_J"]).name.replace("_2024", "_2023")
    shutil.copy(found["NIR_J"], alt / "NIR_J" / old)
    (alt / "NIR_J" / "EUC_MER_MOSAIC-NIR-J-RMS_TILE102044185-X_20250101T000000.0Z_00.00.fits").write_text("x")
    (alt / "README").write_text("x")
    got = q1.discover_mer_mosaics(str(tmp_path / "MER"), TILE)
    assert {b: Path(u).name for b, u in got.items()} == {b: Path(u).name for b, u in found.items()}


def test_cutout_reads_only_rows_and_equals_mosaic(mer_field, monkeypatch):
    root, cfg = mer_field
    uri = q1.discover_mer_mosaics(F.mer_base_uri_of(cfg), TILE)["NIR_Y"]
    calls = []
    real = q1._read_range
    monkeypatch.setattr(q1, "_read_range", lambda fs, p, a, b: calls.append((a, b)) or real(fs, p, a, b))
    info = q1.read_mosaic_info(uri)
    assert info.zero_point_mag == pytest.approx(24.6)
    calls.clear()
    c = q1.read_mosaic_cutout(info, 37, 51, 40, 33)
    full = fits.getdata(uri)
    np.testing.assert_array_equal(c.data, full[51:84, 37:77])
    assert c.data.dtype == np.float32 and len(calls) == 1
    assert c.bytes_read == 33 * info.nx_pix * 4 < Path(uri).stat().st_size / 5
    with pytest.raises(DataAccessError, match="leaves the"):
        q1.read_mosaic_cutout(info, info.nx_pix - 10, 0, 40, 40)


def test_four_band_injection_per_band_arcs_and_determinism(mer_field):
    root, _ = mer_field
    cfg = _inj_cfg(root, "out_a")
    hosts = inj.discover_hosts(cfg)
    assert hosts.hosts and not hosts.problems and all(h.hdu == inj.MER_HOST_HDU for h in hosts.hosts)
    tasks = inj.plan_tasks(cfg, hosts)
    rendered = inj.render_tasks(cfg, tasks[:4], hosts)
    found = q1.discover_mer_mosaics(F.mer_base_uri_of(cfg), TILE)
    for r in rendered:
        h = r.task.host
        x0, y0 = round(h.x_pix) - 20, round(h.y_pix) - 20
        for j, b in enumerate(BANDS):
            np.testing.assert_array_equal(r.host[j], fits.getdata(found[b])[y0 : y0 + 40, x0 : x0 + 40])
            # No GAIN in MER mosaics: composite = host + noiseless arc exactly.
            np.testing.assert_allclose(r.composite[j], r.host[j] + r.arc[j], rtol=0, atol=1e-5)
        mags = np.array(r.band_source_mag)
        assert mags[0] == pytest.approx(r.params.source_mag)
        alpha = inj.source_sed_alpha(r.task.task_id, cfg.injection.seed_base)
        assert mags == pytest.approx([r.params.source_mag + F.band_colour_mag(b, alpha) for b in BANDS])
        # Arc flux ratios between bands follow the colour (same zero point 24.6 everywhere; the arc may leave
        # the 4" stamp, and wider NISP PSFs lose a little more light off it).
        flux = r.arc.reshape(4, -1).sum(axis=1)
        expect = 10 ** (-0.4 * (mags - mags[0]))
        assert flux / flux[0] == pytest.approx(expect, rel=0.06)
        assert 0.2 < flux[0] / (10 ** (-0.4 * (mags[0] - 24.6)) * r.magnification) < 1.02
        assert r.arc[0].max() / r.arc[0].sum() > r.arc[3].max() / r.arc[3].sum()  # VIS sharper than H
        assert len(set(np.round(r.band_noise_sigma, 6))) == 4
    res_a = inj.run_injection(cfg)
    res_b = inj.run_injection(_inj_cfg(root, "out_b"))
    assert res_a.complete and res_a.n_rows == 8
    assert [Path(u).read_bytes() for u in res_a.shard_uris] == [
        Path(u).read_bytes() for u in res_b.shard_uris
    ]
    table, images = inj.read_stamps(res_a.shard_uris[0])
    assert set(images) == set(BANDS) and images["NIR_H"].shape[1:] == (40, 40)
    for b in BANDS:
        assert f"source_mag_{b}" in table.column_names and f"zero_point_mag_{b}" in table.column_names


def test_preflight_accepts_nisp_with_mosaics_and_explains_missing_ones(mer_field, tmp_path):
    root, _ = mer_field
    rep = inj.preflight(_inj_cfg(root, "out_pf"), benchmark_stamps=1)
    assert rep.ok, rep.problems
    data = make_tiny_field(tmp_path / "tiny")  # VIS frames and catalog, no MER mosaics
    cfg = tiny_config(tmp_path, data, bands=["VIS", "H"], psf_fwhm_arcsec={"VIS": 0.17, "H": 0.5})
    rep = inj.preflight(cfg, benchmark_stamps=1)
    msg = " ".join(rep.problems)
    assert "band 'H': no MER mosaic" in msg and "write_mer_mosaics" in msg and "EUC_MER_BGSUB-MOSAIC" in msg
    with pytest.raises(inj.InjectionError, match="no MER mosaic"):
        inj.plan_tasks(cfg)
    # VIS only: the quadrant path, unchanged.
    assert inj.discover_hosts(tiny_config(tmp_path, data)).hosts


def test_mosaics_added_to_a_complete_tile_without_touching_exposures(tmp_path):
    cfg_off = small_config(tmp_path, field={"write_mer_mosaics": False, "mer_bands": ["VIS", "H"]})
    first = F.simulate_field(cfg_off)
    assert not (tmp_path / "q1" / "MER").exists()
    det = sorted((tmp_path / "q1" / "VIS").glob("*/*DET*.fits"))
    stamp = [p.stat().st_mtime_ns for p in det]
    cfg_on = small_config(tmp_path, field={"mer_bands": ["VIS", "H"]})
    second = F.simulate_field(cfg_on)
    (t,) = second.tiles
    assert t.skipped and second.config_hash == first.config_hash
    assert [p.stat().st_mtime_ns for p in det] == stamp
    found = q1.discover_mer_mosaics(F.mer_base_uri_of(cfg_on), TILE)
    assert sorted(found) == ["NIR_H", "VIS"] and set(found.values()) <= set(t.files)
    with pytest.raises(ValueError, match="unknown band"):
        F.simulate_field(small_config(tmp_path / "x", field={"mer_bands": ["VIS", "K"]}))


def test_cli_bands_flag_gets_default_psf_and_runs(mer_field, tmp_path):
    import json

    from click.testing import CliRunner

    from constellation_assets.cli import main

    root, _ = mer_field
    conf = tmp_path / "c.json"
    keep = {k: v for k, v in INJ.items() if k not in ("bands", "psf_fwhm_arcsec")}
    conf.write_text(
        json.dumps(
            {
                "data": {
                    "vis_base_uri": str(root / "q1" / "VIS"),
                    "catalog_base_uri": str(root / "q1" / "catalogs" / "MER_FINAL_CATALOG"),
                },
                "output": {"root_uri": str(tmp_path / "root")},
                "field": {**SMALL_FIELD, **FIELD},
                "injection": {**keep, "n_total_train_per_split": 4, "output_uri": str(tmp_path / "out")},
            }
        )
    )
    flags = ["--config", str(conf), "--bands", "VIS,Y,J,H"]
    res = CliRunner().invoke(main, ["preflight", *flags])
    assert res.exit_code == 0 and "preflight OK" in res.output, res.output
    res = CliRunner().invoke(main, ["inject", *flags])
    assert res.exit_code == 0, res.output
    table, images = inj.read_stamps(str(sorted((tmp_path / "out").rglob("part-*.parquet"))[0]))
    assert set(images) == {"VIS", "Y", "J", "H"}
    assert table.column("psf_fwhm_arcsec_H").to_pylist()[0] == pytest.approx(0.5)
