"""Small matplotlib figures for materialization metadata (where a person would rather look than read)."""

from __future__ import annotations

import numpy as np

from constellation_assets.defs.metadata import figure_png


def _figure(w: float = 4.5, h: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def shear_whisker_png(ra_deg, dec_deg, g1, g2, title: str, max_points: int = 4000) -> bytes:
    """Headless whiskers of length |g| at angle atan2(g2, g1)/2 (spin-2), RA increasing to the left."""
    ra = np.asarray(ra_deg, float)
    dec = np.asarray(dec_deg, float)
    g1 = np.asarray(g1, float)
    g2 = np.asarray(g2, float)
    if ra.size > max_points:  # deterministic thinning: a figure, not a measurement
        idx = np.linspace(0, ra.size - 1, max_points).astype(int)
        ra, dec, g1, g2 = ra[idx], dec[idx], g1[idx], g2[idx]
    mod = np.hypot(g1, g2)
    phi = 0.5 * np.arctan2(g2, g1)
    fig, ax = _figure()
    scale = (
        0.02
        * max(np.ptp(ra) if ra.size else 1.0, 1e-3)
        / max(float(np.nanmax(mod)) if mod.size else 1.0, 1e-6)
    )
    ax.quiver(
        ra,
        dec,
        -mod * np.cos(phi) * scale,
        mod * np.sin(phi) * scale,
        headwidth=0,
        headlength=0,
        headaxislength=0,
        pivot="middle",
        angles="xy",
        scale_units="xy",
        scale=1,
        width=0.003,
    )
    ax.invert_xaxis()
    ax.set_xlabel("RA [deg]")
    ax.set_ylabel("Dec [deg]")
    ax.set_title(title)
    return figure_png(fig)


def psf_grid_png(grid_image, title: str, n_grid: int = 9) -> bytes:
    """A Q1 PSF-file image (n x n grid of PSF stamps) on a log stretch, with the grid drawn."""
    img = np.asarray(grid_image, float)
    fig, ax = _figure(4.5, 4.5)
    floor = max(float(np.nanmax(img)) * 1e-4, 1e-12)
    ax.imshow(np.log10(np.clip(img, floor, None)), origin="lower", cmap="viridis")
    step = img.shape[0] / n_grid
    for k in range(1, n_grid):
        ax.axhline(k * step - 0.5, color="w", lw=0.3)
        ax.axvline(k * step - 0.5, color="w", lw=0.3)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return figure_png(fig)


def mosaic_png(stamps, title: str, ncols: int = 6) -> bytes:
    """Grid of stamps (N, H, W), each scaled with an asinh stretch."""
    stamps = np.asarray(stamps, float)
    n = min(len(stamps), ncols * ncols)
    nrows = max(1, int(np.ceil(n / ncols)))
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 * ncols, 1.2 * nrows))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            s = stamps[i]
            scale = np.nanpercentile(np.abs(s), 99) or 1.0
            ax.imshow(np.arcsinh(s / (0.1 * scale)), origin="lower", cmap="magma")
    fig.suptitle(title)
    return figure_png(fig)
