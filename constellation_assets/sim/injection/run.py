"""Runs: render every shard, register it, record the run; reproduce a recorded run; single injections."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from constellation_assets.io.uri import (
    atomic_output,
    get_fs,
    join_uri,
    list_uri,
    read_bytes,
    read_text,
    uri_exists,
)
from constellation_assets.provenance import (
    RunConflictError,
    check_idempotency,
    config_hash,
    effective_config_record,
    run_config_uri,
    write_run_config,
)
from constellation_assets.sim.injection.common import (
    _RENDER_BATCH,
    INJECTION_CODE_VERSION,
    INJECTION_HASH_SECTIONS,
    SPLITS,
    TABLE_IDENTIFIER,
    HostSet,
    InjectionError,
    Task,
)
from constellation_assets.sim.injection.hosts import discover_hosts
from constellation_assets.sim.injection.render import (
    _PIXEL_CACHE,
    RenderedTask,
    _bank_content_hash,
    _bank_n_sources,
    _load_bank,
    render_tasks,
)
from constellation_assets.sim.injection.shards import (
    _rows_table,
    _shard_hash,
    _shard_metadata,
    _write_shard,
    register_shards,
)
from constellation_assets.sim.injection.tasks import (
    _parse_partition,
    find_task,
    partition_keys,
    plan_tasks,
    run_dir,
    shard_uri,
    shards_of,
)

log = logging.getLogger(__name__)


@dataclass
class InjectionResult:
    """What a run produced. ``skipped``: the output already held this run (same config hash)."""

    shard_uris: list[str]
    n_rows: int
    run_config_uri: str | None
    record: dict | None
    config_hash: str
    skipped: bool = False
    complete: bool = True
    shard_sha256: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    n_registered: int = 0


def _hash_extra(cfg, hosts: HostSet, bank) -> dict:
    extra: dict[str, Any] = {
        "injection_code": INJECTION_CODE_VERSION,
        "hosts_digest": hosts.digest(),
        "n_hosts": len(hosts.hosts),
    }
    if cfg.injection.source_mode == "cosmos":
        extra["cosmos_bank_content_hash"] = _bank_content_hash(bank)
        extra["cosmos_n_sources"] = _bank_n_sources(bank)
    return extra


def _rel(cfg, uri: str) -> str:
    base = cfg.injection_output.rstrip("/") + "/"
    u = str(uri)
    return u[len(base) :] if u.startswith(base) else u


def run_injection(
    cfg,
    partitions: Iterable | None = None,
    progress: bool = False,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    hosts: HostSet | None = None,
) -> InjectionResult:
    """Run (or complete) an injection run; idempotent.

    ``partitions``: None for every shard, or an iterable of ``(split, shard)`` / ``"split/shard"`` (Dagster
    partitions). Existing shards with the same config hash are kept, a different hash raises
    :class:`~constellation_assets.provenance.RunConflictError` unless ``injection.force``. The run config
    (``run_config_{experiment_id}.json``) is written once every shard of the run exists.
    ``progress`` shows a rich progress bar; ``on_progress(done, total)`` is called after each shard.
    """
    t0 = time.perf_counter()
    _PIXEL_CACHE.clear()  # pixels are cached across the batches of one call only
    inj = cfg.injection
    out = cfg.injection_output
    so = cfg.storage_options(out)
    hosts = hosts if hosts is not None else discover_hosts(cfg)
    bank = _load_bank(cfg) if inj.source_mode == "cosmos" else None
    extra = _hash_extra(cfg, hosts, bank)
    h = config_hash(cfg, extra, INJECTION_HASH_SECTIONS)
    rc_uri = run_config_uri(out, inj.stage_dir, inj.variant, inj.experiment_id)
    action = check_idempotency(rc_uri, h, inj.force, so)
    all_shards = shards_of(cfg)
    if action == "skip":
        record = json.loads(read_text(rc_uri, so))
        uris = [shard_uri(cfg, s, k) for s, k in all_shards]
        shas = (record.get("extra") or {}).get("shard_sha256", {})
        log.info(
            "%s: run complete with the same config hash %s; nothing to do (use --force to redo)", rc_uri, h
        )
        return InjectionResult(
            uris,
            int((record.get("extra") or {}).get("n_rows", 0)),
            rc_uri,
            record,
            h,
            True,
            True,
            shas,
            time.perf_counter() - t0,
        )
    if inj.force and uri_exists(rc_uri, so):
        fs, path = get_fs(rc_uri, so)
        fs.rm(path)  # the run is incomplete until it is rewritten

    tasks = plan_tasks(cfg, hosts)
    wanted = all_shards if partitions is None else [_parse_partition(p) for p in partitions]
    unknown = [w for w in wanted if w not in all_shards]
    if unknown:
        raise InjectionError(
            f"partitions {unknown} are not part of this run (shards: {partition_keys(cfg)[:5]}...)"
        )
    by_shard: dict[tuple[str, int], list[Task]] = {}
    for t in tasks:
        by_shard.setdefault((t.split, t.shard), []).append(t)

    total = sum(len(by_shard.get(w, [])) for w in wanted)
    done = 0
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("injecting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        bar.start()
        bar_task = bar.add_task("inject", total=total)
    shas: dict[str, str] = {}
    n_rows = 0
    n_reg = 0
    to_register: list[tuple[str, str, Any]] = []
    try:
        for split, k in wanted:
            uri = shard_uri(cfg, split, k)
            st = by_shard.get((split, k), [])
            existing = uri_exists(uri, so)
            if existing and not inj.force:
                old = _shard_hash(uri, so)
                if old != h:
                    raise RunConflictError(
                        f"{uri} was written by a run with config_hash {old}, this run's is {h}. Use a new "
                        "variant/experiment_id or output, or pass --force to overwrite it."
                    )
                shas[_rel(cfg, uri)] = hashlib.sha256(read_bytes(uri, so)).hexdigest()
                n_rows += len(st)
                to_register.append((f"{split}/{k:05d}", uri, None))
            else:
                rendered = []
                for i in range(0, len(st), _RENDER_BATCH):
                    rendered += render_tasks(cfg, st[i : i + _RENDER_BATCH], hosts, bank)
                table = _rows_table(cfg, rendered)
                shas[_rel(cfg, uri)] = _write_shard(uri, table, _shard_metadata(cfg, h), so)
                n_rows += table.num_rows
                to_register.append((f"{split}/{k:05d}", uri, table))
            done += len(st)
            if bar is not None:
                bar.update(bar_task, completed=done)
            if on_progress:
                on_progress(done, total)
    finally:
        if bar is not None:
            bar.stop()

    if inj.register_catalog:
        n_reg = register_shards(cfg, to_register, so)
    uris = [shard_uri(cfg, s, k) for s, k in wanted]
    if inj.force and partitions is None:
        _remove_stale_shards(cfg, {shard_uri(cfg, s, k) for s, k in all_shards}, so)
    complete = all(uri_exists(shard_uri(cfg, s, k), so) for s, k in all_shards)
    record = None
    written = None
    if complete:
        for s, k in all_shards:
            u = shard_uri(cfg, s, k)
            if _rel(cfg, u) not in shas:
                shas[_rel(cfg, u)] = hashlib.sha256(read_bytes(u, so)).hexdigest()
        record = effective_config_record(cfg, inj.stage_dir, extra, INJECTION_HASH_SECTIONS)
        record["extra"] = {
            **extra,
            "n_rows": len(tasks),
            "shard_sha256": dict(sorted(shas.items())),
            "iceberg_table": ".".join(TABLE_IDENTIFIER) if inj.register_catalog else None,
        }
        written, record = write_run_config(
            cfg, out, inj.stage_dir, inj.variant, inj.experiment_id, record=record, storage_options=so
        )
    return InjectionResult(
        uris, n_rows, written, record, h, False, complete, shas, time.perf_counter() - t0, n_reg
    )


def _remove_stale_shards(cfg, keep: set[str], so: dict | None) -> None:
    for split in SPLITS:
        d = join_uri(run_dir(cfg), split)
        for u in list_uri(d, so):
            if re.search(r"part-\d{5}\.parquet$", u) and u not in keep:
                fs, path = get_fs(u, so)
                fs.rm(path)
                log.info("removed stale shard %s (not part of the forced re-run)", u)


@dataclass
class ReproduceResult:
    result: InjectionResult
    recorded_config_hash: str | None
    identical: bool
    mismatched: list[str]
    missing: list[str]


def load_run_config(run_config: str, storage_options: dict | None = None):
    from constellation_assets.config import load_config

    so = storage_options if storage_options is not None else None
    record = json.loads(read_text(run_config, so))
    return load_config(record), record


def reproduce(
    run_config: str,
    output_uri: str,
    force: bool = False,
    storage_options: dict | None = None,
    progress: bool = False,
) -> ReproduceResult:
    """Re-run a recorded injection run into ``output_uri`` and compare every shard's sha256 with the record."""
    cfg, record = load_run_config(run_config, storage_options)
    cfg.injection.output_uri = output_uri
    cfg.injection.force = bool(force)
    res = run_injection(cfg, progress=progress)
    want = (record.get("extra") or {}).get("shard_sha256") or {}
    got = res.shard_sha256
    mismatched = sorted(k for k in want if k in got and got[k] != want[k])
    missing = sorted(k for k in want if k not in got)
    identical = bool(want) and not mismatched and not missing and set(got) == set(want)
    if record.get("config_hash") and record["config_hash"] != res.config_hash:
        log.warning(
            "config hash differs from the record (%s != %s): the inputs (hosts, bank) or the code changed",
            res.config_hash,
            record["config_hash"],
        )
    return ReproduceResult(res, record.get("config_hash"), identical, mismatched, missing)


