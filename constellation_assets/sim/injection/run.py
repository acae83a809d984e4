"""Runs: render every shard, register it, record the run; reproduce a recorded run; single injections."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from constellation_assets.io.lease import Lease, LeaseHeldError, lease_uri
from constellation_assets.io.uri import (
    DataAccessError,
    atomic_output,
    get_fs,
    is_s3,
    join_uri,
    list_uri,
    read_text,
    uri_exists,
)
from constellation_assets.provenance import (
    RunConflictError,
    config_hash,
    effective_config_record,
    run_config_uri,
    utc_timestamp,
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
    _shard_metadata,
    check_registration,
    inspect_shard,
    output_error,
    register_shards,
    shard_bytes,
    write_shard_bytes,
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
    """What a run produced. ``skipped``: the output already held this run (same config hash, verified)."""

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
    #: verify-only runs: sha256 of the files found at the output (relative path -> sha256 or None if absent)
    file_sha256: dict[str, str | None] = field(default_factory=dict)
    #: frames left out under ``injection.exclude_damaged_frames`` (uri -> reason)
    excluded_frames: dict[str, str] = field(default_factory=dict)


def absolute_uri(uri: str | None) -> str | None:
    """A URI that means the same from any working directory: local paths made absolute, s3:// unchanged."""
    if uri is None:
        return None
    u = str(uri)
    if is_s3(u):
        return "s3://" + u.split("://", 1)[1] if u.startswith("s3a://") else u
    if u.startswith("file://"):
        u = u[len("file://") :]
    absolute = os.path.abspath(os.path.expanduser(u))
    return absolute + ("/" if u.endswith("/") and not absolute.endswith("/") else "")


def resolved_config(cfg):
    """A copy of ``cfg`` whose data, bank and output locations are absolute (what a run record must hold)."""
    cfg = cfg.model_copy(deep=True)
    # object.__setattr__: the same values made absolute; no re-validation (preflight passes configs whose
    # injection section did not validate, to report everything else)
    object.__setattr__(cfg.data, "vis_base_uri", absolute_uri(cfg.data.vis_base_uri))
    object.__setattr__(cfg.data, "catalog_base_uri", absolute_uri(cfg.data.catalog_base_uri))
    object.__setattr__(cfg.output, "root_uri", absolute_uri(cfg.output.root_uri))
    object.__setattr__(cfg.injection, "output_uri", absolute_uri(cfg.injection_output))
    if cfg.injection.cosmos_bank_h5:
        object.__setattr__(cfg.injection, "cosmos_bank_h5", absolute_uri(cfg.injection.cosmos_bank_h5))
    return cfg


def check_output_location(uri: str, so: dict | None) -> None:
    """Fail early, as an output problem, when the output cannot exist: a missing bucket, a file in the way."""
    if is_s3(uri):
        fs, path = get_fs(uri, so)
        bucket = path.split("/", 1)[0]
        try:
            ok = fs.exists(bucket)
        except Exception as exc:  # noqa: BLE001
            raise InjectionError(
                f"output {uri}: cannot check the bucket {bucket!r} ({type(exc).__name__}: {exc}). What to do: "
                "check the output URI, data.s3.endpoint_url / AWS_ENDPOINT_URL and the AWS_* credentials"
            ) from None
        if not ok:
            raise InjectionError(
                f"output {uri}: the output bucket {bucket!r} does not exist. What to do: create it "
                f"(`aws s3 mb s3://{bucket}`) or choose another --output"
            )
        return
    p = os.path.abspath(os.path.expanduser(uri))
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if os.path.exists(p) and not os.path.isdir(p):
        raise InjectionError(
            f"output {uri}: {p} is a file, not a folder. What to do: choose another --output"
        )


