"""Field-level shear calibration asset: m and c of the catalog the production path assembles.

``field_calibration`` (unpartitioned) calls :func:`constellation_assets.shear.field_calibration.run_field_calibration`,
the function behind ``constellation calibrate --field``: paired synthetic fields (+g/-g, 0/90-degree intrinsic
orientations) through simulate -> prepare -> infer -> assemble, matched by OBJECT_ID, m and c with
delete-one-sub-tile jackknife errors overall and in bins. Its two checks are blocking: a catalog whose
calibration misses the requirement must not feed anything downstream.

Hook for ``shear_catalog`` (defs/catalog.py): :func:`field_calibration_provenance` returns the metadata of
the latest ``field_calibration`` materialization (run id, config hash, m, c, whether it met the requirement),
to be merged into the catalog's materialization metadata so every catalog commit records the calibration it
was assembled under::

    from constellation_assets.defs.calibration_field import field_calibration_provenance
    ...
    metadata={..., **field_calibration_provenance(context.instance)}
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from constellation_assets.defs.checks import check_specs
from constellation_assets.defs.metadata import Timer, device_metadata, png_markdown, provenance_metadata
from constellation_assets.defs.resources import ConstellationConfigResource

ASSET = "field_calibration"

FIELD_CALIBRATION_CHECKS = check_specs(
    ASSET,
    ["m_within_requirement", "c_within_requirement"],
    blocking=["m_within_requirement", "c_within_requirement"],
    descriptions={
        "m_within_requirement": "|m1|, |m2| of the assembled catalog below calibration.m_requirement.",
        "c_within_requirement": "|c1|, |c2| of the assembled catalog below calibration.c_requirement.",
    },
)


def field_calibration_outcomes(res, m_requirement: float, c_requirement: float) -> list[dg.AssetCheckResult]:
    """The two requirement checks on central values, with the jackknife errors and the pull in metadata."""
    out = []
    for name, keys, req in (
        ("m_within_requirement", ("m1", "m2"), m_requirement),
        ("c_within_requirement", ("c1", "c2"), c_requirement),
    ):
        vals = [abs(float(getattr(res, k))) for k in keys]
        worst = float("nan") if any(v != v for v in vals) else max(vals)  # max() would skip a NaN
        md: dict[str, Any] = {"requirement": float(req)}
        for k in keys:
            v, e = float(getattr(res, k)), float(getattr(res, f"{k}_err"))
            md[k], md[f"{k}_err"] = v, e
        out.append(
            dg.AssetCheckResult(
                asset_key=ASSET,
                check_name=name,
                passed=bool(worst < req),  # NaN (no measurement) fails
                severity=dg.AssetCheckSeverity.ERROR,
                description=f"max |{keys[0][0]}| = {worst:.2e} vs requirement {req:.1e} "
                f"({res.n_matched} matched objects, {res.n_subtiles} sub-tiles)",
                metadata=md,
            )
        )
    return out


@dg.asset(
    name=ASSET,
    group_name="shear",
    owners=["team:shear-platform"],
    kinds={"pytorch", "galsim", "iceberg"},
    description="Field-level shear calibration: paired synthetic Q1-layout fields (+/-g, 90-degree-rotated "
    "intrinsic shapes, identical pixel noise) through the production path (prepare -> stamps -> estimator "
    "-> exposure combination -> Iceberg), matched by OBJECT_ID: m and c of the catalog with sub-tile "
    "jackknife errors, overall and in S/N, size, neighbour-distance, blending and coverage bins.",
)
def field_calibration(
    context: dg.AssetExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.MaterializeResult]:
    from rich.console import Console

    from constellation_assets.shear.field_calibration import (
        FieldCalibrationError,
        field_calibration_figure_png,
        run_field_calibration,
    )

    cfg = pipeline_config.load()
    timer = Timer()
    with timer.phase("field_calibration"):
        try:
            res = run_field_calibration(cfg, progress=False, console=Console(stderr=True))
        except FieldCalibrationError as exc:
            raise dg.Failure(str(exc)) from exc
    m_req, c_req = cfg.calibration.m_requirement, cfg.calibration.c_requirement
    d = res.to_dict()
    yield dg.MaterializeResult(
        metadata={
            **provenance_metadata(cfg, "calibrate_field", extra={"work_dir": res.work_dir}),
            **timer.metadata(),
            **device_metadata(str(cfg.compute.device)),
            **{k: dg.MetadataValue.float(float(getattr(res, k))) for k in ("m1", "m1_err", "m2", "m2_err")},
            **{k: dg.MetadataValue.float(float(getattr(res, k))) for k in ("c1", "c1_err", "c2", "c2_err")},
            "dagster/row_count": dg.MetadataValue.int(int(res.n_objects)),
            "n_matched": dg.MetadataValue.int(int(res.n_matched)),
            "n_subtiles": dg.MetadataValue.int(int(res.n_subtiles)),
            "g_true": dg.MetadataValue.json(list(res.g_true)),
            "field_calibration_hash": dg.MetadataValue.text(res.config_hash),
            "within_requirement": dg.MetadataValue.bool(res.within(m_req, c_req)),
            "fields": dg.MetadataValue.json(d["fields"]),
            "matched": dg.MetadataValue.json(d["matched"]),
            "bins": dg.MetadataValue.json(d["bins"]),
            "mer_cuts": dg.MetadataValue.json(d["mer_cuts"]),
            "detection": dg.MetadataValue.json(d["detection"]),
            "mer_snr_census": dg.MetadataValue.json(d["mer_snr_census"]),
            "m_vs_bin": png_markdown(
                field_calibration_figure_png(res, m_req), "m in bins (1-sigma jackknife)"
            ),
        }
    )


_BIAS_KEYS = ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err", "n_matched", "n_subtiles")


@dg.multi_asset_check(
    specs=FIELD_CALIBRATION_CHECKS,
    name="field_calibration_checks",
    can_subset=True,
    description="|m| and |c| of the latest field_calibration materialization against the requirement.",
)
def field_calibration_checks(
    context: dg.AssetCheckExecutionContext, pipeline_config: ConstellationConfigResource
) -> Iterator[dg.AssetCheckResult]:
    """Reads the biases the materialization recorded, so the checks run right after every field calibration
    (blocking downstream) and can be re-run from the UI, e.g. after changing calibration.m_requirement."""
    from types import SimpleNamespace

    cfg = pipeline_config.load()
    event = context.instance.get_latest_materialization_event(dg.AssetKey(ASSET))
    md = event.asset_materialization.metadata if event is not None and event.asset_materialization else {}
    selected = [s for s in FIELD_CALIBRATION_CHECKS if s.key in context.selected_asset_check_keys]
    if not all(k in md for k in _BIAS_KEYS):
        for spec in selected:
            yield dg.AssetCheckResult(
                asset_key=ASSET,
                check_name=spec.name,
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description="no field_calibration materialization with measured biases; materialize it first",
            )
        return
    res = SimpleNamespace(**{k: md[k].value for k in _BIAS_KEYS})
    names = {s.name for s in selected}
    for outcome in field_calibration_outcomes(
        res, cfg.calibration.m_requirement, cfg.calibration.c_requirement
    ):
        if outcome.check_name in names:
            yield outcome


field_calibration_job = dg.define_asset_job(
    "field_calibration_job",
    selection=dg.AssetSelection.assets(ASSET),
    description="Field-level shear calibration of the production path (m, c of the catalog, with errors).",
)


def field_calibration_provenance(instance: dg.DagsterInstance) -> dict[str, dg.MetadataValue]:
    """Metadata naming the latest ``field_calibration`` materialization (for ``shear_catalog``); a
    ``field_calibration`` entry saying "none" when the catalog was assembled before any calibration."""
    event = instance.get_latest_materialization_event(dg.AssetKey(ASSET))
    if event is None or event.asset_materialization is None:
        return {"field_calibration": dg.MetadataValue.text("none: no field_calibration materialization")}
    md = event.asset_materialization.metadata
    summary: dict[str, Any] = {"run_id": event.run_id, "timestamp": event.timestamp}
    for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err", "field_calibration_hash"):
        if k in md:
            summary[k] = md[k].value
    if "within_requirement" in md:
        summary["within_requirement"] = bool(md["within_requirement"].value)
    return {"field_calibration": dg.MetadataValue.json(summary)}
