"""The detection benchmark's scenes and its truth-catalog method (benchmarks/bench_detection.py; the full
table, with detect_peaks and the catalog detection, is the benchmark's)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("galsim")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_detection
    finally:
        sys.path.pop(0)
    return bench_detection


def test_plus_and_minus_scenes_differ_only_by_the_shear(bench):
    """At g = 0 the +g and -g images are identical (same galaxies, fluxes, noise), the -N images carry the
    negated noise, and the rotated images are the pixel rotations of the unrotated ones."""
    real = bench.render_realisation("pairs", 3, 1, g=0.0, size=256)
    im = real.images
    assert im.shape == (8, 256, 256)
    np.testing.assert_array_equal(im[0], im[1])
    np.testing.assert_array_equal(im[2], im[3])
    np.testing.assert_array_equal(im[4], im[5])
    clean = 0.5 * (im[0] + im[4])
    assert clean.max() > 1.0  # the galaxies are there
    noise = 0.5 * (im[0] - im[4])
    assert abs(noise.std() - bench.NOISE_SIGMA) < 0.02
    np.testing.assert_array_equal(real.truth_pos[0], real.truth_pos[1])
    # With shear the noise is still shared: +g minus -g is noiseless and the same for +N and -N.
    sheared = bench.render_realisation("pairs", 3, 1, g=0.02, size=256)
    diff = sheared.images[0] - sheared.images[1]
    np.testing.assert_allclose(diff, sheared.images[4] - sheared.images[5], atol=1e-12)
    assert 0 < np.abs(diff).max() < 0.5 * clean.max()
    # Deterministic from the seed.
    again = bench.render_realisation("pairs", 3, 1, g=0.02, size=256)
    np.testing.assert_array_equal(again.images, sheared.images)


def test_rotated_scene_is_the_pixel_rotation(bench):
    """The rotated scene sheared by +g (profiles rotated, positions rotated, then sheared) drawn directly
    equals the 90-degree pixel rotation of the unrotated scene sheared by -g, which the benchmark uses."""
    from constellation_assets.shear.calibration import rot90_about_centre

    gals = bench.scene_galaxies("field", 5, 0, size=256)
    assert len(gals) > 5
    minus, pos_m, flux = bench.draw_scene(gals, -0.02, 0.01, size=256)
    direct, pos_r, _ = bench.draw_scene(gals, 0.02, -0.01, size=256, rot90=True, fluxes=flux)
    # Row 0 of the pixel rotation is the wrapped opposite edge (cyclic about pixel (128, 128)).
    np.testing.assert_allclose(direct[1:], rot90_about_centre(minus)[1:], atol=1e-6 * direct.max())
    np.testing.assert_allclose(pos_r, np.stack([pos_m[:, 1], 256 - pos_m[:, 0]], axis=1), atol=1e-9)


def test_truth_catalog_on_isolated_galaxies_is_unbiased(bench):
    """Method (b) (stamps at the true sheared positions) on a few isolated realisations: m is consistent
    with 0 (a wrong shear convention gives m ~ -2 or a flipped sign) and c is 0 to float32 rounding (the
    estimator commutes with 90-degree pixel rotations)."""
    n = 16
    comps, sums = [], []
    _, psf_img = bench._psf_cached()
    for r in range(n):
        real = bench.render_realisation("isolated", 11, r, size=256)
        comps.append(real.component)
        sums.append(bench.image_sums("truth", real, psf_img))
        assert real.truth_keep.sum() == real.n_galaxies == 16
    res = bench.bias_from_sums(np.array(sums), real.signs, np.array(comps), bench.G_TRUE)
    for a in ("1", "2"):
        assert 0 < res[f"m{a}_err"] < 0.03
        assert abs(res[f"m{a}"]) < max(4.0 * res[f"m{a}_err"], 0.02)
        assert abs(res[f"c{a}"]) < 1e-6
    assert res["n_per_image"] == 16
