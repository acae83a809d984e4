"""Catalog maintenance: bounded snapshot history, compaction of small data files, removal of dead files.

Why: every assembly commit adds snapshots and one data file per tile per table. At Wide Survey scale
(60,000 tiles) the snapshot list, which every metadata.json repeats and every commit rewrites, would
reach ~10^5 entries (tens of MB per commit), and 120,000 small data files would make every scan plan
read 120,000 manifest entries. ``maintain_catalog`` keeps both bounded; Dagster runs it on a schedule
(``defs/maintenance.py``) and ``constellation catalog maintain`` runs it by hand.

- ``compact_data_files``: per TILE_BUCKET partition, small data files (< ``small_file_bytes``) that
  were added more than ``min_file_age`` ago are rewritten into few files sorted by (TILE_ID, DEC, RA).
  Files added recently belong to tiles that may be being (re-)assembled right now and are left alone.
  The commit replaces exactly the files it read and carries the predicate ``TILE_ID IN (tiles
  rewritten)``: under serializable isolation a concurrent assembly of one of those tiles (which adds
  rows of the tile or removes one of the files) makes the compaction commit fail validation, the
  compaction of that group is dropped and the assembly's commit stands ("the assembly wins"). A
  compaction that committed first makes a concurrent assembly re-plan (its files are gone) against the
  compacted file, which ``assemble.plan_tile_replacement`` handles.
- ``expire_snapshots``: drops snapshots except the newest ``keep_last`` and any younger than
  ``min_age`` (branch and tag heads never). A commit whose starting snapshot is expired underneath it
  fails validation and re-plans, so expiry is safe while assemblies run; ``min_age`` only spares them
  that retry and keeps recent snapshots readable for time travel. With ``delete_files`` the manifest
  lists, manifests and data files that no retained snapshot references any more are deleted
  (compaction's replaced small files, overwritten tiles' old files). The assembly itself also expires
  (without deleting files) once a table holds twice ``history.expire.min-snapshots-to-keep``.
- ``rewrite_manifests``: assembly commits fast-append one small manifest each; this re-groups the
  live entries into one manifest per range of 16 TILE_BUCKET values, so a one-tile plan opens ~1/16.
- ``remove_orphan_files``: deletes files under the table locations that no retained snapshot or
  metadata file references and that are older than ``older_than`` (files of snapshots expired by the
  assembly, files of writers that died before committing).

Old metadata.json files are pruned at commit time by the table properties
``write.metadata.delete-after-commit.enabled`` / ``write.metadata.previous-versions-max``.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.manifest import ManifestContent
from pyiceberg.table import FileScanTask, Table

from constellation_assets.catalog.tables import (
    DEFAULT_NAMESPACE,
    SOURCES_TABLE,
    SUBTILES_TABLE,
    table_identifier,
)

# Snapshots kept per table (every metadata.json lists them all and each commit copies that metadata
# several times: its cost is proportional to this number). Overridden per table by the property.
KEEP_PROPERTY = "history.expire.min-snapshots-to-keep"
DEFAULT_KEEP_LAST = 20
DEFAULT_MIN_AGE = timedelta(minutes=5)
DEFAULT_SMALL_FILE_BYTES = 32 * 1024 * 1024
DEFAULT_MIN_INPUT_FILES = 8
DEFAULT_MAX_COMMIT_BYTES = 512 * 1024 * 1024
PROP_MAINTENANCE = "constellation.maintenance"


@dataclass
class CompactionReport:
    table: str
    files_before: int = 0
    files_rewritten: int = 0
    files_written: int = 0
    partitions_compacted: int = 0
    groups_skipped_conflict: int = 0
    rows_rewritten: int = 0
    elapsed_s: float = 0.0


@dataclass
class ExpiryReport:
    table: str
    snapshots_before: int = 0
    snapshots_expired: int = 0
    data_files_deleted: int = 0
    manifests_deleted: int = 0
    manifest_lists_deleted: int = 0
    elapsed_s: float = 0.0


@dataclass
class MaintenanceReport:
    compaction: list[CompactionReport] = field(default_factory=list)
    expiry: list[ExpiryReport] = field(default_factory=list)
    orphans_deleted: dict[str, int] = field(default_factory=dict)
    manifests: dict[str, tuple[int, int]] = field(default_factory=dict)  # {table: (before, after)}
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Manifest files are immutable (a new name per write), so their entries can be cached by path: one
# maintenance run reads the same manifests for compaction, manifest re-grouping, expiry and orphans.
_ENTRY_CACHE: OrderedDict[str, list] = OrderedDict()
_ENTRY_CACHE_MAX = 4096


def _entries(io: Any, manifest: Any, discard_deleted: bool = True) -> list:
    from pyiceberg.manifest import ManifestEntryStatus

    key = manifest.manifest_path
    entries = _ENTRY_CACHE.get(key)
    if entries is None:
        entries = manifest.fetch_manifest_entry(io, discard_deleted=False)
        _ENTRY_CACHE[key] = entries
        if len(_ENTRY_CACHE) > _ENTRY_CACHE_MAX:
            _ENTRY_CACHE.popitem(last=False)
    else:
        _ENTRY_CACHE.move_to_end(key)
    if discard_deleted:
        return [e for e in entries if e.status != ManifestEntryStatus.DELETED]
    return entries


def _backoff(attempt: int) -> None:
    time.sleep(min(2.0, 0.05 * 2**attempt))


def _tables(namespace: str) -> list[tuple[str, str]]:
    return [table_identifier(namespace, name) for name in (SOURCES_TABLE, SUBTILES_TABLE)]


# --------------------------------------------------------------------------------------------------
# Snapshot expiry and dead-file cleanup
# --------------------------------------------------------------------------------------------------
def _expiry_candidates(table: Table, keep_last: int, min_age: timedelta) -> list[int]:
    cutoff_ms = int((datetime.now(UTC) - min_age).timestamp() * 1000)
    snapshots = sorted(table.metadata.snapshots, key=lambda s: (s.timestamp_ms, s.sequence_number or 0))
    protected = {ref.snapshot_id for ref in table.metadata.refs.values()}
    return [
        s.snapshot_id
        for s in snapshots[: max(0, len(snapshots) - keep_last)]
        if s.timestamp_ms < cutoff_ms and s.snapshot_id not in protected
    ]


def _dead_files(table: Table, expired_ids: set[int]) -> tuple[set[str], set[str], set[str]]:
    """(data files, manifests, manifest lists) referenced by the expired snapshots and by no other."""
    io = table.io
    retained = [s for s in table.metadata.snapshots if s.snapshot_id not in expired_ids]
    expired = [s for s in table.metadata.snapshots if s.snapshot_id in expired_ids]
    live_manifests = {m.manifest_path: m for s in retained for m in s.manifests(io)}
    dead_manifests = {
        m.manifest_path: m for s in expired for m in s.manifests(io) if m.manifest_path not in live_manifests
    }
    live_data: set[str] = set()
    for m in live_manifests.values():
        for entry in _entries(io, m, discard_deleted=True):
            live_data.add(entry.data_file.file_path)
    dead_data: set[str] = set()
    for m in dead_manifests.values():
        for entry in _entries(io, m, discard_deleted=False):
            if entry.data_file.file_path not in live_data:
                dead_data.add(entry.data_file.file_path)
    live_lists = {s.manifest_list for s in retained}
    dead_lists = {s.manifest_list for s in expired if s.manifest_list not in live_lists}
    return dead_data, set(dead_manifests), dead_lists


def _delete_all(table: Table, paths: Iterable[str]) -> int:
    n = 0
    for path in paths:
        try:
            table.io.delete(path)
            n += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            if "no such file" in str(exc).lower() or "not found" in str(exc).lower():
                continue
            raise
    return n


def snapshots_to_keep(table: Table) -> int:
    """``history.expire.min-snapshots-to-keep`` of the table (DEFAULT_KEEP_LAST when unset)."""
    try:
        return int(table.metadata.properties.get(KEEP_PROPERTY, DEFAULT_KEEP_LAST))
    except ValueError:
        return DEFAULT_KEEP_LAST


def expire_table_snapshots(
    catalog: Catalog,
    identifier: tuple[str, str],
    keep_last: int = DEFAULT_KEEP_LAST,
    min_age: timedelta = DEFAULT_MIN_AGE,
    max_attempts: int = 10,
    *,
    delete_files: bool = False,
) -> ExpiryReport:
    """Expire one table's snapshots except the newest ``keep_last`` and those younger than ``min_age``."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    name = ".".join(identifier)
    start = time.perf_counter()
    report = ExpiryReport(table=name)
    for attempt in range(max_attempts):
        table = catalog.load_table(identifier)
        report.snapshots_before = len(table.metadata.snapshots)
        candidates = _expiry_candidates(table, keep_last, min_age)
        if not candidates:
            break
        dead = _dead_files(table, set(candidates)) if delete_files else (set(), set(), set())
        try:
            table.maintenance.expire_snapshots().by_ids(candidates).commit()
        except CommitFailedException:
            if attempt == max_attempts - 1:
                raise CommitFailedException(
                    f"could not expire snapshots of {name} after {max_attempts} attempts "
                    "(assemblies committing continuously?); retry later"
                ) from None
            _backoff(attempt)
            continue
        report.snapshots_expired = len(candidates)
        if delete_files:
            # Only after the expiry committed: until then the files were still reachable.
            report.data_files_deleted = _delete_all(table, dead[0])
            report.manifests_deleted = _delete_all(table, dead[1])
            report.manifest_lists_deleted = _delete_all(table, dead[2])
        break
    report.elapsed_s = time.perf_counter() - start
    return report


