"""Pipeline configuration: one pydantic model for the shear catalog and the injection simulations.

Loading follows the Gen5 seed's precedence: built-in defaults < command-line flags < values present in the
``--config`` file (YAML or JSON, local path or ``s3://``). Every flag that the file overrides is logged.
Unknown keys are errors that name the key and suggest the closest valid one.

A saved effective config (``run_config_{experiment_id}.json``, see :mod:`constellation_assets.provenance`) is
itself a valid config: its provenance fields (timestamp, versions, hash) are ignored on load, so
``load_config(run_config_path)`` reproduces the run.

The seed's flat injection keys (``stage``, ``variant``, ``experiment_id``, ``source_mode``, ...) are accepted at the
top level of a file and as bare override names; they live in the ``injection`` section.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from constellation_assets import euclid
from constellation_assets.io.uri import (
    DataAccessError,
    is_s3,
    join_uri,
    read_text,
    redact_uri,
    storage_options_for,
)

log = logging.getLogger(__name__)

__all__ = [
    "CalibrationConfig",
    "ComputeConfig",
    "ConfigError",
    "DataConfig",
    "FieldConfig",
    "InjectionConfig",
    "OutputConfig",
    "PipelineConfig",
    "S3Config",
    "ShearConfig",
    "TilingConfig",
    "load_config",
    "resolve_override_key",
]

#: Keys a saved run_config record adds on top of the config; ignored when it is loaded back.
PROVENANCE_KEYS = frozenset(
    {
        "execution_timestamp_utc",
        "versions",
        "config_hash",
        "git_commit",
        "spark_version",
        "record_type",
        "stage_dir",
        "status",
        "completed_utc",
        "error",
        "lease",
        "run_id",
        "extra",
        "output_uri_written",
    }
)


class ConfigError(ValueError):
    """A config could not be loaded or is invalid. The message names the key/file and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Config(_Section):
    """S3 access. Credentials are never stored here: they come from the environment (AWS_* variables)."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    anon: bool = Field(False, description="anonymous access (public buckets such as nasa-irsa-euclid-q1)")
    region: str | None = Field("us-east-1", description="bucket region")

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_url(cls, v: str | None) -> str | None:
        if v and "@" in v.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError(
                "endpoint_url must not contain credentials (user:password@host); "
                "pass them through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead"
            )
        return v


class TilingConfig(_Section):
    sub_tile_grid: tuple[int, int] = Field((4, 4), description="sub-tiles per tile (rows, cols)")
    sub_tile_margin_arcmin: float = Field(1.0, ge=0.0, description="overlap margin on every side of a core")
    tile_core_arcmin: float = Field(30.0, gt=0.0, description="MER tile core size")
    tile_extended_arcmin: float = Field(32.0, gt=0.0, description="MER tile extended size (cores tile this)")

    @field_validator("sub_tile_grid")
    @classmethod
    def _grid_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[1] < 1 or v[0] > 64 or v[1] > 64:
            raise ValueError(f"sub_tile_grid must be two integers in 1..64, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _margin_lt_half_core(self) -> TilingConfig:
        if self.tile_extended_arcmin < self.tile_core_arcmin:
            raise ValueError(
                f"tile_extended_arcmin ({self.tile_extended_arcmin}) must be >= tile_core_arcmin "
                f"({self.tile_core_arcmin})"
            )
        core = min(self.sub_tile_core_arcmin)
        if self.sub_tile_margin_arcmin >= core / 2:
            raise ValueError(
                f"sub_tile_margin_arcmin={self.sub_tile_margin_arcmin} must be less than half the sub-tile core "
                f"({core:g}' / 2 = {core / 2:g}'); reduce the margin or the grid"
            )
        return self

    @property
    def sub_tile_core_arcmin(self) -> tuple[float, float]:
        return (
            self.tile_extended_arcmin / self.sub_tile_grid[0],
            self.tile_extended_arcmin / self.sub_tile_grid[1],
        )


class DataConfig(_Section):
    """Input data in the Euclid Q1 layout (local folder or s3://)."""

    vis_base_uri: str = Field(
        ".constellation/data/q1/VIS/", description="prefix holding {obs_id}/ VIS folders"
    )
    catalog_base_uri: str = Field(
        ".constellation/data/q1/catalogs/MER_FINAL_CATALOG/",
        description="prefix holding {tile_id}/ MER final catalogs",
    )
    include_short_exposures: bool = Field(
        True,
        description="use the short (~90 s, DET '-{dither}-2-') VIS exposures as well as the nominal ~560 s ones: "
        "they are real photons, measured with their own noise and PSF and combined by inverse variance "
        "(false keeps only the '-1-' exposures, as SHINE does; the exclusion is logged)",
    )
    tile_association_uri: str | None = Field(
        None,
        description="table of (tile id, observation id) pairs, CSV or Parquet (IRSA's euclid.tileid_association_q1 "
        "export): a tile then lists and indexes only its observations, instead of every folder under "
        "vis_base_uri (pointing pre-filter)",
    )
    s3: S3Config = Field(default_factory=S3Config)

    @property
    def roots(self) -> list[str]:
        """Data roots: manifest paths outside these are rejected."""
        out = []
        for uri in (self.vis_base_uri, self.catalog_base_uri):
            out.append(_q1_root(uri))
        return sorted(set(out))


def _q1_root(uri: str) -> str:
    """The folder above ``q1/`` for a Q1-layout prefix (or the prefix itself)."""
    s = str(uri).rstrip("/")
    marker = "/q1/"
    if marker in s + "/":
        return (s + "/").split(marker, 1)[0] or "/"
    return s


class OutputConfig(_Section):
    root_uri: str = Field(".constellation/output", description="root for all outputs (local or s3://)")
    manifest_dir: str | None = Field(None, description="default {root_uri}/manifests")
    result_dir: str | None = Field(None, description="default {root_uri}/results")
    tile_dir: str | None = Field(
        None, description="per-tile products (sources, quadrants); default {root_uri}/tiles"
    )
    catalog_warehouse: str | None = Field(None, description="Iceberg warehouse; default {root_uri}/warehouse")
    catalog_uri: str | None = Field(
        None,
        description="Iceberg SQL catalog URI; default sqlite:///{root_uri}/catalog.db "
        "(production: postgresql+psycopg2://user@host/db, password via PGPASSWORD)",
    )
    catalog_type: Literal["sql", "rest", "glue"] = "sql"
    catalog_name: str = "constellation"
    namespace: str = "shear"
    s3: S3Config | None = Field(None, description="S3 settings for outputs; default: same as data.s3")

    @field_validator("catalog_uri")
    @classmethod
    def _no_password_in_catalog_uri(cls, v: str | None) -> str | None:
        if v and "://" in v:
            netloc = v.split("://", 1)[1].split("/", 1)[0]
            if "@" in netloc and ":" in netloc.split("@", 1)[0]:
                raise ValueError(
                    "catalog_uri must not contain a password; give it through the environment "
                    "(PGPASSWORD for PostgreSQL) instead"
                )
        return v

    def _under_root(self, value: str | None, name: str) -> str:
        return value if value else join_uri(self.root_uri, name)

    @property
    def manifests(self) -> str:
        return self._under_root(self.manifest_dir, "manifests")

    @property
    def results(self) -> str:
        return self._under_root(self.result_dir, "results")

    @property
    def tiles(self) -> str:
        return self._under_root(self.tile_dir, "tiles")

    @property
    def warehouse(self) -> str:
        w = self._under_root(self.catalog_warehouse, "warehouse")
        return w if is_s3(w) else str(Path(w).expanduser().absolute())

    @property
    def catalog(self) -> str:
        if self.catalog_uri:
            return self.catalog_uri
        if is_s3(self.root_uri):
            raise ConfigError(
                "output.catalog_uri must be set when output.root_uri is on S3 (SQLite cannot live on S3); "
                "use a PostgreSQL/REST/Glue catalog"
            )
        db = Path(self.root_uri).expanduser().absolute() / "catalog.db"
        return f"sqlite:///{db}"


class ComputeConfig(_Section):
    backend: Literal["local", "k8s"] = "local"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    batch_size: int = Field(1024, ge=1, le=1_000_000, description="stamps per estimator batch")
    workers: int = Field(1, ge=1, le=256, description="parallel worker processes for local runs")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")


class ShearConfig(_Section):
    """Shear estimator settings (built-in PyTorch estimator)."""

    method: Literal["fpfs"] = "fpfs"
    stamp_size_pix: int = Field(64, ge=16, le=512)
    # 4, not 5: in the field calibration with a measured MER catalog (configs/field_calibration_mer.yaml) the
    # FPFS S/N >= 10 weight still holds 1.1e-4 of the summed weight at MER S/N < 5 (boundary estimate
    # |dm| ~ 1e-4) and 7e-7 at MER S/N < 4 (dm = -2e-6 +- 2e-6); the extra rows are 0.3 % of the stamps.
    snr_min: float = Field(
        4.0,
        ge=0.0,
        description="MER detection S/N preselection of shear-grade sources: a loose cut far below "
        "estimator_snr_min (it has no response; the FPFS selection weight above it carries the selection)",
    )
    sigma_arcsec: float = Field(
        0.35, gt=0.0, le=3.0, description="FPFS Gaussian weight scale (real space); must exceed the PSF sigma"
    )
    c_ratio: float = Field(
        4.0, ge=0.0, description="FPFS ellipticity denominator constant, in units of sigma(M00)"
    )
    estimator_snr_min: float = Field(
        10.0,
        ge=0.0,
        description="smooth selection on the FPFS S/N of the exposure-combined moments (0: none); "
        "its noise-corrected response goes into R",
    )
    selection_bin_width: float = Field(
        2.0,
        gt=0.0,
        description="S/N width of the selection weight's ramp (0 at snr_min, 1 at snr_min + width)",
    )
    noise_bias_correction: bool = Field(
        True,
        description="subtract the noise term of the shape and selection responses (exact for Gaussian noise)",
    )
    precision: Literal["float32", "float64"] = Field(
        "float32", description="FFT and moment precision (e, R and noise covariance: float64)"
    )
    detection: Literal["catalog", "pixels"] = Field(
        "catalog",
        description="catalog: measure stamps at the MER positions; pixels: detect sources on the exposures "
        "with their detection and selection responses (shear.detect_subtile), MER only for ids and the "
        "star prior",
    )
    detection_block_pix: int = Field(
        256, ge=32, le=4096, description="detection blocks: lattice pixels per side (pixels detection)"
    )
    detection_match_radius_arcsec: float = Field(
        0.5, gt=0.0, le=5.0, description="a detection takes the id of the nearest MER object within this"
    )
    detection_mask_radius_sigma: float = Field(
        1.0,
        ge=0.0,
        le=5.0,
        description="an exposure is left out of a detection pixel with a masked pixel within this many "
        "kernel sigmas (+ 2 pixels); masked pixels are zeroed, never interpolated",
    )
    detection_band_arcsec: float = Field(
        1.5,
        ge=0.0,
        le=30.0,
        description="each sub-tile also evaluates this band around its core (detections matched to its "
        "MER objects lie there); at least the match radius",
    )

    @field_validator("stamp_size_pix")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"stamp_size_pix must be even, got {v}")
        return v

    @model_validator(mode="after")
    def _band_holds_matches(self) -> ShearConfig:
        if self.detection_band_arcsec < self.detection_match_radius_arcsec:
            raise ValueError(
                f"shear.detection_band_arcsec ({self.detection_band_arcsec}) must be at least "
                f"shear.detection_match_radius_arcsec ({self.detection_match_radius_arcsec}): a detection "
                "named after a sub-tile's MER object may lie that far outside its core"
            )
        return self


