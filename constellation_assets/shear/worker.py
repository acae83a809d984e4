"""Shear worker: ``python -m constellation_assets.shear.worker --config C MANIFEST... [--device D] [--batch-size N]``.

Runs :func:`constellation_assets.shear.infer.infer_manifest` on one or many sub-tile manifests (URIs, or
folders/prefixes holding ``*.yaml`` manifests); the sub-tiles of one tile are measured together, each
quadrant read once per tile (:func:`constellation_assets.shear.infer.infer_tile_manifests`).

Under Dagster (launched by ``PipesSubprocessClient`` locally or ``PipesK8sClient`` on Kubernetes, detected
from the pipes environment variables) it speaks dagster-pipes:

- inputs from the pipes extras (command-line arguments fill what the extras lack): ``config`` (a config
  mapping or a config URI), ``manifests`` (list of URIs), ``device``, ``batch_size``, ``force``, ``run_id``
  (default: the Dagster run id);
- every log record of the package goes to the Dagster event log;
- one custom message per sub-tile: ``{"type": "subtile_result", **InferResult.to_metadata()}`` (sources,
  seconds, device, peak memory, shear, result URI, status);
- on an asset step, one materialization with totals (sub-tiles, sources, stamps, seconds, device, peak
  RSS/GPU memory) and the per-sub-tile table as JSON metadata.

Standalone, it logs to stderr and prints one JSON line per sub-tile on stdout. Exit status 0 when every
manifest succeeded, 1 otherwise (the others still run), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger("constellation_assets.shear.worker")

__all__ = ["expand_manifests", "is_pipes_process", "main", "run_manifests", "summarize_results"]


def is_pipes_process() -> bool:
    """True when this process was launched by a Dagster pipes client."""
    try:
        from dagster_pipes import PipesEnvVarParamsLoader
    except ImportError:  # pragma: no cover - dagster-pipes is a dependency
        return False
    return PipesEnvVarParamsLoader().is_dagster_pipes_process()


def expand_manifests(uris: Iterable[str], storage_options: Callable[[str], dict] | None = None) -> list[str]:
    """Manifest URIs; a folder/prefix expands to the ``*.yaml``/``*.yml`` files below it (sorted)."""
    from constellation_assets.io.uri import get_fs

    out: list[str] = []
    for uri in uris:
        uri = str(uri)
        opts = storage_options(uri) if storage_options else None
        fs, path = get_fs(uri, opts)
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith((".yaml", ".yml")))
            if not found:
                raise FileNotFoundError(f"no *.yaml manifests under {uri}; run `constellation prepare` first")
            prefix = "s3://" if uri.startswith(("s3://", "s3a://")) else ""
            out += [prefix + p if prefix and not p.startswith("s3://") else p for p in found]
        else:
            out.append(uri)
    return out


def run_manifests(
    cfg,
    manifests: Iterable[str],
    device: str | None = None,
    batch_size: int | None = None,
    *,
    force: bool = False,
    run_id: str | None = None,
    on_result: Callable[[Any], None] | None = None,
    on_error: Callable[[str, BaseException], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list, list[tuple[str, str]]]:
    """Infer the manifests; returns ``(results, failures)`` with failures as (uri, message).

    The sub-tiles of one tile are measured together, each quadrant read once for the tile
    (:func:`constellation_assets.shear.infer.infer_tile_manifests`); results and failures are still
    reported per sub-tile, and a failing sub-tile does not stop the others.
    """
    from constellation_assets.shear.infer import infer_tile_manifests

    results, failed = infer_tile_manifests(
        cfg,
        list(manifests),
        device,
        batch_size,
        force=force,
        run_id=run_id,
        progress=progress,
        on_result=on_result,
        on_error=on_error,
    )
    return results, [(uri, f"{type(exc).__name__}: {exc}") for uri, exc in failed]


def infer_record_extra(results: list) -> dict[str, Any]:
    """What the infer stage's run_config record lists: the tiles and the number of sub-tile results."""
    return {"tiles": sorted({int(r.tile_id) for r in results}), "n_results": len(results)}


