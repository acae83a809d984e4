"""Host galaxies: lens-like MER catalog rows placed on a VIS quadrant (or the tile's MER mosaics)."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np

from constellation_assets.io.uri import (
    join_uri,
)
from constellation_assets.sim.injection.common import (
    HOST_BANDS,
    MER_HOST_HDU,
    Host,
    HostSet,
    InjectionError,
    Quadrant,
    _header_float,
    _mer_mode,
)

log = logging.getLogger(__name__)


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


#: A DET quadrant is usable when all three of its extensions exist (``3-4.F.SCI``, ``.RMS``, ``.FLG``).
QUADRANT_KINDS = ("SCI", "RMS", "FLG")
_QUAD_EXT_RE = re.compile(r"^(?P<det_id>\d-\d\.[EFGH])\.(?P<kind>[A-Z]+)$")
_DAMAGED_HINT = (
    "download the frame again (or re-run the step that wrote it); or set injection.exclude_damaged_frames: true "
    "to run without it (the exclusion is recorded in the run record and in the shards' metadata)"
)


def _exposure_quadrants(exp, storage_options: dict | None) -> list[Quadrant]:
    """The SCI quadrants of one VIS exposure, from header-only reads (Q1 discovery / index of ``io.q1``).

    Raises :class:`~constellation_assets.io.q1.Q1FormatError` naming the file when the DET file (or its BKG /
    WGT / PSF companion) is truncated or not FITS, or when a quadrant lacks one of its SCI/RMS/FLG extensions.
    """
    from constellation_assets.io.q1 import Q1FormatError, fits_hdu_offsets, index_exposure, magzerop

    hdus = fits_hdu_offsets(exp.det_uri, storage_options)
    kinds: dict[str, set[str]] = {}
    for h in hdus:
        m = _QUAD_EXT_RE.match(h.name)
        if m:
            kinds.setdefault(m["det_id"], set()).add(m["kind"])
    incomplete = {
        d: sorted(set(QUADRANT_KINDS) - k) for d, k in kinds.items() if not set(QUADRANT_KINDS) <= k
    }
    if incomplete:
        d, missing = sorted(incomplete.items())[0]
        raise Q1FormatError(
            exp.det_uri,
            f"Quadrant {d} has no {'/'.join(missing)} extension"
            + (f" ({len(incomplete)} incomplete quadrants)" if len(incomplete) > 1 else ""),
            "the file is damaged or not a complete VIS calibrated frame: download it again",
        )
    index = index_exposure(exp, storage_options)
    by_name = {h.name: h for h in hdus}
    primary = hdus[0].header
    quads = []
    for row in index.to_pylist():
        h = by_name[row["sci_hdu"]].header
        exptime = _header_float(h, "EXPTIME", _header_float(primary, "EXPTIME", 1.0))
        try:
            magzp = magzerop(h)
        except (KeyError, ValueError):
            try:
                magzp = magzerop(primary)
            except (KeyError, ValueError):
                magzp = float("nan")
        quads.append(
            Quadrant(
                frame_uri=exp.det_uri,
                hdu=row["sci_hdu"],
                nx_pix=int(h["NAXIS1"]),
                ny_pix=int(h["NAXIS2"]),
                zero_point_mag=magzp + 2.5 * math.log10(max(exptime, 1e-30)),
                gain_e_per_adu=_header_float(h, "GAIN", _header_float(primary, "GAIN", float("nan"))),
                header=h.tostring(),
                row=row,
            )
        )
    return quads


def _vis_quadrants(cfg, problems: list[str], excluded: dict[str, str]) -> list[Quadrant]:
    """Every SCI quadrant of the VIS frames under ``data.vis_base_uri`` (sorted by frame, then HDU).

    A frame that cannot be read is an :class:`InjectionError` naming it, or, with
    ``injection.exclude_damaged_frames``, an exclusion recorded in ``excluded`` (uri -> reason).
    """
    from constellation_assets.io.q1 import discover_vis_exposures
    from constellation_assets.io.uri import DataAccessError

    vis = cfg.data.vis_base_uri
    so = cfg.storage_options(vis)
    exposures = discover_vis_exposures(vis, storage_options=so)
    if not exposures:
        problems.append(
            f"no VIS DET frames (EUC_VIS_SWL-DET-*.fits in {{obs_id}}/ folders) under data.vis_base_uri={vis!r}; "
            "run `constellation prepare` / simulate the field, or point data.vis_base_uri at the Q1 VIS folder"
        )
    quads: list[Quadrant] = []
    for exp in exposures:
        try:
            quads += _exposure_quadrants(exp, so)
        except DataAccessError as exc:
            if cfg.injection.exclude_damaged_frames:
                excluded[exc.uri] = exc.problem
                log.warning("excluded (injection.exclude_damaged_frames): %s: %s", exc.uri, exc.problem)
                continue
            raise InjectionError(f"{exc.problem}: {exc.uri}. What to do: {_DAMAGED_HINT}") from None
    return sorted(quads, key=lambda q: (q.frame_uri, q.hdu))


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
    excluded: dict[str, str] = {}
    quads = _vis_quadrants(cfg, problems, excluded)
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
    return HostSet(
        hosts=hosts, quadrants={(q.frame_uri, q.hdu): q for q in quads}, problems=problems, excluded=excluded
    )


def _check_bands(inj) -> list[str]:
    problems = []
    from constellation_assets.euclid import canonical_band

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
    from constellation_assets.euclid import canonical_band
    from constellation_assets.io.q1 import discover_mer_mosaics, read_mosaic_info

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
