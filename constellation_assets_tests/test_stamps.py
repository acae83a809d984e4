"""Stamps from a small FITS quadrant written here: positions/offsets, PSF grid interpolation, masking,
flux units, sky-frame shapes under rotated/flipped WCS, multi-exposure combination."""

from __future__ import annotations

import numpy as np
import pytest

from constellation_assets import euclid
from constellation_assets.shear import stamps as st
from constellation_assets_tests import test_stamps_synth as syn

SIZE = 48


def _quad(tmp_path, header, gals, obs=1, dither=0, **kw):
    arrays = syn.render_quadrant(header, gals, **kw)
    entry = syn.write_exposure(tmp_path / "vis" / str(obs), obs, dither, arrays)
    return entry, arrays


def _sources(ra, dec):
    return st.SourceList(np.arange(len(ra), dtype=np.int64), np.asarray(ra), np.asarray(dec))


def test_psf_grid_native_sampling_and_bilinear(tmp_path):
    import galsim

    img, keys = syn.psf_grid_image()
    grid = st.PsfGrid.from_image(img, keys, (syn.NQ, syn.NQ))
    assert grid.stamps.shape == (9, 9, 21, 21)
    np.testing.assert_allclose(grid.x_nodes, (np.arange(9) + 0.5) * syn.NQ / 9 - 0.5)
    native = grid.native(SIZE)
    assert native.shape == (9, 9, SIZE, SIZE)
    # The sampled effective PSF equals the PSF drawn directly at the detector scale (same support).
    x, y = grid.x_nodes[4], grid.y_nodes[2]
    eff = galsim.Convolve(syn.psf_profile(syn.psf_fwhm_at(x, y)), galsim.Pixel(syn.PIX))
    direct = eff.drawImage(nx=7, ny=7, scale=syn.PIX, method="no_pixel").array
    c = SIZE // 2
    got = native[2, 4, c - 3 : c + 4, c - 3 : c + 4]
    np.testing.assert_allclose(got / got.sum(), direct / direct.sum(), atol=5e-5)  # GalSim FFT accuracy
    assert np.unravel_index(np.argmax(native[2, 4]), (SIZE, SIZE)) == (c, c)
    # At a node: exactly that node; halfway between 4 nodes: their mean.
    at_node = grid.at(np.array([x]), np.array([y]), SIZE)[0]
    np.testing.assert_allclose(at_node, native[2, 4], atol=1e-7)
    xm = 0.5 * (grid.x_nodes[4] + grid.x_nodes[5])
    ym = 0.5 * (grid.y_nodes[2] + grid.y_nodes[3])
    mid = grid.at(np.array([xm]), np.array([ym]), SIZE)[0]
    expect = 0.25 * (native[2, 4] + native[2, 5] + native[3, 4] + native[3, 5])
    np.testing.assert_allclose(mid, expect, atol=1e-7)
    assert abs(mid.sum() - 1) < 1e-5
    # Beyond the outermost nodes the PSF is clamped to the border node.
    edge = grid.at(np.array([-5.0]), np.array([y]), SIZE)[0]
    np.testing.assert_allclose(edge, native[2, 0], atol=1e-7)
    # Not-included pixel response: block sums of OVERSAMP^2 fine pixels (still unit sum, centred).
    keys2 = dict(keys, PSFPIXEL="NOT INCLUDED")
    blk = st.PsfGrid.from_image(img, keys2, (syn.NQ, syn.NQ)).native(SIZE)
    assert abs(blk[0, 0].sum() - 1) < 1e-5 and np.argmax(blk[0, 0]) == c * SIZE + c