class CalibrationConfig(_Section):
    """Image simulations with known shear, run through the same estimator to measure m and c."""

    n_galaxies: int = Field(2000, ge=2)
    g_true: float = Field(0.02, gt=0.0, lt=0.2)
    psf_model: Literal["moffat", "gaussian"] = "moffat"
    psf_fwhm_arcsec: float = Field(euclid.VIS_PSF_FWHM_ARCSEC, gt=0.0)
    moffat_beta: float = Field(3.5, gt=1.0)
    pixel_scale_arcsec: float = Field(0.1, gt=0.0)
    population: Literal["sersic", "bulge_disk", "cosmos", "fixed"] = "sersic"
    snr_min: float = Field(10.0, ge=0.0)
    noise_sigma: float = Field(0.0, ge=0.0, description="per-pixel noise std (0: noiseless)")
    seed: int = 42
    m_requirement: float = Field(2e-3, gt=0.0)
    c_requirement: float = Field(5e-4, gt=0.0)
    # Field-level calibration (`constellation calibrate --field`, shear/field_calibration.py): the synthetic
    # field of the `field` section run through the whole production path with +g/-g and 0/90-degree pairs.
    field_shear_g: tuple[float, float] = Field(
        (0.02, 0.02), description="(g1, g2) of the +g fields; the -g fields get (-g1, -g2); both non-zero"
    )
    field_rotated_pair: bool = Field(
        True, description="also run the 90-degree-rotated +g/-g pair (cancels shape noise in c)"
    )
    field_antithetic_noise: bool = Field(
        True,
        description="run every paired field twice, with the shared pixel-noise field N and -N: the noise term "
        "of the measured response, linear in N, cancels in the pair (the noise average is unchanged)",
    )
    field_work_dir: str | None = Field(
        None, description="data + output of every field; default {output.root_uri}/field_calibration"
    )
    field_blend_radius_arcsec: float = Field(
        1.5, gt=0.0, description="a source is 'blended' when another rendered object lies within this radius"
    )
    field_mer_snr_cuts: list[float] = Field(
        default_factory=lambda: [0.0, 3.0, 5.0, 7.0, 10.0],
        description="MER detection S/N cuts applied post hoc to the field calibration's rows: m, c and the "
        "paired dm = m(cut) - m(run's own shear.snr_min) per cut (run with shear.snr_min 0 to test them all)",
    )
    field_bin_edges: dict[str, list[float]] = Field(
        default_factory=lambda: {
            "snr": [0.0, 15.0, 25.0, 40.0, 80.0, 1e30],
            "hlr_arcsec": [0.0, 0.15, 0.25, 0.4, 1e30],
            "neighbour_arcsec": [0.0, 1.0, 2.0, 4.0, 1e30],
            "n_exposures": [0.5, 1.5, 2.5, 3.5, 1e30],
            "masked_fraction": [0.0, 0.01, 0.1, 1.0],
        },
        description="bin edges per bin variable (snr, hlr_arcsec, neighbour_arcsec, n_exposures, "
        "masked_fraction: used when the catalog has a MASKED_FRACTION column); 'blended' is always binned",
    )

    @field_validator("field_shear_g")
    @classmethod
    def _field_shear(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 < abs(x) < 0.2 for x in v):
            raise ValueError(
                f"field_shear_g must be two non-zero shears with |g| < 0.2 (m divides by each), got {list(v)}"
            )
        return v

    @field_validator("field_bin_edges")
    @classmethod
    def _bin_edges(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        allowed = {"snr", "hlr_arcsec", "neighbour_arcsec", "n_exposures", "masked_fraction"}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"field_bin_edges: unknown bin variable(s) {bad}; valid: {sorted(allowed)}")
        for k, e in v.items():
            if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:], strict=False)):
                raise ValueError(f"field_bin_edges.{k} must be >= 2 increasing edges, got {e}")
        return v


