# Injection run: owned by helper H8 (lead's assignment).
"""Reproducible lens-injection runs (the Gen5 seed's Stage 4c): SIE-lensed arcs added to host cutouts.

Pipeline of one run (``run_injection``):

1. **Hosts** (:func:`discover_hosts`). Lens-like galaxies are chosen from the tile MER final catalogs
   (``{data.catalog_base_uri}/{tile_id}/EUC_MER_FINAL-CAT_TILE*.fits``): detection S/N >= ``host_snr_min``,
   AB magnitude in ``host_mag_range``, ``SEMIMAJOR_AXIS >= host_min_semimajor_axis_pix`` (extended),
   ``POINT_LIKE_FLAG != 1``, ``SPURIOUS_FLAG == 0``, ``VIS_DET > 0``, ``(DET_QUALITY_FLAG & 0x78C) == 0``.
   Each host gets the first VIS quadrant (``"{row}-{col}.{quad}.SCI"`` HDU of a DET frame under
   ``data.vis_base_uri``, frames and HDUs in sorted order) that holds the whole stamp. When any band is not
   VIS (NISP: ``NIR_Y``/``NIR_J``/``NIR_H``, aliases Y/J/H), every band's host (VIS too, so all bands share one
   pixel grid) is cut from the tile's background-subtracted MER mosaics
   (``{q1}/MER/{tile_id}/*/EUC_MER_BGSUB-MOSAIC-{band}_TILE*.fits``, row-range reads), the arc flux per band
   comes from the mosaic's MAGZERO and the source magnitude in VIS plus a power-law colour drawn per task
   (:func:`source_band_mags`); missing mosaics are reported by preflight.
2. **Tasks** (:func:`plan_tasks`). A host's split is fixed by hashing (``split_seed``, host id) into
   [0, 1) against the cumulative ``split_fractions`` (default train 0.8, val 0.1, test 0.1), so a host
   never appears in two splits. Each tier (split) gets ``n_total_train_per_split`` tasks, cycling over its
   hosts; task ``k`` uses host ``k % n_hosts`` and has ``task_id = f"{tile_id}_{object_id}_{k // n_hosts}"``.
   The tasks of a split are cut into ``partitions`` contiguous shards (task k -> shard k * P // n).
3. **Parameters** (:func:`draw_task_parameters`). All randomness of a task comes from
   ``numpy.random.Generator(PCG64(int(sha256((task_id + str(seed_base)).encode()).hexdigest()[:16], 16)))``:
   SIE (theta_E, q, phi) centred on the host, external shear, source position / magnitude / shape. In
   cosmos mode the template is ``choose_cosmos_index(task_id, n_sources, cosmos_salt)`` (the seed's formula).
4. **Rendering**: :func:`constellation_assets.sim.render.render_stamps` (batched torch ray-shooting with
   sub-pixel oversampling, per-band Moffat/Gaussian PSF), flux from the quadrant's zero point
   ``MAGZEROP + 2.5 log10(EXPTIME)`` (MAGZEROP is the AB magnitude of 1 ADU/s) and the source magnitude. The
   arc's Poisson noise (gain from the header) is added from the task's generator; the host already has
   sky, read and its own Poisson noise. The host cutout is background-subtracted with the BKG frame when
   one exists (else the sigma-clipped quadrant median).
5. **Outputs**: one Parquet shard per (split, shard), written atomically, at
   ``{output}/phase{stage}/{variant}/{experiment_id}/{split}/part-{k:05d}.parquet``. Images are columns
   ``image_{band}`` of fixed-size binary holding float32 little-endian row-major (H, W) arrays in ADU
   (decode with :func:`decode_image`; ``H = W = stamp_size_pix``). Shards carry the config hash in the
   Parquet key-value metadata. The metadata columns (everything but images) plus ``shard_uri`` /
   ``row_in_shard`` are registered in the Iceberg table ``sim.injections`` (per-shard overwrite, so
   re-runs are idempotent). The effective config (``run_config_{experiment_id}.json``, with per-shard
   sha256) is written last: it marks the run complete.

Arc S/N is the matched-filter S/N of the noiseless arc against the background noise:
``sqrt(sum(arc**2)) / sigma``, with sigma the median of the RMS frame over the stamp (or the robust
scatter of the quadrant). ``magnification`` is the renderer's lensed / intrinsic source flux (before the
PSF). ``cosmos_hlr_arcsec`` is the half-light radius of the chosen COSMOS template (the unlensed source).

Determinism: same config, same data, same software and platform -> byte-identical shards
(``constellation reproduce`` checks this against the recorded sha256). Rendering on a GPU
(``compute.device``) gives slightly different floats from the CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from constellation_assets.io.uri import (
    atomic_output,
    get_fs,
    join_uri,
    list_uri,
    open_uri,
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

log = logging.getLogger(__name__)

#: What an injection run's outputs depend on (its config_hash covers these; the hosts and the COSMOS bank enter
#: through the hash's ``extra``): changing, say, the shear estimator settings does not invalidate a run.
INJECTION_HASH_SECTIONS = ("field_name", "tile_ids", "injection")

__all__ = [
    "HOST_BANDS",
    "INJECTION_CODE_VERSION",
    "SPLITS",
    "TABLE_IDENTIFIER",
    "Host",
    "InjectionError",
    "InjectionResult",
    "PreflightReport",
    "ReproduceResult",
    "RunConflictError",
    "Task",
    "TaskParameters",
    "decode_image",
    "discover_hosts",
    "draw_task_parameters",
    "parse_partition_key",
    "parse_task_id",
    "partition_keys",
    "plan_tasks",
    "preflight",
    "read_stamps",
    "register_shards",
    "render_single",
    "reproduce",
    "run_config_uri_of",
    "run_injection",
    "shard_uri",
    "split_of_host",
    "task_seed",
]

SPLITS = ("train", "val", "test")
#: Bands with host pixels: VIS (quadrants, or MER mosaics with NISP) and the NISP bands (MER mosaics).
HOST_BANDS = ("VIS", "NIR_Y", "NIR_J", "NIR_H")
TABLE_IDENTIFIER = ("sim", "injections")
#: Bumped when the injection recipe changes the numbers produced (part of the config hash).
INJECTION_CODE_VERSION = "h8-injection-v1"
IMAGE_ENCODING = "float32 little-endian row-major (H, W), ADU"
_DET_RE = re.compile(r"EUC_VIS_SWL-DET-(\d{6})-(\d{2})-.*\.fits(\.gz)?$")
_HOST_COLUMNS = [
    "OBJECT_ID",
    "RIGHT_ASCENSION",
    "DECLINATION",
    "FLUX_DETECTION_TOTAL",
    "FLUXERR_DETECTION_TOTAL",
    "SEMIMAJOR_AXIS",
    "ELLIPTICITY",
    "VIS_DET",
    "SPURIOUS_FLAG",
    "POINT_LIKE_FLAG",
    "DET_QUALITY_FLAG",
]
_RENDER_BATCH = 64  # stamps per torch batch: ~2 MB per 64x64 stamp at oversampling 4


class InjectionError(ValueError):
    """An injection run cannot proceed; the message names the input and says what to do."""


# --------------------------------------------------------------------------------------------------
# Hosts and tasks


@dataclass(frozen=True)
class Quadrant:
    """One VIS quadrant SCI HDU: where it is and what the pixels mean."""

    frame_uri: str
    hdu: str  # "{row}-{col}.{quad}.SCI"
    nx_pix: int
    ny_pix: int
    zero_point_mag: float  # AB mag giving 1 ADU in this frame (MAGZEROP + 2.5 log10 EXPTIME)
    gain_e_per_adu: float
    header: str  # the SCI header as text (WCS)

    def wcs(self):
        return _wcs_from_header_text(self.header)


@dataclass(frozen=True)
class Host:
    """A host galaxy and the quadrant its cutout comes from (pixel coordinates 0-based)."""

    tile_id: int
    object_id: int
    ra_deg: float
    dec_deg: float
    mag_ab: float
    semimajor_axis_pix: float
    frame_uri: str
    hdu: str
    x_pix: float
    y_pix: float

    @property
    def host_id(self) -> str:
        return f"{self.tile_id}_{self.object_id}"


@dataclass(frozen=True)
class Task:
    task_id: str
    split: str
    shard: int
    index_in_split: int
    host: Host


@dataclass
class TaskParameters:
    """Everything drawn for one task (angles in radians, lengths in arcsec, offsets from the stamp centre)."""

    task_id: str
    theta_e_arcsec: float
    lens_q: float
    lens_phi_rad: float
    lens_center_x_arcsec: float
    lens_center_y_arcsec: float
    shear_gamma1: float
    shear_gamma2: float
    source_x_arcsec: float
    source_y_arcsec: float
    source_mag: float
    source_mode: str
    source_hlr_arcsec: float
    source_n: float
    source_q: float
    source_phi_rad: float
    cosmos_index: int | None
    cosmos_hlr_arcsec: float | None
    noise_seed: int


@dataclass
class HostSet:
    hosts: list[Host]
    quadrants: dict[tuple[str, str], Quadrant]
    problems: list[str] = field(default_factory=list)
    #: MER-mosaic hosts only: (frame_uri, hdu) -> {band: io.q1.MosaicInfo}
    mosaics: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def digest(self) -> str:
        blob = "\n".join(
            f"{h.host_id}|{h.frame_uri.rsplit('/', 1)[-1]}|{h.hdu}|{h.x_pix:.6f}|{h.y_pix:.6f}"
            for h in self.hosts
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _hash_u64(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


def task_seed(task_id: str, seed_base: int) -> int:
    """64-bit seed of a task: ``int(sha256((task_id + str(seed_base)).encode()).hexdigest()[:16], 16)``."""
    return _hash_u64(task_id + str(seed_base))


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


def _wcs_from_header_text(text: str):
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    hdr = fits.Header.fromstring(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(hdr)


def _header_float(hdr, key: str, default: float) -> float:
    try:
        v = hdr.get(key)
        return float(str(v).strip()) if v is not None else default
    except (TypeError, ValueError):
        return default


def _list_det_frames(vis_base_uri: str, storage_options: dict | None) -> list[str]:
    out = []
    for obs_dir in list_uri(vis_base_uri, storage_options):
        name = obs_dir.rstrip("/").rsplit("/", 1)[-1]
        if not name.isdigit():
            continue
        out += [u for u in list_uri(obs_dir, storage_options) if _DET_RE.search(u.rsplit("/", 1)[-1])]
    return sorted(out)


def _read_quadrants(frame_uri: str, storage_options: dict | None) -> list[Quadrant]:
    from astropy.io import fits

    quads = []
    with (
        open_uri(frame_uri, "rb", storage_options) as f,
        fits.open(f, lazy_load_hdus=True, memmap=False) as hdul,
    ):
        primary = hdul[0].header
        for hdu in hdul:
            name = str(hdu.header.get("EXTNAME", ""))
            if not name.endswith(".SCI"):
                continue
            h = hdu.header
            exptime = _header_float(h, "EXPTIME", _header_float(primary, "EXPTIME", 1.0))
            magzp = _header_float(h, "MAGZEROP", _header_float(primary, "MAGZEROP", float("nan")))
            gain = _header_float(h, "GAIN", _header_float(primary, "GAIN", float("nan")))
            quads.append(
                Quadrant(
                    frame_uri=frame_uri,
                    hdu=name,
                    nx_pix=int(h["NAXIS1"]),
                    ny_pix=int(h["NAXIS2"]),
                    zero_point_mag=magzp + 2.5 * math.log10(max(exptime, 1e-30)),
                    gain_e_per_adu=gain,
                    header=h.tostring(),
                )
            )
    return sorted(quads, key=lambda q: q.hdu)


def _find_mer_catalog(cfg, tile_id: int) -> str | None:
    """The tile's MER final catalog (Q1 discovery: newest timestamp, then version), or None when it has none."""
    from constellation_assets.io.q1 import discover_mer_catalog
    from constellation_assets.io.uri import DataAccessError

    base = cfg.data.catalog_base_uri
    try:
        return discover_mer_catalog(base, tile_id, cfg.storage_options(base))
    except DataAccessError as exc:
        if exc.problem.startswith("No MER final catalog"):
            return None
        raise


