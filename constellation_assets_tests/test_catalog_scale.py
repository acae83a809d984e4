"""Survey-scale catalog mechanics: batched assembly, append-only commits for new tiles, compaction,
manifest re-grouping, snapshot expiry and dead-file removal, and their interplay with re-assembly."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pyarrow.compute as pc
import pytest
from pyiceberg.exceptions import CommitFailedException, ValidationException

from constellation_assets.catalog.assemble import (
    PROP_TILE_COUNT,
    assemble_tile,
    assemble_tiles,
    plan_tile_replacement,
)
from constellation_assets.catalog.maintenance import (
    _compaction_groups,
    _rewrite,
    compact_data_files,
    expire_snapshots,
    maintain_catalog,
    rewrite_manifests,
)
from constellation_assets.catalog.query import scan_sources, scan_subtiles
from constellation_assets.catalog.tables import open_catalog_from
from constellation_assets.quality import run_catalog_checks
from constellation_assets_tests.catalog_testdata import core_count, make_tile_results

N_SRC = 200
# Tiles sharing TILE_BUCKET (= TILE_ID mod 256): one partition, so compaction has several files to merge.
SAME_BUCKET = [102044185 + 256 * k for k in range(4)]
NEIGHBOURS = [102044186, 102044187]


@pytest.fixture()
def catalog(tmp_path):
    return open_catalog_from(None, str(tmp_path / "warehouse"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("results"))
    return {t: make_tile_results(out, t, n_sources=N_SRC) for t in SAME_BUCKET + NEIGHBOURS}


def _counts(catalog, table="sources"):
    scan = scan_sources(catalog) if table == "sources" else scan_subtiles(catalog)
    return {d["values"]: d["counts"] for d in pc.value_counts(scan["TILE_ID"]).to_pylist()}


def _expected(tiles):
    return {t: core_count(t, N_SRC) for t in tiles}


def _tile_rows(catalog, tile_id):
    return scan_sources(catalog, [tile_id]).sort_by("OBJECT_ID").to_pylist()


def _live_files(catalog, name="sources"):
    table = catalog.load_table(("shear", name))
    return [t.file for t in table.scan().plan_files()]


def test_batch_is_one_append_and_reassembly_one_overwrite(catalog, results):
    tiles = SAME_BUCKET[:2] + NEIGHBOURS
    out = assemble_tiles(catalog, {t: results[t] for t in tiles}, "run-1", "h", "v")
    assert [r.tile_id for r in out] == sorted(tiles) and all(r.batch_size == 4 for r in out)
    assert _counts(catalog) == _expected(tiles)
    assert _counts(catalog, "subtiles") == {t: 16 for t in tiles}
    src = catalog.load_table(("shear", "sources"))
    assert len(src.metadata.snapshots) == 1  # one commit for the whole batch
    head = src.current_snapshot()
    assert head.summary.operation.value == "append" and head.summary[PROP_TILE_COUNT] == "4"
    assert len(_live_files(catalog)) == 4  # one data file per tile

    # re-assembling two of them with a new tile: exactly one copy each, one snapshot, the others untouched
    before = _tile_rows(catalog, NEIGHBOURS[1])
    again = [SAME_BUCKET[0], NEIGHBOURS[0], SAME_BUCKET[2]]
    assemble_tiles(catalog, {t: results[t] for t in again}, "run-2", "h", "v")
    all_tiles = set(tiles) | set(again)
    assert _counts(catalog) == _expected(all_tiles)
    assert _counts(catalog, "subtiles") == {t: 16 for t in all_tiles}
    src = catalog.load_table(("shear", "sources"))
    assert len(src.metadata.snapshots) == 2
    assert src.current_snapshot().summary.operation.value == "overwrite"
    assert _tile_rows(catalog, NEIGHBOURS[1]) == before
    runs = scan_sources(catalog, again, columns=["RUN_ID"])["RUN_ID"].to_pylist()
    assert set(runs) == {"run-a"}  # the RUN_ID of the result files
    checks = {o.name: o for o in run_catalog_checks(catalog)}
    assert all(o.passed for o in checks.values()), {k: o.message for k, o in checks.items() if not o.passed}


def test_bad_file_in_a_batch_commits_nothing(catalog, results, tmp_path):
    bad = Path(tmp_path / f"{NEIGHBOURS[1]}_0_0.parquet")
    bad.write_bytes(b"not parquet")
    batch = {NEIGHBOURS[0]: results[NEIGHBOURS[0]], NEIGHBOURS[1]: [str(bad)]}
    with pytest.raises(Exception, match=str(bad.name)):
        assemble_tiles(catalog, batch, "r", "h", "v")
    assert not catalog.table_exists(("shear", "sources")) or scan_sources(catalog).num_rows == 0


def test_compaction_keeps_rows_and_reassembly_rewrites_the_compacted_file(catalog, results):
    present = [SAME_BUCKET[0], SAME_BUCKET[1], SAME_BUCKET[3]]
    absent = SAME_BUCKET[2]  # same bucket, inside the TILE_ID range the compacted file will cover
    for t in present:
        assemble_tile(catalog, t, results[t], "r", "h", "v")
    assemble_tile(catalog, NEIGHBOURS[0], results[NEIGHBOURS[0]], "r", "h", "v")
    rows_before = {t: _tile_rows(catalog, t) for t in present + NEIGHBOURS[:1]}
    n_files = len(_live_files(catalog))
    reports = compact_data_files(catalog, min_input_files=2, min_file_age=timedelta(0))
    assert reports[0].files_rewritten == 3 and reports[0].partitions_compacted == 1
    assert reports[1].files_rewritten == 3  # shear.subtiles too
    assert len(_live_files(catalog)) == n_files - 3 + 1
    assert {t: _tile_rows(catalog, t) for t in rows_before} == rows_before
    assert _counts(catalog, "subtiles") == {t: 16 for t in rows_before}

    table = catalog.load_table(("shear", "sources"))
    plan = plan_tile_replacement(table, [SAME_BUCKET[1]])
    assert not plan.whole_files and len(plan.rewrites) == 1 and plan.tiles_present == {SAME_BUCKET[1]}
    assert set(plan.rewrites[0][1]["TILE_ID"].to_pylist()) == {SAME_BUCKET[0], SAME_BUCKET[3]}
    assert plan_tile_replacement(table, [absent]).is_empty  # opened (TILE_ID column), holds no row of it

    # a new tile inside the compacted file's range is a plain append
    assemble_tile(catalog, absent, results[absent], "r", "h", "v")
    assert catalog.load_table(("shear", "sources")).current_snapshot().summary.operation.value == "append"
    # re-assembling a tile that now lives in the compacted file: one copy, the other tiles unchanged
    assemble_tile(catalog, SAME_BUCKET[1], results[SAME_BUCKET[1]], "r2", "h", "v")
    assert _counts(catalog) == _expected(SAME_BUCKET + NEIGHBOURS[:1])
    for t in rows_before:
        if t != SAME_BUCKET[1]:
            assert _tile_rows(catalog, t) == rows_before[t]
    checks = {o.name: o for o in run_catalog_checks(catalog)}
    assert all(o.passed for o in checks.values()), {k: o.message for k, o in checks.items() if not o.passed}


def test_concurrent_assembly_wins_over_compaction(catalog, results):
    for t in SAME_BUCKET[:3]:
        assemble_tile(catalog, t, results[t], "r", "h", "v")
    stale = catalog.load_table(("shear", "sources"))
    groups, _ = _compaction_groups(stale, 1 << 30, timedelta(0), 2)
    assert len(groups) == 1 and len(groups[0]) == 3
    # an assembly re-writes one of the tiles after the compaction was planned
    assemble_tile(catalog, SAME_BUCKET[1], results[SAME_BUCKET[1]], "r-new", "h", "v")
    with pytest.raises((ValidationException, CommitFailedException)):
        _rewrite(stale, groups)
    assert _counts(catalog) == _expected(SAME_BUCKET[:3])
    # and the next compaction run re-plans from the new head and succeeds
    rep = compact_data_files(catalog, min_input_files=2, min_file_age=timedelta(0))[0]
    assert rep.files_rewritten == 3
    assert _counts(catalog) == _expected(SAME_BUCKET[:3])


def test_recent_files_are_not_compacted(catalog, results):
    for t in SAME_BUCKET[:3]:
        assemble_tile(catalog, t, results[t], "r", "h", "v")
    rep = compact_data_files(catalog, min_input_files=2, min_file_age=timedelta(hours=1))[0]
    assert rep.files_rewritten == 0 and len(_live_files(catalog)) == 3


def test_manifest_rewrite_keeps_rows(catalog, results):
    for t in SAME_BUCKET + NEIGHBOURS:
        assemble_tile(catalog, t, results[t], "r", "h", "v")
    rows = {t: _tile_rows(catalog, t) for t in SAME_BUCKET + NEIGHBOURS}
    out = rewrite_manifests(catalog, min_manifests=2, buckets_per_manifest=1)
    before, after = out["shear.sources"]
    assert before == 6 and after == 3  # buckets of 102044185 (x4), 102044186, 102044187
    assert {t: _tile_rows(catalog, t) for t in rows} == rows
    head = catalog.load_table(("shear", "sources")).current_snapshot()
    assert head.summary.operation.value == "replace"
    assert int(head.summary["total-records"]) == sum(len(r) for r in rows.values())
    assemble_tile(catalog, NEIGHBOURS[0], results[NEIGHBOURS[0]], "r2", "h", "v")
    assert _counts(catalog) == _expected(SAME_BUCKET + NEIGHBOURS)


def test_maintenance_expires_deletes_dead_files_and_keeps_current_readable(catalog, results, tmp_path):
    for _ in range(3):
        for t in SAME_BUCKET:
            assemble_tile(catalog, t, results[t], "r", "h", "v")
    rows = {t: _tile_rows(catalog, t) for t in SAME_BUCKET}
    data_dir = tmp_path / "warehouse" / "shear" / "sources" / "data"
    parquet_before = len(list(Path(tmp_path / "warehouse").rglob("*.parquet")))
    rep = maintain_catalog(
        catalog, keep_last=2, min_age=timedelta(0), min_input_files=2, orphan_age=timedelta(0)
    )
    src = catalog.load_table(("shear", "sources"))
    assert len(src.metadata.snapshots) == 2
    assert rep.compaction[0].files_rewritten == len(SAME_BUCKET)
    deleted = sum(e.data_files_deleted for e in rep.expiry) + sum(rep.orphans_deleted.values())
    assert deleted > 0
    assert len(list(Path(tmp_path / "warehouse").rglob("*.parquet"))) < parquet_before
    # every file the current snapshot needs still exists: the catalog reads back unchanged
    assert {t: _tile_rows(catalog, t) for t in SAME_BUCKET} == rows
    assert _counts(catalog, "subtiles") == {t: 16 for t in SAME_BUCKET}
    # the older retained snapshot is readable too
    older = min(src.metadata.snapshots, key=lambda s: s.sequence_number).snapshot_id
    assert scan_sources(catalog, snapshot_id=older).num_rows > 0
    live = {Path(f.file_path.removeprefix("file://")) for f in _live_files(catalog)}
    assert live and all(p.exists() for p in live) and all(data_dir in p.parents for p in live)
    # assembling after maintenance still works and stays idempotent
    assemble_tile(catalog, SAME_BUCKET[0], results[SAME_BUCKET[0]], "r9", "h", "v")
    assert _counts(catalog) == _expected(SAME_BUCKET)


def test_assembly_bounds_its_own_snapshot_history(catalog, results):
    assemble_tile(catalog, NEIGHBOURS[0], results[NEIGHBOURS[0]], "r", "h", "v")
    table = catalog.load_table(("shear", "sources"))
    with table.transaction() as tx:
        tx.set_properties({"history.expire.min-snapshots-to-keep": "2"})
    # ensure_tables would restore the package's value: bypass it by assembling with the property set
    # on both tables and checking the bound after several commits
    sub = catalog.load_table(("shear", "subtiles"))
    with sub.transaction() as tx:
        tx.set_properties({"history.expire.min-snapshots-to-keep": "2"})
    from constellation_assets.catalog import assemble as assemble_mod

    real = assemble_mod.ensure_tables
    assemble_mod.ensure_tables = lambda *a, **k: None
    try:
        for _ in range(6):
            assemble_tile(catalog, NEIGHBOURS[0], results[NEIGHBOURS[0]], "r", "h", "v")
    finally:
        assemble_mod.ensure_tables = real
    assert len(catalog.load_table(("shear", "sources")).metadata.snapshots) <= 4
    assert _counts(catalog) == _expected(NEIGHBOURS[:1])


def test_expire_snapshots_defaults_and_validation(catalog, results):
    with pytest.raises(ValueError, match="keep_last"):
        expire_snapshots(catalog, keep_last=0)
    assert expire_snapshots(catalog) == {"shear.sources": 0, "shear.subtiles": 0}  # no tables yet


def test_maintenance_asset_runs_in_dagster(tmp_path, results):
    import dagster as dg
    import yaml

    from constellation_assets.catalog.tables import open_catalog
    from constellation_assets.config import load_config
    from constellation_assets.defs.maintenance import (
        catalog_maintenance,
        catalog_maintenance_checks,
        catalog_maintenance_job,
    )
    from constellation_assets.defs.resources import ConstellationConfigResource
    from constellation_assets.quality.catalog_health import catalog_health_outcomes

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"tile_ids": SAME_BUCKET, "output": {"root_uri": str(tmp_path / "out")}}))
    catalog = open_catalog(load_config(str(path)))
    for _ in range(2):
        for t in SAME_BUCKET:
            assemble_tile(catalog, t, results[t], "r", "h", "v")
    rows = {t: _tile_rows(catalog, t) for t in SAME_BUCKET}
    run_config = {
        "ops": {
            "catalog_maintenance": {
                "config": {
                    "keep_last": 2,
                    "min_age_minutes": 0,
                    "orphan_age_minutes": 0,
                    "min_input_files": 2,
                }
            }
        }
    }
    res = dg.materialize(
        [catalog_maintenance, catalog_maintenance_checks],
        resources={"pipeline_config": ConstellationConfigResource(config_path=str(path))},
        run_config=run_config,
    )
    assert res.success
    checks = {e.check_name: e for e in res.get_asset_check_evaluations()}
    assert set(checks) == {"files_present", "rows_match_summary", "history_bounded"}
    assert all(e.passed for e in checks.values()), [(n, e.description) for n, e in checks.items()]
    md = res.asset_materializations_for_node("catalog_maintenance")[0].metadata
    assert md["files_rewritten"].value == 2 * len(SAME_BUCKET)  # both tables' small files
    assert md["snapshots_expired"].value > 0 and md["dead_files_deleted"].value > 0
    assert len(catalog.load_table(("shear", "sources")).metadata.snapshots) == 2
    assert {t: _tile_rows(catalog, t) for t in SAME_BUCKET} == rows
    assert catalog_maintenance_job.name == "catalog_maintenance_job"
    # A live data file deleted behind the catalog's back: the health check fails and names it.
    live = next(iter(catalog.load_table(("shear", "sources")).scan().plan_files())).file.file_path
    Path(live.removeprefix("file://")).unlink()
    out = {o.name: o for o in catalog_health_outcomes(catalog, "shear")}
    assert not out["files_present"].passed and Path(live).name in out["files_present"].message
    assert out["rows_match_summary"].passed


def test_cli_assemble_batches_and_maintain(tmp_path, results):
    import json

    import yaml
    from click.testing import CliRunner

    from constellation_assets.catalog.tables import open_catalog
    from constellation_assets.cli import main
    from constellation_assets.config import load_config

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"root_uri": str(tmp_path / "out")}}))
    files = [u for t in SAME_BUCKET for u in results[t]]
    runner = CliRunner()
    for batch in ("3", "1"):
        res = runner.invoke(
            main, ["assemble", "--config", str(config), "--batch-size", batch, "--json", *files]
        )
        assert res.exit_code == 0, res.output
    done = json.loads(res.stdout)
    assert {d["tile_id"]: d["n_sources"] for d in done} == _expected(SAME_BUCKET)
    catalog = open_catalog(load_config(str(config)))
    # 4 tiles in batches of 3 (2 commits), then 4 commits of one tile
    assert len(catalog.load_table(("shear", "sources")).metadata.snapshots) == 6
    args = [
        "--min-age-minutes",
        "0",
        "--orphan-age-minutes",
        "0",
        "--min-input-files",
        "2",
        "--keep-last",
        "1",
    ]
    res = runner.invoke(main, ["catalog", "maintain", "--config", str(config), "--json", *args])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["compaction"][0]["files_rewritten"] == len(SAME_BUCKET)
    assert report["expiry"][0]["snapshots_expired"] == 6  # 6 commits + compaction, newest kept
    assert _counts(catalog) == _expected(SAME_BUCKET)
    res = runner.invoke(main, ["catalog", "maintain", "--config", str(config), *args])
    assert res.exit_code == 0 and "sources" in res.stdout, res.output
    res = runner.invoke(main, ["validate", "--config", str(config), "--expected", "64", "--truth", "none"])
    assert res.exit_code == 0, res.output


def test_two_appends_of_the_same_new_tile_conflict_instead_of_duplicating(catalog, results):
    """The premise of append-only commits for new tiles: a writer that planned "tile absent" and finds
    that a concurrent commit added the tile fails validation (and then re-plans to one copy)."""
    from constellation_assets.catalog.assemble import (
        _stage_tile_replacement,
        load_tile_results,
        overwrite_tiles,
    )
    from constellation_assets.catalog.tables import ensure_tables

    tile = NEIGHBOURS[0]
    ensure_tables(catalog)
    assemble_tile(catalog, NEIGHBOURS[1], results[NEIGHBOURS[1]], "r", "h", "v")  # table not empty
    sources = load_tile_results(tile, results[tile])[0]
    ident = ("shear", "sources")
    t_a, t_b = catalog.load_table(ident), catalog.load_table(ident)
    plans = [plan_tile_replacement(t, [tile]) for t in (t_a, t_b)]
    assert all(p.is_empty for p in plans)
    tx_a, tx_b = t_a.transaction(), t_b.transaction()
    _stage_tile_replacement(tx_a, t_a, {tile: sources}, plans[0], {})
    _stage_tile_replacement(tx_b, t_b, {tile: sources}, plans[1], {})
    tx_a.commit_transaction()
    with pytest.raises(ValidationException):
        tx_b.commit_transaction()
    assert _counts(catalog)[tile] == sources.num_rows
    # an unrelated tile appended concurrently is no conflict
    t_c = catalog.load_table(ident)
    other = load_tile_results(SAME_BUCKET[0], results[SAME_BUCKET[0]])[0]
    tx_c = t_c.transaction()
    _stage_tile_replacement(
        tx_c, t_c, {SAME_BUCKET[0]: other}, plan_tile_replacement(t_c, [SAME_BUCKET[0]]), {}
    )
    assemble_tile(catalog, SAME_BUCKET[1], results[SAME_BUCKET[1]], "r", "h", "v")
    tx_c.commit_transaction()
    # the retry loop re-plans the conflicting writer to exactly one copy
    overwrite_tiles(catalog, ident, {tile: sources}, {})
    assert _counts(catalog) == {
        tile: sources.num_rows,
        NEIGHBOURS[1]: core_count(NEIGHBOURS[1], N_SRC),
        SAME_BUCKET[0]: other.num_rows,
        SAME_BUCKET[1]: core_count(SAME_BUCKET[1], N_SRC),
    }


def test_tables_of_an_earlier_version_get_the_current_properties(catalog):
    from constellation_assets.catalog.tables import TABLE_PROPERTIES, ensure_tables

    sources, _ = ensure_tables(catalog)
    with sources.transaction() as tx:
        tx.set_properties(
            {"write.metadata.previous-versions-max": "100", "commit.manifest-merge.enabled": "true"}
        )
        tx.remove_properties("history.expire.min-snapshots-to-keep")
    sources, subtiles = ensure_tables(catalog)
    for table in (sources, subtiles, catalog.load_table(("shear", "sources"))):
        props = table.metadata.properties
        assert {k: props.get(k) for k in TABLE_PROPERTIES} == TABLE_PROPERTIES


def test_maintenance_schedule_requests_a_run_unless_one_is_running():
    import dagster as dg

    from constellation_assets.defs.maintenance import MAINTENANCE_JOB_NAME, catalog_maintenance_schedule

    with dg.instance_for_test() as instance:
        out = catalog_maintenance_schedule(dg.build_schedule_context(instance=instance))
        assert isinstance(out, dg.RunRequest)
        run = instance.create_run_for_job(
            dg.GraphDefinition(name="g", node_defs=[]).to_job(name=MAINTENANCE_JOB_NAME),
            status=dg.DagsterRunStatus.STARTED,
        )
        assert run.status == dg.DagsterRunStatus.STARTED
        out = catalog_maintenance_schedule(dg.build_schedule_context(instance=instance))
        assert isinstance(out, dg.SkipReason) and "in progress" in out.skip_message


def test_batches_over_200_tiles_still_prune_and_do_not_conflict_with_other_tiles(catalog, results):
    """IN lists longer than 200 values defeat Iceberg's metrics evaluation; the tile predicate is split."""
    from constellation_assets.catalog.assemble import _stage_tile_replacement, load_tile_results
    from constellation_assets.catalog.query import tiles_expression
    from constellation_assets.catalog.schema import SOURCES_TABLE_ARROW_SCHEMA
    from constellation_assets.catalog.tables import ensure_tables

    ensure_tables(catalog)
    tile = NEIGHBOURS[0]
    assemble_tile(catalog, SAME_BUCKET[0], results[SAME_BUCKET[0]], "r", "h", "v")
    batch = {t: SOURCES_TABLE_ARROW_SCHEMA.empty_table() for t in range(102050000, 102050300)}
    batch[tile] = load_tile_results(tile, results[tile])[0]
    table = catalog.load_table(("shear", "sources"))
    tx = table.transaction()
    _stage_tile_replacement(tx, table, batch, plan_tile_replacement(table, batch), {})
    # a concurrent commit of a tile outside the batch (same buckets as some batch tiles)
    assemble_tile(catalog, SAME_BUCKET[1], results[SAME_BUCKET[1]], "r", "h", "v")
    tx.commit_transaction()  # no false conflict
    assert _counts(catalog) == {
        tile: batch[tile].num_rows,
        SAME_BUCKET[0]: core_count(SAME_BUCKET[0], N_SRC),
        SAME_BUCKET[1]: core_count(SAME_BUCKET[1], N_SRC),
    }
    many = [*range(102060000, 102060450), tile, SAME_BUCKET[1]]
    got = scan_sources(catalog, many)
    assert set(got["TILE_ID"].to_pylist()) == {tile, SAME_BUCKET[1]}
    assert "Or(" in repr(tiles_expression(many))


