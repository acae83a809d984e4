"""Turn the quality functions' outcomes (``constellation_assets.quality``) into Dagster check results.

The quality functions are the same ones ``constellation validate`` runs; they know nothing of Dagster and
return ``CheckOutcome(name, passed, severity, message, metadata)``. Checks are declared on the assets
(``check_specs``) and evaluated inside the asset's step on the data it just wrote, so a materialization
and its checks always describe the same bytes. Blocking specs fail the step on an ERROR outcome, which
stops everything downstream of that partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dagster as dg


def check_specs(
    asset: str,
    names: Sequence[str],
    blocking: Iterable[str] = (),
    descriptions: Mapping[str, str] | None = None,
) -> list[dg.AssetCheckSpec]:
    blocking = set(blocking)
    descriptions = descriptions or {}
    return [
        dg.AssetCheckSpec(name=n, asset=asset, blocking=n in blocking, description=descriptions.get(n))
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
