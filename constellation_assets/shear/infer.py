"""Shear inference for one sub-tile manifest: stamps -> estimator -> per-source Parquet + sub-tile summary.

``infer_manifest(cfg, manifest_uri)`` is what the CLI (``constellation infer``), the pipes worker
(``python -m constellation_assets.shear.worker``) and the Dagster assets call.

Engines (``inference.engine`` in the config, an opaque section):

``builtin`` (default)
    The PyTorch FPFS estimator (:func:`constellation_assets.shear.measure_stamps`) on stamps cut by
    :mod:`constellation_assets.shear.stamps`, measured per exposure in batches of ``compute.batch_size``;
    each exposure's FPFS moments are mapped to the sky frame and combined per source by inverse variance,
    then e, the smooth FPFS S/N selection (``shear.estimator_snr_min``) and the noise-corrected responses
    are formed once per source (:func:`constellation_assets.shear.stamps.combine_exposure_moments`).
    Catalog frame: ``E1``/``E2`` in (west, north), ``E1 > 0`` along RA, ``E2 > 0`` along NW-SE; tools
    working in (east, north) need ``-E2`` (see :mod:`constellation_assets.shear.stamps`).
``external``
    A configured command (e.g. SHINE) run once per manifest as a subprocess; it must write a Parquet file
    of one of two shapes (told apart by their columns):

    - per-source rows with the columns of ``SOURCE_RESULT_SCHEMA`` (optionally with the sub-tile summary
      as JSON in the key-value metadata ``constellation``);
    - the seed's per-sub-tile result (SHINE fits one constant shear per sub-tile): exactly one row with
      the columns of :data:`constellation_assets.catalog.external.SHINE_RESULT_SCHEMA` (TILE_ID,
      SUBTILE_ROW, SUBTILE_COL, RA, DEC, G1, G2, G1_ERR, G2_ERR, N_SOURCES, METHOD, CONVERGENCE). Its
      values are kept as the engine wrote them (METHOD and CONVERGENCE included); the result file then has
      no per-source rows, so the sub-tile adds a row to ``shear.subtiles`` and none to ``shear.sources``.

    Config::

        inference:
          engine: external
          command: ["shine-infer", "--manifest", "{manifest_local}", "--output", "{output}",
                    "--config", "{config}", "--device", "{device}"]   # list, or one string (shlex-split)
          method: SHINE            # METHOD of the summary (default: the external summary's, else "external")
          timeout_s: 3600          # optional
          env: {SHINE_THREADS: "4"}  # optional extra environment

    Placeholders in the argv template: ``{manifest}`` (manifest URI as given), ``{manifest_local}`` (a
    local copy of the manifest YAML), ``{output}`` (local Parquet path to write), ``{config}`` (local JSON
    of the effective config), ``{result_uri}``, ``{device}``, ``{batch_size}``, ``{tile_id}``, ``{row}``,
    ``{col}``, ``{run_id}``. Unknown ``{...}`` are left untouched. The command's stdout/stderr lines go to
    this process's log (and so, under Dagster, through the same pipes channel as the built-in engine's
    logs). Its rows are validated against the schema, the summary is completed (ensemble shear over the
    IN_CORE rows when the command gives none) and the file is re-written atomically to the result URI
    with this run's provenance (config_hash, run_id).

Several sub-tiles of one tile (``infer_tile_manifests``, used by ``pipeline.infer_many``, the local run
and the shear worker behind the Dagster ``shear_measurements`` asset) are measured together with the
built-in engine: every quadrant they need is read once for the tile, byte ranges only, instead of once per
sub-tile listing it (neighbouring extended sub-tiles share most quadrants), and one quadrant is in memory at
a time (:func:`measure_tile`); the result files are those ``infer_manifest`` writes.
``benchmarks/bench_tile_io.py`` reports the bytes read per tile against the HDUs overlapping it.

Idempotency: the result ``{output.results}/{tile_id}/{TILE}_{ROW}_{COL}.parquet`` is skipped when it
exists with the same ``config_hash`` and manifest hash (unless ``force``); otherwise it is (re)written
atomically, so a partial file never appears.

Summary: ``G1/G2 = sum(w e) / sum(w R)`` over IN_CORE sources with ``WEIGHT > 0`` (jackknife errors);
``N_SOURCES`` counts those sources; ``CONVERGENCE`` is the fraction of IN_CORE sources with a valid
measurement (the analytic estimator has no iterations; an external sampler may report its own value).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shlex
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from constellation_assets.shear import stamps as st

log = logging.getLogger(__name__)

__all__ = [
    "ExternalEngineError",
    "InferResult",
    "infer_manifest",
    "infer_tile_manifests",
    "load_manifest",
    "measure_manifest",
    "measure_tile",
    "resolve_device",
    "result_uri_for",
]

ENGINES = ("builtin", "external")


class ExternalEngineError(RuntimeError):
    """The external inference command failed or wrote an invalid result."""


@dataclasses.dataclass
class InferResult:
    """What one manifest's inference did (also the per-sub-tile metadata reported to Dagster)."""

    manifest_uri: str
    result_uri: str
    tile_id: int
    sub_tile_row: int
    sub_tile_col: int
    status: str  # "written" or "skipped"
    engine: str
    method: str
    n_sources: int  # rows in the result (all sources of the extended sub-tile)
    n_core: int  # IN_CORE rows
    n_measured: int  # IN_CORE rows with WEIGHT > 0 (= summary N_SOURCES)
    n_stamps: int  # (source, exposure) stamps measured
    g1: float
    g2: float
    g1_err: float
    g2_err: float
    seconds: float
    device: str
    peak_rss_mb: float
    peak_gpu_mb: float | None
    config_hash: str
    run_id: str

    def to_metadata(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Helpers


def load_manifest(uri: str, storage_options: dict | None = None, cfg=None) -> dict:
    """Load and validate a sub-tile manifest (:func:`constellation_assets.prepare.load_manifest`).

    With ``cfg``, every path in the manifest must lie under the configured data roots or the output root.
    """
    from constellation_assets.prepare import load_manifest as _load

    return _load(uri, storage_options=storage_options, cfg=cfg)


def result_uri_for(cfg, tile_id: int, row: int, col: int) -> str:
    """``{output.results}/{tile_id}/{TILE}_{ROW}_{COL}.parquet``."""
    from constellation_assets.catalog.schema import subtile_result_name
    from constellation_assets.io.uri import join_uri

    return join_uri(cfg.output.results, str(int(tile_id)), subtile_result_name(tile_id, row, col))


def resolve_device(device: str | None) -> str:
    """'cpu', 'cuda' (error if absent) or 'auto' (cuda when available)."""
    import torch

    dev = (device or "cpu").lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} requested but torch sees no CUDA GPU (torch {torch.__version__}); "
            "use --device cpu (or compute.device: auto)"
        )
    if dev not in ("cpu",) and not dev.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or auto")
    return dev


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    blob = json.dumps(manifest, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _core_centre(manifest: Mapping[str, Any]) -> tuple[float, float]:
    """(RA, Dec) deg of the manifest's core box centre (``sky_bounds.core_ra`` / ``core_dec``)."""
    from constellation_assets.prepare import core_centre_deg

    return core_centre_deg(dict(manifest))


class _PeakMemory:
    """Peak RSS of this process during a block (Linux VmHWM, reset via /proc/self/clear_refs) and GPU peak."""

    def __init__(self, device: str):
        self.device = device
        self.rss_mb = math.nan
        self.gpu_mb: float | None = None

    @staticmethod
    def _vmhwm_mb() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def __enter__(self):
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.rss_mb = self._vmhwm_mb()
        if self.device.startswith("cuda"):
            import torch

            self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        return False


def _estimator_kwargs(cfg) -> dict[str, Any]:
    """Estimator settings from the ``shear`` config section (``shear.fpfs.fpfs_kwargs_from_config``)."""
    from constellation_assets.shear import fpfs

    kw = dict(fpfs.fpfs_kwargs_from_config(cfg))
    kw.pop("device", None)  # placement comes from infer_manifest's device / batch_size
    kw.pop("batch_size", None)
    return kw


# --------------------------------------------------------------------------------------------------
# Built-in engine

#: Moments per stamp (len(fpfs.MOMENT_NAMES); fpfs, hence torch, is imported only when measuring).
_N_MOMENTS = 6


class _BatchMeasurer:
    """Buffers usable stamps across quadrants and measures them in batches of ``batch_size``."""

    def __init__(
        self, device: str, batch_size: int, est_kwargs: dict, progress: Callable[[int], None] | None
    ):
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.est_kwargs = est_kwargs
        self.progress = progress
        self.pending: list[st.ExposureStamps] = []
        self.n_pending = 0
        self.parts: list[dict[str, np.ndarray]] = []
        self.n_stamps = 0

    def add(self, stamps: st.ExposureStamps) -> None:
        usable = stamps.reject == 0
        if usable.all():  # the usual case: no copy of the stamps
            self.pending.append(stamps)
            self.n_pending += len(stamps)
            while self.n_pending >= self.batch_size:
                self._flush(self.batch_size)
            return
        rejected = stamps.select(~usable)
        if len(rejected):
            nr = len(rejected)
            self.parts.append(
                {
                    "source_index": rejected.source_index,
                    "usable": np.zeros(nr, bool),
                    "moments": np.zeros((nr, _N_MOMENTS)),
                    "cov": np.zeros((nr, _N_MOMENTS, _N_MOMENTS)),
                    "flags": np.zeros(nr, np.int64),
                }
            )
        good = stamps.select(usable)
        if len(good):
            self.pending.append(good)
            self.n_pending += len(good)
        while self.n_pending >= self.batch_size:
            self._flush(self.batch_size)

    def finish(self) -> dict[str, np.ndarray]:
        while self.n_pending:
            self._flush(min(self.n_pending, self.batch_size))
        if not self.parts:
            return {
                "source_index": np.zeros(0, np.intp),
                "usable": np.zeros(0, bool),
                "moments": np.zeros((0, _N_MOMENTS)),
                "cov": np.zeros((0, _N_MOMENTS, _N_MOMENTS)),
                "flags": np.zeros(0, np.int64),
            }
        return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}

    def _take(self, n: int) -> list[st.ExposureStamps]:
        out, need = [], n
        while need:
            head = self.pending[0]
            if len(head) <= need:
                out.append(self.pending.pop(0))
                need -= len(head)
            else:
                out.append(head.select(slice(0, need)))  # views, no copy
                self.pending[0] = head.select(slice(need, len(head)))
                need = 0
        self.n_pending -= n
        return out

    def _flush(self, n: int) -> None:
        from constellation_assets.shear import fpfs

        chunk = self._take(n)
        images = np.concatenate([c.images for c in chunk])
        psf = np.concatenate([c.psf for c in chunk])
        noise = np.concatenate([c.noise_sigma for c in chunk])
        offsets = np.concatenate([c.offsets_pix for c in chunk])
        jac = np.concatenate([c.jacobian for c in chunk])
        frame = st.sky_frame_transform(jac)
        # The weight kernel's pixel scale: each quadrant's own (the stamps' kernel_scale_arcsec), so that a
        # stamp's moments do not depend on the batch it falls in; stamps without one take the batch median.
        scale = np.concatenate(
            [
                np.full(len(c), np.nan) if c.kernel_scale_arcsec is None else c.kernel_scale_arcsec
                for c in chunk
            ]
        )
        scale = np.where(np.isfinite(scale), scale, float(np.median(frame["scale_arcsec"])))
        # Moments only: ratios, selection and responses are formed once per source after the
        # exposures are combined (stamps.combine_exposure_moments).
        kw = {k: v for k, v in self.est_kwargs.items() if k in ("sigma_arcsec", "precision", "psf_floor")}
        mom = np.empty((n, _N_MOMENTS))
        cov = np.empty((n, _N_MOMENTS, _N_MOMENTS))
        flags = np.empty(n, np.int64)
        # A quadrant's stamps are contiguous in the batch: one estimator call per run of equal scale, on views.
        edges = [0, *(np.flatnonzero(scale[1:] != scale[:-1]) + 1).tolist(), n]
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = slice(lo, hi)
            res = fpfs.measure_stamps(
                images[sel],
                psf[sel],
                pixel_scale_arcsec=float(scale[lo]),
                noise_sigma=noise[sel],
                offsets_pix=offsets[sel],
                device=self.device,
                batch_size=self.batch_size,
                return_moments=True,
                return_covariance=True,
                **kw,
            )
            mom[sel] = np.stack([np.asarray(res[k], np.float64) for k in fpfs.MOMENT_NAMES], axis=1)
            cov[sel] = np.asarray(res["cov"], np.float64)
            flags[sel] = np.asarray(res["flags"], np.int64)
        del images, psf
        mom, cov = st.moments_to_sky_frame(mom, cov, frame)
        self.parts.append(
            {
                "source_index": np.concatenate([c.source_index for c in chunk]),
                "usable": np.ones(n, bool),
                "moments": mom,
                "cov": cov,
                "flags": flags,
            }
        )
        self.n_stamps += n
        if self.progress:
            self.progress(n)


