"""Reproducible lens-injection runs (the Gen5 seed's Stage 4c): SIE-lensed arcs added to host cutouts.

Pipeline of one run (``run_injection``):

1. **Hosts** (:func:`discover_hosts`). Lens-like galaxies are chosen from the tile MER final catalogs
   (``{data.catalog_base_uri}/{tile_id}/EUC_MER_FINAL-CAT_TILE*.fits``): detection S/N >= ``host_snr_min``,
   AB magnitude in ``host_mag_range``, ``SEMIMAJOR_AXIS >= host_min_semimajor_axis_pix`` (extended),
   ``POINT_LIKE_FLAG != 1``, ``SPURIOUS_FLAG == 0``, ``VIS_DET > 0``, ``(DET_QUALITY_FLAG & 0x78C) == 0``.
   Each host gets the first VIS quadrant (``"{row}-{col}.{quad}.SCI"`` HDU of a DET frame under
   ``data.vis_base_uri``, frames and HDUs in sorted order) that holds the whole stamp. Frames are found and
   read with :mod:`constellation_assets.io.q1` (``discover_vis_exposures``, ``index_exposure``,
   ``read_quadrant_hdus``, ``magzerop``); a frame that cannot be read (truncated, not FITS, a quadrant missing
   its SCI/RMS/FLG extension) is an error naming it, or with ``injection.exclude_damaged_frames`` an exclusion
   recorded in the run record and the shards' metadata. When any band is not
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
   sky, read and its own Poisson noise. The host cutout is background-subtracted with the BKG frame paired
   with the exposure by Q1 discovery (else the sigma-clipped quadrant median); pixels with a
   ``euclid.FLG_MASK_BITS`` bit set are left out of the background and noise statistics and counted in
   ``host_flagged_pix``.
5. **Outputs**: one Parquet shard per (split, shard), written atomically, at
   ``{output}/phase{stage}/{variant}/{experiment_id}/{split}/part-{k:05d}.parquet``. Images are columns
   ``image_{band}`` of fixed-size binary holding float32 little-endian row-major (H, W) arrays in ADU
   (decode with :func:`decode_image`; ``H = W = stamp_size_pix``). Shards carry the config hash in the
   Parquet key-value metadata. The metadata columns (everything but images) plus ``shard_uri`` /
   ``row_in_shard`` / ``config_hash`` / ``shard_sha256`` are registered in the Iceberg table
   ``sim.injections``: a whole run replaces all of the run's rows in one commit (so ``--force`` with fewer
   shards leaves no rows of deleted files), a Dagster partition run its shard's rows
   (:func:`~constellation_assets.sim.injection.shards.check_registration` compares the rows with the files).
6. **Run record and lease**. One writer per output location: a run holds the lease
   ``{output}/phase{stage}/{variant}/.lease_{experiment_id}.json`` (:mod:`constellation_assets.io.lease`),
   each shard write the shard's lease. The record ``run_config_{experiment_id}.json`` is written at the start
   (``status: started``), on failure (``failed`` with the error) and last (``complete``, with per-shard
   sha256), with absolute data/output/bank locations, the verified bank content hash and the hosts digest.
   A completed record is never trusted blindly: a re-run hashes every shard against it.

Arc S/N is the matched-filter S/N of the noiseless arc against the background noise:
``sqrt(sum(arc**2)) / sigma``, with sigma the median of the RMS frame over the stamp (or the robust
scatter of the quadrant). ``magnification`` is the renderer's lensed / intrinsic source flux (before the
PSF). ``cosmos_hlr_arcsec`` is the seed's "half-light radius of the lensed COSMOS arc", measured on the
rendered noiseless arc of the first band (:func:`~constellation_assets.sim.injection.render.arc_half_light_radius_arcsec`);
the template's own (unlensed) radius is ``cosmos_template_hlr_arcsec`` (and ``source_hlr_arcsec``).

Determinism: same config, same data, same software and platform -> byte-identical shards
(``constellation reproduce`` re-renders every shard and checks it against the recorded sha256; into the
recorded location it compares in memory and names damaged files). Rendering on a GPU
(``compute.device``) gives slightly different floats from the CPU.
"""

from __future__ import annotations

from constellation_assets.provenance import RunConflictError
from constellation_assets.sim.injection.common import (
    HOST_BANDS,
    IMAGE_ENCODING,
    INJECTION_CODE_VERSION,
    INJECTION_HASH_SECTIONS,
    MER_HOST_HDU,
    SPLITS,
    TABLE_IDENTIFIER,
    Host,
    HostSet,
    InjectionError,
    Quadrant,
    Task,
    TaskParameters,
    task_seed,
)
from constellation_assets.sim.injection.hosts import discover_hosts, mer_base_uri, select_host_rows
from constellation_assets.sim.injection.preflight import PreflightReport, preflight
from constellation_assets.sim.injection.render import RenderedTask, render_tasks
from constellation_assets.sim.injection.run import (
    InjectionResult,
    ReproduceResult,
    load_run_config,
    render_single,
    reproduce,
    run_injection,
    task_summary,
)
from constellation_assets.sim.injection.shards import (
    _write_shard,
    decode_image,
    read_stamps,
    register_shards,
)
from constellation_assets.sim.injection.tasks import (
    SOURCE_REFERENCE_BAND,
    SOURCE_SED_ALPHA_RANGE,
    _parse_partition,
    draw_task_parameters,
    find_task,
    parse_partition_key,
    parse_task_id,
    partition_keys,
    plan_tasks,
    run_config_uri_of,
    run_dir,
    shard_uri,
    shards_of,
    source_band_mags,
    source_sed_alpha,
    split_of_host,
)

__all__ = [
    "HOST_BANDS",
    "IMAGE_ENCODING",
    "INJECTION_CODE_VERSION",
    "INJECTION_HASH_SECTIONS",
    "MER_HOST_HDU",
    "SOURCE_REFERENCE_BAND",
    "SOURCE_SED_ALPHA_RANGE",
    "SPLITS",
    "TABLE_IDENTIFIER",
    "Host",
    "HostSet",
    "InjectionError",
    "InjectionResult",
    "PreflightReport",
    "Quadrant",
    "RenderedTask",
    "ReproduceResult",
    "RunConflictError",
    "Task",
    "TaskParameters",
    "decode_image",
    "discover_hosts",
    "draw_task_parameters",
    "find_task",
    "load_run_config",
    "mer_base_uri",
    "parse_partition_key",
    "parse_task_id",
    "partition_keys",
    "plan_tasks",
    "preflight",
    "read_stamps",
    "register_shards",
    "render_single",
    "render_tasks",
    "reproduce",
    "run_config_uri_of",
    "run_dir",
    "run_injection",
    "select_host_rows",
    "shard_uri",
    "shards_of",
    "source_band_mags",
    "source_sed_alpha",
    "split_of_host",
    "task_seed",
    "task_summary",
]
# Private names other modules use (Dagster partitions, fault tests): kept importable from the package.
_ = (_parse_partition, _write_shard)