def select_host_rows(table, inj) -> np.ndarray:
    """Mask of lens-like galaxies in a MER catalog (pyarrow Table from ``read_mer_catalog``)."""
    from constellation_assets.io.mer_catalog import DET_QUALITY_REJECT_MASK

    col = lambda n: np.asarray(table.column(n).to_numpy(zero_copy_only=False))  # noqa: E731
    mag = col("MAG_DETECTION")
    snr = col("SNR_DETECTION")
    with np.errstate(invalid="ignore"):
        m = (mag >= inj.host_mag_range[0]) & (mag <= inj.host_mag_range[1]) & (snr >= inj.host_snr_min)
        m &= col("SEMIMAJOR_AXIS") >= inj.host_min_semimajor_axis_pix
    m &= col("POINT_LIKE_FLAG") != 1
    m &= col("SPURIOUS_FLAG") == 0
    m &= col("VIS_DET") > 0
    m &= (col("DET_QUALITY_FLAG").astype(np.int64) & DET_QUALITY_REJECT_MASK) == 0
    return m


def _host_candidates(cfg, tile_id: int, inj, problems: list[str]):
    """Lens-like host candidates of a tile's MER catalog: (ids, ra, dec, mag, sma), or None (problem noted)."""
    from constellation_assets.io.mer_catalog import read_mer_catalog

    cat_uri = _find_mer_catalog(cfg, tile_id)
    if cat_uri is None:
        problems.append(
            f"tile {tile_id}: no MER final catalog (EUC_MER_FINAL-CAT_TILE{tile_id}-*.fits) under "
            f"{join_uri(cfg.data.catalog_base_uri, str(tile_id))!r}; check data.catalog_base_uri and tile_ids"
        )
        return None
    table = read_mer_catalog(cat_uri, cfg.storage_options(cat_uri), columns=_HOST_COLUMNS)
    sel = select_host_rows(table, inj)
    return tuple(
        table.column(c).to_numpy()[sel]
        for c in ("OBJECT_ID", "RIGHT_ASCENSION", "DECLINATION", "MAG_DETECTION", "SEMIMAJOR_AXIS")
    )


