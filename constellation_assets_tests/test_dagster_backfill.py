"""A real backfill run over two tile partitions (one run for the batch, as BackfillPolicy.multi_run plans it)
through tile_pipeline_job, on a tiny two-tile synthetic field: both tiles land in Iceberg, every tile gets its
own materialization metadata and check results, and the rows equal those of `constellation run --local`
(the same stage functions) apart from the run ids. Both paths leave the same stage records."""

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

pytestmark = pytest.mark.integration

TILES = [102044185, 102044186]
TILE_ASSETS = ["tile_sources", "tile_quadrants", "subtile_manifests", "shear_measurements", "shear_catalog"]


def _config(root: Path, out: str) -> dict:
    return {
        "data": {
            "vis_base_uri": str(root / "q1" / "VIS") + "/",
            "catalog_base_uri": str(root / "q1" / "catalogs" / "MER_FINAL_CATALOG") + "/",
        },
        "output": {"root_uri": str(root / out)},
        "compute": {"workers": 1},
        "field": {
            "tile_ids": TILES,
            "n_dithers": 1,
            "ccd_grid": [1, 1],
            "quadrant_nx_pix": 256,
            "quadrant_ny_pix": 256,
            "galaxy_density_arcmin2": 150,
            "star_density_arcmin2": 1,
        },
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from constellation_assets.config import load_config
    from constellation_assets.defs import build_definitions
    from constellation_assets.defs.partitions import register_tile_partitions
    from constellation_assets.pipeline import run_local

    root = tmp_path_factory.mktemp("two_tiles")
    paths = {}
    for name in ("cli", "dagster"):
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(_config(root, f"out_{name}")))

    cli = run_local(load_config(str(paths["cli"])), progress=False)

    defs = build_definitions("local")
    job = defs.resolve_job_def("tile_pipeline_job")
    with dg.instance_for_test() as instance:
        register_tile_partitions(instance, TILES)
        # What the backfill daemon launches for a batch: one run with the partition range tags.
        result = job.execute_in_process(
            instance=instance,
            run_config={"resources": {"pipeline_config": {"config": {"config_path": str(paths["dagster"])}}}},
            tags={
                "dagster/asset_partition_range_start": str(TILES[0]),
                "dagster/asset_partition_range_end": str(TILES[1]),
            },
            raise_on_error=False,
        )
        status = instance.get_status_by_partition(
            dg.AssetKey("shear_catalog"), [str(t) for t in TILES], job.partitions_def
        )
        yield {
            "cli": cli,
            "instance": instance,
            "paths": paths,
            "result": result,
            "status": status,
            "cfg": {k: load_config(str(p)) for k, p in paths.items()},
        }


def _sources(cfg):
    import polars as pl

    from constellation_assets.catalog.query import scan_sources
    from constellation_assets.catalog.tables import namespace_from_config, open_catalog

    rows = pl.from_arrow(scan_sources(open_catalog(cfg), TILES, namespace=namespace_from_config(cfg)))
    return rows.drop("RUN_ID").sort("TILE_ID", "OBJECT_ID")


def test_two_partition_backfill_run_puts_both_tiles_in_iceberg(runs):
    result = runs["result"]
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert runs["status"] == {str(t): dg.AssetPartitionStatus.MATERIALIZED for t in TILES}
    sources = _sources(runs["cfg"]["dagster"])
    assert set(sources["TILE_ID"].unique().to_list()) == set(TILES)

    # One materialization per asset per tile, with that tile's own metadata.
    mats = {}
    for e in result.get_asset_materialization_events():
        m = e.materialization
        mats[(m.asset_key.to_user_string(), m.partition)] = m.metadata
    for asset in TILE_ASSETS:
        for t in TILES:
            assert (asset, str(t)) in mats, (asset, t)
    for t in TILES:
        md = mats[("shear_catalog", str(t))]
        assert md["tile_id"].value == t
        assert md["commit_attempts"].value == 1  # a clean commit into an empty catalog
        assert md["dagster/row_count"].value == sources.filter(sources["TILE_ID"] == t).height
        cols = {c.name: c.description for c in md["dagster/column_schema"].schema.columns}
        assert cols["R11"] and cols["OBJECT_ID"]
        assert "data:image/png;base64," in md["shear_map"].value
        assert Path(md["shear_map_png"].value).exists()
        assert mats[("tile_sources", str(t))]["tile_id"].value == t

    # Every check reports per tile partition, and none twice.
    evals = [
        (e.asset_key.to_user_string(), e.check_name, e.partition)
        for e in result.get_asset_check_evaluations()
    ]
    assert len(evals) == len(set(evals))
    by_check: dict = {}
    for asset, name, partition in evals:
        by_check.setdefault((asset, name), set()).add(partition)
    assert by_check[("shear_catalog", "unique_object_id")] == {str(t) for t in TILES}
    assert by_check[("subtile_manifests", "core_membership")] == {str(t) for t in TILES}
    assert ("shear_measurements", "unique_object_id") not in by_check  # catalog-level checks run once
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert not failed, [(e.check_name, e.partition, e.description) for e in failed]


