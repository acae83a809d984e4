"""Partitions: one dynamic partition per MER tile, one dynamic partition per injection shard ("train/00003").

Tile partitions are dynamic because the tile list is data (a config list or the MER catalog prefix), and
the Wide Survey has ~60,000 of them. Registration always goes through :func:`register_tile_partitions`,
which adds keys in batches: SQLite caps the number of bound variables per statement, so a single add of
tens of thousands of keys fails there (PostgreSQL does not care, but batching costs nothing).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

import dagster as dg

# BackfillPolicy is marked beta in dagster 1.13; the warning would print on every CLI call that loads the code.
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)
# Partitioned asset checks (one result per tile partition) are a preview feature in dagster 1.13.
warnings.filterwarnings(
    "ignore", message=".*partitions_def on an AssetCheckSpec.*", category=dg.PreviewWarning
)

MER_TILE_PARTITIONS_NAME = "mer_tile"

#: Keys per add_dynamic_partitions call: safely below SQLite's bound-variable limit on every build.
PARTITION_BATCH_SIZE = 500

mer_tile_partitions = dg.DynamicPartitionsDefinition(name=MER_TILE_PARTITIONS_NAME)

#: A MER tile id is a 9-digit integer (euclid-q1.md); partition keys are its decimal string.
TILE_ID_PATTERN = re.compile(r"^\d{9}$")

INJECTION_SHARD_PARTITIONS_NAME = "injection_shard"

#: lens_injections shards, keyed "{split}/{shard:05d}" (e.g. "train/00003") exactly as
#: ``constellation_assets.sim.injection.partition_keys(cfg)`` plans them: how many shards a run has is
#: config (``injection.partitions`` x ``injection.tiers``), so the keys are registered from the config
#: rather than fixed when the code location loads.
injection_shard_partitions = dg.DynamicPartitionsDefinition(name=INJECTION_SHARD_PARTITIONS_NAME)


def register_injection_shards(instance: dg.DagsterInstance, keys: Sequence[str]) -> list[str]:
    """Register injection shard partitions (batched, idempotent); returns the new keys."""
    existing = set(instance.get_dynamic_partitions(INJECTION_SHARD_PARTITIONS_NAME))
    new = [k for k in dict.fromkeys(keys) if k not in existing]
    for batch in chunked(new):
        instance.add_dynamic_partitions(INJECTION_SHARD_PARTITIONS_NAME, list(batch))
    return new


def validate_tile_keys(keys: Iterable[str | int]) -> list[str]:
    """Normalise tile ids to partition keys, dropping duplicates and keeping first-seen order.

    Raises ValueError naming the first key that is not a 9-digit MER tile id.
    """
    out: list[str] = []
    seen: set[str] = set()
    for raw in keys:
        key = str(raw).strip()
        if not TILE_ID_PATTERN.match(key):
            raise ValueError(
                f"{raw!r} is not a MER tile id (expected 9 digits, e.g. 102044185); fix tile_ids in the config"
            )
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def chunked(keys: Sequence[str], size: int = PARTITION_BATCH_SIZE) -> Iterable[Sequence[str]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


def new_tile_keys(instance: dg.DagsterInstance, keys: Iterable[str | int]) -> list[str]:
    """The tile keys not yet registered on ``instance`` (validated, order kept)."""
    wanted = validate_tile_keys(keys)
    existing = set(instance.get_dynamic_partitions(MER_TILE_PARTITIONS_NAME))
    return [k for k in wanted if k not in existing]


def register_tile_partitions(
    instance: dg.DagsterInstance,
    keys: Iterable[str | int],
    batch_size: int = PARTITION_BATCH_SIZE,
) -> list[str]:
    """Register MER tile partitions on ``instance`` in batches; returns the keys that were new.

    Idempotent: keys already present are skipped, so re-running discovery is free.
    """
    new = new_tile_keys(instance, keys)
    for batch in chunked(new, batch_size):
        instance.add_dynamic_partitions(MER_TILE_PARTITIONS_NAME, list(batch))
    return new


def add_tile_partition_requests(
    keys: Sequence[str], batch_size: int = PARTITION_BATCH_SIZE
) -> list[dg.AddDynamicPartitionsRequest]:
    """The same batching for sensors, which hand partition additions to the daemon as requests."""
    return [
        dg.AddDynamicPartitionsRequest(partitions_def_name=MER_TILE_PARTITIONS_NAME, partition_keys=list(b))
        for b in chunked(list(keys), batch_size)
    ]
