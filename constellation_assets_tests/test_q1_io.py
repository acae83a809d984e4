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
from constellation_assets_tests import test_stamps_synth as syn
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
    # Nominal (-1-) and short (-2-) exposure of each dither, each its own exposure with its EXPTIME.
    assert [(e.obs_id, e.dither, e.exposure) for e in exps] == [
        (2689, 0, 1),
        (2689, 0, 2),
        (2689, 1, 1),
        (2689, 1, 2),
    ]
    for e in exps:
        assert all(u and Path(u).exists() for u in (e.det_uri, e.bkg_uri, e.wgt_uri, e.psf_uri))
        # One PSF product per observation folder (EUC_VIS_GRD-PSF-000-000000-0000000__{ts}Z.fits).
        assert Path(e.psf_uri).name.startswith("EUC_VIS_GRD-PSF-000-000000-0000000__")
    cat = q1.discover_mer_catalog(cfg.data.catalog_base_uri, TILE)
    assert Path(cat).exists()

    # A copy with a reprocessed DET (newer timestamp), junk files and a per-observation PSF only.
    vis = tmp_path / "q1" / "VIS"
    shutil.copytree(Path(cfg.data.vis_base_uri), vis)
    folder = vis / "2689"
    det0 = next(folder.glob("EUC_VIS_SWL-DET-002689-00-1-*.fits"))
    newer = folder / "EUC_VIS_SWL-DET-002689-00-1-0000000__20991231T235959.000000Z.fits"
    shutil.copy(det0, newer)
    (folder / "README.txt").write_text("junk")
    (folder / "EUC_VIS_SWL-DET-002689-00-1-0000000__20241017T042805.627891Z.xml").write_text("<xml/>")
    for p in folder.glob("EUC_VIS_GRD-PSF-*"):
        p.unlink()
    obs_psf = folder / "EUC_VIS_GRD-PSF-000-000000-0000000__20241101T000000.000000Z.fits"
    obs_psf.write_bytes(b"")
    exps2 = q1.discover_vis_exposures(str(vis))
    assert [e.det_uri for e in exps2 if e.dither == 0 and e.exposure == 1] == [str(newer)]
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
    assert index.num_rows == 2 * 2 * 8  # 2 dithers x (nominal + short) x 8 quadrants
    # Headers only: one small request per HDU, never the data: per exposure DET (primary + 24) + BKG and WGT
    # (primary + 8 each), 4 exposures; the observation's one PSF file (primary + 8) is walked once.
    n_hdus = 4 * (1 + 24 + 2 * (1 + 8)) + (1 + 8)
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
    assert [e.exposure for e in exps] == [1, 2]  # the dither's nominal and short exposure
    assert all(e.det_uri.startswith(f"s3://{bucket}/data/q1/VIS/2689/") for e in exps)
    index = q1.build_quadrant_index(
        exps, cache_uri=f"s3://{bucket}/cache", storage_options=so, cache_storage_options=so
    )
    assert index.num_rows == 2 * 4
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


# ------------------------------------------------------------------------------------------------------
# The real Q1 layout: two exposures per dither, per-exposure BKG/WGT, one native PSF file per observation.

#: (dither, exposure, DET timestamp, EXPTIME): a real-style q1/VIS/2681/ folder. The timestamps make the newest
#: file of dither 0 its nominal exposure and of dither 1 its short one (a reader treating the two exposures
#: of a dither as versions would keep 00-1 and 01-2 and silently drop the others).
OBS_2681 = [
    (0, 1, "20241017T045501.000000", 560.52),
    (0, 2, "20241017T042759.344384", 89.52),
    (1, 1, "20241017T043000.120000", 560.52),
    (1, 2, "20241017T050633.250000", 89.52),
]
PSF_TS = "20240322T192915.424564"
QUADS = ("3-4.F", "1-1.E")


def _companion_ts(ts: str) -> str:
    return ts[:-1] + ("9" if ts[-1] != "9" else "8")  # BKG/WGT timestamps differ from the DET's


