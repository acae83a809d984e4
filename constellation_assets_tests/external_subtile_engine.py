"""An external inference engine in the seed's SHINE shape, for the tests (run as a script; no tests here).

It reads a manifest through the seed's contract fields only (``sky_bounds``, ``quadrants`` with ``sci_path``,
``bkg_path``, ``psf_path`` and the HDU prefix ``quadrant``, ``source_catalog`` = the MER final catalog,
``source_ids``, ``core_source_ids``), opens every file the way an engine on the other side of the contract
would (the DET file's ``{quadrant}.SCI`` HDU, the BKG and PSF HDUs named ``{quadrant}``), and writes the seed's
per-sub-tile result: ONE row (TILE_ID, SUBTILE_ROW, SUBTILE_COL, RA, DEC, G1, G2, G1_ERR, G2_ERR, N_SOURCES,
METHOD, CONVERGENCE). The shear is the one given on the command line (the test checks that it reaches the
catalog unchanged); N_SOURCES counts the core sources found in the MER catalog inside the core bounds, and
G1_ERR/G2_ERR are the shape-noise error sigma_e / sqrt(N_SOURCES). ``--mode`` selects failure modes.
"""

from __future__ import annotations

import argparse
import math
import sys

SIGMA_E = 0.26  # per-component intrinsic ellipticity dispersion


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from astropy.io import fits

    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--g1", type=float, default=0.0)
    ap.add_argument("--g2", type=float, default=0.0)
    ap.add_argument("--mode", default="ok")
    a = ap.parse_args(argv)
    with open(a.manifest) as fh:
        m = yaml.safe_load(fh)
    sb = m["sky_bounds"]
    (ra0, ra1), (dec0, dec1) = sb["core_ra"], sb["core_dec"]
    n_hdus = 0
    for q in m["quadrants"]:
        with fits.open(q["sci_path"]) as hdul:
            assert f"{q['quadrant']}.SCI" in hdul, (q["sci_path"], q["quadrant"])
        for key in ("bkg_path", "psf_path"):
            with fits.open(q[key]) as hdul:
                assert any(h.name.startswith(q["quadrant"]) for h in hdul[1:]), (q[key], q["quadrant"])
        n_hdus += 1
    with fits.open(m["source_catalog"]) as hdul:
        cat = hdul[1].data
        oid = np.asarray(cat["OBJECT_ID"], np.int64)
        ra = np.asarray(cat["RIGHT_ASCENSION"], float)
        dec = np.asarray(cat["DECLINATION"], float)
    core = np.isin(oid, np.asarray(m["core_source_ids"], np.int64))
    inside = (ra >= ra0) & (ra <= ra1) & (dec >= dec0) & (dec <= dec1)
    n = int((core & inside).sum())
    err = SIGMA_E / math.sqrt(n) if n else math.nan
    row = {
        "TILE_ID": [int(m["tile_id"])],
        "SUBTILE_ROW": [int(m["sub_tile_row"])],
        "SUBTILE_COL": [int(m["sub_tile_col"])],
        "RA": [0.5 * (ra0 + ra1)],
        "DEC": [0.5 * (dec0 + dec1)],
        "G1": [a.g1],
        "G2": [a.g2],
        "G1_ERR": [err],
        "G2_ERR": [err],
        "N_SOURCES": [n],
        "METHOD": ["SHINE-map"],
        "CONVERGENCE": [1.0 + 1e-3 * int(m["sub_tile_col"])],  # e.g. a Gelman-Rubin R-hat per sub-tile
    }
    if a.mode == "tworows":
        row = {k: v * 2 for k, v in row.items()}
    elif a.mode == "wrongtile":
        row["SUBTILE_COL"] = [int(m["sub_tile_col"]) + 1]
    elif a.mode == "neither":
        row = {"TILE_ID": row["TILE_ID"], "SHEAR": [a.g1]}
    pq.write_table(pa.table(row), a.output)
    print(f"subtile engine: {n_hdus} quadrants, {n} core sources, g = ({a.g1}, {a.g2})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
