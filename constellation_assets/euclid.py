"""Euclid constants shared by the readers, the synthetic survey, the shear stamps and the injections.

One place for the numbers that describe the instrument and the Q1 data products, so a correction reaches
every code path at once. Sources: the Euclid VIS and MER data product descriptions (DPDD), the ESA VIS flag
map, and the Q1 release files themselves (see ``shared/docs/euclid-q1.md``).
"""

from __future__ import annotations

import dataclasses

# ----------------------------------------------------------------------------------------------------------
# Photometry

#: AB magnitude of a flux density of 1 microJansky: m_AB = -2.5 log10(f / uJy) + 23.9. MER catalog fluxes
#: are in uJy, so this is the zero point of every catalog flux.
AB_ZEROPOINT_UJY = 23.9

#: ``MAGZERO`` of the real Q1 MER background-subtracted mosaics (BGSUB-MOSAIC, all bands).
MER_MOSAIC_MAGZERO = 24.6

# ----------------------------------------------------------------------------------------------------------
# VIS instrument

#: VIS native pixel scale (arcsec / pixel); also the MER mosaic pixel scale.
VIS_PIXEL_SCALE_ARCSEC = 0.1

#: VIS PSF FWHM at the focal-plane centre (arcsec), the survey's nominal value.
VIS_PSF_FWHM_ARCSEC = 0.17

#: VIS effective wavelength (m) of the broad RIZ band, telescope aperture and central obscuration.
VIS_WAVELENGTH_M = 715e-9
TELESCOPE_DIAMETER_M = 1.2
TELESCOPE_OBSCURATION = 0.3

#: Nominal and short VIS exposure times (s) of one reference observing sequence: 4 dithers, each with one
#: nominal exposure (DET file ``-{dither}-1-``) and, for two of them, one short exposure (``-{dither}-2-``).
VIS_EXPTIME_NOMINAL_S = 560.52
VIS_EXPTIME_SHORT_S = 89.52

#: Quadrant size of a VIS CCD readout (pixels): 2048 x 2066 (x, y).
VIS_QUADRANT_NX = 2048
VIS_QUADRANT_NY = 2066

#: The VIS PSF product (``DpdVisCalibratedQuadFramePSF``, PSFEx): per quadrant a 9 x 9 grid of 21 x 21 stamps
#: at the native pixel scale, row-major, uniform over the quadrant; one file per observation.
VIS_PSF_GRID = 9
VIS_PSF_STAMP_PIX = 21
VIS_PSF_OVERSAMPLING = 1

# ----------------------------------------------------------------------------------------------------------
# VIS FLG bits (ESA VIS flag map). A pixel is unusable for shear when any bit of FLG_MASK_BITS is set.

FLG_INVALID = 1 << 0  # invalid pixel
FLG_HOT = 1 << 1  # hot pixel
FLG_COLD = 1 << 2  # cold / dead pixel
FLG_SAT = 1 << 3  # saturated
FLG_COSMIC = 1 << 4  # cosmic-ray hit
FLG_GHOST = 1 << 5  # optical ghost
FLG_QUADEDGE = 1 << 6  # near a quadrant edge: informational, the pixel value is good
FLG_BAD_COLUMN = 1 << 7  # bad column
FLG_BAD_CLUSTER = 1 << 8  # cluster of bad pixels
FLG_CR_REGION = 1 << 9  # pixel next to a cosmic-ray hit
FLG_OVRCOL = 1 << 12  # overscan column
FLG_CHARINJ = 1 << 15  # charge-injection line
FLG_SATXTALKGHOST = 1 << 17  # cross-talk ghost of a saturated source
FLG_STARSIGNAL = 1 << 18  # pixel carries signal of a bright star: informational
FLG_ADCMAX = 1 << 21  # ADC maximum reached
FLG_NO_DATA = 1 << 22  # no data
FLG_STITCHBLOCK = 1 << 23  # stitch-block boundary
FLG_OBJECTS = 1 << 24  # pixel belongs to a detected object: informational

