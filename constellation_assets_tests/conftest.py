"""Shared fixtures: a moto S3 server on 127.0.0.1 (loopback only), PostgreSQL settings, paths."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
COSMOS_DIR = SHARED_DIR / "data" / "cosmos"
POSTGRES_URL = os.environ.get(
    "CONSTELLATION_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def _moto_server():
    from moto.server import ThreadedMotoServer

    # Fake credentials for the local moto server only; never real ones.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def moto_s3(_moto_server, monkeypatch):
    """A moto S3 server on loopback. Yields a dict: endpoint_url, client (boto3), bucket (a fresh bucket)."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=_moto_server, region_name="us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)

    def make_bucket(name: str) -> str:
        client.create_bucket(Bucket=name)
        return name

    yield {
        "endpoint_url": _moto_server,
        "client": client,
        "bucket": bucket,
        "make_bucket": make_bucket,
        "storage_options": {"client_kwargs": {"endpoint_url": _moto_server, "region_name": "us-east-1"}},
    }


@pytest.fixture(scope="session")
def cosmos_dir() -> Path:
    if not COSMOS_DIR.exists():
        pytest.skip("shared COSMOS sample not present (../shared/data/cosmos)")
    return COSMOS_DIR


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return POSTGRES_URL
