"""Tasks of a run: host -> split assignment, task ids, shards, output locations and per-task parameters."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import numpy as np

from constellation_assets.io.uri import (
    join_uri,
)
from constellation_assets.provenance import (
    run_config_uri,
)
from constellation_assets.sim.injection.common import (
    SPLITS,
    Host,
    HostSet,
    InjectionError,
    Task,
    TaskParameters,
    _hash_u64,
    task_seed,
)
from constellation_assets.sim.injection.hosts import _check_bands, discover_hosts

log = logging.getLogger(__name__)


def split_of_host(host_id: str, split_seed: int, fractions: dict[str, float]) -> str:
    """Split of a host: sha256 of (split_seed, host id) mapped to [0, 1) against cumulative fractions."""
    u = _hash_u64(f"{split_seed}:{host_id}") / 2.0**64
    acc = 0.0
    last = None
    for name in SPLITS:
        frac = float(fractions.get(name, 0.0))
        if frac <= 0:
            continue
        acc += frac
        last = name
        if u < acc:
            return name
    return last or "train"


def parse_task_id(task_id: str) -> tuple[int, int, int]:
    """``"{tile_id}_{object_id}_{repeat}"`` -> (tile_id, object_id, repeat); OBJECT_IDs may be negative."""
    parts = str(task_id).split("_")
    try:
        if len(parts) != 3:
            raise ValueError
        return int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        raise InjectionError(
            f"task_id {task_id!r} is not of the form '{{tile_id}}_{{object_id}}_{{repeat}}' "
            "(e.g. 102044185_1234567_0); list task ids with `constellation inject --list-tasks`"
        ) from None


def _plan_from_hosts(cfg, hosts: Sequence[Host]) -> list[Task]:
    inj = cfg.injection
    by_split: dict[str, list[Host]] = {s: [] for s in SPLITS}
    for h in hosts:
        by_split[split_of_host(h.host_id, inj.split_seed, inj.split_fractions)].append(h)
    tasks: list[Task] = []
    n = inj.n_total_train_per_split
    p = min(inj.partitions, n)
    for split in inj.tiers:
        pool = by_split[split]
        if not pool:
            continue
        for k in range(n):
            h = pool[k % len(pool)]
            tasks.append(Task(f"{h.tile_id}_{h.object_id}_{k // len(pool)}", split, k * p // n, k, h))
    return tasks


def plan_tasks(cfg, hosts: HostSet | None = None) -> list[Task]:
    """All tasks of the run, in (tier, index) order. Raises :class:`InjectionError` if a tier has no host."""
    problems = _check_bands(cfg.injection)
    if problems:
        raise InjectionError("; ".join(problems))
    hosts = hosts if hosts is not None else discover_hosts(cfg)
    tasks = _plan_from_hosts(cfg, hosts.hosts)
    empty = [t for t in cfg.injection.tiers if not any(task.split == t for task in tasks)]
    if empty:
        msg = (
            f"no host galaxies for tier(s) {empty} ({len(hosts.hosts)} hosts in all); "
            + "; ".join(hosts.problems)
            + " Loosen injection.host_mag_range / host_min_semimajor_axis_pix / host_snr_min, add tiles, "
            "or change split_fractions"
        )
        raise InjectionError(msg)
    return tasks


def shards_of(cfg) -> list[tuple[str, int]]:
    inj = cfg.injection
    return [(s, k) for s in inj.tiers for k in range(min(inj.partitions, inj.n_total_train_per_split))]


def partition_keys(cfg) -> list[str]:
    """Dagster partition keys ``"{split}/{k:05d}"`` of every shard of the run."""
    return [f"{s}/{k:05d}" for s, k in shards_of(cfg)]


def _parse_partition(p) -> tuple[str, int]:
    if isinstance(p, (tuple, list)) and len(p) == 2:
        return str(p[0]), int(p[1])
    m = re.fullmatch(r"(train|val|test)[/:|-](\d+)", str(p))
    if not m:
        raise InjectionError(f"partition {p!r} is not 'split/shard' (e.g. 'train/00003') or (split, shard)")
    return m.group(1), int(m.group(2))


def parse_partition_key(key) -> tuple[str, int]:
    """``"train/00003"`` (or ``("train", 3)``) -> ``("train", 3)``."""
    return _parse_partition(key)


def run_dir(cfg) -> str:
    inj = cfg.injection
    return join_uri(cfg.injection_output, inj.stage_dir, inj.variant, inj.experiment_id)


def run_config_uri_of(cfg) -> str:
    """``{output}/phase{stage}/{variant}/run_config_{experiment_id}.json`` (written last: marks completion)."""
    inj = cfg.injection
    return run_config_uri(cfg.injection_output, inj.stage_dir, inj.variant, inj.experiment_id)


def shard_uri(cfg, split: str, shard: int) -> str:
    """``{output}/phase{stage}/{variant}/{experiment_id}/{split}/part-{k:05d}.parquet``."""
    return join_uri(run_dir(cfg), split, f"part-{shard:05d}.parquet")


def _u(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return float(rng.uniform(lo, hi)) if hi > lo else lo


def draw_task_parameters(task: Task, cfg, n_cosmos_sources: int | None = None) -> TaskParameters:
    """Lens and source parameters of a task, from its own generator (no global state).

    Draw order (fixed; part of the recipe): theta_E, q, phi, |gamma|, shear angle, source radius, source angle,
    source magnitude, Sersic hlr, n, q, phi (drawn in both modes, so cosmos runs share the lens draws), noise seed.
    """
    from constellation_assets.sim.sources import choose_cosmos_index

    inj = cfg.injection
    rng = np.random.Generator(np.random.PCG64(task_seed(task.task_id, inj.seed_base)))
    theta_e = _u(rng, inj.theta_e_range_arcsec)
    lens_q = _u(rng, inj.lens_q_range)
    lens_phi = float(rng.uniform(0.0, math.pi))
    g = inj.external_shear_max * float(rng.uniform(0.0, 1.0))
    g_ang = float(rng.uniform(0.0, math.pi))
    r = theta_e * inj.source_offset_max_frac * math.sqrt(float(rng.uniform(0.0, 1.0)))
    r_ang = float(rng.uniform(0.0, 2.0 * math.pi))
    mag = _u(rng, inj.source_mag_range)
    hlr = _u(rng, inj.source_hlr_range_arcsec)
    n = _u(rng, inj.source_n_range)
    sq = _u(rng, inj.source_q_range)
    sphi = float(rng.uniform(0.0, math.pi))
    noise_seed = int(rng.integers(0, 2**63 - 1))
    cx = (task.host.x_pix - round(task.host.x_pix)) * inj.pixel_scale_arcsec
    cy = (task.host.y_pix - round(task.host.y_pix)) * inj.pixel_scale_arcsec
    cosmos_index = None
    if inj.source_mode == "cosmos":
        if not n_cosmos_sources:
            raise InjectionError("cosmos mode needs the number of bank sources (the bank is empty?)")
        cosmos_index = choose_cosmos_index(task.task_id, int(n_cosmos_sources), inj.cosmos_salt)
    return TaskParameters(
        task_id=task.task_id,
        theta_e_arcsec=theta_e,
        lens_q=lens_q,
        lens_phi_rad=lens_phi,
        lens_center_x_arcsec=cx,
        lens_center_y_arcsec=cy,
        shear_gamma1=g * math.cos(2.0 * g_ang),
        shear_gamma2=g * math.sin(2.0 * g_ang),
        source_x_arcsec=cx + r * math.cos(r_ang),
        source_y_arcsec=cy + r * math.sin(r_ang),
        source_mag=mag,
        source_mode=inj.source_mode,
        source_hlr_arcsec=hlr,
        source_n=n,
        source_q=sq,
        source_phi_rad=sphi,
        cosmos_index=cosmos_index,
        cosmos_hlr_arcsec=None,
        noise_seed=noise_seed,
    )


#: Injected sources' SED slope alpha (f_nu ~ lambda**alpha): lensed sources are mostly blue star-forming
#: galaxies; colours m_band - m_VIS = -2.5 alpha log10(lambda_band / lambda_VIS) (``synthetic.band_colour_mag``).
SOURCE_SED_ALPHA_RANGE = (-0.5, 1.5)


#: The band of ``source_mag_range`` (and of ``source_mag``).
SOURCE_REFERENCE_BAND = "VIS"


def source_sed_alpha(task_id: str, seed_base: int) -> float:
    """The source's SED slope, drawn per task from its own generator (independent of the lens draws)."""
    rng = np.random.Generator(np.random.PCG64(_hash_u64(f"{task_id}|source-sed|{seed_base}")))
    return float(rng.uniform(*SOURCE_SED_ALPHA_RANGE))