def _hash_extra(cfg, hosts: HostSet, bank) -> dict:
    extra: dict[str, Any] = {
        "injection_code": INJECTION_CODE_VERSION,
        "hosts_digest": hosts.digest(),
        "n_hosts": len(hosts.hosts),
    }
    if hosts.excluded:
        extra["excluded_frames"] = dict(sorted(hosts.excluded.items()))
    if cfg.injection.source_mode == "cosmos":
        extra["cosmos_bank_content_hash"] = _bank_content_hash(bank)
        extra["cosmos_n_sources"] = _bank_n_sources(bank)
    return extra


def _rel(cfg, uri: str) -> str:
    base = cfg.injection_output.rstrip("/") + "/"
    u = str(uri)
    return u[len(base) :] if u.startswith(base) else u


def _read_record(uri: str, so: dict | None) -> dict | None:
    if not uri_exists(uri, so):
        return None
    try:
        return json.loads(read_text(uri, so))
    except ValueError:
        return {"status": "unreadable"}


def record_status(record: dict | None) -> str | None:
    """``complete`` / ``started`` / ``failed`` (records written before statuses existed are complete)."""
    if record is None:
        return None
    return str(record.get("status") or "complete")


def _run_lease(cfg, so, *, wait_s: float | None = None) -> Lease:
    inj = cfg.injection
    d = join_uri(cfg.injection_output, inj.stage_dir, inj.variant)
    return Lease(
        lease_uri(d, inj.experiment_id),
        so,
        timeout_s=inj.lease_timeout_s,
        wait_s=inj.lease_wait_s if wait_s is None else wait_s,
        purpose=f"injection run {inj.stage_dir}/{inj.variant}/{inj.experiment_id}",
    )


def _shard_lease(cfg, so, split: str, k: int) -> Lease:
    inj = cfg.injection
    return Lease(
        lease_uri(join_uri(run_dir(cfg), split), f"part-{k:05d}"),
        so,
        timeout_s=inj.lease_timeout_s,
        wait_s=max(inj.lease_wait_s, SHARD_LEASE_WAIT_S),
        purpose=f"shard {split}/{k:05d}",
    )


#: A run waits this long for a shard another run (a Dagster partition) is writing: shards are short.
SHARD_LEASE_WAIT_S = 600.0
#: Partition runs wait this long for the run lease when they record a completed run (a short section).
RECORD_LEASE_WAIT_S = 60.0


def _record(cfg, extra: dict, status: str, record_extra: dict | None = None, **fields) -> dict:
    """The run record: the config hash covers ``extra`` (hosts, bank, code); ``record_extra`` adds results."""
    inj = cfg.injection
    record = effective_config_record(cfg, inj.stage_dir, extra, INJECTION_HASH_SECTIONS)
    record["status"] = status
    record.update(fields)
    if record_extra is not None:
        record.pop("extra", None)
        record["extra"] = record_extra
    return record


def _write_record(cfg, record: dict, so) -> str:
    inj = cfg.injection
    uri, _ = write_run_config(
        cfg,
        cfg.injection_output,
        inj.stage_dir,
        inj.variant,
        inj.experiment_id,
        record=record,
        storage_options=so,
    )
    return uri


def verify_outputs(
    cfg, record: dict, so: dict | None, shards: list[tuple[str, int]] | None = None
) -> list[str]:
    """Every shard the record lists (or only ``shards``), hashed and compared with its recorded sha256; returns
    the problems (empty: the outputs are what the record says)."""
    want = (record.get("extra") or {}).get("shard_sha256") or {}
    problems = []
    if not want:
        problems.append("the run record lists no shard checksums")
    only = None if shards is None else {_rel(cfg, shard_uri(cfg, s, k)) for s, k in shards}
    for rel, sha in sorted(want.items()):
        if only is not None and rel not in only:
            continue
        uri = join_uri(cfg.injection_output, rel)
        if not uri_exists(uri, so):
            problems.append(f"{uri} is missing")
            continue
        chk = inspect_shard(uri, so)
        if chk.problem:
            problems.append(f"{uri} {chk.problem}")
        elif chk.sha256 != sha:
            problems.append(
                f"{uri} has sha256 {chk.sha256[:16]}..., the run record {sha[:16]}...: the file changed after "
                "the run completed"
            )
    expected = {join_uri(cfg.injection_output, rel) for rel in want}
    for s, k in shards_of(cfg):
        u = shard_uri(cfg, s, k)
        if u not in expected:
            problems.append(f"{u} belongs to the run but is not in its record")
    return problems


