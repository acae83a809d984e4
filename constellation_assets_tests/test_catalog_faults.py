"""An assembly killed with SIGKILL at arbitrary moments: each table is before or after, never between,
and re-running heals the tile (no duplicate or lost rows)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.compute as pc
import pytest

from constellation_assets.catalog.assemble import assemble_tile
from constellation_assets.catalog.query import scan_sources, scan_subtiles
from constellation_assets.catalog.tables import open_catalog_from
from constellation_assets.quality import run_catalog_checks
from constellation_assets_tests.catalog_testdata import core_count, make_tile_results

TILE = 102044185
N = 300

_LOOP = textwrap.dedent(
    """
    import sys
    from constellation_assets.catalog.assemble import assemble_tile
    from constellation_assets.catalog.tables import open_catalog_from
    tile = int(sys.argv[5])
    catalog_uri, warehouse, uris_a, uris_b = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
    catalog = open_catalog_from(catalog_uri, warehouse)
    print("ready", flush=True)
    i = 0
    while True:
        assemble_tile(catalog, tile, uris_a if i % 2 else uris_b, f"loop-{i}", "h", "v")
        i += 1
    """
)


def _state(catalog):
    src = scan_sources(catalog, [TILE])
    sub = scan_subtiles(catalog, [TILE])
    return src, sub


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_sigkill_mid_assembly_never_leaves_a_mixed_or_duplicated_tile(tmp_path):
    catalog_uri = f"sqlite:///{tmp_path / 'catalog.db'}"
    warehouse = str(tmp_path / "wh")
    # same sources, two shear runs: RUN_ID tells which one a row came from
    uris_a = make_tile_results(str(tmp_path / "a"), TILE, n_sources=N, run_id="run-a")
    uris_b = make_tile_results(str(tmp_path / "b"), TILE, n_sources=N, run_id="run-b")
    catalog = open_catalog_from(catalog_uri, warehouse)
    assemble_tile(catalog, TILE, uris_a, "initial", "h", "v")
    n_core = core_count(TILE, N)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for delay_s in (0.3, 0.9, 1.6):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _LOOP,
                catalog_uri,
                warehouse,
                ",".join(uris_a),
                ",".join(uris_b),
                str(TILE),
            ],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(delay_s)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        catalog = open_catalog_from(catalog_uri, warehouse)
        src, sub = _state(catalog)
        # per table: exactly one complete copy from exactly one run
        assert src.num_rows == n_core
        assert len(pc.unique(src["OBJECT_ID"])) == n_core
        assert len(pc.unique(src["RUN_ID"])) == 1
        assert sub.num_rows == 16
        assert len(pc.unique(sub["RUN_ID"])) == 1
        # re-running heals a kill between the two tables
        assemble_tile(catalog, TILE, uris_b, "heal", "h", "v")
        failed = {o.name: o.message for o in run_catalog_checks(catalog, expected=16) if not o.passed}
        assert not failed, failed