def expire_snapshots(
    catalog: Catalog,
    namespace: str = DEFAULT_NAMESPACE,
    keep_last: int = DEFAULT_KEEP_LAST,
    min_age: timedelta = DEFAULT_MIN_AGE,
    max_attempts: int = 10,
    *,
    delete_files: bool = False,
    reports: list[ExpiryReport] | None = None,
) -> dict[str, int]:
    """Expire snapshots of both shear tables except the newest ``keep_last`` and any younger than
    ``min_age`` (branch heads are never expired). Returns {table: number expired}.

    ``delete_files``: also delete the manifest lists, manifests and data files only the expired
    snapshots referenced. ``reports`` (a list) receives one ExpiryReport per table.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    out: dict[str, int] = {}
    for identifier in _tables(namespace):
        if not catalog.table_exists(identifier):
            out[".".join(identifier)] = 0
            continue
        report = expire_table_snapshots(
            catalog, identifier, keep_last, min_age, max_attempts, delete_files=delete_files
        )
        out[report.table] = report.snapshots_expired
        if reports is not None:
            reports.append(report)
    return out


def _referenced_files(table: Table) -> set[str]:
    """Paths (without scheme) of every file a retained snapshot or the metadata log needs."""
    from pyiceberg.io.pyarrow import PyArrowFileIO

    io = table.io
    refs: set[str] = {table.metadata_location}
    refs |= {entry.metadata_file for entry in table.metadata.metadata_log}
    refs |= {s.path for s in getattr(table.metadata, "statistics", []) or []}
    manifests = {}
    for snap in table.metadata.snapshots:
        refs.add(snap.manifest_list)
        for m in snap.manifests(io):
            manifests[m.manifest_path] = m
    refs |= set(manifests)
    for m in manifests.values():
        for entry in _entries(io, m, discard_deleted=False):
            refs.add(entry.data_file.file_path)
    return {PyArrowFileIO.parse_location(p)[2] for p in refs}


def remove_orphan_files(
    catalog: Catalog,
    namespace: str = DEFAULT_NAMESPACE,
    older_than: timedelta = timedelta(minutes=30),
    *,
    dry_run: bool = False,
) -> dict[str, int]:
    """Delete files under each table's location that no snapshot or metadata file references.

    They come from expired snapshots (overwritten tiles, compacted small files, re-grouped manifests) and
    from writers that died before committing. Only files last modified more than ``older_than`` ago
    are removed: a writer still running has written files it has not committed yet. Returns
    {table: files deleted (or, with dry_run, that would be)}.
    """
    from pyarrow.fs import FileSelector, FileType
    from pyiceberg.io.pyarrow import PyArrowFileIO

    out: dict[str, int] = {}
    cutoff = datetime.now(UTC) - older_than
    for identifier in _tables(namespace):
        name = ".".join(identifier)
        if not catalog.table_exists(identifier):
            out[name] = 0
            continue
        table = catalog.load_table(identifier)
        referenced = _referenced_files(table)
        scheme, netloc, root = PyArrowFileIO.parse_location(table.location())
        io = table.io
        if not hasattr(io, "fs_by_scheme"):
            raise ValueError(
                f"{name}: orphan-file removal needs the PyArrow FileIO (py-io-impl "
                "pyiceberg.io.pyarrow.PyArrowFileIO); skip it or change the catalog's FileIO"
            )
        fs = io.fs_by_scheme(scheme, netloc)
        n = 0
        for sub in ("data", "metadata"):
            try:
                infos = fs.get_file_info(FileSelector(f"{root.rstrip('/')}/{sub}", recursive=True))
            except FileNotFoundError:
                continue
            for info in infos:
                if info.type != FileType.File or info.path in referenced:
                    continue
                mtime = info.mtime
                if mtime is None or mtime.replace(tzinfo=mtime.tzinfo or UTC) >= cutoff:
                    continue
                if not info.path.endswith((".parquet", ".avro", ".metadata.json")):
                    continue
                n += 1
                if not dry_run:
                    try:
                        fs.delete_file(info.path)
                    except FileNotFoundError:
                        n -= 1
        out[name] = n
    return out


# --------------------------------------------------------------------------------------------------
# Compaction
# --------------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    data_file: Any
    bucket: Any


def _compaction_groups(
    table: Table, small_file_bytes: int, min_file_age: timedelta, min_input_files: int
) -> tuple[list[list[_Candidate]], int]:
    """Small, old-enough data files grouped by partition (groups of >= min_input_files); total files."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return [], 0
    cutoff_ms = int((datetime.now(UTC) - min_file_age).timestamp() * 1000)
    by_partition: dict[Any, list[_Candidate]] = defaultdict(list)
    n_files = 0
    for manifest in snapshot.manifests(table.io):
        if manifest.content != ManifestContent.DATA:
            continue
        for entry in _entries(table.io, manifest, discard_deleted=True):
            n_files += 1
            data_file = entry.data_file
            if data_file.file_size_in_bytes >= small_file_bytes:
                continue
            added = (
                table.metadata.snapshot_by_id(entry.snapshot_id) if entry.snapshot_id is not None else None
            )
            if added is not None and added.timestamp_ms >= cutoff_ms:
                continue  # recently written: its tile may be being re-assembled now
            key = (data_file.spec_id, tuple(data_file.partition))
            by_partition[key].append(_Candidate(data_file, key))
    groups = []
    for _, files in sorted(by_partition.items(), key=lambda kv: str(kv[0])):
        group = _size_tiered(files, min_input_files)
        if group:
            groups.append(group)
    return groups, n_files


