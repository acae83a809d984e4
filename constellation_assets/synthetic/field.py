"""Synthetic Euclid Q1 field: orchestration of one tile / the whole field, summaries and config hashes.

``simulate_field(cfg)`` writes, below ``cfg.data.vis_base_uri`` and ``cfg.data.catalog_base_uri`` (local or
s3://), the files the pipeline reads from the public Q1 bucket (layout: :mod:`.layout`; physics:
:mod:`.population`, :mod:`.psf`, :mod:`.render`, :mod:`.mer`):

- per exposure ``EUC_VIS_SWL-{DET,BKG,WGT}-{obs:06d}-{dither:02d}-{exposure}-0000000__{ts}Z.fits``
  (exposure 1 nominal for every dither, 2 short for ``short_exposure_dithers``);
- per observation ``EUC_VIS_GRD-PSF-000-000000-0000000__{ts}Z.fits`` (9 x 9 native 21 x 21 stamps per quadrant);
- per tile the MER final catalog and (``write_mer_mosaics``) the MER mosaics of ``mer_bands``.

Truth (not part of Q1) goes to ``{truth_base}/{tile_id}/``: ``truth_objects.parquet`` (one row per simulated
object, with TRUE_ID, the OBJECT_ID of the catalog entry it is the brightest member of and the one it is
merged into), ``shear_truth.json`` (the shear actually applied, the lensing settings, seed) and, written last,
``field_manifest.json`` listing every file and the config hash: a tile is complete iff it exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable

import numpy as np

from constellation_assets.euclid import canonical_band
from constellation_assets.io.uri import (
    DataAccessError,
    atomic_write_bytes,
    get_fs,
    join_uri,
    read_text,
    uri_exists,
)
from constellation_assets.synthetic.focal_plane import Exposure, exposure_layout, focal_plane, quadrant_header
from constellation_assets.synthetic.layout import (
    file_timestamp,
    hash_hex,
    mer_file_name,
    tile_truth_uri,
    write_parquet,
)
from constellation_assets.synthetic.mer import (
    BANDS,
    measured_mer_catalog,
    mer_bands_of,
    render_mer_images,
    truth_mer_catalog,
    write_mer_catalog,
    write_mer_mosaic,
)
from constellation_assets.synthetic.population import simulate_tile_sources
from constellation_assets.synthetic.render import render_dither, write_psf_product

log = logging.getLogger(__name__)

__all__ = [
    "FieldSummary",
    "TileFieldSummary",
    "exposure_coverage",
    "field_config_hash",
    "simulate_field",
    "simulate_tile",
]

_GENERATOR = "constellation-field-v2"


@dataclasses.dataclass
class TileFieldSummary:
    tile_id: int
    obs_ids: list[int]
    n_galaxies: int
    n_stars: int
    n_catalog_rows: int
    g1_true: float
    g2_true: float
    files: list[str]
    skipped: bool
    n_exposures: int = 0


@dataclasses.dataclass
class FieldSummary:
    tiles: list[TileFieldSummary]
    seconds: float
    config_hash: str
    shear: dict = dataclasses.field(default_factory=dict)

    @property
    def n_files(self) -> int:
        return sum(len(t.files) for t in self.tiles)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_config_hash(cfg) -> str:
    """Hash of everything the VIS frames, PSF files, catalog and truth depend on."""
    d = cfg.field.model_dump(mode="json")
    d.pop("truth_base_uri", None)
    # MER mosaics are an add-on product tracked in the manifest: switching them on keeps the exposures valid.
    d.pop("write_mer_mosaics", None)
    d.pop("mer_bands", None)
    if d.get("noise_sign", 1) == 1:  # the default leaves the hash (and so existing fields) unchanged
        d.pop("noise_sign", None)
    if d.get("scene_shear_group_arcsec") is None:
        d.pop("scene_shear_group_arcsec", None)
    d["_generator"] = _GENERATOR
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def exposure_coverage(cfg, exposures: list[Exposure], ra, dec) -> np.ndarray:
    """How many of ``exposures`` hold each position inside one of their quadrants."""
    from astropy.wcs import WCS

    f = cfg.field
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    out = np.zeros(ra.shape, dtype=np.int32)
    if ra.size == 0:
        return out
    pointings: dict[tuple, list[Exposure]] = {}
    for e in exposures:  # the exposures of a dither share one pointing
        pointings.setdefault((e.ra_deg, e.dec_deg, e.pa_deg), []).append(e)
    for exps in pointings.values():
        for q in focal_plane(f):
            x, y = WCS(quadrant_header(f, exps[0], q)).all_world2pix(ra, dec, 1)
            inside = (x >= 0.5) & (x <= f.quadrant_nx_pix + 0.5) & (y >= 0.5) & (y <= f.quadrant_ny_pix + 0.5)
            out += inside * len(exps)
    return out


def _existing_manifest(cfg, tile_id: int) -> dict | None:
    uri = join_uri(tile_truth_uri(cfg, tile_id), "field_manifest.json")
    so = cfg.storage_options(uri)
    if not uri_exists(uri, so):
        return None
    try:
        return json.loads(read_text(uri, so))
    except (json.JSONDecodeError, DataAccessError) as exc:
        log.warning("unreadable field manifest %s (%s): regenerating the tile", uri, exc)
        return None


def _remove_files(cfg, uris: list[str]) -> None:
    for uri in uris:
        fs, path = get_fs(uri, cfg.storage_options(uri))
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)


def _shear_record(cfg, tile_id: int, g_mean, h: str) -> dict:
    f = cfg.field
    return {
        "tile_id": tile_id,
        "G1_TRUE": float(g_mean[0]),
        "G2_TRUE": float(g_mean[1]),
        "shear_model": f.shear_model,
        "shear_g1_config": f.shear_g1,
        "shear_g2_config": f.shear_g2,
        "shear_positions": bool(f.shear_positions),
        "scene_shear_group_arcsec": f.scene_shear_group_arcsec,
        "kappa": 0.0,
        "intrinsic_rotation_deg": float(f.intrinsic_rotation_deg),
        "paired_noise": bool(f.paired_noise),
        "psf_model_size_error": float(f.psf_model_size_error),
        "psf_model_e1_error": float(f.psf_model_e1_error),
        "psf_model_e2_error": float(f.psf_model_e2_error),
        "mer_catalog": f.mer_catalog,
        "frame": "GalSim local world frame (u = west, v = north); equals detector x, y at position_angle_deg = 0",
        "lensing_map": "tangent plane of the tile centre; theta = A^-1 beta, A = [[1-g1, -g2], [-g2, 1+g1]]",
        "seed": f.seed,
        "config_hash": h,
    }


def _mosaic_bands(f) -> tuple[list, bool]:
    """Bands to render (the written mosaics, plus VIS for a measured catalog) and whether VIS is written."""
    bands = mer_bands_of(f) if f.write_mer_mosaics else []
    if f.mer_catalog == "measured" and all(b.name != "VIS" for b in bands):
        bands = [BANDS["VIS"], *bands]
    return bands, bool(f.write_mer_mosaics)


def simulate_tile(
    cfg, tile_id: int, exposures: list[Exposure], force: bool = False, progress: Callable | None = None
) -> TileFieldSummary:
    """Simulate (or skip, if complete and unchanged) one tile's exposures, PSF files, catalog and truth."""
    f = cfg.field
    h = field_config_hash(cfg)
    prev = _existing_manifest(cfg, tile_id)
    if prev is not None and not force:
        all_there = all(uri_exists(u, cfg.storage_options(u)) for u in prev.get("files", []))
        if prev.get("config_hash") == h and all_there:
            log.info("tile %s: synthetic field complete (config hash %s), skipping", tile_id, h)
            files = list(prev["files"])
            if f.write_mer_mosaics and set(prev.get("mer_mosaics") or {}) != {
                canonical_band(b) for b in f.mer_bands
            }:
                files = _add_mer_mosaics(cfg, tile_id, prev, exposures)
            return TileFieldSummary(
                tile_id,
                prev["obs_ids"],
                prev["n_galaxies"],
                prev["n_stars"],
                prev["n_catalog_rows"],
                prev["G1_TRUE"],
                prev["G2_TRUE"],
                files,
                True,
                int(prev.get("n_exposures", len(exposures))),
            )
        if prev.get("config_hash") != h:
            raise FileExistsError(
                f"tile {tile_id}: a synthetic field made with a different field config (hash "
                f"{prev.get('config_hash')} != {h}) exists under {tile_truth_uri(cfg, tile_id)}; "
                "re-run with force=True (--force) to replace it, or write to another data root"
            )
    if prev is not None:
        # Drop the completeness marker first: an interrupted regeneration must never look complete.
        _remove_files(cfg, [join_uri(tile_truth_uri(cfg, tile_id), "field_manifest.json")])
        _remove_files(cfg, list(prev.get("files", [])))

    truth = simulate_tile_sources(cfg, tile_id, exposures)
    g_mean = truth.pop("_g_mean")
    files: list[str] = []
    n_cover = np.zeros(len(truth["RA"]), dtype=np.int32)
    by_dither: dict[tuple[int, int], list[Exposure]] = {}
    for e in exposures:
        by_dither.setdefault((e.obs_id, e.dither), []).append(e)
    for obs_id in sorted({e.obs_id for e in exposures}):
        files.append(write_psf_product(cfg, obs_id))
    for exps in by_dither.values():
        written, covered = render_dither(cfg, exps, truth)
        files += written
        n_cover += covered
        if progress:
            progress(len(exps))

    bands, write = _mosaic_bands(f)
    exptimes = [e.exptime_s for e in exposures]
    mosaics: dict[str, str] = {}
    vis = None
    for band, data, hdr in render_mer_images(cfg, tile_id, truth, exptimes, bands):
        if band.name == "VIS":
            vis = (data, hdr)
        if write and band.name in {canonical_band(b) for b in f.mer_bands}:
            mosaics[band.name] = write_mer_mosaic(cfg, tile_id, band, data, hdr)
    if f.mer_catalog == "measured":
        mer, rows, member_of = measured_mer_catalog(
            cfg,
            tile_id,
            truth,
            n_cover,
            vis[0],
            vis[1],
            lambda ra, dec: exposure_coverage(cfg, exposures, ra, dec),
        )
    else:
        mer, rows, member_of = truth_mer_catalog(cfg, tile_id, truth, n_cover)
    del vis
    ts = file_timestamp(f.seed, "MER", tile_id)
    mer_uri = join_uri(
        cfg.data.catalog_base_uri,
        str(tile_id),
        mer_file_name(tile_id, hash_hex(f.seed, "mer-hash", tile_id), ts),
    )
    write_mer_catalog(mer_uri, mer, tile_id, cfg.storage_options(mer_uri))
    files.append(mer_uri)
    files += list(mosaics.values())

    # Truth: every simulated object; OBJECT_ID of the catalog entry it is the brightest member of (-1
    # otherwise) and MERGED_OBJECT_ID of the entry it is blended into (-1: not in the catalog).
    n = len(truth["RA"])
    obj_id = np.full(n, -1, dtype=np.int64)
    real = rows >= 0
    obj_id[rows[real]] = mer["OBJECT_ID"][real]
    merged = (
        np.where(member_of >= 0, mer["OBJECT_ID"][np.clip(member_of, 0, None)], -1) if len(rows) else obj_id
    )
    truth_cols = {
        "TILE_ID": np.full(n, tile_id, dtype=np.int64),
        "OBJECT_ID": obj_id,
        "MERGED_OBJECT_ID": np.asarray(merged, dtype=np.int64),
        **truth,
    }
    truth_cols["N_EXPOSURES"] = n_cover
    tdir = tile_truth_uri(cfg, tile_id)
    truth_uri = join_uri(tdir, "truth_objects.parquet")
    write_parquet(truth_uri, truth_cols, cfg.storage_options(truth_uri))
    n_gal = int((~truth["IS_STAR"]).sum())
    n_star = int(truth["IS_STAR"].sum())
    shear = _shear_record(cfg, tile_id, g_mean, h)
    shear_uri = join_uri(tdir, "shear_truth.json")
    atomic_write_bytes(shear_uri, json.dumps(shear, indent=2).encode(), cfg.storage_options(shear_uri))
    files += [truth_uri, shear_uri]
    obs_ids = sorted({e.obs_id for e in exposures})
    manifest = {
        "tile_id": tile_id,
        "config_hash": h,
        "obs_ids": obs_ids,
        "n_exposures": len(exposures),
        "n_galaxies": n_gal,
        "n_stars": n_star,
        "n_catalog_rows": int(len(rows)),
        "G1_TRUE": shear["G1_TRUE"],
        "G2_TRUE": shear["G2_TRUE"],
        "files": files,
        "mer_mosaics": mosaics,
    }
    man_uri = join_uri(tdir, "field_manifest.json")
    atomic_write_bytes(man_uri, json.dumps(manifest, indent=2).encode(), cfg.storage_options(man_uri))
    return TileFieldSummary(
        tile_id,
        obs_ids,
        n_gal,
        n_star,
        int(len(rows)),
        shear["G1_TRUE"],
        shear["G2_TRUE"],
        files,
        False,
        len(exposures),
    )


