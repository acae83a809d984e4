"""COSMOS bank: built from the real COSMOS sample, checked against GalSim's COSMOSCatalog, local and S3."""

from __future__ import annotations

import os
import shutil
import time

import galsim
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from constellation_assets.io.uri import DataAccessError
from constellation_assets.sim.bank import (
    REQUIRED_DATASETS,
    CosmosBankError,
    build_cosmos_bank,
    content_sha256,
    load_cosmos_bank,
)
from constellation_assets.sim.psf import PSFSpec
from constellation_assets.sim.render import render_stamps

CATALOG = "real_galaxy_catalog_23.5_example.fits"


@pytest.fixture(scope="module")
def bank_none(cosmos_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("bank") / "bank_none.h5"
    build_cosmos_bank(cosmos_dir, str(path), exclusion_level="none")
    return load_cosmos_bank(str(path))


@pytest.mark.parametrize("level", ["none", "bad_stamp", "bad_fits", "marginal"])
def test_selection_matches_galsim(cosmos_dir, tmp_path, level):
    summary = build_cosmos_bank(cosmos_dir, str(tmp_path / "b.h5"), exclusion_level=level)
    cat = galsim.COSMOSCatalog(file_name=CATALOG, dir=str(cosmos_dir), use_real=False, exclusion_level=level)
    bank = load_cosmos_bank(str(tmp_path / "b.h5"))
    assert summary.n_sources == cat.nobjects == bank.n_sources
    np.testing.assert_array_equal(bank.data["ident"], cat.param_cat["IDENT"][cat.orig_index])


def test_parameters_follow_galsim_conventions(bank_none, cosmos_dir):
    cat = galsim.COSMOSCatalog(file_name=CATALOG, dir=str(cosmos_dir), use_real=False, exclusion_level="none")
    d = bank_none.data
    for i in range(bank_none.n_sources):
        gal = cat.makeGalaxy(i, sersic_prec=0.0)
        assert gal.flux == pytest.approx(d["model_flux_hst"][i], rel=1e-10)
        ours = bank_none.galsim_object(i)
        assert ours.flux == pytest.approx(gal.flux, rel=1e-10)
        # same light distribution: compare second moments of the unconvolved objects on a fine grid
        for x, y in [(0.05, 0.0), (0.0, 0.11), (-0.2, 0.3)]:
            assert ours.xValue(x, y) == pytest.approx(gal.xValue(x, y), rel=1e-6)
    # circularised hlr from SERSICFIT: 0.03" pixels along the major axis times sqrt(q)
    np.testing.assert_allclose(d["hlr_arcsec"], d["hlr_major_arcsec"] * np.sqrt(d["q"]), rtol=1e-3)
    assert np.all((d["sersic_n"] >= 0.3) & (d["sersic_n"] <= 6.0))
    np.testing.assert_allclose(d["model_mag_f814w"], 25.94 - 2.5 * np.log10(d["model_flux_hst"]))
    # the parametric magnitudes track the catalog's MAG_AUTO
    assert np.median(np.abs(d["model_mag_f814w"] - d["mag_auto"])) < 0.3
    assert 0 < int(d["use_bulgefit"].sum()) < bank_none.n_sources


def test_rendered_bank_sources_match_galsim(bank_none, cosmos_dir):
    """The renderer draws bank sources (Sersic and bulge + disk) as GalSim draws makeGalaxy objects."""
    cat = galsim.COSMOSCatalog(file_name=CATALOG, dir=str(cosmos_dir), use_real=False, exclusion_level="none")
    d = bank_none.data
    small = np.flatnonzero(
        (d["hlr_arcsec"] < 0.6) & (d["bulge_hlr_arcsec"] < 0.6) & (d["disk_hlr_arcsec"] < 0.8)
    )
    pick = np.concatenate(
        [small[d["use_bulgefit"][small] == 1][:3], small[d["use_bulgefit"][small] == 0][:3]]
    )
    spec = PSFSpec("moffat", 0.17, 3.5)
    gsp = galsim.GSParams(
        folding_threshold=1e-4, maxk_threshold=1e-4, kvalue_accuracy=1e-6, maximum_fft_size=8192
    )
    comps = bank_none.components(pick, np.zeros((len(pick), 2)))
    imgs = (
        render_stamps(
            comps,
            d["model_flux_hst"][pick, None],
            stamp_size_pix=64,
            pixel_scale_arcsec=0.1,
            psf=[spec],
            dtype=torch.float64,
        )
        .images_adu[:, 0]
        .numpy()
    )
    psf = galsim.Moffat(beta=3.5, fwhm=0.17, gsparams=gsp)
    for img, i in zip(imgs, pick, strict=True):
        gal = cat.makeGalaxy(int(i), sersic_prec=0.0, gsparams=gsp)
        ref = (
            galsim.Convolve(gal, psf, gsparams=gsp)
            .drawImage(nx=64, ny=64, scale=0.1, offset=(0.5, 0.5))
            .array
        )
        assert np.abs(img - ref).max() < 1e-3 * ref.max(), i
        assert abs(img.sum() - ref.sum()) < 1e-3 * ref.sum(), i


def test_attributes_hash_and_determinism(bank_none, cosmos_dir, tmp_path):
    a = bank_none.attrs
    for key in (
        "bank_version",
        "input_catalog",
        "created_utc",
        "content_sha256",
        "exclusion_level",
        "n_sources",
    ):
        assert key in a
    assert a["input_catalog"] == CATALOG
    assert a["created_utc"].endswith("Z")
    datasets = {k: v for k, v in bank_none.data.items()}
    assert content_sha256(datasets) == a["content_sha256"]
    # a rebuild has the same content hash (only the creation time differs)
    build_cosmos_bank(cosmos_dir, str(tmp_path / "again.h5"), exclusion_level="none")
    assert load_cosmos_bank(str(tmp_path / "again.h5")).attrs["content_sha256"] == a["content_sha256"]


def test_components_and_records(bank_none):
    d = bank_none.data
    bd = int(np.flatnonzero(d["use_bulgefit"] == 1)[0])
    ss = int(np.flatnonzero(d["use_bulgefit"] == 0)[0])
    comps = bank_none.components([bd, ss], [[0.1, 0.2], [0.0, 0.0]])
    assert comps.flux_frac.shape == (2, 2)
    np.testing.assert_allclose(comps.flux_frac.sum(axis=1), 1.0)
    assert comps.n[0].tolist() == [4.0, 1.0]
    assert comps.flux_frac[1].tolist() == [1.0, 0.0]
    assert comps.hlr_arcsec[1, 0] == d["hlr_arcsec"][ss]
    assert bank_none.record(ss)["ident"] == int(d["ident"][ss])
    with pytest.raises(IndexError, match="out of range"):
        bank_none.components([bank_none.n_sources], [[0.0, 0.0]])


def test_images_are_unit_flux_centred(cosmos_dir, tmp_path):
    out = tmp_path / "img.h5"
    build_cosmos_bank(
        cosmos_dir,
        str(out),
        include_images=True,
        stamp_size=48,
        exclusion_level="marginal",
        image_pixel_scale_arcsec=0.06,
    )
    bank = load_cosmos_bank(str(out))
    assert bank.images.shape == (bank.n_sources, 48, 48)
    assert bank.attrs["image_pixel_scale_arcsec"] == 0.06
    sums = bank.images.sum(axis=(1, 2))
    assert np.all(sums <= 1.0 + 1e-5) and np.median(sums) > 0.8
    compact = np.argmin(bank.data["hlr_arcsec"])
    assert np.unravel_index(bank.images[compact].argmax(), (48, 48)) == (24, 24)


def test_cache_per_process_and_invalidation(cosmos_dir, tmp_path):
    path = tmp_path / "c.h5"
    build_cosmos_bank(cosmos_dir, str(path), exclusion_level="marginal")
    a = load_cosmos_bank(str(path))
    assert load_cosmos_bank(str(path)) is a
    time.sleep(0.01)
    build_cosmos_bank(cosmos_dir, str(path), exclusion_level="none")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # make sure the mtime moved
    b = load_cosmos_bank(str(path))
    assert b is not a and b.n_sources == 100


def test_missing_and_corrupt_banks_give_clear_errors(cosmos_dir, tmp_path):
    with pytest.raises(DataAccessError, match="bank build"):
        load_cosmos_bank(str(tmp_path / "nope.h5"))
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(CosmosBankError, match="not a readable HDF5"):
        load_cosmos_bank(str(bad))
    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f["ident"] = np.arange(3)
    with pytest.raises(CosmosBankError, match="lacks datasets"):
        load_cosmos_bank(str(partial))
    with pytest.raises(CosmosBankError, match="COSMOS folder not found"):
        build_cosmos_bank(tmp_path / "missing", str(tmp_path / "x.h5"))


def test_build_is_atomic(cosmos_dir, tmp_path, monkeypatch):
    import constellation_assets.sim.bank as bank_mod

    def boom(_):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(bank_mod, "content_sha256", boom)
    with pytest.raises(RuntimeError):
        build_cosmos_bank(cosmos_dir, str(tmp_path / "atomic.h5"))
    assert list(tmp_path.iterdir()) == []
    # no selection file: the levels that need it fail before anything is written
    only = tmp_path / "only"
    only.mkdir()
    for name in (CATALOG, CATALOG.replace(".fits", "_fits.fits")):
        shutil.copy(cosmos_dir / name, only / name)
    with pytest.raises(CosmosBankError, match="selection"):
        build_cosmos_bank(only, str(tmp_path / "sel.h5"), exclusion_level="marginal")
    assert not (tmp_path / "sel.h5").exists()
    monkeypatch.undo()
    assert build_cosmos_bank(only, str(tmp_path / "sel.h5"), exclusion_level="bad_fits").n_sources == 100


def test_s3_round_trip(cosmos_dir, moto_s3):
    uri = f"s3://{moto_s3['bucket']}/cosmos/bank.h5"
    so = moto_s3["storage_options"]
    summary = build_cosmos_bank(cosmos_dir, uri, storage_options=so, exclusion_level="marginal")
    bank = load_cosmos_bank(uri, storage_options=so)
    assert bank.n_sources == summary.n_sources == 96
    assert set(REQUIRED_DATASETS) <= set(bank.data)
    assert load_cosmos_bank(uri, storage_options=so) is bank
    with pytest.raises(DataAccessError):
        load_cosmos_bank(f"s3://{moto_s3['bucket']}/cosmos/none.h5", storage_options=so)


def test_cli_build_and_info(cosmos_dir, tmp_path):
    import json

    from constellation_assets.cli import main

    out = tmp_path / "cli.h5"
    runner = CliRunner()
    res = runner.invoke(
        main, ["bank", "build", "--cosmos-dir", str(cosmos_dir), "--output", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_sources"] == 96 and out.exists()
    res = runner.invoke(main, ["bank", "info", str(out)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["n_sources"] == 96 and info["attrs"]["content_sha256"] == summary["content_sha256"]
    res = runner.invoke(main, ["bank", "build", "--cosmos-dir", str(tmp_path / "none"), "--output", str(out)])
    assert res.exit_code != 0
    res = runner.invoke(main, ["bank", "info", str(tmp_path / "missing.h5")])
    assert res.exit_code == 1 and "bank build" in res.output


def test_read_sersic_sample(cosmos_dir):
    from constellation_assets.sim.bank import read_cosmos_sersic_sample

    d = read_cosmos_sersic_sample(cosmos_dir / "cosmos_sersics_sample_N300_cleaned.asc")
    assert len(d["ident"]) == 276  # "N300", 276 rows after cleaning
    assert np.all((d["q"] > 0) & (d["q"] <= 1)) and np.all(d["hlr_arcsec"] > 0)
    np.testing.assert_allclose((1 - d["q"]) / (1 + d["q"]), d["g_abs"])
