"""Opening the Iceberg catalog and creating the shear tables.

Catalog choice (``open_catalog_from``): ``catalog_uri`` selects the PyIceberg catalog implementation:

- empty / None: embedded default, a SQLite catalog file ``{warehouse}/catalog.db`` (local warehouse only);
- ``sqlite:///path.db`` or ``postgresql+psycopg2://user@host:5432/db`` (any SQLAlchemy URL): SQL catalog;
- ``http(s)://...``: REST catalog;
- ``glue`` / ``glue://``: AWS Glue catalog (region/credentials from the AWS environment);
- anything else is passed to ``pyiceberg.catalog.load_catalog`` as ``uri`` together with ``properties``
  (so ``properties={"type": "hive"}`` etc. work too).

S3 credentials for the warehouse are read from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) at open time and handed to the FileIO only; they are never
written into table properties, snapshot summaries or returned records.

Partitioning: identity(TILE_BUCKET), TILE_BUCKET = TILE_ID mod 256 (a column written by the
assembly). At Wide Survey scale there are ~60,000 tiles and ~1.5e9 sources (~25,000 per tile, ~1-2 MB
of Parquet). Partitioning by identity(TILE_ID) would create 60,000 partitions (directories, manifest
partition summaries) that compaction could never merge, so whole-survey scans would open 60,000+
small files forever. A bounded TILE_ID-derived key keeps the partition count at 256 whatever the
survey size (~235 tiles, ~6e6 rows, ~200 MB per partition once compacted by
``catalog.maintenance.compact_data_files``, scheduled in Dagster), while per-tile work stays cheap: every
assembly commit writes one file per tile, so their TILE_ID min == max statistics make the per-tile
replacement a metadata-only delete (no rewrite of neighbours' rows; after a compaction has merged
tiles, a re-run rewrites that one merged file without the tile), and the serializable conflict check
(file metrics against ``TILE_ID IN batch``) sees no conflict between different tiles committing
concurrently. (Iceberg's own ``bucket()`` transform would do the same but
needs the native pyiceberg-core package on every writer; a plain modulo column needs nothing and is
equally readable by DuckDB/Spark/Trino.) Queries by tile prune on TILE_BUCKET and then on file
statistics (``scan_sources`` adds the TILE_BUCKET predicate for you); spatial queries prune on RA/DEC
file statistics, which are tight because each assembled file covers one tile (~0.28 deg^2) and rows are
written sorted by (DEC, RA), the table's declared sort order. Compacted files hold the tiles of one
bucket (spread over the sky) sorted by (TILE_ID, DEC, RA) in row groups of at most 65,536 rows (2-3
tiles at survey depth), so tile and sky-box queries prune on row-group statistics there. The sub-tile table (16 rows per tile)
uses the same key so the two tables join partition-wise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import (
    NamespaceAlreadyExistsError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.sorting import NullOrder, SortDirection, SortField, SortOrder
from pyiceberg.transforms import IdentityTransform

from constellation_assets.catalog.schema import SOURCES_ICEBERG_SCHEMA, SUBTILES_ICEBERG_SCHEMA

DEFAULT_NAMESPACE = "shear"
SOURCES_TABLE = "sources"
SUBTILES_TABLE = "subtiles"
DEFAULT_CATALOG_NAME = "constellation"

# Table properties. Serializable isolation makes a concurrent commit that added rows of the same tile
# a conflict (ValidationException) instead of a silent second copy; metadata.json files are pruned so
# 60,000 per-tile commits do not leave 60,000 metadata files. Appends are fast appends (merging
# manifests at commit time would rewrite manifests that span all buckets, so every later plan would
# read every entry); scheduled maintenance re-groups manifests by TILE_BUCKET range instead. Every
# commit copies the whole table metadata several times (PyIceberg), so what the metadata lists is kept
# short: 10 previous metadata files in the log, and the snapshot history bounded by the assembly at
# twice ``history.expire.min-snapshots-to-keep`` (catalog.maintenance).
TABLE_PROPERTIES: dict[str, str] = {
    "format-version": "2",
    "write.parquet.compression-codec": "zstd",
    "write.parquet.row-group-limit": "65536",
    "write.update.isolation-level": "serializable",
    "write.delete.isolation-level": "serializable",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "10",
    "history.expire.min-snapshots-to-keep": "20",
    "commit.manifest-merge.enabled": "false",
    "commit.retry.num-retries": "6",
    "commit.retry.min-wait-ms": "50",
    "commit.retry.max-wait-ms": "2000",
}

_ENV_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "s3.access-key-id",
    "AWS_SECRET_ACCESS_KEY": "s3.secret-access-key",
    "AWS_SESSION_TOKEN": "s3.session-token",
}


class CatalogConfigError(ValueError):
    """The catalog settings cannot be turned into a working catalog; the message says what to change."""


def _is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def _warehouse_location(warehouse: str) -> str:
    if "://" in warehouse:
        return warehouse.rstrip("/")
    path = Path(warehouse).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def catalog_properties(
    catalog_uri: str | None,
    warehouse: str,
    properties: Mapping[str, Any] | None = None,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
) -> dict[str, str]:
    """PyIceberg catalog properties for the given settings (credentials from the environment included).

    The returned dict may hold secrets: pass it straight to the catalog, never log or store it.
    """
    if not warehouse:
        raise CatalogConfigError(
            "no Iceberg warehouse given: set output.catalog_warehouse in the config (a local folder or s3:// URI)"
        )
    props: dict[str, str] = {"warehouse": _warehouse_location(warehouse)}
    uri = (catalog_uri or "").strip()
    requested_type = str((properties or {}).get("type") or "").lower()
    if requested_type == "glue" or uri == "glue" or uri.startswith("glue://"):
        props.update(type="glue")
    elif requested_type == "rest" or uri.startswith(("http://", "https://")):
        if not uri:
            raise CatalogConfigError("a REST catalog needs output.catalog_uri set to the REST server URL")
        props.update(type="rest", uri=uri)
    elif not uri:
        if _is_s3(warehouse):
            raise CatalogConfigError(
                f"warehouse {warehouse!r} is on S3 but no catalog URI is set; the embedded SQLite catalog "
                "must be a local file: set output.catalog_uri (e.g. sqlite:////path/catalog.db, "
                "postgresql+psycopg2://user@host:5432/db, or a REST URL)"
            )
        db = Path(warehouse).expanduser().resolve() / "catalog.db"
        props.update(type="sql", uri=f"sqlite:///{db}")
    elif uri.startswith(("sqlite:", "postgresql:")) or "+" in uri.split("://", 1)[0]:
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        props.update(type="sql", uri=uri)
    elif uri.endswith(".db") and "://" not in uri:
        path = Path(uri).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        props.update(type="sql", uri=f"sqlite:///{path}")
    else:
        props["uri"] = uri
    if _is_s3(warehouse):
        if s3_endpoint_url:
            props["s3.endpoint"] = s3_endpoint_url
        if s3_region:
            props["s3.region"] = s3_region
            props.setdefault("client.region", s3_region)
        for env_name, key in _ENV_CREDENTIALS.items():
            if os.environ.get(env_name):
                props[key] = os.environ[env_name]
        # Path-style addressing is what S3-compatible servers (MinIO, moto) expect.
        if s3_endpoint_url:
            props.setdefault("s3.force-virtual-addressing", "false")
    for key, value in (properties or {}).items():
        if value is not None:
            props[str(key)] = str(value)
    return props


def open_catalog_from(
    catalog_uri: str | None,
    warehouse: str,
    catalog_name: str = DEFAULT_CATALOG_NAME,
    properties: Mapping[str, Any] | None = None,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
) -> Catalog:
    """Open (and for SQL catalogs initialise) a PyIceberg catalog; see the module docstring."""
    props = catalog_properties(catalog_uri, warehouse, properties, s3_endpoint_url, s3_region)
    try:
        return load_catalog(catalog_name, **props)
    except Exception as exc:  # message must not echo props (secrets)
        raise CatalogConfigError(
            f"cannot open Iceberg catalog {catalog_name!r} (type {props.get('type', '?')}, "
            f"uri {_redact_uri(props.get('uri', ''))!r}, warehouse {props['warehouse']!r}): "
            f"{type(exc).__name__}: {_redact_uri(str(exc))}. Check output.catalog_uri and that the server is up."
        ) from exc


def _redact_uri(text: str) -> str:
    """Drop a password from ``scheme://user:password@host`` forms."""
    import re

    return re.sub(r"(://[^:/@\s]+):[^@/\s]+@", r"\1:***@", text)