def discover_hosts(cfg) -> HostSet:
    """Lens-like host galaxies of the configured tiles, each with the quadrant holding its whole stamp.

    Problems that leave a tile without hosts (no catalog, no frames) are collected in ``.problems``.
    """

    inj = cfg.injection
    if _mer_mode(inj):
        return _discover_hosts_mer(cfg)
    size = inj.stamp_size_pix
    half = size // 2
    problems: list[str] = []
    vis = cfg.data.vis_base_uri
    frames = _list_det_frames(vis, cfg.storage_options(vis))
    if not frames:
        problems.append(
            f"no VIS DET frames (EUC_VIS_SWL-DET-*.fits in {{obs_id}}/ folders) under data.vis_base_uri={vis!r}; "
            "run `constellation prepare` / simulate the field, or point data.vis_base_uri at the Q1 VIS folder"
        )
    quads: list[Quadrant] = []
    for fr in frames:
        quads += _read_quadrants(fr, cfg.storage_options(fr))
    wcs_cache = {(q.frame_uri, q.hdu): q.wcs() for q in quads}

    hosts: list[Host] = []
    for tile_id in cfg.selected_tile_ids:
        cand = _host_candidates(cfg, tile_id, inj, problems)
        if cand is None:
            continue
        ids, ra, dec, mag, sma = cand
        placed = np.zeros(len(ids), dtype=bool)
        where: list[tuple[Quadrant, float, float] | None] = [None] * len(ids)
        for q in quads:
            if placed.all():
                break
            x, y = wcs_cache[(q.frame_uri, q.hdu)].all_world2pix(ra, dec, 0)
            xc = np.round(x)
            yc = np.round(y)
            fits_in = (
                np.isfinite(x)
                & np.isfinite(y)
                & (xc - half >= 0)
                & (xc - half + size <= q.nx_pix)
                & (yc - half >= 0)
                & (yc - half + size <= q.ny_pix)
            )
            for i in np.nonzero(fits_in & ~placed)[0]:
                where[i] = (q, float(x[i]), float(y[i]))
                placed[i] = True
        n_out = int((~placed).sum())
        if n_out:
            log.info(
                "tile %s: %d of %d host candidates have no quadrant holding their whole stamp",
                tile_id,
                n_out,
                len(ids),
            )
        for i in np.nonzero(placed)[0]:
            q, x, y = where[i]
            hosts.append(
                Host(
                    int(tile_id),
                    int(ids[i]),
                    float(ra[i]),
                    float(dec[i]),
                    float(mag[i]),
                    float(sma[i]),
                    q.frame_uri,
                    q.hdu,
                    x,
                    y,
                )
            )
    hosts.sort(key=lambda h: (h.tile_id, h.object_id))
    return HostSet(hosts=hosts, quadrants={(q.frame_uri, q.hdu): q for q in quads}, problems=problems)


def _check_bands(inj) -> list[str]:
    problems = []
    from constellation_assets.synthetic import canonical_band

    for b in inj.bands:
        if canonical_band(b) not in HOST_BANDS:
            problems.append(
                f"band {b!r}: no host pixels. Host cutouts exist for {list(HOST_BANDS)} (aliases Y, J, H): VIS "
                "from the Q1 VIS frames, all bands from the MER mosaics when NISP bands are configured"
            )
        fwhm = inj.psf_fwhm_arcsec.get(b)
        if fwhm is None or not (math.isfinite(fwhm) and fwhm > 0):
            problems.append(f"band {b!r}: psf_fwhm_arcsec must be a positive number of arcsec, got {fwhm!r}")
        elif fwhm > 0.5 * inj.stamp_size_pix * inj.pixel_scale_arcsec:
            problems.append(
                f'band {b!r}: PSF FWHM {fwhm}" is larger than half the stamp '
                f'({inj.stamp_size_pix} x {inj.pixel_scale_arcsec}"); increase stamp_size_pix'
            )
    if len(set(inj.bands)) != len(inj.bands):
        problems.append(f"injection.bands has duplicates: {inj.bands}")
    return problems


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


# --------------------------------------------------------------------------------------------------
# Parameters


def _load_bank(cfg):
    """The configured COSMOS bank (cached per process by :func:`~constellation_assets.sim.bank.load_cosmos_bank`)."""
    from constellation_assets.sim.bank import load_cosmos_bank

    uri = cfg.injection.cosmos_bank_h5
    if not uri:
        raise InjectionError(
            "source_mode 'cosmos' needs injection.cosmos_bank_h5; build one with "
            "`constellation bank build --cosmos-dir DIR --output BANK.h5`"
        )
    return load_cosmos_bank(str(uri), storage_options=cfg.storage_options(str(uri)) or None)


def _bank_n_sources(bank) -> int:
    return int(bank.n_sources)


def _bank_content_hash(bank) -> str | None:
    return str(bank.attrs.get("content_sha256") or "") or None


def _bank_components(bank, indices: np.ndarray, centers_arcsec: np.ndarray):
    """SourceComponents (unit flux) at ``centers_arcsec`` and the circularised Sersic-fit hlr of bank rows."""
    idx = np.asarray(indices, dtype=np.int64)
    comps = bank.components(idx, centers_arcsec)
    comps.center_arcsec = np.array(comps.center_arcsec, dtype=float)  # writable copy for torch
    return comps, np.asarray(bank.data["hlr_arcsec"][idx], dtype=float)


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


# --------------------------------------------------------------------------------------------------
# Pixels