def _write_obs(vis: Path, obs_id: int, layout, psf: bool = True) -> dict:
    folder = vis / str(obs_id)
    quads = {d: syn.flat_quadrant(i) for i, d in enumerate(QUADS)}
    files = {}
    for dither, exposure, ts, exptime in layout:
        files[(dither, exposure)] = syn.write_q1_exposure(
            folder, obs_id, dither, exposure, ts, quads, exptime, companions_ts=_companion_ts(ts)
        )
    if psf:
        files["PSF"] = syn.write_q1_psf(folder, PSF_TS, {d: (42, 40) for d in QUADS})
    return files


def test_real_listing_every_exposure_found_paired_and_labelled(tmp_path, caplog):
    vis = tmp_path / "q1" / "VIS"
    files = _write_obs(vis, 2681, OBS_2681)
    folder = vis / "2681"
    # An older processing version of 01-1 (DET, BKG and WGT) and a newer one of the 00-2 BKG only.
    old = "20241001T000000.000000"
    for kind in ("DET", "BKG", "WGT"):
        src = files[(1, 1)][kind]
        (folder / syn.vis_name(kind, 2681, 1, 1, old)).write_bytes(src.read_bytes())
    newer_bkg = folder / syn.vis_name("BKG", 2681, 0, 2, "20991231T000000.000000")
    newer_bkg.write_bytes(files[(0, 2)]["BKG"].read_bytes())
    (folder / "README.txt").write_text("not a product")

    with caplog.at_level("WARNING", logger="constellation_assets.io.q1"):
        exps = q1.discover_vis_exposures(str(vis))
    assert [(e.obs_id, e.dither, e.exposure) for e in exps] == [
        (2681, 0, 1),
        (2681, 0, 2),
        (2681, 1, 1),
        (2681, 1, 2),
    ]
    assert [e.is_short for e in exps] == [False, True, False, True]
    assert [e.key for e in exps] == ["2681-0-1", "2681-0-2", "2681-1-1", "2681-1-2"]
    assert len({e.det_uri for e in exps}) == 4
    for e in exps:
        want = files[(e.dither, e.exposure)]
        assert e.det_uri == str(want["DET"])  # the newest DET of this (dither, exposure)
        assert e.wgt_uri == str(want["WGT"])
        assert e.bkg_uri == (str(newer_bkg) if (e.dither, e.exposure) == (0, 2) else str(want["BKG"]))
        for uri, kind in ((e.det_uri, "DET"), (e.bkg_uri, "BKG"), (e.wgt_uri, "WGT")):
            m = q1.DET_RE.match(Path(uri).name)
            assert (m["kind"], int(m["dither"]), int(m["exposure"])) == (kind, e.dither, e.exposure)
        assert e.psf_uri == str(files["PSF"])  # the observation's one PSF file, shared
        assert e.timestamp == q1.DET_RE.match(Path(e.det_uri).name)["ts"] and e.exptime_s is None
    # Only the real reprocessing versions are reported, each naming the file it ignores.
    versions = [r.getMessage() for r in caplog.records if "processing versions" in r.getMessage()]
    assert len(versions) == 4, versions
    assert sum(old in v for v in versions) == 3 and sum("dither 0 exposure 2" in v for v in versions) == 1


