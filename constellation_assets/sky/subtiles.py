"""Sub-tile grid of a MER tile and vectorised source partitioning.

The grid lives in the tile's tangent plane (gnomonic projection about the tile centre, standard coordinates
xi towards east = increasing RA, eta towards north), so it is correct at any declination, across RA = 0/360
and next to the poles. It covers the tile's extended square (32' by default): a ``rows x cols`` grid of cores
of ``extended / rows`` by ``extended / cols`` (8' x 8' for 32' / 4), each with a margin on every side
(1' by default: 10' x 10' extended boxes that overlap their neighbours by exactly 2 x margin).

Indexing: ``row`` counts eta bands from the south (row 0 at eta = -extended/2), ``col`` counts xi bands from
the west, low-RA side (col 0 at xi = -extended/2). Core cells are half-open, [lo, hi) in xi and eta, so every
position inside the grid lies in exactly one core.

Ownership across neighbouring tiles comes from :func:`constellation_assets.sky.tiles.tile_id_at`; every
position owned by a tile lies inside that tile's grid, so the owned sources of all tiles fill every sub-tile
core exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from constellation_assets.sky.tiles import (
    MerTile,
    SkyBox,
    radec_to_tangent,
    tangent_square_bounds,
    tangent_to_radec,
    tile_id_at,
)

__all__ = [
    "SourcePartition",
    "SubTile",
    "partition_sources",
    "subtile_grid",
]


@dataclass(frozen=True)
class SubTile:
    """One sub-tile. ``core`` / ``extended`` are the RA/Dec bounding boxes of its tangent-plane squares (for
    manifests and catalog queries); the exact cells are ``core_tangent_deg`` / ``extended_tangent_deg``
    (xi_min, xi_max, eta_min, eta_max) in the plane of the tile centre (``tile_ra_deg``, ``tile_dec_deg``)."""

    tile_id: int
    row: int
    col: int
    core: SkyBox
    extended: SkyBox
    tile_ra_deg: float = 0.0
    tile_dec_deg: float = 0.0
    core_tangent_deg: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    extended_tangent_deg: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def name(self) -> str:
        """``{TILE}_{ROW}_{COL}``, the stem of the sub-tile's manifest and result files."""
        return f"{self.tile_id}_{self.row}_{self.col}"

    @property
    def center_deg(self) -> tuple[float, float]:
        x0, x1, y0, y1 = self.core_tangent_deg
        return tangent_to_radec(0.5 * (x0 + x1), 0.5 * (y0 + y1), self.tile_ra_deg, self.tile_dec_deg)

    def sky_bounds(self) -> dict[str, dict[str, float]]:
        """The manifest's ``sky_bounds`` section: ``{"core": {...}, "extended": {...}}``."""
        return {"core": self.core.to_dict(), "extended": self.extended.to_dict()}


def _grid_geometry(
    tile: MerTile, grid: tuple[int, int], margin_arcmin: float
) -> tuple[int, int, float, float, float]:
    """(rows, cols, cell_eta_deg, cell_xi_deg, margin_deg), validated."""
    try:
        rows, cols = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be two integers (rows, cols), got {grid!r}") from None
    if not (1 <= rows <= 127 and 1 <= cols <= 127):
        raise ValueError(f"grid must be two integers in 1..127 (rows, cols), got {grid!r}")
    ext_deg = tile.extended_arcmin / 60.0
    cell_eta = ext_deg / rows
    cell_xi = ext_deg / cols
    margin_deg = float(margin_arcmin) / 60.0
    if not (math.isfinite(margin_deg) and 0.0 <= margin_deg < 0.5 * min(cell_eta, cell_xi)):
        raise ValueError(
            f"margin_arcmin={margin_arcmin} must be >= 0 and smaller than half a sub-tile core "
            f"({0.5 * min(cell_eta, cell_xi) * 60.0:.4g}'); use a smaller margin or a coarser grid"
        )
    return rows, cols, cell_eta, cell_xi, margin_deg


