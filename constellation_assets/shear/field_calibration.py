"""Field-level shear calibration: m and c of the assembled catalog, through the whole production path.

:mod:`constellation_assets.shear.calibration` measures the estimator kernel on isolated stamps. This module
measures the *catalog*: the synthetic Euclid field of the ``field`` section is written in the Q1 layout and
run through :func:`constellation_assets.pipeline.run_local` (prepare -> stamps from the quadrants with their
masks and the PSF grid -> estimator -> exposure combination -> Iceberg assembly) once per paired field:

====================  =========================  =====================================
field                 constant shear             intrinsic orientation
====================  =========================  =====================================
``plus``              (+g1, +g2)                 as drawn
``minus``             (-g1, -g2)                 as drawn
``plus_rot90``        (+g1, +g2)                 rotated by 90 degrees
``minus_rot90``       (-g1, -g2)                 rotated by 90 degrees
====================  =========================  =====================================

(``calibration.field_shear_g`` = (g1, g2); the rotated pair is skipped when ``calibration.field_rotated_pair``
is false). With ``calibration.field_antithetic_noise`` (default) every field also has a ``*_negnoise``
partner whose pixel-noise draw is negated (``field.noise_sign = -1``): the measured response R carries a term
linear in the pixel noise that the +g/-g difference does not (the noise is not sheared), and it cancels
between N and -N; both are equally likely Gaussian draws, so the noise average is unchanged. All fields share
the seed and the noise stream (``field.paired_noise``), so the +g/-g difference has no shape noise and the
rotated pair cancels the intrinsic shapes in the sum. Each field has its own data and output root under
``calibration.field_work_dir`` (default ``{output.root_uri}/field_calibration/{field}/{data,output}``).

Pairing and the field generator (measured on the small config, ~300-600 galaxies): the noise cancels only
where a galaxy sits on the same noise pixels in every field. With ``field.shear_positions`` (whole-scene
shear about the tile centre) galaxies move by g * r (~2" at 2' from the centre) over the unsheared noise, so
the pairs decorrelate (sigma_m ~ 0.1-0.4); without it neighbours do not move with the shear, which the
response of a blend assumes (O(1) noise for neighbours < 1.5"). A MER catalog measured on the noisy mosaic
adds detection and centroid noise of its own. The configs state which of these they use.

Estimator (the catalog's own, :func:`constellation_assets.shear.ensemble.ensemble_shear`): the ``shear.sources``
table carries per-source ``E1, E2, R11, R22, WEIGHT`` (the diagonal shear responses of FPFS; no off-diagonal
response column exists, so the ensemble is ``g_i = sum(w e_i) / sum(w R_ii)``). Per sign the sums are pooled
over the rotated pair::

    g+ = sum_{plus, plus_rot90} w e / sum_{plus, plus_rot90} w R        (same for g-)
    m  = (g+ - g-) / (2 g_true) - 1,      c = (g+ + g-) / 2

Objects are matched across fields by ``OBJECT_ID`` (which the field generator derives from the truth id, so
+g/-g fields give the same ids). The headline numbers use every catalog row of every field: an object that one
field does not measure (``WEIGHT = 0`` or absent) contributes nothing to that field's sums, exactly as in the
catalog, so shear-dependent selection is part of m. ``matched`` repeats the measurement on the objects with
``WEIGHT > 0`` in all fields (selection held fixed); the difference between the two is the selection bias.

Errors: delete-one-sub-tile jackknife over the paired sums. Each object is labelled with the sub-tile
``(TILE_ID, SUBTILE_ROW, SUBTILE_COL)`` of the first field that lists it, the same label in every field, so
deleting a sub-tile removes the same objects from all fields. The sub-tile grid (``tiling.sub_tile_grid``)
sets the number of jackknife regions: the calibration configs use a fine grid (1' sub-tiles) so that a
few-arcminute synthetic field has tens of them.

MER preselection boundary (``calibration.field_mer_snr_cuts``): every field's rows are joined by OBJECT_ID with
the detection S/N of that field's own MER catalog (measured on its sheared mosaic with ``field.mer_catalog:
measured``), and m, c are recomputed with each cut applied post hoc per field, as ``shear.snr_min`` would in
prepare (the stamps have no neighbour masking from the catalog, so dropping a row changes nothing else). The
paired ``dm = m(cut) - m(run's own cut)`` shares objects and noise, so its jackknife error is far below that of
m; run with ``shear.snr_min = 0`` to test every cut above the detection threshold (configs/
field_calibration_mer.yaml). ``detection`` reports the objects that some fields list and others do not and
``m(all) - m(listed in every field)``; ``mer_snr_census`` the FPFS selection weight per MER S/N bin.

Bins (``calibration.field_bin_edges``): catalog S/N (``SNR``, mean over the fields that measured the object),
``N_EXPOSURES`` (exposures that survived masking), the catalog ``MASKED_FRACTION`` where the catalog has that
column, and from the truth tables of the synthetic field: the intrinsic half-light radius ``HLR_ARCSEC`` and
the distance to the nearest other rendered object (galaxy or star, detected or not), with ``blended`` meaning
that distance is below ``calibration.field_blend_radius_arcsec``. Bin values are averaged over the fields
(truth positions move with the shear), so bin membership does not depend on the sign of the shear to first
order.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
import logging
import math
import multiprocessing as mp
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from constellation_assets.io.uri import is_s3, join_uri

log = logging.getLogger(__name__)

__all__ = [
    "FIELD_VARIANTS",
    "FieldCalibrationError",
    "FieldCalibrationResult",
    "FieldVariant",
    "field_calibration_figure_png",
    "field_calibration_selection_tables",
    "field_variant_config",
    "load_field_catalog",
    "measure_paired_bias",
    "neighbour_distance_arcsec",
    "run_field_calibration",
]


class FieldCalibrationError(RuntimeError):
    """The field calibration cannot run or its inputs are inconsistent. The message says what to do."""


@dataclasses.dataclass(frozen=True)
class FieldVariant:
    name: str
    sign: int  # +1: shear (+g1, +g2); -1: (-g1, -g2)
    rotation_deg: float  # intrinsic orientation of every galaxy rotated by this angle
    noise_sign: int = 1  # -1: the shared pixel-noise field negated (antithetic partner)


FIELD_VARIANTS: tuple[FieldVariant, ...] = (
    FieldVariant("plus", +1, 0.0),
    FieldVariant("minus", -1, 0.0),
    FieldVariant("plus_rot90", +1, 90.0),
    FieldVariant("minus_rot90", -1, 90.0),
)

#: FieldConfig keys the paired fields need from the field generator.
REQUIRED_FIELD_KEYS = ("shear_g1", "shear_g2", "paired_noise")
ROTATION_FIELD_KEY = "intrinsic_rotation_deg"
NOISE_SIGN_FIELD_KEY = "noise_sign"

#: Columns read from shear.sources (the catalog schema, catalog/schema.py).
CATALOG_COLUMNS = (
    "OBJECT_ID",
    "TILE_ID",
    "SUBTILE_ROW",
    "SUBTILE_COL",
    "E1",
    "E2",
    "R11",
    "R22",
    "WEIGHT",
    "SNR",
    "N_EXPOSURES",
)

#: Bin variable -> column of the per-field frame it is read from.
BIN_COLUMNS = {
    "snr": "SNR",
    "hlr_arcsec": "HLR_ARCSEC",
    "neighbour_arcsec": "NEIGHBOUR_ARCSEC",
    "n_exposures": "N_EXPOSURES",
    "masked_fraction": "MASKED_FRACTION",
}

_BIAS_KEYS = ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err")
_DIFF_KEYS = ("dm1", "dm1_err", "dm2", "dm2_err", "dc1", "dc1_err", "dc2", "dc2_err")

#: Per-field column with the MER detection S/N of the row's object in that field's own MER catalog.
MER_SNR_COLUMN = "MER_SNR"

#: MER detection S/N bin edges of the weight census (:attr:`FieldCalibrationResult.mer_snr_census`).
MER_CENSUS_EDGES = (0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0, math.inf)


# --------------------------------------------------------------------------------------------------
# Field configs


def variants_for(cfg) -> tuple[FieldVariant, ...]:
    """The paired fields of a config: +g/-g, the rotated pair, and their antithetic-noise partners."""
    base = FIELD_VARIANTS if cfg.calibration.field_rotated_pair else FIELD_VARIANTS[:2]
    if cfg.calibration.field_antithetic_noise:
        base = base + tuple(FieldVariant(f"{v.name}_negnoise", v.sign, v.rotation_deg, -1) for v in base)
    return base


def field_work_dir(cfg) -> str:
    return cfg.calibration.field_work_dir or join_uri(cfg.output.root_uri, "field_calibration")


def _check_field_generator(cfg) -> None:
    from constellation_assets.config import FieldConfig

    need = list(REQUIRED_FIELD_KEYS) + ([ROTATION_FIELD_KEY] if cfg.calibration.field_rotated_pair else [])
    need += [NOISE_SIGN_FIELD_KEY] if cfg.calibration.field_antithetic_noise else []
    missing = [k for k in need if k not in FieldConfig.model_fields]
    if missing:
        raise FieldCalibrationError(
            "the synthetic field generator of this version has no "
            + ", ".join(f"field.{k}" for k in missing)
            + ": the field calibration needs paired fields (constant shear, identical pixel noise, rotated "
            "intrinsic orientations); use a version whose FieldConfig has these keys"
        )


def field_variant_config(cfg, variant: FieldVariant, work_dir: str | None = None):
    """The config of one paired field: the base config with constant shear ``sign * field_shear_g``, the
    rotation, paired noise, and its own data/output roots (``{work_dir}/{variant.name}/{data,output}``)."""
    from constellation_assets.config import PipelineConfig

    work = str(work_dir or field_work_dir(cfg)).rstrip("/")
    if is_s3(work):
        raise FieldCalibrationError(
            f"calibration.field_work_dir {work!r} is on S3; the paired fields each keep a SQLite Iceberg "
            "catalog under their output root, so give a local folder"
        )
    root = str(Path(work).expanduser().absolute() / variant.name)
    d = cfg.model_dump(mode="json")
    g1, g2 = cfg.calibration.field_shear_g
    f = d["field"]
    f["tile_ids"] = list(cfg.selected_tile_ids)
    f["shear_model"] = "constant"
    f["shear_g1"] = variant.sign * float(g1)
    f["shear_g2"] = variant.sign * float(g2)
    f["paired_noise"] = True
    if variant.rotation_deg or ROTATION_FIELD_KEY in f:
        f[ROTATION_FIELD_KEY] = float(variant.rotation_deg)
    if variant.noise_sign != 1 or NOISE_SIGN_FIELD_KEY in f:
        f[NOISE_SIGN_FIELD_KEY] = int(variant.noise_sign)
    f["truth_base_uri"] = None  # every field keeps its truth next to its data
    d["tile_ids"] = []
    d["data"]["vis_base_uri"] = f"{root}/data/q1/VIS/"
    d["data"]["catalog_base_uri"] = f"{root}/data/q1/catalogs/MER_FINAL_CATALOG/"
    out = d["output"]
    out.update(
        root_uri=f"{root}/output",
        manifest_dir=None,
        result_dir=None,
        tile_dir=None,
        catalog_warehouse=None,
        catalog_uri=None,
        catalog_type="sql",
        s3=None,
    )
    return PipelineConfig.model_validate(d)


# --------------------------------------------------------------------------------------------------
# Reading one field: catalog rows + truth columns


def neighbour_distance_arcsec(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Distance (arcsec) from each position to the nearest other one (inf when alone); flat sky locally."""
    from scipy.spatial import cKDTree

    ra = np.asarray(ra_deg, np.float64)
    dec = np.asarray(dec_deg, np.float64)
    if len(ra) < 2:
        return np.full(len(ra), np.inf)
    ra0 = float(np.median(ra))
    dec0 = float(np.median(dec))
    dra = ((ra - ra0 + 180.0) % 360.0) - 180.0
    xy = np.column_stack([dra * math.cos(math.radians(dec0)) * 3600.0, (dec - dec0) * 3600.0])
    dist, _ = cKDTree(xy).query(xy, k=2)
    return dist[:, 1]


