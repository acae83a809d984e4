"""Q1 file naming, timestamps and folder layout of the synthetic survey; deterministic random streams.

Names follow the real Q1 release (``shared/docs/euclid-q1.md``):

``q1/VIS/{obs_id}/EUC_VIS_SWL-{DET,BKG,WGT}-{obs_id:06d}-{dither:02d}-{exposure}-0000000__{ts}Z.fits``
    one file per exposure (``exposure`` 1 = nominal, 2 = short).
``q1/VIS/{obs_id}/EUC_VIS_GRD-PSF-000-000000-0000000__{ts}Z.fits``
    the observation's PSF model (one file per observation folder).
``q1/catalogs/MER_FINAL_CATALOG/{tile_id}/EUC_MER_FINAL-CAT_TILE{tile_id}-{HASH}_{ts}Z_00.00.fits``
``q1/MER/{tile_id}/{VIS|NISP}/EUC_MER_BGSUB-MOSAIC-{VIS|NIR-Y|NIR-J|NIR-H}_TILE{tile_id}-{HASH}_{ts}Z_00.00.fits``

Timestamps differ per file (readers must list + regex, never build names). Everything random derives from
sha256(seed, ids) (:func:`rng_for`); re-running gives identical files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from typing import Any

import numpy as np

from constellation_assets.euclid import BANDS, canonical_band
from constellation_assets.io.uri import atomic_output, atomic_write_bytes, join_uri

__all__ = [
    "det_file_name",
    "file_timestamp",
    "hash_hex",
    "mer_base_uri_of",
    "mer_file_name",
    "mer_mosaic_file_name",
    "psf_file_name",
    "q1_root_of",
    "rng_for",
    "tile_truth_uri",
    "write_fits",
    "write_parquet",
]


def rng_for(seed: int, *ids: Any) -> np.random.Generator:
    """A PCG64 generator seeded from sha256 of the seed and stable ids (never global RNG state)."""
    key = "|".join(str(x) for x in (seed, *ids)).encode()
    digest = hashlib.sha256(key).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def hash_hex(seed: int, *ids: Any, n: int = 6) -> str:
    """Upper-case hex digest of (seed, ids): the 6-character product hash of MER file names."""
    return hashlib.sha256("|".join(str(x) for x in (seed, *ids)).encode()).hexdigest()[:n].upper()


def file_timestamp(seed: int, *ids: Any) -> str:
    """Deterministic, distinct per file: Q1 processing dates in autumn 2024 with microseconds."""
    r = rng_for(seed, "timestamp", *ids)
    base = dt.datetime(2024, 9, 20, tzinfo=dt.UTC)
    t = base + dt.timedelta(
        seconds=int(r.integers(0, 40 * 86400)), microseconds=int(r.integers(0, 1_000_000))
    )
    return t.strftime("%Y%m%dT%H%M%S.%f")


def det_file_name(kind: str, obs_id: int, dither: int, ts: str, exposure: int = 1) -> str:
    """Q1 VIS frame name; ``kind`` is DET, BKG or WGT, ``exposure`` 1 (nominal) or 2 (short)."""
    if kind not in ("DET", "BKG", "WGT"):
        raise ValueError(f"VIS frame kind must be DET, BKG or WGT, got {kind!r} (the PSF: psf_file_name)")
    if exposure not in (1, 2):
        raise ValueError(f"VIS exposure number must be 1 (nominal) or 2 (short), got {exposure!r}")
    return f"EUC_VIS_SWL-{kind}-{obs_id:06d}-{dither:02d}-{exposure}-0000000__{ts}Z.fits"


def psf_file_name(ts: str) -> str:
    """The per-observation VIS PSF product: ``EUC_VIS_GRD-PSF-000-000000-0000000__{ts}Z.fits``."""
    return f"EUC_VIS_GRD-PSF-000-000000-0000000__{ts}Z.fits"


def mer_file_name(tile_id: int, hash6: str, ts: str) -> str:
    """``EUC_MER_FINAL-CAT_TILE{tile_id}-{HASH}_{ts}Z_00.00.fits``."""
    return f"EUC_MER_FINAL-CAT_TILE{tile_id}-{hash6}_{ts}Z_00.00.fits"


def mer_mosaic_file_name(band: str, tile_id: int, hash6: str, ts: str) -> str:
    """``EUC_MER_BGSUB-MOSAIC-{VIS|NIR-Y|NIR-J|NIR-H}_TILE{tile_id}-{HASH}_{ts}Z_00.00.fits``."""
    return f"EUC_MER_BGSUB-MOSAIC-{BANDS[canonical_band(band)].token}_TILE{tile_id}-{hash6}_{ts}Z_00.00.fits"


def q1_root_of(uri: str) -> str:
    """The ``.../q1`` root above a configured Q1 folder (or the folder's parent when no ``q1`` is in it)."""
    s = str(uri).rstrip("/")
    if "/q1/" in s + "/":
        return (s + "/").split("/q1/", 1)[0] + "/q1"
    return s.rsplit("/", 1)[0] if "/" in s else s


def mer_base_uri_of(cfg) -> str:
    """``{q1 root}/MER/`` next to the configured VIS folder (the Q1 layout)."""
    return join_uri(q1_root_of(cfg.data.vis_base_uri), "MER") + "/"


def tile_truth_uri(cfg, tile_id: int) -> str:
    """Folder of a tile's truth files (``{truth_base}/{tile_id}``, default ``{q1 root}/sim_truth``)."""
    base = cfg.field.truth_base_uri or join_uri(q1_root_of(cfg.data.vis_base_uri), "sim_truth")
    return join_uri(base, str(tile_id))


def write_fits(uri: str, hdus: list, storage_options: dict | None) -> None:
    """Write an HDU list atomically (temp file, then rename/upload): a partial file never appears."""
    from astropy.io import fits

    hl = fits.HDUList(hdus)
    with atomic_output(uri, storage_options, suffix=".fits") as tmp:
        hl.writeto(tmp, overwrite=True, output_verify="silentfix")


def write_parquet(uri: str, columns: dict[str, np.ndarray], storage_options: dict | None) -> None:
    """Write a column dict as one Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(uri, buf.getvalue(), storage_options)
