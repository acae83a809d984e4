"""Shear assets: per-tile inference in a pipes worker (GPU pool) and the unpartitioned calibration."""

from collections.abc import Iterator

import dagster as dg

from constellation_assets.defs.checks import check_specs, results_for, tile_checks
from constellation_assets.defs.metadata import (
    Timer,
    device_metadata,
    plot_metadata,
    provenance_metadata,
    table_metadata,
)
from constellation_assets.defs.partitions import mer_tile_partitions
from constellation_assets.defs.resources import ConstellationConfigResource, ShearWorkerBase
from constellation_assets.defs.tiles import TILE_BACKFILL_POLICY
from constellation_assets.quality.tiles import shear_measurement_outcomes

SHEAR_GROUP = "shear"
OWNERS = ["team:shear-platform"]

#: Concurrency pool serialising inference (one GPU per worker); set its limit with
#: ``dagster instance concurrency set gpu N`` (or ``concurrency.pools`` in dagster.yaml).
GPU_POOL = "gpu"

#: Checks of the tile's sub-tile result files before assembly (``quality.measurement_checks``); the
#: catalog-level checks (schema, duplicates, cores, run consistency, truth) run once, on shear_catalog.
MEASUREMENT_CHECK_DESCRIPTIONS = {
    "results_complete": "One readable result file with the result schema per sub-tile of the tile.",
    "finite_shear": "Finite E1/E2/G1/G2 and weights, and |g| < 1, in every sub-tile result.",
    "positive_responses": "Shear responses R11, R22 and weights > 0 (core rows).",
}
MEASUREMENT_CHECKS = check_specs(
    "shear_measurements",
    list(MEASUREMENT_CHECK_DESCRIPTIONS),
    blocking=["results_complete", "finite_shear"],
    descriptions=MEASUREMENT_CHECK_DESCRIPTIONS,
    partitions_def=mer_tile_partitions,
)
shear_measurement_checks = tile_checks(
    "shear_measurement_checks",
    MEASUREMENT_CHECKS,
    shear_measurement_outcomes,
    "Checks of each tile's sub-tile result files (per tile partition).",
)
CALIBRATION_CHECKS = check_specs(
    "shear_calibration",
    ["m_within_requirement", "c_within_requirement"],
    descriptions={
        "m_within_requirement": "|m1|, |m2| below calibration.m_requirement (Euclid: 2e-3).",
        "c_within_requirement": "|c1|, |c2| below calibration.c_requirement (Euclid: 5e-4).",
    },
)


