"""S3 faults injected between the code and a moto server (loopback proxy, see faults.py).

Transient faults (503 SlowDown, 500, 429 throttling, dropped connections, bodies cut off mid-read, slow
responses) during listing, reads and writes are survived by the bounded retries of the URI layer; persistent
faults end, within bounded time, in a DataAccessError that names the URI and says what to do; a failed write
leaves no object at the final key. Covered entry points: io.uri (read/list/exists/open/atomic writes),
the MER catalog reader, injection shard writes and Iceberg warehouse writes on S3.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from constellation_assets.io.uri import (
    DataAccessError,
    atomic_output,
    atomic_write_bytes,
    list_uri,
    open_uri,
    read_bytes,
    uri_exists,
)
from constellation_assets_tests.faults import FaultProxy, s3_options

# A persistent fault must end in an error within this many seconds (production retry settings, shortened
# backoff: see _short_backoff; with the real backoff it takes ~7-15 s).
PERSISTENT_BOUND_S = 10.0


def _fast(px) -> dict:
    """The production storage options with 2 botocore attempts instead of 4: same code path, faster tests."""
    return s3_options(px.endpoint_url, retries={"max_attempts": 2, "mode": "standard"})


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch):
    """botocore's exponential backoff (up to 1+2+4 s per request) shortened to 20 ms: the retry layers and
    attempt counts are the production ones, only the sleeping is cut so the suite stays fast."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.02)


@pytest.fixture()
def proxy(moto_s3):
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # no listing cache carried between tests
    with FaultProxy(moto_s3["endpoint_url"]) as px:
        px.moto = moto_s3
        px.opts = s3_options(px.endpoint_url)
        px.bucket = moto_s3["bucket"]
        yield px
    fsspec.filesystem("s3").clear_instance_cache()


def _put(px, key: str, data: bytes) -> str:
    px.moto["client"].put_object(Bucket=px.bucket, Key=key, Body=data)
    return f"s3://{px.bucket}/{key}"


def _object_exists(px, key: str) -> bool:
    return "Contents" in px.moto["client"].list_objects_v2(Bucket=px.bucket, Prefix=key)


def _assert_clear(exc: BaseException, uri: str) -> None:
    msg = str(exc)
    assert uri in msg, msg
    assert "What to do" in msg, msg


TRANSIENT = [
    ("status", {"status": 503}),  # SlowDown
    ("status", {"status": 500}),  # InternalError
    ("status", {"status": 429}),  # throttling
    ("drop", {}),  # connection closed without a response
    ("truncate", {}),  # body cut off mid-transfer
    ("delay", {"delay_s": 1.5}),  # slow response
]


@pytest.mark.parametrize(("kind", "kw"), TRANSIENT, ids=[f"{k}-{v}" for k, v in TRANSIENT])
def test_transient_read_faults_are_retried(proxy, kind, kw):
    data = np.random.default_rng(1).bytes(20_000)
    uri = _put(proxy, "in/blob.bin", data)
    fault = proxy.add(kind, method="GET", path_regex=r"/in/blob\.bin", times=2, **kw)
    assert read_bytes(uri, proxy.opts) == data
    assert fault.fired == min(2, fault.seen)
    assert fault.fired >= 1


@pytest.mark.parametrize("kind", ["status", "drop"])
def test_transient_listing_faults_are_retried(proxy, kind):
    uris = [_put(proxy, f"cat/{t}/EUC_MER_FINAL-CAT_TILE{t}.fits", b"x") for t in (1, 2, 3)]
    fault = proxy.add(kind, method="GET", path_regex=r"list-type=2", times=2)
    assert list_uri(f"s3://{proxy.bucket}/cat", proxy.opts, recursive=True) == sorted(uris)
    assert fault.fired == 2
    proxy.add("status", method="HEAD", times=2)
    assert uri_exists(uris[0], proxy.opts)


@pytest.mark.parametrize("kind", ["status", "drop"])
def test_transient_write_faults_are_retried(proxy, kind):
    uri = f"s3://{proxy.bucket}/out/result.bin"
    fault = proxy.add(kind, method="PUT", times=2)
    atomic_write_bytes(uri, b"payload", proxy.opts)
    assert fault.fired == 2
    assert (
        proxy.moto["client"].get_object(Bucket=proxy.bucket, Key="out/result.bin")["Body"].read()
        == b"payload"
    )