def summarize_results(results: list, failures: list[tuple[str, str]], seconds: float) -> dict[str, Any]:
    """Totals over sub-tiles (the materialization metadata)."""
    import math

    def _max(vals):
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return max(vals) if vals else None

    return {
        "n_subtiles": len(results),
        "n_written": sum(r.status == "written" for r in results),
        "n_skipped": sum(r.status == "skipped" for r in results),
        "n_failed": len(failures),
        "n_sources": sum(max(r.n_sources, 0) for r in results),
        "n_measured": sum(r.n_measured for r in results),
        "n_stamps": sum(r.n_stamps for r in results),
        "seconds": round(seconds, 3),
        "device": results[0].device if results else None,
        "peak_rss_mb": _max([r.peak_rss_mb for r in results]),
        "peak_gpu_mb": _max([r.peak_gpu_mb for r in results]),
    }


class _PipesLogHandler(logging.Handler):
    def __init__(self, pipes_log):
        super().__init__()
        self.pipes_log = pipes_log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pipes_log.log(record.levelno, self.format(record))
        except Exception:  # never let logging break the run
            self.handleError(record)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m constellation_assets.shear.worker",
        description="Shear inference on sub-tile manifests (standalone or through dagster-pipes).",
    )
    ap.add_argument("manifests", nargs="*", help="manifest URIs or folders/prefixes of manifests")
    ap.add_argument("--config", dest="config", default=None, help="pipeline config (path or s3:// URI)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="recompute existing results")
    ap.add_argument("--run-id", default=None)
    return ap


def _load_cfg(config: Any, flags: Mapping[str, Any]):
    from constellation_assets.config import load_config

    return load_config(config, {k: v for k, v in flags.items() if v is not None})


def _run(args: argparse.Namespace, extras: Mapping[str, Any], pipes=None) -> int:
    from constellation_assets.config import ConfigError

    device = extras.get("device", args.device)
    batch_size = extras.get("batch_size", args.batch_size)
    try:
        cfg = _load_cfg(
            extras.get("config", args.config), {"compute.device": device, "compute.batch_size": batch_size}
        )
    except ConfigError as exc:
        log.error("%s", exc)
        if pipes is not None:
            raise
        return 2
    manifests = list(extras.get("manifests") or args.manifests)
    if not manifests:
        log.error("no manifests given (arguments or the pipes extra 'manifests')")
        if pipes is not None:
            raise ValueError("no manifests given: pass extras={'manifests': [...]} or command-line arguments")
        return 2
    manifests = expand_manifests(manifests, cfg.storage_options)
    force = bool(extras.get("force", args.force))
    run_id = extras.get("run_id", args.run_id) or (pipes.run_id if pipes is not None else None)

    def on_result(res) -> None:
        meta = res.to_metadata()
        if pipes is not None:
            pipes.report_custom_message({"type": "subtile_result", **meta})
        else:
            print(json.dumps(meta, default=str), flush=True)

    t0 = time.perf_counter()
    log.info(
        "shear worker: %d manifest(s), device=%s, batch_size=%s",
        len(manifests),
        cfg.compute.device,
        cfg.compute.batch_size,
    )
    results, failures = run_manifests(
        cfg, manifests, None, None, force=force, run_id=run_id, on_result=on_result
    )
    if not failures:  # the infer stage's run_config record, after every sub-tile result
        from constellation_assets.provenance import write_stage_record

        write_stage_record(cfg, "infer", infer_record_extra(results))
    totals = summarize_results(results, failures, time.perf_counter() - t0)
    log.info("shear worker done: %s", json.dumps(totals))
    if pipes is not None:
        if pipes.is_asset_step and len(pipes.asset_keys) == 1:
            table = [r.to_metadata() for r in results]
            meta: dict[str, Any] = {k: v for k, v in totals.items() if v is not None}
            meta["subtiles"] = {"raw_value": table, "type": "json"}
            if failures:
                meta["failures"] = {
                    "raw_value": [{"manifest": u, "error": e} for u, e in failures],
                    "type": "json",
                }
            if not failures:
                pipes.report_asset_materialization(metadata=meta)
        if failures:
            raise RuntimeError(
                f"{len(failures)} of {len(manifests)} sub-tile manifest(s) failed: "
                + "; ".join(f"{u}: {e}" for u, e in failures[:5])
            )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    pkg_log = logging.getLogger("constellation_assets")
    if is_pipes_process():
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            handler = _PipesLogHandler(pipes.log)
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            pkg_log.addHandler(handler)
            pkg_log.setLevel(logging.INFO)
            try:
                return _run(args, dict(pipes.extras or {}), pipes)
            finally:
                pkg_log.removeHandler(handler)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return _run(args, {}, None)


if __name__ == "__main__":
    sys.exit(main())