def _add_mer_mosaics(cfg, tile_id: int, prev: dict, exposures: list[Exposure]) -> list[str]:
    """Write the MER mosaics of a complete tile from its truth table and record them in its manifest."""
    import pyarrow.parquet as pq

    tdir = tile_truth_uri(cfg, tile_id)
    truth_uri = join_uri(tdir, "truth_objects.parquet")
    fs, path = get_fs(truth_uri, cfg.storage_options(truth_uri))
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh)
    truth = {k: table.column(k).to_numpy() for k in table.column_names}
    old = set((prev.get("mer_mosaics") or {}).values())
    exptimes = [e.exptime_s for e in exposures]
    mosaics = {
        band.name: write_mer_mosaic(cfg, tile_id, band, data, hdr)
        for band, data, hdr in render_mer_images(cfg, tile_id, truth, exptimes, mer_bands_of(cfg.field))
    }
    _remove_files(cfg, sorted(old - set(mosaics.values())))
    files = [u for u in prev["files"] if u not in old] + list(mosaics.values())
    manifest = {**prev, "files": files, "mer_mosaics": mosaics}
    man_uri = join_uri(tdir, "field_manifest.json")
    atomic_write_bytes(man_uri, json.dumps(manifest, indent=2).encode(), cfg.storage_options(man_uri))
    return files


