"""Q1 discovery (listing + regex), the header-only quadrant index, byte-range HDU reads, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits

from constellation_assets.io import q1
from constellation_assets.io.uri import DataAccessError
from constellation_assets.sky.tiles import SkyBox, mer_tile
from constellation_assets.synthetic import simulate_field
from constellation_assets_tests.q1_testdata import TILE, small_config


@pytest.fixture(scope="module")
def field_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("q1")
    cfg = small_config(root)
    simulate_field(cfg)
    return cfg, root


@pytest.fixture()
def byte_counter(monkeypatch):
    """Counts every byte the q1 module reads (all its reads go through q1._read_range)."""
    counter = {"bytes": 0, "requests": 0}
    orig = q1._read_range

    def counting(fs, path, start, end):
        data = orig(fs, path, start, end)
        counter["bytes"] += len(data)
        counter["requests"] += 1
        return data

    monkeypatch.setattr(q1, "_read_range", counting)
    return counter


def test_regexes_match_real_q1_names():
    m = q1.DET_RE.match("EUC_VIS_SWL-DET-002689-00-1-0000000__20241017T042805.627891Z.fits")
    assert m and m["kind"] == "DET" and m["obs_id"] == "002689" and m["dither"] == "00"
    assert (
        q1.DET_RE.match("EUC_VIS_SWL-WGT-002719-03-1-0000000__20241019T101010.000001Z.fits")["kind"] == "WGT"
    )
    assert q1.DET_RE.match("EUC_VIS_SWL-DET-002689-00-1-0000000__20241017T042805.627891Z.xml") is None
    m = q1.MER_RE.match("EUC_MER_FINAL-CAT_TILE102018211-CC66F6_20241018T214045.289017Z_00.00.fits")
    assert m and m["tile_id"] == "102018211" and m["version"] == "00.00"
    assert q1.PSF_RE.match("EUC_VIS_GRD-PSF-000-000000-0000000__20241017T042805.627891Z.fits")


def test_discovery_lists_and_picks_newest(field_root, tmp_path):
    cfg, root = field_root
    exps = q1.discover_vis_exposures(cfg.data.vis_base_uri)
    assert [(e.obs_id, e.dither) for e in exps] == [(2689, 0), (2689, 1)]
    for e in exps:
        assert all(u and Path(u).exists() for u in (e.det_uri, e.bkg_uri, e.wgt_uri, e.psf_uri))
        assert f"-{e.dither:02d}-" in Path(e.psf_uri).name
    cat = q1.discover_mer_catalog(cfg.data.catalog_base_uri, TILE)
    assert Path(cat).exists()

    # A copy with a reprocessed DET (newer timestamp), junk files and a per-observation PSF only.
    vis = tmp_path / "q1" / "VIS"
    shutil.copytree(Path(cfg.data.vis_base_uri), vis)
    folder = vis / "2689"
    det0 = next(folder.glob("EUC_VIS_SWL-DET-002689-00-*.fits"))
    newer = folder / "EUC_VIS_SWL-DET-002689-00-1-0000000__20991231T235959.000000Z.fits"
    shutil.copy(det0, newer)
    (folder / "README.txt").write_text("junk")
    (folder / "EUC_VIS_SWL-DET-002689-00-1-0000000__20241017T042805.627891Z.xml").write_text("<xml/>")
    for p in folder.glob("EUC_VIS_GRD-PSF-*"):
        p.unlink()
    obs_psf = folder / "EUC_VIS_GRD-PSF-000-000000-0000000__20241101T000000.000000Z.fits"
    obs_psf.write_bytes(b"")
    exps2 = q1.discover_vis_exposures(str(vis))
    assert [e.det_uri for e in exps2 if e.dither == 0] == [str(newer)]
    assert all(e.psf_uri == str(obs_psf) for e in exps2)
    assert q1.discover_observations(str(vis)) == [2689]

    with pytest.raises(DataAccessError, match="MER final catalog") as err:
        q1.discover_mer_catalog(cfg.data.catalog_base_uri, 102044186)
    assert "102044186" in str(err.value)


def test_index_reads_headers_only_and_matches_astropy(field_root, tmp_path, byte_counter):
    cfg, _ = field_root
    exps = q1.discover_vis_exposures(cfg.data.vis_base_uri)
    total = sum(Path(u).stat().st_size for e in exps for u in (e.det_uri, e.bkg_uri, e.wgt_uri, e.psf_uri))
    index = q1.build_quadrant_index(exps, cache_uri=str(tmp_path / "cache"))
    assert index.num_rows == 2 * 8
    # Headers only: one small request per HDU (52 HDUs per exposure in 4 files), never the data.
    n_hdus = 2 * (1 + 24 + 3 * (1 + 8))
    assert byte_counter["requests"] == n_hdus
    assert byte_counter["bytes"] <= n_hdus * q1._HEADER_CHUNK < 0.1 * total
    # Cached: the second build reads no FITS bytes at all.
    byte_counter["bytes"] = 0
    again = q1.build_quadrant_index(exps, cache_uri=str(tmp_path / "cache"))
    assert byte_counter["bytes"] == 0 and again.equals(index)

    row = index.filter(pa.compute.equal(index.column("det_id"), "1-2.G")).to_pylist()[0]
    with fits.open(row["sci_path"]) as hdul:
        from astropy.wcs import WCS

        hdr = hdul["1-2.G.SCI"].header
        ra, dec = WCS(hdr).all_pix2world([0.5, 200.5, 200.5, 0.5], [0.5, 0.5, 206.5, 206.5], 1)
        assert np.allclose(row["corner_ra"], ra % 360) and np.allclose(row["corner_dec"], dec)
        info = hdul.fileinfo(hdul.index_of("1-2.G.SCI"))
        assert row["sci_header_offset"] == info["hdrLoc"] and row["sci_data_offset"] == info["datLoc"]


def test_read_one_quadrant_reads_a_small_fraction(field_root, byte_counter):
    cfg, _ = field_root
    exps = q1.discover_vis_exposures(cfg.data.vis_base_uri)
    index = q1.build_quadrant_index(exps)
    row = index.slice(3, 1).to_pylist()[0]
    size = Path(row["sci_path"]).stat().st_size
    byte_counter["bytes"] = 0
    qd = q1.read_quadrant(
        row["sci_path"],
        row["sci_hdu"],
        row["sci_header_offset"],
        row["sci_data_offset"],
        row["sci_data_size"],
    )
    # 24 image HDUs in the DET file: one quadrant's SCI is ~1/24 of it.
    assert byte_counter["bytes"] == qd.bytes_read
    assert qd.bytes_read < size / 15, (qd.bytes_read, size)
    assert np.array_equal(qd.data, fits.getdata(row["sci_path"], row["sci_hdu"]))
    assert q1.magzerop(qd.header) == pytest.approx(24.57)
    hdus = q1.read_quadrant_hdus(row)
    assert set(hdus) == {"sci", "rms", "flg", "bkg", "psf"}
    assert hdus["psf"][0].shape == (189, 189) and hdus["flg"][0].dtype.kind == "i"
    # Without offsets: header first, then the data.
    qd2 = q1.read_quadrant(row["sci_path"], row["sci_hdu"], row["sci_header_offset"])
    assert np.array_equal(qd2.data, qd.data)


def test_quadrants_overlapping_tile_and_wrap(field_root):
    cfg, _ = field_root
    index = q1.build_quadrant_index(q1.discover_vis_exposures(cfg.data.vis_base_uri))
    tile = mer_tile(TILE)
    assert q1.quadrants_overlapping(index, tile.extended).num_rows == index.num_rows
    assert q1.quadrants_overlapping(index, mer_tile(102044186).core).num_rows == 0
    # RA wrap: a quadrant straddling RA 0 against boxes on either side.
    t = pa.table({"ra_min": [359.99], "ra_max": [0.02], "dec_min": [-1.0], "dec_max": [-0.98]})
    assert q1.quadrants_overlapping(t, SkyBox(0.01, 1.0, -2.0, 0.0)).num_rows == 1
    assert q1.quadrants_overlapping(t, SkyBox(359.0, 359.995, -2.0, 0.0)).num_rows == 1
    assert q1.quadrants_overlapping(t, SkyBox(1.0, 2.0, -2.0, 0.0)).num_rows == 0


def test_corrupt_and_missing_files_name_the_file(field_root, tmp_path):
    cfg, _ = field_root
    (exp, *_rest) = q1.discover_vis_exposures(cfg.data.vis_base_uri)
    good = Path(exp.det_uri).read_bytes()
    trunc = tmp_path / "EUC_VIS_SWL-DET-002689-00-1-0000000__20241017T042805.627891Z.fits"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(q1.Q1FormatError, match="Truncated") as err:
        q1.fits_hdu_offsets(str(trunc))
    assert str(trunc) in str(err.value) and "What to do" in str(err.value)
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not a FITS file" * 400)
    with pytest.raises(q1.Q1FormatError) as err:
        q1.fits_hdu_offsets(str(junk))
    assert str(junk) in str(err.value)
    missing = tmp_path / "missing.fits"
    with pytest.raises(DataAccessError, match="Not found") as err:
        q1.fits_hdu_offsets(str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(DataAccessError) as err:
        q1.read_quadrant(str(missing), "1-1.E.SCI", 0, 2880, 100)
    assert str(missing) in str(err.value)
    # A stale index (offsets of another HDU) fails on the EXTNAME check instead of returning wrong pixels.
    hd = fits.open(exp.det_uri)
    info = hd.fileinfo(2)
    other = hd[1].name
    hd.close()
    with pytest.raises(q1.Q1FormatError, match="expected") as err:
        q1.read_quadrant(exp.det_uri, other, info["hdrLoc"], info["datLoc"], info["datSpan"])
    assert exp.det_uri in str(err.value)


@pytest.mark.integration
def test_same_code_on_s3(moto_s3, tmp_path):
    """Simulate to s3:// (moto), then discover, index and read one quadrant by byte range with the same code."""
    bucket = moto_s3["bucket"]
    endpoint = moto_s3["endpoint_url"]
    cfg = small_config(
        f"s3://{bucket}/data",
        field={"ccd_grid": [1, 1], "n_dithers": 1},
        data={"s3": {"endpoint_url": endpoint, "anon": False}},
    )
    simulate_field(cfg)
    so = cfg.storage_options(cfg.data.vis_base_uri)
    exps = q1.discover_vis_exposures(cfg.data.vis_base_uri, storage_options=so)
    assert len(exps) == 1 and exps[0].det_uri.startswith(f"s3://{bucket}/data/q1/VIS/2689/")
    index = q1.build_quadrant_index(
        exps, cache_uri=f"s3://{bucket}/cache", storage_options=so, cache_storage_options=so
    )
    assert index.num_rows == 4
    row = index.to_pylist()[0]
    qd = q1.read_quadrant_row(row, "sci", so)
    assert qd.data.shape == (206, 200) and np.isfinite(qd.data).all()
    size = moto_s3["client"].head_object(Bucket=bucket, Key=row["sci_path"].split(f"{bucket}/", 1)[1])[
        "ContentLength"
    ]
    assert qd.bytes_read < size / 5
    cat = q1.discover_mer_catalog(cfg.data.catalog_base_uri, TILE, so)
    assert cat.startswith(
        f"s3://{bucket}/data/q1/catalogs/MER_FINAL_CATALOG/{TILE}/EUC_MER_FINAL-CAT_TILE{TILE}-"
    )
