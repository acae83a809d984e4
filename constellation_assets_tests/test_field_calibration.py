"""Field-level calibration arithmetic: paired m/c estimator, OBJECT_ID matching, sub-tile jackknife, bins.

Hand-made catalogs follow e = e_int(rotated) + R (1 + m) g + c exactly, so the truth of m and c is known.
The end-to-end run through the production path is in test_field_calibration_e2e.py.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from constellation_assets.shear.field_calibration import (
    FIELD_VARIANTS,
    FieldCalibrationError,
    FieldCalibrationResult,
    field_calibration_figure_png,
    field_calibration_table,
    field_variant_config,
    measure_paired_bias,
    neighbour_distance_arcsec,
)

G = (0.02, -0.015)


def make_fields(
    n=4000,
    m=(0.0, 0.0),
    c=(0.0, 0.0),
    seed=1,
    n_subtiles=20,
    response_noise=0.0,
    m_of_snr=None,
    variants=FIELD_VARIANTS,
):
    """Per-field catalogs of the same objects. Response noise (independent per field, per object) is the
    only noise source that survives the pairing, like the pixel-noise response in the real fields."""
    r = np.random.default_rng(seed)
    ids = r.choice(10**12, size=n, replace=False).astype(np.int64)
    eint = r.normal(0, 0.25, size=n) * np.exp(2j * r.uniform(0, np.pi, n))
    resp = r.uniform(0.3, 0.9, size=(n, 2))
    w = r.uniform(0.5, 2.0, size=n)
    snr = r.uniform(10, 100, size=n)
    label = r.integers(0, n_subtiles, size=n)
    frames = []
    for v in variants:
        e0 = eint * np.exp(2j * math.radians(v.rotation_deg))
        fr = r.normal(0, response_noise, size=(n, 2)) if response_noise else 0.0
        mm = np.array(m, float)[None, :] * np.ones((n, 2))
        if m_of_snr is not None:
            mm = mm + m_of_snr(snr)[:, None]
        g = v.sign * np.array(G)[None, :]
        e = np.column_stack([e0.real, e0.imag]) + (resp + fr) * (1 + mm) * g + np.array(c)[None, :] * resp
        order = r.permutation(n)  # catalog row order differs per field: matching is by OBJECT_ID
        frames.append(
            (
                v,
                pl.DataFrame(
                    {
                        "OBJECT_ID": ids[order],
                        "TILE_ID": np.full(n, 102044185, np.int64),
                        "SUBTILE_ROW": (label[order] // 8).astype(np.int32),
                        "SUBTILE_COL": (label[order] % 8).astype(np.int32),
                        "E1": e[order, 0],
                        "E2": e[order, 1],
                        "R11": resp[order, 0],
                        "R22": resp[order, 1],
                        "WEIGHT": w[order],
                        "SNR": snr[order] * (1 + 0.01 * v.sign),
                        "N_EXPOSURES": np.full(n, 3, np.int32),
                    }
                ),
            )
        )
    return frames


def test_exact_m_and_c_are_recovered():
    res = measure_paired_bias(make_fields(m=(0.013, -0.021), c=(4e-4, -3e-4)), G)
    assert res.m1 == pytest.approx(0.013, abs=1e-12)
    assert res.m2 == pytest.approx(-0.021, abs=1e-12)
    # c enters as c * R: the ensemble returns c exactly once the rotated pair cancels the intrinsic shapes
    assert res.c1 == pytest.approx(4e-4, abs=1e-12)
    assert res.c2 == pytest.approx(-3e-4, abs=1e-12)
    assert res.c_rotated and res.n_matched == res.n_objects == 4000 and res.n_subtiles == 20
    assert res.m1_err < 1e-10 and res.c1_err < 1e-10  # noiseless: every sub-tile gives the same answer
    assert res.fields["plus"]["g1"] == pytest.approx(G[0] * 1.013 + 4e-4, abs=2e-2)  # shape noise per field


def test_without_rotated_pair_c_carries_shape_noise():
    res = measure_paired_bias(make_fields(c=(4e-4, 0.0), variants=FIELD_VARIANTS[:2]), G)
    assert res.m1 == pytest.approx(0.0, abs=1e-12)  # m still exact: +g/-g share the intrinsic shapes
    assert not res.c_rotated
    assert abs(res.c1 - 4e-4) > 1e-4  # mean intrinsic e of 4000 galaxies ~ 0.25 / sqrt(4000) / R
    assert res.c1_err > 1e-3


def test_response_scaled_by_5_percent_moves_m():
    fields = make_fields(response_noise=0.05)
    base = measure_paired_bias(fields, G)
    broken = [(v, df.with_columns(pl.col("R11") * 1.05, pl.col("R22") * 1.05)) for v, df in fields]
    res = measure_paired_bias(broken, G)
    for comp in ("m1", "m2"):
        shift = getattr(res, comp) - getattr(base, comp)
        assert shift == pytest.approx(1 / 1.05 - 1, rel=1e-3)
        assert abs(shift) > 20 * getattr(base, f"{comp}_err")


def test_jackknife_error_matches_the_scatter_of_realisations():
    ms, errs = [], []
    for seed in range(60):
        res = measure_paired_bias(make_fields(n=1500, seed=seed, response_noise=0.3, n_subtiles=30), G)
        ms.append(res.m1)
        errs.append(res.m1_err)
    scatter = np.std(ms, ddof=1)
    assert scatter > 0
    assert np.mean(errs) == pytest.approx(scatter, rel=0.3)
    assert abs(np.mean(ms)) < 3 * scatter / math.sqrt(len(ms))  # unbiased


def test_matching_by_object_id_with_missing_and_unmeasured_objects():
    fields = make_fields(n=1000, m=(0.01, 0.01))
    v0, plus = fields[0]
    v1, minus = fields[1]
    # the -g field lost 30 objects (not detected) and failed to measure 20 more (WEIGHT 0)
    lost = minus["OBJECT_ID"].head(30)
    minus = minus.filter(~pl.col("OBJECT_ID").is_in(lost.implode()))
    failed = minus["OBJECT_ID"].tail(20)
    minus = minus.with_columns(
        pl.when(pl.col("OBJECT_ID").is_in(failed.implode()))
        .then(0.0)
        .otherwise(pl.col("WEIGHT"))
        .alias("WEIGHT")
    )
    fields[1] = (v1, minus)
    res = measure_paired_bias(fields, G)
    assert res.n_objects == 1000 and res.n_matched == 950
    assert res.fields["minus"]["n_rows"] == 970 and res.fields["minus"]["n_measured"] == 950
    # matched selection: exact m again (same objects in all fields)
    assert res.matched["m1"] == pytest.approx(0.01, abs=1e-12)
    assert res.matched["n_objects"] == 950

    # all rows: each field's own catalog sums, as the catalog's ensemble estimator would give
    def g_of(df, comp):
        w = df["WEIGHT"].to_numpy()
        return float((w * df[f"E{comp}"].to_numpy()).sum() / (w * df[f"R{comp}{comp}"].to_numpy()).sum())

    def pooled(dfs, comp):
        num = sum(float((d["WEIGHT"] * d[f"E{comp}"]).sum()) for d in dfs)
        den = sum(float((d["WEIGHT"] * d[f"R{comp}{comp}"]).sum()) for d in dfs)
        return num / den

    gp = pooled([fields[0][1], fields[2][1]], 1)
    gm = pooled([fields[1][1], fields[3][1]], 1)
    assert res.m1 == pytest.approx((gp - gm) / (2 * G[0]) - 1, rel=1e-10)
    assert res.fields["minus"]["g1"] == pytest.approx(g_of(minus, 1), rel=1e-10)


def test_object_ids_that_do_not_match_are_an_error():
    fields = make_fields(n=500)
    v, df = fields[1]
    fields[1] = (v, df.with_columns(pl.col("OBJECT_ID") + 1))
    with pytest.raises(FieldCalibrationError, match="OBJECT_ID"):
        measure_paired_bias(fields, G)
    v, df = fields[0]
    with pytest.raises(FieldCalibrationError, match="twice"):
        measure_paired_bias([(v, pl.concat([df, df.head(1)])), *fields[1:]], G)
    with pytest.raises(FieldCalibrationError, match="-g field"):
        measure_paired_bias([f for f in fields if f[0].sign > 0], G)


def test_bins_recover_an_snr_dependent_m():
    edges = {"snr": [0.0, 40.0, 70.0, 1e30], "n_exposures": [0.5, 3.5, 1e30]}
    res = measure_paired_bias(
        make_fields(m_of_snr=lambda s: np.where(s < 40, -0.05, np.where(s < 70, 0.0, 0.02))),
        G,
        bin_edges=edges,
    )
    snr_bins = [b for b in res.bins if b["variable"] == "snr"]
    assert [b["bin"] for b in snr_bins] == ["[0, 40)", "[40, 70)", ">= 70"]
    # the field's S/N differs by +-1 % between +g and -g: the bin uses the mean, so no object straddles
    for b, m_true in zip(snr_bins, (-0.05, 0.0, 0.02), strict=True):
        assert b["m1"] == pytest.approx(m_true, abs=1e-12) and b["m2"] == pytest.approx(m_true, abs=1e-12)
    assert sum(b["n_objects"] for b in snr_bins) == res.n_objects
    n_exp = [b for b in res.bins if b["variable"] == "n_exposures"]
    assert n_exp[0]["n_objects"] == res.n_objects and n_exp[1]["n_objects"] == 0
    assert n_exp[1]["m1"] != n_exp[1]["m1"]  # empty bin: NaN, never a number


def test_blended_and_neighbour_bins_from_truth_columns():
    fields = make_fields(n=2000, m_of_snr=lambda s: np.zeros_like(s))
    r = np.random.default_rng(5)
    ids = fields[0][1]["OBJECT_ID"].to_numpy()
    nb = dict(zip(ids.tolist(), r.uniform(0.2, 6.0, size=len(ids)).tolist(), strict=True))
    out = []
    for v, df in fields:
        d = np.array([nb[i] for i in df["OBJECT_ID"].to_list()])
        out.append((v, df.with_columns(pl.Series("NEIGHBOUR_ARCSEC", d), pl.lit(0.3).alias("HLR_ARCSEC"))))
    res = measure_paired_bias(
        out,
        G,
        bin_edges={"neighbour_arcsec": [0.0, 1.0, 1e30], "hlr_arcsec": [0.0, 1.0]},
        blend_radius_arcsec=1.5,
    )
    blended = {b["bin"]: b for b in res.bins if b["variable"] == "blended"}
    d = np.array(list(nb.values()))
    assert blended["blended"]["n_objects"] == int((d < 1.5).sum())
    assert blended["isolated"]["n_objects"] == int((d >= 1.5).sum())
    assert [b["n_objects"] for b in res.bins if b["variable"] == "hlr_arcsec"] == [2000]


def test_neighbour_distance_is_the_nearest_other_object():
    dec0 = -28.0
    ra = np.array([53.0, 53.0 + 1.0 / 3600 / math.cos(math.radians(dec0)), 53.0])
    dec = np.array([dec0, dec0, dec0 + 5.0 / 3600])
    d = neighbour_distance_arcsec(ra, dec)
    assert d == pytest.approx([1.0, 1.0, 5.0], rel=1e-3)
    assert neighbour_distance_arcsec(ra[:1], dec[:1])[0] == np.inf


def test_variant_configs_are_paired_and_separate(tmp_path):
    from constellation_assets.config import FieldConfig, load_config

    if "paired_noise" not in FieldConfig.model_fields:
        pytest.skip("the field generator of this version has no field.paired_noise")
    cfg = load_config(
        {
            "output": {"root_uri": str(tmp_path / "out"), "catalog_uri": "postgresql+psycopg2://u@h/db"},
            "field": {"tile_ids": [102044185], "shear_g1": 0.05, "truth_base_uri": str(tmp_path / "truth")},
            "calibration": {"field_shear_g": [0.02, 0.01]},
        }
    )
    cfgs = {v.name: field_variant_config(cfg, v, str(tmp_path / "work")) for v in FIELD_VARIANTS}
    roots = {c.output.root_uri for c in cfgs.values()} | {c.data.vis_base_uri for c in cfgs.values()}
    assert len(roots) == 8  # nothing shared between fields
    assert all(c.output.catalog.startswith("sqlite:///") for c in cfgs.values())
    assert all(c.field.truth_base_uri is None and c.field.paired_noise for c in cfgs.values())
    assert (cfgs["minus"].field.shear_g1, cfgs["minus"].field.shear_g2) == (-0.02, -0.01)
    assert cfgs["plus_rot90"].field.intrinsic_rotation_deg == 90.0
    assert cfgs["plus"].field.seed == cfgs["minus_rot90"].field.seed
    with pytest.raises(FieldCalibrationError, match="local folder"):
        field_variant_config(cfg, FIELD_VARIANTS[0], "s3://bucket/work")


def test_config_validation_of_field_calibration_keys():
    from constellation_assets.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="field_shear_g"):
        load_config({"calibration": {"field_shear_g": [0.02, 0.0]}})
    with pytest.raises(ConfigError, match="unknown bin variable"):
        load_config({"calibration": {"field_bin_edges": {"colour": [0, 1]}}})
    with pytest.raises(ConfigError, match="increasing"):
        load_config({"calibration": {"field_bin_edges": {"snr": [10, 5]}}})


def test_table_json_and_figure():
    res = measure_paired_bias(
        make_fields(n=800, response_noise=0.1),
        G,
        bin_edges={"snr": [0.0, 50.0, 1e30], "n_exposures": [0.5, 9.5]},
    )
    d = res.to_dict()
    for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err", "n_matched", "bins", "g_true"):
        assert k in d
    assert isinstance(d["bins"][0]["m1"], float)
    head, bins = field_calibration_table(res)
    assert head.row_count == 2 and bins.row_count == 3
    png = field_calibration_figure_png(res)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert isinstance(res, FieldCalibrationResult) and res.within(1.0, 1.0)


def test_cli_field_rejects_isolated_stamp_flags():
    from click.testing import CliRunner

    from constellation_assets.cli import main

    res = CliRunner().invoke(main, ["calibrate", "--field", "--n-galaxies", "10", "--psf-g1", "0.01"])
    assert res.exit_code == 2
    assert "--field takes its settings from the config" in res.output and "--n-galaxies" in res.output


def test_requirement_checks_pass_fail_and_nan():
    import dataclasses

    from constellation_assets.defs.calibration_field import field_calibration_outcomes

    res = measure_paired_bias(make_fields(n=500, m=(0.004, -0.001), c=(2e-4, 0.0)), G)
    ok = {c.check_name: c for c in field_calibration_outcomes(res, 5e-3, 5e-4)}
    assert ok["m_within_requirement"].passed and ok["c_within_requirement"].passed
    assert ok["m_within_requirement"].metadata["m1"].value == pytest.approx(0.004)
    bad = {c.check_name: c for c in field_calibration_outcomes(res, 2e-3, 1e-4)}
    assert not bad["m_within_requirement"].passed and not bad["c_within_requirement"].passed
    nan = field_calibration_outcomes(dataclasses.replace(res, m2=float("nan")), 1.0, 1.0)
    assert not nan[0].passed  # no measurement is never a pass
    assert not dataclasses.replace(res, c1=float("nan")).within(1.0, 1.0) and res.within(1.0, 1.0)


def test_noise_sign_negates_the_paired_noise_draw():
    from constellation_assets.config import load_config
    from constellation_assets.synthetic.focal_plane import exposure_layout, focal_plane
    from constellation_assets.synthetic.render import expose_quadrant

    field = {"tile_ids": [102044185], "ccd_grid": [1, 1], "quadrant_nx_pix": 64, "quadrant_ny_pix": 64}
    field |= {"n_dithers": 1, "paired_noise": True, "cosmic_rate_per_mpix": 0.0}
    plus, minus = (load_config({"field": {**field, "noise_sign": s}}) for s in (1, -1))
    exp, q = exposure_layout(plus)[0], focal_plane(plus.field)[0]
    model = np.zeros((64, 64))
    model[30:34, 30:34] = 500.0  # a source: the noise rms follows the expected counts
    sci_p, rms_p, flg_p, sky, _ = expose_quadrant(plus, exp, q, model)
    sci_m, rms_m, flg_m, _, _ = expose_quadrant(minus, exp, q, model)
    good = (flg_p == 0) & (flg_m == 0)
    noise_p = (sci_p - sky - model)[good]
    noise_m = (sci_m - sky - model)[good]
    assert np.std(noise_p) > 1.0
    np.testing.assert_allclose(noise_m, -noise_p, atol=1e-3)
    np.testing.assert_array_equal(rms_p, rms_m)
    from constellation_assets.synthetic.field import field_config_hash

    assert field_config_hash(plus) != field_config_hash(minus)  # the partner is a different field


def with_mer_snr(fields, mer_snr_of):
    """Add the per-field MER detection S/N column: ``mer_snr_of(variant, ids) -> array``."""
    return [
        (v, df.with_columns(pl.Series("MER_SNR", mer_snr_of(v, df["OBJECT_ID"].to_numpy()))))
        for v, df in fields
    ]


def pooled_m(fields, comp, keep_row):
    """m from each sign's pooled sums of w e / w R over the rows keep_row(variant, frame) keeps."""
    gs = {}
    for sign in (+1, -1):
        num = den = 0.0
        for v, df in fields:
            if v.sign != sign:
                continue
            k = keep_row(v, df)
            w = df["WEIGHT"].to_numpy() * k
            num += float((w * df[f"E{comp}"].to_numpy()).sum())
            den += float((w * df[f"R{comp}{comp}"].to_numpy()).sum())
        gs[sign] = num / den
    return (gs[+1] - gs[-1]) / (2 * G[comp - 1]) - 1