def _tile_truth_uri(cfg, tile_id: int) -> str:
    from constellation_assets.synthetic import tile_truth_uri

    return tile_truth_uri(cfg, tile_id)


def truth_columns(cfg, tile_ids: Sequence[int]):
    """OBJECT_ID, HLR_ARCSEC, NEIGHBOUR_ARCSEC of the detected truth objects of a synthetic field."""
    import polars as pl
    import pyarrow.parquet as pq

    from constellation_assets.io.uri import get_fs

    frames = []
    for tile_id in tile_ids:
        uri = join_uri(_tile_truth_uri(cfg, int(tile_id)), "truth_objects.parquet")
        fs, path = get_fs(uri, cfg.storage_options(uri))
        try:
            with fs.open(path, "rb") as fh:
                t = pq.read_table(fh, columns=["OBJECT_ID", "RA", "DEC", "HLR_ARCSEC"])
        except FileNotFoundError as exc:
            raise FieldCalibrationError(
                f"truth table {uri} of tile {tile_id} is missing: the synthetic field was not written there"
            ) from exc
        df = pl.from_arrow(t)
        df = df.with_columns(
            pl.Series(
                "NEIGHBOUR_ARCSEC", neighbour_distance_arcsec(df["RA"].to_numpy(), df["DEC"].to_numpy())
            )
        )
        frames.append(
            df.filter(pl.col("OBJECT_ID") >= 0).select("OBJECT_ID", "HLR_ARCSEC", "NEIGHBOUR_ARCSEC")
        )
    out = pl.concat(frames) if frames else pl.DataFrame()
    if out.height and out["OBJECT_ID"].n_unique() != out.height:
        raise FieldCalibrationError("truth tables list an OBJECT_ID twice; regenerate the synthetic field")
    return out


