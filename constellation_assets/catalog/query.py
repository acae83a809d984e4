"""Queries on the shear catalog: tile and sky-box scans, assembly history.

Predicates are pushed down to Iceberg: a tile list becomes ``TILE_BUCKET IN (...) AND TILE_ID IN (...)``
(partition pruning, then file statistics), a sky box becomes RA/DEC range predicates (file and
row-group statistics; rows are sorted by DEC then RA).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.expressions import (
    AlwaysTrue,
    And,
    BooleanExpression,
    GreaterThanOrEqual,
    In,
    LessThan,
    LessThanOrEqual,
    Or,
)

from constellation_assets.catalog.schema import tile_bucket
from constellation_assets.catalog.tables import (
    DEFAULT_NAMESPACE,
    SOURCES_TABLE,
    SUBTILES_TABLE,
    table_identifier,
)

SkyBox = tuple[float, float, float, float]  # (ra_min_deg, ra_max_deg, dec_min_deg, dec_max_deg)


# Iceberg's metrics and partition evaluators treat an IN list longer than 200 values as "might match"
# everything (no pruning, and under serializable isolation every concurrent commit in those partitions
# looks like a conflict): longer lists are split into an OR of IN lists of at most this many values.
MAX_IN_VALUES = 200


def in_values(name: str, values: Sequence[int]) -> BooleanExpression:
    """``name IN values`` as an OR of IN lists of at most MAX_IN_VALUES values each."""
    chunks = [In(name, list(values[i : i + MAX_IN_VALUES])) for i in range(0, len(values), MAX_IN_VALUES)]
    return chunks[0] if len(chunks) == 1 else Or(*chunks)


def tiles_expression(tile_ids: Iterable[int]) -> BooleanExpression:
    ids = sorted({int(t) for t in tile_ids})
    if not ids:
        raise ValueError("tile_ids is empty; pass None to select all tiles")
    buckets = sorted({tile_bucket(t) for t in ids})
    return And(in_values("TILE_BUCKET", buckets), in_values("TILE_ID", ids))


def box_expression(box: SkyBox) -> BooleanExpression:
    """RA/DEC box in degrees, ``ra_min <= RA < ra_max`` (wrapping through RA=0 when ra_min > ra_max)."""
    ra_min, ra_max, dec_min, dec_max = (float(x) for x in box)
    if not dec_min <= dec_max:
        raise ValueError(
            f"sky box dec_min={dec_min} > dec_max={dec_max}; give (ra_min, ra_max, dec_min, dec_max)"
        )
    dec = And(GreaterThanOrEqual("DEC", dec_min), LessThanOrEqual("DEC", dec_max))
    ra_min = ra_min % 360.0
    if ra_max != 360.0:
        ra_max = ra_max % 360.0
    if ra_min <= ra_max:
        ra: BooleanExpression = And(GreaterThanOrEqual("RA", ra_min), LessThan("RA", ra_max))
    else:
        ra = Or(GreaterThanOrEqual("RA", ra_min), LessThan("RA", ra_max))
    return And(dec, ra)


def _expression(tile_ids: Iterable[int] | None, box: SkyBox | None) -> BooleanExpression:
    expr: BooleanExpression = AlwaysTrue()
    if tile_ids is not None:
        expr = tiles_expression(tile_ids)
    if box is not None:
        expr = And(expr, box_expression(box)) if tile_ids is not None else box_expression(box)
    return expr


def _scan(
    catalog: Catalog,
    table_name: str,
    tile_ids: Iterable[int] | None,
    box: SkyBox | None,
    columns: Sequence[str] | None,
    namespace: str,
    snapshot_id: int | None,
) -> pa.Table:
    table = catalog.load_table(table_identifier(namespace, table_name))
    kwargs: dict[str, Any] = {"row_filter": _expression(tile_ids, box)}
    if columns is not None:
        kwargs["selected_fields"] = tuple(columns)
    if snapshot_id is not None:
        kwargs["snapshot_id"] = snapshot_id
    out = table.scan(**kwargs).to_arrow()
    return out.select(list(columns)) if columns is not None else out


def scan_sources(
    catalog: Catalog,
    tile_ids: Iterable[int] | None = None,
    box: SkyBox | None = None,
    *,
    columns: Sequence[str] | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    snapshot_id: int | None = None,
) -> pa.Table:
    """Rows of ``shear.sources`` for the given tiles and/or sky box (degrees), as a pyarrow Table."""
    return _scan(catalog, SOURCES_TABLE, tile_ids, box, columns, namespace, snapshot_id)


def scan_subtiles(
    catalog: Catalog,
    tile_ids: Iterable[int] | None = None,
    box: SkyBox | None = None,
    *,
    columns: Sequence[str] | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    snapshot_id: int | None = None,
) -> pa.Table:
    """Rows of ``shear.subtiles`` (box applies to the sub-tile centre RA/DEC)."""
    return _scan(catalog, SUBTILES_TABLE, tile_ids, box, columns, namespace, snapshot_id)


def assembly_history(catalog: Catalog, namespace: str = DEFAULT_NAMESPACE) -> list[dict[str, Any]]:
    """One record per snapshot of both tables: table, snapshot id, operation, time and the
    ``constellation.*`` summary properties (run_id, config_hash, code_version, tile_id, ...)."""
    records: list[dict[str, Any]] = []
    for name in (SOURCES_TABLE, SUBTILES_TABLE):
        table = catalog.load_table(table_identifier(namespace, name))
        for snap in table.metadata.snapshots:
            summary = snap.summary
            props = {}
            if summary is not None:
                props = {
                    k: v for k, v in summary.additional_properties.items() if k.startswith("constellation.")
                }
            records.append(
                {
                    "table": f"{namespace}.{name}",
                    "snapshot_id": snap.snapshot_id,
                    "parent_snapshot_id": snap.parent_snapshot_id,
                    "timestamp_ms": snap.timestamp_ms,
                    "operation": summary.operation.value if summary is not None else None,
                    **props,
                }
            )
    return sorted(records, key=lambda r: (r["table"], r["timestamp_ms"]))
