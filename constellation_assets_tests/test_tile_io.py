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
    # Larger batches mix sub-tiles and quadrants; each stamp's weight kernel still uses its own quadrant's
    # pixel scale, so the values agree to float32 FFT round-off (~1e-5; with the batch median scale: ~1e-4 in R).
    together = measure_tile(cfg, manifests, batch_size=256)
    for (ta, _), (tb, _) in zip(alone, together, strict=True):
        for c in EXACT_COLUMNS:
            np.testing.assert_array_equal(ta[c].to_numpy(), tb[c].to_numpy(), err_msg=c)
        # rows with selection weight (others may have ill-conditioned ratios, e.g. R ~ -99, that amplify it)
        w = ta["WEIGHT"].to_numpy() > 0
        assert w.sum() > 10
        for c in FLOAT_COLUMNS:
            a, b = ta[c].to_numpy()[w].astype(np.float64), tb[c].to_numpy()[w].astype(np.float64)
            rel = np.abs(b - a) / np.maximum(np.abs(a), 1e-3)
            assert np.median(rel) < 1e-6 and rel.max() < 1e-3, (c, np.median(rel), rel.max())


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


def test_a_stamps_moments_do_not_depend_on_its_batch():
    """Each stamp's weight kernel uses its own quadrant's pixel scale: two quadrants of different scales
    measured in one batch give the moments each gives alone (a batch-wide scale would shift them ~1 %)."""
    from constellation_assets.shear.infer import _BatchMeasurer
    from constellation_assets.shear.stamps import ExposureStamps

    size, n = 48, 6
    yy, xx = np.mgrid[:size, :size] - size // 2

    def stamps(scale: float, seed: int) -> ExposureStamps:
        rng = np.random.default_rng(seed)
        sig = 0.25 / scale  # a 0.25" Gaussian galaxy in this quadrant's pixels
        e = rng.uniform(-0.2, 0.2, (n, 2))
        q = (xx**2 * (1 - e[:, 0, None, None]) + yy**2 * (1 + e[:, 0, None, None])) - 2 * e[
            :, 1, None, None
        ] * xx * yy
        img = (np.exp(-0.5 * q / sig**2) + rng.normal(0, 1e-3, (n, size, size))).astype(np.float32)
        psf = np.exp(-0.5 * (xx**2 + yy**2) / (0.07 / scale) ** 2)
        psf = np.repeat((psf / psf.sum())[None].astype(np.float32), n, axis=0)
        return ExposureStamps(
            "q", "1", np.arange(n), img, psf, np.full(n, 1e-3), np.zeros((n, 2)), np.zeros(n), np.zeros(n),
            np.repeat((np.eye(2) * scale)[None], n, axis=0), np.zeros(n), np.zeros(n, np.int32), np.ones(n),
            np.full(n, scale),
        )  # fmt: skip

    kw = {"sigma_arcsec": 0.35, "precision": "float64", "psf_floor": 1e-3}
    parts = [stamps(0.100, 1), stamps(0.104, 2)]
    alone = []
    for p in parts:
        m = _BatchMeasurer("cpu", 64, kw, None)
        m.add(p)
        alone.append(m.finish()["moments"])
    both = _BatchMeasurer("cpu", 64, kw, None)
    for p in parts:
        both.add(p)
    together = both.finish()["moments"]
    np.testing.assert_allclose(together, np.concatenate(alone), rtol=1e-9, atol=1e-12)