def mer_snr_columns(cfg, tile_ids: Sequence[int]):
    """OBJECT_ID and the MER detection S/N (:data:`MER_SNR_COLUMN`, the quantity ``shear.snr_min`` cuts on) of
    every row of the field's tile MER catalogs (first catalog wins for an OBJECT_ID listed twice)."""
    import polars as pl

    from constellation_assets.io.mer_catalog import read_mer_catalog, selection_snr
    from constellation_assets.io.q1 import discover_mer_catalog

    frames = []
    base = cfg.data.catalog_base_uri
    for tile_id in tile_ids:
        uri = discover_mer_catalog(base, int(tile_id), cfg.storage_options(base))
        t = read_mer_catalog(uri, cfg.storage_options(uri))
        snr = selection_snr(t, "the field calibration's MER S/N cuts")
        frames.append(pl.DataFrame({"OBJECT_ID": t.column("OBJECT_ID").to_numpy(), MER_SNR_COLUMN: snr}))
    if not frames:
        return pl.DataFrame(
            {"OBJECT_ID": [], MER_SNR_COLUMN: []}, schema={"OBJECT_ID": pl.Int64, MER_SNR_COLUMN: pl.Float64}
        )
    return pl.concat(frames).unique("OBJECT_ID", keep="first", maintain_order=True)


def load_field_catalog(cfg, tile_ids: Sequence[int] | None = None):
    """The assembled ``shear.sources`` rows of a field (columns :data:`CATALOG_COLUMNS`, plus
    ``MASKED_FRACTION`` if the catalog has it), left-joined by OBJECT_ID with the MER detection S/N of the
    field's own MER catalogs (:data:`MER_SNR_COLUMN`) and the truth columns."""
    import polars as pl

    from constellation_assets.catalog.tables import namespace_from_config, open_catalog
    from constellation_assets.quality.run import catalog_frames

    tiles = list(tile_ids if tile_ids is not None else cfg.selected_tile_ids)
    sources, _ = catalog_frames(open_catalog(cfg), tiles, namespace_from_config(cfg))
    cols = [c for c in CATALOG_COLUMNS if c in sources.columns]
    missing = sorted(set(CATALOG_COLUMNS) - set(cols))
    if missing:
        raise FieldCalibrationError(f"shear.sources of {cfg.output.root_uri} has no column(s) {missing}")
    if "MASKED_FRACTION" in sources.columns:
        cols.append("MASKED_FRACTION")
    cat = sources.select(cols)
    mer = mer_snr_columns(cfg, tiles)
    cat = (
        cat.join(mer, on="OBJECT_ID", how="left")
        if mer.height
        else cat.with_columns(pl.lit(None, pl.Float64).alias(MER_SNR_COLUMN))
    )
    truth = truth_columns(cfg, tiles)
    if truth.height:
        cat = cat.join(truth, on="OBJECT_ID", how="left")
    else:
        cat = cat.with_columns(
            pl.lit(None, pl.Float64).alias("HLR_ARCSEC"), pl.lit(None, pl.Float64).alias("NEIGHBOUR_ARCSEC")
        )
    return cat


# --------------------------------------------------------------------------------------------------
# The paired estimator (pure arithmetic on per-field catalogs)


