"""Cost of verifying injection outputs: full read + sha256 of a shard (what `inject` does before "Already
complete" and what `reproduce` does per file), and the run lease (acquire + release) on local disk.

    .venv/bin/python benchmarks/bench_shard_verify.py --shards 8 --stamps 250 --bands 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument(
        "--stamps", type=int, default=250, help="stamps per shard (200000 / 800 in the seed's run)"
    )
    ap.add_argument("--bands", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()

    from constellation_assets.io.lease import Lease, lease_uri
    from constellation_assets.sim.injection.shards import inspect_shard, shard_bytes, write_shard_bytes

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        uris = []
        for k in range(args.shards):
            cols = {"task_id": pa.array([f"t_{k}_{i}" for i in range(args.stamps)])}
            for b in range(args.bands):
                img = rng.normal(0, 1, (args.stamps, args.size * args.size)).astype("<f4")
                cols[f"image_b{b}"] = pa.array(
                    [r.tobytes() for r in img], pa.binary(args.size * args.size * 4)
                )
            data = shard_bytes(pa.table(cols), {b"constellation.config_hash": b"x"})
            uri = str(Path(d) / f"part-{k:05d}.parquet")
            write_shard_bytes(uri, data, None)
            uris.append(uri)
        nbytes = sum(Path(u).stat().st_size for u in uris)
        t0 = time.perf_counter()
        for u in uris:
            assert inspect_shard(u, None).problem is None
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        n = 50
        for _ in range(n):
            with Lease(lease_uri(d, "bench"), timeout_s=60):
                pass
        lease_ms = (time.perf_counter() - t1) / n * 1e3
    print(
        f"{args.shards} shards x {args.stamps} stamps x {args.bands} band(s): {nbytes / 1e6:.1f} MB verified in "
        f"{dt:.2f} s ({nbytes / 1e6 / dt:.0f} MB/s, {dt / args.shards * 1e3:.0f} ms per shard); "
        f"lease acquire + release {lease_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
