"""Survey-scale partition benchmark: 60,000 MER tile partitions on a Dagster instance.

Times, on a temporary instance (SQLite, and PostgreSQL when reachable):
  register   register_tile_partitions(): batched add_dynamic_partitions
  list       instance.get_dynamic_partitions("mer_tile")
  plan       planning a backfill of the tile pipeline over every tile: the asset backfill data
             (PartitionBackfill.from_asset_partitions over all tile assets) stored with add_backfill
  batches    the BackfillPolicy multi-run batches (RunRequests for the batches of partitions)
  range      what each step of a batch run does first: the run's partition range -> its 25 tile keys
             (``context.partition_keys`` on the dynamic partitions)
  status     the tile sensor's plan: per-partition status of shear_catalog + RunRequests (200/tick)

    .venv/bin/python benchmarks/bench_partitions.py [--tiles 60000] [--postgres URL | --no-postgres]
"""

import argparse
import os
import tempfile
import time
import uuid

from constellation_assets.defs import defs
from constellation_assets.defs.jobs import TILE_ASSETS
from constellation_assets.defs.partitions import MER_TILE_PARTITIONS_NAME, chunked, register_tile_partitions
from constellation_assets.defs.sensors import plan_tile_runs
from constellation_assets.defs.tiles import TILE_BACKFILL_BATCH

DEFAULT_PG = os.environ.get("CONSTELLATION_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
LIMIT_S = 60.0


def tile_ids(n: int) -> list[str]:
    # Deterministic 9-digit ids in the Euclid style (ring-major numbering).
    return [str(100_000_000 + 1000 * (i // 500) + i % 500) for i in range(n)]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(instance, n: int) -> dict[str, float]:
    import dagster as dg
    from dagster._core.execution.backfill import PartitionBackfill

    keys = tile_ids(n)
    res: dict[str, float] = {}
    res["register"], new = _timed(lambda: register_tile_partitions(instance, keys))
    assert len(new) == n, f"registered {len(new)} of {n}"
    res["register_again (no-op)"], again = _timed(lambda: register_tile_partitions(instance, keys))
    assert again == []
    res["list"], listed = _timed(lambda: instance.get_dynamic_partitions(MER_TILE_PARTITIONS_NAME))
    assert len(listed) == n

    asset_graph = defs.get_repository_def().asset_graph

    def plan():
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=uuid.uuid4().hex[:8],
            asset_graph=asset_graph,
            partition_names=None,
            asset_selection=[dg.AssetKey(k) for k in TILE_ASSETS],
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=True,
            title="bench",
            description=None,
            run_config=None,
        )
        instance.add_backfill(backfill)
        return backfill

    res["plan backfill (all tiles)"], backfill = _timed(plan)
    n_targeted = backfill.asset_backfill_data.target_subset.num_partitions_and_non_partitioned_assets
    assert n_targeted == n * len(TILE_ASSETS), n_targeted

    def batches():
        # What the backfill daemon submits under BackfillPolicy.multi_run: one run per batch of partitions.
        return [
            dg.RunRequest(
                tags={
                    "dagster/asset_partition_range_start": b[0],
                    "dagster/asset_partition_range_end": b[-1],
                },
                asset_selection=[dg.AssetKey(k) for k in TILE_ASSETS],
            )
            for b in chunked(listed, TILE_BACKFILL_BATCH)
        ]

    res[f"backfill run batches ({TILE_BACKFILL_BATCH}/run)"], reqs = _timed(batches)
    assert len(reqs) == -(-n // TILE_BACKFILL_BATCH)

    def range_keys():
        from constellation_assets.defs.partitions import mer_tile_partitions

        last = reqs[-2].tags  # a full batch near the end of the key list
        rng = dg.PartitionKeyRange(
            last["dagster/asset_partition_range_start"], last["dagster/asset_partition_range_end"]
        )
        with dg.partition_loading_context(dynamic_partitions_store=instance):
            return mer_tile_partitions.get_partition_keys_in_range(rng)

    res[f"batch range -> {TILE_BACKFILL_BATCH} tile keys (per run step)"], keys_in_range = _timed(range_keys)
    assert len(keys_in_range) == TILE_BACKFILL_BATCH, len(keys_in_range)
    res["sensor plan (status of all + 200 requests)"], (runs, _) = _timed(
        lambda: plan_tile_runs(instance, {})
    )
    assert len(runs) == 200
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=60_000)
    ap.add_argument("--postgres", default=DEFAULT_PG)
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()

    import dagster as dg

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as home, dg.DagsterInstance.local_temp(tempdir=home) as inst:
        results["sqlite"] = run(inst, args.tiles)
    if not args.no_postgres:
        try:
            import sqlalchemy

            eng = sqlalchemy.create_engine(_sqlalchemy_url(args.postgres))
            with eng.connect() as c:
                c.exec_driver_sql("select 1")
            eng.dispose()
        except Exception as exc:
            print(f"PostgreSQL not reachable at {args.postgres} ({exc}); skipping it")
        else:
            results["postgres"] = _run_postgres(args.postgres, args.tiles)

    print(f"\n{args.tiles:,} mer_tile partitions; seconds (limit {LIMIT_S:.0f} s each)")
    names = list(next(iter(results.values())))
    print(f"{'step':48s}" + "".join(f"{k:>12s}" for k in results))
    for step in names:
        print(f"{step:48s}" + "".join(f"{results[k][step]:12.2f}" for k in results))
    worst = max(v for r in results.values() for v in r.values())
    print(f"\nslowest step: {worst:.2f} s -> {'OK' if worst < LIMIT_S else 'TOO SLOW'}")


def _sqlalchemy_url(url: str) -> str:
    return (
        url.replace("postgresql://", "postgresql+psycopg2://", 1) if "+" not in url.split("://")[0] else url
    )


def postgres_storage_config(url: str, schema: str) -> dict:
    """dagster-postgres storage config for ``url`` confined to ``schema`` (search_path)."""
    import sqlalchemy

    u = sqlalchemy.engine.make_url(_sqlalchemy_url(url))
    return {
        "postgres": {
            "postgres_db": {
                "username": u.username or "postgres",
                "hostname": u.host or "127.0.0.1",
                "port": u.port or 5432,
                "db_name": u.database or "postgres",
                "params": {"options": f"-csearch_path={schema}"},
                # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the image ships psycopg2.
                "scheme": "postgresql+psycopg2",
            }
        }
    }


def _run_postgres(url: str, n: int) -> dict[str, float]:
    """Fresh schema per run so the benchmark never touches other data in the database."""
    import dagster as dg
    import sqlalchemy

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    eng = sqlalchemy.create_engine(_sqlalchemy_url(url))
    with eng.begin() as c:
        c.exec_driver_sql(f"create schema {schema}")
    try:
        with tempfile.TemporaryDirectory() as home:
            overrides = {"storage": postgres_storage_config(url, schema)}
            with dg.instance_for_test(temp_dir=home, overrides=overrides) as inst:
                return run(inst, n)
    finally:
        with eng.begin() as c:
            c.exec_driver_sql(f"drop schema {schema} cascade")
        eng.dispose()


if __name__ == "__main__":
    main()