def test_persistent_read_fault_is_a_clear_bounded_error(proxy):
    uri = _put(proxy, "in/blob.bin", b"abc")
    proxy.add("status", method="GET", status=503, times=None)
    t0 = time.perf_counter()
    with pytest.raises(DataAccessError) as ei:
        read_bytes(uri, proxy.opts)
    elapsed = time.perf_counter() - t0
    _assert_clear(ei.value, uri)
    assert "retries" in str(ei.value)
    assert elapsed < PERSISTENT_BOUND_S, elapsed
    n = proxy.count("GET", "status")
    assert 2 <= n <= 12, n  # retried, but a bounded number of times (no multiplying retry layers)


def test_persistent_listing_and_exists_faults_are_clear_errors(proxy):
    _put(proxy, "cat/1/a.fits", b"x")
    proxy.add("status", method="GET", status=500, times=None)
    with pytest.raises(DataAccessError) as ei:
        list_uri(f"s3://{proxy.bucket}/cat", _fast(proxy), recursive=True)
    _assert_clear(ei.value, f"s3://{proxy.bucket}/cat")
    proxy.clear()
    proxy.add("status", method="HEAD", status=503, times=None)
    with pytest.raises(DataAccessError) as ei:  # never silently "does not exist"
        uri_exists(f"s3://{proxy.bucket}/cat/1/a.fits", _fast(proxy))
    _assert_clear(ei.value, f"s3://{proxy.bucket}/cat/1/a.fits")


def test_persistent_dropped_connections_fail_clearly_and_leave_no_object(proxy):
    opts = _fast(proxy)
    uri = f"s3://{proxy.bucket}/out/part.parquet"
    proxy.add("drop", method="PUT", times=None)
    t0 = time.perf_counter()
    with pytest.raises(DataAccessError) as ei, atomic_output(uri, opts) as tmp:
        pq.write_table(pa.table({"x": [1, 2, 3]}), tmp)
    assert time.perf_counter() - t0 < PERSISTENT_BOUND_S
    _assert_clear(ei.value, uri)
    assert not _object_exists(proxy, "out/part.parquet")
    # reads with every connection dropped
    src = _put(proxy, "in/x.bin", b"abc")
    proxy.clear()
    proxy.add("drop", method="GET", times=None)
    with pytest.raises(DataAccessError) as ei:
        read_bytes(src, opts)
    _assert_clear(ei.value, src)


def test_persistent_write_fault_leaves_no_partial_object(proxy):
    uri = f"s3://{proxy.bucket}/out/final.bin"
    proxy.add("status", method="PUT", status=503, times=None)
    t0 = time.perf_counter()
    with pytest.raises(DataAccessError) as ei:
        atomic_write_bytes(uri, b"x" * 10_000, _fast(proxy))
    assert time.perf_counter() - t0 < PERSISTENT_BOUND_S
    _assert_clear(ei.value, uri)
    assert not _object_exists(proxy, "out/final.bin")


def test_open_uri_read_fault_mid_stream(proxy):
    data = bytes(range(256)) * 400
    uri = _put(proxy, "in/stream.bin", data)
    opts = _fast(proxy)
    proxy.add("status", method="GET", status=503, times=2)
    with open_uri(uri, "rb", opts) as f:
        assert f.read() == data
    proxy.clear()
    proxy.add("status", method="GET", status=503, times=None)
    with pytest.raises(DataAccessError) as ei, open_uri(uri, "rb", opts) as f:
        f.read()
    _assert_clear(ei.value, uri)


# -------------------------------------------------------------------------------------------- MER catalog


def _mer_catalog_bytes(n: int = 200) -> bytes:
    import io

    from astropy.io import fits
    from astropy.table import Table

    from constellation_assets.io.mer_catalog import MER_COLUMNS

    rng = np.random.default_rng(5)
    cols = {}
    for name, dt in MER_COLUMNS.items():
        if name == "OBJECT_ID":
            cols[name] = np.arange(n, dtype=np.int64) + 1_000_000
        elif np.dtype(dt).kind == "f":
            cols[name] = rng.uniform(1, 100, n)
        else:
            cols[name] = np.ones(n, dtype=dt) if name == "VIS_DET" else np.zeros(n, dtype=dt)
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(Table(cols))]).writeto(buf)
    return buf.getvalue()


