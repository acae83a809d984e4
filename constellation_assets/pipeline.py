"""The local end-to-end run: synthetic field (if absent) -> prepare -> infer -> assemble -> validate.

``constellation run --config C --local`` calls :func:`run_local`; the Dagster assets call the same stage
functions per tile partition, so both produce identical outputs. Each stage writes its effective config record
(``{output.root_uri}/{stage}/{field_name}/run_config_{field_name}.json``) after its outputs.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["RunSummary", "infer_many", "run_local", "truth_frame", "write_stage_record"]


@dataclasses.dataclass
class RunSummary:
    tile_ids: list[int]
    n_manifests: int
    n_results: int
    n_sources_catalog: int
    seconds: dict[str, float]
    checks: list[Any]
    tile_shear: Any  # polars DataFrame: per-tile recovered vs injected shear
    run_configs: dict[str, str]

    @property
    def passed(self) -> bool:
        return all(c.passed or c.severity != "error" for c in self.checks)


def write_stage_record(cfg, stage: str, extra: dict | None = None) -> str:
    """Write the effective config of a shear-pipeline stage next to its outputs; returns its URI."""
    from constellation_assets.provenance import write_run_config

    uri, _ = write_run_config(
        cfg,
        cfg.output.root_uri,
        stage,
        cfg.field_name,
        cfg.field_name,
        extra=extra,
        storage_options=cfg.storage_options(cfg.output.root_uri),
    )
    return uri


def _infer_one(cfg_dict: dict, manifest_uri: str, device: str | None, batch_size: int | None, threads: int):
    import torch

    from constellation_assets.config import PipelineConfig
    from constellation_assets.shear.infer import infer_manifest

    torch.set_num_threads(max(1, threads))
    cfg = PipelineConfig.model_validate(cfg_dict)
    return infer_manifest(cfg, manifest_uri, device=device, batch_size=batch_size)


def infer_many(
    cfg,
    manifest_uris: Iterable[str],
    *,
    workers: int | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    on_done: Callable[[Any], None] | None = None,
) -> list:
    """Run the estimator on many manifests, in ``workers`` processes (spawned: torch is not fork-safe)."""
    from constellation_assets.shear.infer import infer_manifest

    uris = list(manifest_uris)
    workers = max(1, min(workers or cfg.compute.workers, len(uris) or 1))
    results = []
    if workers == 1:
        for uri in uris:
            res = infer_manifest(cfg, uri, device=device, batch_size=batch_size)
            results.append(res)
            if on_done:
                on_done(res)
        return results
    threads = max(1, (cfg.compute.torch_threads or mp.cpu_count()) // workers)
    cfg_dict = cfg.model_dump(mode="json")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_infer_one, cfg_dict, u, device, batch_size, threads): u for u in uris}
        for fut in cf.as_completed(futs):
            res = fut.result()  # a failing sub-tile raises here, naming its manifest
            results.append(res)
            if on_done:
                on_done(res)
    results.sort(key=lambda r: r.manifest_uri)
    return results


def truth_frame(field_summary) -> Any:
    """TILE_ID, G1_TRUE, G2_TRUE from a synthetic field summary (None when no tile has truth)."""
    import polars as pl

    rows = [
        {"TILE_ID": int(t.tile_id), "G1_TRUE": float(t.g1_true), "G2_TRUE": float(t.g2_true)}
        for t in field_summary.tiles
        if t.g1_true is not None
    ]
    return pl.DataFrame(rows) if rows else None


def run_local(cfg, *, progress: bool = True, simulate: bool = True, console=None) -> RunSummary:
    """Run the whole shear pipeline locally for ``cfg.selected_tile_ids``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from constellation_assets.catalog.assemble import assemble_results
    from constellation_assets.catalog.tables import namespace_from_config, open_catalog
    from constellation_assets.prepare import prepare
    from constellation_assets.quality.checks import tile_shear_summary
    from constellation_assets.quality.run import catalog_frames, run_catalog_checks

    console = console or Console(stderr=True)
    seconds: dict[str, float] = {}
    records: dict[str, str] = {}
    tile_ids = cfg.selected_tile_ids

    truth = None
    if simulate:
        from constellation_assets.synthetic import simulate_field

        t0 = time.perf_counter()
        console.log(
            f"[bold]field[/]: synthetic Euclid Q1-layout data for tiles {tile_ids} (generated if absent)"
        )
        fs = simulate_field(cfg, progress=progress)
        truth = truth_frame(fs)
        seconds["field"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prep = prepare(cfg, tile_ids, progress=progress)
    manifests = [m for p in prep for m in p.manifest_uris]
    seconds["prepare"] = time.perf_counter() - t0
    records["prepare"] = write_stage_record(
        cfg, "prepare", {"tiles": tile_ids, "n_manifests": len(manifests)}
    )
    console.log(
        f"[bold]prepare[/]: {len(manifests)} manifests for {len(prep)} tiles in {seconds['prepare']:.1f} s"
    )

    t0 = time.perf_counter()
    cols = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*cols, console=console, disable=not progress) as bar:
        task = bar.add_task("infer sub-tiles", total=len(manifests))
        results = infer_many(cfg, manifests, on_done=lambda r: bar.advance(task))
    seconds["infer"] = time.perf_counter() - t0
    n_written = sum(r.status == "written" for r in results)
    records["infer"] = write_stage_record(cfg, "infer", {"n_results": len(results), "n_written": n_written})
    console.log(
        f"[bold]infer[/]: {len(results)} sub-tiles ({n_written} measured, {len(results) - n_written} up to date), "
        f"{sum(r.n_measured for r in results)} sources in {seconds['infer']:.1f} s on {results[0].device if results else '-'}"
    )

    t0 = time.perf_counter()
    catalog = open_catalog(cfg)
    with Progress(*cols, console=console, disable=not progress) as bar:
        task = bar.add_task("assemble tiles", total=None)
        assembled = assemble_results(
            cfg,
            [r.result_uri for r in results],
            catalog=catalog,
            on_tiles_found=lambda n: bar.update(task, total=n),
            on_tile_done=lambda r: bar.advance(task),
        )
    seconds["assemble"] = time.perf_counter() - t0
    records["assemble"] = write_stage_record(cfg, "assemble", {"tiles": [a.tile_id for a in assembled]})
    console.log(
        f"[bold]assemble[/]: {len(assembled)} tiles committed to Iceberg in {seconds['assemble']:.1f} s"
    )

    t0 = time.perf_counter()
    grid = cfg.tiling.sub_tile_grid
    checks = run_catalog_checks(
        cfg, expected=len(tile_ids) * grid[0] * grid[1], truth=truth, tile_ids=tile_ids
    )
    sources, subtiles = catalog_frames(catalog, tile_ids, namespace_from_config(cfg))
    tile_shear = tile_shear_summary(subtiles, truth)
    seconds["validate"] = time.perf_counter() - t0
    return RunSummary(
        tile_ids=tile_ids,
        n_manifests=len(manifests),
        n_results=len(results),
        n_sources_catalog=int(sources.height),
        seconds=seconds,
        checks=checks,
        tile_shear=tile_shear,
        run_configs=records,
    )
