"""Throughput of sub-tile source partitioning (sources per second).

Usage: python benchmarks/bench_partition.py [--sizes 100000 1000000] [--repeat 3] [--tile 102044185]

Sources are uniform over a 0.7 deg x 0.7 deg tangent-plane square around the tile (the tile's 32' grid plus
neighbours' overlap), as in a MER catalog read with margins. Reports the best of ``--repeat`` runs for
``partition_sources`` alone and with the 16 per-sub-tile member lists a manifest writer asks for.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from constellation_assets.sky.subtiles import partition_sources
from constellation_assets.sky.tiles import mer_tile, tangent_to_radec


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tile", type=int, default=102044185)
    args = ap.parse_args()

    tile = mer_tile(args.tile)
    rng = np.random.default_rng(0)
    print(f"tile {tile.tile_id} at ({tile.ra_deg:.4f}, {tile.dec_deg:.2f}), grid 4x4, margin 1'")
    print(
        f"{'sources':>10} | {'partition [s]':>13} | {'sources/s':>12} | {'+ members [s]':>13} | {'sources/s':>12}"
    )
    print("-" * 72)
    for n in args.sizes:
        xi = rng.uniform(-0.35, 0.35, n)
        eta = rng.uniform(-0.35, 0.35, n)
        ra, dec = tangent_to_radec(xi, eta, tile.ra_deg, tile.dec_deg)
        t_part = _best(lambda ra=ra, dec=dec: partition_sources(ra, dec, tile), args.repeat)

        def with_members(ra=ra, dec=dec):
            part = partition_sources(ra, dec, tile)
            for r in range(4):
                for c in range(4):
                    part.subtile_members(r, c)

        t_all = _best(with_members, args.repeat)
        print(f"{n:>10,} | {t_part:>13.4f} | {n / t_part:>12,.0f} | {t_all:>13.4f} | {n / t_all:>12,.0f}")


if __name__ == "__main__":
    main()