def open_catalog(cfg: Any) -> Catalog:
    """Open the catalog named by a PipelineConfig (``cfg.output`` catalog_uri/catalog_warehouse/catalog_name).

    Also accepts an already opened Catalog (returned unchanged).
    """
    if isinstance(cfg, Catalog):
        return cfg
    return open_catalog_from(**catalog_settings_from_config(cfg))


def catalog_settings_from_config(cfg: Any) -> dict[str, Any]:
    """open_catalog_from keyword arguments from a PipelineConfig (adapter; holds no secrets).

    Uses ``output.catalog`` (URI; default SQLite file under the output root), ``output.catalog_type``,
    ``output.warehouse``, ``output.catalog_name`` and the S3 endpoint/region of ``output.s3`` (default
    ``data.s3``).
    """
    output = cfg.output
    s3 = getattr(output, "s3", None) or getattr(getattr(cfg, "data", None), "s3", None)
    catalog_type = getattr(output, "catalog_type", None)
    properties: dict[str, Any] = {}
    if catalog_type in ("rest", "glue"):
        properties["type"] = catalog_type
    catalog_uri = getattr(output, "catalog_uri", None) if catalog_type == "glue" else output.catalog
    return {
        "catalog_uri": catalog_uri,
        "warehouse": output.warehouse,
        "catalog_name": getattr(output, "catalog_name", None) or DEFAULT_CATALOG_NAME,
        "properties": properties,
        "s3_endpoint_url": getattr(s3, "endpoint_url", None) if s3 is not None else None,
        "s3_region": getattr(s3, "region", None) if s3 is not None else None,
    }


