"""The local end-to-end run: synthetic field (if absent) -> prepare -> infer -> assemble -> validate.

``constellation run --config C --local`` calls :func:`run_local`; the Dagster assets call the same stage
functions for the tiles of their run, so both produce identical outputs. Each stage function (``prepare``,
:func:`infer_many` / the shear worker, ``assemble_results``) writes its effective config record
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

__all__ = ["RunSummary", "infer_many", "run_local", "stage_record_uri", "truth_frame", "write_stage_record"]


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
    #: tiles that could not be processed (tile id -> the error); the other tiles were completed
    failed_tiles: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failed_tiles and all(c.passed or c.severity != "error" for c in self.checks)


def write_stage_record(cfg, stage: str, extra: dict | None = None) -> str:
    """Write the effective config of a shear-pipeline stage next to its outputs; returns its URI
    (:func:`constellation_assets.provenance.write_stage_record`, which the stage functions call)."""
    from constellation_assets.provenance import write_stage_record as _write

    return _write(cfg, stage, extra)


def stage_record_uri(cfg, stage: str) -> str:
    """Where a stage's run_config record lives (``{output.root_uri}/{stage}/{field}/run_config_{field}.json``)."""
    from constellation_assets.provenance import run_config_uri

    return run_config_uri(cfg.output.root_uri, stage, cfg.field_name, cfg.field_name)


def _infer_group(cfg_dict: dict, uris: list[str], device: str | None, batch_size: int | None, threads: int):
    """One worker task: the manifests of one tile, measured together (picklable failures)."""
    import pickle

    import torch

    from constellation_assets.config import PipelineConfig
    from constellation_assets.shear.infer import infer_tile_manifests

    torch.set_num_threads(max(1, threads))
    cfg = PipelineConfig.model_validate(cfg_dict)
    results, failures = infer_tile_manifests(cfg, uris, device=device, batch_size=batch_size)
    out = []
    for uri, exc in failures:
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        out.append((uri, exc))
    return results, out


def _tile_groups(uris: list[str]) -> list[list[str]]:
    """Manifests grouped by tile (``{tile_id}_{row}_{col}.yaml`` names, else by folder), in order."""
    groups: dict[str, list[str]] = {}
    for uri in uris:
        folder, _, name = str(uri).rstrip("/").rpartition("/")
        head = name.split("_", 1)[0]
        groups.setdefault(head if head.isdigit() and "_" in name else folder, []).append(uri)
    return list(groups.values())


def infer_many(
    cfg,
    manifest_uris: Iterable[str],
    *,
    workers: int | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    on_done: Callable[[Any], None] | None = None,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> list:
    """Run the estimator on many manifests, in ``workers`` processes (spawned: torch is not fork-safe).

    The sub-tiles of one tile are measured together, each quadrant read once per tile
    (:func:`constellation_assets.shear.infer.infer_tile_manifests`); the workers share out the tiles.
    ``on_error(manifest_uri, exc)``: when given, a failing sub-tile is reported there and the others go on;
    without it a failure raises (the first failing manifest's error, once its tile is done).
    """
    from constellation_assets.shear.infer import infer_tile_manifests
    from constellation_assets.shear.worker import infer_record_extra

    uris = list(manifest_uris)
    groups = _tile_groups(uris)
    workers = max(1, min(workers or cfg.compute.workers, len(groups) or 1))
    results = []

    def collect(done, failed) -> None:
        if failed and on_error is None:
            raise failed[0][1]
        for uri, exc in failed:
            on_error(uri, exc)
        for res in done:
            results.append(res)
            if on_done:
                on_done(res)

    if workers == 1:
        for group in groups:
            collect(*infer_tile_manifests(cfg, group, device=device, batch_size=batch_size))
        write_stage_record(cfg, "infer", infer_record_extra(results))
        return results
    threads = max(1, (cfg.compute.torch_threads or mp.cpu_count()) // workers)
    cfg_dict = cfg.model_dump(mode="json")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_infer_group, cfg_dict, g, device, batch_size, threads): g for g in groups}
        for fut in cf.as_completed(futs):
            try:
                done, failed = fut.result()
            except Exception as exc:  # the worker process itself failed: every sub-tile of its tile
                failed, done = [(u, exc) for u in futs[fut]], []
            collect(done, failed)
    results.sort(key=lambda r: r.manifest_uri)
    write_stage_record(cfg, "infer", infer_record_extra(results))  # last, after every sub-tile result
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

    # Per-tile failures (a damaged frame, a bad catalog) are reported and the healthy tiles are finished.
    failed: dict[int, str] = {}
    t0 = time.perf_counter()

    def prepare_failed(tile: int, exc: Exception) -> None:
        failed[int(tile)] = _one_line(exc)
        console.log(f"[bold red]tile {tile} failed[/] in prepare: {failed[int(tile)]}")

    prep = prepare(cfg, tile_ids, progress=progress, on_error=prepare_failed)
    manifests = [m for p in prep for m in p.manifest_uris]
    seconds["prepare"] = time.perf_counter() - t0
    records["prepare"] = stage_record_uri(cfg, "prepare")  # written by prepare()
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

        def _sub_tile_failed(uri: str, exc: BaseException) -> None:
            tile = _tile_of_manifest(uri)
            failed.setdefault(tile, f"sub-tile {uri.rsplit('/', 1)[-1]}: {_one_line(exc)}")
            console.log(f"[bold red]tile {tile} failed[/] in infer: {failed[tile]}")
            bar.advance(task)

        results = infer_many(cfg, manifests, on_done=lambda r: bar.advance(task), on_error=_sub_tile_failed)
    results = [r for r in results if _tile_of_manifest(r.manifest_uri) not in failed]  # no partial tiles
    seconds["infer"] = time.perf_counter() - t0
    n_written = sum(r.status == "written" for r in results)
    records["infer"] = stage_record_uri(cfg, "infer")  # written by infer_many()
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
    records["assemble"] = stage_record_uri(cfg, "assemble")  # written by assemble_results()
    console.log(
        f"[bold]assemble[/]: {len(assembled)} tiles committed to Iceberg in {seconds['assemble']:.1f} s"
    )

    t0 = time.perf_counter()
    grid = cfg.tiling.sub_tile_grid
    done_ids = [t for t in tile_ids if int(t) not in failed]
    checks = run_catalog_checks(
        cfg, expected=len(done_ids) * grid[0] * grid[1], truth=truth, tile_ids=done_ids
    )
    sources, subtiles = catalog_frames(catalog, done_ids, namespace_from_config(cfg))
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
        failed_tiles=failed,
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _tile_of_manifest(uri: str) -> int:
    """``{root}/manifests/{tile_id}/{tile_id}_{row}_{col}.yaml`` -> tile_id."""
    name = str(uri).rstrip("/").rsplit("/", 1)[-1]
    return int(name.split("_", 1)[0])