class FieldConfig(_Section):
    """Synthetic Euclid field in the exact Q1 layout (embedded default data).

    Each tile gets ``n_observations`` pointings near its centre, each with ``n_dithers`` dithers of a reduced
    VIS focal plane (``ccd_grid`` CCDs of 4 quadrants of ``quadrant_nx_pix`` x ``quadrant_ny_pix`` instead of
    6 x 6 CCDs of 2048 x 2066); every dither has a nominal exposure, those in ``short_exposure_dithers`` also a
    short one. Sources fill the area the exposures cover. Shear-calibration knobs: ``shear_g1`` /
    ``shear_g2`` (constant shear for every tile), ``intrinsic_rotation_deg``, ``shear_positions``,
    ``paired_noise`` and the PSF-model errors ``psf_model_size_error``, ``psf_model_e1_error``,
    ``psf_model_e2_error``. The generator lives in :mod:`constellation_assets.synthetic`.
    """

    tile_ids: list[int] = Field(
        default_factory=lambda: [102044185, 102044186], description="EDF-F MER tiles to simulate"
    )
    seed: int = 20250319
    first_obs_id: int = Field(2689, ge=0, le=999_999, description="obs_id of the first simulated observation")
    n_observations: int = Field(1, ge=1, le=50, description="observations (pointings) per tile")
    n_dithers: int = Field(3, ge=1, le=8, description="dithered exposures per observation")
    dither_offsets_arcsec: list[tuple[float, float]] = Field(
        default_factory=lambda: [(0.0, 0.0), (10.0, 25.0), (20.0, 50.0), (30.0, 75.0)],
        description="(dx, dy) of each dither along detector axes; cycled if shorter than n_dithers",
    )
    pointing_jitter_arcsec: float = Field(
        20.0, ge=0.0, description="random offset of each pointing from the tile centre"
    )
    position_angle_deg: float = Field(0.0, description="detector y axis angle east of north")
    ccd_grid: tuple[int, int] = Field((2, 2), description="CCD rows x cols per exposure (real VIS: 6 x 6)")
    quadrant_nx_pix: int = Field(512, ge=64, le=2048, description="quadrant width (real: 2048)")
    quadrant_ny_pix: int = Field(516, ge=64, le=2066, description="quadrant height (real: 2066)")
    ccd_gap_pix: tuple[int, int] = Field((60, 120), description="gaps between CCDs (x, y) in pixels")
    pixel_scale_arcsec: float = Field(euclid.VIS_PIXEL_SCALE_ARCSEC, gt=0.0)
    galaxy_density_arcmin2: float = Field(
        60.0, ge=0.0, description="galaxies per arcmin^2 down to galaxy_mag_max"
    )
    galaxy_mag_min: float = 20.0
    galaxy_mag_max: float = 25.5
    star_density_arcmin2: float = Field(3.0, ge=0.0)
    star_mag_min: float = 16.5
    star_mag_max: float = 24.5
    psf_fwhm_arcsec: float = Field(
        euclid.VIS_PSF_FWHM_ARCSEC, gt=0.05, lt=1.0, description="PSF FWHM at the focal-plane centre"
    )
    psf_fwhm_variation: float = Field(
        0.05, ge=0.0, le=0.5, description="fractional FWHM growth at the corners"
    )
    psf_e_amplitude: float = Field(
        0.04, ge=0.0, le=0.2, description="PSF ellipticity at the focal-plane corners"
    )
    psf_model_size_error: float = Field(
        0.0, gt=-0.5, lt=0.5, description="dT/T of the PSF model in the PSF files vs the rendering PSF"
    )
    psf_model_e1_error: float = Field(
        0.0, gt=-0.2, lt=0.2, description="ellipticity (shear convention) added to the PSF model, e1"
    )
    psf_model_e2_error: float = Field(
        0.0, gt=-0.2, lt=0.2, description="ellipticity (shear convention) added to the PSF model, e2"
    )
    sky_level_adu: float = Field(45.0, ge=0.0, description="sky per pixel per exposure (~22.3 mag/arcsec^2)")
    read_noise_e: float = Field(4.5, ge=0.0)
    gain_e_per_adu: float = Field(3.48, gt=0.0)
    exptime_s: float = Field(
        euclid.VIS_EXPTIME_NOMINAL_S, gt=0.0, description="EXPTIME of the nominal exposures (exposure 1)"
    )
    short_exptime_s: float = Field(
        euclid.VIS_EXPTIME_SHORT_S, gt=0.0, description="EXPTIME of the short exposures (exposure 2)"
    )
    short_exposure_dithers: list[int] | None = Field(
        None,
        validate_default=True,
        description="dithers that also get a short exposure (exposure 2); None: the first two, as in the "
        "real VIS sequence; [] for none",
    )
    magzerop: float = Field(24.57, description="AB magnitude giving 1 ADU/s")
    saturation_adu: float = Field(60000.0, gt=0.0)
    cosmic_rate_per_mpix: float = Field(
        400.0, ge=0.0, description="cosmic-ray hits per megapixel per exposure"
    )
    hot_pixel_fraction: float = Field(2e-4, ge=0.0, le=0.01)
    cold_pixel_fraction: float = Field(5e-5, ge=0.0, le=0.01)
    shear_model: Literal["constant", "smooth_map"] = "constant"
    shear_g1: float | None = Field(
        None, gt=-0.5, lt=0.5, description="shear g1 of every tile (None: drawn per tile from the seed)"
    )
    shear_g2: float | None = Field(
        None, gt=-0.5, lt=0.5, description="shear g2 of every tile (None: drawn per tile from the seed)"
    )
    shear_amplitude: float = Field(0.03, ge=0.0, lt=0.3, description="|g| scale of drawn/mapped shear")
    shear_wavelength_arcmin: float = Field(6.0, gt=0.0, description="wavelength of the smooth shear map")
    shear_positions: bool = Field(
        True,
        description="shear the whole scene: positions too (lensing map in the tile tangent plane, kappa = 0)",
    )
    scene_shear_group_arcsec: float | None = Field(
        None,
        gt=0.0,
        le=60.0,
        description="with shear_positions: shear each friends-of-friends group of galaxies (this linking "
        "length, arcsec) about its own centre instead of the tile centre (blends stay exact sheared copies; "
        "galaxies keep their noise pixels across paired fields)",
    )
    intrinsic_rotation_deg: float = Field(
        0.0, description="rotate every galaxy's intrinsic orientation before shearing (90: the partner field)"
    )
    paired_noise: bool = Field(
        False,
        description="Gaussian noise with the Poisson + read variance, drawn independently of the image: "
        "fields that differ only in shear share noise, cosmics and masks",
    )
    noise_sign: Literal[1, -1] = Field(
        1,
        description="with paired_noise: -1 negates the shared noise draw (the antithetic partner of a field; "
        "the field calibration pairs N and -N so the noise term of the measured response cancels)",
    )
    truth_base_uri: str | None = Field(None, description="truth tables; default {q1 root}/sim_truth")
    mer_catalog: Literal["measured", "truth"] = Field(
        "measured",
        description="MER catalog from detection and measurement on the VIS mosaic, or from the truth",
    )
    catalog_snr_min: float = Field(
        3.0, ge=0.0, description="MER detection threshold of the synthetic catalog (detection-flux S/N)"
    )
    catalog_detect_nsigma: float = Field(
        5.0, gt=0.0, description="peak threshold on the smoothed VIS mosaic (noise sigmas)"
    )
    catalog_deblend_arcsec: float = Field(
        0.5, gt=0.0, le=3.0, description="peaks closer than this are merged into one detection"
    )
    spurious_fraction: float = Field(0.005, ge=0.0, le=0.2)
    write_mer_mosaics: bool = Field(
        True,
        description="also write background-subtracted MER mosaics (q1/MER/{tile_id}/VIS|NISP/) of the simulated area",
    )
    mer_bands: list[str] = Field(
        default_factory=lambda: ["VIS", "NIR_Y", "NIR_J", "NIR_H"],
        description="bands of the MER mosaics (VIS, NIR_Y, NIR_J, NIR_H)",
    )

    @field_validator("short_exposure_dithers", mode="after")
    @classmethod
    def _short_dithers(cls, v: list[int] | None, info: ValidationInfo) -> list[int]:
        n = int(info.data.get("n_dithers", 1))
        if v is None:
            return list(range(min(2, n)))
        bad = [d for d in v if not (0 <= int(d) < n)]
        if bad or len(set(v)) != len(v):
            raise ValueError(
                f"short_exposure_dithers {v}: need distinct dither numbers in 0..{n - 1} (n_dithers = {n}); "
                "[] for no short exposures"
            )
        return [int(d) for d in v]

    @field_validator("ccd_grid")
    @classmethod
    def _ccd_grid(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not (1 <= v[0] <= 6 and 1 <= v[1] <= 6):
            raise ValueError(
                f"ccd_grid must be two integers in 1..6 (the VIS focal plane is 6 x 6), got {list(v)}"
            )
        return v

    @model_validator(mode="after")
    def _ranges(self) -> FieldConfig:
        if self.galaxy_mag_max <= self.galaxy_mag_min or self.star_mag_max <= self.star_mag_min:
            raise ValueError("galaxy/star magnitude ranges must have max > min")
        bad = [t for t in self.tile_ids if not (100_000_000 <= int(t) <= 999_999_999)]
        if bad or not self.tile_ids:
            raise ValueError(
                f"field.tile_ids must be non-empty 9-digit Euclid MER tile ids, got {self.tile_ids[:5]}"
            )
        return self


class InjectionConfig(_Section):
    """The Gen5 seed's injection stage settings (keys and defaults as in the seed)."""

    stage: str = "4c"
    variant: str = "v1"
    experiment_id: str = "train_stamp64"
    source_mode: Literal["sersic", "cosmos"] = "sersic"
    cosmos_bank_h5: str | None = None
    cosmos_salt: str = ""
    seed_base: int = 42
    psf_model: Literal["moffat", "gaussian"] = "moffat"
    moffat_beta: float = 3.5
    split_seed: int = 99887766
    tiers: list[str] = Field(default_factory=lambda: ["train"])
    n_total_train_per_split: int = Field(256, ge=1)
    partitions: int = Field(4, ge=1, le=100_000)
    output_uri: str | None = Field(None, description="default {output.root_uri}/injections")
    stamp_size_pix: int = Field(64, ge=8, le=1024)
    bands: list[str] = Field(default_factory=lambda: ["VIS"])
    psf_fwhm_arcsec: dict[str, float] = Field(default_factory=lambda: {"VIS": euclid.VIS_PSF_FWHM_ARCSEC})
    pixel_scale_arcsec: float = Field(0.1, gt=0.0)
    force: bool = False
    lease_timeout_s: float = Field(
        900.0,
        gt=0.0,
        description="a run's lease on its output location is stale (taken over) when not renewed for this long",
    )
    lease_wait_s: float = Field(
        0.0,
        ge=0.0,
        description="how long a second run waits for the lease of a running one (0: refuse at once)",
    )
    exclude_damaged_frames: bool = Field(
        False,
        description="skip VIS frames that cannot be read (recorded in the run record) instead of failing the run",
    )
    # Injection physics and host selection. Ranges are [min, max] of uniform draws per task.
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
        description="fraction of hosts in each split (hash of split_seed and the host id)",
    )
    theta_e_range_arcsec: tuple[float, float] = Field((0.5, 2.0), description="SIE Einstein radius")
    lens_q_range: tuple[float, float] = Field((0.5, 1.0), description="SIE axis ratio (minor/major)")
    external_shear_max: float = Field(0.1, ge=0.0, lt=0.5, description="max |gamma_ext| (uniform in |gamma|)")
    source_offset_max_frac: float = Field(
        0.8, gt=0.0, le=3.0, description="max source-plane offset from the lens centre, in units of theta_E"
    )
    source_mag_range: tuple[float, float] = Field((22.0, 25.0), description="unlensed source AB mag (VIS)")
    source_hlr_range_arcsec: tuple[float, float] = Field((0.1, 0.5), description="Sersic source hlr")
    source_n_range: tuple[float, float] = Field((0.7, 2.5), description="Sersic source index")
    source_q_range: tuple[float, float] = Field((0.4, 1.0), description="Sersic source axis ratio")
    host_mag_range: tuple[float, float] = Field(
        (17.0, 22.5), description="host (lens galaxy) AB magnitude window from FLUX_DETECTION_TOTAL"
    )
    host_min_semimajor_axis_pix: float = Field(
        2.5, ge=0.0, description="minimum MER SEMIMAJOR_AXIS (VIS pixels) of an extended host"
    )
    host_snr_min: float = Field(20.0, ge=0.0, description="minimum MER detection S/N of a host")
    oversampling: int = Field(4, ge=1, le=16, description="sub-pixels per pixel side when ray-shooting")
    arc_poisson_noise: bool = Field(
        True, description="add the arc's own Poisson noise (gain from the header)"
    )
    register_catalog: bool = Field(True, description="register stamps in the Iceberg table sim.injections")

    @field_validator(
        "theta_e_range_arcsec",
        "lens_q_range",
        "source_mag_range",
        "source_hlr_range_arcsec",
        "source_n_range",
        "source_q_range",
        "host_mag_range",
    )
    @classmethod
    def _range(cls, v: tuple[float, float], info) -> tuple[float, float]:
        if not v[0] <= v[1]:
            raise ValueError(f"{info.field_name} must be [min, max] with min <= max, got {list(v)}")
        return v

    @field_validator("stage", "variant", "experiment_id")
    @classmethod
    def _path_segment(cls, v: str, info) -> str:
        # These name folders and files of the output: one safe path segment each.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", str(v)) or ".." in str(v):
            raise ValueError(
                f"{info.field_name} {v!r} must be one path segment of letters, digits, '.', '_' or '-' "
                "(starting with a letter or digit, no '..', at most 128 characters), e.g. v5_cosmos_source"
            )
        return v

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if k not in ("train", "val", "test")]
        if bad or any(f < 0 for f in v.values()) or abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(
                f"split_fractions must map train/val/test to non-negative fractions summing to 1, got {v}"
            )
        return v

    @field_validator("moffat_beta")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not v > 1.0:
            raise ValueError(
                f"moffat_beta must be > 1 (the Moffat profile is not normalisable otherwise), got {v}"
            )
        return v

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v: list[str]) -> list[str]:
        allowed = {"train", "val", "test"}
        bad = [t for t in v if t not in allowed]
        if bad or not v:
            raise ValueError(f"tiers must be a non-empty subset of {sorted(allowed)}, got {v}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> InjectionConfig:
        if self.source_mode == "cosmos" and not self.cosmos_bank_h5:
            raise ValueError(
                "source_mode 'cosmos' needs cosmos_bank_h5 (path or s3:// URI of the COSMOS bank HDF5); "
                "build one with `constellation bank build --cosmos-dir DIR --output BANK.h5`"
            )
        missing = [b for b in self.bands if b not in self.psf_fwhm_arcsec]
        if missing:
            raise ValueError(
                f"psf_fwhm_arcsec has no FWHM for band(s) {missing}; add e.g. {{'{missing[0]}': 0.17}}"
            )
        return self

    @property
    def stage_dir(self) -> str:
        return f"phase{self.stage}"


class PipelineConfig(_Section):
    """The whole pipeline: shear catalog (tiles -> manifests -> shear -> Iceberg) and injection simulations."""

    field_name: str = "EDFF"
    tile_ids: list[int] = Field(
        default_factory=list, description="tiles to process; empty: the field's tiles"
    )
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    shear: ShearConfig = Field(default_factory=ShearConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    field: FieldConfig = Field(default_factory=FieldConfig)
    injection: InjectionConfig = Field(default_factory=InjectionConfig)
    # Opaque pass-through sections for an external inference engine (e.g. SHINE): kept as-is.
    inference: dict[str, Any] = Field(default_factory=dict)
    gal: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tile_ids")
    @classmethod
    def _tile_ids(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if not (100_000_000 <= int(t) <= 999_999_999)]
        if bad:
            raise ValueError(f"tile ids must be 9-digit Euclid MER tile ids, got {bad[:5]}")
        return v

    @property
    def selected_tile_ids(self) -> list[int]:
        return list(self.tile_ids) if self.tile_ids else list(self.field.tile_ids)

    def storage_options(self, uri: str) -> dict:
        """fsspec storage options for any URI of this config (outputs use output.s3 when given)."""
        uri = str(uri)
        s3 = self.data.s3
        if self.output.s3 is not None and uri.startswith(str(self.output.root_uri).rstrip("/")):
            s3 = self.output.s3
        return storage_options_for(uri, s3)

    @property
    def injection_output(self) -> str:
        return self.injection.output_uri or join_uri(self.output.root_uri, "injections")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------
# Loading


def _section_fields() -> dict[str, type[BaseModel]]:
    out = {}
    for name, f in PipelineConfig.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[name] = ann
    return out


#: The seed's CLI/JSON names that differ from ours.
ALIASES = {
    "output_s3": "injection.output_uri",
    "sweep_partitions": "injection.partitions",
    # the seed's shear-pipeline config (PipelineConfig of the Constellation seed), as flags
    "data.s3_region": "data.s3.region",
    "data.s3_no_sign_request": "data.s3.anon",
    "output.catalog_namespace": "output.namespace",
    "output.storage_base_uri": "output.root_uri",
    "output.extraction_dir": "output.tile_dir",
    "tiling.mer_tile_size_arcmin": "tiling.tile_extended_arcmin",
    "tiling.mer_core_size_arcmin": "tiling.tile_core_arcmin",
}


def resolve_override_key(key: str) -> tuple[str, ...]:
    """Map ``variant``, ``injection.variant`` or ``moffat-beta`` to a path in the config tree.

    Bare names resolve to a top-level field or, when unique, to a field of one section.
    """
    key = key.replace("-", "_")
    if key in ALIASES:
        key = ALIASES[key]
    parts = tuple(key.split("."))
    if len(parts) > 1:
        _check_path(parts)
        return parts
    if key in PipelineConfig.model_fields:
        return (key,)
    hits = [sec for sec, model in _section_fields().items() if key in model.model_fields]
    if len(hits) == 1:
        return (hits[0], key)
    if "injection" in hits:  # the seed's flat keys belong to the injection stage
        return ("injection", key)
    if len(hits) > 1:
        raise ConfigError(
            f"Ambiguous key {key!r}: it exists in sections {hits}; write it as e.g. '{hits[0]}.{key}'"
        )
    raise ConfigError(_unknown_key_message(key, _top_level_keys()))


def _check_path(parts: tuple[str, ...]) -> None:
    model: type[BaseModel] | None = PipelineConfig
    for i, p in enumerate(parts):
        if model is None:
            return  # inside an opaque dict section
        if p not in model.model_fields:
            valid = list(model.model_fields)
            raise ConfigError(
                _unknown_key_message(".".join(parts[: i + 1]), valid, prefix=".".join(parts[:i]))
            )
        ann = model.model_fields[p].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _top_level_keys() -> list[str]:
    """Keys valid at the top level of a file: the sections and fields, and the seed's flat injection keys."""
    return list(PipelineConfig.model_fields) + list(InjectionConfig.model_fields)


#: A section's keys are listed in an unknown-key error when it has at most this many.
_LIST_SECTION_KEYS_MAX = 25


def _unknown_key_message(key: str, valid: list[str], prefix: str = "") -> str:
    """``Unknown config key ...`` with the 3 closest keys of the same section (difflib), never a flat list."""
    leaf = key.rsplit(".", 1)[-1]
    leaves = sorted({v.rsplit(".", 1)[-1] for v in valid})
    cands = difflib.get_close_matches(leaf, leaves, n=3, cutoff=0.5)
    where = f" in section '{prefix}'" if prefix else ""
    msg = f"Unknown config key {key!r}{where}."
    if cands:
        if prefix:
            names = [f"{prefix}.{c}" for c in cands]
        else:  # a bare name accepted at the top level is shown where it lives
            names = [c if c in PipelineConfig.model_fields else f"injection.{c}" for c in cands]
        quoted = [repr(n) for n in names]
        msg += " Did you mean " + (
            quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        )
        msg += "?"
    if prefix and len(leaves) <= _LIST_SECTION_KEYS_MAX:
        msg += f" Keys of section '{prefix}': " + ", ".join(leaves)
    elif not prefix:
        msg += " Top-level keys: " + ", ".join(PipelineConfig.model_fields)
    return msg


def _set_path(d: dict, path: tuple[str, ...], value: Any) -> None:
    cur = d
    for p in path[:-1]:
        cur = cur.setdefault(p, {})
    cur[path[-1]] = value


def _get_path(d: dict, path: tuple[str, ...]) -> tuple[bool, Any]:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return False, None
        cur = cur[p]
    return True, cur


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("inference", "gal"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


#: The seed's shear-pipeline keys (section, key) that are renamed here: -> (section, ..., key).
SEED_RENAMES: dict[tuple[str, str], tuple[str, ...]] = {
    ("data", "s3_region"): ("data", "s3", "region"),
    ("data", "s3_no_sign_request"): ("data", "s3", "anon"),
    ("output", "catalog_namespace"): ("output", "namespace"),
    ("output", "storage_base_uri"): ("output", "root_uri"),
    # the seed extracts per-sub-tile inputs there; our nearest is the per-tile products folder
    ("output", "extraction_dir"): ("output", "tile_dir"),
    ("tiling", "mer_tile_size_arcmin"): ("tiling", "tile_extended_arcmin"),
    ("tiling", "mer_core_size_arcmin"): ("tiling", "tile_core_arcmin"),
}

#: The seed's top-level workflow settings (Flyte) that have no meaning here: accepted, logged, dropped.
SEED_IGNORED_TOP = {
    "max_parallelism": "Flyte workflow parallelism (here: compute.workers and the Dagster run queue)",
    "quadrant_concurrency": "Flyte map-task concurrency of the header reads",
}

_MOCK_SHINE_REFUSED = (
    "mock_shine: true is not supported: inference here is real. The built-in engine measures shear with "
    "the FPFS estimator (inference.engine: builtin, the default); to run SHINE, set inference.engine: "
    "external and inference.command (see constellation_assets/shear/infer.py). Remove mock_shine or set "
    "it to false."
)


def _migrate_seed_keys(raw: dict, source: str) -> dict:
    """Map the seed's shear-pipeline config keys onto ours; log once (INFO) the mapping applied.

    Renames (:data:`SEED_RENAMES`), plus: ``data.mer_base_uri`` must be where the MER mosaics are found here
    (``{root}/q1/MER/`` next to ``data.vis_base_uri``) and is then dropped; ``output.catalog_table`` names the
    seed's one per-sub-tile table, which here is ``{namespace}.subtiles`` (the per-source rows go to
    ``{namespace}.sources``); ``mock_shine: true`` is refused, ``false`` dropped; with the seed's local
    ``output.catalog_warehouse`` and no ``output.catalog_uri``, the catalog is the seed's SQLite file
    ``{warehouse}/catalog.db``; outputs on S3 (``storage_base_uri``) are written with credentials even when
    the input data is read anonymously (``s3_no_sign_request`` concerns the data bucket only).
    """
    applied: list[str] = []
    out = copy.deepcopy(raw)
    if "mock_shine" in out:
        flag = out.pop("mock_shine")
        if flag is True or str(flag).strip().lower() in ("true", "1", "yes"):
            raise ConfigError(f"{_MOCK_SHINE_REFUSED} (in {source})")
        applied.append(f"mock_shine={flag!r} ignored (inference is real)")
    for key, why in SEED_IGNORED_TOP.items():
        if key in out:
            applied.append(f"{key}={out.pop(key)!r} ignored ({why})")
    seed_output = False
    for (sec, key), target in SEED_RENAMES.items():
        section = out.get(sec)
        if not isinstance(section, dict) or key not in section:
            continue
        value = section.pop(key)
        present, current = _get_path(out, target)
        if present and current != value:
            raise ConfigError(
                f"Config {source}: {sec}.{key}={value!r} (the seed's name) and {'.'.join(target)}={current!r} "
                "disagree; keep one of them"
            )
        _set_path(out, target, value)
        applied.append(f"{sec}.{key} -> {'.'.join(target)}")
        seed_output = seed_output or sec == "output"
    data = out.get("data")
    if isinstance(data, dict) and "mer_base_uri" in data:
        from constellation_assets.io.q1 import default_mer_base_uri

        mer = str(data.pop("mer_base_uri"))
        vis = str(data.get("vis_base_uri", DataConfig.model_fields["vis_base_uri"].default))
        ours = default_mer_base_uri(vis)
        if mer.rstrip("/") != ours.rstrip("/"):
            raise ConfigError(
                f"Config {source}: data.mer_base_uri={mer!r} is not where the MER mosaics are read here: they "
                f"are found next to data.vis_base_uri, at {ours!r} (the Q1 layout {{root}}/q1/VIS/ and "
                "{root}/q1/MER/); point data.vis_base_uri at the same Q1 root or drop data.mer_base_uri"
            )
        applied.append(f"data.mer_base_uri -> the MER mosaics next to data.vis_base_uri ({ours})")
    output = out.get("output")
    if isinstance(output, dict) and "catalog_table" in output:
        table = output.pop("catalog_table")
        ns = output.get("namespace", OutputConfig.model_fields["namespace"].default)
        applied.append(
            f"output.catalog_table={table!r} -> {ns}.subtiles (one row per sub-tile; per-source rows: {ns}.sources)"
        )
        seed_output = True
    if isinstance(output, dict) and seed_output:
        wh = output.get("catalog_warehouse")
        if wh and not is_s3(str(wh)) and not output.get("catalog_uri"):
            db = Path(str(wh)).expanduser().absolute() / "catalog.db"
            output["catalog_uri"] = f"sqlite:///{db}"
            applied.append(f"output.catalog_warehouse -> SQLite catalog {db} (the seed's catalog file)")
        if is_s3(str(output.get("root_uri", ""))) and "s3" not in output:
            region = (data or {}).get("s3", {}).get("region") if isinstance(data, dict) else None
            output["s3"] = {"anon": False, **({"region": region} if region else {})}
            applied.append(
                "output.root_uri on S3 -> output.s3.anon=false (outputs are written with credentials)"
            )
    if applied:
        log.info("config %s: the seed's keys mapped: %s", source, "; ".join(applied))
    return out


def _normalise_file_dict(raw: dict, source: str) -> dict:
    """Strip provenance keys, map the seed's pipeline keys and move its flat injection keys into their section."""
    if not isinstance(raw, dict):
        raise ConfigError(f"Config {source} must be a mapping at the top level, got {type(raw).__name__}")
    raw = _migrate_seed_keys(raw, source)
    out: dict = {}
    for k, v in raw.items():
        if k in PROVENANCE_KEYS:
            continue
        kk = k.replace("-", "_")
        if kk in PipelineConfig.model_fields:
            if kk in out and isinstance(out[kk], dict) and isinstance(v, dict):
                out[kk] = _deep_merge(out[kk], v)
            else:
                out[kk] = v
            continue
        try:
            path = resolve_override_key(kk)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {source})") from None
        _set_path(out, path, v)
    return out


def _read_config_file(source: str | os.PathLike, storage_options: dict | None) -> dict:
    src = str(source)
    opts = storage_options if storage_options is not None else storage_options_for(src, None)
    try:
        text = read_text(src, opts)
    except DataAccessError as exc:
        raise ConfigError(f"Cannot read config {src}: {exc.problem}. {exc.hint}") from exc
    try:
        if src.endswith(".json"):
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)  # safe: no arbitrary tags/objects
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"Config {src} is not valid {'JSON' if src.endswith('.json') else 'YAML'}: {exc}"
        ) from exc
    return data or {}


