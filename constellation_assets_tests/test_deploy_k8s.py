"""deploy/: the GPU worker pod spec, Helm values and dagster.yaml render and validate against the
Kubernetes client models and dagster's own config schemas (no cluster needed)."""

from pathlib import Path

import kubernetes
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _k8s(obj: dict, klass: str):
    """Deserialize camelCase JSON into a kubernetes client model and back (the round trip must be lossless)."""
    api = kubernetes.client.ApiClient()
    model = api._ApiClient__deserialize(obj, klass)
    assert api.sanitize_for_serialization(model) == obj, f"{klass}: unknown or misspelled keys dropped"
    return model


def _strict(model_cls, obj: dict):
    """dagster-k8s' strict conversion (unknown keys raise)."""
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

    return k8s_model_from_dict(model_cls, k8s_snake_case_dict(model_cls, obj))


def test_committed_pod_spec_is_rendered_from_code():
    from constellation_assets.defs.k8s import render_worker_pod_spec_yaml

    committed = (DEPLOY / "k8s" / "gpu-worker-podspec.yaml").read_text()
    assert committed == render_worker_pod_spec_yaml(), "regenerate: python -m constellation_assets.defs.k8s"


def test_gpu_pod_spec_validates_and_requests_a_gpu():
    spec = yaml.safe_load((DEPLOY / "k8s" / "gpu-worker-podspec.yaml").read_text())
    model = _k8s(spec, "V1PodSpec")
    _strict(kubernetes.client.V1PodSpec, spec)
    c = model.containers[0]
    assert c.resources.limits["nvidia.com/gpu"] == "1"
    assert c.resources.limits["memory"] == c.resources.requests["memory"]  # guaranteed memory
    assert model.node_selector == {"nvidia.com/gpu.present": "true"}
    assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in model.tolerations)
    assert model.restart_policy == "Never"
    assert c.env_from[0].secret_ref.name == "constellation-secrets"
    assert all(e.value is None or "SECRET" not in e.value.upper() for e in c.env)


def test_cpu_pod_spec_has_no_gpu():
    from constellation_assets.defs.k8s import gpu_worker_pod_spec

    spec = gpu_worker_pod_spec(gpu_count=0, memory="4Gi", cpu="2")
    model = _k8s(spec, "V1PodSpec")
    assert "nvidia.com/gpu" not in model.containers[0].resources.limits
    assert model.tolerations is None
    with pytest.raises(ValueError, match="gpu_count"):
        gpu_worker_pod_spec(gpu_count=-1)


