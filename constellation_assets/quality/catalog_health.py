"""Health of the Iceberg shear catalog after maintenance: readable, complete and bounded.

Checks of ``catalog_maintenance`` (compaction, manifest re-grouping, snapshot expiry and dead-file deletion
rewrite metadata and delete files, so each run is verified against what a reader needs):

- ``files_present``: every data file the current snapshot of each table references exists on storage
  (expiry and orphan removal must never delete a live file);
- ``rows_match_summary``: the rows a full plan of the current snapshot holds equal the snapshot summary's
  ``total-records`` (compaction neither drops nor duplicates rows);
- ``history_bounded``: each table retains at most twice ``history.expire.min-snapshots-to-keep`` snapshots
  (the bound the assembly and the maintenance keep, so commit cost stays flat).
"""

from __future__ import annotations

from typing import Any

from constellation_assets.quality.checks import CheckOutcome

HEALTH_CHECK_NAMES = ("files_present", "rows_match_summary", "history_bounded")


def catalog_health_outcomes(catalog: Any, namespace: str) -> list[CheckOutcome]:
    """The three health checks over ``{namespace}.sources`` and ``{namespace}.subtiles``."""
    from pyiceberg.io import load_file_io

    from constellation_assets.catalog.maintenance import snapshots_to_keep
    from constellation_assets.catalog.tables import SOURCES_TABLE, SUBTILES_TABLE, table_identifier

    missing: dict[str, list[str]] = {}
    rows: dict[str, dict[str, int]] = {}
    history: dict[str, dict[str, int]] = {}
    absent: list[str] = []
    for name in (SOURCES_TABLE, SUBTILES_TABLE):
        ident = table_identifier(namespace, name)
        try:
            table = catalog.load_table(ident)
        except Exception as exc:  # noqa: BLE001 - reported as a failed check naming the table
            absent.append(f"{namespace}.{name}: {exc}")
            continue
        snap = table.current_snapshot()
        keep = snapshots_to_keep(table)
        history[name] = {"snapshots": len(table.metadata.snapshots), "bound": 2 * keep}
        if snap is None:
            rows[name] = {"planned": 0, "summary": 0}
            continue
        io = load_file_io(table.properties, table.metadata.location) if table.io is None else table.io
        planned, gone = 0, []
        for task in table.scan().plan_files():
            planned += int(task.file.record_count)
            path = str(task.file.file_path)
            if not io.new_input(path).exists():
                gone.append(path)
        missing[name] = gone
        summary = snap.summary
        total = (
            int(summary["total-records"]) if summary is not None and "total-records" in summary else planned
        )
        rows[name] = {"planned": planned, "summary": total}

    def _absent_outcome(name: str) -> CheckOutcome:
        return CheckOutcome(name, False, "error", f"table(s) not readable: {absent}", {})

    if absent:
        return [_absent_outcome(n) for n in HEALTH_CHECK_NAMES]
    n_missing = sum(len(v) for v in missing.values())
    bad_rows = {k: v for k, v in rows.items() if v["planned"] != v["summary"]}
    over = {k: v for k, v in history.items() if v["snapshots"] > v["bound"]}
    return [
        CheckOutcome(
            "files_present",
            n_missing == 0,
            "error",
            "every live data file exists"
            if n_missing == 0
            else f"{n_missing} live data file(s) missing, e.g. {next(p for v in missing.values() for p in v)}: "
            "restore them from the object store's versioning/backup or re-assemble the affected tiles",
            {"missing": {k: v[:5] for k, v in missing.items() if v}},
        ),
        CheckOutcome(
            "rows_match_summary",
            not bad_rows,
            "error",
            "planned rows equal the snapshot totals"
            if not bad_rows
            else f"rows differ from the snapshot summary: {bad_rows}",
            {"rows": rows},
        ),
        CheckOutcome(
            "history_bounded",
            not over,
            "warn",
            "snapshot history within its bound"
            if not over
            else f"too many retained snapshots (commit cost grows): {over}; run catalog maintenance",
            {"history": history},
        ),
    ]
