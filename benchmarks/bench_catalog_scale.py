"""Catalog scale benchmark: N simulated tiles assembled into Iceberg through the real assembly path.

    python benchmarks/bench_catalog_scale.py --tiles N [--batch B] [--sources-per-tile 400]
                                             [--maintain-every M] [--no-maintenance] [--root DIR] [--json]

Each tile gets its 16 sub-tile result Parquet files of the real schema (``write_subtile_result``:
sources with margins and IN_CORE flags from the sub-tile geometry of a reference tile, projected
around each tile's own centre; summaries in the file metadata). Tiles are consecutive MER tile ids
(neighbours on the sky) from ``--first-tile``. They are assembled ``B`` at a time with
``assemble_results`` (what ``constellation assemble`` runs; ``--batch 1`` is one Dagster partition
run per tile), into the SQLite catalog + local warehouse of a config under ``--root``. The result
files of a batch are deleted after it is assembled (disk stays bounded).

Every ``M`` tiles ``maintain_catalog`` runs (compaction, snapshot expiry, dead-file cleanup) as the
Dagster schedule would, with ``min_age`` 0 (the benchmark has no concurrent writers). At checkpoints
(10, 30, 100, 300, 1000, ... and N tiles) it prints: assembly seconds per tile (median over the
batches since the previous checkpoint; result reading and committing separately), metadata.json size,
live data files and manifests of shear.sources, snapshots, one-tile query time, full-scan time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

FIRST_TILE = 102030000  # Dec ~ -40 deg; consecutive ids run east along the rings


def _config(root: Path):
    from constellation_assets.config import load_config

    return load_config({"field_name": "SCALE", "tile_ids": [FIRST_TILE], "output": {"root_uri": str(root)}})


class TileWriter:
    """Sub-tile result files of the real schema for any tile, from one reference tile's geometry."""

    def __init__(self, n_sources: int, seed: int = 0):
        import numpy as np

        from constellation_assets.sky.subtiles import partition_sources, subtile_grid
        from constellation_assets.sky.tiles import mer_tile, radec_to_tangent, tangent_to_radec

        self.np = np
        self.mer_tile = mer_tile
        self.tangent_to_radec = tangent_to_radec
        ref = mer_tile(FIRST_TILE)
        rng = np.random.default_rng(seed)
        half_deg = (ref.extended_arcmin / 2 + 1.0) / 60.0
        xi = rng.uniform(-half_deg, half_deg, n_sources)
        eta = rng.uniform(-half_deg, half_deg, n_sources)
        ra, dec = tangent_to_radec(xi, eta, ref.ra_deg, ref.dec_deg)
        part = partition_sources(np.asarray(ra), np.asarray(dec), ref)
        self.subtiles = []
        for st in subtile_grid(ref):
            all_idx, core_idx = part.subtile_members(st.row, st.col)
            cx, cy = radec_to_tangent(*st.center_deg, ref.ra_deg, ref.dec_deg)
            self.subtiles.append(
                (st.row, st.col, all_idx, np.isin(all_idx, core_idx), (float(cx), float(cy)))
            )
        self.xi, self.eta = xi, eta
        self.rng = rng

    def write(self, outdir: str, tile_id: int, run_id: str = "bench") -> list[str]:
        from constellation_assets.catalog.schema import subtile_result_name, write_subtile_result

        return [
            write_subtile_result(table, summary, f"{outdir}/{subtile_result_name(tile_id, row, col)}")
            for (row, col), table, summary in self.results(tile_id, run_id)
        ]

    def tile_rows(self, tile_id: int, run_id: str = "bench"):
        """(core sources, sub-tile rows) of a tile as the assembly would commit them, without files."""
        from constellation_assets.catalog.assemble import tile_tables
        from constellation_assets.catalog.schema import checked_subtile_result, subtile_result_name

        results = []
        for (row, col), table, summary in self.results(tile_id, run_id):
            name = subtile_result_name(tile_id, row, col)
            results.append((name, checked_subtile_result(table, summary, tile_id, row, col, name)))
        sources, subtiles, _ = tile_tables(tile_id, results)
        return sources, subtiles

    def fill_rows(self, tile_id: int) -> tuple:
        """Rows like :meth:`tile_rows` for any tile, made from the reference tile's (vectorised, ~1 ms).

        Same sources per tile (positions re-projected about the tile's centre), fresh shapes. For
        filling the table to survey size only: the timed checkpoints use the whole assembly path.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        from constellation_assets.catalog.schema import tile_bucket

        np = self.np
        if not hasattr(self, "_template"):
            from constellation_assets.sky.tiles import radec_to_tangent

            src, sub = self.tile_rows(FIRST_TILE, "bench-fill")
            ref = self.mer_tile(FIRST_TILE)
            self._template = (src, sub, ref)
            self._src_tan = radec_to_tangent(
                src["RA"].to_numpy(), src["DEC"].to_numpy(), ref.ra_deg, ref.dec_deg
            )
            self._sub_tan = radec_to_tangent(
                sub["RA"].to_numpy(), sub["DEC"].to_numpy(), ref.ra_deg, ref.dec_deg
            )
        src, sub, _ = self._template
        tile = self.mer_tile(tile_id)
        n = src.num_rows

        def retile(t, tan):
            ra, dec = self.tangent_to_radec(tan[0], tan[1], tile.ra_deg, tile.dec_deg)
            out = t.set_column(
                t.schema.get_field_index("TILE_ID"),
                "TILE_ID",
                pa.array(np.full(t.num_rows, tile_id, np.int64)),
            )
            out = out.set_column(out.schema.get_field_index("RA"), "RA", pa.array(np.asarray(ra, np.float64)))
            out = out.set_column(
                out.schema.get_field_index("DEC"), "DEC", pa.array(np.asarray(dec, np.float64))
            )
            bucket = pa.array(np.full(t.num_rows, tile_bucket(tile_id), np.int32))
            out = out.set_column(out.schema.get_field_index("TILE_BUCKET"), "TILE_BUCKET", bucket)
            return out.cast(t.schema)

        out = retile(src, self._src_tan)
        object_id = pc.add(
            pc.subtract(src["OBJECT_ID"], np.int64(FIRST_TILE) * 1_000_000), np.int64(tile_id) * 1_000_000
        )
        out = out.set_column(out.schema.get_field_index("OBJECT_ID"), "OBJECT_ID", object_id)
        for col, mean in (("E1", 0.02), ("E2", -0.01)):
            vals = pa.array((mean + self.rng.normal(0, 0.25, n)).astype(np.float32))
            out = out.set_column(out.schema.get_field_index(col), col, vals)
        out = out.cast(src.schema).sort_by([("DEC", "ascending"), ("RA", "ascending")])
        return out, retile(sub, self._sub_tan)

    def results(self, tile_id: int, run_id: str = "bench") -> list:
        """[((row, col), per-source rows, summary)] of the tile's 16 sub-tiles."""
        import pyarrow as pa

        np = self.np
        tile = self.mer_tile(tile_id)
        ra, dec = self.tangent_to_radec(self.xi, self.eta, tile.ra_deg, tile.dec_deg)
        ra, dec = np.asarray(ra), np.asarray(dec)
        object_id = np.int64(tile_id) * 1_000_000 + np.arange(self.xi.size, dtype=np.int64)
        out = []
        for row, col, idx, in_core, (cx, cy) in self.subtiles:
            n = idx.size
            e1 = (0.02 + self.rng.normal(0, 0.25, n)).astype(np.float32)
            e2 = (-0.01 + self.rng.normal(0, 0.25, n)).astype(np.float32)
            table = pa.table(
                {
                    "TILE_ID": np.full(n, tile_id, np.int64),
                    "SUBTILE_ROW": np.full(n, row, np.int8),
                    "SUBTILE_COL": np.full(n, col, np.int8),
                    "OBJECT_ID": object_id[idx],
                    "RA": ra[idx],
                    "DEC": dec[idx],
                    "E1": e1,
                    "E2": e2,
                    "R11": np.ones(n, np.float32),
                    "R22": np.ones(n, np.float32),
                    "WEIGHT": np.ones(n, np.float32),
                    "SNR": np.full(n, 20.0, np.float32),
                    "N_EXPOSURES": np.full(n, 4, np.int16),
                    "FLAGS": np.zeros(n, np.int32),
                    "IN_CORE": in_core,
                }
            )
            nc = int(in_core.sum())
            c_ra, c_dec = self.tangent_to_radec(cx, cy, tile.ra_deg, tile.dec_deg)
            summary = {
                "G1": float(e1[in_core].mean()) if nc else float("nan"),
                "G2": float(e2[in_core].mean()) if nc else float("nan"),
                "G1_ERR": 0.25 / np.sqrt(nc) if nc else float("nan"),
                "G2_ERR": 0.25 / np.sqrt(nc) if nc else float("nan"),
                "N_SOURCES": nc,
                "METHOD": "bench",
                "CONVERGENCE": 1.0,
                "RA": float(c_ra),
                "DEC": float(c_dec),
                "run_id": run_id,
                "config_hash": "bench",
            }
            out.append(((row, col), table, summary))
        return out


