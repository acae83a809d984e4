"""Results of an external inference engine in the seed's per-sub-tile shape (SHINE -> Constellation).

SHINE fits one constant shear per sub-tile, so its result (the seed's contract, euclid-q1.md "Sub-tile
result schema") is ONE row per sub-tile::

    TILE_ID int64, SUBTILE_ROW int8, SUBTILE_COL int8, RA, DEC float64,
    G1, G2, G1_ERR, G2_ERR float32, N_SOURCES int32, METHOD string, CONVERGENCE float32

Our own result files hold per-source rows (``SOURCE_RESULT_SCHEMA``) with the sub-tile summary in the
Parquet metadata. Both assemble into ``{namespace}.subtiles``; a per-sub-tile result contributes no rows to
``{namespace}.sources`` (it has none), and its METHOD and CONVERGENCE are kept as the engine wrote them.

- :func:`result_shape` tells the two shapes apart by their columns (and names what is missing otherwise);
- :func:`subtile_summary_from_table` validates a per-sub-tile result and turns it into a summary dict;
- :func:`read_result_file` reads a result file of either shape (the assembler's reader), e.g. a Parquet that
  SHINE wrote straight into the results folder as ``{TILE}_{ROW}_{COL}.parquet``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import pyarrow as pa

from constellation_assets.catalog.schema import (
    SOURCE_RESULT_SCHEMA,
    SUBTILE_SCHEMA,
    SUMMARY_METADATA_KEY,
    ResultFileError,
    _check_summary,
    conform_table,
    parse_subtile_result_name,
)

__all__ = [
    "SHINE_RESULT_SCHEMA",
    "read_result_file",
    "result_shape",
    "subtile_summary_from_table",
]

#: The seed's SHINE -> Constellation result: one row per sub-tile.
SHINE_RESULT_SCHEMA = pa.schema(
    [f for f in SUBTILE_SCHEMA if f.name not in ("RUN_ID", "CONFIG_HASH")]
)  # the seed's columns are our sub-tile schema without the provenance columns

#: Columns only per-source rows have: their presence decides the shape.
_PER_SOURCE_ONLY = ("OBJECT_ID", "E1", "E2", "R11", "R22", "WEIGHT", "IN_CORE")

Shape = Literal["sources", "subtile"]


def result_shape(column_names: list[str] | pa.Schema, what: str) -> Shape:
    """``"sources"`` (per-source rows, ``SOURCE_RESULT_SCHEMA``) or ``"subtile"`` (the seed's one row).

    A table with any per-source column (OBJECT_ID, E1, ...) is per-source (and is then conformed to that
    schema, which names its missing columns). Otherwise all columns of ``SHINE_RESULT_SCHEMA`` must be there.
    Raises ResultFileError naming ``what`` and the columns each shape lacks.
    """
    names = set(column_names.names if isinstance(column_names, pa.Schema) else column_names)
    if names & set(_PER_SOURCE_ONLY):
        return "sources"
    if set(SHINE_RESULT_SCHEMA.names) <= names:
        return "subtile"
    miss_src = [n for n in SOURCE_RESULT_SCHEMA.names if n not in names]
    miss_sub = [n for n in SHINE_RESULT_SCHEMA.names if n not in names]
    raise ResultFileError(
        f"{what}: columns {sorted(names)} are neither per-source rows (missing {miss_src}) nor the "
        f"per-sub-tile result of the seed's contract (missing {miss_sub}); write one of the two: "
        f"{SOURCE_RESULT_SCHEMA.names} (one row per source) or {SHINE_RESULT_SCHEMA.names} (one row)"
    )


def _in_ra_range(ra: float, lo: float, hi: float) -> bool:
    ra, lo, hi = ra % 360.0, lo % 360.0, hi % 360.0
    return lo <= ra <= hi if lo <= hi else (ra >= lo or ra <= hi)  # lo > hi: wraps through RA = 0


def subtile_summary_from_table(
    table: pa.Table,
    what: str,
    *,
    expect: tuple[int, int, int] | None = None,
    sky_bounds: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate a per-sub-tile result (exactly one row of ``SHINE_RESULT_SCHEMA``) -> summary dict.

    ``expect``: (tile_id, row, col) the row must carry. ``sky_bounds``: the manifest's bounds; the row's
    RA/DEC must then lie in the sub-tile's extended area. The summary has the 12 columns as keys (Python
    numbers; an undefined shear stays NaN) plus RUN_ID/CONFIG_HASH as ``run_id``/``config_hash`` when the
    table has those columns (else None).
    """
    conformed = conform_table(table, SHINE_RESULT_SCHEMA, what)
    if conformed.num_rows != 1:
        raise ResultFileError(
            f"{what}: a per-sub-tile result must have exactly one row (one constant shear per sub-tile), "
            f"got {conformed.num_rows}"
        )
    row = conformed.to_pylist()[0]
    ident = (int(row["TILE_ID"]), int(row["SUBTILE_ROW"]), int(row["SUBTILE_COL"]))
    if expect is not None and ident != tuple(int(x) for x in expect):
        raise ResultFileError(
            f"{what}: the row is for sub-tile (TILE_ID, SUBTILE_ROW, SUBTILE_COL) = {ident}, expected "
            f"{tuple(expect)}"
        )
    problems = []
    if row["N_SOURCES"] < 0:
        problems.append(f"N_SOURCES = {row['N_SOURCES']} < 0")
    if not str(row["METHOD"]).strip():
        problems.append("METHOD is empty")
    for k in ("G1", "G2"):
        if math.isfinite(row[k]) and abs(row[k]) >= 1.0:
            problems.append(f"|{k}| = {abs(row[k]):g} >= 1 (not a reduced shear)")
    for k in ("G1_ERR", "G2_ERR"):
        if math.isfinite(row[k]) and row[k] < 0:
            problems.append(f"{k} = {row[k]:g} < 0")
    if not (math.isfinite(row["RA"]) and math.isfinite(row["DEC"]) and -90.0 <= row["DEC"] <= 90.0):
        problems.append(f"RA/DEC = ({row['RA']}, {row['DEC']}) is not a sky position in degrees")
    elif sky_bounds is not None and "extended_ra" in sky_bounds:
        (ra0, ra1), (dec0, dec1) = sky_bounds["extended_ra"], sky_bounds["extended_dec"]
        if not (_in_ra_range(row["RA"], ra0, ra1) and dec0 <= row["DEC"] <= dec1):
            problems.append(
                f"RA/DEC = ({row['RA']:.5f}, {row['DEC']:.5f}) lies outside the sub-tile's extended area "
                f"(RA {[ra0, ra1]}, Dec {[dec0, dec1]})"
            )
    if problems:
        raise ResultFileError(f"{what}: invalid per-sub-tile result: " + "; ".join(problems))
    summary: dict[str, Any] = {k: row[k] for k in SHINE_RESULT_SCHEMA.names}
    summary["METHOD"] = str(row["METHOD"])
    names = table.column_names
    for col, key in (("RUN_ID", "run_id"), ("CONFIG_HASH", "config_hash")):
        summary[key] = str(table.column(col)[0].as_py()) if col in names and table.num_rows else None
    summary["result_shape"] = "subtile"
    return summary


def read_result_file(uri: str, storage_options: dict | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read a sub-tile result file of either shape -> (per-source rows, summary).

    Ours (``write_subtile_result``: per-source rows + the summary in the ``constellation`` metadata): as
    :func:`~constellation_assets.catalog.schema.read_subtile_result`. The seed's per-sub-tile row (no such
    metadata): an empty per-source table and the row as the summary; its ``run_id``/``config_hash`` are the
    file's RUN_ID/CONFIG_HASH columns, or None when it has none (the assembler then records its own).
    """
    from constellation_assets.catalog.schema import read_result_parquet

    what = f"sub-tile result {uri!r}"
    tile_id, row, col = parse_subtile_result_name(uri)
    table = read_result_parquet(uri, storage_options)
    raw = (table.schema.metadata or {}).get(SUMMARY_METADATA_KEY)
    if raw is not None:
        try:
            summary = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ResultFileError(f"{what}: summary metadata is not valid JSON ({exc})") from exc
        summary = _check_summary(summary, what)
        return conform_table(table, SOURCE_RESULT_SCHEMA, what), summary
    if result_shape(table.schema, what) == "sources":
        raise ResultFileError(
            f"{what} has per-source rows but no {SUMMARY_METADATA_KEY.decode()!r} summary metadata; "
            "it was not written by write_subtile_result: re-run the shear stage for this sub-tile"
        )
    summary = subtile_summary_from_table(table, what, expect=(tile_id, row, col))
    return SOURCE_RESULT_SCHEMA.empty_table(), summary
