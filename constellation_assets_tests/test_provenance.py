import json
import multiprocessing as mp
import os

import pytest

from constellation_assets.config import load_config
from constellation_assets.provenance import (
    REDACTED,
    RunConflictError,
    check_idempotency,
    config_hash,
    effective_config_record,
    redact,
    write_run_config,
)


def test_hash_stable_ignores_compute_and_covers_locations():
    a = load_config({"output": {"root_uri": "/a"}, "compute": {"batch_size": 8}})
    b = load_config({"output": {"root_uri": "/a"}, "compute": {"batch_size": 4096}})
    assert config_hash(a) == config_hash(b)
    c = load_config({"output": {"root_uri": "/a"}, "injection": {"seed_base": 43}})
    assert config_hash(a) != config_hash(c)
    # Other data or another output root / catalog: a different whole-config hash (the runs write elsewhere).
    assert config_hash(a) != config_hash(load_config({"output": {"root_uri": "/b"}}))
    assert config_hash(a) != config_hash(
        load_config({"output": {"root_uri": "/a"}, "data": {"vis_base_uri": "/elsewhere/q1/VIS/"}})
    )
    # Relative paths are resolved: the same place spelled two ways has one hash.
    import os

    rel = load_config({"output": {"root_uri": "out"}})
    assert config_hash(rel) == config_hash(load_config({"output": {"root_uri": os.path.abspath("out")}}))


def test_record_fields():
    rec = effective_config_record(load_config({"variant": "v5"}), "phase4c")
    assert rec["variant"] == "v5" and rec["stage"] == "4c"
    assert rec["execution_timestamp_utc"].endswith("Z") and "T" in rec["execution_timestamp_utc"]
    for k in ("constellation", "python", "dagster", "torch", "galsim", "pyiceberg", "numpy", "pyarrow"):
        assert k in rec["versions"]
    assert len(rec["config_hash"]) == 16


def test_redaction():
    obj = {
        "aws_secret_access_key": "abc",
        "nested": {"password": "p", "uri": "postgresql://user:pw@host/db", "ok": "s3://bucket/key"},
        "signed": "https://x/y?X-Amz-Signature=deadbeef&a=1",
    }
    out = redact(obj)
    text = json.dumps(out)
    for secret in ("abc", "pw@", "deadbeef"):
        assert secret not in text
    assert out["nested"]["ok"] == "s3://bucket/key"
    assert REDACTED in out["nested"]["uri"]


def test_round_trip_reproduces_config(tmp_path):
    cfg = load_config({"variant": "v5", "injection": {"cosmos_salt": "gen5_v1", "split_seed": 7}})
    uri, rec = write_run_config(cfg, str(tmp_path), "phase4c", "v5", "exp1")
    assert uri.endswith("phase4c/v5/run_config_exp1.json")
    again = load_config(uri)
    assert again.model_dump() == cfg.model_dump()
    assert config_hash(again) == rec["config_hash"]


def test_idempotency(tmp_path):
    cfg = load_config({"variant": "v1"})
    uri, rec = write_run_config(cfg, str(tmp_path), "phase4c", "v1", "e")
    assert check_idempotency(uri, rec["config_hash"], force=False) == "skip"
    with pytest.raises(RunConflictError, match="--force"):
        check_idempotency(uri, "0" * 16, force=False)
    assert check_idempotency(uri, "0" * 16, force=True) == "run"
    assert check_idempotency(str(tmp_path / "none.json"), "x", force=False) == "run"


def _crash_mid_write(path):
    from constellation_assets.io import uri as uri_mod

    with uri_mod.atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write('{"partial": ')
            f.flush()
        os._exit(1)  # killed before the rename


def test_atomic_write_crash_leaves_nothing(tmp_path):
    target = tmp_path / "phase4c" / "v1" / "run_config_e.json"
    p = mp.get_context("fork").Process(target=_crash_mid_write, args=(str(target),))
    p.start()
    p.join()
    assert p.exitcode == 1
    assert not target.exists()


def test_run_config_on_s3(moto_s3):
    cfg = load_config({"variant": "v1"})
    out = f"s3://{moto_s3['bucket']}/phase4"
    uri, rec = write_run_config(cfg, out, "phase4c", "v1", "e", storage_options=moto_s3["storage_options"])
    body = moto_s3["client"].get_object(Bucket=moto_s3["bucket"], Key="phase4/phase4c/v1/run_config_e.json")
    assert json.loads(body["Body"].read())["config_hash"] == rec["config_hash"]
    back = load_config(uri, storage_options=moto_s3["storage_options"])
    assert config_hash(back) == rec["config_hash"]


def test_secrets_from_env_not_in_record(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SUPERSECRETVALUE123")
    cfg = load_config({"data": {"s3": {"endpoint_url": "http://127.0.0.1:9"}}})
    text = json.dumps(effective_config_record(cfg, "prepare"))
    assert "SUPERSECRETVALUE123" not in text