def test_mer_cut_dm_is_exact_on_a_hand_made_catalog():
    """A MER S/N that moves with the shear (+0.3 in +g fields, -0.3 in -g) selects differently in +g and -g:
    the post-hoc cut must give exactly the m of the pooled per-field sums after dropping those rows."""
    fields = make_fields(n=3000, m=(0.01, -0.02), response_noise=0.2)
    r = np.random.default_rng(3)
    ids = fields[0][1]["OBJECT_ID"].to_numpy()
    base = dict(zip(ids.tolist(), r.uniform(2.0, 14.0, size=len(ids)).tolist(), strict=True))
    # the response-correlated part: objects with large e1 response gain S/N under +g
    fields = with_mer_snr(fields, lambda v, oid: np.array([base[i] for i in oid.tolist()]) + 0.3 * v.sign)
    res = measure_paired_bias(fields, G, mer_snr_cuts=[0.0, 5.0, 10.0])
    rows = {(c["selection"], c["mer_snr_min"]): c for c in res.mer_cuts}
    assert set(rows) == {("all rows", 0.0), ("all rows", 5.0), ("all rows", 10.0)}
    no_cut = rows[("all rows", 0.0)]
    assert no_cut["dm1"] == 0.0 and no_cut["dm1_err"] == 0.0 and no_cut["n_rows_removed"] == 0
    assert no_cut["m1"] == pytest.approx(res.m1, abs=1e-14)
    for cut in (5.0, 10.0):
        row = rows[("all rows", cut)]
        for comp in (1, 2):
            m_all = pooled_m(fields, comp, lambda v, df: np.ones(df.height))
            m_cut = pooled_m(
                fields, comp, lambda v, df, cut=cut: (df["MER_SNR"].to_numpy() >= cut).astype(float)
            )
            assert row[f"m{comp}"] == pytest.approx(m_cut, abs=1e-12)
            assert row[f"dm{comp}"] == pytest.approx(m_cut - m_all, abs=1e-12)
        expect_removed = sum(int((df["MER_SNR"].to_numpy() < cut).sum()) for _, df in fields)
        assert row["n_rows_removed"] == expect_removed
        # paired: the cut's error on dm is smaller than the error on m itself (shared objects and noise)
        assert 0 < row["dm1_err"] < row["m1_err"]
    # the +-0.3 shift makes the cut shear-dependent: rows differ between +g and -g at the boundary
    assert rows[("all rows", 5.0)]["dm1"] != 0.0


