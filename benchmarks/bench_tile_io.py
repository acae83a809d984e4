"""Bytes read per tile: sub-tiles measured one after another (per manifest) vs together (per tile), on S3.

    python benchmarks/bench_tile_io.py [--json out.json] [--root DIR] [--grid 8] [--ccd 4 4]
                                       [--quadrant-pix 256] [--density 30] [--dithers 2]

1. Simulates one synthetic tile in the Q1 layout (``--ccd`` CCDs of 4 quadrants of ``--quadrant-pix``
   pixels, ``--dithers`` nominal exposures) and uploads it to a moto S3 server started on 127.0.0.1.
2. Prepares the tile from S3 (``--grid`` sub-tiles; the extended sub-tiles share quadrants).
3. Measures the tile's sub-tiles three ways, reading from S3 and writing the results to S3:

   - ``per-subtile``: :func:`infer_manifest` on each manifest in turn (the previous local/worker path),
     with the process quadrant cache at its default budget (``CONSTELLATION_QUADRANT_CACHE_MB``, 256 MB);
   - ``per-subtile, no cache``: the same without the cache (a real tile's quadrants, ~67 MB each with
     ~16 per sub-tile and exposure, do not fit in any cache: this is what real data see);
   - ``per-tile``: :func:`infer_tile_manifests` (each quadrant read once for the tile).

Reported per mode: bytes read by range requests (``io.q1.count_reads``) against the bytes of the HDUs
overlapping the tile (SCI + RMS + FLG + BKG data of every distinct quadrant any sub-tile lists; the PSF
HDUs and headers are on top of this), their ratio (target <= 1.2), range requests, distinct HDU ranges
read more than once, and wall time per tile. The per-tile results are compared with the per-subtile
results (largest absolute difference per column: the estimator takes one pixel scale per batch, the
median over its stamps, and the batches mix other sub-tiles, so values agree to ~1e-4, not bit for bit;
with one stamp per batch they are identical, see constellation_assets_tests/test_tile_io.py).

Wall times are dominated by the moto server, which copies a whole object for every range request (its
cost grows with the file size, not with the bytes returned): compare the modes with each other only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TILE = 102044185


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _field(args) -> dict:
    return {
        "tile_ids": [TILE],
        "n_dithers": args.dithers,
        "short_exposure_dithers": [],
        "ccd_grid": list(args.ccd),
        "quadrant_nx_pix": args.quadrant_pix,
        "quadrant_ny_pix": args.quadrant_pix + 4,
        "galaxy_density_arcmin2": args.density,
        "star_density_arcmin2": 1.0,
        "pointing_jitter_arcsec": 0.0,
        "mer_catalog": "truth",
    }


def _config(data_root: str, out_root: str, args, s3: dict | None = None):
    from constellation_assets.config import load_config

    data = {
        "vis_base_uri": f"{data_root}/q1/VIS/",
        "catalog_base_uri": f"{data_root}/q1/catalogs/MER_FINAL_CATALOG/",
    }
    if s3:
        data["s3"] = s3
    return load_config(
        {
            "field_name": "TILEIO",
            "tile_ids": [TILE],
            "data": data,
            "output": {"root_uri": out_root, "catalog_uri": "sqlite:///unused.db"},
            "tiling": {"sub_tile_grid": [args.grid, args.grid], "sub_tile_margin_arcmin": 1.0},
            "compute": {"workers": 1, "device": "cpu", "batch_size": 512},
            "shear": {"stamp_size_pix": 32},
            "field": _field(args),
        }
    )


def _upload(client, bucket: str, folder: Path, prefix: str) -> int:
    n = 0
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")
            n += 1
    return n


def overlap_bytes(manifests: list[dict]) -> dict:
    """Bytes of the distinct quadrant HDUs the manifests list: SCI+RMS+FLG+BKG data, and all HDUs read."""
    from constellation_assets.shear.infer import _entry_key

    entries = {}
    for m in manifests:
        for e in m.get("quadrants") or []:
            entries.setdefault(_entry_key(e), e)
    data = 0
    with_headers = 0
    psf = {}
    for e in entries.values():
        for kind in ("sci", "rms", "flg", "bkg"):
            if e.get(f"{kind}_hdu") is None:
                continue
            data += int(e[f"{kind}_data_size"])
            with_headers += (
                int(e[f"{kind}_data_offset"]) + int(e[f"{kind}_data_size"]) - int(e[f"{kind}_header_offset"])
            )
        if e.get("psf_hdu") is not None:
            key = (e["psf_path"], e["psf_header_offset"])
            psf[key] = int(e["psf_data_offset"]) + int(e["psf_data_size"]) - int(e["psf_header_offset"])
    return {
        "n_quadrant_entries": len(entries),
        "n_psf_hdus": len(psf),
        "hdu_data_bytes": data,
        "hdu_bytes_with_headers_and_psf": with_headers + sum(psf.values()),
    }


def _tables(results, cfg) -> dict:
    from constellation_assets.catalog.schema import read_subtile_result

    out = {}
    for r in results:
        table, _ = read_subtile_result(r.result_uri, cfg.storage_options(r.result_uri))
        out[r.result_uri] = table
    return out


def _max_diff(a: dict, b: dict) -> dict:
    import numpy as np

    worst: dict[str, float] = {}
    for uri, ta in a.items():
        tb = b[uri]
        for c in ("E1", "E2", "R11", "R22", "WEIGHT", "SNR", "N_EXPOSURES", "FLAGS", "OBJECT_ID"):
            x = ta[c].to_numpy().astype(np.float64)
            y = tb[c].to_numpy().astype(np.float64)
            d = float(np.max(np.abs(x - y))) if len(x) else 0.0
            worst[c] = max(worst.get(c, 0.0), d)
    return worst


def run(args) -> dict:
    import boto3

    from constellation_assets.io import q1
    from constellation_assets.prepare import prepare_tile
    from constellation_assets.shear import stamps as st
    from constellation_assets.shear.infer import infer_manifest, infer_tile_manifests, load_manifest
    from constellation_assets.synthetic import simulate_field

    root = Path(args.root or tempfile.mkdtemp(prefix="bench_tile_io_"))
    local = root / "data"
    t0 = time.perf_counter()
    simulate_field(_config(str(local), str(root / "sim_out"), args))
    t_sim = time.perf_counter() - t0

    # Fake credentials for the loopback moto server only.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc, url = _start_moto()
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        bucket = "bench-tile-io"
        client.create_bucket(Bucket=bucket)
        n_files = _upload(client, bucket, local / "q1", "q1")
        s3 = {"endpoint_url": url, "region": "us-east-1"}
        cfg = _config(f"s3://{bucket}", f"s3://{bucket}/out", args, s3)
        t0 = time.perf_counter()
        prep = prepare_tile(cfg, TILE)
        t_prep = time.perf_counter() - t0
        uris = list(prep.manifest_uris)
        manifests = [load_manifest(u, cfg.storage_options(u)) for u in uris]
        ref = overlap_bytes(manifests)
        n_listed = sum(len(m.get("quadrants") or []) for m in manifests)
        active = sum(bool(m.get("quadrants")) for m in manifests)

        def per_subtile():
            return [infer_manifest(cfg, u, force=True) for u in uris]

        def per_tile():
            res, failed = infer_tile_manifests(cfg, uris, force=True)
            if failed:
                raise failed[0][1]
            return res

        budget = st.QUADRANT_CACHE.max_bytes
        modes = [
            (f"per-subtile, cache {budget / 2**20:.0f} MB", per_subtile, budget),
            ("per-subtile, no cache", per_subtile, 0),
            ("per-tile", per_tile, budget),
        ]
        rows, tables = [], {}
        for label, fn, cache_bytes in modes:
            st.QUADRANT_CACHE = st.QuadrantCache(cache_bytes)
            q1.HDU_TABLES.clear()
            t0 = time.perf_counter()
            with q1.count_reads() as reads:
                results = fn()
            wall = time.perf_counter() - t0
            quad_reads = [r for r in reads.ranges if "/q1/VIS/" in r[0]]
            n_distinct = len(set(quad_reads))
            rows.append(
                {
                    "mode": label,
                    "bytes_read": reads.bytes,
                    "ratio": round(reads.bytes / ref["hdu_data_bytes"], 3),
                    "range_requests": reads.requests,
                    "ranges_read_again": len(quad_reads) - n_distinct,
                    "wall_s_per_tile": round(wall, 2),
                    "n_stamps": sum(r.n_stamps for r in results),
                }
            )
            tables[label] = _tables(results, cfg)
        st.QUADRANT_CACHE = st.QuadrantCache(budget)
        first = modes[1][0]
        diff = _max_diff(tables[first], tables["per-tile"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "tile": TILE,
        "grid": [args.grid, args.grid],
        "field": _field(args),
        "n_subtiles": len(uris),
        "n_subtiles_with_quadrants": active,
        "quadrant_entries_listed": n_listed,
        **ref,
        "uploaded_files": n_files,
        "simulate_s": round(t_sim, 1),
        "prepare_s": round(t_prep, 1),
        "modes": rows,
        "max_abs_diff_per_tile_vs_per_subtile": diff,
    }


def _print(out: dict) -> None:
    mb = 1e6
    print(
        f"tile {out['tile']}: {out['n_subtiles']} sub-tiles ({out['n_subtiles_with_quadrants']} with quadrants), "
        f"{out['quadrant_entries_listed']} quadrant entries listed, {out['n_quadrant_entries']} distinct"
    )
    print(
        f"HDUs overlapping the tile (SCI+RMS+FLG+BKG data): {out['hdu_data_bytes'] / mb:.1f} MB "
        f"(with headers and {out['n_psf_hdus']} PSF HDUs: {out['hdu_bytes_with_headers_and_psf'] / mb:.1f} MB)"
    )
    print(
        f"{'mode':28s} {'MB read':>9s} {'ratio':>7s} {'requests':>9s} {'re-read':>8s} {'s/tile':>8s} {'stamps':>7s}"
    )
    for r in out["modes"]:
        print(
            f"{r['mode']:28s} {r['bytes_read'] / mb:9.1f} {r['ratio']:7.3f} {r['range_requests']:9d} "
            f"{r['ranges_read_again']:8d} {r['wall_s_per_tile']:8.2f} {r['n_stamps']:7d}"
        )
    print("max |per-tile - per-subtile| per column:", json.dumps(out["max_abs_diff_per_tile_vs_per_subtile"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--root", default=None, help="work folder (default: a temporary folder)")
    ap.add_argument("--grid", type=int, default=8, help="sub-tiles per tile side")
    ap.add_argument("--ccd", type=int, nargs=2, default=(4, 4), help="CCD rows, cols of the focal plane")
    ap.add_argument("--quadrant-pix", type=int, default=256, help="quadrant side (real: 2048 x 2066)")
    ap.add_argument("--density", type=float, default=30.0, help="galaxies per arcmin^2")
    ap.add_argument("--dithers", type=int, default=2)
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("constellation_assets").setLevel(logging.ERROR)
    out = run(args)
    _print(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    per_tile = next(r for r in out["modes"] if r["mode"] == "per-tile")
    return 0 if per_tile["ratio"] <= 1.2 and per_tile["ranges_read_again"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
