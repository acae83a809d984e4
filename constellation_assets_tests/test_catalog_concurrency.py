"""Several processes assembling at once: SQLite and PostgreSQL catalogs.

Four processes start together (a barrier): three different tiles plus a second copy of the first
tile. All tiles must land, and the tile committed twice at once must hold exactly one copy.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid

import pyarrow.compute as pc
import pytest

from constellation_assets.catalog.query import scan_sources, scan_subtiles
from constellation_assets.catalog.tables import ensure_tables, open_catalog_from
from constellation_assets.quality import run_catalog_checks
from constellation_assets_tests.catalog_testdata import core_count, make_tile_results

MP_CONTEXT = "spawn"
TILES = [102044185, 102044186, 102044187, 102044185]


def _assemble_worker(args):
    catalog_uri, warehouse, catalog_name, tile_id, uris, run_id, barrier = args
    from constellation_assets.catalog.assemble import assemble_tile

    catalog = open_catalog_from(catalog_uri, warehouse, catalog_name)
    barrier.wait(timeout=60)
    result = assemble_tile(catalog, tile_id, uris, run_id, "hash", "test")
    return tile_id, result.n_sources, result.commit_attempts


def _run_concurrently(catalog_uri, warehouse, catalog_name, results_dir):
    uris = {t: make_tile_results(results_dir, t, n_sources=300) for t in set(TILES)}
    catalog = open_catalog_from(catalog_uri, warehouse, catalog_name)
    ensure_tables(catalog)
    ctx = mp.get_context(MP_CONTEXT)
    with ctx.Manager() as manager:
        barrier = manager.Barrier(len(TILES))
        jobs = [
            (catalog_uri, warehouse, catalog_name, t, uris[t], f"proc-{i}", barrier)
            for i, t in enumerate(TILES)
        ]
        with ctx.Pool(len(TILES)) as pool:
            out = pool.map(_assemble_worker, jobs)
    return catalog, out


def _assert_all_landed_once(catalog, out):
    src = scan_sources(catalog)
    counts = {d["values"]: d["counts"] for d in pc.value_counts(src["TILE_ID"]).to_pylist()}
    assert counts == {t: core_count(t, 300) for t in set(TILES)}
    assert len(pc.unique(src["OBJECT_ID"])) == src.num_rows
    sub = scan_subtiles(catalog)
    sub_counts = {d["values"]: d["counts"] for d in pc.value_counts(sub["TILE_ID"]).to_pylist()}
    assert sub_counts == {t: 16 for t in set(TILES)}
    checks = run_catalog_checks(catalog, expected=16 * len(set(TILES)))
    failed = {o.name: o.message for o in checks if not o.passed}
    assert not failed, failed
    assert sorted(t for t, _, _ in out) == sorted(TILES)


@pytest.mark.timeout(180)
def test_concurrent_assembly_sqlite(tmp_path):
    catalog_uri = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog, out = _run_concurrently(
        catalog_uri, str(tmp_path / "wh"), "constellation", str(tmp_path / "res")
    )
    _assert_all_landed_once(catalog, out)


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_concurrent_assembly_postgres(tmp_path, postgres_url):
    # A catalog name unique to this run isolates it from other runs sharing the database.
    name = f"test_{uuid.uuid4().hex[:12]}"
    catalog = None
    try:
        catalog, out = _run_concurrently(postgres_url, str(tmp_path / "wh"), name, str(tmp_path / "res"))
        _assert_all_landed_once(catalog, out)
    finally:
        catalog = catalog or open_catalog_from(postgres_url, str(tmp_path / "wh"), name)
        for ns in catalog.list_namespaces():
            for ident in catalog.list_tables(ns):
                catalog.drop_table(ident)
            catalog.drop_namespace(ns)
        assert catalog.list_namespaces() == []
