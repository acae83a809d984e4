"""Synthetic survey benchmark: simulation time, PSF product, measured MER catalog, and a +g / -g field pair.

    python benchmarks/bench_field.py [--config configs/local_demo.yaml] [--g 0.02] [--root DIR] [--json]

1. Simulates the config's field (the demo by default) under ``--root`` and reports wall and CPU time.
2. PSF product: the light each 21 x 21 native stamp holds (the real product keeps ~0.93-0.97).
3. Measured MER catalog against the truth: completeness by magnitude, position error of bright isolated
   sources, detection-flux ratio of stars, fraction of catalog entries with more than one truth member.
4. A +g / -g pair of the first tile (``shear_g1 = +-g``, paired noise, whole-scene shear): the fraction of
   real catalog entries matched by OBJECT_ID.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _with_root(cfg, root: Path, **field):
    d = cfg.model_dump(mode="json")
    d["data"]["vis_base_uri"] = str(root / "q1" / "VIS") + "/"
    d["data"]["catalog_base_uri"] = str(root / "q1" / "catalogs" / "MER_FINAL_CATALOG") + "/"
    d["output"]["root_uri"] = str(root / "out")
    d["field"].update(field)
    d["field"]["truth_base_uri"] = None
    from constellation_assets.config import load_config

    return load_config(d)


def _tables(cfg, tile_id: int) -> tuple[dict, dict]:
    import pyarrow.parquet as pq

    from constellation_assets.io.mer_catalog import read_mer_catalog
    from constellation_assets.io.q1 import discover_mer_catalog
    from constellation_assets.io.uri import join_uri
    from constellation_assets.synthetic import tile_truth_uri

    t = pq.read_table(join_uri(tile_truth_uri(cfg, tile_id), "truth_objects.parquet"))
    c = read_mer_catalog(discover_mer_catalog(cfg.data.catalog_base_uri, tile_id))
    return (
        {k: t.column(k).to_numpy() for k in t.column_names},
        {k: c.column(k).to_numpy() for k in c.column_names},
    )


def catalog_stats(truth: dict, cat: dict) -> dict:
    ra, dec = truth["RA"], truth["DEC"]
    flux = truth["FLUX_UJY_TRUE"] * truth["MU"]
    covered = truth["N_EXPOSURES"] > 0
    detected = truth["OBJECT_ID"] >= 0
    comp = {}
    for lo in (20, 22, 23, 24, 25):
        sel = covered & ~truth["IS_STAR"] & (truth["MAG_VIS_TRUE"] >= lo) & (truth["MAG_VIS_TRUE"] < lo + 1)
        if sel.any():
            comp[f"{lo}-{lo + 1}"] = round(float(detected[sel].mean()), 3)
    by_id = {int(o): k for k, o in enumerate(cat["OBJECT_ID"])}
    seps, star_ratio = [], []
    for i in np.nonzero(detected)[0]:
        k = by_id[int(truth["OBJECT_ID"][i])]
        d = np.hypot((ra - ra[i]) * math.cos(math.radians(dec[i])), dec - dec[i]) * 3600
        if np.any((d > 0) & (d < 2.0) & (flux > 0.05 * flux[i])) or cat["SNR_DETECTION"][k] < 30:
            continue
        seps.append(
            math.hypot(
                (cat["RIGHT_ASCENSION"][k] - ra[i]) * math.cos(math.radians(dec[i])),
                cat["DECLINATION"][k] - dec[i],
            )
            * 3600
        )
        if truth["IS_STAR"][i] and not cat["DET_QUALITY_FLAG"][k] & 0x4:
            star_ratio.append(cat["FLUX_DETECTION_TOTAL"][k] / flux[i])
    merged = truth["MERGED_OBJECT_ID"]
    n_members = np.bincount(np.unique(merged[merged >= 0], return_inverse=True)[1])
    return {
        "n_catalog": int(len(cat["OBJECT_ID"])),
        "n_spurious": int(cat["SPURIOUS_FLAG"].sum()),
        "completeness_by_mag": comp,
        "position_error_arcsec_p50_p90": [round(float(np.percentile(seps, q)), 4) for q in (50, 90)]
        if seps
        else None,
        "n_bright_isolated": len(seps),
        "star_flux_ratio_median": round(float(np.median(star_ratio)), 4) if star_ratio else None,
        "fraction_blended_entries": round(float((n_members > 1).mean()), 4) if len(n_members) else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/local_demo.yaml")
    ap.add_argument("--g", type=float, default=0.02, help="|g1| of the +g / -g pair")
    ap.add_argument("--root", default=None, help="data root (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from astropy.io import fits

    from constellation_assets.config import load_config
    from constellation_assets.synthetic import simulate_field

    root = Path(args.root or tempfile.mkdtemp(prefix="bench_field_"))
    cfg = _with_root(load_config(args.config), root / "field")
    t0, c0 = time.perf_counter(), _cpu_s()
    summary = simulate_field(cfg, force=True)
    out: dict = {
        "simulate_wall_s": round(time.perf_counter() - t0, 2),
        "simulate_cpu_s": round(_cpu_s() - c0, 2),
        "tiles": [
            {
                "tile_id": t.tile_id,
                "n_exposures": t.n_exposures,
                "n_galaxies": t.n_galaxies,
                "n_catalog": t.n_catalog_rows,
            }
            for t in summary.tiles
        ],
    }
    sums = []
    for p in sorted((root / "field" / "q1" / "VIS").glob("*/EUC_VIS_GRD-PSF-*.fits")):
        with fits.open(p) as hdul:
            for h in hdul[1:]:
                sums.append(h.data.reshape(9, 21, 9, 21).sum(axis=(1, 3)).ravel())
    sums = np.concatenate(sums)
    out["psf_stamp_sum_min_median_max"] = [
        round(float(v), 4) for v in (sums.min(), np.median(sums), sums.max())
    ]
    tile = cfg.field.tile_ids[0]
    out["catalog"] = catalog_stats(*_tables(cfg, tile))

    pair = {}
    for name, g in (("plus", args.g), ("minus", -args.g)):
        c = _with_root(
            cfg,
            root / name,
            tile_ids=[tile],
            shear_g1=g,
            shear_g2=0.0,
            paired_noise=True,
            write_mer_mosaics=False,
        )
        simulate_field(c, force=True)
        pair[name] = (c, *_tables(c, tile))
    kp, km = pair["plus"][2], pair["minus"][2]
    real_p = set(kp["OBJECT_ID"][kp["SPURIOUS_FLAG"] == 0])
    real_m = set(km["OBJECT_ID"][km["SPURIOUS_FLAG"] == 0])
    out["pair"] = {
        "g1": args.g,
        "n_real_plus": len(real_p),
        "n_real_minus": len(real_m),
        "matched_fraction": round(len(real_p & real_m) / max(len(real_p | real_m), 1), 4),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for k, v in out.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