def measure_manifest(
    cfg,
    manifest: Mapping[str, Any],
    device: str = "cpu",
    batch_size: int = 1024,
    storage_options: Callable[[str], dict] | None = None,
    progress: Callable[[int], None] | None = None,
    mer_cache: dict | None = None,
):
    """Measure every source of a manifest with the built-in engine.

    Returns ``(table, n_stamps)``: a pyarrow table with the SOURCE_RESULT_SCHEMA columns. With
    ``shear.detection: pixels`` the sources are detected on the exposures
    (:func:`constellation_assets.shear.detect_subtile.measure_manifest_detected`; ``n_stamps`` is then the
    number of detections; ``mer_cache`` keeps the MER catalogs it reads, by URI, for the next sub-tile).
    """
    opts = storage_options or cfg.storage_options
    if cfg.shear.detection == "pixels":
        from constellation_assets.shear.detect_subtile import measure_manifest_detected

        return measure_manifest_detected(cfg, manifest, opts, progress, mer_cache)
    sources_uri = manifest.get("sources_uri") or manifest.get("source_catalog") or ""
    sources, in_core = st.sources_from_manifest(manifest, opts(str(sources_uri)))
    n = len(sources)
    covered = np.zeros(n, dtype=np.int64)
    measurer = _BatchMeasurer(device, batch_size, _estimator_kwargs(cfg), progress)
    stamp_size = int(cfg.shear.stamp_size_pix)
    for stamps in st.iter_manifest_stamps(manifest, sources, stamp_size, opts):
        np.add.at(covered, stamps.source_index, 1)
        measurer.add(stamps)
        del stamps
    per_stamp = measurer.finish()
    return _result_table(cfg, manifest, sources, in_core, per_stamp, covered), measurer.n_stamps


