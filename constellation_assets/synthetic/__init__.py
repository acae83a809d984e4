"""Synthetic Euclid survey in the exact Q1 layout: VIS frames, PSF products, MER catalogs and mosaics, truth.

Modules: :mod:`.layout` (file names, timestamps, folders), :mod:`.focal_plane` (CCD/quadrant geometry,
exposures, WCS headers), :mod:`.psf` (optics, field-dependent PSF, PSF product), :mod:`.population`
(galaxies, stars, COSMOS table, shear), :mod:`.render` (quadrant images, noise, defects), :mod:`.mer` (MER
catalog and mosaics), :mod:`.field` (``simulate_field`` orchestration). Lens injection lives in
:mod:`constellation_assets.sim`.
"""

from __future__ import annotations

from constellation_assets.euclid import canonical_band
from constellation_assets.synthetic.field import FieldSummary, TileFieldSummary, simulate_field
from constellation_assets.synthetic.layout import mer_base_uri_of, tile_truth_uri
from constellation_assets.synthetic.mer import MER_BANDS, band_colour_mag

__all__ = [
    "MER_BANDS",
    "FieldSummary",
    "TileFieldSummary",
    "band_colour_mag",
    "canonical_band",
    "mer_base_uri_of",
    "simulate_field",
    "tile_truth_uri",
]
