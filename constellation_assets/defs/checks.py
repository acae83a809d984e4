"""Turn the quality functions' outcomes (``constellation_assets.quality``) into Dagster check results.

The quality functions are the same ones ``constellation validate`` runs; they know nothing of Dagster and
return ``CheckOutcome(name, passed, severity, message, metadata)``.

Tile checks are their own definitions (:func:`tile_checks`), partitioned like the tile assets: they run in
the same run right after the asset (blocking ones hold back everything downstream of a failed tile), report
one result per tile partition, also in a backfill run over a batch of tiles, and a person can re-run them
on the stored data from the UI (the check's Execute button, per partition).
"""

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import dagster as dg

from constellation_assets.defs.resources import ConstellationConfigResource


def check_specs(
    asset: str,
    names: Sequence[str],
    blocking: Iterable[str] = (),
    descriptions: Mapping[str, str] | None = None,
    partitions_def: dg.PartitionsDefinition | None = None,
) -> list[dg.AssetCheckSpec]:
    blocking = set(blocking)
    descriptions = descriptions or {}
    return [
        dg.AssetCheckSpec(
            name=n,
            asset=asset,
            blocking=n in blocking,
            description=descriptions.get(n),
            partitions_def=partitions_def,
        )
        for n in names
    ]


def _severity(outcome: Any) -> dg.AssetCheckSeverity:
    sev = str(getattr(outcome, "severity", "error")).lower()
    return dg.AssetCheckSeverity.WARN if sev.startswith("warn") else dg.AssetCheckSeverity.ERROR


def _metadata(md: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (md or {}).items():
        if isinstance(v, bool | int | float | str) or v is None:
            out[str(k)] = v if v is not None else dg.MetadataValue.null()
        else:
            out[str(k)] = dg.MetadataValue.json(_jsonable(v))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):  # numpy scalar
        return v.item()
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    return str(v)


def to_check_result(asset: str, check_name: str, outcome: Any) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name=check_name,
        passed=bool(outcome.passed),
        severity=_severity(outcome),
        description=str(getattr(outcome, "message", "")) or None,
        metadata=_metadata(getattr(outcome, "metadata", None)),
    )


def results_for(
    asset: str, specs: Sequence[dg.AssetCheckSpec], outcomes: Iterable[Any]
) -> list[dg.AssetCheckResult]:
    """One result per declared spec, matched by name; a spec with no outcome is a failure that says so
    (a check that silently does not run must not look green)."""
    by_name = {str(o.name): o for o in outcomes}
    out = []
    for spec in specs:
        o = by_name.get(spec.name)
        if o is None:
            out.append(
                dg.AssetCheckResult(
                    asset_key=asset,
                    check_name=spec.name,
                    passed=False,
                    severity=dg.AssetCheckSeverity.ERROR,
                    description=f"quality function for check {spec.name!r} produced no outcome",
                )
            )
        else:
            out.append(to_check_result(asset, spec.name, o))
    return out


def _target_materialization(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None):
    """The latest materialization of the checked asset partition (what the evaluation is about)."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    if not records:
        return None
    rec = records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        run_id=rec.event_log_entry.run_id, storage_id=rec.storage_id, timestamp=rec.timestamp
    )


def evaluations(
    context: dg.AssetCheckExecutionContext | dg.AssetExecutionContext,
    specs: Sequence[dg.AssetCheckSpec],
    outcomes_by_partition: Mapping[str, Iterable[Any]],
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    """One evaluation per (selected check, partition), then the check's output (what blocking waits on).

    A run may cover many partitions (a backfill batch); Dagster's ``AssetCheckResult`` would record one
    unpartitioned result there, so the evaluations carry their partition explicitly. A check with no
    outcome for a partition fails and says so.
    """
    from dagster._core.definitions.metadata import normalize_metadata

    op_ctx = getattr(context, "op_execution_context", context)
    selected = context.selected_asset_check_keys
    output_names = {spec.key: name for name, spec in op_ctx.assets_def.check_specs_by_output_name.items()}
    targets: dict[tuple[dg.AssetKey, str], Any] = {}
    for spec in specs:
        if spec.key not in selected:
            continue
        for partition, outcomes in outcomes_by_partition.items():
            by_name = {str(o.name): o for o in outcomes}
            o = by_name.get(spec.name)
            tkey = (spec.asset_key, partition)
            if tkey not in targets:
                targets[tkey] = _target_materialization(op_ctx.instance, spec.asset_key, partition)
            yield dg.AssetCheckEvaluation(
                asset_key=spec.asset_key,
                check_name=spec.name,
                passed=bool(o.passed) if o is not None else False,
                severity=_severity(o) if o is not None else dg.AssetCheckSeverity.ERROR,
                description=(str(getattr(o, "message", "")) or None)
                if o is not None
                else f"quality function for check {spec.name!r} produced no outcome",
                metadata=normalize_metadata(_metadata(getattr(o, "metadata", None))) if o is not None else {},
                blocking=spec.blocking,
                partition=partition,
                target_materialization_data=targets[tkey],
            )
        yield dg.Output(None, output_name=output_names[spec.key])


def tile_checks(
    name: str,
    specs: Sequence[dg.AssetCheckSpec],
    outcomes: Callable[[Any, int], list[Any]],
    description: str,
) -> dg.AssetChecksDefinition:
    """A partitioned multi-check over the tile partitions of a run: ``outcomes(cfg, tile_id)`` per tile."""

    @dg.multi_asset_check(specs=list(specs), name=name, can_subset=True, description=description)
    def _checks(
        context: dg.AssetCheckExecutionContext, pipeline_config: ConstellationConfigResource
    ) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
        cfg = pipeline_config.load()
        keys = context.op_execution_context.partition_keys
        yield from evaluations(context, specs, {k: outcomes(cfg, int(k)) for k in keys})

    return _checks
