"""The manifest contract with SHINE (the seed's) and the seed's per-sub-tile result, end to end.

Manifests written by ``prepare`` on a small synthetic Q1 field are validated against the repository's JSON
Schema (constellation_assets/schemas/manifest-v2.json) and against a schema of the seed's required fields;
an external engine that answers in the seed's SHINE shape (one row per sub-tile) runs through
``infer_manifest`` and the rows are assembled into a SQLite Iceberg catalog and read back from
``shear.subtiles``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from constellation_assets.prepare import (
    MANIFEST_VERSION,
    ManifestError,
    load_manifest,
    manifest_schema_path,
    prepare,
)
from constellation_assets.synthetic import simulate_field
from constellation_assets_tests.q1_testdata import TILE, small_config

HERE = Path(__file__).parent
ENGINE = HERE / "external_subtile_engine.py"

#: The seed's manifest contract (euclid-q1.md "Manifest"), field names and JSON types as the seed's own
#: implementation defines them (its pydantic SubTileManifest / SkyBounds / QuadrantRef). Extra fields allowed.
_PAIR = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
SEED_MANIFEST_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "tile_id",
        "sub_tile_row",
        "sub_tile_col",
        "sky_bounds",
        "quadrants",
        "source_catalog",
        "source_ids",
        "core_source_ids",
    ],  # fmt: skip
    "properties": {
        "tile_id": {"type": "integer"},
        "sub_tile_row": {"type": "integer"},
        "sub_tile_col": {"type": "integer"},
        "sky_bounds": {
            "type": "object",
            "required": ["core_ra", "core_dec", "extended_ra", "extended_dec"],
            "properties": {k: _PAIR for k in ("core_ra", "core_dec", "extended_ra", "extended_dec")},
        },
        "quadrants": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["sci_path", "bkg_path", "wgt_path", "psf_path", "quadrant"],
                "properties": {
                    **{k: {"type": "string"} for k in ("sci_path", "bkg_path", "wgt_path", "psf_path")},
                    "quadrant": {"type": "string", "pattern": r"^\d-\d\.[EFGH]$"},  # HDU prefix, e.g. 3-4.F
                    "obs_id": {"type": "string"},
                    "dither": {"type": "string"},
                    "ccd": {"type": "string"},
                },
            },
        },
        "source_catalog": {"type": "string"},
        "source_ids": {"type": "array", "items": {"type": "integer"}},
        "core_source_ids": {"type": "array", "items": {"type": "integer"}},
    },
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    cfg = small_config(root, inference={"method": "map", "rng_seed": 42}, gal={"type": "Exponential"})
    simulate_field(cfg)
    (res,) = prepare(cfg, progress=False)
    return cfg, res, root


def _raw(uri: str) -> dict:
    return yaml.safe_load(Path(uri).read_text())


def _our_schema() -> dict:
    return json.loads(manifest_schema_path().read_text())


def test_schema_file_is_valid_and_versioned():
    schema = _our_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator.check_schema(SEED_MANIFEST_SCHEMA)
    assert manifest_schema_path().name == f"manifest-v{MANIFEST_VERSION}.json"
    assert schema["properties"]["manifest_version"] == {"const": MANIFEST_VERSION}
    # every field of the pydantic model is described by the schema (and nothing else at the top level)
    from constellation_assets.prepare import Manifest, ManifestQuadrant

    assert set(schema["properties"]) == set(Manifest.model_fields)
    assert set(ManifestQuadrant.model_fields) <= set(schema["$defs"]["quadrant"]["properties"])


def test_written_manifests_validate_against_both_schemas(prepared):
    cfg, res, _ = prepared
    ours = jsonschema.Draft202012Validator(_our_schema())
    seed = jsonschema.Draft202012Validator(SEED_MANIFEST_SCHEMA)
    n_quadrants = 0
    for uri in res.manifest_uris:
        raw = _raw(uri)
        ours.validate(raw)
        seed.validate(raw)
        assert raw["manifest_version"] == MANIFEST_VERSION
        assert raw["source_catalog"] == res.catalog_uri  # the MER final catalog, not our Parquet
        assert "MER_FINAL_CATALOG" in Path(raw["source_catalog"]).parent.parent.name
        assert raw["sources_uri"] == res.sources_uri
        for q in raw["quadrants"]:
            assert (
                q["quadrant"].startswith(q["ccd"] + ".") and len(q["obs_id"]) == 6 and len(q["dither"]) == 2
            )
            assert q["exposure"] in (1, 2)  # nominal or short exposure, from the quadrant index
            n_quadrants += 1
        # the model reads back exactly what was written
        assert load_manifest(uri, cfg=cfg) == json.loads(json.dumps(raw))
    assert n_quadrants > 0


def test_source_ids_are_mer_object_ids(prepared):
    from constellation_assets.io.mer_catalog import read_mer_catalog

    cfg, res, _ = prepared
    mer = {int(x) for x in read_mer_catalog(res.catalog_uri).column("OBJECT_ID").to_pylist()}
    for uri in res.manifest_uris:
        m = _raw(uri)
        assert set(m["core_source_ids"]) <= set(m["source_ids"])
        others = set(m["source_ids"]) - mer
        if others:  # sources of the extended area from a neighbouring tile's catalog
            assert len(m["source_catalogs"]) > 1


def test_schema_and_model_reject_the_same_bad_manifests(prepared, tmp_path):
    cfg, res, _ = prepared
    good = _raw(res.manifest_uris[5])
    ours = jsonschema.Draft202012Validator(_our_schema())

    def v1_bounds(m):
        m["sky_bounds"] = {
            "core": {"ra_min": 1.0, "ra_max": 2.0, "dec_min": 0.0, "dec_max": 1.0},
            "extended": {"ra_min": 1.0, "ra_max": 2.0, "dec_min": 0.0, "dec_max": 1.0},
        }

    def letter_quadrant(m):
        m["quadrants"][0]["quadrant"] = m["quadrants"][0]["quadrant"][-1]

    def dec_reversed(m):
        m["sky_bounds"]["core_dec"] = m["sky_bounds"]["core_dec"][::-1]

    def no_catalog(m):
        del m["source_catalog"]

    def old_version(m):
        m["manifest_version"] = 1

    def three_bounds(m):
        m["sky_bounds"]["extended_ra"] = [*m["sky_bounds"]["extended_ra"], 3.0]

    cases = {
        v1_bounds: "sky_bounds",
        letter_quadrant: "quadrant",
        no_catalog: "source_catalog",
        old_version: "manifest_version",
        three_bounds: "extended_ra",
    }
    for mutate, where in cases.items():
        m = copy.deepcopy(good)
        mutate(m)
        assert not ours.is_valid(m), mutate.__name__
        p = tmp_path / f"{mutate.__name__}.yaml"
        p.write_text(yaml.safe_dump(m))
        with pytest.raises(ManifestError, match=where) as err:
            load_manifest(str(p))
        assert str(p) in str(err.value)
    m = copy.deepcopy(good)
    dec_reversed(m)
    p = tmp_path / "dec.yaml"
    p.write_text(yaml.safe_dump(m))
    with pytest.raises(ManifestError, match="min <= max"):
        load_manifest(str(p))
    # a manifest of the first layout says how to get a current one
    m = copy.deepcopy(good)
    v1_bounds(m)
    p.write_text(yaml.safe_dump(m))
    with pytest.raises(ManifestError, match="prepare --force"):
        load_manifest(str(p))


def test_sources_from_the_mer_catalog_alone(prepared):
    """A manifest reduced to the seed's fields still gives its sources (from the MER FITS catalog)."""
    from constellation_assets.shear.stamps import sources_from_manifest

    cfg, res, _ = prepared
    from constellation_assets.io.mer_catalog import read_mer_catalog

    mer = set(read_mer_catalog(res.catalog_uri).column("OBJECT_ID").to_pylist())
    own = [m for m in map(_raw, res.manifest_uris) if m["source_ids"] and set(m["source_ids"]) <= mer]
    assert own
    m = own[0]
    full, core_full = sources_from_manifest(m)
    seed_only = {k: v for k, v in m.items() if k != "sources_uri"}
    alone, core_alone = sources_from_manifest(seed_only)
    np.testing.assert_array_equal(full.object_id, alone.object_id)
    np.testing.assert_allclose(full.ra_deg, alone.ra_deg, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(core_full, core_alone)


# ------------------------------------------------------------------------------ SHINE-shaped results


def _engine_cfg(cfg, root: Path, mode: str = "ok", g=(0.0123, -0.0045)):
    from constellation_assets.config import load_config

    d = cfg.to_dict()
    d["output"] = {"root_uri": str(root / f"out-{mode}")}
    d["output"]["tile_dir"] = cfg.output.tiles  # the prepared sources/quadrants of the fixture
    d["inference"] = {
        "engine": "external",
        "command": [sys.executable, str(ENGINE), "--manifest", "{manifest_local}", "--output", "{output}",
                    "--g1", str(g[0]), "--g2", str(g[1]), "--mode", mode],
    }  # fmt: skip
    return load_config(d)


def test_external_engine_in_shine_shape_to_iceberg(prepared, tmp_path):
    from constellation_assets.catalog.assemble import assemble_results
    from constellation_assets.catalog.query import scan_sources, scan_subtiles
    from constellation_assets.catalog.schema import read_subtile_result
    from constellation_assets.catalog.tables import open_catalog
    from constellation_assets.shear.infer import infer_manifest

    base, res, _ = prepared
    cfg = _engine_cfg(base, tmp_path)
    uris = [u for u in res.manifest_uris if _raw(u)["core_source_ids"]][:3]
    assert len(uris) == 3
    results = [infer_manifest(cfg, u) for u in uris]
    expected = {}
    for r, u in zip(results, uris, strict=True):
        assert r.status == "written" and r.engine == "external" and r.method == "SHINE-map"
        rows, summary = read_subtile_result(r.result_uri)
        assert rows.num_rows == 0  # one constant shear per sub-tile: no per-source rows
        m = _raw(u)
        n_core = len(m["core_source_ids"])
        assert 0 < summary["N_SOURCES"] <= n_core
        assert summary["G1_ERR"] == pytest.approx(0.26 / math.sqrt(summary["N_SOURCES"]), rel=1e-6)
        expected[(r.sub_tile_row, r.sub_tile_col)] = (summary["N_SOURCES"], summary["G1_ERR"], r.run_id)
    assert infer_manifest(cfg, uris[0]).status == "skipped"

    (done,) = assemble_results(cfg, [str(Path(cfg.output.results))])
    assert done.n_subtiles == 3 and done.n_sources == 0
    catalog = open_catalog(cfg)
    assert cfg.output.catalog.startswith("sqlite:///")
    sub = scan_subtiles(catalog, [TILE]).sort_by([("SUBTILE_ROW", "ascending"), ("SUBTILE_COL", "ascending")])
    assert sub.num_rows == 3
    assert scan_sources(catalog, [TILE]).num_rows == 0
    for row in sub.to_pylist():
        n, g1_err, run_id = expected[(row["SUBTILE_ROW"], row["SUBTILE_COL"])]
        assert row["METHOD"] == "SHINE-map" and row["N_SOURCES"] == n
        assert row["G1"] == pytest.approx(0.0123, abs=1e-7) and row["G2"] == pytest.approx(-0.0045, abs=1e-7)
        assert row["G1_ERR"] == pytest.approx(g1_err, rel=1e-6)
        assert row["CONVERGENCE"] == pytest.approx(1.0 + 1e-3 * row["SUBTILE_COL"], abs=1e-6)
        assert row["RUN_ID"] == run_id  # the inference run that produced it


def test_shine_result_file_written_by_the_engine_itself_assembles(prepared, tmp_path):
    """A Parquet in the seed's shape dropped straight into a results folder (no Constellation metadata)."""
    from constellation_assets.catalog.assemble import assemble_results
    from constellation_assets.catalog.query import scan_subtiles
    from constellation_assets.catalog.schema import ResultFileError
    from constellation_assets.catalog.tables import open_catalog

    base, res, _ = prepared
    cfg = _engine_cfg(base, tmp_path)
    folder = tmp_path / "shine-results"
    folder.mkdir()
    row = {
        "TILE_ID": [TILE], "SUBTILE_ROW": [2], "SUBTILE_COL": [1], "RA": [52.9], "DEC": [-28.1],
        "G1": [0.02], "G2": [0.01], "G1_ERR": [0.003], "G2_ERR": [0.003], "N_SOURCES": [812],
        "METHOD": ["SHINE-nuts"], "CONVERGENCE": [1.004],
    }  # fmt: skip
    pq.write_table(pa.table(row), folder / f"{TILE}_2_1.parquet")
    (done,) = assemble_results(cfg, [str(folder)], run_id="assemble-shine-1")
    assert done.n_subtiles == 1 and done.n_sources == 0
    (got,) = scan_subtiles(open_catalog(cfg), [TILE]).to_pylist()
    assert got["METHOD"] == "SHINE-nuts" and got["N_SOURCES"] == 812
    assert got["CONVERGENCE"] == pytest.approx(1.004, abs=1e-6) and got["G1"] == pytest.approx(0.02, abs=1e-7)
    assert got["RUN_ID"] == "assemble-shine-1"  # the file has no RUN_ID: the assembly's is recorded
    # a file whose name and row disagree is refused, naming the file
    pq.write_table(pa.table(row), folder / f"{TILE}_3_3.parquet")
    with pytest.raises(ResultFileError, match=f"{TILE}_3_3.parquet"):
        from constellation_assets.catalog.external import read_result_file

        read_result_file(str(folder / f"{TILE}_3_3.parquet"))


def test_external_engine_bad_shapes_are_clear_errors(prepared, tmp_path):
    from constellation_assets.shear.infer import ExternalEngineError, infer_manifest, result_uri_for

    base, res, _ = prepared
    uri = next(u for u in res.manifest_uris if _raw(u)["core_source_ids"])
    m = _raw(uri)
    cases = {
        "neither": "neither per-source rows",
        "tworows": "exactly one row",
        "wrongtile": "expected",
    }
    for mode, msg in cases.items():
        cfg = _engine_cfg(base, tmp_path, mode)
        with pytest.raises(ExternalEngineError, match=msg) as err:
            infer_manifest(cfg, uri)
        if mode == "neither":
            assert "OBJECT_ID" in str(err.value) and "CONVERGENCE" in str(err.value)
        out = Path(result_uri_for(cfg, m["tile_id"], m["sub_tile_row"], m["sub_tile_col"]))
        assert not out.exists()  # nothing partial
    # a shear of magnitude >= 1 is not a reduced shear
    cfg = _engine_cfg(base, tmp_path, "ok", g=(1.5, 0.0))
    with pytest.raises(ExternalEngineError, match="reduced shear"):
        infer_manifest(cfg, uri)


def test_quadrant_entry_reads_exposure_and_exptime_when_the_index_has_them(prepared):
    """Quadrant index rows with the ``exposure``/``exptime`` columns (short exposures) and without them."""
    from constellation_assets.prepare import ManifestQuadrant, _quadrant_entry

    _, res, _ = prepared
    row = pq.read_table(res.quadrants_uri).slice(0, 1).to_pylist()[0]
    assert "exposure" not in row or row["exposure"] in (1, None)
    plain = ManifestQuadrant.model_validate(
        _quadrant_entry({k: v for k, v in row.items() if k != "exposure"})
    )
    assert plain.exposure == 1
    short = _quadrant_entry({**row, "exposure": 2, "exptime_s": 89.52})
    q = ManifestQuadrant.model_validate(short)
    assert q.exposure == 2 and q.exptime_s == pytest.approx(89.52)
    assert (
        q.quadrant == row["det_id"]
        and q.obs_id == f"{row['obs_id']:06d}"
        and q.dither == f"{row['dither']:02d}"
    )
    jsonschema.Draft202012Validator(
        _our_schema()["$defs"]["quadrant"] | {"$defs": _our_schema()["$defs"]}
    ).validate(short)
    with pytest.raises(ValueError, match="exposure"):
        ManifestQuadrant.model_validate({**short, "exposure": 3})
