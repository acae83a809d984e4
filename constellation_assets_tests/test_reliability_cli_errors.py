"""Every user-facing failure of the injection commands is one message without a traceback, with exit codes
1 (error), 2 (usage) and 130 (interrupt); ``--debug`` shows the traceback."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from constellation_assets.cli import main
from constellation_assets.sim import injection as inj
from constellation_assets_tests.test_injection_field import make_tiny_field

FAST = {"stamp_size_pix": 32, "register_catalog": False, "n_total_train_per_split": 4, "partitions": 2}


@pytest.fixture(scope="module")
def field_data(tmp_path_factory) -> dict:
    return make_tiny_field(tmp_path_factory.mktemp("field"))


def _conf(tmp_path: Path, data: dict, s3: dict | None = None, **injection) -> str:
    body = {
        "tile_ids": [102044185],
        "data": {"vis_base_uri": data["vis_base_uri"], "catalog_base_uri": data["catalog_base_uri"]},
        "output": {"root_uri": str(tmp_path / "root")},
        "injection": {**FAST, "oversampling": 2, "output_uri": str(tmp_path / "out"), **injection},
    }
    if s3:
        body["data"]["s3"] = s3
    body["injection"] = {k: v for k, v in body["injection"].items() if v is not None}
    p = tmp_path / "conf.json"
    p.write_text(json.dumps(body))
    return str(p)


def _one_message(res) -> str:
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def test_interrupt_exits_130(tmp_path, field_data, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(inj.run, "plan_tasks", interrupted)
    res = CliRunner().invoke(main, ["inject", "--config", _conf(tmp_path, field_data)])
    assert res.exit_code == 130 and "Interrupted" in res.output and "Aborted!" not in res.output
    rec = json.loads((tmp_path / "out/phase4c/v1/run_config_train_stamp64.json").read_text())
    assert rec["status"] == "failed"  # the interrupted run is recorded as such


def test_disk_full_names_the_file_and_the_fix(tmp_path, field_data, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inj.shards, "_fsync", full)
    res = CliRunner().invoke(main, ["inject", "--config", _conf(tmp_path, field_data)])
    assert res.exit_code == 1
    msg = _one_message(res)
    assert "part-00000.parquet" in msg and "disk is full" in msg and "--output" in msg
    assert not list((tmp_path / "out").rglob("*.parquet"))  # nothing partial left behind


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, field_data, monkeypatch):
    def bug(*a, **k):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(inj.run, "plan_tasks", bug)
    conf = _conf(tmp_path, field_data)
    res = CliRunner().invoke(main, ["inject", "--config", conf])
    assert res.exit_code == 1
    msg = _one_message(res)
    assert "TypeError: unsupported operand" in msg and "--debug" in msg
    res = CliRunner().invoke(main, ["--debug", "inject", "--config", conf])
    assert res.exit_code == 1 and "Traceback" in res.output


def test_usage_errors_exit_2(tmp_path, field_data):
    conf = _conf(tmp_path, field_data)
    res = CliRunner().invoke(main, ["inject", "--config", conf, "--seed-base", "x"])
    assert res.exit_code == 2
    res = CliRunner().invoke(main, ["inject", "--moffat-beta", "0.5"])
    assert res.exit_code == 2 and "--moffat-beta" in res.output and "Invalid config (" not in res.output


def test_unwritable_png_path(tmp_path, field_data):
    conf = _conf(tmp_path, field_data)
    tasks = CliRunner().invoke(main, ["inject", "--config", conf, "--list-tasks"])
    task_id = tasks.stdout.strip().splitlines()[-1].split("\t")[2]
    (tmp_path / "afile").write_text("x")
    png = tmp_path / "afile" / "one.png"  # a file where a folder should be
    res = CliRunner().invoke(main, ["inject", "--config", conf, "--single", task_id, "--png", str(png)])
    assert res.exit_code == 1
    assert "one.png" in _one_message(res)


def test_damaged_bank_is_one_message(tmp_path, field_data):
    from constellation_assets_tests.test_injection import write_test_bank

    bank = write_test_bank(tmp_path / "bank.h5")
    raw = bytearray(bank.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\xff" * 64
    bank.write_bytes(bytes(raw))
    conf = _conf(tmp_path, field_data, source_mode="cosmos", cosmos_bank_h5=str(bank))
    res = CliRunner().invoke(main, ["inject", "--config", conf])
    assert res.exit_code == 1
    msg = _one_message(res)
    assert str(bank) in msg and "bank build" in msg


@pytest.mark.integration
def test_missing_s3_output_bucket_is_an_output_error(tmp_path, field_data, moto_s3):
    conf = _conf(tmp_path, field_data, s3={"endpoint_url": moto_s3["endpoint_url"]}, output_uri=None)
    res = CliRunner().invoke(main, ["inject", "--config", conf, "--output", "s3://no-such-bucket-x1/runs"])
    assert res.exit_code == 1
    msg = _one_message(res)
    assert "output bucket 'no-such-bucket-x1' does not exist" in msg


@pytest.mark.integration
def test_s3_config_reads_with_aws_endpoint_url(tmp_path, field_data, moto_s3, monkeypatch):
    client, bucket = moto_s3["client"], moto_s3["bucket"]
    client.put_object(Bucket=bucket, Key="c.json", Body=Path(_conf(tmp_path, field_data)).read_bytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3["endpoint_url"])
    ok = CliRunner().invoke(main, ["inject", "--config", f"s3://{bucket}/c.json", "--list-tasks"])
    assert ok.exit_code == 0, ok.output
    res = CliRunner().invoke(main, ["inject", "--config", f"s3://{bucket}/missing.json", "--list-tasks"])
    assert res.exit_code == 2  # the --config argument names nothing readable: a usage error
    assert "AWS_ENDPOINT_URL" in _one_message(res) and "missing.json" in res.output
