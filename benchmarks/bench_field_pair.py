"""Multiplicative shear bias from synthetic-field pairs through prepare + infer (one demo-sized tile).

    python benchmarks/bench_field_pair.py [--g 0.02] [--no-shear-positions] [--root DIR]

Four fields of one tile share the population and the noise (``paired_noise``): shear_g1 = +g and -g, each
with the galaxies' intrinsic orientations as drawn and rotated by 90 degrees. Each field is simulated in the
Q1 layout (nominal exposures only), prepared (shear-grade selection on the measured MER catalog) and measured
with the built-in estimator. Sources are matched by OBJECT_ID across the four fields;

    m = sum(e1(+g) - e1(-g)) / (2 g sum(R11)) - 1,   c1 = sum(e1(+g) + e1(-g)) / (2 sum(R11))

(both orientations summed), with bootstrap errors over the matched sources. Under whole-scene shear the
galaxies move by ~g r between +g and -g, so the common pixel noise cancels only near the tile centre;
``--no-shear-positions`` keeps them on their pixels (noise cancels, blends are not sheared as a scene).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

COLUMNS = ("OBJECT_ID", "E1", "E2", "R11", "R22", "WEIGHT", "IN_CORE", "FLAGS")


def measure_field(root: Path, tile_id: int, field: dict) -> dict[str, np.ndarray]:
    from constellation_assets.catalog.schema import read_subtile_result
    from constellation_assets.config import load_config
    from constellation_assets.prepare import prepare_tile
    from constellation_assets.shear.infer import infer_manifest
    from constellation_assets.synthetic import simulate_field

    cfg = load_config(
        {
            "tile_ids": [tile_id],
            "data": {
                "vis_base_uri": str(root / "q1" / "VIS") + "/",
                "catalog_base_uri": str(root / "q1" / "catalogs" / "MER_FINAL_CATALOG") + "/",
            },
            "output": {"root_uri": str(root / "out")},
            "compute": {"batch_size": 256},
            "field": {"tile_ids": [tile_id], **field},
        }
    )
    simulate_field(cfg)
    cols: dict[str, list] = {}
    for uri in prepare_tile(cfg, tile_id).manifest_uris:
        res = infer_manifest(cfg, uri, device="cpu")
        if not res.result_uri:
            continue
        table, _ = read_subtile_result(res.result_uri)
        for c in COLUMNS:
            cols.setdefault(c, []).append(table[c].to_numpy(zero_copy_only=False))
    cat = {c: np.concatenate(v) for c, v in cols.items()}
    good = cat["IN_CORE"] & (cat["WEIGHT"] > 0) & (cat["FLAGS"] == 0)
    return {k: v[good] for k, v in cat.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--g", type=float, default=0.02)
    ap.add_argument("--tile", type=int, default=102044185)
    ap.add_argument("--no-shear-positions", action="store_true")
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_field_pair_"))
    fields = {}
    for rot in (0.0, 90.0):
        for sign in (1, -1):
            t0 = time.perf_counter()
            fields[(rot, sign)] = measure_field(
                root / f"rot{int(rot)}_{'plus' if sign > 0 else 'minus'}",
                args.tile,
                {
                    "shear_g1": sign * args.g,
                    "shear_g2": 0.0,
                    "intrinsic_rotation_deg": rot,
                    "paired_noise": True,
                    "shear_positions": not args.no_shear_positions,
                    "short_exposure_dithers": [],
                    "write_mer_mosaics": False,
                },
            )
            n = len(fields[(rot, sign)]["OBJECT_ID"])
            print(f"rot {rot:4.0f} g1 {sign * args.g:+.3f}: {n} sources, {time.perf_counter() - t0:.0f} s")
    ids = None
    for f in fields.values():
        ids = set(f["OBJECT_ID"]) if ids is None else ids & set(f["OBJECT_ID"])
    ids = np.array(sorted(ids))

    def matched(f):
        order = np.argsort(f["OBJECT_ID"])
        i = order[np.searchsorted(f["OBJECT_ID"][order], ids)]
        return {k: v[i] for k, v in f.items()}

    m = {k: matched(f) for k, f in fields.items()}
    e_plus = m[(0.0, 1)]["E1"] + m[(90.0, 1)]["E1"]
    e_minus = m[(0.0, -1)]["E1"] + m[(90.0, -1)]["E1"]
    resp = sum(f["R11"] for f in m.values()) / 2.0

    def stat(idx):
        r = resp[idx].sum()
        return (e_plus[idx] - e_minus[idx]).sum() / r / (2 * args.g) - 1.0, (
            e_plus[idx] + e_minus[idx]
        ).sum() / r / 2

    mm, cc = stat(np.arange(len(ids)))
    rng = np.random.default_rng(1)
    boot = np.array([stat(rng.integers(0, len(ids), len(ids))) for _ in range(500)])
    print(
        f"{len(ids)} matched sources, shear_positions={not args.no_shear_positions}: "
        f"m = {mm:+.4f} +- {boot[:, 0].std():.4f}, c1 = {cc:+.5f} +- {boot[:, 1].std():.5f}"
    )


if __name__ == "__main__":
    main()