def _format_validation_error(exc: ValidationError, source: str, flag_paths: dict | None = None) -> str:
    """One line per error; errors in a value that came from a command-line flag name the flag, not the file."""
    flag_paths = flag_paths or {}
    errs = exc.errors()
    from_flags = [
        next(
            (f for path, f in flag_paths.items() if tuple(str(x) for x in e["loc"][: len(path)]) == path),
            None,
        )
        for e in errs
    ]
    if errs and all(from_flags):
        lines = ["Invalid command-line flag value:"]
    else:
        lines = [f"Invalid config ({source}{' and flags' if any(from_flags) else ''}):"]
    for err, flag in zip(errs, from_flags, strict=True):
        loc = ".".join(str(x) for x in err["loc"])
        if flag:
            loc = f"--{flag} ({loc})"
        if err["type"] == "extra_forbidden":
            parent = tuple(str(x) for x in err["loc"][:-1])
            model: Any = PipelineConfig
            for p in parent:
                ann = model.model_fields[p].annotation if p in getattr(model, "model_fields", {}) else None
                model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if model is None:
                    break
            valid = list(model.model_fields) if model is not None else []
            lines.append("  " + _unknown_key_message(loc, valid, prefix=".".join(parent)))
        else:
            val = err.get("input")
            # never echo a credential back: the value may be the URI that was rejected for holding one
            shown = (
                "" if isinstance(val, dict) or str(val) in err["msg"] else f" (got {redact_uri(repr(val))})"
            )
            lines.append(f"  {loc}: {err['msg']}{shown}")
    return "\n".join(lines)


