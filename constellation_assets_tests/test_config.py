import json
import logging

import pytest

from constellation_assets.config import ConfigError, PipelineConfig, load_config, resolve_override_key


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.injection.seed_base == 42
    assert cfg.injection.moffat_beta == 3.5
    assert cfg.injection.source_mode == "sersic"
    assert cfg.tiling.sub_tile_grid == (4, 4)
    assert cfg.tiling.sub_tile_core_arcmin == (8.0, 8.0)


def test_precedence_defaults_flags_file(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text("variant: from_file\ninjection:\n  cosmos_salt: s1\n")
    with caplog.at_level(logging.INFO, logger="constellation_assets.config"):
        cfg = load_config(path, {"variant": "from_flag", "experiment_id": "flag_exp", "seed_base": None})
    assert cfg.injection.variant == "from_file"  # file beats flag
    assert cfg.injection.experiment_id == "flag_exp"  # flag beats default
    assert cfg.injection.cosmos_salt == "s1"
    assert cfg.injection.seed_base == 42  # None flag = not given
    assert any("--variant" in r.message and "overridden" in r.message for r in caplog.records)


def test_seed_json_loads_flat(tmp_path):
    seed = {
        "stage": "4c",
        "variant": "v5_cosmos_source",
        "experiment_id": "train_stamp64_bandsgrz_gridgrid_sota",
        "source_mode": "cosmos",
        "cosmos_bank_h5": "s3://darkhaloscope/cosmos/cosmos_bank_20k_parametric_v1.h5",
        "cosmos_salt": "gen5_v1",
        "seed_base": 42,
        "psf_model": "moffat",
        "moffat_beta": 3.5,
        "split_seed": 99887766,
        "execution_timestamp_utc": "2026-02-02T10:30:45Z",
        "spark_version": "3.1.2",
    }
    p = tmp_path / "gen5.json"
    p.write_text(json.dumps(seed))
    cfg = load_config(p)
    assert cfg.injection.source_mode == "cosmos"
    assert cfg.injection.cosmos_salt == "gen5_v1"
    assert cfg.injection.stage_dir == "phase4c"


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"tilling": {}}, "Did you mean 'tiling'"),
        ({"injection": {"moffat_betta": 2}}, "Did you mean 'injection.moffat_beta'"),
        ({"injection": {"moffat_beta": 1.0}}, "moffat_beta must be > 1"),
        ({"source_mode": "cosmos"}, "needs cosmos_bank_h5"),
        ({"tiling": {"sub_tile_margin_arcmin": 4.0}}, "less than half the sub-tile core"),
        ({"tile_ids": [123]}, "9-digit"),
        ({"compute": {"device": "tpu"}}, "compute.device"),
        ({"output": {"catalog_uri": "postgresql://u:hunter2@db/x"}}, "must not contain a password"),
    ],
)
def test_validation_errors_are_clear(raw, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(raw)
    assert needle in str(exc.value)


def test_override_key_resolution():
    assert resolve_override_key("variant") == ("injection", "variant")
    assert resolve_override_key("moffat-beta") == ("injection", "moffat_beta")
    assert resolve_override_key("output_s3") == ("injection", "output_uri")
    assert resolve_override_key("tiling.sub_tile_margin_arcmin") == ("tiling", "sub_tile_margin_arcmin")
    with pytest.raises(ConfigError, match="Did you mean"):
        resolve_override_key("varient")


def test_interfaces_example(tmp_path):
    p = tmp_path / "local.yaml"
    p.write_text("field_name: EDFF\n")
    cfg = load_config(str(p), overrides={"variant": "v2"})
    assert cfg.injection.variant == "v2"


def test_unsafe_yaml_rejected(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("field_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_load_from_s3(moto_s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3["endpoint_url"])
    moto_s3["client"].put_object(Bucket=moto_s3["bucket"], Key="cfg/a.yaml", Body=b"variant: from_s3\n")
    cfg = load_config(f"s3://{moto_s3['bucket']}/cfg/a.yaml", storage_options=moto_s3["storage_options"])
    assert cfg.injection.variant == "from_s3"


def test_cli_config_show(tmp_path):
    from click.testing import CliRunner

    from constellation_assets.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("variant: vfile\n")
    res = CliRunner().invoke(main, ["config", "show", "--config", str(p), "--experiment-id", "e1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{") :])
    assert out["injection"]["variant"] == "vfile" and out["injection"]["experiment_id"] == "e1"
    bad = CliRunner().invoke(main, ["config", "show", "--set", "injection.moffat_beta=0.5"])
    assert bad.exit_code == 2 and "moffat_beta" in bad.output