def _text(value) -> str | None:
    """Plain text of a metadata entry reported by the worker (a MetadataValue or a raw value)."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


@dg.asset(
    deps=["subtile_manifests"],
    partitions_def=mer_tile_partitions,
    backfill_policy=TILE_BACKFILL_POLICY,
    pool=GPU_POOL,
    group_name=SHEAR_GROUP,
    owners=OWNERS,
    kinds={"pytorch", "parquet", "kubernetes"},
    description="Shear inference on each sub-tile manifest of the tile -> one Parquet of per-source rows "
    "(E1, E2, R11, R22, WEIGHT, SNR, FLAGS) per sub-tile; the sub-tiles of a tile are measured together, "
    "each VIS quadrant read once per tile. Runs in a worker process through dagster-pipes: "
    "a subprocess locally, a GPU pod (nvidia.com/gpu) on Kubernetes, one worker for all tiles of a run; "
    "serialised by the 'gpu' pool.",
)
def shear_measurements(
    context: dg.AssetExecutionContext,
    pipeline_config: ConstellationConfigResource,
    shear_worker: ShearWorkerBase,
) -> Iterator[dg.MaterializeResult]:
    from constellation_assets.catalog import SOURCE_RESULT_SCHEMA
    from constellation_assets.io.uri import join_uri, uri_exists
    from constellation_assets.quality import tile_result_uris
    from constellation_assets.quality.run import result_frames

    cfg = pipeline_config.load()
    tile_ids = [int(k) for k in context.partition_keys]
    timer = Timer()
    manifest_dirs = [join_uri(cfg.output.manifests, str(t)) for t in tile_ids]
    absent = [
        t for t, d in zip(tile_ids, manifest_dirs, strict=True) if not uri_exists(d, cfg.storage_options(d))
    ]
    if absent:
        raise dg.Failure(
            f"tile(s) {absent} have no sub-tile manifests under {cfg.output.manifests}; "
            "materialize subtile_manifests for these partitions first"
        )
    with timer.phase("inference"):
        invocation = shear_worker.run(
            context,
            args=[],
            extras={
                "config": cfg.model_dump(mode="json"),
                "manifests": manifest_dirs,
                "run_id": context.run_id,
            },
        )
    worker_md: dict = {}
    for result in invocation.get_results():
        if isinstance(result, dg.MaterializeResult):
            worker_md.update(result.metadata or {})
    with timer.phase("read_back"):
        for t in tile_ids:
            uris = tile_result_uris(cfg, t)
            sources, subtiles = result_frames(uris, cfg.storage_options(uris[0]) if uris else None)
            context.add_asset_metadata(
                {
                    **table_metadata(sources.height, SOURCE_RESULT_SCHEMA),
                    "tile_id": dg.MetadataValue.int(t),
                    "n_subtiles": dg.MetadataValue.int(subtiles.height),
                    "n_core_sources": dg.MetadataValue.int(
                        int(sources["IN_CORE"].sum()) if sources.height else 0
                    ),
                    "result_uris": dg.MetadataValue.json(list(uris)),
                },
                partition_key=str(t),
            )
    yield dg.MaterializeResult(
        metadata={
            **provenance_metadata(cfg, "infer", extra={"tiles": tile_ids}),
            **timer.metadata(),
            **device_metadata(_text(worker_md.get("device")) or str(cfg.compute.device)),
            "worker_backend": dg.MetadataValue.text(shear_worker.backend),
            "run_tiles": dg.MetadataValue.json([str(t) for t in tile_ids]),
            "worker_totals": dg.MetadataValue.json(
                {k: _text(v) for k, v in worker_md.items() if k != "subtiles"}
            ),
        }
    )


@dg.multi_asset_check(
    specs=CALIBRATION_CHECKS,
    name="shear_calibration_checks",
    can_subset=True,
    description="|m| and |c| of the latest shear_calibration materialization against the requirement.",
)
def shear_calibration_checks(
    context: dg.AssetCheckExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.AssetCheckResult]:
    """Reads the biases the materialization recorded (m1, m1_err, ... in its metadata), so the checks run after
    every calibration and can be re-run from the UI, e.g. after changing calibration.m_requirement."""
    from constellation_assets.quality.calibration import BIAS_KEYS
    from constellation_assets.quality.calibration import calibration_outcomes as _outcomes

    cfg = pipeline_config.load()
    event = context.instance.get_latest_materialization_event(dg.AssetKey("shear_calibration"))
    md = event.asset_materialization.metadata if event is not None and event.asset_materialization else {}
    if not all(k in md for k in BIAS_KEYS):
        for spec in CALIBRATION_CHECKS:
            if spec.key in context.selected_asset_check_keys:
                yield dg.AssetCheckResult(
                    asset_key="shear_calibration",
                    check_name=spec.name,
                    passed=False,
                    description="no shear_calibration materialization with measured biases; materialize it first",
                )
        return
    biases = {k: float(md[k].value) for k in BIAS_KEYS}
    outcomes = _outcomes(biases, cfg.calibration.m_requirement, cfg.calibration.c_requirement)
    selected = [s for s in CALIBRATION_CHECKS if s.key in context.selected_asset_check_keys]
    yield from results_for("shear_calibration", selected, outcomes)


@dg.asset(
    group_name=SHEAR_GROUP,
    owners=OWNERS,
    kinds={"pytorch", "galsim"},
    description="Image simulations with known shear (+/-g pairs of 90-degree-rotated galaxies, configured PSF "
    "and population) through the same estimator: multiplicative m and additive c biases with 1-sigma errors.",
)
def shear_calibration(
    context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult]:
    from constellation_assets.shear.calibration import calibration_figure_png, run_calibration

    cfg = pipeline_config.load()
    timer = Timer()
    with timer.phase("calibration"):
        res = run_calibration(cfg)
    m_req, c_req = cfg.calibration.m_requirement, cfg.calibration.c_requirement
    biases = {
        k: float(getattr(res, k)) for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err")
    }
    yield dg.MaterializeResult(
        metadata={
            **provenance_metadata(cfg, "calibrate"),
            **timer.metadata(),
            **device_metadata(str(cfg.compute.device)),
            **{k: dg.MetadataValue.float(v) for k, v in biases.items()},
            "dagster/row_count": dg.MetadataValue.int(int(res.n_stamps)),
            "n_galaxies": dg.MetadataValue.int(int(res.n_galaxies)),
            "g_true": dg.MetadataValue.float(float(res.g_true)),
            "result": dg.MetadataValue.json({k: v for k, v in res.to_dict().items() if k != "config"}),
            **plot_metadata(
                cfg,
                "m_c_fit",
                calibration_figure_png(res, m_req, c_req),
                "m and c fit (1-sigma errors)",
                stage="calibrate",
                name=cfg.field_name,
            ),
        }
    )
