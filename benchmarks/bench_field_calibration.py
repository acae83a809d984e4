"""Field-level shear calibration of the production path (the test suite runs a small version).

    .venv/bin/python benchmarks/bench_field_calibration.py [--config configs/field_calibration.yaml]
        [--tiles 102044185,102044186] [--ccd-grid 3,3] [--dithers 3] [--density 45] [--workers 2]
        [--work-dir DIR] [--json OUT.json]

Runs ``run_field_calibration`` (the code of ``constellation calibrate --field``): paired synthetic fields
(+/-g x 0/90 deg x noise N/-N) through simulate -> prepare -> infer -> assemble, matched by OBJECT_ID, and
prints the m, c table overall and in bins, the wall and CPU time, and the precision per CPU minute:
sigma_m scales as 1/sqrt(N galaxies), so the CPU time needed for a target sigma_m is
``cpu_min * (sigma_m / target) ** 2``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    from rich.console import Console

    from constellation_assets.config import load_config
    from constellation_assets.shear.field_calibration import (
        field_calibration_selection_tables,
        field_calibration_table,
        run_field_calibration,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/field_calibration.yaml")
    ap.add_argument("--tiles", default=None, help="comma-separated MER tile ids")
    ap.add_argument("--ccd-grid", default=None, help="rows,cols of CCDs per exposure (1..6)")
    ap.add_argument("--dithers", type=int, default=None)
    ap.add_argument("--density", type=float, default=None, help="galaxies per arcmin^2")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--target-sigma-m", type=float, default=1e-3)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the result JSON here")
    args = ap.parse_args()

    base = load_config(args.config).to_dict()
    f, cal = base["field"], base["calibration"]
    if args.tiles:
        f["tile_ids"] = [int(t) for t in args.tiles.split(",")]
    if args.ccd_grid:
        f["ccd_grid"] = [int(x) for x in args.ccd_grid.split(",")]
    if args.dithers:
        f["n_dithers"] = args.dithers
    if args.density is not None:
        f["galaxy_density_arcmin2"] = args.density
    if args.workers:
        base["compute"]["workers"] = args.workers
    if args.work_dir:
        cal["field_work_dir"] = args.work_dir
    cfg = load_config(base)

    console = Console() if sys.stdout.isatty() else Console(width=200)  # the wide tables, also in a log file
    t0, c0 = time.perf_counter(), _cpu_s()
    res = run_field_calibration(cfg, progress=True, console=Console(stderr=True))
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    for table in (*field_calibration_table(res), *field_calibration_selection_tables(res)):
        console.print(table)
    cpu_min = cpu / 60.0
    iso = next((b for b in res.bins if b["variable"] == "blended" and b["bin"] == "isolated"), None)
    console.print(
        f"tiles {cfg.field.tile_ids}, ccd_grid {list(cfg.field.ccd_grid)}, {cfg.field.n_dithers} dithers, "
        f"{cfg.field.galaxy_density_arcmin2:g} gal/arcmin^2, {len(res.fields)} fields: "
        f"wall {wall:.0f} s, CPU {cpu_min:.1f} min"
    )
    rows = [("all rows", res.m1_err, res.m2_err)]
    if iso:
        rows.append(("isolated", iso["m1_err"], iso["m2_err"]))
    for name, e1, e2 in rows:
        sig = max(e1, e2)
        need = cpu_min * (sig / args.target_sigma_m) ** 2
        console.print(
            f"{name}: sigma_m = {sig:.2e} in {cpu_min:.1f} CPU min -> sigma_m * sqrt(CPU min) = "
            f"{sig * cpu_min**0.5:.2e}; sigma_m = {args.target_sigma_m:g} needs ~{need:.0f} CPU min"
        )
    verdict = (
        "within" if res.within(cfg.calibration.m_requirement, cfg.calibration.c_requirement) else "OUTSIDE"
    )
    console.print(
        f"{verdict} requirement |m| < {cfg.calibration.m_requirement:g}, |c| < {cfg.calibration.c_requirement:g}"
    )
    if args.json_out:
        out = {**res.to_dict(), "wall_s": wall, "cpu_s": cpu}
        with open(args.json_out, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
