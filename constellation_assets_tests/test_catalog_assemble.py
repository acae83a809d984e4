"""Per-tile assembly into Iceberg: core filter, idempotence, conflicts, crash healing, queries."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
from pyiceberg.exceptions import ValidationException

from constellation_assets.catalog import assemble as assemble_mod
from constellation_assets.catalog.assemble import (
    PROP_CODE_VERSION,
    PROP_CONFIG_HASH,
    PROP_RUN_ID,
    PROP_TILE_ID,
    AssemblyError,
    assemble_tile,
    expand_result_uris,
    group_results_by_tile,
    tile_filter,
)
from constellation_assets.catalog.query import assembly_history, scan_sources, scan_subtiles
from constellation_assets.catalog.schema import (
    SOURCES_TABLE_ARROW_SCHEMA,
    read_subtile_result,
    write_subtile_result,
)
from constellation_assets.catalog.tables import catalog_properties, ensure_tables, open_catalog_from
from constellation_assets.quality import run_catalog_checks
from constellation_assets_tests.catalog_testdata import core_count, make_tile_results

T1, T2 = 102044185, 102044186


@pytest.fixture()
def catalog(tmp_path):
    return open_catalog_from(None, str(tmp_path / "warehouse"))


@pytest.fixture()
def results(tmp_path):
    out = str(tmp_path / "results")
    return {T1: make_tile_results(out, T1), T2: make_tile_results(out, T2, g_true=(-0.03, 0.0))}


def _tile_counts(catalog, table="sources"):
    scan = scan_sources(catalog) if table == "sources" else scan_subtiles(catalog)
    return {d["values"]: d["counts"] for d in pc.value_counts(scan["TILE_ID"]).to_pylist()}


def test_assemble_keeps_core_sources_once(catalog, results):
    r = assemble_tile(catalog, T1, results[T1], "run-1", "hash-1", "0.1.0")
    assert r.n_sources == core_count(T1) > 0
    assert r.n_margin_dropped > 0  # margins and neighbour-owned sources were present and dropped
    assert r.n_subtiles == 16 and r.missing_subtiles == []
    src = scan_sources(catalog, [T1])
    assert src.num_rows == r.n_sources
    assert len(pc.unique(src["OBJECT_ID"])) == src.num_rows
    # rows are stored sorted by (DEC, RA) as the table's sort order declares
    dec = src["DEC"].to_numpy()
    assert np.all(np.diff(dec) >= 0)
    assert src.schema.names == SOURCES_TABLE_ARROW_SCHEMA.names
    # the catalog's sources are exactly the IN_CORE rows of the result files
    expected_ids = set()
    for uri in results[T1]:
        table, _ = read_subtile_result(uri)
        expected_ids |= set(table.filter(table["IN_CORE"])["OBJECT_ID"].to_pylist())
    assert set(src["OBJECT_ID"].to_pylist()) == expected_ids


def test_reassembly_is_idempotent_and_leaves_other_tiles(catalog, results):
    first = assemble_tile(catalog, T1, results[T1], "run-1", "hash-1", "0.1.0")
    assemble_tile(catalog, T2, results[T2], "run-1", "hash-1", "0.1.0")
    before = scan_sources(catalog, [T2])
    for i in range(2):
        again = assemble_tile(catalog, T1, results[T1], f"run-{i + 2}", "hash-1", "0.1.0")
        assert again.n_sources == first.n_sources
    assert _tile_counts(catalog) == {T1: first.n_sources, T2: core_count(T2)}
    assert _tile_counts(catalog, "subtiles") == {T1: 16, T2: 16}
    after = scan_sources(catalog, [T2])
    assert sorted(after["OBJECT_ID"].to_pylist()) == sorted(before["OBJECT_ID"].to_pylist())
    # snapshot summaries carry the provenance of the latest assembly
    table = catalog.load_table(("shear", "sources"))
    summary = table.current_snapshot().summary
    assert summary[PROP_RUN_ID] == "run-3"
    assert summary[PROP_CONFIG_HASH] == "hash-1"
    assert summary[PROP_CODE_VERSION] == "0.1.0"
    assert summary[PROP_TILE_ID] == str(T1)
    assert again.sources_snapshot_id == table.current_snapshot().snapshot_id
    history = assembly_history(catalog)
    assert {h[PROP_TILE_ID] for h in history} == {str(T1), str(T2)}


def test_reassembly_replaces_rows_of_a_changed_tile(catalog, results, tmp_path):
    assemble_tile(catalog, T1, results[T1], "run-1", "h", "v")
    # new results for the tile: fewer sub-tiles and a new run id; old rows must all go
    partial = make_tile_results(str(tmp_path / "rerun"), T1, run_id="run-b", subtiles=[(0, 0), (1, 1)])
    r = assemble_tile(catalog, T1, partial, "run-2", "h", "v")
    assert r.missing_subtiles and len(r.missing_subtiles) == 14
    sub = scan_subtiles(catalog, [T1])
    assert sub.num_rows == 2
    assert set(sub["RUN_ID"].to_pylist()) == {"run-b"}
    src = scan_sources(catalog, [T1])
    assert src.num_rows == r.n_sources
    assert set(src["RUN_ID"].to_pylist()) == {"run-b"}
    with pytest.raises(AssemblyError, match="missing sub-tile"):
        assemble_tile(catalog, T1, partial, "run-3", "h", "v", require_complete=True)


def test_bad_inputs_are_rejected_before_any_commit(catalog, results, tmp_path):
    with pytest.raises(AssemblyError, match="belongs to tile 102044186"):
        assemble_tile(catalog, T1, results[T1] + results[T2][:1], "r", "h", "v")
    with pytest.raises(AssemblyError, match="given twice"):
        assemble_tile(catalog, T1, results[T1] + results[T1][:1], "r", "h", "v")
    # a source claimed by two sub-tile cores
    table, summary = read_subtile_result(results[T1][1])
    stolen, _ = read_subtile_result(results[T1][0])
    core0 = stolen.filter(stolen["IN_CORE"]).slice(0, 1)
    core0 = core0.set_column(1, "SUBTILE_ROW", table["SUBTILE_ROW"].slice(0, 1))
    core0 = core0.set_column(2, "SUBTILE_COL", table["SUBTILE_COL"].slice(0, 1))
    import pyarrow as pa

    write_subtile_result(pa.concat_tables([table, core0.cast(table.schema)]), summary, results[T1][1])
    with pytest.raises(AssemblyError, match="more than one sub-tile core"):
        assemble_tile(catalog, T1, results[T1], "r", "h", "v")
    assert not catalog.table_exists(("shear", "sources")) or scan_sources(catalog).num_rows == 0


def test_expand_and_group(results, tmp_path):
    folder = str(tmp_path / "results")
    (tmp_path / "results" / "notes.txt").write_text("not a result")
    (tmp_path / "results" / ".102044185_0_0.parquet.tmp-abc").write_text("in progress")
    uris = expand_result_uris([folder])
    assert len(uris) == 32
    groups = group_results_by_tile(uris)
    assert list(groups) == [T1, T2] and all(len(v) == 16 for v in groups.values())
    with pytest.raises(AssemblyError, match="does not exist"):
        expand_result_uris([str(tmp_path / "nope")])


def test_stale_first_attempt_is_retried_to_one_copy(catalog, results, monkeypatch):
    """A writer whose view is stale (another writer committed the same tile meanwhile) re-plans and
    ends with exactly one copy of the tile."""
    ensure_tables(catalog)
    stale = catalog.load_table(("shear", "sources"))  # before anything was written
    assemble_tile(catalog, T1, results[T1], "run-other", "h", "v")  # the concurrent writer

    real_load = catalog.load_table
    calls = {"n": 0}

    def load_stale_first(identifier):
        calls["n"] += 1
        if calls["n"] == 1 and tuple(identifier) == ("shear", "sources"):
            return stale
        return real_load(identifier)

    monkeypatch.setattr(catalog, "load_table", load_stale_first)
    monkeypatch.setattr(assemble_mod, "ensure_tables", lambda *a, **k: None)
    r = assemble_tile(catalog, T1, results[T1], "run-mine", "h", "v", backoff_s=0.001)
    monkeypatch.undo()
    assert r.commit_attempts >= 3  # the sources overwrite needed a second attempt
    src = scan_sources(catalog, [T1])
    assert src.num_rows == core_count(T1)
    assert set(src["RUN_ID"].to_pylist()) == {"run-a"}
    assert catalog.load_table(("shear", "sources")).current_snapshot().summary[PROP_RUN_ID] == "run-mine"


def test_concurrent_same_tile_overwrite_is_a_conflict_not_a_duplicate(catalog, results):
    """The premise of the retry loop: under serializable isolation, an overwrite planned before a
    concurrent commit of the same tile fails validation instead of silently adding a second copy."""
    assemble_tile(catalog, T1, results[T1], "run-1", "h", "v")
    data = scan_sources(catalog, [T1])
    t_a = catalog.load_table(("shear", "sources"))
    t_b = catalog.load_table(("shear", "sources"))
    tx_a = t_a.transaction()
    tx_a.overwrite(data, overwrite_filter=tile_filter(T1))
    tx_b = t_b.transaction()
    tx_b.overwrite(data, overwrite_filter=tile_filter(T1))
    tx_a.commit_transaction()
    with pytest.raises(ValidationException):
        tx_b.commit_transaction()
    assert scan_sources(catalog, [T1]).num_rows == data.num_rows


def test_crash_between_tables_is_detected_and_healed(catalog, results, tmp_path, monkeypatch):
    assemble_tile(catalog, T1, results[T1], "run-1", "h", "v")
    rerun = make_tile_results(str(tmp_path / "rerun"), T1, run_id="run-b", seed=0)
    real = assemble_mod.overwrite_tiles

    def crash_on_subtiles(catalog_, identifier, *args, **kwargs):
        if identifier[1] == "subtiles":
            raise KeyboardInterrupt("killed between the two table commits")
        return real(catalog_, identifier, *args, **kwargs)

    monkeypatch.setattr(assemble_mod, "overwrite_tiles", crash_on_subtiles)
    with pytest.raises(KeyboardInterrupt):
        assemble_tile(catalog, T1, rerun, "run-2", "h", "v")
    monkeypatch.undo()
    checks = {o.name: o for o in run_catalog_checks(catalog)}
    assert not checks["run_consistency"].passed
    assert checks["run_consistency"].metadata["tiles"] == [T1]
    assemble_tile(catalog, T1, rerun, "run-3", "h", "v")
    checks = {o.name: o for o in run_catalog_checks(catalog)}
    assert all(o.passed for o in checks.values()), {k: o.message for k, o in checks.items() if not o.passed}
    assert scan_sources(catalog, [T1]).num_rows == core_count(T1)


def test_scan_by_box_matches_numpy(catalog, results):
    for t in (T1, T2):
        assemble_tile(catalog, t, results[t], "r", "h", "v")
    everything = scan_sources(catalog)
    ra, dec = everything["RA"].to_numpy(), everything["DEC"].to_numpy()
    box = (
        float(np.percentile(ra, 20)),
        float(np.percentile(ra, 70)),
        float(np.percentile(dec, 10)),
        float(dec.max()),
    )
    got = scan_sources(catalog, box=box)
    want = (ra >= box[0]) & (ra < box[1]) & (dec >= box[2]) & (dec <= box[3])
    assert 0 < got.num_rows == int(want.sum())
    both = scan_sources(catalog, tile_ids=[T2], box=box, columns=["OBJECT_ID", "TILE_ID"])
    assert both.column_names == ["OBJECT_ID", "TILE_ID"]
    assert set(both["TILE_ID"].to_pylist()) <= {T2}
    assert both.num_rows == int((want & (everything["TILE_ID"].to_numpy() == T2)).sum())


def test_catalog_properties_dispatch(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    wh = str(tmp_path / "wh")
    assert catalog_properties(None, wh)["uri"].startswith("sqlite:///")
    assert catalog_properties("postgresql+psycopg2://u@h:5432/db", wh)["type"] == "sql"
    assert catalog_properties("https://rest.example/api", wh)["type"] == "rest"
    assert catalog_properties("glue", "s3://b/wh")["type"] == "glue"
    props = catalog_properties("sqlite:////tmp/x.db", "s3://b/wh", s3_endpoint_url="http://127.0.0.1:9")
    assert props["s3.endpoint"] == "http://127.0.0.1:9" and props["s3.secret-access-key"] == "s3cr3t"
    assert "s3.secret-access-key" not in catalog_properties(None, wh)  # local warehouse: no S3 settings
    from constellation_assets.catalog.tables import CatalogConfigError

    with pytest.raises(CatalogConfigError, match="catalog_uri"):
        catalog_properties(None, "s3://b/wh")


def test_expire_snapshots_keeps_data(catalog, results):
    from datetime import timedelta

    from constellation_assets.catalog.maintenance import expire_snapshots

    for i in range(3):
        assemble_tile(catalog, T1, results[T1], f"r{i}", "h", "v")
    assemble_tile(catalog, T2, results[T2], "r", "h", "v")
    table = catalog.load_table(("shear", "sources"))
    old_ids = [s.snapshot_id for s in table.metadata.snapshots]
    assert len(old_ids) == 4  # one snapshot per table per assembly
    expired = expire_snapshots(catalog, keep_last=2, min_age=timedelta(0))
    assert expired["shear.sources"] == len(old_ids) - 2
    table = catalog.load_table(("shear", "sources"))
    assert len(table.metadata.snapshots) == 2
    assert _tile_counts(catalog) == {T1: core_count(T1), T2: core_count(T2)}
    # assembling after expiry still works and stays idempotent
    assemble_tile(catalog, T1, results[T1], "r9", "h", "v")
    assert _tile_counts(catalog) == {T1: core_count(T1), T2: core_count(T2)}


def test_empty_tile_replaces_previous_rows(catalog, results, tmp_path):
    """A tile whose new results hold no core source ends with no source rows (and its 16 sub-tile rows)."""
    assemble_tile(catalog, T1, results[T1], "r1", "h", "v")
    empty = []
    for uri in results[T1]:
        table, summary = read_subtile_result(uri)
        summary = dict(summary, N_SOURCES=0, G1=float("nan"), G2=float("nan"))
        out = str(tmp_path / "empty" / uri.rsplit("/", 1)[-1])
        empty.append(write_subtile_result(table.slice(0, 0), summary, out))
    r = assemble_tile(catalog, T1, empty, "r2", "h", "v")
    assert r.n_sources == 0 and r.n_subtiles == 16
    assert scan_sources(catalog, [T1]).num_rows == 0
    assert scan_subtiles(catalog, [T1]).num_rows == 16
    checks = {o.name: o for o in run_catalog_checks(catalog)}
    assert checks["finite_shear"].passed  # NaN shear of empty sub-tiles is expected
