"""Euclid MER final catalog reader and the shear-grade source selection.

The MER final catalog (``EUC_MER_FINAL-CAT_TILE{tile_id}-*.fits``) is a FITS binary table. Fluxes are in
microJansky, so AB magnitudes are ``-2.5 log10(flux_uJy) + 23.9``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from constellation_assets.euclid import AB_ZEROPOINT_UJY
from constellation_assets.io.uri import DataAccessError, _translate, is_s3, is_transient_error, open_uri

__all__ = [
    "DERIVED_COLUMNS",
    "DET_QUALITY_REJECT_MASK",
    "MER_COLUMNS",
    "MerCatalogError",
    "flux_to_mag_ab",
    "read_mer_catalog",
    "shear_selection",
]

#: Required MER final catalog columns and the numpy dtype the reader returns them as.
MER_COLUMNS: dict[str, str] = {
    "OBJECT_ID": "int64",
    "RIGHT_ASCENSION": "float64",  # deg
    "DECLINATION": "float64",  # deg
    "FLUX_VIS_PSF": "float64",  # uJy
    "FLUX_DETECTION_TOTAL": "float64",  # uJy
    "FLUXERR_DETECTION_TOTAL": "float64",  # uJy
    "SEMIMAJOR_AXIS": "float64",  # pixels (0.1")
    "ELLIPTICITY": "float64",
    "POSITION_ANGLE": "float64",  # deg
    "KRON_RADIUS": "float64",  # pixels
    "SEGMENTATION_AREA": "int32",  # pixels
    "VIS_DET": "int32",
    "SPURIOUS_FLAG": "int32",
    "POINT_LIKE_FLAG": "int32",
    "DET_QUALITY_FLAG": "int32",
}

#: Columns the reader adds: AB magnitudes (NaN where flux <= 0) and the detection S/N.
DERIVED_COLUMNS: dict[str, str] = {
    "MAG_VIS_PSF": "float64",
    "MAG_DETECTION": "float64",
    "SNR_DETECTION": "float64",
}

_DERIVED_INPUTS: dict[str, tuple[str, ...]] = {
    "MAG_VIS_PSF": ("FLUX_VIS_PSF",),
    "MAG_DETECTION": ("FLUX_DETECTION_TOTAL",),
    "SNR_DETECTION": ("FLUX_DETECTION_TOTAL", "FLUXERR_DETECTION_TOTAL"),
}

#: DET_QUALITY_FLAG bits that reject a source for shear (bits 2, 3, 7, 8, 9, 10).
DET_QUALITY_REJECT_MASK = 0x78C

#: AB zero point of a flux in microJansky.
MAG_AB_ZEROPOINT_UJY = AB_ZEROPOINT_UJY

# Null integers become -1: every shear cut then rejects the row (-1 has all DET_QUALITY bits set).
_INT_NULL = -1


class MerCatalogError(ValueError):
    """A MER catalog file cannot be used. The message names the file and says what to do."""

    def __init__(self, uri: str, problem: str, hint: str = ""):
        self.uri = str(uri)
        msg = f"MER catalog {self.uri}: {problem}"
        if hint:
            msg += f"\n  What to do: {hint}"
        super().__init__(msg)


def flux_to_mag_ab(flux_ujy) -> np.ndarray:
    """AB magnitude of a flux in microJansky; NaN where the flux is <= 0 or not finite."""
    flux = np.asarray(flux_ujy, dtype=np.float64)
    out = np.full(flux.shape, np.nan)
    ok = np.isfinite(flux) & (flux > 0)
    out[ok] = -2.5 * np.log10(flux[ok]) + MAG_AB_ZEROPOINT_UJY
    return out


def _snr(flux, err) -> np.ndarray:
    flux = np.asarray(flux, dtype=np.float64)
    err = np.asarray(err, dtype=np.float64)
    out = np.full(flux.shape, np.nan)
    ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    out[ok] = flux[ok] / err[ok]
    return out


def _convert(raw: np.ndarray, name: str, target: str | None, null) -> tuple[np.ndarray | None, str | None]:
    """Cast a FITS column to the target dtype. Returns (array, None) or (None, why it is mistyped).

    ``null`` is the column's TNULL (integer columns); such values become NaN (floats) or -1 (integers).
    """
    if raw.ndim != 1:
        return None, f"{name} has shape {raw.shape[1:]} per row (expected one value per row)"
    kind = raw.dtype.kind
    mask = raw == null if (null is not None and kind in "iu") else None
    if target is None:
        return (raw.astype(raw.dtype.newbyteorder("=")) if kind in "biuf" else np.asarray(raw)), None
    tdt = np.dtype(target)
    if tdt.kind == "f":
        if kind not in "iuf":
            return None, f"{name} is {raw.dtype} (needs a numeric column)"
        arr = raw.astype(tdt)
        if mask is not None:
            arr[mask] = np.nan
        return arr, None
    # Integer targets take integer or boolean columns, and float columns holding only whole numbers (some
    # products store counts as floats); never OBJECT_ID, whose 19-digit ids a float cannot hold. Values must fit.
    if kind == "f" and name != "OBJECT_ID" and np.all(np.abs(raw) < 2.0**53) and np.all(raw == np.round(raw)):
        raw = raw.astype(np.int64)
        kind = "i"
    if kind not in "iub":
        return None, f"{name} is {raw.dtype} (needs an integer column)"
    good = raw if mask is None else raw[~mask]
    if kind in "iu" and good.size:
        info = np.iinfo(tdt)
        if good.min() < info.min or good.max() > info.max:
            return None, f"{name} has values outside the {tdt} range"
    arr = raw.astype(tdt)
    if mask is not None and mask.any():
        if name == "OBJECT_ID":
            return None, "OBJECT_ID has null values"
        arr[mask] = _INT_NULL
    return arr, None


def _first_table_hdu(hdul, uri: str):
    from astropy.io.fits import BinTableHDU, TableHDU

    for hdu in hdul:
        if isinstance(hdu, BinTableHDU | TableHDU):
            return hdu
    raise MerCatalogError(
        uri,
        "no binary table HDU found",
        "point the config at the MER final catalog (EUC_MER_FINAL-CAT_TILE*.fits), not a mosaic or another product",
    )


def read_mer_catalog(
    uri: str | os.PathLike,
    storage_options: dict | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Read a MER final catalog (local path or s3:// URI) into a typed pyarrow Table.

    ``columns=None`` reads every column of :data:`MER_COLUMNS` (all must be present) and adds
    :data:`DERIVED_COLUMNS`. With ``columns``, those columns are returned in that order (typed as in
    :data:`MER_COLUMNS` when listed there, else as stored; derived names may be requested), followed by the
    derived columns whose inputs are all among them.

    Raises :class:`~constellation_assets.io.uri.DataAccessError` when the file cannot be opened (names the URI)
    and :class:`MerCatalogError` when it is not a readable FITS table or lacks / mistypes columns.
    """
    from astropy.io import fits

    uri = str(uri)
    wanted = list(MER_COLUMNS) if columns is None else list(dict.fromkeys(str(c) for c in columns))
    out_names = list(wanted)
    for name, inputs in _DERIVED_INPUTS.items():
        if name not in out_names and (columns is None or all(i in wanted for i in inputs)):
            out_names.append(name)
    to_read = [c for c in out_names if c not in DERIVED_COLUMNS]
    for name in out_names:
        to_read += [i for i in _DERIVED_INPUTS.get(name, ()) if i not in to_read]

    arrays: dict[str, np.ndarray] = {}
    with open_uri(uri, "rb", storage_options) as fobj:
        try:
            with warnings.catch_warnings():
                # A truncated file would otherwise read as silently short or zero-filled data.
                warnings.filterwarnings("error", message=".*truncated.*")
                with fits.open(fobj, memmap=False, lazy_load_hdus=True) as hdul:
                    hdu = _first_table_hdu(hdul, uri)
                    present = {n.upper(): n for n in hdu.columns.names}
                    missing = [c for c in to_read if c.upper() not in present]
                    if missing:
                        raise MerCatalogError(
                            uri,
                            f"missing column(s) {', '.join(missing)}",
                            "use a MER final catalog (EUC_MER_FINAL-CAT); synthetic catalogs must carry every "
                            "column of constellation_assets.io.mer_catalog.MER_COLUMNS",
                        )
                    data = hdu.data
                    problems = []
                    for name in to_read:
                        col = hdu.columns[present[name.upper()]]
                        arr, why = _convert(np.asarray(data[col.name]), name, MER_COLUMNS.get(name), col.null)
                        if why:
                            problems.append(why)
                        else:
                            arrays[name] = arr
                    if problems:
                        raise MerCatalogError(
                            uri,
                            "mistyped column(s): " + "; ".join(problems),
                            "regenerate the catalog with the dtypes of constellation_assets.io.mer_catalog.MER_COLUMNS",
                        )
        except (MerCatalogError, DataAccessError):
            raise
        except Exception as exc:  # astropy raises OSError, ValueError, TypeError, ... on corrupt files
            if is_s3(uri) and is_transient_error(exc):
                # the store failed (throttling, 5xx, dropped connection) after the retries: not a corrupt file
                raise _translate(exc, uri) from exc
            raise MerCatalogError(
                uri,
                f"not a readable FITS binary table ({type(exc).__name__}: {exc})",
                "the file is corrupt or truncated: download it again (or re-run the step that wrote it)",
            ) from exc

    if "MAG_VIS_PSF" in out_names:
        arrays["MAG_VIS_PSF"] = flux_to_mag_ab(arrays["FLUX_VIS_PSF"])
    if "MAG_DETECTION" in out_names:
        arrays["MAG_DETECTION"] = flux_to_mag_ab(arrays["FLUX_DETECTION_TOTAL"])
    if "SNR_DETECTION" in out_names:
        arrays["SNR_DETECTION"] = _snr(arrays["FLUX_DETECTION_TOTAL"], arrays["FLUXERR_DETECTION_TOTAL"])
    return pa.table({name: pa.array(arrays[name]) for name in out_names})