def test_mer_cut_costs_nothing_where_the_fpfs_weight_is_zero():
    """Objects near the MER boundary with zero FPFS weight contribute nothing: dm = 0 exactly, whatever the
    boundary does; objects above it are untouched."""
    fields = make_fields(n=2000, m=(0.005, 0.005), response_noise=0.2)
    r = np.random.default_rng(4)
    ids = fields[0][1]["OBJECT_ID"].to_numpy()
    faint = dict(zip(ids.tolist(), (r.uniform(size=len(ids)) < 0.3).tolist(), strict=True))
    out = []
    for v, df in fields:
        f = np.array([faint[i] for i in df["OBJECT_ID"].to_list()])
        snr = np.where(f, 5.0 + 0.5 * v.sign + r.normal(0, 1, df.height), 30.0)  # faint: straddles 5
        out.append(
            (
                v,
                df.with_columns(
                    pl.Series("MER_SNR", snr), pl.Series("WEIGHT", np.where(f, 0.0, df["WEIGHT"]))
                ),
            )
        )
    res = measure_paired_bias(out, G, mer_snr_cuts=[5.0])
    (row,) = res.mer_cuts
    assert row["n_rows_removed"] == 0  # removed rows are counted only where the FPFS weight is > 0
    assert row["dm1"] == 0.0 and row["dm2"] == 0.0 and row["dc1"] == 0.0
    assert row["weight_fraction_removed"] == 0.0
    census = {b["lo"]: b for b in res.mer_snr_census}
    assert census[20.0]["weight_fraction"] == pytest.approx(1.0)
    assert sum(b["n_rows"] for b in res.mer_snr_census) == sum(df.height for _, df in out)
    assert census[4.0]["n_weighted"] == 0 and census[4.0]["mean_weight"] == 0.0


