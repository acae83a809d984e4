"""Host galaxies: lens-like MER catalog rows placed on a VIS quadrant (or the tile's MER mosaics)."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np

from constellation_assets.io.uri import (
    join_uri,
    list_uri,
    open_uri,
)
from constellation_assets.sim.injection.common import (
    HOST_BANDS,
    MER_HOST_HDU,
    Host,
    HostSet,
    Quadrant,
    _header_float,
    _mer_mode,
)

log = logging.getLogger(__name__)


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
    from constellation_assets.sim.field import canonical_band

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


def mer_base_uri(cfg) -> str:
    """Where the MER mosaics are: ``{q1 root}/MER/`` next to ``data.vis_base_uri`` (the Q1 layout)."""
    from constellation_assets.io.q1 import default_mer_base_uri

    return default_mer_base_uri(cfg.data.vis_base_uri)


def _discover_hosts_mer(cfg) -> HostSet:
    """Hosts placed on the tile's MER mosaics (all configured bands must exist and share one pixel grid)."""
    from constellation_assets.io.q1 import discover_mer_mosaics, read_mosaic_info
    from constellation_assets.sim.field import canonical_band

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
