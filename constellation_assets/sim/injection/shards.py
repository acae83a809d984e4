"""Parquet stamp shards (schema, atomic writes, verification, reads) and their Iceberg registration."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from constellation_assets.io.uri import DataAccessError, atomic_output, read_bytes
from constellation_assets.sim.injection.common import (
    IMAGE_ENCODING,
    INJECTION_CODE_VERSION,
    TABLE_IDENTIFIER,
    InjectionError,
    _mer_mode,
)
from constellation_assets.sim.injection.render import RenderedTask

log = logging.getLogger(__name__)


def _schema(bands: Sequence[str], size: int, per_band_mer: bool = False):
    import pyarrow as pa

    fields = [
        ("task_id", pa.string()),
        ("split", pa.string()),
        ("shard", pa.int32()),
        ("index_in_split", pa.int64()),
        ("stage", pa.string()),
        ("variant", pa.string()),
        ("experiment_id", pa.string()),
        ("tile_id", pa.int64()),
        ("object_id", pa.int64()),
        ("host_ra_deg", pa.float64()),
        ("host_dec_deg", pa.float64()),
        ("host_mag_ab", pa.float64()),
        ("host_semimajor_axis_pix", pa.float64()),
        ("host_frame", pa.string()),
        ("host_hdu", pa.string()),
        ("host_x_pix", pa.float64()),
        ("host_y_pix", pa.float64()),
        ("host_background_adu", pa.float64()),
        ("host_flagged_pix", pa.int32()),
        ("noise_sigma_adu", pa.float64()),
        ("zero_point_mag", pa.float64()),
        ("theta_e_arcsec", pa.float64()),
        ("lens_q", pa.float64()),
        ("lens_phi_rad", pa.float64()),
        ("lens_center_x_arcsec", pa.float64()),
        ("lens_center_y_arcsec", pa.float64()),
        ("shear_gamma1", pa.float64()),
        ("shear_gamma2", pa.float64()),
        ("source_mode", pa.string()),
        ("source_x_arcsec", pa.float64()),
        ("source_y_arcsec", pa.float64()),
        ("source_mag", pa.float64()),
        ("source_hlr_arcsec", pa.float64()),
        ("source_n", pa.float64()),
        ("source_q", pa.float64()),
        ("source_phi_rad", pa.float64()),
        ("cosmos_index", pa.int64()),
        ("cosmos_hlr_arcsec", pa.float64()),
        ("cosmos_template_hlr_arcsec", pa.float64()),
        ("magnification", pa.float64()),
        ("arc_snr", pa.float64()),
        ("psf_model", pa.string()),
        ("moffat_beta", pa.float64()),
        ("stamp_size_pix", pa.int32()),
        ("pixel_scale_arcsec", pa.float64()),
    ]
    for b in bands:
        fields.append((f"arc_snr_{b}", pa.float64()))
        fields.append((f"psf_fwhm_arcsec_{b}", pa.float64()))
        if per_band_mer:  # MER-mosaic hosts: per-band zero point, noise and source magnitude
            fields.append((f"zero_point_mag_{b}", pa.float64()))
            fields.append((f"noise_sigma_{b}", pa.float64()))
            fields.append((f"source_mag_{b}", pa.float64()))
    for b in bands:
        fields.append((f"image_{b}", pa.binary(size * size * 4)))
    return pa.schema([pa.field(n, t) for n, t in fields])


def _rows_table(cfg, rendered: Sequence[RenderedTask]):
    import pyarrow as pa

    inj = cfg.injection
    schema = _schema(inj.bands, inj.stamp_size_pix, _mer_mode(inj))
    cols: dict[str, list] = {f.name: [] for f in schema}
    for r in rendered:
        t, p, h = r.task, r.params, r.task.host
        vals = {
            "task_id": t.task_id,
            "split": t.split,
            "shard": t.shard,
            "index_in_split": t.index_in_split,
            "stage": inj.stage,
            "variant": inj.variant,
            "experiment_id": inj.experiment_id,
            "tile_id": h.tile_id,
            "object_id": h.object_id,
            "host_ra_deg": h.ra_deg,
            "host_dec_deg": h.dec_deg,
            "host_mag_ab": h.mag_ab,
            "host_semimajor_axis_pix": h.semimajor_axis_pix,
            "host_frame": h.frame_uri.rsplit("/", 1)[-1],
            "host_hdu": h.hdu,
            "host_x_pix": h.x_pix,
            "host_y_pix": h.y_pix,
            "host_background_adu": r.background_adu,
            "host_flagged_pix": r.host_flagged_pix,
            "noise_sigma_adu": r.noise_sigma_adu,
            "zero_point_mag": r.zero_point_mag,
            "magnification": r.magnification,
            "arc_snr": float(np.sqrt(np.sum(np.square(r.arc_snr)))),
            "psf_model": inj.psf_model,
            "moffat_beta": float(inj.moffat_beta),
            "stamp_size_pix": inj.stamp_size_pix,
            "pixel_scale_arcsec": inj.pixel_scale_arcsec,
        }
        for k in (
            "theta_e_arcsec",
            "lens_q",
            "lens_phi_rad",
            "lens_center_x_arcsec",
            "lens_center_y_arcsec",
            "shear_gamma1",
            "shear_gamma2",
            "source_mode",
            "source_x_arcsec",
            "source_y_arcsec",
            "source_mag",
            "source_hlr_arcsec",
            "source_n",
            "source_q",
            "source_phi_rad",
            "cosmos_index",
            "cosmos_hlr_arcsec",
            "cosmos_template_hlr_arcsec",
        ):
            vals[k] = getattr(p, k)
        if p.source_mode == "cosmos":
            vals["source_n"] = None  # morphology from the bank (possibly bulge + disk), not one Sersic
            vals["source_q"] = None
            vals["source_phi_rad"] = None
        for j, b in enumerate(inj.bands):
            vals[f"arc_snr_{b}"] = r.arc_snr[j]
            vals[f"psf_fwhm_arcsec_{b}"] = float(inj.psf_fwhm_arcsec[b])
            if r.band_zero_point_mag is not None:
                vals[f"zero_point_mag_{b}"] = r.band_zero_point_mag[j]
                vals[f"noise_sigma_{b}"] = r.band_noise_sigma[j]
                vals[f"source_mag_{b}"] = r.band_source_mag[j]
            vals[f"image_{b}"] = np.ascontiguousarray(r.composite[j], dtype="<f4").tobytes()
        for k in cols:
            cols[k].append(vals[k])
    return pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in cols.items()}, schema=schema)


def _shard_metadata(cfg, h: str) -> dict[bytes, bytes]:
    inj = cfg.injection
    return {
        b"constellation.config_hash": h.encode(),
        b"constellation.image_encoding": IMAGE_ENCODING.encode(),
        b"constellation.stamp_size_pix": str(inj.stamp_size_pix).encode(),
        b"constellation.bands": json.dumps(list(inj.bands)).encode(),
        b"constellation.injection_code": INJECTION_CODE_VERSION.encode(),
    }


def shard_bytes(table, meta: dict) -> bytes:
    """The Parquet bytes of a shard (zstd, no dictionary, statistics): the same bytes for the same table."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(
        table.replace_schema_metadata(meta),
        buf,
        compression="zstd",
        use_dictionary=False,
        write_statistics=True,
    )
    return buf.getvalue()