def source_band_mags(task_id: str, seed_base: int, source_mag: float, bands: Sequence[str]) -> np.ndarray:
    """Source AB magnitude per band: ``source_mag`` (VIS) plus the power-law colour of the task's SED."""
    from constellation_assets.synthetic import band_colour_mag

    alpha = source_sed_alpha(task_id, seed_base)
    return np.array([source_mag + float(band_colour_mag(b, alpha, SOURCE_REFERENCE_BAND)) for b in bands])


def find_task(cfg, task_id: str, hosts: HostSet | None = None) -> tuple[Task, HostSet]:
    """The task for ``task_id`` (tile_object_repeat), even outside the planned tasks of this run."""
    tile_id, object_id, _ = parse_task_id(task_id)
    hosts = hosts if hosts is not None else discover_hosts(cfg)
    for t in _plan_from_hosts(cfg, hosts.hosts):
        if t.task_id == task_id:
            return t, hosts
    for hst in hosts.hosts:
        if hst.tile_id == tile_id and hst.object_id == object_id:
            split = split_of_host(hst.host_id, cfg.injection.split_seed, cfg.injection.split_fractions)
            return Task(task_id, split, -1, -1, hst), hosts
    raise InjectionError(
        f"task {task_id!r}: no host galaxy OBJECT_ID {object_id} in tile {tile_id} passes the host selection "
        "or fits a quadrant; list valid task ids with `constellation inject --list-tasks`"
    )