def _append_by_bucket(table, rows) -> None:
    """One fast-append commit of ``rows``: one data file per TILE_BUCKET, sorted (TILE_ID, DEC, RA).

    What compaction writes. (PyIceberg's ``Table.append`` splits by partition with one filter of the
    whole batch per partition: 256 passes over it.)
    """
    import itertools

    import numpy as np
    from pyiceberg.io.pyarrow import _dataframe_to_data_files

    rows = rows.sort_by([("TILE_BUCKET", "ascending"), ("TILE_ID", "ascending"), ("DEC", "ascending")])
    bucket = rows["TILE_BUCKET"].to_numpy()
    edges = [0, *(np.flatnonzero(np.diff(bucket)) + 1).tolist(), len(bucket)]
    tx = table.transaction()
    meta = tx.table_metadata  # a deep copy per access: once
    counter = itertools.count(0)
    with tx.update_snapshot().fast_append() as app:
        for a, b in itertools.pairwise(edges):
            for data_file in _dataframe_to_data_files(
                meta, rows.slice(a, b - a), table.io, write_uuid=app.commit_uuid, counter=counter
            ):
                app.append_data_file(data_file)
    tx.commit_transaction()


def _checkpoints(n: int) -> list[int]:
    out, k = [], 10
    while k < n:
        out += [k, 3 * k] if 3 * k < n else [k]
        k *= 10
    return sorted({c for c in out if c < n} | {n})


