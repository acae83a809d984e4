"""A sub-tile with a single measured source has an undefined ensemble shear: reported as NaN, not an error."""

import math

import numpy as np
import polars as pl
import pyarrow as pa

from constellation_assets.quality.checks import check_finite_shear
from constellation_assets.shear.infer import summarize


def _table(n):
    return pa.table(
        {
            "IN_CORE": np.ones(n, bool),
            "WEIGHT": np.ones(n, np.float32),
            "E1": np.full(n, 0.1, np.float32),
            "E2": np.full(n, -0.1, np.float32),
            "R11": np.full(n, 0.5, np.float32),
            "R22": np.full(n, 0.5, np.float32),
        }
    )


def _manifest():
    box = {"ra_min": 10.0, "ra_max": 10.1, "dec_min": -1.0, "dec_max": -0.9}
    return {"sky_bounds": {"core": box, "extended": box}}


def test_single_source_subtile_is_unmeasured_not_failed():
    one = summarize(_table(1), _manifest(), "fpfs")
    assert one["N_SOURCES"] == 1 and math.isnan(one["G1"]) and math.isnan(one["G1_ERR"])
    many = summarize(_table(10), _manifest(), "fpfs")
    assert many["G1"] == np.float32(0.2) or abs(many["G1"] - 0.2) < 1e-6
    rows = pl.DataFrame([{k: one[k] for k in ("G1", "G2", "G1_ERR", "G2_ERR", "N_SOURCES")}])
    assert check_finite_shear(subtiles=rows).passed
    # a well-populated sub-tile with a NaN shear is still an error
    bad = rows.with_columns(pl.lit(10).alias("N_SOURCES"))
    assert not check_finite_shear(subtiles=bad).passed


def test_empty_subtile_with_empty_catalog(tmp_path):
    import pyarrow.parquet as pq

    from constellation_assets.shear.stamps import sources_from_manifest

    schema = pa.schema(
        [("OBJECT_ID", pa.int64()), ("RIGHT_ASCENSION", pa.float64()), ("DECLINATION", pa.float64())]
    )
    cat = tmp_path / "sources.parquet"
    pq.write_table(schema.empty_table(), cat)
    sources, in_core = sources_from_manifest(
        {"source_catalog": str(cat), "source_ids": [], "core_source_ids": []}
    )
    assert len(in_core) == 0
    assert len(sources.object_id) == len(sources.ra_deg) == len(sources.dec_deg) == 0
