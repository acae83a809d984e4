"""Sub-tile result files: schema, atomic write, summary metadata, and Iceberg schema agreement."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible, schema_to_pyarrow

from constellation_assets.catalog.schema import (
    SOURCE_RESULT_SCHEMA,
    SOURCES_ICEBERG_SCHEMA,
    SOURCES_TABLE_ARROW_SCHEMA,
    SUBTILE_SCHEMA,
    SUBTILES_ICEBERG_SCHEMA,
    SUBTILES_TABLE_ARROW_SCHEMA,
    SUMMARY_METADATA_KEY,
    ResultFileError,
    parse_subtile_result_name,
    read_subtile_result,
    subtile_result_name,
    subtiles_table,
    tile_bucket,
    write_subtile_result,
)

TILE = 102044185


def _rows(n: int = 5, row: int = 1, col: int = 2, tile: int = TILE) -> pa.Table:
    return pa.table(
        {
            "TILE_ID": np.full(n, tile),  # int64
            "SUBTILE_ROW": np.full(n, row),  # int64 on purpose: must be cast to int8
            "SUBTILE_COL": np.full(n, col),
            "OBJECT_ID": np.arange(n, dtype=np.int64) + 7,
            "RA": np.linspace(52.9, 53.0, n),
            "DEC": np.full(n, -28.0),
            "E1": np.full(n, 0.1),
            "E2": np.full(n, -0.1),
            "R11": np.ones(n),
            "R22": np.ones(n),
            "WEIGHT": np.ones(n),
            "SNR": np.full(n, 15.0),
            "N_EXPOSURES": np.full(n, 4),
            "FLAGS": np.zeros(n, np.int32),
            "IN_CORE": np.arange(n) % 2 == 0,
        }
    )


SUMMARY = {
    "G1": 0.012,
    "G2": -0.004,
    "G1_ERR": 0.03,
    "G2_ERR": 0.03,
    "N_SOURCES": 3,
    "METHOD": "fpfs",
    "CONVERGENCE": 1.0,
    "RA": 52.95,
    "DEC": -28.0,
    "run_id": "run-1",
    "config_hash": "abc123",
}


def test_name_round_trip():
    assert subtile_result_name(TILE, 0, 3) == "102044185_0_3.parquet"
    assert parse_subtile_result_name("s3://b/results/102044185_3_0.parquet") == (TILE, 3, 0)
    for bad in ("102044185_0.parquet", "x_0_1.parquet", "102044185_0_1.parq"):
        with pytest.raises(ResultFileError, match="TILE_ID"):
            parse_subtile_result_name(bad)


def test_write_read_round_trip(tmp_path):
    uri = str(tmp_path / "results" / "102044185_1_2.parquet")
    write_subtile_result(_rows(), SUMMARY, uri)
    table, summary = read_subtile_result(uri)
    assert table.schema.equals(SOURCE_RESULT_SCHEMA)
    assert table.num_rows == 5
    assert table["SUBTILE_ROW"].type == pa.int8()
    assert summary["G1"] == pytest.approx(0.012)
    assert summary["run_id"] == "run-1"
    # the file name fills the sub-tile keys of the summary
    assert (summary["TILE_ID"], summary["SUBTILE_ROW"], summary["SUBTILE_COL"]) == (TILE, 1, 2)
    raw = pq.read_schema(uri).metadata[SUMMARY_METADATA_KEY]
    assert b'"config_hash": "abc123"' in raw
    sub = subtiles_table([summary])
    assert sub.schema.equals(SUBTILE_SCHEMA)
    assert sub["N_SOURCES"].to_pylist() == [3]


def test_failed_write_leaves_nothing(tmp_path):
    uri = str(tmp_path / "102044185_1_2.parquet")
    bad_summary = {k: v for k, v in SUMMARY.items() if k != "G1_ERR"}
    with pytest.raises(ResultFileError, match="G1_ERR"):
        write_subtile_result(_rows(), bad_summary, uri)
    with pytest.raises(ResultFileError, match="SUBTILE_COL holds values other than"):
        write_subtile_result(_rows(col=1), SUMMARY, uri)
    assert os.listdir(tmp_path) == []


def test_bad_inputs_name_the_file(tmp_path):
    uri = str(tmp_path / "102044185_1_2.parquet")
    with pytest.raises(ResultFileError, match=r"missing column\(s\) \['WEIGHT'\]"):
        write_subtile_result(_rows().drop_columns(["WEIGHT"]), SUMMARY, uri)
    # a Parquet file without the summary metadata
    pq.write_table(_rows(), uri)
    with pytest.raises(ResultFileError, match="102044185_1_2.parquet.*summary"):
        read_subtile_result(uri)
    # a truncated file
    path = tmp_path / "102044185_1_2.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ResultFileError, match="cannot be read as Parquet"):
        read_subtile_result(uri)
    with pytest.raises(ResultFileError, match="does not exist"):
        read_subtile_result(str(tmp_path / "102044185_0_0.parquet"))


def test_nan_shear_of_empty_subtile_survives(tmp_path):
    uri = str(tmp_path / "102044185_0_0.parquet")
    summary = dict(SUMMARY, G1=float("nan"), G2=float("nan"), N_SOURCES=0)
    write_subtile_result(_rows(0, 0, 0), summary, uri)
    table, back = read_subtile_result(uri)
    assert table.num_rows == 0
    assert np.isnan(back["G1"])


def test_arrow_and_iceberg_schemas_agree():
    _check_pyarrow_schema_compatible(SOURCES_ICEBERG_SCHEMA, SOURCES_TABLE_ARROW_SCHEMA)
    _check_pyarrow_schema_compatible(SUBTILES_ICEBERG_SCHEMA, SUBTILES_TABLE_ARROW_SCHEMA)
    assert schema_to_pyarrow(SOURCES_ICEBERG_SCHEMA).names == SOURCES_TABLE_ARROW_SCHEMA.names
    # every result column except IN_CORE reaches the catalog
    assert set(SOURCE_RESULT_SCHEMA.names) - set(SOURCES_TABLE_ARROW_SCHEMA.names) == {"IN_CORE"}
    assert set(SUBTILE_SCHEMA.names) <= set(SUBTILES_TABLE_ARROW_SCHEMA.names)
    # field ids are the on-disk contract
    assert SOURCES_ICEBERG_SCHEMA.find_field("OBJECT_ID").field_id == 4
    assert SUBTILES_ICEBERG_SCHEMA.find_field("G1").field_id == 6
    assert tile_bucket(TILE) == TILE % 256