def test_mer_catalog_read_survives_transient_faults_and_reports_persistent_ones(proxy):
    from constellation_assets.io.mer_catalog import MerCatalogError, read_mer_catalog

    uri = _put(
        proxy,
        "cat/102044185/EUC_MER_FINAL-CAT_TILE102044185-ABC_20241017T000000.0Z.fits",
        _mer_catalog_bytes(),
    )
    clean = read_mer_catalog(uri, proxy.opts)
    assert clean.num_rows == 200
    proxy.add("status", method="GET", status=503, times=2)
    proxy.add("truncate", method="GET", times=1)
    proxy.add("drop", method="HEAD", times=1)
    assert read_mer_catalog(uri, proxy.opts).equals(clean)
    proxy.clear()
    opts = _fast(proxy)
    proxy.add("status", method="GET", status=503, times=None)
    with pytest.raises(DataAccessError) as ei:  # a store failure, not "the file is corrupt"
        read_mer_catalog(uri, opts)
    assert not isinstance(ei.value, MerCatalogError)
    _assert_clear(ei.value, uri)


# -------------------------------------------------------------------------------------------- injection shards


def test_injection_shard_write_faults(proxy):
    import hashlib

    from constellation_assets.sim.injection import _write_shard

    table = pa.table({"task_id": ["a", "b"], "image_VIS": [b"\x00" * 64, b"\x01" * 64]})
    meta = {b"constellation.config_hash": b"abc"}
    uri = f"s3://{proxy.bucket}/inj/phase4c/v1/train/shard-00000.parquet"
    proxy.add("status", method="PUT", status=503, times=2)
    digest = _write_shard(uri, table, meta, proxy.opts)
    body = proxy.moto["client"].get_object(Bucket=proxy.bucket, Key=uri.split("/", 3)[3])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == digest
    assert pq.read_table(pa.BufferReader(body)).num_rows == 2
    proxy.clear()
    uri2 = uri.replace("00000", "00001")
    opts = _fast(proxy)
    proxy.add("status", method="PUT", status=503, times=None)
    with pytest.raises(DataAccessError) as ei:
        _write_shard(uri2, table, meta, opts)
    _assert_clear(ei.value, uri2)
    assert not _object_exists(proxy, "inj/phase4c/v1/train/shard-00001.parquet")


# -------------------------------------------------------------------------------------------- Iceberg on S3


@pytest.mark.timeout(120)
def test_iceberg_s3_warehouse_survives_transient_write_faults(proxy, tmp_path):
    from constellation_assets.catalog.assemble import assemble_tile
    from constellation_assets.catalog.query import scan_sources, scan_subtiles
    from constellation_assets.catalog.tables import open_catalog_from
    from constellation_assets_tests.catalog_testdata import core_count, make_tile_results

    tile = 102044185

    def results(run: str) -> list[str]:
        return make_tile_results(str(tmp_path / run), tile, n_sources=200, run_id=run)

    catalog = open_catalog_from(
        f"sqlite:///{tmp_path / 'catalog.db'}",
        f"s3://{proxy.bucket}/warehouse",
        "faults",
        s3_endpoint_url=proxy.endpoint_url,
        s3_region="us-east-1",
    )
    assemble_tile(catalog, tile, results("run-1"), "run-1", "h", "v")  # tables + first snapshot, no faults
    # data/manifest/metadata uploads and reads answered 503/500 on the way: the commit still lands, once
    proxy.add("status", method="PUT", status=503, times=2)
    proxy.add("status", method="GET", status=500, times=2)
    res = assemble_tile(catalog, tile, results("run-2"), "run-2", "h", "v")
    assert proxy.count(action="status") >= 3
    n_core = core_count(tile, 200)

    def state():
        src = scan_sources(catalog, [tile])
        sub = scan_subtiles(catalog, [tile])
        assert src.num_rows == n_core and sub.num_rows == 16
        return set(src["RUN_ID"].to_pylist()), set(sub["RUN_ID"].to_pylist())

    assert res.n_sources == n_core
    assert state() == ({"run-2"}, {"run-2"})
    # a persistent write fault fails the assembly and leaves the tables exactly as before
    proxy.clear()
    proxy.add("status", method="PUT", status=503, times=None)
    from constellation_assets.catalog.assemble import AssemblyError

    with pytest.raises(AssemblyError) as ei:
        assemble_tile(catalog, tile, results("run-3"), "run-3", "h", "v", max_attempts=2, backoff_s=0.01)
    msg = str(ei.value)
    assert "warehouse" in msg and "unchanged" in msg and f"tile {tile}" in msg and "re-run" in msg
    proxy.clear()
    assert state() == ({"run-2"}, {"run-2"})
    assemble_tile(
        catalog, tile, results("run-4"), "run-4", "h", "v"
    )  # and a re-run after the outage completes
    assert state() == ({"run-4"}, {"run-4"})