def _write_shard(uri: str, table, meta: dict, storage_options: dict | None) -> str:
    """Write a shard atomically; returns the sha256 of the bytes written."""
    data = shard_bytes(table, meta)
    write_shard_bytes(uri, data, storage_options)
    return hashlib.sha256(data).hexdigest()


_fsync = os.fsync  # module-level so tests can simulate a full disk at the shard write


def write_shard_bytes(uri: str, data: bytes, storage_options: dict | None) -> None:
    with atomic_output(uri, storage_options) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                _fsync(f.fileno())
        except OSError as exc:
            raise output_error(exc, uri) from exc


def output_error(exc: OSError, uri: str) -> InjectionError:
    """An OSError while writing an output as one clear message (disk full, read-only, permissions)."""
    import errno

    if exc.errno == errno.ENOSPC:
        what = "the disk is full"
        fix = "free space there or choose another --output (preflight estimates the size of a run)"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "the location is not writable"
        fix = "choose a writable --output (or fix its permissions)"
    else:
        what = f"{exc.strerror or exc}"
        fix = "check the output location and re-run (completed shards are kept)"
    return InjectionError(f"cannot write {uri}: {what} ({type(exc).__name__}). What to do: {fix}")


@dataclass
class ShardCheck:
    """What an existing shard holds (from its bytes): ``problem`` is None when it is a readable, whole shard."""

    uri: str
    sha256: str | None
    config_hash: str | None
    n_rows: int
    task_ids: list[str]
    problem: str | None = None


