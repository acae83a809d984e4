"""Injection runs: determinism, the seed's COSMOS formula and columns, splits, run_config, idempotency, S3."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from constellation_assets.config import load_config
from constellation_assets.provenance import RunConflictError
from constellation_assets.sim import injection as inj
from constellation_assets.sim.sources import choose_cosmos_index
from constellation_assets_tests.test_injection_field import make_tiny_field, tiny_config

SEED_KEYS = (
    "stage",
    "variant",
    "experiment_id",
    "source_mode",
    "cosmos_bank_h5",
    "cosmos_salt",
    "seed_base",
    "psf_model",
    "moffat_beta",
    "split_seed",
    "execution_timestamp_utc",
)
FAST = {"stamp_size_pix": 32, "register_catalog": False, "n_total_train_per_split": 6, "partitions": 2}


@pytest.fixture(scope="module")
def field_data(tmp_path_factory) -> dict:
    return make_tiny_field(tmp_path_factory.mktemp("field"))


def _cfg(tmp_path: Path, data: dict, out: str = "out", **kw):
    return tiny_config(tmp_path, data, **{**FAST, "output_uri": str(tmp_path / out), **kw})


def _bytes(uris):
    return [Path(u).read_bytes() for u in uris]


def write_test_bank(path: Path, n: int = 50, seed: int = 3) -> Path:
    """A small bank with every dataset the bank loader requires (single-Sersic and bulge + disk rows)."""
    from constellation_assets.sim.bank import REQUIRED_DATASETS, content_sha256

    rng = np.random.default_rng(seed)
    d = {
        "ident": np.arange(1000, 1000 + n, dtype=np.int64),
        "sersic_n": rng.uniform(0.8, 3.0, n),
        "hlr_arcsec": rng.uniform(0.15, 0.6, n),
        "q": rng.uniform(0.4, 1.0, n),
        "phi_rad": rng.uniform(0, np.pi, n),
        "flux_hst": rng.uniform(10, 100, n),
        "mag_auto": rng.uniform(21, 23.5, n),
        "model_flux_hst": rng.uniform(10, 100, n),
        "model_mag_f814w": rng.uniform(21, 23.5, n),
        "zphot": rng.uniform(0.2, 1.5, n),
        "use_bulgefit": (np.arange(n) % 3 == 0).astype(np.int8),
        "bulge_hlr_arcsec": rng.uniform(0.1, 0.3, n),
        "bulge_flux_hst": rng.uniform(1, 30, n),
        "bulge_q": rng.uniform(0.5, 1.0, n),
        "bulge_phi_rad": rng.uniform(0, np.pi, n),
        "disk_hlr_arcsec": rng.uniform(0.3, 0.7, n),
        "disk_flux_hst": rng.uniform(5, 60, n),
        "disk_q": rng.uniform(0.3, 1.0, n),
        "disk_phi_rad": rng.uniform(0, np.pi, n),
    }
    assert set(d) == set(REQUIRED_DATASETS)
    with h5py.File(path, "w") as f:
        for k, v in d.items():
            f.create_dataset(k, data=v)
        f.attrs["content_sha256"] = content_sha256(d)
        f.attrs["n_sources"] = n
    return path


# ------------------------------------------------------------------------------------------ formulas


def test_cosmos_index_is_the_seed_formula():
    for task_id in ("102044185_-1000_0", "a", "102044186_42_7"):
        for salt in ("", "gen5_v1"):
            h = hashlib.sha256((task_id + salt).encode("utf-8")).hexdigest()
            assert choose_cosmos_index(task_id, 20000, salt) == int(h[:16], 16) % 20000
    assert inj.task_seed("t_1_0", 42) == int(hashlib.sha256(b"t_1_042").hexdigest()[:16], 16)


def test_split_assignment_stable_and_per_host():
    frac = {"train": 0.8, "val": 0.1, "test": 0.1}
    ids = [f"102044185_{i}" for i in range(2000)]
    a = [inj.split_of_host(h, 99887766, frac) for h in ids]
    assert a == [inj.split_of_host(h, 99887766, frac) for h in reversed(ids)][::-1]  # order-independent
    counts = {s: a.count(s) for s in inj.SPLITS}
    assert abs(counts["train"] / 2000 - 0.8) < 0.04 and abs(counts["val"] / 2000 - 0.1) < 0.03
    b = [inj.split_of_host(h, 1, frac) for h in ids]
    assert a != b  # the seed matters
    assert {inj.split_of_host(h, 7, {"train": 0.0, "val": 1.0}) for h in ids[:50]} == {"val"}


def test_plan_keeps_each_host_in_one_split(tmp_path, field_data):
    cfg = _cfg(tmp_path, field_data, tiers=["train", "val", "test"], n_total_train_per_split=40, partitions=3)
    tasks = inj.plan_tasks(cfg)
    splits_of: dict[str, set] = {}
    for t in tasks:
        splits_of.setdefault(t.host.host_id, set()).add(t.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {t.split for t in tasks} == {"train", "val", "test"}
    assert len({t.task_id for t in tasks}) == len(tasks) == 120  # task ids unique
    for split in ("train", "val", "test"):
        shards = [t.shard for t in tasks if t.split == split]
        assert shards == sorted(shards) and set(shards) == {0, 1, 2}
    # planning twice gives the same tasks; a task's parameters depend only on its id and seed_base
    assert [t.task_id for t in inj.plan_tasks(cfg)] == [t.task_id for t in tasks]
    p1 = inj.draw_task_parameters(tasks[5], cfg)
    p2 = inj.draw_task_parameters(tasks[5], cfg)
    assert p1 == p2
    cfg2 = _cfg(tmp_path, field_data, seed_base=43)
    assert inj.draw_task_parameters(tasks[5], cfg2).theta_e_arcsec != p1.theta_e_arcsec
    for t in tasks[:20]:
        p = inj.draw_task_parameters(t, cfg)
        lo, hi = cfg.injection.theta_e_range_arcsec
        assert lo <= p.theta_e_arcsec <= hi
        assert np.hypot(
            p.source_x_arcsec - p.lens_center_x_arcsec, p.source_y_arcsec - p.lens_center_y_arcsec
        ) <= (cfg.injection.source_offset_max_frac * p.theta_e_arcsec + 1e-12)


def test_nisp_band_refused_with_reason(tmp_path, field_data):
    cfg = _cfg(tmp_path, field_data, bands=["VIS", "H"], psf_fwhm_arcsec={"VIS": 0.17, "H": 0.3})
    with pytest.raises(inj.InjectionError, match="MER mosaics"):
        inj.plan_tasks(cfg)


# ------------------------------------------------------------------------------------------ runs


def test_run_deterministic_sersic_columns_and_run_config(tmp_path, field_data):
    cfg_a = _cfg(tmp_path, field_data, "a")
    cfg_b = _cfg(tmp_path, field_data, "b")
    ra = inj.run_injection(cfg_a)
    rb = inj.run_injection(cfg_b)
    assert ra.complete and ra.n_rows == 6 and len(ra.shard_uris) == 2
    assert ra.config_hash == rb.config_hash
    assert _bytes(ra.shard_uris) == _bytes(rb.shard_uris)  # same config -> identical bytes
    assert ra.shard_uris[0].endswith("/phase4c/v1/train_stamp64/train/part-00000.parquet")

    table, images = inj.read_stamps(ra.shard_uris[0])
    assert images["VIS"].shape == (table.num_rows, 32, 32) and images["VIS"].dtype == np.float32
    rows = table.to_pylist()
    assert all(r["source_mode"] == "sersic" for r in rows)
    assert all(r["cosmos_index"] is None and r["cosmos_hlr_arcsec"] is None for r in rows)
    schema = pq.read_schema(ra.shard_uris[0])
    assert (
        str(schema.field("cosmos_index").type) == "int64"
        and str(schema.field("cosmos_hlr_arcsec").type) == "double"
    )
    assert all(r["magnification"] > 1.0 and r["arc_snr"] > 0 for r in rows)

    # run_config: written last, at the seed's path, with every seed key; loads back as the same config
    rc = Path(ra.run_config_uri)
    assert rc == tmp_path / "a" / "phase4c" / "v1" / "run_config_train_stamp64.json"
    record = json.loads(rc.read_text())
    for k in SEED_KEYS:
        assert k in record, k
    assert record["source_mode"] == "sersic" and record["seed_base"] == 42 and record["moffat_beta"] == 3.5
    assert record["config_hash"] == ra.config_hash
    assert set(record["extra"]["shard_sha256"]) == {
        "phase4c/v1/train_stamp64/train/part-00000.parquet",
        "phase4c/v1/train_stamp64/train/part-00001.parquet",
    }
    back = load_config(str(rc))
    assert back.injection == cfg_a.injection


def test_arc_flux_matches_magnification(tmp_path, field_data):
    from constellation_assets.sim.sources import flux_from_mag

    cfg = _cfg(tmp_path, field_data, stamp_size_pix=64, oversampling=4, theta_e_range_arcsec=[0.6, 0.8])
    hosts = inj.discover_hosts(cfg)
    tasks = inj.plan_tasks(cfg, hosts)[:3]
    for r in inj.render_tasks(cfg, tasks, hosts):
        expected = r.magnification * flux_from_mag(r.params.source_mag, r.zero_point_mag)
        # small arcs, 64 x 64 stamp: only the PSF wings beyond the stamp are lost
        assert abs(r.arc[0].sum() / expected - 1) < 0.02
        assert np.allclose(r.composite[0] - r.host[0], r.arc[0], atol=8 * np.sqrt(r.arc[0].max() / 3.48 + 1))
        # the cutout is the quadrant's pixels around the host (on pixel 32, 32) minus the background level
        from astropy.io import fits

        h = r.task.host
        with fits.open(h.frame_uri) as hdul:
            sci = hdul[h.hdu].data
        x0, y0 = round(h.x_pix) - 32, round(h.y_pix) - 32
        assert np.allclose(r.host[0] + r.background_adu, sci[y0 : y0 + 64, x0 : x0 + 64], atol=1e-3)
        assert abs(r.background_adu - 45.0) < 1.0  # sigma-clipped sky (no BKG frame in this field)
        assert abs(r.params.lens_center_x_arcsec - 0.1 * (h.x_pix - round(h.x_pix))) < 1e-12


def test_idempotency_refusal_and_force(tmp_path, field_data):
    cfg = _cfg(tmp_path, field_data)
    first = inj.run_injection(cfg)
    before = _bytes(first.shard_uris)
    again = inj.run_injection(cfg)
    assert again.skipped and again.config_hash == first.config_hash
    changed = _cfg(tmp_path, field_data, seed_base=7)
    with pytest.raises(RunConflictError, match="--force"):
        inj.run_injection(changed)
    assert _bytes(first.shard_uris) == before  # refused: nothing touched
    forced = inj.run_injection(_cfg(tmp_path, field_data, seed_base=7, force=True))
    assert not forced.skipped and forced.config_hash != first.config_hash
    assert _bytes(forced.shard_uris) != before
    record = json.loads(Path(forced.run_config_uri).read_text())
    assert record["seed_base"] == 7 and record["config_hash"] == forced.config_hash


def test_partitions_complete_the_run(tmp_path, field_data):
    cfg = _cfg(tmp_path, field_data)
    assert inj.partition_keys(cfg) == ["train/00000", "train/00001"]
    r1 = inj.run_injection(cfg, partitions=["train/00001"])
    assert not r1.complete and r1.run_config_uri is None
    assert not Path(inj.run_config_uri_of(cfg)).exists()
    r2 = inj.run_injection(cfg, partitions=[("train", 0)])
    assert r2.complete and Path(r2.run_config_uri).exists()
    full = inj.run_injection(_cfg(tmp_path, field_data, "full"))
    assert _bytes([inj.shard_uri(cfg, "train", k) for k in (0, 1)]) == _bytes(full.shard_uris)


def test_cosmos_mode_seed_columns_and_salt(tmp_path, field_data):
    bank = write_test_bank(tmp_path / "bank.h5")
    cfg = _cfg(
        tmp_path, field_data, "c1", source_mode="cosmos", cosmos_bank_h5=str(bank), cosmos_salt="gen5_v1"
    )
    res = inj.run_injection(cfg)
    rows = (
        inj.read_stamps(res.shard_uris[0])[0].to_pylist() + inj.read_stamps(res.shard_uris[1])[0].to_pylist()
    )
    with h5py.File(bank) as f:
        hlr = f["hlr_arcsec"][()]
    for r in rows:
        assert r["source_mode"] == "cosmos"
        assert r["cosmos_index"] == choose_cosmos_index(r["task_id"], 50, "gen5_v1")
        # the template's own radius in its column; cosmos_hlr_arcsec is measured on the rendered lensed arc
        assert r["cosmos_template_hlr_arcsec"] == pytest.approx(hlr[r["cosmos_index"]])
        assert r["source_hlr_arcsec"] == r["cosmos_template_hlr_arcsec"]
        assert r["cosmos_hlr_arcsec"] > 0 and r["cosmos_hlr_arcsec"] != r["cosmos_template_hlr_arcsec"]
    # the measured radius is the one of the noiseless arc the run rendered for that task
    single, _ = inj.render_single(cfg, rows[0]["task_id"])
    assert rows[0]["cosmos_hlr_arcsec"] == inj.render.arc_half_light_radius_arcsec(single.arc[0], 0.1)
    summary = inj.task_summary(single)
    assert summary["source_n"] is None and summary["source_q"] is None  # Sersic draws unused in cosmos mode
    assert summary["cosmos_hlr_arcsec"] == rows[0]["cosmos_hlr_arcsec"]
    record = json.loads(Path(res.run_config_uri).read_text())
    assert record["cosmos_salt"] == "gen5_v1" and record["cosmos_bank_h5"] == str(bank)
    assert record["extra"]["cosmos_bank_content_hash"]
    cfg2 = _cfg(
        tmp_path, field_data, "c2", source_mode="cosmos", cosmos_bank_h5=str(bank), cosmos_salt="other"
    )
    tasks = inj.plan_tasks(cfg2)
    idx1 = [choose_cosmos_index(t.task_id, 50, "gen5_v1") for t in tasks]
    idx2 = [inj.draw_task_parameters(t, cfg2, 50).cosmos_index for t in tasks]
    assert idx1 != idx2  # a different salt picks different templates for the same tasks
    assert [r["cosmos_index"] for r in rows] == idx1


def test_iceberg_registration_idempotent(tmp_path, field_data):
    from constellation_assets.catalog.tables import open_catalog

    cfg = _cfg(tmp_path, field_data, register_catalog=True)
    res = inj.run_injection(cfg)
    assert res.n_registered == 6
    inj.run_injection(_cfg(tmp_path, field_data, register_catalog=True, force=True))
    t = open_catalog(cfg).load_table(("sim", "injections")).scan().to_arrow()
    assert t.num_rows == 6  # forced re-run replaced its rows
    assert set(t.column("shard_uri").to_pylist()) == set(res.shard_uris)
    assert "image_VIS" not in t.column_names and t.column("cosmos_index").null_count == 6


@pytest.mark.integration
def test_s3_output_and_reproduce_on_moto(tmp_path, field_data, moto_s3):
    bucket = moto_s3["bucket"]
    out = f"s3://{bucket}/phase4"
    cfg = tiny_config(
        tmp_path,
        field_data,
        **{**FAST, "output_uri": out, "n_total_train_per_split": 4},
    )
    cfg.data.s3.endpoint_url = moto_s3["endpoint_url"]
    so = cfg.storage_options(out)
    res = inj.run_injection(cfg)
    assert res.run_config_uri == f"{out}/phase4c/v1/run_config_train_stamp64.json"
    keys = {o["Key"] for o in moto_s3["client"].list_objects_v2(Bucket=bucket)["Contents"]}
    assert "phase4/phase4c/v1/train_stamp64/train/part-00000.parquet" in keys
    assert not [k for k in keys if "tmp" in k]
    table, images = inj.read_stamps(res.shard_uris[0], so)
    assert images["VIS"].shape[1:] == (32, 32)
    rep = inj.reproduce(res.run_config_uri, f"s3://{bucket}/repro", force=True, storage_options=so)
    assert rep.identical, (rep.mismatched, rep.missing)


def test_injection_hash_ignores_unrelated_sections():
    """An injection run's outputs do not depend on the shear settings: changing them must not refuse a re-run."""
    from constellation_assets.config import load_config
    from constellation_assets.provenance import config_hash
    from constellation_assets.sim.injection import INJECTION_HASH_SECTIONS

    a = load_config({"variant": "v1"})
    b = load_config({"variant": "v1", "shear": {"snr_min": 7.0}, "calibration": {"n_galaxies": 10}})
    c = load_config({"variant": "v1", "injection": {"seed_base": 7}})
    assert config_hash(a, {}, INJECTION_HASH_SECTIONS) == config_hash(b, {}, INJECTION_HASH_SECTIONS)
    assert config_hash(a, {}, INJECTION_HASH_SECTIONS) != config_hash(c, {}, INJECTION_HASH_SECTIONS)
    assert config_hash(a) != config_hash(b)  # the whole-config hash still sees them


def test_arc_half_light_radius_against_a_gaussian():
    """Circular Gaussian of sigma s: half of the flux lies within s * sqrt(2 ln 2)."""
    from constellation_assets.sim.injection.render import arc_half_light_radius_arcsec

    yy, xx = np.mgrid[0:128, 0:128]
    for sigma_pix in (3.0, 6.0):
        img = np.exp(-0.5 * ((xx - 63.3) ** 2 + (yy - 64.6) ** 2) / sigma_pix**2)
        want = sigma_pix * np.sqrt(2 * np.log(2)) * 0.1
        assert arc_half_light_radius_arcsec(img, 0.1) == pytest.approx(want, rel=0.02)
    # a ring of radius 20 px and width ~1 px: the radius about its centroid is ~20 px
    ring = np.exp(-0.5 * (np.hypot(xx - 64, yy - 64) - 20.0) ** 2)
    assert arc_half_light_radius_arcsec(ring, 0.1) == pytest.approx(2.0, rel=0.03)
