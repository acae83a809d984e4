"""Preflight: check everything a run needs before starting it and list every problem."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from constellation_assets.io.uri import (
    atomic_output,
    get_fs,
    is_s3,
    join_uri,
)
from constellation_assets.provenance import (
    config_hash,
    run_config_uri,
)
from constellation_assets.sim.injection.common import INJECTION_HASH_SECTIONS, SPLITS
from constellation_assets.sim.injection.hosts import _check_bands, discover_hosts
from constellation_assets.sim.injection.render import _bank_n_sources, _load_bank, render_tasks
from constellation_assets.sim.injection.run import (
    _damaged_message,
    _hash_extra,
    _read_record,
    record_status,
    resolved_config,
    verify_outputs,
)
from constellation_assets.sim.injection.tasks import _plan_from_hosts, shards_of, split_of_host

log = logging.getLogger(__name__)


@dataclass
class PreflightReport:
    problems: list[str]
    info: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.problems


#: Free space asked for beyond the estimated output (temporary files before the atomic rename, estimate error).
FREE_SPACE_MARGIN = 1.5


def free_bytes(uri: str) -> int | None:
    """Free bytes where ``uri`` would be written (the nearest existing parent); None for object stores."""
    if is_s3(uri):
        return None
    path = os.path.abspath(os.path.expanduser(str(uri)))
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


def _probe_writable(uri: str, so: dict | None) -> str | None:
    probe = join_uri(uri, f".preflight-{uuid.uuid4().hex[:8]}")
    try:
        with atomic_output(probe, so) as tmp, open(tmp, "wb") as f:
            f.write(b"ok")
        fs, path = get_fs(probe, so)
        fs.rm(path)
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return f"output {uri!r} is not writable ({type(exc).__name__}: {str(exc).splitlines()[0]}); check the path, bucket and credentials"
    return None


def preflight(cfg, benchmark_stamps: int = 4) -> PreflightReport:
    """Check everything a run needs and list every problem (empty list: ready to run)."""
    cfg = resolved_config(cfg)
    inj = cfg.injection
    problems: list[str] = list(_check_bands(inj))
    info: dict[str, Any] = {
        "source_mode": inj.source_mode,
        "bands": list(inj.bands),
        "psf_model": inj.psf_model,
    }
    if inj.psf_model not in ("moffat", "gaussian"):
        problems.append(f"psf_model must be 'moffat' or 'gaussian', got {inj.psf_model!r}")
    if inj.psf_model == "moffat" and not (isinstance(inj.moffat_beta, (int, float)) and inj.moffat_beta > 1):
        problems.append(f"moffat_beta must be > 1 (finite Moffat flux), got {inj.moffat_beta!r}")
    bad_tiers = [t for t in inj.tiers if t not in SPLITS]
    if bad_tiers or not inj.tiers:
        problems.append(f"tiers must be a non-empty subset of {list(SPLITS)}, got {inj.tiers}")
    bank = None
    if inj.source_mode == "cosmos":
        if not inj.cosmos_bank_h5:
            problems.append("source_mode 'cosmos' needs injection.cosmos_bank_h5 (the COSMOS bank HDF5)")
        else:
            try:
                bank = _load_bank(cfg)
                n = _bank_n_sources(bank)
                info["cosmos_n_sources"] = n
                if n <= 0:
                    problems.append(f"COSMOS bank {inj.cosmos_bank_h5!r} is empty (0 sources); rebuild it")
                    bank = None
            except Exception as exc:  # noqa: BLE001
                problems.append(
                    f"COSMOS bank {inj.cosmos_bank_h5!r} is not readable ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); build it with `constellation bank build`"
                )
    elif inj.cosmos_bank_h5:
        info["note"] = "cosmos_bank_h5 is set but source_mode is 'sersic': the bank is not used"
    out = cfg.injection_output
    so = cfg.storage_options(out)
    w = _probe_writable(out, so)
    if w:
        problems.append(w)
    if inj.register_catalog:
        try:
            from constellation_assets.catalog.tables import open_catalog

            open_catalog(cfg)
        except Exception as exc:  # noqa: BLE001
            problems.append(
                f"Iceberg catalog for sim.injections cannot be opened ({exc}); or set injection.register_catalog: false"
            )
    hosts = None
    try:
        hosts = discover_hosts(cfg)
        problems += hosts.problems
        counts = {s: 0 for s in SPLITS}
        for hst in hosts.hosts:
            counts[split_of_host(hst.host_id, inj.split_seed, inj.split_fractions)] += 1
        info["hosts_per_split"] = counts
        for tier in inj.tiers:
            if tier in counts and counts[tier] == 0:
                problems.append(
                    f"tier {tier!r} has no host galaxies ({len(hosts.hosts)} hosts in all); loosen the host cuts "
                    "(host_mag_range, host_min_semimajor_axis_pix, host_snr_min), add tiles or change split_fractions"
                )
        if hosts.quadrants:
            q = next(iter(hosts.quadrants.values()))
            import astropy.wcs.utils as wu

            scale = float(np.mean(wu.proj_plane_pixel_scales(q.wcs())) * 3600.0)
            info["data_pixel_scale_arcsec"] = scale
            if abs(scale / inj.pixel_scale_arcsec - 1) > 0.05:
                problems.append(
                    f'injection.pixel_scale_arcsec={inj.pixel_scale_arcsec} but the VIS frames have {scale:.4f}"/pixel; '
                    "set pixel_scale_arcsec to the data's"
                )
    except Exception as exc:  # noqa: BLE001
        problems.append(f"host discovery failed: {type(exc).__name__}: {exc}")
    n_tasks = len(inj.tiers) * inj.n_total_train_per_split
    row_bytes = len(inj.bands) * inj.stamp_size_pix**2 * 4 + 700
    info["n_stamps"] = n_tasks
    info["n_shards"] = len(shards_of(cfg))
    info["estimated_output_bytes"] = int(n_tasks * row_bytes)
    free = free_bytes(out)
    if free is not None:
        info["free_bytes"] = free
        need = int(info["estimated_output_bytes"] * FREE_SPACE_MARGIN)
        if free < need:
            problems.append(
                f"output {out!r} has {free / 1e6:.1f} MB free, the run needs about "
                f"{info['estimated_output_bytes'] / 1e6:.1f} MB (x{FREE_SPACE_MARGIN} margin for temporary "
                "files): free space there or choose another --output"
            )
    try:
        rc = run_config_uri(out, inj.stage_dir, inj.variant, inj.experiment_id)
        record = _read_record(rc, so)
        if record is not None:
            old = record.get("config_hash")
            info["existing_run_config"] = rc
            info["existing_config_hash"] = old
            info["existing_status"] = record_status(record)
            if hosts is not None and (inj.source_mode == "sersic" or bank is not None):
                new = config_hash(cfg, _hash_extra(cfg, hosts, bank), INJECTION_HASH_SECTIONS)
                info["config_hash"] = new
                complete = record_status(record) == "complete"
                if complete and new != old and not inj.force:
                    problems.append(
                        f"{rc} holds a completed run with config_hash {old}, this config's is {new}: the run "
                        "would be refused. Use a new variant/experiment_id or output, or --force to overwrite"
                    )
                elif complete and new == old and not inj.force:
                    damaged = verify_outputs(cfg, record, so)
                    if damaged:
                        problems.append(_damaged_message(rc, damaged))
                    else:
                        info["note_existing"] = (
                            "the output already holds this run (every shard verified): inject will skip it"
                        )
    except Exception as exc:  # noqa: BLE001 - unwritable outputs were reported above
        log.debug("existing run check failed: %s", exc)
    if (
        hosts is not None
        and hosts.hosts
        and not _check_bands(inj)
        and (inj.source_mode == "sersic" or bank is not None)
    ):
        try:
            tasks = _plan_from_hosts(cfg, hosts.hosts)[:benchmark_stamps]
            t0 = time.perf_counter()
            render_tasks(cfg, tasks, hosts, bank)
            per = (time.perf_counter() - t0) / max(len(tasks), 1)
            info["seconds_per_stamp"] = per
            info["estimated_seconds"] = per * n_tasks
        except Exception as exc:  # noqa: BLE001
            problems.append(f"test render failed: {type(exc).__name__}: {exc}")
    return PreflightReport(problems, info)