def _column(table, name: str) -> np.ndarray:
    if isinstance(table, pa.Table):
        return table.column(name).to_numpy()
    return np.asarray(table[name])


def _columns_of(table) -> list[str]:
    if isinstance(table, pa.Table):
        return table.column_names
    if isinstance(table, Mapping):
        return list(table.keys())
    return list(getattr(table, "columns", []))


#: Flag columns every catalog selection reads (shear-grade sources, PSF stars).
SELECTION_FLAG_COLUMNS = ("VIS_DET", "SPURIOUS_FLAG", "POINT_LIKE_FLAG", "DET_QUALITY_FLAG")


def selection_snr(table, what: str) -> np.ndarray:
    """Detection S/N of every row (SNR_DETECTION, else FLUX_DETECTION_TOTAL / FLUXERR_DETECTION_TOTAL; NaN where
    undefined) after checking that ``table`` has the columns a selection needs; ``what`` names the caller."""
    names = set(_columns_of(table))
    need = list(SELECTION_FLAG_COLUMNS)
    if "SNR_DETECTION" not in names:
        need += ["FLUX_DETECTION_TOTAL", "FLUXERR_DETECTION_TOTAL"]
    missing = [c for c in need if c not in names]
    if missing:
        raise KeyError(f"{what} needs column(s) {', '.join(missing)}; read the catalog with read_mer_catalog")
    if "SNR_DETECTION" in names:
        return np.asarray(_column(table, "SNR_DETECTION"), dtype=np.float64)
    return _snr(_column(table, "FLUX_DETECTION_TOTAL"), _column(table, "FLUXERR_DETECTION_TOTAL"))