def _size_tiered(files: list[_Candidate], min_input_files: int) -> list[_Candidate]:
    """The files of one partition to merge now: the smallest ones, adding a larger file only while it is
    no bigger than what is already taken (so a compacted file is rewritten only when as much new data
    has accumulated: each row is rewritten O(log n) times, and a partition holds O(log n) files)."""
    taken: list[_Candidate] = []
    total = 0
    for cand in sorted(files, key=lambda c: c.data_file.file_size_in_bytes):
        size = cand.data_file.file_size_in_bytes
        if len(taken) >= min_input_files and size > total:
            break
        taken.append(cand)
        total += size
    return taken if len(taken) >= min_input_files else []


def _pack(groups: list[list[_Candidate]], max_commit_bytes: int) -> list[list[list[_Candidate]]]:
    commits: list[list[list[_Candidate]]] = []
    current: list[list[_Candidate]] = []
    size = 0
    for group in groups:
        g_size = sum(c.data_file.file_size_in_bytes for c in group)
        if current and size + g_size > max_commit_bytes:
            commits.append(current)
            current, size = [], 0
        current.append(group)
        size += g_size
    if current:
        commits.append(current)
    return commits


def _rewrite(table: Table, groups: list[list[_Candidate]]) -> tuple[int, int, int]:
    """Read the groups' files, write them back sorted and commit the replacement; (in, out, rows)."""
    from pyiceberg.io.pyarrow import ArrowScan, _dataframe_to_data_files

    from constellation_assets.catalog.assemble import tiles_filter

    schema = table.schema()
    files = [c.data_file for g in groups for c in g]
    parts = []
    for group in groups:
        rows = ArrowScan(table.metadata, table.io, schema, AlwaysTrue()).to_table(
            [FileScanTask(c.data_file) for c in group]
        )
        parts.append(rows.sort_by([("TILE_ID", "ascending"), ("DEC", "ascending"), ("RA", "ascending")]))
    rows = pa.concat_tables(parts) if parts else schema.as_arrow().empty_table()
    tiles = [int(t) for t in pc.unique(rows["TILE_ID"]).to_pylist()] if rows.num_rows else []
    tx = table.transaction()
    props = {PROP_MAINTENANCE: "compact", "constellation.files_rewritten": str(len(files))}
    n_out = 0
    meta = tx.table_metadata  # a deep copy per access: once
    with tx.update_snapshot(snapshot_properties=props).overwrite() as overwrite:
        if tiles:
            # Conflict detection: a concurrent assembly of any of these tiles fails this commit.
            overwrite.delete_by_predicate(tiles_filter(tiles))
        for data_file in files:
            overwrite.delete_data_file(data_file)
        for part in parts:
            if part.num_rows == 0:
                continue
            for new_file in _dataframe_to_data_files(meta, part, table.io, write_uuid=overwrite.commit_uuid):
                overwrite.append_data_file(new_file)
                n_out += 1
    tx.commit_transaction()
    return len(files), n_out, rows.num_rows


