"""Assembly: sub-tile result files -> per-tile idempotent overwrite of the Iceberg shear tables.

For one tile, ``assemble_tile`` reads the tile's sub-tile Parquet results, keeps only sources inside
their sub-tile core (``IN_CORE``), refuses duplicate OBJECT_IDs, and replaces that tile's rows:

1. ``shear.sources``: one transaction = overwrite with filter ``TILE_ID == tile_id``;
2. ``shear.subtiles``: one transaction = overwrite with the same filter.

Iceberg commits are atomic per table, so the two tables are committed in this fixed order. Each
overwrite deletes whatever rows the tile had and adds the new ones in one snapshot pair, so a re-run
of a tile never duplicates. A crash after (1) and before (2) leaves the tile's sources from the new
run and its sub-tile rows from the previous run (or none): the ``run_consistency`` quality check
flags exactly that (RUN_ID differs between the tables), and re-running the assembly of that tile
heals it, because both steps are idempotent overwrites. The sub-tile rows are therefore the "tile
is complete" marker: they are written last.

Concurrency: commits use optimistic concurrency. PyIceberg retries a commit whose base moved
(``CommitFailedException``), re-validating under serializable isolation; if a concurrent commit added
or removed rows of the *same* tile the validation raises ``ValidationException``. Both are caught
here: the table is reloaded and the whole overwrite is planned again from the new head, with
exponential backoff. Different tiles never conflict (their files are disjoint in TILE_ID), and the
same tile committed twice at once ends with exactly one copy (the later commit re-plans its delete
against the earlier one's rows).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import And, BooleanExpression, EqualTo
from pyiceberg.table import Table

from constellation_assets.catalog.external import read_result_file
from constellation_assets.catalog.schema import (
    SOURCES_TABLE_ARROW_SCHEMA,
    SUBTILES_PER_TILE,
    SUBTILES_TABLE_ARROW_SCHEMA,
    ResultFileError,
    conform_table,
    parse_subtile_result_name,
    subtiles_table,
    tile_bucket,
)
from constellation_assets.catalog.tables import (
    DEFAULT_NAMESPACE,
    SOURCES_TABLE,
    SUBTILES_TABLE,
    ensure_tables,
    table_identifier,
)
from constellation_assets.io.uri import redact_uri

# Snapshot summary property keys written on every assembly commit.
PROP_RUN_ID = "constellation.run_id"
PROP_CONFIG_HASH = "constellation.config_hash"
PROP_CODE_VERSION = "constellation.code_version"
PROP_TILE_ID = "constellation.tile_id"
PROP_ASSEMBLY_ID = "constellation.assembly_id"
PROP_ROWS = "constellation.rows"

DEFAULT_MAX_ATTEMPTS = 20
DEFAULT_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0


class AssemblyError(ValueError):
    """The results of a tile cannot be assembled (wrong tile, duplicates, unreadable file); says what to do."""


@dataclass(frozen=True)
class AssembleResult:
    """What one tile's assembly committed."""

    tile_id: int
    run_id: str
    assembly_id: str
    n_sources: int  # core sources written to shear.sources
    n_margin_dropped: int  # rows dropped because they are outside their sub-tile core
    n_subtiles: int  # rows written to shear.subtiles
    sources_snapshot_id: int | None
    subtiles_snapshot_id: int | None
    commit_attempts: int  # total overwrite attempts over both tables (2 when nothing conflicted)
    elapsed_s: float
    missing_subtiles: list[tuple[int, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["missing_subtiles"] = [list(x) for x in self.missing_subtiles]
        return d


def _backoff_s(tile_id: int, attempt: int, base_s: float) -> float:
    # Jitter derived from (tile, pid, attempt) rather than global RNG state: spreads competing writers
    # apart without touching any data-producing randomness.
    digest = hashlib.sha256(f"{tile_id}:{os.getpid()}:{attempt}".encode()).digest()
    jitter = 0.5 + int.from_bytes(digest[:4], "little") / 2**32
    return min(MAX_BACKOFF_S, base_s * (2 ** min(attempt, 8)) * jitter)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (CommitFailedException, ValidationException)):
        return True
    # SQLite under several writers reports a busy database; the statement did not run.
    text = str(exc).lower()
    return type(exc).__name__ == "OperationalError" and ("locked" in text or "busy" in text)


def tile_filter(tile_id: int) -> BooleanExpression:
    """Row filter selecting one tile (partition predicate first, so manifests prune)."""
    return And(EqualTo("TILE_BUCKET", tile_bucket(tile_id)), EqualTo("TILE_ID", int(tile_id)))


def overwrite_tile(
    catalog: Catalog,
    identifier: tuple[str, str],
    tile_id: int,
    data: pa.Table,
    snapshot_properties: Mapping[str, str],
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> tuple[int | None, int]:
    """Replace all rows with ``TILE_ID == tile_id`` in one table by ``data``; return (snapshot_id, attempts).

    Each attempt loads the table afresh and plans the overwrite against the current head, so a retry
    after a conflict sees (and deletes) rows a concurrent writer added for the same tile.
    """
    row_filter = tile_filter(tile_id)
    last_exc: BaseException | None = None
    for attempt in range(1, max_attempts + 1):
        table: Table = catalog.load_table(identifier)
        try:
            with warnings.catch_warnings():
                # "Delete operation did not match any records" on a tile's first assembly is expected.
                warnings.filterwarnings("ignore", message="Delete operation did not match")
                tx = table.transaction()
                tx.overwrite(data, overwrite_filter=row_filter, snapshot_properties=dict(snapshot_properties))
                committed = tx.commit_transaction()
        except Exception as exc:
            if isinstance(exc, OSError):
                # The warehouse storage failed (after the file layer's own retries): the commit did not happen.
                raise AssemblyError(
                    f"writing tile {tile_id} to {'.'.join(identifier)} failed at the warehouse storage "
                    f"({type(exc).__name__}: {redact_uri(str(exc))}); the table is unchanged: check the warehouse "
                    "location and credentials, then re-run the assembly of this tile"
                ) from exc
            if not _retryable(exc):
                raise
            last_exc = exc
            time.sleep(_backoff_s(tile_id, attempt, backoff_s))
            continue
        snapshot = _find_snapshot(committed, snapshot_properties)
        return (snapshot.snapshot_id if snapshot is not None else None), attempt
    raise CommitFailedException(
        f"could not commit tile {tile_id} to {'.'.join(identifier)} after {max_attempts} attempts "
        f"(last error: {type(last_exc).__name__}: {last_exc}); too many concurrent writers on the same "
        "tile or a catalog problem: re-run the assembly of this tile"
    ) from last_exc


def _find_snapshot(table: Table, snapshot_properties: Mapping[str, str]):
    """The snapshot this commit produced: the head of the metadata the commit returned."""
    assembly_id = snapshot_properties.get(PROP_ASSEMBLY_ID)
    head = table.current_snapshot()
    if head is not None and head.summary is not None and head.summary.get(PROP_ASSEMBLY_ID) == assembly_id:
        return head
    ours = [
        s
        for s in table.metadata.snapshots
        if s.summary is not None and s.summary.get(PROP_ASSEMBLY_ID) == assembly_id
    ]
    return max(ours, key=lambda s: s.sequence_number or 0) if ours else head


def load_tile_results(
    tile_id: int,
    result_uris: Iterable[str],
    storage_options: dict | None = None,
    *,
    run_id: str | None = None,
    config_hash: str | None = None,
) -> tuple[pa.Table, pa.Table, int, list[tuple[int, int]]]:
    """Read one tile's result files -> (core sources for shear.sources, sub-tile rows, n dropped, missing).

    A file may also be the seed's per-sub-tile result (one row, e.g. written by SHINE; see
    :mod:`constellation_assets.catalog.external`): it adds its row to the sub-tiles and no sources; when it
    carries no RUN_ID/CONFIG_HASH, ``run_id``/``config_hash`` (this assembly's) are recorded for it.

    Raises AssemblyError naming the offending file when a file belongs to another tile, a sub-tile
    appears twice, a file is unreadable, or an OBJECT_ID occurs in more than one core.
    """
    tile_id = int(tile_id)
    seen: dict[tuple[int, int], str] = {}
    source_parts: list[pa.Table] = []
    summaries: list[dict[str, Any]] = []
    n_dropped = 0
    uris = list(result_uris)
    for uri in uris:
        try:
            file_tile, row, col = parse_subtile_result_name(uri)
        except ResultFileError as exc:
            raise AssemblyError(str(exc)) from exc
        if file_tile != tile_id:
            raise AssemblyError(f"result {uri!r} belongs to tile {file_tile}, not to tile {tile_id}")
        if (row, col) in seen:
            raise AssemblyError(
                f"sub-tile ({row}, {col}) of tile {tile_id} given twice: {seen[(row, col)]!r} and {uri!r}; "
                "pass each sub-tile result once"
            )
        seen[(row, col)] = uri
    # Reads are I/O bound (S3 round trips): a few threads, results kept in input order.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(uris)))) as pool:
        futures = [pool.submit(read_result_file, uri, storage_options) for uri in uris]
        try:
            loaded = [f.result() for f in futures]
        except ResultFileError as exc:
            raise AssemblyError(str(exc)) from exc
    for uri, (rows, summary) in zip(uris, loaded, strict=True):
        if summary.get("result_shape") == "subtile":
            summary["run_id"] = summary.get("run_id") or run_id or "external"
            summary["config_hash"] = summary.get("config_hash") or config_hash or "unknown"
        core = rows.filter(rows["IN_CORE"])
        n_dropped += rows.num_rows - core.num_rows
        run_id = str(summary["run_id"])
        core = core.drop_columns(["IN_CORE"])
        core = core.append_column("RUN_ID", pa.array([run_id] * core.num_rows, pa.string()))
        core = core.append_column("TILE_BUCKET", pa.array([tile_bucket(tile_id)] * core.num_rows, pa.int32()))
        source_parts.append(conform_table(core, SOURCES_TABLE_ARROW_SCHEMA, f"sub-tile result {uri!r}"))
        summaries.append(summary)
    if not seen:
        raise AssemblyError(f"no result files given for tile {tile_id}")
    sources = pa.concat_tables(source_parts) if source_parts else SOURCES_TABLE_ARROW_SCHEMA.empty_table()
    _check_unique_object_ids(tile_id, sources)
    # The table's declared sort order is (DEC, RA); PyIceberg does not sort on write, so do it here.
    sources = sources.sort_by([("DEC", "ascending"), ("RA", "ascending")])
    subtiles = subtiles_table(summaries)
    subtiles = subtiles.append_column(
        "TILE_BUCKET", pa.array([tile_bucket(tile_id)] * subtiles.num_rows, pa.int32())
    )
    subtiles = conform_table(subtiles, SUBTILES_TABLE_ARROW_SCHEMA, f"tile {tile_id} summaries")
    subtiles = subtiles.sort_by([("SUBTILE_ROW", "ascending"), ("SUBTILE_COL", "ascending")])
    grid = int(round(SUBTILES_PER_TILE**0.5))
    missing = sorted({(r, c) for r in range(grid) for c in range(grid)} - set(seen))
    return sources, subtiles, n_dropped, missing


def _check_unique_object_ids(tile_id: int, sources: pa.Table) -> None:
    if sources.num_rows == 0:
        return
    counts = pc.value_counts(sources["OBJECT_ID"])
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        ids = [d["values"].as_py() for d in dup[:5]]
        raise AssemblyError(
            f"tile {tile_id}: {len(dup)} OBJECT_ID(s) are in more than one sub-tile core, e.g. {ids}; "
            "the core assignment of the shear stage is inconsistent: re-run the affected sub-tiles"
        )


def assemble_tile(
    catalog: Catalog,
    tile_id: int,
    result_uris: Iterable[str],
    run_id: str,
    config_hash: str,
    code_version: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    storage_options: dict | None = None,
    require_complete: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> AssembleResult:
    """Replace tile ``tile_id``'s rows in ``{namespace}.sources`` then ``{namespace}.subtiles``.

    ``result_uris``: the tile's sub-tile result files (``{TILE}_{ROW}_{COL}.parquet``). With
    ``require_complete`` all 16 sub-tiles must be present. Idempotent: re-running with the same inputs
    leaves the same rows (one copy). Snapshot summaries carry run_id, config_hash, code_version,
    tile_id and a per-call assembly id.
    """
    start = time.perf_counter()
    tile_id = int(tile_id)
    sources, subtiles, n_dropped, missing = load_tile_results(
        tile_id, list(result_uris), storage_options, run_id=str(run_id), config_hash=str(config_hash)
    )
    if require_complete and missing:
        raise AssemblyError(
            f"tile {tile_id} is missing sub-tile result(s) {missing}; run the shear stage for them first"
        )
    ensure_tables(catalog, namespace)
    assembly_id = uuid.uuid4().hex
    base_props = {
        PROP_RUN_ID: str(run_id),
        PROP_CONFIG_HASH: str(config_hash),
        PROP_CODE_VERSION: str(code_version),
        PROP_TILE_ID: str(tile_id),
        PROP_ASSEMBLY_ID: assembly_id,
    }
    src_snapshot, src_attempts = overwrite_tile(
        catalog,
        table_identifier(namespace, SOURCES_TABLE),
        tile_id,
        sources,
        {**base_props, PROP_ROWS: str(sources.num_rows)},
        max_attempts=max_attempts,
        backoff_s=backoff_s,
    )
    sub_snapshot, sub_attempts = overwrite_tile(
        catalog,
        table_identifier(namespace, SUBTILES_TABLE),
        tile_id,
        subtiles,
        {**base_props, PROP_ROWS: str(subtiles.num_rows)},
        max_attempts=max_attempts,
        backoff_s=backoff_s,
    )
    return AssembleResult(
        tile_id=tile_id,
        run_id=str(run_id),
        assembly_id=assembly_id,
        n_sources=sources.num_rows,
        n_margin_dropped=n_dropped,
        n_subtiles=subtiles.num_rows,
        sources_snapshot_id=src_snapshot,
        subtiles_snapshot_id=sub_snapshot,
        commit_attempts=src_attempts + sub_attempts,
        elapsed_s=time.perf_counter() - start,
        missing_subtiles=missing,
    )


def group_results_by_tile(result_uris: Iterable[str]) -> dict[int, list[str]]:
    """{tile_id: [uris]} from result file names (sorted by tile, then name)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for uri in result_uris:
        try:
            tile_id, _, _ = parse_subtile_result_name(uri)
        except ResultFileError as exc:
            raise AssemblyError(str(exc)) from exc
        groups[tile_id].append(uri)
    return {t: sorted(groups[t]) for t in sorted(groups)}


def expand_result_uris(uris: Iterable[str], storage_options: dict | None = None) -> list[str]:
    """Files and folders/prefixes -> the sub-tile result files they hold (``*_*_*.parquet``), sorted.

    A folder is searched recursively; files whose names are not result names are ignored inside
    folders, but a file named explicitly must be a result file.
    """
    from constellation_assets.io.uri import get_fs, list_uri

    out: list[str] = []
    for uri in uris:
        uri = str(uri)
        fs, path = get_fs(uri, storage_options)
        if uri.endswith(".parquet") and fs.isfile(path):
            parse_subtile_result_name(uri)
            out.append(uri)
            continue
        if not fs.exists(path):
            raise AssemblyError(
                f"results location {uri!r} does not exist; check the path (or run `constellation infer`)"
            )
        for entry in list_uri(uri, storage_options=storage_options, recursive=True):
            name = entry.rsplit("/", 1)[-1]
            if name.startswith("."):
                continue  # temporary files of an atomic write in progress
            try:
                parse_subtile_result_name(entry)
            except ResultFileError:
                continue
            out.append(entry)
    return sorted(set(out))


def code_version() -> str:
    from constellation_assets import __version__

    return str(__version__)


def assemble_results(
    cfg: Any,
    result_uris: Iterable[str],
    *,
    run_id: str | None = None,
    catalog: Catalog | None = None,
    require_complete: bool = False,
    on_tiles_found: Callable[[int], None] | None = None,
    on_tile_done: Callable[[AssembleResult], None] | None = None,
) -> list[AssembleResult]:
    """Assemble every tile found in ``result_uris`` (files or folders) into the catalog of ``cfg``.

    Tiles are committed one after another (each tile: sources then subtiles); the callbacks report
    the number of tiles found and each finished tile (progress bars). ``run_id`` defaults to
    ``assemble-{UTC timestamp}``; config_hash and code version come from ``cfg`` and the package.
    """
    from constellation_assets.catalog.tables import namespace_from_config, open_catalog

    result_uris = [str(u) for u in result_uris]
    uris = []
    for uri in result_uris:
        uris += expand_result_uris([uri], _storage_options_for(cfg, uri))
    uris = sorted(set(uris))
    if not uris:
        raise AssemblyError(
            f"no sub-tile result files ({{TILE}}_{{ROW}}_{{COL}}.parquet) found in {list(result_uris)}; "
            "run the shear stage first or check the path"
        )
    catalog = catalog if catalog is not None else open_catalog(cfg)
    namespace = namespace_from_config(cfg)
    chash = _config_hash(cfg)
    run_id = run_id or time.strftime("assemble-%Y%m%dT%H%M%SZ", time.gmtime())
    groups = group_results_by_tile(uris)
    if on_tiles_found is not None:
        on_tiles_found(len(groups))
    results = []
    for tile_id, tile_uris in groups.items():
        res = assemble_tile(
            catalog,
            tile_id,
            tile_uris,
            run_id=run_id,
            config_hash=chash,
            code_version=code_version(),
            namespace=namespace,
            storage_options=_storage_options_for(cfg, tile_uris[0]),
            require_complete=require_complete,
        )
        results.append(res)
        if on_tile_done is not None:
            on_tile_done(res)
    _write_stage_record(cfg, [r.tile_id for r in results])
    return results


def _write_stage_record(cfg: Any, tile_ids: list[int]) -> None:
    """The assemble stage's run_config record (after every tile's commit), for a PipelineConfig."""
    if hasattr(cfg, "output") and hasattr(cfg, "field_name"):
        from constellation_assets.provenance import write_stage_record

        write_stage_record(cfg, "assemble", {"tiles": tile_ids})


def _storage_options_for(cfg: Any, uri: str) -> dict | None:
    return cfg.storage_options(uri) if hasattr(cfg, "storage_options") else None


def _config_hash(cfg: Any) -> str:
    try:
        from constellation_assets.provenance import config_hash

        return str(config_hash(cfg))
    except ImportError:  # provenance module not present in a stripped install
        return "unknown"