def _write_tile_association(cfg, skipped: bool) -> None:
    """The tile -> observation table of the field at ``data.tile_association_uri``, as IRSA's for Q1.

    Derived from the quadrant index of the written files (the index cache that prepare then reuses), so a
    tile's observations are exactly those with a quadrant overlapping its extended area.
    """
    from constellation_assets.io.q1 import (
        build_quadrant_index,
        discover_vis_exposures,
        tile_association_from_index,
        write_tile_association,
    )
    from constellation_assets.io.uri import uri_exists
    from constellation_assets.prepare import quadrant_index_cache_uri
    from constellation_assets.sky.tiles import mer_tile

    uri = cfg.data.tile_association_uri
    so = cfg.storage_options(uri)
    if skipped and uri_exists(uri, so):
        return
    vis_so = cfg.storage_options(cfg.data.vis_base_uri)
    index = build_quadrant_index(
        discover_vis_exposures(cfg.data.vis_base_uri, storage_options=vis_so),
        cache_uri=quadrant_index_cache_uri(cfg),
        storage_options=vis_so,
        cache_storage_options=cfg.storage_options(cfg.output.root_uri),
    )
    tc = cfg.tiling
    boxes = {
        t: mer_tile(t, tc.tile_core_arcmin, tc.tile_extended_arcmin).extended for t in cfg.field.tile_ids
    }
    write_tile_association(uri, tile_association_from_index(index, boxes), so)
    log.info("tile association of %d tiles written to %s", len(boxes), uri)


