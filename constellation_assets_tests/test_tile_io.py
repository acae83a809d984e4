"""Bounded I/O per tile: the sub-tiles of a tile measured together read each quadrant HDU once, byte ranges
only, and give the per-manifest results (benchmarks/bench_tile_io.py measures the same on moto S3)."""

from __future__ import annotations

import numpy as np
import pytest

from constellation_assets_tests.q1_testdata import TILE, small_config

#: Columns of a result table compared between the per-tile and the per-manifest measurements.
FLOAT_COLUMNS = ("E1", "E2", "R11", "R22", "WEIGHT", "SNR")
EXACT_COLUMNS = (
    "TILE_ID",
    "SUBTILE_ROW",
    "SUBTILE_COL",
    "OBJECT_ID",
    "RA",
    "DEC",
    "N_EXPOSURES",
    "FLAGS",
    "IN_CORE",
)


@pytest.fixture(scope="module")
def tile(tmp_path_factory):
    from constellation_assets.prepare import prepare_tile
    from constellation_assets.shear.infer import load_manifest
    from constellation_assets.synthetic import simulate_field

    root = tmp_path_factory.mktemp("tile_io")
    # An 8 x 8 grid puts the tile centre, where the small focal plane lies, on a corner shared by four
    # extended sub-tiles: they all list the same quadrants.
    cfg = small_config(
        root,
        field={"short_exposure_dithers": [], "pointing_jitter_arcsec": 0.0, "mer_catalog": "truth"},
        tiling={"sub_tile_grid": [8, 8], "sub_tile_margin_arcmin": 1.0},
        shear={"stamp_size_pix": 32},
        compute={"batch_size": 256, "device": "cpu"},
    )
    simulate_field(cfg)
    prep = prepare_tile(cfg, TILE)
    manifests = {u: load_manifest(u) for u in prep.manifest_uris}
    used = [u for u, m in manifests.items() if m["quadrants"] and m["source_ids"]]
    return {"cfg": cfg, "uris": list(prep.manifest_uris), "used": used, "manifests": manifests}


def _reference_bytes(manifests) -> tuple[int, int]:
    """(SCI+RMS+FLG+BKG data bytes of the distinct quadrants listed, number of distinct entries)."""
    from constellation_assets.shear.infer import _entry_key

    entries = {_entry_key(e): e for m in manifests for e in m["quadrants"] or []}
    data = sum(int(e[f"{k}_data_size"]) for e in entries.values() for k in ("sci", "rms", "flg", "bkg"))
    return data, len(entries)


def test_each_quadrant_hdu_read_once_per_tile(tile, monkeypatch):
    from constellation_assets.io import q1
    from constellation_assets.shear import stamps as st
    from constellation_assets.shear.infer import infer_manifest, infer_tile_manifests

    cfg, uris, used = tile["cfg"], tile["uris"], tile["used"]
    assert len(used) >= 4, "the test field must give several sub-tiles sharing quadrants"
    listed = sum(len(tile["manifests"][u]["quadrants"]) for u in used)
    ref, n_entries = _reference_bytes(tile["manifests"].values())
    assert listed >= 2 * n_entries  # the sub-tiles share their quadrants

    monkeypatch.setattr(st, "QUADRANT_CACHE", st.QuadrantCache(0))
    with q1.count_reads() as old:
        for u in uris:
            infer_manifest(cfg, u, force=True)
    with q1.count_reads() as new:
        results, failed = infer_tile_manifests(cfg, uris, force=True)
    assert not failed and len(results) == len(uris)
    assert all(r.status == "written" for r in results)

    quad_ranges = [r for r in new.ranges if "/q1/VIS/" in r[0]]
    assert len(quad_ranges) == len(set(quad_ranges)), "a quadrant HDU was read twice in one tile run"
    assert new.bytes <= 1.2 * ref, (new.bytes, ref)
    assert new.requests < old.requests and new.bytes < 0.75 * old.bytes
    # Byte ranges only: no request is larger than one HDU (header + data).
    largest = max(e - s for _, s, e in new.ranges)
    sizes = [
        int(e[f"{k}_data_offset"]) + int(e[f"{k}_data_size"]) - int(e[f"{k}_header_offset"])
        for m in tile["manifests"].values()
        for e in m["quadrants"] or []
        for k in ("sci", "rms", "flg", "bkg", "psf")
    ]
    assert largest <= max(sizes)

    # Up to date: the second run skips every sub-tile and reads no quadrant.
    with q1.count_reads() as again:
        results, failed = infer_tile_manifests(cfg, uris)
    assert not failed and all(r.status == "skipped" for r in results)
    assert not [r for r in again.ranges if "/q1/VIS/" in r[0]]


