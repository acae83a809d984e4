"""The fast per-sub-tile shear path gives the results of the straightforward formulas it replaced.

Each optimised piece is checked against a direct reference implementation written here: batched
per-stamp PSF deconvolution (vs the float64 per-stamp ``_prepare_psf``), window cut-outs (vs the flat
index gather ``cut_stamps``), the partition-based masked median (vs a sort), the support-only PSF
interpolation (vs the full bilinear formula), and the process-wide quadrant cache and read-ahead (same
stamps as a plain reader, invalidated when a file changes)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from constellation_assets.shear import fpfs
from constellation_assets.shear import stamps as st
from constellation_assets_tests import test_stamps_synth as syn

SIZE = 48


def _gauss_psf(n, size, rng):
    yy, xx = np.mgrid[0:size, 0:size] - size // 2
    sig = rng.uniform(0.8, 1.6, n)[:, None, None]
    e = rng.uniform(-0.1, 0.1, n)[:, None, None]
    img = np.exp(-0.5 * ((1 + e) * xx**2 + (1 - e) * yy**2) / sig**2)
    return (img * rng.uniform(0.5, 2.0, n)[:, None, None]).astype(np.float32)


def _reference_moments(images, psf, offsets, pixel_scale, sigma_arcsec, noise):
    """Moments and noise covariance straight from the formulas, float64, one stamp at a time."""
    n, ny, nx = images.shape
    w, mult, kx, ky = fpfs.fourier_weights(ny, nx, pixel_scale, sigma_arcsec, torch.device("cpu"))
    mom, cov = [], []
    for i in range(n):
        inv_f, inv_p2, _ = fpfs._prepare_psf(torch.from_numpy(psf[i : i + 1].astype(np.float64)), 1e-4)
        f = torch.fft.rfft2(torch.from_numpy(images[i].astype(np.float64))) * inv_f[0]
        ph = offsets[i, 0] * kx + offsets[i, 1] * ky
        f = f * torch.polar(torch.ones_like(ph), ph)
        mom.append((f.reshape(-1)[:, None] * w).real.sum(0))
        cov.append(fpfs._noise_covariance(inv_p2, w, mult, ny * nx, torch.tensor([noise[i] ** 2]))[0])
    return torch.stack(mom).numpy(), torch.stack(cov).numpy()


@pytest.mark.parametrize("precision,rtol", [("float64", 1e-10), ("float32", 2e-4)])
def test_per_stamp_psf_batches_match_reference(precision, rtol):
    rng = np.random.default_rng(11)
    n = 40
    psf = _gauss_psf(n, SIZE, rng)
    gal = _gauss_psf(n, SIZE, rng) * 50.0
    images = (gal + rng.normal(0, 0.05, gal.shape)).astype(np.float32)
    offsets = rng.uniform(-0.5, 0.5, (n, 2))
    noise = rng.uniform(0.02, 0.08, n)
    ref_m, ref_cov = _reference_moments(images, psf, offsets, 0.1, 0.35, noise)
    # Small batches (several per call), a bad PSF (NaN) and a non-positive one inside a batch.
    psf[5, 0, 0] = np.nan
    psf[6] = -psf[6]
    out = fpfs.measure_stamps(
        images, psf, 0.1, noise, offsets, batch_size=7, precision=precision, return_moments=True
    )
    ok = np.ones(n, bool)
    ok[[5, 6]] = False
    assert np.all(out["flags"][~ok] & fpfs.FLAG_BAD_PSF) and np.all(out["flags"][ok] == 0)
    assert out["m00"][5] == 0.0  # a non-finite PSF deconvolves nothing
    scale = np.abs(ref_m[ok, 0])[:, None]
    got = np.stack([out[k] for k in fpfs.MOMENT_NAMES], axis=1)
    np.testing.assert_allclose(got[ok] / scale, ref_m[ok] / scale, rtol=0, atol=rtol)
    sig = np.sqrt(ref_cov[ok, 0, 0])
    np.testing.assert_allclose(out["m00"][ok] / out["snr"][ok], sig, rtol=rtol)
    # Same as the whole call in float64 with one PSF batch (batching changes nothing).
    one = fpfs.measure_stamps(images, psf, 0.1, noise, offsets, batch_size=n, precision=precision)
    np.testing.assert_allclose(out["e1"], one["e1"], rtol=0, atol=10 * rtol * 1e-2)


def test_window_cutter_matches_flat_gather():
    rng = np.random.default_rng(3)
    for shape, size in (((90, 130), 16), ((10, 12), 16), ((16, 16), 16)):
        img = rng.random(shape).astype(">f4")  # FITS byte order: converted when cut out
        flg = rng.integers(0, 1 << 12, shape).astype(">i4")
        x = rng.uniform(-4, shape[1] + 3, 200)
        y = rng.uniform(-4, shape[0] + 3, 200)
        rows, cols, _ = st.stamp_grid(x, y, size)
        cutter = st._StampCutter(rows, cols, shape)
        got, inside = cutter.cut(img)
        ref, ref_inside = st.cut_stamps(img, rows, cols)
        assert got.dtype == np.float32 and got.dtype.isnative
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(inside, ref_inside)
        got_f, _ = cutter.cut(flg, dtype=None)
        assert got_f.dtype.isnative and got_f.dtype.kind == "i"
        np.testing.assert_array_equal(got_f, st.cut_stamps(flg, rows, cols, dtype=np.int64)[0])


def test_masked_median_matches_sorted_median():
    rng = np.random.default_rng(5)
    for m in (1, 2, 5, 64, 63):
        values = rng.random((30, m)).astype(np.float32)
        values[:, : m // 3] = values[:, :1]  # ties
        for frac in (0.0, 0.05, 0.5, 0.97, 1.0):
            masked = rng.random((30, m)) < frac
            got = st._masked_median(values, masked)
            ref = np.array(
                [
                    np.median(v[~k].astype(np.float64)) if (~k).any() else np.nan
                    for v, k in zip(values, masked, strict=True)
                ]
            )
            np.testing.assert_array_equal(got, ref)
    assert st._masked_median(np.zeros((0, 4), np.float32), np.zeros((0, 4), bool)).shape == (0,)


def test_psf_support_interpolation_is_the_full_bilinear_formula():
    img, keys = syn.psf_grid_image()
    img = img + np.random.default_rng(2).random(img.shape) * 1e-3  # different stamps at every node
    grid = st.PsfGrid.from_image(img, keys, (syn.NQ, syn.NQ))
    rng = np.random.default_rng(4)
    x = rng.uniform(-30, syn.NQ + 30, 50)
    y = rng.uniform(-30, syn.NQ + 30, 50)
    got = grid.at(x, y, SIZE)
    native = grid.native(SIZE)
    ix, tx = st._bilinear_index(x, grid.x_nodes)
    iy, ty = st._bilinear_index(y, grid.y_nodes)
    tx = tx.astype(np.float32)[:, None, None]
    ty = ty.astype(np.float32)[:, None, None]
    ref = (1 - ty) * (1 - tx) * native[iy, ix]
    ref += (1 - ty) * tx * native[iy, ix + 1]
    ref += ty * (1 - tx) * native[iy + 1, ix]
    ref += ty * tx * native[iy + 1, ix + 1]
    np.testing.assert_array_equal(got, ref)


def test_quadrant_cache_and_readahead_give_the_plain_reader_stamps(tmp_path, monkeypatch):
    h = syn.wcs_header(pa_deg=20.0)
    ra, dec, _, _ = syn.galaxy_positions(12, h, seed=9, margin=10)
    gals = [(r, d, 30000.0, 0.2, 0.1, -0.05) for r, d in zip(ra, dec, strict=True)]
    entries = []
    for dither in range(3):
        arrays = syn.render_quadrant(h, gals, noise_sigma=2.0, seed=dither)
        entries.append(syn.write_exposure(tmp_path / "vis" / str(dither), 1, dither, arrays))
    manifest = {"quadrants": entries}
    sources = st.SourceList(np.arange(len(ra), dtype=np.int64), np.asarray(ra), np.asarray(dec))
    cache = st.QuadrantCache(512 * 2**20)
    monkeypatch.setattr(st, "QUADRANT_CACHE", cache)
    plain = list(
        st.iter_manifest_stamps(manifest, sources, SIZE, reader=lambda e, o: st.read_quadrant_images(e))
    )
    first = list(st.iter_manifest_stamps(manifest, sources, SIZE))
    assert cache.misses == 3 and cache.hits == 0
    again = list(st.iter_manifest_stamps(manifest, sources, SIZE))
    assert cache.hits == 3
    for a, b, c in zip(plain, first, again, strict=True):
        for name in ("source_index", "images", "psf", "noise_sigma", "offsets_pix", "jacobian", "reject"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
            np.testing.assert_array_equal(getattr(a, name), getattr(c, name))
    # A rewritten file is read again (key includes size and mtime).
    path = entries[0]["sci_path"]
    st_ = os.stat(path)
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000))
    list(st.iter_manifest_stamps(manifest, sources, SIZE))
    assert cache.misses == 4
    # A budget of 0 disables caching; a read error still reaches the caller.
    monkeypatch.setattr(st, "QUADRANT_CACHE", st.QuadrantCache(0))
    assert len(list(st.iter_manifest_stamps(manifest, sources, SIZE))) == 3
    bad = {"quadrants": [dict(entries[0], sci_path=str(tmp_path / "missing.fits"))]}
    with pytest.raises(Exception, match="missing.fits"):
        list(st.iter_manifest_stamps(bad, sources, SIZE))


def test_quadrant_cache_evicts_least_recently_used():
    def quad(nbytes):
        return st.QuadrantImages(
            "k", "e", np.zeros(nbytes // 4, np.float32), None, None, None, None, {},
            st.PsfGrid(np.zeros((1, 1, 1, 1)), np.zeros(1), np.zeros(1)),
        )  # fmt: skip

    cache = st.QuadrantCache(1000)
    a, b, c = quad(400), quad(400), quad(400)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recently used
    cache.put("c", c)  # evicts b
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    cache.put("big", quad(4000))  # larger than the budget: not kept
    assert cache.get("big") is None
