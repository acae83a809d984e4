"""Cost of indexing VIS exposures for one tile, with and without the pointing pre-filter.

Usage: python benchmarks/bench_q1_index.py [--far 4] [--exposures 2] [--nq 16]

Writes observations with the real Q1 DET structure (144 quadrants x SCI/RMS/FLG in scrambled order, a
primary header with EXPTIME, BKG/WGT per exposure and one PSF file per observation) but tiny pixel arrays
(``--nq`` square), one observation on the tile and ``--far`` observations 3-20 deg away. Reports the number
of range requests (what costs time on S3: one round trip each) and the local wall time of
``build_quadrant_index`` over all exposures, without and with ``overlap_box`` = the tile's extended area.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np


def _quadrant_header(ra0, dec0, i, j, nq):
    from astropy.io import fits

    # 12 x 12 quadrants over ~0.7 deg: the VIS focal plane, coarsely; a TPV-like number of cards.
    scale = 0.7 / 12 / nq
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"] = ra0 + (j - 5.5) * 0.7 / 12 / math.cos(math.radians(dec0))
    h["CRVAL2"] = dec0 + (i - 5.5) * 0.7 / 12
    h["CRPIX1"] = h["CRPIX2"] = nq / 2
    h["CD1_1"], h["CD2_2"], h["CD1_2"], h["CD2_1"] = -scale, scale, 0.0, 0.0
    for k in range(40):  # distortion-like cards so headers span several 2880-byte blocks
        h[f"PV1_{k}"] = 0.0
        h[f"PV2_{k}"] = 0.0
    h["MAGZEROP"] = "24.56605"
    h["GAIN"] = 3.48
    return h


def write_observation(folder: Path, obs_id: int, ra0: float, dec0: float, n_exp: int, nq: int) -> None:
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    ids = [(f"{r}-{c}.{q}", r, c, k) for r in range(1, 7) for c in range(1, 7) for k, q in enumerate("EFGH")]
    data = np.zeros((nq, nq), np.float32)
    psf = [fits.PrimaryHDU()]
    for det_id, *_ in ids:
        psf.append(fits.ImageHDU(np.zeros((189, 189), np.float32), fits.Header({"EXTNAME": det_id})))
    fits.HDUList(psf).writeto(folder / "EUC_VIS_GRD-PSF-000-000000-0000000__20240322T192915.424564Z.fits")
    for e in range(n_exp):
        dither, exposure = e // 2, 1 + e % 2
        stem = f"{obs_id:06d}-{dither:02d}-{exposure}-0000000__20241017T04{e:02d}00.000000Z.fits"
        det = [fits.PrimaryHDU(header=fits.Header({"EXPTIME": 560.52 if exposure == 1 else 89.52}))]
        bkg, wgt = [fits.PrimaryHDU()], [fits.PrimaryHDU()]
        for det_id, r, c, k in reversed(ids):
            h = _quadrant_header(ra0, dec0, 2 * (r - 1) + k // 2, 2 * (c - 1) + k % 2, nq)
            h["EXTNAME"] = f"{det_id}.SCI"
            det += [fits.ImageHDU(data, fits.Header({"EXTNAME": f"{det_id}.FLG"})), fits.ImageHDU(data, h),
                    fits.ImageHDU(data, fits.Header({"EXTNAME": f"{det_id}.RMS"}))]  # fmt: skip
            bkg.append(fits.ImageHDU(data, fits.Header({"EXTNAME": det_id})))
            wgt.append(fits.ImageHDU(data, fits.Header({"EXTNAME": det_id})))
        for kind, hdus in (("DET", det), ("BKG", bkg), ("WGT", wgt)):
            fits.HDUList(hdus).writeto(folder / f"EUC_VIS_SWL-{kind}-{stem}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--far", type=int, default=4, help="observations far from the tile")
    ap.add_argument("--exposures", type=int, default=2, help="exposures per observation (real: up to 6)")
    ap.add_argument("--nq", type=int, default=16, help="quadrant side in pixels (real: 2048 x 2066)")
    args = ap.parse_args()

    from constellation_assets.io import q1
    from constellation_assets.sky.tiles import mer_tile

    tile = mer_tile(102044185)
    with tempfile.TemporaryDirectory() as tmp:
        vis = Path(tmp) / "q1" / "VIS"
        write_observation(vis / "3025", 3025, tile.ra_deg, tile.dec_deg, args.exposures, args.nq)
        for k in range(args.far):
            write_observation(
                vis / str(4000 + k),
                4000 + k,
                (tile.ra_deg + 3 + 5 * k) % 360,
                tile.dec_deg,
                args.exposures,
                args.nq,
            )
        exps = q1.discover_vis_exposures(str(vis))
        counter = {"n": 0}
        orig = q1._read_range

        def counting(fs, path, start, end):
            counter["n"] += 1
            return orig(fs, path, start, end)

        q1._read_range = counting
        for label, box in (("all exposures", None), ("pointing pre-filter", tile.extended)):
            counter["n"] = 0
            t0 = time.perf_counter()
            index = q1.build_quadrant_index(exps, overlap_box=box)
            dt = time.perf_counter() - t0
            n_obs = len(set(index.column("obs_id").to_pylist()))
            print(f"{label:22s}: {len(exps)} exposures, {counter['n']:6d} range requests, {dt:6.2f} s, "
                  f"{index.num_rows} quadrant rows from {n_obs} observation(s)")  # fmt: skip
        q1._read_range = orig


if __name__ == "__main__":
    main()