@dataclass
class _QuadrantPixels:
    sci: np.ndarray
    background: np.ndarray | float
    rms: np.ndarray | None
    robust_sigma: float


def _find_bkg_frame(frame_uri: str, storage_options: dict | None) -> str | None:
    # BKG frames share the obs/dither but not the timestamp: match by prefix.
    d, name = frame_uri.rsplit("/", 1)
    m = _DET_RE.search(name)
    if not m:
        return None
    prefix = f"EUC_VIS_SWL-BKG-{m.group(1)}-{m.group(2)}-"
    hits = [u for u in list_uri(d, storage_options) if u.rsplit("/", 1)[-1].startswith(prefix)]
    return sorted(hits)[-1] if hits else None


_PIXEL_CACHE: dict[tuple[str, str], _QuadrantPixels] = {}
_PIXEL_CACHE_SIZE = 4  # quadrants kept in memory (a real Q1 quadrant with RMS and BKG is ~50 MB)


def _quadrant_pixels(q: Quadrant, storage_options: dict | None) -> _QuadrantPixels:
    """Pixels of a quadrant, cached for the next batches (tasks of a shard share quadrants)."""
    key = (q.frame_uri, q.hdu)
    px = _PIXEL_CACHE.pop(key, None)
    if px is None:
        px = _read_quadrant_pixels(q, storage_options)
    _PIXEL_CACHE[key] = px
    while len(_PIXEL_CACHE) > _PIXEL_CACHE_SIZE:
        _PIXEL_CACHE.pop(next(iter(_PIXEL_CACHE)))
    return px


def _read_quadrant_pixels(q: Quadrant, storage_options: dict | None) -> _QuadrantPixels:
    from astropy.io import fits
    from astropy.stats import sigma_clipped_stats

    base = q.hdu[: -len(".SCI")]
    with (
        open_uri(q.frame_uri, "rb", storage_options) as f,
        fits.open(f, lazy_load_hdus=True, memmap=False) as hdul,
    ):
        sci = np.asarray(hdul[q.hdu].data, dtype=np.float32)
        names = {str(h.header.get("EXTNAME", "")) for h in hdul}
        rms = np.asarray(hdul[base + ".RMS"].data, dtype=np.float32) if base + ".RMS" in names else None
    background: np.ndarray | float
    bkg_uri = _find_bkg_frame(q.frame_uri, storage_options)
    background = float("nan")
    if bkg_uri is not None:
        with (
            open_uri(bkg_uri, "rb", storage_options) as f,
            fits.open(f, lazy_load_hdus=True, memmap=False) as hdul,
        ):
            names = {str(h.header.get("EXTNAME", "")) for h in hdul}
            for cand in (base, base + ".BKG", q.hdu):
                if cand in names:
                    background = np.asarray(hdul[cand].data, dtype=np.float32)
                    break
    _, median, std = sigma_clipped_stats(sci, sigma=3.0, maxiters=5)
    if not isinstance(background, np.ndarray):
        background = float(median)
    return _QuadrantPixels(sci=sci, background=background, rms=rms, robust_sigma=float(std))


def _cutout(px: _QuadrantPixels, host: Host, size: int) -> tuple[np.ndarray, float, float]:
    """(background-subtracted float32 cutout, background level at the centre, noise sigma) of a host."""
    x0 = int(round(host.x_pix)) - size // 2
    y0 = int(round(host.y_pix)) - size // 2
    sl = (slice(y0, y0 + size), slice(x0, x0 + size))
    bkg = px.background[sl] if isinstance(px.background, np.ndarray) else px.background
    cut = (px.sci[sl] - bkg).astype(np.float32)
    bkg_c = float(np.median(bkg)) if isinstance(bkg, np.ndarray) else float(bkg)
    sigma = px.robust_sigma
    if px.rms is not None:
        r = px.rms[sl]
        good = r[np.isfinite(r) & (r > 0)]
        if good.size:
            sigma = float(np.median(good))
    return cut, bkg_c, sigma


