"""A tiny external inference engine for the tests (run as a script; no tests here).

It follows the external-engine contract of ``constellation_assets.shear.infer``: read the manifest YAML,
write a Parquet with the per-source result columns (and a summary in the ``constellation`` metadata) to
``--output``. ``--mode`` selects failure modes for the error-path tests.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="ok")
    a = ap.parse_args(argv)
    if a.mode == "fail":
        print("simulated failure", file=sys.stderr)
        return 3
    if a.mode == "nooutput":
        return 0
    with open(a.manifest) as fh:
        m = yaml.safe_load(fh)
    with open(a.config) as fh:
        json.load(fh)  # the effective config is valid JSON
    ids = np.asarray(m["source_ids"], dtype=np.int64)
    n = len(ids)
    core = np.isin(ids, np.asarray(m["core_source_ids"], dtype=np.int64))
    cols = {
        "TILE_ID": np.full(n, m["tile_id"], np.int64),
        "SUBTILE_ROW": np.full(n, m["sub_tile_row"], np.int8),
        "SUBTILE_COL": np.full(n, m["sub_tile_col"], np.int8),
        "OBJECT_ID": ids,
        "RA": np.zeros(n),
        "DEC": np.zeros(n),
        "E1": 0.01 * np.arange(n, dtype=np.float32),
        "E2": np.zeros(n, np.float32),
        "R11": np.full(n, 0.5, np.float32),
        "R22": np.full(n, 0.5, np.float32),
        "WEIGHT": np.ones(n, np.float32),
        "SNR": np.full(n, 20.0, np.float32),
        "N_EXPOSURES": np.full(n, 2, np.int16),
        "FLAGS": np.zeros(n, np.int32),
        "IN_CORE": core,
    }
    if a.mode == "badschema":
        del cols["R22"]
    table = pa.table(cols)
    summary = {
        "G1": 0.0,
        "G2": 0.0,
        "G1_ERR": 0.1,
        "G2_ERR": 0.1,
        "N_SOURCES": int(core.sum()),
        "CONVERGENCE": 1.01,
    }
    table = table.replace_schema_metadata({b"constellation": json.dumps(summary).encode()})
    pq.write_table(table, a.output)
    print(f"external test engine wrote {n} rows on {a.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
