"""Polars quality checks on shear results and the shear catalog.

Each ``check_*`` function takes Polars DataFrames or LazyFrames (so the same function runs on
sub-tile Parquet results, on Iceberg scans, and inside Dagster asset checks) and returns one
``CheckOutcome``. Only aggregates are collected, so LazyFrames over large inputs stay cheap.

Frames:
- *sources*: per-source rows with at least TILE_ID, SUBTILE_ROW, SUBTILE_COL, OBJECT_ID, RA, DEC,
  E1, E2, R11, R22, WEIGHT (IN_CORE and RUN_ID are used when present);
- *subtiles*: sub-tile rows (SUBTILE_SCHEMA: TILE_ID, SUBTILE_ROW, SUBTILE_COL, G1, G2, G1_ERR,
  G2_ERR, N_SOURCES, RUN_ID, ...);
- *truth*: TILE_ID, G1_TRUE, G2_TRUE (the input shear of a synthetic field).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

Frame = pl.DataFrame | pl.LazyFrame
Severity = Literal["error", "warn"]

MAX_EXAMPLES = 10
SUBTILES_PER_TILE = 16


@dataclass
class CheckOutcome:
    """Result of one check. ``metadata`` holds JSON-serialisable numbers, strings and small lists."""

    name: str
    passed: bool
    severity: Severity
    message: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lazy(frame: Frame) -> pl.LazyFrame:
    if isinstance(frame, pl.LazyFrame):
        return frame
    if isinstance(frame, pl.DataFrame):
        return frame.lazy()
    if isinstance(frame, pa.Table):
        return pl.from_arrow(frame).lazy()
    raise TypeError(f"expected a polars DataFrame/LazyFrame or pyarrow Table, got {type(frame).__name__}")


def _columns(frame: pl.LazyFrame) -> list[str]:
    return frame.collect_schema().names()


def _missing(frame: pl.LazyFrame, name: str, needed: list[str]) -> CheckOutcome | None:
    absent = [c for c in needed if c not in _columns(frame)]
    if absent:
        return CheckOutcome(
            name, False, "error", f"column(s) {absent} missing; cannot run {name}", {"missing": absent}
        )
    return None


def _examples(df: pl.DataFrame) -> list[dict[str, Any]]:
    return [{k: _jsonable(v) for k, v in row.items()} for row in df.head(MAX_EXAMPLES).to_dicts()]


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def _key() -> list[str]:
    return ["TILE_ID", "SUBTILE_ROW", "SUBTILE_COL"]


# --------------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------------
def check_schema(frame: Frame, expected: pa.Schema, name: str = "schema") -> CheckOutcome:
    """Columns of ``frame`` have the names and types of ``expected`` (extra columns are reported, allowed)."""
    lf = _lazy(frame)
    have = lf.collect_schema()
    want = pl.from_arrow(expected.empty_table()).schema
    missing = [c for c in want.names() if c not in have.names()]
    wrong = {
        c: f"{have[c]} (expected {want[c]})" for c in want.names() if c in have.names() and have[c] != want[c]
    }
    extra = [c for c in have.names() if c not in want.names()]
    passed = not missing and not wrong
    msg = "schema matches" if passed else f"missing {missing}, wrong types {wrong}"
    return CheckOutcome(
        name, passed, "error", msg, {"missing": missing, "wrong_types": wrong, "extra": extra}
    )


def check_subtile_count(
    subtiles: Frame, expected: int | None = None, subtiles_per_tile: int = SUBTILES_PER_TILE
) -> CheckOutcome:
    """Sub-tile row count equals ``expected`` (default: number of tiles present x 16), one row per key."""
    name = "subtile_row_count"
    lf = _lazy(subtiles)
    if (bad := _missing(lf, name, _key())) is not None:
        return bad
    per_tile = lf.group_by("TILE_ID").agg(pl.len().alias("n")).collect()
    n_rows = int(per_tile["n"].sum()) if per_tile.height else 0
    n_tiles = per_tile.height
    target = int(expected) if expected is not None else n_tiles * subtiles_per_tile
    incomplete = per_tile.filter(pl.col("n") != subtiles_per_tile).sort("TILE_ID")
    passed = n_rows == target and incomplete.height == 0
    msg = f"{n_rows} sub-tile rows for {n_tiles} tile(s), expected {target}"
    if incomplete.height:
        msg += f"; {incomplete.height} tile(s) without exactly {subtiles_per_tile} sub-tiles"
    return CheckOutcome(
        name,
        passed,
        "error",
        msg,
        {"n_rows": n_rows, "expected": target, "n_tiles": n_tiles, "incomplete_tiles": _examples(incomplete)},
    )


def check_unique_subtiles(subtiles: Frame) -> CheckOutcome:
    """No (TILE_ID, SUBTILE_ROW, SUBTILE_COL) appears twice."""
    name = "unique_subtiles"
    lf = _lazy(subtiles)
    if (bad := _missing(lf, name, _key())) is not None:
        return bad
    dup = lf.group_by(_key()).agg(pl.len().alias("count")).filter(pl.col("count") > 1).sort(_key()).collect()
    passed = dup.height == 0
    msg = "every sub-tile appears once" if passed else f"{dup.height} sub-tile(s) appear more than once"
    return CheckOutcome(name, passed, "error", msg, {"n_duplicated": dup.height, "examples": _examples(dup)})


def check_unique_object_ids(sources: Frame) -> CheckOutcome:
    """No OBJECT_ID appears twice (each source in exactly one core)."""
    name = "unique_object_id"
    lf = _lazy(sources)
    if (bad := _missing(lf, name, ["OBJECT_ID"])) is not None:
        return bad
    counts = lf.group_by("OBJECT_ID").agg(pl.len().alias("count"))
    stats = counts.select(
        pl.len().alias("n_ids"),
        (pl.col("count") > 1).sum().alias("n_duplicated"),
        pl.col("count").sum().alias("n_rows"),
    ).collect()
    n_dup = int(stats["n_duplicated"][0] or 0)
    examples = (
        counts.filter(pl.col("count") > 1).sort("OBJECT_ID").head(MAX_EXAMPLES).collect() if n_dup else None
    )
    passed = n_dup == 0
    msg = (
        f"{int(stats['n_rows'][0] or 0)} sources, all OBJECT_IDs unique"
        if passed
        else f"{n_dup} OBJECT_ID(s) appear more than once"
    )
    return CheckOutcome(
        name,
        passed,
        "error",
        msg,
        {
            "n_rows": int(stats["n_rows"][0] or 0),
            "n_duplicated": n_dup,
            "examples": _examples(examples) if examples is not None else [],
        },
    )


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiling:
    """Sub-tile grid settings used to recompute core membership (defaults: Constellation layout)."""

    grid: tuple[int, int] = (4, 4)
    margin_arcmin: float = 1.0
    tile_core_arcmin: float = 30.0
    tile_extended_arcmin: float = 32.0

    @classmethod
    def from_config(cls, cfg: Any) -> Tiling:
        t = cfg.tiling
        return cls(
            tuple(t.sub_tile_grid),
            float(t.sub_tile_margin_arcmin),
            float(t.tile_core_arcmin),
            float(t.tile_extended_arcmin),
        )


def core_assignment(
    tile_id: int, ra_deg: np.ndarray, dec_deg: np.ndarray, tiling: Tiling
) -> tuple[np.ndarray, ...]:
    """(core_row, core_col, owned) of positions for tile ``tile_id`` from constellation_assets.sky."""
    from constellation_assets.sky.subtiles import partition_sources
    from constellation_assets.sky.tiles import mer_tile

    tile = mer_tile(int(tile_id), tiling.tile_core_arcmin, tiling.tile_extended_arcmin)
    part = partition_sources(ra_deg, dec_deg, tile, tiling.grid, tiling.margin_arcmin)
    return part.core_row, part.core_col, part.owned


def check_sources_in_core(
    sources: Frame, tiling: Tiling | None = None, geometry: bool = True
) -> CheckOutcome:
    """Every source lies in the core of its sub-tile and is owned by its tile.

    With ``geometry`` the core cell and tile ownership are recomputed from RA/DEC with the sky
    module (tile ring model + tangent-plane grid), per tile; IN_CORE, when present, must be true too.
    """
    name = "sources_in_core"
    lf = _lazy(sources)
    if (bad := _missing(lf, name, _key() + ["RA", "DEC"])) is not None:
        return bad
    tiling = tiling or Tiling()
    meta: dict[str, Any] = {"geometry": bool(geometry), "grid": list(tiling.grid)}
    problems: list[str] = []
    n_flag = 0
    if "IN_CORE" in _columns(lf):
        n_flag = int(lf.select((~pl.col("IN_CORE")).sum()).collect().item() or 0)
        meta["n_in_core_false"] = n_flag
        if n_flag:
            problems.append(f"{n_flag} row(s) with IN_CORE false")
    n_outside = 0
    n_checked = 0
    examples: list[dict[str, Any]] = []
    if geometry:
        df = lf.select(
            _key() + ["OBJECT_ID", "RA", "DEC"] if "OBJECT_ID" in _columns(lf) else _key() + ["RA", "DEC"]
        )
        df = df.collect()
        for (tile_id,), part in df.sort("TILE_ID").group_by(["TILE_ID"], maintain_order=True):
            row, col, owned = core_assignment(
                int(tile_id), part["RA"].to_numpy(), part["DEC"].to_numpy(), tiling
            )
            ok = (row == part["SUBTILE_ROW"].to_numpy()) & (col == part["SUBTILE_COL"].to_numpy()) & owned
            n_checked += part.height
            if not ok.all():
                bad_rows = part.filter(pl.Series(~ok))
                n_outside += bad_rows.height
                if len(examples) < MAX_EXAMPLES:
                    bad_rows = bad_rows.with_columns(
                        pl.Series("CORE_ROW", row[~ok]),
                        pl.Series("CORE_COL", col[~ok]),
                        pl.Series("OWNED", owned[~ok]),
                    )
                    examples += _examples(bad_rows)[: MAX_EXAMPLES - len(examples)]
        meta.update(n_checked=n_checked, n_outside=n_outside, examples=examples)
        if n_outside:
            problems.append(f"{n_outside} of {n_checked} source(s) outside their sub-tile core or tile")
    passed = not problems
    msg = f"all {n_checked} sources inside their sub-tile core" if passed else "; ".join(problems)
    if passed and not geometry:
        msg = "IN_CORE true for all rows" if "IN_CORE" in _columns(lf) else "no geometry check requested"
    return CheckOutcome(name, passed, "error", msg, meta)


# --------------------------------------------------------------------------------------------------
# Shear values
# --------------------------------------------------------------------------------------------------
_SOURCE_VALUE_COLUMNS = ["E1", "E2", "R11", "R22", "WEIGHT"]
_SUBTILE_VALUE_COLUMNS = ["G1", "G2", "G1_ERR", "G2_ERR"]


def _measured(lf: pl.LazyFrame) -> pl.LazyFrame:
    # A sub-tile with fewer than MIN_SOURCES_FOR_SHEAR measured core sources has an undefined shear
    # (NaN by construction, see shear.infer.summarize): not an error.
    from constellation_assets.shear.ensemble import MIN_SOURCES_FOR_SHEAR

    if "N_SOURCES" not in _columns(lf):
        return lf
    return lf.filter(pl.col("N_SOURCES") >= MIN_SOURCES_FOR_SHEAR)


def check_finite_shear(sources: Frame | None = None, subtiles: Frame | None = None) -> CheckOutcome:
    """E1/E2/R11/R22/WEIGHT of every source and G1/G2/errors of every measured sub-tile are finite."""
    name = "finite_shear"
    counts: dict[str, int] = {}
    for frame, cols in ((sources, _SOURCE_VALUE_COLUMNS), (subtiles, _SUBTILE_VALUE_COLUMNS)):
        if frame is None:
            continue
        lf = _lazy(frame)
        if (bad := _missing(lf, name, cols)) is not None:
            return bad
        if frame is subtiles:
            lf = _measured(lf)
        row = lf.select([(~pl.col(c).is_finite()).sum().alias(c) for c in cols]).collect().row(0, named=True)
        counts.update({c: int(v or 0) for c, v in row.items()})
    bad_cols = {c: n for c, n in counts.items() if n}
    passed = not bad_cols
    msg = "all shear values finite" if passed else f"non-finite values: {bad_cols}"
    return CheckOutcome(name, passed, "error", msg, {"non_finite": counts})


def check_shear_bounded(subtiles: Frame, sources: Frame | None = None) -> CheckOutcome:
    """|g| = sqrt(G1^2 + G2^2) < 1 for every measured sub-tile (and |e| < 1 reported for sources)."""
    name = "shear_below_one"
    lf = _lazy(subtiles)
    if (bad := _missing(lf, name, ["G1", "G2"])) is not None:
        return bad
    gmod = (pl.col("G1").cast(pl.Float64) ** 2 + pl.col("G2").cast(pl.Float64) ** 2).sqrt()
    stats = (
        _measured(lf)
        .select((gmod >= 1.0).sum().alias("n_bad"), gmod.max().alias("max_g"), pl.len().alias("n"))
        .collect()
        .row(0, named=True)
    )
    meta: dict[str, Any] = {
        "n_subtiles": int(stats["n"]),
        "n_bad": int(stats["n_bad"] or 0),
        "max_abs_g": _jsonable(stats["max_g"]),
    }
    if sources is not None:
        slf = _lazy(sources)
        if not _missing(slf, name, ["E1", "E2"]):
            emod = (pl.col("E1").cast(pl.Float64) ** 2 + pl.col("E2").cast(pl.Float64) ** 2).sqrt()
            meta["max_abs_e_source"] = _jsonable(slf.select(emod.max()).collect().item())
    passed = meta["n_bad"] == 0
    max_g = stats["max_g"]
    shown = f"{max_g:.4g}" if max_g is not None else "n/a (no measured sub-tiles)"
    msg = f"max |g| = {shown}" if passed else f"{meta['n_bad']} sub-tile(s) with |g| >= 1"
    return CheckOutcome(name, passed, "error", msg, meta)


def check_positive_errors(subtiles: Frame) -> CheckOutcome:
    """G1_ERR > 0 and G2_ERR > 0 for every measured sub-tile."""
    name = "positive_errors"
    lf = _lazy(subtiles)
    if (bad := _missing(lf, name, ["G1_ERR", "G2_ERR"])) is not None:
        return bad
    stats = (
        _measured(lf)
        .select(
            (~(pl.col("G1_ERR") > 0)).sum().alias("G1_ERR"),
            (~(pl.col("G2_ERR") > 0)).sum().alias("G2_ERR"),
            pl.col("G1_ERR").min().alias("min_g1_err"),
            pl.col("G2_ERR").min().alias("min_g2_err"),
        )
        .collect()
        .row(0, named=True)
    )
    n_bad = int(stats["G1_ERR"] or 0) + int(stats["G2_ERR"] or 0)
    meta = {k: _jsonable(v) for k, v in stats.items()}
    passed = n_bad == 0
    msg = "all shear errors > 0" if passed else f"{n_bad} non-positive shear error(s)"
    return CheckOutcome(name, passed, "error", msg, meta)


def check_positive_responses(sources: Frame) -> CheckOutcome:
    """The weighted ensemble response sum(w R)/sum(w) of every sub-tile is > 0 (R11 and R22); weights >= 0.

    Per-source responses of moment estimators (FPFS, metacalibration) scatter with noise and may be
    negative for individual faint sources; only the ensemble response divides the shear, so that is
    what must be positive. The fraction of non-positive per-source responses is reported. A sub-tile whose
    sources all have WEIGHT 0 (e.g. all below the estimator's S/N selection) has no ensemble response and
    divides no shear; it is counted (``n_unweighted_subtiles``), not failed.
    """
    name = "positive_responses"
    lf = _lazy(sources)
    if (bad := _missing(lf, name, _key() + ["R11", "R22", "WEIGHT"])) is not None:
        return bad
    w = pl.col("WEIGHT").cast(pl.Float64)
    per = (
        lf.group_by(_key())
        .agg(
            ((w * pl.col("R11")).sum() / w.sum()).alias("R11_MEAN"),
            ((w * pl.col("R22")).sum() / w.sum()).alias("R22_MEAN"),
            w.sum().alias("W_SUM"),
        )
        .collect()
    )
    unweighted = per.filter(pl.col("W_SUM") == 0)
    bad_rows = (
        per.filter(pl.col("W_SUM") != 0)
        .filter(~(pl.col("R11_MEAN") > 0) | ~(pl.col("R22_MEAN") > 0))
        .drop("W_SUM")
        .sort(_key())
    )
    per = per.filter(pl.col("W_SUM") != 0)
    frac, n_neg_w = (
        lf.select(
            ((pl.col("R11") <= 0) | (pl.col("R22") <= 0)).mean().alias("f"),
            (~(pl.col("WEIGHT") >= 0)).sum().alias("w"),
        )
        .collect()
        .row(0)
        if per.height
        else (0.0, 0)
    )
    n_neg_w = int(n_neg_w or 0)
    meta = {
        "n_subtiles": per.height,
        "n_bad_subtiles": bad_rows.height,
        "n_unweighted_subtiles": unweighted.height,
        "n_negative_weight": n_neg_w,
        "min_mean_r11": _jsonable(per["R11_MEAN"].min()) if per.height else None,
        "min_mean_r22": _jsonable(per["R22_MEAN"].min()) if per.height else None,
        "fraction_sources_nonpositive_response": _jsonable(frac),
        "examples": _examples(bad_rows),
    }
    passed = bad_rows.height == 0 and n_neg_w == 0
    problems = []
    if bad_rows.height:
        problems.append(f"{bad_rows.height} sub-tile(s) with non-positive ensemble response")
    if n_neg_w:
        problems.append(f"{n_neg_w} source(s) with negative or NaN WEIGHT")
    msg = (
        f"ensemble responses > 0 in all {per.height} sub-tiles, weights >= 0"
        if passed
        else "; ".join(problems)
    )
    return CheckOutcome(name, passed, "error", msg, meta)


# --------------------------------------------------------------------------------------------------
# Recovered vs injected shear
# --------------------------------------------------------------------------------------------------
def tile_shear_summary(subtiles: Frame, truth: Frame | None = None) -> pl.DataFrame:
    """Per-tile shear: inverse-variance mean of the measured sub-tiles, with errors (and truth, pulls).

    Columns: TILE_ID, N_SUBTILES, N_SOURCES, G1, G1_ERR, G2, G2_ERR and, with ``truth``, G1_TRUE,
    G2_TRUE, PULL1 = (G1 - G1_TRUE)/G1_ERR, PULL2.
    """
    lf = _measured(_lazy(subtiles)).filter(
        pl.col("G1_ERR").is_finite()
        & pl.col("G2_ERR").is_finite()
        & (pl.col("G1_ERR") > 0)
        & (pl.col("G2_ERR") > 0)
    )
    w1 = 1.0 / pl.col("G1_ERR").cast(pl.Float64) ** 2
    w2 = 1.0 / pl.col("G2_ERR").cast(pl.Float64) ** 2
    n_src = pl.col("N_SOURCES").sum() if "N_SOURCES" in _columns(lf) else pl.lit(None, pl.Int64)
    out = (
        lf.group_by("TILE_ID")
        .agg(
            pl.len().alias("N_SUBTILES"),
            n_src.alias("N_SOURCES"),
            ((w1 * pl.col("G1")).sum() / w1.sum()).alias("G1"),
            (1.0 / w1.sum().sqrt()).alias("G1_ERR"),
            ((w2 * pl.col("G2")).sum() / w2.sum()).alias("G2"),
            (1.0 / w2.sum().sqrt()).alias("G2_ERR"),
        )
        .sort("TILE_ID")
    )
    if truth is not None:
        tr = _lazy(truth).select(
            pl.col("TILE_ID").cast(pl.Int64),
            pl.col("G1_TRUE").cast(pl.Float64),
            pl.col("G2_TRUE").cast(pl.Float64),
        )
        out = out.with_columns(pl.col("TILE_ID").cast(pl.Int64)).join(tr, on="TILE_ID", how="left")
        out = out.with_columns(
            ((pl.col("G1") - pl.col("G1_TRUE")) / pl.col("G1_ERR")).alias("PULL1"),
            ((pl.col("G2") - pl.col("G2_TRUE")) / pl.col("G2_ERR")).alias("PULL2"),
        )
    return out.sort("TILE_ID").collect()


def check_shear_vs_truth(subtiles: Frame, truth: Frame | None, n_sigma: float = 4.0) -> CheckOutcome:
    """Per tile, recovered shear agrees with the input shear within ``n_sigma`` standard errors.

    Passes with a warning when no truth is available for any tile. Metadata gives per-tile values,
    pulls and the overall chi^2 / dof with its p-value.
    """
    name = "shear_vs_truth"
    if truth is None:
        return CheckOutcome(name, True, "warn", "no truth table given: skipped", {"n_tiles_with_truth": 0})
    tlf = _lazy(truth)
    if (bad := _missing(tlf, name, ["TILE_ID", "G1_TRUE", "G2_TRUE"])) is not None:
        return bad
    summary = tile_shear_summary(subtiles, tlf).filter(pl.col("G1_TRUE").is_not_null())
    if summary.height == 0:
        return CheckOutcome(
            name, True, "warn", "no tile has a truth entry: skipped", {"n_tiles_with_truth": 0}
        )
    pulls = np.concatenate([summary["PULL1"].to_numpy(), summary["PULL2"].to_numpy()])
    chi2 = float(np.sum(pulls**2))
    dof = int(pulls.size)
    from scipy.stats import chi2 as chi2_dist

    p_value = float(chi2_dist.sf(chi2, dof))
    max_pull = float(np.max(np.abs(pulls)))
    passed = bool(np.all(np.isfinite(pulls)) and max_pull < n_sigma)
    tiles = [
        {k: _jsonable(v) for k, v in row.items()}
        for row in summary.select(
            "TILE_ID", "G1", "G1_ERR", "G1_TRUE", "PULL1", "G2", "G2_ERR", "G2_TRUE", "PULL2"
        ).to_dicts()
    ]
    msg = (
        f"{summary.height} tile(s): max |pull| = {max_pull:.2f} sigma (limit {n_sigma:g}), "
        f"chi2/dof = {chi2:.1f}/{dof} (p = {p_value:.3g})"
    )
    return CheckOutcome(
        name,
        passed,
        "error",
        msg,
        {
            "n_tiles_with_truth": summary.height,
            "max_abs_pull": max_pull,
            "n_sigma": float(n_sigma),
            "chi2": chi2,
            "dof": dof,
            "p_value": p_value,
            "tiles": tiles[:50],
        },
    )


# --------------------------------------------------------------------------------------------------
# Cross-table consistency
# --------------------------------------------------------------------------------------------------
def check_run_consistency(sources: Frame, subtiles: Frame) -> CheckOutcome:
    """Every source's sub-tile has a sub-tile row, from the same RUN_ID.

    Detects a tile whose sources were re-assembled from a new run while its sub-tile rows were not
    (an assembly interrupted between the two table commits); re-running the assembly heals it.
    """
    name = "run_consistency"
    slf, tlf = _lazy(sources), _lazy(subtiles)
    with_run = "RUN_ID" in _columns(slf) and "RUN_ID" in _columns(tlf)
    cols = _key() + (["RUN_ID"] if with_run else [])
    if (bad := _missing(slf, name, _key())) is not None or (bad := _missing(tlf, name, _key())) is not None:
        return bad
    src = slf.select(cols).unique()
    sub = tlf.select(cols).unique()
    orphan = src.join(sub, on=cols, how="anti").sort(_key()).collect()
    tiles_bad = orphan["TILE_ID"].unique().sort().to_list() if orphan.height else []
    passed = orphan.height == 0
    msg = (
        "sources and sub-tile rows agree" + (" (same RUN_ID)" if with_run else "")
        if passed
        else f"{orphan.height} sub-tile(s) in {len(tiles_bad)} tile(s) have sources without a matching "
        f"sub-tile row{' from the same RUN_ID' if with_run else ''}: re-run `constellation assemble` for "
        f"tile(s) {tiles_bad[:10]}"
    )
    return CheckOutcome(name, passed, "error", msg, {"n_mismatched": orphan.height, "tiles": tiles_bad[:100]})