def load_config(
    source: str | os.PathLike | dict | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    storage_options: dict | None = None,
) -> PipelineConfig:
    """Load and validate a pipeline config exactly as the CLI does.

    ``source``: YAML/JSON path or s3:// URI (or an already-parsed dict, or None for built-in defaults).
    ``overrides``: command-line flags, as bare names (``variant``), dotted paths (``injection.variant``) or the
    seed's names (``output_s3``). Values present in the file win over flags (Gen5 precedence); each flag that
    the file overrides is logged.
    """
    flags: dict = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _set_path(flags, resolve_override_key(key), value)

    if source is None:
        file_dict: dict = {}
        label = "defaults"
    elif isinstance(source, dict):
        file_dict = _normalise_file_dict(source, "<dict>")
        label = "<dict>"
    else:
        label = str(source)
        file_dict = _normalise_file_dict(_read_config_file(source, storage_options), label)

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        path = resolve_override_key(key)
        present, file_value = _get_path(file_dict, path)
        if present and file_value != value:
            log.warning(
                "flag --%s=%r overridden by %s: %s=%r",
                key.replace("_", "-"),
                value,
                label,
                ".".join(path),
                file_value,
            )
        else:
            log.info("flag --%s=%r applied", key.replace("_", "-"), value)

    merged = _deep_merge(flags, file_dict)
    flag_paths = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        path = resolve_override_key(key)
        if not _get_path(file_dict, path)[0]:  # the flag's value is the one validated
            flag_paths[tuple(path)] = key.rsplit(".", 1)[-1].replace("_", "-")
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, label, flag_paths)) from None
