"""MER final catalog reader (typed columns, magnitudes, errors naming the file) and the shear selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits
from astropy.table import Table

from constellation_assets.io.mer_catalog import (
    DERIVED_COLUMNS,
    MER_COLUMNS,
    MerCatalogError,
    flux_to_mag_ab,
    read_mer_catalog,
    shear_selection,
)
from constellation_assets.io.uri import DataAccessError

# Storage types as a real MER catalog may hold them (big-endian FITS, float32 fluxes, int16 flags).
_FILE_DTYPES = {
    "OBJECT_ID": ">i8",
    "RIGHT_ASCENSION": ">f8",
    "DECLINATION": ">f8",
    "FLUX_VIS_PSF": ">f4",
    "FLUX_DETECTION_TOTAL": ">f4",
    "FLUXERR_DETECTION_TOTAL": ">f4",
    "SEMIMAJOR_AXIS": ">f4",
    "ELLIPTICITY": ">f4",
    "POSITION_ANGLE": ">f4",
    "KRON_RADIUS": ">f4",
    "SEGMENTATION_AREA": ">i4",
    "VIS_DET": ">i2",
    "SPURIOUS_FLAG": ">i2",
    "POINT_LIKE_FLAG": ">i2",
    "DET_QUALITY_FLAG": ">i4",
}

# Hand-made rows, one cut each: (flux_det, fluxerr_det, vis_det, spurious, point_like, det_quality, selected)
_ROWS = [
    (100.0, 5.0, 1, 0, 0, 0, True),  # S/N 20
    (50.0, 5.0, 1, 0, 0, 0, True),  # S/N exactly 10 passes (>=)
    (49.0, 5.0, 1, 0, 0, 0, False),  # S/N 9.8
    (100.0, 0.0, 1, 0, 0, 0, False),  # undefined S/N
    (100.0, 5.0, 0, 0, 0, 0, False),  # not detected in VIS
    (100.0, 5.0, 1, 1, 0, 0, False),  # spurious
    (100.0, 5.0, 1, 0, 1, 0, False),  # point-like
    (100.0, 5.0, 1, 0, 2, 0, True),  # POINT_LIKE_FLAG != 1 passes
    (100.0, 5.0, 1, 0, 0, 0x4, False),  # bit 2 in 0x78C
    (100.0, 5.0, 1, 0, 0, 0x8, False),  # bit 3
    (100.0, 5.0, 1, 0, 0, 0x80, False),  # bit 7
    (100.0, 5.0, 1, 0, 0, 0x400, False),  # bit 10
    (100.0, 5.0, 1, 0, 0, 0x1 | 0x2 | 0x10 | 0x20 | 0x40 | 0x800, True),  # bits outside 0x78C
    (-3.0, 5.0, 1, 0, 0, 0, False),  # negative flux
]


def _catalog(n: int | None = None) -> Table:
    rows = _ROWS if n is None else (_ROWS * (n // len(_ROWS) + 1))[:n]
    n = len(rows)
    t = Table()
    t["OBJECT_ID"] = np.arange(n, dtype=">i8") + 2731173428682078045
    t["RIGHT_ASCENSION"] = np.linspace(52.8, 53.1, n).astype(">f8")
    t["DECLINATION"] = np.linspace(-28.2, -27.8, n).astype(">f8")
    t["FLUX_VIS_PSF"] = np.array([10.0 ** (-0.4 * (m - 23.9)) for m in np.linspace(20, 26, n)], dtype=">f4")
    t["FLUX_DETECTION_TOTAL"] = np.array([r[0] for r in rows], dtype=">f4")
    t["FLUXERR_DETECTION_TOTAL"] = np.array([r[1] for r in rows], dtype=">f4")
    for name in ("SEMIMAJOR_AXIS", "ELLIPTICITY", "POSITION_ANGLE", "KRON_RADIUS"):
        t[name] = np.linspace(0.1, 0.9, n).astype(">f4")
    t["SEGMENTATION_AREA"] = np.arange(n, dtype=">i4") + 20
    for j, name in enumerate(("VIS_DET", "SPURIOUS_FLAG", "POINT_LIKE_FLAG", "DET_QUALITY_FLAG")):
        t[name] = np.array([r[2 + j] for r in rows], dtype=_FILE_DTYPES[name])
    return t


def _write(t: Table, path) -> str:
    t.write(path, format="fits", overwrite=True)
    return str(path)


def test_mer_columns_constant():
    assert set(_FILE_DTYPES) == set(MER_COLUMNS)
    assert MER_COLUMNS["OBJECT_ID"] == "int64" and MER_COLUMNS["DET_QUALITY_FLAG"] == "int32"
    assert all(np.dtype(v) for v in MER_COLUMNS.values())
    assert set(DERIVED_COLUMNS) == {"MAG_VIS_PSF", "MAG_DETECTION", "SNR_DETECTION"}


def test_read_types_and_derived_columns(tmp_path):
    src = _catalog()
    tab = read_mer_catalog(_write(src, tmp_path / "cat.fits"))
    assert isinstance(tab, pa.Table)
    assert tab.column_names == [*MER_COLUMNS, *DERIVED_COLUMNS]
    for name, dtype in {**MER_COLUMNS, **DERIVED_COLUMNS}.items():
        assert tab.schema.field(name).type == pa.from_numpy_dtype(np.dtype(dtype)), name
    np.testing.assert_array_equal(tab["OBJECT_ID"].to_numpy(), np.asarray(src["OBJECT_ID"]))
    flux = np.asarray(src["FLUX_VIS_PSF"], dtype=np.float64)
    np.testing.assert_allclose(
        tab["MAG_VIS_PSF"].to_numpy(), -2.5 * np.log10(flux) + 23.9, rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(tab["MAG_VIS_PSF"].to_numpy()[[0, -1]], [20.0, 26.0], atol=1e-5)
    det = tab["MAG_DETECTION"].to_numpy()
    assert det[0] == pytest.approx(23.9 - 5.0) and np.isnan(det[-1])  # 100 uJy -> 18.9; flux < 0 -> NaN
    snr = tab["SNR_DETECTION"].to_numpy()
    assert snr[0] == pytest.approx(20.0) and snr[1] == pytest.approx(10.0) and np.isnan(snr[3])


def test_flux_to_mag():
    np.testing.assert_allclose(flux_to_mag_ab([1.0, 10.0, 3631e6]), [23.9, 21.4, 0.0], atol=2e-4)
    assert np.isnan(flux_to_mag_ab([0.0, -1.0, np.nan])).all()


def test_shear_selection_matches_hand_computed_rows(tmp_path):
    tab = read_mer_catalog(_write(_catalog(), tmp_path / "cat.fits"))
    expect = np.array([r[-1] for r in _ROWS])
    mask = shear_selection(tab)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expect)
    # Same cuts from a plain mapping without the derived S/N column, and a different threshold.
    cols = {n: tab[n].to_numpy() for n in tab.column_names if n != "SNR_DETECTION"}
    np.testing.assert_array_equal(shear_selection(cols), expect)
    loose = shear_selection(tab, snr_min=9.0)
    assert loose[2] and loose.sum() == expect.sum() + 1
    with pytest.raises(KeyError, match="VIS_DET"):
        shear_selection({"SNR_DETECTION": np.ones(2)})


def test_columns_subset(tmp_path):
    path = _write(_catalog(), tmp_path / "cat.fits")
    tab = read_mer_catalog(path, columns=["OBJECT_ID", "SNR_DETECTION"])
    assert tab.column_names == ["OBJECT_ID", "SNR_DETECTION"]
    tab = read_mer_catalog(path, columns=["FLUX_DETECTION_TOTAL", "FLUXERR_DETECTION_TOTAL"])
    assert tab.column_names == [
        "FLUX_DETECTION_TOTAL",
        "FLUXERR_DETECTION_TOTAL",
        "MAG_DETECTION",
        "SNR_DETECTION",
    ]


def test_null_flags_are_rejected_by_the_selection(tmp_path):
    src = _catalog()
    path = _write(src, tmp_path / "cat.fits")
    with fits.open(path, mode="update") as hdul:
        hdul[1].columns["SPURIOUS_FLAG"].null = -32768
        hdul[1].header["TNULL13"] = -32768
        hdul[1].data["SPURIOUS_FLAG"][0] = -32768
    tab = read_mer_catalog(path)
    assert tab["SPURIOUS_FLAG"].to_numpy()[0] == -1
    assert not shear_selection(tab)[0] and shear_selection(tab)[1]


def test_missing_file_names_the_uri(tmp_path):
    missing = tmp_path / "EUC_MER_FINAL-CAT_TILE102044185-ABC_00.00.fits"
    with pytest.raises(DataAccessError, match="EUC_MER_FINAL-CAT_TILE102044185-ABC"):
        read_mer_catalog(missing)


def test_missing_and_mistyped_columns_name_columns_and_file(tmp_path):
    t = _catalog()
    del t["VIS_DET"]
    del t["KRON_RADIUS"]
    path = _write(t, tmp_path / "nocols.fits")
    with pytest.raises(MerCatalogError, match=r"nocols\.fits.*KRON_RADIUS, VIS_DET") as exc:
        read_mer_catalog(path)
    assert "What to do" in str(exc.value)
    t = _catalog()
    t["DET_QUALITY_FLAG"] = np.asarray(t["DET_QUALITY_FLAG"], dtype=float) + 0.5
    t["RIGHT_ASCENSION"] = np.array(["x"] * len(t))
    path = _write(t, tmp_path / "badtypes.fits")
    with pytest.raises(MerCatalogError, match=r"badtypes\.fits.*RIGHT_ASCENSION.*DET_QUALITY_FLAG"):
        read_mer_catalog(path)
    # Whole-number floats in flag columns are accepted (some products store counts as floats).
    t = _catalog()
    t["VIS_DET"] = np.asarray(t["VIS_DET"], dtype=">f4")
    tab = read_mer_catalog(_write(t, tmp_path / "floatflags.fits"))
    assert tab.schema.field("VIS_DET").type == pa.int32()


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.fits"
    bad.write_bytes(b"this is not FITS" * 400)
    with pytest.raises(MerCatalogError, match=r"corrupt\.fits.*not a readable FITS"):
        read_mer_catalog(bad)
    path = _write(_catalog(2000), tmp_path / "cat.fits")
    data = Path(path).read_bytes()
    trunc = tmp_path / "truncated.fits"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(MerCatalogError, match=r"truncated\.fits"):
        read_mer_catalog(trunc)
    image_only = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((4, 4), dtype=np.float32)).writeto(image_only)
    with pytest.raises(MerCatalogError, match=r"image\.fits.*no binary table"):
        read_mer_catalog(image_only)


def test_read_from_s3(moto_s3, tmp_path):
    path = _write(_catalog(), tmp_path / "cat.fits")
    key = "q1/catalogs/MER_FINAL_CATALOG/102044185/EUC_MER_FINAL-CAT_TILE102044185-ABC123_20241018T214045.289017Z_00.00.fits"
    moto_s3["client"].upload_file(path, moto_s3["bucket"], key)
    uri = f"s3://{moto_s3['bucket']}/{key}"
    tab = read_mer_catalog(uri, storage_options=moto_s3["storage_options"])
    local = read_mer_catalog(path)
    assert tab.schema == local.schema
    for name in local.column_names:
        np.testing.assert_array_equal(tab[name].to_numpy(), local[name].to_numpy())
    with pytest.raises(DataAccessError, match="NOPE"):
        read_mer_catalog(uri.replace("ABC123", "NOPE"), storage_options=moto_s3["storage_options"])
