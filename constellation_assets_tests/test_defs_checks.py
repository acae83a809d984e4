"""Quality outcomes -> Dagster check results, and blocking checks (evaluated in the asset step) stop downstream."""

from dataclasses import dataclass, field

import dagster as dg

from constellation_assets.defs.checks import check_specs, results_for


@dataclass
class Outcome:  # the shape of constellation_assets.quality.CheckOutcome
    name: str
    passed: bool
    severity: str
    message: str
    metadata: dict = field(default_factory=dict)


def test_results_match_specs_by_name_and_missing_outcome_fails():
    specs = check_specs("a", ["x", "y", "z"], blocking=["x"])
    assert [s.blocking for s in specs] == [True, False, False]
    out = results_for(
        "a",
        specs,
        [
            Outcome("x", True, "error", "ok", {"n": 3, "examples": [{"id": 1}]}),
            Outcome("y", False, "warn", "meh"),
        ],
    )
    by = {r.check_name: r for r in out}
    assert by["x"].passed and by["x"].metadata["n"].value == 3
    assert not by["y"].passed and by["y"].severity == dg.AssetCheckSeverity.WARN
    assert not by["z"].passed and "produced no outcome" in by["z"].description


def test_quality_outcomes_convert():
    from constellation_assets.quality import CheckOutcome

    o = CheckOutcome("unique_object_id", False, "error", "2 duplicates", {"duplicates": 2})
    (r,) = results_for("shear_catalog", check_specs("shear_catalog", ["unique_object_id"]), [o])
    assert not r.passed and r.severity == dg.AssetCheckSeverity.ERROR and r.description == "2 duplicates"


def test_failed_blocking_check_in_asset_step_stops_downstream():
    specs = check_specs("upstream", ["rows_ok"], blocking=["rows_ok"])
    ran = []

    @dg.asset(check_specs=specs)
    def upstream():
        yield dg.MaterializeResult()
        yield from results_for("upstream", specs, [Outcome("rows_ok", False, "error", "bad rows")])

    @dg.asset(deps=[upstream])
    def downstream():
        ran.append(1)

    result = dg.materialize([upstream, downstream], raise_on_error=False)
    assert not result.success
    assert ran == []
    assert [e.passed for e in result.get_asset_check_evaluations()] == [False]
