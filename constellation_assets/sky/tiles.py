"""Euclid MER tile ring model: tile ids <-> sky positions, tile footprints, sky boxes, gnomonic projection.

The Euclid MER tiling is not HEALPix and no public tiling file exists. Tiles sit on rings of constant
declination 0.5 deg apart (ring ``k`` at ``dec = -90 + 0.5 k``, ``k = 0 .. 360``). Along a ring the RA step
is ``0.5 deg / cos(|dec| - 0.5 deg)``, the first tile of every ring sits at RA = 0 and a ring holds
``ceil(720 cos(|dec| - 0.5 deg))`` tiles (about 360 / step; the last tile is closer than a step to RA = 360).

Tile ids are ``102000000 + index``: ``index`` counts tiles ring by ring from the south pole, west to east
within a ring, plus a constant (:data:`INDEX_OFFSET` = -64). The ring-count rounding, the RA origin and the
offset were calibrated on published Q1 tiles, which all agree to better than 1e-4 deg: 102044185 ->
(52.9869, -28.0) (EDF-F), 102018211 -> (57.9991, -51.5) (EDF-S), 102158889 -> (267.3808, 65.5) (EDF-N, ESA
archive). EDF-F ids 102041031 .. 102047412 fall on Dec -30.5 .. -25.5 at RA ~52-54, and the ESA archive
footprints of 102020553 (contains RA 75, Dec -49) and 102024002 / 102024003 (both contain RA 76, Dec -45.4)
agree. The polar caps (|dec| >= 88.5 deg, ids below ~102000000) extrapolate the same formula: model ids,
not checked against real products.

Ownership: every sky position belongs to exactly one tile, :func:`tile_id_at`: the nearest ring in Dec, then
the nearest tile centre in RA along that ring. (Plain nearest-centre ownership would give cells reaching
18.75' from a tile centre in Dec where neighbouring rings are staggered, outside the 32' extended tile; ring-
first ownership keeps every owned position inside the tile's 30' core band in Dec and within half an RA step
in RA, hence inside the tile's sub-tile grid at every declination.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "INDEX_OFFSET",
    "N_RINGS",
    "RING_SPACING_DEG",
    "TILE_ID_BASE",
    "MerTile",
    "SkyBox",
    "mer_tile",
    "radec_to_tangent",
    "ring_dec_deg",
    "ring_tile_count",
    "tangent_square_bounds",
    "tangent_to_radec",
    "tile_center_deg",
    "tile_id_at",
    "tiles_overlapping",
    "valid_tile_id_range",
]

TILE_ID_BASE = 102_000_000
RING_SPACING_DEG = 0.5
N_RINGS = 361  # Dec -90, -89.5, ..., +90
#: index = (tiles in all rings south of the tile's ring) + position in ring + INDEX_OFFSET (calibrated on Q1).
INDEX_OFFSET = -64

_RING_DEC_DEG = -90.0 + RING_SPACING_DEG * np.arange(N_RINGS)
# RA step along each ring; cos is even so |dec| - 0.5 needs no clipping at the equator.
_RING_STEP_DEG = RING_SPACING_DEG / np.cos(np.radians(np.abs(_RING_DEC_DEG) - RING_SPACING_DEG))
# ceil(720 cos(|dec| - 0.5 deg)) as the Euclid tiling evaluates it in float64: at |dec| = 60.5 deg,
# 720 cos(60 deg) rounds to 360.00000000000006, so those two rings hold 361 tiles (confirmed by tile
# 102158889 at RA 267.3808, Dec 65.5). Pinned explicitly so no libm can round it the other way.
_RING_COUNT = np.ceil(720.0 * np.cos(np.radians(np.abs(_RING_DEC_DEG) - RING_SPACING_DEG)) - 1e-9).astype(
    np.int64
)
_RING_COUNT[np.abs(_RING_DEC_DEG) == 60.5] = 361
_RING_START_INDEX = np.concatenate([[0], np.cumsum(_RING_COUNT)]) + INDEX_OFFSET  # length N_RINGS + 1


def ring_dec_deg(ring: int) -> float:
    return float(_RING_DEC_DEG[ring])


def ring_tile_count(ring: int) -> int:
    return int(_RING_COUNT[ring])


def valid_tile_id_range() -> tuple[int, int]:
    """Inclusive (first, last) tile id of the ring model."""
    return TILE_ID_BASE + int(_RING_START_INDEX[0]), TILE_ID_BASE + int(_RING_START_INDEX[-1]) - 1


def _wrap_ra(ra_deg) -> np.ndarray:
    """RA modulo 360 in [0, 360) (np.mod maps tiny negative values to exactly 360.0)."""
    ra = np.mod(np.asarray(ra_deg, dtype=np.float64), 360.0)
    return np.where(ra >= 360.0, 0.0, ra)


def _as_scalar_or_array(x: np.ndarray, like) -> float | np.ndarray:
    return float(x) if np.ndim(like) == 0 else x


def tile_center_deg(tile_id) -> tuple:
    """Centre (ra_deg, dec_deg) of a MER tile from the ring model. Scalars in, floats out; arrays vectorise."""
    ids = np.asarray(tile_id)
    if ids.dtype.kind not in "iu":
        if ids.dtype.kind == "f" and np.all(np.isfinite(ids)) and np.all(ids == np.round(ids)):
            ids = ids.astype(np.int64)
        else:
            raise ValueError(f"tile id must be an integer, got {tile_id!r}")
    idx = ids.astype(np.int64) - TILE_ID_BASE
    lo, hi = valid_tile_id_range()
    bad = (idx < _RING_START_INDEX[0]) | (idx >= _RING_START_INDEX[-1])
    if np.any(bad):
        first_bad = int(np.atleast_1d(ids)[np.atleast_1d(bad)][0])
        raise ValueError(
            f"tile id {first_bad} is outside the Euclid MER ring model ({lo} .. {hi}); "
            "check the tile id (9 digits, e.g. 102044185 in EDF-F)"
        )
    ring = np.searchsorted(_RING_START_INDEX, idx, side="right") - 1
    pos = idx - _RING_START_INDEX[ring]
    ra = pos * _RING_STEP_DEG[ring]
    dec = _RING_DEC_DEG[ring]
    return _as_scalar_or_array(ra, ids), _as_scalar_or_array(dec, ids)


def tile_id_at(ra_deg, dec_deg):
    """The tile owning each sky position (unique ownership; see the module docstring).

    Ring: nearest in Dec (a position exactly half way between two rings goes to the northern one).
    Within the ring: nearest centre in RA, including across RA = 0/360 (exact ties go to the lower RA side).
    Vectorised; scalars in give an int out. Dec must be within [-90, 90].
    """
    ra = _wrap_ra(ra_deg)
    dec = np.asarray(dec_deg, dtype=np.float64)
    if np.any(~np.isfinite(ra)) or np.any(~np.isfinite(dec)) or np.any(np.abs(dec) > 90.0):
        raise ValueError("tile_id_at needs finite RA and Dec with |Dec| <= 90 deg")
    ring = np.clip(np.floor((dec + 90.0) / RING_SPACING_DEG + 0.5).astype(np.int64), 0, N_RINGS - 1)
    step = _RING_STEP_DEG[ring]
    count = _RING_COUNT[ring]
    p_lo = np.minimum(np.floor(ra / step).astype(np.int64), count - 1)  # ra just below 360 may round up
    d_lo = ra - p_lo * step
    # The next centre east is p_lo + 1, or RA 360 (tile 0) after the last tile of the ring.
    ra_hi = np.minimum((p_lo + 1) * step, 360.0)
    take_hi = (ra_hi - ra) < d_lo
    pos = np.where(take_hi, p_lo + 1, p_lo)
    pos = np.where(pos >= count, 0, pos)
    ids = TILE_ID_BASE + _RING_START_INDEX[ring] + pos
    return int(ids) if np.ndim(ids) == 0 else ids


# --------------------------------------------------------------------------------------------- gnomonic


def radec_to_tangent(ra_deg, dec_deg, ra0_deg, dec0_deg):
    """Gnomonic (TAN) projection about (ra0, dec0): standard coordinates (xi_deg, eta_deg).

    xi grows towards east (increasing RA), eta towards north. Points 90 deg or more from the tangent point
    have no projection and give NaN. Vectorised; the tangent point may be an array too (broadcasts).
    """
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    ra0 = np.radians(np.asarray(ra0_deg, dtype=np.float64))
    dec0 = np.radians(np.asarray(dec0_deg, dtype=np.float64))
    sin_d0, cos_d0 = np.sin(dec0), np.cos(dec0)
    dra = ra - ra0
    cos_dra = np.cos(dra)
    sin_dec = np.sin(dec)
    cos_dec = np.cos(dec)
    cos_c = sin_d0 * sin_dec + cos_d0 * cos_dec * cos_dra
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(cos_c > 0.0, 1.0 / cos_c, np.nan)
        xi = np.degrees(cos_dec * np.sin(dra) * inv)
        eta = np.degrees((cos_d0 * sin_dec - sin_d0 * cos_dec * cos_dra) * inv)
    if np.ndim(xi) == 0:
        return float(xi), float(eta)
    return xi, eta


def tangent_to_radec(xi_deg, eta_deg, ra0_deg, dec0_deg):
    """Inverse gnomonic projection: (xi_deg, eta_deg) about (ra0, dec0) -> (ra_deg in [0, 360), dec_deg)."""
    xi = np.radians(np.asarray(xi_deg, dtype=np.float64))
    eta = np.radians(np.asarray(eta_deg, dtype=np.float64))
    ra0 = np.radians(np.asarray(ra0_deg, dtype=np.float64))
    dec0 = np.radians(np.asarray(dec0_deg, dtype=np.float64))
    sin_d0, cos_d0 = np.sin(dec0), np.cos(dec0)
    denom = cos_d0 - eta * sin_d0
    ra = np.degrees(ra0 + np.arctan2(xi, denom)) % 360.0
    dec = np.degrees(np.arctan2(sin_d0 + eta * cos_d0, np.hypot(xi, denom)))
    # Float rounding can map 359.9999999999 to exactly 360.0 after the modulo.
    ra = np.where(ra >= 360.0, 0.0, ra)
    if np.ndim(ra) == 0:
        return float(ra), float(dec)
    return ra, dec


# ---------------------------------------------------------------------------------------------- SkyBox


@dataclass(frozen=True)
class SkyBox:
    """An RA/Dec box in degrees. ``ra_min > ra_max`` means the box crosses RA = 0/360.

    Bounds are inclusive. The full RA circle is ``ra_min = 0, ra_max = 360`` (boxes around a pole).
    """

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float

    def __post_init__(self):
        vals = (self.ra_min, self.ra_max, self.dec_min, self.dec_max)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"SkyBox bounds must be finite, got {vals}")
        if not (-90.0 <= self.dec_min <= self.dec_max <= 90.0):
            raise ValueError(
                f"SkyBox needs -90 <= dec_min <= dec_max <= 90, got {self.dec_min}, {self.dec_max}"
            )
        if not (0.0 <= self.ra_min <= 360.0 and 0.0 <= self.ra_max <= 360.0):
            raise ValueError(f"SkyBox RA bounds must be in [0, 360], got {self.ra_min}, {self.ra_max}")

    @property
    def wraps(self) -> bool:
        return self.ra_min > self.ra_max

    @property
    def ra_width_deg(self) -> float:
        return (self.ra_max - self.ra_min) % 360.0 if self.wraps else self.ra_max - self.ra_min

    def contains(self, ra_deg, dec_deg):
        """Vectorised inclusive containment test (RA taken modulo 360)."""
        ra = _wrap_ra(ra_deg)
        dec = np.asarray(dec_deg, dtype=np.float64)
        in_dec = (dec >= self.dec_min) & (dec <= self.dec_max)
        if self.wraps:
            in_ra = (ra >= self.ra_min) | (ra <= self.ra_max)
        else:
            in_ra = (ra >= self.ra_min) & (ra <= self.ra_max)
            if self.ra_max >= 360.0:
                in_ra |= ra == 0.0  # 360 == 0
        out = in_ra & in_dec
        return bool(out) if np.ndim(out) == 0 else out

    def overlaps(self, other: SkyBox) -> bool:
        if self.dec_max < other.dec_min or other.dec_max < self.dec_min:
            return False
        return _ra_arcs_overlap(self.ra_min, self.ra_width_deg, other.ra_min, other.ra_width_deg)

    def to_dict(self) -> dict[str, float]:
        return {
            "ra_min": float(self.ra_min),
            "ra_max": float(self.ra_max),
            "dec_min": float(self.dec_min),
            "dec_max": float(self.dec_max),
        }


def _ra_arcs_overlap(start_a, width_a, start_b, width_b):
    """Whether RA arcs [start, start + width] (deg, on the circle) intersect. Vectorised."""
    return (np.mod(np.asarray(start_b) - start_a, 360.0) <= width_a) | (
        np.mod(np.asarray(start_a) - start_b, 360.0) <= width_b
    )


def tangent_square_bounds(ra0_deg, dec0_deg, xi_min, xi_max, eta_min, eta_max):
    """Exact RA/Dec bounding box of the tangent-plane rectangle [xi_min, xi_max] x [eta_min, eta_max] (deg)
    about (ra0, dec0). Vectorised (broadcasts); returns arrays (ra_min, ra_max, dec_min, dec_max), RA in
    [0, 360], ``ra_min > ra_max`` when the box crosses RA = 0/360, and the full circle 0..360 when the
    rectangle contains a pole (or reaches past it).

    Exact, not sampled: along every edge RA is monotonic (extremes at corners); along eta = const edges
    sin(dec) = (sin d0 + eta cos d0) / sqrt(1 + xi^2 + eta^2) peaks at xi = 0; along xi = const edges it has
    one stationary point, eta* = cot(d0) (1 + xi^2). Those candidates are evaluated when on the edge.
    """
    ra0, dec0, x0, x1, y0, y1 = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (ra0_deg, dec0_deg, xi_min, xi_max, eta_min, eta_max))
    )
    d0 = np.radians(dec0)
    sin_d0, cos_d0 = np.sin(d0), np.cos(d0)
    x0r, x1r, y0r, y1r = (np.radians(v) for v in (x0, x1, y0, y1))
    with np.errstate(divide="ignore", invalid="ignore"):
        stat0 = np.clip(np.nan_to_num(cos_d0 * (1.0 + x0r**2) / sin_d0, nan=0.0), y0r, y1r)
        stat1 = np.clip(np.nan_to_num(cos_d0 * (1.0 + x1r**2) / sin_d0, nan=0.0), y0r, y1r)
    mid_x = np.clip(0.0, x0r, x1r)
    # Candidates: 4 corners, then the two eta-edge midpoints (xi = 0), then the two xi-edge stationary points.
    xs = np.stack([x0r, x1r, x0r, x1r, mid_x, mid_x, x0r, x1r])
    ys = np.stack([y0r, y0r, y1r, y1r, y0r, y1r, stat0, stat1])
    denom = cos_d0 - ys * sin_d0
    dec = np.degrees(np.arctan2(sin_d0 + ys * cos_d0, np.hypot(xs, denom)))
    dra = np.degrees(np.arctan2(xs[:4], denom[:4]))  # offsets from ra0 at the corners, in (-180, 180]
    dec_min = dec.min(axis=0)
    dec_max = dec.max(axis=0)
    dra_min = dra.min(axis=0)
    dra_max = dra.max(axis=0)
    # The north pole projects to (0, cot d0), the south pole to (0, -cot d0).
    with np.errstate(divide="ignore", invalid="ignore"):
        cot = np.degrees(cos_d0 / sin_d0)
    spans_xi0 = (x0 <= 0.0) & (x1 >= 0.0)
    has_pole_n = (sin_d0 > 0) & spans_xi0 & (y0 <= cot) & (y1 >= cot)
    has_pole_s = (sin_d0 < 0) & spans_xi0 & (y0 <= cot) & (y1 >= cot)
    past_pole = np.any(denom[:4] <= 0.0, axis=0)  # a corner beyond the pole: RA no longer monotonic
    dec_max = np.where(has_pole_n, 90.0, dec_max)
    dec_min = np.where(has_pole_s, -90.0, dec_min)
    full = has_pole_n | has_pole_s | past_pole
    ra_min = np.where(full, 0.0, np.mod(ra0 + dra_min, 360.0))
    ra_max = np.where(full, 360.0, np.mod(ra0 + dra_max, 360.0))
    return ra_min, ra_max, np.clip(dec_min, -90.0, 90.0), np.clip(dec_max, -90.0, 90.0)


def _box_from_bounds(ra_min, ra_max, dec_min, dec_max) -> SkyBox:
    return SkyBox(float(ra_min), float(ra_max), float(dec_min), float(dec_max))


# ---------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class MerTile:
    """A MER tile: centre and the RA/Dec bounding boxes of its core and extended tangent-plane squares."""

    tile_id: int
    ra_deg: float
    dec_deg: float
    core: SkyBox
    extended: SkyBox
    core_arcmin: float = 30.0
    extended_arcmin: float = 32.0

    def to_dict(self) -> dict:
        return {
            "tile_id": int(self.tile_id),
            "ra_deg": float(self.ra_deg),
            "dec_deg": float(self.dec_deg),
            "core": self.core.to_dict(),
            "extended": self.extended.to_dict(),
            "core_arcmin": float(self.core_arcmin),
            "extended_arcmin": float(self.extended_arcmin),
        }


def mer_tile(tile_id: int, core_arcmin: float = 30.0, extended_arcmin: float = 32.0) -> MerTile:
    """MER tile footprint from the ring model: squares of side ``core_arcmin`` / ``extended_arcmin`` in the
    tangent plane at the tile centre, reported as RA/Dec bounding boxes."""
    if not (0.0 < core_arcmin <= extended_arcmin):
        raise ValueError(
            f"need 0 < core_arcmin <= extended_arcmin, got core={core_arcmin}, extended={extended_arcmin}"
        )
    ra, dec = tile_center_deg(int(tile_id))
    boxes = []
    for side in (core_arcmin, extended_arcmin):
        h = side / 120.0
        boxes.append(_box_from_bounds(*tangent_square_bounds(ra, dec, -h, h, -h, h)))
    return MerTile(int(tile_id), ra, dec, boxes[0], boxes[1], float(core_arcmin), float(extended_arcmin))


def _query_box(ra_min: float, ra_max: float, dec_min: float, dec_max: float) -> SkyBox:
    ra_min, ra_max = float(ra_min), float(ra_max)
    if ra_max - ra_min >= 360.0:
        return SkyBox(0.0, 360.0, float(dec_min), float(dec_max))
    lo = ra_min % 360.0
    hi = ra_max % 360.0 if ra_max % 360.0 != 0.0 or ra_max == 0.0 else 360.0
    return SkyBox(lo, hi, float(dec_min), float(dec_max))


def tiles_overlapping(
    ra_min: float, ra_max: float, dec_min: float, dec_max: float, extended_arcmin: float = 32.0
) -> list[int]:
    """Sorted ids of tiles whose extended box (RA/Dec bounding box) overlaps the query box.

    The query box follows :class:`SkyBox` conventions (``ra_min > ra_max`` crosses RA = 0/360).
    """
    query = _query_box(ra_min, ra_max, dec_min, dec_max)
    # Rings whose tiles can reach the query in Dec: the extended half-size plus slack for bounding boxes.
    reach = extended_arcmin / 120.0 * 1.5 + 1e-6
    rings = np.nonzero((_RING_DEC_DEG + reach >= query.dec_min) & (_RING_DEC_DEG - reach <= query.dec_max))[0]
    if rings.size == 0:
        return []
    ring_of = np.repeat(rings, _RING_COUNT[rings])
    starts = np.concatenate([[0], np.cumsum(_RING_COUNT[rings])[:-1]])
    pos = np.arange(ring_of.size) - np.repeat(starts, _RING_COUNT[rings])
    ra_c = pos * _RING_STEP_DEG[ring_of]
    dec_c = _RING_DEC_DEG[ring_of]
    h = extended_arcmin / 120.0
    b_ra_min, b_ra_max, b_dec_min, b_dec_max = tangent_square_bounds(ra_c, dec_c, -h, h, -h, h)
    width = np.where(b_ra_min > b_ra_max, np.mod(b_ra_max - b_ra_min, 360.0), b_ra_max - b_ra_min)
    hit = (b_dec_max >= query.dec_min) & (b_dec_min <= query.dec_max)
    hit &= _ra_arcs_overlap(b_ra_min, width, query.ra_min, query.ra_width_deg)
    ids = TILE_ID_BASE + _RING_START_INDEX[ring_of[hit]] + pos[hit]
    return sorted(int(i) for i in ids)
