"""Shared pieces of the injection runs: constants, the error type, hosts/tasks/parameters records, seeds."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


#: What an injection run's outputs depend on (its config_hash covers these; the hosts and the COSMOS bank enter
#: through the hash's ``extra``): changing, say, the shear estimator settings does not invalidate a run.
INJECTION_HASH_SECTIONS = ("field_name", "tile_ids", "injection")


SPLITS = ("train", "val", "test")


#: Bands with host pixels: VIS (quadrants, or MER mosaics with NISP) and the NISP bands (MER mosaics).
HOST_BANDS = ("VIS", "NIR_Y", "NIR_J", "NIR_H")


TABLE_IDENTIFIER = ("sim", "injections")


#: Version of the injection recipe: ``"injection-{N}"``, N bumped whenever the code changes the bytes of a shard
#: (draws, rendering, columns, metadata). It is written into every shard's footer and enters the config hash, so
#: bumping it changes every run's config_hash: a completed run of an older version is then a conflict
#: (``--force`` to redo it) and ``constellation reproduce`` of an older record reports "NOT identical".
#: History: "injection-2" (the earlier recipe was recorded as "h8-injection-v1"): adds the shard columns
#: host_flagged_pix and cosmos_template_hlr_arcsec, cosmos_hlr_arcsec measured on the lensed arc, FLG-masked
#: noise statistics.
INJECTION_CODE_VERSION = "injection-2"


IMAGE_ENCODING = "float32 little-endian row-major (H, W), ADU"


_RENDER_BATCH = 64  # stamps per torch batch: ~2 MB per 64x64 stamp at oversampling 4


class InjectionError(ValueError):
    """An injection run cannot proceed; the message names the input and says what to do."""


@dataclass(frozen=True)
class Quadrant:
    """One VIS quadrant SCI HDU: where it is and what the pixels mean."""

    frame_uri: str
    hdu: str  # "{row}-{col}.{quad}.SCI"
    nx_pix: int
    ny_pix: int
    zero_point_mag: float  # AB mag giving 1 ADU in this frame (MAGZEROP + 2.5 log10 EXPTIME)
    gain_e_per_adu: float
    header: str  # the SCI header as text (WCS)
    #: the quadrant's row of the Q1 quadrant index (``io.q1.index_exposure``): byte ranges of its SCI, RMS, FLG
    #: and BKG extensions, read with ``io.q1.read_quadrant_hdus``. None for MER-mosaic hosts.
    row: dict | None = field(default=None, compare=False, repr=False)

    def wcs(self):
        return _wcs_from_header_text(self.header)


@dataclass(frozen=True)
class Host:
    """A host galaxy and the quadrant its cutout comes from (pixel coordinates 0-based)."""

    tile_id: int
    object_id: int
    ra_deg: float
    dec_deg: float
    mag_ab: float
    semimajor_axis_pix: float
    frame_uri: str
    hdu: str
    x_pix: float
    y_pix: float

    @property
    def host_id(self) -> str:
        return f"{self.tile_id}_{self.object_id}"


@dataclass(frozen=True)
class Task:
    task_id: str
    split: str
    shard: int
    index_in_split: int
    host: Host


@dataclass
class TaskParameters:
    """Everything drawn for one task (angles in radians, lengths in arcsec, offsets from the stamp centre)."""

    task_id: str
    theta_e_arcsec: float
    lens_q: float
    lens_phi_rad: float
    lens_center_x_arcsec: float
    lens_center_y_arcsec: float
    shear_gamma1: float
    shear_gamma2: float
    source_x_arcsec: float
    source_y_arcsec: float
    source_mag: float
    source_mode: str
    source_hlr_arcsec: float
    source_n: float
    source_q: float
    source_phi_rad: float
    cosmos_index: int | None
    cosmos_hlr_arcsec: float | None  # half-light radius of the rendered lensed arc (cosmos mode)
    noise_seed: int
    cosmos_template_hlr_arcsec: float | None = None  # the bank template's own (unlensed) radius


@dataclass
class HostSet:
    hosts: list[Host]
    quadrants: dict[tuple[str, str], Quadrant]
    problems: list[str] = field(default_factory=list)
    #: MER-mosaic hosts only: (frame_uri, hdu) -> {band: io.q1.MosaicInfo}
    mosaics: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: frames left out under ``injection.exclude_damaged_frames``: uri -> why it could not be read
    excluded: dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        blob = "\n".join(
            f"{h.host_id}|{h.frame_uri.rsplit('/', 1)[-1]}|{h.hdu}|{h.x_pix:.6f}|{h.y_pix:.6f}"
            for h in self.hosts
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _hash_u64(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


def task_seed(task_id: str, seed_base: int) -> int:
    """64-bit seed of a task: ``int(sha256((task_id + str(seed_base)).encode()).hexdigest()[:16], 16)``."""
    return _hash_u64(task_id + str(seed_base))


def _wcs_from_header_text(text: str):
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    hdr = fits.Header.fromstring(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(hdr)


def _header_float(hdr, key: str, default: float) -> float:
    try:
        v = hdr.get(key)
        return float(str(v).strip()) if v is not None else default
    except (TypeError, ValueError):
        return default


MER_HOST_HDU = "MER_MOSAIC"


def _mer_mode(inj) -> bool:
    """True when any configured band is not VIS: every band's host then comes from the MER mosaics."""
    from constellation_assets.euclid import canonical_band

    return any(canonical_band(b) != "VIS" for b in inj.bands)
