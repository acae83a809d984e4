"""Euclid Q1 discovery, the VIS quadrant footprint index, and HDU byte-range reads.

Discovery lists folders and matches file names with regular expressions; timestamps are read from the names,
never constructed. The same code runs on a local copy, on the public bucket (``s3://nasa-irsa-euclid-q1``,
anonymous) and on any S3-compatible store (``endpoint_url``).

A real DET file is ~7.3 GB (144 quadrants x SCI/RMS/FLG). The index reads **headers only**: it walks the FITS
structure with small range requests (each header is a few 2880-byte blocks; data sizes follow from BITPIX
and NAXISn, so the next HDU's offset is known without reading data). Per quadrant it records the byte offsets
of every HDU in the DET/BKG/WGT/PSF files and the footprint from the SCI header's WCS (TPV/TAN via astropy).
:func:`read_quadrant` then fetches exactly one HDU (header + data) with one range request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from constellation_assets.euclid import VIS_EXPTIME_NOMINAL_S
from constellation_assets.io.uri import (
    DataAccessError,
    atomic_write_bytes,
    get_fs,
    join_uri,
    list_uri,
    read_bytes,
)

log = logging.getLogger(__name__)

__all__ = [
    "DET_RE",
    "HDU_TABLES",
    "HduTableCache",
    "INDEX_SCHEMA",
    "MER_MOSAIC_RE",
    "MER_RE",
    "MosaicCutout",
    "MosaicInfo",
    "PRIMARY_FALLBACK_KEYS",
    "PSF_RE",
    "PsfGridLayout",
    "Q1FormatError",
    "QuadrantData",
    "QuadrantHeader",
    "ReadStats",
    "SHORT_EXPOSURE_INDEX",
    "VIS_FOCAL_PLANE_SPAN_DEG",
    "VisExposure",
    "build_quadrant_index",
    "count_reads",
    "default_mer_base_uri",
    "discover_mer_catalog",
    "discover_mer_mosaics",
    "discover_observations",
    "discover_vis_exposures",
    "exposure_entry",
    "exposure_may_overlap",
    "exposure_quadrant_headers",
    "exposure_reference_position",
    "exposure_with_exptime",
    "exptime_s",
    "fits_hdu_offsets",
    "hdu_candidates",
    "hdu_table",
    "header_float",
    "index_exposure",
    "magzerop",
    "mer_band_name",
    "primary_header",
    "psf_grid_layout",
    "psf_grid_stamps",
    "quadrant_box",
    "quadrants_overlapping",
    "read_exposure_quadrant",
    "read_hdu",
    "read_mosaic_cutout",
    "read_mosaic_info",
    "read_quadrant",
    "read_quadrant_hdus",
    "read_quadrant_row",
    "read_stats",
    "vis_exposure_of",
    "zero_point_mag",
]

FITS_BLOCK = 2880
#: How much to fetch per header request (most VIS headers fit in 2-4 blocks).
_HEADER_CHUNK = 4 * FITS_BLOCK

#: ``EUC_VIS_SWL-DET-002704-00-2-0000000__20241017T042759.344384Z.fits`` (DET / BKG / WGT): observation,
#: dither, exposure within the dither (1: nominal ~560 s; 2: short ~90 s), processing timestamp.
DET_RE = re.compile(
    r"^EUC_VIS_SWL-(?P<kind>DET|BKG|WGT)-(?P<obs_id>\d{6})-(?P<dither>\d{2})-(?P<exposure>\d)-"
    r"(?P<rest>[0-9A-Za-z-]*?)__(?P<ts>\d{8}T\d{6}(?:\.\d+)?)Z\.fits(?:\.gz)?$"
)
#: ``EUC_VIS_GRD-PSF-000-000000-0000000__20240322T192915.424564Z.fits``: the VIS PSF model, one file per
#: observation folder, shared by all its exposures.
PSF_RE = re.compile(
    r"^EUC_VIS_GRD-PSF-(?P<body>[0-9A-Za-z-]*?)__(?P<ts>\d{8}T\d{6}(?:\.\d+)?)Z\.fits(?:\.gz)?$"
)
#: ``EUC_MER_FINAL-CAT_TILE102044185-95D31A_20240924T033645.917365Z_00.00.fits``
MER_RE = re.compile(
    r"^EUC_MER_FINAL-CAT_TILE(?P<tile_id>\d{9})-(?P<hash>[0-9A-Za-z]+)_(?P<ts>\d{8}T\d{6}(?:\.\d+)?)Z"
    r"_(?P<version>\d{2}\.\d{2})\.fits(?:\.gz)?$"
)
#: Quadrant extension names: ``3-4.F.SCI`` in DET files; BKG/WGT/PSF files may use ``3-4.F`` or a suffix.
_EXT_RE = re.compile(r"^(?P<ccd>\d-\d)\.(?P<quad>[EFGH])(?:\.(?P<kind>[A-Z]+))?$")

#: Exposure index (the digit after the dither in a DET name) of the short (~90 s) exposures of a VIS sequence.
SHORT_EXPOSURE_INDEX = 2


class Q1FormatError(DataAccessError):
    """A Q1 file exists but is not the FITS structure expected (corrupt, truncated, wrong product)."""


@dataclasses.dataclass(frozen=True)
class VisExposure:
    """One VIS exposure: one DET file and its companions (BKG/WGT of the same exposure, the observation's PSF).

    ``exposure`` is the index after the dither in the file name (1: nominal, 2: short); ``exptime_s`` is the
    header EXPTIME once a header has been read (None from a listing alone). Missing companions are None.
    """

    obs_id: int
    dither: int
    det_uri: str
    bkg_uri: str | None
    wgt_uri: str | None
    psf_uri: str | None
    timestamp: str  # from the DET file name
    exposure: int = 1
    exptime_s: float | None = None

    @property
    def key(self) -> str:
        """``"{obs_id}-{dither}-{exposure}"``: unique per DET file of one processing version."""
        return f"{self.obs_id}-{self.dither}-{self.exposure}"

    @property
    def is_short(self) -> bool:
        """A short exposure by its name (index :data:`SHORT_EXPOSURE_INDEX`); EXPTIME confirms it when read."""
        return self.exposure == SHORT_EXPOSURE_INDEX

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def discover_observations(vis_base_uri: str, storage_options: dict | None = None) -> list[int]:
    """Observation ids: the numeric folder names below ``vis_base_uri`` (``q1/VIS/{obs_id}/``)."""
    out = []
    for entry in list_uri(vis_base_uri, storage_options):
        name = _basename(entry)
        if name.isdigit():
            out.append(int(name))
    return sorted(set(out))


#: Column names accepted for the tile and the observation of a tile association table (case-insensitive):
#: IRSA's ``euclid.tileid_association_q1`` export and our own spellings.
ASSOCIATION_TILE_COLUMNS = ("tileid", "tile_id", "tile_index", "tile")
ASSOCIATION_OBS_COLUMNS = ("obsid", "obs_id", "observation_id", "observation", "obs")

_ASSOCIATIONS: dict[tuple, dict[int, list[int]]] = {}


def _association_column(names: Sequence[str], accepted: Sequence[str], uri: str, what: str) -> str:
    lower = {n.lower(): n for n in names}
    for a in accepted:
        if a in lower:
            return lower[a]
    raise Q1FormatError(
        uri,
        f"no {what} column in the tile association table (columns: {', '.join(names) or 'none'})",
        f"name it one of {', '.join(accepted)} (IRSA's euclid.tileid_association_q1 export has them), "
        "or unset data.tile_association_uri to find observations from their pointings",
    )


def read_tile_association(uri: str, storage_options: dict | None = None) -> dict[int, list[int]]:
    """Tile id -> sorted observation ids, from a CSV or Parquet table (e.g. IRSA ``euclid.tileid_association_q1``).

    One row per (tile, observation) pair; other columns are ignored. Read once per process and file
    version (a rewritten file is read again), so a run over many tiles costs one read.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from constellation_assets.io.uri import get_fs

    fs, path = get_fs(uri, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataAccessError(
            uri,
            "Not found",
            "data.tile_association_uri must name a CSV or Parquet table of (tile id, observation id) pairs; "
            "export IRSA's euclid.tileid_association_q1 there, or unset it to use the pointing pre-filter",
        ) from None
    except Exception as exc:
        raise DataAccessError(
            uri, f"cannot read ({type(exc).__name__}: {exc})", "check the location and credentials"
        ) from exc
    key = (str(uri), info.get("ETag") or info.get("mtime") or info.get("LastModified"), info.get("size"))
    cached = _ASSOCIATIONS.get(key)
    if cached is not None:
        return cached
    raw = read_bytes(uri, storage_options)
    try:
        if raw[:4] == b"PAR1":
            table = pq.read_table(io.BytesIO(raw))
        else:
            table = pacsv.read_csv(io.BytesIO(raw))
    except Exception as exc:
        raise Q1FormatError(
            uri,
            f"not a readable CSV or Parquet table ({type(exc).__name__}: {exc})",
            "write the association as CSV (header row) or Parquet",
        ) from exc
    tcol = _association_column(table.column_names, ASSOCIATION_TILE_COLUMNS, uri, "tile id")
    ocol = _association_column(table.column_names, ASSOCIATION_OBS_COLUMNS, uri, "observation id")
    try:
        tiles = np.asarray(table.column(tcol).to_numpy(zero_copy_only=False), dtype=np.int64)
        obs = np.asarray(table.column(ocol).to_numpy(zero_copy_only=False), dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise Q1FormatError(
            uri, f"tile and observation ids must be integers ({exc})", "fix the table"
        ) from exc
    out: dict[int, set[int]] = {}
    for t, o in zip(tiles.tolist(), obs.tolist(), strict=True):
        out.setdefault(int(t), set()).add(int(o))
    result = {t: sorted(v) for t, v in out.items()}
    _ASSOCIATIONS.clear()  # one table per process is the use; keep memory bounded
    _ASSOCIATIONS[key] = result
    return result


def tile_observations(tile_id: int, association_uri: str, storage_options: dict | None = None) -> list[int]:
    """The observation ids of ``tile_id`` in the association table; [] when the tile has none."""
    assoc = read_tile_association(association_uri, storage_options)
    obs = assoc.get(int(tile_id), [])
    if not obs:
        log.warning(
            "tile %s has no observations in the tile association table %s (%d tiles listed): no VIS exposures",
            tile_id,
            association_uri,
            len(assoc),
        )
    return obs


def tile_association_from_index(index: pa.Table, boxes: Mapping[int, Any]) -> dict[int, list[int]]:
    """Tile id -> ids of the observations with a quadrant overlapping the tile's box (``{tile_id: SkyBox}``).

    The association IRSA publishes for Q1, derived from a quadrant index (e.g. for data without one).
    """
    out = {}
    for tile_id, box in boxes.items():
        obs = quadrants_overlapping(index, box).column("obs_id").to_pylist()
        out[int(tile_id)] = sorted({int(o) for o in obs})
    return out


def write_tile_association(
    uri: str, assoc: Mapping[int, Iterable[int]], storage_options: dict | None = None
) -> str:
    """Write ``{tile_id: observation ids}`` as the CSV :func:`read_tile_association` reads (atomically)."""
    lines = ["tileid,obsid"] + [f"{int(t)},{int(o)}" for t in sorted(assoc) for o in sorted(assoc[t])]
    atomic_write_bytes(uri, ("\n".join(lines) + "\n").encode(), storage_options)
    return uri


def _latest(candidates: list[tuple[str, str]], what: str) -> str:
    """Pick the newest (timestamp, uri) of ONE product: several timestamps are reprocessing versions."""
    candidates = sorted(candidates)
    if len(candidates) > 1:
        log.warning(
            "%s: %d processing versions, using the newest %s (ignoring %s)",
            what,
            len(candidates),
            _basename(candidates[-1][1]),
            ", ".join(_basename(u) for _, u in candidates[:-1]),
        )
    return candidates[-1][1]


def _discover_folder(folder: str, obs_id: int, storage_options: dict | None) -> list[VisExposure]:
    """Every DET file of one observation folder with its BKG/WGT (same dither and exposure) and PSF file."""
    files: dict[tuple[str, int, int], list[tuple[str, str]]] = {}
    psf_obs: list[tuple[str, str]] = []
    for uri in list_uri(folder, storage_options):
        name = _basename(uri)
        m = DET_RE.match(name)
        if m:
            if int(m["obs_id"]) != obs_id:
                log.warning("skipping %s: obs_id in the name differs from its folder %s", uri, obs_id)
                continue
            files.setdefault((m["kind"], int(m["dither"]), int(m["exposure"])), []).append((m["ts"], uri))
            continue
        m = PSF_RE.match(name)
        if m:
            psf_obs.append((m["ts"], uri))
    psf = _latest(psf_obs, f"PSF of observation {obs_id}") if psf_obs else None
    out: list[VisExposure] = []
    for _kind, d, e in sorted(k for k in files if k[0] == "DET"):
        what = f"observation {obs_id} dither {d} exposure {e}"
        det = _latest(files[("DET", d, e)], f"DET of {what}")

        def pick(kind, d=d, e=e, what=what):
            c = files.get((kind, d, e))
            return _latest(c, f"{kind} of {what}") if c else None

        exp = VisExposure(
            obs_id, d, det, pick("BKG"), pick("WGT"), psf, DET_RE.match(_basename(det))["ts"], exposure=e
        )
        missing = [
            k for k, v in (("BKG", exp.bkg_uri), ("WGT", exp.wgt_uri), ("PSF", exp.psf_uri)) if v is None
        ]
        if missing:
            log.warning("%s: no %s file found in %s", what, "/".join(missing), folder)
        out.append(exp)
    return out


def discover_vis_exposures(
    vis_base_uri: str,
    obs_ids: Iterable[int] | None = None,
    storage_options: dict | None = None,
    *,
    include_short_exposures: bool = True,
) -> list[VisExposure]:
    """One :class:`VisExposure` per DET file, with its BKG/WGT/PSF files, found by listing + regex.

    A dither holds up to two exposures, ``-{dither}-1-`` (nominal, ~560 s) and ``-{dither}-2-`` (short,
    ~90 s): each is its own exposure, paired with the BKG/WGT of the same (obs, dither, exposure). Only
    several timestamps of the SAME (obs, dither, exposure, kind) are processing versions: the newest is kept
    and the others are logged. The observation's PSF file (``EUC_VIS_GRD-PSF-...``, one per folder) is shared
    by all its exposures.

    ``include_short_exposures``: short exposures are real photons (~16 % more depth), measured with their
    own noise level and PSF and combined by inverse variance, so they are used by default. ``False`` drops
    exactly the exposures with index :data:`SHORT_EXPOSURE_INDEX` (e.g. to match SHINE, which keeps the
    ``-1-`` ones), and says so in the log.
    """
    obs_list = (
        discover_observations(vis_base_uri, storage_options) if obs_ids is None else sorted(set(obs_ids))
    )
    out: list[VisExposure] = []
    for obs_id in obs_list:
        out += _discover_folder(join_uri(vis_base_uri, str(obs_id)), obs_id, storage_options)
    if not include_short_exposures:
        short = [e for e in out if e.is_short]
        if short:
            log.info(
                "data.include_short_exposures is false: excluding %d short exposures (exposure index %d): %s",
                len(short),
                SHORT_EXPOSURE_INDEX,
                ", ".join(_basename(e.det_uri) for e in short),
            )
        out = [e for e in out if not e.is_short]
    return out


def vis_exposure_of(det_uri: str, storage_options: dict | None = None) -> VisExposure:
    """The :class:`VisExposure` (paired BKG/WGT/PSF) of one DET file, from a listing of its folder."""
    name = _basename(det_uri)
    m = DET_RE.match(name)
    if not m or m["kind"] != "DET":
        raise DataAccessError(
            str(det_uri),
            "Not a VIS DET file name (EUC_VIS_SWL-DET-{obs:06d}-{dither:02d}-{exposure}-...__{ts}Z.fits)",
            "pass the URI of a Q1 VIS calibrated frame",
        )
    folder = str(det_uri)[: len(str(det_uri)) - len(name)].rstrip("/")
    for exp in _discover_folder(folder, int(m["obs_id"]), storage_options):
        if _basename(exp.det_uri) == name:
            return exp
        if (exp.dither, exp.exposure) == (int(m["dither"]), int(m["exposure"])):
            # ``det_uri`` is an older processing version of this exposure: keep the file asked for.
            return dataclasses.replace(exp, det_uri=str(det_uri), timestamp=m["ts"])
    raise DataAccessError(str(det_uri), "DET file not found in its folder listing", "check the URI")


def discover_mer_catalog(catalog_base_uri: str, tile_id: int, storage_options: dict | None = None) -> str:
    """The MER final catalog of a tile (newest timestamp, then highest version) under ``{base}/{tile_id}/``."""
    folder = join_uri(catalog_base_uri, str(int(tile_id)))
    cands = []
    for uri in list_uri(folder, storage_options):
        m = MER_RE.match(_basename(uri))
        if m and int(m["tile_id"]) == int(tile_id):
            cands.append((m["ts"], m["version"], uri))
    if not cands:
        raise DataAccessError(
            folder,
            f"No MER final catalog (EUC_MER_FINAL-CAT_TILE{tile_id}-*.fits) for tile {tile_id}",
            "check data.catalog_base_uri and the tile id (or run `constellation simulate-field` for the demo)",
        )
    cands.sort()
    return cands[-1][2]


# ----------------------------------------------------------------------------------------------- FITS walk


@dataclasses.dataclass
class ReadStats:
    """Range requests made through :func:`_read_range`: their number, the bytes returned and, for a
    :func:`count_reads` block, each request as ``(path, start, end)``."""

    requests: int = 0
    bytes: int = 0
    ranges: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)


#: Totals of this process (no per-request list); :func:`read_stats` returns a copy.
_READ_TOTALS = ReadStats()
#: The stats of the open :func:`count_reads` blocks (every block sees every read of the process).
_READ_BLOCKS: list[ReadStats] = []
_READ_LOCK = threading.Lock()


def read_stats() -> ReadStats:
    """Range requests and bytes read by this process so far (a snapshot: subtract two for a block)."""
    with _READ_LOCK:
        return ReadStats(_READ_TOTALS.requests, _READ_TOTALS.bytes)


@contextlib.contextmanager
def count_reads() -> Iterator[ReadStats]:
    """Count the range requests of a block (all threads of the process), each recorded with its range::

    with count_reads() as reads:
        ...
    print(reads.requests, reads.bytes, reads.ranges)
    """
    stats = ReadStats()
    with _READ_LOCK:
        _READ_BLOCKS.append(stats)
    try:
        yield stats
    finally:
        with _READ_LOCK:
            _READ_BLOCKS.remove(stats)


def _read_range(fs, path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: the single choke point of all index/quadrant reads (counted:
    :func:`read_stats`, :func:`count_reads`)."""
    data = fs.cat_file(path, start=start, end=end)
    with _READ_LOCK:
        _READ_TOTALS.requests += 1
        _READ_TOTALS.bytes += len(data)
        for stats in _READ_BLOCKS:
            stats.requests += 1
            stats.bytes += len(data)
            stats.ranges.append((str(path), int(start), int(end)))
    return data


def _parse_header(raw: bytes, uri: str, offset: int):
    """(astropy Header, header length in bytes) from bytes starting at an HDU; None if END is not inside."""
    from astropy.io import fits

    for blk in range(len(raw) // FITS_BLOCK):
        block = raw[blk * FITS_BLOCK : (blk + 1) * FITS_BLOCK]
        for c in range(0, FITS_BLOCK, 80):
            card = block[c : c + 80]
            if card[:8] == b"END     ":
                n = (blk + 1) * FITS_BLOCK
                try:
                    text = raw[:n].decode("ascii")
                except UnicodeDecodeError as exc:
                    raise Q1FormatError(
                        uri, f"Non-ASCII FITS header at byte {offset}", _CORRUPT_HINT
                    ) from exc
                return fits.Header.fromstring(text), n
    return None


_CORRUPT_HINT = "the file is corrupt or truncated: download it again (or re-run the step that wrote it)"


def _data_size(h) -> int:
    naxis = int(h.get("NAXIS", 0))
    if naxis == 0:
        return 0
    n = 1
    for i in range(1, naxis + 1):
        n *= int(h[f"NAXIS{i}"])
    size = abs(int(h["BITPIX"])) // 8 * int(h.get("GCOUNT", 1)) * (int(h.get("PCOUNT", 0)) + n)
    return size


def _padded(n: int) -> int:
    return (n + FITS_BLOCK - 1) // FITS_BLOCK * FITS_BLOCK


@dataclasses.dataclass(frozen=True)
class HduInfo:
    index: int
    name: str
    header_offset: int
    data_offset: int
    data_size: int
    header: Any  # astropy Header


def fits_hdu_offsets(
    uri: str, storage_options: dict | None = None, stop: Callable[[HduInfo], bool] | None = None
) -> list[HduInfo]:
    """Walk a FITS file's HDUs reading only headers (range requests); data are skipped by size.

    ``stop``: end the walk after the first HDU for which it is true (that HDU included).
    """
    fs, path = get_fs(uri, storage_options)
    try:
        size = int(fs.size(path))
    except FileNotFoundError as exc:
        raise DataAccessError(uri, "Not found", "check the path/URI and that the data exists") from exc
    except Exception as exc:
        raise DataAccessError(
            uri, f"Could not access ({type(exc).__name__}: {exc})", "check the location"
        ) from exc
    out: list[HduInfo] = []
    offset = 0
    while offset < size:
        raw = b""
        parsed = None
        while parsed is None:
            if offset + len(raw) >= size:
                raise Q1FormatError(
                    uri, f"Truncated FITS header at byte {offset} (no END card)", _CORRUPT_HINT
                )
            raw += _read_range(fs, path, offset + len(raw), min(size, offset + len(raw) + _HEADER_CHUNK))
            if len(raw) < FITS_BLOCK:
                raise Q1FormatError(uri, f"Truncated FITS file at byte {offset}", _CORRUPT_HINT)
            parsed = _parse_header(raw[: len(raw) // FITS_BLOCK * FITS_BLOCK], uri, offset)
        header, hlen = parsed
        first = "SIMPLE" if not out else "XTENSION"
        if first not in header:
            raise Q1FormatError(
                uri,
                f"Not a FITS file (HDU {len(out)} at byte {offset} has no {first} card)",
                _CORRUPT_HINT,
            )
        dsize = _data_size(header)
        name = str(header.get("EXTNAME", "PRIMARY" if not out else "")).strip()
        out.append(HduInfo(len(out), name, offset, offset + hlen, dsize, header))
        if stop is not None and stop(out[-1]):
            break
        offset += hlen + _padded(dsize)
        if offset > size:
            raise Q1FormatError(
                uri,
                f"Truncated FITS file: HDU {name or len(out) - 1} needs {offset} bytes, file has {size}",
                _CORRUPT_HINT,
            )
    return out


# ----------------------------------------------------------------------------------------------- index

INDEX_SCHEMA = pa.schema(
    [
        ("obs_id", pa.int64()),
        ("dither", pa.int32()),
        ("exposure", pa.int32()),
        ("ccd", pa.string()),
        ("quadrant", pa.string()),
        ("det_id", pa.string()),
        ("sci_hdu", pa.string()),
        ("rms_hdu", pa.string()),
        ("flg_hdu", pa.string()),
        ("bkg_hdu", pa.string()),
        ("wgt_hdu", pa.string()),
        ("psf_hdu", pa.string()),
        ("sci_header_offset", pa.int64()),
        ("sci_data_offset", pa.int64()),
        ("sci_data_size", pa.int64()),
        ("rms_header_offset", pa.int64()),
        ("rms_data_offset", pa.int64()),
        ("rms_data_size", pa.int64()),
        ("flg_header_offset", pa.int64()),
        ("flg_data_offset", pa.int64()),
        ("flg_data_size", pa.int64()),
        ("bkg_header_offset", pa.int64()),
        ("bkg_data_offset", pa.int64()),
        ("bkg_data_size", pa.int64()),
        ("wgt_header_offset", pa.int64()),
        ("wgt_data_offset", pa.int64()),
        ("wgt_data_size", pa.int64()),
        ("psf_header_offset", pa.int64()),
        ("psf_data_offset", pa.int64()),
        ("psf_data_size", pa.int64()),
        ("naxis1", pa.int32()),
        ("naxis2", pa.int32()),
        ("ra_center", pa.float64()),
        ("dec_center", pa.float64()),
        ("corner_ra", pa.list_(pa.float64(), 4)),
        ("corner_dec", pa.list_(pa.float64(), 4)),
        ("ra_min", pa.float64()),
        ("ra_max", pa.float64()),
        ("dec_min", pa.float64()),
        ("dec_max", pa.float64()),
        ("sci_path", pa.string()),
        ("bkg_path", pa.string()),
        ("wgt_path", pa.string()),
        ("psf_path", pa.string()),
        ("timestamp", pa.string()),
        ("exptime_s", pa.float64()),
    ]
)


def _by_det_id(hdus: Sequence[HduInfo], default_kind: str) -> dict[tuple[str, str], HduInfo]:
    out = {}
    for h in hdus:
        m = _EXT_RE.match(h.name)
        if m:
            out[(f"{m['ccd']}.{m['quad']}", m["kind"] or default_kind)] = h
    return out


def _footprint(header) -> tuple[float, float, list[float], list[float]]:
    """Centre and corner RA/Dec (deg) of a quadrant from its WCS header alone (pixel-edge corners)."""
    import warnings

    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(header)
    nx, ny = int(header["NAXIS1"]), int(header["NAXIS2"])
    px = np.array([0.5, nx + 0.5, nx + 0.5, 0.5, (nx + 1) / 2.0])
    py = np.array([0.5, 0.5, ny + 0.5, ny + 0.5, (ny + 1) / 2.0])
    ra, dec = w.all_pix2world(px, py, 1)
    return (
        float(ra[4]) % 360.0,
        float(dec[4]),
        [float(r) % 360.0 for r in ra[:4]],
        [float(d) for d in dec[:4]],
    )


def _bounds(
    ra_c: float, corner_ra: list[float], corner_dec: list[float]
) -> tuple[float, float, float, float]:
    dra = (np.asarray(corner_ra) - ra_c + 180.0) % 360.0 - 180.0
    dec_min, dec_max = float(min(corner_dec)), float(max(corner_dec))
    if max(abs(dec_min), abs(dec_max)) > 89.5:  # a quadrant next to a pole: keep the whole RA circle
        return 0.0, 360.0, dec_min, min(90.0, dec_max)
    return (ra_c + float(dra.min())) % 360.0, (ra_c + float(dra.max())) % 360.0, dec_min, dec_max


def header_float(header, key: str, primary=None) -> float | None:
    """A numeric header value (Q1 stores some, e.g. MAGZEROP, as strings), else the primary header's, else None."""
    for h in (header, primary):
        if h is None:
            continue
        v = h.get(key)
        if v is None:
            continue
        try:
            return float(str(v).strip())
        except ValueError:
            continue
    return None


def exptime_s(header, primary=None) -> float | None:
    """EXPTIME (s) of a quadrant: its SCI header, else the DET primary header; None when neither has it."""
    return header_float(header, "EXPTIME", primary)


def _exptime_check(exp: VisExposure, value: float | None) -> None:
    """Warn when EXPTIME contradicts the exposure index of the name (a short exposure named nominal, ...)."""
    if value is None:
        log.warning("%s: no EXPTIME in its headers", exp.det_uri)
        return
    short = value < 0.5 * VIS_EXPTIME_NOMINAL_S
    if short != exp.is_short:
        log.warning(
            "%s: EXPTIME %.1f s but exposure index %d in the name (%s expected); the header value is used",
            exp.det_uri,
            value,
            exp.exposure,
            "short" if exp.is_short else "nominal",
        )


def index_exposure(
    exp: VisExposure, storage_options: dict | None = None, hdu_tables: dict | None = None
) -> pa.Table:
    """Quadrant rows of one exposure (schema :data:`INDEX_SCHEMA`), from header-only reads of its files.

    ``hdu_tables``: {uri: HDU walk} shared between the exposures of one index build, so the observation's
    PSF file (common to all its exposures) is walked once.
    """

    def walk(uri):
        if hdu_tables is None:
            return fits_hdu_offsets(uri, storage_options)
        if uri not in hdu_tables:
            hdu_tables[uri] = fits_hdu_offsets(uri, storage_options)
        return hdu_tables[uri]

    det_hdus = fits_hdu_offsets(exp.det_uri, storage_options)
    primary = det_hdus[0].header if det_hdus else None
    det = _by_det_id(det_hdus, "SCI")
    aux = {}
    for kind, uri in (("BKG", exp.bkg_uri), ("WGT", exp.wgt_uri), ("PSF", exp.psf_uri)):
        aux[kind] = _by_det_id(walk(uri), kind) if uri else {}
    det_ids = sorted({d for (d, k) in det if k == "SCI"})
    if not det_ids:
        raise Q1FormatError(
            exp.det_uri,
            "No quadrant SCI extensions ('{row}-{col}.{quad}.SCI') in this DET file",
            "point data.vis_base_uri at Q1 VIS calibrated frames (EUC_VIS_SWL-DET-*)",
        )
    rows: dict[str, list] = {f.name: [] for f in INDEX_SCHEMA}
    exptimes = []
    for det_id in det_ids:
        sci = det[(det_id, "SCI")]
        ra_c, dec_c, cra, cdec = _footprint(sci.header)
        ra_min, ra_max, dec_min, dec_max = _bounds(ra_c, cra, cdec)
        ccd, quad = det_id.split(".")
        t_exp = exptime_s(sci.header, primary)
        exptimes.append(t_exp)
        rec: dict[str, Any] = {
            "obs_id": exp.obs_id,
            "dither": exp.dither,
            "exposure": exp.exposure,
            "ccd": ccd,
            "quadrant": quad,
            "det_id": det_id,
            "naxis1": int(sci.header["NAXIS1"]),
            "naxis2": int(sci.header["NAXIS2"]),
            "ra_center": ra_c,
            "dec_center": dec_c,
            "corner_ra": cra,
            "corner_dec": cdec,
            "ra_min": ra_min,
            "ra_max": ra_max,
            "dec_min": dec_min,
            "dec_max": dec_max,
            "sci_path": exp.det_uri,
            "bkg_path": exp.bkg_uri,
            "wgt_path": exp.wgt_uri,
            "psf_path": exp.psf_uri,
            "timestamp": exp.timestamp,
            "exptime_s": t_exp,
        }
        sources = {
            "sci": det.get((det_id, "SCI")),
            "rms": det.get((det_id, "RMS")),
            "flg": det.get((det_id, "FLG")),
        }
        for kind, table in aux.items():
            # BKG/WGT/PSF files name extensions "3-4.F" (or with a suffix): take the quadrant's only one.
            hits = [h for (d, _k), h in table.items() if d == det_id]
            sources[kind.lower()] = hits[0] if hits else None
        for key, h in sources.items():
            rec[f"{key}_hdu"] = h.name if h else None
            rec[f"{key}_header_offset"] = h.header_offset if h else None
            rec[f"{key}_data_offset"] = h.data_offset if h else None
            rec[f"{key}_data_size"] = h.data_size if h else None
        for k in rows:
            rows[k].append(rec.get(k))
    known = [t for t in exptimes if t is not None]
    _exptime_check(exp, float(np.median(known)) if known else None)
    return pa.table(rows, schema=INDEX_SCHEMA)


def _cache_uri(cache_base: str, exp: VisExposure) -> str:
    stem = _basename(exp.det_uri).rsplit(".fits", 1)[0]
    return join_uri(cache_base, str(exp.obs_id), f"{stem}.quadrants.parquet")


#: Largest angular distance (deg) between two points of the VIS focal plane (a 0.787 x 0.709 deg field,
#: diagonal 1.06 deg), with a margin: no quadrant of an exposure lies farther than this from any other.
VIS_FOCAL_PLANE_SPAN_DEG = 1.1


def _sep_deg(ra1, dec1, ra2, dec2) -> float:
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return float(np.degrees(2 * np.arcsin(np.sqrt(min(1.0, h)))))


def exposure_reference_position(exp: VisExposure, storage_options: dict | None = None) -> tuple[float, float]:
    """(RA, Dec) in deg of the centre of the first SCI quadrant of the DET file: a few header requests only."""
    hdus = fits_hdu_offsets(exp.det_uri, storage_options, stop=lambda h: h.name.endswith(".SCI"))
    if not hdus or not hdus[-1].name.endswith(".SCI"):
        raise Q1FormatError(
            exp.det_uri,
            "No quadrant SCI extensions ('{row}-{col}.{quad}.SCI') in this DET file",
            "point data.vis_base_uri at Q1 VIS calibrated frames (EUC_VIS_SWL-DET-*)",
        )
    ra, dec, _, _ = _footprint(hdus[-1].header)
    return ra, dec


def exposure_may_overlap(exp: VisExposure, box, storage_options: dict | None = None) -> bool:
    """False only when no quadrant of the exposure can touch ``box`` (a ``SkyBox``).

    Conservative pointing test: the first SCI quadrant's centre must lie within the focal-plane span
    (:data:`VIS_FOCAL_PLANE_SPAN_DEG`) plus the box's half-diagonal of the box centre.
    """
    ra, dec = exposure_reference_position(exp, storage_options)
    ra_c = (box.ra_min + 0.5 * box.ra_width_deg) % 360.0
    dec_c = 0.5 * (box.dec_min + box.dec_max)
    if box.ra_width_deg >= 180.0 or max(abs(box.dec_min), abs(box.dec_max)) > 89.0:
        return True
    corners = [
        (box.ra_min, box.dec_min),
        (box.ra_min, box.dec_max),
        (box.ra_max, box.dec_min),
        (box.ra_max, box.dec_max),
    ]
    half_diag = max(_sep_deg(ra_c, dec_c, r, d) for r, d in corners)
    return _sep_deg(ra, dec, ra_c, dec_c) <= VIS_FOCAL_PLANE_SPAN_DEG + half_diag


def build_quadrant_index(
    exposures: Sequence[VisExposure],
    cache_uri: str | None = None,
    storage_options: dict | None = None,
    cache_storage_options: dict | None = None,
    progress: bool = False,
    overlap_box=None,
) -> pa.Table:
    """Quadrant footprint index of the given exposures, cached as one Parquet per DET file under ``cache_uri``.

    The cache key is the DET file name (it carries the processing timestamp), so a reprocessed file gets a new
    entry. Cached entries whose companion files changed are rebuilt.

    ``overlap_box`` (a ``SkyBox``, e.g. a tile's extended area): an exposure without a cache entry is first
    tested with :func:`exposure_may_overlap` (a few header requests) and left out when it cannot overlap
    the box, instead of walking its ~430 HDU headers. Cached entries are returned whole.
    """
    import pyarrow.parquet as pq

    tables = []
    hdu_tables: dict[str, list[HduInfo]] = {}
    n_far = 0
    it: Iterable[VisExposure] = exposures
    bar = None
    if progress and exposures:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("indexing VIS quadrants (headers only)", total=len(exposures))
    try:
        for exp in it:
            table = None
            cu = _cache_uri(cache_uri, exp) if cache_uri else None
            if cu:
                try:
                    table = pq.read_table(io.BytesIO(read_bytes(cu, cache_storage_options)))
                    t0 = table.slice(0, 1).to_pylist()
                    if (
                        table.schema != INDEX_SCHEMA
                        or not t0
                        or [t0[0][k] for k in ("bkg_path", "wgt_path", "psf_path")]
                        != [exp.bkg_uri, exp.wgt_uri, exp.psf_uri]
                    ):
                        table = None
                except DataAccessError:
                    table = None
                except Exception as exc:  # unreadable cache entry: rebuild it
                    log.warning("quadrant index cache %s unreadable (%s): rebuilding", cu, exc)
                    table = None
            if (
                table is None
                and overlap_box is not None
                and not exposure_may_overlap(exp, overlap_box, storage_options)
            ):
                n_far += 1
                if bar is not None:
                    bar.advance(task)
                continue
            if table is None:
                table = index_exposure(exp, storage_options, hdu_tables)
                if cu:
                    buf = io.BytesIO()
                    pq.write_table(table, buf)
                    atomic_write_bytes(cu, buf.getvalue(), cache_storage_options)
            tables.append(table)
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    if n_far:
        log.info(
            "quadrant index: %d of %d exposures cannot overlap the area (pointing), not indexed",
            n_far,
            len(exposures),
        )
    if not tables:
        return INDEX_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def quadrant_box(row: dict):
    from constellation_assets.sky.tiles import SkyBox

    return SkyBox(float(row["ra_min"]), float(row["ra_max"]), float(row["dec_min"]), float(row["dec_max"]))


def quadrants_overlapping(index: pa.Table, box) -> pa.Table:
    """Rows of ``index`` whose quadrant footprint (RA/Dec bounding box of its corners) overlaps ``box``.

    ``box``: a :class:`constellation_assets.sky.tiles.SkyBox` (``ra_min > ra_max`` crosses RA = 0/360).
    Vectorised; RA wrap-around handled on both sides.
    """
    from constellation_assets.sky.tiles import _ra_arcs_overlap

    if index.num_rows == 0:
        return index
    ra_min = index.column("ra_min").to_numpy()
    ra_max = index.column("ra_max").to_numpy()
    dec_min = index.column("dec_min").to_numpy()
    dec_max = index.column("dec_max").to_numpy()
    width = np.where(ra_min > ra_max, (ra_max - ra_min) % 360.0, ra_max - ra_min)
    width = np.where((ra_min == 0.0) & (ra_max == 360.0), 360.0, width)
    dec_ok = (dec_max >= box.dec_min) & (dec_min <= box.dec_max)
    ra_ok = _ra_arcs_overlap(box.ra_min, box.ra_width_deg, ra_min, width)
    return index.filter(pa.array(dec_ok & ra_ok))


# ----------------------------------------------------------------------------------------------- reads


@dataclasses.dataclass
class QuadrantData:
    """One HDU read by byte range: its header and data (native-endian numpy array)."""

    uri: str
    hdu_name: str
    header: Any
    data: np.ndarray
    bytes_read: int


def _to_array(buf: bytes, header) -> np.ndarray:
    bitpix = int(header["BITPIX"])
    dtype = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}[bitpix]
    shape = tuple(int(header[f"NAXIS{i}"]) for i in range(int(header["NAXIS"]), 0, -1))
    arr = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    arr = arr.astype(arr.dtype.newbyteorder("="))
    bscale, bzero = float(header.get("BSCALE", 1.0)), float(header.get("BZERO", 0.0))
    if bscale != 1.0 or bzero != 0.0:
        arr = arr * bscale + bzero
    return arr


def read_quadrant(
    uri: str,
    hdu_name: str,
    header_offset: int,
    data_offset: int | None = None,
    data_size: int | None = None,
    storage_options: dict | None = None,
) -> QuadrantData:
    """Read one image HDU (header + data) from a local or s3:// FITS file with byte ranges only.

    ``header_offset``/``data_offset``/``data_size`` come from the quadrant index. Without ``data_offset`` the
    header is read first (one extra small request). The EXTNAME is checked against ``hdu_name`` so a stale
    index (file replaced) fails loudly instead of returning another quadrant's pixels.
    """
    fs, path = get_fs(uri, storage_options)
    try:
        if data_offset is None or data_size is None:
            raw = _read_range(fs, path, header_offset, header_offset + _HEADER_CHUNK)
            parsed = _parse_header(raw[: len(raw) // FITS_BLOCK * FITS_BLOCK], uri, header_offset)
            while parsed is None:
                more = _read_range(
                    fs, path, header_offset + len(raw), header_offset + len(raw) + _HEADER_CHUNK
                )
                if not more:
                    raise Q1FormatError(uri, f"Truncated FITS header at byte {header_offset}", _CORRUPT_HINT)
                raw += more
                parsed = _parse_header(raw[: len(raw) // FITS_BLOCK * FITS_BLOCK], uri, header_offset)
            header, hlen = parsed
            data_offset = header_offset + hlen
            data_size = _data_size(header)
            data = _read_range(fs, path, data_offset, data_offset + data_size)
            nbytes = len(raw) + len(data)
        else:
            raw = _read_range(fs, path, header_offset, data_offset + data_size)
            nbytes = len(raw)
            parsed = _parse_header(raw[: data_offset - header_offset], uri, header_offset)
            if parsed is None:
                raise Q1FormatError(
                    uri,
                    f"No FITS header at byte {header_offset} (stale quadrant index?)",
                    "rebuild the quadrant index",
                )
            header, _ = parsed
            data = raw[data_offset - header_offset :]
    except FileNotFoundError as exc:
        raise DataAccessError(uri, "Not found", "check the path/URI and that the data exists") from exc
    name = str(header.get("EXTNAME", "")).strip()
    if name != hdu_name:
        raise Q1FormatError(
            uri,
            f"HDU at byte {header_offset} is {name!r}, expected {hdu_name!r} (the file changed since it was indexed)",
            "delete the quadrant index cache for this file and re-run prepare",
        )
    expected = _data_size(header)
    if len(data) < expected:
        raise Q1FormatError(
            uri, f"Truncated data for HDU {hdu_name!r}: {len(data)} of {expected} bytes", _CORRUPT_HINT
        )
    return QuadrantData(uri, hdu_name, header, _to_array(data[:expected], header), nbytes)


def read_quadrant_row(row: dict, kind: str = "sci", storage_options: dict | None = None) -> QuadrantData:
    """Read one HDU of an index/manifest quadrant row: ``kind`` in sci, rms, flg, bkg, wgt, psf."""
    path_key = {"sci": "sci_path", "rms": "sci_path", "flg": "sci_path"}.get(kind, f"{kind}_path")
    uri = row.get(path_key)
    if not uri or row.get(f"{kind}_hdu") is None:
        raise DataAccessError(
            str(uri or row.get("sci_path")),
            f"No {kind.upper()} extension for quadrant {row.get('det_id')} of obs {row.get('obs_id')}",
            "check that the exposure's BKG/WGT/PSF files exist next to its DET file",
        )
    return read_quadrant(
        uri,
        row[f"{kind}_hdu"],
        int(row[f"{kind}_header_offset"]),
        int(row[f"{kind}_data_offset"]),
        int(row[f"{kind}_data_size"]),
        storage_options,
    )


def entry_det_id(entry: Mapping[str, Any]) -> str:
    """HDU prefix of a quadrant entry: manifests carry ``quadrant: 3-4.F``; index rows the letter and ``ccd``."""
    quad = str(entry.get("det_id") or entry.get("quadrant"))
    return quad if "." in quad else f"{entry.get('ccd')}.{quad}"


def hdu_candidates(entry: Mapping[str, Any], kind: str) -> list[str]:
    """HDU names tried for ``kind`` when an entry has no byte offsets: the entry's own ``{kind}_hdu`` first,
    then the Q1 names (``3-4.F.SCI`` etc. in DET files, ``3-4.F`` in the BKG / WGT / PSF files)."""
    det = entry_det_id(entry)
    explicit = entry.get(f"{kind}_hdu") or (entry.get("hdus") or {}).get(kind)
    names = {
        "sci": [f"{det}.SCI"],
        "rms": [f"{det}.RMS"],
        "flg": [f"{det}.FLG"],
        "bkg": [det, f"{det}.BKG", f"{det}.SCI"],
        "wgt": [det, f"{det}.WGT", f"{det}.SCI"],
        "psf": [det, f"{det}.PSF", f"{det}.SCI"],
    }[kind]
    out = ([str(explicit)] if explicit else []) + names
    return list(dict.fromkeys(out))


_PATH_KEY = {"sci": "sci_path", "rms": "sci_path", "flg": "sci_path", "bkg": "bkg_path", "wgt": "wgt_path",
             "psf": "psf_path"}  # fmt: skip


class HduTableCache:
    """Process-wide LRU of FITS HDU walks (name -> :class:`HduInfo`), keyed by URI and file version.

    Reads by HDU name (entries without byte offsets, the injection hosts) walk a file's headers once and then
    fetch each HDU with one range request. The version is the local size and mtime, or the S3 ETag and size,
    so a rewritten file is walked again.
    """

    def __init__(self, max_files: int = 64):
        import threading

        self.max_files = int(max_files)
        self._items: dict[tuple, dict[str, HduInfo]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _version(uri: str, storage_options: dict | None) -> tuple:
        fs, path = get_fs(uri, storage_options)
        try:
            info = fs.info(path)
        except FileNotFoundError as exc:
            raise DataAccessError(uri, "Not found", "check the path/URI and that the data exists") from exc
        return (info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified")))

    def get(self, uri: str, storage_options: dict | None = None) -> dict[str, HduInfo]:
        key = (str(uri), self._version(str(uri), storage_options))
        with self._lock:
            hit = self._items.pop(key, None)
            if hit is not None:
                self._items[key] = hit
                return hit
        table: dict[str, HduInfo] = {}
        for h in fits_hdu_offsets(str(uri), storage_options):
            table.setdefault(h.name if h.index else "PRIMARY", h)
        with self._lock:
            self._items[key] = table
            while len(self._items) > self.max_files:
                self._items.pop(next(iter(self._items)))
        return table

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: The HDU walks shared by every by-name read of this process.
HDU_TABLES = HduTableCache()


def hdu_table(uri: str, storage_options: dict | None = None) -> dict[str, HduInfo]:
    """``{EXTNAME: HduInfo}`` of a FITS file (``"PRIMARY"`` for HDU 0), headers only, cached per file version."""
    return HDU_TABLES.get(uri, storage_options)


def read_hdu(uri: str, names: Sequence[str], storage_options: dict | None = None) -> QuadrantData | None:
    """The first HDU of ``names`` present in the file, read with one range request (None when none is)."""
    table = hdu_table(uri, storage_options)
    for name in names:
        h = table.get(name)
        if h is not None:
            return read_quadrant(uri, name, h.header_offset, h.data_offset, h.data_size, storage_options)
    return None


def primary_header(uri: str, storage_options: dict | None = None):
    """The primary header of a FITS file (e.g. a DET file's EXPTIME, pointing), reading that header only."""
    fs, path = get_fs(uri, storage_options)
    raw = b""
    try:
        while True:
            more = _read_range(fs, path, len(raw), len(raw) + _HEADER_CHUNK)
            if not more:
                raise Q1FormatError(uri, "Truncated primary header (no END card)", _CORRUPT_HINT)
            raw += more
            parsed = _parse_header(raw[: len(raw) // FITS_BLOCK * FITS_BLOCK], uri, 0)
            if parsed is not None:
                return parsed[0]
    except FileNotFoundError as exc:
        raise DataAccessError(uri, "Not found", "check the path/URI and that the data exists") from exc


#: SCI-header keys completed from the DET primary header when a quadrant header lacks them.
PRIMARY_FALLBACK_KEYS = ("EXPTIME", "MAGZEROP", "GAIN", "RDNOISE", "SATLEVEL")


def _complete_from_primary(header, uri: str, storage_options: dict | None, walked: bool = False) -> None:
    missing = [k for k in PRIMARY_FALLBACK_KEYS if k not in header]
    if not missing:
        return
    table = hdu_table(uri, storage_options) if walked else {}
    prim = table["PRIMARY"].header if "PRIMARY" in table else primary_header(uri, storage_options)
    for k in missing:
        if k in prim:
            header[k] = prim[k]


def read_quadrant_hdus(
    entry: dict, storage_options: dict | None = None, kinds: Sequence[str] | None = None
) -> dict[str, tuple[np.ndarray, Any]]:
    """Read the HDUs of one manifest/index quadrant entry: {kind: (data, header)}, byte ranges only.

    Default kinds: sci, rms, flg, bkg, psf (wgt only when the entry has no RMS). An entry with byte offsets
    (index / manifest) is read directly; one without (``sci_path`` etc. and ``ccd``/``quadrant`` only) is
    resolved by HDU name (:func:`hdu_candidates`) through the cached header walk. Kinds whose file or HDU is
    absent are left out. The SCI header gets EXPTIME/MAGZEROP/GAIN/... from the DET primary header when it
    lacks them (:data:`PRIMARY_FALLBACK_KEYS`).
    """
    if kinds is None:
        kinds = ["sci", "rms", "flg", "bkg", "psf"]
    kinds = list(kinds)
    out: dict[str, tuple[np.ndarray, Any]] = {}
    sci_walked = False
    for kind in kinds:
        q = None
        if entry.get(f"{kind}_hdu") is not None and entry.get(f"{kind}_header_offset") is not None:
            q = read_quadrant_row(entry, kind, storage_options)
        elif entry.get(_PATH_KEY[kind]):
            q = read_hdu(str(entry[_PATH_KEY[kind]]), hdu_candidates(entry, kind), storage_options)
            sci_walked |= kind == "sci"
        if q is not None:
            out[kind] = (q.data, q.header)
    if "rms" in kinds and "rms" not in out and "wgt" not in kinds and entry.get("wgt_path"):
        got = read_quadrant_hdus(entry, storage_options, ["wgt"])
        out.update(got)
    if "sci" in out:
        _complete_from_primary(out["sci"][1], str(entry["sci_path"]), storage_options, sci_walked)
    return out


def magzerop(header, primary=None) -> float:
    """MAGZEROP as a float (Q1 headers store it as a string), from the header or else ``primary``."""
    v = header_float(header, "MAGZEROP", primary)
    if v is None:
        raise KeyError("MAGZEROP missing from header")
    return v


def zero_point_mag(header, primary=None) -> float:
    """AB magnitude of 1 ADU in the frame: ``MAGZEROP + 2.5 log10(EXPTIME)`` (MAGZEROP is for 1 ADU/s)."""
    t = exptime_s(header, primary)
    if t is None or not t > 0:
        raise KeyError("EXPTIME missing from header")
    return magzerop(header, primary) + 2.5 * float(np.log10(t))


# ----------------------------------------------------------------------------------------------- exposures


@dataclasses.dataclass(frozen=True)
class QuadrantHeader:
    """The SCI header of one quadrant of an exposure, with the photometric keys resolved."""

    det_id: str  # "3-4.F"
    sci_hdu: str  # "3-4.F.SCI"
    nx_pix: int
    ny_pix: int
    header: Any  # astropy Header of the SCI HDU (WCS), completed from the primary header
    exptime_s: float | None
    magzerop: float | None
    gain_e_per_adu: float | None

    @property
    def zero_point_mag(self) -> float:
        """AB magnitude of 1 ADU (NaN without MAGZEROP/EXPTIME)."""
        if self.magzerop is None or not (self.exptime_s or 0) > 0:
            return float("nan")
        return self.magzerop + 2.5 * float(np.log10(self.exptime_s))


def exposure_quadrant_headers(
    exp: VisExposure | str, storage_options: dict | None = None
) -> list[QuadrantHeader]:
    """The SCI headers of every quadrant of an exposure (``VisExposure`` or DET URI), headers only, by det_id."""
    uri = exp.det_uri if isinstance(exp, VisExposure) else str(exp)
    table = hdu_table(uri, storage_options)
    prim = table["PRIMARY"].header if "PRIMARY" in table else None
    out = []
    for name, h in table.items():
        m = _EXT_RE.match(name)
        if not m or m["kind"] != "SCI":
            continue
        hd = h.header.copy()
        for k in PRIMARY_FALLBACK_KEYS:
            if k not in hd and prim is not None and k in prim:
                hd[k] = prim[k]
        out.append(
            QuadrantHeader(
                det_id=f"{m['ccd']}.{m['quad']}",
                sci_hdu=name,
                nx_pix=int(hd["NAXIS1"]),
                ny_pix=int(hd["NAXIS2"]),
                header=hd,
                exptime_s=exptime_s(hd),
                magzerop=header_float(hd, "MAGZEROP"),
                gain_e_per_adu=header_float(hd, "GAIN"),
            )
        )
    return sorted(out, key=lambda q: q.det_id)


def exposure_with_exptime(exp: VisExposure, storage_options: dict | None = None) -> VisExposure:
    """``exp`` with ``exptime_s`` from its DET primary header (one header request), checked against the name.

    Falls back to the first SCI header (cached walk) when the primary header has no EXPTIME.
    """
    t = exptime_s(primary_header(exp.det_uri, storage_options))
    if t is None:
        heads = exposure_quadrant_headers(exp, storage_options)
        t = heads[0].exptime_s if heads else None
    _exptime_check(exp, t)
    return dataclasses.replace(exp, exptime_s=t)


def exposure_entry(exp: VisExposure, det_id: str) -> dict:
    """A quadrant entry (the manifest's keys, no offsets) of quadrant ``det_id`` (``"3-4.F"``) of ``exp``."""
    ccd, quad = str(det_id).split(".")[:2]
    return {
        "sci_path": exp.det_uri,
        "bkg_path": exp.bkg_uri,
        "wgt_path": exp.wgt_uri,
        "psf_path": exp.psf_uri,
        "ccd": ccd,
        "quadrant": quad,
        "det_id": f"{ccd}.{quad}",
        "obs_id": exp.obs_id,
        "dither": exp.dither,
        "exposure": exp.exposure,
    }


def read_exposure_quadrant(
    exp: VisExposure,
    det_id: str,
    kinds: Sequence[str] = ("sci", "rms", "flg", "bkg"),
    storage_options: dict | None = None,
) -> dict[str, tuple[np.ndarray, Any]]:
    """HDUs of one quadrant of an exposure by name ({kind: (data, header)}; absent kinds are left out).

    ``kinds`` from sci, rms, flg (DET file), bkg, wgt, psf (companion files). Byte-range reads through the
    cached header walk: one range request per HDU once a file has been walked.
    """
    return read_quadrant_hdus(exposure_entry(exp, det_id), storage_options, kinds)


# ----------------------------------------------------------------------------------------------- PSF grid


@dataclasses.dataclass(frozen=True)
class PsfGridLayout:
    """How a PSF HDU lays out its grid: ``n`` x ``n`` stamps of ``stamp_pix`` x ``stamp_pix``, row-major.

    Stamp ``(i, j)`` (image rows ``i S .. (i + 1) S``, columns ``j S ..``) models the PSF at 0-based quadrant
    pixel ``(x_nodes_pix[j], y_nodes_pix[i])``.
    """

    n: int
    stamp_pix: int
    oversampling: int
    pixel_included: bool
    x_nodes_pix: np.ndarray
    y_nodes_pix: np.ndarray
    from_keywords: bool  # the grid geometry came from header keywords (else inferred from the shape)


def _infer_grid(size: int) -> tuple[int, int] | None:
    """(n, stamp) of a square PSF mosaic of side ``size`` without keywords: the Q1 9 x 9 grid, else 21 px stamps."""
    from constellation_assets.euclid import VIS_PSF_GRID, VIS_PSF_STAMP_PIX

    if size % VIS_PSF_GRID == 0 and size // VIS_PSF_GRID >= 3:
        return VIS_PSF_GRID, size // VIS_PSF_GRID
    if size % VIS_PSF_STAMP_PIX == 0:
        return size // VIS_PSF_STAMP_PIX, VIS_PSF_STAMP_PIX
    return None


def psf_grid_layout(
    image_shape: Sequence[int], header, quadrant_shape: Sequence[int], uri: str = ""
) -> PsfGridLayout:
    """The grid layout of a VIS PSF HDU.

    The Q1 product (``EUC_VIS_GRD-PSF``, PSFEx) carries no grid keywords: a 189 x 189 image is a 9 x 9 grid
    of 21 x 21 stamps at the native pixel scale, uniform over the quadrant with nodes at the cell centres,
    ``x_j = (j + 1/2) nx / n - 1/2`` (0-based). Other square images whose side is a multiple of 9 (9 x S) or
    of 21 (n x 21) are read the same way. Optional keywords override the inference: PSFGRID / PSFSTAMP (grid
    and stamp size), OVERSAMP (PSF pixels per detector pixel, default 1), PSFPIXEL (``INCLUDED`` unless it
    says NOT INCLUDED), GRIDX0 / GRIDY0 (FITS 1-based pixel of node 0) and GRIDDX / GRIDDY (node spacing).
    """
    ny_img, nx_img = int(image_shape[0]), int(image_shape[1])
    where = uri or "PSF file"
    hint = "use the Q1 VIS PSF product (189 x 189 per quadrant) or give PSFGRID/PSFSTAMP in the HDU header"
    if "PSFGRID" in header or "PSFSTAMP" in header:
        n = int(header.get("PSFGRID", 0)) or nx_img // int(header["PSFSTAMP"])
        s = int(header.get("PSFSTAMP", 0)) or nx_img // n
        from_kw = True
    else:
        if nx_img != ny_img:
            raise Q1FormatError(where, f"PSF image of shape {(ny_img, nx_img)} is not square", hint)
        got = _infer_grid(nx_img)
        if got is None:
            raise Q1FormatError(
                where, f"PSF image side {nx_img} is neither 9 x S nor n x 21 pixels: grid unknown", hint
            )
        n, s = got
        from_kw = False
    if n < 1 or s < 1 or ny_img < n * s or nx_img < n * s:
        raise Q1FormatError(
            where,
            f"PSF image of shape {(ny_img, nx_img)} cannot hold a {n} x {n} grid of {s} x {s} stamps",
            hint,
        )
    qny, qnx = int(quadrant_shape[0]), int(quadrant_shape[1])
    dx = float(header.get("GRIDDX", qnx / n))
    dy = float(header.get("GRIDDY", qny / n))
    x0 = float(header["GRIDX0"]) - 1.0 if "GRIDX0" in header else 0.5 * qnx / n - 0.5
    y0 = float(header["GRIDY0"]) - 1.0 if "GRIDY0" in header else 0.5 * qny / n - 0.5
    pix = str(header.get("PSFPIXEL", "INCLUDED")).strip().upper()
    return PsfGridLayout(
        n=n,
        stamp_pix=s,
        oversampling=max(1, int(header.get("OVERSAMP", 1))),
        pixel_included=not pix.startswith("NOT") and pix not in ("F", "FALSE", "NO", "EXCLUDED"),
        x_nodes_pix=x0 + dx * np.arange(n),
        y_nodes_pix=y0 + dy * np.arange(n),
        from_keywords=from_kw,
    )


def psf_grid_stamps(image: np.ndarray, layout: PsfGridLayout) -> np.ndarray:
    """The stamps of a PSF HDU as (n_y, n_x, S, S) float64, values as stored (no renormalisation)."""
    n, s = layout.n, layout.stamp_pix
    img = np.asarray(image, dtype=np.float64)[: n * s, : n * s]
    return img.reshape(n, s, n, s).transpose(0, 2, 1, 3).copy()


# ----------------------------------------------------------------------------------------------- MER mosaics

#: ``EUC_MER_BGSUB-MOSAIC-NIR-H_TILE102018211-F2A3E1_20241018T143048.358037Z_00.00.fits`` (also VIS, NIR-Y,
#: NIR-J and external bands such as DECAM-G): background-subtracted MER mosaics, one per tile and band.
MER_MOSAIC_RE = re.compile(
    r"^EUC_MER_BGSUB-MOSAIC-(?P<band>[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)_TILE(?P<tile_id>\d{9})-(?P<hash>[0-9A-Za-z]+)"
    r"_(?P<ts>\d{8}T\d{6}(?:\.\d+)?)Z_(?P<version>\d{2}\.\d{2})\.fits$"
)


def mer_band_name(token: str) -> str:
    """File-name band token -> config band name: ``NIR-Y`` -> ``NIR_Y``, ``VIS`` -> ``VIS``."""
    return str(token).upper().replace("-", "_")


def default_mer_base_uri(vis_base_uri: str) -> str:
    """``{root}/q1/MER/`` next to a ``{root}/q1/VIS/`` prefix (the Q1 layout)."""
    s = str(vis_base_uri).rstrip("/")
    root = (s + "/").split("/q1/", 1)[0] + "/q1" if "/q1/" in s + "/" else s.rsplit("/", 1)[0]
    return join_uri(root, "MER") + "/"


def discover_mer_mosaics(
    mer_base_uri: str,
    tile_id: int,
    storage_options: dict | None = None,
    bands: Sequence[str] | None = None,
) -> dict[str, str]:
    """Background-subtracted MER mosaics of a tile: ``{band: uri}`` (newest timestamp, then version, per band).

    Lists ``{mer_base_uri}/{tile_id}/`` and its sub-folders (``VIS/``, ``NISP/``, ... or one per band) and
    matches file names with :data:`MER_MOSAIC_RE`; the band comes from the name (``NIR-Y`` -> ``NIR_Y``).
    ``bands`` restricts the answer (missing bands are simply absent: callers report them).
    """
    folder = join_uri(mer_base_uri, str(int(tile_id)))
    want = {mer_band_name(b) for b in bands} if bands is not None else None
    cands: dict[str, list[tuple[str, str, str]]] = {}
    try:
        entries = list_uri(folder, storage_options)
    except (FileNotFoundError, DataAccessError):
        return {}
    todo = list(entries)
    for entry in entries:
        if not _basename(entry).lower().endswith((".fits", ".gz")):
            try:
                todo += list_uri(entry, storage_options)
            except (FileNotFoundError, NotADirectoryError, DataAccessError):
                continue
    for uri in todo:
        m = MER_MOSAIC_RE.match(_basename(uri))
        if not m or int(m["tile_id"]) != int(tile_id):
            continue
        band = mer_band_name(m["band"])
        if want is None or band in want:
            cands.setdefault(band, []).append((m["ts"], m["version"], uri))
    return {b: sorted(c)[-1][2] for b, c in sorted(cands.items())}


@dataclasses.dataclass(frozen=True)
class MosaicInfo:
    """Where a mosaic's image lives in its file (for row-range reads) and what its pixels mean."""

    uri: str
    header: Any  # astropy Header of the image HDU (WCS, MAGZERO, BUNIT, ...)
    data_offset: int
    nx_pix: int
    ny_pix: int
    bitpix: int

    @property
    def zero_point_mag(self) -> float:
        """AB magnitude of one pixel unit: MAGZERO (MER), else MAGZEROP / ZEROPNT / ZP; NaN if absent."""
        for key in ("MAGZERO", "MAGZEROP", "ZEROPNT", "ZP"):
            v = self.header.get(key)
            if v is not None:
                try:
                    return float(str(v).strip())
                except ValueError:
                    continue
        return float("nan")

    def wcs(self):
        import warnings

        from astropy.wcs import WCS, FITSFixedWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(self.header)


def read_mosaic_info(uri: str, storage_options: dict | None = None) -> MosaicInfo:
    """Header and data offset of a mosaic's first 2-D image HDU, reading headers only (range requests)."""
    for h in fits_hdu_offsets(uri, storage_options):
        hd = h.header
        if int(hd.get("NAXIS", 0)) == 2 and h.data_size > 0 and "ZIMAGE" not in hd:
            return MosaicInfo(uri, hd, h.data_offset, int(hd["NAXIS1"]), int(hd["NAXIS2"]), int(hd["BITPIX"]))
    raise Q1FormatError(
        uri,
        "No uncompressed 2-D image HDU in the mosaic",
        "use a MER BGSUB mosaic (EUC_MER_BGSUB-MOSAIC-*.fits) as distributed in Q1",
    )


@dataclasses.dataclass
class MosaicCutout:
    data: np.ndarray  # (ny, nx) float32, native byte order
    x0_pix: int  # 0-based mosaic column of data[:, 0]
    y0_pix: int  # 0-based mosaic row of data[0, :]
    bytes_read: int


def read_mosaic_cutout(
    info: MosaicInfo, x0_pix: int, y0_pix: int, nx_pix: int, ny_pix: int, storage_options: dict | None = None
) -> MosaicCutout:
    """Pixels [y0, y0 + ny) x [x0, x0 + nx) (0-based) of a mosaic with ONE range request over the rows needed.

    FITS stores rows contiguously, so the request spans rows y0 .. y0 + ny - 1 (full width) and the columns
    are sliced here: ~5 MB for a 64-pixel stamp of a 19200-pixel-wide Q1 mosaic, never the 1.5 GB file.
    """
    if x0_pix < 0 or y0_pix < 0 or x0_pix + nx_pix > info.nx_pix or y0_pix + ny_pix > info.ny_pix:
        raise DataAccessError(
            info.uri,
            f"Cutout [{x0_pix}:{x0_pix + nx_pix}, {y0_pix}:{y0_pix + ny_pix}] (x, y) leaves the "
            f"{info.nx_pix} x {info.ny_pix} mosaic",
            "choose positions at least half a stamp inside the mosaic",
        )
    bpp = abs(info.bitpix) // 8
    row = info.nx_pix * bpp
    start = info.data_offset + y0_pix * row
    fs, path = get_fs(info.uri, storage_options)
    try:
        raw = _read_range(fs, path, start, start + ny_pix * row)
    except FileNotFoundError as exc:
        raise DataAccessError(info.uri, "Not found", "check the path/URI and that the data exists") from exc
    if len(raw) < ny_pix * row:
        raise Q1FormatError(info.uri, f"Truncated mosaic data at byte {start}", _CORRUPT_HINT)
    dtype = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}[info.bitpix]
    rows = np.frombuffer(raw, dtype=dtype).reshape(ny_pix, info.nx_pix)[:, x0_pix : x0_pix + nx_pix]
    data = rows.astype(np.float64 if info.bitpix == -64 else np.float32)
    bscale, bzero = float(info.header.get("BSCALE", 1.0)), float(info.header.get("BZERO", 0.0))
    if bscale != 1.0 or bzero != 0.0:
        data = (data * bscale + bzero).astype(np.float32)
    return MosaicCutout(np.ascontiguousarray(data, dtype=np.float32), x0_pix, y0_pix, len(raw))


# ------------------------------------------------------------------------------------------- tile discovery


def discover_tile_ids(cfg) -> list[str]:
    """MER tiles to process, as partition keys (9-digit strings), in order.

    - the config's ``tile_ids`` when given;
    - else the ``{tile_id}/`` folders under the MER catalog prefix (``data.catalog_base_uri``, local or s3://);
    - else, when that prefix does not exist yet or holds no tile folder ("no data yet"): the tiles of the
      synthetic field the config declares explicitly (``field.tile_ids`` set in the file: the local demo,
      whose data the synthetic_field asset writes), otherwise none.

    Any other listing failure (access denied, missing credentials, unreachable endpoint) raises
    :class:`~constellation_assets.io.uri.DataAccessError` naming the prefix: a listing that failed must never
    look like an empty survey or register some other tiles.
    """
    import re as _re

    from constellation_assets.io.uri import DataAccessError as _AccessError
    from constellation_assets.io.uri import list_uri as _list_uri

    if cfg.tile_ids:
        return [str(int(t)) for t in cfg.tile_ids]
    base = str(cfg.data.catalog_base_uri)
    try:
        entries = _list_uri(base, storage_options=cfg.storage_options(base))
    except _AccessError as exc:
        raise _AccessError(
            base,
            f"Cannot list the MER catalog prefix to discover tiles: {exc.problem}",
            "check the credentials and s3:ListBucket permission for this prefix (data.s3 / AWS_* env vars), "
            "or list the tiles explicitly in the config (tile_ids)",
        ) from exc
    tile_dir = _re.compile(r"(?:^|/)(\d{9})/?$")  # a MER tile id is 9 digits
    found = sorted({m.group(1) for e in entries if (m := tile_dir.search(str(e).rstrip("/")))})
    if found:
        return found
    if "tile_ids" in cfg.field.model_fields_set:
        return [str(int(t)) for t in cfg.field.tile_ids]
    return []
