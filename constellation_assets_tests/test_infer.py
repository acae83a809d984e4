"""infer_manifest on a manifest written here: multi-exposure combination, result file, idempotency,
and the external-engine path (a tiny script that writes a valid result)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from constellation_assets.catalog.schema import SOURCE_RESULT_SCHEMA, read_subtile_result
from constellation_assets.config import load_config
from constellation_assets.shear import measure_stamps
from constellation_assets.shear import stamps as st
from constellation_assets.shear.fpfs import MOMENT_NAMES
from constellation_assets.shear.infer import ExternalEngineError, infer_manifest, result_uri_for
from constellation_assets_tests import test_stamps_synth as syn

HERE = Path(__file__).resolve().parent
N_GAL = 9
G_TRUE = (0.03, -0.02)


def _data(tmp_path):
    """Data roots of the test config: manifests may only point below them (or the output root)."""
    return {
        "vis_base_uri": str(tmp_path / "q1" / "VIS"),
        "catalog_base_uri": str(tmp_path / "q1" / "catalogs"),
    }


def _two_exposure_manifest(tmp_path: Path, n_gal: int = N_GAL):
    """Same galaxies seen by two dithered exposures (the second 2x noisier, one galaxy's centre masked)."""
    h0 = syn.wcs_header(pa_deg=0.0)
    ra, dec, x, y = syn.galaxy_positions(n_gal, h0, seed=21, margin=28)
    rng = np.random.Generator(np.random.PCG64(5))
    ang = rng.uniform(0, np.pi, n_gal)
    eint = 0.2
    gals = []
    for r, d, a in zip(ra, dec, ang, strict=True):
        gals.append((r, d, 30000.0, 0.17, eint * np.cos(2 * a) + G_TRUE[0], eint * np.sin(2 * a) + G_TRUE[1]))
    a0 = syn.render_quadrant(h0, gals, noise_sigma=2.0, seed=1)
    h1 = syn.wcs_header(pa_deg=0.0, crpix=(syn.NQ / 2 + 3.37, syn.NQ / 2 - 2.61))  # dither
    sci, rms, flg, bkg, hh = syn.render_quadrant(h1, gals, noise_sigma=4.0, seed=2)
    from astropy.wcs import WCS

    xm, ym = WCS(hh).all_world2pix(ra[:1], dec[:1], 0)
    flg[int(round(ym[0])), int(round(xm[0]))] = 1 << 1  # hot pixel on galaxy 0 in exposure 2
    q0 = syn.write_exposure(tmp_path / "vis" / "1", 1, 0, a0)
    q1 = syn.write_exposure(tmp_path / "vis" / "1", 1, 1, (sci, rms, flg, bkg, hh))
    core = np.arange(n_gal) != n_gal - 1  # last galaxy in the margin
    return syn.write_manifest(tmp_path / "manifests", [q0, q1], ra, dec, core_mask=core), gals


def _cfg(tmp_path, **extra):
    d = {
        "data": _data(tmp_path),
        "output": {"root_uri": str(tmp_path / "out")},
        "shear": {"stamp_size_pix": 48},
        "compute": {"batch_size": 5},
    }
    d.update(extra)
    return load_config(d)


def test_infer_manifest_two_exposures(tmp_path):
    manifest, gals = _two_exposure_manifest(tmp_path)
    cfg = _cfg(tmp_path)
    res = infer_manifest(cfg, str(manifest))
    assert res.status == "written" and res.device == "cpu"
    assert res.result_uri == result_uri_for(cfg, 102044185, 1, 2)
    assert res.result_uri.endswith("102044185/102044185_1_2.parquet")
    assert res.n_sources == N_GAL and res.n_core == N_GAL - 1
    assert res.n_stamps == 2 * N_GAL - 1  # galaxy 0's second exposure is rejected (masked centre)
    assert res.peak_rss_mb > 0 and res.seconds > 0
    table, summary = read_subtile_result(res.result_uri)
    assert table.schema.equals(SOURCE_RESULT_SCHEMA, check_metadata=False)
    n_exp = table["N_EXPOSURES"].to_numpy()
    assert n_exp[0] == 1 and np.all(n_exp[1:] == 2)
    assert np.all(table["FLAGS"].to_numpy() == 0) and np.all(table["WEIGHT"].to_numpy() == 1)
    assert table["IN_CORE"].to_numpy(zero_copy_only=False).tolist() == [True] * (N_GAL - 1) + [False]
    assert summary["N_SOURCES"] == N_GAL - 1 and summary["METHOD"] == "fpfs"
    assert summary["CONVERGENCE"] == 1.0 and summary["config_hash"] == res.config_hash
    assert np.isfinite(summary["G1_ERR"]) and summary["G1_ERR"] > 0

    # Per-source e is the ratio of the inverse-variance combined sky-frame moments of the two exposures.
    manifest_d = __import__("yaml").safe_load(Path(manifest).read_text())
    sources, _ = st.sources_from_manifest(manifest_d)
    per = []
    for entry in manifest_d["quadrants"]:
        s = st.quadrant_stamps(st.read_quadrant_images(entry), sources, 48)
        m = measure_stamps(
            s.images, s.psf, noise_sigma=s.noise_sigma, offsets_pix=s.offsets_pix, return_moments=True,
            return_covariance=True,
        )  # fmt: skip
        mom = np.stack([m[k] for k in MOMENT_NAMES], axis=1)
        mom, cov = st.moments_to_sky_frame(mom, m["cov"], st.sky_frame_transform(s.jacobian))
        per.append((s, m, mom, cov))
    (s0, m0, x0, c0), (s1, m1, x1, c1) = per
    a0 = 1.0 / c0[:, 0, 0]
    a1 = 1.0 / c1[:, 0, 0]
    # Exposure 2 is twice as noisy: inverse-variance weights ~ 4:1.
    assert np.median(a0 / a1) == pytest.approx(4.0, rel=0.05)
    use1 = s1.reject == 0
    x = (a0[1:, None] * x0[1:] + a1[1:, None] * x1[1:]) / (a0[1:] + a1[1:])[:, None]
    sigma = 1.0 / np.sqrt(a0[1:] + a1[1:])
    e_exp = -x[:, 1] / (x[:, 0] + 4.0 * sigma)
    np.testing.assert_allclose(table["E1"].to_numpy()[1:], e_exp, rtol=1e-5, atol=1e-7)
    assert not use1[0]
    assert table["E1"].to_numpy()[0] == pytest.approx(-x0[0, 1] / (x0[0, 0] + 4.0 / np.sqrt(a0[0])), rel=1e-5)
    np.testing.assert_allclose(table["SNR"].to_numpy()[1:], x[:, 0] / sigma, rtol=1e-5)
    snr = table["SNR"].to_numpy()
    assert np.all(snr[1:] > np.maximum(m0["snr"][1:], m1["snr"][1:]))

    # Idempotent: same config + manifest -> skipped, file untouched; force -> rewritten.
    mtime = Path(res.result_uri).stat().st_mtime_ns
    again = infer_manifest(cfg, str(manifest))
    assert again.status == "skipped" and Path(res.result_uri).stat().st_mtime_ns == mtime
    assert again.g1 == pytest.approx(res.g1)
    forced = infer_manifest(cfg, str(manifest), force=True, batch_size=1000)
    assert forced.status == "written"
    # Batch size does not change the numbers.
    t2, _ = read_subtile_result(res.result_uri)
    np.testing.assert_allclose(t2["E1"].to_numpy(), table["E1"].to_numpy(), rtol=1e-6, atol=1e-7)
    # A different config recomputes.
    cfg2 = _cfg(tmp_path, shear={"stamp_size_pix": 40})
    assert infer_manifest(cfg2, str(manifest)).status == "written"


def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    manifest, _ = _two_exposure_manifest(tmp_path, n_gal=1)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        infer_manifest(_cfg(tmp_path), str(manifest), device="cuda")


def _external_cfg(tmp_path, mode="ok", **inf):
    cmd = [sys.executable, str(HERE / "test_infer_external_engine.py"), "--manifest", "{manifest_local}",
           "--output", "{output}", "--config", "{config}", "--device", "{device}", "--mode", mode]  # fmt: skip
    return _cfg(tmp_path, inference={"engine": "external", "command": cmd, "method": "SHINE-test", **inf})


def test_external_engine(tmp_path, caplog):
    manifest, _ = _two_exposure_manifest(tmp_path, n_gal=4)
    cfg = _external_cfg(tmp_path)
    with caplog.at_level("INFO"):
        res = infer_manifest(cfg, str(manifest))
    assert res.engine == "external" and res.method == "SHINE-test" and res.status == "written"
    table, summary = read_subtile_result(res.result_uri)
    assert table.num_rows == 4 and summary["METHOD"] == "SHINE-test"
    assert summary["config_hash"] == res.config_hash and summary["run_id"] == res.run_id
    # The script's summary values are kept; its stdout reached our log.
    assert summary["CONVERGENCE"] == pytest.approx(1.01)
    assert any("external test engine wrote 4 rows" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(table["E1"].to_numpy(), 0.01 * np.arange(4), atol=1e-7)
    assert infer_manifest(cfg, str(manifest)).status == "skipped"


def test_external_engine_failures(tmp_path):
    manifest, _ = _two_exposure_manifest(tmp_path, n_gal=2)
    with pytest.raises(ExternalEngineError, match="exited with status 3"):
        infer_manifest(_external_cfg(tmp_path, "fail"), str(manifest))
    with pytest.raises(ExternalEngineError, match="missing column"):
        infer_manifest(_external_cfg(tmp_path, "badschema"), str(manifest))
    with pytest.raises(ExternalEngineError, match="wrote no result"):
        infer_manifest(_external_cfg(tmp_path, "nooutput"), str(manifest))
    assert not Path(result_uri_for(_cfg(tmp_path), 102044185, 1, 2)).exists()  # nothing partial


def test_cli_infer(tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from constellation_assets.cli import main

    manifest, _ = _two_exposure_manifest(tmp_path, n_gal=2)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "data": _data(tmp_path),
                "output": {"root_uri": str(tmp_path / "out")},
                "shear": {"stamp_size_pix": 48},
            }
        )
    )
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["infer", "--config", str(cfg_path), str(manifest), "--device", "cpu", "--batch-size", "3", "--json"],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.output.splitlines() if x.startswith("{")]
    assert rows[0]["status"] == "written" and rows[0]["n_sources"] == 2
    res = runner.invoke(main, ["infer", "--config", str(cfg_path), str(manifest)])
    assert res.exit_code == 0 and "skipped" in res.output
    res = runner.invoke(main, ["infer", "--config", str(cfg_path), str(tmp_path / "missing.yaml")])
    assert res.exit_code == 1