def inspect_shard(uri: str, storage_options: dict | None, data: bytes | None = None) -> ShardCheck:
    """Read an existing shard completely (footer, every page) and report what it holds or why it is damaged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = data if data is not None else read_bytes(uri, storage_options)
    except DataAccessError as exc:
        return ShardCheck(uri, None, None, 0, [], f"cannot be read ({exc.problem})")
    sha = hashlib.sha256(data).hexdigest()
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        meta = pf.schema_arrow.metadata or {}
        table = pf.read(use_threads=False)  # every page: a truncated or damaged file fails here
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged shard
        return ShardCheck(
            uri,
            sha,
            None,
            0,
            [],
            f"is not a readable Parquet shard ({type(exc).__name__}: {exc}; {len(data)} bytes)",
        )
    h = meta.get(b"constellation.config_hash")
    return ShardCheck(
        uri, sha, h.decode() if h else None, table.num_rows, table.column("task_id").to_pylist()
    )


def _shard_hash(uri: str, storage_options: dict | None) -> str | None:
    """The config hash in a shard's footer (None when it has none)."""
    return inspect_shard(uri, storage_options).config_hash


def decode_image(value: bytes, stamp_size_pix: int) -> np.ndarray:
    """One ``image_{band}`` cell -> float32 array (H, W)."""
    return np.frombuffer(value, dtype="<f4").reshape(stamp_size_pix, stamp_size_pix)


