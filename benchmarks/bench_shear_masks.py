"""Masked pixels (cosmic-ray-like masks) and the shear bias they leave: m with 1-sigma jackknife errors.

    .venv/bin/python benchmarks/bench_shear_masks.py [--n-galaxies 2000] [--masked-fraction 0.05]

Noiseless isolated Sersic galaxies (Moffat FWHM 0.17", beta 2.5, 0.1" pixels, 48 x 48 stamps) as +/-g,
0/90-degree quads (calibration.render_galaxy_quad).  Each galaxy gets one mask of cosmic-ray-like hits
(1-4 pixel streaks along rows, columns or diagonals, until ``masked_fraction`` of the stamp is masked),
shared by its +g and -g stamps and rotated with the galaxy for the 90-degree pair (so the ring test
still cancels the intrinsic shape).  Rows: no mask; masked pixels filled point-symmetrically about the
source with a bilinear partner value or a Keys-cubic one (stamps.fill_masked_symmetric), with all stamps
kept or with the stamp stage's centre-reject rule (a masked pixel within ``r`` pixels of the centre);
masked pixels set to 0.  The masked pixels in VIS are the FLG bits of constellation_assets.euclid
(FLG_MASK_BITS); this benchmark only models their geometry.
"""

from __future__ import annotations

import argparse

import numpy as np

from constellation_assets.shear import measure_stamps
from constellation_assets.shear.calibration import (
    CalibrationSettings,
    _draw,
    _jackknife,
    make_psf,
    render_galaxy_quad,
    rot90_about_centre,
)
from constellation_assets.shear.stamps import _center_masked, fill_masked_symmetric


def cosmic_ray_mask(rng: np.random.Generator, n: int, frac: float) -> np.ndarray:
    m = np.zeros((n, n), bool)
    steps = [(0, 1), (1, 0), (1, 1), (1, -1)]
    while m.mean() < frac:
        y, x = rng.integers(0, n, 2)
        dy, dx = steps[rng.integers(4)]
        for k in range(int(rng.integers(1, 5))):
            if 0 <= y + k * dy < n and 0 <= x + k * dx < n:
                m[y + k * dy, x + k * dx] = True
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-galaxies", type=int, default=2000)
    ap.add_argument("--masked-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    s = CalibrationSettings(stamp_size_pix=48, population="sersic", seed=args.seed)
    psf = make_psf(s)
    psf_img = _draw(psf, s)
    psf_img /= psf_img.sum()
    rng = np.random.default_rng(args.seed)
    ngal = args.n_galaxies
    stamps, offs, signs, masks = [], [], [], []
    for i in range(ngal):
        q, off, sign, _ = render_galaxy_quad(s, i, psf, True)
        m = cosmic_ray_mask(rng, 48, args.masked_fraction)
        m90 = rot90_about_centre(m)
        stamps.append(q)
        offs.append(off)
        signs.append(sign)
        masks.append(np.stack([m, m, m90, m90]))
    img = np.concatenate(stamps)
    of = np.concatenate(offs)
    sg = np.concatenate(signs)
    mk = np.concatenate(masks)
    comp = np.repeat(np.arange(ngal) % 2, 4)
    gal = np.repeat(np.arange(ngal), 4)

    def bias(images, keep):
        c = measure_stamps(images, psf_img, 0.1, offsets_pix=of)
        out = []
        for cc in (0, 1):
            e = c[f"e{cc + 1}"] * keep
            r = c[f"r{cc + 1}{cc + 1}"] * keep
            num, den = np.zeros((ngal, 2)), np.zeros((ngal, 2))
            for k, sgn in enumerate((1, -1)):
                sel = (comp == cc) & (sg == sgn)
                np.add.at(num[:, k], gal[sel], e[sel])
                np.add.at(den[:, k], gal[sel], r[sel])
            g = np.arange(ngal) % 2 == cc
            m, m_err, *_ = _jackknife(num[g, 0], den[g, 0], num[g, 1], den[g, 1], s.g_true, 100)
            out.append((m, m_err))
        return out

    all_kept = np.ones(len(img))
    rows = [("no mask", img, all_kept)]
    for method in ("bilinear", "cubic"):
        filled = fill_masked_symmetric(img, mk, of, method=method)
        rows.append((f"symmetric fill ({method}), all stamps", filled, all_kept))
        for radius in (2.0, 1.0):
            keep = (~_center_masked(mk, of, radius)).astype(float)
            rows.append(
                (
                    f"symmetric fill ({method}), centre r={radius:.0f} rejected ({1 - keep.mean():.0%})",
                    filled,
                    keep,
                )
            )
    rows.append(("masked pixels = 0, all stamps", np.where(mk, 0, img), all_kept))
    print(f"{ngal} galaxies, {4 * ngal} stamps, masked fraction {mk.mean():.3f}")
    for label, images, keep in rows:
        (m1, e1), (m2, e2) = bias(images, keep)
        print(f"{label:58s} m1={m1:+.2e}±{e1:.1e} m2={m2:+.2e}±{e2:.1e}", flush=True)


if __name__ == "__main__":
    main()
