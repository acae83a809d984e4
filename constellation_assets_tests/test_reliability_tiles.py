"""`constellation run`: a tile that fails is reported and the healthy tiles are still finished."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from constellation_assets_tests.q1_testdata import small_config

TILES = [102044185, 102044186]


@pytest.mark.integration
def test_failing_tile_is_reported_and_the_healthy_tile_completes(tmp_path):
    from constellation_assets.catalog.tables import open_catalog
    from constellation_assets.pipeline import run_local

    cfg = small_config(tmp_path, field={"tile_ids": TILES}, compute={"workers": 1})
    cfg.tile_ids = TILES
    from constellation_assets.synthetic import simulate_field

    simulate_field(cfg, progress=False)
    # the second tile's MER catalog is gone: that tile cannot be prepared
    shutil.rmtree(Path(cfg.data.catalog_base_uri) / str(TILES[1]))
    summary = run_local(cfg, progress=False, simulate=False)
    assert list(summary.failed_tiles) == [TILES[1]]
    assert "No MER final catalog" in summary.failed_tiles[TILES[1]]
    assert not summary.passed  # the run reports the failure (exit code 1 from the CLI)
    rows = open_catalog(cfg).load_table(("shear", "subtiles")).scan().to_arrow()
    assert set(rows.column("TILE_ID").to_pylist()) == {TILES[0]}
    assert rows.num_rows == 16
