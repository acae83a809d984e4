"""PSF-model errors: shear leakage alpha, dm/d(dT/T), the PSF-model requirement they imply, and rho statistics.

    .venv/bin/python benchmarks/bench_psf_errors.py [--scale 1.0] [--no-rho] [--root DIR] [--json]

1. Response rows (``run_psf_error_response``, the calibration sims' code path): isolated noiseless galaxies
   drawn with the true PSF and measured with models off by ``+-dg_PSF = 0.01`` (each component) and
   ``+-dT/T = 0.02``, common galaxies, ring pairs; ``alpha_i = dc_i / dg_PSF,i``, ``beta = dm / d(dT/T)``
   (errors: jackknife over galaxies of the model differences), and the allowed model errors
   ``|dg_PSF| < 5e-4 / |alpha|``, ``|dT/T| < 2e-3 / |beta|`` (the shear requirement |m| < 2e-3, |c| < 5e-4).
   Sign convention: the errors are model minus truth; an elongated model gives c of the opposite sign
   (alpha < 0) and an over-sized model m > 0.
2. rho statistics (``quality.psf.tile_psf_rho``) of the demo-size synthetic field (``configs/local_demo.yaml``)
   with an exact PSF model and with a model off by ``field.psf_model_e1_error = 0.01``,
   ``field.psf_model_size_error = 0.02``: per tile the mean residuals and rho1..rho5 in the smallest and the
   widest separation bins (jackknife errors over quadrant exposures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from constellation_assets.shear.psf_errors import run_psf_error_response

ROWS = [
    ("Moffat beta 2.5 FWHM 0.17\", Sersic", dict(psf_model="moffat", population="sersic", n_galaxies=1000)),
    ("Moffat beta 2.5 FWHM 0.17\", COSMOS fits", dict(psf_model="moffat", population="cosmos", n_galaxies=1000)),
    ("Airy x Gaussian (VIS-like), Sersic", dict(psf_model="airy_gaussian", population="sersic", n_galaxies=1000)),
    ("Airy x Gaussian (VIS-like), COSMOS fits", dict(psf_model="airy_gaussian", population="cosmos", n_galaxies=1000)),
    (
        "Airy x Gaussian, model cut to 21x21 + wing fit, Sersic",
        dict(psf_model="airy_gaussian", population="sersic", n_galaxies=500, measure_psf_box_pix=21),
    ),
]  # fmt: skip

COMMON = dict(g_true=0.02, psf_fwhm_arcsec=0.17, moffat_beta=2.5, pixel_scale_arcsec=0.1, seed=2026)
RHO_FIELDS = [
    ("exact model", {}),
    ("model dg1=0.01, dT/T=0.02", {"psf_model_e1_error": 0.01, "psf_model_size_error": 0.02}),
]


def _pm(v: float, e: float, fmt: str = "+.3f") -> str:
    return f"{v:{fmt}} ± {e:.1g}" if math.isfinite(e) else f"{v:{fmt}}"


def run_rho(root: Path) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_field import _with_root

    from constellation_assets import synthetic as S
    from constellation_assets.config import load_config
    from constellation_assets.quality.psf import tile_psf_rho

    base = load_config(str(Path(__file__).parent.parent / "configs" / "local_demo.yaml"))
    out = []
    for label, field in RHO_FIELDS:
        cfg = _with_root(base, root / label.replace(" ", "_").replace("/", "_").replace(",", ""), **field)
        t0 = time.perf_counter()
        S.simulate_field(cfg)
        t_sim = time.perf_counter() - t0
        for tile_id in cfg.selected_tile_ids:
            t0 = time.perf_counter()
            rho, _ = tile_psf_rho(cfg, tile_id, min_sep_arcsec=2.0, max_sep_arcsec=200.0, n_bins=4)
            d = rho.to_dict()
            d.update(label=label, tile_id=tile_id, sim_s=t_sim, rho_s=time.perf_counter() - t0)
            out.append(d)
            print(
                f"{label:28s} tile {tile_id}: {rho.n_stars} stars, {rho.n_measurements} star-exposures, "
                f"de1={rho.mean_de1:+.2e}±{rho.mean_de1_err:.1e} dT/T={rho.mean_dT_over_T:+.2e}"
                f"±{rho.mean_dT_over_T_err:.1e} rho1[0]={rho.rho['rho1'][0]:+.1e}±{rho.rho_err['rho1'][0]:.1e}",
                flush=True,
            )
    return out


def rho_table(rho_rows: list[dict]):
    """The rho summary table: mean residuals, rho1 in the first and last bins, rho2..rho5 in the first."""
    from rich.table import Table

    t = Table(
        title="rho statistics (xi_+, Jarvis et al. 2016) of the demo-size synthetic field: S/N >= 50 stars, "
        "1-sigma jackknife over quadrant exposures; 4 log bins in 2-200\"; 'small': first non-empty bin"
    )
    for col in ("model", "tile", "stars", "meas.", "mean de1", "mean de2", "mean dT/T", "small \"",
                "rho1 small", "rho1 wide", "rho2 small", "rho3 small", "rho4 small", "rho5 small"):  # fmt: skip
        t.add_column(col, justify="right")
    for d in rho_rows:

        def cell(name: str, b: int, d: dict = d) -> str:
            if not d["n_pairs"][b]:
                return "-"
            return f"{d['rho'][name][b]:+.1e}±{d['rho_err'][name][b]:.0e}"

        first = next((b for b, n in enumerate(d["n_pairs"]) if n), 0)
        t.add_row(
            d["label"],
            str(d["tile_id"]),
            str(d["n_stars"]),
            str(d["n_measurements"]),
            _pm(d["mean_de1"], d["mean_de1_err"], "+.1e"),
            _pm(d["mean_de2"], d["mean_de2_err"], "+.1e"),
            _pm(d["mean_dT_over_T"], d["mean_dT_over_T_err"], "+.1e"),
            f"{d['theta_arcsec'][first]:.0f}",
            cell("rho1", first),
            cell("rho1", len(d["n_pairs"]) - 1),
            *(cell(n, first) for n in ("rho2", "rho3", "rho4", "rho5")),
        )
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every response row's galaxy count")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-rho", action="store_true", help="skip the synthetic-field rho statistics")
    ap.add_argument("--root", default=None, help="where the synthetic fields go (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print all results as JSON at the end")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    t_all = time.perf_counter()
    results = []
    for label, row in ROWS:
        kw = {**COMMON, **row, "device": args.device}
        kw["n_galaxies"] = max(8, int(round(kw["n_galaxies"] * args.scale)))
        r = run_psf_error_response(**kw)
        results.append((label, r))
        print(
            f"{label:55s} alpha1={r.alpha1:+.3f}±{r.alpha1_err:.1g} alpha2={r.alpha2:+.3f}±{r.alpha2_err:.1g} "
            f"dm/d(dT/T)={r.dm_dsize:+.3f}±{r.dm_dsize_err:.1g} N={r.n_galaxies} {r.seconds:.0f}s",
            flush=True,
        )
    console = Console(width=240)
    t = Table(
        title='Shear response to PSF-model errors (FPFS, g_true=0.02, 0.1" pixels, noiseless, model - truth: '
        f"dg_PSF = ±0.01, dT/T = ±0.02; requirement |m| < 2e-3, |c| < 5e-4; {os.cpu_count()} cores)"
    )
    for col in ("PSF, population", "alpha1", "alpha2", "alpha12", "dm/d(dT/T)", "m at dT/T=2%",
                "c at dg=0.01", "|dg_PSF| max", "|dT/T| max", "N gal", "s"):  # fmt: skip
        t.add_column(col, justify="right")
    for label, r in results:
        alpha = 0.5 * (r.alpha1 + r.alpha2)
        t.add_row(
            label,
            _pm(r.alpha1, r.alpha1_err),
            _pm(r.alpha2, r.alpha2_err),
            _pm(r.alpha12, r.alpha12_err, "+.4f"),
            _pm(r.dm_dsize, r.dm_dsize_err),
            f"{0.02 * r.dm_dsize:+.1e}",
            f"{0.01 * alpha:+.1e}",
            f"{r.dg_psf_max:.1e}",
            f"{r.size_error_max:.1e}",
            str(r.n_galaxies),
            f"{r.seconds:.0f}",
        )
    console.print(t)

    rho_rows = []
    if not args.no_rho:
        with tempfile.TemporaryDirectory() as tmp:
            rho_rows = run_rho(Path(args.root) if args.root else Path(tmp))
        t = rho_table(rho_rows)
        console.print(t)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        print(
            json.dumps({"response": [dict(label=lab, **r.to_dict()) for lab, r in results], "rho": rho_rows})
        )


if __name__ == "__main__":
    main()