def test_detection_boundary_and_missing_mer_snr():
    fields = make_fields(n=1000, m=(0.0, 0.0))
    # the unrotated -g field does not list 40 objects (not detected there): their intrinsic shapes no longer
    # cancel against the rotated -g field; 10 rows of +g have no MER S/N
    lost = fields[1][1]["OBJECT_ID"].head(40).implode()
    fields[1] = (fields[1][0], fields[1][1].filter(~pl.col("OBJECT_ID").is_in(lost)))
    fields = with_mer_snr(fields, lambda v, oid: np.full(len(oid), 20.0))
    v0, df0 = fields[0]
    fields[0] = (
        v0,
        df0.with_columns(
            pl.when(pl.int_range(pl.len()) < 10).then(None).otherwise(pl.col("MER_SNR")).alias("MER_SNR")
        ),
    )
    res = measure_paired_bias(fields, G, mer_snr_cuts=[0.0])
    (d,) = res.detection  # no truth neighbour column: no isolated subset
    assert d["selection"] == "all rows" and d["median_mer_snr_of_those"] == 20.0
    assert d["n_objects_listed_in_some_fields_only"] == 40
    assert d["n_weighted_rows_of_those"] == 120  # listed and weighted in the three other fields
    assert d["n_rows_without_mer_snr"] == 10
    m_listed = pooled_m(fields, 1, lambda v, df: (~df["OBJECT_ID"].is_in(lost)).to_numpy().astype(float))
    assert d["dm1"] == pytest.approx(res.m1 - m_listed, abs=1e-12) and d["dm1"] != 0.0
    (row,) = res.mer_cuts
    assert row["n_rows_removed"] == 10  # no MER S/N fails even the 0 cut
    head, bins = field_calibration_table(res)
    from constellation_assets.shear.field_calibration import field_calibration_selection_tables

    assert [t.row_count for t in field_calibration_selection_tables(res)] == [1, 1, 11]
    assert res.to_dict()["mer_cuts"][0]["n_rows_removed"] == 10


def test_no_mer_snr_column_means_no_cut_table():
    res = measure_paired_bias(make_fields(n=300), G, mer_snr_cuts=[5.0])
    assert res.mer_cuts == [] and res.mer_snr_census == []
    assert res.detection[0]["n_objects_listed_in_some_fields_only"] == 0
