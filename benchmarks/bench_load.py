"""Load benchmark: a few hundred sub-tiles through the local pipeline with parallel workers.

    python benchmarks/bench_load.py --tiles 4 --grid 8 8 --workers 2 [--density 20] [--quadrant-pix 256]
                                    [--root DIR] [--json]

Synthetic field (``--tiles`` EDF-F tiles, generated if absent) -> prepare (``--grid`` sub-tiles per tile)
-> ``infer_many`` in ``--workers`` spawned processes -> assembly into the SQLite/local Iceberg catalog. The
same stage functions as ``constellation run --local`` (:func:`constellation_assets.pipeline.run_local`) are
called one by one so that row counts can be reconciled at every step:

    MER catalog selection (prepare: shear-grade sources inside the tile's sub-tile cores)
      == IN_CORE rows of the sub-tile results == rows of shear.sources in Iceberg

with no duplicate OBJECT_ID. Peak memory: the largest peak RSS of any worker's sub-tile (VmHWM) and the
peak RSS of this driver process. Exit status 1 when the counts do not reconcile.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

EDFF_TILES = [102044185, 102044186, 102044187, 102044188, 102044189, 102044190, 102044191, 102044192]


def _config(
    root: Path,
    tiles: list[int],
    grid: tuple[int, int],
    workers: int,
    density: float = 20.0,
    quadrant_pix: int = 256,
):
    from constellation_assets.config import load_config

    core = 32.0 / max(grid)
    return load_config(
        {
            "field_name": "LOAD",
            "tile_ids": tiles,
            "data": {
                "vis_base_uri": str(root / "data" / "q1" / "VIS"),
                "catalog_base_uri": str(root / "data" / "q1" / "catalogs" / "MER_FINAL_CATALOG"),
            },
            "output": {"root_uri": str(root / "output")},
            "tiling": {"sub_tile_grid": list(grid), "sub_tile_margin_arcmin": min(1.0, core / 4)},
            "compute": {"workers": workers, "device": "cpu", "batch_size": 512, "torch_threads": 1},
            "shear": {"stamp_size_pix": 32},
            "field": {
                "tile_ids": tiles,
                "n_dithers": 2,
                "ccd_grid": [2, 2],
                "quadrant_nx_pix": quadrant_pix,
                "quadrant_ny_pix": quadrant_pix + 2,
                "galaxy_density_arcmin2": density,
                "star_density_arcmin2": 1.0,
                "pointing_jitter_arcsec": 0.0,
            },
        }
    )


def run(
    root: Path,
    n_tiles: int,
    grid: tuple[int, int],
    workers: int,
    density: float = 20.0,
    quadrant_pix: int = 256,
) -> dict:
    import pyarrow.compute as pc

    from constellation_assets.catalog.assemble import assemble_results
    from constellation_assets.catalog.query import scan_sources
    from constellation_assets.catalog.tables import open_catalog
    from constellation_assets.pipeline import infer_many
    from constellation_assets.prepare import prepare
    from constellation_assets.synthetic import simulate_field

    tiles = EDFF_TILES[:n_tiles]
    cfg = _config(root, tiles, grid, workers, density, quadrant_pix)
    seconds = {}
    t0 = time.perf_counter()
    simulate_field(cfg)
    seconds["field"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prep = prepare(cfg, tiles, progress=False)
    seconds["prepare"] = time.perf_counter() - t0
    manifests = [m for p in prep for m in p.manifest_uris]
    t0 = time.perf_counter()
    results = infer_many(cfg, manifests, workers=workers)
    seconds["infer"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    catalog = open_catalog(cfg)
    assembled = assemble_results(cfg, [r.result_uri for r in results], catalog=catalog)
    seconds["assemble"] = time.perf_counter() - t0
    src = scan_sources(catalog, tiles)

    n_selected = sum(p.n_core for p in prep)
    n_result_core = sum(r.n_core for r in results)
    n_iceberg = src.num_rows
    n_unique = len(pc.unique(src["OBJECT_ID"]))
    worker_rss = [r.peak_rss_mb for r in results if r.peak_rss_mb == r.peak_rss_mb]
    out = {
        "tiles": len(tiles),
        "grid": list(grid),
        "subtiles": len(manifests),
        "workers": workers,
        "results": len(results),
        "rows": {
            "mer_selection_core": n_selected,
            "results_in_core": n_result_core,
            "iceberg_sources": n_iceberg,
            "iceberg_unique_object_ids": n_unique,
            "assembled": sum(a.n_sources for a in assembled),
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "subtiles_per_s_infer": round(len(results) / seconds["infer"], 2) if seconds["infer"] else None,
        "peak_rss_mb_worker_subtile_max": round(max(worker_rss), 1) if worker_rss else None,
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_children_max": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }
    rows = out["rows"]
    out["reconciled"] = (
        len(results) == len(manifests)
        and rows["mer_selection_core"]
        == rows["results_in_core"]
        == rows["iceberg_sources"]
        == rows["assembled"]
        and rows["iceberg_unique_object_ids"] == rows["iceberg_sources"]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--grid", type=int, nargs=2, default=(8, 8), metavar=("ROWS", "COLS"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--density", type=float, default=20.0, help="galaxies per arcmin^2 of the synthetic field"
    )
    ap.add_argument("--quadrant-pix", type=int, default=256, help="synthetic quadrant size (real VIS: 2048)")
    ap.add_argument("--root", default=None, help="work folder (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.root:
        out = run(
            Path(args.root), args.tiles, tuple(args.grid), args.workers, args.density, args.quadrant_pix
        )
    else:
        with tempfile.TemporaryDirectory(prefix="constellation-load-") as tmp:
            out = run(Path(tmp), args.tiles, tuple(args.grid), args.workers, args.density, args.quadrant_pix)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{out['subtiles']} sub-tiles ({out['tiles']} tiles x {out['grid']}) with {out['workers']} workers"
        )
        for k, v in out["rows"].items():
            print(f"  rows {k:28s} {v}")
        print(f"  seconds {out['seconds']}  ({out['subtiles_per_s_infer']} sub-tiles/s in infer)")
        print(
            f"  peak RSS: worker sub-tile max {out['peak_rss_mb_worker_subtile_max']} MB, "
            f"children max {out['peak_rss_mb_children_max']} MB, driver {out['peak_rss_mb_driver']} MB"
        )
        print(f"  reconciled: {out['reconciled']}")
    return 0 if out["reconciled"] else 1


if __name__ == "__main__":
    sys.exit(main())