def test_obs_2704_short_exposure_next_to_nominal_and_exclusion_rule(tmp_path, caplog):
    vis = tmp_path / "q1" / "VIS"
    _write_obs(vis, 2681, OBS_2681)
    f2704 = _write_obs(
        vis, 2704, [(0, 1, "20241017T041105.100000", 560.52), (0, 2, "20241017T042759.344384", 89.52)]
    )
    assert f2704[(0, 2)]["DET"].name == syn.REAL_SHORT_DET
    exps = q1.discover_vis_exposures(str(vis))
    assert [(e.obs_id, e.dither, e.exposure) for e in exps if e.obs_id == 2704] == [
        (2704, 0, 1),
        (2704, 0, 2),
    ]
    short = next(e for e in exps if Path(e.det_uri).name == syn.REAL_SHORT_DET)
    assert short.is_short and Path(short.bkg_uri).name.startswith("EUC_VIS_SWL-BKG-002704-00-2-")
    assert Path(short.wgt_uri).name.startswith("EUC_VIS_SWL-WGT-002704-00-2-")

    caplog.clear()
    with caplog.at_level("INFO", logger="constellation_assets.io.q1"):
        kept = q1.discover_vis_exposures(str(vis), include_short_exposures=False)
    assert [e.key for e in kept] == [e.key for e in exps if e.exposure == 1]
    lines = [r.getMessage() for r in caplog.records if "include_short_exposures" in r.getMessage()]
    assert len(lines) == 1 and "excluding 3 short exposures" in lines[0]
    dropped = {Path(e.det_uri).name for e in exps if e.exposure == 2}
    assert all(n in lines[0] for n in dropped) and not any(Path(e.det_uri).name in lines[0] for e in kept)
    # The config key that prepare passes on: true by default.
    from constellation_assets.config import load_config

    assert load_config({}).data.include_short_exposures is True
    assert load_config({"data": {"include_short_exposures": False}}).data.include_short_exposures is False


def test_index_rows_carry_exposure_and_exptime(tmp_path, monkeypatch, caplog):
    vis = tmp_path / "q1" / "VIS"
    files = _write_obs(vis, 2681, OBS_2681)
    exps = q1.discover_vis_exposures(str(vis))
    walked = []
    orig = q1.fits_hdu_offsets

    def counting(uri, storage_options=None):
        walked.append(Path(uri).name)
        return orig(uri, storage_options)

    monkeypatch.setattr(q1, "fits_hdu_offsets", counting)
    index = q1.build_quadrant_index(exps, cache_uri=str(tmp_path / "cache"))
    assert {"exposure", "exptime_s"} <= set(q1.INDEX_SCHEMA.names) and index.schema == q1.INDEX_SCHEMA
    assert index.num_rows == 4 * len(QUADS)
    assert walked.count(files["PSF"].name) == 1  # the shared PSF file is walked once per index build
    rows = index.to_pylist()
    got = sorted({(r["dither"], r["exposure"], r["exptime_s"]) for r in rows})
    assert got == [(0, 1, 560.52), (0, 2, 89.52), (1, 1, 560.52), (1, 2, 89.52)]  # from the primary header
    assert {r["psf_path"] for r in rows} == {str(files["PSF"])}
    assert {r["psf_hdu"] for r in rows} == set(QUADS) and {r["bkg_hdu"] for r in rows} == set(QUADS)
    assert len(list((tmp_path / "cache" / "2681").glob("*.quadrants.parquet"))) == 4  # one per exposure
    # Manifest quadrant entries carry the exposure.
    from constellation_assets.prepare import _quadrant_entry

    assert _quadrant_entry(rows[0])["exposure"] == rows[0]["exposure"]
    # Reading a row: the SCI header lacks EXPTIME, it is completed from the DET primary header.
    row = next(r for r in rows if r["exposure"] == 2 and r["det_id"] == "3-4.F")
    hdus = q1.read_quadrant_hdus(row)
    assert set(hdus) == {"sci", "rms", "flg", "bkg", "psf"}
    assert hdus["sci"][1]["EXPTIME"] == 89.52 and q1.magzerop(hdus["sci"][1]) == pytest.approx(24.56605)
    assert hdus["psf"][0].shape == (189, 189)
    # A name that contradicts its EXPTIME is reported (the header value is what the index keeps).
    bad = vis / "2682"
    _write_obs(bad, 2682, [(0, 1, "20241017T045501.000000", 89.52)], psf=False)
    with caplog.at_level("WARNING", logger="constellation_assets.io.q1"):
        t = q1.build_quadrant_index(q1.discover_vis_exposures(str(bad)))
    assert t.column("exptime_s").to_pylist() == [89.52] * len(QUADS)
    assert any("EXPTIME 89.5 s but exposure index 1" in r.getMessage() for r in caplog.records)


