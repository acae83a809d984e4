"""Sensors and schedules: tile discovery (dynamic partitions) and incremental runs for new/failed tiles.

Dynamic partitions get no built-in schedule, so :func:`plan_tile_runs` decides which tiles need a run
from the partition status of the last asset of the tile pipeline (``shear_catalog``): never materialized
-> a first run; last attempt failed -> a retry (bounded per tile); in progress or done -> nothing.
"""

import json
import re
from collections.abc import Mapping, Sequence

import dagster as dg

from constellation_assets.defs.jobs import calibration_job, tile_pipeline_job
from constellation_assets.defs.partitions import (
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

_TILE_DIR = re.compile(r"(?:^|/)(\d{9})/?$")


def discover_tile_ids(cfg) -> list[str]:
    """Tiles to process: the config's ``tile_ids`` when given, else the tile folders under the MER
    catalog prefix (``data.catalog_base_uri``, local or s3://), else the synthetic field's tiles."""
    if cfg.tile_ids:
        return [str(t) for t in cfg.tile_ids]
    from constellation_assets.io.uri import list_uri

    base = cfg.data.catalog_base_uri
    try:
        entries = list_uri(base, storage_options=cfg.storage_options(base))
    except Exception:  # an absent prefix just means "no catalog yet": fall back to the configured field
        entries = []
    found = sorted({m.group(1) for e in entries if (m := _TILE_DIR.search(str(e).rstrip("/")))})
    return found or [str(t) for t in cfg.selected_tile_ids]


@dg.sensor(
    name="mer_tile_discovery_sensor",
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers MER tiles (config tile_ids or the MER catalog prefix) as mer_tile partitions, "
    f"in batches of at most {MAX_NEW_TILES_PER_TICK} per tick.",
)
def mer_tile_discovery_sensor(
    context: dg.SensorEvaluationContext, pipeline_config: ConstellationConfigResource
) -> dg.SensorResult | dg.SkipReason:
    new = new_tile_keys(context.instance, discover_tile_ids(pipeline_config.load()))
    if not new:
        return dg.SkipReason("no new MER tiles")
    batch = new[:MAX_NEW_TILES_PER_TICK]
    context.log.info(f"registering {len(batch)} of {len(new)} new MER tiles")
    return dg.SensorResult(dynamic_partitions_requests=add_tile_partition_requests(batch))


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
