"""Sub-tile grid geometry and source partitioning (completeness, uniqueness, margins, RA wrap, poles)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constellation_assets.sky.subtiles import partition_sources, subtile_grid
from constellation_assets.sky.tiles import (
    mer_tile,
    radec_to_tangent,
    tangent_to_radec,
    tile_center_deg,
    tile_id_at,
    valid_tile_id_range,
)

EDFF_TILE = 102044185
# Tiles covering the awkward places: RA = 0 at the equator and at Dec -40, high |Dec|, the polar rings.
AWKWARD_TILES = [
    tile_id_at(0.0, 0.0),
    tile_id_at(0.0, -40.0),
    tile_id_at(359.9, 61.0),
    tile_id_at(100.0, 80.0),
    tile_id_at(250.0, -85.0),
    tile_id_at(10.0, 89.5),
    tile_id_at(200.0, -90.0),
]


def _gnomonic_solid_angle(x0, x1, y0, y1):
    """Solid angle (sr) of the tangent-plane rectangle with corners in radians (closed form)."""

    def f(x, y):
        return np.arctan(x * y / np.sqrt(1.0 + x * x + y * y))

    return f(x1, y1) - f(x0, y1) - f(x1, y0) + f(x0, y0)


def _sources_around(tile, n, rng, half_deg=0.35):
    """Points uniform in the tangent plane around the tile (beyond its 16' extended half-size)."""
    xi = rng.uniform(-half_deg, half_deg, n)
    eta = rng.uniform(-half_deg, half_deg, n)
    return tangent_to_radec(xi, eta, tile.ra_deg, tile.dec_deg)


def test_grid_layout_and_ordering():
    tile = mer_tile(EDFF_TILE)
    subs = subtile_grid(tile)
    assert [(s.row, s.col) for s in subs] == [(r, c) for r in range(4) for c in range(4)]
    assert subs[5].name == f"{EDFF_TILE}_1_1"
    # Row 0 is south, col 0 is west (low RA).
    assert subs[0].core.dec_max < subs[12].core.dec_min + 1e-3
    assert subs[0].core.ra_max < subs[3].core.ra_min + 1e-3
    # 8' cores, 10' extended boxes in the tangent plane.
    for s in subs:
        x0, x1, y0, y1 = s.core_tangent_deg
        assert (x1 - x0) * 60 == pytest.approx(8.0) and (y1 - y0) * 60 == pytest.approx(8.0)
        ex0, ex1, ey0, ey1 = s.extended_tangent_deg
        assert (ex1 - ex0) * 60 == pytest.approx(10.0) and (ey1 - ey0) * 60 == pytest.approx(10.0)
        assert s.core.contains(*s.center_deg)
        assert set(s.sky_bounds()) == {"core", "extended"}
        assert s.sky_bounds()["extended"] == s.extended.to_dict()


@pytest.mark.parametrize("tile_id", [EDFF_TILE, *AWKWARD_TILES])
def test_core_areas_sum_to_grid_and_overlaps_equal_margins(tile_id):
    tile = mer_tile(tile_id)
    subs = subtile_grid(tile, grid=(4, 4), margin_arcmin=1.0)
    half = math.radians(16.0 / 60.0)
    cores = np.radians(np.array([s.core_tangent_deg for s in subs]))
    areas = _gnomonic_solid_angle(*cores.T)
    total = _gnomonic_solid_angle(-half, half, -half, half)
    assert areas.sum() == pytest.approx(total, rel=1e-12)
    assert total == pytest.approx((2 * half) ** 2, rel=1e-4)  # ~ (32')^2 in the small-angle limit
    # Cores tile the grid exactly: adjacent cores share edges; extended boxes overlap by exactly 2 x margin.
    by_rc = {(s.row, s.col): s for s in subs}
    m = 1.0 / 60.0
    for (r, c), s in by_rc.items():
        if c + 1 < 4:
            right = by_rc[(r, c + 1)]
            assert s.core_tangent_deg[1] == pytest.approx(right.core_tangent_deg[0], abs=1e-15)
            assert s.extended_tangent_deg[1] - right.extended_tangent_deg[0] == pytest.approx(
                2 * m, abs=1e-15
            )
        if r + 1 < 4:
            up = by_rc[(r + 1, c)]
            assert s.core_tangent_deg[3] == pytest.approx(up.core_tangent_deg[2], abs=1e-15)
            assert s.extended_tangent_deg[3] - up.extended_tangent_deg[2] == pytest.approx(2 * m, abs=1e-15)


@pytest.mark.parametrize("tile_id", [EDFF_TILE, *AWKWARD_TILES])
def test_partition_invariants(tile_id):
    rng = np.random.default_rng(tile_id % 1000)
    tile = mer_tile(tile_id)
    ra, dec = _sources_around(tile, 40_000, rng)
    part = partition_sources(ra, dec, tile)
    assert part.core_row.dtype == np.int8 and part.core_col.dtype == np.int8 and part.owned.dtype == bool
    # Owned sources are all inside the grid and each is in exactly one core.
    assert part.owned.any() and not np.any(part.owned & ~part.in_grid)
    hits = np.zeros(ra.size, dtype=np.int64)
    subs = subtile_grid(tile)
    half = 16.0 / 60.0
    xi, eta = radec_to_tangent(ra, dec, tile.ra_deg, tile.dec_deg)
    for s in subs:
        all_idx, core_idx = part.subtile_members(s.row, s.col)
        hits[core_idx] += 1
        assert np.all(np.diff(all_idx) > 0) and np.isin(core_idx, all_idx).all()
        # Brute force against the tangent-plane boxes (half-open intervals).
        x0, x1, y0, y1 = s.extended_tangent_deg
        expect_all = np.nonzero((xi >= x0) & (xi < x1) & (eta >= y0) & (eta < y1))[0]
        np.testing.assert_array_equal(all_idx, expect_all)
        cx0, cx1, cy0, cy1 = s.core_tangent_deg
        in_core = (xi >= cx0) & (xi < cx1) & (eta >= cy0) & (eta < cy1)
        np.testing.assert_array_equal(core_idx, np.nonzero(in_core & part.owned)[0])
        # The manifest boxes (RA/Dec bounding boxes) contain every member.
        assert s.extended.contains(ra[all_idx], dec[all_idx]).all()
        assert s.core.contains(ra[core_idx], dec[core_idx]).all()
        margin = part.margin_members(s.row, s.col)
        assert np.intersect1d(margin, core_idx).size == 0 and margin.size + core_idx.size == all_idx.size
    np.testing.assert_array_equal(hits, part.owned.astype(np.int64))
    inside = (np.abs(xi) < half) & (np.abs(eta) < half)
    np.testing.assert_array_equal(part.in_grid, inside)
    assert part.core_counts().sum() == part.owned.sum()
    cols = part.assignment_columns()
    np.testing.assert_array_equal(cols["IN_CORE"], part.owned)
    assert cols["SUBTILE_ROW"].dtype == np.int8 and set(cols) == {
        "SUBTILE_ROW",
        "SUBTILE_COL",
        "OWNED",
        "IN_CORE",
    }
    # Sources in two neighbouring extended boxes lie within one margin of their shared core edge.
    a, _ = part.subtile_members(1, 1)
    b, _ = part.subtile_members(1, 2)
    both = np.intersect1d(a, b)
    edge = subs[6].core_tangent_deg[0]
    assert both.size and np.all(np.abs(xi[both] - edge) <= 1.0 / 60.0 + 1e-12)


def test_core_counts_follow_solid_angle_at_high_dec():
    """Uniform sky density -> per-core counts proportional to each core's solid angle (5 sigma)."""
    rng = np.random.default_rng(7)
    for tile_id in (tile_id_at(100.0, 80.0), tile_id_at(200.0, -89.5)):
        tile = mer_tile(tile_id)
        # Uniform on the sphere inside a cap around the tile centre (radius 0.5 deg).
        n = 400_000
        cos_r = math.cos(math.radians(0.5))
        z = rng.uniform(cos_r, 1.0, n)
        phi = rng.uniform(0, 2 * np.pi, n)
        rho = np.sqrt(1 - z * z)
        xi = np.degrees(rho * np.cos(phi) / z)
        eta = np.degrees(rho * np.sin(phi) / z)
        ra, dec = tangent_to_radec(xi, eta, tile.ra_deg, tile.dec_deg)
        part = partition_sources(ra, dec, tile)
        counts = np.zeros((4, 4))
        for r in range(4):
            for c in range(4):
                counts[r, c] = np.sum((part.core_row == r) & (part.core_col == c))
        cap = 2 * np.pi * (1 - cos_r)
        subs = subtile_grid(tile)
        expect = np.array([_gnomonic_solid_angle(*np.radians(s.core_tangent_deg)) for s in subs]).reshape(
            4, 4
        ) * (n / cap)
        assert np.all(np.abs(counts - expect) < 5 * np.sqrt(expect))


def test_ra_wrap_partition_is_invariant_to_ra_representation():
    tile = mer_tile(tile_id_at(0.0, -40.0))
    assert tile.ra_deg == 0.0
    rng = np.random.default_rng(11)
    ra, dec = _sources_around(tile, 20_000, rng)
    assert (ra > 359).any() and (ra < 1).any()
    p1 = partition_sources(ra, dec, tile)
    p2 = partition_sources(np.where(ra > 180, ra - 360.0, ra), dec, tile)
    for name in ("core_row", "core_col", "owned"):
        np.testing.assert_array_equal(getattr(p1, name), getattr(p2, name))
    # Col 1 cores lie just west of RA = 0, col 2 cores just east; their margins reach across.
    east_all, east_core = p1.subtile_members(2, 2)
    west_all, west_core = p1.subtile_members(2, 1)
    assert east_core.size and west_core.size
    assert (ra[west_core] > 359).all() and (ra[east_core] < 1).all()
    assert (ra[east_all] > 359).any() and (ra[west_all] < 1).any()
    s = subtile_grid(tile)[2 * 4 + 1]
    assert s.extended.wraps


def test_partition_neighbouring_tiles_cover_every_source_once():
    """Across all tiles around a region, each source is a core source of exactly one sub-tile."""
    rng = np.random.default_rng(5)
    centre = mer_tile(EDFF_TILE)
    ra, dec = _sources_around(centre, 30_000, rng, half_deg=0.25)
    owners = np.unique(tile_id_at(ra, dec))
    assert owners.size > 1
    hits = np.zeros(ra.size, dtype=np.int64)
    for tid in owners:
        part = partition_sources(ra, dec, mer_tile(int(tid)))
        for r in range(4):
            for c in range(4):
                hits[part.subtile_members(r, c)[1]] += 1
    np.testing.assert_array_equal(hits, 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tile_id=st.integers(*valid_tile_id_range()),
    grid=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    margin_frac=st.floats(0.0, 0.49),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_property(tile_id, grid, margin_frac, seed):
    tile = mer_tile(tile_id)
    cell_arcmin = 32.0 / max(grid)
    margin = margin_frac * cell_arcmin
    rng = np.random.default_rng(seed)
    ra, dec = _sources_around(tile, 3000, rng, half_deg=0.3)
    part = partition_sources(ra, dec, tile, grid=grid, margin_arcmin=margin)
    hits = np.zeros(ra.size, dtype=np.int64)
    for r in range(grid[0]):
        for c in range(grid[1]):
            all_idx, core_idx = part.subtile_members(r, c)
            hits[core_idx] += 1
            assert np.isin(core_idx, all_idx).all()
    np.testing.assert_array_equal(hits, part.owned.astype(np.int64))
    assert not np.any(part.owned & ~part.in_grid)
    # Every source inside the grid is in exactly one core cell (owned or not).
    cells = part.core_row.astype(np.int64) * grid[1] + part.core_col
    assert np.all((cells >= 0) == part.in_grid)


def test_invalid_grid_and_margin():
    tile = mer_tile(EDFF_TILE)
    with pytest.raises(ValueError, match="half a sub-tile core"):
        subtile_grid(tile, margin_arcmin=4.0)
    with pytest.raises(ValueError, match="half a sub-tile core"):
        partition_sources([1.0], [1.0], tile, margin_arcmin=-1.0)
    with pytest.raises(ValueError, match="grid"):
        subtile_grid(tile, grid=(0, 4))
    with pytest.raises(ValueError, match="source index 1"):
        partition_sources([52.9, np.nan], [-28.0, -28.0], tile)
    part = partition_sources([52.98695], [-28.0], tile)
    with pytest.raises(IndexError, match="4x4"):
        part.subtile_members(4, 0)
    assert part.core_mask.tolist() == [True]
    assert tile_center_deg(EDFF_TILE)[0] == tile.ra_deg
