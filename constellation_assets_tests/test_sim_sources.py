"""Sersic profiles (b_n, normalisation, GalSim's conventions) and the deterministic COSMOS template choice."""

from __future__ import annotations

import hashlib

import galsim
import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import gammainc

from constellation_assets.sim.sources import (
    SourceComponents,
    choose_cosmos_index,
    flux_from_mag,
    mag_from_flux,
    sersic_b,
    sersic_sb,
    sersic_sb_torch,
)


def test_choose_cosmos_index_is_the_seed_formula():
    def seed(task_id, n, salt=""):
        return int(hashlib.sha256((task_id + salt).encode("utf-8")).hexdigest()[:16], 16) % n

    for tid in ["t0", "train_000123_host_42", "ü-unicode", ""]:
        for n in (1, 7, 20000):
            for salt in ("", "gen5_v1"):
                assert choose_cosmos_index(tid, n, salt) == seed(tid, n, salt)
    # a pinned value, so that a change of the formula cannot go unnoticed
    assert choose_cosmos_index(task_id="task-000001", n_sources=20000, salt="gen5_v1") == 2081
    assert int(hashlib.sha256(b"abc").hexdigest()[:16], 16) % 1000 == choose_cosmos_index("ab", 1000, "c")
    picks = [choose_cosmos_index(f"task-{i}", 10, "s") for i in range(2000)]
    assert set(picks) == set(range(10))
    assert picks != [choose_cosmos_index(f"task-{i}", 10, "other") for i in range(2000)]
    with pytest.raises(ValueError, match="n_sources"):
        choose_cosmos_index("t", 0)


@pytest.mark.parametrize("n", [0.3, 0.5, 1.0, 2.5, 4.0, 6.0])
def test_sersic_b_is_exact(n):
    b = sersic_b(n)
    assert gammainc(2 * n, b) == pytest.approx(0.5, abs=1e-12)


def test_known_b_values():
    assert sersic_b(1.0) == pytest.approx(1.678346990, rel=1e-8)
    assert sersic_b(4.0) == pytest.approx(7.669249443, rel=1e-8)


@pytest.mark.parametrize(
    ("n", "hlr", "q", "phi"), [(1.0, 0.4, 0.6, 0.3), (4.0, 0.3, 0.8, -1.0), (0.5, 0.2, 0.5, 2.0)]
)
def test_sersic_matches_galsim_xvalue(n, hlr, q, phi):
    gal = galsim.Sersic(n, half_light_radius=hlr, flux=3.0).shear(q=q, beta=phi * galsim.radians)
    rng = np.random.default_rng(1)
    for x, y in rng.uniform(-1.0, 1.0, (20, 2)):
        ours = sersic_sb(x, y, flux=3.0, hlr_arcsec=hlr, n=n, q=q, phi_rad=phi)
        assert ours == pytest.approx(gal.xValue(x, y), rel=2e-5)
    comps = SourceComponents.sersic(hlr, n, q, phi, [[0.0, 0.0]])
    pts = torch.tensor(rng.uniform(-1.0, 1.0, (1, 30)), dtype=torch.float64)
    pts_y = torch.tensor(rng.uniform(-1.0, 1.0, (1, 30)), dtype=torch.float64)
    t = sersic_sb_torch(pts, pts_y, comps)[0].numpy()
    ref = sersic_sb(pts.numpy()[0], pts_y.numpy()[0], flux=1.0, hlr_arcsec=hlr, n=n, q=q, phi_rad=phi)
    np.testing.assert_allclose(t, ref, rtol=1e-10)


@pytest.mark.parametrize("n", [0.5, 1.0, 4.0])
def test_sersic_integrates_to_flux_and_half_within_hlr(n):
    hlr, flux = 0.3, 2.0

    def ring(r):
        return 2 * np.pi * r * sersic_sb(r, 0.0, flux=flux, hlr_arcsec=hlr, n=n)

    total, _ = integrate.quad(ring, 0, np.inf, limit=400)
    half, _ = integrate.quad(ring, 0, hlr, limit=400)
    assert total == pytest.approx(flux, rel=1e-6)
    assert half == pytest.approx(flux / 2, rel=1e-6)


def test_flux_magnitude_round_trip():
    assert flux_from_mag(25.0, 25.0) == pytest.approx(1.0)
    assert flux_from_mag(20.0, 25.0) == pytest.approx(100.0)
    assert mag_from_flux(flux_from_mag(22.3, 30.1), 30.1) == pytest.approx(22.3)


def test_components_validate_their_inputs():
    with pytest.raises(ValueError, match="axis ratios"):
        SourceComponents.sersic(0.3, 1.0, 1.3, 0.0, [[0, 0]])
    with pytest.raises(ValueError, match="half-light"):
        SourceComponents.sersic(-0.3, 1.0, 0.5, 0.0, [[0, 0]])
    with pytest.raises(ValueError, match="Sersic indices"):
        SourceComponents.sersic(0.3, 9.0, 0.5, 0.0, [[0, 0]])
    c = SourceComponents.sersic([0.2, 0.3, 0.4], 1.0, 0.5, 0.0, np.zeros((3, 2)))
    assert c.batch_size == 3 and c.flux_frac.shape == (3, 1)
