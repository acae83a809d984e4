"""Sky geometry: Euclid MER tile ring model, sub-tile grids, source partitioning."""

from constellation_assets.sky.subtiles import SourcePartition, SubTile, partition_sources, subtile_grid
from constellation_assets.sky.tiles import (
    MerTile,
    SkyBox,
    mer_tile,
    radec_to_tangent,
    tangent_to_radec,
    tile_center_deg,
    tile_id_at,
    tiles_overlapping,
)

__all__ = [
    "MerTile",
    "SkyBox",
    "SourcePartition",
    "SubTile",
    "mer_tile",
    "partition_sources",
    "radec_to_tangent",
    "subtile_grid",
    "tangent_to_radec",
    "tile_center_deg",
    "tile_id_at",
    "tiles_overlapping",
]
