"""`dagster job execute -m constellation_assets.definitions -j <job> -c <run config>` works (real runs)."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _dagster(args, home: Path, timeout: float = 240):
    env = {**os.environ, "DAGSTER_HOME": str(home), "CONSTELLATION_DEPLOYMENT": "local"}
    exe = Path(sys.executable).with_name("dagster")
    return subprocess.run(
        [str(exe), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_run_config_files_match_the_jobs():
    from constellation_assets.definitions import defs

    repo = defs.get_repository_def()
    for name, job in (
        ("dagster_tile_pipeline.yaml", "tile_pipeline_job"),
        ("dagster_calibration.yaml", "calibration_job"),
        ("dagster_injection.yaml", "cosmos_bank_job"),
    ):
        run_config = yaml.safe_load((REPO / "configs" / name).read_text())
        job_def = repo.get_job(job)
        if "ops" in run_config and job != "cosmos_bank_job":
            pytest.fail(f"{name}: op config for a job without configurable ops")
        # Validates the YAML against the job's run config schema (resources + op config).
        from dagster._core.system_config.objects import ResolvedRunConfig

        ResolvedRunConfig.build(job_def, run_config)


@pytest.mark.integration
def test_cli_executes_the_registration_job(tmp_path):
    """The documented CLI path; a real asset job through the CLI would repeat the imports (tens of seconds)
    for no extra coverage: the asset jobs run in-process in test_dagster_pipeline.py."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "tile_ids": [102044185, 102018211],
                "output": {"root_uri": str(tmp_path / "out")},
                "injection": {"partitions": 2, "tiers": ["train", "val"], "n_total_train_per_split": 4},
            }
        )
    )
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(
        yaml.safe_dump(
            {
                "resources": {"pipeline_config": {"config": {"config_path": str(cfg)}}},
                "execution": {"config": {"in_process": {}}},
            }
        )
    )
    res = _dagster(
        [
            "job",
            "execute",
            "-m",
            "constellation_assets.definitions",
            "-j",
            "register_partitions_job",
            "-c",
            str(run_cfg),
        ],
        home,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert sorted(inst.get_dynamic_partitions("mer_tile")) == ["102018211", "102044185"]
        assert sorted(inst.get_dynamic_partitions("injection_shard")) == [
            "train/00000",
            "train/00001",
            "val/00000",
            "val/00001",
        ]
