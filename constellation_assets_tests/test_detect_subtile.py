"""Sub-tile catalogs from detection on the exposures (``shear.detection: pixels``, shear/detect_subtile.py) on a
tiny synthetic Q1 field: every lattice pixel counted once across sub-tiles, MER names and the star prior, the
rows' sums equal to the detections', the frame rotation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration

TILE = 102044185


def _config(root, grid):
    from constellation_assets.config import load_config

    d = {
        "tile_ids": [TILE],
        "data": {
            "vis_base_uri": str(root / "q1" / "VIS") + "/",
            "catalog_base_uri": str(root / "q1" / "catalogs" / "MER_FINAL_CATALOG") + "/",
        },
        "output": {"root_uri": str(root / f"out_{grid[0]}x{grid[1]}")},
        "shear": {"detection": "pixels", "detection_block_pix": 128},
        "tiling": {"sub_tile_grid": list(grid), "sub_tile_margin_arcmin": 0.2},
        "field": {
            "tile_ids": [TILE],
            "n_dithers": 2,
            "short_exposure_dithers": [],
            "dither_offsets_arcsec": [[0.0, 0.0], [3.0, 7.0]],
            "ccd_grid": [1, 1],
            "quadrant_nx_pix": 256,
            "quadrant_ny_pix": 256,
            "galaxy_density_arcmin2": 80,
            "star_density_arcmin2": 20,
            "shear_g1": 0.05,
            "shear_g2": -0.03,
            # One PSF everywhere: the two layouts' blocks take the PSF model at different centres.
            "psf_fwhm_variation": 0.0,
            "psf_e_amplitude": 0.0,
        },
    }
    path = root / f"pipeline_{grid[0]}x{grid[1]}.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_config(str(path))


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """The field measured twice: one sub-tile per tile (1 x 1) and the tile in 16 x 16 sub-tiles (2')."""
    from constellation_assets.prepare import prepare_tile
    from constellation_assets.shear import infer
    from constellation_assets.synthetic import simulate_field

    root = tmp_path_factory.mktemp("detect_field")
    out = {}
    for grid in ((1, 1), (16, 16)):
        cfg = _config(root, grid)
        if grid == (1, 1):
            simulate_field(cfg)
        prep = prepare_tile(cfg, TILE)
        manifests = [yaml.safe_load(Path(u).read_text()) for u in prep.manifest_uris]
        results = infer.measure_tile(cfg, manifests)
        tables = []
        for m, r in zip(manifests, results, strict=True):
            assert not isinstance(r, Exception), r
            tables.append((m, r[0], r[1]))
        out[grid] = {"cfg": cfg, "tables": tables}
    return out


def _rows(tables):
    import pyarrow as pa

    return pa.concat_tables([t for _, t, _ in tables])


def test_each_object_once_and_sums_independent_of_the_sub_tile_grid(field):
    """One sub-tile for the tile and 256 sub-tiles give the same objects and the same sums of w e and w R:
    each lattice pixel is counted by exactly one sub-tile (ownership by the MER position, or the
    detection's own), whatever the blocks and bands."""
    one = _rows(field[(1, 1)]["tables"])
    many = _rows(field[(16, 16)]["tables"])
    for t in (one, many):
        oid = t["OBJECT_ID"].to_numpy()
        assert len(np.unique(oid)) == len(oid)
        assert t["IN_CORE"].to_numpy().all()
    assert one.num_rows > 20
    assert set(one["OBJECT_ID"].to_pylist()) == set(many["OBJECT_ID"].to_pylist())
    # Same objects, same sums: the layouts differ only in where blocks and cut-outs end (light beyond
    # 5 kernel sigmas, ~1e-5; the peak step's ramps make single objects move by up to ~1e-3).
    ia = np.argsort(one["OBJECT_ID"].to_numpy())
    ib = np.argsort(many["OBJECT_ID"].to_numpy())
    for col in ("E1", "E2", "R11", "R22"):
        a = (one["WEIGHT"].to_numpy() * one[col].to_numpy()).astype(np.float64)[ia]
        b = (many["WEIGHT"].to_numpy() * many[col].to_numpy()).astype(np.float64)[ib]
        assert abs(a.sum() - b.sum()) < 1e-4 * np.abs(a).sum(), col
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-3 * np.abs(a).max(), err_msg=col)
    # Sub-tile labels: each row in the sub-tile owning its position.
    from constellation_assets.shear.detect_subtile import subtile_lattice

    for m, t, _ in field[(16, 16)]["tables"]:
        if t.num_rows:
            lat = subtile_lattice(field[(16, 16)]["cfg"], m)
            assert lat.owns(t["RA"].to_numpy(), t["DEC"].to_numpy()).all()


