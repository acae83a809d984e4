"""The code location loads: every asset, check, job, sensor, schedule and resource is valid (both deployments)."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[1]

EXPECTED_ASSETS = {
    "tile_sources": "tiles",
    "tile_quadrants": "tiles",
    "subtile_manifests": "tiles",
    "shear_measurements": "shear",
    "shear_catalog": "catalog",
    "shear_calibration": "shear",
    "cosmos_bank": "simulations",
    "lens_injections": "simulations",
    "synthetic_field": "simulations",
}
EXPECTED_JOBS = {
    "tile_pipeline_job",
    "calibration_job",
    "cosmos_bank_job",
    "injection_job",
    "register_partitions_job",
}


@pytest.fixture(scope="module")
def defs():
    from constellation_assets.definitions import defs

    return defs


def test_definitions_validate_loadable(defs):
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    jobs = {j.name for j in repo.get_all_jobs()}
    assert jobs >= EXPECTED_JOBS
    for name in EXPECTED_JOBS:  # resolving a job builds its execution plan inputs: catches broken wiring
        assert repo.get_job(name).graph is not None
    assert {s.name for s in repo.sensor_defs} == {"mer_tile_discovery_sensor", "tile_pipeline_sensor"}
    assert {s.name for s in repo.schedule_defs} == {
        "weekly_calibration_schedule",
        "catalog_maintenance_schedule",
    }


def test_every_asset_is_documented_grouped_owned_and_checked(defs):
    graph = defs.get_repository_def().asset_graph
    keys = {k.to_user_string(): k for k in graph.get_all_asset_keys()}
    assert set(EXPECTED_ASSETS) <= set(keys)
    checked = {ck.asset_key.to_user_string() for ck in graph.asset_check_keys}
    for name, group in EXPECTED_ASSETS.items():
        node = graph.get(keys[name])
        assert node.group_name == group, name
        assert node.description and len(node.description) > 40, name
        assert node.owners, name
        assert any(t.startswith("dagster/kind/") for t in node.tags), name
        assert name in checked, f"{name} has no asset check"


def test_graph_edges_and_partitions(defs):
    graph = defs.get_repository_def().asset_graph

    def parents(name):
        return {p.to_user_string() for p in graph.get(dg.AssetKey(name)).parent_keys}

    assert parents("subtile_manifests") == {"tile_sources", "tile_quadrants"}
    assert parents("shear_measurements") == {"subtile_manifests"}
    assert parents("shear_catalog") == {"shear_measurements"}
    assert parents("lens_injections") == {"cosmos_bank"}
    for name in ("tile_sources", "shear_measurements", "shear_catalog"):
        pd = graph.get(dg.AssetKey(name)).partitions_def
        assert isinstance(pd, dg.DynamicPartitionsDefinition) and pd.name == "mer_tile"
        assert graph.get(dg.AssetKey(name)).backfill_policy.max_partitions_per_run > 1
    assert graph.get(dg.AssetKey("shear_calibration")).partitions_def is None
    assert graph.get(dg.AssetKey("cosmos_bank")).partitions_def is None
    inj = graph.get(dg.AssetKey("lens_injections")).partitions_def
    assert isinstance(inj, dg.DynamicPartitionsDefinition) and inj.name == "injection_shard"
    assert graph.get(dg.AssetKey("shear_measurements")).pools == {"gpu"}


def test_blocking_checks_guard_downstream(defs):
    graph = defs.get_repository_def().asset_graph
    blocking = {
        (k.asset_key.to_user_string(), k.name)
        for k in graph.asset_check_keys
        if graph.get_check_spec(k).blocking
    }
    assert ("subtile_manifests", "core_membership") in blocking
    assert ("shear_measurements", "finite_shear") in blocking
    assert ("shear_catalog", "unique_object_id") in blocking


def test_k8s_deployment_loads_with_envvar_secrets(monkeypatch):
    from constellation_assets.defs import build_definitions
    from constellation_assets.defs.deployment import resources_for

    res = resources_for("k8s")
    assert res["shear_worker"].backend == "k8s"
    assert res["pipeline_config"].device == "cuda"
    # Secrets and deployment endpoints are EnvVars (resolved at run time), not values baked into definitions.
    assert isinstance(res["pipeline_config"].catalog_uri, dg.EnvVar)
    assert isinstance(res["pipeline_config"].config_path, dg.EnvVar)
    assert isinstance(res["shear_worker"].image, dg.EnvVar)
    k8s_defs = build_definitions("k8s")
    dg.Definitions.validate_loadable(k8s_defs)
    local = resources_for("local")
    assert local["shear_worker"].backend == "subprocess"
    monkeypatch.setenv("CONSTELLATION_DEPLOYMENT", "moon")
    from constellation_assets.defs.deployment import current_deployment

    with pytest.raises(ValueError, match="CONSTELLATION_DEPLOYMENT='moon'"):
        current_deployment()


def test_dagster_definitions_validate_cli():
    env = {**os.environ, "CONSTELLATION_DEPLOYMENT": "local"}
    exe = Path(sys.executable).with_name("dagster")
    res = subprocess.run(
        [str(exe), "definitions", "validate", "-m", "constellation_assets.definitions"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_first_run_wiring_local_vs_k8s():
    """Locally the synthetic field is upstream of the tile assets and discovery is on; in production neither."""
    from constellation_assets.defs import build_definitions

    for deployment, field_up, status in (
        ("local", True, dg.DefaultSensorStatus.RUNNING),
        ("k8s", False, dg.DefaultSensorStatus.STOPPED),
    ):
        d = build_definitions(deployment)
        graph = d.get_repository_def().asset_graph
        parents = {p.to_user_string() for p in graph.get(dg.AssetKey("tile_sources")).parent_keys}
        assert (parents == {"synthetic_field"}) is field_up, deployment
        sensor = d.get_repository_def().get_sensor_def("mer_tile_discovery_sensor")
        assert sensor.default_status == status, deployment


def test_tile_checks_are_partitioned_separate_and_unique(defs):
    """Tile checks run per tile partition in their own step (executable from the UI without re-materializing);
    the catalog's checks are not repeated on the sub-tile results (only the two guards of the result files,
    finite values and positive responses, which block the catalog commit)."""
    graph = defs.get_repository_def().asset_graph
    names: dict = {}
    for key in graph.asset_check_keys:
        names.setdefault(key.asset_key.to_user_string(), set()).add(key.name)
    assert names["shear_measurements"] & names["shear_catalog"] <= {"finite_shear", "positive_responses"}
    assert names["shear_measurements"] == {"results_complete", "finite_shear", "positive_responses"}
    checks_defs = list(defs.asset_checks or [])
    separate = {k for c in checks_defs for k in c.check_keys}
    # Every check is its own definition: the UI can execute it without re-materializing its asset.
    assert separate == set(graph.asset_check_keys)
    for asset in (
        "tile_sources",
        "tile_quadrants",
        "subtile_manifests",
        "shear_measurements",
        "shear_catalog",
    ):
        for name in names[asset]:
            key = dg.AssetCheckKey(dg.AssetKey(asset), name)
            assert key in separate, key
            spec = graph.get_check_spec(key)
            assert spec.partitions_def is not None and spec.partitions_def.name == "mer_tile", key


def test_local_worker_resource_shows_no_kubernetes_settings():
    from constellation_assets.defs.deployment import resources_for
    from constellation_assets.defs.resources import DEFAULT_LOCAL_CONFIG

    local = resources_for("local")
    fields = set(type(local["shear_worker"]).model_fields)
    assert not fields & {"gpu_count", "memory", "cpu", "image", "namespace", "node_selector"}
    assert local["pipeline_config"].config_path == DEFAULT_LOCAL_CONFIG  # the config of `make demo`


def test_one_config_source_env_var(monkeypatch, tmp_path):
    from constellation_assets.defs.deployment import resources_for

    cfg = tmp_path / "c.yaml"
    cfg.write_text("field_name: EDFF\n")
    monkeypatch.setenv("CONSTELLATION_CONFIG", str(cfg))
    assert resources_for("local")["pipeline_config"].config_path == str(cfg)
