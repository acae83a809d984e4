"""Catalog maintenance: bounded snapshot history.

Every tile assembly adds one or two snapshots per table; at 60,000 tiles the snapshot list (which
every metadata.json repeats) would grow to ~10^5 entries and make each commit slower. Expiring old
snapshots keeps it bounded. Run it periodically (e.g. after each backfill batch); it is safe while
assemblies run: a writer whose starting snapshot was expired fails validation and re-plans.
Data files only referenced by expired snapshots stay on storage until an orphan-file cleanup.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException

from constellation_assets.catalog.tables import (
    DEFAULT_NAMESPACE,
    SOURCES_TABLE,
    SUBTILES_TABLE,
    table_identifier,
)


def expire_snapshots(
    catalog: Catalog,
    namespace: str = DEFAULT_NAMESPACE,
    keep_last: int = 100,
    min_age: timedelta = timedelta(hours=1),
    max_attempts: int = 10,
) -> dict[str, int]:
    """Expire snapshots of both shear tables except the newest ``keep_last`` and any younger than
    ``min_age`` (branch heads are never expired). Returns {table: number expired}."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    out: dict[str, int] = {}
    for name in (SOURCES_TABLE, SUBTILES_TABLE):
        identifier = table_identifier(namespace, name)
        for attempt in range(max_attempts):
            table = catalog.load_table(identifier)
            cutoff_ms = int((datetime.now(UTC) - min_age).timestamp() * 1000)
            snapshots = sorted(
                table.metadata.snapshots, key=lambda s: (s.timestamp_ms, s.sequence_number or 0)
            )
            protected = {ref.snapshot_id for ref in table.metadata.refs.values()}
            candidates = [
                s.snapshot_id
                for s in snapshots[: max(0, len(snapshots) - keep_last)]
                if s.timestamp_ms < cutoff_ms and s.snapshot_id not in protected
            ]
            if not candidates:
                out[f"{namespace}.{name}"] = 0
                break
            try:
                table.maintenance.expire_snapshots().by_ids(candidates).commit()
            except CommitFailedException:
                time.sleep(min(2.0, 0.05 * 2**attempt))
                continue
            out[f"{namespace}.{name}"] = len(candidates)
            break
        else:
            raise CommitFailedException(
                f"could not expire snapshots of {namespace}.{name} after {max_attempts} attempts "
                "(assemblies committing continuously?); retry later"
            )
    return out
