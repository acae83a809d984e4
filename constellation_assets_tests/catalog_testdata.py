"""Sub-tile result files with real tile geometry, for the catalog and quality tests.

Positions are drawn uniformly over a tile's extended square and assigned to sub-tiles with the sky
module (the same partitioning the pipeline uses), so margins, neighbour-owned sources and core
membership are real. Ellipticities are g_true + Gaussian shape noise with unit response, so the
ensemble shear of each sub-tile is an unbiased estimate of g_true with a known error.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from constellation_assets.catalog.schema import subtile_result_name, write_subtile_result
from constellation_assets.sky.subtiles import partition_sources, subtile_grid
from constellation_assets.sky.tiles import mer_tile, tangent_to_radec

SHAPE_NOISE = 0.25


def _rng(*ids) -> np.random.Generator:
    seed = int.from_bytes(hashlib.sha256(":".join(str(i) for i in ids).encode()).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(seed))


def tile_sources(
    tile_id: int, n_sources: int = 400, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(object_id, ra_deg, dec_deg) of sources over the tile's 32' extended square (plus 1' outside)."""
    tile = mer_tile(tile_id)
    rng = _rng("sources", tile_id, seed)
    half_deg = (tile.extended_arcmin / 2 + 1.0) / 60.0
    xi = rng.uniform(-half_deg, half_deg, n_sources)
    eta = rng.uniform(-half_deg, half_deg, n_sources)
    ra, dec = tangent_to_radec(xi, eta, tile.ra_deg, tile.dec_deg)
    object_id = np.int64(tile_id) * 1_000_000 + np.arange(n_sources, dtype=np.int64)
    return object_id, np.asarray(ra), np.asarray(dec)


def make_tile_results(
    outdir: str,
    tile_id: int,
    n_sources: int = 400,
    g_true: tuple[float, float] = (0.02, -0.01),
    run_id: str = "run-a",
    seed: int = 0,
    subtiles: list[tuple[int, int]] | None = None,
    storage_options: dict | None = None,
) -> list[str]:
    """Write the tile's 16 sub-tile result files (or only ``subtiles``) under ``outdir``; return their URIs."""
    tile = mer_tile(tile_id)
    object_id, ra, dec = tile_sources(tile_id, n_sources, seed)
    part = partition_sources(ra, dec, tile)
    uris = []
    for st in subtile_grid(tile):
        if subtiles is not None and (st.row, st.col) not in subtiles:
            continue
        all_idx, core_idx = part.subtile_members(st.row, st.col)
        n = all_idx.size
        rng = _rng("shapes", tile_id, st.row, st.col, seed, run_id)
        e1 = (g_true[0] + rng.normal(0, SHAPE_NOISE, n)).astype(np.float32)
        e2 = (g_true[1] + rng.normal(0, SHAPE_NOISE, n)).astype(np.float32)
        in_core = np.isin(all_idx, core_idx)
        table = pa.table(
            {
                "TILE_ID": np.full(n, tile_id, np.int64),
                "SUBTILE_ROW": np.full(n, st.row, np.int8),
                "SUBTILE_COL": np.full(n, st.col, np.int8),
                "OBJECT_ID": object_id[all_idx],
                "RA": ra[all_idx],
                "DEC": dec[all_idx],
                "E1": e1,
                "E2": e2,
                "R11": np.ones(n, np.float32),
                "R22": np.ones(n, np.float32),
                "WEIGHT": np.ones(n, np.float32),
                "SNR": np.full(n, 20.0, np.float32),
                "N_EXPOSURES": np.full(n, 4, np.int16),
                "FLAGS": np.zeros(n, np.int32),
                "IN_CORE": in_core,
            }
        )
        nc = int(in_core.sum())
        ra_c, dec_c = st.center_deg
        g1 = float(e1[in_core].mean()) if nc else float("nan")
        g2 = float(e2[in_core].mean()) if nc else float("nan")
        err = SHAPE_NOISE / np.sqrt(nc) if nc else float("nan")
        summary = {
            "G1": g1,
            "G2": g2,
            "G1_ERR": err,
            "G2_ERR": err,
            "N_SOURCES": nc,
            "METHOD": "test",
            "CONVERGENCE": 1.0,
            "RA": float(ra_c),
            "DEC": float(dec_c),
            "run_id": run_id,
            "config_hash": "cafe",
        }
        uri = f"{outdir.rstrip('/')}/{subtile_result_name(tile_id, st.row, st.col)}"
        uris.append(write_subtile_result(table, summary, uri, storage_options=storage_options))
    return uris


def core_count(tile_id: int, n_sources: int = 400, seed: int = 0) -> int:
    """Number of core sources the tile's results hold (what shear.sources must contain for it)."""
    object_id, ra, dec = tile_sources(tile_id, n_sources, seed)
    return int(partition_sources(ra, dec, mer_tile(tile_id)).core_mask.sum())
