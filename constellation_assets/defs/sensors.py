"""Sensors and schedules: tile discovery (dynamic partitions) and incremental runs for new/failed tiles.

Dynamic partitions get no built-in schedule, so :func:`plan_tile_runs` decides which tiles need a run
from the partition status of the last asset of the tile pipeline (``shear_catalog``): never materialized
-> a first run; last attempt failed -> a retry (bounded per tile); in progress or done -> nothing.
"""

import json
from collections.abc import Mapping, Sequence

import dagster as dg

from constellation_assets.defs.jobs import calibration_job, tile_pipeline_job
from constellation_assets.defs.partitions import (
    INJECTION_SHARD_PARTITIONS_NAME,
    MER_TILE_PARTITIONS_NAME,
    add_tile_partition_requests,
    mer_tile_partitions,
    new_tile_keys,
)
from constellation_assets.defs.resources import ConstellationConfigResource

#: New partitions handed to the daemon per discovery tick (keeps a tick short at survey scale).
MAX_NEW_TILES_PER_TICK = 20_000
#: Runs requested per tick by the tile sensor; the run queue and the gpu pool do the rest.
MAX_RUNS_PER_TICK = 200
#: Failed tiles are retried at most this many times by the sensor (then they need a person).
MAX_RETRIES_PER_TILE = 2


def build_discovery_sensor(
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
) -> dg.SensorDefinition:
    """The tile discovery sensor (on by default in the local deployment, so a first run needs no switch)."""

    @dg.sensor(
        name="mer_tile_discovery_sensor",
        minimum_interval_seconds=600,
        default_status=default_status,
        description="Registers MER tiles (config tile_ids, else the {tile_id}/ folders of the MER catalog "
        "prefix data.catalog_base_uri, else the synthetic field the config declares) as mer_tile partitions, "
        f"in batches of at most {MAX_NEW_TILES_PER_TICK} per tick, and the config's injection shards. "
        "A prefix that cannot be listed (access denied, no credentials) fails the tick with the reason.",
    )
    def mer_tile_discovery_sensor(
        context: dg.SensorEvaluationContext, pipeline_config: ConstellationConfigResource
    ) -> dg.SensorResult | dg.SkipReason:
        from constellation_assets.io.q1 import discover_tile_ids
        from constellation_assets.sim.injection import partition_keys

        cfg = pipeline_config.load()
        found = discover_tile_ids(cfg)  # raises DataAccessError on access problems: a failed tick
        if not found:
            return dg.SkipReason(
                f"no MER tiles yet under {cfg.data.catalog_base_uri} (and no tile_ids in the config)"
            )
        new = new_tile_keys(context.instance, found)
        existing = set(context.instance.get_dynamic_partitions(INJECTION_SHARD_PARTITIONS_NAME))
        shards = [k for k in partition_keys(cfg) if k not in existing]
        if not new and not shards:
            return dg.SkipReason(f"all {len(found)} MER tiles and the injection shards are registered")
        batch = new[:MAX_NEW_TILES_PER_TICK]
        context.log.info(
            f"registering {len(batch)} of {len(new)} new MER tiles, {len(shards)} injection shards"
        )
        requests = add_tile_partition_requests(batch)
        if shards:
            requests.append(
                dg.AddDynamicPartitionsRequest(
                    partitions_def_name=INJECTION_SHARD_PARTITIONS_NAME, partition_keys=shards
                )
            )
        return dg.SensorResult(dynamic_partitions_requests=requests)

    return mer_tile_discovery_sensor


mer_tile_discovery_sensor = build_discovery_sensor()


def plan_tile_runs(
    instance: dg.DagsterInstance,
    attempts: Mapping[str, int],
    max_runs: int = MAX_RUNS_PER_TICK,
    max_retries: int = MAX_RETRIES_PER_TILE,
    partition_keys: Sequence[str] | None = None,
) -> tuple[list[dg.RunRequest], dict[str, int]]:
    """RunRequests for tiles never materialized or whose last run failed; returns (requests, attempts)."""
    keys = (
        list(partition_keys)
        if partition_keys is not None
        else instance.get_dynamic_partitions(MER_TILE_PARTITIONS_NAME)
    )
    status = (
        instance.get_status_by_partition(dg.AssetKey("shear_catalog"), keys, mer_tile_partitions) or {}
        if keys
        else {}
    )
    attempts = dict(attempts)
    requests: list[dg.RunRequest] = []
    for key in keys:
        if len(requests) >= max_runs:
            break
        st = status.get(key)
        if st is None:
            if attempts.get(key, 0) == 0:
                attempts[key] = 1
                requests.append(
                    dg.RunRequest(partition_key=key, run_key=f"{key}:1", tags={"constellation/attempt": "1"})
                )
        elif st == dg.AssetPartitionStatus.FAILED:
            n = attempts.get(key, 1)
            if n <= max_retries:
                attempts[key] = n + 1
                requests.append(
                    dg.RunRequest(
                        partition_key=key,
                        run_key=f"{key}:{n + 1}",
                        tags={"constellation/attempt": str(n + 1)},
                    )
                )
        elif st == dg.AssetPartitionStatus.MATERIALIZED:
            attempts.pop(key, None)
    return requests, attempts


@dg.sensor(
    name="tile_pipeline_sensor",
    job=tile_pipeline_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Incremental backfill: requests tile_pipeline_job runs for mer_tile partitions that were never "
    f"materialized or whose last run failed (at most {MAX_RUNS_PER_TICK} per tick, "
    f"{MAX_RETRIES_PER_TILE} retries per tile).",
)
def tile_pipeline_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    attempts = json.loads(context.cursor) if context.cursor else {}
    requests, attempts = plan_tile_runs(context.instance, attempts)
    if not requests:
        return dg.SkipReason("every registered tile is materialized, in progress, or out of retries")
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(attempts, separators=(",", ":")))


calibration_schedule = dg.ScheduleDefinition(
    name="weekly_calibration_schedule",
    job=calibration_job,
    cron_schedule="0 3 * * 0",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Re-measure shear calibration weekly (catches estimator or dependency drift).",
)
