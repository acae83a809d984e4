"""Secrets given through the environment or embedded in URIs never appear in outputs.

Unique marker strings stand for AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, PGPASSWORD and a token inside a
URI. After real runs (the shear worker under Dagster pipes, run-config records, failing reads), every file
written under the output root, the Dagster event log and materialization metadata, captured logs, stdout/
stderr and exception strings are searched for them.
"""

import json
import logging
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from constellation_assets_tests import test_stamps_synth as syn

AWS_SECRET = "h9AwsSecret-7QzK2"
AWS_TOKEN = "h9AwsSession-Tok3n"
PG_PASSWORD = "h9PgPassw0rd-4Lm"
URI_TOKEN = "h9UriToken-9Xw"
SECRETS = (AWS_SECRET, AWS_TOKEN, PG_PASSWORD, URI_TOKEN)


def _scan_tree(root: Path) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p}: {s}" for s in SECRETS if s.encode() in data]
    return hits


def _assert_clean(text: str, where: str) -> None:
    found = [s for s in SECRETS if s in text]
    assert not found, f"secret(s) {found} leaked into {where}"


@pytest.fixture()
def secret_env(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_TOKEN)
    monkeypatch.setenv("PGPASSWORD", PG_PASSWORD)


@pytest.mark.timeout(180)
def test_worker_under_dagster_and_run_records_hold_no_secrets(tmp_path, secret_env, caplog, capfd):
    from constellation_assets.config import load_config
    from constellation_assets.provenance import write_run_config

    h = syn.wcs_header()
    ra, dec, _, _ = syn.galaxy_positions(3, h, seed=2, margin=28)
    gals = [(r, d, 30000.0, 0.17, 0.1, -0.05) for r, d in zip(ra, dec, strict=True)]
    q = syn.write_exposure(tmp_path / "q1" / "VIS" / "1", 1, 0, syn.render_quadrant(h, gals, noise_sigma=2.0))
    manifest = syn.write_manifest(tmp_path / "out" / "manifests", [q], ra, dec)
    cfg_dict = {
        "data": {
            "vis_base_uri": str(tmp_path / "q1" / "VIS"),
            "catalog_base_uri": str(tmp_path / "q1" / "cat"),
        },
        "output": {"root_uri": str(tmp_path / "out")},
        "shear": {"stamp_size_pix": 48},
        # opaque pass-through sections may carry anything a user pastes in
        "inference": {"api_token": URI_TOKEN, "endpoint": f"https://user:{URI_TOKEN}@engine.example/v1"},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict))

    @dg.asset
    def shear_measurements(
        context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient
    ):
        return pipes_subprocess_client.run(
            command=[sys.executable, "-m", "constellation_assets.shear.worker"],
            context=context,
            extras={"config": str(cfg_path), "manifests": [str(manifest)], "device": "cpu"},
        ).get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    with caplog.at_level(logging.DEBUG):
        result = dg.materialize(
            [shear_measurements],
            resources={"pipes_subprocess_client": dg.PipesSubprocessClient()},
            instance=instance,
        )
        assert result.success
        cfg = load_config(str(cfg_path))
        uri, record = write_run_config(cfg, str(tmp_path / "out"), "infer", "v1", "exp")

    # Dagster: materialization metadata and every event of the run (logs forwarded through pipes)
    mats = result.asset_materializations_for_node("shear_measurements")
    assert mats
    _assert_clean(json.dumps({k: str(v.value) for k, v in mats[0].metadata.items()}), "Dagster metadata")
    records = instance.all_logs(result.run_id)
    assert records
    _assert_clean("\n".join(str(r.dagster_event) + str(r.user_message) for r in records), "Dagster event log")
    # run-config record and every file under the output root (results, manifests, records)
    assert Path(uri).exists()
    _assert_clean(json.dumps(record), "run-config record")
    hits = _scan_tree(tmp_path / "out")
    assert not hits, hits
    # captured logs and process output
    _assert_clean("\n".join(r.getMessage() for r in caplog.records), "logs")
    out, err = capfd.readouterr()
    _assert_clean(out + err, "stdout/stderr")


def test_error_messages_redact_credentials_in_uris(tmp_path, secret_env):
    from constellation_assets.io.uri import DataAccessError, read_bytes

    for uri in (
        f"s3://AKIAEXAMPLE:{URI_TOKEN}@bucket-that-does-not-exist/x.fits",
        f"{tmp_path}/missing.fits?X-Amz-Security-Token={URI_TOKEN}&X-Amz-Signature={URI_TOKEN}",
    ):
        with pytest.raises(DataAccessError) as ei:
            read_bytes(
                uri,
                {
                    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                    "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
                }
                if uri.startswith("s3")
                else None,
            )
        _assert_clean(str(ei.value), "DataAccessError message")
        _assert_clean(repr(ei.value.uri), "DataAccessError.uri")


def test_catalog_open_error_does_not_echo_the_password(tmp_path, secret_env):
    from constellation_assets.catalog.tables import CatalogConfigError, open_catalog_from

    with pytest.raises(CatalogConfigError) as ei:
        open_catalog_from(
            f"postgresql+psycopg2://postgres:{PG_PASSWORD}@127.0.0.1:9/nodb", str(tmp_path / "wh")
        )
    _assert_clean(str(ei.value), "catalog error")


def test_config_rejecting_a_password_does_not_print_it():
    from constellation_assets.config import ConfigError, load_config

    for bad in (
        {"output": {"catalog_uri": f"postgresql+psycopg2://u:{PG_PASSWORD}@db/shear"}},
        {"data": {"s3": {"endpoint_url": f"http://ak:{AWS_SECRET}@minio:9000"}}},
    ):
        with pytest.raises(ConfigError) as ei:
            load_config(bad)
        _assert_clean(str(ei.value), "config error")