def simulate_field(cfg, force: bool = False, progress: bool = False) -> FieldSummary:
    """Write the synthetic field of ``cfg.field`` in the Q1 layout under ``cfg.data`` (idempotent).

    A tile whose ``field_manifest.json`` records the same field config and whose files all exist is skipped;
    ``force=True`` regenerates it (removing the files listed in the old manifest first).
    """
    t0 = time.perf_counter()
    f = cfg.field
    if f.write_mer_mosaics:
        mer_bands_of(f)  # fail before any rendering
    exposures = exposure_layout(cfg)
    by_tile: dict[int, list[Exposure]] = {}
    for e in exposures:
        by_tile.setdefault(e.tile_id, []).append(e)
    tiles = []
    if progress:
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            task = bar.add_task("simulating exposures", total=len(exposures))
            for tile_id, exps in by_tile.items():
                s = simulate_tile(cfg, tile_id, exps, force=force, progress=lambda k: bar.advance(task, k))
                if s.skipped:
                    bar.advance(task, len(exps))
                tiles.append(s)
    else:
        for tile_id, exps in by_tile.items():
            tiles.append(simulate_tile(cfg, tile_id, exps, force=force))
    if cfg.data.tile_association_uri:
        _write_tile_association(cfg, skipped=all(t.skipped for t in tiles))
    shear = {
        "shear_g1": f.shear_g1,
        "shear_g2": f.shear_g2,
        "shear_positions": bool(f.shear_positions),
        "scene_shear_group_arcsec": f.scene_shear_group_arcsec,
        "intrinsic_rotation_deg": float(f.intrinsic_rotation_deg),
        "paired_noise": bool(f.paired_noise),
        "applied": {str(t.tile_id): [t.g1_true, t.g2_true] for t in tiles},
    }
    return FieldSummary(tiles, time.perf_counter() - t0, field_config_hash(cfg), shear)