def compact_data_files(
    catalog: Catalog,
    namespace: str = DEFAULT_NAMESPACE,
    *,
    small_file_bytes: int = DEFAULT_SMALL_FILE_BYTES,
    min_input_files: int = DEFAULT_MIN_INPUT_FILES,
    min_file_age: timedelta = DEFAULT_MIN_AGE,
    max_commit_bytes: int = DEFAULT_MAX_COMMIT_BYTES,
    max_attempts: int = 3,
) -> list[CompactionReport]:
    """Rewrite small data files of both shear tables per partition (see the module docstring).

    Row contents are unchanged (same rows, same values); per partition the output files hold rows
    sorted by (TILE_ID, DEC, RA). A group whose commit fails validation (a concurrent assembly of one
    of its tiles) is re-planned from the new head up to ``max_attempts`` times, then left for the next
    run.
    """
    if min_input_files < 2:
        raise ValueError(f"min_input_files must be >= 2, got {min_input_files}")
    reports = []
    for identifier in _tables(namespace):
        start = time.perf_counter()
        report = CompactionReport(table=".".join(identifier))
        if not catalog.table_exists(identifier):
            reports.append(report)
            continue
        table = catalog.load_table(identifier)
        groups, report.files_before = _compaction_groups(
            table, small_file_bytes, min_file_age, min_input_files
        )
        for commit_groups in _pack(groups, max_commit_bytes):
            keys = {g[0].bucket for g in commit_groups}
            for attempt in range(max_attempts):
                try:
                    n_in, n_out, n_rows = _rewrite(table, commit_groups)
                except (CommitFailedException, ValidationException):
                    report.groups_skipped_conflict += 1 if attempt == max_attempts - 1 else 0
                    _backoff(attempt)
                    # Re-plan these partitions against the new head: files an assembly replaced are gone.
                    table = catalog.load_table(identifier)
                    fresh, _ = _compaction_groups(table, small_file_bytes, min_file_age, min_input_files)
                    commit_groups = [g for g in fresh if g[0].bucket in keys]
                    if not commit_groups:
                        break
                    continue
                report.files_rewritten += n_in
                report.files_written += n_out
                report.rows_rewritten += n_rows
                report.partitions_compacted += len(commit_groups)
                table = catalog.load_table(identifier)
                break
        report.elapsed_s = time.perf_counter() - start
        reports.append(report)
    return reports


