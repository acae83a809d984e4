"""Scheduled Iceberg catalog maintenance: compaction, manifest re-grouping, snapshot expiry, dead files.

``catalog_maintenance`` runs :func:`constellation_assets.catalog.maintenance.maintain_catalog` on the
config's catalog. It is safe while tile assemblies run (a concurrent assembly of a tile wins over the
compaction of that tile's files; files younger than ``min_age_minutes`` are not compacted; expiry
never removes the snapshots of the last ``keep_last`` commits), so the schedule runs it every 30
minutes during a backfill. The schedule skips a tick while a previous maintenance run is still going.
The same work from the command line: ``constellation catalog maintain``.
"""

from collections.abc import Iterator

import dagster as dg

from constellation_assets.defs.checks import check_specs, results_for
from constellation_assets.defs.resources import ConstellationConfigResource
from constellation_assets.quality.catalog_health import HEALTH_CHECK_NAMES, catalog_health_outcomes

MAINTENANCE_JOB_NAME = "catalog_maintenance_job"


class CatalogMaintenanceConfig(dg.Config):
    keep_last: int = 20
    min_age_minutes: float = 5.0
    orphan_age_minutes: float = 30.0
    compact: bool = True
    min_input_files: int = 8
    small_file_mb: float = 32.0


@dg.asset(
    deps=["shear_catalog"],
    group_name="catalog",
    owners=["team:shear-platform"],
    kinds={"iceberg"},
    description="Maintenance of shear.sources / shear.subtiles: small data files of tiles not written in "
    "the last minutes compacted per TILE_BUCKET, manifests re-grouped by TILE_BUCKET range, old snapshots "
    "expired (newest kept), files no snapshot references deleted. Keeps per-tile commit cost flat.",
)
def catalog_maintenance(
    context: dg.AssetExecutionContext,
    config: CatalogMaintenanceConfig,
    pipeline_config: ConstellationConfigResource,
) -> dg.MaterializeResult:
    from datetime import timedelta

    from constellation_assets.catalog.maintenance import maintain_catalog
    from constellation_assets.catalog.tables import namespace_from_config, open_catalog

    cfg = pipeline_config.load()
    catalog = open_catalog(cfg)
    report = maintain_catalog(
        catalog,
        namespace_from_config(cfg),
        keep_last=config.keep_last,
        min_age=timedelta(minutes=config.min_age_minutes),
        compact=config.compact,
        small_file_bytes=int(config.small_file_mb * 2**20),
        min_input_files=config.min_input_files,
        orphan_age=timedelta(minutes=config.orphan_age_minutes),
    )
    context.log.info(f"catalog maintenance: {report.to_dict()}")
    md: dict[str, dg.MetadataValue] = {
        "files_rewritten": dg.MetadataValue.int(sum(c.files_rewritten for c in report.compaction)),
        "files_written": dg.MetadataValue.int(sum(c.files_written for c in report.compaction)),
        "compaction_groups_skipped_conflict": dg.MetadataValue.int(
            sum(c.groups_skipped_conflict for c in report.compaction)
        ),
        "snapshots_expired": dg.MetadataValue.int(sum(e.snapshots_expired for e in report.expiry)),
        "dead_files_deleted": dg.MetadataValue.int(
            sum(e.data_files_deleted + e.manifests_deleted + e.manifest_lists_deleted for e in report.expiry)
            + sum(report.orphans_deleted.values())
        ),
        "manifests_before_after": dg.MetadataValue.json({k: list(v) for k, v in report.manifests.items()}),
        "elapsed_s": dg.MetadataValue.float(round(report.elapsed_s, 3)),
        "report": dg.MetadataValue.json(report.to_dict()),
    }
    return dg.MaterializeResult(metadata=md)


MAINTENANCE_CHECKS = check_specs(
    "catalog_maintenance",
    list(HEALTH_CHECK_NAMES),
    descriptions={
        "files_present": "Every data file the current snapshots reference exists on storage.",
        "rows_match_summary": "Rows planned from the current snapshots equal their total-records.",
        "history_bounded": "Retained snapshots within twice history.expire.min-snapshots-to-keep.",
    },
)


@dg.multi_asset_check(
    specs=MAINTENANCE_CHECKS,
    name="catalog_maintenance_checks",
    can_subset=True,
    description="The shear catalog after maintenance: live files present, rows intact, history bounded.",
)
def catalog_maintenance_checks(
    context: dg.AssetCheckExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.AssetCheckResult]:
    from constellation_assets.catalog.tables import namespace_from_config, open_catalog

    cfg = pipeline_config.load()
    outcomes = catalog_health_outcomes(open_catalog(cfg), namespace_from_config(cfg))
    selected = [s for s in MAINTENANCE_CHECKS if s.key in context.selected_asset_check_keys]
    yield from results_for("catalog_maintenance", selected, outcomes)


catalog_maintenance_job = dg.define_asset_job(
    MAINTENANCE_JOB_NAME,
    selection=dg.AssetSelection.assets("catalog_maintenance"),
    description="Compact, re-group manifests, expire snapshots and delete dead files of the shear catalog.",
)


@dg.schedule(
    name="catalog_maintenance_schedule",
    job=catalog_maintenance_job,
    cron_schedule="*/30 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Catalog maintenance every 30 minutes (skipped while the previous run is still going).",
)
def catalog_maintenance_schedule(context: dg.ScheduleEvaluationContext):
    in_progress = context.instance.get_runs_count(
        dg.RunsFilter(
            job_name=MAINTENANCE_JOB_NAME,
            statuses=[
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
        )
    )
    if in_progress:
        return dg.SkipReason(f"a {MAINTENANCE_JOB_NAME} run is still in progress")
    return dg.RunRequest()


maintenance_defs = dg.Definitions(
    assets=[catalog_maintenance],
    asset_checks=[catalog_maintenance_checks],
    jobs=[catalog_maintenance_job],
    schedules=[catalog_maintenance_schedule],
)