def _result_table(cfg, manifest, sources, in_core, per_stamp: Mapping[str, np.ndarray], covered: np.ndarray):
    """Combine a sub-tile's per-exposure moments per source and build its SOURCE_RESULT_SCHEMA table."""
    import pyarrow as pa

    from constellation_assets.shear import fpfs

    assert len(fpfs.MOMENT_NAMES) == _N_MOMENTS
    n = len(sources)
    est = _estimator_kwargs(cfg)
    # Per-exposure failures that exclude a stamp: non-finite pixels, unusable PSF. (A noisy exposure's
    # denominator or S/N is not a reason: cuts are made once, on the combined moments.)
    bad = np.asarray(per_stamp["flags"], np.int64) & (fpfs.FLAG_NONFINITE_INPUT | fpfs.FLAG_BAD_PSF)
    comb = st.combine_exposure_moments(
        n,
        per_stamp["source_index"],
        per_stamp["moments"],
        per_stamp["cov"],
        per_stamp["usable"] & (bad == 0),
        usable=per_stamp["usable"],
        est_flags=per_stamp["flags"],
        covered=covered,
        c_ratio=est["c_ratio"],
        snr_min=est["snr_min"],
        selection_bin_width=est["selection_bin_width"],
        noise_bias_correction=est["noise_bias_correction"],
    )
    tile_id = int(manifest["tile_id"])
    row, col = int(manifest["sub_tile_row"]), int(manifest["sub_tile_col"])
    snr = np.where(np.isfinite(comb["snr"]), comb["snr"], np.float32(np.finfo(np.float32).max))
    return pa.table(
        {
            "TILE_ID": pa.array(np.full(n, tile_id, np.int64)),
            "SUBTILE_ROW": pa.array(np.full(n, row, np.int8)),
            "SUBTILE_COL": pa.array(np.full(n, col, np.int8)),
            "OBJECT_ID": pa.array(sources.object_id),
            "RA": pa.array(sources.ra_deg),
            "DEC": pa.array(sources.dec_deg),
            "E1": pa.array(comb["e1"].astype(np.float32)),
            "E2": pa.array(comb["e2"].astype(np.float32)),
            "R11": pa.array(comb["r11"].astype(np.float32)),
            "R22": pa.array(comb["r22"].astype(np.float32)),
            "WEIGHT": pa.array(comb["weight"].astype(np.float32)),
            "SNR": pa.array(snr.astype(np.float32)),
            "N_EXPOSURES": pa.array(comb["n_exposures"].astype(np.int16)),
            "FLAGS": pa.array(comb["flags"].astype(np.int32)),
            "IN_CORE": pa.array(in_core.astype(bool)),
        }
    )


