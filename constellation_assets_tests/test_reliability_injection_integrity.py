"""Injection outputs are verified, not assumed: damaged shards, concurrent writers, Iceberg rows vs files, records.

Each test reproduces a failure that used to pass silently (a truncated shard certified as complete, two runs
into one location, Iceberg rows of deleted shards, a run record that only worked from one directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from constellation_assets.cli import main
from constellation_assets.io.lease import Lease, lease_uri
from constellation_assets.sim import injection as inj
from constellation_assets_tests.test_injection_field import make_tiny_field, tiny_config

FAST = {"stamp_size_pix": 32, "register_catalog": False, "n_total_train_per_split": 6, "partitions": 2}
RC = "phase4c/v1/run_config_train_stamp64.json"


@pytest.fixture(scope="module")
def field_data(tmp_path_factory) -> dict:
    return make_tiny_field(tmp_path_factory.mktemp("field"))


def _cfg(tmp_path: Path, data: dict, out: str = "out", **kw):
    return tiny_config(tmp_path, data, **{**FAST, "output_uri": str(tmp_path / out), **kw})


def _config_file(tmp_path: Path, data: dict, **injection) -> str:
    p = tmp_path / "conf.json"
    p.write_text(
        json.dumps(
            {
                "tile_ids": [102044185],
                "data": {"vis_base_uri": data["vis_base_uri"], "catalog_base_uri": data["catalog_base_uri"]},
                "output": {"root_uri": str(tmp_path / "root")},
                "injection": {**FAST, "oversampling": 2, **injection},
            }
        )
    )
    return str(p)


def test_truncated_shard_is_an_error_everywhere(tmp_path, field_data):
    cfg = _cfg(tmp_path, field_data)
    res = inj.run_injection(cfg)
    shard = Path(res.shard_uris[0])
    good = shard.read_bytes()
    shard.write_bytes(good[:1000])

    # inject no longer says "Already complete": the shard is hashed against the record
    with pytest.raises(inj.InjectionError) as ei:
        inj.run_injection(cfg)
    assert str(shard) in str(ei.value) and "--force" in str(ei.value)

    runner = CliRunner()
    rc = str(tmp_path / "out" / RC)
    rep = runner.invoke(main, ["reproduce", rc, "--output", str(tmp_path / "out")])
    assert rep.exit_code == 1, rep.output
    assert (
        str(shard) in rep.output and "re-rendered in memory" in rep.output and "Traceback" not in rep.output
    )

    conf = _config_file(tmp_path, field_data, output_uri=str(tmp_path / "out"))
    pre = runner.invoke(main, ["preflight", "--config", conf])
    assert pre.exit_code == 1 and str(shard) in pre.output

    # the named fix works: --force re-renders byte-identical shards
    inj.run_injection(_cfg(tmp_path, field_data, force=True))
    assert shard.read_bytes() == good
    assert inj.run_injection(cfg).skipped


def test_damaged_shard_without_record_is_rendered_again(tmp_path, field_data):
    cfg = _cfg(tmp_path, field_data)
    res = inj.run_injection(cfg)
    good = [Path(u).read_bytes() for u in res.shard_uris]
    (tmp_path / "out" / RC).unlink()  # an interrupted run: shards, no record
    Path(res.shard_uris[1]).write_bytes(good[1][:-50])
    again = inj.run_injection(cfg)
    assert again.complete and [Path(u).read_bytes() for u in again.shard_uris] == good


def test_reproduce_in_place_rerenders_instead_of_comparing_the_record_with_itself(tmp_path, field_data):
    a = inj.run_injection(_cfg(tmp_path, field_data, "a"))
    b = inj.run_injection(_cfg(tmp_path, field_data, "b", seed_base=43))
    # the location's record and file agree with each other, but hold another run's stamps
    rel = sorted(a.shard_sha256)[0]
    (tmp_path / "a" / rel).write_bytes((tmp_path / "b" / rel).read_bytes())
    rec_path = tmp_path / "a" / RC
    rec = json.loads(rec_path.read_text())
    rec["extra"]["shard_sha256"][rel] = b.shard_sha256[rel]
    rec_path.write_text(json.dumps(rec))
    rep = inj.reproduce(str(rec_path), str(tmp_path / "a"))
    assert rep.rerendered_in_place and not rep.identical and rep.mismatched == [rel]
    # an untouched run reproduces in place without writing anything
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("*.parquet")}
    ok = inj.reproduce(str(tmp_path / "b" / RC), str(tmp_path / "b"))
    assert ok.identical and not ok.damaged_files
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("*.parquet")}


def test_second_writer_is_refused_while_a_run_holds_the_location(tmp_path, field_data):
    conf = _config_file(tmp_path, field_data, output_uri=str(tmp_path / "out"))
    held = Lease(lease_uri(str(tmp_path / "out" / "phase4c" / "v1"), "train_stamp64"), timeout_s=60).acquire()
    try:
        res = CliRunner().invoke(main, ["inject", "--config", conf])
    finally:
        held.release()
    assert res.exit_code == 1
    assert "another run is writing" in res.output and f"pid {os.getpid()}" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out" / RC).exists()


def test_concurrent_runs_leave_a_consistent_location(tmp_path, field_data):
    """Two processes, seed 42 and 43, one location: one wins; what is recorded is what the files hold."""
    out = tmp_path / "out"
    procs = []
    for seed in (42, 43):
        d = tmp_path / f"c{seed}"
        d.mkdir()
        conf = _config_file(d, field_data, output_uri=str(out), seed_base=seed, register_catalog=True)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "constellation_assets.cli", "inject", "--config", conf],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=180)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outs
    loser = outs[codes.index(1)]
    assert "Traceback" not in loser and ("another run is writing" in loser or "--force" in loser), loser
    rec = json.loads((out / RC).read_text())
    assert rec["status"] == "complete"
    winner_seed = rec["seed_base"]
    for rel, sha in rec["extra"]["shard_sha256"].items():
        chk = inj.shards.inspect_shard(str(out / rel), None)
        assert chk.problem is None and chk.sha256 == sha and chk.config_hash == rec["config_hash"]
    # the Iceberg rows describe the files; reproduce in place re-renders the recorded run byte-identically
    cfg = inj.load_run_config(str(out / RC))[0]
    by = inj.run._by_shard(inj.plan_tasks(cfg))
    expect = inj.run._expected_for_check(cfg, by, rec["extra"]["shard_sha256"], rec["config_hash"])
    assert inj.shards.check_registration(cfg, expect) == []
    assert inj.reproduce(str(out / RC), str(out)).identical
    assert winner_seed in (42, 43)


def test_force_with_fewer_shards_replaces_the_runs_iceberg_rows(tmp_path, field_data):
    from constellation_assets.catalog.tables import open_catalog

    cfg3 = _cfg(tmp_path, field_data, register_catalog=True, partitions=3)
    r3 = inj.run_injection(cfg3)
    assert len(r3.shard_uris) == 3
    cfg2 = _cfg(tmp_path, field_data, register_catalog=True, partitions=2, force=True)
    r2 = inj.run_injection(cfg2)
    t = open_catalog(cfg2).load_table(("sim", "injections")).scan().to_arrow()
    assert set(t.column("shard_uri").to_pylist()) == set(r2.shard_uris)
    assert all(Path(u).exists() for u in t.column("shard_uri").to_pylist())
    assert not Path(r3.shard_uris[2]).exists()
    rcfg = inj.run.resolved_config(cfg2)
    by = inj.run._by_shard(inj.plan_tasks(rcfg))
    expect = inj.run._expected_for_check(rcfg, by, r2.shard_sha256, r2.config_hash)
    assert inj.shards.check_registration(rcfg, expect) == []
    # the check can fail: a shard overwritten behind the table's back is reported
    Path(r2.shard_uris[0]).write_bytes(Path(r2.shard_uris[1]).read_bytes())
    chk = inj.shards.inspect_shard(r2.shard_uris[0], None)
    expect[r2.shard_uris[0]] = {
        "sha256": chk.sha256,
        "task_ids": chk.task_ids,
        "config_hash": chk.config_hash,
    }
    diff = inj.shards.check_registration(rcfg, expect)
    assert any(r2.shard_uris[0] in d for d in diff)


def test_run_record_started_failed_and_absolute(tmp_path, field_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel_data = {
        "vis_base_uri": os.path.relpath(field_data["vis_base_uri"], tmp_path) + "/",
        "catalog_base_uri": os.path.relpath(field_data["catalog_base_uri"], tmp_path) + "/",
    }
    cfg = tiny_config(Path("."), rel_data, **{**FAST, "output_uri": "rel_out"})

    calls = {"n": 0}
    real = inj.run.render_tasks

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("render failed on purpose")
        return real(*a, **k)

    monkeypatch.setattr(inj.run, "render_tasks", failing)
    with pytest.raises(RuntimeError):
        inj.run_injection(cfg)
    rec = json.loads((tmp_path / "rel_out" / RC).read_text())
    assert rec["status"] == "failed" and "render failed on purpose" in rec["error"]
    monkeypatch.setattr(inj.run, "render_tasks", real)
    with pytest.raises(inj.InjectionError, match="did not complete"):
        inj.reproduce(str(tmp_path / "rel_out" / RC), str(tmp_path / "x"))

    res = inj.run_injection(cfg)  # resumes: the shard written before the failure is verified and kept
    rec = json.loads(Path(res.run_config_uri).read_text())
    assert rec["status"] == "complete"
    for value in (
        rec["data"]["vis_base_uri"],
        rec["data"]["catalog_base_uri"],
        rec["injection"]["output_uri"],
    ):
        assert os.path.isabs(value), value
    # reproducible from another working directory
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    rep = inj.reproduce(res.run_config_uri, str(tmp_path / "repro"))
    assert rep.identical


def test_bank_edited_in_place_is_refused(tmp_path):
    import h5py

    from constellation_assets.sim.bank import CosmosBankError, load_cosmos_bank
    from constellation_assets_tests.test_injection import write_test_bank

    bank = write_test_bank(tmp_path / "bank.h5")
    assert load_cosmos_bank(str(bank)).n_sources == 50
    with h5py.File(bank, "r+") as f:
        f["hlr_arcsec"][3] = 0.42  # edited in place: attrs still carry the old digest
    with pytest.raises(CosmosBankError, match="modified or damaged"):
        load_cosmos_bank(str(bank))
    raw = bytearray(bank.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\xff" * 64  # flipped bytes
    (tmp_path / "flipped.h5").write_bytes(bytes(raw))
    with pytest.raises(CosmosBankError):
        load_cosmos_bank(str(tmp_path / "flipped.h5"))


def test_unsafe_variant_and_empty_experiment_id_are_usage_errors(tmp_path, field_data):
    conf = _config_file(tmp_path, field_data, output_uri=str(tmp_path / "out"))
    for flag, value in (("--variant", "../../x"), ("--experiment-id", "")):
        res = CliRunner().invoke(main, ["inject", "--config", conf, flag, value])
        assert res.exit_code == 2, res.output
        assert f"{flag} (" in res.output and "path segment" in res.output
    assert not (tmp_path / "x").exists() and not list(tmp_path.rglob("run_config_.json"))


def _two_frame_field(root: Path) -> tuple[dict, Path]:
    """The tiny field plus a second exposure (another observation, same pointing): returns (data, its DET)."""
    import shutil

    data = make_tiny_field(root)
    vis = Path(data["vis_base_uri"])
    det = next((vis / "2689").glob("EUC_VIS_SWL-DET-*.fits"))
    (vis / "2690").mkdir()
    second = vis / "2690" / det.name.replace("-002689-", "-002690-")
    shutil.copy(det, second)
    return data, second


def test_truncated_det_frame_is_an_error_or_a_recorded_exclusion(tmp_path):
    data, second = _two_frame_field(tmp_path / "data")
    raw = second.read_bytes()
    second.write_bytes(raw[: len(raw) // 2])
    cfg = _cfg(tmp_path, data)
    with pytest.raises(inj.InjectionError) as ei:
        inj.run_injection(cfg)
    assert str(second) in str(ei.value) and "exclude_damaged_frames" in str(ei.value)

    res = CliRunner().invoke(
        main, ["inject", "--config", _config_file(tmp_path, data, output_uri=str(tmp_path / "o"))]
    )
    assert res.exit_code == 1 and str(second) in res.output and "Traceback" not in res.output

    ok = inj.run_injection(_cfg(tmp_path, data, exclude_damaged_frames=True))
    assert ok.complete and list(ok.excluded_frames) == [str(second)]
    rec = json.loads(Path(ok.run_config_uri).read_text())
    assert str(second) in rec["extra"]["excluded_frames"]
    import pyarrow.parquet as pq

    meta = pq.read_schema(ok.shard_uris[0]).metadata
    assert str(second) in json.loads(meta[b"constellation.excluded_frames"])


def test_det_frame_missing_a_sci_extension_is_named(tmp_path):
    from astropy.io import fits

    data, second = _two_frame_field(tmp_path / "data")
    with fits.open(second) as hdul:
        kept = [h.copy() for h in hdul if h.header.get("EXTNAME") != "3-4.F.SCI"]
    fits.HDUList(kept).writeto(second, overwrite=True)
    with pytest.raises(inj.InjectionError) as ei:
        inj.run_injection(_cfg(tmp_path, data))
    msg = str(ei.value)
    assert str(second) in msg and "3-4.F" in msg and "SCI" in msg


def test_preflight_checks_free_space_against_its_estimate(tmp_path, field_data, monkeypatch):
    import collections
    import importlib

    from constellation_assets.sim.injection.preflight import FREE_SPACE_MARGIN

    mod = importlib.import_module(
        "constellation_assets.sim.injection.preflight"
    )  # the module, not the function
    cfg = _cfg(tmp_path, field_data)
    rep = inj.preflight(cfg)
    assert rep.ok, rep.problems
    need = rep.info["estimated_output_bytes"] * FREE_SPACE_MARGIN
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9, int(need) - 1))
    rep = inj.preflight(cfg)
    assert any("MB free" in p and "--output" in p for p in rep.problems), rep.problems


def test_flagged_pixels_are_counted_and_left_out_of_the_noise(tmp_path):
    """FLG pixels with a FLG_MASK_BITS bit (here: saturated, with a huge RMS) do not enter the noise sigma."""
    import pyarrow.parquet as pq
    from astropy.io import fits

    from constellation_assets.euclid import FLG_MASK_BITS, FLG_QUADEDGE, FLG_SAT

    data = make_tiny_field(tmp_path / "data")
    clean = inj.run_injection(_cfg(tmp_path, data, "clean"))
    before = pq.read_table(clean.shard_uris[0]).to_pylist()
    det = next(Path(data["vis_base_uri"]).rglob("EUC_VIS_SWL-DET-*.fits"))
    row = before[0]
    x0, y0 = round(row["host_x_pix"]) - 16, round(row["host_y_pix"]) - 16
    with fits.open(det) as hdul:
        hdus = [h.copy() for h in hdul]
    for h in hdus:
        name = h.header.get("EXTNAME", "")
        if name == row["host_hdu"].replace(".SCI", ".FLG"):
            h.data[y0 : y0 + 5, x0 : x0 + 8] = FLG_SAT  # 40 masked pixels
            h.data[y0 + 20, x0 : x0 + 32] = FLG_QUADEDGE  # informational: not masked
        if name == row["host_hdu"].replace(".SCI", ".RMS"):
            h.data[y0 : y0 + 16, x0 : x0 + 32] = 1e6  # half the stamp, the 40 masked pixels among them
    fits.HDUList(hdus).writeto(det, overwrite=True)
    assert FLG_SAT & FLG_MASK_BITS and not FLG_QUADEDGE & FLG_MASK_BITS
    after = pq.read_table(inj.run_injection(_cfg(tmp_path, data, "flagged")).shard_uris[0]).to_pylist()[0]
    assert before[0]["host_flagged_pix"] == 0 and after["host_flagged_pix"] == 40
    # without the mask the median RMS would sit between sigma and 1e6 (512 of 1024 pixels each); with it,
    # 472 large against 512 small values: the median is the clean sigma
    assert after["noise_sigma_adu"] == pytest.approx(before[0]["noise_sigma_adu"])


@pytest.mark.integration
def test_concurrent_runs_on_s3_one_writer(tmp_path, field_data, moto_s3):
    """The same race on S3 (moto): the lease is a conditional PutObject (If-None-Match: *)."""
    bucket, client = moto_s3["bucket"], moto_s3["client"]
    out = f"s3://{bucket}/runs"
    procs = []
    for seed in (42, 43):
        d = tmp_path / f"c{seed}"
        d.mkdir()
        conf = json.loads(Path(_config_file(d, field_data, output_uri=out, seed_base=seed)).read_text())
        conf["data"]["s3"] = {"endpoint_url": moto_s3["endpoint_url"]}
        (d / "conf.json").write_text(json.dumps(conf))
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "constellation_assets.cli",
                    "inject",
                    "--config",
                    str(d / "conf.json"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=180)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outs
    loser = outs[codes.index(1)]
    assert "Traceback" not in loser and ("another run is writing" in loser or "--force" in loser), loser
    rec = json.loads(client.get_object(Bucket=bucket, Key=f"runs/{RC}")["Body"].read())
    assert rec["status"] == "complete"
    so = moto_s3["storage_options"]
    for rel, sha in rec["extra"]["shard_sha256"].items():
        chk = inj.shards.inspect_shard(f"{out}/{rel}", so)
        assert chk.sha256 == sha and chk.config_hash == rec["config_hash"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not [k for k in keys if ".lease_" in k]  # released
