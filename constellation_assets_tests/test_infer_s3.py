"""infer_manifest with inputs and outputs on S3 (moto server on loopback): same numbers as locally."""

from pathlib import Path

import numpy as np
import yaml

from constellation_assets.catalog.schema import read_subtile_result
from constellation_assets.config import load_config
from constellation_assets.shear.infer import infer_manifest
from constellation_assets_tests.test_infer import _cfg, _two_exposure_manifest


def test_infer_manifest_on_s3(tmp_path, moto_s3):
    manifest, _ = _two_exposure_manifest(tmp_path, n_gal=4)
    local = infer_manifest(_cfg(tmp_path), str(manifest))
    t_local, _ = read_subtile_result(local.result_uri)

    bucket, client = moto_s3["bucket"], moto_s3["client"]
    m = yaml.safe_load(Path(manifest).read_text())

    def upload(path: str) -> str:
        key = "q1/VIS/" + Path(path).name if path.endswith(".fits") else "tiles/" + Path(path).name
        client.upload_file(path, bucket, key)
        return f"s3://{bucket}/{key}"

    for q in m["quadrants"]:
        for k in ("sci_path", "bkg_path", "psf_path"):
            q[k] = upload(q[k])
    m["source_catalog"] = m["sources_uri"] = upload(m["source_catalog"])
    client.put_object(Bucket=bucket, Key="manifests/m.yaml", Body=yaml.safe_dump(m).encode())
    s3 = {"endpoint_url": moto_s3["endpoint_url"], "region": "us-east-1"}
    cfg = load_config(
        {
            "data": {
                "vis_base_uri": f"s3://{bucket}/q1/VIS/",
                "catalog_base_uri": f"s3://{bucket}/q1/catalogs/",
                "s3": s3,
            },
            "output": {"root_uri": f"s3://{bucket}/out", "catalog_uri": "sqlite:///unused.db"},
            "shear": {"stamp_size_pix": 48},
        }
    )
    res = infer_manifest(cfg, f"s3://{bucket}/manifests/m.yaml")
    assert res.result_uri == f"s3://{bucket}/out/results/102044185/102044185_1_2.parquet"
    t_s3, summary = read_subtile_result(res.result_uri, cfg.storage_options(res.result_uri))
    assert summary["N_SOURCES"] == 3
    np.testing.assert_allclose(t_s3["E1"].to_numpy(), t_local["E1"].to_numpy(), rtol=1e-6)
    assert infer_manifest(cfg, f"s3://{bucket}/manifests/m.yaml").status == "skipped"