def test_pipes_k8s_client_builds_the_worker_pod():
    """Exactly what PipesK8sClient submits: our base_pod_spec + image, command and the pipes env."""
    from dagster_k8s.pipes import build_pod_body

    from constellation_assets.defs.resources import ShearWorkerResource

    worker = ShearWorkerResource(
        backend="k8s", device="cuda", image="constellation:cuda", gpu_count=2, memory="32Gi"
    )
    pod = build_pod_body(
        pod_name="dagster-shear-1",
        image=worker.image,
        command=worker.command(["--tile", "102044185"]),
        env_vars={"DAGSTER_PIPES_CONTEXT": "x", "DAGSTER_PIPES_MESSAGES": "y"},
        base_pod_meta=None,
        base_pod_spec=worker.pod_spec(),
    )
    c = pod.spec.containers[0]
    assert c.image == "constellation:cuda"
    assert c.command[:3] == ["python", "-m", "constellation_assets.shear.worker"]
    assert c.resources.limits["nvidia.com/gpu"] == "2" and c.resources.limits["memory"] == "32Gi"
    assert {e.name for e in c.env} >= {"DAGSTER_PIPES_CONTEXT", "CONSTELLATION_DEPLOYMENT"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
    api = kubernetes.client.ApiClient()
    _k8s(api.sanitize_for_serialization(pod), "V1Pod")


def test_helm_values_validate():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    ud = values["dagster-user-deployments"]
    assert ud["enabled"] and ud["enableSubchart"]
    (dep,) = ud["deployments"]
    assert dep["dagsterApiGrpcArgs"] == ["-m", "constellation_assets.definitions"]
    env = {e["name"]: e.get("value") for e in dep["env"]}
    assert env["CONSTELLATION_DEPLOYMENT"] == "k8s"
    # Every env var the k8s deployment reads through dagster.EnvVar is provided.
    assert {"CONSTELLATION_CONFIG", "CONSTELLATION_CATALOG_URI", "CONSTELLATION_WORKER_IMAGE"} <= set(env)
    assert ":" not in env["CONSTELLATION_CATALOG_URI"].split("://", 1)[1].split("@")[0], "password in values"
    for e in dep["env"]:
        _k8s(e, "V1EnvVar")
    _k8s(dep["resources"], "V1ResourceRequirements")

    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    run_cfg = launcher["config"]["k8sRunLauncher"]["runK8sConfig"]
    _k8s({"name": "dagster", **run_cfg["containerConfig"]}, "V1Container")  # the chart supplies the name
    _k8s({"containers": [{"name": "dagster"}], **run_cfg["podSpecConfig"]}, "V1PodSpec")
    assert values["concurrency"]["pools"]["defaultLimit"] >= 1
    assert values["postgresql"]["enabled"] is False and values["global"]["postgresqlSecretName"]

    # The runK8sConfig is also valid for dagster-k8s itself (the chart passes it through as run_k8s_config).
    from dagster_k8s.job import UserDefinedDagsterK8sConfig
    from dagster_k8s.models import k8s_snake_case_dict

    assert k8s_snake_case_dict(kubernetes.client.V1JobSpec, run_cfg["jobSpecConfig"]) == {
        "ttl_seconds_after_finished": 86400
    }
    UserDefinedDagsterK8sConfig.from_dict(
        {
            "container_config": run_cfg["containerConfig"],
            "pod_spec_config": run_cfg["podSpecConfig"],
            "job_spec_config": run_cfg["jobSpecConfig"],
        }
    )


def test_dagster_yaml_validates_against_dagster_schemas(monkeypatch):
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    for var in ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_DB"):
        monkeypatch.setenv(var, "x")
    cfg, _ = dagster_instance_config(str(DEPLOY), "dagster.yaml")
    assert cfg["run_launcher"]["class"] == "K8sRunLauncher"
    assert cfg["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert cfg["concurrency"]["pools"]["default_limit"] >= 1
    res = process_config(K8sRunLauncher.config_type(), cfg["run_launcher"]["config"])
    assert res.success, res.errors
    raw = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    assert raw["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    from dagster._core.storage.config import pg_config

    assert process_config(pg_config(), raw["storage"]["postgres"]).success


def test_dockerfile_builds_cpu_and_cuda_variants():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
    assert "constellation_assets.definitions" in text
    assert "deploy/dagster.yaml" in text


def test_k8s_worker_resource_hands_the_gpu_pod_spec_to_pipes_k8s_client(monkeypatch):
    """The k8s backend calls PipesK8sClient with the worker image, namespace and GPU pod spec (no cluster:
    the client's run is intercepted at its boundary)."""
    import dagster as dg
    import dagster_k8s

    from constellation_assets.defs.resources import ShearWorkerResource

    seen = {}

    def fake_run(self, **kwargs):
        seen.update(kwargs)
        return "invocation"

    monkeypatch.setattr(dagster_k8s.PipesK8sClient, "run", fake_run)
    worker = ShearWorkerResource(
        backend="k8s", image="reg/constellation:cuda", namespace="shear", gpu_count=1
    )
    context = dg.build_asset_context()
    assert worker.run(context, args=[], extras={"manifests": ["s3://b/m/1/"]}) == "invocation"
    assert seen["image"] == "reg/constellation:cuda" and seen["namespace"] == "shear"
    assert seen["command"][1:] == ["-m", "constellation_assets.shear.worker"]
    assert seen["base_pod_spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert seen["extras"] == {"manifests": ["s3://b/m/1/"]}