def subtile_grid(tile: MerTile, grid: tuple[int, int] = (4, 4), margin_arcmin: float = 1.0) -> list[SubTile]:
    """The tile's sub-tiles in row-major order (row 0 = south, col 0 = west/low RA); see the module docstring."""
    rows, cols, cell_eta, cell_xi, m = _grid_geometry(tile, grid, margin_arcmin)
    half = tile.extended_arcmin / 120.0
    r_idx, c_idx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r_idx, c_idx = r_idx.ravel(), c_idx.ravel()
    xi0 = -half + c_idx * cell_xi
    xi1 = -half + (c_idx + 1) * cell_xi
    eta0 = -half + r_idx * cell_eta
    eta1 = -half + (r_idx + 1) * cell_eta
    core_b = tangent_square_bounds(tile.ra_deg, tile.dec_deg, xi0, xi1, eta0, eta1)
    ext_b = tangent_square_bounds(tile.ra_deg, tile.dec_deg, xi0 - m, xi1 + m, eta0 - m, eta1 + m)
    out = []
    for i in range(r_idx.size):
        out.append(
            SubTile(
                tile_id=tile.tile_id,
                row=int(r_idx[i]),
                col=int(c_idx[i]),
                core=SkyBox(*(float(b[i]) for b in core_b)),
                extended=SkyBox(*(float(b[i]) for b in ext_b)),
                tile_ra_deg=tile.ra_deg,
                tile_dec_deg=tile.dec_deg,
                core_tangent_deg=(float(xi0[i]), float(xi1[i]), float(eta0[i]), float(eta1[i])),
                extended_tangent_deg=(
                    float(xi0[i] - m),
                    float(xi1[i] + m),
                    float(eta0[i] - m),
                    float(eta1[i] + m),
                ),
            )
        )
    return out