def _damaged_message(rc_uri: str, problems: list[str]) -> str:
    return (
        f"{rc_uri} records a completed run, but its outputs do not match it: "
        + "; ".join(problems[:5])
        + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        + ". What to do: re-render the run with `constellation inject ... --force` (or delete the damaged "
        "shard(s) and the run record, then re-run the same command: only missing shards are rendered)."
    )


def _expected_for_check(cfg, by_shard, shas: dict[str, str], h: str) -> dict[str, dict]:
    return {
        shard_uri(cfg, s, k): {
            "sha256": shas.get(_rel(cfg, shard_uri(cfg, s, k))),
            "task_ids": [t.task_id for t in by_shard.get((s, k), [])],
            "config_hash": h,
        }
        for s, k in shards_of(cfg)
    }


def _render_shard(cfg, st: list[Task], hosts: HostSet, bank, h: str):
    rendered = []
    for i in range(0, len(st), _RENDER_BATCH):
        rendered += render_tasks(cfg, st[i : i + _RENDER_BATCH], hosts, bank)
    table = _rows_table(cfg, rendered)
    meta = _shard_metadata(cfg, h)
    if hosts.excluded:
        meta[b"constellation.excluded_frames"] = json.dumps(sorted(hosts.excluded)).encode()
    data = shard_bytes(table, meta)
    return table.replace_schema_metadata(meta), data, hashlib.sha256(data).hexdigest()


