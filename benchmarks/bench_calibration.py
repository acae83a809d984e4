"""Full shear calibration runs (the test suite runs a small version): m and c with 1-sigma errors.

    .venv/bin/python benchmarks/bench_calibration.py [--scale 1.0] [--device cpu]

Rows: isolated noiseless galaxies (Sersic COSMOS-like, COSMOS Sersic fits, bulge+disk), an anisotropic
PSF, and a realistic population (matched-filter S/N 10-100 drawn from dN/dS ~ S^-2, Euclid-like Moffat
FWHM 0.17", 0.1" pixels), all through ``run_calibration`` (the code path of ``constellation calibrate``).
Noisy rows use the exact first-order noise control variate (see ``calibration.py``), which leaves m and c
unchanged in expectation and shrinks their errors.  ``--scale`` multiplies every galaxy count.
"""

from __future__ import annotations

import argparse
import os
import time

from constellation_assets.shear.calibration import run_calibration

ROWS = [
    # Truncated PSF models: galaxies see the full PSF, the estimator a 21 x 21 cut-out (Q1 PSF stamps).
    (
        "noiseless, Moffat PSF cut to 21x21, as given",
        dict(n_galaxies=500, measure_psf_box_pix=21, psf_wings="none"),
    ),
    ("noiseless, Moffat PSF cut to 21x21, fitted wing", dict(n_galaxies=500, measure_psf_box_pix=21)),
    ("noiseless, Airy x Gaussian PSF, full", dict(n_galaxies=500, psf_model="airy_gaussian")),
    (
        "noiseless, Airy x Gaussian PSF cut to 21x21, as given",
        dict(n_galaxies=500, psf_model="airy_gaussian", measure_psf_box_pix=21, psf_wings="none"),
    ),
    (
        "noiseless, Airy x Gaussian PSF cut to 21x21, fitted wing",
        dict(n_galaxies=500, psf_model="airy_gaussian", measure_psf_box_pix=21),
    ),
    ("isolated noiseless, Sersic", dict(population="sersic", n_galaxies=2000)),
    ("isolated noiseless, COSMOS Sersic fits", dict(population="cosmos", n_galaxies=1000)),
    ("isolated noiseless, bulge+disk", dict(population="bulge_disk", n_galaxies=1000)),
    (
        "noiseless, PSF g=(0.05,-0.03), Sersic",
        dict(population="sersic", n_galaxies=500, psf_g1=0.05, psf_g2=-0.03),
    ),
    (
        "realistic S/N 10-100, Sersic",
        dict(
            population="sersic", n_galaxies=1000, noise_sigma=1.0, n_noise_realizations=20, stamp_size_pix=48
        ),
    ),
    (
        "S/N 10-100, FPFS S/N >= 10 (smooth, width 2), Sersic",
        dict(
            population="sersic",
            n_galaxies=4000,
            noise_sigma=1.0,
            n_noise_realizations=25,
            stamp_size_pix=48,
            estimator_snr_min=10.0,
            selection_bin_width=2.0,
        ),
    ),
    (
        "S/N 10-100, 4 exposures, moment-level, FPFS S/N >= 10",
        dict(
            n_galaxies=1000,
            noise_sigma=1.0,
            n_noise_realizations=25,
            stamp_size_pix=48,
            n_exposures=4,
            estimator_snr_min=10.0,
        ),
    ),
    (
        "S/N 10-100, 4 exposures, per-exposure e/R, S/N >= 10",
        dict(
            n_galaxies=1000,
            noise_sigma=1.0,
            n_noise_realizations=25,
            stamp_size_pix=48,
            n_exposures=4,
            exposure_combination="per_exposure",
            estimator_snr_min=10.0,
        ),
    ),
    # A catalog (MER-like) detection S/N cut without response vs the FPFS S/N cut with its response,
    # on a population reaching below the cut (matched-filter S/N 5-100).  No control variate with a
    # detection cut (it depends on the noise), hence the larger errors.
    (
        "S/N 5-100, detection S/N >= 10, no response",
        dict(
            n_galaxies=1000,
            noise_sigma=1.0,
            n_noise_realizations=25,
            stamp_size_pix=48,
            snr_min=5.0,
            detection_snr_min=10.0,
        ),
    ),  # fmt: skip
    (
        "S/N 5-100, detection S/N >= 5 + FPFS S/N >= 10",
        dict(
            n_galaxies=1000,
            noise_sigma=1.0,
            n_noise_realizations=25,
            stamp_size_pix=48,
            snr_min=5.0,
            detection_snr_min=5.0,
            estimator_snr_min=10.0,
        ),
    ),  # fmt: skip
    (
        "S/N 5-100, FPFS S/N >= 10 only",
        dict(
            n_galaxies=1000,
            noise_sigma=1.0,
            n_noise_realizations=25,
            stamp_size_pix=48,
            snr_min=5.0,
            estimator_snr_min=10.0,
        ),
    ),  # fmt: skip
    (
        "realistic S/N 10-100, bulge+disk, PSF g=(0.03,0.02)",
        dict(
            population="bulge_disk",
            n_galaxies=500,
            noise_sigma=1.0,
            n_noise_realizations=20,
            stamp_size_pix=48,
            psf_g1=0.03,
            psf_g2=0.02,
        ),
    ),
]

COMMON = dict(
    g_true=0.02,
    psf_model="moffat",
    psf_fwhm_arcsec=0.17,
    moffat_beta=2.5,
    pixel_scale_arcsec=0.1,
    snr_min=10.0,
    snr_max=100.0,
    seed=2026,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every row's galaxy count")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="run only rows whose label contains this text")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    results = []
    t_all = time.perf_counter()
    for label, row in ROWS:
        row = {"population": "sersic", **row}
        if args.only and args.only not in label:
            continue
        kw = {**COMMON, **row, "device": args.device}
        kw["n_galaxies"] = max(8, int(round(kw["n_galaxies"] * args.scale)))
        res = run_calibration(**kw)
        results.append((label, res))
        print(
            f"{label:52s} m1={res.m1:+.2e}±{res.m1_err:.1e} m2={res.m2:+.2e}±{res.m2_err:.1e} "
            f"c1={res.c1:+.1e}±{res.c1_err:.1e} c2={res.c2:+.1e}±{res.c2_err:.1e} "
            f"N={res.n_galaxies} stamps={res.n_stamps} {res.seconds:.0f}s",
            flush=True,
        )
    table = Table(
        title=f'Shear calibration (FPFS sigma={results[0][1].config["sigma_arcsec"]}", g_true=0.02, '
        f'Moffat FWHM 0.17" beta 2.5, 0.1" pixels; {os.cpu_count()} cores, '
        f"{time.perf_counter() - t_all:.0f} s total)"
    )
    for col in ("run", "m1", "m2", "c1", "c2", "N gal", "stamps", "time s"):
        table.add_column(col, justify="right")
    for label, r in results:
        table.add_row(
            label,
            f"{r.m1:+.2e} ± {r.m1_err:.1e}",
            f"{r.m2:+.2e} ± {r.m2_err:.1e}",
            f"{r.c1:+.1e} ± {r.c1_err:.1e}",
            f"{r.c2:+.1e} ± {r.c2_err:.1e}",
            str(r.n_galaxies),
            str(r.n_stamps),
            f"{r.seconds:.0f}",
        )
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