def test_cut_stamps_positions_offsets_flux(tmp_path):
    from astropy.wcs import WCS

    h = syn.wcs_header(pa_deg=0.0)
    ra, dec, x, y = syn.galaxy_positions(6, h, seed=5, margin=25)
    flux_adu = 20000.0
    gals = [(r, d, flux_adu, 0.15, 0.0, 0.0) for r, d in zip(ra, dec, strict=True)]
    entry, _ = _quad(tmp_path, h, gals)
    quad = st.read_quadrant_images(entry)
    assert quad.sci.shape == (syn.NQ, syn.NQ) and quad.rms is not None and quad.bkg is not None
    s = st.quadrant_stamps(quad, _sources(ra, dec), SIZE)
    assert len(s) == 6 and s.images.shape == (6, SIZE, SIZE) and s.images.dtype == np.float32
    xw, yw = WCS(quad.header).all_world2pix(ra, dec, 0)
    np.testing.assert_allclose(s.x_pix, xw, atol=1e-6)
    np.testing.assert_allclose(s.offsets_pix[:, 0], xw - np.round(xw), atol=1e-6)
    np.testing.assert_allclose(s.offsets_pix[:, 1], yw - np.round(yw), atol=1e-6)
    assert np.all(np.abs(s.offsets_pix) <= 0.5)
    # Centroid of the background-subtracted stamp sits at (W//2 + dx, H//2 + dy).
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    tot = s.images.sum(axis=(1, 2))
    cx = (s.images * xx).sum(axis=(1, 2)) / tot
    cy = (s.images * yy).sum(axis=(1, 2)) / tot
    np.testing.assert_allclose(cx, SIZE // 2 + s.offsets_pix[:, 0], atol=0.01)
    np.testing.assert_allclose(cy, SIZE // 2 + s.offsets_pix[:, 1], atol=0.01)
    # Background subtracted and ADU -> microJansky: flux = ADU * 10**(-0.4 (ZP - 23.9)) / EXPTIME.
    ujy = flux_adu * 10 ** (-0.4 * (24.57 - 23.9)) / 560.52
    np.testing.assert_allclose(tot, ujy, rtol=2e-3)
    assert np.all(s.reject == 0) and np.all(s.masked_fraction == 0)
    # PSF interpolated at each source position, centred.
    assert np.all(np.argmax(s.psf.reshape(6, -1), axis=1) == (SIZE // 2) * SIZE + SIZE // 2)
    np.testing.assert_allclose(s.psf.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_flag_masking_fill_and_centre_rejection(tmp_path):
    h = syn.wcs_header()
    ra, dec, x, y = syn.galaxy_positions(3, h, seed=7, margin=40)
    gals = [(r, d, 50000.0, 0.2, 0.0, 0.0) for r, d in zip(ra, dec, strict=True)]
    sci, rms, flg, bkg, hh = syn.render_quadrant(h, gals)
    clean = st.quadrant_stamps(
        st.QuadrantImages(
            "k",
            "e",
            sci,
            bkg,
            rms,
            None,
            flg,
            hh,
            st.PsfGrid.from_image(*syn.psf_grid_image(), (syn.NQ, syn.NQ)),
        ),
        _sources(ra, dec),
        SIZE,
    )
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    sci2, flg2 = sci.copy(), flg.copy()
    # Source 0: a cosmic ray (bit 4) 3 pixels right of the centre, a CR_REGION pixel (bit 9, masked) below it
    # and a pixel with only the informational bits QUADEDGE | STARSIGNAL | OBJECTS (not masked) above it.
    sci2[iy[0], ix[0] + 3] += 5000.0
    flg2[iy[0], ix[0] + 3] = 1 << 4
    flg2[iy[0] - 5, ix[0]] = euclid.FLG_CR_REGION
    sci2[iy[0] - 5, ix[0]] += 300.0
    flg2[iy[0] + 5, ix[0]] = euclid.FLG_QUADEDGE | euclid.FLG_STARSIGNAL | euclid.FLG_OBJECTS
    # Source 1: hot pixel on the centre.
    flg2[iy[1], ix[1]] = 1 << 1
    # Source 2: NaN pixel in the wings (masked as invalid even without a flag).
    sci2[iy[2] - 6, ix[2] - 2] = np.nan
    psf = st.PsfGrid.from_image(*syn.psf_grid_image(), (syn.NQ, syn.NQ))
    quad = st.QuadrantImages("k", "e", sci2, bkg, rms, None, flg2, hh, psf)
    s = st.quadrant_stamps(quad, _sources(ra, dec), SIZE)
    c = SIZE // 2
    # Masked pixel filled with its point-symmetric partner (round Gaussian: ~ the clean value).
    filled = s.images[0, c, c + 3]
    assert abs(filled - clean.images[0, c, c + 3]) < 0.03 * clean.images[0, c, c + 3]
    assert s.images[0, c + 5, c] == clean.images[0, c + 5, c]  # informational bits do not mask
    assert abs(s.images[0, c - 5, c] - clean.images[0, c - 5, c]) < 0.15 * clean.images[0, c - 5, c]  # wing
    assert s.reject[0] == 0 and s.masked_fraction[0] == pytest.approx(2 / SIZE**2)
    assert s.reject[1] & st.REJECT_CENTER_MASKED
    assert s.reject[2] == 0 and np.isfinite(s.images[2]).all()
    assert (
        abs(s.images[2, c - 6, c - 2] - clean.images[2, c - 6, c - 2])
        < 0.25 * abs(clean.images[2, c - 6, c - 2]) + 1e-6
    )  # steep wing: interpolation
    # A source on the quadrant edge: centre region off the quadrant -> rejected.
    from astropy.wcs import WCS

    era, edec = WCS(hh).all_pix2world([-0.3], [80.4], 0)
    se = st.quadrant_stamps(quad, _sources(era, edec), SIZE)
    assert se.reject[0] & st.REJECT_CENTER_MASKED and se.masked_fraction[0] >= 0.5


@pytest.mark.parametrize(
    ("bit", "masked"),
    [
        ("QUADEDGE", False),
        ("STARSIGNAL", False),
        ("OBJECTS", False),
        ("BAD_CLUSTER", True),
        ("CR_REGION", True),
        ("NO_DATA", True),
        ("SATXTALKGHOST", True),
        ("ADCMAX", True),
        ("STITCHBLOCK", True),
        ("INVALID", True),
    ],
)
def test_flag_mask_uses_the_esa_bit_map(bit, masked):
    """QUADEDGE (bit 6) marks good pixels near a quadrant edge; BAD_CLUSTER, CR_REGION, NO_DATA ... are defects."""
    assert st.FLG_MASK_BITS == euclid.FLG_MASK_BITS
    h = syn.wcs_header()
    ra, dec, x, y = syn.galaxy_positions(1, h, seed=3, margin=40)
    sci, rms, flg, bkg, hh = syn.render_quadrant(h, [(ra[0], dec[0], 30000.0, 0.2, 0.0, 0.0)])
    ix, iy = int(round(x[0])), int(round(y[0]))
    flg[iy + 6 : iy + 8, ix - 10 : ix + 10] = euclid.FLG_BITS[bit]
    psf = st.PsfGrid.from_image(*syn.psf_grid_image(), (syn.NQ, syn.NQ))
    s = st.quadrant_stamps(
        st.QuadrantImages("k", "e", sci, bkg, rms, None, flg, hh, psf), _sources(ra, dec), SIZE
    )
    assert s.masked_fraction[0] == pytest.approx(40 / SIZE**2 if masked else 0.0)


def test_edge_source_symmetric_fill_keeps_shape():
    """A galaxy 4 px from the quadrant edge (40 % of its stamp off-chip) measures like one in the interior."""
    from astropy.wcs import WCS

    from constellation_assets.shear import measure_stamps

    h = syn.wcs_header()
    ra, dec = WCS(h).all_pix2world([4.2, 80.3], [60.3, 60.3], 0)
    gals = [(r, d, 50000.0, 0.2, 0.2, 0.1) for r, d in zip(ra, dec, strict=True)]
    sci, rms, flg, bkg, hh = syn.render_quadrant(h, gals)
    psf = st.PsfGrid.from_image(*syn.psf_grid_image(), (syn.NQ, syn.NQ))
    s = st.quadrant_stamps(
        st.QuadrantImages("k", "e", sci, bkg, rms, None, flg, hh, psf), _sources(ra, dec), SIZE
    )
    assert s.reject.tolist() == [0, 0] and 0.35 < s.masked_fraction[0] < 0.5 and s.masked_fraction[1] == 0
    m = measure_stamps(s.images, s.psf, offsets_pix=s.offsets_pix)
    assert abs(m["e1"][0] - m["e1"][1]) < 0.01 * abs(m["e1"][1]) + 1e-3
    assert abs(m["e2"][0] - m["e2"][1]) < 0.01 * abs(m["e2"][1]) + 1e-3
    assert abs(m["r11"][0] / m["r11"][1] - 1) < 0.01


def _shapes(tmp_path, pa, flip, name):
    from constellation_assets.shear import measure_stamps

    h = syn.wcs_header(pa_deg=pa, flip=flip)
    rng = np.random.Generator(np.random.PCG64(11))
    ra, dec, _, _ = syn.galaxy_positions(8, syn.wcs_header(), seed=13, margin=30)
    g = rng.uniform(-0.3, 0.3, size=(8, 2))
    gals = [(r, d, 40000.0, 0.18, g1, g2) for r, d, (g1, g2) in zip(ra, dec, g, strict=True)]
    arrays = syn.render_quadrant(h, gals)
    entry = syn.write_exposure(tmp_path / name, 1, 0, arrays)
    s = st.quadrant_stamps(st.read_quadrant_images(entry), _sources(ra, dec), SIZE)
    frame = st.sky_frame_transform(s.jacobian)
    res = measure_stamps(s.images, s.psf, pixel_scale_arcsec=float(np.median(frame["scale_arcsec"])),
                         offsets_pix=s.offsets_pix)  # fmt: skip
    return st.to_sky_frame(res["e1"], res["e2"], res["r11"], res["r22"], frame), frame


def test_sky_frame_shapes_independent_of_wcs_orientation(tmp_path):
    """The same sky galaxies seen through rotated / mirrored detectors give the same sky-frame e."""
    (e1a, e2a, r1a, r2a), fa = _shapes(tmp_path, 0.0, False, "a")
    assert np.allclose(fa["theta"], 0, atol=1e-4) and np.all(fa["parity"] == 1)
    np.testing.assert_allclose(fa["scale_arcsec"], 0.1, rtol=1e-4)
    assert np.std(e1a) > 0.05  # galaxies are really elongated
    for pa, flip in ((30.0, False), (117.0, True)):
        (e1, e2, r1, r2), fr = _shapes(tmp_path, pa, flip, f"b{pa}")
        assert np.all(fr["parity"] == (-1 if flip else 1))
        np.testing.assert_allclose(e1, e1a, atol=5e-4)
        np.testing.assert_allclose(e2, e2a, atol=5e-4)
        np.testing.assert_allclose(r1 + r2, r1a + r2a, rtol=1e-2)


def test_sky_frame_transform_distortion_and_rotation():
    # Pure rotation by theta of a mirrored frame, plus a small distortion shear of the pixel grid.
    theta = 0.4
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    p = 0.1 * np.array([[1.01, 0.004], [0.004, 0.99]])
    j = rot @ p @ np.diag([-1.0, 1.0])
    f = st.sky_frame_transform(j[None])
    assert f["parity"][0] == -1
    assert f["theta"][0] == pytest.approx(theta)
    assert f["gamma1"][0] == pytest.approx(0.01, abs=1e-4)
    assert f["gamma2"][0] == pytest.approx(0.004, abs=1e-4)
    assert f["scale_arcsec"][0] == pytest.approx(0.1 * np.sqrt(1.01 * 0.99 - 0.004**2))


def test_combine_exposures_inverse_variance():
    # Source 0: two good exposures with Var(M00) 1 and 4 -> weights 4:1 (a = 1/Var).
    # Source 1: one good, one failed in the estimator. Source 2: only a rejected stamp. Source 3: uncovered.
    si = np.array([0, 0, 1, 1, 2])
    m00 = np.array([10.0, 10.0, 5.0, 5.0, 1.0])
    snr = np.array([10.0, 5.0, 5.0, 5.0, 1.0])  # sigma(M00) = 1, 2, 1, 1, 1
    meas = {
        "e1": np.array([0.1, 0.6, 0.2, 9.0, 0.0]),
        "e2": np.array([-0.1, 0.4, 0.0, 9.0, 0.0]),
        "r11": np.array([0.5, 1.0, 0.4, 9.0, 0.0]),
        "r22": np.array([0.5, 0.0, 0.4, 9.0, 0.0]),
        "weight": np.array([1.0, 1.0, 1.0, 0.0, 0.0]),
        "snr": snr,
        "m00": m00,
        "flags": np.array([0, 0, 0, 2, 0]),
    }
    usable = np.array([True, True, True, True, False])
    covered = np.array([2, 2, 1, 0])
    out = st.combine_exposures(4, si, meas, usable, covered)
    assert out["e1"][0] == pytest.approx((4 * 0.1 + 1 * 0.6) / 5)
    assert out["e2"][0] == pytest.approx((4 * -0.1 + 0.4) / 5)
    assert out["r11"][0] == pytest.approx((4 * 0.5 + 1.0) / 5)
    assert out["r22"][0] == pytest.approx((4 * 0.5 + 0.0) / 5)
    assert out["snr"][0] == pytest.approx((1 * 10 + 0.25 * 10) / np.sqrt(1.25))  # = sqrt(10^2 + 5^2)
    assert list(out["n_exposures"]) == [2, 1, 0, 0]
    assert out["e1"][1] == pytest.approx(0.2) and out["weight"][1] == 1.0
    assert list(out["flags"][:2]) == [0, 0]
    assert out["flags"][2] == st.FLAG_CENTER_MASKED and out["weight"][2] == 0
    assert out["flags"][3] == st.FLAG_NO_COVERAGE


def test_masked_median_matches_numpy():
    r = np.random.Generator(np.random.PCG64(1))
    v = r.normal(size=(50, 37))
    m = r.random((50, 37)) < 0.3
    m[3] = True
    expect = np.array([np.median(v[i][~m[i]]) if (~m[i]).any() else np.nan for i in range(50)])
    np.testing.assert_allclose(st._masked_median(v, m), expect, equal_nan=True)


# ------------------------------------------------------------------------------------------------------
# The real Q1 PSF product: native 9 x 9 grid of 21 x 21 stamps per quadrant, truncated, no keywords.


def test_real_psf_grid_kept_as_stored_with_flux_in_box(caplog):
    from astropy.io import fits

    img, sums = syn.native_psf_grid()
    assert sums.min() > 0.93 and sums.max() < 0.97  # like the Q1 PSFEx models: wings beyond 1.05" missing
    with caplog.at_level("WARNING", logger="constellation_assets.shear.stamps"):
        grid = st.PsfGrid.from_image(img, fits.Header(), (syn.NQ, syn.NQ), source="psf.fits[1-1.E]")
    assert grid.stamps.shape == (9, 9, 21, 21) and grid.oversampling == 1
    np.testing.assert_allclose(grid.x_nodes, (np.arange(9) + 0.5) * syn.NQ / 9 - 0.5)
    np.testing.assert_allclose(grid.flux_in_box, sums, rtol=1e-5)  # no renormalisation
    assert np.all(grid.border_fraction > 1e-3)
    cut = [r.getMessage() for r in caplog.records if "cut where light remains" in r.getMessage()]
    assert len(cut) == 1 and "psf.fits[1-1.E]" in cut[0] and "81 of 81" in cut[0]
    native = grid.native(SIZE)
    c = SIZE // 2
    np.testing.assert_array_equal(native[2, 4, c - 10 : c + 11, c - 10 : c + 11], img[42:63, 84:105])
    assert native[2, 4].sum() == pytest.approx(sums[2, 4], rel=1e-5)
    x, y = grid.x_nodes[4], grid.y_nodes[2]
    np.testing.assert_allclose(grid.at(np.array([x]), np.array([y]), SIZE)[0], native[2, 4], atol=1e-7)
    xm, ym = 0.5 * (grid.x_nodes[4] + grid.x_nodes[5]), 0.5 * (grid.y_nodes[2] + grid.y_nodes[3])
    mid = grid.at(np.array([xm]), np.array([ym]), SIZE)[0]
    assert mid.sum() == pytest.approx(sums[2:4, 4:6].mean(), rel=1e-5)
    # A stamp smaller than the model crops it, and says so.
    caplog.clear()
    with caplog.at_level("WARNING", logger="constellation_assets.shear.stamps"):
        small = grid.native(15)
    assert small[2, 4].sum() < sums[2, 4] and any("cropped" in r.getMessage() for r in caplog.records)
    # A compact model (Gaussian, all light inside the box) sums to 1 and raises no truncation warning.
    caplog.clear()
    gimg, gsums = syn.native_psf_grid(beta=None, fwhm=0.17)
    with caplog.at_level("WARNING", logger="constellation_assets.shear.stamps"):
        g = st.PsfGrid.from_image(gimg, fits.Header(), (syn.NQ, syn.NQ))
    assert np.all(np.abs(g.flux_in_box - 1) < 1e-4) and np.all(g.border_fraction < 1e-3)
    assert not caplog.records


def test_real_layout_stamps_through_the_q1_reader_only(tmp_path, monkeypatch):
    """DET/BKG/WGT of a short exposure + the observation's PSF file: stamps from index offsets or by name,
    with the DET primary EXPTIME, the file's PSF sums and the exposure label; no other FITS reader used."""
    from astropy.io import fits

    from constellation_assets.io import q1

    h = syn.q1_wcs_header(0)
    ra, dec, x, y = syn.galaxy_positions(5, h, seed=21, margin=30)
    flux_adu = 20000.0
    arrays = syn.render_quadrant(h, [(r, d, flux_adu, 0.15, 0.0, 0.0) for r, d in zip(ra, dec, strict=True)])
    folder = tmp_path / "q1" / "VIS" / "2704"
    paths = syn.write_q1_exposure(folder, 2704, 0, 2, "20241017T042759.344384", {"1-1.E": arrays}, 89.52)
    assert paths["DET"].name == syn.REAL_SHORT_DET
    psf_path = syn.write_q1_psf(folder, "20240322T192915.424564", {"1-1.E": (syn.NQ, syn.NQ)})
    (exp,) = q1.discover_vis_exposures(str(tmp_path / "q1" / "VIS"))
    row = q1.build_quadrant_index([exp]).to_pylist()[0]
    assert row["psf_path"] == str(psf_path) and row["exposure"] == 2 and row["exptime_s"] == 89.52

    def no_astropy_open(*a, **k):
        raise AssertionError("FITS files must be read through constellation_assets.io.q1 (byte ranges)")

    monkeypatch.setattr(fits, "open", no_astropy_open)
    q1.HDU_TABLES.clear()
    st.QUADRANT_CACHE.clear()
    quad = st.read_quadrant_images(row)
    assert quad.exposure == "2704-0-2" and quad.key == "2704-0-2-1-1.E"
    s = st.quadrant_stamps(quad, _sources(ra, dec), SIZE)
    assert len(s) == 5 and np.all(s.reject == 0)
    # Flux units from the DET primary EXPTIME (the SCI header has none): ADU -> uJy with 89.52 s.
    ujy = flux_adu * 10 ** (-0.4 * (24.57 - 23.9)) / 89.52
    np.testing.assert_allclose(s.images.sum(axis=(1, 2)), ujy, rtol=3e-3)
    # The PSF keeps the model's truncation; its sum is handed over per source.
    np.testing.assert_allclose(s.psf_flux_in_box, s.psf.sum(axis=(1, 2)), rtol=1e-6)
    assert np.all((s.psf_flux_in_box > 0.93) & (s.psf_flux_in_box < 0.97))
    _, sums = syn.native_psf_grid()
    assert s.psf_flux_in_box.min() >= sums.min() - 1e-6 and s.psf_flux_in_box.max() <= sums.max() + 1e-6
    # The same quadrant by name (no offsets: what the injection hosts use) gives the same stamps.
    by_name = st.quadrant_stamps(
        st.read_quadrant_images(q1.exposure_entry(exp, "1-1.E")), _sources(ra, dec), SIZE
    )
    np.testing.assert_array_equal(by_name.images, s.images)
    np.testing.assert_array_equal(by_name.psf, s.psf)
    assert by_name.exposure == "2704-0-2"