def run_injection(
    cfg,
    partitions: Iterable | None = None,
    progress: bool = False,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    hosts: HostSet | None = None,
    verify_only: bool = False,
) -> InjectionResult:
    """Run (or complete) an injection run; idempotent, one writer per output location.

    ``partitions``: None for every shard, or an iterable of ``(split, shard)`` / ``"split/shard"`` (Dagster
    partitions). A completed run (same config hash) is verified (every shard hashed against the record) and
    skipped; a different hash raises :class:`~constellation_assets.provenance.RunConflictError` unless
    ``injection.force``. Existing shards without a completed record are read completely and kept when whole and
    of this run, re-rendered when damaged. The run record is written at the start (``status: started``), on
    failure (``failed``) and, once every shard exists, last (``complete``, with per-shard sha256), always by the
    holder of the run's lease. ``verify_only``: render every wanted shard in memory and compare it with the file
    at the output (writes nothing; used by ``reproduce`` into an existing run).
    ``progress`` shows a rich progress bar; ``on_progress(done, total)`` is called after each shard.
    """
    t0 = time.perf_counter()
    _PIXEL_CACHE.clear()  # pixels are cached across the batches of one call only
    cfg = resolved_config(cfg)
    inj = cfg.injection
    out = cfg.injection_output
    so = cfg.storage_options(out)
    check_output_location(out, so)
    hosts = hosts if hosts is not None else discover_hosts(cfg)
    bank = _load_bank(cfg) if inj.source_mode == "cosmos" else None
    extra = _hash_extra(cfg, hosts, bank)
    h = config_hash(cfg, extra, INJECTION_HASH_SECTIONS)
    rc_uri = run_config_uri(out, inj.stage_dir, inj.variant, inj.experiment_id)
    all_shards = shards_of(cfg)
    wanted = all_shards if partitions is None else [_parse_partition(p) for p in partitions]
    unknown = [w for w in wanted if w not in all_shards]
    if unknown:
        raise InjectionError(
            f"partitions {unknown} are not part of this run (shards: {partition_keys(cfg)[:5]}...)"
        )
    if verify_only:
        return _verify_run(cfg, hosts, bank, h, wanted, rc_uri, so, t0)
    whole_run = partitions is None
    run_lease = _run_lease(cfg, so) if whole_run else None
    if run_lease is not None:
        run_lease.acquire()
    try:
        old = _read_record(rc_uri, so)
        if record_status(old) == "complete" and not inj.force:
            if old.get("config_hash") != h:
                raise RunConflictError(
                    f"{rc_uri} holds a completed run with config_hash {old.get('config_hash')}, but this run's "
                    f"config_hash is {h}. Use a new variant/experiment_id or output location, or pass --force to "
                    "overwrite it."
                )
            # a Dagster partition verifies its own shard; a whole run every shard
            problems = verify_outputs(cfg, old, so, None if whole_run else wanted)
            if problems:
                raise InjectionError(_damaged_message(rc_uri, problems))
            shas = (old.get("extra") or {}).get("shard_sha256", {})
            if inj.register_catalog and whole_run:
                by_shard = _by_shard(plan_tasks(cfg, hosts))
                diff = check_registration(cfg, _expected_for_check(cfg, by_shard, shas, h), so)
                if diff:
                    log.warning(
                        "sim.injections disagrees with the shards (%s): re-registering the run",
                        "; ".join(diff[:3]),
                    )
                    register_shards(
                        cfg,
                        [(f"{s}/{k:05d}", shard_uri(cfg, s, k), None) for s, k in all_shards],
                        so,
                        replace_run=True,
                    )
            log.info(
                "%s: run complete with the same config hash %s, all %d shards verified", rc_uri, h, len(shas)
            )
            return InjectionResult(
                [shard_uri(cfg, s, k) for s, k in all_shards],
                int((old.get("extra") or {}).get("n_rows", 0)),
                rc_uri,
                old,
                h,
                True,
                True,
                shas,
                time.perf_counter() - t0,
                excluded_frames=dict(hosts.excluded),
            )
        if record_status(old) == "complete" and inj.force and not whole_run:
            with _run_lease(cfg, so, wait_s=max(inj.lease_wait_s, RECORD_LEASE_WAIT_S)) as lease:
                lease.check()
                _remove(rc_uri, so)  # the run is incomplete until it is recorded again
        if whole_run:
            _write_record(cfg, _record(cfg, extra, "started", lease=_holder(run_lease)), so)
        try:
            tasks = plan_tasks(cfg, hosts)
            by_shard = _by_shard(tasks)
            res = _write_shards(cfg, hosts, bank, h, wanted, by_shard, so, progress, on_progress)
            shas, n_rows, to_register = res
            n_reg = 0
            if inj.register_catalog:
                n_reg = register_shards(cfg, to_register, so, replace_run=whole_run)
            if inj.force and whole_run:
                _remove_stale_shards(cfg, {shard_uri(cfg, s, k) for s, k in all_shards}, so)
            complete = all(uri_exists(shard_uri(cfg, s, k), so) for s, k in all_shards)
            record = written = None
            if complete:
                record, written = _record_complete(cfg, extra, tasks, shas, so, run_lease)
        except BaseException as exc:
            if whole_run:
                with contextlib.suppress(Exception):
                    run_lease.check()
                    msg = str(exc) or type(exc).__name__
                    _write_record(cfg, _record(cfg, extra, "failed", error=msg[:2000]), so)
            raise
    finally:
        if run_lease is not None:
            run_lease.release()
    return InjectionResult(
        [shard_uri(cfg, s, k) for s, k in wanted],
        n_rows,
        written,
        record,
        h,
        False,
        complete,
        shas,
        time.perf_counter() - t0,
        n_reg,
        excluded_frames=dict(hosts.excluded),
    )


def _holder(lease: Lease | None) -> dict | None:
    if lease is None:
        return None
    return {"host": socket.gethostname(), "pid": os.getpid(), "lease_uri": lease.uri}