# -------------------------------------------------------------------------------------------- Q1 discovery


def test_q1_discovery_and_byte_range_reads_survive_faults(proxy, tmp_path):
    from constellation_assets.io.q1 import (
        discover_mer_catalog,
        discover_vis_exposures,
        fits_hdu_offsets,
        read_quadrant,
    )
    from constellation_assets_tests import test_stamps_synth as syn

    h = syn.wcs_header()
    q = syn.write_exposure(tmp_path / "vis", 1, 0, syn.render_quadrant(h, [], noise_sigma=1.0))
    for k in ("sci_path", "bkg_path", "psf_path"):
        name = q[k].rsplit("/", 1)[-1]
        with open(q[k], "rb") as f:
            _put(proxy, f"q1/VIS/1/{name}", f.read())
    mer = "EUC_MER_FINAL-CAT_TILE102044185-95D31A_20240924T033645.917365Z_00.00.fits"
    _put(proxy, f"q1/catalogs/MER_FINAL_CATALOG/102044185/{mer}", _mer_catalog_bytes(10))
    vis = f"s3://{proxy.bucket}/q1/VIS"

    clean = discover_vis_exposures(vis, storage_options=proxy.opts)
    assert len(clean) == 1 and clean[0].bkg_uri and clean[0].psf_uri
    offsets = fits_hdu_offsets(clean[0].det_uri, proxy.opts)
    sci = next(o for o in offsets if str(o.name).endswith(".SCI"))
    pixels = read_quadrant(clean[0].det_uri, sci.name, sci.header_offset, storage_options=proxy.opts)

    proxy.add("status", method="GET", path_regex="list-type=2", times=2)
    proxy.add("drop", method="GET", path_regex="list-type=2", skip=3, times=1)
    assert discover_vis_exposures(vis, storage_options=proxy.opts) == clean
    assert discover_mer_catalog(
        f"s3://{proxy.bucket}/q1/catalogs/MER_FINAL_CATALOG", 102044185, proxy.opts
    ).endswith(mer)
    proxy.clear()
    proxy.add("status", method="GET", path_regex=r"\.fits$", status=503, times=2)
    proxy.add("truncate", method="GET", path_regex=r"\.fits$", skip=2, times=1)
    again_offsets = fits_hdu_offsets(clean[0].det_uri, proxy.opts)
    assert [(o.name, o.header_offset, o.data_offset, o.data_size) for o in again_offsets] == [
        (o.name, o.header_offset, o.data_offset, o.data_size) for o in offsets
    ]
    again = read_quadrant(clean[0].det_uri, sci.name, sci.header_offset, storage_options=proxy.opts)
    assert np.array_equal(again.data, pixels.data)
    assert proxy.count(action="status", path_regex=r"\.fits$") == 2

    proxy.clear()
    proxy.add("status", method="GET", path_regex="list-type=2", status=503, times=None)
    with pytest.raises(DataAccessError) as ei:
        discover_vis_exposures(vis, storage_options=_fast(proxy))
    assert vis in str(ei.value) and "What to do" in str(ei.value)