def test_exposure_api_for_injection_reads_by_name(tmp_path, byte_counter):
    """What the injection code needs: the DET file's exposure with BKG, SCI headers and quadrant HDUs by name."""
    vis = tmp_path / "q1" / "VIS"
    files = _write_obs(
        vis, 2704, [(0, 1, "20241017T041105.100000", 560.52), (0, 2, "20241017T042759.344384", 89.52)]
    )
    det = files[(0, 2)]["DET"]
    exp = q1.vis_exposure_of(str(det))
    assert (exp.obs_id, exp.dither, exp.exposure) == (2704, 0, 2)
    assert exp.bkg_uri == str(files[(0, 2)]["BKG"]) and exp.psf_uri == str(files["PSF"])
    assert exp == next(e for e in q1.discover_vis_exposures(str(vis)) if e.det_uri == str(det))
    assert exp.exptime_s is None and q1.exposure_with_exptime(exp).exptime_s == 89.52
    q1.HDU_TABLES.clear()
    heads = q1.exposure_quadrant_headers(exp)
    assert [h.det_id for h in heads] == sorted(QUADS) and all(h.sci_hdu == f"{h.det_id}.SCI" for h in heads)
    h = heads[0]
    assert h.exptime_s == 89.52 and h.magzerop == pytest.approx(24.56605) and h.gain_e_per_adu == 3.48
    assert h.zero_point_mag == pytest.approx(24.56605 + 2.5 * np.log10(89.52))
    assert q1.zero_point_mag(h.header) == pytest.approx(h.zero_point_mag)
    assert (h.nx_pix, h.ny_pix) == (40, 42)
    walk_requests = byte_counter["requests"]
    got = q1.read_exposure_quadrant(exp, "3-4.F", ("sci", "rms", "flg", "bkg"))
    assert set(got) == {"sci", "rms", "flg", "bkg"}
    for kind, path, name in (("sci", det, "3-4.F.SCI"), ("flg", det, "3-4.F.FLG"),
                             ("bkg", files[(0, 2)]["BKG"], "3-4.F")):  # fmt: skip
        assert np.array_equal(got[kind][0], fits.getdata(path, name))
    assert got["flg"][0].dtype.kind == "i"
    # The DET walk is cached: its three HDUs cost one request each, the BKG file one walk plus one read.
    n_bkg_hdus = 1 + len(QUADS)
    assert byte_counter["requests"] - walk_requests == 3 + n_bkg_hdus + 1
    with pytest.raises(DataAccessError, match="Not a VIS DET file name"):
        q1.vis_exposure_of(str(files["PSF"]))


def test_psf_layout_of_the_real_product():
    hdr = fits.Header()
    lay = q1.psf_grid_layout((189, 189), hdr, (2066, 2048))
    assert (lay.n, lay.stamp_pix, lay.oversampling, lay.pixel_included, lay.from_keywords) == (
        9,
        21,
        1,
        True,
        False,
    )
    np.testing.assert_allclose(lay.x_nodes_pix, (np.arange(9) + 0.5) * 2048 / 9 - 0.5)
    np.testing.assert_allclose(lay.y_nodes_pix, (np.arange(9) + 0.5) * 2066 / 9 - 0.5)
    assert (
        q1.psf_grid_layout((225, 225), hdr, (2066, 2048)).n,
        q1.psf_grid_layout((225, 225), hdr, (1, 1)).stamp_pix,
    ) == (9, 25)
    assert (
        q1.psf_grid_layout((105, 105), hdr, (2066, 2048)).n,
        q1.psf_grid_layout((105, 105), hdr, (1, 1)).stamp_pix,
    ) == (5, 21)
    kw = fits.Header({"PSFGRID": 7, "PSFSTAMP": 27, "OVERSAMP": 3})
    lay = q1.psf_grid_layout((189, 189), kw, (2066, 2048))
    assert (lay.n, lay.stamp_pix, lay.oversampling, lay.from_keywords) == (7, 27, 3, True)
    for shape in ((190, 190), (189, 190)):
        with pytest.raises(q1.Q1FormatError, match="PSF image") as err:
            q1.psf_grid_layout(shape, hdr, (2066, 2048), uri="psf.fits")
        assert "psf.fits" in str(err.value)
    # Row-major stamps: block (i, j) of the image is stamps[i, j], values as stored.
    img = np.arange(189 * 189, dtype=np.float64).reshape(189, 189)
    st = q1.psf_grid_stamps(img, q1.psf_grid_layout((189, 189), hdr, (2066, 2048)))
    assert st.shape == (9, 9, 21, 21) and np.array_equal(st[2, 5], img[42:63, 105:126])


