"""Shear measurement: batched FPFS estimator (torch), ensemble shear and calibration sims.

``measure_stamps`` and ``ensemble_shear`` are the public kernel API; calibration (GalSim) is imported
lazily so the worker does not pay for it.
"""

from constellation_assets.shear.ensemble import ensemble_shear
from constellation_assets.shear.fpfs import FpfsSettings, measure_stamps

__all__ = [
    "CalibrationResult",
    "CalibrationSettings",
    "FpfsSettings",
    "calibration_figure_png",
    "ensemble_shear",
    "measure_stamps",
    "run_calibration",
]


def __getattr__(name: str):
    if name in ("CalibrationResult", "CalibrationSettings", "run_calibration", "calibration_figure_png"):
        from constellation_assets.shear import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module 'constellation_assets.shear' has no attribute {name!r}")