def render_single(cfg, task_id: str, png_uri: str | None = None) -> tuple[RenderedTask, str | None]:
    """Render one injection (same code as a run); optionally write a PNG (host, arc, composite per band)."""
    _PIXEL_CACHE.clear()
    task, hosts = find_task(cfg, task_id)
    bank = _load_bank(cfg) if cfg.injection.source_mode == "cosmos" else None
    (r,) = render_tasks(cfg, [task], hosts, bank)
    if png_uri:
        _write_png(cfg, r, png_uri)
    return r, png_uri


def task_summary(r: RenderedTask) -> dict:
    from dataclasses import asdict

    d = {"task_id": r.task.task_id, "split": r.task.split, "host_id": r.task.host.host_id}
    d.update({k: v for k, v in asdict(r.params).items() if k not in ("task_id", "noise_seed")})
    d.update(
        magnification=r.magnification,
        arc_snr=float(np.sqrt(np.sum(np.square(r.arc_snr)))),
        noise_sigma_adu=r.noise_sigma_adu,
        zero_point_mag=r.zero_point_mag,
        host_frame=r.task.host.frame_uri,
        host_hdu=r.task.host.hdu,
    )
    return d


def _write_png(cfg, r: RenderedTask, png_uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    bands = cfg.injection.bands
    fig, axes = plt.subplots(len(bands), 3, figsize=(9, 3 * len(bands)), squeeze=False)
    for j, b in enumerate(bands):
        scale = max(float(r.noise_sigma_adu), 1e-6)
        for c, (title, img) in enumerate(
            (("host", r.host[j]), ("arc", r.arc[j]), ("host + arc", r.composite[j]))
        ):
            ax = axes[j, c]
            ax.imshow(np.arcsinh(img / scale), origin="lower", cmap="magma")
            ax.set_title(f"{b}: {title}")
            ax.set_xticks([])
            ax.set_yticks([])
    p = r.params
    fig.suptitle(
        f'{r.task.task_id}  theta_E={p.theta_e_arcsec:.2f}"  mu={r.magnification:.1f}  S/N={r.arc_snr[0]:.1f}',
        fontsize=9,
    )
    fig.tight_layout()
    so = cfg.storage_options(png_uri)
    with atomic_output(png_uri, so) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
