"""Small synthetic Q1 fields for the field / Q1 discovery / prepare tests (seconds to generate)."""

from __future__ import annotations

from constellation_assets.config import load_config

TILE = 102044185

#: A reduced focal plane: 1 x 2 CCDs (8 quadrants) of 200 x 206 pixels, 2 dithers, modest density.
SMALL_FIELD = {
    "tile_ids": [TILE],
    "ccd_grid": [1, 2],
    "quadrant_nx_pix": 200,
    "quadrant_ny_pix": 206,
    "ccd_gap_pix": [20, 40],
    "n_dithers": 2,
    "dither_offsets_arcsec": [[0.0, 0.0], [6.0, 9.0]],
    "galaxy_density_arcmin2": 40.0,
    "star_density_arcmin2": 4.0,
}


def small_config(root, field: dict | None = None, **sections):
    """A PipelineConfig writing a small field under ``root`` (local path or s3:// URI)."""
    root = str(root).rstrip("/")
    d = {
        "data": {
            "vis_base_uri": f"{root}/q1/VIS",
            "catalog_base_uri": f"{root}/q1/catalogs/MER_FINAL_CATALOG",
        },
        "output": {"root_uri": f"{root}/out"},
        "field": {**SMALL_FIELD, **(field or {})},
    }
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return load_config(d)