def _table_stats(catalog, identifier) -> dict:
    import os

    table = catalog.load_table(identifier)
    snap = table.current_snapshot()
    manifests = snap.manifests(table.io) if snap else []
    n_files = sum((m.added_files_count or 0) + (m.existing_files_count or 0) for m in manifests)
    data_bytes = sum(t.file.file_size_in_bytes for t in table.scan().plan_files())
    records = int(snap.summary["total-records"]) if snap and snap.summary.get("total-records") else 0
    loc = table.metadata_location
    path = loc[len("file://") :] if loc.startswith("file://") else loc
    return {
        "metadata_json_kb": round(os.path.getsize(path) / 1024, 1),
        "data_files": n_files,
        "manifests": len(manifests),
        "manifests_kb": round(sum(m.manifest_length for m in manifests) / 1024, 1),
        "snapshots": len(table.metadata.snapshots),
        "data_mb": round(data_bytes / 2**20, 2),
        "bytes_per_row": round(data_bytes / records, 1) if records else None,
    }


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run(
    root: Path,
    n_tiles: int,
    batch: int,
    n_sources: int,
    maintain_every: int | None,
    first_tile: int = FIRST_TILE,
    progress: bool = True,
    compact_min_files: int = 4,
    fill_batch: int | None = None,
) -> dict:
    import numpy as np
    import pyarrow as pa

    from constellation_assets.catalog import assemble as assemble_mod
    from constellation_assets.catalog.assemble import assemble_results
    from constellation_assets.catalog.maintenance import maintain_catalog
    from constellation_assets.catalog.query import scan_sources
    from constellation_assets.catalog.tables import ensure_tables, open_catalog

    cfg = _config(root / "output")
    catalog = open_catalog(cfg)
    ensure_tables(catalog, "shear")
    writer = TileWriter(n_sources)
    results_dir = root / "results"
    # Time spent reading result files, apart from the commits (instrumentation only).
    read_s = [0.0]
    real_load = assemble_mod.load_tile_results

    def timed_load(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_load(*a, **k)
        finally:
            read_s[0] += time.perf_counter() - t0

    assemble_mod.load_tile_results = timed_load
    checkpoints = _checkpoints(n_tiles)
    rows_out, window, maint = [], [], []
    done = 0
    last_maint = 0
    gen_s = 0.0
    fill_s, n_filled = 0.0, 0
    rng = np.random.default_rng(1)
    t_start = time.perf_counter()

    def maintain() -> None:
        nonlocal last_maint
        if not maintain_every or done - last_maint < maintain_every:
            return
        rep = maintain_catalog(
            catalog,
            min_age=timedelta(0),
            orphan_age=timedelta(0),
            keep_last=20,
            min_input_files=compact_min_files,
        )
        maint.append(
            {
                "at_tiles": done,
                "seconds": round(rep.elapsed_s, 2),
                "files_rewritten": sum(c.files_rewritten for c in rep.compaction),
                "snapshots_expired": sum(e.snapshots_expired for e in rep.expiry),
                "files_deleted": sum(
                    e.data_files_deleted + e.manifests_deleted + e.manifest_lists_deleted for e in rep.expiry
                )
                + sum(rep.orphans_deleted.values()),
            }
        )
        last_maint = done

    try:
        while done < n_tiles:
            target = next(c for c in checkpoints if c > done)
            if fill_batch and target - done > batch:
                # Fill up to the probe: each batch of tiles is one PyIceberg append of rows made in memory
                # (no result files), which writes one file per TILE_BUCKET: the layout the scheduled
                # compaction leaves behind a backfill. The probe below times the whole path on top of it.
                t0 = time.perf_counter()
                while target - done > batch:
                    nf = min(fill_batch, target - done - batch)
                    rows = [writer.fill_rows(t) for t in range(first_tile + done, first_tile + done + nf)]
                    for k, ident in enumerate((("shear", "sources"), ("shear", "subtiles"))):
                        _append_by_bucket(catalog.load_table(ident), pa.concat_tables([r[k] for r in rows]))
                    done += nf
                    n_filled += nf
                    maintain()
                fill_s += time.perf_counter() - t0
            nb = min(batch, n_tiles - done, max(1, target - done))
            tiles = [first_tile + done + i for i in range(nb)]
            shutil.rmtree(results_dir, ignore_errors=True)
            results_dir.mkdir(parents=True)
            t0 = time.perf_counter()
            for t in tiles:
                writer.write(str(results_dir), t)
            gen_s += time.perf_counter() - t0
            read_before = read_s[0]
            t0, c0 = time.perf_counter(), time.process_time()
            out = assemble_results(cfg, [str(results_dir)], catalog=catalog, batch_size=batch)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert len(out) == nb
            read = read_s[0] - read_before
            window.append((wall / nb, read / nb, (wall - read) / nb, cpu / nb))
            done += nb
            maintain()
            if done in checkpoints:
                stats = _table_stats(catalog, ("shear", "sources"))
                probe = int(rng.integers(first_tile, first_tile + done))
                t0 = time.perf_counter()
                one = scan_sources(catalog, [probe])
                q_one = time.perf_counter() - t0
                t0 = time.perf_counter()
                full = scan_sources(catalog, columns=["TILE_ID", "OBJECT_ID", "E1", "E2", "WEIGHT"])
                q_full = time.perf_counter() - t0
                assert one.num_rows > 0 and set(one["TILE_ID"].to_pylist()) == {probe}
                row = {
                    "tiles": done,
                    "s_per_tile": round(statistics.median(w[0] for w in window), 4),
                    "read_s_per_tile": round(statistics.median(w[1] for w in window), 4),
                    "commit_s_per_tile": round(statistics.median(w[2] for w in window), 4),
                    # CPU seconds of this process per tile: less sensitive to other load on the machine
                    "cpu_s_per_tile": round(statistics.median(w[3] for w in window), 4),
                    **stats,
                    "one_tile_query_s": round(q_one, 3),
                    "full_scan_s": round(q_full, 3),
                    "rows": full.num_rows,
                    "warehouse_mb": round(_dir_mb(root / "output"), 1),
                    "elapsed_s": round(time.perf_counter() - t_start, 1),
                }
                rows_out.append(row)
                window = []
                if progress:
                    print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        assemble_mod.load_tile_results = real_load
        shutil.rmtree(results_dir, ignore_errors=True)
    first, last = rows_out[0], rows_out[-1]
    return {
        "tiles": n_tiles,
        "batch": batch,
        "sources_per_tile": n_sources,
        "maintain_every": maintain_every,
        "compact_min_files": compact_min_files,
        "checkpoints": rows_out,
        "maintenance": maint,
        "maintenance_s_total": round(sum(m["seconds"] for m in maint), 1),
        "generate_s_total": round(gen_s, 1),
        "fill_batch": fill_batch,
        "tiles_filled": n_filled,
        "fill_s_per_tile": round(fill_s / n_filled, 4) if n_filled else None,
        "total_s": round(time.perf_counter() - t_start, 1),
        "flat_ratio_last_over_first": round(last["s_per_tile"] / first["s_per_tile"], 2)
        if first["s_per_tile"]
        else None,
        "flat_ratio_cpu_last_over_first": round(last["cpu_s_per_tile"] / first["cpu_s_per_tile"], 2)
        if first["cpu_s_per_tile"]
        else None,
    }


def _print_table(res: dict) -> None:
    cols = [
        ("tiles", "tiles"),
        ("s_per_tile", "s/tile"),
        ("read_s_per_tile", "read"),
        ("commit_s_per_tile", "commit"),
        ("cpu_s_per_tile", "cpu"),
        ("metadata_json_kb", "meta kB"),
        ("data_files", "files"),
        ("manifests", "manif."),
        ("snapshots", "snaps"),
        ("one_tile_query_s", "1-tile q s"),
        ("full_scan_s", "full scan s"),
        ("rows", "rows"),
    ]
    print(
        f"batch {res['batch']}, {res['sources_per_tile']} sources/tile, maintenance every "
        f"{res['maintain_every']} tiles ({res['maintenance_s_total']} s in all), total {res['total_s']} s"
    )
    print(" | ".join(h for _, h in cols))
    for row in res["checkpoints"]:
        print(" | ".join(str(row[k]) for k, _ in cols))
    if res.get("tiles_filled"):
        print(
            f"{res['tiles_filled']} tiles filled by appends of {res['fill_batch']} tiles "
            f"({res['fill_s_per_tile']} s/tile); the rows above time {res['batch']} tiles through the whole path"
        )
    print(
        f"last/first s per tile: wall {res['flat_ratio_last_over_first']}, "
        f"cpu {res['flat_ratio_cpu_last_over_first']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64, help="tiles per commit (1 = one Dagster run per tile)")
    ap.add_argument("--sources-per-tile", type=int, default=400)
    ap.add_argument("--maintain-every", type=int, default=1000, help="tiles between maintenance runs")
    ap.add_argument("--no-maintenance", action="store_true")
    ap.add_argument(
        "--compact-min-files",
        type=int,
        default=4,
        help="small files a TILE_BUCKET partition needs to be compacted (consecutive tiles fill the 256 "
        "buckets in turn: 4 means every ~1,000 tiles)",
    )
    ap.add_argument(
        "--fill-batch",
        type=int,
        default=0,
        help="fill between checkpoints through the commit path in batches of this many tiles (rows made in "
        "memory, no result files); each checkpoint still times --batch tiles through the whole path "
        "(0: every tile through the whole path)",
    )
    ap.add_argument("--first-tile", type=int, default=FIRST_TILE)
    ap.add_argument("--root", default=None, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.tiles < 1 or args.batch < 1:
        ap.error("--tiles and --batch must be >= 1")
    tmp = None
    if args.root is None:
        tmp = tempfile.mkdtemp(prefix="bench_catalog_scale_")
        root = Path(tmp)
    else:
        root = Path(args.root)
        if root.exists() and any(root.iterdir()):
            ap.error(f"--root {root} is not empty; give a new folder")
        root.mkdir(parents=True, exist_ok=True)
    try:
        res = run(
            root,
            args.tiles,
            args.batch,
            args.sources_per_tile,
            None if args.no_maintenance else args.maintain_every,
            args.first_tile,
            compact_min_files=args.compact_min_files,
            fill_batch=args.fill_batch or None,
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        _print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