def _entry_key(entry: Mapping[str, Any]) -> str:
    """Identity of a manifest quadrant entry (paths, HDU names, byte offsets): equal entries are one read."""
    return json.dumps(dict(entry), sort_keys=True, default=str, separators=(",", ":"))


def measure_tile(
    cfg,
    manifests: list[Mapping[str, Any]],
    device: str = "cpu",
    batch_size: int = 1024,
    storage_options: Callable[[str], dict] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[Any, int] | Exception]:
    """Measure several sub-tile manifests (normally the sub-tiles of one tile) reading each quadrant once.

    Quadrant-major: the union of the manifests' sources is formed, then every distinct quadrant entry
    is read once (:func:`constellation_assets.shear.stamps.iter_quadrant_images`), the stamps of every
    source of any manifest listing that quadrant are cut and their per-exposure moments measured in
    batches (``_BatchMeasurer``), and the quadrant is released. The per-stamp moments are then split back
    per manifest (a stamp counts for a manifest that lists both its source and its quadrant, in the
    manifest's quadrant order) and combined per source as in :func:`measure_manifest`, so each table
    holds what measuring the manifest alone gives (up to the estimator's batch-median pixel scale).
    Memory: one quadrant (two on s3://, one read ahead) plus the stamps of one batch and the moments.

    Returns, per manifest in order, ``(table, n_stamps)`` or the exception that failed it: a quadrant
    that cannot be read or cut fails the manifests that list it (the others go on), a bad source list
    fails its manifest; an estimator error fails them all.
    """
    opts = storage_options or cfg.storage_options
    if cfg.shear.detection == "pixels":
        # Detection works on blocks of the sub-tile with every exposure at once: per sub-tile, the
        # quadrants shared by neighbouring sub-tiles coming from QUADRANT_CACHE.
        out_d: list[Any] = []
        mer_cache: dict = {}
        for manifest in manifests:
            try:
                out_d.append(measure_manifest(cfg, manifest, device, batch_size, opts, progress, mer_cache))
            except Exception as exc:
                out_d.append(exc)
        return out_d
    stamp_size = int(cfg.shear.stamp_size_pix)
    out: list[Any] = [None] * len(manifests)
    tables: dict[str, Any] = {}
    members: list[tuple[st.SourceList, np.ndarray]] = []  # (sources, in_core) per manifest
    keys = []
    for m, manifest in enumerate(manifests):
        try:
            uri = str(manifest.get("sources_uri") or manifest.get("source_catalog") or "")
            if uri not in tables:
                tables[uri] = st.read_source_table(manifest, opts(uri))
            sources, in_core = st.sources_from_manifest(manifest, opts(uri), table=tables[uri])
        except Exception as exc:
            out[m] = exc
            sources, in_core = (
                st.SourceList(np.zeros(0, np.int64), np.zeros(0), np.zeros(0)),
                np.zeros(0, bool),
            )
        members.append((sources, in_core))
        keys.append((sources.object_id, sources.ra_deg, sources.dec_deg))
    tables.clear()
    # Union of the sources (one stamp per source and quadrant, whichever sub-tiles share the source).
    oid = np.concatenate([k[0] for k in keys]) if keys else np.zeros(0, np.int64)
    rec = np.rec.fromarrays(
        [oid, *(np.concatenate([k[i] for k in keys]) if keys else np.zeros(0) for i in (1, 2))],
        names="oid,ra,dec",
    )
    uniq, inverse = np.unique(rec, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    union = st.SourceList(
        np.ascontiguousarray(uniq["oid"], np.int64),
        np.ascontiguousarray(uniq["ra"], np.float64),
        np.ascontiguousarray(uniq["dec"], np.float64),
    )
    bounds = np.cumsum([0] + [len(k[0]) for k in keys])
    union_idx = [inverse[bounds[m] : bounds[m + 1]] for m in range(len(manifests))]
    del keys, rec, oid, inverse

    # Distinct quadrant entries, in order of first appearance; each manifest's quadrants as positions.
    entry_pos: dict[str, int] = {}
    entries: list[Mapping[str, Any]] = []
    quads_of: list[np.ndarray] = []
    for manifest in manifests:
        pos = []
        for e in manifest.get("quadrants") or []:
            k = _entry_key(e)
            if k not in entry_pos:
                entry_pos[k] = len(entries)
                entries.append(e)
            pos.append(entry_pos[k])
        quads_of.append(np.asarray(pos, np.intp))
    users: list[list[int]] = [[] for _ in entries]  # manifests listing each quadrant
    for m, pos in enumerate(quads_of):
        for q in dict.fromkeys(pos.tolist()):
            users[q].append(m)

    # Quadrants no manifest with sources needs are not read (they would give no stamp).
    wanted = [q for q in range(len(entries)) if any(out[m] is None and len(members[m][0]) for m in users[q])]

    measurer = _BatchMeasurer(device, batch_size, _estimator_kwargs(cfg), progress)
    stamp_src: list[np.ndarray] = []  # union source index of each stamp (by stamp id)
    stamp_quad: list[np.ndarray] = []  # quadrant of each stamp
    n_ids = 0
    try:
        for i, quad, exc in st.iter_quadrant_images([entries[q] for q in wanted], stamp_size, opts):
            q = wanted[i]
            live = [m for m in users[q] if out[m] is None and len(members[m][0])]
            if exc is None and live:
                try:
                    sel = np.zeros(len(union), bool)
                    for m in live:
                        sel[union_idx[m]] = True
                    subset_idx = np.nonzero(sel)[0]
                    subset = st.SourceList(
                        union.object_id[subset_idx], union.ra_deg[subset_idx], union.dec_deg[subset_idx]
                    )
                    stamps = st.quadrant_stamps(quad, subset, stamp_size)
                except Exception as err:
                    exc = err
            del quad
            if exc is not None:
                for m in live:
                    out[m] = exc
                continue
            if not live or not len(stamps):
                continue
            k = len(stamps)
            stamp_src.append(subset_idx[stamps.source_index])
            stamp_quad.append(np.full(k, q, np.intp))
            stamps.source_index = np.arange(n_ids, n_ids + k, dtype=np.intp)  # stamp ids
            n_ids += k
            measurer.add(stamps)
            del stamps
        per_stamp = measurer.finish()
    except Exception as exc:  # the estimator: its batches mix sub-tiles
        return [o if o is not None else exc for o in out]
    src_of = np.concatenate(stamp_src) if stamp_src else np.zeros(0, np.intp)
    quad_of = np.concatenate(stamp_quad) if stamp_quad else np.zeros(0, np.intp)
    ids = np.asarray(per_stamp["source_index"], np.intp)
    s_src, s_quad = src_of[ids], quad_of[ids]
    for m, manifest in enumerate(manifests):
        if out[m] is not None:
            continue
        try:
            sources, in_core = members[m]
            local = np.full(len(union), -1, np.intp)
            local[union_idx[m]] = np.arange(len(sources))
            rank = np.full(len(entries), -1, np.intp)  # first position of each quadrant in the manifest
            pos = quads_of[m]
            rank[pos[::-1]] = np.arange(len(pos))[::-1]
            keep = (local[s_src] >= 0) & (rank[s_quad] >= 0)
            # Per-source sums in the manifest's quadrant order (the order measure_manifest adds them in).
            rows = np.nonzero(keep)[0]
            rows = rows[np.argsort(rank[s_quad[rows]], kind="stable")]
            part = {k: v[rows] for k, v in per_stamp.items()}
            part["source_index"] = local[s_src[rows]]
            covered = np.bincount(part["source_index"], minlength=len(sources)).astype(np.int64)
            table = _result_table(cfg, manifest, sources, in_core, part, covered)
            out[m] = (table, int(part["usable"].sum()))
        except Exception as exc:
            out[m] = exc
    return out


def summarize(table, manifest: Mapping[str, Any], method: str) -> dict[str, Any]:
    """Sub-tile summary (ensemble shear over IN_CORE rows with WEIGHT > 0)."""
    from constellation_assets.shear import ensemble_shear
    from constellation_assets.shear.ensemble import MIN_SOURCES_FOR_SHEAR

    core = np.asarray(table["IN_CORE"].to_numpy(zero_copy_only=False), bool)
    w = np.asarray(table["WEIGHT"].to_numpy(), np.float64)
    sel = core & (w > 0)
    cat = {
        "e1": table["E1"].to_numpy()[sel].astype(np.float64),
        "e2": table["E2"].to_numpy()[sel].astype(np.float64),
        "r11": table["R11"].to_numpy()[sel].astype(np.float64),
        "r22": table["R22"].to_numpy()[sel].astype(np.float64),
        "weight": w[sel],
    }
    if sel.sum() >= MIN_SOURCES_FOR_SHEAR:
        g1, g2, g1e, g2e = ensemble_shear(cat)
    else:
        g1 = g2 = g1e = g2e = math.nan
    ra, dec = _core_centre(manifest)
    n_core = int(core.sum())
    return {
        "G1": g1,
        "G2": g2,
        "G1_ERR": g1e,
        "G2_ERR": g2e,
        "N_SOURCES": int(sel.sum()),
        "METHOD": method,
        "CONVERGENCE": float(sel.sum() / n_core) if n_core else 0.0,
        "RA": ra,
        "DEC": dec,
    }


# --------------------------------------------------------------------------------------------------
# External engine

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _format_argv(template: Any, values: Mapping[str, Any]) -> list[str]:
    if isinstance(template, str):
        template = shlex.split(template)
    if not isinstance(template, (list, tuple)) or not template:
        raise ValueError(
            "inference.command must be a non-empty list (or string) argv template, e.g. "
            '["shine-infer", "--manifest", "{manifest_local}", "--output", "{output}"]'
        )
    return [
        _PLACEHOLDER.sub(lambda m: str(values[m[1]]) if m[1] in values else m[0], str(a)) for a in template
    ]


def _pump(stream, level: int, tail: list[str], name: str) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip()
        tail.append(line)
        del tail[:-50]
        log.log(level, "[%s] %s", name, line)
    stream.close()


def run_external(
    cfg,
    manifest_uri: str,
    manifest: Mapping[str, Any],
    result_uri: str,
    device: str,
    batch_size: int,
    run_id: str,
):
    """Run ``inference.command`` on one manifest; returns ``(table, summary)`` read from its Parquet."""
    import pyarrow.parquet as pq
    import yaml

    from constellation_assets.catalog.external import result_shape, subtile_summary_from_table
    from constellation_assets.catalog.schema import SOURCE_RESULT_SCHEMA, SUMMARY_METADATA_KEY, conform_table

    inf = dict(cfg.inference or {})
    with tempfile.TemporaryDirectory(prefix="constellation-ext-") as tmp:
        tmpdir = Path(tmp)
        manifest_local = tmpdir / "manifest.yaml"
        manifest_local.write_text(yaml.safe_dump(dict(manifest), sort_keys=False))
        config_local = tmpdir / "config.json"
        config_local.write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        output = tmpdir / "result.parquet"
        values = {
            "manifest": manifest_uri,
            "manifest_local": manifest_local,
            "output": output,
            "config": config_local,
            "result_uri": result_uri,
            "device": device,
            "batch_size": batch_size,
            "tile_id": manifest["tile_id"],
            "row": manifest["sub_tile_row"],
            "col": manifest["sub_tile_col"],
            "run_id": run_id,
        }
        argv = _format_argv(inf.get("command"), values)
        env = dict(os.environ)
        # The child must not attach to this process's pipes session.
        for k in ("DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"):
            env.pop(k, None)
        env.update({str(k): str(v) for k, v in (inf.get("env") or {}).items()})
        timeout = inf.get("timeout_s")
        name = Path(argv[0]).name
        log.info("external engine: %s", shlex.join(argv))
        try:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=inf.get("cwd")
            )
        except OSError as exc:
            raise ExternalEngineError(
                f"cannot start the external inference command {argv[0]!r} ({exc}); check inference.command"
            ) from exc
        out_tail: list[str] = []
        err_tail: list[str] = []
        threads = [
            threading.Thread(target=_pump, args=(proc.stdout, logging.INFO, out_tail, name), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, logging.WARNING, err_tail, name), daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            rc = proc.wait(timeout=float(timeout) if timeout else None)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise ExternalEngineError(
                f"external inference command timed out after {timeout} s on {manifest_uri}; raise inference.timeout_s"
            ) from None
        for t in threads:
            t.join(timeout=10)
        if rc != 0:
            raise ExternalEngineError(
                f"external inference command exited with status {rc} on {manifest_uri}: {shlex.join(argv)}\n"
                + "\n".join(err_tail[-20:])
            )
        if not output.exists():
            raise ExternalEngineError(
                f"external inference command succeeded but wrote no result at {{output}} ({output}) for "
                f"{manifest_uri}; the command must write its Parquet to the path given by {{output}}"
            )
        try:
            table = pq.read_table(output)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise ExternalEngineError(f"external engine output is not valid Parquet ({exc})") from exc
        raw = (table.schema.metadata or {}).get(SUMMARY_METADATA_KEY)
        what = f"external engine result for {manifest_uri}"
        try:
            if result_shape(table.schema, what) == "subtile":
                # The seed's SHINE result: one row, one constant shear for the sub-tile (no per-source rows).
                summary = subtile_summary_from_table(
                    table,
                    what,
                    expect=(manifest["tile_id"], manifest["sub_tile_row"], manifest["sub_tile_col"]),
                    sky_bounds=manifest.get("sky_bounds"),
                )
                for key in ("TILE_ID", "SUBTILE_ROW", "SUBTILE_COL", "run_id", "config_hash"):
                    summary.pop(key, None)
                log.info(
                    "external engine returned the per-sub-tile result (METHOD %s, N_SOURCES %d)",
                    summary["METHOD"], summary["N_SOURCES"],
                )  # fmt: skip
                return SOURCE_RESULT_SCHEMA.empty_table(), summary
            table = conform_table(table, SOURCE_RESULT_SCHEMA, what)
        except ValueError as exc:
            raise ExternalEngineError(str(exc)) from exc
    ext_summary = {}
    if raw:
        try:
            ext_summary = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("external engine summary metadata is not JSON; recomputing the summary from its rows")
    method = str(inf.get("method") or ext_summary.get("METHOD") or "external")
    summary = summarize(table, manifest, method)
    for key in ("G1", "G2", "G1_ERR", "G2_ERR", "N_SOURCES", "CONVERGENCE"):
        if key in ext_summary and ext_summary[key] is not None:
            summary[key] = ext_summary[key]
    return table, summary


# --------------------------------------------------------------------------------------------------
# Entry point


def _existing_summary(uri: str, storage_options: dict) -> dict | None:
    from constellation_assets.catalog.schema import ResultFileError, read_subtile_result
    from constellation_assets.io.uri import uri_exists

    if not uri_exists(uri, storage_options):
        return None
    try:
        return read_subtile_result(uri, storage_options)[1]
    except ResultFileError as exc:
        log.warning("existing result %s is unreadable (%s): it will be rewritten", uri, exc)
        return None


def infer_manifest(
    cfg,
    manifest_uri: str,
    device: str | None = None,
    batch_size: int | None = None,
    *,
    force: bool = False,
    run_id: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> InferResult:
    """Measure one sub-tile manifest and write its result Parquet (see the module docstring).

    Args:
        cfg: PipelineConfig.
        manifest_uri: local path or s3:// URI of a sub-tile manifest YAML.
        device: "cpu", "cuda" or "auto" (default ``cfg.compute.device``).
        batch_size: stamps per estimator batch (default ``cfg.compute.batch_size``).
        force: recompute even when the result exists with the same config and manifest.
        run_id: provenance id stored in the summary (default: a new unique id).
        progress: called with the number of stamps measured after each batch.
    """
    from constellation_assets.provenance import config_hash

    t0 = time.perf_counter()
    manifest = load_manifest(manifest_uri, cfg.storage_options(manifest_uri), cfg=cfg)
    tile_id = int(manifest["tile_id"])
    row, col = int(manifest["sub_tile_row"]), int(manifest["sub_tile_col"])
    result_uri = result_uri_for(cfg, tile_id, row, col)
    result_opts = cfg.storage_options(result_uri)
    chash = config_hash(cfg)
    mhash = _manifest_hash(manifest)
    engine = str((cfg.inference or {}).get("engine", "builtin")).lower()
    if engine not in ENGINES:
        raise ValueError(f"inference.engine must be one of {list(ENGINES)}, got {engine!r}")
    dev = resolve_device(device or cfg.compute.device)
    bs = int(batch_size or cfg.compute.batch_size)
    run_id = run_id or f"infer-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"

    old = None if force else _existing_summary(result_uri, result_opts)
    if old is not None and old.get("config_hash") == chash and old.get("manifest_hash") == mhash:
        log.info(
            "sub-tile %s_%s_%s: result exists with the same config (%s): skipped", tile_id, row, col, chash
        )
        return InferResult(
            manifest_uri, result_uri, tile_id, row, col, "skipped", old.get("engine", engine), str(old["METHOD"]),
            int(old.get("n_rows", -1)), int(old.get("n_core", -1)), int(old["N_SOURCES"]), 0,
            float(old["G1"]), float(old["G2"]), float(old["G1_ERR"]), float(old["G2_ERR"]),
            time.perf_counter() - t0, dev, math.nan, None, chash, str(old.get("run_id", "")),
        )  # fmt: skip
    if old is not None:
        log.info(
            "sub-tile %s_%s_%s: existing result has another config/manifest: recomputing", tile_id, row, col
        )

    with _PeakMemory(dev) as mem:
        if engine == "external":
            table, summary = run_external(cfg, manifest_uri, manifest, result_uri, dev, bs, run_id)
            n_stamps = 0
        else:
            table, n_stamps = measure_manifest(cfg, manifest, dev, bs, progress=progress)
            summary = summarize(table, manifest, str(cfg.shear.method))
        job = _Job(manifest_uri, manifest, result_uri, result_opts, mhash)
        res = _write_result(cfg, job, table, summary, n_stamps, engine, chash, run_id, dev)
    res.seconds = time.perf_counter() - t0
    res.peak_rss_mb, res.peak_gpu_mb = mem.rss_mb, mem.gpu_mb
    _log_written(res)
    return res


@dataclasses.dataclass
class _Job:
    """One manifest to (re)measure: where its result goes and the manifest hash stored with it."""

    manifest_uri: str
    manifest: dict
    result_uri: str
    result_opts: dict | None
    manifest_hash: str


def _write_result(
    cfg, job: _Job, table, summary: dict, n_stamps: int, engine, chash, run_id, dev
) -> InferResult:
    """Add the provenance to a sub-tile summary and write its result (temp name + rename)."""
    from constellation_assets.catalog.schema import write_subtile_result

    m = job.manifest
    tile_id, row, col = int(m["tile_id"]), int(m["sub_tile_row"]), int(m["sub_tile_col"])
    n_core = int(np.asarray(table["IN_CORE"].to_numpy(zero_copy_only=False), bool).sum())
    summary.update(
        {
            "run_id": run_id,
            "config_hash": chash,
            "manifest_hash": job.manifest_hash,
            "engine": engine,
            "n_rows": table.num_rows,
            "n_core": n_core,
            "n_stamps": n_stamps,
            "device": dev,
        }
    )
    write_subtile_result(table, summary, job.result_uri, storage_options=job.result_opts)
    return InferResult(
        job.manifest_uri, job.result_uri, tile_id, row, col, "written", engine, str(summary["METHOD"]),
        table.num_rows, n_core, int(summary["N_SOURCES"]), n_stamps,
        float(summary["G1"]), float(summary["G2"]), float(summary["G1_ERR"]), float(summary["G2_ERR"]),
        math.nan, dev, math.nan, None, chash, run_id,
    )  # fmt: skip


def _log_written(res: InferResult) -> None:
    log.info(
        "sub-tile %s_%s_%s: %d sources (%d core, %d measured), %d stamps, %.1f s on %s, peak RSS %.0f MB",
        res.tile_id, res.sub_tile_row, res.sub_tile_col, res.n_sources, res.n_core, res.n_measured,
        res.n_stamps, res.seconds, res.device, res.peak_rss_mb,
    )  # fmt: skip


def infer_tile_manifests(
    cfg,
    manifest_uris: list[str],
    device: str | None = None,
    batch_size: int | None = None,
    *,
    force: bool = False,
    run_id: str | None = None,
    progress: Callable[[int], None] | None = None,
    on_result: Callable[[InferResult], None] | None = None,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> tuple[list[InferResult], list[tuple[str, BaseException]]]:
    """:func:`infer_manifest` for many manifests, the sub-tiles of a tile measured together.

    Manifests are grouped by ``tile_id``; in each tile those whose result exists with the same config
    and manifest hash are skipped (unless ``force``), and the others are measured with
    :func:`measure_tile`, which reads every quadrant they need once for the tile (instead of once per
    sub-tile that lists it), then each result is written as :func:`infer_manifest` writes it (same
    file, summary and provenance, temp name + rename). A tile with a single manifest to measure, and
    the external engine, go through :func:`infer_manifest` one manifest at a time.

    Each result (``on_result``) and failure (``on_error(uri, exc)``) is reported per sub-tile; a failing
    sub-tile does not stop the others. Returns ``(results, failures)`` in manifest order. In a tile
    measured together, ``seconds`` of a sub-tile is its share (by stamps) of the tile's measurement
    plus the writing of its result, and ``peak_rss_mb`` / ``peak_gpu_mb`` are the tile's.
    """
    from constellation_assets.provenance import config_hash

    results: dict[str, InferResult] = {}
    failures: dict[str, BaseException] = {}

    def ok(uri: str, res: InferResult) -> None:
        results[uri] = res
        if on_result:
            on_result(res)

    def failed(uri: str, exc: BaseException) -> None:
        log.error("sub-tile manifest %s failed: %s", uri, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        failures[uri] = exc
        if on_error:
            on_error(uri, exc)

    def one(uri: str) -> None:
        try:
            res = infer_manifest(cfg, uri, device, batch_size, force=force, run_id=run_id, progress=progress)
        except Exception as exc:
            failed(uri, exc)
            return
        ok(uri, res)

    uris = list(dict.fromkeys(str(u) for u in manifest_uris))
    engine = str((cfg.inference or {}).get("engine", "builtin")).lower()
    if engine != "builtin" or len(uris) < 2:
        for uri in uris:
            one(uri)
        return [results[u] for u in uris if u in results], [(u, failures[u]) for u in uris if u in failures]

    chash = config_hash(cfg)
    dev = resolve_device(device or cfg.compute.device)
    bs = int(batch_size or cfg.compute.batch_size)
    run_id = run_id or f"infer-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    tiles: dict[int, list[_Job]] = {}
    for uri in uris:
        t0 = time.perf_counter()
        try:
            manifest = load_manifest(uri, cfg.storage_options(uri), cfg=cfg)
            tile_id = int(manifest["tile_id"])
            row, col = int(manifest["sub_tile_row"]), int(manifest["sub_tile_col"])
            result_uri = result_uri_for(cfg, tile_id, row, col)
            job = _Job(uri, manifest, result_uri, cfg.storage_options(result_uri), _manifest_hash(manifest))
            old = None if force else _existing_summary(result_uri, job.result_opts)
        except Exception as exc:
            failed(uri, exc)
            continue
        if (
            old is not None
            and old.get("config_hash") == chash
            and old.get("manifest_hash") == job.manifest_hash
        ):
            log.info(
                "sub-tile %s_%s_%s: result exists with the same config (%s): skipped",
                tile_id,
                row,
                col,
                chash,
            )
            ok(uri, InferResult(
                uri, result_uri, tile_id, row, col, "skipped", old.get("engine", engine), str(old["METHOD"]),
                int(old.get("n_rows", -1)), int(old.get("n_core", -1)), int(old["N_SOURCES"]), 0,
                float(old["G1"]), float(old["G2"]), float(old["G1_ERR"]), float(old["G2_ERR"]),
                time.perf_counter() - t0, dev, math.nan, None, chash, str(old.get("run_id", "")),
            ))  # fmt: skip
            continue
        if old is not None:
            log.info(
                "sub-tile %s_%s_%s: existing result has another config/manifest: recomputing",
                tile_id,
                row,
                col,
            )
        tiles.setdefault(tile_id, []).append(job)

    for tile_id, jobs in tiles.items():
        if len(jobs) == 1:
            one(jobs[0].manifest_uri)
            continue
        t0 = time.perf_counter()
        with _PeakMemory(dev) as mem:
            outs = measure_tile(cfg, [j.manifest for j in jobs], dev, bs, progress=progress)
        t_measure = time.perf_counter() - t0
        n_total = sum(o[1] for o in outs if isinstance(o, tuple)) or 1
        log.info(
            "tile %s: %d sub-tiles measured together (%d stamps) in %.1f s, peak RSS %.0f MB",
            tile_id, len(jobs), n_total, t_measure, mem.rss_mb,
        )  # fmt: skip
        for job, got in zip(jobs, outs, strict=True):
            if isinstance(got, BaseException):
                failed(job.manifest_uri, got)
                continue
            t1 = time.perf_counter()
            table, n_stamps = got
            try:
                summary = summarize(table, job.manifest, str(cfg.shear.method))
                res = _write_result(cfg, job, table, summary, n_stamps, engine, chash, run_id, dev)
            except Exception as exc:
                failed(job.manifest_uri, exc)
                continue
            res.seconds = t_measure * n_stamps / n_total + time.perf_counter() - t1
            res.peak_rss_mb, res.peak_gpu_mb = mem.rss_mb, mem.gpu_mb
            _log_written(res)
            ok(job.manifest_uri, res)
    return [results[u] for u in uris if u in results], [(u, failures[u]) for u in uris if u in failures]