@dataclasses.dataclass
class FieldCalibrationResult:
    m1: float
    m1_err: float
    m2: float
    m2_err: float
    c1: float
    c1_err: float
    c2: float
    c2_err: float
    n_matched: int
    n_objects: int
    n_subtiles: int
    g_true: tuple[float, float]
    c_rotated: bool  # c from the rotated pair (shape noise cancelled)
    fields: dict[str, dict[str, Any]]
    matched: dict[str, float]
    bins: list[dict[str, Any]]
    # MER preselection boundary (see measure_paired_bias): m, c and the paired dm, dc per post-hoc MER S/N cut
    mer_cuts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # per selection (all rows, isolated): objects listed in some paired fields only, what they contribute
    detection: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # rows, FPFS-weighted rows and share of the summed weight per MER detection S/N bin
    mer_snr_census: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    config_hash: str = ""
    work_dir: str = ""
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    m_requirement: float | None = None
    c_requirement: float | None = None

    def within(self, m_requirement: float, c_requirement: float) -> bool:
        # all(): a NaN component (no measurement) fails, which max() would silently skip
        return all(abs(m) < m_requirement for m in (self.m1, self.m2)) and all(
            abs(c) < c_requirement for c in (self.c1, self.c2)
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["g_true"] = list(self.g_true)
        return _finite_or_none(d)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _field_arrays(frame, index: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per-object weighted sums of one field on the union index (zeros where the field lacks the object)."""
    w = np.asarray(frame["WEIGHT"].to_numpy(), np.float64)
    e1 = np.asarray(frame["E1"].to_numpy(), np.float64)
    e2 = np.asarray(frame["E2"].to_numpy(), np.float64)
    r11 = np.asarray(frame["R11"].to_numpy(), np.float64)
    r22 = np.asarray(frame["R22"].to_numpy(), np.float64)
    ok = (w > 0) & np.isfinite(w) & np.isfinite(e1) & np.isfinite(e2) & np.isfinite(r11) & np.isfinite(r22)
    out = {k: np.zeros(n) for k in ("we1", "we2", "wr1", "wr2", "w")}
    out["measured"] = np.zeros(n, bool)
    out["present"] = np.zeros(n, bool)
    out["present"][index] = True
    out["mer_snr"] = np.full(n, np.nan)
    if MER_SNR_COLUMN in frame.columns:
        out["mer_snr"][index] = np.asarray(frame[MER_SNR_COLUMN].cast(float).fill_null(np.nan).to_numpy())
    i = index[ok]
    out["w"][i] = w[ok]
    out["we1"][i] = (w * e1)[ok]
    out["we2"][i] = (w * e2)[ok]
    out["wr1"][i] = (w * r11)[ok]
    out["wr2"][i] = (w * r22)[ok]
    out["measured"][i] = True
    return out


def _bias(se: np.ndarray, sr: np.ndarray, signs: np.ndarray, g_true: np.ndarray) -> np.ndarray:
    """(m1, m2, c1, c2) from summed w e and w R, shape (..., n_fields, 2) with the field axis second-last."""
    plus, minus = signs > 0, signs < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        gp = se[..., plus, :].sum(-2) / sr[..., plus, :].sum(-2)
        gm = se[..., minus, :].sum(-2) / sr[..., minus, :].sum(-2)
        m = (gp - gm) / (2.0 * g_true) - 1.0
    c = 0.5 * (gp + gm)
    return np.concatenate([m, c], axis=-1)


def _jackknife(
    sums_e: np.ndarray, sums_r: np.ndarray, signs: np.ndarray, g_true: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Full estimate and delete-one-block jackknife error of (m1, m2, c1, c2).

    ``sums_*``: per-block sums, shape (n_blocks, n_fields, 2); blocks without objects are dropped.
    """
    nonempty = (np.abs(sums_r).sum(axis=(1, 2)) > 0) | (np.abs(sums_e).sum(axis=(1, 2)) > 0)
    se, sr = sums_e[nonempty], sums_r[nonempty]
    k = len(se)
    full = _bias(se.sum(0), sr.sum(0), signs, g_true)
    if k < 2:
        return full, np.full(4, np.nan), k
    dele = _bias(se.sum(0)[None] - se, sr.sum(0)[None] - sr, signs, g_true)
    err = np.sqrt((k - 1) / k * ((dele - dele.mean(0)) ** 2).sum(0))
    return full, err, k


def _paired_jackknife(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], signs: np.ndarray, g_true: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(m1, m2, c1, c2) of the block sums ``a`` minus those of ``b`` and the delete-one-block jackknife error
    of that difference: both deleted together, so the noise the two selections share cancels."""
    (se_a, sr_a), (se_b, sr_b) = a, b
    nonempty = np.zeros(len(se_a), bool)
    for x in (se_a, sr_a, se_b, sr_b):
        nonempty |= np.abs(x).sum(axis=(1, 2)) > 0
    se_a, sr_a, se_b, sr_b = se_a[nonempty], sr_a[nonempty], se_b[nonempty], sr_b[nonempty]
    k = len(se_a)
    tot = [x.sum(0) for x in (se_a, sr_a, se_b, sr_b)]
    full = _bias(tot[0], tot[1], signs, g_true) - _bias(tot[2], tot[3], signs, g_true)
    if k < 2:
        return full, np.full(4, np.nan)
    dele = _bias(tot[0][None] - se_a, tot[1][None] - sr_a, signs, g_true) - _bias(
        tot[2][None] - se_b, tot[3][None] - sr_b, signs, g_true
    )
    err = np.sqrt((k - 1) / k * ((dele - dele.mean(0)) ** 2).sum(0))
    return full, err


def _diff_dict(full: np.ndarray, err: np.ndarray) -> dict[str, float]:
    return dict(
        zip(_DIFF_KEYS, [float(x) for pair in zip(full, err, strict=True) for x in pair], strict=True)
    )


def _bias_dict(full: np.ndarray, err: np.ndarray) -> dict[str, float]:
    keys = ("m1", "m2", "c1", "c2")
    out: dict[str, float] = {}
    for i, k in enumerate(keys):
        out[k] = float(full[i])
        out[f"{k}_err"] = float(err[i])
    return {k: out[k] for k in _BIAS_KEYS}


def measure_paired_bias(
    fields: Sequence[tuple[FieldVariant, Any]],
    g_true: tuple[float, float],
    *,
    bin_edges: Mapping[str, Sequence[float]] | None = None,
    blend_radius_arcsec: float = 1.5,
    min_match_fraction: float = 0.5,
    mer_snr_cuts: Sequence[float] = (),
) -> FieldCalibrationResult:
    """m and c from the per-field catalogs of paired fields (polars frames with :data:`CATALOG_COLUMNS`,
    optionally ``HLR_ARCSEC``, ``NEIGHBOUR_ARCSEC``, ``MASKED_FRACTION``); see the module docstring.

    MER preselection boundary (``mer_snr_cuts``, frames with :data:`MER_SNR_COLUMN`): for every cut, each
    field's rows whose MER detection S/N *in that field's own MER catalog* is below the cut are dropped from that
    field's sums, which is what ``shear.snr_min = cut`` does in prepare (the MER S/N is measured on the sheared
    image, so an object can pass in +g and fail in -g). ``mer_cuts`` lists, for all rows and for isolated rows,
    m and c after the cut and the paired ``dm = m(cut) - m(no cut)`` (likewise dc) with the jackknife error of
    the difference (same objects and noise on both sides, so it is far smaller than that of m). "No cut" is the
    run's own preselection (``shear.snr_min`` of the run): run with 0 to test cuts above the detection threshold.
    Rows without a MER S/N fail every cut (``n_rows_without_mer_snr`` counts them).

    ``detection``: objects listed in some fields' catalogs but not in others (their detection or preselection
    flipped between fields), and ``dm = m(all rows) - m(objects listed in every field)`` with its paired
    error: what the detection boundary contributes where nothing smooth selects the objects first.

    Raises :class:`FieldCalibrationError` when a +g or a -g field is missing, an OBJECT_ID repeats within a
    field, or fewer than ``min_match_fraction`` of the objects are measured in every field (OBJECT_IDs that
    do not follow the truth ids make the pairing meaningless).
    """
    if not fields:
        raise FieldCalibrationError("no fields to calibrate")
    signs = np.array([v.sign for v, _ in fields])
    if not (signs > 0).any() or not (signs < 0).any():
        raise FieldCalibrationError("the paired calibration needs at least one +g and one -g field")
    g = np.asarray(g_true, np.float64)
    for v, df in fields:
        if df["OBJECT_ID"].n_unique() != df.height:
            raise FieldCalibrationError(f"field {v.name}: an OBJECT_ID appears twice in its catalog")
    ids = np.unique(np.concatenate([df["OBJECT_ID"].to_numpy() for _, df in fields]))
    n = len(ids)
    if n == 0:
        raise FieldCalibrationError("the paired fields' catalogs are empty")
    nf = len(fields)
    per = []
    labels = np.full(n, -1, np.int64)
    subtile_keys: dict[tuple[int, int, int], int] = {}
    bin_sum: dict[str, np.ndarray] = {}
    bin_cnt: dict[str, np.ndarray] = {}
    for _v, df in fields:
        index = np.searchsorted(ids, df["OBJECT_ID"].to_numpy())
        per.append(_field_arrays(df, index, n))
        keys = np.column_stack(
            [df["TILE_ID"].to_numpy(), df["SUBTILE_ROW"].to_numpy(), df["SUBTILE_COL"].to_numpy()]
        )
        todo = labels[index] < 0
        for j in np.nonzero(todo)[0]:
            key = (int(keys[j, 0]), int(keys[j, 1]), int(keys[j, 2]))
            labels[index[j]] = subtile_keys.setdefault(key, len(subtile_keys))
        for col in BIN_COLUMNS.values():
            if col not in df.columns:
                continue
            vals = np.asarray(df[col].cast(float).fill_null(np.nan).to_numpy(), np.float64)
            good = np.isfinite(vals)
            s = bin_sum.setdefault(col, np.zeros(n))
            c = bin_cnt.setdefault(col, np.zeros(n))
            np.add.at(s, index[good], vals[good])
            np.add.at(c, index[good], 1.0)
    with np.errstate(invalid="ignore"):
        bin_values = {col: np.where(bin_cnt[col] > 0, bin_sum[col] / bin_cnt[col], np.nan) for col in bin_sum}

    we = np.stack([np.column_stack([p["we1"], p["we2"]]) for p in per], axis=1)  # (n, nf, 2)
    wr = np.stack([np.column_stack([p["wr1"], p["wr2"]]) for p in per], axis=1)
    measured = np.column_stack([p["measured"] for p in per])
    present = np.column_stack([p["present"] for p in per])
    weight = np.column_stack([p["w"] for p in per])
    mer_snr = np.column_stack([p["mer_snr"] for p in per])
    matched = measured.all(axis=1)
    n_matched = int(matched.sum())
    frac = n_matched / max(int(measured.any(axis=1).sum()), 1)
    if frac < min_match_fraction:
        raise FieldCalibrationError(
            f"only {frac:.0%} of the measured objects are measured in all {nf} paired fields: OBJECT_IDs do "
            "not match across fields; the field generator must derive OBJECT_ID from the truth id only"
        )
    n_blocks = len(subtile_keys)

    def block_sums(sel: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-sub-tile sums of w e and w R over the objects ``sel``; ``keep`` (n, n_fields): rows kept."""
        lab = labels[sel]
        wsel, rsel = we[sel], wr[sel]
        if keep is not None:
            wsel = wsel * keep[sel][..., None]
            rsel = rsel * keep[sel][..., None]
        se = np.zeros((n_blocks, nf, 2))
        sr = np.zeros((n_blocks, nf, 2))
        for fi in range(nf):
            for comp in range(2):
                se[:, fi, comp] = np.bincount(lab, weights=wsel[:, fi, comp], minlength=n_blocks)
                sr[:, fi, comp] = np.bincount(lab, weights=rsel[:, fi, comp], minlength=n_blocks)
        return se, sr

    everything = np.ones(n, bool)
    se_all, sr_all = block_sums(everything)
    full, err, k_all = _jackknife(se_all, sr_all, signs, g)
    head = _bias_dict(full, err)
    mfull, merr, _ = _jackknife(*block_sums(matched), signs, g)
    matched_d = {**_bias_dict(mfull, merr), "n_objects": n_matched}

    fields_out: dict[str, dict[str, Any]] = {}
    for fi, (v, df) in enumerate(fields):
        tot_e, tot_r = se_all[:, fi, :].sum(0), sr_all[:, fi, :].sum(0)
        gfield = tot_e / tot_r
        nonempty = sr_all[:, fi, 0] != 0
        k = int(nonempty.sum())
        gerr = np.full(2, np.nan)
        if k >= 2:
            de = (tot_e[None] - se_all[nonempty, fi, :]) / (tot_r[None] - sr_all[nonempty, fi, :])
            gerr = np.sqrt((k - 1) / k * ((de - de.mean(0)) ** 2).sum(0))
        fields_out[v.name] = {
            "sign": v.sign,
            "rotation_deg": v.rotation_deg,
            "g1": float(gfield[0]),
            "g1_err": float(gerr[0]),
            "g2": float(gfield[1]),
            "g2_err": float(gerr[1]),
            "n_rows": int(df.height),
            "n_measured": int(measured[:, fi].sum()),
        }

    bins: list[dict[str, Any]] = []

    def add_bin(variable: str, label: str, lo: float | None, hi: float | None, sel: np.ndarray) -> None:
        if not sel.any():
            bins.append({"variable": variable, "bin": label, "lo": lo, "hi": hi, "n_objects": 0,
                         "n_subtiles": 0, **dict.fromkeys(_BIAS_KEYS, math.nan)})  # fmt: skip
            return
        f_, e_, k_ = _jackknife(*block_sums(sel), signs, g)
        bins.append({"variable": variable, "bin": label, "lo": lo, "hi": hi, "n_objects": int(sel.sum()),
                     "n_subtiles": int(k_), **_bias_dict(f_, e_)})  # fmt: skip

    for variable, edges in (bin_edges or {}).items():
        col = BIN_COLUMNS[variable]
        if col not in bin_values:
            continue
        vals = bin_values[col]
        if not np.isfinite(vals).any():
            continue
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = np.isfinite(vals) & (vals >= lo) & (vals < hi)
            label = f"[{lo:g}, {hi:g})" if hi < 1e29 else f">= {lo:g}"
            add_bin(variable, label, float(lo), float(hi) if hi < 1e29 else None, sel)
    if "NEIGHBOUR_ARCSEC" in bin_values and np.isfinite(bin_values["NEIGHBOUR_ARCSEC"]).any():
        d = bin_values["NEIGHBOUR_ARCSEC"]
        add_bin("blended", "isolated", blend_radius_arcsec, None, np.isfinite(d) & (d >= blend_radius_arcsec))
        add_bin("blended", "blended", 0.0, blend_radius_arcsec, np.isfinite(d) & (d < blend_radius_arcsec))

    subsets = [("all rows", everything)]
    if "NEIGHBOUR_ARCSEC" in bin_values and np.isfinite(bin_values["NEIGHBOUR_ARCSEC"]).any():
        d = bin_values["NEIGHBOUR_ARCSEC"]
        subsets.append(("isolated", np.isfinite(d) & (d >= blend_radius_arcsec)))
    mer_cuts: list[dict[str, Any]] = []
    has_mer = bool(np.isfinite(mer_snr[present]).any())
    for name, subset in subsets if (mer_snr_cuts and has_mer) else []:
        base = block_sums(subset)
        w_total = float(weight[subset].sum())
        for cut in sorted(float(x) for x in mer_snr_cuts):
            with np.errstate(invalid="ignore"):
                keep = mer_snr >= cut  # NaN (no MER S/N) fails
            cut_sums = block_sums(subset, keep)
            f_, e_, k_ = _jackknife(*cut_sums, signs, g)
            d_, de_ = _paired_jackknife(cut_sums, base, signs, g)
            removed = measured & ~keep & subset[:, None]
            mer_cuts.append(
                {
                    "selection": name,
                    "mer_snr_min": cut,
                    "n_objects": int((measured & keep & subset[:, None]).any(axis=1).sum()),
                    "n_rows_removed": int(removed.sum()),
                    "weight_fraction_removed": float(weight[removed].sum() / w_total)
                    if w_total
                    else math.nan,
                    "n_subtiles": int(k_),
                    **_bias_dict(f_, e_),
                    **_diff_dict(d_, de_),
                }
            )

    detection: list[dict[str, Any]] = []
    listed_all = present.all(axis=1)
    partial = present.any(axis=1) & ~listed_all
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: objects without a MER S/N
        best_mer = np.nanmax(np.where(present, mer_snr, np.nan), axis=1)
    for name, subset in subsets:
        if not (listed_all & subset).any():
            continue
        d_, de_ = _paired_jackknife(block_sums(subset), block_sums(subset & listed_all), signs, g)
        w_total = float(weight[subset].sum())
        part = partial & subset
        snr_part = best_mer[part][np.isfinite(best_mer[part])]
        detection.append(
            {
                "selection": name,
                "n_objects_listed_in_some_fields_only": int(part.sum()),
                "n_weighted_rows_of_those": int((measured & part[:, None]).sum()),
                "weight_fraction_of_those": float(weight[part].sum() / w_total) if w_total else math.nan,
                "max_weight_of_those": float(weight[part].max()) if part.any() else 0.0,
                "median_mer_snr_of_those": float(np.median(snr_part)) if len(snr_part) else math.nan,
                "n_rows_without_mer_snr": int((present & ~np.isfinite(mer_snr) & subset[:, None]).sum()),
                **_diff_dict(d_, de_),
            }
        )

    census: list[dict[str, Any]] = []
    if has_mer:
        w_total = float(weight.sum())
        for lo, hi in zip(MER_CENSUS_EDGES[:-1], MER_CENSUS_EDGES[1:], strict=True):
            with np.errstate(invalid="ignore"):
                in_bin = present & (mer_snr >= lo) & (mer_snr < hi)
            nr = int(in_bin.sum())
            census.append(
                {
                    "lo": lo,
                    "hi": None if math.isinf(hi) else hi,
                    "n_rows": nr,
                    "n_weighted": int((in_bin & measured).sum()),
                    "mean_weight": float(weight[in_bin].mean()) if nr else math.nan,
                    "weight_fraction": float(weight[in_bin].sum() / w_total) if w_total else math.nan,
                }
            )

    return FieldCalibrationResult(
        **head,
        mer_cuts=mer_cuts,
        detection=detection,
        mer_snr_census=census,
        n_matched=n_matched,
        n_objects=int(n),
        n_subtiles=int(k_all),
        g_true=(float(g[0]), float(g[1])),
        c_rotated=bool({v.rotation_deg for v, _ in fields if v.sign > 0} == {0.0, 90.0}),
        fields=fields_out,
        matched=matched_d,
        bins=bins,
    )


