"""MER tile ring model: published Q1 tile positions, ownership, sky boxes, gnomonic projection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from constellation_assets.sky.tiles import (
    N_RINGS,
    SkyBox,
    mer_tile,
    radec_to_tangent,
    ring_dec_deg,
    ring_tile_count,
    tangent_square_bounds,
    tangent_to_radec,
    tile_center_deg,
    tile_id_at,
    tiles_overlapping,
    valid_tile_id_range,
)


def _uniform_sphere(rng, n, dec_lo=-90.0, dec_hi=90.0):
    s = rng.uniform(math.sin(math.radians(dec_lo)), math.sin(math.radians(dec_hi)), n)
    return rng.uniform(0.0, 360.0, n), np.degrees(np.arcsin(s))


@pytest.mark.parametrize(
    ("tile_id", "ra", "dec"),
    [
        (102044185, 52.9869, -28.0),  # EDF-F (euclid-q1.md)
        (102018211, 57.9991, -51.5),  # EDF-S (euclid-q1.md)
        (102158889, 267.3807789, 65.5),  # EDF-N, ESA archive mosaic centre (Dec listed as 65.4983)
    ],
)
def test_published_tile_centres(tile_id, ra, dec):
    ra_c, dec_c = tile_center_deg(tile_id)
    assert abs(ra_c - ra) < 1e-4
    assert dec_c == dec
    assert tile_id_at(ra, dec) == tile_id


def test_published_footprints_and_edff_range():
    # ESA archive: (75, -49) lies in tile 102020553; (76, -45.4) lies in both 102024002 and 102024003.
    assert tile_id_at(75.0, -49.0) == 102020553
    for tid in (102024002, 102024003):
        assert mer_tile(tid).extended.contains(76.0, -45.4)
    # EDF-F (Fornax, around RA 52.9 Dec -28.1) spans ids 102041031 .. 102047412.
    for tid in (102041031, 102047412):
        ra, dec = tile_center_deg(tid)
        assert abs(ra - 52.9) < 1.5 and abs(dec + 28.1) < 3.0
    ras, decs = tile_center_deg(np.arange(102041031, 102047413))
    assert decs.min() == -30.5 and decs.max() == -25.5


def test_ring_counts_follow_the_step_formula():
    lo, hi = valid_tile_id_range()
    total = 0
    for k in range(N_RINGS):
        dec = ring_dec_deg(k)
        step = 0.5 / math.cos(math.radians(abs(dec) - 0.5))
        n = ring_tile_count(k)
        # ceil(360 / step): the ring closes with a last gap of at most one step.
        assert 0 < 360.0 - (n - 1) * step <= step + 1e-9
        total += n
    assert hi - lo + 1 == total
    assert ring_tile_count(N_RINGS // 2) == 720  # equator
    assert ring_tile_count(int((60.5 + 90) / 0.5)) == 361  # float64 rounding of 720 cos(60 deg), see module


def test_center_roundtrip_all_rings():
    rng = np.random.default_rng(0)
    lo, hi = valid_tile_id_range()
    ids = np.concatenate([rng.integers(lo, hi + 1, 5000), [lo, hi, 102000000]])
    ra, dec = tile_center_deg(ids)
    assert np.all((ra >= 0) & (ra < 360)) and np.all(np.abs(dec) <= 90)
    np.testing.assert_array_equal(tile_id_at(ra, dec), ids)


def test_invalid_tile_ids_are_named():
    lo, hi = valid_tile_id_range()
    with pytest.raises(ValueError, match=str(hi + 1)):
        tile_center_deg(hi + 1)
    with pytest.raises(ValueError, match="integer"):
        tile_center_deg(102044185.5)
    with pytest.raises(ValueError):
        tile_id_at(10.0, 91.0)


def test_tile_id_at_wraps_ra():
    # Dec 0: 720 tiles, step 0.50004 deg, last centre at 359.53; positions beyond the gap midpoint go to RA 0.
    first = tile_id_at(0.0, 0.0)
    last = tile_id_at(359.53, 0.0)
    assert tile_center_deg(first)[0] == 0.0
    assert last == first + 719
    assert tile_id_at(359.9, 0.0) == first
    assert tile_id_at(-0.1, 0.0) == first
    assert tile_id_at(360.2, 0.0) == tile_id_at(0.2, 0.0)
    assert tile_id_at(359.7, 0.0) == last
    np.testing.assert_array_equal(tile_id_at([359.9, 359.7], [0.0, 0.0]), [first, last])


def test_ownership_cells_stay_inside_the_extended_tile_everywhere():
    """Every position lies within 16' (the extended half-size) of its owner's centre in the owner's tangent
    plane, including next to the poles: owned sources always fall in the owner's sub-tile grid."""
    rng = np.random.default_rng(1)
    ra, dec = _uniform_sphere(rng, 400_000)
    ra_p, dec_p = _uniform_sphere(rng, 200_000, 84.0, 90.0)
    ra = np.concatenate([ra, ra_p, ra_p, [0.0, 123.0, 0.0, 359.999]])
    dec = np.concatenate([dec, dec_p, -dec_p, [90.0, -90.0, -90.0, 89.999]])
    owner = tile_id_at(ra, dec)
    ra0, dec0 = tile_center_deg(owner)
    xi, eta = radec_to_tangent(ra, dec, ra0, dec0)
    half = 16.0 / 60.0
    assert np.all(np.abs(xi) < half) and np.all(np.abs(eta) < half)
    # Dec bands of the ownership cells: |dec - ring| <= 15'.
    assert np.all(np.abs(dec - dec0) <= 0.25 + 1e-12)