def test_tile_measurement_equals_per_manifest(tile):
    from constellation_assets.shear.infer import measure_manifest, measure_tile

    cfg = tile["cfg"]
    manifests = [tile["manifests"][u] for u in tile["used"]]
    # One stamp per estimator batch: batches hold the same stamps either way, so the values are identical.
    alone = [measure_manifest(cfg, m, batch_size=1) for m in manifests]
    together = measure_tile(cfg, manifests, batch_size=1)
    for (ta, na), got in zip(alone, together, strict=True):
        assert not isinstance(got, Exception), got
        tb, nb = got
        assert na == nb > 0
        assert ta.schema == tb.schema
        for c in ta.column_names:
            np.testing.assert_array_equal(ta[c].to_numpy(), tb[c].to_numpy(), err_msg=c)
    # Larger batches mix sub-tiles: the estimator's pixel scale (the median over a batch) differs by ~1e-4.
    together = measure_tile(cfg, manifests, batch_size=256)
    for (ta, _), (tb, _) in zip(alone, together, strict=True):
        for c in EXACT_COLUMNS:
            np.testing.assert_array_equal(ta[c].to_numpy(), tb[c].to_numpy(), err_msg=c)
        for c in FLOAT_COLUMNS:
            np.testing.assert_allclose(tb[c].to_numpy(), ta[c].to_numpy(), rtol=1e-3, atol=1e-4, err_msg=c)


def test_unreadable_quadrant_fails_only_its_subtiles(tile, tmp_path):
    """A quadrant that cannot be read fails the sub-tiles listing it; the tile's others are written."""
    import copy

    from constellation_assets.shear.infer import measure_tile

    cfg = tile["cfg"]
    manifests = [copy.deepcopy(tile["manifests"][u]) for u in tile["used"]]
    # In the first manifest only, one quadrant points at a file that does not exist.
    manifests[0]["quadrants"][0] = {
        **manifests[0]["quadrants"][0],
        "sci_path": str(tmp_path / "missing.fits"),
    }
    out = measure_tile(cfg, manifests, batch_size=256)
    assert isinstance(out[0], Exception)
    assert "missing.fits" in str(out[0])
    assert all(isinstance(o, tuple) and o[1] > 0 for o in out[1:])


def test_infer_many_groups_manifests_by_tile(tile):
    import pickle

    from constellation_assets.pipeline import _infer_group, _tile_groups, infer_many

    groups = _tile_groups(["r/m/7/7_0_1.yaml", "r/m/8/8_0_0.yaml", "r/m/7/7_1_1.yaml", "s3://b/x/other.yaml"])
    assert groups == [["r/m/7/7_0_1.yaml", "r/m/7/7_1_1.yaml"], ["r/m/8/8_0_0.yaml"], ["s3://b/x/other.yaml"]]
    cfg, uris = tile["cfg"], tile["uris"]
    assert _tile_groups(uris) == [uris]
    results = infer_many(cfg, uris, workers=2)  # one tile: one group, measured in this process
    assert sorted(r.manifest_uri for r in results) == sorted(uris)
    # The worker-process task returns picklable results and failures.
    import torch

    threads = torch.get_num_threads()
    try:
        done, failed = _infer_group(cfg.model_dump(mode="json"), uris, None, None, 1)
    finally:
        torch.set_num_threads(threads)
    assert len(done) == len(uris) and not failed
    pickle.dumps((done, failed))