def _render_arcs(
    cfg,
    tasks: Sequence[Task],
    params: Sequence[TaskParameters],
    quads: dict,
    bank,
    band_mags: np.ndarray | None = None,
    band_zp: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless arcs (B, n_bands, H, W) float32 in ADU and magnifications (B,).

    ``band_mags`` / ``band_zp`` (B, n_bands): per-band source magnitudes and zero points (MER-mosaic hosts);
    without them every band gets ``source_mag`` at the host quadrant's zero point.
    """
    from constellation_assets.sim.psf import PSFSpec
    from constellation_assets.sim.render import LensParams, render_stamps
    from constellation_assets.sim.sources import SourceComponents, flux_from_mag

    inj = cfg.injection
    arr = lambda name: np.array([getattr(p, name) for p in params], dtype=float)  # noqa: E731
    lens = LensParams(
        theta_e_arcsec=arr("theta_e_arcsec"),
        q=arr("lens_q"),
        phi_rad=arr("lens_phi_rad"),
        center_x_arcsec=arr("lens_center_x_arcsec"),
        center_y_arcsec=arr("lens_center_y_arcsec"),
        gamma1=arr("shear_gamma1"),
        gamma2=arr("shear_gamma2"),
    )
    centers = np.stack([arr("source_x_arcsec"), arr("source_y_arcsec")], axis=1)
    if inj.source_mode == "cosmos":
        idx = np.array([p.cosmos_index for p in params], dtype=np.int64)
        comps, hlr = _bank_components(bank, idx, centers)
        for p, h in zip(params, hlr, strict=True):
            p.cosmos_hlr_arcsec = float(h)
            p.source_hlr_arcsec = float(h)
    else:
        comps = SourceComponents.sersic(
            arr("source_hlr_arcsec"), arr("source_n"), arr("source_q"), arr("source_phi_rad"), centers
        )
    zp = np.array([quads[(t.host.frame_uri, t.host.hdu)].zero_point_mag for t in tasks], dtype=float)
    if not np.all(np.isfinite(zp)):
        bad = next(t for t, z in zip(tasks, zp, strict=True) if not math.isfinite(z))
        raise InjectionError(
            f"{bad.host.frame_uri} [{bad.host.hdu}]: no usable MAGZEROP/EXPTIME in the header, so arc fluxes "
            "cannot be put in ADU; use calibrated VIS frames (MAGZEROP = AB magnitude of 1 ADU/s)"
        )
    flux = np.stack([flux_from_mag(arr("source_mag"), zp) for _ in inj.bands], axis=1)
    if band_mags is not None and band_zp is not None:
        flux = flux_from_mag(band_mags, band_zp)
    psfs = [PSFSpec(inj.psf_model, float(inj.psf_fwhm_arcsec[b]), float(inj.moffat_beta)) for b in inj.bands]
    res = render_stamps(
        comps,
        flux,
        stamp_size_pix=inj.stamp_size_pix,
        pixel_scale_arcsec=inj.pixel_scale_arcsec,
        psf=psfs,
        lens=lens,
        oversampling=inj.oversampling,
        batch_size=min(_RENDER_BATCH, cfg.compute.batch_size),
        device=_device(cfg),
    )
    return res.images_adu.detach().cpu().numpy().astype(
        np.float32
    ), res.magnification.detach().cpu().numpy().astype(np.float64)


def _device(cfg) -> str:
    dev = cfg.compute.device
    if dev == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev


@dataclass
class RenderedTask:
    task: Task
    params: TaskParameters
    host: np.ndarray  # (n_bands, H, W) background-subtracted host cutouts
    arc: np.ndarray  # (n_bands, H, W) noiseless arc
    composite: np.ndarray  # (n_bands, H, W) host + arc + arc Poisson noise
    magnification: float
    arc_snr: list[float]
    noise_sigma_adu: float
    background_adu: float
    zero_point_mag: float
    #: MER-mosaic hosts only (per band, in ``injection.bands`` order)
    band_zero_point_mag: list[float] | None = None
    band_noise_sigma: list[float] | None = None
    band_source_mag: list[float] | None = None


def render_tasks(cfg, tasks: Sequence[Task], hosts: HostSet, bank=None) -> list[RenderedTask]:
    """Render a batch of tasks: parameters, arcs, host cutouts, composites (same code for runs and --single)."""
    inj = cfg.injection
    n_src = _bank_n_sources(bank) if bank is not None else None
    params = [draw_task_parameters(t, cfg, n_src) for t in tasks]
    if not tasks:
        return []
    if _mer_mode(inj):
        return _render_tasks_mer(cfg, tasks, params, hosts, bank)
    arcs, mags = _render_arcs(cfg, tasks, params, hosts.quadrants, bank)
    out = []
    by_quad: dict[tuple[str, str], list[int]] = {}
    for i, t in enumerate(tasks):
        by_quad.setdefault((t.host.frame_uri, t.host.hdu), []).append(i)
    cut: dict[int, tuple[np.ndarray, float, float]] = {}
    for key in sorted(by_quad):
        q = hosts.quadrants[key]
        px = _quadrant_pixels(q, cfg.storage_options(q.frame_uri))
        for i in by_quad[key]:
            cut[i] = _cutout(px, tasks[i].host, inj.stamp_size_pix)
    for i, (t, p) in enumerate(zip(tasks, params, strict=True)):
        host_img, bkg, sigma = cut[i]
        q = hosts.quadrants[(t.host.frame_uri, t.host.hdu)]
        arc = arcs[i]
        comp = np.empty_like(arc)
        rng = np.random.Generator(np.random.PCG64(p.noise_seed))
        for b in range(len(inj.bands)):
            noisy = arc[b].astype(np.float64)
            if inj.arc_poisson_noise and math.isfinite(q.gain_e_per_adu) and q.gain_e_per_adu > 0:
                lam = np.clip(noisy, 0.0, None) * q.gain_e_per_adu
                noisy = rng.poisson(lam).astype(np.float64) / q.gain_e_per_adu
            comp[b] = (host_img + noisy).astype(np.float32)
        snr = [
            float(np.sqrt(np.sum(arc[b].astype(np.float64) ** 2)) / sigma) if sigma > 0 else float("nan")
            for b in range(len(inj.bands))
        ]
        out.append(
            RenderedTask(
                task=t,
                params=p,
                host=np.stack([host_img] * len(inj.bands)),
                arc=arc,
                composite=comp,
                magnification=float(mags[i]),
                arc_snr=snr,
                noise_sigma_adu=sigma,
                background_adu=bkg,
                zero_point_mag=q.zero_point_mag,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# NISP bands: hosts from the background-subtracted MER mosaics (helper H12)

#: Injected sources' SED slope alpha (f_nu ~ lambda**alpha): lensed sources are mostly blue star-forming
#: galaxies; colours m_band - m_VIS = -2.5 alpha log10(lambda_band / lambda_VIS) (``synthetic.band_colour_mag``).
SOURCE_SED_ALPHA_RANGE = (-0.5, 1.5)
#: The band of ``source_mag_range`` (and of ``source_mag``).
SOURCE_REFERENCE_BAND = "VIS"
MER_HOST_HDU = "MER_MOSAIC"


def _mer_mode(inj) -> bool:
    """True when any configured band is not VIS: every band's host then comes from the MER mosaics."""
    from constellation_assets.synthetic import canonical_band

    return any(canonical_band(b) != "VIS" for b in inj.bands)


def mer_base_uri(cfg) -> str:
    """Where the MER mosaics are: ``{q1 root}/MER/`` next to ``data.vis_base_uri`` (the Q1 layout)."""
    from constellation_assets.io.q1 import default_mer_base_uri

    return default_mer_base_uri(cfg.data.vis_base_uri)


def source_sed_alpha(task_id: str, seed_base: int) -> float:
    """The source's SED slope, drawn per task from its own generator (independent of the lens draws)."""
    rng = np.random.Generator(np.random.PCG64(_hash_u64(f"{task_id}|source-sed|{seed_base}")))
    return float(rng.uniform(*SOURCE_SED_ALPHA_RANGE))


def source_band_mags(task_id: str, seed_base: int, source_mag: float, bands: Sequence[str]) -> np.ndarray:
    """Source AB magnitude per band: ``source_mag`` (VIS) plus the power-law colour of the task's SED."""
    from constellation_assets.synthetic import band_colour_mag

    alpha = source_sed_alpha(task_id, seed_base)
    return np.array([source_mag + float(band_colour_mag(b, alpha, SOURCE_REFERENCE_BAND)) for b in bands])


def _discover_hosts_mer(cfg) -> HostSet:
    """Hosts placed on the tile's MER mosaics (all configured bands must exist and share one pixel grid)."""
    from constellation_assets.io.q1 import discover_mer_mosaics, read_mosaic_info
    from constellation_assets.synthetic import canonical_band

    inj = cfg.injection
    size = inj.stamp_size_pix
    half = size // 2
    base = mer_base_uri(cfg)
    so = cfg.storage_options(base)
    problems: list[str] = []
    hosts: list[Host] = []
    quads: dict[tuple[str, str], Quadrant] = {}
    mosaics: dict[tuple[str, str], dict[str, Any]] = {}
    for tile_id in cfg.selected_tile_ids:
        found = discover_mer_mosaics(base, tile_id, so, bands=[canonical_band(b) for b in inj.bands])
        missing = [b for b in inj.bands if canonical_band(b) not in found]
        if missing:
            problems.append(
                f"tile {tile_id}: {', '.join(f'band {b!r}' for b in missing)}: no MER mosaic "
                f"(EUC_MER_BGSUB-MOSAIC-{{VIS|NIR-Y|NIR-J|NIR-H}}_TILE{tile_id}-*.fits) under "
                f"{join_uri(base, str(tile_id))!r}. Bands other than VIS take every band's host from the "
                "background-subtracted MER mosaics: point data.vis_base_uri at a Q1 root that has q1/MER/, "
                "generate the demo field with field.write_mer_mosaics: true (`constellation simulate-field "
                "--force`), or set injection.bands to ['VIS']"
            )
            continue
        infos = {b: read_mosaic_info(found[canonical_band(b)], so) for b in inj.bands}
        ref = infos[inj.bands[0]]
        grid_keys = (
            "NAXIS1",
            "NAXIS2",
            "CRPIX1",
            "CRPIX2",
            "CRVAL1",
            "CRVAL2",
            "CD1_1",
            "CD1_2",
            "CD2_1",
            "CD2_2",
        )
        off = [
            b
            for b, m in infos.items()
            if any(
                not math.isclose(
                    float(m.header.get(k, 0.0)), float(ref.header.get(k, 0.0)), rel_tol=1e-9, abs_tol=1e-12
                )
                for k in grid_keys
            )
        ]
        if off:
            problems.append(
                f"tile {tile_id}: MER mosaics of band(s) {off} are not on the pixel grid of {inj.bands[0]!r} "
                '(NAXIS/CRPIX/CRVAL/CD differ); use the MER BGSUB mosaics of one tile (all resampled to 0.1")'
            )
            continue
        bad_zp = [b for b, m in infos.items() if not math.isfinite(m.zero_point_mag)]
        if bad_zp:
            problems.append(
                f"tile {tile_id}: MER mosaic(s) of band(s) {bad_zp} have no MAGZERO in the header, so arc fluxes "
                "cannot be put in mosaic units"
            )
            continue
        key = (ref.uri, MER_HOST_HDU)
        quads[key] = Quadrant(
            frame_uri=ref.uri,
            hdu=MER_HOST_HDU,
            nx_pix=ref.nx_pix,
            ny_pix=ref.ny_pix,
            zero_point_mag=ref.zero_point_mag,
            gain_e_per_adu=_header_float(ref.header, "GAIN", float("nan")),
            header=ref.header.tostring(),
        )
        mosaics[key] = infos
        cand = _host_candidates(cfg, tile_id, inj, problems)
        if cand is None:
            continue
        ids, ra, dec, mag, sma = cand
        x, y = ref.wcs().all_world2pix(ra, dec, 0)
        xc, yc = np.round(x), np.round(y)
        with np.errstate(invalid="ignore"):
            inside = (
                np.isfinite(x)
                & np.isfinite(y)
                & (xc - half >= 0)
                & (xc - half + size <= ref.nx_pix)
                & (yc - half >= 0)
                & (yc - half + size <= ref.ny_pix)
            )
        for i in np.nonzero(inside)[0]:
            hosts.append(
                Host(
                    int(tile_id),
                    int(ids[i]),
                    float(ra[i]),
                    float(dec[i]),
                    float(mag[i]),
                    float(sma[i]),
                    ref.uri,
                    MER_HOST_HDU,
                    float(x[i]),
                    float(y[i]),
                )
            )
    hosts.sort(key=lambda h: (h.tile_id, h.object_id))
    return HostSet(hosts=hosts, quadrants=quads, problems=problems, mosaics=mosaics)


def _mer_cutouts(cfg, hosts: HostSet, tasks: Sequence[Task]) -> dict[str, tuple[np.ndarray, list[float]]]:
    """Per host: (n_bands, H, W) cutouts (one row-range read per band) and the per-band noise sigma."""
    from astropy.stats import sigma_clipped_stats

    from constellation_assets.io.q1 import read_mosaic_cutout

    inj = cfg.injection
    size = inj.stamp_size_pix
    out: dict[str, tuple[np.ndarray, list[float]]] = {}
    for t in tasks:
        h = t.host
        if h.host_id in out:
            continue
        infos = hosts.mosaics[(h.frame_uri, h.hdu)]
        x0 = int(round(h.x_pix)) - size // 2
        y0 = int(round(h.y_pix)) - size // 2
        cubes, sig = [], []
        for b in inj.bands:
            info = infos[b]
            c = read_mosaic_cutout(info, x0, y0, size, size, cfg.storage_options(info.uri)).data
            cubes.append(c)
            _, _, std = sigma_clipped_stats(c, sigma=3.0, maxiters=5)
            sig.append(float(std))
        out[h.host_id] = (np.stack(cubes), sig)
    return out


def _render_tasks_mer(cfg, tasks: Sequence[Task], params: Sequence[TaskParameters], hosts: HostSet, bank):
    """:func:`render_tasks` for MER-mosaic hosts: per-band cutouts, zero points and source colours."""
    inj = cfg.injection
    zp = np.array(
        [[hosts.mosaics[(t.host.frame_uri, t.host.hdu)][b].zero_point_mag for b in inj.bands] for t in tasks]
    )
    mags = np.stack(
        [
            source_band_mags(t.task_id, inj.seed_base, p.source_mag, inj.bands)
            for t, p in zip(tasks, params, strict=True)
        ]
    )
    arcs, magn = _render_arcs(cfg, tasks, params, hosts.quadrants, bank, band_mags=mags, band_zp=zp)
    cut = _mer_cutouts(cfg, hosts, tasks)
    out = []
    for i, (t, p) in enumerate(zip(tasks, params, strict=True)):
        host_img, sig = cut[t.host.host_id]
        q = hosts.quadrants[(t.host.frame_uri, t.host.hdu)]
        arc = arcs[i]
        comp = np.empty_like(arc)
        rng = np.random.Generator(np.random.PCG64(p.noise_seed))
        for b in range(len(inj.bands)):
            noisy = arc[b].astype(np.float64)
            gain = _header_float(
                hosts.mosaics[(t.host.frame_uri, t.host.hdu)][inj.bands[b]].header, "GAIN", float("nan")
            )
            if inj.arc_poisson_noise and math.isfinite(gain) and gain > 0:
                noisy = rng.poisson(np.clip(noisy, 0.0, None) * gain).astype(np.float64) / gain
            comp[b] = (host_img[b] + noisy).astype(np.float32)
        snr = [
            float(np.sqrt(np.sum(arc[b].astype(np.float64) ** 2)) / sig[b]) if sig[b] > 0 else float("nan")
            for b in range(len(inj.bands))
        ]
        out.append(
            RenderedTask(
                task=t,
                params=p,
                host=host_img.astype(np.float32),
                arc=arc,
                composite=comp,
                magnification=float(magn[i]),
                arc_snr=snr,
                noise_sigma_adu=float(sig[0]),
                background_adu=0.0,
                zero_point_mag=q.zero_point_mag,
                band_zero_point_mag=[float(z) for z in zp[i]],
                band_noise_sigma=[float(s) for s in sig],
                band_source_mag=[float(m) for m in mags[i]],
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# Shards


def _schema(bands: Sequence[str], size: int, per_band_mer: bool = False):
    import pyarrow as pa

    fields = [
        ("task_id", pa.string()),
        ("split", pa.string()),
        ("shard", pa.int32()),
        ("index_in_split", pa.int64()),
        ("stage", pa.string()),
        ("variant", pa.string()),
        ("experiment_id", pa.string()),
        ("tile_id", pa.int64()),
        ("object_id", pa.int64()),
        ("host_ra_deg", pa.float64()),
        ("host_dec_deg", pa.float64()),
        ("host_mag_ab", pa.float64()),
        ("host_semimajor_axis_pix", pa.float64()),
        ("host_frame", pa.string()),
        ("host_hdu", pa.string()),
        ("host_x_pix", pa.float64()),
        ("host_y_pix", pa.float64()),
        ("host_background_adu", pa.float64()),
        ("noise_sigma_adu", pa.float64()),
        ("zero_point_mag", pa.float64()),
        ("theta_e_arcsec", pa.float64()),
        ("lens_q", pa.float64()),
        ("lens_phi_rad", pa.float64()),
        ("lens_center_x_arcsec", pa.float64()),
        ("lens_center_y_arcsec", pa.float64()),
        ("shear_gamma1", pa.float64()),
        ("shear_gamma2", pa.float64()),
        ("source_mode", pa.string()),
        ("source_x_arcsec", pa.float64()),
        ("source_y_arcsec", pa.float64()),
        ("source_mag", pa.float64()),
        ("source_hlr_arcsec", pa.float64()),
        ("source_n", pa.float64()),
        ("source_q", pa.float64()),
        ("source_phi_rad", pa.float64()),
        ("cosmos_index", pa.int64()),
        ("cosmos_hlr_arcsec", pa.float64()),
        ("magnification", pa.float64()),
        ("arc_snr", pa.float64()),
        ("psf_model", pa.string()),
        ("moffat_beta", pa.float64()),
        ("stamp_size_pix", pa.int32()),
        ("pixel_scale_arcsec", pa.float64()),
    ]
    for b in bands:
        fields.append((f"arc_snr_{b}", pa.float64()))
        fields.append((f"psf_fwhm_arcsec_{b}", pa.float64()))
        if per_band_mer:  # MER-mosaic hosts: per-band zero point, noise and source magnitude
            fields.append((f"zero_point_mag_{b}", pa.float64()))
            fields.append((f"noise_sigma_{b}", pa.float64()))
            fields.append((f"source_mag_{b}", pa.float64()))
    for b in bands:
        fields.append((f"image_{b}", pa.binary(size * size * 4)))
    return pa.schema([pa.field(n, t) for n, t in fields])


def _rows_table(cfg, rendered: Sequence[RenderedTask]):
    import pyarrow as pa

    inj = cfg.injection
    schema = _schema(inj.bands, inj.stamp_size_pix, _mer_mode(inj))
    cols: dict[str, list] = {f.name: [] for f in schema}
    for r in rendered:
        t, p, h = r.task, r.params, r.task.host
        vals = {
            "task_id": t.task_id,
            "split": t.split,
            "shard": t.shard,
            "index_in_split": t.index_in_split,
            "stage": inj.stage,
            "variant": inj.variant,
            "experiment_id": inj.experiment_id,
            "tile_id": h.tile_id,
            "object_id": h.object_id,
            "host_ra_deg": h.ra_deg,
            "host_dec_deg": h.dec_deg,
            "host_mag_ab": h.mag_ab,
            "host_semimajor_axis_pix": h.semimajor_axis_pix,
            "host_frame": h.frame_uri.rsplit("/", 1)[-1],
            "host_hdu": h.hdu,
            "host_x_pix": h.x_pix,
            "host_y_pix": h.y_pix,
            "host_background_adu": r.background_adu,
            "noise_sigma_adu": r.noise_sigma_adu,
            "zero_point_mag": r.zero_point_mag,
            "magnification": r.magnification,
            "arc_snr": float(np.sqrt(np.sum(np.square(r.arc_snr)))),
            "psf_model": inj.psf_model,
            "moffat_beta": float(inj.moffat_beta),
            "stamp_size_pix": inj.stamp_size_pix,
            "pixel_scale_arcsec": inj.pixel_scale_arcsec,
        }
        for k in (
            "theta_e_arcsec",
            "lens_q",
            "lens_phi_rad",
            "lens_center_x_arcsec",
            "lens_center_y_arcsec",
            "shear_gamma1",
            "shear_gamma2",
            "source_mode",
            "source_x_arcsec",
            "source_y_arcsec",
            "source_mag",
            "source_hlr_arcsec",
            "source_n",
            "source_q",
            "source_phi_rad",
            "cosmos_index",
            "cosmos_hlr_arcsec",
        ):
            vals[k] = getattr(p, k)
        if p.source_mode == "cosmos":
            vals["source_n"] = None  # morphology from the bank (possibly bulge + disk), not one Sersic
            vals["source_q"] = None
            vals["source_phi_rad"] = None
        for j, b in enumerate(inj.bands):
            vals[f"arc_snr_{b}"] = r.arc_snr[j]
            vals[f"psf_fwhm_arcsec_{b}"] = float(inj.psf_fwhm_arcsec[b])
            if r.band_zero_point_mag is not None:
                vals[f"zero_point_mag_{b}"] = r.band_zero_point_mag[j]
                vals[f"noise_sigma_{b}"] = r.band_noise_sigma[j]
                vals[f"source_mag_{b}"] = r.band_source_mag[j]
            vals[f"image_{b}"] = np.ascontiguousarray(r.composite[j], dtype="<f4").tobytes()
        for k in cols:
            cols[k].append(vals[k])
    return pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in cols.items()}, schema=schema)


def _shard_metadata(cfg, h: str) -> dict[bytes, bytes]:
    inj = cfg.injection
    return {
        b"constellation.config_hash": h.encode(),
        b"constellation.image_encoding": IMAGE_ENCODING.encode(),
        b"constellation.stamp_size_pix": str(inj.stamp_size_pix).encode(),
        b"constellation.bands": json.dumps(list(inj.bands)).encode(),
        b"constellation.injection_code": INJECTION_CODE_VERSION.encode(),
    }


def _write_shard(uri: str, table, meta: dict, storage_options: dict | None) -> str:
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata(meta)
    with atomic_output(uri, storage_options) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, write_statistics=True)
        with open(tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return digest


def _shard_hash(uri: str, storage_options: dict | None) -> str | None:
    import pyarrow.parquet as pq

    fs, path = get_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    v = meta.get(b"constellation.config_hash")
    return v.decode() if v else None


def decode_image(value: bytes, stamp_size_pix: int) -> np.ndarray:
    """One ``image_{band}`` cell -> float32 array (H, W)."""
    return np.frombuffer(value, dtype="<f4").reshape(stamp_size_pix, stamp_size_pix)


def read_stamps(uri: str, storage_options: dict | None = None, bands: Sequence[str] | None = None):
    """Read a shard: (pyarrow Table of parameters, {band: float32 array (N, H, W)})."""
    import pyarrow.parquet as pq

    data = read_bytes(uri, storage_options)
    table = pq.read_table(io.BytesIO(data))
    meta = table.schema.metadata or {}
    size = int(meta.get(b"constellation.stamp_size_pix", b"0")) or int(
        table.column("stamp_size_pix")[0].as_py()
    )
    img_cols = [c for c in table.column_names if c.startswith("image_")]
    want = [f"image_{b}" for b in bands] if bands else img_cols
    images = {}
    for c in want:
        buf = b"".join(v.as_py() for v in table.column(c))
        images[c[len("image_") :]] = np.frombuffer(buf, dtype="<f4").reshape(-1, size, size)
    return table.drop_columns(img_cols), images


# --------------------------------------------------------------------------------------------------
# Iceberg registration


def _metadata_only(cfg, uri: str, table, storage_options: dict | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if table is None:
        pf = pq.ParquetFile(io.BytesIO(read_bytes(uri, storage_options)))
        table = pf.read(columns=[c for c in pf.schema_arrow.names if not c.startswith("image_")])
    else:
        table = table.drop_columns([c for c in table.column_names if c.startswith("image_")])
    n = table.num_rows
    table = table.replace_schema_metadata(None)
    keys = [
        f"{s}/{int(k):05d}"
        for s, k in zip(table.column("split").to_pylist(), table.column("shard").to_pylist(), strict=True)
    ]
    table = table.append_column("shard_key", pa.array(keys, pa.string()))
    table = table.append_column("shard_uri", pa.array([uri] * n, pa.string()))
    table = table.append_column("row_in_shard", pa.array(np.arange(n, dtype=np.int32)))
    return table.append_column("run_output_uri", pa.array([cfg.injection_output] * n, pa.string()))


def register_shards(cfg, shards: Sequence[tuple[str, str, Any]], storage_options: dict | None = None) -> int:
    """Replace the rows of these shards in the Iceberg table ``sim.injections``, in one commit.

    ``shards``: ``(shard_key "split/00003", shard uri, pyarrow table or None to read it back)``. Rows hold every
    column but the images, plus ``shard_key``, ``shard_uri``, ``row_in_shard`` and ``run_output_uri``.
    """
    import warnings

    import pyarrow as pa
    from pyiceberg.expressions import And, EqualTo, In

    from constellation_assets.catalog.tables import open_catalog

    if not shards:
        return 0
    table = pa.concat_tables([_metadata_only(cfg, uri, t, storage_options) for _, uri, t in shards])
    catalog = open_catalog(cfg)
    with contextlib.suppress(Exception):  # racing creators: the namespace exists
        catalog.create_namespace_if_not_exists(TABLE_IDENTIFIER[0])
    _load_or_create_table(catalog, table.schema)
    inj = cfg.injection
    flt = And(
        And(EqualTo("run_output_uri", cfg.injection_output), EqualTo("stage", inj.stage)),
        And(
            And(EqualTo("variant", inj.variant), EqualTo("experiment_id", inj.experiment_id)),
            In("shard_key", sorted({k for k, _, _ in shards})),
        ),
    )
    for attempt in range(6):
        try:
            itable = catalog.load_table(TABLE_IDENTIFIER)
            arrow = table.cast(itable.schema().as_arrow()) if _same_names(itable, table) else table
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Delete operation did not match any records")
                itable.overwrite(arrow, overwrite_filter=flt)
            return table.num_rows
        except Exception as exc:  # noqa: BLE001
            if "CommitFailed" not in type(exc).__name__ or attempt == 5:
                raise
            time.sleep(0.1 * 2**attempt)
    return table.num_rows


def _same_names(itable, table) -> bool:
    return [f.name for f in itable.schema().fields] == table.column_names


def _load_or_create_table(catalog, schema):
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

    for _ in range(5):
        try:
            t = catalog.load_table(TABLE_IDENTIFIER)
            missing = [n for n in schema.names if n not in {f.name for f in t.schema().fields}]
            if missing:  # new bands: widen the table
                with t.update_schema() as upd:
                    upd.union_by_name(schema)
                t = catalog.load_table(TABLE_IDENTIFIER)
            return t
        except NoSuchTableError:
            pass
        try:
            return catalog.create_table(TABLE_IDENTIFIER, schema=schema)
        except TableAlreadyExistsError:
            continue
    return catalog.load_table(TABLE_IDENTIFIER)


# --------------------------------------------------------------------------------------------------
# Runs


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


# --------------------------------------------------------------------------------------------------
# Reproduce, single injection, preflight


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


@dataclass
class PreflightReport:
    problems: list[str]
    info: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.problems


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
    try:
        rc = run_config_uri(out, inj.stage_dir, inj.variant, inj.experiment_id)
        if uri_exists(rc, so):
            old = json.loads(read_text(rc, so)).get("config_hash")
            info["existing_run_config"] = rc
            info["existing_config_hash"] = old
            if hosts is not None and (inj.source_mode == "sersic" or bank is not None):
                new = config_hash(cfg, _hash_extra(cfg, hosts, bank), INJECTION_HASH_SECTIONS)
                info["config_hash"] = new
                if new != old and not inj.force:
                    problems.append(
                        f"{rc} holds a completed run with config_hash {old}, this config's is {new}: the run "
                        "would be refused. Use a new variant/experiment_id or output, or --force to overwrite"
                    )
                elif new == old and not inj.force:
                    info["note_existing"] = "the output already holds this run: inject will skip it"
    except Exception:  # noqa: BLE001 - unwritable outputs were reported above
        pass
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
