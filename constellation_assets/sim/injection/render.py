"""Rendering a batch of tasks: arcs (torch ray-shooting), host cutouts, composites."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from constellation_assets.sim.injection.common import (
    _RENDER_BATCH,
    Host,
    HostSet,
    InjectionError,
    Quadrant,
    Task,
    TaskParameters,
    _header_float,
    _mer_mode,
)
from constellation_assets.sim.injection.tasks import draw_task_parameters, source_band_mags

log = logging.getLogger(__name__)


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


@dataclass
class _QuadrantPixels:
    sci: np.ndarray
    background: np.ndarray | float
    rms: np.ndarray | None
    robust_sigma: float
    flagged: np.ndarray | None = None  # FLG & FLG_MASK_BITS != 0


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
    """SCI, RMS, FLG and BKG of a quadrant by byte range (``io.q1.read_quadrant_hdus`` on its index row).

    Pixels with any ``euclid.FLG_MASK_BITS`` bit set are left out of the background and noise statistics.
    """
    from astropy.stats import sigma_clipped_stats

    from constellation_assets.euclid import FLG_MASK_BITS
    from constellation_assets.io.q1 import read_quadrant_hdus
    from constellation_assets.io.uri import DataAccessError

    try:
        hdus = read_quadrant_hdus(q.row, storage_options, kinds=["sci", "rms", "flg", "bkg"])
    except DataAccessError as exc:
        raise InjectionError(
            f"{exc.problem}: {exc.uri} (quadrant {q.hdu}). What to do: {exc.hint or 'check the frame'}"
        ) from None
    sci = np.asarray(hdus["sci"][0], dtype=np.float32)
    rms = np.asarray(hdus["rms"][0], dtype=np.float32) if "rms" in hdus else None
    flagged = None
    if "flg" in hdus:
        flagged = (np.asarray(hdus["flg"][0]).astype(np.int64) & FLG_MASK_BITS) != 0
    background: np.ndarray | float = float("nan")
    if "bkg" in hdus and np.shape(hdus["bkg"][0]) == sci.shape:
        background = np.asarray(hdus["bkg"][0], dtype=np.float32)
    _, median, std = sigma_clipped_stats(sci, mask=flagged, sigma=3.0, maxiters=5)
    if not isinstance(background, np.ndarray):
        background = float(median)
    return _QuadrantPixels(sci=sci, background=background, rms=rms, robust_sigma=float(std), flagged=flagged)


def _cutout(px: _QuadrantPixels, host: Host, size: int) -> tuple[np.ndarray, float, float, int | None]:
    """(background-subtracted float32 cutout, background at the centre, noise sigma, flagged pixels) of a host."""
    x0 = int(round(host.x_pix)) - size // 2
    y0 = int(round(host.y_pix)) - size // 2
    sl = (slice(y0, y0 + size), slice(x0, x0 + size))
    bkg = px.background[sl] if isinstance(px.background, np.ndarray) else px.background
    cut = (px.sci[sl] - bkg).astype(np.float32)
    bkg_c = float(np.median(bkg)) if isinstance(bkg, np.ndarray) else float(bkg)
    sigma = px.robust_sigma
    bad = px.flagged[sl] if px.flagged is not None else None
    if px.rms is not None:
        r = px.rms[sl]
        ok = np.isfinite(r) & (r > 0)
        if bad is not None:
            ok &= ~bad
        good = r[ok]
        if good.size:
            sigma = float(np.median(good))
    return cut, bkg_c, sigma, (int(bad.sum()) if bad is not None else None)


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
            p.cosmos_template_hlr_arcsec = float(h)
            p.source_hlr_arcsec = float(h)  # the unlensed source's radius, as for Sersic sources
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
    images = res.images_adu.detach().cpu().numpy().astype(np.float32)
    if inj.source_mode == "cosmos":
        for p, img in zip(params, images, strict=True):
            p.cosmos_hlr_arcsec = arc_half_light_radius_arcsec(img[0], inj.pixel_scale_arcsec)
    return images, res.magnification.detach().cpu().numpy().astype(np.float64)


def arc_half_light_radius_arcsec(image: np.ndarray, pixel_scale_arcsec: float) -> float:
    """Half-light radius of a rendered (noiseless, PSF-convolved) arc: the radius of the circle around the
    arc's flux-weighted centroid that holds half of its flux in the stamp (pixel centres, linear interpolation).

    This is the seed's ``cosmos_hlr_arcsec``, "half-light radius of the lensed COSMOS arc", measured in the first
    configured band; the template's own radius is ``cosmos_template_hlr_arcsec``.
    """
    img = np.clip(np.asarray(image, dtype=np.float64), 0.0, None)
    total = float(img.sum())
    if not total > 0:
        return float("nan")
    yy, xx = np.indices(img.shape, dtype=np.float64)
    xc, yc = float((img * xx).sum() / total), float((img * yy).sum() / total)
    r = np.hypot(xx - xc, yy - yc).ravel()
    order = np.argsort(r, kind="stable")
    cum = np.cumsum(img.ravel()[order])
    k = int(np.searchsorted(cum, 0.5 * total))
    if k == 0:
        return float(r[order[0]] * pixel_scale_arcsec)
    r0, r1 = r[order[k - 1]], r[order[k]]
    c0, c1 = cum[k - 1], cum[k]
    frac = (0.5 * total - c0) / (c1 - c0) if c1 > c0 else 0.0
    return float((r0 + frac * (r1 - r0)) * pixel_scale_arcsec)


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
    #: VIS-quadrant hosts: stamp pixels with a FLG_MASK_BITS bit set (None: no FLG extension / MER mosaics)
    host_flagged_pix: int | None = None


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
    cut: dict[int, tuple[np.ndarray, float, float, int | None]] = {}
    for key in sorted(by_quad):
        q = hosts.quadrants[key]
        px = _quadrant_pixels(q, cfg.storage_options(q.frame_uri))
        for i in by_quad[key]:
            cut[i] = _cutout(px, tasks[i].host, inj.stamp_size_pix)
    for i, (t, p) in enumerate(zip(tasks, params, strict=True)):
        host_img, bkg, sigma, n_flagged = cut[i]
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
                host_flagged_pix=n_flagged,
            )
        )
    return out


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
