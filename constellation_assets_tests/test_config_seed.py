"""The seed's shear-pipeline config (configs/seed_single_tile.yaml) loads as it is and maps onto our keys;
unknown keys suggest the closest keys of their own section."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from constellation_assets.config import ConfigError, load_config, resolve_override_key

SEED = Path(__file__).resolve().parents[1] / "configs" / "seed_single_tile.yaml"


def _seed() -> dict:
    return yaml.safe_load(SEED.read_text())


def test_seed_single_tile_config_loads_and_maps(caplog):
    with caplog.at_level(logging.INFO, logger="constellation_assets.config"):
        cfg = load_config(SEED)
    assert cfg.field_name == "EDFF" and cfg.tile_ids == [102019592] and cfg.selected_tile_ids == [102019592]
    assert cfg.tiling.sub_tile_grid == (2, 2) and cfg.tiling.sub_tile_margin_arcmin == 1.0
    assert cfg.data.vis_base_uri == "s3://nasa-irsa-euclid-q1/q1/VIS/"
    assert cfg.data.catalog_base_uri == "s3://nasa-irsa-euclid-q1/q1/catalogs/MER_FINAL_CATALOG/"
    assert cfg.data.s3.region == "us-east-1" and cfg.data.s3.anon is True
    out = cfg.output
    assert out.root_uri == "s3://constellation-pipeline-dev-696356228955" and out.namespace == "shear"
    assert out.manifests == "/tmp/constellation-manifests/" and out.results == "/tmp/constellation-results/"
    assert out.tiles == "/tmp/constellation-subtiles/"
    assert out.warehouse == "/tmp/constellation-warehouse"
    assert out.catalog == "sqlite:////tmp/constellation-warehouse/catalog.db"  # the seed's catalog file
    # outputs on the seed's own bucket are written with credentials; the public data bucket is read anonymously
    assert out.s3 is not None and out.s3.anon is False and out.s3.region == "us-east-1"
    assert cfg.storage_options("s3://nasa-irsa-euclid-q1/q1/VIS/x.fits").get("anon") is True
    assert not cfg.storage_options(out.root_uri + "/runs/x").get("anon")
    # the MER mosaics are where the seed's data.mer_base_uri says
    from constellation_assets.io.q1 import default_mer_base_uri

    assert default_mer_base_uri(cfg.data.vis_base_uri) == _seed()["data"]["mer_base_uri"]
    # pass-through sections untouched; the built-in engine runs (no engine given)
    assert cfg.inference == _seed()["inference"] and cfg.gal == _seed()["gal"]
    assert cfg.inference.get("engine", "builtin") == "builtin"
    # one INFO line with the whole mapping
    lines = [r.getMessage() for r in caplog.records if "the seed's keys mapped" in r.getMessage()]
    assert len(lines) == 1 and all(
        r.levelno == logging.INFO for r in caplog.records if "seed" in r.getMessage()
    )
    for piece in (
        "data.s3_region -> data.s3.region",
        "data.s3_no_sign_request -> data.s3.anon",
        "output.catalog_namespace -> output.namespace",
        "output.storage_base_uri -> output.root_uri",
        "output.extraction_dir -> output.tile_dir",
        "output.catalog_table='edff_shear' -> shear.subtiles",
        "data.mer_base_uri",
        "mock_shine=False ignored",
    ):
        assert piece in lines[0], piece


def test_mock_shine_true_is_refused():
    raw = _seed()
    raw["mock_shine"] = True
    with pytest.raises(ConfigError, match="inference here is real") as err:
        load_config(raw)
    assert "inference.engine: external" in str(err.value)


def test_seed_keys_conflicting_with_ours_and_wrong_mer_base():
    raw = _seed()
    raw["data"]["s3"] = {"region": "eu-west-1"}
    with pytest.raises(ConfigError, match="data.s3_region.*data.s3.region.*disagree"):
        load_config(raw)
    raw = _seed()
    raw["data"]["mer_base_uri"] = "s3://elsewhere/MER/"
    with pytest.raises(ConfigError, match="data.mer_base_uri") as err:
        load_config(raw)
    assert "s3://nasa-irsa-euclid-q1/q1/MER/" in str(err.value)


def test_seed_names_as_flags():
    assert resolve_override_key("data.s3_region") == ("data", "s3", "region")
    assert resolve_override_key("output.storage_base_uri") == ("output", "root_uri")
    cfg = load_config(None, {"output.catalog_namespace": "shear_dev"})
    assert cfg.output.namespace == "shear_dev"


@pytest.mark.parametrize(
    "raw, suggestions, not_listed",
    [
        # a section's unknown key: up to 3 closest keys of that section, not the keys of other sections
        ({"output": {"catalog_tabel": "x"}}, ["output.catalog_type", "output.catalog_name"], "vis_base_uri"),
        ({"data": {"vis_base": "x"}}, ["data.vis_base_uri"], "root_uri"),
        ({"field": {"n_dithr": 2}}, ["field.n_dithers"], "moffat_beta"),
        # the top level: its sections and the flat injection keys, shown where they live
        ({"varient": "v1"}, ["injection.variant"], "vis_base_uri"),
        ({"tilling": {}}, ["tiling"], "sub_tile_grid"),
    ],
)
def test_unknown_keys_suggest_keys_of_the_same_section(raw, suggestions, not_listed):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    msg = str(err.value)
    assert "Did you mean" in msg
    for s in suggestions:
        assert repr(s) in msg
    assert not_listed not in msg
    head = msg.split("Did you mean", 1)[1].split("?", 1)[0]
    assert head.count("'") <= 6  # at most 3 suggestions