#: Name of every documented FLG bit.
FLG_BITS: dict[str, int] = {
    "INVALID": FLG_INVALID,
    "HOT": FLG_HOT,
    "COLD": FLG_COLD,
    "SAT": FLG_SAT,
    "COSMIC": FLG_COSMIC,
    "GHOST": FLG_GHOST,
    "QUADEDGE": FLG_QUADEDGE,
    "BAD_COLUMN": FLG_BAD_COLUMN,
    "BAD_CLUSTER": FLG_BAD_CLUSTER,
    "CR_REGION": FLG_CR_REGION,
    "OVRCOL": FLG_OVRCOL,
    "CHARINJ": FLG_CHARINJ,
    "SATXTALKGHOST": FLG_SATXTALKGHOST,
    "STARSIGNAL": FLG_STARSIGNAL,
    "ADCMAX": FLG_ADCMAX,
    "NO_DATA": FLG_NO_DATA,
    "STITCHBLOCK": FLG_STITCHBLOCK,
    "OBJECTS": FLG_OBJECTS,
}

#: Bits that are information, not defects: QUADEDGE (the pixel value is good), STARSIGNAL and OBJECTS (the
#: pixel holds real signal). Everything else documented masks a pixel (legacypipe's choice for VIS).
FLG_INFORMATIONAL_BITS = FLG_QUADEDGE | FLG_STARSIGNAL | FLG_OBJECTS

#: FLG bits that mask a pixel for shear measurement and injection hosts.
FLG_MASK_BITS = 0
for _bit in FLG_BITS.values():
    FLG_MASK_BITS |= _bit
FLG_MASK_BITS &= ~FLG_INFORMATIONAL_BITS
del _bit

# ----------------------------------------------------------------------------------------------------------
# MER tiles and mosaics

#: MER tile core and extended sizes (arcmin) and the sub-tile layout used here.
TILE_CORE_ARCMIN = 30.0
TILE_EXTENDED_ARCMIN = 32.0
SUBTILE_GRID = (4, 4)
SUBTILE_MARGIN_ARCMIN = 1.0

#: Full MER tile grid: 19200 x 19200 pixels of 0.1" about the tile centre; CRPIX of the real mosaics.
MER_TILE_NPIX = 19200
MER_MOSAIC_CRPIX = 9600.0


@dataclasses.dataclass(frozen=True)
class Band:
    """One Euclid band of the MER mosaics: config name, file-name token, folder, instrument, optics and depth."""

    name: str  # config / FILTER name (MER DPDD: VIS, NIR_Y, NIR_J, NIR_H)
    token: str  # in the file name: EUC_MER_BGSUB-MOSAIC-{token}_TILE...
    folder: str  # q1/MER/{tile_id}/{folder}/
    instrument: str
    wavelength_um: float  # effective wavelength (power-law colours, diffraction scale)
    psf_fwhm_arcsec: float | None  # FWHM in the resampled mosaic (None: the VIS PSF of the field)
    depth_5sigma_point_mag: float  # 5-sigma point-source depth (AB), sets the noise relative to VIS


#: Euclid bands of the MER mosaics. Depths follow the Euclid Wide Survey (VIS ~26.2, NISP ~24.5 AB, 5 sigma
#: point source); NISP FWHMs are those of the resampled MER mosaics (~0.45-0.5"), wavelengths the band centres.
BANDS: dict[str, Band] = {
    "VIS": Band("VIS", "VIS", "VIS", "VIS", 0.715, None, 26.2),
    "NIR_Y": Band("NIR_Y", "NIR-Y", "NISP", "NISP", 1.081, 0.45, 24.5),
    "NIR_J": Band("NIR_J", "NIR-J", "NISP", "NISP", 1.367, 0.47, 24.6),
    "NIR_H": Band("NIR_H", "NIR-H", "NISP", "NISP", 1.772, 0.50, 24.5),
}

#: Aliases accepted for band names (NISP filters are often called Y, J, H).
BAND_ALIASES = {
    "Y": "NIR_Y",
    "J": "NIR_J",
    "H": "NIR_H",
    "NIR-Y": "NIR_Y",
    "NIR-J": "NIR_J",
    "NIR-H": "NIR_H",
}


def canonical_band(band: str) -> str:
    """``"Y"`` / ``"NIR-Y"`` / ``"NIR_Y"`` -> ``"NIR_Y"``; unknown names are returned unchanged (upper case)."""
    b = str(band).strip().upper()
    return BAND_ALIASES.get(b, b)


def flag_names(value: int) -> list[str]:
    """Names of the documented FLG bits set in ``value`` (undocumented bits as ``BIT{n}``)."""
    out = [name for name, bit in FLG_BITS.items() if value & bit]
    known = 0
    for bit in FLG_BITS.values():
        known |= bit
    rest = int(value) & ~known
    n = 0
    while rest:
        if rest & 1:
            out.append(f"BIT{n}")
        rest >>= 1
        n += 1
    return out
