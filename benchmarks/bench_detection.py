"""Shear bias of detection: peak detection with response vs stamps on a catalog, on the same blended scenes.

    .venv/bin/python benchmarks/bench_detection.py [--scale 1.0] [--only isolated,truth] [--seed 0]
        [--size 384] [--workers 1] [--same-noise-only] [--shear-about group|image] [--json OUT.json]
        [--peak-rel-width 0.0]

Defaults: 100 realisations per scene, ~160 s on one core of the shared 2-core machine (``--scale 0.05``:
8 s, detect_peaks ~40 % of it), sigma_m ~2e-3 for ``truth`` on ``isolated``; ``detect`` is 5-10x noisier.

Methods (all on the same noisy scene images, FPFS sigma 0.35", C = 4 sigma(M00), smooth S/N >= 10 weight
of width 2, noise-bias corrected responses):

* ``detect``: :func:`constellation_assets.shear.detect.detect_peaks` on the whole image (peaks of the
  deconvolved smoothed image, with the analytic response of the detection about each detection pixel;
  its default peak annulus makes a source a plateau of a few weighted pixels, so ``N/img`` exceeds the
  number of galaxies).
* ``detect_about``: the same detections and ``phi``, with the responses about the simulation's known shear
  centre of each detection (the group anchor of its nearest true galaxy; :func:`detect.response_about`):
  a simulation-only control variate, same expectation, smaller scatter where the +g/-g images move the
  scene relative to the detection pixels.  One ``detect_peaks`` run serves both.
* ``truth``: 64 x 64 stamps cut at each galaxy's true sheared position (integer centre plus the sub-pixel
  ``offsets_pix``) through :func:`fpfs.measure_stamps`: no detection at all (blending still acts on the
  stamps), the reference.
* ``catalog``: a catalog made on the sheared noisy image without response, like MER: local maxima
  (7 x 7, i.e. 3 px apart) of the PSF-matched-filtered image above S/N 5, centroids by a Gaussian-
  windowed (sigma 2 px, 3 iterations) first moment of the noisy image, then stamps as ``truth``.

Scenes (0.1" pixels, GalSim Moffat beta 2.5 FWHM 0.17" PSF with pixel; galaxies Sersic n ~ 1.2, hlr ~
0.25" lognormal, Rayleigh intrinsic shapes sigma 0.2, as ``calibration._draw_galaxy``; matched-filter S/N
``sqrt(sum I^2) / sigma_n`` of the PSF-convolved galaxy from dN/dS ~ S^-2 on [10, 100]; white noise 1):

* ``isolated``: a jittered grid with 5" spacing (random sub-pixel positions);
* ``pairs``: pairs 0.5-1.5" apart (uniform), flux ratio uniform in [0.2, 1], pair centres on a 6" grid;
* ``field``: Poisson, 80 galaxies per arcmin^2, uniform random positions (blends as they come).

Shear: the whole scene is sheared, each profile by ``g`` and each position by ``x -> a + A (x - a)`` (``A``
GalSim's shear matrix, ``[[1+g1, g2], [g2, 1-g1]] / sqrt(1-g^2)``) about the centre ``a`` of the galaxy's
friends-of-friends group (linking length 3": an isolated galaxy itself, a pair's centre, a blend group of
the field).  That is the shear of the whole scene about its centre up to a translation of each group, and
groups are >= 3" apart, so every method has the same expectation either way; but the translation (g times
the distance to the centre, up to ~3 px) moves each galaxy over the pixel grid and the shared noise, and
then its +g and -g images no longer cancel each other's noise and sub-pixel phase: m is 3-5 times noisier
(``--shear-about image`` runs the literal version).

Images: each realisation has one noise field ``N`` and eight images, ``[rot0 +g, rot0 -g, rot90 -g,
rot90 +g]`` with ``+N`` and the same four with ``-N`` (``--same-noise-only``: the first four).  rot90 is
the scene rotated by 90 degrees (intrinsic orientations and positions) with the noise rotated; with a
round PSF the rotated scene sheared by ``+-g`` is exactly the 90-degree pixel rotation of the unrotated
scene at ``-+g`` (``calibration.rot90_about_centre``), so it is made that way (the test suite checks it
against a direct rendering).  The ``-N`` copy cancels the first-order noise term, which the +g/-g pair
alone does not once galaxies move over the noise (4-5x smaller m error per realisation); it is another
valid noise realisation, so nothing else changes.  The galaxy fluxes are fixed on the +g scene and reused
(a flux set from each sheared image's own S/N would respond to the shear through the S/N selection).
Even realisations are sheared by ``(g, 0)``, odd ones by ``(0, g)``, ``g = 0.02``.

Estimator: per realisation ``r`` sheared along ``a``, ``num_r = sum_{+g images} phi_a - sum_{-g images}
phi_a`` and ``den_r = sum_{all images} R_aa``; ``m_a = sum num / sum den / g - 1``; ``c_a = sum_{all
images} phi_a / sum_{all images} R_aa`` over all realisations.  With the round PSF, c is zero by
construction for a method that commutes with 90-degree pixel rotations (all three do, to float32
rounding): c tests that symmetry, not a PSF leakage.  Errors: delete-one-block jackknife over
realisations.  Detections are kept when their 64 x 64 stamp fits in the image, in a region symmetric
about the centre pixel (the rotation centre): 32-33 px from the border (``detect_peaks(border_pix=32)``
then its first row and column dropped).  The truth catalog keeps the galaxies whose unsheared position is
37 px from the border, the same galaxies in all images.  ``N/img`` is the mean number of catalog entries
per image, ``Nw/img`` their summed weight.

Everything is deterministic from ``--seed``; ``--scale`` multiplies the number of realisations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from constellation_assets.euclid import VIS_PSF_FWHM_ARCSEC
from constellation_assets.shear.calibration import (
    CalibrationSettings,
    _draw_galaxy,
    _draw_snr,
    rot90_about_centre,
)
from constellation_assets.shear.ensemble import ratio_jackknife
from constellation_assets.shear.fpfs import measure_stamps
from constellation_assets.synthetic.population import blend_group_centres

SCENES = ("isolated", "pairs", "field")
METHODS = ("detect", "detect_about", "truth", "catalog")
METHOD_LABELS = {
    "detect": "(a) detect_peaks, with response",
    "detect_about": "(a') detect_peaks, R about shear centre",
    "truth": "(b) truth positions",
    "catalog": "(c) catalog detection, no response",
}

PIXEL_SCALE = 0.1
MOFFAT_BETA = 2.5
G_TRUE = 0.02
NOISE_SIGMA = 1.0
STAMP = 64  # measurement stamps
HALF = STAMP // 2
# Per-galaxy render stamps: odd, so the truncation box is symmetric about the galaxy's pixel and turns
# into itself under 90-degree rotations.
RENDER_STAMP = 2 * HALF + 1
BORDER = HALF  # a stamp around a detection fits in the image
TRUTH_MARGIN = 5  # truth galaxies: unsheared position BORDER + this from the edge (shear moves <= 4 px)
ISOLATED_SPACING_PIX = 50
ISOLATED_JITTER_PIX = 5.0
PAIR_SPACING_PIX = 60
PAIR_SEP_ARCSEC = (0.5, 1.5)
PAIR_FLUX_RATIO = (0.2, 1.0)
FIELD_DENSITY_ARCMIN2 = 80.0
#: Positions are sheared about the centre of their friends-of-friends group (this linking length), as the
#: field calibration's ``scene_shear_group_arcsec``.
GROUP_LINK_ARCSEC = 3.0
SCENE_MARGIN_PIX = 48  # grid scenes: galaxies this far inside the edge (room for shear and stamps)
# Measurement (the estimator's defaults for the shear catalog).
SIGMA_ARCSEC = 0.35
C_RATIO = 4.0
SNR_MIN = 10.0
SELECTION_BIN_WIDTH = 2.0
# Catalog detection without response.
CATALOG_SNR_MIN = 5.0
CATALOG_MIN_SEP_PIX = 3
CATALOG_CENTROID_SIGMA_PIX = 2.0
CATALOG_CENTROID_ITER = 3
CATALOG_CENTROID_HALF = 8

_POP = CalibrationSettings(population="sersic", snr_min=10.0, snr_max=100.0, snr_power_law_index=-2.0)


def _rng(seed: int, kind: str, index: int, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(
        f"constellation/bench-detection/{kind}/{purpose}/{seed}/{index}".encode()
    ).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def make_psf():
    import galsim

    return galsim.Moffat(beta=MOFFAT_BETA, fwhm=VIS_PSF_FWHM_ARCSEC).withFlux(1.0)


def psf_image(psf=None, size: int = STAMP) -> np.ndarray:
    """Unit-sum PSF image (pixel included) centred on pixel ``(size//2, size//2)``."""
    psf = make_psf() if psf is None else psf
    arr = psf.drawImage(nx=size, ny=size, scale=PIXEL_SCALE, use_true_center=False).array.astype(np.float64)
    return arr / arr.sum()


@dataclass
class Galaxy:
    """One scene galaxy: unsheared offset (pixels) from the centre pixel, profile, S/N target or flux."""

    dx: float
    dy: float
    profile: object  # unit-flux GalSim profile, intrinsic shape applied
    ax: float = 0.0  # anchor (pixels from the centre pixel) the position is sheared about
    ay: float = 0.0
    snr: float = 0.0  # matched-filter S/N target (used when flux_of is None)
    flux_of: int | None = None  # pairs: flux = flux_ratio * flux of galaxy ``flux_of``
    flux_ratio: float = 1.0


def scene_galaxies(
    kind: str, seed: int, index: int, size: int = 384, shear_about: str = "group"
) -> list[Galaxy]:
    """The unsheared, unrotated galaxies of realisation ``index`` of scene ``kind``.

    ``shear_about``: the anchor each position is sheared about (``x -> anchor + A (x - anchor)``):
    ``"group"`` (default) the mean position of the galaxy's friends-of-friends group (linking length
    ``GROUP_LINK_ARCSEC``: an isolated galaxy itself, a pair's centre, a field blend group's centre),
    ``"image"`` the image centre (the literal whole-scene shear).  The two differ by a translation of
    each group, and groups are >= 3" apart (where the 0.35" FPFS kernel and the detections no longer
    see each other), so every measurement has the same expectation; but a translation of ``g`` times
    the distance to the image centre (up to ~3 px) moves each galaxy across the pixel grid and the
    shared noise between its +g and -g images, whose differences then no longer cancel: m is several
    times noisier with ``"image"`` (for ``detect_peaks``, whose peak weight changes within a fraction
    of a pixel, ~5x on isolated galaxies with the first version, without the peak annulus).
    """
    if kind not in SCENES:
        raise ValueError(f"scene {kind!r} is not one of {SCENES}")
    if shear_about not in ("group", "image"):
        raise ValueError(f"shear_about={shear_about!r} must be 'group' or 'image'")
    rng = _rng(seed, kind, index, "galaxies")
    half = size // 2
    gals: list[Galaxy] = []

    def grid(spacing: int) -> np.ndarray:
        n = int((2 * (half - SCENE_MARGIN_PIX)) // spacing) + 1
        return (np.arange(n) - 0.5 * (n - 1)) * spacing

    if kind == "isolated":
        g = grid(ISOLATED_SPACING_PIX)
        for cy in g:
            for cx in g:
                jx, jy = rng.uniform(-ISOLATED_JITTER_PIX, ISOLATED_JITTER_PIX, size=2)
                prof = _draw_galaxy(_POP, rng)
                gals.append(Galaxy(cx + jx, cy + jy, prof, snr=_draw_snr(_POP, rng)))
    elif kind == "pairs":
        g = grid(PAIR_SPACING_PIX)
        for cy in g:
            for cx in g:
                jx, jy = rng.uniform(-0.5, 0.5, size=2)
                sep = rng.uniform(*PAIR_SEP_ARCSEC) / PIXEL_SCALE
                ang = rng.uniform(0.0, 2.0 * math.pi)
                ratio = rng.uniform(*PAIR_FLUX_RATIO)
                hx, hy = 0.5 * sep * math.cos(ang), 0.5 * sep * math.sin(ang)
                first = len(gals)
                px, py = cx + jx, cy + jy
                gals.append(Galaxy(px + hx, py + hy, _draw_galaxy(_POP, rng), snr=_draw_snr(_POP, rng)))
                gals.append(
                    Galaxy(px - hx, py - hy, _draw_galaxy(_POP, rng), flux_of=first, flux_ratio=ratio)
                )
    else:
        area_arcmin2 = (size * PIXEL_SCALE / 60.0) ** 2
        n = int(rng.poisson(FIELD_DENSITY_ARCMIN2 * area_arcmin2))
        for _ in range(n):
            # Pixel centres span [-half, size - half - 1]; positions uniform over the image.
            dx, dy = rng.uniform(-half - 0.5, size - half - 0.5, size=2)
            gals.append(Galaxy(dx, dy, _draw_galaxy(_POP, rng), snr=_draw_snr(_POP, rng)))
    if shear_about == "group" and gals:
        # Unweighted group centres; blend_group_centres works in degrees (positions here in pixels).
        deg = PIXEL_SCALE / 3600.0
        xy = np.array([[gl.dx, gl.dy] for gl in gals]) * deg
        ax, ay = blend_group_centres(xy[:, 0], xy[:, 1], np.ones(len(gals)), GROUP_LINK_ARCSEC)
        for gal, x, y in zip(gals, ax / deg, ay / deg, strict=True):
            gal.ax, gal.ay = float(x), float(y)
    return gals


def _shear_matrix(g1: float, g2: float) -> np.ndarray:
    import galsim

    if g1 == 0 and g2 == 0:
        return np.eye(2)
    return np.asarray(galsim.Shear(g1=g1, g2=g2).getMatrix(), dtype=np.float64)


def draw_scene(
    galaxies: list[Galaxy],
    g1: float,
    g2: float,
    size: int = 384,
    rot90: bool = False,
    psf=None,
    fluxes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noiseless scene (size, size) sheared by ``(g1, g2)``; returns ``(image, positions, fluxes)``.

    Each position is sheared about its galaxy's anchor (``x -> anchor + A (x - anchor)``, pixels from the
    centre pixel); ``positions`` (N, 2) are the true sheared (x, y) pixel coordinates (column, row).
    ``rot90``: the scene rotated by 90 degrees first (profiles rotated, offsets (dx, dy) -> (dy, -dx), as
    ``rot90_about_centre`` moves pixels).  ``fluxes``: None sets each galaxy's flux from its matched-filter
    S/N (noise ``NOISE_SIGMA``) on this sheared image, a pair's second member at a ratio of the first's;
    the other variants of a scene must reuse these fluxes (a flux that changed with the shear would
    respond through the S/N selection: m ~ +1.5e-2 on isolated galaxies).
    """
    import galsim

    psf = make_psf() if psf is None else psf
    a = _shear_matrix(g1, g2)
    half = size // 2
    img = np.zeros((size, size))
    pos = np.empty((len(galaxies), 2))
    out_flux = np.empty(len(galaxies))
    for i, gal in enumerate(galaxies):
        d = np.array([gal.dy, -gal.dx]) if rot90 else np.array([gal.dx, gal.dy])
        anchor = np.array([gal.ay, -gal.ax]) if rot90 else np.array([gal.ax, gal.ay])
        prof = gal.profile.rotate(-90.0 * galsim.degrees) if rot90 else gal.profile
        x, y = anchor + a @ (d - anchor) + half
        pos[i] = x, y
        ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
        stamp = (
            galsim.Convolve(prof.shear(g1=g1, g2=g2), psf)
            .drawImage(
                nx=RENDER_STAMP,
                ny=RENDER_STAMP,
                scale=PIXEL_SCALE,
                use_true_center=False,
                offset=(x - ix, y - iy),
            )
            .array.astype(np.float64)
        )
        if fluxes is not None:
            flux = float(fluxes[i])
        elif gal.flux_of is None:
            flux = gal.snr * NOISE_SIGMA / math.sqrt(float((stamp**2).sum()))
        else:
            flux = gal.flux_ratio * out_flux[gal.flux_of]
        out_flux[i] = flux
        # Stamp pixel (HALF, HALF) is scene pixel (ix, iy); clip at the scene edges.
        x0, y0 = ix - HALF, iy - HALF
        sx0, sy0 = max(0, -x0), max(0, -y0)
        sx1, sy1 = min(RENDER_STAMP, size - x0), min(RENDER_STAMP, size - y0)
        if sx1 > sx0 and sy1 > sy0:
            img[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1] += flux * stamp[sy0:sy1, sx0:sx1]
    return img, pos, out_flux


@dataclass
class Realisation:
    """The images of one realisation, sharing one noise field ``N``: [rot0 +g, rot0 -g, rot90 -g,
    rot90 +g] with ``+N``, then (``noise_pairs``) the same four with ``-N``."""

    images: np.ndarray  # (4 or 8, size, size)
    signs: np.ndarray  # sign of the shear of each image
    component: int  # 0: shear (g, 0), 1: (0, g)
    truth_pos: np.ndarray  # (n_images, N, 2) true sheared (x, y) of every galaxy in each image
    truth_keep: np.ndarray  # (N,) galaxies in the truth catalog (same in all images)
    n_galaxies: int
    anchor_pos: np.ndarray | None = None  # (n_images, N, 2) shear centre (x, y) of each galaxy per image
    _detect: dict = field(default_factory=dict, repr=False)  # detect_peaks results per image


def render_realisation(
    kind: str,
    seed: int,
    index: int,
    g: float = G_TRUE,
    size: int = 384,
    noise_sigma: float = NOISE_SIGMA,
    psf=None,
    noise_pairs: bool = True,
    shear_about: str = "group",
) -> Realisation:
    """Realisation ``index`` of scene ``kind``: its sheared images (see :class:`Realisation`).

    The rotated images are exact pixel rotations: with a round PSF the 90-degree rotated scene sheared by
    ``+-g`` is ``rot90_about_centre`` of the unrotated scene at ``-+g`` (noise rotated with it).
    """
    import galsim

    gals = scene_galaxies(kind, seed, index, size, shear_about=shear_about)
    comp = index % 2
    shear = np.array([g, 0.0]) if comp == 0 else np.array([0.0, g])
    with galsim.utilities.single_threaded():
        plus, pos_p, fluxes = draw_scene(gals, *shear, size=size, psf=psf)
        minus, pos_m, _ = draw_scene(gals, *(-shear), size=size, psf=psf, fluxes=fluxes)
    noise = _rng(seed, kind, index, "noise").standard_normal((size, size)) * noise_sigma
    half = size // 2

    def rot(p: np.ndarray) -> np.ndarray:  # (x, y) -> offset (dy, -dx) about the centre pixel
        return np.stack([p[:, 1], 2 * half - p[:, 0]], axis=1)

    images, pos, anchors = [], [], []
    anc = np.array([[gl.ax, gl.ay] for gl in gals]).reshape(-1, 2) + half
    for nz in (noise, -noise) if noise_pairs else (noise,):
        p, m = plus + nz, minus + nz
        images += [p, m, rot90_about_centre(p), rot90_about_centre(m)]
        pos += [pos_p, pos_m, rot(pos_p), rot(pos_m)]
        anchors += [anc, anc, rot(anc), rot(anc)]
    d = np.array([[gl.dx, gl.dy] for gl in gals]).reshape(-1, 2)
    lim = half - BORDER - TRUTH_MARGIN
    keep = (np.abs(d) <= lim).all(axis=1)
    signs = np.tile([1.0, -1.0, -1.0, 1.0], len(images) // 4)
    truth_pos = np.stack(pos) if gals else np.zeros((len(images), 0, 2))
    return Realisation(np.stack(images), signs, comp, truth_pos, keep, len(gals), np.stack(anchors))


def _empty() -> dict[str, np.ndarray]:
    return {k: np.zeros(0) for k in ("weight", "phi1", "phi2", "r11", "r22")}


def measure_at(
    image: np.ndarray, pos: np.ndarray, psf_img: np.ndarray, noise_sigma: float
) -> dict[str, np.ndarray]:
    """FPFS on 64 x 64 stamps of ``image`` centred at the (x, y) positions (integer centre + offsets).

    Returns ``weight``, ``phi1, phi2`` (weight * e) and ``r11, r22`` (weight * response) per position.
    """
    if len(pos) == 0:
        return _empty()
    ix = np.floor(pos[:, 0] + 0.5).astype(int)
    iy = np.floor(pos[:, 1] + 0.5).astype(int)
    win = np.lib.stride_tricks.sliding_window_view(image, (STAMP, STAMP))
    stamps = np.ascontiguousarray(win[iy - HALF, ix - HALF])
    offs = np.stack([pos[:, 0] - ix, pos[:, 1] - iy], axis=1)
    cat = measure_stamps(
        stamps,
        psf_img,
        pixel_scale_arcsec=PIXEL_SCALE,
        noise_sigma=noise_sigma,
        offsets_pix=offs,
        sigma_arcsec=SIGMA_ARCSEC,
        c_ratio=C_RATIO,
        snr_min=SNR_MIN,
        selection_bin_width=SELECTION_BIN_WIDTH,
    )
    w = cat["weight"]
    return {
        "weight": w,
        "phi1": w * cat["e1"],
        "phi2": w * cat["e2"],
        "r11": w * cat["r11"],
        "r22": w * cat["r22"],
    }


def _in_stamp_range(pos: np.ndarray, size: int) -> np.ndarray:
    ix = np.floor(pos[:, 0] + 0.5)
    iy = np.floor(pos[:, 1] + 0.5)
    return (ix >= BORDER) & (ix <= size - BORDER) & (iy >= BORDER) & (iy <= size - BORDER)


def catalog_positions(image: np.ndarray, psf_img: np.ndarray, noise_sigma: float) -> np.ndarray:
    """A detection catalog without response: PSF-matched-filter peaks above S/N 5 (local maxima of a
    7 x 7 window), Gaussian-windowed centroids (sigma 2 px, 3 iterations) on the noisy image.  (N, 2) x, y."""
    from scipy.ndimage import maximum_filter
    from scipy.signal import fftconvolve

    c = psf_img.shape[0] // 2
    k = psf_img[c - 15 : c + 16, c - 15 : c + 16]  # odd, centred: 'same' output aligns with the image
    filt = fftconvolve(image, k[::-1, ::-1], mode="same")
    snr = filt / (noise_sigma * math.sqrt(float((k * k).sum())))
    size = 2 * CATALOG_MIN_SEP_PIX + 1
    peaks = (snr == maximum_filter(snr, size=size, mode="constant", cval=-np.inf)) & (snr > CATALOG_SNR_MIN)
    h = CATALOG_CENTROID_HALF
    peaks[: BORDER - h, :] = peaks[-(BORDER - h) :, :] = False
    peaks[:, : BORDER - h] = peaks[:, -(BORDER - h) :] = False
    py, px = np.nonzero(peaks)
    if len(px) == 0:
        return np.zeros((0, 2))
    win = np.lib.stride_tricks.sliding_window_view(image, (2 * h + 1, 2 * h + 1))
    patch = win[py - h, px - h]  # (N, 2h+1, 2h+1) around each peak
    grid = np.arange(-h, h + 1, dtype=np.float64)
    cx = np.zeros(len(px))
    cy = np.zeros(len(px))
    s2 = 2.0 * CATALOG_CENTROID_SIGMA_PIX**2
    for _ in range(CATALOG_CENTROID_ITER):
        wx = np.exp(-((grid[None, :] - cx[:, None]) ** 2) / s2)
        wy = np.exp(-((grid[None, :] - cy[:, None]) ** 2) / s2)
        wi = patch * wy[:, :, None] * wx[:, None, :]
        norm = wi.sum(axis=(1, 2))
        nx_ = (wi * grid[None, None, :]).sum(axis=(1, 2))
        ny_ = (wi * grid[None, :, None]).sum(axis=(1, 2))
        ok = norm > 0
        new_x = np.where(ok, nx_ / np.where(ok, norm, 1.0), 0.0)
        new_y = np.where(ok, ny_ / np.where(ok, norm, 1.0), 0.0)
        # A centroid that runs off the peak's patch falls back to the peak pixel.
        bad = (np.abs(new_x) > h - 2) | (np.abs(new_y) > h - 2)
        cx = np.where(bad, 0.0, new_x)
        cy = np.where(bad, 0.0, new_y)
    pos = np.stack([px + cx, py + cy], axis=1)
    return pos[_in_stamp_range(pos, image.shape[0])]


def measure_detect(
    image: np.ndarray, psf_img: np.ndarray, noise_sigma: float, peak_rel_width: float = 0.0
) -> dict[str, np.ndarray]:
    from constellation_assets.shear.detect import detect_peaks

    res = detect_peaks(
        image,
        psf_img,
        pixel_scale_arcsec=PIXEL_SCALE,
        noise_sigma=noise_sigma,
        sigma_arcsec=SIGMA_ARCSEC,
        c_ratio=C_RATIO,
        snr_min=SNR_MIN,
        selection_bin_width=SELECTION_BIN_WIDTH,
        peak_radius_pix=4,
        peak_rel_width=peak_rel_width,
        border_pix=BORDER,
    )
    # detect_peaks keeps pixels [BORDER, size - BORDER); drop the first row and column too, so the kept
    # region is symmetric about the centre pixel, the rotation centre of the rot90 images (else c != 0
    # from detections on that one row).
    keep = (res["x"] > BORDER) & (res["y"] > BORDER)
    return {k: np.asarray(v)[keep] for k, v in res.items()}


def _with_response_about(res: dict[str, np.ndarray], truth_pos: np.ndarray, anchor_pos: np.ndarray) -> dict:
    """``res`` with ``r11, r22`` replaced by the responses to a shear about each detection's known shear
    centre: the anchor of the nearest true (sheared) galaxy (:func:`detect.response_about`)."""
    from scipy.spatial import cKDTree

    from constellation_assets.shear.detect import response_about

    out = dict(res)
    n = len(res["x"])
    if n == 0 or len(truth_pos) == 0:
        return out
    _, near = cKDTree(truth_pos).query(np.stack([res["x"], res["y"]], axis=1).astype(np.float64))
    r11, r22 = np.empty(n), np.empty(n)
    centres, which = np.unique(np.round(anchor_pos[near], 9), axis=0, return_inverse=True)
    for k, (x0, y0) in enumerate(centres):
        sel = np.nonzero(which.reshape(-1) == k)[0]
        about = response_about({key: v[sel] for key, v in res.items()}, x0, y0)
        r11[sel], r22[sel] = about["r11"], about["r22"]
    out["r11"], out["r22"] = r11, r22
    return out


def measure_method(
    method: str,
    real: Realisation,
    j: int,
    psf_img: np.ndarray,
    noise_sigma: float,
    peak_rel_width: float = 0.0,
):
    """Per-entry weight, phi and r of image ``j`` of the realisation by ``method`` (``peak_rel_width``:
    of :func:`detect.detect_peaks`, for the detect methods)."""
    image = real.images[j]
    if method == "truth":
        return measure_at(image, real.truth_pos[j][real.truth_keep], psf_img, noise_sigma)
    if method == "catalog":
        return measure_at(image, catalog_positions(image, psf_img, noise_sigma), psf_img, noise_sigma)
    if method in ("detect", "detect_about"):
        if j not in real._detect:  # one detect_peaks run serves both methods
            real._detect[j] = measure_detect(image, psf_img, noise_sigma, peak_rel_width)
        res = real._detect[j]
        if method == "detect":
            return res
        return _with_response_about(res, real.truth_pos[j], real.anchor_pos[j])
    raise ValueError(f"method {method!r} is not one of {METHODS}")


def image_sums(
    method: str,
    real: Realisation,
    psf_img: np.ndarray,
    noise_sigma: float = NOISE_SIGMA,
    peak_rel_width: float = 0.0,
) -> np.ndarray:
    """(n_images, 6) per image: sum phi1, sum phi2, sum r11, sum r22, entries, sum of weights."""
    out = np.zeros((len(real.images), 6))
    for j in range(len(real.images)):
        r = measure_method(method, real, j, psf_img, noise_sigma, peak_rel_width)
        out[j, :4] = [r["phi1"].sum(), r["phi2"].sum(), r["r11"].sum(), r["r22"].sum()]
        out[j, 4] = len(r["phi1"])
        out[j, 5] = float(r["weight"].sum())
    return out


def bias_from_sums(sums: np.ndarray, signs: np.ndarray, components: np.ndarray, g: float) -> dict[str, float]:
    """m and c (with jackknife errors) from per-realisation sums (R, n_images, 6) of :func:`image_sums`."""
    out: dict[str, float] = {}
    for a in (0, 1):
        phi, resp = sums[:, :, a], sums[:, :, 2 + a]
        own = components == a
        m, m_err = ratio_jackknife((phi * signs).sum(axis=1)[own], resp.sum(axis=1)[own])
        c, c_err = ratio_jackknife(phi.sum(axis=1), resp.sum(axis=1))
        out[f"m{a + 1}"] = m / g - 1.0 if math.isfinite(m) else math.nan
        out[f"m{a + 1}_err"] = m_err / g
        out[f"c{a + 1}"] = c
        out[f"c{a + 1}_err"] = c_err
    out["n_per_image"] = float(sums[:, :, 4].mean()) if len(sums) else 0.0
    out["n_weighted_per_image"] = float(sums[:, :, 5].mean()) if len(sums) else 0.0
    return out


def detect_available() -> bool:
    try:
        from constellation_assets.shear.detect import detect_peaks  # noqa: F401
    except ImportError:
        return False
    return True


_PSF_CACHE: dict = {}


def _psf_cached():
    if not _PSF_CACHE:
        psf = make_psf()
        _PSF_CACHE["psf"], _PSF_CACHE["img"] = psf, psf_image(psf)
    return _PSF_CACHE["psf"], _PSF_CACHE["img"]


def realisation_sums(
    kind: str,
    seed: int,
    index: int,
    methods=METHODS,
    g: float = G_TRUE,
    size: int = 384,
    noise_pairs: bool = True,
    shear_about: str = "group",
    peak_rel_width: float = 0.0,
) -> dict:
    """Render realisation ``index`` and measure it by every method: per-image sums and timings."""
    psf, psf_img = _psf_cached()
    t0 = time.perf_counter()
    real = render_realisation(
        kind, seed, index, g=g, size=size, psf=psf, noise_pairs=noise_pairs, shear_about=shear_about
    )
    out = {"component": real.component, "n_galaxies": real.n_galaxies, "render_s": time.perf_counter() - t0}
    out["sums"], out["seconds"] = {}, {}
    for m in methods:
        t0 = time.perf_counter()
        out["sums"][m] = image_sums(m, real, psf_img, peak_rel_width=peak_rel_width)
        out["seconds"][m] = time.perf_counter() - t0
    return out


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def run(
    scenes=SCENES,
    methods=METHODS,
    n_real: dict[str, int] | None = None,
    seed: int = 0,
    size: int = 384,
    g: float = G_TRUE,
    noise_pairs: bool = True,
    shear_about: str = "group",
    workers: int = 1,
    progress=None,
    peak_rel_width: float = 0.0,
) -> dict:
    """All methods on the same realisations of each scene; returns the result table as a dict.

    ``workers > 1`` measures realisations in that many processes (same numbers: each realisation is
    seeded by its index).
    """
    from concurrent.futures import ProcessPoolExecutor

    n_real = n_real or DEFAULT_REALISATIONS
    n_img = 8 if noise_pairs else 4
    results: dict = {
        "config": {
            "seed": seed,
            "size_pix": size,
            "g": g,
            "noise_pairs": noise_pairs,
            "shear_about": shear_about,
            "peak_rel_width": peak_rel_width,
            "images_per_realisation": n_img,
            "n_realisations": {},
        },
        "rows": [],
        "render_seconds": {},
    }
    pool = ProcessPoolExecutor(workers, initializer=_worker_init) if workers > 1 else None
    try:
        for kind in scenes:
            nr = int(n_real[kind])
            results["config"]["n_realisations"][kind] = nr
            kw = dict(
                methods=methods,
                g=g,
                size=size,
                noise_pairs=noise_pairs,
                shear_about=shear_about,
                peak_rel_width=peak_rel_width,
            )
            if pool is None:
                outs = (realisation_sums(kind, seed, r, **kw) for r in range(nr))
            else:
                outs = pool.map(
                    realisation_sums, [kind] * nr, [seed] * nr, range(nr), *([v] * nr for v in kw.values())
                )
            sums = {m: np.zeros((nr, n_img, 6)) for m in methods}
            secs = dict.fromkeys(methods, 0.0)
            comps = np.zeros(nr, dtype=int)
            n_gal = np.zeros(nr)
            t_render = 0.0
            for r, o in enumerate(outs):
                comps[r], n_gal[r] = o["component"], o["n_galaxies"]
                t_render += o["render_s"]
                for m in methods:
                    sums[m][r] = o["sums"][m]
                    secs[m] += o["seconds"][m]
                if progress is not None:
                    progress(kind, r + 1, nr)
            signs = np.tile([1.0, -1.0, -1.0, 1.0], n_img // 4)
            for m in methods:
                row = {"method": m, "scene": kind, "n_realisations": nr, "seconds": secs[m]}
                row.update(bias_from_sums(sums[m], signs, comps, g))
                row["galaxies_per_scene"] = float(n_gal.mean())
                results["rows"].append(row)
            results["render_seconds"][kind] = t_render
    finally:
        if pool is not None:
            pool.shutdown()
    return results


#: Default realisations per scene (eight images each): sigma_m ~ 2e-3 for ``truth`` on ``isolated``, ~1e-2
#: (isolated) to ~4e-2 (pairs, field) for ``detect``.
DEFAULT_REALISATIONS = {"isolated": 100, "pairs": 100, "field": 100}


def format_table(results: dict) -> str:
    lines = [
        f"{'method':<36} {'scene':<9} {'m1':>17} {'m2':>17} {'c1':>17} {'c2':>17} {'N/img':>6} {'Nw/img':>6}"
    ]

    def pm(v, e, scale=1.0):
        return f"{v * scale:+8.4f}+-{e * scale:6.4f}" if math.isfinite(v) else f"{'n/a':>17}"

    for row in results["rows"]:
        lines.append(
            f"{METHOD_LABELS[row['method']]:<36} {row['scene']:<9} {pm(row['m1'], row['m1_err'])} "
            f"{pm(row['m2'], row['m2_err'])} {pm(row['c1'], row['c1_err'])} {pm(row['c2'], row['c2_err'])} "
            f"{row['n_per_image']:6.1f} {row['n_weighted_per_image']:6.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the realisations per scene")
    ap.add_argument(
        "--only", default=None, help=f"comma-separated scenes {SCENES} and/or methods {METHODS} to run"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=384, help="scene side in pixels (even)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--workers", type=int, default=1, help="processes (one core each)")
    ap.add_argument(
        "--same-noise-only",
        action="store_true",
        help="four images per realisation (+N only), not eight (+N and -N)",
    )
    ap.add_argument(
        "--shear-about",
        choices=("group", "image"),
        default="group",
        help="positions sheared about their friends-of-friends group centre (default) or the image centre",
    )
    ap.add_argument(
        "--peak-rel-width",
        type=float,
        default=0.0,
        help="detect_peaks(peak_rel_width=): the peak step's scale sqrt(sigma_v^2 + (kappa F)^2) (detect methods)",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    tokens = [t.strip() for t in args.only.split(",")] if args.only else []
    bad = [t for t in tokens if t not in SCENES + METHODS]
    if bad:
        ap.error(f"--only: unknown {bad}; choose from {SCENES + METHODS}")
    scenes = tuple(s for s in SCENES if s in tokens) or SCENES
    methods = tuple(m for m in METHODS if m in tokens) or METHODS
    if any(m.startswith("detect") for m in methods) and not detect_available():
        print("constellation_assets.shear.detect is not available: skipping method (a)", file=sys.stderr)
        methods = tuple(m for m in methods if not m.startswith("detect"))
    if args.size % 2 or args.size < 4 * STAMP:
        ap.error("--size must be even and >= 256")
    n_real = {k: max(2, int(round(v * args.scale))) for k, v in DEFAULT_REALISATIONS.items()}

    def progress(kind, done, total):
        if done == total or done % max(1, total // 5) == 0:
            print(f"  {kind}: {done}/{total} realisations", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    res = run(
        scenes,
        methods,
        n_real,
        seed=args.seed,
        size=args.size,
        noise_pairs=not args.same_noise_only,
        shear_about=args.shear_about,
        workers=args.workers,
        progress=progress,
        peak_rel_width=args.peak_rel_width,
    )
    res["seconds"] = time.perf_counter() - t0
    print(
        f'g = {G_TRUE}, scenes {args.size}x{args.size} px at {PIXEL_SCALE}", seed {args.seed}; '
        f"realisations ({res['config']['images_per_realisation']} images each): {res['config']['n_realisations']}"
        f"; peak_rel_width {args.peak_rel_width}"
    )
    print(format_table(res))
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in res["render_seconds"].items())
    per_method = {}
    for row in res["rows"]:
        per_method[row["method"]] = per_method.get(row["method"], 0.0) + row["seconds"]
    print(
        f"wall {res['seconds']:.0f}s; render {timing}; measure "
        + ", ".join(f"{k} {v:.0f}s" for k, v in per_method.items())
    )
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