def _by_shard(tasks: list[Task]) -> dict[tuple[str, int], list[Task]]:
    by_shard: dict[tuple[str, int], list[Task]] = {}
    for t in tasks:
        by_shard.setdefault((t.split, t.shard), []).append(t)
    return by_shard


def _write_shards(cfg, hosts, bank, h, wanted, by_shard, so, progress, on_progress):
    inj = cfg.injection
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
    to_register: list[tuple] = []
    try:
        for split, k in wanted:
            uri = shard_uri(cfg, split, k)
            st = by_shard.get((split, k), [])
            with _shard_lease(cfg, so, split, k):
                chk = inspect_shard(uri, so) if (uri_exists(uri, so) and not inj.force) else None
                if chk is not None and chk.problem is None:
                    if chk.config_hash != h:
                        raise RunConflictError(
                            f"{uri} was written by a run with config_hash {chk.config_hash}, this run's is {h}. "
                            "Use a new variant/experiment_id or output, or pass --force to overwrite it."
                        )
                    if chk.task_ids != [t.task_id for t in st]:
                        chk.problem = "holds other tasks than this run plans for it"
                if chk is not None and chk.problem is None:
                    shas[_rel(cfg, uri)] = chk.sha256
                    to_register.append((f"{split}/{k:05d}", uri, None))
                    n_rows += len(st)
                else:
                    if chk is not None:
                        log.warning("%s %s: rendering it again", uri, chk.problem)
                    table, data, sha = _render_shard(cfg, st, hosts, bank, h)
                    write_shard_bytes(uri, data, so)
                    shas[_rel(cfg, uri)] = sha
                    n_rows += table.num_rows
                    to_register.append((f"{split}/{k:05d}", uri, table, sha))
            done += len(st)
            if bar is not None:
                bar.update(bar_task, completed=done)
            if on_progress:
                on_progress(done, total)
    finally:
        if bar is not None:
            bar.stop()
    return shas, n_rows, to_register


def _record_complete(cfg, extra, tasks, shas, so, run_lease):
    """Hash the shards not written by this call and write the completed record (as the run lease holder)."""
    inj = cfg.injection
    for s, k in shards_of(cfg):
        u = shard_uri(cfg, s, k)
        if _rel(cfg, u) not in shas:
            chk = inspect_shard(u, so)
            if chk.problem:
                raise InjectionError(f"{u} {chk.problem}; re-run to render it again")
            shas[_rel(cfg, u)] = chk.sha256
    record = _record(
        cfg,
        extra,
        "complete",
        {
            **extra,
            "n_rows": len(tasks),
            "shard_sha256": dict(sorted(shas.items())),
            "iceberg_table": ".".join(TABLE_IDENTIFIER) if inj.register_catalog else None,
        },
        completed_utc=utc_timestamp(),
    )
    if run_lease is not None:
        run_lease.check()
        return record, _write_record(cfg, record, so)
    try:
        with _run_lease(cfg, so, wait_s=max(inj.lease_wait_s, RECORD_LEASE_WAIT_S)) as lease:
            lease.check()
            return record, _write_record(cfg, record, so)
    except LeaseHeldError:
        log.info("the run lease is held by another run: it records the completed run")
        return None, None


def _verify_run(cfg, hosts, bank, h, wanted, rc_uri, so, t0) -> InjectionResult:
    """Render every wanted shard in memory; report its sha256 and that of the file at the output."""
    tasks = plan_tasks(cfg, hosts)
    by_shard = _by_shard(tasks)
    shas: dict[str, str] = {}
    files: dict[str, str | None] = {}
    n_rows = 0
    for split, k in wanted:
        uri = shard_uri(cfg, split, k)
        table, _, sha = _render_shard(cfg, by_shard.get((split, k), []), hosts, bank, h)
        shas[_rel(cfg, uri)] = sha
        files[_rel(cfg, uri)] = inspect_shard(uri, so).sha256 if uri_exists(uri, so) else None
        n_rows += table.num_rows
    return InjectionResult(
        [shard_uri(cfg, s, k) for s, k in wanted],
        n_rows,
        rc_uri,
        None,
        h,
        False,
        False,
        shas,
        time.perf_counter() - t0,
        file_sha256=files,
        excluded_frames=dict(hosts.excluded),
    )


