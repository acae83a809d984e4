"""Iceberg shear catalog: schemas, tables, per-tile idempotent assembly and queries."""

from constellation_assets.catalog.assemble import (
    AssembleResult,
    AssemblyError,
    assemble_results,
    assemble_tile,
    assemble_tiles,
    expand_result_uris,
    group_results_by_tile,
)
from constellation_assets.catalog.maintenance import (
    compact_data_files,
    expire_snapshots,
    maintain_catalog,
    remove_orphan_files,
    rewrite_manifests,
)
from constellation_assets.catalog.query import assembly_history, scan_sources, scan_subtiles
from constellation_assets.catalog.schema import (
    SOURCE_RESULT_SCHEMA,
    SOURCES_ICEBERG_SCHEMA,
    SUBTILE_SCHEMA,
    SUBTILES_ICEBERG_SCHEMA,
    ResultFileError,
    read_subtile_result,
    subtile_result_name,
    write_subtile_result,
)
from constellation_assets.catalog.tables import (
    CatalogConfigError,
    ensure_tables,
    load_tables,
    open_catalog,
    open_catalog_from,
)

__all__ = [
    "SOURCES_ICEBERG_SCHEMA",
    "SOURCE_RESULT_SCHEMA",
    "SUBTILES_ICEBERG_SCHEMA",
    "SUBTILE_SCHEMA",
    "AssembleResult",
    "AssemblyError",
    "CatalogConfigError",
    "ResultFileError",
    "assemble_results",
    "assemble_tile",
    "assemble_tiles",
    "compact_data_files",
    "assembly_history",
    "ensure_tables",
    "expand_result_uris",
    "expire_snapshots",
    "group_results_by_tile",
    "load_tables",
    "maintain_catalog",
    "open_catalog",
    "open_catalog_from",
    "read_subtile_result",
    "remove_orphan_files",
    "rewrite_manifests",
    "scan_sources",
    "scan_subtiles",
    "subtile_result_name",
    "write_subtile_result",
]
