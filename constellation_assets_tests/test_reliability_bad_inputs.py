"""Bad inputs: each gives an error that names the input and says what to do, and other sub-tiles/tiles are
unaffected (the worker carries on with the next manifest).

Image inputs go through the real shear path (``run_manifests`` -> ``infer_manifest`` -> stamps), catalogs
through ``read_mer_catalog``, manifests through ``prepare.load_manifest``, configs through ``load_config``,
banks through ``load_cosmos_bank``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from constellation_assets.config import ConfigError, load_config
from constellation_assets.shear.worker import run_manifests
from constellation_assets_tests import test_stamps_synth as syn

N_GAL = 4


def _cfg(tmp_path: Path):
    return load_config(
        {
            "data": {
                "vis_base_uri": str(tmp_path / "q1" / "VIS"),
                "catalog_base_uri": str(tmp_path / "q1" / "catalogs"),
            },
            "output": {"root_uri": str(tmp_path / "out")},
            "shear": {"stamp_size_pix": 48},
            "compute": {"batch_size": 8},
        }
    )


def _subtile(tmp_path: Path, name: str, col: int, mutate=None, n_gal: int = N_GAL):
    """One exposure + manifest for sub-tile (0, col); ``mutate(arrays, paths)`` damages the inputs."""
    h = syn.wcs_header()
    ra, dec, _, _ = syn.galaxy_positions(n_gal, h, seed=col + 1, margin=28)
    gals = [(r, d, 30000.0, 0.17, 0.05, -0.02) for r, d in zip(ra, dec, strict=True)]
    arrays = syn.render_quadrant(h, gals, noise_sigma=2.0, seed=col)
    q = syn.write_exposure(tmp_path / "q1" / "VIS" / name, col + 1, 0, arrays)
    if mutate is not None:
        mutate(q)
    manifest = syn.write_manifest(tmp_path / "out" / "manifests" / name, [q], ra, dec, row=0, col=col)
    return str(manifest), q


def _run(tmp_path, bad_mutate, caplog):
    cfg = _cfg(tmp_path)
    good, _ = _subtile(tmp_path, "good", 0)
    bad, q = _subtile(tmp_path, "bad", 1, bad_mutate)
    with caplog.at_level(logging.ERROR):
        results, failures = run_manifests(cfg, [bad, good])
    # the good sub-tile is unaffected
    assert [r.sub_tile_col for r in results if r.status == "written"].count(0) == 1
    good_res = next(r for r in results if r.sub_tile_col == 0)
    assert good_res.n_measured == N_GAL
    return cfg, results, failures, q


def _assert_named(failures, manifest_part: str, file_path: str, *words: str):
    assert len(failures) == 1, failures
    uri, msg = failures[0]
    assert manifest_part in uri
    assert Path(file_path).name in msg, msg
    low = msg.lower()
    for w in words:
        assert w in low, msg


def _truncate(q):
    p = Path(q["sci_path"])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage(q):
    Path(q["sci_path"]).write_bytes(b"SIMPLE  =  garbage, not a FITS file" * 50)


def _drop_sci_extension(q):
    from astropy.io import fits

    p = Path(q["sci_path"])
    with fits.open(p) as hdul:
        keep = [h.copy() for h in hdul if not str(h.header.get("EXTNAME", "")).endswith(".SCI")]
    fits.HDUList(keep).writeto(p, overwrite=True)


def test_truncated_fits_names_the_file(tmp_path, caplog):
    _, _, failures, q = _run(tmp_path, _truncate, caplog)
    _assert_named(failures, "bad", q["sci_path"])


def test_corrupt_fits_names_the_file(tmp_path, caplog):
    _, _, failures, q = _run(tmp_path, _garbage, caplog)
    _assert_named(failures, "bad", q["sci_path"])


def test_missing_extension_names_file_and_extension(tmp_path, caplog):
    _, _, failures, q = _run(tmp_path, _drop_sci_extension, caplog)
    _assert_named(failures, "bad", q["sci_path"], "sci")


def test_nan_and_inf_pixels_do_not_poison_the_subtile(tmp_path, caplog):
    """A quadrant with NaN/inf blocks: affected sources lose weight (or are flagged), nothing non-finite
    reaches the result or the summary."""
    from astropy.io import fits

    def poison(q):
        p = Path(q["sci_path"])
        with fits.open(p) as hdul:
            hdus = [h.copy() for h in hdul]
        for h in hdus:
            if str(h.header.get("EXTNAME", "")).endswith(".SCI"):
                h.data[:, : syn.NQ // 2] = np.nan  # left half NaN
                h.data[:5, :] = np.inf
        fits.HDUList(hdus).writeto(p, overwrite=True)

    from constellation_assets.catalog.schema import read_subtile_result

    _, results, failures, _ = _run(tmp_path, poison, caplog)
    assert not failures, failures
    bad = next(r for r in results if r.sub_tile_col == 1)
    table, summary = read_subtile_result(bad.result_uri)
    w = table["WEIGHT"].to_numpy()
    ok = w > 0
    assert ok.sum() < N_GAL  # the sources on NaN pixels are not measured
    for col in ("E1", "E2", "R11", "R22", "WEIGHT"):
        assert np.isfinite(table[col].to_numpy()[ok]).all(), col
    assert summary["N_SOURCES"] == int(ok.sum())
    if summary["N_SOURCES"]:
        assert math.isfinite(summary["G1"]) and math.isfinite(summary["G2"])


def test_wrong_wcs_units_are_reported(tmp_path, caplog):
    from astropy.io import fits

    def arcsec_units(q):
        p = Path(q["sci_path"])
        with fits.open(p) as hdul:
            hdus = [h.copy() for h in hdul]
        for h in hdus:
            if str(h.header.get("EXTNAME", "")).endswith(".SCI"):
                h.header["CUNIT1"] = h.header["CUNIT2"] = "arcsec"
        fits.HDUList(hdus).writeto(p, overwrite=True)

    _, _, failures, q = _run(tmp_path, arcsec_units, caplog)
    _assert_named(failures, "bad", q["sci_path"])


def test_source_catalog_with_missing_column_names_it(tmp_path, caplog):
    import pyarrow.parquet as pq

    def drop_dec(q):
        pass

    cfg = _cfg(tmp_path)
    good, _ = _subtile(tmp_path, "good", 0)
    bad, _ = _subtile(tmp_path, "bad", 1)
    cat = Path(bad).parent / "sources.parquet"
    pq.write_table(pq.read_table(cat).drop_columns(["DECLINATION"]), cat)
    results, failures = run_manifests(cfg, [bad, good])
    assert [r.sub_tile_col for r in results] == [0]
    assert len(failures) == 1 and "sources.parquet" in failures[0][1] and "DECLINATION" in failures[0][1]


def test_empty_subtile_gives_an_empty_result_not_a_crash(tmp_path):
    """A sub-tile with no shear-grade sources (e.g. beyond the survey edge); the tile catalog has others."""
    from constellation_assets.catalog.schema import read_subtile_result

    cfg = _cfg(tmp_path)
    m, _ = _subtile(tmp_path, "empty", 3, n_gal=1)
    data = yaml.safe_load(Path(m).read_text())
    data["source_ids"], data["core_source_ids"] = [], []
    Path(m).write_text(yaml.safe_dump(data, sort_keys=False))
    results, failures = run_manifests(cfg, [m])
    assert not failures, failures
    table, summary = read_subtile_result(results[0].result_uri)
    assert table.num_rows == 0 and summary["N_SOURCES"] == 0


# -------------------------------------------------------------------------------------------- manifests


def test_manifest_invalid_yaml_and_unsafe_tags(tmp_path):
    from constellation_assets.prepare import ManifestError, load_manifest

    bad = tmp_path / "bad.yaml"
    bad.write_text("tile_id: [1, 2\nsub_tile_row: 0\n")
    with pytest.raises(ManifestError, match="bad.yaml"):
        load_manifest(str(bad))
    marker = tmp_path / "pwned"
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text(f'tile_id: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ManifestError, match="unsafe.yaml"):
        load_manifest(str(unsafe))
    assert not marker.exists()


def test_manifest_paths_outside_data_roots_are_rejected(tmp_path):
    from constellation_assets.prepare import ManifestError, load_manifest

    cfg = _cfg(tmp_path)
    m, _ = _subtile(tmp_path, "ok", 0)
    assert load_manifest(m, cfg=cfg)["tile_id"] == 102044185  # inside the roots: accepted
    data = yaml.safe_load(Path(m).read_text())
    data["quadrants"][0]["sci_path"] = "/etc/passwd"
    outside = tmp_path / "out" / "manifests" / "outside.yaml"
    outside.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as ei:
        load_manifest(str(outside), cfg=cfg)
    assert "outside.yaml" in str(ei.value) and "/etc/passwd" in str(ei.value)


def test_worker_rejects_manifest_paths_outside_data_roots(tmp_path):
    """The inference entry point itself enforces the roots (a manifest is untrusted input)."""
    cfg = _cfg(tmp_path)
    m, _ = _subtile(tmp_path, "ok", 0)
    data = yaml.safe_load(Path(m).read_text())
    # outside every configured root (the data root is the folder above q1/, i.e. tmp_path)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    for k in ("sci_path", "bkg_path", "psf_path"):
        src = Path(data["quadrants"][0][k])
        dst = elsewhere / src.name
        dst.write_bytes(src.read_bytes())
        data["quadrants"][0][k] = str(dst)
    outside = tmp_path / "out" / "manifests" / "outside.yaml"
    outside.write_text(yaml.safe_dump(data))
    results, failures = run_manifests(cfg, [str(outside)])
    assert not results and len(failures) == 1
    assert "outside" in failures[0][1] and str(elsewhere) in failures[0][1]


# -------------------------------------------------------------------------------------------- configs, banks


def test_config_unknown_key_invalid_yaml_and_unsafe_tags(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config({"shear": {"stamp_size": 48}})
    assert "stamp_size" in str(ei.value) and "stamp_size_pix" in str(ei.value)

    bad = tmp_path / "bad.yaml"
    bad.write_text("shear: {stamp_size_pix: 48\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))

    marker = tmp_path / "pwned"
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text(f'field_name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="unsafe.yaml"):
        load_config(str(unsafe))
    assert not marker.exists()


def test_corrupt_hdf5_bank_names_the_file(tmp_path):
    from constellation_assets.sim.bank import CosmosBankError, load_cosmos_bank

    bank = tmp_path / "bank.h5"
    bank.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00garbage" * 100)
    with pytest.raises(CosmosBankError) as ei:
        load_cosmos_bank(str(bank))
    assert "bank.h5" in str(ei.value) and "rebuild" in str(ei.value)

    import h5py

    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f["sersic_n"] = np.ones(3)
    with pytest.raises(CosmosBankError) as ei:
        load_cosmos_bank(str(partial))
    assert "partial.h5" in str(ei.value) and "rebuild" in str(ei.value)
