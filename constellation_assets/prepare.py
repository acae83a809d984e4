"""Prepare stage: for each MER tile, discover -> select sources -> partition -> sub-tile manifests.

``prepare_tile(cfg, tile_id)`` writes, atomically (temp name then rename/PUT):

- ``{output.tiles}/{tile_id}/tile_sources.parquet``: shear-grade MER sources of the tile and of its neighbours'
  catalogs inside its extended area (deduplicated by OBJECT_ID), with TILE_ID, SUBTILE_ROW, SUBTILE_COL,
  OWNED, IN_CORE;
- ``{output.tiles}/{tile_id}/tile_quadrants.parquet``: the VIS quadrants whose footprint (from each
  quadrant's WCS header) overlaps the tile's extended area, with the byte offsets of every HDU;
- ``{output.manifests}/{tile_id}/{tile_id}_{row}_{col}.yaml``: one manifest per sub-tile (schema: :class:`Manifest`,
  the seed's manifest contract with SHINE plus our fields; JSON Schema ``schemas/manifest-v2.json``).

Manifests are written last, and a tile whose manifests all exist with the same inputs hash is skipped
(``force=True`` rewrites), so re-running is idempotent and an interrupted run never looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from constellation_assets.io.uri import (
    DataAccessError,
    atomic_write_bytes,
    is_s3,
    join_uri,
    read_text,
    uri_exists,
)

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_VERSION",
    "Manifest",
    "ManifestError",
    "ManifestQuadrant",
    "PrepareResult",
    "SkyBounds",
    "core_centre_deg",
    "load_manifest",
    "manifest_schema_path",
    "manifest_uri",
    "prepare",
    "prepare_tile",
    "quadrant_index_cache_uri",
    "tile_quadrants_uri",
    "tile_sources_uri",
]

#: 1: nested sky_bounds boxes, source_catalog = the prepared Parquet, quadrant = letter.
#: 2: the seed's contract (core_ra/... pairs, MER catalog URI, quadrant = HDU prefix) + sources_uri.
MANIFEST_VERSION = 2


#: libyaml's safe loader (about 10x faster on large manifests), or the pure-Python safe loader.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(ValueError):
    """A manifest is invalid. The message names the file and the problem."""


# ------------------------------------------------------------------------------------------- schema


def _ra_dec_pair(v: Any, what: str, lo: float, hi: float) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"{what} must be a [min, max] pair in degrees, got {v!r}")
    a, b = float(v[0]), float(v[1])
    if not (lo <= a <= hi and lo <= b <= hi):
        raise ValueError(f"{what} must lie in [{lo:g}, {hi:g}] deg, got {[a, b]}")
    return a, b


class SkyBounds(BaseModel):
    """The seed's ``sky_bounds``: ``core_ra``, ``core_dec``, ``extended_ra``, ``extended_dec`` as [min, max] deg.

    RA pairs with ``min > max`` wrap through RA = 0 (e.g. [359.9, 0.1]); Dec pairs have ``min <= max``.
    """

    model_config = ConfigDict(extra="forbid")
    core_ra: tuple[float, float]
    core_dec: tuple[float, float]
    extended_ra: tuple[float, float]
    extended_dec: tuple[float, float]

    @model_validator(mode="before")
    @classmethod
    def _pairs(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"core", "extended"} & set(data):
            raise ValueError(
                "sky_bounds has the manifest_version 1 layout ({core: {ra_min, ...}, extended: {...}}); "
                "manifests now use the seed's core_ra/core_dec/extended_ra/extended_dec [min, max] pairs: "
                "re-run `constellation prepare --force`"
            )
        if isinstance(data, dict):
            out = dict(data)
            for k in ("core_ra", "extended_ra"):
                if k in out:
                    out[k] = _ra_dec_pair(out[k], k, 0.0, 360.0)
            for k in ("core_dec", "extended_dec"):
                if k in out:
                    out[k] = _ra_dec_pair(out[k], k, -90.0, 90.0)
                    if out[k][0] > out[k][1]:
                        raise ValueError(f"{k} must be [min, max] with min <= max, got {list(out[k])}")
            return out
        return data

    @classmethod
    def from_boxes(cls, core, extended) -> SkyBounds:
        """From two RA/Dec boxes (objects with ra_min/ra_max/dec_min/dec_max, or their dicts)."""

        def get(b, k):
            return float(b[k] if isinstance(b, dict) else getattr(b, k))

        return cls(
            core_ra=(get(core, "ra_min"), get(core, "ra_max")),
            core_dec=(get(core, "dec_min"), get(core, "dec_max")),
            extended_ra=(get(extended, "ra_min"), get(extended, "ra_max")),
            extended_dec=(get(extended, "dec_min"), get(extended, "dec_max")),
        )


#: Q1 file names spell obs_id with 6 digits and the dither with 2 (``...-DET-002688-00-1-...``).
_OBS_ID_DIGITS, _DITHER_DIGITS = 6, 2


class ManifestQuadrant(BaseModel):
    """One exposure quadrant: the seed's fields, then ours (exposure, EXPTIME, HDU names and byte offsets).

    Seed fields: ``sci_path`` (DET file), ``bkg_path``, ``wgt_path``, ``psf_path`` (the observation's PSF
    file; ``""`` when a companion file is absent, as in the seed), ``quadrant`` (the HDU prefix ``3-4.F``),
    ``obs_id`` and ``dither`` (strings as in Q1 file names: ``002688``, ``00``), ``ccd`` (``3-4``).
    Ours: ``exposure`` (1 = long science exposure, 2 = short one of the same dither), ``exptime_s``,
    ``det_id`` (= ``quadrant``), ``naxis1``/``naxis2`` and ``{sci,rms,flg,bkg,wgt,psf}_{hdu,header_offset,
    data_offset,data_size}`` (byte-range reads without opening the files).
    """

    model_config = ConfigDict(extra="allow")
    sci_path: str = Field(min_length=1)
    bkg_path: str
    wgt_path: str
    psf_path: str
    quadrant: str = Field(pattern=r"^\d-\d\.[EFGH]$")
    obs_id: str = Field(pattern=r"^\d+$")
    dither: str = Field(pattern=r"^\d+$")
    ccd: str = Field(pattern=r"^\d-\d$")
    exposure: int = Field(1, ge=1, le=2)
    exptime_s: float | None = None
    det_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _labels(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for k in ("bkg_path", "wgt_path", "psf_path"):
            if out.get(k, "") is None:
                out[k] = ""  # an absent companion file is "" in the seed's contract
        for k, digits in (("obs_id", _OBS_ID_DIGITS), ("dither", _DITHER_DIGITS)):
            v = out.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                out[k] = f"{v:0{digits}d}"
        return out

    @model_validator(mode="after")
    def _consistent(self) -> ManifestQuadrant:
        if self.quadrant.split(".")[0] != self.ccd:
            raise ValueError(f"quadrant {self.quadrant!r} is not on ccd {self.ccd!r}")
        if self.det_id is not None and self.det_id != self.quadrant:
            raise ValueError(f"det_id {self.det_id!r} differs from quadrant {self.quadrant!r}")
        return self


class Manifest(BaseModel):
    """Sub-tile manifest (Constellation -> inference engine).

    The seed's contract (euclid-q1.md "Manifest"; JSON Schema ``constellation_assets/schemas/manifest-v2.json``):
    ``tile_id``, ``sub_tile_row``, ``sub_tile_col``, ``sky_bounds`` (:class:`SkyBounds`), ``quadrants``
    (:class:`ManifestQuadrant`), ``source_catalog`` (the tile's MER final catalog), ``source_ids`` and
    ``core_source_ids`` (MER OBJECT_IDs). Ours on top: ``manifest_version``, ``source_catalogs`` (every MER
    catalog the sources come from: the tile's first, then neighbours' for sources of the extended area),
    ``sources_uri`` (the prepared per-tile source Parquet the built-in engine reads), counts,
    ``inputs_hash`` and the opaque ``inference`` / ``gal`` sections.
    """

    model_config = ConfigDict(extra="forbid")
    manifest_version: int = MANIFEST_VERSION
    tile_id: int
    sub_tile_row: int = Field(ge=0, le=63)
    sub_tile_col: int = Field(ge=0, le=63)
    sky_bounds: SkyBounds
    quadrants: list[ManifestQuadrant]
    source_catalog: str = Field(min_length=1)
    source_ids: list[int]
    core_source_ids: list[int]
    source_catalogs: list[str] = Field(default_factory=list)
    sources_uri: str | None = None
    n_sources: int | None = None
    n_core_sources: int | None = None
    inputs_hash: str | None = None
    inference: dict[str, Any] = Field(default_factory=dict)
    gal: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.manifest_version != MANIFEST_VERSION:
            raise ValueError(
                f"manifest_version {self.manifest_version} is not the supported version {MANIFEST_VERSION}; "
                "re-run `constellation prepare --force`"
            )
        if not (100_000_000 <= self.tile_id <= 999_999_999):
            raise ValueError(f"tile_id must be a 9-digit MER tile id, got {self.tile_id}")
        if len(set(self.source_ids)) != len(self.source_ids):
            raise ValueError("source_ids has duplicates")
        if len(set(self.core_source_ids)) != len(self.core_source_ids):
            raise ValueError("core_source_ids has duplicates")
        extra = set(self.core_source_ids) - set(self.source_ids)
        if extra:
            raise ValueError(f"{len(extra)} core_source_ids are not in source_ids (e.g. {sorted(extra)[:3]})")
        return self

    def paths(self) -> list[str]:
        out = [self.source_catalog, *self.source_catalogs]
        if self.sources_uri:
            out.append(self.sources_uri)
        for q in self.quadrants:
            out += [p for p in (q.sci_path, q.bkg_path, q.wgt_path, q.psf_path) if p]
        return out


# Name kept for code written against the first manifest layout.
_SkyBounds = SkyBounds


def manifest_schema_path():
    """Path of the JSON Schema of the current manifest version (shipped with the package)."""
    from pathlib import Path

    return Path(__file__).parent / "schemas" / f"manifest-v{MANIFEST_VERSION}.json"


def core_centre_deg(manifest) -> tuple[float, float]:
    """(RA, Dec) in degrees of the centre of a manifest's core box (NaN when it has no core bounds).

    Reads the seed's ``sky_bounds.core_ra/core_dec`` pairs, and the nested boxes of version-1 manifests
    (``sky_bounds.core.ra_min`` ...) so that such dicts still give their centre. RA wraps through 0.
    """
    import math

    sb = (manifest.get("sky_bounds") if isinstance(manifest, dict) else None) or {}
    try:
        if "core_ra" in sb:
            ra0, ra1 = (float(x) for x in sb["core_ra"])
            dec0, dec1 = (float(x) for x in sb["core_dec"])
        else:
            core = sb["core"]
            ra0, ra1 = float(core["ra_min"]), float(core["ra_max"])
            dec0, dec1 = float(core["dec_min"]), float(core["dec_max"])
    except (KeyError, TypeError, ValueError):
        return math.nan, math.nan
    if ra1 < ra0:  # wraps through RA = 0
        ra1 += 360.0
    return ((ra0 + ra1) / 2.0) % 360.0, (dec0 + dec1) / 2.0


def _norm_root(uri: str) -> str:
    from pathlib import Path

    s = str(uri)
    if is_s3(s):
        return "s3://" + s.split("://", 1)[1].rstrip("/") + "/"
    return str(Path(s).expanduser().absolute()).rstrip("/") + "/"


def _under(path: str, roots: Sequence[str]) -> bool:
    from pathlib import Path

    p = str(path)
    if is_s3(p):
        p = "s3://" + p.split("://", 1)[1]
        if ".." in p.split("/"):
            return False
    else:
        p = str(Path(p).expanduser().absolute().resolve())
    return any((p.rstrip("/") + "/").startswith(r) for r in roots)


def allowed_roots(cfg) -> list[str]:
    """Roots manifest paths may point into: the data roots (above ``q1/``) and the output root."""
    roots = list(cfg.data.roots) + [cfg.output.root_uri, cfg.output.tiles]
    out = []
    for r in roots:
        n = _norm_root(r)
        if not is_s3(n):
            from pathlib import Path

            n = str(Path(n).resolve()).rstrip("/") + "/"
        out.append(n)
    return sorted(set(out))


def load_manifest(
    uri: str, storage_options: dict | None = None, cfg=None, roots: Sequence[str] | None = None
) -> dict:
    """Read a sub-tile manifest with ``yaml.safe_load``, validate it (:class:`Manifest`), return a dict.

    With ``cfg`` (or explicit ``roots``), every file path in it must lie under the configured data roots or
    the output root; a manifest pointing elsewhere is rejected (it could make a worker read arbitrary files).
    """
    try:
        text = read_text(uri, storage_options)
    except DataAccessError:
        raise
    try:
        raw = yaml.load(text, Loader=_SAFE_LOADER)  # safe: no tags/objects (libyaml when available)
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest {uri} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest {uri} must be a mapping, got {type(raw).__name__}")
    try:
        m = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ManifestError(
            f"manifest {uri} is invalid: {problems}. Re-run `constellation prepare --force`"
        ) from None
    if roots is None and cfg is not None:
        roots = allowed_roots(cfg)
    if roots is not None:
        norm = [_norm_root(r) if is_s3(r) else _norm_root(r) for r in roots]
        bad = [p for p in m.paths() if not _under(p, norm)]
        if bad:
            raise ManifestError(
                f"manifest {uri} points outside the configured data/output roots: {bad[:3]} "
                f"(allowed: {norm}); fix data.* / output.root_uri or regenerate the manifest"
            )
    return m.model_dump(mode="json")


# ------------------------------------------------------------------------------------------- locations


def tile_sources_uri(cfg, tile_id: int) -> str:
    return join_uri(cfg.output.tiles, str(int(tile_id)), "tile_sources.parquet")


def tile_quadrants_uri(cfg, tile_id: int) -> str:
    return join_uri(cfg.output.tiles, str(int(tile_id)), "tile_quadrants.parquet")


def manifest_uri(cfg, tile_id: int, row: int, col: int) -> str:
    return join_uri(cfg.output.manifests, str(int(tile_id)), f"{int(tile_id)}_{int(row)}_{int(col)}.yaml")


def quadrant_index_cache_uri(cfg) -> str:
    """Cache of per-DET-file quadrant footprint indexes (shared by all tiles)."""
    return join_uri(cfg.output.root_uri, "q1_index")


@dataclasses.dataclass
class PrepareResult:
    tile_id: int
    manifest_uris: list[str]
    n_sources: int  # shear-grade sources in the tile's extended area (tile_sources rows)
    n_core: int  # of which owned by the tile and inside a sub-tile core
    n_quadrants: int
    n_catalog_rows: int  # rows read from the tile's own MER catalog
    sources_uri: str
    quadrants_uri: str
    catalog_uri: str
    sources_schema: pa.Schema
    quadrants_schema: pa.Schema
    grid: tuple[int, int]
    inputs_hash: str
    skipped: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources_schema"] = str(self.sources_schema)
        d["quadrants_schema"] = str(self.quadrants_schema)
        return d


# ------------------------------------------------------------------------------------------- prepare


def _write_parquet(uri: str, table: pa.Table, storage_options: dict | None) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(uri, buf.getvalue(), storage_options)


def _read_parquet(uri: str, storage_options: dict | None) -> pa.Table:
    import pyarrow.parquet as pq

    from constellation_assets.io.uri import read_bytes

    return pq.read_table(io.BytesIO(read_bytes(uri, storage_options)))


def _neighbour_tiles(tile) -> list[int]:
    from constellation_assets.sky.tiles import tiles_overlapping

    b = tile.extended
    return [t for t in tiles_overlapping(b.ra_min, b.ra_max, b.dec_min, b.dec_max) if t != tile.tile_id]


def _select_sources(cfg, tile, grid, margin) -> tuple[pa.Table, int, str, list[str], Any]:
    """Shear-grade sources of the tile (+ neighbours inside its extended area) with sub-tile assignment."""
    from constellation_assets.io.mer_catalog import read_mer_catalog, shear_selection
    from constellation_assets.io.q1 import discover_mer_catalog
    from constellation_assets.sky.subtiles import partition_sources

    cat_uri = discover_mer_catalog(
        cfg.data.catalog_base_uri, tile.tile_id, cfg.storage_options(cfg.data.catalog_base_uri)
    )
    own = read_mer_catalog(cat_uri, cfg.storage_options(cat_uri))
    n_rows = own.num_rows
    tables = [own.filter(pa.array(shear_selection(own, cfg.shear.snr_min)))]
    used = [cat_uri]
    for nb in _neighbour_tiles(tile):
        try:
            nb_uri = discover_mer_catalog(
                cfg.data.catalog_base_uri, nb, cfg.storage_options(cfg.data.catalog_base_uri)
            )
        except DataAccessError:
            continue  # a neighbour without a catalog (edge of the survey / not in this data set)
        t = read_mer_catalog(nb_uri, cfg.storage_options(nb_uri))
        t = t.filter(pa.array(shear_selection(t, cfg.shear.snr_min)))
        inside = tile.extended.contains(
            t.column("RIGHT_ASCENSION").to_numpy(), t.column("DECLINATION").to_numpy()
        )
        t = t.filter(pa.array(np.asarray(inside, dtype=bool)))
        if t.num_rows:
            tables.append(t)
            used.append(nb_uri)
    table = pa.concat_tables(tables)
    # Deduplicate OBJECT_ID across catalogs (overlap areas), keeping the first (own catalog first).
    oid = table.column("OBJECT_ID").to_numpy()
    _, first = np.unique(oid, return_index=True)
    if len(first) != len(oid):
        table = table.take(pa.array(np.sort(first)))
    part = partition_sources(
        table.column("RIGHT_ASCENSION").to_numpy(), table.column("DECLINATION").to_numpy(), tile, grid, margin
    )
    cols = part.assignment_columns()
    table = table.append_column("TILE_ID", pa.array(np.full(table.num_rows, tile.tile_id, dtype=np.int64)))
    for name in ("SUBTILE_ROW", "SUBTILE_COL", "OWNED", "IN_CORE"):
        table = table.append_column(name, pa.array(cols[name]))
    return table, n_rows, cat_uri, used, part


def _inputs_hash(cfg, tile_id: int, catalogs: list[str], exposures: list, grid, margin) -> str:
    payload = {
        "tile_id": int(tile_id),
        "catalogs": sorted(catalogs),
        "exposures": sorted(e.det_uri for e in exposures),
        "grid": list(grid),
        "margin": float(margin),
        "snr_min": float(cfg.shear.snr_min),
        "tiles_dir": cfg.output.tiles,
        "inference": cfg.inference,
        "gal": cfg.gal,
        "version": MANIFEST_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _existing_complete(cfg, tile_id: int, grid, inputs_hash: str) -> list[str] | None:
    uris = [manifest_uri(cfg, tile_id, r, c) for r in range(grid[0]) for c in range(grid[1])]
    for u in uris:
        so = cfg.storage_options(u)
        if not uri_exists(u, so):
            return None
        try:
            head = yaml.safe_load(read_text(u, so))
        except Exception:
            return None
        if not isinstance(head, dict) or head.get("inputs_hash") != inputs_hash:
            return None
    for u in (tile_sources_uri(cfg, tile_id), tile_quadrants_uri(cfg, tile_id)):
        if not uri_exists(u, cfg.storage_options(u)):
            return None
    return uris


_MANIFEST_PATH_KEYS = ("sci_path", "bkg_path", "wgt_path", "psf_path")
_HDU_KINDS = ("sci", "rms", "flg", "bkg", "wgt", "psf")


def _quadrant_entry(row: dict) -> dict:
    """Manifest quadrant entry (:class:`ManifestQuadrant`) from a quadrant index row (io.q1.INDEX_SCHEMA).

    Index rows without ``exposure`` / ``exptime`` (older index caches) are long exposures (1), EXPTIME unknown.
    """
    det_id = row.get("det_id") or f"{row['ccd']}.{row['quadrant']}"
    exposure = row.get("exposure")
    exptime = row.get("exptime_s", row.get("exptime"))
    e = {k: row.get(k) or "" for k in _MANIFEST_PATH_KEYS}
    e.update(
        {
            "quadrant": det_id,  # the seed's HDU prefix, e.g. "3-4.F"
            "obs_id": f"{int(row['obs_id']):0{_OBS_ID_DIGITS}d}",
            "dither": f"{int(row['dither']):0{_DITHER_DIGITS}d}",
            "ccd": row["ccd"],
            "exposure": int(exposure) if exposure is not None else 1,
            "exptime_s": float(exptime) if exptime is not None else None,
            "det_id": det_id,
            "naxis1": row.get("naxis1"),
            "naxis2": row.get("naxis2"),
        }
    )
    for kind in _HDU_KINDS:
        for suffix in ("hdu", "header_offset", "data_offset", "data_size"):
            e[f"{kind}_{suffix}"] = row[f"{kind}_{suffix}"]
    return e


def _box_corners_overlap(rows: pa.Table, box) -> np.ndarray:
    from constellation_assets.io.q1 import quadrants_overlapping

    if rows.num_rows == 0:
        return np.zeros(0, dtype=bool)
    keep = quadrants_overlapping(rows.append_column("_i", pa.array(np.arange(rows.num_rows))), box)
    mask = np.zeros(rows.num_rows, dtype=bool)
    mask[keep.column("_i").to_numpy()] = True
    return mask


def prepare_tile(cfg, tile_id: int, force: bool = False, index_progress: bool = False) -> PrepareResult:
    """Prepare one MER tile: sources, quadrants and one manifest per sub-tile (see module docstring)."""
    from constellation_assets.io.q1 import (
        build_quadrant_index,
        discover_vis_exposures,
        quadrants_overlapping,
        tile_observations,
    )
    from constellation_assets.sky.subtiles import subtile_grid
    from constellation_assets.sky.tiles import mer_tile

    t0 = time.perf_counter()
    tile_id = int(tile_id)
    tc = cfg.tiling
    grid = tuple(int(g) for g in tc.sub_tile_grid)
    margin = float(tc.sub_tile_margin_arcmin)
    tile = mer_tile(tile_id, tc.tile_core_arcmin, tc.tile_extended_arcmin)

    vis_so = cfg.storage_options(cfg.data.vis_base_uri)
    assoc_uri = cfg.data.tile_association_uri
    exposures = discover_vis_exposures(
        cfg.data.vis_base_uri,
        obs_ids=tile_observations(tile_id, assoc_uri, cfg.storage_options(assoc_uri)) if assoc_uri else None,
        storage_options=vis_so,
        include_short_exposures=cfg.data.include_short_exposures,
    )
    sources, n_rows, cat_uri, catalogs, part = _select_sources(cfg, tile, grid, margin)
    ihash = _inputs_hash(cfg, tile_id, catalogs, exposures, grid, margin)

    s_uri, q_uri = tile_sources_uri(cfg, tile_id), tile_quadrants_uri(cfg, tile_id)
    if not force:
        done = _existing_complete(cfg, tile_id, grid, ihash)
        if done is not None:
            qs = _read_parquet(q_uri, cfg.storage_options(q_uri))
            log.info("tile %s: manifests up to date (inputs %s), skipping", tile_id, ihash)
            return PrepareResult(
                tile_id, done, sources.num_rows, int(part.core_mask.sum()), qs.num_rows, n_rows, s_uri, q_uri,
                cat_uri, sources.schema, qs.schema, grid, ihash, skipped=True, seconds=time.perf_counter() - t0,
            )  # fmt: skip

    index = build_quadrant_index(
        exposures,
        cache_uri=quadrant_index_cache_uri(cfg),
        storage_options=vis_so,
        cache_storage_options=cfg.storage_options(cfg.output.root_uri),
        progress=index_progress,
        overlap_box=tile.extended,
    )
    quads = quadrants_overlapping(index, tile.extended)
    quads = quads.append_column("TILE_ID", pa.array(np.full(quads.num_rows, tile_id, dtype=np.int64)))

    _write_parquet(s_uri, sources, cfg.storage_options(s_uri))
    _write_parquet(q_uri, quads, cfg.storage_options(q_uri))

    oid = sources.column("OBJECT_ID").to_numpy()
    uris = []
    for st in subtile_grid(tile, grid, margin):
        all_idx, core_idx = part.subtile_members(st.row, st.col)
        qmask = _box_corners_overlap(quads, st.extended)
        entries = [_quadrant_entry(r) for r in quads.filter(pa.array(qmask)).to_pylist()]
        man = Manifest(
            tile_id=tile_id,
            sub_tile_row=st.row,
            sub_tile_col=st.col,
            sky_bounds=SkyBounds.from_boxes(st.core, st.extended),
            quadrants=entries,
            source_catalog=cat_uri,
            source_ids=[int(x) for x in oid[all_idx]],
            core_source_ids=[int(x) for x in oid[core_idx]],
            source_catalogs=list(catalogs),
            sources_uri=s_uri,
            n_sources=int(len(all_idx)),
            n_core_sources=int(len(core_idx)),
            inputs_hash=ihash,
            inference=dict(cfg.inference),
            gal=dict(cfg.gal),
        )
        u = manifest_uri(cfg, tile_id, st.row, st.col)
        text = yaml.safe_dump(
            man.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=120
        )
        atomic_write_bytes(u, text.encode(), cfg.storage_options(u))
        uris.append(u)
    return PrepareResult(
        tile_id, uris, sources.num_rows, int(part.core_mask.sum()), quads.num_rows, n_rows, s_uri, q_uri, cat_uri,
        sources.schema, quads.schema, grid, ihash, skipped=False, seconds=time.perf_counter() - t0,
    )  # fmt: skip


def prepare(
    cfg,
    tile_ids: Iterable[int] | None = None,
    progress: bool = True,
    force: bool = False,
    on_error: Callable[[int, Exception], None] | None = None,
) -> list[PrepareResult]:
    """Prepare several tiles (default ``cfg.selected_tile_ids``) with a rich progress bar over tiles.

    Without ``on_error`` the first failing tile raises. With it, a failing tile is passed to
    ``on_error(tile_id, exc)`` and skipped, so the healthy tiles are prepared; the stage record lists the tiles
    prepared and the tiles that failed.
    """
    ids = [int(t) for t in (tile_ids if tile_ids is not None else cfg.selected_tile_ids)]
    results: list[PrepareResult] = []
    failed: list[int] = []

    def one(t: int) -> None:
        try:
            results.append(prepare_tile(cfg, t, force=force))
        except Exception as exc:  # noqa: BLE001 - handed to the caller, which reports it per tile
            if on_error is None:
                raise
            failed.append(t)
            on_error(t, exc)

    if not progress:
        for t in ids:
            one(t)
        return _recorded(cfg, [t for t in ids if t not in failed], results, failed)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]prepare[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task("tiles", total=len(ids))
        for t in ids:
            bar.update(task, description=f"tile {t}")
            one(t)
            bar.advance(task)
    return _recorded(cfg, [t for t in ids if t not in failed], results, failed)


def _recorded(
    cfg, ids: list[int], results: list[PrepareResult], failed: list[int] | None = None
) -> list[PrepareResult]:
    """Write the stage's run_config record (last, after every tile's outputs) and pass the results on."""
    from constellation_assets.provenance import write_stage_record

    extra = {"tiles": ids, "n_manifests": sum(len(r.manifest_uris) for r in results)}
    if failed:
        extra["failed_tiles"] = list(failed)
    write_stage_record(cfg, "prepare", extra)
    return results
