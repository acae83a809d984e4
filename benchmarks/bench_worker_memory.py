"""Peak memory and time of the shear worker on one realistic sub-tile.

Writes a synthetic sub-tile in the Q1 layout: ``--exposures`` dithered exposures, each a grid of full-size
VIS quadrants (2048 x 2066 float32 SCI/RMS/FLG + BKG + 9 x 9 PSF grid) covering a 10' x 10' extended
sub-tile, with ``--sources`` elliptical galaxies (Gaussian profiles painted vectorised, Poisson-like noise,
cosmic-ray flags), then runs ``python -m constellation_assets.shear.worker`` on its manifest in a fresh
process and reports that process's peak RSS (the worker must stay < 4 GB per sub-tile) and seconds.

    python benchmarks/bench_worker_memory.py [--sources 4000] [--exposures 3] [--batch-size 1024 4096]
        [--device cpu] [--workdir DIR] [--quadrant 2048 2066] [--repeat N] [--reuse]

``--repeat N`` runs each batch size N times (fresh process each) and prints every run plus the median,
with the 1-minute load average at its start: on a shared machine the timings move with the load.
``--reuse`` keeps an existing sub-tile in ``--workdir`` instead of writing it again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PIX = 0.1
RA0, DEC0 = 52.9869, -28.0
SUBTILE_ARCMIN = 10.0


def _header(crval, crpix, nx, ny):
    from astropy.io import fits

    s = PIX / 3600.0
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"] = crval
    h["CRPIX1"], h["CRPIX2"] = crpix
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -s, 0.0, 0.0, s
    h["MAGZEROP"], h["EXPTIME"], h["GAIN"] = "24.57", 560.52, 3.48
    return h


def _psf_grid(fwhm_arcsec=0.17):
    """9 x 9 grid of 21 x 21 Gaussian effective PSFs oversampled x3 (analytic, with the pixel box)."""
    from scipy.special import erf

    ovs, n = 3, 21
    sig = fwhm_arcsec / 2.3548 / PIX  # detector pixels
    c = (np.arange(n) - n // 2) / ovs

    def box(u):  # Gaussian convolved with a unit pixel, sampled at u
        return 0.5 * (erf((u + 0.5) / (sig * math.sqrt(2))) - erf((u - 0.5) / (sig * math.sqrt(2))))

    st = np.outer(box(c), box(c))
    st /= st.sum()
    return np.tile(st, (9, 9)).astype(np.float32)


def make_subtile(workdir: Path, n_sources: int, n_exp: int, nq: tuple[int, int], seed: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from astropy.io import fits
    from astropy.wcs import WCS

    rng = np.random.Generator(np.random.PCG64(seed))
    nx, ny = nq
    half_deg = SUBTILE_ARCMIN / 60.0 / 2
    dec = DEC0 + rng.uniform(-half_deg, half_deg, n_sources)
    ra = RA0 + rng.uniform(-half_deg, half_deg, n_sources) / math.cos(math.radians(DEC0))
    ids = np.arange(n_sources, dtype=np.int64) + 2_000_000_000
    cat_path = workdir / "sources.parquet"
    pq.write_table(pa.table({"OBJECT_ID": ids, "RIGHT_ASCENSION": ra, "DECLINATION": dec}), cat_path)
    flux = 10 ** rng.uniform(2.5, 4.5, n_sources)  # ADU per exposure
    sig_pix = rng.uniform(1.0, 3.0, n_sources)
    e = rng.uniform(0, 0.5, n_sources)
    phi = rng.uniform(0, np.pi, n_sources)
    side_pix = SUBTILE_ARCMIN * 60 / PIX
    gx = int(math.ceil(side_pix / nx))
    gy = int(math.ceil(side_pix / ny))
    psf = _psf_grid()
    quadrants = []
    w = 25
    ar = np.arange(w) - w // 2
    for k in range(n_exp):
        dx, dy = 10.0 * k, 25.0 * k  # dither (pixels)
        det = [fits.PrimaryHDU()]
        bkg_h = [fits.PrimaryHDU()]
        psf_h = [fits.PrimaryHDU()]
        stem = f"{2689:06d}-{k:02d}-1-0000000__20241017T00000{k}.000000Z.fits"
        folder = workdir / "vis" / "2689"
        folder.mkdir(parents=True, exist_ok=True)
        for r in range(gy):
            for c in range(gx):
                ccd, quad = f"{r + 1}-{c + 1}", "E"
                crpix = (side_pix / 2 - c * nx + dx, side_pix / 2 - r * ny + dy)
                h = _header((RA0, DEC0), crpix, nx, ny)
                x, y = WCS(h).all_world2pix(ra, dec, 0)
                on = (x > -20) & (x < nx + 20) & (y > -20) & (y < ny + 20)
                img = np.zeros((ny + 2 * w, nx + 2 * w), np.float32)
                ix, iy = np.floor(x[on] + 0.5).astype(int), np.floor(y[on] + 0.5).astype(int)
                fx, fy = x[on] - ix, y[on] - iy
                uu = ar[None, None, :] - fx[:, None, None]
                vv = ar[None, :, None] - fy[:, None, None]
                s2 = (sig_pix[on] ** 2)[:, None, None]
                c2, s2p = np.cos(2 * phi[on])[:, None, None], np.sin(2 * phi[on])[:, None, None]
                ee = e[on][:, None, None]
                q = ((1 - ee * c2) * uu**2 + (1 + ee * c2) * vv**2 - 2 * ee * s2p * uu * vv) / (1 - ee**2)
                prof = np.exp(-0.5 * q / s2)
                prof *= (flux[on] / prof.sum(axis=(1, 2)))[:, None, None]
                rows = (iy + w)[:, None, None] + ar[None, :, None] * np.ones((1, 1, w), int)
                cols = (ix + w)[:, None, None] + ar[None, None, :] * np.ones((1, w, 1), int)
                ok = (rows >= 0) & (rows < ny + 2 * w) & (cols >= 0) & (cols < nx + 2 * w)
                np.add.at(img, (rows[ok], cols[ok]), prof[ok].astype(np.float32))
                img = img[w:-w, w:-w]
                sky = 45.0
                noise = np.sqrt((img + sky) * 3.48 + 4.5**2) / 3.48
                sci = (img + sky + rng.standard_normal((ny, nx), dtype=np.float32) * noise).astype(np.float32)
                flg = np.zeros((ny, nx), np.int32)
                n_cr = int(400 * nx * ny / 1e6)
                flg[rng.integers(0, ny, n_cr), rng.integers(0, nx, n_cr)] = 1 << 4
                hs = h.copy()
                hs["EXTNAME"] = f"{ccd}.{quad}.SCI"
                det += [
                    fits.ImageHDU(sci, hs),
                    fits.ImageHDU(noise.astype(np.float32), fits.Header({"EXTNAME": f"{ccd}.{quad}.RMS"})),
                    fits.ImageHDU(flg, fits.Header({"EXTNAME": f"{ccd}.{quad}.FLG"})),
                ]
                bkg_h.append(
                    fits.ImageHDU(
                        np.full((ny, nx), sky, np.float32), fits.Header({"EXTNAME": f"{ccd}.{quad}"})
                    )
                )
                ph = fits.Header(
                    {
                        "EXTNAME": f"{ccd}.{quad}",
                        "PSFGRID": 9,
                        "PSFSTAMP": 21,
                        "OVERSAMP": 3,
                        "PSFPIXEL": "INCLUDED",
                    }
                )
                psf_h.append(fits.ImageHDU(psf, ph))
                quadrants.append(
                    {"ccd": ccd, "quadrant": f"{ccd}.{quad}", "obs_id": "002689", "dither": f"{k:02d}"}
                )
        paths = {
            "sci_path": folder / f"EUC_VIS_SWL-DET-{stem}",
            "bkg_path": folder / f"EUC_VIS_SWL-BKG-{stem}",
            "psf_path": folder / f"EUC_VIS_GRD-PSF-{stem}",
        }
        fits.HDUList(det).writeto(paths["sci_path"], overwrite=True)
        fits.HDUList(bkg_h).writeto(paths["bkg_path"], overwrite=True)
        fits.HDUList(psf_h).writeto(paths["psf_path"], overwrite=True)
        for qd in quadrants:
            if qd["dither"] == k:
                qd.update({key: str(v) for key, v in paths.items()}, wgt_path="")
    half = half_deg - 1 / 60
    manifest = {
        "tile_id": 102044185,
        "sub_tile_row": 0,
        "sub_tile_col": 0,
        "sky_bounds": {
            "core_ra": [RA0 - half, RA0 + half],
            "core_dec": [DEC0 - half, DEC0 + half],
            "extended_ra": [float(ra.min()), float(ra.max())],
            "extended_dec": [float(dec.min()), float(dec.max())],
        },
        "quadrants": quadrants,
        "source_catalog": str(cat_path),
        "sources_uri": str(cat_path),
        "source_ids": ids.tolist(),
        "core_source_ids": ids[np.abs(dec - DEC0) < half].tolist(),
    }
    path = workdir / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def run_worker(manifest: Path, workdir: Path, batch_size: int, device: str) -> dict:
    import yaml

    cfg = workdir / f"config_{batch_size}.yaml"
    out = workdir / f"out_{batch_size}_{device}"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "vis_base_uri": str(workdir / "q1" / "VIS"),
                    "catalog_base_uri": str(workdir / "q1" / "cat"),
                },
                "output": {"root_uri": str(out)},
                "compute": {"device": device, "batch_size": batch_size},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, "-m", "constellation_assets.shear.worker", "--config", str(cfg), str(manifest), "--force"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    rec = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")][0]
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    rec["process_peak_rss_mb"] = rss_children if rss_children * 1024 > before else math.nan
    rec["wall_s"] = wall
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=4000)
    ap.add_argument("--exposures", type=int, default=3)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1024])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quadrant", type=int, nargs=2, default=[2048, 2066], metavar=("NX", "NY"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="reuse the sub-tile already in --workdir")
    a = ap.parse_args(argv)
    tmp = None
    if a.workdir:
        workdir = Path(a.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-worker-")
        workdir = Path(tmp.name)
    t0 = time.perf_counter()
    manifest = workdir / "manifest.yaml"
    if not (a.reuse and manifest.exists()):
        manifest = make_subtile(workdir, a.sources, a.exposures, tuple(a.quadrant))
        print(f"synthetic sub-tile: {a.sources} sources, {a.exposures} exposures, quadrants {a.quadrant[0]}x{a.quadrant[1]} "
              f"(written in {time.perf_counter() - t0:.0f} s)")  # fmt: skip
    rows = []
    for bs in a.batch_size:
        for _ in range(max(1, a.repeat)):
            load = os.getloadavg()[0]
            rows.append((bs, load, run_worker(manifest, workdir, bs, a.device)))
    hdr = f"{'device':>6} {'batch':>6} {'sources':>8} {'stamps':>7} {'infer s':>8} {'wall s':>7} {'ms/stamp':>9} {'peak RSS MB':>12} {'< 4 GB':>7} {'load':>5}"
    print(hdr)
    print("-" * len(hdr))
    for bs, load, r in rows:
        peak = max(
            r["peak_rss_mb"] or 0, r["process_peak_rss_mb"] if math.isfinite(r["process_peak_rss_mb"]) else 0
        )
        ms = 1000 * r["seconds"] / max(r["n_stamps"], 1)
        print(f"{r['device']:>6} {bs:>6} {r['n_sources']:>8} {r['n_stamps']:>7} {r['seconds']:>8.1f} {r['wall_s']:>7.1f} "
              f"{ms:>9.2f} {peak:>12.0f} {'yes' if peak < 4096 else 'NO':>7} {load:>5.1f}")  # fmt: skip
    if a.repeat > 1:
        for bs in a.batch_size:
            secs = sorted(r["seconds"] for b, _, r in rows if b == bs)
            print(
                f"batch {bs}: infer s median {secs[len(secs) // 2]:.1f}, min {secs[0]:.1f} over {len(secs)} runs"
            )
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