@pytest.mark.integration
def test_real_layout_on_s3(moto_s3, tmp_path):
    """The real-layout listing uploaded to S3 (moto): discovered, paired, indexed and read by byte range."""
    local = tmp_path / "q1" / "VIS"
    files = _write_obs(local, 2681, OBS_2681)
    client, bucket = moto_s3["client"], moto_s3["bucket"]
    for p in (local / "2681").iterdir():
        client.upload_file(str(p), bucket, f"q1/VIS/2681/{p.name}")
    so = moto_s3["storage_options"]
    vis = f"s3://{bucket}/q1/VIS"
    exps = q1.discover_vis_exposures(vis, storage_options=so)
    assert [(e.dither, e.exposure) for e in exps] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(e.psf_uri == f"{vis}/2681/{files['PSF'].name}" for e in exps)
    assert [Path(e.bkg_uri).name for e in exps] == [files[(d, x)]["BKG"].name for d, x, _, _ in OBS_2681]
    assert len(q1.discover_vis_exposures(vis, storage_options=so, include_short_exposures=False)) == 2
    index = q1.build_quadrant_index(exps, storage_options=so)
    assert sorted(set(index.column("exptime_s").to_pylist())) == [89.52, 560.52]
    row = next(r for r in index.to_pylist() if r["exposure"] == 2)
    hdus = q1.read_quadrant_hdus(row, so)
    assert hdus["sci"][1]["EXPTIME"] == 89.52 and hdus["psf"][0].shape == (189, 189)
    got = q1.read_exposure_quadrant(exps[1], row["det_id"], ("sci", "bkg"), so)
    assert np.array_equal(got["sci"][0], hdus["sci"][0])


def test_pointing_prefilter_skips_exposures_that_cannot_overlap(field_root, byte_counter, caplog):
    cfg, _ = field_root
    exps = q1.discover_vis_exposures(cfg.data.vis_base_uri)
    full = q1.build_quadrant_index(exps)
    near = q1.build_quadrant_index(exps, overlap_box=mer_tile(TILE).extended)
    assert near.equals(full)  # every exposure of the tile's own field is kept
    byte_counter["requests"] = 0
    far_box = mer_tile(102018211).extended  # EDF-S, ~24 deg away
    with caplog.at_level("INFO", logger="constellation_assets.io.q1"):
        far = q1.build_quadrant_index(exps, overlap_box=far_box)
    assert far.num_rows == 0
    # Only the headers up to the first SCI quadrant of each DET file were read (instead of 52 HDUs each).
    assert byte_counter["requests"] <= 4 * len(exps)
    assert any("cannot overlap" in r.getMessage() for r in caplog.records)
    # The test is conservative: a box just beyond the footprint but within the focal-plane span is kept.
    ra, dec = q1.exposure_reference_position(exps[0])
    box = SkyBox((ra + 0.5) % 360, (ra + 0.6) % 360, dec - 0.05, dec + 0.05)
    assert q1.exposure_may_overlap(exps[0], box)
    assert not q1.exposure_may_overlap(exps[0], SkyBox((ra + 5) % 360, (ra + 5.1) % 360, dec, dec + 0.1))