def read_stamps(uri: str, storage_options: dict | None = None, bands: Sequence[str] | None = None):
    """Read a shard: (pyarrow Table of parameters, {band: float32 array (N, H, W)})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_bytes(uri, storage_options)
    table = pq.read_table(pa.BufferReader(data))
    meta = table.schema.metadata or {}
    size = int(meta.get(b"constellation.stamp_size_pix", b"0")) or int(
        table.column("stamp_size_pix")[0].as_py()
    )
    img_cols = [c for c in table.column_names if c.startswith("image_")]
    want = [f"image_{b}" for b in bands] if bands else img_cols
    images = {}
    for c in want:
        buf = b"".join(v.as_py() for v in table.column(c))
        images[c[len("image_") :]] = np.frombuffer(buf, dtype="<f4").reshape(-1, size, size)
    return table.drop_columns(img_cols), images


def _metadata_only(cfg, uri: str, table, storage_options: dict | None, sha256: str | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if table is None or sha256 is None:
        data = read_bytes(uri, storage_options)
        sha256 = hashlib.sha256(data).hexdigest()
        pf = pq.ParquetFile(pa.BufferReader(data))
        table = pf.read(columns=[c for c in pf.schema_arrow.names if not c.startswith("image_")])
        chash = (pf.schema_arrow.metadata or {}).get(b"constellation.config_hash", b"").decode() or None
    else:
        chash = (table.schema.metadata or {}).get(b"constellation.config_hash", b"").decode() or None
        table = table.drop_columns([c for c in table.column_names if c.startswith("image_")])
    n = table.num_rows
    table = table.replace_schema_metadata(None)
    keys = [
        f"{s}/{int(k):05d}"
        for s, k in zip(table.column("split").to_pylist(), table.column("shard").to_pylist(), strict=True)
    ]
    table = table.append_column("shard_key", pa.array(keys, pa.string()))
    table = table.append_column("shard_uri", pa.array([uri] * n, pa.string()))
    table = table.append_column("row_in_shard", pa.array(np.arange(n, dtype=np.int32)))
    table = table.append_column("run_output_uri", pa.array([cfg.injection_output] * n, pa.string()))
    table = table.append_column("config_hash", pa.array([chash] * n, pa.string()))
    return table.append_column("shard_sha256", pa.array([sha256] * n, pa.string()))


def _run_filter(cfg):
    from pyiceberg.expressions import And, EqualTo

    inj = cfg.injection
    return And(
        And(EqualTo("run_output_uri", cfg.injection_output), EqualTo("stage", inj.stage)),
        And(EqualTo("variant", inj.variant), EqualTo("experiment_id", inj.experiment_id)),
    )


def register_shards(
    cfg, shards: Sequence[tuple], storage_options: dict | None = None, *, replace_run: bool = False
) -> int:
    """Replace the rows of these shards in the Iceberg table ``sim.injections``, in one commit.

    ``shards``: ``(shard_key "split/00003", shard uri, pyarrow table or None to read it back[, sha256])``. Rows
    hold every column but the images, plus ``shard_key``, ``shard_uri``, ``row_in_shard``, ``run_output_uri``,
    ``config_hash`` (from the shard's footer) and ``shard_sha256`` (of the file's bytes).
    ``replace_run``: the commit replaces every row of the run (not only these shards), so rows of shards that
    are no longer part of it (``--force`` with fewer partitions) disappear in the same commit.
    """
    import warnings

    import pyarrow as pa
    from pyiceberg.expressions import And, In

    from constellation_assets.catalog.tables import open_catalog

    if not shards:
        return 0
    parts = []
    for sh in shards:
        _, uri, t, *rest = sh
        parts.append(_metadata_only(cfg, uri, t, storage_options, rest[0] if rest else None))
    table = pa.concat_tables(parts)
    catalog = open_catalog(cfg)
    with contextlib.suppress(Exception):  # racing creators: the namespace exists
        catalog.create_namespace_if_not_exists(TABLE_IDENTIFIER[0])
    _load_or_create_table(catalog, table.schema)
    flt = _run_filter(cfg)
    if not replace_run:
        flt = And(flt, In("shard_key", sorted({sh[0] for sh in shards})))
    for attempt in range(6):
        try:
            itable = catalog.load_table(TABLE_IDENTIFIER)
            arrow = table.cast(itable.schema().as_arrow()) if _same_names(itable, table) else table
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Delete operation did not match any records")
                itable.overwrite(arrow, overwrite_filter=flt)
            return table.num_rows
        except Exception as exc:  # noqa: BLE001
            if "CommitFailed" not in type(exc).__name__ or attempt == 5:
                raise
            time.sleep(0.1 * 2**attempt)
    return table.num_rows


def check_registration(cfg, expected: dict[str, dict], storage_options: dict | None = None) -> list[str]:
    """Compare the run's rows in ``sim.injections`` with its shards; returns the differences (empty: equal).

    ``expected``: shard uri -> ``{"sha256": ..., "task_ids": [...], "config_hash": ...}`` (what the files hold).
    Checked: the set of shard uris, per shard the task ids in order, the file's sha256 and config hash.
    """
    from pyiceberg.exceptions import NoSuchTableError

    from constellation_assets.catalog.tables import open_catalog

    try:
        itable = open_catalog(cfg).load_table(TABLE_IDENTIFIER)
    except NoSuchTableError:
        return [
            f"Iceberg table {'.'.join(TABLE_IDENTIFIER)} does not exist: the run's shards are not registered"
        ]
    names = {f.name for f in itable.schema().fields}
    cols = [c for c in ("shard_uri", "row_in_shard", "task_id", "config_hash", "shard_sha256") if c in names]
    rows = itable.scan(row_filter=_run_filter(cfg), selected_fields=tuple(cols)).to_arrow().to_pylist()
    by_uri: dict[str, list[dict]] = {}
    for r in rows:
        by_uri.setdefault(r["shard_uri"], []).append(r)
    problems = []
    for uri in sorted(set(by_uri) - set(expected)):
        problems.append(f"{len(by_uri[uri])} rows point at {uri}, which is not a shard of the run (deleted?)")
    for uri, want in sorted(expected.items()):
        got = sorted(by_uri.get(uri, []), key=lambda r: r["row_in_shard"])
        if not got:
            problems.append(f"{uri}: not registered")
            continue
        if [r["task_id"] for r in got] != list(want["task_ids"]):
            problems.append(f"{uri}: registered task ids differ from the file's ({len(got)} rows)")
        shas = {r.get("shard_sha256") for r in got}
        if want.get("sha256") and shas != {want["sha256"]}:
            problems.append(
                f"{uri}: registered rows describe another version of the file (sha256 {sorted(map(str, shas))[:2]})"
            )
        hashes = {r.get("config_hash") for r in got}
        if want.get("config_hash") and hashes != {want["config_hash"]}:
            problems.append(
                f"{uri}: registered rows carry config_hash {sorted(map(str, hashes))}, the file {want['config_hash']}"
            )
    return problems


def _same_names(itable, table) -> bool:
    return [f.name for f in itable.schema().fields] == table.column_names


def _load_or_create_table(catalog, schema):
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

    for _ in range(5):
        try:
            t = catalog.load_table(TABLE_IDENTIFIER)
            missing = [n for n in schema.names if n not in {f.name for f in t.schema().fields}]
            if missing:  # new bands: widen the table
                with t.update_schema() as upd:
                    upd.union_by_name(schema)
                t = catalog.load_table(TABLE_IDENTIFIER)
            return t
        except NoSuchTableError:
            pass
        try:
            return catalog.create_table(TABLE_IDENTIFIER, schema=schema)
        except TableAlreadyExistsError:
            continue
    return catalog.load_table(TABLE_IDENTIFIER)
