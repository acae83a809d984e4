"""Run time of :func:`constellation_assets.shear.detect.detect_exposures` on a survey-block-like input.

    .venv/bin/python benchmarks/bench_detect_exposures.py [--reps 3] [--copies 1] [--save OUT.npz]
        [--compare REF.npz]

A 256 x 256 grid of 0.1" pixels and 4 noisy exposures of the same ~16 galaxies (GalSim, Moffat PSF):
0.1" and 0.102" pixels, one rotated by 30 degrees, all dithered by fractions of a pixel, each cut out to
cover the grid plus 3 kernel sigmas + 4 pixels (as ``detect_subtile``); ``--copies 4`` repeats them (16
exposures). Timed on one thread, with the production ``noise_grid_pix=64`` and without. ``--save``
writes the detections; ``--compare`` prints the largest difference of ``r11, r22, phi1, weight`` from
saved ones (relative to each quantity's largest value), e.g. to compare two checkouts:

    PYTHONPATH=OLD_CHECKOUT python benchmarks/bench_detect_exposures.py --save /tmp/before.npz
    PYTHONPATH=. python benchmarks/bench_detect_exposures.py --compare /tmp/before.npz
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

PIX = 0.1
GRID = 256


def exposures(copies: int = 1) -> list:
    import galsim

    from constellation_assets.shear import detect

    psf_obj = galsim.Moffat(beta=2.5, fwhm=0.17)
    rng = np.random.default_rng(11)
    gals = []
    for _ in range(16):
        gal = galsim.Sersic(n=1.0, half_light_radius=rng.uniform(0.2, 0.4))
        gal = gal.shear(g1=rng.uniform(-0.3, 0.3), g2=rng.uniform(-0.3, 0.3)).withFlux(rng.uniform(80, 600))
        gals.append(gal.shift(*rng.uniform(-0.45 * GRID * PIX, 0.45 * GRID * PIX, 2)))
    scene = galsim.Convolve(galsim.Add(gals), psf_obj)
    c30, s30 = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
    setups = [
        (np.diag([PIX, PIX]), (0.31, -0.17)),
        (np.diag([0.102, 0.102]), (-0.42, 0.23)),
        (0.102 * np.array([[c30, -s30], [s30, c30]]), (0.12, 0.45)),
        (np.diag([PIX, PIX]), (-0.25, -0.38)),
    ]
    out = []
    centre = np.full(2, 0.5 * (GRID - 1))
    for k, (jac, dither) in enumerate(setups):
        jinv = np.linalg.inv(jac)
        corners = (np.array([[0, 0], [GRID - 1, 0], [0, GRID - 1], [GRID - 1, GRID - 1]]) - centre) * PIX
        pix = (jinv @ corners.T).T
        margin = int(math.ceil(3 * 0.35 / math.sqrt(abs(np.linalg.det(jac))))) + 4
        n = int(math.ceil(pix.max() - pix.min())) + 2 * margin + 2
        wcs = galsim.JacobianWCS(*jac.ravel())
        img = scene.drawImage(nx=n, ny=n, wcs=wcs, offset=dither, use_true_center=False).array
        img = img + np.random.default_rng(100 + k).normal(0.0, 1.0, img.shape)
        psf_img = psf_obj.drawImage(nx=31, ny=31, wcs=wcs).array
        p0 = np.array([n // 2 + dither[0], n // 2 + dither[1]]) - jinv @ (PIX * centre)
        out.append(detect.GridExposure(img, psf_img, 1.0, jac, tuple(p0)))
    return out * copies


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--save", default=None)
    ap.add_argument("--compare", default=None)
    args = ap.parse_args(argv)

    import torch

    from constellation_assets.shear import detect

    torch.set_num_threads(1)
    exps = exposures(args.copies)
    print("exposure shapes", [e.image.shape for e in exps])
    saved = {}
    ref = np.load(args.compare) if args.compare else None
    for ng in (64, None):
        res = detect.detect_exposures(exps, (GRID, GRID), PIX, noise_grid_pix=ng)
        cpu = []
        for _ in range(args.reps):
            t0 = time.process_time()
            detect.detect_exposures(exps, (GRID, GRID), PIX, noise_grid_pix=ng)
            cpu.append(time.process_time() - t0)
        print(
            f"noise_grid_pix={ng}: {len(res['x'])} detections, CPU time min {1e3 * min(cpu):.0f} ms, "
            f"median {1e3 * float(np.median(cpu)):.0f} ms"
        )
        saved.update({f"{ng}_{k}": v for k, v in res.items()})
        if ref is not None:
            same = np.array_equal(ref[f"{ng}_x"], res["x"]) and np.array_equal(ref[f"{ng}_y"], res["y"])
            diffs = []
            for k in ("r11", "r22", "phi1", "weight"):
                r = ref[f"{ng}_{k}"]
                diffs.append(f"{k} {np.max(np.abs(res[k] - r)) / np.abs(r).max():.1e}" if same else "")
            print("  same detections:", same, "; max |diff| / max |ref|:", ", ".join(diffs))
    if args.save:
        np.savez(args.save, **saved)


if __name__ == "__main__":
    main()