def shear_selection(table, snr_min: float = 10.0) -> np.ndarray:
    """Shear-grade source mask (Euclid shear community cuts), one bool per row:

    S/N >= snr_min (FLUX_DETECTION_TOTAL / FLUXERR_DETECTION_TOTAL), VIS_DET > 0, SPURIOUS_FLAG == 0,
    POINT_LIKE_FLAG != 1, (DET_QUALITY_FLAG & 0x78C) == 0. Rows with undefined S/N (error <= 0 or NaN) fail.

    ``table``: a pyarrow Table from :func:`read_mer_catalog`, or any mapping of column name -> array
    (a dict, a polars or pandas DataFrame). Uses SNR_DETECTION when present, else computes it.
    """
    snr = selection_snr(table, "shear_selection")
    with np.errstate(invalid="ignore"):
        mask = snr >= float(snr_min)  # NaN compares False
    mask &= np.asarray(_column(table, "VIS_DET")) > 0
    mask &= np.asarray(_column(table, "SPURIOUS_FLAG")) == 0
    mask &= np.asarray(_column(table, "POINT_LIKE_FLAG")) != 1
    mask &= (np.asarray(_column(table, "DET_QUALITY_FLAG")).astype(np.int64) & DET_QUALITY_REJECT_MASK) == 0
    return np.asarray(mask, dtype=bool)