def namespace_from_config(cfg: Any) -> str:
    output = getattr(cfg, "output", None)
    return getattr(output, "namespace", None) or DEFAULT_NAMESPACE


def tile_partition_spec(schema: Schema) -> PartitionSpec:
    """identity(TILE_BUCKET): see the module docstring for why not identity(TILE_ID)."""
    source_id = schema.find_field("TILE_BUCKET").field_id
    return PartitionSpec(
        PartitionField(source_id=source_id, field_id=1000, transform=IdentityTransform(), name="TILE_BUCKET")
    )


# Rows are written sorted by (DEC, RA): files and row groups get narrow DEC ranges first, which is
# what a cone / box query prunes on (RA ranges widen near the poles, DEC ranges do not).
def dec_ra_sort_order(schema: Schema) -> SortOrder:
    """Ascending (DEC, RA) sort order, field ids looked up by name in ``schema``."""
    return SortOrder(
        *(
            SortField(
                source_id=schema.find_field(name).field_id,
                transform=IdentityTransform(),
                direction=SortDirection.ASC,
                null_order=NullOrder.NULLS_LAST,
            )
            for name in ("DEC", "RA")
        )
    )


SOURCES_SORT_ORDER = dec_ra_sort_order(SOURCES_ICEBERG_SCHEMA)
SUBTILES_SORT_ORDER = dec_ra_sort_order(SUBTILES_ICEBERG_SCHEMA)


