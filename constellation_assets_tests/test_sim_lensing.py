"""SIE + external shear deflections against lenstronomy and the analytic SIS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from constellation_assets.sim.lensing import (
    ellipticity_to_phi_q,
    phi_q_to_ellipticity,
    shear_deflection,
    shear_deflection_torch,
    sie_deflection,
    sie_deflection_torch,
    sis_magnification,
)

lenstronomy = pytest.importorskip("lenstronomy")
from lenstronomy.LensModel.lens_model import LensModel  # noqa: E402
from lenstronomy.Util import param_util  # noqa: E402

RNG = np.random.default_rng(20260202)
X = RNG.uniform(-3.0, 3.0, 1500)
Y = RNG.uniform(-3.0, 3.0, 1500)


def _rel_err(ax, ay, bx, by):
    return np.max(np.hypot(ax - bx, ay - by) / np.hypot(bx, by))


@pytest.mark.parametrize("q", [0.3, 0.45, 0.6, 0.8, 0.95, 0.999, 0.99999, 1.0])
@pytest.mark.parametrize("phi", [0.0, 0.7, -1.2])
def test_sie_matches_lenstronomy(q, phi):
    e1, e2 = param_util.phi_q2_ellipticity(phi, q)
    kw = {"theta_E": 1.3, "e1": e1, "e2": e2, "center_x": 0.15, "center_y": -0.25}
    bx, by = LensModel(["SIE"]).alpha(X, Y, [kw])
    ax, ay = sie_deflection(X, Y, theta_e_arcsec=1.3, q=q, phi_rad=phi, center_arcsec=(0.15, -0.25))
    assert _rel_err(ax, ay, bx, by) < 1e-3
    # the (e1, e2) form of the same lens
    ax2, ay2 = sie_deflection(X, Y, theta_e_arcsec=1.3, e1=e1, e2=e2, center_arcsec=(0.15, -0.25))
    assert _rel_err(ax2, ay2, bx, by) < 1e-3


def test_sis_limit_is_analytic():
    r = np.hypot(X, Y)
    for q in (1.0, 1 - 1e-9, 1 - 1e-6):
        ax, ay = sie_deflection(X, Y, theta_e_arcsec=1.1, q=q, phi_rad=0.4)
        # |alpha - alpha_SIS| / |alpha_SIS| is O(1 - q)
        assert _rel_err(ax, ay, 1.1 * X / r, 1.1 * Y / r) < max(1e-9, 3 * (1 - q))
    # finite at the centre
    ax, ay = sie_deflection(0.0, 0.0, q=0.5)
    assert np.isfinite(ax) and np.isfinite(ay)


def test_ellipticity_conversion_matches_lenstronomy():
    for e1, e2 in [(0.1, -0.2), (0.0, 0.0), (-0.3, 0.05), (0.7, 0.7)]:
        np.testing.assert_allclose(ellipticity_to_phi_q(e1, e2), param_util.ellipticity2phi_q(e1, e2))
    for phi, q in [(0.3, 0.6), (-1.0, 0.9)]:
        np.testing.assert_allclose(phi_q_to_ellipticity(phi, q), param_util.phi_q2_ellipticity(phi, q))
        np.testing.assert_allclose(ellipticity_to_phi_q(*phi_q_to_ellipticity(phi, q)), (phi, q))


def test_shear_matches_lenstronomy():
    bx, by = LensModel(["SHEAR"]).alpha(X, Y, [{"gamma1": 0.05, "gamma2": -0.03, "ra_0": 0.2, "dec_0": 0.1}])
    ax, ay = shear_deflection(X, Y, 0.05, -0.03, center_arcsec=(0.2, 0.1))
    np.testing.assert_allclose(ax, bx, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ay, by, rtol=1e-12, atol=1e-14)


def test_torch_batched_matches_numpy_per_stamp():
    yy, xx = torch.meshgrid(
        torch.linspace(-2, 2, 17, dtype=torch.float64),
        torch.linspace(-2, 2, 19, dtype=torch.float64),
        indexing="ij",
    )
    theta = np.array([0.8, 1.2, 1.6])
    q = np.array([0.35, 0.7, 1.0])
    phi = np.array([0.1, -0.5, 1.0])
    centre = np.array([[0.0, 0.0], [0.1, -0.2], [-0.3, 0.05]])
    ax, ay = sie_deflection_torch(
        xx, yy, torch.tensor(theta), torch.tensor(q), torch.tensor(phi), torch.tensor(centre)
    )
    sx, sy = shear_deflection_torch(
        xx, yy, torch.tensor([0.01, 0.0, -0.04]), torch.tensor([0.02, 0.05, 0.0]), torch.tensor(centre)
    )
    assert ax.shape == (3, 17, 19)
    for b in range(3):
        ex, ey = sie_deflection(xx.numpy(), yy.numpy(), theta[b], q[b], phi[b], tuple(centre[b]))
        np.testing.assert_allclose(ax[b].numpy(), ex, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ay[b].numpy(), ey, rtol=1e-10, atol=1e-12)
        g1, g2 = [0.01, 0.0, -0.04][b], [0.02, 0.05, 0.0][b]
        fx, fy = shear_deflection(xx.numpy(), yy.numpy(), g1, g2, tuple(centre[b]))
        np.testing.assert_allclose(sx[b].numpy(), fx, atol=1e-12)
        np.testing.assert_allclose(sy[b].numpy(), fy, atol=1e-12)
    # float32 batch agrees with lenstronomy to 1e-3 too (the renderer's default precision)
    ax32, ay32 = sie_deflection(
        torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32), 1.3, 0.3, 0.7
    )
    e1, e2 = param_util.phi_q2_ellipticity(0.7, 0.3)
    bx, by = LensModel(["SIE"]).alpha(X, Y, [{"theta_E": 1.3, "e1": e1, "e2": e2}])
    assert _rel_err(ax32.numpy(), ay32.numpy(), bx, by) < 1e-3


def test_bad_axis_ratio_is_rejected():
    with pytest.raises(ValueError, match="axis ratio"):
        sie_deflection(X, Y, q=1.5)
    with pytest.raises(ValueError, match="axis ratio"):
        sie_deflection_torch(torch.zeros(2, 2), torch.zeros(2, 2), q=torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="both e1 and e2"):
        sie_deflection(X, Y, e1=0.1)


def test_sis_magnification_formula():
    assert sis_magnification(0.3, 1.2) == pytest.approx(8.0)
    assert sis_magnification(2.4, 1.2) == pytest.approx(1.5)
