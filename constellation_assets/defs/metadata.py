"""Materialization metadata shared by all assets: provenance, table shape, timings, plots."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg


def provenance_metadata(cfg: Any, stage: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Effective config (redacted JSON), its hash and the code/engine versions."""
    from constellation_assets.provenance import config_hash, effective_config_record, versions

    record = effective_config_record(cfg, stage, extra=dict(extra) if extra else None)
    return {
        "effective_config": dg.MetadataValue.json(record),
        "config_hash": dg.MetadataValue.text(str(config_hash(cfg))),
        "versions": dg.MetadataValue.json(dict(versions())),
    }


def _arrow_schema(obj: Any):
    import pyarrow as pa

    if isinstance(obj, pa.Schema):
        return obj
    if hasattr(obj, "schema") and isinstance(obj.schema, pa.Schema):
        return obj.schema
    if hasattr(obj, "as_arrow"):  # pyiceberg Schema
        return obj.as_arrow()
    if hasattr(obj, "to_arrow"):  # polars DataFrame
        arrow = obj.to_arrow()
        return arrow if isinstance(arrow, pa.Schema) else arrow.schema
    raise TypeError(f"cannot derive an Arrow schema from {type(obj).__name__}")


#: What the columns of the Constellation tables mean (units in the text), shown in the UI's column schema.
COLUMN_DESCRIPTIONS: dict[str, str] = {
    "TILE_ID": "Euclid MER tile id (9 digits)",
    "SUBTILE_ROW": "sub-tile row in the tile's grid (0 = south)",
    "SUBTILE_COL": "sub-tile column in the tile's grid (0 = west, low RA)",
    "OBJECT_ID": "MER catalog OBJECT_ID",
    "RA": "right ascension, deg (ICRS)",
    "DEC": "declination, deg (ICRS)",
    "RIGHT_ASCENSION": "right ascension, deg (ICRS)",
    "DECLINATION": "declination, deg (ICRS)",
    "E1": "ellipticity component 1 (along RA/Dec axes)",
    "E2": "ellipticity component 2 (at 45 deg)",
    "G1": "shear component 1 (response-corrected weighted mean)",
    "G2": "shear component 2 (response-corrected weighted mean)",
    "G1_ERR": "1-sigma error of G1",
    "G2_ERR": "1-sigma error of G2",
    "R11": "shear response de1/dg1",
    "R22": "shear response de2/dg2",
    "WEIGHT": "inverse-variance shear weight",
    "SNR": "detection signal-to-noise ratio",
    "N_EXPOSURES": "VIS exposures combined for the source",
    "N_SOURCES": "sources measured in the sub-tile core",
    "FLAGS": "measurement flags (0 = clean)",
    "IN_CORE": "source lies in the core of its sub-tile (not the margin)",
    "OWNED": "source belongs to this tile (not a neighbour's overlap)",
    "RUN_ID": "Dagster/CLI run that wrote the row",
    "CONFIG_HASH": "hash of the output-determining config (and data/output locations)",
    "TILE_BUCKET": "TILE_ID mod 256: Iceberg partition key",
    "METHOD": "shear estimator",
    "CONVERGENCE": "estimator convergence measure",
}


def table_schema(obj: Any, descriptions: Mapping[str, str] | None = None) -> dg.TableSchema:
    """TableSchema from a pyarrow Schema/Table, polars DataFrame or pyiceberg Schema, with column
    descriptions (``descriptions`` or :data:`COLUMN_DESCRIPTIONS`; Iceberg field docs when present)."""
    schema = _arrow_schema(obj)
    docs = {}
    if hasattr(obj, "as_arrow"):  # pyiceberg Schema: NestedField.doc
        docs = {f.name: f.doc for f in obj.fields if getattr(f, "doc", None)}
    desc = {**COLUMN_DESCRIPTIONS, **(descriptions or {})}
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=f.name,
                type=str(f.type),
                description=desc.get(f.name) or docs.get(f.name),
                constraints=dg.TableColumnConstraints(nullable=f.nullable),
            )
            for f in schema
        ]
    )


def table_metadata(row_count: int, schema: Any | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"dagster/row_count": dg.MetadataValue.int(int(row_count))}
    if schema is not None:
        md["dagster/column_schema"] = table_schema(schema)
    return md


class Timer:
    """Wall-clock seconds per named phase, reported as one JSON metadata entry."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 4)

    def metadata(self) -> dict[str, Any]:
        total = round(sum(self.seconds.values()), 4)
        return {
            "timings_s": dg.MetadataValue.json({**self.seconds, "total": total}),
            "duration_s": dg.MetadataValue.float(total),
        }


def png_markdown(png: bytes, title: str) -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI (markdown with a base64 data URI)."""
    b64 = base64.b64encode(png).decode("ascii")
    return dg.MetadataValue.md(f"**{title}**\n\n![{title}](data:image/png;base64,{b64})")


def plot_metadata(cfg: Any, label: str, png: bytes, title: str, *, stage: str, name: str) -> dict[str, Any]:
    """A plot both ways: inline (markdown with the PNG embedded) and as a file next to the outputs
    (``{output.root_uri}/plots/{stage}/{label}_{name}.png``, a path to open directly)."""
    from constellation_assets.io.uri import atomic_write_bytes, join_uri

    uri = join_uri(cfg.output.root_uri, "plots", stage, f"{label}_{name}.png")
    atomic_write_bytes(uri, png, cfg.storage_options(uri))
    return {label: png_markdown(png, title), f"{label}_png": dg.MetadataValue.path(uri)}


def figure_png(fig: Any, dpi: int = 80) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def device_metadata(device: str) -> dict[str, Any]:
    md: dict[str, Any] = {"device": dg.MetadataValue.text(device)}
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                md["device_name"] = dg.MetadataValue.text(torch.cuda.get_device_name(0))
        except Exception:  # a missing CUDA runtime must not fail a materialization's metadata
            pass
    return md
