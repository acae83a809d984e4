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
    if hasattr(obj, "to_arrow"):  # polars DataFrame, pyiceberg Schema
        arrow = obj.to_arrow()
        return arrow if isinstance(arrow, pa.Schema) else arrow.schema
    raise TypeError(f"cannot derive an Arrow schema from {type(obj).__name__}")


def table_schema(obj: Any) -> dg.TableSchema:
    """TableSchema from a pyarrow Schema/Table, polars DataFrame or pyiceberg Schema."""
    schema = _arrow_schema(obj)
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=f.name,
                type=str(f.type),
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