# --------------------------------------------------------------------------------------------------
# Running the paired fields through the production path


def _simulate_one(cfg_dict: dict) -> None:
    from constellation_assets.config import PipelineConfig
    from constellation_assets.synthetic import simulate_field

    simulate_field(PipelineConfig.model_validate(cfg_dict))


def _run_variant(cfg, v: FieldVariant, vcfg, progress: bool, console, seconds: dict[str, float]):
    from constellation_assets.pipeline import run_local

    t0 = time.perf_counter()
    g1, g2 = cfg.calibration.field_shear_g
    console.log(
        f"[bold]{v.name}[/]: g = ({v.sign * g1:+g}, {v.sign * g2:+g}), intrinsic rotation {v.rotation_deg:g} deg"
    )
    summary = run_local(vcfg, progress=progress, simulate=True, console=console)
    failed = [c.name for c in summary.checks if not c.passed and c.severity == "error"]
    if failed:
        raise FieldCalibrationError(
            f"field {v.name}: catalog checks failed ({', '.join(failed)}) under {vcfg.output.root_uri}; "
            "the catalog is not complete enough to calibrate"
        )
    frame = load_field_catalog(vcfg)
    seconds[v.name] = time.perf_counter() - t0
    return v, frame


def run_field_calibration(
    cfg,
    *,
    progress: bool = True,
    console=None,
    on_field_done: Callable[[str], None] | None = None,
) -> FieldCalibrationResult:
    """Simulate the paired fields, run each through :func:`pipeline.run_local`, and measure m and c.

    The synthetic fields are written first, ``compute.workers`` at a time (each is independent and the
    renderer is single-threaded); ``run_local`` then finds them complete and runs prepare -> infer ->
    assemble -> validate per field. Re-running reuses up-to-date fields and sub-tile results.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from constellation_assets.provenance import config_hash

    _check_field_generator(cfg)
    console = console or Console(stderr=True)
    work = field_work_dir(cfg)
    variants = variants_for(cfg)
    cfgs = {v.name: field_variant_config(cfg, v, work) for v in variants}
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    workers = max(1, min(int(cfg.compute.workers), len(cfgs)))
    console.log(f"[bold]field calibration[/]: {len(cfgs)} paired fields under {work} ({workers} at a time)")
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console, disable=not progress) as bar:
        task = bar.add_task("simulate paired fields", total=len(cfgs))
        if workers == 1:
            for c in cfgs.values():
                _simulate_one(c.model_dump(mode="json"))
                bar.advance(task)
        else:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futs = [pool.submit(_simulate_one, c.model_dump(mode="json")) for c in cfgs.values()]
                for fut in cf.as_completed(futs):
                    fut.result()  # a failing field raises here
                    bar.advance(task)
    seconds["simulate"] = time.perf_counter() - t0

    frames = []
    # One log line per sub-tile (hundreds per field with the fine jackknife grid) would bury the progress
    # bars and the per-stage summaries; the per-sub-tile records still reach the result files' metadata.
    infer_log = logging.getLogger("constellation_assets.shear.infer")
    infer_level = infer_log.level
    infer_log.setLevel(max(infer_level, logging.WARNING))
    try:
        for v in variants:
            frames.append(_run_variant(cfg, v, cfgs[v.name], progress, console, seconds))
            if on_field_done:
                on_field_done(v.name)
    finally:
        infer_log.setLevel(infer_level)

    t0 = time.perf_counter()
    res = measure_paired_bias(
        frames,
        tuple(cfg.calibration.field_shear_g),
        bin_edges=cfg.calibration.field_bin_edges,
        blend_radius_arcsec=cfg.calibration.field_blend_radius_arcsec,
        mer_snr_cuts=cfg.calibration.field_mer_snr_cuts,
    )
    seconds["measure"] = time.perf_counter() - t0
    seconds["total"] = sum(seconds.values())
    res.config_hash = config_hash(cfg, sections=("field", "shear", "calibration", "tiling", "inference"))
    res.work_dir = str(work)
    res.seconds = {k: round(s, 2) for k, s in seconds.items()}
    res.m_requirement = float(cfg.calibration.m_requirement)
    res.c_requirement = float(cfg.calibration.c_requirement)
    return res


# --------------------------------------------------------------------------------------------------
# Presentation


def field_calibration_table(res: FieldCalibrationResult):
    """rich Tables: the headline m, c and the per-bin m, c."""
    from rich.table import Table

    def fmt(v, e):
        if v is None or not math.isfinite(v):
            return "-"
        return f"{v:+.2e} ± {e:.1e}" if e is not None and math.isfinite(e) else f"{v:+.2e}"

    head = Table(
        title=f"Field calibration: {res.n_matched} matched of {res.n_objects} objects, {res.n_subtiles} "
        f"sub-tiles, g_true = ({res.g_true[0]:+g}, {res.g_true[1]:+g})"
    )
    for col in ("selection", "m1", "m2", "c1", "c2"):
        head.add_column(col, justify="right" if col != "selection" else "left")
    head.add_row(
        "all rows", *(fmt(getattr(res, k), getattr(res, f"{k}_err")) for k in ("m1", "m2", "c1", "c2"))
    )
    head.add_row("matched", *(fmt(res.matched[k], res.matched[f"{k}_err"]) for k in ("m1", "m2", "c1", "c2")))
    bins = Table(title="m and c in bins (all rows)")
    for col in ("variable", "bin", "N", "m1", "m2", "c1", "c2"):
        bins.add_column(col, justify="left" if col in ("variable", "bin") else "right")
    for b in res.bins:
        bins.add_row(
            b["variable"],
            b["bin"],
            str(b["n_objects"]),
            *(fmt(b[k], b[f"{k}_err"]) for k in ("m1", "m2", "c1", "c2")),
        )
    return head, bins


def field_calibration_selection_tables(res: FieldCalibrationResult) -> list:
    """rich Tables of the MER preselection boundary: m, c and the paired dm, dc per post-hoc MER S/N cut, and
    the census of rows and FPFS weight per MER S/N bin (empty when the catalogs had no MER S/N)."""
    from rich.table import Table

    def fmt(v, e=None):
        if v is None or not math.isfinite(v):
            return "-"
        return f"{v:+.2e} ± {e:.1e}" if e is not None and math.isfinite(e) else f"{v:+.2e}"

    out = []
    if res.mer_cuts:
        t = Table(title="MER detection S/N cut applied post hoc: m, c and the paired dm = m(cut) - m(no cut)")
        for col in (
            "selection",
            "MER S/N >=",
            "N",
            "rows cut",
            "w cut",
            "m1",
            "m2",
            "dm1",
            "dm2",
            "dc1",
            "dc2",
        ):
            t.add_column(col, justify="left" if col == "selection" else "right")
        for r in res.mer_cuts:
            t.add_row(
                r["selection"],
                f"{r['mer_snr_min']:g}",
                str(r["n_objects"]),
                str(r["n_rows_removed"]),
                f"{r['weight_fraction_removed']:.1e}",
                *(fmt(r[k], r[f"{k}_err"]) for k in ("m1", "m2", "dm1", "dm2", "dc1", "dc2")),
            )
        out.append(t)
    if res.detection:
        t = Table(
            title="Detection boundary: objects listed in some fields only; dm = m(all) - m(listed in every field)"
        )
        cols = ("selection", "objects", "weighted rows", "weight share", "max w", "median MER S/N")
        for col in (*cols, "dm1", "dm2", "dc1", "dc2"):
            t.add_column(col, justify="left" if col == "selection" else "right")
        for d in res.detection:
            med = d["median_mer_snr_of_those"]
            t.add_row(
                d["selection"],
                str(d["n_objects_listed_in_some_fields_only"]),
                str(d["n_weighted_rows_of_those"]),
                f"{d['weight_fraction_of_those']:.1e}",
                f"{d['max_weight_of_those']:.2f}",
                f"{med:.1f}" if med is not None and math.isfinite(med) else "-",
                *(fmt(d[k], d[f"{k}_err"]) for k in ("dm1", "dm2", "dc1", "dc2")),
            )
        out.append(t)
    if res.mer_snr_census:
        t = Table(title="FPFS selection weight per MER detection S/N bin (all fields' rows)")
        for col in ("MER S/N", "rows", "weighted rows", "mean weight", "weight share"):
            t.add_column(col, justify="right")
        for b in res.mer_snr_census:
            hi = "inf" if b["hi"] is None else f"{b['hi']:g}"
            t.add_row(
                f"[{b['lo']:g}, {hi})",
                str(b["n_rows"]),
                str(b["n_weighted"]),
                f"{b['mean_weight']:.3f}" if math.isfinite(b["mean_weight"]) else "-",
                f"{b['weight_fraction']:.1e}",
            )
        out.append(t)
    return out


def field_calibration_figure_png(res: FieldCalibrationResult, m_target: float = 2e-3) -> bytes:
    """PNG: m1, m2 with jackknife errors in every bin, one panel per bin variable, the requirement shaded."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    variables = list(dict.fromkeys(b["variable"] for b in res.bins)) or ["all"]
    fig = Figure(figsize=(2.6 * len(variables) + 1.0, 3.2), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, len(variables), sharey=True))
    for ax, var in zip(axes, variables, strict=True):
        rows = [b for b in res.bins if b["variable"] == var]
        x = np.arange(len(rows))
        for comp, dx, color in (("m1", -0.1, "C0"), ("m2", 0.1, "C1")):
            y = np.array([b[comp] if b[comp] is not None else np.nan for b in rows], float)
            e = np.array([b[f"{comp}_err"] if b[f"{comp}_err"] is not None else np.nan for b in rows], float)
            ax.errorbar(x + dx, y, yerr=e, fmt="o", ms=4, color=color, label=comp)
        ax.axhspan(-m_target, m_target, color="C2", alpha=0.2)
        ax.axhline(res.m1, color="C0", lw=0.6, ls="--")
        ax.axhline(res.m2, color="C1", lw=0.6, ls="--")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(x, [b["bin"] for b in rows], rotation=45, ha="right", fontsize=7)
        ax.set_title(var, fontsize=9)
    axes[0].set_ylabel("m (1-sigma jackknife over sub-tiles)")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"field calibration: m1 = {res.m1:+.2e} ± {res.m1_err:.1e}, m2 = {res.m2:+.2e} ± {res.m2_err:.1e}",
        fontsize=9,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