def _remove(uri: str, so: dict | None) -> None:
    if uri_exists(uri, so):
        fs, path = get_fs(uri, so)
        fs.rm(path)


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
    #: verify-only reproductions: files at the output that differ from what the record's config renders
    damaged_files: list[str] = field(default_factory=list)
    rerendered_in_place: bool = False


def load_run_config(run_config: str, storage_options: dict | None = None):
    from constellation_assets.config import load_config

    so = storage_options if storage_options is not None else None
    try:
        record = json.loads(read_text(run_config, so))
    except ValueError as exc:
        raise InjectionError(
            f"{run_config} is not a run record (invalid JSON: {exc}); pass the run_config_*.json of a run"
        ) from None
    return load_config(record), record


def reproduce(
    run_config: str,
    output_uri: str,
    force: bool = False,
    storage_options: dict | None = None,
    progress: bool = False,
) -> ReproduceResult:
    """Re-render a recorded injection run and compare every shard's sha256 with the record.

    Into a new location the shards are written there. Into a location that already holds shards of this run
    (the recorded location itself, or an earlier reproduction) and without ``force``, every shard is re-rendered
    in memory and compared with the record and with the file found there: nothing is written and a damaged file
    is named. With ``force`` the location is re-rendered and overwritten.
    """
    cfg, record = load_run_config(run_config, storage_options)
    status = record_status(record)
    if status != "complete":
        raise InjectionError(
            f"{run_config} records a run that did not complete (status {status!r}"
            + (f": {record.get('error')}" if record.get("error") else "")
            + "); only completed runs can be reproduced. Re-run it with `constellation inject --config "
            f"{run_config}` first"
        )
    cfg.injection.output_uri = absolute_uri(output_uri)
    cfg.injection.force = bool(force)
    want = (record.get("extra") or {}).get("shard_sha256") or {}
    so = cfg.storage_options(cfg.injection.output_uri)
    holds_run = any(uri_exists(join_uri(cfg.injection.output_uri, rel), so) for rel in want)
    in_place = holds_run and not force
    res = run_injection(cfg, progress=progress, verify_only=in_place)
    got = res.shard_sha256
    mismatched = sorted(k for k in want if k in got and got[k] != want[k])
    missing = sorted(k for k in want if k not in got)
    identical = bool(want) and not mismatched and not missing and set(got) == set(want)
    damaged = []
    if in_place:
        for rel, sha in sorted(res.file_sha256.items()):
            if sha != want.get(rel):
                damaged.append(join_uri(cfg.injection.output_uri, rel))
    if record.get("config_hash") and record["config_hash"] != res.config_hash:
        log.warning(
            "config hash differs from the record (%s != %s): the inputs (hosts, bank) or the code changed",
            res.config_hash,
            record["config_hash"],
        )
    return ReproduceResult(res, record.get("config_hash"), identical, mismatched, missing, damaged, in_place)


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
    if r.params.source_mode == "cosmos":
        # the morphology comes from the bank template (possibly bulge + disk): the Sersic draws are not used
        for k in ("source_n", "source_q", "source_phi_rad"):
            d[k] = None
    else:
        d.pop("cosmos_template_hlr_arcsec", None)
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
    try:
        with atomic_output(png_uri, so) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    except OSError as exc:
        raise output_error(exc, png_uri) from None
    except DataAccessError as exc:
        raise InjectionError(
            f"cannot write the PNG {png_uri}: {exc.problem}. What to do: pass a writable --png path"
        ) from None
    finally:
        plt.close(fig)
