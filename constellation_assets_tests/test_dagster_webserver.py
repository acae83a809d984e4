"""The UI path: dagster-webserver on 127.0.0.1 serves the code location; its GraphQL API shows the assets
(groups, kinds, owners), the mer_tile partitions registered on the instance, and the asset checks."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ASSETS_QUERY = """
{ assetNodes {
    assetKey { path } groupName description kinds
    owners { ... on TeamAssetOwner { team } ... on UserAssetOwner { email } }
    partitionDefinition { type name }
    partitionKeysByDimension { name partitionKeys }
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
} }
"""
JOBS_QUERY = """
{ repositoriesOrError { ... on RepositoryConnection { nodes {
    jobs { name isAssetJob }
    sensors { name }
    schedules { name }
} } } }
"""


LAUNCH_MUTATION = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}
"""
RUN_QUERY = """
query Run($runId: ID!) { runOrError(runId: $runId) { ... on Run { status } } }
"""
LOCATION_QUERY = """
{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }
"""


def _launch_and_wait(port: int, job: str, run_config: dict, tags: dict, timeout_s: float) -> str:
    """Launch a run the way the UI's Materialize button does (GraphQL), then poll it to completion."""
    repo = _graphql(port, LOCATION_QUERY)["repositoriesOrError"]["nodes"][0]
    params = {
        "selector": {
            "repositoryLocationName": repo["location"]["name"],
            "repositoryName": repo["name"],
            "jobName": job,
        },
        "runConfigData": run_config,
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    body = json.dumps({"query": LAUNCH_MUTATION, "variables": {"params": params}}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        launched = json.loads(resp.read())["data"]["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        body = json.dumps({"query": RUN_QUERY, "variables": {"runId": run_id}}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            status = json.loads(resp.read())["data"]["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1.0)
    return f"TIMEOUT ({status})"


MATERIALIZATIONS_QUERY = """
{ assetNodes { assetKey { path } assetMaterializations(partitions: ["%s"], limit: 1) {
    partition metadataEntries { label } } } }
"""
TILE = 102044185


def _tiny_field(tmp_path: Path) -> Path:
    """A one-tile, one-exposure synthetic Q1 field (seconds) and the pipeline config pointing at it."""
    import yaml

    from constellation_assets.config import load_config
    from constellation_assets.synthetic import simulate_field

    root = tmp_path / "field"
    cfg = {
        "tile_ids": [TILE],
        "data": {
            "vis_base_uri": str(root / "q1" / "VIS") + "/",
            "catalog_base_uri": str(root / "q1" / "catalogs" / "MER_FINAL_CATALOG") + "/",
        },
        "output": {"root_uri": str(root / "out")},
        "field": {
            "tile_ids": [TILE],
            "n_dithers": 1,
            "ccd_grid": [1, 1],
            "quadrant_nx_pix": 256,
            "quadrant_ny_pix": 256,
            "galaxy_density_arcmin2": 150,  # every non-empty sub-tile gets many sources
            "star_density_arcmin2": 1,
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    simulate_field(load_config(str(path)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, timeout: float = 20.0) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = json.loads(resp.read())
    assert "errors" not in body, body
    return body["data"]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_webserver_graphql_shows_assets_partitions_checks(tmp_path):
    import dagster as dg

    from constellation_assets.defs.partitions import register_tile_partitions

    home = tmp_path / "dagster_home"
    home.mkdir()
    # Runs launched from the UI start at once (no daemon in this test): DefaultRunCoordinator.
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: DefaultRunCoordinator\n"
    )
    tiles = [str(TILE), "102018211", "102041031"]
    cfg_file = _tiny_field(tmp_path)
    with dg.DagsterInstance.from_config(str(home)) as inst:
        register_tile_partitions(inst, tiles)

    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "CONSTELLATION_DEPLOYMENT": "local"}
    exe = Path(sys.executable).with_name("dagster-webserver")
    log = open(tmp_path / "webserver.log", "w")  # noqa: SIM115 (closed in finally, after the process)
    proc = subprocess.Popen(
        [str(exe), "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: the code server child dies with it
    )
    try:
        deadline = time.monotonic() + 100
        data = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            try:
                data = _graphql(port, ASSETS_QUERY, timeout=10)
                if data["assetNodes"]:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, AssertionError):
                pass
            time.sleep(1.0)
        assert data and data["assetNodes"], "webserver did not serve the code location in time"

        nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
        assert {
            "tile_sources",
            "subtile_manifests",
            "shear_measurements",
            "shear_catalog",
            "shear_calibration",
        } <= set(nodes)
        cat = nodes["shear_catalog"]
        assert cat["groupName"] == "catalog" and "iceberg" in cat["kinds"] and cat["description"]
        assert cat["owners"] == [{"team": "shear-platform"}]
        assert cat["partitionDefinition"] == {"type": "DYNAMIC", "name": "mer_tile"}
        assert cat["partitionKeysByDimension"][0]["partitionKeys"] == tiles
        checks = {c["name"]: c["blocking"] for c in cat["assetChecksOrError"]["checks"]}
        assert checks["unique_object_id"] is True and "finite_shear" in checks
        for name, node in nodes.items():
            assert node["assetChecksOrError"]["checks"], f"{name} shows no checks in the UI"

        repo = _graphql(port, JOBS_QUERY)["repositoriesOrError"]["nodes"][0]
        assert {"tile_pipeline_job", "calibration_job", "injection_job"} <= {j["name"] for j in repo["jobs"]}
        assert {"mer_tile_discovery_sensor", "tile_pipeline_sensor"} <= {s["name"] for s in repo["sensors"]}

        # Materialize one tile partition the way the UI's "Materialize" button does (launch through GraphQL;
        # the webserver's run launcher executes it), on a tiny synthetic field.
        status = _launch_and_wait(
            port,
            "tile_pipeline_job",
            {
                "resources": {"pipeline_config": {"config": {"config_path": str(cfg_file)}}},
                "execution": {"config": {"in_process": {}}},
            },
            {"dagster/partition": str(TILE)},
            timeout_s=120,
        )
        assert status == "SUCCESS", (tmp_path / "webserver.log").read_text()[-3000:]
        mats = _graphql(port, MATERIALIZATIONS_QUERY % TILE)["assetNodes"]
        got = {"/".join(n["assetKey"]["path"]): n["assetMaterializations"] for n in mats}
        for key in (
            "tile_sources",
            "tile_quadrants",
            "subtile_manifests",
            "shear_measurements",
            "shear_catalog",
        ):
            assert got[key] and got[key][0]["partition"] == str(TILE), key
        labels = {e["label"] for e in got["shear_catalog"][0]["metadataEntries"]}
        assert {"iceberg_snapshot_id", "config_hash", "effective_config", "dagster/row_count"} <= labels
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()
