"""A shear worker killed with SIGKILL mid-run: no partial result is visible, re-running completes (finished
sub-tiles are skipped, not redone), and assembly gives every source exactly once.

The worker measures the sub-tiles of a tile together (each quadrant read once per tile), so the sub-tiles
are spread over two tiles: the kill comes after the first tile's results, while the second is measured.

(An assembly killed mid-commit and concurrent assembly are covered by test_catalog_faults.py and
test_catalog_concurrency.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from constellation_assets.catalog.schema import read_subtile_result
from constellation_assets_tests import test_stamps_synth as syn

TILE = 102044185
TILE2 = 102044186
N_SUB = 6
N_GAL = 16


def _manifests(tmp_path: Path) -> list[str]:
    out = []
    for col in range(N_SUB):
        h = syn.wcs_header()
        ra, dec, _, _ = syn.galaxy_positions(N_GAL, h, seed=col + 1, margin=24)
        gals = [(r, d, 30000.0, 0.17, 0.05, -0.02) for r, d in zip(ra, dec, strict=True)]
        q = syn.write_exposure(
            tmp_path / "q1" / "VIS" / f"s{col}", col + 1, 0, syn.render_quadrant(h, gals, 2.0)
        )
        core = np.arange(N_GAL) % 4 != 0  # a quarter of each sub-tile's sources are margin sources
        m = syn.write_manifest(
            tmp_path / "out" / "manifests" / f"s{col}",
            [q],
            ra,
            dec,
            tile_id=_tile_of(col),
            row=col // 4,
            col=col % 4,
            core_mask=core,
        )
        # unique OBJECT_IDs per sub-tile (write_manifest numbers every sub-tile from the same base)
        cat = m.parent / "sources.parquet"
        t = pq.read_table(cat)
        ids = pc.add(t["OBJECT_ID"], pa.scalar(col * 1000, pa.int64()))
        pq.write_table(t.set_column(0, "OBJECT_ID", ids), cat)
        d = yaml.safe_load(m.read_text())
        d["source_ids"] = [i + col * 1000 for i in d["source_ids"]]
        d["core_source_ids"] = [i + col * 1000 for i in d["core_source_ids"]]
        m.write_text(yaml.safe_dump(d, sort_keys=False))
        out.append(str(m))
    return out


def _tile_of(col: int) -> int:
    return TILE if col < N_SUB // 2 else TILE2


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_worker_sigkill_mid_subtile_then_rerun(tmp_path):
    from constellation_assets.catalog.assemble import assemble_tile
    from constellation_assets.catalog.query import scan_sources
    from constellation_assets.catalog.tables import open_catalog_from
    from constellation_assets.config import load_config
    from constellation_assets.shear.worker import run_manifests

    manifests = _manifests(tmp_path)
    cfg_dict = {
        "data": {
            "vis_base_uri": str(tmp_path / "q1" / "VIS"),
            "catalog_base_uri": str(tmp_path / "q1" / "cat"),
        },
        "output": {"root_uri": str(tmp_path / "out")},
        "shear": {"stamp_size_pix": 48},
        "compute": {"batch_size": 4, "torch_threads": 1},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "constellation_assets.shear.worker", "--config", str(cfg_path), *manifests],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        # The first tile's sub-tiles are reported as written: the worker is inside the next tile. Kill at
        # once (its three small sub-tiles take only tens of milliseconds, so any wait races them).
        reported = [json.loads(proc.stdout.readline()) for _ in range(N_SUB // 2)]
        assert all(line["status"] == "written" for line in reported)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    results_dir = tmp_path / "out" / "results"
    visible = sorted(results_dir.rglob("*.parquet"))
    assert 1 <= len(visible) < N_SUB, "the kill came too late to interrupt a sub-tile"
    for p in visible:  # whatever is visible under a final name is complete and readable
        table, summary = read_subtile_result(str(p))
        assert table.num_rows == N_GAL and summary["N_SOURCES"] >= 0

    cfg = load_config(str(cfg_path))
    results, failures = run_manifests(cfg, manifests)
    assert not failures, failures
    status = {Path(r.manifest_uri).parent.name: r.status for r in results}
    for line in reported:  # finished work is not redone
        assert status[Path(line["manifest_uri"]).parent.name] == "skipped"
    assert sum(s == "written" for s in status.values()) >= N_SUB - len(visible)
    assert len(sorted(results_dir.rglob("*.parquet"))) == N_SUB
    # a SIGKILL mid-write can leave only a hidden temp file (".name.tmp-*"), never a partial final name
    assert not [
        p
        for p in results_dir.rglob("*")
        if p.is_file() and not p.name.endswith(".parquet") and not p.name.startswith(".")
    ]

    catalog = open_catalog_from(f"sqlite:///{tmp_path / 'catalog.db'}", str(tmp_path / "wh"))
    n_assembled = 0
    for tile in (TILE, TILE2):
        uris = sorted(r.result_uri for r in results if r.tile_id == tile)
        n_assembled += assemble_tile(catalog, tile, uris, "rerun", "h", "v").n_sources
    src = scan_sources(catalog, [TILE, TILE2])
    n_core = N_SUB * int((np.arange(N_GAL) % 4 != 0).sum())
    assert n_assembled == src.num_rows == n_core  # core sources exactly once: none lost, none duplicated
    assert len(pc.unique(src["OBJECT_ID"])) == n_core
