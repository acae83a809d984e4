"""Tile partitions: batched registration, discovery sensor, incremental run planning for new/failed tiles."""

import json

import dagster as dg
import pytest

from constellation_assets.defs.partitions import (
    MER_TILE_PARTITIONS_NAME,
    add_tile_partition_requests,
    register_tile_partitions,
    validate_tile_keys,
)

TILES = [str(102_000_000 + i) for i in range(1_234)]


@pytest.fixture()
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_validate_tile_keys_names_the_bad_key():
    assert validate_tile_keys([102044185, "102044185", " 102018211 "]) == ["102044185", "102018211"]
    with pytest.raises(ValueError, match="'12345' is not a MER tile id"):
        validate_tile_keys(["102044185", "12345"])


def test_registration_is_batched_and_idempotent(instance, monkeypatch):
    calls = []
    original = instance.add_dynamic_partitions

    def spy(name, keys):
        calls.append(len(keys))
        return original(name, keys)

    monkeypatch.setattr(instance, "add_dynamic_partitions", spy)
    new = register_tile_partitions(instance, TILES, batch_size=500)
    assert new == TILES
    assert calls == [500, 500, 234]
    assert list(instance.get_dynamic_partitions(MER_TILE_PARTITIONS_NAME)) == TILES
    assert register_tile_partitions(instance, TILES + ["102999999"]) == ["102999999"]


def test_sensor_requests_are_chunked():
    reqs = add_tile_partition_requests(TILES, batch_size=500)
    assert [len(r.partition_keys) for r in reqs] == [500, 500, 234]
    assert all(r.partitions_def_name == "mer_tile" for r in reqs)


def test_discovery_sensor_registers_config_tiles(instance, tmp_path):
    from constellation_assets.defs.resources import ConstellationConfigResource
    from constellation_assets.defs.sensors import mer_tile_discovery_sensor

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("tile_ids: [102044185, 102018211]\ninjection: {partitions: 2, tiers: [train]}\n")
    res = ConstellationConfigResource(config_path=str(cfg_file))
    ctx = dg.build_sensor_context(instance=instance, resources={"pipeline_config": res})
    result = mer_tile_discovery_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    by_def = {r.partitions_def_name: list(r.partition_keys) for r in result.dynamic_partitions_requests}
    assert by_def == {
        "mer_tile": ["102044185", "102018211"],
        "injection_shard": ["train/00000", "train/00001"],
    }
    register_tile_partitions(instance, ["102044185", "102018211"])
    instance.add_dynamic_partitions("injection_shard", ["train/00000", "train/00001"])
    again = mer_tile_discovery_sensor(
        dg.build_sensor_context(instance=instance, resources={"pipeline_config": res})
    )
    assert isinstance(again, dg.SkipReason)


def test_discovery_lists_catalog_prefix(tmp_path):
    from constellation_assets.config import load_config
    from constellation_assets.io.q1 import discover_tile_ids

    base = tmp_path / "q1" / "catalogs" / "MER_FINAL_CATALOG"
    for t in ("102041031", "102047412", "not_a_tile"):
        (base / t).mkdir(parents=True)
    cfg = load_config({"data": {"catalog_base_uri": str(base) + "/"}})
    assert discover_tile_ids(cfg) == ["102041031", "102047412"]
    assert discover_tile_ids(load_config({"tile_ids": [102044185]})) == ["102044185"]


def test_discovery_without_data_yet(tmp_path):
    """An absent prefix is "no data yet": nothing, or the synthetic field the config explicitly declares."""
    from constellation_assets.config import load_config
    from constellation_assets.io.q1 import discover_tile_ids

    absent = str(tmp_path / "none" / "MER_FINAL_CATALOG") + "/"
    assert discover_tile_ids(load_config({"data": {"catalog_base_uri": absent}})) == []
    demo = load_config({"data": {"catalog_base_uri": absent}, "field": {"tile_ids": [102044185, 102044186]}})
    assert discover_tile_ids(demo) == ["102044185", "102044186"]


