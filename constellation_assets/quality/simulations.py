"""Checks of the simulation products: the COSMOS source bank and one lens-injection stamp shard."""

from __future__ import annotations

from typing import Any

import numpy as np

from constellation_assets.quality.checks import CheckOutcome


def bank_outcome(bank: Any) -> CheckOutcome:
    """bank_valid: readable, non-empty, unique IDENTs, finite positive hlr_arcsec, Sersic n in [0.3, 6] and
    axis ratio in (0, 1]."""
    d = bank.data
    n = len(d["ident"])
    problems = []
    if n == 0:
        problems.append("bank is empty")
    if len(np.unique(d["ident"])) != n:
        problems.append("duplicate IDENT")
    hlr = np.asarray(d["hlr_arcsec"], float)
    bad_hlr = ~(np.isfinite(hlr) & (hlr > 0))
    if bad_hlr.any():
        problems.append(f"{int(bad_hlr.sum())} non-positive/non-finite hlr_arcsec")
    n_s = np.asarray(d["sersic_n"], float)
    if not np.all((n_s >= 0.3) & (n_s <= 6.0)):
        problems.append("Sersic n outside [0.3, 6]")
    q = np.asarray(d["q"], float)
    if not np.all((q > 0) & (q <= 1.0)):
        problems.append("axis ratio outside (0, 1]")
    return CheckOutcome(
        "bank_valid",
        not problems,
        "error",
        "; ".join(problems) or f"{n} sources valid",
        {"n_sources": n, "median_hlr_arcsec": float(np.median(hlr)) if n else 0.0},
    )


def stamps_outcome(
    source_mode: str, split: str, shard: int, n_expected: int, table: Any, images: dict
) -> CheckOutcome:
    """stamps_valid: rows == planned tasks, unique task ids, finite pixels in every band, cosmos_index set
    exactly in cosmos mode (``table``: the shard's pyarrow table, ``images``: band -> (N, H, W))."""
    problems = []
    if table.num_rows != n_expected:
        problems.append(f"{table.num_rows} rows, {n_expected} tasks planned")
    if "task_id" in table.column_names and len(set(table.column("task_id").to_pylist())) != table.num_rows:
        problems.append("duplicate task_id")
    for band, arr in images.items():
        bad = int(np.sum(~np.isfinite(arr)))
        if bad:
            problems.append(f"{bad} non-finite pixels in band {band}")
    if "cosmos_index" in table.column_names:
        n_null = table.column("cosmos_index").null_count
        if source_mode == "cosmos" and n_null:
            problems.append(f"{n_null} rows without cosmos_index in cosmos mode")
        if source_mode == "sersic" and n_null != table.num_rows:
            problems.append("cosmos_index set in sersic mode")
    return CheckOutcome(
        "stamps_valid",
        not problems,
        "error",
        "; ".join(problems) or f"{table.num_rows} stamps valid ({split} shard {shard})",
        {"rows": table.num_rows, "bands": sorted(images)},
    )


def field_outcome(cfg: Any) -> CheckOutcome:
    """field_complete: every tile of the configured synthetic field has its ``field_manifest.json`` (written
    last) and every file it lists exists."""
    import json

    from constellation_assets.io.uri import join_uri, read_text, uri_exists
    from constellation_assets.synthetic import tile_truth_uri

    tiles = [int(t) for t in cfg.field.tile_ids]
    no_manifest, missing = [], []
    for t in tiles:
        uri = join_uri(tile_truth_uri(cfg, t), "field_manifest.json")
        if not uri_exists(uri, cfg.storage_options(uri)):
            no_manifest.append(t)
            continue
        manifest = json.loads(read_text(uri, cfg.storage_options(uri)))
        listed = list(manifest.get("files") or []) + list((manifest.get("mer_mosaics") or {}).values())
        missing += [u for u in dict.fromkeys(listed) if not uri_exists(u, cfg.storage_options(u))]
    problems = []
    if no_manifest:
        problems.append(f"tile(s) {no_manifest} have no field_manifest.json: materialize synthetic_field")
    if missing:
        problems.append(f"{len(missing)} listed file(s) missing, e.g. {missing[:3]}")
    return CheckOutcome(
        "field_complete",
        bool(tiles) and not problems,
        "error",
        "; ".join(problems) or f"{len(tiles)} tiles complete",
        {"n_tiles": len(tiles), "missing": missing[:20], "tiles_without_manifest": no_manifest},
    )


def injection_shard_outcomes(cfg: Any, keys: list[str]) -> dict[str, list[CheckOutcome]]:
    """stamps_valid of each stored shard ``"{split}/{shard:05d}"`` against the tasks the config plans for it."""
    from constellation_assets.io.uri import uri_exists
    from constellation_assets.sim.injection import (
        _parse_partition,
        discover_hosts,
        plan_tasks,
        read_stamps,
        shard_uri,
    )

    planned: dict[tuple[str, int], int] = {}
    for t in plan_tasks(cfg, discover_hosts(cfg)):
        planned[(t.split, t.shard)] = planned.get((t.split, t.shard), 0) + 1
    out = {}
    for key in keys:
        split, shard = _parse_partition(key)
        uri = shard_uri(cfg, split, shard)
        if not uri_exists(uri, cfg.storage_options(uri)):
            out[key] = [
                CheckOutcome(
                    "stamps_valid", False, "error", f"{uri} not found; materialize lens_injections {key}"
                )
            ]
            continue
        table, images = read_stamps(uri, cfg.storage_options(uri))
        n_expected = planned.get((split, shard), 0)
        out[key] = [stamps_outcome(cfg.injection.source_mode, split, shard, n_expected, table, images)]
    return out
