"""Internals of the fast renderer path: the per-chunk source / lens tensors against the reference
functions, the folded (binned) FFT convolution against a direct one, and bytes independent of the number
of threads."""

from __future__ import annotations

import numpy as np
import torch

from constellation_assets.sim import render as R
from constellation_assets.sim.lensing import shear_deflection_torch, sie_deflection_torch
from constellation_assets.sim.psf import PSFSpec
from constellation_assets.sim.sources import SourceComponents, sersic_sb_torch


def _sources():
    return SourceComponents(
        flux_frac=[[1.0, 0.0], [0.4, 0.6], [0.7, 0.3]],
        hlr_arcsec=[[0.3, 1.0], [0.1, 0.5], [0.02, 0.8]],
        n=[[1.0, 1.0], [4.0, 1.0], [0.6, 2.5]],
        q=[[0.6, 1.0], [0.8, 0.4], [1.0, 0.7]],
        phi_rad=[[0.3, 0.0], [2.0, -0.7], [0.0, 1.1]],
        center_arcsec=[[0.1, -0.2], [0.0, 0.0], [-0.3, 0.25]],
    )


def test_source_params_match_sersic_sb_torch():
    comps = _sources()
    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.uniform(-1.5, 1.5, (3, 500)))
    y = torch.as_tensor(rng.uniform(-1.5, 1.5, (3, 500)))
    x[:, 0], y[:, 0] = torch.as_tensor(comps.center_arcsec[:, 0]), torch.as_tensor(comps.center_arcsec[:, 1])
    ref, ref_rho = sersic_sb_torch(x, y, comps, core_compact_arcsec=0.05, core_min_n=R._CORE_MIN_N)
    sp = R._SourceParams(comps, torch.float64, "cpu", 0.05)
    sb, rho = sp.surface_brightness(x, y, want_rho=True)
    np.testing.assert_allclose(sb.numpy(), ref.numpy(), rtol=1e-10)
    np.testing.assert_allclose(rho.numpy(), ref_rho.numpy(), rtol=1e-10)
    # per-row subsets (the refined cells) gather the same parameters
    rows = torch.tensor([2, 0, 2])
    sub, _ = sp.take(rows).surface_brightness(x[rows], y[rows], want_rho=False)
    np.testing.assert_allclose(sub.numpy(), ref[rows].numpy(), rtol=1e-10)


def test_lens_tensors_match_lensing_functions():
    lens = R.LensParams([1.2, 0.0, 0.9], [0.6, 0.8, 0.9999995], [0.3, 1.0, -0.4], [0.05, 0.0, -0.1],
                        [-0.02, 0.0, 0.03], [0.02, 0.01, -0.03], [-0.01, 0.0, 0.04])  # fmt: skip
    rng = np.random.default_rng(4)
    x = torch.as_tensor(rng.uniform(-2, 2, (3, 400)))
    y = torch.as_tensor(rng.uniform(-2, 2, (3, 400)))
    centre = torch.as_tensor(np.stack([lens.center_x_arcsec, lens.center_y_arcsec], 1))
    ax, ay = sie_deflection_torch(x[:, None], y[:, None], lens.theta_e_arcsec, lens.q, lens.phi_rad, centre)
    has = torch.as_tensor(lens.theta_e_arcsec > 0)[:, None, None]
    ax, ay = torch.where(has, ax, 0.0)[:, 0], torch.where(has, ay, 0.0)[:, 0]
    sx, sy = shear_deflection_torch(x[:, None], y[:, None], lens.gamma1, lens.gamma2, centre)
    bx, by = R._LensTensors(lens, torch.float64, "cpu").shoot(x, y, 2)
    np.testing.assert_allclose(bx.numpy(), (x - ax - sx[:, 0]).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(by.numpy(), (y - ay - sy[:, 0]).numpy(), rtol=1e-12, atol=1e-12)


def test_folded_convolution_equals_fine_convolution_then_binning():
    rng = np.random.default_rng(5)
    f, rows, cols, k = 4, 40, 48, 21
    img = torch.as_tensor(rng.uniform(0, 1, (2, rows, cols)))
    kern = torch.as_tensor(rng.uniform(0, 1, (3, k, k)))
    keep = (2, 8, 1, 11)  # binned rows 2..7, columns 1..10
    n_fft = (
        R._conv_fft_len(rows, k, keep[0] * f, keep[1] * f, f),
        R._conv_fft_len(cols, k, keep[2] * f, keep[3] * f, f),
    )
    out = R._convolve_binned(img, R._kernel_spectra(kern, n_fft, f), n_fft, f, keep)
    # direct linear convolution on the fine grid, then f x f sums
    full = np.zeros((2, 3, rows, cols))
    c = k // 2
    pad = np.pad(img.numpy(), ((0, 0), (c, c), (c, c)))
    for b in range(3):
        for i in range(k):
            for j in range(k):
                full[:, b] += (
                    kern[b, i, j].item() * pad[:, 2 * c - i : 2 * c - i + rows, 2 * c - j : 2 * c - j + cols]
                )
    binned = full.reshape(2, 3, rows // f, f, cols // f, f).sum(axis=(3, 5))
    np.testing.assert_allclose(
        out.numpy(), binned[:, :, keep[0] : keep[1], keep[2] : keep[3]], rtol=1e-9, atol=1e-9
    )


def test_bytes_do_not_depend_on_threads_and_chunking_only_rounds():
    n = 6
    rng = np.random.default_rng(6)
    src = SourceComponents.sersic(rng.uniform(0.1, 0.4, n), rng.uniform(0.7, 4, n), rng.uniform(0.5, 1, n),
                                  rng.uniform(0, 3, n), rng.uniform(-0.5, 0.5, (n, 2)))  # fmt: skip
    lens = R.LensParams(rng.uniform(0.8, 1.5, n), rng.uniform(0.5, 1, n), rng.uniform(0, 3, n), np.zeros(n),
                        np.zeros(n), np.full(n, 0.02), np.full(n, -0.01))  # fmt: skip
    kw = dict(stamp_size_pix=32, pixel_scale_arcsec=0.2, psf=[PSFSpec("moffat", 0.8, 3.5)] * 2, lens=lens)
    flux = np.ones((n, 2))
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = R.render_stamps(src, flux, batch_size=64, **kw)
        b = R.render_stamps(src, flux, batch_size=64, **kw)
        torch.set_num_threads(1)
        c = R.render_stamps(src, flux, batch_size=64, **kw)
        d = R.render_stamps(src, flux, batch_size=1, **kw)
    finally:
        torch.set_num_threads(prev)
    assert torch.get_num_threads() == prev
    for other in (b, c):
        assert a.images_adu.numpy().tobytes() == other.images_adu.numpy().tobytes()
        assert a.magnification.numpy().tobytes() == other.magnification.numpy().tobytes()
    # other chunks batch the FFTs differently: float32 rounding only
    peak = a.images_adu.abs().max().item()
    np.testing.assert_allclose(d.images_adu.numpy(), a.images_adu.numpy(), rtol=0, atol=1e-6 * peak)
