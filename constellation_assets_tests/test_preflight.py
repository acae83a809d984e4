"""`constellation preflight`: every problem listed at once, non-zero exit; a good config passes with estimates."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from constellation_assets.cli import main
from constellation_assets.sim import injection as inj
from constellation_assets_tests.test_injection_field import make_tiny_field, tiny_config

FAST = {"stamp_size_pix": 32, "n_total_train_per_split": 4, "partitions": 2}


def _config_file(tmp_path, data, **injection) -> str:
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "tile_ids": [102044185],
                "data": {"vis_base_uri": data["vis_base_uri"], "catalog_base_uri": data["catalog_base_uri"]},
                "output": {"root_uri": str(tmp_path / "root")},
                "injection": {**FAST, "output_uri": str(tmp_path / "out"), **injection},
            }
        )
    )
    return str(path)


def test_preflight_ok_with_estimates(tmp_path):
    data = make_tiny_field(tmp_path / "data")
    rep = inj.preflight(tiny_config(tmp_path, data, **FAST))
    assert rep.ok, rep.problems
    assert rep.info["n_stamps"] == 4 and rep.info["n_shards"] == 2
    assert rep.info["estimated_output_bytes"] >= 4 * 32 * 32 * 4
    assert rep.info["estimated_seconds"] > 0 and rep.info["hosts_per_split"]["train"] > 0
    res = CliRunner().invoke(main, ["preflight", "--config", _config_file(tmp_path, data), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{") :])["ok"] is True


def test_preflight_lists_every_problem(tmp_path):
    data = make_tiny_field(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    conf = _config_file(
        tmp_path,
        data,
        source_mode="cosmos",
        cosmos_bank_h5=str(tmp_path / "missing_bank.h5"),
        bands=["VIS", "Y"],
        psf_fwhm_arcsec={"VIS": -0.1, "Y": 0.3},
        output_uri=str(blocker / "out"),
        host_mag_range=[10.0, 11.0],
    )
    res = CliRunner().invoke(main, ["preflight", "--config", conf])
    assert res.exit_code == 1
    out = res.output
    assert "missing_bank.h5" in out and "not readable" in out  # bank
    assert "band 'Y'" in out and "MER mosaics" in out  # band without host pixels
    assert "psf_fwhm_arcsec must be a positive" in out  # bad PSF
    assert "not writable" in out  # output
    assert "no host galaxies" in out  # host cuts leave nothing
    assert "preflight found 5 problem(s)" in out
    assert len(re.findall(r"^\s+\d+\. ", out, flags=re.M)) == 5


def test_preflight_config_errors_do_not_hide_other_problems(tmp_path):
    data = make_tiny_field(tmp_path / "data")
    # cosmos without a bank fails config validation; the unwritable output is still reported
    blocker = tmp_path / "f"
    blocker.write_text("x")
    conf = _config_file(tmp_path, data, source_mode="cosmos", output_uri=str(blocker / "o"))
    res = CliRunner().invoke(main, ["preflight", "--config", conf])
    assert res.exit_code == 1
    assert "needs cosmos_bank_h5" in res.output and "not writable" in res.output


def test_preflight_config_from_s3_and_conflict(tmp_path, moto_s3, monkeypatch):
    data = make_tiny_field(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, **FAST, register_catalog=False)
    inj.run_injection(cfg)
    conf = json.loads(Path(_config_file(tmp_path, data, register_catalog=False, seed_base=1)).read_text())
    key = "configs/gen5.json"
    moto_s3["client"].put_object(Bucket=moto_s3["bucket"], Key=key, Body=json.dumps(conf).encode())
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3["endpoint_url"])
    res = CliRunner().invoke(main, ["preflight", "--config", f"s3://{moto_s3['bucket']}/{key}"])
    assert res.exit_code == 1
    assert "would be refused" in res.output  # a different run already completed at that output
    res = CliRunner().invoke(main, ["preflight", "--config", f"s3://{moto_s3['bucket']}/{key}", "--force"])
    assert res.exit_code == 0, res.output