def test_dagster_and_cli_write_identical_rows_and_records(runs):
    import polars.testing

    assert runs["result"].success
    cli, dag = _sources(runs["cfg"]["cli"]), _sources(runs["cfg"]["dagster"])
    assert cli.height > 0
    polars.testing.assert_frame_equal(cli, dag)

    # The stage functions wrote the same records on both paths (apart from time, paths and hash).
    skip = {"execution_timestamp_utc", "output", "data", "config_hash", "git_commit"}
    for stage in ("prepare", "infer", "assemble"):
        recs = []
        for name in ("cli", "dagster"):
            cfg = runs["cfg"][name]
            uri = Path(cfg.output.root_uri) / stage / cfg.field_name / f"run_config_{cfg.field_name}.json"
            recs.append({k: v for k, v in json.loads(uri.read_text()).items() if k not in skip})
        assert recs[0] == recs[1], stage
        assert recs[0]["extra"]["tiles"] == TILES
    # Different output locations: different config hashes (nothing mixes the two up).
    from constellation_assets.provenance import config_hash

    assert config_hash(runs["cfg"]["cli"]) != config_hash(runs["cfg"]["dagster"])


def test_a_check_reruns_on_the_stored_files_of_one_partition(runs):
    """Break one tile's stored manifests, re-run the manifest checks alone for that partition (the UI's Execute):
    it fails there and says why, the other tile's last result stays green."""
    from constellation_assets.defs import build_definitions
    from constellation_assets.prepare import manifest_uri

    cfg = runs["cfg"]["dagster"]
    Path(manifest_uri(cfg, TILES[1], 0, 0)).unlink()
    base = build_definitions("local")
    recheck = dg.define_asset_job(
        "recheck_manifests",
        selection=dg.AssetSelection.checks(
            dg.AssetCheckKey(dg.AssetKey("subtile_manifests"), "manifest_count"),
            dg.AssetCheckKey(dg.AssetKey("subtile_manifests"), "core_membership"),
        ),
        partitions_def=base.resolve_job_def("tile_pipeline_job").partitions_def,
    )
    defs = dg.Definitions.merge(base, dg.Definitions(jobs=[recheck]))
    res = defs.resolve_job_def("recheck_manifests").execute_in_process(
        instance=runs["instance"],
        run_config={
            "resources": {"pipeline_config": {"config": {"config_path": str(runs["paths"]["dagster"])}}}
        },
        tags={"dagster/partition": str(TILES[1])},
        raise_on_error=False,
    )
    evals = {e.check_name: e for e in res.get_asset_check_evaluations()}
    assert set(evals) == {"manifest_count", "core_membership"}
    assert evals["manifest_count"].partition == str(TILES[1]) and not evals["manifest_count"].passed
    assert evals["manifest_count"].description == "15 manifests, 16 sub-tiles"
    key = dg.AssetCheckKey(dg.AssetKey("subtile_manifests"), "manifest_count")
    latest = {}
    for rec in runs["instance"].event_log_storage.get_asset_check_execution_history(key, limit=10):
        latest.setdefault(rec.partition, rec.status.value)
    assert latest == {str(TILES[0]): "SUCCEEDED", str(TILES[1]): "FAILED"}
