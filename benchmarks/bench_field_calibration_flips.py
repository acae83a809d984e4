"""What the objects that some paired fields' MER catalogs list and others do not contribute to m and c.

    .venv/bin/python benchmarks/bench_field_calibration_flips.py [--config configs/field_calibration_mer.yaml]

Reads the catalogs and MER catalogs of the paired fields an earlier field calibration left under
``calibration.field_work_dir`` (run ``benchmarks/bench_field_calibration.py`` with the same config first) and
splits the objects listed in some fields only into: compact galaxies whose POINT_LIKE_FLAG (the star/galaxy
prior applied on MER) is set in some field, faint detection flips (FPFS weight <= 0.05 wherever measured),
and the rest (bright objects whose id is missing from some fields' MER catalogs: merged into a neighbour's
detection there). Each group is removed from every field and the paired change of m and c (same objects and
noise on both sides, sub-tile jackknife) is printed as that group's contribution.
"""

from __future__ import annotations

import argparse


def main() -> None:
    import polars as pl

    from constellation_assets.config import load_config
    from constellation_assets.io.mer_catalog import read_mer_catalog
    from constellation_assets.io.q1 import discover_mer_catalog
    from constellation_assets.shear import field_calibration as fc

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/field_calibration_mer.yaml")
    ap.add_argument("--faint-weight", type=float, default=0.05)
    args = ap.parse_args()

    cfg = load_config(args.config)
    work = fc.field_work_dir(cfg)
    frames, point_like = [], set()
    for v in fc.variants_for(cfg):
        vc = fc.field_variant_config(cfg, v, work)
        frames.append((v, fc.load_field_catalog(vc)))
        for t in vc.selected_tile_ids:
            tab = read_mer_catalog(discover_mer_catalog(vc.data.catalog_base_uri, t))
            flag = tab.column("POINT_LIKE_FLAG").to_numpy() == 1
            point_like |= set(tab.column("OBJECT_ID").to_numpy()[flag].tolist())
    listed = [set(df["OBJECT_ID"].to_list()) for _, df in frames]
    partial = set().union(*listed) - set.intersection(*listed)
    w_max: dict[int, float] = {}
    for _, df in frames:
        for i, w in zip(df["OBJECT_ID"].to_list(), df["WEIGHT"].to_list(), strict=True):
            w_max[i] = max(w_max.get(i, 0.0), w)
    flips = partial & point_like
    faint = {i for i in partial - flips if w_max[i] <= args.faint_weight}
    groups = {
        "POINT_LIKE flips": flips,
        "faint detection flips": faint,
        "merged / id flips": partial - flips - faint,
    }
    print(
        f"{len(partial)} objects listed in some fields only: "
        + ", ".join(f"{k} {len(g)}" for k, g in groups.items())
    )
    for name, drop in groups.items():
        # A MER S/N of -1 on the group's rows and a post-hoc cut at 0 removes exactly them from every field.
        marked = [
            (
                v,
                df.with_columns(
                    pl.when(pl.col("OBJECT_ID").is_in(list(drop))).then(-1.0).otherwise(1.0).alias("MER_SNR")
                ),
            )
            for v, df in frames
        ]
        res = fc.measure_paired_bias(
            marked, tuple(cfg.calibration.field_shear_g), bin_edges={}, mer_snr_cuts=[0.0]
        )
        for c in res.mer_cuts:
            parts = [f"{k[1:]} {-c[k]:+.2e} ± {c[f'{k}_err']:.1e}" for k in ("dm1", "dm2", "dc1", "dc2")]
            print(f"{name:22s} {c['selection']:9s} contribution " + ", ".join(parts))


if __name__ == "__main__":
    main()