def test_mer_names_star_prior_and_shear(field):
    """Rows carry MER ids (stars never: the POINT_LIKE prior), positive weights and responses, and the
    ensemble recovers the field's shear within its shape noise."""
    from constellation_assets.io.mer_catalog import read_mer_catalog
    from constellation_assets.shear.detect_subtile import FLAG_NO_CATALOG_MATCH

    cfg = field[(1, 1)]["cfg"]
    m, t, n_det = field[(1, 1)]["tables"][0]
    mer = read_mer_catalog(m["source_catalog"], cfg.storage_options(m["source_catalog"]))
    ids = mer["OBJECT_ID"].to_numpy()
    stars = set(ids[mer["POINT_LIKE_FLAG"].to_numpy() == 1].tolist())
    assert len(stars) >= 3
    oid = t["OBJECT_ID"].to_numpy()
    assert not stars & set(oid.tolist())
    matched = oid >= 0
    assert np.isin(oid[matched], ids).all()
    assert np.all((t["FLAGS"].to_numpy() & FLAG_NO_CATALOG_MATCH != 0) == ~matched)
    assert matched.mean() > 0.8
    assert n_det >= t.num_rows
    w = t["WEIGHT"].to_numpy().astype(np.float64)
    assert np.all(w > 0) and np.all(t["SNR"].to_numpy() > cfg.shear.estimator_snr_min)
    r = (w * t["R11"].to_numpy()).sum() / w.sum()
    assert 0.1 < r < 1.5
    g1 = (w * t["E1"].to_numpy()).sum() / (w * t["R11"].to_numpy()).sum()
    g2 = (w * t["E2"].to_numpy()).sum() / (w * t["R22"].to_numpy()).sum()
    sigma = 0.35 / math.sqrt(len(w))  # shape noise per component / sqrt(N) (R ~ 0.5)
    assert abs(g1 - 0.05) < 4 * sigma and abs(g2 + 0.03) < 4 * sigma


def test_spin2_rotation_of_detections():
    """The lattice-to-local frame rotation: a rotation by theta then -theta is the identity, by pi/2 flips
    both components (spin 2), and the trace of R and the ensemble |g| are invariant."""
    from constellation_assets.shear.detect_subtile import _rotate_spin2

    rng = np.random.default_rng(0)
    n = 7
    base = {k: rng.normal(size=n) for k in ("phi1", "phi2", "e1", "e2", "r11", "r12", "r21", "r22")}
    base["x"] = np.arange(n)
    res = {k: v.copy() for k, v in base.items()}
    _rotate_spin2(res, 0.3)
    np.testing.assert_allclose(res["r11"] + res["r22"], base["r11"] + base["r22"], rtol=1e-12)
    np.testing.assert_allclose(np.hypot(res["phi1"], res["phi2"]), np.hypot(base["phi1"], base["phi2"]))
    _rotate_spin2(res, -0.3)
    for k in base:
        np.testing.assert_allclose(res[k], base[k], rtol=1e-12, atol=1e-12)
    res = {k: v.copy() for k, v in base.items()}
    _rotate_spin2(res, math.pi / 2)
    np.testing.assert_allclose(res["phi1"], -base["phi1"], atol=1e-12)
    np.testing.assert_allclose(res["phi2"], -base["phi2"], atol=1e-12)


def test_band_must_hold_the_match_radius():
    from pydantic import ValidationError

    from constellation_assets.config import ShearConfig

    with pytest.raises(ValidationError, match="detection_band_arcsec"):
        ShearConfig(detection="pixels", detection_band_arcsec=0.2, detection_match_radius_arcsec=0.5)
