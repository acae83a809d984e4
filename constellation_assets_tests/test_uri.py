import pytest

from constellation_assets.io.uri import (
    DataAccessError,
    atomic_output,
    atomic_write_bytes,
    join_uri,
    list_uri,
    read_bytes,
    uri_exists,
)


def test_join():
    assert join_uri("s3://b/p/", "a", "/c.txt") == "s3://b/p/a/c.txt"
    assert join_uri("/x/y", "z").endswith("/x/y/z")


def test_local_roundtrip_and_listing(tmp_path):
    atomic_write_bytes(tmp_path / "d" / "f.bin", b"abc")
    assert read_bytes(tmp_path / "d" / "f.bin") == b"abc"
    assert list_uri(tmp_path / "d") == [str(tmp_path / "d" / "f.bin")]
    assert list_uri(tmp_path / "missing") == []


def test_error_on_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_names_uri(tmp_path):
    with pytest.raises(DataAccessError) as exc:
        read_bytes(tmp_path / "nope.fits")
    assert "nope.fits" in str(exc.value) and "What to do" in str(exc.value)


def test_s3_roundtrip(moto_s3):
    so = moto_s3["storage_options"]
    uri = f"s3://{moto_s3['bucket']}/a/b.bin"
    atomic_write_bytes(uri, b"xyz", so)
    assert uri_exists(uri, so)
    assert read_bytes(uri, so) == b"xyz"
    assert list_uri(f"s3://{moto_s3['bucket']}/a", so) == [uri]


def test_s3_unreachable_is_clear():
    so = {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    with pytest.raises(DataAccessError) as exc:
        read_bytes("s3://bucket/key", so)
    assert "s3://bucket/key" in str(exc.value)
