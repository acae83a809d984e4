"""Assembly: sub-tile result files -> idempotent per-tile replacement of rows in the Iceberg shear tables.

``assemble_tiles`` reads the sub-tile Parquet results of one or many tiles, keeps only sources inside
their sub-tile core (``IN_CORE``), refuses duplicate OBJECT_IDs, and replaces those tiles' rows:

1. ``shear.sources``: one transaction for the whole batch of tiles;
2. ``shear.subtiles``: one transaction for the same batch.

``assemble_tile`` is the one-tile case. Iceberg commits are atomic per table, so the two tables are
committed in this fixed order. Each transaction deletes whatever rows the batch's tiles had and adds
the new ones, so a re-run never duplicates. A crash after (1) and before (2) leaves the tiles' sources
from the new run and their sub-tile rows from the previous run (or none): the ``run_consistency``
quality check flags exactly that (RUN_ID differs between the tables), and re-running the assembly
heals it, because both steps are idempotent replacements. The sub-tile rows are therefore the "tile is
complete" marker: they are written last.

Survey scale (60,000 tiles). The cost of a commit must not grow with the number of tiles already in
the table, so a transaction is planned from file statistics, not by rewriting:

- the files that hold the batch's tiles are found with a scan planned on the TILE_BUCKET partition
  and the TILE_ID column statistics (``plan_tile_replacement``). Files written by an assembly hold
  one tile (TILE_ID min == max): they are dropped from the table without reading them. Files that hold
  several tiles (compacted by ``catalog.maintenance``) are read only when their TILE_ID column really
  contains a tile of the batch; then the other tiles' rows are written to a new file;
- a batch of new tiles (no rows yet, the common case of a backfill) is a plain append: no delete
  snapshot and no data read, one data file per tile, one new manifest (fast append: no existing
  manifest is read or rewritten; ``catalog.maintenance.rewrite_manifests`` re-groups them later);
- many tiles per commit (``assemble_results(batch_size=...)``, ``constellation assemble``) divide the
  fixed per-commit cost (catalog round trip, metadata.json rewrite) by the batch size.

What else would grow (the snapshot list in every metadata.json, the number of small data files and
manifests) is bounded by ``catalog.maintenance`` (snapshot expiry and compaction, scheduled in Dagster).

Concurrency: commits use optimistic concurrency. Every transaction carries the predicate
``TILE_ID IN (batch)`` for conflict detection under serializable isolation: PyIceberg retries a commit
whose base moved (``CommitFailedException``) and re-validates it; if a concurrent commit added or
removed rows of the *same* tiles, or removed a file this commit replaces (compaction), validation
raises ``ValidationException``. Both are caught here: the table is reloaded and the whole replacement
is planned again from the new head, with exponential backoff. Different tiles never conflict (their
files are disjoint in TILE_ID), and the same tile committed twice at once ends with exactly one copy
(the later commit re-plans its delete against the earlier one's rows).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.conversions import from_bytes
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo
from pyiceberg.table import Table
from pyiceberg.types import LongType

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
PROP_TILE_COUNT = "constellation.tile_count"
PROP_TILE_ID_MIN = "constellation.tile_id_min"
PROP_TILE_ID_MAX = "constellation.tile_id_max"
MAX_TILE_IDS_IN_SUMMARY = 16

# Tiles per commit when many tiles are assembled at once (CLI, local pipeline): the fixed per-commit
# cost is shared by the batch; memory is ~batch x rows per tile (~25,000 x ~100 B at survey depth).
DEFAULT_BATCH_SIZE = 64

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
    elapsed_s: float  # wall time of the assembly call (of the whole batch when batch_size > 1)
    missing_subtiles: list[tuple[int, int]] = field(default_factory=list)
    batch_size: int = 1  # tiles committed together with this one

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


def tiles_filter(tile_ids: Iterable[int]) -> BooleanExpression:
    """Row filter selecting several tiles (``TILE_BUCKET IN (...) AND TILE_ID IN (...)``)."""
    from constellation_assets.catalog.query import tiles_expression

    ids = sorted({int(t) for t in tile_ids})
    if not ids:
        raise ValueError("tile_ids is empty")
    if len(ids) == 1:
        return tile_filter(ids[0])
    return tiles_expression(ids)


@dataclass
class TileReplacementPlan:
    """Which data files of a table hold rows of a batch of tiles, and what replaces them.

    ``whole_files``: files holding only tiles of the batch (dropped without being read);
    ``rewrites``: (file, rows of other tiles to keep) for files that mix batch tiles with others;
    ``tiles_present``: batch tiles that have rows in the table now.
    """

    whole_files: list[Any] = field(default_factory=list)
    rewrites: list[tuple[Any, pa.Table]] = field(default_factory=list)
    tiles_present: set[int] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not self.whole_files and not self.rewrites


def _tile_id_bounds(data_file: Any, field_id: int) -> tuple[int, int] | None:
    lo = (data_file.lower_bounds or {}).get(field_id)
    hi = (data_file.upper_bounds or {}).get(field_id)
    if lo is None or hi is None:
        return None
    return int(from_bytes(LongType(), lo)), int(from_bytes(LongType(), hi))


def plan_tile_replacement(table: Table, tile_ids: Iterable[int]) -> TileReplacementPlan:
    """Find the files of ``table`` holding rows of ``tile_ids`` (partition + statistics pruned).

    A file whose TILE_ID statistics say it holds one tile is decided from metadata alone. A file
    covering a TILE_ID range (a compacted file) is opened for its TILE_ID column only, and read in
    full only when it really holds a tile of the batch (its other rows are kept).
    """
    from pyiceberg.io.pyarrow import ArrowScan

    ids = {int(t) for t in tile_ids}
    plan = TileReplacementPlan()
    if table.current_snapshot() is None:
        return plan
    row_filter = tiles_filter(ids)
    schema = table.schema()
    fid = schema.find_field("TILE_ID").field_id
    id_schema = schema.select("TILE_ID")
    sorted_ids = sorted(ids)
    for task in table.scan(row_filter=row_filter).plan_files():
        bounds = _tile_id_bounds(task.file, fid)
        if bounds is not None and bounds[0] == bounds[1]:
            if bounds[0] in ids:
                plan.whole_files.append(task.file)
                plan.tiles_present.add(bounds[0])
            continue
        # Iceberg's metrics evaluation gives up on IN lists longer than 200 values (every file "might
        # match"); check the file's TILE_ID range against the batch here before opening anything.
        if bounds is not None:
            i = bisect.bisect_left(sorted_ids, bounds[0])
            if i == len(sorted_ids) or sorted_ids[i] > bounds[1]:
                continue
        present = ArrowScan(table.metadata, table.io, id_schema, row_filter).to_table([task])
        if present.num_rows == 0:
            continue  # the TILE_ID range covers a batch tile but the file does not hold it
        found = {int(x) for x in pc.unique(present["TILE_ID"]).to_pylist()}
        plan.tiles_present |= found
        rows = ArrowScan(table.metadata, table.io, schema, AlwaysTrue()).to_table([task])
        keep = rows.filter(pc.invert(pc.is_in(rows["TILE_ID"], pa.array(sorted(ids), pa.int64()))))
        plan.rewrites.append((task.file, keep))
    return plan


_VALIDATED_APPEND: type | None = None


def _validated_append_class() -> type:
    """A fast append that validates like an overwrite when a retry finds the base moved.

    PyIceberg's fast append skips concurrency validation (appends never conflict in general), but
    appending tiles that were absent at planning time is only correct if no concurrent commit added
    rows of those tiles meanwhile: with the batch predicate set, the retry runs the serializable
    checks of an overwrite (added or deleted files matching ``TILE_ID IN batch``) and raises
    ValidationException on a conflict, which ``overwrite_tiles`` answers by re-planning.
    """
    global _VALIDATED_APPEND
    if _VALIDATED_APPEND is None:
        from pyiceberg.table.update.snapshot import _FastAppendFiles, _SnapshotProducer

        class _ValidatedFastAppend(_FastAppendFiles):
            def _validate_concurrency(self) -> None:
                _SnapshotProducer._validate_concurrency(self)

        _VALIDATED_APPEND = _ValidatedFastAppend
    return _VALIDATED_APPEND


def _stage_tile_replacement(
    tx: Any, table: Table, tiles: Mapping[int, pa.Table], plan: TileReplacementPlan, props: dict[str, str]
) -> None:
    """Stage, in ``tx``, one snapshot that removes the batch tiles' current rows and adds their new rows.

    New tiles only (the backfill case): a fast append, which reads no manifest. Otherwise an
    overwrite that drops the planned files (and writes back other tiles' rows of mixed files). Either
    way the producer carries the batch predicate, so that a retry after a concurrent commit validates
    it (serializable isolation) before re-applying.
    """
    from pyiceberg.io.pyarrow import _dataframe_to_data_files
    from pyiceberg.table.snapshots import Operation

    row_filter = tiles_filter(tiles)
    # Transaction.table_metadata deep-copies the whole table metadata on every access: take it once
    # (writing data files needs only its schema, partition spec, properties and location).
    meta = tx.table_metadata
    if plan.is_empty:
        producer = _validated_append_class()(
            operation=Operation.APPEND, transaction=tx, io=table.io, snapshot_properties=props
        )
    else:
        producer = tx.update_snapshot(snapshot_properties=props).overwrite()
    with producer:
        producer.delete_by_predicate(row_filter)
        counter = itertools.count(0)
        for data_file in plan.whole_files:
            producer.delete_data_file(data_file)
        for data_file, keep in plan.rewrites:
            producer.delete_data_file(data_file)
            if keep.num_rows:
                for new_file in _dataframe_to_data_files(
                    meta, keep, table.io, write_uuid=producer.commit_uuid, counter=counter
                ):
                    producer.append_data_file(new_file)
        # One file per tile: a later re-assembly of the tile drops that file without reading it.
        for tile_id in sorted(tiles):
            data = tiles[tile_id]
            if data.num_rows == 0:
                continue
            for new_file in _dataframe_to_data_files(
                meta, data, table.io, write_uuid=producer.commit_uuid, counter=counter
            ):
                producer.append_data_file(new_file)


def overwrite_tiles(
    catalog: Catalog,
    identifier: tuple[str, str],
    tiles: Mapping[int, pa.Table],
    snapshot_properties: Mapping[str, str],
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> tuple[int | None, int]:
    """Replace all rows of the tiles in ``tiles`` ({tile_id: new rows}) in one table, in one transaction.

    Returns (snapshot_id of the commit's last snapshot, attempts). Each attempt loads the table afresh
    and plans the replacement against the current head, so a retry after a conflict sees (and
    removes) rows a concurrent writer added for the same tiles.
    """
    if not tiles:
        raise ValueError("overwrite_tiles needs at least one tile")
    first_tile = min(tiles)
    what = f"tile {first_tile}" if len(tiles) == 1 else f"{len(tiles)} tiles ({first_tile}, ...)"
    last_exc: BaseException | None = None
    for attempt in range(1, max_attempts + 1):
        table: Table = catalog.load_table(identifier)
        try:
            plan = plan_tile_replacement(table, tiles)
            tx = table.transaction()
            _stage_tile_replacement(tx, table, tiles, plan, dict(snapshot_properties))
            committed = tx.commit_transaction()
        except Exception as exc:
            if isinstance(exc, OSError):
                # The warehouse storage failed (after the file layer's own retries): the commit did not happen.
                raise AssemblyError(
                    f"writing {what} to {'.'.join(identifier)} failed at the warehouse storage "
                    f"({type(exc).__name__}: {redact_uri(str(exc))}); the table is unchanged: check the warehouse "
                    "location and credentials, then re-run the assembly of these tiles"
                ) from exc
            if not _retryable(exc):
                raise
            last_exc = exc
            time.sleep(_backoff_s(first_tile, attempt, backoff_s))
            continue
        snapshot = _find_snapshot(committed, snapshot_properties)
        _bound_snapshot_history(catalog, identifier, committed)
        return (snapshot.snapshot_id if snapshot is not None else None), attempt
    raise CommitFailedException(
        f"could not commit {what} to {'.'.join(identifier)} after {max_attempts} attempts "
        f"(last error: {type(last_exc).__name__}: {last_exc}); too many concurrent writers on the same "
        "tiles or a catalog problem: re-run the assembly of these tiles"
    ) from last_exc


def _bound_snapshot_history(catalog: Catalog, identifier: tuple[str, str], table: Table) -> None:
    """Expire the oldest snapshots once the table holds more than twice ``history.expire.min-snapshots-to-keep``.

    Every commit copies and rewrites the whole metadata (all snapshots) several times, so its cost
    grows with the snapshot count; a backfill of one tile per Dagster run makes thousands of snapshots
    between two scheduled maintenance runs. Expiring here (one extra commit every ``keep`` commits)
    keeps every commit's cost flat. Files are not deleted here: the scheduled maintenance removes the
    files no retained snapshot references (``remove_orphan_files``). A concurrent commit whose starting
    snapshot this expires re-plans (ValidationException, retried by ``overwrite_tiles``).
    """
    from constellation_assets.catalog.maintenance import expire_table_snapshots, snapshots_to_keep

    keep = snapshots_to_keep(table)
    if keep <= 0 or len(table.metadata.snapshots) <= 2 * keep:
        return
    # The commit itself stands if this fails; the next commit or the scheduled maintenance expires instead.
    with contextlib.suppress(CommitFailedException, ValidationException, ValueError):
        expire_table_snapshots(catalog, identifier, keep_last=keep, min_age=timedelta(0), max_attempts=2)


def overwrite_tile(
    catalog: Catalog,
    identifier: tuple[str, str],
    tile_id: int,
    data: pa.Table,
    snapshot_properties: Mapping[str, str],
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> tuple[int | None, int]:
    """Replace all rows with ``TILE_ID == tile_id`` in one table by ``data``; return (snapshot_id, attempts)."""
    return overwrite_tiles(
        catalog, identifier, {int(tile_id): data}, snapshot_properties, max_attempts, backoff_s
    )


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
    sources, subtiles, n_dropped = tile_tables(
        tile_id, list(zip(uris, loaded, strict=True)), run_id=run_id, config_hash=config_hash
    )
    grid = int(round(SUBTILES_PER_TILE**0.5))
    missing = sorted({(r, c) for r in range(grid) for c in range(grid)} - set(seen))
    return sources, subtiles, n_dropped, missing


def tile_tables(
    tile_id: int,
    results: Iterable[tuple[str, tuple[pa.Table, dict[str, Any]]]],
    *,
    run_id: str | None = None,
    config_hash: str | None = None,
) -> tuple[pa.Table, pa.Table, int]:
    """One tile's read results ``[(uri, (rows, summary)), ...]`` -> (core sources, sub-tile rows, n dropped).

    The rows the assembly commits: sources inside their sub-tile core with RUN_ID and TILE_BUCKET,
    conformed to the table schema and sorted (DEC, RA); one sub-tile row per result. Raises
    AssemblyError when an OBJECT_ID occurs in more than one core.
    """
    source_parts: list[pa.Table] = []
    summaries: list[dict[str, Any]] = []
    n_dropped = 0
    for uri, (rows, summary) in results:
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
    if not summaries:
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
    return sources, subtiles, n_dropped


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
    (res,) = assemble_tiles(
        catalog,
        {int(tile_id): list(result_uris)},
        run_id,
        config_hash,
        code_version,
        namespace=namespace,
        storage_options=storage_options,
        require_complete=require_complete,
        max_attempts=max_attempts,
        backoff_s=backoff_s,
    )
    return res


def _tile_summary_properties(tile_ids: list[int]) -> dict[str, str]:
    # Every retained snapshot's summary is repeated in each metadata.json: a batch of 1,000 tiles
    # records its range and count, not 1,000 ids (the rows carry RUN_ID and TILE_ID anyway).
    props = {PROP_TILE_COUNT: str(len(tile_ids))}
    if len(tile_ids) <= MAX_TILE_IDS_IN_SUMMARY:
        props[PROP_TILE_ID] = ",".join(str(t) for t in tile_ids)
    else:
        props[PROP_TILE_ID_MIN] = str(tile_ids[0])
        props[PROP_TILE_ID_MAX] = str(tile_ids[-1])
    return props


def assemble_tiles(
    catalog: Catalog,
    tile_results: Mapping[int, Iterable[str]],
    run_id: str,
    config_hash: str,
    code_version: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    storage_options: dict | None = None,
    require_complete: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> list[AssembleResult]:
    """Replace the rows of every tile in ``tile_results`` ({tile_id: result URIs}) with one commit per table.

    Same semantics as ``assemble_tile`` for each tile (core filter, duplicate check, idempotent
    replacement, sources before sub-tiles), but the whole batch shares one ``shear.sources`` and one
    ``shear.subtiles`` transaction, so the per-commit cost is paid once per batch. All inputs are
    read and checked before anything is committed: a bad file fails the batch with nothing written.
    Returns one AssembleResult per tile (in tile order); ``elapsed_s`` is the batch's wall time.
    """
    start = time.perf_counter()
    groups = {int(t): list(u) for t, u in sorted(tile_results.items(), key=lambda kv: int(kv[0]))}
    if not groups:
        raise AssemblyError("no tiles given to assemble")
    loaded = {
        t: load_tile_results(t, uris, storage_options, run_id=str(run_id), config_hash=str(config_hash))
        for t, uris in groups.items()
    }
    if require_complete:
        incomplete = {t: v[3] for t, v in loaded.items() if v[3]}
        if incomplete:
            t, missing = next(iter(incomplete.items()))
            raise AssemblyError(
                f"tile {t} is missing sub-tile result(s) {missing}"
                + (f" ({len(incomplete) - 1} more tile(s) incomplete)" if len(incomplete) > 1 else "")
                + "; run the shear stage for them first"
            )
    ensure_tables(catalog, namespace)
    assembly_id = uuid.uuid4().hex
    tile_ids = list(loaded)
    base_props = {
        PROP_RUN_ID: str(run_id),
        PROP_CONFIG_HASH: str(config_hash),
        PROP_CODE_VERSION: str(code_version),
        PROP_ASSEMBLY_ID: assembly_id,
        **_tile_summary_properties(tile_ids),
    }
    sources = {t: v[0] for t, v in loaded.items()}
    subtiles = {t: v[1] for t, v in loaded.items()}
    src_snapshot, src_attempts = overwrite_tiles(
        catalog,
        table_identifier(namespace, SOURCES_TABLE),
        sources,
        {**base_props, PROP_ROWS: str(sum(x.num_rows for x in sources.values()))},
        max_attempts=max_attempts,
        backoff_s=backoff_s,
    )
    sub_snapshot, sub_attempts = overwrite_tiles(
        catalog,
        table_identifier(namespace, SUBTILES_TABLE),
        subtiles,
        {**base_props, PROP_ROWS: str(sum(x.num_rows for x in subtiles.values()))},
        max_attempts=max_attempts,
        backoff_s=backoff_s,
    )
    elapsed = time.perf_counter() - start
    return [
        AssembleResult(
            tile_id=t,
            run_id=str(run_id),
            assembly_id=assembly_id,
            n_sources=sources[t].num_rows,
            n_margin_dropped=loaded[t][2],
            n_subtiles=subtiles[t].num_rows,
            sources_snapshot_id=src_snapshot,
            subtiles_snapshot_id=sub_snapshot,
            commit_attempts=src_attempts + sub_attempts,
            elapsed_s=elapsed,
            missing_subtiles=loaded[t][3],
            batch_size=len(tile_ids),
        )
        for t in tile_ids
    ]


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
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[AssembleResult]:
    """Assemble every tile found in ``result_uris`` (files or folders) into the catalog of ``cfg``.

    Tiles are committed ``batch_size`` at a time (each batch: sources then subtiles, one commit per
    table); the callbacks report the number of tiles found and each finished tile (progress bars).
    ``run_id`` defaults to ``assemble-{UTC timestamp}``; config_hash and code version come from ``cfg``
    and the package.
    """
    from constellation_assets.catalog.tables import namespace_from_config, open_catalog

    if int(batch_size) < 1:
        raise AssemblyError(f"batch_size must be >= 1 tile per commit, got {batch_size}")
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
    results: list[AssembleResult] = []
    tiles = list(groups)
    for i in range(0, len(tiles), int(batch_size)):
        batch = {t: groups[t] for t in tiles[i : i + int(batch_size)]}
        first_uri = next(iter(batch.values()))[0]
        done = assemble_tiles(
            catalog,
            batch,
            run_id=run_id,
            config_hash=chash,
            code_version=code_version(),
            namespace=namespace,
            storage_options=_storage_options_for(cfg, first_uri),
            require_complete=require_complete,
        )
        results += done
        if on_tile_done is not None:
            for res in done:
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