# --------------------------------------------------------------------------------------------------
# Manifest rewrite
# --------------------------------------------------------------------------------------------------
_REWRITE_CLASS: type | None = None


def _rewrite_manifests_class() -> type:
    """Snapshot producer (operation "replace") that re-groups the live data-file entries of the parent
    snapshot into one manifest per range of ``buckets_per_manifest`` TILE_BUCKET values.

    Nothing is added or removed, so it needs no conflict validation: on a retry after a concurrent
    commit it re-reads the new parent and re-groups that, losing nothing.
    """
    global _REWRITE_CLASS
    if _REWRITE_CLASS is not None:
        return _REWRITE_CLASS
    from pyiceberg.manifest import ManifestEntry, ManifestEntryStatus
    from pyiceberg.table.snapshots import Operation, Summary
    from pyiceberg.table.update.snapshot import _SnapshotProducer

    class _RewriteManifests(_SnapshotProducer):
        buckets_per_manifest = 16

        def _validate_concurrency(self) -> None:
            return None

        def _deleted_entries(self) -> list:
            return []

        def _existing_manifests(self) -> list:
            meta = self._transaction.table_metadata
            parent = meta.snapshot_by_id(self._parent_snapshot_id) if self._parent_snapshot_id else None
            if parent is None:
                return []
            groups: dict[tuple[int, int], list] = defaultdict(list)
            other = []
            for manifest in parent.manifests(self._io):
                if manifest.content != ManifestContent.DATA:
                    other.append(manifest)
                    continue
                for entry in _entries(self._io, manifest, discard_deleted=True):
                    part = tuple(entry.data_file.partition)
                    key = int(part[0]) // self.buckets_per_manifest if part and part[0] is not None else -1
                    groups[(manifest.partition_spec_id, key)].append(entry)
            out = []
            for (spec_id, _), entries in sorted(groups.items()):
                with self.new_manifest_writer(self.spec(spec_id)) as writer:
                    for entry in entries:
                        writer.add_entry(
                            ManifestEntry.from_args(
                                status=ManifestEntryStatus.EXISTING,
                                snapshot_id=entry.snapshot_id,
                                sequence_number=entry.sequence_number,
                                file_sequence_number=entry.file_sequence_number,
                                data_file=entry.data_file,
                            )
                        )
                out.append(writer.to_manifest_file())
            return out + other

        def _summary(self, snapshot_properties=None) -> Summary:
            meta = self._transaction.table_metadata
            parent = meta.snapshot_by_id(self._parent_snapshot_id) if self._parent_snapshot_id else None
            totals = {}
            if parent is not None and parent.summary is not None:
                totals = {
                    k: v for k, v in parent.summary.additional_properties.items() if k.startswith("total-")
                }
            return Summary(operation=Operation.REPLACE, **totals, **dict(snapshot_properties or {}))

    _REWRITE_CLASS = _RewriteManifests
    return _REWRITE_CLASS


