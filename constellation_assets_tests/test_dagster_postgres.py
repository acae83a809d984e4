"""Dagster instance storage on PostgreSQL (dagster-postgres): partitions, a real job run, partition status.

Uses 127.0.0.1:5432 database ``test`` (trust auth) in a throwaway schema, so it never touches other data.
"""

import uuid

import dagster as dg
import pytest
import sqlalchemy

from constellation_assets.defs.partitions import MER_TILE_PARTITIONS_NAME, register_tile_partitions

pytestmark = pytest.mark.postgres


def _psycopg2_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg2://{rest}" if "+" not in scheme else url


@pytest.fixture()
def pg_instance(postgres_url, tmp_path):
    url = sqlalchemy.engine.make_url(_psycopg2_url(postgres_url))
    schema = f"dagster_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as c:
        c.exec_driver_sql(f"create schema {schema}")
    storage = {
        "postgres": {
            "postgres_db": {
                "username": url.username or "postgres",
                "hostname": url.host or "127.0.0.1",
                "port": url.port or 5432,
                "db_name": url.database,
                "params": {"options": f"-csearch_path={schema}"},
                "scheme": "postgresql+psycopg2",  # as deploy/dagster.yaml
            }
        }
    }
    try:
        with dg.instance_for_test(temp_dir=str(tmp_path), overrides={"storage": storage}) as inst:
            yield inst, engine, schema
    finally:
        with engine.begin() as c:
            c.exec_driver_sql(f"drop schema {schema} cascade")
        engine.dispose()


def test_partitions_and_job_on_postgres(pg_instance, tmp_path):
    from constellation_assets.defs import defs
    from constellation_assets.defs.resources import ConstellationConfigResource
    from constellation_assets.defs.sensors import plan_tile_runs

    inst, engine, schema = pg_instance
    assert "Postgres" in type(inst.run_storage).__name__
    tiles = [str(103_000_000 + i) for i in range(1_100)]
    assert register_tile_partitions(inst, tiles) == tiles
    with engine.connect() as c:  # the rows really are in PostgreSQL, in our schema
        n = c.exec_driver_sql(
            f"select count(*) from {schema}.dynamic_partitions where partitions_def_name = 'mer_tile'"
        ).scalar()
    assert n == 1_100

    # The real registration job, configured like configs/dagster_tile_pipeline.yaml, run on this instance.
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("tile_ids: [102044185, 102018211, 103000000]\n")
    job = defs.get_job_def("register_partitions_job")
    result = job.execute_in_process(
        instance=inst, resources={"pipeline_config": ConstellationConfigResource(config_path=str(cfg_file))}
    )
    assert result.success
    keys = set(inst.get_dynamic_partitions(MER_TILE_PARTITIONS_NAME))
    assert {"102044185", "102018211"} <= keys and len(keys) == 1_102
    run = inst.get_run_by_id(result.run_id)
    assert run.status == dg.DagsterRunStatus.SUCCESS

    reqs, _ = plan_tile_runs(inst, {}, max_runs=50)
    assert len(reqs) == 50 and all(r.partition_key in keys for r in reqs)
