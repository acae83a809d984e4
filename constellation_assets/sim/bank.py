"""COSMOS parametric source bank (HDF5): build from the real COSMOS catalog files, load cached per process.

Input: GalSim's COSMOS catalog files ``real_galaxy_catalog_<sample>.fits`` (real-galaxy catalog),
``..._fits.fits`` (parametric fits) and ``..._selection.fits`` (selection flags), as distributed with
GalSim (the 23.5 example sample, or the full 23.5 / 25.2 catalogs: same format).

Conventions, identical to ``galsim.COSMOSCatalog(..., use_real=False).makeGalaxy(i, sersic_prec=0)``
(the bank test renders both and compares):

* ``hlr_arcsec``: circularised half-light radius sqrt(a b) of the single-Sersic fit in arcsec (the catalog's
  ``hlr[0]``; ``SERSICFIT[1]`` is the major-axis radius in 0.03" COSMOS pixels, ``hlr = 0.03 SERSICFIT[1]
  sqrt(q)``); ``sersic_n`` clipped to [0.3, 6] like GalSim; ``q`` minor/major; ``phi_rad`` the major-axis
  angle from +x (``SERSICFIT[7]``).
* Bulge + disk (``use_bulgefit``): de Vaucouleurs bulge (n = 4) + exponential disk (n = 1), each with its
  own circularised hlr, flux, q, angle (``BULGEFIT``, ``hlr[1:3]``, ``flux[1:3]``).
* Fluxes are HST F814W counts for a 1 s exposure (GalSim's normalisation, zero point 25.94);
  ``model_mag_f814w = 25.94 - 2.5 log10(model_flux_hst)``; ``mag_auto`` is the catalog magnitude.
* Selection: GalSim's ``exclusion_level`` ("none", "bad_stamp", "bad_fits", "marginal") with its
  defaults, as applied by ``COSMOSCatalog(use_real=False)``.

Bank index ``i`` (0-based row) is what :func:`~constellation_assets.sim.sources.choose_cosmos_index` picks.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from constellation_assets.io.uri import DataAccessError, atomic_output, get_fs, is_s3, read_bytes
from constellation_assets.sim.sources import SourceComponents

BANK_VERSION = "1"
HST_F814W_ZERO_POINT = 25.94
COSMOS_PIXEL_SCALE_ARCSEC = 0.03
EXCLUSION_LEVELS = ("none", "bad_stamp", "bad_fits", "marginal")

# Datasets every bank has (1-D, one value per source); images are optional.
REQUIRED_DATASETS = (
    "ident",
    "sersic_n",
    "hlr_arcsec",
    "q",
    "phi_rad",
    "flux_hst",
    "mag_auto",
    "model_flux_hst",
    "model_mag_f814w",
    "zphot",
    "use_bulgefit",
    "bulge_hlr_arcsec",
    "bulge_flux_hst",
    "bulge_q",
    "bulge_phi_rad",
    "disk_hlr_arcsec",
    "disk_flux_hst",
    "disk_q",
    "disk_phi_rad",
)


class CosmosBankError(ValueError):
    """The bank (or its COSMOS input) is missing, corrupt or incomplete; the message says what to do."""


@dataclass(frozen=True)
class BankSummary:
    uri: str
    n_sources: int
    n_input: int
    exclusion_level: str
    content_sha256: str
    includes_images: bool
    input_catalog: str


@dataclass
class CosmosBank:
    """In-memory bank: ``data`` maps dataset name -> array (length ``n_sources``), ``attrs`` the file attributes."""

    uri: str
    data: dict[str, np.ndarray]
    attrs: dict
    images: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_sources(self) -> int:
        return int(len(self.data["ident"]))

    def __len__(self) -> int:
        return self.n_sources

    def record(self, index: int) -> dict:
        """All scalar parameters of source ``index`` (Python types)."""
        self._check_index(index)
        return {k: v[index].item() for k, v in self.data.items()}

    def _check_index(self, index) -> None:
        idx = np.asarray(index)
        if np.any(idx < 0) or np.any(idx >= self.n_sources):
            raise IndexError(f"COSMOS bank index {index} out of range [0, {self.n_sources}) for {self.uri}")

    def components(self, indices, center_arcsec, size_scale: float = 1.0) -> SourceComponents:
        """Unit-flux source morphologies for bank rows ``indices`` (B,), centred at ``center_arcsec`` (B, 2).

        Bulge + disk sources get two components (flux fractions from the fitted fluxes), others one Sersic
        in slot 0. ``size_scale`` multiplies every half-light radius (e.g. to map COSMOS sizes to a target
        redshift).
        """
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        self._check_index(idx)
        d = {k: v[idx] for k, v in self.data.items()}
        bd = d["use_bulgefit"].astype(bool)
        b = len(idx)
        tot = np.where(bd, d["bulge_flux_hst"] + d["disk_flux_hst"], 1.0)
        frac = np.zeros((b, 2))
        frac[:, 0] = np.where(bd, d["bulge_flux_hst"] / tot, 1.0)
        frac[:, 1] = np.where(bd, d["disk_flux_hst"] / tot, 0.0)

        def pair(bulge, disk, sersic, fill):
            return np.stack([np.where(bd, bulge, sersic), np.where(bd, disk, fill)], axis=1)

        q_fix = lambda v: np.clip(np.nan_to_num(v, nan=1.0), 1e-3, 1.0)  # noqa: E731
        return SourceComponents(
            flux_frac=frac,
            hlr_arcsec=size_scale * pair(d["bulge_hlr_arcsec"], d["disk_hlr_arcsec"], d["hlr_arcsec"], 1.0),
            n=pair(4.0, 1.0, d["sersic_n"], 1.0),
            q=q_fix(pair(d["bulge_q"], d["disk_q"], d["q"], 1.0)),
            phi_rad=np.nan_to_num(pair(d["bulge_phi_rad"], d["disk_phi_rad"], d["phi_rad"], 0.0)),
            center_arcsec=np.broadcast_to(np.asarray(center_arcsec, dtype=float).reshape(-1, 2), (b, 2)),
        )

    def galsim_object(self, index: int):
        """The same source as a GalSim object (unit-free HST flux), for checks and GalSim-based rendering."""
        import galsim

        r = self.record(index)
        if r["use_bulgefit"]:
            bulge = galsim.DeVaucouleurs(flux=r["bulge_flux_hst"], half_light_radius=r["bulge_hlr_arcsec"])
            disk = galsim.Exponential(flux=r["disk_flux_hst"], half_light_radius=r["disk_hlr_arcsec"])
            if r["bulge_q"] < 1:
                bulge = bulge.shear(q=r["bulge_q"], beta=r["bulge_phi_rad"] * galsim.radians)
            if r["disk_q"] < 1:
                disk = disk.shear(q=r["disk_q"], beta=r["disk_phi_rad"] * galsim.radians)
            return bulge + disk
        gal = galsim.Sersic(r["sersic_n"], flux=r["flux_hst"], half_light_radius=r["hlr_arcsec"])
        if r["q"] < 1:
            gal = gal.shear(q=r["q"], beta=r["phi_rad"] * galsim.radians)
        return gal


# ----------------------------------------------------------------------------------------------- build


def _catalog_paths(cosmos_dir: str, catalog_name: str | None) -> tuple[Path, Path, Path]:
    d = Path(cosmos_dir).expanduser()
    if not d.is_dir():
        raise CosmosBankError(
            f"COSMOS folder not found: {cosmos_dir}. Give the folder holding real_galaxy_catalog_*.fits "
            "(GalSim's COSMOS files; `galsim_download_cosmos` fetches the full catalogs)."
        )
    if catalog_name is None:
        cands = sorted(
            p
            for p in d.glob("real_galaxy_catalog_*.fits")
            if not p.name.endswith(("_fits.fits", "_selection.fits"))
        )
        if not cands:
            raise CosmosBankError(
                f"no real_galaxy_catalog_*.fits in {d}. Give the folder with GalSim's COSMOS catalog files."
            )
        if len(cands) > 1:
            raise CosmosBankError(
                f"several COSMOS catalogs in {d}: {[p.name for p in cands]}. Pick one with --catalog-name."
            )
        main = cands[0]
    else:
        main = d / catalog_name
    fits_file = main.with_name(main.name.replace(".fits", "_fits.fits"))
    selection = main.with_name(main.name.replace(".fits", "_selection.fits"))
    if not fits_file.exists():
        raise CosmosBankError(f"parametric fit file missing: {fits_file} (it comes with {main.name}).")
    return main, fits_file, selection


def _exclusion_mask(param, selection, level: str) -> np.ndarray:
    """GalSim ``COSMOSCatalog._apply_exclusion`` (use_real=False, default cut values)."""
    mask = np.ones(len(param), dtype=bool)
    if level in ("marginal", "bad_stamp"):
        if selection is None:
            raise CosmosBankError(
                f"exclusion level {level!r} needs the *_selection.fits file; use --exclusion-level bad_fits "
                "or none, or add the selection file."
            )
        peak = np.array(selection["peak_image_pixel_count"], dtype=float)
        peak[peak == 0.0] = 1e-5
        mask &= (selection["sn_ellip_gauss"] >= 10.0) & (
            (selection["min_mask_dist_pixels"] > 11)
            | (selection["average_mask_adjacent_pixel_count"] / peak < 0.8)
        )
    sersic_ok = (param["fit_status"][:, 4] > 0) & (param["fit_status"][:, 4] < 5)
    bulge_ok = (param["fit_status"][:, 0] > 0) & (param["fit_status"][:, 0] < 5)
    if level in ("bad_fits", "marginal"):
        mask &= sersic_ok | bulge_ok
    if level == "marginal":
        mask &= sersic_ok & bulge_ok
        mask &= (param["sersicfit"][:, 2] < 5) | (param["hlr"][:, 0] < 1.0)
        mask &= np.abs(selection["dmag"]) < 0.8
    # a parametric model must exist at all (GalSim raises for these)
    mask &= (param["use_bulgefit"] != 0) | (param["viable_sersic"] != 0)
    return mask


def _bank_arrays(param) -> dict[str, np.ndarray]:
    sf = np.asarray(param["sersicfit"], dtype=float)
    bf = np.asarray(param["bulgefit"], dtype=float)
    hlr = np.asarray(param["hlr"], dtype=float)
    flux = np.asarray(param["flux"], dtype=float)
    use_bd = np.asarray(param["use_bulgefit"]) != 0
    model_flux = np.where(use_bd, flux[:, 1] + flux[:, 2], flux[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        model_mag = np.where(model_flux > 0, HST_F814W_ZERO_POINT - 2.5 * np.log10(model_flux), np.nan)
    return {
        "ident": np.asarray(param["IDENT"], dtype=np.int64),
        "sersic_n": np.clip(sf[:, 2], 0.3, 6.0),
        "hlr_arcsec": hlr[:, 0],
        "hlr_major_arcsec": sf[:, 1] * COSMOS_PIXEL_SCALE_ARCSEC,
        "q": sf[:, 3],
        "phi_rad": sf[:, 7],
        "flux_hst": flux[:, 0],
        "mag_auto": np.asarray(param["mag_auto"], dtype=float),
        "model_flux_hst": model_flux,
        "model_mag_f814w": model_mag,
        "zphot": np.asarray(param["zphot"], dtype=float),
        "use_bulgefit": use_bd.astype(np.int8),
        "bulge_hlr_arcsec": hlr[:, 1],
        "bulge_flux_hst": flux[:, 1],
        "bulge_q": bf[:, 11],
        "bulge_phi_rad": bf[:, 15],
        "disk_hlr_arcsec": hlr[:, 2],
        "disk_flux_hst": flux[:, 2],
        "disk_q": bf[:, 3],
        "disk_phi_rad": bf[:, 7],
        "fit_mad_s": np.asarray(param["fit_mad_s"], dtype=float),
        "fit_mad_b": np.asarray(param["fit_mad_b"], dtype=float),
    }


def content_sha256(data: dict[str, np.ndarray]) -> str:
    """sha256 over all datasets in name order (name, dtype, shape, C-order bytes): stable across rebuilds."""
    h = hashlib.sha256()
    for name in sorted(data):
        arr = np.ascontiguousarray(data[name])
        h.update(name.encode())
        h.update(arr.dtype.str.encode())
        h.update(json.dumps(list(arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _render_bank_images(bank: CosmosBank, stamp_size: int, pixel_scale_arcsec: float, progress) -> np.ndarray:
    """Unit-flux, pixel-integrated, unconvolved images of every source (the torch renderer, no PSF)."""
    import torch

    from constellation_assets.sim.render import render_stamps

    out = np.zeros((bank.n_sources, stamp_size, stamp_size), dtype=np.float32)
    chunk = 64
    for start in range(0, bank.n_sources, chunk):
        idx = np.arange(start, min(start + chunk, bank.n_sources))
        comps = bank.components(idx, np.zeros((len(idx), 2)))
        res = render_stamps(
            comps,
            np.ones((len(idx), 1)),
            stamp_size_pix=stamp_size,
            pixel_scale_arcsec=pixel_scale_arcsec,
            psf=None,
            oversampling=4,
            render_margin_pix=0,
            dtype=torch.float64,
        )
        out[idx] = res.images_adu[:, 0].numpy().astype(np.float32)
        if progress is not None:
            progress(int(idx[-1]) + 1, bank.n_sources)
    return out


def build_cosmos_bank(
    cosmos_dir: str | os.PathLike,
    output_uri: str,
    *,
    include_images: bool = False,
    stamp_size: int = 96,
    image_pixel_scale_arcsec: float = COSMOS_PIXEL_SCALE_ARCSEC,
    exclusion_level: str = "marginal",
    catalog_name: str | None = None,
    storage_options: dict | None = None,
    progress=None,
) -> BankSummary:
    """Build the HDF5 bank from GalSim's COSMOS catalog files in ``cosmos_dir`` and write it atomically.

    ``include_images`` adds ``images`` (N, stamp_size, stamp_size) float32: each source's parametric model
    at unit flux, without PSF, pixel-integrated at ``image_pixel_scale_arcsec``, centred on pixel (S//2, S//2)
    (light beyond the stamp is cut, so an image sums to the fraction of the flux inside it).
    ``progress(done, total)`` is called while rendering images. Returns a :class:`BankSummary`.
    """
    from astropy.io import fits

    if exclusion_level not in EXCLUSION_LEVELS:
        raise CosmosBankError(f"exclusion level must be one of {EXCLUSION_LEVELS}, got {exclusion_level!r}")
    main, fits_file, sel_file = _catalog_paths(str(cosmos_dir), catalog_name)
    try:
        with fits.open(fits_file) as hdul:
            param = np.array(hdul[1].data)
        selection = None
        if sel_file.exists():
            with fits.open(sel_file) as hdul:
                selection = np.array(hdul[1].data)
    except (OSError, KeyError, IndexError) as exc:
        raise CosmosBankError(f"cannot read COSMOS catalog {fits_file}: {exc}") from exc
    missing = [
        c
        for c in ("IDENT", "sersicfit", "bulgefit", "fit_status", "hlr", "flux", "use_bulgefit")
        if c not in param.dtype.names
    ]
    if missing:
        raise CosmosBankError(
            f"{fits_file} lacks columns {missing}: not a current GalSim COSMOS parametric catalog "
            "(re-download with `galsim_download_cosmos`)."
        )
    mask = _exclusion_mask(param, selection, exclusion_level)
    arrays = {k: v[mask] for k, v in _bank_arrays(param).items()}
    if len(arrays["ident"]) == 0:
        raise CosmosBankError(f"no COSMOS source passes exclusion level {exclusion_level!r} in {fits_file}")

    images = None
    if include_images:
        tmp_bank = CosmosBank(uri=str(output_uri), data=arrays, attrs={})
        images = _render_bank_images(tmp_bank, stamp_size, image_pixel_scale_arcsec, progress)
    datasets = dict(arrays)
    if images is not None:
        datasets["images"] = images
    digest = content_sha256(datasets)
    import galsim
    import h5py

    attrs = {
        "bank_version": BANK_VERSION,
        "input_catalog": main.name,
        "input_parametric_catalog": fits_file.name,
        "input_selection_catalog": sel_file.name if selection is not None else "",
        "exclusion_level": exclusion_level,
        "n_sources": int(len(arrays["ident"])),
        "n_input": int(len(param)),
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "content_sha256": digest,
        "flux_units": "HST F814W counts in 1 s (GalSim COSMOSCatalog normalisation)",
        "hst_f814w_zero_point": HST_F814W_ZERO_POINT,
        "hlr_convention": "circularised sqrt(a*b), arcsec; Sersic n clipped to [0.3, 6] like GalSim",
        "galsim_version": galsim.__version__,
        "includes_images": bool(images is not None),
    }
    if images is not None:
        attrs["image_pixel_scale_arcsec"] = float(image_pixel_scale_arcsec)
        attrs["image_stamp_size"] = int(stamp_size)
        attrs["image_convention"] = "unit flux, pixel-integrated, centred on pixel (S//2, S//2)"

    with (
        atomic_output(str(output_uri), storage_options, suffix=".h5") as tmp,
        h5py.File(tmp, "w", track_order=True) as f,
    ):
        for name, arr in datasets.items():
            f.create_dataset(
                name,
                data=arr,
                compression="gzip" if arr.ndim > 1 else None,
                track_times=False,
            )
        for k, v in attrs.items():
            f.attrs[k] = v
    return BankSummary(
        uri=str(output_uri),
        n_sources=attrs["n_sources"],
        n_input=attrs["n_input"],
        exclusion_level=exclusion_level,
        content_sha256=digest,
        includes_images=images is not None,
        input_catalog=main.name,
    )


# ------------------------------------------------------------------------------------------------ load


def _fingerprint(uri: str, storage_options: dict | None) -> str:
    fs, path = get_fs(uri, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataAccessError(
            uri,
            "COSMOS bank not found",
            "build it with `constellation bank build --cosmos-dir DIR --output URI`",
        ) from None
    except Exception as exc:
        raise DataAccessError(
            uri, f"cannot stat COSMOS bank ({exc})", "check the path and credentials"
        ) from exc
    return (
        str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
        + f":{info.get('size')}"
    )


def load_cosmos_bank(uri: str | os.PathLike, storage_options: dict | None = None) -> CosmosBank:
    """Read a bank from a path or s3:// URI, cached per process on (uri, mtime/etag, size).

    Raises :class:`~constellation_assets.io.uri.DataAccessError` if it cannot be read and
    :class:`CosmosBankError` if it is not a complete bank.
    """
    uri = str(uri)
    key = json.dumps(storage_options or {}, sort_keys=True, default=str)
    return _load_cached(uri, _fingerprint(uri, storage_options), key)


@functools.lru_cache(maxsize=8)
def _load_cached(uri: str, fingerprint: str, storage_key: str) -> CosmosBank:
    import h5py

    storage_options = json.loads(storage_key) or None
    try:
        if is_s3(uri):
            handle = h5py.File(io.BytesIO(read_bytes(uri, storage_options)), "r")
        else:
            handle = h5py.File(Path(uri).expanduser(), "r")
    except OSError as exc:
        raise CosmosBankError(
            f"{uri} is not a readable HDF5 COSMOS bank ({exc}); rebuild it with `constellation bank build`."
        ) from exc
    try:
        with handle as f:
            missing = [d for d in REQUIRED_DATASETS if d not in f]
            if missing:
                raise CosmosBankError(
                    f"{uri} lacks datasets {missing}: not a COSMOS bank of version {BANK_VERSION}; "
                    "rebuild it with `constellation bank build`."
                )
            data = {k: f[k][()] for k in f if k != "images"}
            images = f["images"][()] if "images" in f else None
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CosmosBankError):
            raise
        raise CosmosBankError(
            f"{uri}: the bank's data cannot be read ({type(exc).__name__}: {exc}); the file is damaged: "
            "rebuild it with `constellation bank build` or copy it again."
        ) from exc
    # The recorded digest is verified against the content, so a bank edited in place (or damaged) is never
    # used under its old identity: runs record the digest of what they actually read.
    recorded = str(attrs.get("content_sha256") or "")
    actual = content_sha256({**data, **({"images": images} if images is not None else {})})
    if recorded and recorded != actual:
        raise CosmosBankError(
            f"{uri}: content sha256 {actual[:16]}... differs from the digest recorded in the bank "
            f"({recorded[:16]}...): the file was modified or damaged after it was built. Rebuild it with "
            "`constellation bank build` (or restore the original file)."
        )
    attrs["content_sha256"] = actual
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) != 1 or next(iter(lengths.values())) == 0:
        raise CosmosBankError(
            f"{uri}: datasets have inconsistent or zero lengths {lengths}; rebuild the bank."
        )
    return CosmosBank(uri=uri, data=data, attrs=attrs, images=images)


def read_cosmos_sersic_sample(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``cosmos_sersics_sample_N300_cleaned.asc`` (ident, Sersic n, hlr arcsec, |g|, angle rad, ...)."""
    arr = np.loadtxt(path, comments="#", ndmin=2)
    if arr.shape[1] < 5:
        raise CosmosBankError(f"{path}: expected >= 5 columns (ident n hlr |g| angle), got {arr.shape[1]}")
    g = arr[:, 3]
    return {
        "ident": arr[:, 0].astype(np.int64),
        "sersic_n": arr[:, 1],
        "hlr_arcsec": arr[:, 2],
        "g_abs": g,
        "q": (1 - g) / (1 + g),  # reduced-shear |g| -> axis ratio (GalSim shear convention)
        "phi_rad": arr[:, 4],
    }