def rewrite_manifests(
    catalog: Catalog,
    namespace: str = DEFAULT_NAMESPACE,
    *,
    buckets_per_manifest: int = 16,
    min_manifests: int = 32,
    max_attempts: int = 5,
) -> dict[str, tuple[int, int]]:
    """Re-group each table's data manifests by TILE_BUCKET range when it has >= ``min_manifests``.

    Assembly commits fast-append one small manifest each (no manifest is read or rewritten at commit
    time); a scan for one tile skips every manifest whose TILE_BUCKET range excludes the tile, so
    after this rewrite a one-tile plan opens ~1/(256/buckets_per_manifest) of the entries. Returns
    {table: (manifests before, after)}.
    """
    from pyiceberg.table.snapshots import Operation

    out: dict[str, tuple[int, int]] = {}
    for identifier in _tables(namespace):
        name = ".".join(identifier)
        if not catalog.table_exists(identifier):
            continue
        for attempt in range(max_attempts):
            table = catalog.load_table(identifier)
            snap = table.current_snapshot()
            before = len(snap.manifests(table.io)) if snap else 0
            if before < min_manifests:
                out[name] = (before, before)
                break
            tx = table.transaction()
            producer = _rewrite_manifests_class()(
                operation=Operation.REPLACE,
                transaction=tx,
                io=table.io,
                snapshot_properties={PROP_MAINTENANCE: "rewrite_manifests"},
            )
            producer.buckets_per_manifest = int(buckets_per_manifest)
            try:
                with producer:  # leaving the block re-groups every manifest into the transaction
                    pass
                table = tx.commit_transaction()
            except CommitFailedException:
                _backoff(attempt)
                continue
            out[name] = (before, len(table.current_snapshot().manifests(table.io)))
            break
    return out


def maintain_catalog(
    catalog: Catalog,
    namespace: str = DEFAULT_NAMESPACE,
    *,
    keep_last: int = DEFAULT_KEEP_LAST,
    min_age: timedelta = DEFAULT_MIN_AGE,
    compact: bool = True,
    small_file_bytes: int = DEFAULT_SMALL_FILE_BYTES,
    min_input_files: int = DEFAULT_MIN_INPUT_FILES,
    delete_files: bool = True,
    orphan_age: timedelta = timedelta(minutes=30),
) -> MaintenanceReport:
    """Compaction (of files older than ``min_age``), manifest re-grouping by TILE_BUCKET range, snapshot
    expiry, then removal of unreferenced files (``delete_files``; files older than ``orphan_age``)."""
    start = time.perf_counter()
    report = MaintenanceReport()
    if compact:
        report.compaction = compact_data_files(
            catalog,
            namespace,
            small_file_bytes=small_file_bytes,
            min_input_files=min_input_files,
            min_file_age=min_age,
        )
    report.manifests = rewrite_manifests(catalog, namespace)
    expire_snapshots(
        catalog,
        namespace,
        keep_last=keep_last,
        min_age=min_age,
        delete_files=delete_files,
        reports=report.expiry,
    )
    if delete_files:
        report.orphans_deleted = remove_orphan_files(catalog, namespace, older_than=orphan_age)
    report.elapsed_s = time.perf_counter() - start
    return report