@dataclass
class SourcePartition:
    """Per-source sub-tile assignment for one tile (arrays have one entry per input source).

    ``core_row`` / ``core_col`` (int8): the core cell containing the source, -1 outside the tile's grid.
    ``owned`` (bool): the tile owns the position (``tile_id_at(ra, dec) == tile_id``).
    ``xi_deg`` / ``eta_deg``: tangent-plane coordinates about the tile centre (NaN on the far hemisphere).
    """

    tile_id: int
    grid: tuple[int, int]
    margin_arcmin: float
    core_row: np.ndarray
    core_col: np.ndarray
    owned: np.ndarray
    xi_deg: np.ndarray
    eta_deg: np.ndarray
    _member_idx: np.ndarray = field(repr=False)
    _member_start: np.ndarray = field(repr=False)

    @property
    def n_sources(self) -> int:
        return int(self.owned.size)

    @property
    def in_grid(self) -> np.ndarray:
        return self.core_row >= 0

    @property
    def core_mask(self) -> np.ndarray:
        """Sources this tile is responsible for: owned and inside a core (the same set, by construction)."""
        return self.owned & self.in_grid

    def assignment_columns(self) -> dict[str, np.ndarray]:
        """Per-source columns for a sources table: SUBTILE_ROW / SUBTILE_COL (int8, -1 outside the grid),
        OWNED (bool), IN_CORE (bool: owned and inside a core; the sources this tile reports)."""
        return {
            "SUBTILE_ROW": self.core_row,
            "SUBTILE_COL": self.core_col,
            "OWNED": self.owned,
            "IN_CORE": self.core_mask,
        }

    def _check(self, row: int, col: int) -> int:
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(
                f"sub-tile ({row}, {col}) is outside the {rows}x{cols} grid of tile {self.tile_id}"
            )
        return row * cols + col

    def subtile_members(self, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
        """(all_idx, core_idx), ascending source indices (int64).

        all_idx: every source inside the sub-tile's extended box (core + margin), whichever tile owns it:
        the inference sees all of them. core_idx: the owned sources inside its core, the ones it reports.
        """
        k = self._check(row, col)
        all_idx = self._member_idx[self._member_start[k] : self._member_start[k + 1]]
        in_core = (self.core_row[all_idx] == row) & (self.core_col[all_idx] == col) & self.owned[all_idx]
        return all_idx, all_idx[in_core]

    def margin_members(self, row: int, col: int) -> np.ndarray:
        """Sources the sub-tile sees but does not report: all_idx minus core_idx (margin sources, and sources
        in the core area owned by a neighbouring tile)."""
        all_idx, core_idx = self.subtile_members(row, col)
        return np.setdiff1d(all_idx, core_idx, assume_unique=True)

    def core_counts(self) -> np.ndarray:
        """(rows, cols) int64 counts of owned sources per core."""
        rows, cols = self.grid
        m = self.core_mask
        flat = self.core_row[m].astype(np.int64) * cols + self.core_col[m]
        return np.bincount(flat, minlength=rows * cols).reshape(rows, cols)

    def extended_counts(self) -> np.ndarray:
        """(rows, cols) int64 counts of all sources per extended box."""
        rows, cols = self.grid
        return np.diff(self._member_start).reshape(rows, cols)


def _band_index(coord: np.ndarray, lo: float, cell: float, n: int, margin: float):
    """Core band (or -1) and the range [first, last] of bands whose extended interval contains coord.

    Extended interval of band c: [lo + c cell - margin, lo + (c + 1) cell + margin). Because
    margin < cell / 2 the range holds at most two bands.
    """
    u = (coord - lo) / cell
    core = np.floor(u)
    first = np.floor(u - margin / cell)
    last = np.floor(u + margin / cell)
    with np.errstate(invalid="ignore"):
        core = np.where((core >= 0) & (core < n), core, -1)
    return core, np.maximum(first, 0), np.minimum(last, n - 1)


def partition_sources(
    ra_deg,
    dec_deg,
    tile: MerTile,
    grid: tuple[int, int] = (4, 4),
    margin_arcmin: float = 1.0,
) -> SourcePartition:
    """Assign catalog sources to the tile's sub-tile cores and extended boxes (vectorised numpy).

    Every owned source inside the grid is in exactly one core; ``subtile_members`` lists each sub-tile's
    sources (extended box) and core sources.
    """
    rows, cols, cell_eta, cell_xi, m = _grid_geometry(tile, grid, margin_arcmin)
    ra = np.asarray(ra_deg, dtype=np.float64).ravel()
    dec = np.asarray(dec_deg, dtype=np.float64).ravel()
    if ra.shape != dec.shape:
        raise ValueError(f"ra and dec must have the same length, got {ra.size} and {dec.size}")
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        bad = int(np.nonzero(~(np.isfinite(ra) & np.isfinite(dec)))[0][0])
        raise ValueError(
            f"non-finite RA/Dec for source index {bad}; drop or fix such rows before partitioning"
        )
    half = tile.extended_arcmin / 120.0
    xi, eta = radec_to_tangent(ra, dec, tile.ra_deg, tile.dec_deg)
    xi = np.atleast_1d(xi)
    eta = np.atleast_1d(eta)
    ccol, c_first, c_last = _band_index(xi, -half, cell_xi, cols, m)
    crow, r_first, r_last = _band_index(eta, -half, cell_eta, rows, m)
    outside = (ccol < 0) | (crow < 0)
    core_row = np.where(outside, -1, crow).astype(np.int8)
    core_col = np.where(outside, -1, ccol).astype(np.int8)
    owned = np.asarray(tile_id_at(ra, dec)) == tile.tile_id

    # Extended membership: each source sits in at most 2 x 2 extended boxes; emit (sub-tile key, index)
    # pairs for each of the four candidates and group by key with one sort.
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(xi) & np.isfinite(eta) & (c_first <= c_last) & (r_first <= r_last)
    idx_all = np.nonzero(valid)[0]
    cf, cl = c_first[idx_all].astype(np.int64), c_last[idx_all].astype(np.int64)
    rf, rl = r_first[idx_all].astype(np.int64), r_last[idx_all].astype(np.int64)
    keys, idxs = [], []
    for dr in (0, 1):
        for dc in (0, 1):
            r = rf + dr
            c = cf + dc
            sel = (r <= rl) & (c <= cl)
            keys.append(r[sel] * cols + c[sel])
            idxs.append(idx_all[sel])
    key = np.concatenate(keys)
    idx = np.concatenate(idxs)
    # Sorting key * n + idx gives members grouped by sub-tile and ascending within each.
    order = np.argsort(key * max(ra.size, 1) + idx, kind="stable")
    key = key[order]
    idx = idx[order]
    start = np.searchsorted(key, np.arange(rows * cols + 1), side="left")
    return SourcePartition(
        tile_id=tile.tile_id,
        grid=(rows, cols),
        margin_arcmin=float(margin_arcmin),
        core_row=core_row,
        core_col=core_col,
        owned=owned,
        xi_deg=xi,
        eta_deg=eta,
        _member_idx=idx,
        _member_start=start,
    )
