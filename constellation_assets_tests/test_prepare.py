"""Prepare stage: manifests per sub-tile, completeness of the core partition, idempotency, validation,
and the real-data config (configs/q1_edff.yaml) against a moto bucket with the Q1 key layout."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from constellation_assets.config import load_config
from constellation_assets.io.mer_catalog import read_mer_catalog, shear_selection
from constellation_assets.prepare import ManifestError, load_manifest, prepare, prepare_tile
from constellation_assets.sky.tiles import mer_tile
from constellation_assets.synthetic import simulate_field
from constellation_assets_tests.q1_testdata import TILE, small_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    cfg = small_config(root, inference={"engine": "shine", "n_steps": 3}, gal={"model": "sersic"})
    simulate_field(cfg)
    (res,) = prepare(cfg, progress=False)
    return cfg, res, root


def test_manifests_schema_and_content(prepared):
    cfg, res, _ = prepared
    assert len(res.manifest_uris) == 16 and not res.skipped
    # 8 quadrants x 2 dithers x (nominal + short exposure), all inside the tile's extended area
    assert res.n_quadrants == 32
    manifests = [load_manifest(u, cfg=cfg) for u in res.manifest_uris]
    for m, u in zip(manifests, res.manifest_uris, strict=True):
        assert Path(u).name == f"{TILE}_{m['sub_tile_row']}_{m['sub_tile_col']}.yaml"
        assert Path(u).parent == Path(cfg.output.manifests) / str(TILE)
        assert set(m["sky_bounds"]) == {"core_ra", "core_dec", "extended_ra", "extended_dec"}
        assert m["source_catalog"] == res.catalog_uri and m["source_catalog"].endswith(".fits")
        assert m["source_catalogs"][0] == res.catalog_uri and m["sources_uri"] == res.sources_uri
        assert m["manifest_version"] == 2
        assert m["inference"] == {"engine": "shine", "n_steps": 3} and m["gal"] == {"model": "sersic"}
        for q in m["quadrants"]:
            for k in ("sci_path", "bkg_path", "wgt_path", "psf_path", "quadrant", "obs_id", "dither", "ccd"):
                assert isinstance(q[k], str) and q[k]
            assert q["quadrant"] == f"{q['ccd']}.{q['quadrant'][-1]}" == q["det_id"]
            assert q["sci_hdu"] == f"{q['quadrant']}.SCI" and q["sci_data_size"] > 0
            assert q["exposure"] in (1, 2)
        assert {q["exposure"] for q in m["quadrants"]} in (set(), {1, 2})
    with_sources = [m for m in manifests if m["core_source_ids"]]
    assert with_sources and all(m["quadrants"] for m in with_sources)


def test_every_core_source_in_exactly_one_manifest(prepared):
    cfg, res, _ = prepared
    sources = pq.read_table(res.sources_uri)
    core = set(sources.filter(sources.column("IN_CORE")).column("OBJECT_ID").to_pylist())
    seen: list[int] = []
    for u in res.manifest_uris:
        m = load_manifest(u)
        seen += m["core_source_ids"]
        assert set(m["core_source_ids"]) <= set(m["source_ids"])
    assert len(seen) == len(set(seen)) and set(seen) == core and len(core) == res.n_core
    # Shear-grade selection: exactly the catalog rows passing the cuts, within the tile.
    cat = read_mer_catalog(res.catalog_uri)
    passing = set(cat.filter(shear_selection(cat, cfg.shear.snr_min)).column("OBJECT_ID").to_pylist())
    assert set(sources.column("OBJECT_ID").to_pylist()) == passing
    assert res.n_catalog_rows == cat.num_rows > sources.num_rows


def test_quadrants_in_manifest_overlap_the_subtile(prepared):
    cfg, res, _ = prepared
    from constellation_assets.io.q1 import quadrant_box

    quads = pq.read_table(res.quadrants_uri).to_pylist()
    for u in res.manifest_uris:
        m = load_manifest(u)
        (ra_min, ra_max), (dec_min, dec_max) = m["sky_bounds"]["extended_ra"], m["sky_bounds"]["extended_dec"]
        listed = {(int(q["obs_id"]), int(q["dither"]), q["det_id"]) for q in m["quadrants"]}
        for q in quads:
            b = quadrant_box(q)
            overlaps = not (b.dec_max < dec_min or b.dec_min > dec_max) and not (
                b.ra_max < ra_min or b.ra_min > ra_max
            )
            assert ((q["obs_id"], q["dither"], q["det_id"]) in listed) == overlaps


def test_idempotent_and_force(prepared):
    cfg, res, _ = prepared
    before = {u: Path(u).stat().st_mtime_ns for u in res.manifest_uris}
    again = prepare_tile(cfg, TILE)
    assert again.skipped and again.manifest_uris == res.manifest_uris and again.inputs_hash == res.inputs_hash
    assert {u: Path(u).stat().st_mtime_ns for u in res.manifest_uris} == before
    forced = prepare_tile(cfg, TILE, force=True)
    assert not forced.skipped
    assert all(Path(u).stat().st_mtime_ns >= before[u] for u in res.manifest_uris)
    assert [load_manifest(u) for u in forced.manifest_uris] == [load_manifest(u) for u in res.manifest_uris]
    assert not list(Path(cfg.output.manifests).rglob(".*tmp*"))  # no temp files left behind


def test_load_manifest_rejects_bad_manifests(prepared, tmp_path):
    cfg, res, _ = prepared
    good = yaml.safe_load(Path(res.manifest_uris[5]).read_text())
    outside = dict(good, source_catalog="/etc/passwd")
    p = tmp_path / "outside.yaml"
    p.write_text(yaml.safe_dump(outside))
    with pytest.raises(ManifestError, match="outside the configured") as err:
        load_manifest(str(p), cfg=cfg)
    assert str(p) in str(err.value)
    load_manifest(str(p))  # structure alone is fine without configured roots
    bad = dict(good, core_source_ids=[*good["core_source_ids"], 123])
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ManifestError, match="core_source_ids"):
        load_manifest(str(p))
    p.write_text("tile_id: [unclosed")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(str(p))
    p.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ManifestError):
        load_manifest(str(p))


def test_missing_catalog_is_a_clear_error(prepared):
    from constellation_assets.io.uri import DataAccessError

    cfg, _, _ = prepared
    with pytest.raises(DataAccessError, match="102044186"):
        prepare_tile(cfg, 102044186)


def test_cli_prepare_and_simulate(tmp_path):
    from click.testing import CliRunner

    from constellation_assets.cli import main

    cfg_file = tmp_path / "cfg.yaml"
    cfg = small_config(tmp_path, field={"ccd_grid": [1, 1], "n_dithers": 1})
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    r = CliRunner().invoke(main, ["simulate-field", "--config", str(cfg_file)])
    assert r.exit_code == 0, r.output
    assert f"tile {TILE}: written" in r.output
    r = CliRunner().invoke(main, ["prepare", "--config", str(cfg_file), "--json"])
    assert r.exit_code == 0, r.output
    assert '"n_quadrants": 8' in r.output  # 4 quadrants x (nominal + short exposure)
    r = CliRunner().invoke(main, ["prepare", "--config", str(cfg_file), "--tile-id", "102044186"])
    assert r.exit_code != 0 and "102044186" in r.output


@pytest.mark.integration
def test_q1_edff_config_against_moto_bucket(moto_s3, tmp_path, monkeypatch):
    """configs/q1_edff.yaml, unchanged except the endpoint, against a bucket with the Q1 key layout."""
    client = moto_s3["client"]
    bucket = "nasa-irsa-euclid-q1"
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    # Like the AWS open-data bucket: anyone may list and read.
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
             "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]},
        ],
    }  # fmt: skip
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    endpoint = moto_s3["endpoint_url"]
    real = load_config(str(REPO / "configs" / "q1_edff.yaml"), overrides={"data.s3.endpoint_url": endpoint})
    assert real.data.s3.anon and real.data.vis_base_uri == "s3://nasa-irsa-euclid-q1/q1/VIS/"
    # Seed the bucket with the same key layout: a tiny synthetic field for every configured tile.
    seed_cfg = real.model_copy(
        update={
            "field": real.field.model_copy(
                update={
                    "tile_ids": list(real.tile_ids),
                    "ccd_grid": (1, 1),
                    "quadrant_nx_pix": 128,
                    "quadrant_ny_pix": 130,
                    "n_dithers": 1,
                    "galaxy_density_arcmin2": 60.0,
                    "truth_base_uri": str(tmp_path / "truth"),
                }
            ),
            "data": real.data.model_copy(update={"s3": real.data.s3.model_copy(update={"anon": False})}),
        }
    )
    simulate_field(seed_cfg)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="q1/")["Contents"]]
    assert any(k.startswith("q1/VIS/2689/EUC_VIS_SWL-DET-002689-00-1-0000000__") for k in keys)
    assert any(
        k.startswith(f"q1/catalogs/MER_FINAL_CATALOG/{TILE}/EUC_MER_FINAL-CAT_TILE{TILE}-") for k in keys
    )

    # Discovery + prepare through exactly the real config (anonymous reads), outputs relative to the cwd.
    monkeypatch.chdir(tmp_path)
    results = prepare(real, progress=False)
    assert [r.tile_id for r in results] == list(real.tile_ids)
    for r in results:
        assert len(r.manifest_uris) == 16 and r.n_quadrants >= 4 and r.n_core > 0
        m = load_manifest(r.manifest_uris[5], cfg=real)
        assert all(q["sci_path"].startswith("s3://nasa-irsa-euclid-q1/q1/VIS/") for q in m["quadrants"])
        tile = mer_tile(r.tile_id)
        src = pq.read_table(r.sources_uri)
        assert np.all(
            tile.extended.contains(
                src.column("RIGHT_ASCENSION").to_numpy(), src.column("DECLINATION").to_numpy()
            )
        )


def test_tile_association_limits_discovery_to_the_tiles_observations(prepared, tmp_path):
    """With data.tile_association_uri a tile lists and indexes only its observations: a damaged
    observation folder of another tile is never opened (without the table it fails the tile)."""
    import shutil

    from constellation_assets.io.q1 import Q1FormatError

    cfg, res, root = prepared
    vis = tmp_path / "VIS"
    shutil.copytree(cfg.data.vis_base_uri, vis)
    obs = sorted(int(p.name) for p in vis.iterdir() if p.name.isdigit())
    assert obs
    bad = vis / "999999"
    bad.mkdir()
    (bad / "EUC_VIS_SWL-DET-999999-00-1-0000000__20241017T040000.000000Z.fits").write_bytes(
        b"not a FITS file"
    )
    assoc = tmp_path / "tileid_association_q1.csv"
    rows = "".join(f"{TILE},{o},0.5\n" for o in obs) + "102044186,999999,0.1\n"
    assoc.write_text("tileid,obsid,overlap_fraction\n" + rows)
    data = {"vis_base_uri": str(vis), "catalog_base_uri": cfg.data.catalog_base_uri}
    with_table = small_config(
        root, data={**data, "tile_association_uri": str(assoc)}, output={"root_uri": str(tmp_path / "a")}
    )
    got = prepare_tile(with_table, TILE)
    assert got.n_quadrants == res.n_quadrants and len(got.manifest_uris) == 16
    without = small_config(root, data=data, output={"root_uri": str(tmp_path / "b")})
    with pytest.raises(Q1FormatError, match="999999"):
        prepare_tile(without, TILE)


def test_tile_association_table_formats_and_errors(tmp_path):
    import pyarrow as pa

    from constellation_assets.io.q1 import Q1FormatError, read_tile_association, tile_observations
    from constellation_assets.io.uri import DataAccessError

    pq_path = tmp_path / "assoc.parquet"
    pq.write_table(pa.table({"TILE_ID": [5, 5, 7, 5], "OBSERVATION_ID": [30, 10, 10, 30]}), pq_path)
    assert read_tile_association(str(pq_path)) == {5: [10, 30], 7: [10]}
    assert tile_observations(8, str(pq_path)) == []
    bad = tmp_path / "bad.csv"
    bad.write_text("tile,ra\n5,1.0\n")
    with pytest.raises(Q1FormatError, match="observation id column"):
        read_tile_association(str(bad))
    with pytest.raises(DataAccessError, match="tile_association_uri"):
        read_tile_association(str(tmp_path / "missing.csv"))
    # a rewritten table is read again
    pq.write_table(pa.table({"tileid": [5], "obsid": [99]}), pq_path)
    assert read_tile_association(str(pq_path)) == {5: [99]}


def test_synthetic_field_writes_the_tile_association_prepare_reads(prepared, tmp_path):
    """With data.tile_association_uri set, the synthetic field writes the tile -> observation table (from its
    quadrant index, as IRSA's for Q1) and prepare finds the same quadrants through it."""
    from constellation_assets.io.q1 import read_tile_association

    cfg, res, root = prepared
    assoc = tmp_path / "tileid_association_q1.csv"
    data = {
        "vis_base_uri": cfg.data.vis_base_uri,
        "catalog_base_uri": cfg.data.catalog_base_uri,
        "tile_association_uri": str(assoc),
    }
    cfg2 = small_config(root, data=data, output={"root_uri": str(tmp_path / "out")})
    summary = simulate_field(cfg2)  # the field exists: tiles skipped, the table written
    assert all(t.skipped for t in summary.tiles) and assoc.exists()
    quads = pq.read_table(res.quadrants_uri)
    assert read_tile_association(str(assoc)) == {TILE: sorted(set(quads.column("obs_id").to_pylist()))}
    got = prepare_tile(cfg2, TILE)
    assert got.n_quadrants == res.n_quadrants
