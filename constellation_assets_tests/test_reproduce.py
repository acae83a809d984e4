"""`constellation reproduce`: a recorded run regenerates byte-identical stamps (and a tampered record is caught)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from constellation_assets.cli import main
from constellation_assets.sim import injection as inj
from constellation_assets_tests.test_injection_field import make_tiny_field, tiny_config

FAST = {"stamp_size_pix": 32, "register_catalog": False, "n_total_train_per_split": 4, "partitions": 2}


def test_reproduce_byte_identical(tmp_path):
    data = make_tiny_field(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, **FAST, output_uri=str(tmp_path / "orig"), cosmos_salt="gen5_v1")
    orig = inj.run_injection(cfg)

    runner = CliRunner()
    out = tmp_path / "repro"
    res = runner.invoke(main, ["reproduce", orig.run_config_uri, "--output", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert "byte-identical" in res.output
    for u in orig.shard_uris:
        rel = Path(u).relative_to(tmp_path / "orig")
        assert (out / rel).read_bytes() == Path(u).read_bytes()
        _, a = inj.read_stamps(u)
        _, b = inj.read_stamps(str(out / rel))
        assert np.array_equal(a["VIS"], b["VIS"])
    rec = json.loads((out / "phase4c/v1/run_config_train_stamp64.json").read_text())
    assert rec["config_hash"] == orig.config_hash and rec["injection"]["output_uri"] == str(out)

    # The comparison can fail: a record whose checksum does not match what the config produces.
    bad = json.loads(Path(orig.run_config_uri).read_text())
    key = sorted(bad["extra"]["shard_sha256"])[0]
    bad["extra"]["shard_sha256"][key] = "0" * 64
    bad_path = tmp_path / "tampered.json"
    bad_path.write_text(json.dumps(bad))
    res = runner.invoke(main, ["reproduce", str(bad_path), "--output", str(tmp_path / "r2"), "--force", "1"])
    assert res.exit_code == 1
    assert "NOT identical" in res.output


def test_inject_cli_config_precedence_single_png_and_force(tmp_path, monkeypatch):
    data = make_tiny_field(tmp_path / "data")
    conf = tmp_path / "gen5.json"
    conf.write_text(
        json.dumps(
            {
                "tile_ids": [102044185],
                "data": {"vis_base_uri": data["vis_base_uri"], "catalog_base_uri": data["catalog_base_uri"]},
                "output": {"root_uri": str(tmp_path / "root")},
                "stage": "4c",
                "variant": "v5_from_file",
                "seed_base": 42,
                "psf_model": "moffat",
                "moffat_beta": 3.5,
                "split_seed": 99887766,
                "injection": FAST,
            }
        )
    )
    runner = CliRunner()
    args = [
        "inject",
        "--config",
        str(conf),
        "--output-s3",
        str(tmp_path / "o"),
        "--variant",
        "from_flag",
        "--sweep-partitions",
        "1",
        "--tiers",
        "train",
    ]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    # values in --config override flags: the file's variant wins; flags absent from the file apply
    rc = tmp_path / "o" / "phase4c" / "v5_from_file" / "run_config_train_stamp64.json"
    assert rc.exists()
    rec = json.loads(rc.read_text())
    assert rec["variant"] == "v5_from_file" and rec["injection"]["partitions"] == 2  # file's partitions win
    res = runner.invoke(main, [*args, "--seed-base", "1"])  # the file's seed_base wins: same run -> skip
    assert res.exit_code == 0 and "Already complete" in res.output
    conf2 = json.loads(conf.read_text())
    conf2["seed_base"] = 5
    (tmp_path / "gen5b.json").write_text(json.dumps(conf2))
    args2 = [a if a != str(conf) else str(tmp_path / "gen5b.json") for a in args]
    res = runner.invoke(main, args2)
    assert res.exit_code == 1 and "--force" in res.output  # refused: different config, same place
    res = runner.invoke(main, [*args2, "--force", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(rc.read_text())["seed_base"] == 5

    conf = tmp_path / "gen5b.json"  # the run now in the output
    tasks = runner.invoke(main, ["inject", "--config", str(conf), "--list-tasks"])
    task_id = tasks.stdout.strip().splitlines()[0].split("\t")[2]
    png = tmp_path / "one.png"
    res = runner.invoke(main, ["inject", "--config", str(conf), "--single", task_id, "--png", str(png)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["task_id"] == task_id and info["cosmos_index"] is None and info["magnification"] > 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the single render is the same injection as in the run's shard
    table, images = inj.read_stamps(
        str(tmp_path / "o/phase4c/v5_from_file/train_stamp64/train/part-00000.parquet")
    )
    row = table.to_pylist()[0]
    assert row["task_id"] == task_id and row["theta_e_arcsec"] == info["theta_e_arcsec"]
