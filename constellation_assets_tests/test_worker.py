"""The shear worker standalone (subprocess) and under Dagster (PipesSubprocessClient in materialize)."""

import json
import subprocess
import sys

import dagster as dg
import yaml

from constellation_assets.catalog.schema import read_subtile_result
from constellation_assets_tests import test_stamps_synth as syn
from constellation_assets_tests.test_infer import _data


def _setup(tmp_path, n_gal=4):
    h = syn.wcs_header()
    ra, dec, _, _ = syn.galaxy_positions(n_gal, h, seed=2, margin=28)
    gals = [(r, d, 30000.0, 0.17, 0.1, -0.05) for r, d in zip(ra, dec, strict=True)]
    q = syn.write_exposure(tmp_path / "vis" / "1", 1, 0, syn.render_quadrant(h, gals, noise_sigma=2.0))
    manifest = syn.write_manifest(tmp_path / "manifests", [q], ra, dec)
    cfg = {
        "data": _data(tmp_path),
        "output": {"root_uri": str(tmp_path / "out")},
        "shear": {"stamp_size_pix": 48},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return manifest, cfg_path, cfg


def test_worker_standalone(tmp_path):
    manifest, cfg_path, _ = _setup(tmp_path)
    # A folder of manifests expands to its *.yaml files.
    cmd = [sys.executable, "-m", "constellation_assets.shear.worker", "--config", str(cfg_path),
           str(manifest.parent), "--batch-size", "3"]  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("DAGSTER_PIPES")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and lines[0]["status"] == "written" and lines[0]["n_sources"] == 4
    assert lines[0]["device"] == "cpu" and lines[0]["peak_rss_mb"] > 0
    table, summary = read_subtile_result(lines[0]["result_uri"])
    assert table.num_rows == 4 and summary["N_SOURCES"] == 4


def test_worker_failure_exit_status(tmp_path, monkeypatch, caplog, capsys):
    from constellation_assets.shear import worker

    manifest, cfg_path, _ = _setup(tmp_path, n_gal=1)
    for k in ("DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"):
        monkeypatch.delenv(k, raising=False)
    # One missing manifest: the good one still runs, exit status 1, the error names the missing one.
    rc = worker.main(["--config", str(cfg_path), str(tmp_path / "nope.yaml"), str(manifest)])
    assert rc == 1
    assert any("nope.yaml" in r.getMessage() for r in caplog.records)
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(out) == 1 and out[0]["status"] == "written"
    assert worker.main(["--config", str(cfg_path)]) == 2  # no manifests: usage error


def test_worker_under_dagster_pipes(tmp_path):
    manifest, _, cfg = _setup(tmp_path)

    @dg.asset
    def shear_measurements(
        context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient
    ):
        return pipes_subprocess_client.run(
            command=[sys.executable, "-m", "constellation_assets.shear.worker"],
            context=context,
            extras={"config": cfg, "manifests": [str(manifest)], "device": "cpu", "batch_size": 2},
        ).get_materialize_result()

    result = dg.materialize(
        [shear_measurements],
        resources={"pipes_subprocess_client": dg.PipesSubprocessClient()},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    mats = result.asset_materializations_for_node("shear_measurements")
    assert len(mats) == 1
    meta = {k: v.value for k, v in mats[0].metadata.items()}
    assert meta["n_subtiles"] == 1 and meta["n_sources"] == 4 and meta["device"] == "cpu"
    assert meta["peak_rss_mb"] > 0 and meta["seconds"] > 0
    sub = meta["subtiles"]
    assert sub[0]["tile_id"] == 102044185 and sub[0]["status"] == "written"
    assert sub[0]["run_id"] == result.run_id  # provenance: the Dagster run id
    _, summary = read_subtile_result(sub[0]["result_uri"])
    assert summary["run_id"] == result.run_id