def test_gnomonic_roundtrip_and_small_angle():
    rng = np.random.default_rng(2)
    for ra0, dec0 in [(10.0, 0.0), (359.9, -45.0), (200.0, 89.9), (0.0, -90.0), (52.98, -28.0)]:
        xi = rng.uniform(-0.3, 0.3, 1000)
        eta = rng.uniform(-0.3, 0.3, 1000)
        ra, dec = tangent_to_radec(xi, eta, ra0, dec0)
        assert np.all((ra >= 0) & (ra < 360))
        xi2, eta2 = radec_to_tangent(ra, dec, ra0, dec0)
        np.testing.assert_allclose(xi2, xi, atol=1e-11)
        np.testing.assert_allclose(eta2, eta, atol=1e-11)
    # Small offsets: xi ~ dRA cos(dec), eta ~ dDec.
    xi, eta = radec_to_tangent(60.01, 60.0, 60.0, 60.0)
    assert xi == pytest.approx(0.01 * 0.5, rel=1e-4) and abs(eta) < 1e-5
    assert np.isnan(radec_to_tangent(180.0, 0.0, 0.0, 0.0)[0])  # far hemisphere


def test_skybox_contains_wrap_and_dict():
    box = SkyBox(359.0, 1.0, -1.0, 1.0)
    assert box.wraps and box.ra_width_deg == pytest.approx(2.0)
    np.testing.assert_array_equal(
        box.contains([359.5, 0.5, 2.0, -0.5, 360.5, 0.0], [0, 0, 0, 0, 0, 1.5]),
        [True, True, False, True, True, False],
    )
    assert SkyBox(10.0, 20.0, 0.0, 1.0).contains(15.0, 0.5) is True
    assert SkyBox(0.0, 360.0, 89.0, 90.0).contains(np.arange(0, 360, 30.0), 89.5).all()
    assert box.to_dict() == {"ra_min": 359.0, "ra_max": 1.0, "dec_min": -1.0, "dec_max": 1.0}
    assert box.overlaps(SkyBox(0.5, 3.0, 0.0, 2.0)) and not box.overlaps(SkyBox(2.0, 3.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="dec_min"):
        SkyBox(0.0, 1.0, 2.0, 1.0)


@pytest.mark.parametrize(
    ("ra0", "dec0"),
    [(52.98, -28.0), (0.1, 10.0), (359.95, -70.0), (120.0, 80.0), (15.0, 89.5), (0.0, -89.5), (33.0, 90.0)],
)
def test_tangent_square_bounds_are_exact(ra0, dec0):
    """The bounding box contains densely sampled points of the rectangle (boundary and interior) and is
    tight: its edges are reached by the samples to within the sampling resolution."""
    rng = np.random.default_rng(3)
    for x0, x1, y0, y1 in [(-0.27, 0.27, -0.27, 0.27), (-0.27, -0.12, 0.1, 0.27), (0.05, 0.2, -0.27, -0.1)]:
        box = SkyBox(*(float(v) for v in tangent_square_bounds(ra0, dec0, x0, x1, y0, y1)))
        t = np.linspace(0, 1, 4001)
        xs = np.concatenate(
            [x0 + (x1 - x0) * t, x0 + (x1 - x0) * t, np.full_like(t, x0), np.full_like(t, x1)]
        )
        ys = np.concatenate(
            [np.full_like(t, y0), np.full_like(t, y1), y0 + (y1 - y0) * t, y0 + (y1 - y0) * t]
        )
        xs = np.concatenate([xs, rng.uniform(x0, x1, 20000)])
        ys = np.concatenate([ys, rng.uniform(y0, y1, 20000)])
        ra, dec = tangent_to_radec(xs, ys, ra0, dec0)
        eps = 1e-9
        grown = SkyBox(
            (box.ra_min - eps) % 360,
            min(box.ra_max + eps, 360.0) if box.ra_max < 360 else 360.0,
            max(box.dec_min - eps, -90.0),
            min(box.dec_max + eps, 90.0),
        )
        if box.ra_min == 0.0 and box.ra_max == 360.0:
            grown = SkyBox(0.0, 360.0, grown.dec_min, grown.dec_max)
        assert grown.contains(ra, dec).all()
        full = box.ra_min == 0.0 and box.ra_max == 360.0
        # Around a pole the extreme (+-90) is a single point that samples only approach.
        tol = 1e-2 if full else 1e-5
        assert dec.min() - box.dec_min < tol and box.dec_max - dec.max() < tol
        if not full:
            dra = (ra - box.ra_min) % 360.0
            assert dra.min() < 1e-4 and box.ra_width_deg - dra.max() < 1e-4


def test_mer_tile_boxes():
    t = mer_tile(102044185)
    assert (t.tile_id, t.ra_deg, t.dec_deg) == (102044185, *tile_center_deg(102044185))
    assert t.core.contains(t.ra_deg, t.dec_deg)
    # 30' / 32' squares: Dec extents 0.5 / 0.5333 deg, RA extents those over cos(dec) (to first order).
    assert t.core.dec_max - t.core.dec_min == pytest.approx(0.5, abs=1e-3)
    assert t.extended.dec_max - t.extended.dec_min == pytest.approx(32 / 60, abs=1e-3)
    assert t.core.ra_width_deg == pytest.approx(0.5 / math.cos(math.radians(28.0)), rel=5e-3)
    assert t.extended.ra_min < t.core.ra_min and t.extended.ra_max > t.core.ra_max
    assert t.to_dict()["extended"] == t.extended.to_dict()
    # A tile on RA = 0 wraps, a tile at the pole covers all RA.
    t0 = mer_tile(tile_id_at(0.0, -40.0))
    assert t0.extended.wraps and t0.extended.contains(359.9, -40.0) and t0.extended.contains(0.1, -40.0)
    tp = mer_tile(tile_id_at(10.0, 90.0))
    assert (tp.extended.ra_min, tp.extended.ra_max, tp.extended.dec_max) == (0.0, 360.0, 90.0)
    with pytest.raises(ValueError, match="core_arcmin"):
        mer_tile(102044185, core_arcmin=40.0)


def test_tiles_overlapping():
    rng = np.random.default_rng(4)
    ids = tiles_overlapping(52.0, 54.0, -29.0, -27.0)
    assert 102044185 in ids and ids == sorted(set(ids))
    ra = rng.uniform(52.0, 54.0, 5000)
    dec = rng.uniform(-29.0, -27.0, 5000)
    assert set(tile_id_at(ra, dec).tolist()) <= set(ids)
    for tid in ids:
        assert mer_tile(tid).extended.overlaps(SkyBox(52.0, 54.0, -29.0, -27.0))
    # Across RA = 0: owners of points on both sides are returned.
    wrap = tiles_overlapping(359.5, 0.5, -10.0, -9.0)
    assert tile_id_at(359.8, -9.5) in wrap and tile_id_at(0.2, -9.5) in wrap
    assert wrap == tiles_overlapping(-0.5, 0.5, -10.0, -9.0)
    # Polar cap: every tile of the top rings.
    polar = tiles_overlapping(0.0, 360.0, 89.9, 90.0)
    assert tile_id_at(200.0, 89.95) in polar and tile_id_at(5.0, 90.0) in polar
