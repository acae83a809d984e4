"""Ensemble shear from a per-source catalog: g = sum(w e) / sum(w R), jackknife errors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def jackknife_blocks(n: int, n_blocks: int) -> np.ndarray:
    """Block label (0..n_blocks-1) of each of ``n`` items: contiguous, near-equal blocks."""
    n_blocks = max(1, min(int(n_blocks), n))
    return (np.arange(n) * n_blocks) // max(n, 1)


def ratio_jackknife(num: np.ndarray, den: np.ndarray, n_blocks: int = 100) -> tuple[float, float]:
    """``sum(num) / sum(den)`` and its delete-one-block jackknife error over contiguous blocks of items.

    NaNs when there is nothing to divide (no items or ``sum(den) == 0``); the error is NaN for one item.
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    if len(num) == 0 or den.sum() == 0:
        return math.nan, math.nan
    est = float(num.sum() / den.sum())
    if len(num) < 2:
        return est, math.nan
    labels = jackknife_blocks(len(num), n_blocks)
    nb = int(labels.max()) + 1
    num_b = np.bincount(labels, weights=num, minlength=nb)
    den_b = np.bincount(labels, weights=den, minlength=nb)
    deleted = (num.sum() - num_b) / (den.sum() - den_b)
    return est, math.sqrt((nb - 1) / nb * ((deleted - deleted.mean()) ** 2).sum())


#: A sub-tile's ensemble shear needs at least this many measured sources: with one source the jackknife
#: error is undefined, so the shear is reported as NaN (unmeasured) rather than with a NaN error.
MIN_SOURCES_FOR_SHEAR = 2


def ensemble_shear(cat: Mapping[str, Any], n_blocks: int = 100) -> tuple[float, float, float, float]:
    """Ensemble shear ``(g1, g2, g1_err, g2_err)`` of a catalog from :func:`measure_stamps`.

    ``g1 = sum(weight * e1) / sum(weight * r11)`` (same for g2).  Errors: delete-one-block jackknife
    over ``n_blocks`` contiguous blocks of sources (ratio estimator, so the response noise is
    included).  Returns NaNs when the total weighted response is not positive.
    """
    w = np.asarray(cat["weight"], dtype=np.float64)
    out = []
    for comp in ("1", "2"):
        e = np.asarray(cat[f"e{comp}"], dtype=np.float64) * w
        r = np.asarray(cat[f"r{comp}{comp}"], dtype=np.float64) * w
        good = np.isfinite(e) & np.isfinite(r) & (w > 0)
        e, r = e[good], r[good]
        if len(e) == 0 or r.sum() <= 0:
            out.append((math.nan, math.nan))
            continue
        out.append(ratio_jackknife(e, r, n_blocks))
    return out[0][0], out[1][0], out[0][1], out[1][1]
