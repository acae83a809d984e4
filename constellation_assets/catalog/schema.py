"""The one place where the sub-tile result and catalog schemas are defined.

Two representations of each schema live here and are checked against each other in the tests:

- pyarrow schemas for the per-sub-tile Parquet result files written by the shear stage
  (``SOURCE_RESULT_SCHEMA``; the sub-tile summary travels in the file's key-value metadata under
  ``b"constellation"``) and for the sub-tile summary rows (``SUBTILE_SCHEMA``, the Constellation
  sub-tile schema of euclid-q1.md plus RUN_ID and CONFIG_HASH);
- Iceberg schemas with explicit, stable field ids for the catalog tables ``shear.sources`` and
  ``shear.subtiles`` (``SOURCES_ICEBERG_SCHEMA``, ``SUBTILES_ICEBERG_SCHEMA``).

Result files are named ``{TILE_ID}_{ROW}_{COL}.parquet`` with row/col not zero-padded
(``102044185_0_3.parquet``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.schema import Schema
from pyiceberg.types import (
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    NestedField,
    StringType,
)

SUMMARY_METADATA_KEY = b"constellation"
SUBTILES_PER_TILE = 16

# --------------------------------------------------------------------------------------------------
# Per-source result rows (one Parquet file per sub-tile)
# --------------------------------------------------------------------------------------------------
SOURCE_RESULT_SCHEMA = pa.schema(
    [
        pa.field("TILE_ID", pa.int64(), nullable=False),
        pa.field("SUBTILE_ROW", pa.int8(), nullable=False),
        pa.field("SUBTILE_COL", pa.int8(), nullable=False),
        pa.field("OBJECT_ID", pa.int64(), nullable=False),
        pa.field("RA", pa.float64(), nullable=False),  # deg
        pa.field("DEC", pa.float64(), nullable=False),  # deg
        pa.field("E1", pa.float32(), nullable=False),
        pa.field("E2", pa.float32(), nullable=False),
        pa.field("R11", pa.float32(), nullable=False),  # shear response d e1 / d g1
        pa.field("R22", pa.float32(), nullable=False),  # shear response d e2 / d g2
        pa.field("WEIGHT", pa.float32(), nullable=False),
        pa.field("SNR", pa.float32(), nullable=False),
        pa.field("N_EXPOSURES", pa.int16(), nullable=False),
        pa.field("FLAGS", pa.int32(), nullable=False),
        pa.field("IN_CORE", pa.bool_(), nullable=False),
    ]
)

# --------------------------------------------------------------------------------------------------
# Sub-tile summary rows (euclid-q1.md "Sub-tile result schema (Constellation)" + provenance)
# --------------------------------------------------------------------------------------------------
SUBTILE_SCHEMA = pa.schema(
    [
        pa.field("TILE_ID", pa.int64(), nullable=False),
        pa.field("SUBTILE_ROW", pa.int8(), nullable=False),
        pa.field("SUBTILE_COL", pa.int8(), nullable=False),
        pa.field("RA", pa.float64(), nullable=False),  # deg, sub-tile core centre
        pa.field("DEC", pa.float64(), nullable=False),  # deg, sub-tile core centre
        pa.field("G1", pa.float32(), nullable=False),
        pa.field("G2", pa.float32(), nullable=False),
        pa.field("G1_ERR", pa.float32(), nullable=False),
        pa.field("G2_ERR", pa.float32(), nullable=False),
        pa.field("N_SOURCES", pa.int32(), nullable=False),
        pa.field("METHOD", pa.string(), nullable=False),
        pa.field("CONVERGENCE", pa.float32(), nullable=False),
        pa.field("RUN_ID", pa.string(), nullable=False),
        pa.field("CONFIG_HASH", pa.string(), nullable=False),
    ]
)

# Keys of the JSON summary stored under SUMMARY_METADATA_KEY, mapped to SUBTILE_SCHEMA columns.
SUMMARY_REQUIRED_KEYS: tuple[str, ...] = (
    "G1",
    "G2",
    "G1_ERR",
    "G2_ERR",
    "N_SOURCES",
    "METHOD",
    "CONVERGENCE",
    "RA",
    "DEC",
    "run_id",
    "config_hash",
)

# --------------------------------------------------------------------------------------------------
# Iceberg catalog tables. Field ids are part of the on-disk contract: never renumber, only append.
# Partition key TILE_BUCKET (= TILE_ID mod 256) is stored as a column; see tile_bucket().
# --------------------------------------------------------------------------------------------------
# shear.sources holds only core sources (IN_CORE is therefore dropped) plus the RUN_ID that wrote
# the row, which lets a check see that sources and sub-tiles of a tile come from the same run.
SOURCES_ICEBERG_SCHEMA = Schema(
    NestedField(1, "TILE_ID", LongType(), required=True),
    NestedField(2, "SUBTILE_ROW", IntegerType(), required=True),
    NestedField(3, "SUBTILE_COL", IntegerType(), required=True),
    NestedField(4, "OBJECT_ID", LongType(), required=True),
    NestedField(5, "RA", DoubleType(), required=True, doc="deg (ICRS)"),
    NestedField(6, "DEC", DoubleType(), required=True, doc="deg (ICRS)"),
    NestedField(7, "E1", FloatType(), required=True),
    NestedField(8, "E2", FloatType(), required=True),
    NestedField(9, "R11", FloatType(), required=True, doc="shear response de1/dg1"),
    NestedField(10, "R22", FloatType(), required=True, doc="shear response de2/dg2"),
    NestedField(11, "WEIGHT", FloatType(), required=True),
    NestedField(12, "SNR", FloatType(), required=True),
    NestedField(13, "N_EXPOSURES", IntegerType(), required=True),
    NestedField(14, "FLAGS", IntegerType(), required=True),
    NestedField(15, "RUN_ID", StringType(), required=True),
    NestedField(16, "TILE_BUCKET", IntegerType(), required=True, doc="TILE_ID mod 256: partition key"),
    identifier_field_ids=[4],
)

SUBTILES_ICEBERG_SCHEMA = Schema(
    NestedField(1, "TILE_ID", LongType(), required=True),
    NestedField(2, "SUBTILE_ROW", IntegerType(), required=True),
    NestedField(3, "SUBTILE_COL", IntegerType(), required=True),
    NestedField(4, "RA", DoubleType(), required=True, doc="deg, sub-tile core centre"),
    NestedField(5, "DEC", DoubleType(), required=True, doc="deg, sub-tile core centre"),
    NestedField(6, "G1", FloatType(), required=True),
    NestedField(7, "G2", FloatType(), required=True),
    NestedField(8, "G1_ERR", FloatType(), required=True),
    NestedField(9, "G2_ERR", FloatType(), required=True),
    NestedField(10, "N_SOURCES", IntegerType(), required=True),
    NestedField(11, "METHOD", StringType(), required=True),
    NestedField(12, "CONVERGENCE", FloatType(), required=True),
    NestedField(13, "RUN_ID", StringType(), required=True),
    NestedField(14, "CONFIG_HASH", StringType(), required=True),
    NestedField(15, "TILE_BUCKET", IntegerType(), required=True, doc="TILE_ID mod 256: partition key"),
    identifier_field_ids=[1, 2, 3],
)


# Arrow schemas that exactly match the Iceberg tables (Iceberg has no int8/int16: they widen to int32).
def _widened(schema: pa.Schema, extra: list[pa.Field] | None = None) -> pa.Schema:
    narrow = (pa.int8(), pa.int16())
    fields = [pa.field(f.name, pa.int32() if f.type in narrow else f.type, nullable=False) for f in schema]
    return pa.schema(fields + list(extra or []))


_TILE_BUCKET_FIELD = pa.field("TILE_BUCKET", pa.int32(), nullable=False)
SOURCES_TABLE_ARROW_SCHEMA = _widened(
    SOURCE_RESULT_SCHEMA.remove(SOURCE_RESULT_SCHEMA.get_field_index("IN_CORE")),
    [pa.field("RUN_ID", pa.string(), nullable=False), _TILE_BUCKET_FIELD],
)
SUBTILES_TABLE_ARROW_SCHEMA = _widened(SUBTILE_SCHEMA, [_TILE_BUCKET_FIELD])

# The catalog tables are partitioned by identity(TILE_BUCKET) with TILE_BUCKET = TILE_ID mod 256: a
# bounded, TILE_ID-derived partition key computed in plain Arrow (Iceberg's bucket() transform would
# need the native pyiceberg-core package on every writer). See catalog/tables.py for the rationale.
TILE_BUCKETS = 256


def tile_bucket(tile_id: int) -> int:
    """Partition key of a tile in the catalog tables (TILE_ID mod TILE_BUCKETS)."""
    return int(tile_id) % TILE_BUCKETS


_RESULT_NAME_RE = re.compile(r"(?P<tile>\d+)_(?P<row>\d+)_(?P<col>\d+)\.parquet$")


class ResultFileError(ValueError):
    """A sub-tile result file is missing, unreadable or does not match SOURCE_RESULT_SCHEMA."""


def subtile_result_name(tile_id: int, row: int, col: int) -> str:
    """File name of one sub-tile result: ``{TILE_ID}_{ROW}_{COL}.parquet`` (no zero padding)."""
    return f"{int(tile_id)}_{int(row)}_{int(col)}.parquet"


def parse_subtile_result_name(uri: str) -> tuple[int, int, int]:
    """(tile_id, row, col) from a result file name or URI; ValueError if the name does not match."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    m = _RESULT_NAME_RE.fullmatch(name)
    if m is None:
        raise ResultFileError(
            f"{uri!r} is not a sub-tile result file name; expected '{{TILE_ID}}_{{ROW}}_{{COL}}.parquet' "
            "such as '102044185_0_3.parquet'"
        )
    return int(m["tile"]), int(m["row"]), int(m["col"])


