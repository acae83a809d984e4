"""Results and Iceberg warehouse on S3 (moto server on loopback); credentials never persisted."""

from __future__ import annotations

import sqlite3

import pytest

from constellation_assets.catalog.assemble import assemble_tile, expand_result_uris
from constellation_assets.catalog.query import scan_sources, scan_subtiles
from constellation_assets.catalog.tables import open_catalog_from
from constellation_assets.quality import run_catalog_checks
from constellation_assets_tests.catalog_testdata import core_count, make_tile_results

TILE = 102044185
SECRET = "h5-unique-secret-Zq81xv"


@pytest.mark.timeout(120)
def test_s3_warehouse_round_trip(moto_s3, tmp_path, monkeypatch):
    # moto accepts any credentials; a unique secret lets us search every output for it.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    bucket = moto_s3["bucket"]
    opts = moto_s3["storage_options"]
    results_prefix = f"s3://{bucket}/results"
    make_tile_results(results_prefix, TILE, n_sources=300, storage_options=opts)
    uris = expand_result_uris([results_prefix], storage_options=opts)
    assert len(uris) == 16 and all(u.startswith("s3://") for u in uris)

    db = tmp_path / "catalog.db"
    catalog = open_catalog_from(
        f"sqlite:///{db}",
        f"s3://{bucket}/warehouse",
        "s3test",
        s3_endpoint_url=moto_s3["endpoint_url"],
        s3_region="us-east-1",
    )
    r1 = assemble_tile(catalog, TILE, uris, "run-1", "hash", "test", storage_options=opts)
    r2 = assemble_tile(catalog, TILE, uris, "run-2", "hash", "test", storage_options=opts)
    assert r1.n_sources == r2.n_sources == core_count(TILE, 300)
    assert scan_sources(catalog, [TILE]).num_rows == r1.n_sources
    assert scan_subtiles(catalog).num_rows == 16
    failed = {o.name: o.message for o in run_catalog_checks(catalog, expected=16) if not o.passed}
    assert not failed, failed

    # maintenance on S3: the first run's data files are dead after expiry and get deleted
    from datetime import timedelta

    from constellation_assets.catalog.maintenance import maintain_catalog

    client = moto_s3["client"]

    def data_keys():
        listing = client.list_objects_v2(Bucket=bucket, Prefix="warehouse/shear/sources/data/")
        return [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".parquet")]

    assert len(data_keys()) == 2
    report = maintain_catalog(catalog, keep_last=1, min_age=timedelta(0), orphan_age=timedelta(0))
    assert sum(e.snapshots_expired for e in report.expiry) == 2
    assert len(data_keys()) == 1
    assert scan_sources(catalog, [TILE]).num_rows == r1.n_sources

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="warehouse/")["Contents"]]
    assert any(k.startswith("warehouse/shear/sources/data/TILE_BUCKET=") for k in keys)
    assert any(k.endswith(".metadata.json") for k in keys)
    # the secret appears in no object written and not in the catalog database
    for key in keys:
        assert SECRET.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), key
    with sqlite3.connect(db) as con:
        dump = "\n".join(con.iterdump())
    assert SECRET not in dump
    assert "s3.secret-access-key" not in catalog.load_table(("shear", "sources")).metadata.properties


@pytest.mark.timeout(120)
def test_glue_catalog_on_moto(moto_s3, tmp_path):
    """The same assembly code on another PyIceberg catalog type (AWS Glue, served by moto)."""
    ep = moto_s3["endpoint_url"]
    uris = make_tile_results(str(tmp_path / "results"), TILE, n_sources=300)
    catalog = open_catalog_from(
        "glue",
        f"s3://{moto_s3['bucket']}/warehouse",
        "gluetest",
        properties={"glue.endpoint": ep, "glue.region": "us-east-1"},
        s3_endpoint_url=ep,
        s3_region="us-east-1",
    )
    assert type(catalog).__name__ == "GlueCatalog"
    for run in ("run-1", "run-2"):
        assemble_tile(catalog, TILE, uris, run, "hash", "test")
    assert scan_sources(catalog, [TILE]).num_rows == core_count(TILE, 300)
    assert scan_subtiles(catalog, [TILE]).num_rows == 16