def test_scale_benchmark_fill_matches_the_assembly_rows(tmp_path):
    """The benchmark's fill (rows made in memory, one append per batch) writes what the assembly commits:
    same schema, same rows per tile, one file per TILE_BUCKET; the timed probes still go through files."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_catalog_scale as bench
    finally:
        sys.path.pop(0)

    writer = bench.TileWriter(60)
    tile = bench.FIRST_TILE + 7
    real_src, real_sub = writer.tile_rows(tile)
    fill_src, fill_sub = writer.fill_rows(tile)
    assert fill_src.schema == real_src.schema and fill_sub.schema == real_sub.schema
    assert fill_src.num_rows == real_src.num_rows and fill_sub.num_rows == real_sub.num_rows
    assert sorted(fill_src["OBJECT_ID"].to_pylist()) == sorted(real_src["OBJECT_ID"].to_pylist())
    assert pc.max(pc.abs(pc.subtract(fill_sub["RA"], real_sub["RA"]))).as_py() < 1e-9
    res = bench.run(
        tmp_path, n_tiles=40, batch=8, n_sources=60, maintain_every=None, progress=False, fill_batch=12
    )
    # checkpoints 10, 30, 40: fills of 2, 12, 2 tiles, each followed by a probe of 8 through files
    assert res["tiles_filled"] == 16 and [r["tiles"] for r in res["checkpoints"]] == [10, 30, 40]
    assert res["checkpoints"][-1]["rows"] == 40 * real_src.num_rows