def conform_table(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Select and cast ``table`` to ``schema`` (column order, types, non-null).

    Raises ResultFileError naming ``what`` and the offending columns when a column is missing,
    cannot be cast, or holds nulls.
    """
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ResultFileError(
            f"{what}: missing column(s) {missing}; expected columns {schema.names}. "
            "Re-run the stage that produced it with a matching version."
        )
    columns = []
    for field in schema:
        col = table.column(field.name)
        if col.null_count:
            raise ResultFileError(f"{what}: column {field.name!r} has {col.null_count} null value(s)")
        if col.type != field.type:
            try:
                col = col.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ResultFileError(
                    f"{what}: column {field.name!r} has type {col.type}, cannot be cast to {field.type}: {exc}"
                ) from exc
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def _check_summary(summary: Mapping[str, Any], what: str) -> dict[str, Any]:
    missing = [k for k in SUMMARY_REQUIRED_KEYS if k not in summary]
    if missing:
        raise ResultFileError(
            f"{what}: sub-tile summary lacks key(s) {missing}; required: {list(SUMMARY_REQUIRED_KEYS)}"
        )
    return dict(summary)


def _json_default(value: Any) -> Any:
    # numpy scalars (float32, int64, ...) know how to become Python numbers.
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"summary value {value!r} of type {type(value).__name__} is not JSON serialisable")


def encode_summary(summary: Mapping[str, Any]) -> bytes:
    """JSON bytes of a sub-tile summary (NaN allowed for an empty sub-tile's undefined shear)."""
    return json.dumps(dict(summary), sort_keys=True, default=_json_default).encode("utf-8")


def write_subtile_result(
    table: pa.Table,
    summary: Mapping[str, Any],
    uri: str,
    storage_options: dict | None = None,
) -> str:
    """Write one sub-tile's per-source rows and its summary to ``uri`` atomically.

    ``table`` is conformed to SOURCE_RESULT_SCHEMA (extra columns dropped, compatible types cast);
    ``summary`` must hold SUMMARY_REQUIRED_KEYS and is stored as JSON in the Parquet key-value
    metadata under ``b"constellation"``. TILE_ID/SUBTILE_ROW/SUBTILE_COL are added to the summary
    from the file name. The file appears at ``uri`` only when complete. Returns ``uri``.
    """
    from constellation_assets.io.uri import atomic_output

    tile_id, row, col = parse_subtile_result_name(uri)
    table, summary = checked_subtile_result(table, summary, tile_id, row, col, f"sub-tile result {uri!r}")
    metadata = dict(table.schema.metadata or {})
    metadata[SUMMARY_METADATA_KEY] = encode_summary(summary)
    table = table.replace_schema_metadata(metadata)
    with atomic_output(uri, storage_options=storage_options) as local_path:
        pq.write_table(table, local_path, compression="zstd")
    return uri


def checked_subtile_result(
    table: pa.Table, summary: Mapping[str, Any], tile_id: int, row: int, col: int, what: str
) -> tuple[pa.Table, dict[str, Any]]:
    """(rows conformed to SOURCE_RESULT_SCHEMA, checked summary with TILE_ID/SUBTILE_ROW/SUBTILE_COL).

    What :func:`write_subtile_result` stores and :func:`read_subtile_result` returns; ResultFileError
    when the summary or the id columns disagree with (tile_id, row, col).
    """
    table = conform_table(table, SOURCE_RESULT_SCHEMA, what)
    summary = _check_summary(summary, what)
    for key, value in (("TILE_ID", tile_id), ("SUBTILE_ROW", row), ("SUBTILE_COL", col)):
        if key in summary and int(summary[key]) != value:
            raise ResultFileError(
                f"{what}: summary {key}={summary[key]} disagrees with the file name ({value})"
            )
        summary[key] = value
    if table.num_rows:
        ids = {
            "TILE_ID": (table["TILE_ID"], tile_id),
            "SUBTILE_ROW": (table["SUBTILE_ROW"], row),
            "SUBTILE_COL": (table["SUBTILE_COL"], col),
        }
        for key, (column, value) in ids.items():
            if not pc.all(pc.equal(column, value)).as_py():
                raise ResultFileError(
                    f"{what}: column {key} holds values other than {value} (from the file name)"
                )
    return table, summary


def read_result_parquet(uri: str, storage_options: dict | None = None) -> pa.Table:
    """The Parquet table of a sub-tile result file; ResultFileError naming the URI and the fix otherwise."""
    from constellation_assets.io.uri import get_fs

    what = f"sub-tile result {uri!r}"
    fs, path = get_fs(uri, storage_options=storage_options)
    try:
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh)
    except FileNotFoundError as exc:
        raise ResultFileError(f"{what} does not exist; run the shear stage for this sub-tile first") from exc
    except PermissionError as exc:
        raise ResultFileError(
            f"{what}: access denied ({exc}); check the credentials in the environment (AWS_* variables)"
        ) from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise ResultFileError(
            f"{what} cannot be read as Parquet ({exc}); delete it and re-run the shear stage for this sub-tile"
        ) from exc


def read_subtile_result(uri: str, storage_options: dict | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read one sub-tile result file: (rows conformed to SOURCE_RESULT_SCHEMA, summary dict).

    Raises ResultFileError naming the URI when the file cannot be read, lacks the summary, or does
    not match the schema.
    """
    what = f"sub-tile result {uri!r}"
    parse_subtile_result_name(uri)
    table = read_result_parquet(uri, storage_options)
    raw = (table.schema.metadata or {}).get(SUMMARY_METADATA_KEY)
    if raw is None:
        raise ResultFileError(
            f"{what} has no {SUMMARY_METADATA_KEY.decode()!r} summary metadata; "
            "it was not written by write_subtile_result: re-run the shear stage for this sub-tile"
        )
    try:
        summary = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ResultFileError(f"{what}: summary metadata is not valid JSON ({exc})") from exc
    summary = _check_summary(summary, what)
    return conform_table(table, SOURCE_RESULT_SCHEMA, what), summary


def subtile_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    """One SUBTILE_SCHEMA row (as a dict) from a summary read by read_subtile_result."""

    def _f(key: str) -> float:
        value = summary[key]
        return math.nan if value is None else float(value)

    return {
        "TILE_ID": int(summary["TILE_ID"]),
        "SUBTILE_ROW": int(summary["SUBTILE_ROW"]),
        "SUBTILE_COL": int(summary["SUBTILE_COL"]),
        "RA": _f("RA"),
        "DEC": _f("DEC"),
        "G1": _f("G1"),
        "G2": _f("G2"),
        "G1_ERR": _f("G1_ERR"),
        "G2_ERR": _f("G2_ERR"),
        "N_SOURCES": int(summary["N_SOURCES"]),
        "METHOD": str(summary["METHOD"]),
        "CONVERGENCE": _f("CONVERGENCE"),
        "RUN_ID": str(summary["run_id"]),
        "CONFIG_HASH": str(summary["config_hash"]),
    }


def subtiles_table(summaries: list[Mapping[str, Any]]) -> pa.Table:
    """SUBTILE_SCHEMA table from summaries (each carrying TILE_ID/SUBTILE_ROW/SUBTILE_COL)."""
    rows = [subtile_row(s) for s in summaries]
    return pa.Table.from_pylist(rows, schema=SUBTILE_SCHEMA)
