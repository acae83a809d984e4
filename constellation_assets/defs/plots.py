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


def subtile_whisker_png(
    grid: tuple[int, int],
    rows,
    cols,
    g1,
    g2,
    n_sources,
    title: str,
    g_ref: float = 0.05,
) -> bytes:
    """Shear of every sub-tile of one tile on its grid (as on the sky: north up, east left).

    One headless whisker per sub-tile at the cell centre, length |g| and angle atan2(g2, g1)/2, scaled so
    that the scale bar's |g| = ``g_ref`` spans 40% of a cell (``g_ref`` grows with large shears); cells without
    sources (or without a result) are hatched and labelled, so an empty or missing sub-tile is seen at once.
    Each measured cell shows its number of sources N.
    """
    import matplotlib.patches as mpatches

    n_rows, n_cols = int(grid[0]), int(grid[1])
    rows = np.asarray(rows, int)
    cols = np.asarray(cols, int)
    g1 = np.asarray(g1, float)
    g2 = np.asarray(g2, float)
    n_src = np.asarray(n_sources, int)
    mod = np.hypot(g1, g2)
    measured = mod[(n_src > 0) & np.isfinite(mod)]
    g_max = float(measured.max()) if measured.size else 0.0
    g_ref = max(g_ref, 0.5 * g_max) if g_max > 2 * g_ref else g_ref
    scale = 0.4 / g_ref  # cell units per unit |g|
    phi = 0.5 * np.arctan2(g2, g1)
    fig, ax = _figure(5.0, 5.4)
    seen = set()
    for r, c, m, p, n in zip(rows, cols, mod, phi, n_src, strict=True):
        if n <= 0 or not np.isfinite(m):
            continue  # an empty sub-tile: drawn as "no sources" below
        seen.add((int(r), int(c)))
        x, y = c + 0.5, r + 0.5
        dx, dy = -0.5 * m * scale * np.cos(p), 0.5 * m * scale * np.sin(p)
        ax.plot([x - dx, x + dx], [y - dy, y + dy], color="k", lw=2.2, solid_capstyle="round")
        ax.text(x, r + 0.1, f"N={n}", fontsize=6, color="0.35", ha="center")
    for r in range(n_rows):
        for c in range(n_cols):
            if (r, c) not in seen:
                ax.add_patch(mpatches.Rectangle((c, r), 1, 1, fill=False, hatch="//", color="0.7", lw=0))
                ax.text(c + 0.5, r + 0.5, "no sources", ha="center", va="center", fontsize=7, color="0.5")
    for k in range(n_cols + 1):
        ax.axvline(k, color="0.8", lw=0.8, zorder=0)
    for k in range(n_rows + 1):
        ax.axhline(k, color="0.8", lw=0.8, zorder=0)
    ax.set_xticks(np.arange(n_cols) + 0.5, [str(c) for c in range(n_cols)])
    ax.set_yticks(np.arange(n_rows) + 0.5, [str(r) for r in range(n_rows)])
    ax.set_xlabel("sub-tile column (RA increases to the left)")
    ax.set_ylabel("sub-tile row (Dec increases upward)")
    ax.set_aspect("equal")
    ax.set_xlim(n_cols, 0)  # col 0 is the west (low-RA) side: east to the left, as on the sky
    ax.set_ylim(0, n_rows)
    # Scale bar under the grid (axes coordinates): a whisker of |g| = g_ref.
    frac = g_ref * scale / n_cols
    ax.plot([0.0, frac], [-0.16, -0.16], color="k", lw=2.2, transform=ax.transAxes, clip_on=False)
    ax.text(
        frac + 0.02, -0.16, f"|g| = {g_ref:g}", va="center", ha="left", fontsize=8, transform=ax.transAxes
    )
    ax.set_title(title, fontsize=9)
    return figure_png(fig, dpi=90)