def test_discovery_access_denied_fails_the_tick(instance, moto_s3, tmp_path):
    """S3 AccessDenied must fail loudly (naming the prefix), never register the field's demo tiles."""
    from constellation_assets.config import load_config
    from constellation_assets.defs.resources import ConstellationConfigResource
    from constellation_assets.defs.sensors import mer_tile_discovery_sensor
    from constellation_assets.io.q1 import discover_tile_ids
    from constellation_assets.io.uri import DataAccessError
    from constellation_assets_tests.faults import FaultProxy

    bucket = moto_s3["bucket"]
    moto_s3["client"].put_object(
        Bucket=bucket, Key="q1/catalogs/MER_FINAL_CATALOG/102044185/c.fits", Body=b"x"
    )
    with FaultProxy(moto_s3["endpoint_url"]) as proxy:
        proxy.add("status", method="GET", status=403, times=None)  # every listing: 403 AccessDenied
        raw = {
            "data": {
                "catalog_base_uri": f"s3://{bucket}/q1/catalogs/MER_FINAL_CATALOG/",
                "s3": {"endpoint_url": proxy.endpoint_url},
            },
            "field": {"tile_ids": [102044185, 102044186]},
        }
        with pytest.raises(DataAccessError, match="MER_FINAL_CATALOG") as err:
            discover_tile_ids(load_config(raw))
        assert "tile_ids" in str(err.value)  # says what to do
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps(raw))
        ctx = dg.build_sensor_context(
            instance=instance,
            resources={"pipeline_config": ConstellationConfigResource(config_path=str(path))},
        )
        with pytest.raises(Exception, match="Cannot list the MER catalog prefix"):
            mer_tile_discovery_sensor(ctx)
    assert list(instance.get_dynamic_partitions("mer_tile")) == []


def _fail_or_succeed(instance, key, fail):
    @dg.asset(name="shear_catalog", partitions_def=dg.DynamicPartitionsDefinition(name="mer_tile"))
    def fake_catalog():
        # A stand-in materializing only the partition status of the real asset key (the planner reads status).
        if fail:
            raise RuntimeError("boom")

    dg.materialize([fake_catalog], instance=instance, partition_key=key, raise_on_error=False)


def test_plan_tile_runs_new_failed_done_and_retry_cap(instance):
    from constellation_assets.defs.sensors import plan_tile_runs

    keys = ["102000001", "102000002", "102000003"]
    register_tile_partitions(instance, keys)
    _fail_or_succeed(instance, "102000002", fail=True)
    _fail_or_succeed(instance, "102000003", fail=False)
    reqs, attempts = plan_tile_runs(instance, {}, max_retries=2)
    by_key = {r.partition_key: r for r in reqs}
    assert set(by_key) == {"102000001", "102000002"}  # new + failed; materialized one skipped
    assert by_key["102000001"].run_key == "102000001:1"
    # Same cursor, nothing changed: the new tile is not requested again, the failed one is retried once more.
    reqs2, attempts2 = plan_tile_runs(instance, attempts, max_retries=2)
    assert [r.partition_key for r in reqs2] == ["102000002"]
    reqs3, _ = plan_tile_runs(instance, attempts2, max_retries=2)
    assert reqs3 == []  # out of retries
    capped, _ = plan_tile_runs(instance, {}, max_runs=1)
    assert len(capped) == 1
    json.dumps(attempts2)  # the cursor is JSON


def test_tile_pipeline_sensor_targets_the_tile_job(instance):
    from constellation_assets.defs.sensors import tile_pipeline_sensor

    register_tile_partitions(instance, ["102000001"])
    result = tile_pipeline_sensor(dg.build_sensor_context(instance=instance))
    assert [r.partition_key for r in result.run_requests] == ["102000001"]
    assert json.loads(result.cursor) == {"102000001": 1}