def table_identifier(namespace: str, name: str) -> tuple[str, str]:
    return (namespace, name)


def _create_if_absent(catalog: Catalog, identifier: tuple[str, str], **kwargs: Any) -> Table:
    # Several processes may race to create the namespace / table: whoever loses just loads it.
    for attempt in range(5):
        try:
            return catalog.load_table(identifier)
        except NoSuchTableError:
            pass
        try:
            return catalog.create_table(identifier, **kwargs)
        except TableAlreadyExistsError:
            continue
        except Exception as exc:  # SQL integrity races surface as driver errors on some backends
            if attempt == 4 or "exist" not in str(exc).lower() and "unique" not in str(exc).lower():
                raise
        time.sleep(0.05 * (attempt + 1))
    return catalog.load_table(identifier)


def ensure_tables(catalog: Catalog, namespace: str = DEFAULT_NAMESPACE) -> tuple[Table, Table]:
    """Create namespace ``namespace`` and tables ``sources`` / ``subtiles`` if absent; return both tables."""
    try:
        catalog.create_namespace_if_not_exists(namespace)
    except NamespaceAlreadyExistsError:
        pass
    except Exception as exc:
        if "exist" not in str(exc).lower() and "unique" not in str(exc).lower():
            raise
    sources = _create_if_absent(
        catalog,
        table_identifier(namespace, SOURCES_TABLE),
        schema=SOURCES_ICEBERG_SCHEMA,
        partition_spec=tile_partition_spec(SOURCES_ICEBERG_SCHEMA),
        sort_order=SOURCES_SORT_ORDER,
        properties=TABLE_PROPERTIES,
    )
    subtiles = _create_if_absent(
        catalog,
        table_identifier(namespace, SUBTILES_TABLE),
        schema=SUBTILES_ICEBERG_SCHEMA,
        partition_spec=tile_partition_spec(SUBTILES_ICEBERG_SCHEMA),
        sort_order=SUBTILES_SORT_ORDER,
        properties=TABLE_PROPERTIES,
    )
    return _with_table_properties(catalog, sources), _with_table_properties(catalog, subtiles)


def _with_table_properties(catalog: Catalog, table: Table) -> Table:
    """Bring an existing table's properties to TABLE_PROPERTIES (one commit, only when they differ).

    Tables created by earlier versions keep working and get the current maintenance settings.
    ``format-version`` is never changed here.
    """
    current = table.metadata.properties
    wanted = {k: v for k, v in TABLE_PROPERTIES.items() if k != "format-version" and current.get(k) != v}
    if not wanted:
        return table
    for attempt in range(5):
        try:
            with table.transaction() as tx:
                tx.set_properties(wanted)
            return catalog.load_table(table.name())
        except Exception as exc:  # a concurrent writer changed the table first: reload and retry
            if attempt == 4 or type(exc).__name__ != "CommitFailedException":
                raise
            time.sleep(0.05 * (attempt + 1))
            table = catalog.load_table(table.name())
            current = table.metadata.properties
            wanted = {
                k: v for k, v in TABLE_PROPERTIES.items() if k != "format-version" and current.get(k) != v
            }
            if not wanted:
                return table
    return table


def load_tables(catalog: Catalog, namespace: str = DEFAULT_NAMESPACE) -> tuple[Table, Table]:
    """(sources, subtiles) tables; a clear error when the catalog has not been assembled into yet."""
    try:
        return (
            catalog.load_table(table_identifier(namespace, SOURCES_TABLE)),
            catalog.load_table(table_identifier(namespace, SUBTILES_TABLE)),
        )
    except NoSuchTableError as exc:
        raise CatalogConfigError(
            f"catalog {catalog.name!r} has no tables {namespace}.{SOURCES_TABLE} / {namespace}.{SUBTILES_TABLE}: "
            "run `constellation assemble` first (or check output.catalog_uri points at the right catalog)"
        ) from exc
