"""Cost of finding and indexing the VIS exposures of one tile: all of them, the pointing pre-filter, the association table.

Usage: python benchmarks/bench_q1_index.py [--far 4] [--exposures 2] [--nq 16] [--s3] [--full-index]

Writes observations with the real Q1 DET structure (144 quadrants x SCI/RMS/FLG in scrambled order, a
primary header with EXPTIME, BKG/WGT per exposure and one PSF file per observation) but tiny pixel arrays
(``--nq`` square): one observation on the tile and ``--far`` observations 5 deg away, and a tile
association table (IRSA ``euclid.tileid_association_q1`` columns ``tileid, obsid``). With ``--s3`` they
are served by a moto S3 server on 127.0.0.1. For each method it reports the exposures listed, the range
requests and listings (what costs time on S3: one round trip each) and the wall time of discovery +
``build_quadrant_index`` for the tile:

- all exposures: every observation listed and every exposure's ~430 HDU headers walked (only with
  ``--full-index`` or ``--far`` <= 10: ~870 requests per exposure);
- pointing pre-filter (``overlap_box``): every observation listed, a few header requests per exposure;
- association table (``data.tile_association_uri``): one table read, only the tile's observations listed;
  then with the quadrant index cache (``{output.root_uri}/q1_index`` in the pipeline, shared by all tiles and runs) cold and
  warm: a warm tile reads one cached Parquet per exposure instead of walking its headers.
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


def _copy_observation(src: Path, dst: Path, src_id: int, dst_id: int) -> None:
    """The same files under another observation id (folder and names): a far pointing, cheaply."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        name = f.name.replace(f"-{src_id:06d}-", f"-{dst_id:06d}-")
        (dst / name).write_bytes(f.read_bytes())


def _upload(root: Path, endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for f in sorted(root.rglob("*")):
        if f.is_file():
            client.put_object(Bucket=bucket, Key=str(f.relative_to(root)), Body=f.read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--far", type=int, default=4, help="observations far from the tile")
    ap.add_argument("--exposures", type=int, default=2, help="exposures per observation (real: up to 6)")
    ap.add_argument("--nq", type=int, default=16, help="quadrant side in pixels (real: 2048 x 2066)")
    ap.add_argument(
        "--s3", action="store_true", help="serve the observations from a moto S3 server on 127.0.0.1"
    )
    ap.add_argument(
        "--full-index", action="store_true", help="also index every exposure (default when --far <= 10)"
    )
    args = ap.parse_args()

    import os

    from constellation_assets.io import q1
    from constellation_assets.sky.tiles import mer_tile

    tile_id = 102044185
    tile = mer_tile(tile_id)
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "q1" / "VIS"
        write_observation(local / "3025", 3025, tile.ra_deg, tile.dec_deg, args.exposures, args.nq)
        far_ids = [4000 + k for k in range(args.far)]
        if far_ids:
            # far pointings 3-20 deg away, the same files for each (only the pointing matters here)
            write_observation(local / str(far_ids[0]), far_ids[0], (tile.ra_deg + 5) % 360, tile.dec_deg,
                              args.exposures, args.nq)  # fmt: skip
            for o in far_ids[1:]:
                _copy_observation(local / str(far_ids[0]), local / str(o), far_ids[0], o)
        assoc = Path(tmp) / "tileid_association_q1.csv"
        rows = [f"{tile_id},3025"] + [f"{tile_id + 1 + k},{o}" for k, o in enumerate(far_ids)]
        assoc.write_text("tileid,obsid\n" + "\n".join(rows) + "\n")
        vis, so, assoc_uri = str(local), None, str(assoc)
        if args.s3:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

            for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
                os.environ.setdefault(k, v)  # the loopback moto server only
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            _upload(Path(tmp), endpoint, "bench-q1")
            vis, assoc_uri = "s3://bench-q1/q1/VIS", "s3://bench-q1/tileid_association_q1.csv"
            so = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        counter = {"range": 0, "list": 0, "get": 0}
        orig_range, orig_list, orig_get = q1._read_range, q1.list_uri, q1.read_bytes

        def counting_range(fs, path, start, end):
            counter["range"] += 1
            return orig_range(fs, path, start, end)

        def counting_list(*a, **k):
            counter["list"] += 1
            return orig_list(*a, **k)

        def counting_get(*a, **k):
            counter["get"] += 1
            return orig_get(*a, **k)

        q1._read_range, q1.list_uri, q1.read_bytes = counting_range, counting_list, counting_get
        where = "moto S3" if args.s3 else "local files"
        cache = str(Path(tmp) / "index-cache") if not args.s3 else "s3://bench-q1/cache/quadrant_index"
        print(f"one tile, {1 + args.far} observations x {args.exposures} exposures ({where})")
        print("method                                | exposures listed | range requests | whole-object reads "
              "| listings | seconds | quadrant rows")  # fmt: skip
        try:
            methods = [
                ("pointing pre-filter", tile.extended, False, None),
                ("association table", tile.extended, True, None),
                ("association table, index cache (cold)", tile.extended, True, cache),
                ("association table, index cache (warm)", tile.extended, True, cache),
            ]
            if args.full_index or args.far <= 10:
                methods.insert(0, ("all exposures", None, False, None))
            for label, box, table, cache_uri in methods:
                counter.update(range=0, list=0, get=0)
                q1._ASSOCIATIONS.clear()
                t0 = time.perf_counter()
                obs = q1.tile_observations(tile_id, assoc_uri, so) if table else None
                exps = q1.discover_vis_exposures(vis, obs_ids=obs, storage_options=so)
                index = q1.build_quadrant_index(
                    exps, cache_uri=cache_uri, storage_options=so, cache_storage_options=so, overlap_box=box
                )
                dt = time.perf_counter() - t0
                print(f"{label:37s} | {len(exps):16d} | {counter['range']:14d} | {counter['get']:18d} | "
                      f"{counter['list']:8d} | {dt:7.2f} | {index.num_rows}")  # fmt: skip
        finally:
            q1._read_range, q1.list_uri, q1.read_bytes = orig_range, orig_list, orig_get
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
